//! Amazon Redshift through the Data API: `ExecuteStatement` with a client token and a
//! statement name, then `DescribeStatement` polled with backoff until the statement ends or the
//! deadline passes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aws_sdk_redshiftdata::Client;
use aws_sdk_redshiftdata::types::{SqlParameter, StatusString};

use crate::config::WarehouseConfig;
use crate::error::{Error, Result};

/// A Redshift database reached through the Data API.
#[derive(Debug, Clone)]
pub struct RedshiftData {
    client: Client,
    config: WarehouseConfig,
}

/// How a statement ended.
#[derive(Debug)]
pub enum Ended {
    /// It finished: seconds Redshift spent and rows it affected.
    Finished { seconds: f64, rows: Option<i64> },
    /// It failed with Redshift's error text.
    Failed(String),
    /// Someone cancelled it.
    Aborted(String),
    /// Still running at the deadline.
    Running,
}

fn fail(message: impl Into<String>) -> Error {
    Error::Aws {
        service: "redshift-data".into(),
        message: message.into(),
    }
}

impl RedshiftData {
    /// A client for the configured workgroup or cluster.
    pub async fn new(config: &WarehouseConfig) -> RedshiftData {
        RedshiftData {
            client: Client::new(crate::aws::config().await),
            config: config.clone(),
        }
    }

    /// Sends one statement with its named parameters; returns the statement id. The same
    /// `token` returns the same statement: a retried submit never runs it twice.
    pub async fn submit(
        &self,
        sql: &str,
        params: &BTreeMap<String, String>,
        name: &str,
        token: &str,
    ) -> Result<String> {
        let c = &self.config;
        let mut req = self
            .client
            .execute_statement()
            .sql(sql)
            .set_workgroup_name(c.workgroup_name.clone())
            .set_cluster_identifier(c.cluster_identifier.clone())
            .set_database(c.database.clone())
            .set_secret_arn(c.secret_arn.clone())
            .set_db_user(c.db_user.clone())
            .statement_name(name)
            .client_token(token);
        for n in super::sql::parameter_names(sql) {
            let value = params
                .get(&n)
                .ok_or_else(|| fail(format!("the statement uses :{n}, which has no value")))?;
            let p = SqlParameter::builder()
                .name(&n)
                .value(value)
                .build()
                .map_err(|e| fail(e.to_string()))?;
            req = req.parameters(p);
        }
        let out = req
            .send()
            .await
            .map_err(|e| fail(format!("ExecuteStatement: {}", crate::aws::describe(&e))))?;
        out.id
            .ok_or_else(|| fail("ExecuteStatement returned no statement id"))
    }

    /// Polls a statement until it ends or `deadline` passes, backing off from 100 ms to 5 s.
    pub async fn wait(&self, id: &str, deadline: Duration) -> Result<Ended> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            let d = self
                .client
                .describe_statement()
                .id(id)
                .send()
                .await
                .map_err(|e| {
                    fail(format!(
                        "DescribeStatement {id}: {}",
                        crate::aws::describe(&e)
                    ))
                })?;
            match d.status() {
                Some(StatusString::Finished) => {
                    return Ok(Ended::Finished {
                        seconds: d.duration().max(0) as f64 / 1e9,
                        rows: (d.result_rows() >= 0).then_some(d.result_rows()),
                    });
                }
                Some(StatusString::Failed) => {
                    return Ok(Ended::Failed(
                        d.error()
                            .unwrap_or("failed without an error message")
                            .to_string(),
                    ));
                }
                Some(StatusString::Aborted) => {
                    return Ok(Ended::Aborted(
                        d.error()
                            .unwrap_or("the statement was cancelled")
                            .to_string(),
                    ));
                }
                _ => {}
            }
            if start.elapsed() + pause > deadline {
                return Ok(Ended::Running);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 3 / 2).min(Duration::from_secs(5));
        }
    }
}
