//! `finetune job import DIR`: the adapter a job run elsewhere wrote, found under DIR and made
//! loadable here. A PEFT adapter (TRL, Axolotl) is used where it is; an mlx-lm adapter
//! (`adapters.safetensors`, `<module>.lora_a` = Aᵀ, `lora_b` = Bᵀ, one `scale`) is written beside
//! it in PEFT's layout (`peft/`), which FineTune, PEFT and the GGUF export read.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{Device, Tensor};

use crate::model::adapter::{write_atomic, ADAPTER_CONFIG, ADAPTER_WEIGHTS};

/// What was found.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportedAdapter {
    /// A PEFT adapter folder FineTune loads.
    pub dir: PathBuf,
    /// Whether it was converted from mlx-lm's layout.
    pub from_mlx: bool,
}

/// Folders under `dir` (itself first, then breadth-first, three levels down), newest checkpoint
/// last so that a trainer's final `adapter/` wins over its `checkpoint-N/` folders.
fn candidates(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_owned()];
    let mut level = vec![dir.to_owned()];
    for _ in 0..3 {
        let mut next = Vec::new();
        for d in &level {
            if let Ok(entries) = std::fs::read_dir(d) {
                let mut subs: Vec<PathBuf> = entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.is_dir())
                    .collect();
                subs.sort();
                next.extend(subs);
            }
        }
        out.extend(next.iter().cloned());
        level = next;
    }
    out
}

/// Finds the adapter under `dir` (PEFT first, then mlx-lm's) and returns a folder FineTune loads.
pub fn import_adapter(dir: &Path) -> anyhow::Result<ImportedAdapter> {
    let found = candidates(dir);
    // A trainer's final `adapter` folder, else any PEFT folder (the last checkpoint sorts last).
    let peft: Vec<&PathBuf> = found
        .iter()
        .filter(|d| d.join(ADAPTER_CONFIG).is_file() && d.join(ADAPTER_WEIGHTS).is_file())
        .collect();
    if let Some(d) = peft
        .iter()
        .find(|d| d.file_name().is_some_and(|n| n == "adapter"))
        .or(peft.last())
    {
        return Ok(ImportedAdapter {
            dir: (*d).clone(),
            from_mlx: false,
        });
    }
    if let Some(d) = found.iter().find(|d| {
        d.join("adapters.safetensors").is_file() && d.join("adapter_config.json").is_file()
    }) {
        return Ok(ImportedAdapter {
            dir: mlx_to_peft(d)?,
            from_mlx: true,
        });
    }
    anyhow::bail!(
        "no adapter under {}: expected adapter_config.json with adapter_model.safetensors (PEFT: TRL, Axolotl) or adapters.safetensors (mlx-lm)",
        dir.display()
    )
}

/// Writes the mlx-lm adapter in `dir` as a PEFT adapter in `dir/peft`; returns that folder.
fn mlx_to_peft(dir: &Path) -> anyhow::Result<PathBuf> {
    let config_path = dir.join("adapter_config.json");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?,
    )
    .with_context(|| format!("parsing {}", config_path.display()))?;
    let params = &config["lora_parameters"];
    let scale = params["scale"]
        .as_f64()
        .with_context(|| format!("no lora_parameters.scale in {}", config_path.display()))?;
    if config["fine_tune_type"].as_str() == Some("dora") {
        anyhow::bail!(
            "{}: importing mlx-lm DoRA adapters is not supported yet; export LoRA from mlx-lm",
            dir.display()
        );
    }
    let weights = dir.join("adapters.safetensors");
    let tensors = candle_core::safetensors::load(&weights, &Device::Cpu)
        .with_context(|| format!("reading {}", weights.display()))?;
    let mut out: HashMap<String, Tensor> = HashMap::new();
    let (mut ranks, mut targets) = (BTreeSet::new(), BTreeSet::new());
    for (name, t) in &tensors {
        let (module, peft) = if let Some(m) = name.strip_suffix(".lora_a") {
            ranks.insert(t.dim(1)?);
            (m, "lora_A")
        } else if let Some(m) = name.strip_suffix(".lora_b") {
            (m, "lora_B")
        } else {
            anyhow::bail!("{name} in {} is not a LoRA tensor", weights.display());
        };
        if let Some(last) = module.rsplit('.').next() {
            targets.insert(last.to_owned());
        }
        out.insert(
            format!("base_model.model.{module}.{peft}.weight"),
            t.t()?.contiguous()?,
        );
    }
    let rank = match ranks.iter().collect::<Vec<_>>().as_slice() {
        [r] => **r,
        _ => anyhow::bail!(
            "{}: modules of different ranks {ranks:?}",
            weights.display()
        ),
    };
    let peft_dir = dir.join("peft");
    std::fs::create_dir_all(&peft_dir)?;
    let tmp = peft_dir.join(format!("{ADAPTER_WEIGHTS}.tmp"));
    candle_core::safetensors::save(&out, &tmp)?;
    std::fs::rename(&tmp, peft_dir.join(ADAPTER_WEIGHTS))?;
    let peft_config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": scale * rank as f64,
        "lora_dropout": params["dropout"].as_f64().unwrap_or(0.0),
        "target_modules": targets,
        "bias": "none",
        "use_rslora": false,
        "use_dora": false,
        "base_model_name_or_path": config["model"],
    });
    write_atomic(
        &peft_dir.join(ADAPTER_CONFIG),
        serde_json::to_string_pretty(&peft_config)?.as_bytes(),
    )?;
    Ok(peft_dir)
}
