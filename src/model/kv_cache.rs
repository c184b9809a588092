//! Per-sequence KV caches and the attention that reads them.
//!
//! Two stores, chosen with the backend at load:
//! - **paged** (CPU kernels): each sequence owns a list of fixed-size blocks
//!   ([`attention::BLOCK_TOKENS`] positions, all layers) taken from a shared free list. Growing
//!   never re-copies, freeing returns whole blocks, and memory is accounted per block.
//! - **tensors** (portable candle path, e.g. CUDA): the same block tables over one device tensor
//!   per layer, read and written through index tensors by one batched attention per step
//!   ([`super::kv_tensor`]).
//!
//! The cache also plans each step ([`StepPlan`]): positions of the new tokens, the context
//! limit, and block reservations, all checked before any compute so a failing request cannot
//! leave a half-updated cache.
//!
//! **Prefix cache** (both stores): a sequence added with a [`PrefixSeed`] has each of its full
//! blocks registered under a content key once the step that wrote its last position has
//! committed — never a block still being written, so a writer cancelled or failed mid-prefill
//! leaves nothing shared. The key chains the block's token ids with the key of the block before
//! it, starting from the seed (model, KV dtype, tenant, adapter generations), so equal keys mean
//! equal contents. A new sequence starts with every leading block of its prompt already
//! registered (always leaving its last prompt token to compute, for the logits), shared
//! read-only and reference-counted; blocks no sequence references stay cached and are evicted
//! least recently used, only when memory is needed. Memory counts a shared block once.

use super::batch::{RaggedBatch, SeqId};
use super::kernels::attention::{self, BLOCK_TOKENS, KvDtype, KvGeometry, RopeRows, SeqSpan};
use super::kv_tensor::{self, SpanBlocks, TensorPool, TensorStep};
use super::linear::with_cpu_f32;
use super::{ModelConfig, ModelError, Result, RopeStyle};
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};

/// Content key of a full KV block: a hash chained over the token ids of the block and of every
/// block before it, from a [`PrefixSeed`].
pub type BlockKey = [u8; 32];

/// Where a sequence's block keys start: everything besides token ids that changes what its KV
/// holds (the model and KV dtype, the adapters applied to its row) or who may read it (the
/// tenant). From [`KvCache::prefix_seed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixSeed(BlockKey);

fn chain_key(prev: &BlockKey, tokens: &[u32]) -> BlockKey {
    let mut h = Sha256::new();
    h.update(prev);
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    h.finalize().into()
}

/// Where KV data lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvStoreKind {
    Paged,
    Tensors,
}

/// One paged block: `block_bytes` of f16 or f32 elements (u64 storage for alignment).
type Block = Box<[u64]>;

enum SeqStore {
    Paged(Vec<Block>),
    /// Block ids in the [`TensorPool`].
    Tensors(Vec<u32>),
}

/// A block moved into the prefix cache.
enum BlockData {
    Paged(Block),
    Tensor(u32),
}

struct CachedBlock {
    data: BlockData,
    /// Sequences holding it.
    refs: u32,
    /// When its last reference ended (its key in the LRU list while unreferenced).
    tick: u64,
}

/// A sequence's position in the key chain.
struct PrefixChain {
    /// Key of its last registered block (the seed before the first).
    key: BlockKey,
    /// Tokens cached after the last registered block (fewer than a block).
    tail: Vec<u32>,
}

struct SeqEntry {
    /// Positions already in the cache.
    len: usize,
    /// Leading blocks shared through the prefix cache, in position order (before `store`'s).
    shared: Vec<BlockKey>,
    /// The sequence's own blocks, after the shared ones.
    store: SeqStore,
    /// Set for sequences that take part in prefix caching.
    chain: Option<PrefixChain>,
    /// Positions the sequence was admitted to grow to ([`KvCache::committed_bytes`]).
    target: usize,
}

impl SeqEntry {
    fn held_blocks(&self) -> usize {
        self.shared.len()
            + match &self.store {
                SeqStore::Paged(b) => b.len(),
                SeqStore::Tensors(b) => b.len(),
            }
    }
}

