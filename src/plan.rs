//! `sluice plan`: the side effects the next run would have, computed by doing the run's work up
//! to its commit in a scratch folder and writing nothing to the lake: the files it would take
//! (and the duplicates it would skip), per table the rows it would write, reject and drop, the
//! partitions written and the files rewritten for replaced keys (looked up in the key index),
//! the Glue calls, the archive moves, the warehouse steps and the notifications.

use std::collections::{BTreeSet, HashMap, HashSet};

use serde::Serialize;

use crate::catalog::TableMeta;
use crate::config::{CatalogKind, WarehouseKind};
use crate::error::Result;
use crate::format::Format;
use crate::index::{Index, Shape};
use crate::lake;
use crate::ledger::Ledger;
use crate::pipeline::{Prepared, Runner, prepare};

/// A raw file the next run would take.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedFile {
    /// Its key.
    pub key: String,
    /// Its size.
    pub bytes: u64,
    /// `process`, `duplicate` (of `duplicate_of`), `fail` (with `error`) or `finish archiving`
    /// (committed by a run that stopped before archiving it).
    pub action: String,
    /// The committed file whose content it repeats.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicate_of: Option<String>,
    /// Where it would be moved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive_to: Option<String>,
    /// Why it would fail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One table's part of the plan.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TablePlan {
    /// The table.
    pub table: String,
    /// Its source.
    pub source: String,
    /// The source's files.
    pub files: Vec<PlannedFile>,
    /// Rows the files hold.
    pub rows_read: u64,
    /// Rows the table would get.
    pub rows_written: u64,
    /// Rows that would go to `rejected/<table>`.
    pub rows_rejected: u64,
    /// Rows dropped as duplicates.
    pub rows_duplicate: u64,
    /// Stored rows newer rows would replace (`unique_key`).
    pub rows_replaced: u64,
    /// Partition folders new files would go to.
    pub partitions: Vec<String>,
    /// Stored files that would be rewritten without replaced rows.
    pub files_rewritten: Vec<String>,
    /// Glue Data Catalog calls (with `[catalog] kind = "glue"`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub glue: Vec<String>,
}

/// The whole plan.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Plan {
    /// Per table.
    pub tables: Vec<TablePlan>,
    /// Aggregates that would be refreshed, and external warehouse steps.
    pub warehouse: Vec<String>,
    /// Where the run's notification would go.
    pub notifications: Vec<String>,
}

impl Plan {
    /// A few lines for a person.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for t in &self.tables {
            out.push_str(&format!(
                "table {} (source {}): {} file(s)\n",
                t.table,
                t.source,
                t.files.len()
            ));
            for f in &t.files {
                let extra = match (&f.duplicate_of, &f.archive_to, &f.error) {
                    (Some(d), _, _) => format!(" of {d}"),
                    (_, _, Some(e)) => format!(": {e}"),
                    (_, Some(a), _) => format!(" -> {a}"),
                    _ => String::new(),
                };
                out.push_str(&format!(
                    "  {} {} ({} bytes){extra}\n",
                    f.action, f.key, f.bytes
                ));
            }
            if t.rows_read > 0 {
                out.push_str(&format!(
                    "  rows: {} read, {} written, {} rejected, {} duplicate, {} replaced\n",
                    t.rows_read, t.rows_written, t.rows_rejected, t.rows_duplicate, t.rows_replaced
                ));
                out.push_str(&format!("  partitions: {}\n", t.partitions.join(", ")));
            }
            for f in &t.files_rewritten {
                out.push_str(&format!("  rewrite {f}\n"));
            }
            for g in &t.glue {
                out.push_str(&format!("  glue: {g}\n"));
            }
        }
        for w in &self.warehouse {
            out.push_str(&format!("warehouse: {w}\n"));
        }
        for n in &self.notifications {
            out.push_str(&format!("notify: {n}\n"));
        }
        if self.tables.iter().all(|t| t.files.is_empty()) {
            out.push_str("nothing to do\n");
        }
        out
    }
}

