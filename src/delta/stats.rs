//! The `stats` of a Delta `add` action, from the data file's Parquet footer alone.
//!
//! Per the Delta protocol ("Per-file Statistics"): `numRecords`, and per data column (partition
//! columns are in `partitionValues`, not here) `nullCount` and, for the types readers skip files
//! by (numbers, strings, dates, timestamps), `minValues` and `maxValues`. As Delta (Spark) does,
//! only the first 32 data columns get statistics (`delta.dataSkippingNumIndexedCols`' default),
//! strings are cut to a 32-character prefix (a cut maximum ends in a tie-breaker character so
//! it stays above every value it stands for), and timestamps are written at millisecond
//! precision, the minimum rounded down and the maximum up.
//!
//! delta-rs builds the same statistics when it writes files itself, but its builder
//! (`writer::stats::create_add`) is private to the crate; this works from the row groups'
//! statistics the footer holds, through parquet's `StatisticsConverter`.

use std::collections::BTreeMap;
use std::ops::Range;

use bytes::Bytes;
use chrono::DateTime;
use datafusion::arrow::array::Array;
use datafusion::arrow::datatypes::{Field, Schema, TimeUnit};
use datafusion::common::ScalarValue;
use futures::FutureExt;
use futures::future::BoxFuture;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::statistics::StatisticsConverter;
use parquet::arrow::async_reader::MetadataFetch;
use parquet::arrow::parquet_to_arrow_schema;
use parquet::errors::ParquetError;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use serde::Serialize;
use serde_json::value::RawValue;

/// How many data columns get statistics: Delta's default for `delta.dataSkippingNumIndexedCols`.
const INDEXED_COLUMNS: usize = 32;

/// Delta's prefix length for string statistics (`delta.dataSkippingStringPrefixLength`).
const STRING_PREFIX: usize = 32;

/// How far past the prefix a maximum may reach for a place to cut it.
const STRING_PREFIX_LIMIT: usize = 2 * STRING_PREFIX;

/// The first request reads the last quarter of the file, at most this much: the footer and its
/// length in one request for the files sluice writes (a larger footer takes a second request, of
/// exactly the rest of it), and never the whole file.
const FOOTER_HINT: u64 = 64 * 1024;

/// Reads byte ranges of one object for parquet's footer reader, counting the bytes read.
struct Ranges<'a> {
    store: &'a dyn ObjectStore,
    path: Path,
    read: u64,
}

impl MetadataFetch for &mut Ranges<'_> {
    fn fetch(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        async move {
            let bytes = self
                .store
                .get_range(&self.path, range)
                .await
                .map_err(|e| ParquetError::External(Box::new(e)))?;
            self.read += bytes.len() as u64;
            Ok(bytes)
        }
        .boxed()
    }
}

/// The footer (file metadata) of the Parquet file at `path` of `size` bytes, read with ranged
/// reads of the file's end; page indexes are not read.
pub async fn footer(
    store: &dyn ObjectStore,
    path: Path,
    size: u64,
) -> Result<ParquetMetaData, String> {
    let mut ranges = Ranges {
        store,
        path,
        read: 0,
    };
    read_footer(&mut ranges, size).await
}

