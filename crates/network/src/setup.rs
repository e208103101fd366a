//! Creating and deleting one slot, and the instance's host rules. Blocking: call from a
//! thread that may block.

use std::net::Ipv4Addr;

use hearth_types::guest::{GATEWAY_IP, GUEST_IP, GUEST_PREFIX_LEN, TAP_MAC, TAP_NAME};

use crate::command::{self, is_not_found, CommandError};
use crate::instance::InstanceId;
use crate::slot::Slot;
use crate::subnet::Ipv4Subnet;

/// Name of the namespace end of the veth pair. Interface names are per namespace, so
/// one fixed name fits every slot.
pub(crate) const NETNS_VETH_NAME: &str = "eth0";

/// Host addresses of one slot, before it exists.
pub(crate) struct SlotPlan {
    pub index: u32,
    pub netns: String,
    pub host_veth: String,
    pub host_ip: Ipv4Addr,
    pub guest_route_ip: Ipv4Addr,
    /// Resolver every DNS query of the guest is sent to.
    pub dns_server: Ipv4Addr,
}

impl SlotPlan {
    /// Plans slot `index` of `instance` in `subnet`, or `None` past the subnet's capacity.
    pub fn new(
        instance: &InstanceId,
        subnet: &Ipv4Subnet,
        index: u32,
        dns_server: Ipv4Addr,
    ) -> Option<Self> {
        Some(Self {
            index,
            netns: instance.netns_name(index),
            host_veth: instance.host_veth_name(index),
            host_ip: subnet.host_ip(index)?,
            guest_route_ip: subnet.guest_route_ip(index)?,
            dns_server,
        })
    }
}

/// Metadata services outside the link-local range that slots must not reach (Alibaba
/// Cloud's). Link-local (169.254.0.0/16) is blocked as a whole.
const METADATA_ADDRESSES: &str = "100.100.100.200";

/// Enables forwarding on the host and installs the instance's nftables table, replacing
/// any earlier copy:
/// - forward: nothing outside the host opens connections into a slot (the host's own
///   connections to a guest are not forwarded, so they pass). Slots cannot reach each
///   other, link-local addresses (such as a cloud metadata service) or other metadata
///   addresses through the host. The one exception is DNS to `dns_server` when it is
///   link-local, as some clouds' resolvers are;
/// - input: slots cannot open connections to the host's own services;
/// - postrouting: slot traffic leaving the host is masqueraded.
pub(crate) fn install_host_rules(
    instance: &InstanceId,
    subnet: &Ipv4Subnet,
    dns_server: Ipv4Addr,
) -> Result<(), CommandError> {
    command::write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;

    let table = instance.nft_table();
    let veths = format!("{}*", instance.host_veth_prefix());
    // NOTE: an accept here does not override a drop in another table at the same hook,
    // such as a FORWARD policy of DROP set by Docker. Such hosts need a rule of their own.
    let rules = format!(
        "table ip {table}\n\
         delete table ip {table}\n\
         table ip {table} {{\n\
           chain forward {{\n\
             type filter hook forward priority filter; policy accept;\n\
             iifname \"{veths}\" oifname \"{veths}\" drop\n\
             oifname \"{veths}\" ct state established,related accept\n\
             oifname \"{veths}\" drop\n\
             iifname \"{veths}\" ip daddr {dns_server} meta l4proto {{ tcp, udp }} th dport 53 accept\n\
             iifname \"{veths}\" ip daddr {{ 169.254.0.0/16, {METADATA_ADDRESSES} }} drop\n\
           }}\n\
           chain input {{\n\
             type filter hook input priority filter; policy accept;\n\
             iifname \"{veths}\" ct state established,related accept\n\
             iifname \"{veths}\" ip daddr {dns_server} meta l4proto {{ tcp, udp }} th dport 53 accept\n\
             iifname \"{veths}\" drop\n\
           }}\n\
           chain postrouting {{\n\
             type nat hook postrouting priority srcnat; policy accept;\n\
             ip saddr {subnet} oifname != \"{veths}\" masquerade\n\
           }}\n\
         }}\n"
    );
    command::run("nft", &["-f", "-"], Some(&rules))?;
    Ok(())
}

/// Deletes the instance's nftables table; returns whether it existed.
pub(crate) fn remove_host_rules(instance: &InstanceId) -> Result<bool, CommandError> {
    match command::run(
        "nft",
        &["delete", "table", "ip", &instance.nft_table()],
        None,
    ) {
        Ok(_) => Ok(true),
        Err(error) if is_not_found(&error) => Ok(false),
        Err(error) => Err(error),
    }
}

