//! `holdfast`: the command line. Parses flags, picks the device, and hands off to the crates.

mod device;
mod export;
mod launch;
mod serving;
#[cfg(feature = "etcd")]
mod standby;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::ProgressBar;

use holdfast_model::ModelConfig;
use holdfast_train::coordinate::Start;
use holdfast_train::overrides::Overrides;
use holdfast_train::run::{self, Event};
use holdfast_train::supervise::{AfterStateLost, LossClock, after_state_lost};
use holdfast_train::worker::CoordinatorAt;
use holdfast_train::{RunConfig, SyncMode, Task, TrainState, checkpoint, rundir};

#[derive(Parser)]
#[command(
    name = "holdfast",
    version,
    about = "Train language models to completion on unreliable hardware"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (by default: 3-digit addition, generated offline).
    Train(Box<TrainArgs>),
    /// Evaluate a run's latest checkpoint on its held-out data.
    Eval {
        run_dir: PathBuf,
        #[arg(long, default_value = "flex")]
        device: String,
    },
    /// Generate text from a run's latest checkpoint, a GGUF file or a Hugging Face directory.
    Generate(serving::GenerateArgs),
    /// OpenAI-compatible HTTP server for a model.
    Serve(serving::ServeArgs),
    /// Run the same prompts on two backends and compare logits.
    Parity(serving::ParityArgs),
    /// Write a run's latest checkpoint as a GGUF file (llama.cpp's format).
    Export(export::ExportArgs),
    /// Write one self-contained HTML page about a run: loss, throughput, faults, sync.
    Report {
        run_dir: PathBuf,
        /// Where to write it (default: RUN/report.html).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Serve a multi-worker run to workers that join from other hosts.
    Coordinator(Box<CoordinatorArgs>),
    /// Join a multi-worker run (`holdfast coordinator` or `holdfast train --workers`).
    Worker(WorkerArgs),
    /// Print a fresh random shared secret (256 bits, hex) for a multi-worker run.
    Secret,
    /// Measure performance without writing a run directory.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Args)]
struct TrainArgs {
    /// TOML config file; flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where the run is written (must not exist). Default: runs/<task>-<time>.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Continue the run in this directory from its latest valid checkpoint.
    #[arg(long, conflicts_with_all = ["config", "run_dir", "data", "tokenizer", "preset", "model_config", "init"])]
    resume: Option<PathBuf>,
    /// Train on this UTF-8 text file or glob instead of the built-in task.
    #[arg(long)]
    data: Option<String>,
    /// Hugging Face tokenizer.json (default: byte-level).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Model preset: tiny, char-small, small.
    #[arg(long)]
    preset: Option<String>,
    /// Hugging Face config.json giving the model shape (instead of a preset).
    #[arg(long)]
    model_config: Option<PathBuf>,
    /// Start from these weights: Hugging Face safetensors matching the model shape, or a GGUF
    /// file (its shape and the tokenizer.json beside it are then the run's defaults).
    #[arg(long)]
    init: Option<PathBuf>,
    #[arg(long)]
    context: Option<usize>,
    #[arg(long)]
    steps: Option<u64>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    grad_accum: Option<usize>,
    #[arg(long, allow_hyphen_values = true)]
    lr: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    eval_every: Option<u64>,
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Compute device: flex (CPU, default), or cuda[:N] / rocm[:N] / vulkan when built with that
    /// feature.
    #[arg(long, default_value = "flex")]
    device: String,
    /// No progress bar; one line per evaluation instead.
    #[arg(long)]
    no_progress: bool,
    /// Train with this many worker processes on this machine (embedded coordinator).
    #[arg(long)]
    workers: Option<usize>,
    /// Inject faults, e.g. `kill:worker=2,at=30s;hang:worker=1,for=10s` (needs --workers) or
    /// `nan:at=120;spike:at=300,scale=50`.
    #[arg(long)]
    chaos: Option<String>,
    /// Turn the stability guards (NaN/Inf skip, loss-spike rollback, replica vote) off.
    #[arg(long)]
    no_guards: bool,
    /// Do not restart a worker that dies (by default it is restarted after 1 s and rejoins).
    #[arg(long, requires = "workers")]
    no_respawn: bool,
    /// Replica sync: diloco or ddp.
    #[arg(long)]
    sync: Option<String>,
    /// DiLoCo's H: inner steps per outer round.
    #[arg(long)]
    inner_steps: Option<u64>,
    /// How DiLoCo's pseudo-gradients travel: f32, or int8, int4, e2m1 (quantized, with
    /// error feedback).
    #[arg(long)]
    sync_precision: Option<String>,
    /// Streaming DiLoCo's P: fragments of the parameters (strided by layer), one synced per
    /// round of H/P steps.
    #[arg(long)]
    fragments: Option<u64>,
    /// Streaming DiLoCo's τ: inner steps that train while a round's all-reduce runs.
    #[arg(long)]
    overlap_steps: Option<u64>,
    /// DiLoCo rounds closed by time, not H steps each: workers ask for batches until the
    /// round is this many seconds old, so faster ones train more (merged weighted by tokens).
    #[arg(long)]
    round_seconds: Option<f64>,
    /// DiLoCo rounds closed by tokens: batches are handed out as workers ask until the
    /// round has this many tokens.
    #[arg(long)]
    round_tokens: Option<u64>,
    /// A worker silent this long is dropped from the quorum.
    #[arg(long)]
    failure_timeout_ms: Option<u64>,
}

#[derive(Args)]
struct CoordinatorArgs {
    /// Address to listen on, e.g. 0.0.0.0:7070.
    #[arg(long)]
    listen: String,
    /// Workers that must join before the first round. The run's budget is this many
    /// workers' `--steps` of batches, however many join.
    #[arg(long, default_value_t = 1)]
    min_workers: usize,
    /// File holding the run's shared secret (default: the HOLDFAST_SECRET environment variable).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Coordinate through etcd (endpoints `host:port`, comma-separated): every coordinator of
    /// the run (same --run-dir, shared) campaigns to lead it; the others stand by and take
    /// over from its last commit when it dies.
    #[arg(long, value_delimiter = ',', requires = "run_dir")]
    etcd: Vec<String>,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Args)]
