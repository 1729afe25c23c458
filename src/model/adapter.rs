//! PEFT LoRA adapters in and out: `adapter_model.safetensors` + `adapter_config.json` exactly as PEFT
//! writes and reads them (`base_model.model.<module path>.lora_A.weight` (r, in) and `.lora_B.weight`
//! (out, r)). Writes are atomic: each file goes to a temp file in the same folder, then is renamed,
//! so a crash never leaves a half-written adapter behind.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;

use super::config::Family;
use super::lora::{self, Lora, LoraConfig, LoraLinear, LoraState};
use super::Model;

/// File name of the LoRA weights in an adapter folder (PEFT's name).
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// File name of the LoRA settings in an adapter folder (PEFT's name).
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// Errors while reading or writing adapter folders.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// The adapter folder has no `adapter_config.json`; holds the path looked for.
    #[error("no adapter_config.json in the adapter folder; pick a folder saved by PEFT or FineTune: {0}")]
    MissingConfig(PathBuf),
    /// `adapter_config.json` cannot be read, is not JSON, or lacks `r`; also a config that fails to
    /// serialize on save.
    #[error("adapter_config.json cannot be used: {reason}: {path}")]
    InvalidConfig {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The adapter folder has no `adapter_model.safetensors`; holds the path looked for.
    #[error("no adapter_model.safetensors in the adapter folder (PEFT's older adapter_model.bin is not read; re-save it with a current PEFT): {0}")]
    MissingWeights(PathBuf),
    /// The weights file is not readable safetensors, or a module has only one of `lora_A` /
    /// `lora_B`; also weights that fail to serialize on save.
    #[error("adapter weights cannot be read: {reason}: {path}")]
    InvalidWeights {
        /// The weights file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The adapter has weights for a module path this model does not have (another architecture).
    #[error("the adapter has weights for module {module}, which this model does not have; the adapter was trained for another architecture: {path}")]
    UnknownModule {
        /// The module path, e.g. `model.layers.0.self_attn.q_proj`.
        module: String,
        /// The weights file.
        path: PathBuf,
    },
    /// A LoRA tensor's shape does not fit the module it belongs to (another model size).
    #[error(
        "adapter tensor {key} has shape {found:?}, expected {expected:?} for this model: {path}"
    )]
    WrongShape {
        /// The PEFT tensor key.
        key: String,
        /// The shape this model needs: `(r, in)` for `lora_A`, `(out, r)` for `lora_B`.
        expected: Vec<usize>,
        /// The shape stored.
        found: Vec<usize>,
        /// The weights file.
        path: PathBuf,
    },
    /// The adapter uses a PEFT feature FineTune does not implement (DoRA, another `peft_type`, a
    /// per-module `alpha_pattern`, tensors other than `lora_A`/`lora_B`).
    #[error("{what} is not supported: {path}")]
    Unsupported {
        /// The feature, as a phrase.
        what: String,
        /// The config or weights file.
        path: PathBuf,
    },
    /// Creating the adapter folder or writing a file into it failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A tensor operation failed while placing the weights (dtype conversion, device copy).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Writes `bytes` to `path` through a temp file in the same folder and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), std::io::Error> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    // A temporary file is private (0600); the result is an ordinary file (0644).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// The adapter_config.json PEFT expects for `state` on `model`.
pub fn peft_config(
    state: &LoraState,
    model: &Model,
    base_model: Option<&str>,
) -> serde_json::Value {
    let adapted: BTreeSet<String> = model
        .linears()
        .iter()
        .filter(|l| l.lora.is_some())
        .map(|l| l.name().to_owned())
        .collect();
    let c = &state.config;
    let target_modules = if multimodal(model) {
        // A regex (PEFT full-matches it against module paths): the language model's projections
        // only, under transformers 5's `model.language_model.` and 4's `language_model.model.`,
        // so PEFT puts no LoRA on the vision tower's same-named projections.
        let layers = match &c.layers {
            Some(l) => l.iter().map(usize::to_string).collect::<Vec<_>>().join("|"),
            None => r"\d+".to_owned(),
        };
        let names = adapted.into_iter().collect::<Vec<_>>().join("|");
        serde_json::json!(format!(
            r"(.*\.)?language_model\.(model\.)?layers\.({layers})\.(.*\.)?({names})"
        ))
    } else {
        serde_json::json!(adapted.into_iter().collect::<Vec<_>>())
    };
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": c.rank,
        "lora_alpha": c.alpha,
        "lora_dropout": c.dropout,
        "target_modules": target_modules,
        "layers_to_transform": c.layers,
        "use_rslora": c.use_rslora,
        "fan_in_fan_out": model.config.family == Family::Gpt2,
        "bias": "none",
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "use_dora": c.use_dora,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
        "library": "finetune",
    })
}

