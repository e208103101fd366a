//! Server side of the Connect RPC protocol (<https://connectrpc.com/docs/protocol>) on axum.
//!
//! Unary calls carry one bare message with content type `application/proto` or
//! `application/json`; errors are a JSON body `{"code", "message"}` with the HTTP status of
//! the code. Streaming calls carry `application/connect+proto` or `application/connect+json`
//! bodies made of envelopes: one flags byte, a 4-byte big-endian length, then the message.
//! The server ends a stream with an envelope whose flags have bit 1 set and whose payload is
//! a JSON end-of-stream message, `{}` or `{"error": {"code", "message"}}`, always with HTTP 200.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use http::{header, HeaderMap, HeaderValue, StatusCode};
use tokio::time::Instant;

/// Maximum size of one request message, unary or enveloped.
const MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

/// Flag bit of an envelope that carries the end-of-stream message.
const END_STREAM_FLAG: u8 = 0b10;

/// Flag bit of an envelope whose payload is compressed.
const COMPRESSED_FLAG: u8 = 0b01;

/// Request header with the client's deadline in milliseconds.
const TIMEOUT_HEADER: &str = "connect-timeout-ms";

/// Request header with the keepalive interval in seconds that E2B SDKs send on long streams.
pub const KEEPALIVE_HEADER: &str = "keepalive-ping-interval";

/// Connect error codes, with their wire names and HTTP statuses from the Connect protocol.
/// The list is complete even where envd does not return a code yet.
#[allow(dead_code)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Canceled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl Code {
    /// Returns the code's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Aborted => "aborted",
            Code::OutOfRange => "out_of_range",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::DataLoss => "data_loss",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// Returns the HTTP status that a unary error response with this code carries.
    pub fn http_status(self) -> StatusCode {
        let status = match self {
            Code::Canceled => 499,
            Code::Unknown | Code::Internal | Code::DataLoss => 500,
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
            Code::DeadlineExceeded => 504,
            Code::NotFound => 404,
            Code::AlreadyExists | Code::Aborted => 409,
            Code::PermissionDenied => 403,
            Code::ResourceExhausted => 429,
            Code::Unimplemented => 501,
            Code::Unavailable => 503,
            Code::Unauthenticated => 401,
        };
        StatusCode::from_u16(status).expect("every Connect status is a valid HTTP status")
    }
}

/// An RPC failure as the client sees it: a Connect code and a message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct RpcError {
    pub code: Code,
    pub message: String,
}

impl RpcError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Code::Internal, message)
    }

    /// Returns the JSON object that Connect uses for errors.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "code": self.code.as_str(), "message": self.message })
    }
}

impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        let body = self.to_json().to_string();
        (
            self.code.http_status(),
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    }
}

/// Message encoding of a call, chosen by the request's content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Proto,
    Json,
}

impl Codec {
    fn name(self) -> &'static str {
        match self {
            Codec::Proto => "proto",
            Codec::Json => "json",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "proto" => Some(Codec::Proto),
            "json" => Some(Codec::Json),
            _ => None,
        }
    }

    fn decode<T: RpcMessage>(self, data: &[u8]) -> Result<T, RpcError> {
        match self {
            Codec::Proto => T::decode(data).map_err(|err| {
                RpcError::invalid_argument(format!("invalid protobuf request message: {err}"))
            }),
            // An empty unary JSON body is the empty message.
            Codec::Json if data.iter().all(u8::is_ascii_whitespace) => Ok(T::default()),
            Codec::Json => serde_json::from_slice(data).map_err(|err| {
                RpcError::invalid_argument(format!("invalid JSON request message: {err}"))
            }),
        }
    }

    fn encode<T: RpcMessage>(self, message: &T) -> Bytes {
        match self {
            Codec::Proto => Bytes::from(message.encode_to_vec()),
            Codec::Json => match serde_json::to_vec(message) {
                Ok(json) => Bytes::from(json),
                Err(err) => {
                    // Generated serializers fail only on maps with non-string keys, which
                    // these protocols do not have.
                    tracing::error!(%err, "failed to encode a response message as JSON");
                    Bytes::from_static(b"{}")
                }
            },
        }
    }
}

