//! Parameters of the decoder: their Hugging Face names, shapes and initialisation, and the
//! conversion between device tensors and host buffers in Hugging Face layout.
//!
//! Parameters are a plain ordered list of tensors, not a module tree: training state, checkpoints
//! and (later) the cluster's flat buffers all walk the same list in the same order.

use burn::tensor::{Device, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::{ModelConfig, ModelError};

/// How a parameter is stored on the device relative to its Hugging Face layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// HF `[out, in]` linear weight, stored `[in, out]` so the forward is `x · W`.
    Transposed,
    /// Same layout as HF (the embedding table).
    Same,
    /// HF `[n]` vector (norm gain), stored as `[1, n]`.
    Row,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Normal(f32),
    Ones,
}

/// One parameter: its Hugging Face name and shape and how it lives on the device.
#[derive(Clone, Debug)]
pub struct ParamSpec {
    pub name: String,
    pub hf_shape: Vec<usize>,
    pub layout: Layout,
    pub init: Init,
    /// Weight decay applies to matrices, not to norm gains (the usual LLM recipe).
    pub decay: bool,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.hf_shape.iter().product()
    }

    /// Shape of the tensor kept on the device.
    pub fn stored_shape(&self) -> [usize; 2] {
        match self.layout {
            Layout::Transposed => [self.hf_shape[1], self.hf_shape[0]],
            Layout::Same => [self.hf_shape[0], self.hf_shape[1]],
            Layout::Row => [1, self.hf_shape[0]],
        }
    }
}

/// Index of each parameter of a layer within the flat list, relative to the layer's first one.
pub mod slot {
    pub const INPUT_NORM: usize = 0;
    pub const Q: usize = 1;
    pub const K: usize = 2;
    pub const V: usize = 3;
    pub const O: usize = 4;
    pub const POST_NORM: usize = 5;
    pub const GATE: usize = 6;
    pub const UP: usize = 7;
    pub const DOWN: usize = 8;
    pub const PER_LAYER: usize = 9;
}

/// The canonical ordered parameter list: embedding, then each layer, then the final norm and
/// (when untied) the output head.
pub fn param_specs(cfg: &ModelConfig) -> Vec<ParamSpec> {
    let h = cfg.hidden_size;
    let kv = cfg.kv_width();
    let ffn = cfg.intermediate_size;
    // Linear layers start at 1/sqrt(fan_in) (PyTorch's scale) rather than GPT's fixed 0.02: in
    // a narrow model 0.02 leaves q·k near zero, a saddle from which a rotary-position model
    // takes thousands of steps to learn any positional attention.
    let std = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
    // GPT-2's scaling of residual output projections keeps the residual stream's variance flat
    // with depth.
    let resid = 1.0 / (2.0 * cfg.num_hidden_layers as f32).sqrt();
    let linear = |name: String, out: usize, inp: usize, std: f32| ParamSpec {
        name,
        hf_shape: vec![out, inp],
        layout: Layout::Transposed,
        init: Init::Normal(std),
        decay: true,
    };
    let norm = |name: String| ParamSpec {
        name,
        hf_shape: vec![h],
        layout: Layout::Row,
        init: Init::Ones,
        decay: false,
    };
    let mut specs = vec![ParamSpec {
        name: "model.embed_tokens.weight".into(),
        hf_shape: vec![cfg.vocab_size, h],
        layout: Layout::Same,
        init: Init::Normal(0.02),
        decay: true,
    }];
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        specs.push(norm(format!("{p}.input_layernorm.weight")));
        specs.push(linear(format!("{p}.self_attn.q_proj.weight"), h, h, std(h)));
        specs.push(linear(
            format!("{p}.self_attn.k_proj.weight"),
            kv,
            h,
            std(h),
        ));
        specs.push(linear(
            format!("{p}.self_attn.v_proj.weight"),
            kv,
            h,
            std(h),
        ));
        specs.push(linear(
            format!("{p}.self_attn.o_proj.weight"),
            h,
            h,
            std(h) * resid,
        ));
        specs.push(norm(format!("{p}.post_attention_layernorm.weight")));
        specs.push(linear(format!("{p}.mlp.gate_proj.weight"), ffn, h, std(h)));
        specs.push(linear(format!("{p}.mlp.up_proj.weight"), ffn, h, std(h)));
        specs.push(linear(
            format!("{p}.mlp.down_proj.weight"),
            h,
            ffn,
            std(ffn) * resid,
        ));
    }
    specs.push(norm("model.norm.weight".into()));
    if !cfg.tie_word_embeddings {
        specs.push(linear("lm_head.weight".into(), cfg.vocab_size, h, 0.02));
    }
    specs
}

