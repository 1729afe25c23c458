//! The row loops of every softmax on the CPU (attention, the cross-entropy and its backward):
//! `max(x)` and `Σ exp(x − m)`, vectorized. `f32::exp` is a libm call per element and the
//! `f32::max` fold a serial chain; together they were the largest cost of the loss (one `exp` per
//! vocabulary entry per token, twice). Here exp is Cephes' `expf` (range reduction by ln 2 split
//! in two, a degree-6 polynomial, the power of two written into the exponent bits; within 2 ulp of
//! the true value over the normal range) in plain lanes that the compiler turns into AVX-512,
//! AVX2+FMA or NEON code, chosen at run time on x86-64 (`FINETUNE_NO_AVX512=1` skips AVX-512;
//! the portable form runs everywhere else). Below −87.3 (f32's smallest normal), exp is 0, as it
//! is for a −∞ mask; above 88.3 it is +∞ (softmax rows only pass values ≤ 0).

/// Elements per group of independent lanes (a sum or max keeps one accumulator per lane).
const LANES: usize = 16;

/// Above this, exp is +∞ (the result would pass 2¹²⁷ · 2 after rounding).
const MAX_IN: f32 = 88.3;
const MIN_IN: f32 = -87.336_55; // ln(f32::MIN_POSITIVE)
/// 1.5·2²³: adding it rounds to an integer (ties to even) in the low mantissa bits.
const ROUND: f32 = 12_582_912.0;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

#[inline(always)]
fn fma<const F: bool>(a: f32, b: f32, c: f32) -> f32 {
    if F {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// exp(x), branch-free so a loop of it vectorizes.
#[inline(always)]
fn exp1<const F: bool>(x: f32) -> f32 {
    let c = x.clamp(MIN_IN, MAX_IN);
    let t = fma::<F>(c, std::f32::consts::LOG2_E, ROUND);
    let n = t - ROUND;
    let r = fma::<F>(n, -LN2_LO, fma::<F>(n, -LN2_HI, c));
    let mut p = P[0];
    for &k in &P[1..] {
        p = fma::<F>(p, r, k);
    }
    let y = fma::<F>(p, r * r, r) + 1.0;
    // n is in [-126, 127]: (n + 127) is a valid exponent field.
    let bits = ((t.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23) as u32;
    let e = y * f32::from_bits(bits);
    if x < MIN_IN {
        0.0
    } else if x > MAX_IN {
        f32::INFINITY
    } else {
        e
    }
}

#[inline(always)]
fn max_body(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let tail = chunks.remainder().iter().copied();
    acc.into_iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, f32::max)
}

#[inline(always)]
fn sum_body<const F: bool>(x: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += exp1::<F>(v - m);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&v| exp1::<F>(v - m)).sum();
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn in_place_body<const F: bool>(x: &mut [f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *v = exp1::<F>(*v - m);
            *a += *v;
        }
    }
    let mut tail = 0f32;
    for v in chunks.into_remainder() {
        *v = exp1::<F>(*v - m);
        tail += *v;
    }
    acc.iter().sum::<f32>() + tail
}

/// The code paths of this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) enum Path {
    Avx512,
    Avx2,
    Portable,
}

/// The fastest path this CPU runs (cached).
pub(crate) fn path() -> Path {
    static PATH: std::sync::OnceLock<Path> = std::sync::OnceLock::new();
    *PATH.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let no_512 = std::env::var_os("FINETUNE_NO_AVX512").is_some_and(|v| v != "0");
            if is_x86_feature_detected!("avx512f") && !no_512 {
                return Path::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Path::Avx2;
            }
        }
        Path::Portable
    })
}