/// Messages of both codecs: prost for protobuf, pbjson's serde implementations for JSON.
pub trait RpcMessage:
    prost::Message + Default + serde::Serialize + serde::de::DeserializeOwned + Send + 'static
{
}

impl<T> RpcMessage for T where
    T: prost::Message + Default + serde::Serialize + serde::de::DeserializeOwned + Send + 'static
{
}

/// Request facts that handlers need besides the message.
#[derive(Debug, Clone)]
pub struct RpcContext {
    pub headers: HeaderMap,
    /// Instant after which the client stops waiting, from `Connect-Timeout-Ms`.
    pub deadline: Option<Instant>,
    /// Interval of keepalive messages on a server stream, from `Keepalive-Ping-Interval`.
    pub keepalive: Option<Duration>,
}

impl RpcContext {
    fn from_headers(headers: HeaderMap) -> Result<Self, RpcError> {
        let deadline = match headers.get(TIMEOUT_HEADER) {
            None => None,
            Some(value) => {
                let text = value.to_str().unwrap_or_default();
                let millis: u64 = text.parse().ok().filter(|_| text.len() <= 10).ok_or_else(
                    || RpcError::invalid_argument(format!("invalid {TIMEOUT_HEADER} header {text:?}")),
                )?;
                Some(Instant::now() + Duration::from_millis(millis))
            }
        };
        let keepalive = headers
            .get(KEEPALIVE_HEADER)
            .and_then(|value| value.to_str().ok())
            .and_then(|text| text.trim().parse::<u64>().ok())
            .filter(|seconds| *seconds > 0)
            .map(Duration::from_secs);
        Ok(Self {
            headers,
            deadline,
            keepalive,
        })
    }
}

/// A stream of messages that a server-streaming handler returns.
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, RpcError>> + Send>>;

/// A stream of messages that a client-streaming handler reads.
pub type RequestStream<T> = Pin<Box<dyn Stream<Item = Result<T, RpcError>> + Send>>;

fn content_type(headers: &HeaderMap) -> String {
    let value = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase()
}

fn unsupported_media_type(content_type: &str, expected: &str) -> Response {
    (
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        [("accept-post", expected.to_string())],
        format!("unsupported content type {content_type:?}, expected {expected}"),
    )
        .into_response()
}

fn unary_codec(headers: &HeaderMap) -> Result<Codec, Response> {
    let content_type = content_type(headers);
    content_type
        .strip_prefix("application/")
        .and_then(Codec::from_name)
        .ok_or_else(|| unsupported_media_type(&content_type, "application/proto, application/json"))
}

fn stream_codec(headers: &HeaderMap) -> Result<Codec, Response> {
    let content_type = content_type(headers);
    content_type
        .strip_prefix("application/connect+")
        .and_then(Codec::from_name)
        .ok_or_else(|| {
            unsupported_media_type(
                &content_type,
                "application/connect+proto, application/connect+json",
            )
        })
}

/// Compression of request messages. Responses are always sent uncompressed, which the
/// protocol allows whatever the client accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    Identity,
    Gzip,
}

impl Compression {
    fn from_header(headers: &HeaderMap, name: &str) -> Result<Self, RpcError> {
        match headers.get(name).and_then(|value| value.to_str().ok()) {
            None | Some("identity") | Some("") => Ok(Compression::Identity),
            Some("gzip") => Ok(Compression::Gzip),
            Some(other) => Err(RpcError::new(
                Code::Unimplemented,
                format!("unsupported compression {other:?}; supported are identity and gzip"),
            )),
        }
    }

    fn decompress(self, data: Bytes) -> Result<Bytes, RpcError> {
        match self {
            Compression::Identity => Ok(data),
            Compression::Gzip => {
                use std::io::Read;
                let mut output = Vec::new();
                flate2::read::GzDecoder::new(&data[..])
                    .take(MAX_MESSAGE_BYTES as u64 + 1)
                    .read_to_end(&mut output)
                    .map_err(|err| RpcError::invalid_argument(format!("invalid gzip message: {err}")))?;
                if output.len() > MAX_MESSAGE_BYTES {
                    return Err(RpcError::new(
                        Code::ResourceExhausted,
                        format!("decompressed message exceeds the limit of {MAX_MESSAGE_BYTES} bytes"),
                    ));
                }
                Ok(Bytes::from(output))
            }
        }
    }
}

