//! Table maintenance: `sluice compact` (small files merged into files of about the table's
//! `target_file_size`) and `sluice vacuum` (files no Delta version within the retention needs,
//! deleted). Both hold the commit lock, after recovering interrupted commits, so they never run
//! beside a commit, and are reported like runs. A plain table is compacted by a ledger commit
//! with its key index (src/compact.rs), a Delta table by Delta's OPTIMIZE (`format::Format`),
//! its key index rebuilt after it. A table whose commits an external warehouse has not copied
//! yet is not compacted: its load lists the files they added.

use std::time::{Duration, Instant};

use crate::catalog::{self, TableMeta};
use crate::config::{Config, TableConfig};
use crate::error::{Error, Result};
use crate::format::Format;
use crate::lake::{self, Lake};
use crate::ledger::COMMIT_LOCK;
use crate::lock::{self, Holder};
use crate::report::{self, MaintenanceReport, RunReport};
use crate::warehouse::remote;

/// The shortest retention `vacuum` takes without `--force`: Delta's default.
pub const MIN_RETENTION: Duration = Duration::from_secs(168 * 3600);

/// The tables named (or all) that the lake's catalog knows, each with its config entry (none
/// for a table no longer configured).
async fn tables<'a>(
    config: &'a Config,
    lake: &Lake,
    only: Option<&str>,
) -> Result<Vec<(TableMeta, Option<&'a TableConfig>)>> {
    let tables: Vec<(TableMeta, Option<&TableConfig>)> = catalog::all_tables(lake)
        .await?
        .into_iter()
        .filter(|m| only.is_none_or(|t| t == m.name))
        .map(|m| {
            let t = config.tables.iter().find(|t| t.name == m.name);
            (m, t)
        })
        .collect();
    if let Some(t) = only
        && tables.is_empty()
    {
        return Err(Error::config(
            &config.path,
            format!("\"{t}\" is not a table of this lake (a table with a commit)"),
        ));
    }
    Ok(tables)
}

/// Runs `f` under the commit lock, after the commits a crashed run (or maintenance) left
/// behind are finished or thrown away; saves and notifies its report like a run's.
async fn locked<F, Fut>(config: &Config, lake: &Lake, what: &str, f: F) -> Result<RunReport>
where
    F: FnOnce(RunReport) -> Fut,
    Fut: std::future::Future<Output = RunReport>,
{
    let run_id = report::new_run_id();
    let me = Holder::me(&run_id);
    let ttl = Duration::from_secs(config.lake.lock_ttl_secs);
    let wait = Duration::from_secs(config.lake.lock_wait_secs);
    let span = tracing::info_span!("run", run_id = %run_id, step = what);
    let work = async {
        Ok(match crate::ledger::recover(lake, ttl).await {
            Ok(_) => tracing::Instrument::instrument(f(RunReport::start(&run_id)), span).await,
            Err(e) => {
                let mut r = RunReport::start(&run_id);
                r.errors
                    .push(format!("{what}: recovering interrupted commits: {e}"));
                r
            }
        })
    };
    let mut report = lock::holding(lake, COMMIT_LOCK, &me, ttl, wait, work).await?;
    lake.drop_scratch(&run_id);
    report.finish();
    lake.put_report(&crate::report::run_key(&report.run_id), &report)
        .await?;
    for e in crate::notify::notify(&config.notify, &config.pipeline_name(), &report).await {
        report.errors.push(e.to_string());
    }
    Ok(report)
}

/// A table folder's data files and their bytes.
async fn folder_size(lake: &Lake, format: Format, prefix: &str) -> Result<(u64, u64)> {
    let files = format.data_files(lake, prefix).await?;
    let sizes: std::collections::HashMap<String, u64> = lake
        .list(prefix)
        .await?
        .into_iter()
        .map(|m| (m.location.to_string(), m.size))
        .collect();
    let bytes = files.iter().filter_map(|f| sizes.get(&f.key)).sum();
    Ok((files.len() as u64, bytes))
}

/// Compacts the tables' small files into files of about `target_size` bytes (default: each
/// table's `target_file_size`).
pub async fn compact(
    config: &Config,
    lake: &Lake,
    only: Option<&str>,
    target_size: Option<u64>,
) -> Result<RunReport> {
    let tables = tables(config, lake, only).await?;
    locked(config, lake, "compact", |mut report| async move {
        let waiting = match remote::unloaded_commits(config, lake).await {
            Ok(w) => w,
            Err(e) => {
                report.errors.push(format!("compact: {e}"));
                return report;
            }
        };
        for (meta, table) in &tables {
            let processed = lake::processed_prefix(&meta.name);
            if let Some(commits) = waiting.get(&meta.name) {
                report.errors.push(format!(
                    "compact {processed}: not compacted: the warehouse has not loaded {} commit(s) of this table yet ({}); compacting would replace the files its load copies. Run `sluice run` until the warehouse has them, then compact",
                    commits.len(),
                    commits.join(", ")
                ));
                // A plain table's folders are compacted in one commit; a Delta table's
                // rejected folder is a table of its own.
                if Format::of(meta) == Format::Parquet {
                    continue;
                }
            }
            let target = target_size
                .or(table.map(|t| t.target_file_size()))
                .unwrap_or(128 << 20);
            let format = Format::of(meta);
            match format {
                Format::Parquet => compact_plain(lake, meta, *table, target, &mut report).await,
                Format::Delta => {
                    for prefix in [processed.clone(), lake::rejected_prefix(&meta.name)] {
                        if prefix == processed && waiting.contains_key(&meta.name) {
                            continue;
                        }
                        compact_delta(lake, meta, *table, &prefix, target, &mut report).await;
                    }
                }
            }
        }
        report
    })
    .await
}

