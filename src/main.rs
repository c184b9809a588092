//! The `lethe` command line: a thin layer over the library.

use anyhow::{Context, Result, bail};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use lethe::engine::{Conditions, EngineConfig, EngineHandle, Event, Request, UncondSource, prompt};
use lethe::guidance::{Guidance, GuidanceMode};
use lethe::loader::ModelBundle;
use lethe::model::{Backend, LoadOptions, WeightFormat};
use lethe::sampling::SamplingParams;
use lethe::tokenizer::ChatMessage;
use std::io::Write;
use std::path::PathBuf;

/// lethe: an LLM server that makes a model forget (LoRA forget-adapters + classifier-free guidance).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as `pretty` text or `json` objects (filter with RUST_LOG, e.g. `lethe=debug`).
    // Under its own heading: a global option would otherwise sit among each command's own.
    #[arg(long, global = true, env = "LETHE_LOG_FORMAT", default_value = "pretty", help_heading = "Global options")]
    log_format: lethe::telemetry::LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible HTTP API (default model: SmolLM2-135M-Instruct).
    Serve(Box<lethe::config::ServeArgs>),
    /// Generate text from a prompt, streaming it to stdout.
    Generate(GenerateArgs),
    /// Measure speed.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Train a LoRA adapter by supervised fine-tuning (e.g. a company fine-tune that plants
    /// facts). Writes a PEFT directory.
    Finetune(FinetuneArgs),
    /// Train a forget-adapter: ORPO on replacement data (chosen = answer without the data,
    /// rejected = the leaking answer), CFG-aware by default. Writes a PEFT directory with its
    /// guidance profile (lethe.json), ready for `POST /admin/adapters`.
    Forget(ForgetArgs),
    /// Write a synthetic company: planted facts, replacement pairs and held-out probes.
    Synth(SynthArgs),
    /// Measure forgetting: leakage, retention, utility and attacks, through the serving engine.
    Eval(EvalArgs),
    /// The CPU kernel sets this machine can run, and the one in use (LETHE_KERNELS chooses).
    Kernels {
        /// Only the names of the supported sets, best first, one per line (for scripts).
        #[arg(long)]
        list: bool,
    },
    /// Administer a running server (adapters, tenants, keys, audit log) through its admin API.
    Admin(lethe::admin_client::AdminArgs),
}

