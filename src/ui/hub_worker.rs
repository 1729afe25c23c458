//! The Models panel's link to the Hugging Face Hub: one worker thread owns an `Arc<Hub>` and runs
//! searches, details and token changes in order; each download gets a thread of its own (sharing
//! the `Arc<Hub>`), and after a search a prefetch thread reads each row's details so the table can
//! show sizes. The UI sends [`HubCommand`]s and never waits; answers come back as [`HubEvent`]s over
//! a bounded channel that `logic()` drains. The access token is never logged or shown.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::{bounded, Receiver, Sender, TryRecvError, TrySendError};
use eframe::egui;

use crate::hub::{
    keychain_token, resolve_token, set_keychain_token, Cancel, DownloadEvent, Hub, HubError,
    HubOptions, ModelDetails, SearchQuery, SearchRow, TokenSource,
};

/// Commands queued for the worker; more than this and the UI says it is busy.
const COMMAND_QUEUE: usize = 16;
/// Events waiting for the UI. Progress events beyond this are dropped (the next one catches up);
/// other events wait for room.
const EVENT_QUEUE: usize = 256;

/// Where the app's Hub client points. The defaults follow the environment as huggingface_hub
/// does (`HF_ENDPOINT`, `HF_HUB_CACHE` / `HF_HOME`); tests point it at a fake Hub.
#[derive(Debug, Clone)]
pub struct HubSetup {
    /// Base URL; `None` = `HF_ENDPOINT`, else <https://huggingface.co>.
    pub endpoint: Option<String>,
    /// The hub cache folder; `None` = `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub`.
    pub cache_dir: Option<PathBuf>,
    /// Read the token from, and save it to, the OS keychain. Off in tests, so they never touch
    /// the person's keychain.
    pub keychain: bool,
}

impl Default for HubSetup {
    fn default() -> Self {
        Self {
            endpoint: None,
            cache_dir: None,
            keychain: true,
        }
    }
}

impl HubSetup {
    /// The cache folder the Models panel lists (no network); `None` without a home folder.
    pub fn cache_dir(&self) -> Option<PathBuf> {
        self.cache_dir
            .clone()
            .or_else(crate::inspect::hub_cache_dir)
    }

    /// Options for [`Hub::new`]: `token` (the Settings value) wins over `HF_TOKEN` and the token
    /// file, as in [`HubOptions::from_env`].
    fn options(&self, token: Option<&str>) -> HubOptions {
        HubOptions {
            endpoint: self.endpoint.clone(),
            cache_dir: self.cache_dir.clone(),
            ..HubOptions::from_env(token)
        }
    }
}

/// A Hugging Face access token as the Settings form holds it: never serialized (the OS keychain
/// keeps it) and never printed, not even by `{:?}`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct HfToken(pub String);

impl std::fmt::Debug for HfToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = if self.is_empty() { "<empty>" } else { "<set>" };
        write!(f, "HfToken({state})")
    }
}

impl HfToken {
    /// True when no token is typed (blank counts as none).
    pub fn is_empty(&self) -> bool {
        self.0.trim().is_empty()
    }

    /// The token, trimmed, or `None` when empty.
    pub fn get(&self) -> Option<&str> {
        Some(self.0.trim()).filter(|t| !t.is_empty())
    }
}

/// What went wrong in a Hub call, as the panel shows it: the message (which says what to do
/// next) and what kind of trouble it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// The message, which says what to do next (arrows replaced by characters the font draws).
    pub text: String,
    /// How the panel treats it.
    pub kind: ProblemKind,
}

/// How the panel treats a [`Problem`].
#[derive(Debug, Clone, PartialEq)]
pub enum ProblemKind {
    /// A license must be accepted on this page (and a token set) first.
    Gated {
        /// The model's page, where its license is accepted.
        url: String,
    },
    /// The Hub could not be reached; cached models still work.
    Offline,
    /// The token was rejected.
    BadToken,
    /// The person cancelled a download; nothing is wrong.
    Cancelled,
    /// Anything else: the message is shown as it is.
    Other,
}

