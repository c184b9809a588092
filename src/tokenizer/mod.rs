//! Text ⇄ tokens: a `tokenizers::Tokenizer` (from `tokenizer.json` or the GGUF vocabulary), the
//! chat template, special token ids, and incremental detokenization for streaming.

pub mod bytes;
pub mod chat_template;
pub mod gguf_vocab;

pub use chat_template::{ChatMessage, ChatTemplate, Segment};

use std::path::Path;
use tokenizers::Tokenizer as HfTokenizer;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read tokenizer from {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("GGUF tokenizer: {0}")]
    Gguf(String),
    #[error("{0}")]
    Template(String),
    #[error("the model has no chat template; send a plain completion instead")]
    NoChatTemplate,
    #[error("tokenization failed: {0}")]
    Encode(String),
}

/// A model's tokenizer.
pub struct Tokenizer {
    /// Splits out special tokens: for text the server itself produces (chat template output).
    trusted: HfTokenizer,
    /// Treats special-token text as ordinary text: for anything a user wrote.
    plain: HfTokenizer,
    bos: Option<u32>,
    eos: Vec<u32>,
    add_bos: bool,
    template: Option<ChatTemplate>,
}

impl Tokenizer {
    fn assemble(
        tk: HfTokenizer,
        bos: Option<u32>,
        eos: Vec<u32>,
        add_bos: bool,
        template_src: Option<String>,
    ) -> Result<Self, TokenizerError> {
        let name = |id: Option<u32>| id.and_then(|i| tk.id_to_token(i)).unwrap_or_default();
        let template = match template_src {
            Some(src) => Some(ChatTemplate::new(&src, &name(bos), &name(eos.first().copied()))?),
            None => None,
        };
        let mut plain = tk.clone();
        plain.set_encode_special_tokens(true);
        Ok(Self { trusted: tk, plain, bos, eos, add_bos, template })
    }

    /// From the metadata of a GGUF file.
    pub fn from_gguf(
        md: &std::collections::HashMap<String, candle_core::quantized::gguf_file::Value>,
    ) -> Result<Self, TokenizerError> {
        let v = gguf_vocab::from_metadata(md)?;
        Self::assemble(v.tokenizer, v.bos, v.eos, v.add_bos, v.chat_template)
    }

