//! The engine loop: one thread owns the model's KV caches and runs one batched forward per step
//! for every running row, whatever request it belongs to.
//!
//! Callers talk to it through an [`EngineHandle`]: `submit` validates a request up front (context
//! length, vocabulary, queue capacity) and returns a stream of [`Event`]s. Dropping the stream
//! cancels the request; its rows are freed before the next step.

use super::choose::{Choice, choose};
use super::request::{Event, FinishReason, Request, Timing, Usage};
use super::scheduler::{PlannedRow, Scheduler, SchedulerConfig};
use super::sequence::{Group, RowLogits};
use crate::guidance::GuidanceMode;
use crate::model::{BatchEntry, KvCache, KvDtype, KvSizing, Llama, RaggedBatch, StepLogits};
use crate::sampling::{StopOutcome, TokenLogprobs};
use crate::telemetry as t;
use crate::tokenizer::Tokenizer;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    /// Byte budget of the KV caches.
    pub kv_cache_bytes: usize,
    /// Share the KV blocks of identical prompt prefixes between requests (automatic prefix
    /// caching; see [`crate::model::kv_cache`]).
    pub prefix_cache: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { scheduler: SchedulerConfig::default(), kv_cache_bytes: 2 << 30, prefix_cache: true }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum EngineError {
    #[error("server overloaded: {waiting} requests already waiting")]
    Overloaded { waiting: usize },
    /// The tenant's own queue is full (its policy's `max_waiting`); other tenants are served.
    #[error("tenant {tenant:?} has {waiting} requests waiting, its limit is {limit}")]
    TenantOverloaded { tenant: String, waiting: usize, limit: usize },
    #[error("this request needs {needed} tokens (prompt + max_tokens), beyond the model's context of {max}")]
    ContextOverflow { needed: usize, max: usize },
    #[error("this request would need {needed} bytes of KV cache, more than the server's limit of {limit}")]
    TooLarge { needed: usize, limit: usize },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("the engine is shutting down")]
    ShuttingDown,
    #[error("the server shut down before this request finished")]
    CutByShutdown,
    #[error("inference failed: {0}")]
    Failed(String),
    /// The request's output grammar admits no further token, or failed on the way.
    #[error("constrained decoding failed: {0}")]
    Constraint(String),
}

/// A request with more rows (a guided pair has two) than the engine may ever run at once.
pub(super) fn too_many_rows(rows: usize, max: usize) -> EngineError {
    EngineError::InvalidRequest(format!(
        "this request needs {rows} rows, more than the server's max_running_rows of {max}"
    ))
}

/// Live counters the HTTP layer and metrics read.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    pub running_rows: AtomicUsize,
    /// KV bytes held by running rows (unreferenced prefix-cache blocks excluded: they are
    /// evicted as soon as memory is needed).
    pub kv_used_bytes: AtomicUsize,
    pub kv_limit_bytes: AtomicUsize,
    pub steps: AtomicU64,
    /// Tokens run through the model (prompt tokens computed and decoded ones).
    pub forward_tokens: AtomicU64,
    /// Prompt tokens served from the prefix cache instead of computed.
    pub prefix_hit_tokens: AtomicU64,
    pub alive: AtomicBool,
    /// The engine thread died of a panic: the process cannot serve any more and should be
    /// restarted (`/health` turns 503, so a liveness probe does it).
    pub crashed: AtomicBool,
    /// Requests waiting (tokenizing or queued) per tenant; tenants with none are absent.
    pub waiting_by_tenant: Mutex<HashMap<String, usize>>,
}

impl EngineStats {
    /// Requests of `tenant` waiting (tokenizing or queued).
    pub fn tenant_waiting(&self, tenant: &str) -> usize {
        self.waiting_by_tenant.lock().unwrap_or_else(|e| e.into_inner()).get(tenant).copied().unwrap_or(0)
    }
}

/// A request's place in the waiting queue: taken before any work is done for it (tokenization
/// included), counted against the server's and its tenant's `max_waiting`, and given back when
/// dropped (admission, rejection, cancellation).
pub struct Ticket {
    stats: Arc<EngineStats>,
    tenant: String,
}

