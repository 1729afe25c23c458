//! Memory: an estimate before a run starts (base weights, LoRA + AdamW state, activations with and
//! without gradient checkpointing, logits) to warn when it exceeds the device, and figures while it
//! runs (process RSS now and at peak) for the charts and `finetune bench`.

use crate::model::attention::chunked;
use crate::model::kernels::{Impl, KernelPlan};
use crate::model::{Family, ModelConfig};

/// Keeps freed tensor buffers inside the process for reuse (glibc). Training frees and reallocates
/// the same large activation buffers every step; by default glibc serves blocks over its mmap
/// threshold (at most 32 MiB) with fresh mmaps, so each step pays page faults and kernel zeroing
/// for every big tensor (a fifth of CPU time in `perf`). A 1 GiB threshold and no trimming keep
/// them on the heap instead. Called once at startup; harmless elsewhere.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any training threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// Resident set size of this process in bytes, when the OS tells.
pub fn process_rss_bytes() -> Option<u64> {
    let pid = sysinfo::get_current_pid().ok()?;
    let mut sys = sysinfo::System::new().ok()?;
    sys.refresh_processes_specifics(
        sysinfo::ProcessesToUpdate::Some(&[pid]),
        false,
        sysinfo::ProcessRefreshKind::nothing().with_memory(),
    );
    sys.process(pid).map(|p| p.memory())
}

/// Peak resident set size of this process so far (getrusage), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    // SAFETY: getrusage only writes into the zeroed struct we own.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut u) != 0 {
            return None;
        }
        u
    };
    let max = u64::try_from(usage.ru_maxrss).ok()?;
    // Linux reports kilobytes, macOS bytes.
    Some(if cfg!(target_os = "macos") {
        max
    } else {
        max * 1024
    })
}

/// Total physical memory of the machine in bytes.
pub fn total_memory_bytes() -> Option<u64> {
    let mut sys = sysinfo::System::new().ok()?;
    sys.refresh_memory();
    Some(sys.total_memory())
}

/// What a training run will need, by part, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Estimate {
    /// The frozen base weights in their dtype on the device.
    pub base_weights: u64,
    /// LoRA A/B (f32) + their gradients + AdamW's two moments.
    pub lora_and_optimizer: u64,
    /// Activations kept for backward, plus the gradients Candle's backward leaves in its store.
    pub activations: u64,
    /// Logits for the positions that carry loss and the cross-entropy backward's (N, V) buffers.
    pub logits: u64,
    /// The process itself: binary, libraries, thread stacks, allocator and small tensors.
    pub runtime: u64,
    /// Peak: the larger of training (every part above) and loading (runtime, the weights and,
    /// in host memory, the memory-mapped checkpoint file, whose pages stay resident until
    /// loading ends).
    pub total: u64,
}

/// Inputs of [`estimate`].
#[derive(Debug, Clone, Copy)]
pub struct EstimateInput {
    /// Rows per micro-batch (B).
    pub batch: usize,
    /// Tokens per row (T).
    pub seq_len: usize,
    /// LoRA rank r.
    pub rank: usize,
    /// Bytes per element of the frozen base weights: 4 = f32, 2 = bf16/f16 (also the CPU's mixed
    /// mode, which keeps the large matrices in bf16).
    pub weight_bytes: usize,
    /// Bytes per element of activations and their gradients: those of the kernel plan's
    /// `activations` (4 on the CPU in its bf16 mixed mode too, 2 for bf16/f16 on a GPU).
    pub activation_bytes: usize,
    /// Recompute each layer's activations in backward (keeps only layer inputs).
    pub checkpointing: bool,
    /// With checkpointing, every k-th layer keeps its activations (0 = all recomputed).
    pub checkpoint_keep_every: usize,
    /// Modules per layer carrying LoRA (default all).
    pub lora_modules_per_layer: Option<usize>,
    /// Which kernels run (`model::kernels::plan`). The counts follow its attention (the CPU's
    /// fused attention keeps no T² tensors and no GQA copies, see `model::attention`) and its LoRA
    /// linear (FineTune's CUDA kernels and LoRA op: the graph keeps far less per layer, see
    /// [`estimate`]); other choices are counted as the composed ops.
    pub kernels: KernelPlan,
    /// LoRA dropout during training: the CUDA LoRA op then gives way to the composed LoRA term,
    /// and the estimate counts the composed graph.
    pub lora_dropout: bool,
    /// QLoRA: bytes per weight of the quantized linear projections (e.g. 0.5625 for Q4_K), `None`
    /// when they are float. Embeddings, norms and the LM head stay in `weight_bytes`; one
    /// projection at a time is dequantized (f32, bf16 by the CUDA kernel) for its product and
    /// dropped.
    pub quant_bytes_per_weight: Option<f64>,
    /// DoRA: a magnitude (out,) per adapted module, trained like A and B, and one more (N, out)
    /// tensor per module kept for backward (the unscaled output the magnitude multiplies; without
    /// dropout).
    pub dora: bool,
    /// The tensors live in a GPU's own memory (CUDA), which the estimate then stands for: the
    /// memory-mapped checkpoint file is host memory there and not part of the load peak. On the
    /// CPU and on Apple silicon's unified memory (Metal) it is.
    pub device_memory: bool,
    /// Bytes of the checkpoint files the weights load from, where known (a model stored in f32
    /// maps twice the bytes of the 16-bit files Hugging Face models ship, which `None` assumes).
    pub checkpoint_bytes: Option<u64>,
}

