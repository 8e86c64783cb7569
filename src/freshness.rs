//! Freshness and gaps: whether each source's data keeps arriving (`expect_every`, `expect_at`
//! in a `timezone`) and which daily partitions a table lacks (`expect_partitions = "daily"`).
//!
//! A source's **last arrival** is the newest modification time of its raw files the lake has
//! seen: the files committed so far (the ledger keeps each file's modification time, so archived
//! files count) and the files waiting in its raw prefix (a file that arrived but failed and
//! waits for a retry still arrived; files moved to `failed/` do not count).
//!
//! A source is **late** when
//! - `expect_every` is set and its last arrival is older than that (late since the last arrival
//!   plus `expect_every`; a source that never had a file is late, since unknown), or
//! - `expect_at` is set, the latest daily `expect_at` (in `timezone`, default UTC) has passed,
//!   and nothing arrived since the one of the day before (late since that latest `expect_at`).
//!
//! `sluice run` (every run, so every poll of `sluice watch`) sends one `late` notification when
//! a source becomes late and one `recovered` when it is on time again, to `[notify] on_late`
//! (default: `on_failure`). Which sources were notified is kept in `_sluice/freshness/state.json`,
//! read and written under the lock `_sluice/locks/freshness.json`: separate processes agree, and
//! a run that finds the lock taken leaves the evaluation to its holder.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, NaiveTime, TimeZone, Utc};
use datafusion::arrow::array::timezone::Tz;
use serde::{Deserialize, Serialize};

use crate::config::{Config, SourceConfig, TableConfig, TableFormat, parse_duration};
use crate::error::Result;
use crate::lake::Lake;
use crate::ledger::Ledger;

/// The state of the late notifications.
pub const STATE_KEY: &str = "_sluice/freshness/state.json";
/// The lock under which the state is read, notifications sent and the state written.
pub const LOCK_KEY: &str = "_sluice/locks/freshness.json";

