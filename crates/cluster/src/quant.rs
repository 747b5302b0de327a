//! Block quantization of what a collective sends: each block of [`BLOCK`] values travels as
//! its largest magnitude (an `f32`, the scale) and one sign-magnitude code per value, 8 or 4
//! bits. Every code decodes to `level[magnitude] × scale`, with the top level exactly 1, so a
//! block's largest value survives exactly and every rank that decodes the same bytes gets
//! the same bits. Non-finite values are refused, never encoded.

/// Values per block (one `f32` scale each).
pub const BLOCK: usize = 64;

/// How values travel. The run's config names these too (`train::config::Precision`), since
/// the config is read where this crate is not built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Precision {
    /// Plain `f32`: the ring all-reduce, exact up to summation order.
    F32,
    /// 8-bit sign-magnitude integers, levels k/127.
    Int8,
    /// 4-bit sign-magnitude integers, levels k/7.
    Int4,
    /// 4-bit floats (E2M1, as in the OCP microscaling formats): levels
    /// {0, 0.5, 1, 1.5, 2, 3, 4, 6}/6.
    E2m1,
}

pub const PRECISIONS: [Precision; 4] = [
    Precision::F32,
    Precision::Int8,
    Precision::Int4,
    Precision::E2m1,
];

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Int8 => "int8",
            Precision::Int4 => "int4",
            Precision::E2m1 => "e2m1",
        })
    }
}

const E2M1_LEVELS: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// A value that cannot be encoded.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("value {index} is {value}: only finite values are sent")]
pub struct NonFinite {
    pub index: usize,
    pub value: f32,
}

/// Bytes that do not decode.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Malformed {
    #[error("{got} bytes for {values} values of {precision}, expected {want}")]
    Length {
        precision: Precision,
        values: usize,
        got: usize,
        want: usize,
    },
    #[error("block {block} has scale {scale}: a scale is finite and not negative")]
    Scale { block: usize, scale: f32 },
}

/// A quantized format's code book: decoded magnitude of each code, and the code nearest to a
/// magnitude in [0, 1].
struct Codes {
    /// Decoded value of each code (sign included), as a fraction of the scale.
    table: Vec<f32>,
    bits: u32,
    /// Levels k/top: the nearest is found by rounding.
    even: bool,
}

impl Codes {
    fn of(p: Precision) -> Option<Codes> {
        let (levels, bits, even): (Vec<f32>, u32, bool) = match p {
            Precision::F32 => return None,
            Precision::Int8 => ((0..128).map(|k| k as f32 / 127.0).collect(), 8, true),
            Precision::Int4 => ((0..8).map(|k| k as f32 / 7.0).collect(), 4, true),
            Precision::E2m1 => (E2M1_LEVELS.iter().map(|l| l / 6.0).collect(), 4, false),
        };
        let table = levels
            .iter()
            .copied()
            .chain(levels.iter().map(|l| -l))
            .collect();
        Some(Codes { table, bits, even })
    }

    /// Magnitude levels (the table's non-negative half).
    fn levels(&self) -> &[f32] {
        &self.table[..self.table.len() / 2]
    }

    /// The code of `x`, a fraction of its block's scale in [-1, 1].
    fn code(&self, x: f32) -> u8 {
        let m = x.abs();
        let levels = self.levels();
        let mag = if self.even {
            let top = levels.len() - 1;
            ((m * top as f32).round() as usize).min(top)
        } else {
            nearest(levels, m)
        };
        let sign = if x < 0.0 && mag != 0 { levels.len() } else { 0 };
        (mag + sign) as u8
    }
}

/// Index of the level nearest to `m` (ties to the lower), for uneven levels.
fn nearest(levels: &[f32], m: f32) -> usize {
    let mut best = 0;
    for (k, l) in levels.iter().enumerate().skip(1) {
        if (m - l).abs() < (m - levels[best]).abs() {
            best = k;
        }
    }
    best
}

impl Precision {
    /// Bytes that `values` values take.
    pub fn encoded_len(self, values: usize) -> usize {
        let blocks = values.div_ceil(BLOCK);
        match self {
            Precision::F32 => values * 4,
            Precision::Int8 => blocks * 4 + values,
            Precision::Int4 | Precision::E2m1 => {
                // Each block's codes start on a byte.
                let full = values / BLOCK;
                let last = values % BLOCK;
                blocks * 4 + full * BLOCK / 2 + last.div_ceil(2)
            }
        }
    }