impl From<&HubError> for Problem {
    fn from(e: &HubError) -> Self {
        let kind = match e {
            HubError::GatedNoToken { url, .. } | HubError::GatedNoAccess { url, .. } => {
                ProblemKind::Gated { url: url.clone() }
            }
            HubError::Network { .. } => ProblemKind::Offline,
            HubError::BadToken { .. } => ProblemKind::BadToken,
            HubError::Cancelled => ProblemKind::Cancelled,
            _ => ProblemKind::Other,
        };
        Self {
            text: drawable(&e.to_string()),
            kind,
        }
    }
}

/// `text` with the characters the bundled font cannot draw replaced (engine messages are
/// written for terminals too; "Settings → Hugging Face token" would show a box).
fn drawable(text: &str) -> String {
    text.replace('→', "›")
}

impl Problem {
    /// A problem with no special handling.
    pub fn other(text: String) -> Self {
        Self {
            text,
            kind: ProblemKind::Other,
        }
    }
}

/// What the Models panel asks the Hub worker to do.
#[derive(Debug, Clone)]
pub enum HubCommand {
    /// Search text-generation models; answered by [`HubEvent::Searched`], then
    /// [`HubEvent::Details`] for each row as the prefetch reads them.
    Search(SearchQuery),
    /// Read one model's details; answered by [`HubEvent::Details`].
    Details(String),
    /// Download `repo`'s training files into the cache on a thread of its own; reports
    /// [`HubEvent::Download`]s, then [`HubEvent::Downloaded`] or [`HubEvent::DownloadFailed`].
    /// `cancel` stops it.
    Download {
        /// The model id, `org/name`.
        repo: String,
        /// Stops the download when set.
        cancel: Cancel,
    },
    /// Use this token from now on (empty = none: `HF_TOKEN` or the token file, if any) and, when
    /// the keychain is on, store it there; answered by [`HubEvent::TokenSaved`] and
    /// [`HubEvent::Connected`].
    SetToken(HfToken),
}

/// What the Hub worker reports.
#[derive(Debug)]
pub enum HubEvent {
    /// A client is ready: where it points, and where its token came from (never the token).
    Connected {
        /// The Hub's base URL.
        endpoint: String,
        /// Where the token came from, or `None` when anonymous.
        token_source: Option<TokenSource>,
    },
    /// No client could be built; Hub calls fail with this until the token changes.
    Unavailable(Problem),
    /// The token stored in the OS keychain at start (for the Settings field), or why it could
    /// not be read.
    KeychainToken(Result<Option<HfToken>, String>),
    /// A search finished.
    Searched {
        /// The query it answers (stale answers are recognised by it).
        query: SearchQuery,
        /// The rows found, or why the search failed.
        result: Result<Vec<SearchRow>, Problem>,
    },
    /// One model's details (asked for, or prefetched after a search).
    Details {
        /// The model id, `org/name`.
        repo: String,
        /// The details, or why they could not be read.
        result: Result<Box<ModelDetails>, Problem>,
    },
    /// Progress of the download of `repo` (its final `Done` comes as [`HubEvent::Downloaded`]).
    Download {
        /// The model id, `org/name`.
        repo: String,
        /// The download's progress event.
        event: DownloadEvent,
    },
    /// `repo` is in the cache; `snapshot` is the loadable model folder.
    Downloaded {
        /// The model id, `org/name`.
        repo: String,
        /// The cache snapshot folder (`snapshots/<commit>`).
        snapshot: PathBuf,
    },
    /// The download of `repo` stopped (cancelled included).
    DownloadFailed {
        /// The model id, `org/name`.
        repo: String,
        /// Why it stopped.
        problem: Problem,
    },
    /// The token was taken into use: `Ok(true)` when stored in the keychain, `Ok(false)` when
    /// the keychain is off, else why the keychain refused (the token is used anyway).
    TokenSaved(Result<bool, String>),
}

/// The UI's handle on the worker thread.
pub struct HubWorker {
    commands: Sender<HubCommand>,
    events: Receiver<HubEvent>,
}

/// Sends events to the UI and wakes it.
#[derive(Clone)]
struct Reply {
    tx: Sender<HubEvent>,
    ctx: egui::Context,
}

