//! `GET /files` downloads and `POST /files` uploads, streamed between the socket and disk
//! in fixed-size chunks, and the checks of signed file URLs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_compression::tokio::bufread::GzipDecoder;
use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Query, Request, State};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use futures::{Stream, TryStreamExt};
use http::{header, HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWriteExt, BufReader};
use tokio_util::io::{ReaderStream, StreamReader};

use crate::filesystem::entry::{create_dirs_owned, write_metadata};
use crate::filesystem::chown_new;
use crate::state::{resolve_path, AppState};
use crate::users::User;

/// Prefix of upload headers that carry user metadata for the written files.
const METADATA_HEADER_PREFIX: &str = "x-metadata-";

/// Chunk size of downloads.
const DOWNLOAD_CHUNK_BYTES: usize = 1024 * 1024;

/// Query parameters of `/files`.
#[derive(Debug, Deserialize)]
pub struct FilesQuery {
    pub path: Option<String>,
    pub username: Option<String>,
    pub signature: Option<String>,
    pub signature_expiration: Option<i64>,
}

/// An error of the files API: a status and a JSON body `{"code", "message"}` whose
/// `message` the SDK shows.
#[derive(Debug)]
pub struct FilesError {
    status: StatusCode,
    message: String,
}

impl FilesError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn from_io(path: &Path, action: &str, err: std::io::Error) -> Self {
        let status = match err.kind() {
            std::io::ErrorKind::NotFound => StatusCode::NOT_FOUND,
            std::io::ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
            std::io::ErrorKind::IsADirectory | std::io::ErrorKind::NotADirectory => StatusCode::BAD_REQUEST,
            _ if err.raw_os_error() == Some(libc::ENOSPC) => StatusCode::INSUFFICIENT_STORAGE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, format!("failed to {action} {}: {err}", path.display()))
    }
}

impl IntoResponse for FilesError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, message = %self.message, "files request failed");
        }
        let body = serde_json::json!({ "code": self.status.as_u16(), "message": self.message });
        (self.status, axum::Json(body)).into_response()
    }
}

/// Returns the signature that E2B SDKs put in signed file URLs: `v1_` and the unpadded
/// base64 SHA-256 of `path:operation:user:token`, with `:expiration` appended when set.
pub fn file_signature(path: &str, operation: &str, user: &str, token: &str, expiration: Option<i64>) -> String {
    let raw = match expiration {
        Some(expiration) => format!("{path}:{operation}:{user}:{token}:{expiration}"),
        None => format!("{path}:{operation}:{user}:{token}"),
    };
    let digest = Sha256::digest(raw.as_bytes());
    format!("v1_{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest))
}

/// Checks a signed `/files` URL against the access token.
pub fn signature_is_valid(query: &FilesQuery, operation: &str, token: &str) -> bool {
    let Some(signature) = query.signature.as_deref() else {
        return false;
    };
    if let Some(expiration) = query.signature_expiration {
        if expiration < chrono::Utc::now().timestamp() {
            return false;
        }
    }
    let expected = file_signature(
        query.path.as_deref().unwrap_or_default(),
        operation,
        query.username.as_deref().unwrap_or_default(),
        token,
        query.signature_expiration,
    );
    constant_time_eq(expected.as_bytes(), signature.as_bytes())
}

fn constant_time_eq(left: &[u8], right: &[u8]) -> bool {
    left.len() == right.len() && left.iter().zip(right).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

fn resolve_user(state: &AppState, query: &FilesQuery) -> Result<User, FilesError> {
    state
        .named_user(query.username.as_deref())
        .map_err(|err| FilesError::new(StatusCode::BAD_REQUEST, err.to_string()))
}

/// `GET /files`: streams a file.
pub async fn download(
    State(state): State<Arc<AppState>>,
    Query(query): Query<FilesQuery>,
) -> Result<Response, FilesError> {
    let user = resolve_user(&state, &query)?;
    let raw_path = query
        .path
        .as_deref()
        .ok_or_else(|| FilesError::new(StatusCode::BAD_REQUEST, "missing query parameter path"))?;
    let path = resolve_path(raw_path, &user.home);

    let metadata = tokio::fs::metadata(&path)
        .await
        .map_err(|err| FilesError::from_io(&path, "read", err))?;
    if metadata.is_dir() {
        return Err(FilesError::new(
            StatusCode::BAD_REQUEST,
            format!("path {} is a directory, not a file", path.display()),
        ));
    }
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|err| FilesError::from_io(&path, "open", err))?;

    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().replace('"', ""))
        .unwrap_or_default();
    let body = Body::from_stream(ReaderStream::with_capacity(file, DOWNLOAD_CHUNK_BYTES));
    let response = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, metadata.len())
        .header(header::CONTENT_DISPOSITION, format!("inline; filename=\"{name}\""))
        .body(body)
        .map_err(|err| FilesError::new(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()))?;
    Ok(response)
}

/// One written file in the upload response.
#[derive(Debug, Serialize)]
struct WriteInfo {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    path: String,
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    metadata: HashMap<String, String>,
}

fn metadata_from_headers(headers: &HeaderMap) -> Result<HashMap<String, String>, FilesError> {
    let mut metadata = HashMap::new();
    for (name, value) in headers {
        let Some(key) = name.as_str().strip_prefix(METADATA_HEADER_PREFIX) else {
            continue;
        };
        if key.is_empty() {
            return Err(FilesError::new(StatusCode::BAD_REQUEST, "metadata header has an empty key"));
        }
        let value = value.to_str().map_err(|_| {
            FilesError::new(StatusCode::BAD_REQUEST, format!("metadata value of key {key:?} is not visible ASCII"))
        })?;
        metadata.insert(key.to_ascii_lowercase(), value.to_string());
    }
    Ok(metadata)
}

