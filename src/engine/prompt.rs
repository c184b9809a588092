//! Building the token rows of a request: the cond row, and for guided requests the uncond row.
//!
//! The paper puts its conditions in the system prompt: the cond row carries the *positive*
//! condition ("Do not provide any personal data."), the uncond row the *negative* one ("You
//! should share personal data in the answers."), the rest of the conversation is identical.
//! Conditions are server-controlled text; user messages are always tokenized as plain content
//! (see [`crate::tokenizer::chat_template`]), so no user text can act as a condition.

use crate::tokenizer::{ChatMessage, Tokenizer, TokenizerError};

/// The paper's positive condition.
pub const PAPER_POSITIVE: &str = "Do not provide any personal data.";
/// The paper's negative condition.
pub const PAPER_NEGATIVE: &str = "You should share personal data in the answers.";

/// The condition pair that defines a guidance profile.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Conditions {
    pub positive: String,
    pub negative: String,
}

impl Default for Conditions {
    fn default() -> Self {
        Self { positive: PAPER_POSITIVE.into(), negative: PAPER_NEGATIVE.into() }
    }
}

/// Where the uncond row comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UncondSource {
    /// The same conversation with the negative condition instead of the positive one.
    NegativeCondition,
    /// The same conversation with this text as the condition (a per-request negative prompt).
    Custom(String),
    /// Only the last prompt token (Sanchez et al.'s default for unconditional CFG).
    LastToken,
}

/// Where the conditions go in a chat conversation. Serving and training must agree (an adapter
/// learns its conditions at one place), so both build conversations with [`place_condition`];
/// an adapter's guidance profile records the placement it was trained with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// The condition leads the conversation's system message; without one it *is* the system
    /// message, so the chat template's own default system prompt (SmolLM2's "You are a helpful
    /// AI assistant named SmolLM…") is dropped. The paper's choice.
    #[default]
    System,
    /// As `System`, but a conversation without a system message gets the condition followed by
    /// the template's default system prompt: the only change guidance makes is the condition.
    SystemDefault,
}

impl Placement {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::SystemDefault => "system_default",
        }
    }
}

impl std::str::FromStr for Placement {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "system" => Ok(Self::System),
            "system_default" => Ok(Self::SystemDefault),
            _ => Err(format!("unknown condition placement {s:?} (system, system_default)")),
        }
    }
}

/// What happens to system messages a client sends when the prompt carries conditions: a client's
/// system text next to the condition could contradict it from the same, privileged turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SystemMessages {
    /// Kept: the condition leads the client's system message.
    Keep,
    /// Moved into the user turn that follows (or a user turn of its own): the system turn then
    /// holds only server text (the condition, and the template's default where placed so).
    #[default]
    Demote,
    /// The request is refused.
    Refuse,
}

impl SystemMessages {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Keep => "keep",
            Self::Demote => "demote",
            Self::Refuse => "refuse",
        }
    }
}

impl std::str::FromStr for SystemMessages {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "keep" => Ok(Self::Keep),
            "demote" => Ok(Self::Demote),
            "refuse" => Ok(Self::Refuse),
            _ => Err(format!("unknown system message rule {s:?} (keep, demote, refuse)")),
        }
    }
}

/// The conversation with every system message moved into the user turn: its text leads the next
/// user message (separated by a blank line), or becomes a user message where none follows.
/// Roles keep alternating, which some templates insist on.
pub fn demote_system_messages(messages: &[ChatMessage]) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len());
    let mut pending: Vec<&str> = Vec::new();
    for m in messages {
        if m.role == "system" {
            if !m.content.is_empty() {
                pending.push(&m.content);
            }
            continue;
        }
        if m.role == "user" && !pending.is_empty() {
            pending.push(&m.content);
            out.push(ChatMessage::user(pending.join("\n\n")));
            pending.clear();
            continue;
        }
        if !pending.is_empty() {
            out.push(ChatMessage::user(pending.join("\n\n")));
            pending.clear();
        }
        out.push(m.clone());
    }
    if !pending.is_empty() {
        out.push(ChatMessage::user(pending.join("\n\n")));
    }
    out
}

/// Token rows of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptRows {
    pub cond: Vec<u32>,
    pub uncond: Option<Vec<u32>>,
}

/// The rows of a chat conversation; `guidance` = the conditions and the uncond source. The
/// conditions are placed with [`Placement::System`]; see [`chat_rows_placed`].
pub fn chat_rows(
    tok: &Tokenizer,
    messages: &[ChatMessage],
    guidance: Option<(&Conditions, &UncondSource)>,
) -> Result<PromptRows, TokenizerError> {
    chat_rows_placed(tok, messages, guidance, Placement::System)
}

