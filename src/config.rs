//! `lethe serve` settings, from three sources with one precedence:
//! **command-line flags > `LETHE_*` environment variables > `--config` TOML file > defaults.**
//!
//! Flags and environment variables are both handled by clap (every flag has an `env`), so a flag
//! wins over its variable; the file fills whatever neither set.

use crate::guidance::GuidanceMode;
use crate::model::{Backend, KvDtype, WeightFormat};
use clap::Args;
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

/// Flags of `lethe serve` (each also readable from `LETHE_<NAME>`).
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// Model: a .gguf file or an HF directory (`scripts/fetch-model.sh` fetches the default).
    #[arg(long, env = "LETHE_MODEL")]
    pub model: Option<PathBuf>,
    /// A tokenizer.json to use instead of the model's own.
    #[arg(long, env = "LETHE_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,
    /// Address to listen on (0.0.0.0 for every interface; behind a proxy or in a container).
    #[arg(long, env = "LETHE_HOST")]
    pub host: Option<IpAddr>,
    /// Port of the OpenAI API (0 picks a free one; the log says which).
    #[arg(long, env = "LETHE_PORT")]
    pub port: Option<u16>,
    /// Also serve `/metrics` (and `/health`) on this port, e.g. for a scrape-only network policy.
    #[arg(long, env = "LETHE_METRICS_PORT")]
    pub metrics_port: Option<u16>,
    /// Serve the admin API and `/metrics` on this address (e.g. 0.0.0.0:9090) *instead of* the
    /// public listener, which then carries only the OpenAI routes, `/health` and `/ready`.
    #[arg(long, env = "LETHE_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,
    /// A TOML file with any of these settings (see docs/configuration.md).
    #[arg(long, env = "LETHE_CONFIG")]
    pub config: Option<PathBuf>,
    /// cpu or cuda:N.
    #[arg(long, env = "LETHE_DEVICE")]
    pub device: Option<String>,
    /// auto, native or candle.
    #[arg(long, env = "LETHE_BACKEND")]
    pub backend: Option<Backend>,
    /// native, q8_0 or f32.
    #[arg(long, env = "LETHE_WEIGHTS")]
    pub weights: Option<WeightFormat>,
    /// Kernel threads (default: one per core).
    #[arg(long, env = "LETHE_THREADS")]
    pub threads: Option<usize>,
    /// Rows decoding at once (a guided request uses two).
    #[arg(long, env = "LETHE_MAX_RUNNING_ROWS")]
    pub max_running_rows: Option<usize>,
    /// Tokens per forward step (decode + prefill chunks).
    #[arg(long, env = "LETHE_MAX_BATCH_TOKENS")]
    pub max_batch_tokens: Option<usize>,
    /// Requests allowed to wait; more get HTTP 429.
    #[arg(long, env = "LETHE_MAX_WAITING")]
    pub max_waiting: Option<usize>,
    /// Requests one tenant may have waiting, unless its policy says otherwise.
    #[arg(long, env = "LETHE_TENANT_MAX_WAITING")]
    pub tenant_max_waiting: Option<usize>,
    /// Rows one tenant may run at once, unless its policy says otherwise.
    #[arg(long, env = "LETHE_TENANT_MAX_RUNNING_ROWS")]
    pub tenant_max_running_rows: Option<usize>,
    /// Steps a prefilling request may be passed over before its prompt goes first (aging).
    #[arg(long, env = "LETHE_MAX_PREFILL_WAIT_STEPS")]
    pub max_prefill_wait_steps: Option<usize>,
    /// Requests tokenized at once (a fixed pool; more wait, counted against max_waiting).
    #[arg(long, env = "LETHE_TOKENIZER_THREADS")]
    pub tokenizer_threads: Option<usize>,
    /// Seconds a request may take until its response starts (non-streamed: the whole
    /// generation); longer is HTTP 504.
    #[arg(long, env = "LETHE_REQUEST_TIMEOUT_SECS")]
    pub request_timeout_secs: Option<u64>,
    /// Seconds a client may take to send a request's headers; also how long an idle keep-alive
    /// connection stays open.
    #[arg(long, env = "LETHE_HEADER_TIMEOUT_SECS")]
    pub header_timeout_secs: Option<u64>,
    /// Stop sequences per request.
    #[arg(long, env = "LETHE_MAX_STOP_SEQUENCES")]
    pub max_stop_sequences: Option<usize>,
    /// Characters per stop sequence.
    #[arg(long, env = "LETHE_MAX_STOP_CHARS")]
    pub max_stop_chars: Option<usize>,
    /// KV cache budget in MiB.
    #[arg(long, env = "LETHE_KV_CACHE_MIB")]
    pub kv_cache_mib: Option<usize>,
    /// KV cache element type: f16, q8 (int8 + a scale per token and head) or f32.
    #[arg(long, env = "LETHE_KV_DTYPE")]
    pub kv_dtype: Option<KvDtype>,
    /// Automatic prefix caching (share the KV blocks of identical prompt prefixes between
    /// requests): true (default) or false.
    #[arg(long, env = "LETHE_PREFIX_CACHE")]
    pub prefix_cache: Option<bool>,
    /// max_tokens when a request gives none.
    #[arg(long, env = "LETHE_DEFAULT_MAX_TOKENS")]
    pub default_max_tokens: Option<usize>,
    /// Largest guidance scale a request may ask for.
    #[arg(long, env = "LETHE_MAX_GAMMA")]
    pub max_gamma: Option<f32>,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
    #[arg(long, env = "LETHE_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<u64>,
    /// Directory for persistent state (loaded adapters, tenant policies, key hashes). Without it
    /// the state lives in memory only.
    #[arg(long, env = "LETHE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// A PostgreSQL database shared by replicas (`postgres://user:password@host:port/db`);
    /// replaces --state-dir (which is then not used).
    #[arg(long, env = "LETHE_STATE_STORE")]
    pub state_store: Option<StoreUrl>,
    /// Where every adapter generation's files are kept, content-addressed, for rollback and for
    /// other replicas (default: `generations` in --state-dir, or `.generations` in
    /// --adapters-root with --state-store; must be shared by replicas).
    #[arg(long, env = "LETHE_GENERATIONS_DIR")]
    pub generations_dir: Option<PathBuf>,
    /// Generations per adapter whose files are kept (older ones stay in the history only).
    #[arg(long, env = "LETHE_ADAPTER_HISTORY")]
    pub adapter_history: Option<usize>,
    /// Seconds between full re-reads of a shared state store (besides LISTEN/NOTIFY).
    #[arg(long, env = "LETHE_RECONCILE_SECS")]
    pub reconcile_secs: Option<u64>,
    /// Adapter paths given to the admin API must resolve inside this directory.
    #[arg(long, env = "LETHE_ADAPTERS_ROOT")]
    pub adapters_root: Option<PathBuf>,
    /// A file holding the admin key; wins over the LETHE_ADMIN_KEY variable (also read from
    /// LETHE_ADMIN_KEY_FILE, which may not be set together with LETHE_ADMIN_KEY). Without an
    /// admin key the admin API is off.
    #[arg(long)]
    pub admin_key_file: Option<PathBuf>,
    /// Refuse requests without an API key (401) instead of serving them as tenant `default`.
    #[arg(long, env = "LETHE_REQUIRE_API_KEY")]
    pub require_api_key: bool,
    /// Most adapters loaded at once.
    #[arg(long, env = "LETHE_MAX_ADAPTERS")]
    pub max_adapters: Option<usize>,
    /// Largest LoRA rank accepted.
    #[arg(long, env = "LETHE_MAX_ADAPTER_RANK")]
    pub max_adapter_rank: Option<usize>,
    /// Memory budget for all loaded adapters, in MiB.
    #[arg(long, env = "LETHE_MAX_ADAPTER_MIB")]
    pub max_adapter_mib: Option<usize>,
}

