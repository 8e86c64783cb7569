//! One column's type, drafted from its sampled values by sluice's own cell parsers: the narrowest
//! candidate that accepts every non-null value wins, so a drafted schema reads the sample the way
//! a run will. Candidates, narrowest first: boolean, int64 (epoch timestamps or `%Y%m%d` dates
//! when the name says time), decimal (only for values written at one fixed scale), float64,
//! date, timestamp, time (ISO 8601 first, then common formats), string.

use std::collections::HashMap;
use std::sync::OnceLock;

use crate::source::{CellParser, ColumnType, EpochUnit, Formats, TypeOptions, Value};

/// Date formats tried after ISO 8601, in order (a day/month pair: the day-first one first).
const DATE_FORMATS: &[&str] = &[
    "%d/%m/%Y",
    "%m/%d/%Y",
    "%Y/%m/%d",
    "%d-%m-%Y",
    "%d.%m.%Y",
    "%d-%b-%Y",
    "%d %b %Y",
    "%b %d, %Y",
    "%B %d, %Y",
    "%d/%m/%y",
    "%m/%d/%y",
];

/// Timestamp formats tried after ISO 8601, in order.
const TIMESTAMP_FORMATS: &[&str] = &[
    "%d/%m/%Y %H:%M:%S",
    "%m/%d/%Y %H:%M:%S",
    "%d/%m/%Y %H:%M",
    "%m/%d/%Y %H:%M",
    "%m/%d/%Y %I:%M:%S %p",
    "%m/%d/%Y %I:%M %p",
    "%Y/%m/%d %H:%M:%S",
    "%Y/%m/%d %H:%M",
    "%d.%m.%Y %H:%M:%S",
    "%d.%m.%Y %H:%M",
    "%d-%m-%Y %H:%M:%S",
    "%d-%b-%Y %H:%M:%S",
    "%Y-%m-%d %H:%M:%S %z",
    "%a %b %d %H:%M:%S %Y",
    "%a %b %e %H:%M:%S %Y",
    "%a, %d %b %Y %H:%M:%S %z",
    "%a, %d %b %Y %H:%M:%S GMT",
    "%d/%b/%Y:%H:%M:%S %z",
    "%d/%m/%y %H:%M",
    "%m/%d/%y %H:%M",
];

/// Days since the epoch of 1800-01-01 and 2200-01-01: a date outside is taken for a misread.
const PLAUSIBLE_DAYS: std::ops::Range<i64> = -62_091..84_006;

/// What the sample says of one column.
#[derive(Debug, Clone)]
pub struct Inferred {
    /// The type.
    pub ty: ColumnType,
    /// The chrono format (date, timestamp), none for ISO 8601.
    pub format: Option<String>,
    /// The epoch unit of integer timestamps.
    pub unit: Option<EpochUnit>,
    /// A null (or missing) value was seen.
    pub nullable: bool,
    /// Non-null values seen.
    pub values: usize,
    /// Distinct non-null values seen.
    pub distinct: usize,
    /// Why the column is text although most of its values fit a type.
    pub fallback: Option<String>,
    /// What the inference was unsure of, one sentence each (column name first).
    pub notes: Vec<String>,
}

impl Inferred {
    fn of(ty: ColumnType, nullable: bool, values: usize, distinct: usize) -> Inferred {
        Inferred {
            ty,
            format: None,
            unit: None,
            nullable,
            values,
            distinct,
            fallback: None,
            notes: Vec::new(),
        }
    }

    /// The parser of the drafted type (what a run will use).
    pub fn parser(&self) -> Option<CellParser> {
        CellParser::new(self.ty, &self.options()).ok()
    }

    /// The drafted type's options.
    pub fn options(&self) -> TypeOptions {
        TypeOptions {
            format: self.format.clone().map(Formats::One),
            unit: self.unit,
            ..Default::default()
        }
    }

    /// Whether the column is a date or a timestamp.
    pub fn temporal(&self) -> bool {
        matches!(self.ty, ColumnType::Date | ColumnType::Timestamp)
    }
}

/// A candidate type: its parser and how a message names its values.
struct Candidate {
    ty: ColumnType,
    format: Option<&'static str>,
    parser: CellParser,
    what: String,
}

