//! Integration tests: the real `sluice` binary on temp lakes, with the Parquet read back.

mod aggregates;
mod aws;
mod bad_input;
mod checks;
mod cli;
mod compact;
mod concurrency;
mod crash;
#[cfg(feature = "delta")]
mod delta;
mod deploy;
mod dialects;
#[cfg(feature = "distributed")]
mod distributed;
mod exactly_once;
mod formats;
mod freshness;
mod hive;
mod iam;
mod index;
mod infer;
mod json_paths;
#[cfg(feature = "lambda")]
mod lambda;
mod memory;
mod pipeline;
mod postgres;
mod redact;
mod redshift;
mod replay;
mod support;
mod timeouts;
mod types;
