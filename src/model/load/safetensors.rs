//! HF model directories: `config.json` and one or more `*.safetensors` files (memory-mapped).

use super::{RawWeight, WeightName, WeightSource};
use crate::model::config::{HfConfig, ModelConfig};
use crate::model::{ModelError, Result};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub struct SafetensorsDir {
    dir: PathBuf,
    maps: Vec<(PathBuf, Mmap)>,
    /// Tensor name → (file index, dtype, shape, byte range within that file).
    index: HashMap<String, (usize, Dtype, Vec<usize>, std::ops::Range<usize>)>,
    hf_config: HfConfig,
}

const SUPPORTED: &str = "F32, F16, BF16";

impl SafetensorsDir {
    pub fn open(dir: &Path) -> Result<Self> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ModelError::Io { path, source }
        };
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(io(&config_path))?;
        let hf_config: HfConfig = serde_json::from_str(&text)
            .map_err(|e| ModelError::Corrupt { path: config_path.clone(), reason: e.to_string() })?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            let has_bin = dir.join("pytorch_model.bin").exists();
            return Err(ModelError::UnrecognizedFormat {
                path: dir.to_path_buf(),
                reason: if has_bin {
                    "only pytorch_model.bin found; PyTorch pickles are not supported, convert to safetensors".into()
                } else {
                    "no *.safetensors files in the directory".into()
                },
            });
        }
        let mut maps = Vec::new();
        let mut index = HashMap::new();
        for (fi, path) in files.into_iter().enumerate() {
            let file = std::fs::File::open(&path).map_err(io(&path))?;
            // SAFETY: the file is opened read-only; lethe never writes model files it serves.
            let map = unsafe { Mmap::map(&file) }.map_err(io(&path))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&map)
                .map_err(|e| ModelError::Corrupt { path: path.clone(), reason: format!("{e:?}") })?;
            let data_start = 8 + header_len;
            for (name, info) in metadata.tensors() {
                let (a, b) = info.data_offsets;
                index.insert(name, (fi, info.dtype, info.shape.clone(), data_start + a..data_start + b));
            }
            maps.push((path, map));
        }
        Ok(Self { dir: dir.to_path_buf(), maps, index, hf_config })
    }

    pub fn config(&self) -> Result<ModelConfig> {
        let name = self.dir.file_name().unwrap_or_default().to_string_lossy().into_owned();
        self.hf_config.to_config(name)
    }

    pub fn hf_config(&self) -> &HfConfig {
        &self.hf_config
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The tensor named `name` (HF naming) as a CPU tensor in its stored dtype.
    pub fn tensor(&self, name: &str) -> Result<Option<Tensor>> {
        let Some((fi, dtype, shape, range)) = self.index.get(name) else {
            return Ok(None);
        };
        let dtype = match dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => {
                return Err(ModelError::UnsupportedDtype {
                    tensor: name.to_string(),
                    dtype: format!("{other:?}"),
                    supported: SUPPORTED,
                });
            }
        };
        let bytes = &self.maps[*fi].1[range.clone()];
        Ok(Some(Tensor::from_raw_buffer(bytes, dtype, shape, &Device::Cpu)?))
    }
}

impl WeightSource for SafetensorsDir {
    fn load(&mut self, name: WeightName, _device: &Device) -> Result<Option<RawWeight>> {
        Ok(self.tensor(&name.hf())?.map(RawWeight::Float))
    }

    fn dims(&self, name: WeightName) -> Option<Vec<usize>> {
        self.index.get(&name.hf()).map(|(_, _, s, _)| s.clone())
    }
}
