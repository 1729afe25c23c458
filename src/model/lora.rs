//! LoRA with PEFT semantics: `y = W·x + b + s·B(A(dropout(x)))`, `s = alpha/r` (rsLoRA:
//! `alpha/√r`), and DoRA's magnitude on top when asked ([`super::dora`]). A is kaiming-uniform
//! (a = √5, i.e. U(±1/√in)) and B zero at init, as PEFT does.
//! LoRA tensors are f32 `Var`s in their own `VarMap`, keyed by their PEFT names
//! (`base_model.model.<module path>.lora_A.weight`); base weights are plain tensors and never
//! receive gradients.

use std::collections::BTreeSet;

use candle_core::{DType, Module, Result, Tensor, Var, D};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};

use super::kernels;
pub use super::quant::Frozen;

/// What to adapt and how.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    /// Rank r of A (r, in) and B (out, r). Default 8.
    pub rank: usize,
    /// Scale numerator: s = alpha / r (or alpha / √r with rsLoRA). Default 16.
    pub alpha: f64,
    /// Dropout on the LoRA input during training, 0..1. Default 0.
    pub dropout: f64,
    /// Module names to adapt (PEFT matching: a module path equal to or ending in `.name`). Empty =
    /// every linear projection of every layer.
    pub targets: Vec<String>,
    /// Layer indices to adapt; `None` = all layers.
    pub layers: Option<Vec<usize>>,
    /// rsLoRA scaling alpha/√r.
    pub use_rslora: bool,
    /// DoRA: a trainable magnitude per output row besides A and B ([`super::dora`]).
    pub use_dora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: Vec::new(),
            layers: None,
            use_rslora: false,
            use_dora: false,
        }
    }
}

