//! Speed of the CPU's mixed-precision product (f32 activations × bf16 weights, f32 out) on the
//! SmolLM2-135M training shapes (B4×256 = 1024 rows): GFLOP/s of the kernel this CPU runs
//! (`FINETUNE_NO_AMX=1` for the AVX512-BF16 one). `bench/matmul_compare.sh` runs it beside
//! torch's bf16 matmul (oneDNN) on the same shapes.
//!
//!   cargo run --release --example bf16_matmul

use std::time::Instant;

use finetune::model::bf16;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("kernel: {}", bf16::kernel_name());
    // (rows, k, n) with B stored as the forward reads W (n, k) row-major: x · Wᵀ.
    for (m, k, n, what) in [
        (1024, 576, 576, "q/o proj"),
        (1024, 576, 192, "k/v proj"),
        (1024, 576, 1536, "gate/up proj"),
        (1024, 1536, 576, "down proj"),
        (1024, 576, 49152, "LM head"),
    ] {
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i % 97) as f32 - 48.0) / 97.0)
            .collect();
        let w: Vec<half::bf16> = (0..n * k)
            .map(|i| half::bf16::from_f32(((i % 89) as f32 - 44.0) / 890.0))
            .collect();
        let mut c = vec![0f32; m * n];
        let run = |c: &mut [f32]| bf16::matmul_f32_bf16(m, n, k, &a, k, 1, &w, 1, k, c, n, false);
        run(&mut c)?;
        let reps = (2e10 / (2.0 * (m * n * k) as f64)).clamp(2.0, 200.0) as usize;
        let t = Instant::now();
        for _ in 0..reps {
            run(&mut c)?;
        }
        let secs = t.elapsed().as_secs_f64() / reps as f64;
        let gflops = 2.0 * (m * n * k) as f64 / secs / 1e9;
        println!(
            "{what:<13} {m}x{k} · {k}x{n}: {:.3} ms, {gflops:.0} GFLOP/s",
            secs * 1e3
        );
    }
    Ok(())
}
