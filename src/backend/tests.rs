#![cfg(test)]
//! Tests of `backend`.

use super::*;

/// A machine made up for the test.
struct Fake {
    metal: Result<GpuInfo, Missing>,
    cuda: Result<GpuInfo, Missing>,
    cpu_bf16: bool,
}

impl Probe for Fake {
    fn metal(&self) -> Result<GpuInfo, Missing> {
        self.metal.clone()
    }
    fn cuda(&self) -> Result<GpuInfo, Missing> {
        self.cuda.clone()
    }
    fn cpu(&self) -> CpuInfo {
        CpuInfo {
            cores: 8,
            simd: "NEON".into(),
            bf16: self.cpu_bf16,
            amx: false,
            memory_bytes: Some(16_000_000_000),
        }
    }
}

fn gpu(name: &str, gb: u64) -> Result<GpuInfo, Missing> {
    Ok(GpuInfo {
        count: 1,
        name: name.into(),
        memory_bytes: Some(gb * 1_000_000_000),
        bf16: true,
    })
}

fn auto(probe: &Fake) -> Result<Plan, BackendError> {
    plan(DeviceChoice::Auto, DtypeChoice::Auto, probe)
}

#[test]
fn auto_prefers_metal_then_cuda_then_cpu() -> anyhow::Result<()> {
    let both = Fake {
        metal: gpu("Apple M3 Max", 64),
        cuda: gpu("H100", 80),
        cpu_bf16: false,
    };
    let p = auto(&both)?;
    assert_eq!((p.kind, p.dtype), (BackendKind::Metal, DType::BF16));
    assert_eq!(p.reason, "Metal GPU found");

    let cuda_only = Fake {
        metal: Err(Missing::NotBuilt),
        cuda: gpu("NVIDIA H100 80GB HBM3", 80),
        cpu_bf16: false,
    };
    let p = auto(&cuda_only)?;
    assert_eq!((p.kind, p.dtype), (BackendKind::Cuda, DType::BF16));
    assert_eq!(p.name, "CUDA 0: NVIDIA H100 80GB HBM3 (80 GB)");
    assert_eq!(p.memory_bytes, Some(80_000_000_000));

    let none = Fake {
        metal: Err(Missing::NotBuilt),
        cuda: Err(Missing::NotBuilt),
        cpu_bf16: false,
    };
    let p = auto(&none)?;
    assert_eq!((p.kind, p.dtype), (BackendKind::Cpu, DType::F32));
    assert_eq!(p.name, "CPU (8 cores, NEON)");
    assert_eq!(p.reason, "this build has no GPU backend");
    Ok(())
}

#[test]
fn auto_falls_back_to_cpu_with_each_reason() -> anyhow::Result<()> {
    let broken = Fake {
        metal: Err(Missing::Unavailable("no Metal device".into())),
        cuda: Err(Missing::Unavailable("driver version too old".into())),
        cpu_bf16: false,
    };
    let p = auto(&broken)?;
    assert_eq!(p.kind, BackendKind::Cpu);
    assert_eq!(
        p.reason,
        "no GPU available (Metal unavailable: no Metal device; CUDA unavailable: driver version too old)"
    );
    // A broken Metal is passed over for a working CUDA, and the CPU keeps f32.
    let cuda = Fake {
        metal: Err(Missing::Unavailable("no Metal device".into())),
        cuda: gpu("A100", 40),
        cpu_bf16: false,
    };
    assert_eq!(auto(&cuda)?.kind, BackendKind::Cuda);
    Ok(())
}

#[test]
fn override_wins_and_missing_choices_say_what_to_do() -> anyhow::Result<()> {
    let both = Fake {
        metal: gpu("Apple M2", 24),
        cuda: Err(Missing::NotBuilt),
        cpu_bf16: false,
    };
    let p = plan(DeviceChoice::Cpu, DtypeChoice::Auto, &both)?;
    assert_eq!((p.kind, p.dtype), (BackendKind::Cpu, DType::F32));
    assert_eq!(p.reason, "chosen in settings");

    let e = plan(DeviceChoice::Cuda, DtypeChoice::Auto, &both).unwrap_err();
    assert!(e.to_string().contains("--features cuda"), "{e}");

    let gone = Fake {
        metal: Err(Missing::Unavailable("no Metal device".into())),
        cuda: Err(Missing::NotBuilt),
        cpu_bf16: false,
    };
    let e = plan(DeviceChoice::Metal, DtypeChoice::Auto, &gone).unwrap_err();
    assert!(
        e.to_string().contains("no Metal device") && e.to_string().contains("--device"),
        "{e}"
    );
    Ok(())
}

#[test]
fn dtype_is_automatic_and_overridable() -> anyhow::Result<()> {
    let cuda = Fake {
        metal: Err(Missing::NotBuilt),
        cuda: gpu("H100", 80),
        cpu_bf16: false,
    };
    let p = plan(DeviceChoice::Auto, DtypeChoice::F32, &cuda)?;
    assert_eq!((p.kind, p.dtype), (BackendKind::Cuda, DType::F32));
    assert!(p.reason.ends_with("F32 chosen in settings"), "{}", p.reason);
    let p = plan(DeviceChoice::Cpu, DtypeChoice::Bf16, &cuda)?;
    assert_eq!(p.dtype, DType::BF16);
    let p = plan(DeviceChoice::Cuda, DtypeChoice::Auto, &cuda)?;
    assert_eq!(p.dtype, DType::BF16);
    // A CPU with bf16 dot products gets bf16 weights by default; f32 stays available.
    let avx512 = Fake {
        metal: Err(Missing::NotBuilt),
        cuda: Err(Missing::NotBuilt),
        cpu_bf16: true,
    };
    assert_eq!(auto(&avx512)?.dtype, DType::BF16);
    let p = plan(DeviceChoice::Auto, DtypeChoice::F32, &avx512)?;
    assert_eq!(p.dtype, DType::F32);
    Ok(())
}

#[test]
fn the_real_probe_always_offers_the_cpu() -> anyhow::Result<()> {
    let p = plan(DeviceChoice::Cpu, DtypeChoice::Auto, &SystemProbe)?;
    assert!(p.name.starts_with("CPU ("), "{}", p.name);
    let b = open(p)?;
    assert!(b.device.is_cpu());
    assert_eq!(device_memory_used(&b.device), None);
    Ok(())
}

#[test]
fn a_gpu_without_bf16_kernels_computes_in_f32_and_says_why() {
    let info = GpuInfo {
        count: 1,
        name: "Apple GPU".into(),
        memory_bytes: Some(16_000_000_000),
        bf16: false,
    };
    let p = gpu_plan(BackendKind::Metal, &info, "picked".into());
    assert_eq!(p.dtype, DType::F32);
    assert!(
        p.reason.contains("MACOSX_DEPLOYMENT_TARGET"),
        "{}",
        p.reason
    );
}
