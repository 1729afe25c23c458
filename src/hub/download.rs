//! Downloading what training needs — config, tokenizer files, generation config, chat template,
//! and the safetensors weights (the shards the index names), or else the PyTorch .bin weights —
//! into the shared cache, with progress (bytes, rate, ETA), cancel, and resume: a dropped
//! connection continues from the bytes already in `blobs/<etag>.incomplete` with a Range request,
//! both within one call (a few retries) and across calls (after a cancel or a crash).

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::cache::{is_commit_hash, is_safe_repo_path, RepoCache};
use super::select::{select_files, shard_names, PlannedFile};
use super::{error_chain, Cancel, Hub, HubError};

mod progress;
pub use progress::{DownloadEvent, DownloadProgress};
use progress::{RateMeter, Tally};

/// Retries of one file after the connection drops, each resuming where the last stopped.
const MAX_RETRIES: u32 = 5;
/// A transfer that delivers nothing for this long counts as dropped.
const STALL: Duration = Duration::from_secs(60);

/// What a resolve HEAD says about one file.
struct FileMeta {
    etag: String,
    bytes: u64,
}

/// Why one transfer attempt ended early.
enum Attempt {
    /// Worth retrying from where it stopped.
    Dropped(String),
    Fatal(HubError),
}

fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |source| HubError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers().get(name)?.to_str().ok().map(str::to_owned)
}

impl Hub {
    /// Resolves `revision` (default `main`) to a commit and lists the files a download fetches.
    pub fn plan(
        &self,
        repo: &str,
        revision: Option<&str>,
    ) -> Result<(String, Vec<PlannedFile>), HubError> {
        let (info, tree) = self.info_and_tree(repo, revision)?;
        let commit = info.sha.ok_or_else(|| HubError::Protocol {
            reason: format!("the model info of {repo} has no commit sha"),
        })?;
        if !is_commit_hash(&commit) {
            return Err(HubError::Protocol {
                reason: format!("the Hub gave {repo} the commit {commit:?}, which is not a commit hash; refusing to download"),
            });
        }
        let (files, _) = select_files(repo, &tree)?;
        if let Some(bad) = files.iter().find(|f| !is_safe_repo_path(&f.path)) {
            return Err(HubError::Protocol {
                reason: format!("the Hub lists {repo}'s file {:?}, a name that would write outside the model's cache folder; refusing to download", bad.path),
            });
        }
        Ok((commit, files))
    }

