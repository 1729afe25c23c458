//! A gradient route for values computed off the graph: a kernel without a backward (candle-nn's
//! fused ops) or a detached matmul whose frozen operand must get no gradient. The value is
//! computed from the input detached; a zero-valued op added to it carries the input gradient.
//! Works on every backend (its forward only allocates zeros).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// The input gradient of an op, given (input, upstream gradient).
pub(crate) type InputGrad = Box<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// Forward: zeros shaped like the value it is added to. Backward: `grad` mapped by `bwd` to the
/// input. Added to a detached value, it gives that value the gradient `bwd` computes.
struct GradVia {
    shape: Shape,
    bwd: InputGrad,
}

impl CustomOp1 for GradVia {
    fn name(&self) -> &'static str {
        "ft-grad-via"
    }

    fn cpu_fwd(&self, s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        Ok((
            s.device().zeros_impl(&self.shape, s.dtype())?,
            self.shape.clone(),
        ))
    }

    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        Ok((
            s.device().zeros_impl(&self.shape, s.dtype())?,
            self.shape.clone(),
        ))
    }

    fn metal_fwd(
        &self,
        s: &candle_core::MetalStorage,
        _l: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        Ok((
            s.device().zeros_impl(&self.shape, s.dtype())?,
            self.shape.clone(),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.bwd)(arg, grad)?))
    }
}

/// `value` (computed from `x` detached) with the gradient `bwd` gives to `x`.
pub(crate) fn with_grad(value: Tensor, x: &Tensor, bwd: InputGrad) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(value);
    }
    let shape = value.shape().clone();
    value + x.apply_op1(GradVia { shape, bwd })?
}
