//! AdamW with PyTorch's semantics (decoupled weight decay, bias-corrected moments), global-norm
//! gradient clipping, and the learning-rate schedule. State is plain tensors so checkpoints can
//! save and restore it exactly (candle-nn's AdamW keeps its moments private).

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor, Var};

use crate::model::Grads;

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    /// Decay rate of the first moment (the gradient's running mean). Default 0.9.
    pub beta1: f64,
    /// Decay rate of the second moment (the squared gradient's running mean). Default 0.999.
    pub beta2: f64,
    /// Added to the root of the second moment in the denominator, for stability. Default 1e-8.
    pub eps: f64,
    /// Decoupled weight decay: each step scales parameters by `1 - lr·weight_decay`. Default 0.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW over a fixed list of named f32 parameters. The moments live in two flat buffers and a
/// step updates every parameter with one set of element-wise ops over the concatenated
/// gradients (a few dozen kernels on a GPU, not ~14 per parameter tensor).
pub struct AdamW {
    params: Vec<(String, Var)>,
    /// (offset, length) of each parameter in the flat buffers.
    spans: Vec<(usize, usize)>,
    /// First and second moments of all parameters, concatenated (f32).
    m: Tensor,
    v: Tensor,
    /// Number of steps taken.
    pub step: usize,
    /// The hyper-parameters every step uses.
    pub config: AdamWConfig,
}

