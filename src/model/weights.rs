//! Frozen base weights from `model.safetensors` or a sharded checkpoint
//! (`model.safetensors.index.json`), memory-mapped, checked against the shapes the config implies,
//! and converted to the compute dtype on load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::ModelError;

/// The safetensors files of one checkpoint and which file holds each tensor.
pub struct Weights {
    dir: PathBuf,
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// tensor name → index into `files` and the name stored there (which differs for a
    /// multimodal checkpoint's language model, [`text_model_name`])
    index: HashMap<String, (usize, String)>,
    /// dtype tensors are converted to on load
    dtype: DType,
    /// dtype of the large frozen matrices (linear weights, embeddings, LM head): `dtype`, except
    /// in the CPU's mixed mode (bf16 weights, f32 activations).
    matrix_dtype: DType,
    device: Device,
    /// How linear projections' weights are kept ([`Weights::get_linear`]).
    quant: super::qload::LinearQuantSource,
}

/// The file names a shard index (`model.safetensors.index.json`, `pytorch_model.bin.index.json`)
/// maps tensors to in its `weight_map`, sorted, each once. The error is why `text` is not a shard
/// index, for the caller's own error type.
pub(crate) fn shard_index_names(text: &str) -> Result<Vec<String>, String> {
    let index: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| format!("the shard index is not valid JSON ({e})"))?;
    let map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or("the shard index has no \"weight_map\" object")?;
    let mut names = map
        .values()
        .map(|file| file.as_str().map(str::to_owned))
        .collect::<Option<Vec<String>>>()
        .ok_or("a \"weight_map\" entry is not a file name")?;
    names.sort();
    names.dedup();
    Ok(names)
}

/// Why a shard index on disk cannot be used.
pub(crate) enum ShardIndexError {
    Read(std::io::Error),
    /// Not a shard index; the reason.
    Invalid(String),
    /// A shard it names is not beside it.
    Missing(PathBuf),
}

/// The shard files the index at `index` names, beside it, sorted, each once; each must exist.
pub(crate) fn read_shard_index(index: &Path) -> Result<Vec<PathBuf>, ShardIndexError> {
    let text = std::fs::read_to_string(index).map_err(ShardIndexError::Read)?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let files: Vec<PathBuf> = shard_index_names(&text)
        .map_err(ShardIndexError::Invalid)?
        .iter()
        .map(|name| dir.join(name))
        .collect();
    if let Some(missing) = files.iter().find(|f| !f.is_file()) {
        return Err(ShardIndexError::Missing(missing.clone()));
    }
    Ok(files)
}

/// The safetensors files that make up the checkpoint in `dir`.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.is_file() {
        let files = read_shard_index(&index_path).map_err(|e| match e {
            ShardIndexError::Read(source) => ModelError::Io {
                path: index_path.clone(),
                source,
            },
            ShardIndexError::Invalid(reason) => ModelError::InvalidWeights {
                path: index_path.clone(),
                reason,
            },
            ShardIndexError::Missing(file) => ModelError::MissingWeights(file),
        })?;
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    // Some repos name the single file differently; accept exactly one *.safetensors that is not an adapter.
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::Io {
            path: dir.to_path_buf(),
            source: e,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "safetensors")
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("adapter"))
        })
        .collect();
    found.sort();
    if found.is_empty() {
        return Err(ModelError::MissingWeights(single));
    }
    Ok(found)
}

/// The causal-LM name of a multimodal checkpoint's language-model tensor (Gemma 3's
/// `Gemma3ForConditionalGeneration`: `language_model.model.X` as transformers 4 saves it,
/// `model.language_model.X` as transformers 5 does, `language_model.lm_head.weight`) as
/// `model.X` / `lm_head.weight`; `None` for every other name (the vision tower's are never read).
pub fn text_model_name(name: &str) -> Option<String> {
    if let Some(rest) = name
        .strip_prefix("language_model.model.")
        .or_else(|| name.strip_prefix("model.language_model."))
    {
        return Some(format!("model.{rest}"));
    }
    name.strip_prefix("language_model.").map(str::to_owned)
}

