//! The key index of a `unique_key` table, kept in the lake under `_sluice/index/<table>/`: for
//! every key, its 128-bit fingerprint -> the current row's `order_by` value, a hash of the row's
//! values and the file group holding the row. A commit looks up only its batch's keys and
//! rewrites only the files that hold keys it replaces; it never lists or reads other files.
//!
//! Layout: `head.json` (format, what the keys are, the fingerprint key, the runs, the files and
//! their groups) and sorted runs `run-<name>.idx`, an LSM: each commit writes one run with its
//! batch's keys, merged with the newest runs while they are at most twice as large as what is
//! merged so far, so that run sizes fall geometrically from the oldest to the newest (a binary
//! counter: O(log n) runs, each entry rewritten O(log n) times in its life). A run is pages of
//! [`PAGE_ENTRIES`] entries sorted by fingerprint, a directory (each page's first fingerprint,
//! place and CRC-32) and a trailer; a lookup reads the trailer and the directory, then only the
//! pages its keys fall in. Index files are staged and published with the commit like its data
//! files; the head is moved into place last, and only runs the head names are the index.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use datafusion::arrow::array::{BooleanArray, RecordBatch};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::catalog::TableMeta;
use crate::config::TableConfig;
use crate::error::{Error, Result};
use crate::lake::{self, Lake, STATE};
use crate::sink::stream::{Keying, OutFile, TableSink};
use crate::sink::{self, TableFile};

/// The format of index files this sluice writes; an index of another format is rebuilt.
pub const FORMAT: u32 = 1;
const MAGIC: &[u8; 8] = b"SLIDX001";
/// Entries per page: a lookup of k keys reads about k pages.
const PAGE_ENTRIES: usize = 128;
const TRAILER: u64 = 40;
const DIR_ENTRY: usize = 32;
/// Bytes read at once when a run is read whole (merges, checks).
const SCAN_SPAN: u64 = 8 << 20;
/// Pages of a lookup this close are read in one request.
const LOOKUP_GAP: u64 = 256 << 10;

/// `_sluice/index/<table>`
pub fn prefix(table: &str) -> String {
    format!("{STATE}/index/{table}")
}

/// `_sluice/index/<table>/head.json`
pub fn head_key(table: &str) -> String {
    format!("{}/head.json", prefix(table))
}

/// `_sluice/index/<table>/run-<name>.idx`
pub fn run_key(table: &str, name: &str) -> String {
    format!("{}/run-{name}.idx", prefix(table))
}

/// How order values are kept: numbers, dates and timestamps as order-preserving u64, anything
/// else as Arrow row-format bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderKind {
    /// A u64 that sorts as the value does.
    Int,
    /// Row-format bytes.
    Bytes,
}

impl OrderKind {
    /// The kind for an `order_by` column of this type.
    pub fn of(ty: &DataType) -> OrderKind {
        if ty.is_integer()
            || matches!(
                ty,
                DataType::Date32 | DataType::Date64 | DataType::Timestamp(_, _)
            )
        {
            OrderKind::Int
        } else {
            OrderKind::Bytes
        }
    }
}

/// An order value, borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrderValue<'a> {
    /// A number compared as such.
    Int(u64),
    /// Bytes compared as bytes.
    Bytes(&'a [u8]),
}

/// An order value, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Order {
    /// A number compared as such.
    Int(u64),
    /// Bytes compared as bytes.
    Bytes(Vec<u8>),
}

impl Order {
    /// Borrowed.
    pub fn as_value(&self) -> OrderValue<'_> {
        match self {
            Order::Int(v) => OrderValue::Int(*v),
            Order::Bytes(b) => OrderValue::Bytes(b),
        }
    }
}

impl OrderValue<'_> {
    fn to_owned(self) -> Order {
        match self {
            OrderValue::Int(v) => Order::Int(v),
            OrderValue::Bytes(b) => Order::Bytes(b.to_vec()),
        }
    }
}

/// What the index holds for a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    /// The file group holding the row.
    pub group: u32,
    /// A hash of the row's values.
    pub values: u64,
    /// Its `order_by` value.
    pub order: Order,
}

#[derive(Clone, Copy, bytemuck::Zeroable)]
struct Fixed {
    hi: u64,
    lo: u64,
    order: u64,
    values: u64,
    group: u32,
}

impl Fixed {
    fn fp(&self) -> u128 {
        ((self.hi as u128) << 64) | self.lo as u128
    }
}

/// Order values kept as a u64 each: a number as itself, bytes as where they are in the arena (a
/// u32 length, then the bytes).
#[derive(Default)]
pub struct Arena(Vec<u8>);

impl Arena {
    /// The u64 that keeps `order`.
    pub fn store(&mut self, order: OrderValue<'_>) -> u64 {
        match order {
            OrderValue::Int(v) => v,
            OrderValue::Bytes(b) => {
                let at = self.0.len() as u64;
                self.0.extend_from_slice(&(b.len() as u32).to_le_bytes());
                self.0.extend_from_slice(b);
                at
            }
        }
    }

    /// Bytes of order values it holds.
    pub fn bytes(&self) -> usize {
        self.0.len()
    }

    /// The order value `kept` keeps (`bytes`: of a byte order).
    pub fn load(&self, kept: u64, bytes: bool) -> OrderValue<'_> {
        if !bytes {
            return OrderValue::Int(kept);
        }
        let at = kept as usize;
        let len = u32_at(&self.0, at) as usize;
        OrderValue::Bytes(&self.0[at + 4..at + 4 + len])
    }
}

/// Index entries in memory (40 bytes each, byte orders in an arena), to be written as a run.
pub struct Entries {
    kind: OrderKind,
    rows: Vec<Fixed>,
    arena: Arena,
    /// Sorted (and one per fingerprint) since the last push.
    sorted: bool,
}

impl Entries {
    /// Entries of a number order from parts that hold disjoint ranges of fingerprints, given in
    /// ascending order of range, each fingerprint once, all of a part sharing its top
    /// [`SPREAD_BITS`] bits (the in-run dedup index's shards), with each part's count. On
    /// `threads` threads, a part's entries (`each` calls its argument with every entry's
    /// fingerprint, order, values hash and group) are counted by their next bits into about
    /// one bucket for two entries, placed into their buckets in the part's place, and each
    /// bucket (a few entries, as fingerprints are spread evenly) is sorted: two passes over a
    /// part and no comparison sort over the whole (a first load's millions of entries), in
    /// memory that the threads fault in. Parts that break the promise make a run that fails to
    /// be written ("out of order"), never a wrong one.
    pub fn from_parts<P: Send>(
        parts: Vec<(usize, P)>,
        threads: usize,
        each: impl Fn(&P, &mut dyn FnMut(u128, u64, u64, u32)) + Sync,
    ) -> Result<Entries> {
        let total = parts.iter().map(|(n, _)| *n).sum();
        // Zeroed by the allocator: fresh pages, not written here.
        let mut rows: Vec<Fixed> = bytemuck::zeroed_vec(total);
        let mut jobs = Vec::with_capacity(parts.len());
        let mut rest = rows.as_mut_slice();
        // Each part goes (its memory freed) once its entries are placed.
        for (n, p) in parts {
            let (mine, after) = rest.split_at_mut(n);
            jobs.push((mine, p));
            rest = after;
        }
        crate::sink::stream::on_threads(threads, jobs, |(rows, p)| {
            let n = rows.len();
            let bits = (n / 2).max(1).next_power_of_two().trailing_zeros();
            let bucket = |fp: u128| (fp >> (128 - SPREAD_BITS - bits)) as usize & ((1 << bits) - 1);
            let mut starts = vec![0usize; (1 << bits) + 1];
            let mut counted = 0;
            each(&p, &mut |fp, _, _, _| {
                starts[bucket(fp) + 1] += 1;
                counted += 1;
            });
            if counted != n {
                return Err(Error::State {
                    path: "key index".into(),
                    message: format!("a part gave {counted} entries, not the {n} it counted"),
                });
            }
            for b in 0..1 << bits {
                starts[b + 1] += starts[b];
            }
            let mut next = starts.clone();
            each(&p, &mut |fp, order, values, group| {
                let b = bucket(fp);
                if let Some(r) = rows.get_mut(next[b]) {
                    *r = Fixed {
                        hi: (fp >> 64) as u64,
                        lo: fp as u64,
                        order,
                        values,
                        group,
                    };
                }
                next[b] += 1;
            });
            drop(p);
            for w in starts.windows(2) {
                rows[w[0]..w[1]].sort_unstable_by_key(|r| (r.hi, r.lo));
            }
            Ok(())
        })?;
        Ok(Entries {
            kind: OrderKind::Int,
            rows,
            arena: Arena::default(),
            sorted: true,
        })
    }

    /// None yet.
    pub fn new(kind: OrderKind) -> Entries {
        Entries {
            kind,
            rows: Vec::new(),
            arena: Arena::default(),
            sorted: true,
        }
    }

    /// How order values are kept.
    pub fn kind(&self) -> OrderKind {
        self.kind
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Adds an entry.
    pub fn push(&mut self, fp: u128, order: OrderValue<'_>, values: u64, group: u32) {
        let order = self.arena.store(order);
        self.sorted = false;
        self.rows.push(Fixed {
            hi: (fp >> 64) as u64,
            lo: fp as u64,
            order,
            values,
            group,
        });
    }

    fn order(&self, f: &Fixed) -> OrderValue<'_> {
        self.arena.load(f.order, self.kind == OrderKind::Bytes)
    }

    /// The entries' fingerprints, in their order (sorted and distinct once sorted).
    pub fn fps(&self) -> Vec<u128> {
        self.rows.iter().map(Fixed::fp).collect()
    }

    /// Makes room for `n` more entries.
    pub fn reserve(&mut self, n: usize) {
        self.rows.reserve(n);
    }

    /// Sorts by fingerprint (on `threads` threads); of entries with one fingerprint, the one
    /// with the greatest order (the later pushed on a tie) stays.
    pub fn sort(&mut self, threads: usize) {
        if self.sorted {
            return;
        }
        let mut rows = std::mem::take(&mut self.rows);
        match self.kind {
            OrderKind::Int => sort_spread(&mut rows, Fixed::fp, threads, |b| {
                b.sort_unstable_by_key(|r| (r.hi, r.lo, r.order))
            }),
            OrderKind::Bytes => sort_spread(&mut rows, Fixed::fp, threads, |b| {
                b.sort_unstable_by(|a, b| {
                    (a.hi, a.lo)
                        .cmp(&(b.hi, b.lo))
                        .then_with(|| order_cmp(self.order(a), self.order(b)))
                })
            }),
        }
        // Keep the last (greatest order) of each run of equal fingerprints.
        rows.dedup_by(|next, kept| {
            let same = next.fp() == kept.fp();
            if same {
                *kept = *next;
            }
            same
        });
        self.rows = rows;
        self.sorted = true;
    }

