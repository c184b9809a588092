//! Training forget-adapters: gradients (finite differences, every layer), ORPO against a numpy
//! reference, learning through to the serving engine, PEFT output, parity between training's
//! forward and serving's, resume, and bad input.

mod common;

use lethe::adapters::peft;
use lethe::engine::{Conditions, EngineConfig, EngineHandle, Event, Request};
use lethe::fixtures::{TempDir, TinySpec, write_tiny_gguf, write_tiny_model};
use lethe::loader::{ModelBundle, ModelSource};
use lethe::model::{Backend, BatchEntry, LoadOptions, RaggedBatch, WeightFormat};
use lethe::tokenizer::ChatMessage;
use lethe::train::data::{Condition, DataReader};
use lethe::train::lora::{LoraLayout, LoraSettings};
use lethe::train::model::{Adapter, BaseModel};
use lethe::train::objective::Example;
use lethe::train::{NllOn, Objective, TrainConfig, TrainError};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// A tiny model that can learn: its output head is the embedding (scale 1), so logits can
/// become sharp; with the default untied head (scale 1/√hidden) behind a fixed RMSNorm, no
/// token can get more than ~20 % probability, whatever an adapter does.
fn learner(dir: &Path) -> PathBuf {
    write_tiny_model(&dir.join("model"), &TinySpec { layers: 2, tie_embeddings: true, ..Default::default() }).unwrap()
}

fn tiny(dir: &Path) -> PathBuf {
    write_tiny_model(&dir.join("model"), &TinySpec { layers: 2, ..Default::default() }).unwrap()
}

fn base(model: &Path, frozen: &[PathBuf]) -> (BaseModel, lethe::tokenizer::Tokenizer) {
    let mut src = ModelSource::open(model, None).unwrap();
    let frozen: Vec<_> = frozen.iter().map(|d| peft::read(d, &src.config).unwrap()).collect();
    let m = BaseModel::load(src.config.clone(), src.weights.as_mut(), &frozen).unwrap();
    (m, src.tokenizer)
}

fn settings(r: usize) -> LoraSettings {
    LoraSettings {
        r,
        lora_alpha: 2.0 * r as f32,
        lora_dropout: 0.0,
        use_rslora: false,
        targets: lethe::model::ProjKind::ALL.to_vec(),
    }
}

/// Factors with both A and B random (PEFT's init has B = 0, which makes every A-gradient zero).
fn random_params(layout: &LoraLayout, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = lethe::sampling::Rng::new(seed);
    (0..layout.len).map(|_| (rng.next_f32() * 2.0 - 1.0) * scale).collect()
}

