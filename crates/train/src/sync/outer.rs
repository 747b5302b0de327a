//! DiLoCo's outer step on flat buffers (Douillard et al. 2023): each replica trains H inner
//! steps from the shared outer weights θ, the replicas average their pseudo-gradients
//! Δ = θ − θ_local, and θ takes one Nesterov-momentum SGD step along the average.

/// Outer optimizer: SGD with Nesterov momentum, as `torch.optim.SGD(nesterov=True)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OuterNesterov {
    pub lr: f32,
    pub momentum: f32,
}

/// Writes `outer − local` into `out`.
pub fn pseudo_gradient(outer: &[f32], local: &[f32], out: &mut Vec<f32>) {
    assert_eq!(outer.len(), local.len(), "replicas have the same shape");
    out.clear();
    out.extend(outer.iter().zip(local).map(|(o, l)| o - l));
}

impl OuterNesterov {
    /// Applies the averaged pseudo-gradient `avg` to `outer`, updating `velocity`:
    /// v ← μ·v + Δ;  θ ← θ − lr·(Δ + μ·v).
    pub fn step(&self, outer: &mut [f32], velocity: &mut [f32], avg: &[f32]) {
        assert!(outer.len() == velocity.len() && outer.len() == avg.len());
        for ((p, v), g) in outer.iter_mut().zip(velocity.iter_mut()).zip(avg) {
            *v = self.momentum * *v + g;
            *p -= self.lr * (g + self.momentum * *v);
        }
    }

    /// The step of a damped round after a rewind: `scale` × lr and no momentum, so the
    /// velocity restarts from this round's pseudo-gradient instead of pushing on along the
    /// direction that failed. `scale` 1 is the plain step.
    pub fn damped(self, scale: f32) -> OuterNesterov {
        if scale >= 1.0 {
            return self;
        }
        OuterNesterov {
            lr: self.lr * scale,
            momentum: 0.0,
        }
    }

    /// Applies a committed round's averaged pseudo-gradient; returns whether the outer weights
    /// moved. A round in which no replica made progress (every one rolled back, so `avg` is
    /// all zeros, bit for bit on every replica) takes no step and clears the momentum, which
    /// would otherwise carry the outer weights on along the direction that just failed.
    pub fn apply_round(&self, outer: &mut [f32], velocity: &mut [f32], avg: &[f32]) -> bool {
        if avg.iter().all(|&g| g == 0.0) {
            velocity.fill(0.0);
            return false;
        }
        self.step(outer, velocity, avg);
        true
    }
}

/// Divides a summed buffer by the number of contributors.
pub fn average_in_place(sum: &mut [f32], contributors: usize) {
    let inv = 1.0 / contributors as f32;
    for v in sum {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lr_one_without_momentum_moves_outer_to_the_mean_replica() {
        let outer = vec![1.0f32, 2.0, 3.0];
        let replicas = [vec![0.0f32, 2.0, 5.0], vec![2.0f32, 0.0, 5.0]];
        let mut sum = vec![0.0f32; 3];
        let mut d = Vec::new();
        for r in &replicas {
            pseudo_gradient(&outer, r, &mut d);
            for (s, x) in sum.iter_mut().zip(&d) {
                *s += x;
            }
        }
        average_in_place(&mut sum, 2);
        let mut o = outer.clone();
        let mut v = vec![0.0; 3];
        OuterNesterov {
            lr: 1.0,
            momentum: 0.0,
        }
        .step(&mut o, &mut v, &sum);
        assert_eq!(o, vec![1.0, 1.0, 5.0]);
    }

    #[test]
    fn a_round_without_progress_takes_no_step_and_clears_the_momentum() {
        let opt = OuterNesterov {
            lr: 0.7,
            momentum: 0.9,
        };
        let (mut p, mut v) = (vec![1.0f32, 2.0], vec![0.5f32, -0.25]);
        // A plain step with a zero gradient still moves by lr * momentum^2 * v.
        let (mut q, mut w) = (p.clone(), v.clone());
        opt.step(&mut q, &mut w, &[0.0, 0.0]);
        assert_ne!(q, p);
        assert!(!opt.apply_round(&mut p, &mut v, &[0.0, 0.0]));
        assert_eq!(
            (p.as_slice(), v.as_slice()),
            ([1.0, 2.0].as_slice(), [0.0, 0.0].as_slice())
        );
        assert!(opt.apply_round(&mut p, &mut v, &[0.5, 0.0]));
        assert_eq!(p[0], 1.0 - 0.7 * (0.5 + 0.9 * 0.5));
    }

    #[test]
    fn nesterov_matches_the_torch_formula() {
        let opt = OuterNesterov {
            lr: 0.7,
            momentum: 0.9,
        };
        let (mut p, mut v) = (vec![1.0f32], vec![0.5f32]);
        opt.step(&mut p, &mut v, &[0.2]);
        let v1 = 0.9 * 0.5 + 0.2;
        assert_eq!(v[0], v1);
        assert_eq!(p[0], 1.0 - 0.7 * (0.2 + 0.9 * v1));
    }
}
