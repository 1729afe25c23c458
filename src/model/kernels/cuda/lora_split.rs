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

use candle_core::cuda::cudarc::cublas::{result::gemm_ex, sys, CudaBlas};
use candle_core::cuda::cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut,
};
use half::bf16;

use super::*;

/// Whether bf16 LoRA products run here (the default); `FINETUNE_CUDA_LORA_SPLIT=0`: f32 path.
pub(super) fn on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("FINETUNE_CUDA_LORA_SPLIT").map_or(true, |v| v != "0"))
}

/// The parts copy j holds: all three side by side; the left and right operands of the six
/// products `hi·hi, hi·mid, hi·lo, mid·hi, mid·mid, lo·hi` (those of weight 2⁻¹⁶ and above).
const PARTS: [u8; 3] = [0, 1, 2];
const LEFT: [u8; 6] = [0, 0, 0, 1, 1, 2];
const RIGHT: [u8; 6] = [0, 1, 2, 0, 1, 0];

/// An f32 matrix inside a buffer: (rows, cols), element (u, v) at `u·su + v·sv`.
#[derive(Debug, Clone, Copy)]
struct Mat {
    rows: usize,
    cols: usize,
    su: usize,
    sv: usize,
}

impl Mat {
    fn rows(rows: usize, cols: usize) -> Self {
        Mat {
            rows,
            cols,
            su: cols,
            sv: 1,
        }
    }
}

/// bf16 copies of `m` in `src` (the sum of `parts` blocks `part_stride` apart, times `scale`),
/// copy j made of part `pat[j]`, copy j's element (u, v) at `j·dj + u·du + v·dv` of a fresh
/// buffer of `len` elements.
fn split(
    dev: &CudaDevice,
    src: &CudaView<'_, f32>,
    m: Mat,
    (parts, part_stride, scale): (usize, usize, f32),
    pat: &[u8],
    (du, dv, dj): (usize, usize, usize),
    len: usize,
) -> Result<CudaSlice<bf16>> {
    let op = "ft-split-parts";
    let last = |n: usize| n.saturating_sub(1);
    let src_end = last(parts) * part_stride + last(m.rows) * m.su + last(m.cols) * m.sv;
    let dst_end = last(pat.len()) * dj + last(m.rows) * du + last(m.cols) * dv;
    let n = m.rows * m.cols;
    if n == 0 || parts == 0 || src_end >= src.len() || dst_end >= len || pat.is_empty() {
        candle_core::bail!("{op}: {m:?} ({parts} parts) does not fit its buffers");
    }
    // SAFETY: the copies cover every element of dst (the callers' layouts tile it) and the
    // kernel writes each copy's element of every source element.
    let dst = unsafe { dev.alloc::<bf16>(len) }?;
    let pattern: i32 = pat
        .iter()
        .enumerate()
        .map(|(j, &p)| i32::from(p) << (2 * j))
        .sum();
    let f = dev.get_or_load_custom_func("ft_split_parts", MODULE, ptx()?)?;
    let (rows, cols) = (m.rows as i64, to_i32(m.cols, op)?);
    let (su, sv, ps) = (m.su as i64, m.sv as i64, part_stride as i64);
    let (parts, copies) = (to_i32(parts, op)?, to_i32(pat.len(), op)?);
    let (du, dv, dj) = (du as i64, dv as i64, dj as i64);
    let mut bl = f.builder();
    bl.arg(src).arg(&rows).arg(&cols).arg(&su).arg(&sv);
    bl.arg(&parts).arg(&ps).arg(&scale).arg(&dst);
    bl.arg(&copies).arg(&pattern).arg(&du).arg(&dv).arg(&dj);
    // SAFETY: `ft_split_parts`' arguments in its order and types; the largest source and copy
    // indices were checked against the buffers above; one thread per source element.
    unsafe { bl.launch(rows_cfg(elem_blocks(n, op)?, 256)) }.w()?;
    Ok(dst)
}

