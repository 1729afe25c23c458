//! The Hugging Face Hub: search text-generation models, read one model's details, and download the
//! files training needs into the Python-compatible cache (`models--org--name/{blobs,snapshots,refs}`,
//! so transformers and mlx-lm share the files), with progress, cancel and resume. Cached models
//! stay listed and usable offline.
//!
//! Metadata (search, model info, file tree) and file bytes go through hf-hub 1.0's async client,
//! driven by a small tokio runtime owned by [`Hub`], so callers stay synchronous. Two things hf-hub
//! 1.0 does not offer are done here: resuming a dropped download (its `download_file` truncates
//! the `.incomplete` file and has no cancel) and reading a file's ETag / commit from the resolve
//! HEAD without following the CDN redirect (its HEAD follows redirects and loses `X-Repo-Commit`
//! on the real Hub), which is one plain reqwest HEAD, as huggingface_hub does it.

mod cache;
mod download;
mod search;
mod select;
mod token;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use cache::{cached_models, cached_snapshot, repo_folder_name};
pub use download::{DownloadEvent, DownloadProgress};
pub use search::{format_rows, ModelDetails, SearchQuery, SearchRow, SearchSort};
pub use select::PlannedFile;
pub(crate) use select::SUPPORT_FILES;
pub use token::{
    keychain_token, resolve_token, set_keychain_token, TokenSource, KEYCHAIN_SERVICE, KEYCHAIN_USER,
};

/// The public Hub, used when neither the caller nor `HF_ENDPOINT` names another.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Why a Hub operation failed. Each message says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The model is gated and no token was sent.
    #[error("{repo} is gated: accept its license at {url} while logged in, then set a Hugging Face token (HF_TOKEN, `huggingface-cli login`, or Settings → Hugging Face token)")]
    GatedNoToken {
        /// The model id, `org/name`.
        repo: String,
        /// The model's page, where its license is accepted.
        url: String,
    },
    /// The model is gated and the token sent has not been granted access.
    #[error("{repo} is gated and your token has no access yet: accept its license at {url} with the account that owns the token (approval can take a while for manually reviewed models)")]
    GatedNoAccess {
        /// The model id, `org/name`.
        repo: String,
        /// The model's page, where its license is accepted.
        url: String,
    },
    /// The Hub answered 401/403 to a token for a model that is not gated (expired, revoked or
    /// mistyped token).
    #[error("the Hub rejected the token ({reason}); create a new read token at {endpoint}/settings/tokens and set it in Settings or HF_TOKEN")]
    BadToken {
        /// The Hub's base URL, for the token settings link.
        endpoint: String,
        /// The Hub's message, or the HTTP status.
        reason: String,
    },
    /// No such model, or a private one the request may not see.
    #[error("no model {repo} on the Hub; check the spelling (org/name), or set a token if it is private")]
    RepoNotFound {
        /// The model id, `org/name`.
        repo: String,
    },
    /// The model exists but the branch, tag or commit asked for does not.
    #[error("{repo} has no revision {revision}; use a branch, tag or commit that exists (default: main)")]
    RevisionNotFound {
        /// The model id, `org/name`.
        repo: String,
        /// The revision asked for.
        revision: String,
    },
    /// A file listed for download is not in the repository at that revision (404).
    #[error("{repo} has no file {file} at this revision")]
    FileNotFound {
        /// The model id, `org/name`.
        repo: String,
        /// The file's path inside the repository.
        file: String,
    },
    /// The repository has no weights FineTune can load (e.g. GGUF only, or another framework's).
    #[error("{repo} has no safetensors or PyTorch .bin weights{hint}")]
    NoWeights {
        /// The model id, `org/name`.
        repo: String,
        /// What to do instead, starting with "; " (empty when there is nothing to add).
        hint: String,
    },
    /// The Hub could not be reached (DNS, connection, TLS, timeout).
    #[error("cannot reach the Hub ({reason}); check the connection or HF_ENDPOINT — models already in the cache still work offline")]
    Network {
        /// The error chain from the HTTP client.
        reason: String,
    },
    /// The Hub answered, but not as expected (an unknown status, a malformed body, a missing header).
    #[error("the Hub answered unexpectedly ({reason}); try again later")]
    Protocol {
        /// What was unexpected.
        reason: String,
    },
    /// The download was stopped through its [`Cancel`].
    #[error("download cancelled; what arrived is kept and the next download resumes from it")]
    Cancelled,
    /// The connection dropped mid-file more times than the retries allow.
    #[error("the Hub keeps dropping the connection while sending {file} ({reason}); try again later — the next download resumes where this one stopped")]
    Dropped {
        /// The file being sent, its path inside the repository.
        file: String,
        /// The last drop's error.
        reason: String,
    },
    /// The OS keychain could not read, store or delete the token.
    #[error("the OS keychain refused ({reason}); set the token with HF_TOKEN instead")]
    Keychain {
        /// The keychain's message.
        reason: String,
    },
    /// Writing into the cache failed (no space, no permission), or the async runtime could not
    /// start.
    #[error("cannot write to the Hugging Face cache ({source}); check free space and permissions: {path}")]
    Io {
        /// The file or folder written.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Where the Hub is, where the cache is, and which token to send. [`HubOptions::from_env`] fills
/// each from the environment as huggingface_hub does; tests and the app may set any explicitly.
#[derive(Clone, Default)]
pub struct HubOptions {
    /// Base URL; default `HF_ENDPOINT`, else [`DEFAULT_ENDPOINT`].
    pub endpoint: Option<String>,
    /// The hub cache folder; default `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub`.
    pub cache_dir: Option<PathBuf>,
    /// Access token (never logged). `None` = anonymous.
    pub token: Option<String>,
}

impl std::fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubOptions")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl HubOptions {
    /// Endpoint, cache and token from the environment; `settings_token` (the app's stored token)
    /// wins over `HF_TOKEN` and the token file when set.
    pub fn from_env(settings_token: Option<&str>) -> Self {
        Self {
            endpoint: None,
            cache_dir: None,
            token: resolve_token(settings_token).map(|(t, _)| t),
        }
    }

    /// The endpoint these options resolve to (no trailing slash).
    pub fn resolved_endpoint(&self) -> String {
        self.endpoint
            .clone()
            .or_else(|| std::env::var("HF_ENDPOINT").ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned())
            .trim_end_matches('/')
            .to_owned()
    }

    /// The cache folder these options resolve to.
    pub fn resolved_cache_dir(&self) -> PathBuf {
        self.cache_dir
            .clone()
            .or_else(crate::inspect::hub_cache_dir)
            .unwrap_or_else(|| PathBuf::from(".cache/huggingface/hub"))
    }
}