impl Ticket {
    pub fn tenant(&self) -> &str {
        &self.tenant
    }
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket").field("tenant", &self.tenant).finish()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut by = self.stats.waiting_by_tenant.lock().unwrap_or_else(|e| e.into_inner());
        let left = match by.get_mut(&self.tenant) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n
            }
            None => 0,
        };
        if left == 0 {
            by.remove(&self.tenant);
        }
        self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
        metrics::gauge!(t::NUM_REQUESTS_WAITING).decrement(1.0);
        metrics::gauge!(t::TENANT_REQUESTS_WAITING, "tenant" => self.tenant.clone()).set(left as f64);
    }
}

/// Marks the engine dead however its thread ends, a panic included (then also `crashed`).
struct ExitMarker(Arc<EngineStats>);

impl Drop for ExitMarker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.crashed.store(true, Ordering::SeqCst);
            tracing::error!("the engine thread panicked; the server can no longer generate");
        }
        self.0.alive.store(false, Ordering::SeqCst);
    }
}

enum Command {
    Submit(Box<Group>),
    Shutdown { deadline: Instant },
}

/// A cheap, cloneable handle to a running engine.
#[derive(Clone)]
pub struct EngineHandle {
    tx: Arc<Mutex<Sender<Command>>>,
    stats: Arc<EngineStats>,
    next_id: Arc<AtomicU64>,
    max_waiting: usize,
    max_context: usize,
    vocab: usize,
    /// The KV cache's sizing rule: the up-front check must count exactly what admission will
    /// reserve (whole blocks), or a request that passes it could never be admitted.
    kv_sizing: KvSizing,
    max_running_rows: usize,
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

/// The events of one submitted request. Dropping it cancels the request.
pub struct RequestStream {
    pub id: u64,
    rx: UnboundedReceiver<Event>,
}

impl RequestStream {
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
    /// For synchronous callers (CLI, benchmarks).
    pub fn blocking_next(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }
}

impl EngineHandle {
    /// Starts the engine thread for `model` (f16 KV cache on the native backend).
    pub fn spawn(model: Arc<Llama>, tokenizer: Arc<Tokenizer>, cfg: EngineConfig) -> Self {
        Self::spawn_with_kv_dtype(model, tokenizer, cfg, KvDtype::default())
    }

    /// Starts the engine thread with an explicit KV cache element type.
    pub fn spawn_with_kv_dtype(
        model: Arc<Llama>,
        tokenizer: Arc<Tokenizer>,
        cfg: EngineConfig,
        kv_dtype: KvDtype,
    ) -> Self {
        let mut kv = model.new_kv_cache_with_dtype(cfg.kv_cache_bytes, kv_dtype);
        kv.set_prefix_caching(cfg.prefix_cache);
        let stats = Arc::new(EngineStats::default());
        stats.kv_limit_bytes.store(cfg.kv_cache_bytes, Ordering::Relaxed);
        stats.alive.store(true, Ordering::Relaxed);
        let (tx, rx) = std::sync::mpsc::channel();
        let max_waiting = cfg.scheduler.max_waiting;
        let max_running_rows = cfg.scheduler.max_running_rows;
        let max_context = model.config().max_context;
        let vocab = model.config().vocab_size;
        let kv_sizing = kv.sizing();
        let masks_beside_forward = masks_beside_forward(&model);
        let worker = Worker {
            running_tenants: Vec::new(),
            model,
            tokenizer,
            kv,
            sched: Scheduler::new(cfg.scheduler),
            stats: stats.clone(),
            rx,
            scratch: Vec::new(),
            draining: None,
            masks_beside_forward,
        };
        let thread = std::thread::Builder::new()
            .name("lethe-engine".into())
            .spawn(move || {
                let _exit = ExitMarker(worker.stats.clone());
                worker.run()
            })
            .expect("spawning the engine thread");
        metrics::gauge!(t::KV_CACHE_LIMIT_BYTES).set(cfg.kv_cache_bytes as f64);
        Self {
            tx: Arc::new(Mutex::new(tx)),
            stats,
            next_id: Arc::new(AtomicU64::new(1)),
            max_waiting,
            max_context,
            vocab,
            kv_sizing,
            max_running_rows,
            thread: Arc::new(Mutex::new(Some(thread))),
        }
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }
    pub fn max_context(&self) -> usize {
        self.max_context
    }
    /// The model's vocabulary size (the length of its logits).
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }
    pub fn is_alive(&self) -> bool {
        self.stats.alive.load(Ordering::Relaxed)
    }

