//! `sluice.toml`: the pipeline's configuration as serde structs, loaded and checked.
//!
//! Unknown keys are rejected (with the key's name and line), paths are resolved relative to the
//! config file, `env:VAR` values are resolved from the environment when the config loads, and
//! `secret:<name or arn>[#<json key>]` values from AWS Secrets Manager when a run starts
//! ([`Config::resolve_secrets`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// The whole pipeline configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The pipeline's name (notifications, logs); default: the config folder's name.
    pub name: Option<String>,
    /// Where the lake lives.
    pub lake: LakeConfig,
    /// Where tables are registered besides the lake's own catalog.
    #[serde(default)]
    pub catalog: CatalogConfig,
    /// Raw inputs.
    #[serde(default, rename = "source")]
    pub sources: Vec<SourceConfig>,
    /// Clean output tables, one SQL query each.
    #[serde(default, rename = "table")]
    pub tables: Vec<TableConfig>,
    /// Aggregated tables of the embedded warehouse.
    #[serde(default, rename = "aggregate")]
    pub aggregates: Vec<AggregateConfig>,
    /// An external warehouse (Redshift, PostgreSQL) loaded after each commit.
    #[serde(default)]
    pub warehouse: WarehouseConfig,
    /// Retry policy for files that fail.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Who hears about runs.
    #[serde(default)]
    pub notify: NotifyConfig,
    /// Query engine settings.
    #[serde(default)]
    pub engine: EngineConfig,
    /// How long network calls may take.
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    /// The folder the config was loaded from: relative paths start here.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The config file itself, for error messages.
    #[serde(skip)]
    pub path: PathBuf,
}

/// `[catalog]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogConfig {
    /// `lake` (default: the lake's own catalog, `_sluice/catalog/`) or `glue` (also the AWS
    /// Glue Data Catalog, for Redshift Spectrum and Athena).
    #[serde(default)]
    pub kind: CatalogKind,
    /// The Glue database (created if missing); required with `kind = "glue"`.
    pub database: Option<String>,
}

/// Catalog kinds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CatalogKind {
    /// Only the lake's own catalog.
    #[default]
    Lake,
    /// The Glue Data Catalog as well.
    Glue,
}

/// `[lake]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LakeConfig {
    /// A folder (relative to the config file) holding `raw/`, `processed/`, ...
    pub root: String,
    /// A claim or lock older than this is taken over (its holder is presumed dead).
    #[serde(default = "default_lock_ttl")]
    pub lock_ttl_secs: u64,
    /// How long a run waits for the commit lock before giving up.
    #[serde(default = "default_lock_wait")]
    pub lock_wait_secs: u64,
    /// How many requests a run's per-file work (claims, reads, archive moves) keeps in flight
    /// at most; S3 answers each in tens of milliseconds, so one at a time is slow.
    #[serde(default = "default_concurrency")]
    pub max_concurrent_requests: usize,
}

fn default_concurrency() -> usize {
    crate::lake::DEFAULT_CONCURRENCY
}

fn default_lock_ttl() -> u64 {
    3600
}
fn default_lock_wait() -> u64 {
    600
}

/// Input file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Comma (or other) separated values with a header line.
    Csv,
    /// One JSON object per line.
    Jsonl,
    /// One JSON document per file: an array of objects, or one object.
    Json,
    /// Apache Parquet.
    Parquet,
}

impl Format {
    /// The format's name in the config (`csv`, `jsonl`, `json`, `parquet`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Jsonl => "jsonl",
            Format::Json => "json",
            Format::Parquet => "parquet",
        }
    }

    /// The file extensions this format accepts (before any `.gz` / `.zst`).
    pub fn extensions(self) -> &'static [&'static str] {
        match self {
            Format::Csv => &["csv", "tsv", "txt"],
            Format::Jsonl => &["jsonl", "ndjson", "json"],
            Format::Json => &["json"],
            Format::Parquet => &["parquet"],
        }
    }
}

/// `[[source]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Name of the source; the batch is exposed to queries as a table of this name.
    pub name: String,
    /// Prefix under the lake root; default `raw/<name>`.
    pub prefix: Option<String>,
    /// File format.
    pub format: Format,
    /// Schema file (relative to the config file), e.g. `schemas/app_logs.toml`.
    pub schema: PathBuf,
    /// CSV options.
    #[serde(default)]
    pub csv: CsvOptions,
    /// Text encoding of the files (CSV and JSON): `utf-8` (default, read as stored), `latin1`,
    /// `windows-1252`, `utf-16` (by its BOM, else little-endian), `utf-16le`, `utf-16be`, or any
    /// other WHATWG label. Other encodings are decoded to UTF-8 as the file streams; a BOM wins
    /// over the name.
    #[serde(default)]
    pub encoding: TextEncoding,
    /// How the file's column names (CSV header, JSON keys, Parquet columns) are matched to the
    /// schema's: `exact` (default) or `insensitive` (ASCII and Unicode case folded).
    #[serde(default)]
    pub header_case: HeaderCase,
    /// Freshness: data is expected at least this often (`24h`, `90m`); the source is late when
    /// its last arrival is older (see [`crate::freshness`]).
    #[serde(default)]
    pub expect_every: Option<String>,
    /// Freshness: data is expected by this time of day (`06:00`, in `timezone`); the source is
    /// late once it passed without an arrival since the previous day's.
    #[serde(default)]
    pub expect_at: Option<String>,
    /// The time zone of `expect_at`: an IANA name (`Europe/Berlin`) or an offset (`+01:00`);
    /// default UTC.
    #[serde(default)]
    pub timezone: Option<String>,
}

/// `encoding`: a raw file's text encoding, by its WHATWG label (case-insensitive). As in web
/// browsers, `latin1` and `iso-8859-1` are windows-1252 (which gives 0x80..0x9F printable
/// characters such as `€` instead of C1 controls).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TextEncoding(&'static encoding_rs::Encoding);

impl TextEncoding {
    /// The encoding, as `encoding_rs` names it.
    pub fn encoding(self) -> &'static encoding_rs::Encoding {
        self.0
    }

    /// Whether files are read as stored (UTF-8), without decoding.
    pub fn is_utf8(self) -> bool {
        self.0 == encoding_rs::UTF_8
    }
}

impl Default for TextEncoding {
    fn default() -> Self {
        TextEncoding(encoding_rs::UTF_8)
    }
}

impl std::fmt::Debug for TextEncoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.name())
    }
}

impl<'de> Deserialize<'de> for TextEncoding {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let label = String::deserialize(d)?;
        match encoding_rs::Encoding::for_label(label.trim().as_bytes()) {
            Some(e) if e != encoding_rs::REPLACEMENT => Ok(TextEncoding(e)),
            _ => Err(serde::de::Error::custom(format!(
                "unknown encoding \"{label}\" (utf-8, latin1, windows-1252, utf-16, utf-16le, \
                 utf-16be or another WHATWG label)"
            ))),
        }
    }
}

/// `header_case`: how file column names are matched to the schema's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeaderCase {
    /// Byte for byte.
    #[default]
    Exact,
    /// Ignoring case.
    Insensitive,
}

