//! The training loop: examples in shuffled micro-batches, gradients accumulated over
//! `grad_accum` of them per optimizer step (each micro-batch's loss weighted `1/grad_accum`, as
//! HF's Trainer does), clipped, AdamW with the cosine schedule; metrics logged per step,
//! held-out loss per epoch, checkpoints on request and on Ctrl-C, the PEFT directory at the end.

use super::TrainError;
use super::data::{Condition, DataReader};
use super::lora::{Dropout, LoraLayout, LoraSettings};
use super::model::{Adapter, BaseModel};
use super::objective::{Example, Metrics, Objective};
use super::optim::{AdamW, AdamWSettings, clip_grad_norm, lr_at};
use super::output::{AdapterFiles, Checkpoint, CheckpointState, sibling};
use crate::adapters::peft::{self, GuidanceProfile};
use crate::engine::Conditions;
use crate::loader::ModelSource;
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Everything a training run needs.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// A .gguf file or an HF directory (the base model).
    pub model: PathBuf,
    pub tokenizer: Option<PathBuf>,
    /// Trained adapters stacked on the base and frozen (a company fine-tune, say).
    pub on: Vec<PathBuf>,
    pub data: PathBuf,
    pub eval_data: Option<PathBuf>,
    pub out: PathBuf,
    pub objective: Objective,
    /// The CFG-aware regime: every pair under the positive condition, and swapped under the
    /// negative one. `None`: pairs as written, without conditions.
    pub cfg_aware: Option<Conditions>,
    /// `lethe.json` to write beside the adapter (forget-adapters).
    pub profile: Option<GuidanceProfile>,
    pub lora: LoraSettings,
    pub adamw: AdamWSettings,
    pub epochs: usize,
    pub lr: f64,
    /// The cosine schedule decays to `lr_floor · lr` (the paper: 0.1).
    pub lr_floor: f64,
    /// Linear warm-up over this fraction of the steps.
    pub warmup_ratio: f64,
    pub max_grad_norm: f64,
    /// Examples per micro-batch (an ORPO example is a pair: two sequences).
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_length: usize,
    pub seed: u64,
    /// Stop after this many optimizer steps (benchmarks, smoke tests).
    pub max_steps: Option<usize>,
    /// Also checkpoint every this many steps (0: only when interrupted).
    pub save_every: usize,
    pub resume: bool,
    /// One JSON object per step (and per evaluation) appended here.
    pub log: Option<PathBuf>,
    pub progress: bool,
}

/// What a finished run reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub examples: usize,
    pub tokens: u64,
    pub seconds: f64,
    pub tokens_per_second: f64,
    pub final_metrics: Metrics,
    pub eval_metrics: Option<Metrics>,
    pub peak_rss_mib: f64,
    pub truncated_completions: usize,
}

impl TrainConfig {
    /// A run with the paper's settings (LoRA r 16, α 32, dropout 0.01 on all linear layers;
    /// AdamW lr 1e-4, cosine to 10 %, clipping 1.0; 3 epochs of batch 2) and no conditions.
    pub fn new(model: PathBuf, data: PathBuf, out: PathBuf, objective: Objective) -> Self {
        Self {
            model,
            tokenizer: None,
            on: Vec::new(),
            data,
            eval_data: None,
            out,
            objective,
            cfg_aware: None,
            profile: None,
            lora: LoraSettings {
                r: 16,
                lora_alpha: 32.0,
                lora_dropout: 0.01,
                use_rslora: false,
                targets: crate::model::ProjKind::ALL.to_vec(),
            },
            adamw: AdamWSettings::default(),
            epochs: 3,
            lr: 1e-4,
            lr_floor: 0.1,
            warmup_ratio: 0.0,
            max_grad_norm: 1.0,
            batch_size: 2,
            grad_accum: 1,
            max_length: 512,
            seed: 0,
            max_steps: None,
            save_every: 0,
            resume: false,
            log: None,
            progress: false,
        }
    }

    fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: &str| Err(TrainError::Config(m.into()));
        if self.lora.r == 0 {
            return bad("--rank must be at least 1");
        }
        if !(0.0..1.0).contains(&self.lora.lora_dropout) {
            return bad("--dropout must be in [0, 1)");
        }
        if !self.lora.lora_alpha.is_finite() || self.lora.lora_alpha <= 0.0 {
            return bad("--alpha must be a positive number");
        }
        if !self.lr.is_finite() || self.lr <= 0.0 {
            return bad("--lr must be a positive number");
        }
        if self.epochs == 0 || self.batch_size == 0 || self.grad_accum == 0 {
            return bad("--epochs, --batch-size and --grad-accum must be at least 1");
        }
        if self.max_length < 2 {
            return bad("--max-length must be at least 2");
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) || !(0.0..=1.0).contains(&self.lr_floor) {
            return bad("--warmup-ratio must be in [0, 1) and the learning-rate floor in [0, 1]");
        }
        if let Objective::Orpo { beta, .. } = self.objective
            && (!beta.is_finite() || beta <= 0.0)
        {
            return bad("--beta must be a positive number");
        }
        if self.out.exists() {
            return Err(TrainError::Config(format!(
                "{} already exists: choose another --out (nothing is overwritten)",
                self.out.display()
            )));
        }
        Ok(())
    }

    /// The settings a resumed run must share with the run it resumes (not the paths of logs,
    /// not whether a progress bar is drawn).
    fn fingerprint(&self, data_hash: &str, model_hash: &str) -> String {
        let v = json!({
            "objective": self.objective, "cfg_aware": self.cfg_aware, "lora": self.lora, "adamw": self.adamw,
            "epochs": self.epochs, "lr": self.lr, "lr_floor": self.lr_floor, "warmup_ratio": self.warmup_ratio,
            "max_grad_norm": self.max_grad_norm, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
            "max_length": self.max_length, "seed": self.seed, "max_steps": self.max_steps,
            "data": data_hash, "model": model_hash, "on": self.on,
        });
        sha256_hex(v.to_string().as_bytes())
    }
}

