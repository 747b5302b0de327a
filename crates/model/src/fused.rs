//! The [`kernels`](crate::kernels), the linear layers' matrix products and causal attention as
//! burn operations on the flex backend, with their backward passes registered with autodiff,
//! so that training and inference on CPU both use them. The products call the `gemm` crate
//! (flex's own matmul kernel) on strided views, writing straight into fresh buffers.
//!
//! Only flex on f32 has them; [`available`] says when a tensor can take this path, and the
//! model composes the same functions from plain tensor ops otherwise (GPU backends, ndarray).
//! The cross-backend parity check (flex against ndarray) therefore compares the two.

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, OpsPrep};
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

/// Causal grouped-query attention: `softmax(q·kᵀ, causally masked) · v` for queries
/// `q: [b, heads, t, hd]` (already scaled) following `start` cached positions, and keys and
/// values `[b, kv_heads, start + t, hd]` (any strides); query head `h` reads key/value head
/// `h / (heads / kv_heads)`, as Hugging Face's `repeat_kv`. Returns `[b, t, heads·hd]`: the
/// heads side by side, ready for the output projection.
pub(crate) fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, start: usize) -> Tensor<3> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
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
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
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

/// A strided f32 matrix inside a tensor's storage: element (r, c) at `ptr + r·row_stride +
/// c·col_stride`. A view (a transpose, a head of a larger tensor) needs no copy.
#[derive(Clone, Copy)]
struct Matrix {
    ptr: *const f32,
    rows: usize,
    cols: usize,
    row_stride: isize,
    col_stride: isize,
}

impl Matrix {
    /// A 2-D tensor as a matrix.
    fn of(t: &FlexTensor) -> Self {
        let [rows, cols] = t.layout().shape().dims();
        let strides = t.layout().strides();
        Matrix {
            ptr: first_element(t),
            rows,
            cols,
            row_stride: strides[0],
            col_stride: strides[1],
        }
    }

    /// Matrix `[i, j]` of a 4-D tensor: its last two axes at index `i` of the first and `j` of
    /// the second.
    fn of_4d(t: &FlexTensor, i: usize, j: usize) -> Self {
        let [_, _, rows, cols] = t.layout().shape().dims();
        let s = t.layout().strides();
        Matrix {
            // SAFETY: (i, j) is inside the tensor's first two axes, so the offset stays inside
            // its storage.
            ptr: unsafe { first_element(t).offset(i as isize * s[0] + j as isize * s[1]) },
            rows,
            cols,
            row_stride: s[2],
            col_stride: s[3],
        }
    }

