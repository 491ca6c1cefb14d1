//! The gRPC glue for one unary method, written out instead of generated: the route
//! `/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit` to
//! [`RateLimitService::should_rate_limit`], protobuf by `tonic_prost`.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use tollgate_rls_proto::{RateLimitRequest, RateLimitResponse};
use tonic::codegen::{http, Body, BoxFuture, Service, StdError};
use tonic::server::{Grpc, NamedService, UnaryService};

use crate::service::{Failure, RateLimitService};

/// The full path of the method.
pub const PATH: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

/// A tower service answering `ShouldRateLimit` for tonic's server.
#[derive(Clone)]
pub struct RlsServer {
    inner: Arc<RateLimitService>,
}

impl RlsServer {
    /// Serve `service`.
    pub fn new(service: RateLimitService) -> Self {
        RlsServer {
            inner: Arc::new(service),
        }
    }
}

impl NamedService for RlsServer {
    const NAME: &'static str = tollgate_rls_proto::SERVICE;
}

struct ShouldRateLimit(Arc<RateLimitService>);

impl UnaryService<RateLimitRequest> for ShouldRateLimit {
    type Response = RateLimitResponse;
    type Future = BoxFuture<tonic::Response<RateLimitResponse>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<RateLimitRequest>) -> Self::Future {
        let inner = Arc::clone(&self.0);
        Box::pin(async move {
            match inner.should_rate_limit(request.get_ref()).await {
                Ok(answer) => Ok(tonic::Response::new(answer)),
                Err(Failure::Timeout) => Err(tonic::Status::unavailable("storage timed out")),
                Err(Failure::Storage(_)) => Err(tonic::Status::unavailable("storage failed")),
                Err(Failure::FastFail) => Err(tonic::Status::unavailable("storage down")),
            }
        })
    }
}

impl<B> Service<http::Request<B>> for RlsServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != PATH {
            return Box::pin(async move {
                Ok(tonic::Status::unimplemented("unknown method").into_http())
            });
        }
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            let mut grpc = Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(ShouldRateLimit(inner), req).await)
        })
    }
}