/// Now; tests fix it with `SLUICE_NOW` (RFC 3339), hidden from users.
pub fn now() -> DateTime<Utc> {
    std::env::var("SLUICE_NOW")
        .ok()
        .and_then(|t| DateTime::parse_from_rfc3339(t.trim()).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(Utc::now)
}

/// What a source promises.
#[derive(Debug, Clone)]
pub struct Expectation {
    /// At least one file this often.
    pub every: Option<Duration>,
    /// A file by this time of day ...
    pub at: Option<NaiveTime>,
    /// ... in this zone.
    pub tz: Tz,
}

fn parse_time(text: &str) -> std::result::Result<NaiveTime, String> {
    NaiveTime::parse_from_str(text.trim(), "%H:%M")
        .or_else(|_| NaiveTime::parse_from_str(text.trim(), "%H:%M:%S"))
        .map_err(|_| format!("\"{text}\" is not a time of day (HH:MM, e.g. 06:00)"))
}

fn parse_tz(text: &str) -> std::result::Result<Tz, String> {
    Tz::from_str(text.trim()).map_err(|_| {
        format!("\"{text}\" is not a time zone (an IANA name such as Europe/Berlin, or +01:00)")
    })
}

impl Expectation {
    /// The source's expectation; `None` without `expect_every` and `expect_at`. Errors name
    /// the setting.
    pub fn of(s: &SourceConfig) -> std::result::Result<Option<Expectation>, String> {
        let every = match &s.expect_every {
            Some(t) => {
                let d = parse_duration(t).map_err(|e| format!("expect_every: {e}"))?;
                if d.is_zero() {
                    return Err("expect_every must be longer than 0s".into());
                }
                Some(d)
            }
            None => None,
        };
        let at = match &s.expect_at {
            Some(t) => Some(parse_time(t).map_err(|e| format!("expect_at: {e}"))?),
            None => None,
        };
        let tz = match &s.timezone {
            Some(_) if at.is_none() => {
                return Err("timezone is the zone of expect_at, which is not set".into());
            }
            Some(t) => parse_tz(t).map_err(|e| format!("timezone: {e}"))?,
            None => parse_tz("+00:00")?,
        };
        Ok((every.is_some() || at.is_some()).then_some(Expectation { every, at, tz }))
    }

    /// The latest daily `expect_at` at or before `now`, and the one of the day before.
    fn deadlines(&self, at: NaiveTime, now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        let on = |date: NaiveDate| -> DateTime<Utc> {
            let local = date.and_time(at);
            // A time skipped by a DST change counts from the hour after.
            self.tz
                .from_local_datetime(&local)
                .earliest()
                .or_else(|| {
                    self.tz
                        .from_local_datetime(&(local + chrono::Duration::hours(1)))
                        .earliest()
                })
                .map(|t| t.with_timezone(&Utc))
                .unwrap_or_else(|| Utc.from_utc_datetime(&local))
        };
        let today = now.with_timezone(&self.tz).date_naive();
        let mut latest = on(today);
        let mut date = today;
        if latest > now {
            date = today.pred_opt().unwrap_or(today);
            latest = on(date);
        }
        let before = on(date.pred_opt().unwrap_or(date));
        (latest, before)
    }

    /// Whether a source last seen at `last` is late at `now`, and since when.
    pub fn judge(
        &self,
        last: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> (bool, Option<DateTime<Utc>>) {
        let mut late = false;
        let mut since: Option<DateTime<Utc>> = None;
        let mut earliest = |t: Option<DateTime<Utc>>| {
            since = match (since, t) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        };
        if let Some(every) = self.every {
            let due = last.and_then(|l| chrono::Duration::from_std(every).ok().map(|d| l + d));
            if due.is_none_or(|due| now > due) {
                late = true;
                earliest(due);
            }
        }
        if let Some(at) = self.at {
            let (latest, before) = self.deadlines(at, now);
            if last.is_none_or(|l| l < before) {
                late = true;
                earliest(Some(latest));
            }
        }
        (late, since)
    }
}

/// Checks the freshness settings of a config; the message names the source or table.
pub fn check_config(config: &Config) -> std::result::Result<(), String> {
    for s in &config.sources {
        Expectation::of(s).map_err(|e| format!("source \"{}\": {e}", s.name))?;
    }
    for t in &config.tables {
        if let Some(kind) = &t.expect_partitions {
            if kind != "daily" {
                return Err(format!(
                    "table \"{}\": expect_partitions = \"{kind}\" is not supported (use \"daily\")",
                    t.name
                ));
            }
            if t.partition_by.is_empty() {
                return Err(format!(
                    "table \"{}\": expect_partitions = \"daily\" needs partition_by (its first \
                     column, a date, is checked)",
                    t.name
                ));
            }
        }
    }
    Ok(())
}

/// One source's freshness.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceFreshness {
    /// The source.
    pub source: String,
    /// The newest modification time of its raw files (committed or waiting).
    pub last_arrival: Option<DateTime<Utc>>,
    /// `expect_every`, as configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_every: Option<String>,
    /// `expect_at`, as configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_at: Option<String>,
    /// The zone of `expect_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Whether it is late.
    pub late: bool,
    /// Since when it is late (unknown for a source that never had a file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_since: Option<DateTime<Utc>>,
}

/// The missing daily partitions of a table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartitionGaps {
    /// The table.
    pub table: String,
    /// Its date partition column.
    pub column: String,
    /// The first partition.
    pub first: Option<NaiveDate>,
    /// The last partition.
    pub last: Option<NaiveDate>,
    /// How many dates have a partition.
    pub partitions: usize,
    /// The dates between the first and the last without one.
    pub missing: Vec<NaiveDate>,
    /// Partition values that are no date (`__HIVE_DEFAULT_PARTITION__` for null, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_dates: Vec<String>,
}

/// Freshness as a run saw it: in the run report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunFreshness {
    /// The sources late after the run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub late: Vec<String>,
    /// Per table with `expect_partitions`: its missing partitions.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub missing_partitions: BTreeMap<String, Vec<NaiveDate>>,
    /// `late` and `recovered` notifications this run sent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notified: Vec<String>,
}

impl RunFreshness {
    /// Lines for the run's summary.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for s in &self.late {
            out.push_str(&format!("  source {s} is late\n"));
        }
        for (t, missing) in self
            .missing_partitions
            .iter()
            .filter(|(_, m)| !m.is_empty())
        {
            out.push_str(&format!(
                "  {t}: {} missing partitions: {}\n",
                missing.len(),
                dates(missing)
            ));
        }
        out
    }
}