    fn transposed(self) -> Self {
        Matrix {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Rows `r0..r1` and columns `0..cols`.
    fn block(self, r0: usize, r1: usize, cols: usize) -> Self {
        debug_assert!(r0 <= r1 && r1 <= self.rows && cols <= self.cols);
        Matrix {
            // SAFETY: row r0 ≤ rows is inside (or one past) the matrix.
            ptr: unsafe { self.ptr.offset(r0 as isize * self.row_stride) },
            rows: r1 - r0,
            cols,
            ..self
        }
    }
}

fn first_element(t: &FlexTensor) -> *const f32 {
    t.storage::<f32>()[t.layout().start_offset()..].as_ptr()
}

/// `dst = a · b`, or `dst += a · b` with `accumulate`, through the `gemm` crate (which flex's own
/// matmul also uses). `dst` is a matrix of a buffer the caller owns mutably.
///
/// # Safety
/// `a` and `b` point into live storage; `dst` points into a live, mutable, row-major-or-strided
/// buffer that nothing else accesses during the call; shapes agree.
unsafe fn gemm_into(dst: Matrix, a: Matrix, b: Matrix, accumulate: bool, parallel: bool) {
    debug_assert!(a.cols == b.rows && dst.rows == a.rows && dst.cols == b.cols);
    if dst.rows == 0 || dst.cols == 0 || a.cols == 0 {
        return;
    }
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            dst.rows,
            dst.cols,
            a.cols,
            dst.ptr as *mut f32,
            dst.col_stride,
            dst.row_stride,
            accumulate,
            a.ptr,
            a.col_stride,
            a.row_stride,
            b.ptr,
            b.col_stride,
            b.row_stride,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// A row-major `rows × cols` matrix over `buf` (which must hold it).
fn row_major(buf: &mut [f32], rows: usize, cols: usize) -> Matrix {
    assert!(buf.len() >= rows * cols);
    Matrix {
        ptr: buf.as_mut_ptr(),
        rows,
        cols,
        row_stride: cols as isize,
        col_stride: 1,
    }
}

/// `a · b` into a fresh row-major buffer. flex's own matmul zero-fills its output and then
/// copies it into an aligned allocation before the multiply overwrites it; this writes the
/// product straight into a new buffer.
fn matmul_f32(a: Matrix, b: Matrix) -> FlexTensor {
    assert_eq!(a.cols, b.rows, "matmul: inner dimensions differ");
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let mut out = Vec::<f32>::with_capacity(m * n);
    if k == 0 {
        out.resize(m * n, 0.0);
    } else {
        let dst = Matrix {
            ptr: out.as_mut_ptr(),
            rows: m,
            cols: n,
            row_stride: n as isize,
            col_stride: 1,
        };
        // Same threshold as flex: below it, splitting costs more than it saves.
        let parallel = m * n * k >= 192 * 192 * 192;
        // SAFETY: the operands are views of live tensors with these shapes; `out` has room for
        // m·n elements, and with `accumulate = false` gemm writes every one of them before the
        // length is set; nothing reads the buffer before that.
        unsafe {
            gemm_into(dst, a, b, false, parallel);
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

/// Queries per block of the attention's score products: a block needs the keys up to its
/// last query's position, so later blocks skip most of the masked keys.
const QUERY_BLOCK: usize = 32;

/// Shapes of an attention call: `[b, heads, t, hd]` queries, `[b, kv_heads, keys, hd]` keys.
#[derive(Clone, Copy, Debug)]
struct AttentionShape {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    queries: usize,
    keys: usize,
    head_dim: usize,
    start: usize,
}

impl AttentionShape {
    fn of(q: &FlexTensor, k: &FlexTensor, start: usize) -> Self {
        let [batch, heads, queries, head_dim] = q.layout().shape().dims();
        let [_, kv_heads, keys, _] = k.layout().shape().dims();
        assert_eq!(
            keys,
            start + queries,
            "attention: keys are the cached and the new positions"
        );
        assert_eq!(
            heads % kv_heads,
            0,
            "attention: heads must be a multiple of kv heads"
        );
        AttentionShape {
            batch,
            heads,
            kv_heads,
            queries,
            keys,
            head_dim,
            start,
        }
    }

    /// (first query, one past the last, keys the block may see) for each query block.
    fn blocks(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        (0..self.queries).step_by(QUERY_BLOCK).map(|i0| {
            let i1 = (i0 + QUERY_BLOCK).min(self.queries);
            (i0, i1, (self.start + i1).min(self.keys))
        })
    }

    fn kv_head(&self, head: usize) -> usize {
        head / (self.heads / self.kv_heads)
    }

    fn probs_len(&self) -> usize {
        self.batch * self.heads * self.queries * self.keys
    }

    /// Query head `h` of batch row `b`, and the key and value matrices of its key/value head.
    fn head_views(&self, [q, k, v]: [&FlexTensor; 3], b: usize, h: usize) -> [Matrix; 3] {
        let g = self.kv_head(h);
        [
            Matrix::of_4d(q, b, h),
            Matrix::of_4d(k, b, g),
            Matrix::of_4d(v, b, g),
        ]
    }

    /// Head `h`'s `[t, hd]` columns of row `b` of a `[b, t, heads·hd]` buffer starting at
    /// `base` (the attention's output and its gradient).
    fn head_columns(&self, base: *const f32, b: usize, h: usize) -> Matrix {
        let width = self.heads * self.head_dim;
        Matrix {
            // SAFETY: (b, h) is inside the buffer the caller holds.
            ptr: unsafe { base.add(b * self.queries * width + h * self.head_dim) },
            rows: self.queries,
            cols: self.head_dim,
            row_stride: width as isize,
            col_stride: 1,
        }
    }
}

/// `dst = a · b` on the calling thread: the attention's products are small, and row groups
/// already keep the cores busy.
///
/// # Safety
/// As [`gemm_into`].
unsafe fn product(dst: Matrix, a: Matrix, b: Matrix) {
    // SAFETY: the caller's contract.
    unsafe { gemm_into(dst, a, b, false, false) }
}

/// `dst += a · b`, as [`product`].
///
/// # Safety
/// As [`gemm_into`].
unsafe fn add_product(dst: Matrix, a: Matrix, b: Matrix) {
    // SAFETY: the caller's contract.
    unsafe { gemm_into(dst, a, b, true, false) }
}

/// The attention's output `[b, t, heads·hd]` and its probabilities `[b, heads, t, keys]`.
fn attention_forward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    start: usize,
) -> [FlexTensor; 2] {
    let s = AttentionShape::of(q, k, start);
    let (t, keys, hd) = (s.queries, s.keys, s.head_dim);
    let mut probs = vec![0.0f32; s.probs_len()];
    let mut out = vec![0.0f32; s.batch * t * s.heads * hd];
    for b in 0..s.batch {
        for h in 0..s.heads {
            let [qm, km, vm] = s.head_views([q, k, v], b, h);
            let p = &mut probs[(b * s.heads + h) * t * keys..][..t * keys];
            let pm = row_major(p, t, keys);
            // SAFETY (every product here): views of live tensors and of this function's own
            // buffers, each written by one call at a time.
            for (i0, i1, seen) in s.blocks() {
                let (qb, kb) = (qm.block(i0, i1, hd), km.block(0, seen, hd));
                unsafe { product(pm.block(i0, i1, seen), qb, kb.transposed()) };
            }
            // Entries a block did not compute are masked: the softmax overwrites them with 0.
            kernels::causal_softmax(p, keys, t, start);
            let (pm, om) = (
                row_major(p, t, keys),
                s.head_columns(out.as_mut_ptr(), b, h),
            );
            for (i0, i1, seen) in s.blocks() {
                let (pb, vb) = (pm.block(i0, i1, seen), vm.block(0, seen, hd));
                unsafe { product(om.block(i0, i1, hd), pb, vb) };
            }
        }
    }
    [
        tensor(out, Shape::new([s.batch, t, s.heads * hd])),
        tensor(probs, Shape::new([s.batch, s.heads, t, keys])),
    ]
}

/// Gradients of [`attention_forward`]'s q, k and v for its output gradient `dy`.
fn attention_backward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    probs: &FlexTensor,
    start: usize,
    dy: FlexTensor,
) -> [FlexTensor; 3] {
    let s = AttentionShape::of(q, k, start);
    let (t, keys, hd) = (s.queries, s.keys, s.head_dim);
    let dy = dense(dy);
    let mut dq = vec![0.0f32; s.batch * s.heads * t * hd];
    let mut dk = vec![0.0f32; s.batch * s.kv_heads * keys * hd];
    let mut dv = vec![0.0f32; s.batch * s.kv_heads * keys * hd];
    let mut ds = vec![0.0f32; t * keys];
    for b in 0..s.batch {
        for h in 0..s.heads {
            let [qm, km, vm] = s.head_views([q, k, v], b, h);
            let p = &values(probs)[(b * s.heads + h) * t * keys..][..t * keys];
            let pm = Matrix {
                ptr: p.as_ptr(),
                rows: t,
                cols: keys,
                row_stride: keys as isize,
                col_stride: 1,
            };
            let dym = s.head_columns(values(&dy).as_ptr(), b, h);
            let dsm = row_major(&mut ds, t, keys);
            let dqm = row_major(&mut dq[(b * s.heads + h) * t * hd..], t, hd);
            let kv_offset = (b * s.kv_heads + s.kv_head(h)) * keys * hd;
            let dkm = row_major(&mut dk[kv_offset..], keys, hd);
            let dvm = row_major(&mut dv[kv_offset..], keys, hd);
            // SAFETY (every product here): views of live tensors and of this function's own
            // buffers, each written by one call at a time.
            for (i0, i1, seen) in s.blocks() {
                let (dyb, pb) = (dym.block(i0, i1, hd), pm.block(i0, i1, seen));
                // dP = dy · vᵀ over the keys the block saw; dv += Pᵀ · dy.
                unsafe {
                    product(
                        dsm.block(i0, i1, seen),
                        dyb,
                        vm.block(0, seen, hd).transposed(),
                    )
                };
                unsafe { add_product(dvm.block(0, seen, hd), pb.transposed(), dyb) };
            }
            // dS = P · (dP − Σ P·dP), 0 where masked (so the blocks' unseen keys are 0 too).
            kernels::causal_softmax_backward(p, &mut ds, keys, t, start);
            let dsm = row_major(&mut ds, t, keys);
            for (i0, i1, seen) in s.blocks() {
                let dsb = dsm.block(i0, i1, seen);
                // dq = dS · k;  dk += dSᵀ · q.
                unsafe { product(dqm.block(i0, i1, hd), dsb, km.block(0, seen, hd)) };
                unsafe {
                    add_product(
                        dkm.block(0, seen, hd),
                        dsb.transposed(),
                        qm.block(i0, i1, hd),
                    )
                };
            }
        }
    }
    let kv_shape = || Shape::new([s.batch, s.kv_heads, keys, hd]);
    [
        tensor(dq, Shape::new([s.batch, s.heads, t, hd])),
        tensor(dk, kv_shape()),
        tensor(dv, kv_shape()),
    ]
}

impl FusedOps for Flex {
    fn fused_matmul(x: FlexTensor, w: FlexTensor) -> FlexTensor {
        matmul_f32(Matrix::of(&x), Matrix::of(&w))
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

    fn fused_attention(q: FlexTensor, k: FlexTensor, v: FlexTensor, start: usize) -> FlexTensor {
        let [out, _] = attention_forward(&q, &k, &v, start);
        out
    }
}

/// Gives each parent that autodiff tracks its gradient from `computed`, in parent order.
macro_rules! register {
    ($grads:expr, $parents:expr, $computed:expr) => {
        for (node, grad) in $parents.into_iter().zip($computed) {
            if let Some(node) = node {
                $grads.register::<Flex>(node.id, grad);
            }
        }
    };
}

/// Records `output` in the autodiff graph, keeping `state` for the backward when an input is
/// tracked.
fn record<BO, C, const N: usize>(
    prep: OpsPrep<BO, Flex, BO::State, C, N>,
    state: BO::State,
    output: FlexTensor,
) -> FloatTensor<Autodiff<Flex, C>>
where
    BO: Backward<Flex, N>,
    C: CheckpointStrategy,
{
    match prep.compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(state, output),
        OpsKind::UnTracked(prep) => prep.finish(output),
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
        let dy_m = Matrix::of(&dy);
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, matmul_f32(dy_m, Matrix::of(&w).transposed()));
        }
        if let Some(node) = node_w {
            grads.register::<Flex>(node.id, matmul_f32(Matrix::of(&x).transposed(), dy_m));
        }
    }
}

#[derive(Debug)]
struct RmsNormBackward;

impl Backward<Flex, 2> for RmsNormBackward {
    type State = (FlexTensor, FlexTensor, f32);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<Flex>(&ops.node);
        let (x, w, eps) = ops.state;
        register!(grads, ops.parents, rms_norm_backward(&x, &w, dy, eps));
    }
}

#[derive(Debug)]
struct SwigluBackward;

impl Backward<Flex, 2> for SwigluBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<Flex>(&ops.node);
        let (gate, up) = ops.state;
        register!(grads, ops.parents, swiglu_backward(&gate, &up, dy));
    }
}

