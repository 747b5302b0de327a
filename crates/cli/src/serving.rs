//! `generate`, `serve`, `parity` and `bench generate`: everything that runs a trained or
//! published model rather than training one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::Args;
use holdfast_model::Tokenizer;
use holdfast_serve::sampling::argmax;
use holdfast_serve::server::{ServerOptions, serve};
use holdfast_serve::{ChatMessage, SamplingOptions, ServedModel, generate};
use holdfast_train::run;
use holdfast_train::source::TOKENIZER_CONFIG_FILE;

use crate::device;

/// What MODEL may be, for every command here.
const MODEL_HELP: &str = "a holdfast run directory, a .gguf file, or a Hugging Face directory (config.json + model.safetensors)";

#[derive(Args)]
pub struct ModelArgs {
    #[arg(help = MODEL_HELP)]
    pub model: PathBuf,
    /// tokenizer.json for a .gguf file (default: the one beside it).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// flex or ndarray (CPU), or cuda[:N] / rocm[:N] / vulkan when built with that feature.
    /// A .gguf on flex (the default) is mapped and run in its block formats on the CPU's
    /// cores; on any other device it is dequantized to f32 there.
    #[arg(long, default_value = "flex")]
    pub device: String,
    /// Run a .gguf as f32 tensors on --device (the training decoder) rather than in its
    /// block formats.
    #[arg(long)]
    pub dequantize: bool,
}

impl ModelArgs {
    /// Where MODEL runs: None maps a .gguf and runs its blocks on the CPU's cores.
    pub fn placement(&self) -> Result<Option<Device>> {
        let gguf = holdfast_model::is_gguf(&self.model);
        if self.dequantize && !gguf {
            bail!(
                "--dequantize applies to a .gguf model; {} is not one",
                self.model.display()
            );
        }
        let host = matches!(self.device.as_str(), "flex" | "cpu");
        if gguf && host && !self.dequantize {
            return Ok(None);
        }
        Ok(Some(device::parse(&self.device)?))
    }

    pub fn load(&self) -> Result<ServedModel> {
        load_model(
            &self.model,
            self.tokenizer.as_deref(),
            self.placement()?.as_ref(),
        )
    }
}

/// Loads MODEL: a holdfast run (latest valid checkpoint) or a published model, onto `device`
/// (None: a .gguf mapped, anything else on the CPU).
pub fn load_model(
    path: &Path,
    tokenizer: Option<&Path>,
    device: Option<&Device>,
) -> Result<ServedModel> {
    if path.join(run::CONFIG_FILE).is_file() {
        let device = device.cloned().unwrap_or_else(Device::flex);
        let device = &device;
        let (_, loaded) = holdfast_train::rundir::load_run(path, device)?;
        for w in &loaded.warnings {
            eprintln!("warning: {w}");
        }
        let tok = match tokenizer
            .map(Path::to_path_buf)
            .or_else(|| run::run_tokenizer(path))
        {
            Some(p) => Tokenizer::from_file(&p)?,
            None => Tokenizer::Bytes,
        };
        let id = path
            .file_name()
            .map_or("model".into(), |n| n.to_string_lossy().into_owned());
        let mut model = ServedModel::new(id, loaded.state.weights, tok, device.clone());
        // A fine-tuned run keeps its source model's chat template and special tokens.
        model.complete_from_tokenizer_config(&path.join(TOKENIZER_CONFIG_FILE))?;
        return Ok(model);
    }
    ServedModel::load(path, tokenizer, device)
        .with_context(|| format!("loading {}", path.display()))
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 200)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Stop before this text (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn cmd_generate(args: GenerateArgs) -> Result<()> {
    let model = args.model.load()?;
    if !(args.temperature >= 0.0 && args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--temperature must be ≥ 0 and --top-p in (0, 1]");
    }
    let prompt = if args.chat {
        model.chat_ids(&[ChatMessage {
            role: "user".into(),
            content: args.prompt.clone(),
        }])?
    } else {
        model.prompt_ids(&args.prompt)?
    };
    if prompt.is_empty() {
        bail!("--prompt is empty");
    }
    if prompt.len() >= model.context() {
        bail!(
            "--prompt is {} tokens; the model's context is {}",
            prompt.len(),
            model.context()
        );
    }
    let opts = SamplingOptions {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        max_new_tokens: args.max_tokens,
        seed: args.seed,
        stop: args.stop,
        stop_tokens: model.stop_tokens.clone(),
    };
    let mut stdout = std::io::stdout().lock();
    if !args.chat {
        write!(stdout, "{}", args.prompt)?;
    }
    generate(&model, &prompt, &opts, |piece| {
        let _ = write!(stdout, "{piece}");
        stdout.flush().is_ok()
    })?;
    writeln!(stdout)?;
    Ok(())
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on (port 0 picks a free one; the address is printed).
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: String,
    /// Require `Authorization: Bearer <key>` (default: $HOLDFAST_API_KEY when set).
    #[arg(long, env = "HOLDFAST_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Requests admitted at once, running plus queued; more get 429.
    #[arg(long, default_value_t = 16)]
    pub max_pending: usize,
    /// Requests generated together, one batched forward per token (continuous batching).
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
}

pub fn cmd_serve(args: ServeArgs) -> Result<()> {
    if args.max_pending == 0 || args.max_batch == 0 {
        bail!("--max-pending and --max-batch must be at least 1");
    }
    let model = args.model.load()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("--listen {}", args.listen))?;
        eprintln!(
            "serving '{}' (context {}, {}) on http://{}",
            model.id,
            model.context(),
            model.engine.describe(),
            listener.local_addr()?
        );
        let options = ServerOptions {
            api_key: args.api_key,
            max_pending: args.max_pending,
            max_batch: args.max_batch,
        };
        serve(listener, model, options).await?;
        eprintln!("server stopped");
        Ok(())
    })
}

