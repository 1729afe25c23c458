//! Models: Hugging Face config parsing, weight loading, the llama-family and GPT-2 forward passes,
//! LoRA, differentiable ops and PEFT adapter files. Candle-transformers models cannot take LoRA
//! (private Linear, fused no-backward ops), so the model files are written here, keeping checkpoint
//! key names.
//!
//! Shape legend, for comments and variable names throughout `model/`:
//!
//! | name | meaning                                             | config field               |
//! |------|-----------------------------------------------------|----------------------------|
//! | B    | batch rows                                          |                            |
//! | T    | sequence length (tokens per row)                    |                            |
//! | N    | rows of a flattened batch, B·T (or those with loss) |                            |
//! | D    | hidden size                                         | `hidden_size`              |
//! | H    | query (attention) heads                             | `num_heads`                |
//! | KV   | key/value heads (GQA: H is a multiple of KV)        | `num_kv_heads`             |
//! | Dh   | head dim (D = H·Dh for most models, not Qwen3)      | `head_dim`                 |
//! | Q    | query width H·Dh                                    |                            |
//! | I    | intermediate (MLP) size                             | `intermediate_size`        |
//! | V    | vocabulary size                                     | `vocab_size`               |
//! | r    | LoRA rank                                           | `LoraConfig::rank`         |
//!
//! E.g. hidden states are `(B, T, D)`, q is `(B, H, T, Dh)` after the head split, k and v
//! `(B, KV, T, Dh)`, attention scores `(B, H, T, T)`, logits `(N, V)`, LoRA A `(r, in)`.

pub mod adapter;
pub mod attention;
pub mod bf16;
pub mod cache;
pub mod config;
pub mod dora;
pub mod gpt2;
mod grad;
pub mod import;
pub mod kernels;
pub mod llama;
pub mod lora;
pub mod loss;
pub mod ops;
pub mod qload;
pub mod quant;
pub mod recompute;
pub mod source;
pub mod weights;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, TensorId, Var};

pub use cache::KvCache;
pub use config::{Family, ModelConfig, SUPPORTED_ARCHITECTURES};
pub use lora::{LoraConfig, LoraError, LoraLinear, LoraState};
pub use source::{ModelFormat, ModelSource, PreparedModel, SourceError};

