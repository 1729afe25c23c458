//! Fused attention on CUDA for bf16 (`flash.cu`): one kernel forward, one backward (plus a row
//! dot product), scores never in device memory, the log-sum-exp of each row the only thing kept
//! besides q, k, v and the output. k and v are read at their KV heads (no repeated copies); their
//! gradients come back at KV heads. Used by [`crate::model::kernels::attention`] for bf16 on GPUs
//! of compute capability 8.0 or later with head sizes in [`FLASH_HEAD_DIMS`](crate::model::kernels::FLASH_HEAD_DIMS); `FINETUNE_CUDA_FLASH=0`
//! turns it off (the cuBLAS + softmax-kernel path, chunked for long sequences, runs instead).

use std::sync::{Mutex, OnceLock};

use candle_core::cuda::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
    TensorId,
};
use half::bf16;

use crate::model::kernels::cpu::Saved;

const SOURCE: &str = concat!(include_str!("flash_frag.cu"), include_str!("flash.cu"));
const MODULE: &str = "finetune_flash";
/// Queries (forward) or keys (backward) per block of 128 threads.
const BLK: usize = 64;
use crate::model::kernels::FLASH_HEAD_DIMS as HEAD_DIMS;

/// The PTX of `flash.cu`, compiled on first use: for compute_90 on a Hopper GPU or later (the
/// backward adds dQ four floats an instruction, `red.global.add.v4.f32`), else for compute_80
/// (bf16 `mma.sync`, the rest of the kernels); `FINETUNE_CUDA_FLASH_ARCH=80` takes compute_80
/// everywhere, to compare.
fn ptx(dev: &CudaDevice) -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    static ARCH: OnceLock<&'static str> = OnceLock::new();
    let arch = *ARCH.get_or_init(|| {
        let forced = std::env::var("FINETUNE_CUDA_FLASH_ARCH").is_ok_and(|v| v == "80");
        let hopper = dev
            .cuda_stream()
            .context()
            .compute_capability()
            .is_ok_and(|(major, _)| major >= 9);
        if hopper && !forced {
            "compute_90"
        } else {
            "compute_80"
        }
    });
    let opts = candle_core::cuda::cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        ..Default::default()
    };
    super::compiled_ptx(&PTX, SOURCE, opts, "FineTune's flash attention")
}

/// Whether the fused attention runs on `device`: a CUDA GPU with bf16 tensor cores, not turned
/// off by `FINETUNE_CUDA_FLASH=0`.
pub fn available(device: &candle_core::Device) -> bool {
    match device {
        candle_core::Device::Cuda(dev) => !switched_off() && gpu_has_bf16_mma(dev),
        _ => false,
    }
}

/// Whether the GPU has bf16 tensor cores (compute capability 8.0 or later), asked once.
fn gpu_has_bf16_mma(dev: &CudaDevice) -> bool {
    static CC: OnceLock<bool> = OnceLock::new();
    *CC.get_or_init(|| {
        dev.cuda_stream()
            .context()
            .compute_capability()
            .is_ok_and(|(major, _)| major >= 8)
    })
}

fn switched_off() -> bool {
    static OFF: OnceLock<bool> = OnceLock::new();
    *OFF.get_or_init(|| std::env::var("FINETUNE_CUDA_FLASH").is_ok_and(|v| v == "0"))
}

/// The backward kernel's name: dQ added a row at a time through shared memory
/// (`ft_flash_bwd_D`), or straight from the fragments (`ft_flash_bwd_scattered_D`: at D = 128,
/// where the staged kernel spills registers, and by `FINETUNE_CUDA_FLASH_DQ=scattered`, to
/// compare).
fn bwd_kernel(d: usize) -> String {
    static SCATTERED: OnceLock<bool> = OnceLock::new();
    let scattered = *SCATTERED
        .get_or_init(|| std::env::var("FINETUNE_CUDA_FLASH_DQ").is_ok_and(|v| v == "scattered"));
    match scattered || d > 96 {
        true => format!("ft_flash_bwd_scattered_{d}"),
        false => format!("ft_flash_bwd_{d}"),
    }
}

/// Whether [`attention`] takes these inputs: bf16 on a GPU with bf16 tensor cores, a head size
/// the kernels are built for, and a sequence an `int` indexes.
pub fn usable(q: &Tensor, bias: &Tensor) -> bool {
    let (dh, t) = match q.dims() {
        [_, _, t, dh] => (*dh, *t),
        _ => return false,
    };
    q.dtype() == DType::BF16
        && bias.dtype() == DType::BF16
        && HEAD_DIMS.contains(&dh)
        && t.saturating_mul(t) < i32::MAX as usize
        && available(q.device())
}

