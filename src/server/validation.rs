//! From a parsed OpenAI request to an engine [`Request`]: every check a client can fail, with
//! the parameter it concerns, before any inference work is queued.

use super::AppState;
use super::error::ApiError;
use super::openai::{
    AppliedAdapter, AppliedGuidance, ChatCompletionRequest, CommonParams, CompletionRequest, GuidanceRequest,
    MessageContent, PromptInput, StopInput,
};
use crate::adapters::LoadedAdapter;
use crate::engine::prompt::{self, PromptRows};
use crate::engine::{Conditions, Request, UncondSource};
use crate::guidance::{Guidance, GuidanceMode};
use crate::sampling::SamplingParams;
use crate::tenants::TenantPolicy;
use crate::tokenizer::ChatMessage;
use std::sync::Arc;

/// A validated request, ready for the engine.
pub struct Prepared {
    pub request: Request,
    pub stream: bool,
    pub include_usage: bool,
    pub applied: AppliedGuidance,
}

/// Guidance settled for one request.
struct Resolved {
    /// Conditions and uncond source, when guidance was asked for (by the request or by the
    /// server's defaults); the cond row then carries the positive condition.
    rows: Option<(Conditions, UncondSource)>,
    guidance: Guidance,
    applied: AppliedGuidance,
}

/// The tenant's side of a request: its policy and leases on its adapters' current versions.
pub struct TenantContext {
    pub name: String,
    pub policy: TenantPolicy,
    pub adapters: Vec<Arc<LoadedAdapter>>,
}

impl TenantContext {
    /// Reads the tenant's policy and leases its adapters. A forced unload removes the adapter
    /// from policies first and from the registry second, so a lookup that misses was racing an
    /// admin change: reading the policy again settles it.
    pub fn of(state: &AppState, tenant: &str) -> Result<Self, ApiError> {
        let mut attempts = 0;
        loop {
            let policy = state.tenants.policy(tenant);
            let leased: Option<Vec<_>> = policy.adapters.iter().map(|a| state.adapters.get(a)).collect();
            match leased {
                Some(adapters) => return Ok(Self { name: tenant.to_string(), policy, adapters }),
                None if attempts < 3 => attempts += 1,
                None => return Err(state.control.missing_adapters(tenant, &policy.adapters)),
            }
        }
    }
}

pub async fn prepare_chat(
    state: &Arc<AppState>,
    tenant: &TenantContext,
    req: ChatCompletionRequest,
    common: CommonParams,
) -> Result<Prepared, ApiError> {
    check_model(state, tenant, &req.model)?;
    let messages = messages(req.messages)?;
    let resolved = resolve_guidance(state, tenant, common.guidance.as_ref())?;
    let tok = state.tokenizer.clone();
    let rows_cfg = resolved.rows.clone();
    let rows = tokio::task::spawn_blocking(move || {
        let g = rows_cfg.as_ref().map(|(c, s)| (c, s));
        prompt::chat_rows(&tok, &messages, g)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    finish(state, tenant, rows, common, resolved)
}

pub async fn prepare_completion(
    state: &Arc<AppState>,
    tenant: &TenantContext,
    req: CompletionRequest,
    common: CommonParams,
) -> Result<Prepared, ApiError> {
    check_model(state, tenant, &req.model)?;
    if req.echo {
        return Err(ApiError::invalid("echo is not supported.", Some("echo".into())));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix is not supported.", Some("suffix".into())));
    }
    if req.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::invalid("best_of must be 1.", Some("best_of".into())));
    }
    let resolved = resolve_guidance(state, tenant, common.guidance.as_ref())?;
    let rows = match req.prompt {
        PromptInput::Text(t) => text_rows(state, t, &resolved).await?,
        PromptInput::Texts(mut ts) if ts.len() == 1 => text_rows(state, ts.remove(0), &resolved).await?,
        PromptInput::Texts(_) => {
            return Err(ApiError::invalid("Only one prompt per request is supported.", Some("prompt".into())));
        }
        PromptInput::Tokens(ids) => {
            if resolved.rows.is_some() {
                return Err(ApiError::invalid(
                    "Guidance needs a text prompt (the condition is added as text); token prompts run unguided.",
                    Some("prompt".into()),
                ));
            }
            PromptRows { cond: ids, uncond: None }
        }
    };
    finish(state, tenant, rows, common, resolved)
}

