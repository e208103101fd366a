//! Per-sandbox egress: whether the guest may open connections out of its slot.
//!
//! The rule lives in the slot's own namespace, in a table of its own, so changing it never
//! touches the host's rules or another slot. Replies to connections that reach the guest
//! through the slot (the proxy, the node agent) stay allowed either way.

use hearth_types::guest::TAP_NAME;

use crate::command::{self, CommandError};
use crate::slot::Slot;

/// Name of the egress table inside each slot's namespace.
const EGRESS_TABLE: &str = "hearth_egress";

/// Sets whether the guest in `slot` may open new outbound connections. Blocking: call it
/// from a thread that may block.
pub fn set_internet_access(slot: &Slot, allowed: bool) -> Result<(), CommandError> {
    let verdict = if allowed { "accept" } else { "drop" };
    let rules = format!(
        "table ip {EGRESS_TABLE}\n\
         delete table ip {EGRESS_TABLE}\n\
         table ip {EGRESS_TABLE} {{\n\
           chain forward {{\n\
             type filter hook forward priority filter; policy accept;\n\
             iifname \"{TAP_NAME}\" ct state new {verdict}\n\
           }}\n\
         }}\n"
    );
    command::in_netns(&slot.netns, move || command::run("nft", &["-f", "-"], Some(&rules)).map(|_| ()))
}