impl AdamW {
    /// An optimizer at step 0 with zeroed moments, on the device of the first parameter.
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let mut spans = Vec::with_capacity(params.len());
        let mut total = 0;
        for (_, p) in &params {
            spans.push((total, p.elem_count()));
            total += p.elem_count();
        }
        let device = params
            .first()
            .map_or(candle_core::Device::Cpu, |(_, p)| p.device().clone());
        // Two buffers: the CUDA step writes them in place.
        let m = Tensor::zeros(total, DType::F32, &device)?;
        let v = Tensor::zeros(total, DType::F32, &device)?;
        Ok(Self {
            params,
            spans,
            m,
            v,
            step: 0,
            config,
        })
    }

    /// Parameter `i`'s slice of a flat buffer, in the parameter's shape.
    fn part(&self, flat: &Tensor, i: usize) -> Result<Tensor> {
        let (offset, len) = self.spans[i];
        flat.narrow(0, offset, len)?
            .reshape(self.params[i].1.shape())
    }

    /// The named parameters it updates, in the order of its buffers and gradient lists.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// The gradients of this optimizer's parameters in `grads` (detached), in parameter order.
    pub fn collect(&self, grads: &Grads) -> Result<Vec<Option<Tensor>>> {
        self.params.iter().map(|(_, p)| grads.get(p)).collect()
    }

    /// Adds `scale · grads` into `acc` (gradient accumulation over micro-batches).
    pub fn accumulate(&self, acc: &mut [Option<Tensor>], grads: &Grads, scale: f64) -> Result<()> {
        for (slot, (_, p)) in acc.iter_mut().zip(&self.params) {
            if let Some(g) = grads.get(p)? {
                let g = (g * scale)?;
                *slot = Some(match slot.take() {
                    Some(prev) => (prev + g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    /// Global L2 norm of `grads` (missing gradients count as zero).
    /// One read-back for all tensors (a GPU syncs once, not once per tensor).
    pub fn grad_norm(grads: &[Option<Tensor>]) -> Result<f64> {
        let sums = grads
            .iter()
            .flatten()
            .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all())
            .collect::<Result<Vec<_>>>()?;
        if sums.is_empty() {
            return Ok(0.0);
        }
        let total: Vec<f32> = Tensor::stack(&sums, 0)?.to_vec1()?;
        Ok(total.iter().map(|&x| x as f64).sum::<f64>().sqrt())
    }

    /// One update with learning rate `lr` from `grads` (in parameter order, see [`AdamW::collect`]);
    /// gradients are multiplied by `grad_scale` first (clipping). Parameters without a gradient
    /// keep their value and moments.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64, grad_scale: f64) -> Result<()> {
        if self.params.is_empty() {
            return Ok(());
        }
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        #[cfg(feature = "cuda")]
        if self.m.device().is_cuda() && crate::model::kernels::cuda::adamw_on() {
            return self.step_cuda(grads, lr, grad_scale, (bc1, bc2));
        }
        self.step_composed(grads, lr, grad_scale, (bc1, bc2))
    }

    /// The step as one launch over every tensor with a gradient (`kernels::cuda::adamw`).
    #[cfg(feature = "cuda")]
    fn step_cuda(
        &mut self,
        grads: &[Option<Tensor>],
        lr: f64,
        grad_scale: f64,
        bias_corrections: (f64, f64),
    ) -> Result<()> {
        let c = self.config;
        let present = (0..self.params.len())
            .filter_map(|i| match grads.get(i) {
                Some(Some(g)) => Some(
                    g.to_dtype(DType::F32)
                        .and_then(|g| g.contiguous())
                        .map(|g| (i, g)),
                ),
                _ => None,
            })
            .collect::<Result<Vec<_>>>()?;
        let items: Vec<_> = present
            .iter()
            .map(|(i, g)| (self.params[*i].1.as_tensor(), g, self.spans[*i].0))
            .collect();
        let step = crate::model::kernels::cuda::AdamWStep {
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            lr,
            weight_decay: c.weight_decay,
            bias_corrections,
            grad_scale,
        };
        crate::model::kernels::cuda::adamw(&items, &self.m, &self.v, step)
    }

    /// The step from Candle's element-wise ops over the concatenated gradients and parameters
    /// (every device; on CUDA with `FINETUNE_CUDA_ADAMW=0`, and for the tests to compare).
    /// `bias_corrections`: 1 − β₁ᵗ and 1 − β₂ᵗ of the step (counted by the caller).
    pub fn step_composed(
        &mut self,
        grads: &[Option<Tensor>],
        lr: f64,
        grad_scale: f64,
        (bc1, bc2): (f64, f64),
    ) -> Result<()> {
        let c = self.config;
        let present: Vec<bool> = (0..self.params.len())
            .map(|i| matches!(grads.get(i), Some(Some(_))))
            .collect();
        // Missing gradients count as zeros in the flat math; those parameters are restored below.
        let flat_grads = self
            .params
            .iter()
            .enumerate()
            .map(|(i, (_, p))| match grads.get(i) {
                Some(Some(g)) => g.to_dtype(DType::F32)?.flatten_all(),
                _ => Tensor::zeros(p.elem_count(), DType::F32, p.device()),
            })
            .collect::<Result<Vec<_>>>()?;
        let mut g = Tensor::cat(&flat_grads, 0)?;
        if grad_scale != 1.0 {
            g = (g * grad_scale)?;
        }
        let m = ((&self.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
        let v = ((&self.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
        let denom = ((&v / bc2)?.sqrt()? + c.eps)?;
        let update = ((&m / bc1)? / denom)?;
        let flat_params = self
            .params
            .iter()
            .map(|(_, p)| p.as_tensor().flatten_all())
            .collect::<Result<Vec<_>>>()?;
        let mut next = Tensor::cat(&flat_params, 0)?;
        if c.weight_decay > 0.0 {
            next = (next * (1.0 - lr * c.weight_decay))?;
        }
        let next = (next - (update * lr)?)?;
        for (i, (_, p)) in self.params.iter().enumerate() {
            if present[i] {
                p.set(&self.part(&next, i)?)?;
            }
        }
        if present.iter().all(|&x| x) {
            self.m = m;
            self.v = v;
        } else {
            // Keep the old moments of parameters that had no gradient.
            let pick = |new: &Tensor, old: &Tensor| -> Result<Tensor> {
                let parts = (0..self.params.len())
                    .map(|i| {
                        let (offset, len) = self.spans[i];
                        if present[i] { new } else { old }.narrow(0, offset, len)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&parts, 0)
            };
            let (m, v) = (pick(&m, &self.m)?, pick(&v, &self.v)?);
            self.m = m;
            self.v = v;
        }
        Ok(())
    }

    /// Moments as named host tensors (`<param>.exp_avg`, `<param>.exp_avg_sq`) for checkpoints.
    /// Each flat buffer comes to the host once and is sliced there: a slice of a GPU buffer
    /// would copy the whole buffer to the host each time it is written.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let (m, v) = (
            self.m.to_device(&Device::Cpu)?,
            self.v.to_device(&Device::Cpu)?,
        );
        let mut out = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.insert(format!("{name}.exp_avg"), self.part(&m, i)?);
            out.insert(format!("{name}.exp_avg_sq"), self.part(&v, i)?);
        }
        Ok(out)
    }

    /// Restores moments saved by [`AdamW::state_tensors`] and the step count.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        let mut m = Vec::with_capacity(self.params.len());
        let mut v = Vec::with_capacity(self.params.len());
        for (name, p) in &self.params {
            for (suffix, out) in [("exp_avg", &mut m), ("exp_avg_sq", &mut v)] {
                let key = format!("{name}.{suffix}");
                let t = state.get(&key).ok_or_else(|| {
                    candle_core::Error::Msg(format!("optimizer state has no {key}"))
                })?;
                if t.dims() != p.dims() {
                    candle_core::bail!("optimizer state {key} has shape {:?}", t.dims());
                }
                out.push(
                    t.to_dtype(DType::F32)?
                        .to_device(p.device())?
                        .flatten_all()?,
                );
            }
        }
        if !m.is_empty() {
            self.m = Tensor::cat(&m, 0)?;
            self.v = Tensor::cat(&v, 0)?;
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn collected_gradients_carry_no_graph() {
        // d(a·w)/da = w: Candle stores that product for the leaf `a` with `w`'s graph attached.
        // Kept in the AdamW moments, it would keep every step's graph alive on the device.
        let a = Var::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let w = Var::new(&[3f32, 4.0], &Device::Cpu).unwrap();
        let loss = (a.as_tensor() * w.as_tensor()).unwrap().sum_all().unwrap();
        let store = loss.backward().unwrap();
        assert!(
            store.get(&a).unwrap().track_op(),
            "the premise: Candle's gradient has a graph"
        );
        let opt = AdamW::new(vec![("a".into(), a.clone())], AdamWConfig::default()).unwrap();
        let store = Grads::from(store);
        let grads = opt.collect(&store).unwrap();
        let g = grads[0].as_ref().unwrap();
        assert!(!g.track_op());
        assert_eq!(g.to_vec1::<f32>().unwrap(), vec![3.0, 4.0]);
        let mut acc = vec![None];
        opt.accumulate(&mut acc, &store, 0.5).unwrap();
        assert!(!acc[0].as_ref().unwrap().track_op());
    }

    #[test]
    fn matches_pytorch_adamw_by_hand() {
        // One parameter x=1 with loss x², lr 0.1, wd 0.01: torch.optim.AdamW gives
        // x1 = 1·(1-0.001) - 0.1·(g/(|g|+eps)) = 0.999 - 0.1 = 0.899 (first step: m̂/√v̂ = sign(g)).
        let x = Var::new(&[1f32], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(
            vec![("x".into(), x.clone())],
            AdamWConfig {
                weight_decay: 0.01,
                ..Default::default()
            },
        )
        .unwrap();
        let store = x.as_tensor().sqr().unwrap().sum_all().unwrap();
        let grads = opt
            .collect(&Grads::from(store.backward().unwrap()))
            .unwrap();
        assert!((AdamW::grad_norm(&grads).unwrap() - 2.0).abs() < 1e-6);
        opt.step(&grads, 0.1, 1.0).unwrap();
        let v = x.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((v - 0.899).abs() < 1e-6, "{v}");
        let saved = opt.state_tensors().unwrap();
        assert_eq!(saved.len(), 2);
        let mut other = AdamW::new(vec![("x".into(), x.clone())], opt.config).unwrap();
        other.load_state(&saved, 1).unwrap();
        assert_eq!(other.step, 1);
    }

    #[test]
    fn one_flat_step_equals_per_parameter_steps_and_skips_missing_gradients() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::randn(0f32, 1., (3, 4), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 1., 5, &dev).unwrap()).unwrap();
        let c = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 2), &dev).unwrap()).unwrap();
        let cfg = AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        };
        let copy = |v: &Var| Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap();
        let (a1, b1, c1) = (copy(&a), copy(&b), copy(&c));
        let mut all = AdamW::new(
            vec![
                ("a".into(), a.clone()),
                ("b".into(), b.clone()),
                ("c".into(), c.clone()),
            ],
            cfg,
        )
        .unwrap();
        let mut alone_a = AdamW::new(vec![("a".into(), a1.clone())], cfg).unwrap();
        let mut alone_b = AdamW::new(vec![("b".into(), b1.clone())], cfg).unwrap();
        for step in 0..3 {
            let ga = Tensor::randn(0f32, 1., (3, 4), &dev).unwrap();
            let gb = Tensor::randn(0f32, 1., 5, &dev).unwrap();
            // c never gets a gradient.
            all.step(&[Some(ga.clone()), Some(gb.clone()), None], 1e-2, 0.5)
                .unwrap();
            alone_a.step(&[Some(ga)], 1e-2, 0.5).unwrap();
            alone_b.step(&[Some(gb)], 1e-2, 0.5).unwrap();
            let bits = |t: &Tensor| -> Vec<u32> {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            };
            assert_eq!(bits(a.as_tensor()), bits(a1.as_tensor()), "step {step}");
            assert_eq!(bits(b.as_tensor()), bits(b1.as_tensor()), "step {step}");
            assert_eq!(bits(c.as_tensor()), bits(c1.as_tensor()), "c must not move");
        }
        let state = all.state_tensors().unwrap();
        let zeros = state["c.exp_avg"].abs().unwrap().sum_all().unwrap();
        assert_eq!(zeros.to_scalar::<f32>().unwrap(), 0.0);
        let a_state = alone_a.state_tensors().unwrap();
        assert_eq!(
            state["a.exp_avg_sq"].to_vec2::<f32>().unwrap(),
            a_state["a.exp_avg_sq"].to_vec2::<f32>().unwrap()
        );
    }

    #[test]
    fn saved_moments_are_the_bytes_the_per_parameter_slices_gave() {
        // Checkpoints used to serialise `narrow` views of the flat buffers on their device; the
        // host copy sliced once must write the very same file.
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::randn(0f32, 1., (3, 4), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 1., 5, &dev).unwrap()).unwrap();
        let mut opt = AdamW::new(
            vec![("a".into(), a.clone()), ("b".into(), b.clone())],
            AdamWConfig::default(),
        )
        .unwrap();
        let ga = Tensor::randn(0f32, 1., (3, 4), &dev).unwrap();
        let gb = Tensor::randn(0f32, 1., 5, &dev).unwrap();
        opt.step(&[Some(ga), Some(gb)], 1e-2, 1.0).unwrap();
        let mut before = HashMap::new();
        for (i, (name, _)) in opt.params.iter().enumerate() {
            before.insert(format!("{name}.exp_avg"), opt.part(&opt.m, i).unwrap());
            before.insert(format!("{name}.exp_avg_sq"), opt.part(&opt.v, i).unwrap());
        }
        let now = opt.state_tensors().unwrap();
        assert_eq!(
            safetensors::tensor::serialize(before, None).unwrap(),
            safetensors::tensor::serialize(now, None).unwrap()
        );
    }
}