impl Runner<'_> {
    /// The next run's plan (see the module); writes nothing to the lake.
    pub async fn plan_next_run(&self) -> Result<Plan> {
        let mut plan = Plan::default();
        let mut changed: BTreeSet<String> = BTreeSet::new();
        let mut failing = false;
        let ledger = Ledger::load(&self.lake).await?;
        for p in prepare(self.config)? {
            let t = self.plan_table(&p, &ledger).await?;
            if t.rows_read > 0 || t.files.iter().any(|f| f.action == "duplicate") {
                changed.insert(t.table.clone());
            }
            failing |= t.files.iter().any(|f| f.action == "fail");
            plan.tables.push(t);
        }
        if !changed.is_empty() {
            for a in &self.config.aggregates {
                plan.warehouse.push(format!(
                    "refresh aggregate {} (if its inputs changed: {})",
                    a.name,
                    changed.iter().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
            if self.config.warehouse.kind != WarehouseKind::Embedded {
                for s in crate::warehouse::remote::steps(self.config)? {
                    plan.warehouse.push(s.describe());
                }
            }
            let targets = if failing {
                &self.config.notify.on_failure
            } else {
                &self.config.notify.on_success
            };
            plan.notifications = targets.clone();
        }
        Ok(plan)
    }

    async fn plan_table(&self, p: &Prepared, ledger: &Ledger) -> Result<TablePlan> {
        let source = &p.source;
        let mut out = TablePlan {
            table: p.table.name.clone(),
            source: source.name.clone(),
            ..Default::default()
        };
        let prefix = source.raw_prefix();
        let mut pending = Vec::new();
        for meta in self.lake.list(&prefix).await? {
            let key = meta.location.to_string();
            if !crate::source::matches_format(&key, source.format) {
                continue;
            }
            match ledger.committed(&key, meta.size, meta.last_modified) {
                Some(done) => out.files.push(PlannedFile {
                    key,
                    bytes: meta.size,
                    action: "finish archiving".into(),
                    duplicate_of: None,
                    archive_to: Some(done.archive_to.clone()),
                    error: None,
                }),
                None => pending.push(meta),
            }
        }
        if pending.is_empty() {
            return Ok(out);
        }
        // Duplicates: a file of the size of a committed one (or of another pending one) is
        // hashed first, as the run does.
        let mut sizes: HashMap<u64, usize> = HashMap::new();
        for m in &pending {
            *sizes.entry(m.size).or_default() += 1;
        }
        let mut fresh = Vec::new();
        let mut seen: HashMap<String, String> = HashMap::new();
        for m in pending {
            let key = m.location.to_string();
            if ledger.sizes.contains(&m.size) || sizes[&m.size] > 1 {
                let (sha, _) = self.lake.download_and_hash(&m).await?;
                let dup = ledger
                    .known_content(&source.name, &sha)
                    .or_else(|| seen.get(&sha))
                    .cloned();
                if let Some(d) = dup {
                    let r = self.record(source, ledger, &m, &sha, Some(d.clone()));
                    out.files.push(PlannedFile {
                        key,
                        bytes: m.size,
                        action: "duplicate".into(),
                        duplicate_of: Some(d),
                        archive_to: Some(r.archive_to),
                        error: None,
                    });
                    continue;
                }
                seen.insert(sha, key);
            }
            fresh.push(m);
        }
        // The stream, into scratch, as the run makes it; files that would fail are left out.
        let scratch = self
            .lake
            .scratch(&self.me.run_id, &format!("{}-plan", source.name));
        let mut streamed = None;
        while !fresh.is_empty() {
            scratch.clear();
            match self
                .stream_named(
                    p,
                    &fresh,
                    fresh.iter().map(|m| m.location.to_string()).collect(),
                    &scratch,
                )
                .await
            {
                Ok(s) => {
                    streamed = Some(s);
                    break;
                }
                Err(f) => {
                    let names: Vec<String> = fresh.iter().map(|m| m.location.to_string()).collect();
                    let e = f.into_error(&names);
                    // A broken file names itself; anything else fails the batch.
                    let bad = match &e {
                        crate::error::Error::State { path, .. } => {
                            names.iter().position(|n| n == path)
                        }
                        _ => None,
                    };
                    let gone: Vec<_> = match bad {
                        Some(i) => vec![fresh.remove(i)],
                        None => std::mem::take(&mut fresh),
                    };
                    for m in gone {
                        out.files.push(PlannedFile {
                            key: m.location.to_string(),
                            bytes: m.size,
                            action: "fail".into(),
                            duplicate_of: None,
                            archive_to: None,
                            error: Some(e.to_string()),
                        });
                    }
                }
            }
        }
        let Some(s) = streamed else {
            return Ok(out);
        };
        self.plan_streamed(p, ledger, &fresh, s, &mut out)
            .await
            .map(|()| out)
    }

    async fn plan_streamed(
        &self,
        p: &Prepared,
        ledger: &Ledger,
        fresh: &[object_store::ObjectMeta],
        s: crate::pipeline::Streamed,
        out: &mut TablePlan,
    ) -> Result<()> {
        let table = &p.table;
        let old = TableMeta::load(&self.lake, &table.name).await?;
        let meta = match &old {
            Some(o) => o.evolve(&s.proposed)?,
            None => s.proposed.clone(),
        };
        // Keys the table holds already: through the key index, without publishing anything.
        if let Some(order_by) = table.keyed() {
            let shape = Shape::of(&meta, &table.unique_key, order_by)?;
            if let Ok(Ok(index)) = Index::open(&self.lake, &table.name, &shape).await
                && !index.head.runs.is_empty()
            {
                let fps = s.sink.fingerprints(self.threads)?;
                let held = index.lookup(&self.lake, &fps).await?;
                let replacing = s.sink.against_held(&held)?;
                out.rows_replaced = replacing.len() as u64;
                let files: BTreeSet<String> = replacing
                    .iter()
                    .filter_map(|fp| held.get(fp))
                    .filter_map(|h| index.file_of(h.group).map(str::to_string))
                    .collect();
                out.files_rewritten = files.into_iter().collect();
            }
        }
        let (files, _) = s.sink.finish(self.threads)?;
        let mut counts = s.counts.clone();
        for (key, d) in s.keys.iter().zip(s.sink.duplicates()) {
            if let Some(c) = counts.get_mut(key) {
                c.written -= d;
                c.duplicate += d;
            }
        }
        for m in fresh {
            let key = m.location.to_string();
            let c = counts.get(&key).cloned().unwrap_or_default();
            out.rows_read += c.read;
            out.rows_written += c.written;
            out.rows_rejected += c.rejected;
            out.rows_duplicate += c.duplicate;
            let sha = s
                .keys
                .iter()
                .position(|k| *k == key)
                .and_then(|i| s.shas[i].clone())
                .unwrap_or_default();
            let r = self.record(&p.source, ledger, m, &sha, None);
            out.files.push(PlannedFile {
                key,
                bytes: m.size,
                action: "process".into(),
                duplicate_of: None,
                archive_to: Some(r.archive_to),
                error: None,
            });
        }
        let dirs: BTreeSet<String> = files
            .iter()
            .filter(|f| f.rows > 0)
            .map(|f| f.dir.clone())
            .collect();
        out.partitions = dirs.iter().cloned().collect();
        if self.config.catalog.kind == CatalogKind::Glue
            && let Some(db) = &self.config.catalog.database
        {
            let existing: HashSet<String> = Format::of(&meta)
                .data_files(&self.lake, &lake::processed_prefix(&table.name))
                .await?
                .into_iter()
                .map(|f| f.dir)
                .collect();
            out.glue.push(match &old {
                None => format!("CreateTable {db}.{}", table.name),
                Some(o) if o.full_schema()? != meta.full_schema()? => {
                    format!("UpdateTable {db}.{} (new columns)", table.name)
                }
                Some(_) => format!("GetTable {db}.{}", table.name),
            });
            let new: Vec<&String> = dirs.iter().filter(|d| !existing.contains(*d)).collect();
            if !new.is_empty() {
                out.glue.push(format!(
                    "BatchCreatePartition {db}.{}: {}",
                    table.name,
                    new.iter()
                        .map(|d| d.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        Ok(())
    }
}
