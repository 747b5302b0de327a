//! What a command line sets on top of a config file, and the rules that come with it. Kept
//! here, not in the binary, so each rule is a tested function of (file, flags).

use std::path::{Path, PathBuf};

use crate::TrainError;
use crate::config::{RunConfig, SyncMode, Task};

/// Flag values; `None` leaves the config's value.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overrides {
    /// A text corpus (file or glob): the run trains on text.
    pub data: Option<String>,
    pub tokenizer: Option<PathBuf>,
    pub preset: Option<String>,
    pub model_config: Option<PathBuf>,
    /// Initial weights; a GGUF file also gives the shape and, beside it, the tokenizer.
    pub init: Option<PathBuf>,
    pub context: Option<usize>,
    pub steps: Option<u64>,
    pub batch_size: Option<usize>,
    pub grad_accum: Option<usize>,
    pub lr: Option<f64>,
    pub seed: Option<u64>,
    pub eval_every: Option<u64>,
    pub checkpoint_every: Option<u64>,
    pub sync: Option<SyncMode>,
    pub inner_steps: Option<u64>,
    pub precision: Option<crate::config::Precision>,
    pub fragments: Option<u64>,
    pub overlap_steps: Option<u64>,
    pub round_seconds: Option<f64>,
    pub round_tokens: Option<u64>,
    pub failure_timeout_ms: Option<u64>,
    pub no_guards: bool,
}

impl RunConfig {
    /// A new run's config: the file at `file` (or the defaults), then `o`.
    ///
    /// - `data` makes the task `text`, and with neither a file nor a preset the model the
    ///   byte-level `char-small`;
    /// - a GGUF `init` gives the model's shape (unless one is named) and the
    ///   `tokenizer.json` beside it (unless one is named).
    pub fn for_new_run(file: Option<&Path>, o: &Overrides) -> Result<RunConfig, TrainError> {
        let mut cfg = match file {
            Some(path) => RunConfig::from_toml_file(path)?,
            None => RunConfig::default(),
        };
        if let Some(data) = &o.data {
            cfg.data.task = Task::Text;
            cfg.data.path = Some(data.clone());
            if o.preset.is_none() && file.is_none() {
                cfg.model.preset = "char-small".into();
            }
        }
        if let Some(t) = &o.tokenizer {
            cfg.data.tokenizer = Some(t.clone());
        }
        if let Some(p) = &o.preset {
            cfg.model.preset = p.clone();
        }
        if let Some(p) = &o.model_config {
            cfg.model.config_json = Some(p.clone());
        }
        if o.context.is_some() {
            cfg.model.context = o.context;
        }
        if let Some(init) = o.init.as_ref().filter(|p| holdfast_model::is_gguf(p)) {
            cfg.model.config_json.get_or_insert_with(|| init.clone());
            let beside = init.with_file_name("tokenizer.json");
            if cfg.data.tokenizer.is_none() && beside.is_file() {
                cfg.data.tokenizer = Some(beside);
            }
        }
        cfg.apply_training_overrides(o);
        if o.inner_steps.is_some() && cfg.sync.on_demand() {
            return Err(TrainError::Config(
                "--inner-steps: rounds closed by time or tokens (sync.round_seconds, \
                 sync.round_tokens) have no fixed number of steps"
                    .into(),
            ));
        }
        Ok(cfg)
    }

    /// The overrides a resumed run also takes: how long and how it trains, not what.
    /// A learning rate below the config's floor lowers the floor with it.
    pub fn apply_training_overrides(&mut self, o: &Overrides) {
        let t = &mut self.train;
        set(&mut t.steps, o.steps);
        set(&mut t.batch_size, o.batch_size);
        set(&mut t.grad_accum, o.grad_accum);
        if let Some(v) = o.lr {
            t.lr = v;
            t.min_lr = t.min_lr.min(v.max(0.0));
        }
        set(&mut t.seed, o.seed);
        set(&mut t.eval_every, o.eval_every);
        set(&mut t.checkpoint_every, o.checkpoint_every);
        let s = &mut self.sync;
        set(&mut s.mode, o.sync);
        set(&mut s.inner_steps, o.inner_steps);
        set(&mut s.precision, o.precision);
        set(&mut s.fragments, o.fragments);
        set(&mut s.overlap_steps, o.overlap_steps);
        set(&mut s.round_seconds, o.round_seconds);
        set(&mut s.round_tokens, o.round_tokens);
        set(&mut s.failure_timeout_ms, o.failure_timeout_ms);
        if o.no_guards {
            self.guard.enabled = false;
        }
    }
}

fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *field = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_means_text_and_a_byte_level_model_unless_one_is_named() {
        let o = Overrides {
            data: Some("corpus/*.txt".into()),
            ..Default::default()
        };
        let cfg = RunConfig::for_new_run(None, &o).unwrap();
        assert_eq!(cfg.data.task, Task::Text);
        assert_eq!(cfg.data.path.as_deref(), Some("corpus/*.txt"));
        assert_eq!(cfg.model.preset, "char-small");

        let named = Overrides {
            preset: Some("small".into()),
            ..o.clone()
        };
        assert_eq!(
            RunConfig::for_new_run(None, &named).unwrap().model.preset,
            "small"
        );

        // A config file's own preset is kept.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("run.toml");
        std::fs::write(&file, "[model]\npreset = \"tiny\"\n").unwrap();
        let cfg = RunConfig::for_new_run(Some(&file), &o).unwrap();
        assert_eq!(
            (cfg.data.task, cfg.model.preset.as_str()),
            (Task::Text, "tiny")
        );
    }

    #[test]
    fn a_learning_rate_below_the_floor_lowers_the_floor() {
        let mut cfg = RunConfig::default();
        let floor = cfg.train.min_lr;
        cfg.apply_training_overrides(&Overrides {
            lr: Some(floor / 10.0),
            ..Default::default()
        });
        assert_eq!(
            (cfg.train.lr, cfg.train.min_lr),
            (floor / 10.0, floor / 10.0)
        );
        cfg.apply_training_overrides(&Overrides {
            lr: Some(1.0),
            ..Default::default()
        });
        assert_eq!(
            cfg.train.min_lr,
            floor / 10.0,
            "a higher lr leaves the floor"
        );
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn a_gguf_init_gives_the_shape_and_the_tokenizer_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("m.gguf");
        let o = Overrides {
            init: Some(gguf.clone()),
            ..Default::default()
        };
        let cfg = RunConfig::for_new_run(None, &o).unwrap();
        assert_eq!(cfg.model.config_json.as_deref(), Some(gguf.as_path()));
        assert_eq!(cfg.data.tokenizer, None, "no tokenizer.json beside it");

        std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
        let cfg = RunConfig::for_new_run(None, &o).unwrap();
        assert_eq!(cfg.data.tokenizer, Some(dir.path().join("tokenizer.json")));

        let named = Overrides {
            model_config: Some("config.json".into()),
            tokenizer: Some("tok.json".into()),
            ..o
        };
        let cfg = RunConfig::for_new_run(None, &named).unwrap();
        assert_eq!(cfg.model.config_json, Some(PathBuf::from("config.json")));
        assert_eq!(cfg.data.tokenizer, Some(PathBuf::from("tok.json")));
    }

    #[test]
    fn training_flags_override_and_the_rest_stay() {
        let o = Overrides {
            steps: Some(7),
            sync: Some(SyncMode::Ddp),
            inner_steps: Some(3),
            no_guards: true,
            ..Default::default()
        };
        let cfg = RunConfig::for_new_run(None, &o).unwrap();
        assert_eq!(
            (cfg.train.steps, cfg.sync.mode, cfg.sync.inner_steps),
            (7, SyncMode::Ddp, 3)
        );
        assert!(!cfg.guard.enabled);
        let untouched = RunConfig::default();
        assert_eq!(cfg.train.batch_size, untouched.train.batch_size);
        assert_eq!(
            "gossip".parse::<SyncMode>().unwrap_err().to_string(),
            "invalid config value: sync.mode = 'gossip': known modes: diloco, ddp"
        );
    }

    #[test]
    fn a_fixed_h_is_refused_for_rounds_closed_by_time() {
        let timed = Overrides {
            round_seconds: Some(2.0),
            ..Default::default()
        };
        let cfg = RunConfig::for_new_run(None, &timed).unwrap();
        assert_eq!(cfg.sync.round_seconds, 2.0);
        let both = Overrides {
            inner_steps: Some(20),
            ..timed
        };
        let e = RunConfig::for_new_run(None, &both).unwrap_err().to_string();
        assert!(
            e.contains("--inner-steps: rounds closed by time or tokens"),
            "{e}"
        );
    }
}
