//! Time of the CPU LoRA linear op (forward; backward through a sum) on the SmolLM2-135M
//! training shapes (B4×256 = 1024 rows, bf16 frozen weight), at rank 1 and 8, beside the frozen
//! linear alone: what the rank-r products cost (`kernels/cpu/lowrank.rs`; `FINETUNE_NO_AVX512=1`
//! for the `gemm` path). Best of 20.
//!
//!   cargo run --release --example lora_time

use candle_core::{DType, Device, Tensor, Var};
use finetune::model::kernels::cpu::{frozen_linear_plus, lora_linear};
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for (i, o) in [(576usize, 576usize), (576, 192), (576, 1536), (1536, 576)] {
        for r in [1usize, 8] {
            let n = 1024;
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, i), &dev)?)?;
            let w = Tensor::randn(0f32, 0.02, (o, i), &dev)?.to_dtype(DType::BF16)?;
            let a = Var::from_tensor(&Tensor::randn(0f32, 0.02, (r, i), &dev)?)?;
            let b = Var::from_tensor(&Tensor::randn(0f32, 0.02, (o, r), &dev)?)?;
            let mut best = (f64::MAX, f64::MAX, f64::MAX);
            for _ in 0..20 {
                let t0 = Instant::now();
                let y = lora_linear(x.as_tensor(), &w, a.as_tensor(), b.as_tensor(), 2.0)?;
                let t1 = Instant::now();
                let _g = y.sum_all()?.backward()?;
                let t2 = Instant::now();
                let y2 = frozen_linear_plus(x.as_tensor(), &w, None)?;
                let _g2 = y2.sum_all()?.backward()?;
                let t3 = Instant::now();
                best.0 = best.0.min((t1 - t0).as_secs_f64());
                best.1 = best.1.min((t2 - t1).as_secs_f64());
                best.2 = best.2.min((t3 - t2).as_secs_f64());
            }
            println!(
                "{i}->{o} r{r}: lora fwd {:.2} ms bwd {:.2} ms | frozen fwd+bwd {:.2} ms",
                best.0 * 1e3,
                best.1 * 1e3,
                best.2 * 1e3
            );
        }
    }
    Ok(())
}
