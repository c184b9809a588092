//! The control plane of one replica: it makes what the state store says true in this process —
//! the adapters loaded at their recorded generations, the tenant policies and keys served — and,
//! with a shared store, keeps following it.
//!
//! - [`ControlPlane::commit`]: an admin change, committed to the store, then applied here.
//! - [`ControlPlane::apply`]: brings the registry and the directory to a committed state, in an
//!   order that never serves a tenant without the adapter its policy requires: new generations
//!   are loaded (and verified against their content hash) first, then the policies published,
//!   then removed adapters unloaded.
//! - [`ControlPlane::follow`]: with PostgreSQL, LISTEN for commits made anywhere and re-read the
//!   whole state on each (and every `reconcile` period as a safety net); reconnect with back-off
//!   when the store is lost, serving the last known state meanwhile.
//!
//! A replica that cannot load an adapter's recorded generation (files missing or altered on the
//! shared volume, limits) does not serve that adapter at all — neither an older generation nor
//! nothing in its place: the requests of tenants whose policy enables it get 503, `/ready` and
//! `lethe_adapters_unavailable` say which, and every reconcile tries again. Other tenants are
//! served normally.

use crate::adapters::{AdapterError, AdapterFiles, AdapterRegistry, Generations, LoadedAdapter};
use crate::telemetry as t;
use crate::tenants::store::{Notice, unix_ms};
use crate::tenants::{Directory, Intent, State, StoreError};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Why an adapter the state names is not served here.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Unavailable {
    pub generation: String,
    pub reason: String,
}

/// Whether the state store answers, as this replica last saw it.
#[derive(Debug, Default)]
pub struct StoreHealth {
    reachable: AtomicBool,
    /// Unix ms of the last successful read of the whole state.
    last_sync_ms: AtomicU64,
    /// Unix ms since when it has been unreachable (0 while reachable).
    down_since_ms: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl StoreHealth {
    fn up(&self) {
        self.reachable.store(true, Ordering::Relaxed);
        self.down_since_ms.store(0, Ordering::Relaxed);
        self.last_sync_ms.store(unix_ms(), Ordering::Relaxed);
    }

    fn down(&self, why: &str) {
        if self.reachable.swap(false, Ordering::Relaxed) || self.down_since_ms.load(Ordering::Relaxed) == 0 {
            self.down_since_ms.store(unix_ms(), Ordering::Relaxed);
            tracing::warn!(error = why, "state store unreachable: serving the last known state, admin changes refused");
        }
        *self.last_error.lock().expect("health lock") = Some(why.to_string());
    }

    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// What `/ready` shows.
    pub fn report(&self) -> serde_json::Value {
        let down_since = self.down_since_ms.load(Ordering::Relaxed);
        serde_json::json!({
            "reachable": self.reachable(),
            "last_sync_ms": self.last_sync_ms.load(Ordering::Relaxed),
            "down_since_ms": (down_since > 0).then_some(down_since),
            "last_error": if self.reachable() { None } else { self.last_error.lock().expect("health lock").clone() },
        })
    }
}

pub struct ControlPlane {
    pub tenants: Arc<Directory>,
    pub adapters: Arc<AdapterRegistry>,
    /// Content-addressed copies of every generation (shared by replicas); `None` without a
    /// state directory or shared store (nothing is kept: rollback re-reads and verifies the
    /// original path).
    generations: Option<Generations>,
    /// Generations per adapter name whose files are kept.
    keep_generations: usize,
    /// Who this replica is, in audit entries.
    pub replica: String,
    /// One application of a state at a time.
    apply_lock: Mutex<()>,
    unavailable: RwLock<BTreeMap<String, Unavailable>>,
    pub health: StoreHealth,
}

impl ControlPlane {
    pub fn new(
        tenants: Arc<Directory>,
        adapters: Arc<AdapterRegistry>,
        generations: Option<Generations>,
        keep_generations: usize,
        replica: String,
    ) -> Self {
        let health = StoreHealth::default();
        health.up();
        // Export the series from the start (a file store never increments it).
        metrics::counter!(t::STATE_SYNCS, "result" => "applied").increment(0);
        Self {
            tenants,
            adapters,
            generations,
            keep_generations: keep_generations.max(1),
            replica,
            apply_lock: Mutex::new(()),
            unavailable: RwLock::new(BTreeMap::new()),
            health,
        }
    }

