//! The merged export: the base model with the adapter folded into its weights, as a Hugging Face
//! folder that transformers, mlx-lm's converter or llama.cpp's `convert_hf_to_gguf.py` take like
//! any other model. Each adapted weight becomes `W + scale · B · A` (transposed for
//! `fan_in_fan_out` bases such as GPT-2's Conv1D), computed in f32 and rounded once to the base
//! tensor's own dtype; every other tensor is copied as stored. Shards of at most ~5 GB with an
//! index, as `save_pretrained` writes them; config, tokenizer, chat template and generation config
//! are copied. The folder is written under a temporary name and renamed when complete.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::convert::write::{write_model, PlannedTensor};
use crate::model::adapter::{read_deltas, ModuleDelta};

/// Largest shard, as transformers' `save_pretrained` defaults to.
pub const MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// What a merged export wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Merged {
    /// The folder.
    pub dir: PathBuf,
    /// Safetensors files written.
    pub shards: usize,
    /// Bytes of tensor data.
    pub bytes: u64,
    /// Weights that took an update.
    pub merged: usize,
}

/// Files of the base folder that are weights (not copied: the merge rewrites them).
fn is_weight_file(name: &str) -> bool {
    name.ends_with(".safetensors")
        || name.ends_with(".bin")
        || name.ends_with(".gguf")
        || name.ends_with(".index.json")
        || name.ends_with(".pt")
        || name.ends_with(".pth")
}

/// Every tensor of the base, by name, with its stored size.
fn tensor_plan(st: &MmapedSafetensors) -> Vec<PlannedTensor> {
    let mut plan: Vec<PlannedTensor> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| PlannedTensor {
            bytes: (view.data().len()) as u64,
            name,
        })
        .collect();
    plan.sort_by(|a, b| a.name.cmp(&b.name));
    plan
}

/// Copies the base folder's files that are not weights (config, tokenizer, template, …).
fn copy_side_files(from: &Path, to: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type()?.is_file() && !is_weight_file(&name) {
            std::fs::copy(entry.path(), to.join(&name))
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// `W + scale · B · A` in f32 (DoRA: scaled by its magnitude over the row norm), transposed for
/// `fan_in_fan_out`, rounded to `dtype`.
pub(crate) fn fold(
    w: &Tensor,
    d: &ModuleDelta,
    fan_in_fan_out: bool,
    name: &str,
) -> anyhow::Result<Tensor> {
    let delta = (d.b.matmul(&d.a)? * d.scale)?;
    let delta = if fan_in_fan_out { delta.t()? } else { delta };
    if delta.dims() != w.dims() {
        anyhow::bail!(
            "the adapter's update for {name} is {:?} but the base weight is {:?}: the adapter was trained on another model; pass the base it was trained on with --model",
            delta.dims(),
            w.dims()
        );
    }
    let w32 = w.to_dtype(DType::F32)?;
    let merged = match &d.magnitude {
        // DoRA: the magnitude scales each output row, a row of W (out, in) or a column of
        // GPT-2's Conv1D (in, out).
        Some(m) if fan_in_fan_out => crate::model::dora::fold(&w32.t()?, &delta.t()?, m)?.t()?,
        Some(m) => crate::model::dora::fold(&w32, &delta, m)?,
        None => (w32 + delta)?,
    };
    Ok(merged.to_dtype(w.dtype())?)
}

/// Merges the adapter in `adapter` into the base model `base` (anything `train` takes) and writes
/// the result to `out` (a new or empty folder).
pub fn export_merged(
    adapter: &Path,
    base: &Path,
    out: &Path,
    max_shard_bytes: u64,
) -> anyhow::Result<Merged> {
    if out.exists() && std::fs::read_dir(out).map_or(true, |mut d| d.next().is_some()) {
        anyhow::bail!(
            "the destination exists and is not an empty folder; choose a new folder: {}",
            out.display()
        );
    }
    let prepared = crate::model::source::prepare(base)?;
    let (deltas, fan_in_fan_out) = read_deltas(adapter)?;
    let files = crate::model::weights::checkpoint_files(&prepared.dir)?;
    // SAFETY: the files are mapped read-only and not modified while mapped (the app never writes
    // into a model folder it reads).
    let st = unsafe { MmapedSafetensors::multi(&files) }
        .with_context(|| format!("reading the weights of {}", prepared.dir.display()))?;
    let plan = tensor_plan(&st);
    let names: std::collections::HashSet<&str> = plan.iter().map(|t| t.name.as_str()).collect();
    if let Some(missing) = deltas
        .keys()
        .find(|p| !names.contains(format!("{p}.weight").as_str()))
    {
        anyhow::bail!(
            "the adapter changes {missing}, which {} does not have: it was trained on another model; pass the base it was trained on with --model",
            prepared.source.name()
        );
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".finetune-merge-")
        .tempdir_in(parent)
        .with_context(|| format!("creating a folder in {}", parent.display()))?;
    let mut merged = 0;
    let mut load = |name: &str| -> Result<Tensor, crate::convert::ConvertError> {
        let fail = |reason: String| crate::convert::ConvertError::Tensor {
            name: name.to_owned(),
            reason,
            path: prepared.dir.clone(),
        };
        let w = st
            .load(name, &Device::Cpu)
            .map_err(|e| fail(e.to_string()))?;
        match name.strip_suffix(".weight").and_then(|p| deltas.get(p)) {
            Some(d) => {
                merged += 1;
                fold(&w, d, fan_in_fan_out, name).map_err(|e| fail(format!("{e:#}")))
            }
            None => Ok(w),
        }
    };
    let (shards, bytes) = write_model(tmp.path(), &plan, max_shard_bytes, &mut load)?;
    copy_side_files(&prepared.dir, tmp.path())?;
    let tmp = tmp.keep();
    if out.exists() {
        std::fs::remove_dir(out)
            .with_context(|| format!("replacing the empty {}", out.display()))?;
    }
    std::fs::rename(&tmp, out)
        .with_context(|| format!("moving the merged model to {}", out.display()))?;
    Ok(Merged {
        dir: out.to_path_buf(),
        shards,
        bytes,
        merged,
    })
}

/// [`export_merged`] into `out` with the model card as `out/README.md`; the files written, for the
/// app's export step.
pub fn export_merged_with_card(
    adapter: &Path,
    base: &Path,
    out: &Path,
    card: &crate::export::CardInfo,
) -> anyhow::Result<crate::export::Exported> {
    let m = export_merged(adapter, base, out, MAX_SHARD_BYTES)?;
    let readme = out.join("README.md");
    crate::model::adapter::write_atomic(&readme, crate::export::merged_model_card(card).as_bytes())
        .with_context(|| format!("writing {}", readme.display()))?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&m.dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    Ok(crate::export::Exported { dir: m.dir, files })
}
