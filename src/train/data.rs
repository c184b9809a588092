//! Training data: JSONL in TRL's formats, rendered and tokenized exactly as serving would see
//! the same conversation.
//!
//! - SFT: `{"messages": [...]}` (trains on the assistant turns), `{"prompt", "completion"}`, or
//!   `{"text"}` (every token);
//! - preferences: `{"prompt", "chosen", "rejected"}`, or `{"chosen", "rejected"}` conversations
//!   that share everything but their last (assistant) message (TRL's implicit prompt).
//!
//! Prompts and answers are strings (TRL's "standard" format: raw text, no chat template) or
//! message lists (`[{"role", "content"}]`, rendered with the model's chat template). A
//! conversation gets its condition through [`crate::engine::prompt`] — the very function that
//! builds serving's cond and uncond rows — so a forget-adapter is trained on the prompts it will
//! be served with. An answer is its content's tokens followed by the end-of-turn token the chat
//! template writes after an assistant message (EOS for raw text), so the adapter learns to stop.

use super::TrainError;
use super::objective::{Example, TokenSeq};
use crate::engine::prompt;
use crate::tokenizer::{ChatMessage, Tokenizer};
use serde_json::Value;
use std::path::Path;

/// A prompt: raw text, or a conversation for the chat template.
#[derive(Debug, Clone)]
enum Prompt {
    Text(String),
    Chat(Vec<ChatMessage>),
}

/// Which condition goes into a prompt (CFG-aware training uses both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition<'a> {
    None,
    Sentence(&'a str),
}

/// Reads data files and turns rows into tokenized examples.
pub struct DataReader<'a> {
    tok: &'a Tokenizer,
    max_length: usize,
    /// The token the chat template closes an assistant turn with.
    end_of_turn: Option<u32>,
    /// Completions cut to fit `max_length`, for the summary.
    pub truncated: usize,
}

/// Where a problem is: file, line (1-based) and field.
fn at(path: &Path, line: usize, field: &str, msg: impl std::fmt::Display) -> TrainError {
    let field = if field.is_empty() { String::new() } else { format!(" field \"{field}\":") };
    TrainError::Data(format!("{}:{line}:{field} {msg}", path.display()))
}

impl<'a> DataReader<'a> {
    pub fn new(tok: &'a Tokenizer, max_length: usize) -> Self {
        Self { tok, max_length, end_of_turn: end_of_turn(tok), truncated: 0 }
    }

    /// SFT examples from `path`.
    pub fn sft(&mut self, path: &Path) -> Result<Vec<Example>, TrainError> {
        let mut out = Vec::new();
        for (line, row) in rows(path)? {
            let err = |field: &str, msg: String| at(path, line, field, msg);
            let seq = if let Some(messages) = row.get("messages") {
                let msgs = messages_of(messages).map_err(|m| err("messages", m))?;
                self.conversation(&msgs).map_err(|m| err("messages", m))?
            } else if let Some(text) = row.get("text") {
                let text = text.as_str().ok_or_else(|| err("text", "must be a string".into()))?;
                let ids = self.tok.encode_prompt(text).map_err(|e| err("text", e.to_string()))?;
                if ids.len() < 2 {
                    return Err(err("text", "needs at least two tokens".into()));
                }
                TokenSeq { completion: vec![true; ids.len()], ids }
            } else if row.contains_key("prompt") || row.contains_key("completion") {
                let p = prompt_of(&row).map_err(|m| err("prompt", m))?;
                let c = row.get("completion").ok_or_else(|| err("completion", "missing".into()))?;
                let prompt = self.prompt(&p, Condition::None).map_err(|m| err("prompt", m))?;
                let answer = self.answer(c).map_err(|m| err("completion", m))?;
                self.fit(&prompt, &answer).map_err(|m| err("prompt", m))?
            } else {
                return Err(err("", "expected \"messages\", \"text\", or \"prompt\" and \"completion\"".into()));
            };
            if seq.ids.len() > self.max_length {
                return Err(err("", format!("{} tokens, more than --max-length {}", seq.ids.len(), self.max_length)));
            }
            out.push(Example::Sft(seq));
        }
        Ok(out)
    }

