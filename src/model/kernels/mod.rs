//! Every kernel choice in one place: which implementation of each differentiable op runs, for a
//! device kind, a compute dtype, the CPU's features and the mode (`FINETUNE_KERNELS`). [`plan`] is
//! the one function that decides; every op entry point below asks it (through [`plan_for`], from
//! its input tensor) and runs the choice; `finetune bench`, the memory estimate, the app's Compute
//! rows and the backend's default dtype read the same plan.
//!
//! The implementations, by where they run:
//! - [`cpu`]: FineTune's CPU kernels with their own backward, f32 activations (softmax, RMSNorm,
//!   cross-entropy, the frozen linear with f32 or bf16 weights), and the flash attention kernel
//!   kept beside its backward in `model::attention`.
//! - `cuda` (feature `cuda`): FineTune's CUDA kernels, bf16 or f32 (RMSNorm, RoPE, attention
//!   softmax, cross-entropy, SwiGLU, the frozen and the LoRA linear as single ops); in bf16 on
//!   GPUs of compute capability 8+ the attention is `cuda-flash` (`cuda::flash`, one fused kernel
//!   each way) for head sizes in [`FLASH_HEAD_DIMS`], `cuda` otherwise.
//! - [`gpu_common`]: candle-nn's fused forward with our backward (RMSNorm, RoPE) and the frozen
//!   linear as a detached matmul with the gradient routed to `x` alone: what every GPU can run.
//! - [`composed`]: pure differentiable Candle ops, every op's twin and the tests' reference.
//!
//! What runs where with `FINETUNE_KERNELS=auto` (the default):
//!
//! | op            | CPU f32 · CPU bf16 (bf16 weights × f32 activations) | CUDA bf16/f32 | Metal, CUDA f16 |
//! |---------------|-----------------------------------------------------|---------------|-----------------|
//! | rms_norm      | cpu-fused                                           | cuda          | gpu-common      |
//! | layer_norm    | composed                                            | composed      | composed        |
//! | rope          | cpu-fused                                           | cuda          | gpu-common      |
//! | attention     | cpu-fused (flash) · its products in bf16 on AMX     | cuda(-flash)  | composed        |
//! | softmax       | cpu-fused                                           | cuda          | composed        |
//! | cross_entropy | cpu-fused                                           | cuda          | composed        |
//! | swiglu        | cpu-fused                                           | cuda          | composed        |
//! | frozen_linear | cpu-fused · cpu-bf16-amx / -avx512 / -portable      | cuda          | gpu-common      |
//! | lora_linear   | cpu-fused                                           | cuda          | composed        |
//! | decode step   | cpu-fused (one pass per token, llama family)        | the ops above | the ops above   |
//!
//! (CPU f16, an odd choice, runs the composed ops with the frozen linear from `gpu_common` and the
//! attention softmax on the CPU kernel, its scores being f32.)
//!
//! **What runs on Metal** is the last column, and `FINETUNE_KERNELS=composed` runs exactly that
//! graph on any device: RMSNorm and RoPE from candle-nn's forward with our backward, the frozen
//! linear as a detached matmul, everything else composed, and no CPU mixed precision (bf16 means
//! bf16 activations, as on Metal). The one exception: candle-nn's RMSNorm has no f64 kernel, so
//! an f64 model (tests only) takes the composed RMSNorm.
//!
//! Not kernel choices, so not here: LoRA dropout masks are drawn by the device's generator on a
//! GPU and by our seeded one on the CPU (`model::lora`), in either mode; GPT-2's gelu is Candle's
//! unary op everywhere ([`activation`]).
//!
//! The plan says what runs for tensors of the model's dtype. An entry point also checks that a
//! call's tensors fit the chosen kernel (e.g. RMSNorm's weight in `x`'s dtype, a bias of shape
//! `(1 or B, 1, T, T)`) and takes the general form when they do not: the composed twin, or for
//! the frozen linear `gpu_common`'s.

use candle_core::{DType, Device, Result, Tensor};

use super::config::Activation;

pub mod composed;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod gpu_common;
mod linear;
mod sdpa;

pub use linear::{
    dequantize, frozen_linear, frozen_linear_plus, lora_linear, lora_linear_fused, qlora_linear,
    qlora_linear_fused, swiglu_linear, swiglu_linear_fused, FrozenRef,
};
pub use sdpa::{attention, attention_softcap, attention_with, bf16_attention_products, Products};