impl SourceConfig {
    /// The prefix of this source's raw files, without a trailing slash.
    pub fn raw_prefix(&self) -> String {
        self.prefix
            .clone()
            .unwrap_or_else(|| format!("raw/{}", self.name))
            .trim_matches('/')
            .to_string()
    }
}

/// `[source.csv]`: the CSV dialect.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvOptions {
    /// Field delimiter, one ASCII byte (`","`, `"\t"`, `"|"`, `";"`).
    #[serde(default = "default_delimiter")]
    pub delimiter: char,
    /// Quote character, one ASCII byte; doubled inside a quoted field (unless `escape` is set).
    #[serde(default = "default_quote")]
    pub quote: char,
    /// An escape character inside quoted fields (`"\\"`: `\"` is a quote, `\\` a backslash),
    /// instead of doubled quotes. Default: none.
    #[serde(default)]
    pub escape: Option<char>,
    /// Lines starting with this character (at a record's start, outside quotes) are skipped,
    /// before and after the header. Default: none.
    #[serde(default)]
    pub comment: Option<char>,
    /// Whether the first line names the columns (matched to the schema by name); without one,
    /// the schema's columns are the file's, in order.
    #[serde(default = "yes")]
    pub header: bool,
    /// Lines skipped at the start of the file, before the header (or the first record); row
    /// numbers stay the file's line numbers.
    #[serde(default)]
    pub skip_rows: usize,
    /// A field equal to this is null (default `""`); `null_values` takes a list.
    #[serde(default)]
    pub null_value: Option<String>,
    /// Fields equal to any of these are null (`["", "NULL", "N/A", "\\N"]`).
    #[serde(default)]
    pub null_values: Option<Vec<String>>,
    /// The longest a quoted field may be (bytes, or a size such as `"4MiB"`; default 1 MiB). A
    /// quote whose field runs past it, or to the end of the file, is an unclosed quote: its
    /// record (to the end of that quote's line) is rejected alone and reading goes on at the
    /// next line. Also bounds a rejected record's `_raw_record` (cut with a mark beyond it).
    #[serde(default = "default_max_field_size", deserialize_with = "de_field_size")]
    pub max_field_size: usize,
}

impl Default for CsvOptions {
    fn default() -> Self {
        CsvOptions {
            delimiter: default_delimiter(),
            quote: default_quote(),
            escape: None,
            comment: None,
            header: true,
            skip_rows: 0,
            null_value: None,
            null_values: None,
            max_field_size: default_max_field_size(),
        }
    }
}

impl CsvOptions {
    /// The texts that mean null: `null_values`, else `null_value`, else the empty field.
    pub fn nulls(&self) -> Vec<String> {
        match (&self.null_values, &self.null_value) {
            (Some(list), _) => list.clone(),
            (None, Some(one)) => vec![one.clone()],
            (None, None) => vec![String::new()],
        }
    }

    /// Checks the dialect: delimiter, quote, escape and comment are distinct ASCII bytes, not line
    /// ends; `null_value` and `null_values` are not both given. The error names the option.
    pub fn check(&self) -> std::result::Result<(), String> {
        let chars = [
            ("delimiter", Some(self.delimiter)),
            ("quote", Some(self.quote)),
            ("escape", self.escape),
            ("comment", self.comment),
        ];
        for (i, (name, c)) in chars.iter().enumerate() {
            let Some(c) = c else { continue };
            if !c.is_ascii() || matches!(c, '\n' | '\r') {
                return Err(format!(
                    "csv.{name} = {c:?} must be one ASCII character other than a line end"
                ));
            }
            for (other, d) in &chars[..i] {
                if *d == Some(*c) {
                    return Err(format!(
                        "csv.{name} and csv.{other} are the same character ({c:?})"
                    ));
                }
            }
        }
        if self.null_value.is_some() && self.null_values.is_some() {
            return Err(
                "csv.null_value and csv.null_values are both given: keep one \
                        (null_values takes a list)"
                    .into(),
            );
        }
        Ok(())
    }
}

fn default_max_field_size() -> usize {
    1 << 20
}

/// `csv.max_field_size`: a number of bytes or a size string.
fn de_field_size<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    let bytes = match Size::deserialize(d)? {
        Size::Bytes(n) => usize::try_from(n).map_err(serde::de::Error::custom)?,
        Size::Text(t) => parse_bytes(&t).map_err(serde::de::Error::custom)?,
    };
    if bytes == 0 {
        return Err(serde::de::Error::custom(
            "csv.max_field_size must be at least 1 byte",
        ));
    }
    Ok(bytes)
}

fn default_delimiter() -> char {
    ','
}
fn default_quote() -> char {
    '"'
}
fn yes() -> bool {
    true
}

/// `[[table]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// Table name: `processed/<name>/`, `rejected/<name>/`.
    pub name: String,
    /// The source whose batch the query reads.
    pub source: String,
    /// The SQL file, relative to the config file.
    pub query: PathBuf,
    /// Hive partition columns, in folder order.
    #[serde(default)]
    pub partition_by: Vec<String>,
    /// Columns identifying a row across runs; with `order_by`, one row per key is kept.
    #[serde(default)]
    pub unique_key: Vec<String>,
    /// Column deciding which row of a key is the latest (greatest wins).
    pub order_by: Option<String>,
    /// Parquet compression: `snappy` (default, as in Spark, Glue and DuckDB: fastest to write
    /// and read), `zstd` (level 1: about a third smaller files, so cheaper Spectrum scans),
    /// `gzip`, `none`.
    #[serde(default = "default_compression")]
    pub compression: String,
    /// `parquet` (default: Hive-partitioned Parquet) or `delta` (a Delta Lake table: each
    /// commit appears at once, versioned; needs the `delta` build feature).
    #[serde(default)]
    pub format: TableFormat,
    /// Data files are closed at about this size (default 128MiB): new rows go to new files, a
    /// rewritten file only shrinks, rows of other files are never merged in.
    pub target_file_size: Option<String>,
    /// Gaps: `daily` reports the missing dates of the first partition column (a `date`)
    /// between its first and its last partition, in `status` and the run report.
    #[serde(default)]
    pub expect_partitions: Option<String>,
    /// `[[table.check]]`: data checks run on each batch before its commit point
    /// ([`crate::checks`]).
    #[serde(default)]
    pub check: Vec<CheckConfig>,
    /// Row lineage (default true): every stored row names the raw file it came from in a last
    /// column `_sluice_source`, what `sluice reprocess` replaces rows by.
    #[serde(default = "yes")]
    pub lineage: bool,
}

/// How a failing check acts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The batch fails: nothing is published, its raw files stay for the next run.
    #[default]
    Error,
    /// Reported and notified; the batch is still published.
    Warn,
}

/// `accepted_values = { column, values }`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptedValues {
    /// The column.
    pub column: String,
    /// The values it may hold (as text; nulls pass).
    pub values: Vec<String>,
}

