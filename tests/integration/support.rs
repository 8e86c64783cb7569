//! Test helpers: a temp project with the example pipeline, running the binary, reading tables.

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::Value;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The binary under test: `SLUICE_TEST_BIN` if set (a copy of this worktree's build, when
/// several worktrees share one target folder and overwrite each other's binaries), else the one
/// cargo built.
pub fn binary() -> PathBuf {
    std::env::var_os("SLUICE_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_sluice")))
}

/// A temp folder with the example project: `sluice.toml`, `queries/`, `schemas/`, `lake/`.
pub struct Project {
    pub dir: tempfile::TempDir,
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

impl Project {
    /// The example pipeline with an empty lake.
    pub fn empty() -> Project {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(repo().join("sluice.toml"), dir.path().join("sluice.toml")).unwrap();
        copy_dir(&repo().join("queries"), &dir.path().join("queries"));
        copy_dir(&repo().join("schemas"), &dir.path().join("schemas"));
        std::fs::create_dir_all(dir.path().join("lake/raw")).unwrap();
        Project { dir }
    }

    /// The example pipeline with the shipped fixtures in `raw/`.
    pub fn with_fixtures() -> Project {
        let p = Project::empty();
        copy_dir(&repo().join("fixtures/raw"), &p.lake().join("raw"));
        p
    }

    /// A pipeline of one source and one table `<source>_clean` (no partitions, no dedup):
    /// `columns` is the schema file's `columns = [...]` value, `sql` the table's query.
    pub fn single_table(source: &str, format: &str, columns: &str, sql: &str) -> Project {
        let p = Project::empty();
        std::fs::write(
            p.config(),
            format!(
                "[lake]\nroot = \"lake\"\n\n[[source]]\nname = \"{source}\"\nformat = \"{format}\"\n\
                 schema = \"{source}.toml\"\n\n[[table]]\nname = \"{source}_clean\"\n\
                 source = \"{source}\"\nquery = \"{source}.sql\"\n"
            ),
        )
        .unwrap();
        std::fs::write(
            p.path().join(format!("{source}.toml")),
            format!("columns = {columns}\n"),
        )
        .unwrap();
        std::fs::write(p.path().join(format!("{source}.sql")), sql).unwrap();
        p
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn lake(&self) -> PathBuf {
        self.dir.path().join("lake")
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("sluice.toml")
    }

    /// Replaces text in the config.
    pub fn edit_config(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(self.config()).unwrap();
        assert!(text.contains(from), "config has no {from:?}");
        std::fs::write(self.config(), text.replace(from, to)).unwrap();
    }

    /// Writes a raw file.
    pub fn add_raw(&self, source: &str, name: &str, data: &[u8]) {
        let path = self.lake().join("raw").join(source).join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }

    /// Copies one fixture file into `raw/`.
    pub fn add_fixture(&self, source: &str, name: &str) {
        let data = std::fs::read(repo().join("fixtures/raw").join(source).join(name)).unwrap();
        self.add_raw(source, name, &data);
    }

    /// A command for the binary with this project's config.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(binary());
        c.arg("--config").arg(self.config()).args(args);
        c.env_remove("RUST_LOG");
        c
    }

