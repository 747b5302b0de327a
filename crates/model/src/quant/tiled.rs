//! Prompt products on 8-bit activations where the CPU has AVX-512 VNNI: eight weight rows at
//! a time are repacked so that one `vpdpbusd` multiplies a 4-byte piece of one activation
//! block against the same piece of all eight rows, leaving each row's exact integer block sum
//! in its own lane. The block scales then apply to eight rows in one vector, and each packed
//! tile serves every input row: about a third of the per-pair work of [`super::block_dots`],
//! which has to sum each pair's lanes on its own.
//!
//! The activations are the decoder's 8-bit blocks, stored offset by 128 (`vpdpbusd` takes
//! one unsigned operand); the offset's share, 128 · Σw per row and block, is taken back off
//! the integer sums. A block's sum is exact, so the portable code below gives the same bits
//! (tested against it).

use rayon::prelude::*;

use super::{ActBlock, BLOCK, Format, QuantMatrix, f16};

/// Weight rows packed together: one 32-bit lane each in a 256-bit vector.
const TILE: usize = 8;

/// Input rows that share each loaded piece of a tile.
const INPUT_GROUP: usize = 4;

/// Tiles per parallel task.
const TILES_PER_TASK: usize = 4;

/// Eight weight rows' blocks, repacked.
#[derive(Default)]
struct Tile {
    /// Per block, per 4-byte piece `t`, the eight rows' pieces: `[block][t][row][4]`.
    weights: Vec<i8>,
    /// Per block, the eight rows' scales (zero for rows past the matrix's end).
    scales: Vec<f32>,
    /// Per block, the eight rows' Q4_1 minimums (zero otherwise).
    mins: Vec<f32>,
    /// Per block, the eight rows' 128 · Σw.
    offsets: Vec<i32>,
    /// The rows are Q4_1's: `min · s` is added per block.
    q4_1: bool,
}

impl Tile {
    /// Rows `first..first + 8` of `w` (those past its end left zero).
    fn pack(&mut self, w: &QuantMatrix, first: usize) {
        let blocks = w.cols / BLOCK;
        self.weights.clear();
        self.weights.resize(blocks * TILE * BLOCK, 0);
        self.scales.clear();
        self.scales.resize(blocks * TILE, 0.0);
        self.mins.clear();
        self.mins.resize(blocks * TILE, 0.0);
        self.offsets.clear();
        self.offsets.resize(blocks * TILE, 0);
        self.q4_1 = w.format == Format::Q4_1;
        let size = w.format.block().1;
        for lane in 0..TILE.min(w.rows.saturating_sub(first)) {
            let row = w.row(first + lane);
            for (k, b) in row.chunks_exact(size).enumerate() {
                let values = block_values(w.format, b);
                for (piece, four) in values.chunks_exact(4).enumerate() {
                    let at = ((k * TILE + piece) * TILE + lane) * 4;
                    self.weights[at..at + 4].copy_from_slice(four);
                }
                let at = k * TILE + lane;
                self.scales[at] = f16(b, 0);
                if self.q4_1 {
                    self.mins[at] = f16(b, 2);
                }
                self.offsets[at] = 128 * values.iter().map(|&v| v as i32).sum::<i32>();
            }
        }
    }
}

/// A weight block's 32 integers in element order: Q8_0's as stored, Q4_0's nibbles less 8,
/// Q4_1's nibbles.
#[inline(always)]
fn block_values(format: Format, b: &[u8]) -> [i8; BLOCK] {
    let mut values = [0i8; BLOCK];
    match format {
        Format::Q8_0 => {
            for (v, &q) in values.iter_mut().zip(&b[2..2 + BLOCK]) {
                *v = q as i8;
            }
        }
        _ => {
            let (packed, bias) = if format == Format::Q4_0 {
                (&b[2..18], 8)
            } else {
                (&b[4..20], 0)
            };
            let (low, high) = values.split_at_mut(16);
            for ((&p, lo), hi) in packed.iter().zip(low).zip(high) {
                *lo = (p & 0x0F) as i8 - bias;
                *hi = (p >> 4) as i8 - bias;
            }
        }
    }
    values
}

