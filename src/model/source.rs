//! One way in for a base model. A person names a model as a Hugging Face folder with safetensors,
//! a folder with only PyTorch `.bin` weights, a `.gguf` file (or a folder holding exactly one), or
//! a Hub id (`org/name`) already in the Hugging Face cache. [`ModelSource::open`] decides which
//! — the one place that decides what counts as a usable model — and [`ModelSource::prepare`]
//! turns it into a [`PreparedModel`]: a loadable safetensors folder (converted once into a cache
//! for `.bin` and GGUF inputs) with its parsed config. Everything downstream (tokenizer, context
//! length, weights, memory estimate) reads the prepared folder.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{weights, ModelConfig, ModelError};
use crate::convert::{self, ConvertError, ConvertReport, SourceKind};

/// Why a named model cannot be used. The text says what to do next; the path comes last.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Nothing was named (an empty path).
    #[error("choose a model: a Hugging Face model folder, a .gguf file, or a Hub id such as HuggingFaceTB/SmolLM2-135M-Instruct")]
    Empty,
    /// The path does not exist and is not a Hub id found in the Hugging Face cache.
    #[error("no such file or folder, and no Hub model of that name in the Hugging Face cache ({cache}); download it first (`finetune download ID` or the Models step) or choose a folder: {given}")]
    NotFound {
        /// What was given.
        given: PathBuf,
        /// The cache folder searched, or "none found", for the message.
        cache: String,
    },
    /// A folder with neither a safetensors or `.bin` checkpoint beside a config.json nor a `.gguf`
    /// file.
    #[error("this folder holds no model: no config.json with safetensors or PyTorch .bin weights, and no .gguf file; choose a Hugging Face model folder or a .gguf file: {0}")]
    NoModel(PathBuf),
    /// A file that is not a `.gguf` (a dataset dropped in the model slot, say).
    #[error("not a model file: models are Hugging Face folders or .gguf files (datasets are .jsonl files): {0}")]
    NotAModelFile(PathBuf),
    /// The model folder is unusable (config.json missing or unreadable, weights missing).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Converting a `.bin` checkpoint or a GGUF file failed.
    #[error(transparent)]
    Convert(#[from] ConvertError),
}

/// How the model's weights are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFormat {
    /// config.json + `model.safetensors` or a sharded safetensors index: loads as it is.
    Safetensors,
    /// config.json + `pytorch_model.bin` (or its shards, listed here): converted once.
    PytorchBin(Vec<PathBuf>),
    /// One GGUF file (config and tokenizer come from its metadata): converted once.
    Gguf(PathBuf),
}

/// A model as a person named it, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSource {
    /// What was given: a path, or a Hub id.
    pub given: PathBuf,
    /// The local folder or file it names (a cache snapshot for a Hub id).
    pub path: PathBuf,
    /// How the weights are stored, which decides whether `prepare` converts.
    pub format: ModelFormat,
    /// `org/name` when it came from the Hugging Face cache.
    pub hub_id: Option<String>,
}

/// A model ready to load: the safetensors folder everything downstream reads.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedModel {
    /// The model as it was named and classified.
    pub source: ModelSource,
    /// The loadable folder: the source itself, or its converted copy.
    pub dir: PathBuf,
    /// `dir/config.json`, parsed.
    pub config: ModelConfig,
    /// What to tell the person about a conversion done now or reused (`None` for safetensors).
    pub message: Option<String>,
    /// The conversion done now (`None` when none was needed or an earlier one was reused).
    pub converted: Option<ConvertReport>,
}

/// One conversion at a time per process: the app's model summary and dataset reader may ask
/// for the same source together; the second waits and reuses the first one's folder.
static CONVERTING: Mutex<()> = Mutex::new(());

impl ModelSource {
    /// Classifies `given`: an existing folder or file, else a Hub id found in the Hugging Face
    /// cache (`refs/main`'s snapshot, or the newest one).
    pub fn open(given: &Path) -> Result<Self, SourceError> {
        Self::open_with_cache(given, crate::inspect::hub_cache_dir().as_deref())
    }

