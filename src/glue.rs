//! The AWS Glue Data Catalog in place of a crawler: each processed table and its rejected table
//! become external Parquet tables that Redshift Spectrum and Athena read, and each partition a
//! commit writes is added to them.
//!
//! A partition left without files (its last rows replaced by rows of another partition) is
//! deregistered: Athena's Hive connector can fail on a partition whose location holds nothing.
//!
//! Registration is part of exactly-once: a commit leaves a marker
//! (`_sluice/catalog/unregistered/<commit>`) before its commit point; the run's catalog step,
//! after its commits, registers every marked commit that reached its commit point (its own, and
//! any a crashed run left) and removes the marker.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_glue::Client;
use aws_sdk_glue::types::{
    Column, DatabaseInput, PartitionInput, PartitionValueList, SerDeInfo, StorageDescriptor,
    TableInput,
};
use datafusion::arrow::datatypes::DataType;

use crate::catalog::{self, REJECTED_PARTITION, TableMeta};
use crate::error::{Error, Result};
use crate::lake::{self, Lake, STATE};
use crate::ledger::{self, Commit, TableChange};
use crate::sink::{TableFile, parse_partition_dir};

const INPUT_FORMAT: &str = "org.apache.hadoop.hive.ql.io.parquet.MapredParquetInputFormat";
const OUTPUT_FORMAT: &str = "org.apache.hadoop.hive.ql.io.parquet.MapredParquetOutputFormat";
const SERDE: &str = "org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe";
/// Delta tables: Spectrum and Athena read the Parquet files a symlink manifest lists.
const SYMLINK_INPUT_FORMAT: &str = "org.apache.hadoop.hive.ql.io.SymlinkTextInputFormat";
const SYMLINK_OUTPUT_FORMAT: &str = "org.apache.hadoop.hive.ql.io.HiveIgnoreKeyTextOutputFormat";
/// `BatchCreatePartition` takes at most this many partitions a call.
const BATCH: usize = 100;
/// `BatchDeletePartition` takes at most this many partitions a call.
const DELETE_BATCH: usize = 25;

/// A Glue database the lake's tables are registered in.
#[derive(Debug, Clone)]
pub struct Glue {
    client: Client,
    database: String,
}

/// The per-partition errors of a batch call: those with `harmless` (the partition already was as
/// asked) are counted, any other is the call's error, naming the partition's values.
fn partition_errors(
    errors: &[aws_sdk_glue::types::PartitionError],
    harmless: &str,
    what: &str,
) -> Result<usize> {
    let mut counted = 0;
    for e in errors {
        let detail = e.error_detail();
        let code = detail.and_then(|d| d.error_code()).unwrap_or_default();
        if code == harmless {
            counted += 1;
            continue;
        }
        return Err(fail(format!(
            "{what}: {:?}: {code}: {}",
            e.partition_values(),
            detail.and_then(|d| d.error_message()).unwrap_or_default()
        )));
    }
    Ok(counted)
}

fn fail(message: impl Into<String>) -> Error {
    Error::Aws {
        service: "glue".into(),
        message: message.into(),
    }
}

/// The key of the marker of a commit whose partitions are not registered yet.
pub fn marker_key(commit_id: &str) -> String {
    format!("{STATE}/catalog/unregistered/{commit_id}")
}

