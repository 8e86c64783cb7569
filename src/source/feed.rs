//! The feed: a batch of raw files read one after the other in record-aligned chunks, hashed on
//! the way in, and parsed by whichever thread asks next. Memory stays at a few chunks however
//! large the files are.
//!
//! JSON lines are cut at a newline; CSV at a newline outside quotes (quote parity from the start
//! of the chunk, which always starts at a record, counted from the back), checked against the
//! quotes just before it; a JSON document's top-level array after a whole element
//! ([`json::ArrayScan`], its elements numbered on across chunks); other JSON documents and
//! Parquet files are one chunk. When parity cannot be
//! trusted (an unclosed quote or a stray one inverts it, so a chunk would end inside a field or
//! grow to the end of the file), the chunk is scanned forward for its true last record end, an
//! unclosed quote ending its record at the end of its line (`csv::scan`); only then, or when
//! the dialect has comment lines or an escape character, which parity does not know.
//! A file in another text encoding than UTF-8 is decoded as it streams (after decompression);
//! like a compressed one, it is hashed as it is read, before decoding: the ledger's SHA-256 is
//! always that of the stored bytes. A CSV file's UTF-8 BOM and its `skip_rows` lines are dropped
//! (and hashed) before its header.
//! A file that cannot be opened (say a CSV header without a schema column) fails before any of
//! its rows are out; a file that breaks half-way (a truncated gzip) stops the feed, and the caller
//! runs the batch again without it.

use std::collections::VecDeque;
use std::io::Read;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use bytes::Bytes;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use sha2::{Digest, Sha256};

use super::columns::ReadContext;
use super::{Compression, Malformed, ReadOutput, SourceSchema, csv, json, parquet};
use crate::config::{CsvOptions, Format, SourceConfig};
use crate::error::{Error, Result};

/// A raw file to feed: its key and a reader of its stored (maybe compressed) bytes.
pub struct FeedFile {
    /// Key in the lake.
    pub key: String,
    /// The stored bytes.
    pub reader: Box<dyn Read + Send>,
}

/// What the feed learned about one file.
#[derive(Debug, Default)]
pub struct FileRead {
    /// SHA-256 of the stored bytes, hex (once the whole file was read).
    pub sha256: Option<String>,
    /// Rows handed to the query.
    pub good_rows: u64,
    /// Records that could not be read.
    pub malformed: Vec<Malformed>,
    /// Why the file could not be read at all (none of its rows went out).
    pub error: Option<Error>,
}

/// A file that broke after some of its rows went out: the batch must run again without it.
#[derive(Debug)]
pub struct Broken {
    /// Index of the file in the feed.
    pub file: usize,
    /// What went wrong.
    pub error: Error,
}

/// A piece of one file, ready to parse.
struct Chunk {
    file: usize,
    key: Arc<str>,
    data: Vec<u8>,
    first_line: u64,
    mapping: Option<Arc<Vec<Option<usize>>>>,
    /// A JSON document's array: the byte ranges of its elements in `data` (`first_line` is the
    /// first one's number).
    elements: Option<Vec<(usize, usize)>>,
    /// Whether the chunk ends the file.
    last: bool,
    /// For a plain file: its hash and this chunk's turn in it.
    turn: Option<(Arc<OrderedSha>, u64)>,
}

/// SHA-256 of a file's stored bytes, fed piece by piece in file order: for a plain file, chunk by
/// chunk by whichever thread holds each chunk, outside the feed's lock; for a compressed or
/// decoded file, by its reader as it reads.
#[derive(Default)]
struct OrderedSha {
    state: Mutex<(u64, Sha256)>,
    turn: Condvar,
}

impl OrderedSha {
    /// Adds the bytes of chunk `seq` once chunks `0..seq` are in.
    fn update(&self, seq: u64, data: &[u8]) {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while g.0 != seq {
            g = self.turn.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.1.update(data);
        g.0 += 1;
        drop(g);
        self.turn.notify_all();
    }

    fn hex(&self) -> String {
        let g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        hex::encode(g.1.clone().finalize())
    }
}

/// The file being read.
struct Open {
    file: usize,
    key: Arc<str>,
    reader: Box<dyn Read + Send>,
    hash: Arc<OrderedSha>,
    /// A plain file (not compressed, UTF-8): its chunks are hashed in turn (`seq`: the next
    /// one's).
    plain: bool,
    seq: u64,
    carry: Vec<u8>,
    line: u64,
    eof: bool,
    mapping: Option<Arc<Vec<Option<usize>>>>,
    /// A JSON document: how it is read, once its first byte is known.
    doc: Option<Doc>,
    emitted: bool,
}

/// How a JSON document is read.
enum Doc {
    /// A top-level array: in chunks of whole elements.
    Array(json::ArrayScan),
    /// Any other value: whole.
    Whole,
}

struct State {
    pending: Vec<Option<FeedFile>>,
    next: usize,
    open: Option<Open>,
    reads: Vec<FileRead>,
    broken: Option<Broken>,
    /// Hashes of files read to their end, finished once every chunk is in.
    hashes: Vec<Option<Arc<OrderedSha>>>,
}

/// Raw files of one source, handed out chunk by chunk.
pub struct Feed {
    source: SourceConfig,
    ctx: ReadContext,
    chunk_bytes: usize,
    state: Mutex<State>,
    free: Mutex<Vec<Vec<u8>>>,
}

impl Open {
    /// Hashes bytes of a plain file that no chunk carries (a CSV header), in their turn.
    fn hash_now(&mut self, data: &[u8]) {
        if self.plain {
            self.hash.update(self.seq, data);
            self.seq += 1;
        }
    }
}

/// Hashes what passes through.
struct HashRead<R> {
    inner: R,
    hash: Arc<OrderedSha>,
    seq: u64,
}

impl<R: Read> Read for HashRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(self.seq, &buf[..n]);
        self.seq += 1;
        Ok(n)
    }
}

