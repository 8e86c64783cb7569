//! PostgreSQL wire protocol (any PostgreSQL, or a Redshift cluster endpoint): committed
//! Parquet files streamed in with `COPY ... FROM STDIN (FORMAT binary)`, and statements run
//! once each, every load and call in one transaction with its marker row.
//!
//! Timeouts (`[timeouts]`): the whole connect phase (TCP, TLS, startup and login) gives up
//! after `connect`; a statement or a step's COPY after `statement`, when the server is asked
//! to cancel it and the connection is dropped (its transaction rolls back; a retry connects
//! again).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use chrono::{DateTime, NaiveDate};
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{
    DataType, Date32Type, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type,
    TimeUnit, TimestampMicrosecondType,
};
use futures::pin_mut;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::config::SslMode;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::catalog::TableMeta;
use crate::config::{Config, format_duration};
use crate::error::{Error, Result};
use crate::lake::Lake;
use crate::sink::{TableFile, read_table_file};

/// A connection to the warehouse.
pub struct Postgres {
    client: tokio_postgres::Client,
    marker_table: String,
    /// `host:port/db`, for messages.
    pub target: String,
    /// The step it serves (`warehouse load`, `warehouse deploy`), for messages.
    step: String,
    tls: MakeRustlsConnect,
    connect_timeout: Duration,
    statement_timeout: Duration,
    /// A statement timed out: the connection is in an unknown state and is not used again.
    broken: AtomicBool,
}

fn fail(message: impl Into<String>) -> Error {
    Error::Warehouse {
        target: "postgres".into(),
        message: message.into(),
    }
}

/// A PostgreSQL error as one line: the server's severity, code, message, detail and hint.
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut text = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        for (label, part) in [
            ("DETAIL", db.detail()),
            ("HINT", db.hint()),
            ("CONTEXT", db.where_()),
        ] {
            if let Some(p) = part {
                text.push_str(&format!(" ({label}: {p})"));
            }
        }
        return text;
    }
    crate::error::chain(e)
}