/// `[[table.check]]`: exactly one of the kinds, an optional `name` and `severity`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckConfig {
    /// Its name in reports; default: the kind and its columns.
    pub name: Option<String>,
    /// `error` (default) or `warn`.
    #[serde(default)]
    pub severity: Severity,
    /// Rejected rows / rows read of the batch at most this.
    pub max_reject_rate: Option<f64>,
    /// These columns hold no nulls.
    pub not_null: Option<Vec<String>>,
    /// A column holds only these values (or null).
    pub accepted_values: Option<AcceptedValues>,
    /// A SQL file (relative to the config) over the table that must return no rows.
    pub sql: Option<PathBuf>,
    /// These columns together are unique within the batch.
    pub unique: Option<Vec<String>>,
    /// The batch writes at least this many rows.
    pub min_rows: Option<u64>,
    /// Rows written within this factor of the previous commit's (both ways).
    pub row_count_change: Option<f64>,
}

impl CheckConfig {
    /// The check's kind, or why the entry is not one check.
    pub fn kind(&self) -> std::result::Result<&'static str, String> {
        let kinds: Vec<&'static str> = [
            ("max_reject_rate", self.max_reject_rate.is_some()),
            ("not_null", self.not_null.is_some()),
            ("accepted_values", self.accepted_values.is_some()),
            ("sql", self.sql.is_some()),
            ("unique", self.unique.is_some()),
            ("min_rows", self.min_rows.is_some()),
            ("row_count_change", self.row_count_change.is_some()),
        ]
        .into_iter()
        .filter(|(_, on)| *on)
        .map(|(k, _)| k)
        .collect();
        match kinds.as_slice() {
            [k] => Ok(k),
            [] => Err(
                "names no check (one of max_reject_rate, not_null, accepted_values, \
                       sql, unique, min_rows, row_count_change)"
                    .into(),
            ),
            many => Err(format!(
                "names {} checks: give each its own [[table.check]]",
                many.join(", ")
            )),
        }
    }

    /// Its name in reports: `name`, or the kind and its columns.
    pub fn label(&self) -> String {
        if let Some(n) = &self.name {
            return n.clone();
        }
        let kind = self.kind().unwrap_or("check");
        let detail = if let Some(c) = self.not_null.as_ref().or(self.unique.as_ref()) {
            c.join(",")
        } else if let Some(a) = &self.accepted_values {
            a.column.clone()
        } else if let Some(p) = &self.sql {
            p.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        } else {
            String::new()
        };
        if detail.is_empty() {
            kind.to_string()
        } else {
            format!("{kind}({detail})")
        }
    }

    /// Whether a failure fails the batch.
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl TableConfig {
    /// `target_file_size` in bytes (checked by validation).
    pub fn target_file_size(&self) -> u64 {
        self.target_file_size
            .as_deref()
            .and_then(|t| parse_bytes(t).ok())
            .unwrap_or(128 << 20) as u64
    }

    /// Whether rows are kept one per key (`unique_key` with `order_by`): such tables have a key
    /// index.
    pub fn keyed(&self) -> Option<&str> {
        self.order_by
            .as_deref()
            .filter(|_| !self.unique_key.is_empty())
    }
}

/// Table formats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableFormat {
    /// Hive-partitioned Parquet files.
    #[default]
    Parquet,
    /// A Delta Lake table.
    Delta,
}

fn default_compression() -> String {
    "snappy".to_string()
}

/// `[[aggregate]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    /// Table name under `warehouse/`.
    pub name: String,
    /// The SQL file, relative to the config file.
    pub query: PathBuf,
}

/// `[warehouse]`: where committed rows go after the lake, and what runs there.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarehouseConfig {
    /// `embedded` (default: only the `[[aggregate]]` tables in the lake), `redshift-data`
    /// (Amazon Redshift through the Data API) or `postgres` (the PostgreSQL wire protocol: any
    /// PostgreSQL, or a Redshift cluster endpoint).
    #[serde(default)]
    pub kind: WarehouseKind,
    /// Redshift Serverless workgroup (`redshift-data`; or `cluster_identifier`).
    pub workgroup_name: Option<String>,
    /// Provisioned Redshift cluster (`redshift-data`; or `workgroup_name`).
    pub cluster_identifier: Option<String>,
    /// Database name.
    pub database: Option<String>,
    /// Secrets Manager secret holding the database credentials (`redshift-data`).
    pub secret_arn: Option<String>,
    /// Database user for temporary credentials (`redshift-data` with a cluster).
    pub db_user: Option<String>,
    /// IAM role Redshift assumes to read the lake (`load = "copy"` with `redshift-data`).
    pub iam_role: Option<String>,
    /// Connection string, e.g. `postgres://user@host:5432/db?sslmode=require` (`postgres`).
    pub url: Option<String>,
    /// Host (`postgres`, without `url`).
    pub host: Option<String>,
    /// Port (`postgres`, without `url`; default 5432).
    pub port: Option<u16>,
    /// User (`postgres`, without `url`).
    pub user: Option<String>,
    /// Password (`postgres`); best as `secret:<name>#password` or `env:VAR`.
    pub password: Option<String>,
    /// `disable`, `prefer` (default) or `require` (`postgres`).
    pub sslmode: Option<String>,
    /// PEM file of the certificate authority to trust, beside the system's (`postgres`).
    pub ssl_root_cert: Option<PathBuf>,
    /// The load step: `"copy"` (the Parquet files each commit added, by COPY), or a SQL file
    /// or statement; absent: nothing is loaded.
    pub load: Option<String>,
    /// Lake tables whose files `load = "copy"` loads; default: every table.
    #[serde(default)]
    pub tables: Vec<String>,
    /// The table a lake table is copied into; `{table}` is the lake table's name.
    #[serde(default = "default_load_into")]
    pub load_into: String,
    /// Statements (SQL files or SQL) run after the load, in order, e.g.
    /// `CALL analytics.sp_build_daily_ticket_stats(:run_date)`.
    #[serde(default, deserialize_with = "one_or_many")]
    pub call: Vec<String>,
    /// Values for `:name` parameters besides `run_id` and `run_date`.
    #[serde(default)]
    pub parameters: std::collections::BTreeMap<String, String>,
    /// The DDL folder `sluice warehouse deploy` runs; default `queries/redshift` or
    /// `queries/postgres`.
    pub deploy: Option<PathBuf>,
    /// How long one statement may run before the run stops waiting (it keeps running; the
    /// next run resumes waiting for it), e.g. `"30m"`.
    #[serde(default = "default_deadline")]
    pub deadline: String,
    /// The table recording what was loaded (`postgres`), created if missing.
    #[serde(default = "default_marker_table")]
    pub marker_table: String,
}

/// Warehouse kinds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WarehouseKind {
    /// Aggregates in the lake, by DataFusion.
    #[default]
    Embedded,
    /// Amazon Redshift through the Data API.
    RedshiftData,
    /// PostgreSQL wire protocol.
    Postgres,
}

impl WarehouseKind {
    /// The name used in config and folders.
    pub fn name(self) -> &'static str {
        match self {
            WarehouseKind::Embedded => "embedded",
            WarehouseKind::RedshiftData => "redshift",
            WarehouseKind::Postgres => "postgres",
        }
    }
}