/// The same settings in a TOML file (all optional).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub model: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub host: Option<IpAddr>,
    pub port: Option<u16>,
    pub metrics_port: Option<u16>,
    pub admin_addr: Option<SocketAddr>,
    pub device: Option<String>,
    pub backend: Option<String>,
    pub weights: Option<String>,
    pub threads: Option<usize>,
    pub max_running_rows: Option<usize>,
    pub max_batch_tokens: Option<usize>,
    pub max_waiting: Option<usize>,
    pub tenant_max_waiting: Option<usize>,
    pub tenant_max_running_rows: Option<usize>,
    pub max_prefill_wait_steps: Option<usize>,
    pub tokenizer_threads: Option<usize>,
    pub request_timeout_secs: Option<u64>,
    pub header_timeout_secs: Option<u64>,
    pub max_stop_sequences: Option<usize>,
    pub max_stop_chars: Option<usize>,
    pub kv_cache_mib: Option<usize>,
    pub kv_dtype: Option<String>,
    pub prefix_cache: Option<bool>,
    pub default_max_tokens: Option<usize>,
    pub max_gamma: Option<f32>,
    pub shutdown_grace_secs: Option<u64>,
    pub state_dir: Option<PathBuf>,
    pub state_store: Option<StoreUrl>,
    pub generations_dir: Option<PathBuf>,
    pub adapter_history: Option<usize>,
    pub reconcile_secs: Option<u64>,
    pub adapters_root: Option<PathBuf>,
    pub admin_key_file: Option<PathBuf>,
    pub require_api_key: Option<bool>,
    pub max_adapters: Option<usize>,
    pub max_adapter_rank: Option<usize>,
    pub max_adapter_mib: Option<usize>,
    /// Server-wide default guidance (used when a request has no `guidance` object).
    pub guidance: Option<GuidanceDefaults>,
}

