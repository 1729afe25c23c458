#![cfg(test)]
// Tests panic on purpose: unwrap/expect are how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The memory estimate against measured runs and its parts.

use super::*;
use crate::model::kernels::{plan, CpuFeatures, DeviceKind, Mode};
use candle_core::DType;

/// The kernels of a device in `mode`.
fn kernels(device: DeviceKind, mode: Mode) -> KernelPlan {
    plan(device, DType::F32, CpuFeatures::default(), mode)
}

/// The CPU plan of the runs measured before RoPE, SwiGLU and the LoRA projection got their own
/// CPU ops (composed, all three).
fn measured_before_rope_and_swiglu(mode: Mode) -> KernelPlan {
    KernelPlan {
        rope: Impl::Composed,
        swiglu: Impl::Composed,
        lora_linear: Impl::Composed,
        loss_chunks: false,
        ..kernels(DeviceKind::Cpu, mode)
    }
}

#[test]
fn rss_is_known_and_plausible() {
    let rss = process_rss_bytes().unwrap();
    assert!(rss > 1 << 20 && rss < 1 << 40, "{rss}");
    assert!(peak_rss_bytes().unwrap() >= rss / 2);
}

/// Peak bytes held by tensors, measured on an H100 with the defaults: the CUDA kernels, the
/// LoRA op with its products in bf16 parts (the forward's splits kept for the backward), the
/// SwiGLU and down projection as one op, the flash attention, RoPE writing the heads-first
/// layout itself, and the loss in chunks of 64M logits
/// (`bench/results/h100-eighteenth-2026-12-07.log`: `finetune bench --device cuda`, random
/// weights, r16 / r8 on every linear). The whole loss (`FINETUNE_LOSS_CHUNK=0`) and the
/// attention without the flash kernel (`FINETUNE_CUDA_FLASH=0`) in the same run. The estimate is
/// within 3% of each (0.0–1.3%); the query-chunked attention at 4096 tokens in one sequence (no
/// flash kernel) −1.2%, held to 8% there (it measured −4.4% before; the issue's bound is 10%).
#[test]
fn cuda_estimate_matches_the_h100_peaks() {
    let qwen05 = ModelConfig::from_json(
        r#"{"architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "hidden_size": 896,
        "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "tie_word_embeddings": true}"#,
    )
    .unwrap();
    let cuda = plan(
        DeviceKind::Cuda,
        DType::BF16,
        CpuFeatures::default(),
        Mode::Auto,
    );
    // `FINETUNE_CUDA_FLASH=0`: the cuBLAS + softmax attention (chunked at 4096).
    let flash = KernelPlan {
        attention: Impl::CudaFlash,
        ..cuda
    };
    let whole = KernelPlan {
        loss_chunks: false,
        ..flash
    };
    // (config, batch, seq, rank, kernels, measured peak, tolerance)
    for (cfg, batch, seq_len, rank, kernels, measured, tol) in [
        (qwen05.clone(), 4, 512, 16, flash, 3_561_202_392u64, 0.03),
        (qwen05.clone(), 4, 512, 16, cuda, 5_143_896_536, 0.03),
        (qwen05.clone(), 4, 512, 16, whole, 4_535_140_328, 0.03),
        (smollm2_135m(), 8, 512, 8, flash, 3_064_063_232, 0.03),
        (qwen05.clone(), 1, 4096, 16, whole, 7_892_460_032, 0.03),
        (qwen05.clone(), 1, 4096, 16, flash, 5_672_298_712, 0.03),
        (qwen05, 1, 4096, 16, cuda, 6_474_115_088, 0.08),
    ] {
        let e = estimate(
            &cfg,
            &EstimateInput {
                batch,
                seq_len,
                rank,
                weight_bytes: 2,
                activation_bytes: 2,
                checkpointing: false,
                checkpoint_keep_every: 0,
                lora_modules_per_layer: None,
                kernels,
                lora_dropout: false,
                quant_bytes_per_weight: None,
                dora: false,
                device_memory: true,
                checkpoint_bytes: None,
            },
        );
        let ratio = e.total as f64 / measured as f64;
        println!("estimate {} vs measured {measured}: {ratio:.3}", e.total);
        assert!(
            (1.0 - tol..=1.0 + tol).contains(&ratio),
            "{batch}x{seq_len}: {e:?} vs {measured}: {ratio}"
        );
    }
}

fn smollm2_135m() -> ModelConfig {
    ModelConfig::from_json(
        r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "tie_word_embeddings": true}"#,
    )
    .unwrap()
}

fn input(batch: usize, seq_len: usize, checkpointing: bool, weight_bytes: usize) -> EstimateInput {
    EstimateInput {
        batch,
        seq_len,
        rank: 8,
        weight_bytes,
        activation_bytes: 4,
        checkpointing,
        checkpoint_keep_every: 0,
        lora_modules_per_layer: None,
        // The composed attention (measured before the CPU's fused op).
        kernels: measured_before_rope_and_swiglu(Mode::Composed),
        lora_dropout: false,
        quant_bytes_per_weight: None,
        dora: false,
        device_memory: false,
        checkpoint_bytes: None,
    }
}

