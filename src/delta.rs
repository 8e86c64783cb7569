//! Delta Lake tables (`format = "delta"`, build feature `delta`), by delta-rs.
//!
//! sluice writes and stages a Delta table's Parquet files exactly as for plain tables; publishing
//! a commit then turns its files into one Delta commit: `add` actions for the new files (with
//! their statistics, from their Parquet footers: `delta/stats.rs`), `remove` actions for the
//! files a rewritten partition replaces (they stay on disk for readers of older versions until
//! `vacuum`), and the pipeline's application transaction (`txn`: app id and a version that grows
//! by one a commit). The commit is a `WRITE` (append) when it only adds files, a `MERGE` when it
//! also removes some. A publish that finds its version already in the table (a crash after the
//! Delta commit, before the ledger caught up) commits nothing. After each commit the symlink
//! manifests Spectrum and Athena read are rewritten for the partitions it touched.

mod stats;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Once};

use chrono::Utc;
use datafusion::prelude::SessionContext;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, Add, MetadataExt, Remove, StructType, Transaction};
use deltalake::logstore::{LogStore, LogStoreFactory, ObjectStoreRef, StorageConfig};
use deltalake::protocol::{DeltaOperation, MergePredicate, SaveMode};
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use futures::{StreamExt, TryStreamExt};
use url::Url;

use crate::catalog::{REJECTED_PARTITION, TableMeta};
use crate::error::{Error, Result};
use crate::format::DeltaTxn;
use crate::lake::{self, Lake};
use crate::sink::{TableFile, parse_partition_dir};

use crate::lake::SYMLINK_MANIFESTS as MANIFESTS;

fn fail(table: &str, e: impl std::fmt::Display) -> Error {
    Error::Delta {
        table: table.to_string(),
        message: e.to_string(),
    }
}

/// delta-rs commits to `s3://` through the lake's own store, with conditional puts.
#[derive(Debug)]
struct S3Commits;

impl LogStoreFactory for S3Commits {
    fn with_options(
        &self,
        prefixed: ObjectStoreRef,
        root: ObjectStoreRef,
        location: &Url,
        options: &StorageConfig,
    ) -> deltalake::DeltaResult<Arc<dyn LogStore>> {
        Ok(deltalake::logstore::default_logstore(
            prefixed, root, location, options,
        ))
    }
}

fn register_s3() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Ok(url) = Url::parse("s3://") {
            deltalake::logstore::logstore_factories().insert(url, Arc::new(S3Commits));
        }
    });
}

fn builder(lake: &Lake, prefix: &str) -> Result<DeltaTableBuilder> {
    let url = Url::parse(&lake.url(prefix)).map_err(|e| fail(prefix, e))?;
    let mut b = DeltaTableBuilder::from_url(url.clone()).map_err(|e| fail(prefix, e))?;
    if let Some(store) = lake.bucket_store() {
        register_s3();
        b = b.with_storage_backend(store, url);
    }
    Ok(b)
}

/// Opens the Delta table at `prefix` (at `version`, or the latest); `None` if there is none yet.
pub async fn open(lake: &Lake, prefix: &str, version: Option<u64>) -> Result<Option<DeltaTable>> {
    if lake.list(&format!("{prefix}/_delta_log")).await?.is_empty() {
        return Ok(None);
    }
    let mut b = builder(lake, prefix)?;
    if let Some(v) = version {
        b = b.with_version(v);
    }
    match b.load().await {
        Ok(t) => Ok(Some(t)),
        Err(DeltaTableError::NotATable(_)) => Ok(None),
        Err(e) if version.is_none() && e.to_string().contains("No files in log segment") => {
            Ok(None)
        }
        Err(e) => Err(fail(prefix, e)),
    }
}

fn kernel_schema(
    prefix: &str,
    schema: &datafusion::arrow::datatypes::Schema,
) -> Result<StructType> {
    schema.try_into_kernel().map_err(|e| fail(prefix, e))
}

