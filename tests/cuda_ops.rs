//! FineTune's CUDA kernels (`model::kernels::cuda`) against Candle's composed ops in float64 on the CPU:
//! values and every input gradient, in f32 and bf16, on shapes that exercise the row loops (long rows, GQA, per-batch masks and RoPE
//! tables, a 151,936-entry vocabulary). Built only with `--features cuda`; run on a machine with
//! a GPU: `cargo test --release --features cuda --test cuda_ops`.
#![cfg(feature = "cuda")]
// Tests panic on purpose: unwrap/expect are how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::{DType, Device, Result, Tensor, Var};
use finetune::model::{kernels, loss, ops};

/// ‖a − b‖ / ‖b‖, in f64 on the CPU.
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let f64_cpu = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    let (a, b) = (f64_cpu(a), f64_cpu(b));
    let num = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap();
    let den = b.sqr().unwrap().sum_all().unwrap();
    (num.to_scalar::<f64>().unwrap() / den.to_scalar::<f64>().unwrap().max(1e-300)).sqrt() as f32
}

/// Runs `f` on the CPU in f64 (the composed ops) and on CUDA in `dtype` over the same `inputs`
/// (all differentiable) and `consts`, with the same upstream gradient; returns the worst relative error of the value
/// and of each input gradient.
fn compare(
    what: &str,
    inputs: &[Tensor],
    consts: &[Tensor],
    dtype: DType,
    f: impl Fn(&[Tensor], &[Tensor]) -> Result<Tensor>,
) -> f32 {
    let gpu = Device::new_cuda(0).unwrap();
    let run = |dev: &Device, dt: DType| {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_device(dev).unwrap().to_dtype(dt).unwrap()).unwrap())
            .collect();
        let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let cs: Vec<Tensor> = consts
            .iter()
            .map(|t| {
                let t = t.to_device(dev).unwrap();
                if t.dtype().is_float() {
                    t.to_dtype(dt).unwrap()
                } else {
                    t
                }
            })
            .collect();
        let y = f(&xs, &cs).unwrap();
        // A varying, non-zero upstream gradient (also for a scalar output), the same on both
        // devices: made on the CPU.
        let up = Tensor::arange(0f32, y.elem_count() as f32, &Device::Cpu)
            .unwrap()
            .reshape(y.shape())
            .unwrap()
            .affine(0.37, 0.5)
            .unwrap()
            .sin()
            .unwrap()
            .to_device(dev)
            .unwrap();
        let loss = (y.to_dtype(DType::F32).unwrap() * up)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let gs: Vec<Tensor> = vars.iter().map(|v| grads.get(v).unwrap().clone()).collect();
        (y, gs)
    };
    let (y_ref, g_ref) = run(&Device::Cpu, DType::F64);
    let (y, g) = run(&gpu, dtype);
    let mut worst = rel(&y, &y_ref);
    print!("{what:<40} {dtype:?}: value {worst:.1e}");
    for (i, (a, b)) in g.iter().zip(&g_ref).enumerate() {
        let e = rel(a, b);
        print!(", grad {i} {e:.1e}");
        worst = worst.max(e);
    }
    println!();
    worst
}

/// Standard normal inputs from a seeded generator (Box–Muller), so runs repeat exactly.
fn randn(shape: &[usize], seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

const TOL_F32: f32 = 2e-5;
/// bf16 keeps 8 bits of mantissa: one rounding is 2⁻⁹ ≈ 2e-3 relative; ops chain a few.
const TOL_BF16: f32 = 2e-2;

fn tol(dtype: DType) -> f32 {
    if dtype == DType::F32 {
        TOL_F32
    } else {
        TOL_BF16
    }
}

#[test]
fn rms_norm_matches_the_cpu() {
    for dtype in [DType::F32, DType::BF16] {
        for (shape, seed) in [(vec![4, 37, 896], 1), (vec![3, 5000], 2)] {
            let w = (randn(&[*shape.last().unwrap()], seed + 10).affine(0.1, 1.0)).unwrap();
            let e = compare(
                &format!("rms_norm {shape:?}"),
                &[randn(&shape, seed)],
                &[w],
                dtype,
                |x, c| kernels::rms_norm(&x[0], &c[0], 1e-6),
            );
            assert!(e <= tol(dtype), "rms_norm {shape:?} {dtype:?}: {e}");
        }
    }
}

/// (B or 1, 1, T, D) cos/sin tables for `positions` (B·T entries, or T for one shared row).
fn rope_tables(positions: &[u32], rows: usize, t: usize, d: usize) -> (Tensor, Tensor) {
    let (c, s) = ops::rope_tables(
        d,
        10000.0,
        &finetune::model::config::RopeScaling::Default,
        4096,
        &Device::Cpu,
    )
    .unwrap();
    let idx = Tensor::from_vec(positions.to_vec(), positions.len(), &Device::Cpu).unwrap();
    let pick = |x: &Tensor| {
        x.index_select(&idx, 0)
            .unwrap()
            .reshape((rows, 1, t, d))
            .unwrap()
    };
    (pick(&c), pick(&s))
}

#[test]
fn rope_matches_the_cpu() {
    for dtype in [DType::F32, DType::BF16] {
        let (b, h, t, d) = (2, 3, 17, 64);
        let shared: Vec<u32> = (0..t as u32).collect();
        let per_batch: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 7) % 300).collect();
        for (what, pos, rows) in [
            ("shared positions", shared, 1),
            ("per-row positions", per_batch, b),
        ] {
            let (cos, sin) = rope_tables(&pos, rows, t, d);
            let e = compare(
                &format!("rope {what}"),
                &[randn(&[b, h, t, d], 3)],
                &[cos, sin],
                dtype,
                |x, c| kernels::rope(&x[0], &c[0], &c[1]),
            );
            assert!(e <= tol(dtype), "rope {what} {dtype:?}: {e}");
        }
    }
}

