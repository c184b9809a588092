//! The bytes each token stands for: what grammar-constrained decoding matches against, and what
//! `logprobs` report as a token's `bytes`.
//!
//! Tokenizers store tokens in one of two encodings: byte-level BPE (GPT-2's map of every byte to
//! a printable character; SmolLM2, Llama 3, Qwen2) or SentencePiece-style with byte fallback
//! (`▁` for a space, `<0xNN>` for raw bytes; Llama 2, Mistral). Special tokens (`<|im_end|>`)
//! are not text at all: they get toktrie's marker byte 0xFF in front, so no grammar over text
//! can produce them by accident.

use super::{Tokenizer, TokenizerError};
use std::collections::HashMap;

/// The first byte of a special token's entry (toktrie's `SPECIAL_TOKEN_MARKER`): never part of
/// UTF-8 text.
pub const SPECIAL_MARKER: u8 = 0xFF;

enum Encoding {
    ByteLevel(HashMap<char, u8>),
    /// SentencePiece: `space` stands for ' ', `<0xNN>` for a raw byte.
    ByteFallback {
        space: char,
    },
}

impl Tokenizer {
    /// The bytes of every token id in `0..n` (`n` = the model's vocabulary, which may be larger
    /// than the tokenizer's: ids without a token get no bytes). Special tokens start with
    /// [`SPECIAL_MARKER`].
    pub fn token_bytes(&self, n: usize) -> Result<Vec<Vec<u8>>, TokenizerError> {
        let encoding = self.encoding()?;
        let mut out = vec![Vec::new(); n];
        let specials: HashMap<u32, String> = self
            .trusted
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (id, t.content))
            .collect();
        for (piece, id) in self.trusted.get_vocab(true) {
            let Some(slot) = out.get_mut(id as usize) else { continue };
            *slot = match specials.get(&id) {
                Some(content) => std::iter::once(SPECIAL_MARKER).chain(content.bytes()).collect(),
                None => piece_bytes(&encoding, &piece)?,
            };
        }
        Ok(out)
    }

    fn encoding(&self) -> Result<Encoding, TokenizerError> {
        let decoder = serde_json::to_value(self.trusted.get_decoder())
            .map_err(|e| TokenizerError::Encode(format!("cannot inspect the tokenizer's decoder: {e}")))?;
        let kind = decoder["type"].as_str().unwrap_or("none");
        if kind == "ByteLevel" {
            return Ok(Encoding::ByteLevel(byte_level_map()));
        }
        let parts = decoder["decoders"].as_array().cloned().unwrap_or_default();
        let has = |t: &str| parts.iter().any(|d| d["type"] == t);
        if kind == "Sequence" && has("ByteLevel") {
            return Ok(Encoding::ByteLevel(byte_level_map()));
        }
        if kind == "Sequence" && has("ByteFallback") {
            let space = parts
                .iter()
                .find(|d| d["type"] == "Replace" && d["content"] == " ")
                .and_then(|d| d["pattern"]["String"].as_str())
                .and_then(|s| s.chars().next())
                .unwrap_or('▁');
            return Ok(Encoding::ByteFallback { space });
        }
        if kind == "Metaspace" {
            return Ok(Encoding::ByteFallback { space: '▁' });
        }
        Err(TokenizerError::Encode(format!("tokens of a tokenizer with a {kind:?} decoder cannot be mapped to bytes")))
    }
}

fn piece_bytes(encoding: &Encoding, piece: &str) -> Result<Vec<u8>, TokenizerError> {
    match encoding {
        Encoding::ByteLevel(map) => piece
            .chars()
            .map(|c| {
                map.get(&c)
                    .copied()
                    .ok_or_else(|| TokenizerError::Encode(format!("token {piece:?} is not byte-level encoded")))
            })
            .collect(),
        Encoding::ByteFallback { space } => {
            if let Some(hex) = piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>'))
                && hex.len() == 2
                && let Ok(b) = u8::from_str_radix(hex, 16)
            {
                return Ok(vec![b]);
            }
            Ok(piece.replace(*space, " ").into_bytes())
        }
    }
}

/// GPT-2's byte ⇄ printable character map: printable Latin-1 bytes map to themselves, the other
/// bytes to U+0100 onwards, in byte order.
fn byte_level_map() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 0x100u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                (b as char, b)
            } else {
                let c = char::from_u32(next).expect("below the surrogates");
                next += 1;
                (c, b)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use crate::fixtures::{TempDir, TinySpec, write_tiny_model};

    /// Every ordinary token's bytes are what the tokenizer decodes it to; specials are marked.
    #[test]
    fn token_bytes_match_decoding() {
        let dir = TempDir::new("token-bytes").unwrap();
        let path = write_tiny_model(&dir.path().join("m"), &TinySpec::default()).unwrap();
        let tok = crate::tokenizer::Tokenizer::from_hf_dir(&path).unwrap();
        let n = tok.vocab_size() + 5;
        let bytes = tok.token_bytes(n).unwrap();
        assert_eq!(bytes.len(), n);
        assert!(bytes[n - 1].is_empty(), "ids past the tokenizer have no bytes");
        assert_eq!(bytes[2], b"\xff<|im_end|>");
        let ids = tok.encode_plain("Hello, world! \u{e9}t\u{e9} 42").unwrap();
        let joined: Vec<u8> = ids.iter().flat_map(|&i| bytes[i as usize].clone()).collect();
        assert_eq!(String::from_utf8(joined).unwrap(), "Hello, world! \u{e9}t\u{e9} 42");
        for id in 3..tok.vocab_size() as u32 {
            let text = tok.decode(&[id], false).unwrap();
            if !text.contains('\u{FFFD}') {
                assert_eq!(text.as_bytes(), &bytes[id as usize][..], "token {id}");
            }
        }
    }
}