/// `FINETUNE_KERNELS`: which kernels may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The fastest kernels for the device (the default).
    Auto,
    /// Exactly the ops the Metal backend runs, on any device (for comparing against Metal and for
    /// measuring what the other kernels buy).
    Composed,
}

impl Mode {
    /// The mode a `FINETUNE_KERNELS` value names (`None`: unset = auto). The old switches
    /// `FINETUNE_NO_FUSED=1` (CPU kernels off) and `FINETUNE_NO_CUDA_KERNELS=1` (CUDA kernels
    /// off), given as `legacy`, mean `composed` when `FINETUNE_KERNELS` is unset.
    pub fn parse(value: Option<&str>, legacy: bool) -> std::result::Result<Self, KernelsError> {
        match value.map(str::trim) {
            None | Some("") if legacy => Ok(Self::Composed),
            None | Some("") => Ok(Self::Auto),
            Some(v) if v.eq_ignore_ascii_case("auto") => Ok(Self::Auto),
            Some(v) if v.eq_ignore_ascii_case("composed") => Ok(Self::Composed),
            Some(v) => Err(KernelsError::BadMode(v.to_string())),
        }
    }

    /// The mode of this process, read from the environment once. An invalid value is reported on
    /// stderr once and runs `auto`.
    pub fn current() -> Self {
        static MODE: std::sync::OnceLock<Mode> = std::sync::OnceLock::new();
        *MODE.get_or_init(|| {
            let set = |name: &str| std::env::var_os(name).is_some_and(|v| v != "0");
            let legacy = set("FINETUNE_NO_FUSED") || set("FINETUNE_NO_CUDA_KERNELS");
            let value = std::env::var("FINETUNE_KERNELS").ok();
            match Self::parse(value.as_deref(), legacy) {
                Ok(mode) => {
                    if legacy && value.is_none() {
                        eprintln!(
                            "note: FINETUNE_NO_FUSED / FINETUNE_NO_CUDA_KERNELS are now FINETUNE_KERNELS=composed"
                        );
                    }
                    mode
                }
                Err(e) => {
                    eprintln!("warning: {e}; running with FINETUNE_KERNELS=auto");
                    Self::Auto
                }
            }
        })
    }

    /// The name `FINETUNE_KERNELS` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Composed => "composed",
        }
    }
}

/// Errors of the kernel switch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelsError {
    /// `FINETUNE_KERNELS` holds something else than a mode.
    #[error("FINETUNE_KERNELS={0:?} is not a mode; use auto (the default) or composed")]
    BadMode(String),
}

/// Which kind of device a tensor lives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// The CPU.
    Cpu,
    /// An NVIDIA GPU (feature `cuda`).
    Cuda,
    /// An Apple GPU (feature `metal`).
    Metal,
}

impl DeviceKind {
    /// The kind of `device`.
    pub fn of(device: &Device) -> Self {
        match device {
            Device::Cpu => Self::Cpu,
            Device::Cuda(_) => Self::Cuda,
            Device::Metal(_) => Self::Metal,
        }
    }
}

/// What the CPU offers the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuFeatures {
    /// AVX512-BF16 dot products: the mixed-precision frozen linear runs its `vdpbf16ps` kernel
    /// (`model::bf16`), else a portable one.
    pub bf16_dot: bool,
    /// AMX-BF16 tiles (Intel Sapphire Rapids and later, granted to the process): the
    /// mixed-precision frozen linear runs on them (`model::bf16`), ahead of AVX512-BF16.
    pub amx: bool,
}

impl CpuFeatures {
    /// This machine's CPU (detected once).
    pub fn detect() -> Self {
        static FEATURES: std::sync::OnceLock<CpuFeatures> = std::sync::OnceLock::new();
        *FEATURES.get_or_init(|| Self {
            bf16_dot: super::bf16::has_bf16_hw(),
            amx: super::bf16::has_amx(),
        })
    }
}

/// One implementation of an op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    /// FineTune's CPU kernel ([`cpu`], or `model::attention` for attention), f32.
    CpuFused,
    /// The CPU frozen linear with bf16 weights × f32 activations on AMX-BF16 tiles.
    CpuBf16Amx,
    /// The CPU frozen linear with bf16 weights × f32 activations on AVX512-BF16.
    CpuBf16Avx512,
    /// The same without AVX512-BF16: a portable kernel (bf16-rounded f32 products).
    CpuBf16Portable,
    /// FineTune's CUDA kernel (`cuda`).
    Cuda,
    /// FineTune's fused bf16 attention on GPUs with bf16 tensor cores (`cuda::flash`), for the
    /// head sizes in [`FLASH_HEAD_DIMS`]; other head sizes take the `cuda` path.
    CudaFlash,
    /// candle-nn's fused forward with our backward, or a detached value with a routed gradient
    /// ([`gpu_common`]).
    GpuCommon,
    /// Differentiable Candle ops ([`composed`]).
    Composed,
}