/// RoPE's 16-byte path (aligned rows) and its pair-at-a-time path (the same rows one element into
/// their storage, so no 16-byte access is aligned) give the same bits, in both dtypes.
#[test]
fn rope_by_units_equals_rope_by_pairs() {
    let gpu = Device::new_cuda(0).unwrap();
    for dtype in [DType::BF16, DType::F32] {
        let (b, h, t, d) = (2, 3, 17, 64);
        let pos: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 7) % 300).collect();
        let (cos, sin) = rope_tables(&pos, b, t, d);
        let on = |x: &Tensor| x.to_device(&gpu).unwrap().to_dtype(dtype).unwrap();
        let (cos, sin) = (on(&cos), on(&sin));
        let n = b * h * t * d;
        let flat = on(&randn(&[n + 1], 50));
        let shifted = flat.narrow(0, 1, n).unwrap().reshape((b, h, t, d)).unwrap();
        let aligned = shifted.copy().unwrap();
        let by_pairs = kernels::rope(&shifted, &cos, &sin).unwrap();
        let by_units = kernels::rope(&aligned, &cos, &sin).unwrap();
        assert_eq!(bits(&by_pairs), bits(&by_units), "{dtype:?}");
    }
}

#[test]
fn attention_matches_the_cpu() {
    for dtype in [DType::F32, DType::BF16] {
        // (B, H, KV, T, D, packed segments)
        for (b, h, kv, t, d, packed) in [
            (2, 4, 2, 50, 32, false),
            (2, 4, 1, 40, 64, true),
            (1, 2, 1, 1500, 64, false),
            // Past `chunked::CHUNK_ABOVE` score elements: the query-chunked path.
            (2, 2, 1, 4200, 32, true),
            (1, 2, 1, 6000, 64, false),
        ] {
            let bias = if packed {
                let seg: Vec<u32> = (0..b * t)
                    .map(|i| {
                        if i % t < t / 3 {
                            1
                        } else if i % t < t - 5 {
                            2
                        } else {
                            0
                        }
                    })
                    .collect();
                ops::attention_bias(b, t, Some(&seg), DType::F32, &Device::Cpu).unwrap()
            } else {
                ops::attention_bias(b, t, None, DType::F32, &Device::Cpu).unwrap()
            };
            let inputs = [
                randn(&[b, h, t, d], 4),
                randn(&[b, kv, t, d], 5),
                randn(&[b, kv, t, d], 6),
            ];
            let scale = 1.0 / (d as f64).sqrt();
            let what = format!(
                "attention B{b} H{h} KV{kv} T{t} D{d}{}",
                if packed { " packed" } else { "" }
            );
            let e = compare(&what, &inputs, &[bias], dtype, |x, c| {
                kernels::attention(&x[0], &x[1], &x[2], &c[0], scale)
            });
            assert!(e <= tol(dtype), "{what} {dtype:?}: {e}");
        }
    }
}

/// The query-chunked attention with the CUDA softmax kernels, chunks small enough that a short
/// sequence has several (one of them shorter), against the f64 composed graph.
#[test]
fn chunked_attention_matches_the_cpu() {
    use finetune::model::attention::chunked;
    for dtype in [DType::F32, DType::BF16] {
        let (b, h, t, d) = (2, 4, 70, 32);
        let seg: Vec<u32> = (0..b * t).map(|i| if i % t < 30 { 1 } else { 2 }).collect();
        let bias = ops::attention_bias(b, t, Some(&seg), DType::F32, &Device::Cpu).unwrap();
        let inputs = [
            randn(&[b, h, t, d], 7),
            randn(&[b, h, t, d], 8),
            randn(&[b, h, t, d], 9),
        ];
        let e = compare(
            "chunked attention, 16 rows",
            &inputs,
            &[bias],
            dtype,
            |x, c| {
                let softmax = if x[0].device().is_cuda() {
                    chunked::Softmax::Cuda
                } else {
                    chunked::Softmax::Composed
                };
                let how = chunked::Chunking {
                    rows: 16,
                    causal: true,
                    softmax,
                };
                chunked::attention(&x[0], &x[1], &x[2], &c[0], 0.2, how)
            },
        );
        assert!(e <= tol(dtype), "chunked attention {dtype:?}: {e}");
    }
}

/// The fused bf16 attention (`cuda::flash`) against the f64 composed graph: every head size it is
/// built for, GQA, sequences that end inside a 64-row block, one token, per-row packed masks with
/// padding rows masked entirely, tiles of zeros, of −∞ and mixed.
#[test]
fn flash_attention_matches_the_cpu() {
    use finetune::model::kernels::cuda::flash;
    // (B, H, KV, T, D, packed)
    for (b, h, kv, t, d, packed) in [
        (2, 4, 2, 200, 64, true),
        (1, 2, 2, 1, 64, false),
        (1, 3, 1, 130, 96, false),
        (2, 2, 1, 77, 128, true),
        (1, 2, 1, 1024, 64, false),
        // Documents of 200 and 395 tokens: whole 64×64 tiles masked between them (skipped).
        (1, 2, 1, 600, 64, true),
    ] {
        let seg: Vec<u32> = (0..b * t)
            .map(|i| match i % t {
                j if j < t / 3 => 1,
                j if j + 5 < t => 2,
                _ => 0,
            })
            .collect();
        let bias = ops::attention_bias(b, t, packed.then_some(&seg[..]), DType::F32, &Device::Cpu)
            .unwrap();
        let inputs = [
            randn(&[b, h, t, d], 11),
            randn(&[b, kv, t, d], 12),
            randn(&[b, kv, t, d], 13),
        ];
        let scale = 1.0 / (d as f64).sqrt();
        let what = format!(
            "flash B{b} H{h} KV{kv} T{t} D{d}{}",
            if packed { " packed" } else { "" }
        );
        let e = compare(&what, &inputs, &[bias], DType::BF16, |x, c| {
            if x[0].device().is_cuda() {
                assert!(flash::usable(&x[0], &c[0]), "{what}: flash not usable");
                flash::attention(&x[0], &x[1], &x[2], &c[0], scale)
            } else {
                kernels::attention(&x[0], &x[1], &x[2], &c[0], scale)
            }
        });
        assert!(e <= TOL_BF16, "{what}: {e}");
    }
}

