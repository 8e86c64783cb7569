//! `sluice reprocess`: a table's rows re-derived from its archived raw files with the current
//! query, after a query fix.
//!
//! Every stored row names its raw file in `_sluice_source` (row lineage, [`LINEAGE`]). A replay
//! picks committed raw files of the table's source from the ledger (by commit date, by a glob on
//! their keys), reads them back from `archive/` under their raw names, runs the current query
//! over them, and in one commit (one Delta commit with the pipeline's `txn`) replaces exactly the
//! rows and rejected rows that came from those files: each data file holding such rows is
//! rewritten without them, the new rows are added. With `unique_key`, a new row meets the row of
//! its key from other files by `order_by`, as a run's rows do (it replaces an older one and loses
//! to a newer one). The replay holds the commit lock from start to end; its commit is a sluice
//! commit like a run's (pending record, staging, ledger entry, publish), so recovery rolls it
//! forward or discards it; a keyed table's index is dropped with the commit and rebuilt.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;

use chrono::{NaiveDate, Utc};
use datafusion::arrow::array::{Array, AsArray, BooleanArray, RecordBatch};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::catalog::{REJECTED_PARTITION, TableMeta};
use crate::error::{Error, Result};
use crate::fault;
use crate::format::Format;
use crate::index::{self, Entries, Held, Shape};
use crate::lake::{self, Lake, STATE};
use crate::ledger::{self, Commit, FileOutcome, FileRecord, Move, TableChange};
use crate::pipeline::{Prepared, Runner, prepare};
use crate::sink::stream::Keying;
use crate::sink::{self, TableFile};
use crate::source::{LINEAGE, SOURCE_FILE};

/// What to replay.
#[derive(Debug, Clone, Default)]
pub struct ReplayRequest {
    /// The table.
    pub table: String,
    /// Files committed on or after this day (UTC).
    pub since: Option<NaiveDate>,
    /// Files committed on or before this day (UTC).
    pub until: Option<NaiveDate>,
    /// Raw keys matching this glob (`raw/<source>/2026-11-*.csv`, or relative to the source's
    /// folder: `2026-11-*.csv`).
    pub files: Option<String>,
    /// Compute and report, write nothing.
    pub dry_run: bool,
}

/// A replayed raw file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplayedFile {
    /// Its key under `raw/`, as committed (what its rows' `_sluice_source` holds).
    pub key: String,
    /// Where it was read from.
    pub archived: String,
    /// The commit that first brought it in.
    pub commit: String,
    /// Rows read, written, rejected and dropped as duplicates by the replay.
    pub rows_read: u64,
    /// Written.
    pub rows_written: u64,
    /// Rejected.
    pub rows_rejected: u64,
    /// Duplicates (a row of another file with its key outranks it, or it repeats one).
    pub rows_duplicate: u64,
}

/// What a replay did, or would do (`dry_run`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReplayReport {
    /// The table.
    pub table: String,
    /// Nothing was written.
    pub dry_run: bool,
    /// The replay's commit (none for a dry run or an empty selection).
    pub commit: Option<String>,
    /// The raw files replayed, in their original order.
    pub files: Vec<ReplayedFile>,
    /// Partition folders whose rows change.
    pub partitions: Vec<String>,
    /// Stored rows of the replayed files taken out.
    pub rows_removed: u64,
    /// Stored rows of other files a replayed row replaced (`unique_key`).
    pub rows_replaced: u64,
    /// Rows the replay stores.
    pub rows_added: u64,
    /// Rejected rows of the replayed files taken out.
    pub rejected_removed: u64,
    /// Rejected rows the replay stores.
    pub rejected_added: u64,
    /// Data files rewritten without taken-out rows (or removed, when none is left).
    pub files_rewritten: u64,
    /// New data files.
    pub files_added: u64,
    /// The table's data checks on the replayed rows (an `error` check failing stops the
    /// replay before anything is written).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<crate::checks::CheckResult>,
    /// Statements sent to an external warehouse after the commit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub statements: Vec<crate::report::StatementReport>,
    /// What failed after the commit (it stands: the next run retries these).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl ReplayReport {
    /// A few lines for a person.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "{} {}: {} file(s){}\n",
            if self.dry_run {
                "reprocess (dry run)"
            } else {
                "reprocessed"
            },
            self.table,
            self.files.len(),
            self.commit
                .as_ref()
                .map(|c| format!(", commit {c}"))
                .unwrap_or_default()
        );
        if self.files.is_empty() {
            out.push_str("  nothing to replay: no committed raw file in that range\n");
            return out;
        }
        for f in &self.files {
            out.push_str(&format!(
                "  {} (from {}): read {}, written {}, rejected {}, duplicate {}\n",
                f.key, f.archived, f.rows_read, f.rows_written, f.rows_rejected, f.rows_duplicate
            ));
        }
        out.push_str(&format!(
            "  rows: {} removed, {} replaced (other files), {} added; rejected: {} removed, {} added\n  files: {} rewritten, {} added; partitions: {}\n",
            self.rows_removed,
            self.rows_replaced,
            self.rows_added,
            self.rejected_removed,
            self.rejected_added,
            self.files_rewritten,
            self.files_added,
            if self.partitions.is_empty() {
                "-".to_string()
            } else {
                self.partitions.join(", ")
            }
        ));
        for c in &self.checks {
            let verdict = match (c.passed, c.severity) {
                (true, _) => "passed",
                (false, crate::config::Severity::Warn) => "WARN",
                (false, crate::config::Severity::Error) => "FAILED",
            };
            out.push_str(&format!("  check {}: {verdict}: {}\n", c.name, c.message));
        }
        out
    }
}

