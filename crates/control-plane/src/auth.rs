//! API-key authentication for the REST API.
//!
//! The E2B SDK sends the key in `X-API-Key` and, from version 2.45.1 on, rejects keys that
//! are not `e2b_` followed by 40 hexadecimal digits before sending anything, so Hearth
//! issues keys of exactly that form.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::ControlPlane;

/// Header that carries the API key.
pub const API_KEY_HEADER: &str = "x-api-key";

/// Prefix of every API key.
pub const API_KEY_PREFIX: &str = "e2b_";

/// Number of hexadecimal digits after the prefix.
const API_KEY_HEX_LEN: usize = 40;

/// Generates a new random API key: `e2b_` and 40 lowercase hexadecimal digits (160 bits).
pub fn generate_api_key() -> String {
    let mut bytes = [0u8; API_KEY_HEX_LEN / 2];
    rand::rng().fill_bytes(&mut bytes);
    format!("{API_KEY_PREFIX}{}", hex::encode(bytes))
}

/// Checks that `key` has the form the SDK accepts.
pub fn is_valid_api_key_format(key: &str) -> bool {
    key.strip_prefix(API_KEY_PREFIX).is_some_and(|digits| {
        digits.len() == API_KEY_HEX_LEN && digits.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

/// Returns the lowercase hex SHA-256 of the whole key, as stored in the `api_keys` table.
pub fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Middleware that rejects requests without a known API key with 401.
pub(crate) async fn require_api_key(
    State(control_plane): State<ControlPlane>,
    request: Request,
    next: Next,
) -> Response {
    let Some(header) = request.headers().get(API_KEY_HEADER) else {
        return ApiError::unauthorized("missing API key: send it in the X-API-Key header")
            .into_response();
    };
    let Ok(key) = header.to_str() else {
        return ApiError::unauthorized("invalid API key: the X-API-Key header is not ASCII")
            .into_response();
    };
    if !is_valid_api_key_format(key) {
        return ApiError::unauthorized(
            "invalid API key: expected \"e2b_\" followed by 40 hexadecimal digits",
        )
        .into_response();
    }

    match control_plane.is_known_api_key(key).await {
        Ok(true) => next.run(request).await,
        Ok(false) => ApiError::unauthorized("invalid API key: no such key").into_response(),
        Err(err) => ApiError::internal("failed to check the API key", &err).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_has_sdk_format() {
        let key = generate_api_key();
        assert!(is_valid_api_key_format(&key), "{key}");
    }

    #[test]
    fn format_rejects_wrong_prefix_and_length() {
        assert!(!is_valid_api_key_format(&format!("sk_{}", "a".repeat(40))));
        assert!(!is_valid_api_key_format(&format!("e2b_{}", "a".repeat(39))));
        assert!(!is_valid_api_key_format(&format!("e2b_{}", "a".repeat(41))));
        assert!(!is_valid_api_key_format(&format!("e2b_{}", "g".repeat(40))));
    }

    #[test]
    fn hash_is_sha256_hex() {
        assert_eq!(
            hash_api_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