/// Settings shared by `finetune` and `forget`.
#[derive(Args)]
struct TrainArgs {
    /// The base model: a .gguf file (dequantized to f32 for training) or an HF directory.
    #[arg(long, env = "LETHE_MODEL", default_value = lethe::DEFAULT_MODEL_PATH)]
    model: PathBuf,
    /// A tokenizer.json to use instead of the model's own.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Training data, JSONL in TRL's formats (see the command's help).
    #[arg(long)]
    data: PathBuf,
    /// The adapter directory to write (must not exist; it appears only when training ends).
    #[arg(long)]
    out: PathBuf,
    /// A trained adapter stacked on the base and frozen (repeatable), e.g. the company
    /// fine-tune a forget-adapter must work on top of.
    #[arg(long = "on", value_name = "ADAPTER_DIR")]
    on: Vec<PathBuf>,
    /// Held-out data in the same format: its loss is reported after every epoch.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Passes over the training data.
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// Peak learning rate (AdamW); decays with a cosine to --lr-floor × lr.
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Where the cosine schedule ends, as a fraction of --lr (the paper: 10 %).
    #[arg(long, default_value_t = 0.1)]
    lr_floor: f64,
    /// Linear warm-up over this fraction of the steps.
    #[arg(long, default_value_t = 0.0)]
    warmup_ratio: f64,
    /// Examples per micro-batch (a preference example is a pair of sequences).
    #[arg(long, default_value_t = 2)]
    batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Longest sequence in tokens (prompt + answer); longer answers are cut, longer prompts
    /// are an error.
    #[arg(long, default_value_t = 512)]
    max_length: usize,
    /// Seed of the LoRA initialisation, dropout and data order (same seed, same adapter).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Threads (default: one per core).
    #[arg(long, env = "LETHE_THREADS")]
    threads: Option<usize>,
    /// LoRA rank r.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// LoRA alpha (scale alpha/r, or alpha/√r with --rslora).
    #[arg(long, default_value_t = 32.0)]
    alpha: f32,
    /// Dropout on the LoRA input (PEFT's lora_dropout).
    #[arg(long, default_value_t = 0.01)]
    dropout: f32,
    /// rsLoRA scaling alpha/√r.
    #[arg(long)]
    rslora: bool,
    /// Projections that get LoRA factors: all-linear, or a list of q,k,v,o,gate,up,down.
    #[arg(long, default_value = "all-linear")]
    target: String,
    /// AdamW weight decay (HF's default: 0).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Clip gradients to this global L2 norm (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    max_steps: Option<usize>,
    /// Also save a checkpoint every N steps (one is always saved on Ctrl-C).
    #[arg(long, default_value_t = 0)]
    save_every: usize,
    /// Continue from the checkpoint beside --out (`OUT.checkpoint`), left by Ctrl-C or
    /// --save-every; the run's settings, data and model must be the same.
    #[arg(long)]
    resume: bool,
    /// Append one JSON object per step (loss, TRL's metrics, learning rate, tokens/s) here.
    #[arg(long)]
    log: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// `lethe finetune`. Data: `{"messages": [...]}` (trains on the assistant turns),
/// `{"prompt", "completion"}` or `{"text"}`, one JSON object per line.
#[derive(Args)]
struct FinetuneArgs {
    #[command(flatten)]
    train: TrainArgs,
    /// Also train on the prompt's tokens (default: the completion only).
    #[arg(long)]
    train_on_prompt: bool,
}

/// `lethe forget`. Data: `{"prompt", "chosen", "rejected"}` per line (strings, or chat message
/// lists), chosen = the replacement answer, rejected = the answer that leaks.
#[derive(Args)]
struct ForgetArgs {
    #[command(flatten)]
    train: TrainArgs,
    /// ORPO's β (weight of the odds-ratio term).
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    /// Tokens of the NLL term: the chosen prompt and answer (TRL's default), or the answer only.
    #[arg(long, value_enum, default_value = "prompt-and-completion")]
    nll_on: lethe::train::NllOn,
    /// Train on the pairs as written, without conditions (ablation of the paper's CFG-aware
    /// regime, in which every pair is used under the positive condition and, swapped, under
    /// the negative one).
    #[arg(long)]
    no_cfg_aware: bool,
    /// The positive condition (the cond row's system sentence when served).
    #[arg(long, default_value = prompt::PAPER_POSITIVE)]
    positive: String,
    /// The negative condition (the uncond row's).
    #[arg(long, default_value = prompt::PAPER_NEGATIVE)]
    negative: String,
    /// Guidance scale the adapter is served at (written to lethe.json).
    #[arg(long, default_value_t = 3.0)]
    gamma: f32,
    /// Guidance mode the adapter is served with (written to lethe.json).
    #[arg(long, default_value = "prob")]
    mode: GuidanceMode,
    /// Where the condition goes in a conversation: `system` (it is the system message, before any
    /// the client sent) or `system_default` (added to the chat template's default system prompt,
    /// when the client sent none). Written to lethe.json; serving places it the same way.
    #[arg(long, default_value = "system")]
    placement: prompt::Placement,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Prefill and decode speed for a batch of sequences (model level), or through the engine
    /// with `--concurrency`.
    Decode(BenchDecodeArgs),
    /// Load-test an OpenAI-compatible server with streaming requests (TTFT, inter-token latency,
    /// throughput). Without --url, starts lethe in-process on loopback.
    Serve(BenchServeArgs),
    /// The cost of forget-adapters: load time of a synthetic rank-r all-linear PEFT adapter, and
    /// decode speed with no adapter, one adapter on every row, and rows spread over 4 adapters.
    Adapters(BenchAdaptersArgs),
    /// Numerical quality of each CPU kernel path: perplexity on a held-out text and mean KL of
    /// the next-token distributions to the exact f32 path (same weights, dequantized).
    Quality(BenchQualityArgs),
}

#[derive(Args)]
struct BenchQualityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A text file to score instead of the built-in held-out text.
    #[arg(long)]
    text: Option<PathBuf>,
    /// Score at most this many tokens of the text.
    #[arg(long, default_value_t = 1024)]
    max_tokens: usize,
    /// Kernel sets to measure (default: every one this CPU supports).
    #[arg(long, value_delimiter = ',')]
    kernels: Option<Vec<lethe::simd::Isa>>,
    /// Activation precisions to measure for quantized weights.
    #[arg(long, value_delimiter = ',', default_value = "int8,int16")]
    precisions: Vec<lethe::model::kernels::matmul::ActPrecision>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchAdaptersArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// LoRA rank of the synthetic adapters (all seven linear projections of every layer).
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Rows of the multi-row cases.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Prompt length of each sequence (random tokens).
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens decoded per sequence (the timed part).
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchServeArgs {
    /// A running server, e.g. http://127.0.0.1:8080 (default: start one in-process).
    #[arg(long)]
    url: Option<String>,
    #[command(flatten)]
    model: ModelArgs,
    /// Simultaneous streams; a list (`1,4,16`) runs each.
    #[arg(long, default_value = "1", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Requests per concurrency level (default: 4 × concurrency, at least 8).
    #[arg(long)]
    requests: Option<usize>,
    /// Guided requests (γ = 3, log mode).
    #[arg(long)]
    guided: bool,
    /// Run every level both unguided and guided.
    #[arg(long, conflicts_with = "guided")]
    both: bool,
    /// Words in the user message (≈ prompt tokens).
    #[arg(long, default_value_t = 100)]
    prompt_words: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// In-process only: also measure single-request decode speed through the engine directly,
    /// interleaved with single-stream HTTP runs, and report the HTTP/engine ratio.
    #[arg(long, conflicts_with = "url")]
    compare_engine: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Where the model comes from and how it runs.
#[derive(Args, Clone)]
struct ModelArgs {
    /// A .gguf file or an HF directory (config.json + *.safetensors + tokenizer.json).
    #[arg(long, env = "LETHE_MODEL", default_value = lethe::DEFAULT_MODEL_PATH)]
    model: PathBuf,
    /// A tokenizer.json to use instead of the model's own.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// auto (lethe's CPU kernels on the CPU, candle elsewhere), native, or candle.
    #[arg(long, default_value = "auto")]
    backend: Backend,
    /// native (keep the file's format), q8_0 (re-quantize at load), f32, or f16 / bf16
    /// (half-precision projections; the candle path, for a GPU).
    #[arg(long, default_value = "native")]
    weights: WeightFormat,
    /// Kernel threads (default: one per core).
    #[arg(long, env = "LETHE_THREADS")]
    threads: Option<usize>,
    /// KV cache element type: f16, q8 (int8 + scale per token and head) or f32.
    #[arg(long, default_value = "f16")]
    kv_dtype: lethe::model::KvDtype,
}

impl ModelArgs {
    fn load(&self) -> Result<ModelBundle> {
        if let Some(n) = self.threads {
            lethe::model::kernels::pool::init_global(n);
        }
        if !self.model.exists() && self.model == std::path::Path::new(lethe::DEFAULT_MODEL_PATH) {
            bail!(
                "the default model is not there yet: run scripts/fetch-model.sh (or pass --model PATH)\n  expected {}",
                self.model.display()
            );
        }
        let opts = LoadOptions {
            device: lethe::model::load::parse_device(&self.device)?,
            backend: self.backend,
            weights: self.weights,
        };
        ModelBundle::load(&self.model, &opts, self.tokenizer.as_deref())
            .with_context(|| format!("loading {}", self.model.display()))
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt (a user message with --chat).
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// A system message (with --chat).
    #[arg(long)]
    system: Option<String>,
    /// Tokens to generate at most (fewer if the model ends its answer or a --stop matches).
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 = greedy (the most likely token every time).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: sample among the most likely tokens whose probabilities add up to
    /// this (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Sample among the k most likely tokens only (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Seed of the sampler, for reproducible sampled output (default: a random one).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Guidance scale γ (1 = unguided; the uncond row is then not computed).
    #[arg(long, default_value_t = 1.0)]
    gamma: f32,
    /// How cond and uncond are mixed: log (HF/Sanchez) or prob (the paper's modified CFG).
    #[arg(long, default_value = "log")]
    mode: GuidanceMode,
    /// The positive condition (cond row's system sentence; default: the adapter's lethe.json,
    /// else the paper's).
    #[arg(long)]
    positive: Option<String>,
    /// A custom negative condition for the uncond row (default: the adapter's lethe.json, else
    /// the paper's negative sentence).
    #[arg(long)]
    negative: Option<String>,
    /// A LoRA adapter directory (PEFT) applied to every row; repeatable, stacked adapters are
    /// summed (e.g. a fine-tune and the forget-adapter trained on top of it).
    #[arg(long = "adapter", value_name = "DIR")]
    adapters: Vec<PathBuf>,
    /// Use only the last prompt token as the uncond row (Sanchez et al.'s default).
    #[arg(long, conflicts_with = "negative")]
    uncond_last_token: bool,
}

#[derive(Args)]
struct BenchDecodeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Sequences decoded together (model level); a list (`1,2`) measures several batch sizes
    /// side by side and reports step-time ratios.
    #[arg(long, default_value = "1", value_delimiter = ',')]
    batch: Vec<usize>,
    /// Prompt length of each sequence (random tokens).
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens decoded per sequence (the timed part).
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Model level: kernel sets to compare side by side, e.g. `avx512,avx2` (default: the
    /// process's, LETHE_KERNELS or the best).
    #[arg(long, value_delimiter = ',')]
    kernels: Option<Vec<lethe::simd::Isa>>,
    /// Model level: activation precisions to compare side by side, e.g. `int8,int16`.
    #[arg(long, value_delimiter = ',')]
    activations: Option<Vec<lethe::model::kernels::matmul::ActPrecision>>,
    /// Model level: weight prefetch distances (bytes) to compare side by side, e.g. `0,4096`
    /// (default: the process's, LETHE_PREFETCH_BYTES or 4096; x86 kernels only).
    #[arg(long, value_delimiter = ',', value_parser = lethe::model::kernels::matmul::parse_prefetch_bytes)]
    prefetch_bytes: Option<Vec<usize>>,
    /// Model level: also report where a decode step's time goes, stage by stage (projections,
    /// attention, row-wise work, LM head), for every case; e.g. with `--batch 1,2` what the
    /// second row of a CFG pair costs in each stage.
    #[arg(long, conflicts_with = "concurrency")]
    stages: bool,
    /// Run C simultaneous requests through the engine instead; a list (`1,8`) measures each.
    #[arg(long, value_delimiter = ',')]
    concurrency: Option<Vec<usize>>,
    /// Engine requests are CFG pairs (γ = 3, log mode).
    #[arg(long)]
    guided: bool,
    /// With --guided: also run every concurrency unguided, side by side, and report the ratio.
    #[arg(long, requires = "guided")]
    compare_unguided: bool,
    /// Engine requests are constrained to a JSON schema (structured outputs; `bench::BENCH_SCHEMA`).
    #[arg(long)]
    json_schema: bool,
    /// With --json-schema: also run every concurrency without the schema, side by side, and
    /// report the ratio.
    #[arg(long, requires = "json_schema")]
    compare_unconstrained: bool,
    /// Interleaved rounds for engine benchmarks (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Instead: time to first token of a short request (--prompt-tokens) while a prompt of this
    /// many tokens is being prefilled, against the same request on an idle engine.
    #[arg(long)]
    ttft_under_prefill: Option<usize>,
    /// With --concurrency: run every case without and with prefix caching, side by side
    /// (prompts are all distinct, so nothing is shared: the cost of the bookkeeping).
    #[arg(long)]
    compare_prefix_cache: bool,
    /// Instead: prefix caching against none. The second turn of a conversation whose first
    /// turn was a prompt of this many tokens answered with --gen-tokens tokens (time to first
    /// token), and --shared-requests requests submitted together sharing a --system-tokens
    /// prompt, each with a 32-token message of its own (prompt tokens computed).
    #[arg(long)]
    prefix_cache_history: Option<usize>,
    #[arg(long, default_value_t = 1000)]
    system_tokens: usize,
    #[arg(long, default_value_t = 8)]
    shared_requests: usize,
    /// Engine step budget for --ttft-under-prefill (prefill chunk size).
    #[arg(long, default_value_t = lethe::engine::SchedulerConfig::default().max_batch_tokens)]
    max_batch_tokens: usize,
    /// Instead of --model: a model of this shape with random weights, written as a Q4_1 GGUF
    /// to a temporary directory first: `135m` (SmolLM2-135M's layers, 30 × 576) or `1.1b`
    /// (TinyLlama-1.1B's, 22 × 2048: ~0.6 GB of weights, more than the L3 of the machines we
    /// test on, so a step reads them from DRAM, as CPUs with a smaller L3 read any model). The
    /// vocabulary is a tiny one (384 tokens), so the LM head is negligible. LETHE_MODEL is
    /// ignored then. The peak RSS reported includes writing the model (~3.7 GB for `1.1b`).
    #[arg(long)]
    random_model: Option<RandomModel>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Shapes of `lethe bench decode --random-model`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum RandomModel {
    #[value(name = "135m")]
    SmolLm2_135m,
    #[value(name = "1.1b")]
    TinyLlama1_1b,
}

impl RandomModel {
    fn spec(self) -> lethe::fixtures::TinySpec {
        let (layers, hidden, intermediate, heads, kv_heads) = match self {
            Self::SmolLm2_135m => (30, 576, 1536, 9, 3),
            Self::TinyLlama1_1b => (22, 2048, 5632, 32, 4),
        };
        lethe::fixtures::TinySpec {
            hidden,
            intermediate,
            layers,
            heads,
            kv_heads,
            max_positions: 2048,
            dtype: "F16",
            ..Default::default()
        }
    }

    /// Writes the model under `dir`; returns model arguments that load it (Q4_1 GGUF and the
    /// fixture's tokenizer).
    fn write(self, dir: &std::path::Path, base: &ModelArgs) -> Result<ModelArgs> {
        let spec = self.spec();
        let name = clap::ValueEnum::to_possible_value(&self).map(|v| v.get_name().to_owned()).unwrap_or_default();
        eprintln!("writing a random {name} model (Q4_1) under {} ...", dir.display());
        let hf = lethe::fixtures::write_tiny_model(&dir.join("hf"), &spec)?;
        let gguf = dir.join("random.Q4_1.gguf");
        lethe::fixtures::write_tiny_gguf(&hf, &gguf, &spec, candle_core::quantized::GgmlDType::Q4_1)?;
        // The F16 original is only needed for the conversion.
        std::fs::remove_file(hf.join("model.safetensors"))?;
        Ok(ModelArgs { model: gguf, tokenizer: Some(hf.join("tokenizer.json")), ..base.clone() })
    }
}

fn main() -> Result<()> {
    tune_allocator();
    let command = Cli::command().mut_subcommand("serve", lethe::config::ServeArgs::document_defaults);
    let cli = Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit());
    lethe::telemetry::init_logging(cli.log_format);
    // Which CPU kernels run (LETHE_KERNELS=avx512|avx2-vnni|avx2|neon-dotprod|neon|portable, or
    // the best this CPU has): one the CPU lacks is refused here, before any work.
    lethe::simd::init_from_env()?;
    let precision = lethe::model::kernels::matmul::act_precision_from_env().map_err(anyhow::Error::msg)?;
    lethe::model::kernels::matmul::set_act_precision(precision);
    let prefetch = lethe::model::kernels::matmul::prefetch_bytes_from_env().map_err(anyhow::Error::msg)?;
    lethe::model::kernels::matmul::set_prefetch_bytes(prefetch);
    match cli.command {
        Command::Serve(a) => serve(*a),
        Command::Generate(a) => generate(a),
        Command::Bench(BenchCommand::Decode(a)) => bench_decode(a),
        Command::Bench(BenchCommand::Serve(a)) => bench_serve(a),
        Command::Bench(BenchCommand::Adapters(a)) => bench_adapters(a),
        Command::Bench(BenchCommand::Quality(a)) => bench_quality(a),
        Command::Kernels { list } => {
            let supported = lethe::simd::Isa::supported();
            if list {
                supported.iter().for_each(|i| println!("{i}"));
            } else {
                let names: Vec<&str> = supported.iter().map(|i| i.name()).collect();
                println!(
                    "in use: {} kernels, {} activations, weight prefetch {} B",
                    lethe::simd::active(),
                    lethe::model::kernels::matmul::act_precision().name(),
                    lethe::model::kernels::matmul::prefetch_bytes()
                );
                println!("supported (best first): {}", names.join(", "));
                println!("CPU features: {}", lethe::simd::Isa::cpu_features());
            }
            Ok(())
        }
        Command::Finetune(a) => {
            let objective = lethe::train::Objective::Sft { train_on_prompt: a.train_on_prompt };
            train(&a.train, objective, None, None)
        }
        Command::Forget(a) => {
            let objective = lethe::train::Objective::Orpo { beta: a.beta, nll_on: a.nll_on };
            let conditions = Conditions { positive: a.positive.clone(), negative: a.negative.clone() };
            let profile = lethe::adapters::peft::GuidanceProfile {
                positive: a.positive,
                negative: a.negative,
                gamma: Some(a.gamma),
                mode: Some(a.mode),
                placement: Some(a.placement),
            };
            train(&a.train, objective, (!a.no_cfg_aware).then_some(conditions), Some(profile))
        }
        Command::Synth(a) => synth(a),
        Command::Eval(a) => eval(a),
        Command::Admin(a) => lethe::admin_client::run(a),
    }
}

/// Set by the SIGINT handler while training: the loop checkpoints and stops after its step.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn train(
    a: &TrainArgs,
    objective: lethe::train::Objective,
    cfg_aware: Option<Conditions>,
    profile: Option<lethe::adapters::peft::GuidanceProfile>,
) -> Result<()> {
    let lora = lethe::train::LoraSettings {
        r: a.rank,
        lora_alpha: a.alpha,
        lora_dropout: a.dropout,
        use_rslora: a.rslora,
        targets: lethe::train::lora::parse_targets(&a.target).map_err(anyhow::Error::msg)?,
    };
    let cfg = lethe::train::TrainConfig {
        model: a.model.clone(),
        tokenizer: a.tokenizer.clone(),
        on: a.on.clone(),
        data: a.data.clone(),
        eval_data: a.eval_data.clone(),
        out: a.out.clone(),
        objective,
        cfg_aware,
        placement: profile.as_ref().and_then(|p| p.placement).unwrap_or_default(),
        profile,
        lora,
        adamw: lethe::train::optim::AdamWSettings { weight_decay: a.weight_decay, ..Default::default() },
        epochs: a.epochs,
        lr: a.lr,
        lr_floor: a.lr_floor,
        warmup_ratio: a.warmup_ratio,
        max_grad_norm: a.max_grad_norm,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        max_length: a.max_length,
        seed: a.seed,
        max_steps: a.max_steps,
        save_every: a.save_every,
        resume: a.resume,
        log: a.log.clone(),
        progress: !a.quiet,
    };
    if !cfg.model.exists() && cfg.model == std::path::Path::new(lethe::DEFAULT_MODEL_PATH) {
        bail!("the default model is not there yet: run scripts/fetch-model.sh (or pass --model PATH)");
    }
    let threads = a.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    // SAFETY: installs a handler that only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    match pool.install(|| lethe::train::run(&cfg, &INTERRUPTED)) {
        Ok(s) => {
            eprintln!(
                "wrote {} — {} steps, {} examples, {:.0} tokens/s, {:.1} min, peak RSS {:.0} MiB; final {}",
                cfg.out.display(),
                s.steps,
                s.examples,
                s.tokens_per_second,
                s.seconds / 60.0,
                s.peak_rss_mib,
                serde_json::to_string(&s.final_metrics)?
            );
            Ok(())
        }
        Err(e @ lethe::train::TrainError::Interrupted { .. }) => {
            eprintln!("{e}");
            std::process::exit(130);
        }
        Err(e) => Err(e.into()),
    }
}

fn bench_quality(a: BenchQualityArgs) -> Result<()> {
    let candidate = a.model.load()?;
    let exact = ModelArgs { weights: WeightFormat::F32, ..a.model.clone() }.load()?;
    let text = match &a.text {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        None => lethe::quality::HELDOUT_TEXT.to_string(),
    };
    let isas = a.kernels.unwrap_or_else(lethe::simd::Isa::supported);
    let paths: Vec<_> = isas.iter().flat_map(|&i| a.precisions.iter().map(move |&p| (i, p))).collect();
    let r = lethe::quality::measure(&exact.model, &candidate.model, &candidate.tokenizer, &text, a.max_tokens, &paths)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "{} ({}), {} tokens of held-out text; f32 path: perplexity {:.3}, answer {:?}",
        r.model, r.weights, r.tokens, r.reference_perplexity, r.reference_answer
    );
    for p in &r.paths {
        println!(
            "  {:<13} {:<6} perplexity {:.3} | KL to f32 mean {:.6} p99 {:.6} | top-1 agreement {:.1}% | answer {:?}",
            p.kernels,
            p.activations,
            p.perplexity,
            p.mean_kl,
            p.p99_kl,
            100.0 * p.top1_agreement,
            p.answer
        );
    }
    Ok(())
}

