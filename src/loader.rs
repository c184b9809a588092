//! Loads what serving a model needs, together: the weights and the matching tokenizer.

use crate::model::load::gguf::GgufFile;
use crate::model::load::safetensors::SafetensorsDir;
use crate::model::load::{ModelFiles, WeightSource};
use crate::model::{Llama, LoadOptions, ModelConfig, ModelError};
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
        let mut src = ModelSource::open(path, tokenizer_json)?;
        let model = Llama::from_source(src.config.clone(), src.weights.as_mut(), opts)?;
        Ok(Self { model: Arc::new(model), tokenizer: Arc::new(src.tokenizer), id: src.id, path: path.to_path_buf() })
    }
}

/// A model file opened but not yet built: its configuration, its tensors on demand, and its
/// tokenizer. Serving builds a [`Llama`] from it; training reads the same tensors as f32.
pub struct ModelSource {
    pub config: ModelConfig,
    pub weights: Box<dyn WeightSource>,
    pub tokenizer: Tokenizer,
    /// The id clients see: the file stem or directory name.
    pub id: String,
}

impl ModelSource {
    /// Opens a GGUF file or HF directory; `tokenizer_json` overrides the embedded tokenizer.
    pub fn open(path: &Path, tokenizer_json: Option<&Path>) -> Result<Self, LoadError> {
        let (config, weights, tokenizer): (_, Box<dyn WeightSource>, _) = match ModelFiles::detect(path)? {
            ModelFiles::Gguf(p) => {
                let f = GgufFile::open(&p)?;
                let tokenizer = match tokenizer_json {
                    Some(t) => Tokenizer::from_tokenizer_json(t)?,
                    None => Tokenizer::from_gguf(f.metadata())?,
                };
                (f.config()?, Box::new(f), tokenizer)
            }
            ModelFiles::HfDir(p) => {
                let d = SafetensorsDir::open(&p)?;
                let tokenizer = match tokenizer_json {
                    Some(t) => Tokenizer::from_tokenizer_json(t)?,
                    None => Tokenizer::from_hf_dir(&p)?,
                };
                (d.config()?, Box::new(d), tokenizer)
            }
        };
        let (tv, mv) = (tokenizer.vocab_size(), config.vocab_size);
        if tv > mv {
            return Err(LoadError::VocabMismatch { tokenizer: tv, model: mv });
        }
        let id = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        Ok(Self { config, weights, tokenizer, id })
    }
}
