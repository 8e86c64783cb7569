//! The warehouse step. The embedded warehouse: `[[aggregate]]` queries over the processed
//! tables, materialised as Parquet under `warehouse/<name>/` whenever the tables they read have
//! changed. External warehouses (Redshift, PostgreSQL) are loaded by [`remote`].

pub mod postgres;
pub mod redshift;
pub mod remote;
pub mod sql;

pub mod partitioned;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use datafusion::arrow::array::{RecordBatch, UInt32Array};
use datafusion::arrow::compute::take_record_batch;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::prelude::{DataFrame, ParquetReadOptions, SessionContext};
use serde::{Deserialize, Serialize};

use crate::catalog;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::lake::{self, Lake, STATE};
use crate::ledger::{self, Commit, Ledger, sha256_hex};
use crate::report::AggregateReport;
use crate::sink;
use crate::transform;
use partitioned::{Mode, Partitioning};

/// What an aggregate was last built from: `_sluice/warehouse/<name>.json`, written after its
/// files are in place (the build's commit point).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BuildState {
    fingerprint: String,
    built_at: DateTime<Utc>,
    rows: u64,
    /// The partitioned layout of an incremental aggregate; absent: the single file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    partitioned: Option<PartitionedState>,
}

/// What a partitioned (incremental) aggregate holds and was built from.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PartitionedState {
    /// SHA-256 of the query text.
    query: String,
    /// The input table.
    table: String,
    /// Its partition column.
    input_column: String,
    /// The output's partition column (`warehouse/<name>/<column>=<v>/`).
    column: String,
    /// The output columns (stored types) in query order, the partition column among them.
    columns: Vec<catalog::Column>,
    /// The commits that changed the input table, all reflected in the files (sorted).
    commits: Vec<String>,
    /// Partition folders and their rows.
    partitions: BTreeMap<String, u64>,
}

/// The single file a whole-built aggregate is kept in (replaced atomically).
pub fn aggregate_key(name: &str) -> String {
    format!("{}/{name}.parquet", lake::warehouse_prefix(name))
}

/// The file of one partition of an incremental aggregate (replaced atomically).
pub fn partition_key(name: &str, dir: &str) -> String {
    format!("{}/{dir}/{PARTITION_FILE}", lake::warehouse_prefix(name))
}

/// The name of each partition's file.
pub const PARTITION_FILE: &str = "data.parquet";

fn state_key(name: &str) -> String {
    format!("{STATE}/warehouse/{name}.json")
}

/// Where the new partition files of a build are written before they are swapped in.
fn staging_prefix(name: &str) -> String {
    format!("{STATE}/warehouse/staging/{name}")
}

/// The partition columns of every catalogued table.
async fn partition_columns(lake: &Lake) -> Result<HashMap<String, Vec<String>>> {
    Ok(catalog::all_tables(lake)
        .await?
        .into_iter()
        .map(|t| {
            let cols = t.partition_columns.iter().map(|c| c.name.clone()).collect();
            (t.name, cols)
        })
        .collect())
}

/// Rebuilds the aggregates whose inputs changed since their last build: an incremental one for
/// the partitions new commits touched, any other whole. Returns the built ones and a warning
/// for each one that cannot be built yet.
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
    let ctx = transform::lake_session(&config.engine, threads, config.engine.budget().limit / 2)?;
    let registered = register_all(&ctx, lake, None).await?;
    let partitions = partition_columns(lake).await?;
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
        // A rejected table (`<table>_rejected`) changes with its table's commits.
        let deps: Vec<String> = transform::referenced_tables(df.logical_plan())
            .into_iter()
            .map(|t| match t.strip_suffix("_rejected") {
                Some(base) if partitions.contains_key(base) => base.to_string(),
                _ => t,
            })
            .collect();
        let fingerprint = sha256_hex(format!("{}\n{sql}", ledger.fingerprint(&deps)).as_bytes());
        let state: Option<BuildState> = lake.get_json(&state_key(&agg.name)).await?;
        let build = Build {
            ctx: &ctx,
            lake,
            name: &agg.name,
            path: &path,
            sql: &sql,
            fingerprint,
        };
        let t = Instant::now();
        let done = match partitioned::analyze(df.logical_plan(), &partitions) {
            Mode::Whole(why) => build.whole(df, state, why).await?,
            Mode::Incremental(p) => build.partitioned(df, state, &ledger, p).await?,
        };
        if let Some(mut report) = done {
            report.seconds = t.elapsed().as_secs_f64();
            tracing::info!(aggregate = %agg.name, rows = report.rows, mode = %report.mode, partitions = report.partitions.len(), "aggregate built");
            built.push(report);
        }
    }
    Ok((built, waiting))
}

