//! Gradient checkpointing for the llama family: each decoder layer runs forward without keeping
//! its activations (LoRA detached, no graph), and a custom op on the layer input recomputes the
//! layer with a graph during backward. The outer graph then holds one (B, T, H) tensor per layer
//! instead of every intermediate. The recomputed layer's LoRA gradients cannot travel through the
//! op (they are not its inputs), so they are collected in a [`GradSink`] that the trainer adds to
//! the step's gradients. Dropout replays the same masks: the seed is set once per micro-batch.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, Var};

use super::llama::{Layer, LayerCtx};

/// LoRA gradients produced while recomputing layers in backward.
#[derive(Debug, Clone, Default)]
pub struct GradSink(Arc<Mutex<Vec<(Var, Tensor)>>>);

impl GradSink {
    fn push(&self, var: &Var, grad: Tensor) {
        let mut v = match self.0.lock() {
            Ok(v) => v,
            Err(p) => p.into_inner(),
        };
        v.push((var.clone(), grad));
    }

    /// Takes every collected gradient (the sink is empty afterwards).
    pub fn take(&self) -> Vec<(Var, Tensor)> {
        let mut v = match self.0.lock() {
            Ok(v) => v,
            Err(p) => p.into_inner(),
        };
        std::mem::take(&mut *v)
    }
}

/// The gradient path of a checkpointed layer: forward yields zeros (the value comes from the
/// detached pass), backward recomputes the layer.
struct Recompute {
    layer: Layer,
    ctx: LayerCtx,
    sink: GradSink,
}

impl Recompute {
    fn zeros_like_input(l: &Layout) -> Shape {
        l.shape().clone()
    }
}

impl CustomOp2 for Recompute {
    fn name(&self) -> &'static str {
        "ft-recompute-layer"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        let shape = Self::zeros_like_input(l);
        Ok((s.device().zeros_impl(&shape, s.dtype())?, shape))
    }

    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        _s2: &candle_core::CudaStorage,
        _l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        let shape = Self::zeros_like_input(l);
        Ok((s.device().zeros_impl(&shape, s.dtype())?, shape))
    }

    fn metal_fwd(
        &self,
        s: &candle_core::MetalStorage,
        l: &Layout,
        _s2: &candle_core::MetalStorage,
        _l2: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        let shape = Self::zeros_like_input(l);
        Ok((s.device().zeros_impl(&shape, s.dtype())?, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let input = Var::from_tensor(&x.detach())?;
        let y = self.layer.forward(input.as_tensor(), &self.ctx, false)?;
        let store = (y * grad.detach())?.sum_all()?.backward()?;
        for lin in self.layer.linears() {
            if let Some(l) = &lin.lora {
                for var in [&l.a, &l.b] {
                    if let Some(g) = store.get(var) {
                        self.sink.push(var, g.clone());
                    }
                }
            }
        }
        Ok((store.get(&input).cloned(), None))
    }
}

/// Runs `layer` on `x` keeping only `x` for backward.
pub fn checkpointed(layer: &Layer, x: &Tensor, ctx: &LayerCtx, sink: &GradSink) -> Result<Tensor> {
    let y = layer.forward(&x.detach(), ctx, true)?;
    // Anchor the op on one LoRA tensor of the layer so it is part of the graph even when `x` is
    // a constant (the first layer's input); a layer without LoRA needs no recompute at all.
    let anchor = layer
        .linears()
        .into_iter()
        .find_map(|l| l.lora.as_ref().map(|l| l.a.as_tensor().clone()));
    let Some(anchor) = anchor else {
        return if x.track_op() {
            layer.forward(x, ctx, false)
        } else {
            Ok(y)
        };
    };
    y + x.apply_op2(
        &anchor,
        Recompute {
            layer: layer.clone(),
            ctx: ctx.clone(),
            sink: sink.clone(),
        },
    )?
}
