//! A training run on disk: `RUN/config.toml` (effective config), `RUN/metrics.jsonl`,
//! `RUN/checkpoints/`, `RUN/tokenizer.json` when the run uses one, and
//! `RUN/tokenizer_config.json` when its source model has a chat template or special tokens.
//! The loop here is the whole single-worker training: step, log, evaluate, checkpoint.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::Device;
use holdfast_model::{ModelConfig, Weights};
use serde::Serialize;

use crate::chaos::NumberFaults;
use crate::config::Task;
use crate::data::{
    AdditionTask, Dataset, TextData, Tokenizer, read_text, resolve_data_files, tokenize_cached,
};
use crate::eval::{addition_accuracy, val_loss};
use crate::guarded::{GuardedStep, Outcome, single_worker_step};
use crate::source::{TOKENIZER_CONFIG_FILE, source_tokenizer_config};
use crate::{
    RunConfig, TrainError, TrainState, append_jsonl, atomic_write, checkpoint, train_step,
};

pub const CONFIG_FILE: &str = "config.toml";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// A multi-worker run's files (see `coordinate`), named here for what reads them without it.
pub const LEDGER_FILE: &str = "ledger.jsonl";
pub const EVENTS_FILE: &str = "events.jsonl";
pub const SUMMARY_FILE: &str = "summary.json";

/// Held-out problems scored at the end of an addition run (fewer at periodic evaluations).
pub const FINAL_EXACT_MATCH_PROBLEMS: usize = 1000;
const PERIODIC_EXACT_MATCH_PROBLEMS: usize = 200;

/// What a run trains on, ready to sample, with the model shape it implies.
pub struct Prepared {
    pub tokenizer: Tokenizer,
    pub dataset: Dataset,
    pub model: ModelConfig,
}

/// Reads/generates the data named by `cfg` and fixes the model's vocabulary and context.
/// `tokenizer_override` is the run directory's copy of the tokenizer, when resuming.
pub fn prepare_data(
    cfg: &RunConfig,
    cache_dir: &Path,
    tokenizer_override: Option<&Path>,
) -> Result<Prepared, TrainError> {
    cfg.validate()?;
    let mut model = cfg.base_model_config()?;
    let tokenizer = match tokenizer_override.or(cfg.data.tokenizer.as_deref()) {
        Some(path) => Tokenizer::from_file(path)?,
        None => Tokenizer::Bytes,
    };
    let dataset = match cfg.data.task {
        Task::Addition => {
            if cfg.data.tokenizer.is_some() {
                return Err(TrainError::Config(
                    "invalid config value: data.tokenizer: the addition task is byte-level".into(),
                ));
            }
            let task = AdditionTask::new(cfg.data.addition_digits);
            if model.max_position_embeddings < task.row_len() - 1 {
                return Err(TrainError::Config(format!(
                    "invalid config value: model.context = {}: the {}-digit addition task needs at least {}",
                    model.max_position_embeddings,
                    task.digits,
                    task.row_len() - 1
                )));
            }
            Dataset::Addition(task)
        }
        Task::Text => {
            let spec = cfg
                .data
                .path
                .as_deref()
                .expect("validated: text has a path");
            let files = resolve_data_files(spec)?;
            let text = read_text(&files)?;
            let tokens = tokenize_cached(&text, &tokenizer, cache_dir)?;
            Dataset::Text(TextData::new(
                tokens,
                cfg.data.val_fraction,
                cfg.seq_len(&model),
            )?)
        }
    };
    if cfg.model.config_json.is_none() {
        model.vocab_size = tokenizer.vocab_size();
    } else if tokenizer.vocab_size() > model.vocab_size {
        // A published shape keeps its (often padded) vocabulary; the tokenizer must fit in it.
        return Err(TrainError::Config(format!(
            "the tokenizer has {} tokens but the model's vocabulary ({}) has {}",
            tokenizer.vocab_size(),
            cfg.model
                .config_json
                .as_deref()
                .unwrap_or(Path::new(""))
                .display(),
            model.vocab_size
        )));
    }
    model.validate()?;
    Ok(Prepared {
        tokenizer,
        dataset,
        model,
    })
}

/// Where tokenized corpora are cached: beside the run directories, shared by runs.
pub fn token_cache_dir(run_dir: &Path) -> PathBuf {
    run_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join(".holdfast-token-cache")
}

