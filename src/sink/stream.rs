//! The streaming table writer: valid rows come in batch by batch from the query threads, are
//! deduplicated by `unique_key` against everything seen so far, split by partition without a
//! sort, and written as Parquet with a bound on open files.
//!
//! Rows wait in memory for a while (a byte budget) before they are written, so a later version of
//! a key that arrives soon after (the usual case: retries, replays, status updates) replaces the
//! earlier one before it ever reaches a file. A row that loses after it was written is a late
//! loser: the few files holding one are rewritten without it when the batch ends, on all
//! threads. The dedup index keeps, per key, a 128-bit fingerprint, its order value and where its
//! winning row is, and a hash of its values (a row identical to one the table holds is a
//! duplicate, not a replacement): 48 bytes in a table, whatever the key (freed before the files
//! are finished).
//!
//! When the index outgrows its share of the memory limit (half of it), it spills: its entries
//! go to 64 partition files (by fingerprint) and it starts again empty. Keys met again after a
//! spill are settled when the sink is finished, one partition at a time (a partition still too
//! large is partitioned again by other fingerprint bits): the same winners as in memory, the
//! rows that lose across spills becoming late losers.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use datafusion::arrow::array::{
    Array, AsArray, BooleanArray, RecordBatch, StringArray, UInt32Array,
};
use datafusion::arrow::buffer::BooleanBuffer;
use datafusion::arrow::compute::{cast, filter_record_batch, take_record_batch};
use datafusion::arrow::datatypes::{DataType, Int32Type, Int64Type, Schema, SchemaRef};
use datafusion::arrow::row::Rows;
use hashbrown::HashTable;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::properties::WriterProperties;
use siphasher::sip128::SipHasher13;

use super::{KeyEncoder, conform, mostly_distinct, nullable, partition_dirs, writer_properties};
use crate::error::{Error, Result};
use crate::index::{Arena, Entries, Held, OrderKind, OrderValue, Shape, order_cmp};
use crate::source::{SOURCE_FILE, SOURCE_ROW};

/// How a table is written.
#[derive(Debug, Clone)]
pub struct SinkOptions {
    /// Hive partition columns.
    pub partition_by: Vec<String>,
    /// Columns identifying a row; with `order_by`, one row per key is kept.
    pub unique_key: Vec<String>,
    /// The column whose greatest value wins among rows of one key.
    pub order_by: Option<String>,
    /// Parquet compression.
    pub compression: String,
    /// Bytes of rows held back before writing, at most.
    pub buffer_bytes: usize,
    /// The run's memory limit: the buffer shrinks as the dedup index grows into it.
    pub memory_limit: usize,
    /// Files open for writing at once.
    pub max_writers: usize,
    /// The key of the fingerprints: the table's key index's.
    pub sip: [u64; 2],
    /// Bytes at which a file is closed and the partition's next rows go to a new one.
    pub target_file_size: u64,
}

/// A Parquet file the sink wrote.
#[derive(Debug, Clone)]
pub struct OutFile {
    /// Its partition folder (`a=1/b=x`, encoded), empty without partitions.
    pub dir: String,
    /// Where it is on local disk.
    pub path: PathBuf,
    /// Rows in it.
    pub rows: u64,
}

/// Partitions beyond which files are closed, not kept open, when they go idle.
const MAX_OPEN_FILES: usize = 256;

/// Marks an index entry whose new row lost to a row the table already held.
const LOST: u64 = u64::MAX;

/// One key's best row: the key's fingerprint, its order value (or, for orders that are not
/// numbers, dates or timestamps, where its bytes are in the arena), its lineage (file index << 40
/// | source row), its location (segment << 32 | row in segment) and a 64-bit hash of its values.
/// 48 bytes, whatever the key.
#[derive(Clone, Copy)]
struct Entry {
    fp: u128,
    order: u64,
    lineage: u64,
    loc: u64,
    values: u64,
}

/// Key -> best row, for the keys of one shard (keys are spread over shards by fingerprint, so
/// that threads rarely wait for each other).
#[derive(Default)]
struct DedupIndex {
    table: HashTable<Entry>,
    /// Order values that do not fit in 64 bits.
    arena: Arena,
    /// Keys whose row lost to a row the table holds.
    lost: usize,
}

/// Number of index shards: 2^[`SHARD_BITS`].
const SHARDS: usize = 1 << SHARD_BITS;
const SHARD_BITS: u32 = crate::index::SPREAD_BITS;

/// Bytes a key takes in the dedup index, with the table's slack.
const KEY_BYTES: usize = 56;

/// Partitions a spilled index is split into (and a partition too large to settle, again).
const SPILL_FANOUT: usize = 64;

/// Times a partition may be split again (6 more fingerprint bits each time).
const SPILL_DEPTH: u32 = 8;

/// The spill partition of a fingerprint at `depth`: 6 bits of its upper half (from bit 72 up);
/// never the lower half, which places it in a table.
fn spill_part(fp: u128, depth: u32) -> usize {
    (((fp >> 64) as u64 >> (8 + 6 * depth)) as usize) & (SPILL_FANOUT - 1)
}

/// A key's fingerprint: 128-bit SipHash-1-3 under a per-run random key. Two different keys
/// share one with odds of about n^2 / 2^129 (1e-26 for ten million keys), the same argument as
/// telling files apart by SHA-256; ClickHouse's exact distinct counts rest on it too.
#[derive(Clone, Copy)]
struct Fingerprinter(u64, u64);

impl Fingerprinter {
    fn new(sip: [u64; 2]) -> Fingerprinter {
        Fingerprinter(sip[0], sip[1])
    }

    fn of(&self, key: &[u8]) -> u128 {
        SipHasher13::new_with_keys(self.0, self.1)
            .hash(key)
            .as_u128()
    }
}

/// The table position of a fingerprint and its shard: different bits of it. The shard is the
/// top [`SHARD_BITS`] bits, so shards taken in order hold ascending ranges of fingerprints (what
/// [`crate::index::sort_spread`] buckets by: keys from the shards come out bucketed already).
fn slot(fp: u128) -> (u64, usize) {
    (fp as u64, (fp >> (128 - SHARD_BITS)) as usize)
}

impl DedupIndex {
    /// Bytes it takes, about: its keys with the table's slack, and the order values' arena.
    fn bytes(&self) -> usize {
        self.table.len() * KEY_BYTES + self.arena.bytes()
    }

    fn order_of(&self, e: &Entry, bytes: bool) -> OrderValue<'_> {
        self.arena.load(e.order, bytes)
    }

    /// How many keys have a winning row (not one that lost to a held row).
    fn winners(&self) -> usize {
        self.table.len() - self.lost
    }

    /// Calls `emit` with each winning row's fingerprint, order (a number order's), values hash
    /// and segment.
    fn each_winner(&self, emit: &mut dyn FnMut(u128, u64, u64, u32)) {
        for e in self.table.iter().filter(|e| e.loc != LOST) {
            emit(e.fp, e.order, e.values, (e.loc >> 32) as u32);
        }
    }

    /// Adds the keys' winning rows (not those that lost to a held row) to `out`, each in the
    /// group of its segment.
    fn winners_into(&self, out: &mut Entries, bytes: bool) {
        for e in self.table.iter().filter(|e| e.loc != LOST) {
            out.push(
                e.fp,
                self.order_of(e, bytes),
                e.values,
                (e.loc >> 32) as u32,
            );
        }
    }

    fn store(&mut self, order: OrderValue<'_>) -> u64 {
        self.arena.store(order)
    }

    /// Whether (a, la) ranks above (b, lb).
    fn beats(a: OrderValue<'_>, la: u64, b: OrderValue<'_>, lb: u64) -> bool {
        order_cmp(a, b).then(la.cmp(&lb)).is_gt()
    }

    /// Offers a row; returns the location and lineage of the row that lost, if any.
    fn offer(
        &mut self,
        fp: u128,
        order: OrderValue<'_>,
        lineage: u64,
        loc: u64,
        values: u64,
    ) -> Option<(u64, u64)> {
        let bytes = matches!(order, OrderValue::Bytes(_));
        let (h, _) = slot(fp);
        if let Some(e) = self.table.find(h, |e| e.fp == fp).copied() {
            if !Self::beats(order, lineage, self.order_of(&e, bytes), e.lineage) {
                return Some((loc, lineage));
            }
            let stored = self.store(order);
            if let Some(e) = self.table.find_mut(h, |e| e.fp == fp) {
                e.order = stored;
                e.lineage = lineage;
                e.loc = loc;
                e.values = values;
            }
            self.lost = self.lost + usize::from(loc == LOST) - usize::from(e.loc == LOST);
            return Some((e.loc, e.lineage));
        }
        self.lost += usize::from(loc == LOST);
        let stored = self.store(order);
        let entry = Entry {
            fp,
            order: stored,
            lineage,
            loc,
            values,
        };
        self.table.insert_unique(h, entry, |e| slot(e.fp).0);
        None
    }

    /// Compares a row the table already holds with the new row of its key: `true` if the new
    /// row replaces it. A new row that is older, or identical to the held one (same order, same
    /// values), loses: its location and lineage are returned.
    fn against_existing(
        &mut self,
        fp: u128,
        order: OrderValue<'_>,
        values: u64,
    ) -> (bool, Option<(u64, u64)>) {
        let bytes = matches!(order, OrderValue::Bytes(_));
        let (h, _) = slot(fp);
        let Some(e) = self.table.find(h, |e| e.fp == fp).copied() else {
            return (false, None);
        };
        if e.loc == LOST {
            return (false, None);
        }
        let identical = e.values == values
            && order_cmp(order, self.order_of(&e, bytes)) == std::cmp::Ordering::Equal;
        // Other ties go to the new row.
        if !identical && !Self::beats(order, 0, self.order_of(&e, bytes), 1) {
            return (true, None);
        }
        if let Some(e) = self.table.find_mut(h, |e| e.fp == fp) {
            e.loc = LOST;
            self.lost += 1;
        }
        (false, Some((e.loc, e.lineage)))
    }
}

