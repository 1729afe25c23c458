//! The kernel plan per device, dtype and mode, and the switch that picks the mode.

use super::*;

fn p(device: DeviceKind, dtype: DType, mode: Mode) -> KernelPlan {
    plan(
        device,
        dtype,
        CpuFeatures {
            bf16_dot: true,
            amx: false,
        },
        mode,
    )
}

#[test]
fn auto_picks_each_devices_kernels() {
    let cpu = p(DeviceKind::Cpu, DType::F32, Mode::Auto);
    assert_eq!(
        cpu.to_string(),
        "auto: rms_norm cpu-fused, layer_norm composed, rope cpu-fused, attention cpu-fused, \
         softmax cpu-fused, cross_entropy cpu-fused, swiglu cpu-fused, frozen_linear cpu-fused, \
         lora_linear cpu-fused, loss chunked"
    );
    let mixed = p(DeviceKind::Cpu, DType::BF16, Mode::Auto);
    assert_eq!(mixed.activations, DType::F32);
    assert!(mixed.mixed_bf16());
    assert_eq!(mixed.frozen_linear, Impl::CpuBf16Avx512);
    let amx = plan(
        DeviceKind::Cpu,
        DType::BF16,
        CpuFeatures {
            bf16_dot: true,
            amx: true,
        },
        Mode::Auto,
    );
    assert_eq!(amx.frozen_linear, Impl::CpuBf16Amx);
    assert!(amx.mixed_bf16());
    assert_eq!(
        KernelPlan {
            frozen_linear: Impl::CpuFused,
            activations: DType::F32,
            ..mixed
        },
        cpu
    );
    let portable = plan(
        DeviceKind::Cpu,
        DType::BF16,
        CpuFeatures {
            bf16_dot: false,
            amx: false,
        },
        Mode::Auto,
    );
    assert_eq!(portable.frozen_linear, Impl::CpuBf16Portable);
    let f16 = p(DeviceKind::Cpu, DType::F16, Mode::Auto);
    assert_eq!(
        (f16.rms_norm, f16.attention, f16.softmax, f16.frozen_linear),
        (
            Impl::Composed,
            Impl::Composed,
            Impl::CpuFused,
            Impl::GpuCommon
        )
    );
    let cuda = p(DeviceKind::Cuda, DType::BF16, Mode::Auto);
    assert_eq!(cuda.activations, DType::BF16);
    for i in [
        cuda.rms_norm,
        cuda.rope,
        cuda.attention,
        cuda.softmax,
        cuda.cross_entropy,
        cuda.swiglu,
        cuda.frozen_linear,
        cuda.lora_linear,
    ] {
        assert_eq!(i, Impl::Cuda);
    }
    assert_eq!(cuda.layer_norm, Impl::Composed);
}

/// Metal's graph, and what `composed` runs on every device in every dtype.
#[test]
fn composed_mode_runs_the_metal_graph_everywhere() {
    let metal = p(DeviceKind::Metal, DType::BF16, Mode::Auto);
    assert_eq!(
        metal.to_string(),
        "auto: rms_norm gpu-common, layer_norm composed, rope gpu-common, attention composed, \
         softmax composed, cross_entropy composed, swiglu composed, frozen_linear gpu-common, \
         lora_linear composed, loss chunked"
    );
    assert_eq!(p(DeviceKind::Cuda, DType::F16, Mode::Auto), {
        KernelPlan {
            activations: DType::F16,
            ..metal
        }
    });
    for device in [DeviceKind::Cpu, DeviceKind::Cuda, DeviceKind::Metal] {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let c = p(device, dtype, Mode::Composed);
            assert_eq!(c.activations, dtype, "no mixed precision in composed mode");
            let m = p(DeviceKind::Metal, dtype, Mode::Auto);
            assert_eq!(
                c,
                KernelPlan {
                    mode: Mode::Composed,
                    ..m
                }
            );
        }
    }
    // candle-nn's RMSNorm has no f64 kernel.
    assert_eq!(
        p(DeviceKind::Cpu, DType::F64, Mode::Composed).rms_norm,
        Impl::Composed
    );
}

#[test]
fn the_switch_reads_auto_composed_and_the_old_names() {
    assert_eq!(Mode::parse(None, false), Ok(Mode::Auto));
    assert_eq!(Mode::parse(Some("auto"), true), Ok(Mode::Auto));
    assert_eq!(Mode::parse(Some(" Composed "), false), Ok(Mode::Composed));
    assert_eq!(Mode::parse(None, true), Ok(Mode::Composed));
    let e = Mode::parse(Some("fast"), false).unwrap_err();
    assert!(e.to_string().contains("auto") && e.to_string().contains("composed"));
}

#[test]
fn the_plan_serialises_by_name() {
    let json = serde_json::to_string(&p(DeviceKind::Cpu, DType::F32, Mode::Auto)).unwrap();
    assert!(
        json.starts_with(r#"{"mode":"auto","rms_norm":"cpu-fused","layer_norm":"composed""#),
        "{json}"
    );
}
