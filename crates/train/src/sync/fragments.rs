//! Streaming DiLoCo's fragments (Douillard et al. 2025): the parameters split into P parts,
//! strided by layer (layer l in fragment l mod P, which the paper found better than
//! contiguous blocks), one part synced per round. The token embedding joins fragment 0 and
//! the final norm and output head the last fragment, so that every value is in exactly one.

use std::ops::Range;

use holdfast_model::weights::ParamSpec;

/// Where each fragment's values lie in the flat parameter buffer (the order of
/// [`crate::replica::flatten`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Fragments {
    /// Per fragment: the indices of its parameters among the specs.
    params: Vec<Vec<usize>>,
    /// Per parameter: its range in the flat buffer.
    ranges: Vec<Range<usize>>,
}

/// The layer a parameter belongs to: `model.layers.{i}.…`.
fn layer_of(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("model.layers.")?;
    rest.split('.').next()?.parse().ok()
}

impl Fragments {
    /// `count` fragments of the parameters `specs` (`count` ≥ 1).
    pub fn strided(specs: &[ParamSpec], count: usize) -> Fragments {
        assert!(count >= 1, "at least one fragment");
        let mut at = 0;
        let ranges = specs
            .iter()
            .map(|s| {
                at += s.numel();
                at - s.numel()..at
            })
            .collect();
        let mut params = vec![Vec::new(); count];
        let mut seen_layers = false;
        for (i, s) in specs.iter().enumerate() {
            let fragment = match layer_of(&s.name) {
                Some(layer) => {
                    seen_layers = true;
                    layer % count
                }
                // Before the layers (the embedding) or after them (final norm, head).
                None if seen_layers => count - 1,
                None => 0,
            };
            params[fragment].push(i);
        }
        Fragments { params, ranges }
    }

    pub fn count(&self) -> usize {
        self.params.len()
    }

    /// The fragment round `round` syncs.
    pub fn of_round(&self, round: u64) -> usize {
        (round % self.count() as u64) as usize
    }

    /// The parameters (indices among the specs) of fragment `f`.
    pub fn params(&self, f: usize) -> &[usize] {
        &self.params[f]
    }

    /// The flat ranges of fragment `f`, in order.
    pub fn ranges(&self, f: usize) -> impl Iterator<Item = Range<usize>> + '_ {
        self.params[f].iter().map(|&p| self.ranges[p].clone())
    }

    /// How many values fragment `f` holds.
    pub fn len(&self, f: usize) -> usize {
        self.ranges(f).map(|r| r.len()).sum()
    }

    /// Fragment `f`'s values of the flat buffer `flat`, appended to `out`.
    pub fn gather_into(&self, f: usize, flat: &[f32], out: &mut Vec<f32>) {
        for r in self.ranges(f) {
            out.extend_from_slice(&flat[r]);
        }
    }

    /// Writes fragment `f`'s `values` back into the flat buffer `flat`.
    pub fn scatter(&self, f: usize, values: &[f32], flat: &mut [f32]) {
        let mut at = 0;
        for r in self.ranges(f) {
            let n = r.len();
            flat[r].copy_from_slice(&values[at..at + n]);
            at += n;
        }
        assert_eq!(at, values.len(), "a fragment's worth of values");
    }
}

#[cfg(test)]
mod tests {
    use holdfast_model::ModelConfig;
    use holdfast_model::weights::param_specs;

    use super::*;

    fn specs() -> Vec<ParamSpec> {
        let mut cfg = ModelConfig::preset("tiny").unwrap();
        cfg.num_hidden_layers = 4;
        param_specs(&cfg)
    }

    #[test]
    fn every_value_is_in_exactly_one_fragment_and_layers_are_strided() {
        let specs = specs();
        let n: usize = specs.iter().map(ParamSpec::numel).sum();
        for count in 1..=4 {
            let f = Fragments::strided(&specs, count);
            let mut hits = vec![0u8; n];
            for frag in 0..count {
                f.ranges(frag).flatten().for_each(|i| hits[i] += 1);
            }
            assert!(hits.iter().all(|&h| h == 1), "{count} fragments");
            assert_eq!((0..count).map(|x| f.len(x)).sum::<usize>(), n);
        }
        let f = Fragments::strided(&specs, 2);
        let names = |frag: usize| -> Vec<&str> {
            f.params(frag)
                .iter()
                .map(|&p| specs[p].name.as_str())
                .collect()
        };
        let (even, odd) = (names(0), names(1));
        assert_eq!(even[0], "model.embed_tokens.weight");
        assert!(even.iter().any(|n| n.starts_with("model.layers.2.")));
        assert!(!even.iter().any(|n| n.starts_with("model.layers.1.")));
        assert!(odd.iter().any(|n| n.starts_with("model.layers.3.")));
        assert!(odd.contains(&"model.norm.weight"), "{odd:?}");
        assert_eq!(f.of_round(7), 1);
    }

    #[test]
    fn gather_then_scatter_touches_only_the_fragment() {
        let specs = specs();
        let n: usize = specs.iter().map(ParamSpec::numel).sum();
        let f = Fragments::strided(&specs, 3);
        let flat: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let mut part = Vec::new();
        f.gather_into(1, &flat, &mut part);
        assert_eq!(part.len(), f.len(1));
        let mut other = vec![-1.0f32; n];
        f.scatter(1, &part, &mut other);
        for (i, (&o, &x)) in other.iter().zip(&flat).enumerate() {
            let inside = f.ranges(1).any(|r| r.contains(&i));
            assert_eq!(o, if inside { x } else { -1.0 }, "value {i}");
        }
    }
}
