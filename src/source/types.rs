//! Column types of schema files and how a text cell becomes a typed value: integers with range
//! checks, exact decimals, booleans with their spellings, dates, times and timestamps by chrono
//! formats (or ISO 8601), time zones for naive values and epoch units, binary in base64 or hex,
//! and JSON text. A cell that does not parse is an error naming the type and its format; the
//! reader rejects its row with it.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use chrono::format::{Fixed, Item, Numeric, Parsed, StrftimeItems};
use chrono::{NaiveDate, NaiveDateTime, NaiveTime, TimeZone};
use datafusion::arrow::array::timezone::Tz;
use datafusion::arrow::compute::kernels::cast_utils::string_to_datetime;
use datafusion::arrow::datatypes::{DataType, TimeUnit};
use serde::Deserialize;

/// A column type in a schema file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ColumnType {
    /// UTF-8 text; any JSON value is accepted (numbers and nested values as their JSON text).
    #[default]
    String,
    /// JSON text, checked to be JSON (for the `json_*` functions).
    Json,
    /// true / false, by the column's spellings.
    Boolean,
    /// Signed integers.
    Int8,
    /// 16-bit signed integer.
    Int16,
    /// 32-bit signed integer.
    Int32,
    /// 64-bit signed integer.
    Int64,
    /// Unsigned integers: range-checked, stored as the next wider signed type.
    UInt8,
    /// 16-bit unsigned integer.
    UInt16,
    /// 32-bit unsigned integer.
    UInt32,
    /// 64-bit unsigned integer (stored as `decimal(20,0)`).
    UInt64,
    /// 32-bit float.
    Float32,
    /// 64-bit float.
    Float64,
    /// Exact decimal: precision (1..=38 digits), scale (digits after the point).
    Decimal {
        /// Total digits.
        precision: u8,
        /// Digits after the point.
        scale: i8,
    },
    /// A calendar date.
    Date,
    /// A point in time, microseconds since the epoch, UTC.
    Timestamp,
    /// A time of day, microseconds since midnight.
    Time,
    /// Bytes, written as base64 or hex.
    Binary,
}

impl FromStr for ColumnType {
    type Err = String;

    fn from_str(s: &str) -> Result<ColumnType, String> {
        let t = s.trim().to_ascii_lowercase();
        let t = t.replace(' ', "");
        Ok(match t.as_str() {
            "string" | "text" | "varchar" | "utf8" => ColumnType::String,
            "json" => ColumnType::Json,
            "boolean" | "bool" => ColumnType::Boolean,
            "int8" | "tinyint" => ColumnType::Int8,
            "int16" | "smallint" => ColumnType::Int16,
            "int32" => ColumnType::Int32,
            "int64" | "bigint" | "int" | "integer" | "long" => ColumnType::Int64,
            "uint8" => ColumnType::UInt8,
            "uint16" => ColumnType::UInt16,
            "uint32" => ColumnType::UInt32,
            "uint64" => ColumnType::UInt64,
            "float32" | "real" => ColumnType::Float32,
            "float64" | "double" | "float" => ColumnType::Float64,
            "date" => ColumnType::Date,
            "timestamp" | "datetime" => ColumnType::Timestamp,
            "time" => ColumnType::Time,
            "binary" | "bytes" | "blob" => ColumnType::Binary,
            "decimal" | "numeric" => {
                return Err("decimal needs a precision and a scale, e.g. \"decimal(12,2)\"".into());
            }
            _ => {
                let args = t
                    .strip_prefix("decimal(")
                    .or_else(|| t.strip_prefix("numeric("))
                    .and_then(|r| r.strip_suffix(')'));
                let Some(args) = args else {
                    return Err(format!(
                        "unknown type \"{s}\" (known: string, json, boolean, int8, int16, int32, \
                         int64, uint8, uint16, uint32, uint64, float32, float64, decimal(p,s), \
                         date, timestamp, time, binary)"
                    ));
                };
                let (p, sc) = args.split_once(',').unwrap_or((args, "0"));
                let bad = || format!("\"{s}\": precision and scale must be numbers");
                let precision: u8 = p.parse().map_err(|_| bad())?;
                let scale: i8 = sc.parse().map_err(|_| bad())?;
                if !(1..=38).contains(&precision) {
                    return Err(format!("\"{s}\": precision must be 1 to 38"));
                }
                if scale < 0 || scale as u8 > precision {
                    return Err(format!("\"{s}\": scale must be 0 to the precision"));
                }
                ColumnType::Decimal { precision, scale }
            }
        })
    }
}

