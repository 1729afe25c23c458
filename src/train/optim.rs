//! AdamW with PyTorch's semantics (decoupled weight decay, bias-corrected moments), global-norm
//! gradient clipping, and the learning-rate schedule. State is plain tensors so checkpoints can
//! save and restore it exactly (candle-nn's AdamW keeps its moments private).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
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

/// AdamW over a fixed list of named f32 parameters.
pub struct AdamW {
    params: Vec<(String, Var)>,
    /// First and second moments, same shapes as the parameters (f32).
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Number of steps taken.
    pub step: usize,
    pub config: AdamWConfig,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let m = params
            .iter()
            .map(|(_, p)| p.zeros_like())
            .collect::<Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self {
            params,
            m,
            v,
            step: 0,
            config,
        })
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// The gradients of this optimizer's parameters in `store`, in parameter order.
    pub fn collect(&self, store: &GradStore) -> Vec<Option<Tensor>> {
        self.params
            .iter()
            .map(|(_, p)| store.get(p).cloned())
            .collect()
    }

    /// Adds `scale · store`'s gradients into `acc` (gradient accumulation over micro-batches).
    pub fn accumulate(
        &self,
        acc: &mut [Option<Tensor>],
        store: &GradStore,
        scale: f64,
    ) -> Result<()> {
        for (slot, (_, p)) in acc.iter_mut().zip(&self.params) {
            if let Some(g) = store.get(p) {
                let g = (g * scale)?;
                *slot = Some(match slot.take() {
                    Some(prev) => (prev + g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    /// Adds `scale ·` the gradients collected by gradient checkpointing into `acc`.
    pub fn accumulate_sink(
        &self,
        acc: &mut [Option<Tensor>],
        pairs: Vec<(Var, Tensor)>,
        scale: f64,
    ) -> Result<()> {
        for (var, g) in pairs {
            let Some(i) = self.params.iter().position(|(_, p)| p.id() == var.id()) else {
                continue;
            };
            let g = (g * scale)?;
            acc[i] = Some(match acc[i].take() {
                Some(prev) => (prev + g)?,
                None => g,
            });
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
    /// gradients are multiplied by `grad_scale` first (clipping).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for (i, (_, p)) in self.params.iter().enumerate() {
            let Some(Some(g)) = grads.get(i) else {
                continue;
            };
            let g = if grad_scale != 1.0 {
                (g * grad_scale)?
            } else {
                g.clone()
            };
            let m = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((&v / bc2)?.sqrt()? + c.eps)?;
            let update = ((&m / bc1)? / denom)?;
            let mut next = p.as_tensor().clone();
            if c.weight_decay > 0.0 {
                next = (next * (1.0 - lr * c.weight_decay))?;
            }
            p.set(&(next - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Moments as named tensors (`<param>.exp_avg`, `<param>.exp_avg_sq`) for checkpoints.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.insert(format!("{name}.exp_avg"), self.m[i].clone());
            out.insert(format!("{name}.exp_avg_sq"), self.v[i].clone());
        }
        out
    }

    /// Restores moments saved by [`AdamW::state_tensors`] and the step count.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (suffix, slot) in [("exp_avg", &mut self.m[i]), ("exp_avg_sq", &mut self.v[i])] {
                let key = format!("{name}.{suffix}");
                let t = state.get(&key).ok_or_else(|| {
                    candle_core::Error::Msg(format!("optimizer state has no {key}"))
                })?;
                if t.dims() != p.dims() {
                    candle_core::bail!("optimizer state {key} has shape {:?}", t.dims());
                }
                *slot = t.to_dtype(DType::F32)?.to_device(p.device())?;
            }
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
        let grads = opt.collect(&store.backward().unwrap());
        assert!((AdamW::grad_norm(&grads).unwrap() - 2.0).abs() < 1e-6);
        opt.step(&grads, 0.1, 1.0).unwrap();
        let v = x.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((v - 0.899).abs() < 1e-6, "{v}");
        let saved = opt.state_tensors();
        assert_eq!(saved.len(), 2);
        let mut other = AdamW::new(vec![("x".into(), x.clone())], opt.config).unwrap();
        other.load_state(&saved, 1).unwrap();
        assert_eq!(other.step, 1);
    }
}
