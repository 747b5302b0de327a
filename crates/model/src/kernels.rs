//! Fused CPU kernels on contiguous f32 slices: RMSNorm, SwiGLU, rotary embedding and the causal
//! softmax of attention, each with the backward pass autodiff needs.
//!
//! burn's CPU backends run each element-wise op as its own pass, with a fresh buffer and a
//! scalar `expf`, and autodiff adds several more passes per op in the backward; these do one
//! pass each way. They are plain loops written so the compiler vectorizes them, each compiled
//! for AVX-512, AVX2+FMA and the baseline and chosen at run time (`vectorized!`). The arithmetic is the same on
//! every path (Rust does not contract `a * b + c` into an FMA), so results do not depend on
//! the CPU's vector width.

/// Accumulators per reduction: sums and maxima run in this many independent lanes, which the
/// compiler maps onto vector registers.
const LANES: usize = 16;

/// Defines `fn name(args) body` so that it runs compiled for AVX-512, or AVX2+FMA, when this
/// CPU has it (checked at run time), and for the baseline instruction set otherwise. The body
/// and the `#[inline(always)]` helpers it calls are inlined into each of the three versions,
/// so their loops are vectorized for that instruction set.
macro_rules! vectorized {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn kernel($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) {
                    kernel($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    kernel($($arg),*)
                }
                let widest = isa_limit();
                if widest >= Isa::Avx512 && std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features `avx512` is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if widest >= Isa::Avx2
                    && std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above, for `avx2`.
                    return unsafe { avx2($($arg),*) };
                }
            }
            kernel($($arg),*)
        }
    };
}

/// Instruction sets the kernels are compiled for, narrowest first.
#[allow(dead_code)] // only x86-64 builds select the wider ones
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Isa {
    Baseline,
    Avx2,
    Avx512,
}

/// The widest instruction set a kernel may use: every one the CPU has, except where a test
/// narrows it to check that all versions compute the same bits.
#[allow(dead_code)]
pub(crate) fn isa_limit() -> Isa {
    #[cfg(test)]
    {
        tests::ISA_LIMIT.with(|l| l.get())
    }
    #[cfg(not(test))]
    {
        Isa::Avx512
    }
}

/// `e^x` within 2 ulp for finite `x`, branch-free so that loops over it vectorize. Inputs
/// beyond f32's range are clamped (below: a tiny normal number instead of 0; above: about
/// 1.6e38 instead of ∞), which is what softmax and sigmoid need; NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n·LN2_HI is exact for the n that occur (Cody–Waite).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2^23 rounds to an integer and leaves it in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    // e^r on |r| ≤ ln2/2: Taylor to degree 7 (error ~1e-9 relative).
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    let int_n = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let two_n = f32::from_bits(((int_n + 127) << 23) as u32);
    p * two_n
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[inline(always)]
fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

