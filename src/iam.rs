//! `sluice iam-policy`: the least-privilege IAM policy for a config, per role: `lambda` and
//! `ecs` (the pipeline: everything a run, `watch` and the warehouse load do) and `reader` (Spectrum,
//! Athena or a notebook reading the tables).
//!
//! [`OPERATIONS`] is the one list of AWS operations sluice's code calls through the SDK, with the
//! IAM action each needs; a test holds the source to it. S3 goes through object_store: its
//! requests (GET, HEAD, PUT, multipart, COPY, DELETE, DeleteObjects, LIST) need `s3:GetObject`,
//! `s3:PutObject`, `s3:AbortMultipartUpload`, `s3:DeleteObject` and `s3:ListBucket`, each granted
//! only on the lake prefixes that see it.

use serde_json::{Value, json};

use crate::config::{CatalogKind, Config, WarehouseKind};
use crate::error::{Error, Result};

/// Every AWS SDK operation the code calls: (SDK crate, fluent method, IAM action).
pub const OPERATIONS: &[(&str, &str, &str)] = &[
    ("glue", "create_database", "glue:CreateDatabase"),
    ("glue", "get_table", "glue:GetTable"),
    ("glue", "create_table", "glue:CreateTable"),
    ("glue", "update_table", "glue:UpdateTable"),
    ("glue", "get_partitions", "glue:GetPartitions"),
    (
        "glue",
        "batch_create_partition",
        "glue:BatchCreatePartition",
    ),
    (
        "glue",
        "batch_delete_partition",
        "glue:BatchDeletePartition",
    ),
    ("sns", "publish", "sns:Publish"),
    (
        "secretsmanager",
        "get_secret_value",
        "secretsmanager:GetSecretValue",
    ),
    (
        "redshiftdata",
        "execute_statement",
        "redshift-data:ExecuteStatement",
    ),
    (
        "redshiftdata",
        "describe_statement",
        "redshift-data:DescribeStatement",
    ),
    ("sqs", "send_message_batch", "sqs:SendMessage"),
    ("sqs", "receive_message", "sqs:ReceiveMessage"),
    // SQS authorizes a batch call by its single action.
    ("sqs", "delete_message_batch", "sqs:DeleteMessage"),
    (
        "sqs",
        "change_message_visibility_batch",
        "sqs:ChangeMessageVisibility",
    ),
];

/// The action of `sluice enqueue` only: not in the function's role.
pub const ENQUEUE: &str = "sqs:SendMessage";

/// Who the policy is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// The pipeline as a Lambda function (S3 or SQS events, schedules), with its log group.
    Lambda,
    /// The pipeline as an ECS task (`sluice watch --queue` or `--schedule`).
    Ecs,
    /// Readers of the tables (Spectrum, Athena): the tables' folders and the Glue catalog.
    Reader,
}

/// Where the policy applies: the region and account of ARNs (`*` when not given) and the SQS
/// queue the workers read.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// AWS region, e.g. `eu-west-1`.
    pub region: Option<String>,
    /// AWS account id.
    pub account: Option<String>,
    /// The queue's ARN (`sluice watch --queue`, the Lambda's SQS trigger).
    pub queue_arn: Option<String>,
}

/// The lake's folders: (folder, object actions the pipeline needs there).
const PIPELINE_PREFIXES: &[(&str, &[&str])] = &[
    // Read, then moved away (archived or failed): a copy, then a delete.
    ("raw", &["s3:GetObject", "s3:DeleteObject"]),
    // Copied into at a commit; read back by `sluice reprocess`.
    (
        "archive",
        &["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"],
    ),
    // Files that failed `max_attempts` times and their `.error.json`.
    (
        "failed",
        &[
            "s3:GetObject",
            "s3:PutObject",
            "s3:DeleteObject",
            "s3:AbortMultipartUpload",
        ],
    ),
    (
        "processed",
        &[
            "s3:GetObject",
            "s3:PutObject",
            "s3:DeleteObject",
            "s3:AbortMultipartUpload",
        ],
    ),
    (
        "rejected",
        &[
            "s3:GetObject",
            "s3:PutObject",
            "s3:DeleteObject",
            "s3:AbortMultipartUpload",
        ],
    ),
    (
        "warehouse",
        &[
            "s3:GetObject",
            "s3:PutObject",
            "s3:DeleteObject",
            "s3:AbortMultipartUpload",
        ],
    ),
    (
        "_sluice",
        &[
            "s3:GetObject",
            "s3:PutObject",
            "s3:DeleteObject",
            "s3:AbortMultipartUpload",
        ],
    ),
];

