//! One run of the pipeline: discover -> claim -> read -> transform -> write + commit -> warehouse
//! -> archive -> report. Each source's new files form one batch and one commit.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
use object_store::ObjectMeta;

use crate::catalog::{REJECTED_PARTITION, TableMeta};
use crate::config::{Config, SourceConfig, TableConfig};
use crate::error::{Error, Result};
use crate::fault;
use crate::lake::{self, Lake, STATE};
use crate::ledger::{
    self, AttemptError, Attempts, COMMIT_LOCK, Commit, FileOutcome, FileRecord, Ledger, Move,
    TableChange,
};
use crate::lock::{self, Holder};
use crate::report::{FileReport, FileStatus, RunReport, TableReport};
use crate::sink::{self, TableFile};
use crate::source::{self, RawFile, ReadOutput, SOURCE_FILE, SOURCE_ROW, SourceSchema};
use crate::transform::{self, Counts};
use crate::warehouse;

/// A table with everything it needs, loaded before any work starts.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The table.
    pub table: TableConfig,
    /// Its source.
    pub source: SourceConfig,
    /// The source's schema.
    pub schema: SourceSchema,
    /// The query text.
    pub query: String,
    /// The query file.
    pub query_path: PathBuf,
}

/// Loads schemas and queries of every table; a missing file is a config error.
pub fn prepare(config: &Config) -> Result<Vec<Prepared>> {
    config
        .tables
        .iter()
        .map(|t| {
            let source = config
                .source(&t.source)
                .ok_or_else(|| Error::config(&config.path, format!("no source {}", t.source)))?
                .clone();
            let schema = SourceSchema::load(&config.resolve(&source.schema))?;
            let query_path = config.resolve(&t.query);
            let query = transform::load_query(&query_path)?;
            Ok(Prepared {
                table: t.clone(),
                source,
                schema,
                query,
                query_path,
            })
        })
        .collect()
}

/// Reports progress on a terminal.
pub struct Progress(Option<indicatif::ProgressBar>);

impl Progress {
    /// A spinner if `show`, else nothing.
    pub fn new(show: bool) -> Progress {
        Progress(show.then(|| {
            let pb = indicatif::ProgressBar::new_spinner();
            pb.enable_steady_tick(Duration::from_millis(100));
            pb
        }))
    }

    /// The current step.
    pub fn step(&self, msg: impl Into<String>) {
        if let Some(pb) = &self.0 {
            pb.set_message(msg.into());
        }
    }

    /// Removes the spinner.
    pub fn finish(&self) {
        if let Some(pb) = &self.0 {
            pb.finish_and_clear();
        }
    }
}

/// A run's fixed settings.
pub struct Runner<'a> {
    config: &'a Config,
    lake: Lake,
    me: Holder,
    threads: usize,
    ttl: Duration,
    wait: Duration,
}

