//! The warehouse step. The embedded warehouse: `[[aggregate]]` queries over the processed
//! tables, materialised as Parquet under `warehouse/<name>/` whenever the tables they read have
//! changed. External warehouses (Redshift, PostgreSQL) are loaded by [`remote`].

pub mod postgres;
pub mod redshift;
pub mod remote;
pub mod sql;

use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::catalog;
use crate::config::Config;
use crate::error::Result;
use crate::lake::{self, Lake, STATE};
use crate::ledger::{Ledger, sha256_hex};
use crate::report::AggregateReport;
use crate::sink;
use crate::transform;

/// What an aggregate was last built from.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BuildState {
    fingerprint: String,
    built_at: DateTime<Utc>,
    rows: u64,
}

/// The single file an aggregate is kept in (replaced atomically).
pub fn aggregate_key(name: &str) -> String {
    format!("{}/{name}.parquet", lake::warehouse_prefix(name))
}

/// Rebuilds the aggregates whose inputs changed since their last build. Returns the rebuilt
/// ones and a warning for each one that cannot be built yet.
pub async fn refresh(
    config: &Config,
    lake: &Lake,
    threads: usize,
) -> Result<(Vec<AggregateReport>, Vec<String>)> {
    let mut built = Vec::new();
    let mut waiting = Vec::new();
    if config.aggregates.is_empty() {
        return Ok((built, waiting));
    }
    let ledger = Ledger::load(lake).await?;
    let ctx = transform::session(threads, config.engine.budget().limit / 2);
    let registered = catalog::register_all(&ctx, lake, None).await?;
    for agg in &config.aggregates {
        let path = config.resolve(&agg.query);
        let sql = transform::load_query(&path)?;
        let df = match ctx.sql(&sql).await {
            Ok(df) => df,
            Err(e) => {
                let missing = config
                    .tables
                    .iter()
                    .find(|t| !registered.contains(&t.name) && e.to_string().contains(&t.name));
                if let Some(t) = missing {
                    tracing::warn!(aggregate = %agg.name, table = %t.name, "not built yet: the table has no data");
                    waiting.push(format!(
                        "aggregate {} not built yet: its input table {} has no data",
                        agg.name, t.name
                    ));
                    continue;
                }
                return Err(transform::query_error(&path, &sql, e));
            }
        };
        let deps = transform::referenced_tables(df.logical_plan());
        let fingerprint = sha256_hex(format!("{}\n{sql}", ledger.fingerprint(&deps)).as_bytes());
        let state_key = format!("{STATE}/warehouse/{}.json", agg.name);
        let state: Option<BuildState> = lake.get_json(&state_key).await?;
        if state.is_some_and(|s| s.fingerprint == fingerprint)
            && lake.exists(&aggregate_key(&agg.name)).await?
        {
            continue;
        }
        let t = Instant::now();
        let out_schema = df.schema().as_arrow().clone();
        let batches = df
            .collect()
            .await
            .map_err(|e| transform::query_error(&path, &sql, e))?;
        let (schema, batches) = transform::to_stored(&out_schema, &batches)?;
        let rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
        let data = sink::encode_parquet(&schema, &batches, "zstd")?;
        lake.put(&aggregate_key(&agg.name), data).await?;
        lake.put_json(
            &state_key,
            &BuildState {
                fingerprint,
                built_at: Utc::now(),
                rows,
            },
        )
        .await?;
        tracing::info!(aggregate = %agg.name, rows, "aggregate rebuilt");
        built.push(AggregateReport {
            name: agg.name.clone(),
            rows,
            seconds: t.elapsed().as_secs_f64(),
        });
    }
    Ok((built, waiting))
}

/// Plans every aggregate against the given (empty) tables, for `validate`.
pub async fn plan_all(config: &Config, ctx: &datafusion::prelude::SessionContext) -> Result<()> {
    for agg in &config.aggregates {
        let path = config.resolve(&agg.query);
        let sql = transform::load_query(&path)?;
        ctx.sql(&sql)
            .await
            .map_err(|e| transform::query_error(&path, &sql, e))?;
    }
    Ok(())
}
