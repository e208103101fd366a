//! A client for the OCI distribution API (`/v2/`): pulls images into a content-addressed blob
//! directory and pushes OCI image layouts.

use std::collections::HashMap;
use std::fs;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE,
};
use reqwest::{RequestBuilder, Response, StatusCode};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use crate::auth::{fetch_bearer_token, Challenge};
use crate::digest::{blob_path, check_digest, sha256_bytes, sha256_file, verify_file};
use crate::layout::{
    check_layer_media_type, is_index_document, read_manifest_blob, select_platform,
    MAX_DOCUMENT_SIZE,
};
use crate::spec::{
    is_index_media_type, Descriptor, Index, Manifest, MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_DOCKER_MANIFEST_LIST, MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST,
};
use crate::{Image, ImageConfig, ImageReference, Layer, OciError, RegistryAuth};

const DOCKER_CONTENT_DIGEST: &str = "Docker-Content-Digest";
/// Maximum number of characters of a registry's error body kept in an error message.
const MAX_ERROR_DETAIL: usize = 300;

/// A registry client shared by pulls and pushes. It caches the `Authorization` header per
/// repository, so a Bearer token or Basic credential is negotiated once and reused until rejected.
pub struct RegistryClient {
    http: reqwest::Client,
    plain_http_registries: Vec<String>,
    authorization: Mutex<HashMap<String, String>>,
}

/// The repository that one pull or push talks to.
struct Target<'a> {
    registry: &'a str,
    repository: &'a str,
    /// `<scheme>://<host>/v2/<repository>`.
    base_url: String,
    auth: &'a RegistryAuth,
}

