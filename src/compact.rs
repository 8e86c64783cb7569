//! `sluice compact` for plain Parquet tables: the small files of each partition folder merged
//! into files of about the table's `target_file_size`, as one ledger commit.
//!
//! Plan: in each folder, the files smaller than the target start as a bin each; the two
//! smallest bins are merged while together they fit the target, so that afterwards no two bins
//! fit together (another compaction finds nothing to do, up to how much better the merged
//! files compress). A bin of several files becomes one file (`part-<commit>-c<k>.parquet`)
//! holding their rows, in the order of the files' names; a file is never split, so every file
//! group of the key index lies in one file: the merged file takes over the groups of the files
//! it replaces, and the index's runs (key -> group) stay as they are. Only its head (files ->
//! groups) changes, and is staged with the data.
//!
//! The commit is a sluice commit like a run's (pending record, staging, ledger entry, publish,
//! recovery rolling it forward or discarding it), its `TableChange` marked `compaction`. Its id
//! hashes the table and the files it replaces, so a compaction interrupted before its commit
//! point and run again writes the same files under the same names. Plain tables keep their
//! reader window: between the new files' rename and the old ones' delete, a reader listing the
//! folder sees both.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::path::{Path, PathBuf};

use chrono::Utc;

use crate::catalog::TableMeta;
use crate::config::TableConfig;
use crate::error::{Error, Result};
use crate::index::{self, Index, Shape, Unusable};
use crate::lake::{self, Lake};
use crate::ledger::{self, Commit, Move, TableChange};
use crate::sink;

/// A table folder before and after a compaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FolderStats {
    /// The folder: `processed/<table>` or `rejected/<table>`.
    pub prefix: String,
    /// Data files before.
    pub files_before: u64,
    /// Their bytes.
    pub bytes_before: u64,
    /// Data files after.
    pub files_after: u64,
    /// Their bytes.
    pub bytes_after: u64,
    /// Files written.
    pub added: u64,
    /// Files replaced.
    pub removed: u64,
}

/// A data file and its size.
#[derive(Debug, Clone)]
struct DataFile {
    key: String,
    dir: String,
    bytes: u64,
}

/// Files merged into one.
#[derive(Debug, Clone)]
struct Bin {
    files: Vec<DataFile>,
    bytes: u64,
}

/// The data files of a plain table folder with their sizes, by key.
async fn listed(lake: &Lake, prefix: &str) -> Result<Vec<DataFile>> {
    let mut out = Vec::new();
    for m in lake.list(prefix).await? {
        let key = m.location.to_string();
        if let Some(dir) = sink::data_file_dir(&key, prefix) {
            out.push(DataFile {
                dir: dir.to_string(),
                key,
                bytes: m.size,
            });
        }
    }
    Ok(out)
}

/// The bins of several files that a compaction to `target` bytes merges, for files of one or
/// more folders (files of a folder are only merged with each other), in key order.
fn plan(files: &[DataFile], target: u64) -> Vec<Bin> {
    let mut by_dir: BTreeMap<&str, Vec<&DataFile>> = BTreeMap::new();
    for f in files.iter().filter(|f| f.bytes < target) {
        by_dir.entry(&f.dir).or_default().push(f);
    }
    let mut out = Vec::new();
    for (_, mut small) in by_dir {
        // First fit, largest first (ties by key: the plan is the same every time).
        small.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.key.cmp(&b.key)));
        let mut bins: Vec<Option<Bin>> = Vec::new();
        for f in small {
            match bins
                .iter_mut()
                .flatten()
                .find(|b| b.bytes + f.bytes <= target)
            {
                Some(b) => {
                    b.files.push(f.clone());
                    b.bytes += f.bytes;
                }
                None => bins.push(Some(Bin {
                    files: vec![f.clone()],
                    bytes: f.bytes,
                })),
            }
        }
        // Then the two smallest bins merge while they fit together, so that no two do.
        let mut heap: BinaryHeap<Reverse<(u64, usize)>> = bins
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.as_ref().map(|b| Reverse((b.bytes, i))))
            .collect();
        while let (Some(Reverse(a)), Some(Reverse(b))) = (heap.pop(), heap.pop()) {
            if a.0 + b.0 > target {
                break;
            }
            let (Some(mut x), Some(y)) = (bins[a.1].take(), bins[b.1].take()) else {
                break;
            };
            x.files.extend(y.files);
            x.bytes += y.bytes;
            heap.push(Reverse((x.bytes, a.1)));
            bins[a.1] = Some(x);
        }
        for mut b in bins.into_iter().flatten() {
            if b.files.len() > 1 {
                b.files.sort_by(|p, q| p.key.cmp(&q.key));
                out.push(b);
            }
        }
    }
    out.sort_by(|a, b| a.files[0].key.cmp(&b.files[0].key));
    out
}

