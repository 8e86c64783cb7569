//! The ledger: exactly-once state under `_sluice/`.
//!
//! A commit is planned in `_sluice/pending/<id>.json`, its files are staged under
//! `_sluice/staging/<id>/`, and it becomes real when `_sluice/ledger/<id>.json` is written: that
//! single atomic write is the commit point. Publishing (moving staged files into place, removing
//! replaced files, archiving raw files) is idempotent, so recovery after a crash either rolls a
//! commit forward (ledger entry present) or throws its staging away (absent). Both halves are
//! here: [`commit_staged`] (catalog entry, commit point, publish, for every kind of commit) and
//! [`recover`].

use std::collections::{BTreeMap, HashMap, HashSet};

use futures::{StreamExt, TryStreamExt};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::Result;
pub use crate::format::DeltaTxn;
use crate::lake::{Lake, STATE};

/// What happened to a raw file in a commit.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FileOutcome {
    /// Its rows were committed.
    Processed,
    /// Same content as a file already committed; nothing written.
    Duplicate,
}

/// A raw object's identity and fate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileRecord {
    /// Source name.
    pub source: String,
    /// Key in the lake (under `raw/`).
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification time.
    pub last_modified: DateTime<Utc>,
    /// SHA-256 of the content, hex.
    pub sha256: String,
    /// Processed or duplicate.
    pub outcome: FileOutcome,
    /// For a duplicate: the key whose content it repeats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_of: Option<String>,
    /// Where the raw file goes once committed.
    pub archive_to: String,
    /// Where an earlier failure of this file left its `failed/<source>/<file>.error.json` (the
    /// file was put back into `raw/`): removed, if it is there, when the commit is published
    /// (with the attempt counters, in one batch: a key that is absent costs nothing, so it is
    /// not looked for first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_error: Option<String>,
}

/// A staged file and its final place.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Move {
    /// Staged key.
    pub from: String,
    /// Final key.
    pub to: String,
}

/// The changes a commit makes to one table.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TableChange {
    /// Table name.
    pub table: String,
    /// Files to move into `processed/` and `rejected/`.
    pub added: Vec<Move>,
    /// Files replaced by rewritten partitions.
    pub removed: Vec<String>,
    /// Partition folders this commit touched.
    pub partitions: Vec<String>,
    /// Key index files to move into `_sluice/index/<table>/` after the data (the head last).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub index: Vec<Move>,
    /// Key index runs the new head no longer names, deleted once it is in place.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub index_removed: Vec<String>,
    /// For a Delta table: the pipeline's application transaction this commit carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<DeltaTxn>,
    /// A compaction (`sluice compact`): the added files hold the rows of the removed ones and
    /// nothing else, so the table's rows did not change. Such a change is no change to the
    /// table for aggregates and external warehouses (`Ledger::changed_tables`): their rows are
    /// not loaded again. Absent in older entries (false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub compaction: bool,
    /// A replay (`sluice reprocess`): the raw files (keys under `raw/`) whose rows this change
    /// replaced with the rows the current query makes of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replayed: Vec<String>,
}

/// One commit: files in, table changes out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Commit {
    /// Derived from the inputs and the queries: a retry has the same id.
    pub id: String,
    /// The run that made it.
    pub run_id: String,
    /// When it was planned.
    pub created_at: DateTime<Utc>,
    /// Raw files.
    pub files: Vec<FileRecord>,
    /// Table changes.
    pub tables: Vec<TableChange>,
}

/// `_sluice/pending/<id>.json`
pub fn pending_key(id: &str) -> String {
    format!("{STATE}/pending/{id}.json")
}

/// `_sluice/ledger/<id>.json`
pub fn ledger_key(id: &str) -> String {
    format!("{STATE}/ledger/{id}.json")
}

/// `_sluice/staging/<id>/...`
pub fn staging_prefix(id: &str) -> String {
    format!("{STATE}/staging/{id}")
}

/// `_sluice/attempts/<hash of key>.json`
pub fn attempts_key(raw_key: &str) -> String {
    format!(
        "{STATE}/attempts/{}.json",
        &sha256_hex(raw_key.as_bytes())[..32]
    )
}

