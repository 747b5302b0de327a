//! Run configuration: one TOML document (every field optional, defaults below) that CLI flags
//! override. The effective config is saved in the run directory and is what `--resume` reads.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use holdfast_model::ModelConfig;

use crate::TrainError;
use crate::data::AdditionTask;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    pub model: ModelSection,
    pub data: DataSection,
    pub train: TrainSection,
    pub sync: SyncSection,
    pub guard: crate::guard::GuardSection,
}

/// How the replicas of a multi-worker run stay in sync.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// H local AdamW steps, then an outer Nesterov step on the averaged pseudo-gradient.
    #[default]
    Diloco,
    /// Gradients averaged every step.
    Ddp,
}

impl std::str::FromStr for SyncMode {
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Self, TrainError> {
        match s {
            "diloco" => Ok(SyncMode::Diloco),
            "ddp" => Ok(SyncMode::Ddp),
            other => Err(TrainError::Config(format!(
                "invalid config value: sync.mode = '{other}': known modes: diloco, ddp"
            ))),
        }
    }
}

impl std::fmt::Display for SyncMode {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            SyncMode::Diloco => "diloco",
            SyncMode::Ddp => "ddp",
        })
    }
}

/// How DiLoCo's pseudo-gradients travel (the cluster's `quant::Precision`, named here so that
/// a build without the cluster still reads every config).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Int8,
    Int4,
    E2m1,
}

impl std::str::FromStr for Precision {
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Self, TrainError> {
        match s {
            "f32" => Ok(Precision::F32),
            "int8" => Ok(Precision::Int8),
            "int4" => Ok(Precision::Int4),
            "e2m1" => Ok(Precision::E2m1),
            other => Err(TrainError::Config(format!(
                "invalid config value: sync.precision = '{other}': known are f32, int8, int4, e2m1"
            ))),
        }
    }
}

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

/// What a run trains on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Generated n-digit addition, built in.
    #[default]
    Addition,
    /// UTF-8 text read from `data.path`.
    Text,
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Task::Addition => "addition",
            Task::Text => "text",
        })
    }
}

/// How replicas of a multi-worker run stay in sync (ignored by a single-worker run).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncSection {
    pub mode: SyncMode,
    /// H: inner steps per outer round (DiLoCo only).
    pub inner_steps: u64,
    pub outer_lr: f64,
    /// Nesterov momentum of the outer step. 0 by default: at steady state the outer step is
    /// `outer_lr / (1 - momentum)` times the replicas' mean progress, and at the paper's 0.9
    /// (a gain of 7) runs of the default task diverged at its learning transition (README,
    /// "Choosing the outer optimizer").
    pub outer_momentum: f64,
    /// A worker silent this long is out of the quorum; collectives give up on a peer after it.
    pub failure_timeout_ms: u64,
    /// How DiLoCo's pseudo-gradients travel: `f32` on a ring, or quantized (`int8`, `int4`,
    /// `e2m1`) on a mesh, with error feedback (each worker adds what quantization dropped to
    /// its next contribution).
    pub precision: Precision,
    /// Streaming DiLoCo's P: the parameters split into this many fragments, strided by layer;
    /// one fragment syncs per round, so each syncs every `inner_steps` steps and a round is
    /// `inner_steps / fragments` steps. 1 syncs the whole model every round.
    pub fragments: u64,
    /// τ: a round's pseudo-gradient is taken this many inner steps before the round ends, and
    /// its all-reduce runs while those steps train.
    pub overlap_steps: u64,
    /// α: after a round, the synced fragment's local weights become α·local + (1−α)·outer.
    pub mixing: f64,
    /// Rounds closed by time rather than by `inner_steps` each: every worker trains until the
    /// round is this many seconds old, asking the coordinator for a step's batches at a time,
    /// so a faster worker trains more; the pseudo-gradients are averaged weighted by the
    /// batches (so tokens) each trained. 0: off.
    pub round_seconds: f64,
    /// With `round_seconds`: a worker not ready this long after the round's deadline is put
    /// out of the round (its batches go back to the pool; it rejoins by live recovery).
    /// Absent: one `round_seconds`.
    pub round_grace_seconds: Option<f64>,
    /// Rounds closed by tokens: batches are handed out as workers ask until the round has
    /// this many tokens (whole steps of `batch_size` rows × the sequence length, rounded
    /// down); faster workers train more of them, and the average is weighted as with
    /// `round_seconds`. 0: off.
    pub round_tokens: u64,
    /// When every worker holding the state is lost at once, `train --workers` restarts the
    /// run from its newest checkpoint by itself this many times at most.
    pub max_cold_restarts: u32,
    /// The etcd endpoints (`host:port`) that `holdfast coordinator` campaigns in, as its
    /// `--etcd` flag (which wins) gives them. Empty: no etcd. `train` refuses it: the
    /// coordinator it starts is its run's only one.
    pub etcd: Vec<String>,
}