/// Counters and sizes of the prefix cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Blocks in the cache, referenced or not.
    pub blocks: usize,
    /// Of which referenced by a live sequence.
    pub referenced_blocks: usize,
    pub bytes: usize,
    /// Bytes of the unreferenced ones (evicted when memory is needed).
    pub evictable_bytes: usize,
    /// Prompt tokens looked up (sequences added with a seed).
    pub query_tokens: u64,
    /// Prompt tokens served from cached blocks instead of computed.
    pub hit_tokens: u64,
    /// Blocks evicted for memory.
    pub evicted_blocks: u64,
}

/// The KV caches of every live sequence of one model.
pub struct KvCache {
    geo: KvGeometry,
    kind: KvStoreKind,
    device: Device,
    max_context: usize,
    /// Byte budget for KV data (all sequences).
    limit_bytes: usize,
    used_bytes: usize,
    seqs: HashMap<SeqId, SeqEntry>,
    next_id: u64,
    /// Freed paged blocks kept for reuse (bounded), so steady-state decoding does not allocate.
    free_blocks: Vec<Block>,
    /// The device pools of the tensor store.
    pool: Option<TensorPool>,
    /// Whether [`Self::prefix_seed`] hands out seeds (prefix caching on).
    prefix_enabled: bool,
    /// What the model and dtype contribute to every seed.
    fingerprint: BlockKey,
    cached: HashMap<BlockKey, CachedBlock>,
    /// Unreferenced cached blocks, least recently used first.
    lru: BTreeMap<u64, BlockKey>,
    tick: u64,
    stats: PrefixCacheStats,
}

/// The sizing rule of a [`KvCache`] (see [`KvCache::sizing`]).
#[derive(Debug, Clone, Copy)]
pub struct KvSizing {
    block_bytes: usize,
}

impl KvSizing {
    /// Bytes one sequence of `n` positions occupies (whole blocks).
    pub fn bytes_for_tokens(&self, n: usize) -> usize {
        n.div_ceil(BLOCK_TOKENS) * self.block_bytes
    }
}

/// A step's layout, computed before the forward.
pub struct StepPlan {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    /// Per batch entry: (sequence, first position, number of tokens, first packed row).
    pub spans: Vec<(SeqId, usize, usize, usize)>,
    /// Packed rows whose logits are returned, in output order.
    pub logit_rows: Vec<u32>,
    /// For each entry, its range in `logit_rows`.
    pub logit_ranges: Vec<std::ops::Range<usize>>,
    /// The tensor store's index tensors for this step.
    pub tensors: Option<TensorStep>,
}

impl KvCache {
    /// `dtype` applies as given to the paged store; the tensor store keeps f32 or f16 (for
    /// `Q8`, an int8 layout of the CPU kernels).
    pub fn new(cfg: &ModelConfig, kind: KvStoreKind, device: Device, limit_bytes: usize, dtype: KvDtype) -> Self {
        let dtype = match (kind, dtype) {
            (KvStoreKind::Tensors, KvDtype::Q8) => KvDtype::F16,
            (_, d) => d,
        };
        let geo = KvGeometry {
            n_layers: cfg.n_layers,
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
            dtype,
        };
        let pool = (kind == KvStoreKind::Tensors).then(|| {
            let dt = if dtype == KvDtype::F32 { DType::F32 } else { DType::F16 };
            TensorPool::new(geo, dt, device.clone())
        });
        // The cache lives and dies with one loaded model; the fingerprint still keeps keys of
        // different models and layouts apart should caches ever be shared or persisted.
        let fingerprint: BlockKey = Sha256::digest(format!("lethe-kv-v1 {cfg:?} {dtype:?} {kind:?}")).into();
        Self {
            geo,
            kind,
            device,
            max_context: cfg.max_context,
            limit_bytes,
            used_bytes: 0,
            seqs: HashMap::new(),
            next_id: 1,
            free_blocks: Vec::new(),
            pool,
            prefix_enabled: true,
            fingerprint,
            cached: HashMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            stats: PrefixCacheStats::default(),
        }
    }

    /// Turns prefix caching on or off (on by default): off, [`Self::prefix_seed`] gives no
    /// seed, so no sequence shares or registers blocks.
    pub fn set_prefix_caching(&mut self, on: bool) {
        self.prefix_enabled = on;
    }
    pub fn prefix_caching(&self) -> bool {
        self.prefix_enabled
    }