fn is_gzip(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_ENCODING)
        .and_then(|value| value.to_str().ok())
        .map(|value| value.trim().eq_ignore_ascii_case("gzip"))
        .unwrap_or(false)
}

/// `POST /files`: writes a multipart upload with one or more files, or a raw
/// `application/octet-stream` body to `path`.
pub async fn upload(
    State(state): State<Arc<AppState>>,
    Query(query): Query<FilesQuery>,
    request: Request,
) -> Result<Response, FilesError> {
    let user = resolve_user(&state, &query)?;
    let headers = request.headers().clone();
    let metadata = metadata_from_headers(&headers)?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();

    let mut written = Vec::new();
    if content_type.starts_with("multipart/form-data") {
        let mut multipart = Multipart::from_request(request, &())
            .await
            .map_err(|err| FilesError::new(StatusCode::BAD_REQUEST, format!("invalid multipart body: {err}")))?;
        while let Some(field) = multipart
            .next_field()
            .await
            .map_err(|err| FilesError::new(StatusCode::BAD_REQUEST, format!("invalid multipart body: {err}")))?
        {
            let target = query
                .path
                .clone()
                .or_else(|| field.file_name().map(str::to_string))
                .ok_or_else(|| FilesError::new(StatusCode::BAD_REQUEST, "multipart file has no filename and no path parameter was given"))?;
            let path = resolve_path(&target, &user.home);
            let chunks = field.map_err(std::io::Error::other);
            write_file(&path, &user, chunks, false, &metadata).await?;
            written.push(write_info(&path, &metadata));
        }
    } else {
        let target = query
            .path
            .clone()
            .ok_or_else(|| FilesError::new(StatusCode::BAD_REQUEST, "missing query parameter path"))?;
        let path = resolve_path(&target, &user.home);
        let chunks = request.into_body().into_data_stream().map_err(std::io::Error::other);
        write_file(&path, &user, chunks, is_gzip(&headers), &metadata).await?;
        written.push(write_info(&path, &metadata));
    }

    if written.is_empty() {
        return Err(FilesError::new(StatusCode::BAD_REQUEST, "upload contained no file"));
    }
    tracing::info!(files = written.len(), user = %user.name, "files uploaded");
    Ok(axum::Json(written).into_response())
}

fn write_info(path: &Path, metadata: &HashMap<String, String>) -> WriteInfo {
    WriteInfo {
        name: path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default(),
        kind: "file",
        path: path.display().to_string(),
        metadata: metadata.clone(),
    }
}

async fn write_file<S>(
    path: &PathBuf,
    user: &User,
    chunks: S,
    gzip: bool,
    metadata: &HashMap<String, String>,
) -> Result<(), FilesError>
where
    S: Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + Unpin,
{
    if tokio::fs::metadata(path).await.map(|m| m.is_dir()).unwrap_or(false) {
        return Err(FilesError::new(
            StatusCode::BAD_REQUEST,
            format!("path {} is a directory", path.display()),
        ));
    }
    if let Some(parent) = path.parent() {
        let parent = parent.to_path_buf();
        let owner = user.clone();
        tokio::task::spawn_blocking(move || create_dirs_owned(&parent, &owner).map_err(|err| (parent, err)))
            .await
            .map_err(|err| FilesError::new(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()))?
            .map_err(|(parent, err)| FilesError::from_io(&parent, "create directory", err))?;
    }

    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(|err| FilesError::from_io(path, "create", err))?;
    let reader = StreamReader::new(chunks);
    let mut reader: Box<dyn AsyncRead + Send + Unpin> = if gzip {
        Box::new(GzipDecoder::new(BufReader::new(reader)))
    } else {
        Box::new(reader)
    };
    tokio::io::copy(&mut reader, &mut file)
        .await
        .map_err(|err| FilesError::from_io(path, "write", err))?;
    file.flush().await.map_err(|err| FilesError::from_io(path, "write", err))?;
    drop(file);

    chown_new(path, user).map_err(|err| FilesError::from_io(path, "change owner of", err))?;
    if !metadata.is_empty() {
        write_metadata(path, metadata).map_err(|err| {
            FilesError::new(
                StatusCode::BAD_REQUEST,
                format!("failed to store metadata on {}: {err}", path.display()),
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_sdk_format() {
        // Value computed with e2b 2.63.0's `get_signature("/home/user/a.txt", "read", "user", "token")`.
        let signature = file_signature("/home/user/a.txt", "read", "user", "token", None);
        assert_eq!(signature, "v1_tE6x2QqeKriEoa6iRhiX5fCKcheLopDKKcPNfXl08qs");
    }

    #[test]
    fn signature_validation_checks_expiration() {
        let token = "secret";
        let expired = chrono::Utc::now().timestamp() - 10;
        let query = FilesQuery {
            path: Some("a.txt".into()),
            username: None,
            signature: Some(file_signature("a.txt", "read", "", token, Some(expired))),
            signature_expiration: Some(expired),
        };
        assert!(!signature_is_valid(&query, "read", token));
        let valid = FilesQuery {
            signature: Some(file_signature("a.txt", "read", "", token, None)),
            signature_expiration: None,
            ..query
        };
        assert!(signature_is_valid(&valid, "read", token));
        assert!(!signature_is_valid(&valid, "write", token));
    }
}
