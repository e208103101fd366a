//! Routes to sandboxes, as the node agent records them.

use std::future::Future;
use std::net::Ipv4Addr;
use std::pin::Pin;

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

    /// Resumes `sandbox_id` when it is paused and asked to be resumed by traffic, and
    /// returns its route. The proxy calls it only after [`RouteTable::lookup`] found none.
    /// The default resumes nothing.
    fn wake<'a>(&'a self, sandbox_id: &'a str) -> Pin<Box<dyn Future<Output = Option<Route>> + Send + 'a>> {
        let _ = sandbox_id;
        Box::pin(std::future::ready(None))
    }
}
