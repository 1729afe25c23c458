//! The LoRA op's f32 products for bf16 activations on bf16 tensor cores, as exact as f32.
//!
//! PEFT keeps the adapters in f32 over a bf16 model, so x (or g) meets A and B in f32. Composed
//! on cuBLAS's f32 products that costs an f32 copy of x, of g and of the (N, O) update, on FFMA
//! kernels: a quarter of a Qwen2.5-0.5B step's device time went to `bf16 → f32` casts alone and
//! another quarter to the f32 products (`bench/results/h100-fifteenth-2026-12-07-a.log`). Here
//! the f32 side of each product (A, B, or the (N, r) intermediate) is split into three bf16 parts
//! (`ft_split_parts`: hi, mid, lo, together its 24 significant bits); x and g are bf16 already,
//! so `x·Aᵀ` is the sum of x times each part, one cuBLAS call (bf16 in, f32 out) with the parts
//! side by side. Where both sides are f32 (`(x·Aᵀ)·Bᵀ`, `(g·B)·A`) the six part-products above
//! 2⁻²⁴ run as one product along a six-fold inner dimension, added onto the bf16 output by the
//! same call (β = 1: one rounding, as the f32 path). No (N, I) or (N, O) f32 tensor is made, so
//! the backward needs no chunks. `FINETUNE_CUDA_LORA_SPLIT=0` turns this off (the f32 path).
//!
//! The forward keeps what the backward would make again ([`Kept`]): the splits of A and B and of
//! `x·Aᵀ`, so the backward skips a product and two of its three splits (`FINETUNE_CUDA_LORA_KEEP=0`
//! makes them again, to compare). That is 12 bytes per LoRA parameter and 12·r per token of each
//! adapted projection until its backward (`memory::estimate`).

use candle_core::cuda::cudarc::cublas::{result::gemm_ex, sys, CudaBlas};
use candle_core::cuda::cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut,
};
use half::bf16;

use super::lora_parts::{one, split, sum_parts, two, Mat, Split, Sum};
use super::*;

/// Whether bf16 LoRA products run here (the default); `FINETUNE_CUDA_LORA_SPLIT=0`: f32 path.
pub(super) fn on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("FINETUNE_CUDA_LORA_SPLIT").map_or(true, |v| v != "0"))
}

/// Whether the forward keeps its splits for the backward (the default);
/// `FINETUNE_CUDA_LORA_KEEP=0`: the backward makes them again.
fn keep() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("FINETUNE_CUDA_LORA_KEEP").map_or(true, |v| v != "0"))
}

/// What a forward keeps for its backward: A's six copies (`a_parts`), B's split (`b_parts`) and
/// the split of `x·Aᵀ` (`row_parts`, n × 6r), for the shapes `d`.
pub(super) struct Kept {
    a6: CudaSlice<bf16>,
    b6: CudaSlice<bf16>,
    m6: CudaSlice<bf16>,
    d: Shapes,
}

/// The parts copy j holds (0 hi, 1 mid, 2 lo) in the left and right operands of the six products
/// above 2⁻²⁴ (`hi·lo, mid·mid, lo·hi, hi·hi, hi·mid, mid·hi`). The first three copies of each
/// are the three parts, so a product with one f32 side uses the first half of the same split.
const LEFT: [u8; 6] = [0, 1, 2, 0, 0, 1];
const RIGHT: [u8; 6] = [2, 1, 0, 0, 1, 0];

/// An output type of [`gemm`]: f32, or bf16 (rounded once from the f32 sum).
trait Out: candle_core::cuda::CudaDType {
    const TYPE: sys::cudaDataType_t;
}
impl Out for f32 {
    const TYPE: sys::cudaDataType_t = sys::cudaDataType_t::CUDA_R_32F;
}
impl Out for bf16 {
    const TYPE: sys::cudaDataType_t = sys::cudaDataType_t::CUDA_R_16BF;
}

/// A bf16 operand of [`gemm`]: stored row-major as given (`t` false) or transposed, rows `ld`
/// apart (their length, or more when the operand is the first columns of a wider matrix).
struct Arg<'a, 'b> {
    v: &'a CudaView<'b, bf16>,
    t: bool,
    ld: usize,
}

/// `v` row-major (`t` false) or transposed, with rows `ld` apart.
fn arg<'a, 'b>(v: &'a CudaView<'b, bf16>, t: bool, ld: usize) -> Arg<'a, 'b> {
    Arg { v, t, ld }
}

