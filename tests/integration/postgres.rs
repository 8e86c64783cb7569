//! The warehouse step on a real PostgreSQL server of each test's own (`initdb` into a temp
//! folder, listening on a loopback port): DDL deployed by `sluice warehouse deploy`, committed
//! files loaded by binary COPY exactly once, the shipped PL/pgSQL procedures building the
//! aggregates, compared with the embedded warehouse's.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Project, text, tickets};

pub(crate) const PASSWORD: &str = "s3cret-pw";

/// A PostgreSQL server of this test's own.
pub struct Pg {
    child: Child,
    dir: tempfile::TempDir,
    pub port: u16,
    rt: tokio::runtime::Runtime,
}

/// The folder with `initdb` and `postgres`: `SLUICE_PG_BIN`, or Debian's
/// `/usr/lib/postgresql/<version>/bin` (newest).
fn pg_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SLUICE_PG_BIN") {
        return PathBuf::from(p);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .collect()
        })
        .unwrap_or_default();
    found.retain(|p| p.join("initdb").exists());
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop().unwrap_or_else(|| {
        panic!("PostgreSQL not found in /usr/lib/postgresql: `bash .ci/run` installs it (or set SLUICE_PG_BIN)")
    })
}

/// PostgreSQL refuses to run as root: as root, its programs run as the `postgres` user.
fn as_server_user(program: PathBuf) -> Command {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if root {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Pg {
    /// A server accepting password logins on TCP, TLS optional.
    pub fn start() -> Pg {
        Pg::launch(false)
    }

    /// A server accepting TCP logins over TLS only, with a certificate signed by a CA of the
    /// test's own (`ca()`).
    pub fn start_tls() -> Pg {
        Pg::launch(true)
    }

    fn launch(tls: bool) -> Pg {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, PASSWORD).unwrap();
        if tls {
            make_certificates(dir.path());
        }
        // Readable by the server user when the tests run as root.
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status();
        let bin = pg_bin();
        let out = as_server_user(bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "sluice",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .args(["-E", "UTF8", "--locale=C", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb failed: {}", text(&out));
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = as_server_user(bin.join("postgres"));
        server
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.path().display()))
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"]);
        if tls {
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n",
            )
            .unwrap();
            server.args(["-c", "ssl=on"]).arg("-c").arg(format!(
                "ssl_cert_file={}",
                dir.path().join("server.crt").display()
            ));
            server.arg("-c").arg(format!(
                "ssl_key_file={}",
                dir.path().join("server.key").display()
            ));
        }
        let child = server
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let pg = Pg {
            child,
            dir,
            port,
            rt,
        };
        let start = Instant::now();
        while pg.try_connect().is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "PostgreSQL did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        pg
    }

    /// The certificate authority that signed a TLS server's certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    pub fn url(&self) -> String {
        format!("postgres://sluice@127.0.0.1:{}/postgres", self.port)
    }

    /// The test's own connection: over the server's Unix socket (trusted).
    fn try_connect(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        self.rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(
                &format!(
                    "host={} port={} user=sluice dbname=postgres",
                    self.dir.path().display(),
                    self.port
                ),
                tokio_postgres::NoTls,
            )
            .await?;
            tokio::spawn(conn);
            Ok(client)
        })
    }

    /// Runs a query; every value as text.
    pub fn query(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        let client = self.try_connect().unwrap();
        self.rt.block_on(async {
            let mut out = Vec::new();
            for msg in client.simple_query(sql).await.unwrap() {
                if let tokio_postgres::SimpleQueryMessage::Row(r) = msg {
                    out.push((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect());
                }
            }
            out
        })
    }

    pub fn count(&self, table: &str) -> u64 {
        self.query(&format!("SELECT count(*) FROM {table}"))[0][0]
            .as_deref()
            .unwrap()
            .parse()
            .unwrap()
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        // Fast shutdown; the server's children follow the postmaster.
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA and a server certificate for 127.0.0.1 signed by it, made with openssl.
fn make_certificates(dir: &std::path::Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", text(&out));
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=sluice test CA",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    let _ = Command::new("chmod")
        .args(["600", "server.key"])
        .current_dir(dir)
        .status();
}

/// The example pipeline over the fixtures, loading into `pg` with the shipped DDL.
fn pg_project(pg: &Pg, call: &str) -> Project {
    let p = Project::with_fixtures();
    let text = std::fs::read_to_string(p.config()).unwrap();
    std::fs::write(
        p.config(),
        format!(
            "{text}\n[warehouse]\nkind = \"postgres\"\nurl = \"{}\"\npassword = \"env:SLUICE_TEST_PG_PASSWORD\"\n\
             load = \"copy\"\nload_into = \"analytics.{{table}}_staging\"\ncall = {call}\n",
            pg.url()
        ),
    )
    .unwrap();
    p.edit_config("max_attempts = 3", "max_attempts = 2");
    p
}

const CALLS: &str = r#"["CALL analytics.sp_build_daily_ticket_stats(:run_date)", "CALL analytics.sp_build_daily_service_health(:run_date)"]"#;

/// The binary with the warehouse password in its environment.
fn sluice(p: &Project, args: &[&str]) -> std::process::Output {
    p.cmd(args)
        .env("SLUICE_TEST_PG_PASSWORD", PASSWORD)
        .output()
        .unwrap()
}

fn run(p: &Project, extra: &[&str]) -> (i32, Value, String) {
    let mut args = vec!["run", "--json"];
    args.extend_from_slice(extra);
    let out = sluice(p, &args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let report = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), report, text(&out))
}

fn try_deploy(p: &Project) -> std::process::Output {
    sluice(p, &["warehouse", "deploy"])
}

fn deploy(p: &Project) -> String {
    let out = try_deploy(p);
    assert!(out.status.success(), "deploy failed: {}", text(&out));
    text(&out)
}

fn statements(report: &Value) -> Vec<(String, String)> {
    report["statements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["step"].as_str().unwrap().to_string(),
                s["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// `sluice query` output as JSON rows.
fn lake_rows(p: &Project, sql: &str) -> Vec<Value> {
    let out = sluice(p, &["query", sql, "--format", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The warehouse's aggregates equal the embedded warehouse's, row for row.
fn assert_aggregates_match(p: &Project, pg: &Pg) {
    let lake = lake_rows(
        p,
        "SELECT CAST(event_date AS VARCHAR) AS d, status, tickets, avg_hours_open, customers \
         FROM daily_ticket_stats ORDER BY 1, 2",
    );
    let wh = pg.query(
        "SELECT event_date, status, tickets, avg_hours_open, customers \
         FROM analytics.daily_ticket_stats ORDER BY 1, 2",
    );
    assert!(!lake.is_empty());
    assert_eq!(lake.len(), wh.len(), "lake {lake:?}\nwarehouse {wh:?}");
    for (l, w) in lake.iter().zip(&wh) {
        let cell = |i: usize| w[i].clone().unwrap_or_default();
        assert_eq!(l["d"].as_str().unwrap(), cell(0));
        assert_eq!(l["status"].as_str().unwrap(), cell(1));
        assert_eq!(l["tickets"].as_u64().unwrap().to_string(), cell(2));
        let (a, b) = (
            l["avg_hours_open"].as_f64().unwrap(),
            cell(3).parse::<f64>().unwrap(),
        );
        assert!((a - b).abs() < 1e-6, "avg_hours_open {a} != {b}");
        assert_eq!(l["customers"].as_u64().unwrap().to_string(), cell(4));
    }
    let lake = lake_rows(
        p,
        "SELECT CAST(event_date AS VARCHAR) AS d, service_name, requests, errors, avg_latency_ms, users \
         FROM daily_service_health ORDER BY 1, 2",
    );
    let wh = pg.query(
        "SELECT event_date, service_name, requests, errors, avg_latency_ms, users \
         FROM analytics.daily_service_health ORDER BY 1, 2",
    );
    assert!(!lake.is_empty());
    assert_eq!(lake.len(), wh.len(), "lake {lake:?}\nwarehouse {wh:?}");
    for (l, w) in lake.iter().zip(&wh) {
        let cell = |i: usize| w[i].clone().unwrap_or_default();
        assert_eq!(l["d"].as_str().unwrap(), cell(0));
        assert_eq!(l["service_name"].as_str().unwrap(), cell(1));
        assert_eq!(l["requests"].as_u64().unwrap().to_string(), cell(2));
        assert_eq!(l["errors"].as_u64().unwrap().to_string(), cell(3));
        let (a, b) = (
            l["avg_latency_ms"].as_f64().unwrap(),
            cell(4).parse::<f64>().unwrap(),
        );
        assert!((a - b).abs() < 1e-6, "avg_latency_ms {a} != {b}");
        assert_eq!(l["users"].as_u64().unwrap().to_string(), cell(5));
    }
}

fn lake_count(p: &Project, table: &str) -> u64 {
    lake_rows(p, &format!("SELECT count(*) AS n FROM {table}"))[0]["n"]
        .as_u64()
        .unwrap()
}

#[test]
fn postgres_warehouse_loads_each_file_once_and_matches_the_embedded_aggregates() {
    let pg = Pg::start();
    let p = pg_project(&pg, CALLS);
    let out = deploy(&p);
    assert!(out.contains("01_tables.sql: 7 statements"), "{out}");
    assert!(out.contains("02_procedures.sql: 2 statements"), "{out}");
    let v = sluice(&p, &["validate"]);
    assert!(
        text(&v).contains(
            "warehouse postgres: call 1: CALL analytics.sp_build_daily_ticket_stats(:run_date)"
        ),
        "{}",
        text(&v)
    );

    let (code, report, out) = run(&p, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        statements(&report),
        [
            ("load app_logs".to_string(), "finished".to_string()),
            ("load support_tickets".into(), "finished".into()),
            ("call 1".into(), "finished".into()),
            ("call 2".into(), "finished".into()),
        ]
    );
    // Every committed row arrived once; the staging tables were merged and emptied.
    for table in ["app_logs", "support_tickets"] {
        assert_eq!(
            pg.count(&format!("analytics.{table}")),
            lake_count(&p, table),
            "{table}"
        );
        assert_eq!(pg.count(&format!("analytics.{table}_staging")), 0);
    }
    let loaded: i64 = report["statements"][1]["rows"].as_i64().unwrap();
    assert_eq!(loaded as u64, lake_count(&p, "support_tickets"));
    let files = p.files("processed").len() as u64;
    assert_eq!(
        pg.count("sluice_loads"),
        files + 2,
        "one marker per file and per call"
    );
    assert_aggregates_match(&p, &pg);

    // Nothing new: nothing sent.
    let (code, report, out) = run(&p, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(statements(&report).is_empty(), "{report}");
    assert_eq!(pg.count("sluice_loads"), files + 2);

    // A newer version of one ticket and a new ticket: the lake rewrites the partition, the
    // warehouse loads the rewritten file, merges it and rebuilds that day.
    let first = pg.query(
        "SELECT ticket_id, created_ts FROM analytics.support_tickets ORDER BY ticket_id LIMIT 1",
    );
    let (id, created) = (first[0][0].clone().unwrap(), first[0][1].clone().unwrap());
    p.add_raw(
        "support_tickets",
        "2024-03-04.csv",
        &tickets(&[
            &format!(
                "{id},{created},2030-01-01 00:00:00,closed,high,late@example.com,again,reopened,a-1"
            ),
            &format!("T-NEW-1,{created},{created},open,low,new@example.com,hello,first,a-2"),
        ]),
    );
    let (code, report, out) = run(&p, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        statements(&report),
        [
            ("load support_tickets".to_string(), "finished".to_string()),
            ("call 1".into(), "finished".into()),
            ("call 2".into(), "finished".into()),
        ]
    );
    assert_eq!(
        pg.count("analytics.support_tickets"),
        lake_count(&p, "support_tickets")
    );
    let status = pg.query(&format!(
        "SELECT status FROM analytics.support_tickets WHERE ticket_id = '{id}'"
    ));
    assert_eq!(status, [[Some("closed".to_string())]]);
    assert_aggregates_match(&p, &pg);
}

#[test]
fn a_crash_after_the_load_commits_never_loads_a_file_twice() {
    let pg = Pg::start();
    let p = pg_project(&pg, CALLS);
    deploy(&p);
    // The load's transaction committed in PostgreSQL; the lake never heard of it.
    let (code, _, out) = run(&p, &["--crash-at", "finished:load support_tickets"]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("injected crash"), "{out}");
    assert!(pg.count("analytics.support_tickets_staging") > 0);

    let (code, report, out) = run(&p, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        statements(&report),
        [
            ("load support_tickets".to_string(), "skipped".to_string()),
            ("call 1".into(), "finished".into()),
            ("call 2".into(), "finished".into()),
        ],
        "app_logs' load finished before the crash and is not repeated"
    );
    for table in ["app_logs", "support_tickets"] {
        assert_eq!(
            pg.count(&format!("analytics.{table}")),
            lake_count(&p, table),
            "{table}"
        );
    }
    assert_aggregates_match(&p, &pg);
}

#[test]
fn a_failing_procedure_is_retried_reported_and_resumed_after_the_fix() {
    let pg = Pg::start();
    let p = pg_project(
        &pg,
        r#"["CALL analytics.sp_build_daily_ticket_stats(:run_date)", "CALL analytics.sp_missing(:run_date)"]"#,
    );
    deploy(&p);
    let (code, report, out) = run(&p, &[]);
    assert_eq!(code, 1, "{out}");
    let errors = report["errors"].to_string();
    assert!(
        errors.contains("call 2")
            && errors.contains("procedure analytics.sp_missing(unknown) does not exist"),
        "{errors}"
    );
    let calls: Vec<_> = report["statements"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["step"] == "call 2")
        .map(|s| {
            (
                s["status"].as_str().unwrap(),
                s["attempt"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        calls,
        [("failed", 1), ("failed", 2)],
        "retried per [retry] max_attempts"
    );
    // The lake committed regardless, and call 1 ran.
    assert!(lake_count(&p, "support_tickets") > 0);
    assert!(pg.count("analytics.daily_ticket_stats") > 0);

    // Fixed: the next run only runs what did not finish.
    p.edit_config(
        "analytics.sp_missing",
        "analytics.sp_build_daily_service_health",
    );
    let (code, report, out) = run(&p, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        statements(&report),
        [("call 2".to_string(), "finished".to_string())]
    );
    assert_eq!(report["statements"][0]["attempt"], 3);
    assert_aggregates_match(&p, &pg);
}

#[test]
fn an_unreachable_warehouse_fails_the_step_not_the_lake() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let p = Project::with_fixtures();
    let text_cfg = std::fs::read_to_string(p.config()).unwrap();
    std::fs::write(
        p.config(),
        format!(
            "{text_cfg}\n[warehouse]\nkind = \"postgres\"\nhost = \"127.0.0.1\"\nport = {port}\n\
             user = \"nobody\"\ndatabase = \"db\"\nload = \"copy\"\n"
        ),
    )
    .unwrap();
    let (code, report, out) = run(&p, &[]);
    assert_eq!(code, 1, "{out}");
    let errors = report["errors"].to_string();
    assert!(
        errors.contains(&format!("cannot connect to 127.0.0.1:{port}/db")),
        "{errors}"
    );
    assert!(lake_count(&p, "app_logs") > 0, "the lake's commit stands");
}

#[test]
fn tls_is_used_when_asked_and_the_server_certificate_is_verified() {
    let pg = Pg::start_tls();
    let p = pg_project(&pg, CALLS);
    // The server takes TLS only.
    p.edit_config(
        "kind = \"postgres\"",
        "kind = \"postgres\"\nsslmode = \"disable\"",
    );
    let out = try_deploy(&p);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no pg_hba.conf entry"),
        "{}",
        text(&out)
    );
    // TLS, but the certificate's CA is unknown to the system.
    p.edit_config("sslmode = \"disable\"", "sslmode = \"require\"");
    let out = try_deploy(&p);
    assert!(!out.status.success());
    assert!(
        text(&out).to_lowercase().contains("certificate"),
        "{}",
        text(&out)
    );
    // Trusting the test CA: deployed and loaded over TLS.
    p.edit_config(
        "sslmode = \"require\"",
        &format!(
            "sslmode = \"require\"\nssl_root_cert = \"{}\"",
            pg.ca().display()
        ),
    );
    deploy(&p);
    let (code, _, out) = run(&p, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        pg.count("analytics.support_tickets"),
        lake_count(&p, "support_tickets")
    );
}

/// Compacting a Delta table replaces its files; while the warehouse has not copied a commit's
/// files yet, the table is not compacted, so no row misses the warehouse. Once the load caught
/// up, compaction goes ahead.
#[cfg(feature = "delta")]
#[test]
fn compact_waits_until_the_warehouse_copied_a_delta_tables_files() {
    compact_waits_until_the_warehouse_copied(true);
}

/// The same for a plain table, compacted by a sluice commit: the warehouse does not copy the
/// merged files' rows again.
#[test]
fn compact_waits_until_the_warehouse_copied_a_plain_tables_files_and_loads_no_row_twice() {
    compact_waits_until_the_warehouse_copied(false);
}

fn compact_waits_until_the_warehouse_copied(delta: bool) {
    let pg = Pg::start();
    let p = pg_project(&pg, "[]");
    if delta {
        p.edit_config(
            "query = \"queries/support_tickets.sql\"",
            "query = \"queries/support_tickets.sql\"\nformat = \"delta\"",
        );
    }
    deploy(&p);
    // The warehouse is away for two runs: the lake commits, the loads wait.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let away = format!("postgres://sluice@127.0.0.1:{port}/postgres");
    p.edit_config(&pg.url(), &away);
    let (code, _, out) = run(&p, &[]);
    assert_eq!(code, 1, "{out}");
    let day = lake_rows(
        &p,
        "SELECT CAST(created_ts AS VARCHAR) AS c FROM support_tickets ORDER BY ticket_id LIMIT 1",
    )[0]["c"]
        .as_str()
        .unwrap()
        .to_string();
    p.add_raw(
        "support_tickets",
        "2024-03-05.csv",
        &tickets(&[&format!(
            "T-NEW-2,{day},{day},open,low,new@example.com,hello,first,a-2"
        )]),
    );
    let (code, _, out) = run(&p, &[]);
    assert_eq!(code, 1, "{out}");
    let parquet = |p: &Project| {
        p.files("processed/support_tickets")
            .into_iter()
            .filter(|f| f.ends_with(".parquet"))
            .collect::<Vec<_>>()
    };
    let before = parquet(&p);

    let out = sluice(&p, &["compact", "support_tickets"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("the warehouse has not loaded 2 commit(s) of this table yet"),
        "{}",
        text(&out)
    );
    assert_eq!(parquet(&p), before, "nothing was compacted");

    // The warehouse is back: the next run copies both commits' files (the unit the first run
    // started, then the second commit's), then compaction runs.
    p.edit_config(&away, &pg.url());
    let (code, report, out) = run(&p, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        statements(&report),
        [
            ("load app_logs".to_string(), "finished".to_string()),
            ("load support_tickets".into(), "finished".into()),
            ("load support_tickets".into(), "finished".into()),
        ]
    );
    let rows = lake_count(&p, "support_tickets");
    assert_eq!(pg.count("analytics.support_tickets_staging"), rows);
    let out = sluice(&p, &["compact", "support_tickets"]);
    assert!(out.status.success(), "{}", text(&out));
    if delta {
        assert!(
            text(&out)
                .contains("compact processed/support_tickets: 1 files added, 2 files removed"),
            "{}",
            text(&out)
        );
    } else {
        assert!(
            text(&out).contains("compact processed/support_tickets: "),
            "{}",
            text(&out)
        );
        assert!(parquet(&p).len() < before.len(), "{:?}", parquet(&p));
    }
    assert_eq!(lake_count(&p, "support_tickets"), rows);
    let (code, report, out) = run(&p, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(statements(&report).is_empty(), "{report}");
    assert_eq!(pg.count("analytics.support_tickets_staging"), rows);
}

#[test]
fn a_replay_loads_only_its_new_rows_and_tells_the_procedures_which_files() {
    let pg = Pg::start();
    let calls = r#"["CALL analytics.sp_build_daily_ticket_stats(:run_date)", "CALL analytics.sp_build_daily_service_health(:run_date)", "INSERT INTO analytics.replay_log VALUES (:replayed)"]"#;
    let p = pg_project(&pg, calls);
    deploy(&p);
    pg.query("CREATE TABLE analytics.replay_log (replayed text)");
    let (code, _, out) = run(&p, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        pg.query("SELECT replayed FROM analytics.replay_log"),
        [[Some(String::new())]]
    );
    // The fixed query upper-cases priorities; one file of three is replayed.
    let q = p.path().join("queries/support_tickets.sql");
    let sql = std::fs::read_to_string(&q).unwrap();
    std::fs::write(
        &q,
        sql.replace("lower(priority) AS priority", "upper(priority) AS priority"),
    )
    .unwrap();
    let out = sluice(
        &p,
        &[
            "reprocess",
            "support_tickets",
            "--files",
            "2024-03-01.csv",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["files_rewritten"].as_u64().unwrap() > 0, "{r:#}");
    let st: Vec<&Value> = r["statements"].as_array().unwrap().iter().collect();
    let load = st
        .iter()
        .find(|s| s["step"] == "load support_tickets")
        .unwrap();
    assert_eq!(load["status"], "finished", "{r:#}");
    // Only the replay's new rows, not the rewritten files' rows of other files.
    assert_eq!(load["rows"].as_u64(), r["rows_added"].as_u64(), "{r:#}");
    assert_eq!(
        pg.query("SELECT replayed FROM analytics.replay_log ORDER BY 1"),
        [
            [Some(String::new())],
            [Some("raw/support_tickets/2024-03-01.csv".to_string())]
        ]
    );
    // The warehouse holds what the lake holds, lineage included; the aggregates match.
    assert_eq!(
        pg.count("analytics.support_tickets"),
        lake_count(&p, "support_tickets")
    );
    let lake = lake_rows(
        &p,
        "SELECT _sluice_source, priority, count(*) AS n FROM support_tickets GROUP BY 1, 2 ORDER BY 1, 2",
    );
    let wh = pg.query(
        "SELECT _sluice_source, priority, count(*) FROM analytics.support_tickets GROUP BY 1, 2 ORDER BY 1, 2",
    );
    assert_eq!(lake.len(), wh.len(), "lake {lake:?}\nwarehouse {wh:?}");
    for (l, w) in lake.iter().zip(&wh) {
        assert_eq!(l["_sluice_source"].as_str(), w[0].as_deref());
        assert_eq!(l["priority"].as_str(), w[1].as_deref());
        assert_eq!(l["n"].as_u64().unwrap().to_string(), w[2].clone().unwrap());
        let upper = l["priority"]
            .as_str()
            .is_some_and(|s| s == s.to_uppercase());
        assert_eq!(
            upper,
            l["_sluice_source"] == "raw/support_tickets/2024-03-01.csv",
            "{l}"
        );
    }
    assert_aggregates_match(&p, &pg);
}