/// Saves the adapter of `model` (its LoRA `state`) to `dir` in PEFT's layout.
pub fn save(
    dir: &Path,
    state: &LoraState,
    model: &Model,
    base_model: Option<&str>,
) -> Result<(), AdapterError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AdapterError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tensors: HashMap<String, Tensor> = state
        .named_vars()
        .into_iter()
        .map(|(k, v)| (file_key(model, k), v.as_tensor().clone()))
        .collect();
    let bytes = safetensors::tensor::serialize(&tensors, None).map_err(|e| {
        AdapterError::InvalidWeights {
            path: dir.join(ADAPTER_WEIGHTS),
            reason: e.to_string(),
        }
    })?;
    let weights_path = dir.join(ADAPTER_WEIGHTS);
    write_atomic(&weights_path, &bytes).map_err(io(&weights_path))?;
    let config_path = dir.join(ADAPTER_CONFIG);
    let text =
        serde_json::to_string_pretty(&peft_config(state, model, base_model)).map_err(|e| {
            AdapterError::InvalidConfig {
                path: config_path.clone(),
                reason: e.to_string(),
            }
        })?;
    write_atomic(&config_path, text.as_bytes()).map_err(io(&config_path))?;
    Ok(())
}

/// Whether `model` is the language model of a multimodal checkpoint, whose module paths in
/// transformers (and so in PEFT's keys) are `model.language_model.X` where FineTune's are
/// `model.X`.
fn multimodal(model: &Model) -> bool {
    model.config.architecture == "Gemma3ForConditionalGeneration"
}

/// The key a tensor is saved under: PEFT's name for the module in transformers' model.
fn file_key(model: &Model, key: String) -> String {
    match key.strip_prefix("base_model.model.model.") {
        Some(rest) if multimodal(model) => {
            format!("base_model.model.model.language_model.{rest}")
        }
        _ => key,
    }
}

/// A module path in an adapter file as FineTune names it: a multimodal checkpoint's language
/// model (`model.language_model.X` in transformers 5, `language_model.model.X` in 4) is `model.X`.
fn module_path(path: &str) -> std::borrow::Cow<'_, str> {
    match path
        .strip_prefix("model.language_model.")
        .or_else(|| path.strip_prefix("language_model.model."))
    {
        Some(rest) => std::borrow::Cow::Owned(format!("model.{rest}")),
        None => std::borrow::Cow::Borrowed(path),
    }
}

/// `base_model.model.<path>.lora_A[.default].weight` → (`<path>`, "lora_A"); DoRA's
/// `<path>.lora_magnitude_vector[.default[.weight]]` → (`<path>`, "magnitude").
fn parse_key(key: &str) -> Option<(&str, &'static str)> {
    let rest = key.strip_prefix("base_model.model.")?;
    for tail in [
        ".lora_magnitude_vector",
        ".lora_magnitude_vector.default",
        ".lora_magnitude_vector.default.weight",
        ".lora_magnitude_vector.weight",
    ] {
        if let Some(p) = rest.strip_suffix(tail) {
            return Some((p, "magnitude"));
        }
    }
    let rest = rest.strip_suffix(".weight")?;
    let rest = rest.strip_suffix(".default").unwrap_or(rest);
    if let Some(p) = rest.strip_suffix(".lora_A") {
        Some((p, "lora_A"))
    } else {
        rest.strip_suffix(".lora_B").map(|p| (p, "lora_B"))
    }
}