/// A new commit id from `input` (what the commit hashes): the first of `input` salted 0, 1, ...
/// that no ledger entry has, so a commit never replaces another's entry.
pub async fn fresh_id(lake: &Lake, input: &str) -> Result<String> {
    for salt in 0u32.. {
        let id = sha256_hex(format!("{input}{salt}").as_bytes())[..24].to_string();
        if !lake.exists(&ledger_key(&id)).await? {
            return Ok(id);
        }
    }
    unreachable!("an unbounded range ends only by returning")
}

/// The second half of every commit (a run's batch, a replay, a compaction), once its pending
/// record and its staged files are in the lake: the table's catalog entry (`meta`, when the
/// commit changes it), the commit point (the ledger entry, with its per-file `counts`), the
/// publish, and the end of the pending record. A crash between any two steps (`--crash-at`
/// `staged`, `committed`, `archived`) is finished or thrown away by [`recover`], the other
/// half, below.
pub async fn commit_staged(
    lake: &Lake,
    commit: &Commit,
    counts: &HashMap<String, crate::transform::Counts>,
    meta: Option<&crate::catalog::TableMeta>,
) -> Result<()> {
    crate::fault::point("staged");
    crate::fault::pause("staged");
    if let Some(meta) = meta {
        meta.save(lake).await?;
    }
    // The commit point.
    write_entry(lake, commit, counts).await?;
    crate::fault::point("committed");
    publish(lake, commit).await?;
    crate::fault::point("archived");
    lake.delete(&pending_key(&commit.id)).await
}

/// Writes a commit's ledger entry, the commit point, with its per-file counts `[read, written,
/// rejected, duplicate]`.
async fn write_entry(
    lake: &Lake,
    commit: &Commit,
    counts: &HashMap<String, crate::transform::Counts>,
) -> Result<()> {
    let key = ledger_key(&commit.id);
    let mut entry = serde_json::to_value(commit).map_err(|e| crate::error::Error::State {
        path: key.clone(),
        message: e.to_string(),
    })?;
    entry["counts"] = serde_json::to_value(
        counts
            .iter()
            .map(|(k, c)| (k.clone(), [c.read, c.written, c.rejected, c.duplicate]))
            .collect::<BTreeMap<_, _>>(),
    )
    .unwrap_or_default();
    lake.put_json(&key, &entry).await
}

/// Whether a data file is a rewrite of another (`part-<commit>-r<k>.parquet`: the rows of a
/// file a commit replaced rows of, without them), as commits and replays name them.
pub fn is_rewrite(key: &str) -> bool {
    let name = key.rsplit('/').next().unwrap_or(key);
    name.strip_suffix(".parquet")
        .and_then(|n| n.rsplit_once("-r"))
        .is_some_and(|(_, k)| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
}

/// The lake-wide commit lock.
pub const COMMIT_LOCK: &str = "_sluice/locks/commit.json";

/// SHA-256 as hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Everything committed so far, indexed.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Committed files by key (several versions possible).
    pub by_key: HashMap<String, Vec<FileRecord>>,
    /// Content known per source: (source, SHA-256) -> the key of the processed file that
    /// brought it in. Every record adds to it (a duplicate's entry names its original), and a
    /// commit never replaces another's ledger entry, so a content once known stays known.
    pub by_sha: HashMap<(String, String), String>,
    /// Sizes of committed files: a new file of another size cannot repeat one's content.
    pub sizes: HashSet<u64>,
    /// Where committed files were archived: a new file's archive place is another one.
    pub archived: HashSet<String>,
    /// Ids of all commits, sorted.
    pub commits: Vec<String>,
    /// Commits by id, for the tables whose rows they changed (a compaction changes none).
    pub changed_tables: HashMap<String, Vec<String>>,
    /// Per table, the latest commit that wrote rows from raw files: when it was planned and
    /// the rows it wrote (`row_count_change` checks compare with it).
    pub last_written: HashMap<String, (DateTime<Utc>, u64)>,
}

/// A ledger entry as read: the commit and its per-file counts `[read, written, rejected,
/// duplicate]`.
#[derive(Deserialize)]
struct Entry {
    #[serde(flatten)]
    commit: Commit,
    #[serde(default)]
    counts: BTreeMap<String, Vec<u64>>,
}

impl Ledger {
    /// Loads every ledger entry.
    pub async fn load(lake: &Lake) -> Result<Ledger> {
        let mut ledger = Ledger::default();
        ledger.refresh(lake).await?;
        Ok(ledger)
    }

