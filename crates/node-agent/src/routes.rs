//! Routes from sandbox IDs to their slot addresses, read by the proxy on every request.

use std::collections::HashMap;
use std::sync::RwLock;

use hearth_proxy::{Route, RouteTable};

/// Route table of the sandboxes running on this node.
#[derive(Default)]
pub(crate) struct Routes {
    by_sandbox: RwLock<HashMap<String, Route>>,
}

impl Routes {
    pub fn insert(&self, sandbox_id: &str, route: Route) {
        self.by_sandbox.write().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(sandbox_id.to_owned(), route);
    }

    pub fn remove(&self, sandbox_id: &str) {
        self.by_sandbox.write().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(sandbox_id);
    }
}

impl RouteTable for Routes {
    fn lookup(&self, sandbox_id: &str) -> Option<Route> {
        self.by_sandbox.read().unwrap_or_else(|poisoned| poisoned.into_inner()).get(sandbox_id).cloned()
    }
}
