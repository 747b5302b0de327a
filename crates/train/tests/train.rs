//! Training behaviour users rely on: loss goes down, resume is bit-exact, runs are
//! deterministic, damaged checkpoints are caught, data splits never leak.

use burn::tensor::Device;
use holdfast_model::ModelConfig;
use holdfast_train::config::TrainSection;
use holdfast_train::data::{AdditionTask, Dataset, Split, TextData, read_text, resolve_data_files};
use holdfast_train::{RunConfig, TrainState, train_step};
use holdfast_train::{checkpoint, run};

fn tiny() -> ModelConfig {
    ModelConfig::preset("tiny").unwrap()
}

fn hyper(steps: u64, batch_size: usize, grad_accum: usize) -> TrainSection {
    TrainSection {
        steps,
        batch_size,
        grad_accum,
        warmup_steps: 10,
        ..TrainSection::default()
    }
}

fn addition() -> Dataset {
    Dataset::Addition(AdditionTask::new(3))
}

/// Bit patterns of every weight and moment, in canonical order.
fn state_bits(s: &TrainState) -> (Vec<u32>, Vec<u32>) {
    let bits = |ts: Vec<holdfast_model::HostTensor>| {
        ts.into_iter()
            .flat_map(|t| t.data.into_iter().map(f32::to_bits))
            .collect::<Vec<u32>>()
    };
    (bits(s.weights.to_host()), bits(s.optimizer_host()))
}

#[test]
fn loss_goes_down_on_the_addition_task() {
    let device = Device::flex();
    let h = hyper(300, 32, 1);
    let data = addition();
    let mut state = TrainState::new(&tiny(), 1, &device);
    let mut losses = Vec::new();
    while state.step < h.steps {
        losses.push(train_step(&mut state, &data, &h).loss);
    }
    let first = losses[0];
    let last: f64 = losses[losses.len() - 20..].iter().sum::<f64>() / 20.0;
    // ln(256) ≈ 5.5 at the start; predicting the answer digits' distribution alone gives ~2.1.
    assert!(first > 5.0, "initial loss {first}");
    assert!(
        last < 1.9,
        "loss after 300 steps is {last} (started at {first})"
    );
}

#[test]
fn resume_is_bit_exact() {
    let device = Device::flex();
    let h = hyper(8, 8, 2);
    let data = addition();
    let run = RunConfig::default();

    let mut straight = TrainState::new(&tiny(), 5, &device);
    for _ in 0..8 {
        train_step(&mut straight, &data, &h);
    }

    let dir = tempfile::tempdir().unwrap();
    let mut first_half = TrainState::new(&tiny(), 5, &device);
    for _ in 0..4 {
        train_step(&mut first_half, &data, &h);
    }
    let saved = checkpoint::save(dir.path(), &first_half, &run, 3).unwrap();
    drop(first_half);
    let (mut resumed, manifest) = checkpoint::load_dir(&saved, &device).unwrap();
    assert_eq!(manifest.step, 4);
    for _ in 0..4 {
        train_step(&mut resumed, &data, &h);
    }

    assert_eq!(resumed.step, straight.step);
    assert_eq!(resumed.cursor, straight.cursor);
    assert_eq!(resumed.opt.t, straight.opt.t);
    let (w_a, m_a) = state_bits(&straight);
    let (w_b, m_b) = state_bits(&resumed);
    assert!(w_a == w_b, "weights differ after resume");
    assert!(m_a == m_b, "optimizer moments differ after resume");
    // And the files themselves: a checkpoint of each is byte-identical.
    let da = tempfile::tempdir().unwrap();
    let db = tempfile::tempdir().unwrap();
    let pa = checkpoint::save(da.path(), &straight, &run, 1).unwrap();
    let pb = checkpoint::save(db.path(), &resumed, &run, 1).unwrap();
    for f in [
        "model.safetensors",
        "optimizer.safetensors",
        "manifest.json",
    ] {
        assert_eq!(
            std::fs::read(pa.join(f)).unwrap(),
            std::fs::read(pb.join(f)).unwrap(),
            "{f}"
        );
    }
}