async fn read_footer(ranges: &mut Ranges<'_>, size: u64) -> Result<ParquetMetaData, String> {
    let hint = (size / 4).min(FOOTER_HINT) as usize;
    ParquetMetaDataReader::new()
        .with_prefetch_hint(Some(hint))
        .load_and_finish(ranges, size)
        .await
        .map_err(|e| e.to_string())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FileStats {
    num_records: i64,
    min_values: BTreeMap<String, Box<RawValue>>,
    max_values: BTreeMap<String, Box<RawValue>>,
    null_count: BTreeMap<String, u64>,
}

/// The `stats` JSON of a file with this footer; `partition_by` columns are left out.
pub fn stats_json(meta: &ParquetMetaData, partition_by: &[String]) -> Result<String, String> {
    let file = meta.file_metadata();
    let schema = parquet_to_arrow_schema(file.schema_descr(), file.key_value_metadata())
        .map_err(|e| e.to_string())?;
    let mut stats = FileStats {
        num_records: file.num_rows(),
        min_values: BTreeMap::new(),
        max_values: BTreeMap::new(),
        null_count: BTreeMap::new(),
    };
    let data = schema
        .fields()
        .iter()
        .filter(|f| !partition_by.contains(f.name()))
        .take(INDEXED_COLUMNS);
    for field in data {
        if field.data_type().is_nested() {
            continue;
        }
        // A column whose statistics cannot be read has none (the others still do).
        let column = match Column::new(meta, &schema, field) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(column = %field.name(), "no Delta statistics: {e}");
                continue;
            }
        };
        if let Some(n) = column.null_count() {
            stats.null_count.insert(field.name().clone(), n);
        }
        match column.bounds() {
            Ok(Some((min, max))) => {
                if let (Some(min), Some(max)) = (bound(&min, false), bound(&max, true)) {
                    stats.min_values.insert(field.name().clone(), min);
                    stats.max_values.insert(field.name().clone(), max);
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(column = %field.name(), "no Delta min/max: {e}"),
        }
    }
    serde_json::to_string(&stats).map_err(|e| e.to_string())
}

/// One column's statistics across the file's row groups.
struct Column<'a> {
    meta: &'a ParquetMetaData,
    convert: StatisticsConverter<'a>,
    nulls: Vec<Option<u64>>,
}

impl<'a> Column<'a> {
    fn new(meta: &'a ParquetMetaData, schema: &'a Schema, field: &Field) -> Result<Self, String> {
        let convert =
            StatisticsConverter::try_new(field.name(), schema, meta.file_metadata().schema_descr())
                .map_err(|e| e.to_string())?
                .with_missing_null_counts_as_zero(false);
        let nulls = convert
            .row_group_null_counts(meta.row_groups())
            .map_err(|e| e.to_string())?
            .iter()
            .collect();
        Ok(Column {
            meta,
            convert,
            nulls,
        })
    }

    /// The file's null count, if every row group has one.
    fn null_count(&self) -> Option<u64> {
        self.nulls.iter().copied().sum()
    }

    /// The smallest minimum and largest maximum of the row groups that hold values; `None`
    /// if one of those has no statistics (or none holds a value).
    fn bounds(&self) -> Result<Option<(ScalarValue, ScalarValue)>, String> {
        let groups = self.meta.row_groups();
        let mins = self
            .convert
            .row_group_mins(groups)
            .map_err(|e| e.to_string())?;
        let maxes = self
            .convert
            .row_group_maxes(groups)
            .map_err(|e| e.to_string())?;
        let mut out: Option<(ScalarValue, ScalarValue)> = None;
        for (i, g) in groups.iter().enumerate() {
            if self.nulls[i] == Some(g.num_rows() as u64) {
                continue; // only nulls: no bounds to give
            }
            if mins.is_null(i) || maxes.is_null(i) {
                return Ok(None);
            }
            let min = ScalarValue::try_from_array(&mins, i).map_err(|e| e.to_string())?;
            let max = ScalarValue::try_from_array(&maxes, i).map_err(|e| e.to_string())?;
            out = Some(match out {
                None => (min, max),
                Some((lo, hi)) => {
                    let lo = if min.partial_cmp(&lo) == Some(std::cmp::Ordering::Less) {
                        min
                    } else {
                        lo
                    };
                    let hi = if max.partial_cmp(&hi) == Some(std::cmp::Ordering::Greater) {
                        max
                    } else {
                        hi
                    };
                    (lo, hi)
                }
            });
        }
        Ok(out)
    }
}

