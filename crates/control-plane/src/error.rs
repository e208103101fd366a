//! API errors: the JSON body `{"code", "message"}` with the status codes the E2B SDK maps.
//!
//! The SDK (e2b 2.63.0, `e2b/api/__init__.py`) turns 401 into `AuthenticationException`,
//! 429 into `RateLimitException` and 503 into `ServiceBusyException`. Each method maps 404
//! itself (for example to `SandboxNotFoundException`). Every other status becomes a
//! `SandboxException` whose text is `"<status>: <message>"`.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Serialize;
use utoipa::ToSchema;

/// Error body of every failed request.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// HTTP status code, repeated in the body.
    pub code: u16,
    /// Description of the failure, naming the value involved.
    pub message: String,
    /// Machine-readable reason, where one applies (for example `sandbox_create_failed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<&'static str>,
}

/// An error returned by a handler.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    error_code: Option<&'static str>,
}

impl ApiError {
    /// Creates an error with any status.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            error_code: None,
        }
    }

    /// Returns the message the client receives.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// 400: a request value is invalid.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 401: the API key is missing or unknown.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }

    /// 404: the named sandbox, template or route does not exist.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// 501: the route exists in the E2B API but this server does not implement it yet.
    pub fn not_implemented(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_IMPLEMENTED,
            format!("{what} is not implemented by this Hearth server yet"),
        )
    }

    /// 500: an internal step failed. Logs the error chain, which the client also receives.
    pub fn internal(context: &str, err: &(dyn std::error::Error + 'static)) -> Self {
        let chain = error_chain(err);
        tracing::error!(error = %chain, "{context}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{context}: {chain}"),
        )
    }

    /// Attaches a machine-readable reason.
    pub fn with_error_code(mut self, error_code: &'static str) -> Self {
        self.error_code = Some(error_code);
        self
    }

    /// Returns the HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// Returns the body this error is sent with.
    pub fn body(&self) -> ErrorBody {
        ErrorBody { code: self.status.as_u16(), message: self.message.clone(), error_code: self.error_code }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.status.as_u16(),
            message: self.message,
            error_code: self.error_code,
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(err: crate::store::StoreError) -> Self {
        Self::internal("database error", &err)
    }
}

/// Joins an error and its sources into one line.
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// JSON body extractor whose rejections are JSON errors with status 400, not axum's text.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection_error(&rejection)),
        }
    }
}

fn json_rejection_error(rejection: &JsonRejection) -> ApiError {
    let message = match rejection {
        JsonRejection::MissingJsonContentType(_) => {
            "invalid request body: expected Content-Type: application/json".to_owned()
        }
        JsonRejection::JsonSyntaxError(err) => format!("malformed JSON body: {}", error_chain(err)),
        JsonRejection::JsonDataError(err) => format!("invalid request body: {}", error_chain(err)),
        other => format!("invalid request body: {}", other.body_text()),
    };
    ApiError::bad_request(message)
}

/// Query-string extractor whose rejections are JSON errors with status 400.
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(query_rejection_error(&rejection)),
        }
    }
}

fn query_rejection_error(rejection: &QueryRejection) -> ApiError {
    ApiError::bad_request(format!("invalid query string: {}", rejection.body_text()))
}

/// Router fallback: JSON 404 naming the route.
pub(crate) async fn route_not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path()))
}

/// Fallback for a known path with an unsupported method: JSON 405.
pub(crate) async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed on {}", uri.path()),
    )
}