    /// Checks a request against the model's limits before any work is done.
    pub fn validate(&self, req: &Request) -> Result<(), EngineError> {
        let bad = |m: &str| Err(EngineError::InvalidRequest(m.into()));
        if req.prompt.is_empty() {
            return bad("the prompt is empty");
        }
        if req.max_tokens == 0 {
            return bad("max_tokens must be at least 1");
        }
        if !req.sampling.temperature.is_finite() || req.sampling.temperature < 0.0 {
            return bad("temperature must be a finite number ≥ 0");
        }
        if !(req.sampling.top_p > 0.0 && req.sampling.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if let Some(g) = req.guidance
            && !(g.gamma.is_finite() && g.gamma >= 0.0)
        {
            return bad("guidance gamma must be a finite number ≥ 0");
        }
        let mut rows = vec![&req.prompt];
        if req.is_pair() {
            let u = req.uncond_prompt.as_ref().expect("pair has an uncond prompt");
            if u.is_empty() {
                return bad("the uncond prompt is empty");
            }
            rows.push(u);
        }
        let max_rows = req.limits.max_running_rows.map_or(self.max_running_rows, |t| t.min(self.max_running_rows));
        if rows.len() > max_rows {
            return Err(too_many_rows(rows.len(), max_rows));
        }
        let mut kv_need = 0;
        for p in rows {
            if let Some(&t) = p.iter().find(|&&t| t as usize >= self.vocab) {
                return Err(EngineError::InvalidRequest(format!("token id {t} outside the vocabulary")));
            }
            let needed = p.len() + req.max_tokens;
            if needed > self.max_context {
                return Err(EngineError::ContextOverflow { needed, max: self.max_context });
            }
            kv_need += self.kv_sizing.bytes_for_tokens(needed);
        }
        let limit = self.stats.kv_limit_bytes.load(Ordering::Relaxed);
        if kv_need > limit {
            return Err(EngineError::TooLarge { needed: kv_need, limit });
        }
        Ok(())
    }

    /// Takes a place in the waiting queue for a request of `tenant`, before any work is done for
    /// it. Fails fast with `TenantOverloaded` when the tenant's own queue is full (`limits`),
    /// and `Overloaded` when the server's is.
    pub fn reserve(&self, tenant: &str, limits: &super::request::TenantLimits) -> Result<Ticket, EngineError> {
        if !self.is_alive() {
            return Err(EngineError::ShuttingDown);
        }
        let mut by = self.stats.waiting_by_tenant.lock().unwrap_or_else(|e| e.into_inner());
        let mine = by.get(tenant).copied().unwrap_or(0);
        if let Some(limit) = limits.max_waiting
            && mine >= limit
        {
            metrics::counter!(t::TENANT_REJECTED, "tenant" => tenant.to_string(), "limit" => "tenant").increment(1);
            return Err(EngineError::TenantOverloaded { tenant: tenant.to_string(), waiting: mine, limit });
        }
        let waiting = self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.max_waiting {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            metrics::counter!(t::TENANT_REJECTED, "tenant" => tenant.to_string(), "limit" => "server").increment(1);
            return Err(EngineError::Overloaded { waiting });
        }
        *by.entry(tenant.to_string()).or_default() += 1;
        metrics::gauge!(t::NUM_REQUESTS_WAITING).increment(1.0);
        metrics::gauge!(t::TENANT_REQUESTS_WAITING, "tenant" => tenant.to_string()).set((mine + 1) as f64);
        Ok(Ticket { stats: self.stats.clone(), tenant: tenant.to_string() })
    }

    /// Queues a request. Fails fast with `Overloaded` (or `TenantOverloaded`) when the waiting
    /// queue (or its tenant's share of it) is full.
    pub fn submit(&self, req: Request) -> Result<RequestStream, EngineError> {
        self.validate(&req)?;
        let ticket = self.reserve(&req.tenant, &req.limits)?;
        self.enqueue(req, ticket)
    }

    /// Queues a request whose place was taken with [`Self::reserve`] (the ticket is given back
    /// when the request is admitted, rejected or cancelled).
    pub fn submit_reserved(&self, req: Request, ticket: Ticket) -> Result<RequestStream, EngineError> {
        self.validate(&req)?;
        self.enqueue(req, ticket)
    }

    fn enqueue(&self, req: Request, ticket: Ticket) -> Result<RequestStream, EngineError> {
        if !self.is_alive() {
            return Err(EngineError::ShuttingDown);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (etx, erx) = unbounded_channel();
        let mut group = Group::new(id, req, etx);
        group.ticket = Some(ticket);
        // On failure the group, and with it the ticket, is dropped: the place is given back.
        let sent = self.tx.lock().expect("engine channel lock").send(Command::Submit(Box::new(group)));
        if sent.is_err() {
            return Err(EngineError::ShuttingDown);
        }
        Ok(RequestStream { id, rx: erx })
    }

    /// Stops accepting requests, lets running ones finish until `deadline`, then ends the
    /// remaining ones with an error event and stops the thread. Blocks until it has stopped.
    pub fn shutdown(&self, grace: Duration) {
        self.stats.alive.store(false, Ordering::SeqCst);
        let deadline = Instant::now() + grace;
        let _ = self.tx.lock().expect("engine channel lock").send(Command::Shutdown { deadline });
        if let Some(h) = self.thread.lock().expect("engine thread lock").take() {
            let _ = h.join();
        }
    }
}

struct Worker {
    model: Arc<Llama>,
    tokenizer: Arc<Tokenizer>,
    kv: KvCache,
    sched: Scheduler,
    stats: Arc<EngineStats>,
    rx: Receiver<Command>,
    scratch: Vec<f32>,
    /// Set once shutdown was requested: finish running work until this instant.
    draining: Option<Instant>,
    /// Grammar masks are computed on a helper thread during the forward (a core is free for it).
    masks_beside_forward: bool,
    /// Tenants whose running-rows gauge was last set above zero.
    running_tenants: Vec<String>,
}

impl Worker {
    fn run(mut self) {
        loop {
            if !self.take_commands() {
                break;
            }
            self.drop_cancelled();
            if let Some(deadline) = self.draining {
                // Admit nothing new; reject whatever still waits.
                while let Some(g) = self.sched.waiting.pop_front() {
                    let _ = g.events.send(Event::Error(EngineError::ShuttingDown));
                }
                if self.sched.running.is_empty() || Instant::now() >= deadline {
                    while !self.sched.running.is_empty() {
                        let g = self.sched.finish(0, &mut self.kv);
                        let _ = g.events.send(Event::Error(EngineError::CutByShutdown));
                    }
                    self.publish_stats();
                    break;
                }
            } else {
                for (g, e) in self.sched.take_unfittable(&self.kv) {
                    tracing::warn!(error = %e, "rejected a request that can never be admitted");
                    let _ = g.events.send(Event::Error(e));
                    record_finish(&g, "error");
                }
                self.sched.admit(&mut self.kv);
            }
            if !self.sched.running.is_empty() {
                self.step();
            }
            self.publish_stats();
        }
        // `ExitMarker` clears `alive` however the thread ends.
    }

    /// Receives commands; blocks only when there is nothing to do. False when the engine must stop.
    fn take_commands(&mut self) -> bool {
        if self.sched.is_idle() {
            if self.draining.is_some() {
                return false;
            }
            match self.rx.recv() {
                Ok(c) => self.handle(c),
                Err(_) => return false,
            }
        }
        loop {
            match self.rx.try_recv() {
                Ok(c) => self.handle(c),
                Err(TryRecvError::Empty) => return true,
                // All handles dropped: finish what is running, then stop.
                Err(TryRecvError::Disconnected) => {
                    if self.draining.is_none() {
                        self.draining = Some(Instant::now() + Duration::from_secs(3600));
                    }
                    return true;
                }
            }
        }
    }

    fn handle(&mut self, c: Command) {
        match c {
            Command::Submit(g) => self.sched.waiting.push_back(*g),
            Command::Shutdown { deadline } => self.draining = Some(deadline),
        }
    }

    /// Frees the rows of requests whose client went away.
    fn drop_cancelled(&mut self) {
        let (gone, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.sched.waiting).into_iter().partition(|g| g.is_cancelled());
        self.sched.waiting = waiting.into_iter().collect();
        for g in gone {
            record_finish(&g, "cancelled");
        }
        let mut i = 0;
        while i < self.sched.running.len() {
            if self.sched.running[i].is_cancelled() {
                let g = self.sched.finish(i, &mut self.kv);
                record_finish(&g, "cancelled");
            } else {
                i += 1;
            }
        }
    }

    fn publish_stats(&mut self) {
        let s = &self.stats;
        s.running.store(self.sched.running.len(), Ordering::Relaxed);
        s.running_rows.store(self.sched.running_rows(), Ordering::Relaxed);
        // Memory held by requests: cached blocks no row references are free for the taking.
        let p = self.kv.prefix_stats();
        let used = self.kv.used_bytes() - p.evictable_bytes;
        s.kv_used_bytes.store(used, Ordering::Relaxed);
        metrics::gauge!(t::NUM_REQUESTS_RUNNING).set(self.sched.running.len() as f64);
        metrics::gauge!(t::KV_CACHE_USED_BYTES).set(used as f64);
        let by = self.sched.rows_by_tenant();
        for gone in self.running_tenants.iter().filter(|t| !by.contains_key(t.as_str())) {
            metrics::gauge!(t::TENANT_RUNNING_ROWS, "tenant" => gone.clone()).set(0.0);
        }
        for (tenant, rows) in &by {
            metrics::gauge!(t::TENANT_RUNNING_ROWS, "tenant" => tenant.to_string()).set(*rows as f64);
        }
        let now: Vec<String> = by.keys().map(|t| t.to_string()).collect();
        drop(by);
        self.running_tenants = now;
        s.prefix_hit_tokens.store(p.hit_tokens, Ordering::Relaxed);
        metrics::counter!(t::PREFIX_CACHE_QUERIES).absolute(p.query_tokens);
        metrics::counter!(t::PREFIX_CACHE_HIT_TOKENS).absolute(p.hit_tokens);
        metrics::counter!(t::PREFIX_CACHE_EVICTED_BLOCKS).absolute(p.evicted_blocks);
        metrics::gauge!(t::PREFIX_CACHE_BLOCKS).set(p.blocks as f64);
        metrics::gauge!(t::PREFIX_CACHE_REFERENCED_BLOCKS).set(p.referenced_blocks as f64);
        metrics::gauge!(t::PREFIX_CACHE_BYTES).set(p.bytes as f64);
        metrics::gauge!(t::PREFIX_CACHE_EVICTABLE_BYTES).set(p.evictable_bytes as f64);
        if p.query_tokens > 0 {
            metrics::gauge!(t::PREFIX_CACHE_HIT_RATE).set(p.hit_tokens as f64 / p.query_tokens as f64);
        }
    }

    /// Rows still prefilling that hold no blocks of their own take the blocks that other rows
    /// have cached since (identical prompts admitted together: the first computes, the others
    /// wait behind it — shortest remaining prompt first — and then share).
    fn attach_cached_prefixes(&mut self) {
        for g in &mut self.sched.running {
            for (i, r) in g.rows.iter_mut().enumerate() {
                if r.is_prefilling() {
                    let gained = self.kv.extend_cached(r.seq, &r.pending[r.cursor..]);
                    r.cursor += gained;
                    if let Some(c) = g.cached_tokens.get_mut(i) {
                        *c += gained;
                    }
                }
            }
        }
    }

    /// One forward over every planned row, then sampling for every group that is ready.
    fn step(&mut self) {
        self.attach_cached_prefixes();
        let plan = self.sched.plan();
        if plan.is_empty() {
            return;
        }
        // A panic anywhere in the step (a kernel, sampling) ends this step's requests with an
        // error event and the engine keeps serving: never a dead thread behind a healthy server.
        let ids = self.group_ids(&plan);
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_step(&plan)));
        if let Err(payload) = stepped {
            let what = payload.downcast_ref::<&str>().copied().or(payload.downcast_ref::<String>().map(|s| s.as_str()));
            self.fail_groups(&ids, &format!("internal error in a forward step: {}", what.unwrap_or("panic")));
        }
    }

