//! Run elsewhere (issue 21): the job a person set up, written for the trainers that scale beyond
//! one Mac (TRL + accelerate, Axolotl, mlx-lm), and the adapter such a run writes taken back.
//!
//! The TRL and Axolotl bundles carry FineTune's own encoding of the records (`input_ids`, and
//! `labels` equal to the token where it is trained and -100 where masked), the training records in
//! the order of FineTune's first epoch: they train the same tokens under the same mask, whatever
//! the trainer's own chat-template handling would do. mlx-lm tokenizes itself, so its bundle gets
//! the records as they are with `mask_prompt`. What a target cannot express is listed in its
//! README and returned (the CLI prints it to stderr).
//!
//! The YAML files are written as JSON, which is YAML (a flow mapping), so no YAML writer is needed.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::json;

use crate::data::{self, BatchOptions, Dataset, ModelTokenizer};
use crate::model::adapter::write_atomic;
use crate::train::{Duration, Schedule, TrainConfig};

mod import;
pub use import::{import_adapter, ImportedAdapter};

/// Pinned versions of the TRL bundle's requirements (the ones its CPU run was checked with).
const TRL_REQUIREMENTS: &str = "torch==2.15.0\ntransformers==5.25.0\npeft==0.21.2\ntrl==1.16.0\naccelerate==1.16.0\ndatasets==5.2.0\nsafetensors==0.8.0\n";

/// Which trainer a job is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum JobTarget {
    /// TRL's SFTTrainer + PEFT, launched with accelerate (DDP, FSDP or DeepSpeed ZeRO-3).
    Trl,
    /// An Axolotl YAML over the pre-tokenized records.
    Axolotl,
    /// mlx-lm's `mlx_lm.lora` (one Mac, or several with `mlx.launch`).
    #[value(name = "mlx-lm")]
    MlxLm,
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct JobExport {
    /// The bundle folder.
    pub dir: PathBuf,
    /// Settings the target cannot express, or expresses differently, in words.
    pub notes: Vec<String>,
}