impl Default for SyncSection {
    fn default() -> Self {
        SyncSection {
            mode: SyncMode::Diloco,
            inner_steps: 50,
            outer_lr: 0.7,
            outer_momentum: 0.0,
            failure_timeout_ms: 2000,
            precision: Precision::F32,
            fragments: 1,
            overlap_steps: 0,
            mixing: 0.0,
            round_seconds: 0.0,
            round_grace_seconds: None,
            round_tokens: 0,
            max_cold_restarts: 3,
            etcd: Vec::new(),
        }
    }
}

/// The error for config `field` holding `value`, which is wrong for reason `why`.
fn invalid(field: &str, value: String, why: &str) -> Result<(), TrainError> {
    Err(TrainError::Config(format!(
        "invalid config value: {field} = {value}: {why}"
    )))
}

impl SyncSection {
    /// Streaming DiLoCo's settings for a model of `layers` layers: fragments that divide H and
    /// hold a layer each at least, an overlap shorter than a round, a mixing factor in [0, 1);
    /// none of them in DDP, whose every step syncs every value.
    /// Each endpoint is a `host:port` (an `http://` in front is allowed, as etcd's own tools do).
    fn validate_etcd(&self) -> Result<(), TrainError> {
        for e in &self.etcd {
            let addr = e.strip_prefix("http://").unwrap_or(e);
            let port = addr.rsplit_once(':').map(|(_, port)| port.parse::<u16>());
            if !matches!(port, Some(Ok(_))) || addr.contains(char::is_whitespace) {
                return invalid("sync.etcd", format!("'{e}'"), "each endpoint is host:port");
            }
        }
        Ok(())
    }

    fn validate_streaming(&self, layers: usize) -> Result<(), TrainError> {
        let bad = |field: &str, value: String, why: String| {
            invalid(&format!("sync.{field}"), value, &why)
        };
        let streaming = self.fragments != 1 || self.overlap_steps != 0 || self.mixing != 0.0;
        if self.mode == SyncMode::Ddp && streaming {
            let why =
                "fragments, overlap and mixing are DiLoCo's; DDP syncs every value every step";
            return bad("mode", "'ddp'".into(), why.into());
        }
        if self.fragments == 0 || !self.inner_steps.is_multiple_of(self.fragments) {
            let why = format!(
                "must be at least 1 and divide sync.inner_steps ({})",
                self.inner_steps
            );
            return bad("fragments", self.fragments.to_string(), why);
        }
        if self.fragments as usize > layers {
            let why = format!("a fragment is one or more of the model's {layers} layers");
            return bad("fragments", self.fragments.to_string(), why);
        }
        let round = self.inner_steps / self.fragments;
        if self.overlap_steps >= round {
            let why = format!(
                "must be below the steps of a round (inner_steps / fragments = {round}): the \
                 pseudo-gradient is taken after at least one of them"
            );
            return bad("overlap_steps", self.overlap_steps.to_string(), why);
        }
        if !(0.0..1.0).contains(&self.mixing) {
            return bad(
                "mixing",
                self.mixing.to_string(),
                "must be in [0, 1)".into(),
            );
        }
        Ok(())
    }

    /// Whether rounds close by time or tokens, their batches handed out as workers ask.
    pub fn on_demand(&self) -> bool {
        self.round_seconds > 0.0 || self.round_tokens > 0
    }

