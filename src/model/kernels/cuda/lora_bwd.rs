//! The LoRA linear's backward on CUDA, straight on cuBLAS, in chunks of rows.
//!
//! Of `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ` with f32 factors A (r, I), B (O, r) and activations x (N, I) in
//! bf16 or f32: `dx = g·W + s·(g·B)·A`, `dA = s·(g·B)ᵀ·x`, `dB = s·gᵀ·(x·Aᵀ)`. The LoRA products
//! run in f32 as PEFT runs them (its adapters stay f32 over a bf16 model), so x and g are needed in
//! f32; composed from Candle's ops that made (N, I) f32 copies of x and of the LoRA part of dx,
//! its cast and the sum beside the frozen part: 14 bytes per element of the MLP's (N, I) in the
//! down projection's backward, the step's peak on a GPU once the logits are chunked
//! (`memory::estimate`). Here dx is written once (`g·W` by cuBLAS, then each chunk's f32 LoRA
//! part added in place, rounded once), and x and g are cast to f32 a chunk of rows at a time:
//! dA and dB accumulate over the chunks in cuBLAS (β = 1).

use candle_core::cuda::cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use candle_core::op::BackpropOp;
use candle_core::{Device, Storage};

use super::*;

use super::super::LORA_BWD_CHUNK_ELEMENTS as CHUNK_ELEMENTS;

/// Whether the LoRA ops' backward runs here (the default); `FINETUNE_CUDA_LORA_BWD=composed`
/// composes it from Candle's ops instead (to compare the two; 14 bytes per element of the
/// input's (N, in) against 2 here, BENCHMARKS.md).
pub(super) fn chunked() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("FINETUNE_CUDA_LORA_BWD").map_or(true, |v| v != "composed"))
}

/// Rows per chunk for an (N, I) → (N, O) projection.
pub(super) fn chunk_rows(i: usize, o: usize) -> usize {
    (CHUNK_ELEMENTS / i.max(o).max(1)).max(1)
}

/// Row-major `c (m×n) = α·op(a)·op(b) + β·c`, where op(a) is (m×k) and op(b) (k×n); `ta` / `tb`:
/// `a` / `b` is stored transposed, (k×m) / (n×k). Checks that the buffers hold the matrices.
#[allow(clippy::too_many_arguments)]
fn gemm<T>(
    blas: &CudaBlas,
    (a, ta): (&CudaView<'_, T>, bool),
    (b, tb): (&CudaView<'_, T>, bool),
    c: &mut CudaViewMut<'_, T>,
    (m, n, k): (usize, usize, usize),
    alpha: T,
    beta: T,
    op: &str,
) -> Result<()>
where
    CudaBlas: Gemm<T>,
{
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
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
    // cuBLAS is column-major: a row-major matrix is its transpose there, so cᵀ = op(b)ᵀ·op(a)ᵀ.
    let cfg = GemmConfig {
        transa: t(tb),
        transb: t(ta),
        m: to_i32(n, op)?,
        n: to_i32(m, op)?,
        k: to_i32(k, op)?,
        alpha,
        lda: to_i32(if tb { k } else { n }, op)?,
        ldb: to_i32(if ta { m } else { k }, op)?,
        beta,
        ldc: to_i32(n, op)?,
    };
    // SAFETY: the lengths checked above hold every element cuBLAS reads (op(a), op(b), and c when
    // β ≠ 0) and writes (c) for these sizes and leading dimensions.
    unsafe { blas.gemm(cfg, b, a, c) }.w()
}

/// The CUDA storage of a tensor's storage guard.
fn cuda<'a>(s: &'a Storage, op: &str) -> Result<&'a CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => candle_core::bail!("{op}: a tensor is not on the GPU"),
    }
}

/// (N, I, O, r) of x, g, W, A, B, checked: shapes that fit, x, g and W of one dtype, f32 factors.
fn dims(
    op: &str,
    [x, g, w, a, b]: [&Tensor; 5],
    rows: usize,
) -> Result<(usize, usize, usize, usize)> {
    let (n, i) = x.dims2()?;
    let (r, o) = (a.dim(0)?, g.dim(1)?);
    let fits = g.dims() == [n, o] && w.dims() == [o, i] && a.dims() == [r, i] && b.dims() == [o, r];
    if !fits || g.dtype() != x.dtype() || w.dtype() != x.dtype() || rows == 0 {
        candle_core::bail!(
            "{op}: x {:?} {:?}, g {:?} {:?}, W {:?} {:?}, A {:?}, B {:?} do not fit",
            x.dims(),
            x.dtype(),
            g.dims(),
            g.dtype(),
            w.dims(),
            w.dtype(),
            a.dims(),
            b.dims()
        );
    }
    if a.dtype() != DType::F32 || b.dtype() != DType::F32 {
        candle_core::bail!("{op}: LoRA factors must be f32");
    }
    Ok((n, i, o, r))
}