    pub fn generations(&self) -> Option<&Generations> {
        self.generations.as_ref()
    }

    /// Adapters the state names that this replica cannot serve, and why.
    pub fn unavailable(&self) -> BTreeMap<String, Unavailable> {
        self.unavailable.read().expect("unavailable lock").clone()
    }

    /// The intent of a change made here by `actor`.
    pub fn intent(&self, actor: &str, action: &str, target: String, request_id: Option<String>) -> Intent {
        Intent { actor: actor.into(), action: action.into(), target, replica: self.replica.clone(), request_id }
    }

    /// Reads and packs generation `record.generation` of `name`: from its kept copy when there
    /// is one, else from the recorded path; either way the content must hash to the generation.
    pub fn load_generation(
        &self,
        name: &str,
        generation: &str,
        path: &str,
    ) -> Result<Arc<LoadedAdapter>, AdapterError> {
        let (files, dir) = match &self.generations {
            Some(g) if g.contains(generation) => (g.read(generation)?, g.path(generation)),
            _ => {
                let dir = self.adapters.resolve(path)?;
                let files = AdapterFiles::read(&dir)?;
                if !generation.is_empty() {
                    crate::adapters::files::verify(&files, generation, &dir)?;
                }
                (files, dir)
            }
        };
        self.adapters.prepare_files(name, dir, &files)
    }

    /// Keeps `files` as their generation (before any replica hears of it).
    pub fn keep(&self, generation: &str, files: &AdapterFiles) -> Result<(), AdapterError> {
        match &self.generations {
            Some(g) => g.keep(generation, files).map(|_| ()),
            None => Ok(()),
        }
    }

    /// Brings this replica to `state`: adapters at their recorded generations (`preloaded` ones
    /// are installed as they are), then the policies, then unloads. Blocking (may read and pack
    /// adapters). A state older than the one served is ignored.
    pub fn apply(&self, state: Arc<State>, preloaded: &[Arc<LoadedAdapter>], committed_at_ms: Option<u64>) {
        let _one_at_a_time = self.apply_lock.lock().expect("apply lock");
        if state.revision < self.tenants.revision() {
            return;
        }
        for (name, record) in &state.adapters {
            if self.adapters.get(name).is_some_and(|a| a.generation == record.generation) {
                self.unavailable.write().expect("unavailable lock").remove(name);
                continue;
            }
            let loaded = match preloaded.iter().find(|a| &a.name == name && a.generation == record.generation) {
                Some(a) => Ok(a.clone()),
                None => {
                    let started = std::time::Instant::now();
                    let a = self.load_generation(name, &record.generation, &record.path);
                    metrics::histogram!(t::ADAPTER_LOAD_SECONDS).record(started.elapsed().as_secs_f64());
                    a
                }
            };
            match loaded.and_then(|a| self.adapters.install(a.clone()).map(|_| a)) {
                Ok(a) => {
                    self.unavailable.write().expect("unavailable lock").remove(name);
                    metrics::counter!(t::ADAPTER_LOADS, "adapter" => name.clone()).increment(1);
                    tracing::info!(adapter = %name, generation = %a.generation, revision = state.revision, "adapter generation applied");
                }
                Err(e) => {
                    // Never serve another generation (or nothing) in its place.
                    if self.adapters.unload(name).is_ok() {
                        metrics::counter!(t::ADAPTER_UNLOADS, "adapter" => name.clone()).increment(1);
                    }
                    let reason = e.to_string();
                    tracing::error!(adapter = %name, generation = %record.generation, error = %reason,
                        "cannot load the recorded generation: its tenants get 503 until it loads");
                    let u = Unavailable { generation: record.generation.clone(), reason };
                    self.unavailable.write().expect("unavailable lock").insert(name.clone(), u);
                }
            }
        }
        let revision = state.revision;
        if self.tenants.publish(state.clone()) {
            metrics::gauge!(t::STATE_REVISION).set(revision as f64);
            if let Some(at) = committed_at_ms {
                let delay = unix_ms().saturating_sub(at) as f64 / 1e3;
                metrics::histogram!(t::STATE_PROPAGATION_SECONDS).record(delay);
            }
        }
        for name in self.adapters.names() {
            if !state.adapters.contains_key(&name)
                && let Ok(old) = self.adapters.unload(&name)
            {
                metrics::counter!(t::ADAPTER_UNLOADS, "adapter" => name.clone()).increment(1);
                tracing::info!(adapter = %name, generation = %old.generation, revision, "adapter unloaded");
            }
        }
        self.unavailable.write().expect("unavailable lock").retain(|n, _| state.adapters.contains_key(n));
    }

