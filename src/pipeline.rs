//! One run of the pipeline: discover -> claim -> stream (read, query, route, dedup, write) ->
//! commit ([`crate::commit`]) -> warehouse -> archive -> report. Each source's new files form
//! one batch and one commit, or batches of `batch_files`.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::physical_plan::ExecutionPlanProperties;
use datafusion::physical_plan::streaming::PartitionStream;
use futures::StreamExt;
use object_store::ObjectMeta;

use crate::catalog::TableMeta;
use crate::config::{CatalogKind, Config, SourceConfig, TableConfig, TableFormat, WarehouseKind};
use crate::error::{Error, Result};
use crate::fault;
use crate::glue::{self, Glue};
use crate::index;
use crate::lake::{self, Lake};
use crate::ledger::{self, AttemptError, Attempts, Commit, FileOutcome, FileRecord, Ledger};
use crate::lock::{self, Holder};
use crate::progress::Progress;
use crate::report::{FileReport, FileStatus, RunReport, TableReport};
use crate::sink;
use crate::sink::stream::{RowFile, SinkOptions, TableSink};
use crate::source::feed::{Feed, FeedFile, FeedPartition};
use crate::source::{self, SOURCE_FILE, SOURCE_ROW, SourceSchema};
use crate::timeout::Deadline;
use crate::transform::{self, Counts, Router};
use crate::warehouse;
use tracing::Instrument;

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
            let schema_path = config.resolve(&source.schema);
            let schema = SourceSchema::load(&schema_path)?;
            schema
                .check_format(source.format)
                .map_err(|e| Error::config(&schema_path, format!("source {}: {e}", source.name)))?;
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