/// Refuses a run directory that already exists: a new run never overwrites an old one.
pub fn check_new_run_dir(run_dir: &Path) -> Result<(), TrainError> {
    if run_dir.exists() {
        return Err(TrainError::Config(format!(
            "run directory {} already exists; pass --resume {} to continue it, or choose another --run-dir",
            run_dir.display(),
            run_dir.display()
        )));
    }
    Ok(())
}

/// Creates a new run directory. Fails without touching anything if it already exists, or if
/// what it would copy in cannot be read.
pub fn create_run_dir(run_dir: &Path, cfg: &RunConfig) -> Result<(), TrainError> {
    check_new_run_dir(run_dir)?;
    let tokenizer = match &cfg.data.tokenizer {
        Some(tok) => Some(std::fs::read(tok).map_err(|e| TrainError::io(tok, e))?),
        None => None,
    };
    let source = source_tokenizer_config(cfg)?;
    std::fs::create_dir_all(run_dir).map_err(|e| TrainError::io(run_dir, e))?;
    atomic_write(&run_dir.join(CONFIG_FILE), cfg.to_toml().as_bytes())?;
    if let Some(bytes) = tokenizer {
        atomic_write(&run_dir.join(TOKENIZER_FILE), &bytes)?;
    }
    if let Some(config) = source {
        let text = serde_json::to_string_pretty(&config).expect("a JSON value serializes");
        atomic_write(&run_dir.join(TOKENIZER_CONFIG_FILE), text.as_bytes())?;
    }
    Ok(())
}

/// The run directory's own copy of its tokenizer, if it has one.
pub fn run_tokenizer(run_dir: &Path) -> Option<PathBuf> {
    let p = run_dir.join(TOKENIZER_FILE);
    p.exists().then_some(p)
}

/// Reads a run directory's effective config.
pub fn read_run_config(run_dir: &Path) -> Result<RunConfig, TrainError> {
    let path = run_dir.join(CONFIG_FILE);
    if !run_dir.is_dir() {
        return Err(TrainError::Config(format!(
            "run directory {} does not exist",
            run_dir.display()
        )));
    }
    RunConfig::from_toml_file(&path)
}

/// What a stability guard did to a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GuardAction {
    /// The update was not applied.
    Skip,
    /// Back to the last good state, skipping the data since.
    Rollback,
    /// Past the rollback limit: the run stops.
    Stop,
}

impl std::fmt::Display for GuardAction {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            GuardAction::Skip => "skip",
            GuardAction::Rollback => "rollback",
            GuardAction::Stop => "stop",
        })
    }
}

/// Progress of a run, for the caller to display.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Step {
        step: u64,
        loss: f64,
        lr: f64,
        grad_norm: f64,
        tokens_per_s: f64,
        elapsed_s: f64,
    },
    Eval {
        step: u64,
        val_loss: f64,
        #[serde(skip_serializing_if = "Option::is_none")]
        exact_match: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        exact_match_problems: Option<usize>,
    },
    Checkpoint {
        step: u64,
        path: PathBuf,
    },
    /// A stability guard acted: `skip` (update not applied) or `rollback` (to `to_step`,
    /// skipping the data since).
    Guard {
        step: u64,
        action: GuardAction,
        reason: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        to_step: Option<u64>,
    },
}

/// What a finished run learned.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub steps: u64,
    pub final_train_loss: f64,
    pub val_loss: f64,
    /// Held-out exact-match accuracy (addition task only).
    pub exact_match: Option<f64>,
    pub exact_match_problems: Option<usize>,
    pub checkpoint: PathBuf,
    pub tokens_per_s: f64,
    /// Updates the guards did not apply, and rollbacks they made.
    pub skipped_steps: u64,
    pub rollbacks: u64,
}

/// Held-out metrics of `weights` on `data`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct EvalReport {
    pub val_loss: f64,
    /// Exact-match accuracy on held-out problems (addition task only) and their number.
    pub exact_match: Option<f64>,
    pub exact_match_problems: Option<usize>,
}

/// Held-out metrics of `weights` on `data`, scoring up to `exact_match_problems` problems.
pub fn evaluate(
    weights: &Weights,
    data: &Dataset,
    cfg: &RunConfig,
    exact_match_problems: usize,
) -> EvalReport {
    let loss = val_loss(
        weights,
        data,
        cfg.train.seed,
        cfg.train.eval_batches,
        cfg.train.batch_size,
    );
    let acc = match data {
        Dataset::Addition(task) => Some(addition_accuracy(weights, task, exact_match_problems)),
        Dataset::Text(_) => None,
    };
    EvalReport {
        val_loss: loss,
        exact_match: acc.map(|a| a.0),
        exact_match_problems: acc.map(|a| a.1),
    }
}

