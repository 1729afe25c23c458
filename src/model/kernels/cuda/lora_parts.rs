//! The bf16 parts of f32 matrices for `lora_split`'s products, and the sums of part-products:
//! `ft_split_parts` writes copies of an f32 matrix (or of the sum of three part-products) as
//! hi, mid and lo bf16 parts, two matrices a launch; `ft_sum_parts` adds three part-products
//! back into f32, two results a launch (lora_parts.cu).

use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, DevicePtr, DeviceRepr};
use half::bf16;

use super::*;

/// An f32 matrix inside a buffer: (rows, cols), element (u, v) at `u·su + v·sv`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Mat {
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) su: usize,
    pub(super) sv: usize,
}

impl Mat {
    pub(super) fn rows(rows: usize, cols: usize) -> Self {
        Mat {
            rows,
            cols,
            su: cols,
            sv: 1,
        }
    }
}

/// One matrix to split: copies of `m` in `src` (the sum of `parts` blocks `part_stride` apart,
/// times `scale`), copy j made of part `pat[j]`, copy j's element (u, v) at `j·dj + u·du + v·dv`
/// of a fresh buffer of `len` elements.
pub(super) struct Split<'a, 'b> {
    pub(super) src: &'a CudaView<'b, f32>,
    pub(super) m: Mat,
    pub(super) parts: (usize, usize, f32),
    pub(super) pat: &'a [u8],
    pub(super) to: (usize, usize, usize),
    pub(super) len: usize,
}

/// A job of `ft_split_parts` (`SplitJob` in lora_parts.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Job {
    src: u64,
    dst: u64,
    rows: i64,
    su: i64,
    sv: i64,
    part_stride: i64,
    du: i64,
    dv: i64,
    dj: i64,
    cols: i32,
    parts: i32,
    copies: i32,
    pattern: i32,
    scale: f32,
    unused: i32,
}

// SAFETY: plain old data with lora_parts.cu's `SplitJob` layout (two pointers, seven 64-bit ints,
// four ints, a float, an int).
unsafe impl DeviceRepr for Job {}

/// The splits of one or two matrices in one launch, their buffers in order.
pub(super) fn split(dev: &CudaDevice, splits: &[Split<'_, '_>]) -> Result<Vec<CudaSlice<bf16>>> {
    let op = "ft-split-parts";
    if splits.is_empty() || splits.len() > 2 {
        candle_core::bail!("{op}: {} matrices for a launch of one or two", splits.len());
    }
    let last = |n: usize| n.saturating_sub(1);
    let mut dsts = Vec::with_capacity(2);
    for sp in splits {
        let (m, (parts, stride, _), (du, dv, dj)) = (sp.m, sp.parts, sp.to);
        if m.rows * m.cols == 0 || parts == 0 || sp.pat.is_empty() {
            candle_core::bail!("{op}: an empty split of {m:?}");
        }
        // The kernel indexes elements with 32-bit ints.
        to_i32(m.rows * m.cols, op)?;
        let src_end = last(parts) * stride + last(m.rows) * m.su + last(m.cols) * m.sv;
        let dst_end = last(sp.pat.len()) * dj + last(m.rows) * du + last(m.cols) * dv;
        if src_end >= sp.src.len() || dst_end >= sp.len {
            candle_core::bail!("{op}: {m:?} ({parts} parts) does not fit its buffers");
        }
        // SAFETY: the copies cover every element of dst (the callers' layouts tile it) and the
        // kernel writes each copy's element of every source element.
        dsts.push(unsafe { dev.alloc::<bf16>(sp.len) }?);
    }
    let stream = dev.cuda_stream();
    let mut jobs = Vec::with_capacity(2);
    let mut keep = Vec::with_capacity(4);
    for (sp, dst) in splits.iter().zip(&dsts) {
        let (src, held_src) = sp.src.device_ptr(&stream);
        let (dst, held_dst) = dst.device_ptr(&stream);
        keep.push((held_src, held_dst));
        let (m, (parts, stride, scale), (du, dv, dj)) = (sp.m, sp.parts, sp.to);
        let long = |v: usize| v as i64;
        jobs.push(Job {
            src,
            dst,
            rows: long(m.rows),
            su: long(m.su),
            sv: long(m.sv),
            part_stride: long(stride),
            du: long(du),
            dv: long(dv),
            dj: long(dj),
            cols: to_i32(m.cols, op)?,
            parts: to_i32(parts, op)?,
            copies: to_i32(sp.pat.len(), op)?,
            pattern: sp
                .pat
                .iter()
                .enumerate()
                .map(|(j, &p)| i32::from(p) << (2 * j))
                .sum(),
            scale,
            unused: 0,
        });
    }
    let most = splits
        .iter()
        .map(|sp| sp.m.rows * sp.m.cols)
        .max()
        .unwrap_or(1);
    let (first, second) = (jobs[0], jobs[jobs.len() - 1]);
    let f = dev.get_or_load_custom_func("ft_split_parts", MODULE, ptx()?)?;
    let mut bl = f.builder();
    bl.arg(&first).arg(&second);
    let cfg = LaunchConfig {
        grid_dim: (
            to_i32(elem_blocks(most, op)?, op)? as u32,
            jobs.len() as u32,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `ft_split_parts`' two jobs by value in `SplitJob`'s layout; each job's largest
    // source and copy indices were checked against its buffers above; blockIdx.y < jobs.len()
    // picks a real job, and threads past a job's elements return.
    unsafe { bl.launch(cfg) }.w()?;
    drop(keep);
    Ok(dsts)
}

/// One sum of [`sum_parts`]: `scale · Σ_q src[u·su + q·sq + v]` over the three part-products,
/// an f32 (rows, cols) = `shape` result, `strides` = (su, sq).
pub(super) struct Sum<'a> {
    pub(super) src: &'a CudaSlice<f32>,
    pub(super) shape: (usize, usize),
    pub(super) strides: (usize, usize),
    pub(super) scale: f32,
}

/// A job of `ft_sum_parts` (`SumJob` in lora_parts.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct SumJob {
    src: u64,
    dst: u64,
    rows: i64,
    su: i64,
    sq: i64,
    cols: i32,
    scale: f32,
}

