//! The `holdfast` binary as a user runs it: end to end, and every bad input a clear error with a
//! non-zero exit that leaves existing files alone.

use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::{fails_with, holdfast, skipped};

/// Asserts success without a panic (common::ok); returns stdout and stderr.
fn ok(o: Output) -> (String, String) {
    let out = common::ok(&o);
    (out, String::from_utf8_lossy(&o.stderr).into_owned())
}

/// A quick run: 12 steps of the default task, checkpoints at 6 and 12.
fn quick_train(dir: &Path, run: &str) -> (String, String) {
    ok(holdfast(
        dir,
        &[
            "train",
            "--run-dir",
            run,
            "--steps",
            "12",
            "--batch-size",
            "8",
            "--checkpoint-every",
            "6",
            "--eval-every",
            "6",
            "--no-progress",
        ],
    ))
}

/// Every file under `dir` with its bytes, for "nothing was touched" checks.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn train_eval_generate_resume_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let (out, _) = quick_train(dir.path(), "run");
    assert!(out.contains("held-out exact-match accuracy"), "{out}");
    assert!(
        out.contains("checkpoint: run/checkpoints/step-00000012"),
        "{out}"
    );
    let run = dir.path().join("run");
    assert!(run.join("config.toml").exists());
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(
        metrics
            .lines()
            .filter(|l| l.contains("\"event\":\"step\""))
            .count(),
        12
    );
    assert!(metrics.lines().any(|l| l.contains("\"val_loss\"")));
    let ckpt = run.join("checkpoints/step-00000012");
    for f in [
        "model.safetensors",
        "optimizer.safetensors",
        "config.json",
        "manifest.json",
    ] {
        assert!(ckpt.join(f).exists(), "{f}");
    }

    let (eval, _) = ok(holdfast(dir.path(), &["eval", "run"]));
    let report: serde_json::Value = serde_json::from_str(eval.trim()).unwrap();
    assert_eq!(report["step"], 12);
    assert!(report["val_loss"].as_f64().unwrap().is_finite());

    let (gen_out, _) = ok(holdfast(
        dir.path(),
        &[
            "generate",
            "run",
            "--prompt",
            "210+543=",
            "--max-tokens",
            "5",
            "--temperature",
            "0",
        ],
    ));
    assert!(gen_out.starts_with("210+543="), "{gen_out}");

    // Resume to a later step: continues from 12, not from scratch.
    let (out, err) = ok(holdfast(
        dir.path(),
        &["train", "--resume", "run", "--steps", "14", "--no-progress"],
    ));
    assert!(
        err.contains("from run/checkpoints/step-00000012 (step 12)"),
        "{err}"
    );
    assert!(out.contains("trained 2 steps"), "{out}");
    assert!(run.join("checkpoints/step-00000014").exists());
}

#[test]
fn existing_run_dir_without_resume_is_refused_and_untouched() {
    let dir = tempfile::tempdir().unwrap();
    quick_train(dir.path(), "run");
    let before = snapshot(&dir.path().join("run"));
    fails_with(
        &holdfast(dir.path(), &["train", "--run-dir", "run", "--steps", "3"]),
        "run directory run already exists; pass --resume run",
    );
    assert!(
        before == snapshot(&dir.path().join("run")),
        "run directory was modified"
    );
}

#[test]
fn bad_data_and_config_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("empty.txt"), b"").unwrap();
    std::fs::write(d.join("model.bin"), [0u8, 159, 146, 150, 0, 1]).unwrap();
    std::fs::write(
        d.join("bad_heads.json"),
        r#"{"vocab_size":256,"hidden_size":64,"intermediate_size":128,"num_hidden_layers":1,
            "num_attention_heads":5,"num_key_value_heads":5,"max_position_embeddings":32}"#,
    )
    .unwrap();
    std::fs::write(d.join("typo.toml"), "[train]\nlearnin_rate = 0.1\n").unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--data", "missing.txt"],
            "data path missing.txt: no such file",
        ),
        (&["--data", "nothing/*.txt"], "matches no file"),
        (&["--data", "empty.txt"], "empty.txt is empty"),
        (&["--data", "model.bin"], "model.bin looks binary"),
        (&["--preset", "gigantic"], "unknown preset 'gigantic'"),
        (&["--lr", "-0.001"], "train.lr = -0.001"),
        (
            &["--model-config", "bad_heads.json"],
            "num_attention_heads = 5: must divide hidden_size 64",
        ),
        (&["--context", "0"], "model.context = 0"),
        (
            &["--context", "8"],
            "model.context = 8: the 3-digit addition task needs at least 12",
        ),
        (&["--config", "typo.toml"], "unknown field `learnin_rate`"),
        (&["--config", "nope.toml"], "nope.toml"),
        (&["--device", "tpu"], "unknown device"),
    ];
    for (args, needle) in cases {
        let mut full = vec!["train", "--run-dir", "r", "--steps", "2"];
        full.extend_from_slice(args);
        fails_with(&holdfast(d, &full), needle);
        assert!(
            !d.join("r").exists(),
            "{args:?} must not create the run directory"
        );
    }
    fails_with(
        &holdfast(d, &["eval", "no-such-run"]),
        "run directory no-such-run does not exist",
    );
}