    /// Adds the entries committed since this ledger was loaded (by other runs); returns how
    /// many there were.
    pub async fn refresh(&mut self, lake: &Lake) -> Result<usize> {
        let mut new = Vec::new();
        for meta in lake.list(&format!("{STATE}/ledger")).await? {
            let key = meta.location.to_string();
            let id = crate::lake::relative(&key, &format!("{STATE}/ledger"))
                .trim_end_matches(".json")
                .to_string();
            if !self.changed_tables.contains_key(&id) {
                new.push(key);
            }
        }
        // Read a few at a time, added in the listing's order.
        let commits: Vec<Option<Entry>> = futures::stream::iter(&new)
            .map(|key| lake.get_json::<Entry>(key))
            .buffered(lake.concurrency())
            .try_collect()
            .await?;
        let mut added = 0;
        for entry in commits.into_iter().flatten() {
            let commit = &entry.commit;
            let written: u64 = entry.counts.values().filter_map(|c| c.get(1)).sum();
            for t in commit.tables.iter().filter(|t| !t.compaction) {
                if commit.files.is_empty() || entry.counts.is_empty() {
                    continue;
                }
                let last = self
                    .last_written
                    .entry(t.table.clone())
                    .or_insert((commit.created_at, written));
                if commit.created_at >= last.0 {
                    *last = (commit.created_at, written);
                }
            }
            self.add(commit);
            added += 1;
        }
        self.commits.sort();
        Ok(added)
    }

    /// The file whose content a file of `source` with this SHA-256 repeats, if the content was
    /// committed before.
    pub fn known_content(&self, source: &str, sha: &str) -> Option<&String> {
        self.by_sha.get(&(source.to_string(), sha.to_string()))
    }

    /// The keys of `records` that commits since this batch was planned made known: the same
    /// object committed, or a processed file's content brought in by another file.
    pub fn conflicts(&self, records: &[FileRecord]) -> Vec<String> {
        records
            .iter()
            .filter(|r| {
                self.committed(&r.key, r.size, r.last_modified).is_some()
                    || (r.outcome == FileOutcome::Processed
                        && self.known_content(&r.source, &r.sha256).is_some())
            })
            .map(|r| r.key.clone())
            .collect()
    }

    /// Adds a commit to the index.
    pub fn add(&mut self, commit: &Commit) {
        for f in &commit.files {
            self.sizes.insert(f.size);
            self.archived.insert(f.archive_to.clone());
            let original = match f.outcome {
                FileOutcome::Processed => &f.key,
                FileOutcome::Duplicate => f.duplicate_of.as_ref().unwrap_or(&f.key),
            };
            self.by_sha
                .entry((f.source.clone(), f.sha256.clone()))
                .or_insert_with(|| original.clone());
            self.by_key
                .entry(f.key.clone())
                .or_default()
                .push(f.clone());
        }
        self.commits.push(commit.id.clone());
        self.changed_tables.insert(
            commit.id.clone(),
            commit
                .tables
                .iter()
                .filter(|t| !t.compaction && (!t.added.is_empty() || !t.removed.is_empty()))
                .map(|t| t.table.clone())
                .collect(),
        );
    }

    /// The committed record of this exact object (key, size, modification time), if any.
    pub fn committed(&self, key: &str, size: u64, modified: DateTime<Utc>) -> Option<&FileRecord> {
        self.by_key
            .get(key)?
            .iter()
            .find(|r| r.size == size && r.last_modified == modified)
    }

    /// Number of committed files.
    pub fn file_count(&self) -> usize {
        self.by_key.values().map(Vec::len).sum()
    }

    /// A fingerprint of the commits that changed any of `tables`.
    pub fn fingerprint(&self, tables: &[String]) -> String {
        let mut h = Sha256::new();
        for id in &self.commits {
            if let Some(changed) = self.changed_tables.get(id)
                && changed.iter().any(|t| tables.contains(t))
            {
                h.update(id.as_bytes());
                h.update(b"\n");
            }
        }
        hex::encode(h.finalize())
    }
}

/// Failed attempts of a raw file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Attempts {
    /// Key of the raw file.
    pub key: String,
    /// How many runs failed on it.
    pub attempts: u32,
    /// The errors, oldest first.
    pub errors: Vec<AttemptError>,
}

