//! Products on weights repacked once, when a model is opened, where the CPU has AVX-512 (F,
//! BW, VNNI), as llama.cpp repacks Q4_0 for its CPU kernels. Sixteen weight rows form a
//! tile: one 512-bit `vpdpbusd` multiplies a 4-byte piece of one activation block by the same
//! piece of all sixteen rows, leaving each row's exact integer block sum in its own lane. The
//! block scales then apply to sixteen rows in one vector, and each tile, unpacked once per
//! block, serves up to eight input rows in turn: a third or less of the per-pair work of
//! [`super::block_dots`], which has to sum each pair's lanes on its own. Every step takes
//! this path, one token or a prompt, and each input row's arithmetic is the same in any
//! group, so a sequence's bits do not depend on what shares its batch.
//!
//! A tile keeps the file's bytes per weight: Q4 blocks stay nibbles (each tile byte is the
//! file's byte, low nibble element `i`, high nibble element `16 + i`), Q8_0 bytes are stored
//! offset by 128, scales stay f16. `vpdpbusd` takes the weights as its unsigned operand and
//! the activations' 8-bit blocks as its signed one; the share of Q4_0's bias of 8 and of
//! Q8_0's offset of 128, `8 · Σq` or `128 · Σq` per activation block, is taken back off the
//! integer sums. A block's sum is exact, so the portable code below gives the same bits
//! (tested against it).

use rayon::prelude::*;

use super::{ActBlock, BLOCK, Format, QuantMatrix, block_isa, f16, quantize_acts};

/// Weight rows packed together: one 32-bit lane each in a 512-bit vector.
const TILE: usize = 16;

/// The most input rows that share each unpacked block of a tile.
pub(crate) const GROUP_ROWS: usize = 8;

/// Input rows that share each unpacked block of a tile: the largest of these that fits.
const INPUT_GROUPS: [usize; 3] = [GROUP_ROWS, 4, 1];

/// Tiles per parallel task.
const TILES_PER_TASK: usize = 2;

/// Rows per parallel task.
const TASK_ROWS: usize = TILE * TILES_PER_TASK;

/// A block-format weight matrix repacked in tiles of [`TILE`] rows.
#[derive(Clone, Debug)]
pub struct PackedMatrix {
    format: Format,
    rows: usize,
    cols: usize,
    /// Per tile, per block: Q4's 256 bytes (4 vectors of 64, lane = row, 4 file bytes each)
    /// or Q8_0's 512 bytes (8 vectors of 64, lane = row, 4 values + 128 each).
    weights: Vec<u8>,
    /// Per tile, per block, the tile's rows' scales as f16 bits (zero past the matrix's end).
    scales: Vec<u16>,
    /// Q4_1's minimums, laid out as the scales (empty for other formats).
    mins: Vec<u16>,
}

impl PackedMatrix {
    /// Whether this CPU runs the tiled kernel (and the limit allows it): only then is
    /// packing worth its copy.
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        if block_isa() == crate::kernels::Isa::Avx512 {
            return std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw");
        }
        false
    }

    /// `w` repacked, or `None` for a format without blocks (F32, F16).
    pub fn pack(w: &QuantMatrix) -> Option<PackedMatrix> {
        if !w.format.quantized() {
            return None;
        }
        let blocks = w.cols / BLOCK;
        let tiles = w.rows.div_ceil(TILE);
        let bytes = tile_block_bytes(w.format);
        let mut m = PackedMatrix {
            format: w.format,
            rows: w.rows,
            cols: w.cols,
            weights: vec![0; tiles * blocks * bytes],
            scales: vec![0; tiles * blocks * TILE],
            mins: if w.format == Format::Q4_1 {
                vec![0; tiles * blocks * TILE]
            } else {
                Vec::new()
            },
        };
        let per_tile = blocks * TILE;
        for t in 0..tiles {
            let weights = &mut m.weights[t * blocks * bytes..][..blocks * bytes];
            let scales = &mut m.scales[t * per_tile..][..per_tile];
            let mins = (!m.mins.is_empty()).then(|| &mut m.mins[t * per_tile..][..per_tile]);
            pack_tile(w, t * TILE, weights, scales, mins);
        }
        Some(m)
    }

    fn blocks(&self) -> usize {
        self.cols / BLOCK
    }
}

/// Bytes of one block of one tile.
fn tile_block_bytes(format: Format) -> usize {
    if format == Format::Q8_0 {
        TILE * BLOCK
    } else {
        TILE * BLOCK / 2
    }
}

