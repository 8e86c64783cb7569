//! Time limits: the process's network timeouts ([`set`], [`get`]: the config's `[timeouts]`),
//! a network call bounded by its timeout ([`within`]), and the run's `max_runtime`
//! ([`Deadline`]), checked at the run's safe points.

use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::config::{Timeouts, format_duration};
use crate::error::{Error, Result};

static TIMEOUTS: OnceLock<Timeouts> = OnceLock::new();

/// Sets the timeouts of the clients made without a config at hand (AWS SDK clients,
/// webhooks) from the config's `[timeouts]`; call it before the first network call. Later
/// calls change nothing; without a call the defaults apply.
pub fn set(timeouts: Timeouts) {
    let _ = TIMEOUTS.set(timeouts);
}

/// The process's network timeouts.
pub fn get() -> Timeouts {
    TIMEOUTS.get().copied().unwrap_or_default()
}

/// Awaits `fut` for at most `after`; then an [`Error::Timeout`] naming the step and the call
/// (`what`, with its endpoint, never a password).
pub async fn within<T>(
    after: Duration,
    step: &str,
    what: impl FnOnce() -> String,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(after, fut).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout {
            step: step.to_string(),
            what: what(),
            after: format_duration(after),
        }),
    }
}

/// When a run must stop: `max_runtime` after it started, or never.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    limit: Option<(Duration, Instant)>,
}

impl Deadline {
    /// No limit.
    pub fn none() -> Deadline {
        Deadline { limit: None }
    }

    /// `limit` from now (`None`: no limit).
    pub fn after(limit: Option<Duration>) -> Deadline {
        Deadline {
            limit: limit.map(|l| (l, Instant::now() + l)),
        }
    }

    /// The time left; `None` without a limit.
    pub fn remaining(&self) -> Option<Duration> {
        self.limit
            .map(|(_, at)| at.saturating_duration_since(Instant::now()))
    }

    /// Whether the limit has passed.
    pub fn passed(&self) -> bool {
        self.remaining().is_some_and(|r| r.is_zero())
    }

    /// The error of a run stopped at `step`.
    pub fn reached(&self, step: &str) -> Error {
        Error::MaxRuntime {
            limit: self
                .limit
                .map(|(l, _)| format_duration(l))
                .unwrap_or_default(),
            step: step.to_string(),
        }
    }

    /// A safe point: an error if the limit has passed.
    pub fn check(&self, step: &str) -> Result<()> {
        if self.passed() {
            tracing::warn!(step, "max_runtime reached; stopping the run");
            return Err(self.reached(step));
        }
        Ok(())
    }

    /// Awaits `fut` until the limit: a wait that may be abandoned (the future is dropped, so
    /// only for calls whose effects a rerun finds and finishes).
    pub async fn bound<T>(&self, step: &str, fut: impl Future<Output = Result<T>>) -> Result<T> {
        match self.remaining() {
            None => fut.await,
            Some(left) => match tokio::time::timeout(left, fut).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(step, "max_runtime reached while waiting; stopping the run");
                    Err(self.reached(step))
                }
            },
        }
    }

    /// `wait`, shortened to the time left.
    pub fn cap(&self, wait: Duration) -> Duration {
        self.remaining().map_or(wait, |r| r.min(wait))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_without_an_answer_times_out_naming_step_and_endpoint() {
        let never = std::future::pending::<Result<()>>();
        let e = within(
            Duration::from_millis(20),
            "warehouse load",
            || "connecting to postgres 127.0.0.1:5433".into(),
            never,
        )
        .await
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "warehouse load: connecting to postgres 127.0.0.1:5433 timed out after 20ms"
        );
        let fine = within(Duration::from_secs(5), "x", String::new, async { Ok(3) }).await;
        assert_eq!(fine.unwrap(), 3);
    }

    #[tokio::test]
    async fn the_deadline_stops_waits_and_safe_points() {
        assert!(Deadline::none().check("anything").is_ok());
        assert_eq!(
            Deadline::none().cap(Duration::from_secs(7)),
            Duration::from_secs(7)
        );
        let d = Deadline::after(Some(Duration::from_millis(30)));
        assert!(d.check("early").is_ok());
        let e = d
            .bound("warehouse load", std::future::pending::<Result<()>>())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("max_runtime 30ms reached at step warehouse load"),
            "{e}"
        );
        assert!(d.passed());
        assert!(d.check("source app_logs").is_err());
        assert_eq!(d.cap(Duration::from_secs(7)), Duration::ZERO);
    }
}
