//! `secret:<name or arn>[#<json key>]` config values, resolved through AWS Secrets Manager.
//!
//! Each secret is fetched once a process. Every resolved value is registered with
//! [`crate::redact`], which masks it in every output.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::error::{Error, Result};

/// Values already fetched, by secret id.
static FETCHED: Mutex<Option<HashMap<String, String>>> = Mutex::new(None);

fn with_fetched<T>(f: impl FnOnce(&mut HashMap<String, String>) -> T) -> T {
    let mut guard = FETCHED.lock().unwrap_or_else(|e| e.into_inner());
    f(guard.get_or_insert_with(HashMap::new))
}

fn fail(reference: &str, message: impl std::fmt::Display) -> Error {
    Error::Aws {
        service: "secretsmanager".into(),
        message: format!("secret:{reference}: {message}"),
    }
}

/// The value of a reference (`name`, `arn`, either with `#key` to take one field of a JSON
/// secret).
pub async fn fetch(reference: &str) -> Result<String> {
    let (id, key) = match reference.split_once('#') {
        Some((id, key)) => (id, Some(key)),
        None => (reference, None),
    };
    let cached = with_fetched(|k| k.get(id).cloned());
    let text = match cached {
        Some(t) => t,
        None => {
            let client = aws_sdk_secretsmanager::Client::new(crate::aws::config().await);
            let out = client
                .get_secret_value()
                .secret_id(id)
                .send()
                .await
                .map_err(|e| fail(reference, crate::aws::describe(&e)))?;
            let text = match (out.secret_string(), out.secret_binary()) {
                (Some(s), _) => s.to_string(),
                (None, Some(b)) => String::from_utf8(b.as_ref().to_vec())
                    .map_err(|_| fail(reference, "the binary secret is not UTF-8 text"))?,
                (None, None) => return Err(fail(reference, "the secret has no value")),
            };
            // Masked from here on, in case something quotes the secret whole.
            crate::redact::secret(&text, id);
            with_fetched(|k| k.insert(id.to_string(), text.clone()));
            text
        }
    };
    let value = match key {
        None => text,
        Some(key) => {
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|_| fail(reference, "the secret is not a JSON object"))?;
            match json.get(key) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Null) | None => {
                    return Err(fail(reference, format!("the secret has no key \"{key}\"")));
                }
                Some(other) => other.to_string(),
            }
        }
    };
    remember(&value, reference);
    Ok(value)
}

/// Marks `value` as secret: [`redact`] replaces it with `[secret:<reference>]`.
pub fn remember(value: &str, reference: &str) {
    crate::redact::secret(value, reference);
}

/// `text` with every registered sensitive value masked ([`crate::redact::mask`]).
pub fn redact(text: &str) -> String {
    crate::redact::mask(text).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_values_are_redacted() {
        remember("hunter2-token", "prod/hook#token");
        assert_eq!(
            redact("POST https://x/hunter2-token failed"),
            "POST https://x/[secret:prod/hook#token] failed"
        );
        assert_eq!(redact("nothing here"), "nothing here");
    }
}