/// The guidance applied when a request does not ask for any.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct GuidanceDefaults {
    /// 1 = unguided.
    #[serde(default = "one")]
    pub gamma: f32,
    #[serde(default)]
    pub mode: GuidanceMode,
    #[serde(default = "paper_positive")]
    pub positive: String,
    #[serde(default = "paper_negative")]
    pub negative: String,
}

fn one() -> f32 {
    1.0
}
fn paper_positive() -> String {
    crate::engine::prompt::PAPER_POSITIVE.into()
}
fn paper_negative() -> String {
    crate::engine::prompt::PAPER_NEGATIVE.into()
}

impl Default for GuidanceDefaults {
    fn default() -> Self {
        Self { gamma: 1.0, mode: GuidanceMode::Log, positive: paper_positive(), negative: paper_negative() }
    }
}

/// Resolved settings. `Debug` shows no secret (the admin key and the store's password are
/// redacted by their types).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub model: PathBuf,
    pub tokenizer: Option<PathBuf>,
    pub host: IpAddr,
    pub port: u16,
    pub metrics_port: Option<u16>,
    pub admin_addr: Option<SocketAddr>,
    pub device: String,
    pub backend: Backend,
    pub weights: WeightFormat,
    pub threads: Option<usize>,
    pub max_running_rows: usize,
    pub max_batch_tokens: usize,
    pub max_waiting: usize,
    /// Per-tenant defaults of the policy's `max_waiting` and `max_running_rows`.
    pub tenant_max_waiting: Option<usize>,
    pub tenant_max_running_rows: Option<usize>,
    pub max_prefill_wait_steps: usize,
    pub tokenizer_threads: usize,
    pub request_timeout_secs: u64,
    pub header_timeout_secs: u64,
    pub max_stop_sequences: usize,
    pub max_stop_chars: usize,
    pub kv_cache_mib: usize,
    pub kv_dtype: KvDtype,
    pub prefix_cache: bool,
    pub default_max_tokens: usize,
    pub max_gamma: f32,
    pub shutdown_grace_secs: u64,
    pub guidance: GuidanceDefaults,
    pub state_dir: Option<PathBuf>,
    /// PostgreSQL shared by replicas; `None`: `state_dir` (or memory).
    pub state_store: Option<StoreUrl>,
    /// Content-addressed adapter generations; `None`: not kept.
    pub generations_dir: Option<PathBuf>,
    pub adapter_history: usize,
    pub reconcile_secs: u64,
    pub adapters_root: Option<PathBuf>,
    /// The admin key (from the key file or LETHE_ADMIN_KEY); `None` turns the admin API off.
    pub admin_key: Option<Secret>,
    pub require_api_key: bool,
    pub adapter_limits: crate::adapters::AdapterLimits,
}

