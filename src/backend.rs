//! Compute backend choice: Metal (macOS, feature `metal`) → CUDA (feature `cuda`) → CPU, or a user
//! override, with the reason in words for the status bar and the CLI, and the compute dtype that
//! suits it (bf16 frozen base weights on GPUs; on the CPU bf16 where the kernel plan multiplies
//! bf16 weights in hardware, else f32; LoRA and optimizer state always f32). Which kernels then
//! run is `model::kernels`' decision ([`Plan::kernels`]).
//!
//! The decision ([`plan`]) is separate from the hardware: it reads what a [`Probe`] reports, so
//! tests drive it with a fake probe; [`pick_with`] asks the real one ([`SystemProbe`]) and opens
//! the device.

use candle_core::{DType, Device};

use crate::model::kernels::{self, CpuFeatures, DeviceKind, Impl, KernelPlan, Mode};
use crate::train::{DeviceChoice, DtypeChoice};

/// Which kind of device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// An Apple GPU through Metal (macOS, feature `metal`).
    Metal,
    /// An NVIDIA GPU through CUDA (feature `cuda`).
    Cuda,
    /// The CPU, always available.
    Cpu,
}

impl BackendKind {
    fn label(self) -> &'static str {
        match self {
            Self::Metal => "Metal",
            Self::Cuda => "CUDA",
            Self::Cpu => "CPU",
        }
    }

    fn feature(self) -> &'static str {
        match self {
            Self::Metal => "metal",
            Self::Cuda => "cuda",
            Self::Cpu => "",
        }
    }
}

impl From<BackendKind> for DeviceKind {
    fn from(kind: BackendKind) -> Self {
        match kind {
            BackendKind::Metal => Self::Metal,
            BackendKind::Cuda => Self::Cuda,
            BackendKind::Cpu => Self::Cpu,
        }
    }
}

/// A GPU as the probe found it.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuInfo {
    /// How many devices of this kind (device 0 is used).
    pub count: usize,
    /// The device's name as the driver reports it, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Total device memory (Metal: the recommended working set), when known.
    pub memory_bytes: Option<u64>,
    /// Whether the device runs bf16 kernels (Metal: they exist only in a binary built for macOS
    /// 14 or later, see docs/metal.md; probed). Without, the GPU computes in f32.
    pub bf16: bool,
}

/// The CPU as the probe found it.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuInfo {
    /// Cores this process may use (`available_parallelism`: logical, within its affinity).
    pub cores: usize,
    /// The widest vector extension the engine's kernels can use, e.g. "AVX-512 + BF16", "NEON".
    pub simd: String,
    /// Hardware bf16 dot products (AVX512-BF16): where the kernel plan then multiplies bf16
    /// weights by f32 activations in hardware, frozen weights default to bf16.
    pub bf16: bool,
    /// AMX-BF16 tiles usable by this process (Intel Sapphire Rapids and later): the bf16
    /// products run on them.
    pub amx: bool,
    /// Total RAM, when known.
    pub memory_bytes: Option<u64>,
}

/// Why a GPU kind is not usable.
#[derive(Debug, Clone, PartialEq)]
pub enum Missing {
    /// This build was compiled without the feature.
    NotBuilt,
    /// Built in, but the device could not be opened.
    Unavailable(String),
}

/// What the machine offers. The real one is [`SystemProbe`]; tests pass fakes.
pub trait Probe {
    /// The Metal GPU, or why there is none usable.
    fn metal(&self) -> Result<GpuInfo, Missing>;
    /// The CUDA GPU, or why there is none usable.
    fn cuda(&self) -> Result<GpuInfo, Missing>;
    /// The CPU (always there).
    fn cpu(&self) -> CpuInfo;
}