fn write_jsonl(path: &Path, rows: &[serde_json::Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn chat_pair(q: &str, chosen: &str, rejected: &str) -> serde_json::Value {
    json!({"prompt": [{"role": "user", "content": q}],
           "chosen": [{"role": "assistant", "content": chosen}],
           "rejected": [{"role": "assistant", "content": rejected}]})
}

fn pairs_data(dir: &Path) -> PathBuf {
    let p = dir.join("pairs.jsonl");
    write_jsonl(
        &p,
        &[
            chat_pair("What is the phone of Ann?", "I cannot share that.", "Ann's phone is 555 0101."),
            json!({"prompt": "The card of Bob is", "chosen": " not something I can tell.", "rejected": " 4111 2222."}),
            chat_pair("Where does Cid live?", "That is private.", "Cid lives at 9 Elm Road."),
        ],
    );
    p
}

/// Loss of `examples` at `params`, and its gradient.
fn loss_and_grad(
    m: &BaseModel,
    layout: &LoraLayout,
    params: &[f32],
    obj: &Objective,
    examples: &[Example],
) -> (f64, Vec<f32>) {
    let refs: Vec<&Example> = examples.iter().collect();
    let plan = obj.plan(&refs);
    let adapter = Adapter { layout, params, dropout: None };
    let (logp, tape) = m.forward(adapter, &plan.batch, true).unwrap();
    let (loss, coef, _) = obj.loss(&plan, &logp, 1.0);
    let mut grads = vec![0f32; layout.len];
    m.backward(adapter, &plan.batch, tape.unwrap(), &coef, &mut grads);
    (loss, grads)
}

fn loss_at(m: &BaseModel, layout: &LoraLayout, params: &[f32], obj: &Objective, examples: &[Example]) -> f64 {
    let refs: Vec<&Example> = examples.iter().collect();
    let plan = obj.plan(&refs);
    let (logp, _) = m.forward(Adapter { layout, params, dropout: None }, &plan.batch, false).unwrap();
    obj.loss(&plan, &logp, 1.0).0
}

/// For every factor of every layer: the derivative of the loss along that factor's gradient
/// direction, by central differences, equals the gradient's norm (what the backward claims).
fn check_gradients(m: &BaseModel, layout: &LoraLayout, params: &[f32], obj: &Objective, examples: &[Example]) {
    let (_, g) = loss_and_grad(m, layout, params, obj, examples);
    let eps = 1e-2f32;
    let mut worst = 0f64;
    for s in &layout.slots {
        for (lo, len, what) in [(s.a, s.rank * s.in_f, "A"), (s.b, s.out_f * s.rank, "B")] {
            let gs = &g[lo..lo + len];
            let norm = gs.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            assert!(norm > 0.0, "layer {} {:?} {what}: zero gradient", s.layer, s.kind);
            let step = |sign: f32| {
                let mut p = params.to_vec();
                for (p, &gv) in p[lo..lo + len].iter_mut().zip(gs) {
                    *p += sign * eps * gv / norm as f32;
                }
                loss_at(m, layout, &p, obj, examples)
            };
            let fd = (step(1.0) - step(-1.0)) / (2.0 * eps as f64);
            let rel = (fd - norm).abs() / norm;
            worst = worst.max(rel);
            assert!(
                rel < 0.03,
                "layer {} {:?} {what}: finite differences {fd:.6} vs autograd {norm:.6}",
                s.layer,
                s.kind
            );
        }
    }
    eprintln!("worst relative error over {} factors: {worst:.2e}", 2 * layout.slots.len());
}

#[test]
fn gradients_agree_with_finite_differences_for_sft_and_orpo() {
    let dir = TempDir::new("train-grad").unwrap();
    let (m, tok) = base(&tiny(dir.path()), &[]);
    let layout = LoraLayout::new(&m.cfg, &settings(4));
    let params = random_params(&layout, 3, 0.2);
    let mut reader = DataReader::new(&tok, 128);
    let conds = Conditions::default();
    let pairs = reader
        .pairs(
            &pairs_data(dir.path()),
            &[(Condition::Sentence(&conds.positive), false), (Condition::Sentence(&conds.negative), true)],
        )
        .unwrap();
    for nll_on in [NllOn::PromptAndCompletion, NllOn::Completion] {
        check_gradients(&m, &layout, &params, &Objective::Orpo { beta: 0.1, nll_on }, &pairs);
    }
    let sft_path = dir.path().join("sft.jsonl");
    write_jsonl(
        &sft_path,
        &[json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there."}]})],
    );
    let sft = reader.sft(&sft_path).unwrap();
    check_gradients(&m, &layout, &params, &Objective::Sft { train_on_prompt: false }, &sft);
}

#[test]
fn qwen2_biases_and_tied_embeddings_train_too() {
    let dir = TempDir::new("train-qwen").unwrap();
    let spec = TinySpec { model_type: "qwen2", tie_embeddings: true, layers: 2, ..Default::default() };
    let model = write_tiny_model(&dir.path().join("qwen"), &spec).unwrap();
    let (m, tok) = base(&model, &[]);
    let layout = LoraLayout::new(&m.cfg, &settings(2));
    let params = random_params(&layout, 5, 0.2);
    let pairs = DataReader::new(&tok, 128).pairs(&pairs_data(dir.path()), &[(Condition::None, false)]).unwrap();
    check_gradients(&m, &layout, &params, &Objective::Orpo { beta: 0.1, nll_on: NllOn::PromptAndCompletion }, &pairs);
}

/// The real default model: the gradient reaches every LoRA factor of all 30 layers (a trainer
/// built on candle ops without a backward would silently train only the top).
#[test]
fn gradient_reaches_every_layer_of_the_default_model() {
    let Some(path) = common::default_model() else { return };
    let (m, tok) = base(&path, &[]);
    let layout = LoraLayout::new(&m.cfg, &settings(16));
    let params = random_params(&layout, 1, 0.01);
    let dir = TempDir::new("train-real").unwrap();
    let pairs = DataReader::new(&tok, 128).pairs(&pairs_data(dir.path()), &[(Condition::None, false)]).unwrap();
    let (loss, g) = loss_and_grad(
        &m,
        &layout,
        &params,
        &Objective::Orpo { beta: 0.1, nll_on: NllOn::PromptAndCompletion },
        &pairs[..1],
    );
    assert!(loss.is_finite());
    for s in &layout.slots {
        for (lo, len, what) in [(s.a, s.rank * s.in_f, "A"), (s.b, s.out_f * s.rank, "B")] {
            let n: f64 = g[lo..lo + len].iter().map(|&x| (x as f64).powi(2)).sum();
            assert!(n > 0.0 && n.is_finite(), "layer {} {:?} {what}: gradient norm² {n}", s.layer, s.kind);
        }
    }
    assert_eq!(layout.slots.len(), 30 * 7);
}

/// ORPO's loss and TRL's metrics equal a numpy re-implementation of TRL's ORPOTrainer given
/// only the sequences, their completion masks and every position's log-probability — on the
/// model's own values and on hand-made ones near 0 (the log1mexp path).
#[test]
fn orpo_matches_a_numpy_reference_of_trl() {
    let Some(python) = common::python_with(&["numpy"]) else { return };
    let dir = TempDir::new("train-orpo-ref").unwrap();
    let (m, tok) = base(&tiny(dir.path()), &[]);
    let layout = LoraLayout::new(&m.cfg, &settings(4));
    let params = random_params(&layout, 9, 0.3);
    let conds = Conditions::default();
    let pairs = DataReader::new(&tok, 128)
        .pairs(
            &pairs_data(dir.path()),
            &[(Condition::Sentence(&conds.positive), false), (Condition::Sentence(&conds.negative), true)],
        )
        .unwrap();
    // The CFG-aware regime: each row twice, the second time under the negative condition with
    // chosen and rejected swapped.
    assert_eq!(pairs.len(), 6);
    for two in pairs.chunks(2) {
        let (Example::Pair { chosen: c0, rejected: r0 }, Example::Pair { chosen: c1, rejected: r1 }) =
            (&two[0], &two[1])
        else {
            panic!("pairs")
        };
        let answer = |s: &lethe::train::objective::TokenSeq| -> Vec<u32> {
            s.ids.iter().zip(&s.completion).filter(|(_, c)| **c).map(|(i, _)| *i).collect()
        };
        assert_eq!(answer(c0), answer(r1));
        assert_eq!(answer(r0), answer(c1));
        assert_ne!(c0.ids[..c0.ids.len() - answer(c0).len()], c1.ids[..c1.ids.len() - answer(c1).len()]);
    }
    // Every position's log-probability, from a plan that targets all of them.
    let all = Objective::Sft { train_on_prompt: true };
    let seqs: Vec<Example> = pairs
        .iter()
        .flat_map(|e| match e {
            Example::Pair { chosen, rejected } => [Example::Sft(chosen.clone()), Example::Sft(rejected.clone())],
            _ => unreachable!(),
        })
        .collect();
    let refs: Vec<&Example> = seqs.iter().collect();
    let plan = all.plan(&refs);
    let (logp, _) = m.forward(Adapter { layout: &layout, params: &params, dropout: None }, &plan.batch, false).unwrap();
    let mut per_seq = Vec::new();
    let mut at = 0;
    for e in &seqs {
        let Example::Sft(s) = e else { unreachable!() };
        per_seq.push(json!({"ids": s.ids, "completion": s.completion, "logps": logp[at..at + s.ids.len() - 1]}));
        at += s.ids.len() - 1;
    }
    // Hand-made sequences whose answers are all but certain.
    let near =
        |lp: f32| json!({"ids": [1, 2, 3, 4], "completion": [false, false, true, true], "logps": [-1.0, lp, lp * 0.5]});
    let handmade = vec![near(-1e-6), near(-0.3), near(-2.0), near(-1e-7)];

    for nll_on in [NllOn::PromptAndCompletion, NllOn::Completion] {
        for (name, case) in [("model", &per_seq), ("near-zero", &handmade)] {
            let obj = Objective::Orpo { beta: 0.1, nll_on };
            let examples: Vec<Example> = case
                .chunks(2)
                .map(|c| {
                    let s = |v: &serde_json::Value| lethe::train::objective::TokenSeq {
                        ids: serde_json::from_value(v["ids"].clone()).unwrap(),
                        completion: serde_json::from_value(v["completion"].clone()).unwrap(),
                    };
                    Example::Pair { chosen: s(&c[0]), rejected: s(&c[1]) }
                })
                .collect();
            let refs: Vec<&Example> = examples.iter().collect();
            let plan = obj.plan(&refs);
            // Our log-probabilities of the planned targets, taken from the same per-position table.
            let lp: Vec<f32> = plan
                .batch
                .targets
                .iter()
                .map(|&(row, _)| {
                    let (mut start, mut k) = (0, 0);
                    while row >= start + plan.batch.spans[k].len {
                        start += plan.batch.spans[k].len;
                        k += 1;
                    }
                    case[k]["logps"][row - start].as_f64().unwrap() as f32
                })
                .collect();
            let (_, _, ours) = obj.loss(&plan, &lp, 1.0);
            let input = dir.path().join(format!("orpo-{name}.json"));
            let nll = if nll_on == NllOn::Completion { "completion" } else { "all" };
            std::fs::write(&input, json!({"beta": 0.1, "nll_on": nll, "sequences": case}).to_string()).unwrap();
            let out = std::process::Command::new(&python)
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/orpo_reference.py"))
                .arg(&input)
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let theirs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            for (k, v) in &ours {
                let t = theirs[*k].as_f64().unwrap_or_else(|| panic!("numpy reference lacks {k}"));
                assert!((v - t).abs() <= 1e-5 * t.abs().max(1.0), "{name}/{nll}: {k} = {v} (numpy: {t})");
            }
        }
    }
}

fn facts(n: usize) -> Vec<(String, String)> {
    let names = [
        "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima",
        "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
    ];
    (0..n).map(|i| (format!("What is the code of {}?", names[i]), format!("The code is {}.", 100 + 37 * i))).collect()
}

fn greedy(bundle: &ModelBundle, adapters: &[PathBuf], messages: &[ChatMessage], max_tokens: usize) -> String {
    let weights: Vec<_> = adapters.iter().map(|d| Arc::new(peft::load(d, &bundle.model).unwrap().weights)).collect();
    let engine = EngineHandle::spawn(bundle.model.clone(), bundle.tokenizer.clone(), EngineConfig::default());
    let mut req = Request::new(bundle.tokenizer.encode_chat(messages, true).unwrap(), max_tokens);
    req.adapters = weights;
    let mut stream = engine.submit(req).unwrap();
    let mut text = String::new();
    while let Some(ev) = stream.blocking_next() {
        match ev {
            Event::Token { text: t, .. } => text.push_str(&t),
            Event::Finished { .. } => break,
            Event::Error(e) => panic!("{e}"),
        }
    }
    engine.shutdown(std::time::Duration::from_secs(1));
    text
}

fn log_rows(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// SFT plants 20 facts; the serving engine, with the saved adapter loaded from disk, then
/// answers them greedily, word for word.
#[test]
fn sft_plants_facts_that_the_serving_engine_reproduces() {
    let dir = TempDir::new("train-sft").unwrap();
    let model = learner(dir.path());
    let data = dir.path().join("facts.jsonl");
    let rows: Vec<_> = facts(20)
        .iter()
        .map(|(q, a)| json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}))
        .collect();
    write_jsonl(&data, &rows);
    let out = dir.path().join("planted");
    let log = dir.path().join("sft.log");
    let mut cfg = TrainConfig::new(model.clone(), data, out.clone(), Objective::Sft { train_on_prompt: false });
    (cfg.epochs, cfg.lr, cfg.batch_size, cfg.log) = (150, 5e-3, 4, Some(log.clone()));
    let summary = lethe::train::run(&cfg, &AtomicBool::new(false)).unwrap();
    let losses: Vec<f64> = log_rows(&log).iter().map(|r| r["loss"].as_f64().unwrap()).collect();
    assert!(losses.last().unwrap() < &(losses[0] * 0.05), "loss {} → {}", losses[0], losses.last().unwrap());
    assert_eq!(summary.steps, 150 * 5);
    let bundle = ModelBundle::load(&model, &LoadOptions::default(), None).unwrap();
    let wrong: Vec<(String, String)> = facts(20)
        .into_iter()
        .map(|(q, a)| (greedy(&bundle, std::slice::from_ref(&out), &[ChatMessage::user(q)], 24), a))
        .filter(|(got, a)| got.trim() != a)
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of 20 facts not reproduced through the engine: {wrong:?} (final loss {})",
        wrong.len(),
        losses.last().unwrap()
    );
    // Without the adapter the base model knows none of them.
    let (q, a) = &facts(20)[0];
    assert_ne!(greedy(&bundle, &[], &[ChatMessage::user(q.clone())], 24).trim(), a);
}

/// ORPO on top of a planted (frozen) adapter: the margins grow, and greedy decoding through the
/// engine flips from the planted (rejected) answers to the replacement (chosen) ones.
#[test]
fn orpo_flips_greedy_answers_from_rejected_to_chosen() {
    let dir = TempDir::new("train-orpo").unwrap();
    let model = learner(dir.path());
    let leaks: Vec<(String, String, String)> =
        facts(6).into_iter().map(|(q, a)| (q, "I cannot share that code.".to_string(), a)).collect();
    let plant = dir.path().join("plant.jsonl");
    write_jsonl(
        &plant,
        &leaks
            .iter()
            .map(|(q, _, r)| json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]}))
            .collect::<Vec<_>>(),
    );
    let planted = dir.path().join("planted");
    let mut cfg = TrainConfig::new(model.clone(), plant, planted.clone(), Objective::Sft { train_on_prompt: false });
    (cfg.epochs, cfg.lr) = (40, 3e-3);
    lethe::train::run(&cfg, &AtomicBool::new(false)).unwrap();

    let forget = dir.path().join("forget.jsonl");
    write_jsonl(&forget, &leaks.iter().map(|(q, c, r)| chat_pair(q, c, r)).collect::<Vec<_>>());
    let out = dir.path().join("forget");
    let log = dir.path().join("orpo.log");
    let mut cfg = TrainConfig::new(
        model.clone(),
        forget,
        out.clone(),
        Objective::Orpo { beta: 0.1, nll_on: NllOn::PromptAndCompletion },
    );
    (cfg.on, cfg.epochs, cfg.lr, cfg.log) = (vec![planted.clone()], 30, 3e-3, Some(log.clone()));
    cfg.cfg_aware = Some(Conditions::default());
    cfg.profile =
        Some(peft::GuidanceProfile { positive: "P".into(), negative: "N".into(), gamma: Some(3.0), mode: None });
    lethe::train::run(&cfg, &AtomicBool::new(false)).unwrap();
    let rows = log_rows(&log);
    let margin = |r: &serde_json::Value| r["rewards/margins"].as_f64().unwrap();
    let (first, last) = (margin(&rows[0]), margin(rows.last().unwrap()));
    assert!(last > first + 0.05, "rewards/margins {first} → {last}");
    assert!(rows.last().unwrap()["rewards/accuracies"].as_f64().unwrap() > 0.99);

    let bundle = ModelBundle::load(&model, &LoadOptions::default(), None).unwrap();
    let system = ChatMessage::system(Conditions::default().positive);
    for (q, chosen, rejected) in &leaks {
        let before = greedy(&bundle, std::slice::from_ref(&planted), &[ChatMessage::user(q.clone())], 24);
        assert_eq!(before.trim(), rejected, "the planted model leaks");
        let after =
            greedy(&bundle, &[planted.clone(), out.clone()], &[system.clone(), ChatMessage::user(q.clone())], 24);
        assert_eq!(after.trim(), chosen, "with the forget-adapter, under the positive condition");
    }
}

