//! Exporting a trained adapter: the PEFT files (`adapter_model.safetensors`,
//! `adapter_config.json`) copied into a folder the person chose, plus a README.md model card
//! (base model, dataset, settings, final losses, date). Every file is written atomically (temp
//! file + rename), so an interrupted export never leaves a half-written adapter. [`merged`]: the
//! base model with the adapter folded in, as a Hugging Face folder.

pub mod gguf;
mod gguf_arch;
pub mod gguf_lora;
mod gguf_types;
mod gguf_vocab;
pub mod job;
pub mod kquant;
pub mod merged;
pub mod mlx;
pub mod ollama;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::model::adapter::{write_atomic, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use crate::train::{Duration, TrainConfig};

/// Why an export failed. The text says what to do next; the path comes last.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The adapter folder lacks one of the PEFT files.
    #[error("the adapter folder has no {file}; export a folder reported by a save (latest or best): {dir}")]
    MissingFile {
        /// The missing file's name (`adapter_model.safetensors` or `adapter_config.json`).
        file: &'static str,
        /// The adapter folder.
        dir: PathBuf,
    },
    /// The destination is the adapter folder being exported.
    #[error("the destination is the adapter folder itself; choose another folder: {0}")]
    SameFolder(PathBuf),
    /// The destination exists and is a file.
    #[error("the destination exists and is not a folder; choose a folder: {0}")]
    NotAFolder(PathBuf),
    /// An adapter file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The destination folder or a file in it could not be created or written.
    #[error("cannot write {path} ({source}); check the folder is writable and the disk has space")]
    Write {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A file-name-safe stem for the model `base` (its Hub name without the org, or its folder or
/// file name), for naming exported files.
pub fn file_stem_of(base: &Path) -> String {
    let name = crate::model::source::ModelSource::open(base)
        .map(|s| s.name())
        .unwrap_or_else(|_| base.display().to_string());
    let name = name.rsplit('/').next().unwrap_or(&name);
    let stem = file_safe(name);
    if stem.is_empty() {
        "model".into()
    } else {
        stem
    }
}

/// `name` with every character but letters, digits, `-`, `_` and `.` replaced by `-`.
pub fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// What the model card says about the run.
#[derive(Debug, Clone, PartialEq)]
pub struct CardInfo {
    /// The base model as people know it: `org/name` for a Hub model, else the folder name.
    pub base_model: String,
    /// Training file name.
    pub dataset: String,
    /// Validation file name, when there was one.
    pub valid_dataset: Option<String>,
    /// The run's settings, listed in the card.
    pub config: TrainConfig,
    /// Optimizer steps done when the adapter was saved.
    pub steps_done: usize,
    /// Optimizer steps the run was set to do.
    pub total_steps: usize,
    /// The last training loss reported, if any step ran.
    pub final_loss: Option<f64>,
    /// The last validation loss, if the run evaluated.
    pub final_val_loss: Option<f64>,
    /// The lowest validation loss of the run, if it evaluated.
    pub best_val_loss: Option<f64>,
    /// `YYYY-MM-DD` (UTC), see [`today`].
    pub date: String,
}

/// Where an export went.
#[derive(Debug, Clone, PartialEq)]
pub struct Exported {
    /// The destination folder.
    pub dir: PathBuf,
    /// Every file written, adapter files first.
    pub files: Vec<PathBuf>,
}

/// Copies the PEFT adapter in `adapter_dir` into `dest` (created if needed; existing adapter files
/// there are replaced) and writes the model card as `dest/README.md`.
pub fn export_adapter(
    adapter_dir: &Path,
    dest: &Path,
    card: &CardInfo,
) -> Result<Exported, ExportError> {
    for file in [ADAPTER_WEIGHTS, ADAPTER_CONFIG] {
        if !adapter_dir.join(file).is_file() {
            return Err(ExportError::MissingFile {
                file,
                dir: adapter_dir.to_path_buf(),
            });
        }
    }
    if dest.exists() && !dest.is_dir() {
        return Err(ExportError::NotAFolder(dest.to_path_buf()));
    }
    std::fs::create_dir_all(dest).map_err(|source| ExportError::Write {
        path: dest.to_path_buf(),
        source,
    })?;
    let same = match (adapter_dir.canonicalize(), dest.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return Err(ExportError::SameFolder(dest.to_path_buf()));
    }
    let mut files = Vec::new();
    for file in [ADAPTER_WEIGHTS, ADAPTER_CONFIG] {
        let from = adapter_dir.join(file);
        let bytes = std::fs::read(&from).map_err(|source| ExportError::Read {
            path: from.clone(),
            source,
        })?;
        let to = dest.join(file);
        write_atomic(&to, &bytes).map_err(|source| ExportError::Write {
            path: to.clone(),
            source,
        })?;
        files.push(to);
    }
    let readme = dest.join("README.md");
    write_atomic(&readme, model_card(card).as_bytes()).map_err(|source| ExportError::Write {
        path: readme.clone(),
        source,
    })?;
    files.push(readme);
    Ok(Exported {
        dir: dest.to_path_buf(),
        files,
    })
}

/// The README.md model card: Hub front matter (so the Hub links the adapter to its base model),
/// then what was trained on what, with which settings, and how it ended.
pub fn model_card(card: &CardInfo) -> String {
    let mut s = String::new();
    front_matter(&mut s, card);
    let _ = writeln!(s);
    let _ = writeln!(s, "# LoRA adapter for {}", card.base_model);
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Trained with FineTune on {} ({} of {} steps) on {}.",
        card.dataset, card.steps_done, card.total_steps, card.date
    );
    results_section(&mut s, card);
    data_section(&mut s, card);
    settings_section(&mut s, &card.config);
    use_section(&mut s, card);
    s
}

/// The front matter, heading and first line of a card for `library`, then the usual sections and
/// `usage` (already formatted Markdown).
fn card_with(
    card: &CardInfo,
    library: &str,
    front: &str,
    title: &str,
    made: &str,
    usage: &str,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "---");
    let _ = writeln!(s, "base_model: {}", yaml_str(&card.base_model));
    let _ = write!(s, "{front}");
    let _ = writeln!(s, "library_name: {library}");
    let _ = writeln!(s, "pipeline_tag: text-generation");
    let _ = writeln!(s, "tags:\n- lora\n- {library}\n- finetune");
    let _ = writeln!(s, "---\n");
    let _ = writeln!(s, "# {title}\n");
    let _ = writeln!(
        s,
        "Trained with FineTune on {} ({} of {} steps) on {}{made}.",
        card.dataset, card.steps_done, card.total_steps, card.date
    );
    results_section(&mut s, card);
    data_section(&mut s, card);
    settings_section(&mut s, &card.config);
    let _ = write!(s, "\n## Use\n\n{usage}");
    s
}

/// The README.md of a merged export: the same facts, front matter and usage of a full model
/// (`base_model_relation: merge`, loaded with transformers alone).
pub fn merged_model_card(card: &CardInfo) -> String {
    let usage = "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n\
model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")\n\
tokenizer = AutoTokenizer.from_pretrained(\"path/to/this/folder\")\n```\n";
    card_with(
        card,
        "transformers",
        "base_model_relation: merge\n",
        &format!("{} with a LoRA adapter merged in", card.base_model),
        "; the adapter is folded into the weights",
        usage,
    )
}

/// The README.md of an MLX adapter export: the adapter's facts and how mlx-lm runs it.
pub fn mlx_model_card(card: &CardInfo) -> String {
    let base = &card.base_model;
    let usage = format!(
        "```sh\nmlx_lm.generate --model {base} --adapter-path path/to/this/folder --prompt \"Hello\"\n\
mlx_lm.fuse --model {base} --adapter-path path/to/this/folder\n```\n"
    );
    card_with(
        card,
        "mlx",
        "",
        &format!("LoRA adapter for {base} (mlx-lm layout)"),
        "",
        &usage,
    )
}

// `writeln!` into a String cannot fail; the results below are ignored on purpose.

/// The Hub's YAML front matter: base model, library, pipeline and tags.
fn front_matter(s: &mut String, card: &CardInfo) {
    let _ = writeln!(s, "---");
    let _ = writeln!(s, "base_model: {}", yaml_str(&card.base_model));
    let _ = writeln!(s, "library_name: peft");
    let _ = writeln!(s, "pipeline_tag: text-generation");
    let _ = writeln!(s, "tags:");
    let _ = writeln!(
        s,
        "- {}",
        yaml_str(&format!("base_model:adapter:{}", card.base_model))
    );
    let _ = writeln!(s, "- lora");
    let _ = writeln!(s, "- finetune");
    let _ = writeln!(s, "---");
}

/// `## Results`: the final and best losses.
fn results_section(s: &mut String, card: &CardInfo) {
    let _ = writeln!(s);
    let _ = writeln!(s, "## Results");
    let _ = writeln!(s);
    let loss = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.4}"));
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(s, "| final train loss | {} |", loss(card.final_loss));
    let _ = writeln!(
        s,
        "| final validation loss | {} |",
        loss(card.final_val_loss)
    );
    let _ = writeln!(s, "| best validation loss | {} |", loss(card.best_val_loss));
}

