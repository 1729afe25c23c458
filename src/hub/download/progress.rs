//! Download progress: the events a download reports, their terminal lines, the transfer-rate
//! meter and the running totals behind the progress events.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::hub::select::PlannedFile;

/// Progress events are sent at most this often (plus once per finished file).
pub(super) const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// Overall progress of a download.
#[derive(Debug, Clone, PartialEq)]
pub struct DownloadProgress {
    /// The file being fetched.
    pub file: String,
    /// Bytes in the cache so far, all files together (resumed bytes included).
    pub done_bytes: u64,
    /// Bytes of all planned files together.
    pub total_bytes: u64,
    /// Transfer rate over the last few seconds; 0 until measurable.
    pub bytes_per_sec: f64,
    /// Seconds left at the current rate, when there is a rate.
    pub eta_secs: Option<f64>,
}

/// What a download reports while it runs, in order: `Planned`, then per file `FileStarted`,
/// `Progress`…, maybe `Retrying`, `FileDone`; finally `Done`.
#[derive(Debug, Clone, PartialEq)]
pub enum DownloadEvent {
    /// The revision resolved to `commit`; these files will be fetched.
    Planned {
        /// The commit the revision resolved to; the snapshot folder's name.
        commit: String,
        /// The files to fetch, with sizes.
        files: Vec<PlannedFile>,
        /// Sum of their sizes in bytes (cached files included).
        total_bytes: u64,
    },
    /// Starting `file`; `resumed_bytes` were already in the cache from an earlier attempt.
    FileStarted {
        /// Path inside the repo.
        file: String,
        /// The file's full size in bytes.
        bytes: u64,
        /// Bytes already in the cache's `.incomplete` file, not fetched again.
        resumed_bytes: u64,
    },
    /// Overall progress, at most every 100 ms while bytes arrive.
    Progress(DownloadProgress),
    /// The connection dropped; trying again from the bytes already written.
    Retrying {
        /// Path inside the repo.
        file: String,
        /// 1-based retry number.
        attempt: u32,
        /// Why the connection dropped.
        reason: String,
    },
    /// `file` is complete; `cached` when it was already in the cache.
    FileDone {
        /// Path inside the repo.
        file: String,
        /// Whether the file was already complete in the cache (nothing fetched).
        cached: bool,
    },
    /// Everything is in place; `snapshot` is the loadable model folder.
    Done {
        /// `snapshots/<commit>` in the cache.
        snapshot: PathBuf,
    },
}

impl DownloadEvent {
    /// A line for a terminal, or `None` for events not worth a line of their own.
    pub fn describe(&self) -> Option<String> {
        use crate::inspect::format_bytes;
        Some(match self {
            DownloadEvent::Planned {
                commit,
                files,
                total_bytes,
            } => format!(
                "{} file(s), {} at commit {}",
                files.len(),
                format_bytes(*total_bytes),
                &commit[..commit.len().min(10)]
            ),
            DownloadEvent::FileStarted {
                file,
                bytes,
                resumed_bytes,
            } if *resumed_bytes > 0 => format!(
                "{file}: resuming at {} of {}",
                format_bytes(*resumed_bytes),
                format_bytes(*bytes)
            ),
            DownloadEvent::FileStarted { .. } => return None,
            DownloadEvent::Progress(p) => {
                let eta = p
                    .eta_secs
                    .map(|s| format!(", {} left", format_secs(s)))
                    .unwrap_or_default();
                format!(
                    "{}: {} / {} ({}/s{eta})",
                    p.file,
                    format_bytes(p.done_bytes),
                    format_bytes(p.total_bytes),
                    format_bytes(p.bytes_per_sec as u64)
                )
            }
            DownloadEvent::Retrying {
                file,
                attempt,
                reason,
            } => format!("{file}: connection dropped ({reason}); retry {attempt}"),
            DownloadEvent::FileDone { file, cached: true } => format!("{file}: already cached"),
            DownloadEvent::FileDone { file, .. } => format!("{file}: done"),
            DownloadEvent::Done { snapshot } => format!("ready: {}", snapshot.display()),
        })
    }
}

/// 75.4 → "1 min 15 s", 8.2 → "8 s".
fn format_secs(secs: f64) -> String {
    let s = secs.round().max(0.0) as u64;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// Measures the transfer rate over a sliding window.
pub(super) struct RateMeter {
    samples: VecDeque<(Instant, u64)>,
}

impl RateMeter {
    pub(super) fn new() -> Self {
        Self {
            samples: VecDeque::new(),
        }
    }

    /// Records `transferred` (bytes moved this session) and returns bytes/sec over ~3 s.
    pub(super) fn update(&mut self, transferred: u64) -> f64 {
        let now = Instant::now();
        self.samples.push_back((now, transferred));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(3))
            && self.samples.len() > 2
        {
            self.samples.pop_front();
        }
        match (self.samples.front(), self.samples.back()) {
            (Some((t0, b0)), Some((t1, b1))) => {
                let dt = t1.duration_since(*t0).as_secs_f64();
                if dt >= 0.2 {
                    (b1 - b0) as f64 / dt
                } else {
                    0.0
                }
            }
            _ => 0.0,
        }
    }
}

/// Running totals for progress events.
pub(super) struct Tally<'a> {
    pub(super) on_event: &'a mut dyn FnMut(DownloadEvent),
    pub(super) total_bytes: u64,
    /// Bytes of finished files plus the current file's bytes on disk.
    pub(super) done_before_file: u64,
    pub(super) transferred: u64,
    pub(super) meter: RateMeter,
    pub(super) last_sent: Option<Instant>,
}

impl Tally<'_> {
    pub(super) fn progress(&mut self, file: &str, file_bytes_on_disk: u64, force: bool) {
        let rate = self.meter.update(self.transferred);
        if !force && self.last_sent.is_some_and(|t| t.elapsed() < PROGRESS_EVERY) {
            return;
        }
        self.last_sent = Some(Instant::now());
        let done = self.done_before_file + file_bytes_on_disk;
        let left = self.total_bytes.saturating_sub(done);
        (self.on_event)(DownloadEvent::Progress(DownloadProgress {
            file: file.to_owned(),
            done_bytes: done,
            total_bytes: self.total_bytes,
            bytes_per_sec: rate,
            eta_secs: (rate > 0.0).then(|| left as f64 / rate),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_well_in_a_terminal() {
        assert_eq!(format_secs(8.2), "8 s");
        assert_eq!(format_secs(75.4), "1 min 15 s");
        let p = DownloadEvent::Progress(DownloadProgress {
            file: "model.safetensors".into(),
            done_bytes: 1_500_000,
            total_bytes: 3_000_000,
            bytes_per_sec: 500_000.0,
            eta_secs: Some(3.0),
        });
        assert_eq!(
            p.describe().unwrap(),
            "model.safetensors: 1.5 MB / 3.0 MB (500.0 KB/s, 3 s left)"
        );
    }

    #[test]
    fn rate_needs_time_to_measure() {
        let mut m = RateMeter::new();
        assert_eq!(m.update(0), 0.0);
        std::thread::sleep(Duration::from_millis(250));
        let r = m.update(1000);
        assert!(r > 1000.0 && r < 5000.0, "{r}");
    }
}