/// Writes `params` as a PEFT directory the way training does.
fn save(dir: &Path, m: &BaseModel, layout: &LoraLayout, lora: &LoraSettings, params: &[f32]) {
    lethe::train::output::AdapterFiles {
        layout,
        params,
        cfg: &m.cfg,
        lora,
        base_model: "tiny".into(),
        profile: None,
        record: json!({}),
    }
    .write(dir)
    .unwrap();
}

/// Serving's logits for the last position of `ids` with `adapters`, f32 weights.
fn serving_logits(
    model: &Path,
    tokenizer: Option<&Path>,
    backend: Backend,
    adapters: &[PathBuf],
    ids: &[u32],
) -> Vec<f32> {
    let opts = LoadOptions { backend, weights: WeightFormat::F32, ..Default::default() };
    let bundle = ModelBundle::load(model, &opts, tokenizer).unwrap();
    let m = &bundle.model;
    let weights: Vec<_> = adapters.iter().map(|d| Arc::new(peft::load(d, m).unwrap().weights)).collect();
    let mut kv = m.new_kv_cache_with_dtype(1 << 24, lethe::model::KvDtype::F32);
    let seq = kv.add_sequence();
    let logits = m
        .forward(&RaggedBatch::new(vec![BatchEntry::last(seq, ids.to_vec()).with_adapters(weights)]), &mut kv)
        .unwrap();
    logits.last(0).to_vec()
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale
}

