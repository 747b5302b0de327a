//! Products of f32 activations with weight matrices kept in llama.cpp's block formats (Q4_0,
//! Q4_1, Q8_0; F32 and F16 too), for serving: the weights are read where they lie (a mapped
//! GGUF file), never expanded to f32.
//!
//! As ggml does, activations are quantized to 8 bits per block of 32 and each block's product
//! is an integer dot product; the block scales are applied in f32. The integer sums are exact,
//! and the f32 arithmetic is written out lane by lane in one fixed order, so the AVX2 version
//! and the portable one give the same bits (tested below).

use rayon::prelude::*;

use crate::kernels::{Isa, isa_limit};

mod tiled;

pub(crate) use tiled::GROUP_ROWS;
pub use tiled::{PackedMatrix, matmul_packed};

/// Values per quantization block (Q4_0, Q4_1, Q8_0 and the 8-bit activations).
pub const BLOCK: usize = 32;

/// How a weight matrix's values are stored: ggml's types, by their ggml names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
}

impl Format {
    /// From ggml's type id (ggml.h `enum ggml_type`).
    pub fn from_ggml(kind: u32) -> Option<Self> {
        Some(match kind {
            0 => Format::F32,
            1 => Format::F16,
            2 => Format::Q4_0,
            3 => Format::Q4_1,
            8 => Format::Q8_0,
            _ => return None,
        })
    }

    /// ggml's type id.
    pub fn ggml_type(self) -> u32 {
        match self {
            Format::F32 => 0,
            Format::F16 => 1,
            Format::Q4_0 => 2,
            Format::Q4_1 => 3,
            Format::Q8_0 => 8,
        }
    }

    /// (values, bytes) of one storage block.
    pub(crate) fn block(self) -> (usize, usize) {
        match self {
            Format::F32 => (1, 4),
            Format::F16 => (1, 2),
            Format::Q4_0 => (BLOCK, 18),
            Format::Q4_1 => (BLOCK, 20),
            Format::Q8_0 => (BLOCK, 34),
        }
    }

    fn quantized(self) -> bool {
        self.block().0 == BLOCK
    }

    /// Bytes of a row of `cols` values, or None when `cols` is not a whole number of blocks.
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        let (values, bytes) = self.block();
        cols.is_multiple_of(values)
            .then(|| (cols / values).checked_mul(bytes))
            .flatten()
    }
}

/// One block of 32 activations in 8 bits (ggml's `block_q8_1`, with f32 scales): values are
/// `d · q`; `s` is `d · Σq`, which Q4_1's offset needs, and `sum` is `Σq`.
#[derive(Clone, Copy, Debug)]
struct ActBlock {
    d: f32,
    s: f32,
    sum: i32,
    q: [i8; BLOCK],
}

/// Appends `x` (a whole number of blocks) quantized as ggml's `quantize_row_q8_1`: per block,
/// `d = max|x| / 127` and `q = x / d` rounded to the nearest integer, ties to even (as ggml's
/// AVX2 version rounds; its reference rounds ties away from zero). A block holding a NaN or an
/// infinity gets a NaN scale and zeros, so that it poisons the products as the f32 values
/// would.
fn quantize_acts(isa: Isa, x: &[f32], out: &mut Vec<ActBlock>) {
    debug_assert!(x.len().is_multiple_of(BLOCK));
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        // SAFETY: `block_isa` says Avx2 or wider only where the CPU has AVX2, FMA and F16C.
        unsafe { avx2::quantize_blocks(x, out) };
        return;
    }
    let _ = isa;
    for block in x.chunks_exact(BLOCK) {
        out.push(quantize_block(block.try_into().expect("chunks of BLOCK")));
    }
}

fn quantize_block(block: &[f32; BLOCK]) -> ActBlock {
    if !block.iter().all(|v| v.is_finite()) {
        return ActBlock::NON_FINITE;
    }
    let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0i8; BLOCK];
    for (q, v) in q.iter_mut().zip(block) {
        *q = (v * inverse).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    let sum: i32 = q.iter().map(|&v| v as i32).sum();
    ActBlock {
        d,
        s: d * sum as f32,
        sum,
        q,
    }
}

impl ActBlock {
    const NON_FINITE: ActBlock = ActBlock {
        d: f32::NAN,
        s: f32::NAN,
        sum: 0,
        q: [0; BLOCK],
    };
}

/// A `[rows, cols]` weight matrix in `format`, row-major as ggml stores it (each row `cols`
/// values), over bytes it borrows.
#[derive(Clone, Copy, Debug)]
pub struct QuantMatrix<'a> {
    pub format: Format,
    pub rows: usize,
    pub cols: usize,
    data: &'a [u8],
}

impl<'a> QuantMatrix<'a> {
    /// Checks that `data` holds exactly `rows × cols` values of `format`.
    pub fn new(format: Format, rows: usize, cols: usize, data: &'a [u8]) -> Result<Self, String> {
        let row = format
            .row_bytes(cols)
            .ok_or_else(|| format!("{cols} columns is not a whole number of {format:?} blocks"))?;
        let need = row
            .checked_mul(rows)
            .ok_or_else(|| format!("{rows}×{cols} overflows"))?;
        if data.len() != need {
            return Err(format!(
                "{} bytes of {format:?} data, {rows}×{cols} needs {need}",
                data.len()
            ));
        }
        Ok(QuantMatrix {
            format,
            rows,
            cols,
            data,
        })
    }

