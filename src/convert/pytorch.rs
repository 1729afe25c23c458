//! PyTorch `torch.save` checkpoints (`pytorch_model.bin`, sharded with
//! `pytorch_model.bin.index.json`) → safetensors. The pickle inside the zip is read by
//! `candle_core::pickle`, an interpreter that only builds values: `GLOBAL`/`REDUCE` opcodes are
//! recorded as names (e.g. `torch._utils._rebuild_tensor_v2`), never imported or called, so a
//! malicious checkpoint cannot run code. Tensor bytes come straight from the zip's storages.

use std::path::{Path, PathBuf};

use candle_core::pickle::PthTensors;
use candle_core::DType;

use crate::model::weights::{read_shard_index, ShardIndexError};

use super::write::{dtype_name, write_json, write_model, PlannedTensor};
use super::{io_err, ConvertError, ConvertOptions, ConvertReport, SourceKind};

/// Non-parameter buffers some transformers versions saved into `.bin` files.
const BUFFER_SUFFIXES: &[&str] = &[".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq"];

/// The `.bin` files a shard index names, in order.
pub(crate) fn shards_of_index(index: &Path) -> Result<Vec<PathBuf>, ConvertError> {
    read_shard_index(index).map_err(|e| match e {
        ShardIndexError::Read(source) => io_err(index)(source),
        ShardIndexError::Invalid(reason) => ConvertError::Pytorch {
            path: index.to_path_buf(),
            reason,
        },
        ShardIndexError::Missing(path) => ConvertError::Pytorch {
            path,
            reason: "a shard named by the index is missing; download it again".into(),
        },
    })
}

/// Sort key that orders `layers.2` before `layers.10`.
pub(crate) fn natural_key(name: &str) -> Vec<(u64, String)> {
    let mut key = Vec::new();
    let mut text = String::new();
    let mut num = String::new();
    for c in name.chars() {
        if c.is_ascii_digit() {
            num.push(c);
        } else {
            if !num.is_empty() {
                key.push((0, std::mem::take(&mut text)));
                key.push((num.parse().unwrap_or(u64::MAX), String::new()));
                num.clear();
            }
            text.push(c);
        }
    }
    if !num.is_empty() {
        key.push((0, std::mem::take(&mut text)));
        key.push((num.parse().unwrap_or(u64::MAX), String::new()));
    }
    key.push((0, text));
    key
}

/// Opens one torch zip; a state dict nested under `state_dict` or `model` is found too.
fn open(path: &Path) -> Result<PthTensors, ConvertError> {
    let bad = |e: candle_core::Error| ConvertError::Pytorch {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let pth = PthTensors::new(path, None).map_err(bad)?;
    if !pth.tensor_infos().is_empty() {
        return Ok(pth);
    }
    for key in ["state_dict", "model"] {
        if let Ok(p) = PthTensors::new(path, Some(key)) {
            if !p.tensor_infos().is_empty() {
                return Ok(p);
            }
        }
    }
    Err(ConvertError::Pytorch {
        path: path.to_path_buf(),
        reason: "no tensors found in the pickle".into(),
    })
}

/// config.json of the checkpoint folder, if there is one.
fn read_config(dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// Copies the non-weight files of a model folder (config, tokenizer, templates) into `out`.
pub(crate) fn copy_support_files(dir: &Path, out: &Path) -> Result<(), ConvertError> {
    for name in crate::hub::SUPPORT_FILES {
        let from = dir.join(name);
        if from.is_file() {
            let to = out.join(name);
            std::fs::copy(&from, &to).map_err(io_err(&to))?;
        }
    }
    Ok(())
}

/// One tensor of the checkpoint as it will be written.
struct Entry {
    /// Output (Hugging Face) name.
    name: String,
    /// Index of the `.bin` file that holds it.
    file: usize,
    /// Name inside that file.
    stored: String,
    /// Output dtype.
    dtype: DType,
    /// Bytes in the output dtype.
    bytes: u64,
}

pub(crate) fn convert(
    files: &[PathBuf],
    out: &Path,
    options: &ConvertOptions,
    source: SourceKind,
) -> Result<ConvertReport, ConvertError> {
    let dir = files
        .first()
        .and_then(|f| f.parent())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let config = read_config(&dir);
    let mut notes = Vec::new();
    let (pths, entries) = plan_tensors(files, config.as_ref(), options.dtype, &mut notes)?;
    if let Some(w) = entries.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(ConvertError::Tensor {
            name: w[0].name.clone(),
            reason: "appears in two shards".into(),
            path: dir.clone(),
        });
    }
    let plan: Vec<PlannedTensor> = entries
        .iter()
        .map(|e| PlannedTensor {
            name: e.name.clone(),
            bytes: e.bytes,
        })
        .collect();
    let mut load = |name: &str| {
        let e = entries
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| ConvertError::Tensor {
                name: name.to_owned(),
                reason: "planned but not found".into(),
                path: dir.clone(),
            })?;
        let bad = |err: candle_core::Error| ConvertError::Tensor {
            name: e.stored.clone(),
            reason: err.to_string(),
            path: files[e.file].clone(),
        };
        let t = pths[e.file]
            .get(&e.stored)
            .map_err(bad)?
            .ok_or_else(|| ConvertError::Tensor {
                name: e.stored.clone(),
                reason: "listed in the pickle but has no data".into(),
                path: files[e.file].clone(),
            })?;
        t.to_dtype(e.dtype).map_err(bad)
    };
    let (shards, weight_bytes) = write_model(out, &plan, options.max_shard_bytes, &mut load)?;
    copy_support_files(&dir, out)?;
    if let (Some(d), Some(cfg)) = (options.dtype, config) {
        write_config_dtype(out, cfg, d)?;
    }
    Ok(ConvertReport {
        source,
        out: out.to_path_buf(),
        tensors: plan.len(),
        shards,
        weight_bytes,
        notes,
    })
}