    fn run_step(&mut self, plan: &[PlannedRow]) {
        let batch = RaggedBatch::new(
            plan.iter()
                .map(|p| {
                    let g = &self.sched.running[p.group];
                    let r = &g.rows[p.row];
                    BatchEntry::last(r.seq, r.pending[r.cursor..r.cursor + p.n_tokens].to_vec())
                        .with_adapters(g.req.adapters.clone())
                })
                .collect(),
        );
        let started = Instant::now();
        let result = self.forward_preparing_constraints(&batch);
        metrics::histogram!(t::STEP_DURATION).record(started.elapsed().as_secs_f64());
        metrics::histogram!(t::BATCH_ROWS).record(plan.len() as f64);
        metrics::histogram!(t::BATCH_TOKENS).record(batch.n_tokens() as f64);
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats.forward_tokens.fetch_add(batch.n_tokens() as u64, Ordering::Relaxed);
        let logits = match result {
            Ok(l) => l,
            Err(e) => return self.fail_groups(&self.group_ids(plan), &e.to_string()),
        };
        for (i, p) in plan.iter().enumerate() {
            let r = &mut self.sched.running[p.group].rows[p.row];
            r.cursor += p.n_tokens;
            if r.remaining() == 0 {
                r.logits = Some(RowLogits::InBatch(i));
            }
        }
        self.sample_ready(&logits);
    }

