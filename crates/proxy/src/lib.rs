//! Edge proxy: routes HTTP requests (HTTP/1.1, h2c, and HTTP/1.1 upgrades such as
//! WebSocket) to a port of a sandbox.
//!
//! A request names its sandbox and port either with the `E2b-Sandbox-Id` and
//! `E2b-Sandbox-Port` headers, which the E2B SDK sends on every envd call, or with a Host
//! of the form `<port>-<sandboxID>.<domain>`. The headers win when both are present. The
//! proxy looks up the sandbox's address (the `guest_route_ip` of its network slot) in a
//! [`RouteTable`] and streams the request and response bodies without buffering them.

mod error;
mod forward;
mod port_forward;
mod resolve;
mod route;
mod server;
mod target;

pub use error::ProxyError;
pub use route::{Route, RouteTable};
pub use server::{Proxy, ProxyBody, ProxyConfig};
pub use target::{
    Target, TargetError, SANDBOX_ID_HEADER, SANDBOX_PORT_HEADER, TRAFFIC_ACCESS_TOKEN_HEADER,
};