/// Opens every `.bin` file and lists the tensors to write, in natural order: GPT-2 names get
/// their `transformer.` prefix, non-parameter buffers and a tied `lm_head.weight` are dropped
/// (each said in `notes`), floats take `dtype` when given.
fn plan_tensors(
    files: &[PathBuf],
    config: Option<&serde_json::Value>,
    dtype: Option<DType>,
    notes: &mut Vec<String>,
) -> Result<(Vec<PthTensors>, Vec<Entry>), ConvertError> {
    let arch = config
        .and_then(|c| c.get("architectures")?.get(0)?.as_str().map(str::to_owned))
        .unwrap_or_default();
    let tied = config
        .and_then(|c| c.get("tie_word_embeddings")?.as_bool())
        .unwrap_or(true);
    let mut pths = Vec::with_capacity(files.len());
    let mut entries: Vec<Entry> = Vec::new();
    let mut dropped = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let pth = open(file)?;
        for (name, info) in pth.tensor_infos() {
            if BUFFER_SUFFIXES.iter().any(|s| name.ends_with(s)) {
                dropped.push(name.clone());
                continue;
            }
            let mut out_name = name.clone();
            if arch == "GPT2LMHeadModel"
                && !out_name.starts_with("transformer.")
                && !out_name.starts_with("lm_head.")
            {
                out_name = format!("transformer.{out_name}");
            }
            let dtype = match dtype {
                Some(d) if info.dtype.is_float() => d,
                _ => info.dtype,
            };
            let bytes = (info.layout.shape().elem_count() * dtype.size_in_bytes()) as u64;
            entries.push(Entry {
                name: out_name,
                file: i,
                stored: name.clone(),
                dtype,
                bytes,
            });
        }
        pths.push(pth);
    }
    let has = |n: &str| entries.iter().any(|e| e.name == n);
    let embed_present = has("model.embed_tokens.weight") || has("transformer.wte.weight");
    if tied && embed_present && has("lm_head.weight") {
        entries.retain(|e| e.name != "lm_head.weight");
        notes.push("dropped lm_head.weight: config.json ties it to the input embedding".to_owned());
    }
    if !dropped.is_empty() {
        notes.push(format!(
            "dropped {} non-parameter buffer(s) (attention masks / rotary caches)",
            dropped.len()
        ));
    }
    entries.sort_by_key(|e| natural_key(&e.name));
    Ok((pths, entries))
}

/// Writes `config` into `out` saying the weights are now `dtype`, under whichever spelling
/// (`dtype` or `torch_dtype`) it already uses.
fn write_config_dtype(
    out: &Path,
    mut config: serde_json::Value,
    dtype: DType,
) -> Result<(), ConvertError> {
    if let Some(obj) = config.as_object_mut() {
        let key = if obj.contains_key("dtype") {
            "dtype"
        } else {
            "torch_dtype"
        };
        obj.insert(
            key.into(),
            serde_json::Value::String(dtype_name(dtype).into()),
        );
    }
    write_json(&out.join("config.json"), &config)
}

#[cfg(test)]
mod tests {
    use super::natural_key;

    #[test]
    fn natural_order_of_layers() {
        let mut names = vec!["layers.10.w", "layers.2.w", "embed", "layers.2.b"];
        names.sort_by_key(|n| natural_key(n));
        assert_eq!(names, ["embed", "layers.2.b", "layers.2.w", "layers.10.w"]);
    }
}
