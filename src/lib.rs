//! sluice: a data-lake processor. Raw files (CSV, JSON lines, JSON, Parquet; gzip or zstd) are
//! read with explicit schemas, transformed by SQL in DataFusion, written as Hive-partitioned
//! Parquet with every rejected row kept, committed exactly once, aggregated into an embedded
//! warehouse, archived and reported.

pub mod aws;
pub mod catalog;
pub mod checks;
pub mod cli;
pub mod commit;
pub mod compact;
pub mod config;
#[cfg(feature = "delta")]
pub mod delta;
pub mod demo;
#[cfg(feature = "distributed")]
pub mod distributed;
pub mod enqueue;
pub mod error;
pub mod events;
pub mod fault;
pub mod format;
pub mod freshness;
pub mod functions;
pub mod generate;
pub mod glue;
pub mod html;
pub mod iam;
pub mod index;
pub mod infer;
pub mod inspect;
pub mod lake;
#[cfg(feature = "lambda")]
pub mod lambda;
pub mod ledger;
pub mod lock;
pub mod maintain;
pub mod notify;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod redact;
pub mod replay;
pub mod report;
pub mod requests;
pub mod schedule;
pub mod secrets;
pub mod sink;
pub mod source;
pub mod timeout;
pub mod transform;
pub mod trigger;
pub mod validate;
pub mod warehouse;

pub use error::{Error, Result};