impl<'a> Runner<'a> {
    /// A runner over `lake` for `run_id`.
    pub fn new(config: &'a Config, lake: Lake, run_id: &str) -> Runner<'a> {
        let threads = config.engine.threads();
        Runner {
            config,
            lake,
            me: Holder::me(run_id),
            threads,
            ttl: Duration::from_secs(config.lake.lock_ttl_secs),
            wait: Duration::from_secs(config.lake.lock_wait_secs),
        }
    }

    async fn lock(&self) -> Result<()> {
        lock::acquire(&self.lake, COMMIT_LOCK, &self.me, self.ttl, self.wait).await
    }

    async fn unlock(&self) -> Result<()> {
        lock::release(&self.lake, COMMIT_LOCK, &self.me).await
    }

    /// Runs the whole pipeline once.
    pub async fn run(&self, progress: &Progress) -> Result<RunReport> {
        let mut report = RunReport::start(&self.me.run_id);
        let prepared = prepare(self.config)?;
        let t = Instant::now();
        self.lock().await?;
        let recovered = ledger::recover(&self.lake).await;
        self.unlock().await?;
        recovered?;
        report.time("recover", t);
        for p in &prepared {
            progress.step(format!("{}: discovering files", p.source.name));
            if let Err(e) = self.process_source(p, &mut report, progress).await {
                tracing::error!(source = %p.source.name, error = %e, "source failed");
                report.errors.push(format!("source {}: {e}", p.source.name));
            }
        }
        progress.step("warehouse");
        let t = Instant::now();
        self.lock().await?;
        let built = warehouse::refresh(self.config, &self.lake, self.threads).await;
        self.unlock().await?;
        match built {
            Ok(aggs) => report.warehouse = aggs,
            Err(e) => {
                tracing::error!(error = %e, "warehouse failed");
                report.errors.push(format!("warehouse: {e}"));
            }
        }
        report.time("warehouse", t);
        fault::point("warehouse");
        report.finish();
        self.lake
            .put_json(&format!("{STATE}/runs/{}.json", report.run_id), &report)
            .await?;
        Ok(report)
    }

    /// Finds the new files of a source and claims them.
    async fn discover(&self, source: &SourceConfig, ledger: &Ledger) -> Result<Vec<ObjectMeta>> {
        let prefix = source.raw_prefix();
        let mut claimed = Vec::new();
        for meta in self.lake.list(&prefix).await? {
            let key = meta.location.to_string();
            if !source::matches_format(&key, source.format) {
                if !lake::relative(&key, &prefix).starts_with(['.', '_']) {
                    tracing::warn!(key = %key, format = ?source.format, "ignoring a file that is not of the source's format");
                }
                continue;
            }
            if let Some(done) = ledger.committed(&key, meta.size, meta.last_modified) {
                // Committed, but not archived (a crash after the commit): finish the job.
                ledger::archive(&self.lake, done).await?;
                continue;
            }
            if lock::try_acquire(&self.lake, &ledger::claim_key(&key), &self.me, self.ttl).await? {
                claimed.push(meta);
            } else {
                tracing::info!(key = %key, "claimed by another run; skipping");
            }
        }
        Ok(claimed)
    }

    async fn process_source(
        &self,
        p: &Prepared,
        report: &mut RunReport,
        progress: &Progress,
    ) -> Result<()> {
        let source = &p.source;
        let t = Instant::now();
        let ledger = Ledger::load(&self.lake).await?;
        let claimed = self.discover(source, &ledger).await?;
        report.time("discover", t);
        if claimed.is_empty() {
            return Ok(());
        }
        fault::point("claimed");
        let today = Utc::now().date_naive();
        let prefix = source.raw_prefix();

        // Read contents, spot duplicate files, decompress.
        progress.step(format!("{}: reading {} files", source.name, claimed.len()));
        let t = Instant::now();
        let mut records: Vec<FileRecord> = Vec::new();
        let mut raw_files: Vec<RawFile> = Vec::new();
        let mut failures: Vec<(ObjectMeta, String)> = Vec::new();
        let mut run_shas: HashMap<String, String> = HashMap::new();
        for meta in &claimed {
            let key = meta.location.to_string();
            let data = match self.lake.get(&key).await {
                Ok(d) => d,
                Err(e) => {
                    failures.push((meta.clone(), e.to_string()));
                    continue;
                }
            };
            let sha = ledger::sha256_hex(&data);
            let rel = lake::relative(&key, &prefix);
            let mut archive_to =
                format!("archive/{}/{}/{rel}", source.name, today.format("%Y/%m/%d"));
            if self.lake.exists(&archive_to).await? {
                archive_to = format!("{archive_to}.{}", &sha[..8]);
            }
            let duplicate_of = ledger
                .by_sha
                .get(&sha)
                .or_else(|| run_shas.get(&sha))
                .cloned()
                .or_else(|| ledger.committed_content(&key, &sha).then(|| key.clone()));
            records.push(FileRecord {
                source: source.name.clone(),
                key: key.clone(),
                size: meta.size,
                last_modified: meta.last_modified,
                sha256: sha.clone(),
                outcome: if duplicate_of.is_some() {
                    FileOutcome::Duplicate
                } else {
                    FileOutcome::Processed
                },
                duplicate_of: duplicate_of.clone(),
                archive_to,
            });
            if duplicate_of.is_some() {
                continue;
            }
            run_shas.insert(sha, key.clone());
            match source::decompress(&key, data) {
                Ok(data) => raw_files.push(RawFile { key, data }),
                Err(e) => {
                    records.pop();
                    failures.push((meta.clone(), e.to_string()));
                }
            }
        }
        let reads = {
            let src = source.clone();
            let schema = p.schema.clone();
            let threads = self.threads;
            let files = raw_files;
            tokio::task::spawn_blocking(move || {
                let out = source::read_files(&src, &schema, &files, threads);
                (files.into_iter().map(|f| f.key).collect::<Vec<_>>(), out)
            })
            .await
            .map_err(|e| Error::Read {
                key: source.name.clone(),
                message: format!("reader task failed: {e}"),
            })?
        };
        let mut outputs: Vec<(String, ReadOutput)> = Vec::new();
        for (key, out) in reads.0.into_iter().zip(reads.1) {
            match out {
                Ok(o) => outputs.push((key, o)),
                Err(e) => {
                    records.retain(|r| r.key != key);
                    if let Some(meta) = claimed.iter().find(|m| m.location.as_ref() == key) {
                        failures.push((meta.clone(), e.to_string()));
                    }
                }
            }
        }
        report.time("read", t);
        fault::point("read");

        // Transform.
        progress.step(format!("{}: transforming", source.name));
        let t = Instant::now();
        let transformed = transform_batch(p, outputs, self.threads).await;
        report.time("transform", t);
        let routed = match transformed {
            Ok(r) => Some(r),
            Err(e) => {
                // The whole batch fails: every file that had rows.
                let msg = e.to_string();
                for r in records
                    .iter()
                    .filter(|r| r.outcome == FileOutcome::Processed)
                {
                    if let Some(meta) = claimed.iter().find(|m| m.location.as_ref() == r.key) {
                        failures.push((meta.clone(), msg.clone()));
                    }
                }
                records.retain(|r| r.outcome == FileOutcome::Duplicate);
                None
            }
        };

        // Commit under the lock.
        let t = Instant::now();
        let mut committed: Option<(Commit, TableReport, HashMap<String, Counts>)> = None;
        if !records.is_empty() {
            progress.step(format!("{}: committing", source.name));
            self.lock().await?;
            let result = self.commit(p, &records, routed).await;
            let released = self.unlock().await;
            match result {
                Ok(c) => committed = Some(c),
                Err(e) => {
                    let msg = e.to_string();
                    for r in &records {
                        if let Some(meta) = claimed.iter().find(|m| m.location.as_ref() == r.key) {
                            failures.push((meta.clone(), msg.clone()));
                        }
                    }
                }
            }
            released?;
        }
        report.time("commit", t);

        // Report.
        if let Some((commit, table_report, final_counts)) = committed {
            for r in &commit.files {
                let mut f = FileReport::new(
                    &source.name,
                    &r.key,
                    match r.outcome {
                        FileOutcome::Processed => FileStatus::Processed,
                        FileOutcome::Duplicate => FileStatus::Duplicate,
                    },
                );
                if let Some(c) = final_counts.get(&r.key) {
                    f.rows_read = c.read;
                    f.rows_written = c.written;
                    f.rows_rejected = c.rejected;
                    f.rows_duplicate = c.duplicate;
                }
                if let Some(d) = &r.duplicate_of {
                    f.error = Some(format!("same content as {d}, already ingested"));
                }
                f.moved_to = Some(r.archive_to.clone());
                report.files.push(f);
            }
            if !table_report.partitions.is_empty()
                || table_report.rows_rejected + table_report.rows_duplicate > 0
            {
                report.tables.insert(p.table.name.clone(), table_report);
            }
        }
        for (meta, error) in failures {
            let key = meta.location.to_string();
            tracing::error!(key = %key, error = %error, "file failed");
            let mut f = FileReport::new(&source.name, &key, FileStatus::Failed);
            f.error = Some(error.clone());
            f.moved_to = self.record_failure(source, &meta, &error).await?;
            self.lake.delete(&ledger::claim_key(&key)).await?;
            report.files.push(f);
        }
        Ok(())
    }

    /// Writes, commits and publishes one batch. Call with the commit lock held.
    async fn commit(
        &self,
        p: &Prepared,
        records: &[FileRecord],
        routed: Option<transform::Routed>,
    ) -> Result<(Commit, TableReport, HashMap<String, Counts>)> {
        let table = &p.table;
        let mut hasher_input = format!("{}\n{}\n", table.name, p.query);
        let mut sorted: Vec<&FileRecord> = records.iter().collect();
        sorted.sort_by(|a, b| a.key.cmp(&b.key));
        for r in &sorted {
            hasher_input.push_str(&format!("{} {}\n", r.key, r.sha256));
        }
        let id = ledger::sha256_hex(hasher_input.as_bytes())[..24].to_string();
        let mut change = TableChange {
            table: table.name.clone(),
            ..Default::default()
        };
        let mut table_report = TableReport::default();
        // Per-file counts; a commit of duplicate files only has none.
        let mut counts = routed
            .as_ref()
            .map(|r| r.counts.clone())
            .unwrap_or_default();
        let mut catalog_update = None;
        let mut staged: Vec<(String, bytes::Bytes)> = Vec::new();

        if let Some(routed) = routed {
            let processed = lake::processed_prefix(&table.name);
            // Catalog: the new output shape must be compatible with the table's.
            let data_schema = sink::schema_without(
                &routed.valid_schema,
                &[SOURCE_FILE.into(), SOURCE_ROW.into()],
            );
            let rejected_file_schema = sink::schema_without(&routed.rejected_schema, &[]);
            let proposed = TableMeta::new(
                &table.name,
                &data_schema,
                &table.partition_by,
                &rejected_file_schema,
            );
            let meta = match TableMeta::load(&self.lake, &table.name).await? {
                Some(old) => old.evolve(&proposed)?,
                None => proposed,
            };
            let full = meta.full_schema()?;
            let with_lineage = with_lineage(&full);
            let mut valid = routed
                .valid
                .iter()
                .map(|b| sink::conform(b, &with_lineage))
                .collect::<Result<Vec<_>>>()?;
            let partition_types = meta.partition_types()?;
            let existing = sink::table_files(&self.lake, &processed).await?;
            let mut rewrite = BTreeMap::new();
            if let Some(order_by) = &table.order_by
                && !existing.is_empty()
            {
                let plan = sink::plan_merge(
                    &self.lake,
                    &existing,
                    &partition_types,
                    &full,
                    &valid,
                    &table.unique_key,
                    order_by,
                )
                .await?;
                let mut kept = Vec::new();
                for (b, mask) in valid.iter().zip(&plan.keep_new) {
                    transform::count_dropped_duplicates(b, mask, &routed.files, &mut counts);
                    kept.push(datafusion::arrow::compute::filter_record_batch(b, mask)?);
                }
                valid = kept;
                rewrite = plan.rewrite;
            }
            // Rows per partition: the new rows, plus the survivors of rewritten partitions.
            let new_rows: Vec<RecordBatch> = valid
                .iter()
                .map(|b| sink::drop_columns(b, &[SOURCE_FILE.into(), SOURCE_ROW.into()]))
                .collect::<Result<_>>()?;
            let mut parts = sink::split_partitions(&new_rows, &table.partition_by)?;
            let file_schema = meta.file_schema()?;
            for (dir, drop) in &rewrite {
                let files: Vec<TableFile> =
                    existing.iter().filter(|f| &f.dir == dir).cloned().collect();
                let survivors = sink::surviving_rows(
                    &self.lake,
                    &files,
                    &partition_types,
                    &full,
                    &table.unique_key,
                    drop,
                )
                .await?;
                table_report.rows_replaced += drop.len() as u64;
                let survivors: Vec<RecordBatch> = survivors
                    .iter()
                    .map(|b| sink::drop_columns(b, &table.partition_by))
                    .collect::<Result<_>>()?;
                parts.entry(dir.clone()).or_default().extend(survivors);
                change.removed.extend(files.into_iter().map(|f| f.key));
                change.partitions.push(dir.clone());
            }
            let encoded = encode_all(&file_schema, parts, &table.compression, self.threads).await?;
            for (dir, data) in encoded {
                let name = format!("{dir}/part-{id}.parquet");
                let name = name.trim_start_matches('/');
                let to = format!("{processed}/{name}");
                let from = format!("{}/{to}", ledger::staging_prefix(&id));
                staged.push((from.clone(), data));
                change.added.push(Move { from, to });
                change.partitions.push(dir);
            }
            // Rejected rows.
            let rejected_schema = meta_rejected_schema(&meta)?;
            let rejected: Vec<RecordBatch> = routed
                .rejected
                .iter()
                .map(|b| sink::conform(b, &rejected_schema))
                .collect::<Result<_>>()?;
            if rejected.iter().any(|b| b.num_rows() > 0) {
                let data = sink::encode_parquet(&rejected_schema, &rejected, &table.compression)?;
                let to = format!(
                    "{}/{}/part-{id}.parquet",
                    lake::rejected_prefix(&table.name),
                    lake::segment(&format!("{REJECTED_PARTITION}={}", Utc::now().date_naive()))
                );
                let from = format!("{}/{to}", ledger::staging_prefix(&id));
                staged.push((from.clone(), data));
                change.added.push(Move { from, to });
            }
            change.partitions.sort();
            change.partitions.dedup();
            catalog_update = Some(meta);
        }
        for c in counts.values() {
            table_report.rows_written += c.written;
            table_report.rows_rejected += c.rejected;
            table_report.rows_duplicate += c.duplicate;
        }
        table_report.partitions = change.partitions.clone();
        let commit = Commit {
            id: id.clone(),
            run_id: self.me.run_id.clone(),
            created_at: Utc::now(),
            files: records.to_vec(),
            tables: vec![change],
        };
        self.lake
            .put_json(&ledger::pending_key(&id), &commit)
            .await?;
        for (key, data) in staged {
            self.lake.put(&key, data).await?;
        }
        fault::point("staged");
        if let Some(meta) = catalog_update {
            meta.save(&self.lake).await?;
        }
        // The commit point.
        let mut entry = serde_json::to_value(&commit).map_err(|e| Error::State {
            path: ledger::ledger_key(&id),
            message: e.to_string(),
        })?;
        entry["counts"] = serde_json::to_value(
            counts
                .iter()
                .map(|(k, c)| (k.clone(), [c.read, c.written, c.rejected, c.duplicate]))
                .collect::<BTreeMap<_, _>>(),
        )
        .unwrap_or_default();
        self.lake.put_json(&ledger::ledger_key(&id), &entry).await?;
        fault::point("committed");
        ledger::publish(&self.lake, &commit).await?;
        fault::point("archived");
        self.lake.delete(&ledger::pending_key(&id)).await?;
        Ok((commit, table_report, counts))
    }

    /// Counts a failed attempt; after `max_attempts` moves the file to `failed/`.
    async fn record_failure(
        &self,
        source: &SourceConfig,
        meta: &ObjectMeta,
        error: &str,
    ) -> Result<Option<String>> {
        let key = meta.location.to_string();
        let akey = ledger::attempts_key(&key);
        let mut attempts: Attempts = self
            .lake
            .get_json(&akey)
            .await?
            .unwrap_or_else(|| Attempts {
                key: key.clone(),
                ..Default::default()
            });
        attempts.attempts += 1;
        attempts.errors.push(AttemptError {
            run_id: self.me.run_id.clone(),
            at: Utc::now(),
            error: error.to_string(),
        });
        if attempts.attempts < self.config.retry.max_attempts {
            self.lake.put_json(&akey, &attempts).await?;
            return Ok(None);
        }
        let rel = lake::relative(&key, &source.raw_prefix()).to_string();
        let to = format!("failed/{}/{rel}", source.name);
        self.lake.rename(&key, &to).await?;
        self.lake
            .put_json(&format!("{to}.error.json"), &attempts)
            .await?;
        self.lake.delete(&akey).await?;
        tracing::error!(key = %key, to = %to, attempts = attempts.attempts, "file moved to failed/");
        Ok(Some(to))
    }
}

/// Runs the table's query over the files' rows, routes its output and deduplicates by
/// `unique_key`: everything a batch goes through before it meets the table.
pub async fn transform_batch(
    p: &Prepared,
    outputs: Vec<(String, ReadOutput)>,
    threads: usize,
) -> Result<transform::Routed> {
    let ctx = transform::session(threads);
    let mut batches = Vec::new();
    let mut reads = Vec::new();
    for (key, out) in outputs {
        reads.push((key, out.good_rows(), out.malformed));
        batches.extend(out.batches);
    }
    transform::register_batches(
        &ctx,
        &p.source.name,
        p.schema.arrow_schema(),
        batches,
        threads,
    )?;
    let qerr = |e| transform::query_error(&p.query_path, &p.query, e);
    let df = ctx.sql(&p.query).await.map_err(qerr)?;
    let out_schema = df.schema().as_arrow().clone();
    transform::check_output(&p.table, &p.query_path, &out_schema)?;
    let output = df.collect().await.map_err(qerr)?;
    let mut routed = transform::route(&p.table, output, &out_schema, &reads)?;
    if let Some(order_by) = &p.table.order_by {
        let valid = std::mem::take(&mut routed.valid);
        routed.valid = sink::dedup::dedup_batch(
            &routed.valid_schema,
            valid,
            &p.table.unique_key,
            order_by,
            &routed.files,
            &mut routed.counts,
        )?;
    }
    Ok(routed)
}

/// The schema plus the lineage columns (as the routed valid batches have them).
fn with_lineage(schema: &Schema) -> SchemaRef {
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(
        SOURCE_FILE,
        datafusion::arrow::datatypes::DataType::Int32,
        false,
    ));
    fields.push(Field::new(
        SOURCE_ROW,
        datafusion::arrow::datatypes::DataType::Int64,
        false,
    ));
    Arc::new(Schema::new(fields))
}

