//! `sluice report --html OUT.html [--runs N]`: one static page over the lake's last run reports
//! (`_sluice/runs/`), readable offline: per table the rows read, written, rejected and duplicate
//! of each run as a stacked bar (the flow), throughput per run, the rejected rows' reasons by
//! count (from `rejected/<table>`), failed files with their errors, and the warehouse statements
//! with their times. Everything is rendered here (no request at view time); a short inline
//! script adds the totals row, so a browser that shows the totals ran the page without errors.

use std::fmt::Write as _;

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::DataType;

use crate::config::Config;
use crate::error::Result;
use crate::lake::{Lake, STATE};
use crate::report::{FileStatus, RunReport};

/// `&`, `<`, `>`, `"` and `'` as entities.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The last `n` run reports, oldest first.
pub async fn last_runs(lake: &Lake, n: usize) -> Result<Vec<RunReport>> {
    let mut keys: Vec<String> = lake
        .list(&format!("{STATE}/runs"))
        .await?
        .into_iter()
        .map(|m| m.location.to_string())
        .filter(|k| k.ends_with(".json"))
        .collect();
    keys.sort();
    let from = keys.len().saturating_sub(n);
    let mut out = Vec::new();
    for k in &keys[from..] {
        match lake.get_json::<RunReport>(k).await {
            Ok(Some(r)) => out.push(r),
            Ok(None) => {}
            Err(e) => tracing::warn!(key = %k, error = %e, "run report unreadable; left out"),
        }
    }
    Ok(out)
}

/// One run's rows for one table.
#[derive(Default, Clone, Copy)]
struct Flow {
    read: u64,
    written: u64,
    rejected: u64,
    duplicate: u64,
    bytes: u64,
}

fn flow(run: &RunReport, source: &str) -> Flow {
    let mut f = Flow::default();
    for file in run.files.iter().filter(|x| x.source == source) {
        f.read += file.rows_read;
        f.written += file.rows_written;
        f.rejected += file.rows_rejected;
        f.duplicate += file.rows_duplicate;
        f.bytes += file.bytes;
    }
    f
}

/// The rejected rows' reasons of a table by count (the reason up to its first `:`, where the
/// value follows), most frequent first; empty when the table has no rejected rows.
async fn reasons(lake: &Lake, table: &str) -> Vec<(String, u64)> {
    let ctx = crate::transform::session(2, crate::config::DEFAULT_MEMORY_LIMIT / 4);
    if crate::warehouse::register_all(&ctx, lake, None)
        .await
        .is_err()
    {
        return Vec::new();
    }
    let sql = format!(
        "SELECT split_part(_reject_reason, ':', 1) AS reason, count(*) AS n \
         FROM \"{table}_rejected\" GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 20"
    );
    let Ok(df) = ctx.sql(&sql).await else {
        return Vec::new();
    };
    let Ok(batches) = df.collect().await else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for b in batches {
        let (Ok(r), Ok(n)) = (
            datafusion::arrow::compute::cast(b.column(0), &DataType::Utf8),
            datafusion::arrow::compute::cast(b.column(1), &DataType::UInt64),
        ) else {
            continue;
        };
        let (r, n) = (
            r.as_string::<i32>().clone(),
            n.as_primitive::<datafusion::arrow::datatypes::UInt64Type>()
                .clone(),
        );
        for i in 0..b.num_rows() {
            out.push((
                if r.is_valid(i) { r.value(i) } else { "(none)" }.to_string(),
                n.value(i),
            ));
        }
    }
    out
}

/// A stacked horizontal bar of written / rejected / duplicate rows, scaled to `max`.
fn bar(f: &Flow, max: u64) -> String {
    let width = 320.0;
    let scale = if max == 0 { 0.0 } else { width / max as f64 };
    let mut x = 0.0;
    let mut svg = format!(
        "<svg class=\"bar\" width=\"{width}\" height=\"14\" role=\"img\" aria-label=\"{} written, {} rejected, {} duplicate\">",
        f.written, f.rejected, f.duplicate
    );
    for (n, class) in [(f.written, "w"), (f.rejected, "r"), (f.duplicate, "d")] {
        let w = n as f64 * scale;
        if w > 0.0 {
            let _ = write!(
                svg,
                "<rect class=\"{class}\" x=\"{x:.1}\" y=\"0\" width=\"{w:.1}\" height=\"14\"><title>{n}</title></rect>"
            );
        }
        x += w;
    }
    svg.push_str("</svg>");
    svg
}

