//! `GET /metrics`: the server's gauges and counters in the Prometheus text format.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use hearth_control_plane::runtime::SandboxRuntime;
use hearth_node_agent::NodeAgent;

/// Content type of the Prometheus text exposition format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders the node's metrics.
pub async fn metrics(State(node): State<Arc<NodeAgent>>) -> impl IntoResponse {
    let pool = node.slots().stats();
    let running = node.running().await.len();
    let paused = node.paused().await.len();

    let mut text = String::new();
    let mut gauge = |name: &str, help: &str, value: u64| {
        let _ = writeln!(text, "# HELP {name} {help}");
        let _ = writeln!(text, "# TYPE {name} gauge");
        let _ = writeln!(text, "{name} {value}");
    };
    gauge(
        "hearth_sandboxes_running",
        "Sandboxes running on this node.",
        running as u64,
    );
    gauge(
        "hearth_sandboxes_paused",
        "Paused sandboxes kept on this node.",
        paused as u64,
    );
    gauge(
        "hearth_slot_pool_ready",
        "Network slots prepared and waiting in the pool.",
        pool.ready as u64,
    );
    gauge(
        "hearth_slot_pool_ready_target",
        "Number of prepared network slots the pool keeps (--slot-pool-size).",
        pool.ready_target as u64,
    );
    gauge(
        "hearth_slot_pool_in_use",
        "Network slots held by sandboxes and template builds.",
        pool.in_use as u64,
    );
    gauge(
        "hearth_slot_pool_creating",
        "Network slots being prepared in the background.",
        pool.creating as u64,
    );
    gauge(
        "hearth_slot_pool_capacity",
        "Most network slots that can exist at once (from the slot subnet).",
        u64::from(pool.capacity),
    );
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text)
}
