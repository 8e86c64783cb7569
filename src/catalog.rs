//! The lake's own catalog: each table's columns and partition columns in
//! `_sluice/catalog/<table>.json`, schema evolution rules, and registration of the processed,
//! rejected and warehouse tables in a DataFusion session.

use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::{ScanArgs, ScanResult, Session, TableProvider};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::logical_expr::expr::InList;
use datafusion::logical_expr::{
    BinaryExpr, Expr, Operator, TableProviderFilterPushDown, TableType,
};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lake::{self, Lake, STATE};

/// The partition column of rejected tables: the day the rows were rejected.
pub const REJECTED_PARTITION: &str = "ingest_date";

/// A column in the catalog.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Column {
    /// Name.
    pub name: String,
    /// Arrow type, as Arrow prints it (e.g. `Timestamp(µs)`).
    #[serde(rename = "type")]
    pub ty: String,
}

impl Column {
    fn from_field(f: &Field) -> Column {
        Column {
            name: f.name().clone(),
            ty: f.data_type().to_string(),
        }
    }

    /// The column's Arrow type.
    pub fn data_type(&self) -> Result<DataType> {
        DataType::from_str(&self.ty).map_err(|e| Error::State {
            path: format!("catalog column {}", self.name),
            message: e.to_string(),
        })
    }
}

/// A table as the catalog knows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TableMeta {
    /// Table name.
    pub name: String,
    /// Columns stored in the files.
    pub columns: Vec<Column>,
    /// Hive partition columns, in folder order.
    pub partition_columns: Vec<Column>,
    /// Columns of the rejected table's files.
    pub rejected_columns: Vec<Column>,
    /// Whether the processed and rejected tables are Delta tables (`format = "delta"`).
    #[serde(default)]
    pub delta: bool,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

fn catalog_key(table: &str) -> String {
    format!("{STATE}/catalog/{table}.json")
}

fn to_schema(cols: &[Column]) -> Result<SchemaRef> {
    let fields = cols
        .iter()
        .map(|c| Ok(Field::new(&c.name, c.data_type()?, true)))
        .collect::<Result<Vec<_>>>()?;
    Ok(Arc::new(Schema::new(fields)))
}

impl TableMeta {
    /// The catalog entry for a table's output: `data` holds every data column, partition
    /// columns included; `rejected` is the rejected table's file schema.
    pub fn new(name: &str, data: &Schema, partition_by: &[String], rejected: &Schema) -> TableMeta {
        TableMeta {
            name: name.to_string(),
            columns: data
                .fields()
                .iter()
                .filter(|f| !partition_by.contains(f.name()))
                .map(|f| Column::from_field(f))
                .collect(),
            partition_columns: partition_by
                .iter()
                .filter_map(|p| data.field_with_name(p).ok())
                .map(Column::from_field)
                .collect(),
            rejected_columns: rejected
                .fields()
                .iter()
                .map(|f| Column::from_field(f))
                .collect(),
            delta: false,
            updated_at: Utc::now(),
        }
    }

    /// Loads a table's entry, if the table exists.
    pub async fn load(lake: &Lake, table: &str) -> Result<Option<TableMeta>> {
        lake.get_json(&catalog_key(table)).await
    }

    /// Saves the entry.
    pub async fn save(&self, lake: &Lake) -> Result<()> {
        lake.put_json(&catalog_key(&self.name), self).await
    }

    /// Schema of the processed files (no partition columns).
    pub fn rejected_schema(&self) -> Result<SchemaRef> {
        to_schema(&self.rejected_columns)
    }

    /// The rejected table's columns with its partition column (`ingest_date`) last.
    pub fn rejected_table_schema(&self) -> Result<SchemaRef> {
        let mut fields: Vec<Field> = self
            .rejected_schema()?
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(Field::new(REJECTED_PARTITION, DataType::Date32, true));
        Ok(Arc::new(Schema::new(fields)))
    }

    /// The Arrow schema of the processed table's files (without partition columns).
    pub fn file_schema(&self) -> Result<SchemaRef> {
        to_schema(&self.columns)
    }

    /// Schema of whole rows: file columns then partition columns.
    pub fn full_schema(&self) -> Result<SchemaRef> {
        let mut cols = self.columns.clone();
        cols.extend(self.partition_columns.iter().cloned());
        to_schema(&cols)
    }

    /// Partition columns with their types.
    pub fn partition_types(&self) -> Result<Vec<(String, DataType)>> {
        self.partition_columns
            .iter()
            .map(|c| Ok((c.name.clone(), c.data_type()?)))
            .collect()
    }