    /// A round closed by time or tokens: DiLoCo's, without τ (which splits a fixed number of
    /// steps), one bound at a time, and a grace only with a deadline.
    fn validate_round_bound(&self, step_tokens: u64) -> Result<(), TrainError> {
        let bad =
            |field: &str, value: String, why: &str| invalid(&format!("sync.{field}"), value, why);
        let seconds = self.round_seconds;
        if !seconds.is_finite() || seconds < 0.0 {
            return bad(
                "round_seconds",
                seconds.to_string(),
                "must be 0 (off) or more",
            );
        }
        if let Some(g) = self.round_grace_seconds {
            if !g.is_finite() || g < 0.0 {
                return bad("round_grace_seconds", g.to_string(), "must be 0 or more");
            }
            if seconds == 0.0 {
                let why = "a grace follows a round's deadline: set sync.round_seconds";
                return bad("round_grace_seconds", g.to_string(), why);
            }
        }
        if !self.on_demand() {
            return Ok(());
        }
        if seconds > 0.0 && self.round_tokens > 0 {
            let why = "a round closes by time or by tokens, not both";
            return bad("round_tokens", self.round_tokens.to_string(), why);
        }
        if self.mode == SyncMode::Ddp {
            let why = "rounds closed by time or tokens are DiLoCo's; DDP syncs every step";
            return bad("mode", "'ddp'".into(), why);
        }
        if self.overlap_steps != 0 {
            let why = "τ is taken from a fixed number of steps; a round closed by time or tokens has none";
            return bad("overlap_steps", self.overlap_steps.to_string(), why);
        }
        if self.round_tokens > 0 && self.round_tokens < step_tokens {
            let why = format!("must be at least one step's tokens ({step_tokens})");
            return bad("round_tokens", self.round_tokens.to_string(), &why);
        }
        Ok(())
    }

    /// Optimizer steps each worker takes per sync round.
    pub fn steps_per_round(&self) -> u64 {
        match self.mode {
            SyncMode::Ddp => 1,
            SyncMode::Diloco => self.inner_steps / self.fragments.max(1),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// A built-in shape (`tiny`, `char-small`, `small`), unless `config_json` is set.
    pub preset: String,
    /// A Hugging Face `config.json`, or a GGUF file, to take the shape from instead of a preset.
    pub config_json: Option<PathBuf>,
    /// Overrides the preset's context length.
    pub context: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    pub task: Task,
    /// A UTF-8 text file, or a glob of them, for the `text` task.
    pub path: Option<String>,
    /// A Hugging Face `tokenizer.json`; byte-level when absent.
    pub tokenizer: Option<PathBuf>,
    /// Fraction of the text kept for validation (taken from its end, as nanoGPT does).
    pub val_fraction: f64,
    /// Digits per operand of the addition task.
    pub addition_digits: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub seed: u64,
    pub steps: u64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches accumulated into one optimizer step.
    pub grad_accum: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip; 0 disables clipping.
    pub grad_clip: f64,
    pub eval_every: u64,
    pub eval_batches: usize,
    pub checkpoint_every: u64,
    pub keep_checkpoints: usize,
    /// Treat denormal floats as zero (much faster on CPUs once training has converged).
    pub flush_denormals: bool,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            preset: "tiny".into(),
            config_json: None,
            context: None,
        }
    }
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            task: Task::Addition,
            path: None,
            tokenizer: None,
            val_fraction: 0.1,
            addition_digits: 3,
        }
    }
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            seed: 1337,
            steps: 1500,
            batch_size: 64,
            grad_accum: 1,
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 100,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            grad_clip: 1.0,
            eval_every: 250,
            eval_batches: 8,
            checkpoint_every: 500,
            keep_checkpoints: 3,
            flush_denormals: true,
        }
    }
}

