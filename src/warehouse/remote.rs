//! External warehouses after the lake (`[warehouse] kind = "redshift-data"` or `"postgres"`):
//! the commits the warehouse has not seen yet form a unit; its load step copies the Parquet
//! files they added, then its call statements run, each once.
//!
//! Exactly once: the unit, with each statement's id as soon as the warehouse gives one, is saved
//! in `_sluice/loads/<kind>.json` before anything waits. A run that crashed or gave up waiting
//! resumes the same statements (polling a Redshift statement instead of sending it again; on
//! PostgreSQL, every load and call commits together with its marker row and is skipped when
//! the marker is there). A commit joins `done` only when its whole unit finished.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::postgres::Postgres;
use super::redshift::{Ended, RedshiftData};
use super::sql;
use crate::catalog::TableMeta;
use crate::config::{Config, WarehouseKind};
use crate::error::{Error, Result};
use crate::lake::{self, Lake, STATE};
use crate::ledger::{self, Commit, Ledger, sha256_hex};
use crate::lock::{self, Holder};
use crate::report::StatementReport;
use crate::sink::TableFile;
use crate::timeout::Deadline;

/// What the warehouse has and what is on its way there.
#[derive(Debug, Default, Serialize, Deserialize)]
struct LoadState {
    /// Commits whose unit finished.
    done: BTreeSet<String>,
    /// The unit being loaded, if a run stopped before it finished.
    inflight: Option<Unit>,
}

/// Commits loaded and called together.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Unit {
    /// Derived from the commits.
    id: String,
    /// The run that started it (names its manifests).
    run_id: String,
    started_at: DateTime<Utc>,
    commits: Vec<String>,
    /// `:name` parameter values, fixed when the unit starts.
    params: BTreeMap<String, String>,
    /// Files to load, by lake table: added by the unit's commits and not removed by them.
    files: BTreeMap<String, Vec<UnitFile>>,
    /// The statements sent so far.
    statements: Vec<StatementReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct UnitFile {
    key: String,
    /// Partition folder, relative to the table.
    dir: String,
}

/// One step of a unit.
#[derive(Debug, Clone)]
pub enum Step {
    /// `load = "copy"`: one lake table's new files.
    Copy(String),
    /// A SQL statement (`load` or one of `call`).
    Sql { name: String, sql: String },
}

impl Step {
    /// The step and what it runs, for `validate`.
    pub fn describe(&self) -> String {
        match self {
            Step::Copy(table) => format!("load {table}: COPY its new files"),
            Step::Sql { name, sql } => {
                format!(
                    "{name}: {}",
                    sql.split_whitespace().collect::<Vec<_>>().join(" ")
                )
            }
        }
    }

    fn name(&self) -> String {
        match self {
            Step::Copy(table) => format!("load {table}"),
            Step::Sql { name, .. } => name.clone(),
        }
    }
}

/// `_sluice/loads/<kind>.json`
fn state_key(kind: WarehouseKind) -> String {
    format!("{STATE}/loads/{}.json", kind.name())
}

/// `_sluice/manifests/<run_id>-<table>.json`: the COPY manifest of a run's files of a table.
pub fn manifest_key(run_id: &str, table: &str) -> String {
    format!("{STATE}/manifests/{run_id}-{table}.json")
}

const LOCK: &str = "_sluice/locks/warehouse.json";

/// The lake tables `load = "copy"` loads.
fn load_tables(config: &Config) -> Vec<String> {
    if config.warehouse.tables.is_empty() {
        config.tables.iter().map(|t| t.name.clone()).collect()
    } else {
        config.warehouse.tables.clone()
    }
}