/// `## Data`: the training file and where validation came from.
fn data_section(s: &mut String, card: &CardInfo) {
    let _ = writeln!(s);
    let _ = writeln!(s, "## Data");
    let _ = writeln!(s);
    let _ = writeln!(s, "- training: {}", card.dataset);
    match &card.valid_dataset {
        Some(v) => {
            let _ = writeln!(s, "- validation: {v}");
        }
        None => {
            let _ = writeln!(
                s,
                "- validation: {:.0}% held out of the training file",
                card.config.valid_fraction * 100.0
            );
        }
    }
}

/// `## Settings`: one table row per training setting.
fn settings_section(s: &mut String, c: &TrainConfig) {
    let _ = writeln!(s);
    let _ = writeln!(s, "## Settings");
    let _ = writeln!(s);
    let _ = writeln!(s, "| setting | value |\n|---|---|");
    let targets = if c.lora.targets.is_empty() {
        "all linear layers".to_owned()
    } else {
        c.lora.targets.join(", ")
    };
    let layers = c.lora.layers.as_ref().map_or_else(
        || "all".to_owned(),
        |l| {
            l.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        },
    );
    let duration = match c.duration {
        Duration::Steps(n) => format!("{n} steps"),
        Duration::Epochs(n) => format!("{n} epochs"),
    };
    let rows: [(&str, String); 16] = [
        ("LoRA rank", c.lora.rank.to_string()),
        ("LoRA alpha", c.lora.alpha.to_string()),
        ("LoRA dropout", c.lora.dropout.to_string()),
        ("target modules", targets),
        ("layers", layers),
        ("learning rate", format!("{:e}", c.lr)),
        ("schedule", format!("{:?}", c.schedule).to_lowercase()),
        ("warmup steps", c.warmup_steps.to_string()),
        ("duration", duration),
        ("batch size", c.batch_size.to_string()),
        ("gradient accumulation", c.grad_accum.to_string()),
        ("max sequence length", c.max_seq_len.to_string()),
        ("loss on completions only", c.mask_prompt.to_string()),
        ("packing", c.packing.to_string()),
        ("max grad norm", c.max_grad_norm.to_string()),
        ("seed", c.seed.to_string()),
    ];
    for (k, v) in rows {
        let _ = writeln!(s, "| {k} | {v} |");
    }
}

