//! A pool of prepared network slots.
//!
//! [`SlotPool::start`] sweeps the instance's leftovers, chooses its subnet, installs the
//! host rules and starts a background task that keeps `ready_target` slots prepared, so
//! that [`SlotPool::acquire`] normally only pops a queue. A released slot is deleted (its
//! namespace, veth pair, tap and conntrack state go with it) and the background task
//! prepares a fresh one, so no state of one sandbox reaches the next.
//!
//! A second background task calls [`SlotPool::sweep_orphans`] every `sweep_interval`: it
//! removes namespaces and host veths of this instance that the pool has no record of, and
//! kills processes in them and in ready slots. Every index the pool is working on (ready,
//! in use, being created, being released or being swept) is recorded in its state, so a
//! sweep never touches a slot that `acquire`, `release` or the fill task is handling.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use tokio::sync::Notify;
use tokio::time::MissedTickBehavior;

use crate::command::CommandError;
use crate::instance::{InstanceId, MAX_SLOT_INDEX};
use crate::setup::{self, SlotPlan};
use crate::slot::Slot;
use crate::subnet::{self, Ipv4Subnet, SubnetError, SubnetLease};
use crate::sweep::{self, NetnsProcess, SweepError, SweepReport};

/// Default number of slots kept prepared.
pub const DEFAULT_READY_TARGET: usize = 8;

/// Default directory of the lock files that mark instances and subnets as in use.
pub const DEFAULT_LOCK_DIR: &str = "/run/hearth/network";

/// Default time between two sweeps for orphaned slots.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// Pause after a failed background slot creation before the next attempt.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Settings of a [`SlotPool`].
#[derive(Clone, Debug)]
pub struct SlotPoolConfig {
    /// Instance whose names and subnet the pool uses.
    pub instance: InstanceId,
    /// Number of slots to keep prepared.
    pub ready_target: usize,
    /// Subnet for the slots' veth addresses; `None` chooses a free /20 of 10.200.0.0/13.
    pub subnet: Option<Ipv4Subnet>,
    /// Directory of the lock files that mark instances and subnets as in use.
    pub lock_dir: PathBuf,
    /// Time between two runs of [`SlotPool::sweep_orphans`] in the background;
    /// `Duration::ZERO` turns the background sweep off.
    pub sweep_interval: Duration,
    /// Resolver that every slot sends its guest's DNS queries to.
    pub dns_server: Ipv4Addr,
}

impl SlotPoolConfig {
    /// Settings with the defaults: 8 ready slots, a chosen subnet, `/run/hearth/network`,
    /// a sweep every 30 seconds, the host's resolver.
    pub fn new(instance: InstanceId) -> Self {
        Self {
            instance,
            ready_target: DEFAULT_READY_TARGET,
            subnet: None,
            lock_dir: PathBuf::from(DEFAULT_LOCK_DIR),
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
            dns_server: crate::dns::host_dns_server(),
        }
    }
}