/// The steps of every unit, SQL files read; config errors name the file or entry.
pub fn steps(config: &Config) -> Result<Vec<Step>> {
    let w = &config.warehouse;
    let mut out = Vec::new();
    let statement = |entry: &str, name: String| -> Result<Step> {
        let (text, origin) = if sql::is_file(entry) {
            let path = config.resolve(std::path::Path::new(entry));
            let text = std::fs::read_to_string(&path).map_err(|e| {
                Error::config(
                    &config.path,
                    format!("warehouse {name}: cannot read {}: {e}", path.display()),
                )
            })?;
            (text, path.display().to_string())
        } else {
            (entry.to_string(), format!("warehouse {name}"))
        };
        let mut statements = sql::split_statements(&text);
        if statements.len() != 1 {
            return Err(Error::config(
                &config.path,
                format!(
                    "{origin} holds {} statements; each load or call entry is one statement (list several entries instead)",
                    statements.len()
                ),
            ));
        }
        Ok(Step::Sql {
            name,
            sql: statements.remove(0),
        })
    };
    match w.load.as_deref() {
        Some("copy") => out.extend(load_tables(config).into_iter().map(Step::Copy)),
        Some(entry) => out.push(statement(entry, "load".to_string())?),
        None => {}
    }
    for (i, entry) in w.call.iter().enumerate() {
        out.push(statement(entry, format!("call {}", i + 1))?);
    }
    Ok(out)
}

/// The `:name` parameters every statement may use: `run_id`, `run_date` (the unit's start
/// day, UTC) and `[warehouse.parameters]`; a unit adds `replayed` (the raw keys its replays
/// re-derived, one a line; empty without one).
fn parameters(config: &Config, run_id: &str, at: DateTime<Utc>) -> BTreeMap<String, String> {
    let mut p = config.warehouse.parameters.clone();
    p.insert("run_id".into(), run_id.to_string());
    p.insert("run_date".into(), at.date_naive().to_string());
    p.insert("replayed".into(), String::new());
    p
}

enum Backend {
    Redshift(Box<RedshiftData>),
    Postgres(Box<Postgres>),
}

impl Backend {
    /// Connects for `step`, waiting no longer than the run's `deadline`.
    async fn connect(config: &Config, step: &str, deadline: &Deadline) -> Result<Backend> {
        Ok(match config.warehouse.kind {
            WarehouseKind::Postgres => Backend::Postgres(Box::new(
                deadline
                    .bound(
                        &format!(
                            "{step} (connecting to postgres {})",
                            Postgres::target(config)
                        ),
                        Postgres::connect(config, step),
                    )
                    .await?,
            )),
            _ => Backend::Redshift(Box::new(RedshiftData::new(&config.warehouse).await)),
        })
    }
}

/// The step of the run that loads the warehouse, in messages.
const LOAD_STEP: &str = "warehouse load";

/// Why a step did not finish.
enum Stop {
    /// Worth another attempt (the retry policy decides).
    Retry(String),
    /// Not worth one: aborted by someone, or still running at the deadline.
    Final(String),
    /// Not worth one, and the run stops with this error as it is: a timeout, or the run's
    /// `max_runtime`.
    Error(Error),
}

struct Journal<'a> {
    lake: &'a Lake,
    key: String,
    done: BTreeSet<String>,
}

impl Journal<'_> {
    async fn save(&self, unit: Option<&Unit>) -> Result<()> {
        // The warehouse's error texts may quote a secret value; the rest must stay as it is.
        let mut inflight = unit.cloned();
        for st in inflight.iter_mut().flat_map(|u| u.statements.iter_mut()) {
            if let Some(e) = st.error.as_mut() {
                *e = crate::redact::mask(e).into_owned();
            }
        }
        let state = LoadState {
            done: self.done.clone(),
            inflight,
        };
        self.lake.put_json(&self.key, &state).await
    }
}

/// Loads and calls every unit the warehouse has not finished; the statements sent are added to
/// `report`, failed ones included. Past the run's `deadline` it stops between steps (or while
/// waiting for one) with [`Error::MaxRuntime`]; the lock is released in every case.
pub async fn sync(
    config: &Config,
    lake: &Lake,
    me: &Holder,
    deadline: &Deadline,
    report: &mut Vec<StatementReport>,
) -> Result<()> {
    let w = &config.warehouse;
    if w.kind == WarehouseKind::Embedded {
        return Ok(());
    }
    let ttl = Duration::from_secs(config.lake.lock_ttl_secs).max(w.deadline() * 2);
    let work = sync_locked(config, lake, &me.run_id, deadline, report);
    if lock::try_holding(lake, LOCK, me, ttl, work)
        .await?
        .is_none()
    {
        tracing::info!("another run is loading the warehouse; new commits wait for the next run");
    }
    Ok(())
}