/// `t` contiguous, its data starting on a 16-byte boundary (the kernels load 8 bf16 at a time).
fn aligned(t: &Tensor) -> Result<Tensor> {
    let t = t.contiguous()?;
    if t.layout().start_offset().is_multiple_of(8) {
        return Ok(t);
    }
    // A fresh buffer from offset 0 (`copy` would keep the offset), on the graph.
    t.force_contiguous()
}

/// Runs `f` with the CUDA slice of a contiguous tensor of element type `T`.
fn with_slice<T: CudaDType, R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&candle_core::cuda::cudarc::driver::CudaView<'_, T>) -> Result<R>,
) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*s else {
        candle_core::bail!("{op}: not on the GPU");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: input must be contiguous");
    };
    let view = cs.as_cuda_slice::<T>()?.slice(a..b);
    f(&view)
}

fn tensor<T: CudaDType>(s: CudaSlice<T>, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

fn int(v: usize, op: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{op}: {v} is out of range")))
}

/// The forward kernel for head size `d` and the queries a block of it takes: 64 times the
/// m-tiles a warp takes (flash.cu's `FT_FLASH` instances: two at D = 64, one above;
/// `FINETUNE_CUDA_FLASH_FWD_ROWS=64` takes one at D = 64 too, to compare).
fn fwd_kernel(d: usize) -> (String, usize) {
    static ROWS64: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let rows64 = *ROWS64
        .get_or_init(|| std::env::var("FINETUNE_CUDA_FLASH_FWD_ROWS").is_ok_and(|v| v == "64"));
    match d {
        64 if rows64 => ("ft_flash_fwd_64_rows64".into(), BLK),
        64 => ("ft_flash_fwd_64".into(), 2 * BLK),
        _ => (format!("ft_flash_fwd_{d}"), BLK),
    }
}

/// The shapes of one call: q (B, H, T, D), k and v (B, KV, T, D), bias (R, 1, T, T).
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    kv: usize,
    t: usize,
    d: usize,
    bias_batches: usize,
}

impl Dims {
    fn of(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Self> {
        let (b, h, t, d) = q.dims4()?;
        let (kb, kv, kt, kd) = k.dims4()?;
        let r = match bias.dims() {
            [r, 1, bt, bt2] if (*r == 1 || *r == b) && *bt == t && *bt2 == t => *r,
            _ => candle_core::bail!("flash attention: bias {:?} for T = {t}", bias.dims()),
        };
        if (kb, kt, kd) != (b, t, d) || v.dims() != k.dims() || kv == 0 || h % kv != 0 {
            candle_core::bail!(
                "flash attention: q {:?}, k {:?}, v {:?} do not fit",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        Ok(Self {
            b,
            h,
            kv,
            t,
            d,
            bias_batches: r,
        })
    }

    /// T, H, KV and the bias's batches as the kernels' `int`s.
    fn ints(&self, op: &str) -> Result<[i32; 4]> {
        Ok([
            int(self.t, op)?,
            int(self.h, op)?,
            int(self.kv, op)?,
            int(self.bias_batches, op)?,
        ])
    }

    /// (B·H, ⌈T/rows⌉) for blocks of `rows` queries or keys: x, the head, runs fastest, so the
    /// blocks of every head that meet the most keys (forward: the last query blocks; backward:
    /// the first key blocks) start first.
    fn grid(&self, rows: usize, op: &str) -> Result<(u32, u32)> {
        let blocks = self.t.div_ceil(rows);
        if blocks > 65_535 {
            candle_core::bail!("{op}: {} positions is past the grid", self.t);
        }
        Ok((int(self.b * self.h, op)? as u32, blocks as u32))
    }
}

/// `softmax(q·kᵀ·scale + bias)·v` for bf16 `(B, H, T, D)` q and `(B, KV, T, D)` k, v (H a multiple
/// of KV), bias `(1 or B, 1, T, T)` masking every key after its query; differentiable in q, k, v.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let dims = Dims::of(q, k, v, bias)?;
    let id = bias.id();
    let bias = aligned(&bias.detach())?;
    let op = Flash {
        codes: kept_codes(id, &bias, dims)?,
        bias,
        scale: scale as f32,
        dims,
        lse: Saved::new(),
    };
    aligned(q)?.apply_op3(&aligned(k)?, &aligned(v)?, op)
}

/// The fused attention as one op of the graph: its output is the attention's value (nothing is
/// added to carry the gradient), the per-row log-sum-exp kept for the backward.
struct Flash {
    bias: Tensor,
    /// The bias's tiles sorted by [`tile_codes`], shared by the forward and the backward.
    codes: Tensor,
    scale: f32,
    dims: Dims,
    lse: Saved<Tensor>,
}

/// The contiguous bf16 view of a CUDA storage.
fn view<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    op: &str,
) -> Result<candle_core::cuda::cudarc::driver::CudaView<'a, bf16>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: input must be contiguous");
    };
    if a % 8 != 0 {
        candle_core::bail!("{op}: input must start on a 16-byte boundary");
    }
    Ok(s.as_cuda_slice::<bf16>()?.slice(a..b))
}