/// A minimum (`upper` false) or maximum as Delta writes it in `minValues` / `maxValues`; `None`
/// for a type Delta keeps no bounds of (booleans, binary) or a value JSON cannot hold.
fn bound(v: &ScalarValue, upper: bool) -> Option<Box<RawValue>> {
    use ScalarValue as S;
    let json = match v {
        S::Int8(Some(x)) => x.to_string(),
        S::Int16(Some(x)) => x.to_string(),
        S::Int32(Some(x)) => x.to_string(),
        S::Int64(Some(x)) => x.to_string(),
        S::UInt8(Some(x)) => x.to_string(),
        S::UInt16(Some(x)) => x.to_string(),
        S::UInt32(Some(x)) => x.to_string(),
        S::UInt64(Some(x)) => x.to_string(),
        S::Float32(Some(x)) if x.is_finite() => serde_json::to_string(x).ok()?,
        S::Float64(Some(x)) if x.is_finite() => serde_json::to_string(x).ok()?,
        S::Decimal128(Some(x), _, scale) => decimal(*x, *scale)?,
        S::Utf8(Some(s)) | S::LargeUtf8(Some(s)) | S::Utf8View(Some(s)) => {
            let s = if upper {
                truncate_max(s)?
            } else {
                truncate_min(s).to_string()
            };
            serde_json::to_string(&s).ok()?
        }
        S::Date32(Some(d)) => {
            let day = DateTime::from_timestamp(i64::from(*d) * 86_400, 0)?;
            serde_json::to_string(&day.format("%Y-%m-%d").to_string()).ok()?
        }
        S::Date64(Some(ms)) => {
            let day = DateTime::from_timestamp_millis(*ms)?;
            serde_json::to_string(&day.format("%Y-%m-%d").to_string()).ok()?
        }
        S::Dictionary(_, value) => return bound(value, upper),
        S::TimestampSecond(Some(t), tz) => timestamp(*t, TimeUnit::Second, tz.is_some(), upper)?,
        S::TimestampMillisecond(Some(t), tz) => {
            timestamp(*t, TimeUnit::Millisecond, tz.is_some(), upper)?
        }
        S::TimestampMicrosecond(Some(t), tz) => {
            timestamp(*t, TimeUnit::Microsecond, tz.is_some(), upper)?
        }
        S::TimestampNanosecond(Some(t), tz) => {
            timestamp(*t, TimeUnit::Nanosecond, tz.is_some(), upper)?
        }
        _ => return None,
    };
    RawValue::from_string(json).ok()
}

/// A decimal's exact digits as a JSON number (as Spark writes decimals).
fn decimal(v: i128, scale: i8) -> Option<String> {
    if scale <= 0 {
        let factor = 10i128.checked_pow(u32::from(scale.unsigned_abs()))?;
        return Some(v.checked_mul(factor)?.to_string());
    }
    let scale = scale as usize;
    let digits = format!("{:0>width$}", v.unsigned_abs(), width = scale + 1);
    let (int, frac) = digits.split_at(digits.len() - scale);
    let sign = if v < 0 { "-" } else { "" };
    Some(format!("{sign}{int}.{frac}"))
}

/// A timestamp at millisecond precision, the protocol's format (`2024-03-01T10:00:00.000Z`;
/// without the `Z` for a timestamp without time zone). A minimum is rounded down and a
/// maximum up, so both still bound the column's values.
fn timestamp(v: i64, unit: TimeUnit, utc: bool, upper: bool) -> Option<String> {
    let ms = match unit {
        TimeUnit::Second => v.checked_mul(1000)?,
        TimeUnit::Millisecond => v,
        TimeUnit::Microsecond | TimeUnit::Nanosecond => {
            let per_ms = if unit == TimeUnit::Microsecond {
                1_000
            } else {
                1_000_000
            };
            let down = v.div_euclid(per_ms);
            if upper && v.rem_euclid(per_ms) != 0 {
                down + 1
            } else {
                down
            }
        }
    };
    let t = DateTime::from_timestamp_millis(ms)?;
    let format = if utc {
        "%Y-%m-%dT%H:%M:%S%.3fZ"
    } else {
        "%Y-%m-%dT%H:%M:%S%.3f"
    };
    serde_json::to_string(&t.format(format).to_string()).ok()
}

/// A minimum string cut to Delta's prefix (a prefix is never larger).
fn truncate_min(s: &str) -> &str {
    match s.char_indices().nth(STRING_PREFIX) {
        Some((end, _)) => &s[..end],
        None => s,
    }
}