/// Writes checkpoints on a background thread, one at a time: training does not wait on disk.
/// A failed write is reported when it is next waited for; the previous checkpoint stays.
#[derive(Default)]
struct CheckpointWriter {
    running: Option<(u64, std::thread::JoinHandle<Result<PathBuf, TrainError>>)>,
}

impl CheckpointWriter {
    fn start(&mut self, run_dir: &Path, state: TrainState, cfg: &RunConfig, keep: usize) {
        let (run_dir, cfg, step) = (run_dir.to_path_buf(), cfg.clone(), state.step);
        let handle = std::thread::spawn(move || checkpoint::save(&run_dir, &state, &cfg, keep));
        self.running = Some((step, handle));
    }

    /// Waits for the write in flight, if any; reports it through `emit` and remembers it as
    /// the newest checkpoint in `last`.
    fn wait(
        &mut self,
        emit: &mut dyn FnMut(Event) -> Result<(), TrainError>,
        last: &mut Option<PathBuf>,
    ) -> Result<(), TrainError> {
        let Some((step, handle)) = self.running.take() else {
            return Ok(());
        };
        let path = handle
            .join()
            .map_err(|_| TrainError::Checkpoint("checkpoint writer panicked".into()))??;
        emit(Event::Checkpoint {
            step,
            path: path.clone(),
        })?;
        *last = Some(path);
        Ok(())
    }
}

/// Trains `state` until `cfg.train.steps`, logging, evaluating and checkpointing as configured.
/// The stability guards (`cfg.guard`) judge every step before it is applied; `faults` are
/// injected numeric faults (chaos testing).
pub fn train(
    run_dir: &Path,
    cfg: &RunConfig,
    data: &Dataset,
    state: &mut TrainState,
    faults: &NumberFaults,
    on_event: &mut dyn FnMut(&Event),
) -> Result<Summary, TrainError> {
    let t = &cfg.train;
    let start = Instant::now();
    let start_step = state.step;
    let mut tokens = 0usize;
    let mut last_loss = f64::NAN;
    let mut last_ckpt = None;
    let mut writer = CheckpointWriter::default();
    let mut emit = |event: Event| -> Result<(), TrainError> {
        append_jsonl(&run_dir.join(METRICS_FILE), &event)?;
        on_event(&event);
        Ok(())
    };
    let mut faults = faults.clone();
    let mut stepper = GuardedStep::new(cfg.guard.clone(), &mut faults);
    // Only a guarded run keeps a state to roll back to: it holds a second copy in memory.
    let keeps_good_states = stepper.enabled();
    if keeps_good_states {
        stepper.mark_good(&state.weights, &state.opt, state.step);
    }
    let (mut skipped, mut rollbacks) = (0u64, 0u64);
    while state.step < t.steps {
        let at = state.step;
        let report = single_worker_step(state, data, t, &mut stepper);
        tokens += report.tokens;
        let guard_event = |action, reason: String, to_step| Event::Guard {
            step: at,
            action,
            reason,
            to_step,
        };
        let lr = match report.outcome {
            Outcome::Applied { lr } => lr,
            Outcome::Skipped { reason } => {
                skipped += 1;
                emit(guard_event(GuardAction::Skip, reason, None))?;
                continue;
            }
            Outcome::RolledBack { reason, to_step } => {
                rollbacks += 1;
                emit(guard_event(GuardAction::Rollback, reason, Some(to_step)))?;
                continue;
            }
            Outcome::Stop { reason } => {
                emit(guard_event(GuardAction::Stop, reason.clone(), None))?;
                return Err(TrainError::Unstable(format!(
                    "{reason} (see {})",
                    run_dir.join(METRICS_FILE).display()
                )));
            }
        };
        last_loss = report.loss;
        if keeps_good_states
            && state.step.is_multiple_of(cfg.guard.snapshot_every)
            && stepper.is_calm()
        {
            stepper.mark_good(&state.weights, &state.opt, state.step);
        }
        let elapsed = start.elapsed().as_secs_f64();
        emit(Event::Step {
            step: state.step,
            loss: report.loss,
            lr,
            grad_norm: report.grad_norm,
            tokens_per_s: tokens as f64 / elapsed.max(1e-9),
            elapsed_s: elapsed,
        })?;
        let last = state.step == t.steps;
        if state.step.is_multiple_of(t.eval_every) && !last {
            let r = evaluate(&state.weights, data, cfg, PERIODIC_EXACT_MATCH_PROBLEMS);
            emit(Event::Eval {
                step: state.step,
                val_loss: r.val_loss,
                exact_match: r.exact_match,
                exact_match_problems: r.exact_match_problems,
            })?;
        }
        if state.step.is_multiple_of(t.checkpoint_every) || last {
            // One write in flight at a time; training goes on while it runs.
            writer.wait(&mut emit, &mut last_ckpt)?;
            writer.start(run_dir, state.clone(), cfg, t.keep_checkpoints);
        }
    }
    writer.wait(&mut emit, &mut last_ckpt)?;
    let trained_s = start.elapsed().as_secs_f64();
    let r = evaluate(&state.weights, data, cfg, FINAL_EXACT_MATCH_PROBLEMS);
    emit(Event::Eval {
        step: state.step,
        val_loss: r.val_loss,
        exact_match: r.exact_match,
        exact_match_problems: r.exact_match_problems,
    })?;
    let checkpoint = match last_ckpt {
        Some(p) => p,
        // Nothing left to train (resumed at the end): the newest checkpoint is the result.
        None => checkpoint::list(run_dir)
            .first()
            .map(|(_, p)| p.clone())
            .ok_or_else(|| TrainError::Checkpoint("run has no checkpoint".into()))?,
    };
    Ok(Summary {
        steps: state.step - start_step,
        final_train_loss: last_loss,
        val_loss: r.val_loss,
        exact_match: r.exact_match,
        exact_match_problems: r.exact_match_problems,
        checkpoint,
        tokens_per_s: tokens as f64 / trained_s.max(1e-9),
        skipped_steps: skipped,
        rollbacks,
    })
}