/// Serves a unary call: decodes the request, runs `handler`, encodes its result.
pub async fn unary<Req, Res, F, Fut>(request: Request, handler: F) -> Response
where
    Req: RpcMessage,
    Res: RpcMessage,
    F: FnOnce(RpcContext, Req) -> Fut,
    Fut: Future<Output = Result<Res, RpcError>>,
{
    let (parts, body) = request.into_parts();
    let codec = match unary_codec(&parts.headers) {
        Ok(codec) => codec,
        Err(response) => return response,
    };
    let compression = match Compression::from_header(&parts.headers, "content-encoding") {
        Ok(compression) => compression,
        Err(err) => return err.into_response(),
    };
    let context = match RpcContext::from_headers(parts.headers) {
        Ok(context) => context,
        Err(err) => return err.into_response(),
    };

    let data = match axum::body::to_bytes(body, MAX_MESSAGE_BYTES).await {
        Ok(data) => data,
        Err(err) => {
            return RpcError::new(
                Code::ResourceExhausted,
                format!("failed to read request body of at most {MAX_MESSAGE_BYTES} bytes: {err}"),
            )
            .into_response()
        }
    };
    let data = match compression.decompress(data) {
        Ok(data) => data,
        Err(err) => return err.into_response(),
    };
    let message = match codec.decode::<Req>(&data) {
        Ok(message) => message,
        Err(err) => return err.into_response(),
    };

    let result = match context.deadline {
        Some(deadline) => match tokio::time::timeout_at(deadline, handler(context, message)).await {
            Ok(result) => result,
            Err(_) => Err(RpcError::new(Code::DeadlineExceeded, "the call's deadline passed")),
        },
        None => handler(context, message).await,
    };
    match result {
        Ok(response) => {
            let content_type = format!("application/{}", codec.name());
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, content_type)],
                codec.encode(&response),
            )
                .into_response()
        }
        Err(err) => err.into_response(),
    }
}

fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(5 + payload.len());
    frame.put_u8(flags);
    frame.put_u32(payload.len() as u32);
    frame.put_slice(payload);
    frame.freeze()
}

fn end_stream_envelope(error: Option<&RpcError>) -> Bytes {
    let message = match error {
        Some(err) => serde_json::json!({ "error": err.to_json() }),
        None => serde_json::json!({}),
    };
    envelope(END_STREAM_FLAG, message.to_string().as_bytes())
}

fn stream_response(codec: Codec, frames: impl Stream<Item = Bytes> + Send + 'static) -> Response {
    let content_type = format!("application/connect+{}", codec.name());
    let mut response = Response::new(Body::from_stream(frames.map(Ok::<_, Infallible>)));
    if let Ok(value) = HeaderValue::from_str(&content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

/// Turns handler messages into envelopes, ends with the end-of-stream envelope, and ends
/// early with `deadline_exceeded` when the client's deadline passes.
fn frame_messages<Res: RpcMessage>(
    codec: Codec,
    deadline: Option<Instant>,
    messages: ResponseStream<Res>,
) -> impl Stream<Item = Bytes> + Send + 'static {
    enum State<Res> {
        Streaming(ResponseStream<Res>),
        Done,
    }

    futures::stream::unfold(State::Streaming(messages), move |state| async move {
        let mut messages = match state {
            State::Streaming(messages) => messages,
            State::Done => return None,
        };
        let next = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, messages.next()).await {
                Ok(next) => next,
                Err(_) => Some(Err(RpcError::new(
                    Code::DeadlineExceeded,
                    "the stream's deadline passed",
                ))),
            },
            None => messages.next().await,
        };
        match next {
            Some(Ok(message)) => {
                let frame = envelope(0, &codec.encode(&message));
                Some((frame, State::Streaming(messages)))
            }
            Some(Err(err)) => Some((end_stream_envelope(Some(&err)), State::Done)),
            None => Some((end_stream_envelope(None), State::Done)),
        }
    })
}

