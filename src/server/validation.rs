//! From a parsed OpenAI request to an engine [`Request`]: every check a client can fail, with
//! the parameter it concerns, before any inference work is queued.

use super::AppState;
use super::error::ApiError;
use super::extract::BodyKeys;
use super::openai::{
    AppliedAdapter, AppliedGuidance, ChatCompletionRequest, CommonParams, CompletionRequest, GuidanceRequest,
    MessageContent, PromptInput, StopInput, WireResponseFormat, WireTool, WireToolChoice,
};
use super::output::ToolMode;
use crate::adapters::LoadedAdapter;
use crate::engine::ConstraintSpec;
use crate::engine::prompt::{self, Placement, PromptRows, SystemMessages};
use crate::engine::{Conditions, Request, TenantLimits, UncondSource};
use crate::guidance::{Guidance, GuidanceMode};
use crate::sampling::SamplingParams;
use crate::structured::tools::{self, Tool, ToolChoice, ToolSet};
use crate::structured::{OutputPlan, ResponseFormat, Structured, StructuredError};
use crate::tenants::TenantPolicy;
use crate::tokenizer::ChatMessage;
use std::sync::Arc;

/// A validated request, ready for the engine.
pub struct Prepared {
    pub request: Request,
    pub stream: bool,
    pub include_usage: bool,
    pub applied: AppliedGuidance,
    /// How to read the output (content or tool calls).
    pub tool_mode: ToolMode,
    /// The client asked for log-probabilities.
    pub logprobs: bool,
    /// The vocabulary's bytes (log-probabilities report them), when built.
    pub vocab: Option<Arc<Structured>>,
}

/// Which endpoint a body was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// Fields both endpoints implement ([`CommonParams`]).
const COMMON_FIELDS: &[&str] = &[
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "n",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "guidance",
    "ignore_eos",
];
/// Chat's own fields; `metadata`, `prompt_cache_key` and `safety_identifier` are caller
/// bookkeeping with no effect on the output, accepted as such.
const CHAT_FIELDS: &[&str] = &[
    "messages",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "logprobs",
    "top_logprobs",
    "store",
    "service_tier",
    "modalities",
    "metadata",
    "prompt_cache_key",
    "safety_identifier",
];
const COMPLETION_FIELDS: &[&str] = &["prompt", "echo", "suffix", "best_of", "logprobs"];
/// OpenAI fields lethe does not implement, and what to do instead.
const UNSUPPORTED_FIELDS: &[(&str, &str)] = &[
    ("functions", "use tools"),
    ("function_call", "use tool_choice"),
    ("audio", "lethe generates text only"),
    ("prediction", "predicted outputs are not implemented"),
    ("reasoning_effort", "the model is not a reasoning model"),
    ("verbosity", "the model is not a reasoning model"),
    ("web_search_options", "lethe has no web search"),
];

/// The fields an endpoint accepts (the contract documents each).
pub fn accepted_fields(endpoint: Endpoint) -> Vec<&'static str> {
    let own = match endpoint {
        Endpoint::Chat => CHAT_FIELDS,
        Endpoint::Completions => COMPLETION_FIELDS,
    };
    COMMON_FIELDS.iter().chain(own).copied().collect()
}

/// Refuses every field lethe does not implement, naming it (as OpenAI refuses unknown
/// arguments): a client must never believe a field took effect when it did not.
pub fn check_fields(keys: &BodyKeys, endpoint: Endpoint) -> Result<(), ApiError> {
    let accepted = accepted_fields(endpoint);
    for k in &keys.0 {
        if accepted.contains(&k.as_str()) {
            continue;
        }
        let shown: String = k.chars().take(100).collect();
        let message = match UNSUPPORTED_FIELDS.iter().find(|(f, _)| f == k) {
            Some((_, instead)) => format!("{shown} is not supported: {instead}."),
            None => format!("Unrecognized request argument supplied: {shown}"),
        };
        return Err(ApiError::invalid(message, Some(shown)));
    }
    Ok(())
}