    /// Changes every entry's group.
    pub fn regroup(&mut self, f: impl Fn(u32) -> u32) {
        for r in &mut self.rows {
            r.group = f(r.group);
        }
    }

    /// Entry `i`: its fingerprint and what it holds.
    pub fn get(&self, i: usize) -> (u128, Held) {
        let f = &self.rows[i];
        (
            f.fp(),
            Held {
                group: f.group,
                values: f.values,
                order: self.order(f).to_owned(),
            },
        )
    }
}

/// Bits of a fingerprint [`sort_spread`] buckets by (its top ones).
pub const SPREAD_BITS: u32 = 4;

/// Sorts `items` by fingerprint (`fp`; spread evenly, as fingerprints are), with `sort` for
/// each bucket, on `threads` threads: an in-place pass (American flag sort) moves each item into
/// the bucket of its fingerprint's top [`SPREAD_BITS`] bits (a sequential read when the items
/// come bucketed already, as from the in-run dedup index's shards), then the buckets are sorted
/// at once. No second buffer: a first load's millions of entries sort in place.
pub(crate) fn sort_spread<T: Send>(
    items: &mut [T],
    fp: impl Fn(&T) -> u128,
    threads: usize,
    sort: impl Fn(&mut [T]) + Sync,
) {
    const BUCKETS: usize = 1 << SPREAD_BITS;
    if threads < 2 || items.len() < 1 << 12 {
        return sort(items);
    }
    let top = |x: &T| (fp(x) >> (128 - SPREAD_BITS)) as usize;
    let mut starts = [0usize; BUCKETS + 1];
    for x in items.iter() {
        starts[top(x) + 1] += 1;
    }
    for b in 0..BUCKETS {
        starts[b + 1] += starts[b];
    }
    // The next unplaced slot of each bucket; an item met out of place is swapped into the
    // next slot of its own bucket.
    let mut next = [0usize; BUCKETS];
    next.copy_from_slice(&starts[..BUCKETS]);
    for b in 0..BUCKETS {
        while next[b] < starts[b + 1] {
            let k = top(&items[next[b]]);
            if k == b {
                next[b] += 1;
            } else {
                items.swap(next[b], next[k]);
                next[k] += 1;
            }
        }
    }
    let mut buckets = Vec::with_capacity(BUCKETS);
    let mut rest = items;
    for b in 0..BUCKETS {
        let (bucket, after) = rest.split_at_mut(starts[b + 1] - starts[b]);
        buckets.push(bucket);
        rest = after;
    }
    // Sorting cannot fail.
    let _ = crate::sink::stream::on_threads(threads, buckets, |b| {
        sort(b);
        Ok(())
    });
}

/// Compares two order values of one kind.
pub fn order_cmp(a: OrderValue<'_>, b: OrderValue<'_>) -> std::cmp::Ordering {
    match (a, b) {
        (OrderValue::Int(x), OrderValue::Int(y)) => x.cmp(&y),
        (OrderValue::Bytes(x), OrderValue::Bytes(y)) => x.cmp(y),
        _ => std::cmp::Ordering::Equal,
    }
}

/// A run in the head.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RunMeta {
    /// `run-<name>.idx`.
    pub name: String,
    /// Entries in it.
    pub entries: u64,
    /// Its size in bytes.
    pub bytes: u64,
}

/// A data file of the table and the groups whose rows it holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IndexedFile {
    /// Groups (a file written by a commit is one group; a rewrite keeps its groups).
    pub groups: Vec<u32>,
    /// Rows in it.
    pub rows: u64,
    /// Its size in bytes.
    pub bytes: u64,
}

/// What a table's keys are; an index of other keys is rebuilt.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Shape {
    /// The table's `unique_key`.
    pub unique_key: Vec<String>,
    /// Its `order_by`.
    pub order_by: String,
    /// The type of `order_by` (Arrow's name).
    pub order_type: String,
    /// How order values are kept.
    pub kind: OrderKind,
}

impl Shape {
    /// The shape of a table's keys, from its catalog entry.
    pub fn of(meta: &TableMeta, unique_key: &[String], order_by: &str) -> Result<Shape> {
        let full = meta.full_schema()?;
        let ty = full
            .field_with_name(order_by)
            .map_err(|_| Error::Schema {
                table: meta.name.clone(),
                message: format!("order_by column {order_by} is not a column of the table"),
            })?
            .data_type()
            .clone();
        Ok(Shape {
            unique_key: unique_key.to_vec(),
            order_by: order_by.to_string(),
            order_type: ty.to_string(),
            kind: OrderKind::of(&ty),
        })
    }
}

/// `head.json`: the index as of its last commit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Head {
    /// [`FORMAT`].
    pub format: u32,
    /// The table.
    pub table: String,
    /// What the keys are.
    pub shape: Shape,
    /// The key of the keyed hash that makes fingerprints.
    pub sip: [u64; 2],
    /// Runs, oldest first.
    pub runs: Vec<RunMeta>,
    /// The table's data files (keys in the lake) and their groups.
    pub files: BTreeMap<String, IndexedFile>,
    /// The next unused group.
    pub next_group: u32,
    /// The commit (or rebuild) that wrote this head.
    pub commit: String,
}

impl Head {
    /// Puts one file in place of `olds` (a compaction merged their rows into it, `rows` rows
    /// and `bytes` bytes): the new file takes over their groups, so every entry of the runs
    /// (key -> group) still names the file holding its row and the runs stay as they are.
    pub fn merge_files(&mut self, olds: &[String], new: &str, rows: u64, bytes: u64) -> Result<()> {
        let mut groups = Vec::new();
        let mut held = 0;
        for old in olds {
            let f = self.files.remove(old).ok_or_else(|| {
                damaged(
                    &self.table,
                    format!("{old} is not among the files of its head"),
                )
            })?;
            groups.extend(f.groups);
            held += f.rows;
        }
        if held != rows {
            return Err(damaged(
                &self.table,
                format!(
                    "its head counts {held} rows in the files merged into {new}, they hold {rows}"
                ),
            ));
        }
        groups.sort_unstable();
        self.files.insert(
            new.to_string(),
            IndexedFile {
                groups,
                rows,
                bytes,
            },
        );
        Ok(())
    }
}

/// A fresh fingerprint key.
pub fn new_sip() -> [u64; 2] {
    [rand::random(), rand::random()]
}

/// The fingerprint key a batch of `table` must use: its index's, or a new one if it has none
/// that reads.
pub async fn sip_for(lake: &Lake, table: &str) -> [u64; 2] {
    match lake.get_json::<Head>(&head_key(table)).await {
        Ok(Some(h)) if h.format == FORMAT => h.sip,
        _ => new_sip(),
    }
}

fn damaged(table: &str, message: impl Into<String>) -> Error {
    Error::Index {
        table: table.to_string(),
        message: message.into(),
    }
}

/// A page's place in a run.
#[derive(Clone, Copy, Debug)]
struct PageRef {
    first: u128,
    offset: u64,
    len: u32,
    crc: u32,
}

/// A run whose trailer and directory have been read.
struct Run {
    key: String,
    table: String,
    kind: OrderKind,
    pages: Vec<PageRef>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn u128_at(b: &[u8], at: usize) -> u128 {
    let mut x = [0u8; 16];
    x.copy_from_slice(&b[at..at + 16]);
    u128::from_le_bytes(x)
}

impl Run {
    /// Reads a run's trailer and directory, checking them.
    async fn open(lake: &Lake, table: &str, meta: &RunMeta, kind: OrderKind) -> Result<Run> {
        let key = run_key(table, &meta.name);
        let size = match lake.head(&key).await? {
            Some(m) => m.size,
            None => return Err(damaged(table, format!("{key} is missing"))),
        };
        if size != meta.bytes || size < TRAILER {
            return Err(damaged(
                table,
                format!("{key} has {size} bytes, the head says {}", meta.bytes),
            ));
        }
        let t = lake.get_range(&key, size - TRAILER..size).await?;
        if t.len() as u64 != TRAILER || &t[..8] != MAGIC {
            return Err(damaged(table, format!("{key} has no index trailer")));
        }
        let (format, pages, entries, dir_at, dir_crc, k) = (
            u32_at(&t, 8),
            u32_at(&t, 12) as usize,
            u64_at(&t, 16),
            u64_at(&t, 24),
            u32_at(&t, 32),
            t[36],
        );
        let want_kind = match kind {
            OrderKind::Int => 0,
            OrderKind::Bytes => 1,
        };
        if format != FORMAT || k != want_kind || entries != meta.entries {
            return Err(damaged(
                table,
                format!("{key} is not the run the head names"),
            ));
        }
        if dir_at + (pages * DIR_ENTRY) as u64 != size - TRAILER {
            return Err(damaged(
                table,
                format!("{key}: its directory is out of place"),
            ));
        }
        let dir = lake.get_range(&key, dir_at..size - TRAILER).await?;
        if crc32fast::hash(&dir) != dir_crc {
            return Err(damaged(
                table,
                format!("{key}: its directory fails its checksum"),
            ));
        }
        let pages = (0..pages)
            .map(|i| {
                let at = i * DIR_ENTRY;
                PageRef {
                    first: u128_at(&dir, at),
                    offset: u64_at(&dir, at + 16),
                    len: u32_at(&dir, at + 24),
                    crc: u32_at(&dir, at + 28),
                }
            })
            .collect();
        Ok(Run {
            key,
            table: table.to_string(),
            kind,
            pages,
        })
    }

