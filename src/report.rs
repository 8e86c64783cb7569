//! The run report: what each file and table went through, written to `_sluice/runs/` and
//! printed as JSON or as a short human summary.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// How a run ended.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Every file it took was committed.
    Succeeded,
    /// Some file, the warehouse or the accounting failed.
    Failed,
    /// No new files.
    NothingToDo,
}

impl RunStatus {
    /// How people read it: `succeeded`, `FAILED`, `nothing to do`.
    pub fn label(self) -> &'static str {
        match self {
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "FAILED",
            RunStatus::NothingToDo => "nothing to do",
        }
    }

    /// As in the JSON report: `succeeded`, `failed`, `nothing_to_do`.
    pub fn name(self) -> &'static str {
        match self {
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::NothingToDo => "nothing_to_do",
        }
    }
}

/// What happened to one raw file.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FileStatus {
    /// Its rows were committed.
    Processed,
    /// Its content was committed before (under this or another name): skipped.
    Duplicate,
    /// It could not be processed; it stays in `raw/` (or moved to `failed/`).
    Failed,
}

/// One file's line in the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileReport {
    /// Source name.
    pub source: String,
    /// Key in the lake.
    pub key: String,
    /// Outcome.
    pub status: FileStatus,
    /// Rows read, malformed records included.
    pub rows_read: u64,
    /// Rows now in the processed table.
    pub rows_written: u64,
    /// Rows sent to the rejected table.
    pub rows_rejected: u64,
    /// Rows dropped as duplicates.
    pub rows_duplicate: u64,
    /// Of the rejected rows: CSV records with an unclosed quote, each rejected alone (reading
    /// went on at the next line).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unclosed_quotes: u64,
    /// Why it failed, or what it duplicates.
    pub error: Option<String>,
    /// Where the raw file went (archive or failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_to: Option<String>,
    /// Its size in bytes (as stored: compressed files compressed).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bytes: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl FileReport {
    /// A file with no rows counted yet.
    pub fn new(source: &str, key: &str, status: FileStatus) -> FileReport {
        FileReport {
            source: source.to_string(),
            key: key.to_string(),
            status,
            rows_read: 0,
            rows_written: 0,
            rows_rejected: 0,
            rows_duplicate: 0,
            unclosed_quotes: 0,
            error: None,
            moved_to: None,
            bytes: 0,
        }
    }

    /// Whether read = written + rejected + duplicate.
    pub fn balanced(&self) -> bool {
        self.status == FileStatus::Failed
            || self.rows_read == self.rows_written + self.rows_rejected + self.rows_duplicate
    }
}

/// One table's line in the report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TableReport {
    /// Rows added to the processed table.
    pub rows_written: u64,
    /// Rows added to the rejected table.
    pub rows_rejected: u64,
    /// Rows dropped as duplicates.
    pub rows_duplicate: u64,
    /// Older rows of the table replaced by newer versions of their key.
    pub rows_replaced: u64,
    /// Files of the table rewritten without replaced rows.
    #[serde(default)]
    pub files_rewritten: u64,
    /// Bytes of the files rewritten (their size before).
    #[serde(default)]
    pub bytes_rewritten: u64,
    /// Partition files the batch's dedup index was settled from, having outgrown its share of
    /// the memory limit (0: it stayed in memory).
    #[serde(default)]
    pub dedup_spilled_partitions: u64,
    /// Key entries the dedup index wrote to those files.
    #[serde(default)]
    pub dedup_spilled_keys: u64,
    /// Partition folders written.
    pub partitions: Vec<String>,
    /// The key index was rebuilt from the table's files, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_rebuilt: Option<String>,
}

impl TableReport {
    /// Adds another batch's line of the same table (a run of several batches).
    pub fn add(&mut self, other: TableReport) {
        self.rows_written += other.rows_written;
        self.rows_rejected += other.rows_rejected;
        self.rows_duplicate += other.rows_duplicate;
        self.rows_replaced += other.rows_replaced;
        self.files_rewritten += other.files_rewritten;
        self.bytes_rewritten += other.bytes_rewritten;
        self.dedup_spilled_partitions += other.dedup_spilled_partitions;
        self.dedup_spilled_keys += other.dedup_spilled_keys;
        self.partitions.extend(other.partitions);
        self.partitions.sort();
        self.partitions.dedup();
        self.index_rebuilt = self.index_rebuilt.take().or(other.index_rebuilt);
    }
}

