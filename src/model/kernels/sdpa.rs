//! Scaled dot-product attention's entry points: which kernel runs it (the CPU's fused one, in f32
//! or with bf16 products; CUDA's flash or whole-score kernel; query chunks for long sequences; the
//! composed graph) and Gemma 2's soft-capped form.

use candle_core::{DType, Result, Tensor};

#[cfg(feature = "cuda")]
use super::cuda;
use super::{composed, cpu, plan_for, softmax_last_dim, Impl};
use crate::model::attention::chunked;

/// Scaled dot-product attention, `softmax(q·kᵀ·scale + bias)·v`. q `(B, H, T, Dh)`, k and v
/// `(B, KV, S, Dh)` with `H` a multiple of `KV` and `S ≥ T` keys (`S > T`: decoding against a KV
/// cache), `bias` additive and broadcastable to `(B, H, T, S)`. Returns `(B, H, T, Dh)`. The fused
/// kernels take `S = T` (training, prefill); cached decoding runs the composed form.
///
/// With `S = T` and a `(1 or B, 1, T, T)` bias, the bias must be causal (mask every key after its
/// query, as every model here builds it): long sequences run in query chunks
/// (`attention::chunked`) that read only the keys up to their last row.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    attention_with(q, k, v, bias, scale, Products::F32)
}

/// The precision of the CPU attention's products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Products {
    /// f32 operands.
    F32,
    /// The CPU's bf16 mode (bf16 weights × f32 activations): q, k, v, the probabilities and the
    /// gradients rounded to bf16 for the fused attention's products, the sums in f32, as torch
    /// computes attention in a bf16 model, on the AMX tiles. f32 on CPUs without them, and
    /// with `FINETUNE_CPU_ATTENTION=f32`.
    Bf16,
}

impl Products {
    /// `Bf16` in the CPU's bf16 mode: where a frozen matrix of the layer (`weight`) is bf16 and
    /// the activations `x` are f32 on the CPU.
    pub fn of(weight: Option<&Tensor>, x: &Tensor) -> Self {
        let bf16_weight = weight.is_some_and(|w| w.dtype() == DType::BF16);
        if bf16_weight && x.dtype() == DType::F32 && x.device().is_cpu() {
            Self::Bf16
        } else {
            Self::F32
        }
    }
}

/// Whether [`Products::Bf16`] takes the tiles in this process.
pub fn bf16_attention_products() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("FINETUNE_CPU_ATTENTION").map_or(true, |v| v != "f32")
            && crate::model::bf16::small_products_on_tiles()
    })
}

/// [`attention`] with the products of the fused CPU kernel in the given precision.
pub fn attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
    products: Products,
) -> Result<Tensor> {
    let (b, h, t, dh) = q.dims4()?;
    let (kb, kv, kt, kd) = k.dims4()?;
    if (kb, kd) != (b, dh) || kt < t || v.dims4()? != (b, kv, kt, dh) || kv == 0 || h % kv != 0 {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    // The kernels take a bias of (1 or B, 1, T, T) and as many keys as queries.
    let bias_rows = match bias.dims() {
        [r, 1, bt, bt2] if (*r == 1 || *r == b) && *bt == t && *bt2 == t && kt == t => Some(*r),
        _ => None,
    };
    let choice = plan_for(q).attention;
    if let (Impl::CpuFused, Some(rows)) = (choice, bias_rows) {
        if [q, k, v].iter().all(|x| cpu::fits(x)) && bias.device().is_cpu() {
            let bf16 = products == Products::Bf16 && bf16_attention_products();
            return crate::model::attention::flash(q, k, v, bias, (rows, scale), bf16);
        }
    }
    // bf16 on tensor-core GPUs: the fused kernel, k and v read at their KV heads.
    #[cfg(feature = "cuda")]
    if choice == Impl::CudaFlash && bias_rows.is_some() && cuda::flash::usable(q, bias) {
        return cuda::flash::attention(q, k, v, bias, scale);
    }
    #[cfg(feature = "cuda")]
    let choice = if choice == Impl::CudaFlash {
        Impl::Cuda
    } else {
        choice
    };
    let rep = h / kv;
    let k = composed::repeat_kv(k.clone(), rep)?.contiguous()?;
    let v = composed::repeat_kv(v.clone(), rep)?.contiguous()?;
    // Long sequences go through in query chunks, no whole (B, H, T, T) scores kept.
    let chunks = bias_rows.and_then(|_| chunked::chunk_rows(b, h, t));
    #[cfg(feature = "cuda")]
    if choice == Impl::Cuda && bias_rows.is_some() && bias.dtype() == q.dtype() {
        if let Some(rows) = chunks {
            let how = chunked::Chunking {
                rows,
                causal: true,
                softmax: chunked::Softmax::Cuda,
            };
            return chunked::attention(q, &k, &v, bias, scale, how);
        }
        return cuda::attention(q, &k, &v, bias, scale);
    }
    if let Some(rows) = chunks {
        let how = chunked::Chunking {
            rows,
            causal: true,
            softmax: chunked::Softmax::Composed,
        };
        return chunked::attention(q, &k, &v, bias, scale, how);
    }
    composed::attention_with(q, &k, &v, bias, scale, &softmax_last_dim)
}

/// [`attention`] with Gemma 2's soft-capped scores, `softmax(cap·tanh(q·kᵀ·scale / cap) + bias)·v`:
/// the composed form on every device (the fused kernels have no cap), differentiable through
/// Candle's tanh.
pub fn attention_softcap(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
    cap: f64,
) -> Result<Tensor> {
    let (h, kv) = (q.dim(1)?, k.dim(1)?);
    if kv == 0 || h % kv != 0 || cap <= 0.0 {
        candle_core::bail!("attention_softcap: {h} heads over {kv} kv heads, cap {cap}");
    }
    let k = composed::repeat_kv(k.clone(), h / kv)?.contiguous()?;
    let v = composed::repeat_kv(v.clone(), h / kv)?.contiguous()?;
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let (scores, dtype) = composed::upcast(&scores)?;
    let capped = ((scores / cap)?.tanh()? * cap)?;
    let probs = softmax_last_dim(&capped.broadcast_add(&bias.to_dtype(capped.dtype())?)?)?;
    probs.to_dtype(dtype)?.matmul(&v)
}
