//! Helpers shared by the integration tests.

pub mod http;
pub mod pg;
pub mod proc;

use std::path::PathBuf;

/// The default model (SmolLM2-135M-Instruct GGUF) if it has been fetched.
///
/// Without it, tests that need it are skipped with a message, unless `LETHE_REQUIRE_MODEL=1`
/// (set in CI), which turns a missing model into a failure so the suite never passes vacuously.
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
    eprintln!("skipping: {} not found (run scripts/fetch-model.sh)", p.display());
    None
}