/// `(dx, dA, dB)` of the LoRA linear `x·Wᵀ + scale·(x·Aᵀ)·Bᵀ` for the upstream gradient `g`,
/// `rows` rows at a time. x, g and W share the activations' dtype (bf16 or f32); A and B are
/// f32. The results carry no graph.
pub(super) fn lora_backward(
    x: &Tensor,
    g: &Tensor,
    w: &Tensor,
    (a, b): (&Tensor, &Tensor),
    scale: f32,
    rows: usize,
    kept: Option<super::lora_split::Kept>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "ft-cuda-lora-linear backward";
    let (x, g, w, a, b) = (
        x.contiguous()?,
        g.contiguous()?,
        w.contiguous()?,
        a.contiguous()?,
        b.contiguous()?,
    );
    let (n, i, o, r) = dims(op, [&x, &g, &w, &a, &b], rows)?;
    let Device::Cuda(dev) = x.device() else {
        candle_core::bail!("{op}: x is not on the GPU");
    };
    let (xs, lx) = x.storage_and_layout();
    let (gs, lg) = g.storage_and_layout();
    let (ws, lw) = w.storage_and_layout();
    let (as_, la) = a.storage_and_layout();
    let (bs, lb) = b.storage_and_layout();
    let (xs, gs, ws) = (cuda(&xs, op)?, cuda(&gs, op)?, cuda(&ws, op)?);
    let (av, bv) = (
        view::<f32>(cuda(&as_, op)?, la, op)?,
        view::<f32>(cuda(&bs, op)?, lb, op)?,
    );
    if x.dtype() == DType::BF16 && super::lora_split::on() {
        // bf16 activations: the f32 products on tensor cores in parts, no chunks needed.
        let storages = [(xs, lx), (gs, lg), (ws, lw)];
        let kept = kept.as_ref();
        return split_backward(dev, storages, (&av, &bv), (n, i, o, r), scale, kept);
    }
    let blas = dev.cublas_handle();
    let dx = by_dtype!(x.dtype(), op, T => {
        let mut dx = alloc::<T>(dev, n * i)?;
        // dx = g·W, written whole (β = 0: cuBLAS does not read c).
        gemm(
            &blas,
            (&view::<T>(gs, lg, op)?, false),
            (&view::<T>(ws, lw, op)?, false),
            &mut dx.slice_mut(..),
            (n, i, o),
            T::ONE,
            T::ZERO,
            op,
        )?;
        let add = dev.get_or_load_custom_func(&format!("ft_add_into_{}", T::SUFFIX), MODULE, ptx()?)?;
        let mut da = alloc::<f32>(dev, r * i)?;
        let mut db = alloc::<f32>(dev, o * r)?;
        for start in (0..n).step_by(rows) {
            let c = rows.min(n - start);
            let mut part = chunk_low_rank(
                (&blas, dev),
                ((xs, lx), (gs, lg)),
                (&av, &bv),
                (i, o, r, scale),
                (start, c),
                (&mut da, &mut db),
            )?;
            let part = part.as_cuda_slice_mut::<f32>()?;
            let (len, one) = ((c * i) as i64, 1f32);
            let mut rows_dx = dx.slice_mut(start * i..(start + c) * i);
            let mut bl = add.builder();
            bl.arg(&mut rows_dx).arg(&*part).arg(&len).arg(&one);
            // SAFETY: the arguments match `ft_add_into`; one thread per element of the chunk.
            unsafe { bl.launch(rows_cfg(elem_blocks(c * i, op)?, 256)) }.w()?;
        }
        (
            wrap(CudaStorage::wrap_cuda_slice(dx, dev.clone()), (n, i)),
            wrap(CudaStorage::wrap_cuda_slice(da, dev.clone()), (r, i)),
            wrap(CudaStorage::wrap_cuda_slice(db, dev.clone()), (o, r)),
        )
    });
    Ok(dx)
}