/// One aggregate of the warehouse.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AggregateReport {
    /// Aggregate name.
    pub name: String,
    /// Rows it holds now.
    pub rows: u64,
    /// Time taken.
    pub seconds: f64,
    /// `incremental` (recomputed for the partitions new commits touched, stored partitioned)
    /// or `whole` (rebuilt whole, one file).
    #[serde(default)]
    pub mode: String,
    /// An incremental aggregate's partition column (of its input table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_column: Option<String>,
    /// The partition values recomputed (every one on a full build of an incremental aggregate).
    #[serde(default)]
    pub partitions: Vec<String>,
    /// Why it was built whole this time (always for `whole`; an incremental aggregate's first
    /// build, a changed query, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuilt_whole: Option<String>,
}

impl AggregateReport {
    /// `incremental by event_date: 2 partitions recomputed (2024-03-02, 2024-03-03)`, or
    /// `rebuilt whole: joins two tables (a, b)`.
    pub fn describe(&self) -> String {
        let list = |v: &[String]| {
            let mut s = v.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
            if v.len() > 5 {
                s.push_str(&format!(", ... {} more", v.len() - 5));
            }
            s
        };
        let n = self.partitions.len();
        let plural = if n == 1 { "" } else { "s" };
        match (&self.partition_column, &self.rebuilt_whole) {
            (Some(c), None) if n == 0 => format!("incremental by {c}: no partition recomputed"),
            (Some(c), None) => format!(
                "incremental by {c}: {n} partition{plural} recomputed ({})",
                list(&self.partitions)
            ),
            (Some(c), Some(why)) => {
                format!("incremental by {c}, built whole ({why}): {n} partition{plural}")
            }
            (None, Some(why)) => format!("rebuilt whole: {why}"),
            (None, None) => "rebuilt whole".to_string(),
        }
    }
}

/// One statement a run sent to an external warehouse.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatementReport {
    /// The step: `load <table>`, `load` or `call <n>`.
    pub step: String,
    /// The warehouse's id for it (a Data API statement id; a load marker on PostgreSQL).
    pub id: String,
    /// `submitted`, `finished`, `failed`, `aborted` or `skipped` (done before, by its marker).
    pub status: String,
    /// Which attempt this is (1 = first).
    pub attempt: u32,
    /// Time the warehouse spent on it.
    pub seconds: f64,
    /// Rows it loaded or changed, where the warehouse says.
    pub rows: Option<i64>,
    /// The warehouse's own error text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One maintenance operation on a table (`compact`, `vacuum`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MaintenanceReport {
    /// The table's folder, e.g. `processed/app_logs`.
    pub table: String,
    /// `compact`, `vacuum` or `vacuum (dry run)`.
    pub operation: String,
    /// Files written.
    pub files_added: u64,
    /// Files taken out of the table (compact) or deleted (vacuum).
    pub files_removed: u64,
    /// The table version it made, if it committed one.
    pub version: Option<u64>,
    /// Time taken.
    pub seconds: f64,
    /// Compact: the folder's data files before.
    #[serde(default)]
    pub files_before: u64,
    /// Compact: its data files after.
    #[serde(default)]
    pub files_after: u64,
    /// Compact: the bytes of its data files before.
    #[serde(default)]
    pub bytes_before: u64,
    /// Compact: the bytes of its data files after.
    #[serde(default)]
    pub bytes_after: u64,
}

