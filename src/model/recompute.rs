//! Gradient checkpointing for the llama family: each decoder layer runs forward without keeping
//! its activations (LoRA detached, no graph), and a custom op on the layer input recomputes the
//! layer with a graph during backward. The outer graph then holds one (B, T, H) tensor per layer
//! instead of every intermediate. The recomputed layer's LoRA gradients cannot travel through the
//! op (they are not its inputs), so they are collected in a [`GradSink`] that
//! [`crate::model::Model::backward`] adds to the graph's. Dropout replays the same masks: the
//! seed is set once per micro-batch.

use std::sync::{Arc, Mutex};

use candle_core::{Result, Tensor, Var};

use super::grad::with_grad_anchored;
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

/// Runs `layer` on `x` keeping only `x` for backward: the value comes from a pass without a
/// graph; a zero-valued op added to it recomputes the layer with a graph in backward, gives `x`
/// its gradient and puts the layer's LoRA gradients in `sink`.
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
    let (layer, ctx, sink) = (layer.clone(), ctx.clone(), sink.clone());
    let recompute = move |x: &Tensor, grad: &Tensor| -> Result<Tensor> {
        let input = Var::from_tensor(&x.detach())?;
        let y = layer.forward(input.as_tensor(), &ctx, false)?;
        let store = (y * grad.detach())?.sum_all()?.backward()?;
        for lin in layer.linears() {
            if let Some(l) = &lin.lora {
                for var in [Some(&l.a), Some(&l.b), l.magnitude.as_ref()]
                    .into_iter()
                    .flatten()
                {
                    if let Some(g) = store.get(var) {
                        sink.push(var, g.clone());
                    }
                }
            }
        }
        match store.get(&input) {
            Some(g) => Ok(g.clone()),
            None => x.zeros_like(),
        }
    };
    with_grad_anchored(y, x, &anchor, Box::new(recompute))
}
