//! Looking at models without loading them: the Hugging Face cache scan (`models--org--name/
//! snapshots/<rev>/`, Python-compatible, respecting `HF_HUB_CACHE` and `HF_HOME`) and a folder
//! summary read from config.json and the safetensors headers only (no weights are read), for the
//! app's model picker and `finetune info`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::model::{weights, ModelConfig, ModelError, ModelFormat, PreparedModel};

/// Largest safetensors header accepted (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Why a folder could not be summarized. The text says what to do next; the path comes last.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// config.json is missing or unreadable, or the folder has no weights.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A safetensors header is truncated, too large or not valid JSON.
    #[error("cannot read the safetensors header ({reason}); the file may be incomplete, download it again: {path}")]
    Header {
        /// The weight file.
        path: PathBuf,
        /// What is wrong with the header.
        reason: String,
    },
}

/// A model folder in the Hugging Face cache.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedModel {
    /// `org/name` as on the Hub.
    pub repo_id: String,
    /// The snapshot folder name (a commit hash).
    pub revision: String,
    /// True when `refs/main` points at this snapshot.
    pub is_main: bool,
    /// The snapshot folder, a loadable model folder.
    pub path: PathBuf,
    /// `architectures[0]` of config.json, when it has one.
    pub architecture: Option<String>,
    /// Bytes of the snapshot's files (symlinks into `blobs/` followed).
    pub size_bytes: u64,
}

/// What a model folder holds, from config.json and the safetensors headers.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSummary {
    /// The loadable safetensors folder (a converted copy for a `.bin` folder or GGUF file).
    pub dir: PathBuf,
    /// What the person chose: the folder, the `.gguf` file, or the Hub id.
    pub source: PathBuf,
    /// Folder name, or `org/name` for a cache snapshot.
    pub name: String,
    /// `architectures[0]` of config.json, e.g. `LlamaForCausalLM`.
    pub architecture: String,
    /// `model_type` of config.json, e.g. `llama`.
    pub model_type: String,
    /// Parameters implied by config.json.
    pub parameters: usize,
    /// Parameters counted from the safetensors headers.
    pub stored_parameters: usize,
    /// Transformer blocks (`num_hidden_layers`).
    pub layers: usize,
    /// Width of the residual stream (`hidden_size`).
    pub hidden_size: usize,
    /// Tokens in the vocabulary (`vocab_size`).
    pub vocab_size: usize,
    /// `max_position_embeddings`.
    pub context_length: usize,
    /// Stored dtypes with tensor counts, most common first (e.g. `[("BF16", 290)]`).
    pub dtypes: Vec<(String, usize)>,
    /// Bytes of the weight files.
    pub weights_bytes: u64,
    /// Bytes of every file directly in the folder.
    pub size_bytes: u64,
    /// Number of weight files (shards).
    pub weight_files: usize,
    /// LoRA target candidates (`q_proj`, ...).
    pub linear_names: Vec<String>,
    /// Whether the folder has `tokenizer.json`.
    pub has_tokenizer: bool,
    /// Whether the tokenizer files carry a chat template (`chat_template.jinja` or
    /// `tokenizer_config.json`).
    pub has_chat_template: bool,
    /// The parsed config.json (for the memory estimate).
    pub config: ModelConfig,
}

impl ModelSummary {
    /// The main stored dtype, e.g. `BF16`, or `BF16 + F32` when mixed.
    pub fn dtype_text(&self) -> String {
        if self.dtypes.is_empty() {
            return "unknown".into();
        }
        self.dtypes
            .iter()
            .map(|(d, _)| d.as_str())
            .collect::<Vec<_>>()
            .join(" + ")
    }
}

/// The hub cache folder: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> Option<PathBuf> {
    hub_cache_dir_from(|k| std::env::var_os(k))
}