impl Feed {
    /// A feed over `files`, in order; chunks of about `chunk_bytes`.
    pub fn new(
        source: &SourceConfig,
        schema: &SourceSchema,
        files: Vec<FeedFile>,
        chunk_bytes: usize,
    ) -> Feed {
        let reads: Vec<FileRead> = files.iter().map(|_| FileRead::default()).collect();
        Feed {
            source: source.clone(),
            ctx: ReadContext::new(schema, source.header_case),
            chunk_bytes: chunk_bytes.max(64 << 10),
            state: Mutex::new(State {
                pending: files.into_iter().map(Some).collect(),
                next: 0,
                open: None,
                hashes: reads.iter().map(|_| None).collect(),
                reads,
                broken: None,
            }),
            free: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next rows, parsed on the calling thread; `None` when every file is read (or one
    /// broke).
    pub fn next_rows(&self) -> Option<ReadOutput> {
        loop {
            let mut chunk = self.next_chunk()?;
            if let Some((h, seq)) = &chunk.turn {
                h.update(*seq, &chunk.data);
            }
            let parsed = match self.source.format {
                Format::Jsonl => {
                    json::read_lines(&self.ctx, &chunk.key, &chunk.data, chunk.first_line)
                }
                Format::Json => match &chunk.elements {
                    Some(elements) => json::read_elements(
                        &self.ctx,
                        &chunk.key,
                        &chunk.data,
                        elements,
                        chunk.first_line,
                    ),
                    None => json::read_document(&self.ctx, &chunk.key, &chunk.data),
                },
                Format::Csv => csv::read_records(
                    &self.ctx,
                    &self.source.csv,
                    &chunk.key,
                    &chunk.data,
                    chunk.first_line,
                    chunk.mapping.as_deref().map(Vec::as_slice).unwrap_or(&[]),
                    chunk.last,
                ),
                Format::Parquet => parquet::read(
                    &self.ctx,
                    &chunk.key,
                    Bytes::from(std::mem::take(&mut chunk.data)),
                ),
            };
            self.recycle(std::mem::take(&mut chunk.data));
            let mut state = self.lock();
            match parsed {
                Ok(mut out) => {
                    let read = &mut state.reads[chunk.file];
                    read.good_rows += out.good_rows();
                    read.malformed.append(&mut out.malformed);
                    if out.batches.is_empty() {
                        continue;
                    }
                    return Some(out);
                }
                Err(error) => {
                    if state.broken.is_none() {
                        state.broken = Some(Broken {
                            file: chunk.file,
                            error,
                        });
                    }
                    return None;
                }
            }
        }
    }

    /// Per-file results and the file that broke, if one did. Call once the feed is drained.
    pub fn finish(&self) -> (Vec<FileRead>, Option<Broken>) {
        let mut state = self.lock();
        let hashes = std::mem::take(&mut state.hashes);
        for (read, h) in state.reads.iter_mut().zip(hashes) {
            if let Some(h) = h
                && read.error.is_none()
            {
                read.sha256 = Some(h.hex());
            }
        }
        (std::mem::take(&mut state.reads), state.broken.take())
    }

    fn next_chunk(&self) -> Option<Chunk> {
        let mut state = self.lock();
        loop {
            if state.broken.is_some() {
                return None;
            }
            if state.open.is_none() {
                let i = state.next;
                let file = state.pending.get_mut(i)?.take()?;
                state.next += 1;
                match self.open(i, file) {
                    Ok(open) => state.open = Some(open),
                    Err(e) => state.reads[i].error = Some(e),
                }
                continue;
            }
            let Some(open) = state.open.as_mut() else {
                continue;
            };
            match self.cut(open) {
                Ok(Some(chunk)) => {
                    open.emitted = true;
                    return Some(chunk);
                }
                Ok(None) => {
                    let open = state.open.take()?;
                    state.hashes[open.file] = Some(open.hash);
                }
                Err(error) => {
                    let open = state.open.take()?;
                    if open.emitted {
                        state.broken = Some(Broken {
                            file: open.file,
                            error,
                        });
                        return None;
                    }
                    state.reads[open.file].error = Some(error);
                }
            }
        }
    }

    /// Opens a file: decompression, decoding, and the skipped lines and header of a CSV file.
    fn open(&self, file: usize, f: FeedFile) -> Result<Open> {
        let hash = Arc::new(OrderedSha::default());
        let compression = Compression::from_key(&f.key).0;
        let encoding = self.source.encoding;
        let plain = compression == Compression::None && encoding.is_utf8();
        // A plain file is hashed chunk by chunk; another one as its stored bytes are read.
        let reader: Box<dyn Read + Send> = if plain {
            f.reader
        } else {
            let raw = HashRead {
                inner: f.reader,
                hash: hash.clone(),
                seq: 0,
            };
            let text: Box<dyn Read + Send> = match compression {
                Compression::None => Box::new(raw),
                Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(raw)),
                Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(raw).map_err(
                    |e| Error::Read {
                        key: f.key.clone(),
                        message: format!("cannot start zstd decoding: {e}"),
                    },
                )?),
            };
            if encoding.is_utf8() {
                text
            } else {
                // To UTF-8 (invalid sequences become U+FFFD); a BOM picks the encoding and is
                // dropped.
                Box::new(
                    encoding_rs_io::DecodeReaderBytesBuilder::new()
                        .encoding(Some(encoding.encoding()))
                        .bom_override(true)
                        .strip_bom(true)
                        .build_with_buffer(text, vec![0; 64 << 10])
                        .map_err(|e| Error::Read {
                            key: f.key.clone(),
                            message: format!("cannot start decoding {encoding:?}: {e}"),
                        })?,
                )
            }
        };
        let mut open = Open {
            file,
            key: f.key.into(),
            reader,
            hash,
            plain,
            seq: 0,
            carry: Vec::new(),
            line: 1,
            eof: false,
            mapping: None,
            doc: None,
            emitted: false,
        };
        if self.source.format == Format::Csv {
            let fill = self.chunk_bytes.min(1 << 20);
            self.fill(&mut open, fill)?;
            if open.carry.starts_with(b"\xef\xbb\xbf") {
                open.hash_now(b"\xef\xbb\xbf");
                open.carry.drain(..3);
            }
            let skip = self.source.csv.skip_rows;
            loop {
                let Some(end) = csv::skip_lines(&open.carry, skip, open.eof) else {
                    let want = fill.max(open.carry.len() * 2);
                    self.fill(&mut open, want)?;
                    continue;
                };
                open.line += memchr::memchr_iter(b'\n', &open.carry[..end]).count() as u64;
                let skipped = open.carry[..end].to_vec();
                open.hash_now(&skipped);
                open.carry.drain(..end);
                break;
            }
            loop {
                let Some((mapping, end)) = csv::read_header(
                    &self.ctx,
                    &self.source.csv,
                    &open.key,
                    &open.carry,
                    open.eof,
                )?
                else {
                    if open.eof {
                        // No header at all: an empty file.
                        open.hash_now(&open.carry.clone());
                        open.carry.clear();
                        break;
                    }
                    let want = fill.max(open.carry.len() * 2);
                    self.fill(&mut open, want)?;
                    continue;
                };
                open.line += memchr::memchr_iter(b'\n', &open.carry[..end]).count() as u64;
                let header = open.carry[..end].to_vec();
                open.hash_now(&header);
                open.carry.drain(..end);
                open.mapping = Some(Arc::new(mapping));
                break;
            }
        }
        Ok(open)
    }

    /// Reads until `carry` holds at least `want` bytes or the file ends.
    fn fill(&self, open: &mut Open, want: usize) -> Result<()> {
        while open.carry.len() < want && !open.eof {
            // Into the buffer's spare room, without zeroing it first.
            let step = (want - open.carry.len()).min(8 << 20);
            open.carry.reserve(step);
            match (&mut open.reader)
                .take(step as u64)
                .read_to_end(&mut open.carry)
            {
                Ok(n) if n < step => open.eof = true,
                Ok(_) => {}
                Err(e) => {
                    return Err(Error::Read {
                        key: open.key.to_string(),
                        message: match Compression::from_key(&open.key).0 {
                            Compression::None => format!("cannot read: {e}"),
                            Compression::Gzip => format!("truncated or corrupt gzip data: {e}"),
                            Compression::Zstd => format!("truncated or corrupt zstd data: {e}"),
                        },
                    });
                }
            }
        }
        Ok(())
    }

    /// An empty buffer, reused from a parsed chunk when there is one: its pages are already
    /// mapped, so reading into it does not fault fresh zeroed pages in.
    fn buffer(&self) -> Vec<u8> {
        self.free
            .lock()
            .ok()
            .and_then(|mut f| f.pop())
            .unwrap_or_else(|| Vec::with_capacity(self.chunk_bytes + (64 << 10)))
    }

    /// Gives a parsed chunk's buffer back.
    fn recycle(&self, mut data: Vec<u8>) {
        if let Ok(mut free) = self.free.lock()
            && free.len() < 8
            && data.capacity() <= 2 * self.chunk_bytes + (64 << 10)
        {
            data.clear();
            free.push(data);
        }
    }

    /// Reads the rest of the file.
    fn fill_all(&self, open: &mut Open) -> Result<()> {
        while !open.eof {
            let want = (open.carry.len() * 2).max(self.chunk_bytes);
            self.fill(open, want)?;
        }
        Ok(())
    }

    /// The next chunk of a JSON document, or `None` at its end: a top-level array in chunks of
    /// whole elements, any other document whole.
    fn cut_document(&self, open: &mut Open) -> Result<Option<Chunk>> {
        while open.doc.is_none() {
            match json::first_byte(&open.carry) {
                Some((_, b'[')) => open.doc = Some(Doc::Array(json::ArrayScan::new())),
                Some(_) => open.doc = Some(Doc::Whole),
                None if open.eof => open.doc = Some(Doc::Whole),
                None => {
                    let want = (open.carry.len() * 2).max(64 << 10);
                    self.fill(open, want)?;
                }
            }
        }
        let mut scan = match open.doc.take() {
            Some(Doc::Array(scan)) => scan,
            whole => {
                open.doc = whole;
                return self.cut(open);
            }
        };
        let cut = self.cut_array(open, &mut scan);
        open.doc = Some(Doc::Array(scan));
        cut
    }

    /// The next chunk of whole elements of a top-level array.
    fn cut_array(&self, open: &mut Open, scan: &mut json::ArrayScan) -> Result<Option<Chunk>> {
        let key = open.key.clone();
        let fail = |message: String| Error::Read {
            key: key.to_string(),
            message,
        };
        let mut want = self.chunk_bytes;
        let end = loop {
            if scan.closed() {
                // Only whitespace may follow the array: read it into this last chunk.
                want = open.carry.len() + self.chunk_bytes;
            }
            self.fill(open, want)?;
            scan.scan(&open.carry).map_err(fail)?;
            if open.eof {
                if let Some(why) = scan.unfinished() {
                    return Err(fail(why));
                }
                break open.carry.len();
            }
            if !scan.closed() {
                match scan.cut() {
                    0 => want = open.carry.len() * 2, // an element longer than a chunk
                    end => break end,
                }
            }
        };
        if end == 0 {
            return Ok(None);
        }
        let elements = scan.take(end);
        let first = open.line;
        open.line += elements.len() as u64;
        Ok(Some(self.chunk(open, end, first, Some(elements))))
    }

    /// The next chunk of the open file, or `None` at its end.
    fn cut(&self, open: &mut Open) -> Result<Option<Chunk>> {
        if self.source.format == Format::Json && !matches!(open.doc, Some(Doc::Whole)) {
            return self.cut_document(open);
        }
        let whole = matches!(self.source.format, Format::Json | Format::Parquet);
        let mut want = self.chunk_bytes;
        let end = loop {
            if whole {
                self.fill_all(open)?;
            } else {
                self.fill(open, want)?;
            }
            if open.eof {
                break open.carry.len();
            }
            let found = match self.source.format {
                Format::Jsonl => memchr::memrchr(b'\n', &open.carry).map(|p| p + 1),
                Format::Csv => csv_record_end(&open.carry, &self.source.csv),
                Format::Json | Format::Parquet => None,
            };
            match found {
                Some(end) if end > 0 => break end,
                // One record longer than a chunk: read more.
                _ => want = open.carry.len() * 2,
            }
        };
        if end == 0 {
            return Ok(None);
        }
        let first_line = open.line;
        if !whole {
            open.line += memchr::memchr_iter(b'\n', &open.carry[..end]).count() as u64;
        }
        Ok(Some(self.chunk(open, end, first_line, None)))
    }

    /// The first `end` bytes of the open file's buffer as a chunk.
    fn chunk(
        &self,
        open: &mut Open,
        end: usize,
        first_line: u64,
        elements: Option<Vec<(usize, usize)>>,
    ) -> Chunk {
        let mut rest = self.buffer();
        rest.extend_from_slice(&open.carry[end..]);
        let mut data = std::mem::replace(&mut open.carry, rest);
        data.truncate(end);
        Chunk {
            file: open.file,
            key: open.key.clone(),
            data,
            first_line,
            mapping: open.mapping.clone(),
            elements,
            last: open.eof && open.carry.is_empty(),
            turn: open.plain.then(|| {
                open.seq += 1;
                (open.hash.clone(), open.seq - 1)
            }),
        }
    }
}

/// One partition of the source table the query reads: it pulls chunks from the shared feed and
/// parses them on the thread that polls it, so every query thread also reads.
pub struct FeedPartition {
    feed: Arc<Feed>,
    schema: SchemaRef,
}

impl FeedPartition {
    /// A partition of `feed`'s rows.
    pub fn new(feed: Arc<Feed>) -> FeedPartition {
        let schema = feed.ctx.schema.clone();
        FeedPartition { feed, schema }
    }
}

impl std::fmt::Debug for FeedPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FeedPartition({})", self.feed.source.name)
    }
}

