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

use std::collections::{HashMap, VecDeque};
use std::fs::File;
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
use crate::index::{Arena, Entries, OrderKind, OrderValue, Shape, order_cmp};
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
}

/// Number of index shards.
const SHARDS: usize = 16;

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

/// The table position of a fingerprint and its shard: different bits of it.
fn slot(fp: u128) -> (u64, usize) {
    (fp as u64, (fp >> 64) as usize % SHARDS)
}

impl DedupIndex {
    fn order_of(&self, e: &Entry, bytes: bool) -> OrderValue<'_> {
        self.arena.load(e.order, bytes)
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
            return Some((e.loc, e.lineage));
        }
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
        }
        (false, Some((e.loc, e.lineage)))
    }
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
            values: full
                .fields()
                .iter()
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
    /// Keys in the index (about 56 bytes each with the table's slack).
    keys_held: AtomicUsize,
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
            keys_held: AtomicUsize::new(0),
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
        let mut new_keys = 0;
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
                for &i in &by_shard[shard] {
                    let i = i as usize;
                    let seg = first + group_of[i];
                    let loc = ((seg as u64) << 32) | pos_in_group[i] as u64;
                    let lineage = lineage_of(
                        file.as_ref().map(|f| f.value(i)).unwrap_or(0),
                        source_row.as_ref().map(|r| r.value(i)).unwrap_or(0),
                    );
                    match index.offer(fps[i], orders.get(i), lineage, loc, values[i]) {
                        Some(lost) => losers.push(lost),
                        None => new_keys += 1,
                    }
                }
            }
        }
        self.keys_held.fetch_add(new_keys, Ordering::Relaxed);
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
        let index = self.keys_held.load(Ordering::Relaxed) * 56;
        let room = (self.opts.memory_limit / 2).saturating_sub(index);
        self.opts.buffer_bytes.min(room.max(1 << 20))
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

    /// The fingerprints of the batch's keys, sorted (the key index looks them up).
    pub fn fingerprints(&self) -> Vec<u128> {
        let mut out = Vec::with_capacity(self.keys_held.load(Ordering::Relaxed));
        for shard in &self.index {
            out.extend(lock(shard).table.iter().map(|e| e.fp));
        }
        out.sort_unstable();
        out
    }

    /// A row the table already holds meets the new row of its key (`fp`): `true` if the new
    /// row replaces it; a new row older than the held one, or identical to it (same order, same
    /// values), is dropped instead, as a duplicate of its file. Asking twice gives the same
    /// answer.
    pub fn against_held(&self, fp: u128, order: OrderValue<'_>, values: u64) -> bool {
        let (replaced, lost) = lock(&self.index[slot(fp).1]).against_existing(fp, order, values);
        if let Some((loc, lineage)) = lost {
            Self::lose(&mut lock(&self.state), loc, lineage);
        }
        replaced
    }

    /// Rows dropped as duplicates, per source file index.
    pub fn duplicates(&self) -> Vec<u64> {
        lock(&self.state).duplicates.clone()
    }

    /// Writes what is still buffered, closes every file and rewrites the files that hold late
    /// losers. Returns the non-empty files and, with a `unique_key`, the key index entries of
    /// the rows written (their group: the index of their file in the list).
    pub fn finish(&self, threads: usize) -> Result<(Vec<OutFile>, Option<Entries>)> {
        let (jobs, writers, late) = {
            let mut state = lock(&self.state);
            let jobs = self.seal(&mut state, true);
            (jobs, state.writers.clone(), std::mem::take(&mut state.late))
        };
        // Every row was offered: the winners become index entries (their group, for now, the
        // segment they are in), and the index's memory goes to the writers and rewrites that
        // follow.
        let mut entries = self.keying.as_ref().map(|k| Entries::new(k.kind));
        for shard in &self.index {
            let index = std::mem::take(&mut *lock(shard));
            if let Some(out) = entries.as_mut() {
                let bytes = out.kind() == OrderKind::Bytes;
                for e in index.table.iter().filter(|e| e.loc != LOST) {
                    out.push(
                        e.fp,
                        index.order_of(e, bytes),
                        e.values,
                        (e.loc >> 32) as u32,
                    );
                }
            }
        }
        self.keys_held.store(0, Ordering::Relaxed);
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
        on_threads(threads, work, |(w, segs)| {
            let mut w = lock(&w);
            self.write_sealed(&mut w, segs).and_then(|()| w.close())
        })?;
        if !late.is_empty() {
            self.drop_late(&writers, &late, threads)?;
        }
        let mut out = Vec::new();
        let mut file_of_seg: HashMap<u32, u32> = HashMap::new();
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
                    file_of_seg.insert(pl.seg, f);
                }
            }
        }
        if let Some(e) = entries.as_mut() {
            e.regroup(|seg| file_of_seg.get(&seg).copied().unwrap_or(u32::MAX));
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
fn on_threads<T: Send>(
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
}
