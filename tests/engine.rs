//! The guided decoding engine on tiny random models: CFG pairs, continuous batching, limits,
//! cancellation, and (with the real default model) that guidance changes behaviour.

mod common;

use lethe::engine::{
    Conditions, EngineConfig, EngineError, EngineHandle, Event, FinishReason, Request, RequestStream, SchedulerConfig,
    UncondSource, Usage, prompt,
};
use lethe::fixtures::{TempDir, TinySpec, write_tiny_model};
use lethe::guidance::{Guidance, GuidanceMode};
use lethe::loader::ModelBundle;
use lethe::model::{BatchEntry, KvDtype, RaggedBatch};
use lethe::sampling::SamplingParams;
use lethe::tokenizer::ChatMessage;
use std::time::{Duration, Instant};

struct Tiny {
    _dir: TempDir,
    bundle: ModelBundle,
}

fn tiny() -> Tiny {
    tiny_with(TinySpec::default())
}

fn tiny_with(spec: TinySpec) -> Tiny {
    let dir = TempDir::new("engine").unwrap();
    let path = write_tiny_model(&dir.path().join("m"), &spec).unwrap();
    let bundle = ModelBundle::load(&path, &common::load_options(), None).unwrap();
    Tiny { _dir: dir, bundle }
}

fn engine(t: &Tiny, sched: SchedulerConfig) -> EngineHandle {
    EngineHandle::spawn(
        t.bundle.model.clone(),
        t.bundle.tokenizer.clone(),
        EngineConfig { scheduler: sched, kv_cache_bytes: 256 << 20, prefix_cache: true },
    )
}

/// Collects a stream: token ids, text, finish reason and usage.
fn collect(mut s: RequestStream) -> (Vec<u32>, String, FinishReason, Usage) {
    let (mut ids, mut text) = (Vec::new(), String::new());
    loop {
        match s.blocking_next().expect("stream ended without Finished") {
            Event::Token { id, text: t, .. } => {
                if id != u32::MAX {
                    ids.push(id);
                }
                text.push_str(&t);
            }
            Event::Finished { reason, usage, .. } => return (ids, text, reason, usage),
            Event::Error(e) => panic!("request failed: {e}"),
        }
    }
}

