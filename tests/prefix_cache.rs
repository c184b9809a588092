//! Automatic prefix caching on tiny random models: cached and uncached runs give the same
//! logits whatever the sharing, cancellations and evictions; references and memory return to
//! zero; keys keep adapter generations and tenants apart; the engine reports cached tokens.

mod common;

use lethe::adapters::peft;
use lethe::engine::{EngineConfig, EngineHandle, Event, Request, RequestStream, SchedulerConfig, Usage};
use lethe::fixtures::{PeftSpec, TempDir, TinySpec, write_peft_adapter, write_tiny_model};
use lethe::loader::ModelBundle;
use lethe::model::kv_cache::PrefixSeed;
use lethe::model::lora::LoraWeights;
use lethe::model::{BatchEntry, KvCache, Llama, RaggedBatch, SeqId};
use proptest::prelude::*;
use std::sync::{Arc, OnceLock};

/// Positions per KV block.
const BLOCK: usize = 16;

struct Tiny {
    _dir: TempDir,
    bundle: ModelBundle,
    spec: TinySpec,
}

fn tiny() -> &'static Tiny {
    static T: OnceLock<Tiny> = OnceLock::new();
    T.get_or_init(|| {
        let dir = TempDir::new("prefix").unwrap();
        let spec = TinySpec::default();
        let path = write_tiny_model(&dir.path().join("m"), &spec).unwrap();
        let bundle = ModelBundle::load(&path, &common::load_options(), None).unwrap();
        Tiny { _dir: dir, bundle, spec }
    })
}

/// Logits of the last position of `tokens`, computed in one pass in a fresh cache (no prefix
/// caching).
fn uncached_last_logits(m: &Llama, tokens: &[u32]) -> Vec<f32> {
    let mut kv = m.new_kv_cache(64 << 20);
    let s = kv.add_sequence();
    m.forward(&RaggedBatch::new(vec![BatchEntry::last(s, tokens.to_vec())]), &mut kv).unwrap().last(0).to_vec()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// What the tiny model's logits may differ by between a cached and an uncached run: the native
/// kernels compute every row on its own and attention does not depend on how a prompt was cut
/// into steps, so none (bit-identical); candle (the portable backend) sums in other orders.
fn tolerance(m: &Llama) -> f32 {
    if m.is_native() { 0.0 } else { 1e-4 }
}

#[derive(Debug, Clone)]
enum Op {
    /// A new sequence: shared prefix `prefix` (of 3) cut to `prefix_len`, then `suffix_len`
    /// tokens of its own, under tenant `tenant` (of 2).
    Start { prefix: usize, prefix_len: usize, suffix_len: usize, tenant: usize, salt: u32 },
    /// One forward: every live sequence runs up to `chunk` of its remaining tokens.
    Step { chunk: usize },
    /// A live sequence goes away (cancelled), whatever it has computed.
    Cancel(usize),
    /// Drop every unreferenced cached block.
    Evict,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..3usize, 0..90usize, 1..30usize, 0..2usize, any::<u32>())
            .prop_map(|(prefix, prefix_len, suffix_len, tenant, salt)| Op::Start { prefix, prefix_len, suffix_len, tenant, salt }),
        6 => (1..48usize).prop_map(|chunk| Op::Step { chunk }),
        1 => (0..8usize).prop_map(Op::Cancel),
        1 => Just(Op::Evict),
    ]
}

struct Live {
    seq: SeqId,
    tokens: Vec<u32>,
    done: usize,
}