    /// [`ModelSource::open`] with the Hub cache folder passed in (for tests).
    pub fn open_with_cache(given: &Path, hub_cache: Option<&Path>) -> Result<Self, SourceError> {
        if given.as_os_str().is_empty() {
            return Err(SourceError::Empty);
        }
        if given.exists() {
            return Self::classify(given, given, None);
        }
        let text = given.to_string_lossy();
        if let (Some(id), Some(cache)) = (hub_id(&text), hub_cache) {
            if let Some(snapshot) = cached_snapshot(cache, &id) {
                return Self::classify(given, &snapshot, Some(id));
            }
        }
        Err(SourceError::NotFound {
            given: given.to_path_buf(),
            cache: hub_cache.map_or_else(|| "none found".into(), |c| c.display().to_string()),
        })
    }

    fn classify(given: &Path, path: &Path, hub_id: Option<String>) -> Result<Self, SourceError> {
        let source = |format| Self {
            given: given.to_path_buf(),
            path: path.to_path_buf(),
            format,
            hub_id: hub_id.clone(),
        };
        if path.is_dir()
            && path.join("config.json").is_file()
            && weights::checkpoint_files(path).is_ok()
        {
            return Ok(source(ModelFormat::Safetensors));
        }
        match convert::detect(path) {
            Ok(SourceKind::Gguf(file)) => Ok(source(ModelFormat::Gguf(file))),
            Ok(SourceKind::PytorchBin(files)) => {
                // A .bin checkpoint needs the config.json beside it.
                let dir = files
                    .first()
                    .and_then(|f| f.parent())
                    .unwrap_or(path)
                    .to_path_buf();
                if !dir.join("config.json").is_file() {
                    return Err(ModelError::MissingConfig(dir.join("config.json")).into());
                }
                Ok(source(ModelFormat::PytorchBin(files)))
            }
            Err(ConvertError::UnknownInput(_)) if path.is_dir() => {
                if path.join("config.json").is_file() {
                    // config.json without weights: say what the loader would say.
                    weights::checkpoint_files(path)?;
                }
                Err(SourceError::NoModel(path.to_path_buf()))
            }
            Err(ConvertError::UnknownInput(_)) => {
                Err(SourceError::NotAModelFile(path.to_path_buf()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The name a person knows the model by: the Hub id, the folder name, or the GGUF file's
    /// stem.
    pub fn name(&self) -> String {
        if let Some(id) = &self.hub_id {
            return id.clone();
        }
        let named = match &self.format {
            ModelFormat::Gguf(file) if self.given.is_file() => file.file_stem(),
            _ => self.given.file_name(),
        };
        named.map_or_else(
            || self.given.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    }

    /// True when loading needs a conversion that is not in `cache_root` yet (the app shows
    /// "converting…" for it).
    pub fn needs_conversion(&self, cache_root: &Path) -> bool {
        match self.convert_kind() {
            None => false,
            Some(kind) => convert::cached_conversion(&kind, cache_root).is_none(),
        }
    }

    fn convert_kind(&self) -> Option<SourceKind> {
        match &self.format {
            ModelFormat::Safetensors => None,
            ModelFormat::PytorchBin(files) => Some(SourceKind::PytorchBin(files.clone())),
            ModelFormat::Gguf(file) => Some(SourceKind::Gguf(file.clone())),
        }
    }

    /// The loadable folder with its config: the source itself for safetensors, else its
    /// conversion under `cache_root` (made now, once, or reused).
    pub fn prepare(&self, cache_root: &Path) -> Result<PreparedModel, SourceError> {
        let (dir, message, converted) = match self.convert_kind() {
            None => (self.path.clone(), None, None),
            Some(kind) => {
                let _one_at_a_time = CONVERTING.lock().unwrap_or_else(|p| p.into_inner());
                let prepared = convert::prepare_source(&self.path, &kind, cache_root)?;
                (prepared.dir, prepared.message, prepared.converted)
            }
        };
        let config = ModelConfig::from_dir(&dir)?;
        Ok(PreparedModel {
            source: self.clone(),
            dir,
            config,
            message,
            converted,
        })
    }
}

/// Opens and prepares `given` with the default conversion cache
/// ([`convert::converted_cache_dir`]).
pub fn prepare(given: &Path) -> Result<PreparedModel, SourceError> {
    ModelSource::open(given)?.prepare(&convert::converted_cache_dir())
}

/// `org/name` when `text` has the shape of a Hub model id.
fn hub_id(text: &str) -> Option<String> {
    let (org, name) = text.split_once('/')?;
    let ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    (ok(org) && ok(name)).then(|| text.to_owned())
}

/// The snapshot folder of `id` in the Hub cache: the one `refs/main` names, else the newest.
fn cached_snapshot(cache: &Path, id: &str) -> Option<PathBuf> {
    let repo = cache.join(format!("models--{}", id.replacen('/', "--", 1)));
    let snapshots = repo.join("snapshots");
    if let Ok(main) = std::fs::read_to_string(repo.join("refs").join("main")) {
        let dir = snapshots.join(main.trim());
        if dir.is_dir() {
            return Some(dir);
        }
    }
    std::fs::read_dir(&snapshots)
        .ok()?
        .flatten()
        .filter(|e| e.path().is_dir())
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    #[test]
    fn a_safetensors_folder_loads_as_it_is() {
        let dir = fixture("tiny-llama");
        let source = ModelSource::open_with_cache(&dir, None).unwrap();
        assert_eq!(source.format, ModelFormat::Safetensors);
        assert_eq!(source.name(), "tiny-llama");
        let tmp = tempfile::tempdir().unwrap();
        assert!(!source.needs_conversion(tmp.path()));
        let prepared = source.prepare(tmp.path()).unwrap();
        assert_eq!(prepared.dir, dir);
        assert_eq!(prepared.message, None);
        assert!(prepared.config.num_layers > 0);
    }

    #[test]
    fn unusable_inputs_say_what_to_do() {
        let tmp = tempfile::tempdir().unwrap();
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let e = ModelSource::open_with_cache(&empty, None).unwrap_err();
        assert!(matches!(e, SourceError::NoModel(_)), "{e}");
        let config_only = tmp.path().join("config-only");
        std::fs::create_dir(&config_only).unwrap();
        std::fs::write(config_only.join("config.json"), "{}").unwrap();
        let e = ModelSource::open_with_cache(&config_only, None).unwrap_err();
        assert!(
            matches!(e, SourceError::Model(ModelError::MissingWeights(_))),
            "{e}"
        );
        let text = tmp.path().join("notes.txt");
        std::fs::write(&text, "hi").unwrap();
        let e = ModelSource::open_with_cache(&text, None).unwrap_err();
        assert!(matches!(e, SourceError::NotAModelFile(_)), "{e}");
        let e = ModelSource::open_with_cache(Path::new("org/missing"), Some(tmp.path()));
        assert!(
            matches!(e, Err(SourceError::NotFound { .. })),
            "{:?}",
            e.map(|s| s.path)
        );
        assert!(matches!(
            ModelSource::open_with_cache(Path::new(""), None),
            Err(SourceError::Empty)
        ));
    }

    #[test]
    fn a_hub_id_resolves_to_its_main_snapshot() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--org--tiny");
        let snap = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(&snap).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(fixture("tiny-llama").join(f), snap.join(f)).unwrap();
        }
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), "abc123\n").unwrap();
        let source =
            ModelSource::open_with_cache(Path::new("org/tiny"), Some(cache.path())).unwrap();
        assert_eq!(source.path, snap);
        assert_eq!(source.hub_id.as_deref(), Some("org/tiny"));
        assert_eq!(source.name(), "org/tiny");
        assert_eq!(source.format, ModelFormat::Safetensors);
    }

    #[test]
    fn hub_ids_have_one_slash_and_plain_names() {
        assert_eq!(hub_id("org/name-1.5B").as_deref(), Some("org/name-1.5B"));
        for bad in ["name", "/abs/path", "a/b/c", "../x", "org/", "org/na me"] {
            assert_eq!(hub_id(bad), None, "{bad}");
        }
    }
}
