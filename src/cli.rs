//! Command-line interface (clap derive).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// sluice: raw files in, clean Hive-partitioned Parquet out, exactly once.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
pub struct Cli {
    /// The pipeline's config file.
    #[arg(long, global = true, default_value = "sluice.toml")]
    pub config: PathBuf,
    /// The lake folder (overrides `lake.root` of the config).
    #[arg(long, global = true)]
    pub lake: Option<PathBuf>,
    /// Memory the run may use, e.g. 512MiB (overrides `engine.memory_limit`).
    #[arg(long, global = true)]
    pub memory_limit: Option<String>,
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Log lines as text or as JSON objects.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log line format.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Output format of `query`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OutputFormat {
    /// An aligned table.
    Table,
    /// CSV with a header.
    Csv,
    /// A JSON array of objects.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Process new raw files: transform, write, commit, build the warehouse, archive, report.
    Run {
        /// Print the run report as JSON instead of a summary.
        #[arg(long)]
        json: bool,
        /// Abort the process at this step (crash tests).
        #[arg(long, hide = true)]
        crash_at: Option<String>,
    },
    /// Check the config, schemas and queries without reading data.
    Validate,
    /// Show processed, pending and failed files and the last runs.
    Status {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run SQL over the processed, rejected (`<table>_rejected`) and warehouse tables.
    Query {
        /// The SQL statement.
        sql: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
    /// Write the benchmark workload's raw data (same dirt as the shared gen.py).
    Generate {
        /// `logs` (JSON lines) or `tickets` (CSV).
        #[arg(value_enum)]
        kind: crate::generate::Kind,
        /// Output file.
        out: PathBuf,
        /// Base rows (default: 3,700,000 logs, about 1.08 GB; 1,300,000 tickets, about 0.5 GB).
        #[arg(long)]
        rows: Option<usize>,
        /// Seed: the same seed, kind and rows give the same bytes.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Copy the shipped fixtures into a fresh lake, run the pipeline and show the results.
    Demo {
        /// Folder for the demo project (must be empty or absent); default: a new temp folder.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}