/// One failed attempt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttemptError {
    /// The run.
    pub run_id: String,
    /// When.
    pub at: DateTime<Utc>,
    /// What went wrong.
    pub error: String,
}

/// Publishes a commit whose ledger entry exists: staged files into place, replaced files
/// removed, raw files archived, attempt counters dropped. Idempotent. Each step's
/// requests go a few at a time ([`Lake::concurrency`]) and its deletes in batches
/// (`DeleteObjects` in S3); the steps stay in this order.
pub async fn publish(lake: &Lake, commit: &Commit) -> Result<()> {
    for t in &commit.tables {
        // A staged file that is gone was moved by an earlier publish of this commit.
        let moves: Vec<(String, String)> = t
            .added
            .iter()
            .map(|m| (m.from.clone(), m.to.clone()))
            .collect();
        lake.move_all(&moves).await?;
        let added: Vec<String> = t.added.iter().map(|m| m.to.clone()).collect();
        crate::format::publish(lake, &t.table, &added, &t.removed, t.delta.as_ref()).await?;
        // The key index follows the data it describes: runs, then the head that names them
        // (one at a time, in that order), then the runs the head no longer names.
        for m in &t.index {
            lake.move_all(&[(m.from.clone(), m.to.clone())]).await?;
        }
        crate::fault::point("indexed");
        lake.delete_all(t.index_removed.iter().cloned()).await?;
    }
    crate::fault::point("published");
    archive_all(lake, &commit.files).await?;
    lake.delete_all(
        commit
            .files
            .iter()
            .flat_map(|f| std::iter::once(attempts_key(&f.key)).chain(f.stale_error.clone())),
    )
    .await?;
    // The run's claims go when its batch ends (`lock::unclaim`); a crashed run's are stale.
    Ok(())
}

/// Moves committed raw files to their archive places, each if it is still in `raw/` as it was
/// committed (same size and modification time: one listing of their folder in S3, or a `HEAD`
/// each, [`Lake::metas`]); a move is a copy, whose answer says it is whole, and the originals'
/// deletes go in batches.
pub async fn archive_all(lake: &Lake, files: &[FileRecord]) -> Result<()> {
    if files.is_empty() {
        return Ok(());
    }
    let keys: Vec<String> = files.iter().map(|f| f.key.clone()).collect();
    let now = lake.metas(&keys).await?;
    let moves: Vec<(String, String)> = files
        .iter()
        .filter(|f| {
            now.get(&f.key)
                .is_some_and(|m| m.size == f.size && m.last_modified == f.last_modified)
        })
        .map(|f| (f.key.clone(), f.archive_to.clone()))
        .collect();
    lake.move_all(&moves).await?;
    Ok(())
}

/// Finishes or throws away commits a crashed run left behind. Call with the commit lock held.
/// A commit without its ledger entry whose run is still at work ([`crate::lock::run_alive`]:
/// it plans and stages beside other commits, and takes the lock only for its commit point) is
/// left to that run.
pub async fn recover(lake: &Lake, ttl: std::time::Duration) -> Result<Vec<String>> {
    let mut done = Vec::new();
    for meta in lake.list(&format!("{STATE}/pending")).await? {
        let key = meta.location.to_string();
        let Some(commit) = lake.get_json::<Commit>(&key).await? else {
            continue;
        };
        let committed = lake.exists(&ledger_key(&commit.id)).await?;
        if !committed && crate::lock::run_alive(lake, &commit.run_id, ttl).await? {
            continue;
        }
        if committed {
            tracing::warn!(commit = %commit.id, "finishing a commit interrupted after its commit point");
            publish(lake, &commit).await?;
        } else {
            tracing::warn!(commit = %commit.id, "discarding a commit interrupted before its commit point");
            // The record first: a run taken for dead that comes back finds it gone before it
            // could commit staging that is going (a crash in between leaves staged garbage).
            lake.delete(&key).await?;
            let staged = lake.list(&staging_prefix(&commit.id)).await?;
            lake.delete_all(staged.into_iter().map(|m| m.location.to_string()))
                .await?;
            done.push(commit.id);
            continue;
        }
        lake.delete(&key).await?;
        done.push(commit.id);
    }
    Ok(done)
}