fn meta_rejected_schema(meta: &TableMeta) -> Result<SchemaRef> {
    let fields = meta
        .rejected_columns
        .iter()
        .map(|c| {
            let ty = std::str::FromStr::from_str(&c.ty).map_err(
                |e: datafusion::arrow::error::ArrowError| Error::State {
                    path: format!("catalog of {}", meta.name),
                    message: e.to_string(),
                },
            )?;
            Ok(Field::new(&c.name, ty, true))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Arc::new(Schema::new(fields)))
}

/// One partition folder's encoded file, or why it could not be encoded.
type EncodedPart = Result<(String, bytes::Bytes)>;

/// Encodes every partition's rows as Parquet on `threads` threads.
async fn encode_all(
    schema: &SchemaRef,
    parts: BTreeMap<String, Vec<RecordBatch>>,
    compression: &str,
    threads: usize,
) -> Result<Vec<(String, bytes::Bytes)>> {
    let schema = sink::nullable(schema);
    let compression = compression.to_string();
    let jobs: Vec<(String, Vec<RecordBatch>)> = parts
        .into_iter()
        .filter(|(_, b)| b.iter().any(|b| b.num_rows() > 0))
        .collect();
    tokio::task::spawn_blocking(move || {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results: std::sync::Mutex<Vec<(usize, EncodedPart)>> =
            std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..threads.max(1).min(jobs.len().max(1)) {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((dir, batches)) = jobs.get(i) else {
                            break;
                        };
                        let r = batches
                            .iter()
                            .map(|b| sink::conform(b, &schema))
                            .collect::<Result<Vec<_>>>()
                            .and_then(|bs| sink::encode_parquet(&schema, &bs, &compression))
                            .map(|d| (dir.clone(), d));
                        if let Ok(mut v) = results.lock() {
                            v.push((i, r));
                        }
                    }
                });
            }
        });
        let mut results = results.into_inner().unwrap_or_default();
        results.sort_by_key(|(i, _)| *i);
        if results.len() != jobs.len() {
            return Err(Error::State {
                path: "parquet encoder".into(),
                message: "an encoder thread failed".into(),
            });
        }
        results.into_iter().map(|(_, r)| r).collect()
    })
    .await
    .map_err(|e| Error::State {
        path: "parquet encoder".into(),
        message: e.to_string(),
    })?
}