/// A plain table compacted by one ledger commit (src/compact.rs).
async fn compact_plain(
    lake: &Lake,
    meta: &TableMeta,
    table: Option<&TableConfig>,
    target: u64,
    report: &mut RunReport,
) {
    let processed = lake::processed_prefix(&meta.name);
    let Some(table) = table else {
        report.errors.push(format!(
            "compact {processed}: not compacted: the table is not in the config (its compression and key are needed)"
        ));
        return;
    };
    let t = Instant::now();
    match crate::compact::plain(lake, meta, table, target, &report.run_id).await {
        Ok((folders, rebuilt)) => {
            if let Some(why) = rebuilt {
                report.warnings.push(format!(
                    "compact {processed}: the key index was rebuilt from the table's files first ({why})"
                ));
            }
            let seconds = t.elapsed().as_secs_f64();
            for f in folders.into_iter().filter(|f| f.added > 0) {
                report.maintenance.push(MaintenanceReport {
                    table: f.prefix,
                    operation: "compact".into(),
                    files_added: f.added,
                    files_removed: f.removed,
                    version: None,
                    seconds,
                    files_before: f.files_before,
                    files_after: f.files_after,
                    bytes_before: f.bytes_before,
                    bytes_after: f.bytes_after,
                });
            }
        }
        Err(e) => report.errors.push(format!("compact {processed}: {e}")),
    }
}

/// A Delta table folder compacted by OPTIMIZE; the key index (which names the files OPTIMIZE
/// replaced) is rebuilt from the compacted files under the same lock.
async fn compact_delta(
    lake: &Lake,
    meta: &TableMeta,
    table: Option<&TableConfig>,
    prefix: &str,
    target: u64,
    report: &mut RunReport,
) {
    let t = Instant::now();
    let format = Format::Delta;
    let before = folder_size(lake, format, prefix).await.unwrap_or_default();
    match format.optimize(lake, prefix, target).await {
        Ok(Some(done)) => {
            let after = folder_size(lake, format, prefix).await.unwrap_or_default();
            report.maintenance.push(MaintenanceReport {
                table: prefix.to_string(),
                operation: "compact".into(),
                files_added: done.added,
                files_removed: done.removed,
                version: done.version,
                seconds: t.elapsed().as_secs_f64(),
                files_before: before.0,
                files_after: after.0,
                bytes_before: before.1,
                bytes_after: after.1,
            });
            if done.removed > 0
                && prefix == lake::processed_prefix(&meta.name)
                && let Some(t) = table
            {
                let scratch = lake.scratch(&report.run_id, "index");
                let rebuilt = crate::index::rebuild_for(lake, meta, t, &scratch).await;
                drop(scratch);
                if let Err(e) = rebuilt {
                    let _ = lake.delete(&crate::index::head_key(&meta.name)).await;
                    report.errors.push(format!(
                        "compact {prefix}: key index not rebuilt ({e}); the next run rebuilds it"
                    ));
                }
            }
        }
        Ok(None) => {}
        Err(e) => report.errors.push(format!("compact {prefix}: {e}")),
    }
}

/// Deletes files the Delta tables removed more than `retain` ago (a plain table has none: its
/// replaced files go when their commit is published).
pub async fn vacuum(
    config: &Config,
    lake: &Lake,
    only: Option<&str>,
    retain: Duration,
    force: bool,
    dry_run: bool,
) -> Result<RunReport> {
    if retain < MIN_RETENTION && !force {
        return Err(Error::config(
            &config.path,
            format!(
                "--retain {}h is shorter than {}h: readers of older versions (time travel, running queries) could lose their files; add --force to vacuum anyway",
                retain.as_secs() / 3600,
                MIN_RETENTION.as_secs() / 3600
            ),
        ));
    }
    let tables = tables(config, lake, only).await?;
    locked(config, lake, "vacuum", |mut report| async move {
        for (meta, _) in &tables {
            for prefix in [
                lake::processed_prefix(&meta.name),
                lake::rejected_prefix(&meta.name),
            ] {
                let t = Instant::now();
                match Format::of(meta)
                    .vacuum(lake, &prefix, retain, dry_run)
                    .await
                {
                    Ok(Some(deleted)) => report.maintenance.push(MaintenanceReport {
                        table: prefix.clone(),
                        operation: if dry_run {
                            "vacuum (dry run)"
                        } else {
                            "vacuum"
                        }
                        .into(),
                        files_added: 0,
                        files_removed: deleted,
                        version: None,
                        seconds: t.elapsed().as_secs_f64(),
                        ..Default::default()
                    }),
                    Ok(None) => {}
                    Err(e) => report.errors.push(format!("vacuum {prefix}: {e}")),
                }
            }
        }
        report
    })
    .await
}