/// The report of one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    /// Sortable id: start time and a random suffix.
    pub run_id: String,
    /// How it ended.
    pub status: RunStatus,
    /// Start.
    pub started_at: DateTime<Utc>,
    /// End.
    pub finished_at: DateTime<Utc>,
    /// Files taken by this run.
    pub files: Vec<FileReport>,
    /// Tables changed by this run.
    pub tables: BTreeMap<String, TableReport>,
    /// Aggregates rebuilt by this run.
    pub warehouse: Vec<AggregateReport>,
    /// Statements sent to an external warehouse (`[warehouse] kind = "redshift-data"` or
    /// `"postgres"`).
    #[serde(default)]
    pub statements: Vec<StatementReport>,
    /// Maintenance done by `compact` or `vacuum`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub maintenance: Vec<MaintenanceReport>,
    /// Results of the tables' data checks (`[[table.check]]`) on this run's batches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<crate::checks::CheckResult>,
    /// Errors outside single files (warehouse, notifications, accounting).
    pub errors: Vec<String>,
    /// What a person should know that is not an error (an aggregate not built yet, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Seconds spent in each step.
    pub timings: BTreeMap<String, f64>,
    /// Requests to the lake's store in each step, per kind (`GET`, `HEAD`, `PUT`, `POST`,
    /// `LIST`, `COPY`, `DELETE`: a `DeleteObjects` of up to 1,000 keys, `RENAME` in a folder).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, BTreeMap<String, u64>>,
    /// All of them divided by the files the run took (0 without files).
    #[serde(default, skip_serializing_if = "is_zero_f64")]
    pub requests_per_file: f64,
    /// Whether the lake is in S3 (the summary then counts its requests).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub s3: bool,
    /// Late sources and missing partitions after the run ([`crate::freshness`]), when the
    /// config asks for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freshness: Option<crate::freshness::RunFreshness>,
}

fn is_zero_f64(n: &f64) -> bool {
    *n == 0.0
}

impl RunReport {
    /// An empty report for a starting run.
    pub fn start(run_id: &str) -> RunReport {
        let now = Utc::now();
        RunReport {
            run_id: run_id.to_string(),
            status: RunStatus::NothingToDo,
            started_at: now,
            finished_at: now,
            files: Vec::new(),
            tables: BTreeMap::new(),
            warehouse: Vec::new(),
            statements: Vec::new(),
            maintenance: Vec::new(),
            checks: Vec::new(),
            errors: Vec::new(),
            warnings: Vec::new(),
            timings: BTreeMap::new(),
            requests: BTreeMap::new(),
            requests_per_file: 0.0,
            s3: false,
            freshness: None,
        }
    }

    /// Adds requests to a step.
    pub fn add_requests(&mut self, step: &str, counts: BTreeMap<String, u64>) {
        if counts.is_empty() {
            return;
        }
        let into = self.requests.entry(step.to_string()).or_default();
        for (kind, n) in counts {
            *into.entry(kind).or_default() += n;
        }
    }

    /// The requests of every step, per kind.
    pub fn request_totals(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for counts in self.requests.values() {
            for (kind, n) in counts {
                *out.entry(kind.clone()).or_default() += n;
            }
        }
        out
    }

    /// Adds time to a step.
    pub fn time(&mut self, step: &str, since: std::time::Instant) {
        *self.timings.entry(step.to_string()).or_default() += since.elapsed().as_secs_f64();
    }

    /// Sets the final status and end time; checks the accounting of every file.
    pub fn finish(&mut self) {
        for f in &self.files {
            if !f.balanced() {
                self.errors.push(format!(
                    "row accounting does not balance for {}: read {} != written {} + rejected {} + duplicate {}",
                    f.key, f.rows_read, f.rows_written, f.rows_rejected, f.rows_duplicate
                ));
            }
        }
        self.finished_at = Utc::now();
        let total: u64 = self.request_totals().values().sum();
        if !self.files.is_empty() {
            self.requests_per_file =
                (total as f64 / self.files.len() as f64 * 100.0).round() / 100.0;
        }
        self.status = if !self.errors.is_empty()
            || self.files.iter().any(|f| f.status == FileStatus::Failed)
        {
            RunStatus::Failed
        } else if self.files.is_empty() && self.warehouse.is_empty() && self.statements.is_empty() {
            RunStatus::NothingToDo
        } else {
            RunStatus::Succeeded
        };
    }

