//! The Hub side of the Models step: its state (search, details, download with progress and
//! cancel, token) and the traffic with the Hub worker. Drawn in `hub_view.rs`.

use super::*;

#[derive(Default)]
pub(super) struct HubPanel {
    pub(super) setup: HubSetup,
    pub(super) worker: Option<HubWorker>,
    /// Why there is no worker or client.
    pub(super) worker_problem: Option<Problem>,
    pub(super) endpoint: Option<String>,
    /// Where the token in use came from (never the token).
    pub(super) token_source: Option<TokenSource>,
    /// Read from the keychain at start, until the app takes it into the settings.
    pub(super) keychain_token: Option<HfToken>,
    /// What became of the last token change, or why the keychain could not be read.
    pub(super) token_note: Option<Result<String, String>>,
    /// The last token change was a removal.
    pub(super) saving_empty: bool,
    /// Open the token section on the next frame (after a gated or token error).
    pub(super) open_token: bool,
    pub(super) text: String,
    pub(super) author: String,
    pub(super) sort: SearchSort,
    pub(super) supported_only: bool,
    /// The last search sent; answers to other ones are stale.
    pub(super) last_query: Option<SearchQuery>,
    pub(super) searching: bool,
    /// The search whose answer `rows` (or `search_problem`) holds.
    pub(super) searched: Option<SearchQuery>,
    pub(super) rows: Vec<SearchRow>,
    pub(super) search_problem: Option<Problem>,
    pub(super) selected: Option<String>,
    /// Details by repo, asked for or prefetched.
    pub(super) details: HashMap<String, Result<ModelDetails, Problem>>,
    /// Repos whose details were asked for and have not arrived.
    pub(super) asked: HashSet<String>,
    pub(super) download: Option<Download>,
    /// How the last download ended: its snapshot or what went wrong.
    pub(super) outcome: Option<(String, Result<PathBuf, Problem>)>,
}

/// A download in progress.
pub(super) struct Download {
    pub(super) repo: String,
    pub(super) cancel: Cancel,
    pub(super) cancelling: bool,
    pub(super) files_total: usize,
    pub(super) files_done: usize,
    pub(super) total_bytes: u64,
    pub(super) progress: Option<DownloadProgress>,
    /// The file being fetched.
    pub(super) file: Option<String>,
    /// A dropped connection being retried.
    pub(super) retry: Option<String>,
}

impl Download {
    pub(super) fn new(repo: String, cancel: Cancel, total_bytes: u64) -> Self {
        Self {
            repo,
            cancel,
            cancelling: false,
            files_total: 0,
            files_done: 0,
            total_bytes,
            progress: None,
            file: None,
            retry: None,
        }
    }

    pub(super) fn apply(&mut self, event: DownloadEvent) {
        match event {
            DownloadEvent::Planned {
                files, total_bytes, ..
            } => {
                self.files_total = files.len();
                self.total_bytes = total_bytes;
            }
            DownloadEvent::FileStarted { file, .. } => {
                self.file = Some(file);
                self.retry = None;
            }
            DownloadEvent::Progress(p) => {
                self.total_bytes = p.total_bytes;
                self.file = Some(p.file.clone());
                self.progress = Some(p);
            }
            DownloadEvent::Retrying {
                file,
                attempt,
                reason,
            } => {
                self.retry = Some(format!(
                    "The connection dropped while fetching {file} ({reason}); retry {attempt}, resuming where it stopped."
                ));
            }
            DownloadEvent::FileDone { .. } => self.files_done += 1,
            DownloadEvent::Done { .. } => {}
        }
    }

    /// "1.2 MB of 4.0 MB · 850 KB/s · 0:03 left".
    pub(super) fn progress_text(&self) -> String {
        let done = self.progress.as_ref().map_or(0, |p| p.done_bytes);
        let mut text = format!(
            "{} of {}",
            format_bytes(done),
            format_bytes(self.total_bytes)
        );
        match &self.progress {
            Some(p) if p.bytes_per_sec > 0.0 => {
                text += &format!(" · {}/s", format_bytes(p.bytes_per_sec as u64));
                if let Some(eta) = p.eta_secs {
                    text += &format!(" · {} left", format_duration(eta));
                }
            }
            _ => text += " · measuring the rate…",
        }
        text
    }
}

impl HubPanel {
    pub(super) fn send(&mut self, command: HubCommand) -> Result<(), String> {
        match &self.worker {
            Some(w) => w.send(command),
            None => Err(self.worker_problem.as_ref().map_or_else(
                || "the Hub worker is not running; restart FineTune".to_owned(),
                |p| p.text.clone(),
            )),
        }
    }

    pub(super) fn worker_stopped(&mut self) {
        self.worker = None;
        self.searching = false;
        self.asked.clear();
        self.download = None;
        self.worker_problem = Some(Problem {
            text: "the Hub worker stopped unexpectedly; restart FineTune to search and download \
                   (downloaded models still work)"
                .into(),
            kind: ProblemKind::Other,
        });
    }

    pub(super) fn search(&mut self) {
        let author = self.author.trim();
        let query = SearchQuery {
            text: self.text.trim().to_owned(),
            sort: self.sort,
            author: (!author.is_empty()).then(|| author.to_owned()),
            supported_only: self.supported_only,
            limit: SEARCH_LIMIT,
        };
        match self.send(HubCommand::Search(query.clone())) {
            Ok(()) => {
                self.last_query = Some(query);
                self.searching = true;
            }
            Err(e) => self.search_problem = Some(Problem::other(e)),
        }
    }

    pub(super) fn select(&mut self, repo: &str) {
        self.selected = Some(repo.to_owned());
        self.ask_details(repo);
    }

    /// Asks for `repo`'s details unless they are here or on their way.
    pub(super) fn ask_details(&mut self, repo: &str) {
        if self.details.contains_key(repo) || self.asked.contains(repo) {
            return;
        }
        match self.send(HubCommand::Details(repo.to_owned())) {
            Ok(()) => {
                self.asked.insert(repo.to_owned());
            }
            Err(e) => {
                self.details.insert(repo.to_owned(), Err(Problem::other(e)));
            }
        }
    }

    pub(super) fn start_download(&mut self, d: &ModelDetails) {
        let cancel = Cancel::new();
        let command = HubCommand::Download {
            repo: d.repo.clone(),
            cancel: cancel.clone(),
        };
        self.outcome = None;
        match self.send(command) {
            Ok(()) => {
                self.download = Some(Download::new(d.repo.clone(), cancel, d.download_bytes));
            }
            Err(e) => self.outcome = Some((d.repo.clone(), Err(Problem::other(e)))),
        }
    }

    pub(super) fn set_token(&mut self, token: &HfToken) {
        self.saving_empty = token.is_empty();
        if let Err(e) = self.send(HubCommand::SetToken(token.clone())) {
            self.token_note = Some(Err(e));
        }
    }
}
