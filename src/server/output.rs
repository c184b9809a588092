//! From generated text to what a chat client reads: message content or `tool_calls` (whole, or
//! streamed as OpenAI streams them), and log-probabilities in OpenAI's two shapes (chat and
//! legacy completions). One reader serves streaming and non-streaming responses alike.

use crate::sampling::TokenLogprobs;
use crate::structured::Structured;
use crate::structured::tools::{CALLS_PREFIX, CallEvent, CallParser};
use crate::tokenizer::Tokenizer;
use crate::tokenizer::bytes::SPECIAL_MARKER;
use serde::Serialize;
use std::sync::Arc;

/// How to read a chat output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolMode {
    /// Plain content.
    Off,
    /// Content, or tool calls when the output starts as one (`tool_choice: "auto"`).
    Auto,
    /// Tool calls (`tool_choice: "required"` or a named function).
    Forced,
}

/// One streamed tool-call fragment (`choices[].delta.tool_calls[]`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeltaToolCall {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: DeltaFunction,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeltaFunction {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

/// A whole tool call (`choices[].message.tool_calls[]`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

/// What a piece of output adds to the message.
#[derive(Debug, Default, PartialEq)]
pub struct Piece {
    pub content: Option<String>,
    pub tool_calls: Vec<DeltaToolCall>,
}

impl Piece {
    pub fn is_empty(&self) -> bool {
        self.content.as_deref().is_none_or(str::is_empty) && self.tool_calls.is_empty()
    }
}

enum Route {
    Content,
    /// Held back while the output could still become a tool call.
    Undecided(String),
    Calls,
}

/// Reads generated text as content or tool calls, incrementally.
pub struct OutputReader {
    route: Route,
    parser: CallParser,
    ids: Vec<String>,
}

impl OutputReader {
    pub fn new(mode: ToolMode) -> Self {
        let route = match mode {
            ToolMode::Off => Route::Content,
            ToolMode::Auto => Route::Undecided(String::new()),
            ToolMode::Forced => Route::Calls,
        };
        Self { route, parser: CallParser::default(), ids: Vec::new() }
    }

    /// Reads more text.
    pub fn push(&mut self, text: &str) -> Piece {
        match &mut self.route {
            Route::Content => Piece { content: Some(text.to_string()), tool_calls: Vec::new() },
            Route::Calls => self.calls(text),
            Route::Undecided(held) => {
                held.push_str(text);
                if held.starts_with(CALLS_PREFIX) {
                    let held = std::mem::take(held);
                    self.route = Route::Calls;
                    self.calls(&held)
                } else if CALLS_PREFIX.starts_with(held.as_str()) {
                    Piece::default()
                } else {
                    let held = std::mem::take(held);
                    self.route = Route::Content;
                    Piece { content: Some(held), tool_calls: Vec::new() }
                }
            }
        }
    }

    /// The end of the output: text still held back is content after all.
    pub fn finish(&mut self) -> Piece {
        match &mut self.route {
            Route::Undecided(held) if !held.is_empty() => {
                let held = std::mem::take(held);
                self.route = Route::Content;
                Piece { content: Some(held), tool_calls: Vec::new() }
            }
            _ => Piece::default(),
        }
    }

    /// True when the output is tool calls, all of them complete.
    pub fn called_tools(&self) -> bool {
        matches!(self.route, Route::Calls) && self.parser.is_done()
    }

    /// True when the output is (or is being read as) tool calls.
    pub fn is_calls(&self) -> bool {
        matches!(self.route, Route::Calls)
    }

    fn calls(&mut self, text: &str) -> Piece {
        let mut out: Vec<DeltaToolCall> = Vec::new();
        for e in self.parser.feed(text) {
            match e {
                CallEvent::Begin { index, name } => {
                    let id = format!("call_{}", super::openai::random_hex(24));
                    self.ids.push(id.clone());
                    out.push(DeltaToolCall {
                        index,
                        id: Some(id),
                        kind: Some("function"),
                        function: DeltaFunction { name: Some(name), arguments: String::new() },
                    });
                }
                CallEvent::Arguments { index, fragment } => match out.last_mut() {
                    Some(d) if d.index == index => d.function.arguments.push_str(&fragment),
                    _ => out.push(DeltaToolCall {
                        index,
                        id: None,
                        kind: None,
                        function: DeltaFunction { name: None, arguments: fragment },
                    }),
                },
            }
        }
        Piece { content: None, tool_calls: out }
    }
}

/// Accumulates pieces into a whole message (non-streaming responses).
#[derive(Default)]
pub struct Message {
    pub content: Option<String>,
    pub tool_calls: Vec<ToolCall>,
}