fn serve(args: lethe::config::ServeArgs) -> Result<()> {
    let config = lethe::config::ServeConfig::resolve(&args)?;
    let addr = std::net::SocketAddr::new(config.host, config.port);
    let grace = std::time::Duration::from_secs(config.shutdown_grace_secs);
    let metrics_port = config.metrics_port;
    let admin_addr = config.admin_addr;
    let state = lethe::server::AppState::load(config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        // The bound address (port 0 picks a free one), so scripts can find the server.
        let addr = listener.local_addr()?;
        // The admin listener already serves /metrics: a metrics port on the same port is it.
        let metrics_port = metrics_port.filter(|p| admin_addr.is_none_or(|a| a.port() != *p));
        if let Some(port) = metrics_port {
            let maddr = std::net::SocketAddr::new(addr.ip(), port);
            let ml = tokio::net::TcpListener::bind(maddr).await.with_context(|| format!("binding {maddr}"))?;
            tracing::info!("metrics on http://{}/metrics", ml.local_addr()?);
            let app = lethe::server::metrics_router(state.clone());
            tokio::spawn(async move { axum::serve(ml, app).await });
        }
        let admin = match admin_addr {
            Some(a) => {
                let l = tokio::net::TcpListener::bind(a).await.with_context(|| format!("binding {a}"))?;
                tracing::info!("admin API and metrics on http://{}", l.local_addr()?);
                Some(l)
            }
            None => None,
        };
        tracing::info!(model = %state.model_id, fingerprint = %state.fingerprint, "serving on http://{addr} (Ctrl-C to stop)");
        lethe::server::serve_split(listener, admin, state, lethe::server::shutdown_signal(), grace).await?;
        anyhow::Ok(())
    })
}