impl Candidate {
    fn new(ty: ColumnType, format: Option<&'static str>) -> Option<Candidate> {
        let opts = TypeOptions {
            format: format.map(|f| Formats::One(f.to_string())),
            ..Default::default()
        };
        let parser = CellParser::new(ty, &opts).ok()?;
        let noun = match ty {
            ColumnType::Boolean => "booleans",
            ColumnType::Int64 => "integers",
            ColumnType::Float64 => "numbers",
            ColumnType::Date => "dates",
            ColumnType::Timestamp => "timestamps",
            ColumnType::Time => "times of day",
            _ => "values",
        };
        let what = match (ty, format) {
            (ColumnType::Date | ColumnType::Timestamp, None) => format!("{noun} (ISO 8601)"),
            (_, Some(f)) => format!("{noun} ({f})"),
            _ => noun.to_string(),
        };
        Some(Candidate {
            ty,
            format,
            parser,
            what,
        })
    }

    /// Whether the value parses, and (dates, timestamps) lies between 1800 and 2200.
    fn accepts(&self, v: &str) -> bool {
        accepts(&self.parser, self.ty, v)
    }
}

fn accepts(parser: &CellParser, ty: ColumnType, v: &str) -> bool {
    match parser.parse(v) {
        None => false,
        Some(Value::Int(n)) if ty == ColumnType::Date => PLAUSIBLE_DAYS.contains(&n),
        Some(Value::Int(n)) if ty == ColumnType::Timestamp => {
            PLAUSIBLE_DAYS.contains(&n.div_euclid(86_400_000_000))
        }
        Some(_) => true,
    }
}

struct Candidates {
    boolean: Candidate,
    int: Candidate,
    float: Candidate,
    /// Dates, then timestamps, then times.
    temporal: Vec<Candidate>,
    yyyymmdd: Candidate,
}

fn candidates() -> &'static Candidates {
    static ALL: OnceLock<Candidates> = OnceLock::new();
    ALL.get_or_init(|| {
        let must = |ty, f| Candidate::new(ty, f).expect("a built-in candidate format compiles");
        let mut temporal = vec![must(ColumnType::Date, None)];
        temporal.extend(
            DATE_FORMATS
                .iter()
                .map(|f| must(ColumnType::Date, Some(*f))),
        );
        temporal.push(must(ColumnType::Timestamp, None));
        temporal.extend(
            TIMESTAMP_FORMATS
                .iter()
                .map(|f| must(ColumnType::Timestamp, Some(*f))),
        );
        temporal.push(must(ColumnType::Time, None));
        Candidates {
            boolean: must(ColumnType::Boolean, None),
            int: must(ColumnType::Int64, None),
            float: must(ColumnType::Float64, None),
            temporal,
            yyyymmdd: must(ColumnType::Date, Some("%Y%m%d")),
        }
    })
}

/// The distinct non-null values of a column with their counts, in first-seen order.
struct Distinct<'v> {
    values: Vec<(&'v str, usize)>,
    total: usize,
}

