//! Crash injection for tests: `--crash-at STEP` (a hidden flag) aborts the process at that step,
//! as a power cut would, so tests can check that a rerun repairs everything; `SLUICE_PAUSE_AT`
//! holds it at a step, so tests can interleave two runs; `SLUICE_FAULT` names a behaviour
//! broken on purpose (a negative control).

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

/// Holds the process at `step` while the file named by `SLUICE_PAUSE_FILE` exists, if
/// `SLUICE_PAUSE_AT` names that step (tests that interleave two runs deterministically); it
/// creates `<file>.reached` first, so the test knows it is there. At most a minute.
pub fn pause(step: &str) {
    if std::env::var("SLUICE_PAUSE_AT").ok().as_deref() != Some(step) {
        return;
    }
    let Some(file) = std::env::var_os("SLUICE_PAUSE_FILE").map(std::path::PathBuf::from) else {
        return;
    };
    let mut reached = file.clone().into_os_string();
    reached.push(".reached");
    let _ = std::fs::write(&reached, step);
    let start = std::time::Instant::now();
    while file.exists() && start.elapsed() < std::time::Duration::from_secs(60) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whether `SLUICE_FAULT` (comma-separated) names `fault`: a behaviour tests break on purpose to
/// show that their checks would catch it.
pub fn active(fault: &str) -> bool {
    std::env::var("SLUICE_FAULT").is_ok_and(|v| v.split(',').any(|f| f.trim() == fault))
}