impl Postgres {
    /// The connection settings of the config's URL or host/port/user/password, and the
    /// server as `host:port/db` for messages.
    fn settings(config: &Config) -> Result<(tokio_postgres::Config, String)> {
        let w = &config.warehouse;
        let mut pg: tokio_postgres::Config = match &w.url {
            Some(url) => url.parse().map_err(|e| {
                Error::config(
                    &config.path,
                    format!("warehouse.url is not a connection string: {e}"),
                )
            })?,
            None => tokio_postgres::Config::new(),
        };
        if let Some(h) = &w.host {
            pg.host(h);
        }
        if let Some(p) = w.port {
            pg.port(p);
        }
        if let Some(u) = &w.user {
            pg.user(u);
        }
        if let Some(p) = &w.password {
            pg.password(p.as_str());
        }
        if let Some(d) = &w.database {
            pg.dbname(d);
        }
        if let Some(mode) = &w.sslmode {
            pg.ssl_mode(match mode.as_str() {
                "disable" => SslMode::Disable,
                "require" => SslMode::Require,
                _ => SslMode::Prefer,
            });
        }
        pg.application_name("sluice");
        // The TCP connect of each address; `connect` bounds TLS and startup too.
        pg.connect_timeout(config.timeouts.get().connect);
        let target = format!(
            "{}:{}/{}",
            pg.get_hosts()
                .first()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    #[allow(unreachable_patterns)]
                    other => format!("{other:?}"),
                })
                .unwrap_or_else(|| "localhost".into()),
            pg.get_ports().first().copied().unwrap_or(5432),
            pg.get_dbname().unwrap_or("")
        );
        Ok((pg, target))
    }

    /// The configured server as `host:port/db`, for messages.
    pub fn target(config: &Config) -> String {
        Postgres::settings(config)
            .map(|(_, t)| t)
            .unwrap_or_else(|_| "(an invalid warehouse.url)".to_string())
    }

    /// Connects with the config's URL or host/port/user/password, TLS as `sslmode` asks, and
    /// creates the marker table if missing; `step` names what the connection is for in
    /// messages. The whole connect phase gives up after `[timeouts] connect`.
    pub async fn connect(config: &Config, step: &str) -> Result<Postgres> {
        let w = &config.warehouse;
        let timeouts = config.timeouts.get();
        let (pg, target) = Postgres::settings(config)?;
        let tls = tls_connector(config)?;
        let connecting = async {
            pg.connect(tls.clone())
                .await
                .map_err(|e| fail(format!("cannot connect to {target}: {}", describe(&e))))
        };
        let (client, connection) = crate::timeout::within(
            timeouts.connect,
            step,
            || format!("connecting to postgres {target}"),
            connecting,
        )
        .await?;
        let conn_target = target.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(target = %conn_target, error = %describe(&e), "warehouse connection closed");
            }
        });
        let me = Postgres {
            client,
            marker_table: w.marker_table.clone(),
            target,
            step: step.to_string(),
            tls,
            connect_timeout: timeouts.connect,
            statement_timeout: timeouts.statement,
            broken: AtomicBool::new(false),
        };
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {} (\
               load_id text PRIMARY KEY, \
               target text NOT NULL, \
               rows bigint, \
               loaded_at timestamptz NOT NULL DEFAULT now())",
            me.marker_table
        );
        let created =
            tokio::time::timeout(me.statement_timeout, me.client.batch_execute(&create)).await;
        me.settle(created, || format!("creating {}", me.marker_table))
            .await?
            .map_err(|e| fail(format!("creating {}: {}", me.marker_table, describe(&e))))?;
        Ok(me)
    }

    /// Whether the connection cannot be used any more: the server closed it, or a statement
    /// timed out on it (a retry connects again).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed() || self.broken.load(Ordering::SeqCst)
    }

    /// The outcome of a statement bounded by the statement timeout: past it, the server is
    /// asked to cancel the statement (within the connect timeout), the connection is marked
    /// broken and the error names the step, `what` and the server.
    async fn settle<T>(
        &self,
        outcome: std::result::Result<T, tokio::time::error::Elapsed>,
        what: impl FnOnce() -> String,
    ) -> Result<T> {
        match outcome {
            Ok(v) => Ok(v),
            Err(_) => {
                self.broken.store(true, Ordering::SeqCst);
                let cancel = self.client.cancel_token();
                match tokio::time::timeout(
                    self.connect_timeout,
                    cancel.cancel_query(self.tls.clone()),
                )
                .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(target = %self.target, error = %describe(&e), "cannot cancel the statement")
                    }
                    Err(_) => {
                        tracing::warn!(target = %self.target, "cannot cancel the statement: no answer")
                    }
                }
                Err(Error::Timeout {
                    step: self.step.clone(),
                    what: format!("{} on postgres {}", what(), self.target),
                    after: format_duration(self.statement_timeout),
                })
            }
        }
    }

    /// Runs DDL (several statements, as a file holds them) outside any marker.
    pub async fn batch(&self, sql: &str) -> Result<()> {
        let ran =
            tokio::time::timeout(self.statement_timeout, self.client.batch_execute(sql)).await;
        self.settle(ran, || "a DDL statement".to_string())
            .await?
            .map_err(|e| fail(describe(&e)))
    }

    /// Runs a statement once: in one transaction with its marker row, skipped (`None`) if the
    /// marker is there already.
    pub async fn execute_once(&mut self, sql: &str, load_id: &str) -> Result<Option<u64>> {
        let marker = self.marker_table.clone();
        let work = execute_once(&mut self.client, &marker, sql, load_id);
        let ran = tokio::time::timeout(self.statement_timeout, work).await;
        self.settle(ran, || format!("statement {load_id}")).await?
    }

    /// Streams the rows of `files` into `target` with binary COPY, in one transaction with a
    /// marker row per file; files whose marker exists are skipped. Returns (rows, files loaded,
    /// files skipped).
    pub async fn copy_files(
        &mut self,
        lake: &Lake,
        meta: &TableMeta,
        target: &str,
        files: &[TableFile],
    ) -> Result<(u64, usize, usize)> {
        let marker = self.marker_table.clone();
        let work = copy_files(&mut self.client, &marker, lake, meta, target, files);
        let ran = tokio::time::timeout(self.statement_timeout, work).await;
        self.settle(ran, || format!("COPY into {target}")).await?
    }
}

async fn execute_once(
    client: &mut tokio_postgres::Client,
    marker: &str,
    sql: &str,
    load_id: &str,
) -> Result<Option<u64>> {
    let tx = client.transaction().await.map_err(|e| fail(describe(&e)))?;
    if done(&tx, marker, load_id).await? {
        return Ok(None);
    }
    let rows = tx.execute(sql, &[]).await.map_err(|e| fail(describe(&e)))?;
    mark(&tx, marker, load_id, "statement", rows).await?;
    tx.commit().await.map_err(|e| fail(describe(&e)))?;
    Ok(Some(rows))
}