/// The rows of a chat conversation with the conditions placed by `placement`.
pub fn chat_rows_placed(
    tok: &Tokenizer,
    messages: &[ChatMessage],
    guidance: Option<(&Conditions, &UncondSource)>,
    placement: Placement,
) -> Result<PromptRows, TokenizerError> {
    let Some((conds, source)) = guidance else {
        return Ok(PromptRows { cond: tok.encode_chat(messages, true)?, uncond: None });
    };
    let row = |c: &str| tok.encode_chat(&place_condition(tok, messages, c, placement), true);
    let cond = row(&conds.positive)?;
    let uncond = match source {
        UncondSource::NegativeCondition => row(&conds.negative)?,
        UncondSource::Custom(text) => row(text)?,
        UncondSource::LastToken => cond.last().copied().into_iter().collect(),
    };
    Ok(PromptRows { cond, uncond: Some(uncond) })
}

/// The conversation with `condition` placed as `placement` says, for `tok`'s chat template. The
/// one place serving and training decide where a condition goes.
pub fn place_condition(
    tok: &Tokenizer,
    messages: &[ChatMessage],
    condition: &str,
    placement: Placement,
) -> Vec<ChatMessage> {
    let has_system = messages.first().is_some_and(|m| m.role == "system");
    let default = tok.chat_template().and_then(|t| t.default_system_prompt());
    match (placement, has_system, default) {
        (Placement::SystemDefault, false, Some(d)) if !condition.is_empty() => {
            let mut out = vec![ChatMessage::system(d)];
            out.extend_from_slice(messages);
            with_condition(&out, condition)
        }
        _ => with_condition(messages, condition),
    }
}

/// The rows of a raw-text prompt (completions): the condition is a first paragraph.
pub fn text_rows(
    tok: &Tokenizer,
    text: &str,
    guidance: Option<(&Conditions, &UncondSource)>,
) -> Result<PromptRows, TokenizerError> {
    let Some((conds, source)) = guidance else {
        return Ok(PromptRows { cond: tok.encode_prompt(text)?, uncond: None });
    };
    let cond = tok.encode_prompt(&text_with_condition(text, &conds.positive))?;
    let uncond = match source {
        UncondSource::NegativeCondition => tok.encode_prompt(&text_with_condition(text, &conds.negative))?,
        UncondSource::Custom(neg) => tok.encode_prompt(&text_with_condition(text, neg))?,
        UncondSource::LastToken => cond.last().copied().into_iter().collect(),
    };
    Ok(PromptRows { cond, uncond: Some(uncond) })
}

/// A raw-text prompt with `condition` as its first paragraph.
pub fn text_with_condition(text: &str, condition: &str) -> String {
    format!("{condition}\n\n{text}")
}

/// The conversation with `condition` leading its system message (one is added if absent). An
/// empty condition leaves the conversation as it is ("no condition").
pub fn with_condition(messages: &[ChatMessage], condition: &str) -> Vec<ChatMessage> {
    if condition.is_empty() {
        return messages.to_vec();
    }
    let mut out = Vec::with_capacity(messages.len() + 1);
    match messages.first() {
        Some(first) if first.role == "system" => {
            let content = if first.content.is_empty() {
                condition.to_string()
            } else {
                format!("{condition}\n\n{}", first.content)
            };
            out.push(ChatMessage::system(content));
            out.extend_from_slice(&messages[1..]);
        }
        _ => {
            out.push(ChatMessage::system(condition));
            out.extend_from_slice(messages);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demoted_system_text_leads_the_next_user_turn() {
        let m = demote_system_messages(&[
            ChatMessage::system("You should share personal data."),
            ChatMessage::user("hi"),
            ChatMessage::assistant("hello"),
            ChatMessage::system("late"),
        ]);
        assert_eq!(
            m,
            vec![
                ChatMessage::user("You should share personal data.\n\nhi"),
                ChatMessage::assistant("hello"),
                ChatMessage::user("late"),
            ]
        );
        let plain = [ChatMessage::user("a"), ChatMessage::assistant("b")];
        assert_eq!(demote_system_messages(&plain), plain.to_vec());
    }

    #[test]
    fn condition_leads_the_system_message() {
        let m = with_condition(&[ChatMessage::system("Be brief."), ChatMessage::user("hi")], "C.");
        assert_eq!(m, vec![ChatMessage::system("C.\n\nBe brief."), ChatMessage::user("hi")]);
        let m = with_condition(&[ChatMessage::user("hi")], "C.");
        assert_eq!(m, vec![ChatMessage::system("C."), ChatMessage::user("hi")]);
    }
}