/// Runs `ops` on one cache; every sequence that completes is checked against the uncached run.
fn run_ops(m: &Llama, ops: &[Op], limit_blocks: usize) -> Result<usize, TestCaseError> {
    let vocab = m.config().vocab_size as u32;
    let prefixes: Vec<Vec<u32>> = (0..3u32).map(|p| (0..90).map(|i| (i * 7 + p * 31 + 3) % vocab).collect()).collect();
    let mut kv: KvCache = m.new_kv_cache(0);
    let block_bytes = kv.bytes_for_tokens(1);
    kv = m.new_kv_cache(limit_blocks * block_bytes);
    let seeds: Vec<PrefixSeed> = ["a", "b"].iter().map(|t| kv.prefix_seed(t, &[]).unwrap()).collect();
    let tol = tolerance(m);
    let mut live: Vec<Live> = Vec::new();
    let mut hits = 0;
    for op in ops {
        match op {
            Op::Start { prefix, prefix_len, suffix_len, tenant, salt } => {
                let mut tokens = prefixes[*prefix][..*prefix_len].to_vec();
                tokens.extend((0..*suffix_len as u32).map(|i| (salt.wrapping_add(i * 13)) % vocab));
                let target = tokens.len();
                let spec = [(Some(seeds[*tenant]), tokens.as_slice(), target)];
                // Admission as the scheduler does it: only what fits under the limit.
                if kv.committed_bytes() + kv.admission_bytes(&spec) > kv.limit_bytes() {
                    continue;
                }
                let (seq, cached) = kv.add_sequence_cached(Some(seeds[*tenant]), &tokens, target);
                prop_assert!(cached % BLOCK == 0 && cached < tokens.len());
                hits += cached;
                live.push(Live { seq, tokens, done: cached });
            }
            Op::Step { chunk } => {
                // Sequences with nothing of their own take what others cached since (engine).
                for l in &mut live {
                    l.done += kv.extend_cached(l.seq, &l.tokens[l.done..]);
                }
                if live.is_empty() {
                    continue;
                }
                let entries = live
                    .iter()
                    .map(|l| BatchEntry::last(l.seq, l.tokens[l.done..(l.done + chunk).min(l.tokens.len())].to_vec()))
                    .collect();
                let logits =
                    m.forward(&RaggedBatch::new(entries), &mut kv).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let mut finished = Vec::new();
                for (i, l) in live.iter_mut().enumerate() {
                    l.done = (l.done + chunk).min(l.tokens.len());
                    if l.done == l.tokens.len() {
                        let want = uncached_last_logits(m, &l.tokens);
                        let d = max_diff(logits.last(i), &want);
                        prop_assert!(d <= tol, "{} tokens: cached vs uncached logits differ by {d}", l.tokens.len());
                        finished.push(i);
                    }
                }
                for i in finished.into_iter().rev() {
                    kv.remove_sequence(live.remove(i).seq);
                }
            }
            Op::Cancel(i) => {
                if !live.is_empty() {
                    kv.remove_sequence(live.remove(i % live.len()).seq);
                }
            }
            Op::Evict => {
                kv.evict_unreferenced();
            }
        }
        prop_assert!(kv.used_bytes() <= kv.limit_bytes());
        prop_assert!(kv.committed_bytes() <= kv.limit_bytes());
    }
    for l in live.drain(..) {
        kv.remove_sequence(l.seq);
    }
    let stats = kv.prefix_stats();
    prop_assert_eq!(stats.referenced_blocks, 0, "references left after every sequence ended");
    prop_assert_eq!(kv.committed_bytes(), 0);
    prop_assert_eq!(kv.used_bytes(), stats.bytes, "only unreferenced cached blocks remain");
    prop_assert_eq!(stats.hit_tokens as usize >= hits, true);
    kv.evict_unreferenced();
    prop_assert_eq!(kv.used_bytes(), 0, "memory back to baseline");
    prop_assert_eq!(kv.prefix_stats().blocks, 0);
    Ok(hits)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random requests sharing prefixes, interleaved steps, cancellations and evictions, with a
    /// memory limit that forces LRU eviction: every completed sequence's logits equal the
    /// uncached run; references and memory return to zero.
    #[test]
    fn cached_runs_equal_uncached_runs(ops in proptest::collection::vec(op(), 1..40), limit_blocks in 24..64usize) {
        run_ops(&tiny().bundle.model, &ops, limit_blocks)?;
    }
}

/// The property's machinery does share: a fixed sequence with hits, a cancellation mid-prefill
/// and an eviction.
#[test]
fn fixed_sequence_shares_and_checks() {
    let start = |prefix_len, salt| Op::Start { prefix: 0, prefix_len, suffix_len: 9, tenant: 0, salt };
    let ops = [
        start(80, 1),
        Op::Step { chunk: 40 },
        start(85, 2),
        Op::Step { chunk: 40 },
        start(70, 3),
        Op::Step { chunk: 7 },
        Op::Cancel(2),
        Op::Step { chunk: 40 },
        Op::Step { chunk: 40 },
        Op::Evict,
        start(60, 4),
        Op::Step { chunk: 80 },
    ];
    let hits = run_ops(&tiny().bundle.model, &ops, 64).unwrap();
    // The second prompt finds the first's 2 blocks computed so far, the third 4 (the rest
    // differs); the last comes after an eviction of everything unreferenced: none.
    assert_eq!(hits, 32 + 64);
}