/// The table at `prefix`, created with `schema` (partition columns included) if missing.
async fn open_or_create(
    lake: &Lake,
    prefix: &str,
    schema: &datafusion::arrow::datatypes::Schema,
    partition_by: &[String],
) -> Result<DeltaTable> {
    if let Some(t) = open(lake, prefix, None).await? {
        return Ok(t);
    }
    lake.ensure_prefix(prefix)?;
    let st = kernel_schema(prefix, schema)?;
    let table = builder(lake, prefix)?
        .build()
        .map_err(|e| fail(prefix, e))?;
    table
        .create()
        .with_columns(st.fields().cloned())
        .with_partition_columns(partition_by.to_vec())
        .with_save_mode(SaveMode::Ignore)
        .await
        .map_err(|e| fail(prefix, e))
}

/// The last version the pipeline's application transaction committed to this table.
pub async fn txn_version(table: &DeltaTable, app_id: &str) -> Result<Option<i64>> {
    table
        .snapshot()
        .map_err(|e| fail("table", e))?
        .transaction_version(table.log_store().as_ref(), app_id)
        .await
        .map_err(|e| fail("table", e))
}

/// The next version of the pipeline's transaction on the table at `prefix` (1 for a new table).
pub async fn next_version(lake: &Lake, prefix: &str, app_id: &str) -> Result<i64> {
    Ok(match open(lake, prefix, None).await? {
        Some(t) => txn_version(&t, app_id).await?.unwrap_or(0) + 1,
        None => 1,
    })
}

