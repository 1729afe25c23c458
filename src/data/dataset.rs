//! Loading datasets: read JSONL, detect the format from the first record, check and encode every
//! record, apply the length policy, and split off a validation set when no file is given. All
//! problems are collected (`DataErrors`) unless `skip_bad_lines` skips the per-record ones.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::encode::{Encoder, PromptCompletionStyle, Sample};
use super::error::{DataError, DataErrors, Problem};
use super::format::Format;
use super::jsonl::DEFAULT_MAX_LINE_BYTES;
use super::load::{load_file, FileData, Progress};
use super::summary::{DatasetSummary, LoadCounts, TemplateUse};
use super::tokenizer::{ModelTokenizer, TokenizerError};

/// What to do with records longer than `max_seq_len` tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverLong {
    /// Keep the first `max_seq_len` tokens (counted in the summary).
    #[default]
    Truncate,
    /// Leave the record out (counted in the summary).
    Drop,
}

/// How datasets are read and encoded.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct DataOptions {
    /// Longest record in tokens. Default 2048.
    pub max_seq_len: usize,
    /// Loss only on completions and assistant turns. Default on.
    pub mask_prompt: bool,
    /// How prompt/completion records are rendered. Default `Auto` (chat template when the model
    /// has one).
    pub prompt_completion: PromptCompletionStyle,
    /// Records over `max_seq_len`: truncate (default) or drop.
    pub over_long: OverLong,
    /// Skip bad records (counted and kept in `LoadedData::skipped`) instead of failing. Default off.
    pub skip_bad_lines: bool,
    /// Longest accepted line in bytes. Default 1 MiB.
    pub max_line_bytes: usize,
    /// Share of records held out for validation when no validation file is given. Default 0.1.
    pub valid_fraction: f64,
    /// Seed of the hold-out split. Default 0.
    pub seed: u64,
}

impl Default for DataOptions {
    fn default() -> Self {
        Self {
            max_seq_len: 2048,
            mask_prompt: true,
            prompt_completion: PromptCompletionStyle::Auto,
            over_long: OverLong::Truncate,
            skip_bad_lines: false,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            valid_fraction: 0.1,
            seed: 0,
        }
    }
}

/// Encoded records of one dataset, ready for batching.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// The file the records came from.
    pub path: PathBuf,
    /// The encoded records, in file order (after the length policy and any hold-out).
    pub samples: Vec<Sample>,
    /// Padding id for batches (the tokenizer's pad token, else EOS, else 0).
    pub pad_id: u32,
    /// Counts, lengths and what loading did, for the CLI and the UI.
    pub summary: DatasetSummary,
}

/// Where the validation set came from.
#[derive(Debug, Clone, PartialEq)]
pub enum ValidSource {
    /// A validation file.
    File(PathBuf),
    /// Held out of the training file.
    /// Held out of the training file.
    HeldOut {
        /// Share of the training records held out, 0..1 (`DataOptions::valid_fraction`).
        fraction: f64,
        /// Seed of the split (`DataOptions::seed`).
        seed: u64,
    },
    /// No validation (a one-record training file or `valid_fraction` 0).
    None,
}

/// Training and validation data.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedData {
    /// The training set (without any held-out records).
    pub train: Dataset,
    /// The validation set: the validation file's records, the held-out ones, or none.
    pub valid: Option<Dataset>,
    /// Where `valid` came from.
    pub valid_source: ValidSource,
    /// Problems skipped because of `skip_bad_lines` (empty otherwise).
    pub skipped: Vec<DataError>,
}

/// A piece of a previewed record: masked (prompt) or trained text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviewSegment {
    /// The decoded text of this piece.
    pub text: String,
    /// Whether its tokens are training targets (false: masked prompt).
    pub trained: bool,
}

/// A record as the model sees it, in masked/trained pieces, for the UI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviewRecord {
    /// 1-based line in the file.
    pub line: usize,
    /// The record's text in order, split where masking starts or stops.
    pub segments: Vec<PreviewSegment>,
}

/// Loads the training file and the validation file (or holds out `valid_fraction` of the training
/// records, at least one when there are two or more). Fails with every problem found.
pub fn load(
    train: &Path,
    valid: Option<&Path>,
    tokenizer: &ModelTokenizer,
    options: &DataOptions,
) -> Result<LoadedData, DataErrors> {
    load_with_progress(train, valid, tokenizer, options, &|_, _| {})
}

