//! Adapters from other tools, read into the (A, B) pairs [`super::adapter::load`] attaches: an
//! mlx-lm adapter folder (`adapters.safetensors` + `adapter_config.json`, the layout
//! `crate::export::mlx` writes) and a llama.cpp GGUF LoRA file (the layout
//! `crate::export::gguf_lora` and `convert_lora_to_gguf.py` write). Each module's name is matched
//! through the model's own projections, so an adapter for another model is refused by name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Tensor};

use super::adapter::{AdapterError, Magnitudes, Pairs, ADAPTER_CONFIG};
use super::lora::LoraConfig;
use super::Model;

/// mlx-lm's adapter weights file.
pub const MLX_WEIGHTS: &str = "adapters.safetensors";

fn invalid(path: &Path, reason: String) -> AdapterError {
    AdapterError::InvalidWeights {
        path: path.to_path_buf(),
        reason,
    }
}

/// An mlx-lm adapter folder: `lora_a` (in, r) and `lora_b` (r, out) become A (r, in) and
/// B (out, r); `scale` becomes alpha = scale · rank; a DoRA adapter's `m` (out,) is the magnitude.
#[allow(clippy::type_complexity)]
pub fn read_mlx(
    dir: &Path,
    model: &Model,
) -> Result<(LoraConfig, Pairs, Magnitudes, PathBuf), AdapterError> {
    let config = read_mlx_config(&dir.join(ADAPTER_CONFIG))?;
    let weights = dir.join(MLX_WEIGHTS);
    let tensors = candle_core::safetensors::load(&weights, model.device())
        .map_err(|e| invalid(&weights, format!("not a readable safetensors file ({e})")))?;
    let by_mlx: HashMap<String, String> = model
        .linears()
        .iter()
        .filter_map(|l| {
            let (block, _, key) = crate::export::mlx::split_module(&l.path)?;
            Some((format!("{block}.{key}"), l.path.clone()))
        })
        .collect();
    let mut pairs = Pairs::new();
    let mut magnitudes = Magnitudes::new();
    for (name, t) in tensors {
        let (module, which) = name
            .rsplit_once('.')
            .ok_or_else(|| invalid(&weights, format!("unexpected tensor {name}")))?;
        let path = by_mlx
            .get(module)
            .ok_or_else(|| AdapterError::UnknownModule {
                module: module.to_owned(),
                path: weights.clone(),
            })?;
        if which == "m" && config.use_dora {
            magnitudes.insert(path.clone(), t.to_dtype(DType::F32)?);
            continue;
        }
        let entry = pairs.entry(path.clone()).or_default();
        let t = t.to_dtype(DType::F32)?.t()?.contiguous()?;
        match which {
            "lora_a" => entry.0 = Some(t),
            "lora_b" => entry.1 = Some(t),
            _ => {
                return Err(AdapterError::Unsupported {
                    what: format!("mlx-lm tensor {name} (only lora_a/lora_b, and m for DoRA)"),
                    path: weights.clone(),
                })
            }
        }
    }
    Ok((config, pairs, magnitudes, weights))
}

