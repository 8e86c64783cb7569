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
    /// The lake: a folder or `s3://bucket/prefix` (overrides `lake.root` of the config).
    #[arg(long, global = true)]
    pub lake: Option<String>,
    /// Memory the run may use, e.g. 512MiB (overrides `engine.memory_limit`).
    #[arg(long, global = true)]
    pub memory_limit: Option<String>,
    /// How long a run may last, e.g. 2h (overrides `engine.max_runtime`): then it stops at its
    /// next safe point, releases its locks and fails (exit 1); its commits stand.
    #[arg(long, global = true)]
    pub max_runtime: Option<String>,
    /// Raw files a batch takes at most, per source (overrides `engine.batch_files`).
    #[arg(long, global = true)]
    pub batch_files: Option<usize>,
    /// Run queries over the lake on these `sluice worker`s (`http://host:port`, comma separated;
    /// sets `engine.kind = "distributed"` and `engine.workers`).
    #[arg(long, global = true, value_delimiter = ',')]
    pub workers: Vec<String>,
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

/// What `sluice index` does.
#[derive(Debug, Subcommand)]
pub enum IndexAction {
    /// Rebuild the index from the table's files (every keyed table, or one).
    Rebuild {
        /// The table; default: every table with a `unique_key`.
        table: Option<String>,
    },
    /// Compare the index with the table's files; exit 1 on any difference.
    Check {
        /// The table; default: every table with a `unique_key`.
        table: Option<String>,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
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
    /// Check the config, schemas and queries without reading data; with `--sample FILE`, also
    /// read the first records of a sample file with a source's reader and schema, and report
    /// the schema's columns the file lacks, the file's columns the schema ignores and the sampled
    /// values that fail their column's type (exit 1 on a missing column or a failing value).
    Validate {
        /// A sample file (maybe `.gz` / `.zst`) to read with a source's reader and schema.
        #[arg(long)]
        sample: Option<PathBuf>,
        /// The source that reads the sample; default: the only one, or the one whose raw prefix
        /// or format fits the file's name.
        #[arg(long, requires = "sample")]
        source: Option<String>,
        /// Records of the sample read.
        #[arg(long, requires = "sample", default_value_t = crate::infer::check::DEFAULT_ROWS)]
        rows: usize,
    },
    /// Schema files.
    Schema {
        /// What to do.
        #[command(subcommand)]
        action: SchemaAction,
    },
    /// Start a project from a sample file: `DIR/sluice.toml` (one source, one table),
    /// `schemas/NAME.toml` (drafted from the sample, as `schema infer` does), `queries/NAME.sql`
    /// (every column, a `_reject_reason` for missing values) and the sample in
    /// `lake/raw/NAME/`, ready for `sluice validate` and `sluice run`.
    Init {
        /// The project's folder (must be empty or absent).
        dir: PathBuf,
        /// The sample file (CSV, JSON lines, JSON or Parquet; maybe `.gz` / `.zst`).
        #[arg(long)]
        sample: PathBuf,
        /// The source and table name; default: the file's name without extensions, in
        /// snake_case.
        #[arg(long)]
        name: Option<String>,
        /// The sample's format; default: from its name, else its content.
        #[arg(long, value_enum)]
        format: Option<SampleFormat>,
        /// Records of the sample read.
        #[arg(long, default_value_t = crate::infer::DEFAULT_ROWS)]
        rows: usize,
    },
    /// Run the data checks (`[[table.check]]`) on the whole current table (or every table
    /// with checks) and print their results; exit 1 if an `error` check fails. Batch checks
    /// (`max_reject_rate`, `row_count_change`) are skipped.
    Check {
        /// The table; default: every table with checks.
        table: Option<String>,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
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
        /// Read Delta tables as of this version (time travel); default: the latest.
        #[arg(long)]
        as_of: Option<u64>,
    },
    /// Re-derive a table's rows from its archived raw files with the current query (after a
    /// query fix): exactly the rows (and rejected rows) of those files are replaced, in one
    /// commit; the aggregates are refreshed and the warehouse loaded as after a run.
    Reprocess {
        /// The table.
        table: String,
        /// Files committed on or after this day (YYYY-MM-DD, UTC).
        #[arg(long)]
        since: Option<chrono::NaiveDate>,
        /// Files committed on or before this day (YYYY-MM-DD, UTC).
        #[arg(long)]
        until: Option<chrono::NaiveDate>,
        /// Only raw files whose key (or name under the source's folder) matches this glob.
        #[arg(long)]
        files: Option<String>,
        /// Print the files, partitions and rows that would be removed and added; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
        /// Abort the process at this step (crash tests).
        #[arg(long, hide = true)]
        crash_at: Option<String>,
    },
    /// Print the least-privilege IAM policy (JSON) for this config's lake on S3: the lake's
    /// prefixes with only the actions used on each, the Glue database, SNS topics, secrets, the
    /// Redshift Data API, the event queue.
    IamPolicy {
        /// Who it is for.
        #[arg(long, value_enum, default_value = "lambda")]
        role: crate::iam::Role,
        /// The region in ARNs (default `*`).
        #[arg(long)]
        region: Option<String>,
        /// The account id in ARNs (default `*`).
        #[arg(long)]
        account: Option<String>,
        /// The SQS queue of S3 events the workers read (its ARN).
        #[arg(long)]
        queue_arn: Option<String>,
    },
    /// Show every side effect the next run would have, writing nothing: the files it would take
    /// (and the duplicates it would skip), per table the rows written, rejected and dropped, the
    /// partitions written and files rewritten, Glue calls, archive moves, warehouse steps,
    /// notifications. It reads the pending files and runs the queries to know.
    Plan {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a static HTML page over the lake's last runs: per table the rows read, written,
    /// rejected and duplicate of each run, throughput, rejected reasons by count, failed files
    /// with their errors, warehouse statements with their times.
    Report {
        /// The page to write.
        #[arg(long)]
        html: PathBuf,
        /// How many of the last runs.
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// Print a shell completion script (`sluice completions bash > /etc/bash_completion.d/sluice`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): `sluice man > sluice.1 && man -l sluice.1`.
    Man,
    /// Compact a table's small files (plain Parquet: one sluice commit with its key index;
    /// Delta: OPTIMIZE), or every table's.
    Compact {
        /// The table; default: every table of the lake.
        table: Option<String>,
        /// Target file size, e.g. `256MiB`; default: each table's `target_file_size`.
        #[arg(long)]
        target_size: Option<String>,
        /// Crash at this step (tests).
        #[arg(long, hide = true)]
        crash_at: Option<String>,
    },
    /// The key indexes of tables with a `unique_key` (`_sluice/index/<table>/`).
    Index {
        /// What to do.
        #[command(subcommand)]
        action: IndexAction,
    },
    /// Delete the files Delta tables no longer reference and that are older than the retention.
    Vacuum {
        /// The table; default: every Delta table.
        table: Option<String>,
        /// Keep files removed less than this long ago (time travel reaches back this far).
        #[arg(long, default_value = "168h")]
        retain: String,
        /// Allow a retention shorter than 168h (readers of older versions may break).
        #[arg(long)]
        force: bool,
        /// List what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
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
    /// Process exactly the objects an S3 event names (S3 notification, SQS message, SNS
    /// envelope or EventBridge event); the same event twice does nothing the second time.
    HandleEvent {
        /// The event's JSON file, or `-` for standard input.
        #[arg(default_value = "-")]
        event: String,
        /// Print the run report as JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Keep processing: S3 events from an SQS queue (`--queue`), or the raw prefixes polled on
    /// an interval. SIGTERM or Ctrl-C finish the current run, then exit.
    Watch {
        /// The SQS queue URL that S3 event notifications arrive on.
        #[arg(long)]
        queue: Option<String>,
        /// Seconds between polls of the raw prefixes (without `--queue`).
        #[arg(long, default_value_t = 60)]
        interval: u64,
        /// Run at these times instead of polling: a cron expression in UTC (`"*/15 * * * *"`,
        /// or with seconds first: `"0 */15 * * * *"`). A tick missed while no process ran is
        /// made up once at start.
        #[arg(long, conflicts_with_all = ["queue", "every"])]
        schedule: Option<String>,
        /// Run at every multiple of this duration since the epoch (`15m`, `1h`), as `--schedule`.
        #[arg(long, conflicts_with = "queue")]
        every: Option<String>,
        /// Seconds a received message stays invisible to other workers; extended while its
        /// objects are processed.
        #[arg(long, default_value_t = 300)]
        visibility: i32,
        /// Seconds one receive call waits for messages (long polling, at most 20).
        #[arg(long, default_value_t = 20)]
        wait: i32,
    },
    /// Put every pending raw file on an SQS queue as an S3 event, one message a file, so a
    /// backlog spreads over the `sluice watch --queue` workers started on it.
    Enqueue {
        /// The queue URL (the one the workers watch).
        #[arg(long)]
        queue: String,
        /// Only this source's files.
        #[arg(long)]
        source: Option<String>,
        /// The files and messages as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The Glue Data Catalog.
    Catalog {
        /// What to do.
        #[command(subcommand)]
        action: CatalogAction,
    },
    /// The external warehouse (`[warehouse] kind = "redshift-data"` or `"postgres"`).
    Warehouse {
        /// What to do.
        #[command(subcommand)]
        action: WarehouseAction,
    },
    /// Copy the shipped fixtures into a fresh lake, run the pipeline and show the results.
    Demo {
        /// Folder for the demo project (must be empty or absent); default: a new temp folder.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Serve as a worker of the distributed engine (build feature `distributed`): queries over
    /// the lake (`engine.kind = "distributed"`, or `--workers`) run their tasks here, with
    /// sluice's functions and the config's lake storage and memory limit.
    #[cfg(feature = "distributed")]
    Worker {
        /// Address to listen on, e.g. 0.0.0.0:50051.
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
}

/// `sluice schema` commands.
#[derive(Debug, Subcommand)]
pub enum SchemaAction {
    /// Print a schema (the `schemas/*.toml` shape) drafted from the first records of a sample
    /// file: names (snake_case, `from` the file's), the narrowest type whose parser takes every
    /// sampled value, date and timestamp formats; what it is unsure of goes to stderr as `note:`
    /// lines and into the schema as comments.
    Infer {
        /// The sample file (CSV, JSON lines, JSON or Parquet; maybe `.gz` / `.zst`).
        file: PathBuf,
        /// Records of the sample read.
        #[arg(long, default_value_t = crate::infer::DEFAULT_ROWS)]
        rows: usize,
        /// The file's format; default: from its name, else its content.
        #[arg(long, value_enum)]
        format: Option<SampleFormat>,
    },
}

/// A sample file's format.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SampleFormat {
    /// Comma (or other) separated values.
    Csv,
    /// One JSON object per line.
    Jsonl,
    /// One JSON document: an array of objects, or one object.
    Json,
    /// Apache Parquet.
    Parquet,
}

impl From<SampleFormat> for crate::config::Format {
    fn from(f: SampleFormat) -> Self {
        match f {
            SampleFormat::Csv => crate::config::Format::Csv,
            SampleFormat::Jsonl => crate::config::Format::Jsonl,
            SampleFormat::Json => crate::config::Format::Json,
            SampleFormat::Parquet => crate::config::Format::Parquet,
        }
    }
}

/// `sluice catalog` commands.
#[derive(Debug, Subcommand)]
pub enum CatalogAction {
    /// Register every table and partition found in the lake in Glue (idempotent).
    Sync,
}

/// `sluice warehouse` commands.
#[derive(Debug, Subcommand)]
pub enum WarehouseAction {
    /// Run the DDL files of `queries/redshift/` (or `queries/postgres/`, or `[warehouse]
    /// deploy`) in name order: external schema, target tables, procedures.
    Deploy,
}