/// The Hive type Spectrum and Athena read for an Arrow type.
pub fn hive_type(ty: &DataType) -> Result<String> {
    Ok(match ty {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "string".into(),
        DataType::Boolean => "boolean".into(),
        DataType::Int8 => "tinyint".into(),
        DataType::Int16 | DataType::UInt8 => "smallint".into(),
        DataType::Int32 | DataType::UInt16 => "int".into(),
        DataType::Int64 | DataType::UInt32 => "bigint".into(),
        DataType::UInt64 => "decimal(20,0)".into(),
        DataType::Float16 | DataType::Float32 => "float".into(),
        DataType::Float64 => "double".into(),
        DataType::Date32 | DataType::Date64 => "date".into(),
        DataType::Timestamp(_, _) => "timestamp".into(),
        DataType::Decimal32(p, s)
        | DataType::Decimal64(p, s)
        | DataType::Decimal128(p, s)
        | DataType::Decimal256(p, s) => format!("decimal({p},{s})"),
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => "binary".into(),
        DataType::FixedSizeBinary(_) => "binary".into(),
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
            format!("array<{}>", hive_type(f.data_type())?)
        }
        DataType::Struct(fields) => {
            let inner = fields
                .iter()
                .map(|f| Ok(format!("{}:{}", f.name(), hive_type(f.data_type())?)))
                .collect::<Result<Vec<_>>>()?;
            format!("struct<{}>", inner.join(","))
        }
        DataType::Map(entries, _) => match entries.data_type() {
            DataType::Struct(kv) if kv.len() == 2 => format!(
                "map<{},{}>",
                hive_type(kv[0].data_type())?,
                hive_type(kv[1].data_type())?
            ),
            other => return Err(fail(format!("no Hive type for map entries {other}"))),
        },
        other => return Err(fail(format!("no Hive type for the Arrow type {other}"))),
    })
}

fn columns(cols: &[catalog::Column]) -> Result<Vec<Column>> {
    cols.iter()
        .map(|c| {
            Column::builder()
                .name(&c.name)
                .r#type(hive_type(&c.data_type()?)?)
                .build()
                .map_err(|e| fail(e.to_string()))
        })
        .collect()
}

fn storage(location: String, cols: Vec<Column>, delta: bool) -> StorageDescriptor {
    let (input, output) = if delta {
        (SYMLINK_INPUT_FORMAT, SYMLINK_OUTPUT_FORMAT)
    } else {
        (INPUT_FORMAT, OUTPUT_FORMAT)
    };
    StorageDescriptor::builder()
        .set_columns(Some(cols))
        .location(location)
        .input_format(input)
        .output_format(output)
        .serde_info(
            SerDeInfo::builder()
                .serialization_library(SERDE)
                .parameters("serialization.format", "1")
                .build(),
        )
        .build()
}

/// One table as Glue should hold it: its name, data columns, partition columns and prefix.
struct Shape {
    name: String,
    columns: Vec<Column>,
    partitions: Vec<Column>,
    prefix: String,
    /// A Delta table: registered over its symlink manifests.
    delta: bool,
}

impl Shape {
    /// Where Glue points: the data prefix, or a Delta table's manifests.
    fn location(&self) -> String {
        if self.delta {
            format!("{}/{}", self.prefix, lake::SYMLINK_MANIFESTS)
        } else {
            self.prefix.clone()
        }
    }
}

fn shapes(meta: &TableMeta) -> Result<[Shape; 2]> {
    Ok([
        Shape {
            name: meta.name.clone(),
            columns: columns(&meta.columns)?,
            partitions: columns(&meta.partition_columns)?,
            prefix: lake::processed_prefix(&meta.name),
            delta: meta.delta,
        },
        Shape {
            name: format!("{}_rejected", meta.name),
            columns: columns(&meta.rejected_columns)?,
            partitions: vec![
                Column::builder()
                    .name(REJECTED_PARTITION)
                    .r#type("date")
                    .build()
                    .map_err(|e| fail(e.to_string()))?,
            ],
            prefix: lake::rejected_prefix(&meta.name),
            delta: meta.delta,
        },
    ])
}

impl Glue {
    /// A client for `database` (created on first use if missing).
    pub async fn new(database: &str) -> Glue {
        Glue {
            client: Client::new(crate::aws::config().await),
            database: database.to_string(),
        }
    }