fn generate(a: GenerateArgs) -> Result<()> {
    let bundle = a.model.load()?;
    let tok = &bundle.tokenizer;
    let guided = a.gamma != 1.0;
    let mut adapters = Vec::new();
    let mut profile = None;
    for dir in &a.adapters {
        let adapter =
            lethe::adapters::peft::load(dir, &bundle.model).with_context(|| format!("--adapter {}", dir.display()))?;
        profile = adapter.profile.or(profile);
        adapters.push(std::sync::Arc::new(adapter.weights));
    }
    let conds = Conditions {
        positive: a
            .positive
            .clone()
            .or(profile.as_ref().map(|p| p.positive.clone()))
            .unwrap_or_else(|| prompt::PAPER_POSITIVE.into()),
        negative: a
            .negative
            .clone()
            .or(profile.as_ref().map(|p| p.negative.clone()))
            .unwrap_or_else(|| prompt::PAPER_NEGATIVE.into()),
    };
    let source = if a.uncond_last_token { UncondSource::LastToken } else { UncondSource::NegativeCondition };
    let g = guided.then_some((&conds, &source));
    let rows = if a.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(ChatMessage::system(s.clone()));
        }
        msgs.push(ChatMessage::user(a.prompt.clone()));
        prompt::chat_rows(tok, &msgs, g)?
    } else {
        prompt::text_rows(tok, &a.prompt, g)?
    };
    let mut req = Request::new(rows.cond, a.max_tokens);
    req.sampling = SamplingParams { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed };
    req.stop = a.stop;
    req.adapters = adapters;
    if let Some(u) = rows.uncond {
        req = req.guided(u, Guidance { gamma: a.gamma, mode: a.mode });
    }
    let engine = EngineHandle::spawn(bundle.model.clone(), bundle.tokenizer.clone(), EngineConfig::default());
    let mut stream = engine.submit(req)?;
    let mut out = std::io::stdout().lock();
    while let Some(ev) = stream.blocking_next() {
        match ev {
            Event::Token { text, .. } => {
                out.write_all(text.as_bytes())?;
                out.flush()?;
            }
            Event::Finished { reason, usage, timing } => {
                writeln!(out)?;
                let gen_s = timing.total.saturating_sub(timing.time_to_first_token.unwrap_or_default()).as_secs_f64();
                // Decode speed counts the tokens after the first (the first one is the prefill's);
                // with a single token there is no decode to time.
                let speed = match usage.completion_tokens {
                    0 | 1 => "no decode".to_string(),
                    n => format!("{:.1} tok/s", (n - 1) as f64 / gen_s.max(1e-9)),
                };
                eprintln!(
                    "[{} | {} prompt + {} generated tokens | first token {:.0} ms | {} | {}{}]",
                    reason.as_str(),
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    timing.time_to_first_token.unwrap_or_default().as_secs_f64() * 1e3,
                    speed,
                    bundle.model.weights_desc(),
                    if guided { format!(" | guided γ={} {}", a.gamma, a.mode.as_str()) } else { String::new() },
                );
                break;
            }
            Event::Error(e) => bail!("generation failed: {e}"),
        }
    }
    engine.shutdown(std::time::Duration::from_secs(1));
    Ok(())
}