/// [`hub_cache_dir`] with the environment passed in (for tests).
pub fn hub_cache_dir_from(env: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let set = |k: &str| env(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(p) = set("HF_HUB_CACHE") {
        return Some(p);
    }
    if let Some(p) = set("HF_HOME") {
        return Some(p.join("hub"));
    }
    if let Some(p) = set("XDG_CACHE_HOME") {
        return Some(p.join("huggingface").join("hub"));
    }
    set("HOME")
        .or_else(|| set("USERPROFILE"))
        .map(|h| h.join(".cache").join("huggingface").join("hub"))
}

/// Every model snapshot with a config.json under the cache folder `root`, sorted by repo id
/// (the `refs/main` snapshot first within a repo). A missing or unreadable cache is empty.
pub fn scan_cache(root: &Path) -> Vec<CachedModel> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("models--") else {
            continue;
        };
        let repo_id = rest.replacen("--", "/", 1);
        let repo_dir = entry.path();
        let main = std::fs::read_to_string(repo_dir.join("refs").join("main"))
            .ok()
            .map(|s| s.trim().to_owned());
        let Ok(snapshots) = std::fs::read_dir(repo_dir.join("snapshots")) else {
            continue;
        };
        for snap in snapshots.flatten() {
            let path = snap.path();
            if !path.join("config.json").is_file() {
                continue;
            }
            let revision = snap.file_name().to_string_lossy().into_owned();
            found.push(CachedModel {
                repo_id: repo_id.clone(),
                is_main: main.as_deref() == Some(revision.as_str()),
                architecture: raw_architecture(&path),
                size_bytes: folder_bytes(&path, true),
                revision,
                path,
            });
        }
    }
    found.sort_by(|a, b| {
        (a.repo_id.as_str(), !a.is_main, a.revision.as_str()).cmp(&(
            b.repo_id.as_str(),
            !b.is_main,
            b.revision.as_str(),
        ))
    });
    found
}

/// Reads config.json and the safetensors headers of `dir` (no weights).
pub fn summarize(dir: &Path) -> Result<ModelSummary, InspectError> {
    let cfg = ModelConfig::from_dir(dir)?;
    let files = weights::checkpoint_files(dir)?;
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    let mut stored_parameters = 0usize;
    let mut weights_bytes = 0u64;
    for file in &files {
        let header = read_header(file)?;
        for info in header.values() {
            *dtypes.entry(info.dtype.clone()).or_default() += 1;
            stored_parameters += info.shape.iter().product::<usize>();
        }
        weights_bytes += std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    }
    let mut dtypes: Vec<(String, usize)> = dtypes.into_iter().collect();
    dtypes.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Ok(ModelSummary {
        dir: dir.to_path_buf(),
        source: dir.to_path_buf(),
        name: display_name(dir),
        architecture: cfg.architecture.clone(),
        model_type: cfg.model_type.clone(),
        parameters: cfg.parameter_count(),
        stored_parameters,
        layers: cfg.num_layers,
        hidden_size: cfg.hidden_size,
        vocab_size: cfg.vocab_size,
        context_length: cfg.max_position_embeddings,
        dtypes,
        weights_bytes,
        size_bytes: folder_bytes(dir, false),
        weight_files: files.len(),
        linear_names: cfg.linear_names().iter().map(|s| s.to_string()).collect(),
        has_tokenizer: dir.join("tokenizer.json").is_file(),
        has_chat_template: has_chat_template(dir),
        config: cfg,
    })
}

/// [`summarize`] for a prepared model: its folder's facts under the name the person knows it by.
pub fn summarize_prepared(prepared: &PreparedModel) -> Result<ModelSummary, InspectError> {
    let mut summary = summarize(&prepared.dir)?;
    summary.source = prepared.source.given.clone();
    if prepared.source.format != ModelFormat::Safetensors || prepared.source.hub_id.is_some() {
        summary.name = prepared.source.name();
    }
    Ok(summary)
}

/// `org/name` for a cache snapshot (`…/models--org--name/snapshots/<rev>`), else the folder name.
pub fn display_name(dir: &Path) -> String {
    let parent = dir.parent();
    let in_snapshots = parent
        .and_then(Path::file_name)
        .is_some_and(|n| n == "snapshots");
    if in_snapshots {
        if let Some(repo) = parent
            .and_then(Path::parent)
            .and_then(Path::file_name)
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("models--"))
        {
            return repo.replacen("--", "/", 1);
        }
    }
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