/// A tensor of `shape` on `s`, carrying no graph.
fn wrap(s: CudaStorage, shape: (usize, usize)) -> Tensor {
    Tensor::from_storage(Storage::Cuda(s), shape, BackpropOp::none(), false)
}

/// [`lora_backward`] for bf16 x, g and W (`lora_split`): the storages of x, g and W with their
/// layouts, the f32 A and B, (N, I, O, r), the forward's splits where kept.
fn split_backward(
    dev: &CudaDevice,
    [(xs, lx), (gs, lg), (ws, lw)]: [(&CudaStorage, &Layout); 3],
    (av, bv): (&CudaView<'_, f32>, &CudaView<'_, f32>),
    (n, i, o, r): (usize, usize, usize, usize),
    scale: f32,
    kept: Option<&super::lora_split::Kept>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "ft-cuda-lora-linear backward";
    let v = |s, l| view::<half::bf16>(s, l, op);
    let d = super::lora_split::Shapes { n, i, o, r };
    let views = (&v(xs, lx)?, &v(gs, lg)?, &v(ws, lw)?);
    let (dx, da, db) = super::lora_split::backward(dev, views, (av, bv), d, scale, kept)?;
    let (da, db) = (
        CudaStorage::wrap_cuda_slice(da, dev.clone()),
        CudaStorage::wrap_cuda_slice(db, dev.clone()),
    );
    let dx = CudaStorage::wrap_cuda_slice(dx, dev.clone());
    Ok((wrap(dx, (n, i)), wrap(da, (r, i)), wrap(db, (o, r))))
}

/// The LoRA products of rows `start..start + c`: dA += (s·g·B)ᵀ·x and dB += s·gᵀ·(x·Aᵀ) (written,
/// β = 0, on the first chunk), and the chunk's f32 LoRA part of dx, (s·g·B)·A, returned in the
/// buffer that held the chunk's f32 x.
fn chunk_low_rank(
    (blas, dev): (&CudaBlas, &CudaDevice),
    ((xs, lx), (gs, lg)): ((&CudaStorage, &Layout), (&CudaStorage, &Layout)),
    (av, bv): (&CudaView<'_, f32>, &CudaView<'_, f32>),
    (i, o, r, scale): (usize, usize, usize, f32),
    (start, c): (usize, usize),
    (da, db): (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
) -> Result<CudaStorage> {
    let op = "ft-cuda-lora-linear backward";
    let beta = if start == 0 { 0.0 } else { 1.0 };
    let rows_of = |cols: usize, l: &Layout| {
        Layout::contiguous_with_offset((c, cols), l.start_offset() + start * cols)
    };
    let mut x32 = xs.to_dtype(&rows_of(i, lx), DType::F32)?;
    let g32 = gs.to_dtype(&rows_of(o, lg), DType::F32)?;
    let g32 = g32.as_cuda_slice::<f32>()?.slice(..);
    let mut mid = alloc::<f32>(dev, c * r)?;
    let mut gb = alloc::<f32>(dev, c * r)?;
    {
        let x32 = x32.as_cuda_slice::<f32>()?.slice(..);
        // x·Aᵀ, s·g·B, then dA += (s·g·B)ᵀ·x.
        gemm(
            blas,
            (&x32, false),
            (av, true),
            &mut mid.slice_mut(..),
            (c, r, i),
            1.0,
            0.0,
            op,
        )?;
        gemm(
            blas,
            (&g32, false),
            (bv, false),
            &mut gb.slice_mut(..),
            (c, r, o),
            scale,
            0.0,
            op,
        )?;
        let gbv = gb.slice(..);
        gemm(
            blas,
            (&gbv, true),
            (&x32, false),
            &mut da.slice_mut(..),
            (r, i, c),
            1.0,
            beta,
            op,
        )?;
    }
    // dB += s·gᵀ·(x·Aᵀ).
    gemm(
        blas,
        (&g32, true),
        (&mid.slice(..), false),
        &mut db.slice_mut(..),
        (o, r, c),
        scale,
        beta,
        op,
    )?;
    // The chunk's f32 x is spent: its buffer takes (s·g·B)·A.
    let part = x32.as_cuda_slice_mut::<f32>()?;
    gemm(
        blas,
        (&gb.slice(..), false),
        (av, false),
        &mut part.slice_mut(..),
        (c, i, r),
        1.0,
        0.0,
        op,
    )?;
    Ok(x32)
}