/// Writes the job of `config` for `target` into `dir` (created; files written whole).
pub fn export_job(
    config: &TrainConfig,
    target: JobTarget,
    dir: &Path,
) -> anyhow::Result<JobExport> {
    let prepared = crate::model::source::prepare(&config.model_dir)?;
    std::fs::create_dir_all(dir.join("data"))
        .with_context(|| format!("making the job folder {}", dir.display()))?;
    let model = model_reference(&prepared.dir);
    let notes = match target {
        JobTarget::Trl | JobTarget::Axolotl => {
            let tokenizer = ModelTokenizer::from_dir(&prepared.dir)?;
            let loaded = data::load(
                &config.train_data,
                config.valid_data.as_deref(),
                &tokenizer,
                &config.data_options(),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            write_tokenized(config, &loaded.train, loaded.valid.as_ref(), dir)?;
            let steps = total_steps(config, loaded.train.len());
            if target == JobTarget::Trl {
                write_trl(config, &model, steps, dir)?
            } else {
                write_axolotl(config, &model, steps, dir)?
            }
        }
        JobTarget::MlxLm => write_mlx(config, &model, prepared.config.linear_names(), dir)?,
    };
    write_readme(target, &model, &notes, dir)?;
    Ok(JobExport {
        dir: dir.to_owned(),
        notes,
    })
}

/// A Hub id for a model in the Hugging Face cache (`models--org--name/snapshots/…`), else the
/// folder's absolute path.
fn model_reference(dir: &Path) -> String {
    let from_cache = dir.ancestors().find_map(|a| {
        let name = a.file_name()?.to_str()?;
        let repo = name.strip_prefix("models--")?;
        Some(repo.replacen("--", "/", 1))
    });
    from_cache.unwrap_or_else(|| {
        std::path::absolute(dir)
            .unwrap_or_else(|_| dir.to_owned())
            .display()
            .to_string()
    })
}

/// Optimizer steps of the run (what `--steps` or `--epochs` come to).
fn total_steps(config: &TrainConfig, records: usize) -> usize {
    match config.duration {
        Duration::Steps(n) => n,
        Duration::Epochs(e) => {
            let batches = records.div_ceil(config.batch_size.max(1));
            (batches * e).div_ceil(config.grad_accum.max(1)).max(1)
        }
    }
}

/// `data/train.jsonl` (records in FineTune's first-epoch batch order) and `data/valid.jsonl`, each
/// line `{"input_ids", "attention_mask", "labels"}` without padding.
fn write_tokenized(
    config: &TrainConfig,
    train: &Dataset,
    valid: Option<&Dataset>,
    dir: &Path,
) -> anyhow::Result<()> {
    let options = BatchOptions {
        batch_size: config.batch_size,
        packing: false,
        max_seq_len: config.max_seq_len,
        pad_to_multiple: 1,
    };
    let mut text = String::new();
    for batch in data::batches(train, &options, config.seed, 0) {
        for row in 0..batch.batch_size {
            let span = row * batch.seq_len..(row + 1) * batch.seq_len;
            let (ids, labels, segs) = (
                &batch.input_ids[span.clone()],
                &batch.labels[span.clone()],
                &batch.segment_ids[span],
            );
            let keep = segs.iter().filter(|&&s| s != 0).count();
            push_record(&mut text, &ids[..keep], &labels[..keep]);
        }
    }
    write_atomic(&dir.join("data/train.jsonl"), text.as_bytes())?;
    if let Some(valid) = valid {
        let mut text = String::new();
        for s in &valid.samples {
            let labels: Vec<i64> = s
                .tokens
                .iter()
                .zip(&s.loss_mask)
                .enumerate()
                .map(|(i, (&t, &m))| {
                    if m && i > 0 {
                        i64::from(t)
                    } else {
                        data::IGNORE_INDEX
                    }
                })
                .collect();
            push_record(&mut text, &s.tokens, &labels);
        }
        write_atomic(&dir.join("data/valid.jsonl"), text.as_bytes())?;
    }
    Ok(())
}

fn push_record(text: &mut String, ids: &[u32], labels: &[i64]) {
    let line = json!({"input_ids": ids, "attention_mask": vec![1u8; ids.len()], "labels": labels});
    text.push_str(&line.to_string());
    text.push('\n');
}

fn schedule_name(s: Schedule) -> &'static str {
    match s {
        Schedule::Cosine => "cosine",
        Schedule::Linear => "linear",
        Schedule::Constant => "constant",
    }
}

/// Settings every target leaves out or changes, in words.
fn common_notes(config: &TrainConfig) -> Vec<String> {
    let mut notes = Vec::new();
    if config.packing {
        notes.push("packing: the records are written one per row (FineTune's packed rows keep each record's attention apart; turn on the trainer's own packing if wanted)".into());
    }
    if config.early_stop_patience > 0 {
        notes.push(format!(
            "early stopping after {} evaluations without improvement is not set",
            config.early_stop_patience
        ));
    }
    if config.quantize.is_some() {
        notes.push("QLoRA: FineTune's quantization of the frozen base (GGUF k-quants) is not carried over; the base loads in bf16 (add bitsandbytes 4-bit loading to save memory)".into());
    }
    if config.samples > 0 {
        notes.push("sample answers at each evaluation are not generated".into());
    }
    notes
}