    fn row_bytes(&self) -> usize {
        self.data.len() / self.rows.max(1)
    }

    fn row(&self, r: usize) -> &'a [u8] {
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
    }

    /// Row `r` as f32 (as ggml's `dequantize_row_*`).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let row = self.row(r);
        match self.format {
            Format::F32 => {
                for (o, c) in out.iter_mut().zip(row.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            Format::F16 => {
                for (o, c) in out.iter_mut().zip(row.chunks_exact(2)) {
                    *o = f16(c, 0);
                }
            }
            Format::Q8_0 => {
                for (o, b) in out.chunks_exact_mut(BLOCK).zip(row.chunks_exact(34)) {
                    let d = f16(b, 0);
                    for (o, &q) in o.iter_mut().zip(&b[2..]) {
                        *o = (q as i8) as f32 * d;
                    }
                }
            }
            Format::Q4_0 | Format::Q4_1 => {
                let size = self.format.block().1;
                let q4_0 = self.format == Format::Q4_0;
                for (o, b) in out.chunks_exact_mut(BLOCK).zip(row.chunks_exact(size)) {
                    let d = f16(b, 0);
                    let min = if q4_0 { 0.0 } else { f16(b, 2) };
                    let (low, high) = o.split_at_mut(16);
                    for ((&packed, lo), hi) in b[size - 16..].iter().zip(low).zip(high) {
                        let (l, h) = ((packed & 0x0F) as f32, (packed >> 4) as f32);
                        if q4_0 {
                            (*lo, *hi) = ((l - 8.0) * d, (h - 8.0) * d);
                        } else {
                            (*lo, *hi) = (l * d + min, h * d + min);
                        }
                    }
                }
            }
        }
    }
}

