#![cfg(test)]
use super::*;
use crate::model::kernels::{self, composed};
use crate::model::ops;
use candle_core::{Device, Var};

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn scale_of(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1.0)
}

/// Segment ids with packing and padding: several segments and trailing zeros.
fn segments(b: usize, t: usize) -> Vec<u32> {
    let mut seg = Vec::with_capacity(b * t);
    for bi in 0..b {
        for i in 0..t {
            let pad = t.saturating_sub(1 + 3 * bi);
            let id = if t > 1 && i >= pad.max(1) {
                0
            } else {
                1 + (i / (3 + bi * 4)) as u32
            };
            seg.push(id);
        }
    }
    seg
}

fn check(b: usize, h: usize, kv: usize, t: usize, d: usize, packed: bool) {
    check_in(b, h, kv, t, d, packed, false);
}

/// `check` with the products in f32 or (`bf16`) on bf16-rounded operands: within 1e-5 of the
/// composed f32 graph, or within bf16's tolerance (2e-2 of the largest value, as the CUDA bf16
/// kernels are held to) and not equal to it, which shows the rounding happened.
fn check_in(b: usize, h: usize, kv: usize, t: usize, d: usize, packed: bool, bf16: bool) {
    let dev = Device::Cpu;
    let q = Var::from_tensor(&Tensor::randn(0f32, 1., (b, h, t, d), &dev).unwrap()).unwrap();
    let k = Var::from_tensor(&Tensor::randn(0f32, 1., (b, kv, t, d), &dev).unwrap()).unwrap();
    let v = Var::from_tensor(&Tensor::randn(0f32, 1., (b, kv, t, d), &dev).unwrap()).unwrap();
    let w = Tensor::randn(0f32, 1., (b, h, t, d), &dev).unwrap();
    let bias = if packed {
        let seg = segments(b, t);
        ops::attention_bias(b, t, Some(&seg), DType::F32, &dev).unwrap()
    } else {
        ops::attention_bias(b, t, None, DType::F32, &dev).unwrap()
    };
    let scale = 1.0 / (d as f64).sqrt();
    let rep = h / kv;
    let kr = composed::repeat_kv(k.as_tensor().clone(), rep)
        .unwrap()
        .contiguous()
        .unwrap();
    let vr = composed::repeat_kv(v.as_tensor().clone(), rep)
        .unwrap()
        .contiguous()
        .unwrap();
    let want = composed::attention(q.as_tensor(), &kr, &vr, &bias, scale).unwrap();
    let op = FlashAttn {
        bias: bias.clone(),
        bias_rows: bias.dim(0).unwrap(),
        bf16,
        scale: scale as f32,
        lse: cpu::Saved::new(),
    };
    let got = q
        .as_tensor()
        .apply_op3(k.as_tensor(), v.as_tensor(), op)
        .unwrap();
    let tol = if bf16 { 2e-2 } else { 1e-5 };
    let diff = max_abs(&got, &want);
    let ctx = format!("b={b} h={h} kv={kv} t={t} d={d} packed={packed} bf16={bf16}");
    assert!(diff <= tol * scale_of(&want), "forward {ctx}: {diff}");
    if bf16 {
        assert!(
            diff > 1e-5 * scale_of(&want),
            "forward {ctx}: not rounded ({diff})"
        );
    }
    let gw = (want * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gg = (got * &w).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
        let a = gw.get(var).unwrap();
        let b = gg.get(var).unwrap();
        let diff = max_abs(a, b);
        assert!(diff <= tol * scale_of(a), "d{name} {ctx}: {diff}");
        if bf16 {
            println!("d{name} {ctx}: {diff:.2e} of {:.2}", scale_of(a));
        }
    }
}

#[test]
fn attention_matches_composed_forward_and_gradients() {
    for (h, kv) in [(4, 4), (6, 2), (9, 3)] {
        for t in [1, 5, 33] {
            for d in [8, 64] {
                for packed in [false, true] {
                    check(2, h, kv, t, d, packed);
                }
            }
        }
    }
}

#[test]
fn attention_spans_several_blocks() {
    check(2, 6, 2, 150, 16, false);
    check(2, 6, 2, 150, 16, true);
}