/// A maximum string cut to Delta's prefix, then a tie-breaker above the first character cut
/// off: U+007F after an ASCII character, U+10FFFF otherwise (as Delta and delta-kernel cut
/// it). A cut cannot follow U+10FFFF (nothing is above it), so the prefix grows past such
/// characters, up to twice its length; `None` if there is no place to cut within that.
fn truncate_max(s: &str) -> Option<String> {
    let chars: Vec<(usize, char)> = s.char_indices().take(STRING_PREFIX_LIMIT + 1).collect();
    for len in STRING_PREFIX..=STRING_PREFIX_LIMIT {
        let Some(&(end, next)) = chars.get(len) else {
            return Some(s.to_string()); // ends before: the whole string
        };
        if next == char::MAX {
            continue;
        }
        let tie = if next < '\x7f' { '\x7f' } else { char::MAX };
        return Some(format!("{}{tie}", &s[..end]));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use datafusion::arrow::array::{
        BooleanArray, Date32Array, Decimal128Array, Float64Array, Int64Array, RecordBatch,
        StringArray, TimestampMicrosecondArray,
    };
    use datafusion::arrow::datatypes::DataType;
    use object_store::memory::InMemory;
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::WriterProperties;
    use serde_json::{Value, json};

    /// A Parquet file of these columns in row groups of two rows, and its stats as Delta has
    /// them (the footer read back through ranged reads of an object store).
    async fn stats_of(batch: RecordBatch, partition_by: &[String]) -> Value {
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(2))
            .build();
        let mut buf = Vec::new();
        let mut w = ArrowWriter::try_new(&mut buf, batch.schema(), Some(props)).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let store = InMemory::new();
        let path = Path::from("t/part.parquet");
        let size = buf.len() as u64;
        store.put(&path, buf.into()).await.unwrap();
        let meta = footer(&store, path, size).await.unwrap();
        assert!(meta.row_groups().len() > 1);
        serde_json::from_str(&stats_json(&meta, partition_by).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn only_the_footer_is_read() {
        for rows in [10, 200_000] {
            let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
            let ids = Int64Array::from((0..rows).collect::<Vec<i64>>());
            let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(ids)]).unwrap();
            let mut buf = Vec::new();
            let mut w = ArrowWriter::try_new(&mut buf, schema, None).unwrap();
            w.write(&batch).unwrap();
            w.close().unwrap();
            let size = buf.len() as u64;
            let tail: [u8; 4] = buf[buf.len() - 8..buf.len() - 4].try_into().unwrap();
            let footer_len = u64::from(u32::from_le_bytes(tail)) + 8;
            let store = InMemory::new();
            let path = Path::from("part.parquet");
            store.put(&path, buf.into()).await.unwrap();
            let mut ranges = Ranges {
                store: &store,
                path,
                read: 0,
            };
            let meta = read_footer(&mut ranges, size).await.unwrap();
            assert_eq!(meta.file_metadata().num_rows(), rows);
            // The footer, plus what the first request read before it (at most a quarter of
            // the file, and 64 KiB).
            let most = footer_len + (size / 4).min(FOOTER_HINT);
            let read = ranges.read;
            assert!(read >= footer_len, "{rows} rows: {read} of {size} bytes");
            assert!(
                read <= most,
                "{rows} rows: {read} of {size}, footer {footer_len}"
            );
            if rows > 10 {
                assert!(read < size / 10, "{read} of {size} bytes");
            }
        }
    }

    #[tokio::test]
    async fn stats_span_the_row_groups_and_leave_out_partitions_and_booleans() {
        let long = format!("{}tail", "z".repeat(40));
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("name", DataType::Utf8, true),
            Field::new("score", DataType::Float64, true),
            Field::new("day", DataType::Date32, true),
            Field::new(
                "at",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
            Field::new("price", DataType::Decimal128(10, 2), true),
            Field::new("ok", DataType::Boolean, true),
            Field::new("empty", DataType::Int64, true),
            Field::new("part", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![
                    Some(5),
                    None,
                    Some(-3),
                    Some(9),
                    Some(1),
                ])),
                Arc::new(StringArray::from(vec![
                    Some("b"),
                    Some("a"),
                    None,
                    Some(long.as_str()),
                    Some("c"),
                ])),
                Arc::new(Float64Array::from(vec![1.5, 0.25, 2.0, -1.0, 0.0])),
                Arc::new(Date32Array::from(vec![19783, 19784, 19785, 19786, 19790])),
                Arc::new(
                    TimestampMicrosecondArray::from(vec![
                        1_709_287_200_000_500,
                        1_709_287_200_000_000,
                        1_709_287_201_000_000,
                        1_709_287_202_123_456,
                        1_709_287_200_000_001,
                    ])
                    .with_timezone("UTC"),
                ),
                Arc::new(
                    Decimal128Array::from(vec![12345, -5, 100, 0, 99999])
                        .with_precision_and_scale(10, 2)
                        .unwrap(),
                ),
                Arc::new(BooleanArray::from(vec![true, false, true, true, true])),
                Arc::new(Int64Array::from(vec![None::<i64>; 5])),
                Arc::new(StringArray::from(vec!["p"; 5])),
            ],
        )
        .unwrap();
        let s = stats_of(batch, &["part".to_string()]).await;
        assert_eq!(s["numRecords"], 5);
        assert_eq!(
            s["minValues"],
            json!({"id": -3, "name": "a", "score": -1.0, "day": "2024-03-01",
                   "at": "2024-03-01T10:00:00.000Z", "price": -0.05})
        );
        let max_name = format!("{}\u{7f}", "z".repeat(32));
        assert_eq!(
            s["maxValues"],
            json!({"id": 9, "name": max_name, "score": 2.0, "day": "2024-03-08",
                   "at": "2024-03-01T10:00:02.124Z", "price": 999.99})
        );
        assert_eq!(
            s["nullCount"],
            json!({"id": 1, "name": 1, "score": 0, "day": 0, "at": 0, "price": 0, "ok": 0,
                   "empty": 5})
        );
    }

    #[test]
    fn strings_are_cut_to_delta_prefix_with_a_tie_breaker_on_the_maximum() {
        let long = "a".repeat(40);
        assert_eq!(truncate_min(&long), "a".repeat(32));
        assert_eq!(
            truncate_max(&long).unwrap(),
            format!("{}\x7f", "a".repeat(32))
        );
        assert!(truncate_max(&long).unwrap().as_str() > long.as_str());
        let short = "é".repeat(32);
        assert_eq!(truncate_min(&short), short);
        assert_eq!(truncate_max(&short).unwrap(), short);
        let wide = "é".repeat(33);
        let max = truncate_max(&wide).unwrap();
        assert_eq!(max, format!("{}{}", "é".repeat(32), char::MAX));
        assert!(max > wide);
        let top = format!("{}{}", "a".repeat(32), char::MAX.to_string().repeat(40));
        assert_eq!(truncate_max(&top), None);
    }

    #[test]
    fn timestamps_are_milliseconds_rounded_outwards() {
        // 2024-03-01T10:00:00.000123456Z
        let ns = 1_709_287_200_000_123_456;
        assert_eq!(
            timestamp(ns, TimeUnit::Nanosecond, true, false).unwrap(),
            "\"2024-03-01T10:00:00.000Z\""
        );
        assert_eq!(
            timestamp(ns, TimeUnit::Nanosecond, true, true).unwrap(),
            "\"2024-03-01T10:00:00.001Z\""
        );
        assert_eq!(
            timestamp(1_709_287_200_000, TimeUnit::Millisecond, false, true).unwrap(),
            "\"2024-03-01T10:00:00.000\""
        );
        assert_eq!(
            timestamp(-1, TimeUnit::Microsecond, true, false).unwrap(),
            "\"1969-12-31T23:59:59.999Z\""
        );
    }

    #[test]
    fn decimals_keep_their_digits() {
        assert_eq!(decimal(12345, 2).unwrap(), "123.45");
        assert_eq!(decimal(-5, 3).unwrap(), "-0.005");
        assert_eq!(decimal(7, 0).unwrap(), "7");
        assert_eq!(decimal(7, -2).unwrap(), "700");
    }
}
