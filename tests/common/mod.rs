//! Helpers shared by the integration tests.

pub mod http;
pub mod pg;
pub mod proc;

use lethe::model::{Backend, LoadOptions, WeightFormat};
use std::path::PathBuf;

/// How the tests load their models: the defaults, unless `LETHE_TEST_BACKEND` (auto, native,
/// candle) or `LETHE_TEST_WEIGHTS` (native, q8_0, f32, f16, bf16) say otherwise. `scripts/test.sh`
/// runs the engine suite a second time with `LETHE_TEST_BACKEND=candle`, the path a GPU runs.
#[allow(dead_code)]
pub fn load_options() -> LoadOptions {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let backend: Backend = var("LETHE_TEST_BACKEND").map_or(Backend::Auto, |v| v.parse().expect("LETHE_TEST_BACKEND"));
    let weights: WeightFormat =
        var("LETHE_TEST_WEIGHTS").map_or(WeightFormat::Native, |v| v.parse().expect("LETHE_TEST_WEIGHTS"));
    LoadOptions { backend, weights, ..Default::default() }
}

/// The default model (SmolLM2-135M-Instruct GGUF) if it has been fetched.
///
/// Without it, tests that need it skip their checks and say so on the terminal
/// ([`announce_skip`]), unless `LETHE_REQUIRE_MODEL=1` (set in CI), which turns a missing
/// model into a failure so the suite never passes vacuously.
#[allow(dead_code)]
pub fn default_model() -> Option<PathBuf> {
    let p = std::env::var("LETHE_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(lethe::DEFAULT_MODEL_PATH));
    if p.exists() {
        return Some(p);
    }
    if std::env::var("LETHE_REQUIRE_MODEL").is_ok_and(|v| v == "1") {
        panic!("{} is missing; run scripts/fetch-model.sh", p.display());
    }
    announce_skip(&format!("{} not found (run scripts/fetch-model.sh)", p.display()), "LETHE_REQUIRE_MODEL");
    None
}

/// A Python interpreter that can import `modules` (`LETHE_PYTHON`, else `python3`).
///
/// Without one, tests that need it are skipped with a loud message, unless
/// `LETHE_REQUIRE_PYTHON=1` (set in CI), which turns a missing interpreter or module into a
/// failure.
#[allow(dead_code)]
pub fn python_with(modules: &[&str]) -> Option<PathBuf> {
    let python = PathBuf::from(std::env::var("LETHE_PYTHON").unwrap_or_else(|_| "python3".into()));
    let check = format!("import {}", modules.join(", "));
    let ok = std::process::Command::new(&python).args(["-c", &check]).output().is_ok_and(|o| o.status.success());
    if ok {
        return Some(python);
    }
    let msg = format!("{} cannot `{check}` (scripts/test.sh sets up a venv with them)", python.display());
    if std::env::var("LETHE_REQUIRE_PYTHON").is_ok_and(|v| v == "1") {
        panic!("{msg}");
    }
    announce_skip(&msg, "LETHE_REQUIRE_PYTHON");
    None
}

/// Says loudly that a test skipped its checks. libtest captures `eprintln!` of passing tests,
/// so this writes to the process's stderr directly: plain `cargo test` shows it, and a skip
/// never passes for a pass. (`require`=1, which CI sets, turns the skip into a failure.)
#[allow(dead_code)]
pub fn announce_skip(why: &str, require: &str) {
    use std::io::Write;
    let test = std::thread::current().name().unwrap_or("a test").to_string();
    let message = format!("\n*** SKIPPED, NOT PASSED: {test}: {why}. With {require}=1 (as in CI) this fails. ***\n");
    // One write, so the line is not interleaved with libtest's own output.
    let _ = std::io::stderr().lock().write_all(message.as_bytes());
}
