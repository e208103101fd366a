//! The resolver that answers every sandbox's DNS queries.
//!
//! Each slot sends the guest's DNS traffic (TCP and UDP port 53, to any address) to one
//! resolver that the server chooses: `--dns-server` when given, else the host's own
//! first usable IPv4 nameserver, else 8.8.8.8.

use std::net::Ipv4Addr;

/// Resolver used when neither the settings nor the host name one.
pub const FALLBACK_DNS_SERVER: Ipv4Addr = Ipv4Addr::new(8, 8, 8, 8);

/// Files that may list the host's nameservers, in the order they are read. With
/// systemd-resolved, `/etc/resolv.conf` names only its loopback stub, and the second file
/// lists the real servers.
const RESOLV_CONF_FILES: [&str; 2] = ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"];

/// Error for a resolver address that a slot cannot send queries to.
#[derive(Debug, thiserror::Error)]
#[error("invalid DNS server {0}: sandboxes cannot reach a loopback, unspecified, broadcast or multicast address; name a resolver the host can route to")]
pub struct InvalidDnsServer(pub Ipv4Addr);

/// Checks that slots can send queries to `address`.
pub fn check_dns_server(address: Ipv4Addr) -> Result<Ipv4Addr, InvalidDnsServer> {
    if usable(address) {
        Ok(address)
    } else {
        Err(InvalidDnsServer(address))
    }
}

/// Returns the host's first usable IPv4 nameserver, or [`FALLBACK_DNS_SERVER`].
pub fn host_dns_server() -> Ipv4Addr {
    RESOLV_CONF_FILES
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .find_map(|text| first_nameserver(&text))
        .unwrap_or(FALLBACK_DNS_SERVER)
}

fn usable(address: Ipv4Addr) -> bool {
    !(address.is_loopback()
        || address.is_unspecified()
        || address.is_broadcast()
        || address.is_multicast())
}

/// Parses the address of the first usable IPv4 `nameserver` line of a resolv.conf text.
fn first_nameserver(text: &str) -> Option<Ipv4Addr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next())?
        })
        .filter_map(|word| word.parse::<Ipv4Addr>().ok())
        .find(|address| usable(*address))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_loopback_and_ipv6() {
        let text = "# comment\nnameserver 127.0.0.53\nnameserver fd00::1\nnameserver 192.0.2.53\nnameserver 192.0.2.54\n";
        assert_eq!(first_nameserver(text), Some(Ipv4Addr::new(192, 0, 2, 53)));
        assert_eq!(first_nameserver("nameserver 127.0.0.53\n"), None);
        assert_eq!(first_nameserver("search example.com\n"), None);
    }

    #[test]
    fn rejects_unroutable_servers() {
        assert!(check_dns_server(Ipv4Addr::LOCALHOST).is_err());
        assert!(check_dns_server(Ipv4Addr::UNSPECIFIED).is_err());
        assert!(check_dns_server(Ipv4Addr::new(224, 0, 0, 1)).is_err());
        assert!(check_dns_server(Ipv4Addr::new(198, 18, 0, 2)).is_ok());
    }
}