async fn sync_locked(
    config: &Config,
    lake: &Lake,
    run_id: &str,
    deadline: &Deadline,
    report: &mut Vec<StatementReport>,
) -> Result<()> {
    let steps = steps(config)?;
    let key = state_key(config.warehouse.kind);
    let state: LoadState = lake.get_json(&key).await?.unwrap_or_default();
    let mut journal = Journal {
        lake,
        key,
        done: state.done,
    };
    let mut inflight = state.inflight;
    let mut backend: Option<Backend> = None;
    loop {
        let mut unit = match inflight.take() {
            Some(u) => {
                tracing::info!(unit = %u.id, started_by = %u.run_id, "resuming a warehouse load");
                u
            }
            None => {
                let ledger = Ledger::load(lake).await?;
                let pending: Vec<String> = ledger
                    .commits
                    .iter()
                    .filter(|c| !journal.done.contains(*c))
                    .cloned()
                    .collect();
                if pending.is_empty() {
                    return Ok(());
                }
                let changed = pending
                    .iter()
                    .any(|c| ledger.changed_tables.get(c).is_some_and(|t| !t.is_empty()));
                if !changed {
                    journal.done.extend(pending);
                    journal.save(None).await?;
                    return Ok(());
                }
                new_unit(config, lake, pending, run_id).await?
            }
        };
        journal.save(Some(&unit)).await?;
        if backend.is_none() {
            backend = Some(Backend::connect(config, LOAD_STEP, deadline).await?);
        }
        let Some(b) = backend.as_mut() else {
            continue;
        };
        run_unit(
            config, lake, b, &journal, &steps, &mut unit, deadline, report,
        )
        .await?;
        journal.done.extend(unit.commits.iter().cloned());
        journal.save(None).await?;
    }
}

async fn new_unit(
    config: &Config,
    lake: &Lake,
    commits: Vec<String>,
    run_id: &str,
) -> Result<Unit> {
    let tables: BTreeSet<String> = load_tables(config).into_iter().collect();
    let mut files: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut replayed: BTreeSet<String> = BTreeSet::new();
    for id in &commits {
        let commit: Commit = lake
            .get_json(&ledger::ledger_key(id))
            .await?
            .ok_or_else(|| Error::State {
                path: ledger::ledger_key(id),
                message: "the ledger entry disappeared".into(),
            })?;
        // A compaction's files hold rows the warehouse has (a table is compacted only when
        // its commits are loaded): they are not copied again, and the files it replaced were.
        for t in commit
            .tables
            .iter()
            .filter(|t| tables.contains(&t.table) && !t.compaction)
        {
            let prefix = lake::processed_prefix(&t.table);
            let entry = files.entry(t.table.clone()).or_default();
            replayed.extend(t.replayed.iter().cloned());
            for m in &t.added {
                // A replay's rewritten files hold rows of other files, which the warehouse
                // has: only its new rows are loaded (the procedure deletes the replayed
                // files' old rows by `:replayed`).
                if !t.replayed.is_empty() && ledger::is_rewrite(&m.to) {
                    continue;
                }
                if m.to.starts_with(&format!("{prefix}/")) && m.to.ends_with(".parquet") {
                    let dir = lake::parent_dir(lake::relative(&m.to, &prefix));
                    entry.insert(m.to.clone(), dir.to_string());
                }
            }
            for r in &t.removed {
                entry.remove(r);
            }
        }
    }
    let now = Utc::now();
    let run_id = run_id.to_string();
    let mut params = parameters(config, &run_id, now);
    params.insert(
        "replayed".into(),
        replayed.into_iter().collect::<Vec<_>>().join("\n"),
    );
    Ok(Unit {
        id: sha256_hex(commits.join("\n").as_bytes())[..16].to_string(),
        params,
        run_id,
        started_at: now,
        commits,
        files: files
            .into_iter()
            .map(|(t, f)| {
                let list = f
                    .into_iter()
                    .map(|(key, dir)| UnitFile { key, dir })
                    .collect();
                (t, list)
            })
            .collect(),
        statements: Vec::new(),
    })
}

