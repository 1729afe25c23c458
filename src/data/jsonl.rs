//! Reading JSONL: one JSON object per line, 1-based line numbers kept for every record and problem.
//! Blank lines are ignored, a UTF-8 byte-order mark on line 1 and `\r\n` endings are accepted. A line
//! longer than the size limit is never held in memory beyond the limit.

use std::io::{BufRead, BufReader};
use std::path::Path;

use super::error::{json_kind, DataError, Problem};

/// Default limit on one line's size: 1 MiB.
pub const DEFAULT_MAX_LINE_BYTES: usize = 1 << 20;

/// One record as read: the line it came from and its JSON object.
#[derive(Debug, Clone)]
pub(crate) struct JsonLine {
    pub line: usize,
    pub object: serde_json::Map<String, serde_json::Value>,
}

/// Records and the per-line problems found while reading a file (tests read whole files).
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct ReadOutcome {
    pub records: Vec<JsonLine>,
    pub problems: Vec<DataError>,
}

#[cfg(test)]
/// Reads `path` whole. `max_records` stops after that many good records (previews). An unreadable
/// file is an `Err`; bad lines are collected in the outcome; a file without any non-blank line is
/// `Problem::EmptyFile`.
pub(crate) fn read_jsonl(
    path: &Path,
    max_line_bytes: usize,
    max_records: Option<usize>,
) -> Result<ReadOutcome, DataError> {
    let mut reader = JsonlReader::open(path, max_line_bytes)?;
    let mut out = ReadOutcome::default();
    while max_records.is_none_or(|n| out.records.len() < n) {
        match reader.next_line()? {
            None => break,
            Some(Ok(record)) => out.records.push(record),
            Some(Err(problem)) => out.problems.push(problem),
        }
    }
    Ok(out)
}

/// A JSONL file read one line at a time, so that a file of any size is read in bounded memory: a
/// line is held up to the size limit and its JSON only until the caller drops it.
pub(crate) struct JsonlReader {
    path: std::path::PathBuf,
    reader: BufReader<std::fs::File>,
    max_line_bytes: usize,
    buf: Vec<u8>,
    line_no: usize,
    bytes_read: u64,
    total_bytes: u64,
    saw_content: bool,
}

impl JsonlReader {
    /// Opens `path`; an unreadable file is an `Err` naming it.
    pub(crate) fn open(path: &Path, max_line_bytes: usize) -> Result<Self, DataError> {
        let file = std::fs::File::open(path).map_err(|e| io_error(path, &e))?;
        let total_bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Self {
            path: path.to_owned(),
            reader: BufReader::with_capacity(1 << 16, file),
            max_line_bytes,
            buf: Vec::new(),
            line_no: 0,
            bytes_read: 0,
            total_bytes,
            saw_content: false,
        })
    }

    /// Bytes of the file read so far, and its size (for progress).
    pub(crate) fn progress(&self) -> (u64, u64) {
        (self.bytes_read, self.total_bytes.max(self.bytes_read))
    }

    /// The next non-blank line: a record or the problem of that line. `Ok(None)` at the end;
    /// `Err` when the file cannot be read or holds no non-blank line (`Problem::EmptyFile`).
    pub(crate) fn next_line(&mut self) -> Result<Option<Result<JsonLine, DataError>>, DataError> {
        loop {
            let Some(bytes) = next_line(&mut self.reader, self.max_line_bytes, &mut self.buf)
                .map_err(|e| io_error(&self.path, &e))?
            else {
                if !self.saw_content {
                    return Err(DataError::new(&self.path, None, Problem::EmptyFile));
                }
                return Ok(None);
            };
            self.line_no += 1;
            self.bytes_read += bytes as u64 + 1;
            let mut raw: &[u8] = &self.buf;
            if self.line_no == 1 {
                raw = raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw);
            }
            if raw.last() == Some(&b'\r') {
                raw = &raw[..raw.len() - 1];
            }
            if raw.iter().all(u8::is_ascii_whitespace) && bytes <= self.max_line_bytes {
                continue;
            }
            self.saw_content = true;
            let line = self.line_no;
            let parsed = parse_line(raw, bytes, self.max_line_bytes);
            // A long line's buffer is not kept for the next one.
            if self.buf.capacity() > 1 << 20 {
                self.buf = Vec::new();
            }
            return Ok(Some(match parsed {
                Ok(object) => Ok(JsonLine { line, object }),
                Err(problem) => Err(DataError::new(&self.path, Some(line), problem)),
            }));
        }
    }
}