/// Device time of one forward and backward of the fused attention against the cuBLAS + softmax
/// path (chunked past its threshold), Qwen2.5-0.5B's attention shape (14 heads, 2 KV heads,
/// D 64). Printed, not asserted (`--nocapture`).
/// kernels::attention's CUDA path without the fused kernel: k and v repeated to H heads, the
/// whole scores (cuBLAS + softmax kernel) or, past the threshold, the query-chunked form.
fn unfused(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    use finetune::model::attention::chunked;
    let (b, h, t, d) = q.dims4()?;
    let kv = k.dim(1)?;
    let rep = |x: &Tensor| {
        x.unsqueeze(2)?
            .expand((b, kv, h / kv, t, d))?
            .reshape((b, h, t, d))
    };
    let (k, v) = (rep(k)?, rep(v)?);
    match chunked::chunk_rows(b, h, t) {
        Some(rows) => {
            let how = chunked::Chunking {
                rows,
                causal: true,
                softmax: chunked::Softmax::Cuda,
            };
            chunked::attention(q, &k, &v, bias, scale, how)
        }
        None => kernels::cuda::attention(q, &k, &v, bias, scale),
    }
}

#[test]
fn flash_attention_time() {
    use finetune::model::kernels::cuda::flash;
    let gpu = Device::new_cuda(0).unwrap();
    for (b, t) in [(4, 512), (1, 4096)] {
        let (h, kv, d) = (14, 2, 64);
        let bias = ops::attention_bias(b, t, None, DType::BF16, &gpu).unwrap();
        let mk = |shape: &[usize], seed| {
            Var::from_tensor(
                &randn(shape, seed)
                    .to_dtype(DType::BF16)
                    .unwrap()
                    .to_device(&gpu)
                    .unwrap(),
            )
            .unwrap()
        };
        let (q, k, v) = (
            mk(&[b, h, t, d], 1),
            mk(&[b, kv, t, d], 2),
            mk(&[b, kv, t, d], 3),
        );
        let scale = 1.0 / (d as f64).sqrt();
        let step = |fused: bool| {
            let y = if fused {
                flash::attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias, scale)
            } else {
                unfused(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias, scale)
            }
            .unwrap();
            let g = y
                .to_dtype(DType::F32)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let _ = g
                .get(&q)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
        };
        for fused in [true, false, true, false] {
            step(fused);
            let t0 = std::time::Instant::now();
            for _ in 0..5 {
                step(fused);
            }
            println!(
                "attention B{b} T{t} H{h} KV{kv} D{d} {}: {:.2} ms forward+backward",
                if fused { "flash  " } else { "unfused" },
                t0.elapsed().as_secs_f64() * 1e3 / 5.0
            );
        }
    }
}

#[test]
fn cross_entropy_matches_the_cpu() {
    for dtype in [DType::F32, DType::BF16] {
        for (n, v) in [(37, 1000), (6, 151_936)] {
            let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7919 + 13) % v as u32).collect();
            let logits = randn(&[n, v], 7).affine(3.0, 0.0).unwrap();
            let e = compare(
                &format!("cross_entropy {n}x{v}"),
                &[logits],
                &[],
                dtype,
                |x, _| kernels::cross_entropy(&x[0], &targets),
            );
            assert!(e <= tol(dtype), "cross_entropy {n}x{v} {dtype:?}: {e}");
        }
    }
}

/// The LM head and the loss taken 16 rows at a time (`model::loss`, as training takes them) on
/// CUDA against the whole loss in f64 on the CPU: the value and the hidden states' gradient, for
/// rows that 16 does not divide, a 151,936-entry vocabulary and an upstream gradient other than 1.
#[test]
fn chunked_head_loss_matches_the_cpu() {
    for dtype in [DType::F32, DType::BF16] {
        let (n, d, v) = (45, 896, 151_936);
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7919 + 13) % v as u32).collect();
        let w = randn(&[v, d], 21).affine(0.05, 0.0).unwrap();
        let e = compare(
            "LM head + loss, chunks of 16 rows",
            &[randn(&[n, d], 20)],
            &[w],
            dtype,
            |x, c| {
                let head = |h: &Tensor, t: &[u32]| {
                    kernels::cross_entropy(&kernels::frozen_linear(h, &c[0])?, t)
                };
                if x[0].device().is_cuda() {
                    loss::chunked_mean_loss(&x[0], &targets, 16, head)
                } else {
                    head(&x[0], &targets)
                }
            },
        );
        assert!(e <= tol(dtype), "chunked head loss {dtype:?}: {e}");
    }
}

#[test]
fn swiglu_matches_the_cpu() {
    for dtype in [DType::F32, DType::BF16] {
        let shape = [3, 41, 4864];
        let inputs = [randn(&shape, 8).affine(2.0, 0.0).unwrap(), randn(&shape, 9)];
        let e = compare("swiglu [3, 41, 4864]", &inputs, &[], dtype, |x, _| {
            if x[0].device().is_cuda() {
                kernels::cuda::swiglu(&x[0], &x[1])
            } else {
                x[0].silu()? * &x[1]
            }
        });
        assert!(e <= tol(dtype), "swiglu {dtype:?}: {e}");
    }
}

