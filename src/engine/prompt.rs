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

/// Token rows of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptRows {
    pub cond: Vec<u32>,
    pub uncond: Option<Vec<u32>>,
}

/// The rows of a chat conversation; `guidance` = the conditions and the uncond source.
pub fn chat_rows(
    tok: &Tokenizer,
    messages: &[ChatMessage],
    guidance: Option<(&Conditions, &UncondSource)>,
) -> Result<PromptRows, TokenizerError> {
    let Some((conds, source)) = guidance else {
        return Ok(PromptRows { cond: tok.encode_chat(messages, true)?, uncond: None });
    };
    let cond = tok.encode_chat(&with_condition(messages, &conds.positive), true)?;
    let uncond = match source {
        UncondSource::NegativeCondition => tok.encode_chat(&with_condition(messages, &conds.negative), true)?,
        UncondSource::Custom(text) => tok.encode_chat(&with_condition(messages, text), true)?,
        UncondSource::LastToken => cond.last().copied().into_iter().collect(),
    };
    Ok(PromptRows { cond, uncond: Some(uncond) })
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
    fn condition_leads_the_system_message() {
        let m = with_condition(&[ChatMessage::system("Be brief."), ChatMessage::user("hi")], "C.");
        assert_eq!(m, vec![ChatMessage::system("C.\n\nBe brief."), ChatMessage::user("hi")]);
        let m = with_condition(&[ChatMessage::user("hi")], "C.");
        assert_eq!(m, vec![ChatMessage::system("C."), ChatMessage::user("hi")]);
    }
}
