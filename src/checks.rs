//! Data checks (`[[table.check]]`, write-audit-publish): run on a batch's staged rows after
//! they are merged and written to local files, before the pending record and the uploads, so a
//! failing `error` check stages and publishes nothing; `sluice check TABLE` runs them on the
//! whole current table.

use std::path::PathBuf;
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::catalog::streaming::StreamingTable;
use datafusion::error::DataFusionError;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::prelude::SessionContext;
use serde::{Deserialize, Serialize};

use crate::catalog::TableMeta;
use crate::config::{CheckConfig, Config, Severity, TableConfig};
use crate::error::{Error, Result};
use crate::lake::Lake;
use crate::transform;

/// Offending rows of a check kept in the report.
pub const REPORT_ROWS: usize = 10;

/// The outcome of one check.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckResult {
    /// The table.
    pub table: String,
    /// The check's name (`name`, or the kind and its columns).
    pub name: String,
    /// Its kind (`not_null`, `sql`, ...).
    pub kind: String,
    /// `error` or `warn`.
    pub severity: Severity,
    /// Whether it passed (a skipped check passes).
    pub passed: bool,
    /// What was found, with its numbers.
    pub message: String,
    /// The first offending rows (sql, unique, accepted_values checks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rows: Vec<serde_json::Value>,
}

impl CheckResult {
    /// Whether this result fails the batch.
    pub fn fails(&self) -> bool {
        !self.passed && self.severity == Severity::Error
    }

    /// One line for people.
    pub fn line(&self) -> String {
        let state = match (self.passed, self.severity) {
            (true, _) => "passed",
            (false, Severity::Error) => "FAILED",
            (false, Severity::Warn) => "WARNING",
        };
        format!("{} {} {}: {}", self.table, self.name, state, self.message)
    }
}

/// The numbers of a batch that its batch checks need; `None` for the whole table.
#[derive(Debug, Clone, Copy, Default)]
pub struct BatchStats {
    /// Rows read from the batch's raw files.
    pub read: u64,
    /// Rows rejected.
    pub rejected: u64,
    /// Rows written.
    pub written: u64,
    /// Rows the previous commit of the table wrote, if there was one.
    pub previous: Option<u64>,
}

/// A summary of the failing `error` checks, for [`Error::ChecksFailed`].
pub fn summary(results: &[CheckResult]) -> Option<String> {
    let failed: Vec<String> = results
        .iter()
        .filter(|r| r.fails())
        .map(|r| format!("{} ({})", r.name, r.message))
        .collect();
    (!failed.is_empty()).then(|| failed.join("; "))
}

/// The staged files of a batch as one stream: read one after the other, their partition
/// columns restored from their folders, so memory stays bounded by a file's row group.
#[derive(Debug)]
struct StagedFiles {
    schema: SchemaRef,
    files: Vec<(PathBuf, String)>,
    partition_types: Vec<(String, DataType)>,
}

impl PartitionStream for StagedFiles {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let schema = self.schema.clone();
        let types = self.partition_types.clone();
        let files = self.files.clone();
        let batches = files.into_iter().flat_map(
            move |(path, dir)| -> Box<
                dyn Iterator<Item = std::result::Result<RecordBatch, DataFusionError>> + Send,
            > {
                let key = path.to_string_lossy().into_owned();
                let reader = std::fs::File::open(&path)
                    .map_err(|e| Error::io(format!("open {key}"), e))
                    .and_then(|f| crate::sink::local_batches(f, &key));
                let reader = match reader {
                    Ok(r) => r,
                    Err(e) => {
                        return Box::new(std::iter::once(Err(DataFusionError::External(
                            Box::new(e),
                        ))));
                    }
                };
                let values = crate::sink::parse_partition_dir(&dir);
                let schema = schema.clone();
                let types = types.clone();
                Box::new(reader.map(move |b| {
                    let b = b?;
                    crate::sink::restore_partitions(&b, &values, &types, &schema)
                        .map_err(|e| DataFusionError::External(Box::new(e)))
                }))
            },
        );
        Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            futures::stream::iter(batches),
        ))
    }
}