/// Input rows' activation blocks as the kernel reads them: per block, its eight 4-byte
/// pieces offset by 128 (each as one little-endian word), its scale and `d · Σq`. Built once
/// per prompt step, for all the matrices that take the same input.
pub(super) struct Inputs {
    words: Vec<u32>,
    d: Vec<f32>,
    s: Vec<f32>,
    blocks: usize,
}

impl Inputs {
    /// From `acts`, rows of `blocks` blocks each.
    pub(super) fn new(acts: &[ActBlock], blocks: usize) -> Inputs {
        let mut words = Vec::with_capacity(acts.len() * TILE);
        for a in acts {
            for piece in a.q.chunks_exact(4) {
                let bytes = [piece[0], piece[1], piece[2], piece[3]].map(|q| q as u8 ^ 0x80);
                words.push(u32::from_le_bytes(bytes));
            }
        }
        Inputs {
            words,
            d: acts.iter().map(|a| a.d).collect(),
            s: acts.iter().map(|a| a.s).collect(),
            blocks,
        }
    }
}

/// Whether this CPU runs the tiled kernel (and the limit allows it).
pub(super) fn available() -> bool {
    super::block_isa() == crate::kernels::Isa::Avx512
}

/// `out[i · rows + r] = x_i · w_r` for a block-format `w`, from the `n` rows' `inputs`,
/// split over the pool by tiles; `vnni` picks the AVX-512 VNNI kernel over the portable one
/// (the same bits).
pub(super) fn product(w: &QuantMatrix, inputs: &Inputs, n: usize, out: &mut [f32], vnni: bool) {
    debug_assert_eq!(inputs.blocks, w.cols / BLOCK);
    let tiles = w.rows.div_ceil(TILE);
    let task_rows = TILE * TILES_PER_TASK;
    // Each task's products, input-row-major over its own rows, then placed.
    let parts: Vec<Vec<f32>> = (0..tiles.div_ceil(TILES_PER_TASK))
        .into_par_iter()
        .map(|task| {
            let mut tile = Tile::default();
            let mut part = vec![0.0f32; n * task_rows];
            for t in 0..TILES_PER_TASK {
                let first = (task * TILES_PER_TASK + t) * TILE;
                if first >= w.rows {
                    break;
                }
                tile.pack(w, first);
                let at = t * TILE;
                tile_products(&tile, inputs, n, &mut part, task_rows, at, vnni);
            }
            part
        })
        .collect();
    out.par_chunks_mut(w.rows)
        .enumerate()
        .for_each(|(i, out_row)| {
            for (task, part) in parts.iter().enumerate() {
                let first = task * task_rows;
                let len = task_rows.min(w.rows - first);
                out_row[first..first + len]
                    .copy_from_slice(&part[i * task_rows..i * task_rows + len]);
            }
        });
}

/// One tile against every input row, in groups of [`INPUT_GROUP`] and then one at a time:
/// `part[i · stride + at + lane]`.
fn tile_products(
    tile: &Tile,
    inputs: &Inputs,
    n: usize,
    part: &mut [f32],
    stride: usize,
    at: usize,
    vnni: bool,
) {
    let mut sums = [[0.0f32; TILE]; INPUT_GROUP];
    let mut i = 0;
    while i < n {
        let group = if n - i >= INPUT_GROUP { INPUT_GROUP } else { 1 };
        let sums = &mut sums[..group];
        match vnni {
            // SAFETY: `vnni` is only set where `available` found AVX-512 VNNI, VL, AVX2 and
            // FMA, which `avx512::tile` is compiled for.
            #[cfg(target_arch = "x86_64")]
            true => unsafe { avx512::rows(tile, inputs, i, sums) },
            _ => {
                for (j, s) in sums.iter_mut().enumerate() {
                    *s = portable(tile, inputs, i + j);
                }
            }
        }
        for (j, s) in sums.iter().enumerate() {
            part[(i + j) * stride + at..][..TILE].copy_from_slice(s);
        }
        i += group;
    }
}

