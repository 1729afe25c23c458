//! The Python-compatible cache layout, as huggingface_hub writes it:
//! `models--org--name/blobs/<etag>` (the bytes), `snapshots/<commit>/<file>` (relative symlinks
//! into `blobs/`; copies where symlinks are unavailable), `refs/<branch>` (the commit a branch
//! pointed to). A partial download is `blobs/<etag>.incomplete`, which both tools resume.
//! Listing cached models reuses [`crate::inspect::scan_cache`].

use std::path::{Path, PathBuf};

use super::HubError;
use crate::inspect::CachedModel;

/// `org/name` → `models--org--name`.
pub fn repo_folder_name(repo: &str) -> String {
    format!("models--{}", repo.replace('/', "--"))
}

/// Every cached model snapshot under `cache_dir` (no network), as the app's local list shows them.
pub fn cached_models(cache_dir: &Path) -> Vec<CachedModel> {
    crate::inspect::scan_cache(cache_dir)
}

/// The cached snapshot folder of `repo` at `revision` (a branch/tag in `refs/`, or a commit),
/// when it holds a config.json: what offline use loads. `None` when not cached.
pub fn cached_snapshot(cache_dir: &Path, repo: &str, revision: Option<&str>) -> Option<PathBuf> {
    let repo_dir = cache_dir.join(repo_folder_name(repo));
    let revision = revision.unwrap_or("main");
    let commit = std::fs::read_to_string(repo_dir.join("refs").join(revision))
        .ok()
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| revision.to_owned());
    let snap = repo_dir.join("snapshots").join(commit);
    snap.join("config.json").is_file().then_some(snap)
}

/// A 40-hex-digit commit id (what `refs/` files hold and snapshot folders are named).
pub(crate) fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Paths of one repo's cache folder.
/// Whether `file`, a path inside a repo as a Hub lists it, stays inside the folder it is joined
/// to: relative, `/`-separated, no empty, `.` or `..` component, no backslash, drive colon or NUL
/// (a hostile Hub or mirror must not write outside the cache).
pub(crate) fn is_safe_repo_path(file: &str) -> bool {
    !file.is_empty()
        && !file.contains(['\\', ':', '\0'])
        && file
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

pub(crate) struct RepoCache {
    pub dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |source| HubError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl RepoCache {
    pub fn new(cache_dir: &Path, repo: &str) -> Self {
        Self {
            dir: cache_dir.join(repo_folder_name(repo)),
        }
    }

    pub fn blob(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(etag)
    }

    pub fn incomplete(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(format!("{etag}.incomplete"))
    }

    pub fn snapshot_dir(&self, commit: &str) -> PathBuf {
        self.dir.join("snapshots").join(commit)
    }

    /// Records that `revision` (a branch or tag) points at `commit`.
    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<(), HubError> {
        if is_commit_hash(revision) {
            return Ok(());
        }
        let path = self.dir.join("refs").join(revision);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::write(&path, commit).map_err(io(&path))
    }

    /// Points `snapshots/<commit>/<file>` at `blobs/<etag>` with a relative symlink (a copy on
    /// systems without symlinks), replacing whatever was there.
    pub fn link(&self, commit: &str, file: &str, etag: &str) -> Result<PathBuf, HubError> {
        if !is_safe_repo_path(file) || !is_commit_hash(commit) {
            return Err(HubError::Protocol {
                reason: format!("refusing to write {file:?} of commit {commit:?}: the name would leave the model's cache folder"),
            });
        }
        let pointer = self.snapshot_dir(commit).join(file);
        let parent = pointer.parent().unwrap_or(&self.dir);
        std::fs::create_dir_all(parent).map_err(io(parent))?;
        if pointer.symlink_metadata().is_ok() {
            std::fs::remove_file(&pointer).map_err(io(&pointer))?;
        }
        // snapshots/<commit>/<a>/<b> → ../../../blobs/<etag>: one `..` per folder below repo dir.
        let depth = 2 + file.matches('/').count();
        let mut target = PathBuf::new();
        for _ in 0..depth {
            target.push("..");
        }
        target.push("blobs");
        target.push(etag);
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&target, &pointer).map_err(io(&pointer))?;
        }
        #[cfg(not(unix))]
        {
            std::fs::copy(self.blob(etag), &pointer).map_err(io(&pointer))?;
        }
        Ok(pointer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_names_match_huggingface_hub() {
        assert_eq!(repo_folder_name("org/name"), "models--org--name");
        assert!(is_commit_hash("0123456789abcdef0123456789abcdef01234567"));
        assert!(!is_commit_hash("main"));
    }

    #[test]
    fn links_are_relative_and_snapshots_resolve() {
        let root = tempfile::tempdir().unwrap();
        let rc = RepoCache::new(root.path(), "org/m");
        std::fs::create_dir_all(rc.dir.join("blobs")).unwrap();
        std::fs::write(rc.blob("e1"), "{}").unwrap();
        std::fs::write(rc.blob("e2"), "x").unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let p = rc.link(commit, "config.json", "e1").unwrap();
        rc.link(commit, "sub/dir/f.txt", "e2").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{}");
        let nested = rc.snapshot_dir(commit).join("sub/dir/f.txt");
        assert_eq!(std::fs::read_to_string(nested).unwrap(), "x");
        #[cfg(unix)]
        assert_eq!(
            std::fs::read_link(&p).unwrap(),
            PathBuf::from("../../blobs/e1")
        );
        rc.write_ref("main", commit).unwrap();
        assert_eq!(
            cached_snapshot(root.path(), "org/m", None),
            Some(rc.snapshot_dir(commit))
        );
        assert_eq!(
            cached_snapshot(root.path(), "org/m", Some(commit)),
            Some(rc.snapshot_dir(commit))
        );
        assert_eq!(cached_snapshot(root.path(), "org/other", None), None);
    }
}
