//! The lake: an object store (a local folder or an S3 bucket and prefix) and the layout of its
//! prefixes.
//!
//! Everything sluice reads or writes in the lake goes through [`Lake`], so the same code serves
//! a folder and `s3://bucket/prefix`. Files in the making live in a local scratch folder (on the
//! lake's own disk for a folder lake, so they move into place without a copy; in the OS temp
//! folder for S3, uploaded in parts).

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::buffered::BufWriter;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{
    ClientOptions, GetOptions, GetRange, GetResultPayload, ObjectMeta, ObjectStore, ObjectStoreExt,
    PutMode, PutOptions, PutPayload,
};
use tokio::io::AsyncWriteExt;

use crate::config::Timeouts;
use crate::error::{Error, Result};
use crate::requests::{Counting, Requests};

/// Where the pipeline keeps its own state.
pub const STATE: &str = "_sluice";

/// A Delta table's symlink manifests (`<table>/_symlink_format_manifest/<partition>/manifest`),
/// which Redshift Spectrum and Athena read.
pub const SYMLINK_MANIFESTS: &str = "_symlink_format_manifest";

/// Where a lake is.
#[derive(Debug, Clone)]
enum Root {
    /// A local folder (canonical path).
    Folder(PathBuf, Arc<LocalFileSystem>),
    /// An S3 bucket, a key prefix (no slashes at either end; may be empty) and the
    /// bucket-wide store that DataFusion reads through.
    S3 {
        bucket: String,
        prefix: String,
        bucket_store: Arc<dyn ObjectStore>,
    },
}

/// A lake root and the store behind it.
#[derive(Debug, Clone)]
pub struct Lake {
    /// The store, rooted at the lake root: keys are relative to it.
    store: Arc<dyn ObjectStore>,
    root: Root,
    scratch: PathBuf,
    /// The requests made through `store` (and the bucket store) so far.
    requests: Arc<Requests>,
    /// How many requests the lake's per-file work keeps in flight at most.
    concurrency: usize,
}

/// The default of `[lake] max_concurrent_requests`.
pub const DEFAULT_CONCURRENCY: usize = 32;

impl Lake {
    /// Opens a lake: `s3://bucket/prefix` or a local folder (created if needed); S3 requests
    /// give up after the `timeouts` (connect, and each request with its answer).
    pub async fn open(location: &str, timeouts: &Timeouts) -> Result<Lake> {
        match location.strip_prefix("s3://") {
            Some(rest) => Lake::open_s3(rest, timeouts).await,
            None => Lake::open_local(FsPath::new(location)),
        }
    }

    /// Opens (creating if needed) a lake in a local folder.
    pub fn open_local(root: &FsPath) -> Result<Lake> {
        std::fs::create_dir_all(root)
            .map_err(|e| Error::io(format!("cannot create lake folder {}", root.display()), e))?;
        let root = root
            .canonicalize()
            .map_err(|e| Error::io(format!("cannot open lake folder {}", root.display()), e))?;
        let local = Arc::new(LocalFileSystem::new_with_prefix(&root)?);
        let requests = Arc::new(Requests::default());
        Ok(Lake {
            store: Arc::new(Counting::new(local.clone(), requests.clone())),
            scratch: root.join(STATE).join("tmp"),
            root: Root::Folder(root, local),
            requests,
            concurrency: DEFAULT_CONCURRENCY,
        })
    }

