//! SQL functions sluice adds to every session it builds (run, validate, query, warehouse):
//! `try_to_timestamp(value, format, ...)` and `try_to_date(value, format, ...)`, which return
//! NULL where no format matches (as DuckDB's `try_strptime`) instead of failing the query, so a
//! query can reject such a row with a reason. And the JSON functions of
//! `datafusion-functions-json` over JSON text (a `type = "json"` column): `json_get_str(payload,
//! 'user', 'id')`, `json_get_int`, `json_get_float`, `json_get_bool`, `json_get_json`,
//! `json_as_text`, `json_contains`, `json_length`, `json_object_keys`, and the operators `->`,
//! `->>` and `?`.

use std::sync::Arc;

use chrono::format::{Item, StrftimeItems};
use chrono::{DateTime, NaiveDate, NaiveDateTime};
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Date32Builder, TimestampMicrosecondBuilder,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::{Result, exec_err, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;

/// Registers sluice's functions on a session.
pub fn register(ctx: &SessionContext) {
    let state = ctx.state_ref();
    let mut state = state.write();
    register_on(&mut state);
}

/// Registers sluice's functions on a session's state (a distributed worker's, for one).
pub fn register_on(state: &mut datafusion::execution::SessionState) {
    use datafusion::execution::FunctionRegistry;
    for target in [Target::Timestamp, Target::Date] {
        if let Err(e) = state.register_udf(Arc::new(ScalarUDF::from(TryParse::new(target)))) {
            tracing::warn!(error = %e, "sluice's functions are not available");
        }
    }
    if let Err(e) = datafusion_functions_json::register_all(state) {
        // Registering adds to the session's maps; it fails only if DataFusion changes.
        tracing::warn!(error = %e, "the JSON functions are not available");
    }
}

/// What a value is parsed into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Target {
    /// `Timestamp(Microsecond)`, UTC: a value with an offset is converted to UTC.
    Timestamp,
    /// `Date32`.
    Date,
}

/// `try_to_timestamp` / `try_to_date`.
#[derive(Debug, PartialEq, Eq, Hash)]
struct TryParse {
    target: Target,
    signature: Signature,
}

impl TryParse {
    fn new(target: Target) -> TryParse {
        TryParse {
            target,
            signature: Signature::variadic_any(Volatility::Immutable),
        }
    }
}

/// Formats tried when none is given: ISO 8601 / RFC 3339 shapes.
const ISO_TIMESTAMPS: [&str; 4] = [
    "%Y-%m-%dT%H:%M:%S%.f%:z",
    "%Y-%m-%d %H:%M:%S%.f%:z",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f",
];
const ISO_DATES: [&str; 1] = ["%Y-%m-%d"];

/// Whether a chrono format names an offset (then the value is read with it and moved to UTC).
pub(crate) fn has_offset(items: &[Item<'_>]) -> bool {
    use chrono::format::{Fixed, Item as I};
    items.iter().any(|i| {
        matches!(
            i,
            I::Fixed(
                Fixed::TimezoneOffset
                    | Fixed::TimezoneOffsetColon
                    | Fixed::TimezoneOffsetDoubleColon
                    | Fixed::TimezoneOffsetTripleColon
                    | Fixed::TimezoneOffsetColonZ
                    | Fixed::TimezoneOffsetZ
                    | Fixed::RFC2822
                    | Fixed::RFC3339
            )
        )
    })
}

/// Parses `value` with `format` into microseconds since the epoch (UTC).
fn parse_timestamp(value: &str, format: &str, offset: bool) -> Option<i64> {
    let value = value.trim();
    if format.ends_with("%:z") || offset {
        // `Z` stands for +00:00 in ISO 8601.
        let v = match value.strip_suffix('Z') {
            Some(v) if format.ends_with("%:z") => format!("{v}+00:00"),
            _ => value.to_string(),
        };
        if let Ok(t) = DateTime::parse_from_str(&v, format) {
            return Some(t.timestamp_micros());
        }
        if offset {
            return None;
        }
    }
    if let Ok(t) = NaiveDateTime::parse_from_str(value, format) {
        return Some(t.and_utc().timestamp_micros());
    }
    // A format without a time of day: midnight.
    NaiveDate::parse_from_str(value, format)
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp_micros())
}

/// Parses `value` with `format` into days since the epoch.
fn parse_date(value: &str, format: &str) -> Option<i32> {
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1)?;
    NaiveDate::parse_from_str(value.trim(), format)
        .ok()
        .and_then(|d| i32::try_from(d.signed_duration_since(epoch).num_days()).ok())
}