/// The page for the lake's last `n` runs.
pub async fn page(config: &Config, lake: &Lake, n: usize) -> Result<String> {
    let runs = last_runs(lake, n).await?;
    let pipeline = config.pipeline_name();
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>sluice: {p}</title><style>\
         body{{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}}\
         table{{border-collapse:collapse;margin:.5em 0 1.5em}}\
         td,th{{padding:.2em .6em;border-bottom:1px solid #ddd;text-align:right}}\
         td.t,th.t{{text-align:left}} .w{{fill:#2b8a3e}} .r{{fill:#c92a2a}} .d{{fill:#868e96}}\
         .failed{{color:#c92a2a;font-weight:600}} code{{font-size:12px}}\
         </style></head><body>\n<h1>sluice: {p}</h1>\n<p>{k} runs of <code>{lake}</code>, \
         generated {now}. Bars: <span style=\"color:#2b8a3e\">written</span>, \
         <span style=\"color:#c92a2a\">rejected</span>, \
         <span style=\"color:#868e96\">duplicate</span>.</p>\n",
        p = esc(&pipeline),
        k = runs.len(),
        lake = esc(&lake.location()),
        now = chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC"),
    );
    for t in &config.tables {
        let flows: Vec<(&RunReport, Flow)> = runs
            .iter()
            .map(|r| (r, flow(r, &t.source)))
            .filter(|(_, f)| f.read > 0)
            .collect();
        let max = flows.iter().map(|(_, f)| f.read).max().unwrap_or(0);
        let _ = write!(
            h,
            "<section class=\"table\" data-table=\"{name}\"><h2>{name}</h2>\n\
             <table class=\"runs\"><thead><tr><th class=\"t\">run</th><th class=\"t\">status</th>\
             <th>read</th><th>written</th><th>rejected</th><th>duplicate</th><th>rows/s</th>\
             <th>MB/s</th><th class=\"t\">flow</th></tr></thead><tbody>\n",
            name = esc(&t.name)
        );
        for (r, f) in &flows {
            let secs = (r.finished_at - r.started_at)
                .to_std()
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0)
                .max(1e-3);
            let _ = writeln!(
                h,
                "<tr><td class=\"t\"><code>{id}</code></td><td class=\"t {st}\">{st}</td>\
                 <td class=\"read\">{}</td><td class=\"written\">{}</td><td class=\"rejected\">{}</td>\
                 <td class=\"duplicate\">{}</td><td>{:.0}</td><td>{:.1}</td><td class=\"t\">{}</td></tr>",
                f.read,
                f.written,
                f.rejected,
                f.duplicate,
                f.read as f64 / secs,
                f.bytes as f64 / 1e6 / secs,
                bar(f, max),
                id = esc(&r.run_id),
                st = esc(r.status.label()),
            );
        }
        h.push_str("</tbody><tfoot></tfoot></table>\n");
        let rs = reasons(lake, &t.name).await;
        if !rs.is_empty() {
            h.push_str("<h3>rejected rows by reason</h3><table class=\"reasons\"><tbody>\n");
            for (reason, n) in rs {
                let _ = writeln!(
                    h,
                    "<tr><td class=\"t\">{}</td><td>{n}</td></tr>",
                    esc(&reason)
                );
            }
            h.push_str("</tbody></table>\n");
        }
        h.push_str("</section>\n");
    }
    // Failed files, newest run first.
    let failed: Vec<(&RunReport, &crate::report::FileReport)> = runs
        .iter()
        .rev()
        .flat_map(|r| {
            r.files
                .iter()
                .filter(|f| f.status == FileStatus::Failed)
                .map(move |f| (r, f))
        })
        .collect();
    h.push_str("<section><h2>failed files</h2>\n");
    if failed.is_empty() {
        h.push_str("<p>none</p>\n");
    } else {
        h.push_str("<table class=\"failed-files\"><thead><tr><th class=\"t\">run</th><th class=\"t\">file</th><th class=\"t\">error</th></tr></thead><tbody>\n");
        for (r, f) in failed {
            let _ = writeln!(
                h,
                "<tr><td class=\"t\"><code>{}</code></td><td class=\"t\"><code>{}</code></td><td class=\"t\">{}</td></tr>",
                esc(&r.run_id),
                esc(&f.key),
                esc(f.error.as_deref().unwrap_or(""))
            );
        }
        h.push_str("</tbody></table>\n");
    }
    h.push_str("</section>\n");
    // Warehouse statements.
    let statements: Vec<(&RunReport, &crate::report::StatementReport)> = runs
        .iter()
        .rev()
        .flat_map(|r| r.statements.iter().map(move |s| (r, s)))
        .collect();
    if !statements.is_empty() {
        h.push_str("<section><h2>warehouse statements</h2><table class=\"statements\"><thead><tr><th class=\"t\">run</th><th class=\"t\">step</th><th class=\"t\">status</th><th>seconds</th><th>rows</th></tr></thead><tbody>\n");
        for (r, s) in statements {
            let _ = writeln!(
                h,
                "<tr><td class=\"t\"><code>{}</code></td><td class=\"t\">{}</td><td class=\"t\">{}</td><td>{:.2}</td><td>{}</td></tr>",
                esc(&r.run_id),
                esc(&s.step),
                esc(&s.status),
                s.seconds,
                s.rows.map(|n| n.to_string()).unwrap_or_default()
            );
        }
        h.push_str("</tbody></table></section>\n");
    }
    // Totals per table, added by the browser: the page's script ran if they show.
    h.push_str(
        "<script>\n\"use strict\";\n\
         for (const t of document.querySelectorAll(\"table.runs\")) {\n\
         \x20 const cols = [\"read\", \"written\", \"rejected\", \"duplicate\"];\n\
         \x20 const sum = (c) => [...t.querySelectorAll(\"tbody td.\" + c)].reduce((a, td) => a + Number(td.textContent), 0);\n\
         \x20 const row = document.createElement(\"tr\");\n\
         \x20 row.className = \"total\";\n\
         \x20 row.innerHTML = \"<th class=t>total</th><th></th>\" + cols.map((c) => \"<th class=\\\"total-\" + c + \"\\\">\" + sum(c) + \"</th>\").join(\"\") + \"<th></th><th></th><th></th>\";\n\
         \x20 t.querySelector(\"tfoot\").appendChild(row);\n\
         }\n</script>\n</body></html>\n",
    );
    Ok(crate::redact::mask(&h).into_owned())
}
