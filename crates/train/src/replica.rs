//! One worker's replica in a multi-worker run: its local weights and inner AdamW state on the
//! device, and the shared outer weights and outer momentum as flat host buffers (what the
//! collectives and the DiLoCo step work on). A replica serialises to safetensors — flat F32
//! tensors `outer`, `velocity`, `exp_avg`, `exp_avg_sq`, `local` when the local weights are
//! not the outer ones (streaming DiLoCo), `residual.F` for each fragment's error-feedback
//! residual, and the round and owner in the metadata — which is what a healthy peer sends a
//! rejoining one, what an auditor replays a round from, and what a checkpoint keeps of each
//! worker ([`OwnState`]).

use std::collections::BTreeMap;

use burn::tensor::{Device, Tensor, TensorData};
use holdfast_model::weights::{ParamSpec, param_specs};
use holdfast_model::{HostTensor, ModelConfig, Weights, st};
use safetensors::tensor::Dtype;

use holdfast_model::st::f32_from_le_bytes;

use crate::data::DataCursor;
use crate::optim::AdamW;
use crate::sync::feedback::ErrorFeedback;
use crate::{TrainError, TrainState};

const FORMAT: &str = "holdfast-replica-1";
/// Room for the safetensors header of an encoded replica: five tensor entries, one per
/// fragment's residual (at most one per layer) and four short metadata values take a few
/// kilobytes at most.
const HEADER_BOUND: u64 = 64 << 10;
/// The most fragments a state may carry residuals for (a fragment is at least one layer).
const MAX_FRAGMENTS: usize = 4096;

/// Concatenates tensors' values in their device layout.
pub fn flatten(tensors: &[Tensor<2>]) -> Vec<f32> {
    let mut out = Vec::new();
    flatten_into(tensors, &mut out);
    out
}

/// [`flatten`] appended to `out`, reserving the room once.
pub fn flatten_into(tensors: &[Tensor<2>], out: &mut Vec<f32>) {
    out.reserve(tensors.iter().map(|t| t.shape().num_elements()).sum());
    for t in tensors {
        out.extend(
            t.clone()
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("f32 tensor"),
        );
    }
}

