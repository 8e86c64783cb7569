//! Schemas for real JSON: nested fields by `path`, `json` columns that keep JSON text, top-level
//! arrays streamed in chunks of whole elements, and the JSON functions in queries.

use chrono::DateTime;

use crate::support::*;

/// The rows of a table as text, in the order of the first column asked (a row number).
fn rows_by_source_row(p: &Project, prefix: &str, columns: &[&str]) -> Vec<Vec<Option<String>>> {
    let cols: Vec<Vec<Option<String>>> = columns.iter().map(|c| p.strings(prefix, c)).collect();
    let mut rows: Vec<Vec<Option<String>>> = (0..cols[0].len())
        .map(|r| cols.iter().map(|c| c[r].clone()).collect())
        .collect();
    rows.sort_by_key(|r| r[0].as_deref().and_then(|v| v.parse::<i64>().ok()));
    rows
}

fn some(s: impl Into<String>) -> Option<String> {
    Some(s.into())
}

/// What a `timestamp` column holds for an RFC 3339 text, as Arrow writes it as text (UTC).
fn utc(rfc3339: &str) -> String {
    DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .naive_utc()
        .format("%Y-%m-%dT%H:%M:%S")
        .to_string()
}

const ACCESS_COLUMNS: &str = r#"[
  { name = "status", path = "http.status", type = "int64" },
  { name = "method", path = "http.method", type = "string" },
  { name = "uri", path = "http.uri", type = "string" },
  { name = "client_ip", path = "client.ip", type = "string" },
  { name = "started", path = "timing.start", type = "timestamp" },
  { name = "request_time", path = "timing.request_time", type = "float64" },
  { name = "first_tag", path = "tags.0", type = "string" },
  { name = "tags", type = "json" },
  { name = "tls", type = "json" },
  { name = "host", type = "json" },
  { name = "vhost", from = "host_name", type = "string" },
]"#;

