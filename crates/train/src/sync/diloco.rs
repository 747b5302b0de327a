//! DiLoCo: each replica trains H guarded inner steps from the outer weights and contributes
//! its pseudo-gradient (outer − local); the committed average takes one outer Nesterov step.
//!
//! Streaming DiLoCo (Douillard et al. 2025) is the same strategy with its three settings
//! turned on: the parameters split into P [`Fragments`], a round of H/P steps syncs one of
//! them (so each syncs every H steps, and the link carries 1/P of the model at a time); the
//! pseudo-gradient is taken τ steps before the round ends and its all-reduce runs while those
//! steps train ([`SyncStrategy::overlap`]); and the synced fragment's local weights are mixed
//! with its new outer weights by α instead of replaced. P = 1, τ = 0, α = 0 is plain DiLoCo.

use holdfast_model::weights::ParamSpec;

use super::fragments::Fragments;
use super::outer::{OuterNesterov, pseudo_gradient};
use super::{Contribution, RoundWork, SyncStrategy, counted_mean, payload_buffer, timed, weighted};
use crate::config::SyncSection;
use crate::guarded::{GuardedStep, Outcome};
use crate::replica::{Replica, flatten_into};
#[cfg(test)]
use crate::{config::TrainSection, data::Dataset, sync::testing::summed};

pub struct Diloco {
    outer: OuterNesterov,
    fragments: Fragments,
    /// τ: the round's last steps, trained while its all-reduce runs.
    overlap_steps: usize,
    /// α: how much of its local weights a synced fragment keeps.
    mixing: f32,
}

impl Diloco {
    /// The strategy `s` describes, for a model of parameters `specs`.
    pub fn new(s: &SyncSection, specs: &[ParamSpec]) -> Diloco {
        Diloco {
            outer: OuterNesterov {
                lr: s.outer_lr as f32,
                momentum: s.outer_momentum as f32,
            },
            fragments: Fragments::strided(specs, s.fragments.max(1) as usize),
            overlap_steps: s.overlap_steps as usize,
            mixing: s.mixing as f32,
        }
    }

    /// The round's optimizer steps: `(before the contribution, overlapping its sync)`. An
    /// on-demand round's are not known in advance, and it has no overlap (see the config).
    fn split(&self, work: &RoundWork) -> (usize, usize) {
        if work.more.is_some() {
            return (usize::MAX, 0);
        }
        let steps = work.batches.len().div_ceil(work.train.grad_accum.max(1));
        let overlap = self.overlap_steps.min(steps.saturating_sub(1));
        (steps - overlap, overlap)
    }
}

impl SyncStrategy for Diloco {
    fn has_velocity(&self) -> bool {
        true
    }

    fn fragments(&self) -> usize {
        self.fragments.count()
    }

    fn fragment_of(&self, round: u64) -> usize {
        self.fragments.of_round(round)
    }

    fn keeps_local_weights(&self) -> bool {
        self.fragments.count() > 1 || self.mixing != 0.0
    }

    fn contribute(
        &self,
        r: &mut Replica,
        work: &RoundWork,
        stepper: &mut GuardedStep,
    ) -> Contribution {
        let (before, _) = self.split(work);
        stepper.mark_good(&r.weights, &r.opt, work.first_step);
        let (mut c, compute_s) = timed(|| inner_steps(r, work, stepper, 0..before));
        c.compute_s = compute_s;
        let f = self.fragments.of_round(work.round);
        let mut local = Vec::with_capacity(self.fragments.len(f));
        for &p in self.fragments.params(f) {
            flatten_into(std::slice::from_ref(&r.weights.tensors[p]), &mut local);
        }
        let mut outer = Vec::with_capacity(local.len());
        self.fragments.gather_into(f, &r.outer, &mut outer);
        let mut delta = payload_buffer(local.len());
        pseudo_gradient(&outer, &local, &mut delta);
        // A replica that made no progress (rolled back, or every step refused) is not a vote
        // for standing still: the outer step is the mean of the replicas that moved.
        let moved = delta.iter().any(|&d| d != 0.0);
        c.payload = weighted(delta, work.weight(moved, c.batches));
        c
    }

