//! Starting and resuming a run directory: the checks made before anything trains, so a bad
//! combination fails fast, with nothing written.

use std::path::{Path, PathBuf};

use burn::tensor::Device;

use crate::checkpoint::{self, Loaded};
use crate::overrides::Overrides;
use crate::run::{self, Prepared};
use crate::{RunConfig, TrainError, TrainState, atomic_write};

/// A new run: its directory (checked not to exist), effective config and data.
pub struct NewRun {
    pub run_dir: PathBuf,
    pub cfg: RunConfig,
    pub prepared: Prepared,
}

/// Plans a new run from a config file and flags. `run_dir` defaults to
/// `runs/TASK-PRESET-SECONDS`.
pub fn plan_new_run(
    file: Option<&Path>,
    o: &Overrides,
    run_dir: Option<PathBuf>,
) -> Result<NewRun, TrainError> {
    let cfg = RunConfig::for_new_run(file, o)?;
    let run_dir = run_dir.unwrap_or_else(|| default_run_dir(&cfg));
    // Checked before reading data or loading weights, so a clash fails fast.
    run::check_new_run_dir(&run_dir)?;
    let prepared = run::prepare_data(&cfg, &run::token_cache_dir(&run_dir), None)?;
    Ok(NewRun {
        run_dir,
        cfg,
        prepared,
    })
}

/// The first state of a planned single-worker run: `init`'s weights or the seeded ones. The
/// run directory is created only once they loaded, so a bad `init` leaves nothing behind.
pub fn start_new_run(
    new: &NewRun,
    init: Option<&Path>,
    device: &Device,
) -> Result<TrainState, TrainError> {
    let seed = new.cfg.train.seed;
    let state = match init {
        Some(path) => {
            let weights =
                holdfast_model::load_weights(&new.prepared.model, path, device).map_err(|e| {
                    TrainError::Config(format!("loading --init {}: {e}", path.display()))
                })?;
            TrainState::from_weights(weights, seed)
        }
        None => TrainState::new(&new.prepared.model, seed, device),
    };
    run::create_run_dir(&new.run_dir, &new.cfg)?;
    Ok(state)
}

/// Plans a new multi-worker run and creates its directory.
pub fn plan_new_cluster_run(
    file: Option<&Path>,
    o: &Overrides,
    run_dir: Option<PathBuf>,
) -> Result<NewRun, TrainError> {
    if o.init.is_some() {
        // Workers build their first state from the seed; initial weights would need shipping.
        return Err(TrainError::Config(
            "--init is not supported with workers yet".into(),
        ));
    }
    let new = plan_new_run(file, o, run_dir)?;
    run::create_run_dir(&new.run_dir, &new.cfg)?;
    Ok(new)
}

fn default_run_dir(cfg: &RunConfig) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    PathBuf::from("runs").join(format!("{}-{}-{secs}", cfg.data.task, cfg.model.preset))
}

/// A run directory ready to go on: its config (overrides applied and saved), data and newest
/// valid checkpoint (its `warnings` name damaged newer ones).
pub struct Resumed {
    pub cfg: RunConfig,
    pub prepared: Prepared,
    pub loaded: Loaded,
}

/// A run's config and newest valid checkpoint (its `warnings` name damaged newer ones), for
/// evaluating or serving it.
pub fn load_run(run_dir: &Path, device: &Device) -> Result<(RunConfig, Loaded), TrainError> {
    let cfg = run::read_run_config(run_dir)?;
    let loaded = checkpoint::load_latest(run_dir, device)?;
    Ok((cfg, loaded))
}

/// Which kind of run a checkpoint must come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunKind {
    SingleWorker,
    MultiWorker,
}

/// Loads `run_dir` for resuming, checking that its checkpoint fits the config the overrides
/// make and the kind of run asked for. The config is saved only once every check passed.
pub fn load_for_resume(
    run_dir: &Path,
    o: &Overrides,
    device: &Device,
    kind: RunKind,
) -> Result<Resumed, TrainError> {
    let mut cfg = run::read_run_config(run_dir)?;
    let stored = cfg.clone();
    cfg.apply_training_overrides(o);
    let prepared = run::prepare_data(
        &cfg,
        &run::token_cache_dir(run_dir),
        run::run_tokenizer(run_dir).as_deref(),
    )?;
    let loaded = checkpoint::load_latest(run_dir, device)?;
    let from = loaded.dir.display();
    if kind == RunKind::MultiWorker && loaded.manifest.cluster.is_none() {
        return Err(TrainError::Config(format!(
            "checkpoint {from} is from a single-worker run; resume it without --workers"
        )));
    }
    if loaded.manifest.model != prepared.model {
        return Err(TrainError::Config(format!(
            "checkpoint {from} was trained with a different model config than {} now implies",
            run_dir.join(run::CONFIG_FILE).display()
        )));
    }
    if cfg != stored {
        atomic_write(&run_dir.join(run::CONFIG_FILE), cfg.to_toml().as_bytes())?;
    }
    Ok(Resumed {
        cfg,
        prepared,
        loaded,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A finished 2-step single-worker run in a fresh directory.
    fn finished_run() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let o = Overrides {
            steps: Some(2),
            batch_size: Some(4),
            eval_every: Some(2),
            ..Default::default()
        };
        let run_dir = dir.path().join("run");
        let new = plan_new_run(None, &o, Some(run_dir.clone())).unwrap();
        run::create_run_dir(&new.run_dir, &new.cfg).unwrap();
        let mut state = TrainState::new(&new.prepared.model, new.cfg.train.seed, &Device::flex());
        let faults = Default::default();
        run::train(
            &run_dir,
            &new.cfg,
            &new.prepared.dataset,
            &mut state,
            &faults,
            &mut |_| {},
        )
        .unwrap();
        (dir, run_dir)
    }

    #[test]
    fn a_new_run_refuses_an_existing_directory_before_reading_data() {
        let dir = tempfile::tempdir().unwrap();
        let o = Overrides {
            data: Some(dir.path().join("missing.txt").display().to_string()),
            ..Default::default()
        };
        let err = plan_new_run(None, &o, Some(dir.path().to_path_buf()))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("already exists"), "{err}");
    }

    #[test]
    fn a_cluster_run_refuses_initial_weights_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let run_dir = dir.path().join("run");
        let o = Overrides {
            init: Some("m.safetensors".into()),
            ..Default::default()
        };
        let err = plan_new_cluster_run(None, &o, Some(run_dir.clone()))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--init"), "{err}");
        assert!(!run_dir.exists());
        let new = plan_new_cluster_run(None, &Overrides::default(), Some(run_dir.clone())).unwrap();
        assert!(run_dir.join(run::CONFIG_FILE).is_file() && new.cfg == RunConfig::default());
    }

    #[test]
    fn resume_checks_the_kind_of_run_and_saves_overrides_only_when_they_fit() {
        let (_dir, run_dir) = finished_run();
        let o = Overrides {
            steps: Some(4),
            ..Default::default()
        };
        let device = Device::flex();
        let err = load_for_resume(&run_dir, &o, &device, RunKind::MultiWorker)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("single-worker run"), "{err}");
        assert_eq!(
            run::read_run_config(&run_dir).unwrap().train.steps,
            2,
            "not saved"
        );

        let r = load_for_resume(&run_dir, &o, &device, RunKind::SingleWorker).unwrap();
        assert_eq!((r.cfg.train.steps, r.loaded.state.step), (4, 2));
        assert_eq!(
            run::read_run_config(&run_dir).unwrap().train.steps,
            4,
            "saved"
        );
    }
}
