//! Routes to sandboxes, as the node agent records them.

use std::net::Ipv4Addr;

/// How to reach one sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Address on which the host reaches every TCP port of the sandbox (its network slot's
    /// `guest_route_ip`).
    pub address: Ipv4Addr,
    /// Token that requests to the sandbox's ports must carry in the
    /// `e2b-traffic-access-token` header; `None` when its ports are public.
    pub traffic_access_token: Option<String>,
}

/// Lookup of running sandboxes, implemented by the node agent. Called once per request, so
/// it must not block.
pub trait RouteTable: Send + Sync {
    /// Returns the route of the running sandbox `sandbox_id`, or `None` when no such
    /// sandbox runs here.
    fn lookup(&self, sandbox_id: &str) -> Option<Route>;
}