/// Reads the LoRA settings PEFT stored; the targets are taken from the tensors themselves.
fn read_config(path: &Path) -> Result<LoraConfig, AdapterError> {
    let bad = |reason: String| AdapterError::InvalidConfig {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON ({e})")))?;
    if let Some(t) = v.get("peft_type").and_then(|t| t.as_str()) {
        if t != "LORA" {
            return Err(AdapterError::Unsupported {
                what: format!("peft_type {t} (only LORA adapters)"),
                path: path.to_path_buf(),
            });
        }
    }
    let unsupported = |what: &str| AdapterError::Unsupported {
        what: what.to_owned(),
        path: path.to_path_buf(),
    };
    if v.get("alpha_pattern")
        .and_then(|p| p.as_object())
        .is_some_and(|p| !p.is_empty())
    {
        return Err(unsupported("a per-module alpha_pattern"));
    }
    let rank = v
        .get("r")
        .and_then(|r| r.as_u64())
        .ok_or_else(|| bad("missing \"r\"".into()))? as usize;
    let alpha = v
        .get("lora_alpha")
        .and_then(|a| a.as_f64())
        .unwrap_or(rank as f64);
    let layers = match v.get("layers_to_transform") {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|n| vec![n as usize]),
        Some(serde_json::Value::Array(a)) => Some(
            a.iter()
                .filter_map(|n| n.as_u64())
                .map(|n| n as usize)
                .collect(),
        ),
        _ => None,
    };
    Ok(LoraConfig {
        rank,
        alpha,
        dropout: v
            .get("lora_dropout")
            .and_then(|d| d.as_f64())
            .unwrap_or(0.0),
        targets: Vec::new(),
        layers,
        use_rslora: v
            .get("use_rslora")
            .and_then(|r| r.as_bool())
            .unwrap_or(false),
        use_dora: v.get("use_dora").and_then(|d| d.as_bool()).unwrap_or(false),
    })
}

/// One module's low-rank update, as a merge needs it: `ΔW = scale · B · A` (out, in).
#[derive(Debug, Clone)]
pub struct ModuleDelta {
    /// `lora_A` (r, in), f32.
    pub a: Tensor,
    /// `lora_B` (out, r), f32.
    pub b: Tensor,
    /// alpha / r (alpha / √r with rsLoRA).
    pub scale: f64,
    /// DoRA's magnitude (out,), f32, for a DoRA module: the merged weight is then
    /// `m/‖W + ΔW‖ ⊙ (W + ΔW)` ([`super::dora::fold`]).
    pub magnitude: Option<Tensor>,
}

/// An adapter's updates read without a model: by module path (e.g.
/// `model.layers.0.self_attn.q_proj`), and whether the base stores those weights transposed
/// (`fan_in_fan_out`, GPT-2's Conv1D).
pub fn read_deltas(dir: &Path) -> Result<(HashMap<String, ModuleDelta>, bool), AdapterError> {
    let config_path = dir.join(ADAPTER_CONFIG);
    if !config_path.is_file() {
        return Err(AdapterError::MissingConfig(config_path));
    }
    let config = read_config(&config_path)?;
    let fan_in_fan_out = std::fs::read_to_string(&config_path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("fan_in_fan_out").and_then(serde_json::Value::as_bool))
        .unwrap_or(false);
    let weights_path = dir.join(ADAPTER_WEIGHTS);
    if !weights_path.is_file() {
        return Err(AdapterError::MissingWeights(weights_path));
    }
    let mut deltas = HashMap::new();
    let (pairs, mut magnitudes) = read_pairs(&weights_path, &Device::Cpu)?;
    for (path, pair) in pairs {
        let (Some(a), Some(b)) = pair else {
            return Err(AdapterError::InvalidWeights {
                path: weights_path.clone(),
                reason: format!("module {path} has only one of lora_A / lora_B"),
            });
        };
        let r = a.dim(0)?;
        if b.dims().len() != 2 || b.dim(1)? != r {
            return Err(AdapterError::InvalidWeights {
                path: weights_path.clone(),
                reason: format!(
                    "module {path}: lora_B is {:?}, lora_A {:?}",
                    b.dims(),
                    a.dims()
                ),
            });
        }
        let magnitude = match magnitudes.remove(&path) {
            Some(m) => Some(m.to_dtype(DType::F32)?),
            None => None,
        };
        let delta = ModuleDelta {
            a: a.to_dtype(DType::F32)?,
            b: b.to_dtype(DType::F32)?,
            scale: module_scale(&config, r),
            magnitude,
        };
        deltas.insert(path, delta);
    }
    if let Some(path) = magnitudes.keys().next() {
        return Err(AdapterError::InvalidWeights {
            path: weights_path,
            reason: format!("module {path} has a DoRA magnitude but no lora_A / lora_B"),
        });
    }
    Ok((deltas, fan_in_fan_out))
}

