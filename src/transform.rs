//! The transform step: DataFusion sessions, query files, and routing of a query's output into
//! processed rows, rejected rows and duplicates, with the row accounting that proves nothing was
//! lost or doubled.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, BooleanBuilder, DictionaryArray, Int32Array,
    Int64Array, RecordBatch, StringArray, new_null_array,
};
use datafusion::arrow::compute::{CastOptions, cast_with_options, filter, take};
use datafusion::arrow::datatypes::{
    DataType, Field, Int32Type, Int64Type, Schema, SchemaRef, TimeUnit,
};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::config::TableConfig;
use crate::error::{Error, Result};
use crate::source::{LINEAGE, Malformed, SOURCE_FILE, SOURCE_ROW};

/// The column a query sets to reject a row.
pub const REJECT_REASON: &str = "_reject_reason";
/// The column a query sets to drop a row as a duplicate within the batch.
pub const DUPLICATE: &str = "_duplicate";
/// The raw text of a record the reader could not parse (rejected tables only).
pub const RAW_RECORD: &str = "_raw_record";

/// A DataFusion session with sluice's settings: `threads` partitions, and operators that
/// buffer (sorts, joins, windows) limited to `pool_bytes`, spilling to a temp folder beyond it.
pub fn session(threads: usize, pool_bytes: usize) -> SessionContext {
    let ctx = SessionContext::new_with_config_rt(session_config(threads), runtime(pool_bytes));
    crate::functions::register(&ctx);
    ctx
}

/// A session for queries over the lake's tables (the aggregates, `sluice query`, `sluice
/// check`) on the configured engine: [`session`], or the distributed engine's coordinator.
pub fn lake_session(
    engine: &crate::config::EngineConfig,
    threads: usize,
    pool_bytes: usize,
) -> Result<SessionContext> {
    if engine.kind == crate::config::EngineKind::Local {
        return Ok(session(threads, pool_bytes));
    }
    let workers = engine.check_workers().map_err(|message| Error::State {
        path: "engine.workers".into(),
        message,
    })?;
    #[cfg(feature = "distributed")]
    {
        crate::distributed::session(&workers, threads, pool_bytes, engine.task_size())
    }
    #[cfg(not(feature = "distributed"))]
    {
        let _ = workers;
        Err(Error::State {
            path: "engine.kind".into(),
            message: "this sluice was built without the `distributed` feature".into(),
        })
    }
}

/// sluice's session settings: `threads` partitions, the information schema.
pub fn session_config(threads: usize) -> SessionConfig {
    SessionConfig::new()
        .with_target_partitions(threads.max(1))
        .with_information_schema(true)
}

/// A runtime whose operators that buffer are limited to `pool_bytes` (at least 16 MiB),
/// spilling beyond it.
pub fn runtime(pool_bytes: usize) -> Arc<datafusion::execution::runtime_env::RuntimeEnv> {
    let pool = Arc::new(FairSpillPool::new(pool_bytes.max(16 << 20)));
    RuntimeEnvBuilder::new()
        .with_memory_pool(pool)
        .build_arc()
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no memory pool; running without a memory limit");
            Arc::new(datafusion::execution::runtime_env::RuntimeEnv::default())
        })
}

/// A query file's text.
pub fn load_query(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::Query {
        file: path.to_path_buf(),
        line: None,
        message: format!("cannot read the query file: {e}"),
    })
}

/// Turns a DataFusion error into a query error that names the file and, where it can, the line.
pub fn query_error(file: &Path, sql: &str, e: DataFusionError) -> Error {
    let message = e.to_string();
    Error::Query {
        file: file.to_path_buf(),
        line: error_line(sql, &message),
        message,
    }
}

/// Finds the line a planner or parser message is about.
fn error_line(sql: &str, message: &str) -> Option<usize> {
    if let Some(pos) = message.find("Line: ") {
        let digits: String = message[pos + 6..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        if let Ok(n) = digits.parse() {
            return Some(n);
        }
    }
    // Planner errors name the identifier: find the first line that mentions it.
    for marker in [
        "No field named ",
        "table '",
        "Invalid function '",
        "function '",
        "column '",
    ] {
        if let Some(pos) = message.find(marker) {
            let rest = &message[pos + marker.len()..];
            let name: String = rest
                .trim_start_matches(['"', '\''])
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '.')
                .collect();
            let name = name.trim_end_matches('.');
            let name = name.rsplit('.').next().unwrap_or(name).to_lowercase();
            if name.is_empty() {
                continue;
            }
            for (i, line) in sql.lines().enumerate() {
                if line.to_lowercase().contains(&name) {
                    return Some(i + 1);
                }
            }
        }
    }
    None
}