/// The decision: which device, in which dtype, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Which kind of device.
    pub kind: BackendKind,
    /// Dtype of the frozen base weights and activations.
    pub dtype: DType,
    /// E.g. "CPU (2 cores, AVX-512 + BF16)" or "CUDA 0: NVIDIA H100 80GB HBM3 (80 GB)".
    pub name: String,
    /// Why this device was picked.
    pub reason: String,
    /// Memory the device has, when known (RAM for the CPU).
    pub memory_bytes: Option<u64>,
}

impl Plan {
    /// Which kernels run for this device and dtype on this machine, in this process's mode.
    pub fn kernels(&self) -> KernelPlan {
        kernels::plan(
            self.kind.into(),
            self.dtype,
            CpuFeatures::detect(),
            Mode::current(),
        )
    }
}

/// The chosen, opened device and why.
#[derive(Debug, Clone)]
pub struct Backend {
    /// The opened device (device 0 of its kind).
    pub device: Device,
    /// Dtype of the frozen base weights and activations.
    pub dtype: DType,
    /// E.g. "CPU (2 cores, AVX-512 + BF16)" or "CUDA 0: NVIDIA H100 80GB HBM3 (80 GB)".
    pub name: String,
    /// Why this one was picked.
    pub reason: String,
    /// Memory the device has, when known (RAM for the CPU).
    pub memory_bytes: Option<u64>,
}

/// Errors choosing a device.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A GPU kind was chosen explicitly but this build lacks its feature; holds the kind's name
    /// ("CUDA") and the Cargo feature that adds it ("cuda").
    #[error("{0} was requested but this build has no {0} support; rebuild with `--features {1}` or choose CPU")]
    NotBuilt(&'static str, &'static str),
    /// A GPU kind was chosen explicitly and is built in, but the probe found no usable device.
    #[error(
        "{name} is not available ({reason}); choose another device in Settings or with --device"
    )]
    Unavailable {
        /// The kind's name, e.g. "CUDA".
        name: &'static str,
        /// The probe's reason, e.g. the driver's error.
        reason: String,
    },
    /// Opening the planned device failed (the probe saw it, Candle could not open it).
    #[error("opening {name} failed: {reason}")]
    Open {
        /// The kind's name, e.g. "CUDA".
        name: &'static str,
        /// Candle's error.
        reason: String,
    },
}

fn gb(bytes: u64) -> String {
    format!("{:.0} GB", bytes as f64 / 1e9)
}

fn gpu_name(kind: BackendKind, info: &GpuInfo) -> String {
    let mut name = format!("{} 0: {}", kind.label(), info.name);
    if let Some(m) = info.memory_bytes {
        name.push_str(&format!(" ({})", gb(m)));
    }
    if info.count > 1 {
        name.push_str(&format!(", 1 of {}", info.count));
    }
    name
}

fn cpu_plan(cpu: &CpuInfo, reason: String) -> Plan {
    // bf16 where its frozen matrices are multiplied in hardware (AVX512-BF16, `auto` kernels).
    let features = CpuFeatures {
        bf16_dot: cpu.bf16,
        amx: cpu.amx,
    };
    let bf16 = kernels::plan(DeviceKind::Cpu, DType::BF16, features, Mode::current());
    Plan {
        kind: BackendKind::Cpu,
        dtype: if matches!(bf16.frozen_linear, Impl::CpuBf16Amx | Impl::CpuBf16Avx512) {
            DType::BF16
        } else {
            DType::F32
        },
        name: format!("CPU ({} cores, {})", cpu.cores, cpu.simd),
        reason,
        memory_bytes: cpu.memory_bytes,
    }
}

fn gpu_plan(kind: BackendKind, info: &GpuInfo, reason: String) -> Plan {
    let (dtype, reason) = if info.bf16 {
        (DType::BF16, reason)
    } else {
        (
            DType::F32,
            format!("{reason}; f32, as this build has no bf16 kernels for it (rebuild with MACOSX_DEPLOYMENT_TARGET=15.0)"),
        )
    };
    Plan {
        kind,
        dtype,
        name: gpu_name(kind, info),
        reason,
        memory_bytes: info.memory_bytes,
    }
}

