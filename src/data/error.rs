//! Problems found while loading a dataset. Each `DataError` names the file, the 1-based line when
//! the problem belongs to one, and what is wrong with a hint at what to do; `DataErrors` collects all
//! of them so a person can fix a file in one pass instead of meeting one error per run.

use std::fmt;
use std::path::PathBuf;

use super::format::Format;

/// What is wrong. The text says what to do next; `DataError` adds the line in front and the path at
/// the end (house style).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Problem {
    /// The file could not be opened or read (missing, a folder, no permission); holds the OS
    /// message.
    #[error("could not read the file ({0}); check that it exists and is readable")]
    Io(String),
    /// More per-record problems than are listed were found (the list keeps the first ones).
    #[error("{count} more lines have problems; fix the ones listed first and read the file again")]
    MoreProblems {
        /// Problems found after the listed ones.
        count: usize,
    },
    /// The file has no non-blank line.
    #[error("the file has no records; put one JSON object per line (see README#datasets)")]
    EmptyFile,
    /// A line is longer than the reader's line size limit (it is not parsed).
    #[error("the line is {bytes} bytes, over the {limit}-byte limit; shorten the record or raise the line size limit")]
    LineTooLong {
        /// Length of the line in bytes.
        bytes: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// A line is not valid UTF-8.
    #[error("invalid UTF-8 at byte {offset} of the line; save the file as UTF-8")]
    InvalidUtf8 {
        /// Byte offset in the line where the invalid sequence starts (the valid prefix's length).
        offset: usize,
    },
    /// A line is not one complete JSON value.
    #[error(
        "invalid JSON at column {column} ({reason}); each line must hold one complete JSON object"
    )]
    InvalidJson {
        /// 1-based column where serde_json gave up.
        column: usize,
        /// serde_json's description, without its position.
        reason: String,
    },
    /// A line holds valid JSON that is not an object (an array, a string, ...).
    #[error("expected a JSON object such as {{\"text\": \"...\"}}, found {found}")]
    NotAnObject {
        /// The kind found, as a phrase ("an array").
        found: &'static str,
    },
    /// The first records match none of the supported formats (text, prompt/completion, messages,
    /// instruction/output, conversations).
    #[error("expected a \"text\" string, \"prompt\"/\"completion\" keys, a \"messages\" array, \"instruction\"/\"output\" keys or a \"conversations\" array (see README#datasets)")]
    UnknownFormat,
    /// A record lacks the keys of the format the first record set.
    #[error("expected {} like the first record on line {first_line} (see README#datasets)", .expected.expected_keys())]
    MissingKeys {
        /// The file's format, set by its first record.
        expected: Format,
        /// The line of that first record.
        first_line: usize,
    },
    /// A record is in another supported format than the first record's.
    #[error("this record is in the {found} format but line {first_line} started a {first} dataset; use one format per file (see README#datasets)")]
    MixedFormats {
        /// This record's format.
        found: Format,
        /// The file's format, set by its first record.
        first: Format,
        /// The line of that first record.
        first_line: usize,
    },
    /// A key the record's format needs is absent.
    #[error("missing \"{key}\"; {hint}")]
    MissingField {
        /// The key, with its path inside the record (`messages[2].role`).
        key: String,
        /// What the record should hold instead.
        hint: &'static str,
    },
    /// A key holds the wrong JSON type (a number where a string belongs, ...).
    #[error("\"{key}\" should be {expected}, found {found}")]
    WrongType {
        /// The key, with its path inside the record.
        key: String,
        /// The type it should have, as a phrase ("a string").
        expected: &'static str,
        /// The type it has, as a phrase.
        found: &'static str,
    },
    /// A text the record trains on (a prompt, a completion, a user or assistant turn) is blank.
    #[error("\"{key}\" is empty; fill it in or remove the record")]
    EmptyText {
        /// The key, with its path inside the record.
        key: String,
    },
    /// A message's role is not one the format knows.
    #[error("unknown role \"{role}\" in \"{key}\"; use one of {allowed}")]
    UnknownRole {
        /// The role found.
        role: String,
        /// The key, with its path inside the record (`messages[0].role`).
        key: String,
        /// The roles allowed, as text for the message.
        allowed: &'static str,
    },
    /// With prompt masking on, a conversation has no assistant turn, so no token would be trained
    /// on.
    #[error(
        "the conversation has no assistant turn to train on; add one or turn off prompt masking"
    )]
    NoAssistantTurn,
    /// The model's chat template raised an error while rendering this record; holds its message.
    #[error(
        "the chat template failed on this record ({0}); check the turn order the model expects"
    )]
    Template(String),
    /// The model's chat template does not compile; holds the parser's message. Stops the whole
    /// dataset, not one record.
    #[error("could not compile the model's chat template ({0}); fix chat_template in the model's tokenizer files or update FineTune")]
    TemplateSyntax(String),
    /// The tokenizer failed on the rendered text; holds its message.
    #[error("could not tokenize the record ({0})")]
    Tokenize(String),
    /// Every record was dropped, unusable or skipped, so nothing is left to train on.
    #[error("no records left to train on ({dropped} longer than max_seq_len {max_seq_len} were dropped, {untrainable} had no token to train on, {skipped} bad lines skipped); raise max_seq_len, truncate over-long records or fix the file")]
    NoRecords {
        /// The length limit records were checked against, in tokens.
        max_seq_len: usize,
        /// Records dropped for being longer than `max_seq_len`.
        dropped: usize,
        /// Records with no token left to train on (everything masked).
        untrainable: usize,
        /// Bad lines skipped by `skip_bad_lines`.
        skipped: usize,
    },
}

