//! Helpers shared by the integration tests.

pub mod http;

use std::path::PathBuf;

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