/// Writes the rows of `files` (in order, with the folder's file columns `schema`) into one
/// local Parquet file at `out`; returns its rows.
async fn merge_files(
    lake: &Lake,
    files: &[DataFile],
    schema: &datafusion::arrow::datatypes::SchemaRef,
    compression: &str,
    out: &Path,
) -> Result<u64> {
    let mut writer = sink::LocalParquet::new(out, schema.clone(), compression);
    for f in files {
        let input = lake.local_file(&f.key).await?;
        for b in sink::local_batches(input, &f.key)? {
            writer.write(&sink::conform(&b?, schema)?)?;
        }
    }
    // Files without rows: an empty file of the schema keeps their place.
    let rows = writer.finish(true)?.map_or(0, |(_, rows)| rows);
    Ok(rows)
}

/// The compaction's commit id: the table and the files it replaces (never an id in the ledger).
async fn commit_id(lake: &Lake, table: &str, bins: &[Bin]) -> Result<String> {
    let mut input = format!("compact\n{table}\n");
    for f in bins.iter().flat_map(|b| &b.files) {
        input.push_str(&f.key);
        input.push('\n');
    }
    ledger::fresh_id(lake, &input).await
}

/// The key index of a keyed table whose head names exactly the files `listed` (rebuilt from
/// the table's files, and published at once, when it is missing, damaged or names others).
/// Returns it and why it was rebuilt, if it was.
async fn index_of(
    lake: &Lake,
    meta: &TableMeta,
    shape: &Shape,
    listed: &[DataFile],
    scratch: &Path,
) -> Result<(Index, Option<String>)> {
    let why = match Index::open(lake, &meta.name, shape).await? {
        Ok(i)
            if i.head.files.len() == listed.len()
                && listed.iter().all(|f| i.head.files.contains_key(&f.key)) =>
        {
            return Ok((i, None));
        }
        Ok(_) => "its files are not the table's".to_string(),
        Err(Unusable::Missing) => "there was none".to_string(),
        Err(Unusable::Damaged(why)) => why,
    };
    let sip = index::sip_for(lake, &meta.name).await;
    index::rebuild(lake, meta, shape, sip, scratch, why).await
}

/// Compacts a plain table's processed and rejected folders into files of about `target` bytes
/// in one ledger commit (with the key index's head, for a keyed table). Call with the commit
/// lock held, after recovery. Returns each folder's figures and why the index was rebuilt
/// first, if it was.
pub async fn plain(
    lake: &Lake,
    meta: &TableMeta,
    table: &TableConfig,
    target: u64,
    run_id: &str,
) -> Result<(Vec<FolderStats>, Option<String>)> {
    let scratch = lake.scratch(run_id, &format!("{}-compact", meta.name));
    compact_in(lake, meta, table, target, run_id, &scratch).await
}