/// Decides the device for `choice` and the dtype for `dtype` from what `probe` reports: `Auto`
/// tries Metal, then CUDA, then falls back to the CPU with the reason each GPU was passed over; an
/// explicit choice that is missing is an error naming what to do. The dtype is bf16 on GPUs and
/// f32 on the CPU unless `dtype` overrides it.
pub fn plan(
    choice: DeviceChoice,
    dtype: DtypeChoice,
    probe: &dyn Probe,
) -> Result<Plan, BackendError> {
    let gpu = |kind: BackendKind| match kind {
        BackendKind::Metal => probe.metal(),
        BackendKind::Cuda => probe.cuda(),
        BackendKind::Cpu => Err(Missing::NotBuilt),
    };
    let mut plan = match choice {
        DeviceChoice::Cpu => cpu_plan(&probe.cpu(), "chosen in settings".into()),
        DeviceChoice::Metal | DeviceChoice::Cuda => {
            let kind = if choice == DeviceChoice::Metal {
                BackendKind::Metal
            } else {
                BackendKind::Cuda
            };
            match gpu(kind) {
                Ok(info) => gpu_plan(kind, &info, "chosen in settings".into()),
                Err(Missing::NotBuilt) => {
                    return Err(BackendError::NotBuilt(kind.label(), kind.feature()))
                }
                Err(Missing::Unavailable(reason)) => {
                    return Err(BackendError::Unavailable {
                        name: kind.label(),
                        reason,
                    })
                }
            }
        }
        DeviceChoice::Auto => {
            let mut passed = Vec::new();
            let mut found = None;
            for kind in [BackendKind::Metal, BackendKind::Cuda] {
                match gpu(kind) {
                    Ok(info) => {
                        found = Some(gpu_plan(kind, &info, format!("{} GPU found", kind.label())));
                        break;
                    }
                    Err(Missing::NotBuilt) => {}
                    Err(Missing::Unavailable(r)) => {
                        passed.push(format!("{} unavailable: {r}", kind.label()))
                    }
                }
            }
            match found {
                Some(p) => p,
                None => {
                    let reason = if passed.is_empty() {
                        "this build has no GPU backend".to_string()
                    } else {
                        format!("no GPU available ({})", passed.join("; "))
                    };
                    cpu_plan(&probe.cpu(), reason)
                }
            }
        }
    };
    let auto = plan.dtype;
    plan.dtype = match dtype {
        DtypeChoice::Auto => auto,
        DtypeChoice::F32 => DType::F32,
        DtypeChoice::Bf16 => DType::BF16,
        DtypeChoice::F16 => DType::F16,
    };
    if plan.dtype != auto {
        plan.reason
            .push_str(&format!("; {:?} chosen in settings", plan.dtype));
    }
    Ok(plan)
}

/// The machine itself: compiled-in GPU backends are opened to be probed.
pub struct SystemProbe;

impl Probe for SystemProbe {
    fn metal(&self) -> Result<GpuInfo, Missing> {
        metal_info()
    }

    fn cuda(&self) -> Result<GpuInfo, Missing> {
        cuda_info()
    }

    fn cpu(&self) -> CpuInfo {
        CpuInfo {
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            simd: simd_level().to_string(),
            bf16: CpuFeatures::detect().bf16_dot,
            amx: CpuFeatures::detect().amx,
            memory_bytes: crate::memory::total_memory_bytes(),
        }
    }
}

/// The widest SIMD level of this CPU that matters to the kernels.
pub fn simd_level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            if crate::model::bf16::has_amx() {
                return "AMX-BF16 + AVX-512";
            }
            if std::arch::is_x86_feature_detected!("avx512bf16") {
                return "AVX-512 + BF16";
            }
            return "AVX-512";
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return "AVX2";
        }
        "SSE"
    }
    #[cfg(target_arch = "aarch64")]
    {
        "NEON"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "scalar"
    }
}

