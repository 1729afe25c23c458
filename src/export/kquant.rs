//! The k-quant quantizers of the GGUF export (Q4_K, Q5_K, Q6_K), following ggml's reference
//! quantizers as today's llama.cpp runs them (`llama-quantize` without an importance matrix), so
//! an exported Q4_K_M holds the bytes llama.cpp's own quantizer would write.
//!
//! Candle's quantizers for these types follow ggml's first k-quant code: Q4_K and Q5_K fit each
//! 32-weight group's scale and minimum with a few refinement passes (its Q5_K comes out with 1.8×
//! the RMS error of llama.cpp's on SmolLM2-135M) and Q6_K refines rather than searches
//! (4.6% more RMS error). Today's algorithm:
//! - Q4_K / Q5_K: each group's (scale, min) by a weighted least-squares search over candidate
//!   inverse scales (`make_qkx2_quants`: weights `rms(group) + |x|`; Q4_K tries 21 steps from
//!   −1.0, Q5_K 16 from −0.5, both 0.1 apart), then the 8 scales and mins of a block as 6-bit
//!   integers of one f16 scale each;
//! - Q6_K: each 16-weight group's scale by a search over 18 perturbed inverse scales around the
//!   largest-magnitude weight (`make_qx_quants`, weights x²), then 8-bit scales of one f16.
//!
//! Rounding is to nearest, ties to even, as ggml's `nearest_int` does. Blocks are laid out as
//! ggml's `block_q4_K`, `block_q5_K` and `block_q6_K`; Candle's dequantizer reads them.

use std::borrow::Cow;

use rayon::prelude::*;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};
use half::f16;

/// Weights per block.
const QK_K: usize = 256;
/// Below this, a group counts as all zeros.
const GROUP_MAX_EPS: f32 = 1e-15;

fn nearest_int(v: f32) -> i32 {
    v.round_ties_even() as i32
}

/// A group's scale and minimum so that `x ≈ scale·L − min`, `L` in `0..=nmax`, written to `l`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.iter_mut().for_each(|v| *v = 0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let (w, q) = (weights[i], q as f32);
            sum_l += w * q;
            sum_l2 += w * q * q;
            sum_xl += w * q * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l.copy_from_slice(laux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// A group's symmetric scale so that `x ≈ scale·(L − nmax)`, `L` in `0..2·nmax`, weights x².
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l.iter_mut().for_each(|v| *v = 0);
        return 0.0;
    }
    let fit = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for &v in x {
            let q = nearest_int(iscale * v).clamp(-nmax, nmax - 1) as f32;
            let w = v * v;
            sumlx += w * v * q;
            suml2 += w * q * q;
        }
        (sumlx, suml2)
    };
    let store = |iscale: f32, l: &mut [i8]| {
        for (o, &v) in l.iter_mut().zip(x) {
            *o = (nearest_int(iscale * v).clamp(-nmax, nmax - 1) + nmax) as i8;
        }
    };
    let iscale = -(nmax as f32) / max;
    let (sumlx, suml2) = fit(iscale);
    store(iscale, l);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = fit(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            store(iscale, l);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// The weights of `make_qkx2_quants` for a 32-weight group: its RMS plus each |x|.
fn group_weights(x: &[f32], w: &mut [f32]) {
    let sum_x2: f32 = x.iter().fold(0.0, |s, v| s + v * v);
    let av_x = (sum_x2 / x.len() as f32).sqrt();
    for (w, v) in w.iter_mut().zip(x) {
        *w = av_x + v.abs();
    }
}

/// Packs 8 six-bit scales and mins into ggml's 12 bytes.
fn pack_scales_mins(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
    s
}

/// ggml's `get_scale_min_k4`.
fn scale_min(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// One block of Q4_K (`nmax` 15) or Q5_K (`nmax` 31): the block's d, dmin, scales and the
/// 256 integer levels.
fn scale_min_block(
    x: &[f32],
    nmax: i32,
    rmin: f32,
    nstep: i32,
) -> (f16, f16, [u8; 12], [u8; QK_K]) {
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 32];
    let mut weights = [0f32; 32];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..8 {
        let g = &x[32 * j..32 * j + 32];
        group_weights(g, &mut weights);
        let (s, m) = make_qkx2_quants(
            nmax,
            g,
            &weights,
            &mut l[32 * j..32 * j + 32],
            &mut laux,
            rmin,
            0.1,
            nstep,
        );
        scales[j] = s;
        mins[j] = m;
        max_scale = max_scale.max(s);
        max_min = max_min.max(m);
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        ls[j] = nearest_int(inv_scale * scales[j]).min(63) as u8;
        lm[j] = nearest_int(inv_min * mins[j]).min(63) as u8;
    }
    let packed = pack_scales_mins(&ls, &lm);
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    for j in 0..8 {
        let (sc, m) = scale_min(j, &packed);
        let dj = d.to_f32() * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for ii in 0..32 {
            let q = nearest_int((x[32 * j + ii] + dm) / dj).clamp(0, nmax);
            l[32 * j + ii] = q as u8;
        }
    }
    (d, dmin, packed, l)
}

/// Q4_K blocks (144 bytes each) of `x`.
pub fn quantize_q4k(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / QK_K * 144);
    for b in x.chunks_exact(QK_K) {
        let (d, dmin, scales, l) = scale_min_block(b, 15, -1.0, 20);
        out.extend_from_slice(&d.to_le_bytes());
        out.extend_from_slice(&dmin.to_le_bytes());
        out.extend_from_slice(&scales);
        for j in (0..QK_K).step_by(64) {
            for i in 0..32 {
                out.push(l[j + i] | (l[j + i + 32] << 4));
            }
        }
    }
    out
}