fn f16(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Element `i` of a Q4 block: ggml packs element `i` in the low nibble of byte `i` and
/// element `i + 16` in its high nibble.
fn nibble(nibbles: &[u8], i: usize) -> u8 {
    if i < 16 {
        nibbles[i] & 0x0F
    } else {
        nibbles[i - 16] >> 4
    }
}

/// Rows per parallel task: enough work to outweigh handing it to a thread.
const ROWS_PER_TASK: usize = 32;

/// From this many input rows on (a prompt), weights are expanded to f32 and multiplied by a
/// blocked f32 matrix product: each expanded row then serves every input row, which beats an
/// integer dot product per pair.
pub const GEMM_ROWS: usize = 32;

/// `out[i · rows + r] = x_i · w_r` through the whole of `w` expanded to f32 (split over the
/// pool by rows) and one blocked product, which splits itself over the pool.
fn expanded_product(w: &QuantMatrix, x: &[f32], n: usize, out: &mut [f32]) {
    let mut expanded = vec![0.0f32; w.rows * w.cols];
    expanded
        .par_chunks_mut(w.cols * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(t, chunk)| {
            for (r, row) in chunk.chunks_exact_mut(w.cols).enumerate() {
                w.dequantize_row(t * ROWS_PER_TASK + r, row);
            }
        });
    // out (n × rows, row-major) = x (n × cols) · expandedᵀ (cols × rows).
    // SAFETY: every pointer covers the matrix its strides describe.
    unsafe {
        gemm::gemm(
            n,
            w.rows,
            w.cols,
            out.as_mut_ptr(),
            1,
            w.rows as isize,
            false,
            x.as_ptr(),
            1,
            w.cols as isize,
            expanded.as_ptr(),
            w.cols as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
}

/// `out[i · rows + r] = x_i · w_r` for the `n` rows `x_i` of `x` (`n × cols`, row-major): the
/// product `x · wᵀ`, split over the compute pool by rows of `w`.
pub fn matmul(w: &QuantMatrix, x: &[f32], n: usize, out: &mut [f32]) {
    matmul_many(&mut [(*w, out)], x, n);
}

/// [`matmul`] of one input by several matrices of the same width (a layer's query, key and
/// value projections), quantizing the input once and sharing one parallel pass (for a
/// prompt, one blocked product each).
pub fn matmul_many(products: &mut [(QuantMatrix<'_>, &mut [f32])], x: &[f32], n: usize) {
    matmul_many_from(products, x, n, GEMM_ROWS);
}

/// [`matmul_many`], expanding the weights to f32 (f32 activations, no 8-bit blocks) from
/// `expand_from` input rows on rather than from [`GEMM_ROWS`].
pub fn matmul_many_from(
    products: &mut [(QuantMatrix<'_>, &mut [f32])],
    x: &[f32],
    n: usize,
    expand_from: usize,
) {
    let Some(cols) = products.first().map(|(w, _)| w.cols) else {
        return;
    };
    for (w, out) in products.iter() {
        assert_eq!(w.cols, cols, "matrices of one input share its width");
        assert_eq!(out.len(), n * w.rows, "output is not n × rows");
    }
    assert_eq!(x.len(), n * cols, "activations are not n × cols");
    if n >= expand_from {
        for (w, out) in products.iter_mut() {
            expanded_product(w, x, n, out);
        }
        return;
    }
    let isa = block_isa();
    let mut acts = Vec::new();
    if products.iter().any(|(w, _)| w.format.quantized()) {
        acts.reserve(n * cols / BLOCK);
        quantize_acts(isa, x, &mut acts);
    }
    let input = Input { x, acts, cols };
    let matrices: Vec<QuantMatrix> = products.iter().map(|(w, _)| *w).collect();
    // With several input rows, products land weight-row-major (each task's rows contiguous)
    // and are transposed after.
    let mut by_row: Vec<Vec<f32>> = if n == 1 {
        Vec::new()
    } else {
        matrices.iter().map(|w| vec![0.0; n * w.rows]).collect()
    };
    let targets: Vec<&mut [f32]> = if n == 1 {
        products.iter_mut().map(|(_, out)| &mut **out).collect()
    } else {
        by_row.iter_mut().map(|b| &mut b[..]).collect()
    };
    let mut tasks = Vec::new();
    for (k, target) in targets.into_iter().enumerate() {
        for (t, chunk) in target.chunks_mut(ROWS_PER_TASK * n).enumerate() {
            tasks.push((k, t * ROWS_PER_TASK, chunk));
        }
    }
    tasks.into_par_iter().for_each(|(k, first, chunk)| {
        let w = &matrices[k];
        for (r, outs) in chunk.chunks_exact_mut(n).enumerate() {
            input.dots(isa, w, w.row(first + r), outs);
        }
    });
    for ((w, out), products) in products.iter_mut().zip(&by_row) {
        // Written in order, read with a stride; split over the pool when there is enough.
        let transpose = |(i, out): (usize, &mut [f32])| {
            for (o, p) in out.iter_mut().zip(products[i..].iter().step_by(n)) {
                *o = *p;
            }
        };
        if w.rows * n >= TRANSPOSE_IN_PARALLEL {
            out.par_chunks_mut(w.rows).enumerate().for_each(transpose);
        } else {
            out.chunks_mut(w.rows).enumerate().for_each(transpose);
        }
    }
}

/// Products from which the transposition back to input-row order is worth splitting.
const TRANSPOSE_IN_PARALLEL: usize = 1 << 16;

/// The input of a product: f32 rows, and their 8-bit blocks when a block format needs them.
struct Input<'a> {
    x: &'a [f32],
    acts: Vec<ActBlock>,
    cols: usize,
}

impl Input<'_> {
    /// `outs[i]` = input row `i` · the weight row `row` of `w`, for every input row.
    fn dots(&self, isa: Isa, w: &QuantMatrix, row: &[u8], outs: &mut [f32]) {
        if !w.format.quantized() {
            for (i, o) in outs.iter_mut().enumerate() {
                *o = float_dot(w.format, row, &self.x[i * self.cols..(i + 1) * self.cols]);
            }
            return;
        }
        let blocks = self.cols / BLOCK;
        let acts = |i: usize| &self.acts[i * blocks..(i + 1) * blocks];
        // Input rows in groups of ROW_GROUP share each weight block's unpacking. Every pair's
        // sums are the ones a group of one computes, in the same order: a sequence's products
        // do not depend on what else is in its batch.
        let mut first = 0;
        for group in outs.chunks_mut(ROW_GROUP) {
            if group.len() == ROW_GROUP {
                let inputs: [&[ActBlock]; ROW_GROUP] = std::array::from_fn(|j| acts(first + j));
                group.copy_from_slice(&block_dots(isa, w.format, row, inputs));
            } else {
                for (j, o) in group.iter_mut().enumerate() {
                    [*o] = block_dots(isa, w.format, row, [acts(first + j)]);
                }
            }
            first += group.len();
        }
    }
}

/// Input rows whose products with one weight row are computed together.
const ROW_GROUP: usize = 4;

/// Eight f32 lanes summed in the order AVX2's horizontal sum takes.
#[inline(always)]
fn reduce_lanes(a: [f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// An F32 or F16 row · f32 activations, in eight lanes.
fn float_dot(format: Format, row: &[u8], x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let width = if format == Format::F32 { 4 } else { 2 };
    for (bytes, xs) in row.chunks(8 * width).zip(x.chunks(8)) {
        for (j, (b, &v)) in bytes.chunks_exact(width).zip(xs).enumerate() {
            let w = if width == 4 {
                f32::from_le_bytes([b[0], b[1], b[2], b[3]])
            } else {
                f16(b, 0)
            };
            lanes[j] += w * v;
        }
    }
    reduce_lanes(lanes)
}

/// A quantized weight row · each of `N` rows of quantized activations: per block, eight exact
/// integer partial sums (lane `j` holds elements `4j..4j+4`, as AVX2's `maddubs` and `madd`
/// pair them), scaled and added into eight f32 lanes. Each pair's arithmetic is the same for
/// every `N`.
fn block_dots<const N: usize>(
    isa: Isa,
    format: Format,
    row: &[u8],
    acts: [&[ActBlock]; N],
) -> [f32; N] {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: `block_isa` says Avx512 only where the CPU has AVX-512 VNNI (and VL), AVX2,
        // FMA and F16C, which `avx2::block_dots_vnni` is compiled for.
        Isa::Avx512 => return unsafe { avx2::block_dots_vnni(format, row, acts) },
        // SAFETY: as above, AVX2, FMA and F16C for `avx2::block_dots`.
        Isa::Avx2 => return unsafe { avx2::block_dots(format, row, acts) },
        Isa::Baseline => {}
    }
    let _ = isa;
    acts.map(|a| portable_block_dot(format, row, a))
}

/// The instruction set the block kernels use here, checked once per product, as far as the
/// limit allows: Avx512 stands for AVX-512 VNNI on 256-bit vectors (one `vpdpbusd` for AVX2's
/// `maddubs` and `madd`: the same exact integer sums), Avx2 for AVX2 with FMA and F16C, and
/// Baseline for the portable code.
fn block_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c");
        let vnni = std::is_x86_feature_detected!("avx512vnni")
            && std::is_x86_feature_detected!("avx512vl");
        let limit = isa_limit();
        if avx2 && vnni && limit >= Isa::Avx512 {
            return Isa::Avx512;
        }
        if avx2 && limit >= Isa::Avx2 {
            return Isa::Avx2;
        }
    }
    Isa::Baseline
}

fn portable_block_dot(format: Format, row: &[u8], acts: &[ActBlock]) -> f32 {
    let size = format.block().1;
    // Two sets of lanes, for even and odd blocks: two independent chains of additions.
    let mut lanes = [[0.0f32; 8]; 2];
    let mut offsets = 0.0f32;
    for (k, (b, a)) in row.chunks_exact(size).zip(acts).enumerate() {
        let mut sums = [0i32; 8];
        for (i, &q) in a.q.iter().enumerate() {
            let w = match format {
                Format::Q8_0 => b[2 + i] as i8 as i32,
                Format::Q4_0 => nibble(&b[2..], i) as i32 - 8,
                _ => nibble(&b[4..], i) as i32,
            };
            sums[i / 4] += w * q as i32;
        }
        let scale = f16(b, 0) * a.d;
        for (lane, &sum) in lanes[k % 2].iter_mut().zip(&sums) {
            // Fused, as AVX2's `fmadd` is: one rounding.
            *lane = scale.mul_add(sum as f32, *lane);
        }
        if format == Format::Q4_1 {
            offsets = f16(b, 2).mul_add(a.s, offsets);
        }
    }
    let [even, odd] = lanes;
    let mut both = [0.0f32; 8];
    for ((s, e), o) in both.iter_mut().zip(even).zip(odd) {
        *s = e + o;
    }
    reduce_lanes(both) + offsets
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{ActBlock, BLOCK, Format};

    /// The same sums as `portable_block_dot`, in the same order, for `N` activation rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn block_dots<const N: usize>(
        format: Format,
        row: &[u8],
        acts: [&[ActBlock]; N],
    ) -> [f32; N] {
        // SAFETY: the caller's, passed on.
        unsafe { by_format::<N, false>(format, row, acts) }
    }

    /// `block_dots`, each block's integer sums taken by one AVX-512 VNNI `vpdpbusd` (on
    /// 256-bit vectors): the same exact sums, so the same bits.
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    pub(super) unsafe fn block_dots_vnni<const N: usize>(
        format: Format,
        row: &[u8],
        acts: [&[ActBlock]; N],
    ) -> [f32; N] {
        // SAFETY: the caller's, passed on.
        unsafe { by_format::<N, true>(format, row, acts) }
    }

    #[inline(always)]
    unsafe fn by_format<const N: usize, const VNNI: bool>(
        format: Format,
        row: &[u8],
        acts: [&[ActBlock]; N],
    ) -> [f32; N] {
        // SAFETY (all three): `row` holds `acts[i].len()` whole blocks of the format.
        unsafe {
            match format {
                Format::Q8_0 => blocks::<34, N, VNNI>(row, acts, |b| {
                    let w = _mm256_loadu_si256(b.add(2).cast());
                    (w, true)
                }),
                Format::Q4_0 => blocks::<18, N, VNNI>(row, acts, |b| {
                    let w = _mm256_sub_epi8(nibbles(b.add(2)), _mm256_set1_epi8(8));
                    (w, true)
                }),
                _ => blocks::<20, N, VNNI>(row, acts, |b| (nibbles(b.add(4)), false)),
            }
        }
    }

    /// Sums blocks of `SIZE` bytes whose 32 weights `weights` loads (and says whether they
    /// are signed) against `N` rows of activation blocks; a 20-byte block is Q4_1, whose
    /// offset is added separately. Even and odd blocks add into separate lanes, two
    /// independent chains per row. `VNNI` takes each block's integer sums in one instruction
    /// (only within a function compiled for AVX-512 VNNI).
    #[inline(always)]
    unsafe fn blocks<const SIZE: usize, const N: usize, const VNNI: bool>(
        row: &[u8],
        acts: [&[ActBlock]; N],
        weights: impl Fn(*const u8) -> (__m256i, bool),
    ) -> [f32; N] {
        let base = row.as_ptr();
        let count = acts[0].len();
        // SAFETY: block `k` lies within `row` for every `k < count`; loads are unaligned.
        unsafe {
            // A macro, not a closure: closures do not take on the target features.
            macro_rules! one {
                ($k:expr, $lanes:expr, $offsets:expr) => {{
                    let b = base.add($k * SIZE);
                    let (w, signed) = weights(b);
                    let magnitude = if signed { _mm256_sign_epi8(w, w) } else { w };
                    let scale = _mm256_set1_ps(half(b));
                    let min = if SIZE == 20 { half(b.add(2)) } else { 0.0 };
                    let ones = _mm256_set1_epi16(1);
                    for i in 0..N {
                        let a = acts[i].get_unchecked($k);
                        let q = _mm256_loadu_si256(a.q.as_ptr().cast());
                        let q = if signed { _mm256_sign_epi8(q, w) } else { q };
                        // Exact either way: `maddubs` cannot saturate on a magnitude of at
                        // most 128 against |q| ≤ 127.
                        let sums = if VNNI {
                            _mm256_dpbusd_epi32(_mm256_setzero_si256(), magnitude, q)
                        } else {
                            _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, q), ones)
                        };
                        let sums = _mm256_cvtepi32_ps(sums);
                        if SIZE == 20 {
                            $offsets[i] = min.mul_add(a.s, $offsets[i]);
                        }
                        // `scale · d` in a vector is the scalar product's bits, and spares
                        // a shuffle per pair; the weight's scale is broadcast once per block.
                        let scaled = _mm256_mul_ps(scale, _mm256_set1_ps(a.d));
                        $lanes[i] = _mm256_fmadd_ps(scaled, sums, $lanes[i]);
                    }
                }};
            }
            let mut even = [_mm256_setzero_ps(); N];
            let mut odd = [_mm256_setzero_ps(); N];
            let mut offsets = [0.0f32; N];
            let mut k = 0;
            while k + 1 < count {
                one!(k, even, offsets);
                one!(k + 1, odd, offsets);
                k += 2;
            }
            if k < count {
                one!(k, even, offsets);
            }
            let mut out = [0.0f32; N];
            for i in 0..N {
                let mut lanes = [0.0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(even[i], odd[i]));
                out[i] = super::reduce_lanes(lanes) + offsets[i];
            }
            out
        }
    }

    /// `super::quantize_acts` on AVX2: the loop compiled with the block's features, so that
    /// each block's quantization is inlined into it.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_blocks(x: &[f32], out: &mut Vec<ActBlock>) {
        out.reserve(x.len() / BLOCK);
        for block in x.chunks_exact(BLOCK) {
            // SAFETY: the caller's.
            out.push(unsafe { quantize_block(block.try_into().expect("chunks of BLOCK")) });
        }
    }

    /// `super::quantize_block`, the same bits.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_block(block: &[f32; BLOCK]) -> ActBlock {
        // SAFETY: the four loads read the block's 32 values.
        unsafe {
            let p = block.as_ptr();
            let v = [0, 8, 16, 24].map(|at| _mm256_loadu_ps(p.add(at)));
            let magnitude = v.map(|v| _mm256_andnot_ps(_mm256_set1_ps(-0.0), v));
            let infinity = _mm256_set1_ps(f32::INFINITY);
            // Ordered "less than": false for NaN and for infinities.
            let finite =
                magnitude.map(|m| _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(m, infinity)));
            if finite.iter().any(|&mask| mask != 0xFF) {
                return ActBlock::NON_FINITE;
            }
            let max = _mm256_max_ps(
                _mm256_max_ps(magnitude[0], magnitude[1]),
                _mm256_max_ps(magnitude[2], magnitude[3]),
            );
            let max = _mm_max_ps(_mm256_castps256_ps128(max), _mm256_extractf128_ps::<1>(max));
            let max = _mm_max_ps(max, _mm_movehl_ps(max, max));
            let amax = _mm_cvtss_f32(_mm_max_ss(max, _mm_movehdup_ps(max)));
            let d = amax / 127.0;
            let inverse = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
            let (low, high) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
            const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
            let ints = v.map(|v| {
                let scaled = _mm256_round_ps::<NEAREST>(_mm256_mul_ps(v, inverse));
                _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(scaled, low), high))
            });
            let sums = _mm256_add_epi32(
                _mm256_add_epi32(ints[0], ints[1]),
                _mm256_add_epi32(ints[2], ints[3]),
            );
            let mut lanes = [0i32; 8];
            _mm256_storeu_si256(lanes.as_mut_ptr().cast(), sums);
            let sum: i32 = lanes.iter().sum();
            // The two packs interleave 32-bit groups across the 128-bit halves; the
            // permutation puts the values back in order.
            let packed = _mm256_packs_epi16(
                _mm256_packs_epi32(ints[0], ints[1]),
                _mm256_packs_epi32(ints[2], ints[3]),
            );
            let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            let mut q = [0i8; BLOCK];
            _mm256_storeu_si256(
                q.as_mut_ptr().cast(),
                _mm256_permutevar8x32_epi32(packed, order),
            );
            ActBlock {
                d,
                s: d * sum as f32,
                sum,
                q,
            }
        }
    }

    /// The f16 at `p`, exactly (F16C).
    #[inline(always)]
    unsafe fn half(p: *const u8) -> f32 {
        // SAFETY: the caller passes 2 readable bytes.
        unsafe {
            let bits = p.cast::<u16>().read_unaligned();
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
        }
    }

    /// A Q4 block's 16 bytes as 32 bytes in element order: low nibbles, then high nibbles.
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        // SAFETY: the caller passes 16 readable bytes.
        unsafe {
            let packed = _mm_loadu_si128(p.cast());
            let mask = _mm_set1_epi8(0x0F);
            let low = _mm_and_si128(packed, mask);
            let high = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
            _mm256_set_m128i(high, low)
        }
    }
}