impl CustomOp3 for Flash {
    fn name(&self) -> &'static str {
        "ft-flash-attention"
    }

    cuda_only!(3);

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        lq: &Layout,
        k: &CudaStorage,
        lk: &Layout,
        v: &CudaStorage,
        lv: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let dev = q.device.clone();
        let (qv, kv, vv) = (view(q, lq, op)?, view(k, lk, op)?, view(v, lv, op)?);
        let bias = (&self.bias, &self.codes);
        let (o, lse) = forward(&dev, (&qv, &kv, &vv), bias, self.scale, self.dims)?;
        let Dims { b, h, t, d, .. } = self.dims;
        self.lse.set(tensor(lse, &dev, (b, h, t)));
        Ok((
            CudaStorage::wrap_cuda_slice(o, dev),
            Shape::from_dims(&[b, h, t, d]),
        ))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(lse) = self.lse.get() else {
            candle_core::bail!("{}: backward before forward", self.name());
        };
        let dy = aligned(&dy.detach().to_dtype(DType::BF16)?)?;
        let bias = (&self.bias, &self.codes);
        let (dq, dk, dv) = backward((q, k, v), bias, (o, &lse, &dy), self.scale, self.dims)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

fn device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(d) => Ok(d.clone()),
        _ => candle_core::bail!("flash attention: not on the GPU"),
    }
}

/// [`tile_codes`] of the bias whose id is `id`, sorted once and kept for the next calls with it:
/// every layer of a pass, and its backward, attends with the same bias (a few are kept: the
/// sliding-window layers have their own).
fn kept_codes(id: TensorId, bias: &Tensor, dims: Dims) -> Result<Tensor> {
    static KEPT: Mutex<Vec<(TensorId, Tensor)>> = Mutex::new(Vec::new());
    if let Some((_, codes)) = KEPT
        .lock()
        .ok()
        .and_then(|k| k.iter().find(|(i, _)| *i == id).cloned())
    {
        return Ok(codes);
    }
    let codes = tile_codes(bias, dims)?;
    if let Ok(mut kept) = KEPT.lock() {
        if kept.len() >= 4 {
            kept.remove(0);
        }
        kept.push((id, codes.clone()));
    }
    Ok(codes)
}