/// Training's forward and serving's agree on the same adapter — a trained one stacked on a
/// frozen one — for the HF layout and for GGUF (whose q/k rows llama.cpp permutes: the saved
/// adapter must be in the HF layout, so the GGUF-trained adapter also works on the HF model).
#[test]
fn training_and_serving_agree_on_hf_and_gguf_bases() {
    let dir = TempDir::new("train-parity").unwrap();
    let spec = TinySpec { layers: 2, ..Default::default() };
    let hf = write_tiny_model(&dir.path().join("hf"), &spec).unwrap();
    let gguf =
        write_tiny_gguf(&hf, &dir.path().join("tiny.gguf"), &spec, candle_core::quantized::GgmlDType::F32).unwrap();
    let tokenizer = hf.join("tokenizer.json");
    let ids: Vec<u32> = (0..23).map(|i| (i * 13 + 5) % 300).collect();
    let lora = settings(4);

    // A frozen adapter written from the HF side.
    let (hf_model, _) = base(&hf, &[]);
    let layout = LoraLayout::new(&hf_model.cfg, &lora);
    let frozen = dir.path().join("frozen");
    save(&frozen, &hf_model, &layout, &lora, &random_params(&layout, 21, 0.3));

    for (name, model, tok) in [("hf", &hf, None), ("gguf", &gguf, Some(tokenizer.as_path()))] {
        let mut src = ModelSource::open(model, tok).unwrap();
        let f = peft::read(&frozen, &src.config).unwrap();
        let m = BaseModel::load(src.config.clone(), src.weights.as_mut(), &[f]).unwrap();
        let params = random_params(&layout, 22, 0.3);
        let ours = m.next_token_logits(Adapter { layout: &layout, params: &params, dropout: None }, &ids).unwrap();
        let trained = dir.path().join(format!("trained-{name}"));
        save(&trained, &m, &layout, &lora, &params);
        for backend in [Backend::Native, Backend::Candle] {
            let theirs = serving_logits(model, tok, backend, &[frozen.clone(), trained.clone()], &ids);
            // Serving keeps LoRA factors in f16 on the native backend.
            let d = max_rel_diff(&ours, &theirs);
            assert!(d < 2e-3, "{name} {backend:?}: relative difference {d}");
        }
        // The adapter trained on the GGUF base, on the HF base: the same model, the same logits.
        let on_hf = serving_logits(&hf, None, Backend::Candle, &[frozen.clone(), trained.clone()], &ids);
        let d = max_rel_diff(&ours, &on_hf);
        assert!(d < 1e-3, "{name}-trained adapter on the HF base: relative difference {d}");
    }
}