/// One aggregate's build.
struct Build<'a> {
    ctx: &'a SessionContext,
    lake: &'a Lake,
    name: &'a str,
    path: &'a Path,
    sql: &'a str,
    fingerprint: String,
}

/// What a partitioned build recomputes.
enum Work {
    /// Everything, for this reason.
    Full(String),
    /// These partition values.
    Partitions(BTreeSet<String>),
}

impl Build<'_> {
    /// Runs the query; the output in stored types.
    async fn collect(&self, df: DataFrame) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        let out_schema = df.schema().as_arrow().clone();
        let batches = df
            .collect()
            .await
            .map_err(|e| transform::query_error(self.path, self.sql, e))?;
        transform::to_stored(&out_schema, &batches)
    }

    /// Rebuilds an aggregate whole into its single file, unless it is up to date.
    async fn whole(
        &self,
        df: DataFrame,
        state: Option<BuildState>,
        why: String,
    ) -> Result<Option<AggregateReport>> {
        let key = aggregate_key(self.name);
        if state
            .as_ref()
            .is_some_and(|s| s.fingerprint == self.fingerprint && s.partitioned.is_none())
            && self.lake.exists(&key).await?
        {
            return Ok(None);
        }
        let (schema, batches) = self.collect(df).await?;
        let rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
        let data = sink::encode_parquet(&schema, &batches, "zstd")?;
        self.lake.put(&key, data).await?;
        self.save(&BuildState {
            fingerprint: self.fingerprint.clone(),
            built_at: Utc::now(),
            rows,
            partitioned: None,
        })
        .await?;
        // Partitions of an earlier, partitioned layout (readers follow the state to the file).
        for m in self.lake.list(&lake::warehouse_prefix(self.name)).await? {
            if m.location.as_ref() != key {
                self.lake.delete(m.location.as_ref()).await?;
            }
        }
        Ok(Some(AggregateReport {
            name: self.name.to_string(),
            rows,
            seconds: 0.0,
            mode: "whole".into(),
            partition_column: None,
            partitions: Vec::new(),
            rebuilt_whole: Some(why),
        }))
    }

    async fn save(&self, state: &BuildState) -> Result<()> {
        self.lake.put_json(&state_key(self.name), state).await
    }

    /// Builds an incremental aggregate: the partitions the commits since its last build touched
    /// (all of them on its first build in this layout), each written to staging, then swapped
    /// in, then the state recorded.
    async fn partitioned(
        &self,
        df: DataFrame,
        state: Option<BuildState>,
        ledger: &Ledger,
        p: Partitioning,
    ) -> Result<Option<AggregateReport>> {
        let query = sha256_hex(self.sql.as_bytes());
        let (stored, _) = transform::to_stored(df.schema().as_arrow(), &[])?;
        let columns: Vec<catalog::Column> = stored
            .fields()
            .iter()
            .map(|f| catalog::Column {
                name: f.name().clone(),
                ty: f.data_type().to_string(),
            })
            .collect();
        let commits: Vec<String> = ledger
            .commits
            .iter()
            .filter(|id| {
                ledger
                    .changed_tables
                    .get(*id)
                    .is_some_and(|t| t.contains(&p.table))
            })
            .cloned()
            .collect();
        let fresh = match &state {
            None => Err("its first build".to_string()),
            Some(BuildState {
                partitioned: None, ..
            }) => Err("its first build in the partitioned layout".to_string()),
            Some(BuildState {
                partitioned: Some(s),
                ..
            }) if s.query != query => Err("its query changed".to_string()),
            Some(BuildState {
                partitioned: Some(s),
                ..
            }) if s.table != p.table
                || s.input_column != p.input_column
                || s.column != p.column
                || s.columns != columns =>
            {
                Err("its partitioning or its columns changed".to_string())
            }
            Some(
                s @ BuildState {
                    partitioned: Some(ps),
                    ..
                },
            ) => Ok((s, ps)),
        };
        let (mut work, prev) = match fresh {
            Err(why) => (Work::Full(why), None),
            Ok((s, ps)) if s.fingerprint == self.fingerprint => match ps.partitions.keys().next() {
                Some(dir) if !self.lake.exists(&partition_key(self.name, dir)).await? => {
                    (Work::Full("its files are missing".into()), None)
                }
                _ => return Ok(None),
            },
            Ok((_, ps)) => (self.since(ps, &commits, &p).await?, Some(ps.clone())),
        };
        let (file_schema, parts) = match self.compute(&df, &p, &work).await? {
            Ok(done) => done,
            Err(why) => {
                tracing::warn!(aggregate = %self.name, "{why}; rebuilding whole");
                work = Work::Full(why);
                self.compute(&df, &p, &work)
                    .await?
                    .map_err(|message| Error::State {
                        path: lake::warehouse_prefix(self.name),
                        message,
                    })?
            }
        };
        // Write every new partition file, then swap each in (one atomic rename or put a
        // partition: a reader sees a partition's old file or its new one).
        let staging = staging_prefix(self.name);
        for m in self.lake.list(&staging).await? {
            // Files of a build that stopped before its swap.
            self.lake.delete(m.location.as_ref()).await?;
        }
        let mut written = BTreeMap::new();
        for (dir, batches) in &parts {
            let rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
            let data = sink::encode_parquet(&file_schema, batches, "zstd")?;
            self.lake
                .put(&format!("{staging}/{dir}/{PARTITION_FILE}"), data)
                .await?;
            written.insert(dir.clone(), rows);
        }
        for dir in written.keys() {
            self.lake
                .rename(
                    &format!("{staging}/{dir}/{PARTITION_FILE}"),
                    &partition_key(self.name, dir),
                )
                .await?;
        }
        // Partitions left without rows.
        let own = aggregate_key(self.name);
        let (recomputed, partitions) = match &work {
            Work::Partitions(values) => {
                let mut partitions = prev.map(|s| s.partitions).unwrap_or_default();
                for v in values {
                    let dir = lake::partition_segment(&p.column, v);
                    partitions.remove(&dir);
                    if !written.contains_key(&dir) {
                        self.lake.delete(&partition_key(self.name, &dir)).await?;
                    }
                }
                partitions.extend(written.iter().map(|(d, n)| (d.clone(), *n)));
                (values.iter().cloned().collect(), partitions)
            }
            Work::Full(_) => {
                let keep: BTreeSet<String> = written
                    .keys()
                    .map(|d| partition_key(self.name, d))
                    .collect();
                for m in self.lake.list(&lake::warehouse_prefix(self.name)).await? {
                    let key = m.location.as_ref();
                    if key != own && !keep.contains(key) {
                        self.lake.delete(key).await?;
                    }
                }
                let values = written
                    .keys()
                    .map(|d| partition_value(d, &p.column))
                    .collect();
                (values, written)
            }
        };
        crate::fault::point("aggregate-swapped");
        let rows = partitions.values().sum();
        self.save(&BuildState {
            fingerprint: self.fingerprint.clone(),
            built_at: Utc::now(),
            rows,
            partitioned: Some(PartitionedState {
                query,
                table: p.table.clone(),
                input_column: p.input_column.clone(),
                column: p.column.clone(),
                columns,
                commits,
                partitions,
            }),
        })
        .await?;
        // The single file of the earlier layout (readers follow the state to the partitions).
        self.lake.delete(&own).await?;
        Ok(Some(AggregateReport {
            name: self.name.to_string(),
            rows,
            seconds: 0.0,
            mode: "incremental".into(),
            partition_column: Some(p.input_column.clone()),
            partitions: recomputed,
            rebuilt_whole: match work {
                Work::Full(why) => Some(why),
                Work::Partitions(_) => None,
            },
        }))
    }

    /// The partition values the commits since the last build touched; a full build when that
    /// cannot be told.
    async fn since(
        &self,
        built: &PartitionedState,
        commits: &[String],
        p: &Partitioning,
    ) -> Result<Work> {
        let current: HashSet<&String> = commits.iter().collect();
        if built.commits.iter().any(|c| !current.contains(c)) {
            return Ok(Work::Full(
                "commits it was built from are not in the ledger".into(),
            ));
        }
        let known: HashSet<&String> = built.commits.iter().collect();
        let prefix = lake::processed_prefix(&p.table);
        let mut values = BTreeSet::new();
        for id in commits.iter().filter(|c| !known.contains(c)) {
            let Some(commit) = self
                .lake
                .get_json::<Commit>(&ledger::ledger_key(id))
                .await?
            else {
                return Ok(Work::Full(format!(
                    "the ledger entry of commit {id} is gone"
                )));
            };
            for t in commit.tables.iter().filter(|t| t.table == p.table) {
                if !partitioned::touched(t, &prefix, &p.input_column, &mut values) {
                    return Ok(Work::Full(format!(
                        "commit {id} changed files outside {} partition folders",
                        p.input_column
                    )));
                }
            }
        }
        Ok(Work::Partitions(values))
    }

    /// Runs the query (restricted to the touched partitions, or whole) and splits its output by
    /// partition folder: the file schema (without the partition column) and each folder's rows.
    /// `Err` when a restricted run gives rows outside the partitions it was restricted to.
    #[allow(clippy::type_complexity)]
    async fn compute(
        &self,
        df: &DataFrame,
        p: &Partitioning,
        work: &Work,
    ) -> Result<std::result::Result<(SchemaRef, BTreeMap<String, Vec<RecordBatch>>), String>> {
        let plan = match work {
            Work::Full(_) => df.logical_plan().clone(),
            Work::Partitions(v) if v.is_empty() => {
                let (stored, _) = transform::to_stored(df.schema().as_arrow(), &[])?;
                let file_schema = sink::schema_without(&stored, std::slice::from_ref(&p.column));
                return Ok(Ok((file_schema, BTreeMap::new())));
            }
            Work::Partitions(v) => {
                partitioned::restrict(df.logical_plan().clone(), &p.table, &p.input_column, v)
                    .map_err(|e| transform::query_error(self.path, self.sql, e))?
            }
        };
        let (schema, batches) = self.collect(DataFrame::new(self.ctx.state(), plan)).await?;
        let (file_schema, parts) = split(&schema, &batches, &p.column)?;
        if let Work::Partitions(v) = work {
            let expected: BTreeSet<String> = v
                .iter()
                .map(|v| lake::partition_segment(&p.column, v))
                .collect();
            if let Some(other) = parts.keys().find(|d| !expected.contains(*d)) {
                return Ok(Err(format!(
                    "recomputing its touched partitions gave rows of {other}"
                )));
            }
        }
        Ok(Ok((file_schema, parts)))
    }
}

