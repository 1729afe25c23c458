//! Constant inputs of the forward pass: the RoPE tables and the additive attention bias. The
//! differentiable ops themselves are chosen and run by [`super::kernels`].

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
/// computed when a pass needs them (a 128k-context model keeps no 128k-row table).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeFreqs {
    /// One per rotary pair, rounded to f32 as transformers computes them.
    inv_freq: Vec<f32>,
    /// LongRoPE's attention factor (1 otherwise).
    magnitude: f32,
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
pub fn attention_bias(
    batch: usize,
    seq_len: usize,
    segment_ids: Option<&[u32]>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let t = seq_len;
    let rows = if segment_ids.is_some() { batch } else { 1 };
    let mut bias = vec![f32::NEG_INFINITY; rows * t * t];
    for b in 0..rows {
        for i in 0..t {
            for j in 0..=i {
                let visible = match segment_ids {
                    None => true,
                    Some(seg) => {
                        let (si, sj) = (seg[b * t + i], seg[b * t + j]);
                        si == sj && (si != 0 || i == j)
                    }
                };
                if visible {
                    bias[(b * t + i) * t + j] = 0.0;
                }
            }
        }
    }
    Tensor::from_vec(bias, (rows, 1, t, t), device)?.to_dtype(dtype)
}

/// Additive causal bias `(1, 1, T, past + T)` for `T` new queries after `past` cached keys: query
/// i (at position past + i) sees keys 0..=past + i. With `past` = 0 it is [`attention_bias`]'s
/// plain causal mask; one new query sees every key (all zeros).
pub fn causal_bias_after(past: usize, t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let s = past + t;
    let bias: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..s).map(move |j| {
                if j <= past + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(bias, (1, 1, t, s), device)?.to_dtype(dtype)
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
    let s = past + t;
    let band: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..s).map(move |j| {
                if j + window > past + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(band, (1, 1, t, s), device)?.to_dtype(dtype)
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