impl LoraConfig {
    /// The factor s on the LoRA term: alpha / r, or alpha / √r with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// PEFT's key for a LoRA tensor of the module at `path` (`which` is `lora_A` or `lora_B`).
pub fn peft_key(path: &str, which: &str) -> String {
    format!("base_model.model.{path}.{which}.weight")
}

/// PEFT's module matching for a list of target names: the path equals the name or ends with
/// `.name`.
pub fn path_matches(path: &str, target: &str) -> bool {
    path == target || path.ends_with(&format!(".{target}"))
}

/// The low-rank update attached to one linear layer.
#[derive(Debug, Clone)]
pub struct Lora {
    /// (r, in), f32
    pub a: Var,
    /// (out, r), f32
    pub b: Var,
    /// s = alpha / r (or alpha / √r), see [`LoraConfig::scale`].
    pub scale: f64,
    /// Dropout probability on the LoRA input during training, 0..1.
    pub dropout: f64,
    /// Seed of the current forward pass's dropout masks, shared by every module of a model and set
    /// by the trainer before each micro-batch ([`DropoutSeed::set`]), so dropout is deterministic
    /// and a resumed run draws the same masks (Candle's CPU RNG cannot be seeded).
    pub seed: DropoutSeed,
    /// Whether the update is applied: off runs the base projection alone, keeping A and B (base
    /// vs tuned from one copy of the weights, [`super::Model::set_lora_enabled`]). On when
    /// attached or loaded.
    pub enabled: bool,
    /// DoRA's magnitude (out,), f32, when the module is a DoRA module ([`super::dora`]).
    pub magnitude: Option<Var>,
    /// DoRA's row norm, kept while generating ([`super::dora::NormCache`]).
    pub norm_cache: super::dora::NormCache,
}

/// Shared, settable seed for LoRA dropout masks.
#[derive(Debug, Clone, Default)]
pub struct DropoutSeed(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl DropoutSeed {
    /// Sets the seed every module sharing this handle uses from its next forward pass.
    pub fn set(&self, seed: u64) {
        self.0.store(seed, std::sync::atomic::Ordering::Relaxed);
    }

    /// The current seed.
    pub fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A 64-bit mix of two values (splitmix64 finalizer), for deriving per-module seeds.
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn path_hash(path: &str) -> u64 {
    path.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Inverted dropout on `x` with a mask drawn from `seed`.
/// On CUDA the mask is drawn there (the device's generator, seeded per module and pass), so no
/// mask crosses the bus; on the CPU and Metal by our own seeded generator (Candle's CPU one cannot
/// be seeded, Metal's does not replay reliably). Both replay exactly for the same seed on the same
/// device.
fn seeded_dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    // On CUDA the device's generator draws the mask. Metal's cannot be trusted to replay it: its
    // seed buffer is written at once while kernels run later in batches, and its kernel rewrites
    // the seed other threads read (docs/metal.md, gap 5), so gradient checkpointing could recompute
    // with other masks. There, as on the CPU, the mask comes from the seeded host generator.
    if x.device().is_cuda() {
        x.device().set_seed(seed)?;
        let keep = 1.0 / (1.0 - p);
        let r = Tensor::rand(0f32, 1f32, x.shape(), x.device())?;
        let mask = (r.ge(p)?.to_dtype(DType::F32)? * keep)?;
        return x * mask.to_dtype(x.dtype())?;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let keep = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
        .collect();
    x * Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?
}

/// `x` `(..., in)` as the f32 `(N, in)` LoRA input, cast once for the projections in `linears`
/// that read it (LoRA attached, not fused on CUDA), when more than one does and `x` is not f32
/// already (`None`: each casts for itself, or nothing to share).
pub fn lora_input_f32(x: &Tensor, linears: &[&LoraLinear], train: bool) -> Result<Option<Tensor>> {
    let readers = linears
        .iter()
        .filter(|l| l.active().is_some() && !l.fused_op(x, train))
        .count();
    if x.dtype() == DType::F32 || readers < 2 {
        return Ok(None);
    }
    let in_f = x.dim(D::Minus1)?;
    Ok(Some(x.reshape(((), in_f))?.to_dtype(DType::F32)?))
}

/// A frozen linear projection with an optional LoRA update. Weights are held (out, in) whatever
/// the checkpoint layout (GPT-2's Conv1D (in, out) is transposed on load).
#[derive(Debug, Clone)]
pub struct LoraLinear {
    /// HF module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    /// Layer index this projection belongs to.
    pub layer: usize,
    /// (out, in), frozen: the compute dtype, or quantized.
    pub weight: Frozen,
    /// (out), compute dtype, frozen; `None` for projections without bias.
    pub bias: Option<Tensor>,
    /// The attached LoRA update, if any.
    pub lora: Option<Lora>,
}

impl LoraLinear {
    /// Input width (`in`).
    pub fn in_features(&self) -> usize {
        self.weight.dims2().1
    }

    /// Output width (`out`).
    pub fn out_features(&self) -> usize {
        self.weight.dims2().0
    }

    /// The module's short name (`q_proj`, `c_attn`, ...).
    pub fn name(&self) -> &str {
        self.path.rsplit('.').next().unwrap_or(&self.path)
    }

    /// The attached LoRA update when it is switched on ([`Lora::enabled`]).
    pub fn active(&self) -> Option<&Lora> {
        self.lora.as_ref().filter(|l| l.enabled)
    }

    /// Whether the fused CPU decoding step can run this projection: a float weight and no DoRA
    /// magnitude (the step knows plain LoRA on float weights only).
    pub fn plain_for_fused_decode(&self) -> bool {
        self.active().is_none_or(|l| l.magnitude.is_none())
            && matches!(self.weight, Frozen::Dense(_))
    }

    /// `x` `(..., in)` → `(..., out)`. Dropout on the LoRA input only when `train`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_opts(x, train, false)
    }

    /// As [`LoraLinear::forward`]; `detach_lora` uses A and B as constants (no graph).
    pub fn forward_opts(&self, x: &Tensor, train: bool, detach_lora: bool) -> Result<Tensor> {
        self.forward_shared(x, None, train, detach_lora)
    }

    /// As [`LoraLinear::forward_opts`], with the LoRA input `x` already in f32 as `(N, in)`
    /// when several projections of the same input share that cast ([`lora_input_f32`]).
    pub fn forward_shared(
        &self,
        x: &Tensor,
        x_f32: Option<&Tensor>,
        train: bool,
        detach_lora: bool,
    ) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_f = self.in_features();
        let x2 = x.reshape(((), in_f))?;
        if let Some(l) = self.active() {
            if let Some(m) = &l.magnitude {
                let y = self.forward_dora(&x2, x_f32, l, m, train, detach_lora)?;
                return self.finish(y, dims);
            }
            if self.fused_op(&x2, train) {
                let (a, b) = if detach_lora {
                    (l.a.as_tensor().detach(), l.b.as_tensor().detach())
                } else {
                    (l.a.as_tensor().clone(), l.b.as_tensor().clone())
                };
                let y = match &self.weight {
                    Frozen::Dense(w) => kernels::lora_linear(&x2, w, &a, &b, l.scale)?,
                    Frozen::Quant(q) => kernels::qlora_linear(&x2, q.qtensor(), &a, &b, l.scale)?,
                };
                return self.finish(y, dims);
            }
        }
        // The LoRA term s·(dropout(x)·Aᵀ)·Bᵀ in f32, with s folded into the (r, out) factor so no
        // (N, out) intermediate is kept besides the update itself.
        let update = match self.active() {
            Some(l) => {
                let mut h = match x_f32 {
                    Some(h) => h.clone(),
                    None => x2.to_dtype(DType::F32)?,
                };
                if train && l.dropout > 0.0 {
                    h = seeded_dropout(&h, l.dropout, mix(l.seed.get(), path_hash(&self.path)))?;
                }
                let (a, b) = if detach_lora {
                    (l.a.as_tensor().detach(), l.b.as_tensor().detach())
                } else {
                    (l.a.as_tensor().clone(), l.b.as_tensor().clone())
                };
                if detach_lora
                    && !train
                    && h.device().is_cpu()
                    && h.dim(0)? <= kernels::cpu::gemv::MAX_ROWS
                {
                    // Decoding: two small products through the frozen-linear kernel (no graph,
                    // A and B read once), the scale on the (N, r) middle.
                    let mid = (kernels::frozen_linear(&h, &a)? * l.scale)?;
                    Some(kernels::frozen_linear(&mid, &b)?.to_dtype(x2.dtype())?)
                } else {
                    let bt = (b.t()? * l.scale)?;
                    Some(h.matmul(&a.t()?)?.matmul(&bt)?.to_dtype(x2.dtype())?)
                }
            }
            None => None,
        };
        let y = self.weight.linear_plus(&x2, update.as_ref())?;
        self.finish(y, dims)
    }

    /// A DoRA module's output before the bias ([`super::dora`]), `x2` (N, in).
    fn forward_dora(
        &self,
        x2: &Tensor,
        x_f32: Option<&Tensor>,
        l: &Lora,
        m: &Var,
        train: bool,
        detach_lora: bool,
    ) -> Result<Tensor> {
        let take = |v: &Var| {
            if detach_lora {
                v.as_tensor().detach()
            } else {
                v.as_tensor().clone()
            }
        };
        let (a, b, m) = (take(&l.a), take(&l.b), take(m));
        let norm = l
            .norm_cache
            .get_or(|| super::dora::weight_norm(self.weight.dense()?.as_ref(), &a, &b, l.scale))?;
        let g = m.broadcast_div(&norm)?;
        let h = match x_f32 {
            Some(h) => h.clone(),
            None => x2.to_dtype(DType::F32)?,
        };
        let dropped = if train && l.dropout > 0.0 {
            let h = seeded_dropout(&h, l.dropout, mix(l.seed.get(), path_hash(&self.path)))?;
            Some(h)
        } else {
            None
        };
        let hd = dropped.as_ref().unwrap_or(&h);
        let update = hd.matmul(&a.t()?)?.matmul(&(b.t()? * l.scale)?)?;
        match &dropped {
            // (W·x + s·B·A·x) as one product, as plain LoRA computes it, then scaled: the graph
            // keeps one more (N, out) tensor than LoRA does.
            None => {
                let sum = self
                    .weight
                    .linear_plus(x2, Some(&update.to_dtype(x2.dtype())?))?;
                sum.broadcast_mul(&g.to_dtype(sum.dtype())?)
            }
            Some(d) => {
                let wx = self.weight.linear_plus(x2, None)?;
                let wd = self.weight.linear_plus(&d.to_dtype(x2.dtype())?, None)?;
                super::dora::combine_dropout(&wx, &wd, &update, &g)
            }
        }
    }

    /// Whether [`LoraLinear::forward_shared`] runs this projection with its LoRA term as one op
    /// (`kernels::lora_linear`, or `kernels::qlora_linear` over a quantized weight; CUDA, and
    /// the CPU for float weights): LoRA
    /// attached, no dropout in this pass, and the kernel plan choosing it for `x`
    /// ([`kernels::lora_linear_fused`], [`kernels::qlora_linear_fused`]).
    pub fn fused_op(&self, x: &Tensor, train: bool) -> bool {
        // Decoding a few rows on the CPU keeps its own path (two one-row products, see below).
        let rows = x.elem_count() / self.in_features().max(1);
        let decoding = !train && x.device().is_cpu() && rows <= kernels::cpu::gemv::MAX_ROWS;
        if decoding {
            return false;
        }
        match self.active() {
            Some(l) if l.magnitude.is_none() => match &self.weight {
                Frozen::Dense(w) => kernels::lora_linear_fused(x, w, train && l.dropout > 0.0),
                Frozen::Quant(_) => kernels::qlora_linear_fused(x, train && l.dropout > 0.0),
            },
            Some(_) => false,
            None => false,
        }
    }

    /// The bias added to `y` `(N, out)`, reshaped to the input's leading `dims`.
    fn finish(&self, mut y: Tensor, dims: Vec<usize>) -> Result<Tensor> {
        if let Some(b) = &self.bias {
            y = kernels::add_bias(&y, b)?;
        }
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = self.out_features();
        }
        y.reshape(out_dims)
    }
}

impl Module for LoraLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        LoraLinear::forward(self, x, false)
    }
}