/// Resident memory of the process besides tensors (binary, libraries, thread stacks, allocator
/// bookkeeping), measured with `finetune bench` on SmolLM2-135M: RSS right after loading is the
/// weights + ~13 MB, and the load peak is the weights + checkpoint file + ~30–40 MB (staging
/// copies of the conversion).
const RUNTIME_BYTES: u64 = 30 << 20;

/// Bytes per parameter of the checkpoint file on disk (Hugging Face models ship bf16/f16).
const STORED_BYTES_PER_PARAM: u64 = 2;

/// Estimates peak training memory (process RSS) for `cfg`. Every count follows this engine's code
/// (Candle autograd keeps each op's inputs and output alive until the loss is dropped), with
/// N = B·T tokens, S = B·heads·T² attention elements per layer, in activation bytes:
///
/// * per llama layer and token: both RMSNorm outputs (2H); each projection's output plus its LoRA
///   update (2·(Q+2KV+2H+2I)) and the (N, r) LoRA hidden; the head-major copies of q/k/v (Q+2KV);
///   RoPE's neg/cat/two products/sum for q and k (4.5·(Q+KV)); the GQA-expanded k and v (2Q); the
///   attention output and its (B, T, Q) merge (2Q); the two residual sums (2H); the activation
///   and gate·up products (2I). That is 8H + 11.5Q + 10.5KV + 6I + 7r elements (22 520 for
///   SmolLM2-135M), plus 4·S for scores, scaled scores, biased scores and probabilities. The
///   CPU's fused attention (the plan's attention `cpu-fused`) keeps neither the 4·S nor the GQA
///   copies (2Q), only a log-sum-exp per row, and leaves no bias gradient.
/// * the CPU's own ops (the plan's `cpu-fused` RoPE, SwiGLU and LoRA linear) keep less: RoPE its
///   output (Q+KV, no stored table gradients), SwiGLU its output (I), and the one-op LoRA
///   projection no update or (N, r) middle beside its output.
/// * gradients left in Candle's `GradStore` until backward ends: `or_insert` stores a full-size
///   gradient even for inputs that need none — the broadcast cos/sin of RoPE (2·(Q+KV) per token)
///   and, with composed attention, the broadcast attention bias (S) — in every layer.
/// * logits, composed cross-entropy: one (N, V) f32 tensor kept by the graph plus three transient
///   ones in its backward (log-softmax, its gradient, the logits' gradient), 4·N·V.
///   The CPU's fused cross-entropy (the plan's `cpu-fused`) keeps the logits and its backward
///   writes their gradient (2·N·V, f32); in the CPU's bf16 mode the LM head's input gradient then
///   packs that gradient to bf16 (N·V·2 bytes) and, on AMX tiles, the (V, D) weight (V·D·2
///   bytes), all alive at once: the step's peak (`bench/results/cpu-memory-grid-2026-12-06-estimate.log`:
///   every mode within ±5%).
///   With the loss in chunks of rows (the plan's `loss_chunks`, `model::loss`) all of this is
///   counted for one chunk's rows only (each chunk's logits and gradients are freed before the
///   next), plus the (N, D) input gradient the graph keeps.
/// * with checkpointing (llama only): per layer the detached output, the recompute op's zeros and
///   their sum (3·N·H) and the gradient stored for the detached output (N·H), plus one layer's
///   full set while it is recomputed. That set is counted on top of the freed cross-entropy
///   buffers; when it fits into them instead the run peaks lower (up to ~12% below this estimate
///   at 2×512 and in mixed mode at 4×256), so with checkpointing this is an upper bound.
///
/// The peak is the larger of that and the load peak (weights + the mmapped checkpoint: its files'
/// size where known, else 16-bit).
///
/// With FineTune's CUDA kernels (the plan's LoRA linear `cuda`, no dropout; llama family) the
/// graph keeps, per layer and token: the layer input and both RMSNorm outputs (3H); each LoRA
/// projection's output only (Q+2KV+H+2I, plus Q+2KV again after a q/k/v bias); the head-major
/// copies and RoPE outputs of q and k and the copy of v (2Q+3KV); the GQA-expanded k and v (2Q);
/// the attention output and its merge (2Q); the residual sums (2H); the SwiGLU output (I) unless
/// the down projection's op makes it itself (`kernels::swiglu_linear`: silu activation, no DoRA;
/// then it is made again in that op's backward). That is 6H + 7Q + 5KV + 2I (or 3I) elements,
/// plus 2·S (scores and probabilities, the softmax kernel's input and output). No gradient is
/// stored for constants, and the logits are bf16: the (N, V) logits and their gradient (one
/// chunk of rows of them with the loss in chunks, 64M logits a chunk on CUDA; the peak is then
/// in backward, where the MLP's backward holds (N, I) tensors of its own beside the graph,
/// `Counts::mlp_backward`).
///
/// Past `attention::chunked::CHUNK_ABOVE` score elements (long sequences) the attention of CUDA
/// and of the composed graph runs in query chunks: no S is kept, its chunked value and the zeros
/// carrying its gradient are (2·N·Q), and one layer's backward holds four score tiles and the f32
/// k and v gradients at a time.
///
/// With the fused bf16 attention on CUDA (the plan's attention `cuda-flash`, head sizes it is
/// built for) neither S nor the GQA copies are kept: the per-row log-sum-exp (f32) instead; one
/// layer's backward holds f32 q, k, v gradients and their bf16 casts.
///
/// The CUDA LoRA op on bf16 activations keeps its forward's splits for its backward: 12·r bytes
/// per token of each adapted projection and 12 bytes per LoRA parameter (`Counts::lora_parts_kept`).
///
/// Measured peak allocated on an H100 (`bench/results/h100-eighteenth-2026-12-07.log`,
/// `memory::tests::cuda_estimate_matches_the_h100_peaks`), Qwen2.5-0.5B r16: 4×512 3.56 GB (this
/// count 3.61), 1×4096 5.67 GB (5.68); SmolLM2-135M 8×512 3.06 GB (3.09). Other GPUs follow the
/// composed counts above, unmeasured.
pub fn estimate(cfg: &ModelConfig, input: &EstimateInput) -> Estimate {
    let n = Counts::of(cfg, input);
    let params = cfg.parameter_count() as u64;
    let base_weights = match input.quant_bytes_per_weight {
        Some(q) => {
            let linear = n.linear_weights();
            let rest = params.saturating_sub(linear) * input.weight_bytes as u64;
            // One projection dequantized for its product (the largest: the MLP's): straight to
            // bf16 by the CUDA kernel, else to f32.
            let dequantized = if n.cuda_kernels && input.activation_bytes == 2 {
                2
            } else {
                4
            };
            rest + (linear as f64 * q) as u64 + n.d * n.i * dequantized
        }
        None => params * input.weight_bytes as u64,
    };
    // parameter + gradient + exp_avg + exp_avg_sq, all f32
    let lora_and_optimizer = (n.lora_params() + n.dora_params()) * 4 * 4;
    let kernels = &input.kernels;
    // Rows of logits alive at once: every row with a label, or one chunk of them
    // (`model::loss`), which then leaves an (N, D) input gradient in the activations' dtype.
    let all_rows = n.b * n.t.saturating_sub(1).max(1);
    let (loss_rows, input_grad) = if kernels.loss_chunks {
        // The CUDA cross-entropy kernel takes larger chunks than the CPU's (`model::loss`).
        let cuda = kernels.cross_entropy == Impl::Cuda;
        let rows = all_rows.min(crate::model::loss::chunk_rows(n.v as usize, cuda) as u64);
        (rows, all_rows * n.d * n.ae)
    } else {
        (all_rows, 0)
    };
    let logits = if n.cuda_kernels {
        loss_rows * n.v * n.ae * 2
    } else if kernels.cross_entropy == Impl::CpuFused
        && kernels.activations == candle_core::DType::F32
    {
        // The CPU's fused cross-entropy keeps the f32 logits and its backward writes their
        // gradient; in the bf16 mode the LM head's input gradient packs that gradient to bf16
        // (on AMX tiles one chunk of the vocabulary at a time, `bf16::AMX_K_CHUNK`) and, on AMX,
        // the (V, D) weight, kept from the forward (`bf16::amx`), while both are alive.
        let packed = match (kernels.mixed_bf16(), kernels.frozen_linear) {
            (true, Impl::CpuBf16Amx) => {
                let chunk = n.v.min(crate::model::bf16::AMX_K_CHUNK as u64);
                loss_rows * chunk * 2 + n.v * n.d * 2
            }
            (true, _) => loss_rows * n.v * 2,
            (false, _) => 0,
        };
        loss_rows * n.v * 4 * 2 + packed
    } else {
        // Composed: the logits, log-softmax, its gradient and the logits' gradient.
        loss_rows * n.v * 4 * 4
    } + input_grad;
    // The chunked attention's tiles and the CUDA LoRA op's MLP backward live while a layer's
    // backward runs, after the loss's buffers are freed: they raise the peak only where they need
    // more than those.
    let backward = n.attention_tiles().max(n.mlp_backward());
    let activations = n.activations() + n.dora_activations() + backward.saturating_sub(logits);
    let runtime = RUNTIME_BYTES;
    let training = runtime + base_weights + lora_and_optimizer + activations + logits;
    let mapped_file = if input.device_memory {
        0
    } else {
        input
            .checkpoint_bytes
            .unwrap_or(params * STORED_BYTES_PER_PARAM)
    };
    let loading = runtime + base_weights + mapped_file;
    Estimate {
        base_weights,
        lora_and_optimizer,
        activations,
        logits,
        runtime,
        total: training.max(loading),
    }
}