    /// Runs the binary.
    pub fn sluice(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// `sluice run --json`: exit code and the report.
    pub fn run(&self) -> (i32, Value) {
        self.run_with(&[])
    }

    /// `sluice run --json` with more arguments.
    pub fn run_with(&self, extra: &[&str]) -> (i32, Value) {
        let mut args = vec!["run", "--json"];
        args.extend_from_slice(extra);
        let out = self.sluice(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "no JSON report ({e}); stdout: {stdout}\nstderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        check_accounting(&report);
        (out.status.code().unwrap_or(-1), report)
    }

    /// Every file under a lake prefix, relative to the lake.
    pub fn files(&self, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        walk(&self.lake().join(prefix), &mut out);
        let mut rel: Vec<String> = out
            .iter()
            .map(|p| {
                p.strip_prefix(self.lake())
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        rel.sort();
        rel
    }

    /// All rows of the Parquet files under a lake prefix.
    pub fn read(&self, prefix: &str) -> Vec<RecordBatch> {
        self.files(prefix)
            .iter()
            .filter(|f| f.ends_with(".parquet"))
            .flat_map(|f| {
                let file = std::fs::File::open(self.lake().join(f)).unwrap();
                ParquetRecordBatchReaderBuilder::try_new(file)
                    .unwrap()
                    .build()
                    .unwrap()
                    .map(|b| b.unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Number of rows under a lake prefix.
    pub fn rows(&self, prefix: &str) -> usize {
        self.read(prefix).iter().map(|b| b.num_rows()).sum()
    }

    /// The values of a text column under a prefix.
    pub fn strings(&self, prefix: &str, column: &str) -> Vec<Option<String>> {
        let mut out = Vec::new();
        for b in self.read(prefix) {
            let a = b
                .column_by_name(column)
                .unwrap_or_else(|| panic!("no column {column}"));
            let a =
                datafusion::arrow::compute::cast(a, &datafusion::arrow::datatypes::DataType::Utf8)
                    .unwrap();
            let s = a.as_string::<i32>();
            for i in 0..s.len() {
                out.push(s.is_valid(i).then(|| s.value(i).to_string()));
            }
        }
        out
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            walk(&e.path(), out);
        } else {
            out.push(e.path());
        }
    }
}

/// Every report must balance: read = written + rejected + duplicate, per file.
pub fn check_accounting(report: &Value) {
    for f in report["files"].as_array().unwrap() {
        if f["status"] == "failed" {
            continue;
        }
        let n = |k: &str| f[k].as_u64().unwrap();
        assert_eq!(
            n("rows_read"),
            n("rows_written") + n("rows_rejected") + n("rows_duplicate"),
            "accounting of {f}"
        );
    }
}

/// The report's files by key suffix: (status, read, written, rejected, duplicate).
pub fn file_counts(report: &Value) -> BTreeMap<String, (String, u64, u64, u64, u64)> {
    report["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let key = f["key"].as_str().unwrap();
            let name = key.rsplit('/').next().unwrap();
            let source = f["source"].as_str().unwrap();
            (
                format!("{source}/{name}"),
                (
                    f["status"].as_str().unwrap().to_string(),
                    f["rows_read"].as_u64().unwrap(),
                    f["rows_written"].as_u64().unwrap(),
                    f["rows_rejected"].as_u64().unwrap(),
                    f["rows_duplicate"].as_u64().unwrap(),
                ),
            )
        })
        .collect()
}

/// The Python interpreter of the venv `.ci/run` makes with `deltalake`, `pyarrow` and `duckdb`
/// (readers nobody here wrote); `SLUICE_PYDELTA` names another. Missing, the test fails.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("SLUICE_PYDELTA") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let p = PathBuf::from(home).join(".cache/sluice-pydelta/bin/python");
    assert!(
        p.exists(),
        "{} not found: `bash .ci/run` installs deltalake, pyarrow and duckdb in a venv (or set \
         SLUICE_PYDELTA)",
        p.display()
    );
    p
}

/// Output as text, for messages.
pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The expected tables of the example pipeline over all fixtures.
pub const APP_LOGS_ROWS: usize = 2063;
pub const APP_LOGS_REJECTED: usize = 44;
pub const TICKETS_ROWS: usize = 1033;
pub const TICKETS_REJECTED: usize = 19;

/// Asserts the lake holds exactly the tables of one clean run over all fixtures.
pub fn assert_example_tables(p: &Project) {
    assert_eq!(p.rows("processed/app_logs"), APP_LOGS_ROWS);
    assert_eq!(p.rows("processed/support_tickets"), TICKETS_ROWS);
    assert_eq!(p.rows("rejected/app_logs"), APP_LOGS_REJECTED);
    assert_eq!(p.rows("rejected/support_tickets"), TICKETS_REJECTED);
    let ids = p.strings("processed/app_logs", "request_id");
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "request_id is unique");
    let tickets = p.strings("processed/support_tickets", "ticket_id");
    let distinct: std::collections::HashSet<_> = tickets.iter().collect();
    assert_eq!(distinct.len(), tickets.len(), "ticket_id is unique");
    assert!(
        p.files("raw").is_empty(),
        "raw/ is empty: {:?}",
        p.files("raw")
    );
    assert_eq!(p.files("archive").len(), 6);
    assert!(p.files("_sluice/staging").is_empty());
    assert!(p.files("_sluice/pending").is_empty());
}

/// The example pipeline's aggregates over all fixtures: both incremental, so partitioned by
/// `event_date` like their input tables, one file a partition.
pub fn assert_example_warehouse(p: &Project) {
    let expect: Vec<String> = ["daily_service_health", "daily_ticket_stats"]
        .iter()
        .flat_map(|a| {
            ["2024-03-01", "2024-03-02", "2024-03-03"]
                .map(|d| format!("warehouse/{a}/event_date={d}/data.parquet"))
        })
        .collect();
    assert_eq!(p.files("warehouse"), expect);
}

/// The example tickets source's CSV header.
pub const TICKETS_HEADER: &str =
    "ticket_id,created_at,updated_at,status,priority,customer_email,subject,body,agent\n";

/// A tickets CSV file: the header, then these records.
pub fn tickets(rows: &[&str]) -> Vec<u8> {
    let mut s = TICKETS_HEADER.to_string();
    for r in rows {
        s.push_str(r);
        s.push('\n');
    }
    s.into_bytes()
}

/// A one-shot HTTP server on loopback that answers `status` and hands over each body.
pub fn webhook_server(status: u16, requests: usize) -> (String, std::sync::mpsc::Receiver<String>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(requests) {
            let mut stream = stream.unwrap();
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let mut len = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line == "\r\n" || line.is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            let _ = tx.send(String::from_utf8(body).unwrap());
            let reply =
                format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            stream.write_all(reply.as_bytes()).unwrap();
        }
    });
    (url, rx)
}

/// A tickets CSV of tickets `first..first+n`, created on `days` consecutive days from 2024-03-01, updated at
/// `hour` with `status`.
pub fn batch(first: usize, n: usize, days: usize, hour: u32, status: &str) -> Vec<u8> {
    let rows: Vec<String> = (first..first + n)
        .map(|i| {
            let day = 1 + i % days;
            format!(
                "T{i:05},2024-03-{day:02}T08:00:00,2024-03-{day:02}T{hour:02}:00:00,{status},high,c{i}@example.com,subject {i},body {i},agent{}",
                i % 7
            )
        })
        .collect();
    let refs: Vec<&str> = rows.iter().map(String::as_str).collect();
    tickets(&refs)
}

/// The tickets table as (ticket_id, status, updated_ts), sorted.
pub fn table(p: &Project) -> Vec<(String, String, String)> {
    let ids = p.strings("processed/support_tickets", "ticket_id");
    let status = p.strings("processed/support_tickets", "status");
    let updated = p.strings("processed/support_tickets", "updated_ts");
    let mut rows: Vec<(String, String, String)> = ids
        .into_iter()
        .zip(status)
        .zip(updated)
        .map(|((a, b), c)| (a.unwrap(), b.unwrap(), c.unwrap()))
        .collect();
    rows.sort();
    rows
}

/// `sluice index check support_tickets`: its exit code and output.
pub fn index_check(p: &Project) -> (i32, String) {
    let out = p.sluice(&["index", "check", "support_tickets"]);
    (out.status.code().unwrap_or(-1), text(&out))
}

/// Runs the binary with `args`, held at fault step `step` (`SLUICE_PAUSE_AT`) until the returned
/// pause file is removed; returns once the process is held there.
pub fn held_at(p: &Project, args: &[&str], step: &str) -> (std::process::Child, PathBuf) {
    hold(p, p.cmd(args), step, &format!("{args:?}"))
}

/// Starts `cmd` (a command of project `p`, `what` in a failure) held at `step` until the
/// returned pause file is removed; returns once it is held there.
pub fn hold(
    p: &Project,
    mut cmd: std::process::Command,
    step: &str,
    what: &str,
) -> (std::process::Child, PathBuf) {
    let pause = p.path().join("pause");
    std::fs::write(&pause, "").unwrap();
    let child = cmd
        .env("SLUICE_PAUSE_AT", step)
        .env("SLUICE_PAUSE_FILE", &pause)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_held(p, &format!("{what} at {step}"));
    (child, pause)
}

/// Waits (a minute at most) until a process started with `SLUICE_PAUSE_FILE` = the project's
/// `pause` file is held at its step.
pub fn wait_held(p: &Project, what: &str) {
    let reached = p.path().join("pause.reached");
    let start = std::time::Instant::now();
    while !reached.exists() {
        assert!(start.elapsed().as_secs() < 60, "never held: {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