/// [`load`], calling `progress(bytes read, bytes in all)` as the files are read (every MiB).
pub fn load_with_progress(
    train: &Path,
    valid: Option<&Path>,
    tokenizer: &ModelTokenizer,
    options: &DataOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<LoadedData, DataErrors> {
    let encoder = Encoder::new(tokenizer, options.mask_prompt, options.prompt_completion)
        .map_err(|p| DataErrors::single(DataError::new(train, None, p)))?;
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let train_bytes = size(train);
    let total = train_bytes + valid.map_or(0, size);
    let mut errors = Vec::new();
    let at = |before| Progress {
        report_fn: progress,
        before,
        total,
    };
    let train_file = load_file(train, &encoder, options, None, &at(0), &mut errors);
    let valid_file =
        valid.map(|path| load_file(path, &encoder, options, None, &at(train_bytes), &mut errors));
    let fatal = errors.iter().any(|e| !e.problem.is_per_record());
    if fatal || (!errors.is_empty() && !options.skip_bad_lines) {
        return Err(DataErrors { errors });
    }
    // A file that yielded nothing has pushed its reason to `errors`.
    let Some(train_file) = train_file else {
        return Err(DataErrors { errors });
    };
    let valid_file = match valid_file {
        Some(None) => return Err(DataErrors { errors }),
        Some(Some(file)) => Some(file),
        None => None,
    };
    let summarizer = Summarizer {
        encoder: &encoder,
        mask_prompt: options.mask_prompt,
        pad_id: tokenizer.pad_id(),
    };
    let (train_set, valid_set, valid_source) = match (valid, valid_file) {
        (Some(path), Some(v)) => (
            summarizer.dataset(train, train_file),
            Some(summarizer.dataset(path, v)),
            ValidSource::File(path.to_owned()),
        ),
        _ => held_out(&summarizer, train, train_file, options),
    };
    Ok(LoadedData {
        train: train_set,
        valid: valid_set,
        valid_source,
        skipped: errors,
    })
}

/// Turns one file's samples into a [`Dataset`] with its summary.
struct Summarizer<'a, 'e> {
    encoder: &'a Encoder<'e>,
    mask_prompt: bool,
    pad_id: u32,
}

impl Summarizer<'_, '_> {
    /// Whether records of `format` went through the model's chat template, the fallback, or none.
    fn template(&self, format: Format) -> TemplateUse {
        if format.is_chat()
            || format == Format::PromptCompletion && self.encoder.prompt_completion_as_chat()
        {
            if self.encoder.uses_fallback_template() {
                TemplateUse::Fallback
            } else {
                TemplateUse::Model
            }
        } else {
            TemplateUse::None
        }
    }

    fn dataset(&self, path: &Path, file: FileData) -> Dataset {
        Dataset {
            path: path.to_owned(),
            summary: DatasetSummary::compute(
                &file.samples,
                file.format,
                self.template(file.format),
                self.mask_prompt,
                file.counts,
            ),
            samples: file.samples,
            pad_id: self.pad_id,
        }
    }
}

/// The training set and the validation records held out of it (`options.valid_fraction`, seeded),
/// or no validation when the file is too small to spare any.
fn held_out(
    summarizer: &Summarizer<'_, '_>,
    train: &Path,
    file: FileData,
    options: &DataOptions,
) -> (Dataset, Option<Dataset>, ValidSource) {
    let held = hold_out(file.samples.len(), options.valid_fraction, options.seed);
    if held.is_empty() {
        return (summarizer.dataset(train, file), None, ValidSource::None);
    }
    let format = file.format;
    let (valid_samples, train_samples) = take_indices(file.samples, &held);
    let train_file = FileData {
        format,
        samples: train_samples,
        counts: file.counts,
    };
    let valid_file = FileData {
        format,
        samples: valid_samples,
        counts: LoadCounts::default(),
    };
    (
        summarizer.dataset(train, train_file),
        Some(summarizer.dataset(train, valid_file)),
        ValidSource::HeldOut {
            fraction: options.valid_fraction,
            seed: options.seed,
        },
    )
}

/// The first `n` good records of `path` as masked/trained pieces, for a quick look before loading
/// the whole file. Bad lines among them fail it unless `options.skip_bad_lines`.
pub fn preview(
    path: &Path,
    tokenizer: &ModelTokenizer,
    options: &DataOptions,
    n: usize,
) -> Result<Vec<PreviewRecord>, DataErrors> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let encoder = Encoder::new(tokenizer, options.mask_prompt, options.prompt_completion)
        .map_err(|p| DataErrors::single(DataError::new(path, None, p)))?;
    let mut errors = Vec::new();
    let quiet = Progress {
        report_fn: &|_, _| {},
        before: 0,
        total: 0,
    };
    let file = load_file(path, &encoder, options, Some(n), &quiet, &mut errors);
    let fatal = errors.iter().any(|e| !e.problem.is_per_record());
    match file {
        Some(file) if !fatal && (errors.is_empty() || options.skip_bad_lines) => {
            let mut records = Vec::with_capacity(file.samples.len());
            for sample in file.samples.iter().take(n) {
                records.push(preview_sample(tokenizer, sample).map_err(|e| {
                    DataErrors::single(DataError::new(
                        path,
                        Some(sample.line),
                        Problem::Tokenize(e.to_string()),
                    ))
                })?);
            }
            Ok(records)
        }
        _ => Err(DataErrors { errors }),
    }
}