    /// The forward, and the allowed next tokens of every constrained request (grammar masks:
    /// ~0.1–0.2 ms each for a 49k vocabulary). Where a core would otherwise idle — the forward
    /// runs on a GPU, or the kernel pool leaves a core free — the masks are computed on a helper
    /// thread while the forward runs, so they do not lengthen the step. When the kernel pool
    /// already uses every core, a helper only takes turns with it for the same cores, and the
    /// step cannot end before the helper was scheduled (on a loaded machine, a time slice), so
    /// the masks are computed first, on this thread (docs/BENCHMARKS.md).
    fn forward_preparing_constraints(&mut self, batch: &RaggedBatch) -> Result<StepLogits, crate::model::ModelError> {
        let pending: Vec<&mut Box<dyn super::constraint::TokenConstraint>> =
            self.sched.running.iter_mut().filter_map(|g| g.constraint.as_mut()).collect();
        let (model, kv) = (&self.model, &mut self.kv);
        if pending.is_empty() {
            return model.forward_step(batch, kv);
        }
        if !self.masks_beside_forward {
            for c in pending {
                // A panic here leaves that mask uncomputed: `allowed` fails the request.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.prepare()));
            }
            return model.forward_step(batch, kv);
        }
        std::thread::scope(|s| {
            let helper = s.spawn(move || {
                for c in pending {
                    c.prepare();
                }
            });
            let result = model.forward_step(batch, kv);
            // A panic in there leaves that mask uncomputed; `allowed` computes it or fails the
            // request when it samples.
            let _ = helper.join();
            result
        })
    }