impl PartitionStream for FeedPartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let feed = self.feed.clone();
        let mut pending: VecDeque<RecordBatch> = VecDeque::new();
        let batches = std::iter::from_fn(move || {
            loop {
                if let Some(b) = pending.pop_front() {
                    return Some(Ok(b));
                }
                pending.extend(feed.next_rows()?.batches);
            }
        });
        Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            futures::stream::iter(batches),
        ))
    }
}

/// The end of the last complete CSV record in `data` (which starts at a record). Quote parity
/// ([`last_record_end`]) finds it unless a stray or unclosed quote inverted the parity: then the
/// newline found is inside a quoted field ([`closed_before`] tells), or none is found in more
/// than `csv.max_field_size` bytes, and a forward scan finds the true end instead.
///
/// A dialect with comment lines or an escape character is always scanned forward: parity would
/// count a comment's quotes and escaped quotes.
fn csv_record_end(data: &[u8], opts: &CsvOptions) -> Option<usize> {
    let d = csv::Dialect::of(opts);
    let (delimiter, quote, max) = (d.delimiter, d.quote, d.max);
    if !d.plain() {
        return csv::scan(data, &d, false).last_end;
    }
    match last_record_end(data, quote) {
        Some((end, 0)) => Some(end),
        Some((end, _)) if closed_before(data, end - 1, delimiter, quote) => Some(end),
        None if data.len() <= max => None,
        _ => {
            let found = csv::scan(data, &d, false);
            tracing::debug!(
                unclosed = found.bad.len(),
                "CSV quote parity does not hold: chunk end found by a forward scan"
            );
            found.last_end
        }
    }
}