impl<'de> Deserialize<'de> for ColumnType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ColumnType::String => "string",
            ColumnType::Json => "json",
            ColumnType::Boolean => "boolean",
            ColumnType::Int8 => "int8",
            ColumnType::Int16 => "int16",
            ColumnType::Int32 => "int32",
            ColumnType::Int64 => "int64",
            ColumnType::UInt8 => "uint8",
            ColumnType::UInt16 => "uint16",
            ColumnType::UInt32 => "uint32",
            ColumnType::UInt64 => "uint64",
            ColumnType::Float32 => "float32",
            ColumnType::Float64 => "float64",
            ColumnType::Decimal { precision, scale } => {
                return write!(f, "decimal({precision},{scale})");
            }
            ColumnType::Date => "date",
            ColumnType::Timestamp => "timestamp",
            ColumnType::Time => "time",
            ColumnType::Binary => "binary",
        };
        f.write_str(s)
    }
}

impl ColumnType {
    /// The Arrow type of the column in the batches the readers produce (the query's input).
    pub fn data_type(self) -> DataType {
        match self {
            ColumnType::String | ColumnType::Json => DataType::Utf8,
            ColumnType::Boolean => DataType::Boolean,
            ColumnType::Int8 => DataType::Int8,
            ColumnType::Int16 | ColumnType::UInt8 => DataType::Int16,
            ColumnType::Int32 | ColumnType::UInt16 => DataType::Int32,
            ColumnType::Int64 | ColumnType::UInt32 => DataType::Int64,
            ColumnType::UInt64 => DataType::Decimal128(20, 0),
            ColumnType::Float32 => DataType::Float32,
            ColumnType::Float64 => DataType::Float64,
            ColumnType::Decimal { precision, scale } => DataType::Decimal128(precision, scale),
            ColumnType::Date => DataType::Date32,
            ColumnType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            ColumnType::Time => DataType::Time64(TimeUnit::Microsecond),
            ColumnType::Binary => DataType::Binary,
        }
    }

    fn temporal(self) -> bool {
        matches!(
            self,
            ColumnType::Date | ColumnType::Timestamp | ColumnType::Time
        )
    }
}

/// One chrono format or a list tried in order.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Formats {
    /// One format.
    One(String),
    /// Formats tried in order.
    Many(Vec<String>),
}

impl Formats {
    fn list(&self) -> Vec<String> {
        match self {
            Formats::One(f) => vec![f.clone()],
            Formats::Many(l) => l.clone(),
        }
    }
}

/// What an epoch number counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum EpochUnit {
    /// Seconds.
    #[serde(rename = "s")]
    Seconds,
    /// Milliseconds.
    #[serde(rename = "ms")]
    Millis,
    /// Microseconds.
    #[serde(rename = "us")]
    Micros,
}

impl EpochUnit {
    fn name(self) -> &'static str {
        match self {
            EpochUnit::Seconds => "s",
            EpochUnit::Millis => "ms",
            EpochUnit::Micros => "us",
        }
    }
}

/// How binary values are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BinaryEncoding {
    /// Base64 (standard alphabet, padding optional).
    #[default]
    Base64,
    /// Hexadecimal digits, an optional `0x` or `\x` first.
    Hex,
}

/// The Arrow form of a parsed cell, appended by the builder of its column's type.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'v> {
    /// No value.
    Null,
    /// Text (string and json columns).
    Str(&'v str),
    /// A boolean.
    Bool(bool),
    /// Integers, days (dates), microseconds (timestamps, times).
    Int(i64),
    /// A float.
    Float(f64),
    /// A decimal's unscaled value (and uint64).
    Decimal(i128),
    /// Bytes.
    Bytes(Vec<u8>),
}

/// A compiled format.
#[derive(Debug, Clone)]
struct Format {
    items: Vec<Item<'static>>,
    /// The format reads an offset: the value is moved to UTC by it.
    offset: bool,
}

/// How one column's cells are parsed (compiled from its schema entry once).
#[derive(Debug, Clone)]
pub struct CellParser {
    ty: ColumnType,
    kind: Kind,
    /// The type and its options as the rejection says them, e.g. `timestamp (format "%d/%m/%Y")`.
    label: String,
}

