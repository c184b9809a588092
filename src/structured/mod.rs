//! Structured outputs: decoding constrained to a grammar, so that a JSON schema's output always
//! parses and validates, and tool calls always name a real function with valid arguments.
//!
//! Grammars are compiled by [llguidance](https://github.com/guidance-ai/llguidance) (the engine
//! behind vLLM's and llama.cpp's structured outputs) against a byte trie of the model's
//! vocabulary (`toktrie`); the engine asks the compiled constraint for the allowed next tokens
//! of every step (see [`crate::engine::constraint`]).
//!
//! - [`Structured`]: the vocabulary trie and grammar compiler of one model, built on first use;
//! - [`OutputPlan`]: what a request asked for (`response_format`, `tools`, `tool_choice`), and
//!   its compilation into a [`ConstraintSpec`];
//! - [`tools`]: the tool-call format, its prompt and its (streaming) parser.
//!
//! JSON is generated compactly but readably (`{"a": 1, "b": [2, 3]}`: `", "` and `": "`
//! separators, no other whitespace), so a model can never pad its output with endless
//! whitespace.

pub mod tools;

use crate::engine::constraint::{ConstraintSpec, TokenBits, TokenConstraint};
use crate::tokenizer::Tokenizer;
use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory, TokenParser};
use serde_json::{Value, json};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
pub use tools::{Tool, ToolChoice, ToolSet};

/// Largest schema accepted (its JSON text; for tools, all parameter schemas together).
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;
/// Deepest nesting of a schema's JSON (objects and arrays).
pub const MAX_SCHEMA_DEPTH: usize = 40;
/// Longest a grammar may take to compile before the request is refused. The compiler's own
/// fuel limits stop a runaway compilation well within this, so nothing keeps running.
pub const COMPILE_TIMEOUT: Duration = Duration::from_secs(5);

/// A request that cannot be constrained as asked: a 400 naming `param`.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[error("{message}")]
pub struct StructuredError {
    pub message: String,
    pub param: String,
}

impl StructuredError {
    pub fn new(message: impl Into<String>, param: impl Into<String>) -> Self {
        Self { message: message.into(), param: param.into() }
    }
}

/// What `response_format` asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON valid against this schema.
    JsonSchema(Value),
}

/// The output a request asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputPlan {
    pub format: ResponseFormat,
    pub tools: Option<ToolSet>,
}

impl OutputPlan {
    /// True when decoding needs no constraint at all.
    pub fn is_free(&self) -> bool {
        self.format == ResponseFormat::Text && self.tools.as_ref().is_none_or(|t| !t.calls_possible())
    }
}

/// The vocabulary trie and grammar compiler of one model.
pub struct Structured {
    factory: ParserFactory,
    vocab: usize,
}

impl std::fmt::Debug for Structured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Structured").field("vocab", &self.vocab).finish()
    }
}

/// The tokenizer side llguidance needs: the trie, and a tokenization for the (rare) strings it
/// tokenizes itself. Declared non-canonical, so llguidance never forces a tokenization of ours.
struct Env {
    trie: TokTrie,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }
    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

impl Structured {
    /// Builds the trie of `tokenizer`'s tokens over the model's `vocab` ids (tens of ms for a
    /// 50k vocabulary).
    pub fn new(tokenizer: &Tokenizer, vocab: usize) -> Result<Self, String> {
        let words = tokenizer.token_bytes(vocab).map_err(|e| e.to_string())?;
        let eos = tokenizer.eos_ids().iter().copied().filter(|&e| (e as usize) < vocab).collect::<Vec<_>>();
        let Some(&first_eos) = eos.first() else {
            return Err("the tokenizer has no end-of-sequence token".into());
        };
        let mut info = TokRxInfo::new(vocab as u32, first_eos);
        info.tok_bos = tokenizer.bos_id();
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&eos);
        let env: TokEnv = Arc::new(Env { trie });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        *factory.limits_mut() = ParserLimits { verbose_errors: false, ..ParserLimits::default() };
        Ok(Self { factory, vocab })
    }

    /// The bytes of a token (special tokens start with
    /// [`crate::tokenizer::bytes::SPECIAL_MARKER`]).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let trie = self.factory.tok_env().tok_trie();
        if (id as usize) < trie.vocab_size() { trie.token(id) } else { &[] }
    }

    /// Compiles what `plan` asks for; `None` when nothing needs constraining.
    pub fn compile(&self, plan: &OutputPlan) -> Result<Option<Arc<dyn ConstraintSpec>>, StructuredError> {
        let answer = match &plan.format {
            ResponseFormat::Text => None,
            ResponseFormat::JsonObject => Some(self.grammar(json!({"type": "object"}), "response_format")?),
            ResponseFormat::JsonSchema(s) => {
                let param = "response_format.json_schema.schema";
                check_schema(s, param)?;
                Some(self.grammar(s.clone(), param)?)
            }
        };
        let Some(tools) = plan.tools.as_ref().filter(|t| t.calls_possible()) else {
            return Ok(answer.map(|g| Arc::new(GrammarSpec(g)) as Arc<dyn ConstraintSpec>));
        };
        for (i, t) in tools.tools.iter().enumerate() {
            let param = format!("tools[{i}].function.parameters");
            check_schema(&t.parameters, &param)?;
            self.grammar(t.parameters.clone(), &param)?;
        }
        let calls = self.grammar(tools.calls_schema()?, "tools")?;
        Ok(Some(match tools.choice {
            ToolChoice::Auto => Arc::new(AutoSpec { calls, answer, env: self.factory.tok_env().clone() }),
            _ => Arc::new(GrammarSpec(calls)),
        }))
    }

    /// Compiles one JSON schema.
    fn grammar(&self, mut schema: Value, param: &str) -> Result<TokenParser, StructuredError> {
        let Some(obj) = schema.as_object_mut() else {
            return Err(StructuredError::new(format!("{param} must be a JSON schema object."), param));
        };
        obj.insert(
            "x-guidance".into(),
            json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": ", "lenient": false}),
        );
        let grammar = TopLevelGrammar::from_json_schema(schema);
        self.factory
            .create_parser(grammar)
            .map_err(|e| StructuredError::new(format!("{param} cannot be used to constrain the output: {e}"), param))
    }
}

