//! Which aggregates can be recomputed partition by partition, decided from the query's logical
//! plan, and the pieces of such a recompute: the partition values new commits touched and the
//! plan restricted to them.
//!
//! Sound means: every output row depends only on the input rows of one value of the input
//! table's partition column, and carries that value in a plain output column. The plan then
//! computes the same rows for a value whether it reads the whole table or only that value's
//! partition. The walk is conservative: anything it does not know is "rebuilt whole".

use std::collections::{BTreeMap, BTreeSet, HashMap};

use datafusion::arrow::datatypes::DataType;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, ScalarValue};
use datafusion::logical_expr::{Distinct, Expr, LogicalPlan, LogicalPlanBuilder, Volatility, lit};

use crate::ledger::TableChange;
use crate::sink;

/// How an aggregate is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Recomputed for the partition values new commits touched; stored partitioned.
    Incremental(Partitioning),
    /// Rebuilt whole, for this reason.
    Whole(String),
}

/// An incremental aggregate's partitioning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partitioning {
    /// The input table.
    pub table: String,
    /// Its partition column the aggregate groups by.
    pub input_column: String,
    /// The output column holding that column's values (the warehouse table's partition column).
    pub column: String,
}

impl Mode {
    /// `incremental by event_date` or `rebuilt whole: joins two tables (a, b)`.
    pub fn describe(&self) -> String {
        match self {
            Mode::Incremental(p) if p.column == p.input_column => {
                format!("incremental by {}", p.input_column)
            }
            Mode::Incremental(p) => {
                format!(
                    "incremental by {} (output column {})",
                    p.input_column, p.column
                )
            }
            Mode::Whole(why) => format!("rebuilt whole: {why}"),
        }
    }
}

fn count_word(n: usize) -> String {
    match n {
        2 => "two".into(),
        3 => "three".into(),
        n => n.to_string(),
    }
}

/// Decides the mode of an aggregate from its (unoptimised) logical plan. `partitions` maps each
/// table to its partition columns.
pub fn analyze(plan: &LogicalPlan, partitions: &HashMap<String, Vec<String>>) -> Mode {
    match partitioning(plan, partitions) {
        Ok(p) => Mode::Incremental(p),
        Err(why) => Mode::Whole(why),
    }
}

fn partitioning(
    plan: &LogicalPlan,
    partitions: &HashMap<String, Vec<String>>,
) -> Result<Partitioning, String> {
    let mut scans = Vec::new();
    let mut scan_schema = None;
    let mut join = false;
    let mut with_subqueries = 0usize;
    let _ = plan.apply_with_subqueries(|n| {
        with_subqueries += 1;
        match n {
            LogicalPlan::TableScan(s) => {
                scans.push(s.table_name.table().to_string());
                scan_schema = Some(s.projected_schema.clone());
            }
            LogicalPlan::Join(_) => join = true,
            _ => {}
        }
        Ok(TreeNodeRecursion::Continue)
    });
    let mut nodes = 0usize;
    let _ = plan.apply(|_| {
        nodes += 1;
        Ok(TreeNodeRecursion::Continue)
    });
    if join {
        let mut distinct = scans.clone();
        distinct.sort();
        distinct.dedup();
        return Err(if distinct.len() == 1 && scans.len() > 1 {
            format!("joins {} with itself", distinct[0])
        } else {
            format!(
                "joins {} tables ({})",
                count_word(scans.len()),
                scans.join(", ")
            )
        });
    }
    if with_subqueries != nodes {
        return Err("has a subquery in an expression".into());
    }
    let table = match scans.as_slice() {
        [] => return Err("reads no table".into()),
        [one] => one.clone(),
        more => {
            return Err(format!(
                "reads {} tables ({})",
                count_word(more.len()),
                more.join(", ")
            ));
        }
    };
    let columns = match partitions.get(&table) {
        None => {
            return Err(format!(
                "its input {table} is not one of the pipeline's partitioned tables"
            ));
        }
        Some(c) if c.is_empty() => {
            return Err(format!("its input table {table} has no partition columns"));
        }
        Some(c) => c.clone(),
    };
    let mut aggregated = false;
    let top = tracked(plan, &columns, &mut aggregated)?;
    if !aggregated {
        return Err("has no GROUP BY".into());
    }
    let Some((&i, input_column)) = top.iter().next() else {
        return Err(format!(
            "its output has no plain column of the partition column it groups by ({})",
            columns.join(", ")
        ));
    };
    // A partition is recomputed by a filter on the value read back from its folder name: only
    // types whose text form gives back exactly the value.
    let ty = scan_schema
        .as_ref()
        .and_then(|s| s.field_with_unqualified_name(input_column).ok())
        .map(|f| f.data_type().clone());
    match ty {
        Some(t) if exact_text(&t) => {}
        Some(t) => {
            return Err(format!(
                "its partition column {input_column} is of type {t} (only dates, integers, text \
                 and booleans are recomputed by partition)"
            ));
        }
        None => return Err(format!("its partition column {input_column} was not found")),
    }
    Ok(Partitioning {
        table,
        input_column: input_column.clone(),
        column: plan.schema().field(i).name().clone(),
    })
}