/// Creates the slot: namespace, veth pair, tap device, routes and NAT rules. On failure
/// removes whatever part of it was created.
pub(crate) fn create_slot(plan: &SlotPlan) -> Result<Slot, CommandError> {
    let result = configure_slot(plan);
    if let Err(error) = &result {
        tracing::warn!(netns = %plan.netns, %error, "slot creation failed; removing its parts");
        if let Err(cleanup_error) = destroy_slot(&plan.netns, &plan.host_veth) {
            tracing::warn!(netns = %plan.netns, error = %cleanup_error, "failed to remove a partly created slot");
        }
    }
    result
}

fn configure_slot(plan: &SlotPlan) -> Result<Slot, CommandError> {
    let SlotPlan {
        netns,
        host_veth,
        host_ip,
        guest_route_ip,
        dns_server,
        ..
    } = plan;

    let host_batch = format!(
        "netns add {netns}\n\
         link add {host_veth} type veth peer name {NETNS_VETH_NAME} netns {netns}\n\
         addr add {host_ip}/30 dev {host_veth}\n\
         link set {host_veth} up\n"
    );
    command::run("ip", &["-batch", "-"], Some(&host_batch))?;

    // The tap is created by root and left without an owner: QEMU, started as root inside
    // the namespace, attaches to it by name.
    let netns_batch = format!(
        "link set lo up\n\
         addr add {guest_route_ip}/30 dev {NETNS_VETH_NAME}\n\
         link set {NETNS_VETH_NAME} up\n\
         tuntap add dev {TAP_NAME} mode tap\n\
         link set {TAP_NAME} address {TAP_MAC}\n\
         addr add {GATEWAY_IP}/{GUEST_PREFIX_LEN} dev {TAP_NAME}\n\
         link set {TAP_NAME} up\n\
         route add default via {host_ip}\n"
    );
    command::run("ip", &["-n", netns, "-batch", "-"], Some(&netns_batch))?;

    // - prerouting: the host reaches every TCP port of the guest at `guest_route_ip`. Every
    //   DNS query of the guest, whatever server it names, goes to `dns_server`.
    // - forward: the guest sends only from its own address, so nothing it sends can pass
    //   for another host's traffic.
    // - postrouting: the guest's traffic leaves with the slot's address.
    let rules = format!(
        "table ip hearth_slot {{\n\
           chain prerouting {{\n\
             type nat hook prerouting priority dstnat; policy accept;\n\
             iifname \"{NETNS_VETH_NAME}\" ip daddr {guest_route_ip} meta l4proto tcp dnat to {GUEST_IP}\n\
             iifname \"{TAP_NAME}\" ip saddr {GUEST_IP} meta l4proto {{ tcp, udp }} th dport 53 dnat to {dns_server}:53\n\
           }}\n\
           chain forward {{\n\
             type filter hook forward priority filter - 10; policy accept;\n\
             iifname \"{TAP_NAME}\" ip saddr != {GUEST_IP} drop\n\
           }}\n\
           chain postrouting {{\n\
             type nat hook postrouting priority srcnat; policy accept;\n\
             oifname \"{NETNS_VETH_NAME}\" ip saddr {GUEST_IP} snat to {guest_route_ip}\n\
           }}\n\
         }}\n"
    );
    command::in_netns(netns, move || {
        command::write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
        // Slots carry IPv4 only; with IPv6 off no guest packet can take another path.
        command::write_sysctl("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1")?;
        command::write_sysctl("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1")?;
        command::run("nft", &["-f", "-"], Some(&rules))?;
        Ok(())
    })?;

    Ok(Slot {
        index: plan.index,
        netns: netns.clone(),
        host_ip: *host_ip,
        guest_route_ip: *guest_route_ip,
    })
}

/// Deletes a slot. Deleting the host veth end first removes the pair at once (the
/// namespace's own teardown is asynchronous), so the name can be reused right away;
/// deleting the namespace then removes the tap and the slot's conntrack state.
/// Parts that are already gone are skipped.
pub(crate) fn destroy_slot(netns: &str, host_veth: &str) -> Result<(), CommandError> {
    delete_link(host_veth)?;
    delete_netns(netns)
}

/// Deletes a host interface; an interface that is already gone is not an error.
pub(crate) fn delete_link(name: &str) -> Result<(), CommandError> {
    match command::run("ip", &["link", "del", name], None) {
        Err(error) if !is_not_found(&error) => Err(error),
        _ => Ok(()),
    }
}

/// Deletes a network namespace; a namespace that is already gone is not an error.
pub(crate) fn delete_netns(name: &str) -> Result<(), CommandError> {
    match command::run("ip", &["netns", "del", name], None) {
        Err(error) if !is_not_found(&error) => Err(error),
        _ => Ok(()),
    }
}