#[allow(clippy::too_many_arguments)]
async fn run_unit(
    config: &Config,
    lake: &Lake,
    backend: &mut Backend,
    journal: &Journal<'_>,
    steps: &[Step],
    unit: &mut Unit,
    deadline: &Deadline,
    report: &mut Vec<StatementReport>,
) -> Result<()> {
    let max_attempts = config.retry.max_attempts;
    for step in steps {
        let name = step.name();
        let prior = unit.statements.iter().find(|s| s.step == name).cloned();
        if prior
            .as_ref()
            .is_some_and(|s| s.status == "finished" || s.status == "skipped")
        {
            continue;
        }
        // A statement still running keeps its attempt (its token and id); a failed one is
        // tried again under the next number, so its token is new.
        let mut attempt = match &prior {
            Some(s) if s.status == "submitted" => s.attempt,
            Some(s) => s.attempt + 1,
            None => 1,
        };
        let mut tries = 1;
        loop {
            // A safe point: the unit is saved, the next run resumes it at this step.
            deadline.check(&format!("{LOAD_STEP} (before {name})"))?;
            let outcome = match backend {
                Backend::Redshift(rs) => {
                    redshift_step(config, lake, rs, journal, step, unit, attempt, deadline).await
                }
                Backend::Postgres(pg) => {
                    if pg.is_closed() {
                        let step_name = format!(
                            "{LOAD_STEP} (connecting to postgres {})",
                            Postgres::target(config)
                        );
                        **pg = deadline
                            .bound(&step_name, Postgres::connect(config, LOAD_STEP))
                            .await?;
                    }
                    // Abandoning the wait drops the connection: its transaction rolls back,
                    // and the next run runs the step again.
                    let waiting = format!("{LOAD_STEP} ({name} on postgres {})", pg.target);
                    deadline
                        .bound(&waiting, async {
                            Ok(postgres_step(config, lake, pg, step, unit, attempt).await)
                        })
                        .await?
                }
            };
            match outcome {
                Ok(Some(done)) => {
                    crate::fault::point(&format!("finished:{name}"));
                    record(unit, done.clone());
                    journal.save(Some(unit)).await?;
                    report.push(done);
                    break;
                }
                Ok(None) => break,
                Err((stop, rec)) => {
                    record(unit, rec.clone());
                    journal.save(Some(unit)).await?;
                    report.push(rec);
                    match stop {
                        Stop::Retry(msg) if tries < max_attempts => {
                            let pause = Duration::from_secs(1 << (tries - 1).min(6));
                            tracing::warn!(step = %name, attempt, error = %msg, "warehouse statement failed; retrying in {}s", pause.as_secs());
                            tokio::time::sleep(deadline.cap(pause)).await;
                            attempt += 1;
                            tries += 1;
                        }
                        Stop::Retry(msg) | Stop::Final(msg) => {
                            return Err(Error::Warehouse {
                                target: config.warehouse.kind.name().into(),
                                message: format!("{name}: {msg}"),
                            });
                        }
                        Stop::Error(e) => return Err(e),
                    }
                }
            }
        }
    }
    Ok(())
}

/// Replaces the step's record in the unit.
fn record(unit: &mut Unit, rec: StatementReport) {
    unit.statements.retain(|s| s.step != rec.step);
    unit.statements.push(rec);
}

type StepOutcome = std::result::Result<Option<StatementReport>, (Stop, StatementReport)>;

fn statement(name: &str, id: &str, status: &str, attempt: u32) -> StatementReport {
    StatementReport {
        step: name.to_string(),
        id: id.to_string(),
        status: status.to_string(),
        attempt,
        seconds: 0.0,
        rows: None,
        error: None,
    }
}