    /// Encodes `values` onto the end of `out`.
    pub fn encode(self, values: &[f32], out: &mut Vec<u8>) -> Result<(), NonFinite> {
        if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(NonFinite { index, value });
        }
        let Some(codes) = Codes::of(self) else {
            out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            return Ok(());
        };
        out.reserve(self.encoded_len(values.len()));
        for block in values.chunks(BLOCK) {
            let scale = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            out.extend(scale.to_le_bytes());
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            // x · (1/scale) can land a hair above 1 for the block's maximum; clamp.
            let code = |x: f32| codes.code((x * inv).clamp(-1.0, 1.0));
            if codes.bits == 8 {
                out.extend(block.iter().map(|&x| code(x)));
            } else {
                out.extend(
                    block
                        .chunks(2)
                        .map(|p| code(p[0]) | p.get(1).map_or(0, |&x| code(x) << 4)),
                );
            }
        }
        Ok(())
    }

    /// Decodes `bytes` into `out` (as many values as it holds), refusing a wrong length or a
    /// scale that is not a finite non-negative number.
    pub fn decode(self, bytes: &[u8], out: &mut [f32]) -> Result<(), Malformed> {
        self.decode_with(bytes, out, |o, v| *o = v)
    }

    /// [`Precision::decode`], adding the values to `out` instead.
    pub fn decode_add(self, bytes: &[u8], out: &mut [f32]) -> Result<(), Malformed> {
        self.decode_with(bytes, out, |o, v| *o += v)
    }

    fn decode_with(
        self,
        bytes: &[u8],
        out: &mut [f32],
        put: impl Fn(&mut f32, f32),
    ) -> Result<(), Malformed> {
        let want = self.encoded_len(out.len());
        if bytes.len() != want {
            return Err(Malformed::Length {
                precision: self,
                values: out.len(),
                got: bytes.len(),
                want,
            });
        }
        let Some(codes) = Codes::of(self) else {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                put(o, f32::from_le_bytes(b.try_into().expect("4 bytes")));
            }
            return Ok(());
        };
        let mut at = 0;
        for (block, values) in out.chunks_mut(BLOCK).enumerate() {
            let scale = f32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
            at += 4;
            if !(scale.is_finite() && scale >= 0.0) {
                return Err(Malformed::Scale { block, scale });
            }
            let t = &codes.table;
            if codes.bits == 8 {
                for (o, &c) in values.iter_mut().zip(&bytes[at..]) {
                    put(o, t[c as usize] * scale);
                }
                at += values.len();
            } else {
                for (pair, &c) in values.chunks_mut(2).zip(&bytes[at..]) {
                    put(&mut pair[0], t[(c & 15) as usize] * scale);
                    if let Some(o) = pair.get_mut(1) {
                        put(o, t[(c >> 4) as usize] * scale);
                    }
                }
                at += values.len().div_ceil(2);
            }
        }
        Ok(())
    }

    /// The largest error encoding can make in a value, as a fraction of its block's largest
    /// magnitude (half the widest gap between levels), before `f32` rounding.
    pub fn max_relative_error(self) -> f32 {
        match Codes::of(self) {
            None => 0.0,
            Some(c) => {
                let l = c.levels();
                l.windows(2).map(|w| w[1] - w[0]).fold(0.0, f32::max) / 2.0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize, seed: u32) -> Vec<f32> {
        // Heavy-tailed like a pseudo-gradient: mostly small, a few large.
        (0..n)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
                let u = h as f32 / (1u32 << 24) as f32 - 0.5;
                u * u * u * if i.is_multiple_of(97) { 40.0 } else { 1e-2 }
            })
            .collect()
    }

    fn roundtrip(p: Precision, values: &[f32]) -> Vec<f32> {
        let mut bytes = Vec::new();
        p.encode(values, &mut bytes).unwrap();
        assert_eq!(bytes.len(), p.encoded_len(values.len()), "{p}");
        let mut out = vec![f32::NAN; values.len()];
        p.decode(&bytes, &mut out).unwrap();
        out
    }

    #[test]
    fn every_value_is_within_its_formats_bound_of_its_blocks_largest() {
        for p in PRECISIONS {
            for n in [0, 1, 2, 63, 64, 65, 1000] {
                let v = sample(n, 7);
                let back = roundtrip(p, &v);
                for (b, (block, got)) in v.chunks(BLOCK).zip(back.chunks(BLOCK)).enumerate() {
                    let scale = block.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                    let bound = scale * (p.max_relative_error() + 4.0 * f32::EPSILON);
                    for (x, y) in block.iter().zip(got) {
                        assert!((x - y).abs() <= bound, "{p} n={n} block {b}: {x} → {y}");
                    }
                    let top = block.iter().position(|x| x.abs() == scale).unwrap_or(0);
                    if !block.is_empty() {
                        assert_eq!(got[top].abs(), scale, "{p}: a block's largest is exact");
                    }
                }
            }
        }
    }

    #[test]
    fn the_bounds_are_what_the_formats_promise() {
        assert_eq!(Precision::F32.max_relative_error(), 0.0);
        assert!((Precision::Int8.max_relative_error() - 1.0 / 254.0).abs() < 1e-7);
        assert!((Precision::Int4.max_relative_error() - 1.0 / 14.0).abs() < 1e-7);
        assert!((Precision::E2m1.max_relative_error() - 1.0 / 6.0).abs() < 1e-7);
        // And the bound is reached, not loose: halfway between two int8 levels.
        let v = [1.0, 0.5 / 127.0 + 1e-6];
        assert_eq!(roundtrip(Precision::Int8, &v)[1], 1.0 / 127.0);
    }

    #[test]
    fn bytes_per_value_are_a_quarter_and_an_eighth_of_f32_plus_the_scales() {
        let n = 1 << 20;
        assert_eq!(Precision::F32.encoded_len(n), 4 * n);
        assert_eq!(Precision::Int8.encoded_len(n), n + 4 * n / BLOCK);
        assert_eq!(Precision::Int4.encoded_len(n), n / 2 + 4 * n / BLOCK);
        assert_eq!(Precision::E2m1.encoded_len(3), 4 + 2);
    }

    #[test]
    fn non_finite_values_are_refused_not_encoded() {
        for p in PRECISIONS {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut out = Vec::new();
                let err = p.encode(&[1.0, 2.0, bad, 3.0], &mut out).unwrap_err();
                assert_eq!(err.index, 2, "{p}");
                assert!(out.is_empty(), "{p}: nothing written");
            }
        }
    }

    #[test]
    fn malformed_bytes_are_refused() {
        for p in [Precision::Int8, Precision::Int4, Precision::E2m1] {
            let mut bytes = Vec::new();
            p.encode(&[1.0; 100], &mut bytes).unwrap();
            let mut out = vec![0.0; 100];
            assert!(matches!(
                p.decode(&bytes[1..], &mut out),
                Err(Malformed::Length { .. })
            ));
            for scale in [f32::NAN, f32::INFINITY, -1.0] {
                let mut b = bytes.clone();
                b[..4].copy_from_slice(&scale.to_le_bytes());
                assert!(matches!(
                    p.decode(&b, &mut out),
                    Err(Malformed::Scale { block: 0, .. })
                ));
            }
        }
    }

    #[test]
    fn every_code_decodes_to_a_finite_value_within_the_scale() {
        for p in [Precision::Int8, Precision::Int4, Precision::E2m1] {
            // Enough blocks that their code bytes run through all 256 byte values.
            let values = if p == Precision::Int8 { 256 } else { 512 };
            let per_block = p.encoded_len(BLOCK) - 4;
            let mut code_bytes = 0..=255u8;
            let mut bytes = Vec::new();
            for _ in 0..values / BLOCK {
                bytes.extend(3.0f32.to_le_bytes());
                bytes.extend(code_bytes.by_ref().take(per_block));
            }
            assert!(code_bytes.next().is_none(), "{p}: every byte value used");
            let mut out = vec![0.0; values];
            p.decode(&bytes, &mut out).unwrap();
            assert!(out.iter().all(|v| v.is_finite() && v.abs() <= 3.0), "{p}");
        }
    }

    #[test]
    fn decode_add_accumulates() {
        let p = Precision::Int4;
        let mut bytes = Vec::new();
        p.encode(&[7.0, -7.0, 1.0], &mut bytes).unwrap();
        let mut acc = vec![1.0, 1.0, 1.0];
        p.decode_add(&bytes, &mut acc).unwrap();
        assert_eq!(acc, vec![8.0, -6.0, 2.0]);
    }
}
