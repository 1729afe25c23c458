//! Convert-on-load: a model folder holding only PyTorch `.bin` weights, or a `.gguf` file (or a
//! folder with exactly one), is converted once into a cache folder keyed by the input's path,
//! sizes and modification times; later loads reuse that folder. The caller shows
//! [`Prepared::message`] so the person knows where the converted copy lives.

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use super::{convert, io_err, ConvertError, ConvertOptions, ConvertReport, SourceKind};

/// Marker written last into a finished conversion folder.
const MARKER: &str = ".finetune-converted.json";

/// A folder ready for [`crate::model::Model::load`].
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// The loadable folder (the input itself when it already holds safetensors).
    pub dir: PathBuf,
    /// The conversion done now, if one was needed and not cached.
    pub converted: Option<ConvertReport>,
    /// What to tell the person (`None` when nothing was converted or reused).
    pub message: Option<String>,
}

/// Where converted copies are kept: `~/Library/Caches/FineTune/converted` on macOS, else
/// `$XDG_CACHE_HOME/finetune/converted` or `~/.cache/finetune/converted`.
pub fn converted_cache_dir() -> PathBuf {
    let home = std::env::var_os("HOME")
        .or_else(|| std::env::var_os("USERPROFILE"))
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    if cfg!(target_os = "macos") {
        return home.join("Library/Caches/FineTune/converted");
    }
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".cache"))
        .join("finetune")
        .join("converted")
}

/// FNV-1a: a stable hash for cache keys (std's hasher may change between Rust releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A cache key for the source files: their absolute paths, sizes and modification times.
fn key_of(files: &[PathBuf]) -> String {
    let mut text = String::new();
    for f in files {
        let abs = std::fs::canonicalize(f).unwrap_or_else(|_| f.clone());
        let meta = std::fs::metadata(f).ok();
        let len = meta.as_ref().map(|m| m.len()).unwrap_or(0);
        let mtime = meta
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .unwrap_or(0);
        text.push_str(&format!("{}|{len}|{mtime}\n", abs.display()));
    }
    format!("{:016x}", fnv1a(text.as_bytes()))
}

/// The files a conversion reads, and how the person calls them.
fn files_of(source: &SourceKind) -> (Vec<PathBuf>, &'static str) {
    match source {
        SourceKind::PytorchBin(f) => (f.clone(), "PyTorch .bin weights"),
        SourceKind::Gguf(f) => (vec![f.clone()], "the GGUF file"),
    }
}

/// The cache folder a conversion of `source` goes to (finished or not).
fn target_of(source: &SourceKind, cache_root: &Path) -> PathBuf {
    // Named after the source (the .gguf file, or the folder of the .bin files) so the same
    // source reached through its folder or its file finds the same copy.
    let named = match source {
        SourceKind::Gguf(f) => f.file_stem(),
        SourceKind::PytorchBin(f) => f.first().and_then(|f| f.parent()).and_then(Path::file_name),
    };
    let stem = named
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    cache_root.join(format!("{stem}-{}", key_of(&files_of(source).0)))
}

/// The finished conversion of `source` in `cache_root`, if one was made earlier.
pub fn cached_conversion(source: &SourceKind, cache_root: &Path) -> Option<PathBuf> {
    let target = target_of(source, cache_root);
    target.join(MARKER).is_file().then_some(target)
}

/// Converts `source` (detected from `input`) into `cache_root` once; later calls reuse it.
pub fn prepare_source(
    input: &Path,
    source: &SourceKind,
    cache_root: &Path,
) -> Result<Prepared, ConvertError> {
    let (files, what) = files_of(source);
    let target = target_of(source, cache_root);
    if target.join(MARKER).is_file() {
        return Ok(Prepared {
            message: Some(format!(
                "using the safetensors copy of {what} converted earlier ({}): {}",
                target.display(),
                input.display()
            )),
            dir: target,
            converted: None,
        });
    }
    let stem = target
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let tmp = cache_root.join(format!(".{stem}-{}.partial", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(cache_root).map_err(io_err(cache_root))?;
    let report = convert(input, &tmp, &ConvertOptions::default())?;
    let marker = serde_json::json!({
        "source": input.display().to_string(),
        "files": files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
        "notes": report.notes,
    });
    super::write::write_json(&tmp.join(MARKER), &marker)?;
    if target.exists() {
        std::fs::remove_dir_all(&target).map_err(io_err(&target))?;
    }
    std::fs::rename(&tmp, &target).map_err(io_err(&target))?;
    let mut report = report;
    report.out = target.clone();
    Ok(Prepared {
        message: Some(format!(
            "converted {what} to safetensors once, kept in {} for later loads: {}",
            target.display(),
            input.display()
        )),
        dir: target,
        converted: Some(report),
    })
}