/// A committed raw file chosen for a replay.
struct Picked {
    record: FileRecord,
    commit: String,
}

/// Every ledger entry, oldest first (by planning time, then id).
async fn commits(lake: &Lake) -> Result<Vec<Commit>> {
    let keys: Vec<String> = lake
        .list(&format!("{STATE}/ledger"))
        .await?
        .into_iter()
        .map(|m| m.location.to_string())
        .collect();
    let mut all: Vec<Commit> = futures::stream::iter(&keys)
        .map(|k| lake.get_json::<Commit>(k))
        .buffered(lake.concurrency())
        .try_collect::<Vec<_>>()
        .await?
        .into_iter()
        .flatten()
        .collect();
    all.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    Ok(all)
}

/// The order the table's raw files arrived in: raw key -> position.
type Arrival = HashMap<String, usize>;

/// The table's committed raw files the request selects, in the order they arrived, and the
/// arrival order of all its files.
fn pick(p: &Prepared, commits: &[Commit], req: &ReplayRequest) -> Result<(Vec<Picked>, Arrival)> {
    let pattern = req
        .files
        .as_deref()
        .map(glob::Pattern::new)
        .transpose()
        .map_err(|e| Error::Replay {
            table: p.table.name.clone(),
            message: format!("--files: {e}"),
        })?;
    let prefix = format!("{}/", p.source.raw_prefix());
    let mut versions: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut arrival: Arrival = HashMap::new();
    let mut out = Vec::new();
    for c in commits {
        if !c.tables.iter().any(|t| t.table == p.table.name) {
            continue;
        }
        for f in &c.files {
            if f.source != p.source.name || f.outcome != FileOutcome::Processed {
                continue;
            }
            versions.entry(&f.key).or_default().push(&c.id);
            let next = arrival.len();
            arrival.insert(f.key.clone(), next);
            let day = c.created_at.date_naive();
            let in_dates = req.since.is_none_or(|d| day >= d) && req.until.is_none_or(|d| day <= d);
            let in_glob = pattern.as_ref().is_none_or(|g| {
                g.matches(&f.key) || f.key.strip_prefix(&prefix).is_some_and(|r| g.matches(r))
            });
            if in_dates && in_glob {
                out.push(Picked {
                    record: f.clone(),
                    commit: c.id.clone(),
                });
            }
        }
    }
    // A glob is precise: matching nothing is a mistake (a date range may well be empty).
    if let (Some(glob), true) = (&req.files, out.is_empty()) {
        let example = versions
            .keys()
            .min()
            .map(|k| format!("; its keys look like {k} (matched whole or under {prefix})"))
            .unwrap_or_default();
        return Err(Error::Replay {
            table: p.table.name.clone(),
            message: format!(
                "--files {glob} matches none of the {} raw file(s) committed to it{}{example}",
                versions.len(),
                match (req.since, req.until) {
                    (None, None) => String::new(),
                    _ => " in the --since/--until range".to_string(),
                }
            ),
        });
    }
    for pk in &out {
        let v = &versions[pk.record.key.as_str()];
        if v.len() > 1 {
            return Err(Error::Replay {
                table: p.table.name.clone(),
                message: format!(
                    "{} was committed {} times (commits {}): its rows cannot be told apart by \
                     their raw file, so it cannot be replayed",
                    pk.record.key,
                    v.len(),
                    v.join(", ")
                ),
            });
        }
    }
    Ok((out, arrival))
}