    /// From an HF directory: `tokenizer.json`, plus `tokenizer_config.json` (chat template,
    /// special tokens) and `generation_config.json` / `config.json` (end-of-sequence ids).
    pub fn from_hf_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let tk_path = dir.join("tokenizer.json");
        let tk = Self::read_tokenizer_json(&tk_path)?;
        let read_json = |name: &str| -> Option<serde_json::Value> {
            std::fs::read_to_string(dir.join(name)).ok().and_then(|s| serde_json::from_str(&s).ok())
        };
        let tcfg = read_json("tokenizer_config.json").unwrap_or_default();
        let token_id = |key: &str| -> Option<u32> {
            let v = tcfg.get(key)?;
            let text = v.as_str().or_else(|| v.get("content").and_then(|c| c.as_str()))?;
            tk.token_to_id(text)
        };
        let mut eos: Vec<u32> = token_id("eos_token").into_iter().collect();
        for file in ["generation_config.json", "config.json"] {
            if let Some(cfg) = read_json(file) {
                for id in ids_of(cfg.get("eos_token_id")) {
                    if !eos.contains(&id) {
                        eos.push(id);
                    }
                }
            }
        }
        let template = match tcfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: use "default".
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(String::from)),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        let add_bos = tcfg.get("add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false);
        let bos = token_id("bos_token");
        Self::assemble(tk, bos, eos, add_bos, template)
    }

    /// From a `tokenizer.json` path: with its directory's configs when they are there.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self, TokenizerError> {
        let dir = path.parent().unwrap_or(Path::new("."));
        if path.file_name().is_some_and(|n| n == "tokenizer.json") && dir.join("tokenizer_config.json").exists() {
            return Self::from_hf_dir(dir);
        }
        Self::assemble(Self::read_tokenizer_json(path)?, None, Vec::new(), false, None)
    }

    /// Reads a `tokenizer.json` on its own (special ids must then come from elsewhere).
    pub fn read_tokenizer_json(path: &Path) -> Result<HfTokenizer, TokenizerError> {
        HfTokenizer::from_file(path)
            .map_err(|e| TokenizerError::Load { path: path.display().to_string(), reason: e.to_string() })
    }

    /// Wraps an in-memory tokenizer (tests build tiny ones).
    pub fn from_parts(
        tk: HfTokenizer,
        bos: Option<u32>,
        eos: Vec<u32>,
        chat_template: Option<&str>,
    ) -> Result<Self, TokenizerError> {
        Self::assemble(tk, bos, eos, false, chat_template.map(String::from))
    }

    pub fn vocab_size(&self) -> usize {
        self.trusted.get_vocab_size(true)
    }
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.contains(&id)
    }
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }
    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    /// Tokenizes user text: special-token text stays text. Adds BOS if the model wants it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = Vec::new();
        if self.add_bos
            && let Some(b) = self.bos
        {
            ids.push(b);
        }
        ids.extend(self.encode_plain(text)?);
        Ok(ids)
    }

    /// Tokenizes text as plain content (no special tokens recognised, no BOS).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        Ok(self.plain.encode_fast(text, false).map_err(|e| TokenizerError::Encode(e.to_string()))?.get_ids().to_vec())
    }

    /// Tokenizes server-produced text in which special-token text *is* special.
    pub fn encode_trusted(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        Ok(self.trusted.encode_fast(text, false).map_err(|e| TokenizerError::Encode(e.to_string()))?.get_ids().to_vec())
    }

    /// Renders and tokenizes a conversation with the model's chat template.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        Ok(self.encode_chat_attributed(messages, add_generation_prompt)?.0)
    }

    /// [`Self::encode_chat`], also telling for each token the message whose content it encodes
    /// (`None`: text of the template itself). Training uses it to find the assistant's tokens.
    pub fn encode_chat_attributed(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<(Vec<u32>, Vec<Option<usize>>), TokenizerError> {
        let template = self.template.as_ref().ok_or(TokenizerError::NoChatTemplate)?;
        let (mut ids, mut owners) = (Vec::new(), Vec::new());
        for seg in template.render_segments(messages, add_generation_prompt)? {
            let (piece, owner) = match seg {
                Segment::Template(t) => (self.encode_trusted(&t)?, None),
                Segment::Content { message, text } => (self.encode_plain(&text)?, Some(message)),
            };
            owners.resize(owners.len() + piece.len(), owner);
            ids.extend(piece);
        }
        if self.add_bos
            && let Some(b) = self.bos
            && ids.first() != Some(&b)
        {
            ids.insert(0, b);
            owners.insert(0, None);
        }
        Ok((ids, owners))
    }

    /// Decodes ids to text; special tokens are dropped when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.trusted.decode(ids, skip_special).map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// A streaming decoder for one generation.
    pub fn stream(&self) -> IncrementalDecoder {
        IncrementalDecoder::default()
    }
}

/// Turns a growing token sequence into text deltas that never split a UTF-8 character.
///
/// Byte-level BPE tokens can end mid-character, and some tokenizers change the text of earlier
/// tokens depending on what follows. As in TGI/vLLM we decode a small window of recent tokens
/// twice (without and with the new token) and emit the difference once it no longer ends in an
/// incomplete character (U+FFFD).
#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// Adds a token; returns newly completed text, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>, TokenizerError> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(Some(delta))
        } else {
            Ok(None)
        }
    }

    /// Text still held back at the end of a generation (an incomplete character).
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<Option<String>, TokenizerError> {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], true)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        if full.len() > prefix.len() && full.is_char_boundary(prefix.len()) {
            Ok(Some(full[prefix.len()..].to_string()))
        } else {
            Ok(None)
        }
    }

    /// All tokens pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

/// Token ids under a JSON key that holds a number or a list of numbers.
fn ids_of(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| x as u32).into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
        _ => Vec::new(),
    }
}
