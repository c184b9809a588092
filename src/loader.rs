//! Loads what serving a model needs, together: the weights and the matching tokenizer.

use crate::model::load::ModelFiles;
use crate::model::load::gguf::GgufFile;
use crate::model::load::safetensors::SafetensorsDir;
use crate::model::{Llama, LoadOptions, ModelError};
use crate::tokenizer::{Tokenizer, TokenizerError};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("tokenizer has {tokenizer} tokens but the model only {model}")]
    VocabMismatch { tokenizer: usize, model: usize },
}

/// A model ready to run: weights, tokenizer, and the name clients use for it.
#[derive(Clone)]
pub struct ModelBundle {
    pub model: Arc<Llama>,
    pub tokenizer: Arc<Tokenizer>,
    /// The id clients see (`model` in OpenAI requests): the file stem or directory name.
    pub id: String,
    pub path: PathBuf,
}

impl ModelBundle {
    /// Loads a GGUF file or HF directory; `tokenizer_json` overrides the embedded tokenizer.
    pub fn load(path: &Path, opts: &LoadOptions, tokenizer_json: Option<&Path>) -> Result<Self, LoadError> {
        let (model, tokenizer) = match ModelFiles::detect(path)? {
            ModelFiles::Gguf(p) => {
                let mut f = GgufFile::open(&p)?;
                let tokenizer = match tokenizer_json {
                    Some(t) => Tokenizer::from_tokenizer_json(t)?,
                    None => Tokenizer::from_gguf(f.metadata())?,
                };
                let cfg = f.config()?;
                (Llama::from_source(cfg, &mut f, opts)?, tokenizer)
            }
            ModelFiles::HfDir(p) => {
                let mut d = SafetensorsDir::open(&p)?;
                let tokenizer = match tokenizer_json {
                    Some(t) => Tokenizer::from_tokenizer_json(t)?,
                    None => Tokenizer::from_hf_dir(&p)?,
                };
                let cfg = d.config()?;
                (Llama::from_source(cfg, &mut d, opts)?, tokenizer)
            }
        };
        let (tv, mv) = (tokenizer.vocab_size(), model.config().vocab_size);
        if tv > mv {
            return Err(LoadError::VocabMismatch { tokenizer: tv, model: mv });
        }
        let id = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        Ok(Self { model: Arc::new(model), tokenizer: Arc::new(tokenizer), id, path: path.to_path_buf() })
    }
}