/// An nginx access log written as JSON lines (nested `http`, `client`, `timing`, `tls: null` or
/// an object, arrays of tags): typed columns at paths, json columns with their JSON text, and a
/// status that is not a number rejected with its reason and raw line.
#[test]
fn an_nginx_json_access_log_reads_nested_fields_by_path() {
    let p = Project::single_table(
        "access",
        "jsonl",
        ACCESS_COLUMNS,
        "SELECT _source_row AS src_row, _source_row, status, method, uri, client_ip, started, request_time, first_tag, \
         tags, tls, host, vhost, _source_file FROM access",
    );
    let mut log = String::new();
    let mut want = Vec::new();
    for i in 0..40u32 {
        let status = [200, 404, 500, 301][i as usize % 4];
        let method = ["GET", "POST", "PUT"][i as usize % 3];
        let start = format!("2024-03-01T1{}:{:02}:05+02:00", i % 10, i);
        let tls = if i % 2 == 0 {
            r#"null"#.to_string()
        } else {
            format!(r#"{{"protocol":"TLSv1.3","cipher":"AES_{i}"}}"#)
        };
        let tags = match i % 3 {
            0 => r#"[]"#.to_string(),
            1 => format!(r#"["edge-{i}","cache:hit"]"#),
            _ => format!(r#"["a]b,\"c\"-{i}"]"#),
        };
        // Every 5th line has no client; every 7th has a client that is a bare string.
        let client = match i {
            _ if i % 5 == 0 => String::new(),
            _ if i % 7 == 0 => r#""client":"10.9.9.9","#.to_string(),
            _ => format!(r#""client":{{"ip":"10.0.0.{i}","port":{}}},"#, 40000 + i),
        };
        log.push_str(&format!(
            r#"{{"host":"ex\"ample{i}.com","host_name":"v{i}",{client}"http":{{"method":"{method}","status":{status},"uri":"/p/{i}?q=\u00e9"}},"timing":{{"start":"{start}","request_time":0.{:03}}},"tags":{tags},"tls":{tls}}}"#,
            i + 1
        ));
        log.push('\n');
        let first_tag = match i % 3 {
            0 => None,
            1 => some(format!("edge-{i}")),
            _ => some(format!("a]b,\"c\"-{i}")),
        };
        want.push(vec![
            some((i + 1).to_string()),
            some(status.to_string()),
            some(method),
            some(format!("/p/{i}?q=é")),
            (i % 5 != 0 && i % 7 != 0).then(|| format!("10.0.0.{i}")),
            some(utc(&start)),
            some(format!(
                "{}",
                format!("0.{:03}", i + 1).parse::<f64>().unwrap()
            )),
            first_tag,
            some(tags),
            (i % 2 == 1).then_some(tls),
            some(format!(r#""ex\"ample{i}.com""#)),
            some(format!("v{i}")),
        ]);
    }
    let bad = r#"{"host":"x","http":{"method":"GET","status":"abc"}}"#;
    log.push_str(bad);
    log.push('\n');
    p.add_raw("access", "2024-03-01.jsonl", log.as_bytes());
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(
        file_counts(&report)["access/2024-03-01.jsonl"],
        ("processed".into(), 41, 40, 1, 0)
    );
    let got = rows_by_source_row(
        &p,
        "processed/access_clean",
        &[
            "src_row",
            "status",
            "method",
            "uri",
            "client_ip",
            "started",
            "request_time",
            "first_tag",
            "tags",
            "tls",
            "host",
            "vhost",
        ],
    );
    assert_eq!(got, want);
    let rejected = rows_by_source_row(
        &p,
        "rejected/access_clean",
        &["_source_row", "_reject_reason", "_raw_record"],
    );
    assert_eq!(
        rejected,
        vec![vec![
            some("41"),
            some("column status: \"abc\" is not a valid int64"),
            some(bad)
        ]]
    );
}

/// `header_case = "insensitive"` matches the segments of a path too.
#[test]
fn paths_follow_header_case() {
    let p = Project::single_table(
        "access",
        "jsonl",
        r#"[{ name = "status", path = "HTTP.Status", type = "int32" }, { name = "host", from = "Host", type = "string" }]"#,
        "SELECT _source_row AS src_row, status, host, _source_file, _source_row FROM access",
    );
    p.edit_config(
        "format = \"jsonl\"",
        "format = \"jsonl\"\nheader_case = \"insensitive\"",
    );
    p.add_raw(
        "access",
        "a.jsonl",
        b"{\"http\":{\"STATUS\":204},\"HOST\":\"h1\"}\n{\"Http\":{\"status\":404}}\n",
    );
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    let got = rows_by_source_row(&p, "processed/access_clean", &["src_row", "status", "host"]);
    assert_eq!(
        got,
        vec![
            vec![some("1"), some("204"), some("h1")],
            vec![some("2"), some("404"), None],
        ]
    );
}

/// A GitHub-events style export (a JSON document, one array of events) keeps `payload` as JSON
/// text that the query reads with `json_get_str`, `json_get_int`, `json_contains`,
/// `json_length` and `->>`; `actor.login` and `repo.name` are read by path.
#[test]
fn a_github_events_export_keeps_payload_as_json_for_the_json_functions() {
    let p = Project::single_table(
        "events",
        "json",
        r#"[
  { name = "id", type = "int64" },
  { name = "type", type = "string" },
  { name = "actor", path = "actor.login", type = "string" },
  { name = "repo", path = "repo.name", type = "string" },
  { name = "payload", type = "json" },
  { name = "created_at", type = "timestamp" },
]"#,
        "SELECT _source_row AS src_row, _source_row, id, type, actor, repo, created_at, \
           json_get_str(payload, 'action') AS action, \
           json_get_int(payload, 'size') AS size, \
           json_get_str(payload, 'pull_request', 'user', 'login') AS pr_author, \
           json_get_int(payload, 'pull_request', 'number') AS pr_number, \
           payload->>'ref' AS git_ref, \
           json_contains(payload, 'commits') AS has_commits, \
           json_length(payload, 'commits') AS n_commits, \
           json_get_str(payload, 'commits', 0, 'message') AS first_message, \
           _source_file \
         FROM events",
    );
    let mut doc = String::from("[\n");
    let mut want = Vec::new();
    for i in 0..30i64 {
        if i > 0 {
            doc.push_str(",\n");
        }
        let created = format!("2024-05-{:02}T08:{:02}:00Z", 1 + i % 28, i);
        let (kind, payload, expect) = match i % 3 {
            0 => {
                let n = i % 4 + 1;
                let commits: Vec<String> = (0..n)
                    .map(|c| {
                        format!(r#"{{"sha":"{i:04x}{c}","message":"fix ] }} bug, \"quoted\"\nline {c}"}}"#)
                    })
                    .collect();
                (
                    "PushEvent",
                    format!(
                        r#"{{"ref":"refs/heads/main-{i}","size":{n},"commits":[{}]}}"#,
                        commits.join(",")
                    ),
                    [
                        None,
                        some(n.to_string()),
                        None,
                        None,
                        some(format!("refs/heads/main-{i}")),
                        some("true"),
                        some(n.to_string()),
                        some("fix ] } bug, \"quoted\"\nline 0"),
                    ],
                )
            }
            1 => (
                "PullRequestEvent",
                format!(
                    r#"{{"action":"opened","number":{i},"pull_request":{{"number":{i},"user":{{"login":"dev-{i}"}},"labels":[]}}}}"#
                ),
                [
                    some("opened"),
                    None,
                    some(format!("dev-{i}")),
                    some(i.to_string()),
                    None,
                    some("false"),
                    None,
                    None,
                ],
            ),
            _ => (
                "WatchEvent",
                r#"{"action":"started"}"#.to_string(),
                [
                    some("started"),
                    None,
                    None,
                    None,
                    None,
                    some("false"),
                    None,
                    None,
                ],
            ),
        };
        doc.push_str(&format!(
            r#"  {{"id":"{}","type":"{kind}","actor":{{"id":{i},"login":"user-{i}","url":"https://api.github.com/users/user-{i}"}},"repo":{{"id":7,"name":"org/repo-{}"}},"payload":{payload},"public":true,"created_at":"{created}"}}"#,
            1000 + i,
            i % 4
        ));
        let mut row = vec![
            some((i + 1).to_string()),
            some((1000 + i).to_string()),
            some(kind),
            some(format!("user-{i}")),
            some(format!("org/repo-{}", i % 4)),
            some(utc(&created)),
        ];
        row.extend(expect);
        want.push(row);
    }
    doc.push_str("\n]\n");
    p.add_raw("events", "events-2024-05.json", doc.as_bytes());
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(
        file_counts(&report)["events/events-2024-05.json"],
        ("processed".into(), 30, 30, 0, 0)
    );
    let got = rows_by_source_row(
        &p,
        "processed/events_clean",
        &[
            "src_row",
            "id",
            "type",
            "actor",
            "repo",
            "created_at",
            "action",
            "size",
            "pr_author",
            "pr_number",
            "git_ref",
            "has_commits",
            "n_commits",
            "first_message",
        ],
    );
    assert_eq!(got, want);
}

/// A JSON document of one large top-level array (several read chunks) is read in chunks of
/// whole elements: strings holding `]`, `}`, `,`, escaped quotes and newlines, nested objects,
/// elements numbered by their place, a malformed element rejected alone, and a gzip copy read
/// the same way.
#[test]
fn a_large_json_array_streams_with_element_numbers() {
    let p = Project::single_table(
        "items",
        "json",
        r#"[
  { name = "sku", type = "string" },
  { name = "qty", path = "stock.qty", type = "int64" },
  { name = "note", type = "string" },
  { name = "dims", path = "spec.dims", type = "json" },
]"#,
        "SELECT _source_row AS src_row, _source_file AS src_file, sku, qty, note, dims, _source_file, _source_row FROM items",
    );
    const N: usize = 30_000;
    const BAD: usize = 17_777;
    let mut doc = String::from("[");
    let mut want = Vec::new();
    for i in 0..N {
        if i > 0 {
            doc.push(',');
        }
        doc.push_str(if i % 2 == 0 { "\n  " } else { " " });
        if i == BAD {
            doc.push_str(r#"{"sku": "bad", "stock": {"qty": 1,}}"#);
            continue;
        }
        let note = format!("line ]{i}}}, \"q\"\n\\end");
        let dims = format!(r#"[{i},{{"unit":"mm]"}}]"#);
        doc.push_str(&format!(
            r#"{{"sku":"SKU-{i:06}","note":{},"stock":{{"qty":{},"where":{{"bin":"}}]"}}}},"spec":{{"dims":{dims},"x":null}}}}"#,
            serde_json::to_string(&note).unwrap(),
            i % 97
        ));
        want.push(vec![
            some((i + 1).to_string()),
            some(format!("SKU-{i:06}")),
            some((i % 97).to_string()),
            some(note),
            some(dims),
        ]);
    }
    doc.push_str("\n]\n");
    assert!(doc.len() > 4 << 20, "{}", doc.len());
    // The test's own reading of the document agrees on the elements.
    let check: Vec<serde_json::Value> =
        serde_json::from_str(&doc.replace(r#""qty": 1,}"#, r#""qty": 1}"#)).unwrap();
    assert_eq!(check.len(), N);
    p.add_raw("items", "items.json", doc.as_bytes());
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, doc.as_bytes()).unwrap();
    p.add_raw("items", "copy.json.gz", &gz.finish().unwrap());
    let (code, report) = p.run();
    assert_eq!(code, 0, "{report:#}");
    let counts = file_counts(&report);
    for f in ["items/items.json", "items/copy.json.gz"] {
        assert_eq!(
            counts[f],
            ("processed".into(), N as u64, N as u64 - 1, 1, 0),
            "{f}"
        );
    }
    let files = p.strings("processed/items_clean", "src_file");
    let cols = ["src_row", "sku", "qty", "note", "dims"];
    let all: Vec<Vec<Option<String>>> = cols
        .iter()
        .map(|c| p.strings("processed/items_clean", c))
        .collect();
    for name in ["raw/items/items.json", "raw/items/copy.json.gz"] {
        let mut got: Vec<Vec<Option<String>>> = (0..files.len())
            .filter(|&r| files[r].as_deref() == Some(name))
            .map(|r| all.iter().map(|c| c[r].clone()).collect())
            .collect();
        got.sort_by_key(|r| r[0].as_deref().and_then(|v| v.parse::<i64>().ok()));
        assert_eq!(got.len(), want.len(), "{name}");
        assert!(got == want, "{name}: rows differ");
    }
    let rejected = rows_by_source_row(
        &p,
        "rejected/items_clean",
        &["_source_row", "_reject_reason", "_raw_record"],
    );
    assert_eq!(rejected.len(), 2);
    for r in rejected {
        assert_eq!(r[0], some((BAD + 1).to_string()));
        assert!(
            r[1].as_deref().unwrap().starts_with("invalid JSON"),
            "{r:?}"
        );
        assert_eq!(r[2], some(r#"{"sku": "bad", "stock": {"qty": 1,}}"#));
    }
}

/// An array that is never closed fails its own file, naming it and why; the batch's other
/// files are processed.
#[test]
fn a_truncated_json_document_fails_its_file() {
    let p = Project::single_table(
        "items",
        "json",
        r#"[{ name = "sku", type = "string" }]"#,
        "SELECT sku, _source_file, _source_row FROM items",
    );
    p.add_raw("items", "good.json", br#"[{"sku":"a"},{"sku":"b"}]"#);
    p.add_raw("items", "cut.json", br#"[{"sku":"a"},{"sku":"b"#);
    // Cut after several chunks' worth of rows went out: the batch runs again without it.
    let big: String = (0..100_000)
        .map(|i| format!("{{\"sku\":\"s{i}\"}},"))
        .collect();
    p.add_raw(
        "items",
        "big-cut.json",
        format!("[{big}{{\"sku\":").as_bytes(),
    );
    let (code, report) = p.run();
    assert_eq!(code, 1, "{report:#}");
    let counts = file_counts(&report);
    assert_eq!(counts["items/good.json"], ("processed".into(), 2, 2, 0, 0));
    for name in ["cut.json", "big-cut.json"] {
        assert_eq!(counts[&format!("items/{name}")].0, "failed", "{report:#}");
        let err = report["files"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["key"] == format!("raw/items/{name}"))
            .unwrap()["error"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            err.contains(&format!("raw/items/{name}"))
                && err.contains("truncated JSON document: the top-level array is not closed"),
            "{err}"
        );
    }
    assert_eq!(p.strings("processed/items_clean", "sku").len(), 2);
}

/// `path` reads nested JSON: on a CSV source it is a config error naming the column.
#[test]
fn a_path_on_a_csv_source_is_a_config_error() {
    let p = Project::single_table(
        "logs",
        "csv",
        r#"[{ name = "id", type = "string" }, { name = "status", path = "http.status", type = "int64" }]"#,
        "SELECT id, status, _source_file, _source_row FROM logs",
    );
    for cmd in ["validate", "run"] {
        let out = p.sluice(&[cmd]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("logs.toml")
                && err.contains("column \"status\": path = \"http.status\"")
                && err.contains("source is csv"),
            "{err}"
        );
    }
}