/// Errors while loading a model folder.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model folder has no `config.json`; holds the path looked for.
    #[error("no config.json in the model folder; pick a Hugging Face model folder (it holds config.json and *.safetensors): {0}")]
    MissingConfig(PathBuf),
    /// `config.json` is not JSON, lacks a needed field, or names an unsupported architecture.
    #[error("config.json cannot be used: {reason}: {path}")]
    InvalidConfig {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Neither `model.safetensors` nor a shard the index lists exists; holds the path looked for.
    #[error("no safetensors weights found (expected model.safetensors or the shards listed in model.safetensors.index.json); download the model again or convert .bin/GGUF with `finetune convert`: {0}")]
    MissingWeights(PathBuf),
    /// A weights file or the shard index is not readable, or a tensor in it cannot be loaded.
    #[error("weights cannot be read: {reason}: {path}")]
    InvalidWeights {
        /// The weights or index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor the architecture needs is in none of the checkpoint's files.
    #[error("tensor {name} is missing from the checkpoint; the files do not match config.json (wrong or partial download?): {dir}")]
    MissingTensor {
        /// The checkpoint key, e.g. `model.layers.0.self_attn.q_proj.weight`.
        name: String,
        /// The model folder.
        dir: PathBuf,
    },
    /// A tensor's shape differs from what `config.json` implies (weights of another model size).
    #[error("tensor {name} has shape {found:?} but config.json implies {expected:?}; the weights and config.json do not belong together: {path}")]
    WrongShape {
        /// The checkpoint key.
        name: String,
        /// The shape config.json implies, as stored (`(out, in)`; GPT-2's Conv1D `(in, out)`).
        expected: Vec<usize>,
        /// The shape stored.
        found: Vec<usize>,
        /// The file holding the tensor.
        path: PathBuf,
    },
    /// A file of the model folder cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Candle failed while building the model's tensors (e.g. out of device memory).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// One forward pass's inputs, as tensors on the model's device.
#[derive(Debug, Clone)]
pub struct ModelInput {
    /// (B, T) u32 token ids.
    pub input_ids: Tensor,
    /// (B, T) u32 positions; `None` = 0..T for every row.
    pub position_ids: Option<Tensor>,
    /// Additive attention bias broadcastable to (B, H, T, T), usually (B or 1, 1, T, T); `None` =
    /// causal.
    pub attn_bias: Option<Tensor>,
}

impl ModelInput {
    /// Plain causal input: positions 0..T, causal mask.
    pub fn causal(input_ids: Tensor) -> Self {
        Self {
            input_ids,
            position_ids: None,
            attn_bias: None,
        }
    }

    /// The attention bias to add to scores, in `dtype`.
    pub(crate) fn bias(&self, dtype: DType) -> candle_core::Result<Tensor> {
        match &self.attn_bias {
            Some(b) => b.to_dtype(dtype),
            None => {
                let (b, t) = self.input_ids.dims2()?;
                ops::attention_bias(b, t, None, dtype, self.input_ids.device())
            }
        }
    }
}

/// The gradients of one backward pass: Candle's store, plus the LoRA gradients of layers that
/// gradient checkpointing recomputed beside the graph (their LoRA weights are constants on the
/// outer graph, so a weight's gradient comes from one of the two, never both).
pub struct Grads {
    store: GradStore,
    recomputed: HashMap<TensorId, Tensor>,
}

impl Grads {
    /// The gradient of `var`, detached (a gradient that still carries a graph would keep that
    /// step's activations alive), if it got one.
    pub fn get(&self, var: &Var) -> candle_core::Result<Option<Tensor>> {
        let graph = self.store.get(var).map(Tensor::detach);
        let recomputed = self.recomputed.get(&var.id()).map(Tensor::detach);
        Ok(match (graph, recomputed) {
            (Some(a), Some(b)) => Some((a + b)?),
            (a, b) => a.or(b),
        })
    }
}

impl From<GradStore> for Grads {
    /// The gradients of a plain `loss.backward()`.
    fn from(store: GradStore) -> Self {
        Self {
            store,
            recomputed: HashMap::new(),
        }
    }
}

#[derive(Debug, Clone)]
enum Arch {
    Llama(llama::Llama),
    Gpt2(gpt2::Gpt2),
}

/// A loaded causal LM with frozen base weights and (optionally) LoRA attached.
#[derive(Debug, Clone)]
pub struct Model {
    /// The normalized config.json.
    pub config: ModelConfig,
    /// The folder it was loaded from.
    pub dir: PathBuf,
    /// Compute dtype of activations and frozen weights; f32 in the CPU's bf16 mixed mode (whose
    /// large matrices are still bf16).
    pub dtype: DType,
    arch: Arch,
}

impl Model {
    /// Loads `dir` (config.json + safetensors, single or sharded) with weights in `dtype` on
    /// `device`. On the CPU, bf16 means mixed precision: the large frozen matrices are kept in
    /// bf16 and multiplied by the bf16 kernel ([`bf16`]), everything else runs in f32.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        Self::load_with(dir, dtype, device, &qload::LinearQuant::Float)
    }

    /// [`Model::load`] with the linear projections' weights kept as `quant` says: float,
    /// quantized at load, or as a GGUF file stores them (QLoRA, [`quant`]).
    pub fn load_with(
        dir: &Path,
        dtype: DType,
        device: &Device,
        quant: &qload::LinearQuant,
    ) -> Result<Self, ModelError> {
        let config = ModelConfig::from_dir(dir)?;
        let mixed = kernels::plan_for_device(device, dtype).mixed_bf16();
        let (dtype, w) = if mixed {
            let w = weights::Weights::open(dir, DType::F32, device)?;
            (DType::F32, w.with_matrix_dtype(DType::BF16))
        } else {
            (dtype, weights::Weights::open(dir, dtype, device)?)
        };
        let w = w.with_quant(qload::LinearQuantSource::open(quant)?);
        let arch = match config.family {
            Family::Llama => Arch::Llama(llama::Llama::load(&w, &config)?),
            Family::Gpt2 => Arch::Gpt2(gpt2::Gpt2::load(&w, &config)?),
        };
        Ok(Self {
            config,
            dir: dir.to_path_buf(),
            dtype,
            arch,
        })
    }

    /// What QLoRA keeps quantized, for the log: how many linear weights, their types, and their
    /// bytes against bf16; `None` when every weight is float.
    pub fn quant_summary(&self) -> Option<String> {
        let mut types: std::collections::BTreeMap<String, usize> = Default::default();
        let (mut quant_bytes, mut bf16_bytes, mut total) = (0usize, 0usize, 0usize);
        for l in self.linears() {
            total += 1;
            if let lora::Frozen::Quant(q) = &l.weight {
                *types.entry(format!("{:?}", q.ggml_dtype())).or_default() += 1;
                quant_bytes += q.size_in_bytes();
                bf16_bytes += l.out_features() * l.in_features() * 2;
            }
        }
        if types.is_empty() {
            return None;
        }
        let n: usize = types.values().sum();
        let kinds: Vec<String> = types.iter().map(|(t, c)| format!("{c} {t}")).collect();
        Some(format!(
            "QLoRA: {n} of {total} linear weights kept quantized ({}): {} instead of {} in bf16",
            kinds.join(", "),
            crate::inspect::format_bytes(quant_bytes as u64),
            crate::inspect::format_bytes(bf16_bytes as u64)
        ))
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.lm_head().device()
    }

    /// Every linear projection (LoRA candidates), layer by layer.
    pub fn linears(&self) -> Vec<&LoraLinear> {
        match &self.arch {
            Arch::Llama(m) => m.linears(),
            Arch::Gpt2(m) => m.linears(),
        }
    }

    /// As [`Model::linears`], mutable (to attach or replace LoRA).
    pub fn linears_mut(&mut self) -> Vec<&mut LoraLinear> {
        match &mut self.arch {
            Arch::Llama(m) => m.linears_mut(),
            Arch::Gpt2(m) => m.linears_mut(),
        }
    }

    /// Attaches fresh LoRA weights (A seeded kaiming-uniform, B zero), replacing any adapter.
    pub fn attach_lora(&mut self, config: &LoraConfig, seed: u64) -> Result<LoraState, LoraError> {
        let n = self.config.num_layers;
        lora::attach(self.linears_mut(), config, n, seed)
    }

    /// Turns gradient checkpointing on or off (llama family; GPT-2 runs without: returns false).
    /// Every `keep_every`-th layer keeps its activations (layers 0, k, 2k, … run normally; 0 =
    /// recompute every layer): less recompute for somewhat more memory (k = 3 recomputes two
    /// layers in three). [`Model::backward`] gathers the recomputed layers' gradients.
    pub fn set_gradient_checkpointing(&mut self, on: bool, keep_every: usize) -> bool {
        match &mut self.arch {
            Arch::Llama(m) => {
                m.set_recompute(on, keep_every);
                true
            }
            Arch::Gpt2(_) => false,
        }
    }

    /// The LoRA gradients of `loss` (from [`Model::loss`] with `train`): the graph's, plus those
    /// that gradient checkpointing computed while recomputing layers.
    pub fn backward(&self, loss: &Tensor) -> candle_core::Result<Grads> {
        let store = loss.backward()?;
        let recomputed = match &self.arch {
            Arch::Llama(m) => m.take_recomputed(),
            Arch::Gpt2(_) => Vec::new(),
        };
        Ok(Grads {
            store,
            recomputed: recomputed
                .into_iter()
                .map(|(var, g)| (var.id(), g))
                .collect(),
        })
    }

    /// Removes every adapter.
    pub fn detach_lora(&mut self) {
        for l in self.linears_mut() {
            l.lora = None;
        }
    }

    /// Switches every attached LoRA update on or off without removing it: base and tuned
    /// answers from one copy of the weights. Attaching or loading an adapter switches it on.
    pub fn set_lora_enabled(&mut self, on: bool) {
        for l in self.linears_mut() {
            if let Some(lora) = &mut l.lora {
                lora.enabled = on;
            }
        }
    }

    /// Whether an adapter is attached and switched on.
    pub fn lora_enabled(&self) -> bool {
        self.linears().iter().any(|l| l.active().is_some())
    }

    /// An empty KV cache for [`Model::forward_cached`].
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.num_layers)
    }

    /// The next-token logits `(V)`, f32, after the new tokens `ids` (batch 1), continuing
    /// `cache` and appending their keys and values to it: the prefill is the prompt on an
    /// empty cache, each decoding step one token. Inference only (no dropout, no graph); the LM
    /// head runs on the last position alone.
    pub fn forward_cached(&self, ids: &[u32], cache: &mut KvCache) -> candle_core::Result<Tensor> {
        // DoRA norms: rebuilt by the prefill (the adapter may have trained since the last
        // generation), reused by each decoding step.
        let mode = if cache.is_empty() {
            dora::NormUse::Refresh
        } else {
            dora::NormUse::Cached
        };
        dora::with_norm_use(mode, || self.forward_cached_inner(ids, cache))
    }

    fn forward_cached_inner(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
    ) -> candle_core::Result<Tensor> {
        if ids.is_empty() {
            candle_core::bail!("no tokens to run");
        }
        let context = self.config.max_position_embeddings;
        if cache.len() + ids.len() > context {
            candle_core::bail!(
                "{} tokens do not fit this model's context of {context} positions; shorten the prompt",
                cache.len() + ids.len()
            );
        }
        // Phi-3's LongRoPE: the first pass past the original context recomputes the cached
        // tokens with the long factors (transformers drops the cache there too), so generation
        // equals a full forward.
        let crossing;
        let ids = match self.config.rope_scaling {
            config::RopeScaling::LongRope {
                original_max_position_embeddings: original,
                ..
            } if !cache.is_empty()
                && cache.len() as f64 <= original
                && (cache.len() + ids.len()) as f64 > original =>
            {
                crossing = [cache.tokens(), ids].concat();
                cache.clear();
                &crossing[..]
            }
            _ => ids,
        };
        cache.record(ids);
        if let (Arch::Llama(m), [id]) = (&self.arch, ids) {
            if m.can_decode_cpu(cache.len())
                && kernels::fused_decode(self.device(), self.dtype)
                && self.linears().iter().all(|l| l.plain_for_fused_decode())
            {
                // On a thread of the pool, so the step's ~120 parallel passes are split from a
                // worker (which takes its share) instead of each waking the pool from outside and
                // sleeping until it is done.
                let (logits, ()) = rayon::join(|| m.decode_cpu(*id, cache), || ());
                let logits = logits?;
                let n = logits.len();
                return Tensor::from_vec(logits, n, self.device());
            }
        }
        let input = Tensor::from_vec(ids.to_vec(), (1, ids.len()), self.device())?;
        let x = match &self.arch {
            Arch::Llama(m) => m.hidden_cached(&input, cache)?,
            Arch::Gpt2(m) => m.hidden_cached(&input, cache)?,
        };
        let last = x.narrow(1, ids.len() - 1, 1)?.reshape((1, ()))?;
        self.head(&last)?.reshape(((),))?.to_dtype(DType::F32)
    }

    /// `x` `(N, D)` through the LM head: logits `(N, V)`, soft-capped where the model caps them
    /// (Gemma 2: `cap · tanh(z / cap)`).
    fn head(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let logits = kernels::frozen_linear(x, self.lm_head())?;
        let cap = match &self.arch {
            Arch::Llama(m) => m.final_softcap(),
            Arch::Gpt2(_) => None,
        };
        match cap {
            Some(cap) => (logits / cap)?.tanh()? * cap,
            None => Ok(logits),
        }
    }

    fn lm_head(&self) -> &Tensor {
        match &self.arch {
            Arch::Llama(m) => m.lm_head(),
            Arch::Gpt2(m) => m.lm_head(),
        }
    }

    /// Final hidden states `(B, T, D)`.
    pub fn hidden(&self, input: &ModelInput, train: bool) -> candle_core::Result<Tensor> {
        match &self.arch {
            Arch::Llama(m) => m.hidden(input, train),
            Arch::Gpt2(m) => m.hidden(input, train),
        }
    }

    /// Logits `(B, T, V)` (inference mode, no dropout).
    pub fn logits(&self, input: &ModelInput) -> candle_core::Result<Tensor> {
        let x = self.hidden(input, false)?;
        let (b, t, d) = x.dims3()?;
        let logits = self.head(&x.reshape((b * t, d))?)?;
        logits.reshape((b, t, ()))
    }

    /// Masked next-token loss as transformers defines it: `labels` `(B, T)` (row-major, unshifted,
    /// -100 = ignore); position t predicts label t+1; mean over the positions that count.
    /// The LM head runs only on those positions, which saves (B·T − N)·V logits, and in chunks of
    /// rows where the plan says so ([`loss`]): no whole (N, V) logits.
    /// Returns `(loss, N)`; an error if no position counts.
    pub fn loss(
        &self,
        input: &ModelInput,
        labels: &[i64],
        train: bool,
    ) -> candle_core::Result<(Tensor, usize)> {
        // Not while the LM head itself trains: the chunks' gradients go to the hidden states only.
        let chunk = self.planned_chunk().filter(|_| !self.lm_head().track_op());
        self.loss_in_chunks(input, labels, train, chunk)
    }

    /// Rows per loss chunk where this device's kernel plan chunks the loss.
    fn planned_chunk(&self) -> Option<usize> {
        kernels::plan_for_device(self.device(), self.dtype)
            .loss_chunks
            .then(|| loss::chunk_rows(self.config.vocab_size, self.device().is_cuda()))
    }

    /// The evaluation loss: [`Model::loss`] in eval mode (no dropout) with no gradient of the
    /// head's input, so the chunked loss skips each chunk's gradient product (an (N, V) · (V, D)
    /// product per chunk, a third of a SmolLM2 forward). The returned loss carries no graph.
    pub fn eval_loss(
        &self,
        input: &ModelInput,
        labels: &[i64],
    ) -> candle_core::Result<(Tensor, usize)> {
        self.loss_rows(input, labels, (false, false), self.planned_chunk())
    }

    /// [`Model::loss`] with the loss `chunk` rows at a time (`None`: all at once), whatever the
    /// kernel plan says (to compare the two).
    pub fn loss_in_chunks(
        &self,
        input: &ModelInput,
        labels: &[i64],
        train: bool,
        chunk: Option<usize>,
    ) -> candle_core::Result<(Tensor, usize)> {
        self.loss_rows(input, labels, (train, true), chunk)
    }

    /// The loss over the labelled positions; `(train, graph)`: dropout on, and the loss on the
    /// graph of the hidden states (off: computed from detached hidden states).
    fn loss_rows(
        &self,
        input: &ModelInput,
        labels: &[i64],
        (train, graph): (bool, bool),
        chunk: Option<usize>,
    ) -> candle_core::Result<(Tensor, usize)> {
        let (b, t) = input.input_ids.dims2()?;
        if labels.len() != b * t {
            candle_core::bail!("labels have {} entries for a {b}x{t} batch", labels.len());
        }
        let mut rows: Vec<u32> = Vec::new();
        let mut targets: Vec<u32> = Vec::new();
        for bi in 0..b {
            for ti in 0..t.saturating_sub(1) {
                let y = labels[bi * t + ti + 1];
                if y != -100 {
                    if y < 0 || y as usize >= self.config.vocab_size {
                        candle_core::bail!(
                            "label {y} is outside the vocabulary (0..{})",
                            self.config.vocab_size
                        );
                    }
                    rows.push((bi * t + ti) as u32);
                    targets.push(y as u32);
                }
            }
        }
        let n = rows.len();
        if n == 0 {
            candle_core::bail!("no position in the batch has a label to learn from");
        }
        let dev = self.device();
        let x = self.hidden(input, train)?;
        let d = x.dim(2)?;
        let x = if graph { x } else { x.detach() };
        // On CUDA, the same positions of every row are taken as a view (its backward pads with
        // zeros): `index_select`'s backward is an index-add there, 2 ms a step at 4096 tokens on
        // an H100. The CPU keeps `index_select`: no gain from the view was measured there (the
        // one comparison was confounded by the environment's size, BENCHMARKS.md).
        let span = uniform_span(&rows, b, t).filter(|_| dev.is_cuda());
        let picked = match span {
            Some((lo, len)) => x.narrow(1, lo, len)?.reshape((b * len, d))?,
            None => x
                .reshape((b * t, d))?
                .index_select(&Tensor::from_vec(rows, n, dev)?, 0)?,
        };
        let head_loss = |x: &Tensor, t: &[u32]| kernels::cross_entropy(&self.head(x)?, t);
        let loss = match chunk {
            Some(rows) => loss::chunked_mean_loss(&picked, &targets, rows, head_loss)?,
            None => head_loss(&picked, &targets)?,
        };
        Ok((loss, n))
    }
}