#[derive(Debug, Clone)]
enum Kind {
    Str,
    Json,
    Bool { yes: Vec<String>, no: Vec<String> },
    Int { min: i64, max: i64 },
    UInt64,
    Float32,
    Float64,
    Decimal { precision: u8, scale: u8 },
    Temporal(Temporal),
    Binary(BinaryEncoding),
}

#[derive(Debug, Clone)]
struct Temporal {
    formats: Vec<Format>,
    unit: Option<EpochUnit>,
    tz: Option<Tz>,
    year: Option<i32>,
}

const TRUE_VALUES: [&str; 6] = ["true", "t", "yes", "y", "1", "on"];
const FALSE_VALUES: [&str; 6] = ["false", "f", "no", "n", "0", "off"];

/// A column's options beyond its type (the schema entry's fields).
#[derive(Debug, Clone, Default)]
pub struct TypeOptions {
    /// chrono formats (date, timestamp, time).
    pub format: Option<Formats>,
    /// Time zone of naive timestamps.
    pub timezone: Option<String>,
    /// Epoch unit of numeric timestamps.
    pub unit: Option<EpochUnit>,
    /// Year of year-less formats.
    pub year: Option<i32>,
    /// Spellings of true.
    pub true_values: Option<Vec<String>>,
    /// Spellings of false.
    pub false_values: Option<Vec<String>>,
    /// Binary encoding.
    pub encoding: Option<BinaryEncoding>,
}

impl CellParser {
    /// Compiles a column's type and options; the error says which option is wrong and why.
    pub fn new(ty: ColumnType, o: &TypeOptions) -> Result<CellParser, String> {
        let only = |set: bool, what: &str, types: &str| {
            if set {
                Err(format!("{what} applies to {types} columns, not {ty}"))
            } else {
                Ok(())
            }
        };
        only(
            o.format.is_some() && !ty.temporal(),
            "format",
            "date, timestamp and time",
        )?;
        only(
            o.timezone.is_some() && ty != ColumnType::Timestamp,
            "timezone",
            "timestamp",
        )?;
        only(
            o.unit.is_some() && !matches!(ty, ColumnType::Timestamp | ColumnType::Date),
            "unit",
            "timestamp and date",
        )?;
        only(
            o.year.is_some() && !ty.temporal(),
            "year",
            "date, timestamp and time",
        )?;
        only(
            (o.true_values.is_some() || o.false_values.is_some()) && ty != ColumnType::Boolean,
            "true_values / false_values",
            "boolean",
        )?;
        only(
            o.encoding.is_some() && ty != ColumnType::Binary,
            "encoding",
            "binary",
        )?;
        let mut label = ty.to_string();
        let kind = match ty {
            ColumnType::String => Kind::Str,
            ColumnType::Json => Kind::Json,
            ColumnType::Boolean => {
                let lower = |l: &Option<Vec<String>>, d: &[&str]| -> Vec<String> {
                    match l {
                        Some(l) => l.iter().map(|v| v.trim().to_lowercase()).collect(),
                        None => d.iter().map(|v| v.to_string()).collect(),
                    }
                };
                let yes = lower(&o.true_values, &TRUE_VALUES);
                let no = lower(&o.false_values, &FALSE_VALUES);
                if let Some(v) = yes.iter().find(|v| no.contains(v)) {
                    return Err(format!("\"{v}\" is both a true and a false value"));
                }
                if yes.is_empty() || no.is_empty() {
                    return Err("true_values and false_values need one value each at least".into());
                }
                label = format!(
                    "boolean (true: {}; false: {})",
                    yes.join(", "),
                    no.join(", ")
                );
                Kind::Bool { yes, no }
            }
            ColumnType::Int8 => int_kind(&mut label, i8::MIN as i64, i8::MAX as i64),
            ColumnType::Int16 => int_kind(&mut label, i16::MIN as i64, i16::MAX as i64),
            ColumnType::Int32 => int_kind(&mut label, i32::MIN as i64, i32::MAX as i64),
            ColumnType::Int64 => Kind::Int {
                min: i64::MIN,
                max: i64::MAX,
            },
            ColumnType::UInt8 => int_kind(&mut label, 0, u8::MAX as i64),
            ColumnType::UInt16 => int_kind(&mut label, 0, u16::MAX as i64),
            ColumnType::UInt32 => int_kind(&mut label, 0, u32::MAX as i64),
            ColumnType::UInt64 => Kind::UInt64,
            ColumnType::Float32 => Kind::Float32,
            ColumnType::Float64 => Kind::Float64,
            ColumnType::Decimal { precision, scale } => Kind::Decimal {
                precision,
                scale: scale as u8,
            },
            ColumnType::Date | ColumnType::Timestamp | ColumnType::Time => {
                let t = temporal(ty, o)?;
                label = match (&t.unit, &o.format) {
                    (Some(u), _) => format!("{ty} (epoch {})", u.name()),
                    (None, Some(f)) => {
                        let list = f.list();
                        let quoted: Vec<String> = list.iter().map(|f| format!("{f:?}")).collect();
                        let word = if list.len() == 1 { "format" } else { "formats" };
                        format!("{ty} ({word} {})", quoted.join(", "))
                    }
                    (None, None) => match ty {
                        ColumnType::Time => format!("{ty} (HH:MM[:SS[.f]])"),
                        _ => format!("{ty} (ISO 8601)"),
                    },
                };
                Kind::Temporal(t)
            }
            ColumnType::Binary => {
                let e = o.encoding.unwrap_or_default();
                label = format!(
                    "binary ({})",
                    match e {
                        BinaryEncoding::Base64 => "base64",
                        BinaryEncoding::Hex => "hex",
                    }
                );
                Kind::Binary(e)
            }
        };
        Ok(CellParser { ty, kind, label })
    }

