//! The data plane's calls, framed here instead of by tonic's generic
//! server. Every `KeyBroker` method is unary: the request is one
//! length-prefixed message in (usually) one HTTP/2 DATA frame, the answer
//! one message and the `grpc-status` trailer. tonic's generated server runs
//! such a call through its streaming machinery (a decoder state machine
//! over an 8 KiB buffer, the response as a one-item stream encoded into
//! another, the OK status built and percent-encoded as a header map, two
//! more boxed futures); here the request's frame is decoded in place and
//! the answer is one buffer of its exact size.
//!
//! A call naming a `grpc-encoding` (a compressed request) goes to tonic's
//! generated server, which answers it as before (UNIMPLEMENTED: keybroker
//! accepts no compression). Every error a malformed request gets here has
//! the code and message tonic's server gives it (a size limit also names
//! its setting).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::BodyExt;
use keybroker_client::pb::key_broker_server::KeyBrokerServer;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::{Code, Status};

use super::key_broker::KeyBrokerService;

/// The gRPC message prefix: a compression flag and a big-endian length.
const PREFIX: usize = 5;

/// The header naming a request's compression (a constant: no parse of the
/// name per call).
const GRPC_ENCODING: http::HeaderName = http::HeaderName::from_static("grpc-encoding");

type Answer = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

/// The `KeyBroker` service as served: its unary calls framed here, a
/// compressed request through tonic's generated server.
#[derive(Clone)]
pub struct DataPlane(Arc<Inner>);

/// What a [`DataPlane`] shares with its clones (tonic clones the service
/// per call: one reference count here).
struct Inner {
    service: Arc<KeyBrokerService>,
    generated: KeyBrokerServer<KeyBrokerService>,
    /// Largest message accepted and sent (`max_message_bytes`).
    max_message: usize,
}

impl DataPlane {
    /// `service`, taking and giving messages of at most `max_message` bytes.
    pub fn new(service: KeyBrokerService, max_message: usize) -> Self {
        let service = Arc::new(service);
        let generated = KeyBrokerServer::from_arc(service.clone())
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message);
        Self(Arc::new(Inner { service, generated, max_message }))
    }
}

impl NamedService for DataPlane {
    const NAME: &'static str = <KeyBrokerServer<KeyBrokerService> as NamedService>::NAME;
}

/// Serves one unary call of `$method` on `$self`'s service.
macro_rules! serve {
    ($self:ident, $request:ident, $method:ident) => {{
        let inner = $self.0.clone();
        Box::pin(async move {
            let max = inner.max_message;
            Ok(unary($request, max, |r| async move { inner.service.$method(r).await }).await)
        })
    }};
}

impl tower::Service<http::Request<Body>> for DataPlane {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Answer {
        if request.headers().contains_key(GRPC_ENCODING) {
            return self.0.generated.clone().call(request);
        }
        let method = request.uri().path().strip_prefix(concat!("/", "keybroker.v1.KeyBroker", "/"));
        match method {
            Some("Wrap") => serve!(self, request, wrap),
            Some("Unwrap") => serve!(self, request, unwrap),
            Some("GenerateDataKey") => serve!(self, request, generate_data_key),
            Some("Rewrap") => serve!(self, request, rewrap),
            Some("BatchWrap") => serve!(self, request, batch_wrap),
            Some("BatchUnwrap") => serve!(self, request, batch_unwrap),
            Some("BatchRewrap") => serve!(self, request, batch_rewrap),
            // UNIMPLEMENTED, as the generated server answers it.
            _ => self.0.generated.clone().call(request),
        }
    }
}

/// Decodes the one message of `request`, calls `handle` with it and
/// encodes its answer (or its error, as a trailers-only response).
async fn unary<Req, Resp, F, Fut>(request: http::Request<Body>, max: usize, handle: F) -> http::Response<Body>
where
    Req: prost::Message + Default,
    Resp: prost::Message,
    F: FnOnce(tonic::Request<Req>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    let (mut parts, body) = request.into_parts();
    let (message, trailers) = match read_message::<Req>(body, max).await {
        Ok(read) => read,
        Err(status) => return status.into_http(),
    };
    // Trailers the caller sent join its metadata, as in tonic.
    if let Some(trailers) = trailers {
        parts.headers.extend(trailers);
    }
    let request = tonic::Request::from_http(http::Request::from_parts(parts, message));
    match handle(request).await {
        Ok(response) => encode(response, max),
        Err(status) => status.into_http(),
    }
}