/// Refuses schemas that are too large or deep, or that use llguidance's own extension.
fn check_schema(schema: &Value, param: &str) -> Result<(), StructuredError> {
    if !schema.is_object() {
        return Err(StructuredError::new(format!("{param} must be a JSON schema object."), param));
    }
    let size = serde_json::to_string(schema).map_or(usize::MAX, |s| s.len());
    if size > MAX_SCHEMA_BYTES {
        return Err(StructuredError::new(
            format!("{param} is {size} bytes of JSON; at most {MAX_SCHEMA_BYTES} are supported."),
            param,
        ));
    }
    let depth = depth(schema);
    if depth > MAX_SCHEMA_DEPTH {
        return Err(StructuredError::new(
            format!("{param} nests {depth} levels deep; at most {MAX_SCHEMA_DEPTH} are supported."),
            param,
        ));
    }
    if contains_key(schema, "x-guidance") {
        return Err(StructuredError::new(format!("{param} uses \"x-guidance\", which is not supported."), param));
    }
    Ok(())
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn contains_key(v: &Value, key: &str) -> bool {
    match v {
        Value::Object(m) => m.contains_key(key) || m.values().any(|x| contains_key(x, key)),
        Value::Array(a) => a.iter().any(|x| contains_key(x, key)),
        _ => false,
    }
}

/// A compiled grammar; each generation runs a clone (they share the lexer caches).
struct GrammarSpec(TokenParser);

impl std::fmt::Debug for GrammarSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrammarSpec")
    }
}

impl ConstraintSpec for GrammarSpec {
    fn start(&self) -> Box<dyn TokenConstraint> {
        Box::new(GrammarRun::new(&self.0))
    }
}

/// One generation under a grammar.
struct GrammarRun {
    matcher: Matcher,
    /// The allowed next tokens, once computed for the current position.
    mask: Option<Result<SimpleVob, String>>,
}

impl GrammarRun {
    fn new(parser: &TokenParser) -> Self {
        Self { matcher: Matcher::new(Ok(parser.clone())), mask: None }
    }

    fn compute(&mut self) -> Result<SimpleVob, String> {
        let mask = self.matcher.compute_mask_or_eos().map_err(|e| e.to_string())?;
        if mask.is_zero() {
            return Err("the output grammar admits no token here".into());
        }
        Ok(mask)
    }

    fn mask(&mut self) -> Result<&SimpleVob, String> {
        if self.mask.is_none() {
            self.mask = Some(self.compute());
        }
        match self.mask.as_ref().expect("just set") {
            Ok(m) => Ok(m),
            Err(e) => Err(e.clone()),
        }
    }
}

impl TokenConstraint for GrammarRun {
    fn prepare(&mut self) {
        let _ = self.mask();
    }
    fn allowed(&mut self) -> Result<Option<&TokenBits>, String> {
        self.mask().map(|m| Some(m.as_slice()))
    }
    fn commit(&mut self, token: u32) -> Result<(), String> {
        self.mask = None;
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }
    fn is_complete(&self) -> bool {
        self.matcher.is_stopped() && !self.matcher.is_error()
    }
}

/// `tool_choice: "auto"`: the model either calls tools (the output starts with
/// [`tools::CALLS_PREFIX`] and follows the calls grammar) or answers (text, or the
/// `response_format` grammar). Until the output has either completed the prefix or left it, a
/// token is allowed if the calls grammar allows it, or if it leaves the prefix and the answer
/// allows it.
struct AutoSpec {
    calls: TokenParser,
    answer: Option<TokenParser>,
    env: TokEnv,
}

impl std::fmt::Debug for AutoSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AutoSpec")
    }
}

