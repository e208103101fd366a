//! Per-sandbox egress policy: which destinations the guest may open connections to.
//!
//! The rules live in the slot's own namespace, in a table of their own, so changing them
//! never touches the host's rules or another slot. The policy follows the E2B SDK's
//! `network` settings:
//! - destinations in `allow` are always reachable ("allowed entries take precedence");
//! - destinations in `deny` are not, except TCP connections whose TLS server name or HTTP
//!   `Host` matches one of `allow_domains`: those go to the slot's [`DomainProxy`], which
//!   checks the name and connects on the guest's behalf;
//! - everything else is reachable.
//!
//! The verdict is taken on a connection's original destination, so a DNS query that the
//! slot redirects to Hearth's resolver is judged by the address the guest asked for.
//! Replies to connections that reach the guest through the slot (the proxy, the node
//! agent) are never affected.
//!
//! [`DomainProxy`]: crate::domain_proxy::DomainProxy

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use hearth_types::guest::{GATEWAY_IP, GUEST_IP, TAP_NAME};

use crate::command::{self, CommandError};
use crate::domain_proxy::DOMAIN_PROXY_PORT;
use crate::slot::Slot;
use crate::sniff::DomainPattern;
use crate::subnet::{Ipv4Subnet, SubnetError};

/// Name of the egress table inside each slot's namespace.
const EGRESS_TABLE: &str = "hearth_egress";

/// DNS server the SDK allows by default when `allowOut` names a domain.
pub const DEFAULT_DNS_SERVER: Ipv4Addr = Ipv4Addr::new(8, 8, 8, 8);

/// Every IPv4 address: what `allow_internet_access=false` denies.
pub const ALL_TRAFFIC: &str = "0.0.0.0/0";

/// Error for an egress setting that is not valid, naming the field and the entry.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid network.{field} entry {entry:?}: {reason}")]
pub struct InvalidEgress {
    /// SDK field: `allowOut`, `denyOut` or `dnsServers`.
    pub field: &'static str,
    /// The entry as given.
    pub entry: String,
    /// Reason the entry is invalid.
    pub reason: String,
}

/// A sandbox's egress policy, validated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    /// Destinations that are always reachable.
    pub allow: Vec<Ipv4Subnet>,
    /// Names whose TCP connections are reachable even when `deny` covers the address.
    pub allow_domains: Vec<DomainPattern>,
    /// Destinations that are not reachable unless `allow` or `allow_domains` lets them.
    pub deny: Vec<Ipv4Subnet>,
}

/// The SDK's egress settings as a request carries them.
#[derive(Clone, Debug, Default)]
pub struct EgressSettings<'a> {
    /// `allow_internet_access`; `None` when the request left it unset (allowed).
    pub allow_internet_access: Option<bool>,
    /// `network.allowOut`: IPs, CIDRs and domain names.
    pub allow_out: &'a [String],
    /// `network.denyOut`: IPs and CIDRs.
    pub deny_out: &'a [String],
    /// `network.dnsServers`; `None` means the default, [`DEFAULT_DNS_SERVER`].
    pub dns_servers: Option<&'a [String]>,
}

impl EgressPolicy {
    /// Validates the SDK's settings and builds the policy. `allow_internet_access=false`
    /// denies every address, as a `denyOut` of `0.0.0.0/0` does. When `allowOut` names a
    /// domain, the `dnsServers` (8.8.8.8 unless given) are allowed too, so the guest can
    /// resolve the name.
    pub fn from_settings(settings: &EgressSettings<'_>) -> Result<Self, InvalidEgress> {
        let mut policy = EgressPolicy::default();
        for entry in settings.allow_out {
            match parse_address(entry) {
                Some(subnet) => policy.allow.push(subnet?),
                None => {
                    let pattern = entry
                        .parse::<DomainPattern>()
                        .map_err(|err| InvalidEgress {
                            field: "allowOut",
                            entry: entry.clone(),
                            reason: err.to_string(),
                        })?;
                    policy.allow_domains.push(pattern);
                }
            }
        }
        for entry in settings.deny_out {
            match parse_address(entry) {
                Some(subnet) => policy.deny.push(subnet.map_err(|mut err| {
                    err.field = "denyOut";
                    err
                })?),
                None => {
                    return Err(InvalidEgress {
                        field: "denyOut",
                        entry: entry.clone(),
                        reason: "expected an IPv4 address or CIDR such as 10.0.0.0/8; denyOut takes no domain names".into(),
                    })
                }
            }
        }
        let mut dns_servers = Vec::new();
        match settings.dns_servers {
            None => dns_servers.push(DEFAULT_DNS_SERVER),
            Some(entries) => {
                for entry in entries {
                    let address = entry.parse::<Ipv4Addr>().map_err(|_| InvalidEgress {
                        field: "dnsServers",
                        entry: entry.clone(),
                        reason: "expected an IPv4 address such as 8.8.8.8".into(),
                    })?;
                    dns_servers.push(address);
                }
            }
        }
        if !policy.allow_domains.is_empty() {
            policy.allow.extend(
                dns_servers
                    .into_iter()
                    .map(|address| Ipv4Subnet::new(address, 32).expect("a /32 has no host bits")),
            );
        }
        if settings.allow_internet_access == Some(false) {
            policy.deny.push(ALL_TRAFFIC.parse().expect("valid CIDR"));
        }
        Ok(policy)
    }