    /// Merges a new output shape into this entry: new columns are added; a changed type, a
    /// dropped column or other partitioning is an error that names the difference.
    pub fn evolve(&self, new: &TableMeta) -> Result<TableMeta> {
        let fail = |message: String| Error::Schema {
            table: self.name.clone(),
            message,
        };
        if self.delta != new.delta {
            return Err(fail(format!(
                "the table is {}; its format cannot change to {} in place",
                if self.delta {
                    "a Delta table"
                } else {
                    "plain Parquet"
                },
                if new.delta { "delta" } else { "parquet" }
            )));
        }
        if self.partition_columns != new.partition_columns {
            return Err(fail(format!(
                "partition columns were [{}], the query now gives [{}]",
                describe(&self.partition_columns),
                describe(&new.partition_columns)
            )));
        }
        let mut columns = self.columns.clone();
        for old in &self.columns {
            match new.columns.iter().find(|c| c.name == old.name) {
                None => {
                    return Err(fail(format!(
                        "column {} ({}) was dropped; only new nullable columns can be added",
                        old.name, old.ty
                    )));
                }
                Some(c) if c.ty != old.ty => {
                    return Err(fail(format!(
                        "column {} changed type from {} to {}",
                        old.name, old.ty, c.ty
                    )));
                }
                Some(_) => {}
            }
        }
        let mut added = Vec::new();
        for c in &new.columns {
            if !columns.iter().any(|o| o.name == c.name) {
                columns.push(c.clone());
                added.push(c.name.clone());
            }
        }
        let mut rejected_columns = self.rejected_columns.clone();
        for c in &new.rejected_columns {
            match rejected_columns.iter().find(|o| o.name == c.name) {
                None => rejected_columns.push(c.clone()),
                Some(o) if o.ty != c.ty => {
                    return Err(fail(format!(
                        "rejected column {} changed type from {} to {}",
                        c.name, o.ty, c.ty
                    )));
                }
                Some(_) => {}
            }
        }
        if !added.is_empty() {
            tracing::info!(table = %self.name, columns = ?added, "table gains new nullable columns");
        }
        Ok(TableMeta {
            name: self.name.clone(),
            columns,
            partition_columns: self.partition_columns.clone(),
            rejected_columns,
            delta: self.delta,
            updated_at: Utc::now(),
        })
    }
}