    /// Commits an admin change and applies it here before answering: the caller's next request,
    /// on this replica, sees it. `preloaded`: adapters already read and packed for this change.
    pub async fn commit<R: Send, E: From<StoreError> + Send>(
        self: &Arc<Self>,
        intent: Intent,
        preloaded: Vec<Arc<LoadedAdapter>>,
        f: impl FnOnce(&mut State) -> Result<R, E> + Send,
    ) -> Result<R, E> {
        let started = unix_ms();
        let (r, state) = match self.tenants.commit(intent, |st| f(st).map_err(Rejected::Change)).await {
            Ok(done) => done,
            Err(Rejected::Store(e)) => {
                if let StoreError::Unavailable(m) = &e {
                    self.health.down(m);
                }
                return Err(E::from(e));
            }
            Err(Rejected::Change(e)) => return Err(e),
        };
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            me.apply(state.clone(), &preloaded, Some(started));
            me.prune(&state);
        })
        .await;
        Ok(r)
    }

    /// Deletes the kept files of generations no longer among the most recent of any name.
    fn prune(&self, state: &State) {
        let Some(g) = &self.generations else { return };
        let keep = state.generations_to_keep(self.keep_generations);
        for gen_ in state.history.values().flatten().map(|h| &h.generation) {
            if !keep.contains(gen_) && g.contains(gen_) {
                match g.remove(gen_) {
                    Ok(()) => tracing::info!(generation = %gen_, "old adapter generation pruned"),
                    Err(e) => tracing::warn!(generation = %gen_, error = %e, "cannot prune an old generation"),
                }
            }
        }
    }

    /// Start-up: records the generation of adapters a version-1 state file named by path only,
    /// then loads everything the state names. With a file store, an adapter that cannot be
    /// restored at its recorded generation stops start-up; with a shared store it is refused
    /// (see the module documentation) and retried by [`Self::follow`].
    pub fn start(self: &Arc<Self>) -> anyhow::Result<()> {
        let state = self.tenants.snapshot();
        let mut preloaded = Vec::new();
        let unrecorded: Vec<(String, String)> = state
            .adapters
            .iter()
            .filter(|(_, r)| r.generation.is_empty())
            .map(|(n, r)| (n.clone(), r.path.clone()))
            .collect();
        if !unrecorded.is_empty() {
            for (name, path) in &unrecorded {
                let (a, files) = self.adapters.prepare(name, path).map_err(|e| restore_error(name, e))?;
                self.keep(&a.generation, &files).map_err(|e| restore_error(name, e))?;
                tracing::warn!(adapter = %name, generation = %a.generation,
                    "the state file did not record this adapter's generation: recorded now, from its current files");
                preloaded.push(a);
            }
            let intent = self.intent("lethe", "state.upgrade", "state".into(), None);
            let records = preloaded.clone();
            let (_, upgraded) = futures::executor::block_on(self.tenants.commit(intent, move |st| {
                for a in &records {
                    if let Some(r) = st.adapters.get(&a.name).cloned() {
                        let profile = a.profile.as_ref().and_then(|p| serde_json::to_value(p).ok());
                        let record = crate::tenants::store::AdapterRecord { generation: a.generation.clone(), ..r };
                        st.make_current(&a.name, record, profile);
                    }
                }
                Ok::<_, StoreError>(())
            }))?;
            self.apply(upgraded, &preloaded, None);
        } else {
            self.apply(state, &[], None);
        }
        let unavailable = self.unavailable();
        if let Some((name, u)) = unavailable.iter().next() {
            if !self.tenants.store().is_shared() {
                anyhow::bail!("restoring adapter {name:?} from the state directory: {}", u.reason);
            }
            tracing::error!(adapter = %name, reason = %u.reason, "adapter not restored: refused until it loads");
        }
        for a in self.adapters.list() {
            tracing::info!(adapter = %a.name, generation = %a.generation, "adapter restored");
        }
        metrics::gauge!(t::STATE_REVISION).set(self.tenants.revision() as f64);
        Ok(())
    }

    /// Follows a shared store until the process ends (returns at once for a store nobody else
    /// writes): LISTEN, catch up, apply each announced commit, re-read everything every
    /// `reconcile`; on any failure mark the store unreachable and reconnect with back-off.
    pub async fn follow(self: Arc<Self>, reconcile: Duration) {
        const FIRST_RETRY: Duration = Duration::from_millis(100);
        const MAX_RETRY: Duration = Duration::from_secs(5);
        let mut retry = FIRST_RETRY;
        loop {
            let listening = self.tenants.store().listen().await;
            match listening {
                Ok(None) => return,
                Ok(Some(mut notices)) => {
                    // Whatever was committed while we were not listening.
                    if self.reconcile(None).await.is_ok() {
                        retry = FIRST_RETRY;
                        self.health.up();
                        loop {
                            let tick = tokio::time::sleep(reconcile);
                            tokio::select! {
                                n = notices.recv() => {
                                    let Some(mut n) = n else {
                                        self.health.down("the listener connection was lost");
                                        break;
                                    };
                                    // A burst of commits: read once, for the newest.
                                    while let Ok(next) = notices.try_recv() {
                                        n = next;
                                    }
                                    if n.revision > self.tenants.revision() && self.reconcile(Some(n)).await.is_err() {
                                        break;
                                    }
                                }
                                _ = tick => {
                                    if self.reconcile(None).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                    }
                }
                Err(e) => self.health.down(&e.to_string()),
            }
            let jitter = Duration::from_millis(u64::from(rand_u8()) % 50);
            tokio::time::sleep(retry + jitter).await;
            retry = (retry * 2).min(MAX_RETRY);
        }
    }

    /// Reads the whole state and applies it if it is newer (or if some adapter still waits to
    /// be loaded). `notice`: the commit that prompted this, for the propagation delay.
    async fn reconcile(self: &Arc<Self>, notice: Option<Notice>) -> Result<(), StoreError> {
        let state = match self.tenants.store().load().await {
            Ok(s) => Arc::new(s),
            Err(e) => {
                metrics::counter!(t::STATE_SYNCS, "result" => "error").increment(1);
                self.health.down(&e.to_string());
                return Err(e);
            }
        };
        self.health.up();
        let newer = state.revision > self.tenants.revision();
        if !newer && self.unavailable.read().expect("unavailable lock").is_empty() {
            metrics::counter!(t::STATE_SYNCS, "result" => "current").increment(1);
            return Ok(());
        }
        let committed_at = notice.filter(|n| n.revision <= state.revision).map(|n| n.committed_at_ms);
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || me.apply(state, &[], committed_at)).await;
        metrics::counter!(t::STATE_SYNCS, "result" => if newer { "applied" } else { "retried" }).increment(1);
        Ok(())
    }

    /// The error for a tenant whose policy names adapters that are not all loaded here.
    pub fn missing_adapters(&self, tenant: &str, adapters: &[String]) -> crate::server::error::ApiError {
        let unavailable = self.unavailable();
        match adapters.iter().find_map(|a| unavailable.get(a).map(|u| (a, u))) {
            Some((name, u)) => crate::server::error::ApiError::AdapterUnavailable(format!(
                "forget-adapter {name:?} (generation {}) required by tenant {tenant:?} cannot be loaded on this \
                 replica; the request is refused rather than served without it",
                u.generation
            )),
            None => crate::server::error::ApiError::Internal(format!(
                "tenant {tenant:?} enables adapters {adapters:?} that are not all loaded"
            )),
        }
    }
}

/// The error of [`Directory::commit`] as the control plane sees it: the store failed, or the
/// change refused itself.
enum Rejected<E> {
    Store(StoreError),
    Change(E),
}

impl<E> From<StoreError> for Rejected<E> {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

fn restore_error(name: &str, e: AdapterError) -> anyhow::Error {
    anyhow::anyhow!("restoring adapter {name:?} from the state directory: {e}")
}

fn rand_u8() -> u8 {
    let mut b = [0u8; 1];
    let _ = getrandom::fill(&mut b);
    b[0]
}

/// This replica's name in audit entries: `LETHE_REPLICA_ID`, else the host name (a pod's name
/// in Kubernetes), with the process id.
pub fn replica_id() -> String {
    if let Ok(id) = std::env::var("LETHE_REPLICA_ID")
        && !id.trim().is_empty()
    {
        return id.trim().to_string();
    }
    let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "lethe".into())
    });
    format!("{host}:{}", std::process::id())
}