/// 1234567 → "1.2 MB" (decimal units, as Finder shows sizes).
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// 135_000_000 → "135M", 1_700_000_000 → "1.7B", 12_345 → "12.3K".
pub fn format_count(n: usize) -> String {
    let v = n as f64;
    if v >= 1e9 {
        format!("{:.1}B", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.0}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}K", v / 1e3)
    } else {
        n.to_string()
    }
}

/// One tensor's entry in a safetensors header.
#[derive(Debug, serde::Deserialize)]
struct TensorInfo {
    dtype: String,
    shape: Vec<usize>,
}

/// The tensor table of a safetensors file: an 8-byte little-endian length, then that much JSON.
fn read_header(path: &Path) -> Result<BTreeMap<String, TensorInfo>, InspectError> {
    let bad = |reason: String| InspectError::Header {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| bad(format!("no header length: {e}")))?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER_BYTES {
        return Err(bad(format!("the header claims {len} bytes")));
    }
    let mut json = vec![0u8; len as usize];
    file.read_exact(&mut json)
        .map_err(|e| bad(format!("header cut short: {e}")))?;
    let value: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&json).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let mut tensors = BTreeMap::new();
    for (name, v) in value {
        if name == "__metadata__" {
            continue;
        }
        let info: TensorInfo = serde_json::from_value(v)
            .map_err(|e| bad(format!("tensor {name} has no dtype/shape: {e}")))?;
        tensors.insert(name, info);
    }
    Ok(tensors)
}

/// `architectures[0]` of `dir/config.json`, read leniently (unsupported models still list).
fn raw_architecture(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("architectures")?
        .get(0)?
        .as_str()
        .map(str::to_owned)
        .or_else(|| v.get("model_type")?.as_str().map(str::to_owned))
}

/// Bytes of the files in `dir` (following symlinks); `recursive` descends into sub-folders.
fn folder_bytes(dir: &Path, recursive: bool) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut total = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => total += m.len(),
            Ok(m) if m.is_dir() && recursive => total += folder_bytes(&path, true),
            _ => {}
        }
    }
    total
}