    /// Calls `f` with each entry of page `p`, given its bytes (checked first).
    fn each_entry(
        &self,
        p: usize,
        bytes: &[u8],
        mut f: impl FnMut(u128, u32, u64, OrderValue<'_>),
    ) -> Result<()> {
        let page = &self.pages[p];
        if bytes.len() != page.len as usize || crc32fast::hash(bytes) != page.crc {
            return Err(damaged(
                &self.table,
                format!("{}: page {p} fails its checksum", self.key),
            ));
        }
        let mut at = 0;
        let bad = || damaged(&self.table, format!("{}: page {p} is cut short", self.key));
        while at < bytes.len() {
            if at + 28 > bytes.len() {
                return Err(bad());
            }
            let fp = u128_at(bytes, at);
            let group = u32_at(bytes, at + 16);
            let values = u64_at(bytes, at + 20);
            at += 28;
            match self.kind {
                OrderKind::Int => {
                    if at + 8 > bytes.len() {
                        return Err(bad());
                    }
                    f(fp, group, values, OrderValue::Int(u64_at(bytes, at)));
                    at += 8;
                }
                OrderKind::Bytes => {
                    if at + 4 > bytes.len() {
                        return Err(bad());
                    }
                    let len = u32_at(bytes, at) as usize;
                    at += 4;
                    if at + len > bytes.len() {
                        return Err(bad());
                    }
                    f(fp, group, values, OrderValue::Bytes(&bytes[at..at + len]));
                    at += len;
                }
            }
        }
        Ok(())
    }

    /// The entries of page `p`, given its bytes.
    fn decode(&self, p: usize, bytes: &[u8]) -> Result<Vec<(u128, Held)>> {
        let mut out = Vec::with_capacity(PAGE_ENTRIES);
        self.each_entry(p, bytes, |fp, group, values, order| {
            out.push((
                fp,
                Held {
                    group,
                    values,
                    order: order.to_owned(),
                },
            ))
        })?;
        Ok(out)
    }

    /// The pages `fps` (sorted) fall in.
    fn pages_of(&self, fps: &[u128]) -> Vec<usize> {
        let mut out: Vec<usize> = Vec::new();
        for &fp in fps {
            let p = self.pages.partition_point(|pg| pg.first <= fp);
            if p == 0 {
                continue;
            }
            if out.last() != Some(&(p - 1)) {
                out.push(p - 1);
            }
        }
        out
    }

    /// The bytes of `ranges` of the run: on a folder lake read from the file opened once; in
    /// S3 one request a range, a few at a time (object_store's `get_ranges` merges ranges up to
    /// 1 MiB apart: most of a large run for a few thousand keys).
    async fn read_spans(&self, lake: &Lake, ranges: &[Range<u64>]) -> Result<Vec<bytes::Bytes>> {
        if !lake.is_s3() {
            let file = lake.local_file(&self.key).await?;
            let ranges = ranges.to_vec();
            let key = self.key.clone();
            let read = tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                ranges
                    .iter()
                    .map(|r| {
                        let mut buf = vec![0u8; (r.end - r.start) as usize];
                        file.read_exact_at(&mut buf, r.start)
                            .map(|()| bytes::Bytes::from(buf))
                            .map_err(|e| Error::io(format!("cannot read {key}"), e))
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .await
            .map_err(|e| Error::State {
                path: self.key.clone(),
                message: e.to_string(),
            })?;
            return read;
        }
        futures::stream::iter(ranges.iter().map(|r| lake.get_range(&self.key, r.clone())))
            .buffered(16)
            .try_collect()
            .await
    }

    /// What this run holds for any of `fps` (sorted): reads only their pages (neighbours in
    /// one range), [`SCAN_SPAN`] bytes at a time, and joins each page's entries with `fps` as
    /// both are sorted: memory stays the span's and the answer's, whatever the batch.
    async fn lookup(&self, lake: &Lake, fps: &[u128]) -> Result<Vec<(u128, Held)>> {
        let pages = self.pages_of(fps);
        let mut out = Vec::new();
        let mut next_fp = 0;
        let mut start = 0;
        while start < pages.len() {
            let mut spans: Vec<(Range<u64>, Vec<usize>)> = Vec::new();
            let mut bytes = 0u64;
            let mut end = start;
            while end < pages.len() && (bytes < SCAN_SPAN || end == start) {
                let p = pages[end];
                let pg = self.pages[p];
                let r = pg.offset..pg.offset + pg.len as u64;
                match spans.last_mut() {
                    // A short gap costs less read than another request.
                    Some((span, ps)) if r.start - span.end <= LOOKUP_GAP => {
                        bytes += r.end - span.end;
                        span.end = r.end;
                        ps.push(p);
                    }
                    _ => {
                        bytes += r.end - r.start;
                        spans.push((r, vec![p]));
                    }
                }
                end += 1;
            }
            let ranges: Vec<Range<u64>> = spans.iter().map(|(r, _)| r.clone()).collect();
            let got = self.read_spans(lake, &ranges).await?;
            for ((span, ps), data) in spans.iter().zip(got) {
                for &p in ps {
                    let pg = self.pages[p];
                    let at = (pg.offset - span.start) as usize;
                    let page = data.get(at..at + pg.len as usize).ok_or_else(|| {
                        damaged(&self.table, format!("{}: page {p} is cut short", self.key))
                    })?;
                    self.each_entry(p, page, |fp, group, values, order| {
                        while next_fp < fps.len() && fps[next_fp] < fp {
                            next_fp += 1;
                        }
                        if next_fp < fps.len() && fps[next_fp] == fp {
                            let order = order.to_owned();
                            out.push((
                                fp,
                                Held {
                                    group,
                                    values,
                                    order,
                                },
                            ));
                            next_fp += 1;
                        }
                    })?;
                }
            }
            start = end;
        }
        Ok(out)
    }
}

/// Reads a run from its first page to its last, a span at a time.
struct Scan<'a> {
    run: &'a Run,
    next: usize,
    buf: std::vec::IntoIter<(u128, Held)>,
}

impl<'a> Scan<'a> {
    fn new(run: &'a Run) -> Scan<'a> {
        Scan {
            run,
            next: 0,
            buf: Vec::new().into_iter(),
        }
    }

    async fn next(&mut self, lake: &Lake) -> Result<Option<(u128, Held)>> {
        loop {
            if let Some(e) = self.buf.next() {
                return Ok(Some(e));
            }
            if self.next >= self.run.pages.len() {
                return Ok(None);
            }
            let start = self.run.pages[self.next].offset;
            let mut end = self.next;
            let mut stop = start;
            while end < self.run.pages.len() && (stop - start < SCAN_SPAN || end == self.next) {
                stop = self.run.pages[end].offset + self.run.pages[end].len as u64;
                end += 1;
            }
            let bytes = lake.get_range(&self.run.key, start..stop).await?;
            let mut entries = Vec::new();
            for p in self.next..end {
                let pg = self.run.pages[p];
                let at = (pg.offset - start) as usize;
                let page = bytes.get(at..at + pg.len as usize).ok_or_else(|| {
                    damaged(
                        &self.run.table,
                        format!("{}: page {p} is cut short", self.run.key),
                    )
                })?;
                entries.extend(self.run.decode(p, page)?);
            }
            self.next = end;
            self.buf = entries.into_iter();
        }
    }
}

/// Pages of a run being encoded: entries in ascending fingerprint order, cut into pages of
/// [`PAGE_ENTRIES`], each page's directory entry kept for the run's directory.
struct Pages {
    path: PathBuf,
    kind: OrderKind,
    page: Vec<u8>,
    in_page: usize,
    first: u128,
    dir: Vec<u8>,
    /// Where in the run the next page goes.
    offset: u64,
    entries: u64,
    last: Option<u128>,
}

impl Pages {
    /// Pages of the run at `path`, the first at `offset`.
    fn at(path: &Path, kind: OrderKind, offset: u64) -> Pages {
        Pages {
            path: path.to_path_buf(),
            kind,
            page: Vec::with_capacity(PAGE_ENTRIES * 40),
            in_page: 0,
            first: 0,
            dir: Vec::new(),
            offset,
            entries: 0,
            last: None,
        }
    }

    fn fail(&self, e: std::io::Error) -> Error {
        Error::io(format!("cannot write {}", self.path.display()), e)
    }

    /// Bytes an entry takes in a page: fingerprint, group, values hash, then the order (8 bytes,
    /// or a u32 length and the bytes), as [`Pages::push`] writes it.
    fn entry_bytes(order: OrderValue<'_>) -> u64 {
        28 + match order {
            OrderValue::Int(_) => 8,
            OrderValue::Bytes(b) => 4 + b.len() as u64,
        }
    }

    /// Adds an entry, writing a page to `out` when it is full.
    fn push(
        &mut self,
        out: &mut impl Write,
        fp: u128,
        group: u32,
        values: u64,
        order: OrderValue<'_>,
    ) -> Result<()> {
        if self.last.is_some_and(|l| l >= fp) {
            return Err(Error::State {
                path: self.path.display().to_string(),
                message: "index entries out of order".into(),
            });
        }
        self.last = Some(fp);
        if self.in_page == 0 {
            self.first = fp;
        }
        self.page.extend_from_slice(&fp.to_le_bytes());
        self.page.extend_from_slice(&group.to_le_bytes());
        self.page.extend_from_slice(&values.to_le_bytes());
        match (self.kind, order) {
            (OrderKind::Int, OrderValue::Int(v)) => self.page.extend_from_slice(&v.to_le_bytes()),
            (OrderKind::Bytes, OrderValue::Bytes(b)) => {
                self.page.extend_from_slice(&(b.len() as u32).to_le_bytes());
                self.page.extend_from_slice(b);
            }
            _ => {
                return Err(Error::State {
                    path: self.path.display().to_string(),
                    message: "an order value of the wrong kind".into(),
                });
            }
        }
        self.in_page += 1;
        self.entries += 1;
        if self.in_page == PAGE_ENTRIES {
            self.end_page(out)?;
        }
        Ok(())
    }

    /// Writes the page begun, if any.
    fn end_page(&mut self, out: &mut impl Write) -> Result<()> {
        if self.in_page == 0 {
            return Ok(());
        }
        let crc = crc32fast::hash(&self.page);
        self.dir.extend_from_slice(&self.first.to_le_bytes());
        self.dir.extend_from_slice(&self.offset.to_le_bytes());
        self.dir
            .extend_from_slice(&(self.page.len() as u32).to_le_bytes());
        self.dir.extend_from_slice(&crc.to_le_bytes());
        out.write_all(&self.page).map_err(|e| self.fail(e))?;
        self.offset += self.page.len() as u64;
        self.page.clear();
        self.in_page = 0;
        Ok(())
    }

    /// Ends the run after its last page: `dir` (every page's directory entry, in order) and
    /// the trailer. Returns the run's entries and size.
    fn finish(self, out: &mut impl Write, dir: &[u8], entries: u64) -> Result<(u64, u64)> {
        let dir_at = self.offset;
        let mut t = Vec::with_capacity(TRAILER as usize);
        t.extend_from_slice(MAGIC);
        t.extend_from_slice(&FORMAT.to_le_bytes());
        t.extend_from_slice(&((dir.len() / DIR_ENTRY) as u32).to_le_bytes());
        t.extend_from_slice(&entries.to_le_bytes());
        t.extend_from_slice(&dir_at.to_le_bytes());
        t.extend_from_slice(&crc32fast::hash(dir).to_le_bytes());
        t.push(match self.kind {
            OrderKind::Int => 0,
            OrderKind::Bytes => 1,
        });
        t.extend_from_slice(&[0, 0, 0]);
        out.write_all(dir).map_err(|e| self.fail(e))?;
        out.write_all(&t).map_err(|e| self.fail(e))?;
        out.flush().map_err(|e| self.fail(e))?;
        Ok((entries, dir_at + dir.len() as u64 + TRAILER))
    }
}

fn create_run(path: &Path) -> Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    }
    File::create(path).map_err(|e| Error::io(format!("cannot create {}", path.display()), e))
}

/// Writes a run to a local file, entry by entry.
pub struct RunWriter {
    out: BufWriter<File>,
    pages: Pages,
}

impl RunWriter {
    /// A run at `path`.
    pub fn create(path: &Path, kind: OrderKind) -> Result<RunWriter> {
        Ok(RunWriter {
            out: BufWriter::with_capacity(1 << 20, create_run(path)?),
            pages: Pages::at(path, kind, 0),
        })
    }