struct WorkerArgs {
    /// The coordinator's address.
    #[arg(long, required_unless_present = "etcd", conflicts_with = "etcd")]
    join: Option<String>,
    /// Find the coordinator leading run --run through etcd (endpoints `host:port`,
    /// comma-separated), again at every rejoin.
    #[arg(long, value_delimiter = ',', requires = "run")]
    etcd: Vec<String>,
    /// With --etcd: the run's name (its run directory's name).
    #[arg(long, requires = "etcd")]
    run: Option<String>,
    /// This worker's name (ranks are ordered by name). Default: HOST-PID.
    #[arg(long)]
    name: Option<String>,
    /// IP to accept peers on (default: the interface that reaches the coordinator).
    #[arg(long)]
    listen_ip: Option<String>,
    /// Where tokenized text is cached.
    #[arg(long, default_value = ".holdfast-token-cache")]
    cache_dir: PathBuf,
    /// File holding the run's shared secret (default: the HOLDFAST_SECRET environment variable).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    #[arg(long, default_value = "flex")]
    device: String,
    /// Run this many times slower (chaos testing).
    #[arg(long, default_value_t = 1.0)]
    slow_factor: f64,
    /// Numeric faults to inject into this worker's training (chaos testing), e.g. `nan:at=30`.
    #[arg(long)]
    inject: Option<String>,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Training tokens/s, estimated FLOP/s and peak RSS of a preset, as one JSON line.
    Train {
        #[arg(long, default_value = "small")]
        preset: String,
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        /// Sequence length (default: the preset's context).
        #[arg(long)]
        context: Option<usize>,
        #[arg(long, default_value_t = 3)]
        warmup: u64,
        #[arg(long, default_value_t = 10)]
        steps: u64,
        #[arg(long, default_value = "flex")]
        device: String,
    },
    /// Prompt-processing and generation tokens/s and peak RSS of a model, as one JSON line.
    Generate(serving::BenchGenerateArgs),
}

