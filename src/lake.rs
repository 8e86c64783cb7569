//! The lake: an object store (a local folder today) and the layout of its prefixes.
//!
//! Everything sluice reads or writes in the lake goes through [`Lake`], so the same code serves
//! `file://` now and `s3://` later.

use std::io::Read;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    GetResultPayload, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
};

use crate::error::{Error, Result};

/// Where the pipeline keeps its own state.
pub const STATE: &str = "_sluice";

/// A lake root and the store behind it.
#[derive(Debug, Clone)]
pub struct Lake {
    store: Arc<dyn ObjectStore>,
    local: Arc<LocalFileSystem>,
    root: PathBuf,
}

impl Lake {
    /// Opens (creating if needed) a lake in a local folder.
    pub fn open_local(root: &FsPath) -> Result<Lake> {
        std::fs::create_dir_all(root)
            .map_err(|e| Error::io(format!("cannot create lake folder {}", root.display()), e))?;
        let root = root
            .canonicalize()
            .map_err(|e| Error::io(format!("cannot open lake folder {}", root.display()), e))?;
        let local = Arc::new(LocalFileSystem::new_with_prefix(&root)?);
        Ok(Lake {
            store: local.clone(),
            local,
            root,
        })
    }

    /// The local folder of the lake.
    pub fn root(&self) -> &FsPath {
        &self.root
    }

    /// A `file://` URL for a prefix, for DataFusion's listing tables (ends with `/`).
    pub fn url(&self, prefix: &str) -> String {
        let mut p = self.root.join(prefix).to_string_lossy().into_owned();
        if !p.ends_with('/') {
            p.push('/');
        }
        format!("file://{p}")
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

    /// A reader of an object's bytes; a local file is read in place, not loaded.
    pub async fn reader(&self, key: &str) -> Result<Box<dyn std::io::Read + Send>> {
        let got = self.store.get(&path(key)).await?;
        match got.payload {
            GetResultPayload::File(file, _) => Ok(Box::new(file)),
            GetResultPayload::Stream(s) => {
                let parts: Vec<Bytes> = s.try_collect().await?;
                Ok(Box::new(std::io::Cursor::new(parts.concat())))
            }
        }
    }

    /// SHA-256 of an object's bytes, hex, read in pieces.
    pub async fn sha256(&self, key: &str) -> Result<String> {
        use sha2::Digest;
        let mut reader = self.reader(key).await?;
        let key = key.to_string();
        tokio::task::spawn_blocking(move || {
            let mut sha = sha2::Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => return Ok(hex::encode(sha.finalize())),
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

    /// A local folder for a run's files in the making (on the lake's own disk, so that they
    /// move into place without a copy).
    pub fn scratch(&self, run_id: &str, name: &str) -> PathBuf {
        self.root.join(STATE).join("tmp").join(run_id).join(name)
    }

    /// Removes scratch folders of runs that ended more than `age` ago (crashed runs).
    pub fn clean_scratch(&self, age: std::time::Duration) {
        let Ok(dirs) = std::fs::read_dir(self.root.join(STATE).join("tmp")) else {
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

    /// Moves a local file into the lake as `key`.
    pub async fn put_file(&self, key: &str, file: &FsPath) -> Result<()> {
        let target = self.local.path_to_filesystem(&path(key))?;
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
        }
        if std::fs::rename(file, &target).is_err() {
            let data = std::fs::read(file)
                .map_err(|e| Error::io(format!("cannot read {}", file.display()), e))?;
            self.put(key, data).await?;
        }
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
            Ok(m) => Ok(Some(m)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
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

    /// Moves an object; the target is replaced if it exists.
    pub async fn rename(&self, from: &str, to: &str) -> Result<()> {
        self.store.rename(&path(from), &path(to)).await?;
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
}

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

/// An object path from a key: keys are kept in their encoded form (as listed), so they are
/// parsed, not encoded again.
pub fn path(key: &str) -> Path {
    Path::parse(key).unwrap_or_else(|_| Path::from(key))
}

/// One encoded path segment, e.g. a Hive partition folder `col=value`.
pub fn segment(text: &str) -> String {
    object_store::path::PathPart::from(text)
        .as_ref()
        .to_string()
}