fn has_chat_template(dir: &Path) -> bool {
    if dir.join("chat_template.jinja").is_file() {
        return true;
    }
    std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v.get("chat_template").is_some_and(|t| !t.is_null()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    /// Copies the files of a fixture folder (not sub-folders) into `dest`.
    fn copy_model(name: &str, dest: &Path) {
        std::fs::create_dir_all(dest).unwrap();
        for e in std::fs::read_dir(fixture(name)).unwrap() {
            let e = e.unwrap();
            if e.path().is_file() {
                std::fs::copy(e.path(), dest.join(e.file_name())).unwrap();
            }
        }
    }

    #[test]
    fn cache_dir_follows_the_environment_like_huggingface_hub() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        assert_eq!(
            hub_cache_dir_from(env(&[
                ("HF_HUB_CACHE", "/c"),
                ("HF_HOME", "/h"),
                ("HOME", "/u")
            ])),
            Some(PathBuf::from("/c"))
        );
        assert_eq!(
            hub_cache_dir_from(env(&[("HF_HOME", "/h"), ("HOME", "/u")])),
            Some(PathBuf::from("/h/hub"))
        );
        assert_eq!(
            hub_cache_dir_from(env(&[("HF_HUB_CACHE", ""), ("HOME", "/u")])),
            Some(PathBuf::from("/u/.cache/huggingface/hub"))
        );
        assert_eq!(
            hub_cache_dir_from(env(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/u")])),
            Some(PathBuf::from("/x/huggingface/hub"))
        );
        assert_eq!(hub_cache_dir_from(env(&[])), None);
    }

    #[test]
    fn scan_finds_snapshots_with_architecture_and_size() {
        let root = tempfile::tempdir().unwrap();
        let repo = root.path().join("models--org--tiny-llama");
        let snap = repo.join("snapshots").join("abc123");
        copy_model("tiny-llama", &snap);
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), "abc123\n").unwrap();
        // An older snapshot, a snapshot without config.json, a dataset repo and a stray file.
        copy_model("tiny-gpt2", &repo.join("snapshots").join("old999"));
        std::fs::create_dir_all(
            root.path()
                .join("models--org--empty")
                .join("snapshots")
                .join("r1"),
        )
        .unwrap();
        std::fs::create_dir_all(root.path().join("datasets--org--data").join("snapshots")).unwrap();
        std::fs::write(root.path().join("version.txt"), "1").unwrap();

        let models = scan_cache(root.path());
        assert_eq!(models.len(), 2, "{models:?}");
        assert_eq!(models[0].repo_id, "org/tiny-llama");
        assert_eq!(models[0].revision, "abc123");
        assert!(models[0].is_main);
        assert_eq!(models[0].architecture.as_deref(), Some("LlamaForCausalLM"));
        let expected: u64 = std::fs::read_dir(&snap)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert_eq!(models[0].size_bytes, expected);
        assert!(models[0].size_bytes > 500_000);
        assert_eq!(models[1].revision, "old999");
        assert!(!models[1].is_main);
        assert_eq!(models[1].architecture.as_deref(), Some("GPT2LMHeadModel"));
        assert_eq!(display_name(&models[0].path), "org/tiny-llama");
    }

    #[test]
    fn scan_of_a_missing_cache_is_empty() {
        assert!(scan_cache(Path::new("/definitely/not/here")).is_empty());
    }

    #[test]
    fn summary_reads_config_and_headers() {
        let s = summarize(&fixture("tiny-llama")).unwrap();
        assert_eq!(s.name, "tiny-llama");
        assert_eq!(s.architecture, "LlamaForCausalLM");
        assert_eq!(
            (s.layers, s.hidden_size, s.vocab_size, s.context_length),
            (2, 64, 512, 256)
        );
        assert_eq!(s.dtype_text(), "F32");
        // The config-implied count matches the tensors actually stored.
        assert_eq!(s.parameters, s.stored_parameters);
        assert_eq!(s.weights_bytes, 585_064);
        assert!(s.size_bytes > s.weights_bytes);
        assert_eq!(s.weight_files, 1);
        assert!(s.has_tokenizer && s.has_chat_template);
        assert_eq!(s.linear_names.len(), 7);
    }

    #[test]
    fn summary_of_shards_matches_the_single_file() {
        let single = summarize(&fixture("tiny-qwen2")).unwrap();
        let sharded = summarize(&fixture("tiny-qwen2-sharded")).unwrap();
        assert_eq!(sharded.weight_files, 9);
        assert_eq!(sharded.stored_parameters, single.stored_parameters);
        assert_eq!(sharded.parameters, single.parameters);
        // tiny-qwen2 keeps its template inside tokenizer_config.json.
        assert!(single.has_chat_template);
    }

    #[test]
    fn bad_folders_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let err = summarize(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no config.json"), "{err}");

        copy_model("tiny-llama", dir.path());
        std::fs::write(dir.path().join("model.safetensors"), [200u8, 0, 0]).unwrap();
        let err = summarize(dir.path()).unwrap_err().to_string();
        assert!(err.contains("safetensors header"), "{err}");
        assert!(err.ends_with("model.safetensors"), "{err}");
    }

    #[test]
    fn human_numbers() {
        assert_eq!(format_bytes(999), "999 B");
        assert_eq!(format_bytes(585_064), "585.1 KB");
        assert_eq!(format_bytes(2_400_000_000), "2.4 GB");
        assert_eq!(format_count(134_515_008), "135M");
        assert_eq!(format_count(1_700_000_000), "1.7B");
        assert_eq!(format_count(12_345), "12.3K");
        assert_eq!(format_count(7), "7");
    }
}