impl Problem {
    /// Whether `skip_bad_lines` may skip it: problems of one record, not of the whole file or model.
    pub fn is_per_record(&self) -> bool {
        !matches!(
            self,
            Problem::Io(_)
                | Problem::EmptyFile
                | Problem::TemplateSyntax(_)
                | Problem::NoRecords { .. }
        )
    }
}

/// Name of a JSON value's kind for "found ..." messages.
pub(crate) fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// One problem, where it is.
#[derive(Debug, Clone, PartialEq)]
pub struct DataError {
    /// The dataset file.
    pub path: PathBuf,
    /// 1-based line number; `None` for problems of the whole file (unreadable, empty) or the model.
    pub line: Option<usize>,
    /// What is wrong.
    pub problem: Problem,
}

impl DataError {
    /// A problem at `path`, on 1-based `line` if it belongs to one.
    pub fn new(path: impl Into<PathBuf>, line: Option<usize>, problem: Problem) -> Self {
        Self {
            path: path.into(),
            line,
            problem,
        }
    }
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        write!(f, "{}: {}", self.problem, self.path.display())
    }
}

impl std::error::Error for DataError {}

/// Every problem found in the dataset files; training must not start while there are any (unless
/// `skip_bad_lines` skipped the per-record ones). `Display` lists all of them, one per line.
#[derive(Debug, Clone, PartialEq)]
pub struct DataErrors {
    /// The problems, in file order (train file first, then validation).
    pub errors: Vec<DataError>,
}

impl DataErrors {
    /// A list of one problem (a chat template that does not compile, a preview record that does not
    /// tokenize).
    pub fn single(error: DataError) -> Self {
        Self {
            errors: vec![error],
        }
    }

    /// How many problems.
    pub fn len(&self) -> usize {
        self.errors.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    /// The line numbers with a problem, in order of appearance (handy in tests and UIs).
    pub fn lines(&self) -> Vec<usize> {
        self.errors.iter().filter_map(|e| e.line).collect()
    }
}

impl fmt::Display for DataErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.errors.as_slice() {
            [] => write!(f, "no problems"),
            [one] => write!(f, "{one}"),
            all => {
                write!(
                    f,
                    "{} problems in the dataset (fix them, or turn on skip bad lines to train without those records):",
                    all.len()
                )?;
                for e in all {
                    write!(f, "\n  {e}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for DataErrors {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_first_path_last() {
        let e = DataError::new(
            "data.jsonl",
            Some(17),
            Problem::MissingKeys {
                expected: Format::Messages,
                first_line: 1,
            },
        );
        assert_eq!(
            e.to_string(),
            "line 17: expected a \"messages\" array like the first record on line 1 (see README#datasets): data.jsonl"
        );
    }

    #[test]
    fn file_problems_have_no_line_and_are_not_skippable() {
        let e = DataError::new("d.jsonl", None, Problem::EmptyFile);
        assert!(e.to_string().starts_with("the file has no records"));
        assert!(e.to_string().ends_with(": d.jsonl"));
        assert!(!Problem::EmptyFile.is_per_record());
        assert!(Problem::UnknownFormat.is_per_record());
    }

    #[test]
    fn lists_every_problem() {
        let errs = DataErrors {
            errors: vec![
                DataError::new("a.jsonl", Some(2), Problem::UnknownFormat),
                DataError::new("a.jsonl", Some(5), Problem::InvalidUtf8 { offset: 3 }),
            ],
        };
        let text = errs.to_string();
        assert!(text.starts_with("2 problems"));
        assert!(text.contains("\n  line 2: expected a \"text\" string"));
        assert!(text.contains("\n  line 5: invalid UTF-8 at byte 3"));
        assert_eq!(errs.lines(), vec![2, 5]);
    }
}