/// Guidance settled for one request.
struct Resolved {
    /// Conditions and uncond source, when guidance was asked for (by the request or by the
    /// server's defaults); the cond row then carries the positive condition.
    rows: Option<(Conditions, UncondSource)>,
    /// Where the conditions go in a chat (the adapter profile's placement, else `system`).
    placement: Placement,
    guidance: Guidance,
    applied: AppliedGuidance,
}

/// A client's system messages when the prompt carries conditions, by the tenant's rule: kept
/// (the condition leads them), demoted into the user turn (the system turn then holds only
/// server text), or refused.
fn apply_system_rule(
    messages: Vec<ChatMessage>,
    rule: SystemMessages,
    applied: &mut AppliedGuidance,
) -> Result<Vec<ChatMessage>, ApiError> {
    let Some(first) = messages.iter().position(|m| m.role == "system") else {
        return Ok(messages);
    };
    match rule {
        SystemMessages::Keep => Ok(messages),
        SystemMessages::Demote => {
            applied.system_messages = Some("demoted");
            Ok(prompt::demote_system_messages(&messages))
        }
        SystemMessages::Refuse => Err(ApiError::invalid(
            "This tenant does not accept system or developer messages while guidance conditions apply.",
            Some(format!("messages[{first}].role")),
        )),
    }
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
    let bad = |msg: &str, p: &str| ApiError::invalid(msg.to_string(), Some(p.to_string()));
    if req.store == Some(true) {
        return Err(bad("store is not supported: lethe stores no completions.", "store"));
    }
    if req.service_tier.as_deref().is_some_and(|t| t != "auto" && t != "default") {
        return Err(bad("service_tier must be \"auto\" or \"default\".", "service_tier"));
    }
    if req.modalities.as_ref().is_some_and(|m| m.iter().any(|x| x != "text")) {
        return Err(bad("Only the \"text\" modality is supported.", "modalities"));
    }
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (Some(true), top) if top.unwrap_or(0) <= 20 => Some(top.unwrap_or(0) as usize),
        (Some(true), _) => return Err(bad("top_logprobs must be between 0 and 20.", "top_logprobs")),
        (_, Some(_)) => return Err(bad("top_logprobs needs logprobs set to true.", "top_logprobs")),
        _ => None,
    };
    let plan = OutputPlan {
        format: response_format(req.response_format)?,
        tools: tool_set(req.tools, req.tool_choice, req.parallel_tool_calls)?,
    };
    let tool_mode = match plan.tools.as_ref().filter(|t| t.calls_possible()).map(|t| &t.choice) {
        Some(ToolChoice::Auto) => ToolMode::Auto,
        Some(_) => ToolMode::Forced,
        None => ToolMode::Off,
    };
    let tool_role = state.tokenizer.chat_template().is_some_and(|t| t.supports_tool_role());
    let mut messages = messages(req.messages, tool_role)?;
    if let Some(block) = plan.tools.as_ref().and_then(ToolSet::system_prompt) {
        add_system_text(&mut messages, &block);
    }
    let mut resolved = resolve_guidance(state, tenant, common.guidance.as_ref())?;
    if resolved.rows.is_some() {
        // After the tool block is added: tool descriptions are client text too, and must not
        // be able to carry a trigger into the system message beside the condition.
        messages = apply_system_rule(messages, tenant.policy.system_messages, &mut resolved.applied)?;
    }
    let (constraint, vocab) = constrain(state, plan, logprobs.is_some()).await?;
    let tok = state.tokenizer.clone();
    let rows_cfg = resolved.rows.clone();
    let placement = resolved.placement;
    let rows = on_blocking_pool(state, move || {
        let g = rows_cfg.as_ref().map(|(c, s)| (c, s));
        prompt::chat_rows_placed(&tok, &messages, g, placement)
    })
    .await?
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    let mut p = finish(state, tenant, rows, common, resolved)?;
    p.request.constraint = constraint;
    p.request.logprobs = logprobs;
    p.logprobs = logprobs.is_some();
    p.tool_mode = tool_mode;
    p.vocab = vocab;
    Ok(p)
}