/// Errors while attaching or loading adapters.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// A name in [`LoraConfig::targets`] matches no linear module of the model.
    #[error("LoRA target(s) {missing:?} match no module of this model; its linear modules are {available:?}")]
    UnknownTargets {
        /// The target names that matched nothing.
        missing: Vec<String>,
        /// The model's linear module names (`q_proj`, `c_attn`, ...), to choose from.
        available: Vec<String>,
    },
    /// A layer index in [`LoraConfig::layers`] is not below the model's layer count.
    #[error(
        "layer(s) {missing:?} do not exist: the model has {num_layers} layers (0..{num_layers})"
    )]
    UnknownLayers {
        /// The indices out of range.
        missing: Vec<usize>,
        /// The model's layer count.
        num_layers: usize,
    },
    /// [`LoraConfig::rank`] is 0.
    #[error("LoRA rank must be at least 1")]
    ZeroRank,
    /// [`LoraConfig::dropout`] is outside [0, 1) (or NaN); holds the value given.
    #[error("LoRA dropout must be in [0, 1), got {0}")]
    BadDropout(f64),
    /// Candle failed while creating or loading the A and B tensors.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The trainable side of a model: LoRA settings and the VarMap holding every A and B.
#[derive(Clone)]
pub struct LoraState {
    /// The settings the adapter was attached with.
    pub config: LoraConfig,
    /// Every A and B, keyed by its PEFT name ([`peft_key`]).
    pub varmap: VarMap,
    /// Seed of the dropout masks of the next forward pass.
    pub dropout_seed: DropoutSeed,
}

