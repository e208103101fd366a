//! Registry authentication: `WWW-Authenticate` challenges, Basic credentials and Bearer tokens
//! (the token flow of the Docker registry token spec).

use std::fmt;

use base64::Engine as _;
use serde::Deserialize;

use crate::OciError;

/// Credentials for a registry.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum RegistryAuth {
    #[default]
    Anonymous,
    Basic {
        username: String,
        password: String,
    },
}

impl fmt::Debug for RegistryAuth {
    /// Shows the username only; the password never reaches logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryAuth::Anonymous => f.write_str("Anonymous"),
            RegistryAuth::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
        }
    }
}

impl RegistryAuth {
    /// The `Authorization` header value for Basic auth, if credentials are set.
    pub(crate) fn basic_header(&self) -> Option<String> {
        match self {
            RegistryAuth::Anonymous => None,
            RegistryAuth::Basic { username, password } => {
                let encoded = base64::engine::general_purpose::STANDARD
                    .encode(format!("{username}:{password}"));
                Some(format!("Basic {encoded}"))
            }
        }
    }
}

/// A parsed `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

impl Challenge {
    /// Parses `Basic realm="..."` or `Bearer realm="...",service="...",scope="..."`. Returns `None`
    /// for other schemes and for a Bearer challenge without a realm.
    pub(crate) fn parse(header: &str) -> Option<Challenge> {
        let header = header.trim();
        let (scheme, parameters) = header.split_once(' ').unwrap_or((header, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Some(Challenge::Basic);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }

        let mut realm = None;
        let mut service = None;
        let mut scope = None;
        for (key, value) in parse_parameters(parameters) {
            match key.to_ascii_lowercase().as_str() {
                "realm" => realm = Some(value),
                "service" => service = Some(value),
                "scope" => scope = Some(value),
                _ => {}
            }
        }
        Some(Challenge::Bearer {
            realm: realm?,
            service,
            scope,
        })
    }
}

/// Splits `key="value",key=value` auth parameters; quoted values may contain commas and `\"`.
fn parse_parameters(input: &str) -> Vec<(String, String)> {
    let mut parameters = Vec::new();
    let mut chars = input.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars
            .by_ref()
            .take_while(|c| *c != '=')
            .collect::<String>()
            .trim()
            .to_owned();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    _ => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
            value = value.trim().to_owned();
        }
        parameters.push((key, value));
    }
    parameters
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
}

/// Requests a Bearer token from the challenge's realm, sending Basic credentials when set, and
/// returns the `Authorization` header value.
pub(crate) async fn fetch_bearer_token(
    http: &reqwest::Client,
    registry: &str,
    repository: &str,
    auth: &RegistryAuth,
    realm: &str,
    service: Option<&str>,
    scope: Option<&str>,
) -> Result<String, OciError> {
    let token_error = |detail: String| OciError::Token {
        registry: registry.to_owned(),
        realm: realm.to_owned(),
        detail,
    };

    let mut url = reqwest::Url::parse(realm)
        .map_err(|err| token_error(format!("invalid realm URL: {err}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(token_error(
            "the realm must be an http or https URL".to_owned(),
        ));
    }
    {
        let mut query = url.query_pairs_mut();
        if let Some(service) = service {
            query.append_pair("service", service);
        }
        if let Some(scope) = scope {
            query.append_pair("scope", scope);
        }
    }

    let mut request = http.get(url);
    if let Some(header) = auth.basic_header() {
        request = request.header(reqwest::header::AUTHORIZATION, header);
    }
    let response = request
        .send()
        .await
        .map_err(|err| token_error(format!("request failed: {err}")))?;
    let status = response.status();
    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
        return Err(OciError::AuthenticationRequired {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            status: status.as_u16(),
            detail: "the token service rejected the credentials".to_owned(),
        });
    }
    if !status.is_success() {
        return Err(token_error(format!("HTTP {status}")));
    }

    let body: TokenResponse = response
        .json()
        .await
        .map_err(|err| token_error(format!("invalid token response: {err}")))?;
    let token = body
        .token
        .or(body.access_token)
        .filter(|token| !token.is_empty())
        .ok_or_else(|| token_error("the response has neither token nor access_token".to_owned()))?;
    Ok(format!("Bearer {token}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_bearer_challenge() {
        let header = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#;
        assert_eq!(
            Challenge::parse(header),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            })
        );
    }

    #[test]
    fn parse_bearer_challenge_with_comma_in_scope() {
        let header = r#"bearer realm="http://127.0.0.1/t", scope="repository:a/b:pull,push""#;
        let Some(Challenge::Bearer { scope, service, .. }) = Challenge::parse(header) else {
            panic!("not parsed as Bearer");
        };
        assert_eq!(scope.as_deref(), Some("repository:a/b:pull,push"));
        assert_eq!(service, None);
    }

    #[test]
    fn parse_basic_and_unknown_challenges() {
        assert_eq!(
            Challenge::parse(r#"Basic realm="registry""#),
            Some(Challenge::Basic)
        );
        assert_eq!(Challenge::parse("Negotiate"), None);
        assert_eq!(Challenge::parse(r#"Bearer service="x""#), None);
    }

    #[test]
    fn debug_hides_password() {
        let auth = RegistryAuth::Basic {
            username: "user".into(),
            password: "hunter2".into(),
        };
        let shown = format!("{auth:?}");
        assert!(shown.contains("user"));
        assert!(!shown.contains("hunter2"));
    }

    #[test]
    fn basic_header_encodes_credentials() {
        let auth = RegistryAuth::Basic {
            username: "a".into(),
            password: "b".into(),
        };
        assert_eq!(auth.basic_header().as_deref(), Some("Basic YTpi"));
        assert_eq!(RegistryAuth::Anonymous.basic_header(), None);
    }
}