async fn compact_in(
    lake: &Lake,
    meta: &TableMeta,
    table: &TableConfig,
    target: u64,
    run_id: &str,
    scratch: &Path,
) -> Result<(Vec<FolderStats>, Option<String>)> {
    let folders = [
        (
            lake::processed_prefix(&meta.name),
            sink::nullable(meta.file_schema()?.as_ref()),
        ),
        (
            lake::rejected_prefix(&meta.name),
            sink::nullable(meta.rejected_schema()?.as_ref()),
        ),
    ];
    let mut listings = Vec::with_capacity(folders.len());
    let mut bins = Vec::with_capacity(folders.len());
    for (prefix, _) in &folders {
        let files = listed(lake, prefix).await?;
        bins.push(plan(&files, target));
        listings.push(files);
    }
    let mut stats: Vec<FolderStats> = folders
        .iter()
        .zip(&listings)
        .map(|((prefix, _), files)| FolderStats {
            prefix: prefix.clone(),
            files_before: files.len() as u64,
            bytes_before: files.iter().map(|f| f.bytes).sum(),
            files_after: files.len() as u64,
            bytes_after: files.iter().map(|f| f.bytes).sum(),
            ..Default::default()
        })
        .collect();
    if bins.iter().all(Vec::is_empty) {
        return Ok((stats, None));
    }
    std::fs::create_dir_all(scratch)
        .map_err(|e| Error::io(format!("cannot create {}", scratch.display()), e))?;
    let mut index = None;
    let mut rebuilt = None;
    if let Some(order_by) = table.keyed() {
        let shape = Shape::of(meta, &table.unique_key, order_by)?;
        let (i, why) = index_of(lake, meta, &shape, &listings[0], scratch).await?;
        index = Some(i);
        rebuilt = why;
    }
    let all: Vec<Bin> = bins.iter().flatten().cloned().collect();
    let id = commit_id(lake, &meta.name, &all).await?;
    let mut change = TableChange {
        table: meta.name.clone(),
        compaction: true,
        ..Default::default()
    };
    let mut staged: Vec<(PathBuf, String)> = Vec::new();
    let mut k = 0;
    for (i, ((prefix, schema), folder_bins)) in folders.iter().zip(&bins).enumerate() {
        for bin in folder_bins {
            let dir = &bin.files[0].dir;
            let name = format!("part-{id}-c{k}.parquet");
            k += 1;
            let to = match dir.as_str() {
                "" => format!("{prefix}/{name}"),
                d => format!("{prefix}/{d}/{name}"),
            };
            let path = scratch.join(&name);
            let rows = merge_files(lake, &bin.files, schema, &table.compression, &path).await?;
            let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            let olds: Vec<String> = bin.files.iter().map(|f| f.key.clone()).collect();
            if i == 0
                && let Some(index) = index.as_mut()
            {
                index.head.merge_files(&olds, &to, rows, bytes)?;
            }
            let s = &mut stats[i];
            s.added += 1;
            s.removed += olds.len() as u64;
            s.files_after = s.files_after + 1 - olds.len() as u64;
            s.bytes_after = s.bytes_after + bytes - bin.bytes;
            let from = format!("{}/{to}", ledger::staging_prefix(&id));
            staged.push((path, from.clone()));
            change.added.push(Move { from, to });
            change.removed.extend(olds);
            if i == 0 {
                change.partitions.push(dir.clone());
            }
        }
    }
    change.partitions.sort();
    change.partitions.dedup();
    if let Some(mut index) = index {
        index.head.commit = id.clone();
        let head = scratch.join("head.json");
        let json = serde_json::to_vec_pretty(&index.head).map_err(|e| Error::State {
            path: index::head_key(&meta.name),
            message: e.to_string(),
        })?;
        std::fs::write(&head, json)
            .map_err(|e| Error::io(format!("cannot write {}", head.display()), e))?;
        let to = index::head_key(&meta.name);
        let from = format!("{}/{to}", ledger::staging_prefix(&id));
        staged.push((head, from.clone()));
        change.index.push(Move { from, to });
    }
    let commit = Commit {
        id: id.clone(),
        run_id: run_id.to_string(),
        created_at: Utc::now(),
        files: Vec::new(),
        tables: vec![change],
    };
    lake.put_json(&ledger::pending_key(&id), &commit).await?;
    for (path, key) in staged {
        lake.put_file(&key, &path).await?;
    }
    ledger::commit_staged(lake, &commit, &Default::default(), None).await?;
    tracing::info!(table = %meta.name, commit = %id, "compacted");
    Ok((stats, rebuilt))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &str, name: &str, bytes: u64) -> DataFile {
        DataFile {
            key: format!("processed/t/{dir}/{name}"),
            dir: dir.into(),
            bytes,
        }
    }

    /// Bins stay within their folder and the target, large files stay alone, and no two of
    /// the resulting files would fit the target together (a second plan has nothing to do).
    #[test]
    fn plans_merge_small_files_of_a_folder_up_to_the_target() {
        let mut files = Vec::new();
        for i in 0..10 {
            files.push(file("d=1", &format!("a{i}"), 30));
        }
        files.push(file("d=1", "big", 150));
        files.push(file("d=2", "x", 10));
        files.push(file("d=3", "y", 10));
        files.push(file("d=3", "z", 10));
        let bins = plan(&files, 100);
        for b in &bins {
            assert!(b.bytes <= 100, "{b:?}");
            assert!(b.files.iter().all(|f| f.dir == b.files[0].dir));
            assert!(b.files.iter().all(|f| !f.key.ends_with("big")));
            assert!(b.files.len() > 1);
        }
        let merged: usize = bins.iter().map(|b| b.files.len()).sum();
        // d=1: ten files of 30 in bins of three (90) and one left over; d=3: one bin of two.
        assert_eq!(bins.iter().filter(|b| b.files[0].dir == "d=1").count(), 3);
        assert_eq!(bins.iter().filter(|b| b.files[0].dir == "d=3").count(), 1);
        assert_eq!(merged, 9 + 2);
        // After it: every bin a file of its bytes, the files left alone as they were.
        let mut after: Vec<DataFile> = files
            .iter()
            .filter(|f| !bins.iter().any(|b| b.files.iter().any(|g| g.key == f.key)))
            .cloned()
            .collect();
        for (i, b) in bins.iter().enumerate() {
            after.push(file(&b.files[0].dir, &format!("c{i}"), b.bytes));
        }
        assert!(plan(&after, 100).is_empty(), "a second plan merges nothing");
        // The same files in another order give the same plan.
        let mut reversed = files.clone();
        reversed.reverse();
        let again = plan(&reversed, 100);
        let keys = |bins: &[Bin]| -> Vec<Vec<String>> {
            bins.iter()
                .map(|b| b.files.iter().map(|f| f.key.clone()).collect())
                .collect()
        };
        assert_eq!(keys(&bins), keys(&again));
    }
}