/// Rows `first..first + TILE` of `w` (those past its end stay zero) into one tile's slices.
fn pack_tile(
    w: &QuantMatrix,
    first: usize,
    weights: &mut [u8],
    scales: &mut [u16],
    mut mins: Option<&mut [u16]>,
) {
    let size = w.format.block().1;
    let bytes = tile_block_bytes(w.format);
    let half = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
    for lane in 0..TILE.min(w.rows - first) {
        for (k, b) in w.row(first + lane).chunks_exact(size).enumerate() {
            let tile_block = &mut weights[k * bytes..(k + 1) * bytes];
            match w.format {
                Format::Q8_0 => {
                    for (piece, four) in b[2..2 + BLOCK].chunks_exact(4).enumerate() {
                        let at = (piece * TILE + lane) * 4;
                        for (out, &v) in tile_block[at..at + 4].iter_mut().zip(four) {
                            *out = v ^ 0x80;
                        }
                    }
                }
                _ => {
                    let nibbles = if w.format == Format::Q4_0 {
                        &b[2..18]
                    } else {
                        &b[4..20]
                    };
                    for (piece, four) in nibbles.chunks_exact(4).enumerate() {
                        let at = (piece * TILE + lane) * 4;
                        tile_block[at..at + 4].copy_from_slice(four);
                    }
                }
            }
            scales[k * TILE + lane] = half(b, 0);
            if let Some(mins) = mins.as_deref_mut() {
                mins[k * TILE + lane] = half(b, 2);
            }
        }
    }
}

/// What is taken off each block's integer sum, per unit of the activations' `Σq`: the
/// unsigned weights' offset from the signed values.
fn offset(format: Format) -> i32 {
    match format {
        Format::Q8_0 => 128,
        Format::Q4_0 => 8,
        _ => 0,
    }
}

/// Input rows' activation blocks, rows of `blocks` blocks each; the kernel reads each
/// block's 8-bit values as eight 4-byte words.
struct Inputs<'a> {
    acts: &'a [ActBlock],
    blocks: usize,
}

/// `out[i · rows + r] = x_i · w_r` for each `(w, out)` and the `n` rows `x_i` of `x`, on
/// 8-bit activations quantized once for all: one parallel pass over every matrix's tiles.
pub fn matmul_packed(products: &mut [(&PackedMatrix, &mut [f32])], x: &[f32], n: usize) {
    product_with(products, x, n, PackedMatrix::available());
}

/// [`matmul_packed`], on the VNNI kernel when `vnni` and on the portable one otherwise (the
/// same bits).
fn product_with(products: &mut [(&PackedMatrix, &mut [f32])], x: &[f32], n: usize, vnni: bool) {
    let Some(cols) = products.first().map(|(w, _)| w.cols) else {
        return;
    };
    for (w, out) in products.iter() {
        assert_eq!(w.cols, cols, "matrices of one input share its width");
        assert_eq!(out.len(), n * w.rows, "output is not n × rows");
    }
    assert_eq!(x.len(), n * cols, "activations are not n × cols");
    let mut acts = Vec::with_capacity(x.len() / BLOCK);
    quantize_acts(block_isa(), x, &mut acts);
    let inputs = Inputs {
        acts: &acts,
        blocks: cols / BLOCK,
    };
    let outputs: Vec<(&PackedMatrix, Output)> = products
        .iter_mut()
        .map(|(w, out)| {
            let output = Output {
                at: out.as_mut_ptr(),
                rows: w.rows,
                n,
            };
            (*w, output)
        })
        .collect();
    let tasks: Vec<(usize, usize)> = outputs
        .iter()
        .enumerate()
        .flat_map(|(k, (w, _))| (0..w.rows.div_ceil(TASK_ROWS)).map(move |t| (k, t)))
        .collect();
    tasks.into_par_iter().for_each(|(k, task)| {
        let (w, output) = outputs[k];
        for t in 0..TILES_PER_TASK {
            let tile = task * TILES_PER_TASK + t;
            if tile * TILE >= w.rows {
                break;
            }
            // SAFETY: each tile belongs to one task; `outputs` borrow `products`' buffers,
            // which nothing else touches until the pass ends.
            unsafe { tile_products(w, tile, &inputs, n, output, vnni) };
        }
    });
}

/// A product's output (`n × rows`), shared by the tasks of one parallel pass, each of which
/// writes the lanes of its own tiles only.
#[derive(Clone, Copy)]
struct Output {
    at: *mut f32,
    rows: usize,
    n: usize,
}

// SAFETY: tasks write disjoint elements through it (see `Output::write`).
unsafe impl Send for Output {}
unsafe impl Sync for Output {}

