//! The node agent: runs sandboxes on one host.
//!
//! Starting a sandbox takes a prepared network slot from the pool, restores the template's
//! snapshot into it with a copy-on-write disk, waits for envd and initialises it (env vars,
//! access token, the host's wall clock). Stopping does the reverse and removes the sandbox's
//! run directory. The node agent also keeps the route table the proxy reads.

mod agent;
pub mod builder;
pub mod envd_client;
mod routes;
pub mod template_files;

pub use agent::{NodeAgent, NodeConfig, NodeError};
