//! Network slots: one network namespace per sandbox holding the VMM's tap device,
//! joined to the host by a veth pair, with NAT and the rules that isolate it.

pub mod slot;

pub use slot::Slot;
