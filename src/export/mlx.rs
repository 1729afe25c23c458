//! The MLX export: a PEFT adapter rewritten in mlx-lm's layout, so `mlx_lm.generate --model BASE
//! --adapter-path DIR` and `mlx_lm.fuse` take it (checked with mlx-lm 0.32 by tools/mlx_check.py).
//!
//! - `adapters.safetensors`: `<module>.lora_a` (in, r) = Aᵀ and `<module>.lora_b` (r, out) = Bᵀ,
//!   named as mlx-lm names the model's modules (`model.layers.{i}.self_attn.q_proj`; GPT-2's
//!   `transformer.h.{i}…` is `model.h.{i}…`). PEFT's A and B are Linear-shaped for every base,
//!   GPT-2's Conv1D included, so no other transpose is needed.
//! - `adapter_config.json`: `fine_tune_type: lora`, `num_layers` (mlx-lm puts LoRA on the last
//!   `num_layers` blocks, so this counts from the lowest adapted layer to the top; layers in that
//!   range the adapter leaves alone get no tensors, which mlx-lm reads as a zero update), and
//!   `lora_parameters` {rank, scale = alpha/r (alpha/√r with rsLoRA), dropout, keys: the
//!   block-relative module paths}.
//!
//! mlx-lm has one rank and one scale per adapter: an adapter whose modules differ in rank
//! (PEFT's rank_pattern) gets a clear error.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::Tensor;

use crate::model::adapter::{read_deltas, write_atomic};

/// What an MLX export wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct MlxAdapter {
    /// The folder.
    pub dir: PathBuf,
    /// The modules it adapts.
    pub modules: usize,
    /// `num_layers` of its config.
    pub num_layers: usize,
}

/// `model.layers.3.self_attn.q_proj` → (mlx-lm's `model.layers.3`, 3, `self_attn.q_proj`).
pub(crate) fn split_module(path: &str) -> Option<(String, usize, String)> {
    let parts: Vec<&str> = path.split('.').collect();
    let at = parts
        .iter()
        .position(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))?;
    let layer: usize = parts[at].parse().ok()?;
    let mut container = parts[..at].join(".");
    if let Some(rest) = container.strip_prefix("transformer.") {
        // GPT-2: mlx-lm's GPT2Model sits at `model`.
        container = format!("model.{rest}");
    }
    let key = parts[at + 1..].join(".");
    (!key.is_empty()).then(|| (format!("{container}.{layer}"), layer, key))
}

/// The number of transformer blocks of the model in `dir` (config.json).
fn num_blocks(dir: &Path) -> anyhow::Result<usize> {
    let path = dir.join("config.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    ["num_hidden_layers", "n_layer", "num_layers"]
        .iter()
        .find_map(|k| v.get(k).and_then(serde_json::Value::as_u64))
        .map(|n| n as usize)
        .with_context(|| format!("{} gives no layer count", path.display()))
}

/// Writes the adapter in `adapter` (PEFT layout) as an mlx-lm adapter in `out`; `base` is the
/// model it was trained on (for its layer count).
pub fn export_mlx(adapter: &Path, base: &Path, out: &Path) -> anyhow::Result<MlxAdapter> {
    let prepared = crate::model::source::prepare(base)?;
    let blocks = num_blocks(&prepared.dir)?;
    let (deltas, _) = read_deltas(adapter)?;
    if deltas.is_empty() {
        anyhow::bail!("the adapter in {} has no LoRA tensors", adapter.display());
    }
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut keys = BTreeSet::new();
    let (mut ranks, mut scales) = (BTreeSet::new(), Vec::new());
    let mut lowest = usize::MAX;
    for (path, d) in &deltas {
        let (block, layer, key) = split_module(path).with_context(|| {
            format!("{path}: mlx-lm adapters cover transformer blocks only, and this module is outside them")
        })?;
        if layer >= blocks {
            anyhow::bail!("{path} is past the {blocks} layers of {}: pass the base it was trained on with --model", prepared.source.name());
        }
        lowest = lowest.min(layer);
        ranks.insert(d.a.dim(0)?);
        scales.push(d.scale);
        tensors.insert(format!("{block}.{key}.lora_a"), d.a.t()?.contiguous()?);
        tensors.insert(format!("{block}.{key}.lora_b"), d.b.t()?.contiguous()?);
        if let Some(m) = &d.magnitude {
            // mlx-lm's DoRALinear: the same magnitude over the same detached row norm.
            tensors.insert(format!("{block}.{key}.m"), m.clone());
        }
        keys.insert(key);
    }
    if ranks.len() > 1 || scales.iter().any(|s| (s - scales[0]).abs() > 1e-12) {
        anyhow::bail!(
            "the adapter's modules differ in rank ({ranks:?}); mlx-lm adapters have one rank and one scale: export it merged instead"
        );
    }
    let dora = deltas.values().filter(|d| d.magnitude.is_some()).count();
    if dora != 0 && dora != deltas.len() {
        anyhow::bail!(
            "only {dora} of the adapter's {} modules are DoRA; mlx-lm adapters are all LoRA or all DoRA: export it merged instead",
            deltas.len()
        );
    }
    let rank = ranks.into_iter().next().unwrap_or(0);
    let dropout = std::fs::read_to_string(adapter.join("adapter_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("lora_dropout").and_then(serde_json::Value::as_f64))
        .unwrap_or(0.0);
    let num_layers = blocks - lowest;
    let config = serde_json::json!({
        "fine_tune_type": if dora > 0 { "dora" } else { "lora" },
        "num_layers": num_layers,
        "lora_parameters": {
            "rank": rank,
            "scale": scales[0],
            "dropout": dropout,
            "keys": keys.iter().collect::<Vec<_>>(),
        },
    });
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let weights = out.join("adapters.safetensors");
    let tmp = out.join(".adapters.safetensors.partial");
    candle_core::safetensors::save(&tensors.into_iter().collect(), &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &weights).with_context(|| format!("writing {}", weights.display()))?;
    let text = serde_json::to_string_pretty(&config)? + "\n";
    let config_path = out.join("adapter_config.json");
    write_atomic(&config_path, text.as_bytes())
        .with_context(|| format!("writing {}", config_path.display()))?;
    Ok(MlxAdapter {
        dir: out.to_path_buf(),
        modules: deltas.len(),
        num_layers,
    })
}

/// [`export_mlx`] with the model card as `out/README.md`; the files written, for the app.
pub fn export_mlx_with_card(
    adapter: &Path,
    base: &Path,
    out: &Path,
    card: &crate::export::CardInfo,
) -> anyhow::Result<crate::export::Exported> {
    let m = export_mlx(adapter, base, out)?;
    let readme = out.join("README.md");
    write_atomic(&readme, crate::export::mlx_model_card(card).as_bytes())
        .with_context(|| format!("writing {}", readme.display()))?;
    let files = ["adapters.safetensors", "adapter_config.json", "README.md"]
        .iter()
        .map(|f| m.dir.join(f))
        .collect();
    Ok(crate::export::Exported { dir: m.dir, files })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_paths_map_to_mlx_blocks_and_keys() {
        assert_eq!(
            split_module("model.layers.12.self_attn.q_proj"),
            Some(("model.layers.12".into(), 12, "self_attn.q_proj".into()))
        );
        assert_eq!(
            split_module("transformer.h.0.mlp.c_proj"),
            Some(("model.h.0".into(), 0, "mlp.c_proj".into()))
        );
        assert_eq!(split_module("lm_head"), None);
    }
}