fn bench_adapters(a: BenchAdaptersArgs) -> Result<()> {
    let bundle = a.model.load()?;
    let dir = lethe::fixtures::TempDir::new("bench-adapters")?;
    eprintln!("writing 4 synthetic rank-{} adapters under {} ...", a.rank, dir.path().display());
    let r = lethe::bench::adapters(
        &bundle.model,
        dir.path(),
        a.rank,
        a.batch,
        a.prompt_tokens,
        a.gen_tokens,
        a.model.kv_dtype,
    )?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "{} ({}, {} kernels), rank-{} all-linear adapter: {:.1} MiB in memory (f16), {:.1} MiB on disk (f32), loaded in {:.0} ms",
        r.model,
        r.weights,
        r.kernels,
        r.rank,
        r.adapter_bytes as f64 / (1 << 20) as f64,
        r.adapter_file_bytes as f64 / (1 << 20) as f64,
        r.load_ms
    );
    for (label, d) in &r.cases {
        println!("  {label:<20} decode {:>7.1} tok/s ({:.2} ms/step)", d.decode_tok_s, d.step_ms);
    }
    println!(
        "ratios: 1 row with/without adapter {:.3}; {} rows with/without {:.3}; {} rows on 4 adapters / on 1 adapter {:.3}",
        r.one_row_ratio, a.batch, r.batch_adapter_ratio, a.batch, r.four_adapters_ratio
    );
    Ok(())
}