#[allow(clippy::too_many_arguments)]
async fn redshift_step(
    config: &Config,
    lake: &Lake,
    rs: &RedshiftData,
    journal: &Journal<'_>,
    step: &Step,
    unit: &mut Unit,
    attempt: u32,
    run_deadline: &Deadline,
) -> StepOutcome {
    let name = step.name();
    let failed = |id: &str, msg: String, stop: fn(String) -> Stop| {
        let mut rec = statement(&name, id, "failed", attempt);
        rec.error = Some(msg.clone());
        (stop(msg), rec)
    };
    let resumed = unit
        .statements
        .iter()
        .find(|s| s.step == name && s.status == "submitted" && s.attempt == attempt)
        .map(|s| s.id.clone());
    let id = match resumed {
        Some(id) => {
            tracing::info!(step = %name, statement = %id, "waiting again for a statement sent by an earlier run");
            id
        }
        None => {
            let sql = match step {
                Step::Sql { sql, .. } => sql.clone(),
                Step::Copy(table) => match copy_statement(config, lake, unit, table).await {
                    Ok(Some(sql)) => sql,
                    Ok(None) => return Ok(None),
                    Err(e) => return Err(failed("", e.to_string(), Stop::Retry)),
                },
            };
            let token = &sha256_hex(format!("{}\n{name}\n{attempt}", unit.id).as_bytes())[..32];
            let statement_name = format!(
                "sluice-{}-{}",
                config.pipeline_name(),
                name.replace(' ', "-")
            );
            let id = rs
                .submit(&sql, &unit.params, &statement_name, token)
                .await
                .map_err(|e| failed("", e.to_string(), Stop::Retry))?;
            record(unit, statement(&name, &id, "submitted", attempt));
            journal
                .save(Some(unit))
                .await
                .map_err(|e| failed(&id, e.to_string(), Stop::Retry))?;
            crate::fault::point(&format!("submitted:{name}"));
            id
        }
    };
    // Past the run's max_runtime the statement keeps running; the next run waits for it.
    let deadline = run_deadline.cap(config.warehouse.deadline());
    let capped = deadline < config.warehouse.deadline();
    match rs.wait(&id, deadline).await {
        Ok(Ended::Finished { seconds, rows }) => {
            let mut rec = statement(&name, &id, "finished", attempt);
            rec.seconds = seconds;
            rec.rows = rows;
            Ok(Some(rec))
        }
        Ok(Ended::Failed(text)) => Err(failed(&id, text, Stop::Retry)),
        Ok(Ended::Aborted(text)) => {
            let mut rec = statement(&name, &id, "aborted", attempt);
            rec.error = Some(text.clone());
            Err((
                Stop::Final(format!("statement {id} was aborted: {text}")),
                rec,
            ))
        }
        Ok(Ended::Running) if capped => Err((
            Stop::Error(run_deadline.reached(&format!(
                "{LOAD_STEP} (waiting for {name}, statement {id}, which keeps running)"
            ))),
            statement(&name, &id, "submitted", attempt),
        )),
        Ok(Ended::Running) => {
            let msg = format!(
                "statement {id} is still running after {}; Redshift keeps running it and the next run waits for it again",
                config.warehouse.deadline
            );
            Err((
                Stop::Final(msg),
                statement(&name, &id, "submitted", attempt),
            ))
        }
        // Polling failed (the network): the statement may be running; keep its id.
        Err(e) => Err((
            Stop::Final(e.to_string()),
            statement(&name, &id, "submitted", attempt),
        )),
    }
}

/// Writes the COPY manifest of a table's files in the unit and returns the COPY statement;
/// `None` when the unit added no file to the table.
async fn copy_statement(
    config: &Config,
    lake: &Lake,
    unit: &Unit,
    table: &str,
) -> Result<Option<String>> {
    let mut entries = Vec::new();
    for f in unit.files.get(table).into_iter().flatten() {
        match lake.head(&f.key).await? {
            Some(meta) => entries.push(serde_json::json!({
                "url": lake.object_url(&f.key),
                "mandatory": true,
                "meta": { "content_length": meta.size },
            })),
            None => {
                tracing::warn!(key = %f.key, "file to load is gone (its partition was rewritten since); skipped")
            }
        }
    }
    if entries.is_empty() {
        return Ok(None);
    }
    let key = manifest_key(&unit.run_id, table);
    lake.put_json(&key, &serde_json::json!({ "entries": entries }))
        .await?;
    let role = config.warehouse.iam_role.clone().unwrap_or_default();
    Ok(Some(format!(
        "COPY {} FROM {} IAM_ROLE {} FORMAT AS PARQUET MANIFEST",
        config.warehouse.load_into.replace("{table}", table),
        sql::quote_literal(&lake.object_url(&key)),
        sql::quote_literal(&role)
    )))
}