/// One spill partition's file: the entries each spill put there, read back when it is settled.
/// A record: fingerprint (16 bytes), lineage, location, values hash (8 each), then the order
/// value (8 bytes, or for byte orders a u32 length and the bytes); little-endian.
struct PartFile {
    path: PathBuf,
    out: Option<BufWriter<File>>,
    entries: u64,
    /// What its entries take in an index in memory.
    bytes: usize,
}

impl PartFile {
    fn new(path: PathBuf) -> PartFile {
        PartFile {
            path,
            out: None,
            entries: 0,
            bytes: 0,
        }
    }

    fn fail(&self, e: std::io::Error) -> Error {
        Error::io(format!("cannot write {}", self.path.display()), e)
    }

    fn push(&mut self, e: &Entry, order: OrderValue<'_>) -> Result<()> {
        if self.out.is_none() {
            let file = File::create(&self.path).map_err(|e| self.fail(e))?;
            self.out = Some(BufWriter::with_capacity(64 << 10, file));
        }
        let mut rec = [0u8; 48];
        rec[..16].copy_from_slice(&e.fp.to_le_bytes());
        rec[16..24].copy_from_slice(&e.lineage.to_le_bytes());
        rec[24..32].copy_from_slice(&e.loc.to_le_bytes());
        rec[32..40].copy_from_slice(&e.values.to_le_bytes());
        let (len, tail): (usize, &[u8]) = match order {
            OrderValue::Int(v) => {
                rec[40..48].copy_from_slice(&v.to_le_bytes());
                (48, &[])
            }
            OrderValue::Bytes(b) => {
                rec[40..44].copy_from_slice(&(b.len() as u32).to_le_bytes());
                (44, b)
            }
        };
        let written = match self.out.as_mut() {
            Some(out) => out
                .write_all(&rec[..len])
                .and_then(|()| out.write_all(tail)),
            None => Ok(()),
        };
        written.map_err(|e| self.fail(e))?;
        self.entries += 1;
        self.bytes += KEY_BYTES + tail.len() + if tail.is_empty() { 0 } else { 4 };
        Ok(())
    }

    /// Calls `each` with every entry (`bytes`: of a byte order) and deletes the file.
    fn drain(
        mut self,
        bytes: bool,
        mut each: impl FnMut(Entry, OrderValue<'_>) -> Result<()>,
    ) -> Result<()> {
        let Some(out) = self.out.take() else {
            return Ok(());
        };
        let fail = |e: std::io::Error| Error::io(format!("cannot read {}", self.path.display()), e);
        out.into_inner().map_err(|e| fail(e.into_error()))?;
        let mut input = BufReader::with_capacity(64 << 10, File::open(&self.path).map_err(fail)?);
        let mut rec = [0u8; 48];
        let mut order = Vec::new();
        let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
        for _ in 0..self.entries {
            let len = if bytes { 44 } else { 48 };
            input.read_exact(&mut rec[..len]).map_err(fail)?;
            let e = Entry {
                fp: u128::from_le_bytes(rec[..16].try_into().unwrap_or([0; 16])),
                order: 0,
                lineage: word(&rec[16..24]),
                loc: word(&rec[24..32]),
                values: word(&rec[32..40]),
            };
            let value = if bytes {
                let n = u32::from_le_bytes(rec[40..44].try_into().unwrap_or([0; 4])) as usize;
                order.resize(n, 0);
                input.read_exact(&mut order).map_err(fail)?;
                OrderValue::Bytes(&order)
            } else {
                OrderValue::Int(word(&rec[40..48]))
            };
            each(e, value)?;
        }
        drop(input);
        std::fs::remove_file(&self.path).map_err(fail)
    }
}

/// A dedup index that spilled: its partition files, and once settled, the batch's winners.
struct Spill {
    parts: Vec<PartFile>,
    settled: Option<Entries>,
}

/// What spilling the dedup index cost a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpillStats {
    /// Times the index was written out.
    pub spills: u64,
    /// Entries written out.
    pub entries: u64,
    /// Partitions settled from disk (more than 64 when some were split again).
    pub partitions: u64,
}

/// Key bytes of each row: the raw text of a single string column, or the row format.
enum KeyBytes {
    Text(StringArray),
    Rows(Rows),
}

impl KeyBytes {
    fn new(enc: &KeyEncoder, batch: &RecordBatch) -> Result<KeyBytes> {
        if let [col] = enc.columns.as_slice()
            && let Some(a) = batch.column_by_name(col)
            && a.data_type() == &DataType::Utf8
        {
            return Ok(KeyBytes::Text(a.as_string::<i32>().clone()));
        }
        Ok(KeyBytes::Rows(enc.encode(batch)?))
    }

    /// The bytes of row `i` (a null text is bytes no UTF-8 text can be).
    fn get(&self, i: usize) -> &[u8] {
        match self {
            KeyBytes::Rows(r) => r.row(i).data(),
            KeyBytes::Text(a) if a.is_valid(i) => a.value(i).as_bytes(),
            KeyBytes::Text(_) => b"\xff\xff",
        }
    }
}

/// Order values of a batch: numbers, dates and timestamps as order-preserving u64 (null lowest),
/// anything else in the row format.
enum Orders {
    Int(Vec<u64>),
    Rows(Rows),
}

impl Orders {
    fn new(enc: &KeyEncoder, batch: &RecordBatch) -> Result<Orders> {
        let col = enc.columns.first().and_then(|c| batch.column_by_name(c));
        if let Some(a) = col
            && OrderKind::of(a.data_type()) == OrderKind::Int
            && let Ok(v) = cast(a, &DataType::Int64)
        {
            let v = v.as_primitive::<Int64Type>();
            let ranks = (0..v.len())
                .map(|i| {
                    if v.is_null(i) {
                        0
                    } else {
                        (v.value(i) as u64 ^ (1 << 63)).max(1)
                    }
                })
                .collect();
            return Ok(Orders::Int(ranks));
        }
        Ok(Orders::Rows(enc.encode(batch)?))
    }

    fn get(&self, i: usize) -> OrderValue<'_> {
        match self {
            Orders::Int(v) => OrderValue::Int(v[i]),
            Orders::Rows(r) => OrderValue::Bytes(r.row(i).data()),
        }
    }
}

/// How rows become index entries: key fingerprints, order values and value hashes, the same
/// for new rows in the sink and for rows read back from a table's files.
pub struct Keying {
    kind: OrderKind,
    key: KeyEncoder,
    order: KeyEncoder,
    fingerprints: Fingerprinter,
    /// The columns (and types) a row's values are hashed over: the table's, partitions included.
    values: Vec<(String, DataType)>,
}

impl Keying {
    /// Keying for rows shaped like `rows` (whose key and order columns have the table's
    /// types), hashing values over `full`'s columns.
    pub fn new(
        rows: &Schema,
        full: &Schema,
        unique_key: &[String],
        order_by: &str,
        sip: [u64; 2],
    ) -> Result<Keying> {
        let kind = OrderKind::of(rows.field_with_name(order_by)?.data_type());
        Ok(Keying {
            kind,
            key: KeyEncoder::new(rows, unique_key)?,
            order: KeyEncoder::new(rows, &[order_by.to_string()])?,
            fingerprints: Fingerprinter::new(sip),
            // Lineage is where a row came from, not what it holds: a row sent again in another
            // file repeats the stored one.
            values: full
                .fields()
                .iter()
                .filter(|f| f.name() != crate::source::LINEAGE)
                .map(|f| (f.name().clone(), f.data_type().clone()))
                .collect(),
        })
    }