#[cfg(metal_gpu)]
fn metal_info() -> Result<GpuInfo, Missing> {
    let dev = Device::new_metal(0).map_err(|e| Missing::Unavailable(e.to_string()))?;
    // Apple GPUs share the machine's unified memory, but Metal lets one process keep only its
    // recommended working set resident (about 2/3 to 3/4 of RAM): that is what must fit.
    let working_set = match &dev {
        Device::Metal(m) => m.device().recommended_max_working_set_size() as u64,
        _ => 0,
    };
    // Candle compiles its Metal shaders at run time, and what compiles depends on the macOS this
    // binary was built for (docs/metal.md, gaps 1 and 2): a one-row product in f32 (the gemv
    // kernels every decode step uses) must work, and bf16 is used only where it does.
    if !metal_works(&dev, DType::F32) {
        return Err(Missing::Unavailable(
            "Metal's kernels do not run in this build (one-row f32 product failed); rebuild with MACOSX_DEPLOYMENT_TARGET=15.0".into(),
        ));
    }
    Ok(GpuInfo {
        count: 1,
        name: "Apple GPU".into(),
        memory_bytes: if working_set > 0 {
            Some(working_set)
        } else {
            crate::memory::total_memory_bytes()
        },
        bf16: metal_works(&dev, DType::BF16),
    })
}

/// Whether a cast to `dtype`, a one-row product and a cast back give the right number on `dev`.
#[cfg(metal_gpu)]
fn metal_works(dev: &Device, dtype: DType) -> bool {
    let run = || -> candle_core::Result<f32> {
        let a = candle_core::Tensor::ones((1, 8), DType::F32, dev)?.to_dtype(dtype)?;
        let b = candle_core::Tensor::ones((8, 4), DType::F32, dev)?.to_dtype(dtype)?;
        a.matmul(&b)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()
    };
    matches!(run(), Ok(v) if v == 32.0)
}

#[cfg(not(metal_gpu))]
fn metal_info() -> Result<GpuInfo, Missing> {
    Err(Missing::NotBuilt)
}

#[cfg(feature = "cuda")]
fn cuda_info() -> Result<GpuInfo, Missing> {
    use candle_core::cuda::cudarc::driver::CudaContext;
    let unavailable = |e: &dyn std::fmt::Display| Missing::Unavailable(e.to_string());
    let count = CudaContext::device_count().map_err(|e| unavailable(&e))?;
    if count < 1 {
        return Err(Missing::Unavailable("no CUDA device found".into()));
    }
    let ctx = CudaContext::new(0).map_err(|e| unavailable(&e))?;
    Ok(GpuInfo {
        count: count as usize,
        name: ctx.name().map_err(|e| unavailable(&e))?,
        memory_bytes: ctx.total_mem().ok().map(|m| m as u64),
        bf16: true,
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_info() -> Result<GpuInfo, Missing> {
    Err(Missing::NotBuilt)
}

/// Stops the driver's stream-ordered pool from handing its free memory back to the system at
/// every synchronisation (its default release threshold is 0): otherwise every step, which
/// synchronises to read the loss, maps its activations afresh. PyTorch's caching allocator keeps
/// its memory the same way. Opt out with `FINETUNE_CUDA_POOL_TRIM=1` (for comparison).
#[cfg(feature = "cuda")]
fn keep_pool_memory(d: &candle_core::CudaDevice) {
    use candle_core::cuda::cudarc::driver::{result, sys};
    if std::env::var_os("FINETUNE_CUDA_POOL_TRIM").is_some_and(|v| v == "1") {
        return;
    }
    let dev = d.cuda_stream().context().cu_device();
    let mut keep = u64::MAX;
    // SAFETY: `dev` is the device of a live context; the release threshold attribute takes a
    // pointer to a u64, which `keep` is.
    let done = unsafe {
        result::device::get_default_mem_pool(dev).and_then(|pool| {
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut keep as *mut u64).cast(),
            )
        })
    };
    if let Err(e) = done {
        eprintln!("warning: could not keep the CUDA memory pool's free memory: {e}");
    }
}

/// Opens the device a plan names.
pub fn open(plan: Plan) -> Result<Backend, BackendError> {
    let device = match plan.kind {
        BackendKind::Cpu => Ok(Device::Cpu),
        BackendKind::Metal => Device::new_metal(0),
        BackendKind::Cuda => Device::new_cuda(0),
    }
    .map_err(|e| BackendError::Open {
        name: plan.kind.label(),
        reason: e.to_string(),
    })?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        // Candle runs every op of a device on its one stream, but because it created that
        // stream itself cudarc counts the context as multi-stream and records a CUDA event on
        // every read and write of every buffer: host work per op that dominated small ops.
        // SAFETY: the tensors of this device are only ever used on Candle's single stream, so
        // stream order already serialises their uses, writes and frees; nothing here uses
        // another stream. It is set before any tensor of the device exists.
        unsafe { d.disable_event_tracking() };
        keep_pool_memory(d);
        // The backward's gradient sums through FineTune's add (16 bytes a thread; Candle's
        // add for anything else); a second device opened in the process finds it set.
        candle_core::backprop::set_grad_add(crate::model::kernels::cuda::add_untracked);
    }
    Ok(Backend {
        device,
        dtype: plan.dtype,
        name: plan.name,
        reason: plan.reason,
        memory_bytes: plan.memory_bytes,
    })
}