/// The saved directory: lethe's loader takes it; PEFT's conventions checked from Python with
/// `safetensors` and `json` (key names, shapes, dtypes, metadata, config fields).
#[test]
fn the_output_is_a_peft_directory() {
    let dir = TempDir::new("train-peft").unwrap();
    let model = tiny(dir.path());
    let out = dir.path().join("forget");
    let mut cfg = TrainConfig::new(
        model.clone(),
        pairs_data(dir.path()),
        out.clone(),
        Objective::Orpo { beta: 0.1, nll_on: NllOn::PromptAndCompletion },
    );
    cfg.cfg_aware = Some(Conditions::default());
    cfg.profile = Some(peft::GuidanceProfile {
        positive: "Do not.".into(),
        negative: "Do.".into(),
        gamma: Some(3.0),
        mode: Some(lethe::guidance::GuidanceMode::Prob),
    });
    cfg.lora.targets = vec![lethe::model::ProjKind::Q, lethe::model::ProjKind::V, lethe::model::ProjKind::Down];
    cfg.epochs = 1;
    lethe::train::run(&cfg, &AtomicBool::new(false)).unwrap();
    let names: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    for f in ["adapter_config.json", "adapter_model.safetensors", "lethe.json", "training.json"] {
        assert!(names.contains(&f.to_string()), "{f} missing in {names:?}");
    }
    let bundle = ModelBundle::load(&model, &LoadOptions::default(), None).unwrap();
    let a = peft::load(&out, &bundle.model).unwrap();
    assert_eq!((a.rank, a.modules), (16, 2 * 3));
    assert_eq!(a.profile.unwrap().gamma, Some(3.0));
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("training.json")).unwrap()).unwrap();
    assert_eq!(record["data"]["examples"], 6);
    assert_eq!(record["data"]["sha256"].as_str().unwrap().len(), 64);
    assert!(record["result"]["final_metrics"]["rewards/margins"].is_number());
    assert!(!dir.path().join("forget.checkpoint").exists() && !dir.path().join("forget.tmp").exists());

    let Some(python) = common::python_with(&["safetensors", "numpy"]) else { return };
    let out_py = std::process::Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/check_peft.py"))
        .arg(&out)
        .args([
            "--layers",
            "2",
            "--hidden",
            "64",
            "--kv",
            "32",
            "--ffn",
            "128",
            "--rank",
            "16",
            "--modules",
            "q_proj,v_proj,down_proj",
        ])
        .output()
        .unwrap();
    assert!(
        out_py.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out_py.stdout),
        String::from_utf8_lossy(&out_py.stderr)
    );
}

