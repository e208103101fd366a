//! `hearth serve`: control plane, node agent and proxy in one process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hearth_control_plane::ControlPlaneConfig;
use hearth_network::{InstanceId, SlotPool, SlotPoolConfig};
use hearth_node_agent::{NodeAgent, NodeConfig};
use hearth_proxy::{Proxy, ProxyConfig};
use hearth_storage::DataDir;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::template::{ensure_base_template, EnvdArgs};
use hearth_node_agent::builder::{BuildSettings, NodeTemplateBuilder};
use super::DataDirArgs;

/// How often the node agent looks for sandboxes whose VMM exited on its own.
const VMM_WATCHDOG_INTERVAL: Duration = Duration::from_secs(2);

/// Arguments of `hearth serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    data: DataDirArgs,

    #[command(flatten)]
    envd: EnvdArgs,
    /// Registries that template builds reach over plain HTTP (`host:port`), besides
    /// loopback ones, which always use HTTP. Comma-separated in the environment.
    #[arg(long = "plain-http-registry", env = "HEARTH_PLAIN_HTTP_REGISTRIES", value_delimiter = ',')]
    plain_http_registries: Vec<String>,

    #[command(flatten)]
    vmm: super::vmm::VmmArgs,

    /// Address of the REST API (E2B_API_URL).
    #[arg(long, env = "HEARTH_API_LISTEN", default_value = "127.0.0.1:3000")]
    api_listen: SocketAddr,

    /// Address of the proxy to envd and sandbox ports (E2B_SANDBOX_URL).
    #[arg(long, env = "HEARTH_PROXY_LISTEN", default_value = "127.0.0.1:3001")]
    proxy_listen: SocketAddr,

    /// Domain returned to the SDK, which then reaches sandboxes at
    /// `https://<port>-<sandboxID>.<domain>` unless E2B_SANDBOX_URL is set. Leave unset
    /// when clients use E2B_SANDBOX_URL.
    #[arg(long, env = "HEARTH_DOMAIN")]
    domain: Option<String>,

    /// API key accepted besides the keys stored in the database: "e2b_" and 40 hex digits.
    #[arg(long, env = "HEARTH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,

    /// Number of network slots kept prepared so that a create does not wait for one.
    #[arg(long, env = "HEARTH_SLOT_POOL_SIZE", default_value_t = hearth_network::pool::DEFAULT_READY_TARGET)]
    slot_pool_size: usize,

    /// IPv4 subnet for the slots' host-side addresses, a /30 per slot; by default a free
    /// /20 of 10.200.0.0/13 that overlaps no host route.
    #[arg(long, env = "HEARTH_SLOT_SUBNET")]
    slot_subnet: Option<hearth_network::Ipv4Subnet>,

    /// Resolver that answers every DNS query of every sandbox, whatever server the guest
    /// names; by default the host's first IPv4 nameserver, else 8.8.8.8.
    #[arg(long, env = "HEARTH_DNS_SERVER")]
    dns_server: Option<std::net::Ipv4Addr>,

    /// Seconds between sweeps that remove network slots, namespaces and VMM processes that
    /// belong to no sandbox of this server. 0 turns the periodic sweep off, but start-up
    /// always sweeps.
    #[arg(long, env = "HEARTH_SWEEP_INTERVAL_SECS", default_value_t = 30)]
    sweep_interval_secs: u64,

    /// Seconds a restored sandbox's envd gets to accept its first request before the create fails.
    #[arg(long, default_value_t = 30)]
    envd_ready_timeout_secs: u64,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::Uid::effective().is_root(),
        "hearth serve must run as root: it creates network namespaces, taps and nftables rules"
    );

    std::fs::create_dir_all(&args.data.data_dir)
        .with_context(|| format!("failed to create data dir {}", args.data.data_dir.display()))?;
    let data_root = std::fs::canonicalize(&args.data.data_dir)
        .with_context(|| format!("failed to resolve data dir {}", args.data.data_dir.display()))?;
    let data_dir = DataDir::new(&data_root);

    // Bind first, so an address in use fails the start before any slow work.
    let api_listener = TcpListener::bind(args.api_listen)
        .await
        .with_context(|| format!("failed to listen on {} for the API", args.api_listen))?;
    let proxy_listener = TcpListener::bind(args.proxy_listen)
        .await
        .with_context(|| format!("failed to listen on {} for the proxy", args.proxy_listen))?;

    let driver = args.vmm.driver()?;
    let instance = InstanceId::from_data_dir(&data_root).context("failed to derive the instance ID")?;
    let mut pool_config = SlotPoolConfig::new(instance.clone());
    pool_config.ready_target = args.slot_pool_size;
    pool_config.subnet = args.slot_subnet;
    pool_config.dns_server = match args.dns_server {
        Some(address) => hearth_network::dns::check_dns_server(address)?,
        None => hearth_network::dns::host_dns_server(),
    };
    pool_config.sweep_interval = Duration::from_secs(args.sweep_interval_secs);
    let pool_config_dns = pool_config.dns_server;
    let slots = SlotPool::start(pool_config).await.context("failed to start the network slot pool")?;
    tracing::info!(
        vmm = %driver.kind(),
        api = %args.api_listen,
        proxy = %args.proxy_listen,
        data_dir = %data_root.display(),
        instance = %instance.as_str(),
        slot_subnet = %slots.subnet(),
        slot_pool_size = args.slot_pool_size,
        dns_server = %pool_config_dns,
        "hearth serve starting"
    );

    let mut cp_config = ControlPlaneConfig::new(&data_root);
    cp_config.domain = args.domain.clone();
    cp_config.api_keys_from_env = args.api_key.iter().cloned().collect();

    let node = Arc::new(NodeAgent::new(
        NodeConfig { data_dir: data_dir.clone(), envd_ready_timeout: Duration::from_secs(args.envd_ready_timeout_secs) },
        driver.clone(),
        slots,
    ));
    node.recover();

    let served = serve_until_signal(&args, &data_dir, cp_config, node.clone(), driver, api_listener, proxy_listener).await;

    // The slots must go whatever happened above, or the namespaces outlive the server.
    let shutdown = node.shutdown().await;
    served?;
    shutdown.context("failed to remove the network slots")?;
    tracing::info!("hearth serve stopped");
    Ok(())
}

