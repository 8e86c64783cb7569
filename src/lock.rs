//! Claims and locks in the lake: objects created only if absent, naming their holder.
//!
//! A holder on this host whose process is gone, or any holder older than the TTL, is stale and
//! its lock is taken over: a crashed run never blocks the next one. A lock is held only for the
//! length of one piece of work ([`holding`], [`try_holding`]), and let go on every way out of it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lake::Lake;

/// Who holds a lock or claim.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Holder {
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// The run.
    pub run_id: String,
    /// When it was taken.
    pub since: DateTime<Utc>,
}

impl Holder {
    /// This process, for a run.
    pub fn me(run_id: &str) -> Holder {
        Holder {
            host: hostname(),
            pid: std::process::id(),
            run_id: run_id.to_string(),
            since: Utc::now(),
        }
    }

    fn is_stale(&self, ttl: Duration) -> bool {
        if self.host == hostname() && self.pid != std::process::id() && !process_alive(self.pid) {
            return true;
        }
        let age = Utc::now().signed_duration_since(self.since);
        age.to_std().map(|a| a > ttl).unwrap_or(false)
    }

    fn describe(&self) -> String {
        format!(
            "run {} (pid {} on {}, since {})",
            self.run_id, self.pid, self.host, self.since
        )
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".to_string())
}

/// Whether a process of this host is running (zombies count as gone).
fn process_alive(pid: u32) -> bool {
    let stat = format!("/proc/{pid}/stat");
    match std::fs::read_to_string(&stat) {
        Ok(s) => !s
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        // Without /proc we cannot tell: trust the TTL.
        Err(_) => !std::path::Path::new("/proc/self").exists(),
    }
}

/// Takes `key` if it is free or stale; `false` if a live holder has it.
async fn try_acquire(lake: &Lake, key: &str, me: &Holder, ttl: Duration) -> Result<bool> {
    let body = serde_json::to_vec(me).map_err(|e| Error::State {
        path: key.to_string(),
        message: e.to_string(),
    })?;
    for _ in 0..3 {
        if lake.put_if_absent(key, body.clone()).await? {
            return Ok(true);
        }
        match lake.get_json::<Holder>(key).await {
            Ok(Some(h)) if h == *me => return Ok(true),
            Ok(Some(h)) if !h.is_stale(ttl) => return Ok(false),
            Ok(Some(h)) => {
                tracing::warn!(lock = key, holder = %h.describe(), "taking over a stale lock");
                lake.delete(key).await?;
            }
            // Gone in between, or unreadable (a holder died mid-write): try again.
            Ok(None) => {}
            Err(_) => lake.delete(key).await?,
        }
    }
    Ok(false)
}

/// Takes `key`, waiting up to `wait` for a live holder to let go.
async fn acquire(lake: &Lake, key: &str, me: &Holder, ttl: Duration, wait: Duration) -> Result<()> {
    let start = std::time::Instant::now();
    let mut pause = Duration::from_millis(20);
    loop {
        if try_acquire(lake, key, me, ttl).await? {
            return Ok(());
        }
        if start.elapsed() > wait {
            let holder = lake
                .get_json::<Holder>(key)
                .await
                .ok()
                .flatten()
                .map(|h| h.describe())
                .unwrap_or_else(|| "unknown".into());
            return Err(Error::Locked {
                path: key.to_string(),
                holder,
                message: format!("still held after {}s; retry later", wait.as_secs()),
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// Runs `work` holding `key` (taken first, waiting up to `wait`) and lets go of it on every
/// path out of `work`; the work's error comes before the release's. A run that dies holding it
/// leaves it stale ([`Holder`]), to be taken over.
pub async fn holding<T>(
    lake: &Lake,
    key: &str,
    me: &Holder,
    ttl: Duration,
    wait: Duration,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    acquire(lake, key, me, ttl, wait).await?;
    then_release(lake, key, me, work).await
}

/// Runs `work` holding `key` if it is free or stale now (`None`, and `work` is not run, if a
/// live holder has it), and lets go of it on every path out of `work`.
pub async fn try_holding<T>(
    lake: &Lake,
    key: &str,
    me: &Holder,
    ttl: Duration,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<Option<T>> {
    if !try_acquire(lake, key, me, ttl).await? {
        return Ok(None);
    }
    then_release(lake, key, me, work).await.map(Some)
}

/// Runs `work`, then lets go of `key`; the work's error comes before the release's.
async fn then_release<T>(
    lake: &Lake,
    key: &str,
    me: &Holder,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let out = work.await;
    let released = release(lake, key, me).await;
    let out = out?;
    released?;
    Ok(out)
}

/// Whether the run that claimed files as `run_id` is still at work: its claims are there and
/// their holder is not stale. A commit it planned beside other commits is then its own to
/// finish or throw away, not recovery's.
pub async fn run_alive(lake: &Lake, run_id: &str, ttl: Duration) -> Result<bool> {
    Ok(match lake.get_json::<Claims>(&claims_key(run_id)).await {
        Ok(Some(c)) => !c.holder.is_stale(ttl),
        Ok(None) => false,
        Err(Error::State { .. }) => false,
        Err(e) => return Err(e),
    })
}

/// Lets go of `key` if this holder has it.
async fn release(lake: &Lake, key: &str, me: &Holder) -> Result<()> {
    if let Ok(Some(h)) = lake.get_json::<Holder>(key).await
        && h.run_id == me.run_id
        && h.pid == me.pid
    {
        lake.delete(key).await?;
    }
    Ok(())
}

/// The lock under which runs take their claims.
pub const CLAIMS_LOCK: &str = "_sluice/locks/claims.json";

/// `_sluice/claims/run-<run id>.json`: the raw files a run has claimed.
pub fn claims_key(run_id: &str) -> String {
    format!("{}/claims/run-{run_id}.json", crate::lake::STATE)
}

/// The raw files one run has claimed, and the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The run.
    pub holder: Holder,
    /// Lake keys of its raw files.
    pub keys: Vec<String>,
}

/// Claims those of `keys` that no live run holds (the first `limit` of them) and returns them: under [`CLAIMS_LOCK`]
/// (waiting up to `wait`), the other runs' claims are read (a stale holder's are removed)
/// and this run's are written as one object, [`claims_key`], replacing any it had. A few
/// requests a batch, whatever its size, instead of one conditional create a file.
pub async fn claim(
    lake: &Lake,
    keys: &[String],
    me: &Holder,
    ttl: Duration,
    wait: Duration,
    limit: Option<usize>,
) -> Result<Vec<String>> {
    holding(lake, CLAIMS_LOCK, me, ttl, wait, async {
        let mine = claims_key(&me.run_id);
        let held = live_claims(lake, me, ttl).await?;
        let taken: Vec<String> = keys
            .iter()
            .filter(|k| !held.contains(*k))
            .take(limit.unwrap_or(usize::MAX))
            .cloned()
            .collect();
        let claims = Claims {
            holder: me.clone(),
            keys: taken,
        };
        match claims.keys.is_empty() {
            true => lake.delete(&mine).await?,
            false => lake.put_json(&mine, &claims).await?,
        }
        Ok(claims.keys)
    })
    .await
}

/// The raw files other live runs have claimed; the claims of stale holders (a crashed run)
/// are deleted on the way. One listing, and a read of each other run's claims.
pub async fn live_claims(
    lake: &Lake,
    me: &Holder,
    ttl: Duration,
) -> Result<std::collections::HashSet<String>> {
    use futures::StreamExt;
    let mine = claims_key(&me.run_id);
    let others: Vec<String> = lake
        .list(&format!("{}/claims", crate::lake::STATE))
        .await?
        .into_iter()
        .map(|m| m.location.to_string())
        .filter(|k| *k != mine && crate::lake::relative(k, "_sluice/claims").starts_with("run-"))
        .collect();
    let sets: Vec<Result<Option<Claims>>> = futures::stream::iter(&others)
        .map(|k| lake.get_json::<Claims>(k))
        .buffered(lake.concurrency())
        .collect()
        .await;
    let mut held = std::collections::HashSet::new();
    let mut stale = Vec::new();
    for (key, set) in others.iter().zip(sets) {
        match set {
            Ok(Some(c)) if !c.holder.is_stale(ttl) => held.extend(c.keys),
            Ok(Some(c)) => {
                tracing::warn!(holder = %c.holder.describe(), files = c.keys.len(), "dropping stale claims");
                stale.push(key.clone());
            }
            // Gone in between: its run ended.
            Ok(None) => {}
            // Not claims (damaged): dropped.
            Err(Error::State { .. }) => stale.push(key.clone()),
            Err(e) => return Err(e),
        }
    }
    lake.delete_all(stale).await?;
    Ok(held)
}

/// Lets go of every claim of this run.
pub async fn unclaim(lake: &Lake, me: &Holder) -> Result<()> {
    lake.delete(&claims_key(&me.run_id)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lock_is_let_go_on_every_way_out_and_not_taken_from_a_live_holder() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open_local(dir.path()).unwrap();
        let (key, ttl) = ("_sluice/locks/x.json", Duration::from_secs(60));
        let me = Holder::me("run-a");
        // Free: the work runs under it, and it is gone after, whether the work failed or not.
        let ran = try_holding(&lake, key, &me, ttl, async {
            assert!(lake.get_json::<Holder>(key).await?.is_some());
            Ok(1)
        })
        .await
        .unwrap();
        assert_eq!(ran, Some(1));
        assert!(lake.get_json::<Holder>(key).await.unwrap().is_none());
        let failed: Result<u8> = holding(&lake, key, &me, ttl, ttl, async {
            Err(Error::State {
                path: "w".into(),
                message: "broken".into(),
            })
        })
        .await;
        assert!(failed.unwrap_err().to_string().contains("broken"));
        assert!(lake.get_json::<Holder>(key).await.unwrap().is_none());
        // Held by a live run of this host: not taken, the work does not run, the lock stays.
        let other = Holder::me("run-b");
        assert!(try_acquire(&lake, key, &other, ttl).await.unwrap());
        let mut touched = false;
        let got = try_holding(&lake, key, &me, ttl, async {
            touched = true;
            Ok(())
        })
        .await
        .unwrap();
        assert!(got.is_none() && !touched);
        let held = lake.get_json::<Holder>(key).await.unwrap().unwrap();
        assert_eq!(held.run_id, "run-b");
        let waited = holding(&lake, key, &me, ttl, Duration::from_millis(50), async {
            Ok(())
        })
        .await;
        assert!(matches!(waited, Err(Error::Locked { .. })), "{waited:?}");
    }
}
