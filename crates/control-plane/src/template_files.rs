//! Files uploaded for template builds (`COPY` archives, Dockerfile contexts) and the
//! signed upload URLs the SDK `PUT`s them to.
//!
//! A file lives at `<data_dir>/template-files/<hash>`. An upload URL carries a token,
//! `<expiry>.<hex HMAC-SHA256>` of the template ID, the hash and the expiry (Unix seconds),
//! keyed with a secret that the server keeps in `<data_dir>/upload-token.key`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::Body;
use futures::StreamExt;
use hmac::{KeyInit, Mac};
use rand::RngCore;
use tokio::io::AsyncWriteExt;

/// Directory of the uploaded files, inside the data directory.
pub const FILES_DIR: &str = "template-files";

/// File holding the upload token secret, inside the data directory.
const SECRET_FILE: &str = "upload-token.key";

/// How long an upload URL is accepted after it was issued. The SDK uploads right after
/// it receives the URL.
pub const UPLOAD_TOKEN_TTL: Duration = Duration::from_secs(60 * 60);

/// Largest upload accepted, in bytes.
// NOTE: a bound against a single request filling the disk, not a measured need.
pub const MAX_UPLOAD_BYTES: u64 = 64 * 1024 * 1024 * 1024;

type HmacSha256 = hmac::Hmac<sha2_hmac::Sha256>;

/// Errors of the file store.
#[derive(Debug, thiserror::Error)]
pub enum FileStoreError {
    #[error("failed to create directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to read or create the upload token secret {path}")]
    Secret {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to write uploaded file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to read the request body")]
    Body(#[source] axum::Error),
    #[error("the upload is larger than the maximum of {max} bytes")]
    TooLarge { max: u64 },
}

/// Reasons to reject an upload token.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the upload token is malformed")]
    Malformed,
    #[error("the upload token expired; request a new upload URL")]
    Expired,
    #[error("the upload token does not match this template and file")]
    Mismatch,
}

/// Uploaded files and the secret that signs their upload URLs.
pub struct FileStore {
    dir: PathBuf,
    secret: Vec<u8>,
}

impl FileStore {
    /// Opens the file store in `data_dir`, creating the directory and the secret if missing.
    pub fn open(data_dir: &Path) -> Result<Self, FileStoreError> {
        let dir = data_dir.join(FILES_DIR);
        std::fs::create_dir_all(&dir).map_err(|source| FileStoreError::CreateDir {
            path: dir.clone(),
            source,
        })?;
        let secret = load_or_create_secret(&data_dir.join(SECRET_FILE))?;
        Ok(Self { dir, secret })
    }

    /// Returns the directory of the uploaded files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Returns whether a file with this hash is present. The hash must be validated.
    pub fn is_present(&self, hash: &str) -> bool {
        self.dir.join(hash).is_file()
    }

    /// Creates an upload token for a template's file that expires after [`UPLOAD_TOKEN_TTL`].
    pub fn issue_token(&self, template_id: &str, hash: &str) -> String {
        let expires = chrono::Utc::now().timestamp() + UPLOAD_TOKEN_TTL.as_secs() as i64;
        format!("{expires}.{}", hex::encode(self.sign(template_id, hash, expires)))
    }

    /// Checks an upload token for a template's file.
    pub fn verify_token(&self, template_id: &str, hash: &str, token: &str) -> Result<(), TokenError> {
        let (expires, signature) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let expires: i64 = expires.parse().map_err(|_| TokenError::Malformed)?;
        let signature = hex::decode(signature).map_err(|_| TokenError::Malformed)?;
        let mut mac = self.mac();
        mac.update(signed_text(template_id, hash, expires).as_bytes());
        mac.verify_slice(&signature).map_err(|_| TokenError::Mismatch)?;
        if expires < chrono::Utc::now().timestamp() {
            return Err(TokenError::Expired);
        }
        Ok(())
    }