    /// Keying for whole rows of a table (its full schema).
    pub fn for_table(full: &SchemaRef, shape: &Shape, sip: [u64; 2]) -> Result<Keying> {
        Keying::new(full, full, &shape.unique_key, &shape.order_by, sip)
    }

    /// The key fingerprint of each row.
    pub fn fingerprints(&self, batch: &RecordBatch) -> Result<Vec<u128>> {
        let keys = KeyBytes::new(&self.key, batch)?;
        Ok((0..batch.num_rows())
            .map(|i| self.fingerprints.of(keys.get(i)))
            .collect())
    }

    /// Adds every row of `batch` to `out`, in `group`.
    pub fn entries(&self, batch: &RecordBatch, group: u32, out: &mut Entries) -> Result<()> {
        let fps = self.fingerprints(batch)?;
        let orders = Orders::new(&self.order, batch)?;
        let values = self.value_hashes(batch)?;
        for (i, fp) in fps.into_iter().enumerate() {
            out.push(fp, orders.get(i), values[i], group);
        }
        Ok(())
    }

    /// A hash of each row's values over the table's columns (cast to the table's types, so
    /// that a new row and the stored row it repeats hash alike; a fixed seed, so that hashes
    /// kept in the index compare across runs); a column the batch lacks counts as null.
    fn value_hashes(&self, batch: &RecordBatch) -> Result<Vec<u64>> {
        let n = batch.num_rows();
        let mut arrays = Vec::with_capacity(self.values.len());
        for (name, ty) in &self.values {
            arrays.push(match batch.column_by_name(name) {
                Some(a) if a.data_type() == ty => a.clone(),
                Some(a) => cast(a, ty)?,
                None => datafusion::arrow::array::new_null_array(ty, n),
            });
        }
        let mut hashes = vec![0u64; n];
        datafusion::common::hash_utils::create_hashes(
            &arrays,
            &datafusion::common::hash_utils::RandomState::default(),
            &mut hashes,
        )?;
        Ok(hashes)
    }
}

/// A slice of one incoming batch that belongs to one partition.
struct Segment {
    part: u32,
    /// Rows in the file layout and which of them lost, while buffered; `None` once sealed.
    body: Option<(RecordBatch, Vec<bool>)>,
    bytes: usize,
}

/// Where a sealed segment's rows went.
struct Placed {
    seg: u32,
    file: usize,
    start: u64,
    kept: BooleanBuffer,
}

/// The open file (if any) and the finished files of one partition.
struct PartWriter {
    part: usize,
    dir: String,
    writer: Option<ArrowWriter<File>>,
    files: Vec<(PathBuf, u64)>,
    placed: Vec<Placed>,
}

impl PartWriter {
    fn write(&mut self, sink: &TableSink, batch: &RecordBatch) -> Result<(usize, u64)> {
        if self.writer.is_none() {
            let path = sink
                .scratch
                .join(format!("p{}-{}.parquet", self.part, self.files.len()));
            let file = File::create(&path)
                .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
            self.writer = Some(ArrowWriter::try_new(
                file,
                sink.file_schema.clone(),
                Some(sink.props(batch)?),
            )?);
            self.files.push((path, 0));
        }
        let file = self.files.len() - 1;
        let start = self.files[file].1;
        if let Some(w) = self.writer.as_mut() {
            w.write(batch)?;
        }
        self.files[file].1 += batch.num_rows() as u64;
        // A file that reached the target size is done: the partition's next rows start another.
        if let Some(w) = &self.writer
            && (w.bytes_written() + w.in_progress_size()) as u64 >= sink.opts.target_file_size
        {
            self.close()?;
        }
        Ok((file, start))
    }

    fn close(&mut self) -> Result<()> {
        if let Some(w) = self.writer.take() {
            w.close()?;
        }
        Ok(())
    }
}

/// A sealed segment on its way to a file: its id, rows and which of them to keep.
type Sealed = (u32, RecordBatch, BooleanArray);

/// A partition's writer and the sealed segments it is to write.
type WriteJob = (Arc<Mutex<PartWriter>>, Vec<Sealed>);

/// Work to do outside the sink's lock: end the row group of some files (or close them), write
/// sealed segments.
#[derive(Default)]
struct Jobs {
    flush: Vec<Arc<Mutex<PartWriter>>>,
    close: Vec<Arc<Mutex<PartWriter>>>,
    write: Vec<WriteJob>,
}

struct State {
    parts: HashMap<Vec<u8>, u32>,
    by_dir: HashMap<String, u32>,
    writers: Vec<Arc<Mutex<PartWriter>>>,
    segments: Vec<Segment>,
    queue: VecDeque<u32>,
    buffered: usize,
    late: Vec<u64>,
    duplicates: Vec<u64>,
    open: VecDeque<usize>,
}

/// Writes one table's new rows: dedup, partitions, Parquet files in a scratch folder.
pub struct TableSink {
    opts: SinkOptions,
    /// Settled by the first batch written (which columns are written plain).
    props: OnceLock<WriterProperties>,
    scratch: PathBuf,
    file_schema: SchemaRef,
    parts: Option<KeyEncoder>,
    keying: Option<Keying>,
    index: Vec<Mutex<DedupIndex>>,
    /// Bytes the index takes (about 56 a key with the table's slack, plus byte orders).
    index_bytes: AtomicUsize,
    /// The index's partitions on disk, once it spilled.
    spill: Mutex<Option<Spill>>,
    spill_stats: Mutex<SpillStats>,
    state: Mutex<State>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn lineage_of(file: i32, row: i64) -> u64 {
    ((file.max(0) as u64) << 40) | (row.max(0) as u64 & ((1 << 40) - 1))
}

impl TableSink {
    /// A sink for rows shaped like `valid` (data columns, `_source_file` as an index into the
    /// batch's `files`, `_source_row`); files are written with `full`'s columns minus the
    /// partition columns, into `scratch`.
    pub fn new(
        opts: SinkOptions,
        valid: &Schema,
        full: &Schema,
        files: usize,
        scratch: &Path,
    ) -> Result<TableSink> {
        std::fs::create_dir_all(scratch)
            .map_err(|e| Error::io(format!("cannot create {}", scratch.display()), e))?;
        let file_schema = nullable(&Schema::new(
            full.fields()
                .iter()
                .filter(|f| !opts.partition_by.contains(f.name()))
                .cloned()
                .collect::<Vec<_>>(),
        ));
        let parts = if opts.partition_by.is_empty() {
            None
        } else {
            Some(KeyEncoder::new(valid, &opts.partition_by)?)
        };
        let keying = match &opts.order_by {
            Some(order) if !opts.unique_key.is_empty() => {
                Some(Keying::new(valid, full, &opts.unique_key, order, opts.sip)?)
            }
            _ => None,
        };
        Ok(TableSink {
            props: OnceLock::new(),
            opts,
            scratch: scratch.to_path_buf(),
            file_schema,
            parts,
            keying,
            index_bytes: AtomicUsize::new(0),
            spill: Mutex::new(None),
            spill_stats: Mutex::new(SpillStats::default()),
            index: (0..SHARDS).map(|_| Mutex::default()).collect(),
            state: Mutex::new(State {
                parts: HashMap::new(),
                by_dir: HashMap::new(),
                writers: Vec::new(),
                segments: Vec::new(),
                queue: VecDeque::new(),
                buffered: 0,
                late: Vec::new(),
                duplicates: vec![0; files],
                open: VecDeque::new(),
            }),
        })
    }

    /// The Parquet settings for files of this table, settled by the first batch big enough to
    /// judge which columns are worth a dictionary.
    fn props(&self, batch: &RecordBatch) -> Result<WriterProperties> {
        if let Some(props) = self.props.get() {
            return Ok(props.clone());
        }
        match mostly_distinct(batch) {
            Some(plain) => {
                let props = writer_properties(&self.opts.compression, &plain)?;
                Ok(self.props.get_or_init(|| props).clone())
            }
            None => writer_properties(&self.opts.compression, &[]),
        }
    }

    fn partition(&self, state: &mut State, dir: &str) -> u32 {
        if let Some(&p) = state.by_dir.get(dir) {
            return p;
        }
        let p = state.writers.len() as u32;
        state.writers.push(Arc::new(Mutex::new(PartWriter {
            part: p as usize,
            dir: dir.to_string(),
            writer: None,
            files: Vec::new(),
            placed: Vec::new(),
        })));
        state.by_dir.insert(dir.to_string(), p);
        p
    }