/// `response_format` → what the output must be.
fn response_format(f: Option<WireResponseFormat>) -> Result<ResponseFormat, ApiError> {
    Ok(match f {
        None | Some(WireResponseFormat::Text) => ResponseFormat::Text,
        Some(WireResponseFormat::JsonObject) => ResponseFormat::JsonObject,
        Some(WireResponseFormat::JsonSchema { json_schema }) => {
            if !tools::valid_name(&json_schema.name) {
                return Err(ApiError::invalid(
                    "response_format.json_schema.name must be 1 to 64 letters, digits, '_' or '-'.",
                    Some("response_format.json_schema.name".into()),
                ));
            }
            // OpenAI treats a missing schema as "any JSON object".
            ResponseFormat::JsonSchema(json_schema.schema.unwrap_or_else(|| serde_json::json!({"type": "object"})))
        }
    })
}

/// `tools`, `tool_choice` and `parallel_tool_calls` → the functions the model may call.
fn tool_set(
    tools: Option<Vec<WireTool>>,
    choice: Option<WireToolChoice>,
    parallel: Option<bool>,
) -> Result<Option<ToolSet>, ApiError> {
    let bad = |msg: String, p: String| ApiError::invalid(msg, Some(p));
    let Some(wire) = tools.filter(|t| !t.is_empty()) else {
        return match choice {
            None => Ok(None),
            Some(WireToolChoice::Mode(m)) if m == "none" || m == "auto" => Ok(None),
            Some(_) => {
                Err(bad("tool_choice asks for a function call, but there are no tools.".into(), "tool_choice".into()))
            }
        };
    };
    if wire.len() > 128 {
        return Err(bad(format!("At most 128 tools are supported, got {}.", wire.len()), "tools".into()));
    }
    let mut list: Vec<Tool> = Vec::new();
    for (i, t) in wire.into_iter().enumerate() {
        if t.kind != "function" {
            return Err(bad(
                format!("Tools of type {:?} are not supported; only \"function\".", t.kind),
                format!("tools[{i}].type"),
            ));
        }
        let f = t.function;
        if !tools::valid_name(&f.name) {
            return Err(bad(
                "Function names must be 1 to 64 letters, digits, '_' or '-'.".into(),
                format!("tools[{i}].function.name"),
            ));
        }
        if list.iter().any(|x| x.name == f.name) {
            return Err(bad(format!("Two tools are named {:?}.", f.name), format!("tools[{i}].function.name")));
        }
        let parameters = f.parameters.unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}}));
        if parameters.get("type").is_some_and(|t| t != "object") {
            return Err(bad(
                "Function parameters must be the JSON schema of an object.".into(),
                format!("tools[{i}].function.parameters"),
            ));
        }
        list.push(Tool { name: f.name, description: f.description, parameters });
    }
    let choice = match choice {
        None => ToolChoice::Auto,
        Some(WireToolChoice::Mode(m)) => match m.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(bad(
                    format!("Unknown tool_choice {other:?} (none, auto, required, or a function)."),
                    "tool_choice".into(),
                ));
            }
        },
        Some(WireToolChoice::Function { kind, function }) => {
            if kind != "function" {
                return Err(bad(format!("tool_choice of type {kind:?} is not supported."), "tool_choice.type".into()));
            }
            if !list.iter().any(|t| t.name == function.name) {
                return Err(bad(
                    format!("tool_choice names {:?}, which is not among the tools.", function.name),
                    "tool_choice.function.name".into(),
                ));
            }
            ToolChoice::Named(function.name)
        }
    };
    Ok(Some(ToolSet { tools: list, choice, parallel: parallel.unwrap_or(true) }))
}