/// Whether a value of this type is given back exactly by its folder text.
fn exact_text(t: &DataType) -> bool {
    t.is_integer()
        || matches!(
            t,
            DataType::Date32
                | DataType::Utf8
                | DataType::LargeUtf8
                | DataType::Utf8View
                | DataType::Boolean
        )
}

/// The column an expression is, if it is a plain (possibly renamed) column reference.
fn plain_column(e: &Expr) -> Option<&Column> {
    match e {
        Expr::Column(c) => Some(c),
        Expr::Alias(a) => plain_column(&a.expr),
        _ => None,
    }
}

/// Aggregates whose result depends on the order of their input unless they are given one.
const ORDER_DEPENDENT: [&str; 6] = [
    "first_value",
    "last_value",
    "nth_value",
    "array_agg",
    "string_agg",
    "any_value",
];

/// Aggregates whose approximation depends on the order of their input.
const APPROXIMATE: [&str; 3] = [
    "approx_percentile_cont",
    "approx_percentile_cont_with_weight",
    "approx_median",
];

/// Refuses expressions whose result is not a function of the row (or group) alone.
fn check_expressions(plan: &LogicalPlan) -> Result<(), String> {
    let mut why = None;
    let _ = plan.apply_expressions(|e| {
        e.apply(|x| {
            let bad = match x {
                Expr::ScalarFunction(f)
                    if f.func.signature().volatility != Volatility::Immutable =>
                {
                    Some(format!(
                        "calls {}(), whose result depends on when or how often it runs",
                        f.func.name()
                    ))
                }
                Expr::AggregateFunction(f)
                    if f.func.signature().volatility != Volatility::Immutable =>
                {
                    Some(format!(
                        "calls the non-deterministic aggregate {}()",
                        f.func.name()
                    ))
                }
                Expr::AggregateFunction(f)
                    if ORDER_DEPENDENT.contains(&f.func.name()) && f.params.order_by.is_empty() =>
                {
                    Some(format!(
                        "calls {}() without ORDER BY: its result depends on the order rows are \
                         read in",
                        f.func.name()
                    ))
                }
                Expr::AggregateFunction(f) if APPROXIMATE.contains(&f.func.name()) => {
                    Some(format!(
                        "calls {}(), an approximation that depends on the order rows are read in",
                        f.func.name()
                    ))
                }
                Expr::WindowFunction(_) => Some("has a window function (OVER)".to_string()),
                Expr::Exists(_)
                | Expr::InSubquery(_)
                | Expr::ScalarSubquery(_)
                | Expr::SetComparison(_) => Some("has a subquery in an expression".to_string()),
                Expr::ScalarVariable(..)
                | Expr::Placeholder(_)
                | Expr::OuterReferenceColumn(..)
                | Expr::GroupingSet(_) => Some(format!("has an expression it cannot judge ({x})")),
                _ => None,
            };
            match bad {
                Some(b) => {
                    why = Some(b);
                    Ok(TreeNodeRecursion::Stop)
                }
                None => Ok(TreeNodeRecursion::Continue),
            }
        })
    });
    why.map_or(Ok(()), Err)
}