#[test]
fn qlora_counts_quantized_linears_and_dora_its_magnitudes_and_outputs() {
    let cfg = smollm2_135m();
    let bf16 = estimate(&cfg, &input(2, 128, false, 2));
    let q4k = estimate(
        &cfg,
        &EstimateInput {
            quant_bytes_per_weight: Some(144.0 / 256.0),
            ..input(2, 128, false, 2)
        },
    );
    // 106M linear weights quantized, the embedding (and norms) bf16, one MLP weight in f32.
    let linear: u64 = 30 * (576 * 576 * 2 + 2 * 576 * 192 + 3 * 576 * 1536);
    let embed = 49152 * 576 + 61 * 576;
    let want = embed * 2 + linear * 144 / 256 + 576 * 1536 * 4;
    assert!(
        q4k.base_weights.abs_diff(want) < 1 << 20,
        "{} vs {want}",
        q4k.base_weights
    );
    assert!(q4k.base_weights < bf16.base_weights / 2);
    assert_eq!(q4k.activations, bf16.activations);
    let dora_input = EstimateInput {
        dora: true,
        ..input(2, 128, false, 2)
    };
    let dora = estimate(&cfg, &dora_input);
    // Magnitudes: one per output row of each module (q 576 + k, v 192 + o 576 + 2·1536 + 576).
    let rows: u64 = 30 * (576 + 2 * 192 + 576 + 2 * 1536 + 576);
    assert_eq!(dora.lora_and_optimizer - bf16.lora_and_optimizer, rows * 16);
    assert_eq!(dora.activations - bf16.activations, 2 * 128 * rows * 4);
}

#[test]
fn checkpointing_cuts_activation_memory() {
    let cfg = smollm2_135m();
    let full = estimate(&cfg, &input(4, 256, false, 4));
    let ckpt = estimate(&cfg, &input(4, 256, true, 4));
    assert_eq!(full.base_weights, 134_515_008 * 4);
    assert!(ckpt.activations * 5 < full.activations);
    assert_eq!(
        full.total,
        full.runtime + full.base_weights + full.lora_and_optimizer + full.activations + full.logits
    );
    // Per layer and token: 8H + 11.5Q + 10.5KV + 6I + 7r = 22 520 f32, plus 4·S scores and the
    // stored gradients 2·(Q+KV) per token and S.
    let s = 4 * 9 * 256 * 256u64;
    assert_eq!(
        full.activations,
        30 * (1024 * (22_520 + 1536) * 4 + 5 * s * 4)
    );
    assert_eq!(full.logits, 4 * 255 * 49152 * 4 * 4);
}

#[test]
fn mixed_precision_halves_only_the_weights() {
    let cfg = smollm2_135m();
    let f32 = estimate(&cfg, &input(2, 128, false, 4));
    let mixed = estimate(&cfg, &input(2, 128, false, 2));
    assert_eq!(mixed.base_weights * 2, f32.base_weights);
    assert_eq!(mixed.activations, f32.activations);
    assert_eq!(mixed.logits, f32.logits);
}

/// Peak RSS measured with `finetune bench` (SmolLM2-135M, rank 8, CPU, 2 steps + 1 warmup)
/// with the composed attention the GPUs use (the CPU's before the fused op).
#[test]
fn matches_measured_peaks() {
    let cfg = smollm2_135m();
    // (batch, seq, checkpointing, weight bytes, measured peak in bytes)
    let measured = [
        (1, 16, false, 4, 846_008_320u64), // load peak
        (1, 16, true, 2, 565_137_408),     // load peak, mixed
        (1, 128, false, 4, 1_169_989_632),
        (1, 128, false, 2, 914_288_640),
        (2, 128, false, 4, 1_740_816_384),
        (2, 128, true, 4, 900_272_128),
        (2, 256, false, 4, 3_225_571_328),
        (1, 512, false, 4, 3_949_432_832),
        (4, 256, true, 4, 1_818_329_088),
    ];
    for (b, t, ck, wb, peak) in measured {
        let e = estimate(&cfg, &input(b, t, ck, wb)).total as f64;
        let err = e / peak as f64 - 1.0;
        assert!(
            err.abs() < 0.05,
            "{b}x{t} ckpt={ck} w={wb}: {e} vs {peak} ({err:+.3})"
        );
    }
}

