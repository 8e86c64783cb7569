//! `sluice iam-policy`: the least-privilege policy for a config, checked by parliament (an IAM
//! policy linter nobody here wrote, installed by `.ci/run`), and covering every action the code
//! calls (the source is held to `iam::OPERATIONS` by a unit test).

use std::path::PathBuf;

use serde_json::Value;

use crate::support::*;

/// The linters' venv: `SLUICE_LINT` (its `bin/`), else `~/.cache/sluice-lint/bin`.
pub fn lint_bin(tool: &str) -> PathBuf {
    let dir = std::env::var_os("SLUICE_LINT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/sluice-lint/bin")
        });
    let p = dir.join(tool);
    assert!(
        p.exists(),
        "{} not found: `bash .ci/run` installs it (or set SLUICE_LINT to a venv's bin/)",
        p.display()
    );
    p
}

/// parliament's findings on a policy document (empty: none).
fn parliament(doc: &str) -> Vec<Value> {
    let out = std::process::Command::new(lint_bin("parliament"))
        .args(["--json", "--string", doc])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn full_project() -> Project {
    let p = Project::empty();
    p.edit_config(
        "root = \"lake\"",
        "root = \"s3://analytics-lake/prod\"\n\n[catalog]\nkind = \"glue\"\ndatabase = \"analytics\"",
    );
    p.edit_config(
        "on_success = [\"log\"]\non_failure = [\"log\"]",
        "on_failure = [\"sns:arn:aws:sns:eu-west-1:123456789012:lake-alerts\"]\n\
         on_success = [\"sns:arn:aws:sns:eu-west-1:123456789012:lake-runs\"]",
    );
    let text = std::fs::read_to_string(p.config()).unwrap();
    std::fs::write(
        p.config(),
        format!(
            "{text}\n\
             [warehouse]\nkind = \"redshift-data\"\nworkgroup_name = \"analytics\"\ndatabase = \"dev\"\n\
             secret_arn = \"arn:aws:secretsmanager:eu-west-1:123456789012:secret:redshift-admin-AbCdEf\"\n\
             iam_role = \"secret:lake/redshift-role\"\nload = \"copy\"\n"
        ),
    )
    .unwrap();
    p
}

fn policy(p: &Project, role: &str) -> (String, Value) {
    let out = p.sluice(&[
        "iam-policy",
        "--role",
        role,
        "--region",
        "eu-west-1",
        "--account",
        "123456789012",
        "--queue-arn",
        "arn:aws:sqs:eu-west-1:123456789012:lake-events",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let doc = String::from_utf8(out.stdout).unwrap();
    let v = serde_json::from_str(&doc).unwrap();
    (doc, v)
}

fn actions(v: &Value) -> Vec<String> {
    v["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["Action"].as_array().unwrap().clone())
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn policies_pass_parliament_and_cover_every_action_the_code_calls() {
    let p = full_project();
    for role in ["lambda", "ecs", "reader"] {
        let (doc, v) = policy(&p, role);
        let findings = parliament(&doc);
        assert!(findings.is_empty(), "{role}: {findings:#?}\n{doc}");
        let acts = actions(&v);
        // No wildcard action, no write for readers.
        assert!(acts.iter().all(|a| !a.contains('*')), "{role}: {acts:?}");
        if role == "reader" {
            assert!(
                acts.iter().all(|a| a.starts_with("s3:Get")
                    || a == "s3:ListBucket"
                    || a.starts_with("glue:Get")
                    || a.starts_with("glue:BatchGet")),
                "{acts:?}"
            );
            continue;
        }
        // Every SDK operation the code calls is allowed.
        for (_, _, action) in sluice::iam::OPERATIONS {
            if role == "lambda" && *action == sluice::iam::ENQUEUE {
                assert!(
                    !acts.iter().any(|a| a == action),
                    "the function never enqueues"
                );
                continue;
            }
            assert!(acts.iter().any(|a| a == action), "{role} lacks {action}");
        }
        // The lake's folders each with only their actions: raw files are never written.
        let raw = v["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| {
                s["Resource"]
                    .to_string()
                    .contains("analytics-lake/prod/raw/*")
            })
            .unwrap();
        assert_eq!(
            raw["Action"],
            serde_json::json!(["s3:GetObject", "s3:DeleteObject"])
        );
        let text = v.to_string();
        assert!(text.contains("arn:aws:sns:eu-west-1:123456789012:lake-alerts"));
        assert!(text.contains("secret:lake/redshift-role-??????"), "{text}");
        assert!(text.contains("redshift-admin-AbCdEf"));
        assert!(text.contains("arn:aws:glue:eu-west-1:123456789012:table/analytics/*"));
        assert_eq!(role == "lambda", text.contains("logs:PutLogEvents"));
    }
    // Negative control: parliament does find a mistake in such a document.
    let (doc, _) = policy(&p, "ecs");
    let broken = doc.replacen("s3:DeleteObject", "s3:DeleteObjekt", 1);
    assert!(
        !parliament(&broken).is_empty(),
        "parliament reports an unknown action"
    );
    // A lake on disk has no IAM policy.
    let local = Project::empty();
    let out = local.sluice(&["iam-policy"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("s3://"), "{}", text(&out));
}

/// The policy as moto can enforce it: moto evaluates no condition keys (`s3:prefix` is never
/// set, so a conditioned statement never applies) and checks the actions of services other
/// than S3 against the resource `*` only. So conditions go, and non-S3 statements keep their
/// actions on `*`; S3 statements are enforced as written, actions and resources, but for one:
/// moto authorizes a `DeleteObjects` request as `s3:DeleteObject` on the bucket (AWS checks it
/// key by key against the object ARNs the policy names), so the bucket ARN is added for it.
fn as_moto_enforces(doc: &Value, bucket: &str) -> Value {
    let mut doc = doc.clone();
    doc["Statement"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "Sid": "MotoDeleteObjects",
            "Effect": "Allow",
            "Action": ["s3:DeleteObject"],
            "Resource": [format!("arn:aws:s3:::{bucket}")],
        }));
    for st in doc["Statement"].as_array_mut().unwrap() {
        let st = st.as_object_mut().unwrap();
        st.remove("Condition");
        let s3 = st["Action"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a.as_str().unwrap().starts_with("s3:"));
        if !s3 {
            st.insert("Resource".into(), serde_json::json!("*"));
        }
    }
    doc
}

#[test]
fn a_run_with_exactly_the_generated_policy_succeeds_where_moto_enforces_iam() {
    use crate::aws::{Moto, s3_project};
    let moto = Moto::start();
    let (ok_topic, _) = moto.topic_with_queue("runs");
    let (fail_topic, _) = moto.topic_with_queue("alerts");
    // The success topic is read from a secret: the policy must still let it be published to.
    moto.secret(
        "sluice/notify",
        &serde_json::json!({ "success": format!("sns:{ok_topic}") }).to_string(),
    );
    let p = s3_project(&moto, "lake", "kind = \"glue\"\ndatabase = \"analytics\"");
    p.edit_config(
        "on_success = [\"log\"]\non_failure = [\"log\"]",
        &format!(
            "on_success = [\"secret:sluice/notify#success\"]\non_failure = [\"sns:{fail_topic}\"]"
        ),
    );
    let out = p.sluice(&[
        "iam-policy",
        "--role",
        "lambda",
        "--region",
        "us-east-1",
        "--account",
        "123456789012",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let enforced = as_moto_enforces(&doc, "lake");
    let user = moto.iam_user("pipeline", &enforced.to_string());
    // Negative control: the same policy without `s3:PutObject` (claims, data, ledger).
    let mut lacking = enforced.clone();
    for st in lacking["Statement"].as_array_mut().unwrap() {
        let acts = st["Action"].as_array_mut().unwrap();
        acts.retain(|a| a != "s3:PutObject");
        if acts.is_empty() {
            acts.push("s3:GetObject".into());
        }
    }
    let weak = moto.iam_user("weak", &lacking.to_string());

    moto.enforce_iam(true);
    let run = |who: &(String, String)| {
        let mut c = p.cmd(&["run", "--json"]);
        moto.env_as(&mut c, who);
        c.output().unwrap()
    };
    let denied = run(&weak);
    let ran = run(&user);
    moto.enforce_iam(false);

    assert!(!denied.status.success(), "{}", text(&denied));
    assert!(
        text(&denied).contains("AccessDenied") || text(&denied).contains("Access Denied"),
        "{}",
        text(&denied)
    );
    assert_eq!(ran.status.code(), Some(0), "{}", text(&ran));
    let report: Value = serde_json::from_slice(&ran.stdout).unwrap();
    assert_eq!(report["status"], "succeeded", "{report:#}");
    // Everything a run does happened: files archived, tables and the Glue catalog written, the
    // success notification (topic from the secret) published.
    assert!(moto.keys("lake", "data/raw").is_empty());
    assert_eq!(moto.keys("lake", "data/archive").len(), 6);
    assert!(!moto.keys("lake", "data/processed/app_logs").is_empty());
    assert!(!moto.partitions("analytics", "app_logs").is_empty());
    let local = Project::with_fixtures();
    let (_, lreport) = local.run();
    assert_eq!(
        report["tables"]["app_logs"]["rows_written"],
        lreport["tables"]["app_logs"]["rows_written"]
    );
    // The secret naming the success topic was read under the policy. The publish itself cannot
    // be judged here: moto re-encodes a query-protocol form body before checking its signature
    // and so rejects the SDK's correctly signed SNS request (SignatureDoesNotMatch, before any
    // authorization). Whatever else failed, nothing was denied.
    let all = text(&ran);
    assert!(
        !all.contains("AccessDenied") && !all.contains("Access Denied"),
        "{all}"
    );
    for e in report["errors"].as_array().unwrap() {
        let e = e.as_str().unwrap();
        assert!(
            e.contains("notification to [secret:sluice/notify#success]")
                && e.contains("SignatureDoesNotMatch"),
            "{e}"
        );
    }
}