fn cmd_report(run_dir: &Path, out: Option<PathBuf>) -> Result<()> {
    use holdfast_train::report::{REPORT_FILE, write_report};
    let out = out.unwrap_or_else(|| run_dir.join(REPORT_FILE));
    write_report(run_dir, &out)?;
    println!("{}", out.display());
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOLDFAST_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => cmd_train(*args),
        Command::Eval { run_dir, device } => cmd_eval(&run_dir, &device),
        Command::Generate(args) => serving::cmd_generate(args),
        Command::Serve(args) => serving::cmd_serve(args),
        Command::Parity(args) => serving::cmd_parity(args),
        Command::Export(args) => export::cmd_export(args),
        Command::Report { run_dir, out } => cmd_report(&run_dir, out),
        Command::Bench {
            what: BenchCommand::Generate(args),
        } => serving::cmd_bench_generate(args),
        Command::Coordinator(args) => cmd_coordinator(*args),
        Command::Worker(args) => cmd_worker(args),
        Command::Secret => {
            println!("{}", holdfast_cluster::wire::fresh_secret());
            Ok(())
        }
        Command::Bench {
            what:
                BenchCommand::Train {
                    preset,
                    batch_size,
                    context,
                    warmup,
                    steps,
                    device,
                },
        } => cmd_bench_train(&preset, batch_size, context, warmup, steps, &device),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The flags as overrides of the config (the rules they follow live in `holdfast_train`).
fn overrides(args: &TrainArgs) -> Result<Overrides> {
    Ok(Overrides {
        data: args.data.clone(),
        tokenizer: args.tokenizer.clone(),
        preset: args.preset.clone(),
        model_config: args.model_config.clone(),
        init: args.init.clone(),
        context: args.context,
        steps: args.steps,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        lr: args.lr,
        seed: args.seed,
        eval_every: args.eval_every,
        checkpoint_every: args.checkpoint_every,
        sync: args.sync.as_deref().map(str::parse).transpose()?,
        inner_steps: args.inner_steps,
        precision: args.sync_precision.as_deref().map(str::parse).transpose()?,
        fragments: args.fragments,
        overlap_steps: args.overlap_steps,
        round_seconds: args.round_seconds,
        round_tokens: args.round_tokens,
        failure_timeout_ms: args.failure_timeout_ms,
        no_guards: args.no_guards,
    })
}

fn plan_new_run(args: &TrainArgs) -> Result<rundir::NewRun> {
    let o = overrides(args)?;
    Ok(rundir::plan_new_run(
        args.config.as_deref(),
        &o,
        args.run_dir.clone(),
    )?)
}

fn load_for_resume(
    run_dir: &Path,
    args: &TrainArgs,
    device: &burn::tensor::Device,
    kind: rundir::RunKind,
) -> Result<rundir::Resumed> {
    let resumed = rundir::load_for_resume(run_dir, &overrides(args)?, device, kind)?;
    warn_about(&resumed.loaded);
    Ok(resumed)
}

fn cmd_train(args: TrainArgs) -> Result<()> {
    let device = device::parse(&args.device)?;
    if !config_file_etcd(args.config.as_deref())?.is_empty() {
        bail!(
            "sync.etcd in {}: `train` starts its run's only coordinator; standby coordinators campaign in etcd with `holdfast coordinator`",
            args.config.as_deref().unwrap_or(Path::new("")).display()
        );
    }
    if let Some(workers) = args.workers {
        return cmd_train_workers(&args, workers, device);
    }
    refuse_sync_flags_alone(&args)?;
    let faults = match &args.chaos {
        None => Default::default(),
        Some(spec) => holdfast_train::chaos::ChaosPlan::single_process(spec)
            .map_err(|e| anyhow::anyhow!("--chaos: {e}"))?,
    };
    let (run_dir, cfg, prepared, mut state) = single_worker_run(&args, &device)?;
    holdfast_train::set_flush_denormals(cfg.train.flush_denormals);
    eprintln!(
        "training {} parameters ({} layers, width {}) on {} for {} steps → {}",
        prepared.model.num_params(),
        prepared.model.num_hidden_layers,
        prepared.model.hidden_size,
        describe_task(&cfg),
        cfg.train.steps,
        run_dir.display()
    );
    let bar = launch::progress_bar(!args.no_progress, cfg.train.steps);
    bar.set_position(state.step);
    let summary = run::train(
        &run_dir,
        &cfg,
        &prepared.dataset,
        &mut state,
        &faults,
        &mut show_progress(&bar),
    )?;
    bar.finish_and_clear();
    print_summary(&summary, &cfg, &run_dir);
    Ok(())
}

/// A single process has no replicas to sync: the flags that say how they sync would do nothing.
fn refuse_sync_flags_alone(args: &TrainArgs) -> Result<()> {
    let given: Vec<&str> = [
        ("--sync", args.sync.is_some()),
        ("--inner-steps", args.inner_steps.is_some()),
        ("--sync-precision", args.sync_precision.is_some()),
        ("--fragments", args.fragments.is_some()),
        ("--overlap-steps", args.overlap_steps.is_some()),
        ("--round-seconds", args.round_seconds.is_some()),
        ("--round-tokens", args.round_tokens.is_some()),
        ("--failure-timeout-ms", args.failure_timeout_ms.is_some()),
    ]
    .into_iter()
    .filter_map(|(flag, set)| set.then_some(flag))
    .collect();
    if !given.is_empty() {
        bail!(
            "{}: a single process has no replicas to sync (add --workers N)",
            given.join(", ")
        );
    }
    Ok(())
}

/// The run `train` continues (`--resume`) or starts.
fn single_worker_run(
    args: &TrainArgs,
    device: &burn::tensor::Device,
) -> Result<(PathBuf, RunConfig, run::Prepared, TrainState)> {
    if let Some(run_dir) = &args.resume {
        let r = load_for_resume(run_dir, args, device, rundir::RunKind::SingleWorker)?;
        eprintln!(
            "resuming {} from {} (step {})",
            run_dir.display(),
            r.loaded.dir.display(),
            r.loaded.state.step
        );
        return Ok((run_dir.clone(), r.cfg, r.prepared, r.loaded.state));
    }
    let new = plan_new_run(args)?;
    let state = rundir::start_new_run(&new, args.init.as_deref(), device)?;
    Ok((new.run_dir, new.cfg, new.prepared, state))
}

/// Shows a single-worker run's events on the progress bar (or as lines, with none).
fn show_progress(bar: &ProgressBar) -> impl FnMut(&Event) + '_ {
    let say = |line: String| {
        // A progress bar drawn nowhere (no terminal) would swallow the line too.
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    };
    move |event: &Event| match event {
        Event::Step {
            step,
            loss,
            tokens_per_s,
            ..
        } => {
            bar.set_position(*step);
            bar.set_message(format!("loss {loss:.4}  {tokens_per_s:.0} tok/s"));
        }
        Event::Eval {
            step,
            val_loss,
            exact_match,
            ..
        } => {
            let acc = exact_match.map_or(String::new(), |a| {
                format!("  held-out exact match {:.1}%", a * 100.0)
            });
            say(format!("step {step}: val loss {val_loss:.4}{acc}"));
        }
        Event::Checkpoint { .. } => {}
        Event::Guard {
            step,
            action,
            reason,
            to_step,
        } => {
            let to = to_step.map_or(String::new(), |s| format!(" to step {s}"));
            say(format!("step {step}: guard {action}{to}: {reason}"));
        }
    }
}

