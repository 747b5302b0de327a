//! The serving decoder on a mapped GGUF against the training decoder on the same weights
//! dequantized to f32, for files written here in every supported format (always run) and for
//! SmolLM2-135M-Instruct Q4_1 (needs `../shared/models/smollm2-135m`; skips, saying so,
//! where it is absent).

use std::path::{Path, PathBuf};

use holdfast_model::gguf_out::llama_writer;
use holdfast_model::host::{MappedModel, Sequence, Step};
use holdfast_model::quant::{Format, PackedMatrix};
use holdfast_model::{
    KvCache, Logits, ModelConfig, Tokenizer, Weights, forward_cached, load_gguf, token_batch,
};

mod common;
use common::{GGUF, PROMPTS, model_dir, skipped};

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .map(|d| if d.is_nan() { f32::INFINITY } else { d })
        .fold(0.0, f32::max)
}

/// Block-friendly widths (every matrix width a multiple of 32), untied output.
fn small_config() -> ModelConfig {
    ModelConfig {
        vocab_size: 256,
        hidden_size: 64,
        intermediate_size: 192,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 96,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: false,
    }
}

fn write_model(dir: &Path, cfg: &ModelConfig, format: Format) -> PathBuf {
    let weights = Weights::init(cfg, 7, &Default::default());
    let mut host = weights.to_host();
    // Initial weights are tiny; scaled up, the logits spread as a trained model's do.
    for t in &mut host {
        if t.shape.len() == 2 {
            t.data.iter_mut().for_each(|v| *v *= 20.0);
        }
    }
    let bytes = llama_writer(cfg, &host, format, "test").unwrap().to_bytes();
    let path = dir.join(format!("{format:?}.gguf"));
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Logits after each step on the training decoder: `prompt`, then each of `next` (or, where
/// `next` runs out before `steps`, the greedy choice).
fn f32_logits(path: &Path, prompt: &[u32], next: &[u32]) -> Vec<Vec<f32>> {
    f32_decode(path, prompt, next, next.len()).1
}

fn f32_decode(
    path: &Path,
    prompt: &[u32],
    next: &[u32],
    steps: usize,
) -> (Vec<u32>, Vec<Vec<f32>>) {
    let device = Default::default();
    let m = load_gguf(path, &device).unwrap();
    let mut cache = KvCache::new();
    let mut out = Vec::new();
    let mut tokens = Vec::new();
    let mut input = prompt.to_vec();
    for step in 0..=steps {
        let logits = forward_cached(
            &m.weights.cfg,
            &m.weights.tensors,
            token_batch(&input, &device),
            &mut cache,
            Logits::Last,
        );
        out.push(
            logits
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap(),
        );
        let token = next
            .get(step)
            .copied()
            .unwrap_or_else(|| argmax(out.last().unwrap()));
        tokens.push(token);
        input = vec![token];
    }
    tokens.pop();
    (tokens, out)
}

fn mapped_logits(model: &MappedModel, prompt: &[u32], next: &[u32]) -> Vec<Vec<f32>> {
    let mut seq = Sequence::new();
    std::iter::once(prompt.to_vec())
        .chain(next.iter().map(|&t| vec![t]))
        .map(|input| {
            let step = Step {
                sequence: &mut seq,
                tokens: &input,
            };
            model.forward(&mut [step]).unwrap().remove(0)
        })
        .collect()
}

/// The decoder's structure (rotary layout, attention, norms, the cache) and its reading of
/// every format: in f32 throughout, the mapped decoder must give the training decoder's
/// logits. (The 8-bit activations the block formats use by default are checked in the
/// kernels' own tests against the dequantized reference, and on a published model below.)
#[test]
fn mapped_decoding_matches_the_f32_decoder_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config();
    // 40 prompt tokens take the expanded-f32 product; the steps after, the row kernels.
    let prompt: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % 256).collect();
    let next: Vec<u32> = (0..12).map(|i| (i * 53 + 5) % 256).collect();
    for format in [
        Format::F32,
        Format::F16,
        Format::Q8_0,
        Format::Q4_0,
        Format::Q4_1,
    ] {
        let path = write_model(dir.path(), &cfg, format);
        let want = f32_logits(&path, &prompt, &next);
        let mut model = MappedModel::open(&path).unwrap();
        if !matches!(format, Format::F32 | Format::F16) {
            model = model.with_f32_activations();
        }
        let got = mapped_logits(&model, &prompt, &next);
        for (step, (w, g)) in want.iter().zip(&got).enumerate() {
            let range = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = max_diff(w, g);
            // f32 sums in another order: a few ulps of the logits' range.
            assert!(
                d <= 1e-4 * range,
                "{format:?} step {step}: max |Δlogit| {d} of {range}"
            );
        }
    }
}

#[test]
fn block_matrices_are_packed_where_the_cpu_has_the_tiled_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config();
    let tiled = PackedMatrix::available();
    if !tiled {
        println!("tiled kernel: this CPU lacks AVX-512 VNNI; checking that nothing is packed");
    }
    for format in [Format::Q4_1, Format::Q8_0, Format::F16] {
        let dir = dir.path().join(format!("{format:?}"));
        std::fs::create_dir_all(&dir).unwrap();
        let model = MappedModel::open(&write_model(&dir, &cfg, format)).unwrap();
        // Seven matrices a layer and the output projection.
        let blocks = format != Format::F16;
        let want = if tiled && blocks {
            7 * cfg.num_hidden_layers + 1
        } else {
            0
        };
        assert_eq!(model.packed_matrices(), want, "{format:?}");
        assert_eq!(
            model.with_f32_activations().packed_matrices(),
            0,
            "{format:?}"
        );
    }
}

