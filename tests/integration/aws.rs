//! sluice on AWS, end to end against moto (`moto_server` on a loopback port, one per test):
//! an S3 lake, the Glue Data Catalog, SNS notifications, Secrets Manager references, S3 events
//! in every envelope, and the SQS worker.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::Credentials;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde_json::Value;

use crate::support::{Project, hold, repo};

/// A moto server of this test's own.
pub struct Moto {
    child: Child,
    pub endpoint: String,
    rt: tokio::runtime::Runtime,
    sdk: SdkConfig,
}

fn moto_server() -> PathBuf {
    if let Ok(p) = std::env::var("SLUICE_MOTO_SERVER") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let p = PathBuf::from(home).join(".cache/sluice-moto/bin/moto_server");
    assert!(
        p.exists(),
        "moto_server not found at {}: `bash .ci/run` installs it (or set SLUICE_MOTO_SERVER)",
        p.display()
    );
    p
}

impl Moto {
    pub fn start() -> Moto {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(moto_server())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let endpoint = format!("http://127.0.0.1:{port}");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let sdk = SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(&endpoint)
            .credentials_provider(
                aws_credential_types::provider::SharedCredentialsProvider::new(Credentials::new(
                    "testing", "testing", None, None, "test",
                )),
            )
            .http_client(sluice::aws::http_client())
            .build();
        let moto = Moto {
            child,
            endpoint,
            rt,
            sdk,
        };
        let start = Instant::now();
        loop {
            let up = moto.rt.block_on(async {
                reqwest::get(format!("{}/moto-api/", moto.endpoint))
                    .await
                    .is_ok_and(|r| r.status().is_success())
            });
            if up {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "moto did not start"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        moto
    }

    /// Points a sluice command at moto, with fake credentials and nothing else from the host.
    pub fn env(&self, cmd: &mut Command) {
        for (k, _) in std::env::vars() {
            if k.starts_with("AWS_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
    }

    /// [`Moto::env`] with the credentials of an IAM user made by [`Moto::iam_user`].
    pub fn env_as(&self, cmd: &mut Command, user: &(String, String)) {
        self.env(cmd);
        cmd.env("AWS_ACCESS_KEY_ID", &user.0)
            .env("AWS_SECRET_ACCESS_KEY", &user.1);
    }

    /// An IAM query API call (moto routes it by the credential scope; before
    /// [`Moto::enforce_iam`] the signature is not checked): the response's XML.
    fn iam_call(&self, params: &[(&str, &str)]) -> String {
        let mut form = vec![("Version", "2010-05-08")];
        form.extend_from_slice(params);
        self.block_on(async {
            let r = reqwest::Client::new()
                .post(format!("{}/", self.endpoint))
                .header(
                    "Authorization",
                    "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/iam/aws4_request, \
                     SignedHeaders=host, Signature=0",
                )
                .form(&form)
                .send()
                .await
                .unwrap();
            let status = r.status();
            let body = r.text().await.unwrap();
            assert!(status.is_success(), "{params:?}: {status} {body}");
            body
        })
    }

    /// An IAM user holding `policy` (a policy document) inline: its access key and secret.
    pub fn iam_user(&self, name: &str, policy: &str) -> (String, String) {
        self.iam_call(&[("Action", "CreateUser"), ("UserName", name)]);
        self.iam_call(&[
            ("Action", "PutUserPolicy"),
            ("UserName", name),
            ("PolicyName", "sluice"),
            ("PolicyDocument", policy),
        ]);
        let xml = self.iam_call(&[("Action", "CreateAccessKey"), ("UserName", name)]);
        let field = |tag: &str| {
            let start = xml.find(&format!("<{tag}>")).unwrap() + tag.len() + 2;
            let end = xml[start..].find('<').unwrap() + start;
            xml[start..end].to_string()
        };
        (field("AccessKeyId"), field("SecretAccessKey"))
    }

    /// From now on (`true`) every request must be signed by a known IAM user and be allowed by
    /// its policies; `false` turns the check off again.
    pub fn enforce_iam(&self, on: bool) {
        let count = if on { "0" } else { "inf" };
        self.block_on(async {
            let r = reqwest::Client::new()
                .post(format!("{}/moto-api/reset-auth", self.endpoint))
                .body(count)
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
        });
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    pub fn create_bucket(&self, bucket: &str) {
        self.block_on(async {
            let r = reqwest::Client::new()
                .put(format!("{}/{bucket}", self.endpoint))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "create bucket: {}", r.status());
        });
    }

    pub fn s3(&self, bucket: &str) -> Arc<dyn ObjectStore> {
        Arc::new(
            AmazonS3Builder::new()
                .with_bucket_name(bucket)
                .with_region("us-east-1")
                .with_endpoint(&self.endpoint)
                .with_allow_http(true)
                .with_access_key_id("testing")
                .with_secret_access_key("testing")
                .build()
                .unwrap(),
        )
    }

    /// Every key in a bucket under a prefix, sorted.
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let store = self.s3(bucket);
        let mut keys: Vec<String> = self.block_on(async {
            store
                .list(Some(&ObjPath::from(prefix)))
                .map_ok(|m| m.location.to_string())
                .try_collect()
                .await
                .unwrap()
        });
        keys.sort();
        keys
    }

    /// An object's bytes.
    pub fn get(&self, bucket: &str, key: &str) -> Vec<u8> {
        let store = self.s3(bucket);
        self.block_on(async {
            let got = store.get(&ObjPath::parse(key).unwrap()).await.unwrap();
            got.bytes().await.unwrap().to_vec()
        })
    }

    /// An object's size.
    pub fn size(&self, bucket: &str, key: &str) -> u64 {
        let store = self.s3(bucket);
        self.block_on(async {
            store
                .head(&ObjPath::parse(key).unwrap())
                .await
                .unwrap()
                .size
        })
    }

    pub fn put(&self, bucket: &str, key: &str, data: Vec<u8>) {
        let store = self.s3(bucket);
        self.block_on(async {
            store
                .put(&ObjPath::parse(key).unwrap(), PutPayload::from(data))
                .await
                .unwrap();
        });
    }

    pub fn glue(&self) -> aws_sdk_glue::Client {
        aws_sdk_glue::Client::new(&self.sdk)
    }

    pub fn sqs(&self) -> aws_sdk_sqs::Client {
        aws_sdk_sqs::Client::new(&self.sdk)
    }

    pub fn sns(&self) -> aws_sdk_sns::Client {
        aws_sdk_sns::Client::new(&self.sdk)
    }

    pub fn create_queue(&self, name: &str) -> String {
        self.block_on(async {
            self.sqs()
                .create_queue()
                .queue_name(name)
                .send()
                .await
                .unwrap()
                .queue_url()
                .unwrap()
                .to_string()
        })
    }

    pub fn send(&self, queue: &str, body: &str) {
        self.block_on(async {
            self.sqs()
                .send_message()
                .queue_url(queue)
                .message_body(body)
                .send()
                .await
                .unwrap();
        });
    }

    /// Messages on a queue, visible or not.
    pub fn queued(&self, queue: &str) -> u64 {
        use aws_sdk_sqs::types::QueueAttributeName as A;
        let out = self.block_on(async {
            self.sqs()
                .get_queue_attributes()
                .queue_url(queue)
                .attribute_names(A::All)
                .send()
                .await
                .unwrap()
        });
        let attrs = out.attributes().unwrap();
        [
            A::ApproximateNumberOfMessages,
            A::ApproximateNumberOfMessagesNotVisible,
        ]
        .iter()
        .map(|k| attrs.get(k).unwrap().parse::<u64>().unwrap())
        .sum()
    }

    /// A topic whose messages land on a new queue (the way to read what was published).
    pub fn topic_with_queue(&self, name: &str) -> (String, String) {
        let queue = self.create_queue(&format!("{name}-inbox"));
        self.block_on(async {
            let arn = self
                .sns()
                .create_topic()
                .name(name)
                .send()
                .await
                .unwrap()
                .topic_arn()
                .unwrap()
                .to_string();
            let queue_arn = format!("arn:aws:sqs:us-east-1:123456789012:{name}-inbox");
            self.sns()
                .subscribe()
                .topic_arn(&arn)
                .protocol("sqs")
                .endpoint(queue_arn)
                .send()
                .await
                .unwrap();
            (arn, queue)
        })
    }

    /// The bodies of the messages waiting on a queue (received and deleted).
    pub fn drain(&self, queue: &str) -> Vec<Value> {
        self.block_on(async {
            let mut out = Vec::new();
            loop {
                let got = self
                    .sqs()
                    .receive_message()
                    .queue_url(queue)
                    .max_number_of_messages(10)
                    .wait_time_seconds(1)
                    .send()
                    .await
                    .unwrap();
                if got.messages().is_empty() {
                    return out;
                }
                for m in got.messages() {
                    out.push(serde_json::from_str(m.body().unwrap()).unwrap());
                    self.sqs()
                        .delete_message()
                        .queue_url(queue)
                        .receipt_handle(m.receipt_handle().unwrap())
                        .send()
                        .await
                        .unwrap();
                }
            }
        })
    }

    pub fn secret(&self, name: &str, value: &str) {
        self.block_on(async {
            aws_sdk_secretsmanager::Client::new(&self.sdk)
                .create_secret()
                .name(name)
                .secret_string(value)
                .send()
                .await
                .unwrap();
        });
    }

    /// A Glue table, if it exists.
    pub fn glue_table(&self, db: &str, name: &str) -> Option<aws_sdk_glue::types::Table> {
        self.block_on(async {
            self.glue()
                .get_table()
                .database_name(db)
                .name(name)
                .send()
                .await
                .ok()
                .and_then(|t| t.table)
        })
    }

    /// The partition values of a Glue table, sorted.
    pub fn partitions(&self, db: &str, table: &str) -> Vec<Vec<String>> {
        self.block_on(async {
            let mut pages = self
                .glue()
                .get_partitions()
                .database_name(db)
                .table_name(table)
                .into_paginator()
                .send();
            let mut out: Vec<Vec<String>> = Vec::new();
            while let Some(page) = pages.next().await {
                for p in page.unwrap().partitions() {
                    out.push(p.values().to_vec());
                }
            }
            out.sort();
            out
        })
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The example project with its lake in `s3://<bucket>/data` and the fixtures uploaded there.
pub(crate) fn s3_project(moto: &Moto, bucket: &str, catalog: &str) -> Project {
    moto.create_bucket(bucket);
    let p = Project::empty();
    p.edit_config(
        "root = \"lake\"",
        &format!("root = \"s3://{bucket}/data\"\n\n[catalog]\n{catalog}"),
    );
    for source in ["app_logs", "support_tickets"] {
        for e in std::fs::read_dir(repo().join("fixtures/raw").join(source)).unwrap() {
            let e = e.unwrap();
            let key = format!("data/raw/{source}/{}", e.file_name().to_string_lossy());
            moto.put(bucket, &key, std::fs::read(e.path()).unwrap());
        }
    }
    p
}

pub(crate) fn sluice(moto: &Moto, p: &Project, args: &[&str]) -> (i32, String, String) {
    let mut c = p.cmd(args);
    moto.env(&mut c);
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub(crate) fn run_json(moto: &Moto, p: &Project, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["run", "--json"];
    args.extend_from_slice(extra);
    let (code, out, err) = sluice(moto, p, &args);
    let report = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("no JSON report ({e}); stdout: {out}\nstderr: {err}"));
    (code, report)
}

fn table_counts(report: &Value) -> Vec<(String, u64, u64, u64)> {
    let mut out: Vec<_> = report["tables"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                t["rows_written"].as_u64().unwrap(),
                t["rows_rejected"].as_u64().unwrap(),
                t["rows_duplicate"].as_u64().unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn s3_lake_glue_catalog_sns_and_secrets_end_to_end() {
    let moto = Moto::start();
    let (ok_topic, ok_inbox) = moto.topic_with_queue("pipeline-ok");
    let (fail_topic, fail_inbox) = moto.topic_with_queue("pipeline-failed");
    moto.secret(
        "sluice/notify",
        &serde_json::json!({ "success": format!("sns:{ok_topic}") }).to_string(),
    );
    let p = s3_project(&moto, "lake", "kind = \"glue\"\ndatabase = \"analytics\"");
    p.edit_config(
        "on_success = [\"log\"]\non_failure = [\"log\"]",
        &format!(
            "on_success = [\"log\", \"secret:sluice/notify#success\"]\non_failure = [\"sns:{}\"]",
            fail_topic
        ),
    );
    p.edit_config("[lake]", "name = \"tickets-and-logs\"\n\n[lake]");

    let (code, report) = run_json(&moto, &p, &[]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["status"], "succeeded");

    // The same counts as the same fixtures in a folder lake.
    let local = Project::with_fixtures();
    let (lcode, lreport) = local.run();
    assert_eq!(lcode, 0);
    assert_eq!(table_counts(&report), table_counts(&lreport));
    assert!(!table_counts(&report).is_empty());

    // Raw files archived (copied, then deleted), tables and rejects written in S3.
    assert!(moto.keys("lake", "data/raw").is_empty());
    assert_eq!(moto.keys("lake", "data/archive").len(), 6);
    let processed = moto.keys("lake", "data/processed/app_logs");
    assert!(processed.iter().all(|k| k.contains("/event_date=")));
    let dirs: BTreeSet<String> = processed
        .iter()
        .map(|k| {
            k.rsplit_once('/')
                .unwrap()
                .0
                .rsplit_once('=')
                .unwrap()
                .1
                .to_string()
        })
        .collect();
    assert!(!moto.keys("lake", "data/rejected/app_logs").is_empty());
    assert!(!moto.keys("lake", "data/_sluice/ledger").is_empty());
    assert!(moto.keys("lake", "data/_sluice/claims").is_empty());

    // Glue: external Parquet tables Spectrum reads, with every partition.
    let t = moto
        .glue_table("analytics", "app_logs")
        .expect("app_logs in Glue");
    assert_eq!(t.table_type(), Some("EXTERNAL_TABLE"));
    assert_eq!(
        t.parameters()
            .unwrap()
            .get("classification")
            .map(String::as_str),
        Some("parquet")
    );
    let sd = t.storage_descriptor().unwrap();
    assert_eq!(sd.location(), Some("s3://lake/data/processed/app_logs/"));
    assert_eq!(
        sd.input_format(),
        Some("org.apache.hadoop.hive.ql.io.parquet.MapredParquetInputFormat")
    );
    assert_eq!(
        sd.serde_info().unwrap().serialization_library(),
        Some("org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe")
    );
    let types: Vec<(String, String)> = sd
        .columns()
        .iter()
        .map(|c| (c.name().to_string(), c.r#type().unwrap().to_string()))
        .collect();
    assert!(
        types.contains(&("event_ts".into(), "timestamp".into())),
        "{types:?}"
    );
    assert!(
        types.contains(&("latency_ms".into(), "double".into())),
        "{types:?}"
    );
    assert!(
        types.contains(&("request_id".into(), "string".into())),
        "{types:?}"
    );
    let keys: Vec<(String, String)> = t
        .partition_keys()
        .iter()
        .map(|c| (c.name().to_string(), c.r#type().unwrap().to_string()))
        .collect();
    assert_eq!(keys, vec![("event_date".to_string(), "date".to_string())]);
    let parts = moto.partitions("analytics", "app_logs");
    let want: Vec<Vec<String>> = dirs.iter().map(|d| vec![d.clone()]).collect();
    assert_eq!(parts, want);
    assert!(moto.glue_table("analytics", "support_tickets").is_some());
    let rejected = moto
        .glue_table("analytics", "app_logs_rejected")
        .expect("rejected table in Glue");
    assert_eq!(
        rejected.storage_descriptor().unwrap().location(),
        Some("s3://lake/data/rejected/app_logs/")
    );
    assert_eq!(moto.partitions("analytics", "app_logs_rejected").len(), 1);

    // One success message through the topic named by the secret; no failure message.
    let ok = moto.drain(&ok_inbox);
    assert_eq!(ok.len(), 1, "{ok:?}");
    assert_eq!(ok[0]["Subject"], "sluice tickets-and-logs: run succeeded");
    assert!(ok[0]["Message"].as_str().unwrap().contains("app_logs"));
    assert_eq!(ok[0]["MessageAttributes"]["status"]["Value"], "succeeded");
    assert_eq!(
        ok[0]["MessageAttributes"]["pipeline"]["Value"],
        "tickets-and-logs"
    );
    assert!(moto.drain(&fail_inbox).is_empty());

    // The secret's value never shows in validate's output.
    let (_, out, err) = sluice(&moto, &p, &["validate"]);
    assert!(!out.contains(&ok_topic) && !err.contains(&ok_topic));

    // A rerun has nothing to do; sync finds every partition registered already.
    let (code, again) = run_json(&moto, &p, &[]);
    assert_eq!(code, 0);
    assert_eq!(again["status"], "nothing_to_do", "{again:#}");
    let (code, out, err) = sluice(&moto, &p, &["catalog", "sync"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("analytics.app_logs: "), "{out}");
    assert!(
        out.lines().all(|l| l.ends_with(" 0 newly registered")),
        "{out}"
    );
    assert_eq!(moto.partitions("analytics", "app_logs"), want);

    // Queries read the S3 lake.
    let (code, out, err) = sluice(
        &moto,
        &p,
        &[
            "query",
            "SELECT count(*) AS n FROM app_logs",
            "--format",
            "csv",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let written = table_counts(&report)
        .into_iter()
        .find(|t| t.0 == "app_logs")
        .unwrap()
        .1;
    assert_eq!(out.lines().nth(1), Some(written.to_string().as_str()));

    // The aggregates are partitioned in S3 too, read back as in the folder lake, and recomputed
    // for the partitions a commit touched, equal to their query over the tables.
    let wh = moto.keys("lake", "data/warehouse/daily_ticket_stats");
    assert!(
        !wh.is_empty()
            && wh
                .iter()
                .all(|k| k.contains("/event_date=") && k.ends_with("/data.parquet")),
        "{wh:?}"
    );
    let stats = "SELECT event_date, status, tickets, round(avg_hours_open, 6) AS h, customers \
                 FROM daily_ticket_stats ORDER BY 1, 2";
    let (code, out, err) = sluice(&moto, &p, &["query", stats, "--format", "csv"]);
    assert_eq!(code, 0, "{err}");
    let lout = local.sluice(&["query", stats, "--format", "csv"]);
    assert_eq!(out, String::from_utf8_lossy(&lout.stdout));
    moto.put(
        "lake",
        "data/raw/support_tickets/updates.csv",
        crate::support::tickets(&[
            "TCK-00000018,2024-03-04 01:14:10,2024-03-10 09:00:00,resolved,urgent,d@example.com,s,b,agent003",
        ]),
    );
    let (code, updated) = run_json(&moto, &p, &[]);
    assert_eq!(code, 0, "{updated:#}");
    let built = updated["warehouse"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "daily_ticket_stats")
        .unwrap();
    assert_eq!(built["mode"], "incremental");
    assert_eq!(
        built["partitions"],
        serde_json::json!(["2024-03-01", "2024-03-04"])
    );
    let sql = std::fs::read_to_string(p.path().join("queries/aggregates/daily_ticket_stats.sql"))
        .unwrap();
    let full = format!(
        "SELECT event_date, status, tickets, round(avg_hours_open, 6) AS h, customers \
         FROM (\n{sql}\n) AS f ORDER BY 1, 2"
    );
    let (_, have, _) = sluice(&moto, &p, &["query", stats, "--format", "csv"]);
    let (code, full_rows, err) = sluice(&moto, &p, &["query", &full, "--format", "csv"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(have, full_rows);
    assert!(have.contains("2024-03-04,resolved,1,"), "{have}");
    assert_eq!(moto.drain(&ok_inbox).len(), 1);

    // A failing run tells the support topic, with its status; nothing committed is undone.
    moto.put(
        "lake",
        "data/raw/app_logs/2024-03-09.jsonl.gz",
        b"\x1f\x8b\x08\x00broken".to_vec(),
    );
    let (code, failed) = run_json(&moto, &p, &[]);
    assert_eq!(code, 1, "{failed:#}");
    let support = moto.drain(&fail_inbox);
    assert_eq!(support.len(), 1, "{support:?}");
    assert_eq!(support[0]["Subject"], "sluice tickets-and-logs: run FAILED");
    assert_eq!(support[0]["MessageAttributes"]["status"]["Value"], "failed");
    assert!(
        support[0]["Message"]
            .as_str()
            .unwrap()
            .contains("2024-03-09.jsonl.gz"),
        "{support:?}"
    );
    assert!(moto.drain(&ok_inbox).is_empty());
    assert_eq!(moto.partitions("analytics", "app_logs"), want);
}

#[test]
fn catalog_sync_registers_a_lake_written_without_glue() {
    let moto = Moto::start();
    let p = s3_project(&moto, "plain", "kind = \"lake\"");
    let (code, report) = run_json(&moto, &p, &[]);
    assert_eq!(code, 0, "{report:#}");
    assert!(moto.glue_table("backfill", "app_logs").is_none());
    p.edit_config(
        "kind = \"lake\"",
        "kind = \"glue\"\ndatabase = \"backfill\"",
    );
    let (code, out, err) = sluice(&moto, &p, &["catalog", "sync"]);
    assert_eq!(code, 0, "{err}");
    let dirs: BTreeSet<String> = moto
        .keys("plain", "data/processed/support_tickets")
        .iter()
        .map(|k| k.rsplit_once('/').unwrap().0.to_string())
        .collect();
    let line = format!(
        "backfill.support_tickets: {n} partitions in the lake, {n} newly registered",
        n = dirs.len()
    );
    assert!(out.contains(&line), "{out}");
    assert_eq!(
        moto.partitions("backfill", "support_tickets").len(),
        dirs.len()
    );
    let (_, again, _) = sluice(&moto, &p, &["catalog", "sync"]);
    assert!(
        again.lines().all(|l| l.ends_with(" 0 newly registered")),
        "{again}"
    );
}

/// `sluice watch --queue` on a queue, with a message visibility timeout in seconds.
fn worker(moto: &Moto, p: &Project, queue: &str, visibility: &str) -> Child {
    worker_with(moto, p, queue, visibility, &[])
}

/// [`worker`] with more global arguments (`--batch-files 2`).
fn worker_with(moto: &Moto, p: &Project, queue: &str, visibility: &str, extra: &[&str]) -> Child {
    let mut args = extra.to_vec();
    args.extend_from_slice(&[
        "watch",
        "--queue",
        queue,
        "--wait",
        "1",
        "--visibility",
        visibility,
    ]);
    let mut c = p.cmd(&args);
    moto.env(&mut c);
    c.stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Kills a worker that did not get there, with what it logged.
fn give_up(child: Child, what: &str) -> ! {
    let mut child = child;
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    panic!("{what}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Stops a worker with SIGTERM: it exits 0; returns what it logged.
fn stop(mut child: Child) -> String {
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "exit {status:?}: {err}");
    err
}

fn s3_record(bucket: &str, key: &str) -> Value {
    serde_json::json!({
        "eventVersion": "2.1", "eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": bucket}, "object": {"key": key}}
    })
}

fn handle(moto: &Moto, p: &Project, event: &Value) -> (i32, String, String) {
    let file = p.path().join("event.json");
    std::fs::write(&file, event.to_string()).unwrap();
    sluice(moto, p, &["handle-event", file.to_str().unwrap(), "--json"])
}

#[test]
fn handle_event_takes_every_envelope_and_ignores_repeats() {
    let moto = Moto::start();
    let p = s3_project(&moto, "events", "kind = \"lake\"");
    // A key with a space: S3 notifications encode it as '+'.
    let data = std::fs::read(repo().join("fixtures/raw/support_tickets/2024-03-01.csv")).unwrap();
    moto.put("events", "data/raw/support_tickets/march 1st.csv", data);

    // Plain S3 notification, URL-encoded key: only that object is processed.
    let plain = serde_json::json!({"Records": [s3_record("events", "data/raw/support_tickets/march+1st.csv")]});
    let (code, out, err) = handle(&moto, &p, &plain);
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let files: Vec<&str> = report["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["key"].as_str().unwrap())
        .collect();
    assert_eq!(files, vec!["raw/support_tickets/march 1st.csv"]);
    assert_eq!(moto.keys("events", "data/raw").len(), 6, "the others wait");

    // The same event again: nothing to do.
    let (code, out, err) = handle(&moto, &p, &plain);
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["status"], "nothing_to_do", "{report:#}");

    // Inside an SQS body, inside an SNS envelope inside SQS, as EventBridge; a test event.
    let inner = |k: &str| serde_json::json!({"Records": [s3_record("events", k)]}).to_string();
    let sqs = serde_json::json!({"Records": [{"eventSource": "aws:sqs", "body": inner("data/raw/app_logs/2024-03-01.jsonl")}]});
    let sns_sqs = serde_json::json!({"Records": [{"eventSource": "aws:sqs", "body":
        serde_json::json!({"Type": "Notification", "Message": inner("data/raw/app_logs/2024-03-02.jsonl.gz")}).to_string()}]});
    let bridge = serde_json::json!({"source": "aws.s3", "detail-type": "Object Created",
        "detail": {"bucket": {"name": "events"}, "object": {"key": "data/raw/support_tickets/2024-03-02.csv"}}});
    for (event, key) in [
        (&sqs, "raw/app_logs/2024-03-01.jsonl"),
        (&sns_sqs, "raw/app_logs/2024-03-02.jsonl.gz"),
        (&bridge, "raw/support_tickets/2024-03-02.csv"),
    ] {
        let (code, out, err) = handle(&moto, &p, event);
        assert_eq!(code, 0, "{err}");
        let report: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(report["files"][0]["key"], key, "{report:#}");
        assert_eq!(report["files"][0]["status"], "processed", "{report:#}");
        assert_eq!(report["files"].as_array().unwrap().len(), 1);
    }
    let test_event =
        serde_json::json!({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "events"});
    let (code, _, err) = handle(&moto, &p, &test_event);
    assert_eq!(code, 0);
    assert!(err.contains("nothing to do"), "{err}");
    // Another bucket's object is not the lake's.
    let other =
        serde_json::json!({"Records": [s3_record("elsewhere", "data/raw/app_logs/x.jsonl")]});
    let (code, _, err) = handle(&moto, &p, &other);
    assert_eq!(code, 0);
    assert!(err.contains("nothing to do"), "{err}");
    assert_eq!(moto.keys("events", "data/raw").len(), 3);
    // A scheduled rule's payload (not an S3 event): a run over everything pending.
    let scheduled = serde_json::json!({"version": "0", "id": "1", "detail-type": "Scheduled Event",
        "source": "aws.events", "time": "2026-12-02T06:00:00Z", "detail": {}});
    let (code, out, err) = handle(&moto, &p, &scheduled);
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["files"].as_array().unwrap().len(), 3, "{report:#}");
    assert!(moto.keys("events", "data/raw").is_empty());
    // Text that is not JSON is still an error.
    let file = p.path().join("junk.json");
    std::fs::write(&file, "run now").unwrap();
    let (code, _, err) = sluice(&moto, &p, &["handle-event", file.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("not a JSON event"), "{err}");
}

#[test]
fn sqs_worker_processes_events_and_deletes_messages_after_commit() {
    let moto = Moto::start();
    let p = s3_project(&moto, "worker", "kind = \"lake\"");
    let queue = moto.create_queue("lake-events");
    for k in moto.keys("worker", "data/raw") {
        let body = serde_json::json!({"Records": [s3_record("worker", &k)]}).to_string();
        moto.send(&queue, &body);
    }
    // A message that is no event stays for the queue's redrive policy.
    moto.send(&queue, "not an event");
    let child = worker(&moto, &p, &queue, "30");
    let start = Instant::now();
    while !moto.keys("worker", "data/raw").is_empty() {
        if start.elapsed() > Duration::from_secs(120) {
            give_up(child, "the worker did not process the raw files");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    // Give it a moment to delete the last messages, then stop it with SIGTERM.
    std::thread::sleep(Duration::from_secs(2));
    let err = stop(child);
    assert_eq!(moto.keys("worker", "data/archive").len(), 6);
    // Only the junk message is left (visible again after its timeout).
    assert_eq!(moto.queued(&queue), 1, "{err}");
}

#[test]
fn glue_schema_evolution_adds_columns_and_refuses_type_changes() {
    let moto = Moto::start();
    let p = s3_project(&moto, "evolve", "kind = \"glue\"\ndatabase = \"evo\"");
    // Only the tickets: keep the logs out.
    for k in moto.keys("evolve", "data/raw/app_logs") {
        let store = moto.s3("evolve");
        moto.block_on(async { store.delete(&ObjPath::parse(&k).unwrap()).await.unwrap() });
    }
    let first = moto.keys("evolve", "data/raw/support_tickets");
    let later: Vec<(String, Vec<u8>)> = first[1..]
        .iter()
        .map(|k| {
            let store = moto.s3("evolve");
            let data = moto.block_on(async {
                store
                    .get(&ObjPath::parse(k).unwrap())
                    .await
                    .unwrap()
                    .bytes()
                    .await
                    .unwrap()
            });
            moto.block_on(async { store.delete(&ObjPath::parse(k).unwrap()).await.unwrap() });
            (k.clone(), data.to_vec())
        })
        .collect();
    let (code, report) = run_json(&moto, &p, &[]);
    assert_eq!(code, 0, "{report:#}");
    let cols = |t: &str| -> Vec<(String, String)> {
        moto.glue_table("evo", t)
            .unwrap()
            .storage_descriptor()
            .unwrap()
            .columns()
            .iter()
            .map(|c| (c.name().to_string(), c.r#type().unwrap().to_string()))
            .collect()
    };
    let before = cols("support_tickets");
    assert!(!before.iter().any(|c| c.0 == "source_system"));

    // A new nullable column: the Glue table gains it.
    let query = p.path().join("queries/support_tickets.sql");
    let sql = std::fs::read_to_string(&query).unwrap();
    // The outer SELECT (the query's output) gains a column.
    let at = sql.rfind("\nSELECT").unwrap() + "\nSELECT".len();
    let widened = format!("{}\n  'crm' AS source_system,{}", &sql[..at], &sql[at..]);
    assert_ne!(widened, sql);
    std::fs::write(&query, &widened).unwrap();
    let (k, d) = &later[0];
    moto.put("evolve", k, d.clone());
    let (code, report) = run_json(&moto, &p, &[]);
    assert_eq!(code, 0, "{report:#}");
    let after = cols("support_tickets");
    assert!(
        after.contains(&("source_system".into(), "string".into())),
        "{after:?}"
    );
    assert_eq!(after.len(), before.len() + 1);

    // A type change stops the run before anything is written; Glue keeps its columns.
    std::fs::write(
        &query,
        widened.replace("'crm' AS source_system", "42 AS source_system"),
    )
    .unwrap();
    let (k, d) = &later[1];
    moto.put("evolve", k, d.clone());
    let files_before = moto.keys("evolve", "data/processed/support_tickets");
    let (code, report) = run_json(&moto, &p, &[]);
    assert_eq!(code, 1, "{report:#}");
    let text = report.to_string();
    assert!(text.contains("source_system"), "{text}");
    assert!(text.contains("changed type"), "{text}");
    assert_eq!(
        moto.keys("evolve", "data/processed/support_tickets"),
        files_before
    );
    assert_eq!(cols("support_tickets"), after);
}

#[test]
fn a_crash_between_commit_and_registration_is_repaired_by_the_next_run() {
    let moto = Moto::start();
    let p = s3_project(&moto, "crashy", "kind = \"glue\"\ndatabase = \"crash\"");
    let (code, _, _) = sluice(&moto, &p, &["run", "--crash-at", "archived"]);
    assert_ne!(code, 0, "the run was to crash");
    assert!(
        !moto.keys("crashy", "data/processed").is_empty(),
        "data committed"
    );
    let registered = moto
        .glue_table("crash", "app_logs")
        .map(|_| moto.partitions("crash", "app_logs").len())
        .unwrap_or(0)
        + moto
            .glue_table("crash", "support_tickets")
            .map(|_| moto.partitions("crash", "support_tickets").len())
            .unwrap_or(0);
    assert_eq!(registered, 0, "nothing registered before the crash");
    assert!(
        !moto
            .keys("crashy", "data/_sluice/catalog/unregistered")
            .is_empty()
    );

    let (code, report) = run_json(&moto, &p, &[]);
    assert_eq!(code, 0, "{report:#}");
    let dirs = |t: &str| -> usize {
        moto.keys("crashy", &format!("data/processed/{t}"))
            .iter()
            .map(|k| k.rsplit_once('/').unwrap().0.to_string())
            .collect::<BTreeSet<_>>()
            .len()
    };
    assert_eq!(moto.partitions("crash", "app_logs").len(), dirs("app_logs"));
    assert_eq!(
        moto.partitions("crash", "support_tickets").len(),
        dirs("support_tickets")
    );
    assert!(
        moto.keys("crashy", "data/_sluice/catalog/unregistered")
            .is_empty()
    );
}

#[test]
fn a_run_beside_a_commit_in_flight_leaves_its_catalog_marker_alone() {
    let moto = Moto::start();
    let p = s3_project(&moto, "beside", "kind = \"glue\"\ndatabase = \"beside\"");
    p.edit_config(
        "root = \"s3://beside/data\"",
        "root = \"s3://beside/data\"\nlock_wait_secs = 1",
    );
    let markers = || moto.keys("beside", "data/_sluice/catalog/unregistered");
    // Run B is held in its first commit: staged, marker written, commit lock held, before its
    // commit point.
    let mut c = p.cmd(&["run", "--json"]);
    moto.env(&mut c);
    let (b, pause) = hold(&p, c, "staged", "run B");
    assert_eq!(
        markers().len(),
        1,
        "B's marker is written before its commit point"
    );
    // Run A cannot take the commit lock; its catalog step (which runs on every way out) finds
    // B's marker and must leave it: B's commit is still to come.
    let (code, _, err) = sluice(&moto, &p, &["run"]);
    assert_ne!(code, 0, "A was to find the commit lock held: {err}");
    assert!(err.contains("commit"), "{err}");
    assert_eq!(
        markers().len(),
        1,
        "A dropped the marker of a commit in flight: {err}"
    );

    std::fs::remove_file(&pause).unwrap();
    let out = b.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["timings"]["catalog"].is_number(), "{report:#}");
    for t in ["app_logs", "support_tickets"] {
        let dirs = moto
            .keys("beside", &format!("data/processed/{t}"))
            .iter()
            .map(|k| k.rsplit_once('/').unwrap().0.to_string())
            .collect::<BTreeSet<_>>()
            .len();
        assert!(dirs > 0);
        assert_eq!(moto.partitions("beside", t).len(), dirs, "{t}: {err}");
    }
    assert!(markers().is_empty(), "{:?}", markers());
}

#[test]
fn two_workers_on_one_s3_lake_take_each_object_once() {
    let moto = Moto::start();
    let p = s3_project(&moto, "shared", "kind = \"lake\"");
    let spawn = || {
        let mut c = p.cmd(&["run", "--json"]);
        moto.env(&mut c);
        c.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    let mut keys = Vec::new();
    for out in [&a, &b] {
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        for f in r["files"].as_array().unwrap() {
            keys.push(f["key"].as_str().unwrap().to_string());
        }
    }
    keys.sort();
    let n = keys.len();
    keys.dedup();
    assert_eq!(keys.len(), n, "an object was processed twice: {keys:?}");
    assert_eq!(n, 6);
    // The tables hold what one run over the same files gives.
    let local = Project::with_fixtures();
    assert_eq!(local.run().0, 0);
    let (code, out, err) = sluice(
        &moto,
        &p,
        &[
            "query",
            "SELECT count(*) FROM support_tickets",
            "--format",
            "csv",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().nth(1).unwrap(),
        local.rows("processed/support_tickets").to_string()
    );
}

#[test]
fn large_outputs_are_uploaded_in_parts() {
    let moto = Moto::start();
    moto.create_bucket("big");
    // One unpartitioned table over a generated file: its Parquet file is larger than a part.
    let p = Project::single_table(
        "tickets",
        "csv",
        &std::fs::read_to_string(repo().join("schemas/support_tickets.toml"))
            .unwrap()
            .split_once("columns = ")
            .unwrap()
            .1
            .replace('\n', " "),
        "SELECT * FROM tickets",
    );
    p.edit_config("root = \"lake\"", "root = \"s3://big/lake\"");
    let csv = p.path().join("tickets.csv");
    let out = p.sluice(&[
        "generate",
        "tickets",
        csv.to_str().unwrap(),
        "--rows",
        "100000",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    moto.put(
        "big",
        "lake/raw/tickets/tickets.csv",
        std::fs::read(&csv).unwrap(),
    );
    // Stop after the upload into staging, where the uploaded object is still as uploaded.
    let (code, _, _) = sluice(&moto, &p, &["run", "--crash-at", "staged"]);
    assert_ne!(code, 0, "the run was to crash");
    let store = moto.s3("big");
    let staged: Vec<String> = moto
        .keys("big", "lake/_sluice/staging")
        .into_iter()
        .filter(|k| k.contains("/processed/"))
        .collect();
    assert_eq!(staged.len(), 1, "{staged:?}");
    let meta = moto.block_on(async {
        store
            .head(&ObjPath::parse(&staged[0]).unwrap())
            .await
            .unwrap()
    });
    assert!(
        meta.size > 8 << 20,
        "only {} bytes: not a multipart upload",
        meta.size
    );
    // A multipart upload's ETag ends with -<parts>.
    let etag = meta.e_tag.unwrap_or_default();
    assert!(etag.trim_matches('"').contains('-'), "ETag {etag}");
    // The next run recovers and commits the batch.
    let (code, report) = run_json(&moto, &p, &[]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(moto.keys("big", "lake/processed/tickets_clean").len(), 1);
    // The raw file, larger than a download range, was read whole: the ledger holds the
    // SHA-256 of the bytes read, which is the file's.
    let raw = std::fs::read(&csv).unwrap();
    assert!(raw.len() as u64 > sluice::lake::DOWNLOAD_RANGE);
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&raw))
    };
    let ledger: Vec<String> = moto.keys("big", "lake/_sluice/ledger");
    assert_eq!(ledger.len(), 1, "{ledger:?}");
    let entry: Value = serde_json::from_slice(&moto.get("big", &ledger[0])).unwrap();
    assert_eq!(entry["files"][0]["sha256"], sha.as_str(), "{entry:#}");
    let written = report["tables"]["tickets_clean"]["rows_written"]
        .as_u64()
        .unwrap();
    let (code, out, err) = sluice(
        &moto,
        &p,
        &[
            "query",
            "SELECT count(*) FROM tickets_clean",
            "--format",
            "csv",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().nth(1).unwrap(), written.to_string());
}

#[test]
fn a_long_run_keeps_its_messages_invisible() {
    let moto = Moto::start();
    let p = s3_project(&moto, "slow", "kind = \"lake\"");
    // The run ends with a webhook that answers after 5 s: a run much longer than the 2 s
    // visibility timeout below.
    let hook = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = hook.local_addr().unwrap().port();
    let (called, was_called) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if let Ok((mut conn, _)) = hook.accept() {
            let _ = called.send(());
            let mut buf = [0u8; 65536];
            let _ = std::io::Read::read(&mut conn, &mut buf);
            std::thread::sleep(Duration::from_secs(5));
            let _ = std::io::Write::write_all(
                &mut conn,
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    p.edit_config(
        "on_success = [\"log\"]",
        &format!("on_success = [\"webhook:http://127.0.0.1:{port}/\"]\ntimeout_secs = 30"),
    );
    let queue = moto.create_queue("slow-events");
    let key = moto.keys("slow", "data/raw/support_tickets")[0].clone();
    let body = serde_json::json!({"Records": [s3_record("slow", &key)]}).to_string();
    moto.send(&queue, &body);
    let child = worker(&moto, &p, &queue, "2");
    if was_called.recv_timeout(Duration::from_secs(120)).is_err() {
        give_up(child, "the run never notified");
    }
    // Past the 2 s timeout, the message must still be invisible to another consumer.
    let peek = || {
        moto.block_on(async {
            moto.sqs()
                .receive_message()
                .queue_url(&queue)
                .visibility_timeout(0)
                .wait_time_seconds(0)
                .send()
                .await
                .unwrap()
                .messages()
                .len()
        })
    };
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(3500) {
        assert_eq!(peek(), 0, "the message became visible during the run");
        std::thread::sleep(Duration::from_millis(250));
    }
    // Once committed and notified, the message is deleted.
    let start = Instant::now();
    while moto.queued(&queue) > 0 {
        if start.elapsed() > Duration::from_secs(60) {
            give_up(child, "message not deleted");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    stop(child);
}

/// A table `events_clean` in `s3://<bucket>/data`, registered in Glue database `moves`:
/// partitioned by `day`, one row per `id` (the greatest `ts` wins); Delta with `delta`.
fn moving_rows_project(moto: &Moto, bucket: &str, delta: bool) -> Project {
    moto.create_bucket(bucket);
    let p = Project::single_table(
        "events",
        "csv",
        r#"[{ name = "id", type = "string" }, { name = "day", type = "string" }, { name = "ts", type = "int64" }]"#,
        "SELECT id, day, ts, _source_file, _source_row FROM events",
    );
    p.edit_config(
        "root = \"lake\"",
        &format!(
            "root = \"s3://{bucket}/data\"\n\n[catalog]\nkind = \"glue\"\ndatabase = \"moves\""
        ),
    );
    p.edit_config(
        "source = \"events\"",
        &format!(
            "source = \"events\"\npartition_by = [\"day\"]\nunique_key = [\"id\"]\norder_by = \"ts\"{}",
            if delta { "\nformat = \"delta\"" } else { "" }
        ),
    );
    p
}

fn days(values: &[&str]) -> Vec<Vec<String>> {
    values.iter().map(|v| vec![v.to_string()]).collect()
}

/// A row whose newer version lands in another partition empties its old partition: the
/// commit deregisters it from Glue, and `catalog sync` deletes Glue partitions without files
/// in the lake (a Delta table's: without active files).
pub(crate) fn a_row_moving_partition_deregisters_the_emptied_one(delta: bool) {
    let moto = Moto::start();
    let bucket = "moves";
    let p = moving_rows_project(&moto, bucket, delta);
    moto.put(
        bucket,
        "data/raw/events/1.csv",
        b"id,day,ts\nk,d1,1\nm,d3,1\n".to_vec(),
    );
    let (code, report) = run_json(&moto, &p, &[]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(
        moto.partitions("moves", "events_clean"),
        days(&["d1", "d3"])
    );
    // k moves from d1 to d2: d1 holds nothing now.
    moto.put(
        bucket,
        "data/raw/events/2.csv",
        b"id,day,ts\nk,d2,2\n".to_vec(),
    );
    let (code, report) = run_json(&moto, &p, &[]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(
        report["tables"]["events_clean"]["rows_replaced"], 1,
        "{report:#}"
    );
    assert_eq!(
        moto.partitions("moves", "events_clean"),
        days(&["d2", "d3"])
    );
    let (_, out, err) = sluice(
        &moto,
        &p,
        &[
            "query",
            "SELECT id, day FROM events_clean ORDER BY id",
            "--format",
            "csv",
        ],
    );
    assert_eq!(out.trim_end(), "id,day\nk,d2\nm,d3", "{err}");
    let d1 = moto.keys(bucket, "data/processed/events_clean/day=d1");
    let manifest = moto.keys(
        bucket,
        "data/processed/events_clean/_symlink_format_manifest/day=d1",
    );
    if delta {
        // The removed file stays for older versions; its manifest is gone.
        assert_eq!(d1.len(), 1, "{d1:?}");
        assert!(manifest.is_empty(), "{manifest:?}");
    } else {
        assert!(d1.is_empty(), "{d1:?}");
    }

    // A partition Glue holds without files in the lake (an older sluice left it, or its
    // files were deleted by hand): `catalog sync` deletes it, and registers nothing stale.
    let location = format!("s3://{bucket}/data/processed/events_clean/day=d1/");
    moto.block_on(async {
        moto.glue()
            .create_partition()
            .database_name("moves")
            .table_name("events_clean")
            .partition_input(
                aws_sdk_glue::types::PartitionInput::builder()
                    .values("d1")
                    .storage_descriptor(
                        aws_sdk_glue::types::StorageDescriptor::builder()
                            .location(location)
                            .build(),
                    )
                    .build(),
            )
            .send()
            .await
            .unwrap()
    });
    assert_eq!(
        moto.partitions("moves", "events_clean"),
        days(&["d1", "d2", "d3"])
    );
    let (code, out, err) = sluice(&moto, &p, &["catalog", "sync"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(
            "moves.events_clean: 2 partitions in the lake, 0 newly registered, 1 deregistered"
        ),
        "{out}"
    );
    assert_eq!(
        moto.partitions("moves", "events_clean"),
        days(&["d2", "d3"])
    );
    let (_, again, _) = sluice(&moto, &p, &["catalog", "sync"]);
    assert!(!again.contains("deregistered"), "{again}");
}

#[test]
fn a_row_moving_partition_deregisters_the_emptied_one_in_glue() {
    a_row_moving_partition_deregisters_the_emptied_one(false);
}

/// Many small files on an S3 lake: each is processed once and archived, and what a file costs
/// in requests stays small (one read and one archive copy; claims, deletes and listings go a
/// batch at a time), as the report counts them. `benches/small_files.sh` measures the same at
/// 1,000 files of ~110 KB.
#[test]
fn many_small_files_on_s3_cost_few_requests_each() {
    const FILES: usize = 200;
    let moto = Moto::start();
    moto.create_bucket("small");
    let p = Project::empty();
    p.edit_config("root = \"lake\"", "root = \"s3://small/data\"");
    // Equal sizes among them, so that some are hashed before the stream.
    for i in 0..FILES {
        let text = sluice::generate::sample(sluice::generate::Kind::Logs, 40, i as u64);
        let key = format!("data/raw/app_logs/part-{i:04}.jsonl");
        moto.put("small", &key, text.into_bytes());
    }
    let (code, report) = run_json(&moto, &p, &[]);
    assert_eq!(code, 0, "{report:#}");
    crate::support::check_accounting(&report);
    let files = report["files"].as_array().unwrap();
    let mut keys: Vec<&str> = files.iter().map(|f| f["key"].as_str().unwrap()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), FILES, "each file once");
    assert!(
        files.iter().all(|f| f["status"] == "processed"),
        "{report:#}"
    );
    assert_eq!(moto.keys("small", "data/archive/app_logs").len(), FILES);
    assert!(moto.keys("small", "data/raw/app_logs").is_empty());
    assert!(moto.keys("small", "data/_sluice/claims").is_empty());
    assert!(moto.keys("small", "data/_sluice/locks").is_empty());

    // Requests: counted per step and kind.
    let requests = report["requests"].as_object().unwrap();
    let total = |kind: &str| -> u64 {
        requests
            .values()
            .map(|step| step[kind].as_u64().unwrap_or(0))
            .sum()
    };
    let per_file = report["requests_per_file"].as_f64().unwrap();
    let all: u64 = ["GET", "HEAD", "PUT", "POST", "LIST", "COPY", "DELETE"]
        .iter()
        .map(|k| total(k))
        .sum();
    assert!(
        (per_file - all as f64 / FILES as f64).abs() < 0.01,
        "{per_file} vs {all}"
    );
    // The files' way (discover, hash, stream, commit): one GET (read) and one COPY (archive)
    // a file; the rest a batch at a time: claims, the identity check before archiving (a
    // listing), deletes (DeleteObjects), ledger, catalog and the table's output files, and
    // the commit's check under the lock of a plan made beside other commits (ledger listing,
    // catalog entry, pending record: a few a batch).
    let steps: u64 = ["discover", "hash", "stream", "commit"]
        .iter()
        .flat_map(|s| requests[*s].as_object().unwrap().values())
        .map(|n| n.as_u64().unwrap())
        .sum();
    let steps_per_file = steps as f64 / FILES as f64;
    assert!(
        steps_per_file <= 2.6,
        "{steps_per_file} a file: {requests:?}"
    );
    // With the aggregates, which read the table's files (not the raw ones).
    assert!(per_file <= 4.0, "{per_file} requests a file: {requests:?}");
    assert!(total("HEAD") <= 5, "no HEAD a file: {requests:?}");
    // (The aggregates' partition swap renames one partition at a time: its deletes are its.)
    let of_files = |kind: &str| -> u64 {
        ["recover", "discover", "hash", "stream", "commit"]
            .iter()
            .map(|s| requests[*s][kind].as_u64().unwrap_or(0))
            .sum()
    };
    let file_deletes = of_files("DELETE");
    assert!(file_deletes <= 15, "deletes are batched: {requests:?}");
    assert!(
        of_files("PUT") <= 60,
        "one claim object, not one a file: {requests:?}"
    );
    let copies = of_files("COPY") as usize;
    assert!((FILES..FILES + 60).contains(&copies), "{requests:?}");
    let (_, out, _) = sluice(&moto, &p, &["run"]);
    assert!(out.contains("nothing to do"), "{out}");

    // The summary counts them too.
    moto.put(
        "small",
        "data/raw/app_logs/late.jsonl",
        sluice::generate::sample(sluice::generate::Kind::Logs, 40, 9999).into_bytes(),
    );
    let (code, out, err) = sluice(&moto, &p, &["run"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("requests: ") && out.contains(" to S3 ("),
        "{out}"
    );
}

#[test]
fn enqueue_spreads_a_backlog_over_two_queue_workers_each_file_once() {
    let moto = Moto::start();
    let p = s3_project(&moto, "backfill", "kind = \"lake\"");
    // A key S3 would URL-encode.
    let data = std::fs::read(repo().join("fixtures/raw/support_tickets/2024-03-01.csv")).unwrap();
    moto.put("backfill", "data/raw/support_tickets/march 1st+.csv", data);
    let queue = moto.create_queue("backfill-events");
    // One source only first.
    let (code, out, err) = sluice(
        &moto,
        &p,
        &[
            "enqueue", "--queue", &queue, "--source", "app_logs", "--json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let done: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(done["messages"], 3, "{done:#}");
    assert!(done["files"].get("support_tickets").is_none());
    let (code, out, err) = sluice(
        &moto,
        &p,
        &["enqueue", "--queue", &queue, "--source", "support_tickets"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("support_tickets: 4 file(s)"), "{out}");
    assert_eq!(moto.queued(&queue), 7);
    let (code, _, err) = sluice(
        &moto,
        &p,
        &["enqueue", "--queue", &queue, "--source", "nope"],
    );
    assert_eq!(code, 2, "{err}");

    // Workers taking two messages at a time (`--batch-files 2`) share the backlog.
    let two = |p: &Project| worker_with(&moto, p, &queue, "30", &["--batch-files", "2"]);
    let workers = [two(&p), two(&p)];
    let start = Instant::now();
    while !moto.keys("backfill", "data/raw").is_empty() || moto.queued(&queue) > 0 {
        if start.elapsed() > Duration::from_secs(120) {
            let [a, _] = workers;
            give_up(a, "the backlog was not processed");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let logs: Vec<String> = workers.into_iter().map(stop).collect();
    for log in &logs {
        let took: u64 = log
            .lines()
            .filter_map(|l| {
                l.trim()
                    .strip_prefix("files: ")?
                    .split(' ')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum();
        assert!(took > 0, "a worker took no file: {logs:#?}");
    }
    // Each file once: seven processed in the ledger, the tables those of one run.
    let (code, out, err) = sluice(&moto, &p, &["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["processed_files"], 7, "{status:#}\n{logs:?}");
    let q = s3_project(&moto, "onerun", "kind = \"lake\"");
    let data = std::fs::read(repo().join("fixtures/raw/support_tickets/2024-03-01.csv")).unwrap();
    moto.put("onerun", "data/raw/support_tickets/march 1st+.csv", data);
    let (code, one) = run_json(&moto, &q, &[]);
    assert_eq!(code, 0);
    let rows = |proj: &Project, table: &str| {
        let (_, out, _) = sluice(
            &moto,
            proj,
            &[
                "query",
                "--format",
                "csv",
                &format!("SELECT count(*) FROM {table}"),
            ],
        );
        out
    };
    for t in ["app_logs", "support_tickets"] {
        assert_eq!(rows(&p, t), rows(&q, t), "{t}: {one:#}");
    }
    // Nothing pending: nothing sent.
    let (code, out, _) = sluice(&moto, &p, &["enqueue", "--queue", &queue, "--json"]);
    assert_eq!(code, 0);
    let done: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(done["messages"], 0);
}

/// A queue worker with a backlog takes it into one run (receives of ten until the queue is
/// empty or the batch full: one warehouse refresh, not one per ten files), and deletes every
/// message after the commit.
#[test]
fn a_queue_worker_takes_a_backlog_into_one_run() {
    const FILES: usize = 25;
    let moto = Moto::start();
    moto.create_bucket("backlog");
    let p = Project::empty();
    p.edit_config("root = \"lake\"", "root = \"s3://backlog/data\"");
    for i in 0..FILES {
        let text = sluice::generate::sample(sluice::generate::Kind::Logs, 20, i as u64);
        let key = format!("data/raw/app_logs/part-{i:04}.jsonl");
        moto.put("backlog", &key, text.into_bytes());
    }
    let queue = moto.create_queue("backlog-events");
    let (code, _, err) = sluice(&moto, &p, &["enqueue", "--queue", &queue]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(moto.queued(&queue), FILES as u64);
    let w = worker(&moto, &p, &queue, "30");
    let start = Instant::now();
    while !moto.keys("backlog", "data/raw").is_empty() || moto.queued(&queue) > 0 {
        if start.elapsed() > Duration::from_secs(60) {
            give_up(w, "the backlog was not processed");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let log = stop(w);
    let runs: Vec<&str> = log
        .lines()
        .filter_map(|l| l.trim().strip_prefix("files: "))
        .collect();
    assert_eq!(runs.len(), 1, "{log}");
    assert!(runs[0].starts_with(&format!("{FILES} ")), "{log}");
    let (code, out, err) = sluice(&moto, &p, &["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["processed_files"], FILES as u64, "{status:#}");
}