/// The production loop (`run::train`, guards on, checkpoints written by its background
/// writer) stopped halfway and resumed from its own checkpoint ends bit-identical to a run
/// that did not stop.
#[test]
fn the_training_loop_resumes_bit_exactly_from_its_own_checkpoint() {
    let device = Device::flex();
    let data = addition();
    let cfg = |steps| RunConfig {
        train: TrainSection {
            checkpoint_every: 4,
            eval_every: 100,
            eval_batches: 1,
            ..hyper(steps, 8, 2)
        },
        ..Default::default()
    };
    let trained = |run_dir: &std::path::Path, c: &RunConfig, state: &mut TrainState| {
        let faults = Default::default();
        run::train(run_dir, c, &data, state, &faults, &mut |_| {}).unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("straight"), dir.path().join("stopped"));
    for d in [&a, &b] {
        std::fs::create_dir(d).unwrap();
    }
    let mut straight = TrainState::new(&tiny(), 5, &device);
    trained(&a, &cfg(8), &mut straight);

    let mut first_half = TrainState::new(&tiny(), 5, &device);
    trained(&b, &cfg(4), &mut first_half);
    drop(first_half);
    let mut resumed = checkpoint::load_latest(&b, &device).unwrap().state;
    assert_eq!(resumed.step, 4);
    let summary = trained(&b, &cfg(8), &mut resumed);
    assert_eq!(summary.steps, 4);
    assert_eq!(
        (resumed.step, resumed.cursor),
        (straight.step, straight.cursor)
    );
    assert!(
        state_bits(&resumed) == state_bits(&straight),
        "state differs after resume"
    );
}

#[test]
fn same_seed_same_weights_other_seed_other_weights() {
    let device = Device::flex();
    let h = hyper(3, 8, 1);
    let data = addition();
    let run = |seed| {
        let mut s = TrainState::new(&tiny(), seed, &device);
        for _ in 0..3 {
            train_step(&mut s, &data, &h);
        }
        state_bits(&s)
    };
    assert!(run(9) == run(9));
    assert!(run(9) != run(10));
}

fn flip_byte(path: &std::path::Path, offset_from_end: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = bytes.len() - offset_from_end;
    bytes[i] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

fn run_with_two_checkpoints() -> (tempfile::TempDir, TrainState) {
    let device = Device::flex();
    let h = hyper(4, 4, 1);
    let data = addition();
    let dir = tempfile::tempdir().unwrap();
    let mut s = TrainState::new(&tiny(), 2, &device);
    for step in 1..=4 {
        train_step(&mut s, &data, &h);
        if step % 2 == 0 {
            checkpoint::save(dir.path(), &s, &RunConfig::default(), 5).unwrap();
        }
    }
    (dir, s)
}

#[test]
fn corrupt_latest_checkpoint_is_named_and_the_previous_one_used() {
    let device = Device::flex();
    let (dir, _) = run_with_two_checkpoints();
    let latest = dir.path().join("checkpoints/step-00000004");
    flip_byte(&latest.join("model.safetensors"), 10);
    assert_fell_back_to_step_2(dir.path(), &device, "model.safetensors is corrupt");
}

/// The newest checkpoint (step 4) was passed over, named with `why`, and step 2 loaded.
fn assert_fell_back_to_step_2(run: &std::path::Path, device: &Device, why: &str) {
    let loaded = checkpoint::load_latest(run, device).unwrap();
    assert_eq!(loaded.state.step, 2);
    assert_eq!(loaded.warnings.len(), 1);
    let w = &loaded.warnings[0];
    assert!(w.contains("step-00000004") && w.contains(why), "{w}");
}

#[test]
fn truncated_checkpoint_is_reported() {
    let device = Device::flex();
    let (dir, _) = run_with_two_checkpoints();
    let opt = dir
        .path()
        .join("checkpoints/step-00000004/optimizer.safetensors");
    let bytes = std::fs::read(&opt).unwrap();
    std::fs::write(&opt, &bytes[..bytes.len() / 2]).unwrap();
    let loaded = checkpoint::load_latest(dir.path(), &device).unwrap();
    assert_eq!(loaded.state.step, 2);
    assert!(
        loaded.warnings[0].contains("optimizer.safetensors is truncated"),
        "{:?}",
        loaded.warnings
    );

    // With every checkpoint damaged, loading fails and names each.
    flip_byte(
        &dir.path().join("checkpoints/step-00000002/manifest.json"),
        3,
    );
    let err = checkpoint::load_latest(dir.path(), &device)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("no valid checkpoint")
            && err.contains("step-00000002")
            && err.contains("step-00000004"),
        "{err}"
    );
}

