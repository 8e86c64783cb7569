//! Counting the lake's requests: an [`ObjectStore`] layer that counts what it passes on, per
//! kind of request as S3 receives them (`GET`, `HEAD`, `PUT`, `POST` for multipart uploads,
//! `LIST` per page of 1,000 keys, `COPY`, `DELETE` per `DeleteObjects` of up to 1,000 keys,
//! `RENAME` on a folder lake). The run report takes the counts per step
//! ([`crate::report::RunReport::requests`]).

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result, UploadPart,
};

/// Kinds of request, in the order they are reported.
const KINDS: [&str; 8] = [
    "GET", "HEAD", "PUT", "POST", "LIST", "COPY", "DELETE", "RENAME",
];
const GET: usize = 0;
const HEAD: usize = 1;
const PUT: usize = 2;
const POST: usize = 3;
const LIST: usize = 4;
const COPY: usize = 5;
const DELETE: usize = 6;
const RENAME: usize = 7;

/// Keys per `ListObjectsV2` page and per `DeleteObjects` request.
const PAGE: u64 = 1000;

/// Requests counted since the last [`Requests::take`].
#[derive(Debug, Default)]
pub struct Requests {
    counts: [AtomicU64; KINDS.len()],
}

impl Requests {
    fn add(&self, kind: usize, n: u64) {
        self.counts[kind].fetch_add(n, Ordering::Relaxed);
    }

    /// The counts since the last call (kinds with none left out), and starts again from zero.
    pub fn take(&self) -> BTreeMap<String, u64> {
        KINDS
            .iter()
            .zip(&self.counts)
            .map(|(k, c)| (k.to_string(), c.swap(0, Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

/// A store that counts the requests it passes on to `inner`.
#[derive(Debug)]
pub struct Counting {
    inner: Arc<dyn ObjectStore>,
    requests: Arc<Requests>,
}

impl Counting {
    /// Counts `inner`'s requests into `requests`.
    pub fn new(inner: Arc<dyn ObjectStore>, requests: Arc<Requests>) -> Counting {
        Counting { inner, requests }
    }

    /// Counts a listing: one request, and one more per page after the first.
    fn count_list(
        &self,
        stream: BoxStream<'static, Result<ObjectMeta>>,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        let requests = self.requests.clone();
        requests.add(LIST, 1);
        let mut seen = 0u64;
        stream
            .inspect(move |_| {
                seen += 1;
                if seen > PAGE && seen % PAGE == 1 {
                    requests.add(LIST, 1);
                }
            })
            .boxed()
    }
}

impl std::fmt::Display for Counting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Counting({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for Counting {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.requests.add(PUT, 1);
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.requests.add(POST, 1);
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(CountingUpload {
            inner,
            requests: self.requests.clone(),
        }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.requests.add(if options.head { HEAD } else { GET }, 1);
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.requests.add(GET, ranges.len() as u64);
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let requests = self.requests.clone();
        let mut seen = 0u64;
        let counted = locations
            .inspect(move |_| {
                if seen.is_multiple_of(PAGE) {
                    requests.add(DELETE, 1);
                }
                seen += 1;
            })
            .boxed();
        self.inner.delete_stream(counted)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.count_list(self.inner.list(prefix))
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.count_list(self.inner.list_with_offset(prefix, offset))
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.requests.add(LIST, 1);
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.requests.add(COPY, 1);
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.requests.add(RENAME, 1);
        self.inner.rename_opts(from, to, options).await
    }
}

/// A multipart upload whose parts (`PUT`) and completion (`POST`) are counted.
#[derive(Debug)]
struct CountingUpload {
    inner: Box<dyn MultipartUpload>,
    requests: Arc<Requests>,
}

#[async_trait]
impl MultipartUpload for CountingUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        self.requests.add(PUT, 1);
        self.inner.put_part(data)
    }

    async fn complete(&mut self) -> Result<PutResult> {
        self.requests.add(POST, 1);
        self.inner.complete().await
    }

    async fn abort(&mut self) -> Result<()> {
        self.requests.add(DELETE, 1);
        self.inner.abort().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt;
    use object_store::memory::InMemory;

    #[tokio::test]
    async fn counts_each_kind() {
        let requests = Arc::new(Requests::default());
        let store = Counting::new(Arc::new(InMemory::new()), requests.clone());
        let (a, b) = (Path::from("a"), Path::from("b"));
        store.put(&a, PutPayload::from_static(b"x")).await.unwrap();
        store.head(&a).await.unwrap();
        store.get(&a).await.unwrap();
        store.copy(&a, &b).await.unwrap();
        let listed: Vec<_> = store.list(None).collect().await;
        assert_eq!(listed.len(), 2);
        let paths = futures::stream::iter([Ok(a), Ok(b)]).boxed();
        let deleted: Vec<_> = store.delete_stream(paths).collect().await;
        assert_eq!(deleted.len(), 2);
        let counts = requests.take();
        let want: BTreeMap<String, u64> = [
            ("COPY", 1),
            ("DELETE", 1),
            ("GET", 1),
            ("HEAD", 1),
            ("LIST", 1),
            ("PUT", 1),
        ]
        .into_iter()
        .map(|(k, n)| (k.to_string(), n))
        .collect();
        assert_eq!(counts, want);
        assert!(requests.take().is_empty());
    }
}