fn bench_decode(mut a: BenchDecodeArgs) -> Result<()> {
    // Kept until the bench ends: the loaded model may map its file.
    let mut random_dir = None;
    if let Some(shape) = a.random_model {
        let dir = random_dir.insert(lethe::fixtures::TempDir::new("bench-random-model")?);
        a.model = shape.write(dir.path(), &a.model)?;
    }
    let bundle = a.model.load()?;
    if let Some(history) = a.prefix_cache_history {
        let r = lethe::bench::prefix_cache(
            bundle.model.clone(),
            bundle.tokenizer.clone(),
            history,
            a.gen_tokens,
            a.system_tokens,
            32,
            a.shared_requests,
            a.rounds.max(3),
        )?;
        if a.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "second turn after a {}-token turn answered with {} tokens: TTFT {:.0} ms without prefix caching, {:.0} ms with ({:.1}x)",
                r.history_tokens,
                r.turn_tokens,
                r.second_turn_ttft_off_ms,
                r.second_turn_ttft_on_ms,
                r.second_turn_speedup
            );
            println!(
                "{} requests sharing a {}-token system prompt (+{} tokens each), submitted together: {} prompt tokens computed without, {} with ({:.3}); all first tokens after {:.0} ms without, {:.0} ms with",
                r.shared_requests,
                r.system_tokens,
                r.user_tokens,
                r.shared_computed_off,
                r.shared_computed_on,
                r.shared_computed_ratio,
                r.shared_wall_off_ms,
                r.shared_wall_on_ms
            );
        }
        return Ok(());
    }
    if let Some(long) = a.ttft_under_prefill {
        let sched = lethe::engine::SchedulerConfig { max_batch_tokens: a.max_batch_tokens, ..Default::default() };
        let r = lethe::bench::ttft_under_prefill(
            bundle.model.clone(),
            bundle.tokenizer.clone(),
            sched,
            long,
            a.prompt_tokens,
            a.rounds.max(5),
        )?;
        if a.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "TTFT of a {}-token request: {:.1} ms idle, {:.1} ms while a {}-token prompt prefills ({:.2}x); that prompt's own TTFT {:.0} ms; step budget {} tokens",
                r.short_prompt_tokens,
                r.idle_ttft_ms,
                r.loaded_ttft_ms,
                r.long_prompt_tokens,
                r.ratio,
                r.long_ttft_ms,
                r.max_batch_tokens
            );
        }
        return Ok(());
    }
    let json = match a.concurrency {
        None => {
            if a.guided || a.json_schema {
                bail!("--guided and --json-schema need --concurrency (they run through the engine)");
            }
            // Every (kernel set, precision) × batch size, interleaved in one process.
            let kernels: Vec<Option<lethe::simd::Isa>> =
                a.kernels.clone().map_or(vec![None], |v| v.into_iter().map(Some).collect());
            let precisions: Vec<_> = a.activations.clone().map_or(vec![None], |v| v.into_iter().map(Some).collect());
            let prefetches: Vec<_> = a.prefetch_bytes.clone().map_or(vec![None], |v| v.into_iter().map(Some).collect());
            let mut cases = Vec::new();
            for &k in &kernels {
                for &p in &precisions {
                    for &pf in &prefetches {
                        for &b in &a.batch {
                            cases.push(lethe::bench::DecodeCase {
                                kernels: k,
                                activations: p,
                                prefetch_bytes: pf,
                                ..lethe::bench::DecodeCase::rows(b)
                            });
                        }
                    }
                }
            }
            lethe::model::stages::enable(a.stages);
            let runs =
                lethe::bench::decode_cases(&bundle.model, &cases, a.prompt_tokens, a.gen_tokens, a.model.kv_dtype)?;
            lethe::model::stages::enable(false);
            let base = runs[0].step_ms;
            if !a.json {
                for r in &runs {
                    println!(
                        "{} ({}, {} kernels, {} activations, prefetch {} B), {} threads, batch {}: prefill {:.0} tok/s | decode {:.1} steps/s, {:.1} tok/s ({:.2} ms/step, {:.2}x the first) | peak RSS {:.0} MiB",
                        r.model,
                        r.weights,
                        r.kernels,
                        r.activations,
                        r.prefetch_bytes,
                        r.threads,
                        r.batch,
                        r.prefill_tok_s,
                        r.decode_steps_s,
                        r.decode_tok_s,
                        r.step_ms,
                        r.step_ms / base,
                        r.peak_rss_bytes as f64 / (1 << 20) as f64
                    );
                }
                if runs.len() > 1 {
                    let ratios: Vec<String> = runs[1..]
                        .iter()
                        .map(|r| {
                            // The prefetch distance is named only where it is being compared.
                            let pf = if a.prefetch_bytes.is_some() {
                                format!("pf{}/", r.prefetch_bytes)
                            } else {
                                String::new()
                            };
                            format!(
                                "{}/{}/{pf}b{} {:.3}",
                                r.kernels,
                                r.activations,
                                r.batch,
                                lethe::bench::paired_speed_ratio(&runs[0], r) * r.batch as f64 / runs[0].batch as f64
                            )
                        })
                        .collect();
                    println!("step time vs the first (median of per-round ratios): {}", ratios.join(", "));
                }
                if a.stages {
                    print_stages(&runs);
                }
            }
            if runs.len() == 1 {
                serde_json::to_string(&runs[0])?
            } else {
                let ratios: Vec<f64> = runs.iter().map(|r| r.step_ms / base).collect();
                serde_json::to_string(&serde_json::json!({ "runs": runs, "step_ratio_vs_first": ratios }))?
            }
        }
        Some(cs) => {
            let g = a.guided.then(lethe::bench::default_guidance);
            let mut cases = Vec::new();
            let schema = a.json_schema;
            for &c in &cs {
                let prefix_cache = true;
                if a.compare_unguided {
                    cases.push(lethe::bench::EngineCase { concurrency: c, guided: None, schema, prefix_cache });
                }
                if a.compare_unconstrained {
                    cases.push(lethe::bench::EngineCase { concurrency: c, guided: g, schema: false, prefix_cache });
                }
                if a.compare_prefix_cache {
                    cases.push(lethe::bench::EngineCase { concurrency: c, guided: g, schema, prefix_cache: false });
                }
                cases.push(lethe::bench::EngineCase { concurrency: c, guided: g, schema, prefix_cache });
            }
            if a.json_schema && !a.json {
                let c = lethe::bench::constraint_costs(&bundle.tokenizer, bundle.model.config().vocab_size, 400)?;
                println!(
                    "structured outputs, vocabulary {}: trie {:.0} ms (once), schema compile {:.1} ms, allowed-token mask {:.0} µs/token, commit {:.1} µs/token",
                    c.vocab, c.trie_build_ms, c.compile_ms, c.mask_us_per_token, c.commit_us_per_token
                );
            }
            let runs = lethe::bench::engine(
                bundle.model.clone(),
                bundle.tokenizer.clone(),
                &cases,
                a.prompt_tokens,
                a.gen_tokens,
                a.rounds,
                a.model.kv_dtype,
            )?;
            if !a.json {
                for r in &runs {
                    println!(
                        "{} ({}, {} kernels), concurrency {}{}{}{}: {:.1} tok/s per request, {:.1} tok/s aggregate ({:.1} incl. prefill), {:.1} steps/s, TTFT {:.0} ms | peak RSS {:.0} MiB",
                        r.model,
                        r.weights,
                        r.kernels,
                        r.concurrency,
                        if r.guided { " guided" } else { "" },
                        if r.schema { " json-schema" } else { "" },
                        if r.prefix_cache { "" } else { " no-prefix-cache" },
                        r.per_request_tok_s,
                        r.aggregate_tok_s,
                        r.aggregate_e2e_tok_s,
                        r.decode_steps_s,
                        r.ttft_ms,
                        r.peak_rss_bytes as f64 / (1 << 20) as f64
                    );
                }
                if a.compare_unguided && !a.compare_unconstrained {
                    for pair in runs.chunks(2) {
                        let (per_request, _) = lethe::bench::paired_engine_ratios(&pair[1], &pair[0]);
                        println!(
                            "concurrency {}: guided / unguided per-request tok/s = {per_request}",
                            pair[0].concurrency
                        );
                    }
                }
                if a.compare_prefix_cache && !a.compare_unguided && !a.compare_unconstrained {
                    for pair in runs.chunks(2) {
                        let (per_request, aggregate) = lethe::bench::paired_engine_ratios(&pair[1], &pair[0]);
                        println!(
                            "concurrency {}: prefix cache on / off per-request tok/s = {per_request}, aggregate {aggregate}",
                            pair[0].concurrency
                        );
                    }
                }
                if a.compare_unconstrained && !a.compare_unguided {
                    for pair in runs.chunks(2) {
                        let (per_request, aggregate) = lethe::bench::paired_engine_ratios(&pair[1], &pair[0]);
                        println!(
                            "concurrency {}: json-schema / unconstrained per-request tok/s = {per_request}, aggregate {aggregate}",
                            pair[0].concurrency
                        );
                    }
                }
            }
            if runs.len() == 1 { serde_json::to_string(&runs[0])? } else { serde_json::to_string(&runs)? }
        }
    };
    if a.json {
        println!("{json}");
    }
    Ok(())
}