/// The bf16 mode's products (AMX tiles where the CPU has them, else the same rounding in a plain
/// loop): within bf16's tolerance of the f32 graph, forward and every gradient.
#[test]
fn bf16_products_stay_within_bf16_tolerance() {
    for (h, kv, t, d, packed) in [
        (4, 4, 1, 64, false),
        (6, 2, 33, 64, true),
        (9, 3, 150, 64, false),
        (9, 3, 150, 64, true),
        (4, 2, 70, 96, true),
        (2, 1, 40, 128, false),
    ] {
        check_in(2, h, kv, t, d, packed, true);
    }
}

#[test]
fn public_attention_matches_composed_path() {
    let dev = Device::Cpu;
    let (b, h, kv, t, d) = (2, 6, 3, 7, 8);
    let q = Tensor::randn(0f32, 1., (b, h, t, d), &dev).unwrap();
    let k = Tensor::randn(0f32, 1., (b, kv, t, d), &dev).unwrap();
    let v = Tensor::randn(0f32, 1., (b, kv, t, d), &dev).unwrap();
    let bias = ops::attention_bias(b, t, None, DType::F32, &dev).unwrap();
    let got = kernels::attention(&q, &k, &v, &bias, 0.3).unwrap();
    let kr = composed::repeat_kv(k, 2).unwrap().contiguous().unwrap();
    let vr = composed::repeat_kv(v, 2).unwrap().contiguous().unwrap();
    let want = composed::attention(&q, &kr, &vr, &bias, 0.3).unwrap();
    assert!(max_abs(&got, &want) < 1e-5);
}

/// `cargo test --release --lib attention -- --ignored --nocapture`
#[test]
#[ignore]
fn attention_timing() {
    let dev = Device::Cpu;
    let (b, h, kv, t, d) = (4, 9, 3, 256, 64);
    let q = Var::from_tensor(&Tensor::randn(0f32, 1., (b, h, t, d), &dev).unwrap()).unwrap();
    let k = Var::from_tensor(&Tensor::randn(0f32, 1., (b, kv, t, d), &dev).unwrap()).unwrap();
    let v = Var::from_tensor(&Tensor::randn(0f32, 1., (b, kv, t, d), &dev).unwrap()).unwrap();
    let w = Tensor::randn(0f32, 1., (b, h, t, d), &dev).unwrap();
    let bias = ops::attention_bias(b, t, None, DType::F32, &dev).unwrap();
    let scale = 0.125;
    let composed = || {
        let kr = composed::repeat_kv(k.as_tensor().clone(), h / kv)
            .unwrap()
            .contiguous()
            .unwrap();
        let vr = composed::repeat_kv(v.as_tensor().clone(), h / kv)
            .unwrap()
            .contiguous()
            .unwrap();
        composed::attention(q.as_tensor(), &kr, &vr, &bias, scale).unwrap()
    };
    let fused = |bf16: bool| {
        let op = FlashAttn {
            bias: bias.clone(),
            bias_rows: 1,
            bf16,
            scale: scale as f32,
            lse: cpu::Saved::new(),
        };
        q.as_tensor()
            .apply_op3(k.as_tensor(), v.as_tensor(), op)
            .unwrap()
    };
    let time = |name: &str, f: &dyn Fn() -> Tensor| {
        let reps = 10;
        let (mut fwd, mut bwd) = (0f64, 0f64);
        for i in 0..reps + 2 {
            let t0 = std::time::Instant::now();
            let y = f();
            let t1 = std::time::Instant::now();
            let _g = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let t2 = std::time::Instant::now();
            if i >= 2 {
                fwd += (t1 - t0).as_secs_f64();
                bwd += (t2 - t1).as_secs_f64();
            }
        }
        let n = reps as f64;
        println!(
            "{name}: forward {:.2} ms, backward {:.2} ms, total {:.2} ms",
            fwd / n * 1e3,
            bwd / n * 1e3,
            (fwd + bwd) / n * 1e3
        );
    };
    println!(
        "B={b} H={h} KV={kv} T={t} D={d}, {} threads",
        rayon::current_num_threads()
    );
    time("composed", &composed);
    time("fused   ", &|| fused(false));
    time("fused bf16 products", &|| fused(true));
    let f = 4usize;
    let scores = b * h * t * t * f;
    let heads = b * h * t * d * f;
    println!(
        "retained per layer until backward (beyond q, k, v and the output): composed {} B \
         (4 score tensors {} B + repeated k, v {} B), fused {} B (log-sum-exp)",
        4 * scores + 2 * heads,
        4 * scores,
        2 * heads,
        b * h * t * f
    );
}