    fn overlap(
        &self,
        r: &mut Replica,
        work: &RoundWork,
        stepper: &mut GuardedStep,
        contributed: &Contribution,
    ) -> Contribution {
        let (before, overlap) = self.split(work);
        if overlap == 0 || contributed.rollbacks > 0 {
            // A rollback skips the rest of the round's batches.
            return Contribution::default();
        }
        let (mut c, compute_s) = timed(|| inner_steps(r, work, stepper, before..before + overlap));
        c.compute_s = compute_s;
        c
    }

    fn apply(&self, r: &mut Replica, sum: Vec<f32>, work: &RoundWork) -> bool {
        let f = self.fragments.of_round(work.round);
        let mut outer = Vec::with_capacity(self.fragments.len(f));
        self.fragments.gather_into(f, &r.outer, &mut outer);
        let mut velocity = Vec::with_capacity(outer.len());
        self.fragments.gather_into(f, &r.velocity, &mut velocity);
        let moved = match counted_mean(sum) {
            Some(average) => {
                let step = self.outer.damped(work.step_scale as f32);
                step.apply_round(&mut outer, &mut velocity, &average)
            }
            // No replica made progress: no step, and the momentum that led here is cleared.
            None => {
                velocity.fill(0.0);
                false
            }
        };
        self.fragments.scatter(f, &outer, &mut r.outer);
        self.fragments.scatter(f, &velocity, &mut r.velocity);
        // What the overlapped steps changed in the fragment is overwritten (α = 0) or mixed:
        // keeping it on top of the new outer weights measured worse (README, "Slow links").
        for &p in self.fragments.params(f) {
            r.mix_local_toward_outer(p, self.mixing);
        }
        moved
    }
}