fn chat(t: &Tiny, text: &str, guided: Option<(f32, GuidanceMode)>) -> Request {
    let conds = Conditions::default();
    let g = guided.map(|_| (&conds, &UncondSource::NegativeCondition));
    let rows = prompt::chat_rows(&t.bundle.tokenizer, &[ChatMessage::user(text)], g).unwrap();
    let mut r = Request::new(rows.cond, 12);
    r.ignore_eos = true;
    if let (Some(u), Some((gamma, mode))) = (rows.uncond, guided) {
        r = r.guided(u, Guidance { gamma, mode });
    }
    r
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn pair_in_one_batch_equals_rows_run_separately() {
    let t = tiny();
    let m = &t.bundle.model;
    let conds = Conditions::default();
    let rows = prompt::chat_rows(
        &t.bundle.tokenizer,
        &[ChatMessage::user("Tell me the customer's phone number.")],
        Some((&conds, &UncondSource::NegativeCondition)),
    )
    .unwrap();
    let uncond = rows.uncond.unwrap();
    assert_ne!(rows.cond.len(), uncond.len(), "the two rows have different prompts");
    // The native kernels compute each row on its own: bit-identical. candle sums in another
    // order when rows are batched: f32 KV keeps that at rounding level.
    let (dtype, tol) = if m.is_native() { (KvDtype::default(), 0.0) } else { (KvDtype::F32, 1e-4) };
    // Together: one ragged batch per step, the same token appended to both.
    let mut kv = m.new_kv_cache_with_dtype(1 << 30, dtype);
    let (c, u) = (kv.add_sequence(), kv.add_sequence());
    let mut both = Vec::new();
    let mut batch = RaggedBatch::new(vec![BatchEntry::last(c, rows.cond.clone()), BatchEntry::last(u, uncond.clone())]);
    for step in 0..6 {
        let l = m.forward(&batch, &mut kv).unwrap();
        both.push((l.last(0).to_vec(), l.last(1).to_vec()));
        let tok = 10 + step;
        batch = RaggedBatch::new(vec![BatchEntry::last(c, vec![tok]), BatchEntry::last(u, vec![tok])]);
    }
    // Separately.
    for (row, prompt) in [rows.cond, uncond].into_iter().enumerate() {
        let mut kv = m.new_kv_cache_with_dtype(1 << 30, dtype);
        let s = kv.add_sequence();
        let mut b = RaggedBatch::new(vec![BatchEntry::last(s, prompt)]);
        for (step, want) in both.iter().enumerate() {
            let l = m.forward(&b, &mut kv).unwrap();
            let want = if row == 0 { &want.0 } else { &want.1 };
            let d = l.last(0).iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(d <= tol, "row {row} step {step}: {d}");
            b = RaggedBatch::new(vec![BatchEntry::last(s, vec![10 + step as u32])]);
        }
    }
}

#[test]
fn guided_output_is_the_same_alone_or_beside_others() {
    let t = tiny();
    let e = engine(&t, SchedulerConfig::default());
    let mut target = chat(&t, "What is the secret code?", Some((3.0, GuidanceMode::Log)));
    target.max_tokens = 16;
    let alone = collect(e.submit(target.clone()).unwrap());
    assert_eq!(alone.0.len(), 16);
    // The same request among 5 others of every kind, submitted together.
    let mut others = [
        chat(&t, "Hello there, how are you?", None),
        chat(&t, "Write a long story about a fox.", Some((2.0, GuidanceMode::Prob))),
        chat(&t, "Numbers: 1 2 3", Some((1.5, GuidanceMode::Log))),
        chat(&t, "Paris", None),
        chat(&t, "Forget the secret, keep the skill.", Some((0.5, GuidanceMode::Log))),
    ];
    others[1].sampling = SamplingParams { temperature: 0.8, top_k: 20, top_p: 0.9, seed: Some(5) };
    others[3].max_tokens = 40;
    let mut streams: Vec<RequestStream> = Vec::new();
    for (i, r) in others.iter().enumerate() {
        if i == 2 {
            streams.push(e.submit(target.clone()).unwrap());
        }
        streams.push(e.submit(r.clone()).unwrap());
    }
    let results: Vec<_> = streams.into_iter().map(collect).collect();
    assert_eq!(results[2].0, alone.0, "batched guided output differs from the lone run");
    assert_eq!(results[2].1, alone.1);
    // Seeded sampling is reproducible too.
    let again = collect(e.submit(others[1].clone()).unwrap());
    assert_eq!(again.0, results[1].0);
}

#[test]
fn gamma_one_is_plain_decoding_without_an_uncond_row() {
    let t = tiny();
    let e = engine(&t, SchedulerConfig::default());
    let guided = chat(&t, "Tell me about the order.", Some((1.0, GuidanceMode::Prob)));
    assert!(!guided.is_pair());
    assert_eq!(guided.n_rows(), 1);
    let mut plain = guided.clone();
    plain.uncond_prompt = None;
    plain.guidance = None;
    let (a, b) = (collect(e.submit(guided).unwrap()), collect(e.submit(plain).unwrap()));
    assert_eq!(a.0, b.0);
    assert_eq!(a.3.uncond_prompt_tokens, 0);
}

#[test]
fn guidance_changes_the_output_and_modes_differ() {
    let t = tiny();
    let e = engine(&t, SchedulerConfig::default());
    let outputs: Vec<Vec<u32>> = [None, Some((3.0, GuidanceMode::Log)), Some((3.0, GuidanceMode::Prob))]
        .into_iter()
        .map(|g| {
            let mut r = chat(&t, "Share the customer's personal data.", g);
            r.max_tokens = 24;
            collect(e.submit(r).unwrap()).0
        })
        .collect();
    assert_ne!(outputs[0], outputs[1], "γ=3 log changed nothing");
    assert_ne!(outputs[1], outputs[2], "log and prob modes gave identical outputs");
}

#[test]
fn uncond_sources_build_the_expected_rows() {
    let t = tiny();
    let tok = &t.bundle.tokenizer;
    let msgs = [ChatMessage::user("hi")];
    let conds = Conditions::default();
    let neg = prompt::chat_rows(tok, &msgs, Some((&conds, &UncondSource::NegativeCondition))).unwrap();
    let custom =
        prompt::chat_rows(tok, &msgs, Some((&conds, &UncondSource::Custom("Say everything.".into())))).unwrap();
    let last = prompt::chat_rows(tok, &msgs, Some((&conds, &UncondSource::LastToken))).unwrap();
    let text = |ids: &[u32]| tok.decode(ids, false).unwrap();
    assert!(text(&neg.cond).contains(prompt::PAPER_POSITIVE));
    assert!(text(neg.uncond.as_ref().unwrap()).contains(prompt::PAPER_NEGATIVE));
    assert!(text(custom.uncond.as_ref().unwrap()).contains("Say everything."));
    assert_eq!(last.uncond.unwrap(), vec![*last.cond.last().unwrap()]);
}

#[test]
fn full_queue_is_overloaded() {
    let t = tiny();
    let e =
        engine(&t, SchedulerConfig { max_running_rows: 1, max_batch_tokens: 64, max_waiting: 2, ..Default::default() });
    let mut long = chat(&t, "go", None);
    long.max_tokens = 400;
    let running = e.submit(long.clone()).unwrap();
    wait_until("the first request to run", || e.stats().running.load(std::sync::atomic::Ordering::Relaxed) == 1);
    let w1 = e.submit(long.clone()).unwrap();
    let w2 = e.submit(long.clone()).unwrap();
    match e.submit(long.clone()) {
        Err(EngineError::Overloaded { waiting }) => assert_eq!(waiting, 2),
        Err(other) => panic!("expected Overloaded, got {other}"),
        Ok(_) => panic!("expected Overloaded, got a stream"),
    }
    // Freeing the queue makes room again.
    drop((running, w1, w2));
    wait_until("the queue to drain", || e.stats().waiting.load(std::sync::atomic::Ordering::Relaxed) == 0);
    let mut short = long;
    short.max_tokens = 2;
    assert_eq!(collect(e.submit(short).unwrap()).0.len(), 2);
}

#[test]
fn cancelling_mid_stream_frees_rows_and_memory() {
    let t = tiny();
    let e = engine(&t, SchedulerConfig::default());
    let stats = e.stats();
    let mut r = chat(&t, "stream for a while", Some((3.0, GuidanceMode::Log)));
    r.max_tokens = 300;
    let mut s = e.submit(r).unwrap();
    for _ in 0..5 {
        assert!(matches!(s.blocking_next(), Some(Event::Token { .. })));
    }
    assert_eq!(stats.running_rows.load(std::sync::atomic::Ordering::Relaxed), 2, "a pair runs as two rows");
    assert!(stats.kv_used_bytes.load(std::sync::atomic::Ordering::Relaxed) > 0);
    drop(s);
    wait_until("the rows to be freed", || {
        stats.running.load(std::sync::atomic::Ordering::Relaxed) == 0
            && stats.kv_used_bytes.load(std::sync::atomic::Ordering::Relaxed) == 0
    });
}

#[test]
fn context_overflow_is_rejected_up_front() {
    let t = tiny_with(TinySpec { max_positions: 64, ..Default::default() });
    let e = engine(&t, SchedulerConfig::default());
    let mut r = chat(&t, "hi", None);
    r.max_tokens = 60;
    let needed = r.prompt.len() + 60;
    assert_eq!(e.submit(r).err(), Some(EngineError::ContextOverflow { needed, max: 64 }));
    assert_eq!(e.stats().waiting.load(std::sync::atomic::Ordering::Relaxed), 0);
    let bad = Request::new(vec![], 5);
    assert!(matches!(e.submit(bad), Err(EngineError::InvalidRequest(_))));
    let bad = Request::new(vec![1_000_000], 5);
    assert!(matches!(e.submit(bad), Err(EngineError::InvalidRequest(_))));
    let mut bad = chat(&t, "hi", Some((f32::NAN, GuidanceMode::Log)));
    bad.max_tokens = 2;
    assert!(matches!(e.submit(bad), Err(EngineError::InvalidRequest(_))));
}

#[test]
fn fifty_concurrent_mixed_requests_complete_with_correct_usage() {
    let t = tiny();
    let e = engine(
        &t,
        SchedulerConfig { max_running_rows: 24, max_batch_tokens: 96, max_waiting: 64, ..Default::default() },
    );
    let mut expected = Vec::new();
    let streams: Vec<RequestStream> = (0..50)
        .map(|i| {
            let guided = match i % 3 {
                0 => None,
                1 => Some((3.0, GuidanceMode::Log)),
                _ => Some((2.0, GuidanceMode::Prob)),
            };
            let mut r = chat(&t, &format!("request number {i}: tell me something"), guided);
            r.max_tokens = 3 + i % 17;
            if i % 4 == 0 {
                r.sampling = SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.95, seed: Some(i as u64) };
            }
            expected.push((r.prompt.len(), r.max_tokens, r.is_pair()));
            e.submit(r).unwrap()
        })
        .collect();
    for (s, (prompt_tokens, max_tokens, pair)) in streams.into_iter().zip(expected) {
        let (ids, _, reason, usage) = collect(s);
        assert_eq!(reason, FinishReason::Length);
        assert_eq!(ids.len(), max_tokens);
        assert_eq!(usage.completion_tokens, max_tokens);
        assert_eq!(usage.prompt_tokens, prompt_tokens);
        assert_eq!(usage.uncond_prompt_tokens > 0, pair);
    }
    wait_until("all memory returned", || e.stats().kv_used_bytes.load(std::sync::atomic::Ordering::Relaxed) == 0);
}

