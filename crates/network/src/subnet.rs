//! The IPv4 subnet a server instance gives its slots, and how it is chosen.
//!
//! Each slot takes a /30 of the instance subnet: `.1` for the host end of the veth pair
//! (`host_ip`) and `.2` for the namespace end (`guest_route_ip`). By default an instance
//! takes a /20 (1024 slots) out of 10.200.0.0/13, starting at a position derived from its
//! instance ID and skipping subnets that overlap a host route or address, or that another
//! running instance holds. A lock file per subnet under the lock directory marks it held
//! for as long as the pool lives.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::net::Ipv4Addr;
use std::path::Path;
use std::str::FromStr;

use nix::fcntl::{Flock, FlockArg};

use crate::command::{self, CommandError};
use crate::instance::InstanceId;

/// Range that default instance subnets are taken from.
pub const DEFAULT_RANGE: Ipv4Subnet = Ipv4Subnet {
    network: Ipv4Addr::new(10, 200, 0, 0),
    prefix_len: 13,
};

/// Prefix length of a default instance subnet.
pub const DEFAULT_PREFIX_LEN: u8 = 20;

/// An IPv4 network: an address with its host bits zero, and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4Subnet {
    network: Ipv4Addr,
    prefix_len: u8,
}

/// Error for an invalid subnet, or for a failure to choose one.
#[derive(Debug, thiserror::Error)]
pub enum SubnetError {
    #[error("invalid subnet {0:?}: expected an IPv4 network such as 10.200.0.0/20")]
    Invalid(String),

    #[error("subnet {subnet} has host bits set: use {network}/{prefix_len}")]
    HostBits {
        subnet: String,
        network: Ipv4Addr,
        prefix_len: u8,
    },

    #[error("subnet {0} is too small: slots need a prefix length of 29 or less")]
    TooSmall(Ipv4Subnet),

    #[error(
        "subnet {subnet} overlaps the host route or address {conflict}: choose another subnet"
    )]
    Conflict {
        subnet: Ipv4Subnet,
        conflict: Ipv4Subnet,
    },

    #[error("subnet {0} is held by another running Hearth instance")]
    Held(Ipv4Subnet),

    #[error(
        "no free /{DEFAULT_PREFIX_LEN} subnet left in {DEFAULT_RANGE}: set an explicit subnet"
    )]
    Exhausted,

    #[error("failed to list host routes")]
    Routes(#[source] CommandError),

    #[error("failed to open lock file {path}")]
    LockFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Ipv4Subnet {
    /// Builds a subnet, rejecting host bits and prefix lengths above 32.
    pub fn new(network: Ipv4Addr, prefix_len: u8) -> Result<Self, SubnetError> {
        let text = format!("{network}/{prefix_len}");
        if prefix_len > 32 {
            return Err(SubnetError::Invalid(text));
        }
        let masked = Ipv4Addr::from(u32::from(network) & mask(prefix_len));
        if masked != network {
            return Err(SubnetError::HostBits {
                subnet: text,
                network: masked,
                prefix_len,
            });
        }
        Ok(Self {
            network,
            prefix_len,
        })
    }

    /// Returns the network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// Returns the prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Number of /30 slots the subnet holds.
    pub fn slot_capacity(&self) -> u32 {
        if self.prefix_len > 30 {
            0
        } else {
            1 << (30 - self.prefix_len)
        }
    }

    /// Host-side address of slot `index`, or `None` past the subnet's capacity.
    pub fn host_ip(&self, index: u32) -> Option<Ipv4Addr> {
        self.slot_base(index).map(|base| Ipv4Addr::from(base + 1))
    }

    /// Namespace-side address of slot `index`, or `None` past the subnet's capacity.
    pub fn guest_route_ip(&self, index: u32) -> Option<Ipv4Addr> {
        self.slot_base(index).map(|base| Ipv4Addr::from(base + 2))
    }

    /// Returns whether the two networks share any address.
    pub fn overlaps(&self, other: &Ipv4Subnet) -> bool {
        let shorter = self.prefix_len.min(other.prefix_len);
        u32::from(self.network) & mask(shorter) == u32::from(other.network) & mask(shorter)
    }

    fn slot_base(&self, index: u32) -> Option<u32> {
        (index < self.slot_capacity()).then(|| u32::from(self.network) + index * 4)
    }
}

fn mask(prefix_len: u8) -> u32 {
    if prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix_len))
    }
}

impl fmt::Display for Ipv4Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for Ipv4Subnet {
    type Err = SubnetError;

    fn from_str(value: &str) -> Result<Self, SubnetError> {
        let (address, prefix) = value.split_once('/').unwrap_or((value, "32"));
        let network = address
            .parse()
            .map_err(|_| SubnetError::Invalid(value.to_owned()))?;
        let prefix_len = prefix
            .parse()
            .map_err(|_| SubnetError::Invalid(value.to_owned()))?;
        Self::new(network, prefix_len)
    }
}

/// A subnet held for one instance, released when dropped (the lock file's `flock` ends).
#[derive(Debug)]
pub struct SubnetLease {
    /// The subnet.
    pub subnet: Ipv4Subnet,
    _lock: Flock<File>,
}