impl Default for WarehouseConfig {
    fn default() -> Self {
        WarehouseConfig {
            kind: WarehouseKind::default(),
            workgroup_name: None,
            cluster_identifier: None,
            database: None,
            secret_arn: None,
            db_user: None,
            iam_role: None,
            url: None,
            host: None,
            port: None,
            user: None,
            password: None,
            sslmode: None,
            ssl_root_cert: None,
            load: None,
            tables: Vec::new(),
            load_into: default_load_into(),
            call: Vec::new(),
            parameters: Default::default(),
            deploy: None,
            deadline: default_deadline(),
            marker_table: default_marker_table(),
        }
    }
}

fn default_load_into() -> String {
    "{table}".to_string()
}
fn default_deadline() -> String {
    "30m".to_string()
}
fn default_marker_table() -> String {
    "sluice_loads".to_string()
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

impl WarehouseConfig {
    /// Whether the load step copies the committed files.
    pub fn copies(&self) -> bool {
        self.load.as_deref() == Some("copy")
    }

    /// The statement deadline.
    pub fn deadline(&self) -> std::time::Duration {
        parse_duration(&self.deadline).unwrap_or(std::time::Duration::from_secs(1800))
    }
}

/// A duration as [`parse_duration`] reads it: `2s`, `30m`, `1h30m`, `1h0m5s`; below a second
/// in milliseconds (`250ms`).
pub fn format_duration(d: std::time::Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 || (h > 0 && s > 0) {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 {
        out.push_str(&format!("{s}s"));
    }
    out
}

/// Parses a duration such as `30m`, `90s`, `2h`, `1h30m` or `45` (seconds).
pub fn parse_duration(text: &str) -> std::result::Result<std::time::Duration, String> {
    let t = text.trim();
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(std::time::Duration::from_secs(secs));
    }
    let mut total = 0u64;
    let mut num = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num
            .parse()
            .map_err(|_| format!("\"{text}\" is not a duration (e.g. 30m, 90s, 2h)"))?;
        total += n * match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(format!("\"{text}\": unknown unit '{c}' (use s, m, h, d)")),
        };
        num.clear();
    }
    if !num.is_empty() || t.is_empty() {
        return Err(format!("\"{text}\" is not a duration (e.g. 30m, 90s, 2h)"));
    }
    Ok(std::time::Duration::from_secs(total))
}

/// `[retry]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// A file that failed this many times moves to `failed/`.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: default_attempts(),
        }
    }
}

fn default_attempts() -> u32 {
    3
}

/// `[notify]`: targets are `log`, `webhook:<url>` or `sns:<topic arn>`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// Targets told about successful runs (including runs with nothing to do: no).
    #[serde(default = "default_targets")]
    pub on_success: Vec<String>,
    /// Targets told about failed runs.
    #[serde(default = "default_targets")]
    pub on_failure: Vec<String>,
    /// Timeout of one delivery attempt.
    #[serde(default = "default_notify_timeout")]
    pub timeout_secs: u64,
    /// Further attempts after a failed delivery.
    #[serde(default = "default_notify_retries")]
    pub retries: u32,
    /// Targets told when a source becomes late and when it recovers (`expect_every`,
    /// `expect_at`); default: `on_failure`.
    #[serde(default)]
    pub on_late: Option<Vec<String>>,
}

impl NotifyConfig {
    /// The targets of `late` and `recovered` notifications: `on_late`, else `on_failure`.
    pub fn late_targets(&self) -> &[String] {
        self.on_late.as_deref().unwrap_or(&self.on_failure)
    }
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            on_success: default_targets(),
            on_failure: default_targets(),
            timeout_secs: default_notify_timeout(),
            retries: default_notify_retries(),
            on_late: None,
        }
    }
}

fn default_targets() -> Vec<String> {
    vec!["log".to_string()]
}
fn default_notify_timeout() -> u64 {
    10
}
fn default_notify_retries() -> u32 {
    2
}

/// `[engine]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// Worker threads for reading and querying; default: all cores.
    pub threads: Option<usize>,
    /// Memory the run may use, e.g. `"512MiB"` or `"2GB"`; default 1 GiB. Chunk sizes, write
    /// buffers, open writers and the query engine's pool are cut from it; sorts and joins in a
    /// query spill to disk beyond their share.
    pub memory_limit: Option<String>,
    /// How long a run may last, e.g. `"2h"`; then it stops at its next safe point (between
    /// sources, before a commit, between warehouse steps, while waiting for the network),
    /// releases its locks and fails. Default: no limit.
    pub max_runtime: Option<String>,
    /// Raw files a batch takes at most, per source (Glue's `boundedFiles`); a run takes batch
    /// after batch until no unclaimed file is left, so workers started together share a backlog
    /// batch by batch instead of the first taking all of it. Default: no bound.
    pub batch_files: Option<usize>,
    /// Where queries over the lake's tables run (the aggregates, `sluice query`, `sluice check`):
    /// `local` (this process, the default) or `distributed` (on `sluice worker` processes, build
    /// feature `distributed`). Ingest always runs in this process.
    #[serde(default)]
    pub kind: EngineKind,
    /// The workers (`http://host:port`) of `kind = "distributed"`.
    #[serde(default)]
    pub workers: Vec<String>,
    /// About how many bytes of Parquet one task of a distributed query reads, e.g. `"16MiB"`
    /// (the default): fewer bytes, more tasks spread over the workers.
    pub task_size: Option<String>,
}

/// Where queries over the lake run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// In this process.
    #[default]
    Local,
    /// On the workers of `engine.workers`.
    Distributed,
}

/// `[timeouts]`: every network call gives up after these (durations such as `"30s"`, `"5m"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// Opening a connection, TCP, TLS and PostgreSQL's startup and login included: PostgreSQL,
    /// webhooks, S3 and the other AWS services.
    #[serde(default = "default_connect_timeout")]
    pub connect: String,
    /// One PostgreSQL statement, or one step's COPY, before it is cancelled.
    #[serde(default = "default_statement_timeout")]
    pub statement: String,
    /// One request to S3 or another AWS service, the answer's body included (each attempt).
    #[serde(default = "default_request_timeout")]
    pub request: String,
    /// One AWS call with its retries.
    #[serde(default = "default_operation_timeout")]
    pub operation: String,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        TimeoutsConfig {
            connect: default_connect_timeout(),
            statement: default_statement_timeout(),
            request: default_request_timeout(),
            operation: default_operation_timeout(),
        }
    }
}

// A connection that is not up after 30 s will not come up: the default of most clients (curl
// takes 300 s), and well above a TLS handshake across the world (< 1 s).
fn default_connect_timeout() -> String {
    "30s".to_string()
}
// A load copies a whole unit of commits and a call rebuilds aggregates: minutes on a big
// backlog, never an hour; as long as a Redshift statement's `deadline`.
fn default_statement_timeout() -> String {
    "30m".to_string()
}
// The largest S3 requests are an 8 MiB part of an upload and a 16 MiB range of a download:
// 5 minutes is 55 KB/s, far below any link that works; SQS long polls take 20 s.
fn default_request_timeout() -> String {
    "5m".to_string()
}
// Three attempts of a request (the SDK's standard retries).
fn default_operation_timeout() -> String {
    "15m".to_string()
}