fn dates(d: &[NaiveDate]) -> String {
    let mut s: Vec<String> = d.iter().take(20).map(ToString::to_string).collect();
    if d.len() > 20 {
        s.push(format!("... ({} more)", d.len() - 20));
    }
    s.join(", ")
}

/// The last arrival of every source with an expectation.
async fn last_arrivals(
    config: &Config,
    lake: &Lake,
    ledger: &Ledger,
) -> Result<BTreeMap<String, Option<DateTime<Utc>>>> {
    let mut out: BTreeMap<String, Option<DateTime<Utc>>> = BTreeMap::new();
    for s in &config.sources {
        out.insert(s.name.clone(), None);
    }
    for records in ledger.by_key.values() {
        for r in records {
            if let Some(last) = out.get_mut(&r.source) {
                *last = (*last).max(Some(r.last_modified));
            }
        }
    }
    for s in &config.sources {
        for m in lake.list(&s.raw_prefix()).await? {
            if crate::source::matches_format(m.location.as_ref(), s.format)
                && let Some(last) = out.get_mut(&s.name)
            {
                *last = (*last).max(Some(m.last_modified));
            }
        }
    }
    Ok(out)
}

/// Whether a config asks for any freshness or gap check.
pub fn configured(config: &Config) -> bool {
    config
        .sources
        .iter()
        .any(|s| s.expect_every.is_some() || s.expect_at.is_some())
        || config.tables.iter().any(|t| t.expect_partitions.is_some())
}

/// The freshness of every source with an expectation, at `now`.
pub async fn sources(
    config: &Config,
    lake: &Lake,
    ledger: &Ledger,
    now: DateTime<Utc>,
) -> Result<Vec<SourceFreshness>> {
    let watched: Vec<(&SourceConfig, Expectation)> = config
        .sources
        .iter()
        .filter_map(|s| Expectation::of(s).ok().flatten().map(|e| (s, e)))
        .collect();
    if watched.is_empty() {
        return Ok(Vec::new());
    }
    let arrivals = last_arrivals(config, lake, ledger).await?;
    Ok(watched
        .into_iter()
        .map(|(s, e)| {
            let last = arrivals.get(&s.name).copied().flatten();
            let (late, late_since) = e.judge(last, now);
            SourceFreshness {
                source: s.name.clone(),
                last_arrival: last,
                expect_every: s.expect_every.clone(),
                expect_at: s.expect_at.clone(),
                timezone: s
                    .expect_at
                    .as_ref()
                    .map(|_| s.timezone.clone().unwrap_or_else(|| "UTC".to_string())),
                late,
                late_since,
            }
        })
        .collect())
}

/// The partition gaps of one table with `expect_partitions`.
pub async fn gaps(lake: &Lake, table: &TableConfig) -> Result<Option<PartitionGaps>> {
    let (Some(_), Some(column)) = (&table.expect_partitions, table.partition_by.first()) else {
        return Ok(None);
    };
    let format = match table.format {
        TableFormat::Parquet => crate::format::Format::Parquet,
        TableFormat::Delta => crate::format::Format::Delta,
    };
    let files = format
        .data_files(lake, &crate::lake::processed_prefix(&table.name))
        .await?;
    let mut present = BTreeSet::new();
    let mut not_dates = BTreeSet::new();
    let head = format!("{column}=");
    for f in &files {
        for seg in f.dir.split('/') {
            if let Some(v) = seg.strip_prefix(&head) {
                let v = crate::lake::hive_unescape(v);
                match NaiveDate::parse_from_str(&v, "%Y-%m-%d") {
                    Ok(d) => {
                        present.insert(d);
                    }
                    Err(_) => {
                        not_dates.insert(v);
                    }
                }
            }
        }
    }
    let (first, last) = (present.first().copied(), present.last().copied());
    let mut missing = Vec::new();
    if let (Some(first), Some(last)) = (first, last) {
        let mut d = first;
        while d < last {
            if !present.contains(&d) {
                missing.push(d);
            }
            d = match d.succ_opt() {
                Some(n) => n,
                None => break,
            };
        }
    }
    Ok(Some(PartitionGaps {
        table: table.name.clone(),
        column: column.clone(),
        first,
        last,
        partitions: present.len(),
        missing,
        not_dates: not_dates.into_iter().collect(),
    }))
}