const READER_PREFIXES: &[&str] = &["processed", "rejected", "warehouse"];

/// The bucket and key prefix of an `s3://bucket/prefix` lake root.
fn bucket_of(root: &str) -> Option<(String, String)> {
    let rest = root.strip_prefix("s3://")?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    Some((bucket.to_string(), prefix.trim_matches('/').to_string()))
}

/// The policy document for `role`.
pub fn policy(config: &Config, role: Role, scope: &Scope) -> Result<Value> {
    let region = scope.region.as_deref().unwrap_or("*");
    let account = scope.account.as_deref().unwrap_or("*");
    let (bucket, prefix) = bucket_of(&config.lake_root()).ok_or_else(|| {
        Error::config(
            &config.path,
            format!(
                "iam-policy is for a lake on S3 (lake.root = \"s3://bucket/prefix\"), not {}",
                config.lake_root()
            ),
        )
    })?;
    let key = |folder: &str| match prefix.as_str() {
        "" => format!("{folder}/"),
        p => format!("{p}/{folder}/"),
    };
    let mut statements = Vec::new();
    let folders: Vec<(&str, Vec<&str>)> = match role {
        Role::Reader => READER_PREFIXES
            .iter()
            .map(|f| (*f, vec!["s3:GetObject"]))
            .collect(),
        _ => PIPELINE_PREFIXES
            .iter()
            .map(|(f, a)| (*f, a.to_vec()))
            .collect(),
    };
    // Folders with the same actions share a statement.
    let mut groups: Vec<(Vec<&str>, Vec<String>)> = Vec::new();
    for (folder, actions) in &folders {
        let arn = format!("arn:aws:s3:::{bucket}/{}*", key(folder));
        match groups.iter_mut().find(|(a, _)| a == actions) {
            Some((_, arns)) => arns.push(arn),
            None => groups.push((actions.clone(), vec![arn])),
        }
    }
    for (i, (actions, arns)) in groups.into_iter().enumerate() {
        statements.push(json!({
            "Sid": format!("LakeObjects{}", i + 1),
            "Effect": "Allow",
            "Action": actions,
            "Resource": arns,
        }));
    }
    let listed: Vec<String> = folders
        .iter()
        .flat_map(|(f, _)| {
            [
                format!("{}*", key(f)),
                key(f).trim_end_matches('/').to_string(),
            ]
        })
        .collect();
    statements.push(json!({
        "Sid": "LakeListing",
        "Effect": "Allow",
        "Action": ["s3:ListBucket"],
        "Resource": [format!("arn:aws:s3:::{bucket}")],
        "Condition": {"StringLike": {"s3:prefix": listed}},
    }));
    let glue_db = (config.catalog.kind == CatalogKind::Glue)
        .then(|| config.catalog.database.clone())
        .flatten();
    if let Some(db) = &glue_db {
        let actions: Vec<&str> = match role {
            Role::Reader => vec![
                "glue:GetDatabase",
                "glue:GetTable",
                "glue:GetTables",
                "glue:GetPartition",
                "glue:GetPartitions",
                "glue:BatchGetPartition",
            ],
            _ => OPERATIONS
                .iter()
                .filter(|(s, _, _)| *s == "glue")
                .map(|(_, _, a)| *a)
                .collect(),
        };
        statements.push(json!({
            "Sid": "GlueCatalog",
            "Effect": "Allow",
            "Action": actions,
            "Resource": [
                format!("arn:aws:glue:{region}:{account}:catalog"),
                format!("arn:aws:glue:{region}:{account}:database/{db}"),
                format!("arn:aws:glue:{region}:{account}:table/{db}/*"),
            ],
        }));
    }
    if role == Role::Reader {
        return Ok(document(statements));
    }
    // Notifications.
    let mut topics: Vec<String> = config
        .notify
        .on_success
        .iter()
        .chain(&config.notify.on_failure)
        .chain(config.notify.late_targets())
        .filter_map(|t| t.strip_prefix("sns:").map(str::to_string))
        .collect();
    // A target read from a secret may name any topic: the policy cannot know which.
    if config
        .notify
        .on_success
        .iter()
        .chain(&config.notify.on_failure)
        .chain(config.notify.late_targets())
        .any(|t| t.starts_with("secret:"))
    {
        topics.push(format!("arn:aws:sns:{region}:{account}:*"));
    }
    topics.sort();
    topics.dedup();
    if !topics.is_empty() {
        statements.push(json!({
            "Sid": "Notifications",
            "Effect": "Allow",
            "Action": ["sns:Publish"],
            "Resource": topics,
        }));
    }
    // Secrets: every `secret:` reference, and the Data API's secret.
    let mut secrets: Vec<String> = config
        .secret_references()
        .into_iter()
        .map(|r| {
            let id = r.split_once('#').map_or(r.as_str(), |(id, _)| id);
            if id.starts_with("arn:") {
                id.to_string()
            } else {
                // A name: its ARN ends with a dash and six random characters.
                format!("arn:aws:secretsmanager:{region}:{account}:secret:{id}-??????")
            }
        })
        .collect();
    let w = &config.warehouse;
    if w.kind == WarehouseKind::RedshiftData
        && let Some(arn) = &w.secret_arn
        && !arn.starts_with("secret:")
    {
        secrets.push(arn.clone());
    }
    secrets.sort();
    secrets.dedup();
    if !secrets.is_empty() {
        statements.push(json!({
            "Sid": "Secrets",
            "Effect": "Allow",
            "Action": ["secretsmanager:GetSecretValue"],
            "Resource": secrets,
        }));
    }
    // The Redshift Data API: statements on the workgroup or cluster, and reading their state.
    if w.kind == WarehouseKind::RedshiftData {
        let target = match (&w.workgroup_name, &w.cluster_identifier) {
            (Some(_), _) => format!("arn:aws:redshift-serverless:{region}:{account}:workgroup/*"),
            (None, Some(c)) => format!("arn:aws:redshift:{region}:{account}:cluster:{c}"),
            (None, None) => {
                return Err(Error::config(
                    &config.path,
                    "warehouse: redshift-data needs workgroup_name or cluster_identifier",
                ));
            }
        };
        statements.push(json!({
            "Sid": "RedshiftStatements",
            "Effect": "Allow",
            "Action": ["redshift-data:ExecuteStatement"],
            "Resource": [target],
        }));
        // Statement ids are not resources: the caller may only read its own statements.
        statements.push(json!({
            "Sid": "RedshiftStatementState",
            "Effect": "Allow",
            "Action": ["redshift-data:DescribeStatement"],
            "Resource": ["*"],
            "Condition": {"StringEquals": {"redshift-data:statement-owner-iam-userid": "${aws:userid}"}},
        }));
        if w.secret_arn.is_none() {
            match (&w.workgroup_name, &w.cluster_identifier, &w.db_user) {
                (Some(_), _, _) => statements.push(json!({
                    "Sid": "RedshiftCredentials",
                    "Effect": "Allow",
                    "Action": ["redshift-serverless:GetCredentials"],
                    "Resource": [format!("arn:aws:redshift-serverless:{region}:{account}:workgroup/*")],
                })),
                (None, Some(c), Some(user)) => statements.push(json!({
                    "Sid": "RedshiftCredentials",
                    "Effect": "Allow",
                    "Action": ["redshift:GetClusterCredentials"],
                    "Resource": [
                        format!("arn:aws:redshift:{region}:{account}:dbuser:{c}/{user}"),
                        format!("arn:aws:redshift:{region}:{account}:dbname:{c}/{}", w.database.as_deref().unwrap_or("*")),
                    ],
                })),
                _ => {}
            }
        }
    }
    // The queue of S3 events; `sqs:SendMessage` for `sluice enqueue` (a backfill run as an
    // ECS task with the pipeline's role; the function never sends).
    if let Some(queue) = &scope.queue_arn {
        let mut actions: Vec<&str> = OPERATIONS
            .iter()
            .filter(|(s, _, a)| *s == "sqs" && !(role == Role::Lambda && *a == ENQUEUE))
            .map(|(_, _, a)| *a)
            .collect();
        // Lambda's event source mapping reads the queue's attributes too.
        actions.push("sqs:GetQueueAttributes");
        statements.push(json!({
            "Sid": "EventQueue",
            "Effect": "Allow",
            "Action": actions,
            "Resource": [queue],
        }));
    }
    if role == Role::Lambda {
        statements.push(json!({
            "Sid": "Logs",
            "Effect": "Allow",
            "Action": ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"],
            "Resource": [format!("arn:aws:logs:{region}:{account}:log-group:/aws/lambda/*")],
        }));
    }
    Ok(document(statements))
}