/// The checked timeouts of `[timeouts]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// See [`TimeoutsConfig::connect`].
    pub connect: std::time::Duration,
    /// See [`TimeoutsConfig::statement`].
    pub statement: std::time::Duration,
    /// See [`TimeoutsConfig::request`].
    pub request: std::time::Duration,
    /// See [`TimeoutsConfig::operation`].
    pub operation: std::time::Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        TimeoutsConfig::default().parsed().unwrap_or(Timeouts {
            connect: std::time::Duration::from_secs(30),
            statement: std::time::Duration::from_secs(1800),
            request: std::time::Duration::from_secs(300),
            operation: std::time::Duration::from_secs(900),
        })
    }
}

impl TimeoutsConfig {
    /// The durations, or the first key that is not one (or is zero).
    pub fn parsed(&self) -> std::result::Result<Timeouts, String> {
        let get = |key: &str, text: &str| match parse_duration(text) {
            Ok(d) if d.is_zero() => Err(format!("timeouts.{key} must be more than 0s")),
            Ok(d) => Ok(d),
            Err(e) => Err(format!("timeouts.{key}: {e}")),
        };
        Ok(Timeouts {
            connect: get("connect", &self.connect)?,
            statement: get("statement", &self.statement)?,
            request: get("request", &self.request)?,
            operation: get("operation", &self.operation)?,
        })
    }

    /// The durations (checked when the config was loaded).
    pub fn get(&self) -> Timeouts {
        self.parsed().unwrap_or_default()
    }
}

/// Default memory limit of a run.
pub const DEFAULT_MEMORY_LIMIT: usize = 1 << 30;

/// How a run spends its memory limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The limit itself, bytes.
    pub limit: usize,
    /// Raw bytes a reader takes at a time.
    pub chunk_bytes: usize,
    /// Rows held back before they are written, bytes (dedup across the batch settles most
    /// duplicates while they are still in memory).
    pub buffer_bytes: usize,
    /// Parquet files with a row group in memory at once.
    pub max_writers: usize,
    /// The query engine's pool for sorts, joins and windows, bytes.
    pub pool_bytes: usize,
}

impl Budget {
    /// The shares of `limit`.
    pub fn new(limit: usize) -> Budget {
        Budget {
            limit,
            chunk_bytes: (limit / 128).clamp(1 << 20, 8 << 20),
            // A buffer of 32 MiB at the default limit settles nearly every duplicate of the
            // benchmark workloads before it is written (16 MiB left 5-8 files to rewrite).
            buffer_bytes: limit / 32,
            max_writers: (limit / (256 << 20)).clamp(2, 16),
            pool_bytes: limit / 4,
        }
    }
}

impl EngineConfig {
    /// The configured worker threads, or all cores.
    pub fn threads(&self) -> usize {
        self.threads.unwrap_or_else(all_cores)
    }

    /// The run's time limit (checked when the config was loaded); `None`: no limit.
    pub fn max_runtime(&self) -> Option<std::time::Duration> {
        self.max_runtime
            .as_deref()
            .and_then(|s| parse_duration(s).ok())
    }

    /// The memory limit in bytes (checked when the config was loaded).
    pub fn memory_limit(&self) -> usize {
        self.memory_limit
            .as_deref()
            .and_then(|s| parse_size(s).ok())
            .unwrap_or(DEFAULT_MEMORY_LIMIT)
    }

    /// How the memory limit is spent.
    pub fn budget(&self) -> Budget {
        Budget::new(self.memory_limit())
    }

    /// The engine's workers as URLs, checked: some for `distributed`, each `http(s)://host:port`,
    /// and a binary built with them.
    pub fn check_workers(&self) -> std::result::Result<Vec<url::Url>, String> {
        let urls = self
            .workers
            .iter()
            .map(|w| {
                url::Url::parse(w)
                    .ok()
                    .filter(|u| matches!(u.scheme(), "http" | "https") && u.port().is_some())
                    .ok_or_else(|| format!("engine.workers: {w:?} is not http://host:port"))
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        if self.kind == EngineKind::Distributed {
            if urls.is_empty() {
                return Err(
                    "engine.kind = \"distributed\" needs engine.workers (or --workers)".into(),
                );
            }
            if !cfg!(feature = "distributed") {
                return Err(
                    "engine.kind = \"distributed\": this sluice was built without the \
                            `distributed` feature (cargo build --features distributed)"
                        .into(),
                );
            }
        }
        Ok(urls)
    }

    /// Bytes of Parquet per task of a distributed query (checked when the config was loaded).
    pub fn task_size(&self) -> usize {
        self.task_size
            .as_deref()
            .and_then(|s| parse_bytes(s).ok())
            .unwrap_or(16 << 20)
            .max(1)
    }
}

/// Parses a size such as `512MiB`, `1.5GB`, `2g` or `1048576` (bytes); K/M/G/T are powers of
/// 1024, like Spark and DuckDB read them.
pub fn parse_size(text: &str) -> std::result::Result<usize, String> {
    let bytes = parse_bytes(text)?;
    if bytes < 64 << 20 {
        return Err(format!("\"{text}\" is too small: at least 64MiB"));
    }
    Ok(bytes)
}

/// Parses a size as [`parse_size`] does, without its 64 MiB floor.
pub fn parse_bytes(text: &str) -> std::result::Result<usize, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("\"{text}\" is not a size (e.g. 512MiB, 2GB)"))?;
    let unit = unit.trim().to_ascii_lowercase();
    let scale: f64 = match unit.trim_end_matches('b').trim_end_matches('i') {
        "" => 1.0,
        "k" => 1024.0,
        "m" => 1024.0 * 1024.0,
        "g" => 1024.0 * 1024.0 * 1024.0,
        "t" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(format!(
                "\"{text}\": unknown unit \"{unit}\" (use KiB, MiB, GiB)"
            ));
        }
    };
    Ok((value * scale) as usize)
}

/// The number of cores this process may use.
pub fn all_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