/// Names of the tables a plan reads.
pub fn referenced_tables(plan: &LogicalPlan) -> Vec<String> {
    let mut names = Vec::new();
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            names.push(scan.table_name.table().to_string());
        }
        Ok(TreeNodeRecursion::Continue)
    });
    names.sort();
    names.dedup();
    names
}

/// Registers batches as an in-memory table spread over `parts` partitions.
pub fn register_batches(
    ctx: &SessionContext,
    name: &str,
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    parts: usize,
) -> Result<()> {
    let parts = parts.max(1);
    let mut partitions: Vec<Vec<RecordBatch>> = vec![Vec::new(); parts];
    for (i, b) in batches.into_iter().enumerate() {
        partitions[i % parts].push(b);
    }
    let table = MemTable::try_new(schema, partitions)?;
    ctx.deregister_table(name)?;
    ctx.register_table(name, Arc::new(table))?;
    Ok(())
}

/// Checks that a query's output can feed `table`; returns the schema of its data columns.
pub fn check_output(table: &TableConfig, file: &Path, output: &Schema) -> Result<()> {
    let fail = |message: String| {
        Err(Error::Query {
            file: file.to_path_buf(),
            line: None,
            message,
        })
    };
    for (col, ty) in [(SOURCE_FILE, None), (SOURCE_ROW, Some(DataType::Int64))] {
        match output.field_with_name(col) {
            Err(_) => {
                return fail(format!(
                    "the query must select {col} (with {SOURCE_FILE} and {SOURCE_ROW} every \
                     output row is traced back to its record)"
                ));
            }
            Ok(f) if ty.as_ref().is_some_and(|t| t != f.data_type()) => {
                return fail(format!("{col} must stay Int64, not {}", f.data_type()));
            }
            Ok(_) => {}
        }
    }
    if output.field_with_name(LINEAGE).is_ok() {
        return fail(format!(
            "{LINEAGE} is sluice's own column (each row's raw file); name the column otherwise"
        ));
    }
    if let Ok(f) = output.field_with_name(REJECT_REASON)
        && !matches!(
            f.data_type(),
            DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 | DataType::Null
        )
    {
        return fail(format!(
            "{REJECT_REASON} must be text, not {}",
            f.data_type()
        ));
    }
    if let Ok(f) = output.field_with_name(DUPLICATE)
        && !matches!(f.data_type(), DataType::Boolean | DataType::Null)
    {
        return fail(format!(
            "{DUPLICATE} must be boolean, not {}",
            f.data_type()
        ));
    }
    let needed = table
        .partition_by
        .iter()
        .chain(&table.unique_key)
        .chain(table.order_by.iter());
    for col in needed {
        if output.field_with_name(col).is_err() {
            return fail(format!(
                "table {} needs column \"{col}\" (partition_by / unique_key / order_by), \
                 but the query does not output it",
                table.name
            ));
        }
    }
    if data_fields(output).is_empty() {
        return fail("the query outputs no data columns".to_string());
    }
    Ok(())
}

/// The output fields that are data (not sluice's own columns).
pub fn data_fields(output: &Schema) -> Vec<Field> {
    output
        .fields()
        .iter()
        .filter(|f| !is_meta(f.name()))
        .map(|f| Field::new(f.name(), spectrum_type(f.data_type()), true))
        .collect()
}

fn is_meta(name: &str) -> bool {
    [SOURCE_FILE, SOURCE_ROW, REJECT_REASON, DUPLICATE, LINEAGE].contains(&name)
}

/// The type a column is stored as: what Redshift Spectrum and Athena read.
pub fn spectrum_type(t: &DataType) -> DataType {
    match t {
        DataType::Utf8View | DataType::LargeUtf8 => DataType::Utf8,
        DataType::BinaryView | DataType::LargeBinary => DataType::Binary,
        DataType::Timestamp(_, tz) => DataType::Timestamp(TimeUnit::Microsecond, tz.clone()),
        DataType::Date64 => DataType::Date32,
        DataType::UInt8 => DataType::Int16,
        DataType::UInt16 => DataType::Int32,
        DataType::UInt32 => DataType::Int64,
        DataType::UInt64 => DataType::Decimal128(20, 0),
        DataType::Float16 => DataType::Float32,
        // Spectrum and Athena have no time of day: stored as its ISO text (`13:05:09.250`).
        DataType::Time32(_) | DataType::Time64(_) => DataType::Utf8,
        DataType::Dictionary(_, v) => spectrum_type(v),
        other => other.clone(),
    }
}