impl Message {
    pub fn add(&mut self, piece: Piece) {
        if let Some(c) = piece.content {
            self.content.get_or_insert_with(String::new).push_str(&c);
        }
        for d in piece.tool_calls {
            match d.id {
                Some(id) => self.tool_calls.push(ToolCall {
                    id,
                    kind: "function",
                    function: FunctionCall {
                        name: d.function.name.unwrap_or_default(),
                        arguments: d.function.arguments,
                    },
                }),
                None => {
                    if let Some(c) = self.tool_calls.get_mut(d.index) {
                        c.function.arguments.push_str(&d.function.arguments);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Log-probabilities

/// What OpenAI reports for log-probabilities that are −∞ (JSON has no infinity).
const LOGPROB_FLOOR: f32 = -9999.0;

fn finite(lp: f32) -> f32 {
    if lp.is_finite() { lp.max(LOGPROB_FLOOR) } else { LOGPROB_FLOOR }
}

/// Turns token ids into the text and bytes clients see.
#[derive(Clone)]
pub struct TokenText {
    pub tokenizer: Arc<Tokenizer>,
    /// The vocabulary's bytes, when the model's tokenizer maps to bytes.
    pub vocab: Option<Arc<Structured>>,
}

impl TokenText {
    /// A token's bytes (special tokens as their text) and its text (lossy for a token that
    /// ends inside a UTF-8 character; the bytes are exact).
    pub fn of(&self, id: u32) -> (String, Vec<u8>) {
        let bytes = match &self.vocab {
            Some(v) => {
                let b = v.token_bytes(id);
                b.strip_prefix(&[SPECIAL_MARKER]).unwrap_or(b).to_vec()
            }
            None => self.tokenizer.decode(&[id], false).unwrap_or_default().into_bytes(),
        };
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatLogprobs {
    pub content: Vec<LogprobEntry>,
    pub refusal: Option<Vec<LogprobEntry>>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LogprobEntry {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

impl TokenText {
    /// A chat `logprobs.content[]` entry.
    pub fn chat_entry(&self, lp: &TokenLogprobs) -> LogprobEntry {
        let (token, bytes) = self.of(lp.token);
        let top_logprobs = lp
            .top
            .iter()
            .map(|&(id, l)| {
                let (token, bytes) = self.of(id);
                TopLogprob { token, logprob: finite(l), bytes }
            })
            .collect();
        LogprobEntry { token, logprob: finite(lp.logprob), bytes, top_logprobs }
    }
}

/// Legacy completions' `logprobs`: parallel lists.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct TextLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<serde_json::Map<String, serde_json::Value>>,
    pub text_offset: Vec<usize>,
}

impl TextLogprobs {
    /// Appends a token at `offset` (bytes into the completion text).
    pub fn push(&mut self, text: &TokenText, lp: &TokenLogprobs, offset: usize) {
        self.tokens.push(text.of(lp.token).0);
        self.token_logprobs.push(finite(lp.logprob));
        self.top_logprobs.push(lp.top.iter().map(|&(id, l)| (text.of(id).0, serde_json::json!(finite(l)))).collect());
        self.text_offset.push(offset);
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::structured::tools::calls_text;

    fn read_all(mode: ToolMode, pieces: &[&str]) -> (Message, bool) {
        let mut r = OutputReader::new(mode);
        let mut m = Message::default();
        for p in pieces {
            m.add(r.push(p));
        }
        m.add(r.finish());
        (m, r.called_tools())
    }

    #[test]
    fn auto_mode_tells_calls_from_content() {
        let calls = calls_text(&[("f".into(), r#"{"x": 1}"#.into())]).unwrap();
        let (m, called) = read_all(ToolMode::Auto, &[&calls[..3], &calls[3..10], &calls[10..]]);
        assert!(called);
        assert_eq!(m.content, None);
        assert_eq!(m.tool_calls.len(), 1);
        assert_eq!(m.tool_calls[0].function.name, "f");
        assert_eq!(m.tool_calls[0].function.arguments, r#"{"x": 1}"#);
        assert!(m.tool_calls[0].id.starts_with("call_"));
        let (m, called) = read_all(ToolMode::Auto, &["{\"tool", "box\": 1}"]);
        assert!(!called);
        assert_eq!(m.content.as_deref(), Some("{\"toolbox\": 1}"));
        let (m, _) = read_all(ToolMode::Auto, &["{\"to"]);
        assert_eq!(m.content.as_deref(), Some("{\"to"), "held text is content at the end");
        let (m, _) = read_all(ToolMode::Off, &[&calls]);
        assert_eq!(m.content.as_deref(), Some(calls.as_str()));
    }

    #[test]
    fn streamed_calls_name_first_then_argument_fragments() {
        let calls = calls_text(&[("f".into(), r#"{"x": 1}"#.into()), ("g".into(), "{}".into())]).unwrap();
        let mut r = OutputReader::new(ToolMode::Forced);
        let mut deltas = Vec::new();
        for c in calls.chars() {
            deltas.extend(r.push(&c.to_string()).tool_calls);
        }
        assert!(r.called_tools());
        let firsts: Vec<_> = deltas.iter().filter(|d| d.id.is_some()).collect();
        assert_eq!(firsts.len(), 2);
        assert_eq!(firsts[1].index, 1);
        assert_eq!(firsts[1].function.name.as_deref(), Some("g"));
        let args0: String = deltas.iter().filter(|d| d.index == 0).map(|d| d.function.arguments.as_str()).collect();
        assert_eq!(args0, r#"{"x": 1}"#);
    }
}