impl RunConfig {
    /// Reads a TOML config; unknown keys are errors so that a typo is not silently ignored.
    pub fn from_toml_file(path: &Path) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        toml::from_str(&text).map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))
    }

    /// Steps per worker in the budget of a multi-worker run: `steps`, rounded up to whole
    /// rounds of H steps (rounds closed by time or tokens have no fixed length).
    pub fn cluster_steps(&self) -> u64 {
        if self.sync.on_demand() {
            return self.train.steps;
        }
        let per_round = self.sync.steps_per_round();
        self.train.steps.div_ceil(per_round) * per_round
    }

    /// Batch ids in the budget of a run of `workers` workers: each trains
    /// [`Self::cluster_steps`] steps of `grad_accum` micro-batches.
    pub fn budget_batches(&self, workers: usize) -> u64 {
        self.cluster_steps() * self.train.grad_accum as u64 * workers as u64
    }

    /// Parses a TOML config received as text (a worker's job from its coordinator).
    pub fn from_toml_str(text: &str, source: &str) -> Result<Self, TrainError> {
        toml::from_str(text).map_err(|e| TrainError::Config(format!("{source}: {e}")))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }

    /// The model shape this run trains, before the tokenizer sets the vocabulary.
    pub fn base_model_config(&self) -> Result<ModelConfig, TrainError> {
        let mut cfg = match &self.model.config_json {
            Some(path) if holdfast_model::is_gguf(path) => holdfast_model::gguf_config(path)?,
            Some(path) => ModelConfig::from_hf_config_json(path)?,
            None => ModelConfig::preset(&self.model.preset)?,
        };
        if let Some(ctx) = self.model.context {
            cfg.max_position_embeddings = ctx;
        }
        Ok(cfg)
    }

    /// Rejects values that would fail later or train nonsense, naming the field.
    pub fn validate(&self) -> Result<(), TrainError> {
        self.validate_train()?;
        if let Some(0) = self.model.context {
            return invalid("model.context", "0".into(), "must be at least 1");
        }
        self.validate_data()?;
        self.validate_guard()?;
        self.validate_sync()?;
        let (s, t) = (&self.sync, &self.train);
        let model = self.base_model_config()?;
        model.validate()?;
        s.validate_round_bound(self.batch_tokens(&model) * t.grad_accum as u64)?;
        s.validate_streaming(model.num_hidden_layers)
    }

    fn validate_train(&self) -> Result<(), TrainError> {
        let t = &self.train;
        let bad = invalid;
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return bad("train.lr", t.lr.to_string(), "must be a positive number");
        }
        if !(t.min_lr.is_finite() && t.min_lr >= 0.0 && t.min_lr <= t.lr) {
            return bad("train.min_lr", t.min_lr.to_string(), "must be in [0, lr]");
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return bad(
                "train.weight_decay",
                t.weight_decay.to_string(),
                "must be ≥ 0",
            );
        }
        for (field, v) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(field, v.to_string(), "must be in [0, 1)");
            }
        }
        if !(t.eps.is_finite() && t.eps > 0.0) {
            return bad("train.eps", t.eps.to_string(), "must be > 0");
        }
        if !(t.grad_clip.is_finite() && t.grad_clip >= 0.0) {
            return bad("train.grad_clip", t.grad_clip.to_string(), "must be ≥ 0");
        }
        for (field, v) in [
            ("train.steps", t.steps as usize),
            ("train.batch_size", t.batch_size),
            ("train.grad_accum", t.grad_accum),
            ("train.eval_every", t.eval_every as usize),
            ("train.eval_batches", t.eval_batches),
            ("train.checkpoint_every", t.checkpoint_every as usize),
            ("train.keep_checkpoints", t.keep_checkpoints),
        ] {
            if v == 0 {
                return bad(field, "0".into(), "must be at least 1");
            }
        }
        Ok(())
    }

    fn validate_data(&self) -> Result<(), TrainError> {
        let bad = invalid;
        let d = &self.data;
        match d.task {
            Task::Addition => {
                if !(1..=9).contains(&d.addition_digits) {
                    return bad(
                        "data.addition_digits",
                        d.addition_digits.to_string(),
                        "must be in 1..=9",
                    );
                }
            }
            Task::Text => {
                if d.path.is_none() {
                    return bad("data.path", "(none)".into(), "the text task needs --data");
                }
                if !(d.val_fraction > 0.0 && d.val_fraction < 0.5) {
                    return bad(
                        "data.val_fraction",
                        d.val_fraction.to_string(),
                        "must be in (0, 0.5)",
                    );
                }
            }
        }
        Ok(())
    }

    fn validate_guard(&self) -> Result<(), TrainError> {
        let bad = invalid;
        let g = &self.guard;
        if !(0.0..=1.0).contains(&g.audit_probability) {
            return bad(
                "guard.audit_probability",
                g.audit_probability.to_string(),
                "must be in [0, 1]",
            );
        }
        if !(g.spike_threshold.is_finite() && g.spike_threshold > 0.0) {
            return bad(
                "guard.spike_threshold",
                g.spike_threshold.to_string(),
                "must be > 0",
            );
        }
        if !(g.ema_alpha > 0.0 && g.ema_alpha <= 1.0) {
            return bad(
                "guard.ema_alpha",
                g.ema_alpha.to_string(),
                "must be in (0, 1]",
            );
        }
        for (field, v) in [
            (
                "guard.max_nonfinite_in_a_row",
                g.max_nonfinite_in_a_row as u64,
            ),
            ("guard.spike_steps", g.spike_steps as u64),
            ("guard.snapshot_every", g.snapshot_every),
            ("guard.rollback_window", g.rollback_window),
        ] {
            if v == 0 {
                return bad(field, "0".into(), "must be at least 1");
            }
        }
        Ok(())
    }

    /// The sync section's own values; what depends on the model is checked by `validate`.
    fn validate_sync(&self) -> Result<(), TrainError> {
        let bad = invalid;
        let s = &self.sync;
        if s.inner_steps == 0 {
            return bad("sync.inner_steps", "0".into(), "must be at least 1");
        }
        if !(s.outer_lr.is_finite() && s.outer_lr > 0.0) {
            return bad(
                "sync.outer_lr",
                s.outer_lr.to_string(),
                "must be a positive number",
            );
        }
        if !(0.0..1.0).contains(&s.outer_momentum) {
            return bad(
                "sync.outer_momentum",
                s.outer_momentum.to_string(),
                "must be in [0, 1)",
            );
        }
        if s.mode == SyncMode::Ddp && s.precision != Precision::F32 {
            return bad(
                "sync.precision",
                format!("'{}'", s.precision),
                "quantized sync carries DiLoCo's pseudo-gradients; DDP's gradients travel as f32",
            );
        }
        if s.failure_timeout_ms < 100 {
            return bad(
                "sync.failure_timeout_ms",
                s.failure_timeout_ms.to_string(),
                "must be at least 100",
            );
        }
        self.sync.validate_etcd()
    }

    /// The sequence length of a row: the addition task's own, or the model's context.
    pub fn seq_len(&self, model: &ModelConfig) -> usize {
        match self.data.task {
            Task::Addition => AdditionTask::new(self.data.addition_digits).row_len() - 1,
            Task::Text => model.max_position_embeddings,
        }
    }

    /// Tokens in one batch id: `batch_size` rows.
    pub fn batch_tokens(&self, model: &ModelConfig) -> u64 {
        (self.train.batch_size * self.seq_len(model)) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error `cfg`'s sync section gets, if any.
    fn refusal(sync: SyncSection) -> Option<String> {
        let cfg = RunConfig {
            sync,
            ..Default::default()
        };
        cfg.validate().err().map(|e| e.to_string())
    }

    #[test]
    fn rounds_closed_by_time_or_tokens_are_refused_where_they_would_not_act() {
        let timed = SyncSection {
            round_seconds: 5.0,
            ..Default::default()
        };
        assert_eq!(refusal(timed.clone()), None);
        let with_grace = SyncSection {
            round_grace_seconds: Some(1.0),
            ..timed.clone()
        };
        assert_eq!(refusal(with_grace), None);
        let cases = [
            (
                SyncSection {
                    round_tokens: 4096,
                    ..timed.clone()
                },
                "sync.round_tokens = 4096: a round closes by time or by tokens, not both",
            ),
            (
                SyncSection {
                    mode: SyncMode::Ddp,
                    ..timed.clone()
                },
                "DDP syncs every step",
            ),
            (
                SyncSection {
                    overlap_steps: 2,
                    fragments: 2,
                    ..timed.clone()
                },
                "sync.overlap_steps = 2: τ is taken from a fixed number of steps",
            ),
            (
                SyncSection {
                    round_seconds: -1.0,
                    ..Default::default()
                },
                "sync.round_seconds = -1",
            ),
            (
                SyncSection {
                    round_grace_seconds: Some(2.0),
                    ..Default::default()
                },
                "sync.round_grace_seconds = 2: a grace follows a round's deadline",
            ),
            (
                SyncSection {
                    round_tokens: 3,
                    ..Default::default()
                },
                "sync.round_tokens = 3: must be at least one step's tokens",
            ),
        ];
        for (sync, expected) in cases {
            let got = refusal(sync).unwrap_or_default();
            assert!(got.contains(expected), "{got:?} lacks {expected:?}");
        }
    }

    #[test]
    fn a_batch_holds_batch_size_rows_of_the_tasks_sequence_length() {
        let mut cfg = RunConfig::default();
        let model = cfg.base_model_config().unwrap();
        let row = AdditionTask::new(cfg.data.addition_digits).row_len() - 1;
        assert_eq!(
            cfg.batch_tokens(&model),
            (cfg.train.batch_size * row) as u64
        );
        cfg.data.task = Task::Text;
        let expected = cfg.train.batch_size * model.max_position_embeddings;
        assert_eq!(cfg.batch_tokens(&model), expected as u64);
    }
}