/// Runs training; `stop` is polled after every optimizer step (Ctrl-C).
pub fn run(cfg: &TrainConfig, stop: &AtomicBool) -> Result<TrainSummary, TrainError> {
    cfg.validate()?;
    let started = Instant::now();
    let mut source = ModelSource::open(&cfg.model, cfg.tokenizer.as_deref())?;
    let frozen = cfg
        .on
        .iter()
        .map(|dir| {
            peft::read(dir, &source.config).map_err(|e| TrainError::Invalid(format!("--on {}: {e}", dir.display())))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let model = BaseModel::load(source.config.clone(), source.weights.as_mut(), &frozen)?;
    drop(source.weights);

    let mut reader = DataReader::new(&source.tokenizer, cfg.max_length);
    let train = read_examples(&mut reader, cfg, &cfg.data)?;
    let eval = cfg.eval_data.as_deref().map(|p| read_examples(&mut reader, cfg, p)).transpose()?;
    let truncated = reader.truncated;
    if truncated > 0 {
        tracing::warn!(truncated, max_length = cfg.max_length, "completions were cut to fit --max-length");
    }

    let data_hash = hash_file(&cfg.data)?;
    let model_hash = hash_path(&cfg.model)?;
    let fingerprint = cfg.fingerprint(&data_hash, &model_hash);
    let layout = LoraLayout::new(&model.cfg, &cfg.lora);
    let mut params = layout.init(cfg.seed);
    let mut opt = AdamW::new(cfg.adamw, layout.len);
    let checkpoint = sibling(&cfg.out, "checkpoint");
    let mut first_step = 0;
    if cfg.resume {
        let (state, [p, m, v]) = Checkpoint::load(&checkpoint, layout.len)?;
        if state.fingerprint != fingerprint {
            return Err(TrainError::Resume(format!(
                "{} was written by a run with other settings, data or model",
                checkpoint.display()
            )));
        }
        (params, opt.m, opt.v, opt.t, first_step) = (p, m, v, state.adam_t, state.step);
    }

    let micro_per_epoch = train.len().div_ceil(cfg.batch_size);
    let steps_per_epoch = micro_per_epoch.div_ceil(cfg.grad_accum);
    let total_steps = cfg.max_steps.map_or(steps_per_epoch * cfg.epochs, |m| m.min(steps_per_epoch * cfg.epochs));
    let warmup = (cfg.warmup_ratio * total_steps as f64).ceil() as usize;
    let mut log = cfg.log.as_deref().map(open_log).transpose()?;
    let bar = progress_bar(cfg.progress, total_steps, first_step);
    tracing::info!(
        examples = train.len(),
        steps = total_steps,
        parameters = layout.len,
        threads = rayon::current_num_threads(),
        "training {}",
        describe(cfg)
    );

    let mut grads = vec![0f32; layout.len];
    let mut step = 0;
    let (mut tokens, mut last_metrics, mut eval_metrics) = (0u64, Metrics::new(), None);
    let loop_started = Instant::now();
    'epochs: for epoch in 0..cfg.epochs {
        let order = shuffled(train.len(), cfg.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9));
        let micro: Vec<&[usize]> = order.chunks(cfg.batch_size).collect();
        for group in micro.chunks(cfg.grad_accum) {
            if step >= total_steps {
                break 'epochs;
            }
            if step < first_step {
                step += 1;
                continue;
            }
            let t0 = Instant::now();
            grads.fill(0.0);
            let mut metrics = Metrics::new();
            let mut step_tokens = 0;
            for (i, ids) in group.iter().enumerate() {
                let examples: Vec<&Example> = ids.iter().map(|&i| &train[i]).collect();
                let plan = cfg.objective.plan(&examples);
                let mask_seed = cfg.seed ^ (((step as u64) << 20) | i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let dropout = Dropout { p: cfg.lora.lora_dropout, seed: mask_seed };
                let adapter = Adapter { layout: &layout, params: &params, dropout: Some(dropout) };
                let (logp, tape) = model.forward(adapter, &plan.batch, true)?;
                let (_, coef, m) = cfg.objective.loss(&plan, &logp, 1.0 / group.len() as f64);
                model.backward(adapter, &plan.batch, tape.expect("kept"), &coef, &mut grads);
                add_metrics(&mut metrics, &m, 1.0 / group.len() as f64);
                step_tokens += plan.batch.tokens.len();
            }
            let loss = metrics.get("loss").copied().unwrap_or(f64::NAN);
            if !loss.is_finite() {
                return Err(TrainError::Diverged { step, loss });
            }
            let grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm);
            let lr = lr_at(step, total_steps, warmup, cfg.lr, cfg.lr_floor);
            opt.step(&mut params, &grads, lr);
            step += 1;
            tokens += step_tokens as u64;
            let secs = t0.elapsed().as_secs_f64();
            let tps = step_tokens as f64 / secs;
            if let Some(f) = log.as_mut() {
                let mut row = json!({"step": step, "epoch": step as f64 / steps_per_epoch as f64,
                    "learning_rate": lr, "grad_norm": grad_norm, "tokens": step_tokens, "tokens_per_second": tps});
                extend(&mut row, &metrics, "");
                write_log(f, &row)?;
            }
            bar.set_position(step as u64);
            bar.set_message(step_message(&metrics, tps));
            last_metrics = metrics;
            if stop.load(Ordering::Relaxed) || (cfg.save_every > 0 && step % cfg.save_every == 0) {
                let state = CheckpointState { step, fingerprint: fingerprint.clone(), adam_t: opt.t, history_len: 0 };
                Checkpoint::save(&checkpoint, &state, &params, &opt.m, &opt.v)?;
                if stop.load(Ordering::Relaxed) {
                    bar.abandon();
                    return Err(TrainError::Interrupted { step, checkpoint });
                }
            }
        }
        if let Some(eval) = &eval {
            let m = evaluate(&model, &layout, &params, &cfg.objective, eval, cfg.batch_size)?;
            bar.println(format!("epoch {}: held-out {}", epoch + 1, step_message(&m, f64::NAN)));
            if let Some(f) = log.as_mut() {
                let mut row = json!({"step": step, "epoch": epoch + 1});
                extend(&mut row, &m, "eval/");
                write_log(f, &row)?;
            }
            eval_metrics = Some(m);
        }
    }
    bar.finish();
    let seconds = loop_started.elapsed().as_secs_f64();
    let summary = TrainSummary {
        steps: step,
        examples: train.len(),
        tokens,
        seconds,
        tokens_per_second: tokens as f64 / seconds.max(1e-9),
        final_metrics: last_metrics,
        eval_metrics,
        peak_rss_mib: peak_rss_mib(),
        truncated_completions: truncated,
    };
    let record = json!({
        "lethe_version": env!("CARGO_PKG_VERSION"),
        "created_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        "base_model": {"path": cfg.model, "sha256": model_hash, "name": model.cfg.name},
        "stacked_adapters": cfg.on.iter().zip(&frozen).map(|(p, f)| json!({"path": p, "content_hash": f.content_hash})).collect::<Vec<_>>(),
        "data": {"path": cfg.data, "sha256": data_hash, "examples": train.len()},
        "eval_data": cfg.eval_data,
        "objective": cfg.objective,
        "cfg_aware": cfg.cfg_aware,
        "lora": cfg.lora,
        "optimizer": {"type": "adamw", "settings": cfg.adamw, "lr": cfg.lr, "schedule": "cosine", "lr_floor": cfg.lr_floor,
            "warmup_ratio": cfg.warmup_ratio, "max_grad_norm": cfg.max_grad_norm},
        "epochs": cfg.epochs, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
        "max_length": cfg.max_length, "seed": cfg.seed, "max_steps": cfg.max_steps,
        "result": summary,
        "wall_seconds": started.elapsed().as_secs_f64(),
    });
    AdapterFiles {
        layout: &layout,
        params: &params,
        cfg: &model.cfg,
        lora: &cfg.lora,
        base_model: model.cfg.name.clone(),
        profile: cfg.profile.as_ref(),
        record,
    }
    .write(&cfg.out)?;
    let _ = std::fs::remove_dir_all(&checkpoint);
    Ok(summary)
}