impl<'v> Distinct<'v> {
    fn new(values: &[Option<&'v str>]) -> Distinct<'v> {
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut out: Vec<(&str, usize)> = Vec::new();
        let mut total = 0;
        for v in values.iter().flatten() {
            total += 1;
            match index.get(v) {
                Some(&i) => out[i].1 += 1,
                None => {
                    index.insert(v, out.len());
                    out.push((v, 1));
                }
            }
        }
        Distinct { values: out, total }
    }

    fn all(&self, f: impl Fn(&str) -> bool) -> bool {
        self.values.iter().all(|(v, _)| f(v))
    }

    /// Values (counted with repeats) the predicate rejects, the first few distinct ones and
    /// how many distinct ones; `None` once more than half are rejected.
    fn failures(&self, f: impl Fn(&str) -> bool) -> Option<(usize, Vec<&'v str>, usize)> {
        let (mut n, mut first, mut distinct) = (0, Vec::new(), 0);
        for (v, c) in &self.values {
            if !f(v) {
                n += c;
                distinct += 1;
                if first.len() < 3 {
                    first.push(*v);
                }
                if n * 2 > self.total {
                    return None;
                }
            }
        }
        Some((n, first, distinct))
    }
}

/// Drafts the type of the column `name` (its schema name) from its sampled cells.
pub fn infer(name: &str, cells: &[Option<&str>]) -> Inferred {
    let nullable = cells.iter().any(Option::is_none);
    let d = Distinct::new(cells);
    let c = candidates();
    let mut out = Inferred::of(ColumnType::String, nullable, d.total, d.values.len());
    if d.total == 0 {
        out.notes.push(format!(
            "{name}: no value in the sample (always null or empty): read as text"
        ));
        return out;
    }
    let has_digit = d.all(|v| v.bytes().any(|b| b.is_ascii_digit()));
    // Booleans, unless every value is 0 or 1 (an integer flag).
    if !d.all(|v| matches!(v.trim(), "0" | "1")) && d.all(|v| c.boolean.accepts(v)) {
        out.ty = ColumnType::Boolean;
        return out;
    }
    let int_shaped = d.all(is_integer_text);
    if int_shaped {
        return integers(name, &d, out);
    }
    if let Some((precision, scale)) = fixed_scale(&d) {
        let ty = ColumnType::Decimal { precision, scale };
        if let Ok(p) = CellParser::new(ty, &TypeOptions::default())
            && d.all(|v| p.parse(v).is_some())
        {
            out.ty = ty;
            return out;
        }
    }
    if has_digit && d.all(|v| c.float.accepts(v)) {
        out.ty = ColumnType::Float64;
        return out;
    }
    for cand in &c.temporal {
        if d.all(|v| cand.accepts(v)) {
            out.ty = cand.ty;
            out.format = cand.format.map(str::to_string);
            if let Some(f) = cand.format
                && let Some(twin) = day_month_twin(f)
                && let Ok(p) = CellParser::new(
                    cand.ty,
                    &TypeOptions {
                        format: Some(Formats::One(twin.clone())),
                        ..Default::default()
                    },
                )
                && d.all(|v| accepts(&p, cand.ty, v))
            {
                out.notes.push(format!(
                    "{name}: every value fits both {f} and {twin} (no day above 12 in the \
                     sample): took {f}; check which the file means"
                ));
            }
            return out;
        }
    }
    // Text: say so if most values fit a type.
    let mut best: Option<(usize, Vec<&str>, usize, &str)> = None;
    let numeric = [&c.int, &c.float];
    for cand in [&c.boolean].into_iter().chain(numeric).chain(&c.temporal) {
        if let Some((n, first, distinct)) = d.failures(|v| cand.accepts(v))
            && best.as_ref().is_none_or(|b| n < b.0)
        {
            best = Some((n, first, distinct, cand.what.as_str()));
        }
    }
    if let Some((n, first, distinct, what)) = best {
        let examples: Vec<String> = first.iter().map(|v| format!("{v:?}")).collect();
        let more = if distinct > first.len() { ", ..." } else { "" };
        out.fallback = Some(format!(
            "{} of {} values are not {what}: {}{more}",
            thousands(n),
            thousands(d.total),
            examples.join(", ")
        ));
    }
    out
}

/// A column whose every value is an integer: int64, epoch timestamps or `%Y%m%d` dates when
/// its name says time, text when values have leading zeros (codes) or do not fit 64 bits.
fn integers(name: &str, d: &Distinct<'_>, mut out: Inferred) -> Inferred {
    let c = candidates();
    let digits = |v: &str| v.trim().trim_start_matches(['+', '-']).len();
    if let Some((v, _)) = d.values.iter().find(|(v, _)| {
        let t = v.trim().trim_start_matches(['+', '-']);
        t.len() > 1 && t.starts_with('0')
    }) {
        out.notes.push(format!(
            "{name}: values with leading zeros ({v:?}): read as text, not numbers"
        ));
        return out;
    }
    if let Some((v, _)) = d.values.iter().find(|(v, _)| !c.int.accepts(v)) {
        out.notes.push(format!(
            "{name}: integers beyond 64 bits (e.g. {v:?}): read as text"
        ));
        return out;
    }
    let time_name = names_time(name);
    if d.all(|v| digits(v) == 8) && d.all(|v| c.yyyymmdd.accepts(v)) {
        if time_name {
            out.ty = ColumnType::Date;
            out.format = Some("%Y%m%d".into());
            return out;
        }
        out.notes.push(format!(
            "{name}: every value is a %Y%m%d date, read as int64; set type = \"date\", \
             format = \"%Y%m%d\" if they are dates"
        ));
    }
    let ints: Vec<i64> = d
        .values
        .iter()
        .filter_map(|(v, _)| v.trim().parse().ok())
        .collect();
    let (min, max) = (
        ints.iter().copied().min().unwrap_or(0),
        ints.iter().copied().max().unwrap_or(0),
    );
    let unit = [
        (EpochUnit::Seconds, 100_000_000, 4_200_000_000),
        (EpochUnit::Millis, 100_000_000_000, 4_200_000_000_000),
        (
            EpochUnit::Micros,
            100_000_000_000_000,
            4_200_000_000_000_000,
        ),
    ]
    .into_iter()
    .find(|(_, lo, hi)| min >= *lo && max <= *hi)
    .map(|(u, _, _)| u);
    out.ty = ColumnType::Int64;
    if let Some(unit) = unit {
        let u = match unit {
            EpochUnit::Seconds => "s",
            EpochUnit::Millis => "ms",
            EpochUnit::Micros => "us",
        };
        if time_name {
            out.ty = ColumnType::Timestamp;
            out.unit = Some(unit);
            out.notes.push(format!(
                "{name}: integers read as epoch timestamps (unit = \"{u}\"), as the name says \
                 time; make it int64 if they are not"
            ));
        } else if min > 0 {
            out.notes.push(format!(
                "{name}: every value could be an epoch timestamp (unit = \"{u}\"); read as \
                 int64 as the name does not say time"
            ));
        }
    }
    out
}

/// `[+-]digits`, spaces around allowed (the integer parsers trim).
fn is_integer_text(v: &str) -> bool {
    let t = v.trim();
    let t = t.strip_prefix(['+', '-']).unwrap_or(t);
    !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit())
}

/// Values all written with the same number of decimals (1 to 6), at least one with a trailing
/// zero (so a fixed scale, as money is written, not floats printed short): the precision and
/// scale of an exact decimal (18 digits, or 38 for larger values).
fn fixed_scale(d: &Distinct<'_>) -> Option<(u8, i8)> {
    let mut scale = None;
    let mut int_digits = 0;
    let mut trailing_zero = false;
    for (v, _) in &d.values {
        let t = v.trim();
        let t = t.strip_prefix(['+', '-']).unwrap_or(t);
        let (int, frac) = t.split_once('.')?;
        if frac.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        if *scale.get_or_insert(frac.len()) != frac.len() {
            return None;
        }
        trailing_zero |= frac.ends_with('0');
        int_digits = int_digits.max(int.trim_start_matches('0').len());
    }
    let scale = scale.filter(|s| (1..=6).contains(s) && trailing_zero)?;
    let precision = match int_digits + scale {
        n if n <= 18 => 18,
        n if n <= 38 => 38,
        _ => return None,
    };
    Some((precision, scale as i8))
}

/// The format with `%d` and `%m` swapped, if it has both.
fn day_month_twin(f: &str) -> Option<String> {
    (f.contains("%d") && f.contains("%m")).then(|| {
        f.replace("%d", "\u{0}")
            .replace("%m", "%d")
            .replace('\u{0}', "%m")
    })
}

/// Whether a (snake_case) name says the column holds times or dates.
pub fn names_time(name: &str) -> bool {
    let n = name.to_lowercase();
    n.split(|c: char| !c.is_alphanumeric()).any(|t| {
        matches!(
            t,
            "ts" | "time"
                | "timestamp"
                | "epoch"
                | "date"
                | "datetime"
                | "at"
                | "on"
                | "created"
                | "updated"
                | "modified"
                | "dt"
                | "day"
                | "when"
        )
    }) || ["time", "stamp", "date"].iter().any(|s| n.ends_with(s))
}

/// `12345` as `12,345`.
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str, values: &[&str]) -> Inferred {
        let cells: Vec<Option<&str>> = values
            .iter()
            .map(|v| (!v.is_empty()).then_some(*v))
            .collect();
        infer(name, &cells)
    }

    fn ty(name: &str, values: &[&str]) -> (String, Option<String>) {
        let i = run(name, values);
        (i.ty.to_string(), i.format)
    }

    #[test]
    fn narrowest_type_that_takes_every_value() {
        assert_eq!(ty("a", &["yes", "No", ""]).0, "boolean");
        assert_eq!(ty("a", &["0", "1", "1"]).0, "int64");
        assert_eq!(ty("a", &["-3", "+7", " 12 "]).0, "int64");
        assert_eq!(ty("a", &["1.5", "2", "1e3"]).0, "float64");
        assert_eq!(ty("a", &["12.50", "3.99", "-0.10"]).0, "decimal(18,2)");
        assert_eq!(
            ty("a", &["12.51", "3.99"]).0,
            "float64",
            "no fixed scale shown"
        );
        assert_eq!(
            ty("a", &["2024-03-01", "2024-12-31"]),
            ("date".into(), None)
        );
        assert_eq!(
            ty("a", &["2024-03-01T10:00:00Z", "2024-03-01 10:00:00"]),
            ("timestamp".into(), None)
        );
        assert_eq!(
            ty("a", &["13/01/2024 10:00:00", "01/02/2024 23:59:59"]),
            ("timestamp".into(), Some("%d/%m/%Y %H:%M:%S".into()))
        );
        assert_eq!(
            ty("a", &["01/13/2024 10:00", "2/1/2024 9:05"]),
            ("timestamp".into(), Some("%m/%d/%Y %H:%M".into()))
        );
        assert_eq!(
            ty("a", &["Sun Dec 04 04:47:44 2005"]),
            ("timestamp".into(), Some("%a %b %d %H:%M:%S %Y".into()))
        );
        assert_eq!(
            ty("a", &["10/Oct/2000:13:55:36 -0700"]),
            ("timestamp".into(), Some("%d/%b/%Y:%H:%M:%S %z".into()))
        );
        assert_eq!(
            ty("a", &["Tue, 01 Jul 2003 10:52:37 +0200"]),
            ("timestamp".into(), Some("%a, %d %b %Y %H:%M:%S %z".into()))
        );
        assert_eq!(
            ty("a", &["01-Mar-2024", "31-Dec-1999"]),
            ("date".into(), Some("%d-%b-%Y".into()))
        );
        assert_eq!(
            ty("a", &["31.12.2024"]),
            ("date".into(), Some("%d.%m.%Y".into()))
        );
        assert_eq!(ty("a", &["10:00:00", "23:59"]).0, "time");
        assert_eq!(ty("a", &["hello", "world"]).0, "string");
    }

    #[test]
    fn unsure_and_mixed_columns_say_why() {
        let i = run("d", &["01/02/2024", "03/04/2024"]);
        assert_eq!(i.format.as_deref(), Some("%d/%m/%Y"));
        assert!(i.notes[0].contains("both %d/%m/%Y and %m/%d/%Y"), "{i:?}");
        let mut values = vec!["12"; 97];
        values.extend(["n/a", "NaNms", "n/a"]);
        let i = run("latency_ms", &values);
        assert_eq!(i.ty, ColumnType::String);
        assert_eq!(
            i.fallback.as_deref(),
            Some("3 of 100 values are not integers: \"n/a\", \"NaNms\"")
        );
        let i = run("zip", &["02134", "10001"]);
        assert_eq!(i.ty, ColumnType::String);
        assert!(i.notes[0].contains("leading zeros"));
        let i = run("created", &["1709251200", "1709337600"]);
        assert_eq!(
            (i.ty, i.unit),
            (ColumnType::Timestamp, Some(EpochUnit::Seconds))
        );
        let i = run("count", &["1709251200", "1709337600"]);
        assert_eq!(i.ty, ColumnType::Int64);
        let i = run("day", &["20240301", "20241231"]);
        assert_eq!(
            (i.ty, i.format.as_deref()),
            (ColumnType::Date, Some("%Y%m%d"))
        );
        assert_eq!(run("n", &["20240301"]).ty, ColumnType::Int64);
        let i = run("x", &["", ""]);
        assert!(i.nullable && i.notes[0].contains("no value"));
        assert_eq!((run("k", &["a", "b", "a"]).distinct), 2);
        assert_eq!(thousands(10_000), "10,000");
        assert_eq!(thousands(999), "999");
    }
}