impl Output {
    /// Input row `i`'s products with tile `tile`, the lanes past the matrix's end dropped.
    ///
    /// # Safety
    /// No other thread writes or reads tile `tile`'s lanes meanwhile, and the buffer lives.
    unsafe fn write(&self, i: usize, tile: usize, products: &[f32; TILE]) {
        assert!(
            i < self.n && tile * TILE < self.rows,
            "a tile's lanes lie in the output"
        );
        let len = TILE.min(self.rows - tile * TILE);
        // SAFETY: in bounds (asserted); exclusive by the caller's promise.
        unsafe {
            let at = self.at.add(i * self.rows + tile * TILE);
            if len == TILE {
                // A whole tile: a fixed-size store rather than a call to `memmove`.
                at.cast::<[f32; TILE]>().write_unaligned(*products);
            } else {
                at.copy_from_nonoverlapping(products.as_ptr(), len);
            }
        }
    }
}

/// One tile against every input row, in the largest of [`INPUT_GROUPS`] that fits, into
/// `output`.
///
/// # Safety
/// As [`Output::write`] for `tile`.
unsafe fn tile_products(
    w: &PackedMatrix,
    tile: usize,
    inputs: &Inputs,
    n: usize,
    output: Output,
    vnni: bool,
) {
    let mut sums = [[0.0f32; TILE]; INPUT_GROUPS[0]];
    let mut i = 0;
    while i < n {
        let group = INPUT_GROUPS.into_iter().find(|&g| g <= n - i).unwrap_or(1);
        let sums = &mut sums[..group];
        match vnni {
            // SAFETY: `vnni` is only set where `available` found AVX-512 F, BW and VNNI,
            // which `avx512::tile` is compiled for.
            #[cfg(target_arch = "x86_64")]
            true => unsafe { avx512::rows(w, tile, inputs, i, sums) },
            _ => {
                for (j, s) in sums.iter_mut().enumerate() {
                    *s = portable(w, tile, inputs, i + j);
                }
            }
        }
        for (j, s) in sums.iter().enumerate() {
            // SAFETY: the caller's.
            unsafe { output.write(i + j, tile, s) };
        }
        i += group;
    }
}

/// The weight of `lane`'s element `e` in block `k` of `tile`, as the kernel's unsigned byte.
fn weight_byte(w: &PackedMatrix, tile: usize, k: usize, lane: usize, e: usize) -> u8 {
    let bytes = tile_block_bytes(w.format);
    let block = &w.weights[(tile * w.blocks() + k) * bytes..][..bytes];
    if w.format == Format::Q8_0 {
        return block[((e / 4) * TILE + lane) * 4 + e % 4];
    }
    let (byte, high) = (e % 16, e >= 16);
    let packed = block[((byte / 4) * TILE + lane) * 4 + byte % 4];
    if high { packed >> 4 } else { packed & 0x0F }
}