/// One entry point per path: `$name(x, m)` runs `$body` compiled for each.
macro_rules! dispatch {
    ($(#[$doc:meta])* $name:ident, $body:ident, $x:ty, $($m:ident: $mt:ty),*) => {
        $(#[$doc])*
        pub(crate) fn $name(x: $x $(, $m: $mt)*) -> f32 {
            $name::on(path(), x $(, $m)*)
        }

        mod $name {
            use super::*;

            pub(crate) fn on(path: Path, x: $x $(, $m: $mt)*) -> f32 {
                match path {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the CPU has AVX-512F (checked here; std caches the answer).
                    Path::Avx512 if is_x86_feature_detected!("avx512f") => unsafe {
                        avx512(x $(, $m)*)
                    },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the CPU has AVX2 and FMA (checked here).
                    Path::Avx2
                        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") =>
                    unsafe { avx2(x $(, $m)*) },
                    // aarch64 always has NEON and a fused multiply-add.
                    _ if cfg!(target_arch = "aarch64") => $body::<true>(x $(, $m)*),
                    _ => $body::<false>(x $(, $m)*),
                }
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,fma")]
            fn avx512(x: $x $(, $m: $mt)*) -> f32 {
                $body::<true>(x $(, $m)*)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2(x: $x $(, $m: $mt)*) -> f32 {
                $body::<true>(x $(, $m)*)
            }
        }
    };
}

#[inline(always)]
fn max_any<const F: bool>(x: &[f32]) -> f32 {
    max_body(x)
}

dispatch!(
    /// The largest element of `x` (−∞ for an empty slice).
    max,
    max_any,
    &[f32],
);
dispatch!(
    /// `Σ exp(xᵢ − m)`.
    sum_exp,
    sum_body,
    &[f32],
    m: f32
);
dispatch!(
    /// `xᵢ ← exp(xᵢ − m)`, returning their sum.
    exp_in_place,
    in_place_body,
    &mut [f32],
    m: f32
);

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> Vec<Path> {
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut p = vec![Path::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                p.push(Path::Avx2);
            }
            if is_x86_feature_detected!("avx512f") {
                p.push(Path::Avx512);
            }
        }
        p
    }

    /// Every path against f64's exp over the whole input range: within 2 ulp (relative 2.4e-7)
    /// where the result is normal, 0 below it and for −∞, and sums and maxima of odd lengths.
    #[test]
    fn exp_is_within_two_ulp_on_every_path() {
        let mut xs: Vec<f32> = (0..200_001)
            .map(|i| -88.0 + 176.3 * i as f32 / 200_000.0)
            .collect();
        xs.extend([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, MIN_IN, MAX_IN, -100.0]);
        xs.push(f32::NEG_INFINITY);
        let mut above = [88.4f32, f32::INFINITY];
        for path in paths() {
            let mut worst = 0f64;
            let mut got = xs.clone();
            exp_in_place::on(path, &mut got, 0.0);
            for (&x, &g) in xs.iter().zip(&got) {
                let want = (x as f64).exp();
                if want < f32::MIN_POSITIVE as f64 {
                    assert!(
                        g == 0.0 || (g as f64 - want).abs() < 1e-37,
                        "{path:?} exp({x}) = {g}"
                    );
                    continue;
                }
                worst = worst.max(((g as f64 - want) / want).abs());
            }
            assert!(worst <= 2.4e-7, "{path:?}: relative error {worst:e}");
            // A softmax row's sum (values ≤ 0 after the max).
            let mut row: Vec<f32> = xs.iter().copied().filter(|&x| x <= 0.0).collect();
            let want_sum: f64 = row.iter().map(|&x| (x as f64).exp()).sum();
            let sum = exp_in_place::on(path, &mut row, 0.0);
            let rel = |a: f32, b: f64| ((a as f64 - b) / b).abs();
            assert!(
                rel(sum, want_sum) < 1e-5,
                "{path:?}: sum {sum} vs {want_sum}"
            );
            let small = &xs[100_000..100_037];
            let s: f64 = small.iter().map(|&x| (x as f64 - 0.5).exp()).sum();
            assert!(
                rel(sum_exp::on(path, small, 0.5), s) < 1e-6,
                "{path:?}: sum_exp"
            );
            assert_eq!(max::on(path, small), small[36]);
            assert_eq!(max::on(path, &xs), MAX_IN);
            assert_eq!(max::on(path, &[]), f32::NEG_INFINITY);
            exp_in_place::on(path, &mut above, 0.0);
            assert_eq!(above, [f32::INFINITY; 2], "{path:?}");
            println!("{path:?}: worst relative error {worst:.2e}");
        }
    }
}