    /// Number of files with this status.
    pub fn count(&self, status: FileStatus) -> usize {
        self.files.iter().filter(|f| f.status == status).count()
    }

    /// A few lines for people.
    pub fn summary(&self) -> String {
        let secs = (self.finished_at - self.started_at).num_milliseconds() as f64 / 1000.0;
        let mut out = format!(
            "run {} {} in {secs:.2}s\n",
            self.run_id,
            self.status.label()
        );
        if !self.files.is_empty() {
            out.push_str(&format!(
                "  files: {} processed, {} duplicate, {} failed\n",
                self.count(FileStatus::Processed),
                self.count(FileStatus::Duplicate),
                self.count(FileStatus::Failed)
            ));
        }
        for (name, t) in &self.tables {
            out.push_str(&format!(
                "  {name}: {} written, {} rejected, {} duplicate, {} replaced, {} partitions\n",
                t.rows_written,
                t.rows_rejected,
                t.rows_duplicate,
                t.rows_replaced,
                t.partitions.len()
            ));
            if t.files_rewritten > 0 {
                out.push_str(&format!(
                    "  {name}: {} files rewritten ({:.1} MB)\n",
                    t.files_rewritten,
                    t.bytes_rewritten as f64 / 1e6
                ));
            }
            if let Some(why) = &t.index_rebuilt {
                out.push_str(&format!("  {name}: key index rebuilt ({why})\n"));
            }
        }
        if !self.checks.is_empty() {
            let failed: Vec<&crate::checks::CheckResult> =
                self.checks.iter().filter(|c| !c.passed).collect();
            out.push_str(&format!(
                "  checks: {} run, {} failed\n",
                self.checks.len(),
                failed.len()
            ));
            for c in failed {
                out.push_str(&format!("  check {}\n", c.line()));
            }
        }
        if self.s3 && !self.requests.is_empty() {
            let totals = self.request_totals();
            let kinds: Vec<String> = totals.iter().map(|(k, n)| format!("{k} {n}")).collect();
            let per_file = match self.files.len() {
                0 => String::new(),
                _ => format!(" ({:.1} a file)", self.requests_per_file),
            };
            out.push_str(&format!(
                "  requests: {} to S3{per_file}: {}\n",
                totals.values().sum::<u64>(),
                kinds.join(", ")
            ));
        }
        for a in &self.warehouse {
            out.push_str(&format!(
                "  warehouse {}: {} rows, {}\n",
                a.name,
                a.rows,
                a.describe()
            ));
        }
        for st in &self.statements {
            let rows = st.rows.map(|r| format!(", {r} rows")).unwrap_or_default();
            let attempt = match st.attempt {
                0 | 1 => String::new(),
                n => format!(", attempt {n}"),
            };
            out.push_str(&format!(
                "  warehouse {}: {}{rows}, {:.2}s{attempt} (id {})\n",
                st.step, st.status, st.seconds, st.id
            ));
        }
        for m in &self.maintenance {
            out.push_str(&format!(
                "  {} {}: {} files added, {} files removed{}{} in {:.2}s\n",
                m.operation,
                m.table,
                m.files_added,
                m.files_removed,
                m.version
                    .map(|v| format!(", version {v}"))
                    .unwrap_or_default(),
                if m.operation == "compact" {
                    format!(
                        "; {} -> {} files, {} -> {} bytes",
                        m.files_before, m.files_after, m.bytes_before, m.bytes_after
                    )
                } else {
                    String::new()
                },
                m.seconds
            ));
        }
        for f in self.files.iter().filter(|f| f.unclosed_quotes > 0) {
            out.push_str(&format!(
                "  warning {}: {} records with an unclosed quote rejected (each alone, reading \
                 went on at the next line)\n",
                f.key, f.unclosed_quotes
            ));
        }
        for f in self.files.iter().filter(|f| f.status == FileStatus::Failed) {
            out.push_str(&format!(
                "  failed {}: {}\n",
                f.key,
                f.error.as_deref().unwrap_or("unknown error")
            ));
        }
        if let Some(f) = &self.freshness {
            out.push_str(&f.summary());
        }
        for w in &self.warnings {
            out.push_str(&format!("  warning: {w}\n"));
        }
        for e in &self.errors {
            out.push_str(&format!("  error: {e}\n"));
        }
        out
    }
}

