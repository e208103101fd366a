//! Server instance identity and the host-visible names derived from it.
//!
//! Every name that lives in a host-wide namespace (network namespaces, host interfaces,
//! the nftables table) carries the instance ID, so two servers on one host never touch
//! each other's objects, and the start-up sweep removes only its own leftovers.

use std::fmt;
use std::path::Path;

use sha2::{Digest, Sha256};

/// Length of an instance ID in hexadecimal characters.
const INSTANCE_ID_LEN: usize = 6;

/// Maximum length of a Linux interface name (`IFNAMSIZ` minus the terminating NUL).
pub const MAX_IFNAME_LEN: usize = 15;

/// Largest slot index whose host interface name fits in [`MAX_IFNAME_LEN`] bytes.
pub const MAX_SLOT_INDEX: u32 = 99_999;

/// Error for a string that is not a valid instance ID.
#[derive(Debug, thiserror::Error)]
#[error("invalid instance ID {0:?}: expected {INSTANCE_ID_LEN} lowercase hexadecimal characters")]
pub struct InvalidInstanceId(String);

/// Short, stable identifier of a server instance: six hexadecimal characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct InstanceId(String);

impl InstanceId {
    /// Derives the ID from the server's data directory: the first six hex digits of the
    /// SHA-256 of its canonical path, so the same directory always gives the same ID.
    pub fn from_data_dir(data_dir: &Path) -> std::io::Result<Self> {
        let canonical = data_dir.canonicalize()?;
        let digest = Sha256::digest(canonical.as_os_str().as_encoded_bytes());
        let mut id = hex::encode(&digest[..INSTANCE_ID_LEN / 2]);
        id.truncate(INSTANCE_ID_LEN);
        Ok(Self(id))
    }

    /// Parses an explicit instance ID.
    pub fn parse(value: &str) -> Result<Self, InvalidInstanceId> {
        let valid = value.len() == INSTANCE_ID_LEN
            && value
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if valid {
            Ok(Self(value.to_owned()))
        } else {
            Err(InvalidInstanceId(value.to_owned()))
        }
    }

    /// Returns the ID as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Returns the ID as a number, used to spread instances over the default address range.
    pub(crate) fn as_number(&self) -> u32 {
        u32::from_str_radix(&self.0, 16).unwrap_or(0)
    }

    /// Prefix of this instance's network namespace names.
    pub fn netns_prefix(&self) -> String {
        format!("hearth-{}-", self.0)
    }

    /// Name of the network namespace of slot `index`.
    pub fn netns_name(&self, index: u32) -> String {
        format!("{}{index}", self.netns_prefix())
    }

    /// Prefix of this instance's host interface names.
    pub fn host_veth_prefix(&self) -> String {
        format!("hth{}v", self.0)
    }

    /// Name of the host end of slot `index`'s veth pair; at most 15 bytes for any index
    /// up to [`MAX_SLOT_INDEX`].
    pub fn host_veth_name(&self, index: u32) -> String {
        format!("{}{index}", self.host_veth_prefix())
    }

    /// Name of this instance's nftables table (family `ip`) on the host.
    pub fn nft_table(&self) -> String {
        format!("hearth_{}", self.0)
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dir_id_is_stable() {
        let dir = tempfile::tempdir().unwrap();
        let first = InstanceId::from_data_dir(dir.path()).unwrap();
        let second = InstanceId::from_data_dir(&dir.path().join(".")).unwrap();
        assert_eq!(first, second);
        assert_eq!(first.as_str().len(), INSTANCE_ID_LEN);
    }

    #[test]
    fn data_dirs_differ() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        assert_ne!(
            InstanceId::from_data_dir(a.path()).unwrap(),
            InstanceId::from_data_dir(b.path()).unwrap()
        );
    }

    #[test]
    fn host_veth_name_fits_ifnamsiz() {
        let id = InstanceId::parse("abc123").unwrap();
        assert_eq!(id.host_veth_name(MAX_SLOT_INDEX).len(), MAX_IFNAME_LEN);
        assert_eq!(id.host_veth_name(0), "hthabc123v0");
    }

    #[test]
    fn parse_rejects_bad_ids() {
        assert!(InstanceId::parse("ABC123").is_err());
        assert!(InstanceId::parse("abc12").is_err());
        assert!(InstanceId::parse("abc12g").is_err());
    }
}
