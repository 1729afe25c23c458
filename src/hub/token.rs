//! Where the Hugging Face access token comes from: the app's Settings value (kept in the OS
//! keychain), `HF_TOKEN`, `HF_TOKEN_PATH`, or the token file `huggingface-cli login` writes
//! (`$HF_HOME/token`). The token itself is never logged or shown; only its source is.

use std::ffi::OsString;
use std::path::PathBuf;

use super::HubError;

/// Keychain service name under which the app stores the token.
pub const KEYCHAIN_SERVICE: &str = "FineTune";
/// Keychain account name under which the app stores the token.
pub const KEYCHAIN_USER: &str = "huggingface-token";

/// Where a token was found (safe to show; the token is not in it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// The value passed in from Settings.
    Settings,
    /// The `HF_TOKEN` environment variable.
    Env,
    /// A token file (`HF_TOKEN_PATH` or `$HF_HOME/token`).
    File(PathBuf),
}

impl std::fmt::Display for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::Settings => write!(f, "Settings"),
            TokenSource::Env => write!(f, "HF_TOKEN"),
            TokenSource::File(p) => write!(f, "token file {}", p.display()),
        }
    }
}

/// The token to use: `settings` when non-empty, else `HF_TOKEN`, else the file at
/// `HF_TOKEN_PATH`, else `$HF_HOME/token` (`~/.cache/huggingface/token`). `None` = anonymous.
pub fn resolve_token(settings: Option<&str>) -> Option<(String, TokenSource)> {
    resolve_token_from(settings, |k| std::env::var_os(k))
}

/// [`resolve_token`] with the environment passed in (for tests).
pub(crate) fn resolve_token_from(
    settings: Option<&str>,
    env: impl Fn(&str) -> Option<OsString>,
) -> Option<(String, TokenSource)> {
    if let Some(t) = settings.map(str::trim).filter(|t| !t.is_empty()) {
        return Some((t.to_owned(), TokenSource::Settings));
    }
    let set = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(t) = set("HF_TOKEN").and_then(|v| v.into_string().ok()) {
        let t = t.trim().to_owned();
        if !t.is_empty() {
            return Some((t, TokenSource::Env));
        }
    }
    let home = set("HF_HOME").map(PathBuf::from).or_else(|| {
        set("XDG_CACHE_HOME")
            .map(|x| PathBuf::from(x).join("huggingface"))
            .or_else(|| {
                set("HOME")
                    .or_else(|| set("USERPROFILE"))
                    .map(|h| PathBuf::from(h).join(".cache").join("huggingface"))
            })
    });
    let files = set("HF_TOKEN_PATH")
        .map(PathBuf::from)
        .into_iter()
        .chain(home.map(|h| h.join("token")));
    for path in files {
        if let Ok(text) = std::fs::read_to_string(&path) {
            let t = text.trim();
            if !t.is_empty() {
                return Some((t.to_owned(), TokenSource::File(path)));
            }
        }
    }
    None
}

fn keychain_entry() -> Result<keyring::Entry, HubError> {
    keyring::Entry::new(KEYCHAIN_SERVICE, KEYCHAIN_USER).map_err(|e| HubError::Keychain {
        reason: e.to_string(),
    })
}

/// The token stored in the OS keychain by [`set_keychain_token`], if any.
pub fn keychain_token() -> Result<Option<String>, HubError> {
    match keychain_entry()?.get_password() {
        Ok(t) => Ok(Some(t)),
        Err(keyring::Error::NoEntry) => Ok(None),
        Err(e) => Err(HubError::Keychain {
            reason: e.to_string(),
        }),
    }
}

/// Stores `token` in the OS keychain, or removes it when `None` or empty.
pub fn set_keychain_token(token: Option<&str>) -> Result<(), HubError> {
    let entry = keychain_entry()?;
    let result = match token.map(str::trim).filter(|t| !t.is_empty()) {
        Some(t) => entry.set_password(t),
        None => match entry.delete_credential() {
            Err(keyring::Error::NoEntry) => Ok(()),
            other => other,
        },
    };
    result.map_err(|e| HubError::Keychain {
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_then_env_then_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "hf_file\n").unwrap();
        let home = dir.path().to_owned();
        let env = move |with_env: bool| {
            let home = home.clone();
            move |k: &str| match k {
                "HF_TOKEN" if with_env => Some(OsString::from("hf_env")),
                "HF_HOME" => Some(home.clone().into_os_string()),
                _ => None,
            }
        };
        let (t, s) = resolve_token_from(Some(" hf_set "), env(true)).unwrap();
        assert_eq!((t.as_str(), s), ("hf_set", TokenSource::Settings));
        let (t, s) = resolve_token_from(Some(""), env(true)).unwrap();
        assert_eq!((t.as_str(), s), ("hf_env", TokenSource::Env));
        let (t, s) = resolve_token_from(None, env(false)).unwrap();
        assert_eq!(t, "hf_file");
        assert_eq!(s, TokenSource::File(dir.path().join("token")));
        assert!(resolve_token_from(None, |_| None).is_none());
    }
}
