//! Name resolution for backend connections: a sandbox ID resolves to its slot address.
//!
//! The proxy's client pools connections by URI authority. Backend URIs name the sandbox
//! and its slot address (`http://<sandboxID>.<a-b-c-d>:<port>/...`). So a slot address
//! that passes to a new sandbox after a kill never gets a pooled connection of the old
//! one, and a sandbox resumed into another slot never gets a connection to its old slot.

use std::future::{ready, Ready};
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::Name;

use crate::route::RouteTable;

/// Returns the backend host name of a sandbox at `address`: `<sandboxID>.<a-b-c-d>`, the
/// key under which the client pools connections to it.
pub(crate) fn backend_host(sandbox_id: &str, address: std::net::Ipv4Addr) -> String {
    format!("{sandbox_id}.{}", address.to_string().replace('.', "-"))
}

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
        let sandbox_id = name.as_str().split_once('.').map_or(name.as_str(), |(id, _)| id);
        let result = match self.routes.lookup(sandbox_id) {
            Some(route) if backend_host(sandbox_id, route.address) == name.as_str() => {
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