#[test]
fn a_written_gguf_reads_back_as_the_weights_written() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config();
    let path = write_model(dir.path(), &cfg, Format::F32);
    let back = load_gguf(&path, &Default::default()).unwrap();
    let mut written = Weights::init(&cfg, 7, &Default::default()).to_host();
    for t in &mut written {
        if t.shape.len() == 2 {
            t.data.iter_mut().for_each(|v| *v *= 20.0);
        }
    }
    let read = back.weights.to_host();
    assert_eq!(read.len(), written.len());
    for (a, b) in written.iter().zip(&read) {
        assert_eq!(a.name, b.name);
        assert_eq!(a.shape, b.shape);
        assert!(a.data == b.data, "{} differs", a.name);
    }
    let eps = cfg.rms_norm_eps as f32 as f64;
    assert_eq!(
        back.config,
        ModelConfig {
            rms_norm_eps: eps,
            ..cfg
        }
    );
}

/// Whatever shares its forward, a sequence gets the bits it gets alone: here a 40-token prompt
/// (which takes f32 products, or the packed tiles where the CPU has them) with sixteen short
/// ones (79 rows together, past the 32 rows from which one step takes f32 products), then
/// decoding steps of all seventeen together. The batched forwards run on three threads, so
/// that the short steps split into parts of their own (three for the prompts, two for each
/// decoding step) whatever this machine's core count.
#[test]
fn batched_decoding_gives_each_sequence_what_it_gets_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), &small_config(), Format::Q4_1);
    let model = MappedModel::open(&path).unwrap();
    let mut prompts: Vec<Vec<u32>> = vec![(0..40).map(|i| (i * 7 + 3) % 256).collect()];
    prompts.extend((0..16u32).map(|k| (0..4 + k % 3).map(|i| (k * 31 + i * 5) % 256).collect()));
    let next = [10, 20, 30, 40];
    let alone: Vec<Vec<Vec<f32>>> = prompts
        .iter()
        .map(|p| mapped_logits(&model, p, &next))
        .collect();
    let three_threads = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    let mut seqs: Vec<Sequence> = prompts.iter().map(|_| Sequence::new()).collect();
    let mut inputs = prompts.clone();
    // Step 0 is the prompts; step k + 1 is `next[k]` for every sequence.
    for (step, token) in next.iter().map(Some).chain([None]).enumerate() {
        let mut steps: Vec<Step> = seqs
            .iter_mut()
            .zip(&inputs)
            .map(|(sequence, tokens)| Step { sequence, tokens })
            .collect();
        let together = three_threads.install(|| model.forward(&mut steps).unwrap());
        for (s, logits) in together.iter().enumerate() {
            assert!(logits == &alone[s][step], "sequence {s} step {step}");
        }
        if let Some(&token) = token {
            inputs = vec![vec![token]; prompts.len()];
        }
    }
}

#[test]
fn damaged_files_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), &small_config(), Format::Q8_0);
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let err = MappedModel::open(&cut)
        .err()
        .expect("a truncated file is refused");
    assert!(err.to_string().contains("runs past the end"), "{err}");
    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    assert!(MappedModel::open(&empty).is_err());
    let model = MappedModel::open(&path).unwrap();
    let mut seq = Sequence::new();
    let err = model
        .forward(&mut [Step {
            sequence: &mut seq,
            tokens: &[999],
        }])
        .expect_err("a token past the vocabulary is refused");
    assert!(err.to_string().contains("vocabulary"), "{err}");
}

/// On the published Q4_1 model, teacher-forced along the f32 decoder's own greedy path: the
/// logits stay within a bound, and wherever the f32 decoder's choice leads by more than that
/// bound, the mapped decoder makes the same choice.
#[test]
fn the_published_q4_1_model_tracks_the_f32_decoder() {
    let dir = model_dir();
    let path = dir.join(GGUF);
    if !path.is_file() {
        return skipped(&format!("{} not found", path.display()));
    }
    const BOUND: f32 = 2.5;
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let model = MappedModel::open(&path).unwrap();
    let (mut clear, mut agreed) = (0, 0);
    for prompt in PROMPTS {
        let ids = tokenizer.encode(prompt).unwrap();
        let (path_tokens, reference) = f32_decode(&path, &ids, &[], 12);
        let got = mapped_logits(&model, &ids, &path_tokens);
        for (step, (w, g)) in reference.iter().zip(&got).enumerate() {
            let d = max_diff(w, g);
            assert!(d <= BOUND, "{prompt:?} step {step}: max |Δlogit| {d}");
            let mut sorted = w.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            if sorted[0] - sorted[1] > BOUND {
                clear += 1;
                agreed += (argmax(w) == argmax(g)) as usize;
            }
        }
    }
    assert!(clear >= 10, "only {clear} clear choices to compare");
    assert_eq!(agreed, clear, "clear choices that differ");
}