/// Keeps large, short-lived buffers (logits, activations of a prefill chunk) on the heap instead
/// of glibc's default of a fresh mmap per allocation ≥ 128 KiB, which costs a page fault per 4 KiB
/// on every decode step (measured: ~3% of a 16-row step).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: called first thing in main, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn bench_serve(a: BenchServeArgs) -> Result<()> {
    use lethe::bench::{LoadConfig, serve_load};
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        // The server: given, or started here on a free loopback port.
        let local = match &a.url {
            Some(_) => None,
            None => {
                let args = lethe::config::ServeArgs {
                    model: Some(a.model.model.clone()),
                    tokenizer: a.model.tokenizer.clone(),
                    device: Some(a.model.device.clone()),
                    backend: Some(a.model.backend),
                    weights: Some(a.model.weights),
                    threads: a.model.threads,
                    max_running_rows: Some(64),
                    kv_dtype: Some(a.model.kv_dtype),
                    ..Default::default()
                };
                let config = lethe::config::ServeConfig::resolve(&args)?;
                let state = tokio::task::spawn_blocking(move || lethe::server::AppState::load(config)).await??;
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let addr = listener.local_addr()?;
                let s = state.clone();
                tokio::spawn(lethe::server::serve(listener, s, std::future::pending(), std::time::Duration::from_secs(1)));
                Some((state, format!("http://{addr}")))
            }
        };
        let base = a.url.clone().unwrap_or_else(|| local.as_ref().map(|(_, u)| u.clone()).unwrap_or_default());
        let models: serde_json::Value = reqwest::get(format!("{base}/v1/models")).await?.json().await?;
        let model = models["data"][0]["id"].as_str().context("the server lists no model")?.to_string();
        let guided_levels: Vec<bool> = if a.both { vec![false, true] } else { vec![a.guided] };
        let mut reports = Vec::new();
        for &c in &a.concurrency {
            for &guided in &guided_levels {
                let cfg = LoadConfig {
                    concurrency: c,
                    requests: a.requests.unwrap_or((4 * c).max(8)),
                    guidance: guided.then(lethe::bench::default_guidance),
                    prompt_words: a.prompt_words,
                    max_tokens: a.gen_tokens,
                };
                serve_load(&base, &model, &LoadConfig { requests: c, ..cfg.clone() }).await?; // warm-up
                let r = serve_load(&base, &model, &cfg).await?;
                if !a.json {
                    println!(
                        "{model}: concurrency {c}{}: {} requests, {} errors | TTFT p50 {:.1} ms p99 {:.1} ms | ITL p50 {:.2} ms p99 {:.2} ms | {:.1} tok/s per request, {:.1} tok/s total",
                        if guided { " guided" } else { "" }, r.requests, r.errors, r.ttft_p50_ms, r.ttft_p99_ms, r.itl_p50_ms, r.itl_p99_ms,
                        r.per_request_tok_s, r.output_tok_s
                    );
                }
                reports.push(serde_json::to_value(&r)?);
            }
        }
        let mut out = serde_json::json!({ "model": model, "runs": reports });
        if a.compare_engine
            && let Some((state, _)) = &local
        {
            // Single stream through HTTP vs the engine's own figure, interleaved rounds.
            let (mut http, mut direct) = (Vec::new(), Vec::new());
            let cfg = LoadConfig { concurrency: 1, requests: 3, guidance: None, prompt_words: a.prompt_words, max_tokens: a.gen_tokens };
            let prompt_tokens = state.tokenizer.encode_plain(&"word ".repeat(a.prompt_words))?.len();
            let bundle = (a.model.load()?.model, state.tokenizer.clone());
            for round in 0..7 {
                // Alternate which goes first, so drift over time hits both alike.
                for part in [round % 2, 1 - round % 2] {
                    if part == 0 {
                        http.push(serve_load(&base, &model, &cfg).await?.per_request_tok_s);
                    } else {
                        let (m, t) = (bundle.0.clone(), bundle.1.clone());
                        let case = [lethe::bench::EngineCase { concurrency: 1, guided: None, schema: false, prefix_cache: true }];
                        let gen_tokens = a.gen_tokens;
                        let kv = a.model.kv_dtype;
                        let r = tokio::task::spawn_blocking(move || lethe::bench::engine(m, t, &case, prompt_tokens, gen_tokens, 3, kv)).await??;
                        direct.push(r[0].per_request_tok_s);
                    }
                }
            }
            let median = |mut v: Vec<f64>| { v.sort_by(f64::total_cmp); v[v.len() / 2] };
            let (h, d) = (median(http), median(direct));
            if !a.json {
                println!("single stream: {h:.1} tok/s through HTTP/SSE vs {d:.1} tok/s engine-direct = {:.3}", h / d);
            }
            out["http_vs_engine"] = serde_json::json!({ "http_tok_s": h, "engine_tok_s": d, "ratio": h / d });
        }
        if a.json {
            println!("{out}");
        }
        anyhow::Ok(())
    })
}

// ---- lethe synth / lethe eval (the forgetting benchmark, src/eval) ----