/// Each module's (lora_A, lora_B) tensors, by module path.
pub(crate) type Pairs = HashMap<String, (Option<Tensor>, Option<Tensor>)>;

/// Each DoRA module's magnitude vector, by module path.
pub(crate) type Magnitudes = HashMap<String, Tensor>;

/// Loads an adapter onto `model` (replacing any adapter) and returns its state, ready to train
/// further or to run: a PEFT adapter folder, an mlx-lm adapter folder (`adapters.safetensors`),
/// or a llama.cpp GGUF LoRA file ([`super::import`]).
pub fn load(path: &Path, model: &mut Model) -> Result<LoraState, AdapterError> {
    let is_gguf = path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let (config, pairs, magnitudes, weights_path) = if is_gguf {
        let (c, p, w) = super::import::read_gguf_lora(path, model)?;
        (c, p, Magnitudes::new(), w)
    } else if !path.join(ADAPTER_WEIGHTS).is_file()
        && path.join(super::import::MLX_WEIGHTS).is_file()
    {
        super::import::read_mlx(path, model)?
    } else {
        read_peft(path, model.device())?
    };
    attach(config, pairs, magnitudes, &weights_path, model)
}

/// A PEFT adapter folder's settings and (A, B) pairs by module path, and its weights file.
#[allow(clippy::type_complexity)]
fn read_peft(
    dir: &Path,
    device: &Device,
) -> Result<(LoraConfig, Pairs, Magnitudes, PathBuf), AdapterError> {
    let config_path = dir.join(ADAPTER_CONFIG);
    if !config_path.is_file() {
        return Err(AdapterError::MissingConfig(config_path));
    }
    let config = read_config(&config_path)?;
    let weights_path = dir.join(ADAPTER_WEIGHTS);
    if !weights_path.is_file() {
        return Err(AdapterError::MissingWeights(weights_path));
    }
    let (pairs, magnitudes) = read_pairs(&weights_path, device)?;
    Ok((config, pairs, magnitudes, weights_path))
}

/// Puts `pairs` (A (r, in), B (out, r) by module path) on `model`'s projections.
fn attach(
    mut config: LoraConfig,
    mut pairs: Pairs,
    mut magnitudes: Magnitudes,
    weights_path: &Path,
    model: &mut Model,
) -> Result<LoraState, AdapterError> {
    let weights_path = weights_path.to_path_buf();
    let known: BTreeSet<String> = model.linears().iter().map(|l| l.path.clone()).collect();
    if let Some(unknown) = pairs
        .keys()
        .chain(magnitudes.keys())
        .find(|p| !known.contains(*p))
    {
        return Err(AdapterError::UnknownModule {
            module: unknown.clone(),
            path: weights_path.clone(),
        });
    }
    model.detach_lora();
    let varmap = VarMap::new();
    let dropout_seed = lora::DropoutSeed::default();
    let mut targets = BTreeSet::new();
    for lin in model.linears_mut() {
        let Some(pair) = pairs.remove(&lin.path) else {
            continue;
        };
        let (a, b) = checked_pair(lin, pair, &weights_path)?;
        // Rank per module comes from the tensors, which also covers PEFT's rank_pattern.
        let r = a.dim(0)?;
        let a = Var::from_tensor(&a.to_dtype(DType::F32)?)?;
        let b = Var::from_tensor(&b.to_dtype(DType::F32)?)?;
        lora::insert(&varmap, &lin.path, &a, &b);
        let magnitude = match magnitudes.remove(&lin.path) {
            Some(m) => Some(checked_magnitude(lin, m, &weights_path)?),
            None if config.use_dora => {
                return Err(AdapterError::InvalidWeights {
                    path: weights_path,
                    reason: format!(
                        "the adapter is DoRA (use_dora) but module {} has no lora_magnitude_vector",
                        lin.path
                    ),
                })
            }
            None => None,
        };
        if let Some(m) = &magnitude {
            lora::insert_magnitude(&varmap, &lin.path, m);
        }
        lin.lora = Some(Lora {
            a,
            b,
            scale: module_scale(&config, r),
            dropout: config.dropout,
            seed: dropout_seed.clone(),
            enabled: true,
            magnitude,
            norm_cache: Default::default(),
        });
        targets.insert(lin.name().to_owned());
    }
    if let Some(path) = magnitudes.keys().next() {
        return Err(AdapterError::InvalidWeights {
            path: weights_path,
            reason: format!("module {path} has a DoRA magnitude but no lora_A / lora_B"),
        });
    }
    config.targets = targets.into_iter().collect();
    Ok(LoraState {
        config,
        varmap,
        dropout_seed,
    })
}

