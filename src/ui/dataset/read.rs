//! The worker side of the dataset step: what a read depends on ([`DataKey`]), the read itself
//! through the model's tokenizer and chat template ([`read_dataset`]), and what it reports.

use std::path::{Path, PathBuf};

use super::super::settings::Settings;
use crate::data::{
    self, DataErrors, DataOptions, DatasetSummary, ModelTokenizer, PreviewRecord, ValidSource,
};

/// Records shown in the preview.
pub const PREVIEW_RECORDS: usize = 5;

/// What a dataset read depends on; a change means reading again.
#[derive(Debug, Clone, PartialEq)]
pub struct DataKey {
    /// The model as chosen (folder, `.gguf` file or Hub id); its tokenizer and chat template encode
    /// the records.
    pub model_dir: PathBuf,
    /// The training file.
    pub train: PathBuf,
    /// The validation file, if one is chosen.
    pub valid: Option<PathBuf>,
    /// How records are read and encoded (from the settings).
    pub options: DataOptions,
}

impl DataKey {
    /// The key for the current settings, when a model and a training file are chosen.
    pub fn from_settings(s: &Settings) -> Option<Self> {
        let model_dir = s.model_dir.clone()?;
        let train = s.train_data.clone()?;
        Some(Self {
            model_dir,
            train,
            valid: s.valid_data.clone(),
            options: s.to_config(PathBuf::new()).data_options(),
        })
    }
}

/// One problem, where it is.
#[derive(Debug, Clone, PartialEq)]
pub struct ProblemLine {
    /// File name.
    pub file: String,
    /// 1-based line number; `None` for problems of the whole file.
    pub line: Option<usize>,
    /// What is wrong and what to do.
    pub message: String,
}

/// A dataset that read cleanly.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedReport {
    /// Numbers about the training set.
    pub train: DatasetSummary,
    /// Numbers about the validation set, when there is one.
    pub valid: Option<DatasetSummary>,
    /// Where the validation records come from, in words.
    pub valid_note: String,
    /// The first records of the training file as masked/trained pieces.
    pub preview: Vec<PreviewRecord>,
}

/// What reading the dataset found.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Both files read cleanly (or with skipped lines only).
    Loaded(Box<LoadedReport>),
    /// The files have problems; training cannot start until they are fixed.
    Problems(Vec<ProblemLine>),
    /// Something else went wrong (tokenizer missing, worker crashed).
    Failed(String),
}

/// The outcome of reading the dataset, with the key it was read for.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetReport {
    /// What was read; the report is stale when the settings' key differs.
    pub key: DataKey,
    /// What reading found.
    pub outcome: Outcome,
}

impl DatasetReport {
    /// The problems found, or none when the read did not end in problems.
    pub fn problems(&self) -> &[ProblemLine] {
        match &self.outcome {
            Outcome::Problems(p) => p,
            _ => &[],
        }
    }
}

/// Reads the datasets of `key` (runs on a worker thread), calling `progress(bytes read, bytes in
/// all)` as it goes.
pub fn read_dataset(key: &DataKey, progress: &dyn Fn(u64, u64)) -> Outcome {
    // The model's prepared folder (a .bin folder or GGUF file is converted once; this waits for
    // a conversion the model step started).
    let prepared = match crate::model::source::prepare(&key.model_dir) {
        Ok(p) => p,
        Err(e) => return Outcome::Failed(format!("cannot read the model: {e}")),
    };
    let tokenizer = match ModelTokenizer::from_dir(&prepared.dir) {
        Ok(t) => t,
        Err(e) => return Outcome::Failed(format!("cannot read the model's tokenizer: {e}")),
    };
    let loaded = match data::load_with_progress(
        &key.train,
        key.valid.as_deref(),
        &tokenizer,
        &key.options,
        progress,
    ) {
        Ok(l) => l,
        Err(e) => return Outcome::Problems(problem_lines(&e)),
    };
    let preview = match data::preview(&key.train, &tokenizer, &key.options, PREVIEW_RECORDS) {
        Ok(p) => p,
        Err(e) => return Outcome::Problems(problem_lines(&e)),
    };
    let valid_note = match &loaded.valid_source {
        ValidSource::File(p) => format!("validation file {}", file_name(p)),
        ValidSource::HeldOut { fraction, .. } => {
            format!("{:.0}% of the training records held out", fraction * 100.0)
        }
        ValidSource::None => "no validation set".into(),
    };
    Outcome::Loaded(Box::new(LoadedReport {
        train: loaded.train.summary,
        valid: loaded.valid.map(|v| v.summary),
        valid_note,
        preview,
    }))
}

fn problem_lines(e: &DataErrors) -> Vec<ProblemLine> {
    e.errors
        .iter()
        .map(|d| ProblemLine {
            file: file_name(&d.path),
            line: d.line,
            message: d.problem.to_string(),
        })
        .collect()
}

fn file_name(p: &Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}
