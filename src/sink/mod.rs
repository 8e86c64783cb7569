//! The sink: dedup by `unique_key`, Hive-partitioned Parquet files, and reading a table's files
//! back (partition columns restored).

pub mod stream;

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use datafusion::arrow::array::{ArrayRef, AsArray, RecordBatch, new_null_array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Schema, SchemaRef};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::common::ScalarValue;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, GzipLevel, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use crate::error::{Error, Result};
use crate::lake::{self, Lake};

/// How sluice writes Parquet: the table's compression (zstd at level 1) and row groups of
/// 128Ki rows.
/// `plain` names columns written without dictionary encoding (see [`mostly_distinct`]).
pub fn writer_properties(compression: &str, plain: &[String]) -> Result<WriterProperties> {
    let codec = match compression {
        "zstd" => Compression::ZSTD(ZstdLevel::try_new(1)?),
        "gzip" => Compression::GZIP(GzipLevel::default()),
        "none" => Compression::UNCOMPRESSED,
        _ => Compression::SNAPPY,
    };
    let mut props = WriterProperties::builder()
        .set_compression(codec)
        .set_max_row_group_row_count(Some(128 * 1024));
    for column in plain {
        props = props.set_column_dictionary_enabled(ColumnPath::from(column.as_str()), false);
    }
    Ok(props.build())
}

/// The string columns of `batch` whose values are mostly different from each other (over half
/// of the first 8192 rows, with at least 1024 rows to judge from): a dictionary would overflow
/// and fall back to plain pages anyway, after hashing every value. As DuckDB does, such columns
/// are written plain from the start. `None` when the batch is too small to tell.
pub fn mostly_distinct(batch: &RecordBatch) -> Option<Vec<String>> {
    const SAMPLE: usize = 8192;
    let n = batch.num_rows().min(SAMPLE);
    if n < 1024 {
        return None;
    }
    let mut plain = Vec::new();
    let mut seen: HashSet<&[u8]> = HashSet::with_capacity(n);
    for (field, column) in batch.schema_ref().fields().iter().zip(batch.columns()) {
        seen.clear();
        let values: Box<dyn Iterator<Item = Option<&[u8]>>> = match field.data_type() {
            DataType::Utf8 => Box::new(
                column
                    .as_string::<i32>()
                    .iter()
                    .map(|v| v.map(str::as_bytes)),
            ),
            DataType::LargeUtf8 => Box::new(
                column
                    .as_string::<i64>()
                    .iter()
                    .map(|v| v.map(str::as_bytes)),
            ),
            DataType::Utf8View => {
                Box::new(column.as_string_view().iter().map(|v| v.map(str::as_bytes)))
            }
            _ => continue,
        };
        let mut present = 0;
        for v in values.take(n).flatten() {
            present += 1;
            seen.insert(v);
        }
        if present >= 1024 && seen.len() * 2 > present {
            plain.push(field.name().clone());
        }
    }
    Some(plain)
}

/// Encodes batches as one Parquet file.
pub fn encode_parquet(
    schema: &SchemaRef,
    batches: &[RecordBatch],
    compression: &str,
) -> Result<Bytes> {
    let mut buf = Vec::new();
    let mut writer = ArrowWriter::try_new(
        &mut buf,
        schema.clone(),
        Some(writer_properties(compression, &[])?),
    )?;
    for b in batches {
        writer.write(b)?;
    }
    writer.close()?;
    Ok(Bytes::from(buf))
}

/// Decodes a whole Parquet file.
pub fn decode_parquet(key: &str, data: Bytes) -> Result<Vec<RecordBatch>> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(data)
        .map_err(|e| Error::Read {
            key: key.to_string(),
            message: e.to_string(),
        })?
        .with_batch_size(65_536)
        .build()?;
    Ok(reader.collect::<std::result::Result<Vec<_>, _>>()?)
}

/// The Hive folder of each row, e.g. `event_date=2024-03-01`, its values escaped as Hive
/// escapes them (`tag=c%3Ad`).
pub(crate) fn partition_dirs(batch: &RecordBatch, partition_by: &[String]) -> Result<Vec<String>> {
    let n = batch.num_rows();
    let mut dirs = vec![String::new(); n];
    let opts = FormatOptions::default();
    for col in partition_by {
        let a = batch.column_by_name(col).ok_or_else(|| Error::Schema {
            table: String::new(),
            message: format!("partition column {col} is missing"),
        })?;
        let fmt = ArrayFormatter::try_new(a.as_ref(), &opts)?;
        for (i, d) in dirs.iter_mut().enumerate() {
            if !d.is_empty() {
                d.push('/');
            }
            d.push_str(&lake::partition_segment(col, &fmt.value(i).to_string()));
        }
    }
    Ok(dirs)
}

/// The batches of a local copy of the lake's Parquet file `key`, 65,536 rows at a time.
pub fn local_batches(
    file: std::fs::File,
    key: &str,
) -> Result<parquet::arrow::arrow_reader::ParquetRecordBatchReader> {
    Ok(ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| Error::Read {
            key: key.to_string(),
            message: e.to_string(),
        })?
        .with_batch_size(65_536)
        .build()?)
}