/// Input row `i` against the tile: per block, each lane's exact integer sum less the offset's
/// share, scaled by `scale · d` with one fused rounding, then (Q4_1) `min · s` the same way.
fn portable(w: &PackedMatrix, tile: usize, inputs: &Inputs, i: usize) -> [f32; TILE] {
    let mut acc = [0.0f32; TILE];
    let half = |bits: u16| f16(&bits.to_le_bytes(), 0);
    for k in 0..inputs.blocks {
        let a = &inputs.acts[i * inputs.blocks + k];
        let correction = offset(w.format) * a.sum;
        for (lane, acc) in acc.iter_mut().enumerate() {
            let mut sum = 0i32;
            for (e, &q) in a.q.iter().enumerate() {
                sum += weight_byte(w, tile, k, lane, e) as i32 * q as i32;
            }
            let at = (tile * w.blocks() + k) * TILE + lane;
            let exact = (sum - correction) as f32;
            *acc = (half(w.scales[at]) * a.d).mul_add(exact, *acc);
            if w.format == Format::Q4_1 {
                *acc = half(w.mins[at]).mul_add(a.s, *acc);
            }
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{BLOCK, Format, Inputs, PackedMatrix, TILE, offset, tile_block_bytes};

    /// Input rows `first..first + out.len()` (a group of 8, 4 or 1) against
    /// the tile.
    ///
    /// # Safety
    /// As [`tile`].
    #[inline(always)]
    pub(super) unsafe fn rows(
        w: &PackedMatrix,
        tile: usize,
        inputs: &Inputs,
        first: usize,
        out: &mut [[f32; TILE]],
    ) {
        const Q8_0: u8 = 0;
        const Q4_0: u8 = 1;
        const Q4_1: u8 = 2;
        let format = match w.format {
            Format::Q8_0 => Q8_0,
            Format::Q4_0 => Q4_0,
            _ => Q4_1,
        };
        // SAFETY: the caller's.
        unsafe {
            match (out.len(), format) {
                (8, Q8_0) => self::tile::<8, Q8_0>(w, tile, inputs, first, out),
                (8, Q4_0) => self::tile::<8, Q4_0>(w, tile, inputs, first, out),
                (8, _) => self::tile::<8, Q4_1>(w, tile, inputs, first, out),
                (4, Q8_0) => self::tile::<4, Q8_0>(w, tile, inputs, first, out),
                (4, Q4_0) => self::tile::<4, Q4_0>(w, tile, inputs, first, out),
                (4, _) => self::tile::<4, Q4_1>(w, tile, inputs, first, out),
                (_, Q8_0) => self::tile::<1, Q8_0>(w, tile, inputs, first, out),
                (_, Q4_0) => self::tile::<1, Q4_0>(w, tile, inputs, first, out),
                (_, _) => self::tile::<1, Q4_1>(w, tile, inputs, first, out),
            }
        }
    }

    /// `portable` for input rows `first..first + N`, in the same order of operations;
    /// `FORMAT` is 0 for Q8_0, 1 for Q4_0, 2 for Q4_1.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and VNNI; `tile` is one of `w`'s tiles and `inputs` holds
    /// rows `first..first + N` of `w`'s width.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile<const N: usize, const FORMAT: u8>(
        w: &PackedMatrix,
        tile: usize,
        inputs: &Inputs,
        first: usize,
        out: &mut [[f32; TILE]],
    ) {
        const PIECES: usize = BLOCK / 4;
        let blocks = inputs.blocks;
        let bytes = tile_block_bytes(w.format);
        let correction_per_sum = offset(w.format);
        let mut acc = [_mm512_setzero_ps(); N];
        // SAFETY: every block `k < blocks` of the tile has `bytes` weight bytes and TILE
        // scales (and for Q4_1 minimums); `inputs` has `blocks` blocks of each row, whose 32
        // values are read as eight unaligned words.
        unsafe {
            let weights = w.weights.as_ptr().add(tile * blocks * bytes);
            let scales = w.scales.as_ptr().add(tile * blocks * TILE);
            let mins = w.mins.as_ptr().wrapping_add(tile * blocks * TILE);
            for k in 0..blocks {
                let base = weights.add(k * bytes);
                let mut unpacked = [_mm512_setzero_si512(); PIECES];
                if FORMAT == 0 {
                    for (p, u) in unpacked.iter_mut().enumerate() {
                        *u = _mm512_loadu_si512(base.add(p * 64).cast());
                    }
                } else {
                    let mask = _mm512_set1_epi8(0x0F);
                    for p in 0..PIECES / 2 {
                        let v = _mm512_loadu_si512(base.add(p * 64).cast());
                        unpacked[p] = _mm512_and_si512(v, mask);
                        unpacked[p + PIECES / 2] =
                            _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask);
                    }
                }
                let scale = _mm512_cvtph_ps(_mm256_loadu_si256(scales.add(k * TILE).cast()));
                let min = if FORMAT == 2 {
                    _mm512_cvtph_ps(_mm256_loadu_si256(mins.add(k * TILE).cast()))
                } else {
                    _mm512_setzero_ps()
                };
                for (j, acc) in acc.iter_mut().enumerate() {
                    let a = inputs.acts.get_unchecked((first + j) * blocks + k);
                    let words = a.q.as_ptr().cast::<i32>();
                    let mut sum = _mm512_setzero_si512();
                    for (p, u) in unpacked.iter().enumerate() {
                        let word = _mm512_set1_epi32(words.add(p).read_unaligned());
                        sum = _mm512_dpbusd_epi32(sum, *u, word);
                    }
                    if FORMAT != 2 {
                        let correction = _mm512_set1_epi32(correction_per_sum * a.sum);
                        sum = _mm512_sub_epi32(sum, correction);
                    }
                    let exact = _mm512_cvtepi32_ps(sum);
                    let d = _mm512_set1_ps(a.d);
                    *acc = _mm512_fmadd_ps(_mm512_mul_ps(scale, d), exact, *acc);
                    if FORMAT == 2 {
                        let s = _mm512_set1_ps(a.s);
                        *acc = _mm512_fmadd_ps(min, s, *acc);
                    }
                }
            }
            for (j, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(out[j].as_mut_ptr(), *acc);
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The tiled products of `w`, on the VNNI kernel or the portable one.
    pub(in crate::quant) fn tiled_product(
        w: &QuantMatrix,
        x: &[f32],
        n: usize,
        vnni: bool,
    ) -> Vec<f32> {
        let packed = PackedMatrix::pack(w).expect("a block format");
        let mut out = vec![0.0f32; n * w.rows];
        product_with(&mut [(&packed, &mut out[..])], x, n, vnni);
        out
    }
}