#[test]
fn chunked_prefill_gives_the_same_answer() {
    let t = tiny();
    let long: String = (0..60).map(|i| format!("word{i} ")).collect();
    let mut r = chat(&t, &long, Some((2.0, GuidanceMode::Log)));
    r.max_tokens = 10;
    assert!(r.prompt.len() > 100);
    let small =
        engine(&t, SchedulerConfig { max_running_rows: 4, max_batch_tokens: 16, max_waiting: 8, ..Default::default() });
    let big = engine(
        &t,
        SchedulerConfig { max_running_rows: 4, max_batch_tokens: 4096, max_waiting: 8, ..Default::default() },
    );
    let steps_before = small.stats().steps.load(std::sync::atomic::Ordering::Relaxed);
    let a = collect(small.submit(r.clone()).unwrap());
    let steps = small.stats().steps.load(std::sync::atomic::Ordering::Relaxed) - steps_before;
    let b = collect(big.submit(r.clone()).unwrap());
    assert_eq!(a.0, b.0);
    // Two rows of >100 tokens through a 16-token budget take many steps before decoding.
    assert!(steps as usize >= (r.prompt.len() + r.uncond_prompt.as_ref().unwrap().len()) / 16 + 9);
}

#[test]
fn stop_strings_end_the_text_before_the_stop() {
    let t = tiny();
    let e = engine(&t, SchedulerConfig::default());
    let mut r = chat(&t, "say something", None);
    r.max_tokens = 30;
    let (_, full, _, _) = collect(e.submit(r.clone()).unwrap());
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 12, "{full:?}");
    let stop: String = chars[6..9].iter().collect();
    let before: String = full[..full.find(&stop).unwrap()].to_string();
    r.stop = vec![stop];
    let (_, text, reason, usage) = collect(e.submit(r).unwrap());
    assert_eq!(text, before);
    assert_eq!(reason, FinishReason::Stop);
    assert!(usage.completion_tokens < 30);
}