/// Σ a·b.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let a_chunks = a.chunks_exact(LANES);
    let b_chunks = b.chunks_exact(LANES);
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (ca, cb) in a_chunks.zip(b_chunks) {
        for l in 0..LANES {
            acc[l] += ca[l] * cb[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Hints that `data` will be read soon: a prefetch per 64-byte line (nothing off x86-64).
#[inline(always)]
fn prefetch(data: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in data.chunks(16) {
        // SAFETY: a prefetch reads nothing architecturally; the address lies in `data`.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// [`dot`] of `a` with four rows at once, each with the same bits as [`dot`]: four
/// independent chains of additions instead of one.
#[inline(always)]
fn dots4(a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
    let mut acc = [[0.0f32; LANES]; 4];
    let [b0, b1, b2, b3] = b.map(|row| row.chunks_exact(LANES));
    let tails = [
        b0.remainder(),
        b1.remainder(),
        b2.remainder(),
        b3.remainder(),
    ];
    let chunks = a.chunks_exact(LANES);
    let a_tail = chunks.remainder();
    for ((((ca, c0), c1), c2), c3) in chunks.zip(b0).zip(b1).zip(b2).zip(b3) {
        for l in 0..LANES {
            acc[0][l] += ca[l] * c0[l];
            acc[1][l] += ca[l] * c1[l];
            acc[2][l] += ca[l] * c2[l];
            acc[3][l] += ca[l] * c3[l];
        }
    }
    let mut out = [0.0f32; 4];
    for k in 0..4 {
        let tail: f32 = a_tail.iter().zip(tails[k]).map(|(x, y)| x * y).sum();
        out[k] = acc[k].iter().sum::<f32>() + tail;
    }
    out
}

/// Σ a·b·c.
#[inline(always)]
fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ca, cb, cc) = (
        a.chunks_exact(LANES),
        b.chunks_exact(LANES),
        c.chunks_exact(LANES),
    );
    let tail: f32 = (ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .zip(cc.remainder()))
    .map(|((x, y), z)| x * y * z)
    .sum();
    for ((xa, xb), xc) in ca.zip(cb).zip(cc) {
        for l in 0..LANES {
            acc[l] += xa[l] * xb[l] * xc[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    acc.iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// 1 / √(mean(x²) + eps) of one row.
#[inline(always)]
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    1.0 / (dot(row, row) / row.len() as f32 + eps).sqrt()
}

vectorized! {
    /// RMSNorm of each row of `x` (rows of `weight.len()`): `x / √(mean(x²) + eps) · weight`.
    pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
        let n = weight.len();
        for (xr, yr) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            let inv = inv_rms(xr, eps);
            for ((y, &xv), &w) in yr.iter_mut().zip(xr).zip(weight) {
                *y = xv * inv * w;
            }
        }
    }
}

vectorized! {
    /// Gradients of [`rms_norm`] for output gradient `dy`: writes `dx`, adds to `dweight`.
    pub fn rms_norm_backward(
        x: &[f32],
        weight: &[f32],
        dy: &[f32],
        eps: f32,
        dx: &mut [f32],
        dweight: &mut [f32],
    ) {
        let n = weight.len();
        let rows = x.chunks_exact(n).zip(dy.chunks_exact(n));
        for ((xr, dyr), dxr) in rows.zip(dx.chunks_exact_mut(n)) {
            let inv = inv_rms(xr, eps);
            // y_j = x_j·inv·w_j and ∂inv/∂x_i = −inv³·x_i/n, so
            // dx_i = inv·dy_i·w_i − x_i·inv³·Σ_j(dy_j·w_j·x_j)/n.
            let weighted = dot3(dyr, weight, xr);
            let c = weighted * inv * inv * inv / n as f32;
            for ((((g, &d), &w), &xv), dw) in dxr
                .iter_mut()
                .zip(dyr)
                .zip(weight)
                .zip(xr)
                .zip(dweight.iter_mut())
            {
                *g = inv * d * w - c * xv;
                *dw += d * xv * inv;
            }
        }
    }
}

vectorized! {
    /// SwiGLU's gate: `silu(gate) · up`, with silu(g) = g·sigmoid(g).
    pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((y, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *y = g * sigmoid(g) * u;
        }
    }
}

vectorized! {
    /// Gradients of [`swiglu`] for output gradient `dy`.
    pub fn swiglu_backward(gate: &[f32], up: &[f32], dy: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
        let inputs = gate.iter().zip(up).zip(dy);
        for (((&g, &u), &d), (dg, du)) in inputs.zip(dgate.iter_mut().zip(dup.iter_mut())) {
            let s = sigmoid(g);
            *du = d * g * s;
            // d silu/dg = s + g·s·(1 − s)
            *dg = d * u * s * (1.0 + g * (1.0 - s));
        }
    }
}

/// The scalars of one AdamW step, as the f32 values the update uses.
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    pub beta1: f32,
    /// 1 − β1
    pub one_minus_beta1: f32,
    pub beta2: f32,
    /// 1 − β2
    pub one_minus_beta2: f32,
    /// 1 − β2^t
    pub bias2: f32,
    pub eps: f32,
    /// lr / (1 − β1^t)
    pub step_size: f32,
    /// 1 − lr·weight_decay, or 1 for parameters without decay
    pub decay_factor: f32,
}

vectorized! {
    /// AdamW (PyTorch's update order) on one slice of parameters `p` with gradients `g` and
    /// moments `m`, `v`, in place; each operation in the order and precision of the tensor-op
    /// version in `holdfast-train`, so the two agree bit for bit.
    pub fn adamw(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], s: AdamStep) {
        for (((pe, me), ve), &ge) in p.iter_mut().zip(m).zip(v).zip(g) {
            *me = *me * s.beta1 + ge * s.one_minus_beta1;
            *ve = *ve * s.beta2 + ge * ge * s.one_minus_beta2;
            let denom = (*ve / s.bias2).sqrt() + s.eps;
            *pe = *pe * s.decay_factor - *me / denom * s.step_size;
        }
    }
}

/// Shape of the rotary kernels' input `[batch, seq, heads, head_dim]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadsShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
}

vectorized! {
    /// Rotary embedding in Hugging Face's half-split convention, with the move of the heads axis
    /// in front of the positions: `x` is `[b, t, h, d]` (a projection's output), `out` is
    /// `[b, h, t, d]` with `out = x·cos + swap_halves(x)·signed_sin`, where `cos` and
    /// `signed_sin` are `[t, d]` (the sine's first half negated, both already scaled).
    pub fn rope(x: &[f32], cos: &[f32], signed_sin: &[f32], shape: HeadsShape, out: &mut [f32]) {
        rotate(x, cos, signed_sin, shape, out, false)
    }
}

vectorized! {
    /// Gradient of [`rope`]'s input for output gradient `dy` (`[b, h, t, d]`); `dx` is
    /// `[b, t, h, d]`.
    pub fn rope_backward(
        dy: &[f32],
        cos: &[f32],
        signed_sin: &[f32],
        shape: HeadsShape,
        dx: &mut [f32],
    ) {
        rotate(dy, cos, signed_sin, shape, dx, true)
    }
}

/// [`rope`], or with `backward` [`rope_backward`]. The forward gives
/// `out_lo = x_lo·c_lo + x_hi·s_lo` and `out_hi = x_hi·c_hi + x_lo·s_hi`, so the backward is
/// the same rotation with the sine's halves exchanged, read from `[b, h, t, d]` and written to
/// `[b, t, h, d]`.
#[inline(always)]
fn rotate(
    src: &[f32],
    cos: &[f32],
    signed_sin: &[f32],
    shape: HeadsShape,
    dst: &mut [f32],
    backward: bool,
) {
    let HeadsShape {
        batch,
        seq,
        heads,
        head_dim: d,
    } = shape;
    let half = d / 2;
    for b in 0..batch {
        for t in 0..seq {
            let (c_lo, c_hi) = cos[t * d..][..d].split_at(half);
            let (s_lo, s_hi) = signed_sin[t * d..][..d].split_at(half);
            let (s_lo, s_hi) = if backward { (s_hi, s_lo) } else { (s_lo, s_hi) };
            for h in 0..heads {
                let bthd = ((b * seq + t) * heads + h) * d;
                let bhtd = ((b * heads + h) * seq + t) * d;
                let (from, to) = if backward { (bhtd, bthd) } else { (bthd, bhtd) };
                let (lo, hi) = src[from..][..d].split_at(half);
                let (dlo, dhi) = dst[to..][..d].split_at_mut(half);
                for j in 0..half {
                    dlo[j] = lo[j] * c_lo[j] + hi[j] * s_lo[j];
                    dhi[j] = hi[j] * c_hi[j] + lo[j] * s_hi[j];
                }
            }
        }
    }
}

vectorized! {
    /// Query heads of `hd` values each (`queries`, one after another) that share a key-value
    /// head, against its first `len` cached positions: softmax(q·k/√d) · v per head into
    /// `out`. `offset` is the key-value head's place within a cached row of `width` values.
    /// The heads take turns over each few positions, which are read from memory once.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        queries: &[f32],
        hd: usize,
        keys: &[f32],
        values: &[f32],
        len: usize,
        offset: usize,
        width: usize,
        out: &mut [f32],
    ) {
        let heads = queries.len() / hd;
        let scale = 1.0 / (hd as f32).sqrt();
        // The cache is rarely still in the CPU's caches (a step streams every weight through
        // them): ask for all of this head's lines at once rather than miss on each in turn.
        for p in 0..len {
            let at = p * width + offset;
            prefetch(&keys[at..at + hd]);
            prefetch(&values[at..at + hd]);
        }
        // Loops, not closures over the hot parts: closures do not take on the target features.
        let mut scores = vec![0.0f32; heads * len];
        let key = |p: usize| &keys[p * width + offset..p * width + offset + hd];
        let mut p = 0;
        while p + 4 <= len {
            let four = [key(p), key(p + 1), key(p + 2), key(p + 3)];
            for (h, query) in queries.chunks_exact(hd).enumerate() {
                let dots = dots4(query, four);
                for (s, d) in scores[h * len + p..][..4].iter_mut().zip(dots) {
                    *s = d * scale;
                }
            }
            p += 4;
        }
        for p in p..len {
            for (h, query) in queries.chunks_exact(hd).enumerate() {
                scores[h * len + p] = dot(query, key(p)) * scale;
            }
        }
        causal_softmax(&mut scores, len, 1, len - 1);
        // WIDE outputs at a time, each summed over the positions in order: the sums stay in
        // registers, as independent chains, while the values stream past.
        const WIDE: usize = 4 * LANES;
        let whole = hd / WIDE * WIDE;
        for (head, weights) in out.chunks_exact_mut(hd).zip(scores.chunks_exact(len)) {
            for (c, chunk) in head[..whole].chunks_exact_mut(WIDE).enumerate() {
                let mut sums = [0.0f32; WIDE];
                for (p, &weight) in weights.iter().enumerate() {
                    let at = p * width + offset + c * WIDE;
                    let value: &[f32; WIDE] =
                        values[at..at + WIDE].try_into().expect("WIDE values");
                    for l in 0..WIDE {
                        sums[l] += weight * value[l];
                    }
                }
                chunk.copy_from_slice(&sums);
            }
            for (l, o) in head.iter_mut().enumerate().skip(whole) {
                let mut sum = 0.0f32;
                for (p, &weight) in weights.iter().enumerate() {
                    sum += weight * values[p * width + offset + l];
                }
                *o = sum;
            }
        }
    }
}

