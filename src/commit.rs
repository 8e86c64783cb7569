//! A batch's commit: planned and staged beside other runs' commits, checked under the commit
//! lock against what committed since, then `ledger::commit_staged` (the commit point and the
//! publish, in the order `ledger::recover` undoes or finishes).
//! The order of the steps, and why each is where it is, is in ARCHITECTURE ("commit").

use std::collections::HashMap;
use std::path::PathBuf;

use chrono::Utc;
use tracing::Instrument;

use crate::catalog::{REJECTED_PARTITION, TableMeta};
use crate::checks;
use crate::config::TableConfig;
use crate::error::{Error, Result};
use crate::fault;
use crate::index;
use crate::lake;
use crate::ledger::{self, COMMIT_LOCK, Commit, FileRecord, Ledger, Move, TableChange};
use crate::lock;
use crate::pipeline::{Prepared, Runner, Streamed};
use crate::report::TableReport;
use crate::sink;
use crate::transform::Counts;

impl Runner<'_> {
    /// Merges, writes, commits and publishes one batch. The plan (the key index lookup, the
    /// sink's files, the rewrites of files holding replaced rows) is made and staged beside
    /// other runs' commits; under the commit lock the plan is checked against what committed
    /// since ([`index::Pending::rebase`]) and only the commit's metadata is written: the index
    /// head, the catalog entry, the ledger entry (the commit point), then the publish. A plan
    /// that needs an index rebuilt is made under the lock; one that conflicts with a commit
    /// since makes the batch run again, its plan made under the lock.
    pub(crate) async fn commit(
        &self,
        p: &Prepared,
        ledger: &mut Ledger,
        records: &[FileRecord],
        streamed: Option<Streamed>,
    ) -> Result<(Commit, TableReport, HashMap<String, Counts>)> {
        if !self.serial.load(std::sync::atomic::Ordering::Relaxed) {
            let planned = self
                .plan(p, ledger, records, streamed.as_ref(), false)
                .await?;
            if let Some(plan) = planned {
                fault::pause("planned");
                return self.locked(self.commit_plan(p, ledger, plan, true)).await;
            }
        }
        self.locked(async {
            let plan = self
                .plan(p, ledger, records, streamed.as_ref(), true)
                .await?
                .ok_or_else(|| Error::State {
                    path: COMMIT_LOCK.into(),
                    message: "a plan under the commit lock was refused".into(),
                })?;
            self.commit_plan(p, ledger, plan, false).await
        })
        .await
    }

    /// Runs `work` holding the commit lock, waiting no longer than the lock wait or the run's
    /// `max_runtime`; the lock goes on every path out.
    pub(crate) async fn locked<T>(
        &self,
        work: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let wait = self.deadline.cap(self.wait);
        match lock::holding(&self.lake, COMMIT_LOCK, &self.me, self.ttl, wait, work).await {
            Err(Error::Locked { path, .. }) if self.deadline.passed() && path == COMMIT_LOCK => {
                Err(self.deadline.reached("waiting for the commit lock"))
            }
            other => other,
        }
    }

    /// Plans a batch's commit and stages its data files: `None` if it must be planned under
    /// the commit lock (`locked` false and the key index is to be rebuilt, or changing).
    async fn plan(
        &self,
        p: &Prepared,
        ledger: &mut Ledger,
        records: &[FileRecord],
        streamed: Option<&Streamed>,
        locked: bool,
    ) -> Result<Option<Plan>> {
        let table = &p.table;
        // What other runs committed since this batch was planned: a file of it (a claim taken
        // over from a run that was only slow) or its content (under another name) makes the
        // batch run again.
        ledger.refresh(&self.lake).await?;
        let raced = ledger.conflicts(records);
        if !raced.is_empty() {
            return Err(Error::Raced {
                keys: raced.join(", "),
            });
        }
        let id = self.commit_id(table, &p.query, records).await?;
        let mut plan = Plan {
            change: TableChange {
                table: table.name.clone(),
                ..Default::default()
            },
            id,
            records: records.to_vec(),
            report: TableReport::default(),
            counts: HashMap::new(),
            catalog: None,
            index: None,
            files: Vec::new(),
            file_keys: Vec::new(),
            file_bytes: Vec::new(),
            rewritten: Vec::new(),
            rewritten_keys: Vec::new(),
            staged: Vec::new(),
            checks: Vec::new(),
            scratch: self
                .lake
                .scratch(&self.me.run_id, &format!("{}-commit", table.name)),
        };
        let id = plan.id.clone();
        let mut uploads: Vec<(PathBuf, String)> = Vec::new();
        if let Some(s) = streamed {
            let processed = lake::processed_prefix(&table.name);
            // Another run may have changed the catalog since this batch started.
            let old = TableMeta::load(&self.lake, &table.name).await?;
            let meta = match &old {
                Some(old) => old.evolve(&s.proposed)?,
                None => s.proposed.clone(),
            };
            if meta.full_schema()?.as_ref() != s.full.as_ref() {
                return Err(Error::Schema {
                    table: table.name.clone(),
                    message: "the table's columns changed while this batch ran; it runs again \
                              next time"
                        .into(),
                });
            }
            let Some(merged) = index::merge(
                &self.lake,
                &meta,
                table,
                &s.sink,
                s.sip,
                self.threads,
                &plan.scratch,
                locked,
            )
            .await?
            else {
                return Ok(None);
            };
            plan.report.rows_replaced = merged.replaced;
            let spilled = s.sink.spill_stats();
            plan.report.dedup_spilled_partitions = spilled.partitions;
            plan.report.dedup_spilled_keys = spilled.entries;
            plan.report.index_rebuilt = merged.rebuilt.clone();
            // A data file's key: its partition folder (if any) under the table's prefix.
            let in_table = |dir: &str, name: &str| match dir {
                "" => format!("{processed}/{name}"),
                dir => format!("{processed}/{dir}/{name}"),
            };
            let mut per_dir: HashMap<&str, usize> = HashMap::new();
            for f in &merged.files {
                let n = per_dir.entry(f.dir.as_str()).or_default();
                let name = match *n {
                    0 => format!("part-{id}.parquet"),
                    k => format!("part-{id}-{k}.parquet"),
                };
                *n += 1;
                let to = in_table(&f.dir, &name);
                let from = format!("{}/{to}", ledger::staging_prefix(&id));
                uploads.push((f.path.clone(), from.clone()));
                plan.file_keys.push(to.clone());
                plan.file_bytes
                    .push(std::fs::metadata(&f.path).map_or(0, |m| m.len()));
                plan.change.added.push(Move { from, to });
                plan.change.partitions.push(f.dir.clone());
            }
            // Files holding replaced rows, rewritten without them (in place of the old file).
            for (k, rw) in merged.rewritten.iter().enumerate() {
                plan.report.files_rewritten += 1;
                plan.report.bytes_rewritten += rw.old_bytes;
                plan.change.removed.push(rw.old.key.clone());
                plan.change.partitions.push(rw.old.dir.clone());
                if let Some(path) = &rw.new {
                    let to = in_table(&rw.old.dir, &format!("part-{id}-r{k}.parquet"));
                    let from = format!("{}/{to}", ledger::staging_prefix(&id));
                    uploads.push((path.clone(), from.clone()));
                    plan.change.added.push(Move {
                        from,
                        to: to.clone(),
                    });
                    plan.rewritten_keys.push(Some(to));
                } else {
                    plan.rewritten_keys.push(None);
                }
            }
            if let Some((path, _rows)) = s.rejects.finish()? {
                let to = format!(
                    "{}/{}/part-{id}.parquet",
                    lake::rejected_prefix(&table.name),
                    lake::partition_segment(
                        REJECTED_PARTITION,
                        &Utc::now().date_naive().to_string()
                    )
                );
                let from = format!("{}/{to}", ledger::staging_prefix(&id));
                uploads.push((path, from.clone()));
                plan.change.added.push(Move { from, to });
            }
            plan.counts = s.counts.clone();
            for (key, d) in s.keys.iter().zip(s.sink.duplicates()) {
                if let Some(c) = plan.counts.get_mut(key) {
                    c.written -= d;
                    c.duplicate += d;
                }
            }
            plan.change.partitions.sort();
            plan.change.partitions.dedup();
            plan.files = merged.files;
            plan.rewritten = merged.rewritten;
            plan.index = merged.index;
            plan.catalog = Some((old.map(|m| catalog_json(&m)), meta));
        }
        for c in plan.counts.values() {
            plan.report.rows_written += c.written;
            plan.report.rows_rejected += c.rejected;
            plan.report.rows_duplicate += c.duplicate;
        }
        plan.report.partitions = plan.change.partitions.clone();
        // Data checks on the staged rows, before anything is staged in the lake: a failing
        // `error` check fails the batch with nothing to throw away.
        if !table.check.is_empty()
            && let Some((_, meta)) = &plan.catalog
        {
            let ctx =
                crate::transform::session(self.threads, self.config.engine.budget().pool_bytes);
            let files = plan
                .files
                .iter()
                .map(|f| (f.path.clone(), f.dir.clone()))
                .collect();
            checks::register_staged(&ctx, &table.name, meta, files)?;
            let stats = checks::BatchStats {
                read: plan.counts.values().map(|c| c.read).sum(),
                rejected: plan.report.rows_rejected,
                written: plan.report.rows_written,
                previous: ledger.last_written.get(&table.name).map(|(_, n)| *n),
            };
            let results = checks::run(&ctx, self.config, table, Some(stats))
                .instrument(tracing::info_span!("step", step = "checks"))
                .await?;
            if let Some(summary) = checks::summary(&results) {
                self.checks
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(results);
                return Err(Error::ChecksFailed {
                    table: table.name.clone(),
                    summary,
                });
            }
            plan.checks = results;
        }
        // Recovery throws the staging away if this run dies before its commit point.
        self.lake
            .put_json(&ledger::pending_key(&id), &plan.commit(&self.me.run_id))
            .await?;
        for (path, key) in uploads {
            self.lake.put_file(&key, &path).await?;
            plan.staged.push(key);
        }
        Ok(Some(plan))
    }

    /// The commit point of a plan, under the commit lock: a plan made beside other commits
    /// (`beside`) is checked first; then the index head is built on the current one, the
    /// catalog entry and the ledger entry are written, and the commit is published.
    async fn commit_plan(
        &self,
        p: &Prepared,
        ledger: &mut Ledger,
        mut plan: Plan,
        beside: bool,
    ) -> Result<(Commit, TableReport, HashMap<String, Counts>)> {
        let table = &p.table;
        let id = plan.id.clone();
        if beside && let Err(e) = self.still_stands(p, ledger, &mut plan).await {
            self.discard(&plan).await;
            return Err(e);
        }
        if let Some(pending) = plan.index.take() {
            let (index_files, replaced_runs) = pending
                .finish(
                    &self.lake,
                    &id,
                    &plan.files,
                    &plan.file_keys,
                    &plan.file_bytes,
                    &plan.rewritten,
                    &plan.rewritten_keys,
                    &plan.scratch,
                    self.threads,
                )
                .await?;
            for (path, to) in index_files {
                let from = format!("{}/{to}", ledger::staging_prefix(&id));
                self.lake.put_file(&from, &path).await?;
                plan.staged.push(from.clone());
                plan.change.index.push(Move { from, to });
            }
            plan.change.index_removed = replaced_runs;
        }
        if let Some((_, meta)) = &plan.catalog {
            plan.change.delta = crate::format::Format::of(meta)
                .next_txn(&self.lake, &table.name, &self.config.pipeline_name())
                .await?;
        }
        let commit = plan.commit(&self.me.run_id);
        self.lake
            .put_json(&ledger::pending_key(&id), &commit)
            .await?;
        self.mark_unregistered(&id).await?;
        let meta = plan.catalog.as_ref().map(|(_, meta)| meta);
        ledger::commit_staged(&self.lake, &commit, &plan.counts, meta).await?;
        self.serial
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(std::mem::take(&mut plan.checks));
        Ok((commit, plan.report, plan.counts))
    }

    /// Whether a plan made beside other commits still holds, under the commit lock: none of
    /// its raw files or contents committed since, the catalog entry it evolved unchanged, its
    /// pending record there (recovery leaves a live run's alone, but a run older than the lock
    /// TTL is taken for dead and its staging thrown away), and the key index changed only where the batch does not reach. A
    /// conflict in the table makes the batch run again with its plan made under the lock.
    async fn still_stands(&self, p: &Prepared, ledger: &mut Ledger, plan: &mut Plan) -> Result<()> {
        ledger.refresh(&self.lake).await?;
        let raced = ledger.conflicts(&plan.records);
        if !raced.is_empty() {
            return Err(Error::Raced {
                keys: raced.join(", "),
            });
        }
        let conflict = |what: String| {
            self.serial
                .store(true, std::sync::atomic::Ordering::Relaxed);
            Err(Error::Raced { keys: what })
        };
        if let Some((old, meta)) = &plan.catalog {
            let now = TableMeta::load(&self.lake, &meta.name).await?;
            if now.as_ref().map(catalog_json) != *old {
                return conflict(format!(
                    "table {} (its catalog entry changed since the plan)",
                    meta.name
                ));
            }
        }
        // Recovery deletes a pending record before the staging it names.
        if !self.lake.exists(&ledger::pending_key(&plan.id)).await? {
            return conflict(format!(
                "commit {} (its staging was thrown away: this run was taken for dead)",
                plan.id
            ));
        }
        let Some(pending) = &mut plan.index else {
            return Ok(());
        };
        let Some((_, meta)) = &plan.catalog else {
            return Ok(());
        };
        let again = pending
            .rebase(
                &self.lake,
                meta,
                &p.table.compression,
                &mut plan.rewritten,
                &plan.scratch,
            )
            .await?;
        let Some(again) = again else {
            return conflict(format!(
                "table {} (a commit since the plan wrote keys of this batch)",
                plan.change.table
            ));
        };
        // Files another commit rewrote since the plan, rewritten again from its files.
        for k in again {
            let rw = &plan.rewritten[k];
            plan.change.removed[k] = rw.old.key.clone();
            if let (Some(path), Some(to)) = (&rw.new, &plan.rewritten_keys[k]) {
                let from = format!("{}/{to}", ledger::staging_prefix(&plan.id));
                self.lake.put_file(&from, path).await?;
            }
        }
        Ok(())
    }

    /// Throws away a plan's staging and pending record (what recovery would do).
    async fn discard(&self, plan: &Plan) {
        let staged = plan.staged.iter().cloned();
        let result = async {
            self.lake.delete_all(staged).await?;
            self.lake.delete(&ledger::pending_key(&plan.id)).await
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(commit = %plan.id, error = %e, "cannot throw a plan's staging away; the next run's recovery does");
        }
    }

    /// A new commit's id: a hash of the table, the query, this run and the inputs, never the
    /// id of a commit in the ledger (a commit never replaces another's entry).
    async fn commit_id(
        &self,
        table: &TableConfig,
        query: &str,
        records: &[FileRecord],
    ) -> Result<String> {
        let mut input = format!("{}\n{}\n{}\n", table.name, query, self.me.run_id);
        let mut sorted: Vec<&FileRecord> = records.iter().collect();
        sorted.sort_by(|a, b| a.key.cmp(&b.key));
        for r in &sorted {
            input.push_str(&format!("{} {} {}\n", r.key, r.sha256, r.last_modified));
        }
        ledger::fresh_id(&self.lake, &input).await
    }
}

