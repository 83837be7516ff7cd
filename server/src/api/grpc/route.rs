//! The data plane's own route. tonic's router matches every path against
//! each service (axum's matcher, a boxed clone of the service and two
//! re-boxings of the body per call); a call whose path names the
//! `KeyBroker` service goes straight to it here (the router does not hold
//! it), and every other path (the admin plane, health, reflection) through
//! the router.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;

/// Puts the data plane `D` in front of tonic's router.
#[derive(Debug, Clone)]
pub struct DataPlaneRoute<D> {
    data_plane: D,
}

impl<D> DataPlaneRoute<D> {
    /// A layer that sends `data_plane`'s calls to it and the rest on.
    pub fn new(data_plane: D) -> Self {
        Self { data_plane }
    }
}

impl<D: Clone, R> tower::Layer<R> for DataPlaneRoute<D> {
    type Service = Routed<D, R>;

    fn layer(&self, routes: R) -> Self::Service {
        Routed { data_plane: self.data_plane.clone(), routes }
    }
}

/// The data plane and tonic's router, one call routed to either.
#[derive(Debug, Clone)]
pub struct Routed<D, R> {
    data_plane: D,
    routes: R,
}

/// Whether `path` is `/<service>/<method>` of the service named `service`.
fn names_service(path: &str, service: &str) -> bool {
    path.strip_prefix('/').and_then(|p| p.strip_prefix(service)).is_some_and(|rest| rest.starts_with('/'))
}

impl<D, R> tower::Service<http::Request<Body>> for Routed<D, R>
where
    D: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible> + NamedService,
    D::Future: Unpin,
    R: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    R::Future: Unpin,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Either<D::Future, R::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match (self.data_plane.poll_ready(cx), self.routes.poll_ready(cx)) {
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if names_service(request.uri().path(), D::NAME) {
            Either::DataPlane(self.data_plane.call(request))
        } else {
            Either::Routes(self.routes.call(request))
        }
    }
}

/// The future of a call routed to either service.
#[derive(Debug)]
pub enum Either<A, B> {
    /// A data plane call.
    DataPlane(A),
    /// Any other call.
    Routes(B),
}

impl<A, B, T> Future for Either<A, B>
where
    A: Future<Output = T> + Unpin,
    B: Future<Output = T> + Unpin,
{
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match self.get_mut() {
            Either::DataPlane(f) => Pin::new(f).poll(cx),
            Either::Routes(f) => Pin::new(f).poll(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::names_service;

    #[test]
    fn only_the_services_own_paths_are_routed_to_it() {
        let service = "keybroker.v1.KeyBroker";
        assert!(names_service("/keybroker.v1.KeyBroker/Wrap", service));
        assert!(names_service("/keybroker.v1.KeyBroker/", service));
        assert!(!names_service("/keybroker.v1.KeyBrokerX/Wrap", service));
        assert!(!names_service("/keybroker.v1.KeyAdmin/Rotate", service));
        assert!(!names_service("keybroker.v1.KeyBroker/Wrap", service));
        assert!(!names_service("/keybroker.v1.KeyBroker", service));
        assert!(!names_service("/grpc.health.v1.Health/Check", service));
    }
}