fn print_summary(summary: &run::Summary, cfg: &RunConfig, run_dir: &Path) {
    println!(
        "trained {} steps at {:.0} tokens/s",
        summary.steps, summary.tokens_per_s
    );
    println!(
        "final train loss {:.4}, validation loss {:.4}",
        summary.final_train_loss, summary.val_loss
    );
    if summary.skipped_steps + summary.rollbacks > 0 {
        println!(
            "guards: {} updates skipped, {} rollbacks (details in {})",
            summary.skipped_steps,
            summary.rollbacks,
            run_dir.join(run::METRICS_FILE).display()
        );
    }
    if let (Some(acc), Some(n)) = (summary.exact_match, summary.exact_match_problems) {
        println!(
            "held-out exact-match accuracy: {:.1}% of {n} unseen {}-digit additions (digits written least-significant first)",
            acc * 100.0,
            cfg.data.addition_digits
        );
    }
    println!("checkpoint: {}", summary.checkpoint.display());
    println!(
        "next: holdfast eval {0}  |  holdfast generate {0} --prompt ...",
        run_dir.display()
    );
}

fn describe_task(cfg: &RunConfig) -> String {
    match cfg.data.task {
        Task::Addition => format!("{}-digit addition (generated)", cfg.data.addition_digits),
        Task::Text => cfg.data.path.clone().unwrap_or_default(),
    }
}

/// A run's config and newest valid checkpoint, with a warning for each damaged newer one.
fn load_run(
    run_dir: &Path,
    device: &burn::tensor::Device,
) -> Result<(RunConfig, checkpoint::Loaded)> {
    let (cfg, loaded) = rundir::load_run(run_dir, device)?;
    warn_about(&loaded);
    Ok((cfg, loaded))
}

fn warn_about(loaded: &checkpoint::Loaded) {
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
}

fn cmd_eval(run_dir: &Path, device: &str) -> Result<()> {
    let device = device::parse(device)?;
    let (cfg, loaded) = load_run(run_dir, &device)?;
    let prepared = run::prepare_data(
        &cfg,
        &run::token_cache_dir(run_dir),
        run::run_tokenizer(run_dir).as_deref(),
    )?;
    let r = run::evaluate(
        &loaded.state.weights,
        &prepared.dataset,
        &cfg,
        run::FINAL_EXACT_MATCH_PROBLEMS,
    );
    let report = serde_json::json!({
        "run_dir": run_dir,
        "checkpoint": loaded.dir,
        "step": loaded.state.step,
        "val_loss": r.val_loss,
        "exact_match": r.exact_match,
        "exact_match_problems": r.exact_match_problems,
    });
    println!("{report}");
    Ok(())
}