/// Reads the first envelope of a streaming request body, which carries the request of a
/// server-streaming call.
async fn read_single_envelope<Req: RpcMessage>(
    codec: Codec,
    compression: Compression,
    body: Body,
) -> Result<Req, RpcError> {
    let mut reader = EnvelopeReader::new(body, compression);
    let message = match reader.next_message().await? {
        Some(payload) => codec.decode(&payload)?,
        None => return Err(RpcError::invalid_argument("the request stream has no message")),
    };

    // Read the body to its end before responding. hyper keeps an HTTP/1.1 connection open
    // only when the request body was read completely. Otherwise it closes the connection
    // after the response, racing a client that already reused it for its next request.
    match tokio::time::timeout(REQUEST_END_TIMEOUT, reader.next_message()).await {
        Ok(Ok(None)) => Ok(message),
        Ok(Ok(Some(_))) => Err(RpcError::invalid_argument(
            "a server-streaming call takes exactly one request message",
        )),
        Ok(Err(err)) => Err(err),
        Err(_) => Err(RpcError::invalid_argument(format!(
            "the request body did not end within {REQUEST_END_TIMEOUT:?} after its message"
        ))),
    }
}

/// Time a client gets to end the request body of a server-streaming call after sending
/// its one message. Clients send the whole body at once, so this is only a safeguard.
const REQUEST_END_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves a server-streaming call.
pub async fn server_stream<Req, Res, F, Fut>(request: Request, handler: F) -> Response
where
    Req: RpcMessage,
    Res: RpcMessage,
    F: FnOnce(RpcContext, Req) -> Fut,
    Fut: Future<Output = Result<ResponseStream<Res>, RpcError>>,
{
    let (parts, body) = request.into_parts();
    let codec = match stream_codec(&parts.headers) {
        Ok(codec) => codec,
        Err(response) => return response,
    };
    let started = async {
        let compression = Compression::from_header(&parts.headers, "connect-content-encoding")?;
        let context = RpcContext::from_headers(parts.headers.clone())?;
        let message = read_single_envelope::<Req>(codec, compression, body).await?;
        let deadline = context.deadline;
        Ok::<_, RpcError>((deadline, handler(context, message).await?))
    };
    match started.await {
        Ok((deadline, messages)) => stream_response(codec, frame_messages(codec, deadline, messages)),
        Err(err) => stream_response(codec, futures::stream::iter([end_stream_envelope(Some(&err))])),
    }
}

/// Serves a client-streaming call: the response is one message followed by the end of
/// the stream, or only the end of the stream with an error.
pub async fn client_stream<Req, Res, F, Fut>(request: Request, handler: F) -> Response
where
    Req: RpcMessage,
    Res: RpcMessage,
    F: FnOnce(RpcContext, RequestStream<Req>) -> Fut,
    Fut: Future<Output = Result<Res, RpcError>>,
{
    let (parts, body) = request.into_parts();
    let codec = match stream_codec(&parts.headers) {
        Ok(codec) => codec,
        Err(response) => return response,
    };
    let result = async {
        let compression = Compression::from_header(&parts.headers, "connect-content-encoding")?;
        let context = RpcContext::from_headers(parts.headers.clone())?;
        let reader = EnvelopeReader::new(body, compression);
        let requests = futures::stream::unfold(reader, move |mut reader| async move {
            match reader.next_message().await {
                Ok(Some(payload)) => Some((codec.decode::<Req>(&payload), reader)),
                Ok(None) => None,
                Err(err) => Some((Err(err), reader)),
            }
        });
        let deadline = context.deadline;
        let call = handler(context, Box::pin(requests));
        match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, call)
                .await
                .unwrap_or_else(|_| Err(RpcError::new(Code::DeadlineExceeded, "the call's deadline passed"))),
            None => call.await,
        }
    }
    .await;

    let frames = match result {
        Ok(message) => vec![envelope(0, &codec.encode(&message)), end_stream_envelope(None)],
        Err(err) => vec![end_stream_envelope(Some(&err))],
    };
    stream_response(codec, futures::stream::iter(frames))
}