/// The sizes [`estimate`] counts with (shape legend of [`crate::model`]; `Q` = H·Dh, `KV` =
/// KV·Dh as widths), and which kernels keep what.
struct Counts<'a> {
    cfg: &'a ModelConfig,
    input: &'a EstimateInput,
    b: u64,
    t: u64,
    /// Hidden size D.
    d: u64,
    i: u64,
    v: u64,
    heads: u64,
    q: u64,
    kv: u64,
    r: u64,
    layers: u64,
    /// Bytes per activation element.
    ae: u64,
    /// LoRA modules per layer, and the share of them adapted.
    modules: usize,
    share: f64,
    fused_attention: bool,
    /// The CUDA LoRA op runs (no dropout), so the graph keeps the kernels' tensors only.
    cuda_kernels: bool,
    cuda: bool,
    /// The fused bf16 attention on CUDA (`kernels::cuda::flash`): no scores, no GQA copies.
    flash: bool,
    /// The MLP's SwiGLU and down projection as one CUDA op (`kernels::swiglu_linear`): the
    /// product of gate and up is not kept, and is made again in the down projection's backward.
    swiglu_linear: bool,
}

impl<'a> Counts<'a> {
    fn of(cfg: &'a ModelConfig, input: &'a EstimateInput) -> Self {
        let head_dim = cfg.head_dim as u64;
        let modules = cfg.linears_per_layer();
        let cuda_kernels = input.kernels.lora_linear == Impl::Cuda && !input.lora_dropout;
        Self {
            cfg,
            input,
            b: input.batch as u64,
            t: input.seq_len as u64,
            d: cfg.hidden_size as u64,
            i: cfg.intermediate_size as u64,
            v: cfg.vocab_size as u64,
            heads: cfg.num_heads as u64,
            q: cfg.num_heads as u64 * head_dim,
            kv: cfg.num_kv_heads as u64 * head_dim,
            r: input.rank as u64,
            layers: cfg.num_layers as u64,
            ae: input.activation_bytes as u64,
            modules,
            share: input
                .lora_modules_per_layer
                .map_or(1.0, |m| m.min(modules) as f64 / modules as f64),
            fused_attention: input.kernels.attention == Impl::CpuFused,
            cuda_kernels,
            cuda: cuda_kernels && matches!(cfg.family, Family::Llama),
            flash: cuda_kernels
                && matches!(cfg.family, Family::Llama)
                && input.kernels.attention == Impl::CudaFlash
                && input.activation_bytes == 2
                && crate::model::kernels::FLASH_HEAD_DIMS.contains(&cfg.head_dim),
            swiglu_linear: cuda_kernels
                && matches!(cfg.family, Family::Llama)
                && cfg.activation == crate::model::config::Activation::Silu
                && input.kernels.swiglu == Impl::Cuda
                && !cfg.mlp_bias
                && !input.dora,
        }
    }

