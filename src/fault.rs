//! Crash injection for tests: `--crash-at STEP` (a hidden flag) aborts the process at that step,
//! as a power cut would, so tests can check that a rerun repairs everything.

use std::sync::OnceLock;

static CRASH_AT: OnceLock<String> = OnceLock::new();

/// Arms the crash point (once per process).
pub fn arm(step: &str) {
    let _ = CRASH_AT.set(step.to_string());
}

/// Aborts the process if `step` is the armed crash point.
pub fn point(step: &str) {
    if CRASH_AT.get().is_some_and(|s| s == step) {
        eprintln!("sluice: injected crash at {step}");
        std::process::abort();
    }
}