/// The rotary factors are constants: only `x` gets a gradient.
#[derive(Debug)]
struct RopeBackward;

impl Backward<Flex, 1> for RopeBackward {
    type State = (FlexTensor, FlexTensor, HeadsShape);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<Flex>(&ops.node);
        let (cos, signed_sin, x_shape) = ops.state;
        register!(
            grads,
            ops.parents,
            [rope_backward(&cos, &signed_sin, x_shape, dy)]
        );
    }
}

#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 3> for AttentionBackward {
    /// q, k, v, the probabilities, and the cached positions.
    type State = (FlexTensor, FlexTensor, FlexTensor, FlexTensor, usize);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = grads.consume::<Flex>(&ops.node);
        let (q, k, v, probs, start) = ops.state;
        register!(
            grads,
            ops.parents,
            attention_backward(&q, &k, &v, &probs, start, dy)
        );
    }
}

impl<C: CheckpointStrategy> FusedOps for Autodiff<Flex, C> {
    fn fused_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        let prep = MatmulBackward.prepare::<C>([x.node(), w.node()]);
        let (x, w) = (x.into_primitive(), w.into_primitive());
        let y = Flex::fused_matmul(x.clone(), w.clone());
        record(prep, (x, w), y)
    }

    fn fused_rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self> {
        let prep = RmsNormBackward.prepare::<C>([x.node(), weight.node()]);
        let (x, weight) = (dense(x.into_primitive()), dense(weight.into_primitive()));
        let y = Flex::fused_rms_norm(x.clone(), weight.clone(), eps);
        record(prep, (x, weight, eps), y)
    }

    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let prep = SwigluBackward.prepare::<C>([gate.node(), up.node()]);
        let (gate, up) = (dense(gate.into_primitive()), dense(up.into_primitive()));
        let y = Flex::fused_swiglu(gate.clone(), up.clone());
        record(prep, (gate, up), y)
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
        record(prep, (cos, signed_sin, x_shape), y)
    }

    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        start: usize,
    ) -> FloatTensor<Self> {
        let prep = AttentionBackward.prepare::<C>([q.node(), k.node(), v.node()]);
        let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
        let [out, probs] = attention_forward(&q, &k, &v, start);
        record(prep, (q, k, v, probs, start), out)
    }
}
