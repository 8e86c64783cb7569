//! `sluice validate`: the config, every schema and every query, planned without reading data.

use std::sync::Arc;

use datafusion::arrow::datatypes::Schema;
use datafusion::datasource::MemTable;

use crate::config::Config;
use crate::error::Result;
use crate::pipeline::prepare;
use crate::transform;
use crate::warehouse;

/// Checks everything; returns a short description of each table's output.
pub async fn validate(config: &Config) -> Result<String> {
    let prepared = prepare(config)?;
    let tables_ctx = transform::session(1, crate::config::DEFAULT_MEMORY_LIMIT);
    let mut out = String::new();
    for p in &prepared {
        let ctx = transform::session(1, crate::config::DEFAULT_MEMORY_LIMIT);
        let schema = p.schema.arrow_schema();
        transform::register_batches(&ctx, &p.source.name, schema, Vec::new(), 1)?;
        let df = ctx
            .sql(&p.query)
            .await
            .map_err(|e| transform::query_error(&p.query_path, &p.query, e))?;
        let output = df.schema().as_arrow().clone();
        transform::check_output(&p.table, &p.query_path, &output)?;
        let data = transform::data_fields(&output);
        out.push_str(&format!(
            "table {} <- source {} ({}): {}\n",
            p.table.name,
            p.source.name,
            p.query_path.display(),
            data.iter()
                .map(|f| format!("{} {}", f.name(), f.data_type()))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let empty = MemTable::try_new(Arc::new(Schema::new(data)), vec![vec![]])?;
        tables_ctx.register_table(p.table.name.as_str(), Arc::new(empty))?;
        if !p.table.check.is_empty() {
            crate::checks::plan(&tables_ctx, config, &p.table).await?;
            out.push_str(&format!(
                "table {}: {} checks: {}\n",
                p.table.name,
                p.table.check.len(),
                p.table
                    .check
                    .iter()
                    .map(|c| c.label())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    let modes = warehouse::plan_all(config, &tables_ctx).await?;
    for (a, mode) in config.aggregates.iter().zip(modes) {
        out.push_str(&format!(
            "aggregate {} ({}): {}\n",
            a.name,
            config.resolve(&a.query).display(),
            mode.describe()
        ));
    }
    if config.warehouse.kind != crate::config::WarehouseKind::Embedded {
        for step in warehouse::remote::steps(config)? {
            out.push_str(&format!(
                "warehouse {}: {}\n",
                config.warehouse.kind.name(),
                step.describe()
            ));
        }
    }
    out.push_str(&format!(
        "config ok: {} sources, {} tables, {} aggregates\n",
        config.sources.len(),
        config.tables.len(),
        config.aggregates.len()
    ));
    Ok(out)
}