/// Query results in their stored form: Spectrum types, every column nullable.
pub fn to_stored(
    output: &Schema,
    batches: &[RecordBatch],
) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let schema = Arc::new(Schema::new(
        output
            .fields()
            .iter()
            .map(|f| Field::new(f.name(), spectrum_type(f.data_type()), true))
            .collect::<Vec<_>>(),
    ));
    let batches = batches
        .iter()
        .map(|b| crate::sink::conform(b, &schema))
        .collect::<Result<Vec<_>>>()?;
    Ok((schema, batches))
}

/// Per-file row counts of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Rows read (including malformed records).
    pub read: u64,
    /// Rows that reached the processed table.
    pub written: u64,
    /// Rows routed to the rejected table.
    pub rejected: u64,
    /// Rows dropped as duplicates.
    pub duplicate: u64,
    /// Of the rejected rows: CSV records with an unclosed quote (each rejected alone).
    pub unclosed_quotes: u64,
}

impl Counts {
    /// Whether read = written + rejected + duplicate.
    pub fn balanced(&self) -> bool {
        self.read == self.written + self.rejected + self.duplicate
    }
}

/// The layout of a rejected table: lineage, reason, raw record, then the data columns.
pub fn rejected_schema(data: &[Field]) -> SchemaRef {
    let mut fields = vec![
        Field::new(SOURCE_FILE, DataType::Utf8, true),
        Field::new(SOURCE_ROW, DataType::Int64, true),
        Field::new(REJECT_REASON, DataType::Utf8, true),
        Field::new(RAW_RECORD, DataType::Utf8, true),
    ];
    fields.extend(data.iter().cloned());
    Arc::new(Schema::new(fields))
}

/// A routed batch in the valid layout, and which of its rows are valid (`None`: all).
pub type Valid = (RecordBatch, Option<BooleanArray>);

/// Splits a query's output, batch by batch, into valid and rejected rows, and checks that every
/// row the readers produced comes out exactly once.
pub struct Router {
    table: TableConfig,
    data: Vec<Field>,
    /// Valid rows: data columns, `_sluice_source` (the raw file's key, with lineage), then
    /// `_source_file` (the file's index in `files`, Int32) and `_source_row`, Spectrum types.
    pub valid_schema: SchemaRef,
    /// Rejected rows in the rejected-table layout.
    pub rejected_schema: SchemaRef,
    files: Vec<String>,
    rank: HashMap<String, usize>,
    file_names: StringArray,
    state: Mutex<RouteState>,
}

#[derive(Default)]
struct RouteState {
    counts: Vec<Counts>,
    /// Per file, a bit per line: which records came out of the query.
    seen: Vec<Vec<u64>>,
    out: Vec<u64>,
}