impl ServeConfig {
    /// Merges flags/env over the config file over defaults.
    pub fn resolve(args: &ServeArgs) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        let backend = match (args.backend, file.backend.clone()) {
            (Some(b), _) => b,
            (None, Some(s)) => s.parse().map_err(|e: String| anyhow::anyhow!("config backend: {e}"))?,
            (None, None) => Backend::Auto,
        };
        let weights = match (args.weights, file.weights.clone()) {
            (Some(w), _) => w,
            (None, Some(s)) => s.parse().map_err(|e: String| anyhow::anyhow!("config weights: {e}"))?,
            (None, None) => WeightFormat::Native,
        };
        let kv_dtype = match (args.kv_dtype, file.kv_dtype.clone()) {
            (Some(d), _) => d,
            (None, Some(s)) => s.parse().map_err(|e: String| anyhow::anyhow!("config kv_dtype: {e}"))?,
            (None, None) => KvDtype::default(),
        };
        let cfg = Self {
            model: args.model.clone().or(file.model).unwrap_or_else(|| PathBuf::from(crate::DEFAULT_MODEL_PATH)),
            tokenizer: args.tokenizer.clone().or(file.tokenizer),
            host: args.host.or(file.host).unwrap_or(IpAddr::from([127, 0, 0, 1])),
            port: args.port.or(file.port).unwrap_or(8080),
            metrics_port: args.metrics_port.or(file.metrics_port),
            admin_addr: args.admin_addr.or(file.admin_addr),
            device: args.device.clone().or(file.device).unwrap_or_else(|| "cpu".into()),
            backend,
            weights,
            threads: args.threads.or(file.threads),
            max_running_rows: args
                .max_running_rows
                .or(file.max_running_rows)
                .unwrap_or(crate::engine::SchedulerConfig::default().max_running_rows),
            max_batch_tokens: args
                .max_batch_tokens
                .or(file.max_batch_tokens)
                .unwrap_or(crate::engine::SchedulerConfig::default().max_batch_tokens),
            max_waiting: args.max_waiting.or(file.max_waiting).unwrap_or(256),
            tenant_max_waiting: args.tenant_max_waiting.or(file.tenant_max_waiting),
            tenant_max_running_rows: args.tenant_max_running_rows.or(file.tenant_max_running_rows),
            max_prefill_wait_steps: args
                .max_prefill_wait_steps
                .or(file.max_prefill_wait_steps)
                .unwrap_or(crate::engine::SchedulerConfig::default().max_prefill_wait_steps),
            tokenizer_threads: args
                .tokenizer_threads
                .or(file.tokenizer_threads)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
            request_timeout_secs: args.request_timeout_secs.or(file.request_timeout_secs).unwrap_or(600),
            header_timeout_secs: args.header_timeout_secs.or(file.header_timeout_secs).unwrap_or(30),
            max_stop_sequences: args.max_stop_sequences.or(file.max_stop_sequences).unwrap_or(4),
            max_stop_chars: args.max_stop_chars.or(file.max_stop_chars).unwrap_or(256),
            kv_cache_mib: args.kv_cache_mib.or(file.kv_cache_mib).unwrap_or(2048),
            kv_dtype,
            prefix_cache: args.prefix_cache.or(file.prefix_cache).unwrap_or(true),
            default_max_tokens: args.default_max_tokens.or(file.default_max_tokens).unwrap_or(512),
            max_gamma: args.max_gamma.or(file.max_gamma).unwrap_or(20.0),
            shutdown_grace_secs: args.shutdown_grace_secs.or(file.shutdown_grace_secs).unwrap_or(10),
            guidance: file.guidance.unwrap_or_default(),
            state_dir: args.state_dir.clone().or(file.state_dir),
            state_store: args.state_store.clone().or(file.state_store),
            generations_dir: args.generations_dir.clone().or(file.generations_dir),
            adapter_history: args.adapter_history.or(file.adapter_history).unwrap_or(5),
            reconcile_secs: args.reconcile_secs.or(file.reconcile_secs).unwrap_or(10),
            adapters_root: args.adapters_root.clone().or(file.adapters_root),
            admin_key: admin_key(args.admin_key_file.clone(), file.admin_key_file, |v| std::env::var(v).ok())?,
            require_api_key: args.require_api_key || file.require_api_key.unwrap_or(false),
            adapter_limits: {
                let d = crate::adapters::AdapterLimits::default();
                crate::adapters::AdapterLimits {
                    max_adapters: args.max_adapters.or(file.max_adapters).unwrap_or(d.max_adapters),
                    max_rank: args.max_adapter_rank.or(file.max_adapter_rank).unwrap_or(d.max_rank),
                    max_bytes: args.max_adapter_mib.or(file.max_adapter_mib).map_or(d.max_bytes, |m| m << 20),
                }
            },
        };
        let mut cfg = cfg;
        if cfg.state_store.is_some() && cfg.state_dir.is_some() {
            // The images set LETHE_STATE_DIR for one machine; a shared store replaces it.
            tracing::warn!("--state-store is set: the state lives there, and --state-dir is not used");
            cfg.state_dir = None;
        }
        cfg.generations_dir = cfg.generations_dir.clone().or_else(|| cfg.default_generations_dir());
        cfg.validate()?;
        Ok(cfg)
    }

    /// Where generations are kept unless configured: beside the state file, or on the shared
    /// adapters volume with a shared store.
    fn default_generations_dir(&self) -> Option<PathBuf> {
        match (&self.state_store, &self.state_dir, &self.adapters_root) {
            (Some(_), _, Some(root)) => Some(root.join(".generations")),
            (None, Some(dir), _) => Some(dir.join("generations")),
            _ => None,
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.max_running_rows >= 2, "max_running_rows must be at least 2 (a guided pair)");
        anyhow::ensure!(self.max_batch_tokens >= 1, "max_batch_tokens must be at least 1");
        anyhow::ensure!(self.max_waiting >= 1, "max_waiting must be at least 1");
        if let Some(n) = self.tenant_max_waiting {
            anyhow::ensure!(n >= 1, "tenant_max_waiting must be at least 1, got {n}");
        }
        if let Some(n) = self.tenant_max_running_rows {
            anyhow::ensure!(n >= 2, "tenant_max_running_rows must be at least 2 (a guided pair), got {n}");
        }
        anyhow::ensure!(self.tokenizer_threads >= 1, "tokenizer_threads must be at least 1, got 0");
        anyhow::ensure!(self.request_timeout_secs >= 1, "request_timeout_secs must be at least 1, got 0");
        anyhow::ensure!(self.header_timeout_secs >= 1, "header_timeout_secs must be at least 1, got 0");
        anyhow::ensure!(self.max_stop_chars >= 1, "max_stop_chars must be at least 1, got 0");
        anyhow::ensure!(self.default_max_tokens >= 1, "default_max_tokens must be at least 1");
        anyhow::ensure!(self.max_gamma.is_finite() && self.max_gamma >= 1.0, "max_gamma must be a finite number ≥ 1");
        let g = &self.guidance;
        anyhow::ensure!(
            g.gamma.is_finite() && g.gamma >= 0.0 && g.gamma <= self.max_gamma,
            "guidance.gamma must be in [0, max_gamma]"
        );
        if self.state_store.is_some() {
            anyhow::ensure!(
                self.generations_dir.is_some(),
                "--state-store needs a directory shared by the replicas for adapter generations: \
                 --adapters-root (generations go to <root>/.generations) or --generations-dir"
            );
        }
        anyhow::ensure!(self.adapter_history >= 1, "adapter_history must be at least 1");
        anyhow::ensure!(self.reconcile_secs >= 1, "reconcile_secs must be at least 1");
        Ok(())
    }
}