#[test]
fn a_manifest_edited_in_place_is_caught_by_its_own_checksum() {
    let device = Device::flex();
    let (dir, _) = run_with_two_checkpoints();
    let manifest = dir.path().join("checkpoints/step-00000004/manifest.json");
    // Still valid JSON, still a plausible manifest: only its checksum can tell.
    let text = std::fs::read_to_string(&manifest).unwrap();
    let edited = text.replacen("\"next_sample\": 16", "\"next_sample\": 17", 1);
    assert_ne!(text, edited);
    std::fs::write(&manifest, edited).unwrap();
    assert_fell_back_to_step_2(dir.path(), &device, "manifest.json is corrupt");
}

#[test]
fn resaving_a_step_replaces_it_whole_and_leaves_nothing_behind() {
    let device = Device::flex();
    let (dir, mut s) = run_with_two_checkpoints();
    train_step(&mut s, &addition(), &hyper(10, 4, 1));
    s.step = 4;
    checkpoint::save(dir.path(), &s, &RunConfig::default(), 5).unwrap();
    let loaded = checkpoint::load_latest(dir.path(), &device).unwrap();
    assert_eq!(state_bits(&loaded.state), state_bits(&s), "the new copy");
    let mut names: Vec<String> = std::fs::read_dir(dir.path().join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["step-00000002", "step-00000004"]);
}

#[test]
fn a_damaged_token_cache_is_detected_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let tok = holdfast_model::Tokenizer::Bytes;
    let text = "to be, or not to be";
    let ids = holdfast_train::data::tokenize_cached(text, &tok, dir.path()).unwrap();
    let cache = std::fs::read_dir(dir.path())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    flip_byte(&cache, 4);
    let again = holdfast_train::data::tokenize_cached(text, &tok, dir.path()).unwrap();
    assert_eq!(again, ids, "the damaged cache was used");
    let rebuilt = holdfast_train::data::tokenize_cached(text, &tok, dir.path()).unwrap();
    assert_eq!(rebuilt, ids);
}

#[test]
fn half_written_checkpoint_is_ignored_and_old_ones_pruned() {
    let device = Device::flex();
    let (dir, state) = run_with_two_checkpoints();
    // A crash mid-save leaves only a temporary directory: it is never taken for a checkpoint.
    let tmp = dir.path().join("checkpoints/.tmp-step-00000006-999");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("model.safetensors"), b"partial").unwrap();
    assert_eq!(
        checkpoint::load_latest(dir.path(), &device)
            .unwrap()
            .state
            .step,
        4
    );

    let mut s = state;
    let h = hyper(10, 4, 1);
    for _ in 0..3 {
        train_step(&mut s, &addition(), &h);
        checkpoint::save(dir.path(), &s, &RunConfig::default(), 2).unwrap();
    }
    let steps: Vec<u64> = checkpoint::list(dir.path()).iter().map(|c| c.0).collect();
    assert_eq!(steps, vec![7, 6]);
}

