//! Table formats behind one seam: plain Hive-partitioned Parquet and Delta Lake
//! (`format = "delta"`, build feature `delta`, src/delta.rs).
//!
//! Both formats are written, staged and committed the same way (the sink, `_sluice/staging/`,
//! the ledger); they differ in what makes files a table. A plain table is the Parquet files in
//! its folder: publishing a commit deletes the files it replaced. A Delta table is what its log
//! says: publishing makes a Delta commit (adds, removes, the pipeline's `txn`) and replaced files
//! stay for older versions until `vacuum`. The commit asks here for the transaction of its next
//! commit, `ledger::publish` for the publish, the catalog and the index for a table's files and
//! its registration, `maintain` for Delta's own compaction and vacuum. This is the one place
//! that knows whether sluice was built with Delta support.

use std::time::Duration;

use datafusion::prelude::SessionContext;
use serde::{Deserialize, Serialize};

use crate::catalog::{self, TableMeta};
use crate::error::{Error, Result};
use crate::lake::Lake;
use crate::sink::{self, TableFile};

/// A Delta commit's application transaction: the pipeline's app id and its version, one more
/// than the table's last.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeltaTxn {
    /// `sluice:<pipeline>`.
    pub app_id: String,
    /// Grows by one a commit.
    pub version: i64,
}

/// How a table's files make the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Hive-partitioned Parquet: the files in the table's folder are the table.
    Parquet,
    /// A Delta Lake table: its log names the active files.
    Delta,
}

/// What a format's own compaction did to one folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Optimized {
    /// Files written.
    pub added: u64,
    /// Files taken out of the table.
    pub removed: u64,
    /// The table version it made, if any.
    pub version: Option<u64>,
}

/// The error of a Delta operation in a sluice built without Delta support.
#[cfg_attr(feature = "delta", allow(dead_code))]
fn without_delta(table: &str) -> Error {
    Error::Delta {
        table: table.to_string(),
        message: "this sluice was built without Delta Lake support (cargo build --features delta)"
            .into(),
    }
}

impl Format {
    /// The format of a catalogued table.
    pub fn of(meta: &TableMeta) -> Format {
        if meta.delta {
            Format::Delta
        } else {
            Format::Parquet
        }
    }

    /// The application transaction a commit of `pipeline` to `table` carries: a Delta table's
    /// next version (read under the commit lock, when the commit is planned); none for Parquet.
    pub async fn next_txn(
        self,
        lake: &Lake,
        table: &str,
        pipeline: &str,
    ) -> Result<Option<DeltaTxn>> {
        match self {
            Format::Parquet => Ok(None),
            #[cfg(feature = "delta")]
            Format::Delta => {
                let app_id = format!("sluice:{pipeline}");
                let prefix = crate::lake::processed_prefix(table);
                let version = crate::delta::next_version(lake, &prefix, &app_id).await?;
                Ok(Some(DeltaTxn { app_id, version }))
            }
            #[cfg(not(feature = "delta"))]
            Format::Delta => {
                let _ = (lake, pipeline);
                Err(without_delta(table))
            }
        }
    }

    /// The data files a table folder (`processed/<t>` or `rejected/<t>`) holds now: a plain
    /// table's Parquet files, a Delta table's active files (a file it removed stays on disk
    /// until `vacuum`).
    pub async fn data_files(self, lake: &Lake, prefix: &str) -> Result<Vec<TableFile>> {
        match self {
            Format::Parquet => sink::table_files(lake, prefix).await,
            #[cfg(feature = "delta")]
            Format::Delta => crate::delta::active_files(lake, prefix).await,
            #[cfg(not(feature = "delta"))]
            Format::Delta => Err(without_delta(prefix)),
        }
    }