/// Reads the adapter weights and pairs each module's lora_A with its lora_B; DoRA magnitudes
/// apart.
fn read_pairs(weights_path: &Path, device: &Device) -> Result<(Pairs, Magnitudes), AdapterError> {
    let tensors = candle_core::safetensors::load(weights_path, device).map_err(|e| {
        AdapterError::InvalidWeights {
            path: weights_path.to_path_buf(),
            reason: format!("not a readable safetensors file ({e})"),
        }
    })?;
    let mut pairs = Pairs::new();
    let mut magnitudes = Magnitudes::new();
    for (key, t) in tensors {
        let (path, which) = parse_key(&key).ok_or_else(|| AdapterError::Unsupported {
            what: format!(
                "adapter tensor {key} (only lora_A/lora_B of linear layers and DoRA magnitudes)"
            ),
            path: weights_path.to_path_buf(),
        })?;
        let path = module_path(path).into_owned();
        if which == "magnitude" {
            magnitudes.insert(path, t);
            continue;
        }
        let entry = pairs.entry(path).or_default();
        if which == "lora_A" {
            entry.0 = Some(t);
        } else {
            entry.1 = Some(t);
        }
    }
    Ok((pairs, magnitudes))
}

/// A DoRA magnitude of shape (out,) for `lin`, as an f32 `Var`.
fn checked_magnitude(
    lin: &LoraLinear,
    m: Tensor,
    weights_path: &Path,
) -> Result<Var, AdapterError> {
    if m.dims() != [lin.out_features()] {
        return Err(AdapterError::WrongShape {
            key: super::dora::magnitude_key(&lin.path),
            expected: vec![lin.out_features()],
            found: m.dims().to_vec(),
            path: weights_path.to_path_buf(),
        });
    }
    Ok(Var::from_tensor(&m.to_dtype(DType::F32)?)?)
}

/// Both tensors of `lin`'s pair, with the shapes `lin` implies: A `(r, in)`, B `(out, r)`.
fn checked_pair(
    lin: &LoraLinear,
    pair: (Option<Tensor>, Option<Tensor>),
    weights_path: &Path,
) -> Result<(Tensor, Tensor), AdapterError> {
    let (Some(a), Some(b)) = pair else {
        return Err(AdapterError::InvalidWeights {
            path: weights_path.to_path_buf(),
            reason: format!("module {} has only one of lora_A / lora_B", lin.path),
        });
    };
    let r = a.dim(0)?;
    let check = |t: &Tensor, which: &str, expected: Vec<usize>| {
        if t.dims() != expected.as_slice() {
            Err(AdapterError::WrongShape {
                key: lora::peft_key(&lin.path, which),
                expected,
                found: t.dims().to_vec(),
                path: weights_path.to_path_buf(),
            })
        } else {
            Ok(())
        }
    };
    check(&a, "lora_A", vec![r, lin.in_features()])?;
    check(&b, "lora_B", vec![lin.out_features(), r])?;
    Ok((a, b))
}

/// The scale of a module of rank `r`: the config's when `r` is its rank, else alpha over `r`
/// (or over √r with rsLoRA), as PEFT computes it for a rank_pattern entry.
pub(crate) fn module_scale(config: &LoraConfig, r: usize) -> f64 {
    if r == config.rank {
        config.scale()
    } else if config.use_rslora {
        config.alpha / (r as f64).sqrt()
    } else {
        config.alpha / r as f64
    }
}
