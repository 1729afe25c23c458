//! Constant inputs of the forward pass: the RoPE tables and the additive attention bias. The
//! differentiable ops themselves are chosen and run by [`super::kernels`].

use std::sync::Mutex;

use candle_core::{DType, Device, Result, Tensor};

use super::config::RopeScaling;

/// Rotary embedding tables `(cos, sin)`, each `(max_positions, Dh)` in f32, laid out as
/// transformers does (`cat(freqs, freqs)`, rotate-half convention).
pub fn rope_tables(
    head_dim: usize,
    theta: f64,
    scaling: &RopeScaling,
    max_positions: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let freqs = RopeFreqs::new(head_dim, theta, scaling, false)?;
    let positions: Vec<u32> = (0..max_positions as u32).collect();
    freqs.tables(&positions, DType::F32, device)
}

/// RoPE's inverse frequencies and the scale of its cos and sin: the rows of any positions are
/// computed when a pass needs them (a 128k-context model keeps no 128k-row table); the rows
/// 0..n of the longest pass so far stay on its device for the passes after it.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeFreqs {
    /// One per rotary pair, rounded to f32 as transformers computes them.
    inv_freq: Vec<f32>,
    /// LongRoPE's attention factor (1 otherwise).
    magnitude: f32,
    cache: TableCache,
}

/// The `(cos, sin)` rows 0..n already made, per dtype and device: a 4096-token pass otherwise
/// computes half a million sines on the host and uploads them every step.
#[derive(Default)]
struct TableCache(Mutex<Vec<Tables>>);

struct Tables {
    dtype: DType,
    device: Device,
    cos: Tensor,
    sin: Tensor,
}

impl Clone for TableCache {
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// A cache is not part of the value.
impl PartialEq for TableCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for TableCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TableCache")
    }
}

