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
        let fwd = |c: &mut [f32]| bf16::matmul_f32_bf16(m, n, k, &a, k, 1, &w, 1, k, c, n, false);
        time(
            &format!("{what:<13} {m}x{k} · {k}x{n}"),
            m * n * k,
            fwd,
            &mut c,
        )?;
        // The input gradient reads W as stored: (m × n) · (n × k).
        let g: Vec<f32> = (0..m * n)
            .map(|i| ((i % 83) as f32 - 41.0) / 83.0)
            .collect();
        let mut dx = vec![0f32; m * k];
        let bwd = |c: &mut [f32]| bf16::matmul_f32_bf16(m, k, n, &g, n, 1, &w, k, 1, c, k, false);
        time(
            &format!("  its backward {m}x{n} · {n}x{k}"),
            m * n * k,
            bwd,
            &mut dx,
        )?;
    }
    Ok(())
}

/// Runs `run` once, then enough times for ~10 GFLOP, and prints the time and rate of one.
fn time<E>(
    what: &str,
    mnk: usize,
    run: impl Fn(&mut [f32]) -> Result<(), E>,
    c: &mut [f32],
) -> Result<(), E> {
    run(c)?;
    let reps = (2e10 / (2.0 * mnk as f64)).clamp(2.0, 200.0) as usize;
    let t = Instant::now();
    for _ in 0..reps {
        run(c)?;
    }
    let secs = t.elapsed().as_secs_f64() / reps as f64;
    let gflops = 2.0 * mnk as f64 / secs / 1e9;
    println!("{what}: {:.3} ms, {gflops:.0} GFLOP/s", secs * 1e3);
    Ok(())
}