    /// A string column's parser.
    pub fn text() -> CellParser {
        CellParser {
            ty: ColumnType::String,
            kind: Kind::Str,
            label: "string".into(),
        }
    }

    /// The column's type.
    pub fn ty(&self) -> ColumnType {
        self.ty
    }

    /// The type and its options, as a rejection names them.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Parses one cell (`None`: the value does not fit the type).
    pub fn parse<'v>(&self, v: &'v str) -> Option<Value<'v>> {
        match &self.kind {
            Kind::Str => Some(Value::Str(v)),
            Kind::Json => serde_json::from_str::<serde::de::IgnoredAny>(v)
                .ok()
                .map(|_| Value::Str(v)),
            Kind::Bool { yes, no } => {
                let t = v.trim();
                if yes.iter().any(|y| y.eq_ignore_ascii_case(t)) {
                    Some(Value::Bool(true))
                } else if no.iter().any(|n| n.eq_ignore_ascii_case(t)) {
                    Some(Value::Bool(false))
                } else {
                    None
                }
            }
            Kind::Int { min, max } => {
                let n: i64 = v.trim().parse().ok()?;
                (*min..=*max).contains(&n).then_some(Value::Int(n))
            }
            Kind::UInt64 => v
                .trim()
                .parse::<u64>()
                .ok()
                .map(|n| Value::Decimal(n as i128)),
            Kind::Float32 => v.trim().parse::<f32>().ok().map(|f| Value::Float(f as f64)),
            Kind::Float64 => v.trim().parse::<f64>().ok().map(Value::Float),
            Kind::Decimal { precision, scale } => {
                parse_decimal(v.trim(), *precision, *scale).map(Value::Decimal)
            }
            Kind::Temporal(t) => t.parse(self.ty, v.trim()).map(Value::Int),
            Kind::Binary(e) => decode_binary(v.trim(), *e).map(Value::Bytes),
        }
    }
}

fn int_kind(label: &mut String, min: i64, max: i64) -> Kind {
    *label = format!("{label} ({min} to {max})");
    Kind::Int { min, max }
}

