//! One worker's replica in a multi-worker run: its local weights and inner AdamW state on the
//! device, and the shared outer weights and outer momentum as flat host buffers (what the
//! collectives and the DiLoCo step work on). A replica serialises to safetensors — flat F32
//! tensors `outer`, `velocity`, `exp_avg`, `exp_avg_sq`, `local` when the local weights are
//! not the outer ones (streaming DiLoCo), and the round in the metadata — which is what a
//! healthy peer sends a rejoining one and what an auditor replays a round from.

use std::collections::BTreeMap;

use burn::tensor::{Device, Tensor, TensorData};
use holdfast_model::weights::{ParamSpec, param_specs};
use holdfast_model::{HostTensor, ModelConfig, Weights, st};
use safetensors::tensor::Dtype;

use holdfast_model::st::f32_from_le_bytes;

use crate::data::DataCursor;
use crate::optim::AdamW;
use crate::{TrainError, TrainState};

const FORMAT: &str = "holdfast-replica-1";
/// Room for the safetensors header of an encoded replica: four tensor entries and three short
/// metadata values take a few hundred bytes.
const HEADER_BOUND: u64 = 64 << 10;

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
    /// parameter (outer weights, outer momentum, AdamW's two moments, local weights) and a
    /// header. A peer's state announced larger is refused before any of it is received or
    /// reserved.
    pub fn encoded_bound(cfg: &ModelConfig) -> u64 {
        20 * cfg.num_params() as u64 + HEADER_BOUND
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
        let meta = BTreeMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("next_round".to_string(), self.next_round.to_string()),
            ("adam_t".to_string(), self.opt.t.to_string()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_size_bound_holds_an_encoded_replica_and_little_more() {
        let cfg = ModelConfig::preset("tiny").unwrap();
        // The largest kind: local weights of its own (streaming DiLoCo) travel too.
        let mut r = Replica::fresh(&cfg, 1, &Device::flex(), true);
        r.outer[0] += 1.0;
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
}