/// The lake key of a run's saved report: `_sluice/runs/<run_id>.json`.
pub fn run_key(run_id: &str) -> String {
    format!("{}/runs/{run_id}.json", crate::lake::STATE)
}

/// A new run id: UTC time, then 6 hex digits.
pub fn new_run_id() -> String {
    let now = Utc::now();
    let salt = crate::ledger::sha256_hex(
        format!(
            "{}{}{:?}",
            now.timestamp_nanos_opt().unwrap_or(0),
            std::process::id(),
            std::thread::current().id()
        )
        .as_bytes(),
    );
    format!("{}-{}", now.format("%Y%m%dT%H%M%S%.3fZ"), &salt[..6])
}

static METRICS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turns on CloudWatch Embedded Metric Format records after each run (`--log-format json`, the
/// Lambda runtime).
pub fn enable_metrics() {
    METRICS.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`enable_metrics`] was called.
pub fn metrics_enabled() -> bool {
    METRICS.load(std::sync::atomic::Ordering::Relaxed)
}

/// One CloudWatch Embedded Metric Format record per table the run touched (its source had files,
/// or the table changed): rows read, written, rejected and duplicate, the bytes of its raw files,
/// the run's duration in seconds and whether it failed, in namespace `sluice` with the
/// dimensions pipeline and table; `status` and `run_id` ride along as properties. CloudWatch
/// Logs turns each into metrics, so alarms need no log parsing.
pub fn metric_records(
    report: &RunReport,
    config: &crate::config::Config,
) -> Vec<serde_json::Value> {
    let pipeline = config.pipeline_name();
    let seconds = (report.finished_at - report.started_at)
        .to_std()
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let status = match report.status {
        RunStatus::Succeeded => "succeeded",
        RunStatus::Failed => "failed",
        RunStatus::NothingToDo => "nothing_to_do",
    };
    let mut out = Vec::new();
    for t in &config.tables {
        let files: Vec<&FileReport> = report
            .files
            .iter()
            .filter(|f| f.source == t.source)
            .collect();
        let changed = report.tables.get(&t.name);
        if files.is_empty() && changed.is_none() {
            continue;
        }
        let sum = |f: fn(&FileReport) -> u64| files.iter().map(|x| f(x)).sum::<u64>();
        let failed = files
            .iter()
            .filter(|f| f.status == FileStatus::Failed)
            .count() as u64;
        let metrics = [
            ("rows_read", sum(|f| f.rows_read), "Count"),
            ("rows_written", sum(|f| f.rows_written), "Count"),
            ("rows_rejected", sum(|f| f.rows_rejected), "Count"),
            ("rows_duplicate", sum(|f| f.rows_duplicate), "Count"),
            ("bytes", sum(|f| f.bytes), "Bytes"),
            ("files_failed", failed, "Count"),
        ];
        let mut record = serde_json::json!({
            "_aws": {
                "Timestamp": report.finished_at.timestamp_millis(),
                "CloudWatchMetrics": [{
                    "Namespace": "sluice",
                    "Dimensions": [["pipeline", "table"]],
                    "Metrics": metrics.iter().map(|(n, _, u)| serde_json::json!({"Name": n, "Unit": u}))
                        .chain([
                            serde_json::json!({"Name": "duration", "Unit": "Seconds"}),
                            serde_json::json!({"Name": "failed", "Unit": "Count"}),
                        ])
                        .collect::<Vec<_>>(),
                }],
            },
            "pipeline": pipeline,
            "table": t.name,
            "run_id": report.run_id,
            "status": status,
            "duration": seconds,
            "failed": u64::from(report.status == RunStatus::Failed),
        });
        for (n, v, _) in metrics {
            record[n] = serde_json::json!(v);
        }
        out.push(record);
    }
    out
}