impl Dataset {
    /// Number of records.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there are no records.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The format of the file's records (from the first record).
    pub fn format(&self) -> Format {
        self.summary.format
    }

    /// The first `n` records as masked/trained pieces of text.
    pub fn preview(
        &self,
        tokenizer: &ModelTokenizer,
        n: usize,
    ) -> Result<Vec<PreviewRecord>, TokenizerError> {
        self.samples
            .iter()
            .take(n)
            .map(|s| preview_sample(tokenizer, s))
            .collect()
    }
}

/// Decodes runs of equally masked tokens. A run boundary inside a multi-byte character shows as
/// U+FFFD on both sides; the tokens are what trains, so the preview follows them.
fn preview_sample(
    tokenizer: &ModelTokenizer,
    sample: &Sample,
) -> Result<PreviewRecord, TokenizerError> {
    let mut segments = Vec::new();
    let mut start = 0;
    while start < sample.tokens.len() {
        let trained = sample.loss_mask[start];
        let len = sample.loss_mask[start..]
            .iter()
            .take_while(|&&m| m == trained)
            .count();
        segments.push(PreviewSegment {
            text: tokenizer.decode(&sample.tokens[start..start + len])?,
            trained,
        });
        start += len;
    }
    Ok(PreviewRecord {
        line: sample.line,
        segments,
    })
}

/// Indices (sorted) of the records held out for validation: `round(n * fraction)`, at least 1 and
/// at most `n - 1` when `n >= 2`; none for `fraction <= 0` or `n < 2`. Deterministic for a seed.
pub fn hold_out(n: usize, fraction: f64, seed: u64) -> Vec<usize> {
    if n < 2 || fraction.is_nan() || fraction <= 0.0 {
        return Vec::new();
    }
    let k = ((n as f64 * fraction).round() as usize).clamp(1, n - 1);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let mut held = order[..k].to_vec();
    held.sort_unstable();
    held
}

/// Splits `samples` into (those at `indices` (sorted), the rest), keeping file order in both.
fn take_indices(samples: Vec<Sample>, indices: &[usize]) -> (Vec<Sample>, Vec<Sample>) {
    let mut taken = Vec::with_capacity(indices.len());
    let mut rest = Vec::with_capacity(samples.len().saturating_sub(indices.len()));
    let mut next = indices.iter().peekable();
    for (i, sample) in samples.into_iter().enumerate() {
        if next.peek() == Some(&&i) {
            next.next();
            taken.push(sample);
        } else {
            rest.push(sample);
        }
    }
    (taken, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_out_sizes_and_determinism() {
        assert!(hold_out(1, 0.1, 0).is_empty());
        assert!(hold_out(10, 0.0, 0).is_empty());
        assert_eq!(hold_out(2, 0.1, 0).len(), 1);
        assert_eq!(hold_out(5, 0.99, 0).len(), 4);
        assert_eq!(hold_out(200, 0.1, 0).len(), 20);
        assert_eq!(hold_out(200, 0.1, 7), hold_out(200, 0.1, 7));
        assert_ne!(hold_out(200, 0.1, 7), hold_out(200, 0.1, 8));
        let h = hold_out(200, 0.1, 7);
        assert!(h.windows(2).all(|w| w[0] < w[1]) && h.iter().all(|&i| i < 200));
    }

    #[test]
    fn take_indices_keeps_order() {
        let samples: Vec<Sample> = (1..=5)
            .map(|line| Sample {
                line,
                tokens: vec![1, 2],
                loss_mask: vec![false, true],
                truncated: false,
                approximate_mask: false,
            })
            .collect();
        let (taken, rest) = take_indices(samples, &[1, 3]);
        assert_eq!(taken.iter().map(|s| s.line).collect::<Vec<_>>(), vec![2, 4]);
        assert_eq!(
            rest.iter().map(|s| s.line).collect::<Vec<_>>(),
            vec![1, 3, 5]
        );
    }
}
