//! Writing converted tensors as safetensors the way `save_pretrained` does: `model.safetensors`,
//! or `model-0000k-of-0000n.safetensors` shards plus `model.safetensors.index.json` when the
//! output passes the shard limit; metadata `{"format": "pt"}` so transformers accepts the files.
//! Tensors are loaded one shard at a time, so memory stays near one shard's size.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};

use super::{io_err, ConvertError};

/// One tensor to write, in output order.
#[derive(Debug, Clone)]
pub(crate) struct PlannedTensor {
    /// Output (Hugging Face) name.
    pub name: String,
    /// Bytes it takes in the output dtype.
    pub bytes: u64,
}

/// transformers' name of a dtype as config.json spells it (`torch_dtype` / `dtype`).
pub(crate) fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// Splits `plan` into shards of at most `max_bytes` (a larger single tensor gets its own shard).
pub(crate) fn shard_plan(plan: &[PlannedTensor], max_bytes: u64) -> Vec<Vec<PlannedTensor>> {
    let mut shards: Vec<Vec<PlannedTensor>> = Vec::new();
    let mut current: Vec<PlannedTensor> = Vec::new();
    let mut size = 0u64;
    for t in plan {
        if !current.is_empty() && size + t.bytes > max_bytes {
            shards.push(std::mem::take(&mut current));
            size = 0;
        }
        size += t.bytes;
        current.push(t.clone());
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// Writes every tensor of `plan` into `out`, fetching each with `load` (already in the output
/// dtype). Returns (files written, bytes of tensor data).
pub(crate) fn write_model(
    out: &Path,
    plan: &[PlannedTensor],
    max_shard_bytes: u64,
    load: &mut dyn FnMut(&str) -> Result<Tensor, ConvertError>,
) -> Result<(usize, u64), ConvertError> {
    let shards = shard_plan(plan, max_shard_bytes.max(1));
    let n = shards.len();
    let metadata: HashMap<String, String> = [("format".to_owned(), "pt".to_owned())].into();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for (i, shard) in shards.iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_owned()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        };
        let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(shard.len());
        for t in shard {
            let tensor = load(&t.name)?
                .contiguous()
                .map_err(|e| ConvertError::Tensor {
                    name: t.name.clone(),
                    reason: e.to_string(),
                    path: out.to_path_buf(),
                })?;
            total += (tensor.elem_count() * tensor.dtype().size_in_bytes()) as u64;
            weight_map.insert(t.name.clone(), serde_json::Value::String(file.clone()));
            tensors.push((t.name.clone(), tensor));
        }
        let path = out.join(&file);
        safetensors::serialize_to_file(tensors, Some(metadata.clone()), &path).map_err(|e| {
            ConvertError::Io {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            }
        })?;
        readable_by_all(&path)?;
    }
    if n > 1 {
        let index = serde_json::json!({
            "metadata": { "total_size": total },
            "weight_map": weight_map,
        });
        write_json(&out.join("model.safetensors.index.json"), &index)?;
    }
    Ok((n, total))
}

/// The safetensors writer creates files only the owner may read (it goes through a temporary
/// file); model files are ordinary data, readable like the ones transformers writes.
fn readable_by_all(path: &Path) -> Result<(), ConvertError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
            .map_err(io_err(path))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Pretty JSON with a trailing newline, as transformers writes it.
pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), ConvertError> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| ConvertError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })?;
    text.push('\n');
    std::fs::write(path, text).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, bytes: u64) -> PlannedTensor {
        PlannedTensor {
            name: name.into(),
            bytes,
        }
    }

    #[test]
    fn shards_respect_the_limit_and_keep_order() {
        let plan = [t("a", 40), t("b", 40), t("c", 30), t("d", 200), t("e", 10)];
        let shards = shard_plan(&plan, 100);
        let names: Vec<Vec<&str>> = shards
            .iter()
            .map(|s| s.iter().map(|t| t.name.as_str()).collect())
            .collect();
        assert_eq!(names, [vec!["a", "b"], vec!["c"], vec!["d"], vec!["e"]]);
        assert_eq!(shard_plan(&plan, 1000).len(), 1);
    }
}