/// Compiles the formats, zone and unit of a date, timestamp or time column.
fn temporal(ty: ColumnType, o: &TypeOptions) -> Result<Temporal, String> {
    if o.unit.is_some() && o.format.is_some() {
        return Err("a column takes a format or a unit (epoch numbers), not both".into());
    }
    let tz = match &o.timezone {
        None => None,
        Some(z) => Some(z.parse::<Tz>().map_err(|e| {
            format!("timezone \"{z}\" is not an IANA zone name or an offset like +02:00 ({e})")
        })?),
    };
    let mut formats = Vec::new();
    for text in o.format.as_ref().map(Formats::list).unwrap_or_default() {
        let items = StrftimeItems::new(&text)
            .parse_to_owned()
            .map_err(|_| format!("format \"{text}\" is not a valid chrono format"))?;
        let has = |pred: &dyn Fn(&Item<'_>) -> bool| items.iter().any(pred);
        let offset = crate::functions::has_offset(&items);
        let year = has(&|i| {
            matches!(
                i,
                Item::Numeric(
                    Numeric::Year | Numeric::YearMod100 | Numeric::IsoYear | Numeric::Timestamp,
                    _
                ) | Item::Fixed(Fixed::RFC2822 | Fixed::RFC3339)
            )
        });
        if ty != ColumnType::Time && !year && o.year.is_none() {
            return Err(format!(
                "format \"{text}\" has no year: set `year = 2024` (the year of every value) or \
                 put %Y in the format"
            ));
        }
        if offset && o.timezone.is_some() {
            return Err(format!(
                "format \"{text}\" reads an offset; timezone applies to values without one"
            ));
        }
        formats.push(Format { items, offset });
    }
    if let Some(Formats::Many(l)) = &o.format
        && l.is_empty()
    {
        return Err("format is an empty list".into());
    }
    Ok(Temporal {
        formats,
        unit: o.unit,
        tz,
        year: o.year,
    })
}

const MICROS_PER_DAY: i64 = 86_400_000_000;

impl Temporal {
    /// Days (date), microseconds since the epoch (timestamp) or since midnight (time).
    fn parse(&self, ty: ColumnType, v: &str) -> Option<i64> {
        if let Some(unit) = self.unit {
            let micros = epoch_micros(v, unit)?;
            return match ty {
                ColumnType::Date => i32::try_from(micros.div_euclid(MICROS_PER_DAY))
                    .ok()
                    .map(i64::from),
                _ => Some(micros),
            };
        }
        if self.formats.is_empty() {
            return self.default(ty, v);
        }
        self.formats.iter().find_map(|f| self.with(ty, f, v))
    }

    /// ISO 8601: `2024-05-01`, `2024-05-01T10:00:00[.f][Z|+02:00]` (space for T as well).
    fn default(&self, ty: ColumnType, v: &str) -> Option<i64> {
        match ty {
            ColumnType::Date => NaiveDate::parse_from_str(v, "%Y-%m-%d").ok().map(days),
            ColumnType::Time => ["%H:%M:%S%.f", "%H:%M"]
                .iter()
                .find_map(|f| NaiveTime::parse_from_str(v, f).ok())
                .map(time_micros),
            _ => match &self.tz {
                None => string_to_datetime(&chrono::Utc, v)
                    .ok()
                    .map(|t| t.timestamp_micros()),
                Some(tz) => string_to_datetime(tz, v).ok().map(|t| t.timestamp_micros()),
            },
        }
    }

    fn with(&self, ty: ColumnType, f: &Format, v: &str) -> Option<i64> {
        let mut p = Parsed::new();
        chrono::format::parse(&mut p, v, f.items.iter()).ok()?;
        if let Some(y) = self.year
            && p.year().is_none()
        {
            p.set_year(y as i64).ok()?;
        }
        match ty {
            ColumnType::Date => p.to_naive_date().ok().map(days),
            ColumnType::Time => p.to_naive_time().ok().map(time_micros),
            _ if f.offset => p.to_datetime().ok().map(|t| t.timestamp_micros()),
            _ => {
                let naive = p.to_naive_datetime_with_offset(0).ok().or_else(|| {
                    // A format without a time of day: midnight.
                    p.to_naive_date().ok()?.and_hms_opt(0, 0, 0)
                })?;
                self.local(naive)
            }
        }
    }

    /// A naive value in the column's zone (UTC by default); the earlier of an ambiguous hour,
    /// none for a time the zone skips.
    fn local(&self, naive: NaiveDateTime) -> Option<i64> {
        match &self.tz {
            None => Some(naive.and_utc().timestamp_micros()),
            Some(tz) => tz
                .from_local_datetime(&naive)
                .earliest()
                .map(|t| t.timestamp_micros()),
        }
    }
}

fn days(d: NaiveDate) -> i64 {
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
    d.signed_duration_since(epoch).num_days()
}

fn time_micros(t: NaiveTime) -> i64 {
    use chrono::Timelike;
    t.num_seconds_from_midnight() as i64 * 1_000_000 + (t.nanosecond() as i64 / 1_000)
}

/// An epoch number (an integer, or a decimal to the microsecond) in microseconds.
fn epoch_micros(v: &str, unit: EpochUnit) -> Option<i64> {
    let scaled = parse_decimal(v, 38, 6)?; // the value in millionths of the unit
    let micros = match unit {
        EpochUnit::Seconds => scaled,
        EpochUnit::Millis => scaled.div_euclid(1_000),
        EpochUnit::Micros => scaled.div_euclid(1_000_000),
    };
    i64::try_from(micros).ok()
}

/// An exact decimal: `[+-]digits[.digits]`; at most `precision` digits in all and `scale` after
/// the point (more fraction digits only if they are zeros: no rounding). The unscaled value.
fn parse_decimal(v: &str, precision: u8, scale: u8) -> Option<i128> {
    let (negative, digits) = match v.as_bytes().first()? {
        b'-' => (true, &v[1..]),
        b'+' => (false, &v[1..]),
        _ => (false, v),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let frac = frac.trim_end_matches('0');
    let int = int.trim_start_matches('0');
    if frac.len() > scale as usize || int.len() + scale as usize > precision as usize {
        return None;
    }
    let mut n: i128 = 0;
    for b in int.bytes().chain(frac.bytes()) {
        n = n * 10 + (b - b'0') as i128;
    }
    for _ in frac.len()..scale as usize {
        n *= 10;
    }
    Some(if negative { -n } else { n })
}

fn decode_binary(v: &str, e: BinaryEncoding) -> Option<Vec<u8>> {
    match e {
        BinaryEncoding::Base64 => {
            let engine = base64::engine::GeneralPurpose::new(
                &base64::alphabet::STANDARD,
                base64::engine::GeneralPurposeConfig::new()
                    .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
            );
            engine.decode(v).ok()
        }
        BinaryEncoding::Hex => {
            let h = v
                .strip_prefix("0x")
                .or_else(|| v.strip_prefix("\\x"))
                .unwrap_or(v);
            hex::decode(h).ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parser(ty: &str, o: TypeOptions) -> CellParser {
        CellParser::new(ty.parse().unwrap(), &o).unwrap()
    }

    fn fmt(f: &[&str]) -> TypeOptions {
        TypeOptions {
            format: Some(Formats::Many(f.iter().map(|s| s.to_string()).collect())),
            ..Default::default()
        }
    }

    fn micros(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> i64 {
        NaiveDate::from_ymd_opt(y, mo, d)
            .unwrap()
            .and_hms_opt(h, mi, s)
            .unwrap()
            .and_utc()
            .timestamp_micros()
    }

    #[test]
    fn type_names_and_their_errors() {
        assert_eq!(
            "decimal(12, 2)".parse::<ColumnType>(),
            Ok(ColumnType::Decimal {
                precision: 12,
                scale: 2
            })
        );
        assert_eq!("BIGINT".parse::<ColumnType>(), Ok(ColumnType::Int64));
        assert!(
            "decimal"
                .parse::<ColumnType>()
                .unwrap_err()
                .contains("precision")
        );
        assert!("decimal(40,2)".parse::<ColumnType>().is_err());
        assert!("decimal(5,6)".parse::<ColumnType>().is_err());
        assert!(
            "timestampz"
                .parse::<ColumnType>()
                .unwrap_err()
                .contains("unknown type")
        );
    }

    #[test]
    fn timestamps_by_format_zone_and_unit() {
        let p = parser("timestamp", fmt(&["%a %b %d %H:%M:%S %Y"]));
        assert_eq!(
            p.parse("Sun Dec 04 04:47:44 2005"),
            Some(Value::Int(micros(2005, 12, 4, 4, 47, 44)))
        );
        assert_eq!(p.parse("Sun Dex 04 04:47:44 2005"), None);
        assert_eq!(p.label(), "timestamp (format \"%a %b %d %H:%M:%S %Y\")");
        let iso = parser("timestamp", TypeOptions::default());
        assert_eq!(
            iso.parse("2024-05-01T10:00:00+02:00"),
            Some(Value::Int(micros(2024, 5, 1, 8, 0, 0)))
        );
        assert_eq!(
            iso.parse("2024-05-01 10:00:00.5Z"),
            Some(Value::Int(micros(2024, 5, 1, 10, 0, 0) + 500_000))
        );
        let ny = parser(
            "timestamp",
            TypeOptions {
                format: Some(Formats::One("%m/%d/%Y %H:%M".into())),
                timezone: Some("America/New_York".into()),
                ..Default::default()
            },
        );
        assert_eq!(
            ny.parse("01/15/2024 09:30"),
            Some(Value::Int(micros(2024, 1, 15, 14, 30, 0)))
        );
        let ms = parser(
            "timestamp",
            TypeOptions {
                unit: Some(EpochUnit::Millis),
                ..Default::default()
            },
        );
        assert_eq!(
            ms.parse("1700000000123"),
            Some(Value::Int(1_700_000_000_123_000))
        );
        assert_eq!(ms.parse("17e5"), None);
        let syslog = TypeOptions {
            format: Some(Formats::One("%b %d %H:%M:%S".into())),
            ..Default::default()
        };
        let e = CellParser::new(ColumnType::Timestamp, &syslog).unwrap_err();
        assert!(e.contains("has no year"), "{e}");
        let with_year = parser(
            "timestamp",
            TypeOptions {
                year: Some(2023),
                ..syslog
            },
        );
        assert_eq!(
            with_year.parse("Jun  9 06:06:20"),
            Some(Value::Int(micros(2023, 6, 9, 6, 6, 20)))
        );
    }

    #[test]
    fn dates_times_decimals_booleans_binary() {
        let d = parser("date", fmt(&["%d-%m-%Y", "%Y/%m/%d"]));
        let day = |y, m, dd| Some(Value::Int(days(NaiveDate::from_ymd_opt(y, m, dd).unwrap())));
        assert_eq!(d.parse("31-12-2023"), day(2023, 12, 31));
        assert_eq!(d.parse("2023/12/31"), day(2023, 12, 31));
        assert_eq!(d.parse("2023-12-31"), None);
        assert_eq!(d.label(), "date (formats \"%d-%m-%Y\", \"%Y/%m/%d\")");
        let t = parser("time", TypeOptions::default());
        assert_eq!(t.parse("13:05:09.25"), Some(Value::Int(47_109_250_000)));
        let dec = parser("decimal(12,2)", TypeOptions::default());
        assert_eq!(dec.parse("1234.5"), Some(Value::Decimal(123_450)));
        assert_eq!(dec.parse("-0.07"), Some(Value::Decimal(-7)));
        assert_eq!(dec.parse("1.230"), Some(Value::Decimal(123)));
        assert_eq!(dec.parse("1.234"), None, "no silent rounding");
        assert_eq!(dec.parse("12345678901"), None, "past the precision");
        assert_eq!(dec.parse("1e3"), None);
        let b = parser("boolean", TypeOptions::default());
        assert_eq!(b.parse("Yes"), Some(Value::Bool(true)));
        assert_eq!(b.parse("off"), Some(Value::Bool(false)));
        assert_eq!(b.parse("maybe"), None);
        let i8p = parser("int8", TypeOptions::default());
        assert_eq!(i8p.parse("-128"), Some(Value::Int(-128)));
        assert_eq!(i8p.parse("128"), None);
        assert_eq!(i8p.label(), "int8 (-128 to 127)");
        let u = parser("uint64", TypeOptions::default());
        assert_eq!(
            u.parse("18446744073709551615"),
            Some(Value::Decimal(u64::MAX as i128))
        );
        assert_eq!(u.parse("-1"), None);
        let bin = parser("binary", TypeOptions::default());
        assert_eq!(bin.parse("aGk="), Some(Value::Bytes(b"hi".to_vec())));
        assert_eq!(bin.parse("aGk"), Some(Value::Bytes(b"hi".to_vec())));
        let hex = parser(
            "binary",
            TypeOptions {
                encoding: Some(BinaryEncoding::Hex),
                ..Default::default()
            },
        );
        assert_eq!(hex.parse("0x6869"), Some(Value::Bytes(b"hi".to_vec())));
        let j = parser("json", TypeOptions::default());
        assert_eq!(j.parse("{\"a\": [1]}"), Some(Value::Str("{\"a\": [1]}")));
        assert_eq!(j.parse("{a"), None);
        let e = CellParser::new(ColumnType::Int64, &fmt(&["%Y"])).unwrap_err();
        assert!(e.contains("format applies to"), "{e}");
    }
}