/// A local Parquet file with `schema`, created at its first batch of rows (its dictionary
/// choices made from that batch, [`mostly_distinct`]): a file of rows dropped or filtered away
/// is never made.
pub struct LocalParquet {
    out: std::path::PathBuf,
    schema: SchemaRef,
    compression: String,
    writer: Option<ArrowWriter<std::fs::File>>,
    rows: u64,
}

impl LocalParquet {
    /// A file to be at `out`.
    pub fn new(out: &std::path::Path, schema: SchemaRef, compression: &str) -> LocalParquet {
        LocalParquet {
            out: out.to_path_buf(),
            schema,
            compression: compression.to_string(),
            writer: None,
            rows: 0,
        }
    }

    fn create(&self, plain: &[String]) -> Result<ArrowWriter<std::fs::File>> {
        let file = std::fs::File::create(&self.out)
            .map_err(|e| Error::io(format!("cannot create {}", self.out.display()), e))?;
        Ok(ArrowWriter::try_new(
            file,
            self.schema.clone(),
            Some(writer_properties(&self.compression, plain)?),
        )?)
    }

    /// Writes a batch (of the file's schema); an empty one is skipped.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        if self.writer.is_none() {
            let plain = mostly_distinct(batch).unwrap_or_default();
            self.writer = Some(self.create(&plain)?);
        }
        if let Some(w) = self.writer.as_mut() {
            w.write(batch)?;
        }
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Closes the file: its path and rows, or `None` if no row came (`empty`: then a file of
    /// the schema without rows is made all the same).
    pub fn finish(self, empty: bool) -> Result<Option<(std::path::PathBuf, u64)>> {
        let writer = match self.writer {
            Some(w) => w,
            None if empty => self.create(&[])?,
            None => return Ok(None),
        };
        writer.close()?;
        Ok(Some((self.out, self.rows)))
    }
}

/// The schema without the named columns.
pub fn schema_without(schema: &Schema, names: &[String]) -> SchemaRef {
    Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .filter(|f| !names.iter().any(|n| n == f.name()))
            .cloned()
            .collect::<Vec<_>>(),
    ))
}

/// A batch with exactly `schema`'s columns, by name: missing ones null, types cast.
pub fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    let n = batch.num_rows();
    let arrays = schema
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(a) if a.data_type() == f.data_type() => Ok(a.clone()),
            Some(a) => Ok(cast(a, f.data_type())?),
            None => Ok(new_null_array(f.data_type(), n)),
        })
        .collect::<Result<Vec<ArrayRef>>>()?;
    let schema = nullable(schema);
    Ok(RecordBatch::try_new(schema, arrays)?)
}

/// The schema with every field nullable (how files are written and read back).
pub fn nullable(schema: &Schema) -> SchemaRef {
    Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<_>>(),
    ))
}

/// Parses a partition folder `a=1/b=x` into its columns and values, unescaped
/// ([`lake::hive_unescape`]): each segment splits at its first `=`, as Hive escapes `=`.
pub fn parse_partition_dir(dir: &str) -> Vec<(String, String)> {
    dir.split('/')
        .filter_map(|seg| {
            seg.split_once('=')
                .map(|(k, v)| (lake::hive_unescape(k), lake::hive_unescape(v)))
        })
        .collect()
}

/// A data file of a table and the partition it sits in.
#[derive(Debug, Clone)]
pub struct TableFile {
    /// Its key in the lake.
    pub key: String,
    /// Its partition folder (relative to the table prefix).
    pub dir: String,
}

/// The Parquet files of a table, by partition folder.
pub async fn table_files(lake: &Lake, prefix: &str) -> Result<Vec<TableFile>> {
    let mut out = Vec::new();
    for m in lake.list(prefix).await? {
        let key = m.location.to_string();
        if let Some(dir) = data_file_dir(&key, prefix) {
            let dir = dir.to_string();
            out.push(TableFile { key, dir });
        }
    }
    Ok(out)
}

/// The partition folder (relative to `prefix`) of a listed key that is a data file of the
/// table there; `None` for other objects. Hidden folders and files (`_delta_log/`,
/// `_symlink_format_manifest/`, `.tmp`) are not data, as in Hive and Spark.
pub fn data_file_dir<'a>(key: &'a str, prefix: &str) -> Option<&'a str> {
    if !key.ends_with(".parquet") {
        return None;
    }
    let rel = lake::relative(key, prefix);
    if rel.split('/').any(|seg| seg.starts_with(['_', '.'])) {
        return None;
    }
    Some(lake::parent_dir(rel))
}

