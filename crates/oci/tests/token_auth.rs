//! Bearer token auth end to end: a small token service and auth gateway (in this test) in front of a
//! real `docker-registry` on loopback. The gateway demands `Bearer` tokens whose scope covers the
//! request (pull for GET/HEAD, pull,push otherwise), as registries using the Docker token spec do.

use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use hearth_oci::{
    write_layout, ImageConfig, ImageReference, OciError, RegistryAuth, RegistryClient,
};

const USERNAME: &str = "robot";
const PASSWORD: &str = "token-secret";
const TOKEN_PREFIX: &str = "hearth-test-token ";

struct Registry {
    child: Child,
    address: String,
    _work: tempfile::TempDir,
}

impl Registry {
    fn start() -> Registry {
        let work = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address = format!("127.0.0.1:{port}");
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {address}\n  secret: hearth-test-secret\n",
            work.path().display()
        );
        let config_path = work.path().join("config.yml");
        fs::write(&config_path, config).unwrap();
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("failed to start /usr/bin/docker-registry (apt-get install docker-registry)");
        let registry = Registry {
            child,
            address,
            _work: work,
        };

        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&registry.address).is_err() {
            assert!(
                Instant::now() < deadline,
                "registry did not listen on {}",
                registry.address
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Gateway {
    upstream: String,
    own_address: SocketAddr,
    http: reqwest::Client,
}

/// Starts the gateway on a loopback port and returns its address.
async fn start_gateway(upstream: &str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let own_address = listener.local_addr().unwrap();
    let state = Arc::new(Gateway {
        upstream: upstream.to_owned(),
        own_address,
        http: reqwest::Client::new(),
    });
    let app = axum::Router::new()
        .route("/token", axum::routing::get(issue_token))
        .fallback(forward)
        .with_state(state);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    own_address
}

/// Token service: requires the test credentials, returns a token that carries the scope.
async fn issue_token(headers: HeaderMap, request: Request) -> Response {
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{USERNAME}:{PASSWORD}"))
    );
    if headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        != Some(expected.as_str())
    {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let url = reqwest::Url::parse(&format!("http://token.test{}", request.uri())).unwrap();
    let scope = url
        .query_pairs()
        .find(|(key, _)| key == "scope")
        .map(|(_, value)| value.into_owned())
        .unwrap_or_default();
    // `access_token` rather than `token`, to cover the alternative field name.
    axum::Json(serde_json::json!({ "access_token": format!("{TOKEN_PREFIX}{scope}") }))
        .into_response()
}

/// Registry gateway: checks the Bearer token's scope, then forwards to the real registry.
async fn forward(State(gateway): State<Arc<Gateway>>, request: Request) -> Response {
    let path = request.uri().path().to_owned();
    let repository = ["/manifests/", "/blobs/"].iter().find_map(|marker| {
        path.strip_prefix("/v2/")
            .and_then(|rest| rest.find(marker).map(|end| rest[..end].to_owned()))
    });
    let needs_push = !matches!(request.method().as_str(), "GET" | "HEAD");
    let scope = match &repository {
        Some(repository) if needs_push => format!("repository:{repository}:pull,push"),
        Some(repository) => format!("repository:{repository}:pull"),
        None => String::new(),
    };

    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .and_then(|value| value.strip_prefix(TOKEN_PREFIX))
        .map(str::to_owned);
    let needed_action = if needs_push { "push" } else { "pull" };
    let granted = match (&token, &repository) {
        (Some(granted), Some(repository)) => granted
            .strip_prefix(&format!("repository:{repository}:"))
            .is_some_and(|actions| actions.split(',').any(|action| action == needed_action)),
        (Some(_), None) => true,
        (None, _) => false,
    };
    if !granted {
        let challenge = format!(
            r#"Bearer realm="http://{}/token",service="hearth-test",scope="{scope}""#,
            gateway.own_address
        );
        return Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header(header::WWW_AUTHENTICATE, challenge)
            .body(Body::from(
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
            ))
            .unwrap();
    }

    let method = reqwest::Method::from_bytes(request.method().as_str().as_bytes()).unwrap();
    let url = format!("http://{}{}", gateway.upstream, request.uri());
    let mut upstream_request = gateway.http.request(method, url);
    for name in [header::CONTENT_TYPE, header::ACCEPT, header::CONTENT_LENGTH] {
        if let Some(value) = request.headers().get(&name) {
            upstream_request = upstream_request.header(name.as_str(), value.as_bytes());
        }
    }
    let body = axum::body::to_bytes(request.into_body(), usize::MAX)
        .await
        .unwrap();
    let upstream_response = upstream_request.body(body).send().await.unwrap();

    let mut response = Response::builder().status(upstream_response.status().as_u16());
    for (name, value) in upstream_response.headers() {
        let value = value
            .to_str()
            .unwrap_or_default()
            .replace(&gateway.upstream, &gateway.own_address.to_string());
        response = response.header(name.as_str(), value);
    }
    response
        .body(Body::from(upstream_response.bytes().await.unwrap()))
        .unwrap()
}

fn sample_layout(work: &tempfile::TempDir) -> PathBuf {
    let rootfs = work.path().join("rootfs");
    fs::create_dir(&rootfs).unwrap();
    fs::write(rootfs.join("hello"), b"token auth\n").unwrap();
    let layout = work.path().join("layout");
    let config = ImageConfig {
        env: vec!["AUTH=bearer".into()],
        ..Default::default()
    };
    write_layout(&rootfs, &config, &layout, "v1").unwrap();
    layout
}

#[tokio::test]
async fn bearer_token_push_and_pull() {
    let registry = Registry::start();
    let gateway = start_gateway(&registry.address).await;
    let work = tempfile::tempdir().unwrap();
    let layout = sample_layout(&work);
    let reference = ImageReference::parse(&format!("{gateway}/team/app:v1")).unwrap();
    let auth = RegistryAuth::Basic {
        username: USERNAME.into(),
        password: PASSWORD.into(),
    };

    let client = RegistryClient::new(Vec::new());
    let digest = client
        .push_layout(&layout, &reference, &auth)
        .await
        .unwrap();
    let image = client
        .pull(&reference, &auth, &work.path().join("blobs"))
        .await
        .unwrap();
    assert_eq!(image.manifest_digest, digest);
    assert_eq!(image.config.env, vec!["AUTH=bearer"]);
}

#[tokio::test]
async fn bearer_token_wrong_password_is_auth_error() {
    let registry = Registry::start();
    let gateway = start_gateway(&registry.address).await;
    let work = tempfile::tempdir().unwrap();
    let reference = ImageReference::parse(&format!("{gateway}/team/app:v1")).unwrap();
    let auth = RegistryAuth::Basic {
        username: USERNAME.into(),
        password: "not-the-password".into(),
    };

    let err = RegistryClient::new(Vec::new())
        .pull(&reference, &auth, &work.path().join("blobs"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, OciError::AuthenticationRequired { status: 401, .. }),
        "{err}"
    );
    let message = err.to_string();
    assert!(message.contains("team/app"), "{message}");
    assert!(!message.contains("not-the-password"), "{message}");
}