/// The up-front KV check counts whole cache blocks, as admission does: a request that fits in
/// exact bytes but not in blocks is refused at submit, instead of being accepted and then never
/// admitted (which blocked the FIFO queue behind it). Requests with more rows than the engine
/// may run are refused too.
#[test]
fn kv_check_counts_whole_blocks_and_the_engine_keeps_serving() {
    let t = tiny();
    let probe = t.bundle.model.new_kv_cache(0);
    // Room for 17 positions' worth of bytes: less than two 16-position blocks.
    let limit = probe.bytes_per_token() * 17;
    let e = EngineHandle::spawn(
        t.bundle.model.clone(),
        t.bundle.tokenizer.clone(),
        EngineConfig { scheduler: SchedulerConfig::default(), kv_cache_bytes: limit, prefix_cache: true },
    );
    let mut big = Request::new(vec![1, 2, 3, 4, 5], 12); // 17 positions: 2 blocks
    big.ignore_eos = true;
    assert!(matches!(e.submit(big), Err(EngineError::TooLarge { .. })));
    let mut small = Request::new(vec![1, 2, 3], 4); // 7 positions: 1 block
    small.ignore_eos = true;
    let (ids, _, reason, _) = collect(e.submit(small).unwrap());
    assert_eq!((ids.len(), reason), (4, FinishReason::Length));

    let one_row = engine(&t, SchedulerConfig { max_running_rows: 1, ..Default::default() });
    let mut pair = chat(&t, "hi", Some((2.0, GuidanceMode::Log)));
    pair.max_tokens = 2;
    assert!(matches!(one_row.submit(pair), Err(EngineError::InvalidRequest(m)) if m.contains("max_running_rows")));
}