/// Q5_K blocks (176 bytes each) of `x`.
pub fn quantize_q5k(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / QK_K * 176);
    for b in x.chunks_exact(QK_K) {
        let (d, dmin, scales, l) = scale_min_block(b, 31, -0.5, 15);
        let mut qh = [0u8; 32];
        let mut qs = [0u8; 128];
        let (mut m1, mut m2) = (1u8, 2u8);
        for (k, n) in (0..QK_K).step_by(64).enumerate() {
            for j in 0..32 {
                let (mut l1, mut l2) = (l[n + j], l[n + j + 32]);
                if l1 > 15 {
                    l1 -= 16;
                    qh[j] |= m1;
                }
                if l2 > 15 {
                    l2 -= 16;
                    qh[j] |= m2;
                }
                qs[32 * k + j] = l1 | (l2 << 4);
            }
            m1 = m1.wrapping_shl(2);
            m2 = m2.wrapping_shl(2);
        }
        out.extend_from_slice(&d.to_le_bytes());
        out.extend_from_slice(&dmin.to_le_bytes());
        out.extend_from_slice(&scales);
        out.extend_from_slice(&qh);
        out.extend_from_slice(&qs);
    }
    out
}

/// Q6_K blocks (210 bytes each) of `x`.
pub fn quantize_q6k(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / QK_K * 210);
    for b in x.chunks_exact(QK_K) {
        let mut l = [0i8; QK_K];
        let mut scales = [0f32; QK_K / 16];
        let (mut max_scale, mut max_abs) = (0.0f32, 0.0f32);
        for (ib, s) in scales.iter_mut().enumerate() {
            *s = make_qx_quants(32, &b[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
            if s.abs() > max_abs {
                max_abs = s.abs();
                max_scale = *s;
            }
        }
        if max_abs < GROUP_MAX_EPS {
            out.extend(std::iter::repeat_n(0u8, 210));
            continue;
        }
        let iscale = -128.0 / max_scale;
        let d = f16::from_f32(1.0 / iscale);
        let mut sc = [0i8; QK_K / 16];
        for (o, s) in sc.iter_mut().zip(&scales) {
            *o = nearest_int(iscale * s).min(127) as i8;
        }
        for (j, &s) in sc.iter().enumerate() {
            let dj = d.to_f32() * s as f32;
            if dj == 0.0 {
                continue;
            }
            for ii in 0..16 {
                let q = nearest_int(b[16 * j + ii] / dj).clamp(-32, 31);
                l[16 * j + ii] = (q + 32) as i8;
            }
        }
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        for (k, j) in (0..QK_K).step_by(128).enumerate() {
            for i in 0..32 {
                let q = |o: usize| l[j + i + o] as u8;
                ql[64 * k + i] = (q(0) & 0xF) | ((q(64) & 0xF) << 4);
                ql[64 * k + i + 32] = (q(32) & 0xF) | ((q(96) & 0xF) << 4);
                qh[32 * k + i] =
                    (q(0) >> 4) | ((q(32) >> 4) << 2) | ((q(64) >> 4) << 4) | ((q(96) >> 4) << 6);
            }
        }
        out.extend_from_slice(&ql);
        out.extend_from_slice(&qh);
        out.extend(sc.iter().map(|&s| s as u8));
        out.extend_from_slice(&d.to_le_bytes());
    }
    out
}

/// `t` (rows, cols) quantized to `ty`: the k-quants here, every other type by Candle.
pub fn quantize(t: &Tensor, ty: GgmlDType) -> candle_core::Result<QTensor> {
    let f: fn(&[f32]) -> Vec<u8> = match ty {
        GgmlDType::Q4K => quantize_q4k,
        GgmlDType::Q5K => quantize_q5k,
        GgmlDType::Q6K => quantize_q6k,
        _ => return QTensor::quantize(t, ty),
    };
    let cols = t.dims().last().copied().unwrap_or(0);
    if !cols.is_multiple_of(QK_K) {
        candle_core::bail!("rows of {cols} do not split into {QK_K}-weight blocks");
    }
    let x: Vec<f32> = t
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    // Blocks are independent: quantized on every core in runs of 64 blocks, joined in order (the
    // same bytes as one pass; an 8B model's weights take minutes on one core).
    let bytes: Vec<u8> = x.par_chunks(QK_K * 64).map(f).collect::<Vec<_>>().concat();
    let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, ty)?;
    QTensor::new(storage, t.shape().clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Weights shaped like a trained matrix: mostly small, some outliers, some exact zeros.
    fn weights(n: usize) -> Vec<f32> {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                match i % 97 {
                    0 => u * 0.8,
                    1 => 0.0,
                    _ => u * 0.05,
                }
            })
            .collect()
    }

    fn rmse(ty: GgmlDType, q: &QTensor, x: &[f32]) -> f64 {
        assert_eq!(q.dtype(), ty);
        let back: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let se: f64 = back
            .iter()
            .zip(x)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        (se / x.len() as f64).sqrt()
    }

    #[test]
    fn k_quants_round_trip_through_candles_dequantizer_with_less_error() {
        let x = weights(8 * QK_K * 4);
        let t = Tensor::from_vec(x.clone(), (8, QK_K * 4), &Device::Cpu).unwrap();
        let signal = (x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / x.len() as f64).sqrt();
        // Relative error bounds from the levels each type has (16, 32, 64 per group).
        for (ty, bound) in [
            (GgmlDType::Q4K, 0.12),
            (GgmlDType::Q5K, 0.06),
            (GgmlDType::Q6K, 0.035),
        ] {
            let ours = rmse(ty, &quantize(&t, ty).unwrap(), &x);
            let candle = rmse(ty, &QTensor::quantize(&t, ty).unwrap(), &x);
            eprintln!(
                "{ty:?}: rmse/signal ours {:.4}, candle {:.4}",
                ours / signal,
                candle / signal
            );
            // The layout is right (the error is that of a quantizer, not of misplaced bits) and
            // the search does at least as well as Candle's refinement.
            assert!(
                ours < bound * signal,
                "{ty:?}: rmse {ours} of signal {signal}"
            );
            assert!(
                ours <= candle * 1.0001,
                "{ty:?}: ours {ours} vs candle {candle}"
            );
        }
    }

    #[test]
    fn zero_blocks_stay_zero() {
        let x = vec![0f32; QK_K];
        let t = Tensor::from_vec(x.clone(), (1, QK_K), &Device::Cpu).unwrap();
        for ty in [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
            assert_eq!(rmse(ty, &quantize(&t, ty).unwrap(), &x), 0.0);
        }
    }

    #[test]
    fn nearest_int_ties_to_even_like_ggml() {
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(3.5), 4);
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(-0.4), 0);
    }
}