#[test]
fn frozen_linear_matches_the_cpu() {
    for dtype in [DType::F32, DType::BF16] {
        let (n, i, o) = (300, 896, 4864);
        let w = randn(&[o, i], 11).affine(0.03, 0.0).unwrap();
        let e = compare(
            "frozen linear 300x896 · 4864x896ᵀ",
            &[randn(&[n, i], 10)],
            &[w],
            dtype,
            |x, c| kernels::frozen_linear(&x[0], &c[0]),
        );
        assert!(e <= tol(dtype), "frozen linear {dtype:?}: {e}");
    }
}

#[test]
fn lora_linear_matches_the_cpu() {
    // Both directions of an MLP (896 → 4864 and back); the backward on cuBLAS in its own chunks
    // (`None`: one chunk of 300 rows here) and in chunks of 64 rows (the last one partial), which
    // sum dA and dB across chunks.
    for (i, o) in [(896, 4864), (4864, 896)] {
        for rows in [None, Some(64)] {
            for dtype in [DType::F32, DType::BF16] {
                let (n, r) = (300, 16);
                let w = randn(&[o, i], 12).affine(0.03, 0.0).unwrap();
                let inputs = [
                    randn(&[n, i], 13),
                    randn(&[r, i], 14).affine(0.05, 0.0).unwrap(),
                    randn(&[o, r], 15).affine(0.05, 0.0).unwrap(),
                ];
                let e = compare(
                    &format!("LoRA linear 300x{i} → {o}, r16, rows {rows:?}"),
                    &inputs,
                    &[w],
                    dtype,
                    |x, c| {
                        if x[0].device().is_cuda() {
                            // The op takes f32 LoRA factors whatever the activation dtype.
                            let (a, b) = (x[1].to_dtype(DType::F32)?, x[2].to_dtype(DType::F32)?);
                            kernels::cuda::lora_linear_in_chunks(&x[0], &c[0], &a, &b, 2.0, rows)
                        } else {
                            x[0].matmul(&c[0].t()?)?
                                + (x[0].matmul(&x[1].t()?)?.matmul(&x[2].t()?)? * 2.0)?
                        }
                    },
                );
                assert!(
                    e <= tol(dtype),
                    "LoRA linear {i}→{o} {rows:?} {dtype:?}: {e}"
                );
            }
        }
    }
}