// SAFETY: plain old data with lora_parts.cu's `SumJob` layout (two pointers, three 64-bit ints, an
// int, a float).
unsafe impl DeviceRepr for SumJob {}

/// Two sums of part-products (dA's and dB's) in one launch, their results in order.
pub(super) fn sum_parts(
    dev: &CudaDevice,
    sums: [Sum<'_>; 2],
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    let op = "ft-sum-parts";
    let mut dsts = Vec::with_capacity(2);
    for s in &sums {
        let ((rows, cols), (su, sq)) = (s.shape, s.strides);
        if rows * cols == 0 || 2 * sq + (rows - 1) * su + cols > s.src.len() {
            candle_core::bail!(
                "{op}: ({rows}, {cols}) parts do not fit {} values",
                s.src.len()
            );
        }
        // The kernel indexes elements with 32-bit ints.
        to_i32(rows * cols, op)?;
        dsts.push(alloc::<f32>(dev, rows * cols)?);
    }
    let stream = dev.cuda_stream();
    let mut jobs = Vec::with_capacity(2);
    let mut keep = Vec::with_capacity(2);
    for (s, dst) in sums.iter().zip(&dsts) {
        let (src, held_src) = s.src.device_ptr(&stream);
        let (dst, held_dst) = dst.device_ptr(&stream);
        keep.push((held_src, held_dst));
        let ((rows, cols), (su, sq)) = (s.shape, s.strides);
        jobs.push(SumJob {
            src,
            dst,
            rows: rows as i64,
            su: su as i64,
            sq: sq as i64,
            cols: to_i32(cols, op)?,
            scale: s.scale,
        });
    }
    let most = sums
        .iter()
        .map(|s| s.shape.0 * s.shape.1)
        .max()
        .unwrap_or(1);
    let f = dev.get_or_load_custom_func("ft_sum_parts", MODULE, ptx()?)?;
    let mut bl = f.builder();
    bl.arg(&jobs[0]).arg(&jobs[1]);
    let cfg = LaunchConfig {
        grid_dim: (to_i32(elem_blocks(most, op)?, op)? as u32, 2, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `ft_sum_parts`' two jobs by value in `SumJob`'s layout; each job's largest index
    // read was checked above and its dst holds rows × cols; threads past a job's elements return.
    unsafe { bl.launch(cfg) }.w()?;
    drop(keep);
    match (dsts.pop(), dsts.pop()) {
        (Some(second), Some(first)) => Ok((first, second)),
        _ => candle_core::bail!("{op}: two results expected"),
    }
}

/// The buffers of a launch of two splits.
pub(super) fn two(mut v: Vec<CudaSlice<bf16>>) -> Result<(CudaSlice<bf16>, CudaSlice<bf16>)> {
    match (v.pop(), v.pop()) {
        (Some(second), Some(first)) => Ok((first, second)),
        _ => candle_core::bail!("ft-split-parts: two buffers expected"),
    }
}

/// The buffer of a launch of one split.
pub(super) fn one(mut v: Vec<CudaSlice<bf16>>) -> Result<CudaSlice<bf16>> {
    v.pop()
        .ok_or_else(|| candle_core::Error::Msg("ft-split-parts: one buffer expected".into()))
}