    /// Preference pairs from `path`, each under every condition of `conditions` (the
    /// CFG-aware regime passes the positive condition with the pair as written and the negative
    /// one with chosen and rejected swapped).
    pub fn pairs(&mut self, path: &Path, conditions: &[(Condition, bool)]) -> Result<Vec<Example>, TrainError> {
        let mut out = Vec::new();
        for (line, row) in rows(path)? {
            let err = |field: &str, msg: String| at(path, line, field, msg);
            let (p, chosen, rejected) = split_pair(&row).map_err(|(f, m)| err(f, m))?;
            let chosen = self.answer(&chosen).map_err(|m| err("chosen", m))?;
            let rejected = self.answer(&rejected).map_err(|m| err("rejected", m))?;
            for &(condition, swap) in conditions {
                let prompt = self.prompt(&p, condition).map_err(|m| err("prompt", m))?;
                let (w, l) = if swap { (&rejected, &chosen) } else { (&chosen, &rejected) };
                let chosen = self.fit(&prompt, w).map_err(|m| err("prompt", m))?;
                let rejected = self.fit(&prompt, l).map_err(|m| err("prompt", m))?;
                out.push(Example::Pair { chosen, rejected });
            }
        }
        Ok(out)
    }

    fn prompt(&self, p: &Prompt, condition: Condition) -> Result<Vec<u32>, String> {
        match (p, condition) {
            (Prompt::Text(t), Condition::None) => self.tok.encode_prompt(t),
            (Prompt::Text(t), Condition::Sentence(c)) => self.tok.encode_prompt(&prompt::text_with_condition(t, c)),
            (Prompt::Chat(m), Condition::None) => self.tok.encode_chat(m, true),
            (Prompt::Chat(m), Condition::Sentence(c)) => self.tok.encode_chat(&prompt::with_condition(m, c), true),
        }
        .map_err(|e| e.to_string())
    }

    /// An answer's tokens: the content, then the end-of-turn token (chat) or EOS (text).
    fn answer(&self, v: &Value) -> Result<Vec<u32>, String> {
        let (content, chat) = match v {
            Value::String(s) => (s.clone(), false),
            Value::Array(_) => match messages_of(v)?.as_slice() {
                [m] if m.role == "assistant" => (m.content.clone(), true),
                _ => return Err("must be one assistant message".into()),
            },
            _ => return Err("must be a string or a list of messages".into()),
        };
        if content.trim().is_empty() {
            return Err("empty completion (nothing to learn from)".into());
        }
        let mut ids = self.tok.encode_plain(&content).map_err(|e| e.to_string())?;
        let end = if chat { self.end_of_turn } else { None }.or_else(|| self.tok.eos_ids().first().copied());
        ids.extend(end);
        Ok(ids)
    }

    /// Prompt + answer, the answer cut to fit `max_length`; a prompt that leaves no room is an
    /// error.
    fn fit(&mut self, prompt: &[u32], answer: &[u32]) -> Result<TokenSeq, String> {
        if prompt.len() >= self.max_length {
            return Err(format!(
                "the prompt is {} tokens, which leaves no room for the answer within --max-length {}",
                prompt.len(),
                self.max_length
            ));
        }
        let room = self.max_length - prompt.len();
        if answer.len() > room {
            self.truncated += 1;
        }
        Ok(TokenSeq::prompt_completion(prompt, &answer[..answer.len().min(room)]))
    }

    /// A whole conversation: the assistant messages (and the end-of-turn token after each) are
    /// the completion.
    fn conversation(&self, msgs: &[ChatMessage]) -> Result<TokenSeq, String> {
        if !msgs.iter().any(|m| m.role == "assistant" && !m.content.trim().is_empty()) {
            return Err("no assistant message with content (nothing to learn from)".into());
        }
        let (ids, owners) = self.tok.encode_chat_attributed(msgs, false).map_err(|e| e.to_string())?;
        let is_assistant = |o: Option<usize>| o.is_some_and(|i| msgs[i].role == "assistant");
        let mut completion: Vec<bool> = owners.iter().map(|&o| is_assistant(o)).collect();
        for p in 1..ids.len() {
            if is_assistant(owners[p - 1]) && owners[p].is_none() && self.tok.is_eos(ids[p]) {
                completion[p] = true;
            }
        }
        Ok(TokenSeq { ids, completion })
    }
}