    /// The ids of the groups in a plan (indices shift as groups finish; ids do not).
    fn group_ids(&self, plan: &[PlannedRow]) -> Vec<u64> {
        self.ids_of(&plan.iter().map(|p| p.group).collect::<Vec<_>>())
    }

    /// The ids of the groups at indices `groups` of the running list, deduplicated.
    fn ids_of(&self, groups: &[usize]) -> Vec<u64> {
        let mut ids: Vec<u64> = groups.iter().map(|&gi| self.sched.running[gi].id).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// A failed step fails every request that was in it (the server stays up); a step that
    /// panicked half-way may have finished some of them already.
    fn fail_groups(&mut self, ids: &[u64], msg: &str) {
        tracing::error!(error = msg, "forward step failed");
        for &id in ids {
            let Some(gi) = self.sched.running.iter().position(|g| g.id == id) else { continue };
            let g = self.sched.finish(gi, &mut self.kv);
            let _ = g.events.send(Event::Error(EngineError::Failed(msg.to_string())));
            record_finish(&g, "error");
        }
    }

    /// Chooses the next token of every group whose rows all have logits (on the host or on the
    /// model's device), and streams it.
    fn sample_ready(&mut self, logits: &StepLogits) {
        let on_device = matches!(logits, StepLogits::Device(_));
        let (mut ready, mut holding) = (Vec::new(), Vec::new());
        for (gi, g) in self.sched.running.iter().enumerate() {
            if g.ready_to_sample() {
                ready.push(gi);
            } else if g.rows.iter().any(|r| matches!(r.logits, Some(RowLogits::InBatch(_)))) {
                holding.push(gi);
            }
        }
        // On a device, only plain sampling runs there; a constraint, logit bias or logprobs
        // need the group's logits on the host.
        let (device_ready, host_ready): (Vec<usize>, Vec<usize>) =
            ready.iter().partition(|&&gi| on_device && !self.sched.running[gi].req.needs_host_choice());
        // Copy out the logits of rows whose partner still prefills, and of host choices.
        let to_host: Vec<usize> = holding.iter().chain(host_ready.iter().filter(|_| on_device)).copied().collect();
        for &gi in &to_host {
            for r in &mut self.sched.running[gi].rows {
                if let Some(RowLogits::InBatch(i)) = r.logits {
                    match logits.last_to_host(i) {
                        Ok(v) => r.logits = Some(RowLogits::Owned(v)),
                        // Every group that points into this step's logits fails with it.
                        Err(e) => {
                            let ids = self.ids_of(&[ready, holding].concat());
                            return self.fail_groups(&ids, &e.to_string());
                        }
                    }
                }
            }
        }
        let mut choices: Vec<(usize, Result<Choice, String>)> = Vec::with_capacity(ready.len());
        if let (StepLogits::Device(d), false) = (logits, device_ready.is_empty()) {
            match super::device_step::choose(d, &mut self.sched.running, &device_ready) {
                Ok(tokens) => choices.extend(
                    device_ready.iter().zip(tokens).map(|(&gi, token)| (gi, Ok(Choice { token, logprobs: None }))),
                ),
                Err(e) => {
                    let ids = self.ids_of(&ready);
                    return self.fail_groups(&ids, &format!("sampling failed: {e}"));
                }
            }
        }
        for gi in host_ready {
            choices.push((gi, self.choose_on_host(gi, logits)));
        }
        let mut finished = Vec::new();
        for (gi, choice) in choices {
            let g = &mut self.sched.running[gi];
            let choice = match choice {
                Ok(c) => c,
                Err(e) => {
                    finished.push((gi, Err(e)));
                    continue;
                }
            };
            let token = choice.token;
            for r in &mut g.rows {
                r.logits = None;
                r.pending.clear();
                r.pending.push(token);
                r.cursor = 0;
            }
            // A complete grammar ends the generation, and wins over a length limit hit at once.
            let complete = g.constraint.as_ref().is_some_and(|c| c.is_complete());
            let ending = match emit_token(g, &self.tokenizer, token, choice.logprobs) {
                None | Some(Ending::Length) if complete => Some(Ending::Complete),
                e => e,
            };
            if let Some(reason) = ending {
                finished.push((gi, Ok(reason)));
            }
        }
        // Remove finished groups from the back so indices stay valid.
        finished.sort_by_key(|&(gi, _)| std::cmp::Reverse(gi));
        for (gi, outcome) in finished {
            let g = self.sched.finish(gi, &mut self.kv);
            match outcome {
                Ok(reason) => finish(g, reason, &self.tokenizer),
                Err(e) => {
                    tracing::warn!(error = %e, "constrained decoding failed");
                    let _ = g.events.send(Event::Error(EngineError::Constraint(e)));
                    record_finish(&g, "error");
                }
            }
        }
    }

    /// The next token of group `gi` on the host: its rows' logits are in the step's host logits
    /// or copied out. A constraint is foreign code (a grammar library): its panic fails this
    /// request only.
    fn choose_on_host(&mut self, gi: usize, logits: &StepLogits) -> Result<Choice, String> {
        fn row_logits<'a>(r: &'a super::sequence::Row, step: &'a StepLogits) -> &'a [f32] {
            match (r.logits.as_ref().expect("ready"), step) {
                (RowLogits::InBatch(i), StepLogits::Host(batch)) => batch.last(*i),
                (RowLogits::Owned(v), _) => v,
                (RowLogits::InBatch(_), StepLogits::Device(_)) => unreachable!("copied to the host first"),
            }
        }
        let g = &mut self.sched.running[gi];
        let cond = row_logits(&g.rows[0], logits);
        let uncond = g.rows.get(1).map(|r| row_logits(r, logits));
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            choose(&g.req, g.constraint.as_deref_mut(), &mut g.rng, cond, uncond, &mut self.scratch)
        }))
        .unwrap_or_else(|_| Err("the output constraint panicked".into()))
    }
}