    async fn ensure_database(&self) -> Result<()> {
        let input = DatabaseInput::builder()
            .name(&self.database)
            .description("Tables written by sluice")
            .build()
            .map_err(|e| fail(e.to_string()))?;
        match self
            .client
            .create_database()
            .database_input(input)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if crate::aws::code(&e) == Some("AlreadyExistsException") => Ok(()),
            Err(e) => Err(fail(format!(
                "cannot create database {}: {}",
                self.database,
                crate::aws::describe(&e)
            ))),
        }
    }

    async fn get_table(&self, name: &str) -> Result<Option<aws_sdk_glue::types::Table>> {
        match self
            .client
            .get_table()
            .database_name(&self.database)
            .name(name)
            .send()
            .await
        {
            Ok(out) => Ok(out.table),
            Err(e) if crate::aws::code(&e) == Some("EntityNotFoundException") => Ok(None),
            Err(e) => Err(fail(format!(
                "cannot read table {}.{name}: {}",
                self.database,
                crate::aws::describe(&e)
            ))),
        }
    }

    /// Checks, before anything is written, that the Glue tables can take `meta`'s shape: a
    /// column Glue has must keep its type and stay; new columns are fine.
    pub async fn check(&self, meta: &TableMeta) -> Result<()> {
        for shape in shapes(meta)? {
            let Some(table) = self.get_table(&shape.name).await? else {
                continue;
            };
            let held = table
                .storage_descriptor()
                .map(|sd| sd.columns())
                .unwrap_or_default();
            for old in held {
                match shape.columns.iter().find(|c| c.name() == old.name()) {
                    None => {
                        return Err(Error::Schema {
                            table: meta.name.clone(),
                            message: format!(
                                "Glue table {}.{} has column {} ({}), which the output no \
                                 longer has",
                                self.database,
                                shape.name,
                                old.name(),
                                old.r#type().unwrap_or("?")
                            ),
                        });
                    }
                    Some(new) if new.r#type() != old.r#type() => {
                        return Err(Error::Schema {
                            table: meta.name.clone(),
                            message: format!(
                                "Glue table {}.{} has column {} as {}, the output gives {}",
                                self.database,
                                shape.name,
                                old.name(),
                                old.r#type().unwrap_or("?"),
                                new.r#type().unwrap_or("?")
                            ),
                        });
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }

    /// Creates or updates the processed and rejected tables of `meta` in Glue.
    pub async fn ensure_tables(&self, lake: &Lake, meta: &TableMeta) -> Result<()> {
        self.ensure_database().await?;
        for shape in shapes(meta)? {
            let input = TableInput::builder()
                .name(&shape.name)
                .description(format!("{} (sluice)", shape.prefix))
                .table_type("EXTERNAL_TABLE")
                .parameters("classification", "parquet")
                .parameters("EXTERNAL", "TRUE")
                .parameters("parquet.compression", "SNAPPY")
                .storage_descriptor(storage(
                    lake.url(&shape.location()),
                    shape.columns.clone(),
                    shape.delta,
                ))
                .set_partition_keys(Some(shape.partitions.clone()))
                .build()
                .map_err(|e| fail(e.to_string()))?;
            let existing = self.get_table(&shape.name).await?;
            let result = match existing {
                None => self
                    .client
                    .create_table()
                    .database_name(&self.database)
                    .table_input(input)
                    .send()
                    .await
                    .map(|_| ())
                    .or_else(|e| match crate::aws::code(&e) {
                        // Another worker created it in between: fine.
                        Some("AlreadyExistsException") => Ok(()),
                        _ => Err(crate::aws::describe(&e)),
                    }),
                Some(t) if same_columns(&t, &shape) => Ok(()),
                Some(_) => {
                    tracing::info!(table = %shape.name, "updating the Glue table's columns");
                    self.client
                        .update_table()
                        .database_name(&self.database)
                        .table_input(input)
                        .send()
                        .await
                        .map(|_| ())
                        .map_err(|e| crate::aws::describe(&e))
                }
            };
            result.map_err(|e| {
                fail(format!(
                    "cannot register table {}.{}: {e}",
                    self.database, shape.name
                ))
            })?;
        }
        Ok(())
    }

    /// Adds partitions (folders under the table's prefix, e.g. `event_date=2024-03-01`) to a
    /// table, 100 a call; partitions that exist already are left as they are.
    async fn add_partitions(
        &self,
        lake: &Lake,
        shape: &Shape,
        dirs: &BTreeSet<String>,
    ) -> Result<usize> {
        let (table, prefix) = (shape.name.as_str(), shape.location());
        let mut added = 0;
        let dirs: Vec<&String> = dirs.iter().filter(|d| !d.is_empty()).collect();
        for chunk in dirs.chunks(BATCH) {
            let inputs = chunk
                .iter()
                .map(|dir| {
                    PartitionInput::builder()
                        .set_values(Some(dir_values(dir)))
                        .storage_descriptor(storage(
                            lake.url(&format!("{prefix}/{dir}")),
                            shape.columns.clone(),
                            shape.delta,
                        ))
                        .build()
                })
                .collect::<Vec<_>>();
            let out = self
                .client
                .batch_create_partition()
                .database_name(&self.database)
                .table_name(table)
                .set_partition_input_list(Some(inputs))
                .send()
                .await
                .map_err(|e| {
                    fail(format!(
                        "cannot add partitions to {}.{table}: {}",
                        self.database,
                        crate::aws::describe(&e)
                    ))
                })?;
            let existed = partition_errors(
                out.errors(),
                "AlreadyExistsException",
                &format!("cannot add a partition to {}.{table}", self.database),
            )?;
            added += chunk.len() - existed;
        }
        Ok(added)
    }

    /// Registers what a commit wrote: its tables (created or updated) and their new
    /// partitions, processed and rejected.
    pub async fn register_commit(&self, lake: &Lake, commit: &Commit) -> Result<()> {
        for change in &commit.tables {
            let Some(meta) = TableMeta::load(lake, &change.table).await? else {
                continue;
            };
            self.ensure_tables(lake, &meta).await?;
            let [processed, rejected] = shapes(&meta)?;
            let mut dirs: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
            for m in &change.added {
                for shape in [&processed, &rejected] {
                    if let Some(rel) = m.to.strip_prefix(&format!("{}/", shape.prefix)) {
                        let dir = lake::parent_dir(rel);
                        dirs.entry(shape.name.as_str())
                            .or_default()
                            .insert(dir.to_string());
                    }
                }
            }
            for shape in [&processed, &rejected] {
                if let Some(d) = dirs.get(shape.name.as_str()) {
                    let n = self.add_partitions(lake, shape, d).await?;
                    tracing::info!(table = %shape.name, new = n, of = d.len(), "Glue partitions registered");
                }
            }
            // Partitions whose files this commit replaced may hold none now.
            let emptied =
                emptied(lake, &processed, change, dirs.get(processed.name.as_str())).await?;
            if !emptied.is_empty() {
                let values: Vec<Vec<String>> = emptied.into_iter().collect();
                let n = self.delete_partitions(&processed.name, &values).await?;
                tracing::info!(table = %processed.name, partitions = ?values, deleted = n, "Glue partitions left without files deregistered");
            }
        }
        Ok(())
    }

    /// Deletes partitions (by their values) from a table, 25 a call; partitions Glue does not
    /// have are no error. Returns how many it deleted.
    async fn delete_partitions(&self, table: &str, values: &[Vec<String>]) -> Result<usize> {
        let mut deleted = 0;
        for chunk in values.chunks(DELETE_BATCH) {
            let list = chunk
                .iter()
                .map(|v| {
                    PartitionValueList::builder()
                        .set_values(Some(v.clone()))
                        .build()
                        .map_err(|e| fail(e.to_string()))
                })
                .collect::<Result<Vec<_>>>()?;
            let out = self
                .client
                .batch_delete_partition()
                .database_name(&self.database)
                .table_name(table)
                .set_partitions_to_delete(Some(list))
                .send()
                .await
                .map_err(|e| {
                    fail(format!(
                        "cannot delete partitions of {}.{table}: {}",
                        self.database,
                        crate::aws::describe(&e)
                    ))
                })?;
            let missing = partition_errors(
                out.errors(),
                "EntityNotFoundException",
                &format!("cannot delete a partition of {}.{table}", self.database),
            )?;
            deleted += chunk.len() - missing;
        }
        Ok(deleted)
    }

    /// The values of every partition Glue holds for a table (none if the table is missing).
    async fn partition_values(&self, table: &str) -> Result<Vec<Vec<String>>> {
        let mut pages = self
            .client
            .get_partitions()
            .database_name(&self.database)
            .table_name(table)
            .exclude_column_schema(true)
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            match page {
                Ok(page) => out.extend(page.partitions().iter().map(|p| p.values().to_vec())),
                Err(e) if crate::aws::code(&e) == Some("EntityNotFoundException") => break,
                Err(e) => {
                    return Err(fail(format!(
                        "cannot list partitions of {}.{table}: {}",
                        self.database,
                        crate::aws::describe(&e)
                    )));
                }
            }
        }
        Ok(out)
    }

    /// Registers every commit whose marker is there and that reached its commit point (the
    /// commits of run `run_id`, and any a crashed run left), then drops its marker. A marker
    /// whose commit never reached its commit point is dropped too, unless a live run is still
    /// at work on that commit (its pending record is there and its claims are live).
    pub async fn register_pending(
        &self,
        lake: &Lake,
        run_id: &str,
        ttl: std::time::Duration,
    ) -> Result<()> {
        for m in lake.list(&format!("{STATE}/catalog/unregistered")).await? {
            let key = m.location.to_string();
            let id = key.rsplit('/').next().unwrap_or_default().to_string();
            let entry_key = ledger::ledger_key(&id);
            let entry = || lake.get_json::<Commit>(&entry_key);
            let mut commit = entry().await?;
            if commit.is_none() {
                match lake.get_json::<Commit>(&ledger::pending_key(&id)).await? {
                    Some(p) if crate::lock::run_alive(lake, &p.run_id, ttl).await? => continue,
                    // No pending record: thrown away, or committed since the look above (the
                    // ledger entry is written before the pending record goes).
                    _ => commit = entry().await?,
                }
            }
            if let Some(commit) = commit {
                if commit.run_id != run_id {
                    tracing::warn!(commit = %id, run = %commit.run_id, "registering a commit another run left unregistered");
                }
                self.register_commit(lake, &commit).await?;
            }
            lake.delete(&key).await?;
        }
        Ok(())
    }

    /// Registers every table of the lake's catalog and every partition found under its
    /// prefixes (recovery, backfill, or moving from a crawler), and deregisters partitions
    /// that hold no files in the lake. Safe to run again. Returns, per Glue table, the
    /// partitions in the lake, those newly registered and those deregistered.
    pub async fn sync(&self, lake: &Lake) -> Result<Vec<SyncedTable>> {
        let mut out = Vec::new();
        for meta in catalog::all_tables(lake).await? {
            self.ensure_tables(lake, &meta).await?;
            for shape in shapes(&meta)? {
                let dirs: BTreeSet<String> = data_files(lake, shape.delta, &shape.prefix)
                    .await?
                    .into_iter()
                    .map(|f| f.dir)
                    .filter(|d| !d.is_empty())
                    .collect();
                let registered = self.add_partitions(lake, &shape, &dirs).await?;
                let live: BTreeSet<Vec<String>> = dirs.iter().map(|d| dir_values(d)).collect();
                let stale: Vec<Vec<String>> = self
                    .partition_values(&shape.name)
                    .await?
                    .into_iter()
                    .filter(|v| !live.contains(v))
                    .collect();
                let deregistered = if stale.is_empty() {
                    0
                } else {
                    tracing::info!(table = %shape.name, partitions = ?stale, "deregistering Glue partitions without files");
                    self.delete_partitions(&shape.name, &stale).await?
                };
                out.push(SyncedTable {
                    table: shape.name.clone(),
                    partitions: dirs.len(),
                    registered,
                    deregistered,
                });
            }
        }
        Ok(out)
    }
}

/// What `catalog sync` did to one Glue table.
#[derive(Debug, Clone)]
pub struct SyncedTable {
    /// The Glue table.
    pub table: String,
    /// Partitions holding files in the lake.
    pub partitions: usize,
    /// Partitions newly registered.
    pub registered: usize,
    /// Partitions deregistered: Glue had them, the lake holds no files in them.
    pub deregistered: usize,
}

/// The partitions (their values) whose files `change` replaced in the table of `shape` and
/// that hold no data file now. A partition is its values, whatever the spelling of its folder
/// (older sluice versions escaped other characters): one the commit added files to under any
/// spelling is not empty.
async fn emptied(
    lake: &Lake,
    shape: &Shape,
    change: &TableChange,
    added: Option<&BTreeSet<String>>,
) -> Result<BTreeSet<Vec<String>>> {
    let prefix = format!("{}/", shape.prefix);
    let added: BTreeSet<Vec<String>> = added.into_iter().flatten().map(|d| dir_values(d)).collect();
    // Values -> the folders of replaced files with those values.
    let mut candidates: BTreeMap<Vec<String>, BTreeSet<String>> = BTreeMap::new();
    for key in &change.removed {
        let Some(rel) = key.strip_prefix(&prefix) else {
            continue;
        };
        let dir = lake::parent_dir(rel);
        let values = dir_values(dir);
        if !dir.is_empty() && !added.contains(&values) {
            candidates
                .entry(values)
                .or_default()
                .insert(dir.to_string());
        }
    }
    if candidates.is_empty() {
        return Ok(BTreeSet::new());
    }
    if shape.delta {
        for f in data_files(lake, true, &shape.prefix).await? {
            candidates.remove(&dir_values(&f.dir));
        }
    } else {
        let mut held = Vec::new();
        for (values, dirs) in &candidates {
            for dir in dirs {
                let under = format!("{}/{dir}", shape.prefix);
                if !crate::sink::table_files(lake, &under).await?.is_empty() {
                    held.push(values.clone());
                    break;
                }
            }
        }
        for values in held {
            candidates.remove(&values);
        }
    }
    Ok(candidates.into_keys().collect())
}

/// A partition folder's values, unescaped, in folder order (as Glue holds them).
fn dir_values(dir: &str) -> Vec<String> {
    parse_partition_dir(dir)
        .into_iter()
        .map(|(_, v)| v)
        .collect()
}

/// A table's data files: a Delta table's active files (a file it removed stays on disk until
/// `vacuum`), a plain table's Parquet files.
async fn data_files(lake: &Lake, delta: bool, prefix: &str) -> Result<Vec<TableFile>> {
    let format = if delta {
        crate::format::Format::Delta
    } else {
        crate::format::Format::Parquet
    };
    format.data_files(lake, prefix).await
}

fn same_columns(table: &aws_sdk_glue::types::Table, shape: &Shape) -> bool {
    let held = table
        .storage_descriptor()
        .map(|sd| sd.columns())
        .unwrap_or_default();
    held.len() == shape.columns.len()
        && held
            .iter()
            .zip(&shape.columns)
            .all(|(a, b)| a.name() == b.name() && a.r#type() == b.r#type())
        && table.partition_keys().len() == shape.partitions.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::ColumnType;
    use crate::transform::spectrum_type;

    /// What each schema type is stored as and registered as in Glue (the README's table).
    #[test]
    fn every_schema_type_has_a_glue_type() {
        let glue = |t: &str| {
            let ty: ColumnType = t.parse().expect("a type");
            hive_type(&spectrum_type(&ty.data_type())).expect("a Hive type")
        };
        for (schema, hive) in [
            ("string", "string"),
            ("json", "string"),
            ("boolean", "boolean"),
            ("int8", "tinyint"),
            ("int16", "smallint"),
            ("int32", "int"),
            ("int64", "bigint"),
            ("uint8", "smallint"),
            ("uint16", "int"),
            ("uint32", "bigint"),
            ("uint64", "decimal(20,0)"),
            ("float32", "float"),
            ("float64", "double"),
            ("decimal(12,2)", "decimal(12,2)"),
            ("date", "date"),
            ("timestamp", "timestamp"),
            ("time", "string"),
            ("binary", "binary"),
        ] {
            assert_eq!(glue(schema), hive, "{schema}");
        }
    }
}