    /// Streams `body` into the file of `hash`: into a temporary file first, renamed into
    /// place only when the whole body arrived, so a reader never sees a partial file.
    pub async fn write(&self, hash: &str, body: Body) -> Result<u64, FileStoreError> {
        let mut suffix = [0u8; 8];
        rand::rng().fill_bytes(&mut suffix);
        let temp = self.dir.join(format!(".{hash}.{}.partial", hex::encode(suffix)));
        let result = write_body(&temp, body).await;
        let written = match result {
            Ok(written) => written,
            Err(err) => {
                let _ = tokio::fs::remove_file(&temp).await;
                return Err(err);
            }
        };
        let target = self.dir.join(hash);
        if let Err(source) = tokio::fs::rename(&temp, &target).await {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(FileStoreError::Write { path: target, source });
        }
        Ok(written)
    }

    fn mac(&self) -> HmacSha256 {
        <HmacSha256 as KeyInit>::new_from_slice(&self.secret).expect("HMAC accepts keys of any length")
    }

    fn sign(&self, template_id: &str, hash: &str, expires: i64) -> Vec<u8> {
        let mut mac = self.mac();
        mac.update(signed_text(template_id, hash, expires).as_bytes());
        mac.finalize().into_bytes().to_vec()
    }
}

fn signed_text(template_id: &str, hash: &str, expires: i64) -> String {
    format!("{template_id}\n{hash}\n{expires}")
}

async fn write_body(path: &Path, body: Body) -> Result<u64, FileStoreError> {
    let write_error = |source| FileStoreError::Write { path: path.to_owned(), source };
    let mut file = tokio::fs::File::create(path).await.map_err(write_error)?;
    let mut stream = body.into_data_stream();
    let mut written: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(FileStoreError::Body)?;
        written += chunk.len() as u64;
        if written > MAX_UPLOAD_BYTES {
            return Err(FileStoreError::TooLarge { max: MAX_UPLOAD_BYTES });
        }
        file.write_all(&chunk).await.map_err(write_error)?;
    }
    file.sync_all().await.map_err(write_error)?;
    Ok(written)
}

fn load_or_create_secret(path: &Path) -> Result<Vec<u8>, FileStoreError> {
    let secret_error = |source| FileStoreError::Secret { path: path.to_owned(), source };
    match std::fs::read(path) {
        Ok(secret) if secret.len() >= 32 => return Ok(secret),
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(secret_error(err)),
    }

    let mut secret = vec![0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let temp = path.with_extension("tmp");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)
            .map_err(secret_error)?;
        file.write_all(&secret).map_err(secret_error)?;
        file.sync_all().map_err(secret_error)?;
    }
    std::fs::rename(&temp, path).map_err(secret_error)?;
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let token = store.issue_token("tpl1", "abc");
        assert_eq!(store.verify_token("tpl1", "abc", &token), Ok(()));
    }

    #[test]
    fn token_rejects_other_file_and_template() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let token = store.issue_token("tpl1", "abc");
        assert_eq!(store.verify_token("tpl1", "abd", &token), Err(TokenError::Mismatch));
        assert_eq!(store.verify_token("tpl2", "abc", &token), Err(TokenError::Mismatch));
        assert_eq!(store.verify_token("tpl1", "abc", "garbage"), Err(TokenError::Malformed));
    }

    #[test]
    fn token_expires() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let expired = chrono::Utc::now().timestamp() - 1;
        let token = format!("{expired}.{}", hex::encode(store.sign("tpl1", "abc", expired)));
        assert_eq!(store.verify_token("tpl1", "abc", &token), Err(TokenError::Expired));
    }

    #[test]
    fn secret_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let token = FileStore::open(dir.path()).unwrap().issue_token("tpl1", "abc");
        let reopened = FileStore::open(dir.path()).unwrap();
        assert_eq!(reopened.verify_token("tpl1", "abc", &token), Ok(()));
    }
}