/// Input row `i` against the tile: per block, each lane's exact integer sum less its offset,
/// scaled by `scale · d` with one fused rounding, then (Q4_1) `min · s` the same way.
fn portable(tile: &Tile, inputs: &Inputs, i: usize) -> [f32; TILE] {
    let mut acc = [0.0f32; TILE];
    for k in 0..inputs.blocks {
        let block = i * inputs.blocks + k;
        let (d, s) = (inputs.d[block], inputs.s[block]);
        for (lane, acc) in acc.iter_mut().enumerate() {
            let mut sum = 0i32;
            for piece in 0..TILE {
                let word = inputs.words[block * TILE + piece].to_le_bytes();
                let w = &tile.weights[((k * TILE + piece) * TILE + lane) * 4..][..4];
                for (a, &w) in word.iter().zip(w) {
                    sum += *a as i32 * w as i32;
                }
            }
            let at = k * TILE + lane;
            let exact = (sum - tile.offsets[at]) as f32;
            *acc = (tile.scales[at] * d).mul_add(exact, *acc);
            if tile.q4_1 {
                *acc = tile.mins[at].mul_add(s, *acc);
            }
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{INPUT_GROUP, Inputs, TILE, Tile};

    /// Input rows `first..first + out.len()` (a group of [`INPUT_GROUP`], or one) against
    /// the tile.
    ///
    /// # Safety
    /// As [`tile`].
    #[inline(always)]
    pub(super) unsafe fn rows(tile: &Tile, inputs: &Inputs, first: usize, out: &mut [[f32; TILE]]) {
        // SAFETY: the caller's.
        unsafe {
            match (out.len(), tile.q4_1) {
                (INPUT_GROUP, false) => self::tile::<INPUT_GROUP, false>(tile, inputs, first, out),
                (INPUT_GROUP, true) => self::tile::<INPUT_GROUP, true>(tile, inputs, first, out),
                (_, false) => self::tile::<1, false>(tile, inputs, first, out),
                (_, true) => self::tile::<1, true>(tile, inputs, first, out),
            }
        }
    }

    /// `portable` for input rows `first..first + N`, in the same order of operations.
    ///
    /// # Safety
    /// The CPU has AVX-512 VNNI and VL, AVX2 and FMA; `inputs` holds rows `first..first + N`.
    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
    pub(super) unsafe fn tile<const N: usize, const Q4_1: bool>(
        tile: &Tile,
        inputs: &Inputs,
        first: usize,
        out: &mut [[f32; TILE]],
    ) {
        let blocks = inputs.blocks;
        let mut acc = [_mm256_setzero_ps(); N];
        // SAFETY: every block `k < blocks` has TILE pieces of TILE rows in `tile.weights`,
        // TILE lanes in its per-block vectors, and TILE words per input row in `inputs`.
        unsafe {
            let weights = tile.weights.as_ptr();
            for k in 0..blocks {
                let mut sums = [_mm256_setzero_si256(); N];
                for piece in 0..TILE {
                    let w = _mm256_loadu_si256(weights.add((k * TILE + piece) * TILE * 4).cast());
                    for (j, sum) in sums.iter_mut().enumerate() {
                        let block = (first + j) * blocks + k;
                        let word = *inputs.words.get_unchecked(block * TILE + piece);
                        let a = _mm256_set1_epi32(word as i32);
                        *sum = _mm256_dpbusd_epi32(*sum, a, w);
                    }
                }
                let at = k * TILE;
                let scales = _mm256_loadu_ps(tile.scales.as_ptr().add(at));
                let offsets = _mm256_loadu_si256(tile.offsets.as_ptr().add(at).cast());
                let mins = _mm256_loadu_ps(tile.mins.as_ptr().add(at));
                for (j, acc) in acc.iter_mut().enumerate() {
                    let block = (first + j) * blocks + k;
                    let exact = _mm256_cvtepi32_ps(_mm256_sub_epi32(sums[j], offsets));
                    let d = _mm256_set1_ps(*inputs.d.get_unchecked(block));
                    *acc = _mm256_fmadd_ps(_mm256_mul_ps(scales, d), exact, *acc);
                    if Q4_1 {
                        let s = _mm256_set1_ps(*inputs.s.get_unchecked(block));
                        *acc = _mm256_fmadd_ps(mins, s, *acc);
                    }
                }
            }
            for (j, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(out[j].as_mut_ptr(), *acc);
            }
        }
    }
}