/// Peak RSS of the CPU's default kernels (fused attention, RoPE, SwiGLU, LoRA projection and
/// cross-entropy; bf16 rows in the bf16 mode on AMX tiles), f32 and bf16, with full and partial
/// checkpointing: `bench/memory_grid.sh` on SmolLM2-135M stored in f32 (538 MB of safetensors),
/// Intel Xeon (Sapphire Rapids), `bench/results/cpu-memory-grid-2026-12-06-eleventh.log` (the
/// loss in chunks of rows, `model::loss`; the LM head's input gradient on AMX packing one chunk
/// of the vocabulary at a time). The issue's goal: within ±10% in every mode.
#[test]
fn matches_measured_peaks_with_the_cpu_kernels() {
    let cfg = smollm2_135m();
    let f32_plan = kernels(DeviceKind::Cpu, Mode::Auto);
    let amx = CpuFeatures {
        bf16_dot: true,
        amx: true,
    };
    let bf16_plan = plan(DeviceKind::Cpu, DType::BF16, amx, Mode::Auto);
    assert!(bf16_plan.mixed_bf16() && bf16_plan.frozen_linear == Impl::CpuBf16Amx);
    // (batch, seq, checkpointing, keep every, weight bytes, measured peak in bytes)
    let measured = [
        (1, 128, false, 0, 4, 1_088_032_768u64),
        (2, 256, false, 0, 4, 1_517_101_056),
        (4, 256, false, 0, 4, 2_267_348_992),
        (1, 512, false, 0, 4, 1_528_221_696),
        (4, 256, false, 0, 2, 2_048_933_888),
        (2, 128, false, 0, 2, 895_746_048),
        (4, 256, true, 0, 4, 1_089_126_400),
        (4, 256, true, 0, 2, 834_494_464),
        (4, 256, true, 3, 2, 1_198_297_088),
        (2, 512, true, 3, 2, 1_197_076_480),
        (2, 512, false, 0, 2, 2_060_574_720),
    ];
    for (b, t, ck, keep, wb, peak) in measured {
        let mut i = input(b, t, ck, wb);
        i.kernels = if wb == 2 { bf16_plan } else { f32_plan };
        i.checkpoint_keep_every = keep;
        i.checkpoint_bytes = Some(538_090_408);
        let e = estimate(&cfg, &i).total as f64;
        let err = e / peak as f64 - 1.0;
        assert!(
            err.abs() < 0.10,
            "{b}x{t} ckpt={ck}/{keep} w={wb}: {e} vs {peak} ({err:+.3})"
        );
    }
}

/// Peak bytes held by tensors on an H100 (`bench/qlora_memory.sh`, `bench/results/h100-qlora-*`,
/// `bench/results/h100-thirteenth-2026-12-07.log`): bf16 LoRA and QLoRA (Q4_K) on the Llama 3.2
/// 1B shape at 4×512 and the Llama 3.1 8B shape at 1×512, every linear adapted. On the GPU the
/// memory-mapped checkpoint is host memory, so the 8B load (16 GB of weights) does not double the
/// device's peak. The 1B rows ran with the current defaults; the 8B rows before the loss came in
/// chunks and before the SwiGLU and down projection became one op (estimated with the whole loss
/// and without that op's saving: 32 layers × 512 tokens × 14,336 × 2 bytes).
#[test]
fn cuda_estimate_matches_the_h100_qlora_peaks() {
    let llama = |h: usize, i: usize, layers: usize, dh: usize, tied: bool| {
        ModelConfig::from_json(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": {h},
            "intermediate_size": {i}, "num_hidden_layers": {layers}, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": {dh}, "tie_word_embeddings": {tied}}}"#
        ))
        .unwrap()
    };
    let q4k = Some(144.0 / 256.0);
    let (now, before) = (true, false);
    // (name, shape, batch, quantized, measured peak, ran with the current defaults (at r8, the
    // bench's default) or before them (r16))
    for (name, cfg, batch, quant, measured, current) in [
        (
            "1B bf16",
            llama(2048, 8192, 16, 64, true),
            4,
            None,
            5_569_313_880u64,
            now,
        ),
        (
            "1B Q4_K",
            llama(2048, 8192, 16, 64, true),
            4,
            q4k,
            4_170_545_752,
            now,
        ),
        (
            "8B bf16",
            llama(4096, 14336, 32, 128, false),
            1,
            None,
            21_439_460_860,
            before,
        ),
        (
            "8B Q4_K",
            llama(4096, 14336, 32, 128, false),
            1,
            q4k,
            11_406_750_204,
            before,
        ),
    ] {
        let e = estimate(
            &cfg,
            &EstimateInput {
                batch,
                seq_len: 512,
                rank: if current { 8 } else { 16 },
                weight_bytes: 2,
                activation_bytes: 2,
                checkpointing: false,
                checkpoint_keep_every: 0,
                lora_modules_per_layer: None,
                // The current rows ran the flash attention (head size 64), the 8B rows before it.
                kernels: KernelPlan {
                    loss_chunks: current,
                    attention: if current { Impl::CudaFlash } else { Impl::Cuda },
                    ..plan(
                        DeviceKind::Cuda,
                        DType::BF16,
                        CpuFeatures::default(),
                        Mode::Auto,
                    )
                },
                lora_dropout: false,
                quant_bytes_per_weight: quant,
                dora: false,
                device_memory: true,
                checkpoint_bytes: None,
            },
        );
        // Before the SwiGLU and down projection were one op the graph also kept their product.
        let product = (batch * 512 * cfg.intermediate_size * cfg.num_layers * 2) as u64;
        let total = e.total + if current { 0 } else { product };
        let ratio = total as f64 / measured as f64;
        println!("{name}: estimate {total} vs measured {measured}: {ratio:.3} ({e:?})");
        assert!((0.95..=1.05).contains(&ratio), "{name}: {ratio}");
    }
}