fn read_examples(reader: &mut DataReader, cfg: &TrainConfig, path: &Path) -> Result<Vec<Example>, TrainError> {
    match cfg.objective {
        Objective::Sft { .. } => reader.sft(path),
        Objective::Orpo { .. } => {
            let conditions = match &cfg.cfg_aware {
                Some(c) => vec![(Condition::Sentence(&c.positive), false), (Condition::Sentence(&c.negative), true)],
                None => vec![(Condition::None, false)],
            };
            reader.pairs(path, &conditions)
        }
    }
}

/// The objective's loss and metrics on `examples` (no dropout, no gradients).
pub fn evaluate(
    model: &BaseModel,
    layout: &LoraLayout,
    params: &[f32],
    objective: &Objective,
    examples: &[Example],
    batch_size: usize,
) -> Result<Metrics, TrainError> {
    let mut metrics = Metrics::new();
    let chunks: Vec<&[Example]> = examples.chunks(batch_size).collect();
    for chunk in &chunks {
        let refs: Vec<&Example> = chunk.iter().collect();
        let plan = objective.plan(&refs);
        let adapter = Adapter { layout, params, dropout: None };
        let (logp, _) = model.forward(adapter, &plan.batch, false)?;
        let (_, _, m) = objective.loss(&plan, &logp, 1.0);
        add_metrics(&mut metrics, &m, chunk.len() as f64 / examples.len() as f64);
    }
    Ok(metrics)
}

fn add_metrics(acc: &mut Metrics, m: &Metrics, weight: f64) {
    for (k, v) in m {
        *acc.entry(k).or_default() += v * weight;
    }
}

fn extend(row: &mut serde_json::Value, m: &Metrics, prefix: &str) {
    let obj = row.as_object_mut().expect("an object");
    for (k, v) in m {
        obj.insert(format!("{prefix}{k}"), json!(v));
    }
}

fn step_message(m: &Metrics, tps: f64) -> String {
    let mut s = format!("loss {:.4}", m.get("loss").copied().unwrap_or(f64::NAN));
    if let Some(margin) = m.get("rewards/margins") {
        s += &format!(" margin {margin:+.4} acc {:.2}", m.get("rewards/accuracies").copied().unwrap_or(0.0));
    }
    if tps.is_finite() {
        s += &format!(" {tps:.0} tok/s");
    }
    s
}

fn describe(cfg: &TrainConfig) -> String {
    match &cfg.objective {
        Objective::Sft { .. } => "SFT".into(),
        Objective::Orpo { beta, .. } => {
            format!("ORPO β={beta}{}", if cfg.cfg_aware.is_some() { ", CFG-aware" } else { "" })
        }
    }
}

fn progress_bar(show: bool, total: usize, done: usize) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} step {pos}/{len} {msg} [{elapsed_precise}, ETA {eta_precise}]",
        )
        .expect("a valid template"),
    );
    bar.set_position(done as u64);
    bar
}

/// A permutation of `0..n`, deterministic in `seed` (Fisher–Yates).
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = crate::sampling::Rng::new(seed);
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        v.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    v
}

fn open_log(path: &Path) -> Result<std::fs::File, TrainError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| TrainError::Io(format!("--log {}: {e}", path.display())))
}

fn write_log(f: &mut std::fs::File, row: &serde_json::Value) -> Result<(), TrainError> {
    writeln!(f, "{row}").map_err(|e| TrainError::Io(format!("--log: {e}")))
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

fn hash_file(path: &Path) -> Result<String, TrainError> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut f = std::fs::File::open(path).map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        use std::io::Read;
        let n = f.read(&mut buf).map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The hash of a model file, or of an HF directory's files (names and contents, sorted).
fn hash_path(path: &Path) -> Result<String, TrainError> {
    if !path.is_dir() {
        return hash_file(path);
    }
    let mut names: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    let mut all = String::new();
    for p in names {
        all += &format!("{} {}\n", p.file_name().unwrap_or_default().to_string_lossy(), hash_file(&p)?);
    }
    Ok(sha256_hex(all.as_bytes()))
}

/// Peak resident memory of the process, MiB (`VmHWM`).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}