impl std::fmt::Debug for LoraState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraState")
            .field("config", &self.config)
            .field("parameters", &self.parameter_count())
            .finish()
    }
}

impl LoraState {
    /// All (PEFT key, var) pairs, sorted by key so saving and optimizing are deterministic.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let data = match self.varmap.data().lock() {
            Ok(d) => d,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Number of trainable parameters.
    pub fn parameter_count(&self) -> usize {
        self.named_vars().iter().map(|(_, v)| v.elem_count()).sum()
    }
}

/// Checks `config` against the model's linear layers; returns the chosen module paths.
pub fn select<'a>(
    linears: impl Iterator<Item = &'a LoraLinear>,
    config: &LoraConfig,
    num_layers: usize,
) -> std::result::Result<BTreeSet<String>, LoraError> {
    if config.rank == 0 {
        return Err(LoraError::ZeroRank);
    }
    if !(0.0..1.0).contains(&config.dropout) {
        return Err(LoraError::BadDropout(config.dropout));
    }
    if let Some(layers) = &config.layers {
        let missing: Vec<usize> = layers
            .iter()
            .copied()
            .filter(|&l| l >= num_layers)
            .collect();
        if !missing.is_empty() {
            return Err(LoraError::UnknownLayers {
                missing,
                num_layers,
            });
        }
    }
    let all: Vec<&LoraLinear> = linears.collect();
    let missing: Vec<String> = config
        .targets
        .iter()
        .filter(|t| !all.iter().any(|l| path_matches(&l.path, t)))
        .cloned()
        .collect();
    if !missing.is_empty() {
        let available: BTreeSet<String> = all.iter().map(|l| l.name().to_owned()).collect();
        return Err(LoraError::UnknownTargets {
            missing,
            available: available.into_iter().collect(),
        });
    }
    Ok(all
        .iter()
        .filter(|l| {
            config.targets.is_empty() || config.targets.iter().any(|t| path_matches(&l.path, t))
        })
        .filter(|l| {
            config
                .layers
                .as_ref()
                .is_none_or(|ls| ls.contains(&l.layer))
        })
        .map(|l| l.path.clone())
        .collect())
}

