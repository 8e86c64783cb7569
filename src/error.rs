//! Error types: one enum for the whole library and the `Result` alias used everywhere.

use std::path::PathBuf;

/// Everything that can go wrong in sluice, with enough context to act on it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file or a file it names is wrong; fix it and rerun.
    #[error("config error in {file}: {message}")]
    Config { file: PathBuf, message: String },

    /// A SQL query failed to plan or run.
    #[error("query {file}{}: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Query {
        file: PathBuf,
        line: Option<usize>,
        message: String,
    },

    /// A raw file could not be read at all (not a malformed row: those are rejected rows).
    #[error("cannot read {key}: {message}")]
    Read { key: String, message: String },

    /// The rows of a run do not add up: something would be lost or doubled.
    #[error("row accounting does not balance for {key}: {message}")]
    Accounting { key: String, message: String },

    /// A table's new output is not compatible with what the table already holds.
    #[error("schema of table {table} changed incompatibly: {message}")]
    Schema { table: String, message: String },

    /// Lake storage failed (listing, reading, writing, renaming objects).
    #[error("lake storage: {0}")]
    Store(#[from] object_store::Error),

    /// DataFusion failed outside a user query.
    #[error("engine: {0}")]
    Engine(#[from] datafusion::error::DataFusionError),

    /// Arrow failed while building or converting batches.
    #[error("arrow: {0}")]
    Arrow(#[from] datafusion::arrow::error::ArrowError),

    /// Parquet encoding or decoding failed.
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),

    /// A state file under `_sluice/` could not be parsed.
    #[error("state file {path}: {message}")]
    State { path: String, message: String },

    /// Another run holds a lock for too long.
    #[error("lock {path} held by {holder}: {message}")]
    Locked {
        path: String,
        holder: String,
        message: String,
    },

    /// Another run committed some of a batch's files (or their content) while the batch ran;
    /// nothing of it was committed, and it runs again without them.
    #[error("another run committed {keys} while this batch ran")]
    Raced { keys: String },

    /// A table's key index is damaged, of another format, or disagrees with the table's files.
    #[error("key index of table {table}: {message}")]
    Index { table: String, message: String },

    /// A table's key index disagreed with the table (or another run rebuilt it) while a batch
    /// was committed: nothing of the batch was committed; it runs again with a rebuilt index.
    #[error("key index of table {table} was out of date ({message}); the batch runs again")]
    IndexStale { table: String, message: String },

    /// A notification could not be delivered (never undoes committed data).
    #[error("notification to {target} failed: {message}")]
    Notify { target: String, message: String },

    /// An AWS service call failed (Glue, SNS, SQS, Secrets Manager).
    #[error("{service}: {message}")]
    Aws { service: String, message: String },

    /// A Delta table could not be read or committed.
    #[error("Delta table {table}: {message}")]
    Delta { table: String, message: String },

    /// The external warehouse refused a connection or a statement (its own error text).
    #[error("warehouse {target}: {message}")]
    Warehouse { target: String, message: String },

    /// A network call got no answer in time; `what` names the call and its endpoint.
    #[error("{step}: {what} timed out after {after}")]
    Timeout {
        step: String,
        what: String,
        after: String,
    },

    /// The run passed `max_runtime` and stopped at this step (its commits stand).
    #[error(
        "max_runtime {limit} reached at step {step}; the run stopped there, its commits stand and the next run carries on"
    )]
    MaxRuntime { limit: String, step: String },

    /// A data check of severity `error` failed on a batch: nothing of it is published.
    #[error("data checks failed for table {table}: {summary}")]
    ChecksFailed { table: String, summary: String },

    /// A replay (`sluice reprocess`) that cannot be done as asked; nothing was written.
    #[error("reprocess {table}: {message}")]
    Replay { table: String, message: String },

    /// Plain I/O outside the lake (config files, local output).
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// A config error about `file`.
    pub fn config(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Config {
            file: file.into(),
            message: message.into(),
        }
    }

    /// An I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether this error means the user must fix the config or the call (exit code 2).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Error::Config { .. } | Error::Query { .. } | Error::Schema { .. }
        )
    }
}

/// An error and its sources as one line: `outer: cause: root cause`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
