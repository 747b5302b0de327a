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

/// `x · w` for `x: [m, k]` and `w: [k, n]`, either possibly a strided view (a transpose).
pub(crate) fn matmul(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_matmul(
        x.into_dispatch(),
        w.into_dispatch(),
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
    fn fused_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self>;
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

/// A 2-D f32 operand of a matrix multiply, read through its strides (no copy for a view).
#[derive(Clone, Copy)]
struct Operand<'a> {
    storage: &'a [f32],
    offset: usize,
    rows: usize,
    cols: usize,
    row_stride: isize,
    col_stride: isize,
}

impl<'a> Operand<'a> {
    fn of(t: &'a FlexTensor) -> Self {
        let [rows, cols] = t.layout().shape().dims();
        let strides = t.layout().strides();
        Operand {
            storage: t.storage::<f32>(),
            offset: t.layout().start_offset(),
            rows,
            cols,
            row_stride: strides[0],
            col_stride: strides[1],
        }
    }

    fn transposed(self) -> Self {
        Operand {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }
}

/// `a · b` into a fresh row-major buffer, with the `gemm` crate (which flex's own matmul also
/// uses). flex zero-fills its output and then copies it into an aligned allocation before
/// the multiply overwrites it; this writes the product straight into a new buffer.
fn matmul_f32(a: Operand, b: Operand) -> FlexTensor {
    assert_eq!(a.cols, b.rows, "matmul: inner dimensions differ");
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let mut out = Vec::<f32>::with_capacity(m * n);
    if k == 0 {
        out.resize(m * n, 0.0);
    } else if m * n > 0 {
        // Same threshold as flex: below it, splitting costs more than it saves.
        let parallelism = if m * n * k >= 192 * 192 * 192 {
            gemm::Parallelism::Rayon(0)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: each operand's view lies inside its storage (its layout says so), and with
        // `read_dst = false` gemm writes every element of the m×n row-major output before
        // the length is set; nothing reads the buffer before that.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.storage.as_ptr().add(a.offset),
                a.col_stride,
                a.row_stride,
                b.storage.as_ptr().add(b.offset),
                b.col_stride,
                b.row_stride,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
            out.set_len(m * n);
        }
    }
    tensor(out, Shape::new([m, n]))
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
    fn fused_matmul(x: FlexTensor, w: FlexTensor) -> FlexTensor {
        matmul_f32(Operand::of(&x), Operand::of(&w))
    }

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
struct MatmulBackward;

impl Backward<Flex, 2> for MatmulBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let (x, w) = ops.state;
        let dy_op = Operand::of(&dy);
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, matmul_f32(dy_op, Operand::of(&w).transposed()));
        }
        if let Some(node) = node_w {
            grads.register::<Flex>(node.id, matmul_f32(Operand::of(&x).transposed(), dy_op));
        }
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
    fn fused_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        let prep = MatmulBackward.prepare::<C>([x.node(), w.node()]);
        let (x, w) = (x.into_primitive(), w.into_primitive());
        let y = Flex::fused_matmul(x.clone(), w.clone());
        match prep.compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((x, w), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

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