/// The LoRA op on bf16 activations is as exact as f32 products (`cuda::lora_split`: the f32 side
/// of each product in three bf16 parts on tensor cores): against f64 products of the same bf16 x
/// and g and f32 A and B, dA and dB within f32 rounding, and, with W = 0 so that the LoRA term is
/// all of them, y and dx equal to the f64 values rounded once to bf16 but for near-ties. (Fewer
/// parts would miss about half of those roundings.) Both directions of an MLP; an odd rank;
/// small widths that are not multiples of 32.
#[test]
fn lora_linear_bf16_is_as_exact_as_f32() {
    let gpu = Device::new_cuda(0).unwrap();
    // The last rows are 2048 tokens long: dA's and dB's sums run over all of them.
    for (n, i, o, r) in [
        (300, 896, 4864, 16),
        (300, 4864, 896, 16),
        (300, 896, 896, 5),
        (300, 200, 72, 12),
        (2048, 896, 4864, 16),
        (2048, 4864, 896, 16),
    ] {
        let s = 2.0;
        let x = randn(&[n, i], 21).to_dtype(DType::BF16).unwrap();
        let a = randn(&[r, i], 22).affine(0.05, 0.0).unwrap();
        let b = randn(&[o, r], 23).affine(0.05, 0.0).unwrap();
        let up = randn(&[n, o], 24);
        let w = Tensor::zeros((o, i), DType::BF16, &gpu).unwrap();
        let xv = Var::from_tensor(&x.to_device(&gpu).unwrap()).unwrap();
        let av = Var::from_tensor(&a.to_device(&gpu).unwrap()).unwrap();
        let bv = Var::from_tensor(&b.to_device(&gpu).unwrap()).unwrap();
        let y = kernels::cuda::lora_linear(xv.as_tensor(), &w, av.as_tensor(), bv.as_tensor(), s)
            .unwrap();
        let loss = (y.to_dtype(DType::F32).unwrap() * up.to_device(&gpu).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let got = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
        let (dx, da, db) = (
            got(grads.get(&xv).unwrap()),
            got(grads.get(&av).unwrap()),
            got(grads.get(&bv).unwrap()),
        );
        // The reference in f64 from the values the GPU saw (g reaches the op as bf16).
        let f64_of = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let g = f64_of(&up.to_dtype(DType::BF16).unwrap());
        let (x, a, b) = (f64_of(&x), f64_of(&a), f64_of(&b));
        let mid = x.matmul(&a.t().unwrap()).unwrap();
        let gb = (g.matmul(&b).unwrap() * s).unwrap();
        let y_ref = (mid.matmul(&b.t().unwrap()).unwrap() * s).unwrap();
        let dx_ref = gb.matmul(&a).unwrap();
        let da_ref = gb.t().unwrap().matmul(&x).unwrap();
        let db_ref = (g.t().unwrap().matmul(&mid).unwrap() * s).unwrap();
        let (e_da, e_db) = (rel(&da, &da_ref), rel(&db, &db_ref));
        // Elements that differ from the reference rounded once to bf16.
        let off = |t: &Tensor, want: &Tensor| {
            let want = want
                .to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let t = got(t).to_dtype(DType::F32).unwrap();
            let ne = t.ne(&want).unwrap().to_dtype(DType::F32).unwrap();
            ne.sum_all().unwrap().to_scalar::<f32>().unwrap() / t.elem_count() as f32
        };
        let (off_y, off_dx) = (off(&y, &y_ref), off(&dx, &dx_ref));
        println!(
            "LoRA bf16 {n}x{i} → {o} r{r}: dA {e_da:.1e}, dB {e_db:.1e}; \
             y off its rounding {off_y:.1e}, dx {off_dx:.1e}"
        );
        assert!(
            e_da <= 1e-5 && e_db <= 1e-5,
            "{i}→{o} r{r}: dA {e_da}, dB {e_db}"
        );
        assert!(
            off_y <= 0.01 && off_dx <= 0.01,
            "{i}→{o} r{r}: y {off_y}, dx {off_dx}"
        );
    }
}

/// `w` quantized to `ty` on `gpu`, and the values it holds (f32, on the CPU).
fn quantized(
    w: &Tensor,
    ty: candle_core::quantized::GgmlDType,
    gpu: &Device,
) -> (finetune::model::quant::QWeight, Tensor) {
    let q = finetune::model::quant::QWeight::quantize(w, ty, gpu).unwrap();
    let values = q
        .dequantize(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    (q, values)
}

#[test]
fn swiglu_linear_matches_the_cpu() {
    // The MLP's gated activation and down projection as one op (4864 → 896): with the LoRA term,
    // without it (a frozen down projection), and over a Q4_K weight (against its dequantized
    // values); gradients to gate, up, A and B.
    use candle_core::quantized::GgmlDType;
    let gpu = Device::new_cuda(0).unwrap();
    let (n, i, o, r) = (300, 4864, 896, 16);
    let w = randn(&[o, i], 32).affine(0.03, 0.0).unwrap();
    let (q, deq) = quantized(&w, GgmlDType::Q4K, &gpu);
    let inputs = [
        randn(&[n, i], 33).affine(2.0, 0.0).unwrap(),
        randn(&[n, i], 34),
        randn(&[r, i], 35).affine(0.05, 0.0).unwrap(),
        randn(&[o, r], 36).affine(0.05, 0.0).unwrap(),
    ];
    for (what, lora, quant) in [
        ("LoRA", true, false),
        ("frozen", false, false),
        ("QLoRA Q4_K", true, true),
    ] {
        let inputs = if lora { &inputs[..] } else { &inputs[..2] };
        let w = if quant { deq.clone() } else { w.clone() };
        for dtype in [DType::F32, DType::BF16] {
            let e = compare(
                &format!("swiglu linear {what} 300x{i} → {o}"),
                inputs,
                std::slice::from_ref(&w),
                dtype,
                |x, c| {
                    if x[0].device().is_cuda() {
                        let f32s = |t: &Tensor| t.to_dtype(DType::F32);
                        let ab = if lora {
                            Some((f32s(&x[2])?, f32s(&x[3])?))
                        } else {
                            None
                        };
                        let lora = ab.as_ref().map(|(a, b)| (a, b, 2.0));
                        if quant {
                            kernels::cuda::swiglu_qlinear(&x[0], &x[1], q.qtensor(), lora)
                        } else {
                            kernels::cuda::swiglu_linear(&x[0], &x[1], &c[0], lora)
                        }
                    } else {
                        let h = (x[0].silu()? * &x[1])?;
                        let y = h.matmul(&c[0].t()?)?;
                        if lora {
                            y + (h.matmul(&x[2].t()?)?.matmul(&x[3].t()?)? * 2.0)?
                        } else {
                            Ok(y)
                        }
                    }
                },
            );
            assert!(e <= tol(dtype), "swiglu linear {what} {dtype:?}: {e}");
        }
    }
}

#[test]
fn qlora_linear_matches_the_cpu_on_the_dequantized_weight() {
    use candle_core::quantized::GgmlDType;
    let gpu = Device::new_cuda(0).unwrap();
    for ty in [GgmlDType::Q4K, GgmlDType::Q8_0] {
        let (n, i, o, r) = (300, 1024, 2816, 16);
        let w = randn(&[o, i], 22).affine(0.03, 0.0).unwrap();
        // The reference multiplies by the weight the op sees: the quantized values.
        let (q, deq) = quantized(&w, ty, &gpu);
        let inputs = [
            randn(&[n, i], 23),
            randn(&[r, i], 24).affine(0.05, 0.0).unwrap(),
            randn(&[o, r], 25).affine(0.05, 0.0).unwrap(),
        ];
        for dtype in [DType::F32, DType::BF16] {
            let e = compare(
                &format!("QLoRA linear {ty:?} 300x1024 → 2816, r16"),
                &inputs,
                std::slice::from_ref(&deq),
                dtype,
                |x, c| {
                    if x[0].device().is_cuda() {
                        let (a, b) = (x[1].to_dtype(DType::F32)?, x[2].to_dtype(DType::F32)?);
                        kernels::cuda::qlora_linear(&x[0], q.qtensor(), &a, &b, 2.0)
                    } else {
                        x[0].matmul(&c[0].t()?)?
                            + (x[0].matmul(&x[1].t()?)?.matmul(&x[2].t()?)? * 2.0)?
                    }
                },
            );
            assert!(e <= tol(dtype), "QLoRA linear {ty:?} {dtype:?}: {e}");
        }
    }
}

#[test]
fn dequantize_bf16_equals_candles_f32_dequantization_rounded() {
    use candle_core::quantized::GgmlDType;
    use finetune::model::quant::QWeight;
    let gpu = Device::new_cuda(0).unwrap();
    let w = randn(&[384, 2048], 31).affine(0.05, 0.0).unwrap();
    for ty in [
        GgmlDType::Q4_0,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        let q = QWeight::quantize(&w, ty, &gpu).unwrap();
        let ours = kernels::cuda::dequantize_bf16(q.qtensor())
            .unwrap()
            .expect("a kernel for this type");
        let candle = q
            .qtensor()
            .dequantize(&gpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let (a, b) = (
            ours.to_dtype(DType::F32).unwrap().flatten_all().unwrap(),
            candle.to_dtype(DType::F32).unwrap().flatten_all().unwrap(),
        );
        let diff = (&a - &b).unwrap().abs().unwrap();
        let max = diff.max(0).unwrap().to_scalar::<f32>().unwrap();
        let differing: Vec<f32> = diff.to_vec1::<f32>().unwrap();
        let n_diff = differing.iter().filter(|d| **d > 0.0).count();
        println!(
            "dequantize {ty:?} → bf16: {n_diff} of {} weights differ, max |diff| {max:.1e}",
            differing.len()
        );
        // The same f32 values rounded once; an FMA contraction may move one in a million by a
        // bf16 step.
        assert!(
            n_diff * 100_000 <= differing.len(),
            "{ty:?}: {n_diff} differ"
        );
        assert!(rel(&a, &b) <= 1e-5, "{ty:?}: {}", rel(&a, &b));
    }
}

/// Not a test of speed (nothing is asserted on time): prints how long dequantizing the Llama 3.1
/// 8B MLP weight (14336×4096, Q4_K) takes by the kernel and by Candle's f32 path + cast, for the
/// note. `cargo test --release --features cuda --test cuda_ops dequantize_time -- --nocapture`.
#[test]
fn dequantize_time_of_an_8b_mlp_weight() {
    use candle_core::quantized::GgmlDType;
    use finetune::model::quant::QWeight;
    let gpu = Device::new_cuda(0).unwrap();
    let w = randn(&[14336, 4096], 41).affine(0.02, 0.0).unwrap();
    let q = QWeight::quantize(&w, GgmlDType::Q4K, &gpu).unwrap();
    let time = |f: &dyn Fn() -> Tensor| {
        let _ = f();
        gpu.synchronize().unwrap();
        let t = std::time::Instant::now();
        for _ in 0..20 {
            let _ = f();
        }
        gpu.synchronize().unwrap();
        t.elapsed().as_secs_f64() / 20.0
    };
    let ours = time(&|| {
        kernels::cuda::dequantize_bf16(q.qtensor())
            .unwrap()
            .unwrap()
    });
    let candle = time(&|| {
        q.qtensor()
            .dequantize(&gpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
    });
    println!(
        "dequantize 14336x4096 Q4_K → bf16: kernel {:.3} ms, Candle f32 + cast {:.3} ms",
        ours * 1e3,
        candle * 1e3
    );
    let same = kernels::cuda::dequantize_bf16(q.qtensor())
        .unwrap()
        .unwrap();
    let want = q
        .qtensor()
        .dequantize(&gpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    assert_eq!(rel(&same, &want), 0.0);
}

/// The one-launch AdamW (`cuda::adamw`, what `AdamW::step` runs on CUDA) against the composed
/// step on the same GPU: three steps with weight decay and a gradient scale, one parameter
/// without a gradient on the second; parameters and moments agree to the last bit or so (the
/// kernel rounds op by op as Candle's kernels do).
#[test]
fn adamw_in_one_launch_equals_the_composed_step() {
    use finetune::train::optim::{AdamW, AdamWConfig};
    let gpu = Device::new_cuda(0).unwrap();
    let shapes = [vec![16, 896], vec![4864, 16], vec![5], vec![3, 7]];
    let make = || {
        shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let t = randn(s, 30 + i as u64).to_device(&gpu).unwrap();
                (format!("p{i}"), Var::from_tensor(&t).unwrap())
            })
            .collect::<Vec<_>>()
    };
    let cfg = AdamWConfig {
        weight_decay: 0.01,
        ..Default::default()
    };
    let (mut fused, mut composed) = (
        AdamW::new(make(), cfg).unwrap(),
        AdamW::new(make(), cfg).unwrap(),
    );
    for step in 1..=3u64 {
        let grads: Vec<Option<Tensor>> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                (step != 2 || i != 1)
                    .then(|| randn(s, 100 * step + i as u64).to_device(&gpu).unwrap())
            })
            .collect();
        fused.step(&grads, 1e-3, 0.5).unwrap();
        composed.step += 1;
        let t = composed.step as i32;
        let bc = (1.0 - cfg.beta1.powi(t), 1.0 - cfg.beta2.powi(t));
        composed.step_composed(&grads, 1e-3, 0.5, bc).unwrap();
    }
    let mut worst = 0f32;
    for ((_, a), (_, b)) in fused.params().iter().zip(composed.params()) {
        worst = worst.max(rel(a.as_tensor(), b.as_tensor()));
    }
    let (sa, sb) = (
        fused.state_tensors().unwrap(),
        composed.state_tensors().unwrap(),
    );
    for (name, a) in &sa {
        worst = worst.max(rel(a, &sb[name]));
    }
    println!("AdamW one launch vs composed: worst relative difference {worst:.1e}");
    assert!(worst <= 1e-7, "{worst}");
}

/// The bits of `t` as f32 on the CPU (bf16 widens exactly): equal tensors give equal lists.
fn bits(t: &Tensor) -> Vec<u32> {
    let v: Vec<f32> = t
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    v.iter().map(|x| x.to_bits()).collect()
}

/// `f`'s value at `x` and the gradient of Σ f(x)·`up` (so the gradient is f's backward of `up`).
fn value_and_grad(x: &Tensor, up: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> (Tensor, Tensor) {
    let v = Var::from_tensor(x).unwrap();
    let y = f(v.as_tensor());
    let grads = (&y * up).unwrap().sum_all().unwrap().backward().unwrap();
    (y, grads.get(&v).unwrap().clone())
}

#[test]
fn head_copies_rope_heads_and_bias_equal_candles_ops_bit_for_bit() {
    let gpu = Device::new_cuda(0).unwrap();
    let on = |t: Tensor, dtype: DType| t.to_device(&gpu).unwrap().to_dtype(dtype).unwrap();
    for dtype in [DType::BF16, DType::F32] {
        // Rows of 16-byte units (64), 4-byte words (6 in bf16) and neither (5 in bf16: Candle's
        // copy); and an input that starts inside its storage (a narrowed batch).
        for (d, skip) in [(64, 0), (6, 0), (5, 0), (64, 1), (6, 1)] {
            let whole = on(randn(&[3, 7, 4, d], 40 + d as u64), dtype);
            let x = whole.narrow(0, skip, 2).unwrap();
            let up = on(randn(&[2, 4, 7, d], 41), dtype);
            let (y, g) = value_and_grad(&x, &up, |x| kernels::swap_heads(x).unwrap());
            let want = x.transpose(1, 2).unwrap().contiguous().unwrap();
            assert_eq!(y.dims(), want.dims());
            assert_eq!(bits(&y), bits(&want), "swap_heads D={d} {dtype:?}");
            // The Var above is a fresh copy: the view itself, read from its offset.
            let direct = kernels::swap_heads(&x).unwrap();
            assert_eq!(
                bits(&direct),
                bits(&want),
                "swap_heads of a view D={d} {dtype:?}"
            );
            let back = up.transpose(1, 2).unwrap().contiguous().unwrap();
            assert_eq!(bits(&g), bits(&back), "swap_heads gradient D={d} {dtype:?}");
        }
        // RoPE of (B, T, H, Dh) written (B, H, T, Dh) = RoPE of the transpose, value and gradient.
        let (b, t, h, d) = (2, 17, 3, 64);
        let shared: Vec<u32> = (0..t as u32).collect();
        let per_row: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 7) % 300).collect();
        for (pos, rows) in [(shared, 1), (per_row, b)] {
            let (cos, sin) = rope_tables(&pos, rows, t, d);
            let (cos, sin) = (on(cos, dtype), on(sin, dtype));
            let x = on(randn(&[b, t, h, d], 42), dtype);
            let up = on(randn(&[b, h, t, d], 43), dtype);
            let (y1, g1) = value_and_grad(&x, &up, |x| kernels::rope_heads(x, &cos, &sin).unwrap());
            let (y2, g2) = value_and_grad(&x, &up, |x| {
                let x = x.transpose(1, 2).unwrap().contiguous().unwrap();
                kernels::rope(&x, &cos, &sin).unwrap()
            });
            assert_eq!(y1.dims(), &[b, h, t, d]);
            assert_eq!(bits(&y1), bits(&y2), "rope_heads {rows} {dtype:?}");
            assert_eq!(bits(&g1), bits(&g2), "rope_heads gradient {rows} {dtype:?}");
        }
        // A frozen bias: Candle's broadcast add, bit for bit; the gradient is the upstream's.
        let (y, bias) = (
            on(randn(&[3, 5, 896], 44), dtype),
            on(randn(&[896], 45), dtype),
        );
        let up = on(randn(&[3, 5, 896], 46), dtype);
        let (out, g) = value_and_grad(&y, &up, |y| kernels::add_bias(y, &bias).unwrap());
        let want = y.broadcast_add(&bias).unwrap();
        assert_eq!(bits(&out), bits(&want), "add_bias {dtype:?}");
        assert_eq!(bits(&g), bits(&up), "add_bias gradient {dtype:?}");
        // A bias that trains still gets its gradient (Candle's add).
        let trained = Var::from_tensor(&bias).unwrap();
        let sum = kernels::add_bias(&y, trained.as_tensor()).unwrap();
        let grads = (&sum * &up).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(
            grads.get(&trained).is_some(),
            "a trained bias lost its gradient"
        );
        // Rows of 27 (no 16-byte unit inside a row past the first in bf16): the element path.
        let (y, bias) = (
            on(randn(&[3, 5, 27], 47), dtype),
            on(randn(&[27], 48), dtype),
        );
        let out = kernels::add_bias(&y, &bias).unwrap();
        let want = y.broadcast_add(&bias).unwrap();
        assert_eq!(bits(&out), bits(&want), "add_bias of rows of 27 {dtype:?}");
        // A plain sum, values and both gradients: 16-byte units with a tail (3·5·27 elements),
        // and operands starting inside their storage (not 16-byte aligned).
        for (skip, len) in [(0, 5), (1, 4)] {
            let a = on(randn(&[3, 5, 27], 49), dtype)
                .narrow(1, skip, len)
                .unwrap();
            let b = on(randn(&[3, 6, 27], 50), dtype).narrow(1, 1, len).unwrap();
            let (a, b) = (a.contiguous().unwrap(), b.contiguous().unwrap());
            let want = a.add(&b).unwrap();
            let untracked = kernels::cuda::add_untracked(&a, &b).unwrap();
            assert_eq!(bits(&untracked), bits(&want), "add_untracked {dtype:?}");
            let (va, vb) = (Var::from_tensor(&a).unwrap(), Var::from_tensor(&b).unwrap());
            let sum = kernels::cuda::add(va.as_tensor(), vb.as_tensor()).unwrap();
            assert_eq!(bits(&sum), bits(&want), "add {dtype:?} skip {skip}");
            let up = on(randn(sum.dims(), 51), dtype);
            let grads = (&sum * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&va, &vb] {
                let g = grads.get(v).unwrap();
                assert_eq!(bits(g), bits(&up), "add gradient {dtype:?}");
            }
        }
    }
    // The backward's gradient sums through the installed add: a tensor used twice gets the
    // same gradient as Candle's sum of its two contributions.
    candle_core::backprop::set_grad_add(kernels::cuda::add_untracked);
    let x = Var::from_tensor(&on(randn(&[4, 9, 33], 52), DType::BF16)).unwrap();
    let (p, q) = (
        on(randn(&[4, 9, 33], 53), DType::BF16),
        on(randn(&[4, 9, 33], 54), DType::BF16),
    );
    let y = ((x.as_tensor() * &p).unwrap() + (x.as_tensor() * &q).unwrap()).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    let want = p.add(&q).unwrap();
    assert_eq!(bits(g.get(&x).unwrap()), bits(&want), "a gradient sum");
    println!("swap_heads, rope_heads, add_bias, add: bit-equal to Candle's ops (bf16, f32)");
}

