//! The [`kernels`](crate::kernels) as burn operations on the flex backend, with their backward
//! passes registered with autodiff, so that training and inference on CPU both use them.
//!
//! Only flex on f32 has them; [`available`] says when a tensor can take this path, and the
//! model composes the same functions from plain tensor ops otherwise (GPU backends, ndarray).
//! The cross-backend parity check (flex against ndarray) therefore compares the two.

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::{DType, Device, Shape, Tensor, TensorData};

use crate::kernels::{self, HeadsShape};

/// Whether the fused CPU kernels run for a tensor of `dtype` on `device`: f32 on flex.
pub fn available(device: &Device, dtype: DType) -> bool {
    dtype == DType::F32 && device.clone().inner() == Device::flex()
}

/// RMSNorm over the last dimension with gain `weight` (`[1, n]`).
pub(crate) fn rms_norm(x: Tensor<3>, weight: &Tensor<2>, eps: f64) -> Tensor<3> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_rms_norm(
        x.into_dispatch(),
        weight.clone().into_dispatch(),
        eps as f32,
    ))
}

/// `silu(gate) · up`.
pub(crate) fn swiglu(gate: Tensor<3>, up: Tensor<3>) -> Tensor<3> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_swiglu(
        gate.into_dispatch(),
        up.into_dispatch(),
    ))
}

/// Rotary embedding of `x: [b, t, heads, head_dim]` with `[t, head_dim]` factors (see
/// [`kernels::rope`]), returned as `[b, heads, t, head_dim]`.
pub(crate) fn rope_heads(x: Tensor<4>, cos: &Tensor<2>, signed_sin: &Tensor<2>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_rope_heads(
        x.into_dispatch(),
        cos.clone().into_dispatch(),
        signed_sin.clone().into_dispatch(),
    ))
}

/// Causally masked softmax over the last axis of attention scores whose rows are blocks of
/// `queries` positions following `start` cached ones (see [`kernels::causal_softmax`]).
pub(crate) fn causal_softmax(scores: Tensor<4>, queries: usize, start: usize) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_causal_softmax(
        scores.into_dispatch(),
        queries,
        start,
    ))
}

/// The fused operations as a burn backend extension: flex runs the kernels, and flex under
/// autodiff also records their backward passes. Other backends do not take this path.
#[backend_extension(Flex, Autodiff)]
pub trait FusedOps: Backend {
    fn fused_rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self>;
    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;
    fn fused_rope_heads(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        signed_sin: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    fn fused_causal_softmax(
        scores: FloatTensor<Self>,
        queries: usize,
        start: usize,
    ) -> FloatTensor<Self>;
}

/// `t` with a dense row-major f32 buffer (a copy only when it is a strided view).
fn dense(t: FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("fused ops take dense f32 tensors (checked by `available` and `dense`)")
}

fn tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

fn shape(t: &FlexTensor) -> Shape {
    t.layout().shape().clone()
}

fn heads_shape(x: &FlexTensor) -> HeadsShape {
    let [batch, seq, heads, head_dim] = x.layout().shape().dims();
    HeadsShape {
        batch,
        seq,
        heads,
        head_dim,
    }
}

/// Rows of a `[.., keys]` score tensor and its key count.
fn keys(scores: &FlexTensor) -> usize {
    *scores
        .layout()
        .shape()
        .last()
        .expect("scores have a key axis")
}

fn rms_norm_backward(x: &FlexTensor, w: &FlexTensor, dy: FlexTensor, eps: f32) -> [FlexTensor; 2] {
    let dy = dense(dy);
    let mut dx = vec![0.0; values(x).len()];
    let mut dw = vec![0.0; values(w).len()];
    kernels::rms_norm_backward(values(x), values(w), values(&dy), eps, &mut dx, &mut dw);
    [tensor(dx, shape(x)), tensor(dw, shape(w))]
}

fn swiglu_backward(gate: &FlexTensor, up: &FlexTensor, dy: FlexTensor) -> [FlexTensor; 2] {
    let dy = dense(dy);
    let n = values(gate).len();
    let (mut dgate, mut dup) = (vec![0.0; n], vec![0.0; n]);
    kernels::swiglu_backward(values(gate), values(up), values(&dy), &mut dgate, &mut dup);
    [tensor(dgate, shape(gate)), tensor(dup, shape(up))]
}

fn rope_backward(
    cos: &FlexTensor,
    signed_sin: &FlexTensor,
    x_shape: HeadsShape,
    dy: FlexTensor,
) -> FlexTensor {
    let dy = dense(dy);
    let mut dx = vec![0.0; values(&dy).len()];
    kernels::rope_backward(
        values(&dy),
        values(cos),
        values(signed_sin),
        x_shape,
        &mut dx,
    );
    let HeadsShape {
        batch,
        seq,
        heads,
        head_dim,
    } = x_shape;
    tensor(dx, Shape::new([batch, seq, heads, head_dim]))
}

fn causal_softmax_backward(
    probs: &FlexTensor,
    queries: usize,
    start: usize,
    dy: FlexTensor,
) -> FlexTensor {
    let dy = dense(dy);
    let mut ds = vec![0.0; values(probs).len()];
    let k = keys(probs);
    kernels::causal_softmax_backward(values(probs), values(&dy), k, queries, start, &mut ds);
    tensor(ds, shape(probs))
}

impl FusedOps for Flex {
    fn fused_rms_norm(x: FlexTensor, weight: FlexTensor, eps: f32) -> FlexTensor {
        let (x, weight) = (dense(x), dense(weight));
        let mut y = vec![0.0; values(&x).len()];
        kernels::rms_norm(values(&x), values(&weight), eps, &mut y);
        tensor(y, shape(&x))
    }