fn write_trl(
    config: &TrainConfig,
    model: &str,
    steps: usize,
    dir: &Path,
) -> anyhow::Result<Vec<String>> {
    let job = json!({
        "model": model,
        "max_steps": steps,
        "dtype": match config.dtype { crate::train::DtypeChoice::F32 => "f32", _ => "bf16" },
        "lora": {
            "rank": config.lora.rank,
            "alpha": config.lora.alpha,
            "dropout": config.lora.dropout,
            "targets": config.lora.targets,
            "layers": config.lora.layers,
            "use_rslora": config.lora.use_rslora,
            "use_dora": config.lora.use_dora,
        },
        "lr": config.lr,
        "schedule": schedule_name(config.schedule),
        "min_lr_ratio": config.min_lr_ratio,
        "warmup_steps": config.warmup_steps,
        "batch_size": config.batch_size,
        "grad_accum": config.grad_accum,
        "max_seq_len": config.max_seq_len,
        "max_grad_norm": config.max_grad_norm,
        "adamw": {
            "beta1": config.adamw.beta1,
            "beta2": config.adamw.beta2,
            "eps": config.adamw.eps,
            "weight_decay": config.adamw.weight_decay,
        },
        "eval_every": config.eval_every,
        "save_every": config.save_every,
        "gradient_checkpointing": config.gradient_checkpointing,
        "seed": config.seed,
    });
    write_atomic(
        &dir.join("job.json"),
        serde_json::to_string_pretty(&job)?.as_bytes(),
    )?;
    write_atomic(&dir.join("train.py"), include_bytes!("job/trl_train.py"))?;
    write_script(&dir.join("launch.sh"), include_bytes!("job/trl_launch.sh"))?;
    write_atomic(&dir.join("requirements.txt"), TRL_REQUIREMENTS.as_bytes())?;
    std::fs::create_dir_all(dir.join("accelerate"))?;
    for (name, text) in [
        ("ddp", &include_bytes!("job/accelerate_ddp.yaml")[..]),
        ("fsdp", &include_bytes!("job/accelerate_fsdp.yaml")[..]),
        ("zero3", &include_bytes!("job/accelerate_zero3.yaml")[..]),
    ] {
        write_atomic(&dir.join(format!("accelerate/{name}.yaml")), text)?;
    }
    let mut notes = common_notes(config);
    if config.eval_batches > 0 {
        notes.push(format!(
            "evaluation uses the whole validation set, not the first {} batches",
            config.eval_batches
        ));
    }
    Ok(notes)
}

fn write_axolotl(
    config: &TrainConfig,
    model: &str,
    steps: usize,
    dir: &Path,
) -> anyhow::Result<Vec<String>> {
    let mut notes = common_notes(config);
    let scheduler = match config.schedule {
        Schedule::Cosine => "cosine",
        Schedule::Linear => "linear",
        Schedule::Constant => "constant",
    };
    if config.min_lr_ratio > 0.0 && config.schedule == Schedule::Linear {
        notes.push(format!(
            "the linear schedule decays to 0, not to {} of the peak",
            config.min_lr_ratio
        ));
    }
    notes.push("warmup starts at 0 (FineTune's first warmup step already uses lr/warmup)".into());
    let mut cfg = json!({
        "base_model": model,
        "adapter": "lora",
        "lora_r": config.lora.rank,
        "lora_alpha": config.lora.alpha,
        "lora_dropout": config.lora.dropout,
        "peft_use_rslora": config.lora.use_rslora,
        "peft_use_dora": config.lora.use_dora,
        "datasets": [{"path": "data/train.jsonl", "ds_type": "json", "split": "train"}],
        "sequence_len": config.max_seq_len,
        "sample_packing": false,
        "micro_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "max_steps": steps,
        "learning_rate": config.lr,
        "lr_scheduler": scheduler,
        "warmup_steps": config.warmup_steps,
        "optimizer": "adamw_torch",
        "adam_beta1": config.adamw.beta1,
        "adam_beta2": config.adamw.beta2,
        "adam_epsilon": config.adamw.eps,
        "weight_decay": config.adamw.weight_decay,
        "max_grad_norm": config.max_grad_norm,
        "gradient_checkpointing": config.gradient_checkpointing,
        "bf16": "auto",
        "seed": config.seed,
        "logging_steps": 1,
        "output_dir": "./output",
    });
    if config.schedule == Schedule::Cosine && config.min_lr_ratio > 0.0 {
        cfg["cosine_min_lr_ratio"] = json!(config.min_lr_ratio);
    }
    if config.lora.targets.is_empty() {
        cfg["lora_target_linear"] = json!(true);
    } else {
        cfg["lora_target_modules"] = json!(config.lora.targets);
    }
    if let Some(layers) = &config.lora.layers {
        cfg["peft_layers_to_transform"] = json!(layers);
    }
    if dir.join("data/valid.jsonl").is_file() {
        cfg["test_datasets"] =
            json!([{"path": "data/valid.jsonl", "ds_type": "json", "split": "train"}]);
        if config.eval_every > 0 {
            cfg["eval_steps"] = json!(config.eval_every);
        }
    }
    if config.save_every > 0 {
        cfg["save_steps"] = json!(config.save_every);
    }
    let text = format!(
        "# Axolotl config of a FineTune job (finetune job export --to axolotl); written as JSON, which is YAML.\n# The datasets are pre-tokenized (input_ids, attention_mask, labels): no `type`, as Axolotl reads them.\n# Run: axolotl train axolotl.yaml\n{}\n",
        serde_json::to_string_pretty(&cfg)?
    );
    write_atomic(&dir.join("axolotl.yaml"), text.as_bytes())?;
    Ok(notes)
}