/// Compiles the request's output constraint (off the async threads, within
/// [`crate::structured::COMPILE_TIMEOUT`]), and gets the vocabulary when log-probabilities need
/// its bytes.
async fn constrain(
    state: &Arc<AppState>,
    plan: OutputPlan,
    need_vocab: bool,
) -> Result<(Option<Arc<dyn ConstraintSpec>>, Option<Arc<Structured>>), ApiError> {
    let free = plan.is_free();
    if free && !need_vocab {
        return Ok((None, None));
    }
    let st = state.clone();
    let param = if plan.tools.as_ref().is_some_and(ToolSet::calls_possible) { "tools" } else { "response_format" };
    let job = on_blocking_pool(state, move || -> Result<_, StructuredError> {
        let vocab = st.structured.get(&st.tokenizer, st.engine.vocab_size());
        if free {
            return Ok((None, vocab.ok()));
        }
        let vocab = vocab.map_err(|e| {
            StructuredError::new(format!("Structured outputs are not available for this model: {e}"), param)
        })?;
        Ok((vocab.compile(&plan)?, Some(vocab)))
    })
    .await?;
    match tokio::time::timeout(crate::structured::COMPILE_TIMEOUT, job).await {
        Err(_) => Err(ApiError::invalid(
            format!(
                "The output format took longer than {} s to compile; simplify the schema.",
                crate::structured::COMPILE_TIMEOUT.as_secs()
            ),
            Some(param.into()),
        )),
        Ok(Err(e)) => Err(ApiError::Internal(e.to_string())),
        Ok(Ok(Err(e))) => Err(ApiError::invalid(e.message, Some(e.param))),
        Ok(Ok(Ok(r))) => Ok(r),
    }
}

/// Appends `text` to the system message (one is added at the front if there is none).
fn add_system_text(messages: &mut Vec<ChatMessage>, text: &str) {
    match messages.first_mut() {
        Some(m) if m.role == "system" => {
            if !m.content.is_empty() {
                m.content.push_str("\n\n");
            }
            m.content.push_str(text);
        }
        _ => messages.insert(0, ChatMessage::system(text)),
    }
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
    if req.logprobs.is_some_and(|n| n > 5) {
        return Err(ApiError::invalid("logprobs must be between 0 and 5.", Some("logprobs".into())));
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
    let logprobs = req.logprobs.map(|n| n as usize);
    let (_, vocab) =
        constrain(state, OutputPlan { format: ResponseFormat::Text, tools: None }, logprobs.is_some()).await?;
    let mut p = finish(state, tenant, rows, common, resolved)?;
    p.request.logprobs = logprobs;
    p.logprobs = logprobs.is_some();
    p.vocab = vocab;
    Ok(p)
}

async fn text_rows(state: &Arc<AppState>, text: String, resolved: &Resolved) -> Result<PromptRows, ApiError> {
    let tok = state.tokenizer.clone();
    let rows_cfg = resolved.rows.clone();
    Ok(on_blocking_pool(state, move || {
        let g = rows_cfg.as_ref().map(|(c, s)| (c, s));
        prompt::text_rows(&tok, &text, g)
    })
    .await?
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??)
}

/// Starts `job` on the fixed pool for blocking work (tokenization, grammar compilation) once a
/// place is free. The place is held by the job itself, so it is given back when the job ends,
/// not when its caller stops waiting for it.
async fn on_blocking_pool<T: Send + 'static>(
    state: &AppState,
    job: impl FnOnce() -> T + Send + 'static,
) -> Result<tokio::task::JoinHandle<T>, ApiError> {
    let place = state.blocking.clone().acquire_owned().await.map_err(|_| ApiError::Unavailable)?;
    Ok(tokio::task::spawn_blocking(move || {
        let _place = place;
        job()
    }))
}

/// The tenant's share of the engine: its policy's limits, else the server's per-tenant ones.
pub fn tenant_limits(state: &AppState, tenant: &TenantContext) -> TenantLimits {
    let p = &tenant.policy;
    TenantLimits {
        max_waiting: p.max_waiting.or(state.config.tenant_max_waiting),
        max_running_rows: p.max_running_rows.or(state.config.tenant_max_running_rows),
        weight: p.weight.unwrap_or(1),
    }
}