    /// Returns whether the policy lets every destination through, so no rule is needed.
    pub fn is_open(&self) -> bool {
        self.deny.is_empty()
    }

    /// Renders the nftables script that replaces the slot's egress table with this policy.
    pub(crate) fn nft_script(&self) -> String {
        let mut script = format!(
            "table ip {EGRESS_TABLE}\n\
             delete table ip {EGRESS_TABLE}\n"
        );
        if self.is_open() {
            return script;
        }
        let set = |name: &str, subnets: &[Ipv4Subnet]| {
            let mut text = format!(
                "  set {name} {{\n    type ipv4_addr\n    flags interval\n    auto-merge\n"
            );
            if !subnets.is_empty() {
                let elements: Vec<String> = subnets.iter().map(Ipv4Subnet::to_string).collect();
                let _ = writeln!(text, "    elements = {{ {} }}", elements.join(", "));
            }
            text.push_str("  }\n");
            text
        };
        let _ = writeln!(script, "table ip {EGRESS_TABLE} {{");
        script.push_str(&set("allow", &self.allow));
        script.push_str(&set("deny", &self.deny));
        if !self.allow_domains.is_empty() {
            // Before the slot's own DNAT (priority dstnat), which sends DNS to the resolver:
            // port 53 is left to it.
            let _ = write!(
                script,
                "  chain prerouting {{\n\
                 \x20   type nat hook prerouting priority dstnat - 10; policy accept;\n\
                 \x20   iifname \"{TAP_NAME}\" ip saddr {GUEST_IP} tcp dport != 53 ip daddr != @allow ip daddr @deny \
                 dnat to {GATEWAY_IP}:{DOMAIN_PROXY_PORT}\n\
                 \x20 }}\n"
            );
        }
        let _ = write!(
            script,
            "  chain forward {{\n\
             \x20   type filter hook forward priority filter; policy accept;\n\
             \x20   iifname \"{TAP_NAME}\" ct state new ct original ip daddr @allow accept\n\
             \x20   iifname \"{TAP_NAME}\" ct state new ct original ip daddr @deny meta l4proto tcp reject with tcp reset\n\
             \x20   iifname \"{TAP_NAME}\" ct state new ct original ip daddr @deny reject with icmp type admin-prohibited\n\
             \x20 }}\n\
             }}\n"
        );
        script
    }
}

/// Parses an `allowOut`/`denyOut` entry as an IPv4 address or CIDR. Returns `None` for an
/// entry that is neither (a domain name, for `allowOut`).
fn parse_address(entry: &str) -> Option<Result<Ipv4Subnet, InvalidEgress>> {
    let invalid = |reason: String| InvalidEgress {
        field: "allowOut",
        entry: entry.to_owned(),
        reason,
    };
    let address = entry.split_once('/').map_or(entry, |(address, _)| address);
    if address.parse::<std::net::Ipv6Addr>().is_ok() {
        return Some(Err(invalid(
            "IPv6 destinations are not supported: sandboxes have IPv4 only".into(),
        )));
    }
    let looks_numeric = entry
        .bytes()
        .all(|b| b.is_ascii_digit() || b == b'.' || b == b'/');
    if !looks_numeric {
        return None;
    }
    Some(entry.parse::<Ipv4Subnet>().map_err(|err| {
        invalid(match err {
            SubnetError::HostBits { .. } => err.to_string(),
            _ => "expected an IPv4 address or CIDR such as 10.0.0.0/8".into(),
        })
    }))
}

/// Replaces the egress rules of the guest in `slot` with `policy`. When
/// `reset_connections` is set, the guest's open connections are dropped from the
/// namespace's connection tracking, so each is judged again by the new rules at its next
/// packet. Blocking: call it from a thread that may block.
pub fn apply(
    slot: &Slot,
    policy: &EgressPolicy,
    reset_connections: bool,
) -> Result<(), CommandError> {
    let script = policy.nft_script();
    command::in_netns(&slot.netns, move || {
        command::run("nft", &["-f", "-"], Some(&script))?;
        if reset_connections {
            forget_guest_connections()?;
        }
        Ok(())
    })
}

