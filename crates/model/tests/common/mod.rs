//! What the tests on the published SmolLM2 model share: where it lies, the prompts, and how a
//! test that cannot run says so.

use std::path::{Path, PathBuf};

pub const GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const PROMPTS: &[&str] = &[
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "<|im_start|>user\nWhat is the tallest mountain on Earth?<|im_end|>\n<|im_start|>assistant\n",
];

/// `../shared/models/smollm2-135m` beside the checkout.
pub fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/smollm2-135m")
}

/// Says that a test did not run, where a person sees it: the test harness swallows what a
/// passing test prints with `eprintln!`, but not what is written to the process's stderr.
pub fn skipped(reason: &str) {
    use std::io::Write;
    let test = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}
