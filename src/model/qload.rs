//! Where a model's quantized linear weights come from (QLoRA, [`super::quant`]): a float
//! checkpoint quantized at load (`--quantize q4_k`), or a GGUF file's own tensors as it stores
//! them (training straight from the GGUF a person runs in llama.cpp, Ollama or LM Studio).
//! Embeddings, norms and the LM head stay float: they come from the converted folder.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};

use super::quant::{self, QWeight};
use super::ModelError;

/// The quantization `--quantize` asks for (and the app's Settings offer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantChoice {
    /// Float weights, even for a GGUF source (which is then dequantized: `--dtype` decides).
    None,
    /// 8.5 bits per weight; nearly lossless.
    Q8_0,
    /// 4.5 bits per weight, one scale per 32.
    Q4_0,
    /// 4.5 bits per weight, K-quant (rows of 256; others fall back to Q5_0).
    Q4K,
    /// 5.5 bits per weight, K-quant (others fall back to Q5_1).
    Q5K,
    /// 6.6 bits per weight, K-quant (others fall back to Q8_0).
    Q6K,
}

impl QuantChoice {
    /// Every choice, in the order the app lists them.
    pub const ALL: [QuantChoice; 6] = [
        QuantChoice::None,
        QuantChoice::Q8_0,
        QuantChoice::Q6K,
        QuantChoice::Q5K,
        QuantChoice::Q4K,
        QuantChoice::Q4_0,
    ];

    /// The GGML type, `None` for float.
    pub fn ggml(self) -> Option<GgmlDType> {
        match self {
            QuantChoice::None => None,
            QuantChoice::Q8_0 => Some(GgmlDType::Q8_0),
            QuantChoice::Q4_0 => Some(GgmlDType::Q4_0),
            QuantChoice::Q4K => Some(GgmlDType::Q4K),
            QuantChoice::Q5K => Some(GgmlDType::Q5K),
            QuantChoice::Q6K => Some(GgmlDType::Q6K),
        }
    }

    /// The name `--quantize` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            QuantChoice::None => "none",
            QuantChoice::Q8_0 => "q8_0",
            QuantChoice::Q4_0 => "q4_0",
            QuantChoice::Q4K => "q4_k",
            QuantChoice::Q5K => "q5_k",
            QuantChoice::Q6K => "q6_k",
        }
    }

    /// Bytes per weight (block bytes over block size).
    pub fn bytes_per_weight(self) -> Option<f64> {
        self.ggml()
            .map(|t| t.type_size() as f64 / t.block_size() as f64)
    }
}

/// How the linear projections' weights are kept.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum LinearQuant {
    /// Float, in the compute dtype.
    #[default]
    Float,
    /// Quantized at load to this type (per-row-length fallback, [`quant::fallback`]).
    To(GgmlDType),
    /// As the GGUF file at this path stores them.
    Gguf(PathBuf),
}

/// A GGUF file's linear weights by transformers name, read on demand.
pub struct GgufLinears {
    path: PathBuf,
    content: Content,
    reader: Mutex<BufReader<File>>,
    /// transformers name → GGUF name
    names: HashMap<String, String>,
    /// llama.cpp stores llama/mistral Q and K rows permuted; (heads, kv heads) to undo it.
    permuted: Option<(usize, usize)>,
}

impl GgufLinears {
    /// Opens `path` and indexes its tensors by transformers name.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let bad = |reason: String| ModelError::InvalidWeights {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(|e| bad(e.to_string()))?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader)
            .map_err(|e| bad(format!("not a readable GGUF file ({e})")))?;
        let len = std::fs::metadata(path)
            .map_err(|e| bad(e.to_string()))?
            .len();
        crate::convert::gguf::check_tensor_extents(&content, len).map_err(bad)?;
        let meta = crate::convert::gguf_meta::Meta::new(&content.metadata, path);
        let permuted = crate::convert::gguf::permutes_qk(&meta.arch).then(|| {
            let heads = meta.arch_u64("attention.head_count").unwrap_or(0) as usize;
            let kv = meta
                .arch_u64("attention.head_count_kv")
                .map_or(heads, |v| v as usize);
            (heads, kv)
        });
        let names = content
            .tensor_infos
            .keys()
            .filter_map(|g| crate::convert::gguf::hf_name(&meta.arch, g).map(|h| (h, g.clone())))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader: Mutex::new(reader),
            names,
            permuted,
        })
    }

    /// The weight `name` (transformers name) of shape (out, in) on `device`, as stored, with
    /// llama.cpp's Q/K row order undone; `None` when the file has no such tensor.
    pub fn get(&self, name: &str, device: &Device) -> Result<Option<QTensor>, ModelError> {
        let Some(g) = self.names.get(name) else {
            return Ok(None);
        };
        let bad = |reason: String| ModelError::InvalidWeights {
            path: self.path.clone(),
            reason: format!("tensor {g}: {reason}"),
        };
        let q = {
            let mut reader = match self.reader.lock() {
                Ok(r) => r,
                Err(poisoned) => poisoned.into_inner(),
            };
            self.content
                .tensor(&mut *reader, g, &Device::Cpu)
                .map_err(|e| bad(e.to_string()))?
        };
        let heads = match self.permuted {
            Some((h, _)) if name.contains(".self_attn.q_proj.") => Some(h),
            Some((_, kv)) if name.contains(".self_attn.k_proj.") => Some(kv),
            _ => None,
        };
        let dtype = q.dtype();
        let shape = q.shape().clone();
        let data = q.data().map_err(|e| bad(e.to_string()))?;
        let data = match heads {
            Some(h) => {
                let rows = shape.dims().first().copied().unwrap_or(0);
                Cow::Owned(unpermute_rows(&data, rows, h).map_err(bad)?)
            }
            None => data,
        };
        let storage = QStorage::from_data(data, device, dtype).map_err(|e| bad(e.to_string()))?;
        QTensor::new(storage, shape)
            .map(Some)
            .map_err(|e| bad(e.to_string()))
    }
}