    /// Adds an entry; fingerprints must come in ascending order.
    pub fn push(&mut self, fp: u128, group: u32, values: u64, order: OrderValue<'_>) -> Result<()> {
        self.pages.push(&mut self.out, fp, group, values, order)
    }

    /// Writes the directory and trailer: the run's path, entries and size.
    pub fn finish(mut self) -> Result<(PathBuf, u64, u64)> {
        let mut pages = self.pages;
        pages.end_page(&mut self.out)?;
        let (dir, entries, path) = (
            std::mem::take(&mut pages.dir),
            pages.entries,
            pages.path.clone(),
        );
        let (entries, bytes) = pages.finish(&mut self.out, &dir, entries)?;
        Ok((path, entries, bytes))
    }
}

/// Writes from an offset of a file on: threads write their parts of one file at once.
struct WriteAt<'a> {
    file: &'a File,
    at: u64,
}

impl Write for WriteAt<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.write_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes sorted, distinct `entries` as a run at `path`, on `threads` threads: each encodes and
/// writes a part of whole pages at the part's place (entries' sizes say where each part begins).
/// Returns the run's entries and size.
pub fn write_run(path: &Path, entries: &Entries, threads: usize) -> Result<(u64, u64)> {
    let file = create_run(path)?;
    let rows = &entries.rows;
    let per = rows
        .len()
        .div_ceil(threads.max(1))
        .div_ceil(PAGE_ENTRIES)
        .max(1)
        * PAGE_ENTRIES;
    let mut parts = Vec::new();
    let mut offset = 0;
    for (k, part) in rows.chunks(per).enumerate() {
        // Each part goes on from the previous part's last entry, which its own order check meets.
        let before = (k * per).checked_sub(1).map(|i| rows[i].fp());
        parts.push((part, offset, before));
        offset += match entries.kind {
            OrderKind::Int => Pages::entry_bytes(OrderValue::Int(0)) * part.len() as u64,
            OrderKind::Bytes => part
                .iter()
                .map(|r| Pages::entry_bytes(entries.order(r)))
                .sum(),
        };
    }
    let encoded: Vec<Result<Pages>> = std::thread::scope(|s| {
        let jobs: Vec<_> = parts
            .iter()
            .map(|&(part, at, before)| {
                let file = &file;
                s.spawn(move || -> Result<Pages> {
                    let mut pages = Pages::at(path, entries.kind, at);
                    pages.last = before;
                    let mut out = BufWriter::with_capacity(1 << 20, WriteAt { file, at });
                    for r in part {
                        pages.push(&mut out, r.fp(), r.group, r.values, entries.order(r))?;
                    }
                    pages.end_page(&mut out)?;
                    out.flush().map_err(|e| pages.fail(e))?;
                    Ok(pages)
                })
            })
            .collect();
        jobs.into_iter()
            .map(|j| {
                j.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    let mut dir = Vec::new();
    let mut count = 0;
    for pages in encoded {
        let pages = pages?;
        dir.extend_from_slice(&pages.dir);
        count += pages.entries;
    }
    let tail = Pages::at(path, entries.kind, offset);
    let mut out = BufWriter::new(WriteAt {
        file: &file,
        at: offset,
    });
    tail.finish(&mut out, &dir, count)
}

/// A table's index, opened: its head and its runs' directories.
pub struct Index {
    /// The head.
    pub head: Head,
    /// Runs, newest first.
    runs: Vec<Run>,
    group_files: HashMap<u32, String>,
}

/// Why an index must be rebuilt before it is used.
pub enum Unusable {
    /// There is none.
    Missing,
    /// It is damaged, of another format or of other keys.
    Damaged(String),
}

impl Index {
    /// An index with nothing in it.
    pub fn empty(table: &str, shape: Shape, sip: [u64; 2]) -> Index {
        Index::from_head(Head {
            format: FORMAT,
            table: table.to_string(),
            shape,
            sip,
            runs: Vec::new(),
            files: BTreeMap::new(),
            next_group: 0,
            commit: String::new(),
        })
    }

    fn from_head(head: Head) -> Index {
        let group_files = head
            .files
            .iter()
            .flat_map(|(k, f)| f.groups.iter().map(move |g| (*g, k.clone())))
            .collect();
        Index {
            head,
            runs: Vec::new(),
            group_files,
        }
    }

    /// Opens a table's index, checking its head and runs against `shape`.
    pub async fn open(
        lake: &Lake,
        table: &str,
        shape: &Shape,
    ) -> Result<std::result::Result<Index, Unusable>> {
        let bytes = match lake.get_opt(&head_key(table)).await? {
            Some(b) => b,
            None => return Ok(Err(Unusable::Missing)),
        };
        let head: Head = match serde_json::from_slice(&bytes) {
            Ok(h) => h,
            Err(e) => {
                return Ok(Err(Unusable::Damaged(format!(
                    "its head does not read ({e})"
                ))));
            }
        };
        if head.format != FORMAT {
            return Ok(Err(Unusable::Damaged(format!(
                "it is of format {} (this sluice writes {FORMAT})",
                head.format
            ))));
        }
        if &head.shape != shape || head.table != table {
            return Ok(Err(Unusable::Damaged(
                "it was built for other keys (unique_key, order_by or its type changed)".into(),
            )));
        }
        let mut runs = Vec::with_capacity(head.runs.len());
        for meta in head.runs.iter().rev() {
            match Run::open(lake, table, meta, shape.kind).await {
                Ok(r) => runs.push(r),
                Err(Error::Index { message, .. }) => return Ok(Err(Unusable::Damaged(message))),
                Err(e) => return Err(e),
            }
        }
        let mut index = Index::from_head(head);
        index.runs = runs;
        Ok(Ok(index))
    }

    /// The file holding a group's rows.
    pub fn file_of(&self, group: u32) -> Option<&str> {
        self.group_files.get(&group).map(String::as_str)
    }

    /// What the index holds for any of `fps` (sorted): the newest run's entry of each.
    pub async fn lookup(&self, lake: &Lake, fps: &[u128]) -> Result<HashMap<u128, Held>> {
        let mut found: HashMap<u128, Held> = HashMap::new();
        let mut todo: Vec<u128> = fps.to_vec();
        for run in &self.runs {
            if todo.is_empty() {
                break;
            }
            for (fp, held) in run.lookup(lake, &todo).await? {
                found.entry(fp).or_insert(held);
            }
            todo.retain(|fp| !found.contains_key(fp));
        }
        Ok(found)
    }

    /// What the runs among `runs` (run keys) hold for any of `fps` (sorted), newest first.
    async fn lookup_in(
        &self,
        lake: &Lake,
        fps: &[u128],
        runs: &HashSet<String>,
    ) -> Result<HashMap<u128, Held>> {
        let mut found: HashMap<u128, Held> = HashMap::new();
        for run in self.runs.iter().filter(|r| runs.contains(&r.key)) {
            for (fp, held) in run.lookup(lake, fps).await? {
                found.entry(fp).or_insert(held);
            }
        }
        Ok(found)
    }

    /// Every entry, sorted by fingerprint (the newest of each key).
    pub async fn all(&self, lake: &Lake) -> Result<Vec<(u128, Held)>> {
        let mut out = Vec::new();
        merge_runs(lake, None, &self.runs, |fp, h| {
            out.push((fp, h.clone()));
            Ok(())
        })
        .await?;
        Ok(out)
    }

    /// The index after a commit: `new` holds the batch's winning rows (groups from `first_group`
    /// up); `files` the table's files after the commit that differ from now (a file key mapped
    /// to `None` is gone). The new run (merged with the newest runs while they are at most twice
    /// the size of what is merged) is written under `scratch`; returns the new head, the run's
    /// local path and name, and the runs it replaces.
    #[allow(clippy::too_many_arguments)]
    pub async fn next(
        &self,
        lake: &Lake,
        commit: &str,
        mut new: Entries,
        files: BTreeMap<String, Option<IndexedFile>>,
        next_group: u32,
        scratch: &Path,
        threads: usize,
    ) -> Result<Next> {
        // A batch's entries come sorted from its sink (a no-op then).
        new.sort(1);
        let mut head = self.head.clone();
        for (key, f) in files {
            match f {
                Some(f) => head.files.insert(key, f),
                None => head.files.remove(&key),
            };
        }
        head.next_group = next_group;
        head.commit = commit.to_string();
        let mut size = new.len() as u64;
        let mut take = 0;
        while take < self.runs.len()
            && self.head.runs[self.head.runs.len() - 1 - take].entries <= 2 * size.max(1)
        {
            size += self.head.runs[self.head.runs.len() - 1 - take].entries;
            take += 1;
        }
        let replaced: Vec<String> = self.head.runs[self.head.runs.len() - take..]
            .iter()
            .map(|r| run_key(&head.table, &r.name))
            .collect();
        head.runs.truncate(self.head.runs.len() - take);
        if new.is_empty() && take == 0 {
            return Ok(Next {
                head,
                run: None,
                replaced,
            });
        }
        let t = std::time::Instant::now();
        let path = scratch.join(format!("run-{commit}.idx"));
        let (entries, bytes) = if take == 0 {
            // Nothing to merge (a first load, or a batch much smaller than the newest run).
            write_run(&path, &new, threads)?
        } else {
            let mut w = RunWriter::create(&path, head.shape.kind)?;
            merge_runs(lake, Some(&new), &self.runs[..take], |fp, h| {
                w.push(fp, h.group, h.values, h.order.as_value())
            })
            .await?;
            let (_, entries, bytes) = w.finish()?;
            (entries, bytes)
        };
        tracing::debug!(
            entries,
            bytes,
            merged_runs = take,
            ms = t.elapsed().as_millis() as u64,
            "key index run written"
        );
        head.runs.push(RunMeta {
            name: commit.to_string(),
            entries,
            bytes,
        });
        Ok(Next {
            head,
            run: Some(path),
            replaced,
        })
    }
}

/// A commit's index: the new head, the new run (local) and the run keys it replaces.
pub struct Next {
    /// The head to publish.
    pub head: Head,
    /// The new run's local file (named in the head's last run).
    pub run: Option<PathBuf>,
    /// Runs no longer in the head, to delete once it is published.
    pub replaced: Vec<String>,
}

/// Calls `emit` with the union of `newest` and `runs` (newest first) in fingerprint order,
/// the newest entry of each key only.
async fn merge_runs(
    lake: &Lake,
    newest: Option<&Entries>,
    runs: &[Run],
    mut emit: impl FnMut(u128, &Held) -> Result<()>,
) -> Result<()> {
    let mut scans: Vec<Scan<'_>> = runs.iter().map(Scan::new).collect();
    // Heads of the sources: 0 is `newest`, then the runs, newest first.
    let mut heads: Vec<Option<(u128, Held)>> = Vec::with_capacity(scans.len() + 1);
    let mut at = 0;
    heads.push(newest.filter(|n| !n.is_empty()).map(|n| n.get(0)));
    for s in &mut scans {
        heads.push(s.next(lake).await?);
    }
    loop {
        let Some(min) = heads.iter().flatten().map(|(fp, _)| *fp).min() else {
            return Ok(());
        };
        let mut emitted = false;
        for i in 0..heads.len() {
            if heads[i].as_ref().is_none_or(|(fp, _)| *fp != min) {
                continue;
            }
            if !emitted {
                if let Some((fp, h)) = &heads[i] {
                    emit(*fp, h)?;
                }
                emitted = true;
            }
            heads[i] = if i == 0 {
                at += 1;
                newest.filter(|n| at < n.len()).map(|n| n.get(at))
            } else {
                scans[i - 1].next(lake).await?
            };
        }
    }
}

/// The data files a table holds now: a Delta table's active files, or a plain table's listing.
pub async fn table_files(lake: &Lake, meta: &TableMeta) -> Result<Vec<TableFile>> {
    crate::format::Format::of(meta)
        .data_files(lake, &lake::processed_prefix(&meta.name))
        .await
}

/// Reads a table's files into index entries, a group per file: the index rebuilt. Returns the
/// head (without runs) and the entries.
pub async fn read_table(
    lake: &Lake,
    meta: &TableMeta,
    shape: &Shape,
    sip: [u64; 2],
) -> Result<(Head, Entries)> {
    let full = meta.full_schema()?;
    let keying = Keying::for_table(&full, shape, sip)?;
    let partition_types = meta.partition_types()?;
    let mut entries = Entries::new(shape.kind);
    let mut head = Index::empty(&meta.name, shape.clone(), sip).head;
    for (g, f) in table_files(lake, meta).await?.into_iter().enumerate() {
        let group = g as u32;
        let file = lake.local_file(&f.key).await?;
        let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut rows = 0;
        for_each_batch(file, &f, &partition_types, &full, |_, b| {
            rows += b.num_rows() as u64;
            keying.entries(b, group, &mut entries)
        })?;
        head.files.insert(
            f.key.clone(),
            IndexedFile {
                groups: vec![group],
                rows,
                bytes,
            },
        );
        head.next_group = group + 1;
    }
    entries.sort(crate::config::all_cores());
    Ok((head, entries))
}

/// Calls `f` with each batch of a table file as stored and with its partition columns restored
/// (the table's full schema).
pub(crate) fn for_each_batch(
    file: File,
    f: &TableFile,
    partition_types: &[(String, DataType)],
    full: &SchemaRef,
    mut each: impl FnMut(&RecordBatch, &RecordBatch) -> Result<()>,
) -> Result<()> {
    let values = sink::parse_partition_dir(&f.dir);
    for b in sink::local_batches(file, &f.key)? {
        let b = b?;
        let whole = sink::restore_partitions(&b, &values, partition_types, full)?;
        each(&b, &whole)?;
    }
    Ok(())
}

/// A table file rewritten without some keys' rows.
pub struct Rewritten {
    /// The new file (local), if any row is left.
    pub path: Option<PathBuf>,
    /// Rows left.
    pub rows: u64,
    /// Rows taken out.
    pub dropped: u64,
}

/// Rewrites a table file without the rows whose key fingerprints are in `drop`, into a local
/// file at `out` with the table's file columns.
#[allow(clippy::too_many_arguments)]
pub async fn rewrite_without(
    lake: &Lake,
    meta: &TableMeta,
    keying: &Keying,
    f: &TableFile,
    drop: &HashSet<u128>,
    compression: &str,
    out: &Path,
) -> Result<Rewritten> {
    rewrite_where(lake, meta, f, compression, out, |whole| {
        let fps = keying.fingerprints(whole)?;
        Ok(fps.iter().map(|fp| Some(!drop.contains(fp))).collect())
    })
    .await
}

/// Rewrites a table file with the rows `keep` keeps (it sees each batch with its partition
/// columns restored), into a local file at `out` with the table's file columns.
pub async fn rewrite_where(
    lake: &Lake,
    meta: &TableMeta,
    f: &TableFile,
    compression: &str,
    out: &Path,
    mut keep: impl FnMut(&RecordBatch) -> Result<BooleanArray>,
) -> Result<Rewritten> {
    let full = meta.full_schema()?;
    let file_schema = sink::nullable(meta.file_schema()?.as_ref());
    let partition_types = meta.partition_types()?;
    let input = lake.local_file(&f.key).await?;
    let mut writer = sink::LocalParquet::new(out, file_schema.clone(), compression);
    let mut dropped = 0u64;
    for_each_batch(input, f, &partition_types, &full, |stored, whole| {
        let kept = filter_record_batch(stored, &keep(whole)?)?;
        dropped += (stored.num_rows() - kept.num_rows()) as u64;
        writer.write(&sink::conform(&kept, &file_schema)?)
    })?;
    let (path, rows) = match writer.finish(false)? {
        Some((path, rows)) => (Some(path), rows),
        None => (None, 0),
    };
    Ok(Rewritten {
        path,
        rows,
        dropped,
    })
}

/// Writes a rebuilt index straight into the lake (run, then head, then the old runs go): for
/// `sluice index rebuild` and a commit that found the index unusable. Call with the commit lock
/// held.
pub async fn publish_rebuilt(
    lake: &Lake,
    mut head: Head,
    entries: &Entries,
    scratch: &Path,
) -> Result<Index> {
    let name = format!(
        "rebuild-{}",
        &crate::ledger::sha256_hex(&rand::random::<[u8; 16]>())[..16]
    );
    let path = scratch.join(format!("run-{name}.idx"));
    let mut w = RunWriter::create(&path, head.shape.kind)?;
    for i in 0..entries.len() {
        let (fp, h) = entries.get(i);
        w.push(fp, h.group, h.values, h.order.as_value())?;
    }
    let (path, n, bytes) = w.finish()?;
    head.runs = vec![RunMeta {
        name: name.clone(),
        entries: n,
        bytes,
    }];
    head.commit = name.clone();
    lake.put_file(&run_key(&head.table, &name), &path).await?;
    lake.put_json(&head_key(&head.table), &head).await?;
    // Runs of the old head, and any other run file, are not part of the index now.
    let keep = run_key(&head.table, &name);
    for m in lake.list(&prefix(&head.table)).await? {
        let k = m.location.to_string();
        if k.ends_with(".idx") && k != keep {
            lake.delete(&k).await?;
        }
    }
    match Index::open(lake, &head.table, &head.shape).await? {
        Ok(i) => Ok(i),
        Err(Unusable::Missing) => Err(damaged(&head.table, "its head vanished after a rebuild")),
        Err(Unusable::Damaged(m)) => Err(damaged(&head.table, m)),
    }
}

/// One difference between an index and its table.
#[derive(Debug, Clone, Serialize)]
pub struct Difference {
    /// The key's fingerprint (hex).
    pub fingerprint: String,
    /// What the table holds (file, order), if it holds the key.
    pub table: Option<String>,
    /// What the index holds.
    pub index: Option<String>,
}

/// Compares an index with what its table's files hold; the differences (at most `limit`, and
/// how many there are in all) and the keys the table holds.
pub async fn check(
    lake: &Lake,
    meta: &TableMeta,
    index: &Index,
    limit: usize,
) -> Result<(Vec<Difference>, u64, usize)> {
    let (rebuilt, want) = read_table(lake, meta, &index.head.shape, index.head.sip).await?;
    let have = index.all(lake).await?;
    let file_of_rebuilt: HashMap<u32, &String> = rebuilt
        .files
        .iter()
        .flat_map(|(k, f)| f.groups.iter().map(move |g| (*g, k)))
        .collect();
    let describe_table = |h: &Held| {
        format!(
            "{} order {:?} values {:016x}",
            file_of_rebuilt
                .get(&h.group)
                .map(|s| s.as_str())
                .unwrap_or("?"),
            h.order,
            h.values
        )
    };
    let describe_index = |h: &Held| {
        format!(
            "{} order {:?} values {:016x}",
            index.file_of(h.group).unwrap_or("(no file)"),
            h.order,
            h.values
        )
    };
    let mut diffs = Vec::new();
    let mut count = 0u64;
    let (mut i, mut j) = (0, 0);
    let mut note = |fp: u128, t: Option<String>, x: Option<String>| {
        count += 1;
        if diffs.len() < limit {
            diffs.push(Difference {
                fingerprint: format!("{fp:032x}"),
                table: t,
                index: x,
            });
        }
    };
    while i < want.len() || j < have.len() {
        let a = (i < want.len()).then(|| want.get(i));
        let b = have.get(j);
        match (a, b) {
            (Some((fa, ha)), Some((fb, hb))) if fa == *fb => {
                let same_file =
                    file_of_rebuilt.get(&ha.group).map(|s| s.as_str()) == index.file_of(hb.group);
                if !same_file || ha.order != hb.order || ha.values != hb.values {
                    note(fa, Some(describe_table(&ha)), Some(describe_index(hb)));
                }
                i += 1;
                j += 1;
            }
            (Some((fa, ha)), Some((fb, _))) if fa < *fb => {
                note(fa, Some(describe_table(&ha)), None);
                i += 1;
            }
            (Some((fa, ha)), None) => {
                note(fa, Some(describe_table(&ha)), None);
                i += 1;
            }
            (_, Some((fb, hb))) => {
                note(*fb, None, Some(describe_index(hb)));
                j += 1;
            }
            (None, None) => break,
        }
    }
    // Files the head names that the table does not hold, and the other way round.
    for k in index.head.files.keys() {
        if !rebuilt.files.contains_key(k) {
            note(0, None, Some(format!("file {k} (not in the table)")));
        }
    }
    for k in rebuilt.files.keys() {
        if !index.head.files.contains_key(k) {
            note(0, Some(format!("file {k} (not in the index)")), None);
        }
    }
    Ok((diffs, count, want.len()))
}

/// A table file rewritten by a commit without the rows it replaced.
pub struct RewrittenFile {
    /// The file as it was.
    pub old: TableFile,
    /// Its size.
    pub old_bytes: u64,
    /// The file without those rows (local), if any row is left.
    pub new: Option<PathBuf>,
    /// The new file's size.
    pub new_bytes: u64,
    /// Rows left.
    pub rows: u64,
    /// Its groups (the new file keeps them).
    pub groups: Vec<u32>,
    /// The keys taken out of it.
    pub drop: HashSet<u128>,
}

/// A batch's keys met with the table's: the files the commit writes and the index it leaves.
pub struct Merged {
    /// Files of new rows.
    pub files: Vec<OutFile>,
    /// Files rewritten without replaced rows.
    pub rewritten: Vec<RewrittenFile>,
    /// Rows replaced.
    pub replaced: u64,
    /// Why the index was rebuilt first, if it was.
    pub rebuilt: Option<String>,
    /// The index to update (keyed tables).
    pub index: Option<Pending>,
}

/// An index and the entries a commit adds to it, waiting for the commit's file names.
pub struct Pending {
    index: Index,
    entries: Entries,
    /// The batch's keys, sorted; `None` if the index held no key when the plan looked (then
    /// every key of the batch won, and the keys are the entries').
    fps: Option<Vec<u128>>,
    /// What the index held for them when the plan looked.
    held: HashMap<u128, Held>,
}

/// Opens a table's index, or rebuilds it from the table's files (published at once: the index
/// is derived from them) if it is missing while the table has files, damaged, or of another
/// format or keys. The reason for a rebuild is returned with it.
pub async fn open_or_rebuild(
    lake: &Lake,
    meta: &TableMeta,
    shape: &Shape,
    sip: [u64; 2],
    scratch: &Path,
) -> Result<(Index, Option<String>)> {
    let why = match Index::open(lake, &meta.name, shape).await? {
        Ok(index) => return Ok((index, None)),
        Err(Unusable::Missing) => "there was none".to_string(),
        Err(Unusable::Damaged(why)) => why,
    };
    rebuild(lake, meta, shape, sip, scratch, why).await
}

/// Rebuilds a table's index from its files; an empty table gets an empty index.
pub async fn rebuild(
    lake: &Lake,
    meta: &TableMeta,
    shape: &Shape,
    sip: [u64; 2],
    scratch: &Path,
    why: String,
) -> Result<(Index, Option<String>)> {
    let (head, entries) = read_table(lake, meta, shape, sip).await?;
    if head.files.is_empty() {
        lake.delete(&head_key(&meta.name)).await?;
        return Ok((Index::empty(&meta.name, shape.clone(), sip), None));
    }
    tracing::warn!(table = %meta.name, reason = %why, keys = entries.len(), "key index rebuilt from the table's files");
    let index = publish_rebuilt(lake, head, &entries, scratch).await?;
    Ok((index, Some(why)))
}

/// Rebuilds a keyed table's index (keeping its fingerprint key), e.g. after its files were
/// compacted; nothing for a table without a key. Call with the commit lock held.
pub async fn rebuild_for(
    lake: &Lake,
    meta: &TableMeta,
    table: &TableConfig,
    scratch: &Path,
) -> Result<()> {
    let Some(order_by) = table.keyed() else {
        return Ok(());
    };
    let shape = Shape::of(meta, &table.unique_key, order_by)?;
    let sip = sip_for(lake, &meta.name).await;
    rebuild(
        lake,
        meta,
        &shape,
        sip,
        scratch,
        "its files were compacted".into(),
    )
    .await?;
    Ok(())
}

/// Meets a batch's keys (in `sink`) with the table's through its key index: looks up only the
/// batch's keys, drops the new rows that lose (older than the held row, or identical to it),
/// finishes the sink's files, and rewrites the files holding replaced rows without them.
///
/// With `locked` (the commit lock held), an index that is missing or damaged is rebuilt and
/// published first, and one that disagrees with the table is deleted and the error says so (the
/// batch runs again and the index is rebuilt). Without it (a plan made beside other commits,
/// checked under the lock by [`Pending::rebase`]), nothing is published: `None` says the plan
/// must be made under the lock (before the sink is finished, so it can be), and a file that
/// changed under the plan is [`Error::Raced`].
#[allow(clippy::too_many_arguments)]
pub async fn merge(
    lake: &Lake,
    meta: &TableMeta,
    table: &TableConfig,
    sink: &TableSink,
    sip: [u64; 2],
    threads: usize,
    scratch: &Path,
    locked: bool,
) -> Result<Option<Merged>> {
    let Some(order_by) = table.keyed() else {
        let (files, _) = sink.finish(threads)?;
        return Ok(Some(Merged {
            files,
            rewritten: Vec::new(),
            replaced: 0,
            rebuilt: None,
            index: None,
        }));
    };
    let shape = Shape::of(meta, &table.unique_key, order_by)?;
    let (mut index, mut rebuilt) = match locked {
        true => open_or_rebuild(lake, meta, &shape, sip, scratch).await?,
        false => match Index::open(lake, &meta.name, &shape).await {
            Ok(Ok(index)) => (index, None),
            Ok(Err(Unusable::Missing)) if meta_has_no_files(lake, meta).await? => {
                (Index::empty(&meta.name, shape.clone(), sip), None)
            }
            // To be rebuilt, or changing under us: under the lock.
            _ => return Ok(None),
        },
    };
    if index.head.sip != sip {
        return Err(stale(
            &meta.name,
            "another run rebuilt the key index while this batch ran",
        ));
    }
    let mut held = HashMap::new();
    let mut fps = None;
    if !index.head.runs.is_empty() {
        let fps = fps.insert(sink.fingerprints(threads)?);
        held = match index.lookup(lake, fps).await {
            Ok(h) => h,
            Err(_) if !locked => return Ok(None),
            Err(Error::Index { message, .. }) => {
                (index, rebuilt) = rebuild(lake, meta, &shape, sip, scratch, message).await?;
                index.lookup(lake, fps).await?
            }
            Err(e) => return Err(e),
        };
    }
    // The files holding the held rows must be there (a held row that a new one loses to
    // must not be one a file no longer holds).
    let mut files_of: BTreeMap<&str, Vec<u128>> = BTreeMap::new();
    for (fp, h) in &held {
        match index.file_of(h.group) {
            Some(f) => files_of.entry(f).or_default().push(*fp),
            None if !locked => return Ok(None),
            None => {
                return Err(
                    forget(lake, &meta.name, format!("group {} has no file", h.group)).await,
                );
            }
        }
    }
    for f in files_of.keys() {
        if !lake.exists(f).await? {
            return match locked {
                true => Err(forget(lake, &meta.name, format!("{f} is gone")).await),
                false => Ok(None),
            };
        }
    }
    let mut drops: BTreeMap<String, HashSet<u128>> = BTreeMap::new();
    let mut replaced = 0;
    let replacing = sink.against_held(&held)?;
    for (file, fps) in &files_of {
        for fp in fps {
            if replacing.contains(fp) {
                drops.entry(file.to_string()).or_default().insert(*fp);
                replaced += 1;
            }
        }
    }
    let (files, entries) = sink.finish(threads)?;
    let keying = Keying::for_table(&meta.full_schema()?, &shape, sip)?;
    let mut rewritten = Vec::with_capacity(drops.len());
    std::fs::create_dir_all(scratch)
        .map_err(|e| Error::io(format!("cannot create {}", scratch.display()), e))?;
    for (k, (key, drop)) in drops.into_iter().enumerate() {
        let prefix = lake::processed_prefix(&meta.name);
        let old = TableFile {
            dir: lake::parent_dir(lake::relative(&key, &prefix)).to_string(),
            key: key.clone(),
        };
        let out = scratch.join(format!("rewrite-{k}.parquet"));
        let rw = match rewrite_without(lake, meta, &keying, &old, &drop, &table.compression, &out)
            .await
        {
            Ok(rw) => rw,
            // Rewritten or removed by a commit since the plan looked.
            Err(e) if !locked && lake::gone(&e) => {
                return Err(Error::Raced {
                    keys: format!("{key} (rewritten by another commit)"),
                });
            }
            Err(e) => return Err(e),
        };
        if rw.dropped != drop.len() as u64 {
            let why = format!(
                "{key} holds {} of the {} rows the index places there",
                rw.dropped,
                drop.len()
            );
            return Err(match locked {
                true => forget(lake, &meta.name, why).await,
                false => Error::Raced { keys: why },
            });
        }
        let info = index.head.files.get(&key);
        let new_bytes = rw.path.as_ref().map_or(0, |p| local_size(p));
        rewritten.push(RewrittenFile {
            old,
            old_bytes: info.map(|f| f.bytes).unwrap_or(0),
            new_bytes,
            new: rw.path,
            rows: rw.rows,
            groups: info.map(|f| f.groups.clone()).unwrap_or_default(),
            drop,
        });
    }
    Ok(Some(Merged {
        files,
        rewritten,
        replaced,
        rebuilt,
        index: Some(Pending {
            index,
            entries: entries.unwrap_or_else(|| Entries::new(shape.kind)),
            fps,
            held,
        }),
    }))
}

/// A local file's size (0 if it cannot be read: only a statistic of the index).
fn local_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Whether a table has no data file yet (its first commit): then a missing index is an empty
/// one, not one to rebuild.
async fn meta_has_no_files(lake: &Lake, meta: &TableMeta) -> Result<bool> {
    Ok(table_files(lake, meta).await?.is_empty())
}

fn stale(table: &str, message: impl Into<String>) -> Error {
    Error::IndexStale {
        table: table.to_string(),
        message: message.into(),
    }
}

/// Deletes an index found to disagree with its table (so that the next try rebuilds it) and
/// says why.
async fn forget(lake: &Lake, table: &str, why: String) -> Error {
    tracing::warn!(table, reason = %why, "the key index disagrees with the table; it is rebuilt");
    if let Err(e) = lake.delete(&head_key(table)).await {
        return e;
    }
    stale(table, why)
}

impl Pending {
    /// Brings a plan made beside other commits up to the index as it is now (call under the
    /// commit lock). If commits came in between, the batch's keys are looked up in the runs
    /// they added: the plan conflicts if one of them holds a batch key other than as the plan
    /// saw it. A file the plan rewrites that such a commit rewrote too (for other keys) is
    /// rewritten again from that commit's file, which keeps its groups: only the conflicting
    /// files are planned again, under the lock. Then the commit's index is built on the newer
    /// head. Returns the positions in `rewritten` of the files rewritten again, or `None` on a
    /// conflict (the batch runs again).
    pub async fn rebase(
        &mut self,
        lake: &Lake,
        meta: &TableMeta,
        compression: &str,
        rewritten: &mut [RewrittenFile],
        scratch: &Path,
    ) -> Result<Option<Vec<usize>>> {
        let table = self.index.head.table.clone();
        let now: Option<Head> = match lake.get_opt(&head_key(&table)).await? {
            Some(b) => serde_json::from_slice(&b).ok(),
            None => None,
        };
        let Some(now) = now else {
            // Deleted (found to disagree) or never written: only an empty plan stands.
            let empty = self.index.head.commit.is_empty() && self.index.head.files.is_empty();
            return Ok(empty.then(Vec::new));
        };
        if now.commit == self.index.head.commit {
            return Ok(Some(Vec::new()));
        }
        if now.sip != self.index.head.sip || now.format != FORMAT {
            return Ok(None);
        }
        // Where each rewritten file's groups are now.
        let mut moved = Vec::new();
        for (k, rw) in rewritten.iter().enumerate() {
            match now.files.get(&rw.old.key) {
                Some(f) if f.groups == rw.groups => {}
                Some(_) => return Ok(None),
                None => match now.files.iter().find(|(_, f)| f.groups == rw.groups) {
                    Some((key, _)) => moved.push((k, key.clone())),
                    None => return Ok(None),
                },
            }
        }
        let shape = self.index.head.shape.clone();
        let index = match Index::open(lake, &table, &shape).await? {
            Ok(index) => index,
            Err(_) => return Ok(None),
        };
        let seen: HashSet<&str> = self
            .index
            .head
            .runs
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        let added: HashSet<String> = index
            .head
            .runs
            .iter()
            .filter(|r| !seen.contains(r.name.as_str()))
            .map(|r| run_key(&table, &r.name))
            .collect();
        if self.fps.is_none() {
            // The sink hands its entries over sorted (a no-op then).
            self.entries.sort(1);
            self.fps = Some(self.entries.fps());
        }
        let fps = self.fps.as_deref().unwrap_or_default();
        let found = index.lookup_in(lake, fps, &added).await?;
        for (fp, h) in &found {
            if self.held.get(fp) != Some(h) {
                tracing::info!(table = %table, "a commit since the plan holds keys of this batch");
                return Ok(None);
            }
        }
        let keying = Keying::for_table(&meta.full_schema()?, &shape, now.sip)?;
        let prefix = lake::processed_prefix(&table);
        let mut again = Vec::with_capacity(moved.len());
        for (k, key) in moved {
            let rw = &mut rewritten[k];
            let now_file = TableFile {
                dir: lake::parent_dir(lake::relative(&key, &prefix)).to_string(),
                key: key.clone(),
            };
            let out = scratch.join(format!("rewrite-{k}-again.parquet"));
            let redone =
                rewrite_without(lake, meta, &keying, &now_file, &rw.drop, compression, &out)
                    .await?;
            // A file with rows left must stay one with rows left (its place in the commit).
            if redone.dropped != rw.drop.len() as u64 || redone.path.is_some() != rw.new.is_some() {
                return Ok(None);
            }
            rw.old_bytes = index.head.files.get(&key).map_or(0, |f| f.bytes);
            rw.old = now_file;
            rw.new_bytes = redone.path.as_ref().map_or(0, |p| local_size(p));
            rw.new = redone.path;
            rw.rows = redone.rows;
            again.push(k);
        }
        tracing::debug!(table = %table, runs = added.len(), files = again.len(), "plan rebased on a newer key index");
        self.index = index;
        Ok(Some(again))
    }

    /// The index files of the commit, once its files have names: `files` (new rows) went to
    /// `file_keys`, the `rewritten` files to `rewritten_keys`. Returns the local files and their
    /// keys (runs first, the head last) and the runs the head no longer names.
    #[allow(clippy::too_many_arguments)]
    pub async fn finish(
        self,
        lake: &Lake,
        commit: &str,
        files: &[OutFile],
        file_keys: &[String],
        file_bytes: &[u64],
        rewritten: &[RewrittenFile],
        rewritten_keys: &[Option<String>],
        scratch: &Path,
        threads: usize,
    ) -> Result<(Vec<(PathBuf, String)>, Vec<String>)> {
        let base = self.index.head.next_group;
        let mut entries = self.entries;
        if files.len() > u32::MAX as usize - base as usize {
            return Err(damaged(&self.index.head.table, "too many file groups"));
        }
        entries.regroup(|i| base + i);
        let mut changes: BTreeMap<String, Option<IndexedFile>> = BTreeMap::new();
        for (i, ((f, key), bytes)) in files.iter().zip(file_keys).zip(file_bytes).enumerate() {
            let bytes = *bytes;
            changes.insert(
                key.clone(),
                Some(IndexedFile {
                    groups: vec![base + i as u32],
                    rows: f.rows,
                    bytes,
                }),
            );
        }
        for (rw, key) in rewritten.iter().zip(rewritten_keys) {
            changes.insert(rw.old.key.clone(), None);
            if let (Some(_), Some(key)) = (&rw.new, key) {
                changes.insert(
                    key.clone(),
                    Some(IndexedFile {
                        groups: rw.groups.clone(),
                        rows: rw.rows,
                        bytes: rw.new_bytes,
                    }),
                );
            }
        }
        let next = self
            .index
            .next(
                lake,
                commit,
                entries,
                changes,
                base + files.len() as u32,
                scratch,
                threads,
            )
            .await?;
        let table = next.head.table.clone();
        let mut out = Vec::new();
        if let Some(run) = next.run {
            out.push((run, run_key(&table, commit)));
        }
        let head = scratch.join("head.json");
        let json = serde_json::to_vec_pretty(&next.head).map_err(|e| Error::State {
            path: head_key(&table),
            message: e.to_string(),
        })?;
        std::fs::write(&head, json)
            .map_err(|e| Error::io(format!("cannot write {}", head.display()), e))?;
        out.push((head, head_key(&table)));
        Ok((out, next.replaced))
    }
}

/// The keyed tables of a config that the lake holds (or the one named), with their catalog
/// entries and key shapes.
async fn keyed_tables(
    config: &crate::config::Config,
    lake: &Lake,
    only: Option<&str>,
) -> Result<Vec<(TableMeta, Shape)>> {
    let mut out = Vec::new();
    for t in &config.tables {
        if only.is_some_and(|o| o != t.name) {
            continue;
        }
        let Some(order_by) = t.keyed() else {
            if only.is_some() {
                return Err(Error::config(
                    &config.path,
                    format!(
                        "table \"{}\" has no unique_key and order_by, so no key index",
                        t.name
                    ),
                ));
            }
            continue;
        };
        match TableMeta::load(lake, &t.name).await? {
            Some(meta) => {
                let shape = Shape::of(&meta, &t.unique_key, order_by)?;
                out.push((meta, shape));
            }
            None if only.is_some() => {
                return Err(Error::config(
                    &config.path,
                    format!("table \"{}\" has no commit in this lake yet", t.name),
                ));
            }
            None => {}
        }
    }
    if let Some(o) = only
        && out.is_empty()
        && !config.tables.iter().any(|t| t.name == o)
    {
        return Err(Error::config(
            &config.path,
            format!("no table \"{o}\" in the config"),
        ));
    }
    Ok(out)
}

/// Runs `f` holding the commit lock, after recovering interrupted commits (an index is only
/// read or written beside no commit).
async fn with_commit_lock<T, F, Fut>(config: &crate::config::Config, lake: &Lake, f: F) -> Result<T>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let me = crate::lock::Holder::me(&crate::report::new_run_id());
    let ttl = std::time::Duration::from_secs(config.lake.lock_ttl_secs);
    let wait = std::time::Duration::from_secs(config.lake.lock_wait_secs);
    crate::lock::holding(lake, crate::ledger::COMMIT_LOCK, &me, ttl, wait, async {
        crate::ledger::recover(lake, ttl).await?;
        f().await
    })
    .await
}

/// `sluice index rebuild [TABLE]`: each keyed table's index rebuilt from its files. Returns a
/// line per table.
pub async fn rebuild_command(
    config: &crate::config::Config,
    lake: &Lake,
    only: Option<&str>,
) -> Result<String> {
    let tables = keyed_tables(config, lake, only).await?;
    let scratch = lake.scratch(&crate::report::new_run_id(), "index");
    with_commit_lock(config, lake, || async {
        let mut out = String::new();
        for (meta, shape) in &tables {
            let sip = sip_for(lake, &meta.name).await;
            let (index, _) = rebuild(lake, meta, shape, sip, &scratch, "asked for".into()).await?;
            let keys: u64 = index.head.runs.iter().map(|r| r.entries).sum();
            out.push_str(&format!(
                "{}: key index rebuilt: {keys} keys in {} files\n",
                meta.name,
                index.head.files.len()
            ));
        }
        Ok(out)
    })
    .await
}

/// `sluice index check [TABLE]`: each keyed table's index compared with its files. Returns
/// the text (or JSON) to print and whether every index agrees.
pub async fn check_command(
    config: &crate::config::Config,
    lake: &Lake,
    only: Option<&str>,
    json: bool,
) -> Result<(String, bool)> {
    let tables = keyed_tables(config, lake, only).await?;
    with_commit_lock(config, lake, || async {
        let mut text = String::new();
        let mut results = Vec::new();
        let mut ok = true;
        for (meta, shape) in &tables {
            let (status, diffs, count) = match Index::open(lake, &meta.name, shape).await? {
                Err(Unusable::Missing) => {
                    let files = table_files(lake, meta).await?;
                    if files.is_empty() {
                        ("empty".to_string(), Vec::new(), 0)
                    } else {
                        (
                            "missing (the next run rebuilds it)".to_string(),
                            Vec::new(),
                            1,
                        )
                    }
                }
                Err(Unusable::Damaged(why)) => (format!("damaged: {why}"), Vec::new(), 1),
                Ok(index) => match check(lake, meta, &index, 20).await {
                    // No difference: the index holds the table's keys.
                    Ok((diffs, 0, keys)) => (
                        format!("ok: {keys} keys in {} files", index.head.files.len()),
                        diffs,
                        0,
                    ),
                    Ok((diffs, n, _)) => (format!("{n} differences"), diffs, n),
                    Err(Error::Index { message, .. }) => {
                        (format!("damaged: {message}"), Vec::new(), 1)
                    }
                    Err(e) => return Err(e),
                },
            };
            ok &= count == 0;
            text.push_str(&format!("{}: {status}\n", meta.name));
            for d in &diffs {
                text.push_str(&format!(
                    "  key {}: table has {}, index has {}\n",
                    d.fingerprint,
                    d.table.as_deref().unwrap_or("nothing"),
                    d.index.as_deref().unwrap_or("nothing")
                ));
            }
            results.push(serde_json::json!({
                "table": meta.name,
                "status": status,
                "differences": count,
                "examples": diffs,
            }));
        }
        if json {
            text = serde_json::to_string_pretty(&results).unwrap_or_default() + "\n";
        }
        Ok((text, ok))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lake() -> (tempfile::TempDir, Lake) {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open_local(dir.path()).unwrap();
        (dir, lake)
    }

    /// A seeded xorshift generator: the tests' random numbers, the same on every run.
    fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        }
    }

    fn shape() -> Shape {
        Shape {
            unique_key: vec!["id".into()],
            order_by: "v".into(),
            order_type: "Int64".into(),
            kind: OrderKind::Int,
        }
    }

    /// Entries sorted on several threads (through the bucket pass, with keys spread and with
    /// every key in one bucket) agree with a map of each key's greatest order, for both kinds
    /// of order value; so do fingerprints sorted the same way.
    #[test]
    fn a_large_sort_keeps_each_keys_greatest_order() {
        let mut rnd = xorshift(11);
        for (kind, skewed) in [
            (OrderKind::Int, false),
            (OrderKind::Bytes, false),
            (OrderKind::Int, true),
        ] {
            let mut entries = Entries::new(kind);
            let mut model: BTreeMap<u128, u64> = BTreeMap::new();
            for i in 0..60_000u64 {
                let key = (rnd() % 20_000) as u128;
                let fp = match skewed {
                    true => key,
                    false => key.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835),
                };
                // Distinct orders, so the one kept is certain.
                let order = (rnd() % 1_000) * 100_000 + i;
                let text = format!("{order:020}");
                let value = match kind {
                    OrderKind::Int => OrderValue::Int(order),
                    OrderKind::Bytes => OrderValue::Bytes(text.as_bytes()),
                };
                entries.push(fp, value, order, 0);
                let m = model.entry(fp).or_insert(order);
                *m = (*m).max(order);
            }
            entries.sort(3);
            let got: Vec<(u128, u64)> = (0..entries.len())
                .map(|i| {
                    let (fp, h) = entries.get(i);
                    (fp, h.values)
                })
                .collect();
            let want: Vec<(u128, u64)> = model.into_iter().collect();
            assert_eq!(got, want, "{kind:?}, skewed {skewed}");
            let mut fps: Vec<u128> = (0..100_000)
                .map(|_| rnd() as u128 * rnd() as u128)
                .collect();
            let mut sorted = fps.clone();
            sorted.sort_unstable();
            sort_spread(&mut fps, |f| *f, 2, |b| b.sort_unstable());
            assert_eq!(fps, sorted);
        }
    }

    /// Entries gathered part by part on threads are the entries pushed and sorted; a part
    /// that gives other than its count is an error, and parts out of range order make a run
    /// that is refused, not written.
    #[test]
    fn entries_from_parts_are_the_entries_pushed_and_sorted() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut rnd = xorshift(9);
        // 16 parts by the top 4 bits, some empty, unsorted within.
        let mut parts: Vec<Vec<(u128, u64, u64, u32)>> = vec![Vec::new(); 16];
        let mut pushed = Entries::new(OrderKind::Int);
        for i in 0..20_000u32 {
            let fp = (rnd() as u128) << 64 | rnd() as u128;
            let top = (fp >> 124) as usize;
            if top == 3 || top == 11 {
                continue;
            }
            let (order, values) = (rnd(), rnd());
            parts[top].push((fp, order, values, i));
            pushed.push(fp, OrderValue::Int(order), values, i);
        }
        pushed.sort(1);
        let given = |parts: &[Vec<(u128, u64, u64, u32)>]| -> Vec<(usize, Vec<_>)> {
            parts.iter().map(|p| (p.len(), p.clone())).collect()
        };
        let fill = |p: &Vec<(u128, u64, u64, u32)>, emit: &mut dyn FnMut(u128, u64, u64, u32)| {
            for &(fp, order, values, group) in p {
                emit(fp, order, values, group);
            }
        };
        for threads in [1, 2, 5] {
            let got = Entries::from_parts(given(&parts), threads, fill).expect("from_parts");
            assert_eq!(got.len(), pushed.len());
            for i in 0..got.len() {
                assert_eq!(got.get(i), pushed.get(i), "entry {i}, {threads} threads");
            }
        }
        let mut short = given(&parts);
        short[5].0 += 1;
        let err = Entries::from_parts(short, 2, fill)
            .err()
            .expect("a part short of its count");
        assert!(err.to_string().contains("not the"), "{err}");
        parts.swap(0, 15);
        let swapped = Entries::from_parts(given(&parts), 2, fill).expect("from_parts");
        let err = write_run(&dir.path().join("bad.idx"), &swapped, 2)
            .expect_err("a run of parts out of order");
        assert!(err.to_string().contains("out of order"), "{err}");
        // Each half in order, the halves swapped: only where the threads' parts meet is the
        // run out of order (two parts of 256 entries on two threads).
        let half = |top: u128| -> Vec<(u128, u64, u64, u32)> {
            (0..256u128).map(|i| (top << 124 | i, 1, 2, 3)).collect()
        };
        let halves = vec![(256, half(9)), (256, half(2))];
        let swapped = Entries::from_parts(halves, 2, fill).expect("from_parts");
        let err = write_run(&dir.path().join("bad2.idx"), &swapped, 2)
            .expect_err("a run out of order where two parts meet");
        assert!(err.to_string().contains("out of order"), "{err}");
    }

    /// A run written on threads, part by part, is the run written entry by entry, byte for
    /// byte: every size around page and part edges, both kinds of order, up to more threads
    /// than pages.
    #[test]
    fn a_run_written_on_threads_is_the_run_written_in_order() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut rnd = xorshift(5);
        for kind in [OrderKind::Int, OrderKind::Bytes] {
            for n in [0, 1, 127, 128, 129, 383, 384, 385, 5_000] {
                let mut entries = Entries::new(kind);
                for i in 0..n {
                    let order = rnd() % 1_000_000;
                    // Byte orders of varying length, so parts differ in size.
                    let text = "x".repeat((i % 7) as usize) + &order.to_string();
                    let value = match kind {
                        OrderKind::Int => OrderValue::Int(order),
                        OrderKind::Bytes => OrderValue::Bytes(text.as_bytes()),
                    };
                    entries.push(
                        (rnd() as u128) << 64 | rnd() as u128,
                        value,
                        rnd(),
                        i as u32,
                    );
                }
                entries.sort(1);
                let one = dir.path().join("one.idx");
                let mut w = RunWriter::create(&one, kind).expect("writer");
                for r in &entries.rows {
                    w.push(r.fp(), r.group, r.values, entries.order(r))
                        .expect("push");
                }
                let (_, want_entries, want_bytes) = w.finish().expect("finish");
                for threads in [1, 2, 3, 8] {
                    let many = dir.path().join("many.idx");
                    let got = write_run(&many, &entries, threads).expect("write_run");
                    assert_eq!(got, (want_entries, want_bytes), "{kind:?} {n} {threads}");
                    assert!(
                        std::fs::read(&one).expect("one") == std::fs::read(&many).expect("many"),
                        "{kind:?}, {n} entries, {threads} threads: the runs differ"
                    );
                }
            }
        }
    }

    /// Runs written, merged and looked up agree with a map kept beside them, over commits of
    /// random keys (seeded), and lookups read only what they ask for.
    #[tokio::test]
    async fn runs_agree_with_a_model_over_many_commits() {
        let (dir, lake) = lake();
        let scratch = dir.path().join("scratch");
        let mut model: BTreeMap<u128, Held> = BTreeMap::new();
        let mut index = Index::empty("t", shape(), [1, 2]);
        let mut rnd = xorshift(7);
        for commit in 0..40u32 {
            let mut new = Entries::new(OrderKind::Int);
            let n = 1 + rnd() % 700;
            for _ in 0..n {
                // Keys from a small space, so that commits replace each other's keys.
                let fp = ((rnd() % 5000) as u128)
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835);
                let h = Held {
                    group: commit,
                    values: rnd(),
                    order: Order::Int(rnd() % 100),
                };
                new.push(fp, h.order.as_value(), h.values, h.group);
            }
            new.sort(2);
            for i in 0..new.len() {
                let (fp, h) = new.get(i);
                model.insert(fp, h);
            }
            let id = format!("c{commit}");
            let next = index
                .next(&lake, &id, new, BTreeMap::new(), commit + 1, &scratch, 2)
                .await
                .unwrap();
            if let Some(p) = &next.run {
                lake.put_file(&run_key("t", &id), p).await.unwrap();
            }
            lake.put_json(&head_key("t"), &next.head).await.unwrap();
            for r in &next.replaced {
                lake.delete(r).await.unwrap();
            }
            index = match Index::open(&lake, "t", &shape()).await.unwrap() {
                Ok(i) => i,
                Err(_) => panic!("index does not open"),
            };
            assert!(
                index.head.runs.len() <= 12,
                "runs stay few: {}",
                index.head.runs.len()
            );
            let all = index.all(&lake).await.unwrap();
            assert_eq!(all.len(), model.len());
            assert!(
                all.iter()
                    .zip(&model)
                    .all(|(a, b)| a.0 == *b.0 && a.1 == *b.1)
            );
            let probe: Vec<u128> = model.keys().copied().step_by(37).collect();
            let got = index.lookup(&lake, &probe).await.unwrap();
            assert_eq!(got.len(), probe.len());
            for fp in &probe {
                assert_eq!(got.get(fp), model.get(fp));
            }
            assert!(index.lookup(&lake, &[3, 5]).await.unwrap().is_empty());
        }
    }