/// Training throughput of a preset, measured after warm-up, writing nothing to disk.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub preset: String,
    pub params: usize,
    pub batch_size: usize,
    pub seq_len: usize,
    pub warmup_steps: u64,
    pub steps: u64,
    pub tokens_per_s: f64,
    /// 6 · parameters · tokens per second (forward + backward matmul FLOPs, no attention term).
    pub est_flop_per_s: f64,
    pub step_ms: f64,
    /// CPU time of all threads per timed step; `cpu_ms_per_step / step_ms` is how many cores
    /// the step kept busy.
    pub cpu_ms_per_step: f64,
    pub peak_rss_bytes: Option<u64>,
    /// Weights, gradients and AdamW's two moments, f32: what peak RSS holds besides
    /// activations, the token data and the program itself.
    pub train_state_bytes: u64,
    /// [`compute_threads`].
    pub threads: usize,
}

/// Peak resident set size of this process (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Threads of the compute pool that burn's CPU backends use: `RAYON_NUM_THREADS`, or every core.
pub fn compute_threads() -> usize {
    rayon::current_num_threads()
}

/// User plus system CPU time of this process, all threads.
fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Runs `warmup + steps` training steps of `model` on random byte windows and times the last
/// `steps`.
pub fn bench_train(
    preset: &str,
    model: &ModelConfig,
    batch_size: usize,
    warmup: u64,
    steps: u64,
    device: &Device,
) -> BenchReport {
    let seq = model.max_position_embeddings;
    // Synthetic tokens: throughput does not depend on their content.
    let tokens: Vec<u32> = (0..(seq as u64 * 64 + 1024))
        .map(|i| (crate::data::mix(i) % model.vocab_size as u64) as u32)
        .collect();
    let data = Dataset::Text(TextData::new(tokens, 0.1, seq).expect("enough synthetic tokens"));
    let h = crate::config::TrainSection {
        batch_size,
        steps: warmup + steps,
        ..Default::default()
    };
    let mut state = TrainState::new(model, 0, device);
    for _ in 0..warmup {
        train_step(&mut state, &data, &h);
    }
    let start = Instant::now();
    let cpu_start = process_cpu_seconds();
    let mut tokens = 0;
    for _ in 0..steps {
        tokens += train_step(&mut state, &data, &h).tokens;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu_secs = process_cpu_seconds() - cpu_start;
    let tokens_per_s = tokens as f64 / secs;
    let params = model.num_params();
    BenchReport {
        preset: preset.to_string(),
        params,
        batch_size,
        seq_len: seq,
        warmup_steps: warmup,
        steps,
        tokens_per_s,
        est_flop_per_s: 6.0 * params as f64 * tokens_per_s,
        step_ms: secs * 1000.0 / steps as f64,
        cpu_ms_per_step: cpu_secs * 1000.0 / steps as f64,
        peak_rss_bytes: peak_rss_bytes(),
        train_state_bytes: 4 * 4 * params as u64,
        threads: compute_threads(),
    }
}