/// A panic inside a step (here: a corrupt adapter whose LoRA shrink, run as a pre item of the
/// base matmul on any pool thread, trips a kernel assertion) ends that step's requests with an
/// error event; the engine keeps serving, healthy. It used to spin forever while `/health` said
/// 200 (the tiles waited for a pre item that had died).
#[test]
fn a_panic_in_a_step_fails_its_requests_and_the_engine_keeps_serving() {
    use lethe::model::ProjKind;
    use lethe::model::kernels::PackedMatrix;
    use lethe::model::lora::{LoraFactors, LoraPair, LoraWeights};
    use std::sync::Arc;
    let t = tiny();
    let cfg = t.bundle.model.config().clone();
    let (h, rank) = (cfg.hidden_size, 16);
    // `a` must be a float matrix; a Q8_0 one fails the shrink kernel's format check.
    let corrupt = || LoraPair {
        factors: LoraFactors::Packed {
            a: PackedMatrix::quantize_q8_0(&vec![0.01; rank * h], rank, h).unwrap(),
            b: PackedMatrix::from_f32_as_f16(&vec![0.0; cfg.q_dim() * rank], cfg.q_dim(), rank).unwrap(),
        },
        rank,
        scale: 1.0,
    };
    let layers =
        (0..cfg.n_layers).map(|_| std::array::from_fn(|k| (k == ProjKind::Q as usize).then(corrupt))).collect();
    let poisoned = Arc::new(LoraWeights { layers, bytes: 0 });
    let e = engine(&t, SchedulerConfig::default());
    let (tx, rx) = std::sync::mpsc::channel();
    let (e2, mut bad, good) = (e.clone(), chat(&t, "Hello", None), chat(&t, "Hello", Some((2.0, GuidanceMode::Log))));
    bad.adapters = vec![poisoned];
    std::thread::spawn(move || {
        // The poisoned request beside a healthy one in the same steps: both are in the failed
        // step, so both get the error.
        let (mut s1, mut s2) = (e2.submit(bad).unwrap(), e2.submit(good.clone()).unwrap());
        let last = |s: &mut RequestStream| std::iter::from_fn(|| s.blocking_next()).last();
        let (l1, l2) = (last(&mut s1), last(&mut s2));
        // Afterwards, a healthy request runs to the end.
        let after = collect(e2.submit(good).unwrap());
        tx.send((l1, l2, after.2)).unwrap();
    });
    let (l1, l2, after) = rx.recv_timeout(Duration::from_secs(60)).expect("the engine hung after a panic in a step");
    // The native kernels panic on the corrupt factors (the case this test is about); the candle
    // path refuses packed factors with an error before any kernel runs. Either way the request
    // fails, and the engine goes on.
    let why = if t.bundle.model.is_native() { "internal error" } else { "packed LoRA factors" };
    assert!(matches!(&l1, Some(Event::Error(EngineError::Failed(m))) if m.contains(why)), "{l1:?}");
    assert!(matches!(&l2, Some(Event::Error(EngineError::Failed(_))) | Some(Event::Finished { .. })), "{l2:?}");
    assert_eq!(after, FinishReason::Length);
    assert!(e.is_alive() && !e.stats().crashed.load(std::sync::atomic::Ordering::SeqCst));
}