/// The end-of-turn token of the chat template: the first EOS token it writes after an
/// assistant message's content (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3).
fn end_of_turn(tok: &Tokenizer) -> Option<u32> {
    let msgs = [ChatMessage::user("a"), ChatMessage::assistant("b")];
    let (ids, owners) = tok.encode_chat_attributed(&msgs, false).ok()?;
    let after = owners.iter().position(|&o| o == Some(1))?;
    ids.iter().zip(&owners).skip(after).find(|(id, o)| o.is_none() && tok.is_eos(**id)).map(|(id, _)| *id)
}

/// A JSONL row: its line number and object.
type Row = (usize, serde_json::Map<String, Value>);

/// The non-empty lines of a JSONL file, parsed, with their line numbers.
fn rows(path: &Path) -> Result<Vec<Row>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::Data(format!("{}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(o)) => out.push((i + 1, o)),
            Ok(_) => return Err(at(path, i + 1, "", "expected a JSON object")),
            Err(e) => return Err(at(path, i + 1, "", format!("not valid JSON: {e}"))),
        }
    }
    if out.is_empty() {
        return Err(TrainError::Data(format!("{}: no examples", path.display())));
    }
    Ok(out)
}

fn messages_of(v: &Value) -> Result<Vec<ChatMessage>, String> {
    let list = v.as_array().ok_or("must be a list of {\"role\", \"content\"} messages")?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(Value::as_str).ok_or(format!("message {i} has no \"role\" string"))?;
            let content =
                m.get("content").and_then(Value::as_str).ok_or(format!("message {i} has no \"content\" string"))?;
            if !matches!(role, "system" | "user" | "assistant") {
                return Err(format!("message {i}: unknown role {role:?} (system, user, assistant)"));
            }
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

fn prompt_of(row: &serde_json::Map<String, Value>) -> Result<Prompt, String> {
    match row.get("prompt") {
        None => Err("missing".into()),
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(v @ Value::Array(_)) => {
            let msgs = messages_of(v)?;
            if msgs.last().is_some_and(|m| m.role == "assistant") {
                return Err("a chat prompt must not end with an assistant message".into());
            }
            Ok(Prompt::Chat(msgs))
        }
        Some(_) => Err("must be a string or a list of messages".into()),
    }
}

/// A preference row as (prompt, chosen, rejected); an error names the field.
fn split_pair(row: &serde_json::Map<String, Value>) -> Result<(Prompt, Value, Value), (&'static str, String)> {
    let chosen = row.get("chosen").ok_or(("chosen", "missing".to_string()))?;
    let rejected = row.get("rejected").ok_or(("rejected", "missing".to_string()))?;
    if row.contains_key("prompt") {
        return Ok((prompt_of(row).map_err(|m| ("prompt", m))?, chosen.clone(), rejected.clone()));
    }
    // Implicit prompt: two conversations that differ in their last message only.
    let (cw, cl) =
        (messages_of(chosen).map_err(|m| ("chosen", m))?, messages_of(rejected).map_err(|m| ("rejected", m))?);
    match (cw.split_last(), cl.split_last()) {
        (Some((w, pw)), Some((l, pl))) if pw == pl && !pw.is_empty() => {
            let one = |m: &ChatMessage| Value::Array(vec![serde_json::json!({"role": m.role, "content": m.content})]);
            Ok((Prompt::Chat(pw.to_vec()), one(w), one(l)))
        }
        _ => Err((
            "prompt",
            "missing (and \"chosen\"/\"rejected\" are not conversations sharing all but their last message)".into(),
        )),
    }
}