    /// The partition of each row: the row-format bytes of the partition columns, looked up once
    /// per run of equal values. Dropped rows go with a neighbour's partition (they are never
    /// written).
    fn partition_rows(
        &self,
        batch: &RecordBatch,
        kept: &dyn Fn(usize) -> bool,
    ) -> Result<Vec<u32>> {
        let n = batch.num_rows();
        let mut part_of = vec![0u32; n];
        let Some(enc) = &self.parts else {
            self.partition(&mut lock(&self.state), "");
            return Ok(part_of);
        };
        let rows = enc.encode(batch)?;
        let mut state = lock(&self.state);
        let mut prev: Option<(&[u8], u32)> = None;
        for (i, slot) in part_of.iter_mut().enumerate() {
            if !kept(i) {
                *slot = u32::MAX;
                continue;
            }
            let bytes = rows.row(i).data();
            if let Some((b, p)) = prev
                && b == bytes
            {
                *slot = p;
                continue;
            }
            let p = match state.parts.get(bytes) {
                Some(&p) => p,
                None => {
                    let dir = partition_dirs(&batch.slice(i, 1), &self.opts.partition_by)?
                        .pop()
                        .unwrap_or_default();
                    let p = self.partition(&mut state, &dir);
                    state.parts.insert(bytes.to_vec(), p);
                    p
                }
            };
            *slot = p;
            prev = Some((bytes, p));
        }
        let mut last = part_of
            .iter()
            .copied()
            .find(|&p| p != u32::MAX)
            .unwrap_or(0);
        for p in part_of.iter_mut() {
            if *p == u32::MAX {
                *p = last;
            } else {
                last = *p;
            }
        }
        Ok(part_of)
    }

    /// Takes a batch of valid rows; with `keep`, only the rows it selects (the others ride along
    /// as dropped rows, which saves copying the batch).
    pub fn push(&self, batch: &RecordBatch, keep: Option<&BooleanArray>) -> Result<()> {
        let n = batch.num_rows();
        if n == 0 {
            return Ok(());
        }
        let kept = |i: usize| keep.is_none_or(|k| k.value(i));
        let part_of = self.partition_rows(batch, &kept)?;
        // Split into one segment per partition, in the file layout.
        let rows = conform(batch, &self.file_schema)?;
        let mut groups: Vec<(u32, Vec<u32>)> = Vec::new();
        let mut pos_in_group = vec![0u32; n];
        let mut group_of = vec![0u32; n];
        let uniform = part_of.iter().all(|&p| p == part_of[0]);
        let pieces: Vec<(u32, RecordBatch, Vec<bool>)> = if uniform {
            for (i, p) in pos_in_group.iter_mut().enumerate() {
                *p = i as u32;
            }
            vec![(part_of[0], rows, (0..n).map(|i| !kept(i)).collect())]
        } else {
            let mut slot: HashMap<u32, usize> = HashMap::new();
            for (i, &p) in part_of.iter().enumerate() {
                let g = *slot.entry(p).or_insert_with(|| {
                    groups.push((p, Vec::new()));
                    groups.len() - 1
                });
                pos_in_group[i] = groups[g].1.len() as u32;
                group_of[i] = g as u32;
                groups[g].1.push(i as u32);
            }
            groups
                .iter()
                .map(|(p, idx)| {
                    Ok((
                        *p,
                        take_record_batch(&rows, &UInt32Array::from(idx.clone()))?,
                        idx.iter().map(|&i| !kept(i as usize)).collect(),
                    ))
                })
                .collect::<Result<_>>()?
        };
        let keyed = match &self.keying {
            Some(k) => Some((
                k,
                KeyBytes::new(&k.key, batch)?,
                Orders::new(&k.order, batch)?,
                k.value_hashes(batch)?,
            )),
            None => None,
        };
        let file = batch
            .column_by_name(SOURCE_FILE)
            .and_then(|a| a.as_primitive_opt::<Int32Type>())
            .cloned();
        let source_row = batch
            .column_by_name(SOURCE_ROW)
            .and_then(|a| a.as_primitive_opt::<Int64Type>())
            .cloned();

        let first = {
            let mut state = lock(&self.state);
            let first = state.segments.len() as u32;
            for (p, b, dead) in pieces {
                let bytes = b.get_array_memory_size();
                state.buffered += bytes;
                let id = state.segments.len() as u32;
                state.queue.push_back(id);
                state.segments.push(Segment {
                    part: p,
                    body: Some((b, dead)),
                    bytes,
                });
            }
            first
        };
        let mut losers = Vec::new();
        if let Some((keying, keys, orders, values)) = &keyed {
            // Fingerprints of the rows offered (dropped rows are not).
            let mut fps = vec![0u128; n];
            let mut by_shard: Vec<Vec<u32>> = vec![Vec::new(); SHARDS];
            for (i, fp) in fps.iter_mut().enumerate() {
                if kept(i) {
                    *fp = keying.fingerprints.of(keys.get(i));
                    by_shard[slot(*fp).1].push(i as u32);
                }
            }
            // Shards another thread holds are left for later, so threads do not queue behind
            // each other.
            let mut todo: VecDeque<usize> = (0..SHARDS)
                .map(|k| (k + first as usize) % SHARDS)
                .filter(|&k| !by_shard[k].is_empty())
                .collect();
            let mut waits = 0;
            while let Some(shard) = todo.pop_front() {
                let mut index = match self.index[shard].try_lock() {
                    Ok(index) => index,
                    Err(std::sync::TryLockError::WouldBlock) if waits < SHARDS => {
                        waits += 1;
                        todo.push_back(shard);
                        continue;
                    }
                    Err(_) => lock(&self.index[shard]),
                };
                let before = index.bytes();
                for &i in &by_shard[shard] {
                    let i = i as usize;
                    let seg = first + group_of[i];
                    let loc = ((seg as u64) << 32) | pos_in_group[i] as u64;
                    let lineage = lineage_of(
                        file.as_ref().map(|f| f.value(i)).unwrap_or(0),
                        source_row.as_ref().map(|r| r.value(i)).unwrap_or(0),
                    );
                    if let Some(lost) = index.offer(fps[i], orders.get(i), lineage, loc, values[i])
                    {
                        losers.push(lost);
                    }
                }
                // Counted under the shard's lock, as a spill takes it away.
                self.index_bytes
                    .fetch_add(index.bytes() - before, Ordering::Relaxed);
            }
        }
        if keyed.is_some() && self.index_bytes.load(Ordering::Relaxed) > self.index_share() {
            self.spill_index()?;
        }
        let jobs = {
            let mut state = lock(&self.state);
            for (loc, lineage) in losers {
                Self::lose(&mut state, loc, lineage);
            }
            self.seal(&mut state, false)
        };
        self.run(jobs)
    }

    /// Bytes of rows to hold back now: the buffer's share, less what the dedup index has
    /// grown into beyond its own share (half the limit).
    fn buffer_now(&self) -> usize {
        let index = self.index_bytes.load(Ordering::Relaxed);
        let room = (self.opts.memory_limit / 2).saturating_sub(index);
        self.opts.buffer_bytes.min(room.max(1 << 20))
    }

    /// Bytes the dedup index may take before it spills: half the memory limit.
    fn index_share(&self) -> usize {
        self.opts.memory_limit / 2
    }

    /// Writes the dedup index out to its partition files and starts it again empty (unless
    /// another thread is doing so, or just did).
    fn spill_index(&self) -> Result<()> {
        let mut spill = match self.spill.try_lock() {
            Ok(s) => s,
            Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
        };
        if self.index_bytes.load(Ordering::Relaxed) <= self.index_share() {
            return Ok(());
        }
        self.dump(&mut spill)
    }

    /// Moves every entry of the dedup index to the partition files (made on the first spill).
    fn dump(&self, spill: &mut Option<Spill>) -> Result<()> {
        let Some(keying) = &self.keying else {
            return Ok(());
        };
        let bytes = keying.kind == OrderKind::Bytes;
        if spill.is_none() {
            let dir = self.scratch.join("dedup-spill");
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
            tracing::info!(
                limit = self.opts.memory_limit,
                partitions = SPILL_FANOUT,
                "the batch's dedup index outgrew its share of the memory limit; it spills to disk"
            );
            *spill = Some(Spill {
                parts: (0..SPILL_FANOUT)
                    .map(|p| PartFile::new(dir.join(format!("p{p}.spill"))))
                    .collect(),
                settled: None,
            });
        }
        let Some(spill) = spill.as_mut() else {
            return Ok(());
        };
        let mut entries = 0;
        for shard in &self.index {
            // Taken under the shard's lock, written outside it: other threads go on offering
            // rows to the empty shard.
            let taken = {
                let mut index = lock(shard);
                self.index_bytes.fetch_sub(index.bytes(), Ordering::Relaxed);
                std::mem::take(&mut *index)
            };
            for e in taken.table.iter() {
                spill.parts[spill_part(e.fp, 0)].push(e, taken.order_of(e, bytes))?;
            }
            entries += taken.table.len() as u64;
        }
        if entries == 0 {
            return Ok(());
        }
        let mut stats = lock(&self.spill_stats);
        stats.spills += 1;
        stats.entries += entries;
        tracing::debug!(entries, spills = stats.spills, "dedup index spilled");
        Ok(())
    }

