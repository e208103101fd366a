//! Name resolution for backend connections: a sandbox ID resolves to its slot address.
//!
//! The proxy's client pools connections by URI authority. Backend URIs name the sandbox
//! and its slot address (`http://<sandboxID>.<a-b-c-d>:<port>/...`), so a slot address
//! that passes to a new sandbox after a kill never gets a pooled connection of the old
//! one, and a sandbox resumed into another slot never gets a connection to its old slot.

use std::future::{ready, Ready};
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::Name;

use crate::route::RouteTable;

/// Resolves sandbox IDs through the node agent's route table.
#[derive(Clone)]
pub(crate) struct SandboxResolver {
    routes: Arc<dyn RouteTable>,
}

impl SandboxResolver {
    pub fn new(routes: Arc<dyn RouteTable>) -> Self {
        Self { routes }
    }
}

impl tower_service::Service<Name> for SandboxResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        // The connector replaces port 0 with the port of the request URI.
        let (sandbox_id, address) = name.as_str().split_once('.').unwrap_or((name.as_str(), ""));
        let result = match self.routes.lookup(sandbox_id) {
            Some(route) if route.address.to_string().replace('.', "-") == address => {
                Ok(vec![SocketAddr::from((route.address, 0))].into_iter())
            }
            Some(_) => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("sandbox {sandbox_id} moved to another address"),
            )),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("sandbox {sandbox_id} is not running on this node"),
            )),
        };
        ready(result)
    }
}