/// The unescaped value of `column` in a partition folder.
fn partition_value(dir: &str, column: &str) -> String {
    sink::parse_partition_dir(dir)
        .into_iter()
        .find(|(k, _)| k == column)
        .map(|(_, v)| v)
        .unwrap_or_default()
}

/// Splits stored batches by the partition folder of `column` (Hive-escaped, as the processed
/// tables'): the schema without the column and each folder's rows without it.
fn split(
    schema: &SchemaRef,
    batches: &[RecordBatch],
    column: &str,
) -> Result<(SchemaRef, BTreeMap<String, Vec<RecordBatch>>)> {
    let file_schema = sink::schema_without(schema, &[column.to_string()]);
    let keep: Vec<usize> = schema
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| f.name() != column)
        .map(|(i, _)| i)
        .collect();
    let mut out: BTreeMap<String, Vec<RecordBatch>> = BTreeMap::new();
    for b in batches {
        let dirs = sink::partition_dirs(b, &[column.to_string()])?;
        let mut rows: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
        for (i, d) in dirs.iter().enumerate() {
            rows.entry(d.as_str()).or_default().push(i as u32);
        }
        for (dir, idx) in rows {
            let taken = take_record_batch(b, &UInt32Array::from(idx))?;
            let part = taken.project(&keep)?;
            let part = RecordBatch::try_new(file_schema.clone(), part.columns().to_vec())?;
            out.entry(dir.to_string()).or_default().push(part);
        }
    }
    Ok((file_schema, out))
}