/// The round's inner steps `steps` (indices among its optimizer steps). A rollback goes back
/// to the round's start: the replica then contributes what it held then (no change, in plain
/// DiLoCo), and the rest of its batches this round are skipped. Past its rollback limit a
/// replica goes on rolling back: whether the run is unstable is the coordinator's call, from
/// every replica's rounds.
fn inner_steps(
    r: &mut Replica,
    work: &RoundWork,
    stepper: &mut GuardedStep,
    steps: std::ops::Range<usize>,
) -> Contribution {
    let mut c = Contribution::default();
    let mut measured = 0u32;
    for (i, ids) in work.step_ids().enumerate().take(steps.end) {
        if i < steps.start {
            continue;
        }
        let firsts = work.firsts(&ids);
        let b = work.step(i, &firsts);
        let started = std::time::Instant::now();
        let report = stepper.step(&mut r.weights, &mut r.opt, &b, work.train);
        work.pace(started);
        c.tokens += report.tokens as u64;
        c.batches += ids.len() as u64;
        if report.loss.is_finite() {
            c.loss += report.loss;
            measured += 1;
        }
        match report.outcome {
            Outcome::Applied { .. } => {}
            Outcome::Skipped { reason } => {
                tracing::warn!("step {}: not applied: {reason}", b.step);
                c.skipped_steps += 1;
            }
            Outcome::RolledBack { reason, .. } | Outcome::Stop { reason } => {
                tracing::warn!(
                    "step {}: rolled back to the round's start: {reason}",
                    b.step
                );
                c.rollbacks += 1;
                break;
            }
        }
    }
    c.loss /= f64::from(measured.max(1));
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use holdfast_model::weights::param_specs;

    use crate::chaos::NumberFaults;
    use crate::guard::GuardSection;
    use crate::replica::flatten;
    use crate::sync::testing::*;

    fn strategy() -> Diloco {
        Diloco::new(
            &SyncSection {
                outer_lr: 1.0,
                ..Default::default()
            },
            &param_specs(&model()),
        )
    }

    /// Three NaN steps from the round's first roll a replica back to its start.
    fn rolled_back(data: &Dataset, train: &TrainSection) -> Contribution {
        let mut faults = NumberFaults {
            nan_steps: vec![10, 11, 12],
            ..Default::default()
        };
        let mut stepper = GuardedStep::new(GuardSection::default(), &mut faults);
        let c = strategy().contribute(
            &mut replica(true),
            &work(data, train, &[0, 1, 2, 3]),
            &mut stepper,
        );
        assert_eq!((c.skipped_steps, c.rollbacks), (2, 1), "{c:?}");
        c
    }

    fn trained(data: &Dataset, train: &TrainSection, batches: &[u64]) -> Contribution {
        let mut faults = NumberFaults::default();
        let mut stepper = GuardedStep::new(GuardSection::default(), &mut faults);
        strategy().contribute(
            &mut replica(true),
            &work(data, train, batches),
            &mut stepper,
        )
    }

    #[test]
    fn a_replica_contributes_its_progress_and_the_average_moves_every_replica_alike() {
        let (data, train) = (data(), train());
        let mut faults = NumberFaults::default();
        let mut stepper = GuardedStep::new(GuardSection::default(), &mut faults);
        let (mut a, mut b) = (replica(true), replica(true));
        let s = strategy();
        let ca = s.contribute(&mut a, &work(&data, &train, &[0, 1, 2]), &mut stepper);
        let cb = s.contribute(&mut b, &work(&data, &train, &[3, 4, 5]), &mut stepper);
        let mut delta = Vec::new();
        pseudo_gradient(&a.outer, &flatten(&a.weights.tensors), &mut delta);
        assert!(delta.iter().any(|&d| d != 0.0), "three steps moved it");
        assert_eq!(ca.payload, weighted(delta, 1.0), "the progress, weight 1");
        assert!(ca.loss > 0.0 && ca.tokens > 0 && ca.skipped_steps + ca.rollbacks == 0);
        assert_ne!(ca.payload, cb.payload, "other batches, other progress");

        let sum = summed(&[&ca, &cb]);
        let mean = counted_mean(sum.clone()).unwrap();
        let before = a.outer.clone();
        let w = work(&data, &train, &[]);
        assert!(s.apply(&mut a, sum.clone(), &w) && s.apply(&mut b, sum, &w));
        assert_eq!(
            a.state_hash(),
            b.state_hash(),
            "replicas stay bit-identical"
        );
        // lr 1, no momentum: the outer weights land on the mean of the replicas' weights.
        let expected: Vec<f32> = before.iter().zip(&mean).map(|(o, d)| o - d).collect();
        assert_eq!(a.outer, expected);
        assert_eq!(
            flatten(&a.weights.tensors),
            a.outer,
            "local weights reset to outer"
        );
    }

    #[test]
    fn a_rolled_back_replica_does_not_dilute_the_step_of_the_others() {
        let (data, train) = (data(), train());
        let back = rolled_back(&data, &train);
        let (values, weight) = back.payload.split_at(back.payload.len() - 1);
        assert!(
            values.iter().all(|&d| d == 0.0),
            "back at the round's start"
        );
        assert_eq!(weight, [0.0], "a refusal does not count");
        assert_eq!(back.loss, 0.0, "no finite loss measured");

        let good = trained(&data, &train, &[4, 5]);
        let s = strategy();
        let w = work(&data, &train, &[]);
        let (mut with_refusal, mut alone) = (replica(true), replica(true));
        s.apply(&mut with_refusal, summed(&[&good, &back]), &w);
        s.apply(&mut alone, summed(&[&good]), &w);
        assert_eq!(
            with_refusal.outer, alone.outer,
            "the outer step is the moving replica's whole progress, not half of it"
        );
    }

    #[test]
    fn a_round_in_which_no_replica_moved_takes_no_step_and_clears_the_momentum() {
        let (data, train) = (data(), train());
        let s = strategy();
        let mut r = replica(true);
        r.velocity.fill(0.25);
        let before = r.outer.clone();
        let back = rolled_back(&data, &train);
        assert!(!s.apply(&mut r, summed(&[&back, &back]), &work(&data, &train, &[])));
        assert_eq!(r.outer, before);
        assert!(r.velocity.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn an_on_demand_round_trains_what_it_is_handed_and_weighs_its_progress_by_batches() {
        let (data, train) = (data(), train());
        let handed = std::cell::RefCell::new(vec![vec![3], vec![2], vec![1]]);
        let ask = || handed.borrow_mut().pop().unwrap_or_default();
        let mut on_demand = work(&data, &train, &[0]);
        on_demand.more = Some(&ask);
        on_demand.by_batches = true;
        let mut faults = NumberFaults::default();
        let mut stepper = GuardedStep::new(GuardSection::default(), &mut faults);
        let asked = strategy().contribute(&mut replica(true), &on_demand, &mut stepper);
        assert!(
            handed.borrow().is_empty(),
            "it asked until told the round closed"
        );
        assert_eq!(asked.batches, 4);
        let fixed = trained(&data, &train, &[0, 1, 2, 3]);
        let (values, weight) = fixed.payload.split_at(fixed.payload.len() - 1);
        assert_eq!(weight, [1.0]);
        let scaled: Vec<f32> = values.iter().map(|v| v * 4.0).chain([4.0]).collect();
        assert_eq!(
            asked.payload, scaled,
            "the same steps, weighed by its 4 batches"
        );
    }

    #[test]
    fn contributions_weighed_by_batches_average_by_batches() {
        let (data, train) = (data(), train());
        let mut by_batches = work(&data, &train, &[]);
        by_batches.by_batches = true;
        let three = weighted(vec![1.0, 0.0], by_batches.weight(true, 3));
        let one = weighted(vec![0.0, 2.0], by_batches.weight(true, 1));
        let sum: Vec<f32> = three.iter().zip(&one).map(|(a, b)| a + b).collect();
        assert_eq!(sum, [3.0, 2.0, 4.0]);
        assert_eq!(counted_mean(sum), Some(vec![0.75, 0.5]));
        assert_eq!(by_batches.weight(false, 3), 0.0, "a refusal weighs nothing");
    }

    #[test]
    fn a_damped_round_takes_a_scaled_step() {
        let s = strategy();
        let (data, train) = (data(), train());
        let mut r = replica(true);
        let before = r.outer.clone();
        let sum = weighted(vec![1.0f32; before.len()], 1.0);
        let mut w = work(&data, &train, &[]);
        w.step_scale = 0.5;
        s.apply(&mut r, sum, &w);
        assert_eq!(r.outer[0], before[0] - 0.5);
    }

    fn streaming(fragments: u64, overlap_steps: u64, mixing: f64) -> Diloco {
        let cfg = SyncSection {
            outer_lr: 1.0,
            inner_steps: 6,
            fragments,
            overlap_steps,
            mixing,
            ..Default::default()
        };
        let mut model = model();
        model.num_hidden_layers = 2;
        Diloco::new(&cfg, &param_specs(&model))
    }

    fn two_layer_replica() -> Replica {
        let mut m = model();
        m.num_hidden_layers = 2;
        Replica::fresh(&m, 5, &burn::tensor::Device::flex(), true)
    }

    /// The values of `flat` inside (true) or outside (false) fragment `f`.
    fn part(s: &Diloco, f: usize, flat: &[f32], inside: bool) -> Vec<f32> {
        let mut mask = vec![!inside; flat.len()];
        s.fragments
            .ranges(f)
            .flatten()
            .for_each(|i| mask[i] = inside);
        flat.iter()
            .zip(&mask)
            .filter(|(_, m)| **m)
            .map(|(v, _)| *v)
            .collect()
    }

    #[test]
    fn a_streaming_round_syncs_one_fragment_and_leaves_the_rest_local() {
        let (data, train) = (data(), train());
        let s = streaming(2, 0, 0.0);
        let mut faults = NumberFaults::default();
        let mut stepper = GuardedStep::new(GuardSection::default(), &mut faults);
        let (mut a, mut b) = (two_layer_replica(), two_layer_replica());
        let mut w = work(&data, &train, &[0, 1, 2]);
        w.round = 7;
        let ca = s.contribute(&mut a, &w, &mut stepper);
        let wb = RoundWork {
            batches: &[3, 4, 5],
            ..w
        };
        let cb = s.contribute(&mut b, &wb, &mut stepper);
        assert_eq!(
            ca.payload.len(),
            s.fragments.len(1) + 1,
            "fragment 1, weight"
        );
        assert!(s.fragments.len(1) < a.outer.len() / 2 + a.outer.len() / 4);

        let (outer_before, local_before) = (a.outer.clone(), flatten(&a.weights.tensors));
        assert!(s.apply(&mut a, summed(&[&ca, &cb]), &w));
        assert!(s.apply(&mut b, summed(&[&ca, &cb]), &w));
        assert_eq!(a.state_hash(), b.state_hash(), "the shared state agrees");
        let local = flatten(&a.weights.tensors);
        assert_ne!(
            part(&s, 1, &a.outer, true),
            part(&s, 1, &outer_before, true)
        );
        assert_eq!(
            part(&s, 1, &a.outer, false),
            part(&s, 1, &outer_before, false)
        );
        assert!(
            a.velocity
                .iter()
                .zip(&a.outer)
                .zip(&outer_before)
                .all(|((v, o), before)| (*v != 0.0) == (o != before)),
            "momentum moves with its fragment only"
        );
        assert_eq!(
            part(&s, 1, &local, true),
            part(&s, 1, &a.outer, true),
            "α = 0"
        );
        assert_eq!(
            part(&s, 1, &local, false),
            part(&s, 1, &local_before, false),
            "the other fragment keeps its local progress"
        );
        assert_ne!(part(&s, 1, &local, false), part(&s, 1, &a.outer, false));
    }

    #[test]
    fn mixing_keeps_alpha_of_the_local_weights() {
        let (data, train) = (data(), train());
        let s = streaming(2, 0, 0.25);
        let mut faults = NumberFaults::default();
        let mut stepper = GuardedStep::new(GuardSection::default(), &mut faults);
        let mut r = two_layer_replica();
        let w = work(&data, &train, &[0, 1]);
        let c = s.contribute(&mut r, &w, &mut stepper);
        let local_before = flatten(&r.weights.tensors);
        s.apply(&mut r, summed(&[&c]), &w);
        let local = flatten(&r.weights.tensors);
        for i in s.fragments.ranges(0).flatten() {
            let mixed = 0.25 * local_before[i] + 0.75 * r.outer[i];
            assert_eq!(local[i], mixed, "value {i}");
        }
    }

    #[test]
    fn an_overlapped_round_sends_the_progress_before_its_last_steps_and_trains_them_after() {
        let (data, train) = (data(), train());
        let mut faults = NumberFaults::default();
        let mut stepper = GuardedStep::new(GuardSection::default(), &mut faults);
        let s = streaming(1, 1, 0.0);
        let mut r = two_layer_replica();
        let w = work(&data, &train, &[0, 1, 2]);
        let c = s.contribute(&mut r, &w, &mut stepper);
        let tail = s.overlap(&mut r, &w, &mut stepper, &c);
        assert!(tail.tokens > 0 && tail.payload.is_empty(), "{tail:?}");
        assert_eq!(tail.tokens * 2, c.tokens, "one step after, two before");

        // The same payload as a round of the first two batches without overlap.
        let plain = streaming(1, 0, 0.0);
        let mut q = two_layer_replica();
        let first_two = plain.contribute(&mut q, &work(&data, &train, &[0, 1]), &mut stepper);
        assert_eq!(c.payload, first_two.payload);
        assert_ne!(
            flatten(&r.weights.tensors),
            flatten(&q.weights.tensors),
            "the overlapped step trained"
        );
    }

    #[test]
    fn a_replica_with_local_weights_of_its_own_travels_whole() {
        let (data, train) = (data(), train());
        let s = streaming(2, 0, 0.0);
        let mut faults = NumberFaults::default();
        let mut stepper = GuardedStep::new(GuardSection::default(), &mut faults);
        let mut r = two_layer_replica();
        let w = work(&data, &train, &[0, 1]);
        let c = s.contribute(&mut r, &w, &mut stepper);
        s.apply(&mut r, summed(&[&c]), &w);
        let local = flatten(&r.weights.tensors);
        assert_ne!(local, r.outer);
        let bytes = r.encode(s.keeps_local_weights());
        assert!(bytes.len() as u64 <= Replica::encoded_bound(&r.weights.cfg));
        let back =
            Replica::decode(&bytes, &r.weights.cfg, &burn::tensor::Device::flex(), "me").unwrap();
        assert_eq!(flatten(&back.weights.tensors), local);
        assert_eq!(back.state_hash(), r.state_hash());
    }
}