fn document(statements: Vec<Value>) -> Value {
    json!({"Version": "2012-10-17", "Statement": statements})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every SDK call in the source is in [`OPERATIONS`], and every entry is called: a new
    /// call without its IAM action fails here.
    #[test]
    fn operations_list_every_sdk_call_in_the_source() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut text = String::new();
        let mut stack = vec![src];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") && !p.ends_with("iam.rs") {
                    text.push_str(&std::fs::read_to_string(&p).unwrap());
                    text.push('\n');
                }
            }
        }
        // The operations of the SDK crates sluice uses: their `src/operation/<name>/` folders
        // in cargo's registry.
        let home = std::env::var_os("CARGO_HOME")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::PathBuf::from(env!("HOME")).join(".cargo"));
        let mut sdk_ops = std::collections::BTreeSet::new();
        for index in std::fs::read_dir(home.join("registry/src")).unwrap() {
            for krate in std::fs::read_dir(index.unwrap().path()).unwrap() {
                let krate = krate.unwrap().path();
                let name = krate.file_name().unwrap().to_string_lossy().into_owned();
                let used = ["glue", "sns", "sqs", "secretsmanager", "redshiftdata"]
                    .iter()
                    .any(|s| name.starts_with(&format!("aws-sdk-{s}-")));
                if !used {
                    continue;
                }
                for op in std::fs::read_dir(krate.join("src/operation")).unwrap() {
                    let op = op.unwrap();
                    if op.path().is_dir() {
                        sdk_ops.insert(op.file_name().to_string_lossy().into_owned());
                    }
                }
            }
        }
        assert!(sdk_ops.contains("get_table") && sdk_ops.contains("publish"));
        // A call: `.<operation>()` (the fluent builder takes its arguments by setters).
        let mut called = std::collections::BTreeSet::new();
        for l in text.lines() {
            for (at, _) in l.match_indices('.') {
                let rest = &l[at + 1..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if rest[name.len()..].starts_with("()") && sdk_ops.contains(&name) {
                    called.insert(name);
                }
            }
        }
        let listed: std::collections::BTreeSet<String> =
            OPERATIONS.iter().map(|(_, m, _)| m.to_string()).collect();
        assert_eq!(called, listed, "SDK calls in src/ vs iam::OPERATIONS");
    }

    #[test]
    fn folders_get_only_the_actions_they_need() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.toml");
        std::fs::write(
            &path,
            "[lake]\nroot = \"s3://bkt/lake\"\n[catalog]\nkind = \"glue\"\ndatabase = \"db\"\n\
             [notify]\non_failure = [\"sns:arn:aws:sns:eu-west-1:1:alerts\"]\n",
        )
        .unwrap();
        let config = Config::load(&path).unwrap();
        let p = policy(&config, Role::Reader, &Scope::default()).unwrap();
        let text = p.to_string();
        assert!(
            !text.contains("PutObject") && !text.contains("DeleteObject"),
            "{text}"
        );
        assert!(
            !text.contains("lake/raw/") && !text.contains("_sluice"),
            "{text}"
        );
        assert!(!text.contains("sns:Publish"), "{text}");
        let p = policy(&config, Role::Ecs, &Scope::default()).unwrap();
        let s = p["Statement"].as_array().unwrap();
        let raw = s
            .iter()
            .find(|st| st["Resource"].to_string().contains("bkt/lake/raw/*"))
            .unwrap();
        assert_eq!(raw["Action"], json!(["s3:GetObject", "s3:DeleteObject"]));
        assert!(p.to_string().contains("arn:aws:sns:eu-west-1:1:alerts"));
        assert!(p.to_string().contains("glue:BatchCreatePartition"));
    }
}