/// The admin key, by the documented precedence: `--admin-key-file` (flag) > `LETHE_ADMIN_KEY`
/// or `LETHE_ADMIN_KEY_FILE` (variables; both at once is ambiguous and refused) >
/// `admin_key_file` in the config file.
fn admin_key(
    flag_file: Option<PathBuf>,
    config_file: Option<PathBuf>,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<Option<Secret>> {
    if let Some(path) = flag_file {
        return read_key_file(&path).map(Some);
    }
    let env_key = env("LETHE_ADMIN_KEY").filter(|k| !k.trim().is_empty());
    let env_file = env("LETHE_ADMIN_KEY_FILE").filter(|f| !f.trim().is_empty());
    match (env_key, env_file) {
        (Some(_), Some(_)) => {
            anyhow::bail!("LETHE_ADMIN_KEY and LETHE_ADMIN_KEY_FILE are both set: set one (or pass --admin-key-file)")
        }
        (Some(k), None) => {
            // A short key is a placeholder left in place (or guessable): refuse to start with it.
            anyhow::ensure!(k.trim().len() >= 16, "LETHE_ADMIN_KEY must be at least 16 characters");
            Ok(Some(Secret::new(k.trim())))
        }
        (None, Some(f)) => read_key_file(Path::new(&f)).map(Some),
        (None, None) => config_file.map(|p| read_key_file(&p)).transpose(),
    }
}

/// The first line of a key file.
fn read_key_file(path: &Path) -> anyhow::Result<Secret> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read admin key file {}: {e}", path.display()))?;
    let key = text.lines().next().unwrap_or("").trim().to_string();
    anyhow::ensure!(key.len() >= 16, "the admin key in {} must be at least 16 characters", path.display());
    Ok(Secret::new(key))
}