/// The inverse of [`flatten`] for the parameters `specs`.
pub fn unflatten(flat: &[f32], specs: &[ParamSpec], device: &Device) -> Vec<Tensor<2>> {
    let mut at = 0;
    specs
        .iter()
        .map(|s| {
            let shape = s.stored_shape();
            let n = shape[0] * shape[1];
            let t = Tensor::from_data(TensorData::new(flat[at..at + n].to_vec(), shape), device);
            at += n;
            t
        })
        .collect()
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

#[derive(Clone, Debug)]
pub struct Replica {
    /// Local weights (DiLoCo's inner model; in DDP always equal to `outer`).
    pub weights: Weights,
    pub opt: AdamW,
    pub outer: Vec<f32>,
    /// Outer Nesterov momentum (empty in DDP).
    pub velocity: Vec<f32>,
    /// The round this state starts.
    pub next_round: u64,
    /// The worker whose own this state is (empty for the seeded or a checkpointed one): its
    /// inner optimizer state and residuals come from that worker's training.
    pub owner: String,
    /// Error feedback, one per fragment, of `owner`'s quantized contributions.
    pub feedback: Vec<ErrorFeedback>,
}

/// What a DiLoCo worker holds of its own, beyond the state every replica shares: its inner
/// AdamW moments and step count, its local weights where they may differ from the outer
/// ones (streaming), and its error-feedback residuals. A checkpoint keeps one per worker so
/// that a run restarted cold continues each worker where it stood.
#[derive(Clone, Debug, PartialEq)]
pub struct OwnState {
    pub name: String,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
    pub adam_t: u64,
    pub local: Option<Vec<f32>>,
    /// Residuals by fragment (empty where none waits).
    pub residuals: Vec<Vec<f32>>,
}

impl Replica {
    /// The seeded initial state every worker starts round 0 from.
    pub fn fresh(cfg: &ModelConfig, seed: u64, device: &Device, with_velocity: bool) -> Replica {
        let weights = Weights::init(cfg, seed, device);
        let outer = flatten(&weights.tensors);
        let velocity = if with_velocity {
            vec![0.0; outer.len()]
        } else {
            Vec::new()
        };
        Replica {
            opt: AdamW::new(&weights.tensors),
            weights,
            outer,
            velocity,
            next_round: 0,
            owner: String::new(),
            feedback: Vec::new(),
        }
    }

    /// Makes this state `name`'s own, with one error feedback per fragment. Residuals another
    /// worker left in it are dropped: they are what *its* contributions lost, and adding them
    /// to this worker's would count that loss twice.
    pub fn make_own(&mut self, name: &str, fragments: usize) {
        if self.owner != name {
            self.feedback.clear();
            self.owner = name.to_string();
        }
        self.feedback.resize(fragments, ErrorFeedback::default());
    }

    /// Its owner's own part; the local weights only where they differ from the outer ones.
    pub fn own_state(&self) -> OwnState {
        let local = flatten(&self.weights.tensors);
        OwnState {
            name: self.owner.clone(),
            exp_avg: flatten(&self.opt.exp_avg),
            exp_avg_sq: flatten(&self.opt.exp_avg_sq),
            adam_t: self.opt.t,
            local: (local != self.outer).then_some(local),
            residuals: self
                .feedback
                .iter()
                .map(|f| f.residual().to_vec())
                .collect(),
        }
    }

    /// The shared state of `self` (outer weights, momentum, round) with `own`'s part: what
    /// worker `own.name` held.
    pub fn with_own_state(&self, own: &OwnState) -> Replica {
        let device = self.weights.tensors[0].device();
        let specs = &self.weights.specs;
        let local = own.local.as_deref().unwrap_or(&self.outer);
        Replica {
            weights: Weights {
                cfg: self.weights.cfg.clone(),
                tensors: unflatten(local, specs, &device),
                specs: specs.clone(),
            },
            opt: AdamW {
                exp_avg: unflatten(&own.exp_avg, specs, &device),
                exp_avg_sq: unflatten(&own.exp_avg_sq, specs, &device),
                t: own.adam_t,
            },
            outer: self.outer.clone(),
            velocity: self.velocity.clone(),
            next_round: self.next_round,
            owner: own.name.clone(),
            feedback: own
                .residuals
                .iter()
                .map(|r| ErrorFeedback::carrying(r.clone()))
                .collect(),
        }
    }

    /// Sets the local weights to the outer weights.
    pub fn reset_local_to_outer(&mut self) {
        let device = self.weights.tensors[0].device();
        self.weights.tensors = unflatten(&self.outer, &self.weights.specs, &device);
    }

    /// Mixes parameter `p`'s local weights toward its outer ones: α·local + (1−α)·outer, and
    /// at α = 0 exactly the outer weights.
    pub fn mix_local_toward_outer(&mut self, p: usize, mixing: f32) {
        let mut at = 0;
        for s in &self.weights.specs[..p] {
            at += s.numel();
        }
        let shape = self.weights.specs[p].stored_shape();
        let outer = &self.outer[at..at + shape[0] * shape[1]];
        let values = if mixing == 0.0 {
            outer.to_vec()
        } else {
            let mut local = Vec::with_capacity(outer.len());
            flatten_into(std::slice::from_ref(&self.weights.tensors[p]), &mut local);
            local
                .iter()
                .zip(outer)
                .map(|(l, o)| mixing * l + (1.0 - mixing) * o)
                .collect()
        };
        let device = self.weights.tensors[p].device();
        self.weights.tensors[p] = Tensor::from_data(TensorData::new(values, shape), &device);
    }

    /// BLAKE3 of the synced state (outer weights and momentum): equal on every replica that
    /// is in sync, bit for bit.
    pub fn state_hash(&self) -> String {
        let mut h = blake3::Hasher::new();
        hash_f32(&mut h, &self.outer);
        hash_f32(&mut h, &self.velocity);
        h.finalize().to_hex().to_string()
    }

    /// The most bytes [`Replica::encode`] makes for model `cfg`: five flat f32 tensors of every
    /// parameter (outer weights, outer momentum, AdamW's two moments, local weights), the
    /// residuals (one value per parameter over all fragments) and a header. A peer's state
    /// announced larger is refused before any of it is received or reserved.
    pub fn encoded_bound(cfg: &ModelConfig) -> u64 {
        24 * cfg.num_params() as u64 + HEADER_BOUND
    }

    /// The replica as bytes. `with_local`: its local weights may differ from the outer ones
    /// (streaming DiLoCo) and travel too; otherwise (plain DiLoCo and DDP end every round with
    /// local = outer) they are not sent twice, nor flattened and compared on every publish.
    pub fn encode(&self, with_local: bool) -> Vec<u8> {
        let flat = |name: &str, data: Vec<f32>| HostTensor {
            name: name.into(),
            shape: vec![data.len()],
            data,
        };
        let mut tensors = vec![
            flat("outer", self.outer.clone()),
            flat("velocity", self.velocity.clone()),
            flat("exp_avg", flatten(&self.opt.exp_avg)),
            flat("exp_avg_sq", flatten(&self.opt.exp_avg_sq)),
        ];
        if with_local {
            tensors.push(flat("local", flatten(&self.weights.tensors)));
        }
        for (f, feedback) in self.feedback.iter().enumerate() {
            if !feedback.residual().is_empty() {
                tensors.push(flat(&format!("residual.{f}"), feedback.residual().to_vec()));
            }
        }
        let meta = BTreeMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("next_round".to_string(), self.next_round.to_string()),
            ("adam_t".to_string(), self.opt.t.to_string()),
            ("owner".to_string(), self.owner.clone()),
        ]);
        st::serialize(&tensors, meta).expect("flat f32 tensors serialise")
    }

    /// Reads a replica of model `cfg` sent by `source`, checking every shape.
    pub fn decode(
        bytes: &[u8],
        cfg: &ModelConfig,
        device: &Device,
        source: &str,
    ) -> Result<Replica, TrainError> {
        let bad = |what: String| TrainError::Cluster(format!("state from {source}: {what}"));
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(bad(format!("not a {FORMAT} state")));
        }
        let num = |k: &str| -> Result<u64, TrainError> {
            meta.get(k)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad(format!("metadata `{k}` missing or not a number")))
        };
        let specs = param_specs(cfg);
        let n: usize = specs.iter().map(ParamSpec::numel).sum();
        let get = |name: &str, allow_empty: bool| -> Result<Vec<f32>, TrainError> {
            let t = st.tensor(name).map_err(|e| bad(e.to_string()))?;
            if t.dtype() != Dtype::F32 {
                return Err(bad(format!("{name} is {:?}, expected F32", t.dtype())));
            }
            let v = f32_from_le_bytes(t.data());
            if v.len() != n && !(allow_empty && v.is_empty()) {
                return Err(bad(format!(
                    "{name} has {} values, the model has {n}",
                    v.len()
                )));
            }
            Ok(v)
        };
        let outer = get("outer", false)?;
        let velocity = get("velocity", true)?;
        let local = match st.tensor("local") {
            Ok(_) => get("local", false)?,
            Err(_) => outer.clone(),
        };
        let feedback = residuals(&st, n).map_err(bad)?;
        let exp_avg = unflatten(&get("exp_avg", false)?, &specs, device);
        let exp_avg_sq = unflatten(&get("exp_avg_sq", false)?, &specs, device);
        let weights = Weights {
            cfg: cfg.clone(),
            tensors: unflatten(&local, &specs, device),
            specs,
        };
        Ok(Replica {
            weights,
            opt: AdamW {
                exp_avg,
                exp_avg_sq,
                t: num("adam_t")?,
            },
            outer,
            velocity,
            next_round: num("next_round")?,
            owner: meta.get("owner").cloned().unwrap_or_default(),
            feedback,
        })
    }

    /// The replica as a single-worker training state (for checkpoints and evaluation): its
    /// local weights — the outer weights, in plain DiLoCo and DDP, after a round —, its AdamW
    /// moments, `steps` optimizer steps taken and the data position `next_sample`.
    pub fn into_train_state(self, seed: u64, steps: u64, next_sample: u64) -> TrainState {
        TrainState {
            weights: self.weights,
            opt: self.opt,
            step: steps,
            cursor: DataCursor { next_sample },
            seed,
        }
    }
}

