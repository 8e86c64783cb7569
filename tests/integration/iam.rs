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