/// An mlx-lm adapter_config.json's settings (fine_tune_type `lora`, or `dora`: `use_dora`).
fn read_mlx_config(config_path: &Path) -> Result<LoraConfig, AdapterError> {
    let bad = |reason: String| AdapterError::InvalidConfig {
        path: config_path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(config_path).map_err(|e| bad(e.to_string()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON ({e})")))?;
    let kind = v
        .get("fine_tune_type")
        .and_then(|t| t.as_str())
        .unwrap_or("lora");
    if kind != "lora" && kind != "dora" {
        return Err(AdapterError::Unsupported {
            what: format!("mlx-lm fine_tune_type {kind} (only lora and dora)"),
            path: config_path.to_path_buf(),
        });
    }
    let params = v
        .get("lora_parameters")
        .ok_or_else(|| bad("missing \"lora_parameters\"".into()))?;
    let rank = params
        .get("rank")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| bad("missing lora_parameters.rank".into()))? as usize;
    let scale = params
        .get("scale")
        .and_then(serde_json::Value::as_f64)
        .ok_or_else(|| bad("missing lora_parameters.scale".into()))?;
    Ok(LoraConfig {
        rank,
        alpha: scale * rank as f64,
        dropout: params
            .get("dropout")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0),
        targets: Vec::new(),
        layers: None,
        use_rslora: false,
        use_dora: kind == "dora",
    })
}

/// A llama.cpp GGUF LoRA: `<blk.N.name>.weight.lora_a` (r, in) and `.lora_b` (out, r), alpha from
/// `adapter.lora.alpha` (llama.cpp scales each module by alpha / its rank); the q/k `lora_b` rows
/// of the llama architecture un-permuted back to transformers' order.
pub fn read_gguf_lora(
    file: &Path,
    model: &Model,
) -> Result<(LoraConfig, Pairs, PathBuf), AdapterError> {
    let mut reader = std::fs::File::open(file)
        .map(std::io::BufReader::new)
        .map_err(|e| invalid(file, e.to_string()))?;
    let content =
        Content::read(&mut reader).map_err(|e| invalid(file, format!("not a GGUF file ({e})")))?;
    let len = std::fs::metadata(file)
        .map_err(|e| invalid(file, e.to_string()))?
        .len();
    crate::convert::gguf::check_tensor_extents(&content, len).map_err(|e| invalid(file, e))?;
    let (alpha, arch) = lora_metadata(&content, model, file)?;
    let by_gguf: HashMap<String, String> = model
        .linears()
        .iter()
        .filter_map(|l| {
            Some((
                crate::export::gguf_lora::gguf_module(&l.path)?,
                l.path.clone(),
            ))
        })
        .collect();
    let mut pairs = Pairs::new();
    let mut rank = 0;
    let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    for name in names {
        let Some((module, which)) = name.rsplit_once(".weight.") else {
            return Err(AdapterError::Unsupported {
                what: format!("GGUF LoRA tensor {name} (only <tensor>.weight.lora_a/lora_b)"),
                path: file.to_path_buf(),
            });
        };
        let path = by_gguf
            .get(module)
            .ok_or_else(|| AdapterError::UnknownModule {
                module: module.to_owned(),
                path: file.to_path_buf(),
            })?;
        let t = content
            .tensor(&mut reader, &name, model.device())
            .and_then(|q| q.dequantize(model.device()))
            .map_err(|e| invalid(file, format!("{name}: {e}")))?;
        let t = t.to_dtype(DType::F32)?;
        let entry = pairs.entry(path.clone()).or_default();
        match which {
            "lora_a" => {
                rank = rank.max(t.dim(0)?);
                entry.0 = Some(t);
            }
            "lora_b" => entry.1 = Some(unpermuted(t, module, arch, model)?),
            _ => {
                return Err(AdapterError::Unsupported {
                    what: format!("GGUF LoRA tensor {name}"),
                    path: file.to_path_buf(),
                })
            }
        }
    }
    let config = LoraConfig {
        rank,
        alpha,
        dropout: 0.0,
        targets: Vec::new(),
        layers: None,
        use_rslora: false,
        use_dora: false,
    };
    Ok((config, pairs, file.to_path_buf()))
}

/// A GGUF LoRA's alpha and llama.cpp architecture name, after checking that it is a LoRA for
/// this model's architecture.
fn lora_metadata(
    content: &Content,
    model: &Model,
    file: &Path,
) -> Result<(f64, Option<&'static str>), AdapterError> {
    let text = |k: &str| match content.metadata.get(k) {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    if text("general.type").as_deref() != Some("adapter")
        || text("adapter.type").as_deref() != Some("lora")
    {
        return Err(AdapterError::Unsupported {
            what:
                "a GGUF file that is not a LoRA adapter (general.type adapter, adapter.type lora)"
                    .into(),
            path: file.to_path_buf(),
        });
    }
    let arch = crate::export::gguf_lora::gguf_architecture(&model.config.architecture);
    if let (Some(want), Some(got)) = (arch, text("general.architecture")) {
        if want != got {
            return Err(AdapterError::Unsupported {
                what: format!("a LoRA for a {got} model on this {want} model"),
                path: file.to_path_buf(),
            });
        }
    }
    let alpha = match content.metadata.get("adapter.lora.alpha") {
        Some(Value::F32(a)) => f64::from(*a),
        Some(Value::F64(a)) => *a,
        _ => 0.0,
    };
    Ok((alpha, arch))
}

/// llama's q/k `lora_b` rows back from llama.cpp's interleaved order.
fn unpermuted(
    b: Tensor,
    module: &str,
    arch: Option<&str>,
    model: &Model,
) -> candle_core::Result<Tensor> {
    if arch != Some("llama") {
        return Ok(b);
    }
    if module.ends_with(".attn_q") {
        crate::convert::gguf::unpermute(&b, model.config.num_heads)
    } else if module.ends_with(".attn_k") {
        crate::convert::gguf::unpermute(&b, model.config.num_kv_heads)
    } else {
        Ok(b)
    }
}
