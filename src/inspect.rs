//! `status` and `query`: looking at a lake without changing it.

use std::collections::BTreeMap;

use datafusion::arrow::datatypes::Schema;
use datafusion::arrow::record_batch::RecordBatch;
use serde::Serialize;
use std::sync::Arc;

use crate::cli::OutputFormat;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::lake::{Lake, STATE};
use crate::ledger::Ledger;
use crate::report::RunReport;
use crate::source;
use crate::transform;

/// The state of a lake.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Lake folder.
    pub lake: String,
    /// Raw files committed so far.
    pub processed_files: usize,
    /// Raw files waiting in `raw/`, per source.
    pub pending: BTreeMap<String, Vec<String>>,
    /// Files moved to `failed/`.
    pub failed: Vec<String>,
    /// The last runs, newest first.
    pub last_runs: Vec<RunLine>,
    /// The external warehouse's loads, if one is configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warehouse: Option<crate::warehouse::remote::WarehouseStatus>,
    /// Sources with `expect_every` or `expect_at`: last arrival, late or on time.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub freshness: Vec<crate::freshness::SourceFreshness>,
    /// Tables with `expect_partitions`: their missing partitions.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<crate::freshness::PartitionGaps>,
    /// The time freshness was judged at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub now: Option<chrono::DateTime<chrono::Utc>>,
}

/// One run in the status.
#[derive(Debug, Serialize)]
pub struct RunLine {
    /// Run id.
    pub run_id: String,
    /// Outcome.
    pub status: crate::report::RunStatus,
    /// Files taken.
    pub files: usize,
    /// Rows written over all tables.
    pub rows_written: u64,
}

/// The raw files of each source not committed yet (of the source's format), by source.
pub async fn pending(
    config: &Config,
    lake: &Lake,
    ledger: &Ledger,
) -> Result<BTreeMap<String, Vec<object_store::ObjectMeta>>> {
    let mut pending = BTreeMap::new();
    for s in &config.sources {
        let mut files = Vec::new();
        for m in lake.list(&s.raw_prefix()).await? {
            let key = m.location.to_string();
            if source::matches_format(&key, s.format)
                && ledger.committed(&key, m.size, m.last_modified).is_none()
            {
                files.push(m);
            }
        }
        pending.insert(s.name.clone(), files);
    }
    Ok(pending)
}

/// Gathers the status of a lake.
pub async fn status(config: &Config, lake: &Lake) -> Result<Status> {
    let ledger = Ledger::load(lake).await?;
    let now = crate::freshness::now();
    let pending = pending(config, lake, &ledger)
        .await?
        .into_iter()
        .map(|(s, metas)| {
            (
                s,
                metas.into_iter().map(|m| m.location.to_string()).collect(),
            )
        })
        .collect();
    let failed = lake
        .list("failed")
        .await?
        .into_iter()
        .map(|m| m.location.to_string())
        .filter(|k| !k.ends_with(".error.json"))
        .collect();
    let mut runs = lake.list(&format!("{STATE}/runs")).await?;
    runs.reverse();
    let mut last_runs = Vec::new();
    for m in runs.into_iter().take(5) {
        if let Some(r) = lake.get_json::<RunReport>(m.location.as_ref()).await? {
            last_runs.push(RunLine {
                run_id: r.run_id,
                status: r.status,
                files: r.files.len(),
                rows_written: r.tables.values().map(|t| t.rows_written).sum(),
            });
        }
    }
    Ok(Status {
        lake: lake.location(),
        processed_files: ledger.file_count(),
        pending,
        failed,
        last_runs,
        warehouse: crate::warehouse::remote::status(config, lake, &ledger).await?,
        freshness: crate::freshness::sources(config, lake, &ledger, now).await?,
        partitions: crate::freshness::all_gaps(config, lake).await?,
        now: crate::freshness::configured(config).then_some(now),
    })
}

