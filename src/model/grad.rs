//! A gradient route for values computed off the graph: a kernel without a backward (candle-nn's
//! fused ops), a detached matmul whose frozen operand must get no gradient, or a layer that
//! gradient checkpointing recomputes in backward. The value is computed from the input detached;
//! a zero-valued op added to it carries the input gradient. Works on every backend (its forward
//! only allocates zeros).

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};

/// The input gradient of an op, given (input, upstream gradient).
pub(crate) type InputGrad = Box<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// The gradients of an op's three inputs, given (inputs, upstream gradient).
pub(crate) type InputGrads3 = Box<
    dyn Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor, Tensor)> + Send + Sync,
>;

/// Forward: zeros shaped like the value it is added to. Backward: `grad` mapped by `bwd` to the
/// input. Added to a detached value, it gives that value the gradient `bwd` computes. As a
/// two-input op the second input is an anchor that only keeps the op on the graph (it gets no
/// gradient).
struct GradVia {
    shape: Shape,
    /// The value's dtype (the zeros are added to it), which may differ from the input's.
    dtype: DType,
    bwd: InputGrad,
}

impl GradVia {
    /// The forward of every backend: zeros of the value's shape and dtype.
    fn zeros<S>(&self, s: &S) -> Result<(S, Shape)>
    where
        S: BackendStorage,
        S::Device: BackendDevice<Storage = S>,
    {
        Ok((
            s.device().zeros_impl(&self.shape, self.dtype)?,
            self.shape.clone(),
        ))
    }
}

impl CustomOp1 for GradVia {
    fn name(&self) -> &'static str {
        "ft-grad-via"
    }

    fn cpu_fwd(&self, s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.zeros(s)
    }

    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.zeros(s)
    }

    fn metal_fwd(
        &self,
        s: &candle_core::MetalStorage,
        _l: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        self.zeros(s)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.bwd)(arg, grad)?))
    }
}

impl CustomOp2 for GradVia {
    fn name(&self) -> &'static str {
        "ft-grad-via-anchored"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        _l: &Layout,
        _anchor: &CpuStorage,
        _la: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.zeros(s)
    }

    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _l: &Layout,
        _anchor: &candle_core::CudaStorage,
        _la: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.zeros(s)
    }

    fn metal_fwd(
        &self,
        s: &candle_core::MetalStorage,
        _l: &Layout,
        _anchor: &candle_core::MetalStorage,
        _la: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        self.zeros(s)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some((self.bwd)(arg, grad)?), None))
    }
}

/// [`GradVia`] for three inputs that get their gradients together (attention's q, k and v).
struct GradVia3 {
    shape: Shape,
    bwd: InputGrads3,
}

impl CustomOp3 for GradVia3 {
    fn name(&self) -> &'static str {
        "ft-grad-via-3"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        _l: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
        _s3: &CpuStorage,
        _l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((
            s.device().zeros_impl(&self.shape, s.dtype())?,
            self.shape.clone(),
        ))
    }

    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _l: &Layout,
        _s2: &candle_core::CudaStorage,
        _l2: &Layout,
        _s3: &candle_core::CudaStorage,
        _l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((
            s.device().zeros_impl(&self.shape, s.dtype())?,
            self.shape.clone(),
        ))
    }

    fn metal_fwd(
        &self,
        s: &candle_core::MetalStorage,
        _l: &Layout,
        _s2: &candle_core::MetalStorage,
        _l2: &Layout,
        _s3: &candle_core::MetalStorage,
        _l3: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        Ok((
            s.device().zeros_impl(&self.shape, s.dtype())?,
            self.shape.clone(),
        ))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (ga, gb, gc) = (self.bwd)(a, b, c, grad)?;
        Ok((Some(ga), Some(gb), Some(gc)))
    }
}

/// `value` (computed from `a`, `b` and `c` detached) with the gradients `bwd` gives to all three.
pub(crate) fn with_grad3(
    value: Tensor,
    (a, b, c): (&Tensor, &Tensor, &Tensor),
    bwd: InputGrads3,
) -> Result<Tensor> {
    if !(a.track_op() || b.track_op() || c.track_op()) {
        return Ok(value);
    }
    let shape = value.shape().clone();
    value + a.apply_op3(b, c, GradVia3 { shape, bwd })?
}

/// `value` (computed from `x` detached) with the gradient `bwd` gives to `x`.
pub(crate) fn with_grad(value: Tensor, x: &Tensor, bwd: InputGrad) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(value);
    }
    let (shape, dtype) = (value.shape().clone(), value.dtype());
    value + x.apply_op1(GradVia { shape, dtype, bwd })?
}

/// As [`with_grad`], on the graph even when `x` is a constant: the op also hangs on `anchor`
/// (a trainable tensor), so backward reaches it and runs `bwd` for what it does beside the
/// input gradient (gradient checkpointing collects the LoRA gradients of a recomputed layer).
pub(crate) fn with_grad_anchored(
    value: Tensor,
    x: &Tensor,
    anchor: &Tensor,
    bwd: InputGrad,
) -> Result<Tensor> {
    let (shape, dtype) = (value.shape().clone(), value.dtype());
    value + x.apply_op2(anchor, GradVia { shape, dtype, bwd })?
}
