//! Table maintenance for Delta tables: `sluice compact` (OPTIMIZE: small files merged) and
//! `sluice vacuum` (files no version within the retention needs, deleted). Both hold the commit
//! lock, so they never run beside a commit, and are reported like runs. A table whose commits an
//! external warehouse has not copied yet is not compacted: its load lists the files they added.

use std::time::{Duration, Instant};

use crate::catalog::{self, TableMeta};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::lake::{self, Lake};
use crate::ledger::COMMIT_LOCK;
use crate::lock::{self, Holder};
use crate::report::{self, MaintenanceReport, RunReport};
use crate::warehouse::remote;

#[cfg(feature = "delta")]
use crate::delta;

/// Without Delta Lake support, no table is a Delta table.
#[cfg(not(feature = "delta"))]
mod delta {
    use crate::error::{Error, Result};
    use crate::lake::Lake;

    fn missing(prefix: &str) -> Error {
        Error::Delta {
            table: prefix.to_string(),
            message:
                "this sluice was built without Delta Lake support (cargo build --features delta)"
                    .into(),
        }
    }

    pub async fn compact(
        _: &Lake,
        prefix: &str,
        _: u64,
    ) -> Result<Option<(u64, u64, Option<u64>)>> {
        Err(missing(prefix))
    }

    pub async fn vacuum(
        _: &Lake,
        prefix: &str,
        _: std::time::Duration,
        _: bool,
    ) -> Result<Option<u64>> {
        Err(missing(prefix))
    }
}

/// The shortest retention `vacuum` takes without `--force`: Delta's default.
pub const MIN_RETENTION: Duration = Duration::from_secs(168 * 3600);

/// The Delta tables named (or all), as the lake's catalog knows them.
async fn delta_tables(config: &Config, lake: &Lake, only: Option<&str>) -> Result<Vec<TableMeta>> {
    let tables: Vec<TableMeta> = catalog::all_tables(lake)
        .await?
        .into_iter()
        .filter(|m| m.delta && only.is_none_or(|t| t == m.name))
        .collect();
    if let Some(t) = only
        && tables.is_empty()
    {
        return Err(Error::config(
            &config.path,
            format!(
                "\"{t}\" is not a Delta table of this lake (format = \"delta\", with a commit)"
            ),
        ));
    }
    Ok(tables)
}

async fn locked<F, Fut>(config: &Config, lake: &Lake, what: &str, f: F) -> Result<RunReport>
where
    F: FnOnce(RunReport) -> Fut,
    Fut: std::future::Future<Output = RunReport>,
{
    let run_id = report::new_run_id();
    let me = Holder::me(&run_id);
    let ttl = Duration::from_secs(config.lake.lock_ttl_secs);
    let wait = Duration::from_secs(config.lake.lock_wait_secs);
    lock::acquire(lake, COMMIT_LOCK, &me, ttl, wait).await?;
    let span = tracing::info_span!("run", run_id = %run_id, step = what);
    let mut report = tracing::Instrument::instrument(f(RunReport::start(&run_id)), span).await;
    lock::release(lake, COMMIT_LOCK, &me).await?;
    report.finish();
    lake.put_report(&crate::report::run_key(&report.run_id), &report)
        .await?;
    for e in crate::notify::notify(&config.notify, &config.pipeline_name(), &report).await {
        report.errors.push(e.to_string());
    }
    Ok(report)
}

/// Compacts the Delta tables' small files into files of about `target_size` bytes.
pub async fn compact(
    config: &Config,
    lake: &Lake,
    only: Option<&str>,
    target_size: u64,
) -> Result<RunReport> {
    let tables = delta_tables(config, lake, only).await?;
    locked(config, lake, "compact", |mut report| async move {
        let waiting = match remote::unloaded_commits(config, lake).await {
            Ok(w) => w,
            Err(e) => {
                report.errors.push(format!("compact: {e}"));
                return report;
            }
        };
        for meta in &tables {
            for prefix in [
                lake::processed_prefix(&meta.name),
                lake::rejected_prefix(&meta.name),
            ] {
                if prefix == lake::processed_prefix(&meta.name)
                    && let Some(commits) = waiting.get(&meta.name)
                {
                    report.errors.push(format!(
                        "compact {prefix}: not compacted: the warehouse has not loaded {} commit(s) of this table yet ({}); compacting would replace the files its load copies. Run `sluice run` until the warehouse has them, then compact",
                        commits.len(),
                        commits.join(", ")
                    ));
                    continue;
                }
                let t = Instant::now();
                match delta::compact(lake, &prefix, target_size).await {
                    Ok(Some((added, removed, version))) => {
                        report.maintenance.push(MaintenanceReport {
                            table: prefix.clone(),
                            operation: "compact".into(),
                            files_added: added,
                            files_removed: removed,
                            version,
                            seconds: t.elapsed().as_secs_f64(),
                        });
                        // The key index names the files OPTIMIZE replaced: rebuilt from the
                        // compacted files under the same lock.
                        if removed > 0
                            && prefix == lake::processed_prefix(&meta.name)
                            && let Some(t) = config.tables.iter().find(|t| t.name == meta.name)
                        {
                            let scratch = lake.scratch(&report.run_id, "index");
                            let rebuilt = crate::index::rebuild_for(lake, meta, t, &scratch).await;
                            let _ = std::fs::remove_dir_all(&scratch);
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
        }
        report
    })
    .await
}

/// Deletes files the Delta tables removed more than `retain` ago.
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
    let tables = delta_tables(config, lake, only).await?;
    locked(config, lake, "vacuum", |mut report| async move {
        for meta in &tables {
            for prefix in [
                lake::processed_prefix(&meta.name),
                lake::rejected_prefix(&meta.name),
            ] {
                let t = Instant::now();
                match delta::vacuum(lake, &prefix, retain, dry_run).await {
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