/// The partition gaps of every table with `expect_partitions`.
pub async fn all_gaps(config: &Config, lake: &Lake) -> Result<Vec<PartitionGaps>> {
    let mut out = Vec::new();
    for t in &config.tables {
        if let Some(g) = gaps(lake, t).await? {
            out.push(g);
        }
    }
    Ok(out)
}

/// Which sources were reported late: `_sluice/freshness/state.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    /// The sources a `late` notification went out for, and not yet a `recovered` one.
    #[serde(default)]
    pub late: BTreeMap<String, LateState>,
}

/// A source reported late.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LateState {
    /// Since when it is late.
    pub since: Option<DateTime<Utc>>,
    /// When the `late` notification went out.
    pub notified_at: DateTime<Utc>,
}

fn message(config: &Config, f: &SourceFreshness, event: &str) -> crate::notify::Message {
    let pipeline = config.pipeline_name();
    let last = f
        .last_arrival
        .map(|t| t.to_rfc3339())
        .unwrap_or_else(|| "never".to_string());
    let expected = expectation_text(f);
    let text = match event {
        "late" => format!(
            "source {} of pipeline {pipeline} is late{}: last arrival {last}, expected {expected}",
            f.source,
            f.late_since
                .map(|t| format!(" since {}", t.to_rfc3339()))
                .unwrap_or_default()
        ),
        _ => format!(
            "source {} of pipeline {pipeline} recovered: last arrival {last}",
            f.source
        ),
    };
    crate::notify::Message {
        subject: format!("sluice {pipeline}: source {} {event}", f.source),
        text,
        body: serde_json::json!({
            "event": event,
            "pipeline": pipeline,
            "source": f.source,
            "last_arrival": f.last_arrival,
            "late_since": f.late_since,
            "expect_every": f.expect_every,
            "expect_at": f.expect_at,
            "timezone": f.timezone,
            "at": now(),
        }),
        attributes: vec![
            ("status", event.to_string()),
            ("pipeline", pipeline),
            ("source", f.source.clone()),
        ],
    }
}

/// How a source's expectation reads: `every 24h`, `by 06:00 Europe/Berlin`.
pub fn expectation_text(f: &SourceFreshness) -> String {
    let mut parts = Vec::new();
    if let Some(e) = &f.expect_every {
        parts.push(format!("every {e}"));
    }
    if let Some(a) = &f.expect_at {
        parts.push(format!(
            "daily by {a} {}",
            f.timezone.as_deref().unwrap_or("UTC")
        ));
    }
    parts.join(", ")
}

/// Evaluates freshness after a run (or a poll): sends the `late` and `recovered`
/// notifications that are due, under the freshness lock, and reports the late sources and the
/// missing partitions. Delivery errors come back as text, for the report's warnings.
pub async fn evaluate(
    config: &Config,
    lake: &Lake,
    run_id: &str,
) -> Result<(RunFreshness, Vec<String>)> {
    let mut out = RunFreshness::default();
    let mut problems = Vec::new();
    if !configured(config) {
        return Ok((out, problems));
    }
    for g in all_gaps(config, lake).await? {
        out.missing_partitions.insert(g.table, g.missing);
    }
    let watched = config
        .sources
        .iter()
        .any(|s| s.expect_every.is_some() || s.expect_at.is_some());
    if !watched {
        return Ok((out, problems));
    }
    let me = crate::lock::Holder::me(run_id);
    let ttl = Duration::from_secs(300);
    let work = notify_changes(config, lake, &mut out, &mut problems);
    if crate::lock::try_holding(lake, LOCK_KEY, &me, ttl, work)
        .await?
        .is_none()
    {
        tracing::info!("another run is evaluating freshness; left to it");
        let ledger = Ledger::load(lake).await?;
        out.late = sources(config, lake, &ledger, now())
            .await?
            .into_iter()
            .filter(|f| f.late)
            .map(|f| f.source)
            .collect();
    }
    Ok((out, problems))
}

