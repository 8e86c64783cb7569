//! Deployment: `deploy/template.yaml` passes cfn-lint (a linter nobody here wrote, installed by
//! `.ci/run`) and grants the function exactly `sluice iam-policy --role lambda` for
//! `deploy/sluice.toml`; `deploy/dist.sh` packages a Lambda zip whose config validates; the
//! Dockerfile builds where a container engine runs.

use std::process::Command;

use serde_json::Value;

use crate::iam::lint_bin;
use crate::support::*;

/// The template as JSON (cfn-lint's own YAML loader, which knows `!Sub` and the other tags).
fn template() -> Value {
    let out = Command::new(lint_bin("python"))
        .args([
            "-c",
            "import json, sys\nfrom cfnlint.decode import decode\nt, m = decode(sys.argv[1])\n\
             assert not m, m\nprint(json.dumps(t))",
        ])
        .arg(repo().join("deploy/template.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `{"Fn::Sub": s}` as `s`, everywhere.
fn unsub(v: &Value) -> Value {
    match v {
        Value::Object(m) if m.len() == 1 && m.contains_key("Fn::Sub") => m["Fn::Sub"].clone(),
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), unsub(v))).collect()),
        Value::Array(a) => Value::Array(a.iter().map(unsub).collect()),
        other => other.clone(),
    }
}

#[test]
fn the_template_passes_cfn_lint_and_grants_the_generated_policy() {
    let out = Command::new(lint_bin("cfn-lint"))
        .arg(repo().join("deploy/template.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "cfn-lint: {}", text(&out));
    // Negative control: cfn-lint does catch a broken template.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yaml");
    let body = std::fs::read_to_string(repo().join("deploy/template.yaml")).unwrap();
    std::fs::write(
        &broken,
        body.replace("Runtime: provided.al2023", "Runtime: provided.al1999"),
    )
    .unwrap();
    let out = Command::new(lint_bin("cfn-lint"))
        .arg(&broken)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "cfn-lint found nothing wrong with {}",
        broken.display()
    );

    // The function's policy is the generated one, with the stack's names substituted.
    let t = template();
    let granted =
        unsub(&t["Resources"]["FunctionRole"]["Properties"]["Policies"][0]["PolicyDocument"]);
    let out = Command::new(binary())
        .arg("--config")
        .arg(repo().join("deploy/sluice.toml"))
        .args([
            "iam-policy",
            "--role",
            "lambda",
            "--region",
            "${AWS::Region}",
            "--account",
            "${AWS::AccountId}",
            "--queue-arn",
            "${EventQueue.Arn}",
        ])
        .env("SLUICE_LAKE_ROOT", "s3://${LakeBucket}/lake")
        .env("SLUICE_GLUE_DATABASE", "${GlueDatabase}")
        .env(
            "SLUICE_ALERTS",
            "sns:arn:aws:sns:${AWS::Region}:${AWS::AccountId}:${AlertsTopic.TopicName}",
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let generated: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        granted, generated,
        "deploy/template.yaml's FunctionRole policy differs from `sluice iam-policy --role lambda` \
         for deploy/sluice.toml: paste the new one in"
    );
    // The function gets the environment the config reads, and the queue and the schedule invoke it.
    let env = &t["Resources"]["Function"]["Properties"]["Environment"]["Variables"];
    for var in ["SLUICE_LAKE_ROOT", "SLUICE_GLUE_DATABASE", "SLUICE_ALERTS"] {
        assert!(env.get(var).is_some(), "{var}");
    }
    assert_eq!(
        t["Resources"]["QueueTrigger"]["Type"],
        "AWS::Lambda::EventSourceMapping"
    );
    assert_eq!(t["Resources"]["ScheduleRule"]["Type"], "AWS::Events::Rule");
    assert!(t["Resources"]["EventQueue"]["Properties"]["RedrivePolicy"].is_object());
}

#[test]
fn dist_packages_a_lambda_zip_whose_config_validates() {
    let dir = tempfile::tempdir().unwrap();
    let zip = dir.path().join("lambda.zip");
    let out = Command::new("bash")
        .arg(repo().join("deploy/dist.sh"))
        .arg(&zip)
        .env("SLUICE_BIN", binary())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // Unpacked as Lambda does: bootstrap executable, the config beside its queries and schemas.
    let task = dir.path().join("task");
    let unzip = Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile, os\nz = zipfile.ZipFile(sys.argv[1])\nfor i in z.infolist():\n    p = z.extract(i, sys.argv[2])\n    os.chmod(p, (i.external_attr >> 16) & 0o777)",
        ])
        .arg(&zip)
        .arg(&task)
        .output()
        .unwrap();
    assert!(unzip.status.success(), "{}", text(&unzip));
    let out = Command::new(task.join("bootstrap"))
        .arg("--config")
        .arg(task.join("sluice.toml"))
        .arg("validate")
        .env("SLUICE_LAKE_ROOT", "s3://lake-bucket/lake")
        .env("SLUICE_GLUE_DATABASE", "analytics")
        .env(
            "SLUICE_ALERTS",
            "sns:arn:aws:sns:eu-west-1:123456789012:alerts",
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("support_tickets"), "{}", text(&out));
}

#[test]
fn the_dockerfile_builds_where_a_container_engine_runs() {
    let docker = Command::new("docker").args(["info"]).output();
    if !docker.is_ok_and(|o| o.status.success()) {
        eprintln!("no container engine running here: the Dockerfile is not built");
        return;
    }
    let out = Command::new("docker")
        .args(["build", "-q", "-t", "sluice-test", "."])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = Command::new("docker")
        .args(["run", "--rm", "sluice-test", "--version"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}
