//! The `lethe` command line: a thin layer over the library.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
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
    #[arg(long, global = true, env = "LETHE_LOG_FORMAT", default_value = "pretty")]
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
    /// Administer a running server (adapters, tenants, keys, audit log) through its admin API.
    Admin(lethe::admin_client::AdminArgs),
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
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
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
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// In-process only: also measure single-request decode speed through the engine directly,
    /// interleaved with single-stream HTTP runs, and report the HTTP/engine ratio.
    #[arg(long, conflicts_with = "url")]
    compare_engine: bool,
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
    /// native (keep the file's format), q8_0 (re-quantize at load) or f32.
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
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
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
    /// The positive condition (cond row's system sentence).
    #[arg(long, default_value = prompt::PAPER_POSITIVE)]
    positive: String,
    /// A custom negative condition for the uncond row (default: the paper's negative sentence).
    #[arg(long)]
    negative: Option<String>,
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
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Run C simultaneous requests through the engine instead; a list (`1,8`) measures each.
    #[arg(long, value_delimiter = ',')]
    concurrency: Option<Vec<usize>>,
    /// Engine requests are CFG pairs (γ = 3, log mode).
    #[arg(long)]
    guided: bool,
    /// With --guided: also run every concurrency unguided, side by side, and report the ratio.
    #[arg(long, requires = "guided")]
    compare_unguided: bool,
    /// Interleaved rounds for engine benchmarks (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Instead: time to first token of a short request (--prompt-tokens) while a prompt of this
    /// many tokens is being prefilled, against the same request on an idle engine.
    #[arg(long)]
    ttft_under_prefill: Option<usize>,
    /// Engine step budget for --ttft-under-prefill (prefill chunk size).
    #[arg(long, default_value_t = lethe::engine::SchedulerConfig::default().max_batch_tokens)]
    max_batch_tokens: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    tune_allocator();
    let cli = Cli::parse();
    lethe::telemetry::init_logging(cli.log_format);
    match cli.command {
        Command::Serve(a) => serve(*a),
        Command::Generate(a) => generate(a),
        Command::Bench(BenchCommand::Decode(a)) => bench_decode(a),
        Command::Bench(BenchCommand::Serve(a)) => bench_serve(a),
        Command::Bench(BenchCommand::Adapters(a)) => bench_adapters(a),
        Command::Admin(a) => lethe::admin_client::run(a),
    }
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
    let conds = Conditions {
        positive: a.positive.clone(),
        negative: a.negative.clone().unwrap_or_else(|| prompt::PAPER_NEGATIVE.into()),
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
                eprintln!(
                    "[{} | {} prompt + {} generated tokens | first token {:.0} ms | {:.1} tok/s | {}{}]",
                    reason.as_str(),
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    timing.time_to_first_token.unwrap_or_default().as_secs_f64() * 1e3,
                    usage.completion_tokens.saturating_sub(1) as f64 / gen_s.max(1e-9),
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
        "{} ({}), rank-{} all-linear adapter: {:.1} MiB in memory (f16), {:.1} MiB on disk (f32), loaded in {:.0} ms",
        r.model,
        r.weights,
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

fn bench_decode(a: BenchDecodeArgs) -> Result<()> {
    let bundle = a.model.load()?;
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
            if a.guided {
                bail!("--guided needs --concurrency (guided requests run through the engine)");
            }
            let runs = lethe::bench::decode(&bundle.model, &a.batch, a.prompt_tokens, a.gen_tokens, a.model.kv_dtype)?;
            let base = runs[0].step_ms;
            if !a.json {
                for r in &runs {
                    println!(
                        "{} ({}), {} threads, batch {}: prefill {:.0} tok/s | decode {:.1} steps/s, {:.1} tok/s ({:.2} ms/step, {:.2}x batch {}) | peak RSS {:.0} MiB",
                        r.model,
                        r.weights,
                        r.threads,
                        r.batch,
                        r.prefill_tok_s,
                        r.decode_steps_s,
                        r.decode_tok_s,
                        r.step_ms,
                        r.step_ms / base,
                        runs[0].batch,
                        r.peak_rss_bytes as f64 / (1 << 20) as f64
                    );
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
            for &c in &cs {
                if a.compare_unguided {
                    cases.push(lethe::bench::EngineCase { concurrency: c, guided: None });
                }
                cases.push(lethe::bench::EngineCase { concurrency: c, guided: g });
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
                        "{} ({}), concurrency {}{}: {:.1} tok/s per request, {:.1} tok/s aggregate ({:.1} incl. prefill), {:.1} steps/s, TTFT {:.0} ms | peak RSS {:.0} MiB",
                        r.model,
                        r.weights,
                        r.concurrency,
                        if r.guided { " guided" } else { "" },
                        r.per_request_tok_s,
                        r.aggregate_tok_s,
                        r.aggregate_e2e_tok_s,
                        r.decode_steps_s,
                        r.ttft_ms,
                        r.peak_rss_bytes as f64 / (1 << 20) as f64
                    );
                }
                if a.compare_unguided {
                    for pair in runs.chunks(2) {
                        println!(
                            "concurrency {}: guided / unguided per-request tok/s = {:.3}",
                            pair[0].concurrency,
                            pair[1].per_request_tok_s / pair[0].per_request_tok_s
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
                        let case = [lethe::bench::EngineCase { concurrency: 1, guided: None }];
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