/// The code of each 64×64 tile of the bias (`ft_flash_tiles`: all zero, all −∞, mixed), u8
/// (R, nb, nb) with nb = ⌈T/64⌉: the kernels skip the masked tiles and read the bias only in
/// the mixed ones. One pass over the bias (32 MB at T = 4096), once a bias ([`kept_codes`]).
fn tile_codes(bias: &Tensor, dims: Dims) -> Result<Tensor> {
    let op = "ft-flash-tiles";
    let dev = device(bias)?;
    let (nb, r) = (dims.t.div_ceil(BLK), dims.bias_batches);
    // SAFETY: ft_flash_tiles writes one code per block of its (nb, nb, r) grid: every element.
    let codes = unsafe { dev.alloc::<u8>(r * nb * nb) }?;
    let f = dev.get_or_load_custom_func("ft_flash_tiles", MODULE, ptx(&dev)?)?;
    let (tt, nbu, ru) = (int(dims.t, op)?, int(nb, op)? as u32, int(r, op)? as u32);
    with_slice::<bf16, _>(bias, op, |bv| {
        if bv.len() != r * dims.t * dims.t {
            candle_core::bail!("{op}: the bias does not hold the checked shape");
        }
        let mut bl = f.builder();
        bl.arg(bv).arg(&codes).arg(&tt);
        let cfg = LaunchConfig {
            grid_dim: (nbu, nbu, ru),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: `ft_flash_tiles`' arguments in its order and types; the bias holds R·T² bf16
        // (checked above) and codes R·nb² bytes.
        unsafe { bl.launch(cfg) }.w()?;
        Ok(())
    })?;
    Ok(tensor(codes, &dev, (r, nb, nb)))
}

/// The forward kernel: the output (B, H, T, D) bf16 and the per-row log-sum-exp (B, H, T) f32.
fn forward(
    dev: &CudaDevice,
    (qv, kv_, vv): (
        &CudaView<'_, bf16>,
        &CudaView<'_, bf16>,
        &CudaView<'_, bf16>,
    ),
    (bias, codes): (&Tensor, &Tensor),
    scale: f32,
    dims: Dims,
) -> Result<(CudaSlice<bf16>, CudaSlice<f32>)> {
    let op = "ft-flash-fwd";
    let Dims { b, h, t, d, kv, .. } = dims;
    if qv.len() != b * h * t * d || kv_.len() != b * kv * t * d || vv.len() != kv_.len() {
        candle_core::bail!("{op}: inputs do not hold the checked shapes");
    }
    // SAFETY: the kernel writes every element of o and lse (each row of each head once).
    let o = unsafe { dev.alloc::<bf16>(b * h * t * d) }?;
    let lse = unsafe { dev.alloc::<f32>(b * h * t) }?;
    let (name, rows) = fwd_kernel(d);
    let f = dev.get_or_load_custom_func(&name, MODULE, ptx(dev)?)?;
    let [tt, hh, kk, rr] = dims.ints(op)?;
    let (gx, gy) = dims.grid(rows, op)?;
    with_slice::<bf16, _>(bias, op, |bv| {
        with_slice::<u8, _>(codes, op, |cv| {
            let mut bl = f.builder();
            bl.arg(qv)
                .arg(kv_)
                .arg(vv)
                .arg(bv)
                .arg(cv)
                .arg(&o)
                .arg(&lse);
            bl.arg(&tt).arg(&hh).arg(&kk).arg(&rr).arg(&scale);
            let cfg = LaunchConfig {
                grid_dim: (gx, gy, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments are `ft_flash_fwd_D`'s in its order and types; the inputs
            // hold the shapes `dims` checked (lengths checked above), contiguous and 16-byte
            // aligned; codes are `tile_codes`' for this bias.
            unsafe { bl.launch(cfg) }.w()?;
            Ok(())
        })
    })?;
    Ok((o, lse))
}

/// δ = Σ_d dO·O per row of `rows` rows of `d` (bf16 o and dy), in f32.
fn row_dots(
    dev: &CudaDevice,
    o: &Tensor,
    dy: &Tensor,
    rows: usize,
    d: usize,
) -> Result<CudaSlice<f32>> {
    let op = "ft-flash-delta";
    // SAFETY: ft_flash_delta writes one value per row.
    let delta = unsafe { dev.alloc::<f32>(rows) }?;
    let f = dev.get_or_load_custom_func("ft_flash_delta", MODULE, ptx(dev)?)?;
    let (rows_i, d_i) = (rows as i64, int(d, op)?);
    with_slice::<bf16, _>(o, op, |ov| {
        with_slice::<bf16, _>(dy, op, |dv_| {
            let mut bl = f.builder();
            bl.arg(ov).arg(dv_).arg(&delta).arg(&rows_i).arg(&d_i);
            let cfg = LaunchConfig {
                grid_dim: (int(rows.div_ceil(8), op)? as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: `ft_flash_delta`'s arguments; o and dy hold `rows` rows of `d`.
            unsafe { bl.launch(cfg) }.w()?;
            Ok(())
        })
    })?;
    Ok(delta)
}

/// Dynamic shared memory of the backward kernel: q and dO tiles, lse and δ rows in `STAGES`
/// buffers (two up to D = 96, flash.cu), the k and v tiles, the dS tile.
fn bwd_shared_bytes(d: usize) -> usize {
    let stages = if d <= 96 { 2 } else { 1 };
    (2 * stages + 2) * BLK * (d + 8) * 2 + BLK * (BLK + 8) * 2 + 2 * stages * BLK * 4
}

fn backward(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    (bias, codes): (&Tensor, &Tensor),
    (o, lse, dy): (&Tensor, &Tensor, &Tensor),
    scale: f32,
    dims: Dims,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "ft-flash-bwd";
    let dev = device(q)?;
    let Dims { b, h, kv, t, d, .. } = dims;
    let rows = b * h * t;
    let delta = row_dots(&dev, o, dy, rows, d)?;
    let dq = dev.alloc_zeros::<f32>(rows * d)?;
    let dk = dev.alloc_zeros::<f32>(b * kv * t * d)?;
    let dv = dev.alloc_zeros::<f32>(b * kv * t * d)?;
    let f = dev.get_or_load_custom_func(&bwd_kernel(d), MODULE, ptx(&dev)?)?;
    let shared = bwd_shared_bytes(d);
    if shared > 48 * 1024 {
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            shared as i32,
        )
        .w()?;
        // All of the SM's unified memory as shared memory, so three blocks of 65.5 KB fit.
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
            100,
        )
        .w()?;
    }
    let [tt, hh, kk, rr] = dims.ints(op)?;
    let (gx, gy) = dims.grid(BLK, op)?;
    with_slice::<bf16, _>(q, op, |qv| {
        with_slice::<bf16, _>(k, op, |kv_| {
            with_slice::<bf16, _>(v, op, |vv| {
                with_slice::<bf16, _>(bias, op, |bv| {
                    with_slice::<u8, _>(codes, op, |cv| {
                        with_slice::<bf16, _>(dy, op, |dyv| {
                            with_slice::<f32, _>(lse, op, |lse_v| {
                                let mut bl = f.builder();
                                bl.arg(qv)
                                    .arg(kv_)
                                    .arg(vv)
                                    .arg(bv)
                                    .arg(cv)
                                    .arg(dyv)
                                    .arg(lse_v)
                                    .arg(&delta);
                                bl.arg(&dq).arg(&dk).arg(&dv);
                                bl.arg(&tt).arg(&hh).arg(&kk).arg(&rr).arg(&scale);
                                let cfg = LaunchConfig {
                                    grid_dim: (gx, gy, 1),
                                    block_dim: (128, 1, 1),
                                    shared_mem_bytes: shared as u32,
                                };
                                // SAFETY: the arguments are `ft_flash_bwd_D`'s in its order
                                // and types; the inputs hold the shapes `dims` checked; codes
                                // are `tile_codes`' for this bias; dq, dk, dv are zeroed f32 of
                                // (B, H, T, D) and (B, KV, T, D); the shared memory is what it
                                // indexes.
                                unsafe { bl.launch(cfg) }.w()?;
                                Ok(())
                            })
                        })
                    })
                })
            })
        })
    })?;
    let [dq, dk, dv] = to_bf16(&dev, [&dq, &dk, &dv])?;
    Ok((
        tensor(dq, &dev, (b, h, t, d)),
        tensor(dk, &dev, (b, kv, t, d)),
        tensor(dv, &dev, (b, kv, t, d)),
    ))
}

/// dQ, dK and dV (f32, as the backward accumulated them) as bf16, in one launch of
/// `ft_flash_cast3` instead of three of Candle's casts.
fn to_bf16(dev: &CudaDevice, src: [&CudaSlice<f32>; 3]) -> Result<[CudaSlice<bf16>; 3]> {
    let op = "ft-flash-cast3";
    if src
        .iter()
        .any(|s| !s.len().is_multiple_of(4) || s.is_empty())
    {
        candle_core::bail!("{op}: lengths must be a nonzero multiple of four");
    }
    // SAFETY: the kernel writes every element of each (four a thread over len / 4 threads).
    let dst = [
        unsafe { dev.alloc::<bf16>(src[0].len()) }?,
        unsafe { dev.alloc::<bf16>(src[1].len()) }?,
        unsafe { dev.alloc::<bf16>(src[2].len()) }?,
    ];
    let n4 = src.map(|s| s.len() as i64 / 4);
    let most = src.iter().map(|s| s.len() / 4).max().unwrap_or(1);
    let f = dev.get_or_load_custom_func("ft_flash_cast3", MODULE, ptx(dev)?)?;
    let mut bl = f.builder();
    for j in 0..3 {
        bl.arg(src[j]).arg(&dst[j]).arg(&n4[j]);
    }
    let cfg = LaunchConfig {
        grid_dim: (int(most.div_ceil(256), op)? as u32, 3, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `ft_flash_cast3`'s arguments in its order (source, result, length in fours, three
    // times); each result holds as many bf16 as its source f32, lengths divisible by four, and
    // Candle's allocations are aligned for 16-byte loads.
    unsafe { bl.launch(cfg) }.w()?;
    Ok(dst)
}
