//! Corruption in compute, caught before it is averaged in: each worker reports a fingerprint
//! of the contribution it sends to the all-reduce (its L2 norm and its largest magnitude), and
//! a contribution far above its peers' in the same round — or, with no peer to compare with,
//! above its own recent ones — is an outlier. A pure verdict, like the guard's: the coordinator
//! acts on it (the round's attempt is voided and redone without the culprit).
//!
//! What it can and cannot see: a fault that makes one value more than `ratio` times the
//! largest honest one (a flipped high exponent bit) is caught; a smaller one (a low exponent
//! or a mantissa bit) is not — the coordinator's replay audits are for those.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// How many times its reference a statistic may reach before it is an outlier, for
/// contributions that average many steps (DiLoCo's pseudo-gradients): measured on the default
/// task (3 workers, H = 20, 48 rounds), honest contributions stayed within this.
pub const OUTLIER_RATIO: f64 = 8.0;
/// The same for one step's gradients (DDP), which vary far more from batch to batch: measured
/// on the default task (3 workers, 963 steps), honest ones reached 11.2× their peers' median.
pub const STEP_OUTLIER_RATIO: f64 = 64.0;
/// Rounds of a worker's own history kept.
pub const HISTORY: usize = 8;

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub norm: f64,
    pub max_abs: f64,
}

impl Fingerprint {
    /// Of `values` (a NaN or an infinity shows as a non-finite norm).
    pub fn of(values: &[f32]) -> Fingerprint {
        let (mut sq, mut max_abs) = (0.0f64, 0.0f64);
        for &v in values {
            let v = f64::from(v);
            sq += v * v;
            max_abs = max_abs.max(v.abs());
        }
        Fingerprint {
            norm: sq.sqrt(),
            max_abs,
        }
    }

    /// Of the progress per batch trained, from that of values a member of an on-demand round
    /// sent: its progress times the `batches` it trained (its weight). Members that trained
    /// different amounts compare per batch; a weight of 1 (fixed rounds) changes nothing.
    pub fn per_batch(self, batches: f32) -> Fingerprint {
        if batches <= 1.0 {
            return self;
        }
        let squared = f64::from(batches) * f64::from(batches);
        Fingerprint {
            norm: self.norm / squared,
            max_abs: self.max_abs / squared,
        }
    }