/// A run's fixed settings.
pub struct Runner<'a> {
    pub(crate) config: &'a Config,
    pub(crate) lake: Lake,
    pub(crate) me: Holder,
    pub(crate) threads: usize,
    pub(crate) ttl: Duration,
    pub(crate) wait: Duration,
    pub(crate) glue: tokio::sync::OnceCell<Option<Glue>>,
    pub(crate) only: Option<BTreeSet<String>>,
    /// `max_runtime` from the runner's start.
    pub(crate) deadline: Deadline,
    /// Raw files downloaded before their stream (to be hashed), by key: the stream reads them
    /// from here instead of downloading them again.
    pub(crate) downloaded: std::sync::Mutex<HashMap<String, Box<dyn std::io::Read + Send>>>,
    /// Results of the data checks of the batches so far, for the run report.
    pub(crate) checks: std::sync::Mutex<Vec<crate::checks::CheckResult>>,
    /// The next commit is planned under the commit lock (the last plan made beside other
    /// commits conflicted with one of them).
    pub(crate) serial: std::sync::atomic::AtomicBool,
    /// Raw files this run has dealt with (committed, failed or duplicate): a run taking batch
    /// after batch does not take them again.
    pub(crate) handled: std::sync::Mutex<std::collections::HashSet<String>>,
    /// The terminal display (hidden unless [`Runner::with_progress`]).
    pub(crate) progress: Progress,
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
            glue: tokio::sync::OnceCell::new(),
            only: None,
            deadline: Deadline::after(config.engine.max_runtime()),
            downloaded: std::sync::Mutex::new(HashMap::new()),
            serial: std::sync::atomic::AtomicBool::new(false),
            handled: std::sync::Mutex::new(std::collections::HashSet::new()),
            checks: std::sync::Mutex::new(Vec::new()),
            progress: Progress::hidden(),
        }
    }

    /// Clears the progress display (a run does it itself at its end).
    pub fn progress_done(&self) {
        self.progress.finish();
    }

    /// Shows the run's progress on `progress`.
    pub fn with_progress(mut self, progress: Progress) -> Runner<'a> {
        self.progress = progress;
        self
    }

    /// Processes only these objects (keys in the lake), as named by an event, instead of
    /// listing the sources' prefixes.
    pub fn only(mut self, keys: BTreeSet<String>) -> Runner<'a> {
        self.only = Some(keys);
        self
    }

    /// The Glue catalog, if the config asks for it.
    pub(crate) async fn glue(&self) -> Option<&Glue> {
        self.glue
            .get_or_init(|| async {
                match (&self.config.catalog.kind, &self.config.catalog.database) {
                    (CatalogKind::Glue, Some(db)) => Some(Glue::new(db).await),
                    _ => None,
                }
            })
            .await
            .as_ref()
    }

    /// Marks commit `id` as not registered in the catalog yet (before its commit point), if the
    /// lake has a catalog: [`Runner::register_catalog`] registers it.
    pub(crate) async fn mark_unregistered(&self, id: &str) -> Result<()> {
        if self.glue().await.is_some() {
            self.lake.put(&glue::marker_key(id), Vec::new()).await?;
        }
        Ok(())
    }

    /// The catalog step after the commits: registers every marked commit (this run's, and any a
    /// crashed run left). A failure is returned as the report's error: the data stands and the
    /// next run registers it.
    pub(crate) async fn register_catalog(&self) -> Option<String> {
        let glue = self.glue().await?;
        let done = glue
            .register_pending(&self.lake, &self.me.run_id, self.ttl)
            .instrument(tracing::info_span!("step", step = "catalog"))
            .await;
        match done {
            Ok(()) => None,
            Err(e) => {
                tracing::error!(error = %e, "catalog registration failed; the next run retries it");
                Some(format!(
                    "catalog: {e} (the data is committed; the next run registers it)"
                ))
            }
        }
    }

    /// Lets go of the claims this run holds (a batch that stops at `max_runtime`, or runs
    /// again): the next run takes the files again, and no attempt is counted against them.
    async fn release_claims(&self) {
        if let Err(e) = lock::unclaim(&self.lake, &self.me).await {
            tracing::warn!(error = %e, "cannot release this run's claims; they go stale");
        }
    }

    /// Ends a step: its time and the lake requests made since the last step ended.
    fn step_done(&self, report: &mut RunReport, step: &str, since: Instant) {
        report.time(step, since);
        report.add_requests(step, self.lake.take_requests());
    }

    /// Runs the whole pipeline once. Past `max_runtime` the run stops at the next safe point
    /// with the error in its report (which is saved as always); locks and claims are released.
    pub async fn run(&self) -> Result<RunReport> {
        let result = self.run_inner().await;
        self.progress.finish();
        self.lake.drop_scratch(&self.me.run_id);
        result
    }

    async fn run_inner(&self) -> Result<RunReport> {
        let mut report = RunReport::start(&self.me.run_id);
        report.s3 = self.lake.is_s3();
        self.lake.take_requests();
        let committed = self.commit_steps(&mut report).await;
        // On every way out of the commits, what they committed is registered, before the
        // warehouse (whose procedures may read the tables through Spectrum).
        if self.glue().await.is_some() {
            let t = Instant::now();
            if let Some(e) = self.register_catalog().await {
                report.errors.push(e);
            }
            self.step_done(&mut report, "catalog", t);
        }
        let steps = match committed {
            Ok(()) => self.warehouse_steps(&mut report).await,
            Err(e) => Err(e),
        };
        match steps {
            Ok(()) => {}
            Err(e @ Error::MaxRuntime { .. }) => {
                tracing::error!(error = %e, "run stopped");
                report.errors.push(e.to_string());
            }
            Err(e) => return Err(e),
        }
        report.checks = std::mem::take(&mut *self.checks.lock().unwrap_or_else(|e| e.into_inner()));
        // Requests between the steps (failed files' attempts, catalog markers).
        report.add_requests("other", self.lake.take_requests());
        report.finish();
        self.lake
            .put_report(&crate::report::run_key(&report.run_id), &report)
            .await?;
        Ok(report)
    }

    /// Recovery, then each source's batches to their commits.
    async fn commit_steps(&self, report: &mut RunReport) -> Result<()> {
        let prepared = prepare(self.config)?;
        let t = Instant::now();
        self.locked(async {
            ledger::recover(&self.lake, self.ttl)
                .instrument(tracing::info_span!("step", step = "recover"))
                .await?;
            self.lake.clean_scratch(self.ttl);
            Ok(())
        })
        .await?;
        // Claims a crashed run left behind go (the files are claimed again, or were archived).
        if let Err(e) = lock::live_claims(&self.lake, &self.me, self.ttl).await {
            tracing::warn!(error = %e, "cannot look for stale claims");
        }
        self.step_done(report, "recover", t);
        for p in &prepared {
            self.deadline
                .check(&format!("source {} (before it started)", p.source.name))?;
            self.progress
                .step(format!("{}: discovering files", p.source.name));
            // A batch another run raced (it committed some of the same files or content first)
            // committed nothing: it runs again, and those files are duplicates now.
            let mut tries = 0;
            loop {
                let done = self
                    .process_source(p, report)
                    .instrument(
                        tracing::info_span!("table", source = %p.source.name, table = %p.table.name),
                    )
                    .await;
                // Every file of the batch is committed, failed or left by now: its claims go
                // here, on every way out of the batch.
                self.release_claims().await;
                match done {
                    Err(Error::Raced { keys }) if tries < MAX_RACES => {
                        tries += 1;
                        tracing::warn!(source = %p.source.name, keys = %keys, "another run committed some of this batch's files, content or keys first; running the batch again");
                    }
                    Err(e @ Error::IndexStale { .. }) if tries < MAX_RACES => {
                        tries += 1;
                        tracing::warn!(source = %p.source.name, error = %e, "running the batch again");
                    }
                    Err(e @ Error::MaxRuntime { .. }) => return Err(e),
                    Err(e) => {
                        tracing::error!(source = %p.source.name, error = %e, "source failed");
                        report.errors.push(format!("source {}: {e}", p.source.name));
                        break;
                    }
                    // A full batch (`batch_files`): there may be more.
                    Ok(true) => {
                        tries = 0;
                        self.deadline
                            .check(&format!("source {} (before its next batch)", p.source.name))?;
                    }
                    Ok(false) => break,
                }
            }
        }
        Ok(())
    }

    /// The aggregates, then the load into a remote warehouse and its procedures.
    async fn warehouse_steps(&self, report: &mut RunReport) -> Result<()> {
        self.deadline.check("warehouse (before the aggregates)")?;
        self.progress.step("warehouse");
        let t = Instant::now();
        let built = self
            .locked(
                warehouse::refresh(self.config, &self.lake, self.threads)
                    .instrument(tracing::info_span!("step", step = "warehouse")),
            )
            .await;
        match built {
            Ok((aggs, waiting)) => {
                report.warehouse = aggs;
                report.warnings.extend(waiting);
            }
            // The commit lock was not to be had.
            Err(e @ (Error::MaxRuntime { .. } | Error::Locked { .. })) => return Err(e),
            Err(e) => {
                tracing::error!(error = %e, "warehouse failed");
                report.errors.push(format!("warehouse: {e}"));
            }
        }
        self.step_done(report, "warehouse", t);
        fault::point("warehouse");
        if self.config.warehouse.kind != WarehouseKind::Embedded {
            self.deadline.check("warehouse load (before it started)")?;
            self.progress.step("warehouse load");
            let t = Instant::now();
            let loaded = warehouse::remote::sync(
                self.config,
                &self.lake,
                &self.me,
                &self.deadline,
                &mut report.statements,
            )
            .instrument(tracing::info_span!("step", step = "warehouse-load"))
            .await;
            self.step_done(report, "warehouse load", t);
            match loaded {
                Ok(()) => {}
                Err(e @ Error::MaxRuntime { .. }) => return Err(e),
                Err(e) => {
                    tracing::error!(error = %e, "warehouse load failed");
                    report.errors.push(match e {
                        // Names its step already.
                        Error::Timeout { .. } => e.to_string(),
                        e => format!("warehouse: {e}"),
                    });
                }
            }
        }
        Ok(())
    }

    /// Finds the new files of a source (all under its prefix, or the ones named by
    /// [`Runner::only`]) and claims them (one object for the batch, [`lock::claim`]), at most
    /// `batch_files`; `true` with them if that many were taken (more may wait).
    async fn discover(
        &self,
        source: &SourceConfig,
        ledger: &mut Ledger,
    ) -> Result<(Vec<ObjectMeta>, bool)> {
        let prefix = source.raw_prefix();
        let found = match &self.only {
            None => self.lake.list(&prefix).await?,
            Some(keys) => {
                let named: Vec<&String> = keys
                    .iter()
                    .filter(|k| k.starts_with(&format!("{prefix}/")))
                    .collect();
                let keys: Vec<String> = named.iter().map(|k| k.to_string()).collect();
                let mut now = self.lake.metas(&keys).await?;
                let mut found = Vec::new();
                for key in named {
                    match now.remove(key.as_str()) {
                        Some(m) => found.push(m),
                        // Processed and archived already (a repeated event), or deleted.
                        None => tracing::info!(key = %key, "named object is gone; nothing to do"),
                    }
                }
                found
            }
        };
        let mut unarchived = Vec::new();
        let mut new = Vec::new();
        for meta in found {
            let key = meta.location.to_string();
            if !source::matches_format(&key, source.format) {
                if !lake::relative(&key, &prefix).starts_with(['.', '_']) {
                    tracing::warn!(key = %key, format = ?source.format, "ignoring a file that is not of the source's format");
                }
                continue;
            }
            match ledger.committed(&key, meta.size, meta.last_modified) {
                // Committed, but not archived (a crash after the commit): finish the job.
                Some(done) => unarchived.push(done.clone()),
                None => new.push(meta),
            }
        }
        ledger::archive_all(&self.lake, &unarchived).await?;
        // Files this run dealt with already (a run taking batch after batch) are not taken again.
        {
            let handled = self.handled.lock().unwrap_or_else(|e| e.into_inner());
            new.retain(|m| !handled.contains(m.location.as_ref()));
        }
        let mut claimed = Vec::with_capacity(new.len());
        let mut full = false;
        if !new.is_empty() {
            let keys: Vec<String> = new.iter().map(|m| m.location.to_string()).collect();
            let wait = self.deadline.cap(self.wait);
            let limit = self.config.engine.batch_files;
            let taken = match lock::claim(&self.lake, &keys, &self.me, self.ttl, wait, limit).await
            {
                Err(Error::Locked { .. }) if self.deadline.passed() => {
                    return Err(self.deadline.reached("waiting for the claims lock"));
                }
                other => other?,
            };
            full = limit.is_some_and(|n| taken.len() >= n);
            let taken: std::collections::HashSet<String> = taken.into_iter().collect();
            for meta in new {
                match taken.contains(meta.location.as_ref()) {
                    true => claimed.push(meta),
                    false => {
                        tracing::debug!(key = %meta.location, "claimed by another run, or left for the next batch")
                    }
                }
            }
        }
        // What other runs committed while this one listed and claimed. A file another run
        // committed and archived since the listing (and then let go of) is among them: its
        // ledger entry was written before its claim was dropped. An object replaced or deleted
        // since the listing is found when it is read (its ETag): it is left out then.
        if !claimed.is_empty() && ledger.refresh(&self.lake).await? > 0 {
            let (done, kept): (Vec<ObjectMeta>, Vec<ObjectMeta>) =
                claimed.into_iter().partition(|meta| {
                    ledger
                        .committed(meta.location.as_ref(), meta.size, meta.last_modified)
                        .is_some()
                });
            // (Their claims go with this run's others when the batch ends.)
            drop(done);
            claimed = kept;
        }
        Ok((claimed, full))
    }

    /// One batch of a source: `true` if it was a full batch of `batch_files` (more may wait).
    async fn process_source(&self, p: &Prepared, report: &mut RunReport) -> Result<bool> {
        let source = &p.source;
        let t = Instant::now();
        let mut ledger = Ledger::load(&self.lake).await?;
        let (claimed, full) = self.discover(source, &mut ledger).await?;
        self.step_done(report, "discover", t);
        if claimed.is_empty() {
            return Ok(full);
        }
        fault::point("claimed");

        // A file can only repeat the content of a file of the same size: those are downloaded
        // and hashed first (a few at a time; the stream reads the downloads); every other file
        // is hashed on the way through the reader.
        let t = Instant::now();
        let mut failures: Vec<(ObjectMeta, String)> = Vec::new();
        // Replaced or deleted since they were listed: left for the next run.
        let mut gone: Vec<ObjectMeta> = Vec::new();
        let mut records: Vec<FileRecord> = Vec::new();
        let mut fresh: Vec<ObjectMeta> = Vec::new();
        let mut known: HashMap<String, String> = HashMap::new();
        let mut run_shas: HashMap<String, String> = HashMap::new();
        let mut sizes: HashMap<u64, usize> = HashMap::new();
        for m in &claimed {
            *sizes.entry(m.size).or_default() += 1;
        }
        let hashed_first = |m: &ObjectMeta| ledger.sizes.contains(&m.size) || sizes[&m.size] > 1;
        let mut hashed = futures::stream::iter(claimed.iter().filter(|m| hashed_first(m)))
            .map(|m| self.lake.download_and_hash(m))
            .buffered(self.lake.concurrency());
        let mut downloaded = HashMap::new();
        for meta in &claimed {
            let key = meta.location.to_string();
            if !hashed_first(meta) {
                fresh.push(meta.clone());
                continue;
            }
            let sha = match hashed.next().await {
                Some(Ok((sha, reader))) => {
                    downloaded.insert(key.clone(), reader);
                    sha
                }
                Some(Err(e)) if lake::gone(&e) => {
                    tracing::info!(key = %key, "changed or gone since it was listed; skipping");
                    gone.push(meta.clone());
                    continue;
                }
                Some(Err(e)) => {
                    failures.push((meta.clone(), e.to_string()));
                    continue;
                }
                None => unreachable!("one hash per file hashed first"),
            };
            let duplicate_of = ledger
                .known_content(&source.name, &sha)
                .or_else(|| run_shas.get(&sha))
                .cloned();
            if duplicate_of.is_some() {
                downloaded.remove(&key);
                records.push(self.record(source, &ledger, meta, &sha, duplicate_of));
                continue;
            }
            run_shas.insert(sha.clone(), key.clone());
            known.insert(key, sha);
            fresh.push(meta.clone());
        }
        drop(hashed);
        *self.downloaded.lock().unwrap_or_else(|e| e.into_inner()) = downloaded;
        self.step_done(report, "hash", t);

        // A safe point: nothing of this batch is written yet.
        self.deadline.check(&format!(
            "source {} (before reading its files)",
            source.name
        ))?;
        // Read, query, route and write in one stream. A file that breaks half-way is left out
        // and the batch runs again without it.
        let t = Instant::now();
        let scratch = self.lake.scratch(&self.me.run_id, &source.name);
        let mut streamed = None;
        while !fresh.is_empty() {
            scratch.clear();
            match self
                .stream(p, &fresh, &scratch)
                .instrument(tracing::info_span!("step", step = "stream"))
                .await
            {
                Ok(s) => {
                    streamed = Some(s);
                    break;
                }
                Err(Failure::File(i, e)) if lake::gone(&e) => {
                    tracing::info!(key = %fresh[i].location, "changed or gone since it was listed; skipping");
                    gone.push(fresh.remove(i));
                }
                Err(Failure::File(i, e)) => failures.push((fresh.remove(i), e.to_string())),
                // A query that fails on the data of some files fails only those: the batch
                // runs again without them.
                Err(Failure::Query(e)) if fresh.len() > 1 => {
                    let bad = self.culprits(p, &fresh, &scratch).await;
                    if bad.is_empty() {
                        let msg = e.to_string();
                        failures.extend(fresh.drain(..).map(|m| (m, msg.clone())));
                    }
                    for (i, e) in bad.into_iter().rev() {
                        failures.push((fresh.remove(i), e));
                    }
                }
                Err(Failure::Query(e) | Failure::Batch(e)) => {
                    let msg = e.to_string();
                    failures.extend(fresh.drain(..).map(|m| (m, msg.clone())));
                }
            }
        }
        self.downloaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        // The claims of files gone are let go with the others when the batch ends.
        drop(gone);
        self.step_done(report, "stream", t);
        fault::point("read");
        fault::pause("read");
        if let Some(s) = &mut streamed {
            for (i, meta) in fresh.iter().enumerate() {
                let key = meta.location.to_string();
                if let Some(e) = s.unreadable.remove(&i) {
                    failures.push((meta.clone(), e.to_string()));
                    continue;
                }
                let sha = match known.get(&key).or(s.shas[i].as_ref()) {
                    Some(sha) => sha.clone(),
                    None => {
                        failures.push((meta.clone(), "the file was not read to its end".into()));
                        continue;
                    }
                };
                records.push(self.record(source, &ledger, meta, &sha, None));
            }
        }

        // Commit: planned and staged beside other runs, its commit point under the lock.
        let t = Instant::now();
        let mut committed: Option<(Commit, TableReport, HashMap<String, Counts>)> = None;
        if !records.is_empty() {
            self.progress.step(format!("{}: committing", source.name));
            // A safe point: the batch's files are in scratch only.
            let step = format!("source {} (before its commit)", source.name);
            self.deadline.check(&step)?;
            let result = self
                .commit(p, &mut ledger, &records, streamed)
                .instrument(tracing::info_span!("step", step = "commit"))
                .await;
            match result {
                Ok(c) => committed = Some(c),
                Err(
                    e @ (Error::Raced { .. }
                    | Error::IndexStale { .. }
                    | Error::MaxRuntime { .. }
                    | Error::Locked { .. }),
                ) => return Err(e),
                Err(e) => {
                    let msg = e.to_string();
                    for r in &records {
                        if let Some(meta) = claimed.iter().find(|m| m.location.as_ref() == r.key) {
                            failures.push((meta.clone(), msg.clone()));
                        }
                    }
                }
            }
        }
        // The batch's files are committed or thrown away.
        drop(scratch);
        self.step_done(report, "commit", t);

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
                    f.unclosed_quotes = c.unclosed_quotes;
                    if c.unclosed_quotes > 0 {
                        tracing::warn!(
                            key = %r.key,
                            records = c.unclosed_quotes,
                            "records with an unclosed quote rejected, each alone"
                        );
                    }
                }
                if let Some(d) = &r.duplicate_of {
                    f.error = Some(format!("same content as {d}, already ingested"));
                }
                f.moved_to = Some(r.archive_to.clone());
                f.bytes = r.size;
                report.files.push(f);
            }
            if !table_report.partitions.is_empty()
                || table_report.rows_rejected + table_report.rows_duplicate > 0
            {
                report
                    .tables
                    .entry(p.table.name.clone())
                    .or_default()
                    .add(table_report);
            }
        }
        for (meta, error) in failures {
            let key = meta.location.to_string();
            tracing::error!(key = %key, error = %error, "file failed");
            let mut f = FileReport::new(&source.name, &key, FileStatus::Failed);
            f.error = Some(error.clone());
            f.bytes = meta.size;
            f.moved_to = self.record_failure(source, &meta, &error).await?;
            report.files.push(f);
        }
        self.handled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(claimed.iter().map(|m| m.location.to_string()));
        Ok(full)
    }

    /// The ledger record of a raw file about to be committed. No request: the archive place is
    /// free unless a committed file went there (the ledger knows: only commits archive), and
    /// an earlier failure's error record is deleted with the commit whether it is there or not.
    pub(crate) fn record(
        &self,
        source: &SourceConfig,
        ledger: &Ledger,
        meta: &ObjectMeta,
        sha: &str,
        duplicate_of: Option<String>,
    ) -> FileRecord {
        let key = meta.location.to_string();
        let rel = lake::relative(&key, &source.raw_prefix());
        let today = Utc::now().date_naive();
        let mut archive_to = format!("archive/{}/{}/{rel}", source.name, today.format("%Y/%m/%d"));
        if ledger.archived.contains(&archive_to) {
            archive_to = format!("{archive_to}.{}", &sha[..8]);
        }
        // A file put back from failed/ leaves its old error behind: the commit removes it.
        let stale_error = Some(failed_key(source, &key) + ".error.json");
        FileRecord {
            source: source.name.clone(),
            key,
            size: meta.size,
            last_modified: meta.last_modified,
            sha256: sha.to_string(),
            outcome: if duplicate_of.is_some() {
                FileOutcome::Duplicate
            } else {
                FileOutcome::Processed
            },
            duplicate_of,
            archive_to,
            stale_error,
        }
    }

    /// Finds the files of a batch whose data makes the query fail, by running the query over
    /// halves of the batch (and halves of the halves that fail). Returns their indices, sorted,
    /// with each one's own error; empty if no smaller part fails (the files fail only together).
    async fn culprits(
        &self,
        p: &Prepared,
        files: &[ObjectMeta],
        scratch: &lake::Scratch,
    ) -> Vec<(usize, String)> {
        let all: Vec<usize> = (0..files.len()).collect();
        let (a, b) = all.split_at(all.len() / 2);
        let mut todo = vec![a.to_vec(), b.to_vec()];
        let mut bad = Vec::new();
        while let Some(group) = todo.pop() {
            let metas: Vec<ObjectMeta> = group.iter().map(|&i| files[i].clone()).collect();
            scratch.clear();
            let tried = self
                .stream(p, &metas, scratch)
                .instrument(tracing::info_span!("step", step = "isolate"))
                .await;
            match tried {
                Ok(_) => {}
                Err(Failure::File(j, e)) => {
                    bad.push((group[j], e.to_string()));
                    let rest: Vec<usize> =
                        group.iter().copied().filter(|&i| i != group[j]).collect();
                    if !rest.is_empty() {
                        todo.push(rest);
                    }
                }
                Err(Failure::Query(e) | Failure::Batch(e)) if group.len() == 1 => {
                    tracing::warn!(key = %files[group[0]].location, error = %e, "the query fails on this file");
                    bad.push((group[0], e.to_string()));
                }
                Err(_) => {
                    let (a, b) = group.split_at(group.len() / 2);
                    todo.push(a.to_vec());
                    todo.push(b.to_vec());
                }
            }
        }
        scratch.clear();
        bad.sort_by_key(|(i, _)| *i);
        bad.dedup_by_key(|(i, _)| *i);
        bad
    }

    /// Streams `files` through the table's query into its sink: reading, the query, routing,
    /// dedup and the partitioned write run on every thread at once, a few chunks at a time.
    async fn stream(
        &self,
        p: &Prepared,
        files: &[ObjectMeta],
        scratch: &std::path::Path,
    ) -> std::result::Result<Streamed, Failure> {
        let keys: Vec<String> = files.iter().map(|m| m.location.to_string()).collect();
        self.stream_named(p, files, keys, scratch).await
    }

    /// [`Runner::stream`] of `files` under other names (`keys`, one a file): a replay reads
    /// archived files as the raw files they were.
    pub(crate) async fn stream_named(
        &self,
        p: &Prepared,
        files: &[ObjectMeta],
        keys: Vec<String>,
        scratch: &std::path::Path,
    ) -> std::result::Result<Streamed, Failure> {
        let budget = self.config.engine.budget();
        // Downloaded a few at a time (those hashed first are downloaded already).
        let readers: Vec<Result<Box<dyn std::io::Read + Send>>> = futures::stream::iter(files)
            .map(|m| async move {
                let before = self
                    .downloaded
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(m.location.as_ref());
                match before {
                    Some(reader) => Ok(reader),
                    None => self.lake.reader_of(m).await,
                }
            })
            .buffered(self.lake.concurrency())
            .collect()
            .await;
        let reading = self.progress.reading(&p.source.name, files);
        let mut feed_files = Vec::with_capacity(files.len());
        for (i, (key, reader)) in keys.iter().zip(readers).enumerate() {
            match reader {
                Ok(reader) => feed_files.push(FeedFile {
                    key: key.clone(),
                    reader: reading.wrap(reader),
                }),
                Err(e) => return Err(Failure::File(i, e)),
            }
        }
        // Small batches get smaller chunks, so that every thread has work from the start to the
        // end.
        let total: u64 = files.iter().map(|m| m.size).sum();
        let chunk = (total / (16 * self.threads.max(1) as u64)).max(1 << 20) as usize;
        let feed = Arc::new(Feed::new(
            &p.source,
            &p.schema,
            feed_files,
            budget.chunk_bytes.min(chunk),
        ));
        let ctx = transform::session(self.threads, budget.pool_bytes);
        let partitions: Vec<Arc<dyn PartitionStream>> = (0..self.threads.max(1))
            .map(|_| Arc::new(FeedPartition::new(feed.clone())) as Arc<dyn PartitionStream>)
            .collect();
        let table = StreamingTable::try_new(p.schema.arrow_schema(), partitions)
            .map_err(|e| Failure::Batch(e.into()))?;
        ctx.register_table(p.source.name.as_str(), Arc::new(table))
            .map_err(|e| Failure::Batch(e.into()))?;
        let qerr = |e| Failure::Batch(transform::query_error(&p.query_path, &p.query, e));
        let df = ctx.sql(&p.query).await.map_err(qerr)?;
        let out_schema = df.schema().as_arrow().clone();
        transform::check_output(&p.table, &p.query_path, &out_schema)?;
        let router = Arc::new(Router::new(&p.table, &out_schema, &keys));

        // The catalog: the new output shape must be compatible with the table's.
        let data_schema = sink::schema_without(
            &router.valid_schema,
            &[SOURCE_FILE.into(), SOURCE_ROW.into()],
        );
        let mut proposed = TableMeta::new(
            &p.table.name,
            &data_schema,
            &p.table.partition_by,
            &router.rejected_schema,
        );
        proposed.delta = p.table.format == TableFormat::Delta;
        let held = TableMeta::load(&self.lake, &p.table.name).await?;
        let meta = match held {
            Some(old) => old.evolve(&proposed)?,
            None => proposed.clone(),
        };
        if let Some(glue) = self.glue().await {
            glue.check(&meta).await?;
        }
        let full = meta.full_schema()?;
        // Fingerprints of keys are those of the table's key index.
        let sip = match p.table.keyed() {
            Some(_) => index::sip_for(&self.lake, &p.table.name).await,
            None => [0, 0],
        };
        let opts = SinkOptions {
            partition_by: p.table.partition_by.clone(),
            unique_key: p.table.unique_key.clone(),
            order_by: p.table.order_by.clone(),
            compression: p.table.compression.clone(),
            buffer_bytes: budget.buffer_bytes,
            memory_limit: budget.limit,
            max_writers: budget.max_writers,
            sip,
            target_file_size: p.table.target_file_size(),
        };
        let sink = Arc::new(TableSink::new(
            opts,
            &router.valid_schema,
            &full,
            keys.len(),
            &scratch.join("table"),
        )?);
        let rejects = Arc::new(RowFile::new(
            scratch.join("rejected.parquet"),
            meta.rejected_schema()?.as_ref(),
            &p.table.compression,
        ));

        let plan = df.create_physical_plan().await.map_err(qerr)?;
        let task_ctx = ctx.task_ctx();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..plan.output_partitioning().partition_count() {
            let mut stream = plan.execute(i, task_ctx.clone()).map_err(qerr)?;
            let (router, sink, rejects) = (router.clone(), sink.clone(), rejects.clone());
            let (path, query) = (p.query_path.clone(), p.query.clone());
            tasks.spawn(async move {
                while let Some(batch) = stream.next().await {
                    let batch = batch.map_err(|e| transform::query_error(&path, &query, e))?;
                    let (valid, rejected) = router.route(&batch)?;
                    if let Some((v, keep)) = valid {
                        sink.push(&v, keep.as_ref())?;
                    }
                    if let Some(r) = rejected {
                        rejects.write(&r)?;
                    }
                }
                Ok::<(), Error>(())
            });
        }
        let mut first_error = None;
        while let Some(done) = tasks.join_next().await {
            let result = done.unwrap_or_else(|e| {
                Err(Error::State {
                    path: "query task".into(),
                    message: e.to_string(),
                })
            });
            if let Err(e) = result
                && first_error.is_none()
            {
                first_error = Some(e);
                tasks.abort_all();
            }
        }
        let (mut reads, broken) = feed.finish();
        if let Some(b) = broken {
            return Err(Failure::File(b.file, b.error));
        }
        if let Some(e) = first_error {
            return Err(Failure::Query(e));
        }
        for (i, r) in reads.iter().enumerate() {
            if let Some(b) = router.malformed(i, &r.malformed)? {
                rejects.write(&b)?;
            }
        }
        let totals: Vec<(u64, u64)> = reads
            .iter()
            .map(|r| (r.good_rows, r.malformed.len() as u64))
            .collect();
        let mut counts = router.finish(&totals)?;
        for (c, r) in counts.iter_mut().zip(&reads) {
            c.unclosed_quotes = r.malformed.iter().filter(|m| m.unclosed_quote).count() as u64;
        }
        let unreadable = reads
            .iter_mut()
            .enumerate()
            .filter_map(|(i, r)| r.error.take().map(|e| (i, e)))
            .collect();
        Ok(Streamed {
            sink,
            rejects,
            counts: keys.iter().cloned().zip(counts).collect(),
            keys,
            shas: reads.into_iter().map(|r| r.sha256).collect(),
            unreadable,
            proposed,
            full,
            sip,
        })
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
            self.lake.put_report(&akey, &attempts).await?;
            return Ok(None);
        }
        let to = failed_key(source, &key);
        self.lake.rename(&key, &to).await?;
        self.lake
            .put_report(&format!("{to}.error.json"), &attempts)
            .await?;
        self.lake.delete(&akey).await?;
        tracing::error!(key = %key, to = %to, attempts = attempts.attempts, "file moved to failed/");
        Ok(Some(to))
    }
}