fn describe(cols: &[Column]) -> String {
    cols.iter()
        .map(|c| format!("{} {}", c.name, c.ty))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every table in the catalog: the `<table>.json` files directly under `_sluice/catalog/` (not
/// the catalog step's markers in `unregistered/`).
pub async fn all_tables(lake: &Lake) -> Result<Vec<TableMeta>> {
    let prefix = format!("{STATE}/catalog");
    let mut out = Vec::new();
    for m in lake.list(&prefix).await? {
        let key = m.location.as_ref();
        let name = lake::relative(key, &prefix);
        if name.contains('/') || !name.ends_with(".json") {
            continue;
        }
        if let Some(t) = lake.get_json::<TableMeta>(key).await? {
            out.push(t);
        }
    }
    Ok(out)
}

/// Registers a plain Parquet table (`name`) and its rejected table (`name_rejected`) as
/// listing tables over their folders (`format::Format::register` picks this for plain tables).
pub async fn register_parquet(ctx: &SessionContext, lake: &Lake, meta: &TableMeta) -> Result<()> {
    let processed = lake::processed_prefix(&meta.name);
    lake.ensure_prefix(&processed)?;
    let schema = meta.file_schema()?;
    let opts = ParquetReadOptions {
        schema: Some(&schema),
        table_partition_cols: meta.partition_types()?,
        ..Default::default()
    };
    ctx.register_parquet(meta.name.as_str(), lake.url(&processed), opts)
        .await?;
    hive_listing(ctx, &meta.name, &meta.partition_types()?)?;
    let rejected = lake::rejected_prefix(&meta.name);
    lake.ensure_prefix(&rejected)?;
    let rschema = to_schema(&meta.rejected_columns)?;
    let opts = ParquetReadOptions {
        schema: Some(&rschema),
        table_partition_cols: vec![(REJECTED_PARTITION.to_string(), DataType::Date32)],
        ..Default::default()
    };
    ctx.register_parquet(
        format!("{}_rejected", meta.name).as_str(),
        lake.url(&rejected),
        opts,
    )
    .await?;
    Ok(())
}

/// Puts a registered listing table behind [`HiveListing`].
pub(crate) fn hive_listing(
    ctx: &SessionContext,
    name: &str,
    partitions: &[(String, DataType)],
) -> Result<()> {
    if partitions.is_empty() {
        return Ok(());
    }
    if let Some(inner) = ctx.deregister_table(name)? {
        let columns = partitions.iter().map(|(c, _)| c.clone()).collect();
        ctx.register_table(name, Arc::new(HiveListing { inner, columns }))?;
    }
    Ok(())
}

/// A partitioned listing table whose folders are Hive-escaped (`tag=c%3Ad`).
///
/// DataFusion reads the values back unescaped (it percent-decodes partition folders), but for
/// a filter `col = 'value'` it lists only the folder it spells itself (object_store's path
/// encoding, which differs from Hive's for `:`, `=`, `'`, `<`, `>`, `|`, `~`, `}`, `` ` ``) and
/// would miss the rows. Such a filter reaches it as `col IN ('value')`: the same rows, files
/// still pruned by partition value, only the prefix listing skipped.
#[derive(Debug)]
struct HiveListing {
    inner: Arc<dyn TableProvider>,
    /// The partition columns.
    columns: Vec<String>,
}

impl HiveListing {
    /// The filter with each `col = literal` whose folder DataFusion would misspell as
    /// `col IN (literal)`.
    fn unprefixed(&self, filter: &Expr) -> datafusion::common::Result<Expr> {
        filter
            .clone()
            .transform_up(|e| {
                let Expr::BinaryExpr(BinaryExpr {
                    left,
                    op: Operator::Eq,
                    right,
                }) = &e
                else {
                    return Ok(Transformed::no(e));
                };
                let (column, value, col, lit) = match (left.as_ref(), right.as_ref()) {
                    (c @ Expr::Column(column), l @ Expr::Literal(value, _))
                    | (l @ Expr::Literal(value, _), c @ Expr::Column(column)) => {
                        (column, value, c, l)
                    }
                    _ => return Ok(Transformed::no(e)),
                };
                if !self.columns.contains(&column.name) {
                    return Ok(Transformed::no(e));
                }
                let value = value.to_string();
                let theirs =
                    object_store::path::Path::from_iter([format!("{}={value}", column.name)]);
                if theirs.as_ref() == lake::partition_segment(&column.name, &value) {
                    return Ok(Transformed::no(e));
                }
                let (col, lit) = (col.clone(), lit.clone());
                Ok(Transformed::yes(Expr::InList(InList::new(
                    Box::new(col),
                    vec![lit],
                    false,
                ))))
            })
            .map(|t| t.data)
    }
}

#[async_trait::async_trait]
impl TableProvider for HiveListing {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }

    fn table_type(&self) -> TableType {
        self.inner.table_type()
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::common::Result<Vec<TableProviderFilterPushDown>> {
        self.inner.supports_filters_pushdown(filters)
    }

    fn statistics(&self) -> Option<datafusion::common::Statistics> {
        self.inner.statistics()
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        let args = ScanArgs::default()
            .with_projection(projection.map(|p| p.as_slice()))
            .with_filters(Some(filters))
            .with_limit(limit);
        Ok(self.scan_with_args(state, args).await?.into_inner())
    }

    async fn scan_with_args<'a>(
        &self,
        state: &dyn Session,
        args: ScanArgs<'a>,
    ) -> datafusion::common::Result<ScanResult> {
        let filters = args
            .filters()
            .unwrap_or_default()
            .iter()
            .map(|f| self.unprefixed(f))
            .collect::<datafusion::common::Result<Vec<_>>>()?;
        let args = args.with_filters(Some(&filters));
        self.inner.scan_with_args(state, args).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::TimeUnit;

    fn meta(fields: Vec<Field>) -> TableMeta {
        let s = Schema::new(fields);
        TableMeta::new("t", &s, &["d".to_string()], &Schema::empty())
    }

    #[test]
    fn evolution_adds_columns_and_refuses_type_changes() {
        let ts = DataType::Timestamp(TimeUnit::Microsecond, None);
        let old = meta(vec![
            Field::new("a", DataType::Utf8, true),
            Field::new("d", DataType::Date32, true),
        ]);
        let wider = meta(vec![
            Field::new("a", DataType::Utf8, true),
            Field::new("b", ts.clone(), true),
            Field::new("d", DataType::Date32, true),
        ]);
        let evolved = old.evolve(&wider).unwrap();
        assert_eq!(evolved.columns.len(), 2);
        assert_eq!(evolved.columns[1].data_type().unwrap(), ts);
        let changed = meta(vec![
            Field::new("a", DataType::Int64, true),
            Field::new("d", DataType::Date32, true),
        ]);
        let e = old.evolve(&changed).unwrap_err().to_string();
        assert!(
            e.contains("column a changed type from Utf8 to Int64"),
            "{e}"
        );
        let dropped = meta(vec![Field::new("d", DataType::Date32, true)]);
        assert!(
            old.evolve(&dropped)
                .unwrap_err()
                .to_string()
                .contains("dropped")
        );
    }
}