    fn statistics(&self) -> [(&'static str, f64); 2] {
        [("norm", self.norm), ("max_abs", self.max_abs)]
    }

    /// A contribution of zeros (a refusal or a rollback) says nothing about the others.
    fn informative(&self) -> bool {
        self.norm.is_finite() && self.norm > 0.0
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Outlier {
    pub name: String,
    pub statistic: String,
    pub value: f64,
    /// The median it was compared with (NaN for a non-finite value).
    pub reference: f64,
    /// What the reference was: the peers of this round, or the worker's own history.
    pub against: String,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// The outliers among one round's contributions (`round`: each member's name and
/// fingerprint), judged against the peers of the round, or, for a member with no informative
/// peer, against its own `history`.
pub fn outliers(
    round: &[(String, Fingerprint)],
    history: &BTreeMap<String, VecDeque<Fingerprint>>,
    ratio: f64,
) -> Vec<Outlier> {
    let mut found = Vec::new();
    for (name, fp) in round {
        let peers: Vec<&Fingerprint> = round
            .iter()
            .filter(|(n, f)| n != name && f.informative())
            .map(|(_, f)| f)
            .collect();
        let own: Vec<&Fingerprint> = history
            .get(name)
            .map(|h| h.iter().filter(|f| f.informative()).collect())
            .unwrap_or_default();
        let (reference, against) = if peers.is_empty() {
            (own, "its own recent rounds")
        } else {
            (peers, "its peers this round")
        };
        for (i, (statistic, value)) in fp.statistics().into_iter().enumerate() {
            let refs = reference.iter().map(|f| f.statistics()[i].1).collect();
            let reference = median(refs);
            let outlying = match reference {
                _ if !value.is_finite() => true,
                Some(r) if r > 0.0 => value > ratio * r,
                _ => false,
            };
            if outlying {
                found.push(Outlier {
                    name: name.clone(),
                    statistic: statistic.into(),
                    value,
                    reference: reference.unwrap_or(f64::NAN),
                    against: against.into(),
                });
                break;
            }
        }
    }
    found
}

/// BLAKE3 of a contribution's values (little-endian f32): what a replay audit compares.
pub fn payload_hash(values: &[f32]) -> String {
    let mut h = blake3::Hasher::new();
    hash_f32(&mut h, values);
    h.finalize().to_hex().to_string()
}

/// Feeds `values` to `h` as little-endian bytes, a block at a time (no copy of the whole).
fn hash_f32(h: &mut blake3::Hasher, values: &[f32]) {
    let mut block = Vec::with_capacity(4 << 16);
    for chunk in values.chunks(1 << 16) {
        block.clear();
        block.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
        h.update(&block);
    }
}

/// Adds a committed round's fingerprints to the members' histories (the newest [`HISTORY`]).
pub fn remember(
    history: &mut BTreeMap<String, VecDeque<Fingerprint>>,
    round: &[(String, Fingerprint)],
) {
    for (name, fp) in round {
        let h = history.entry(name.clone()).or_default();
        h.push_back(*fp);
        while h.len() > HISTORY {
            h.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(norm: f64, max_abs: f64) -> Fingerprint {
        Fingerprint { norm, max_abs }
    }

    fn named(v: &[(&str, Fingerprint)]) -> Vec<(String, Fingerprint)> {
        v.iter().map(|(n, f)| (n.to_string(), *f)).collect()
    }

    #[test]
    fn a_fingerprint_is_the_norm_and_the_largest_magnitude() {
        let f = Fingerprint::of(&[3.0, -4.0, 0.0]);
        assert_eq!((f.norm, f.max_abs), (5.0, 4.0));
        assert!(!Fingerprint::of(&[1.0, f32::NAN]).norm.is_finite());
    }

    #[test]
    fn one_value_blown_up_is_caught_against_the_peers_and_the_peers_are_not() {
        let round = named(&[
            ("a", fp(1.0, 0.01)),
            ("b", fp(1.1, 0.012)),
            ("c", fp(1.05, 0.5)),
        ]);
        let found = outliers(&round, &BTreeMap::new(), OUTLIER_RATIO);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            (found[0].name.as_str(), found[0].statistic.as_str()),
            ("c", "max_abs")
        );
        assert_eq!(found[0].against, "its peers this round");
        // Honest spread is not an outlier.
        let round = named(&[("a", fp(1.0, 0.01)), ("b", fp(3.0, 0.05))]);
        assert!(outliers(&round, &BTreeMap::new(), OUTLIER_RATIO).is_empty());
    }

    #[test]
    fn a_non_finite_contribution_is_always_an_outlier() {
        let round = named(&[("a", fp(f64::INFINITY, f64::INFINITY))]);
        let found = outliers(&round, &BTreeMap::new(), OUTLIER_RATIO);
        assert_eq!(found.len(), 1);
    }

    #[test]
    fn alone_a_worker_is_judged_against_its_own_history() {
        let mut history = BTreeMap::new();
        remember(
            &mut history,
            &named(&[("a", fp(1.0, 0.01)), ("b", fp(0.0, 0.0))]),
        );
        // b refused its step (zeros): not a reference for a, and not itself an outlier.
        let round = named(&[("a", fp(1.2, 0.2)), ("b", fp(0.0, 0.0))]);
        let found = outliers(&round, &history, OUTLIER_RATIO);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].against, "its own recent rounds");
        // With no history either, there is nothing to judge by.
        assert!(outliers(&round, &BTreeMap::new(), OUTLIER_RATIO).is_empty());
        for _ in 0..20 {
            remember(&mut history, &named(&[("a", fp(1.0, 0.01))]));
        }
        assert_eq!(history["a"].len(), HISTORY);
    }

    #[test]
    fn a_weighed_contribution_is_fingerprinted_per_batch_of_its_progress() {
        // Progress [3, 4] over 4 batches, sent times 4.
        let sent = Fingerprint::of(&[12.0, 16.0]);
        assert_eq!(sent.per_batch(4.0), Fingerprint::of(&[0.75, 1.0]));
        assert_eq!(sent.per_batch(1.0), sent, "fixed rounds: as sent");
        assert_eq!(sent.per_batch(0.0), sent, "a refusal: as sent");
    }
}