    fn fused_swiglu(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
        let (gate, up) = (dense(gate), dense(up));
        let mut y = vec![0.0; values(&gate).len()];
        kernels::swiglu(values(&gate), values(&up), &mut y);
        tensor(y, shape(&gate))
    }

    fn fused_rope_heads(x: FlexTensor, cos: FlexTensor, signed_sin: FlexTensor) -> FlexTensor {
        let (x, cos, signed_sin) = (dense(x), dense(cos), dense(signed_sin));
        let s = heads_shape(&x);
        let mut y = vec![0.0; values(&x).len()];
        kernels::rope(values(&x), values(&cos), values(&signed_sin), s, &mut y);
        tensor(y, Shape::new([s.batch, s.heads, s.seq, s.head_dim]))
    }

    fn fused_causal_softmax(scores: FlexTensor, queries: usize, start: usize) -> FlexTensor {
        let scores = dense(scores);
        let mut p = vec![0.0; values(&scores).len()];
        kernels::causal_softmax(values(&scores), keys(&scores), queries, start, &mut p);
        tensor(p, shape(&scores))
    }
}

#[derive(Debug)]
struct RmsNormBackward;

impl Backward<Flex, 2> for RmsNormBackward {
    type State = (FlexTensor, FlexTensor, f32);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let (x, w, eps) = ops.state;
        let [dx, dw] = rms_norm_backward(&x, &w, dy, eps);
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, dx);
        }
        if let Some(node) = node_w {
            grads.register::<Flex>(node.id, dw);
        }
    }
}

#[derive(Debug)]
struct SwigluBackward;

impl Backward<Flex, 2> for SwigluBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_gate, node_up] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let (gate, up) = ops.state;
        let [dgate, dup] = swiglu_backward(&gate, &up, dy);
        if let Some(node) = node_gate {
            grads.register::<Flex>(node.id, dgate);
        }
        if let Some(node) = node_up {
            grads.register::<Flex>(node.id, dup);
        }
    }
}

/// The rotary factors are constants: only `x` gets a gradient.
#[derive(Debug)]
struct RopeBackward;

impl Backward<Flex, 1> for RopeBackward {
    type State = (FlexTensor, FlexTensor, HeadsShape);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let (cos, signed_sin, x_shape) = ops.state;
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, rope_backward(&cos, &signed_sin, x_shape, dy));
        }
    }
}

#[derive(Debug)]
struct CausalSoftmaxBackward;

impl Backward<Flex, 1> for CausalSoftmaxBackward {
    /// The probabilities (the forward's output), queries per block, cached positions.
    type State = (FlexTensor, usize, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_scores] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let (probs, queries, start) = ops.state;
        if let Some(node) = node_scores {
            let ds = causal_softmax_backward(&probs, queries, start, dy);
            grads.register::<Flex>(node.id, ds);
        }
    }
}

impl<C: CheckpointStrategy> FusedOps for Autodiff<Flex, C> {
    fn fused_rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self> {
        let prep = RmsNormBackward.prepare::<C>([x.node(), weight.node()]);
        let (x, weight) = (dense(x.into_primitive()), dense(weight.into_primitive()));
        let y = Flex::fused_rms_norm(x.clone(), weight.clone(), eps);
        match prep.compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((x, weight, eps), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let prep = SwigluBackward.prepare::<C>([gate.node(), up.node()]);
        let (gate, up) = (dense(gate.into_primitive()), dense(up.into_primitive()));
        let y = Flex::fused_swiglu(gate.clone(), up.clone());
        match prep.compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((gate, up), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn fused_rope_heads(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        signed_sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let prep = RopeBackward.prepare::<C>([x.node()]);
        let x = dense(x.into_primitive());
        let (cos, signed_sin) = (
            dense(cos.into_primitive()),
            dense(signed_sin.into_primitive()),
        );
        let x_shape = heads_shape(&x);
        let y = Flex::fused_rope_heads(x, cos.clone(), signed_sin.clone());
        match prep.compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((cos, signed_sin, x_shape), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn fused_causal_softmax(
        scores: FloatTensor<Self>,
        queries: usize,
        start: usize,
    ) -> FloatTensor<Self> {
        let prep = CausalSoftmaxBackward.prepare::<C>([scores.node()]);
        let probs = Flex::fused_causal_softmax(scores.into_primitive(), queries, start);
        match prep.compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((probs.clone(), queries, start), probs),
            OpsKind::UnTracked(prep) => prep.finish(probs),
        }
    }
}