/// Registers every materialised aggregate in a session: a partitioned one as a listing table
/// over its folder (partition column restored, columns in query order), a whole one as its
/// file. Returns the names.
pub async fn register(ctx: &SessionContext, lake: &Lake) -> Result<Vec<String>> {
    let mut names = BTreeSet::new();
    for m in lake.list("warehouse").await? {
        let key = m.location.to_string();
        if let Some((name, _)) = lake::relative(&key, "warehouse").split_once('/') {
            names.insert(name.to_string());
        }
    }
    for m in lake.list(&format!("{STATE}/warehouse")).await? {
        let key = m.location.to_string();
        let rel = lake::relative(&key, &format!("{STATE}/warehouse"));
        if let Some(name) = rel.strip_suffix(".json")
            && !name.contains('/')
        {
            names.insert(name.to_string());
        }
    }
    let mut out = Vec::new();
    for name in names {
        let state: Option<BuildState> = lake.get_json(&state_key(&name)).await?;
        let prefix = lake::warehouse_prefix(&name);
        let (column, ty, columns) = match state.and_then(|s| s.partitioned) {
            Some(p) => {
                let ty = p
                    .columns
                    .iter()
                    .find(|c| c.name == p.column)
                    .map(|c| c.data_type())
                    .transpose()?
                    .unwrap_or(DataType::Utf8);
                (p.column, ty, Some(p.columns))
            }
            None => {
                let key = aggregate_key(&name);
                if lake.exists(&key).await? {
                    ctx.register_parquet(
                        name.as_str(),
                        lake.object_url(&key),
                        ParquetReadOptions::default(),
                    )
                    .await?;
                    out.push(name);
                    continue;
                }
                // Partition folders without a state (it was deleted): the column as text.
                let Some(column) = lake.list(&prefix).await?.into_iter().find_map(|m| {
                    let key = m.location.to_string();
                    let rel = lake::relative(&key, &prefix).to_string();
                    let (dir, _) = rel.split_once('/')?;
                    sink::parse_partition_dir(dir)
                        .into_iter()
                        .next()
                        .map(|(k, _)| k)
                }) else {
                    continue;
                };
                (column, DataType::Utf8, None)
            }
        };
        lake.ensure_prefix(&prefix)?;
        let file_schema = match &columns {
            Some(cols) => Some(Arc::new(Schema::new(
                cols.iter()
                    .filter(|c| c.name != column)
                    .map(|c| Ok(Field::new(&c.name, c.data_type()?, true)))
                    .collect::<Result<Vec<_>>>()?,
            ))),
            None => None,
        };
        let partitions = vec![(column.clone(), ty)];
        let opts = ParquetReadOptions {
            schema: file_schema.as_deref(),
            table_partition_cols: partitions.clone(),
            ..Default::default()
        };
        ctx.register_parquet(name.as_str(), lake.url(&prefix), opts)
            .await?;
        catalog::hive_listing(ctx, &name, &partitions)?;
        if let Some(cols) = columns
            && let Some(table) = ctx.deregister_table(name.as_str())?
        {
            // A listing table puts its partition column last: back to the query's order.
            let order: Vec<&str> = cols.iter().map(|c| c.name.as_str()).collect();
            let view = ctx.read_table(table)?.select_columns(&order)?.into_view();
            ctx.register_table(name.as_str(), view)?;
        }
        out.push(name);
    }
    Ok(out)
}