/// A batch's commit as planned: its table change, the files it stages, and what is settled
/// under the commit lock (the key index, the Delta version).
struct Plan {
    id: String,
    records: Vec<FileRecord>,
    change: TableChange,
    report: TableReport,
    counts: HashMap<String, Counts>,
    /// The catalog entry the plan evolved (as JSON, `None` for a new table) and the new one.
    catalog: Option<(Option<serde_json::Value>, TableMeta)>,
    index: Option<index::Pending>,
    files: Vec<sink::stream::OutFile>,
    file_keys: Vec<String>,
    /// Their sizes (the local files are gone once uploaded).
    file_bytes: Vec<u64>,
    rewritten: Vec<index::RewrittenFile>,
    rewritten_keys: Vec<Option<String>>,
    /// Keys uploaded under the commit's staging prefix.
    staged: Vec<String>,
    /// The results of the table's data checks on this batch (none failing an `error` one).
    checks: Vec<checks::CheckResult>,
    /// Removed with the plan, whatever becomes of it.
    scratch: crate::lake::Scratch,
}

impl Plan {
    fn commit(&self, run_id: &str) -> Commit {
        Commit {
            id: self.id.clone(),
            run_id: run_id.to_string(),
            created_at: Utc::now(),
            files: self.records.clone(),
            tables: vec![self.change.clone()],
        }
    }
}

/// A catalog entry as compared by a plan: its JSON without the time of its last change (every
/// commit writes it).
fn catalog_json(meta: &TableMeta) -> serde_json::Value {
    let mut v = serde_json::to_value(meta).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.remove("updated_at");
    }
    v
}