async fn notify_changes(
    config: &Config,
    lake: &Lake,
    out: &mut RunFreshness,
    problems: &mut Vec<String>,
) -> Result<()> {
    let ledger = Ledger::load(lake).await?;
    let at = now();
    let list = sources(config, lake, &ledger, at).await?;
    let mut state: State = lake.get_json(STATE_KEY).await?.unwrap_or_default();
    let mut changed = false;
    let targets = config.notify.late_targets();
    // Sources no longer watched are forgotten.
    let names: BTreeSet<&str> = list.iter().map(|f| f.source.as_str()).collect();
    let before = state.late.len();
    state.late.retain(|s, _| names.contains(s.as_str()));
    changed |= state.late.len() != before;
    for f in &list {
        if f.late {
            out.late.push(f.source.clone());
        }
        let event = match (f.late, state.late.contains_key(&f.source)) {
            (true, false) => "late",
            (false, true) => "recovered",
            _ => continue,
        };
        tracing::info!(source = %f.source, event, "freshness changed");
        let errors = crate::notify::send(targets, &config.notify, &message(config, f, event)).await;
        problems.extend(
            errors
                .iter()
                .map(|e| format!("{event} notification of source {}: {e}", f.source)),
        );
        out.notified.push(format!("{event}:{}", f.source));
        if f.late {
            state.late.insert(
                f.source.clone(),
                LateState {
                    since: f.late_since,
                    notified_at: at,
                },
            );
        } else {
            state.late.remove(&f.source);
        }
        changed = true;
    }
    if changed {
        lake.put_json(STATE_KEY, &state).await?;
    }
    Ok(())
}

/// Evaluates freshness outside a run (`sluice watch --queue` between messages); errors are
/// logged.
pub async fn poll(config: &Config, lake: &Lake) {
    if !configured(config) {
        return;
    }
    match evaluate(config, lake, &crate::report::new_run_id()).await {
        Ok((_, problems)) => {
            for p in problems {
                tracing::warn!("{p}");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot evaluate freshness"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exp(every: Option<&str>, at: Option<&str>, tz: &str) -> Expectation {
        Expectation {
            every: every.map(|e| parse_duration(e).unwrap()),
            at: at.map(|a| parse_time(a).unwrap()),
            tz: parse_tz(tz).unwrap(),
        }
    }

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn every_is_late_after_the_period() {
        let e = exp(Some("24h"), None, "+00:00");
        let last = Some(t("2024-03-04T08:00:00Z"));
        assert_eq!(e.judge(last, t("2024-03-05T07:00:00Z")), (false, None));
        assert_eq!(
            e.judge(last, t("2024-03-05T09:00:00Z")),
            (true, Some(t("2024-03-05T08:00:00Z")))
        );
        assert_eq!(e.judge(None, t("2024-03-05T09:00:00Z")), (true, None));
    }

    #[test]
    fn at_in_a_zone() {
        // 06:00 in Berlin is 05:00 UTC in March (CET).
        let e = exp(None, Some("06:00"), "Europe/Berlin");
        // Arrived after the previous day's 06:00: on time on the 5th after 06:00.
        let last = Some(t("2024-03-04T05:30:00Z"));
        assert_eq!(e.judge(last, t("2024-03-05T04:59:00Z")), (false, None));
        assert_eq!(e.judge(last, t("2024-03-05T05:01:00Z")), (false, None));
        // Arrived before it: late from 06:00 Berlin.
        let last = Some(t("2024-03-04T04:30:00Z"));
        assert_eq!(e.judge(last, t("2024-03-05T04:59:00Z")), (false, None));
        assert_eq!(
            e.judge(last, t("2024-03-05T05:01:00Z")),
            (true, Some(t("2024-03-05T05:00:00Z")))
        );
    }

    #[test]
    fn times_and_zones_are_checked() {
        assert!(parse_time("25:00").is_err());
        assert!(parse_time("06:00").is_ok());
        assert!(parse_tz("Mars/Olympus").is_err());
        assert!(parse_tz("+02:00").is_ok());
    }
}