/// The raw keys a batch's lineage column names, per row (`None`: no lineage, an older file).
fn lineage_in(batch: &RecordBatch, of: &HashSet<String>, column: &str) -> Result<Vec<bool>> {
    let Some(a) = batch.column_by_name(column) else {
        return Ok(vec![false; batch.num_rows()]);
    };
    let a = datafusion::arrow::compute::cast(a, &datafusion::arrow::datatypes::DataType::Utf8)?;
    let s = a.as_string::<i32>();
    Ok((0..s.len())
        .map(|i| s.is_valid(i) && of.contains(s.value(i)))
        .collect())
}

/// Each row's lineage (`_sluice_source`), `None` where it has none (an older row).
fn lineage_values(batch: &RecordBatch) -> Result<Vec<Option<String>>> {
    let Some(a) = batch.column_by_name(LINEAGE) else {
        return Ok(vec![None; batch.num_rows()]);
    };
    let a = datafusion::arrow::compute::cast(a, &datafusion::arrow::datatypes::DataType::Utf8)?;
    let s = a.as_string::<i32>();
    Ok((0..s.len())
        .map(|i| s.is_valid(i).then(|| s.value(i).to_string()))
        .collect())
}

impl Runner<'_> {
    /// Replays the request's files into its table (see the module): under the commit lock,
    /// after recovery; then the aggregates are refreshed, as after a run.
    pub async fn reprocess(&self, req: &ReplayRequest) -> Result<ReplayReport> {
        let prepared = prepare(self.config)?;
        let p = prepared
            .into_iter()
            .find(|p| p.table.name == req.table)
            .ok_or_else(|| Error::Replay {
                table: req.table.clone(),
                message: "no such table in the config".into(),
            })?;
        if !p.table.lineage {
            return Err(Error::Replay {
                table: p.table.name.clone(),
                message: "the table keeps no row lineage (lineage = false): its rows cannot be \
                          traced to their raw files"
                    .into(),
            });
        }
        if !req.dry_run {
            let waiting =
                crate::warehouse::remote::unloaded_commits(self.config, &self.lake).await?;
            if let Some(c) = waiting.get(&p.table.name) {
                return Err(Error::Replay {
                    table: p.table.name.clone(),
                    message: format!(
                        "the warehouse has not loaded {} of its commit(s) yet ({}); a replay \
                         would replace the files its load copies. Run `sluice run` until it \
                         has them",
                        c.len(),
                        c.join(", ")
                    ),
                });
            }
        }
        let report = self
            .locked(async {
                ledger::recover(&self.lake, self.ttl).await?;
                let report = self.replay_locked(&p, req).await?;
                if !req.dry_run && report.commit.is_some() {
                    crate::warehouse::refresh(self.config, &self.lake, self.threads).await?;
                }
                Ok(report)
            })
            .await?;
        let mut report = report;
        if report.commit.is_none() {
            return Ok(report);
        }
        // After the commit, as after a run's: a failure here is reported, the commit stands
        // and the next run retries it.
        if let Some(e) = self.register_catalog().await {
            report.errors.push(e);
        }
        if self.config.warehouse.kind != crate::config::WarehouseKind::Embedded
            && let Err(e) = crate::warehouse::remote::sync(
                self.config,
                &self.lake,
                &self.me,
                &self.deadline,
                &mut report.statements,
            )
            .await
        {
            report.errors.push(format!("warehouse: {e}"));
        }
        Ok(report)
    }

    async fn replay_locked(&self, p: &Prepared, req: &ReplayRequest) -> Result<ReplayReport> {
        let table = &p.table;
        let all = commits(&self.lake).await?;
        let (picked, arrival) = pick(p, &all, req)?;
        let mut report = ReplayReport {
            table: table.name.clone(),
            dry_run: req.dry_run,
            ..Default::default()
        };
        if picked.is_empty() {
            return Ok(report);
        }
        // The archived files, read under their raw names.
        let archived: Vec<String> = picked.iter().map(|p| p.record.archive_to.clone()).collect();
        let metas = self.lake.metas(&archived).await?;
        let missing: Vec<&str> = archived
            .iter()
            .filter(|k| !metas.contains_key(*k))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return Err(Error::Replay {
                table: table.name.clone(),
                message: format!(
                    "archived raw files are missing, so they cannot be replayed: {}",
                    missing.join(", ")
                ),
            });
        }
        let files: Vec<_> = archived.iter().map(|k| metas[k].clone()).collect();
        let names: Vec<String> = picked.iter().map(|p| p.record.key.clone()).collect();
        let scratch = self
            .lake
            .scratch(&self.me.run_id, &format!("{}-replay", table.name));
        scratch.clear();
        let result = self
            .replay_in(
                p,
                req,
                &picked,
                &arrival,
                &files,
                &names,
                &scratch,
                &mut report,
            )
            .await;
        result.map(|()| report)
    }

    #[allow(clippy::too_many_arguments)]
    async fn replay_in(
        &self,
        p: &Prepared,
        req: &ReplayRequest,
        picked: &[Picked],
        arrival: &Arrival,
        files: &[object_store::ObjectMeta],
        names: &[String],
        scratch: &std::path::Path,
        report: &mut ReplayReport,
    ) -> Result<()> {
        let table = &p.table;
        let s = self
            .stream_named(p, files, names.to_vec(), &scratch.join("stream"))
            .await
            .map_err(|f| {
                f.into_error(
                    &files
                        .iter()
                        .map(|m| m.location.to_string())
                        .collect::<Vec<_>>(),
                )
            })?;
        if let Some((i, e)) = s.unreadable.iter().next() {
            return Err(Error::State {
                path: files[*i].location.to_string(),
                message: e.to_string(),
            });
        }
        for (i, pk) in picked.iter().enumerate() {
            if s.shas[i].as_deref() != Some(pk.record.sha256.as_str()) {
                return Err(Error::State {
                    path: pk.record.archive_to.clone(),
                    message: format!(
                        "its content is not the one {} committed (SHA-256 differs): not replayed",
                        pk.commit
                    ),
                });
            }
        }
        let old = TableMeta::load(&self.lake, &table.name).await?;
        let meta = match &old {
            Some(old) => old.evolve(&s.proposed)?,
            None => s.proposed.clone(),
        };
        let full = meta.full_schema()?;
        let partition_types = meta.partition_types()?;
        let replayed: HashSet<String> = names.iter().cloned().collect();

        // The table's rows of the replayed files, and (with a key) the rows of other files
        // holding the batch's keys.
        let data = Format::of(&meta)
            .data_files(&self.lake, &lake::processed_prefix(&table.name))
            .await?;
        let keying = match table.keyed() {
            Some(order_by) => {
                let shape = Shape::of(&meta, &table.unique_key, order_by)?;
                Some((Keying::for_table(&full, &shape, s.sip)?, shape))
            }
            None => None,
        };
        let batch_keys: HashSet<u128> = match &keying {
            Some(_) => s.sink.fingerprints(self.threads)?.into_iter().collect(),
            None => HashSet::new(),
        };
        let mut held: HashMap<u128, Held> = HashMap::new();
        let mut held_src: HashMap<u128, String> = HashMap::new();
        let mut from_replayed: Vec<u64> = vec![0; data.len()];
        for (g, f) in data.iter().enumerate() {
            let local = self.lake.local_file(&f.key).await?;
            index::for_each_batch(local, f, &partition_types, &full, |_, whole| {
                let mine = lineage_in(whole, &replayed, LINEAGE)?;
                from_replayed[g] += mine.iter().filter(|m| **m).count() as u64;
                if let Some((k, shape)) = &keying {
                    let mut entries = Entries::new(shape.kind);
                    k.entries(whole, g as u32, &mut entries)?;
                    let src = lineage_values(whole)?;
                    for (i, m) in mine.iter().enumerate() {
                        let (fp, h) = entries.get(i);
                        if !m && batch_keys.contains(&fp) {
                            held.insert(fp, h);
                            if let Some(key) = &src[i] {
                                held_src.insert(fp, key.clone());
                            }
                        }
                    }
                }
                Ok(())
            })?;
        }
        let mut replacing = match keying {
            Some(_) => s.sink.against_held(&held)?,
            None => HashSet::new(),
        };
        let (mut out_files, _) = s.sink.finish(self.threads)?;
        // On an equal `order_by` with other values the later file's row wins: the sink took
        // every replayed row for the later one; where the stored row's file arrived after the
        // replayed row's, the stored row stays and the replayed one is a duplicate.
        let mut tie_duplicates: HashMap<String, u64> = HashMap::new();
        let mut held_wins: HashSet<u128> = HashSet::new();
        if let Some((k, shape)) = &keying
            && !replacing.is_empty()
        {
            let file_schema = sink::nullable(meta.file_schema()?.as_ref());
            let position = |key: Option<&String>| key.and_then(|k| arrival.get(k)).copied();
            for (n, f) in out_files.iter_mut().enumerate() {
                let local = TableFile {
                    key: f.path.display().to_string(),
                    dir: f.dir.clone(),
                };
                let mut lose: Vec<bool> = Vec::new();
                let file = std::fs::File::open(&f.path)
                    .map_err(|e| Error::io(format!("cannot open {}", f.path.display()), e))?;
                index::for_each_batch(file, &local, &partition_types, &full, |_, whole| {
                    let mut entries = Entries::new(shape.kind);
                    k.entries(whole, 0, &mut entries)?;
                    let src = lineage_values(whole)?;
                    for (i, src) in src.iter().enumerate() {
                        let (fp, h) = entries.get(i);
                        let stays = replacing.contains(&fp)
                            && held.get(&fp).is_some_and(|old| {
                                index::order_cmp(h.order.as_value(), old.order.as_value())
                                    == std::cmp::Ordering::Equal
                            })
                            && position(held_src.get(&fp)) > position(src.as_ref());
                        if stays {
                            held_wins.insert(fp);
                            if let Some(key) = src {
                                *tie_duplicates.entry(key.clone()).or_default() += 1;
                            }
                        }
                        lose.push(stays);
                    }
                    Ok(())
                })?;
                if !lose.iter().any(|l| *l) {
                    continue;
                }
                // The file again without the replayed rows that lost.
                let out = scratch.join(format!("tie-{n}.parquet"));
                let mut w = sink::LocalParquet::new(&out, file_schema.clone(), &table.compression);
                let file = std::fs::File::open(&f.path)
                    .map_err(|e| Error::io(format!("cannot open {}", f.path.display()), e))?;
                let mut at = 0usize;
                for b in sink::local_batches(file, &local.key)? {
                    let b = b?;
                    let keep: BooleanArray = lose[at..at + b.num_rows()]
                        .iter()
                        .map(|l| Some(!l))
                        .collect();
                    at += b.num_rows();
                    let kept = datafusion::arrow::compute::filter_record_batch(&b, &keep)?;
                    w.write(&sink::conform(&kept, &file_schema)?)?;
                }
                match w.finish(false)? {
                    Some((path, rows)) => {
                        f.path = path;
                        f.rows = rows;
                    }
                    None => f.rows = 0,
                }
            }
        }
        // Their stored rows stay where they are.
        replacing.retain(|fp| !held_wins.contains(fp));
        let mut replaced_in: BTreeSet<usize> = BTreeSet::new();
        for fp in &replacing {
            if let Some(h) = held.get(fp) {
                replaced_in.insert(h.group as usize);
            }
        }

        // Counts per replayed file (the accounting identity holds for each).
        let mut counts = s.counts.clone();
        for (key, d) in s.keys.iter().zip(s.sink.duplicates()) {
            if let Some(c) = counts.get_mut(key) {
                c.written -= d;
                c.duplicate += d;
            }
        }
        for (key, d) in &tie_duplicates {
            if let Some(c) = counts.get_mut(key) {
                c.written -= d;
                c.duplicate += d;
            }
        }
        for (pk, name) in picked.iter().zip(names) {
            let c = counts.get(name).cloned().unwrap_or_default();
            report.files.push(ReplayedFile {
                key: name.clone(),
                archived: pk.record.archive_to.clone(),
                commit: pk.commit.clone(),
                rows_read: c.read,
                rows_written: c.written,
                rows_rejected: c.rejected,
                rows_duplicate: c.duplicate,
            });
        }
        report.rows_removed = from_replayed.iter().sum();
        report.rows_replaced = replacing.len() as u64;
        report.rows_added = out_files.iter().map(|f| f.rows).sum();
        report.files_added = out_files.iter().filter(|f| f.rows > 0).count() as u64;
        let touched: Vec<usize> = (0..data.len())
            .filter(|g| from_replayed[*g] > 0 || replaced_in.contains(g))
            .collect();
        report.files_rewritten = touched.len() as u64;
        let mut partitions: BTreeSet<String> =
            touched.iter().map(|g| data[*g].dir.clone()).collect();
        partitions.extend(out_files.iter().map(|f| f.dir.clone()));

        // Rejected rows of the replayed files.
        let rejected_prefix = lake::rejected_prefix(&table.name);
        let rejected_files = Format::of(&meta)
            .data_files(&self.lake, &rejected_prefix)
            .await?;
        let mut rejected_touched: Vec<(TableFile, u64)> = Vec::new();
        for f in rejected_files {
            let local = self.lake.local_file(&f.key).await?;
            let mut n = 0u64;
            for b in sink::local_batches(local, &f.key)? {
                n += lineage_in(&b?, &replayed, SOURCE_FILE)?
                    .iter()
                    .filter(|m| **m)
                    .count() as u64;
            }
            if n > 0 {
                report.rejected_removed += n;
                rejected_touched.push((f, n));
            }
        }
        let new_rejects = s.rejects.finish()?;
        report.rejected_added = new_rejects.as_ref().map_or(0, |(_, n)| *n);
        report.partitions = partitions.into_iter().collect();

        // The table's data checks audit the replayed rows as they audit a batch.
        if !table.check.is_empty() {
            let ctx =
                crate::transform::session(self.threads, self.config.engine.budget().pool_bytes);
            let staged = out_files
                .iter()
                .map(|f| (f.path.clone(), f.dir.clone()))
                .collect();
            crate::checks::register_staged(&ctx, &table.name, &meta, staged)?;
            let stats = crate::checks::BatchStats {
                read: counts.values().map(|c| c.read).sum(),
                rejected: counts.values().map(|c| c.rejected).sum(),
                written: counts.values().map(|c| c.written).sum(),
                previous: None,
            };
            report.checks = crate::checks::run(&ctx, self.config, table, Some(stats)).await?;
            if !req.dry_run
                && let Some(summary) = crate::checks::summary(&report.checks)
            {
                return Err(Error::ChecksFailed {
                    table: table.name.clone(),
                    summary,
                });
            }
        }
        if req.dry_run {
            return Ok(());
        }
        fault::pause("replay-planned");

        // The commit: new files, rewrites, rejected rows; the key index goes with it.
        let id = self.replay_id(table, &p.query, names).await?;
        let processed = lake::processed_prefix(&table.name);
        let in_table = |dir: &str, name: &str| match dir {
            "" => format!("{processed}/{name}"),
            dir => format!("{processed}/{dir}/{name}"),
        };
        let mut change = TableChange {
            table: table.name.clone(),
            partitions: report.partitions.clone(),
            replayed: names.to_vec(),
            ..Default::default()
        };
        let mut uploads: Vec<(PathBuf, String)> = Vec::new();
        let mut stage = |path: PathBuf, to: String, change: &mut TableChange| {
            let from = format!("{}/{to}", ledger::staging_prefix(&id));
            uploads.push((path, from.clone()));
            change.added.push(Move { from, to });
        };
        let mut per_dir: HashMap<&str, usize> = HashMap::new();
        for f in out_files.iter().filter(|f| f.rows > 0) {
            let n = per_dir.entry(f.dir.as_str()).or_default();
            let name = match *n {
                0 => format!("part-{id}.parquet"),
                k => format!("part-{id}-{k}.parquet"),
            };
            *n += 1;
            stage(f.path.clone(), in_table(&f.dir, &name), &mut change);
        }
        let rewrites = scratch.join("rewrites");
        std::fs::create_dir_all(&rewrites)
            .map_err(|e| Error::io(format!("cannot create {}", rewrites.display()), e))?;
        for (k, g) in touched.iter().enumerate() {
            let f = &data[*g];
            let out = rewrites.join(format!("r{k}.parquet"));
            let keying = keying.as_ref().map(|(k, _)| k);
            let rw =
                index::rewrite_where(&self.lake, &meta, f, &table.compression, &out, |whole| {
                    let mine = lineage_in(whole, &replayed, LINEAGE)?;
                    let gone: Vec<bool> = match keying {
                        Some(k) => k
                            .fingerprints(whole)?
                            .iter()
                            .map(|fp| replacing.contains(fp))
                            .collect(),
                        None => vec![false; whole.num_rows()],
                    };
                    Ok(mine
                        .iter()
                        .zip(gone)
                        .map(|(m, g)| Some(!m && !g))
                        .collect::<BooleanArray>())
                })
                .await?;
            change.removed.push(f.key.clone());
            if let Some(path) = rw.path {
                stage(
                    path,
                    in_table(&f.dir, &format!("part-{id}-r{k}.parquet")),
                    &mut change,
                );
            }
        }
        let today =
            lake::partition_segment(REJECTED_PARTITION, &Utc::now().date_naive().to_string());
        if let Some((path, _)) = new_rejects {
            stage(
                path,
                format!("{rejected_prefix}/{today}/part-{id}.parquet"),
                &mut change,
            );
        }
        let rejected_schema = sink::nullable(meta.rejected_schema()?.as_ref());
        for (k, (f, _)) in rejected_touched.iter().enumerate() {
            let out = rewrites.join(format!("j{k}.parquet"));
            let local = self.lake.local_file(&f.key).await?;
            let mut w = sink::LocalParquet::new(&out, rejected_schema.clone(), &table.compression);
            for b in sink::local_batches(local, &f.key)? {
                let b = b?;
                let keep: BooleanArray = lineage_in(&b, &replayed, SOURCE_FILE)?
                    .into_iter()
                    .map(|m| Some(!m))
                    .collect();
                let kept = datafusion::arrow::compute::filter_record_batch(&b, &keep)?;
                w.write(&sink::conform(&kept, &rejected_schema)?)?;
            }
            change.removed.push(f.key.clone());
            if let Some((path, _)) = w.finish(false)? {
                let dir = lake::parent_dir(lake::relative(&f.key, &rejected_prefix)).to_string();
                let to = match dir.as_str() {
                    "" => format!("{rejected_prefix}/part-{id}-r{k}.parquet"),
                    d => format!("{rejected_prefix}/{d}/part-{id}-r{k}.parquet"),
                };
                stage(path, to, &mut change);
            }
        }
        if keying.is_some() {
            // The index describes the table before the replay: it goes with the commit and is
            // rebuilt from the table's files after it (a crash in between leaves none, which
            // the next commit rebuilds).
            change.index_removed = self
                .lake
                .list(&index::prefix(&table.name))
                .await?
                .into_iter()
                .map(|m| m.location.to_string())
                .collect();
        }
        change.delta = Format::of(&meta)
            .next_txn(&self.lake, &table.name, &self.config.pipeline_name())
            .await?;
        let commit = Commit {
            id: id.clone(),
            run_id: self.me.run_id.clone(),
            created_at: Utc::now(),
            files: Vec::new(),
            tables: vec![change],
        };
        // Recovery throws the staging away if this run dies before its commit point.
        self.lake
            .put_json(&ledger::pending_key(&id), &commit)
            .await?;
        for (path, key) in uploads {
            self.lake.put_file(&key, &path).await?;
        }
        self.mark_unregistered(&id).await?;
        ledger::commit_staged(&self.lake, &commit, &counts, Some(&meta)).await?;
        if let Some(order_by) = table.keyed() {
            let shape = Shape::of(&meta, &table.unique_key, order_by)?;
            index::rebuild(
                &self.lake,
                &meta,
                &shape,
                s.sip,
                &scratch.join("index"),
                "the table was replayed".into(),
            )
            .await?;
        }
        tracing::info!(table = %table.name, commit = %id, files = names.len(), "replayed");
        report.commit = Some(id);
        Ok(())
    }

    /// A replay commit's id: a hash of the table, the query, this run and the replayed files,
    /// never the id of a commit in the ledger.
    async fn replay_id(
        &self,
        table: &crate::config::TableConfig,
        query: &str,
        names: &[String],
    ) -> Result<String> {
        let input = format!(
            "replay\n{}\n{query}\n{}\n{}\n",
            table.name,
            self.me.run_id,
            names.join("\n")
        );
        ledger::fresh_id(&self.lake, &input).await
    }
}