/// Deletes the connection tracking entries of connections the guest opened, in the
/// calling thread's namespace.
fn forget_guest_connections() -> Result<(), CommandError> {
    let guest = GUEST_IP.to_string();
    match command::run("conntrack", &["-D", "-s", &guest], None) {
        // conntrack exits 1 when no entry matched.
        Err(CommandError::Failed { stderr, .. }) if stderr.contains("0 flow entries") => Ok(()),
        other => other.map(|_| ()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(values: &[&str]) -> Vec<String> {
        values.iter().map(|v| (*v).to_owned()).collect()
    }

    #[test]
    fn default_settings_are_open() {
        let policy = EgressPolicy::from_settings(&EgressSettings::default()).unwrap();
        assert!(policy.is_open());
        assert_eq!(
            policy.nft_script(),
            "table ip hearth_egress\ndelete table ip hearth_egress\n"
        );
    }

    #[test]
    fn no_internet_denies_everything() {
        let settings = EgressSettings {
            allow_internet_access: Some(false),
            ..Default::default()
        };
        let policy = EgressPolicy::from_settings(&settings).unwrap();
        assert_eq!(policy.deny, vec!["0.0.0.0/0".parse().unwrap()]);
        assert!(policy.allow.is_empty());
        let script = policy.nft_script();
        assert!(script.contains("ct original ip daddr @deny"), "{script}");
        assert!(!script.contains("dnat"), "{script}");
    }

    #[test]
    fn domains_allow_dns_servers_and_add_the_redirect() {
        let allow = strings(&["example.com", "10.1.2.3", "192.0.2.0/24"]);
        let deny = strings(&["0.0.0.0/0"]);
        let settings = EgressSettings {
            allow_out: &allow,
            deny_out: &deny,
            ..Default::default()
        };
        let policy = EgressPolicy::from_settings(&settings).unwrap();
        assert_eq!(policy.allow_domains.len(), 1);
        let allowed: Vec<String> = policy.allow.iter().map(ToString::to_string).collect();
        assert_eq!(allowed, ["10.1.2.3/32", "192.0.2.0/24", "8.8.8.8/32"]);
        let script = policy.nft_script();
        assert!(script.contains("dnat to 169.254.0.22:15001"), "{script}");
        assert!(
            script.contains("elements = { 10.1.2.3/32, 192.0.2.0/24, 8.8.8.8/32 }"),
            "{script}"
        );
    }

    #[test]
    fn explicit_dns_servers_replace_the_default() {
        let allow = strings(&["*.example.com"]);
        let dns = strings(&["198.18.0.2"]);
        let settings = EgressSettings {
            allow_out: &allow,
            dns_servers: Some(&dns),
            ..Default::default()
        };
        let policy = EgressPolicy::from_settings(&settings).unwrap();
        assert_eq!(policy.allow, vec!["198.18.0.2/32".parse().unwrap()]);
    }

    #[test]
    fn invalid_entries_name_field_and_entry() {
        let deny = strings(&["example.com"]);
        let error = EgressPolicy::from_settings(&EgressSettings {
            deny_out: &deny,
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(error.field, "denyOut");

        let deny = strings(&["10.0.0.1/8"]);
        let error = EgressPolicy::from_settings(&EgressSettings {
            deny_out: &deny,
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(error.field, "denyOut");
        assert!(error.to_string().contains("10.0.0.0/8"), "{error}");

        let allow = strings(&["2001:db8::1"]);
        let error = EgressPolicy::from_settings(&EgressSettings {
            allow_out: &allow,
            ..Default::default()
        })
        .unwrap_err();
        assert!(error.reason.contains("IPv6"), "{error}");

        let allow = strings(&["example.com:443"]);
        let error = EgressPolicy::from_settings(&EgressSettings {
            allow_out: &allow,
            ..Default::default()
        })
        .unwrap_err();
        assert!(!error.reason.contains("IPv6"), "{error}");

        let deny = strings(&["256.1.1.1"]);
        let error = EgressPolicy::from_settings(&EgressSettings {
            deny_out: &deny,
            ..Default::default()
        })
        .unwrap_err();
        assert!(error.reason.contains("IPv4 address or CIDR"), "{error}");

        let allow = strings(&["bad domain!"]);
        assert!(EgressPolicy::from_settings(&EgressSettings {
            allow_out: &allow,
            ..Default::default()
        })
        .is_err());

        let dns = strings(&["dns.google"]);
        let error = EgressPolicy::from_settings(&EgressSettings {
            dns_servers: Some(&dns),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(error.field, "dnsServers");
    }
}