/// The proxy's routes: the node agent's, and a resume through the control plane for a
/// paused sandbox that asked to be resumed by traffic.
struct WakingRoutes {
    node: Arc<NodeAgent>,
    control_plane: hearth_control_plane::ControlPlane,
}

impl hearth_proxy::RouteTable for WakingRoutes {
    fn lookup(&self, sandbox_id: &str) -> Option<hearth_proxy::Route> {
        self.node.lookup(sandbox_id)
    }

    fn wake<'a>(
        &'a self,
        sandbox_id: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<hearth_proxy::Route>> + Send + 'a>> {
        Box::pin(async move {
            let id = hearth_types::SandboxId::parse(sandbox_id).ok()?;
            if self.control_plane.wake_sandbox(&id).await {
                self.node.lookup(sandbox_id)
            } else {
                None
            }
        })
    }
}

async fn serve_until_signal(
    args: &ServeArgs,
    data_dir: &DataDir,
    cp_config: ControlPlaneConfig,
    node: Arc<NodeAgent>,
    driver: Arc<dyn hearth_vmm::VmmDriver>,
    api_listener: TcpListener,
    proxy_listener: TcpListener,
) -> anyhow::Result<()> {
    // Build VMs add a disk layer per step to a running guest, which only the QEMU driver
    // does; on Firecracker hosts the build routes return 501 (see docs/templates.md).
    let template_builder: Option<Arc<dyn hearth_control_plane::builds::TemplateBuilder>> =
        if driver.kind() == hearth_vmm::VmmKind::Qemu {
            let mut settings = BuildSettings::new(args.envd.resolve()?);
            settings.plain_http_registries = args.plain_http_registries.clone();
            Some(Arc::new(NodeTemplateBuilder::new(node.clone(), settings)))
        } else {
            tracing::warn!(vmm = %driver.kind(), "template builds need the QEMU driver; the build API is off");
            None
        };
    let (router, control_plane) =
        hearth_control_plane::build_with_template_builder(cp_config, node.clone(), template_builder)
        .await
        .context("failed to start the control plane")?;

    ensure_base_template(data_dir, control_plane.store(), node.slots(), driver.as_ref(), &args.envd)
        .await
        .context("failed to prepare the base template")?;

    let router = router.route(
        "/metrics",
        axum::routing::get(super::metrics::metrics).with_state(node.clone()),
    );
    let reaper = control_plane.spawn_reaper();
    let watchdog = node.spawn_watchdog(VMM_WATCHDOG_INTERVAL);
    let (stop_tx, stop_rx) = watch::channel(false);

    let routes = Arc::new(WakingRoutes { node: node.clone(), control_plane: control_plane.clone() });
    let proxy = Arc::new(Proxy::new(routes, ProxyConfig::default()));
    let proxy_task = tokio::spawn(proxy.serve(proxy_listener, wait_for(stop_rx.clone())));
    let api_task = tokio::spawn(async move {
        axum::serve(api_listener, router).with_graceful_shutdown(wait_for(stop_rx)).await
    });
    tracing::info!(api = %args.api_listen, proxy = %args.proxy_listen, "hearth serve ready");

    shutdown_signal().await;
    tracing::info!("shutting down: stopping sandboxes and removing network slots");
    if let Err(err) = control_plane.shutdown().await {
        tracing::error!(error = %err, "control plane shutdown failed");
    }
    reaper.abort();
    watchdog.abort();
    let _ = stop_tx.send(true);
    if let Ok(Err(err)) = api_task.await {
        tracing::error!(error = %err, "API server failed");
    }
    if let Ok(Err(err)) = proxy_task.await {
        tracing::error!(error = %err, "proxy failed");
    }
    Ok(())
}

async fn wait_for(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};

    let mut terminate = signal(SignalKind::terminate()).expect("installing a SIGTERM handler does not fail");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