fn io_error(path: &Path, e: &std::io::Error) -> DataError {
    DataError::new(path, None, Problem::Io(e.to_string()))
}

fn parse_line(
    raw: &[u8],
    bytes: usize,
    max_line_bytes: usize,
) -> Result<serde_json::Map<String, serde_json::Value>, Problem> {
    if bytes > max_line_bytes {
        return Err(Problem::LineTooLong {
            bytes,
            limit: max_line_bytes,
        });
    }
    let text = std::str::from_utf8(raw).map_err(|e| Problem::InvalidUtf8 {
        offset: e.valid_up_to(),
    })?;
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| Problem::InvalidJson {
            column: e.column(),
            reason: json_reason(&e),
        })?;
    match value {
        serde_json::Value::Object(object) => Ok(object),
        other => Err(Problem::NotAnObject {
            found: json_kind(&other),
        }),
    }
}

/// serde_json's message without its " at line 1 column N" tail (we report the file's line).
fn json_reason(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(pos) => text[..pos].to_owned(),
        None => text,
    }
}

/// Reads one line without its `\n` into `buf`, keeping at most `limit + 1` bytes of it, and returns
/// the line's full length in bytes (`None` at end of file).
fn next_line<R: BufRead>(
    reader: &mut R,
    limit: usize,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<usize>> {
    buf.clear();
    let mut total = 0usize;
    let mut any = false;
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            return Ok(any.then_some(total));
        }
        any = true;
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (chunk.len(), false),
        };
        let room = limit.saturating_add(1).saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..take.min(room)]);
        total += take;
        reader.consume(if done { take + 1 } else { take });
        if done {
            return Ok(Some(total));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(content: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, content).unwrap();
        f
    }

    #[test]
    fn reads_records_with_line_numbers() {
        let f = write(b"\xEF\xBB\xBF{\"text\": \"a\"}\r\n\n  \n{\"text\": \"b\"}");
        let out = read_jsonl(f.path(), 100, None).unwrap();
        let lines: Vec<usize> = out.records.iter().map(|r| r.line).collect();
        assert_eq!(lines, vec![1, 4]);
        assert_eq!(out.records[1].object["text"], "b");
        assert!(out.problems.is_empty());
    }

    #[test]
    fn each_bad_line_is_reported_where_it_is() {
        let f = write(b"{\"text\": \"a\"}\n{\"text\": \n[1]\n{\"text\": \"\xff\"}\n{\"text\": \"long long long\"}\n");
        let out = read_jsonl(f.path(), 20, None).unwrap();
        assert_eq!(out.records.len(), 1);
        let got: Vec<(Option<usize>, &Problem)> =
            out.problems.iter().map(|e| (e.line, &e.problem)).collect();
        assert!(matches!(got[0], (Some(2), Problem::InvalidJson { .. })));
        assert_eq!(
            got[1],
            (Some(3), &Problem::NotAnObject { found: "an array" })
        );
        assert_eq!(got[2], (Some(4), &Problem::InvalidUtf8 { offset: 10 }));
        assert_eq!(
            got[3],
            (
                Some(5),
                &Problem::LineTooLong {
                    bytes: 26,
                    limit: 20
                }
            )
        );
        assert!(!out.problems[0].to_string().contains("at line 1"));
    }

    #[test]
    fn blank_file_is_empty() {
        let f = write(b"\n \n");
        let err = read_jsonl(f.path(), 100, None).unwrap_err();
        assert_eq!(err.problem, Problem::EmptyFile);
        assert_eq!(err.line, None);
    }

    #[test]
    fn missing_file_is_io() {
        let err = read_jsonl(Path::new("/nonexistent/x.jsonl"), 100, None).unwrap_err();
        assert!(matches!(err.problem, Problem::Io(_)));
        assert!(err.to_string().ends_with(": /nonexistent/x.jsonl"));
    }

    #[test]
    fn limit_on_records() {
        let f = write(b"{\"text\": \"a\"}\n{\"text\": \"b\"}\n{\"text\": \"c\"}\n");
        let out = read_jsonl(f.path(), 100, Some(2)).unwrap();
        assert_eq!(out.records.len(), 2);
    }
}
