//! `lethe serve` settings, from three sources with one precedence:
//! **command-line flags > `LETHE_*` environment variables > `--config` TOML file > defaults.**
//!
//! Flags and environment variables are both handled by clap (every flag has an `env`), so a flag
//! wins over its variable; the file fills whatever neither set.

use crate::guidance::GuidanceMode;
use crate::model::{Backend, KvDtype, WeightFormat};
use clap::Args;
use serde::Deserialize;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// Flags of `lethe serve` (each also readable from `LETHE_<NAME>`).
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// Model: a .gguf file or an HF directory (default: the fetched SmolLM2-135M-Instruct).
    #[arg(long, env = "LETHE_MODEL")]
    pub model: Option<PathBuf>,
    /// A tokenizer.json to use instead of the model's own.
    #[arg(long, env = "LETHE_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, env = "LETHE_HOST")]
    pub host: Option<IpAddr>,
    #[arg(long, env = "LETHE_PORT")]
    pub port: Option<u16>,
    /// Also serve `/metrics` (and `/health`) on this port, e.g. for a scrape-only network policy.
    #[arg(long, env = "LETHE_METRICS_PORT")]
    pub metrics_port: Option<u16>,
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
    /// KV cache budget in MiB.
    #[arg(long, env = "LETHE_KV_CACHE_MIB")]
    pub kv_cache_mib: Option<usize>,
    /// KV cache element type: f16 or f32.
    #[arg(long, env = "LETHE_KV_DTYPE")]
    pub kv_dtype: Option<KvDtype>,
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
    /// Adapter paths given to the admin API must resolve inside this directory.
    #[arg(long, env = "LETHE_ADAPTERS_ROOT")]
    pub adapters_root: Option<PathBuf>,
    /// A file holding the admin key (alternative to the LETHE_ADMIN_KEY variable). Without an
    /// admin key the admin API is off.
    #[arg(long, env = "LETHE_ADMIN_KEY_FILE")]
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
    pub device: Option<String>,
    pub backend: Option<String>,
    pub weights: Option<String>,
    pub threads: Option<usize>,
    pub max_running_rows: Option<usize>,
    pub max_batch_tokens: Option<usize>,
    pub max_waiting: Option<usize>,
    pub kv_cache_mib: Option<usize>,
    pub kv_dtype: Option<String>,
    pub default_max_tokens: Option<usize>,
    pub max_gamma: Option<f32>,
    pub shutdown_grace_secs: Option<u64>,
    pub state_dir: Option<PathBuf>,
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

/// Resolved settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub model: PathBuf,
    pub tokenizer: Option<PathBuf>,
    pub host: IpAddr,
    pub port: u16,
    pub metrics_port: Option<u16>,
    pub device: String,
    pub backend: Backend,
    pub weights: WeightFormat,
    pub threads: Option<usize>,
    pub max_running_rows: usize,
    pub max_batch_tokens: usize,
    pub max_waiting: usize,
    pub kv_cache_mib: usize,
    pub kv_dtype: KvDtype,
    pub default_max_tokens: usize,
    pub max_gamma: f32,
    pub shutdown_grace_secs: u64,
    pub guidance: GuidanceDefaults,
    pub state_dir: Option<PathBuf>,
    pub adapters_root: Option<PathBuf>,
    /// The admin key (from LETHE_ADMIN_KEY or the key file); `None` turns the admin API off.
    pub admin_key: Option<String>,
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
            kv_cache_mib: args.kv_cache_mib.or(file.kv_cache_mib).unwrap_or(2048),
            kv_dtype,
            default_max_tokens: args.default_max_tokens.or(file.default_max_tokens).unwrap_or(512),
            max_gamma: args.max_gamma.or(file.max_gamma).unwrap_or(20.0),
            shutdown_grace_secs: args.shutdown_grace_secs.or(file.shutdown_grace_secs).unwrap_or(10),
            guidance: file.guidance.unwrap_or_default(),
            state_dir: args.state_dir.clone().or(file.state_dir),
            adapters_root: args.adapters_root.clone().or(file.adapters_root),
            admin_key: admin_key(args.admin_key_file.clone().or(file.admin_key_file))?,
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
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.max_running_rows >= 2, "max_running_rows must be at least 2 (a guided pair)");
        anyhow::ensure!(self.max_batch_tokens >= 1, "max_batch_tokens must be at least 1");
        anyhow::ensure!(self.max_waiting >= 1, "max_waiting must be at least 1");
        anyhow::ensure!(self.default_max_tokens >= 1, "default_max_tokens must be at least 1");
        anyhow::ensure!(self.max_gamma.is_finite() && self.max_gamma >= 1.0, "max_gamma must be a finite number ≥ 1");
        let g = &self.guidance;
        anyhow::ensure!(
            g.gamma.is_finite() && g.gamma >= 0.0 && g.gamma <= self.max_gamma,
            "guidance.gamma must be in [0, max_gamma]"
        );
        Ok(())
    }
}

/// The admin key: `LETHE_ADMIN_KEY`, else the first line of the key file.
fn admin_key(file: Option<PathBuf>) -> anyhow::Result<Option<String>> {
    if let Ok(k) = std::env::var("LETHE_ADMIN_KEY")
        && !k.trim().is_empty()
    {
        // A short key is a placeholder left in place (or guessable): refuse to start with it.
        anyhow::ensure!(k.trim().len() >= 16, "LETHE_ADMIN_KEY must be at least 16 characters");
        return Ok(Some(k.trim().to_string()));
    }
    let Some(path) = file else { return Ok(None) };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("cannot read admin key file {}: {e}", path.display()))?;
    let key = text.lines().next().unwrap_or("").trim().to_string();
    anyhow::ensure!(key.len() >= 16, "the admin key in {} must be at least 16 characters", path.display());
    Ok(Some(key))
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("invalid config {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn bad_files_are_rejected_with_the_reason() {
        let dir = crate::fixtures::TempDir::new("cfg").unwrap();
        let path = dir.path().join("lethe.toml");
        std::fs::write(&path, "prot = 9000\n").unwrap();
        let err = ServeConfig::resolve(&ServeArgs { config: Some(path.clone()), ..Default::default() }).unwrap_err();
        assert!(err.to_string().contains("prot"), "{err}");
        std::fs::write(&path, "max_gamma = 0.5\n").unwrap();
        assert!(ServeConfig::resolve(&ServeArgs { config: Some(path), ..Default::default() }).is_err());
    }
}
