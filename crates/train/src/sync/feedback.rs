//! Error feedback for quantized sync: what quantization dropped of a worker's part in a
//! committed round is added to its next contribution, so that over rounds the updates applied
//! add up to the pseudo-gradients computed, instead of losing whatever falls between the
//! levels (a small steady component can be rounded to zero every single round).
//!
//! The residual is this worker's own, like its inner optimizer state: it travels with the
//! replica's state (`Replica::feedback`), so a checkpoint keeps each worker's and a run
//! restarted cold continues with it, and a state reloaded after a rewind brings the residual
//! of its own round. A worker that takes another's state (live recovery) drops the residual
//! in it and starts without: what is lost then is one round's quantization error, a bounded
//! amount, where another worker's residual would be applied as if it were progress.

/// A worker's residual: what quantization dropped and no contribution has carried yet. Empty
/// until a quantized round commits, and while it rides on a contribution in flight.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ErrorFeedback {
    residual: Vec<f32>,
}

impl ErrorFeedback {
    /// Feedback with `residual` waiting (a worker's own, restored).
    pub fn carrying(residual: Vec<f32>) -> ErrorFeedback {
        ErrorFeedback { residual }
    }

    /// What waits to be added to the next contribution.
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    /// What to send for `payload` (values, then the weight: 1 when it counts): its values plus
    /// the residual, which leaves with them. A refusal (weight 0, all zeros) is sent as it is,
    /// and the residual waits for a contribution that counts.
    pub fn compensate(&mut self, payload: &[f32]) -> Vec<f32> {
        let (values, weight) = payload.split_at(payload.len().saturating_sub(1));
        let mut out = payload.to_vec();
        if weight == [1.0] && self.residual.len() == values.len() {
            out.iter_mut()
                .zip(std::mem::take(&mut self.residual))
                .for_each(|(v, r)| *v += r);
        }
        out
    }

    /// After the round committed: `dropped` is what quantization dropped of what was sent
    /// (the collective's residual; empty when values travelled as `f32`), added to what
    /// waited, if anything did.
    pub fn commit(&mut self, dropped: Vec<f32>) {
        if self.residual.len() != dropped.len() {
            if !dropped.is_empty() {
                self.residual = dropped;
            }
            return;
        }
        self.residual
            .iter_mut()
            .zip(&dropped)
            .for_each(|(r, d)| *r += d);
    }

    /// The residual's L2 norm.
    #[cfg(test)]
    fn norm(&self) -> f64 {
        self.residual
            .iter()
            .map(|&r| f64::from(r) * f64::from(r))
            .sum::<f64>()
            .sqrt()
    }
}

#[cfg(all(test, feature = "workers"))]
mod tests {
    use super::*;
    use holdfast_cluster::quant::Precision;

    /// One worker's quantized sync, as the collective does it alone: sends `payload`'s
    /// values encoded, returns what arrives and what was dropped.
    fn quantized(p: Precision, payload: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let values = &payload[..payload.len() - 1];
        let mut bytes = Vec::new();
        p.encode(values, &mut bytes).unwrap();
        let mut arrived = vec![0.0; values.len()];
        p.decode(&bytes, &mut arrived).unwrap();
        let dropped = values.iter().zip(&arrived).map(|(v, a)| v - a).collect();
        (arrived, dropped)
    }

    /// A pseudo-gradient: one large value per block sets the scale, the rest are a small
    /// steady drift (below int4's first level) and a little noise.
    fn pseudo_gradient(round: usize, n: usize) -> Vec<f32> {
        let mut g: Vec<f32> = (0..n)
            .map(|i| {
                let noise = (((i * 31 + round * 17) % 13) as f32 - 6.0) * 1e-4;
                if i.is_multiple_of(64) {
                    1.0
                } else {
                    0.03 + noise
                }
            })
            .collect();
        g.push(1.0);
        g
    }

    /// Applied minus true, summed over `rounds` rounds, worst value.
    fn drift(p: Precision, rounds: usize, with_feedback: bool) -> f32 {
        let n = 256;
        let mut ef = ErrorFeedback::default();
        let (mut applied, mut truth) = (vec![0.0f32; n], vec![0.0f32; n]);
        for round in 0..rounds {
            let g = pseudo_gradient(round, n);
            let sent = if with_feedback {
                ef.compensate(&g)
            } else {
                g.clone()
            };
            let (arrived, dropped) = quantized(p, &sent);
            ef.commit(dropped);
            applied.iter_mut().zip(&arrived).for_each(|(a, x)| *a += x);
            truth.iter_mut().zip(&g).for_each(|(t, x)| *t += x);
        }
        applied
            .iter()
            .zip(&truth)
            .map(|(a, t)| (a - t).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn with_the_residual_applied_updates_track_the_true_sum_over_many_rounds() {
        for p in [Precision::Int8, Precision::Int4, Precision::E2m1] {
            // Off by at most one round's error, however many rounds.
            let bound = p.max_relative_error() * 1.01;
            let with = drift(p, 200, true);
            assert!(with <= bound, "{p}: drift {with} with feedback");
            let without = drift(p, 200, false);
            assert!(
                without > 20.0 * bound,
                "{p}: drift {without} without feedback"
            );
        }
    }

    #[test]
    fn a_refusal_carries_no_residual_and_keeps_it() {
        let mut ef = ErrorFeedback::default();
        ef.compensate(&[0.5, 1.0]);
        ef.commit(vec![0.25]);
        let refusal = [0.0, 0.0];
        assert_eq!(
            ef.compensate(&refusal),
            refusal,
            "a refusal is sent as it is"
        );
        // The owner's share of the sum's error still comes back on a refusal: it adds up.
        ef.commit(vec![0.125]);
        assert_eq!(ef.compensate(&[1.0, 1.0]), vec![1.375, 1.0]);
        ef.commit(Vec::new());
        assert_eq!(
            ef.norm(),
            0.0,
            "carried through an exact round: nothing left"
        );
    }
}