/// `(lo, len)` when `rows` (indices into `b` rows of `t`, in order) are positions `lo..lo + len`
/// of every row.
fn uniform_span(rows: &[u32], b: usize, t: usize) -> Option<(usize, usize)> {
    if b == 0 || rows.is_empty() || !rows.len().is_multiple_of(b) {
        return None;
    }
    let (len, lo) = (rows.len() / b, *rows.first()? as usize);
    let fits = rows
        .iter()
        .enumerate()
        .all(|(k, &r)| r as usize == (k / len) * t + lo + k % len);
    (fits && lo + len <= t).then_some((lo, len))
}

#[cfg(test)]
mod span_tests {
    use super::uniform_span;

    #[test]
    fn a_span_shared_by_every_row_is_found() {
        // Rows of 5: positions 0..4 of each (the last has no next token).
        assert_eq!(uniform_span(&[0, 1, 2, 3, 5, 6, 7, 8], 2, 5), Some((0, 4)));
        assert_eq!(uniform_span(&[2, 3, 7, 8, 12, 13], 3, 5), Some((2, 2)));
        assert_eq!(uniform_span(&[1], 1, 5), Some((1, 1)));
    }

    #[test]
    fn spans_that_differ_between_rows_are_not() {
        // Different starts, different lengths, a gap, out of order, a span past the row.
        assert_eq!(uniform_span(&[0, 1, 6, 7], 2, 5), None);
        assert_eq!(uniform_span(&[0, 1, 2, 5, 6], 2, 5), None);
        assert_eq!(uniform_span(&[0, 2, 5, 7], 2, 5), None);
        assert_eq!(uniform_span(&[5, 6, 0, 1], 2, 5), None);
        assert_eq!(uniform_span(&[3, 4, 5, 6], 1, 5), None);
        assert_eq!(uniform_span(&[], 2, 5), None);
    }
}