/// A parameter copied to host memory, in Hugging Face layout.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// `[rows, cols]` row-major to `[cols, rows]` row-major.
fn transpose_host(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

/// Converts a stored device tensor to host memory in HF layout.
pub fn to_host(spec: &ParamSpec, tensor: &Tensor<2>) -> HostTensor {
    let stored = tensor
        .to_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 tensor data");
    let data = match spec.layout {
        Layout::Transposed => transpose_host(&stored, spec.hf_shape[1], spec.hf_shape[0]),
        Layout::Same | Layout::Row => stored,
    };
    HostTensor {
        name: spec.name.clone(),
        shape: spec.hf_shape.clone(),
        data,
    }
}

/// Converts HF-layout host data to the stored device tensor.
pub fn from_host(spec: &ParamSpec, data: Vec<f32>, device: &Device) -> Tensor<2> {
    let stored = match spec.layout {
        // Transposed on the host so the device tensor is contiguous, not a strided view.
        Layout::Transposed => transpose_host(&data, spec.hf_shape[0], spec.hf_shape[1]),
        Layout::Same | Layout::Row => data,
    };
    Tensor::<2>::from_data(TensorData::new(stored, spec.stored_shape()), device)
}

/// The decoder's parameters: `tensors[i]` is `specs[i]` in stored layout.
#[derive(Clone, Debug)]
pub struct Weights {
    pub cfg: ModelConfig,
    pub specs: Vec<ParamSpec>,
    pub tensors: Vec<Tensor<2>>,
}

impl Weights {
    /// Seeded initialisation, identical for a given `(cfg, seed)` on every machine.
    pub fn init(cfg: &ModelConfig, seed: u64, device: &Device) -> Self {
        let specs = param_specs(cfg);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let tensors = specs
            .iter()
            .map(|spec| {
                let data = match spec.init {
                    Init::Ones => vec![1.0; spec.numel()],
                    Init::Normal(std) => {
                        let normal = Normal::new(0.0f32, std).expect("positive std");
                        (0..spec.numel()).map(|_| normal.sample(&mut rng)).collect()
                    }
                };
                from_host(spec, data, device)
            })
            .collect();
        Weights {
            cfg: cfg.clone(),
            specs,
            tensors,
        }
    }

    /// Builds weights from named host tensors (HF names and layout); every parameter must be
    /// present with its exact shape.
    pub fn from_named(
        cfg: &ModelConfig,
        mut named: std::collections::HashMap<String, HostTensor>,
        source: &str,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let specs = param_specs(cfg);
        let mut tensors = Vec::with_capacity(specs.len());
        for spec in &specs {
            let t = named.remove(&spec.name).ok_or_else(|| ModelError::Format {
                path: source.to_string(),
                reason: format!("missing tensor '{}'", spec.name),
            })?;
            if t.shape != spec.hf_shape {
                return Err(ModelError::Format {
                    path: source.to_string(),
                    reason: format!(
                        "tensor '{}' has shape {:?}, the config needs {:?}",
                        spec.name, t.shape, spec.hf_shape
                    ),
                });
            }
            tensors.push(from_host(spec, t.data, device));
        }
        // A tied checkpoint exported by transformers may still carry lm_head; it equals the
        // embedding then, so it is safe to drop. Anything else left over is a mismatch.
        if cfg.tie_word_embeddings {
            named.remove("lm_head.weight");
        }
        if let Some(extra) = named.keys().find(|k| !k.ends_with("rotary_emb.inv_freq")) {
            return Err(ModelError::Format {
                path: source.to_string(),
                reason: format!("unexpected tensor '{extra}' for this config"),
            });
        }
        Ok(Weights {
            cfg: cfg.clone(),
            specs,
            tensors,
        })
    }

    /// All parameters on the host in HF layout, in canonical order.
    pub fn to_host(&self) -> Vec<HostTensor> {
        self.specs
            .iter()
            .zip(&self.tensors)
            .map(|(s, t)| to_host(s, t))
            .collect()
    }

    /// Logits for token ids `[batch, seq]`.
    pub fn forward(&self, tokens: burn::tensor::Tensor<2, burn::tensor::Int>) -> Tensor<3> {
        crate::forward(&self.cfg, &self.tensors, tokens)
    }
}