/// True when a core is free while the forward runs: the model is on a GPU, or the CPU kernel
/// pool uses fewer threads than there are cores.
fn masks_beside_forward(model: &Llama) -> bool {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    !model.device().is_cpu() || crate::model::kernels::pool::global().n_threads() < cores
}

/// Why a group stops, in more detail than the client's [`FinishReason`].
#[derive(Debug, Clone, Copy)]
enum Ending {
    Eos,
    StopString,
    Length,
    /// The output grammar is complete (nothing but end-of-sequence could follow).
    Complete,
}

/// Records a sampled token, streams its text, and says whether the request is done.
fn emit_token(g: &mut Group, tok: &Tokenizer, token: u32, logprobs: Option<Box<TokenLogprobs>>) -> Option<Ending> {
    let now = Instant::now();
    match g.last_token {
        None => {
            g.first_token = Some(now);
            metrics::histogram!(t::TIME_TO_FIRST_TOKEN).record((now - g.arrived).as_secs_f64());
        }
        Some(prev) => metrics::histogram!(t::INTER_TOKEN_LATENCY).record((now - prev).as_secs_f64()),
    }
    g.last_token = Some(now);
    g.generated += 1;
    if !g.req.ignore_eos && tok.is_eos(token) {
        // The end-of-sequence token that ends the generation is no output: no log-probabilities.
        let _ = g.events.send(Event::Token { id: token, text: String::new(), logprobs: None });
        return Some(Ending::Eos);
    }
    let delta = match g.decoder.push(tok, token) {
        Ok(d) => d.unwrap_or_default(),
        Err(e) => {
            tracing::warn!(error = %e, "detokenization failed");
            String::new()
        }
    };
    let (text, stopped) = match g.stop.push(&delta) {
        StopOutcome::Continue(t) => (t, false),
        StopOutcome::Stopped(t) => (t, true),
    };
    let _ = g.events.send(Event::Token { id: token, text, logprobs });
    if stopped {
        return Some(Ending::StopString);
    }
    (g.generated >= g.req.max_tokens).then_some(Ending::Length)
}