    /// Opens a lake in S3 (`bucket/prefix` after `s3://`), with the SDK's credentials, region
    /// and endpoint (`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`).
    async fn open_s3(rest: &str, timeouts: &Timeouts) -> Result<Lake> {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/').to_string();
        if bucket.is_empty() {
            return Err(Error::Store(object_store::Error::Generic {
                store: "S3",
                source: format!("\"s3://{rest}\" names no bucket").into(),
            }));
        }
        let region = crate::aws::region()
            .await
            .unwrap_or_else(|_| "us-east-1".to_string());
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(region)
            .with_credentials(Arc::new(crate::aws::S3Credentials))
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(timeouts.connect)
                    .with_timeout(timeouts.request),
            );
        if let Some(endpoint) = crate::aws::endpoint_url("s3") {
            builder = builder
                .with_allow_http(endpoint.starts_with("http://"))
                .with_endpoint(endpoint);
        }
        let requests = Arc::new(Requests::default());
        let bucket_store: Arc<dyn ObjectStore> =
            Arc::new(Counting::new(Arc::new(builder.build()?), requests.clone()));
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            bucket_store.clone()
        } else {
            Arc::new(PrefixStore::new(bucket_store.clone(), prefix.as_str()))
        };
        Ok(Lake {
            store,
            scratch: std::env::temp_dir().join("sluice-scratch"),
            root: Root::S3 {
                bucket: bucket.to_string(),
                prefix,
                bucket_store,
            },
            requests,
            concurrency: DEFAULT_CONCURRENCY,
        })
    }

    /// Keeps at most `n` requests in flight in the per-file work of a run (claims, reads,
    /// archive moves; `[lake] max_concurrent_requests`).
    pub fn with_max_concurrent_requests(mut self, n: usize) -> Lake {
        self.concurrency = n.max(1);
        self
    }

    /// How many requests the per-file work keeps in flight at most.
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// The requests made since the last call, per kind (`GET`, `HEAD`, `PUT`, ...).
    pub fn take_requests(&self) -> std::collections::BTreeMap<String, u64> {
        self.requests.take()
    }

    /// Where the lake is, for people: a folder or `s3://bucket/prefix`.
    pub fn location(&self) -> String {
        match &self.root {
            Root::Folder(p, _) => p.display().to_string(),
            Root::S3 { bucket, prefix, .. } => format!("s3://{bucket}/{prefix}")
                .trim_end_matches('/')
                .to_string(),
        }
    }

    /// The lake key of an object named by bucket and key: `None` when it is outside the lake
    /// (another bucket, or not under the lake's prefix). A folder lake takes keys as relative.
    pub fn key_of(&self, bucket: &str, key: &str) -> Option<String> {
        match &self.root {
            Root::Folder(..) => Some(key.trim_start_matches('/').to_string()),
            Root::S3 { bucket: b, .. } if b != bucket => None,
            Root::S3 { prefix, .. } if prefix.is_empty() => Some(key.to_string()),
            Root::S3 { prefix, .. } => key
                .strip_prefix(prefix.as_str())
                .and_then(|k| k.strip_prefix('/'))
                .map(str::to_string),
        }
    }

    /// Whether the lake is in S3.
    pub fn is_s3(&self) -> bool {
        matches!(self.root, Root::S3 { .. })
    }

    /// A URL for a prefix (ends with `/`): `file:///...` or `s3://bucket/...`, for DataFusion's
    /// listing tables and for catalog locations.
    pub fn url(&self, prefix: &str) -> String {
        let mut url = self.object_url(prefix);
        if !url.ends_with('/') {
            url.push('/');
        }
        url
    }

    /// The bucket of an S3 lake (`None` for a folder).
    pub fn bucket(&self) -> Option<&str> {
        match &self.root {
            Root::S3 { bucket, .. } => Some(bucket),
            Root::Folder(..) => None,
        }
    }

    /// The bucket-wide store of an S3 lake (`None` for a folder).
    pub fn bucket_store(&self) -> Option<Arc<dyn ObjectStore>> {
        match &self.root {
            Root::S3 { bucket_store, .. } => Some(bucket_store.clone()),
            Root::Folder(..) => None,
        }
    }

    /// The URL of one object: `file:///...` or `s3://bucket/...` (COPY manifests).
    pub fn object_url(&self, key: &str) -> String {
        match &self.root {
            Root::Folder(root, _) => format!("file://{}", root.join(key).to_string_lossy()),
            Root::S3 { bucket, prefix, .. } if prefix.is_empty() => format!("s3://{bucket}/{key}"),
            Root::S3 { bucket, prefix, .. } => format!("s3://{bucket}/{prefix}/{key}"),
        }
    }

    /// Lets a DataFusion session read the lake's URLs (a folder needs nothing).
    pub fn attach(&self, ctx: &datafusion::prelude::SessionContext) -> Result<()> {
        self.attach_runtime(&ctx.runtime_env())
    }

    /// [`Lake::attach`] for a runtime (a distributed worker's, shared by its queries).
    pub fn attach_runtime(
        &self,
        runtime: &datafusion::execution::runtime_env::RuntimeEnv,
    ) -> Result<()> {
        if let Root::S3 {
            bucket,
            bucket_store,
            ..
        } = &self.root
        {
            let url = url::Url::parse(&format!("s3://{bucket}")).map_err(|e| Error::State {
                path: format!("s3://{bucket}"),
                message: e.to_string(),
            })?;
            runtime.register_object_store(&url, bucket_store.clone());
        }
        Ok(())
    }

    /// Makes sure a prefix can be listed as a table (a folder lake needs the folder).
    pub fn ensure_prefix(&self, prefix: &str) -> Result<()> {
        if let Root::Folder(root, _) = &self.root {
            let dir = root.join(prefix);
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
        }
        Ok(())
    }

    /// The object store itself.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Every object under `prefix`, sorted by key.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let prefix = path(prefix);
        let mut out: Vec<ObjectMeta> = self.store.list(Some(&prefix)).try_collect().await?;
        out.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(out)
    }

    /// The whole content of an object.
    pub async fn get(&self, key: &str) -> Result<Bytes> {
        Ok(self.store.get(&path(key)).await?.bytes().await?)
    }

    /// Bytes `range` of an object.
    pub async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> Result<Bytes> {
        Ok(self.store.get_range(&path(key), range).await?)
    }

    /// Several ranges of an object (object_store coalesces close ones into one request).
    pub async fn get_ranges(
        &self,
        key: &str,
        ranges: &[std::ops::Range<u64>],
    ) -> Result<Vec<Bytes>> {
        Ok(self.store.get_ranges(&path(key), ranges).await?)
    }

    /// An object as a local file, as [`Lake::reader_of`] reads it (a folder lake's file in
    /// place, a remote object downloaded), for a key not listed first.
    pub async fn local_file(&self, key: &str) -> Result<std::fs::File> {
        let meta = self.store.head(&path(key)).await?;
        let meta = ObjectMeta {
            location: path(key),
            ..meta
        };
        self.file_of(&meta).await
    }

    /// A reader of the object `meta` names, as listed: a local file is read in place; a remote
    /// object is downloaded into an unnamed scratch file first (bounded memory, whatever its
    /// size), in one request when it is at most [`DOWNLOAD_RANGE`] bytes, else in ranges of
    /// that size, so that each request ends well within the request timeout. Every request
    /// asks for the listed version (its ETag): an object replaced since it was listed is
    /// `Error::Store(Precondition)` and one deleted `Error::Store(NotFound)` ([`gone`]).
    pub async fn reader_of(&self, meta: &ObjectMeta) -> Result<Box<dyn std::io::Read + Send>> {
        Ok(Box::new(self.file_of(meta).await?))
    }

    /// The file [`Lake::reader_of`] reads.
    async fn file_of(&self, meta: &ObjectMeta) -> Result<std::fs::File> {
        let key = meta.location.as_ref();
        let fail = |e| Error::io(format!("cannot download {key} to scratch"), e);
        let p = &meta.location;
        if !self.is_s3() || meta.size <= DOWNLOAD_RANGE {
            let opts = GetOptions {
                if_match: meta.e_tag.clone(),
                ..Default::default()
            };
            let got = self.store.get_opts(p, opts).await?;
            return match got.payload {
                GetResultPayload::File(file, _) => Ok(file),
                GetResultPayload::Stream(mut stream) => {
                    std::fs::create_dir_all(&self.scratch).map_err(fail)?;
                    let mut file = tempfile::tempfile_in(&self.scratch).map_err(fail)?;
                    while let Some(part) = stream.try_next().await? {
                        file.write_all(&part).map_err(fail)?;
                    }
                    file.seek(SeekFrom::Start(0)).map_err(fail)?;
                    Ok(file)
                }
            };
        }
        tracing::debug!(key, size = meta.size, "downloading in ranges");
        std::fs::create_dir_all(&self.scratch).map_err(fail)?;
        let mut file = tempfile::tempfile_in(&self.scratch).map_err(fail)?;
        let mut start = 0u64;
        while start < meta.size {
            let opts = GetOptions {
                range: Some(GetRange::Bounded(
                    start..(start + DOWNLOAD_RANGE).min(meta.size),
                )),
                // The same version of the object throughout.
                if_match: meta.e_tag.clone(),
                ..Default::default()
            };
            let mut stream = self.store.get_opts(p, opts).await?.into_stream();
            let before = start;
            while let Some(part) = stream.try_next().await? {
                file.write_all(&part).map_err(fail)?;
                start += part.len() as u64;
            }
            if start == before {
                return Err(Error::Read {
                    key: key.to_string(),
                    message: format!("the object ended at byte {start} of {}", meta.size),
                });
            }
        }
        file.seek(SeekFrom::Start(0)).map_err(fail)?;
        Ok(file)
    }

    /// Reads the object `meta` names ([`Lake::reader_of`], one request for a small object)
    /// and hashes it: its SHA-256 (hex) and a reader of it from the start, for the stream.
    pub async fn download_and_hash(
        &self,
        meta: &ObjectMeta,
    ) -> Result<(String, Box<dyn std::io::Read + Send>)> {
        let key = meta.location.as_ref();
        let (sha, mut file) = hash(key, self.file_of(meta).await?).await?;
        file.seek(SeekFrom::Start(0))
            .map_err(|e| Error::io(format!("cannot read {key} again"), e))?;
        Ok((sha, Box::new(file)))
    }

    /// A local folder for a run's files in the making (on the lake's own disk, so that they
    /// move into place without a copy), removed when the [`Scratch`] is dropped.
    pub fn scratch(&self, run_id: &str, name: &str) -> Scratch {
        Scratch(self.scratch.join(run_id).join(name))
    }

    /// Removes a run's scratch folder (at the end of the run, whatever its outcome).
    pub fn drop_scratch(&self, run_id: &str) {
        let _ = std::fs::remove_dir_all(self.scratch.join(run_id));
    }

    /// Removes scratch folders of runs that ended more than `age` ago (crashed runs).
    pub fn clean_scratch(&self, age: std::time::Duration) {
        let Ok(dirs) = std::fs::read_dir(&self.scratch) else {
            return;
        };
        for d in dirs.flatten() {
            let old = d
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| t.elapsed().unwrap_or_default() > age)
                .unwrap_or(false);
            if old {
                let _ = std::fs::remove_dir_all(d.path());
            }
        }
    }

    /// Moves a local file into the lake as `key`: a rename on the lake's own disk, else an
    /// upload (in 8 MiB parts when it is larger than that), then the local file is removed.
    pub async fn put_file(&self, key: &str, file: &FsPath) -> Result<()> {
        if let Root::Folder(_, local) = &self.root {
            let target = local.path_to_filesystem(&path(key))?;
            if let Some(dir) = target.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
            }
            if std::fs::rename(file, &target).is_ok() {
                return Ok(());
            }
        }
        let fail = |e| Error::io(format!("cannot upload {} to {key}", file.display()), e);
        let mut input = tokio::fs::File::open(file).await.map_err(fail)?;
        let mut upload = BufWriter::with_capacity(self.store.clone(), path(key), 8 << 20);
        tokio::io::copy(&mut input, &mut upload)
            .await
            .map_err(fail)?;
        if let Err(e) = upload.shutdown().await {
            upload.abort().await.ok();
            return Err(fail(e));
        }
        tokio::fs::remove_file(file).await.ok();
        Ok(())
    }

    /// The content of an object, or `None` if there is none.
    pub async fn get_opt(&self, key: &str) -> Result<Option<Bytes>> {
        match self.store.get(&path(key)).await {
            Ok(r) => Ok(Some(r.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Metadata of an object, or `None` if there is none.
    pub async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        match self.store.head(&path(key)).await {
            // Keyed as in a listing (a prefixed store's head answers with the full path).
            Ok(m) => Ok(Some(ObjectMeta {
                location: path(key),
                ..m
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The metadata of each of `keys` that exists now (keyed as given). In S3, when the keys
    /// share a folder, by listing it from the first key to the last (1,000 keys a request) as
    /// long as that takes fewer requests than a `HEAD` each; the keys the listing did not reach
    /// then get their `HEAD`, [`Lake::concurrency`] at a time.
    pub async fn metas(&self, keys: &[String]) -> Result<HashMap<String, ObjectMeta>> {
        let mut out = HashMap::with_capacity(keys.len());
        let mut rest: Vec<&String> = keys.iter().collect();
        rest.sort();
        rest.dedup();
        if self.is_s3() && rest.len() > 2 {
            let (first, last) = (rest[0], rest[rest.len() - 1]);
            let common = first
                .bytes()
                .zip(last.bytes())
                .take_while(|(a, b)| a == b)
                .count();
            // The folder both (and so every key between them) are in.
            if let Some(end) = first[..common].rfind('/') {
                let folder = path(&first[..end]);
                // A listing page costs a request: stop before it costs as many as the HEADs.
                let budget = (rest.len() as u64 - 1) * 1000;
                let wanted: std::collections::HashSet<&str> =
                    rest.iter().map(|k| k.as_str()).collect();
                let mut listed = self.store.list(Some(&folder));
                let mut seen = 0u64;
                let mut reached = false;
                let mut upto = String::new();
                while let Some(meta) = listed.try_next().await? {
                    seen += 1;
                    upto = meta.location.to_string();
                    let key = meta.location.as_ref();
                    // S3 lists in key order (UTF-8 bytes).
                    if key > last.as_str() {
                        reached = true;
                        break;
                    }
                    if wanted.contains(key) {
                        out.insert(key.to_string(), meta);
                    }
                    if seen >= budget {
                        break;
                    }
                }
                if reached || seen < budget {
                    return Ok(out);
                }
                // Stopped early: the keys after the last one listed get their HEAD.
                rest.retain(|k| k.as_str() > upto.as_str());
            }
        }
        let heads: Vec<Option<ObjectMeta>> = futures::stream::iter(&rest)
            .map(|k| self.head(k))
            .buffered(self.concurrency)
            .try_collect()
            .await?;
        for (k, m) in rest.into_iter().zip(heads) {
            if let Some(m) = m {
                out.insert(k.clone(), m);
            }
        }
        Ok(out)
    }

    /// Writes an object atomically (readers see all of it or nothing).
    pub async fn put(&self, key: &str, data: impl Into<Bytes>) -> Result<()> {
        self.store
            .put(&path(key), PutPayload::from(data.into()))
            .await?;
        Ok(())
    }

    /// Creates an object only if none exists; `false` if one already did.
    pub async fn put_if_absent(&self, key: &str, data: impl Into<Bytes>) -> Result<bool> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&path(key), PutPayload::from(data.into()), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes an object; deleting one that is gone is not an error.
    pub async fn delete(&self, key: &str) -> Result<()> {
        match self.store.delete(&path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Moves an object; the target is replaced if it exists. In S3 that is a copy (which is
    /// whole or fails: its answer says so), then the delete of the original.
    pub async fn rename(&self, from: &str, to: &str) -> Result<()> {
        let (from, to) = (path(from), path(to));
        if !self.is_s3() {
            self.store.rename(&from, &to).await?;
            return Ok(());
        }
        self.store.copy(&from, &to).await?;
        self.store.delete(&from).await?;
        Ok(())
    }

    /// Moves objects (`from`, `to`), at most [`Lake::concurrency`] at once; the targets are
    /// replaced if they exist. In S3: the copies, then one `DeleteObjects` per 1,000 originals.
    /// A `from` that is gone (moved before: a publish run again) is left out; the `from`s
    /// moved are returned.
    pub async fn move_all(&self, moves: &[(String, String)]) -> Result<Vec<String>> {
        let s3 = self.is_s3();
        let moved: Vec<Option<String>> = futures::stream::iter(moves)
            .map(|(from, to)| async move {
                let (f, t) = (path(from), path(to));
                let done = match s3 {
                    true => self.store.copy(&f, &t).await,
                    false => self.store.rename(&f, &t).await,
                };
                match done {
                    Ok(()) => Ok(Some(from.clone())),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(Error::from(e)),
                }
            })
            .buffer_unordered(self.concurrency)
            .try_collect()
            .await?;
        let moved: Vec<String> = moved.into_iter().flatten().collect();
        if s3 {
            self.delete_all(moved.iter().cloned()).await?;
        }
        Ok(moved)
    }

    /// Deletes objects, 1,000 a request in S3 (`DeleteObjects`); ones that are gone are not an
    /// error.
    pub async fn delete_all(&self, keys: impl IntoIterator<Item = String>) -> Result<()> {
        let paths: Vec<Result<Path, object_store::Error>> =
            keys.into_iter().map(|k| Ok(path(&k))).collect();
        if paths.is_empty() {
            return Ok(());
        }
        let mut done = self
            .store
            .delete_stream(futures::stream::iter(paths).boxed());
        while let Some(r) = done.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Whether an object exists.
    pub async fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.head(key).await?.is_some())
    }

    /// Reads a JSON state file, or `None` if absent.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.get_opt(key).await? {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::State {
                    path: key.to_string(),
                    message: e.to_string(),
                }),
        }
    }

    /// Writes a JSON state file atomically.
    pub async fn put_json<T: serde::Serialize>(&self, key: &str, value: &T) -> Result<()> {
        let data = serde_json::to_vec_pretty(value).map_err(|e| Error::State {
            path: key.to_string(),
            message: e.to_string(),
        })?;
        self.put(key, data).await
    }

    /// Writes a run report or a failure record (JSON) with every sensitive value masked
    /// ([`crate::redact`]). State files the lake reads back to work (ledger, manifests) go
    /// through [`Lake::put_json`] instead: their content must stay as it is.
    pub async fn put_report<T: serde::Serialize>(&self, key: &str, value: &T) -> Result<()> {
        let data = crate::redact::to_json(value).map_err(|e| Error::State {
            path: key.to_string(),
            message: e.to_string(),
        })?;
        self.put(key, data).await
    }
}

/// Whether an error says the object is not the one listed any more: deleted, or replaced
/// (its ETag changed) since.
pub fn gone(e: &Error) -> bool {
    matches!(
        e,
        Error::Store(object_store::Error::NotFound { .. })
            | Error::Store(object_store::Error::Precondition { .. })
    )
}

/// SHA-256 (hex) of what `reader` reads, on a blocking thread; the reader is handed back.
async fn hash<R: Read + Send + 'static>(key: &str, mut reader: R) -> Result<(String, R)> {
    use sha2::Digest;
    let key = key.to_string();
    tokio::task::spawn_blocking(move || {
        let mut sha = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => return Ok((hex::encode(sha.finalize()), reader)),
                Ok(n) => sha.update(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(format!("cannot read {key}"), e)),
            }
        }
    })
    .await
    .map_err(|e| Error::State {
        path: "hasher".into(),
        message: e.to_string(),
    })?
}

/// Remote objects larger than this are downloaded in ranges of this size (one request each).
pub const DOWNLOAD_RANGE: u64 = 16 << 20;

/// `processed/<table>`
pub fn processed_prefix(table: &str) -> String {
    format!("processed/{table}")
}

/// `rejected/<table>`
pub fn rejected_prefix(table: &str) -> String {
    format!("rejected/{table}")
}

/// `warehouse/<name>`
pub fn warehouse_prefix(name: &str) -> String {
    format!("warehouse/{name}")
}

/// The part of `key` after `prefix/`.
pub fn relative<'a>(key: &'a str, prefix: &str) -> &'a str {
    key.strip_prefix(prefix)
        .map(|k| k.trim_start_matches('/'))
        .unwrap_or(key)
}

