//! Shared AWS setup: one SDK config per process from the standard chain (environment, profile,
//! SSO, web identity, container and instance credentials; `AWS_REGION`; `AWS_ENDPOINT_URL` and
//! `AWS_ENDPOINT_URL_<SERVICE>`), rustls on ring for TLS, the `[timeouts]` of the config
//! (connect, each attempt, each operation with its retries), and the same credentials handed
//! to object_store for the S3 lake.

use std::sync::Arc;

use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_credential_types::provider::ProvideCredentials;
// The same error types in every SDK crate.
use aws_sdk_glue::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use aws_smithy_runtime_api::client::http::SharedHttpClient;
use object_store::aws::AwsCredential;
use tokio::sync::OnceCell;

use crate::error::{Error, Result};

static CONFIG: OnceCell<SdkConfig> = OnceCell::const_new();

/// The HTTP client of every AWS SDK client: hyper with rustls on ring.
pub fn http_client() -> SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https()
}

/// The process's AWS config, loaded once.
pub async fn config() -> &'static SdkConfig {
    CONFIG
        .get_or_init(|| async {
            let t = crate::timeout::get();
            aws_config::defaults(BehaviorVersion::latest())
                .http_client(http_client())
                .timeout_config(
                    TimeoutConfig::builder()
                        .connect_timeout(t.connect)
                        .operation_attempt_timeout(t.request)
                        .operation_timeout(t.operation)
                        .build(),
                )
                .load()
                .await
        })
        .await
}

/// The endpoint for a service from `AWS_ENDPOINT_URL_<SERVICE>` or `AWS_ENDPOINT_URL`, as the
/// SDKs read them (for clients outside the SDK, such as object_store's S3).
pub fn endpoint_url(service: &str) -> Option<String> {
    let specific = format!("AWS_ENDPOINT_URL_{}", service.to_ascii_uppercase());
    std::env::var(specific)
        .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
        .ok()
        .filter(|v| !v.is_empty())
}

/// An AWS error as one line: the service's code and message where it gave them.
pub fn describe<E>(e: &SdkError<E, aws_sdk_glue::config::http::HttpResponse>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match e {
        SdkError::ServiceError(s) => {
            let err = s.err();
            match (err.code(), err.message()) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                (Some(c), None) => c.to_string(),
                // An answer the SDK could not read: its status and the start of its body.
                _ => {
                    let raw = s.raw();
                    let body = raw
                        .body()
                        .bytes()
                        .map(|b| String::from_utf8_lossy(&b[..b.len().min(300)]).into_owned())
                        .unwrap_or_default();
                    format!(
                        "{err} (HTTP {}: {})",
                        raw.status().as_u16(),
                        body.split_whitespace().collect::<Vec<_>>().join(" ")
                    )
                }
            }
        }
        other => crate::error::chain(other),
    }
}

/// The service error code of an AWS error, if it is one.
pub fn code<E, R>(e: &SdkError<E, R>) -> Option<&str>
where
    E: ProvideErrorMetadata,
{
    match e {
        SdkError::ServiceError(s) => s.err().code(),
        _ => None,
    }
}

/// Hands the SDK's credentials (refreshed as they expire) to object_store.
#[derive(Debug)]
pub struct S3Credentials;

#[async_trait::async_trait]
impl object_store::CredentialProvider for S3Credentials {
    type Credential = AwsCredential;

    async fn get_credential(&self) -> object_store::Result<Arc<AwsCredential>> {
        let provider =
            config()
                .await
                .credentials_provider()
                .ok_or_else(|| object_store::Error::Generic {
                    store: "S3",
                    source: "no AWS credentials found in the standard chain".into(),
                })?;
        let creds =
            provider
                .provide_credentials()
                .await
                .map_err(|e| object_store::Error::Generic {
                    store: "S3",
                    source: Box::new(e),
                })?;
        Ok(Arc::new(AwsCredential {
            key_id: creds.access_key_id().to_string(),
            secret_key: creds.secret_access_key().to_string(),
            token: creds.session_token().map(str::to_string),
        }))
    }
}

/// The region of the SDK config, or an error saying how to set one.
pub async fn region() -> Result<String> {
    config()
        .await
        .region()
        .map(|r| r.to_string())
        .ok_or_else(|| Error::Aws {
            service: "config".into(),
            message: "no AWS region: set AWS_REGION or a profile's region".into(),
        })
}