    /// What spilling the dedup index cost (all zero if it did not spill).
    pub fn spill_stats(&self) -> SpillStats {
        *lock(&self.spill_stats)
    }

    /// Settles a spilled index (the rest of it in memory first): each partition read back into
    /// an index of its own, one at a time, its losers marked, then met with the rows the table
    /// holds (`held`); the winners kept for `finish`. Returns the held keys whose new row
    /// replaces the held one.
    fn settle(&self, spill: &mut Spill, held: &HashMap<u128, Held>) -> Result<HashSet<u128>> {
        let Some(keying) = &self.keying else {
            return Ok(HashSet::new());
        };
        let mut out = Entries::new(keying.kind);
        let mut replaced = HashSet::new();
        let parts = std::mem::take(&mut spill.parts);
        let held_fps: Vec<u128> = held.keys().copied().collect();
        self.settle_parts(parts, held_fps, held, 0, &mut out, &mut replaced)?;
        spill.settled = Some(out);
        let dir = self.scratch.join("dedup-spill");
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the dedup index's spill folder");
        }
        Ok(replaced)
    }

    fn settle_parts(
        &self,
        parts: Vec<PartFile>,
        held_fps: Vec<u128>,
        held: &HashMap<u128, Held>,
        depth: u32,
        out: &mut Entries,
        replaced: &mut HashSet<u128>,
    ) -> Result<()> {
        let bytes = out.kind() == OrderKind::Bytes;
        let mut held_of: Vec<Vec<u128>> = vec![Vec::new(); parts.len()];
        for fp in held_fps {
            held_of[spill_part(fp, depth)].push(fp);
        }
        for (part, held_fps) in parts.into_iter().zip(held_of) {
            if part.bytes > self.index_share() && depth < SPILL_DEPTH {
                // Still too large for memory: split by the next fingerprint bits.
                let mut sub: Vec<PartFile> = (0..SPILL_FANOUT)
                    .map(|k| PartFile::new(part.path.with_extension(format!("{k}.spill"))))
                    .collect();
                part.drain(bytes, |e, order| {
                    sub[spill_part(e.fp, depth + 1)].push(&e, order)
                })?;
                self.settle_parts(sub, held_fps, held, depth + 1, out, replaced)?;
                continue;
            }
            lock(&self.spill_stats).partitions += 1;
            let mut index = DedupIndex::default();
            let mut losers = Vec::new();
            part.drain(bytes, |e, order| {
                if let Some(lost) = index.offer(e.fp, order, e.lineage, e.loc, e.values) {
                    losers.push(lost);
                }
                Ok(())
            })?;
            for fp in held_fps {
                if let Some(h) = held.get(&fp) {
                    let (replaces, lost) = index.against_existing(fp, h.order.as_value(), h.values);
                    if replaces {
                        replaced.insert(fp);
                    }
                    losers.extend(lost);
                }
            }
            {
                let mut state = lock(&self.state);
                for (loc, lineage) in losers {
                    Self::lose(&mut state, loc, lineage);
                }
            }
            index.winners_into(out, bytes);
        }
        Ok(())
    }

    /// Marks a row as a loser: dropped while buffered, a late loser once written.
    fn lose(state: &mut State, loc: u64, lineage: u64) {
        let file = (lineage >> 40) as usize;
        if let Some(d) = state.duplicates.get_mut(file) {
            *d += 1;
        }
        let (seg, row) = ((loc >> 32) as usize, (loc & 0xffff_ffff) as usize);
        match state.segments.get_mut(seg).and_then(|s| s.body.as_mut()) {
            Some((_, dead)) => dead[row] = true,
            None => state.late.push(loc),
        }
    }

    /// Seals the oldest buffered segments beyond the budget (all of them with `all`).
    fn seal(&self, state: &mut State, all: bool) -> Jobs {
        let mut jobs = Jobs::default();
        let mut by_part: HashMap<u32, usize> = HashMap::new();
        let buffer = self.buffer_now();
        while all || state.buffered > buffer {
            let Some(seg) = state.queue.pop_front() else {
                break;
            };
            let s = &mut state.segments[seg as usize];
            let part = s.part;
            state.buffered -= s.bytes;
            let Some((batch, dead)) = s.body.take() else {
                continue;
            };
            let keep: BooleanArray = dead.iter().map(|d| Some(!d)).collect();
            let slot = match by_part.get(&part) {
                Some(&j) => j,
                None => {
                    self.touch(state, part as usize, &mut jobs);
                    jobs.write
                        .push((state.writers[part as usize].clone(), Vec::new()));
                    by_part.insert(part, jobs.write.len() - 1);
                    jobs.write.len() - 1
                }
            };
            jobs.write[slot].1.push((seg, batch, keep));
        }
        jobs
    }

    /// Notes that `part` is written to. Beyond `max_writers` files with rows in memory, the
    /// least recently written one ends its row group (and is closed when there are too many
    /// partitions to keep every file open).
    fn touch(&self, state: &mut State, part: usize, jobs: &mut Jobs) {
        if let Some(i) = state.open.iter().position(|&p| p == part) {
            state.open.remove(i);
        }
        state.open.push_back(part);
        while state.open.len() > self.opts.max_writers.max(1) {
            if let Some(old) = state.open.pop_front() {
                if state.writers.len() > MAX_OPEN_FILES {
                    jobs.close.push(state.writers[old].clone());
                } else {
                    jobs.flush.push(state.writers[old].clone());
                }
            }
        }
    }

    fn run(&self, jobs: Jobs) -> Result<()> {
        for w in jobs.close {
            lock(&w).close()?;
        }
        for w in jobs.flush {
            if let Some(w) = lock(&w).writer.as_mut() {
                w.flush()?;
            }
        }
        for (w, segs) in jobs.write {
            self.write_sealed(&mut lock(&w), segs)?;
        }
        Ok(())
    }

    fn write_sealed(&self, w: &mut PartWriter, segs: Vec<Sealed>) -> Result<()> {
        for (seg, batch, keep) in segs {
            let kept = if keep.true_count() == keep.len() {
                batch
            } else {
                filter_record_batch(&batch, &keep)?
            };
            let (file, start) = if kept.num_rows() > 0 {
                w.write(self, &kept)?
            } else {
                (w.files.len().saturating_sub(1), 0)
            };
            w.placed.push(Placed {
                seg,
                file,
                start,
                kept: keep.values().clone(),
            });
        }
        Ok(())
    }

    /// The fingerprints of the batch's keys, sorted on `threads` threads (the key index looks
    /// them up). A spilled index is written out whole first and read back a partition at a time.
    pub fn fingerprints(&self, threads: usize) -> Result<Vec<u128>> {
        let sort = |fps: &mut Vec<u128>| {
            crate::index::sort_spread(fps, |f| *f, threads, |b| b.sort_unstable())
        };
        let mut spill = lock(&self.spill);
        if spill.is_none() {
            let mut out = Vec::with_capacity(self.index.iter().map(|s| lock(s).table.len()).sum());
            for shard in &self.index {
                out.extend(lock(shard).table.iter().map(|e| e.fp));
            }
            sort(&mut out);
            return Ok(out);
        }
        self.dump(&mut spill)?;
        let mut out = Vec::new();
        if let Some(spill) = spill.as_mut() {
            for part in &mut spill.parts {
                let Some(w) = part.out.as_mut() else {
                    continue;
                };
                w.flush().map_err(|e| part.fail(e))?;
                let path = part.path.clone();
                let file = File::open(&path)
                    .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
                let mut input = BufReader::with_capacity(64 << 10, file);
                let from = out.len();
                let mut rec = [0u8; 48];
                let bytes = self.keying.as_ref().map(|k| k.kind) == Some(OrderKind::Bytes);
                for _ in 0..part.entries {
                    let fail = |e| Error::io(format!("cannot read {}", path.display()), e);
                    input
                        .read_exact(&mut rec[..if bytes { 44 } else { 48 }])
                        .map_err(fail)?;
                    if bytes {
                        let n = u32::from_le_bytes(rec[40..44].try_into().unwrap_or([0; 4]));
                        std::io::copy(&mut (&mut input).take(n as u64), &mut std::io::sink())
                            .map_err(fail)?;
                    }
                    out.push(u128::from_le_bytes(rec[..16].try_into().unwrap_or([0; 16])));
                }
                // A key spilled more than once is looked up once.
                out[from..].sort_unstable();
                let mut kept = from;
                for i in from..out.len() {
                    if kept == from || out[kept - 1] != out[i] {
                        out[kept] = out[i];
                        kept += 1;
                    }
                }
                out.truncate(kept);
            }
        }
        sort(&mut out);
        Ok(out)
    }