/// The bf16 LoRA ops' backward from the splits their forward kept (`lora_split::Kept`) equals
/// the backward that makes them again, bit for bit: a graph's second backward finds nothing kept
/// (the first took it). The LoRA projection (both directions of an MLP, an odd rank, rank 64 over
/// small widths) and the SwiGLU + down projection op; gradients to every input.
#[test]
fn lora_backward_from_kept_splits_equals_the_splits_made_again() {
    let gpu = Device::new_cuda(0).unwrap();
    let bf16 = |t: Tensor| {
        Var::from_tensor(&t.to_dtype(DType::BF16).unwrap().to_device(&gpu).unwrap()).unwrap()
    };
    let f32v = |t: Tensor| Var::from_tensor(&t.to_device(&gpu).unwrap()).unwrap();
    let twice = |vars: &[&Var], y: &Tensor| {
        let up = randn(y.dims(), 47).to_device(&gpu).unwrap();
        let loss = (y.to_dtype(DType::F32).unwrap() * up)
            .unwrap()
            .sum_all()
            .unwrap();
        let (first, second) = (loss.backward().unwrap(), loss.backward().unwrap());
        for (j, v) in vars.iter().enumerate() {
            let (a, b) = (first.get(v).unwrap(), second.get(v).unwrap());
            assert_eq!(bits(a), bits(b), "gradient {j} differs");
        }
    };
    for (i, o, r) in [
        (896, 4864, 16),
        (4864, 896, 16),
        (896, 128, 5),
        (200, 72, 64),
    ] {
        let n = 300;
        let x = bf16(randn(&[n, i], 41));
        let w = randn(&[o, i], 42).affine(0.03, 0.0).unwrap();
        let w = w.to_dtype(DType::BF16).unwrap().to_device(&gpu).unwrap();
        let a = f32v(randn(&[r, i], 43).affine(0.05, 0.0).unwrap());
        let b = f32v(randn(&[o, r], 44).affine(0.05, 0.0).unwrap());
        let y = kernels::cuda::lora_linear(x.as_tensor(), &w, a.as_tensor(), b.as_tensor(), 2.0)
            .unwrap();
        twice(&[&x, &a, &b], &y);
        println!("LoRA {n}x{i} → {o} r{r}: kept and made again bit-equal");
    }
    let (n, i, o, r) = (300, 4864, 896, 16);
    let (gate, up) = (bf16(randn(&[n, i], 45)), bf16(randn(&[n, i], 46)));
    let w = randn(&[o, i], 48).affine(0.03, 0.0).unwrap();
    let w = w.to_dtype(DType::BF16).unwrap().to_device(&gpu).unwrap();
    let a = f32v(randn(&[r, i], 49).affine(0.05, 0.0).unwrap());
    let b = f32v(randn(&[o, r], 50).affine(0.05, 0.0).unwrap());
    let lora = Some((a.as_tensor(), b.as_tensor(), 2.0));
    let y = kernels::cuda::swiglu_linear(gate.as_tensor(), up.as_tensor(), &w, lora).unwrap();
    twice(&[&gate, &up, &a, &b], &y);
    println!("swiglu linear LoRA {n}x{i} → {o} r{r}: kept and made again bit-equal");
}