/// The rows of a quantized (rows, cols) tensor's bytes put back in transformers' order: llama.cpp
/// groups each head's rows as `(dim/2, 2)`, transformers as `(2, dim/2)`. Each row is whole
/// blocks, so rows move as bytes.
fn unpermute_rows(data: &[u8], rows: usize, heads: usize) -> Result<Vec<u8>, String> {
    if heads == 0
        || rows == 0
        || !rows.is_multiple_of(2 * heads)
        || !data.len().is_multiple_of(rows)
    {
        return Err(format!("{rows} rows do not split into {heads} heads"));
    }
    let row = data.len() / rows;
    let half = rows / heads / 2;
    let mut out = Vec::with_capacity(data.len());
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let src = h * 2 * half + i * 2 + j;
                out.extend_from_slice(&data[src * row..(src + 1) * row]);
            }
        }
    }
    Ok(out)
}

/// The quantized weight of `name` (out, in) per `quant`, or `None` to keep `dense` float.
/// `dense` gives the float weight (out, in) when it is needed: for quantizing, or when the GGUF
/// file lacks the tensor.
pub(crate) fn linear_weight(
    quant: &LinearQuantSource,
    name: &str,
    device: &Device,
    dense: impl FnOnce() -> Result<Tensor, ModelError>,
) -> Result<Option<QWeight>, ModelError> {
    let wrap = |e: candle_core::Error| ModelError::InvalidWeights {
        path: PathBuf::from(name),
        reason: format!("quantizing {name}: {e}"),
    };
    match quant {
        LinearQuantSource::Float => Ok(None),
        LinearQuantSource::To(ty) => {
            let w = dense()?;
            let ty = quant::fallback(*ty, w.dim(1).map_err(wrap)?);
            if matches!(ty, GgmlDType::F16 | GgmlDType::F32 | GgmlDType::BF16) {
                return Ok(None);
            }
            QWeight::quantize(&w, ty, device).map(Some).map_err(wrap)
        }
        LinearQuantSource::Gguf(g) => match g.get(name, device)? {
            Some(q) if !matches!(q.dtype(), GgmlDType::F16 | GgmlDType::F32 | GgmlDType::BF16) => {
                QWeight::new(q).map(Some).map_err(wrap)
            }
            _ => Ok(None),
        },
    }
}

/// [`LinearQuant`] opened for loading.
pub(crate) enum LinearQuantSource {
    Float,
    To(GgmlDType),
    Gguf(Box<GgufLinears>),
}

impl LinearQuantSource {
    pub(crate) fn open(q: &LinearQuant) -> Result<Self, ModelError> {
        Ok(match q {
            LinearQuant::Float => Self::Float,
            LinearQuant::To(t) => Self::To(*t),
            LinearQuant::Gguf(p) => Self::Gguf(Box::new(GgufLinears::open(p)?)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_rows_matches_the_float_unpermute() {
        // 8 rows of 2 "bytes" each, 2 heads: the float unpermute's row order.
        let rows = 8;
        let data: Vec<u8> = (0..rows as u8).flat_map(|r| [r, r]).collect();
        let out = unpermute_rows(&data, rows, 2).unwrap();
        let t = Tensor::arange(0f32, rows as f32, &Device::Cpu)
            .unwrap()
            .reshape((rows, 1))
            .unwrap();
        let back = crate::convert::gguf::unpermute(&t, 2).unwrap();
        let order: Vec<f32> = back.flatten_all().unwrap().to_vec1().unwrap();
        let got: Vec<f32> = out.chunks(2).map(|c| c[0] as f32).collect();
        assert_eq!(got, order);
        assert!(unpermute_rows(&data, rows, 3).is_err());
    }
}