impl Config {
    /// Loads and checks a config file.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::config(path, format!("cannot read the file: {e}")))?;
        Self::parse(&text, path)
    }

    /// Parses config text as if read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let mut config: Config =
            toml::from_str(text).map_err(|e| Error::config(path, e.to_string().trim_end()))?;
        config.path = path.to_path_buf();
        config.base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        config.resolve_env()?;
        config.check()?;
        Ok(config)
    }

    /// A path from the config, relative to the config file's folder.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// The lake root: `s3://bucket/prefix`, or a folder relative to the config file.
    pub fn lake_root(&self) -> String {
        if self.lake.root.starts_with("s3://") {
            self.lake.root.clone()
        } else {
            self.resolve(Path::new(&self.lake.root))
                .to_string_lossy()
                .into_owned()
        }
    }

    /// The pipeline's name: `name`, or the config folder's name.
    pub fn pipeline_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            std::path::absolute(&self.base_dir)
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "sluice".to_string())
        })
    }

    /// The table of this name.
    pub fn table(&self, name: &str) -> Option<&TableConfig> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// The source of this name.
    pub fn source(&self, name: &str) -> Option<&SourceConfig> {
        self.sources.iter().find(|s| s.name == name)
    }

    /// The table fed by this source (one table per source).
    pub fn table_for_source(&self, source: &str) -> Option<&TableConfig> {
        self.tables.iter().find(|t| t.source == source)
    }

    /// The settings that may be given as `env:` or `secret:` references, with their keys.
    /// The `secret:` references of the config (without the prefix), as written.
    pub fn secret_references(&self) -> Vec<String> {
        let mut copy = self.clone();
        copy.referable()
            .into_iter()
            .filter_map(|(_, v)| v.strip_prefix("secret:").map(str::to_string))
            .collect()
    }

    fn referable(&mut self) -> Vec<(&'static str, &mut String)> {
        let mut out: Vec<(&'static str, &mut String)> = vec![("lake.root", &mut self.lake.root)];
        if let Some(db) = self.catalog.database.as_mut() {
            out.push(("catalog.database", db));
        }
        let w = &mut self.warehouse;
        for (key, v) in [
            ("warehouse.url", &mut w.url),
            ("warehouse.host", &mut w.host),
            ("warehouse.user", &mut w.user),
            ("warehouse.password", &mut w.password),
            ("warehouse.database", &mut w.database),
            ("warehouse.secret_arn", &mut w.secret_arn),
            ("warehouse.iam_role", &mut w.iam_role),
            ("warehouse.workgroup_name", &mut w.workgroup_name),
            ("warehouse.cluster_identifier", &mut w.cluster_identifier),
        ] {
            if let Some(v) = v.as_mut() {
                out.push((key, v));
            }
        }
        out.extend(
            self.notify
                .on_success
                .iter_mut()
                .map(|t| ("notify.on_success", t)),
        );
        out.extend(
            self.notify
                .on_failure
                .iter_mut()
                .map(|t| ("notify.on_failure", t)),
        );
        out.extend(
            self.notify
                .on_late
                .iter_mut()
                .flatten()
                .map(|t| ("notify.on_late", t)),
        );
        out
    }

    fn resolve_env(&mut self) -> Result<()> {
        let path = self.path.clone();
        for (key, v) in self.referable() {
            if let Some(var) = v.strip_prefix("env:") {
                *v = std::env::var(var).map_err(|_| {
                    Error::config(
                        &path,
                        format!(
                            "{key} = \"env:{var}\" but the environment variable {var} is not set"
                        ),
                    )
                })?;
            }
            if !v.starts_with("secret:") {
                crate::redact::config_value(key, v, None);
            }
        }
        Ok(())
    }

    /// Resolves `secret:` references through Secrets Manager (each secret fetched once), then
    /// checks the config again with the values. Every value, and the sensitive parts of it, is
    /// registered to be masked in every output ([`crate::redact`]).
    pub async fn resolve_secrets(&mut self) -> Result<()> {
        let path = self.path.clone();
        let mut resolved = false;
        for (key, v) in self.referable() {
            if let Some(reference) = v.strip_prefix("secret:") {
                let reference = reference.to_string();
                *v = crate::secrets::fetch(&reference)
                    .await
                    .map_err(|e| Error::config(&path, format!("{key}: {e}")))?;
                crate::redact::config_value(key, v, Some(&reference));
                resolved = true;
            }
        }
        if resolved {
            self.check()?;
        }
        Ok(())
    }

    fn check(&self) -> Result<()> {
        let err = |m: String| Err(Error::config(&self.path, m));
        for t in &self.tables {
            for (i, c) in t.check.iter().enumerate() {
                let at = format!("table {} check {} ({})", t.name, i + 1, c.label());
                if let Err(e) = c.kind() {
                    return err(format!("{at}: {e}"));
                }
                if let Some(r) = c.max_reject_rate
                    && !(0.0..=1.0).contains(&r)
                {
                    return err(format!("{at}: max_reject_rate must be between 0 and 1"));
                }
                if let Some(f) = c.row_count_change
                    && (f.is_nan() || f < 1.0)
                {
                    return err(format!(
                        "{at}: row_count_change must be a factor of at least 1"
                    ));
                }
                if c.not_null
                    .as_ref()
                    .or(c.unique.as_ref())
                    .is_some_and(Vec::is_empty)
                {
                    return err(format!("{at}: names no column"));
                }
            }
        }
        if let Some(limit) = &self.engine.memory_limit
            && let Err(e) = parse_size(limit)
        {
            return err(format!("engine.memory_limit: {e}"));
        }
        if let Some(limit) = &self.engine.max_runtime
            && let Err(e) = parse_duration(limit)
        {
            return err(format!("engine.max_runtime: {e}"));
        }
        if let Some(size) = &self.engine.task_size
            && let Err(e) = parse_bytes(size)
        {
            return err(format!("engine.task_size: {e}"));
        }
        if let Err(e) = self.engine.check_workers() {
            return err(e);
        }
        if self.engine.batch_files == Some(0) {
            return err("engine.batch_files must be at least 1 (leave it out for no bound)".into());
        }
        if let Err(e) = self.timeouts.parsed() {
            return err(e);
        }
        if let Some(rest) = self.lake.root.strip_prefix("s3://")
            && rest.split('/').next().is_none_or(str::is_empty)
        {
            return err(format!(
                "lake.root = \"{}\" names no bucket (s3://bucket/prefix)",
                self.lake.root
            ));
        }
        let mut names = HashSet::new();
        for s in &self.sources {
            if !is_identifier(&s.name) {
                return err(format!(
                    "source name \"{}\" must be a SQL identifier (letters, digits, _)",
                    s.name
                ));
            }
            if !names.insert(s.name.as_str()) {
                return err(format!("source \"{}\" is defined twice", s.name));
            }
            if let Err(e) = s.csv.check() {
                return err(format!("source \"{}\": {e}", s.name));
            }
            if s.format == Format::Parquet && !s.encoding.is_utf8() {
                return err(format!(
                    "source \"{}\": encoding applies to CSV and JSON sources, not Parquet",
                    s.name
                ));
            }
        }
        let mut tables = HashSet::new();
        let mut fed = HashSet::new();
        for t in &self.tables {
            if !is_identifier(&t.name) {
                return err(format!(
                    "table name \"{}\" must be a SQL identifier (letters, digits, _)",
                    t.name
                ));
            }
            if !tables.insert(t.name.as_str()) {
                return err(format!("table \"{}\" is defined twice", t.name));
            }
            if let Some(size) = &t.target_file_size {
                match parse_bytes(size) {
                    Ok(b) if b >= 1 << 20 => {}
                    Ok(_) => {
                        return err(format!(
                            "table \"{}\": target_file_size \"{size}\" is too small: at least 1MiB",
                            t.name
                        ));
                    }
                    Err(e) => return err(format!("table \"{}\": target_file_size: {e}", t.name)),
                }
            }
            if self.source(&t.source).is_none() {
                return err(format!(
                    "table \"{}\" reads source \"{}\", which is not defined",
                    t.name, t.source
                ));
            }
            if !fed.insert(t.source.as_str()) {
                return err(format!(
                    "source \"{}\" feeds more than one table; one table per source is supported",
                    t.source
                ));
            }
            if t.unique_key.is_empty() != t.order_by.is_none() {
                return err(format!(
                    "table \"{}\": unique_key and order_by go together",
                    t.name
                ));
            }
            if t.format == TableFormat::Delta && !cfg!(feature = "delta") {
                return err(format!(
                    "table \"{}\": format = \"delta\" needs a sluice built with Delta Lake support (cargo build --features delta)",
                    t.name
                ));
            }
            if !["zstd", "snappy", "gzip", "none"].contains(&t.compression.as_str()) {
                return err(format!(
                    "table \"{}\": compression \"{}\" is not one of zstd, snappy, gzip, none",
                    t.name, t.compression
                ));
            }
        }
        for a in &self.aggregates {
            if !is_identifier(&a.name) {
                return err(format!(
                    "aggregate name \"{}\" must be a SQL identifier (letters, digits, _)",
                    a.name
                ));
            }
            if !tables.insert(a.name.as_str()) {
                return err(format!(
                    "aggregate \"{}\" has the name of another table or aggregate",
                    a.name
                ));
            }
        }
        for target in self
            .notify
            .on_success
            .iter()
            .chain(&self.notify.on_failure)
            .chain(self.notify.on_late.iter().flatten())
        {
            if !(target == "log"
                || target.starts_with("webhook:")
                || target.starts_with("sns:arn:")
                || target.starts_with("secret:"))
            {
                return err(format!(
                    "notify target \"{}\" is not \"log\", \"webhook:<url>\" or \"sns:<topic arn>\"",
                    crate::secrets::redact(target)
                ));
            }
        }
        if self.catalog.kind == CatalogKind::Glue
            && self.catalog.database.as_deref().is_none_or(str::is_empty)
        {
            return err("catalog.kind = \"glue\" needs catalog.database".to_string());
        }
        if self.retry.max_attempts == 0 {
            return err("retry.max_attempts must be at least 1".to_string());
        }
        if let Err(e) = crate::freshness::check_config(self) {
            return err(e);
        }
        self.check_warehouse()
    }

    fn check_warehouse(&self) -> Result<()> {
        let err = |m: String| Err(Error::config(&self.path, m));
        let w = &self.warehouse;
        if let Err(e) = parse_duration(&w.deadline) {
            return err(format!("warehouse.deadline: {e}"));
        }
        for t in &w.tables {
            if self.table(t).is_none() {
                return err(format!(
                    "warehouse.tables names \"{t}\", which is not a [[table]]"
                ));
            }
        }
        let set = |v: &Option<String>| v.as_deref().is_some_and(|s| !s.is_empty());
        match w.kind {
            WarehouseKind::Embedded => {
                if w.load.is_some() || !w.call.is_empty() {
                    return err(
                        "warehouse.load and warehouse.call need warehouse.kind = \"redshift-data\" or \"postgres\""
                            .to_string(),
                    );
                }
            }
            WarehouseKind::RedshiftData => {
                if set(&w.workgroup_name) == set(&w.cluster_identifier) {
                    return err(
                        "warehouse.kind = \"redshift-data\" needs exactly one of workgroup_name and cluster_identifier"
                            .to_string(),
                    );
                }
                if !set(&w.database) {
                    return err(
                        "warehouse.kind = \"redshift-data\" needs warehouse.database".to_string(),
                    );
                }
                if w.copies() {
                    if !set(&w.iam_role) {
                        return err("warehouse.load = \"copy\" on Redshift needs warehouse.iam_role (the role Redshift reads the lake with)".to_string());
                    }
                    if !self.lake.root.starts_with("s3://")
                        && !self.lake.root.starts_with("secret:")
                    {
                        return err("warehouse.load = \"copy\" on Redshift needs an s3:// lake (Redshift reads the files from S3)".to_string());
                    }
                }
            }
            WarehouseKind::Postgres => {
                if !set(&w.url) && !set(&w.host) {
                    return err(
                        "warehouse.kind = \"postgres\" needs warehouse.url or warehouse.host"
                            .to_string(),
                    );
                }
                if let Some(mode) = &w.sslmode
                    && !["disable", "prefer", "require"].contains(&mode.as_str())
                {
                    return err(format!(
                        "warehouse.sslmode \"{mode}\" is not one of disable, prefer, require"
                    ));
                }
            }
        }
        if !w.load_into.contains("{table}") && w.tables.len() != 1 && w.copies() {
            return err(
                "warehouse.load_into must contain {table} when more than one table is loaded"
                    .to_string(),
            );
        }
        Ok(())
    }
}