fn write_mlx(
    config: &TrainConfig,
    model: &str,
    linear_names: &[&str],
    dir: &Path,
) -> anyhow::Result<Vec<String>> {
    let mut notes = common_notes(config);
    notes.push("mlx-lm applies the chat template and prompt mask itself: the tokens can differ from FineTune's where its template handling differs".into());
    std::fs::copy(&config.train_data, dir.join("data/train.jsonl"))
        .with_context(|| format!("copying {}", config.train_data.display()))?;
    match &config.valid_data {
        Some(v) => {
            std::fs::copy(v, dir.join("data/valid.jsonl"))
                .with_context(|| format!("copying {}", v.display()))?;
        }
        None => notes.push("no validation file: mlx-lm does not hold records out; data/valid.jsonl is the first training records".into()),
    }
    if config.valid_data.is_none() {
        let text = std::fs::read_to_string(&config.train_data)?;
        let head: String = text.lines().take(8).map(|l| format!("{l}\n")).collect();
        write_atomic(&dir.join("data/valid.jsonl"), head.as_bytes())?;
    }
    let iters = match config.duration {
        Duration::Steps(n) => n,
        Duration::Epochs(e) => {
            notes.push(format!("{e} epochs are written as iterations of one batch each (1000 per epoch); set MAX_STEPS"));
            e * 1000
        }
    };
    if config.grad_accum > 1 {
        notes.push(format!(
            "gradient accumulation {} is written as grad_accumulation_steps",
            config.grad_accum
        ));
    }
    // mlx-lm names a module by its path inside a block: attention under self_attn, the rest
    // under mlp (Llama-family layout).
    let keys: Vec<String> = if config.lora.targets.is_empty() {
        linear_names
            .iter()
            .map(|t| {
                let attn = ["q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"].contains(t);
                format!("{}.{t}", if attn { "self_attn" } else { "mlp" })
            })
            .collect()
    } else {
        config.lora.targets.clone()
    };
    if config.lora.layers.is_some() {
        notes.push(
            "chosen layers: mlx-lm tunes the last `num_layers` layers; all layers are written"
                .into(),
        );
    }
    let cfg = mlx_config(config, model, iters, keys);
    let text = format!(
        "# mlx_lm.lora config of a FineTune job (finetune job export --to mlx-lm); written as JSON, which is YAML.\n{}\n",
        serde_json::to_string_pretty(&cfg)?
    );
    write_atomic(&dir.join("lora.yaml"), text.as_bytes())?;
    write_script(&dir.join("launch.sh"), include_bytes!("job/mlx_launch.sh"))?;
    write_atomic(&dir.join("requirements.txt"), b"mlx-lm==0.32.2\n")?;
    Ok(notes)
}