/// Quantizes `x` (a whole number of blocks) to `format`, as ggml's reference quantizers do:
/// for writing GGUF files and for tests.
pub fn quantize(format: Format, x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    match format {
        Format::F32 => x.iter().for_each(|v| out.extend(v.to_le_bytes())),
        Format::F16 => x
            .iter()
            .for_each(|v| out.extend(half::f16::from_f32(*v).to_le_bytes())),
        Format::Q8_0 => {
            // ggml's `quantize_row_q8_0_ref`: ties round away from zero.
            for block in x.chunks_exact(BLOCK) {
                let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(half::f16::from_f32(d).to_le_bytes());
                out.extend(block.iter().map(|v| (v * inverse).round() as i8 as u8));
            }
        }
        Format::Q4_0 | Format::Q4_1 => {
            for block in x.chunks_exact(BLOCK) {
                quantize_q4(format, block, &mut out);
            }
        }
    }
    out
}

/// ggml's `quantize_row_q4_0_ref` / `quantize_row_q4_1_ref` for one block.
fn quantize_q4(format: Format, block: &[f32], out: &mut Vec<u8>) {
    let (d, min) = if format == Format::Q4_0 {
        // The value of largest magnitude, with its sign, maps to -8.
        let max = block
            .iter()
            .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        (max / -8.0, 0.0)
    } else {
        let min = block.iter().fold(f32::MAX, |m, &v| m.min(v));
        let max = block.iter().fold(f32::MIN, |m, &v| m.max(v));
        ((max - min) / 15.0, min)
    };
    let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
    let level = |v: f32| -> u8 {
        if format == Format::Q4_0 {
            ((v * inverse + 8.5) as i32).clamp(0, 15) as u8
        } else {
            (((v - min) * inverse + 0.5) as i32).clamp(0, 15) as u8
        }
    };
    out.extend(half::f16::from_f32(d).to_le_bytes());
    if format == Format::Q4_1 {
        out.extend(half::f16::from_f32(min).to_le_bytes());
    }
    for i in 0..16 {
        out.push(level(block[i]) | (level(block[i + 16]) << 4));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::ISA_LIMIT;
    use rand::{Rng, SeedableRng};

    const ALL: [Format; 5] = [
        Format::F32,
        Format::F16,
        Format::Q4_0,
        Format::Q4_1,
        Format::Q8_0,
    ];

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn dequantized(w: &QuantMatrix) -> Vec<f32> {
        let mut out = vec![0.0; w.rows * w.cols];
        for (r, row) in out.chunks_exact_mut(w.cols).enumerate() {
            w.dequantize_row(r, row);
        }
        out
    }

    /// `x · wᵀ` in f64 over the dequantized weights and (for block formats) the dequantized
    /// activations: what the kernels must equal up to f32 rounding.
    fn reference(w: &QuantMatrix, x: &[f32], n: usize) -> Vec<f64> {
        let eight_bit = w.format.quantized() && n < GEMM_ROWS;
        reference_with(w, x, n, eight_bit)
    }

    /// [`reference`], the activations quantized to 8-bit blocks first when `eight_bit`.
    fn reference_with(w: &QuantMatrix, x: &[f32], n: usize, eight_bit: bool) -> Vec<f64> {
        let weights = dequantized(w);
        let x: Vec<f32> = if eight_bit {
            let mut acts = Vec::new();
            quantize_acts(Isa::Baseline, x, &mut acts);
            acts.iter()
                .flat_map(|a| a.q.map(|q| q as f32 * a.d))
                .collect()
        } else {
            x.to_vec()
        };
        let mut out = vec![0.0; n * w.rows];
        for i in 0..n {
            for r in 0..w.rows {
                out[i * w.rows + r] = (0..w.cols)
                    .map(|c| x[i * w.cols + c] as f64 * weights[r * w.cols + c] as f64)
                    .sum();
            }
        }
        out
    }

    #[test]
    fn products_match_the_dequantized_reference_for_every_format_and_odd_sizes() {
        for format in ALL {
            for (rows, cols, n) in [
                (1, 32, 1),
                (37, 96, 3),
                (65, 64, 1),
                (3, 320, 5),
                (70, 64, 40),
            ] {
                let bytes = quantize(format, &values(rows * cols, 1));
                let w = QuantMatrix::new(format, rows, cols, &bytes).unwrap();
                let x = values(n * cols, 2);
                let mut out = vec![0.0; n * rows];
                matmul(&w, &x, n, &mut out);
                for (k, (&got, &want)) in out.iter().zip(&reference(&w, &x, n)).enumerate() {
                    let bound = 1e-5 * (cols as f64).sqrt() * (1.0 + want.abs());
                    assert!(
                        (got as f64 - want).abs() <= bound,
                        "{format:?} {rows}×{cols} n={n} [{k}]: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// Every block kernel this CPU can run, widest first, the portable one last; says so
    /// when the CPU lacks one (it is then tested where the CPU has it).
    fn tested_block_isas() -> Vec<Isa> {
        let mut isas = Vec::new();
        for isa in [Isa::Avx512, Isa::Avx2, Isa::Baseline] {
            ISA_LIMIT.with(|l| l.set(isa));
            let runs = block_isa();
            ISA_LIMIT.with(|l| l.set(Isa::Avx512));
            if runs == isa {
                isas.push(isa);
            } else {
                println!("block kernels for {isa:?}: not tested, this CPU lacks them");
            }
        }
        isas
    }

    const BLOCK_FORMATS: [Format; 3] = [Format::Q4_0, Format::Q4_1, Format::Q8_0];

    use tiled::tests::tiled_product;

    #[test]
    fn tiled_products_match_the_reference_and_the_portable_bits() {
        let vnni = PackedMatrix::available();
        if !vnni {
            println!("tiled VNNI kernel: not tested, this CPU lacks AVX-512 VNNI");
        }
        // Rows that are not whole tiles of eight, inputs that are not whole groups of four.
        for format in BLOCK_FORMATS {
            for (rows, cols, n) in [
                (1, 32, 1),
                (13, 96, 3),
                (70, 64, 9),
                (8, 320, 4),
                (41, 192, 37),
            ] {
                let bytes = quantize(format, &values(rows * cols, 5));
                let w = QuantMatrix::new(format, rows, cols, &bytes).unwrap();
                let x = values(n * cols, 6);
                let portable = tiled_product(&w, &x, n, false);
                let want = reference_with(&w, &x, n, true);
                for (k, (&got, &want)) in portable.iter().zip(&want).enumerate() {
                    let bound = 1e-5 * (cols as f64).sqrt() * (1.0 + want.abs());
                    assert!(
                        (got as f64 - want).abs() <= bound,
                        "{format:?} {rows}×{cols} n={n} [{k}]: {got} vs {want}"
                    );
                }
                if vnni {
                    let fast = tiled_product(&w, &x, n, true);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&fast),
                        bits(&portable),
                        "{format:?} {rows}×{cols} n={n}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_tiled_input_row_gets_the_same_bits_alone_as_among_others() {
        // Nine rows: two groups of four and one alone.
        let (rows, cols, n) = (19, 96, 9);
        for format in BLOCK_FORMATS {
            let bytes = quantize(format, &values(rows * cols, 12));
            let w = QuantMatrix::new(format, rows, cols, &bytes).unwrap();
            let x = values(n * cols, 13);
            let mut kernels = vec![false];
            kernels.extend(PackedMatrix::available().then_some(true));
            for vnni in kernels {
                let together = tiled_product(&w, &x, n, vnni);
                for i in 0..n {
                    let alone = tiled_product(&w, &x[i * cols..(i + 1) * cols], 1, vnni);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&alone),
                        bits(&together[i * rows..(i + 1) * rows]),
                        "{format:?} vnni={vnni} row {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_non_finite_activation_poisons_its_tiled_products_only() {
        let (rows, cols, n) = (9, 64, 5);
        for format in BLOCK_FORMATS {
            let bytes = quantize(format, &values(rows * cols, 7));
            let w = QuantMatrix::new(format, rows, cols, &bytes).unwrap();
            let mut x = values(n * cols, 8);
            x[2 * cols + 40] = f32::INFINITY;
            for vnni in [false, PackedMatrix::available()] {
                let out = tiled_product(&w, &x, n, vnni);
                for (i, products) in out.chunks_exact(rows).enumerate() {
                    assert!(
                        products.iter().all(|p| p.is_nan() == (i == 2)),
                        "{format:?} vnni={vnni} input {i}: {products:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        // Six input rows: one group of four and two alone.
        let (rows, cols, n) = (41, 192, 6);
        for format in ALL {
            let bytes = quantize(format, &values(rows * cols, 3));
            let w = QuantMatrix::new(format, rows, cols, &bytes).unwrap();
            let x = values(n * cols, 4);
            let run = |isa: Isa| {
                ISA_LIMIT.with(|l| l.set(isa));
                let mut out = vec![0.0f32; n * rows];
                matmul(&w, &x, n, &mut out);
                ISA_LIMIT.with(|l| l.set(Isa::Avx512));
                out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            let portable = run(Isa::Baseline);
            for isa in tested_block_isas() {
                assert_eq!(run(isa), portable, "{isa:?} {format:?}");
            }
        }
    }

    #[test]
    fn an_input_row_gets_the_same_bits_alone_as_among_others() {
        // 96 columns: an odd number of blocks, so the last block adds into the even lanes.
        let (rows, cols) = (5, 96);
        for isa in tested_block_isas() {
            ISA_LIMIT.with(|l| l.set(isa));
            for format in ALL {
                let bytes = quantize(format, &values(rows * cols, 8));
                let w = QuantMatrix::new(format, rows, cols, &bytes).unwrap();
                for n in 2..=11 {
                    let x = values(n * cols, 9 + n as u64);
                    let mut together = vec![0.0f32; n * rows];
                    matmul(&w, &x, n, &mut together);
                    for (i, input) in x.chunks_exact(cols).enumerate() {
                        let mut alone = vec![0.0f32; rows];
                        matmul(&w, input, 1, &mut alone);
                        let got = &together[i * rows..(i + 1) * rows];
                        assert_eq!(
                            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            "{isa:?} {format:?} row {i} of {n}"
                        );
                    }
                }
            }
            ISA_LIMIT.with(|l| l.set(Isa::Avx512));
        }
    }

    #[test]
    fn extreme_values_neither_saturate_nor_differ_between_instruction_sets() {
        // Q8_0 weights of -128 (which ggml's quantizer never writes, but a file may hold)
        // against activations of ±127: the largest pair sums `maddubs` sees.
        let cols = 64;
        let mut bytes = Vec::new();
        for _ in 0..cols / BLOCK {
            bytes.extend(half::f16::from_f32(1.0).to_le_bytes());
            bytes.extend([0x80u8; BLOCK]);
        }
        let w = QuantMatrix::new(Format::Q8_0, 1, cols, &bytes).unwrap();
        let x: Vec<f32> = (0..cols)
            .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 })
            .collect();
        let want = reference(&w, &x, 1)[0] as f32;
        for isa in tested_block_isas() {
            ISA_LIMIT.with(|l| l.set(isa));
            let mut out = [0.0f32];
            matmul(&w, &x, 1, &mut out);
            ISA_LIMIT.with(|l| l.set(Isa::Avx512));
            assert_eq!(out[0], want, "{isa:?}");
        }
    }

    #[test]
    fn activations_quantize_to_the_same_blocks_on_every_instruction_set() {
        // Random blocks; one whose scale is 1, so that x.5 values are ties (to even: 2.5 → 2,
        // -3.5 → -4, 0.5 → 0); zeros; and blocks holding a NaN or an infinity.
        let mut x = values(4 * BLOCK, 10);
        let mut ties = vec![0.0f32; BLOCK];
        ties[..5].copy_from_slice(&[127.0, 2.5, -3.5, 0.5, -126.5]);
        x.extend(&ties);
        x.extend([0.0f32; BLOCK]);
        for poison in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut block = values(BLOCK, 11);
            block[7] = poison;
            x.extend(block);
        }
        let quantized = |isa: Isa| {
            let mut acts = Vec::new();
            quantize_acts(isa, &x, &mut acts);
            acts.iter()
                .map(|a| (a.d.to_bits(), a.s.to_bits(), a.q))
                .collect::<Vec<_>>()
        };
        let portable = quantized(Isa::Baseline);
        assert_eq!(portable, quantized(block_isa()));
        assert_eq!(portable[4].2[..5], [127, 2, -4, 0, -126]);
        assert!(portable[5].2.iter().all(|&q| q == 0) && portable[5].0 == 0);
        for poisoned in &portable[6..] {
            assert!(f32::from_bits(poisoned.0).is_nan() && poisoned.2 == [0; BLOCK]);
        }
    }

    #[test]
    fn quantizers_round_trip_within_a_step() {
        let x = values(4 * BLOCK, 5);
        for format in [Format::Q4_0, Format::Q4_1, Format::Q8_0] {
            let bytes = quantize(format, &x);
            let w = QuantMatrix::new(format, 1, x.len(), &bytes).unwrap();
            let mut back = vec![0.0; x.len()];
            w.dequantize_row(0, &mut back);
            let step = if format == Format::Q8_0 {
                1.0 / 127.0
            } else {
                2.0 / 15.0
            };
            for (a, b) in x.iter().zip(&back) {
                assert!((a - b).abs() <= step, "{format:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn a_non_finite_activation_poisons_its_products() {
        let bytes = quantize(Format::Q8_0, &values(64, 6));
        let w = QuantMatrix::new(Format::Q8_0, 1, 64, &bytes).unwrap();
        let mut x = values(64, 7);
        x[40] = f32::NAN;
        let mut out = [0.0f32];
        matmul(&w, &x, 1, &mut out);
        assert!(out[0].is_nan());
    }

    #[test]
    fn a_matrix_of_the_wrong_size_is_refused() {
        assert!(QuantMatrix::new(Format::Q4_0, 2, 32, &[0; 35]).is_err());
        assert!(QuantMatrix::new(Format::Q4_0, 1, 30, &[0; 18]).is_err());
    }
}