/// Sends the last held-back text and the `Finished` event.
fn finish(mut g: Group, ending: Ending, tok: &Tokenizer) {
    let tail = match ending {
        // The stop string ends the text; what was held back belongs to it.
        Ending::StopString => String::new(),
        // Release text held back for an incomplete character or a possible stop string.
        Ending::Eos | Ending::Length | Ending::Complete => {
            let rest = g.decoder.flush(tok).ok().flatten().unwrap_or_default();
            let mut out = match g.stop.push(&rest) {
                StopOutcome::Continue(t) | StopOutcome::Stopped(t) => t,
            };
            out.push_str(&g.stop.flush());
            out
        }
    };
    let reason = match ending {
        Ending::Eos | Ending::StopString | Ending::Complete => FinishReason::Stop,
        Ending::Length => FinishReason::Length,
    };
    if !tail.is_empty() {
        let _ = g.events.send(Event::Token { id: u32::MAX, text: tail, logprobs: None });
    }
    let now = Instant::now();
    let usage = Usage {
        prompt_tokens: g.req.prompt.len(),
        uncond_prompt_tokens: if g.req.is_pair() { g.req.uncond_prompt.as_ref().map_or(0, Vec::len) } else { 0 },
        completion_tokens: g.generated,
        cached_tokens: g.cached_tokens.first().copied().unwrap_or(0),
        uncond_cached_tokens: if g.req.is_pair() { g.cached_tokens.get(1).copied().unwrap_or(0) } else { 0 },
    };
    let timing = Timing {
        queue: g.admitted.map_or(Duration::ZERO, |a| a - g.arrived),
        time_to_first_token: g.first_token.map(|f| f - g.arrived),
        total: now - g.arrived,
    };
    record_finish(&g, reason.as_str());
    let _ = g.events.send(Event::Finished { reason, usage, timing });
}

fn record_finish(g: &Group, reason: &'static str) {
    let tenant = g.req.tenant.clone();
    metrics::counter!(t::REQUESTS, "finished_reason" => reason, "tenant" => tenant).increment(1);
    metrics::counter!(t::PROMPT_TOKENS).increment(g.req.prompt.len() as u64);
    metrics::counter!(t::GENERATION_TOKENS).increment(g.generated as u64);
    let mode = match (g.req.is_pair(), g.req.guidance) {
        (true, Some(guide)) => {
            metrics::histogram!(t::GUIDANCE_GAMMA).record(guide.gamma as f64);
            match guide.mode {
                GuidanceMode::Log => "log",
                GuidanceMode::Prob => "prob",
            }
        }
        _ => "none",
    };
    metrics::counter!(t::GUIDED_REQUESTS, "guidance" => mode).increment(1);
    for name in &g.req.adapter_names {
        metrics::counter!(t::ADAPTER_REQUESTS, "adapter" => name.clone()).increment(1);
    }
    metrics::histogram!(t::E2E_REQUEST_LATENCY).record(g.arrived.elapsed().as_secs_f64());
    if let Some(a) = g.admitted {
        metrics::histogram!(t::REQUEST_QUEUE_TIME).record((a - g.arrived).as_secs_f64());
    }
}