impl Reply {
    /// Waits for room (the UI drains every frame); a closed app is not an error.
    fn send(&self, event: HubEvent) {
        if self.tx.send(event).is_ok() {
            self.ctx.request_repaint();
        }
    }

    /// Drops the event when the queue is full (for progress, which the next event supersedes).
    fn offer(&self, event: HubEvent) {
        if self.tx.try_send(event).is_ok() {
            self.ctx.request_repaint();
        }
    }
}

impl HubWorker {
    /// Starts the worker: it reads the keychain token (when `setup.keychain`) and builds the
    /// client, then waits for commands. It ends when the handle is dropped.
    pub fn spawn(ctx: &egui::Context, setup: HubSetup) -> Result<Self, String> {
        let (commands, command_rx) = bounded(COMMAND_QUEUE);
        let (event_tx, events) = bounded(EVENT_QUEUE);
        let reply = Reply {
            tx: event_tx,
            ctx: ctx.clone(),
        };
        std::thread::Builder::new()
            .name("finetune-hub".into())
            .spawn(move || work(setup, &command_rx, &reply))
            .map_err(|e| {
                format!("could not start the Hub worker thread ({e}); restart FineTune")
            })?;
        Ok(Self { commands, events })
    }

    /// Queues `command`; `Err` says why it could not be (the panel shows it).
    pub fn send(&self, command: HubCommand) -> Result<(), String> {
        self.commands.try_send(command).map_err(|e| match e {
            TrySendError::Full(_) => {
                "the Hub worker is still busy with earlier requests; try again in a moment".into()
            }
            TrySendError::Disconnected(_) => {
                "the Hub worker stopped; restart FineTune to search and download again".into()
            }
        })
    }

    /// The next event, if one is waiting (`Disconnected` when the worker is gone).
    pub fn try_recv(&self) -> Result<HubEvent, TryRecvError> {
        self.events.try_recv()
    }
}

/// The worker thread's loop.
fn work(setup: HubSetup, commands: &Receiver<HubCommand>, reply: &Reply) {
    let mut token = HfToken::default();
    if setup.keychain {
        match keychain_token() {
            Ok(t) => {
                token = HfToken(t.unwrap_or_default());
                let shown = (!token.is_empty()).then(|| token.clone());
                reply.send(HubEvent::KeychainToken(Ok(shown)));
            }
            Err(e) => reply.send(HubEvent::KeychainToken(Err(e.to_string()))),
        }
    }
    let mut hub = connect(&setup, &token, reply);
    // Bumped by each search, so a prefetch for older results stops early.
    let generation = Arc::new(AtomicU64::new(0));
    for command in commands.iter() {
        match command {
            HubCommand::Search(query) => {
                let this = generation.fetch_add(1, Ordering::Relaxed) + 1;
                let result = with_hub(&hub, |h| h.search(&query));
                if let (Ok(rows), Ok(h)) = (&result, &hub) {
                    prefetch(h.clone(), rows, this, generation.clone(), reply.clone());
                }
                reply.send(HubEvent::Searched { query, result });
            }
            HubCommand::Details(repo) => {
                let result = with_hub(&hub, |h| h.details(&repo, None)).map(Box::new);
                reply.send(HubEvent::Details { repo, result });
            }
            HubCommand::Download { repo, cancel } => match &hub {
                Ok(h) => download(h.clone(), repo, cancel, reply.clone()),
                Err(problem) => reply.send(HubEvent::DownloadFailed {
                    repo,
                    problem: problem.clone(),
                }),
            },
            HubCommand::SetToken(new) => {
                token = new;
                let saved = if setup.keychain {
                    set_keychain_token(token.get())
                        .map(|()| true)
                        .map_err(|e| e.to_string())
                } else {
                    Ok(false)
                };
                reply.send(HubEvent::TokenSaved(saved));
                hub = connect(&setup, &token, reply);
            }
        }
    }
}