/// The folder part of a relative key (`a=1/b=2/part.parquet` -> `a=1/b=2`; `f.parquet` -> ``):
/// a file's partition folder.
pub fn parent_dir(rel: &str) -> &str {
    rel.rsplit_once('/').map(|(d, _)| d).unwrap_or_default()
}

/// An object path from a key: keys are kept in their encoded form (as listed), so they are
/// parsed, not encoded again.
pub fn path(key: &str) -> Path {
    Path::parse(key).unwrap_or_else(|_| Path::from(key))
}

/// Whether Hive's path escaping (`FileUtils.escapePathName`, and Spark's
/// `ExternalCatalogUtils.escapePathName`) escapes a character: the ASCII controls (0x00-0x1F,
/// 0x7F) and `"` `#` `%` `'` `*` `/` `:` `=` `?` `\` `{` `[` `]` `^`. Everything else, non-ASCII
/// included, stays as it is.
fn hive_escapes(c: char) -> bool {
    matches!(
        c,
        '\0'..='\x1F'
            | '\x7F'
            | '"'
            | '#'
            | '%'
            | '\''
            | '*'
            | '/'
            | ':'
            | '='
            | '?'
            | '\\'
            | '{'
            | '['
            | ']'
            | '^'
    )
}

/// Escapes a partition column name or value as Hive does in folder names: each character
/// [`hive_escapes`] names becomes `%XX` (uppercase hex), e.g. `c:d=e` -> `c%3Ad%3De`, `é#1` ->
/// `é%231`.
pub fn hive_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if hive_escapes(c) {
            out.push_str(&format!("%{:02X}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Reverses [`hive_escape`] (Hive's `unescapePathName`): every `%XX` becomes its byte. The bytes
/// are read as UTF-8, so folders an older sluice wrote (`%C3%A9` for `é`) read back too; a
/// result that is not UTF-8 leaves the text as it was, as DataFusion does.
pub fn hive_unescape(text: &str) -> String {
    if !text.contains('%') {
        return text.to_string();
    }
    let bytes = text.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| text.to_string())
}

/// A Hive partition folder `column=value`, both escaped as Hive escapes them
/// ([`hive_escape`]). That text is the folder's name on disk and in S3 as it is: a lake key
/// holding it parses as an object_store [`Path`] unchanged (no controls, no `/`), and
/// `LocalFileSystem` maps such a path to the same file name.
pub fn partition_segment(column: &str, value: &str) -> String {
    format!("{}={}", hive_escape(column), hive_escape(value))
}

/// A step's scratch folder: removed when dropped, so on every path out of the step (an
/// interrupted run's folders go at a later run's start, [`Lake::clean_scratch`]). One value per
/// folder at a time: a second one of the same name would lose its files when the first drops.
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl Scratch {
    /// Empties the folder (before a stream is tried again).
    pub fn clear(&self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.clear();
    }
}

impl std::ops::Deref for Scratch {
    type Target = FsPath;
    fn deref(&self) -> &FsPath {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hive_escaping_matches_hive() {
        assert_eq!(partition_segment("tag", "c:d=e"), "tag=c%3Ad%3De");
        assert_eq!(hive_escape("é#1?"), "é%231%3F");
        assert_eq!(hive_escape("50% a/b"), "50%25 a%2Fb");
        assert_eq!(
            hive_escape("\u{1}\"'*\\{[]^\u{7f}"),
            "%01%22%27%2A%5C%7B%5B%5D%5E%7F"
        );
        // Not escaped by Hive: these stay.
        assert_eq!(hive_escape("x y}<>|~`!@$&()+,;"), "x y}<>|~`!@$&()+,;");
        for v in [
            "c:d=e", "a/b", "é#1?", "50%", "x y", "t\u{1}", "%zz", "%4", "日本",
        ] {
            assert_eq!(hive_unescape(&hive_escape(v)), v);
        }
        // Folders an older sluice wrote (object_store's encoding) read back the same.
        assert_eq!(hive_unescape("%C3%A9%231%3F"), "é#1?");
        assert_eq!(hive_unescape("%FF"), "%FF");
    }

    #[test]
    fn escaped_keys_reach_the_disk_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        let seg = partition_segment("tag", "é:%\u{1}[x]");
        let key = format!("t/{seg}/part.parquet");
        let file = store.path_to_filesystem(&path(&key)).unwrap();
        assert_eq!(file, dir.path().canonicalize().unwrap().join(&key));
        assert_eq!(path(&key).as_ref(), key);
    }

    #[test]
    fn a_scratch_folder_goes_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open_local(dir.path()).unwrap();
        let scratch = lake.scratch("run-1", "t");
        std::fs::create_dir_all(scratch.join("a")).unwrap();
        std::fs::write(scratch.join("a/b.parquet"), b"x").unwrap();
        scratch.clear();
        assert!(!scratch.exists());
        std::fs::create_dir_all(&*scratch).unwrap();
        let kept: PathBuf = scratch.to_path_buf();
        let on_error = || -> std::result::Result<(), ()> {
            let _s = scratch;
            Err(())
        };
        assert!(on_error().is_err());
        assert!(!kept.exists());
    }
}