/// Plans every aggregate against the given (empty) tables, for `validate`: the mode each gets
/// (the tables' partition columns from the config).
pub async fn plan_all(config: &Config, ctx: &SessionContext) -> Result<Vec<Mode>> {
    let partitions: HashMap<String, Vec<String>> = config
        .tables
        .iter()
        .map(|t| (t.name.clone(), t.partition_by.clone()))
        .collect();
    let mut modes = Vec::new();
    for agg in &config.aggregates {
        let path = config.resolve(&agg.query);
        let sql = transform::load_query(&path)?;
        let df = ctx
            .sql(&sql)
            .await
            .map_err(|e| transform::query_error(&path, &sql, e))?;
        modes.push(partitioned::analyze(df.logical_plan(), &partitions));
    }
    Ok(modes)
}

/// Registers every catalogued table (Delta tables at `as_of`, or their latest version) and
/// every materialised aggregate.
pub async fn register_all(
    ctx: &SessionContext,
    lake: &Lake,
    as_of: Option<u64>,
) -> Result<Vec<String>> {
    lake.attach(ctx)?;
    let mut names = Vec::new();
    for meta in catalog::all_tables(lake).await? {
        crate::format::Format::of(&meta)
            .register(ctx, lake, &meta, as_of)
            .await?;
        names.push(meta.name.clone());
        names.push(format!("{}_rejected", meta.name));
    }
    names.extend(register(ctx, lake).await?);
    Ok(names)
}