#[test]
fn a_second_identical_prompt_reuses_every_full_block_but_the_last_token() {
    let m = &tiny().bundle.model;
    let mut kv = m.new_kv_cache(64 << 20);
    let seed = kv.prefix_seed("t", &[]);
    let prompt: Vec<u32> = (0..50).map(|i| (i * 3 + 1) % 300).collect();
    let (a, cached) = kv.add_sequence_cached(seed, &prompt, 60);
    assert_eq!(cached, 0);
    m.forward(&RaggedBatch::new(vec![BatchEntry::last(a, prompt.clone())]), &mut kv).unwrap();
    // Admission counts the shared blocks once: a holds them, b needs only its 4th of 4.
    let block = kv.bytes_for_tokens(1);
    assert_eq!(kv.committed_bytes(), 4 * block);
    assert_eq!(kv.admission_bytes(&[(seed, &prompt, 60)]), block);
    assert_eq!(kv.admission_bytes(&[(None, &prompt, 60)]), 4 * block, "no seed: no sharing");
    let (b, cached) = kv.add_sequence_cached(seed, &prompt, 60);
    assert_eq!(cached, 48, "3 full blocks of 50 tokens");
    assert_eq!(kv.committed_bytes(), 5 * block);
    let keys = kv.cached_blocks_of(seed.unwrap(), &prompt);
    assert_eq!(keys.len(), 3);
    assert!(keys.iter().all(|k| kv.block_refs(k) == Some(2)), "shared by both sequences");
    // Exactly 48 tokens: the last block is not taken (its last token must be computed).
    let (c, cached) = kv.add_sequence_cached(seed, &prompt[..48], 60);
    assert_eq!(cached, 32);
    for s in [a, b, c] {
        kv.remove_sequence(s);
    }
    assert!(keys.iter().all(|k| kv.block_refs(k) == Some(0)), "unreferenced, still cached");
    // Off: no seed, nothing shared.
    kv.set_prefix_caching(false);
    assert_eq!(kv.prefix_seed("t", &[]), None);
    let (d, cached) = kv.add_sequence_cached(None, &prompt, 60);
    assert_eq!(cached, 0);
    kv.remove_sequence(d);
}

/// A tenant's blocks are keyed by its name: another tenant with the very same prompt and
/// adapters computes its own and never reads them.
#[test]
fn tenants_never_share_blocks() {
    let m = &tiny().bundle.model;
    let mut kv = m.new_kv_cache(64 << 20);
    let prompt: Vec<u32> = (0..40).map(|i| (i * 5 + 2) % 300).collect();
    let (sa, sb) = (kv.prefix_seed("alice", &["g1"]), kv.prefix_seed("bob", &["g1"]));
    assert_ne!(sa, sb);
    let (a, _) = kv.add_sequence_cached(sa, &prompt, 41);
    m.forward(&RaggedBatch::new(vec![BatchEntry::last(a, prompt.clone())]), &mut kv).unwrap();
    assert_eq!(kv.cached_blocks_of(sa.unwrap(), &prompt).len(), 2);
    assert!(kv.cached_blocks_of(sb.unwrap(), &prompt).is_empty(), "bob's keys find none of alice's blocks");
    let (b, cached) = kv.add_sequence_cached(sb, &prompt, 41);
    assert_eq!(cached, 0);
    m.forward(&RaggedBatch::new(vec![BatchEntry::last(b, prompt.clone())]), &mut kv).unwrap();
    // Each tenant now has its own copies: 4 blocks, none referenced by both.
    let stats = kv.prefix_stats();
    assert_eq!(stats.blocks, 4);
    for k in kv.cached_blocks_of(sa.unwrap(), &prompt).iter().chain(&kv.cached_blocks_of(sb.unwrap(), &prompt)) {
        assert_eq!(kv.block_refs(k), Some(1));
    }
    // Generations key the blocks the same way.
    assert_ne!(kv.prefix_seed("alice", &["g2"]), sa);
    assert_ne!(kv.prefix_seed("alice", &[]), sa);
    assert_ne!(kv.prefix_seed("alice", &["g1", "g1"]), sa);
}