/// `scale · Σ_q src[u·su + q·sq + v]` over the three part-products, (rows, cols) f32.
fn sum_parts(
    dev: &CudaDevice,
    src: &CudaSlice<f32>,
    (rows, cols): (usize, usize),
    (su, sq): (usize, usize),
    scale: f32,
) -> Result<CudaSlice<f32>> {
    let op = "ft-sum-parts";
    let n = rows * cols;
    if n == 0 || 2 * sq + (rows - 1) * su + cols > src.len() {
        candle_core::bail!("{op}: ({rows}, {cols}) parts do not fit {} values", src.len());
    }
    let dst = alloc::<f32>(dev, n)?;
    let f = dev.get_or_load_custom_func("ft_sum_parts", MODULE, ptx()?)?;
    let (r, c, su, sq) = (rows as i64, to_i32(cols, op)?, su as i64, sq as i64);
    let mut bl = f.builder();
    bl.arg(src).arg(&dst).arg(&r).arg(&c).arg(&su).arg(&sq).arg(&scale);
    // SAFETY: `ft_sum_parts`' arguments; the largest index read was checked above; one thread
    // per element of dst, which it writes whole.
    unsafe { bl.launch(rows_cfg(elem_blocks(n, op)?, 256)) }.w()?;
    Ok(dst)
}

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