/// A secret string: `Debug` and `Display` never show it; [`Self::expose`] does, on purpose.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A PostgreSQL connection URL or key=value string, which may hold a password: shown (`Debug`,
/// `Display`) with the password redacted.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct StoreUrl(Secret);

impl StoreUrl {
    pub fn expose(&self) -> &str {
        self.0.expose()
    }
}

impl std::str::FromStr for StoreUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let url = s.starts_with("postgres://") || s.starts_with("postgresql://");
        let keyvalue = !s.contains("://") && s.contains('=');
        if !(url || keyvalue) {
            return Err("expected a PostgreSQL URL (postgres://user:password@host:port/database)".into());
        }
        Ok(Self(Secret::new(s)))
    }
}

impl TryFrom<String> for StoreUrl {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_conninfo(self.expose()))
    }
}

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreUrl({self})")
    }
}

/// The connection string with its password (in the user info, or a `password=` parameter)
/// replaced by `***`.
pub fn redact_conninfo(s: &str) -> String {
    let mut out = s.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        let authority_end = out[rest_start..].find(['/', '?']).map_or(out.len(), |i| rest_start + i);
        if let Some(at) = out[rest_start..authority_end].rfind('@') {
            let userinfo = &out[rest_start..rest_start + at];
            if let Some(colon) = userinfo.find(':') {
                out.replace_range(rest_start + colon + 1..rest_start + at, "***");
            }
        }
    }
    // `password=...` in a query string or a key=value string (quoted values included).
    let re = regex::Regex::new(r#"(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^&\s]*)"#).expect("valid regex");
    re.replace_all(&out, "${1}***").into_owned()
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("invalid config {}: {e}", path.display()))
}

impl ServeArgs {
    /// `lethe serve --help` with every setting's default. The flags are `Option`s, so that the
    /// config file can fill what neither flag nor variable set, and clap shows no default for
    /// them; the defaults written here are the ones [`ServeConfig::resolve`] applies.
    pub fn document_defaults(cmd: clap::Command) -> clap::Command {
        let Ok(defaults) = ServeConfig::resolve(&ServeArgs::default()) else { return cmd };
        defaults.shown_defaults().into_iter().fold(cmd, |cmd, (id, value)| {
            cmd.mut_arg(id, |arg| {
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                arg.help(format!("{help} [default: {value}]"))
            })
        })
    }
}