fn cmd_bench_train(
    preset: &str,
    batch_size: usize,
    context: Option<usize>,
    warmup: u64,
    steps: u64,
    device: &str,
) -> Result<()> {
    let device = device::parse(device)?;
    let mut model = ModelConfig::preset(preset)?;
    if let Some(c) = context {
        model.max_position_embeddings = c;
    }
    model.validate()?;
    if batch_size == 0 || steps == 0 {
        bail!("--batch-size and --steps must be at least 1");
    }
    let report = run::bench_train(preset, &model, batch_size, warmup, steps, &device);
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// A multi-worker run to start: the one `--resume` names, from its newest checkpoint, or a
/// new one.
fn new_or_restored_cluster_run(
    args: &TrainArgs,
) -> Result<(
    PathBuf,
    RunConfig,
    run::Prepared,
    Option<holdfast_train::coordinate::Restore>,
)> {
    Ok(match &args.resume {
        Some(run_dir) => {
            let device = device::parse(&args.device)?;
            let (cfg, prepared, restore) =
                restore_cluster_run(run_dir, &overrides(args)?, &device)?;
            (run_dir.clone(), cfg, prepared, Some(restore))
        }
        None => {
            let (run_dir, cfg, prepared) = new_cluster_run(args)?;
            (run_dir, cfg, prepared, None)
        }
    })
}

/// A multi-worker run restarted cold from its newest valid checkpoint, with `o` applied.
fn restore_cluster_run(
    run_dir: &Path,
    o: &Overrides,
    device: &burn::tensor::Device,
) -> Result<(
    RunConfig,
    run::Prepared,
    holdfast_train::coordinate::Restore,
)> {
    let rundir::Resumed {
        cfg,
        prepared,
        loaded,
    } = rundir::load_for_resume(run_dir, o, device, rundir::RunKind::MultiWorker)?;
    warn_about(&loaded);
    let cluster = loaded.cluster.ok_or_else(|| {
        anyhow::anyhow!(
            "checkpoint {} lacks a multi-worker position",
            loaded.dir.display()
        )
    })?;
    eprintln!(
        "restarting {} from {} (round {}, step {})",
        run_dir.display(),
        loaded.dir.display(),
        cluster.position.next_round,
        loaded.state.step
    );
    let restore = holdfast_train::coordinate::Restore {
        state: loaded.state,
        cluster,
    };
    Ok((cfg, prepared, restore))
}

fn new_cluster_run(args: &TrainArgs) -> Result<(PathBuf, RunConfig, run::Prepared)> {
    let o = overrides(args)?;
    let new = rundir::plan_new_cluster_run(args.config.as_deref(), &o, args.run_dir.clone())?;
    Ok((new.run_dir, new.cfg, new.prepared))
}

fn describe_sync(cfg: &RunConfig) -> String {
    let s = &cfg.sync;
    let rounds = if s.round_seconds > 0.0 {
        format!(
            "rounds of {} s, batches on demand, merged by tokens",
            s.round_seconds
        )
    } else if s.round_tokens > 0 {
        format!(
            "rounds of {} tokens, batches on demand, merged by tokens",
            s.round_tokens
        )
    } else {
        format!("H={}", s.inner_steps)
    };
    match s.mode {
        SyncMode::Ddp => "DDP (gradients averaged every step)".into(),
        SyncMode::Diloco if s.fragments > 1 || s.overlap_steps > 0 => format!(
            "streaming DiLoCo ({rounds}, {} fragments, overlap {} steps, mixing {}, outer Nesterov lr {} momentum {}, pseudo-gradients as {})",
            s.fragments, s.overlap_steps, s.mixing, s.outer_lr, s.outer_momentum, s.precision
        ),
        SyncMode::Diloco => format!(
            "DiLoCo ({rounds}, outer Nesterov lr {} momentum {}, pseudo-gradients as {})",
            s.outer_lr, s.outer_momentum, s.precision
        ),
    }
}

fn print_cluster_summary(
    s: &holdfast_train::coordinate::ClusterSummary,
    run_dir: &Path,
    cfg: &RunConfig,
) {
    println!(
        "committed {} rounds ({} batches) in {:.1}s: {} tokens, goodput {:.0} tokens/s",
        s.rounds, s.committed_batches, s.wall_s, s.committed_tokens, s.goodput_tokens_per_s
    );
    println!(
        "faults {}, aborted attempts {}, discarded batches {} (retrained), replica divergences {}",
        s.faults, s.aborted_attempts, s.discarded_batches, s.divergences
    );
    if s.guard_skips + s.guard_rollbacks + s.corruptions + s.rewinds > 0 {
        let suspects: Vec<String> = s
            .suspects
            .iter()
            .map(|(n, f)| format!("{n} ({f}x)"))
            .collect();
        println!(
            "guards: {} inner steps not applied, {} rollbacks, {} rewinds of the run ({} batches skipped), {} corrupted replica states{}",
            s.guard_skips,
            s.guard_rollbacks,
            s.rewinds,
            s.skipped_batches,
            s.corruptions,
            if suspects.is_empty() {
                String::new()
            } else {
                format!("; suspect hardware: {}", suspects.join(", "))
            }
        );
    }
    if !s.slow_workers.is_empty() {
        let slow: Vec<String> = (s.slow_workers.iter())
            .map(|(n, r)| format!("{n} ({r:.1}× its peers' time a batch)"))
            .collect();
        println!("slow, suspect hardware: {}", slow.join(", "));
    }
    println!(
        "sync: {:.1} bytes sent per token; median sync stall {:.3}s, worst with a fault {:.3}s",
        s.bytes_sent_per_token, s.median_sync_s, s.max_fault_sync_s
    );
    println!(
        "final train loss {:.4}, validation loss {:.4}",
        s.final_loss, s.eval.val_loss
    );
    if let (Some(acc), Some(n)) = (s.eval.exact_match, s.eval.exact_match_problems) {
        println!(
            "held-out exact-match accuracy: {:.1}% of {n} unseen {}-digit additions",
            acc * 100.0,
            cfg.data.addition_digits
        );
    }
    println!("checkpoint: {}", s.checkpoint.display());
    println!(
        "ledger: {}  summary: {}",
        run_dir
            .join(holdfast_train::coordinate::LEDGER_FILE)
            .display(),
        run_dir
            .join(holdfast_train::coordinate::SUMMARY_FILE)
            .display()
    );
}

fn cmd_train_workers(args: &TrainArgs, workers: usize, device: burn::tensor::Device) -> Result<()> {
    check_worker_count(workers)?;
    let chaos = match &args.chaos {
        Some(spec) => holdfast_train::chaos::ChaosPlan::parse(spec, workers)
            .map_err(|e| anyhow::anyhow!("--chaos: {e}"))?,
        None => Default::default(),
    };
    let (run_dir, mut cfg, mut prepared, mut restore) = new_or_restored_cluster_run(args)?;
    eprintln!(
        "training {} parameters on {} with {workers} worker processes, {}, {} steps each → {}",
        prepared.model.num_params(),
        describe_task(&cfg),
        describe_sync(&cfg),
        cfg.train.steps,
        run_dir.display()
    );
    let mut opts = launch::LaunchOptions {
        workers,
        chaos,
        respawn_after: (!args.no_respawn).then_some(std::time::Duration::from_secs(1)),
        device: args.device.clone(),
        progress: !args.no_progress,
    };
    let cache = run::token_cache_dir(&run_dir);
    let mut restarts = 0;
    loop {
        let ended = launch::run(
            &run_dir,
            &cfg,
            &prepared,
            &cache,
            device.clone(),
            &opts,
            restore,
        )?;
        let rounds = match ended {
            launch::Ended::Complete(summary) => {
                print_cluster_summary(&summary, &run_dir, &cfg);
                return Ok(());
            }
            launch::Ended::StateLost { rounds } => rounds,
        };
        let resume = format!(
            "holdfast train --resume {} --workers {workers}",
            run_dir.display()
        );
        restarts = cold_restart_attempt(&run_dir, rounds, restarts, &cfg, &resume)?;
        // The chaos schedule was the first launch's; a restart runs clean.
        opts.chaos = Default::default();
        let restored = restore_cluster_run(&run_dir, &Overrides::default(), &device)?;
        (cfg, prepared, restore) = (restored.0, restored.1, Some(restored.2));
    }
}

/// After every worker holding the state was lost at once, `restarts_done` cold restarts so
/// far: the number of the cold restart to make now, or the error that ends the run (naming
/// the `resume` command).
fn cold_restart_attempt(
    run_dir: &Path,
    rounds: u64,
    restarts_done: u32,
    cfg: &RunConfig,
    resume: &str,
) -> Result<u32> {
    let max = cfg.sync.max_cold_restarts;
    match after_state_lost(restarts_done, max, launch::checkpointed(run_dir)) {
        AfterStateLost::RestartCold { attempt } => {
            eprintln!(
                "every worker holding the state after round {rounds} was lost at once; restarting cold from the newest checkpoint (restart {attempt} of at most {max})"
            );
            Ok(attempt)
        }
        AfterStateLost::End { reason } => {
            let lost = launch::state_lost_error(run_dir, rounds, resume);
            bail!("{lost} ({reason})")
        }
    }
}

fn check_worker_count(workers: usize) -> Result<()> {
    if workers == 0 {
        bail!("--workers must be at least 1");
    }
    Ok(())
}

/// Flags `coordinator` accepts from `train` but cannot act on, refused before anything starts.
fn check_coordinator_args(args: &CoordinatorArgs) -> Result<()> {
    if args.train.workers.is_some() {
        bail!(
            "--workers starts local worker processes; with `coordinator`, use --min-workers and start `holdfast worker --join` on each host"
        );
    }
    if args.min_workers == 0 {
        bail!("--min-workers must be at least 1");
    }
    if args.train.chaos.is_some() {
        bail!(
            "--chaos: the coordinator starts no workers to fault; give each `holdfast worker` its numeric faults with --inject"
        );
    }
    Ok(())
}

/// The etcd a coordinator campaigns in: `--etcd`, else its `--config` file's `sync.etcd`.
fn etcd_endpoints(args: &CoordinatorArgs) -> Result<Vec<String>> {
    if !args.etcd.is_empty() {
        return Ok(args.etcd.clone());
    }
    config_file_etcd(args.train.config.as_deref())
}

/// `sync.etcd` of the config file at `path`, if one is given.
fn config_file_etcd(path: Option<&Path>) -> Result<Vec<String>> {
    let Some(path) = path else {
        return Ok(Vec::new());
    };
    Ok(RunConfig::from_toml_file(path)?.sync.etcd)
}

fn cmd_coordinator(args: CoordinatorArgs) -> Result<()> {
    check_coordinator_args(&args)?;
    let etcd = etcd_endpoints(&args)?;
    if !etcd.is_empty() {
        #[cfg(feature = "etcd")]
        return standby::cmd_coordinator_etcd(&args, &etcd);
        #[cfg(not(feature = "etcd"))]
        bail!(holdfast_train::worker::WITHOUT_ETCD);
    }
    let secret = launch::secret_from_env_or_file(args.secret_file.as_ref())?;
    let device = device::parse(&args.train.device)?;
    let (run_dir, cfg, prepared, restore) = new_or_restored_cluster_run(&args.train)?;
    let cluster = holdfast_train::coordinate::ClusterRun::start(
        &run_dir,
        &cfg,
        &prepared.model,
        &args.listen,
        &secret,
        args.min_workers,
        device,
        restore.map_or(Start::Fresh, |r| Start::Restore(Box::new(r))),
        None,
    )?;
    let addr = cluster.server.addr.clone();
    // Started apart from its workers, it cannot restart them cold: once the state has stayed
    // lost, it ends and says how to go on (a service manager restarting it with --resume does).
    match coordinate(cluster, &args, (&run_dir, &cfg, &prepared))? {
        None => Ok(()),
        Some(rounds) => Err(launch::state_lost_error(
            &run_dir,
            rounds,
            &resume_command(&addr, &args, &run_dir),
        )),
    }
}

/// How to restart a coordinator listening on `addr` cold from its newest checkpoint.
fn resume_command(addr: &str, args: &CoordinatorArgs, run_dir: &Path) -> String {
    format!(
        "holdfast coordinator --listen {addr} --min-workers {} --resume {}",
        args.min_workers,
        run_dir.display()
    )
}

/// Serves the run until it is complete, then finishes it; or, once no worker has held its
/// state for the grace, returns the rounds committed.
fn coordinate(
    mut cluster: holdfast_train::coordinate::ClusterRun,
    args: &CoordinatorArgs,
    (run_dir, cfg, prepared): (&Path, &RunConfig, &run::Prepared),
) -> Result<Option<u64>> {
    eprintln!(
        "coordinator for {} listening on {}: waiting for {} worker(s) (`holdfast worker --join ADDR`), {}",
        run_dir.display(),
        cluster.server.addr,
        args.min_workers,
        describe_sync(cfg)
    );
    let bar = launch::progress_bar(!args.train.no_progress, cfg.cluster_steps());
    let mut loss = LossClock::default();
    let lost = launch::drive(&mut cluster, &bar, |p| {
        let expired = loss.expired(std::time::Instant::now(), p.state_lost);
        Ok(match expired {
            true => std::ops::ControlFlow::Break(p.committed_rounds),
            false => std::ops::ControlFlow::Continue(()),
        })
    })?;
    bar.finish_and_clear();
    if lost.is_some() {
        return Ok(lost);
    }
    let summary = cluster.finish(prepared)?;
    print_cluster_summary(&summary, run_dir, cfg);
    // Give released workers a moment to hear that the run is finished.
    std::thread::sleep(std::time::Duration::from_secs(1));
    Ok(None)
}

fn check_worker_args(args: &WorkerArgs) -> Result<()> {
    if !(args.slow_factor.is_finite() && args.slow_factor >= 1.0) {
        bail!("--slow-factor must be at least 1, got {}", args.slow_factor);
    }
    Ok(())
}

fn cmd_worker(args: WorkerArgs) -> Result<()> {
    check_worker_args(&args)?;
    let secret = launch::secret_from_env_or_file(args.secret_file.as_ref())?;
    let device = device::parse(&args.device)?;
    let name = args.name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "worker".into());
        format!("{}-{}", host.trim(), std::process::id())
    });
    let coordinator = match (&args.join, &args.run) {
        (Some(addr), _) => CoordinatorAt::Address(addr.clone()),
        (None, Some(run)) => CoordinatorAt::Etcd {
            endpoints: args.etcd.clone(),
            run: run.clone(),
        },
        (None, None) => bail!("give --join ADDR, or --etcd URLS with --run NAME"),
    };
    let opts = holdfast_train::worker::WorkerOptions {
        coordinator,
        name,
        secret,
        listen_ip: args.listen_ip.clone(),
        device,
        cache_dir: args.cache_dir.clone(),
        slow_factor: args.slow_factor,
        faults: match &args.inject {
            None => Default::default(),
            Some(spec) => holdfast_train::chaos::ChaosPlan::parse(spec, 1)
                .map_err(|e| anyhow::anyhow!("--inject: {e}"))?
                .number_faults(0),
        },
    };
    holdfast_train::worker::run_worker(&opts)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Command {
        Cli::try_parse_from(std::iter::once("holdfast").chain(args.iter().copied()))
            .unwrap()
            .command
    }

    fn refused(result: Result<()>, needle: &str) {
        let err = format!("{:#}", result.unwrap_err());
        assert!(err.contains(needle), "{err} should mention {needle}");
    }

    #[test]
    fn the_coordinator_refuses_flags_it_cannot_act_on() {
        let check = |extra: &[&str]| {
            let mut args = vec!["coordinator", "--listen", "127.0.0.1:0"];
            args.extend(extra);
            match parse(&args) {
                Command::Coordinator(a) => check_coordinator_args(&a),
                _ => unreachable!(),
            }
        };
        assert!(check(&[]).is_ok());
        refused(check(&["--workers", "2"]), "--min-workers");
        refused(
            check(&["--min-workers", "0"]),
            "--min-workers must be at least 1",
        );
        refused(check(&["--chaos", "nan:at=3"]), "--inject");
        assert!(
            check(&["--resume", "runs/x"]).is_ok(),
            "restarts a run cold"
        );
    }

    /// Every `holdfast` command the deployment examples run, with its arguments.
    fn deployed_commands() -> Vec<Vec<String>> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
        let mut commands = Vec::new();
        for unit in std::fs::read_dir(&dir).unwrap() {
            let text = std::fs::read_to_string(unit.unwrap().path()).unwrap();
            let exec = text.lines().filter_map(|l| l.strip_prefix("ExecStart="));
            for invocation in exec.flat_map(|l| l.split("/usr/local/bin/holdfast ").skip(1)) {
                let args = invocation.split([';', '\'']).next().unwrap();
                let args = args.replace("\"$RUN\"", "/var/lib/holdfast/run");
                commands.push(args.split_whitespace().map(str::to_string).collect());
            }
        }
        commands
    }

    #[test]
    fn the_deployment_examples_run_commands_this_binary_accepts() {
        let commands = deployed_commands();
        assert_eq!(
            commands.len(),
            5,
            "two coordinator forms and a worker, and with etcd one of each: {commands:?}"
        );
        for args in commands {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            match parse(&args) {
                Command::Coordinator(a) => check_coordinator_args(&a).unwrap(),
                Command::Worker(a) => check_worker_args(&a).unwrap(),
                _ => panic!("{args:?} is not a coordinator or a worker"),
            }
        }
    }

    #[test]
    fn etcd_flags_come_with_what_they_need() {
        let parses = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("holdfast").chain(args.iter().copied())).is_ok()
        };
        assert!(parses(&["worker", "--etcd", "e:2379", "--run", "r"]));
        assert!(
            !parses(&["worker", "--etcd", "e:2379"]),
            "--etcd needs --run"
        );
        assert!(!parses(&[
            "worker", "--join", "h:1", "--etcd", "e:2379", "--run", "r"
        ]));
        assert!(!parses(&["worker"]), "a worker needs --join or --etcd");
        let coordinator = [
            "coordinator",
            "--listen",
            "10.0.0.1:7070",
            "--etcd",
            "e:2379",
        ];
        assert!(!parses(&coordinator), "--etcd needs the shared --run-dir");
        assert!(parses(
            &[&coordinator[..], &["--run-dir", "runs/r"]].concat()
        ));
    }

    #[test]
    fn sync_etcd_in_the_config_is_the_coordinators_etcd_and_train_refuses_it() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("run.toml");
        std::fs::write(&config, "[sync]\netcd = [\"e1:2379\", \"e2:2379\"]\n").unwrap();
        let config = config.to_str().unwrap();
        let coordinator = [
            "coordinator",
            "--listen",
            "10.0.0.1:7070",
            "--config",
            config,
        ];
        let Command::Coordinator(a) = parse(&coordinator) else {
            unreachable!()
        };
        assert_eq!(etcd_endpoints(&a).unwrap(), ["e1:2379", "e2:2379"]);
        let flag_wins = [&coordinator[..], &["--etcd", "f:2379", "--run-dir", "r"]].concat();
        let Command::Coordinator(a) = parse(&flag_wins) else {
            unreachable!()
        };
        assert_eq!(etcd_endpoints(&a).unwrap(), ["f:2379"]);
        let Command::Train(a) = parse(&["train", "--config", config]) else {
            unreachable!()
        };
        refused(cmd_train(*a), "sync.etcd in");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "nothing made"
        );
    }

    #[cfg(not(feature = "etcd"))]
    #[test]
    fn a_build_without_etcd_refuses_etcd_and_says_how_to_get_it() {
        let args = [
            "coordinator",
            "--listen",
            "10.0.0.1:7070",
            "--etcd",
            "e:2379",
            "--run-dir",
            "r",
        ];
        let Command::Coordinator(a) = parse(&args) else {
            unreachable!()
        };
        refused(cmd_coordinator(*a), "--features etcd");
    }

    #[test]
    fn a_run_needs_a_worker() {
        assert!(check_worker_count(1).is_ok());
        refused(check_worker_count(0), "--workers must be at least 1");
    }

    #[test]
    fn a_worker_cannot_run_faster_than_it_does() {
        let check =
            |factor: &str| match parse(&["worker", "--join", "h:1", "--slow-factor", factor]) {
                Command::Worker(a) => check_worker_args(&a),
                _ => unreachable!(),
            };
        assert!(check("1").is_ok() && check("4").is_ok());
        refused(check("0.5"), "--slow-factor");
        refused(check("NaN"), "--slow-factor");
    }

    #[test]
    fn sync_flags_parse_into_the_mode_and_bad_ones_name_the_key() {
        let o = |sync: &str| match parse(&["train", "--sync", sync]) {
            Command::Train(a) => overrides(&a),
            _ => unreachable!(),
        };
        assert_eq!(o("ddp").unwrap().sync, Some(SyncMode::Ddp));
        refused(o("gossip").map(|_| ()), "sync.mode");
    }
}