vectorized! {
    /// Softmax, in place, of each row of `scores` (rows of `keys` scores) over the keys a causal
    /// mask allows: row `r` is query `r % queries` of a block of `queries` consecutive
    /// positions that follow `start` cached ones, and may attend to keys `0..=start + r %
    /// queries`. Masked entries become 0 (whatever they held).
    pub fn causal_softmax(scores: &mut [f32], keys: usize, queries: usize, start: usize) {
        for (r, row) in scores.chunks_exact_mut(keys).enumerate() {
            let allowed = (start + r % queries + 1).min(keys);
            let (p, masked) = row.split_at_mut(allowed);
            let m = max(p);
            for v in p.iter_mut() {
                *v = exp(*v - m);
            }
            let inv = 1.0 / sum(p);
            for v in p.iter_mut() {
                *v *= inv;
            }
            masked.fill(0.0);
        }
    }
}

vectorized! {
    /// Gradient of [`causal_softmax`]'s scores, in place of its output gradient `grad`, from
    /// its output `probs`: `probs · (grad − Σ probs·grad)` per row, 0 where masked.
    pub fn causal_softmax_backward(
        probs: &[f32],
        grad: &mut [f32],
        keys: usize,
        queries: usize,
        start: usize,
    ) {
        for (r, (pr, gr)) in probs.chunks_exact(keys).zip(grad.chunks_exact_mut(keys)).enumerate() {
            let allowed = (start + r % queries + 1).min(keys);
            let (g, masked) = gr.split_at_mut(allowed);
            let p = &pr[..allowed];
            let centre = dot(p, g);
            for (gv, &pv) in g.iter_mut().zip(p) {
                *gv = pv * (*gv - centre);
            }
            masked.fill(0.0);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        pub(crate) static ISA_LIMIT: Cell<Isa> = const { Cell::new(Isa::Avx512) };
    }

    /// Every kernel's outputs under each instruction set, as bits.
    fn all_outputs() -> Vec<Vec<u32>> {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        let n = 67; // rows of 67: vector bodies and scalar tails both run
        let (x, w, dy) = (values(3 * n, 1), values(n, 2), values(3 * n, 3));
        let mut out = vec![];
        let mut y = vec![0.0; 3 * n];
        rms_norm(&x, &w, 1e-5, &mut y);
        out.push(bits(&y));
        let (mut dx, mut dw) = (vec![0.0; 3 * n], vec![0.0; n]);
        rms_norm_backward(&x, &w, &dy, 1e-5, &mut dx, &mut dw);
        out.extend([bits(&dx), bits(&dw)]);
        swiglu(&x, &dy, &mut y);
        out.push(bits(&y));
        let (mut dg, mut du) = (vec![0.0; 3 * n], vec![0.0; 3 * n]);
        swiglu_backward(&x, &dy, &y, &mut dg, &mut du);
        out.extend([bits(&dg), bits(&du)]);
        let shape = HeadsShape {
            batch: 2,
            seq: 5,
            heads: 3,
            head_dim: 22,
        };
        let len = 2 * 5 * 3 * 22;
        let (r, cos, sin) = (values(len, 4), values(5 * 22, 5), values(5 * 22, 6));
        let mut ry = vec![0.0; len];
        rope(&r, &cos, &sin, shape, &mut ry);
        let mut rdx = vec![0.0; len];
        rope_backward(&r, &cos, &sin, shape, &mut rdx);
        out.extend([bits(&ry), bits(&rdx)]);
        let mut p = x.clone();
        causal_softmax(&mut p, n, 3, 40);
        let mut g = dy.clone();
        causal_softmax_backward(&p, &mut g, n, 3, 40);
        out.extend([bits(&p), bits(&g)]);
        let (mut ap, mut am, mut av) = (
            x.clone(),
            dy.clone(),
            y.iter().map(|v| v.abs()).collect::<Vec<_>>(),
        );
        let step = AdamStep {
            beta1: 0.9,
            one_minus_beta1: 0.1,
            beta2: 0.95,
            one_minus_beta2: 0.05,
            bias2: 0.3,
            eps: 1e-8,
            step_size: 1e-3,
            decay_factor: 0.999,
        };
        adamw(&mut ap, &mut am, &mut av, &w.repeat(3), step);
        out.extend([bits(&ap), bits(&am), bits(&av)]);
        let mut attended = vec![0.0; 22];
        let (keys, vals) = (values(9 * 66, 10), values(9 * 66, 11));
        attend(&x[..22], 22, &keys, &vals, 9, 22, 66, &mut attended);
        out.push(bits(&attended));
        out
    }

    /// One query head as the decoder first computed it: a dot per key, the softmax, then
    /// each position's values added in turn.
    fn attend_one_by_one(
        query: &[f32],
        keys: &[f32],
        values: &[f32],
        len: usize,
        offset: usize,
        width: usize,
    ) -> Vec<f32> {
        let hd = query.len();
        let scale = 1.0 / (hd as f32).sqrt();
        let at = |p: usize| p * width + offset..p * width + offset + hd;
        let mut scores: Vec<f32> = (0..len).map(|p| dot(query, &keys[at(p)]) * scale).collect();
        causal_softmax(&mut scores, len, 1, len - 1);
        let mut out = vec![0.0f32; hd];
        for (p, &weight) in scores.iter().enumerate() {
            for (o, &v) in out.iter_mut().zip(&values[at(p)]) {
                *o += weight * v;
            }
        }
        out
    }

    #[test]
    fn attention_gives_the_bits_of_one_key_and_one_value_at_a_time() {
        // Head widths with and without a whole 64-lane body; lengths around groups of four;
        // one to three query heads per key-value head.
        for (hd, kv_heads) in [(64, 3), (22, 2), (80, 1)] {
            let width = hd * kv_heads;
            for len in [1, 3, 4, 5, 9, 70] {
                let (keys, vals) = (values(len * width, 7), values(len * width, 8));
                for heads in 1..=3 {
                    let queries = values(heads * hd, 9);
                    for offset in (0..kv_heads).map(|h| h * hd) {
                        let mut out = vec![0.0f32; heads * hd];
                        attend(&queries, hd, &keys, &vals, len, offset, width, &mut out);
                        let want: Vec<f32> = queries
                            .chunks_exact(hd)
                            .flat_map(|q| attend_one_by_one(q, &keys, &vals, len, offset, width))
                            .collect();
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&out), bits(&want), "{heads}×{hd}, {len} positions");
                    }
                }
            }
        }
    }

    #[test]
    fn every_instruction_set_computes_the_same_bits() {
        let widest = all_outputs();
        for isa in [Isa::Avx2, Isa::Baseline] {
            ISA_LIMIT.with(|l| l.set(isa));
            let narrower = all_outputs();
            ISA_LIMIT.with(|l| l.set(Isa::Avx512));
            for (i, (a, b)) in widest.iter().zip(&narrower).enumerate() {
                assert!(
                    a == b,
                    "output {i} differs between the widest set and {isa:?}"
                );
            }
        }
    }

    #[test]
    fn exp_is_within_two_ulp_of_std_over_the_range_used() {
        let mut worst = 0.0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x), x.exp());
            worst = worst.max((got - want).abs() / want);
            x += 0.001_7;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(f32::NEG_INFINITY) < 1e-37);
        assert!(exp(1000.0).is_finite());
    }

    /// Central differences of a scalar function of `x`, for checking a backward pass.
    fn numeric_grad(x: &[f32], f: impl Fn(&[f32]) -> f64) -> Vec<f64> {
        let h = 1e-2f32;
        (0..x.len())
            .map(|i| {
                let mut plus = x.to_vec();
                let mut minus = x.to_vec();
                plus[i] += h;
                minus[i] -= h;
                (f(&plus) - f(&minus)) / (2.0 * h as f64)
            })
            .collect()
    }

    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= 2e-3 * (1.0 + w.abs()),
                "{what}[{i}]: kernel {g}, numeric {w}"
            );
        }
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2000) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// Σ y·probe, the scalar whose gradient the backward kernels compute for dy = probe.
    fn probed(y: &[f32], probe: &[f32]) -> f64 {
        y.iter()
            .zip(probe)
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum()
    }

    #[test]
    fn rms_norm_backward_matches_numeric_gradients() {
        let n = 20; // not a multiple of LANES: the tail path runs too
        let (x, w, dy) = (values(3 * n, 1), values(n, 2), values(3 * n, 3));
        let eps = 1e-5;
        let forward = |x: &[f32], w: &[f32]| {
            let mut y = vec![0.0; x.len()];
            rms_norm(x, w, eps, &mut y);
            probed(&y, &dy)
        };
        let (mut dx, mut dw) = (vec![0.0; x.len()], vec![0.0; n]);
        rms_norm_backward(&x, &w, &dy, eps, &mut dx, &mut dw);
        assert_close(&dx, &numeric_grad(&x, |x| forward(x, &w)), "dx");
        assert_close(&dw, &numeric_grad(&w, |w| forward(&x, w)), "dweight");
    }

    #[test]
    fn swiglu_backward_matches_numeric_gradients() {
        let (g, u, dy) = (values(37, 4), values(37, 5), values(37, 6));
        let forward = |g: &[f32], u: &[f32]| {
            let mut y = vec![0.0; g.len()];
            swiglu(g, u, &mut y);
            probed(&y, &dy)
        };
        let (mut dg, mut du) = (vec![0.0; 37], vec![0.0; 37]);
        swiglu_backward(&g, &u, &dy, &mut dg, &mut du);
        assert_close(&dg, &numeric_grad(&g, |g| forward(g, &u)), "dgate");
        assert_close(&du, &numeric_grad(&u, |u| forward(&g, u)), "dup");
    }

    #[test]
    fn rope_backward_matches_numeric_gradients_and_moves_the_heads_axis() {
        let shape = HeadsShape {
            batch: 2,
            seq: 3,
            heads: 2,
            head_dim: 4,
        };
        let len = 2 * 3 * 2 * 4;
        let (x, dy) = (values(len, 7), values(len, 8));
        let (cos, sin) = (values(3 * 4, 9), values(3 * 4, 10));
        let forward = |x: &[f32]| {
            let mut y = vec![0.0; len];
            rope(x, &cos, &sin, shape, &mut y);
            probed(&y, &dy)
        };
        let mut dx = vec![0.0; len];
        rope_backward(&dy, &cos, &sin, shape, &mut dx);
        assert_close(&dx, &numeric_grad(&x, forward), "dx");

        // Batch 1, position 2, head 1 lands at [1, 1, 2, :].
        let mut y = vec![0.0; len];
        rope(&x, &cos, &sin, shape, &mut y);
        let src = &x[((3 + 2) * 2 + 1) * 4..][..4];
        let (c, s) = (&cos[2 * 4..][..4], &sin[2 * 4..][..4]);
        let want = [
            src[0] * c[0] + src[2] * s[0],
            src[1] * c[1] + src[3] * s[1],
            src[2] * c[2] + src[0] * s[2],
            src[3] * c[3] + src[1] * s[3],
        ];
        assert_eq!(&y[((2 + 1) * 3 + 2) * 4..][..4], &want);
    }

    #[test]
    fn causal_softmax_masks_future_keys_and_its_backward_matches_numeric_gradients() {
        // Two queries following 3 cached positions, 5 keys; two heads stacked as rows.
        let (keys, queries, start) = (5, 2, 3);
        let (s, dy) = (values(4 * keys, 11), values(4 * keys, 12));
        let mut p = s.clone();
        causal_softmax(&mut p, keys, queries, start);
        for (r, row) in p.chunks(keys).enumerate() {
            let allowed = start + r % queries + 1;
            assert!(row[allowed..].iter().all(|&v| v == 0.0), "row {r}: {row:?}");
            let total: f32 = row.iter().sum();
            assert!((total - 1.0).abs() < 1e-6, "row {r} sums to {total}");
            let m = s[r * keys..][..allowed]
                .iter()
                .fold(f32::MIN, |a, &b| a.max(b));
            let z: f32 = s[r * keys..][..allowed].iter().map(|v| (v - m).exp()).sum();
            assert!((row[0] - (s[r * keys] - m).exp() / z).abs() < 1e-6);
        }
        let forward = |s: &[f32]| {
            let mut p = s.to_vec();
            causal_softmax(&mut p, keys, queries, start);
            probed(&p, &dy)
        };
        let mut ds = dy.clone();
        causal_softmax_backward(&p, &mut ds, keys, queries, start);
        assert_close(&ds, &numeric_grad(&s, forward), "dscores");
    }
}