impl ConstraintSpec for AutoSpec {
    fn start(&self) -> Box<dyn TokenConstraint> {
        Box::new(AutoRun {
            calls: Some(GrammarRun::new(&self.calls)),
            answer: self.answer.as_ref().map(GrammarRun::new),
            free_answer: self.answer.is_none(),
            env: self.env.clone(),
            generated: Vec::new(),
            mask: None,
        })
    }
}

struct AutoRun {
    /// `None` once the output has left the calls prefix.
    calls: Option<GrammarRun>,
    /// The answer's grammar; `None` for free text, or once the output is a tool call.
    answer: Option<GrammarRun>,
    free_answer: bool,
    env: TokEnv,
    /// Bytes generated while undecided.
    generated: Vec<u8>,
    mask: Option<Result<Vec<u32>, String>>,
}

impl AutoRun {
    fn undecided(&self) -> bool {
        self.calls.is_some() && (self.answer.is_some() || self.free_answer)
    }

    /// Whether `token` keeps the output on the calls prefix.
    fn on_prefix(&self, token: &[u8]) -> bool {
        let prefix = tools::CALLS_PREFIX.as_bytes();
        let seen = self.generated.len();
        let n = token.len().min(prefix.len().saturating_sub(seen));
        seen + n <= prefix.len() && token[..n] == prefix[seen..seen + n]
    }

    fn undecided_mask(&mut self) -> Result<Vec<u32>, String> {
        let calls = self.calls.as_mut().expect("undecided").mask().ok().cloned();
        let answer = self.answer.as_mut().map(|a| a.mask().ok().cloned());
        let trie = self.env.tok_trie();
        let mut bits = vec![0u32; trie.vocab_size().div_ceil(32)];
        for t in 0..trie.vocab_size() as u32 {
            let bytes = trie.token(t);
            let ok = if self.on_prefix(bytes) {
                calls.as_ref().is_some_and(|m| m.is_allowed(t))
            } else {
                match &answer {
                    None => !bytes.is_empty(),
                    Some(m) => m.as_ref().is_some_and(|m| m.is_allowed(t)),
                }
            };
            if ok {
                bits[t as usize / 32] |= 1 << (t % 32);
            }
        }
        if bits.iter().all(|&w| w == 0) {
            return Err("the output grammar admits no token here".into());
        }
        Ok(bits)
    }
}

impl TokenConstraint for AutoRun {
    fn prepare(&mut self) {
        let _ = self.allowed();
    }

    fn allowed(&mut self) -> Result<Option<&TokenBits>, String> {
        if self.undecided() {
            if self.mask.is_none() {
                self.mask = Some(self.undecided_mask());
            }
            return match self.mask.as_ref().expect("just set") {
                Ok(m) => Ok(Some(m.as_slice())),
                Err(e) => Err(e.clone()),
            };
        }
        match (self.calls.as_mut(), self.answer.as_mut()) {
            (Some(c), _) => c.allowed(),
            (None, Some(a)) => a.allowed(),
            (None, None) => Ok(None),
        }
    }

    fn commit(&mut self, token: u32) -> Result<(), String> {
        if !self.undecided() {
            return match (self.calls.as_mut(), self.answer.as_mut()) {
                (Some(c), _) => c.commit(token),
                (None, Some(a)) => a.commit(token),
                (None, None) => Ok(()),
            };
        }
        self.mask = None;
        let trie = self.env.tok_trie();
        let bytes = if (token as usize) < trie.vocab_size() { trie.token(token).to_vec() } else { Vec::new() };
        if self.on_prefix(&bytes) && !bytes.is_empty() {
            self.generated.extend_from_slice(&bytes);
            self.calls.as_mut().expect("undecided").commit(token)?;
            if self.generated.len() >= tools::CALLS_PREFIX.len() {
                // A tool call: the answer's grammar is out.
                self.answer = None;
                self.free_answer = false;
            } else if let Some(a) = self.answer.as_mut()
                && a.commit(token).is_err()
            {
                // The answer's grammar cannot continue this way: only the calls remain.
                self.answer = None;
                self.free_answer = false;
            }
            return Ok(());
        }
        // Off the prefix: an answer.
        self.calls = None;
        match self.answer.as_mut() {
            Some(a) => a.commit(token),
            None => Ok(()),
        }
    }

    fn is_complete(&self) -> bool {
        match (&self.calls, &self.answer) {
            (Some(c), _) if !self.undecided() => c.is_complete(),
            (None, Some(a)) => a.is_complete(),
            _ => false,
        }
    }
}

/// The [`Structured`] of a model, built on first use (most servers never need it) and kept.
#[derive(Default)]
pub struct LazyStructured(OnceLock<Result<Arc<Structured>, String>>);

impl LazyStructured {
    pub fn get(&self, tokenizer: &Tokenizer, vocab: usize) -> Result<Arc<Structured>, String> {
        self.0.get_or_init(|| Structured::new(tokenizer, vocab).map(Arc::new)).clone()
    }
}
