//! A stand-in OTLP/gRPC trace collector, built from the OTLP protobuf definitions
//! (opentelemetry-proto), that records what it receives on 127.0.0.1.

use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

/// One export as received: its `x-api-key` header and its spans.
pub type Export = (Option<String>, ExportTraceServiceRequest);

/// What the stand-in collector received.
#[derive(Clone, Default)]
pub struct Collector {
    pub exports: Arc<Mutex<Vec<Export>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let key = request
            .metadata()
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        self.exports
            .lock()
            .unwrap()
            .push((key, request.into_inner()));
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Serve on 127.0.0.1; returns the port.
    pub async fn start(&self) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let svc = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .unwrap();
        });
        port
    }
}
