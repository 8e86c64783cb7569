//! Progress on a terminal: the step a run is at, and while a batch's raw files are read, a bar
//! of the files and stored bytes done (indicatif). Nothing at all when stderr is not a terminal
//! or the output is JSON.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use object_store::ObjectMeta;

const STEP: &str = "{spinner} {msg}";
const READING: &str = "{spinner} {msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}";

/// A run's progress display (cheap to clone: clones show on the same line).
#[derive(Clone, Default)]
pub struct Progress(Option<ProgressBar>);

impl Progress {
    /// A display if `show`, else nothing.
    pub fn new(show: bool) -> Progress {
        Progress(show.then(|| {
            let pb = ProgressBar::new_spinner();
            pb.enable_steady_tick(Duration::from_millis(100));
            pb
        }))
    }

    /// No display.
    pub fn hidden() -> Progress {
        Progress(None)
    }

    /// The current step.
    pub fn step(&self, msg: impl Into<String>) {
        if let Some(pb) = &self.0 {
            if let Ok(style) = ProgressStyle::with_template(STEP) {
                pb.set_style(style);
            }
            pb.set_message(msg.into());
        }
    }

    /// `source`'s `files` are about to be read: a bar of their stored bytes, which the readers
    /// [`Reading::wrap`] returns move on.
    pub fn reading(&self, source: &str, files: &[ObjectMeta]) -> Reading {
        let Some(pb) = &self.0 else {
            return Reading(None);
        };
        if let Ok(style) = ProgressStyle::with_template(READING) {
            pb.set_style(style.progress_chars("=> "));
        }
        pb.set_length(files.iter().map(|m| m.size).sum());
        pb.set_position(0);
        pb.reset_eta();
        let r = Meter {
            pb: pb.clone(),
            label: format!("{source}: reading"),
            files: files.len(),
            done: Arc::new(AtomicUsize::new(0)),
        };
        r.show();
        Reading(Some(r))
    }

    /// Removes the display.
    pub fn finish(&self) {
        if let Some(pb) = &self.0 {
            pb.finish_and_clear();
        }
    }
}

/// The bar of one batch's reading.
pub struct Reading(Option<Meter>);

#[derive(Clone)]
struct Meter {
    pb: ProgressBar,
    label: String,
    files: usize,
    done: Arc<AtomicUsize>,
}

impl Meter {
    fn show(&self) {
        let done = self.done.load(Ordering::Relaxed);
        self.pb
            .set_message(format!("{} {done}/{} files", self.label, self.files));
    }
}

impl Reading {
    /// `reader`, counting its bytes (and its end as a file done) on the bar.
    pub fn wrap(&self, reader: Box<dyn Read + Send>) -> Box<dyn Read + Send> {
        match &self.0 {
            None => reader,
            Some(m) => Box::new(Counted {
                inner: reader,
                meter: m.clone(),
                ended: false,
            }),
        }
    }
}

/// A reader whose bytes move a bar.
struct Counted {
    inner: Box<dyn Read + Send>,
    meter: Meter,
    ended: bool,
}

impl Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.meter.pb.inc(n as u64);
        } else if !buf.is_empty() && !self.ended {
            self.ended = true;
            self.meter.done.fetch_add(1, Ordering::Relaxed);
            self.meter.show();
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(size: u64) -> ObjectMeta {
        ObjectMeta {
            location: object_store::path::Path::from("raw/x"),
            last_modified: chrono::Utc::now(),
            size,
            e_tag: None,
            version: None,
        }
    }

    #[test]
    fn readers_move_the_bar_by_their_bytes_and_count_files_at_their_end() {
        let pb = ProgressBar::hidden();
        let p = Progress(Some(pb.clone()));
        let r = p.reading("logs", &[meta(5), meta(3)]);
        assert_eq!(pb.length(), Some(8));
        for data in [&b"hello"[..], b"abc"] {
            let mut out = Vec::new();
            r.wrap(Box::new(data)).read_to_end(&mut out).unwrap();
            assert_eq!(out, data);
        }
        assert_eq!(pb.position(), 8);
        assert_eq!(pb.message(), "logs: reading 2/2 files");
        // Nothing shown, readers untouched.
        let none = Progress::hidden().reading("logs", &[meta(1)]);
        let mut out = Vec::new();
        none.wrap(Box::new(&b"x"[..]))
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"x");
    }
}