/// Chooses and locks the subnet for `instance`: `explicit` when given (an error if it
/// overlaps a host route or is held), otherwise the first free default subnet.
///
/// Call it after sweeping the instance's leftovers, so that its own stale routes do not
/// count as conflicts.
pub fn choose_subnet(
    instance: &InstanceId,
    explicit: Option<Ipv4Subnet>,
    lock_dir: &Path,
) -> Result<SubnetLease, SubnetError> {
    let host_prefixes = host_prefixes().map_err(SubnetError::Routes)?;
    let conflict_with =
        |subnet: &Ipv4Subnet| host_prefixes.iter().find(|p| p.overlaps(subnet)).copied();

    if let Some(subnet) = explicit {
        if subnet.slot_capacity() < 2 {
            return Err(SubnetError::TooSmall(subnet));
        }
        if let Some(conflict) = conflict_with(&subnet) {
            return Err(SubnetError::Conflict { subnet, conflict });
        }
        return try_lock(subnet, lock_dir)?.ok_or(SubnetError::Held(subnet));
    }

    let candidates = 1u32 << (DEFAULT_PREFIX_LEN - DEFAULT_RANGE.prefix_len);
    let start = instance.as_number() % candidates;
    for step in 0..candidates {
        let offset = (start + step) % candidates;
        let network = u32::from(DEFAULT_RANGE.network) + (offset << (32 - DEFAULT_PREFIX_LEN));
        let subnet = Ipv4Subnet {
            network: Ipv4Addr::from(network),
            prefix_len: DEFAULT_PREFIX_LEN,
        };
        if let Some(conflict) = conflict_with(&subnet) {
            tracing::debug!(%subnet, %conflict, "skipping subnet that overlaps a host route");
            continue;
        }
        if let Some(lease) = try_lock(subnet, lock_dir)? {
            return Ok(lease);
        }
    }
    Err(SubnetError::Exhausted)
}

fn try_lock(subnet: Ipv4Subnet, lock_dir: &Path) -> Result<Option<SubnetLease>, SubnetError> {
    let path = lock_dir.join(format!(
        "subnet-{}_{}.lock",
        subnet.network, subnet.prefix_len
    ));
    let file = open_lock_file(&path)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(SubnetLease {
            subnet,
            _lock: lock,
        })),
        Err((_, _)) => Ok(None),
    }
}

/// Opens (creating it and its directory if needed) a lock file.
pub(crate) fn open_lock_file(path: &Path) -> Result<File, SubnetError> {
    let error = |source| SubnetError::LockFile {
        path: path.display().to_string(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(error)?;
    }
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(error)
}

/// Lists the IPv4 destinations of every host route (all tables, including the local
/// table's addresses), except default routes.
fn host_prefixes() -> Result<Vec<Ipv4Subnet>, CommandError> {
    let output = command::run("ip", &["-4", "-j", "route", "show", "table", "all"], None)?;
    Ok(parse_route_destinations(&output))
}

fn parse_route_destinations(json: &str) -> Vec<Ipv4Subnet> {
    let routes: Vec<serde_json::Value> = serde_json::from_str(json).unwrap_or_default();
    routes
        .iter()
        .filter_map(|route| route.get("dst")?.as_str())
        .filter(|dst| *dst != "default")
        .filter_map(|dst| {
            let subnet: Ipv4Subnet = dst.parse().ok()?;
            (subnet.prefix_len > 0).then_some(subnet)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() {
        let subnet: Ipv4Subnet = "10.200.16.0/20".parse().unwrap();
        assert_eq!(subnet.to_string(), "10.200.16.0/20");
        assert_eq!(subnet.slot_capacity(), 1024);
    }

    #[test]
    fn parse_rejects_host_bits() {
        let error = "10.200.16.1/20".parse::<Ipv4Subnet>().unwrap_err();
        assert!(error.to_string().contains("10.200.16.0/20"), "{error}");
    }

    #[test]
    fn slot_addresses() {
        let subnet: Ipv4Subnet = "10.200.16.0/20".parse().unwrap();
        assert_eq!(subnet.host_ip(0), Some(Ipv4Addr::new(10, 200, 16, 1)));
        assert_eq!(
            subnet.guest_route_ip(0),
            Some(Ipv4Addr::new(10, 200, 16, 2))
        );
        assert_eq!(subnet.host_ip(64), Some(Ipv4Addr::new(10, 200, 17, 1)));
        assert_eq!(
            subnet.guest_route_ip(1023),
            Some(Ipv4Addr::new(10, 200, 31, 254))
        );
        assert_eq!(subnet.host_ip(1024), None);
    }

    #[test]
    fn overlap() {
        let a: Ipv4Subnet = "10.200.16.0/20".parse().unwrap();
        let inside: Ipv4Subnet = "10.200.17.5".parse().unwrap();
        let wide: Ipv4Subnet = "10.0.0.0/8".parse().unwrap();
        let apart: Ipv4Subnet = "10.200.32.0/20".parse().unwrap();
        assert!(a.overlaps(&inside));
        assert!(a.overlaps(&wide));
        assert!(!a.overlaps(&apart));
    }

    #[test]
    fn route_destinations_skip_default() {
        let json = r#"[{"dst":"default","gateway":"192.0.2.1"},{"dst":"192.0.2.0/24"},{"dst":"127.0.0.1","type":"local"}]"#;
        let parsed = parse_route_destinations(json);
        assert_eq!(
            parsed,
            vec![
                "192.0.2.0/24".parse().unwrap(),
                "127.0.0.1/32".parse().unwrap()
            ]
        );
    }

    #[test]
    fn lock_excludes_second_holder() {
        let dir = tempfile::tempdir().unwrap();
        let subnet: Ipv4Subnet = "10.201.0.0/24".parse().unwrap();
        let first = try_lock(subnet, dir.path()).unwrap();
        assert!(first.is_some());
        assert!(try_lock(subnet, dir.path()).unwrap().is_none());
        drop(first);
        assert!(try_lock(subnet, dir.path()).unwrap().is_some());
    }
}