    /// Rows the table already holds (`held`, by fingerprint) meet the new rows of their keys:
    /// returns the keys whose new row replaces the held one; a new row older than the held
    /// one, or identical to it (same order, same values), is dropped instead, as a duplicate of
    /// its file. Call once, after the last `push` and before `finish`.
    pub fn against_held(&self, held: &HashMap<u128, Held>) -> Result<HashSet<u128>> {
        let mut spill = lock(&self.spill);
        if spill.is_some() {
            if spill.as_ref().is_some_and(|s| s.settled.is_some()) {
                return Err(Error::State {
                    path: self.scratch.display().to_string(),
                    message: "the batch's spilled dedup index was settled twice".into(),
                });
            }
            self.dump(&mut spill)?;
            if let Some(spill) = spill.as_mut() {
                return self.settle(spill, held);
            }
        }
        let mut replaced = HashSet::new();
        for (&fp, h) in held {
            let (replaces, lost) =
                lock(&self.index[slot(fp).1]).against_existing(fp, h.order.as_value(), h.values);
            if let Some((loc, lineage)) = lost {
                Self::lose(&mut lock(&self.state), loc, lineage);
            }
            if replaces {
                replaced.insert(fp);
            }
        }
        Ok(replaced)
    }

    /// Rows dropped as duplicates, per source file index.
    pub fn duplicates(&self) -> Vec<u64> {
        lock(&self.state).duplicates.clone()
    }

    /// Writes what is still buffered, closes every file and rewrites the files that hold late
    /// losers. Returns the non-empty files and, with a `unique_key`, the key index entries of
    /// the rows written, sorted (their group: the index of their file in the list).
    pub fn finish(&self, threads: usize) -> Result<(Vec<OutFile>, Option<Entries>)> {
        // A spilled index is settled first, so that its losers still buffered are never written.
        let settled = {
            let mut spill = lock(&self.spill);
            if spill.as_ref().is_some_and(|s| s.settled.is_none()) {
                self.dump(&mut spill)?;
                if let Some(s) = spill.as_mut() {
                    self.settle(s, &HashMap::new())?;
                }
            }
            spill.as_mut().and_then(|s| s.settled.take())
        };
        let (jobs, writers, late) = {
            let mut state = lock(&self.state);
            let jobs = self.seal(&mut state, true);
            (jobs, state.writers.clone(), std::mem::take(&mut state.late))
        };
        let mut entries = self.keying.as_ref().map(|k| Entries::new(k.kind));
        if let Some(settled) = settled {
            entries = Some(settled);
        }
        // Every partition writes what it still holds and closes its file, on all threads.
        let mut sealed: HashMap<usize, Vec<Sealed>> = HashMap::new();
        for (w, segs) in jobs.write {
            let part = lock(&w).part;
            sealed.entry(part).or_default().extend(segs);
        }
        let work: Vec<WriteJob> = writers
            .iter()
            .enumerate()
            .map(|(p, w)| (w.clone(), sealed.remove(&p).unwrap_or_default()))
            .collect();
        let (written, entries) = std::thread::scope(|s| {
            // Meanwhile every row was offered: the winners become index entries (their group,
            // for now, the segment they are in), sorted; the index's memory goes shard by shard.
            let side = s.spawn(move || -> Result<Option<Entries>> {
                let t = std::time::Instant::now();
                let shards: Vec<DedupIndex> = self
                    .index
                    .iter()
                    .map(|s| std::mem::take(&mut *lock(s)))
                    .collect();
                let mut entries = entries;
                match entries.as_mut() {
                    // Shards hold ascending ranges of fingerprints (by their top bits): each is
                    // gathered and sorted in its place, on all threads.
                    Some(out) if out.is_empty() && out.kind() == OrderKind::Int => {
                        let parts = shards.into_iter().map(|s| (s.winners(), s)).collect();
                        *out = Entries::from_parts(parts, threads, |s, emit| s.each_winner(emit))?;
                    }
                    Some(out) => {
                        out.reserve(shards.iter().map(|s| s.table.len()).sum());
                        for index in shards {
                            index.winners_into(out, out.kind() == OrderKind::Bytes);
                        }
                        out.sort(threads);
                    }
                    None => {}
                }
                if let Some(out) = &entries {
                    tracing::debug!(
                        entries = out.len(),
                        ms = t.elapsed().as_millis() as u64,
                        "key index entries of the batch gathered and sorted"
                    );
                }
                Ok(entries)
            });
            let written = on_threads(threads, work, |(w, segs)| {
                let mut w = lock(&w);
                self.write_sealed(&mut w, segs).and_then(|()| w.close())
            })
            // Files holding rows that lost after they were written are rewritten while the
            // entries are still gathered and sorted.
            .and_then(|()| match late.is_empty() {
                true => Ok(()),
                false => self.drop_late(&writers, &late, threads),
            });
            let entries = side
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (written, entries)
        });
        written?;
        let mut entries = entries?;
        self.index_bytes.store(0, Ordering::Relaxed);
        let mut out = Vec::new();
        // Segments are numbered densely: a table, not a map, for every entry's lookup.
        let mut file_of_seg: Vec<u32> = Vec::new();
        for w in &writers {
            let w = lock(w);
            let mut numbered = HashMap::new();
            for (i, (path, rows)) in w.files.iter().enumerate() {
                if *rows == 0 {
                    let _ = std::fs::remove_file(path);
                    continue;
                }
                numbered.insert(i, out.len() as u32);
                out.push(OutFile {
                    dir: w.dir.clone(),
                    path: path.clone(),
                    rows: *rows,
                });
            }
            for pl in &w.placed {
                if let Some(&f) = numbered.get(&pl.file) {
                    let seg = pl.seg as usize;
                    if file_of_seg.len() <= seg {
                        file_of_seg.resize(seg + 1, u32::MAX);
                    }
                    file_of_seg[seg] = f;
                }
            }
        }
        if let Some(e) = entries.as_mut() {
            e.regroup(|seg| file_of_seg.get(seg as usize).copied().unwrap_or(u32::MAX));
        }
        Ok((out, entries))
    }

    /// Rewrites the files that hold rows which lost after they were written.
    fn drop_late(
        &self,
        writers: &[Arc<Mutex<PartWriter>>],
        late: &[u64],
        threads: usize,
    ) -> Result<()> {
        let mut placed: HashMap<u32, (usize, usize, u64, BooleanBuffer)> = HashMap::new();
        for (p, w) in writers.iter().enumerate() {
            for pl in &lock(w).placed {
                placed.insert(pl.seg, (p, pl.file, pl.start, pl.kept.clone()));
            }
        }
        let mut drops: HashMap<(usize, usize), Vec<u64>> = HashMap::new();
        for &loc in late {
            let (seg, row) = ((loc >> 32) as u32, (loc & 0xffff_ffff) as usize);
            if let Some((p, file, start, kept)) = placed.get(&seg) {
                let pos = start + kept.slice(0, row).count_set_bits() as u64;
                drops.entry((*p, *file)).or_default().push(pos);
            }
        }
        tracing::debug!(
            files = drops.len(),
            rows = late.len(),
            "rewriting files with late duplicates"
        );
        let props = self.props(&RecordBatch::new_empty(self.file_schema.clone()))?;
        // Files are rewritten on all threads, each outside its partition's lock.
        on_threads(
            threads,
            drops.into_iter().collect(),
            |((p, file), mut positions)| {
                positions.sort_unstable();
                let (path, rows) = lock(&writers[p]).files[file].clone();
                let kept = rewrite_without(&path, &positions, &self.file_schema, &props)?;
                debug_assert_eq!(kept + positions.len() as u64, rows);
                lock(&writers[p]).files[file].1 = kept;
                Ok(())
            },
        )
    }
}

/// Runs `job` on every item, on `threads` threads taking items from one queue; the first error
/// any of them met, if one did.
pub(crate) fn on_threads<T: Send>(
    threads: usize,
    items: Vec<T>,
    job: impl Fn(T) -> Result<()> + Sync,
) -> Result<()> {
    let work = Mutex::new(items);
    let errors: Mutex<Vec<Error>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                loop {
                    let Some(item) = lock(&work).pop() else {
                        break;
                    };
                    if let Err(e) = job(item) {
                        lock(&errors).push(e);
                    }
                }
            });
        }
    });
    match lock(&errors).pop() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Rewrites a Parquet file without the rows at `drop` (sorted positions); returns rows kept.
