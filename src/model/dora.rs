//! DoRA (weight-decomposed LoRA) with PEFT's semantics. A DoRA module adds a trainable magnitude
//! `m` (out,) to LoRA's A and B and computes
//!
//! `y = b + W·x + (m/‖W + s·B·A‖ − 1) ⊙ W·dropout(x) + (m/‖W + s·B·A‖) ⊙ s·B·A·dropout(x)`
//!
//! where `‖·‖` is the L2 norm of each output row, computed from detached A and B and itself
//! detached (PEFT's `DoraLinearLayer`, after the DoRA paper §4.3). Without dropout (or outside
//! training) this is `b + (m/‖W + s·B·A‖) ⊙ (W·x + s·B·A·x)`. `m` starts at `‖W‖` (B = 0), so a
//! fresh DoRA module computes the base projection exactly. PEFT stores `m` as
//! `base_model.model.<module path>.lora_magnitude_vector`.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Result, Tensor};

/// The PEFT key of the magnitude vector of the module at `path`.
pub fn magnitude_key(path: &str) -> String {
    format!("base_model.model.{path}.lora_magnitude_vector")
}

/// `‖W + s·B·A‖` per output row, (out,) f32, from detached `a` (r, in) and `b` (out, r); `w` is
/// the frozen weight (out, in) in any float dtype.
pub fn weight_norm(w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let delta = (b.detach().matmul(&a.detach())? * scale)?;
    let full = (w.detach().to_dtype(DType::F32)? + delta)?;
    full.sqr()?.sum(1)?.sqrt()
}

/// The initial magnitude of a module whose B is zero: `‖W‖` per output row, (out,) f32.
pub fn initial_magnitude(w: &Tensor) -> Result<Tensor> {
    w.detach().to_dtype(DType::F32)?.sqr()?.sum(1)?.sqrt()
}

/// How a pass treats the cached DoRA norms ([`NormCache`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormUse {
    /// Compute the norm, leave the cache alone (training, evaluation: A and B may change between
    /// passes).
    Fresh,
    /// Compute the norm and cache it: the first pass of a generation.
    Refresh,
    /// Use the cached norm (a decoding step: A and B cannot have changed since the prefill).
    Cached,
}

thread_local! {
    static NORM_USE: std::cell::Cell<NormUse> = const { std::cell::Cell::new(NormUse::Fresh) };
}

/// Runs `f` with DoRA norms used as `mode` says on this thread ([`super::Model::forward_cached`]
/// sets it for generation).
pub fn with_norm_use<T>(mode: NormUse, f: impl FnOnce() -> T) -> T {
    let before = NORM_USE.with(|c| c.replace(mode));
    let out = f();
    NORM_USE.with(|c| c.set(before));
    out
}

/// The row norm of a DoRA module, kept from a generation's prefill for its decoding steps, which
/// would otherwise rebuild `W + s·B·A` for every token.
#[derive(Debug, Clone, Default)]
pub struct NormCache(Arc<Mutex<Option<Tensor>>>);

impl NormCache {
    /// The norm for this pass: `compute()`'s result, or the cached one while decoding
    /// ([`with_norm_use`]).
    pub fn get_or(&self, compute: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
        let mode = NORM_USE.with(|c| c.get());
        if mode == NormUse::Fresh {
            return compute();
        }
        let mut slot = match self.0.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let (NormUse::Cached, Some(t)) = (mode, slot.as_ref()) {
            return Ok(t.clone());
        }
        let t = compute()?;
        *slot = Some(t.clone());
        Ok(t)
    }
}

/// The DoRA output before the bias, `(N, out)`, when dropout was drawn in this pass, from its
/// parts: `wx = W·x`, `wx_drop = W·dropout(x)`, `update = s·B·A·dropout(x)` (f32) and
/// `g = m/‖W + s·B·A‖` (out,) f32: `wx + (g − 1)·wx_drop + g·update`, as PEFT.
pub fn combine_dropout(
    wx: &Tensor,
    wx_drop: &Tensor,
    update: &Tensor,
    g: &Tensor,
) -> Result<Tensor> {
    let dtype = wx.dtype();
    let g1 = (g - 1.0)?.to_dtype(dtype)?;
    let scaled = update.broadcast_mul(g)?.to_dtype(dtype)?;
    (wx + wx_drop.broadcast_mul(&g1)?)? + scaled
}

/// `W' = (m/‖W + ΔW‖) ⊙ (W + ΔW)` per output row, f32: a DoRA module folded into its weight as
/// PEFT merges it. `w` and `delta` are (out, in) f32, `m` (out,).
pub fn fold(w: &Tensor, delta: &Tensor, m: &Tensor) -> Result<Tensor> {
    let full = (w + delta)?;
    let norm = full.sqr()?.sum(1)?.sqrt()?;
    let g = (m.to_dtype(DType::F32)? / norm)?;
    full.broadcast_mul(&g.unsqueeze(1)?)
}