impl RegistryClient {
    /// Creates a client. `plain_http_registries` lists registries (`host:port`, as written in image
    /// references) to reach over http. Loopback registries (`localhost`, 127.0.0.0/8, `[::1]`) always
    /// use http, and every other registry uses https.
    pub fn new(plain_http_registries: Vec<String>) -> Self {
        let http = reqwest::Client::builder()
            .user_agent(concat!("hearth-oci/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(120))
            .build()
            .expect("building a reqwest client from static settings failed");
        RegistryClient {
            http,
            plain_http_registries,
            authorization: Mutex::new(HashMap::new()),
        }
    }

    /// Pulls manifest, config and layers into `blob_dir` (`<blob_dir>/sha256/<hex>`). An index is
    /// resolved to its linux/amd64 manifest. Every blob is verified by size and sha256 before it is
    /// moved into place, and blobs already present with the right digest are reused.
    pub async fn pull(
        &self,
        reference: &ImageReference,
        auth: &RegistryAuth,
        blob_dir: &Path,
    ) -> Result<Image, OciError> {
        let started = Instant::now();
        let target = self.target(reference, auth);
        tracing::info!(reference = %reference, "pulling image");

        let (mut bytes, mut media_type) = self
            .fetch_manifest(&target, reference.manifest_reference())
            .await?;
        let mut manifest_digest = sha256_bytes(&bytes);
        if let Some(expected) = &reference.digest {
            check_digest(
                &format!("manifest of {reference}"),
                expected,
                &manifest_digest,
            )?;
        }

        if media_type.as_deref().is_some_and(is_index_media_type) || is_index_document(&bytes) {
            let index: Index = serde_json::from_slice(&bytes)
                .map_err(|err| OciError::json(format!("index of {reference}"), err))?;
            let platform_digest = select_platform(&index, &reference.to_string())?
                .digest
                .clone();
            (bytes, media_type) = self.fetch_manifest(&target, &platform_digest).await?;
            manifest_digest = sha256_bytes(&bytes);
            check_digest(
                &format!("linux/amd64 manifest of {reference}"),
                &platform_digest,
                &manifest_digest,
            )?;
        }

        let manifest = parse_image_manifest(reference, media_type.as_deref(), &bytes)?;
        store_bytes(blob_dir, &manifest_digest, &bytes)?;

        let config_path = self.fetch_blob(&target, &manifest.config, blob_dir).await?;
        let config_bytes = fs::read(&config_path).map_err(|err| OciError::io(&config_path, err))?;
        let config = ImageConfig::from_json(
            &config_bytes,
            &format!("config {} of {reference}", manifest.config.digest),
        )?;

        let mut layers = Vec::with_capacity(manifest.layers.len());
        for layer in &manifest.layers {
            check_layer_media_type(layer)?;
            let path = self.fetch_blob(&target, layer, blob_dir).await?;
            layers.push(Layer {
                path,
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
            });
        }

        tracing::info!(
            reference = %reference,
            digest = %manifest_digest,
            layers = layers.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "pulled image"
        );
        Ok(Image {
            manifest_digest,
            config,
            layers,
        })
    }

    /// Pushes the image of an OCI image layout (as `write_layout` writes it) to `reference` and
    /// returns the manifest digest. The layout image is picked by the reference's tag, or is the
    /// layout's only image. Blobs the registry already has are not uploaded again.
    pub async fn push_layout(
        &self,
        layout_dir: &Path,
        reference: &ImageReference,
        auth: &RegistryAuth,
    ) -> Result<String, OciError> {
        let started = Instant::now();
        let target = self.target(reference, auth);
        let tag = reference.tag_or_latest();
        let (descriptor, manifest_bytes) = match read_manifest_blob(layout_dir, Some(tag)) {
            Ok(found) => found,
            Err(by_tag) => read_manifest_blob(layout_dir, None).map_err(|_| by_tag)?,
        };
        let manifest: Manifest = serde_json::from_slice(&manifest_bytes).map_err(|err| {
            OciError::json(
                format!("manifest {} in {}", descriptor.digest, layout_dir.display()),
                err,
            )
        })?;

        let blobs = layout_dir.join("blobs");
        for blob in std::iter::once(&manifest.config).chain(&manifest.layers) {
            self.push_blob(&target, blob, &blob_path(&blobs, &blob.digest)?)
                .await?;
        }

        let media_type = manifest
            .media_type
            .clone()
            .or_else(|| (!descriptor.media_type.is_empty()).then(|| descriptor.media_type.clone()))
            .unwrap_or_else(|| MEDIA_TYPE_OCI_MANIFEST.to_owned());
        let push_reference = reference.digest.as_deref().unwrap_or(tag);
        let url = format!("{}/manifests/{push_reference}", target.base_url);
        let what = format!("manifest {push_reference}");
        let response = self
            .send(&target, &what, || {
                Ok(self
                    .http
                    .put(&url)
                    .header(CONTENT_TYPE, media_type.as_str())
                    .body(manifest_bytes.clone()))
            })
            .await?;
        if !response.status().is_success() {
            return Err(error_for_status(&target, &what, response).await);
        }

        let digest = sha256_bytes(&manifest_bytes);
        if let Some(reported) = response
            .headers()
            .get(DOCKER_CONTENT_DIGEST)
            .and_then(|value| value.to_str().ok())
        {
            check_digest(
                &format!("pushed manifest of {reference}"),
                &digest,
                reported,
            )?;
        }
        tracing::info!(
            reference = %reference,
            digest = %digest,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "pushed image"
        );
        Ok(digest)
    }

    fn target<'a>(&self, reference: &'a ImageReference, auth: &'a RegistryAuth) -> Target<'a> {
        let scheme = if self.uses_plain_http(&reference.registry) {
            "http"
        } else {
            "https"
        };
        Target {
            registry: &reference.registry,
            repository: &reference.repository,
            base_url: format!(
                "{scheme}://{}/v2/{}",
                reference.api_host(),
                reference.repository
            ),
            auth,
        }
    }

    fn uses_plain_http(&self, registry: &str) -> bool {
        self.plain_http_registries
            .iter()
            .any(|plain| plain == registry)
            || is_loopback_registry(registry)
    }

    /// Fetches a manifest or index by tag or digest; returns its bytes and `Content-Type`.
    async fn fetch_manifest(
        &self,
        target: &Target<'_>,
        reference: &str,
    ) -> Result<(Vec<u8>, Option<String>), OciError> {
        let url = format!("{}/manifests/{reference}", target.base_url);
        let what = format!("manifest {reference}");
        let accept = [
            MEDIA_TYPE_OCI_INDEX,
            MEDIA_TYPE_OCI_MANIFEST,
            MEDIA_TYPE_DOCKER_MANIFEST_LIST,
            MEDIA_TYPE_DOCKER_MANIFEST,
        ]
        .join(", ");
        let response = self
            .send(target, &what, || {
                Ok(self.http.get(&url).header(ACCEPT, accept.as_str()))
            })
            .await?;
        if !response.status().is_success() {
            return Err(error_for_status(target, &what, response).await);
        }

        let media_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .map(|value| value.split(';').next().unwrap_or(value).trim().to_owned());
        let bytes = read_limited(target, &what, response, MAX_DOCUMENT_SIZE).await?;
        Ok((bytes, media_type))
    }

    /// Downloads a blob into `<blob_dir>/sha256/<hex>` unless a verified copy is already there.
    async fn fetch_blob(
        &self,
        target: &Target<'_>,
        descriptor: &Descriptor,
        blob_dir: &Path,
    ) -> Result<PathBuf, OciError> {
        let path = blob_path(blob_dir, &descriptor.digest)?;
        if path.exists() {
            match sha256_file(&path) {
                Ok(actual) if actual == descriptor.digest => {
                    tracing::debug!(digest = %descriptor.digest, path = %path.display(), "reusing cached blob");
                    return Ok(path);
                }
                _ => {
                    tracing::warn!(digest = %descriptor.digest, path = %path.display(), "cached blob does not match its digest; downloading it again");
                    fs::remove_file(&path).map_err(|err| OciError::io(&path, err))?;
                }
            }
        }
        let dir = path.parent().unwrap_or(blob_dir);
        fs::create_dir_all(dir).map_err(|err| OciError::io(dir, err))?;

        let url = format!("{}/blobs/{}", target.base_url, descriptor.digest);
        let what = format!("blob {}", descriptor.digest);
        let mut response = self.send(target, &what, || Ok(self.http.get(&url))).await?;
        if !response.status().is_success() {
            return Err(error_for_status(target, &what, response).await);
        }

        let temp = tempfile::NamedTempFile::new_in(dir).map_err(|err| OciError::io(dir, err))?;
        let std_file = temp
            .reopen()
            .map_err(|err| OciError::io(temp.path(), err))?;
        let mut file = tokio::fs::File::from_std(std_file);
        let mut hasher = Sha256::new();
        let mut received: u64 = 0;
        let described = format!("{what} of {}/{}", target.registry, target.repository);
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|source| request_error(target, &what, source))?
        {
            received += chunk.len() as u64;
            if received > descriptor.size {
                return Err(OciError::SizeMismatch {
                    what: described,
                    expected: descriptor.size,
                    actual: received,
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|err| OciError::io(temp.path(), err))?;
        }
        file.flush()
            .await
            .map_err(|err| OciError::io(temp.path(), err))?;
        drop(file);

        if received != descriptor.size {
            return Err(OciError::SizeMismatch {
                what: described,
                expected: descriptor.size,
                actual: received,
            });
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        check_digest(&described, &descriptor.digest, &actual)?;
        temp.persist(&path)
            .map_err(|err| OciError::io(&path, err.error))?;
        tracing::debug!(digest = %descriptor.digest, bytes = received, "downloaded blob");
        Ok(path)
    }

    /// Uploads one blob with a monolithic upload (POST, then PUT with the digest), after checking
    /// with HEAD whether the registry already has it.
    async fn push_blob(
        &self,
        target: &Target<'_>,
        descriptor: &Descriptor,
        path: &Path,
    ) -> Result<(), OciError> {
        let what = format!("blob {}", descriptor.digest);
        let blob_url = format!("{}/blobs/{}", target.base_url, descriptor.digest);
        let response = self
            .send(target, &what, || Ok(self.http.head(&blob_url)))
            .await?;
        if response.status().is_success() {
            tracing::debug!(digest = %descriptor.digest, "registry already has blob");
            return Ok(());
        }
        if response.status() != StatusCode::NOT_FOUND {
            return Err(error_for_status(target, &what, response).await);
        }
        verify_file(path, &descriptor.digest)?;

        let upload_what = format!("upload of {what}");
        let uploads_url = format!("{}/blobs/uploads/", target.base_url);
        let response = self
            .send(target, &upload_what, || {
                Ok(self.http.post(&uploads_url).header(CONTENT_LENGTH, 0))
            })
            .await?;
        if response.status() != StatusCode::ACCEPTED {
            return Err(error_for_status(target, &upload_what, response).await);
        }
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|value| value.to_str().ok())
            .ok_or_else(|| {
                registry_status(
                    target,
                    &upload_what,
                    response.status(),
                    "the response has no Location header",
                )
            })?;
        let mut upload_url = reqwest::Url::parse(&target.base_url)
            .and_then(|base| base.join(location))
            .map_err(|err| {
                registry_status(
                    target,
                    &upload_what,
                    response.status(),
                    &format!("invalid Location header: {err}"),
                )
            })?;
        upload_url
            .query_pairs_mut()
            .append_pair("digest", &descriptor.digest);

        let response = self
            .send(target, &upload_what, || {
                let file = fs::File::open(path).map_err(|err| OciError::io(path, err))?;
                Ok(self
                    .http
                    .put(upload_url.clone())
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_LENGTH, descriptor.size)
                    .body(reqwest::Body::from(tokio::fs::File::from_std(file))))
            })
            .await?;
        if response.status() != StatusCode::CREATED {
            return Err(error_for_status(target, &upload_what, response).await);
        }
        tracing::debug!(digest = %descriptor.digest, bytes = descriptor.size, "uploaded blob");
        Ok(())
    }

    /// Sends a request built by `build`, adding the cached `Authorization` header. On a 401 it
    /// follows the `WWW-Authenticate` challenge (Basic credentials or a Bearer token from the realm)
    /// and retries once. `build` runs once per attempt so that request bodies can be recreated.
    async fn send<F>(&self, target: &Target<'_>, what: &str, build: F) -> Result<Response, OciError>
    where
        F: Fn() -> Result<RequestBuilder, OciError>,
    {
        let cache_key = format!("{}/{}", target.registry, target.repository);
        let cached = self.cached_authorization(&cache_key);
        let response = self
            .execute(target, what, &build, cached.as_deref())
            .await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }

        let challenge = response
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|value| value.to_str().ok())
            .and_then(Challenge::parse);
        let authorization = match challenge {
            Some(Challenge::Basic) => match target.auth.basic_header() {
                Some(header) if cached.as_deref() != Some(header.as_str()) => header,
                Some(_) => return Err(credentials_rejected(target)),
                None => {
                    return Err(auth_required(
                        target,
                        "the registry requires a username and password and none were given",
                    ))
                }
            },
            Some(Challenge::Bearer {
                realm,
                service,
                scope,
            }) => {
                fetch_bearer_token(
                    &self.http,
                    target.registry,
                    target.repository,
                    target.auth,
                    &realm,
                    service.as_deref(),
                    scope.as_deref(),
                )
                .await?
            }
            None => return Err(error_for_status(target, what, response).await),
        };

        tracing::debug!(
            registry = target.registry,
            repository = target.repository,
            "retrying request with credentials"
        );
        self.authorization
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(cache_key.clone(), authorization.clone());
        let response = self
            .execute(target, what, &build, Some(&authorization))
            .await?;
        if response.status() == StatusCode::UNAUTHORIZED {
            self.authorization
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .remove(&cache_key);
            return Err(credentials_rejected(target));
        }
        Ok(response)
    }

    async fn execute<F>(
        &self,
        target: &Target<'_>,
        what: &str,
        build: &F,
        authorization: Option<&str>,
    ) -> Result<Response, OciError>
    where
        F: Fn() -> Result<RequestBuilder, OciError>,
    {
        let mut request = build()?;
        if let Some(authorization) = authorization {
            request = request.header(AUTHORIZATION, authorization);
        }
        request
            .send()
            .await
            .map_err(|source| request_error(target, what, source))
    }

    fn cached_authorization(&self, key: &str) -> Option<String> {
        self.authorization
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(key)
            .cloned()
    }
}

/// Returns whether a registry host is loopback: `localhost`, 127.0.0.0/8 or `[::1]`, with any port.
fn is_loopback_registry(registry: &str) -> bool {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest
            .split_once(']')
            .and_then(|(address, _)| address.parse::<Ipv6Addr>().ok())
            .is_some_and(|address| address.is_loopback());
    }
    let host = registry.split(':').next().unwrap_or(registry);
    host == "localhost"
        || host
            .parse::<Ipv4Addr>()
            .is_ok_and(|address| address.is_loopback())
}