async fn postgres_step(
    config: &Config,
    lake: &Lake,
    pg: &mut Postgres,
    step: &Step,
    unit: &Unit,
    attempt: u32,
) -> StepOutcome {
    let name = step.name();
    let started = std::time::Instant::now();
    let failed = |id: &str, e: Error| {
        let mut rec = statement(&name, id, "failed", attempt);
        rec.error = Some(e.to_string());
        match e {
            // Not retried now: the statement ran for the whole timeout; the next run tries again.
            Error::Timeout { .. } => (Stop::Error(e), rec),
            e => (Stop::Retry(e.to_string()), rec),
        }
    };
    match step {
        Step::Copy(table) => {
            let files: Vec<TableFile> = unit
                .files
                .get(table)
                .into_iter()
                .flatten()
                .map(|f| TableFile {
                    key: f.key.clone(),
                    dir: f.dir.clone(),
                })
                .collect();
            if files.is_empty() {
                return Ok(None);
            }
            let target = config.warehouse.load_into.replace("{table}", table);
            let meta = TableMeta::load(lake, table)
                .await
                .map_err(|e| failed(&target, e))?
                .ok_or_else(|| {
                    failed(
                        &target,
                        Error::State {
                            path: table.to_string(),
                            message: "the table is not in the lake's catalog".into(),
                        },
                    )
                })?;
            let (rows, loaded, skipped) = pg
                .copy_files(lake, &meta, &target, &files)
                .await
                .map_err(|e| failed(&target, e))?;
            let status = if loaded == 0 && skipped > 0 {
                "skipped"
            } else {
                "finished"
            };
            let mut rec = statement(&name, &target, status, attempt);
            rec.rows = Some(rows as i64);
            rec.seconds = started.elapsed().as_secs_f64();
            Ok(Some(rec))
        }
        Step::Sql { sql, .. } => {
            let id = format!("{}:{name}", unit.id);
            let text = sql::inline(sql, &unit.params).map_err(|m| {
                failed(
                    &id,
                    Error::config(&config.path, format!("warehouse {name}: {m}")),
                )
            })?;
            let done = pg
                .execute_once(&text, &id)
                .await
                .map_err(|e| failed(&id, e))?;
            let mut rec = statement(
                &name,
                &id,
                if done.is_some() {
                    "finished"
                } else {
                    "skipped"
                },
                attempt,
            );
            rec.rows = done.map(|r| r as i64);
            rec.seconds = started.elapsed().as_secs_f64();
            Ok(Some(rec))
        }
    }
}

/// Where an external warehouse stands, for `sluice status`.
#[derive(Debug, Serialize)]
pub struct WarehouseStatus {
    /// `redshift` or `postgres`.
    pub kind: String,
    /// Commits the warehouse has.
    pub commits_loaded: usize,
    /// Commits not loaded yet (the unit in flight included).
    pub commits_waiting: usize,
    /// The statements of the unit in flight: a run stopped before it finished.
    pub inflight: Vec<StatementReport>,
}

/// The warehouse's state, if one is configured.
pub async fn status(
    config: &Config,
    lake: &Lake,
    ledger: &Ledger,
) -> Result<Option<WarehouseStatus>> {
    let kind = config.warehouse.kind;
    if kind == WarehouseKind::Embedded {
        return Ok(None);
    }
    let state: LoadState = lake.get_json(&state_key(kind)).await?.unwrap_or_default();
    Ok(Some(WarehouseStatus {
        kind: kind.name().to_string(),
        commits_loaded: state.done.len(),
        commits_waiting: ledger
            .commits
            .iter()
            .filter(|c| !state.done.contains(*c))
            .count(),
        inflight: state.inflight.map(|u| u.statements).unwrap_or_default(),
    }))
}

