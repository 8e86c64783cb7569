//! When `sluice watch --every` / `--schedule` runs: fixed intervals aligned to the Unix epoch
//! (`--every 15m` ticks at :00, :15, :30, :45), or a cron expression (the `cron` crate; five
//! fields as in crontab, or six or seven with seconds first and a year last).
//!
//! A tick that passed while no process was running (the last run started before it) is made up
//! by one run at start; ticks missed while a run was still going are skipped, never run in a
//! burst: the next wait is always for the first tick after now.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

/// A schedule of runs.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// Every so many seconds, from the epoch.
    Every(u64),
    /// A cron expression, in UTC.
    Cron(Box<cron::Schedule>),
}

impl Schedule {
    /// `--every`: a duration such as `90s`, `15m`, `1h` (at least a second).
    pub fn every(text: &str) -> Result<Schedule, String> {
        let d = crate::config::parse_duration(text)?;
        match d.as_secs() {
            0 => Err(format!("\"{text}\" is shorter than a second")),
            s => Ok(Schedule::Every(s)),
        }
    }

    /// `--schedule`: a cron expression (five fields: minute hour day month weekday; six or
    /// seven: seconds first, a year last).
    pub fn cron(text: &str) -> Result<Schedule, String> {
        let fields = text.split_whitespace().count();
        let expr = match fields {
            5 => format!("0 {text}"),
            6 | 7 => text.to_string(),
            n => {
                return Err(format!(
                    "\"{text}\" has {n} fields; a cron expression has 5 (minute hour day month \
                     weekday), or 6 or 7 with seconds first and a year last"
                ));
            }
        };
        cron::Schedule::from_str(&expr)
            .map(|s| Schedule::Cron(Box::new(s)))
            .map_err(|e| format!("\"{text}\" is not a cron expression: {e}"))
    }

    /// The first tick strictly after `t` (none: a cron expression that never fires again).
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Every(secs) => {
                let secs = *secs as i64;
                let next = (t.timestamp().div_euclid(secs) + 1) * secs;
                Utc.timestamp_opt(next, 0).single()
            }
            Schedule::Cron(c) => c.after(&t).next(),
        }
    }

    /// Whether a run is due at start: there was none, or a tick passed since the last one
    /// started.
    pub fn missed(&self, last_run: Option<DateTime<Utc>>, now: DateTime<Utc>) -> bool {
        match last_run {
            None => true,
            Some(last) => self.next_after(last).is_some_and(|tick| tick <= now),
        }
    }

    /// How long to wait from `now` for the next tick (none: never again).
    pub fn wait(&self, now: DateTime<Utc>) -> Option<Duration> {
        let next = self.next_after(now)?;
        Some((next - now).to_std().unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn intervals_tick_from_the_epoch_and_cron_follows_its_fields() {
        let every = Schedule::every("15m").unwrap();
        assert_eq!(
            every.next_after(t("2026-12-02T06:07:00Z")),
            Some(t("2026-12-02T06:15:00Z"))
        );
        assert_eq!(
            every.next_after(t("2026-12-02T06:15:00Z")),
            Some(t("2026-12-02T06:30:00Z")),
            "strictly after"
        );
        let five = Schedule::cron("*/15 * * * *").unwrap();
        let six = Schedule::cron("0 */15 * * * *").unwrap();
        for s in [&five, &six] {
            assert_eq!(
                s.next_after(t("2026-12-02T06:07:00Z")),
                Some(t("2026-12-02T06:15:00Z"))
            );
        }
        let daily = Schedule::cron("0 6 * * *").unwrap();
        assert_eq!(
            daily.next_after(t("2026-12-02T06:00:01Z")),
            Some(t("2026-12-03T06:00:00Z"))
        );
        assert!(Schedule::cron("* * *").unwrap_err().contains("3 fields"));
        assert!(Schedule::cron("61 * * * *").is_err());
        assert!(Schedule::every("0s").is_err());
        assert!(Schedule::every("soon").is_err());
    }

    #[test]
    fn a_tick_passed_since_the_last_run_is_made_up_once_at_start() {
        let hourly = Schedule::cron("0 * * * *").unwrap();
        let now = t("2026-12-02T10:30:00Z");
        assert!(hourly.missed(None, now), "never ran");
        assert!(
            hourly.missed(Some(t("2026-12-02T08:59:00Z")), now),
            "the 09:00 and 10:00 ticks passed: one run"
        );
        assert!(!hourly.missed(Some(t("2026-12-02T10:00:05Z")), now));
        assert_eq!(hourly.wait(now), Some(Duration::from_secs(30 * 60)));
        // A year that is over never fires again.
        let past = Schedule::cron("0 0 0 1 1 * 2020").unwrap();
        assert_eq!(past.wait(now), None);
        assert!(!past.missed(Some(t("2021-01-01T00:00:00Z")), now));
    }
}