/// `stop` → the stop sequences, at most `max_count` of at most `max_chars` characters each
/// (every token generated is checked against each: their size bounds that work).
pub fn stop_sequences(stop: Option<StopInput>, max_count: usize, max_chars: usize) -> Result<Vec<String>, ApiError> {
    let stop = match stop {
        None => Vec::new(),
        Some(StopInput::One(s)) => vec![s],
        Some(StopInput::Many(v)) => v,
    };
    if stop.len() > max_count {
        return Err(ApiError::invalid(
            format!("At most {max_count} stop sequences are supported, got {}.", stop.len()),
            Some("stop".into()),
        ));
    }
    for (i, s) in stop.iter().enumerate() {
        let n = s.chars().count();
        if n > max_chars {
            let shown: String = s.chars().take(20).collect();
            return Err(ApiError::invalid(
                format!("stop[{i}] is {n} characters long ({shown:?}…); at most {max_chars} are supported."),
                Some(format!("stop[{i}]")),
            ));
        }
    }
    Ok(stop)
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
/// Earlier tool calls become assistant text in the calls format, tool results `tool` turns
/// (when the template has that role) or user turns (see [`crate::structured::tools`]).
fn messages(wire: Vec<super::openai::WireMessage>, tool_role: bool) -> Result<Vec<ChatMessage>, ApiError> {
    if wire.is_empty() {
        return Err(ApiError::invalid("[] is too short - 'messages'", Some("messages".into())));
    }
    // Call id → function name, from the assistant turns read so far.
    let mut calls: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    let mut out = Vec::with_capacity(wire.len());
    for (i, m) in wire.into_iter().enumerate() {
        let param = format!("messages[{i}]");
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            "tool" => "tool",
            other => {
                return Err(ApiError::invalid(
                    format!("Unsupported role {other:?} in {param}: use system, developer, user, assistant or tool."),
                    Some(format!("{param}.role")),
                ));
            }
        };
        let has_calls = m.tool_calls.as_ref().is_some_and(|c| !c.is_empty());
        let mut content = match m.content {
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
        if has_calls && role != "assistant" {
            return Err(ApiError::invalid(
                format!("Only assistant messages carry tool_calls ({param} is {role})."),
                Some(format!("{param}.tool_calls")),
            ));
        }
        if let Some(list) = m.tool_calls.filter(|c| !c.is_empty()) {
            let named: Vec<(String, String)> =
                list.iter().map(|c| (c.function.name.clone(), c.function.arguments.clone())).collect();
            let text = tools::calls_text(&named).map_err(|j| {
                ApiError::invalid(
                    format!("{param}.tool_calls[{j}].function.arguments is not valid JSON."),
                    Some(format!("{param}.tool_calls[{j}].function.arguments")),
                )
            })?;
            for c in list {
                calls.insert(c.id, c.function.name);
            }
            if !content.is_empty() {
                content.push('\n');
            }
            content.push_str(&text);
        }
        let message = if role == "tool" {
            let id = m.tool_call_id.unwrap_or_default();
            let Some(name) = calls.get(&id) else {
                return Err(ApiError::invalid(
                    format!(
                        "{param} (role tool) must answer a tool call of an earlier assistant message: no call has id {:?}.",
                        id.chars().take(100).collect::<String>()
                    ),
                    Some(format!("{param}.tool_call_id")),
                ));
            };
            if tool_role {
                ChatMessage::new("tool", content)
            } else {
                ChatMessage::user(format!("Function {name} returned:\n{content}"))
            }
        } else {
            ChatMessage::new(role, content)
        };
        out.push(message);
    }
    Ok(out)
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
    // A forget-adapter was trained with its conditions: a request must not change them (a
    // negative prompt or `last_token` can cancel or invert what guidance removes).
    let fixed = !tenant.adapters.is_empty();
    if g.negative_prompt.is_some() {
        if fixed {
            return Err(bad(
                "This tenant's forget-adapters fix the guidance conditions: negative_prompt is not accepted.".into(),
                "negative_prompt",
            ));
        }
        if !policy.allow_negative_prompt {
            return Err(bad("This tenant may not supply a negative prompt.".into(), "negative_prompt"));
        }
    }
    if g.uncond.as_deref() == Some("last_token") {
        if fixed {
            return Err(bad(
                "This tenant's forget-adapters fix the guidance conditions: uncond = \"last_token\" is not accepted."
                    .into(),
                "uncond",
            ));
        }
        if !policy.allow_last_token {
            return Err(bad("This tenant may not use uncond = \"last_token\".".into(), "uncond"));
        }
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
        system_messages: None,
        adapters: tenant
            .adapters
            .iter()
            .map(|a| AppliedAdapter { name: a.name.clone(), generation: a.generation.clone() })
            .collect(),
    };
    let placement = profile.and_then(|p| p.placement).unwrap_or_default();
    Ok(Resolved { rows: requested.then_some((conditions, source)), placement, guidance, applied })
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
    let logit_bias = logit_bias(c.logit_bias.as_ref(), state.engine.vocab_size())?;
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad("temperature must be between 0 and 2.", "temperature"));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad("top_p must be greater than 0 and at most 1.", "top_p"));
    }
    let stop = stop_sequences(c.stop, state.config.max_stop_sequences, state.config.max_stop_chars)?;
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
    request.limits = tenant_limits(state, tenant);
    request.adapters = tenant.adapters.iter().map(|a| a.weights.clone()).collect();
    request.adapter_names = tenant.adapters.iter().map(|a| a.name.clone()).collect();
    request.adapter_generations = tenant.adapters.iter().map(|a| a.generation.clone()).collect();
    request.logit_bias = logit_bias;
    if let Some(u) = rows.uncond {
        resolved.applied.uncond_prompt_tokens = if resolved.guidance.is_identity() { 0 } else { u.len() };
        request = request.guided(u, resolved.guidance);
    }
    let include_usage = c.stream_options.is_some_and(|o| o.include_usage);
    Ok(Prepared {
        request,
        stream: c.stream,
        include_usage,
        applied: resolved.applied,
        tool_mode: ToolMode::Off,
        logprobs: false,
        vocab: None,
    })
}