/// Error from the slot pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("instance {0} is already running a slot pool: is another server using the same data directory?")]
    InstanceHeld(InstanceId),

    #[error("failed to reserve a subnet for the slots")]
    Subnet(#[from] SubnetError),

    #[error("network setup failed")]
    Command(#[from] CommandError),

    #[error("network cleanup failed")]
    Cleanup(#[from] SweepError),

    #[error("no free slot: all {capacity} slots of subnet {subnet} are in use")]
    Exhausted { capacity: u32, subnet: Ipv4Subnet },

    #[error("slot {index} (namespace {netns}) is not in use in this pool")]
    UnknownSlot { index: u32, netns: String },

    #[error("the slot pool is shut down")]
    Closed,

    #[error("a blocking network task failed to complete")]
    TaskFailed(#[from] tokio::task::JoinError),
}

/// Counts of a pool's slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolStats {
    /// Prepared slots waiting in the pool.
    pub ready: usize,
    /// Slots handed out and not yet released.
    pub in_use: usize,
    /// Slots being prepared in the background.
    pub creating: usize,
    /// Number of prepared slots the pool aims to keep.
    pub ready_target: usize,
    /// Maximum number of slots that can exist at once.
    pub capacity: u32,
}

/// Pool of prepared network slots for one server instance. Cheap to clone.
///
/// Dropping every handle stops the background task but leaves the slots in place; the
/// next [`SlotPool::start`] of the same instance sweeps them. Call [`SlotPool::shutdown`]
/// to delete them.
#[derive(Clone)]
pub struct SlotPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    instance: InstanceId,
    subnet: Ipv4Subnet,
    dns_server: Ipv4Addr,
    capacity: u32,
    ready_target: usize,
    state: Mutex<PoolState>,
    wake: Arc<Notify>,
    _instance_lock: Flock<File>,
    _subnet_lease: SubnetLease,
}

#[derive(Default)]
struct PoolState {
    ready: VecDeque<Slot>,
    in_use: HashSet<u32>,
    /// Indices of slots being created in the background.
    creating: HashSet<u32>,
    /// Indices of released slots being deleted.
    releasing: HashSet<u32>,
    /// Indices whose leftovers a sweep is removing; never allocated meanwhile.
    sweeping: HashSet<u32>,
    /// Indices below `next_index` that may be allocated again.
    free_indices: BTreeSet<u32>,
    next_index: u32,
    closed: bool,
}

impl PoolState {
    /// Returns whether the pool is working on slot `index`, so a sweep must leave it.
    fn is_busy(&self, index: u32) -> bool {
        self.in_use.contains(&index)
            || self.creating.contains(&index)
            || self.releasing.contains(&index)
            || self.sweeping.contains(&index)
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        // Wakes the background task so it notices that the pool is gone and exits.
        self.wake.notify_one();
    }
}

impl SlotPool {
    /// Starts the pool: locks the instance, sweeps its leftovers, reserves its subnet,
    /// installs the host rules and starts preparing slots in the background.
    pub async fn start(config: SlotPoolConfig) -> Result<SlotPool, PoolError> {
        let instance = config.instance.clone();
        let ready_target = config.ready_target;
        let sweep_interval = config.sweep_interval;
        let dns_server = config.dns_server;
        let (instance_lock, lease, report) =
            tokio::task::spawn_blocking(move || prepare_host(&config)).await??;
        if !report.is_empty() {
            tracing::info!(
                instance = %instance,
                processes = report.processes,
                namespaces = report.namespaces,
                interfaces = report.interfaces,
                nft_table = report.nft_table,
                "removed network slots left by an earlier run"
            );
        }

        let subnet = lease.subnet;
        let capacity = subnet.slot_capacity().min(MAX_SLOT_INDEX + 1);
        let inner = Arc::new(PoolInner {
            instance,
            subnet,
            dns_server,
            capacity,
            ready_target,
            state: Mutex::new(PoolState::default()),
            wake: Arc::new(Notify::new()),
            _instance_lock: instance_lock,
            _subnet_lease: lease,
        });
        tracing::info!(instance = %inner.instance, %subnet, ready_target = inner.ready_target, "slot pool started");

        tokio::spawn(fill(Arc::downgrade(&inner), inner.wake.clone()));
        inner.wake.notify_one();
        if !sweep_interval.is_zero() {
            tokio::spawn(sweep_periodically(Arc::downgrade(&inner), sweep_interval));
        }
        Ok(SlotPool { inner })
    }

    /// Takes a slot: a prepared one when available (microseconds), else one created now.
    pub async fn acquire(&self) -> Result<Slot, PoolError> {
        let plan = {
            let mut state = self.inner.lock_state();
            if state.closed {
                return Err(PoolError::Closed);
            }
            if let Some(slot) = state.ready.pop_front() {
                state.in_use.insert(slot.index);
                drop(state);
                self.inner.wake.notify_one();
                tracing::debug!(netns = %slot.netns, "slot acquired from the pool");
                return Ok(slot);
            }
            let index = self.inner.allocate_index(&mut state)?;
            state.in_use.insert(index);
            self.inner.plan(index)
        };

        tracing::info!(netns = %plan.netns, "no prepared slot left; creating one now");
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            setup::create_slot(&plan).map_err(|e| (plan.index, e))
        })
        .await?;
        match result {
            Ok(slot) => {
                tracing::debug!(netns = %slot.netns, elapsed_ms = started.elapsed().as_millis() as u64, "slot created");
                self.inner.wake.notify_one();
                Ok(slot)
            }
            Err((index, error)) => {
                let mut state = self.inner.lock_state();
                state.in_use.remove(&index);
                state.free_indices.insert(index);
                Err(error.into())
            }
        }
    }

    /// Returns a slot taken with [`SlotPool::acquire`]: deletes it and the host's
    /// conntrack entries of its address, so that nothing of its sandbox remains, and lets
    /// the pool prepare a fresh one. Stop the VMM first.
    pub async fn release(&self, slot: Slot) -> Result<(), PoolError> {
        let expected_netns = self.inner.instance.netns_name(slot.index);
        {
            let mut state = self.inner.lock_state();
            if slot.netns != expected_netns || !state.in_use.remove(&slot.index) {
                return Err(PoolError::UnknownSlot {
                    index: slot.index,
                    netns: slot.netns,
                });
            }
            state.releasing.insert(slot.index);
        }

        let plan = self.inner.plan(slot.index);
        let result = tokio::task::spawn_blocking(move || delete_slot(&plan)).await;

        let mut state = self.inner.lock_state();
        state.releasing.remove(&slot.index);
        match result {
            Ok(Ok(())) => {
                state.free_indices.insert(slot.index);
                drop(state);
                self.inner.wake.notify_one();
                tracing::debug!(netns = %slot.netns, "slot released");
                Ok(())
            }
            Ok(Err(error)) => {
                // The index stays out of `free_indices`, so a half-deleted slot is never
                // reused; the next sweep removes what is left and frees the index.
                tracing::error!(netns = %slot.netns, %error, "failed to delete a released slot");
                Err(error.into())
            }
            Err(error) => {
                tracing::error!(netns = %slot.netns, %error, "slot deletion task failed");
                Err(error.into())
            }
        }
    }

    /// Removes this instance's namespaces and host veths whose index the pool is not
    /// working on, killing the processes inside them first, and clears the conntrack
    /// entries of their addresses. A ready slot that contains a process is deleted the
    /// same way, because a ready slot should never contain one, so its state cannot be
    /// trusted. The fill task prepares a replacement. Slots in use are left alone.
    pub async fn sweep_orphans(&self) -> Result<SweepReport, PoolError> {
        self.inner.sweep_orphans().await
    }

    /// Current counts of the pool's slots.
    pub fn stats(&self) -> PoolStats {
        let state = self.inner.lock_state();
        PoolStats {
            ready: state.ready.len(),
            in_use: state.in_use.len(),
            creating: state.creating.len(),
            ready_target: self.inner.ready_target,
            capacity: self.inner.capacity,
        }
    }

    /// Returns the instance this pool belongs to.
    pub fn instance(&self) -> &InstanceId {
        &self.inner.instance
    }

    /// Returns the subnet the pool's slot addresses come from.
    pub fn subnet(&self) -> Ipv4Subnet {
        self.inner.subnet
    }

    /// Stops preparing slots and deletes every slot of the instance, in use or not, and its
    /// host rules. Stop the VMMs first. Later calls to `acquire` fail with
    /// [`PoolError::Closed`].
    pub async fn shutdown(&self) -> Result<SweepReport, PoolError> {
        self.inner.lock_state().closed = true;
        self.inner.wake.notify_one();

        // A slot being created in the background would otherwise appear after the sweep,
        // and a running orphan sweep would race with this one.
        while self.inner.is_creating_or_sweeping() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        let instance = self.inner.instance.clone();
        let report =
            tokio::task::spawn_blocking(move || sweep::sweep_instance(&instance)).await??;
        let mut state = self.inner.lock_state();
        state.ready.clear();
        state.in_use.clear();
        tracing::info!(instance = %self.inner.instance, processes = report.processes, namespaces = report.namespaces, "slot pool shut down");
        Ok(report)
    }
}