impl RopeFreqs {
    /// The frequencies of `head_dim` rotary dims with base `theta` and `scaling`; `long` picks
    /// LongRoPE's long factors (a pass past the original context).
    pub fn new(head_dim: usize, theta: f64, scaling: &RopeScaling, long: bool) -> Result<Self> {
        let half = head_dim / 2;
        let mut magnitude = 1f32;
        let mut inv_freq: Vec<f64> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
            .collect();
        match scaling {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                attention_factor,
                ..
            } => {
                // transformers `_compute_longrope_parameters`: 1 / (factor_i · θ^(2i/d)), the factors
                // in f32; cos and sin scaled by the attention factor.
                let factors = if long { long_factor } else { short_factor };
                if factors.len() != half {
                    candle_core::bail!(
                        "longrope has {} factors for {half} rotary frequencies; the config does not fit the model",
                        factors.len()
                    );
                }
                for (f, k) in inv_freq.iter_mut().zip(factors) {
                    *f /= f64::from(*k as f32);
                }
                magnitude = *attention_factor as f32;
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_ctx,
            } => {
                // transformers `_compute_llama3_parameters`: long wavelengths are divided by `factor`,
                // short ones kept, and the band between interpolated smoothly.
                let low_freq_wavelen = old_ctx / low_freq_factor;
                let high_freq_wavelen = old_ctx / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen > low_freq_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_freq_wavelen {
                        let smooth = (old_ctx / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        // transformers computes inv_freq in f32; round it the same way so angles match at long
        // context.
        Ok(Self {
            inv_freq: inv_freq.iter().map(|&f| f as f32).collect(),
            magnitude,
            cache: TableCache::default(),
        })
    }

    /// Rotary dims (twice the frequencies).
    pub fn dim(&self) -> usize {
        2 * self.inv_freq.len()
    }

    /// `(cos, sin)` of position `p`, each [`RopeFreqs::dim`] long.
    pub fn row(&self, p: usize) -> (Vec<f32>, Vec<f32>) {
        let mut cos = Vec::with_capacity(self.dim());
        let mut sin = Vec::with_capacity(self.dim());
        for _ in 0..2 {
            for &f in &self.inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos() * self.magnitude);
                sin.push(angle.sin() * self.magnitude);
            }
        }
        (cos, sin)
    }

    /// `(cos, sin)` rows of positions `start..start + n`, each `(n, dim)` in `dtype` on `device`:
    /// views of the kept rows (made once, 256 or a power of two of them), the same values as
    /// [`RopeFreqs::tables`].
    pub fn range_tables(
        &self,
        start: usize,
        n: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let end = start + n;
        let Ok(mut kept) = self.cache.0.lock() else {
            let positions: Vec<u32> = (start as u32..end as u32).collect();
            return self.tables(&positions, dtype, device);
        };
        let fits = |t: &Tables| t.dtype == dtype && t.device.same_device(device);
        let hit = kept
            .iter()
            .position(|t| fits(t) && t.cos.dim(0).is_ok_and(|r| r >= end));
        let at = match hit {
            Some(at) => at,
            None => {
                let rows = end.next_power_of_two().max(256);
                let positions: Vec<u32> = (0..rows as u32).collect();
                let (cos, sin) = self.tables(&positions, dtype, device)?;
                kept.retain(|t| !fits(t));
                kept.push(Tables {
                    dtype,
                    device: device.clone(),
                    cos,
                    sin,
                });
                kept.len() - 1
            }
        };
        let t = &kept[at];
        Ok((t.cos.narrow(0, start, n)?, t.sin.narrow(0, start, n)?))
    }

    /// `(cos, sin)` rows of `positions`, each `(n, dim)` in `dtype` on `device`.
    pub fn tables(
        &self,
        positions: &[u32],
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let n = positions.len();
        let mut cos = Vec::with_capacity(n * self.dim());
        let mut sin = Vec::with_capacity(n * self.dim());
        for &p in positions {
            let (c, s) = self.row(p as usize);
            cos.extend(c);
            sin.extend(s);
        }
        let shape = (n, self.dim());
        Ok((
            Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
        ))
    }
}

/// Additive attention bias `(B, 1, T, T)`: 0 where query i may see key j (j ≤ i and both in the
/// same segment), -inf elsewhere. Segment 0 (padding) tokens see only themselves, so no row is
/// all -inf. `segment_ids` is `B*T` row-major; `None` means one segment per row (plain causal).
/// Built on `device` from the positions and segment ids (only those are copied there): a T × T
/// mask made on the host cost a 4096-token step tens of milliseconds and a blocking upload.
pub fn attention_bias(
    batch: usize,
    seq_len: usize,
    segment_ids: Option<&[u32]>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let t = seq_len;
    let Some(seg) = segment_ids else {
        return causal_bias(t, dtype, device);
    };
    let causal = visible_after(0, t, None, device)?;
    let seg = Tensor::from_slice(seg, (batch, t), device)?;
    // (B, T, T): both in one segment.
    let same = seg.unsqueeze(2)?.broadcast_eq(&seg.unsqueeze(1)?)?;
    // A padding token (segment 0) sees itself only.
    let keys = Tensor::arange(0u32, t as u32, device)?;
    let diagonal = keys.unsqueeze(1)?.broadcast_eq(&keys.unsqueeze(0)?)?;
    let real = seg.ne(0u32)?.unsqueeze(2)?; // (B, T, 1)
    let allowed = real.broadcast_maximum(&diagonal)?; // (B, T, T)
    let visible = same.mul(&allowed)?.broadcast_mul(&causal)?.unsqueeze(1)?;
    additive(&visible, dtype)
}

/// The plain causal bias `(1, 1, T, T)`, made once for a length, dtype and device and kept for the
/// next passes (the last one made): every step of a run attends with it, and making it is a
/// compare, a cast and a log over T² elements, then (on CUDA) the flash kernels' pass sorting its
/// tiles, which they keep per bias. Kept between steps, it adds nothing to a step's peak, which
/// holds it anyway.
fn causal_bias(t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    static KEPT: Mutex<Option<(usize, DType, Device, Tensor)>> = Mutex::new(None);
    let mut kept = KEPT
        .lock()
        .map_err(|_| candle_core::Error::Msg("the causal bias cache was poisoned".into()))?;
    if let Some((kt, kd, kdev, bias)) = kept.as_ref() {
        if *kt == t && *kd == dtype && kdev.same_device(device) {
            return Ok(bias.clone());
        }
    }
    // The previous one goes before the next is made, so the two are never held together.
    *kept = None;
    let bias = causal_bias_after(0, t, dtype, device)?;
    *kept = Some((t, dtype, device.clone(), bias.clone()));
    Ok(bias)
}

/// Additive causal bias `(1, 1, T, past + T)` for `T` new queries after `past` cached keys: query
/// i (at position past + i) sees keys 0..=past + i. With `past` = 0 it is [`attention_bias`]'s
/// plain causal mask; one new query sees every key (all zeros).
pub fn causal_bias_after(past: usize, t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    additive(
        &visible_after(past, t, None, device)?.reshape((1, 1, t, past + t))?,
        dtype,
    )
}

/// Additive band `(1, 1, T, past + T)` of a sliding-window layer: query i (at position past + i)
/// sees key j only when j > past + i − window (transformers' `sliding_window_overlay`); added to
/// the causal or packed bias.
pub fn sliding_band(
    past: usize,
    t: usize,
    window: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let band = visible_after(past, t, Some(window), device)?;
    additive(&band.reshape((1, 1, t, past + t))?, dtype)
}

/// `(T, past + T)` u8 on `device`: 1 where query i (at position past + i) sees key j — j ≤ past +
/// i, or with a `window`, j + window > past + i (the band alone).
fn visible_after(past: usize, t: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
    let (p, s) = (past as u32, (past + t) as u32);
    let queries = Tensor::arange(p, s, device)?.unsqueeze(1)?; // (T, 1)
    match window {
        None => Tensor::arange(0u32, s, device)?
            .unsqueeze(0)?
            .broadcast_le(&queries),
        Some(w) => {
            // A window past every key leaves the band all visible.
            let w = w.min((u32::MAX - s) as usize) as u32;
            Tensor::arange(w, w + s, device)?
                .unsqueeze(0)?
                .broadcast_gt(&queries)
        }
    }
}

/// 0 where `visible` (u8) is set, −∞ elsewhere, in `dtype`.
fn additive(visible: &Tensor, dtype: DType) -> Result<Tensor> {
    if visible.device().is_cuda() {
        // ln 1 = 0 and ln 0 = −∞: two element-wise passes. Candle's `where_cond` over the
        // broadcast operands took 0.44 ms for a 4096 × 4096 mask on an H100; the cast and the
        // log fell out of the step's 30 longest kernels (bench/results/h100-eighteenth-…).
        return visible.to_dtype(dtype)?.log();
    }
    let (shape, device) = (visible.shape(), visible.device());
    let zero = Tensor::zeros((), dtype, device)?.broadcast_as(shape)?;
    let masked = Tensor::full(f32::NEG_INFINITY, (), device)?
        .to_dtype(dtype)?
        .broadcast_as(shape)?;
    visible.where_cond(&zero, &masked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_bias_keeps_attention_inside_segments() {
        let seg = [1u32, 1, 2, 2, 0];
        let bias = attention_bias(1, 5, Some(&seg), DType::F32, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let visible = |i: usize, j: usize| bias[i * 5 + j] == 0.0;
        assert!(visible(1, 0) && visible(3, 2) && visible(4, 4));
        assert!(!visible(2, 1) && !visible(0, 1) && !visible(4, 3));
    }

    /// The masks as the host built them before (one element at a time), for comparison.
    fn host_bias(
        b: usize,
        past: usize,
        t: usize,
        seg: Option<&[u32]>,
        window: Option<usize>,
    ) -> Vec<f32> {
        let s = past + t;
        let mut out = vec![f32::NEG_INFINITY; b * t * s];
        for r in 0..b {
            for i in 0..t {
                for j in 0..s {
                    let q = past + i;
                    let mut seen = match window {
                        None => j <= q,
                        Some(w) => j + w > q,
                    };
                    if let Some(seg) = seg {
                        let (si, sj) = (seg[r * t + i], seg[r * t + j]);
                        seen &= si == sj && (si != 0 || i == j);
                    }
                    if seen {
                        out[(r * t + i) * s + j] = 0.0;
                    }
                }
            }
        }
        out
    }

    fn values(x: Tensor) -> Vec<f32> {
        x.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn device_built_masks_equal_the_element_wise_ones() {
        let dev = Device::Cpu;
        // Packed rows: documents of several lengths, padding (0) at the end and in between.
        let seg = [
            1u32, 1, 1, 2, 2, 3, 0, 0, //
            5, 5, 5, 5, 5, 5, 5, 5, //
            1, 0, 2, 2, 2, 0, 7, 7,
        ];
        for dtype in [DType::F32, DType::BF16] {
            let packed = attention_bias(3, 8, Some(&seg), dtype, &dev).unwrap();
            assert_eq!(packed.dims(), &[3, 1, 8, 8]);
            assert_eq!(values(packed), host_bias(3, 0, 8, Some(&seg), None));
            let plain = attention_bias(2, 7, None, dtype, &dev).unwrap();
            assert_eq!(plain.dims(), &[1, 1, 7, 7]);
            assert_eq!(values(plain), host_bias(1, 0, 7, None, None));
            for (past, t) in [(0, 5), (3, 1), (4, 3)] {
                let after = causal_bias_after(past, t, dtype, &dev).unwrap();
                assert_eq!(values(after), host_bias(1, past, t, None, None));
                for w in [1, 2, 4, 100] {
                    let band = sliding_band(past, t, w, dtype, &dev).unwrap();
                    assert_eq!(band.dims(), &[1, 1, t, past + t]);
                    assert_eq!(
                        values(band),
                        host_bias(1, past, t, None, Some(w)),
                        "{past} {t} {w}"
                    );
                }
            }
        }
    }

    /// The kept causal bias is never one of another length or dtype (other tests on other
    /// threads may replace it between these calls, so only the values are checked).
    #[test]
    fn the_kept_causal_bias_follows_length_and_dtype() {
        let dev = Device::Cpu;
        for (t, dtype) in [
            (5, DType::F32),
            (5, DType::F32),
            (3, DType::F32),
            (5, DType::BF16),
        ] {
            let bias = attention_bias(4, t, None, dtype, &dev).unwrap();
            assert_eq!((bias.dims(), bias.dtype()), (&[1, 1, t, t][..], dtype));
            assert_eq!(values(bias), host_bias(1, 0, t, None, None));
        }
    }

    #[test]
    fn causal_bias_after_a_cache_sees_the_past() {
        let bias = causal_bias_after(2, 2, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(bias.dims(), &[1, 1, 2, 4]);
        let rows = bias.reshape((2, 4)).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(rows[0][..3], [0.0; 3]);
        assert_eq!(rows[0][3], f32::NEG_INFINITY);
        assert_eq!(rows[1], [0.0; 4]);
        let fresh = causal_bias_after(0, 3, DType::F32, &Device::Cpu).unwrap();
        let plain = attention_bias(1, 3, None, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            fresh.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            plain.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies() {
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        // sin, not cos: at position 1 the low-frequency angles are ~1e-6 and cos rounds to 1.
        let (_, c0) = rope_tables(64, 500000.0, &RopeScaling::Default, 2, &Device::Cpu).unwrap();
        let (_, c1) = rope_tables(64, 500000.0, &s, 2, &Device::Cpu).unwrap();
        let (c0, c1) = (c0.to_vec2::<f32>().unwrap(), c1.to_vec2::<f32>().unwrap());
        // position 1, first frequency (short wavelength): unchanged; last: scaled by 1/8.
        assert_eq!(c0[1][0], c1[1][0]);
        assert!((c0[1][31] / c1[1][31] - 8.0).abs() < 1e-3);
    }
}