async fn copy_files(
    client: &mut tokio_postgres::Client,
    marker: &str,
    lake: &Lake,
    meta: &TableMeta,
    target: &str,
    files: &[TableFile],
) -> Result<(u64, usize, usize)> {
    let full = meta.full_schema()?;
    let partitions = meta.partition_types()?;
    let probe = client
        .prepare(&format!("SELECT * FROM {target} LIMIT 0"))
        .await
        .map_err(|e| fail(format!("target table {target}: {}", describe(&e))))?;
    // Every file column must be in the target; partition columns go in where it has them.
    let mut columns: Vec<(usize, String, Type)> = Vec::new();
    for (i, f) in full.fields().iter().enumerate() {
        let found = probe.columns().iter().find(|c| c.name() == f.name());
        match found {
            Some(c) => {
                check_type(f.name(), f.data_type(), c.type_(), target)?;
                columns.push((i, f.name().clone(), c.type_().clone()));
            }
            None if partitions.iter().any(|(p, _)| p == f.name()) => {}
            // Row lineage goes in where the target keeps it.
            None if f.name() == crate::source::LINEAGE => {}
            None => {
                return Err(fail(format!(
                    "target table {target} has no column {} (table {} has it)",
                    f.name(),
                    meta.name
                )));
            }
        }
    }
    let types: Vec<Type> = columns.iter().map(|(_, _, t)| t.clone()).collect();
    let copy_sql = format!(
        "COPY {target} ({}) FROM STDIN (FORMAT binary)",
        columns
            .iter()
            .map(|(_, n, _)| format!("\"{}\"", n.replace('"', "\"\"")))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let tx = client.transaction().await.map_err(|e| fail(describe(&e)))?;
    let (mut rows, mut loaded, mut skipped) = (0u64, 0usize, 0usize);
    for file in files {
        let load_id = format!("{target}:{}", file.key);
        if done(&tx, marker, &load_id).await? {
            skipped += 1;
            continue;
        }
        if !lake.exists(&file.key).await? {
            // Replaced by a later commit, whose file holds its rows.
            tracing::warn!(key = %file.key, "file to load is gone (its partition was rewritten since); skipped");
            continue;
        }
        let batches = read_table_file(lake, file, &partitions, &full).await?;
        let sink = tx
            .copy_in(&copy_sql)
            .await
            .map_err(|e| fail(format!("{copy_sql}: {}", describe(&e))))?;
        let writer = BinaryCopyInWriter::new(sink, &types);
        pin_mut!(writer);
        for batch in &batches {
            write_batch(writer.as_mut(), batch, &columns, &file.key).await?;
        }
        let n = writer.finish().await.map_err(|e| {
            fail(format!(
                "loading {} into {target}: {}",
                file.key,
                describe(&e)
            ))
        })?;
        mark(&tx, marker, &load_id, target, n).await?;
        rows += n;
        loaded += 1;
    }
    tx.commit().await.map_err(|e| fail(describe(&e)))?;
    Ok((rows, loaded, skipped))
}

async fn done(tx: &tokio_postgres::Transaction<'_>, marker: &str, load_id: &str) -> Result<bool> {
    let row = tx
        .query_opt(
            &format!("SELECT 1 FROM {marker} WHERE load_id = $1"),
            &[&load_id],
        )
        .await
        .map_err(|e| fail(describe(&e)))?;
    Ok(row.is_some())
}

async fn mark(
    tx: &tokio_postgres::Transaction<'_>,
    marker: &str,
    load_id: &str,
    target: &str,
    rows: u64,
) -> Result<()> {
    tx.execute(
        &format!("INSERT INTO {marker} (load_id, target, rows) VALUES ($1, $2, $3)"),
        &[&load_id, &target, &(rows as i64)],
    )
    .await
    .map_err(|e| fail(describe(&e)))?;
    Ok(())
}

/// The system's certificate authorities plus `ssl_root_cert`, for TLS connections.
fn tls_connector(config: &Config) -> Result<MakeRustlsConnect> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = &config.warehouse.ssl_root_cert {
        let path = config.resolve(path);
        let pem = std::fs::read(&path).map_err(|e| {
            Error::io(
                format!("cannot read warehouse.ssl_root_cert {}", path.display()),
                e,
            )
        })?;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| {
                Error::config(
                    &config.path,
                    format!("warehouse.ssl_root_cert {}: {e}", path.display()),
                )
            })?;
            roots.add(cert).map_err(|e| {
                Error::config(
                    &config.path,
                    format!("warehouse.ssl_root_cert {}: {e}", path.display()),
                )
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(tls))
}

/// Whether an Arrow column can be copied into a PostgreSQL column of type `pg`.
fn check_type(name: &str, arrow: &DataType, pg: &Type, target: &str) -> Result<()> {
    let ok = match arrow {
        DataType::Utf8 => matches!(*pg, Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME),
        DataType::Boolean => *pg == Type::BOOL,
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => {
            matches!(*pg, Type::INT2 | Type::INT4 | Type::INT8)
        }
        DataType::Float32 | DataType::Float64 => matches!(*pg, Type::FLOAT4 | Type::FLOAT8),
        DataType::Date32 => *pg == Type::DATE,
        DataType::Timestamp(TimeUnit::Microsecond, None) => *pg == Type::TIMESTAMP,
        DataType::Timestamp(TimeUnit::Microsecond, Some(_)) => *pg == Type::TIMESTAMPTZ,
        DataType::Binary => *pg == Type::BYTEA,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(fail(format!(
            "column {name} is {arrow} in the lake, which cannot be copied into {target}.{name} of type {pg}"
        )))
    }
}

/// One value on its way into a COPY row.
#[derive(Debug)]
enum Cell<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(&'a str),
    Bytes(&'a [u8]),
    Date(NaiveDate),
    Timestamp(chrono::NaiveDateTime),
    TimestampTz(DateTime<chrono::Utc>),
}

impl ToSql for Cell<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Cell::Null => Ok(IsNull::Yes),
            Cell::Bool(v) => v.to_sql(ty, out),
            Cell::Int(v) => match *ty {
                Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
                _ => v.to_sql(ty, out),
            },
            Cell::Float(v) => match *ty {
                Type::FLOAT4 => (*v as f32).to_sql(ty, out),
                _ => v.to_sql(ty, out),
            },
            Cell::Str(v) => v.to_sql(ty, out),
            Cell::Bytes(v) => v.to_sql(ty, out),
            Cell::Date(v) => v.to_sql(ty, out),
            Cell::Timestamp(v) => v.to_sql(ty, out),
            Cell::TimestampTz(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        // Checked per column before the copy starts (`check_type`).
        true
    }

    to_sql_checked!();
}

fn cell(array: &dyn Array, row: usize) -> Cell<'_> {
    if array.is_null(row) {
        return Cell::Null;
    }
    match array.data_type() {
        DataType::Utf8 => Cell::Str(array.as_string::<i32>().value(row)),
        DataType::Binary => Cell::Bytes(array.as_binary::<i32>().value(row)),
        DataType::Boolean => Cell::Bool(array.as_boolean().value(row)),
        DataType::Int8 => Cell::Int(array.as_primitive::<Int8Type>().value(row).into()),
        DataType::Int16 => Cell::Int(array.as_primitive::<Int16Type>().value(row).into()),
        DataType::Int32 => Cell::Int(array.as_primitive::<Int32Type>().value(row).into()),
        DataType::Int64 => Cell::Int(array.as_primitive::<Int64Type>().value(row)),
        DataType::Float32 => Cell::Float(array.as_primitive::<Float32Type>().value(row).into()),
        DataType::Float64 => Cell::Float(array.as_primitive::<Float64Type>().value(row)),
        DataType::Date32 => {
            let days = array.as_primitive::<Date32Type>().value(row);
            NaiveDate::from_ymd_opt(1970, 1, 1)
                .and_then(|d| d.checked_add_signed(chrono::Duration::days(days.into())))
                .map_or(Cell::Null, Cell::Date)
        }
        DataType::Timestamp(_, tz) => {
            let micros = array.as_primitive::<TimestampMicrosecondType>().value(row);
            match DateTime::from_timestamp_micros(micros) {
                Some(t) if tz.is_some() => Cell::TimestampTz(t),
                Some(t) => Cell::Timestamp(t.naive_utc()),
                None => Cell::Null,
            }
        }
        _ => Cell::Null,
    }
}

async fn write_batch(
    mut writer: std::pin::Pin<&mut BinaryCopyInWriter>,
    batch: &RecordBatch,
    columns: &[(usize, String, Type)],
    key: &str,
) -> Result<()> {
    let arrays: Vec<&dyn Array> = columns
        .iter()
        .map(|(i, _, _)| batch.column(*i).as_ref())
        .collect();
    for row in 0..batch.num_rows() {
        let cells: Vec<Cell> = arrays.iter().map(|a| cell(*a, row)).collect();
        let values: Vec<&(dyn ToSql + Sync)> =
            cells.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
        writer
            .as_mut()
            .write(&values)
            .await
            .map_err(|e| fail(format!("{key} row {}: {}", row + 1, describe(&e))))?;
    }
    Ok(())
}