    /// A flipped byte or a cut file is found, never read as entries.
    #[tokio::test]
    async fn damage_is_found() {
        let (dir, lake) = lake();
        let scratch = dir.path().join("scratch");
        let mut new = Entries::new(OrderKind::Bytes);
        for i in 0..1000u128 {
            new.push(
                i * 7919,
                OrderValue::Bytes(format!("v{i}").as_bytes()),
                i as u64,
                1,
            );
        }
        let index = Index::empty("t", shape_bytes(), [1, 2]);
        let next = index
            .next(&lake, "c1", new, BTreeMap::new(), 2, &scratch, 2)
            .await
            .unwrap();
        let run = next.run.unwrap();
        let data = std::fs::read(&run).unwrap();
        lake.put_file(&run_key("t", "c1"), &run).await.unwrap();
        lake.put_json(&head_key("t"), &next.head).await.unwrap();
        let opened = Index::open(&lake, "t", &shape_bytes()).await.unwrap();
        let Ok(index) = opened else {
            panic!("a whole index opens")
        };
        assert_eq!(index.lookup(&lake, &[7919 * 5]).await.unwrap().len(), 1);
        let key = dir.path().join(run_key("t", "c1"));
        // A flipped byte in a page.
        let mut bad = data.clone();
        bad[100] ^= 0x40;
        std::fs::write(&key, &bad).unwrap();
        let opened = Index::open(&lake, "t", &shape_bytes()).await.unwrap();
        let Ok(index) = opened else {
            panic!("the directory is whole")
        };
        let e = index.lookup(&lake, &[0, 7919]).await.unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        // Cut short.
        std::fs::write(&key, &data[..data.len() - 10]).unwrap();
        assert!(matches!(
            Index::open(&lake, "t", &shape_bytes()).await.unwrap(),
            Err(Unusable::Damaged(_))
        ));
        // A head that does not read.
        std::fs::write(dir.path().join(head_key("t")), b"{\"format\": 1,").unwrap();
        assert!(matches!(
            Index::open(&lake, "t", &shape_bytes()).await.unwrap(),
            Err(Unusable::Damaged(_))
        ));
    }

    fn shape_bytes() -> Shape {
        Shape {
            order_type: "Utf8".into(),
            kind: OrderKind::Bytes,
            ..shape()
        }
    }
}
