//! Fixed guest-side network facts.
//!
//! Every sandbox restores the same memory snapshot, so the guest's view of its network
//! (its address, its gateway, both MAC addresses) must be identical in every network
//! slot. The host distinguishes slots by the address of each slot's veth pair instead.

use std::net::Ipv4Addr;

/// Port envd listens on inside every sandbox.
pub const ENVD_PORT: u16 = 49983;

/// Address of the guest's `eth0`.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 21);

/// Address of the tap device inside the slot's namespace: the guest's default gateway.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 22);

/// Prefix length of the guest link (a /30 holding the guest and its gateway).
pub const GUEST_PREFIX_LEN: u8 = 30;

/// MAC address of the guest's virtio-net device.
pub const GUEST_MAC: &str = "02:fc:00:00:00:05";

/// MAC address of the tap device in the slot's namespace, which the guest caches in its ARP table.
pub const TAP_MAC: &str = "02:fc:00:00:00:06";

/// Name of the tap device inside each slot's namespace. Names are per namespace, so one fixed
/// name fits every slot and never collides on the host.
pub const TAP_NAME: &str = "tap0";
