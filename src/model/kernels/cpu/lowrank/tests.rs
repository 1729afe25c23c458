//! The skinny products on every path against f64 sums.
#![cfg(test)]

use super::*;

fn data(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

fn paths() -> Vec<Path> {
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut p = vec![Path::Portable];
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        p.push(Path::Avx512);
    }
    p
}

/// Both paths (gemm; the AVX-512 kernels where the CPU has them) against f64 sums, at sizes
/// with and without whole vectors and 64-column blocks, ranks 1–13 (groups of 8/4/1 and their
/// remainders), row counts that split over several tasks.
#[test]
fn products_match_f64_on_every_path() {
    for &(n, k, r) in &[
        (1, 1, 1),
        (5, 31, 3),
        (37, 64, 8),
        (70, 100, 13),
        (600, 130, 4),
    ] {
        let (x, w, h, base) = (
            data(n * k, 1),
            data(r * k, 2),
            data(n * r, 3),
            data(n * k, 5),
        );
        for p in paths() {
            let close = |got: f32, want: f64, what: &str| {
                let ok = (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs());
                assert!(ok, "{p:?} {what} ({n},{k},{r}): {got} vs {want}");
            };
            let mut out = vec![f32::NAN; n * r];
            dots_on(p, &x, &w, &mut out, (n, k, r), 0.5).unwrap();
            for i in 0..n {
                for j in 0..r {
                    let s: f64 = (0..k)
                        .map(|c| x[i * k + c] as f64 * w[j * k + c] as f64)
                        .sum();
                    close(out[i * r + j], 0.5 * s, "dots");
                }
            }
            for acc in [false, true] {
                let mut out = if acc {
                    base.clone()
                } else {
                    vec![f32::NAN; n * k]
                };
                update_on(p, &h, &w, &mut out, (n, r, k), (2.0, acc)).unwrap();
                for i in 0..n {
                    for c in 0..k {
                        let s: f64 = (0..r)
                            .map(|j| h[i * r + j] as f64 * w[j * k + c] as f64)
                            .sum();
                        let want = 2.0 * s + if acc { base[i * k + c] as f64 } else { 0.0 };
                        close(out[i * k + c], want, "update");
                    }
                }
            }
            let mut out = vec![f32::NAN; r * k];
            reduce_on(p, &h, &x, &mut out, (n, r, k), 0.25).unwrap();
            for j in 0..r {
                for c in 0..k {
                    let s: f64 = (0..n)
                        .map(|i| h[i * r + j] as f64 * x[i * k + c] as f64)
                        .sum();
                    close(out[j * k + c], 0.25 * s, "reduce");
                }
            }
        }
        let t = transposed(&w, r, k);
        assert!((0..r).all(|j| (0..k).all(|c| t[c * r + j] == w[j * k + c])));
    }
}

/// A slice shorter than its matrix is an error naming it, on every path.
#[test]
fn short_slices_are_errors() {
    for p in paths() {
        let err = dots_on(p, &[0.0; 3], &[0.0; 4], &mut [0.0; 4], (2, 2, 2), 1.0).unwrap_err();
        assert!(err.to_string().contains("x holds 3 elements"), "{err}");
        let err = reduce_on(p, &[0.0; 4], &[0.0; 4], &mut [0.0; 3], (2, 2, 2), 1.0).unwrap_err();
        assert!(err.to_string().contains("out holds 3 elements"), "{err}");
    }
}