impl PoolInner {
    fn lock_state(&self) -> MutexGuard<'_, PoolState> {
        // A panic while holding the lock leaves counts that are still consistent enough
        // to go on with; recover rather than poison every later call.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn is_creating_or_sweeping(&self) -> bool {
        let state = self.lock_state();
        !state.creating.is_empty() || !state.sweeping.is_empty()
    }

    fn allocate_index(&self, state: &mut PoolState) -> Result<u32, PoolError> {
        if let Some(index) = state.free_indices.pop_first() {
            return Ok(index);
        }
        // An index being swept is skipped here; the sweep adds it to `free_indices` when
        // it is done, since it is then below `next_index`.
        while state.next_index < self.capacity {
            let index = state.next_index;
            state.next_index += 1;
            if !state.sweeping.contains(&index) {
                return Ok(index);
            }
        }
        Err(PoolError::Exhausted {
            capacity: self.capacity,
            subnet: self.subnet,
        })
    }

    fn plan(&self, index: u32) -> SlotPlan {
        SlotPlan::new(&self.instance, &self.subnet, index, self.dns_server)
            .expect("allocated index is within the subnet's capacity")
    }

    /// Reserves an index for a background creation when the pool is below its target.
    fn next_background_plan(&self) -> Option<SlotPlan> {
        let mut state = self.lock_state();
        if state.closed || state.ready.len() + state.creating.len() >= self.ready_target {
            return None;
        }
        let index = self.allocate_index(&mut state).ok()?;
        state.creating.insert(index);
        Some(self.plan(index))
    }
}

