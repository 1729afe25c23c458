//! AdamW over every LoRA tensor in one launch (`ft_adamw`). Composed from Candle's ops the step
//! concatenates the gradients and the parameters (a copy kernel each) and writes every parameter
//! back (a copy each): about a thousand operations a step for Qwen2.5-0.5B's 336 LoRA tensors,
//! 2.6 ms of device time and more of host time at B4×512 on an H100
//! (`bench/results/h100-fifteenth-2026-12-07-b.log`). Here a table of (parameter, gradient,
//! offset in the moments) goes to the GPU and one kernel updates parameters and moments in place,
//! with the composed step's arithmetic op by op.

use candle_core::cuda::cudarc::driver::{DevicePtr, DeviceRepr};
use candle_core::Storage;

use super::*;

/// Whether [`AdamW`](crate::train::optim::AdamW) steps through [`adamw`] on CUDA (the default);
/// `FINETUNE_CUDA_ADAMW=0` keeps the composed step.
pub fn on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("FINETUNE_CUDA_ADAMW").map_or(true, |v| v != "0"))
}

/// One tensor's row of the kernel's table (`AdamWJob` in kernels.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Job {
    p: u64,
    g: u64,
    off: i64,
    len: i64,
}

// SAFETY: plain old data with kernels.cu's `AdamWJob` layout (two pointers, two 64-bit ints).
unsafe impl DeviceRepr for Job {}

/// The scalars of one step, in f64 as the composed step has them.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    /// Decay rate of the first moment.
    pub beta1: f64,
    /// Decay rate of the second moment.
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
    /// The learning rate of this step.
    pub lr: f64,
    /// Decoupled weight decay (0: none).
    pub weight_decay: f64,
    /// 1 − β₁ᵗ and 1 − β₂ᵗ.
    pub bias_corrections: (f64, f64),
    /// Multiplies the gradients first (clipping); 1 for none.
    pub grad_scale: f64,
}

/// Each guarded tensor's f32 data on the device: its first element's address and its length, and
/// what keeps the stream ordered while the addresses are in use.
#[allow(clippy::type_complexity)]
fn addresses<'a, G: std::ops::Deref<Target = Storage>>(
    guards: &'a [(G, &Layout)],
    stream: &'a std::sync::Arc<candle_core::cuda::cudarc::driver::CudaStream>,
    op: &str,
) -> Result<(
    Vec<(u64, usize)>,
    Vec<candle_core::cuda::cudarc::driver::SyncOnDrop<'a>>,
)> {
    let mut ptrs = Vec::with_capacity(guards.len());
    let mut keep = Vec::with_capacity(guards.len());
    for (s, l) in guards {
        let (Storage::Cuda(c), Some((a, b))) = (&**s, l.contiguous_offsets()) else {
            candle_core::bail!("{op}: a tensor is not contiguous on the GPU");
        };
        let (ptr, sync) = c.as_cuda_slice::<f32>()?.device_ptr(stream);
        ptrs.push((ptr + (a * std::mem::size_of::<f32>()) as u64, b - a));
        keep.push(sync);
    }
    Ok((ptrs, keep))
}

/// Elements a block of `ft_adamw` updates: a tensor is cut into pieces of this many, so that the
/// launch spreads over every SM (a block per tensor left the largest tensors to a few SMs: 0.35
/// ms for Qwen2.5-0.5B's 8.8M LoRA parameters on an H100).
const PIECE: usize = 8192;

/// Updates each `(parameter, gradient, offset)` in place, with its moments at `offset` of the
/// flat `m` and `v` (all f32, contiguous, on one GPU; `m` and `v` distinct buffers): the
/// composed step of `train::optim::AdamW` in one launch.
pub fn adamw(
    items: &[(&Tensor, &Tensor, usize)],
    m: &Tensor,
    v: &Tensor,
    s: AdamWStep,
) -> Result<()> {
    let op = "ft-adamw";
    if items.is_empty() {
        return Ok(());
    }
    let candle_core::Device::Cuda(dev) = m.device() else {
        candle_core::bail!("{op}: the moments are not on the GPU");
    };
    let guards: Vec<_> = [m, v]
        .into_iter()
        .chain(items.iter().flat_map(|(p, g, _)| [*p, *g]))
        .map(|t| t.storage_and_layout())
        .collect();
    let stream = dev.cuda_stream();
    let (ptrs, keep) = addresses(&guards, &stream, op)?;
    let total = ptrs[0].1;
    if ptrs[1].1 != total || ptrs[0].0 == ptrs[1].0 {
        candle_core::bail!("{op}: the moments must be two buffers of one length");
    }
    // A block per piece of at most PIECE elements of a tensor (each piece is a job of its own).
    let mut jobs = Vec::with_capacity(items.len());
    for (&(_, _, off), pg) in items.iter().zip(ptrs[2..].chunks_exact(2)) {
        let ((p, len), (g, glen)) = (pg[0], pg[1]);
        if glen != len || off + len > total {
            candle_core::bail!("{op}: a gradient or offset does not fit its parameter");
        }
        for start in (0..len).step_by(PIECE) {
            let bytes = (start * std::mem::size_of::<f32>()) as u64;
            jobs.push(Job {
                p: p + bytes,
                g: g + bytes,
                off: (off + start) as i64,
                len: PIECE.min(len - start) as i64,
            });
        }
    }
    let table = dev.clone_htod(&jobs)?;
    let f32_of = |x: f64| x as f32;
    let (bc1, bc2) = s.bias_corrections;
    let flags = i32::from(s.grad_scale != 1.0) | (i32::from(s.weight_decay > 0.0) << 1);
    let scalars = [
        f32_of(s.beta1),
        f32_of(1.0 - s.beta1),
        f32_of(s.beta2),
        f32_of(1.0 - s.beta2),
        f32_of(1.0 / bc1),
        f32_of(1.0 / bc2),
        f32_of(s.eps),
        f32_of(s.lr),
        f32_of(1.0 - s.lr * s.weight_decay),
        f32_of(s.grad_scale),
    ];
    let f = dev.get_or_load_custom_func("ft_adamw", MODULE, ptx()?)?;
    let (mp, vp) = (ptrs[0].0, ptrs[1].0);
    let mut bl = f.builder();
    bl.arg(&table).arg(&mp).arg(&vp);
    for x in &scalars {
        bl.arg(x);
    }
    bl.arg(&flags);
    let cfg = rows_cfg(jobs.len(), 256);
    // SAFETY: `ft_adamw`'s arguments in its order and types (the table, m and v as device
    // pointers, ten floats, the flags); every job's parameter and gradient hold `len` f32 and its
    // moments `off..off + len` lie inside m and v (checked above); m and v are distinct, and the
    // read guards keep every buffer alive until the launch is queued on the device's stream.
    unsafe { bl.launch(cfg) }.w()?;
    drop(keep);
    Ok(())
}
