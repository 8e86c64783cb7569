//! `sluice init DIR --sample FILE`: a project drafted from one sample file, laid out like the
//! demo's: `sluice.toml` (one source, one table), `schemas/NAME.toml` (the drafted schema),
//! `queries/NAME.sql` (every column, a `_reject_reason` for missing values of the columns the
//! sample always had, the lineage columns) and the sample itself in `lake/raw/NAME/`, so that
//! `sluice validate` and `sluice run` work at once.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::{Draft, DraftColumn, names, sample, toml_str};
use crate::config::Format;
use crate::error::{Error, Result};
use crate::source::{ColumnType, Compression, matches_format};

/// What `init` wrote.
#[derive(Debug)]
pub struct Initialized {
    /// The config file.
    pub config: PathBuf,
    /// The source and table name.
    pub name: String,
    /// Where the sample was copied in the lake.
    pub raw_file: PathBuf,
    /// The draft the project was made from.
    pub draft: Draft,
}

/// Writes a project drafted from `sample_file` into `dir` (empty or absent).
pub fn init(
    dir: &Path,
    sample_file: &Path,
    name: Option<&str>,
    format: Option<Format>,
    rows: usize,
) -> Result<Initialized> {
    if dir.exists()
        && std::fs::read_dir(dir)
            .map_err(|e| Error::io(format!("cannot read {}", dir.display()), e))?
            .next()
            .is_some()
    {
        return Err(Error::config(
            dir,
            "the folder is not empty; name a new one (init never overwrites a project)",
        ));
    }
    let file_name = sample_file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::config(sample_file, "not a file"))?;
    let name = match name {
        Some(n) => {
            let sane = names::project_name(n);
            if sane != n {
                return Err(Error::config(
                    sample_file,
                    format!("--name {n:?} is not a plain SQL name; {sane:?} would do"),
                ));
            }
            sane
        }
        None => names::project_name(stem(&file_name)),
    };
    let draft = super::infer(sample_file, format, rows)?;
    let write = |rel: &str, text: &str| -> Result<PathBuf> {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::io(format!("cannot create {}", parent.display()), e))?;
        }
        std::fs::write(&path, text)
            .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))?;
        Ok(path)
    };
    write(&format!("schemas/{name}.toml"), &draft.schema_toml())?;
    write(&format!("queries/{name}.sql"), &query(&name, &draft))?;
    let config = write("sluice.toml", &config(&name, &draft))?;
    let raw_dir = dir.join("lake/raw").join(&name);
    std::fs::create_dir_all(&raw_dir)
        .map_err(|e| Error::io(format!("cannot create {}", raw_dir.display()), e))?;
    let raw_file = raw_dir.join(raw_name(&file_name, draft.format));
    std::fs::copy(sample_file, &raw_file).map_err(|e| {
        Error::io(
            format!(
                "cannot copy {} to {}",
                sample_file.display(),
                raw_file.display()
            ),
            e,
        )
    })?;
    Ok(Initialized {
        config,
        name,
        raw_file,
        draft,
    })
}

/// A file name without its compression and format extensions.
fn stem(file_name: &str) -> &str {
    let (_, base) = Compression::from_key(file_name);
    base.rsplit_once('.').map_or(base, |(s, _)| s)
}

/// The sample's name in `raw/`: as it is if the source's format takes it, else with the
/// format's extension (before the compression's).
fn raw_name(file_name: &str, format: Format) -> String {
    if matches_format(file_name, format) {
        return file_name.to_string();
    }
    let (_, base) = Compression::from_key(file_name);
    let compression = &file_name[base.len()..];
    let base = base.trim_start_matches(['.', '_']);
    let base = if base.is_empty() { "sample" } else { base };
    format!("{base}.{}{compression}", format.extensions()[0])
}

/// The partition: the first date or timestamp column (one never null first), and the name its
/// date gets in the table (the config partitions by it only if it is never null).
fn partition(draft: &Draft) -> Option<(&DraftColumn, String)> {
    let temporal = || draft.columns.iter().filter(|c| c.inferred.temporal());
    let column = temporal()
        .find(|c| !c.inferred.nullable)
        .or_else(|| temporal().next())?;
    let taken = |n: &str| draft.columns.iter().any(|c| c.name == n);
    let name = if column.name == "event_date" && column.inferred.ty == ColumnType::Date {
        column.name.clone()
    } else if !taken("event_date") {
        "event_date".to_string()
    } else {
        "partition_date".to_string()
    };
    Some((column, name))
}

/// Columns the sample always had a value for (the likely keys).
fn required(draft: &Draft) -> impl Iterator<Item = &DraftColumn> {
    draft
        .columns
        .iter()
        .filter(|c| !c.inferred.nullable && c.inferred.values > 0)
}