impl ServeConfig {
    /// Each flag's resolved value, as `--help` shows it for the defaults (flags without a
    /// default, e.g. optional paths, are left out).
    fn shown_defaults(&self) -> Vec<(&'static str, String)> {
        let lower = |v: &dyn std::fmt::Debug| format!("{v:?}").to_lowercase();
        let limits = &self.adapter_limits;
        vec![
            ("model", self.model.display().to_string()),
            ("host", self.host.to_string()),
            ("port", self.port.to_string()),
            ("device", self.device.clone()),
            ("backend", lower(&self.backend)),
            ("weights", lower(&self.weights)),
            ("threads", self.threads.map_or_else(|| "one per core".into(), |n| n.to_string())),
            ("max_running_rows", self.max_running_rows.to_string()),
            ("max_batch_tokens", self.max_batch_tokens.to_string()),
            ("max_waiting", self.max_waiting.to_string()),
            ("kv_cache_mib", self.kv_cache_mib.to_string()),
            ("kv_dtype", lower(&self.kv_dtype)),
            ("prefix_cache", self.prefix_cache.to_string()),
            ("default_max_tokens", self.default_max_tokens.to_string()),
            ("max_gamma", self.max_gamma.to_string()),
            ("shutdown_grace_secs", self.shutdown_grace_secs.to_string()),
            ("adapter_history", self.adapter_history.to_string()),
            ("reconcile_secs", self.reconcile_secs.to_string()),
            ("max_adapters", limits.max_adapters.to_string()),
            ("max_adapter_rank", limits.max_rank.to_string()),
            ("max_adapter_mib", (limits.max_bytes >> 20).to_string()),
            (
                "tenant_max_waiting",
                self.tenant_max_waiting.map_or_else(|| "no limit of its own".into(), |n| n.to_string()),
            ),
            (
                "tenant_max_running_rows",
                self.tenant_max_running_rows.map_or_else(|| "no limit of its own".into(), |n| n.to_string()),
            ),
            ("max_prefill_wait_steps", self.max_prefill_wait_steps.to_string()),
            ("tokenizer_threads", "one per core".into()),
            ("request_timeout_secs", self.request_timeout_secs.to_string()),
            ("header_timeout_secs", self.header_timeout_secs.to_string()),
            ("max_stop_sequences", self.max_stop_sequences.to_string()),
            ("max_stop_chars", self.max_stop_chars.to_string()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Settings with no default value to show: optional paths and addresses, and a switch.
    const NO_DEFAULT: &[&str] = &[
        "tokenizer",
        "metrics_port",
        "admin_addr",
        "config",
        "state_dir",
        "state_store",
        "generations_dir",
        "adapters_root",
        "admin_key_file",
        "require_api_key",
    ];

    #[test]
    fn serve_help_shows_every_default() {
        use clap::Args;
        let cmd = ServeArgs::augment_args(clap::Command::new("serve"));
        let documented = ServeArgs::document_defaults(cmd.clone());
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            let help = documented.get_arguments().find(|a| a.get_id() == id).unwrap().get_help().unwrap().to_string();
            assert!(!arg.get_help().is_none_or(|h| h.to_string().is_empty()), "--{id} has no help text");
            if NO_DEFAULT.contains(&id) {
                assert!(!help.contains("[default:"), "{id}: {help}");
            } else {
                assert!(help.contains("[default: "), "--{id} shows no default (add it to shown_defaults): {help}");
            }
        }
        let port = documented.get_arguments().find(|a| a.get_id() == "port").unwrap();
        assert!(port.get_help().unwrap().to_string().ends_with("[default: 8080]"));
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let dir = crate::fixtures::TempDir::new("cfg").unwrap();
        let path = dir.path().join("lethe.toml");
        std::fs::write(
            &path,
            "port = 9000\nmax_waiting = 7\nweights = \"q8_0\"\n[guidance]\ngamma = 3.0\nmode = \"prob\"\n",
        )
        .unwrap();
        let args = ServeArgs { config: Some(path.clone()), port: Some(9100), ..Default::default() };
        let c = ServeConfig::resolve(&args).unwrap();
        assert_eq!(c.port, 9100);
        assert_eq!(c.max_waiting, 7);
        assert_eq!(c.weights, WeightFormat::Q8_0);
        assert_eq!(c.guidance.gamma, 3.0);
        assert_eq!(c.guidance.mode, GuidanceMode::Prob);
        assert_eq!(c.guidance.positive, crate::engine::prompt::PAPER_POSITIVE);
        assert_eq!(c.max_running_rows, 32);
        assert_eq!((c.tenant_max_waiting, c.max_stop_sequences, c.request_timeout_secs), (None, 4, 600));
    }

    #[test]
    fn the_admin_key_file_flag_beats_the_variable_which_beats_the_config_file() {
        let dir = crate::fixtures::TempDir::new("cfg-key").unwrap();
        let (flag, conf, envf) = (dir.path().join("flag"), dir.path().join("conf"), dir.path().join("envf"));
        std::fs::write(&flag, "key-from-the-flag-file\n").unwrap();
        std::fs::write(&conf, "key-from-the-config-file\n").unwrap();
        std::fs::write(&envf, "key-from-the-env-file\n").unwrap();
        let env = |k: Option<&str>, f: Option<&std::path::Path>| {
            let (k, f) = (k.map(String::from), f.map(|p| p.display().to_string()));
            move |v: &str| match v {
                "LETHE_ADMIN_KEY" => k.clone(),
                "LETHE_ADMIN_KEY_FILE" => f.clone(),
                _ => None,
            }
        };
        let key = |r: anyhow::Result<Option<Secret>>| r.unwrap().map(|s| s.expose().to_string());
        let var = Some("key-from-the-variable");
        // Documented precedence: flag > environment > config file.
        assert_eq!(
            key(admin_key(Some(flag.clone()), Some(conf.clone()), env(var, None))).unwrap(),
            "key-from-the-flag-file"
        );
        assert_eq!(key(admin_key(None, Some(conf.clone()), env(var, None))).unwrap(), "key-from-the-variable");
        assert_eq!(key(admin_key(None, Some(conf.clone()), env(None, Some(&envf)))).unwrap(), "key-from-the-env-file");
        assert_eq!(key(admin_key(None, Some(conf.clone()), env(None, None))).unwrap(), "key-from-the-config-file");
        assert_eq!(key(admin_key(None, None, env(None, None))), None);
        assert!(admin_key(None, None, env(var, Some(&envf))).is_err(), "two variables are ambiguous");
        assert!(admin_key(None, None, env(Some("short"), None)).is_err());
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let dir = crate::fixtures::TempDir::new("cfg-secret").unwrap();
        let key_file = dir.path().join("admin.key");
        std::fs::write(&key_file, "the-admin-key-0123456789\n").unwrap();
        let args = ServeArgs {
            admin_key_file: Some(key_file),
            state_store: Some("postgres://lethe:pg-pass-5678@db:5432/lethe".parse().unwrap()),
            adapters_root: Some(dir.path().to_path_buf()),
            ..Default::default()
        };
        let c = ServeConfig::resolve(&args).unwrap();
        assert_eq!(c.admin_key.as_ref().unwrap().expose(), "the-admin-key-0123456789");
        for shown in [format!("{c:?}"), format!("{c:#?}"), format!("{args:?}")] {
            assert!(!shown.contains("the-admin-key") && !shown.contains("pg-pass"), "{shown}");
        }
        assert!(format!("{c:?}").contains("postgres://lethe:***@db:5432/lethe"));
        for (raw, want) in [
            ("postgresql://u:p%40ss@h/db?sslmode=disable", "postgresql://u:***@h/db?sslmode=disable"),
            ("postgres://h/db?user=u&password=secret&x=1", "postgres://h/db?user=u&password=***&x=1"),
            ("host=h user=u password='sec ret' dbname=d", "host=h user=u password=*** dbname=d"),
            ("postgres://u@h/db", "postgres://u@h/db"),
        ] {
            assert_eq!(redact_conninfo(raw), want);
        }
        assert!("mysql://x".parse::<StoreUrl>().is_err());
    }

    #[test]
    fn bad_files_are_rejected_with_the_reason() {
        let dir = crate::fixtures::TempDir::new("cfg").unwrap();
        let path = dir.path().join("lethe.toml");
        std::fs::write(&path, "prot = 9000\n").unwrap();
        let err = ServeConfig::resolve(&ServeArgs { config: Some(path.clone()), ..Default::default() }).unwrap_err();
        assert!(err.to_string().contains("prot"), "{err}");
        std::fs::write(&path, "max_gamma = 0.5\n").unwrap();
        assert!(ServeConfig::resolve(&ServeArgs { config: Some(path.clone()), ..Default::default() }).is_err());
        std::fs::write(&path, "tenant_max_running_rows = 1\n").unwrap();
        let err = ServeConfig::resolve(&ServeArgs { config: Some(path), ..Default::default() }).unwrap_err();
        assert!(err.to_string().contains("got 1"), "{err}");
    }
}
