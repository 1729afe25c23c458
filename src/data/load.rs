//! One dataset file read as a stream: each line is parsed, checked and encoded, and only its tokens
//! are kept, so a file of any size costs the memory of its tokens (about 5 bytes a token), never of
//! its JSON; progress is reported as bytes read. At most [`MAX_LISTED_PROBLEMS`] problems are kept
//! per file, the rest counted.

use std::path::Path;

use rayon::prelude::*;

use super::dataset::{DataOptions, OverLong};
use super::encode::{Encoder, Sample};
use super::error::{DataError, Problem};
use super::format::{Format, Record};
use super::jsonl::JsonlReader;
use super::summary::LoadCounts;

/// Problems listed per file; a file with more gets one `Problem::MoreProblems` with the count.
pub const MAX_LISTED_PROBLEMS: usize = 1000;

/// Lines read, then encoded in parallel, at a time...
const CHUNK: usize = 2048;
/// ...or fewer when they reach this many bytes (the chunk's JSON is what is held).
const CHUNK_BYTES: u64 = 8 << 20;

/// Where reading stands over all files of one load: `report(done, total)` in bytes.
pub(crate) struct Progress<'a> {
    /// Called with (bytes read over all files, bytes of all files).
    pub report_fn: &'a dyn Fn(u64, u64),
    /// Bytes of the files read before this one.
    pub before: u64,
    /// Bytes of all files.
    pub total: u64,
}

impl Progress<'_> {
    fn report(&self, done_in_file: u64) {
        let done = (self.before + done_in_file).min(self.total);
        (self.report_fn)(done, self.total);
    }
}

/// The problems of one file: the first [`MAX_LISTED_PROBLEMS`] kept in `errors`, the rest counted.
struct Problems<'e> {
    errors: &'e mut Vec<DataError>,
    before: usize,
    more: usize,
}

impl<'e> Problems<'e> {
    fn new(errors: &'e mut Vec<DataError>) -> Self {
        let before = errors.len();
        Self {
            errors,
            before,
            more: 0,
        }
    }

    fn push(&mut self, e: DataError) {
        if self.errors.len() - self.before < MAX_LISTED_PROBLEMS || !e.problem.is_per_record() {
            self.errors.push(e);
        } else {
            self.more += 1;
        }
    }

    /// Adds the count of unlisted problems, if any; returns how many lines had problems.
    fn finish(self, path: &Path) -> usize {
        let listed = self.errors.len() - self.before;
        if self.more > 0 {
            self.errors.push(DataError::new(
                path,
                None,
                Problem::MoreProblems { count: self.more },
            ));
        }
        listed + self.more
    }
}

/// `sample` after the length policy (truncated, or dropped and counted), unless it has nothing to
/// train (counted).
fn length_policy(
    mut sample: Sample,
    options: &DataOptions,
    counts: &mut LoadCounts,
) -> Option<Sample> {
    if sample.len() > options.max_seq_len {
        match options.over_long {
            OverLong::Drop => {
                counts.dropped += 1;
                return None;
            }
            OverLong::Truncate => sample.truncate(options.max_seq_len),
        }
    }
    if sample.trained_tokens() == 0 {
        counts.untrainable += 1;
        return None;
    }
    Some(sample)
}

/// Up to `len` lines (or [`CHUNK_BYTES`] of them) of `reader`; sets `at_end` at the end of the
/// file or on a read error (which is the chunk's last entry).
fn read_chunk(
    reader: &mut JsonlReader,
    len: usize,
    at_end: &mut bool,
) -> Vec<Result<super::jsonl::JsonLine, DataError>> {
    let mut chunk = Vec::with_capacity(len);
    let start = reader.progress().0;
    while chunk.len() < len && reader.progress().0 - start < CHUNK_BYTES {
        match reader.next_line() {
            Ok(Some(line)) => chunk.push(line),
            Ok(None) => *at_end = true,
            Err(e) => {
                chunk.push(Err(e));
                *at_end = true;
            }
        }
        if *at_end {
            break;
        }
    }
    chunk
}

/// One file's good samples and counts; per-record problems go to `errors`.
pub(crate) struct FileData {
    pub(crate) format: Format,
    pub(crate) samples: Vec<Sample>,
    pub(crate) counts: LoadCounts,
}