async fn text_rows(state: &Arc<AppState>, text: String, resolved: &Resolved) -> Result<PromptRows, ApiError> {
    let tok = state.tokenizer.clone();
    let rows_cfg = resolved.rows.clone();
    Ok(tokio::task::spawn_blocking(move || {
        let g = rows_cfg.as_ref().map(|(c, s)| (c, s));
        prompt::text_rows(&tok, &text, g)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??)
}

/// The base model's id, or the name of one of the tenant's adapters (the tenant's adapters apply
/// either way: a request cannot pick them off).
fn check_model(state: &AppState, tenant: &TenantContext, model: &str) -> Result<(), ApiError> {
    if model == state.model_id || tenant.policy.adapters.iter().any(|a| a == model) {
        Ok(())
    } else {
        Err(ApiError::ModelNotFound(model.chars().take(200).collect()))
    }
}

/// OpenAI messages → chat template messages. Text only; `developer` is a system message.
fn messages(wire: Vec<super::openai::WireMessage>) -> Result<Vec<ChatMessage>, ApiError> {
    if wire.is_empty() {
        return Err(ApiError::invalid("[] is too short - 'messages'", Some("messages".into())));
    }
    wire.into_iter()
        .enumerate()
        .map(|(i, m)| {
            let param = format!("messages[{i}]");
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::invalid(
                        format!("Unsupported role {other:?} in {param}: use system, developer, user or assistant."),
                        Some(format!("{param}.role")),
                    ));
                }
            };
            let content = match m.content {
                Some(MessageContent::Text(t)) => t,
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.into_iter().enumerate() {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            ("text", None) => {
                                return Err(ApiError::invalid(
                                    format!("Missing text in {param}.content[{j}]."),
                                    Some(format!("{param}.content[{j}].text")),
                                ));
                            }
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    format!("Content parts of type {kind:?} are not supported; only \"text\"."),
                                    Some(format!("{param}.content[{j}].type")),
                                ));
                            }
                        }
                    }
                    text
                }
                None if role == "assistant" => String::new(),
                None => {
                    return Err(ApiError::invalid(
                        format!("Missing content in {param}."),
                        Some(format!("{param}.content")),
                    ));
                }
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

/// Settles guidance from the request, the tenant's policy, its adapters' profiles and the
/// server's defaults (in that order), and enforces the policy's bounds.
fn resolve_guidance(
    state: &AppState,
    tenant: &TenantContext,
    req: Option<&GuidanceRequest>,
) -> Result<Resolved, ApiError> {
    let server = &state.config.guidance;
    let policy = &tenant.policy;
    let profile = tenant.adapters.iter().find_map(|a| a.profile.as_ref());
    let bad = |msg: String, p: &str| ApiError::invalid(msg, Some(format!("guidance.{p}")));
    let g = req.cloned().unwrap_or_default();
    let (lo, hi) = (policy.gamma_min, policy.gamma_max(state.config.max_gamma));
    // `max`/`min` rather than `clamp`, which panics if a policy ever had lo > hi.
    let default_gamma = policy.gamma.or(profile.and_then(|p| p.gamma)).unwrap_or(server.gamma).max(lo).min(hi);
    let gamma = g.gamma.unwrap_or(default_gamma);
    if !gamma.is_finite() || gamma < 0.0 {
        return Err(bad(format!("guidance.gamma must be a finite number ≥ 0, got {gamma}."), "gamma"));
    }
    if gamma < lo || gamma > hi {
        return Err(bad(format!("guidance.gamma must be within [{lo}, {hi}] for this tenant, got {gamma}."), "gamma"));
    }
    let mode = match g.mode.as_deref() {
        None => policy.mode.or(profile.and_then(|p| p.mode)).unwrap_or(server.mode),
        Some(m) => m.parse::<GuidanceMode>().map_err(|e| bad(e, "mode"))?,
    };
    if g.negative_prompt.is_some() && !policy.allow_negative_prompt {
        return Err(bad("This tenant may not supply a negative prompt.".into(), "negative_prompt"));
    }
    let (source, source_name) = match (g.uncond.as_deref(), g.negative_prompt) {
        (Some("last_token"), Some(_)) => {
            return Err(bad(
                "negative_prompt cannot be combined with uncond = \"last_token\".".into(),
                "negative_prompt",
            ));
        }
        (Some("last_token"), None) => (UncondSource::LastToken, "last_token"),
        (None | Some("negative_condition") | Some("negative_prompt"), Some(np)) => {
            (UncondSource::Custom(np), "negative_prompt")
        }
        (None | Some("negative_condition"), None) => (UncondSource::NegativeCondition, "negative_condition"),
        (Some(other), _) => {
            return Err(bad(format!("Unknown uncond source {other:?} (negative_condition, last_token)."), "uncond"));
        }
    };
    // Conditions go into the prompt when guidance is asked for, by the request or by default,
    // or when an adapter carries them (it was trained with them).
    let requested = req.is_some() || default_gamma != 1.0 || profile.is_some();
    let conditions = match profile {
        Some(p) => Conditions { positive: p.positive.clone(), negative: p.negative.clone() },
        None => Conditions { positive: server.positive.clone(), negative: server.negative.clone() },
    };
    let guidance = Guidance { gamma, mode };
    let applied = AppliedGuidance {
        gamma: if requested { gamma } else { 1.0 },
        mode: mode.as_str(),
        uncond: if requested && !guidance.is_identity() { source_name } else { "none" },
        uncond_prompt_tokens: 0,
        adapters: tenant
            .adapters
            .iter()
            .map(|a| AppliedAdapter { name: a.name.clone(), generation: a.generation.clone() })
            .collect(),
    };
    Ok(Resolved { rows: requested.then_some((conditions, source)), guidance, applied })
}