/// Registers a batch's staged files (local Parquet, `(path, partition folder)`) as the table
/// `name` of `ctx`, streamed.
pub fn register_staged(
    ctx: &SessionContext,
    name: &str,
    meta: &TableMeta,
    files: Vec<(PathBuf, String)>,
) -> Result<()> {
    let schema = meta.full_schema()?;
    let stream = StagedFiles {
        schema: schema.clone(),
        files,
        partition_types: meta.partition_types()?,
    };
    let table = StreamingTable::try_new(schema, vec![Arc::new(stream)])?;
    ctx.register_table(name, Arc::new(table))?;
    Ok(())
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The SQL file of a check, read.
fn sql_text(config: &Config, path: &std::path::Path) -> Result<(PathBuf, String)> {
    let file = config.resolve(path);
    let text = std::fs::read_to_string(&file)
        .map_err(|e| Error::config(&config.path, format!("cannot read {}: {e}", file.display())))?;
    Ok((file, text.trim().trim_end_matches(';').to_string()))
}

/// Runs SQL, returns its batches; errors name the check's file.
async fn collect(
    ctx: &SessionContext,
    file: &std::path::Path,
    sql: &str,
) -> Result<Vec<RecordBatch>> {
    let df = ctx
        .sql(sql)
        .await
        .map_err(|e| transform::query_error(file, sql, e))?;
    df.collect()
        .await
        .map_err(|e| transform::query_error(file, sql, e))
}

/// The first number of a one-row result.
fn first_u64(batches: &[RecordBatch]) -> u64 {
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::Int64Type;
    batches
        .iter()
        .find(|b| b.num_rows() > 0)
        .and_then(|b| {
            let c = datafusion::arrow::compute::cast(b.column(0), &DataType::Int64).ok()?;
            let c = c.as_primitive::<Int64Type>();
            (!c.is_null(0)).then(|| c.value(0).max(0) as u64)
        })
        .unwrap_or(0)
}

/// Rows as JSON objects, the first `limit`.
fn json_rows(batches: &[RecordBatch], limit: usize) -> Result<Vec<serde_json::Value>> {
    let mut buf = Vec::new();
    {
        let mut w = datafusion::arrow::json::ArrayWriter::new(&mut buf);
        let mut left = limit;
        for b in batches {
            if left == 0 {
                break;
            }
            let n = b.num_rows().min(left);
            w.write(&b.slice(0, n))?;
            left -= n;
        }
        w.finish()?;
    }
    if buf.is_empty() {
        return Ok(Vec::new());
    }
    Ok(serde_json::from_slice(&buf).unwrap_or_default())
}

/// The columns a check names that `columns` lacks.
fn missing_columns(check: &CheckConfig, columns: &[String]) -> Vec<String> {
    let mut named: Vec<&String> = Vec::new();
    if let Some(c) = &check.not_null {
        named.extend(c);
    }
    if let Some(c) = &check.unique {
        named.extend(c);
    }
    if let Some(a) = &check.accepted_values {
        named.push(&a.column);
    }
    named
        .into_iter()
        .filter(|n| !columns.contains(n))
        .cloned()
        .collect()
}

/// Plans every check of `table` against its table registered in `ctx` (no rows read):
/// named columns exist, SQL checks plan. Errors name the table, the check and the file.
pub async fn plan(ctx: &SessionContext, config: &Config, table: &TableConfig) -> Result<()> {
    let provider = ctx.table_provider(table.name.as_str()).await?;
    let columns: Vec<String> = provider
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    for (i, check) in table.check.iter().enumerate() {
        let missing = missing_columns(check, &columns);
        if !missing.is_empty() {
            return Err(Error::config(
                &config.path,
                format!(
                    "table {} check {} ({}): no column {} in the table's output (it has {})",
                    table.name,
                    i + 1,
                    check.label(),
                    missing.join(", "),
                    columns.join(", ")
                ),
            ));
        }
        if let Some(path) = &check.sql {
            let (file, sql) = sql_text(config, path)?;
            ctx.sql(&sql).await.map_err(|e| {
                let e = transform::query_error(&file, &sql, e);
                Error::config(
                    &config.path,
                    format!(
                        "table {} check {} ({}): {e}",
                        table.name,
                        i + 1,
                        check.label()
                    ),
                )
            })?;
        }
    }
    Ok(())
}

/// Runs the checks of `table` over its table registered in `ctx` under its name: a batch's
/// staged rows (with `stats`) or the whole table (`stats` `None`: batch checks are skipped).
pub async fn run(
    ctx: &SessionContext,
    config: &Config,
    table: &TableConfig,
    stats: Option<BatchStats>,
) -> Result<Vec<CheckResult>> {
    let t = quote(&table.name);
    let mut out = Vec::new();
    let mut count: Option<u64> = None;
    for check in &table.check {
        let kind = check.kind().map_err(|e| Error::config(&config.path, e))?;
        let mut rows = Vec::new();
        let (passed, message) = match kind {
            "max_reject_rate" => {
                let limit = check.max_reject_rate.unwrap_or_default();
                match stats {
                    None => (
                        true,
                        "a batch check; skipped on the whole table".to_string(),
                    ),
                    Some(s) => {
                        let rate = if s.read == 0 {
                            0.0
                        } else {
                            s.rejected as f64 / s.read as f64
                        };
                        (
                            rate <= limit,
                            format!(
                                "{} of {} rows rejected ({:.2}%, at most {:.2}%)",
                                s.rejected,
                                s.read,
                                rate * 100.0,
                                limit * 100.0
                            ),
                        )
                    }
                }
            }
            "row_count_change" => {
                let factor = check.row_count_change.unwrap_or(1.0);
                match stats {
                    None => (
                        true,
                        "a batch check; skipped on the whole table".to_string(),
                    ),
                    Some(BatchStats { previous: None, .. }) => (
                        true,
                        "skipped: no previous commit of the table to compare with".to_string(),
                    ),
                    Some(BatchStats {
                        written,
                        previous: Some(prev),
                        ..
                    }) => {
                        let (w, p) = (written as f64, prev as f64);
                        let ok = w <= p * factor && w * factor >= p;
                        (
                            ok,
                            format!(
                                "{written} rows written, the previous commit {prev} (within a factor of {factor})"
                            ),
                        )
                    }
                }
            }
            "min_rows" => {
                let min = check.min_rows.unwrap_or_default();
                let n = match count {
                    Some(n) => n,
                    None => {
                        let n = first_u64(
                            &collect(ctx, &config.path, &format!("SELECT count(*) FROM {t}"))
                                .await?,
                        );
                        count = Some(n);
                        n
                    }
                };
                (n >= min, format!("{n} rows (at least {min})"))
            }
            "not_null" => {
                let cols = check.not_null.clone().unwrap_or_default();
                let sums: Vec<String> = cols
                    .iter()
                    .map(|c| format!("sum(CASE WHEN {} IS NULL THEN 1 ELSE 0 END)", quote(c)))
                    .collect();
                let sql = format!("SELECT {} FROM {t}", sums.join(", "));
                let batches = collect(ctx, &config.path, &sql).await?;
                let mut nulls = Vec::new();
                for (i, c) in cols.iter().enumerate() {
                    let n = sum_column(&batches, i);
                    if n > 0 {
                        nulls.push(format!("{c}: {n} nulls"));
                    }
                }
                if nulls.is_empty() {
                    (true, format!("no nulls in {}", cols.join(", ")))
                } else {
                    (false, nulls.join(", "))
                }
            }
            "accepted_values" => {
                let Some(a) = check.accepted_values.clone() else {
                    continue;
                };
                let col = quote(&a.column);
                let list = a
                    .values
                    .iter()
                    .map(|v| literal(v))
                    .collect::<Vec<_>>()
                    .join(", ");
                let cond = if list.is_empty() {
                    format!("{col} IS NOT NULL")
                } else {
                    format!("{col} IS NOT NULL AND CAST({col} AS VARCHAR) NOT IN ({list})")
                };
                let sql = format!(
                    "SELECT CAST({col} AS VARCHAR) AS {col}, count(*) AS \"rows\" FROM {t} WHERE {cond} \
                     GROUP BY 1 ORDER BY 2 DESC, 1"
                );
                let batches = collect(ctx, &config.path, &sql).await?;
                rows = json_rows(&batches, REPORT_ROWS)?;
                let bad = sum_column(&batches, 1);
                if bad == 0 {
                    (true, format!("every {} accepted", a.column))
                } else {
                    let distinct: usize = batches.iter().map(RecordBatch::num_rows).sum();
                    (
                        false,
                        format!(
                            "{bad} rows with {distinct} values of {} not accepted",
                            a.column
                        ),
                    )
                }
            }
            "unique" => {
                let cols = check.unique.clone().unwrap_or_default();
                let list = cols.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ");
                let sql = format!(
                    "SELECT {list}, count(*) AS \"rows\" FROM {t} GROUP BY {list} HAVING count(*) > 1 \
                     ORDER BY count(*) DESC"
                );
                let batches = collect(ctx, &config.path, &sql).await?;
                rows = json_rows(&batches, REPORT_ROWS)?;
                let keys: usize = batches.iter().map(RecordBatch::num_rows).sum();
                if keys == 0 {
                    (true, format!("{} unique", cols.join(", ")))
                } else {
                    let extra = sum_column(&batches, cols.len()) - keys as u64;
                    (
                        false,
                        format!(
                            "{keys} values of {} repeated ({extra} extra rows)",
                            cols.join(", ")
                        ),
                    )
                }
            }
            _ => {
                let path = check.sql.clone().unwrap_or_default();
                let (file, sql) = sql_text(config, &path)?;
                let batches = collect(ctx, &file, &sql).await?;
                let n: usize = batches.iter().map(RecordBatch::num_rows).sum();
                rows = json_rows(&batches, REPORT_ROWS)?;
                if n == 0 {
                    (true, format!("{} returned no rows", file.display()))
                } else {
                    (false, format!("{} returned {n} rows", file.display()))
                }
            }
        };
        let result = CheckResult {
            table: table.name.clone(),
            name: check.label(),
            kind: kind.to_string(),
            severity: check.severity,
            passed,
            message,
            rows,
        };
        if result.passed {
            tracing::info!(table = %table.name, check = %result.name, "check passed");
        } else {
            tracing::warn!(table = %table.name, check = %result.name, message = %result.message, "check failed");
        }
        out.push(result);
    }
    Ok(out)
}

/// The sum of a numeric column over batches.
fn sum_column(batches: &[RecordBatch], i: usize) -> u64 {
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::Int64Type;
    let mut total = 0;
    for b in batches {
        let Ok(c) = datafusion::arrow::compute::cast(b.column(i), &DataType::Int64) else {
            continue;
        };
        let c = c.as_primitive::<Int64Type>();
        for k in 0..c.len() {
            if !c.is_null(k) {
                total += c.value(k).max(0) as u64;
            }
        }
    }
    total
}

/// `sluice check [TABLE]`: runs the checks of one table (or every table with checks) on the
/// whole current table; the text (or JSON) and whether no `error` check failed.
pub async fn check_command(
    config: &Config,
    lake: &Lake,
    table: Option<&str>,
    json: bool,
) -> Result<(String, bool)> {
    let tables: Vec<&TableConfig> = match table {
        Some(name) => vec![config.table(name).ok_or_else(|| {
            Error::config(&config.path, format!("no table {name} in the config"))
        })?],
        None => config
            .tables
            .iter()
            .filter(|t| !t.check.is_empty())
            .collect(),
    };
    let mut results = Vec::new();
    let mut notes = Vec::new();
    for t in tables {
        if t.check.is_empty() {
            notes.push(format!("{}: no checks", t.name));
            continue;
        }
        let Some(meta) = TableMeta::load(lake, &t.name).await? else {
            notes.push(format!(
                "{}: no rows yet (no run has written to it)",
                t.name
            ));
            continue;
        };
        let ctx = transform::lake_session(
            &config.engine,
            config.engine.threads(),
            config.engine.budget().pool_bytes,
        )?;
        crate::format::Format::of(&meta)
            .register(&ctx, lake, &meta, None)
            .await?;
        results.extend(run(&ctx, config, t, None).await?);
    }
    let ok = !results.iter().any(CheckResult::fails);
    let out = if json {
        serde_json::to_string_pretty(
            &serde_json::json!({ "ok": ok, "checks": results, "notes": notes }),
        )
        .unwrap_or_default()
    } else {
        let mut s: String = results.iter().map(|r| r.line() + "\n").collect();
        for n in &notes {
            s.push_str(&format!("{n}\n"));
        }
        s.push_str(if ok { "checks ok\n" } else { "checks failed\n" });
        s
    };
    Ok((out, ok))
}