fn rewrite_without(
    path: &Path,
    drop: &[u64],
    schema: &SchemaRef,
    props: &WriterProperties,
) -> Result<u64> {
    let fail = |e: std::io::Error| Error::io(format!("cannot rewrite {}", path.display()), e);
    let tmp = path.with_extension("rewrite");
    let input = File::open(path).map_err(fail)?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(input)?
        .with_batch_size(65_536)
        .build()?;
    let out = File::create(&tmp).map_err(fail)?;
    let mut writer = ArrowWriter::try_new(out, schema.clone(), Some(props.clone()))?;
    let mut offset = 0u64;
    let mut next = 0usize;
    let mut kept = 0u64;
    for batch in reader {
        let batch = batch?;
        let n = batch.num_rows() as u64;
        let mut keep = vec![true; n as usize];
        while next < drop.len() && drop[next] < offset + n {
            keep[(drop[next] - offset) as usize] = false;
            next += 1;
        }
        let b = filter_record_batch(&batch, &BooleanArray::from(keep))?;
        kept += b.num_rows() as u64;
        writer.write(&b)?;
        offset += n;
    }
    writer.close()?;
    std::fs::rename(&tmp, path).map_err(fail)?;
    Ok(kept)
}

/// Writes rows to one Parquet file from many threads (the rejected rows of a batch).
pub struct RowFile {
    schema: SchemaRef,
    path: PathBuf,
    compression: String,
    writer: Mutex<(Option<ArrowWriter<File>>, u64)>,
}

impl RowFile {
    /// A file at `path`, created on the first rows.
    pub fn new(path: PathBuf, schema: &Schema, compression: &str) -> RowFile {
        RowFile {
            schema: nullable(schema),
            path,
            compression: compression.to_string(),
            writer: Mutex::new((None, 0)),
        }
    }

    /// Appends rows (conformed to the file's schema by name).
    pub fn write(&self, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let rows = conform(batch, &self.schema)?;
        let mut w = lock(&self.writer);
        if w.0.is_none() {
            let file = File::create(&self.path)
                .map_err(|e| Error::io(format!("cannot create {}", self.path.display()), e))?;
            w.0 = Some(ArrowWriter::try_new(
                file,
                self.schema.clone(),
                Some(writer_properties(&self.compression, &[])?),
            )?);
        }
        if let Some(writer) = w.0.as_mut() {
            writer.write(&rows)?;
        }
        w.1 += rows.num_rows() as u64;
        Ok(())
    }