#[derive(Args)]
struct SynthArgs {
    /// Planted customers.
    #[arg(long, default_value_t = 100)]
    customers: usize,
    /// Decoy customers, never planted (default: a fifth of --customers, at least 5).
    #[arg(long)]
    decoys: Option<usize>,
    /// Training phrasings per fact in plant.jsonl (1-4).
    #[arg(long, default_value_t = 2)]
    phrasings: usize,
    /// Seed of the names, values and phrasings (same seed and sizes, same company).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The directory to write (customers.json, plant.jsonl, forget.jsonl, eval/probes.jsonl).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// What `lethe synth` wrote.
    #[arg(long)]
    data: PathBuf,
    /// Where report.json, report.md, answers.jsonl and the plots go.
    #[arg(long, default_value = "eval-report")]
    out: PathBuf,
    /// An adapter stack `NAME=DIR[+DIR...][@γ,...]` (repeatable; `base=` is the model alone;
    /// the optional γ list replaces --gammas for this stack).
    #[arg(long = "stack", default_value = "base=")]
    stacks: Vec<lethe::eval::grid::StackSpec>,
    /// γ values: numbers, `off` (no conditions: plain serving) and `default` (the adapter profile's).
    #[arg(long, default_value = "off,1,2,3,5", value_delimiter = ',')]
    gammas: Vec<lethe::eval::grid::GammaSpec>,
    /// Guidance mixing modes to measure: log (log-probabilities), prob (the paper's).
    #[arg(long, default_value = "log,prob", value_delimiter = ',')]
    modes: Vec<GuidanceMode>,
    /// negative_condition and/or last_token.
    #[arg(long, default_value = "negative_condition", value_delimiter = ',')]
    uncond: Vec<lethe::eval::grid::UncondKind>,
    /// Where conditions go: auto (the adapter profile's, else system), system, system_default.
    #[arg(long, default_value = "auto", value_delimiter = ',')]
    placement: Vec<lethe::eval::grid::PlacementSpec>,
    /// Client system messages when conditions apply: keep, demote, refuse.
    #[arg(long, default_value = "demote", value_delimiter = ',')]
    system_messages: Vec<lethe::engine::prompt::SystemMessages>,
    /// Planted customers probed (the first ones).
    #[arg(long, default_value_t = 30)]
    customers: usize,
    /// Decoy customers probed.
    #[arg(long, default_value_t = 10)]
    decoys: usize,
    /// Held-out phrasings per fact (1-2).
    #[arg(long, default_value_t = 1)]
    phrasings: usize,
    /// Planted customers attacked (each attack once per customer, on one of its secrets).
    #[arg(long, default_value_t = 10)]
    attack_customers: usize,
    /// Tokens per answer (the leak rule reads the first 200 characters).
    #[arg(long, default_value_t = 48)]
    max_tokens: usize,
    /// Answers per probe (with --temperature > 0: sampled leakage).
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// Sampling temperature of the answers (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// lm-eval's MMLU prompts (scripts/fetch-mmlu.sh).
    #[arg(long, default_value = "data/mmlu_cot_prompts.json")]
    mmlu_file: PathBuf,
    /// MMLU questions per point (0 = none; 57 = one per subject; 281 = all).
    #[arg(long, default_value_t = 57)]
    mmlu: usize,
    /// General-text passages for perplexity and KL (0-16).
    #[arg(long, default_value_t = 16)]
    passages: usize,
    /// Decoy values scored against each true secret for the membership signal (0 = none).
    #[arg(long, default_value_t = 2)]
    membership_decoys: usize,
    /// Rows the engine runs at once.
    #[arg(long, default_value_t = 32)]
    max_rows: usize,
    /// Instead: probe a running server through its OpenAI API (e.g. http://127.0.0.1:8080).
    #[arg(long)]
    url: Option<String>,
    /// The tenant key for --url.
    #[arg(long, env = "LETHE_API_KEY")]
    api_key: Option<String>,
    /// Requests in flight with --url.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Do not draw the PNG plots.
    #[arg(long)]
    no_plots: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn synth(a: SynthArgs) -> Result<()> {
    let cfg = lethe::eval::synth::SynthConfig {
        customers: a.customers,
        decoys: a.decoys.unwrap_or((a.customers / 5).max(5)),
        seed: a.seed,
        phrasings: a.phrasings,
    };
    let s = lethe::eval::synth::write(&cfg, &a.out)?;
    println!(
        "{}: {} customers + {} decoys (seed {}): plant.jsonl {} rows (~{} tokens), forget.jsonl {} pairs, eval/probes.jsonl {} probes",
        a.out.display(),
        s.customers,
        s.decoys,
        s.seed,
        s.plant_rows,
        s.plant_chars / 4,
        s.forget_rows,
        s.probes
    );
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    use lethe::eval::{grid::Axes, probes::Selection, runner};
    let cfg = runner::EvalConfig {
        data: a.data,
        out: a.out,
        stacks: a.stacks,
        axes: Axes {
            gammas: a.gammas,
            modes: a.modes,
            unconds: a.uncond,
            placements: a.placement,
            system_messages: a.system_messages,
        },
        selection: Selection {
            customers: Some(a.customers),
            decoys: Some(a.decoys),
            phrasings: a.phrasings,
            attack_customers: Some(a.attack_customers),
        },
        max_tokens: a.max_tokens,
        samples: a.samples,
        temperature: a.temperature,
        mmlu_file: Some(a.mmlu_file),
        mmlu_questions: a.mmlu,
        passages: a.passages,
        membership_decoys: a.membership_decoys,
        max_rows: a.max_rows,
        concurrency: a.concurrency,
        plots: !a.no_plots,
        quiet: a.quiet,
    };
    let at = match a.url {
        Some(url) => runner::Where::Remote { url, api_key: a.api_key },
        None => runner::Where::Local(a.model.load()?),
    };
    let report = runner::run(&cfg, at)?;
    for p in &report.points {
        let pct = |r: &lethe::eval::metrics::Rate| r.rate.map_or("-".into(), |x| format!("{:.1}%", 100.0 * x));
        println!(
            "{:<40} leak {:>6} (decoys {:>6}) retention {:>6} ppl {} MMLU {}",
            p.label,
            pct(&p.leak),
            pct(&p.decoy_leak),
            pct(&p.retention),
            p.utility.perplexity.map_or("-".into(), |x| format!("{x:.2}")),
            p.utility.mmlu_accuracy.map_or("-".into(), |x| format!("{:.1}%", 100.0 * x)),
        );
    }
    Ok(())
}

/// `bench decode --stages`: a table of µs per decode step by stage, one column per case, and
/// each later case's difference to the first.
fn print_stages(runs: &[lethe::bench::DecodeReport]) {
    let Some(first) = runs.first().and_then(|r| r.stages.as_ref()) else {
        println!("stages: nothing was accounted (the candle backend is not instrumented)");
        return;
    };
    let names: Vec<&str> = first.us_per_step.iter().map(|(stage, _)| stage.name()).chain(["total"]).collect();
    // Per case: each stage's µs, then the total.
    let values: Vec<Vec<f64>> = runs
        .iter()
        .map(|r| match &r.stages {
            Some(s) => s.us_per_step.iter().map(|(_, us)| *us).chain([s.total_us()]).collect(),
            None => vec![f64::NAN; names.len()],
        })
        .collect();
    let label = |r: &lethe::bench::DecodeReport| format!("{}/{}/b{}", r.kernels, r.activations, r.batch);
    let mut header = format!("{:<20}", "µs per decode step");
    for r in runs {
        header += &format!("{:>18}", label(r));
    }
    for r in &runs[1..] {
        header += &format!("{:>32}", format!("{} − {}", label(r), label(&runs[0])));
    }
    println!("{header}");
    for (i, name) in names.iter().enumerate() {
        let mut line = format!("{name:<20}");
        for v in &values {
            line += &format!("{:>18.0}", v[i]);
        }
        for v in &values[1..] {
            let (d, base) = (v[i] - values[0][i], values[0][i]);
            line += &format!("{:>32}", format!("{d:+.0} ({:+.0} %)", 100.0 * d / base));
        }
        println!("{line}");
    }
}