/// mlx-lm's `lora.yaml` settings for `config`.
fn mlx_config(
    config: &TrainConfig,
    model: &str,
    iters: usize,
    keys: Vec<String>,
) -> serde_json::Value {
    let warmup = config.warmup_steps;
    json!({
        "model": model,
        "train": true,
        "data": "data",
        "fine_tune_type": if config.lora.use_dora { "dora" } else { "lora" },
        "num_layers": -1,
        "batch_size": config.batch_size,
        "grad_accumulation_steps": config.grad_accum,
        "iters": iters,
        "learning_rate": config.lr,
        "max_seq_length": config.max_seq_len,
        "mask_prompt": config.mask_prompt,
        "grad_checkpoint": config.gradient_checkpointing,
        "steps_per_report": 1,
        "steps_per_eval": if config.eval_every > 0 { config.eval_every } else { iters.max(1) },
        "save_every": if config.save_every > 0 { config.save_every } else { iters.max(1) },
        "seed": config.seed,
        "optimizer": "adamw",
        "optimizer_config": {"adamw": {"betas": [config.adamw.beta1, config.adamw.beta2], "eps": config.adamw.eps, "weight_decay": config.adamw.weight_decay}},
        "lr_schedule": {
            "name": match config.schedule { Schedule::Constant | Schedule::Linear => "linear_schedule", Schedule::Cosine => "cosine_decay" },
            "warmup": warmup,
            "arguments": match config.schedule {
                Schedule::Cosine => json!([config.lr, iters.saturating_sub(warmup).max(1), config.lr * config.min_lr_ratio]),
                Schedule::Linear => json!([config.lr, config.lr * config.min_lr_ratio, iters.saturating_sub(warmup).max(1)]),
                Schedule::Constant => json!([config.lr, config.lr, 1]),
            },
        },
        "lora_parameters": {
            "keys": keys,
            "rank": config.lora.rank,
            "scale": config.lora.scale(),
            "dropout": config.lora.dropout,
        },
    })
}

/// Writes an executable script.
fn write_script(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    write_atomic(path, bytes)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

fn write_readme(
    target: JobTarget,
    model: &str,
    notes: &[String],
    dir: &Path,
) -> anyhow::Result<()> {
    let how = match target {
        JobTarget::Trl => "Install the pinned requirements (`pip install -r requirements.txt`), then\n\n    NUM_PROCESSES=8 bash launch.sh                 # DDP over 8 GPUs\n    ACCELERATE=fsdp NUM_PROCESSES=8 bash launch.sh  # FSDP, for models that do not fit one GPU\n    ACCELERATE=zero3 bash launch.sh                # DeepSpeed ZeRO-3 (pip install deepspeed)\n    CPU=1 NUM_PROCESSES=2 MAX_STEPS=3 bash launch.sh  # a dry run on the CPU\n\nThe adapter is written to `output/adapter` (PEFT); `finetune job import output` takes it back.\nThe data in `data/` is FineTune's encoding of the records: the same tokens and loss mask.",
        JobTarget::Axolotl => "Install Axolotl, then `axolotl train axolotl.yaml`. The data in `data/` is FineTune's\nencoding of the records (pre-tokenized: the same tokens and loss mask). The adapter is written\nto `output/`; `finetune job import output` takes it back.",
        JobTarget::MlxLm => "Install mlx-lm (`pip install -r requirements.txt`), then `bash launch.sh` (env MAX_STEPS,\nMODEL). Across several Macs, see the comment at the top of launch.sh. The adapter is written to\n`output/adapter`; `finetune job import output/adapter` takes it back.",
    };
    let mut text = format!(
        "# FineTune job: {}\n\nBase model: `{model}` (set MODEL to use another path or Hub id).\n\n{how}\n",
        match target {
            JobTarget::Trl => "TRL + accelerate",
            JobTarget::Axolotl => "Axolotl",
            JobTarget::MlxLm => "mlx-lm",
        }
    );
    if !notes.is_empty() {
        text.push_str("\n## Not carried over, or carried differently\n\n");
        for n in notes {
            text.push_str(&format!("- {n}\n"));
        }
    }
    write_atomic(&dir.join("README.md"), text.as_bytes())?;
    Ok(())
}