/// Attaches fresh LoRA weights (A kaiming-uniform from `seed`, B zero) to the selected linears.
pub fn attach(
    linears: Vec<&mut LoraLinear>,
    config: &LoraConfig,
    num_layers: usize,
    seed: u64,
) -> std::result::Result<LoraState, LoraError> {
    let chosen = select(linears.iter().map(|l| &**l), config, num_layers)?;
    let varmap = VarMap::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let scale = config.scale();
    let seed_cell = DropoutSeed::default();
    for lin in linears {
        if !chosen.contains(&lin.path) {
            lin.lora = None;
            continue;
        }
        let (out_f, in_f) = (lin.out_features(), lin.in_features());
        let device = lin.weight.device();
        // kaiming_uniform_(a=√5): gain √(2/(1+5)), bound = gain·√3/√fan_in = 1/√fan_in.
        let bound = 1.0 / (in_f as f32).sqrt();
        let a: Vec<f32> = (0..config.rank * in_f)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (config.rank, in_f), &device)?)?;
        let b = Var::zeros((out_f, config.rank), DType::F32, &device)?;
        insert(&varmap, &lin.path, &a, &b);
        let magnitude = if config.use_dora {
            let m = Var::from_tensor(&super::dora::initial_magnitude(
                lin.weight.dense()?.as_ref(),
            )?)?;
            insert_magnitude(&varmap, &lin.path, &m);
            Some(m)
        } else {
            None
        };
        lin.lora = Some(Lora {
            a,
            b,
            scale,
            dropout: config.dropout,
            seed: seed_cell.clone(),
            enabled: true,
            magnitude,
            norm_cache: Default::default(),
        });
    }
    Ok(LoraState {
        config: config.clone(),
        varmap,
        dropout_seed: seed_cell,
    })
}

/// Registers A and B of the module at `path` in `varmap` under their PEFT keys.
pub fn insert(varmap: &VarMap, path: &str, a: &Var, b: &Var) {
    let mut data = match varmap.data().lock() {
        Ok(d) => d,
        Err(poisoned) => poisoned.into_inner(),
    };
    data.insert(peft_key(path, "lora_A"), a.clone());
    data.insert(peft_key(path, "lora_B"), b.clone());
}

/// Registers the DoRA magnitude of the module at `path` in `varmap` under its PEFT key.
pub fn insert_magnitude(varmap: &VarMap, path: &str, m: &Var) {
    let mut data = match varmap.data().lock() {
        Ok(d) => d,
        Err(poisoned) => poisoned.into_inner(),
    };
    data.insert(super::dora::magnitude_key(path), m.clone());
}