/// Background task: keeps the pool at its ready target until the pool is dropped or closed.
async fn fill(pool: Weak<PoolInner>, wake: Arc<Notify>) {
    loop {
        let Some(inner) = pool.upgrade() else {
            return;
        };
        if let Some(plan) = inner.next_background_plan() {
            create_in_background(&inner, plan).await;
            continue;
        }
        if inner.lock_state().closed {
            return;
        }
        drop(inner);
        wake.notified().await;
    }
}

async fn create_in_background(inner: &PoolInner, plan: SlotPlan) {
    let index = plan.index;
    let netns = plan.netns.clone();
    let started = Instant::now();
    let result = tokio::task::spawn_blocking(move || setup::create_slot(&plan)).await;

    let failed = {
        let mut state = inner.lock_state();
        state.creating.remove(&index);
        match result {
            Ok(Ok(slot)) => {
                tracing::debug!(netns = %slot.netns, elapsed_ms = started.elapsed().as_millis() as u64, "slot prepared");
                state.ready.push_back(slot);
                false
            }
            Ok(Err(error)) => {
                state.free_indices.insert(index);
                tracing::error!(%netns, %error, "failed to prepare a slot; retrying in {RETRY_DELAY:?}");
                true
            }
            Err(error) => {
                state.free_indices.insert(index);
                tracing::error!(%netns, %error, "slot preparation task failed; retrying in {RETRY_DELAY:?}");
                true
            }
        }
    };
    if failed {
        tokio::time::sleep(RETRY_DELAY).await;
    }
}

/// Background task: sweeps for orphaned slots every `interval` until the pool is dropped
/// or closed.
async fn sweep_periodically(pool: Weak<PoolInner>, interval: Duration) {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(inner) = pool.upgrade() else {
            return;
        };
        if inner.lock_state().closed {
            return;
        }
        match inner.sweep_orphans().await {
            Ok(report) if !report.is_empty() => {
                tracing::info!(
                    instance = %inner.instance,
                    processes = report.processes,
                    namespaces = report.namespaces,
                    interfaces = report.interfaces,
                    "removed orphaned network slots"
                );
            }
            Ok(_) => {}
            Err(error) => {
                tracing::error!(instance = %inner.instance, %error, "sweep for orphaned network slots failed; retrying in {interval:?}");
            }
        }
    }
}

/// Host objects of one slot that a sweep removes.
struct OrphanSlot {
    /// Slot index, or `None` for a name with the instance's prefix that the pool never
    /// creates (such as `hearth-<instance>-007`).
    index: Option<u32>,
    netns: Option<String>,
    host_veth: Option<String>,
    /// Address whose conntrack entries are cleared; `None` past the subnet's capacity.
    guest_route_ip: Option<Ipv4Addr>,
}

/// Result of the blocking part of a sweep.
struct OrphanRemoval {
    report: SweepReport,
    /// Indices whose objects are all gone, so they may be allocated again.
    cleaned: Vec<u32>,
    /// First error; the other slots are still handled.
    error: Option<SweepError>,
}

/// Marks indices as being swept for as long as it lives. Dropping it ends the marks and
/// frees the cleaned indices. It moves into the blocking removal, so that a cancelled
/// sweep future cannot free an index whose objects are still being deleted.
struct SweepReservation {
    inner: Arc<PoolInner>,
    indices: Vec<u32>,
    cleaned: Vec<u32>,
}

impl SweepReservation {
    fn add(&mut self, state: &mut PoolState, index: u32) {
        state.free_indices.remove(&index);
        state.sweeping.insert(index);
        self.indices.push(index);
    }
}

impl Drop for SweepReservation {
    fn drop(&mut self) {
        let mut state = self.inner.lock_state();
        for index in &self.indices {
            state.sweeping.remove(index);
        }
        // An index at or above `next_index` is allocated through `next_index` later.
        for index in &self.cleaned {
            if *index < state.next_index {
                state.free_indices.insert(*index);
            }
        }
        drop(state);
        if !self.cleaned.is_empty() {
            self.inner.wake.notify_one();
        }
    }
}