impl Status {
    /// Lines for people.
    pub fn human(&self) -> String {
        let mut out = format!(
            "lake {}\n  processed files: {}\n",
            self.lake, self.processed_files
        );
        for (source, keys) in &self.pending {
            out.push_str(&format!("  pending in {source}: {}\n", keys.len()));
            for k in keys.iter().take(10) {
                out.push_str(&format!("    {k}\n"));
            }
        }
        out.push_str(&format!("  failed: {}\n", self.failed.len()));
        for k in &self.failed {
            out.push_str(&format!("    {k}\n"));
        }
        out.push_str("  last runs:\n");
        for r in &self.last_runs {
            out.push_str(&format!(
                "    {} {:?} files={} rows_written={}\n",
                r.run_id, r.status, r.files, r.rows_written
            ));
        }
        for f in &self.freshness {
            let last = f
                .last_arrival
                .map(|t| t.to_rfc3339())
                .unwrap_or_else(|| "never".into());
            let state = match (f.late, f.late_since) {
                (true, Some(since)) => format!("LATE since {}", since.to_rfc3339()),
                (true, None) => "LATE (nothing arrived yet)".to_string(),
                (false, _) => "on time".to_string(),
            };
            out.push_str(&format!(
                "  source {}: last arrival {last}, expected {}: {state}\n",
                f.source,
                crate::freshness::expectation_text(f)
            ));
        }
        for g in &self.partitions {
            let range = match (g.first, g.last) {
                (Some(a), Some(b)) => format!("{a} to {b}"),
                _ => "no partitions yet".to_string(),
            };
            out.push_str(&format!(
                "  table {} ({} daily, {range}): {} missing\n",
                g.table,
                g.column,
                g.missing.len()
            ));
            for d in g.missing.iter().take(31) {
                out.push_str(&format!("    {d}\n"));
            }
            if g.missing.len() > 31 {
                out.push_str(&format!("    ... {} more\n", g.missing.len() - 31));
            }
            for v in &g.not_dates {
                out.push_str(&format!("    not a date: {v}\n"));
            }
        }
        if let Some(w) = &self.warehouse {
            out.push_str(&format!(
                "  warehouse {}: {} commits loaded, {} waiting\n",
                w.kind, w.commits_loaded, w.commits_waiting
            ));
            for st in &w.inflight {
                out.push_str(&format!(
                    "    unfinished unit: {} {} (id {}, attempt {})\n",
                    st.step, st.status, st.id, st.attempt
                ));
            }
        }
        out
    }
}

/// Runs SQL over the lake's tables; Delta tables at version `as_of`, or their latest.
pub async fn query(
    lake: &Lake,
    sql: &str,
    format: OutputFormat,
    engine: &crate::config::EngineConfig,
    as_of: Option<u64>,
) -> Result<String> {
    let ctx = transform::lake_session(
        engine,
        engine.threads(),
        crate::config::DEFAULT_MEMORY_LIMIT / 2,
    )?;
    crate::warehouse::register_all(&ctx, lake, as_of).await?;
    let df = ctx.sql(sql).await.map_err(|e| {
        let missing = e.to_string().contains("table '") && e.to_string().contains("not found");
        match transform::query_error(std::path::Path::new("(command line)"), sql, e) {
            Error::Query {
                file,
                line,
                message,
            } if missing => Error::Query {
                file,
                line,
                message: format!(
                    "{message} (a table exists once a run has written rows to it, an aggregate \
                     once its input tables have rows: see the last run's warnings)"
                ),
            },
            other => other,
        }
    })?;
    let out_schema = df.schema().as_arrow().clone();
    let batches = df
        .collect()
        .await
        .map_err(|e| transform::query_error(std::path::Path::new("(command line)"), sql, e))?;
    let (schema, batches) = transform::to_stored(&out_schema, &batches)?;
    format_batches(&schema, &batches, format)
}

/// Formats batches as a table, CSV or JSON.
pub fn format_batches(
    schema: &Arc<Schema>,
    batches: &[RecordBatch],
    format: OutputFormat,
) -> Result<String> {
    match format {
        OutputFormat::Table => {
            let mut all = batches.to_vec();
            if all.is_empty() {
                all.push(RecordBatch::new_empty(schema.clone()));
            }
            Ok(datafusion::arrow::util::pretty::pretty_format_batches(&all)?.to_string())
        }
        OutputFormat::Csv => {
            let mut buf = Vec::new();
            {
                let mut w = datafusion::arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(&mut buf);
                if batches.is_empty() {
                    w.write(&RecordBatch::new_empty(schema.clone()))?;
                }
                for b in batches {
                    w.write(b)?;
                }
            }
            String::from_utf8(buf).map_err(|e| Error::State {
                path: "csv output".into(),
                message: e.to_string(),
            })
        }
        OutputFormat::Json => {
            let mut buf = Vec::new();
            {
                let mut w = datafusion::arrow::json::ArrayWriter::new(&mut buf);
                for b in batches {
                    w.write(b)?;
                }
                w.finish()?;
            }
            let s = String::from_utf8(buf).map_err(|e| Error::State {
                path: "json output".into(),
                message: e.to_string(),
            })?;
            Ok(if s.is_empty() { "[]".to_string() } else { s })
        }
    }
}