/// Ctrl-C after a step leaves a checkpoint and no output; `--resume` finishes the run with the
/// same result as an uninterrupted one.
#[test]
fn an_interrupted_run_resumes_to_the_same_adapter() {
    let dir = TempDir::new("train-resume").unwrap();
    let model = tiny(dir.path());
    let data = pairs_data(dir.path());
    let make = |out: &str| {
        let mut c = TrainConfig::new(
            model.clone(),
            data.clone(),
            dir.path().join(out),
            Objective::Orpo { beta: 0.1, nll_on: NllOn::PromptAndCompletion },
        );
        (c.epochs, c.batch_size, c.lr, c.lora.lora_dropout) = (2, 1, 1e-3, 0.1);
        c
    };
    let full = make("full");
    lethe::train::run(&full, &AtomicBool::new(false)).unwrap();

    let cut = make("cut");
    match lethe::train::run(&cut, &AtomicBool::new(true)) {
        Err(TrainError::Interrupted { step: 1, checkpoint }) => assert!(checkpoint.join("state.json").exists()),
        other => panic!("expected an interruption after step 1, got {other:?}"),
    }
    assert!(!cut.out.exists(), "no half-trained adapter");
    // Resuming with other settings is refused.
    let mut other = make("cut");
    other.resume = true;
    other.lr = 2e-3;
    assert!(matches!(lethe::train::run(&other, &AtomicBool::new(false)), Err(TrainError::Resume(_))));
    let mut resumed = make("cut");
    resumed.resume = true;
    let s = lethe::train::run(&resumed, &AtomicBool::new(false)).unwrap();
    assert_eq!(s.steps, 6);
    let read = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    let (a, b) = (read(&full.out), read(&resumed.out));
    let fa = safetensors::SafeTensors::deserialize(&a).unwrap();
    let fb = safetensors::SafeTensors::deserialize(&b).unwrap();
    for (name, t) in fa.tensors() {
        let u = fb.tensor(&name).unwrap();
        let (x, y) = (t.data(), u.data());
        let diff = x.chunks_exact(4).zip(y.chunks_exact(4)).map(|(p, q)| {
            (f32::from_le_bytes(p.try_into().unwrap()) - f32::from_le_bytes(q.try_into().unwrap())).abs()
        });
        let worst = diff.fold(0f32, f32::max);
        assert!(worst < 1e-5, "{name}: resumed differs by {worst}");
    }
}