    /// Downloads the training files of `repo` at `revision` (default `main`) into the cache and
    /// returns the snapshot folder. Files already cached are skipped; partial ones resume.
    /// Offline, a snapshot already in the cache is returned as is (`Done` is the only event).
    /// `on_event` runs on the calling thread; `cancel` stops within about a quarter second.
    pub fn download(
        &self,
        repo: &str,
        revision: Option<&str>,
        on_event: &mut dyn FnMut(DownloadEvent),
        cancel: &Cancel,
    ) -> Result<PathBuf, HubError> {
        let (commit, mut files) = match self.plan(repo, revision) {
            Ok(plan) => plan,
            Err(e @ HubError::Network { .. }) => {
                return match super::cached_snapshot(&self.cache_dir, repo, revision) {
                    Some(snapshot) => {
                        on_event(DownloadEvent::Done {
                            snapshot: snapshot.clone(),
                        });
                        Ok(snapshot)
                    }
                    None => Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        let cache = RepoCache::new(&self.cache_dir, repo);
        let total_bytes = files.iter().map(|f| f.bytes).sum();
        on_event(DownloadEvent::Planned {
            commit: commit.clone(),
            files: files.clone(),
            total_bytes,
        });
        let mut tally = Tally {
            on_event,
            total_bytes,
            done_before_file: 0,
            transferred: 0,
            meter: RateMeter::new(),
            last_sent: None,
        };
        let mut i = 0;
        while i < files.len() {
            if cancel.is_cancelled() {
                return Err(HubError::Cancelled);
            }
            let file = files[i].clone();
            let path = self.fetch_file(repo, &commit, &file, &cache, &mut tally, cancel)?;
            if file.path.ends_with(".index.json") {
                // Keep only the shards the index names (some repos carry extra weight files).
                let named = shard_names(&path)?;
                let before: u64 = files.iter().map(|f| f.bytes).sum();
                files.retain(|f| {
                    f.path == file.path
                        || !(f.path.ends_with(".safetensors") || f.path.ends_with(".bin"))
                        || named.contains(&f.path)
                });
                let after: u64 = files.iter().map(|f| f.bytes).sum();
                tally.total_bytes -= before - after;
            }
            tally.done_before_file += file.bytes;
            i += 1;
        }
        cache.write_ref(revision.unwrap_or("main"), &commit)?;
        let snapshot = cache.snapshot_dir(&commit);
        (tally.on_event)(DownloadEvent::Done {
            snapshot: snapshot.clone(),
        });
        Ok(snapshot)
    }

    /// Makes `snapshots/<commit>/<file>` point at a complete blob, fetching what is missing.
    fn fetch_file(
        &self,
        repo: &str,
        commit: &str,
        file: &PlannedFile,
        cache: &RepoCache,
        tally: &mut Tally<'_>,
        cancel: &Cancel,
    ) -> Result<PathBuf, HubError> {
        let meta = self.head(repo, commit, &file.path)?;
        let blob = cache.blob(&meta.etag);
        if blob.is_file() {
            tally.progress(&file.path, meta.bytes, true);
            (tally.on_event)(DownloadEvent::FileDone {
                file: file.path.clone(),
                cached: true,
            });
            return cache.link(commit, &file.path, &meta.etag);
        }
        let part = cache.incomplete(&meta.etag);
        if let Some(parent) = part.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        let on_disk = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        (tally.on_event)(DownloadEvent::FileStarted {
            file: file.path.clone(),
            bytes: meta.bytes,
            resumed_bytes: on_disk(&part).min(meta.bytes),
        });
        let mut attempt = 0;
        loop {
            if cancel.is_cancelled() {
                return Err(HubError::Cancelled);
            }
            let have = on_disk(&part);
            if have == meta.bytes {
                break;
            }
            if have > meta.bytes {
                // Not the file the ETag names: start over.
                std::fs::remove_file(&part).map_err(io_err(&part))?;
                continue;
            }
            match self.transfer(
                repo, commit, &file.path, &part, have, meta.bytes, tally, cancel,
            ) {
                Ok(()) => {}
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Dropped(reason)) => {
                    attempt += 1;
                    if attempt > MAX_RETRIES {
                        return Err(HubError::Dropped {
                            file: file.path.clone(),
                            reason,
                        });
                    }
                    (tally.on_event)(DownloadEvent::Retrying {
                        file: file.path.clone(),
                        attempt,
                        reason,
                    });
                    let wait = Duration::from_millis(200 * u64::from(attempt));
                    let until = Instant::now() + wait;
                    while Instant::now() < until {
                        if cancel.is_cancelled() {
                            return Err(HubError::Cancelled);
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
        }
        std::fs::rename(&part, &blob).map_err(io_err(&blob))?;
        tally.progress(&file.path, meta.bytes, true);
        (tally.on_event)(DownloadEvent::FileDone {
            file: file.path.clone(),
            cached: false,
        });
        cache.link(commit, &file.path, &meta.etag)
    }

    /// One GET of bytes `have..bytes` appended to `part`. Whether the server resumed is read
    /// from its answer: 206 with a `Content-Range` starting at or before `have` continues the
    /// part from there; 200 is the whole file (the Range was ignored), written from the start;
    /// 416 means the part is not a prefix of this file, which is then fetched again. Never from
    /// a length header: a Hub or mirror may send `X-Linked-Size` (the whole file) on a 206.
    #[allow(clippy::too_many_arguments)]
    fn transfer(
        &self,
        repo: &str,
        commit: &str,
        file: &str,
        part: &std::path::Path,
        have: u64,
        bytes: u64,
        tally: &mut Tally<'_>,
        cancel: &Cancel,
    ) -> Result<(), Attempt> {
        let url = self
            .resolve_url(repo, commit, file)
            .map_err(Attempt::Fatal)?;
        self.runtime.block_on(async {
            let mut req = self.get_client.get(url);
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            if have > 0 {
                req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
            }
            let mut resp = match req.send().await {
                Ok(r) => r,
                Err(e) => return Err(Attempt::Dropped(error_chain(&e))),
            };
            let from = self.resume_point(&resp, repo, commit, file, part, have)?;
            let (mut out, mut written) = open_part(part, from)?;
            let mut idle = Duration::ZERO;
            loop {
                if cancel.is_cancelled() {
                    let _ = out.flush();
                    return Err(Attempt::Fatal(HubError::Cancelled));
                }
                let tick = Duration::from_millis(250);
                let next = match tokio::time::timeout(tick, resp.chunk()).await {
                    Err(_) => {
                        idle += tick;
                        if idle >= STALL {
                            return Err(Attempt::Dropped(format!(
                                "no data for {} s",
                                STALL.as_secs()
                            )));
                        }
                        continue;
                    }
                    Ok(next) => next,
                };
                idle = Duration::ZERO;
                match next {
                    Ok(Some(chunk)) => {
                        out.write_all(&chunk)
                            .map_err(|e| Attempt::Fatal(io_err(part)(e)))?;
                        written += chunk.len() as u64;
                        tally.transferred += chunk.len() as u64;
                        tally.progress(file, written, false);
                    }
                    Err(e) => {
                        let _ = out.flush();
                        return Err(Attempt::Dropped(error_chain(&e)));
                    }
                    Ok(None) => break,
                }
            }
            out.flush().map_err(|e| Attempt::Fatal(io_err(part)(e)))?;
            if written < bytes {
                return Err(Attempt::Dropped(format!(
                    "the connection closed after {written} of {bytes} bytes"
                )));
            }
            Ok(())
        })
    }

    /// Where the body of `resp` (to a GET asking for bytes `have..`) starts in the file.
    fn resume_point(
        &self,
        resp: &reqwest::Response,
        repo: &str,
        commit: &str,
        file: &str,
        part: &std::path::Path,
        have: u64,
    ) -> Result<u64, Attempt> {
        let status = resp.status();
        if status.is_server_error() {
            return Err(Attempt::Dropped(format!("HTTP {status}")));
        }
        if status.as_u16() == 416 {
            // The part is not a prefix of the file the server has: fetch it whole.
            std::fs::remove_file(part).map_err(|e| Attempt::Fatal(io_err(part)(e)))?;
            return Err(Attempt::Dropped(
                "the server could not resume from the partial file; starting over".into(),
            ));
        }
        if !status.is_success() {
            self.check_head_status(resp, repo, commit, file)
                .map_err(Attempt::Fatal)?;
            return Err(Attempt::Fatal(HubError::Protocol {
                reason: format!("GET {file} answered {status}"),
            }));
        }
        if status.as_u16() != 206 {
            return Ok(0);
        }
        match header(resp, "content-range")
            .as_deref()
            .and_then(range_start)
        {
            Some(start) if start <= have => Ok(start),
            other => Err(Attempt::Fatal(HubError::Protocol {
                reason: format!(
                    "GET {file} from byte {have} answered 206 with Content-Range {other:?}"
                ),
            })),
        }
    }

    /// HEAD of the resolve URL without following the CDN redirect (whose answer lacks the Hub's
    /// `X-Repo-Commit` / `X-Linked-Etag`); relative redirects (renamed repos) are followed.
    fn head(&self, repo: &str, commit: &str, file: &str) -> Result<FileMeta, HubError> {
        let url = self.resolve_url(repo, commit, file)?;
        let resp = self.runtime.block_on(async {
            let mut url = url;
            for _ in 0..5 {
                let mut req = self.head_client.head(url.clone());
                if let Some(t) = &self.token {
                    req = req.bearer_auth(t);
                }
                let resp = req.send().await?;
                let relative = resp.status().is_redirection()
                    && header(&resp, "location").is_some_and(|l| l.starts_with('/'));
                if relative {
                    if let Some(next) = header(&resp, "location").and_then(|l| url.join(&l).ok()) {
                        url = next;
                        continue;
                    }
                }
                return Ok(resp);
            }
            self.head_client.head(url).send().await
        });
        let resp = resp.map_err(|e| HubError::Network {
            reason: error_chain(&e),
        })?;
        self.check_head_status(&resp, repo, commit, file)?;
        file_meta(&resp, commit, file)
    }

    /// `{endpoint}/{repo}/resolve/{commit}/{file}`.
    fn resolve_url(&self, repo: &str, commit: &str, file: &str) -> Result<reqwest::Url, HubError> {
        let mut url = reqwest::Url::parse(&self.endpoint).map_err(|e| HubError::Protocol {
            reason: format!("bad endpoint: {e}"),
        })?;
        if let Ok(mut segs) = url.path_segments_mut() {
            segs.pop_if_empty();
            segs.extend(repo.split('/'));
            segs.push("resolve");
            segs.push(commit);
            segs.extend(file.split('/'));
        }
        Ok(url)
    }

    /// The error a HEAD's status means: no access, no such repo/revision/file, or a server answer
    /// that is neither success nor redirect.
    fn check_head_status(
        &self,
        resp: &reqwest::Response,
        repo: &str,
        commit: &str,
        file: &str,
    ) -> Result<(), HubError> {
        let status = resp.status();
        let code = header(resp, "x-error-code");
        if status.as_u16() == 401 || status.as_u16() == 403 {
            return Err(match code.as_deref() {
                Some("RepoNotFound") => HubError::RepoNotFound {
                    repo: repo.to_owned(),
                },
                Some("GatedRepo") => self.gated_error(repo),
                _ if self.has_token => HubError::BadToken {
                    endpoint: self.endpoint.clone(),
                    reason: self.scrub(
                        header(resp, "x-error-message").unwrap_or_else(|| status.to_string()),
                    ),
                },
                _ => self.gated_error(repo),
            });
        }
        if status.as_u16() == 404 {
            return Err(match code.as_deref() {
                Some("RepoNotFound") => HubError::RepoNotFound {
                    repo: repo.to_owned(),
                },
                Some("RevisionNotFound") => HubError::RevisionNotFound {
                    repo: repo.to_owned(),
                    revision: commit.to_owned(),
                },
                _ => HubError::FileNotFound {
                    repo: repo.to_owned(),
                    file: file.to_owned(),
                },
            });
        }
        if !(status.is_success() || status.is_redirection()) {
            return Err(HubError::Protocol {
                reason: format!("HEAD {file} answered {status}"),
            });
        }
        Ok(())
    }
}

/// The ETag and size a successful HEAD names (the linked ones of an LFS file first); its commit
/// must be the one asked for.
fn file_meta(resp: &reqwest::Response, commit: &str, file: &str) -> Result<FileMeta, HubError> {
    let etag = header(resp, "x-linked-etag")
        .or_else(|| header(resp, "etag"))
        .map(|e| e.trim_start_matches("W/").trim_matches('"').to_owned())
        .filter(|e| !e.is_empty() && !e.contains('/') && !e.contains(".."))
        .ok_or_else(|| HubError::Protocol {
            reason: format!("HEAD {file} has no usable ETag"),
        })?;
    let bytes = header(resp, "x-linked-size")
        .or_else(|| header(resp, "content-length"))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| HubError::Protocol {
            reason: format!("HEAD {file} has no size"),
        })?;
    if let Some(c) = header(resp, "x-repo-commit") {
        if is_commit_hash(commit) && c != commit {
            return Err(HubError::Protocol {
                reason: format!("asked for commit {commit}, got {c}"),
            });
        }
    }
    Ok(FileMeta { etag, bytes })
}

/// The first byte a `Content-Range: bytes START-END/TOTAL` answer holds.
fn range_start(value: &str) -> Option<u64> {
    value
        .trim()
        .strip_prefix("bytes ")?
        .split('-')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Opens `part` for appending the body of an answer that starts at byte `from` of the file: the
/// bytes before it are kept, anything after cut off. Returns the file and the bytes it holds.
fn open_part(part: &std::path::Path, from: u64) -> Result<(std::fs::File, u64), Attempt> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(part)
        .map_err(|e| Attempt::Fatal(io_err(part)(e)))?;
    out.set_len(from)
        .map_err(|e| Attempt::Fatal(io_err(part)(e)))?;
    Ok((out, from))
}
