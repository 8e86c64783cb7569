//! `secret:<name or arn>[#<json key>]` config values, resolved through AWS Secrets Manager.
//!
//! Each secret is fetched once a process. Resolved values are kept only so that
//! [`redact`] can take them out of any message before it is logged or reported.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::error::{Error, Result};

/// Values already fetched (by secret id) and the values to redact (with their reference).
struct Known {
    fetched: HashMap<String, String>,
    redact: Vec<(String, String)>,
}

static KNOWN: Mutex<Option<Known>> = Mutex::new(None);

fn with_known<T>(f: impl FnOnce(&mut Known) -> T) -> T {
    let mut guard = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    let known = guard.get_or_insert_with(|| Known {
        fetched: HashMap::new(),
        redact: Vec::new(),
    });
    f(known)
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
    let cached = with_known(|k| k.fetched.get(id).cloned());
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
            with_known(|k| k.fetched.insert(id.to_string(), text.clone()));
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

/// Marks `value` as secret: [`redact`] replaces it with `secret:<reference>`.
pub fn remember(value: &str, reference: &str) {
    if value.len() >= 4 {
        with_known(|k| {
            k.redact
                .push((value.to_string(), format!("secret:{reference}")))
        });
    }
}

/// `text` with every resolved secret value replaced by its reference.
pub fn redact(text: &str) -> String {
    with_known(|k| {
        let mut out = text.to_string();
        for (value, reference) in &k.redact {
            if out.contains(value.as_str()) {
                out = out.replace(value.as_str(), reference);
            }
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_values_are_redacted() {
        remember("hunter2-token", "prod/hook#token");
        assert_eq!(
            redact("POST https://x/hunter2-token failed"),
            "POST https://x/secret:prod/hook#token failed"
        );
        assert_eq!(redact("nothing here"), "nothing here");
    }
}