fn collect(mut s: RequestStream) -> (Vec<u32>, Usage) {
    let mut ids = Vec::new();
    loop {
        match s.blocking_next().expect("stream ended without Finished") {
            Event::Token { id, .. } => ids.push(id),
            Event::Finished { usage, .. } => return (ids, usage),
            Event::Error(e) => panic!("request failed: {e}"),
        }
    }
}

fn engine(prefix_cache: bool) -> EngineHandle {
    let t = tiny();
    EngineHandle::spawn(
        t.bundle.model.clone(),
        t.bundle.tokenizer.clone(),
        EngineConfig { scheduler: SchedulerConfig::default(), kv_cache_bytes: 64 << 20, prefix_cache },
    )
}

/// Replacing an adapter between two requests with the same prompt: the second runs with the new
/// generation and must not reuse blocks computed with the old one; the same generation again
/// does reuse them. Answers equal those of an engine without prefix caching.
#[test]
fn adapter_hot_swap_never_serves_blocks_of_another_generation() {
    let t = tiny();
    let dir = TempDir::new("prefix-adapters").unwrap();
    let load = |seed: u64| {
        let p = dir.path().join(format!("a{seed}"));
        write_peft_adapter(&p, &t.spec, &PeftSpec { seed, ..Default::default() }).unwrap();
        let a = peft::load(&p, &t.bundle.model).unwrap();
        (Arc::new(a.weights), a.content_hash)
    };
    let (v1, v2) = (load(1), load(2));
    assert_ne!(v1.1, v2.1);
    let prompt: Vec<u32> = (0..70).map(|i| (i * 7 + 5) % 300).collect();
    let req = |(weights, generation): &(Arc<LoraWeights>, String)| {
        let mut r = Request::new(prompt.clone(), 4);
        r.adapters = vec![weights.clone()];
        r.adapter_names = vec!["forget".into()];
        r.adapter_generations = vec![generation.clone()];
        r.tenant = "t".into();
        r
    };
    let (on, off) = (engine(true), engine(false));
    let (first, u) = collect(on.submit(req(&v1)).unwrap());
    assert_eq!(u.cached_tokens, 0);
    let (swapped, u) = collect(on.submit(req(&v2)).unwrap());
    assert_eq!(u.cached_tokens, 0, "blocks of generation 1 served to generation 2");
    let (again, u) = collect(on.submit(req(&v1)).unwrap());
    assert_eq!(u.cached_tokens, 64, "the same generation reuses its blocks");
    assert_eq!(first, again);
    assert_eq!(swapped, collect(off.submit(req(&v2)).unwrap()).0);
    assert_eq!(first, collect(off.submit(req(&v1)).unwrap()).0);
    // Adapters without a known generation take no part in caching.
    let mut anon = req(&v1);
    anon.adapter_generations.clear();
    assert_eq!(collect(on.submit(anon.clone()).unwrap()).1.cached_tokens, 0);
    assert_eq!(collect(on.submit(anon).unwrap()).1.cached_tokens, 0);
    on.shutdown(std::time::Duration::from_secs(5));
    off.shutdown(std::time::Duration::from_secs(5));
}