/// Whether `s` can name a table without quoting.
fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_spark_and_duckdb() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1GB"), Ok(1 << 30));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        assert_eq!(parse_size(" 2 GiB "), Ok(2 << 30));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("10MB").unwrap_err().contains("too small"));
        assert!(
            parse_size("3 parsecs")
                .unwrap_err()
                .contains("unknown unit")
        );
        let b = Budget::new(512 << 20);
        assert!(b.chunk_bytes + b.buffer_bytes + b.pool_bytes < b.limit);
    }

    const MINIMAL: &str = r#"
[lake]
root = "lake"

[[source]]
name = "logs"
format = "jsonl"
schema = "schemas/logs.toml"

[[table]]
name = "clean_logs"
source = "logs"
query = "queries/clean_logs.sql"
partition_by = ["event_date"]
"#;

    #[test]
    fn parses_minimal_config() {
        let c = Config::parse(MINIMAL, Path::new("/x/sluice.toml")).unwrap();
        assert_eq!(c.sources[0].raw_prefix(), "raw/logs");
        assert_eq!(c.lake_root(), "/x/lake");
        assert_eq!(c.retry.max_attempts, 3);
    }

    #[test]
    fn csv_max_field_size_takes_bytes_or_a_size() {
        let with = |v: &str| {
            let text = MINIMAL.replace(
                "schema = \"schemas/logs.toml\"",
                &format!("schema = \"schemas/logs.toml\"\ncsv = {{ max_field_size = {v} }}"),
            );
            Config::parse(&text, Path::new("sluice.toml")).map(|c| c.sources[0].csv.max_field_size)
        };
        assert_eq!(with("4096").unwrap(), 4096);
        assert_eq!(with("\"4MiB\"").unwrap(), 4 << 20);
        let e = with("0").unwrap_err().to_string();
        assert!(e.contains("max_field_size"), "{e}");
        assert!(with("\"lots\"").is_err());
        let c = Config::parse(MINIMAL, Path::new("sluice.toml")).unwrap();
        assert_eq!(c.sources[0].csv.max_field_size, 1 << 20);
    }

    /// The CSV dialect's characters are single distinct ASCII bytes, `null_value` and
    /// `null_values` exclude each other, and encodings are WHATWG labels: the error names the
    /// option.
    #[test]
    fn csv_dialect_and_encoding_are_checked() {
        let with = |v: &str| {
            let text = MINIMAL.replace(
                "schema = \"schemas/logs.toml\"",
                &format!("schema = \"schemas/logs.toml\"\n{v}"),
            );
            Config::parse(&text, Path::new("sluice.toml"))
        };
        let c = with(r##"csv = { delimiter = "\t", escape = "\\", comment = "#", skip_rows = 2, null_values = ["", "\\N"] }"##)
            .unwrap();
        let csv = &c.sources[0].csv;
        assert_eq!(
            (csv.delimiter, csv.escape, csv.comment),
            ('\t', Some('\\'), Some('#'))
        );
        assert_eq!(
            (csv.skip_rows, csv.nulls()),
            (2, vec![String::new(), "\\N".into()])
        );
        assert_eq!(
            with("csv = { null_value = \"NA\" }").unwrap().sources[0]
                .csv
                .nulls(),
            ["NA"]
        );
        assert_eq!(CsvOptions::default().nulls(), [""]);
        for (v, wanted) in [
            (r#"csv = { escape = "\\\\" }"#, "escape"),
            (r#"csv = { delimiter = ";;" }"#, "delimiter"),
            (r#"csv = { quote = "é" }"#, "csv.quote"),
            (r#"csv = { comment = "\n" }"#, "csv.comment"),
            (
                r#"csv = { delimiter = "|", escape = "|" }"#,
                "csv.escape and csv.delimiter",
            ),
            (r#"csv = { comment = '"' }"#, "csv.comment and csv.quote"),
            (
                r#"csv = { null_value = "", null_values = ["NA"] }"#,
                "null_values",
            ),
            ("encoding = \"klingon\"", "unknown encoding \"klingon\""),
        ] {
            let e = with(v).unwrap_err().to_string();
            assert!(e.contains(wanted), "{v}: {e}");
        }
        for (label, name) in [
            ("latin1", "windows-1252"),
            ("ISO-8859-1", "windows-1252"),
            ("windows-1252", "windows-1252"),
            ("utf-16", "UTF-16LE"),
            ("utf-16be", "UTF-16BE"),
            ("utf-8", "UTF-8"),
        ] {
            let c = with(&format!("encoding = \"{label}\"")).unwrap();
            assert_eq!(c.sources[0].encoding.encoding().name(), name);
        }
        let parquet = MINIMAL.replace(
            "format = \"jsonl\"",
            "format = \"parquet\"\nencoding = \"latin1\"",
        );
        assert_ne!(parquet, MINIMAL);
        let e = Config::parse(&parquet, Path::new("sluice.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("encoding applies to CSV and JSON"), "{e}");
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text = MINIMAL.replace("partition_by", "partiton_by");
        let e = Config::parse(&text, Path::new("sluice.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("partiton_by"), "{e}");
        assert!(e.contains("line 14"), "{e}");
    }

    #[test]
    fn unique_key_needs_order_by() {
        let text = MINIMAL.replace("partition_by = [\"event_date\"]", "unique_key = [\"id\"]");
        let e = Config::parse(&text, Path::new("sluice.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unique_key and order_by go together"), "{e}");
    }

    #[test]
    fn warehouse_settings_are_checked() {
        let check = |extra: &str| {
            Config::parse(
                &format!("{MINIMAL}\n[warehouse]\n{extra}"),
                Path::new("sluice.toml"),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
        };
        assert!(
            check("call = \"CALL x()\"")
                .unwrap_err()
                .contains("need warehouse.kind")
        );
        let e = check("kind = \"redshift-data\"\ndatabase = \"dev\"").unwrap_err();
        assert!(
            e.contains("exactly one of workgroup_name and cluster_identifier"),
            "{e}"
        );
        let rs = "kind = \"redshift-data\"\ndatabase = \"dev\"\nworkgroup_name = \"wg\"\nload = \"copy\"";
        assert!(check(rs).unwrap_err().contains("iam_role"));
        let e = check(&format!("{rs}\niam_role = \"arn:r\"")).unwrap_err();
        assert!(e.contains("needs an s3:// lake"), "{e}");
        assert!(
            check("kind = \"postgres\"")
                .unwrap_err()
                .contains("url or warehouse.host")
        );
        let e = check("kind = \"postgres\"\nhost = \"h\"\nsslmode = \"maybe\"").unwrap_err();
        assert!(e.contains("sslmode"), "{e}");
        let e = check("kind = \"postgres\"\nhost = \"h\"\ndeadline = \"soon\"").unwrap_err();
        assert!(e.contains("warehouse.deadline"), "{e}");
        let e = check("kind = \"postgres\"\nhost = \"h\"\ntables = [\"nope\"]").unwrap_err();
        assert!(e.contains("\"nope\", which is not a [[table]]"), "{e}");
        check("kind = \"postgres\"\nhost = \"h\"\ncall = [\"CALL a()\", \"b.sql\"]").unwrap();
    }

    #[test]
    fn timeouts_have_defaults_and_are_checked() {
        let c = Config::parse(MINIMAL, Path::new("sluice.toml")).unwrap();
        let t = c.timeouts.get();
        assert_eq!(t.connect, std::time::Duration::from_secs(30));
        assert_eq!(t.statement, std::time::Duration::from_secs(1800));
        assert_eq!(c.engine.max_runtime(), None);
        let with = |extra: &str| {
            Config::parse(&format!("{MINIMAL}\n{extra}"), Path::new("sluice.toml"))
                .map_err(|e| e.to_string())
        };
        let c = with("[timeouts]\nconnect = \"2s\"\n[engine]\nmax_runtime = \"1h30m\"").unwrap();
        assert_eq!(c.timeouts.get().connect, std::time::Duration::from_secs(2));
        assert_eq!(
            c.engine.max_runtime(),
            Some(std::time::Duration::from_secs(5400))
        );
        let e = with("[timeouts]\nstatement = \"soon\"").unwrap_err();
        assert!(e.contains("timeouts.statement"), "{e}");
        let e = with("[timeouts]\nconnect = \"0s\"").unwrap_err();
        assert!(e.contains("more than 0s"), "{e}");
        let e = with("[timeouts]\nconect = \"2s\"").unwrap_err();
        assert!(e.contains("conect"), "{e}");
        let e = with("[engine]\nmax_runtime = \"2 hours\"").unwrap_err();
        assert!(e.contains("engine.max_runtime"), "{e}");
    }

    #[test]
    fn durations_format_as_they_parse() {
        for (secs, text) in [
            (2, "2s"),
            (1800, "30m"),
            (5400, "1h30m"),
            (3605, "1h0m5s"),
            (7200, "2h"),
        ] {
            let d = std::time::Duration::from_secs(secs);
            assert_eq!(format_duration(d), text);
            assert_eq!(parse_duration(text), Ok(d));
        }
        assert_eq!(
            format_duration(std::time::Duration::from_millis(250)),
            "250ms"
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(
            parse_duration("30m"),
            Ok(std::time::Duration::from_secs(1800))
        );
        assert_eq!(
            parse_duration("1h30m"),
            Ok(std::time::Duration::from_secs(5400))
        );
        assert_eq!(parse_duration("45"), Ok(std::time::Duration::from_secs(45)));
        assert!(parse_duration("3 weeks").is_err());
        assert!(parse_duration("10").is_ok());
        assert!(parse_duration("m").is_err());
    }
}