/// The request's message (the first, as tonic's unary server reads it:
/// any further bytes are read and dropped) and its trailers, if any.
async fn read_message<M: prost::Message + Default>(
    mut body: Body,
    max: usize,
) -> Result<(M, Option<http::HeaderMap>), Status> {
    // The message's bytes: the frame they came in (the usual case, no copy)
    // or, split over frames, joined.
    let mut whole = Bytes::new();
    let mut joined: Option<BytesMut> = None;
    // Prefix and message length, once the prefix is in.
    let mut want: Option<usize> = None;
    let mut done = false;
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            // A reset request reads as its end, as in tonic.
            Err(status) if status.code() == Code::Cancelled => break,
            Err(status) => return Err(status),
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                trailers = frame.into_trailers().ok();
                continue;
            }
        };
        if done || data.is_empty() {
            continue;
        }
        match &mut joined {
            None if whole.is_empty() => whole = data,
            None => {
                let mut buf = BytesMut::with_capacity(whole.len() + data.len());
                buf.put(std::mem::take(&mut whole));
                buf.put(data);
                joined = Some(buf);
            }
            Some(buf) => {
                let room = want.map_or(usize::MAX, |w| w.saturating_sub(buf.len()));
                buf.put(data.slice(..data.len().min(room)));
            }
        }
        let have: &[u8] = joined.as_deref().unwrap_or(&whole);
        if want.is_none() && have.len() >= PREFIX {
            want = Some(PREFIX + message_len(have, max)?);
        }
        done = want.is_some_and(|w| have.len() >= w);
    }
    let bytes = match joined {
        Some(buf) => buf.freeze(),
        None => whole,
    };
    match want {
        Some(w) if bytes.len() >= w => {
            let mut message = bytes.slice(PREFIX..w);
            let decoded = M::decode(&mut message).map_err(|e| Status::internal(e.to_string()))?;
            Ok((decoded, trailers))
        }
        _ if bytes.is_empty() => Err(Status::internal("Missing request message.")),
        _ => Err(Status::internal("Unexpected EOF decoding stream.")),
    }
}

/// The length a message's prefix gives, checked as tonic checks it.
fn message_len(prefix: &[u8], max: usize) -> Result<usize, Status> {
    let mut prefix = prefix;
    match prefix.get_u8() {
        0 => {}
        1 => {
            return Err(Status::internal(
                "protocol error: received message with compressed-flag but no grpc-encoding was specified",
            ));
        }
        f => {
            return Err(Status::internal(format!(
                "protocol error: received message with invalid compression flag: {f} (valid flags are 0 and 1), \
                 while sending request"
            )));
        }
    }
    let len = prefix.get_u32() as usize;
    if len > max {
        return Err(Status::out_of_range(format!(
            "Error, decoded message length too large: found {len} bytes, the limit is: {max} bytes \
             (limits.max_message_bytes)"
        )));
    }
    Ok(len)
}

/// The response's headers (the metadata the service set, less the names
/// gRPC reserves) and its message in one buffer of its exact size.
fn encode<M: prost::Message>(response: tonic::Response<M>, max: usize) -> http::Response<Body> {
    let (metadata, message, extensions) = response.into_parts();
    let len = message.encoded_len();
    let Some(prefix_len) = u32::try_from(len).ok().filter(|_| len <= max) else {
        return Status::out_of_range(format!(
            "Error, encoded message length too large: found {len} bytes, the limit is: {max} bytes \
             (limits.max_message_bytes)"
        ))
        .into_http();
    };
    let mut buf = BytesMut::with_capacity(PREFIX + len);
    buf.put_u8(0);
    buf.put_u32(prefix_len);
    message.encode_raw(&mut buf);
    let mut headers = metadata.into_headers();
    for reserved in ["te", "grpc-message", "grpc-message-type", "grpc-status"] {
        headers.remove(reserved);
    }
    headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    let mut response = http::Response::new(Body::new(OneMessage { message: Some(buf.freeze()), ended: false }));
    *response.version_mut() = http::Version::HTTP_2;
    *response.headers_mut() = headers;
    *response.extensions_mut() = extensions;
    response
}

/// A response body of one message, then the OK status.
struct OneMessage {
    message: Option<Bytes>,
    ended: bool,
}

impl http_body::Body for OneMessage {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if let Some(message) = this.message.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(message))));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        this.ended = true;
        let mut trailers = http::HeaderMap::with_capacity(1);
        trailers.insert(Status::GRPC_STATUS, http::HeaderValue::from_static("0"));
        Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}