#[derive(Args)]
pub struct ParityArgs {
    #[arg(help = MODEL_HELP)]
    pub model: PathBuf,
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Two backends, comma-separated (e.g. flex,ndarray); `mapped` is a .gguf run in its
    /// block formats (8-bit activations) on the CPU's cores.
    #[arg(long, default_value = "flex,ndarray")]
    pub backends: String,
    /// Prompts to compare on (repeatable; default: three built-in ones).
    #[arg(long)]
    pub prompt: Vec<String>,
    /// Fail (exit 1) when max |Δlogit| exceeds this.
    #[arg(long, default_value_t = 1e-3)]
    pub tolerance: f32,
}

const PARITY_PROMPTS: &[&str] = &[
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "To be, or not to be, that is the question:",
];

pub fn cmd_parity(args: ParityArgs) -> Result<()> {
    let backends: Vec<&str> = args.backends.split(',').map(str::trim).collect();
    let [a, b] = backends[..] else {
        bail!(
            "--backends {}: give exactly two, e.g. flex,ndarray",
            args.backends
        );
    };
    let models = [a, b]
        .iter()
        .map(|&name| {
            let device = match name {
                "mapped" if holdfast_model::is_gguf(&args.model) => None,
                "mapped" => bail!("--backends mapped needs a .gguf model"),
                name => Some(device::parse(name)?),
            };
            load_model(&args.model, args.tokenizer.as_deref(), device.as_ref())
        })
        .collect::<Result<Vec<_>>>()?;
    let prompts: Vec<String> = if args.prompt.is_empty() {
        PARITY_PROMPTS.iter().map(|s| s.to_string()).collect()
    } else {
        args.prompt.clone()
    };
    let vocab = models[0].engine.config().vocab_size;
    let (mut worst, mut positions, mut agree) = (0.0f32, 0usize, 0usize);
    for text in &prompts {
        let mut ids = models[0].tokenizer.encode(text)?;
        ids.truncate(models[0].context());
        if ids.is_empty() {
            bail!("--prompt {text:?} has no tokens");
        }
        let la = models[0].engine.all_logits(&ids)?;
        let lb = models[1].engine.all_logits(&ids)?;
        let diff = la
            .iter()
            .zip(&lb)
            // A NaN on either side is a mismatch, not something `max` may skip.
            .map(|(x, y)| (x - y).abs())
            .map(|d| if d.is_nan() { f32::INFINITY } else { d })
            .fold(0.0f32, f32::max);
        let same_top1 = la
            .chunks(vocab)
            .zip(lb.chunks(vocab))
            .filter(|(x, y)| argmax(x) == argmax(y))
            .count();
        println!(
            "{text:?}: {} positions, max |Δlogit| {diff:.3e}, top-1 agreement {same_top1}/{}",
            ids.len(),
            ids.len()
        );
        worst = worst.max(diff);
        positions += ids.len();
        agree += same_top1;
    }
    println!(
        "{a} vs {b}: max |Δlogit| {worst:.3e}, top-1 agreement {agree}/{positions} ({:.1}%)",
        100.0 * agree as f64 / positions as f64
    );
    if worst > args.tolerance {
        bail!(
            "max |Δlogit| {worst:.3e} exceeds --tolerance {:.1e}",
            args.tolerance
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct BenchGenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt length in tokens (Tiny-Shakespeare-like text is synthesized by repetition).
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Timed repetitions; the best is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Sequences generating together (batched decoding: one forward per step for all of
    /// them, as the server runs concurrent requests); each prompt is processed on its own.
    #[arg(long, default_value_t = 1)]
    pub sequences: usize,
}

/// Prompt processing and generation tokens/s (greedy, KV cache, `--sequences` decoding
/// together) and peak RSS.
pub fn cmd_bench_generate(args: BenchGenerateArgs) -> Result<()> {
    let start = Instant::now();
    let model = args.model.load()?;
    let load_s = start.elapsed().as_secs_f64();
    if args.prompt_tokens == 0 || args.new_tokens == 0 || args.repeats == 0 || args.sequences == 0 {
        bail!("--prompt-tokens, --new-tokens, --repeats and --sequences must be at least 1");
    }
    if args.prompt_tokens + args.new_tokens > model.context() {
        bail!(
            "--prompt-tokens + --new-tokens = {} exceeds the context {}",
            args.prompt_tokens + args.new_tokens,
            model.context()
        );
    }
    let seed_text = "First Citizen: Before we proceed any further, hear me speak. ";
    let mut prompt = Vec::new();
    while prompt.len() < args.prompt_tokens {
        prompt.extend(model.tokenizer.encode(seed_text)?);
    }
    prompt.truncate(args.prompt_tokens);
    let engine = &model.engine;
    let cfg = engine.config();
    let (mut best_prefill, mut best_decode) = (f64::INFINITY, f64::INFINITY);
    // One extra pass first warms caches and allocators; every pass counts toward the best.
    for _ in 0..args.repeats + 1 {
        let mut caches: Vec<_> = (0..args.sequences).map(|_| engine.new_cache()).collect();
        let t0 = Instant::now();
        let mut next = Vec::with_capacity(args.sequences);
        for cache in &mut caches {
            next.push(argmax(&engine.next_logits(cache, &prompt)?));
        }
        let prefill = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        for _ in 0..args.new_tokens {
            let tokens: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
            let mut steps: Vec<_> = caches
                .iter_mut()
                .zip(&tokens)
                .map(|(cache, token)| (cache, &token[..]))
                .collect();
            next = engine
                .next_logits_batch(&mut steps)?
                .iter()
                .map(|logits| argmax(logits))
                .collect();
        }
        let decode = t1.elapsed().as_secs_f64();
        best_prefill = best_prefill.min(prefill);
        best_decode = best_decode.min(decode);
    }
    let sequences = args.sequences as f64;
    let report = serde_json::json!({
        "model": model.id,
        "params": cfg.num_params(),
        "device": args.model.device,
        "engine": engine.describe(),
        "threads": run::compute_threads(),
        "load_s": load_s,
        "prompt_tokens": args.prompt_tokens,
        "prompt_tokens_per_s": sequences * args.prompt_tokens as f64 / best_prefill,
        "new_tokens": args.new_tokens,
        "sequences": args.sequences,
        "generate_tokens_per_s": sequences * args.new_tokens as f64 / best_decode,
        "peak_rss_bytes": run::peak_rss_bytes(),
    });
    println!("{report}");
    Ok(())
}
