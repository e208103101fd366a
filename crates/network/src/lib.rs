//! Network slots: one network namespace per sandbox holding the VMM's tap device,
//! joined to the host by a veth pair, with NAT and the rules that isolate it.
//!
//! A server instance (one data directory) owns:
//! - namespaces named `hearth-<instance>-<index>` (see [`instance::InstanceId`]),
//! - host veth ends named `hth<instance>v<index>` (at most 15 bytes),
//! - one nftables table `ip hearth_<instance>` on the host,
//! - one IPv4 subnet that no other instance uses (see [`subnet`]).
//!
//! [`SlotPool`] prepares slots ahead of time and sweeps what an earlier run of the same
//! instance left behind.

mod command;
pub mod dns;
pub mod domain_proxy;
pub mod egress;
pub mod instance;
pub mod pool;
mod setup;
pub mod slot;
pub mod sniff;
pub mod subnet;
pub mod sweep;

pub use command::CommandError;
pub use instance::InstanceId;
pub use pool::{PoolError, PoolStats, SlotPool, SlotPoolConfig};
pub use slot::Slot;
pub use subnet::Ipv4Subnet;
pub use sweep::{SweepError, SweepReport};