/// The output columns of `plan` (by index) that are plain references to one of the input's
/// partition columns; each value is that partition column. An error says why the plan mixes
/// partitions (or might).
fn tracked(
    plan: &LogicalPlan,
    partitions: &[String],
    aggregated: &mut bool,
) -> Result<BTreeMap<usize, String>, String> {
    if let LogicalPlan::Aggregate(a) = plan
        && a.group_expr
            .iter()
            .any(|e| matches!(e, Expr::GroupingSet(_)))
    {
        return Err("groups by GROUPING SETS, ROLLUP or CUBE".into());
    }
    check_expressions(plan)?;
    let through = |input: &LogicalPlan, exprs: &[Expr], below: &BTreeMap<usize, String>| {
        let schema = input.schema();
        exprs
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                let j = schema.index_of_column(plain_column(e)?).ok()?;
                below.get(&j).map(|c| (i, c.clone()))
            })
            .collect::<BTreeMap<_, _>>()
    };
    match plan {
        LogicalPlan::TableScan(s) => {
            if s.fetch.is_some() {
                return Err("reads its input with a limit".into());
            }
            let fields = s.projected_schema.fields();
            Ok(partitions
                .iter()
                .filter_map(|p| {
                    fields
                        .iter()
                        .position(|f| f.name() == p)
                        .map(|i| (i, p.clone()))
                })
                .collect())
        }
        LogicalPlan::Filter(f) => tracked(&f.input, partitions, aggregated),
        LogicalPlan::SubqueryAlias(a) => tracked(&a.input, partitions, aggregated),
        LogicalPlan::Distinct(Distinct::All(input)) => tracked(input, partitions, aggregated),
        LogicalPlan::Sort(s) => match s.fetch {
            Some(_) => Err("keeps only the first rows of an ORDER BY (LIMIT)".into()),
            None => tracked(&s.input, partitions, aggregated),
        },
        LogicalPlan::Projection(p) => {
            let below = tracked(&p.input, partitions, aggregated)?;
            Ok(through(&p.input, &p.expr, &below))
        }
        LogicalPlan::Aggregate(a) => {
            let below = tracked(&a.input, partitions, aggregated)?;
            let kept = through(&a.input, &a.group_expr, &below);
            if kept.is_empty() {
                return Err(format!(
                    "does not group by its input's partition column ({})",
                    partitions.join(", ")
                ));
            }
            *aggregated = true;
            Ok(kept)
        }
        LogicalPlan::Window(_) => Err("has a window function (OVER)".into()),
        LogicalPlan::Limit(_) => Err("has a LIMIT or OFFSET".into()),
        LogicalPlan::Distinct(Distinct::On(_)) => Err("has DISTINCT ON".into()),
        LogicalPlan::Union(_) => Err("has a UNION".into()),
        other => {
            let text = other.display().to_string();
            let step = text.split(':').next().unwrap_or("").trim().to_string();
            Err(format!("has a {step} step"))
        }
    }
}

/// Adds to `values` the values of `column` in the partition folders a commit's change to the
/// table under `prefix` (`processed/<table>`) touched: the folders it names and those of the
/// files it added and removed. `false` when a folder does not name the column (a file outside
/// partition folders): the caller then rebuilds whole.
pub fn touched(
    change: &TableChange,
    prefix: &str,
    column: &str,
    values: &mut BTreeSet<String>,
) -> bool {
    let under = format!("{prefix}/");
    let mut dirs: Vec<String> = change.partitions.clone();
    let keys = change
        .added
        .iter()
        .map(|m| m.to.as_str())
        .chain(change.removed.iter().map(String::as_str));
    for key in keys {
        if let Some(rel) = key.strip_prefix(&under) {
            if rel.starts_with('_') {
                // `_delta_log/`, `_symlink_format_manifest/`: no data.
                continue;
            }
            dirs.push(
                rel.rsplit_once('/')
                    .map(|(d, _)| d)
                    .unwrap_or("")
                    .to_string(),
            );
        }
    }
    for d in dirs {
        match sink::parse_partition_dir(&d)
            .into_iter()
            .find(|(k, _)| k == column)
        {
            Some((_, v)) => {
                values.insert(v);
            }
            None => return false,
        }
    }
    true
}