/// The residuals `residual.F` of an encoded state, by fragment; each at most `n` values.
fn residuals(st: &safetensors::SafeTensors, n: usize) -> Result<Vec<ErrorFeedback>, String> {
    let mut out = Vec::new();
    for (name, t) in st.tensors() {
        let Some(f) = name.strip_prefix("residual.") else {
            continue;
        };
        let f: usize = f
            .parse()
            .ok()
            .filter(|&f| f < MAX_FRAGMENTS)
            .ok_or_else(|| format!("tensor `{name}` names no fragment below {MAX_FRAGMENTS}"))?;
        let values = f32_from_le_bytes(t.data());
        if t.dtype() != Dtype::F32 || values.len() > n {
            return Err(format!(
                "{name} is {:?} with {} values, expected at most {n} F32",
                t.dtype(),
                values.len()
            ));
        }
        if out.len() <= f {
            out.resize(f + 1, ErrorFeedback::default());
        }
        out[f] = ErrorFeedback::carrying(values);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_size_bound_holds_an_encoded_replica_and_little_more() {
        let cfg = ModelConfig::preset("tiny").unwrap();
        // The largest kind: local weights of its own (streaming DiLoCo) and residuals for
        // every parameter (quantized sync) travel too.
        let mut r = Replica::fresh(&cfg, 1, &Device::flex(), true);
        r.outer[0] += 1.0;
        let n = r.outer.len();
        r.make_own("w0", 2);
        r.feedback[0] = ErrorFeedback::carrying(vec![0.5; n / 2]);
        r.feedback[1] = ErrorFeedback::carrying(vec![0.5; n - n / 2]);
        let bytes = r.encode(true).len() as u64;
        let bound = Replica::encoded_bound(&cfg);
        assert!(bytes <= bound, "{bytes} encoded, bound {bound}");
        assert!(
            bound - bytes <= HEADER_BOUND,
            "the bound is the real size, not a guess"
        );
        let back = Replica::decode(
            &Replica::fresh(&cfg, 1, &Device::flex(), true).encode(false),
            &cfg,
            &Device::flex(),
            "me",
        );
        assert!(back.is_ok());
    }

    fn replica() -> Replica {
        Replica::fresh(
            &ModelConfig::preset("tiny").unwrap(),
            1,
            &Device::flex(),
            true,
        )
    }

    fn decoded(bytes: &[u8]) -> Result<Replica, TrainError> {
        let r = replica();
        Replica::decode(bytes, &r.weights.cfg, &Device::flex(), "peer")
    }

    #[test]
    fn a_state_carries_its_owners_residuals_and_another_worker_drops_them() {
        let mut r = replica();
        r.make_own("w0", 3);
        r.feedback[1] = ErrorFeedback::carrying(vec![0.25, -1.5]);
        let mut back = decoded(&r.encode(false)).unwrap();
        assert_eq!(back.owner, "w0");
        assert_eq!(back.feedback[1].residual(), [0.25, -1.5]);
        back.make_own("w0", 3);
        assert_eq!(back.feedback, r.feedback, "its own worker keeps them");
        back.make_own("w1", 3);
        assert_eq!(back.owner, "w1");
        assert_eq!(back.feedback, vec![ErrorFeedback::default(); 3]);
    }

    #[test]
    fn a_workers_own_state_rebuilds_its_replica_on_the_shared_one() {
        let mut r = replica();
        r.make_own("w2", 1);
        r.feedback[0] = ErrorFeedback::carrying(vec![3.0; 5]);
        r.weights.tensors[1] = r.weights.tensors[1].clone().add_scalar(0.5);
        r.opt.exp_avg[0] = r.opt.exp_avg[0].clone().add_scalar(0.125);
        r.opt.t = 7;
        let own = r.own_state();
        assert!(
            own.local.is_some(),
            "its local weights moved off the outer ones"
        );
        let rebuilt = replica().with_own_state(&own);
        assert_eq!(rebuilt.own_state(), own);
        assert_eq!((rebuilt.owner.as_str(), rebuilt.opt.t), ("w2", 7));
        assert!(rebuilt.outer == r.outer && rebuilt.velocity == r.velocity);
        assert_eq!(rebuilt.state_hash(), r.state_hash());
        let mut plain = replica();
        plain.make_own("w3", 1);
        assert_eq!(
            plain.own_state().local,
            None,
            "local = outer is not kept twice"
        );
    }

    #[test]
    fn a_malformed_residual_is_refused_by_name() {
        let r = replica();
        let n = r.outer.len();
        let with_residual = |name: &str, len: usize| {
            let mut tensors: Vec<HostTensor> = ["outer", "velocity", "exp_avg", "exp_avg_sq"]
                .iter()
                .map(|t| HostTensor {
                    name: t.to_string(),
                    shape: vec![n],
                    data: vec![0.0; n],
                })
                .collect();
            tensors.push(HostTensor {
                name: name.into(),
                shape: vec![len],
                data: vec![0.0; len],
            });
            let meta = BTreeMap::from([
                ("format".to_string(), FORMAT.to_string()),
                ("next_round".to_string(), "0".to_string()),
                ("adam_t".to_string(), "0".to_string()),
            ]);
            st::serialize(&tensors, meta).unwrap()
        };
        assert!(decoded(&with_residual("residual.0", n)).is_ok());
        for (name, len, why) in [
            ("residual.0", n + 1, "expected at most"),
            ("residual.x", 1, "names no fragment"),
            ("residual.99999", 1, "names no fragment"),
        ] {
            let err = decoded(&with_residual(name, len))
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains(why) && err.contains("peer"), "{name}: {err}");
        }
    }
}