/// How many times a batch another run raced runs again within one run.
const MAX_RACES: usize = 3;

/// Where a raw file goes after `max_attempts` failed runs.
fn failed_key(source: &SourceConfig, key: &str) -> String {
    let rel = lake::relative(key, &source.raw_prefix());
    format!("failed/{}/{rel}", source.name)
}

/// Why a streamed batch failed.
pub(crate) enum Failure {
    /// One file broke (index into the batch's files); the rest can run again without it.
    File(usize, Error),
    /// The query failed while it ran over the data: some file's values cause it.
    Query(Error),
    /// The batch as a whole (planning the query, the catalog, the accounting).
    Batch(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::Batch(e)
    }
}

impl Failure {
    /// The error, a broken file's naming it (`names` are the batch's files).
    pub(crate) fn into_error(self, names: &[String]) -> Error {
        match self {
            Failure::File(i, e) => Error::State {
                path: names.get(i).cloned().unwrap_or_default(),
                message: e.to_string(),
            },
            Failure::Query(e) | Failure::Batch(e) => e,
        }
    }
}

/// A batch that went through the query and its sink, waiting for its commit.
pub(crate) struct Streamed {
    pub(crate) sink: Arc<TableSink>,
    pub(crate) rejects: Arc<RowFile>,
    pub(crate) counts: HashMap<String, Counts>,
    pub(crate) keys: Vec<String>,
    pub(crate) shas: Vec<Option<String>>,
    /// Files that could not be read at all (none of their rows went out), by index.
    pub(crate) unreadable: HashMap<usize, Error>,
    pub(crate) proposed: TableMeta,
    pub(crate) full: SchemaRef,
    /// The key of its fingerprints.
    pub(crate) sip: [u64; 2],
}