/// `logit_bias`: token id (a string) → bias in [-100, 100].
fn logit_bias(
    bias: Option<&serde_json::Map<String, serde_json::Value>>,
    vocab: usize,
) -> Result<Vec<(u32, f32)>, ApiError> {
    let bad = |m: String| ApiError::invalid(m, Some("logit_bias".into()));
    let Some(map) = bias else { return Ok(Vec::new()) };
    if map.len() > 1024 {
        return Err(bad(format!("logit_bias may hold at most 1024 tokens, got {}.", map.len())));
    }
    map.iter()
        .map(|(k, v)| {
            let shown: String = k.chars().take(20).collect();
            let id: u32 = k
                .parse()
                .ok()
                .filter(|&i| (i as usize) < vocab)
                .ok_or_else(|| bad(format!("logit_bias key {shown:?} is not a token id below {vocab}.")))?;
            let b = v
                .as_f64()
                .filter(|b| (-100.0..=100.0).contains(b))
                .ok_or_else(|| bad(format!("logit_bias for token {id} must be a number in [-100, 100].")))?;
            Ok((id, b as f32))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn many(v: &[&str]) -> Option<StopInput> {
        Some(StopInput::Many(v.iter().map(|s| s.to_string()).collect()))
    }

    /// Stop sequences are bounded in count and length; the error is OpenAI's 400, naming the
    /// parameter and the offending value.
    #[test]
    fn stop_sequences_are_bounded() {
        assert_eq!(stop_sequences(None, 4, 8).unwrap(), Vec::<String>::new());
        assert_eq!(stop_sequences(Some(StopInput::One("\n\n".into())), 4, 8).unwrap(), ["\n\n"]);
        assert_eq!(stop_sequences(many(&["a", "bb"]), 2, 2).unwrap(), ["a", "bb"]);

        let e = stop_sequences(many(&["a", "b", "c"]), 2, 8).unwrap_err();
        let body = e.body();
        assert_eq!(e.status(), 400);
        assert_eq!(body.error.kind, "invalid_request_error");
        assert_eq!(body.error.param.as_deref(), Some("stop"));
        assert!(body.error.message.contains("At most 2") && body.error.message.contains("got 3"), "{e}");

        // Characters, not bytes: "é" is one.
        assert!(stop_sequences(many(&["éé"]), 4, 2).is_ok());
        let long = "x".repeat(300);
        let e = stop_sequences(many(&["ok", &long]), 4, 256).unwrap_err();
        let body = e.body();
        assert_eq!(e.status(), 400);
        assert_eq!(body.error.param.as_deref(), Some("stop[1]"));
        assert!(body.error.message.contains("300 characters") && body.error.message.contains("at most 256"), "{e}");
        assert!(body.error.message.len() < 200, "the message quotes a prefix only: {e}");
    }
}