impl PoolInner {
    async fn sweep_orphans(self: &Arc<Self>) -> Result<SweepReport, PoolError> {
        let netns_prefix = self.instance.netns_prefix();
        let veth_prefix = self.instance.host_veth_prefix();
        let (namespaces, veths) = tokio::task::spawn_blocking(move || {
            (
                sweep::list_names("/run/netns", &netns_prefix),
                sweep::list_names("/sys/class/net", &veth_prefix),
            )
        })
        .await?;

        let mut reservation = SweepReservation {
            inner: self.clone(),
            indices: Vec::new(),
            cleaned: Vec::new(),
        };
        let (mut orphans, ready_netns) =
            match self.select_orphans(&mut reservation, namespaces, veths) {
                Some(selection) => selection,
                None => return Ok(SweepReport::default()),
            };

        let searched: Vec<String> = orphans
            .iter()
            .filter_map(|orphan| orphan.netns.clone())
            .chain(ready_netns.keys().cloned())
            .collect();
        let processes =
            tokio::task::spawn_blocking(move || sweep::find_netns_processes(&searched)).await??;
        self.take_ready_with_processes(&mut reservation, &mut orphans, &ready_netns, &processes);

        let removal = tokio::task::spawn_blocking(move || {
            let removal = remove_orphans(&orphans, &processes);
            reservation.cleaned.clone_from(&removal.cleaned);
            drop(reservation);
            removal
        })
        .await?;
        match removal.error {
            None => Ok(removal.report),
            Some(error) => {
                if !removal.report.is_empty() {
                    tracing::info!(
                        instance = %self.instance,
                        processes = removal.report.processes,
                        namespaces = removal.report.namespaces,
                        interfaces = removal.report.interfaces,
                        "removed part of the orphaned network slots before an error"
                    );
                }
                Err(error.into())
            }
        }
    }

    /// Chooses the listed objects that no slot of the pool accounts for and reserves
    /// their indices. Returns them with the namespaces of the ready slots, by name, or
    /// `None` when the pool is closed.
    fn select_orphans(
        &self,
        reservation: &mut SweepReservation,
        namespaces: Vec<String>,
        veths: Vec<String>,
    ) -> Option<(Vec<OrphanSlot>, HashMap<String, u32>)> {
        let mut state = self.lock_state();
        if state.closed {
            return None;
        }
        let ready: HashSet<u32> = state.ready.iter().map(|slot| slot.index).collect();
        let ready_netns: HashMap<String, u32> = state
            .ready
            .iter()
            .map(|slot| (slot.netns.clone(), slot.index))
            .collect();

        let mut by_index: BTreeMap<u32, OrphanSlot> = BTreeMap::new();
        let mut unindexed = Vec::new();
        let found = namespaces
            .into_iter()
            .map(|name| (slot_index(&name, &self.instance.netns_prefix()), name, true))
            .chain(veths.into_iter().map(|name| {
                (
                    slot_index(&name, &self.instance.host_veth_prefix()),
                    name,
                    false,
                )
            }));
        for (index, name, is_netns) in found {
            let orphan = match index {
                // The namespace and the veth of one index both lead here; the first one
                // seen reserves the index.
                Some(index) if by_index.contains_key(&index) => {
                    by_index.get_mut(&index).expect("checked above")
                }
                Some(index) if ready.contains(&index) || state.is_busy(index) => continue,
                Some(index) => {
                    reservation.add(&mut state, index);
                    by_index.entry(index).or_insert(self.orphan_slot(index))
                }
                None => {
                    unindexed.push(OrphanSlot {
                        index: None,
                        netns: None,
                        host_veth: None,
                        guest_route_ip: None,
                    });
                    unindexed.last_mut().expect("just pushed")
                }
            };
            if is_netns {
                orphan.netns = Some(name);
            } else {
                orphan.host_veth = Some(name);
            }
        }

        let mut orphans: Vec<OrphanSlot> = by_index.into_values().collect();
        orphans.extend(unindexed);
        Some((orphans, ready_netns))
    }