/// `## Use`: loading the adapter with PEFT.
fn use_section(s: &mut String, card: &CardInfo) {
    let _ = writeln!(s);
    let _ = writeln!(s, "## Use");
    let _ = writeln!(s);
    let _ = writeln!(s, "```python");
    let _ = writeln!(s, "from peft import PeftModel");
    let _ = writeln!(s, "from transformers import AutoModelForCausalLM");
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "base = AutoModelForCausalLM.from_pretrained({:?})",
        card.base_model
    );
    let _ = writeln!(
        s,
        "model = PeftModel.from_pretrained(base, \"path/to/this/folder\")"
    );
    let _ = writeln!(s, "```");
}

/// Today's date in UTC as `YYYY-MM-DD`.
pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (y, m, d) = civil_date(secs);
    format!("{y:04}-{m:02}-{d:02}")
}

/// (year, month, day) of a Unix time, proleptic Gregorian, UTC (Howard Hinnant's algorithm).
pub fn civil_date(unix_secs: i64) -> (i64, u32, u32) {
    let z = unix_secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A YAML scalar that stays a string whatever it holds.
fn yaml_str(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_adapter() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama/peft-adapter")
    }

    fn card() -> CardInfo {
        CardInfo {
            base_model: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
            dataset: "train.jsonl".into(),
            valid_dataset: None,
            config: TrainConfig {
                lr: 1e-4,
                duration: Duration::Steps(60),
                ..Default::default()
            },
            steps_done: 40,
            total_steps: 60,
            final_loss: Some(1.23456),
            final_val_loss: None,
            best_val_loss: Some(1.5),
            date: "2025-06-09".into(),
        }
    }

    #[test]
    fn export_copies_the_peft_files_and_writes_a_card() {
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("my-adapter");
        let done = export_adapter(&fixture_adapter(), &dest, &card()).unwrap();
        assert_eq!(done.dir, dest);
        assert_eq!(done.files.len(), 3);
        for file in [ADAPTER_WEIGHTS, ADAPTER_CONFIG] {
            assert_eq!(
                std::fs::read(dest.join(file)).unwrap(),
                std::fs::read(fixture_adapter().join(file)).unwrap(),
                "{file}"
            );
        }
        let readme = std::fs::read_to_string(dest.join("README.md")).unwrap();
        assert!(readme.starts_with("---\nbase_model: 'HuggingFaceTB/SmolLM2-135M-Instruct'\n"));
        assert!(readme.contains("| final train loss | 1.2346 |"), "{readme}");
        assert!(readme.contains("| final validation loss | n/a |"));
        assert!(readme.contains("(40 of 60 steps) on 2025-06-09"));
        assert!(readme.contains("| learning rate | 1e-4 |"));
        assert!(readme.contains("| duration | 60 steps |"));
        assert!(readme.contains("10% held out"));
        // No temp files are left behind.
        assert_eq!(std::fs::read_dir(&dest).unwrap().count(), 3);
        // Exporting again replaces the files.
        export_adapter(&fixture_adapter(), &dest, &card()).unwrap();
        assert_eq!(std::fs::read_dir(&dest).unwrap().count(), 3);
    }

    #[test]
    fn export_refuses_what_it_cannot_do() {
        let out = tempfile::tempdir().unwrap();
        let err = export_adapter(out.path(), &out.path().join("x"), &card()).unwrap_err();
        assert!(matches!(
            err,
            ExportError::MissingFile {
                file: ADAPTER_WEIGHTS,
                ..
            }
        ));
        assert!(err.to_string().contains("latest or best"));

        let file = out.path().join("a-file");
        std::fs::write(&file, "x").unwrap();
        let err = export_adapter(&fixture_adapter(), &file, &card()).unwrap_err();
        assert!(matches!(err, ExportError::NotAFolder(_)), "{err}");

        let copy = out.path().join("copy");
        export_adapter(&fixture_adapter(), &copy, &card()).unwrap();
        let err = export_adapter(&copy, &copy, &card()).unwrap_err();
        assert!(matches!(err, ExportError::SameFolder(_)), "{err}");
    }

    #[test]
    fn yaml_strings_are_quoted() {
        assert_eq!(yaml_str("it's"), "'it''s'");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_date(0), (1970, 1, 1));
        assert_eq!(civil_date(951_782_400), (2000, 2, 29));
        assert_eq!(civil_date(1_749_427_200), (2025, 6, 9));
        assert_eq!(civil_date(-86_400), (1969, 12, 31));
        assert_eq!(today().len(), 10);
    }
}