/// Row-major `c (m×n) = α·op(a)·op(b) + β·c` for bf16 `a`, `b` on tensor cores with f32
/// accumulation; `ta` / `tb`: stored transposed, (k×m) / (n×k).
#[allow(clippy::too_many_arguments)]
fn gemm<C: Out>(
    (blas, dev): (&CudaBlas, &CudaDevice),
    (a, ta): (&CudaView<'_, bf16>, bool),
    (b, tb): (&CudaView<'_, bf16>, bool),
    c: &mut CudaViewMut<'_, C>,
    (m, n, k): (usize, usize, usize),
    (alpha, beta): (f32, f32),
    op: &str,
) -> Result<()> {
    if a.len() < m * k || b.len() < k * n || c.len() < m * n || m * n * k == 0 {
        candle_core::bail!(
            "{op}: a product of ({m}×{k}) and ({k}×{n}) over buffers of {}, {} and {}",
            a.len(),
            b.len(),
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
    let (ap, _ga) = a.device_ptr(&stream);
    let (bp, _gb) = b.device_ptr(&stream);
    let (cp, _gc) = c.device_ptr_mut(&stream);
    // cuBLAS is column-major: a row-major matrix is its transpose there, so cᵀ = op(b)ᵀ·op(a)ᵀ.
    // SAFETY: the lengths checked above hold every element read (op(a), op(b), and c when β ≠ 0)
    // and written (c) for these sizes and leading dimensions; α and β are f32 as the 32F compute
    // type takes them; the handle works on the device's stream.
    unsafe {
        gemm_ex(
            *blas.handle(),
            t(tb),
            t(ta),
            to_i32(n, op)?,
            to_i32(m, op)?,
            to_i32(k, op)?,
            (&alpha) as *const f32 as *const _,
            bp as *const _,
            sys::cudaDataType_t::CUDA_R_16BF,
            to_i32(if tb { k } else { n }, op)?,
            ap as *const _,
            sys::cudaDataType_t::CUDA_R_16BF,
            to_i32(if ta { m } else { k }, op)?,
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
#[derive(Debug, Clone, Copy)]
pub(super) struct Shapes {
    pub n: usize,
    pub i: usize,
    pub o: usize,
    pub r: usize,
}

/// `p = x·Aᵀ` as its three part-products side by side, (n, 3r) f32.
fn down(
    ctx: (&CudaBlas, &CudaDevice),
    x: &CudaView<'_, bf16>,
    a: &CudaView<'_, f32>,
    d: Shapes,
    op: &str,
) -> Result<CudaSlice<f32>> {
    let Shapes { n, i, r, .. } = d;
    let a3 = split(ctx.1, a, Mat::rows(r, i), (1, 0, 1.0), &PARTS, (i, 1, r * i), 3 * r * i)?;
    let mut p = alloc::<f32>(ctx.1, n * 3 * r)?;
    let a3v = a3.slice(..);
    gemm(ctx, (x, false), (&a3v, true), &mut p.slice_mut(..), (n, 3 * r, i), (1.0, 0.0), op)?;
    Ok(p)
}

/// `y += s·(x·Aᵀ)·Bᵀ` for bf16 x (n, i) and y (n, o), f32 A (r, i) and B (o, r): the LoRA term
/// of the forward, added onto the frozen product with one rounding.
pub(super) fn forward(
    dev: &CudaDevice,
    (x, a, b): (&CudaView<'_, bf16>, &CudaView<'_, f32>, &CudaView<'_, f32>),
    y: &mut CudaSlice<bf16>,
    d: Shapes,
    scale: f32,
) -> Result<()> {
    let op = "ft-cuda-lora-linear (bf16 parts)";
    let Shapes { n, o, r, .. } = d;
    let blas = dev.cublas_handle();
    let ctx = (&*blas, dev);
    let p = down(ctx, x, a, d, op)?;
    let (pv, mid) = (p.slice(..), Mat { su: 3 * r, ..Mat::rows(n, r) });
    let m6 = split(dev, &pv, mid, (3, r, 1.0), &LEFT, (6 * r, 1, r), n * 6 * r)?;
    let b6 = split(dev, b, Mat::rows(o, r), (1, 0, 1.0), &RIGHT, (6 * r, 1, r), o * 6 * r)?;
    let (m6v, b6v) = (m6.slice(..), b6.slice(..));
    let mut yv = y.slice_mut(..);
    gemm(ctx, (&m6v, false), (&b6v, true), &mut yv, (n, o, 6 * r), (scale, 1.0), op)
}

/// `(dx, dA, dB)` of `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ` for bf16 x (n, i), g (n, o), W (o, i) and f32 A
/// (r, i), B (o, r): `dx = g·W + (s·g·B)·A` (bf16, one rounding), `dA = (s·g·B)ᵀ·x`,
/// `dB = s·gᵀ·(x·Aᵀ)` (f32).
pub(super) fn backward(
    dev: &CudaDevice,
    (x, g, w): (&CudaView<'_, bf16>, &CudaView<'_, bf16>, &CudaView<'_, bf16>),
    (a, b): (&CudaView<'_, f32>, &CudaView<'_, f32>),
    d: Shapes,
    scale: f32,
) -> Result<(CudaSlice<bf16>, CudaSlice<f32>, CudaSlice<f32>)> {
    let op = "ft-cuda-lora-linear backward (bf16 parts)";
    let Shapes { n, i, o, r } = d;
    let blas = dev.cublas_handle();
    let ctx = (&*blas, dev);
    // dx = g·W, written whole (β = 0).
    let mut dx = alloc::<bf16>(dev, n * i)?;
    gemm(ctx, (g, false), (w, false), &mut dx.slice_mut(..), (n, i, o), (1.0, 0.0), op)?;
    // x·Aᵀ (its parts for dB) and s·g·B (its parts for dA and for dx).
    let three = |rows| Mat { su: 3 * r, ..Mat::rows(rows, r) };
    let p = down(ctx, x, a, d, op)?;
    let mid3 = split(dev, &p.slice(..), three(n), (3, r, 1.0), &PARTS, (3 * r, 1, r), n * 3 * r)?;
    let b3 = split(dev, b, Mat::rows(o, r), (1, 0, 1.0), &PARTS, (3 * r, 1, r), o * 3 * r)?;
    let mut q = alloc::<f32>(dev, n * 3 * r)?;
    let b3v = b3.slice(..);
    gemm(ctx, (g, false), (&b3v, false), &mut q.slice_mut(..), (n, 3 * r, o), (1.0, 0.0), op)?;
    let qv = q.slice(..);
    let gb3 = split(dev, &qv, three(n), (3, r, scale), &PARTS, (3 * r, 1, r), n * 3 * r)?;
    let gb6 = split(dev, &qv, three(n), (3, r, scale), &LEFT, (6 * r, 1, r), n * 6 * r)?;
    // dA = Σ parts of (s·g·B)ᵀ·x: (3r, i), summed over the three row blocks.
    let mut da3 = alloc::<f32>(dev, 3 * r * i)?;
    let gb3v = gb3.slice(..);
    gemm(ctx, (&gb3v, true), (x, false), &mut da3.slice_mut(..), (3 * r, i, n), (1.0, 0.0), op)?;
    let da = sum_parts(dev, &da3, (r, i), (i, r * i), 1.0)?;
    // dB = s · Σ parts of gᵀ·(x·Aᵀ): (o, 3r), summed over the three column blocks.
    let mut db3 = alloc::<f32>(dev, o * 3 * r)?;
    let mid3v = mid3.slice(..);
    gemm(ctx, (g, true), (&mid3v, false), &mut db3.slice_mut(..), (o, 3 * r, n), (1.0, 0.0), op)?;
    let db = sum_parts(dev, &db3, (o, r), (3 * r, r), scale)?;
    // dx += (s·g·B)·A along the six-fold inner dimension.
    let a6 = split(dev, a, Mat::rows(r, i), (1, 0, 1.0), &RIGHT, (i, 1, r * i), 6 * r * i)?;
    let (gb6v, a6v) = (gb6.slice(..), a6.slice(..));
    gemm(ctx, (&gb6v, false), (&a6v, false), &mut dx.slice_mut(..), (n, i, 6 * r), (1.0, 1.0), op)?;
    Ok((dx, da, db))
}