#[test]
fn damaged_checkpoints_are_named_with_fallback_or_failure() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    quick_train(d, "run");
    let latest = d.join("run/checkpoints/step-00000012/model.safetensors");
    let mut bytes = std::fs::read(&latest).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&latest, &bytes).unwrap();
    // The previous checkpoint is used, with a warning naming the damaged one.
    let (out, err) = ok(holdfast(d, &["eval", "run"]));
    assert!(
        err.contains("warning")
            && err.contains("step-00000012")
            && err.contains("model.safetensors is corrupt"),
        "{err}"
    );
    assert!(out.contains("\"step\":6"), "{out}");

    // Truncate the older one too: nothing valid is left, a clear error, no files changed.
    let older = d.join("run/checkpoints/step-00000006/optimizer.safetensors");
    let b = std::fs::read(&older).unwrap();
    std::fs::write(&older, &b[..b.len() - 100]).unwrap();
    let before = snapshot(&d.join("run"));
    fails_with(
        &holdfast(d, &["eval", "run"]),
        "optimizer.safetensors is truncated",
    );
    fails_with(
        &holdfast(d, &["train", "--resume", "run", "--steps", "20"]),
        "no valid checkpoint",
    );
    fails_with(
        &holdfast(d, &["generate", "run", "--prompt", "1"]),
        "model.safetensors is corrupt",
    );
    assert!(
        before == snapshot(&d.join("run")),
        "a failed command modified the run"
    );
}

#[test]
fn bench_prints_one_json_line_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (out, _) = ok(holdfast(
        dir.path(),
        &[
            "bench",
            "train",
            "--preset",
            "tiny",
            "--batch-size",
            "4",
            "--warmup",
            "1",
            "--steps",
            "2",
        ],
    ));
    assert_eq!(out.lines().count(), 1, "{out}");
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0);
    let expected_flops = 6.0 * r["params"].as_f64().unwrap() * r["tokens_per_s"].as_f64().unwrap();
    assert!((r["est_flop_per_s"].as_f64().unwrap() - expected_flops).abs() < 1e-6 * expected_flops);
    assert!(r["peak_rss_bytes"].as_u64().unwrap() > 0);
    assert!(r["cpu_ms_per_step"].as_f64().unwrap() > 0.0);
    // f32 weights, gradients and two AdamW moments.
    assert_eq!(
        r["train_state_bytes"].as_u64().unwrap(),
        16 * r["params"].as_u64().unwrap()
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "bench must not write files"
    );
}

#[test]
fn trains_on_tiny_shakespeare_when_available() {
    let shared =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/tinyshakespeare.txt");
    if !shared.exists() {
        skipped(&format!(
            "{} not present (../shared is absent)",
            shared.display()
        ));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = shared.canonicalize().unwrap();
    let (out, _) = ok(holdfast(
        dir.path(),
        &[
            "train",
            "--data",
            data.to_str().unwrap(),
            "--preset",
            "tiny",
            "--steps",
            "60",
            "--batch-size",
            "16",
            "--eval-every",
            "30",
            "--run-dir",
            "shakes",
            "--no-progress",
        ],
    ));
    assert!(out.contains("validation loss"), "{out}");
    let metrics = std::fs::read_to_string(dir.path().join("shakes/metrics.jsonl")).unwrap();
    let val: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["val_loss"].as_f64())
        .collect();
    assert!(val.len() >= 2, "{metrics}");
    assert!(
        val[val.len() - 1] < 5.0 && val[val.len() - 1] < val[0],
        "validation loss {val:?}"
    );
    // The tokenized corpus is cached beside the run, keyed by content.
    assert!(
        dir.path()
            .join(".holdfast-token-cache")
            .read_dir()
            .unwrap()
            .count()
            == 1
    );
}
