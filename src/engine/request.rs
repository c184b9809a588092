//! What the engine is asked to do, and the events it sends back.

use super::constraint::ConstraintSpec;
use crate::guidance::Guidance;
use crate::model::lora::LoraWeights;
use crate::sampling::{SamplingParams, TokenLogprobs};
use std::sync::Arc;
use std::time::Duration;

/// A generation request, already tokenized.
#[derive(Debug, Clone)]
pub struct Request {
    /// Prompt of the cond row (the only row when unguided).
    pub prompt: Vec<u32>,
    /// Prompt of the uncond row; used only with a guidance whose γ ≠ 1.
    pub uncond_prompt: Option<Vec<u32>>,
    pub guidance: Option<Guidance>,
    pub sampling: SamplingParams,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Finish when any of these strings appears; the stop string itself is not returned.
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
    /// Label for metrics (a tenant name; bounded cardinality).
    pub tenant: String,
    /// Forget-adapters applied to every row of the request (leases: the versions are kept alive
    /// until the request ends, whatever the registry does meanwhile).
    pub adapters: Vec<Arc<LoraWeights>>,
    /// Adapter names, for metrics labels.
    pub adapter_names: Vec<String>,
    /// The adapters' generations (content hashes), one per adapter: part of the prefix cache's
    /// keys. A request with adapters whose generations are not all known takes no part in
    /// prefix caching.
    pub adapter_generations: Vec<String>,
    /// Restricts which tokens may be sampled (a grammar: JSON schema, tool calls).
    pub constraint: Option<Arc<dyn ConstraintSpec>>,
    /// Added to the scores of these tokens before sampling (OpenAI's `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
    /// Report each sampled token's log-probability and this many most likely alternatives.
    pub logprobs: Option<usize>,
    /// The tenant's share of the engine (its policy's limits and weight).
    pub limits: TenantLimits,
}

/// A tenant's share of the engine: limits on its own requests, and its weight in fair
/// admission. `None`: only the server-wide limit applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantLimits {
    /// Requests of the tenant waiting (being tokenized or queued) at once; more get 429.
    pub max_waiting: Option<usize>,
    /// Rows of the tenant running at once (a guided request takes 2); more wait.
    pub max_running_rows: Option<usize>,
    /// Relative share when tenants compete for rows (admission goes to the tenant running the
    /// fewest rows per unit of weight).
    pub weight: u32,
}

impl Default for TenantLimits {
    fn default() -> Self {
        Self { max_waiting: None, max_running_rows: None, weight: 1 }
    }
}

impl Request {
    /// An unguided request with default sampling.
    pub fn new(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            prompt,
            uncond_prompt: None,
            guidance: None,
            sampling: SamplingParams::default(),
            max_tokens,
            stop: Vec::new(),
            ignore_eos: false,
            tenant: "default".into(),
            adapters: Vec::new(),
            adapter_names: Vec::new(),
            adapter_generations: Vec::new(),
            constraint: None,
            logit_bias: Vec::new(),
            logprobs: None,
            limits: TenantLimits::default(),
        }
    }

    /// Adds guidance with its uncond prompt.
    pub fn guided(mut self, uncond_prompt: Vec<u32>, guidance: Guidance) -> Self {
        self.uncond_prompt = Some(uncond_prompt);
        self.guidance = Some(guidance);
        self
    }

    /// True when the request runs as a cond/uncond pair. γ = 1 is unguided decoding, so the
    /// uncond row is not even created.
    pub fn is_pair(&self) -> bool {
        self.uncond_prompt.is_some() && self.guidance.is_some_and(|g| !g.is_identity())
    }

    /// True when choosing a token needs the logits on the host: an output constraint, a logit
    /// bias or logprobs (a device samples only the plain mixed distribution).
    pub fn needs_host_choice(&self) -> bool {
        self.constraint.is_some() || !self.logit_bias.is_empty() || self.logprobs.is_some()
    }

    /// Rows the request occupies while running.
    pub fn n_rows(&self) -> usize {
        if self.is_pair() { 2 } else { 1 }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Tokens of the cond prompt.
    pub prompt_tokens: usize,
    /// Tokens of the uncond prompt (0 when unguided): computed, but not part of the answer.
    pub uncond_prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Tokens of the cond prompt served from the prefix cache instead of computed.
    pub cached_tokens: usize,
    /// The same for the uncond prompt.
    pub uncond_cached_tokens: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timing {
    /// Waiting before admission.
    pub queue: Duration,
    /// Arrival to first generated token.
    pub time_to_first_token: Option<Duration>,
    /// Arrival to finish.
    pub total: Duration,
}

/// Events of one request, in order: any number of `Token`, then exactly one `Finished` or `Error`.
#[derive(Debug, Clone)]
pub enum Event {
    /// A generated token and the text it completes (may be empty while a multi-byte character
    /// or a possible stop string is held back).
    Token {
        id: u32,
        text: String,
        /// When the request asked for them: log-probabilities of the distribution the token was
        /// drawn from (the mixed one for a guided pair), before logit bias, constraint,
        /// temperature and top-k/p.
        logprobs: Option<Box<TokenLogprobs>>,
    },
    Finished {
        reason: FinishReason,
        usage: Usage,
        timing: Timing,
    },
    /// The request failed after it was accepted (shutdown, a failed forward, limits).
    Error(super::engine::EngineError),
}