/// Reads a table file with its partition columns restored.
pub async fn read_table_file(
    lake: &Lake,
    file: &TableFile,
    partition_types: &[(String, DataType)],
    full_schema: &SchemaRef,
) -> Result<Vec<RecordBatch>> {
    let data = lake.get(&file.key).await?;
    let batches = decode_parquet(&file.key, data)?;
    let values = parse_partition_dir(&file.dir);
    batches
        .iter()
        .map(|b| restore_partitions(b, &values, partition_types, full_schema))
        .collect()
}

/// A batch of a table file with `full_schema`'s columns: partition columns from the folder's
/// `values`, the others cast from the file's (null where an older file lacks them).
pub fn restore_partitions(
    b: &RecordBatch,
    values: &[(String, String)],
    partition_types: &[(String, DataType)],
    full_schema: &SchemaRef,
) -> Result<RecordBatch> {
    let n = b.num_rows();
    let mut arrays: Vec<ArrayRef> = Vec::with_capacity(full_schema.fields().len());
    for f in full_schema.fields() {
        if let Some((_, ty)) = partition_types.iter().find(|(name, _)| name == f.name()) {
            let v = values
                .iter()
                .find(|(k, _)| k == f.name())
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            let scalar = ScalarValue::try_from_string(v, ty)?;
            arrays.push(scalar.to_array_of_size(n)?);
        } else {
            match b.column_by_name(f.name()) {
                Some(a) if a.data_type() == f.data_type() => arrays.push(a.clone()),
                Some(a) => arrays.push(cast(a, f.data_type())?),
                None => arrays.push(new_null_array(f.data_type(), n)),
            }
        }
    }
    Ok(RecordBatch::try_new(full_schema.clone(), arrays)?)
}

/// Row-comparable encodings of some columns of a batch.
pub struct KeyEncoder {
    converter: RowConverter,
    pub(crate) columns: Vec<String>,
}

impl KeyEncoder {
    /// An encoder for the named columns of `schema`.
    pub fn new(schema: &Schema, columns: &[String]) -> Result<KeyEncoder> {
        let fields = columns
            .iter()
            .map(|c| {
                let f = schema.field_with_name(c)?;
                Ok(SortField::new(f.data_type().clone()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KeyEncoder {
            converter: RowConverter::new(fields)?,
            columns: columns.to_vec(),
        })
    }

    /// The encoded rows of `batch`.
    pub fn encode(&self, batch: &RecordBatch) -> Result<datafusion::arrow::row::Rows> {
        let cols = self
            .columns
            .iter()
            .map(|c| {
                batch
                    .column_by_name(c)
                    .cloned()
                    .ok_or_else(|| Error::Schema {
                        table: String::new(),
                        message: format!("column {c} is missing"),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(self.converter.convert_columns(&cols)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_dirs_round_trip() {
        let dir = format!(
            "{}/{}",
            lake::partition_segment("k", "a/b%c=d"),
            lake::partition_segment("t", "é:1")
        );
        assert_eq!(dir, "k=a%2Fb%25c%3Dd/t=é%3A1");
        let parsed = parse_partition_dir(&dir);
        let want = [("k", "a/b%c=d"), ("t", "é:1")].map(|(k, v)| (k.to_string(), v.to_string()));
        assert_eq!(parsed, want);
        // A folder an older sluice wrote: `=` unescaped, non-ASCII percent-encoded.
        assert_eq!(
            parse_partition_dir("k=c:d=e/t=%C3%A9"),
            [("k", "c:d=e"), ("t", "é")].map(|(k, v)| (k.to_string(), v.to_string()))
        );
    }

    #[test]
    fn mostly_distinct_columns_are_written_plain() {
        use datafusion::arrow::array::StringArray;
        use datafusion::arrow::datatypes::Field;
        use parquet::basic::Encoding;
        use parquet::file::reader::{FileReader, SerializedFileReader};

        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("level", DataType::Utf8, true),
        ]));
        let rows = |n: usize| {
            let id = StringArray::from_iter_values((0..n).map(|i| format!("req-{i}")));
            let level = StringArray::from_iter(
                (0..n).map(|i| (i % 7 != 0).then(|| ["info", "warn"][i % 2])),
            );
            RecordBatch::try_new(schema.clone(), vec![Arc::new(id), Arc::new(level)]).unwrap()
        };
        assert_eq!(mostly_distinct(&rows(100)), None, "too few rows to judge");
        let batch = rows(5000);
        let plain = mostly_distinct(&batch).unwrap();
        assert_eq!(plain, vec!["id".to_string()]);

        let mut buf = Vec::new();
        let props = writer_properties("snappy", &plain).unwrap();
        let mut writer = ArrowWriter::try_new(&mut buf, schema.clone(), Some(props)).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let reader = SerializedFileReader::new(Bytes::from(buf)).unwrap();
        let group = reader.metadata().row_group(0);
        let dictionary = |c: usize| {
            group
                .column(c)
                .encodings()
                .any(|e| e == Encoding::RLE_DICTIONARY)
                || group.column(c).dictionary_page_offset().is_some()
        };
        assert!(!dictionary(0), "the distinct column has no dictionary");
        assert!(dictionary(1), "the repetitive column keeps its dictionary");
    }
}