/// Sampling, limits, and the engine request.
fn finish(
    state: &AppState,
    tenant: &TenantContext,
    rows: PromptRows,
    c: CommonParams,
    mut resolved: Resolved,
) -> Result<Prepared, ApiError> {
    let bad = |msg: &str, p: &str| ApiError::invalid(msg.to_string(), Some(p.to_string()));
    if c.n.is_some_and(|n| n != 1) {
        return Err(bad("Only n = 1 is supported.", "n"));
    }
    if c.presence_penalty.is_some_and(|p| p != 0.0) || c.frequency_penalty.is_some_and(|p| p != 0.0) {
        return Err(bad("presence_penalty and frequency_penalty are not supported (use 0).", "presence_penalty"));
    }
    if c.logprobs.as_ref().is_some_and(|v| !v.is_null() && *v != serde_json::json!(false)) {
        return Err(bad("logprobs are not supported.", "logprobs"));
    }
    if c.logit_bias.as_ref().is_some_and(|v| v.as_object().is_some_and(|o| !o.is_empty())) {
        return Err(bad("logit_bias is not supported.", "logit_bias"));
    }
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad("temperature must be between 0 and 2.", "temperature"));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad("top_p must be greater than 0 and at most 1.", "top_p"));
    }
    let stop = match c.stop {
        None => Vec::new(),
        Some(StopInput::One(s)) => vec![s],
        Some(StopInput::Many(v)) => v,
    };
    if stop.len() > 4 {
        return Err(bad("At most 4 stop sequences are supported.", "stop"));
    }
    if rows.cond.is_empty() {
        return Err(bad("The prompt is empty.", "prompt"));
    }
    let max_context = state.engine.max_context();
    let longest = rows.cond.len().max(rows.uncond.as_ref().map_or(0, Vec::len));
    let max_tokens = match c.max_completion_tokens.or(c.max_tokens) {
        Some(0) => return Err(bad("max_tokens must be at least 1.", "max_tokens")),
        Some(n) => n as usize,
        None => {
            if longest >= max_context {
                return Err(ApiError::ContextLengthExceeded { needed: longest + 1, max: max_context });
            }
            state.config.default_max_tokens.min(max_context - longest)
        }
    };
    if longest + max_tokens > max_context {
        return Err(ApiError::ContextLengthExceeded { needed: longest + max_tokens, max: max_context });
    }
    let mut request = Request::new(rows.cond, max_tokens);
    request.sampling =
        SamplingParams { temperature, top_k: c.top_k.unwrap_or(0) as usize, top_p, seed: c.seed.map(|s| s as u64) };
    request.stop = stop;
    request.ignore_eos = c.ignore_eos;
    request.tenant = tenant.name.clone();
    request.adapters = tenant.adapters.iter().map(|a| a.weights.clone()).collect();
    request.adapter_names = tenant.adapters.iter().map(|a| a.name.clone()).collect();
    if let Some(u) = rows.uncond {
        resolved.applied.uncond_prompt_tokens = if resolved.guidance.is_identity() { 0 } else { u.len() };
        request = request.guided(u, resolved.guidance);
    }
    let include_usage = c.stream_options.is_some_and(|o| o.include_usage);
    Ok(Prepared { request, stream: c.stream, include_usage, applied: resolved.applied })
}