/// The table's active data files (what its latest version holds).
pub async fn active_files(lake: &Lake, prefix: &str) -> Result<Vec<TableFile>> {
    let Some(table) = open(lake, prefix, None).await? else {
        return Ok(Vec::new());
    };
    let snapshot = table.snapshot().map_err(|e| fail(prefix, e))?;
    let mut out = Vec::new();
    for f in snapshot.log_data().iter() {
        let rel = f.path().to_string();
        let dir = lake::parent_dir(&rel).to_string();
        out.push(TableFile {
            key: format!("{prefix}/{rel}"),
            dir,
        });
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

fn partition_values(dir: &str) -> HashMap<String, Option<String>> {
    parse_partition_dir(dir)
        .into_iter()
        .map(|(k, v)| {
            let v = (v != "__HIVE_DEFAULT_PARTITION__").then_some(v);
            (k, v)
        })
        .collect()
}

/// How many added files' footers are read at once.
const FOOTERS_IN_FLIGHT: usize = 16;

/// The `add` action of a published data file: its size, partition values (from its folder)
/// and statistics (from its Parquet footer, read with ranged reads of the file's end).
async fn add_action(
    lake: &Lake,
    prefix: &str,
    key: &str,
    partition_by: &[String],
    now: i64,
) -> Result<Add> {
    let rel = lake::relative(key, prefix).to_string();
    let dir = lake::parent_dir(&rel);
    let size = lake
        .head(key)
        .await?
        .ok_or_else(|| fail(prefix, format!("{key} is missing")))?
        .size;
    let footer = stats::footer(lake.store().as_ref(), lake::path(key), size)
        .await
        .map_err(|e| fail(prefix, format!("{key}: {e}")))?;
    // Statistics are optional in the protocol: a file whose footer they cannot be made from
    // is committed without them rather than not at all.
    let stats = stats::stats_json(&footer, partition_by)
        .inspect_err(|e| tracing::warn!(file = key, "no Delta statistics: {e}"))
        .ok();
    Ok(Add {
        partition_values: partition_values(dir),
        path: rel,
        size: size as i64,
        modification_time: now,
        data_change: true,
        stats,
        ..Default::default()
    })
}

/// What a commit did, in its `commitInfo`: one that only adds files is a `WRITE` in mode
/// `Append`; one that also removes files replaced rows by key, which Spark writes as a `MERGE`
/// (matched rows updated, the others inserted).
fn operation(partition_by: &[String], replaces: bool) -> DeltaOperation {
    if replaces {
        DeltaOperation::Merge {
            predicate: None,
            merge_predicate: None,
            matched_predicates: vec![MergePredicate {
                action_type: "update".into(),
                predicate: None,
            }],
            not_matched_predicates: vec![MergePredicate {
                action_type: "insert".into(),
                predicate: None,
            }],
            not_matched_by_source_predicates: Vec::new(),
        }
    } else {
        DeltaOperation::Write {
            mode: SaveMode::Append,
            partition_by: (!partition_by.is_empty()).then(|| partition_by.to_vec()),
            predicate: None,
        }
    }
}

/// One Delta commit of a sluice commit's files in one table: adds, removes, and the
/// transaction `(app_id, version)`; nothing if that version is committed already.
async fn commit_files(
    lake: &Lake,
    prefix: &str,
    schema: &datafusion::arrow::datatypes::Schema,
    partition_by: &[String],
    added: &[String],
    removed: &[String],
    txn: &DeltaTxn,
) -> Result<bool> {
    let (app_id, version) = (txn.app_id.as_str(), txn.version);
    let table = open_or_create(lake, prefix, schema, partition_by).await?;
    if txn_version(&table, app_id)
        .await?
        .is_some_and(|v| v >= version)
    {
        tracing::info!(table = prefix, version, "Delta commit already in the table");
        return Ok(false);
    }
    let snapshot = table.snapshot().map_err(|e| fail(prefix, e))?;
    let mut actions = Vec::new();
    // New columns: the table's schema grows first.
    let st = kernel_schema(prefix, schema)?;
    let current = snapshot.schema();
    if st.fields().any(|f| current.field(f.name()).is_none()) {
        let metadata = snapshot
            .metadata()
            .clone()
            .with_schema(&st)
            .map_err(|e| fail(prefix, e))?;
        actions.push(Action::Metadata(metadata));
    }
    let now = Utc::now().timestamp_millis();
    let adds: Vec<Add> = futures::stream::iter(added)
        .map(|key| add_action(lake, prefix, key, partition_by, now))
        .buffered(FOOTERS_IN_FLIGHT)
        .try_collect()
        .await?;
    actions.extend(adds.into_iter().map(Action::Add));
    for key in removed {
        let rel = lake::relative(key, prefix).to_string();
        let dir = lake::parent_dir(&rel);
        actions.push(Action::Remove(Remove {
            partition_values: Some(partition_values(dir)),
            path: rel,
            data_change: true,
            deletion_timestamp: Some(now),
            extended_file_metadata: Some(true),
            ..Default::default()
        }));
    }
    let operation = operation(partition_by, !removed.is_empty());
    CommitBuilder::from(
        CommitProperties::default().with_application_transaction(Transaction::new(app_id, version)),
    )
    .with_actions(actions)
    .build(Some(snapshot), table.log_store(), operation)
    .await
    .map_err(|e| fail(prefix, e))?;
    Ok(true)
}

/// Publishes a commit's files of a Delta table (`added`: the keys now in place under its
/// processed and rejected folders; `removed`: the files it replaces) as one Delta commit of the
/// table and one of its rejected table (if it got rows), then rewrites the symlink manifests
/// of the partitions it touched.
pub async fn publish(
    lake: &Lake,
    meta: &TableMeta,
    added: &[String],
    removed: &[String],
    txn: &DeltaTxn,
) -> Result<()> {
    let processed = lake::processed_prefix(&meta.name);
    let rejected = lake::rejected_prefix(&meta.name);
    let added_here = under(added.iter(), &processed);
    let removed_here = under(removed.iter(), &processed);
    let partitions: Vec<String> = meta
        .partition_columns
        .iter()
        .map(|c| c.name.clone())
        .collect();
    commit_files(
        lake,
        &processed,
        meta.full_schema()?.as_ref(),
        &partitions,
        &added_here,
        &removed_here,
        txn,
    )
    .await?;
    let rejected_added = under(added.iter(), &rejected);
    let rejected_removed = under(removed.iter(), &rejected);
    if !rejected_added.is_empty() || !rejected_removed.is_empty() {
        commit_files(
            lake,
            &rejected,
            meta.rejected_table_schema()?.as_ref(),
            &[REJECTED_PARTITION.to_string()],
            &rejected_added,
            &rejected_removed,
            txn,
        )
        .await?;
        let touched: Vec<String> = rejected_added
            .iter()
            .chain(&rejected_removed)
            .cloned()
            .collect();
        write_manifests(lake, &rejected, &dirs_of(&touched, &rejected)).await?;
    }
    let touched: Vec<String> = added_here.iter().chain(&removed_here).cloned().collect();
    write_manifests(lake, &processed, &dirs_of(&touched, &processed)).await
}

/// The keys under a table's prefix.
fn under<'a>(keys: impl Iterator<Item = &'a String>, prefix: &str) -> Vec<String> {
    let p = format!("{prefix}/");
    keys.filter(|k| k.starts_with(&p)).cloned().collect()
}

/// The partition folders of these keys, relative to the table's prefix.
fn dirs_of(keys: &[String], prefix: &str) -> BTreeSet<String> {
    keys.iter()
        .map(|k| lake::parent_dir(lake::relative(k, prefix)).to_string())
        .collect()
}

/// Rewrites `_symlink_format_manifest/<dir>/manifest` for these partition folders from the
/// table's active files (full URLs, one a line); a folder without active files loses its
/// manifest.
pub async fn write_manifests(lake: &Lake, prefix: &str, dirs: &BTreeSet<String>) -> Result<()> {
    let files = active_files(lake, prefix).await?;
    for dir in dirs {
        let key = if dir.is_empty() {
            format!("{prefix}/{MANIFESTS}/manifest")
        } else {
            format!("{prefix}/{MANIFESTS}/{dir}/manifest")
        };
        let lines: Vec<String> = files
            .iter()
            .filter(|f| &f.dir == dir)
            .map(|f| lake.object_url(&f.key))
            .collect();
        if lines.is_empty() {
            lake.delete(&key).await?;
        } else {
            lake.put(&key, format!("{}\n", lines.join("\n"))).await?;
        }
    }
    Ok(())
}

/// Registers a Delta table in a DataFusion session as `name`, at `version` or the latest.
pub async fn register(
    ctx: &SessionContext,
    lake: &Lake,
    name: &str,
    prefix: &str,
    version: Option<u64>,
) -> Result<bool> {
    let Some(table) = open(lake, prefix, version).await? else {
        return Ok(false);
    };
    let provider = table.table_provider().await.map_err(|e| fail(prefix, e))?;
    ctx.register_table(name, provider)?;
    Ok(true)
}

/// Compacts a Delta table's small files (OPTIMIZE) into files of about `target` bytes and
/// rewrites its symlink manifests; `None` if the table has no commit yet. Returns (files added,
/// files removed, new version).
pub async fn compact(
    lake: &Lake,
    prefix: &str,
    target: u64,
) -> Result<Option<(u64, u64, Option<u64>)>> {
    let Some(table) = open(lake, prefix, None).await? else {
        return Ok(None);
    };
    let target =
        std::num::NonZeroU64::new(target.max(1)).ok_or_else(|| fail(prefix, "target size 0"))?;
    let (table, metrics) = table
        .optimize()
        .with_target_size(target)
        .await
        .map_err(|e| fail(prefix, e))?;
    {
        // Every partition: the compacted files replace the ones the manifests listed.
        let mut dirs: BTreeSet<String> = active_files(lake, prefix)
            .await?
            .into_iter()
            .map(|f| f.dir)
            .collect();
        let manifests = format!("{prefix}/{MANIFESTS}");
        for m in lake.list(&manifests).await? {
            let key = m.location.to_string();
            let rel = lake::relative(&key, &manifests);
            dirs.insert(
                rel.strip_suffix("manifest")
                    .unwrap_or(rel)
                    .trim_end_matches('/')
                    .to_string(),
            );
        }
        write_manifests(lake, prefix, &dirs).await?;
    }
    Ok(Some((
        metrics.num_files_added,
        metrics.num_files_removed,
        table.version(),
    )))
}

/// Deletes the files a Delta table removed more than `retain` ago (all of them with
/// `dry_run` false); `None` if the table has no commit yet. Returns the files deleted (or
/// that would be).
pub async fn vacuum(
    lake: &Lake,
    prefix: &str,
    retain: std::time::Duration,
    dry_run: bool,
) -> Result<Option<u64>> {
    let Some(table) = open(lake, prefix, None).await? else {
        return Ok(None);
    };
    let retention = chrono::Duration::from_std(retain).map_err(|e| fail(prefix, e))?;
    let (_, metrics) = table
        .vacuum()
        .with_retention_period(retention)
        .with_enforce_retention_duration(false)
        .with_dry_run(dry_run)
        .await
        .map_err(|e| fail(prefix, e))?;
    Ok(Some(metrics.files_deleted.len() as u64))
}