/// The plan with its scan of `table` restricted to the rows whose `column` has one of `values`
/// (unescaped folder values; an empty one is a null, or the empty text).
pub fn restrict(
    plan: LogicalPlan,
    table: &str,
    column: &str,
    values: &BTreeSet<String>,
) -> datafusion::common::Result<LogicalPlan> {
    plan.transform_up(|p| {
        let (col, dtype) = match &p {
            LogicalPlan::TableScan(s) if s.table_name.table() == table => {
                let (q, f) = s
                    .projected_schema
                    .qualified_field_with_unqualified_name(column)?;
                (Column::new(q.cloned(), column), f.data_type().clone())
            }
            _ => return Ok(Transformed::no(p)),
        };
        let col = Expr::Column(col);
        let mut list = Vec::new();
        let mut null = false;
        for v in values {
            match ScalarValue::try_from_string(v.clone(), &dtype) {
                Ok(s) => list.push(lit(s)),
                Err(e) if !v.is_empty() => return Err(e),
                Err(_) => {}
            }
            null |= v.is_empty();
        }
        let mut predicate = col.clone().in_list(list, false);
        if null {
            predicate = predicate.or(col.is_null());
        }
        Ok(Transformed::yes(
            LogicalPlanBuilder::from(p).filter(predicate)?.build()?,
        ))
    })
    .map(|t| t.data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::{Field, Schema, TimeUnit};
    use datafusion::datasource::MemTable;
    use datafusion::prelude::SessionContext;
    use std::sync::Arc;

    async fn mode(sql: &str) -> Mode {
        let ctx = SessionContext::new();
        for t in ["logs", "other", "stamps"] {
            let schema = Arc::new(Schema::new(vec![
                Field::new("service", DataType::Utf8, true),
                Field::new("latency", DataType::Float64, true),
                Field::new("event_date", DataType::Date32, true),
                Field::new(
                    "hour",
                    DataType::Timestamp(TimeUnit::Microsecond, None),
                    true,
                ),
            ]));
            ctx.register_table(
                t,
                Arc::new(MemTable::try_new(schema, vec![vec![]]).unwrap()),
            )
            .unwrap();
        }
        let parts = HashMap::from([
            ("logs".to_string(), vec!["event_date".to_string()]),
            ("other".to_string(), vec![]),
            ("stamps".to_string(), vec!["hour".to_string()]),
        ]);
        let df = ctx.sql(sql).await.unwrap();
        analyze(df.logical_plan(), &parts)
    }

    fn whole(m: Mode) -> String {
        match m {
            Mode::Whole(w) => w,
            m => panic!("incremental: {m:?}"),
        }
    }

    #[tokio::test]
    async fn partition_local_aggregates_are_incremental() {
        for sql in [
            "SELECT event_date, service, count(*) AS n FROM logs GROUP BY event_date, service ORDER BY 1, 2",
            "SELECT service, event_date AS day, avg(latency) FROM logs l WHERE latency > 0 GROUP BY 2, 1 HAVING count(*) > 1",
            "SELECT d, count(*) FROM (SELECT event_date AS d, service FROM logs) t GROUP BY d",
            "SELECT DISTINCT event_date, count(DISTINCT service) FROM logs GROUP BY event_date",
            "SELECT event_date, array_agg(service ORDER BY service) FROM logs GROUP BY event_date",
        ] {
            let m = mode(sql).await;
            assert!(matches!(m, Mode::Incremental(_)), "{sql}: {m:?}");
        }
        let Mode::Incremental(p) = mode(
            "SELECT service, event_date AS day, count(*) FROM logs GROUP BY service, event_date",
        )
        .await
        else {
            panic!()
        };
        assert_eq!(
            (p.table.as_str(), p.input_column.as_str(), p.column.as_str()),
            ("logs", "event_date", "day")
        );
        assert_eq!(
            Mode::Incremental(p).describe(),
            "incremental by event_date (output column day)"
        );
    }

    #[tokio::test]
    async fn anything_that_mixes_partitions_is_rebuilt_whole() {
        let cases = [
            (
                "SELECT l.event_date, count(*) FROM logs l JOIN other o ON l.service = o.service GROUP BY l.event_date",
                "joins two tables",
            ),
            (
                "SELECT a.event_date, count(*) FROM logs a JOIN logs b ON a.service = b.service GROUP BY a.event_date",
                "joins logs with itself",
            ),
            (
                "SELECT service, count(*) FROM logs GROUP BY service",
                "does not group by",
            ),
            (
                "SELECT event_date, count(*) FROM logs GROUP BY event_date LIMIT 3",
                "LIMIT",
            ),
            (
                "SELECT event_date, count(*) FROM logs GROUP BY event_date ORDER BY 2 DESC LIMIT 3",
                "LIMIT",
            ),
            (
                "SELECT event_date, count(*) OVER () FROM logs GROUP BY event_date",
                "window",
            ),
            (
                "SELECT event_date, sum(count(*)) OVER (ORDER BY event_date) FROM logs GROUP BY event_date",
                "window",
            ),
            (
                "SELECT event_date, count(*) FROM logs GROUP BY ROLLUP (event_date)",
                "ROLLUP",
            ),
            ("SELECT event_date, service FROM logs", "no GROUP BY"),
            (
                "SELECT count(*) FROM logs GROUP BY event_date",
                "no plain column",
            ),
            (
                "SELECT CAST(event_date AS VARCHAR) AS d, count(*) FROM logs GROUP BY event_date",
                "no plain column",
            ),
            (
                "SELECT date_trunc('month', event_date) AS m, count(*) FROM logs GROUP BY 1",
                "does not group by",
            ),
            (
                "SELECT event_date, count(*) FROM logs WHERE event_date > now() - INTERVAL '7 days' GROUP BY event_date",
                "now()",
            ),
            (
                "SELECT event_date, count(*) FROM logs WHERE service IN (SELECT service FROM other) GROUP BY event_date",
                "subquery",
            ),
            (
                "SELECT event_date, count(*) FROM logs GROUP BY event_date UNION ALL SELECT event_date, count(*) FROM logs GROUP BY event_date",
                "tables",
            ),
            (
                "SELECT event_date, count(*) FROM other GROUP BY event_date",
                "no partition columns",
            ),
            (
                "SELECT event_date, count(*) FROM (SELECT * FROM logs LIMIT 10) t GROUP BY event_date",
                "LIMIT",
            ),
            (
                "SELECT hour, count(*) FROM stamps GROUP BY hour",
                "of type Timestamp",
            ),
            (
                "SELECT event_date, array_agg(service) FROM logs GROUP BY event_date",
                "array_agg() without ORDER BY",
            ),
            (
                "SELECT event_date, approx_median(latency) FROM logs GROUP BY event_date",
                "approximation",
            ),
        ];
        for (sql, why) in cases {
            let w = whole(mode(sql).await);
            assert!(w.contains(why), "{sql}: {w}");
        }
    }

    #[test]
    fn touched_partitions_come_from_folders_and_files() {
        let change = TableChange {
            table: "t".into(),
            added: vec![
                crate::ledger::Move {
                    from: "x".into(),
                    to: "processed/t/d=2024-01-02/part-a.parquet".into(),
                },
                crate::ledger::Move {
                    from: "y".into(),
                    to: "rejected/t/ingest_date=2024-01-09/part-a.parquet".into(),
                },
            ],
            removed: vec!["processed/t/d=2024-01-01/part-0.parquet".into()],
            partitions: vec!["d=a%3Ab".into()],
            delta: None,
            ..Default::default()
        };
        let mut v = BTreeSet::new();
        assert!(touched(&change, "processed/t", "d", &mut v));
        assert_eq!(
            v.into_iter().collect::<Vec<_>>(),
            ["2024-01-01", "2024-01-02", "a:b"]
        );
        let mut v = BTreeSet::new();
        assert!(!touched(&change, "processed/t", "other", &mut v));
    }
}