    /// Registers a processed table (`name`) and its rejected table (`name_rejected`) in a
    /// session; a Delta table at version `as_of`, or its latest.
    pub async fn register(
        self,
        ctx: &SessionContext,
        lake: &Lake,
        meta: &TableMeta,
        as_of: Option<u64>,
    ) -> Result<()> {
        lake.attach(ctx)?;
        match self {
            Format::Parquet => catalog::register_parquet(ctx, lake, meta).await,
            #[cfg(feature = "delta")]
            Format::Delta => {
                for (name, prefix, version, schema) in [
                    (
                        meta.name.clone(),
                        crate::lake::processed_prefix(&meta.name),
                        as_of,
                        meta.full_schema()?,
                    ),
                    (
                        format!("{}_rejected", meta.name),
                        crate::lake::rejected_prefix(&meta.name),
                        None,
                        meta.rejected_table_schema()?,
                    ),
                ] {
                    // A table with no commit yet reads as empty.
                    if !crate::delta::register(ctx, lake, &name, &prefix, version).await? {
                        let empty =
                            datafusion::datasource::MemTable::try_new(schema, vec![vec![]])?;
                        ctx.register_table(name.as_str(), std::sync::Arc::new(empty))?;
                    }
                }
                Ok(())
            }
            #[cfg(not(feature = "delta"))]
            Format::Delta => {
                let _ = as_of;
                Err(without_delta(&meta.name))
            }
        }
    }

    /// Compacts a table folder's small files by the format's own means into files of about
    /// `target` bytes: Delta's OPTIMIZE (one Delta commit, the symlink manifests rewritten);
    /// `None` if the table has no commit yet. A plain table has none: sluice compacts it by a
    /// ledger commit (`maintain`).
    pub async fn optimize(
        self,
        lake: &Lake,
        prefix: &str,
        target: u64,
    ) -> Result<Option<Optimized>> {
        match self {
            Format::Parquet => Ok(None),
            #[cfg(feature = "delta")]
            Format::Delta => Ok(crate::delta::compact(lake, prefix, target).await?.map(
                |(added, removed, version)| Optimized {
                    added,
                    removed,
                    version,
                },
            )),
            #[cfg(not(feature = "delta"))]
            Format::Delta => {
                let _ = (lake, target);
                Err(without_delta(prefix))
            }
        }
    }

    /// Deletes the files a table folder no longer references that were removed more than
    /// `retain` ago (or counts them, `dry_run`); `None` when there is nothing of the kind (a
    /// plain table's replaced files are deleted when their commit is published).
    pub async fn vacuum(
        self,
        lake: &Lake,
        prefix: &str,
        retain: Duration,
        dry_run: bool,
    ) -> Result<Option<u64>> {
        match self {
            Format::Parquet => Ok(None),
            #[cfg(feature = "delta")]
            Format::Delta => crate::delta::vacuum(lake, prefix, retain, dry_run).await,
            #[cfg(not(feature = "delta"))]
            Format::Delta => {
                let _ = (lake, retain, dry_run);
                Err(without_delta(prefix))
            }
        }
    }
}

/// Publishes a committed change of `table` once its staged files are in place (`added`: their
/// keys; `removed`: the files it replaces). Without a Delta transaction (a plain table) the
/// replaced files are deleted; with one, the change becomes the Delta commit of that version
/// (nothing if the table has it already) and replaced files stay for older versions. Idempotent.
pub async fn publish(
    lake: &Lake,
    table: &str,
    added: &[String],
    removed: &[String],
    txn: Option<&DeltaTxn>,
) -> Result<()> {
    let Some(txn) = txn else {
        return lake.delete_all(removed.iter().cloned()).await;
    };
    #[cfg(feature = "delta")]
    {
        let meta = TableMeta::load(lake, table)
            .await?
            .ok_or_else(|| Error::Delta {
                table: table.to_string(),
                message: "the table is not in the lake's catalog".into(),
            })?;
        crate::delta::publish(lake, &meta, added, removed, txn).await
    }
    #[cfg(not(feature = "delta"))]
    {
        let _ = (added, txn);
        Err(without_delta(table))
    }
}