impl Impl {
    /// The name reports use (`cpu-fused`, `cuda`, `gpu-common`, `composed`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CpuFused => "cpu-fused",
            Self::CpuBf16Amx => "cpu-bf16-amx",
            Self::CpuBf16Avx512 => "cpu-bf16-avx512",
            Self::CpuBf16Portable => "cpu-bf16-portable",
            Self::Cuda => "cuda",
            Self::CudaFlash => "cuda-flash",
            Self::GpuCommon => "gpu-common",
            Self::Composed => "composed",
        }
    }

    fn is_cpu(self) -> bool {
        matches!(
            self,
            Self::CpuFused | Self::CpuBf16Amx | Self::CpuBf16Avx512 | Self::CpuBf16Portable
        )
    }
}

impl serde::Serialize for Impl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The implementation chosen for every op, as [`plan`] decides it. Serialised (by `finetune bench
/// --json`) as `{"mode":"auto","rms_norm":"cpu-fused",…}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct KernelPlan {
    /// The mode it was decided in.
    pub mode: Mode,
    /// Dtype of activations: the model's dtype, except f32 in the CPU's bf16 mode (bf16 frozen
    /// matrices × f32 activations).
    #[serde(skip)]
    pub activations: DType,
    /// RMSNorm (llama family: per layer twice, q/k norms, the final norm).
    pub rms_norm: Impl,
    /// LayerNorm (GPT-2).
    pub layer_norm: Impl,
    /// Rotary position embedding of q and k.
    pub rope: Impl,
    /// Scaled dot-product attention with GQA.
    pub attention: Impl,
    /// The attention probabilities where the attention is composed (its scores in f32); fused
    /// into the attention kernel where that runs.
    pub softmax: Impl,
    /// The loss: mean cross-entropy over the positions that carry a label.
    pub cross_entropy: Impl,
    /// `silu(gate) ⊙ up` (the llama MLP).
    pub swiglu: Impl,
    /// `x · Wᵀ (+ LoRA term)` with the gradient to `x` and the term only (every projection and
    /// the LM head).
    pub frozen_linear: Impl,
    /// A projection with its LoRA term as one op (`cuda`, in passes without dropout), or the
    /// composed f32 LoRA term added by the frozen linear.
    pub lora_linear: Impl,
    /// The LM head and the loss a chunk of rows at a time in training ([`crate::model::loss`]):
    /// no whole (N, V) logits. Every device; `FINETUNE_LOSS_CHUNK=0` turns it off.
    pub loss_chunks: bool,
}

impl KernelPlan {
    /// True when the CPU runs bf16 frozen matrices × f32 activations.
    pub fn mixed_bf16(&self) -> bool {
        self.activations == DType::F32
            && matches!(
                self.frozen_linear,
                Impl::CpuBf16Amx | Impl::CpuBf16Avx512 | Impl::CpuBf16Portable
            )
    }
}

impl std::fmt::Display for KernelPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: rms_norm {}, layer_norm {}, rope {}, attention {}, softmax {}, cross_entropy {}, swiglu {}, frozen_linear {}, lora_linear {}, loss {}",
            self.mode.as_str(),
            self.rms_norm.as_str(),
            self.layer_norm.as_str(),
            self.rope.as_str(),
            self.attention.as_str(),
            self.softmax.as_str(),
            self.cross_entropy.as_str(),
            self.swiglu.as_str(),
            self.frozen_linear.as_str(),
            self.lora_linear.as_str(),
            if self.loss_chunks { "chunked" } else { "whole" }
        )
    }
}

/// The decision: which implementation of every op runs for a model in `dtype` on a `device`, with
/// the CPU's `cpu` features, in `mode`. See the table at the top of this file.
pub fn plan(device: DeviceKind, dtype: DType, cpu: CpuFeatures, mode: Mode) -> KernelPlan {
    use Impl::*;
    let auto = mode == Mode::Auto;
    let on_cpu = device == DeviceKind::Cpu;
    // The CPU's bf16 mode keeps the frozen matrices in bf16 and runs everything else in f32.
    let mixed = auto && on_cpu && dtype == DType::BF16;
    let activations = if mixed { DType::F32 } else { dtype };
    // FineTune's CUDA kernels (bf16, f32).
    let cuda =
        auto && device == DeviceKind::Cuda && matches!(activations, DType::BF16 | DType::F32);
    // FineTune's CPU kernels (f32 activations).
    let cpu_kernels = auto && on_cpu && activations == DType::F32;
    // candle-nn's forward + our backward: a GPU without FineTune's kernels (Metal, CUDA f16), and
    // every device in composed mode.
    let common = if auto { !on_cpu && !cuda } else { true };
    let pick = |cuda_impl: Impl, cpu_impl: Impl, other: Impl| {
        if cuda {
            cuda_impl
        } else if cpu_kernels {
            cpu_impl
        } else {
            other
        }
    };
    let rms_common = common && gpu_common::rms_norm_takes(activations);
    KernelPlan {
        mode,
        activations,
        rms_norm: pick(
            Cuda,
            CpuFused,
            if rms_common { GpuCommon } else { Composed },
        ),
        layer_norm: Composed,
        rope: pick(Cuda, CpuFused, if common { GpuCommon } else { Composed }),
        attention: pick(Cuda, CpuFused, Composed),
        // The composed attention's scores are f32 (f64 in an f64 model) whatever the dtype.
        softmax: match (cuda, auto && on_cpu && activations != DType::F64) {
            (true, _) => Cuda,
            (false, true) => CpuFused,
            (false, false) => Composed,
        },
        cross_entropy: pick(Cuda, CpuFused, Composed),
        swiglu: pick(Cuda, CpuFused, Composed),
        frozen_linear: pick(
            Cuda,
            match (mixed, cpu.amx, cpu.bf16_dot) {
                (false, _, _) => CpuFused,
                (true, true, _) => CpuBf16Amx,
                (true, false, true) => CpuBf16Avx512,
                (true, false, false) => CpuBf16Portable,
            },
            GpuCommon,
        ),
        lora_linear: pick(Cuda, CpuFused, Composed),
        loss_chunks: true,
    }
}

/// The plan for a model in `dtype` on `device`, in this process's mode.
pub fn plan_for_device(device: &Device, dtype: DType) -> KernelPlan {
    let mut p = plan(
        DeviceKind::of(device),
        dtype,
        CpuFeatures::detect(),
        Mode::current(),
    );
    p.loss_chunks = !crate::model::loss::switched_off();
    #[cfg(feature = "cuda")]
    if p.attention == Impl::Cuda && dtype == DType::BF16 && cuda::flash::available(device) {
        p.attention = Impl::CudaFlash;
    }
    p
}

/// f32 elements of the CUDA LoRA backward's widest scratch tensor (a chunk's rows of x or g):
/// 8M, 32 MB (`cuda::lora_bwd`; the memory estimate counts them).
pub const LORA_BWD_CHUNK_ELEMENTS: usize = 8 << 20;

/// Head sizes the fused CUDA attention is built for.
pub const FLASH_HEAD_DIMS: [usize; 3] = [64, 96, 128];

/// Whether a one-token decoding step of a llama-family model on `device` runs as the CPU's fused
/// step (`model::llama`'s `decode_cpu`: one pass over plain slices) rather than op by op: on the
/// CPU, f32 or bf16, in `auto` mode, unless `FINETUNE_DECODE=ops` asks for the ops (to compare
/// the two).
pub fn fused_decode(device: &Device, dtype: DType) -> bool {
    static OPS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ops = *OPS.get_or_init(|| std::env::var("FINETUNE_DECODE").is_ok_and(|v| v == "ops"));
    let p = plan_for_device(device, dtype);
    !ops && p.mode == Mode::Auto
        && p.frozen_linear.is_cpu()
        && matches!(dtype, DType::F32 | DType::BF16)
}

/// The plan for the tensors of one call, by `x`'s device and dtype.
pub fn plan_for(x: &Tensor) -> KernelPlan {
    plan_for_device(x.device(), x.dtype())
}

// ---------------------------------------------------------------- entry points

/// RMSNorm over the last dim with a frozen `weight`, differentiable.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if weight.dtype() == DType::F32 && x.dtype() != DType::F32 {
        // Gemma's convention: the weight multiplies in f32, one rounding at the end.
        return composed::rms_norm_f32_weight(x, weight, eps);
    }
    let same = weight.dtype() == x.dtype();
    match plan_for(x).rms_norm {
        #[cfg(feature = "cuda")]
        Impl::Cuda if same => cuda::rms_norm(x, weight, eps),
        Impl::GpuCommon if same => gpu_common::rms_norm(x, weight, eps),
        Impl::CpuFused if cpu::fits(weight) => cpu::rms_norm(x, weight, eps),
        _ => composed::rms_norm(x, weight, eps),
    }
}

/// LayerNorm over the last dim with affine weight and bias (GPT-2): composed everywhere.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    composed::layer_norm(x, weight, bias, eps)
}

/// RoPE on `x` `(B, H, T, Dh)` with `cos`/`sin` gathered for the positions, `(B or 1, 1, T, Dh)`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    match plan_for(x).rope {
        #[cfg(feature = "cuda")]
        Impl::Cuda => cuda::rope(x, cos, sin),
        Impl::GpuCommon => gpu_common::rope(x, cos, sin),
        Impl::CpuFused if [x, cos, sin].iter().all(|t| cpu::fits(t)) => cpu::rope(x, cos, sin),
        _ => composed::rope(x, cos, sin),
    }
}

/// RoPE on `x` `(B, T, H, Dh)` (a projection's rows split into heads), returned `(B, H, T, Dh)`:
/// on CUDA one pass that also transposes; elsewhere the transpose, then [`rope`].
pub fn rope_heads(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    match plan_for(x).rope {
        #[cfg(feature = "cuda")]
        Impl::Cuda => cuda::rope_heads(x, cos, sin),
        _ => rope(&x.transpose(1, 2)?.contiguous()?, cos, sin),
    }
}

/// `x` `(B, A, C, D)` → `(B, C, A, D)`, contiguous: the head transposes around attention (one
/// coalesced pass on CUDA, where RoPE's ops run).
pub fn swap_heads(x: &Tensor) -> Result<Tensor> {
    match plan_for(x).rope {
        #[cfg(feature = "cuda")]
        Impl::Cuda => cuda::swap_heads(x),
        _ => x.transpose(1, 2)?.contiguous(),
    }
}

/// `y + bias` for a projection's output `y` `(…, O)` and its frozen `bias` `(O)` (one launch on
/// CUDA, where the frozen products run).
pub fn add_bias(y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    match plan_for(y).frozen_linear {
        #[cfg(feature = "cuda")]
        Impl::Cuda => cuda::add_bias(y, bias),
        _ => y.broadcast_add(bias),
    }
}

/// `a + b` for two tensors of one shape: the residual adds (one 16-byte-a-thread launch on CUDA).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match plan_for(a).frozen_linear {
        #[cfg(feature = "cuda")]
        Impl::Cuda => cuda::add(a, b),
        _ => a.add(b),
    }
}

/// Softmax over the last dim (the attention probabilities of the composed attention).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    match plan_for(x).softmax {
        Impl::CpuFused if cpu::fits(x) => cpu::softmax_last_dim(x),
        _ => composed::softmax_last_dim(x),
    }
}

/// Mean cross-entropy of `(N, V)` `logits` against `targets` `(N)`, as a scalar.
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let choice = plan_for(logits).cross_entropy;
    if choice == Impl::CpuFused && cpu::fits(logits) {
        return cpu::cross_entropy(logits, targets);
    }
    let n = targets.len();
    let t = Tensor::from_vec(targets.to_vec(), n, logits.device())?;
    #[cfg(feature = "cuda")]
    if choice == Impl::Cuda {
        return cuda::cross_entropy_rows(logits, &t)?.sum_all()? / n as f64;
    }
    composed::cross_entropy(logits, &t)
}

/// The gated MLP product `act(gate) ⊙ up` (SwiGLU for silu).
pub fn gated(gate: &Tensor, up: &Tensor, act: Activation) -> Result<Tensor> {
    match plan_for(gate).swiglu {
        #[cfg(feature = "cuda")]
        Impl::Cuda if act == Activation::Silu => cuda::swiglu(gate, up),
        Impl::CpuFused if act == Activation::Silu && cpu::fits(gate) && cpu::fits(up) => {
            cpu::swiglu(gate, up)
        }
        _ => composed::gated(gate, up, act),
    }
}

/// An ungated MLP activation (GPT-2): Candle's unary ops everywhere.
pub fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    composed::activation(x, act)
}

#[cfg(test)]
mod tests;