/// The table's query: every column, the partition date, a reject reason for missing values of
/// the columns the sample always had, and the lineage columns.
fn query(name: &str, draft: &Draft) -> String {
    let mut sql = String::new();
    let _ = writeln!(
        sql,
        "-- {name}: drafted by `sluice init` from {}.",
        draft.file.display()
    );
    sql.push_str(
        "-- The columns arrive typed by the schema (a value that does not fit its column's type\n\
         -- rejects its row before this query). Rows with a _reject_reason go to the rejected\n\
         -- table; add your own rules to the CASE.\n",
    );
    sql.push_str("SELECT\n");
    for c in &draft.columns {
        let _ = writeln!(sql, "  {},", c.name);
    }
    if let Some((col, part)) = partition(draft)
        && part != col.name
    {
        let _ = writeln!(sql, "  CAST({} AS DATE) AS {part},", col.name);
    }
    let rules: Vec<&DraftColumn> = required(draft).collect();
    if rules.is_empty() {
        sql.push_str(
            "  -- No column had a value in every sampled record: add rules, e.g.\n  \
             -- CASE WHEN id IS NULL THEN 'missing id' END AS _reject_reason,\n  \
             CAST(NULL AS VARCHAR) AS _reject_reason,\n",
        );
    } else {
        sql.push_str("  CASE\n");
        for c in rules {
            let _ = writeln!(sql, "    WHEN {0} IS NULL THEN 'missing {0}'", c.name);
        }
        sql.push_str("  END AS _reject_reason,\n");
    }
    sql.push_str("  _source_file,\n  _source_row\n");
    let _ = writeln!(sql, "FROM {name}");
    sql
}

/// The config: the lake, the source with its dialect, the table partitioned by a date if the
/// sample has one, with a key and order suggested.
fn config(name: &str, draft: &Draft) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# Drafted by `sluice init` from {}: one source and one table.\n# Read the notes at the \
         top of schemas/{name}.toml, then `sluice validate` and `sluice run`.\n",
        draft.file.display()
    );
    t.push_str("[lake]\nroot = \"lake\"\n\n[[source]]\n");
    let _ = writeln!(t, "name = {}", toml_str(name));
    let _ = writeln!(
        t,
        "format = {}",
        toml_str(sample::format_name(draft.format))
    );
    let _ = writeln!(t, "prefix = {}", toml_str(&format!("raw/{name}")));
    let _ = writeln!(t, "schema = {}", toml_str(&format!("schemas/{name}.toml")));
    if let Some(csv) = draft.csv_inline() {
        let _ = writeln!(t, "csv = {csv}");
    }
    t.push_str("\n[[table]]\n");
    let _ = writeln!(t, "name = {}", toml_str(name));
    let _ = writeln!(t, "source = {}", toml_str(name));
    let _ = writeln!(t, "query = {}", toml_str(&format!("queries/{name}.sql")));
    let part = partition(draft);
    match &part {
        Some((c, p)) if !c.inferred.nullable => {
            let _ = writeln!(t, "partition_by = [{}]", toml_str(p));
        }
        Some((c, p)) => {
            let _ = writeln!(
                t,
                "# partition_by = [{}]   # the date of {}, which some sampled records lack (a row \
                 with a null partition is rejected)",
                toml_str(p),
                c.name
            );
        }
        None => {}
    }
    // A key: a column named like an identifier whose sampled values were all distinct.
    let id_like = |n: &str| {
        n.split('_')
            .any(|t| matches!(t, "id" | "key" | "uuid" | "guid" | "code" | "number" | "no"))
            || n.ends_with("id")
    };
    let key = draft.columns.iter().find(|c| {
        id_like(&c.name)
            && c.inferred.values > 1
            && c.inferred.distinct == c.inferred.values
            && !c.inferred.temporal()
            && !matches!(c.inferred.ty, ColumnType::Float64 | ColumnType::Boolean)
    });
    let key = key.map(|c| c.name.as_str()).unwrap_or("id");
    let order = part.map(|(c, _)| c.name.as_str()).unwrap_or("updated_at");
    let _ = writeln!(
        t,
        "# unique_key = [{}]   # with order_by: one row per key across runs (the greatest \
         order_by wins)",
        toml_str(key)
    );
    let _ = writeln!(t, "# order_by = {}", toml_str(order));
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_names_keep_what_the_source_takes() {
        assert_eq!(raw_name("a.csv.gz", Format::Csv), "a.csv.gz");
        assert_eq!(raw_name("export", Format::Csv), "export.csv");
        assert_eq!(raw_name("dump.gz", Format::Jsonl), "dump.jsonl.gz");
        assert_eq!(stem("2024-03-02.jsonl.gz"), "2024-03-02");
        assert_eq!(stem("crm export.csv"), "crm export");
    }
}