    /// LoRA parameters of the whole model.
    fn lora_params(&self) -> u64 {
        let (h, q, kv, i, r) = (self.d, self.q, self.kv, self.i, self.r);
        let per_layer: u64 = match self.cfg.family {
            // Phi-3: one A for q/k/v and one for gate/up.
            Family::Llama if self.cfg.variant.fused_qkv => {
                r * ((h + q + 2 * kv) + (q + h) + (h + 2 * i) + (i + h))
            }
            Family::Llama => r * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h)),
            Family::Gpt2 => r * ((h + 3 * h) + 2 * h + (h + i) + (i + h)),
        };
        (per_layer as f64 * self.share) as u64 * self.layers
    }

    /// Sum of the adapted modules' output widths in one layer (before the adapted share).
    fn outputs_per_layer(&self) -> u64 {
        let (h, q, kv, i) = (self.d, self.q, self.kv, self.i);
        match self.cfg.family {
            Family::Llama => q + 2 * kv + h + 2 * i + h,
            Family::Gpt2 => 3 * h + h + i + h,
        }
    }

    /// Weights of every linear projection (what QLoRA quantizes).
    fn linear_weights(&self) -> u64 {
        let (h, q, kv, i) = (self.d, self.q, self.kv, self.i);
        let per_layer = match self.cfg.family {
            Family::Llama => h * q + 2 * h * kv + q * h + 3 * h * i,
            Family::Gpt2 => 3 * h * h + h * h + 2 * h * i,
        };
        per_layer * self.layers
    }

    /// DoRA's magnitudes: one per output row of each adapted module.
    fn dora_params(&self) -> u64 {
        if !self.input.dora {
            return 0;
        }
        (self.outputs_per_layer() as f64 * self.share) as u64 * self.layers
    }

    /// DoRA's extra activations: each adapted module keeps its unscaled (N, out) output.
    fn dora_activations(&self) -> u64 {
        if !self.input.dora {
            return 0;
        }
        let per_layer = (self.outputs_per_layer() as f64 * self.share) as u64;
        let kept_layers = if self.input.checkpointing {
            1
        } else {
            self.layers
        };
        self.b * self.t * per_layer * kept_layers * self.ae
    }

    /// (per-token elements of one layer's graph, per-token elements of its stored gradients)
    fn per_token(&self) -> (u64, u64) {
        let (h, q, kv, i, r) = (self.d, self.q, self.kv, self.i, self.r);
        // The GQA-expanded k and v (composed attention and the CUDA path; not the CPU's fused op).
        let gqa_copies = if self.heads != self.cfg.num_kv_heads as u64 && !self.flash {
            2 * q
        } else {
            0
        };
        let modules = self.modules as u64;
        match self.cfg.family {
            Family::Llama if self.cuda => {
                let bias = if self.cfg.qkv_bias { q + 2 * kv } else { 0 };
                // Gate and up, and the SwiGLU output unless the down projection's op makes it.
                let mlp = if self.swiglu_linear { 2 * i } else { 3 * i };
                // q and k: the projection, the heads-first copy RoPE turns, RoPE's output; v: the
                // projection and its copy; the attention output and its merge. CUDA's RoPE
                // writes the heads-first layout itself (no copy) unless only part of each head
                // turns.
                let fused_rope =
                    self.input.kernels.rope == Impl::Cuda && self.cfg.variant.rotary_dim.is_none();
                let heads = if fused_rope {
                    4 * q + 4 * kv
                } else {
                    5 * q + 5 * kv
                };
                (6 * h + heads + mlp + bias + gqa_copies, 0)
            }
            Family::Llama => {
                let outputs = q + 2 * kv + 2 * h + 2 * i;
                let lora = self.lora_kept(outputs, modules, r);
                // Composed RoPE: neg, cat, two products and the sum (4.5·(Q+KV), doubled here),
                // and Candle stores gradients for the broadcast cos/sin (2·(Q+KV)). candle-nn's
                // kernel with our backward: its value, the zeros carrying the gradient, the sum.
                // The CPU's fused op: its output.
                let (rope2, rope_leaked) = match self.input.kernels.rope {
                    Impl::CpuFused => (2 * (q + kv), 0),
                    Impl::GpuCommon => (6 * (q + kv), 0),
                    _ => (9 * (q + kv), 2 * (q + kv)),
                };
                let expand = if self.fused_attention { 0 } else { gqa_copies };
                // The fused SwiGLU keeps its output only; composed, silu(g) and the product.
                let gated = if self.input.kernels.swiglu == Impl::CpuFused {
                    i
                } else {
                    2 * i
                };
                let rest = 2 * h + (q + 2 * kv) + rope2 / 2 + expand + 2 * q + 2 * h + gated;
                (outputs + lora + rest, rope_leaked)
            }
            Family::Gpt2 => {
                // composed LayerNorms (~5H each), c_attn/c_proj/c_fc/c_proj outputs, the q/k/v
                // head copies, attention output and merge, residuals, gelu.
                let outputs = 5 * h + i;
                let lora = self.lora_kept(outputs, modules, r);
                (10 * h + outputs + lora + 3 * h + 2 * h + 2 * h + i, 0)
            }
        }
    }

    /// Per token, what the LoRA terms of one layer keep beside the projections' outputs: the
    /// composed term its (N, out) update and (N, r) middle per adapted module; the CPU's one-op
    /// LoRA projection (float weights, no dropout, not DoRA) nothing more.
    fn lora_kept(&self, outputs: u64, modules: u64, r: u64) -> u64 {
        let input = self.input;
        let one_op = input.kernels.lora_linear == Impl::CpuFused
            && !input.lora_dropout
            && !input.dora
            && input.quant_bytes_per_weight.is_none();
        if one_op {
            return 0;
        }
        (self.share * (outputs + modules * r) as f64) as u64
    }

    /// Bytes of one layer's graph and of the gradients it leaves stored.
    fn layer_bytes(&self) -> (u64, u64) {
        let (b, t, ae) = (self.b, self.t, self.ae);
        let tokens = b * t;
        let scores = b * self.heads * t * t;
        let (per_token, leaked_per_token) = self.per_token();
        // Composed attention keeps 4 score-sized tensors (scores, scaled, biased, probabilities)
        // and leaves the bias gradient; the CUDA softmax kernel keeps its input and output; the
        // CPU's fused op keeps only its per-row log-sum-exp.
        // Long sequences on CUDA and the composed graph go through in query chunks: no scores
        // kept, the chunked value and the zeros that carry its gradient instead (2·N·Q).
        let (kept_scores, leaked_scores) = if self.flash {
            // The fused CUDA attention (one op whose output is the attention's value, counted
            // with the layer) keeps its per-row log-sum-exp (f32).
            (b * self.heads * t * 4 / ae.max(1), 0)
        } else if self.chunked_attention().is_some() {
            (2 * tokens * self.q, 0)
        } else if self.cuda {
            (2 * scores, 0)
        } else if self.fused_attention {
            (b * self.heads * t * 4 / ae.max(1), 0)
        } else {
            (4 * scores, scores)
        };
        let (lora_per_token, lora_per_layer) = self.lora_parts_kept();
        (
            tokens * (per_token * ae + lora_per_token) + kept_scores * ae + lora_per_layer,
            tokens * leaked_per_token * ae + leaked_scores * ae,
        )
    }

    /// Bytes the CUDA LoRA op keeps from its forward for its backward on bf16 activations
    /// (`kernels::cuda::lora_split`): per token, the split of `x·Aᵀ` (6r bf16 a module); per
    /// layer, six bf16 copies of A and of B (12 bytes a LoRA parameter).
    fn lora_parts_kept(&self) -> (u64, u64) {
        if !self.cuda_kernels || self.ae != 2 || self.input.dora {
            return (0, 0);
        }
        let modules = (self.share * self.modules as f64).round() as u64;
        let params = self.lora_params() / self.layers.max(1);
        (modules * 6 * self.r * 2, 12 * params)
    }

    /// Query rows per chunk where the attention runs in chunks (`attention::chunked`).
    fn chunked_attention(&self) -> Option<u64> {
        if self.fused_attention || self.flash {
            return None;
        }
        let (b, h, t) = (self.b as usize, self.heads as usize, self.t as usize);
        chunked::chunk_rows(b, h, t).map(|rows| rows as u64)
    }

    /// The chunked attention's tiles while one layer's backward runs (scores, probabilities,
    /// their gradient and the scores' gradient, at most; the f32 k and v gradients being summed).
    fn attention_tiles(&self) -> u64 {
        if self.flash {
            // The fused backward's f32 dq, dk, dv and their bf16 casts.
            return self.b * self.t * (self.q + 2 * self.kv) * (4 + self.ae);
        }
        self.chunked_attention().map_or(0, |rows| {
            let tile = self.b * self.heads * rows * self.t;
            let tile_bytes = if self.cuda { self.ae } else { 4 };
            4 * tile * tile_bytes + 2 * self.b * self.t * self.q * 4
        })
    }

    /// What the MLP's backward holds beside the graph on CUDA: in the down projection's backward
    /// its input gradient (N, I), the SwiGLU output made again where the op fuses them, and the
    /// LoRA backward's scratch: for bf16 the (N, r) products and their bf16 parts (`lora_split`:
    /// 48 bytes a token and rank), else the f32 rows of x and g (`lora_bwd`, chunks of
    /// [`crate::model::kernels::LORA_BWD_CHUNK_ELEMENTS`]); then the SwiGLU backward's input
    /// gradient and its two outputs (3 × (N, I)).
    fn mlp_backward(&self) -> u64 {
        if !self.cuda {
            return 0;
        }
        let (tokens, i, ae) = (self.b * self.t, self.i, self.ae);
        let chunk = crate::model::kernels::LORA_BWD_CHUNK_ELEMENTS as u64 / i.max(self.d).max(1);
        let scratch = if ae == 2 {
            tokens * self.r * 48
        } else {
            tokens.min(chunk.max(1)) * (i + self.d) * 4
        };
        let remade = if self.swiglu_linear {
            tokens * i * ae
        } else {
            0
        };
        (tokens * i * ae + remade + scratch).max(3 * tokens * i * ae)
    }

    /// Bytes of every layer's graph, with gradient checkpointing's kept layers and boundaries.
    fn activations(&self) -> u64 {
        let (layer_graph, layer_leaked) = self.layer_bytes();
        let layers = self.layers;
        let checkpointing = self.input.checkpointing && matches!(self.cfg.family, Family::Llama);
        let kept = match self.input.checkpoint_keep_every {
            0 => 0,
            k => layers.div_ceil(k as u64),
        };
        if checkpointing {
            (layers - kept) * 4 * self.b * self.t * self.d * self.ae
                + kept * (layer_graph + layer_leaked)
                + layer_graph
                + layer_leaked
        } else {
            layers * (layer_graph + layer_leaked)
        }
    }
}

#[cfg(test)]
mod tests;
