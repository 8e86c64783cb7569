//! Integration tests: the real `sluice` binary on temp lakes, with the Parquet read back.

mod bad_input;
mod cli;
mod concurrency;
mod crash;
mod formats;
mod memory;
mod pipeline;
mod support;