/// The end of the last CSV record in `data` (which starts at a record) by quote parity: just
/// after the last newline with an even number of quotes before it, and that number. Searched from
/// the end, so that the cost is one count of the quotes, not a visit of every newline.
fn last_record_end(data: &[u8], quote: u8) -> Option<(usize, usize)> {
    let mut quotes = memchr::memchr_iter(quote, data).count();
    let mut end = data.len();
    while let Some(p) = memchr::memrchr(b'\n', &data[..end]) {
        quotes -= memchr::memchr_iter(quote, &data[p..end]).count();
        if quotes.is_multiple_of(2) {
            return Some((p + 1, quotes));
        }
        end = p;
    }
    None
}

/// Whether the quotes just before the newline at `nl` close their field, as they do at a record
/// end: the last quote (looked for in the 64 KiB before) must be followed by a delimiter or a
/// line end, and its run of quotes must close the field (an even run opens and closes it at the
/// field's start, an odd one ends a field after text). An opening quote followed by text, or a
/// doubled quote inside a field, says that parity put the newline inside a quoted field.
fn closed_before(data: &[u8], nl: usize, delimiter: u8, quote: u8) -> bool {
    let from = nl.saturating_sub(64 << 10);
    let Some(q) = memchr::memrchr(quote, &data[from..nl]).map(|q| from + q) else {
        return true;
    };
    if !matches!(data[q + 1], b'\n' | b'\r') && data[q + 1] != delimiter {
        return false;
    }
    let run = data[..=q].iter().rev().take_while(|&&b| b == quote).count();
    let first = q + 1 - run;
    let at_field_start = first == 0 || data[first - 1] == delimiter || data[first - 1] == b'\n';
    run.is_multiple_of(2) == at_field_start
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Format, SourceConfig, TextEncoding};
    use crate::generate::{Kind, sample};
    use datafusion::arrow::array::{Array, AsArray, StringArray};
    use datafusion::arrow::datatypes::Int64Type;

    fn source(format: Format) -> SourceConfig {
        SourceConfig {
            name: "s".into(),
            prefix: None,
            format,
            schema: "unused".into(),
            csv: CsvOptions::default(),
            encoding: Default::default(),
            header_case: Default::default(),
            expect_every: None,
            expect_at: None,
            timezone: None,
        }
    }

    /// (first column, line) of every row and (line, reason) of every malformed record.
    type Drained = (Vec<(String, i64)>, Vec<(u64, String)>, Option<String>);

    fn drain(feed: &Feed) -> Drained {
        let mut rows = Vec::new();
        while let Some(out) = feed.next_rows() {
            for b in out.batches {
                let first = b.column(0).as_string::<i32>().clone();
                let line = b
                    .column(b.num_columns() - 1)
                    .as_primitive::<Int64Type>()
                    .clone();
                for i in 0..b.num_rows() {
                    rows.push((value(&first, i), line.value(i)));
                }
            }
        }
        let (reads, broken) = feed.finish();
        assert!(broken.is_none());
        let sha = reads[0].sha256.clone();
        let bad = reads
            .into_iter()
            .flat_map(|r| r.malformed)
            .map(|m| (m.row, m.reason))
            .collect();
        (rows, bad, sha)
    }

    fn value(a: &StringArray, i: usize) -> String {
        if a.is_valid(i) {
            a.value(i).to_string()
        } else {
            "<null>".into()
        }
    }

    fn feed(format: Format, schema: &SourceSchema, data: &[u8], chunk: usize) -> Feed {
        let file = FeedFile {
            key: "raw/s/f".into(),
            reader: Box::new(std::io::Cursor::new(data.to_vec())),
        };
        Feed::new(&source(format), schema, vec![file], chunk)
    }

    /// Small chunks (quoted newlines and records cut at every boundary) read exactly what one
    /// chunk reads: the same rows, the same line numbers, the same malformed records.
    #[test]
    fn small_chunks_read_like_one_chunk() {
        let tickets = SourceSchema::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/support_tickets.toml"),
        )
        .unwrap();
        let logs = SourceSchema::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/app_logs.toml"),
        )
        .unwrap();
        for (format, schema, data) in [
            (Format::Csv, &tickets, sample(Kind::Tickets, 3000, 3)),
            (Format::Jsonl, &logs, sample(Kind::Logs, 3000, 3)),
        ] {
            let mut data = data.into_bytes();
            data.extend_from_slice(b"broken,\"line\n");
            let whole = drain(&feed(format, schema, &data, 1 << 30));
            let chunked = drain(&feed(format, schema, &data, 64 << 10));
            assert!(data.len() > 5 * (64 << 10));
            assert!(whole.0.len() > 2900, "{}", whole.0.len());
            assert_eq!(whole, chunked);
            assert_eq!(whole.2, Some(hex::encode(Sha256::digest(&data))));
            // A compressed file: the same rows, and the hash of its stored bytes.
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut gz, &data).unwrap();
            let gz = gz.finish().unwrap();
            let file = FeedFile {
                key: "raw/s/f.gz".into(),
                reader: Box::new(std::io::Cursor::new(gz.clone())),
            };
            let unzipped = drain(&Feed::new(&source(format), schema, vec![file], 64 << 10));
            assert_eq!((&unzipped.0, &unzipped.1), (&whole.0, &whole.1));
            assert_eq!(unzipped.2, Some(hex::encode(Sha256::digest(&gz))));
        }
    }

    /// CRLF line ends (the header's included) give the rows and lines of LF ones.
    #[test]
    fn crlf_csv_reads_like_lf() {
        let tickets = SourceSchema::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/support_tickets.toml"),
        )
        .unwrap();
        let lf = sample(Kind::Tickets, 3000, 5);
        let crlf = lf.replace('\n', "\r\n");
        let want = drain(&feed(Format::Csv, &tickets, lf.as_bytes(), 1 << 30));
        for chunk in [64 << 10, 1 << 30] {
            let got = drain(&feed(Format::Csv, &tickets, crlf.as_bytes(), chunk));
            assert_eq!((&got.0, &got.1), (&want.0, &want.1));
        }
        assert!(want.0.len() > 2900 && want.0[0].1 == 2);
    }

    fn csv_feed(schema: &SourceSchema, data: &[u8], chunk: usize, max: usize) -> Feed {
        let mut src = source(Format::Csv);
        src.csv.max_field_size = max;
        let file = FeedFile {
            key: "raw/s/f".into(),
            reader: Box::new(std::io::Cursor::new(data.to_vec())),
        };
        Feed::new(&src, schema, vec![file], chunk)
    }

    /// An unclosed quote in the benchmark's tickets (quoted bodies with newlines after it, so
    /// that quote parity is inverted from there on): only its line is rejected, in small chunks
    /// as in one, and every later row keeps its line.
    #[test]
    fn an_unclosed_quote_in_tickets_rejects_one_line() {
        let tickets = SourceSchema::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/support_tickets.toml"),
        )
        .unwrap();
        let data = sample(Kind::Tickets, 3000, 3);
        let clean = drain(&feed(Format::Csv, &tickets, data.as_bytes(), 1 << 30));
        let at = clean.0[1500].1 as u64;
        let offset = memchr::memchr_iter(b'\n', data.as_bytes())
            .nth(at as usize - 2)
            .unwrap()
            + 1;
        let mut broken = data.as_bytes()[..offset].to_vec();
        broken.extend_from_slice(b"TCK-X,2024-03-01 00:00:00,2024-03-01 00:00:00,open,low,a@b.c,Hi,\"never closed, agent001\n");
        broken.extend_from_slice(&data.as_bytes()[offset..]);
        let shift = |l: u64| if l >= at { l + 1 } else { l };
        let rows: Vec<(String, i64)> = clean
            .0
            .iter()
            .map(|(v, l)| (v.clone(), shift(*l as u64) as i64))
            .collect();
        for (chunk, max) in [(1 << 30, 1 << 20), (64 << 10, 1 << 20), (64 << 10, 4096)] {
            let got = drain(&csv_feed(&tickets, &broken, chunk, max));
            assert_eq!(got.0, rows, "chunk {chunk}, max {max}");
            let mut bad: Vec<(u64, String)> = clean
                .1
                .iter()
                .map(|(l, r)| (shift(*l), r.clone()))
                .collect();
            let unclosed = got
                .1
                .iter()
                .find(|(l, _)| *l == at)
                .unwrap_or_else(|| panic!("{:?}", got.1));
            assert!(
                unclosed
                    .1
                    .starts_with(&format!("unclosed quote at line {at}: ")),
                "{unclosed:?}"
            );
            bad.push(unclosed.clone());
            bad.sort();
            let mut got_bad = got.1.clone();
            got_bad.sort();
            assert_eq!(got_bad, bad, "chunk {chunk}, max {max}");
        }
    }

    /// An unclosed quote with no quote after it: chunks stay near their size (the feed does not
    /// read the rest of the file as one record), the line alone is rejected.
    #[test]
    fn an_unclosed_quote_does_not_grow_the_chunk_to_the_end_of_the_file() {
        let col = |n: &str| crate::source::ColumnDef::new(n, crate::source::ColumnType::String);
        let schema = SourceSchema {
            columns: vec![col("id"), col("body")],
        };
        let mut data = String::from("id,body\n");
        for i in 1..=40_000 {
            if i == 700 {
                data.push_str("700,\"broken\n");
            } else {
                data.push_str(&format!("{i},text {i}\n"));
            }
        }
        let feed = csv_feed(&schema, data.as_bytes(), 64 << 10, 4096);
        let mut biggest = 0;
        while let Some(c) = feed.next_chunk() {
            biggest = biggest.max(c.data.len());
        }
        assert!(biggest < 200 << 10, "{biggest}");
        for (chunk, max, why) in [
            (64 << 10, 4096, "runs past csv.max_field_size (4096 bytes)"),
            (1 << 30, 4096, "runs past csv.max_field_size (4096 bytes)"),
            (1 << 30, 1 << 20, "runs to the end of the file"),
        ] {
            let (rows, bad, _) = drain(&csv_feed(&schema, data.as_bytes(), chunk, max));
            assert_eq!(rows.len(), 39_999);
            assert!(
                rows.iter()
                    .all(|(v, l)| *l == v.parse::<i64>().unwrap() + 1)
            );
            assert_eq!(
                bad,
                [(
                    701,
                    format!("unclosed quote at line 701: the quoted field {why}")
                )]
            );
        }
    }

    /// Every row's (id, body, line) of a feed over an `id,body` schema, the malformed records'
    /// lines and the file's hash.
    type IdBody = (Vec<(String, String, i64)>, Vec<u64>, Option<String>);

    fn id_body(feed: &Feed) -> IdBody {
        let mut rows = Vec::new();
        while let Some(out) = feed.next_rows() {
            for b in out.batches {
                let (id, body) = (
                    b.column(0).as_string::<i32>(),
                    b.column(1).as_string::<i32>(),
                );
                let line = b.column(b.num_columns() - 1).as_primitive::<Int64Type>();
                for i in 0..b.num_rows() {
                    rows.push((value(id, i), value(body, i), line.value(i)));
                }
            }
        }
        let (reads, broken) = feed.finish();
        assert!(broken.is_none());
        let bad = reads[0].malformed.iter().map(|m| m.row).collect();
        (rows, bad, reads[0].sha256.clone())
    }

    fn id_body_schema() -> SourceSchema {
        let col = |n: &str| crate::source::ColumnDef::new(n, crate::source::ColumnType::String);
        SourceSchema {
            columns: vec![col("id"), col("body")],
        }
    }

    /// A file with `\"` escapes (an escaped backslash before a closing quote too), delimiters,
    /// newlines and `#` lines inside quotes, and comment lines with odd quotes between records:
    /// 64 KiB chunks read what one chunk reads, and what the test wrote.
    #[test]
    fn escaped_quotes_and_comments_in_small_chunks() {
        let mut data = String::from("# exported by \"tool\nid,body\n");
        let mut want = Vec::new();
        let mut line = 3;
        for i in 0..12_000 {
            if i % 40 == 0 {
                data.push_str(&format!("# section {i}: \"unbalanced\n"));
                line += 1;
            }
            let (raw, body) = match i % 3 {
                0 => (
                    format!("\"say \\\"hi {i}\\\", twice\n# not a comment\""),
                    format!("say \"hi {i}\", twice\n# not a comment"),
                ),
                1 => (format!("\"C:\\\\dir{i}\\\\\""), format!("C:\\dir{i}\\")),
                _ => (format!("plain {i}"), format!("plain {i}")),
            };
            data.push_str(&format!("{i},{raw}\n"));
            want.push((i.to_string(), body, line));
            line += 1 + raw.matches('\n').count() as i64;
        }
        assert!(data.len() > 5 * (64 << 10));
        let mut src = source(Format::Csv);
        src.csv.escape = Some('\\');
        src.csv.comment = Some('#');
        for chunk in [64 << 10, 1 << 30] {
            let file = FeedFile {
                key: "raw/s/f.csv".into(),
                reader: Box::new(std::io::Cursor::new(data.clone().into_bytes())),
            };
            let feed = Feed::new(&src, &id_body_schema(), vec![file], chunk);
            let (rows, bad, sha) = id_body(&feed);
            assert_eq!(bad, Vec::<u64>::new(), "chunk {chunk}");
            assert_eq!(rows, want, "chunk {chunk}");
            assert_eq!(sha, Some(hex::encode(Sha256::digest(data.as_bytes()))));
        }
    }

    /// Latin-1, UTF-16 (by its BOM, big-endian here) and gzipped Latin-1 files: rows decoded,
    /// lines counted in the text, `skip_rows` lines dropped, and the hash of the stored bytes.
    #[test]
    fn decoded_files_hash_their_stored_bytes() {
        let mut text = String::from("skipped line\nid,body\n");
        for i in 0..20_000 {
            text.push_str(&format!("{i},Zoë Müller-Nuñez {i}\n"));
        }
        let latin1: Vec<u8> = text.chars().map(|c| c as u32 as u8).collect();
        let mut utf16be = vec![0xfe, 0xff];
        utf16be.extend(text.encode_utf16().flat_map(u16::to_be_bytes));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &latin1).unwrap();
        let gz = gz.finish().unwrap();
        let want: Vec<(String, String, i64)> = (0..20_000)
            .map(|i| (i.to_string(), format!("Zoë Müller-Nuñez {i}"), i + 3))
            .collect();
        for (label, key, stored) in [
            ("latin1", "f.csv", &latin1),
            ("utf-16", "f.csv", &utf16be),
            ("iso-8859-1", "f.csv.gz", &gz),
        ] {
            let mut src = source(Format::Csv);
            src.csv.skip_rows = 1;
            src.encoding = toml::from_str::<std::collections::HashMap<String, TextEncoding>>(
                &format!("e = \"{label}\""),
            )
            .unwrap()["e"];
            let file = FeedFile {
                key: format!("raw/s/{key}"),
                reader: Box::new(std::io::Cursor::new(stored.clone())),
            };
            let feed = Feed::new(&src, &id_body_schema(), vec![file], 64 << 10);
            let (rows, bad, sha) = id_body(&feed);
            assert!(bad.is_empty(), "{label}: {bad:?}");
            assert_eq!(rows, want, "{label}");
            assert_eq!(sha, Some(hex::encode(Sha256::digest(stored))), "{label}");
        }
    }

    #[test]
    fn csv_records_end_outside_quotes() {
        let data = b"a,\"x\ny\",1\nb,\"\"\"q\"\"\n\",2\nc,\"open\n";
        let end = last_record_end(data, b'"').unwrap().0;
        assert_eq!(&data[..end], b"a,\"x\ny\",1\nb,\"\"\"q\"\"\n\",2\n");
        assert_eq!(last_record_end(b"\"no end\n", b'"'), None);
    }

    /// A JSON document of many elements, with strings holding `]`, `}`, `,`, escaped quotes and
    /// newlines, nested objects and arrays, and a malformed element (`truncate_at`: cut there).
    fn json_array(n: usize, bad: usize) -> String {
        let mut doc = String::from(" [\n");
        for i in 0..n {
            if i > 0 {
                doc.push_str(",\n");
            }
            if i == bad {
                doc.push_str(r#"  {"id": tru, "user": {"name": "]"}}"#);
                continue;
            }
            doc.push_str(&format!(
                r#"  {{"id": "e{i}", "text": "] }} , \" [ {{ \n\\", "user": {{"name": "u{i}", "tags": ["a]", {{"b": "}}"}}]}}}}"#
            ));
        }
        doc.push_str("\n]\n");
        doc
    }

    /// A top-level array read in small chunks of whole elements gives the rows, element numbers
    /// and rejections of the array read in one chunk, compressed or not; chunks stay small.
    #[test]
    fn a_json_array_streams_in_chunks_of_whole_elements() {
        use crate::source::{ColumnDef, ColumnType};
        let schema = SourceSchema {
            columns: vec![
                ColumnDef::new("id", ColumnType::String),
                ColumnDef {
                    path: Some("user.name".into()),
                    ..ColumnDef::new("name", ColumnType::String)
                },
            ],
        };
        let doc = json_array(6000, 1234);
        let data = doc.as_bytes();
        assert!(data.len() > 8 * (64 << 10), "{}", data.len());
        let want: Vec<(String, i64)> = (0..6000)
            .filter(|&i| i != 1234)
            .map(|i| (format!("e{i}"), i as i64 + 1))
            .collect();
        let whole = drain(&feed(Format::Json, &schema, data, 1 << 30));
        let chunked = drain(&feed(Format::Json, &schema, data, 64 << 10));
        assert_eq!(whole.0, want);
        assert_eq!(whole.1.len(), 1);
        assert_eq!(whole.1[0].0, 1235);
        assert!(whole.1[0].1.starts_with("invalid JSON"), "{:?}", whole.1);
        assert_eq!(whole, chunked);
        assert_eq!(chunked.2, Some(hex::encode(Sha256::digest(data))));
        let f = feed(Format::Json, &schema, data, 64 << 10);
        let (mut chunks, mut biggest) = (0, 0);
        while let Some(c) = f.next_chunk() {
            chunks += 1;
            biggest = biggest.max(c.data.len());
        }
        assert!(
            chunks > 8 && biggest < 128 << 10,
            "{chunks} chunks, {biggest} bytes"
        );
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, data).unwrap();
        let gz = gz.finish().unwrap();
        let file = FeedFile {
            key: "raw/s/f.json.gz".into(),
            reader: Box::new(std::io::Cursor::new(gz.clone())),
        };
        let unzipped = drain(&Feed::new(
            &source(Format::Json),
            &schema,
            vec![file],
            64 << 10,
        ));
        assert_eq!((&unzipped.0, &unzipped.1), (&whole.0, &whole.1));
        assert_eq!(unzipped.2, Some(hex::encode(Sha256::digest(&gz))));
        // A single object is one row.
        let one = drain(&feed(
            Format::Json,
            &schema,
            br#" {"id": "solo"} "#,
            64 << 10,
        ));
        assert_eq!(one.0, vec![("solo".to_string(), 1)]);
    }

    /// An array that is never closed fails its file, naming it: before any row went out (a
    /// small file) or after (a large one, which the batch then runs again without).
    #[test]
    fn a_truncated_json_array_fails_its_file() {
        let schema = SourceSchema {
            columns: vec![crate::source::ColumnDef::new(
                "id",
                crate::source::ColumnType::String,
            )],
        };
        for n in [3, 6000] {
            let doc = json_array(n, usize::MAX);
            let cut = doc.trim_end().trim_end_matches(']').len() - 20;
            let f = feed(Format::Json, &schema, &doc.as_bytes()[..cut], 64 << 10);
            let mut rows = 0;
            while let Some(out) = f.next_rows() {
                rows += out.good_rows();
            }
            let (reads, broken) = f.finish();
            let error = match (n, broken) {
                (3, None) => reads[0].error.as_ref().unwrap().to_string(),
                (_, Some(b)) => b.error.to_string(),
                (_, None) => panic!("{n} elements: no error"),
            };
            assert!(
                error.contains("raw/s/f")
                    && error.contains("truncated JSON document: the top-level array is not closed"),
                "{error}"
            );
            assert_eq!(rows == 0, n == 3, "{rows} rows");
        }
    }
}