impl Weights {
    /// Memory-maps every file of the checkpoint in `dir` and indexes its tensor names.
    pub fn open(dir: &Path, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let paths = checkpoint_files(dir)?;
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for path in paths {
            // SAFETY: the file is mapped read-only; FineTune never writes to model files, and a
            // file changed underneath us by another program is outside what any loader can guard.
            let st = unsafe { MmapedSafetensors::new(&path) }.map_err(|e| {
                ModelError::InvalidWeights {
                    path: path.clone(),
                    reason: format!(
                        "not a readable safetensors file, maybe truncated by an interrupted download ({e}); download it again"
                    ),
                }
            })?;
            for (name, _) in st.tensors() {
                let key = text_model_name(&name).unwrap_or_else(|| name.clone());
                index.insert(key, (files.len(), name));
            }
            files.push((path, st));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            index,
            dtype,
            matrix_dtype: dtype,
            device: device.clone(),
            quant: super::qload::LinearQuantSource::Float,
        })
    }

    /// Stores the large frozen matrices ([`Weights::get_matrix`]) in `dtype`.
    pub fn with_matrix_dtype(mut self, dtype: DType) -> Self {
        self.matrix_dtype = dtype;
        self
    }

    /// Keeps linear projections' weights as `quant` says (QLoRA).
    pub(crate) fn with_quant(mut self, quant: super::qload::LinearQuantSource) -> Self {
        self.quant = quant;
        self
    }

    /// A linear projection's frozen weight `name`, (out, in): quantized when the model is loaded
    /// for QLoRA, else in the matrix dtype. `transposed` for checkpoints that store it (in, out)
    /// (GPT-2's Conv1D).
    pub fn get_linear(
        &self,
        name: &str,
        out_f: usize,
        in_f: usize,
        transposed: bool,
    ) -> Result<super::lora::Frozen, ModelError> {
        let dense = || -> Result<Tensor, ModelError> {
            if transposed {
                let t = self.get_matrix(name, &[in_f, out_f])?;
                t.t()
                    .and_then(|t| t.contiguous())
                    .map_err(|e| ModelError::InvalidWeights {
                        path: self.dir.clone(),
                        reason: format!("tensor {name}: {e}"),
                    })
            } else {
                self.get_matrix(name, &[out_f, in_f])
            }
        };
        let quantized = super::qload::linear_weight(&self.quant, name, &self.device, || {
            let w = dense()?;
            Ok(w)
        })?;
        match quantized {
            Some(q) if q.dims() == (out_f, in_f) => {
                Ok(super::lora::Frozen::Quant(std::sync::Arc::new(q)))
            }
            Some(q) => Err(ModelError::WrongShape {
                name: name.to_owned(),
                expected: vec![out_f, in_f],
                found: vec![q.dims().0, q.dims().1],
                path: self.dir.clone(),
            }),
            None => Ok(super::lora::Frozen::Dense(dense()?)),
        }
    }

    /// Loads a large frozen matrix (linear weight, embedding, LM head) in the matrix dtype.
    pub fn get_matrix(&self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        self.get_as(name, shape, self.matrix_dtype)
    }

    /// Whether the checkpoint has a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// All tensor names in the checkpoint.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The compute dtype tensors are converted to on load ([`Weights::get`]).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device tensors are loaded onto.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Loads `name`, checks it has `shape`, and converts it to the compute dtype.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        self.get_as(name, shape, self.dtype)
    }

    fn get_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor, ModelError> {
        let (i, stored) = self
            .index
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_owned(),
                dir: self.dir.clone(),
            })?;
        let (path, st) = &self.files[*i];
        let view = st.get(stored).map_err(|e| ModelError::InvalidWeights {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if view.shape() != shape {
            return Err(ModelError::WrongShape {
                name: name.to_owned(),
                expected: shape.to_vec(),
                found: view.shape().to_vec(),
                path: path.clone(),
            });
        }
        // A dtype change is made on the host before the upload: on Metal a bf16 checkpoint
        // loaded as f32 would otherwise need the GPU's bf16 cast kernels, which a binary built
        // for an older macOS lacks (docs/metal.md, gap 3). Elsewhere the device casts.
        let t = if !self.device.is_metal() || view.dtype() == dtype.into() {
            st.load(stored, &self.device)
                .and_then(|t| t.to_dtype(dtype))
        } else {
            st.load(stored, &Device::Cpu)
                .and_then(|t| t.to_dtype(dtype))
                .and_then(|t| t.to_device(&self.device))
        }
        .map_err(|e| ModelError::InvalidWeights {
            path: path.clone(),
            reason: format!("tensor {name}: {e}"),
        })?;
        Ok(t)
    }

    /// Stored dtype of the first floating-point tensor (what the checkpoint ships in).
    pub fn stored_dtype(&self) -> Option<DType> {
        self.files.iter().find_map(|(_, st)| {
            st.tensors()
                .into_iter()
                .find_map(|(_, v)| DType::try_from(v.dtype()).ok().filter(|d| d.is_float()))
        })
    }
}