pub(crate) fn load_file(
    path: &Path,
    encoder: &Encoder<'_>,
    options: &DataOptions,
    max_records: Option<usize>,
    progress: &Progress<'_>,
    errors: &mut Vec<DataError>,
) -> Option<FileData> {
    let mut reader = match JsonlReader::open(path, options.max_line_bytes) {
        Ok(reader) => reader,
        Err(e) => {
            errors.push(e);
            return None;
        }
    };
    let errors_before = errors.len();
    let mut first: Option<(Format, usize)> = None;
    let mut samples = Vec::new();
    let mut counts = LoadCounts::default();
    let mut problems = Problems::new(errors);
    let chunk_len = max_records.map_or(CHUNK, |n| n.clamp(1, CHUNK));
    let mut at_end = false;
    while !at_end && max_records.is_none_or(|n| samples.len() < n) {
        let chunk = read_chunk(&mut reader, chunk_len, &mut at_end);
        // The format check is in file order (the first record sets it); parsing and encoding,
        // the slow part, run on every core. The records' JSON is dropped with the chunk.
        let formats: Vec<_> = chunk
            .iter()
            .map(|line| match line {
                Ok(r) => Some(record_format(&mut first, &r.object, r.line)),
                Err(_) => None,
            })
            .collect();
        let encoded: Vec<Result<Sample, DataError>> = chunk
            .into_par_iter()
            .zip(formats)
            .map(|(line, format)| {
                let record = line?;
                format
                    .unwrap_or(Err(Problem::UnknownFormat))
                    .and_then(|format| Record::parse(format, &record.object))
                    .and_then(|r| r.encode(encoder, record.line))
                    .map_err(|problem| DataError::new(path, Some(record.line), problem))
            })
            .collect();
        progress.report(reader.progress().0);
        for sample in encoded {
            if max_records.is_some_and(|n| samples.len() >= n) {
                break;
            }
            match sample {
                Ok(sample) => samples.extend(length_policy(sample, options, &mut counts)),
                Err(problem) => problems.push(problem),
            }
        }
    }
    counts.skipped_lines = problems.finish(path);
    if errors[errors_before..]
        .iter()
        .any(|e| !e.problem.is_per_record())
    {
        return None;
    }
    let format = match first {
        Some((format, _)) if !samples.is_empty() => format,
        _ => {
            if errors.len() == errors_before || options.skip_bad_lines {
                errors.push(DataError::new(
                    path,
                    None,
                    Problem::NoRecords {
                        max_seq_len: options.max_seq_len,
                        dropped: counts.dropped,
                        untrainable: counts.untrainable,
                        skipped: counts.skipped_lines,
                    },
                ));
            }
            return None;
        }
    };
    Some(FileData {
        format,
        samples,
        counts,
    })
}

/// The record's format, checked against the file's first record (which sets it).
fn record_format(
    first: &mut Option<(Format, usize)>,
    object: &serde_json::Map<String, serde_json::Value>,
    line: usize,
) -> Result<Format, Problem> {
    match (*first, Format::detect(object)) {
        (None, None) => Err(Problem::UnknownFormat),
        (None, Some(format)) => {
            *first = Some((format, line));
            Ok(format)
        }
        (Some((expected, first_line)), None) => Err(Problem::MissingKeys {
            expected,
            first_line,
        }),
        (Some((first_format, first_line)), Some(found)) if found != first_format => {
            Err(Problem::MixedFormats {
                found,
                first: first_format,
                first_line,
            })
        }
        (Some((format, _)), Some(_)) => Ok(format),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_set_by_first_record() {
        let obj = |v: serde_json::Value| v.as_object().cloned().unwrap();
        let mut first = None;
        assert_eq!(
            record_format(&mut first, &obj(serde_json::json!({"x": 1})), 1),
            Err(Problem::UnknownFormat)
        );
        assert_eq!(
            record_format(&mut first, &obj(serde_json::json!({"text": "a"})), 2),
            Ok(Format::Text)
        );
        assert_eq!(
            record_format(
                &mut first,
                &obj(serde_json::json!({"prompt": "a", "completion": "b"})),
                3
            ),
            Err(Problem::MixedFormats {
                found: Format::PromptCompletion,
                first: Format::Text,
                first_line: 2
            })
        );
        assert_eq!(
            record_format(&mut first, &obj(serde_json::json!({"txt": "a"})), 4),
            Err(Problem::MissingKeys {
                expected: Format::Text,
                first_line: 2
            })
        );
    }
}