/// Splits a request body into envelope payloads.
struct EnvelopeReader {
    body: axum::body::BodyDataStream,
    compression: Compression,
    buffer: BytesMut,
    finished: bool,
}

impl EnvelopeReader {
    fn new(body: Body, compression: Compression) -> Self {
        Self {
            body: body.into_data_stream(),
            compression,
            buffer: BytesMut::new(),
            finished: false,
        }
    }

    /// Returns the next message payload, or `None` at the end of the body or at an
    /// end-of-stream envelope.
    async fn next_message(&mut self) -> Result<Option<Bytes>, RpcError> {
        loop {
            if let Some(frame) = self.take_frame()? {
                let (flags, payload) = frame;
                if flags & END_STREAM_FLAG != 0 {
                    self.finished = true;
                    return Ok(None);
                }
                if flags & COMPRESSED_FLAG != 0 {
                    if self.compression == Compression::Identity {
                        return Err(RpcError::invalid_argument(
                            "compressed envelope received but no compression was negotiated",
                        ));
                    }
                    return self.compression.decompress(payload).map(Some);
                }
                return Ok(Some(payload));
            }
            if self.finished {
                if self.buffer.is_empty() {
                    return Ok(None);
                }
                return Err(RpcError::invalid_argument(format!(
                    "request body ended inside an envelope ({} bytes left over)",
                    self.buffer.len()
                )));
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buffer.extend_from_slice(&chunk),
                Some(Err(err)) => {
                    return Err(RpcError::new(
                        Code::Canceled,
                        format!("failed to read the request stream: {err}"),
                    ))
                }
                None => self.finished = true,
            }
        }
    }

    fn take_frame(&mut self) -> Result<Option<(u8, Bytes)>, RpcError> {
        if self.buffer.len() < 5 {
            return Ok(None);
        }
        let length = u32::from_be_bytes([self.buffer[1], self.buffer[2], self.buffer[3], self.buffer[4]]) as usize;
        if length > MAX_MESSAGE_BYTES {
            return Err(RpcError::new(
                Code::ResourceExhausted,
                format!("request message of {length} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes"),
            ));
        }
        if self.buffer.len() < 5 + length {
            return Ok(None);
        }
        let flags = self.buffer[0];
        self.buffer.advance(5);
        Ok(Some((flags, self.buffer.split_to(length).freeze())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_statuses_match_protocol() {
        assert_eq!(Code::NotFound.http_status(), StatusCode::NOT_FOUND);
        assert_eq!(Code::Canceled.http_status().as_u16(), 499);
        assert_eq!(Code::Unauthenticated.http_status(), StatusCode::UNAUTHORIZED);
        assert_eq!(Code::DeadlineExceeded.http_status(), StatusCode::GATEWAY_TIMEOUT);
    }

    #[test]
    fn end_stream_envelope_has_flag_and_error() {
        let frame = end_stream_envelope(Some(&RpcError::not_found("no process 7")));
        assert_eq!(frame[0], END_STREAM_FLAG);
        let length = u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize;
        assert_eq!(length, frame.len() - 5);
        let json: serde_json::Value = serde_json::from_slice(&frame[5..]).unwrap();
        assert_eq!(json["error"]["code"], "not_found");
    }

    #[tokio::test]
    async fn envelope_reader_splits_chunks() {
        let mut data = Vec::new();
        data.extend_from_slice(&envelope(0, b"ab"));
        data.extend_from_slice(&envelope(0, b"cde"));
        let mut reader = EnvelopeReader::new(Body::from(data), Compression::Identity);
        assert_eq!(reader.next_message().await.unwrap().unwrap(), Bytes::from_static(b"ab"));
        assert_eq!(reader.next_message().await.unwrap().unwrap(), Bytes::from_static(b"cde"));
        assert!(reader.next_message().await.unwrap().is_none());
    }
}