fn parse_image_manifest(
    reference: &ImageReference,
    media_type: Option<&str>,
    bytes: &[u8],
) -> Result<Manifest, OciError> {
    if let Some(media_type) = media_type {
        if media_type.starts_with("application/vnd.docker.distribution.manifest.v1") {
            return Err(OciError::UnsupportedMediaType {
                what: format!("manifest of {reference} (Docker schema 1 is not supported)"),
                media_type: media_type.to_owned(),
            });
        }
    }
    serde_json::from_slice(bytes)
        .map_err(|err| OciError::json(format!("manifest of {reference}"), err))
}

fn store_bytes(blob_dir: &Path, digest: &str, bytes: &[u8]) -> Result<(), OciError> {
    let path = blob_path(blob_dir, digest)?;
    let dir = path.parent().unwrap_or(blob_dir);
    fs::create_dir_all(dir).map_err(|err| OciError::io(dir, err))?;
    let temp = tempfile::NamedTempFile::new_in(dir).map_err(|err| OciError::io(dir, err))?;
    fs::write(temp.path(), bytes).map_err(|err| OciError::io(temp.path(), err))?;
    temp.persist(&path)
        .map_err(|err| OciError::io(&path, err.error))?;
    Ok(())
}

async fn read_limited(
    target: &Target<'_>,
    what: &str,
    mut response: Response,
    limit: u64,
) -> Result<Vec<u8>, OciError> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|source| request_error(target, what, source))?
    {
        if body.len() as u64 + chunk.len() as u64 > limit {
            return Err(registry_status(
                target,
                what,
                response.status(),
                &format!("the response is larger than {limit} bytes"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[derive(Deserialize)]
struct RegistryErrors {
    errors: Vec<RegistryErrorItem>,
}

#[derive(Deserialize)]
struct RegistryErrorItem {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// Builds the error for a non-success response, with the registry's own error codes as detail.
async fn error_for_status(target: &Target<'_>, what: &str, response: Response) -> OciError {
    let status = response.status();
    let body = read_limited(target, what, response, 64 * 1024)
        .await
        .unwrap_or_default();
    let detail = match serde_json::from_slice::<RegistryErrors>(&body) {
        Ok(parsed) if !parsed.errors.is_empty() => parsed
            .errors
            .iter()
            .map(|error| format!("{}: {}", error.code, error.message))
            .collect::<Vec<_>>()
            .join("; "),
        _ if body.is_empty() => status.canonical_reason().unwrap_or("no details").to_owned(),
        _ => String::from_utf8_lossy(&body)
            .chars()
            .take(MAX_ERROR_DETAIL)
            .collect(),
    };

    let registry = target.registry.to_owned();
    let repository = target.repository.to_owned();
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => OciError::AuthenticationRequired {
            registry,
            repository,
            status: status.as_u16(),
            detail,
        },
        StatusCode::NOT_FOUND => OciError::NotFound {
            registry,
            repository,
            what: what.to_owned(),
            status: status.as_u16(),
            detail,
        },
        _ => registry_status(target, what, status, &detail),
    }
}

fn registry_status(target: &Target<'_>, what: &str, status: StatusCode, detail: &str) -> OciError {
    OciError::RegistryStatus {
        registry: target.registry.to_owned(),
        repository: target.repository.to_owned(),
        what: what.to_owned(),
        status: status.as_u16(),
        detail: detail.to_owned(),
    }
}

fn request_error(target: &Target<'_>, what: &str, source: reqwest::Error) -> OciError {
    OciError::Request {
        registry: target.registry.to_owned(),
        what: what.to_owned(),
        source,
    }
}

fn auth_required(target: &Target<'_>, detail: &str) -> OciError {
    OciError::AuthenticationRequired {
        registry: target.registry.to_owned(),
        repository: target.repository.to_owned(),
        status: StatusCode::UNAUTHORIZED.as_u16(),
        detail: detail.to_owned(),
    }
}

fn credentials_rejected(target: &Target<'_>) -> OciError {
    match target.auth {
        RegistryAuth::Basic { username, .. } => auth_required(
            target,
            &format!("the registry rejected the credentials of user {username:?}"),
        ),
        RegistryAuth::Anonymous => auth_required(target, "the registry refused anonymous access"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_are_detected() {
        for registry in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.1.2.3",
            "[::1]:5000",
            "[::1]",
        ] {
            assert!(is_loopback_registry(registry), "{registry}");
        }
        for registry in [
            "docker.io",
            "10.0.0.1:5000",
            "[2001:db8::1]:5000",
            "localhost.example.com",
        ] {
            assert!(!is_loopback_registry(registry), "{registry}");
        }
    }

    #[test]
    fn plain_http_list_selects_http_scheme() {
        let client = RegistryClient::new(vec!["registry.internal:5000".to_owned()]);
        let reference = ImageReference::parse("registry.internal:5000/app:v1").unwrap();
        let auth = RegistryAuth::Anonymous;
        assert_eq!(
            client.target(&reference, &auth).base_url,
            "http://registry.internal:5000/v2/app"
        );
        let hub = ImageReference::parse("alpine").unwrap();
        assert_eq!(
            client.target(&hub, &auth).base_url,
            "https://registry-1.docker.io/v2/library/alpine"
        );
    }
}