impl Router {
    /// A router for `table`'s query output; `files` are the batch's raw keys (`_source_file` of
    /// valid rows indexes them).
    pub fn new(table: &TableConfig, output_schema: &Schema, files: &[String]) -> Router {
        let data = data_fields(output_schema);
        let mut valid_fields = data.clone();
        if table.lineage {
            valid_fields.push(Field::new(LINEAGE, DataType::Utf8, true));
        }
        valid_fields.push(Field::new(SOURCE_FILE, DataType::Int32, false));
        valid_fields.push(Field::new(SOURCE_ROW, DataType::Int64, false));
        let rank = files
            .iter()
            .enumerate()
            .map(|(i, f)| (f.clone(), i))
            .collect();
        Router {
            table: table.clone(),
            valid_schema: Arc::new(Schema::new(valid_fields)),
            rejected_schema: rejected_schema(&data),
            data,
            files: files.to_vec(),
            rank,
            file_names: StringArray::from_iter_values(files.iter()),
            state: Mutex::new(RouteState {
                counts: vec![Counts::default(); files.len()],
                seen: vec![Vec::new(); files.len()],
                out: vec![0; files.len()],
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RouteState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Routes one output batch: its valid rows (the batch in the valid layout, and which of its
    /// rows are valid unless all are) and its rejected rows.
    pub fn route(&self, batch: &RecordBatch) -> Result<(Option<Valid>, Option<RecordBatch>)> {
        let n = batch.num_rows();
        if n == 0 {
            return Ok((None, None));
        }
        let table = &self.table;
        let strict = CastOptions {
            safe: false,
            ..Default::default()
        };
        // File of each row, as an index into `files`.
        let (keys, values) = file_dictionary(batch)?;
        let slot_of_value = (0..values.len())
            .map(|v| {
                self.rank.get(values.value(v)).copied().ok_or_else(|| {
                    accounting(
                        values.value(v),
                        "the query output a row of a file it was not given".to_string(),
                    )
                })
            })
            .collect::<Result<Vec<usize>>>()?;
        let row = batch
            .column_by_name(SOURCE_ROW)
            .and_then(|a| a.as_primitive_opt::<Int64Type>())
            .ok_or_else(|| accounting("(query output)", format!("{SOURCE_ROW} is not Int64")))?
            .clone();
        // Data columns in their stored types.
        let mut data_arrays: Vec<ArrayRef> = Vec::with_capacity(self.data.len());
        for f in &self.data {
            let a = batch
                .column_by_name(f.name())
                .ok_or_else(|| accounting("(query output)", format!("missing {}", f.name())))?;
            let a = if a.data_type() == f.data_type() {
                a.clone()
            } else {
                cast_with_options(a, f.data_type(), &strict).map_err(|e| Error::Query {
                    file: table.query.clone(),
                    line: None,
                    message: format!(
                        "column {} cannot be stored as {}: {e}",
                        f.name(),
                        f.data_type()
                    ),
                })?
            };
            data_arrays.push(a);
        }
        // Reasons: the query's, or a null partition value.
        let mut reasons: StringArray = match batch.column_by_name(REJECT_REASON) {
            Some(r) => cast_with_options(r, &DataType::Utf8, &strict)?
                .as_string::<i32>()
                .clone(),
            None => StringArray::new_null(n),
        };
        for p in &table.partition_by {
            let idx = self.data.iter().position(|f| f.name() == p);
            if let Some(a) = idx.map(|i| &data_arrays[i])
                && a.null_count() > 0
            {
                let msg = format!("partition column {p} is null");
                reasons = (0..n)
                    .map(|i| {
                        if reasons.is_valid(i) {
                            Some(reasons.value(i).to_string())
                        } else if a.is_null(i) {
                            Some(msg.clone())
                        } else {
                            None
                        }
                    })
                    .collect();
            }
        }
        // A NULL literal (`NULL AS _duplicate`) is a column of type Null: no row is flagged.
        let dup: Option<BooleanArray> = match batch.column_by_name(DUPLICATE) {
            Some(d) => Some(
                cast_with_options(d, &DataType::Boolean, &strict)?
                    .as_boolean()
                    .clone(),
            ),
            None => None,
        };
        let mut keep = BooleanBuilder::with_capacity(n);
        let mut reject = BooleanBuilder::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        let mut local = vec![Counts::default(); self.files.len()];
        for i in 0..n {
            let slot = slot_of_value[keys.value(i) as usize];
            let c = &mut local[slot];
            let is_rejected = reasons.is_valid(i);
            let is_dup = !is_rejected && dup.as_ref().is_some_and(|d| d.is_valid(i) && d.value(i));
            if is_rejected {
                c.rejected += 1;
            } else if is_dup {
                c.duplicate += 1;
            } else {
                c.written += 1;
            }
            keep.append_value(!is_rejected && !is_dup);
            reject.append_value(is_rejected);
            ids.push(slot as i32);
        }
        {
            let mut state = self.lock();
            for (&slot, &r) in ids.iter().zip(row.values()) {
                let r = r.max(0) as u64;
                let (word, bit) = ((r / 64) as usize, r % 64);
                let seen = &mut state.seen[slot as usize];
                if seen.len() <= word {
                    seen.resize(word + 1 + word / 2, 0);
                }
                if seen[word] & (1 << bit) != 0 {
                    return Err(accounting(
                        &self.files[slot as usize],
                        format!("the query output row {r} twice"),
                    ));
                }
                seen[word] |= 1 << bit;
                state.out[slot as usize] += 1;
            }
            for (c, l) in state.counts.iter_mut().zip(&local) {
                c.written += l.written;
                c.rejected += l.rejected;
                c.duplicate += l.duplicate;
            }
        }
        let ids = Int32Array::from(ids);
        let keep = keep.finish();
        let reject = reject.finish();
        let mut valid = None;
        if keep.true_count() > 0 {
            let mut valid_arrays = data_arrays.clone();
            if self.table.lineage {
                valid_arrays.push(take(&self.file_names, &ids, None)?);
            }
            valid_arrays.push(Arc::new(ids.clone()));
            valid_arrays.push(Arc::new(row.clone()));
            let all = RecordBatch::try_new(self.valid_schema.clone(), valid_arrays)?;
            valid = Some((all, (keep.true_count() < n).then(|| keep.clone())));
        }
        let mut rejected = None;
        if reject.true_count() > 0 {
            let ids = filter(&ids, &reject)?;
            let names = take(&self.file_names, ids.as_primitive::<Int32Type>(), None)?;
            let mut rej_arrays: Vec<ArrayRef> = vec![
                names,
                filter(&row, &reject)?,
                filter(&reasons, &reject)?,
                new_null_array(&DataType::Utf8, reject.true_count()),
            ];
            for a in data_arrays {
                rej_arrays.push(filter(&a, &reject)?);
            }
            rejected = Some(RecordBatch::try_new(
                self.rejected_schema.clone(),
                rej_arrays,
            )?);
        }
        Ok((valid, rejected))
    }

    /// The rejected rows for records a reader could not parse.
    pub fn malformed(&self, file: usize, malformed: &[Malformed]) -> Result<Option<RecordBatch>> {
        if malformed.is_empty() {
            return Ok(None);
        }
        let n = malformed.len();
        let key = self.files.get(file).map(String::as_str).unwrap_or_default();
        let mut arrays: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(std::iter::repeat_n(key, n))),
            Arc::new(Int64Array::from_iter_values(
                malformed.iter().map(|m| m.row as i64),
            )),
            Arc::new(StringArray::from_iter_values(
                malformed.iter().map(|m| m.reason.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                malformed.iter().map(|m| m.raw.as_str()),
            )),
        ];
        arrays.extend(self.data.iter().map(|f| new_null_array(f.data_type(), n)));
        Ok(Some(RecordBatch::try_new(
            self.rejected_schema.clone(),
            arrays,
        )?))
    }

    /// Per-file counts once the query is done; fails unless every row the readers produced
    /// (`good_rows`, `malformed`, per file) came out exactly once.
    pub fn finish(&self, reads: &[(u64, u64)]) -> Result<Vec<Counts>> {
        let mut state = self.lock();
        for (i, &(good_rows, malformed)) in reads.iter().enumerate() {
            let out = state.out[i];
            if out != good_rows {
                let lost = good_rows as i64 - out as i64;
                let message = if lost > 0 {
                    format!(
                        "the query of table {} dropped {lost} of its {good_rows} rows; route \
                         invalid rows with {REJECT_REASON}, duplicates with {DUPLICATE} or \
                         unique_key, instead of filtering them out",
                        self.table.name
                    )
                } else {
                    format!(
                        "the query of table {} output {} rows for {good_rows} input rows (a \
                         join that multiplies rows?)",
                        self.table.name, -lost
                    )
                };
                return Err(accounting(&self.files[i], message));
            }
            let c = &mut state.counts[i];
            c.read = good_rows + malformed;
            c.rejected += malformed;
        }
        Ok(std::mem::take(&mut state.counts))
    }
}

/// The `_source_file` column as dictionary keys and values, whatever its encoding.
fn file_dictionary(batch: &RecordBatch) -> Result<(Int32Array, StringArray)> {
    let a = batch
        .column_by_name(SOURCE_FILE)
        .ok_or_else(|| accounting("(query output)", format!("no {SOURCE_FILE} column")))?;
    let dict_type = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
    let a = if a.data_type() == &dict_type {
        a.clone()
    } else {
        cast_with_options(a, &dict_type, &CastOptions::default())?
    };
    let d = a
        .as_any()
        .downcast_ref::<DictionaryArray<Int32Type>>()
        .ok_or_else(|| accounting("(query output)", format!("{SOURCE_FILE} is not text")))?;
    let values = cast_with_options(d.values(), &DataType::Utf8, &CastOptions::default())?;
    Ok((d.keys().clone(), values.as_string::<i32>().clone()))
}

fn accounting(key: &str, message: String) -> Error {
    Error::Accounting {
        key: key.to_string(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_line_of_a_bad_column() {
        let sql = "SELECT a,\n  b,\n  nope\nFROM t";
        assert_eq!(
            error_line(sql, "Schema error: No field named nope."),
            Some(3)
        );
        assert_eq!(
            error_line(
                sql,
                "SQL error: ParserError(\"Expected: end of statement at Line: 2, Column: 3\")"
            ),
            Some(2)
        );
    }

    #[test]
    fn stored_types_are_spectrum_types() {
        assert_eq!(
            spectrum_type(&DataType::Timestamp(TimeUnit::Nanosecond, None)),
            DataType::Timestamp(TimeUnit::Microsecond, None)
        );
        assert_eq!(spectrum_type(&DataType::UInt32), DataType::Int64);
        assert_eq!(
            spectrum_type(&DataType::UInt64),
            DataType::Decimal128(20, 0)
        );
        assert_eq!(
            spectrum_type(&DataType::Time64(TimeUnit::Microsecond)),
            DataType::Utf8
        );
        assert_eq!(spectrum_type(&DataType::Utf8View), DataType::Utf8);
    }
}