/// Whether a stored (rows × cols) matrix with rows `ld` apart lies inside `len` elements.
fn holds(len: usize, (rows, cols): (usize, usize), ld: usize) -> bool {
    ld >= cols && rows > 0 && cols > 0 && (rows - 1) * ld + cols <= len
}

/// Row-major `c (m×n) = α·op(a)·op(b) + β·c` for bf16 `a`, `b` on tensor cores with f32
/// accumulation; op(a) is (m×k), op(b) (k×n); c's rows are n apart.
fn gemm<C: Out>(
    (blas, dev): (&CudaBlas, &CudaDevice),
    (a, b): (Arg<'_, '_>, Arg<'_, '_>),
    c: &mut CudaViewMut<'_, C>,
    (m, n, k): (usize, usize, usize),
    (alpha, beta): (f32, f32),
    op: &str,
) -> Result<()> {
    let stored = |x: &Arg<'_, '_>, rows, cols| if x.t { (cols, rows) } else { (rows, cols) };
    if !holds(a.v.len(), stored(&a, m, k), a.ld)
        || !holds(b.v.len(), stored(&b, k, n), b.ld)
        || !holds(c.len(), (m, n), n)
    {
        candle_core::bail!(
            "{op}: a product of ({m}×{k}) and ({k}×{n}) over buffers of {}, {} and {}",
            a.v.len(),
            b.v.len(),
            c.len()
        );
    }
    let t = |on: bool| {
        if on {
            sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let stream = dev.cuda_stream();
    let (ap, _ga) = a.v.device_ptr(&stream);
    let (bp, _gb) = b.v.device_ptr(&stream);
    let (cp, _gc) = c.device_ptr_mut(&stream);
    // cuBLAS is column-major: a row-major matrix is its transpose there, so cᵀ = op(b)ᵀ·op(a)ᵀ.
    // SAFETY: the lengths checked above hold every element read (op(a), op(b), and c when β ≠ 0)
    // and written (c) for these sizes and leading dimensions; α and β are f32 as the 32F compute
    // type takes them; the handle works on the device's stream.
    unsafe {
        gemm_ex(
            *blas.handle(),
            t(b.t),
            t(a.t),
            to_i32(n, op)?,
            to_i32(m, op)?,
            to_i32(k, op)?,
            (&alpha) as *const f32 as *const _,
            bp as *const _,
            sys::cudaDataType_t::CUDA_R_16BF,
            to_i32(b.ld, op)?,
            ap as *const _,
            sys::cudaDataType_t::CUDA_R_16BF,
            to_i32(a.ld, op)?,
            (&beta) as *const f32 as *const _,
            cp as *mut _,
            C::TYPE,
            to_i32(n, op)?,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
    }
    .w()
}

/// Shapes of one LoRA op: x (n, i), W (o, i), A (r, i), B (o, r).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Shapes {
    pub n: usize,
    pub i: usize,
    pub o: usize,
    pub r: usize,
}

/// `p = x·Aᵀ` as its three part-products side by side, (n, 3r) f32, from the split of A by
/// [`a_parts`] (its first 3r rows are the three parts).
fn down(
    ctx: (&CudaBlas, &CudaDevice),
    x: &CudaView<'_, bf16>,
    a_split: &CudaSlice<bf16>,
    d: Shapes,
    op: &str,
) -> Result<CudaSlice<f32>> {
    let Shapes { n, i, r, .. } = d;
    let mut p = alloc::<f32>(ctx.1, n * 3 * r)?;
    let a3 = a_split.slice(..3 * r * i);
    let args = (arg(x, false, i), arg(&a3, true, i));
    gemm(
        ctx,
        args,
        &mut p.slice_mut(..),
        (n, 3 * r, i),
        (1.0, 0.0),
        op,
    )?;
    Ok(p)
}

/// A (r, i) as (copies·r, i) bf16, row block j holding part `RIGHT[j]` (3 or 6 copies).
fn a_parts<'a, 'b>(a: &'a CudaView<'b, f32>, d: Shapes, copies: usize) -> Split<'a, 'b> {
    let Shapes { i, r, .. } = d;
    Split {
        src: a,
        m: Mat::rows(r, i),
        parts: (1, 0, 1.0),
        pat: &RIGHT[..copies],
        to: (i, 1, r * i),
        len: copies * r * i,
    }
}

/// B (o, r) as (o, 6r) bf16, column block j holding part `RIGHT[j]`.
fn b_parts<'a, 'b>(b: &'a CudaView<'b, f32>, d: Shapes) -> Split<'a, 'b> {
    let Shapes { o, r, .. } = d;
    Split {
        src: b,
        m: Mat::rows(o, r),
        parts: (1, 0, 1.0),
        pat: &RIGHT,
        to: (6 * r, 1, r),
        len: o * 6 * r,
    }
}

/// The (n, r) sum of the three part-products in `p` (n, 3r), times `scale`, as (n, 6r) bf16,
/// column block j holding part `LEFT[j]`.
fn row_parts<'a, 'b>(p: &'a CudaView<'b, f32>, d: Shapes, scale: f32) -> Split<'a, 'b> {
    let Shapes { n, r, .. } = d;
    Split {
        src: p,
        m: Mat {
            su: 3 * r,
            ..Mat::rows(n, r)
        },
        parts: (3, r, scale),
        pat: &LEFT,
        to: (6 * r, 1, r),
        len: n * 6 * r,
    }
}

/// The split of `x·Aᵀ` (n, 6r), from A's split `a_split` (its first 3r rows are the parts):
/// cuBLAS's (n, 3r) f32 product, then a split launch.
fn mid_parts(
    ctx: (&CudaBlas, &CudaDevice),
    x: &CudaView<'_, bf16>,
    a_split: &CudaSlice<bf16>,
    d: Shapes,
    op: &str,
) -> Result<CudaSlice<bf16>> {
    let p = down(ctx, x, a_split, d, op)?;
    one(split(ctx.1, &[row_parts(&p.slice(..), d, 1.0)])?)
}

/// The split of `s·g·B` (n, 6r), from B's split `b6` (its first 3r columns are the parts):
/// cuBLAS's (n, 3r) f32 product, then a split launch.
fn grad_parts(
    ctx: (&CudaBlas, &CudaDevice),
    g: &CudaView<'_, bf16>,
    b6: &CudaSlice<bf16>,
    d: Shapes,
    scale: f32,
    op: &str,
) -> Result<CudaSlice<bf16>> {
    let Shapes { n, o, r, .. } = d;
    let b6v = b6.slice(..);
    let mut q = alloc::<f32>(ctx.1, n * 3 * r)?;
    let args = (arg(g, false, o), arg(&b6v, false, 6 * r));
    gemm(
        ctx,
        args,
        &mut q.slice_mut(..),
        (n, 3 * r, o),
        (1.0, 0.0),
        op,
    )?;
    one(split(ctx.1, &[row_parts(&q.slice(..), d, scale)])?)
}

/// `y += s·(x·Aᵀ)·Bᵀ` for bf16 x (n, i) and y (n, o), f32 A (r, i) and B (o, r): the LoRA term
/// of the forward, added onto the frozen product with one rounding. Returns what the backward
/// can use ([`Kept`]) unless `FINETUNE_CUDA_LORA_KEEP=0`.
pub(super) fn forward(
    dev: &CudaDevice,
    (x, a, b): (&CudaView<'_, bf16>, &CudaView<'_, f32>, &CudaView<'_, f32>),
    y: &mut CudaSlice<bf16>,
    d: Shapes,
    scale: f32,
) -> Result<Option<Kept>> {
    let op = "ft-cuda-lora-linear (bf16 parts)";
    let Shapes { n, o, r, .. } = d;
    let blas = dev.cublas_handle();
    let ctx = (&*blas, dev);
    // Six copies of A when kept (the backward's `(g·B)·A` takes six), three otherwise.
    let copies = if keep() { 6 } else { 3 };
    let (a6, b6) = two(split(dev, &[a_parts(a, d, copies), b_parts(b, d)])?)?;
    let m6 = mid_parts(ctx, x, &a6, d, op)?;
    let (m6v, b6v) = (m6.slice(..), b6.slice(..));
    let args = (arg(&m6v, false, 6 * r), arg(&b6v, true, 6 * r));
    gemm(
        ctx,
        args,
        &mut y.slice_mut(..),
        (n, o, 6 * r),
        (scale, 1.0),
        op,
    )?;
    Ok(keep().then_some(Kept { a6, b6, m6, d }))
}

/// `(dA, dB)` from the splits of `s·g·B` (`gb6`) and of `x·Aᵀ` (`mid6`), (n, 6r) each:
/// `dA = Σ parts of (s·g·B)ᵀ·x` and `dB = s · Σ parts of gᵀ·(x·Aᵀ)`, the three part-products of
/// each by cuBLAS, then summed in one launch.
fn factor_grads(
    ctx: (&CudaBlas, &CudaDevice),
    (x, g): (&CudaView<'_, bf16>, &CudaView<'_, bf16>),
    (gb6, mid6): (&CudaSlice<bf16>, &CudaSlice<bf16>),
    d: Shapes,
    scale: f32,
    op: &str,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    let Shapes { n, i, o, r } = d;
    let (gb6v, mid6v) = (gb6.slice(..), mid6.slice(..));
    // (3r, i): the parts of dA in three row blocks.
    let mut da3 = alloc::<f32>(ctx.1, 3 * r * i)?;
    let args = (arg(&gb6v, true, 6 * r), arg(x, false, i));
    gemm(
        ctx,
        args,
        &mut da3.slice_mut(..),
        (3 * r, i, n),
        (1.0, 0.0),
        op,
    )?;
    // (o, 3r): the parts of dB in three column blocks.
    let mut db3 = alloc::<f32>(ctx.1, o * 3 * r)?;
    let args = (arg(g, true, o), arg(&mid6v, false, 6 * r));
    gemm(
        ctx,
        args,
        &mut db3.slice_mut(..),
        (o, 3 * r, n),
        (1.0, 0.0),
        op,
    )?;
    let da = Sum {
        src: &da3,
        shape: (r, i),
        strides: (i, r * i),
        scale: 1.0,
    };
    let db = Sum {
        src: &db3,
        shape: (o, r),
        strides: (3 * r, r),
        scale,
    };
    sum_parts(ctx.1, [da, db])
}

/// `(dx, dA, dB)` of `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ` for bf16 x (n, i), g (n, o), W (o, i) and f32 A
/// (r, i), B (o, r): `dx = g·W + (s·g·B)·A` (bf16, one rounding), `dA = (s·g·B)ᵀ·x`,
/// `dB = s·gᵀ·(x·Aᵀ)` (f32). With the forward's [`Kept`] splits (of these shapes) the splits of
/// A, B and `x·Aᵀ` and the product `x·Aᵀ` are not made again.
pub(super) fn backward(
    dev: &CudaDevice,
    (x, g, w): (
        &CudaView<'_, bf16>,
        &CudaView<'_, bf16>,
        &CudaView<'_, bf16>,
    ),
    (a, b): (&CudaView<'_, f32>, &CudaView<'_, f32>),
    d: Shapes,
    scale: f32,
    kept: Option<&Kept>,
) -> Result<(CudaSlice<bf16>, CudaSlice<f32>, CudaSlice<f32>)> {
    let op = "ft-cuda-lora-linear backward (bf16 parts)";
    let Shapes { n, i, o, r } = d;
    let blas = dev.cublas_handle();
    let ctx = (&*blas, dev);
    let kept = kept.filter(|k| k.d == d);
    // dx = g·W, written whole (β = 0).
    let mut dx = alloc::<bf16>(dev, n * i)?;
    let args = (arg(g, false, o), arg(w, false, i));
    gemm(ctx, args, &mut dx.slice_mut(..), (n, i, o), (1.0, 0.0), op)?;
    // A's six copies and B's split: kept, or made here.
    let made = match kept {
        Some(_) => None,
        None => Some(two(split(dev, &[a_parts(a, d, 6), b_parts(b, d)])?)?),
    };
    let (a6, b6) = match (kept, &made) {
        (Some(k), _) => (&k.a6, &k.b6),
        (None, Some((a6, b6))) => (a6, b6),
        (None, None) => candle_core::bail!("{op}: no split of A and B"),
    };
    // s·g·B and x·Aᵀ (kept, or made here), split; their first three column blocks are the parts.
    let gb6 = grad_parts(ctx, g, b6, d, scale, op)?;
    let made_mid = match kept {
        Some(_) => None,
        None => Some(mid_parts(ctx, x, a6, d, op)?),
    };
    let mid6 = match (kept, &made_mid) {
        (Some(k), _) => &k.m6,
        (None, Some(m)) => m,
        (None, None) => candle_core::bail!("{op}: no split of x·Aᵀ"),
    };
    let (da, db) = factor_grads(ctx, (x, g), (&gb6, mid6), d, scale, op)?;
    let (gb6v, a6v) = (gb6.slice(..), a6.slice(..));
    // dx += (s·g·B)·A along the six-fold inner dimension.
    let args = (arg(&gb6v, false, 6 * r), arg(&a6v, false, i));
    gemm(
        ctx,
        args,
        &mut dx.slice_mut(..),
        (n, i, 6 * r),
        (1.0, 1.0),
        op,
    )?;
    Ok((dx, da, db))
}