impl ScalarUDFImpl for TryParse {
    fn name(&self) -> &str {
        match self.target {
            Target::Timestamp => "try_to_timestamp",
            Target::Date => "try_to_date",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, args: &[DataType]) -> Result<DataType> {
        if args.is_empty() {
            return plan_err!("{}(value, format, ...) needs a value", self.name());
        }
        for (i, t) in args.iter().enumerate().skip(1) {
            if !matches!(
                t,
                DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 | DataType::Null
            ) {
                return plan_err!(
                    "{}: format {} must be text (a chrono format such as '%d/%m/%Y'), not {t}",
                    self.name(),
                    i
                );
            }
        }
        Ok(match self.target {
            Target::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            Target::Date => DataType::Date32,
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        let arrays: Vec<ArrayRef> = ColumnarValue::values_to_arrays(&args.args)?
            .iter()
            .map(|a| cast(a, &DataType::Utf8))
            .collect::<std::result::Result<_, _>>()?;
        let values = arrays[0].as_string::<i32>();
        let formats: Vec<_> = arrays[1..].iter().map(|a| a.as_string::<i32>()).collect();
        // A format that is the same on every row (the usual literal) is checked once.
        let mut checked: Vec<Option<(String, bool)>> = vec![None; formats.len()];
        let defaults: &[&str] = match self.target {
            Target::Timestamp => &ISO_TIMESTAMPS,
            Target::Date => &ISO_DATES,
        };
        let mut ts = TimestampMicrosecondBuilder::with_capacity(n);
        let mut dates = Date32Builder::with_capacity(n);
        for row in 0..n {
            let mut out_ts = None;
            let mut out_date = None;
            if values.is_valid(row) {
                let value = values.value(row);
                let mut tried = 0;
                for (k, f) in formats.iter().enumerate() {
                    if f.is_null(row) {
                        continue;
                    }
                    let format = f.value(row);
                    let offset = match &checked[k] {
                        Some((known, offset)) if known == format => *offset,
                        _ => {
                            let items: Vec<Item<'_>> = StrftimeItems::new(format).collect();
                            if items.iter().any(|i| matches!(i, Item::Error)) {
                                return exec_err!(
                                    "{}: '{format}' is not a valid chrono format",
                                    self.name()
                                );
                            }
                            let offset = has_offset(&items);
                            checked[k] = Some((format.to_string(), offset));
                            offset
                        }
                    };
                    tried += 1;
                    match self.target {
                        Target::Timestamp => out_ts = parse_timestamp(value, format, offset),
                        Target::Date => out_date = parse_date(value, format),
                    }
                    if out_ts.is_some() || out_date.is_some() {
                        break;
                    }
                }
                if tried == 0 {
                    for format in defaults {
                        match self.target {
                            Target::Timestamp => {
                                out_ts = parse_timestamp(value, format, format.ends_with("%:z"))
                            }
                            Target::Date => out_date = parse_date(value, format),
                        }
                        if out_ts.is_some() || out_date.is_some() {
                            break;
                        }
                    }
                }
            }
            ts.append_option(out_ts);
            dates.append_option(out_date);
        }
        let out: ArrayRef = match self.target {
            Target::Timestamp => Arc::new(ts.finish()),
            Target::Date => Arc::new(dates.finish()),
        };
        Ok(ColumnarValue::Array(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn one(sql: &str) -> String {
        let ctx = SessionContext::new();
        register(&ctx);
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        datafusion::arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string()
    }

    #[tokio::test]
    async fn formats_are_tried_in_order_and_a_mismatch_is_null() {
        let out = one(
            "SELECT try_to_timestamp('Sun Dec 04 04:47:44 2005', '%a %b %d %H:%M:%S %Y') AS a, \
             try_to_timestamp('Mon Dec 04 04:47:44 2005', '%a %b %d %H:%M:%S %Y') AS wrong_day, \
             try_to_timestamp('Sun Dec 04 25:47:44 2005', '%a %b %d %H:%M:%S %Y') AS hour_25, \
             try_to_date('04-12-2005', '%Y/%m/%d', '%d-%m-%Y') AS d, \
             try_to_date('2005/12/04', '%d-%m-%Y', '%Y/%m/%d') AS d2, \
             try_to_date('x', '%d-%m-%Y') AS bad, \
             try_to_timestamp('2005-12-04T04:47:44+02:00') AS iso, \
             try_to_timestamp('2005-12-04T04:47:44.5Z') AS z, \
             try_to_timestamp('2005-12-04 04:47:44') AS naive, \
             try_to_timestamp('04/12/2005', '%d/%m/%Y') AS midnight, \
             try_to_timestamp(NULL, '%Y') AS n",
        )
        .await;
        let row = out.lines().nth(3).unwrap();
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert_eq!(
            cells[1..12],
            [
                "2005-12-04T04:47:44",
                "",
                "",
                "2005-12-04",
                "2005-12-04",
                "",
                "2005-12-04T02:47:44",
                "2005-12-04T04:47:44.500",
                "2005-12-04T04:47:44",
                "2005-12-04T00:00:00",
                ""
            ],
            "{out}"
        );
    }

    #[tokio::test]
    async fn an_invalid_format_is_an_error_not_a_null() {
        let ctx = SessionContext::new();
        register(&ctx);
        let err = ctx
            .sql("SELECT try_to_date('2005-12-04', '%Q') AS d")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("not a valid chrono format"),
            "{err}"
        );
    }
}