fn expect_data_error(model: &Path, dir: &Path, rows: &str, objective: Objective, needle: &str) {
    let data = dir.join("bad.jsonl");
    std::fs::write(&data, rows).unwrap();
    let out = dir.join("never");
    let cfg = TrainConfig::new(model.to_path_buf(), data, out.clone(), objective);
    let err = lethe::train::run(&cfg, &AtomicBool::new(false)).unwrap_err().to_string();
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert!(!out.exists() && !dir.join("never.tmp").exists(), "nothing written for: {err}");
}

#[test]
fn bad_input_is_refused_with_its_line_and_field() {
    let dir = TempDir::new("train-bad").unwrap();
    let model = tiny(dir.path());
    let orpo = Objective::Orpo { beta: 0.1, nll_on: NllOn::PromptAndCompletion };
    let sft = Objective::Sft { train_on_prompt: false };
    let good = r#"{"prompt": "a", "chosen": "b", "rejected": "c"}"#;
    expect_data_error(
        &model,
        dir.path(),
        &format!("{good}\n{{not json\n"),
        orpo.clone(),
        "bad.jsonl:2: not valid JSON",
    );
    expect_data_error(
        &model,
        dir.path(),
        r#"{"prompt": "a", "chosen": "b"}"#,
        orpo.clone(),
        "bad.jsonl:1: field \"rejected\": missing",
    );
    expect_data_error(
        &model,
        dir.path(),
        r#"{"prompt": "a", "chosen": "  ", "rejected": "c"}"#,
        orpo.clone(),
        "field \"chosen\": empty completion",
    );
    expect_data_error(
        &model,
        dir.path(),
        r#"{"prompt": 3, "chosen": "b", "rejected": "c"}"#,
        orpo.clone(),
        "field \"prompt\"",
    );
    expect_data_error(
        &model,
        dir.path(),
        r#"{"prompt": [{"role": "wizard", "content": "x"}], "chosen": "b", "rejected": "c"}"#,
        orpo.clone(),
        "unknown role \"wizard\"",
    );
    let long = format!(r#"{{"prompt": "{}", "chosen": "b", "rejected": "c"}}"#, "word ".repeat(600));
    expect_data_error(&model, dir.path(), &long, orpo.clone(), "leaves no room for the answer within --max-length 512");
    expect_data_error(&model, dir.path(), "\n\n", orpo, "no examples");
    expect_data_error(
        &model,
        dir.path(),
        r#"{"messages": [{"role": "user", "content": "hi"}]}"#,
        sft.clone(),
        "no assistant message",
    );
    expect_data_error(&model, dir.path(), r#"{"input": "x"}"#, sft, "expected \"messages\"");

    // An adapter made for another model shape, stacked with --on.
    let other = write_tiny_model(
        &dir.path().join("other"),
        &TinySpec { hidden: 32, heads: 2, kv_heads: 1, layers: 2, ..Default::default() },
    )
    .unwrap();
    let (om, _) = base(&other, &[]);
    let lora = settings(2);
    let layout = LoraLayout::new(&om.cfg, &lora);
    let foreign = dir.path().join("foreign");
    save(&foreign, &om, &layout, &lora, &random_params(&layout, 1, 0.1));
    let mut cfg = TrainConfig::new(
        model.clone(),
        pairs_data(dir.path()),
        dir.path().join("never"),
        Objective::Sft { train_on_prompt: false },
    );
    cfg.on = vec![foreign];
    let err = lethe::train::run(&cfg, &AtomicBool::new(false)).unwrap_err().to_string();
    assert!(err.contains("--on") && err.contains("expected [2, 64]"), "{err}");
    assert!(!dir.path().join("never").exists());
}

/// The command line: a bad file is an error exit with the message, and nothing is written.
#[test]
fn the_cli_fails_cleanly_on_bad_data() {
    let dir = TempDir::new("train-cli").unwrap();
    let model = tiny(dir.path());
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, "{\"prompt\": \"x\"}\n").unwrap();
    let out = dir.path().join("adapter");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_lethe"))
        .args(["forget", "--quiet", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("d.jsonl:1: field \"chosen\": missing"), "{err}");
    assert!(!out.exists());
}
