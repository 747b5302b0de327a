//! One worker's replica in a multi-worker run: its local weights and inner AdamW state on the
//! device, and the shared outer weights and outer momentum as flat host buffers (what the
//! collectives and the DiLoCo step work on). A replica serialises to safetensors — flat F32
//! tensors `outer`, `velocity`, `exp_avg`, `exp_avg_sq` and the round in the metadata — which
//! is what a healthy peer sends a rejoining one.

use std::collections::HashMap;

use burn::tensor::{Device, Tensor, TensorData};
use holdfast_model::weights::{ParamSpec, param_specs};
use holdfast_model::{ModelConfig, Weights};
use safetensors::tensor::{Dtype, TensorView};

use crate::data::DataCursor;
use crate::optim::AdamW;
use crate::{TrainError, TrainState};

const FORMAT: &str = "holdfast-replica-1";

/// Concatenates tensors' values in their device layout.
pub fn flatten(tensors: &[Tensor<2>]) -> Vec<f32> {
    let mut out = Vec::new();
    for t in tensors {
        out.extend(
            t.clone()
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("f32 tensor"),
        );
    }
    out
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

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
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

    /// BLAKE3 of the synced state (outer weights and momentum): equal on every replica that
    /// is in sync, bit for bit.
    pub fn state_hash(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(&f32_bytes(&self.outer));
        h.update(&f32_bytes(&self.velocity));
        h.finalize().to_hex().to_string()
    }

    pub fn encode(&self) -> Vec<u8> {
        let tensors: Vec<(&str, Vec<f32>)> = vec![
            ("outer", self.outer.clone()),
            ("velocity", self.velocity.clone()),
            ("exp_avg", flatten(&self.opt.exp_avg)),
            ("exp_avg_sq", flatten(&self.opt.exp_avg_sq)),
        ];
        let bytes: Vec<(&str, Vec<u8>, usize)> = tensors
            .iter()
            .map(|(n, v)| (*n, f32_bytes(v), v.len()))
            .collect();
        let views: Vec<(String, TensorView)> = bytes
            .iter()
            .map(|(n, b, len)| {
                (
                    n.to_string(),
                    TensorView::new(Dtype::F32, vec![*len], b).expect("consistent view"),
                )
            })
            .collect();
        let meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("next_round".to_string(), self.next_round.to_string()),
            ("adam_t".to_string(), self.opt.t.to_string()),
        ]);
        safetensors::serialize(views, Some(meta)).expect("safetensors serialises")
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
            let v = bytes_f32(t.data());
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
        let exp_avg = unflatten(&get("exp_avg", false)?, &specs, device);
        let exp_avg_sq = unflatten(&get("exp_avg_sq", false)?, &specs, device);
        let weights = Weights {
            cfg: cfg.clone(),
            tensors: unflatten(&outer, &specs, device),
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

    /// The synced model as a single-worker training state (for checkpoints and evaluation):
    /// the outer weights, this replica's AdamW moments, `steps` optimizer steps taken and the
    /// data position `next_sample`.
    pub fn into_train_state(mut self, seed: u64, steps: u64, next_sample: u64) -> TrainState {
        self.reset_local_to_outer();
        TrainState {
            weights: self.weights,
            opt: self.opt,
            step: steps,
            cursor: DataCursor { next_sample },
            seed,
        }
    }
}