#[test]
fn held_out_additions_are_never_trained_on() {
    let task = AdditionTask::new(3);
    for i in 0..20_000 {
        let (a, b) = task.operands(Split::Train, 1337, i);
        assert!(!task.is_held_out(a, b));
    }
    for i in 0..500 {
        let (a, b) = task.operands(Split::Val, 0, i);
        assert!(task.is_held_out(a, b));
    }
    assert_eq!(task.prompt(7, 45), "700+540=");
    assert_eq!(task.answer(999, 1), "0001\n");
    assert_eq!(task.answer(12, 345), "7530\n");
}

#[test]
fn sampler_is_a_pure_function_and_workers_get_disjoint_rows() {
    let data = addition();
    let a = data.batch(Split::Train, 3, 100, 16);
    let b = data.batch(Split::Train, 3, 100, 16);
    assert_eq!(a, b);
    let cursor = holdfast_train::data::DataCursor { next_sample: 64 };
    let w0 = cursor.micro_batch_start(0, 0, 2, 16);
    let w1 = cursor.micro_batch_start(0, 1, 2, 16);
    let w0m1 = cursor.micro_batch_start(1, 0, 2, 16);
    assert_eq!([w0, w1, w0m1], [64, 80, 96]);
    let mut c = cursor;
    c.advance(16, 2, 2);
    assert_eq!(c.next_sample, 64 + 64);
}

#[test]
fn text_inputs_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("empty.txt"), b"").unwrap();
    std::fs::write(p("bin.dat"), [0x7f, b'E', b'L', b'F', 0, 1, 2]).unwrap();
    std::fs::write(p("latin1.txt"), [b'c', b'a', b'f', 0xe9]).unwrap();
    std::fs::write(p("ok.txt"), "hello world").unwrap();
    let err = |files: &[&str]| {
        let paths: Vec<_> = files.iter().map(|f| p(f)).collect();
        read_text(&paths).unwrap_err().to_string()
    };
    assert!(err(&["empty.txt"]).contains("empty.txt is empty"));
    assert!(err(&["bin.dat"]).contains("looks binary"));
    assert!(err(&["latin1.txt"]).contains("not UTF-8"));
    let missing = p("nope.txt").display().to_string();
    assert!(
        resolve_data_files(&missing)
            .unwrap_err()
            .to_string()
            .contains("no such file")
    );
    let glob = p("*.none").display().to_string();
    assert!(
        resolve_data_files(&glob)
            .unwrap_err()
            .to_string()
            .contains("matches no file")
    );
    assert_eq!(
        resolve_data_files(&p("*.txt").display().to_string())
            .unwrap()
            .len(),
        3
    );
    let short = TextData::new(vec![1; 40], 0.1, 32)
        .err()
        .unwrap()
        .to_string();
    assert!(short.contains("validation split has 4 tokens"), "{short}");
}

#[test]
fn config_values_are_validated_by_name() {
    let check = |edit: &dyn Fn(&mut RunConfig), needle: &str| {
        let mut cfg = RunConfig::default();
        edit(&mut cfg);
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains(needle), "{e} should mention {needle}");
    };
    check(&|c| c.train.lr = -0.1, "train.lr = -0.1");
    check(&|c| c.train.batch_size = 0, "train.batch_size = 0");
    check(&|c| c.model.context = Some(0), "model.context = 0");
    check(&|c| c.model.preset = "nope".into(), "unknown preset 'nope'");
    check(
        &|c| c.data.task = holdfast_train::config::Task::Text,
        "data.path",
    );
    check(
        &|c| c.sync.etcd = vec!["10.0.0.1:2379".into(), "no-port".into()],
        "sync.etcd = 'no-port'",
    );
    let mut endpoints = RunConfig::default();
    endpoints.sync.etcd = vec!["10.0.0.1:2379".into(), "http://etcd-2:2379".into()];
    endpoints.validate().unwrap();
    let err = toml::from_str::<RunConfig>("[train]\nlearning_rate = 1.0\n").unwrap_err();
    assert!(err.to_string().contains("learning_rate"), "{err}");
}

/// A checkpoint to fuzz copies of, made once.
fn fuzz_source() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let s = TrainState::new(&tiny(), 2, &Device::flex());
        checkpoint::save(dir.path(), &s, &RunConfig::default(), 1).unwrap();
        dir
    })
    .path()
}