/// The commits the warehouse has not loaded yet (a unit in flight included), by the lake tables
/// they changed, when its load copies the files commits added (`load = "copy"`); only tables the
/// load takes, only tables with such commits. Compacting such a table before its commits are
/// loaded would replace the files the load is to copy, and their rows would never reach the
/// warehouse.
pub async fn unloaded_commits(
    config: &Config,
    lake: &Lake,
) -> Result<BTreeMap<String, Vec<String>>> {
    let w = &config.warehouse;
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if w.kind == WarehouseKind::Embedded || w.load.as_deref() != Some("copy") {
        return Ok(out);
    }
    let tables: BTreeSet<String> = load_tables(config).into_iter().collect();
    let state: LoadState = lake.get_json(&state_key(w.kind)).await?.unwrap_or_default();
    let ledger = Ledger::load(lake).await?;
    for c in ledger.commits.iter().filter(|c| !state.done.contains(*c)) {
        for t in ledger.changed_tables.get(c).into_iter().flatten() {
            if tables.contains(t) {
                out.entry(t.clone()).or_default().push(c.clone());
            }
        }
    }
    Ok(out)
}

/// `sluice warehouse deploy`: runs every `.sql` file of the deploy folder in name order, with
/// `:name` parameters inlined as literals (DDL takes no bind parameters). Returns the files run.
pub async fn deploy(config: &Config) -> Result<Vec<(String, usize)>> {
    let w = &config.warehouse;
    if w.kind == WarehouseKind::Embedded {
        return Err(Error::config(
            &config.path,
            "warehouse deploy needs [warehouse] kind = \"redshift-data\" or \"postgres\"",
        ));
    }
    let dir = config.resolve(
        &w.deploy
            .clone()
            .unwrap_or_else(|| format!("queries/{}", w.kind.name()).into()),
    );
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map_err(|e| {
            Error::config(
                &config.path,
                format!("warehouse deploy folder {}: {e}", dir.display()),
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    let mut params = parameters(config, &crate::report::new_run_id(), Utc::now());
    for (k, v) in [
        ("iam_role", &w.iam_role),
        ("database", &w.database),
        ("glue_database", &config.catalog.database),
    ] {
        if let Some(v) = v {
            params.entry(k.to_string()).or_insert_with(|| v.clone());
        }
    }
    let backend = Backend::connect(config, "warehouse deploy", &Deadline::none()).await?;
    let mut out = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
        let statements = sql::split_statements(&text);
        let shown = path.display().to_string();
        for (i, stmt) in statements.iter().enumerate() {
            let sql = sql::inline(stmt, &params)
                .map_err(|m| Error::config(&path, format!("statement {}: {m}", i + 1)))?;
            let at = |message: String| Error::Warehouse {
                target: w.kind.name().into(),
                message: format!("{shown} statement {}: {message}", i + 1),
            };
            match &backend {
                Backend::Postgres(pg) => pg.batch(&sql).await.map_err(|e| at(e.to_string()))?,
                Backend::Redshift(rs) => {
                    let token =
                        &sha256_hex(format!("{}\n{shown}\n{i}\n{}", sql, Utc::now()).as_bytes())
                            [..32];
                    let id = rs
                        .submit(&sql, &BTreeMap::new(), "sluice-deploy", token)
                        .await
                        .map_err(|e| at(e.to_string()))?;
                    match rs.wait(&id, w.deadline()).await? {
                        Ended::Finished { .. } => {}
                        Ended::Failed(t) | Ended::Aborted(t) => return Err(at(t)),
                        Ended::Running => {
                            return Err(at(format!(
                                "statement {id} still running after {}",
                                w.deadline
                            )));
                        }
                    }
                }
            }
        }
        out.push((shown, statements.len()));
    }
    Ok(out)
}