/// Guided pairs cache each row: the second identical request reuses both rows' prefixes, and
/// generates the same tokens as without the cache. Identical prompts submitted together share
/// as soon as the first has computed the blocks (SRPT prefill puts it first).
#[test]
fn guided_pairs_and_concurrent_requests_share_prefixes() {
    use lethe::guidance::{Guidance, GuidanceMode};
    let g = Guidance { gamma: 3.0, mode: GuidanceMode::Log };
    let cond: Vec<u32> = (0..60).map(|i| (i * 11 + 3) % 300).collect();
    let mut uncond = cond.clone();
    uncond[40] = 299; // the condition differs late: 2 blocks shared between the rows too
    let req = || {
        let mut r = Request::new(cond.clone(), 5).guided(uncond.clone(), g);
        r.ignore_eos = true;
        r
    };
    let (on, off) = (engine(true), engine(false));
    let (want, _) = collect(off.submit(req()).unwrap());
    let (a, u) = collect(on.submit(req()).unwrap());
    assert_eq!(a, want);
    assert_eq!((u.cached_tokens, u.uncond_cached_tokens), (0, 32), "the uncond row shares the cond row's first blocks");
    let (b, u) = collect(on.submit(req()).unwrap());
    assert_eq!(b, want);
    assert_eq!((u.cached_tokens, u.uncond_cached_tokens), (48, 48));
    // 6 identical new prompts at once: one computes, the others take its blocks.
    let shared: Vec<u32> = (0..200).map(|i| (i * 13 + 1) % 300).collect();
    let before = on.stats().forward_tokens.load(std::sync::atomic::Ordering::Relaxed);
    let streams: Vec<_> = (0..6)
        .map(|i| {
            let mut p = shared.clone();
            p.push(10 + i);
            on.submit(Request::new(p, 1)).unwrap()
        })
        .collect();
    let cached: usize = streams.into_iter().map(|s| collect(s).1.cached_tokens).sum();
    let computed = on.stats().forward_tokens.load(std::sync::atomic::Ordering::Relaxed) - before;
    assert_eq!(cached, 5 * 192, "5 of 6 requests reuse 12 blocks");
    assert_eq!(computed as usize, 6 * 201 - 5 * 192);
    on.shutdown(std::time::Duration::from_secs(5));
    off.shutdown(std::time::Duration::from_secs(5));
}

/// A sequence cancelled mid-prefill shares only the blocks whose every position was written
/// by a completed step; its partly written block is never registered.
#[test]
fn a_cancelled_writer_shares_only_completed_blocks() {
    let m = &tiny().bundle.model;
    let mut kv = m.new_kv_cache(64 << 20);
    let seed = kv.prefix_seed("t", &[]);
    let prompt: Vec<u32> = (0..40).map(|i| (i * 9 + 4) % 300).collect();
    let (a, _) = kv.add_sequence_cached(seed, &prompt, 41);
    // 20 of 40 tokens: block 0 complete, block 1 holds 4 positions.
    m.forward(&RaggedBatch::new(vec![BatchEntry::last(a, prompt[..20].to_vec())]), &mut kv).unwrap();
    kv.remove_sequence(a);
    assert_eq!(kv.prefix_stats().blocks, 1);
    let (b, cached) = kv.add_sequence_cached(seed, &prompt, 41);
    assert_eq!(cached, 16, "only the completed block");
    let logits = m.forward(&RaggedBatch::new(vec![BatchEntry::last(b, prompt[16..].to_vec())]), &mut kv).unwrap();
    assert!(max_diff(logits.last(0), &uncached_last_logits(m, &prompt)) <= tolerance(m));
}

/// Unreferenced blocks are evicted least recently used first, and only when a step needs the
/// memory.
#[test]
fn eviction_is_least_recently_used_and_on_demand() {
    let m = &tiny().bundle.model;
    let block = m.new_kv_cache(0).bytes_for_tokens(1);
    let mut kv = m.new_kv_cache(6 * block);
    let seed = kv.prefix_seed("t", &[]);
    let run = |kv: &mut KvCache, p: &[u32]| {
        let (s, cached) = kv.add_sequence_cached(seed, p, p.len());
        m.forward(&RaggedBatch::new(vec![BatchEntry::last(s, p[cached..].to_vec())]), kv).unwrap();
        kv.remove_sequence(s);
        cached
    };
    let (a, b): (Vec<u32>, Vec<u32>) = ((0..33).map(|i| i % 300).collect(), (100..133).collect());
    assert_eq!(run(&mut kv, &a), 0);
    assert_eq!(run(&mut kv, &b), 0);
    assert_eq!(kv.prefix_stats().blocks, 4, "2 full blocks each, kept while memory allows");
    assert_eq!(run(&mut kv, &a), 32, "a is now the most recently used");
    // 4 blocks of a fresh prompt need 2 of the 4 cached (6 in all): b's go.
    let c: Vec<u32> = (200..264).collect();
    assert_eq!(run(&mut kv, &c), 0);
    assert_eq!(kv.prefix_stats().evicted_blocks, 2);
    assert_eq!(kv.cached_blocks_of(seed.unwrap(), &a).len(), 2);
    assert!(kv.cached_blocks_of(seed.unwrap(), &b).is_empty());
}