    /// Closes the file; its path if it has rows.
    pub fn finish(&self) -> Result<Option<(PathBuf, u64)>> {
        let mut w = lock(&self.writer);
        match w.0.take() {
            Some(writer) => {
                writer.close()?;
                Ok(Some((self.path.clone(), w.1)))
            }
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Order;
    use datafusion::arrow::array::{Date32Array, Int32Array, Int64Array};
    use datafusion::arrow::datatypes::Field;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("v", DataType::Int64, true),
            Field::new("day", DataType::Date32, true),
            Field::new(SOURCE_FILE, DataType::Int32, false),
            Field::new(SOURCE_ROW, DataType::Int64, false),
        ]))
    }

    fn batch(rows: &[(&str, i64, i32)], first_row: i64) -> RecordBatch {
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
                Arc::new(Date32Array::from_iter_values(rows.iter().map(|r| r.2))),
                Arc::new(Int32Array::from(vec![0; rows.len()])),
                Arc::new(Int64Array::from_iter_values(
                    (0..rows.len() as i64).map(|i| first_row + i),
                )),
            ],
        )
        .unwrap()
    }

    fn read(files: &[OutFile]) -> Vec<(String, String, i64)> {
        let mut out = Vec::new();
        for f in files {
            let r = ParquetRecordBatchReaderBuilder::try_new(File::open(&f.path).unwrap())
                .unwrap()
                .build()
                .unwrap();
            for b in r {
                let b = b.unwrap();
                let ids = b.column(0).as_string::<i32>();
                let vs = b.column(1).as_primitive::<Int64Type>();
                for i in 0..b.num_rows() {
                    out.push((f.dir.clone(), ids.value(i).to_string(), vs.value(i)));
                }
            }
        }
        out.sort();
        out
    }

    /// With no buffer at all every loser is late: the files are rewritten without them, and
    /// the result is the same as with a buffer that holds everything.
    #[test]
    fn late_losers_are_rewritten_out() {
        let input = [
            vec![("a", 1, 0), ("b", 5, 0), ("c", 1, 1)],
            vec![("a", 3, 0), ("b", 2, 1), ("d", 1, 1)],
            vec![("c", 9, 0), ("a", 2, 1), ("e", 1, 0)],
        ];
        let mut results = Vec::new();
        for (buffer, writers) in [(0, 1), (1 << 30, 16)] {
            let dir = tempfile::tempdir().unwrap();
            let opts = SinkOptions {
                partition_by: vec!["day".into()],
                unique_key: vec!["id".into()],
                order_by: Some("v".into()),
                compression: "zstd".into(),
                buffer_bytes: buffer,
                memory_limit: 1 << 30,
                max_writers: writers,
                sip: [3, 4],
                target_file_size: 128 << 20,
            };
            let s = schema();
            let full = Schema::new(s.fields()[..3].to_vec());
            let sink = TableSink::new(opts, &s, &full, 1, dir.path()).unwrap();
            for (i, rows) in input.iter().enumerate() {
                sink.push(&batch(rows, 1 + 3 * i as i64), None).unwrap();
            }
            let (files, entries) = sink.finish(2).unwrap();
            assert_eq!(sink.duplicates(), vec![4]);
            assert_eq!(entries.map(|e| e.len()), Some(5), "one index entry per key");
            results.push(read(&files));
        }
        assert_eq!(results[0], results[1]);
        let ids: Vec<(&str, i64)> = results[0]
            .iter()
            .map(|(_, id, v)| (id.as_str(), *v))
            .collect();
        assert_eq!(ids, vec![("a", 3), ("b", 5), ("c", 9), ("e", 1), ("d", 1)]);
    }

    /// Values hashes are kept in the key index across runs and releases: an upgrade of
    /// DataFusion or foldhash that changes them makes every re-sent identical row look changed
    /// (a rewrite of the same data) until the index is rebuilt, so it must bump `index::FORMAT`.
    /// This pins them for strings (one past foldhash's 16-byte short path), numbers,
    /// timestamps, nulls and a missing column.
    #[test]
    fn values_hashes_do_not_change_between_releases() {
        use datafusion::arrow::array::{Float64Array, TimestampMicrosecondArray};
        use datafusion::arrow::datatypes::TimeUnit;
        let full = Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("n", DataType::Int64, true),
            Field::new("ts", DataType::Timestamp(TimeUnit::Microsecond, None), true),
            Field::new("x", DataType::Float64, true),
            Field::new("gone", DataType::Utf8, true),
        ]);
        let rows = Arc::new(Schema::new(full.fields()[..4].to_vec()));
        let batch = RecordBatch::try_new(
            rows.clone(),
            vec![
                Arc::new(StringArray::from(vec![
                    "a",
                    "b",
                    "a longer key of forty bytes or so..",
                ])),
                Arc::new(Int64Array::from(vec![Some(1), None, Some(-7)])),
                Arc::new(TimestampMicrosecondArray::from(vec![
                    Some(1_700_000_000_000_000),
                    Some(0),
                    None,
                ])),
                Arc::new(Float64Array::from(vec![Some(0.5), Some(-0.0), None])),
            ],
        )
        .unwrap();
        let keying = Keying::new(&rows, &full, &["id".to_string()], "ts", [1, 2]).unwrap();
        let got: Vec<String> = keying
            .value_hashes(&batch)
            .unwrap()
            .iter()
            .map(|h| format!("{h:016x}"))
            .collect();
        assert_eq!(
            got,
            vec!["4b2502219e4a6c1b", "f927ce9b1c7d3e9f", "b39e79a469e9ec53"]
        );
    }

    /// A seeded generator (SplitMix64), so the random batches are the same on every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// One random row: key, order, day, source file, source row.
    type Row = (String, i64, i32, i32, i64);

    /// A keyed schema whose order column `v` is a number or (kept as bytes) text.
    fn keyed_schema(text_order: bool) -> SchemaRef {
        let v = if text_order {
            DataType::Utf8
        } else {
            DataType::Int64
        };
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("v", v, true),
            Field::new("day", DataType::Date32, true),
            Field::new(SOURCE_FILE, DataType::Int32, false),
            Field::new(SOURCE_ROW, DataType::Int64, false),
        ]))
    }

    fn keyed_batch(schema: &SchemaRef, rows: &[Row]) -> RecordBatch {
        let v: Arc<dyn Array> = if schema.field(1).data_type() == &DataType::Utf8 {
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| format!("t{:03}", r.1)),
            ))
        } else {
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1)))
        };
        RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|r| r.0.clone()),
                )),
                v,
                Arc::new(Date32Array::from_iter_values(rows.iter().map(|r| r.2))),
                Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.3))),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.4))),
            ],
        )
        .unwrap()
    }

    /// What a sink made of a batch: rows written (partition, key, order), duplicates per
    /// file, the keys replacing held rows, index entries (key, order, values hash, and whether
    /// the file of its group holds the key's row), and how it spilled.
    type Outcome = (
        Vec<(String, String, String)>,
        Vec<u64>,
        Vec<String>,
        Vec<(String, Order, u64, bool)>,
        SpillStats,
    );

    fn sink_outcome(
        schema: &SchemaRef,
        batches: &[Vec<Row>],
        held: &HashMap<String, i64>,
        memory_limit: usize,
        buffer_bytes: usize,
    ) -> Outcome {
        let dir = tempfile::tempdir().unwrap();
        let sip = [7, 11];
        let opts = SinkOptions {
            partition_by: vec!["day".into()],
            unique_key: vec!["id".into()],
            order_by: Some("v".into()),
            compression: "snappy".into(),
            buffer_bytes,
            memory_limit,
            max_writers: 2,
            sip,
            target_file_size: 128 << 20,
        };
        let full = Schema::new(schema.fields()[..3].to_vec());
        let sink = TableSink::new(opts, schema, &full, 4, dir.path()).unwrap();
        for rows in batches {
            sink.push(&keyed_batch(schema, rows), None).unwrap();
        }
        let fp = Fingerprinter::new(sip);
        let id_of: HashMap<u128, String> = batches
            .iter()
            .flatten()
            .map(|r| (fp.of(r.0.as_bytes()), r.0.clone()))
            .collect();
        let fps = sink.fingerprints(2).unwrap();
        assert_eq!(fps.len(), id_of.len(), "one fingerprint per key");
        assert!(fps.windows(2).all(|w| w[0] < w[1]), "sorted, distinct");
        let text = schema.field(1).data_type() == &DataType::Utf8;
        let order_of = |v: i64| {
            let a: Arc<dyn Array> = if text {
                Arc::new(StringArray::from(vec![format!("t{v:03}")]))
            } else {
                Arc::new(Int64Array::from(vec![v]))
            };
            let b = RecordBatch::try_new(
                Arc::new(Schema::new(vec![Field::new(
                    "v",
                    a.data_type().clone(),
                    true,
                )])),
                vec![a],
            )
            .unwrap();
            let enc = KeyEncoder::new(&b.schema(), &["v".to_string()]).unwrap();
            match Orders::new(&enc, &b).unwrap().get(0) {
                OrderValue::Int(v) => Order::Int(v),
                OrderValue::Bytes(b) => Order::Bytes(b.to_vec()),
            }
        };
        // Held rows never repeat a new one exactly (their values hash is not any row's).
        let held: HashMap<u128, Held> = held
            .iter()
            .map(|(id, v)| {
                let h = Held {
                    group: 0,
                    values: 1,
                    order: order_of(*v),
                };
                (fp.of(id.as_bytes()), h)
            })
            .collect();
        let mut replaced: Vec<String> = sink
            .against_held(&held)
            .unwrap()
            .iter()
            .map(|fp| id_of[fp].clone())
            .collect();
        replaced.sort();
        let (files, entries) = sink.finish(2).unwrap();
        assert!(
            !dir.path().join("dedup-spill").exists(),
            "spill files are deleted once settled"
        );
        let mut written = Vec::new();
        let mut in_file: Vec<HashSet<(String, String)>> = Vec::new();
        for f in &files {
            let mut here = HashSet::new();
            let r = ParquetRecordBatchReaderBuilder::try_new(File::open(&f.path).unwrap())
                .unwrap()
                .build()
                .unwrap();
            for b in r {
                let b = b.unwrap();
                let vs = cast(b.column(1), &DataType::Utf8).unwrap();
                let (ids, vs) = (b.column(0).as_string::<i32>(), vs.as_string::<i32>());
                for i in 0..b.num_rows() {
                    let row = (ids.value(i).to_string(), vs.value(i).to_string());
                    written.push((f.dir.clone(), row.0.clone(), row.1.clone()));
                    here.insert(row);
                }
            }
            in_file.push(here);
        }
        written.sort();
        let entries = entries.unwrap();
        let mut index = Vec::new();
        for i in 0..entries.len() {
            let (fp, h) = entries.get(i);
            let id = id_of[&fp].clone();
            let there = in_file
                .get(h.group as usize)
                .is_some_and(|f| f.iter().any(|(k, _)| *k == id));
            index.push((id, h.order, h.values, there));
        }
        index.sort_by(|a, b| a.0.cmp(&b.0));
        let stats = sink.spill_stats();
        (written, sink.duplicates(), replaced, index, stats)
    }

    /// The dedup index spilling (several times, with partitions split again, every loser
    /// late or buffered) gives exactly what it gives in memory: the rows written, duplicates
    /// per file, the held rows replaced and the index entries; both agree with the rule (the
    /// greatest order wins, then the later file and row; a held row loses to a new row of an
    /// equal or greater order).
    #[test]
    fn a_spilled_dedup_index_settles_as_one_in_memory() {
        for seed in 0..6u64 {
            let mut rng = Rng(seed);
            let schema = keyed_schema(seed % 2 == 1);
            let keys = 700 + rng.below(500);
            let mut rows: Vec<Row> = Vec::new();
            let mut next_row = [1i64; 4];
            for _ in 0..3000 {
                let file = rng.below(4) as i32;
                let r = next_row[file as usize];
                next_row[file as usize] += 1;
                rows.push((
                    format!("k{}", rng.below(keys)),
                    rng.below(6) as i64,
                    rng.below(3) as i32,
                    file,
                    r,
                ));
            }
            let mut batches = Vec::new();
            let mut rest = &rows[..];
            while !rest.is_empty() {
                let n = (1 + rng.below(300) as usize).min(rest.len());
                batches.push(rest[..n].to_vec());
                rest = &rest[n..];
            }
            let mut held: HashMap<String, i64> = HashMap::new();
            for k in 0..keys {
                if rng.below(3) == 0 {
                    held.insert(format!("k{k}"), rng.below(6) as i64);
                }
            }

            // The rule, directly.
            let mut best: HashMap<&str, &Row> = HashMap::new();
            for r in &rows {
                let e = best.entry(&r.0).or_insert(r);
                if (r.1, r.3, r.4) > (e.1, e.3, e.4) {
                    *e = r;
                }
            }
            let text = seed % 2 == 1;
            let shown = |v: i64| {
                if text {
                    format!("t{v:03}")
                } else {
                    v.to_string()
                }
            };
            let mut expected: Vec<(String, String, String)> = best
                .values()
                .filter(|r| held.get(&r.0).is_none_or(|&h| r.1 >= h))
                .map(|r| (format!("day={}", day_text(r.2)), r.0.clone(), shown(r.1)))
                .collect();
            expected.sort();
            let mut dups = vec![0u64; 4];
            for r in &rows {
                dups[r.3 as usize] += 1;
            }
            for r in best.values() {
                if held.get(&r.0).is_none_or(|&h| r.1 >= h) {
                    dups[r.3 as usize] -= 1;
                }
            }

            let memory = sink_outcome(&schema, &batches, &held, 1 << 30, 1 << 30);
            assert_eq!(memory.4, SpillStats::default(), "seed {seed}: no spill");
            assert_eq!(memory.0, expected, "seed {seed}");
            assert_eq!(memory.1, dups, "seed {seed}");
            assert!(
                memory.3.iter().all(|e| e.3),
                "seed {seed}: groups name the files"
            );
            assert_eq!(memory.3.len(), expected.len(), "seed {seed}");
            // Spills of ~580 keys and no buffer; spills of ~18 keys with partitions split again.
            for (limit, buffer) in [(64 << 10, 0), (2 << 10, 1 << 20)] {
                let spilled = sink_outcome(&schema, &batches, &held, limit, buffer);
                let stats = spilled.4;
                assert!(stats.spills >= 1, "seed {seed}, limit {limit}: {stats:?}");
                assert!(stats.partitions >= SPILL_FANOUT as u64, "{stats:?}");
                if limit < 4 << 10 {
                    assert!(
                        stats.partitions > SPILL_FANOUT as u64,
                        "split again: {stats:?}"
                    );
                }
                assert_eq!(
                    (&spilled.0, &spilled.1, &spilled.2, &spilled.3),
                    (&memory.0, &memory.1, &memory.2, &memory.3),
                    "seed {seed}, limit {limit}"
                );
            }
        }
    }

    fn day_text(days: i32) -> String {
        (chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap() + chrono::Days::new(days as u64))
            .to_string()
    }
}