/// The attention masks built on the GPU (`ops::additive` takes a cast and a log there) equal the
/// CPU's, bit for bit: plain causal, packed rows with padding, after a KV cache, sliding bands;
/// bf16 and f32.
#[test]
fn attention_masks_on_the_gpu_equal_the_cpus() {
    let gpu = Device::new_cuda(0).unwrap();
    let seg = [
        1u32, 1, 1, 2, 2, 3, 0, 0, //
        5, 5, 5, 5, 5, 5, 5, 5, //
        1, 0, 2, 2, 2, 0, 7, 7,
    ];
    for dtype in [DType::BF16, DType::F32] {
        let both = |f: &dyn Fn(&Device) -> Tensor| (bits(&f(&gpu)), bits(&f(&Device::Cpu)));
        type Bits = (Vec<u32>, Vec<u32>);
        let cases: Vec<(&str, Bits)> = vec![
            (
                "packed",
                both(&|d| ops::attention_bias(3, 8, Some(&seg), dtype, d).unwrap()),
            ),
            (
                "plain 300",
                both(&|d| ops::attention_bias(2, 300, None, dtype, d).unwrap()),
            ),
            (
                "after 4 + 3",
                both(&|d| ops::causal_bias_after(4, 3, dtype, d).unwrap()),
            ),
            (
                "band 4 + 3, 2",
                both(&|d| ops::sliding_band(4, 3, 2, dtype, d).unwrap()),
            ),
        ];
        for (what, (g, c)) in cases {
            assert_eq!(g, c, "{what} {dtype:?}");
        }
    }
    println!("attention masks: GPU and CPU bit-equal");
}