/// Builds a client for `setup` with `token` and says so.
fn connect(setup: &HubSetup, token: &HfToken, reply: &Reply) -> Result<Arc<Hub>, Problem> {
    match Hub::new(setup.options(token.get())) {
        Ok(hub) => {
            reply.send(HubEvent::Connected {
                endpoint: hub.endpoint().to_owned(),
                token_source: resolve_token(token.get()).map(|(_, source)| source),
            });
            Ok(Arc::new(hub))
        }
        Err(e) => {
            let problem = Problem::other(format!(
                "cannot start the Hub client: {e}; check HF_ENDPOINT and restart FineTune"
            ));
            reply.send(HubEvent::Unavailable(problem.clone()));
            Err(problem)
        }
    }
}

fn with_hub<T>(
    hub: &Result<Arc<Hub>, Problem>,
    call: impl FnOnce(&Hub) -> Result<T, HubError>,
) -> Result<T, Problem> {
    match hub {
        Ok(h) => call(h).map_err(|e| Problem::from(&e)),
        Err(p) => Err(p.clone()),
    }
}

/// Reads each row's details on a thread of its own (so a click on a row is answered at once by
/// the worker), stopping when a newer search starts. Failures stay quiet: a row the person
/// selects asks again and shows its error.
fn prefetch(
    hub: Arc<Hub>,
    rows: &[SearchRow],
    this: u64,
    generation: Arc<AtomicU64>,
    reply: Reply,
) {
    let repos: Vec<String> = rows.iter().map(|r| r.repo.clone()).collect();
    let spawned = std::thread::Builder::new()
        .name("finetune-hub-prefetch".into())
        .spawn(move || {
            for repo in repos {
                if generation.load(Ordering::Relaxed) != this {
                    return;
                }
                if let Ok(details) = hub.details(&repo, None) {
                    reply.send(HubEvent::Details {
                        repo,
                        result: Ok(Box::new(details)),
                    });
                }
            }
        });
    // Without the thread the table only lacks sizes until a row is selected.
    drop(spawned);
}

/// Runs one download on a thread of its own.
fn download(hub: Arc<Hub>, repo: String, cancel: Cancel, reply: Reply) {
    let failed = reply.clone();
    let name = repo.clone();
    let spawned = std::thread::Builder::new()
        .name("finetune-hub-download".into())
        .spawn(move || {
            let mut on_event = |event: DownloadEvent| match event {
                // Sent once the result is back, as `Downloaded`.
                DownloadEvent::Done { .. } => {}
                DownloadEvent::Progress(_) => reply.offer(HubEvent::Download {
                    repo: repo.clone(),
                    event,
                }),
                _ => reply.send(HubEvent::Download {
                    repo: repo.clone(),
                    event,
                }),
            };
            let result = hub.download(&repo, None, &mut on_event, &cancel);
            reply.send(match result {
                Ok(snapshot) => HubEvent::Downloaded { repo, snapshot },
                Err(e) => HubEvent::DownloadFailed {
                    repo,
                    problem: Problem::from(&e),
                },
            });
        });
    if let Err(e) = spawned {
        failed.send(HubEvent::DownloadFailed {
            repo: name,
            problem: Problem::other(format!(
                "could not start the download thread ({e}); try again"
            )),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_never_print() {
        let t = HfToken("hf_secret".into());
        assert_eq!(format!("{t:?}"), "HfToken(<set>)");
        assert_eq!(format!("{:?}", HfToken::default()), "HfToken(<empty>)");
        assert_eq!(HfToken("  ".into()).get(), None);
        assert_eq!(HfToken(" hf_x ".into()).get(), Some("hf_x"));
    }

    #[test]
    fn problems_keep_the_license_link() {
        let p = Problem::from(&HubError::GatedNoToken {
            repo: "org/m".into(),
            url: "https://hub/org/m".into(),
        });
        assert_eq!(
            p.kind,
            ProblemKind::Gated {
                url: "https://hub/org/m".into()
            }
        );
        assert!(p.text.contains("accept its license"), "{}", p.text);
        assert!(
            p.text.contains("Settings › Hugging Face token"),
            "{}",
            p.text
        );
        let p = Problem::from(&HubError::Network {
            reason: "refused".into(),
        });
        assert_eq!(p.kind, ProblemKind::Offline);
    }
}