use proptest::prelude::Strategy as _;

/// Fields of a manifest a crafted file could set, by JSON pointer.
const MANIFEST_FIELDS: &[&str] = &[
    "/format_version",
    "/step",
    "/cursor/next_sample",
    "/optimizer_steps",
    "/rng/seed",
    "/model/vocab_size",
    "/model/hidden_size",
    "/model/intermediate_size",
    "/model/num_hidden_layers",
    "/model/num_attention_heads",
    "/model/num_key_value_heads",
    "/model/max_position_embeddings",
    "/model/rope_theta",
    "/files/model.safetensors/bytes",
    "/run/train/batch_size",
];

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// A manifest edited by hand or by a bad disk — and re-checksummed, so the parser sees it —
    /// loads or is refused with a message, never a panic.
    #[test]
    fn fuzz_a_crafted_manifest_is_loaded_or_refused(
        field in proptest::sample::select(MANIFEST_FIELDS),
        value in proptest::prop_oneof![
            proptest::prelude::Just(serde_json::json!(0)),
            proptest::prelude::Just(serde_json::json!(u64::MAX)),
            proptest::prelude::Just(serde_json::json!(-1)),
            proptest::prelude::Just(serde_json::json!(1e300)),
            proptest::prelude::Just(serde_json::json!("x")),
            proptest::prelude::Just(serde_json::Value::Null),
            proptest::prelude::any::<u32>().prop_map(|v| serde_json::json!(v)),
        ],
        edits in proptest::collection::vec(
            (proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()),
            0..3,
        ),
    ) {
        let src = std::fs::read_dir(fuzz_source().join("checkpoints")).unwrap().next().unwrap().unwrap().path();
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("checkpoints").join(src.file_name().unwrap());
        std::fs::create_dir_all(&dst).unwrap();
        for e in std::fs::read_dir(&src).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
        let text = std::fs::read(dst.join("manifest.json")).unwrap();
        let mut m: serde_json::Value = serde_json::from_slice(&text).unwrap();
        if let Some(slot) = m.pointer_mut(field) {
            *slot = value;
        }
        let mut bytes = serde_json::to_vec_pretty(&m).unwrap();
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        std::fs::write(dst.join("manifest.json"), &bytes).unwrap();
        std::fs::write(dst.join("manifest.blake3"), blake3::hash(&bytes).to_hex().as_bytes()).unwrap();
        let _ = checkpoint::load_latest(dir.path(), &Device::flex());
    }
}

/// A DiLoCo checkpoint keeps every worker's own state, verified like the rest of it.
#[test]
fn a_checkpoint_keeps_each_workers_own_state_and_checks_it() {
    use holdfast_train::checkpoint::{ClusterExtras, ClusterPosition};
    use holdfast_train::replica::OwnState;
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    let mut s = TrainState::new(&tiny(), 2, &device);
    let n = tiny().num_params();
    let extras = ClusterExtras {
        position: ClusterPosition {
            next_round: 1,
            next_fresh_batch: 3,
            pending_batches: vec![],
            state_blake3: None,
        },
        outer_velocity: vec![0.0; n],
        workers: vec![OwnState {
            name: "worker-1".into(),
            exp_avg: vec![0.5; n],
            exp_avg_sq: vec![0.25; n],
            adam_t: 20,
            local: None,
            residuals: vec![vec![0.125; n]],
        }],
    };
    for step in [2, 4] {
        s.step = step;
        checkpoint::save_with(dir.path(), &s, &RunConfig::default(), 5, Some(&extras)).unwrap();
    }
    let loaded = checkpoint::load_latest(dir.path(), &device).unwrap();
    assert_eq!(loaded.cluster.as_ref(), Some(&extras));
    flip_byte(
        &dir.path()
            .join("checkpoints/step-00000004/workers.safetensors"),
        10,
    );
    assert_fell_back_to_step_2(dir.path(), &device, "workers.safetensors is corrupt");
}