/// Picks and opens the device for `choice` and `dtype`.
pub fn pick_with(choice: DeviceChoice, dtype: DtypeChoice) -> Result<Backend, BackendError> {
    open(plan(choice, dtype, &SystemProbe)?)
}

/// Runs Candle's own element-wise CPU ops on the calling thread (`CANDLE_NUM_THREADS=1` unless
/// the user set it). Candle parallelises them on a pool of its own whose threads spin-wait for
/// work, beside the rayon pool that runs the matrix products: two pools on the same cores. With
/// both, `perf` put 20% (idle machine) to 45% (a busy one) of the CPU time in Candle's barrier
/// spin, and `finetune bench` on SmolLM2-135M ran 2.5–3× slower on a busy 2-core machine than
/// with Candle's pool off (BENCHMARKS.md). The heavy ops (matmuls, the fused kernels) still use
/// every core through rayon. Call first thing in `main`, before any thread starts.
pub fn tune_cpu_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Device memory in use now (CUDA: used of total on device 0; Metal: what this process's
/// buffers hold, `currentAllocatedSize`), when the backend tells. The CPU reports none here: its
/// figure is the process RSS.
pub fn device_memory_used(device: &Device) -> Option<u64> {
    match device {
        #[cfg(metal_gpu)]
        Device::Metal(m) => Some(m.device().current_allocated_size() as u64),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
            Some(total.saturating_sub(free) as u64)
        }
        _ => None,
    }
}

/// The most memory Candle's tensors held at once since the device was opened (CUDA: the
/// high-water mark of the stream-ordered pool's used bytes, which excludes its cached free
/// memory, like PyTorch's `max_memory_allocated`). `None` where the backend does not tell.
pub fn device_peak_allocated(device: &Device) -> Option<u64> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            use candle_core::cuda::cudarc::driver::{result, sys};
            let dev = d.cuda_stream().context().cu_device();
            let mut high = 0u64;
            // SAFETY: `dev` is the device of a live context; the attribute writes one u64.
            unsafe {
                let pool = result::device::get_default_mem_pool(dev).ok()?;
                result::mem_pool::get_attribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    (&mut high as *mut u64).cast(),
                )
                .ok()?;
            }
            Some(high)
        }
        _ => {
            let _ = device;
            None
        }
    }
}

#[cfg(test)]
mod tests;
