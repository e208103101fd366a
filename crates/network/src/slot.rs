//! The network slot a sandbox (or a template build VM) runs in.

use std::net::Ipv4Addr;

/// A prepared network slot.
///
/// Inside `netns` there is a tap device named [`hearth_types::guest::TAP_NAME`] with the
/// gateway address, for the VMM to attach to. The host reaches any TCP port of the guest
/// at `guest_route_ip`, which the namespace translates to the fixed guest address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Index of the slot within its server instance's pool.
    pub index: u32,
    /// Name of the network namespace (as under `/run/netns`).
    pub netns: String,
    /// Host-side address of the veth pair.
    pub host_ip: Ipv4Addr,
    /// Namespace-side address of the veth pair: where the host connects to reach the guest.
    pub guest_route_ip: Ipv4Addr,
}