    /// The seed of the block keys of a row run by `tenant` with adapters of these generations
    /// (content hashes, in the order they are applied); `None` when prefix caching is off.
    pub fn prefix_seed(&self, tenant: &str, adapter_generations: &[&str]) -> Option<PrefixSeed> {
        if !self.prefix_enabled {
            return None;
        }
        let mut h = Sha256::new();
        h.update(self.fingerprint);
        // Length-prefixed parts: no two different lists hash the same bytes.
        for part in std::iter::once(tenant).chain(adapter_generations.iter().copied()) {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        Some(PrefixSeed(h.finalize().into()))
    }

    /// Keys of the leading blocks of `prompt` that are cached, leaving at least its last token
    /// out (its logits must be computed).
    fn cached_prefix(&self, start: &BlockKey, prompt: &[u32]) -> Vec<BlockKey> {
        let mut keys = Vec::new();
        let mut prev = *start;
        for block in prompt[..prompt.len().saturating_sub(1)].chunks_exact(BLOCK_TOKENS) {
            let key = chain_key(&prev, block);
            if !self.cached.contains_key(&key) {
                break;
            }
            keys.push(key);
            prev = key;
        }
        keys
    }

    /// Takes a reference on cached block `key`.
    fn retain(&mut self, key: &BlockKey) {
        let c = self.cached.get_mut(key).expect("a cached block");
        if c.refs == 0 {
            self.lru.remove(&c.tick);
        }
        c.refs += 1;
    }

    /// Drops a reference on cached block `key`: unreferenced, it becomes the most recently used
    /// candidate for eviction.
    fn release(&mut self, key: &BlockKey) {
        let c = self.cached.get_mut(key).expect("a cached block");
        c.refs -= 1;
        if c.refs == 0 {
            self.tick += 1;
            c.tick = self.tick;
            self.lru.insert(self.tick, *key);
        }
    }

    /// Registers a new sequence that will grow to at most `target` positions. With a seed, it
    /// takes part in prefix caching and starts with the cached leading blocks of `prompt`;
    /// returns its id and how many positions of `prompt` are already cached (a multiple of the
    /// block size, less than `prompt.len()`): the caller runs only the rest.
    pub fn add_sequence_cached(&mut self, seed: Option<PrefixSeed>, prompt: &[u32], target: usize) -> (SeqId, usize) {
        let id = self.add_sequence();
        let Some(PrefixSeed(seed)) = seed else {
            self.seqs.get_mut(&id).expect("just added").target = target;
            return (id, 0);
        };
        let keys = self.cached_prefix(&seed, prompt);
        keys.iter().for_each(|k| self.retain(k));
        let cached = keys.len() * BLOCK_TOKENS;
        self.stats.query_tokens += prompt.len() as u64;
        self.stats.hit_tokens += cached as u64;
        let e = self.seqs.get_mut(&id).expect("just added");
        e.chain = Some(PrefixChain { key: keys.last().copied().unwrap_or(seed), tail: Vec::new() });
        e.shared = keys;
        e.len = cached;
        e.target = target;
        (id, cached)
    }

    /// Extends a sequence that has nothing of its own yet (a prompt whose next blocks another
    /// sequence has just computed) with the cached leading blocks of `next`, its tokens still
    /// to run, again leaving the last one. Returns the positions gained (0 when it holds
    /// blocks of its own, takes no part in prefix caching, or nothing is cached).
    pub fn extend_cached(&mut self, id: SeqId, next: &[u32]) -> usize {
        let Some(e) = self.seqs.get(&id) else { return 0 };
        let own = e.held_blocks() - e.shared.len();
        let Some(chain) = e.chain.as_ref().filter(|c| c.tail.is_empty() && own == 0) else { return 0 };
        let keys = self.cached_prefix(&chain.key, next);
        if keys.is_empty() {
            return 0;
        }
        keys.iter().for_each(|k| self.retain(k));
        let gained = keys.len() * BLOCK_TOKENS;
        self.stats.hit_tokens += gained as u64;
        let e = self.seqs.get_mut(&id).expect("checked");
        e.chain.as_mut().expect("checked").key = *keys.last().expect("not empty");
        e.shared.extend(keys);
        e.len += gained;
        gained
    }

    /// KV bytes admission must count as taken: every block a live sequence holds (a shared one
    /// once), plus what each sequence may still allocate up to its target. Unreferenced cached
    /// blocks are not counted: they are evicted when the memory is needed.
    pub fn committed_bytes(&self) -> usize {
        let referenced = self.cached.len() - self.lru.len();
        let own_and_growth: usize = self
            .seqs
            .values()
            .map(|e| {
                (e.held_blocks() - e.shared.len()) + e.target.div_ceil(BLOCK_TOKENS).saturating_sub(e.held_blocks())
            })
            .sum();
        (referenced + own_and_growth) * self.block_bytes()
    }

    /// What admitting rows `(seed, prompt, target positions)` adds to [`Self::committed_bytes`]:
    /// their whole targets, less the cached leading blocks that are already referenced (by a
    /// live sequence or an earlier row of the list).
    pub fn admission_bytes(&self, rows: &[(Option<PrefixSeed>, &[u32], usize)]) -> usize {
        let mut counted = HashSet::new();
        let mut blocks = 0;
        for (seed, prompt, target) in rows {
            let keys = seed.map(|PrefixSeed(s)| self.cached_prefix(&s, prompt)).unwrap_or_default();
            let free = keys.iter().filter(|k| self.cached[*k].refs > 0 || !counted.insert(**k)).count();
            blocks += target.div_ceil(BLOCK_TOKENS).saturating_sub(free);
        }
        blocks * self.block_bytes()
    }

    pub fn prefix_stats(&self) -> PrefixCacheStats {
        PrefixCacheStats {
            blocks: self.cached.len(),
            referenced_blocks: self.cached.len() - self.lru.len(),
            bytes: self.cached.len() * self.block_bytes(),
            evictable_bytes: self.lru.len() * self.block_bytes(),
            ..self.stats
        }
    }

    /// References held on cached block `key` (0 when unreferenced; `None` when not cached).
    pub fn block_refs(&self, key: &BlockKey) -> Option<u32> {
        self.cached.get(key).map(|c| c.refs)
    }

    /// The keys of the cached leading blocks of `prompt` under `seed` (tests, diagnostics).
    pub fn cached_blocks_of(&self, seed: PrefixSeed, prompt: &[u32]) -> Vec<BlockKey> {
        let mut all = prompt.to_vec();
        all.push(0);
        self.cached_prefix(&seed.0, &all)
    }

    /// Evicts unreferenced cached blocks, least recently used first, until `bytes` more fit
    /// under the limit. False (nothing evicted) when even evicting all of them would not do.
    fn make_room(&mut self, bytes: usize) -> bool {
        let bb = self.block_bytes();
        let over = (self.used_bytes + bytes).saturating_sub(self.limit_bytes);
        if over > self.lru.len() * bb {
            return false;
        }
        while self.used_bytes + bytes > self.limit_bytes {
            self.evict_one();
        }
        true
    }

    fn evict_one(&mut self) -> bool {
        let Some((_, key)) = self.lru.pop_first() else { return false };
        let block = self.cached.remove(&key).expect("LRU entries are cached");
        self.free_block(block.data);
        self.stats.evicted_blocks += 1;
        true
    }

    /// Evicts every unreferenced cached block; returns how many.
    pub fn evict_unreferenced(&mut self) -> usize {
        let mut n = 0;
        while self.evict_one() {
            n += 1;
        }
        n
    }

    fn free_block(&mut self, data: BlockData) {
        self.used_bytes -= self.block_bytes();
        match data {
            BlockData::Paged(b) => {
                if self.free_blocks.len() < 64 {
                    self.free_blocks.push(b);
                }
            }
            BlockData::Tensor(id) => self.pool.as_mut().expect("tensor pool").release([id]),
        }
    }

    /// Registers the full blocks of `id` completed by committed tokens, in order: each moves
    /// into the prefix cache, or, when another sequence registered the same content meanwhile,
    /// is freed and the cached one is shared instead.
    fn register_full_blocks(&mut self, id: SeqId) {
        loop {
            let Some(e) = self.seqs.get_mut(&id) else { return };
            let Some(chain) = e.chain.as_mut().filter(|c| c.tail.len() >= BLOCK_TOKENS) else { return };
            let key = chain_key(&chain.key, &chain.tail[..BLOCK_TOKENS]);
            chain.tail.drain(..BLOCK_TOKENS);
            chain.key = key;
            // The block just completed is the first of the sequence's own.
            let data = match &mut e.store {
                SeqStore::Paged(b) => BlockData::Paged(b.remove(0)),
                SeqStore::Tensors(b) => BlockData::Tensor(b.remove(0)),
            };
            e.shared.push(key);
            if let std::collections::hash_map::Entry::Vacant(v) = self.cached.entry(key) {
                v.insert(CachedBlock { data, refs: 1, tick: 0 });
            } else {
                self.free_block(data);
                self.retain(&key);
            }
        }
    }

    /// Bytes of one position across all layers (k and v).
    pub fn bytes_per_token(&self) -> usize {
        self.geo.n_layers * 2 * self.geo.n_kv_heads * self.geo.head_dim * self.geo.dtype.size()
    }
    pub fn dtype(&self) -> KvDtype {
        self.geo.dtype
    }
    /// Bytes one sequence of `n` positions occupies (whole blocks).
    pub fn bytes_for_tokens(&self, n: usize) -> usize {
        self.sizing().bytes_for_tokens(n)
    }

    /// How this cache sizes sequences, detached from it: what a request will need can then be
    /// checked where the cache is not (the engine's submit path), by the same rule admission uses.
    pub fn sizing(&self) -> KvSizing {
        KvSizing { block_bytes: self.block_bytes() }
    }
    fn block_bytes(&self) -> usize {
        self.geo.block_bytes()
    }
    /// Bytes currently held by live sequences.
    pub fn used_bytes(&self) -> usize {
        self.used_bytes
    }
    pub fn limit_bytes(&self) -> usize {
        self.limit_bytes
    }
    pub fn n_sequences(&self) -> usize {
        self.seqs.len()
    }
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// Registers a new, empty sequence.
    pub fn add_sequence(&mut self) -> SeqId {
        let id = SeqId(self.next_id);
        self.next_id += 1;
        let store = match self.kind {
            KvStoreKind::Paged => SeqStore::Paged(Vec::new()),
            KvStoreKind::Tensors => SeqStore::Tensors(Vec::new()),
        };
        self.seqs.insert(id, SeqEntry { len: 0, shared: Vec::new(), store, chain: None, target: 0 });
        id
    }

    /// Frees a sequence and its memory; its shared blocks stay cached. Unknown ids are ignored
    /// (freeing is idempotent).
    pub fn remove_sequence(&mut self, id: SeqId) {
        let Some(entry) = self.seqs.remove(&id) else {
            return;
        };
        for key in &entry.shared {
            self.release(key);
        }
        self.used_bytes -= self.entry_bytes(&entry);
        match entry.store {
            SeqStore::Paged(blocks) => {
                // Keep a few blocks around for the next sequences; return the rest to the allocator.
                let keep = 64usize.saturating_sub(self.free_blocks.len());
                self.free_blocks.extend(blocks.into_iter().take(keep));
            }
            SeqStore::Tensors(blocks) => self.pool.as_mut().expect("tensor pool").release(blocks),
        }
    }

    /// Positions already cached for `id`.
    pub fn seq_len(&self, id: SeqId) -> Result<usize> {
        self.seqs.get(&id).map(|e| e.len).ok_or(ModelError::UnknownSequence(id))
    }

    /// Bytes of the sequence's own blocks (its shared ones belong to the prefix cache).
    fn entry_bytes(&self, e: &SeqEntry) -> usize {
        (e.held_blocks() - e.shared.len()) * self.block_bytes()
    }

    /// Validates a batch, reserves cache space for it and lays it out. Nothing is modified if
    /// this fails, except that reserved blocks stay with their (still valid) sequences.
    pub fn plan(&mut self, batch: &RaggedBatch) -> Result<StepPlan> {
        if batch.is_empty() {
            return Err(ModelError::InvalidBatch("empty batch".into()));
        }
        let mut seen = std::collections::HashSet::new();
        let mut extra_bytes = 0;
        for e in &batch.entries {
            if e.tokens.is_empty() {
                return Err(ModelError::InvalidBatch(format!("no tokens for {:?}", e.seq)));
            }
            if !seen.insert(e.seq) {
                return Err(ModelError::InvalidBatch(format!("{:?} appears twice", e.seq)));
            }
            let entry = self.seqs.get(&e.seq).ok_or(ModelError::UnknownSequence(e.seq))?;
            let needed = entry.len + e.tokens.len();
            if needed > self.max_context {
                return Err(ModelError::ContextOverflow { needed, max: self.max_context });
            }
            extra_bytes += self.growth_bytes(entry, needed);
        }
        if !self.make_room(extra_bytes) {
            return Err(ModelError::KvCacheFull {
                needed: extra_bytes,
                free: (self.limit_bytes + self.lru.len() * self.block_bytes()).saturating_sub(self.used_bytes),
                limit: self.limit_bytes,
            });
        }
        let mut plan = StepPlan {
            tokens: Vec::with_capacity(batch.n_tokens()),
            positions: Vec::with_capacity(batch.n_tokens()),
            spans: Vec::with_capacity(batch.entries.len()),
            logit_rows: Vec::new(),
            logit_ranges: Vec::new(),
            tensors: None,
        };
        for e in &batch.entries {
            let start = self.seqs[&e.seq].len;
            let row = plan.tokens.len();
            self.reserve(e.seq, start + e.tokens.len())?;
            plan.spans.push((e.seq, start, e.tokens.len(), row));
            plan.tokens.extend_from_slice(&e.tokens);
            plan.positions.extend((start..start + e.tokens.len()).map(|p| p as u32));
            let first = plan.logit_rows.len();
            if e.all_logits {
                plan.logit_rows.extend((row..row + e.tokens.len()).map(|r| r as u32));
            } else {
                plan.logit_rows.push((row + e.tokens.len() - 1) as u32);
            }
            plan.logit_ranges.push(first..plan.logit_rows.len());
        }
        if self.kind == KvStoreKind::Tensors {
            plan.tensors = Some(self.tensor_step(&plan)?);
        }
        Ok(plan)
    }

    /// The tensor store's index tensors for a planned step (blocks already reserved).
    fn tensor_step(&self, plan: &StepPlan) -> Result<TensorStep> {
        let mut tables = Vec::with_capacity(plan.spans.len());
        for &(seq, ..) in &plan.spans {
            let entry = self.seqs.get(&seq).ok_or(ModelError::UnknownSequence(seq))?;
            let SeqStore::Tensors(own) = &entry.store else { unreachable!("tensor store") };
            let shared = entry.shared.iter().map(|k| match self.cached[k].data {
                BlockData::Tensor(b) => b,
                BlockData::Paged(_) => unreachable!("tensor store"),
            });
            tables.push(shared.chain(own.iter().copied()).collect::<Vec<u32>>());
        }
        let spans: Vec<SpanBlocks> = plan
            .spans
            .iter()
            .zip(&tables)
            .map(|(&(_, start, len, row), blocks)| SpanBlocks { start, len, row, blocks })
            .collect();
        TensorStep::new(&self.geo, &spans, plan.tokens.len(), &self.device)
    }

    fn growth_bytes(&self, e: &SeqEntry, needed: usize) -> usize {
        needed.div_ceil(BLOCK_TOKENS).saturating_sub(e.held_blocks()) * self.block_bytes()
    }

    fn reserve(&mut self, id: SeqId, needed: usize) -> Result<()> {
        let block_words = self.block_bytes() / 8;
        let block_bytes = self.block_bytes();
        let entry = self.seqs.get_mut(&id).ok_or(ModelError::UnknownSequence(id))?;
        let shared = entry.shared.len();
        match &mut entry.store {
            SeqStore::Paged(blocks) => {
                while (shared + blocks.len()) * BLOCK_TOKENS < needed {
                    let block = self.free_blocks.pop().unwrap_or_else(|| vec![0u64; block_words].into_boxed_slice());
                    blocks.push(block);
                    self.used_bytes += block_bytes;
                }
            }
            SeqStore::Tensors(blocks) => {
                let pool = self.pool.as_mut().expect("tensor pool");
                while (shared + blocks.len()) * BLOCK_TOKENS < needed {
                    blocks.push(pool.alloc()?);
                    self.used_bytes += block_bytes;
                }
            }
        }
        Ok(())
    }

    /// Marks the planned tokens as cached (after a successful forward), and registers the
    /// blocks they completed in the prefix cache.
    pub fn commit(&mut self, plan: &StepPlan) {
        for &(seq, start, len, row) in &plan.spans {
            if let Some(e) = self.seqs.get_mut(&seq) {
                e.len = start + len;
                if let Some(chain) = e.chain.as_mut() {
                    chain.tail.extend_from_slice(&plan.tokens[row..row + len]);
                    if chain.tail.len() >= BLOCK_TOKENS {
                        self.register_full_blocks(seq);
                    }
                }
            }
        }
    }

    /// Attention for one layer: stores the new k/v rows of `qkv` (`[rows, q + 2·kv]`) in the
    /// caches (rotated) and returns `[rows, n_heads·head_dim]`.
    pub fn attention(&mut self, layer: usize, qkv: &Tensor, plan: &StepPlan, rope: &StepRope) -> Result<Tensor> {
        match self.kind {
            KvStoreKind::Paged => self.paged_attention(layer, qkv, plan, rope),
            KvStoreKind::Tensors => self.tensor_attention(layer, qkv, plan, rope),
        }
    }

    fn paged_attention(&mut self, layer: usize, qkv: &Tensor, plan: &StepPlan, rope: &StepRope) -> Result<Tensor> {
        let rows = plan.tokens.len();
        let q_dim = self.geo.n_heads * self.geo.head_dim;
        // Each planned sequence's own blocks, borrowed exclusively for the kernel; its shared
        // ones read-only.
        let cached = &self.cached;
        let mut stores: HashMap<SeqId, (&Vec<BlockKey>, &mut Vec<Block>)> = self
            .seqs
            .iter_mut()
            .filter_map(|(id, e)| match &mut e.store {
                SeqStore::Paged(blocks) => Some((*id, (&e.shared, blocks))),
                _ => None,
            })
            .collect();
        let mut spans = Vec::with_capacity(plan.spans.len());
        for &(seq, start, len, row) in &plan.spans {
            let (shared, blocks) = stores.remove(&seq).ok_or(ModelError::UnknownSequence(seq))?;
            let shared = shared
                .iter()
                .map(|k| match &cached[k].data {
                    BlockData::Paged(b) => &b[..],
                    BlockData::Tensor(_) => unreachable!("paged store"),
                })
                .collect();
            spans.push(SeqSpan { shared, blocks: blocks.iter_mut().map(|b| &mut b[..]).collect(), start, len, row });
        }
        let mut out = vec![0f32; rows * q_dim];
        let qkv = qkv.contiguous()?;
        with_cpu_f32(&qkv, |data| {
            attention::paged_attention(&self.geo, layer, data, &mut spans, &rope.host, &mut out)
        })?;
        Ok(Tensor::from_vec(out, (rows, q_dim), &Device::Cpu)?)
    }

    /// The portable path: candle ops over the whole step at once.
    fn tensor_attention(&mut self, layer: usize, qkv: &Tensor, plan: &StepPlan, rope: &StepRope) -> Result<Tensor> {
        let step =
            plan.tensors.as_ref().ok_or_else(|| ModelError::InvalidBatch("step planned for another store".into()))?;
        kv_tensor::attention(self.pool.as_ref().expect("tensor pool"), layer, qkv, step, rope)
    }
}

/// Rotary tables for the rows of one step, shared by all layers.
pub struct StepRope {
    pub host: RopeRows,
    /// `(cos, sin)` as `[rows, head_dim/2]` tensors on the model's device (tensor store only).
    pub tensors: Option<(Tensor, Tensor)>,
}

impl StepRope {
    pub fn new(
        positions: &[u32],
        inv_freqs: &[f32],
        style: RopeStyle,
        kind: KvStoreKind,
        device: &Device,
    ) -> Result<Self> {
        let host = RopeRows::new(positions, inv_freqs, style);
        let tensors = match kind {
            KvStoreKind::Paged => None,
            KvStoreKind::Tensors => {
                let shape = (positions.len(), host.half);
                Some((Tensor::from_slice(&host.cos, shape, device)?, Tensor::from_slice(&host.sin, shape, device)?))
            }
        };
        Ok(Self { host, tensors })
    }
}