#[test]
fn shutdown_ends_running_streams_cleanly() {
    let t = tiny();
    let e = engine(&t, SchedulerConfig::default());
    let mut r = chat(&t, "long", None);
    r.max_tokens = 100_000.min(t.bundle.model.config().max_context - r.prompt.len());
    let mut s = e.submit(r).unwrap();
    assert!(matches!(s.blocking_next(), Some(Event::Token { .. })));
    e.shutdown(Duration::from_millis(50));
    let mut last = None;
    while let Some(ev) = s.blocking_next() {
        last = Some(ev);
    }
    assert!(matches!(last, Some(Event::Error(EngineError::CutByShutdown)) | Some(Event::Finished { .. })), "{last:?}");
    assert!(matches!(e.submit(Request::new(vec![1], 1)), Err(EngineError::ShuttingDown)));
}

/// With the real default model, guidance moves the answers between its two conditions: at
/// γ = 0 the mix is the uncond row alone (no system sentence), which answers English questions
/// in English; at γ = 3 it amplifies "Answer only in French.", and the answers are French. The
/// property is a language heuristic: the share of French function words among French + English
/// ones, over six questions.
///
/// γ = 1 (the cond row alone) is not asserted: the 135M model follows the French sentence only
/// in part there, on near-ties between a French and an English next token, so any change of
/// summation order moves it (French shares of 0.12, 0.48 and 0.67 for the same three questions
/// under three kernel sets).
#[test]
fn guidance_changes_behaviour_on_the_default_model() {
    let Some(path) = common::default_model() else {
        return;
    };
    let bundle = ModelBundle::load(&path, &common::load_options(), None).unwrap();
    let e = EngineHandle::spawn(bundle.model.clone(), bundle.tokenizer.clone(), EngineConfig::default());
    let conds = Conditions { positive: "Answer only in French.".into(), negative: String::new() };
    let questions = [
        "What is your favourite food?",
        "Describe a sunny day at the beach.",
        "How do I bake bread?",
        "What do you like to do on weekends?",
        "Tell me about the town where you grew up.",
        "Which book would you recommend, and why?",
    ];
    let french_share = |gamma: f32| -> f32 {
        let (mut fr, mut en) = (0usize, 0usize);
        for q in questions {
            let rows = prompt::chat_rows(
                &bundle.tokenizer,
                &[ChatMessage::user(q)],
                Some((&conds, &UncondSource::NegativeCondition)),
            )
            .unwrap();
            let mut r = Request::new(rows.cond, 40);
            r = r.guided(rows.uncond.unwrap(), Guidance { gamma, mode: GuidanceMode::Log });
            let (_, text, _, _) = collect(e.submit(r).unwrap());
            let (f, n) = language_counts(&text);
            fr += f;
            en += n;
        }
        fr as f32 / (fr + en).max(1) as f32
    };
    let (uncond, guided) = (french_share(0.0), french_share(3.0));
    assert!(uncond < 0.2, "γ=0 (the uncond row) should answer in English: French share {uncond}");
    assert!(guided > 0.8, "γ=3 should follow the French condition: French share {guided}");
}

fn language_counts(text: &str) -> (usize, usize) {
    const FR: &[&str] = &[
        "je", "le", "la", "les", "de", "des", "du", "un", "une", "est", "et", "pour", "pas", "ne", "il", "elle",
        "tout", "suis", "où", "au", "aux", "avec", "sur", "dans", "que", "qui", "vous", "nous", "mon", "ma", "c'est",
    ];
    const EN: &[&str] = &[
        "the", "a", "an", "is", "of", "and", "to", "in", "it", "i", "you", "with", "for", "on", "are", "this", "that",
        "my", "was", "be",
    ];
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect();
    let count = |list: &[&str]| words.iter().filter(|w| list.contains(&w.as_str())).count();
    (count(FR), count(EN))
}
