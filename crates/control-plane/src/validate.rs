//! Checks of request values that serde's types alone cannot express.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use crate::error::ApiError;

/// Maximum number of metadata entries on one sandbox.
const MAX_METADATA_ENTRIES: usize = 64;
/// Maximum length in bytes of a metadata key.
const MAX_METADATA_KEY_LEN: usize = 256;
/// Maximum length in bytes of a metadata value.
const MAX_METADATA_VALUE_LEN: usize = 4096;
/// Maximum number of environment variables on one sandbox.
const MAX_ENV_VARS: usize = 256;
/// Maximum length in bytes of one environment variable value.
const MAX_ENV_VALUE_LEN: usize = 128 * 1024;

/// Checks a timeout in seconds against `1..=max`.
pub(crate) fn timeout_secs(field: &str, value: i64, max: Duration) -> Result<Duration, ApiError> {
    let max_secs = max.as_secs();
    match u64::try_from(value) {
        Ok(secs) if (1..=max_secs).contains(&secs) => Ok(Duration::from_secs(secs)),
        _ => Err(ApiError::bad_request(format!(
            "invalid {field} {value}: expected 1 to {max_secs} seconds"
        ))),
    }
}

/// Parses the `metadata` object of a create request: string keys to string values.
pub(crate) fn metadata(value: Option<Value>) -> Result<BTreeMap<String, String>, ApiError> {
    let map = string_map("metadata", value)?;
    if map.len() > MAX_METADATA_ENTRIES {
        return Err(ApiError::bad_request(format!(
            "invalid metadata: {} entries, at most {MAX_METADATA_ENTRIES} allowed",
            map.len()
        )));
    }
    for (key, value) in &map {
        if key.is_empty() || key.len() > MAX_METADATA_KEY_LEN {
            return Err(ApiError::bad_request(format!(
                "invalid metadata key {key:?}: expected 1 to {MAX_METADATA_KEY_LEN} bytes"
            )));
        }
        if value.len() > MAX_METADATA_VALUE_LEN {
            return Err(ApiError::bad_request(format!(
                "invalid metadata value for key {key:?}: longer than {MAX_METADATA_VALUE_LEN} bytes"
            )));
        }
    }
    Ok(map)
}

/// Parses the `envVars` object of a create request.
pub(crate) fn env_vars(value: Option<Value>) -> Result<BTreeMap<String, String>, ApiError> {
    let map = string_map("envVars", value)?;
    if map.len() > MAX_ENV_VARS {
        return Err(ApiError::bad_request(format!(
            "invalid envVars: {} entries, at most {MAX_ENV_VARS} allowed",
            map.len()
        )));
    }
    for (name, value) in &map {
        if !is_env_var_name(name) {
            return Err(ApiError::bad_request(format!(
                "invalid envVars name {name:?}: expected a letter or underscore followed by letters, digits or underscores"
            )));
        }
        if value.len() > MAX_ENV_VALUE_LEN || value.contains('\0') {
            return Err(ApiError::bad_request(format!(
                "invalid envVars value for {name:?}: longer than {MAX_ENV_VALUE_LEN} bytes or contains a NUL byte"
            )));
        }
    }
    Ok(map)
}

fn is_env_var_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Reads a JSON object whose values must all be strings; null or absent is empty.
fn string_map(field: &str, value: Option<Value>) -> Result<BTreeMap<String, String>, ApiError> {
    let object = match value {
        None | Some(Value::Null) => return Ok(BTreeMap::new()),
        Some(Value::Object(object)) => object,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "invalid {field}: expected an object of strings, got {}",
                json_type(&other)
            )))
        }
    };
    object
        .into_iter()
        .map(|(key, value)| match value {
            Value::String(text) => Ok((key, text)),
            other => Err(ApiError::bad_request(format!(
                "invalid {field} value for key {key:?}: expected a string, got {}",
                json_type(&other)
            ))),
        })
        .collect()
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses the SDK's metadata filter: `key=value` pairs joined by `&` and URL-encoded as a
/// form, where each key and value was percent-encoded once before (e2b 2.63.0 does
/// `urlencode({quote(k): quote(v)})`), so both layers are decoded here.
pub(crate) fn metadata_filter(raw: Option<&str>) -> Result<BTreeMap<String, String>, ApiError> {
    let Some(raw) = raw.filter(|raw| !raw.is_empty()) else {
        return Ok(BTreeMap::new());
    };
    let mut filter = BTreeMap::new();
    for (key, value) in form_urlencoded::parse(raw.as_bytes()) {
        let key = percent_decode(&key)?;
        let value = percent_decode(&value)?;
        if key.is_empty() {
            return Err(ApiError::bad_request(format!(
                "invalid metadata filter {raw:?}: expected key=value pairs joined by '&'"
            )));
        }
        filter.insert(key, value);
    }
    Ok(filter)
}

fn percent_decode(text: &str) -> Result<String, ApiError> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| {
            ApiError::bad_request(format!(
                "invalid metadata filter: {text:?} is not UTF-8 once decoded"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn timeout_bounds() {
        let max = Duration::from_secs(3600);
        assert!(timeout_secs("timeout", 0, max).is_err());
        assert!(timeout_secs("timeout", -5, max).is_err());
        assert!(timeout_secs("timeout", 3601, max).is_err());
        assert_eq!(timeout_secs("timeout", 3600, max).unwrap(), max);
    }

    #[test]
    fn metadata_rejects_non_string_value() {
        let err = metadata(Some(json!({"a": 1}))).unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::BAD_REQUEST);
    }

    #[test]
    fn metadata_rejects_array() {
        assert!(metadata(Some(json!(["a"]))).is_err());
    }

    #[test]
    fn env_var_name_rules() {
        assert!(env_vars(Some(json!({"PATH_2": "x"}))).is_ok());
        assert!(env_vars(Some(json!({"2PATH": "x"}))).is_err());
        assert!(env_vars(Some(json!({"A-B": "x"}))).is_err());
    }

    #[test]
    fn metadata_filter_decodes_both_layers() {
        // What the SDK sends for {"user name": "a&b=c"} after the query string is decoded once.
        let filter = metadata_filter(Some("user%2520name=a%2526b%253Dc&k=v")).unwrap();
        assert_eq!(filter.get("user name").map(String::as_str), Some("a&b=c"));
        assert_eq!(filter.get("k").map(String::as_str), Some("v"));
    }
}