    /// Moves ready slots that contain a process out of the ready queue and into
    /// `orphans`. A slot acquired since the search is left to its user.
    fn take_ready_with_processes(
        &self,
        reservation: &mut SweepReservation,
        orphans: &mut Vec<OrphanSlot>,
        ready_netns: &HashMap<String, u32>,
        processes: &[NetnsProcess],
    ) {
        let mut state = self.lock_state();
        for process in processes {
            let Some(&index) = ready_netns.get(&process.netns) else {
                continue;
            };
            if let Some(position) = state.ready.iter().position(|slot| slot.index == index) {
                state.ready.remove(position);
                reservation.add(&mut state, index);
                let mut orphan = self.orphan_slot(index);
                orphan.netns = Some(process.netns.clone());
                orphan.host_veth = Some(self.instance.host_veth_name(index));
                orphans.push(orphan);
                tracing::warn!(netns = %process.netns, pid = process.pid, "found a process in a ready slot; deleting the slot");
            } else if !orphans.iter().any(|orphan| orphan.index == Some(index)) {
                tracing::warn!(netns = %process.netns, pid = process.pid, "a ready slot with a process in it was acquired during the sweep; leaving it");
            }
        }
    }

    fn orphan_slot(&self, index: u32) -> OrphanSlot {
        OrphanSlot {
            index: Some(index),
            netns: None,
            host_veth: None,
            guest_route_ip: self.subnet.guest_route_ip(index),
        }
    }
}

/// Blocking part of a sweep: kills the processes in each orphan's namespace, then deletes
/// its host veth and namespace and clears the conntrack entries of its address.
fn remove_orphans(orphans: &[OrphanSlot], processes: &[NetnsProcess]) -> OrphanRemoval {
    let mut removal = OrphanRemoval {
        report: SweepReport::default(),
        cleaned: Vec::new(),
        error: None,
    };
    for orphan in orphans {
        match remove_orphan(orphan, processes, &mut removal.report) {
            Ok(()) => removal.cleaned.extend(orphan.index),
            // The first error goes to the caller, which logs it; later ones are logged here.
            Err(error) if removal.error.is_none() => removal.error = Some(error),
            Err(error) => {
                tracing::warn!(netns = ?orphan.netns, host_veth = ?orphan.host_veth, %error, "failed to remove an orphaned slot");
            }
        }
    }
    removal
}

fn remove_orphan(
    orphan: &OrphanSlot,
    processes: &[NetnsProcess],
    report: &mut SweepReport,
) -> Result<(), SweepError> {
    if let Some(netns) = &orphan.netns {
        let inside: Vec<NetnsProcess> = processes
            .iter()
            .filter(|process| &process.netns == netns)
            .cloned()
            .collect();
        report.processes += sweep::kill_processes(&inside)?;
    }
    if let Some(host_veth) = &orphan.host_veth {
        setup::delete_link(host_veth)?;
        report.interfaces += 1;
    }
    if let Some(netns) = &orphan.netns {
        setup::delete_netns(netns)?;
        report.namespaces += 1;
    }
    if let Some(address) = orphan.guest_route_ip {
        sweep::clear_conntrack(address)?;
    }
    Ok(())
}

/// Returns the slot index in `name` when it is exactly `prefix` followed by the index as
/// the pool writes it.
fn slot_index(name: &str, prefix: &str) -> Option<u32> {
    let index: u32 = name.strip_prefix(prefix)?.parse().ok()?;
    (format!("{prefix}{index}") == name).then_some(index)
}

/// Blocking part of [`SlotPool::release`]: deletes the slot, then the host's conntrack
/// entries of its address, which would otherwise carry over to the index's next user.
fn delete_slot(plan: &SlotPlan) -> Result<(), SweepError> {
    setup::destroy_slot(&plan.netns, &plan.host_veth)?;
    let deleted = sweep::clear_conntrack(plan.guest_route_ip)?;
    tracing::debug!(netns = %plan.netns, deleted, "conntrack entries of the released slot deleted");
    Ok(())
}

/// Blocking part of [`SlotPool::start`].
fn prepare_host(
    config: &SlotPoolConfig,
) -> Result<(Flock<File>, SubnetLease, SweepReport), PoolError> {
    let instance = &config.instance;
    let lock_path = config.lock_dir.join(format!("instance-{instance}.lock"));
    let lock_file = subnet::open_lock_file(&lock_path)?;
    let instance_lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock)
        .map_err(|_| PoolError::InstanceHeld(instance.clone()))?;

    let report = sweep::sweep_instance(instance)?;
    let lease = subnet::choose_subnet(instance, config.subnet, &config.lock_dir)?;
    setup::install_host_rules(instance, &lease.subnet, config.dns_server)?;
    Ok((instance_lock, lease, report))
}