/// A cancel flag shared between the thread that downloads and the one that may stop it.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// A flag that is not set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the download to stop at the next chunk (within about a quarter second).
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether [`Cancel::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A connection to one Hub and one cache. Calls block the calling thread; run them off the UI
/// thread. Cheap to share behind an `Arc` (the runtime accepts calls from several threads).
pub struct Hub {
    client: hf_hub::HFClient,
    /// HEAD requests that do not follow redirects (the CDN's answer lacks the Hub's headers).
    head_client: reqwest::Client,
    /// File GETs: redirects followed (LFS files live on a CDN), no overall timeout (a multi-GB
    /// file takes long; a stalled one is caught by the download loop).
    get_client: reqwest::Client,
    runtime: tokio::runtime::Runtime,
    endpoint: String,
    cache_dir: PathBuf,
    has_token: bool,
    token: Option<String>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("has_token", &self.has_token)
            .finish()
    }
}

impl Hub {
    /// Builds a client for `options` (nothing is contacted yet).
    pub fn new(options: HubOptions) -> Result<Self, HubError> {
        let endpoint = options.resolved_endpoint();
        let cache_dir = options.resolved_cache_dir();
        let mut builder = hf_hub::HFClient::builder()
            .endpoint(endpoint.clone())
            .cache_dir(cache_dir.clone())
            .user_agent(format!("finetune/{}", env!("CARGO_PKG_VERSION")));
        if let Some(t) = &options.token {
            builder = builder.token(t.clone());
        }
        let client = builder.build().map_err(|e| HubError::Protocol {
            reason: format!("bad endpoint {endpoint:?}: {e}"),
        })?;
        let head_client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(format!("finetune/{}", env!("CARGO_PKG_VERSION")))
            .connect_timeout(std::time::Duration::from_secs(15))
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| HubError::Protocol {
                reason: format!("cannot build the HTTP client: {e}"),
            })?;
        let get_client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::limited(10))
            .user_agent(format!("finetune/{}", env!("CARGO_PKG_VERSION")))
            .connect_timeout(std::time::Duration::from_secs(15))
            .build()
            .map_err(|e| HubError::Protocol {
                reason: format!("cannot build the HTTP client: {e}"),
            })?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| HubError::Io {
                path: cache_dir.clone(),
                source: e,
            })?;
        Ok(Self {
            client,
            head_client,
            get_client,
            runtime,
            endpoint,
            has_token: options.token.is_some(),
            token: options.token,
            cache_dir,
        })
    }

    /// [`Hub::new`] with [`HubOptions::from_env`].
    pub fn from_env(settings_token: Option<&str>) -> Result<Self, HubError> {
        Self::new(HubOptions::from_env(settings_token))
    }

    /// The Hub's base URL, without trailing slash.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The hub cache folder (`models--org--name/...` live here).
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// The page where a person accepts a gated model's license.
    pub fn model_url(&self, repo: &str) -> String {
        format!("{}/{repo}", self.endpoint)
    }

    fn repo(&self, repo: &str) -> hf_hub::HFRepository<hf_hub::RepoTypeModel> {
        let (owner, name) = hf_hub::split_id(repo);
        self.client.model(owner, name)
    }

    /// Turns an hf-hub error into a [`HubError`] that says what to do.
    fn map_error(&self, repo: &str, revision: Option<&str>, e: hf_hub::HFError) -> HubError {
        use hf_hub::HFError as E;
        let code = match &e {
            E::AuthRequired { context } | E::Forbidden { context } | E::Http { context } => {
                context.error_code.clone()
            }
            E::RevisionNotFound {
                context: Some(context),
                ..
            }
            | E::RepoNotFound {
                context: Some(context),
                ..
            } => context.error_code.clone(),
            _ => None,
        };
        match e {
            E::AuthRequired { .. } | E::Forbidden { .. }
                if code.as_deref() == Some("GatedRepo") =>
            {
                self.gated_error(repo)
            }
            E::AuthRequired { .. } if code.as_deref() == Some("RepoNotFound") => {
                HubError::RepoNotFound {
                    repo: repo.to_owned(),
                }
            }
            E::AuthRequired { context } | E::Forbidden { context } => {
                if self.has_token {
                    HubError::BadToken {
                        endpoint: self.endpoint.clone(),
                        reason: self.scrub(
                            context
                                .server_message
                                .clone()
                                .unwrap_or_else(|| context.status.to_string()),
                        ),
                    }
                } else {
                    self.gated_error(repo)
                }
            }
            E::RepoNotFound { .. } => HubError::RepoNotFound {
                repo: repo.to_owned(),
            },
            E::RevisionNotFound { .. } if code.as_deref() == Some("RepoNotFound") => {
                HubError::RepoNotFound {
                    repo: repo.to_owned(),
                }
            }
            E::RevisionNotFound { .. } => HubError::RevisionNotFound {
                repo: repo.to_owned(),
                revision: revision.unwrap_or("main").to_owned(),
            },
            E::EntryNotFound { path, .. } => HubError::FileNotFound {
                repo: repo.to_owned(),
                file: path,
            },
            E::Request { source, .. } => HubError::Network {
                reason: error_chain(&source),
            },
            other => HubError::Protocol {
                reason: self.scrub(other.to_string()),
            },
        }
    }

    /// `text` (a server's message, an error chain) with the token, should a server or proxy echo
    /// it, replaced: the token never reaches an error, an event or a log.
    pub(crate) fn scrub(&self, text: String) -> String {
        match &self.token {
            Some(t) if t.len() >= 4 && text.contains(t.as_str()) => {
                text.replace(t.as_str(), "hf_…(hidden)")
            }
            _ => text,
        }
    }

    fn gated_error(&self, repo: &str) -> HubError {
        let url = self.model_url(repo);
        if self.has_token {
            HubError::GatedNoAccess {
                repo: repo.to_owned(),
                url,
            }
        } else {
            HubError::GatedNoToken {
                repo: repo.to_owned(),
                url,
            }
        }
    }
}

/// `err: cause: cause` (reqwest's top-level text alone hides why a connection failed).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}
