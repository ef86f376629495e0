//! `[server.limits]` over real gRPC and HTTP: each limit, met, answers a clear error naming it
//! (INVALID_ARGUMENT or HTTP 400 for a value too big; RESOURCE_EXHAUSTED or HTTP 429 with a retry
//! delay for a rate or a count), a page is served at the largest size, and nothing accepted is
//! touched.

mod common;

use std::time::Duration;

use cascade_orchestrator::api::pb;
use cascade_orchestrator::api::pb::cascade_client::CascadeClient;
use cascade_orchestrator::limits::ServerLimits;
use cascade_orchestrator::{Orchestrator, auth, config};
use tonic::Code;
use tonic_types::StatusExt;

type AddAuth =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;
type Client = CascadeClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, AddAuth>,
>;

/// A server with one key (acme, submit + read) held to `limits`; the key.
async fn serve(
    limits: ServerLimits,
) -> (
    std::sync::Arc<Orchestrator>,
    cascade_orchestrator::server::RunningServer,
    String,
) {
    let key = auth::generate_key();
    let dir = common::server_dir(
        &[(
            "g.toml",
            "[graph]\nname = \"g\"\n[agents.a]\nkind = \"sim\"\nlatency = \"20s\"\n",
        )],
        &format!(
            "[[auth.api_keys]]\nname = \"acme-app\"\ntenant = \"acme\"\nroles = [\"submit\", \"read\"]\nhash = \"{}\"\n",
            auth::sha256_hash(&key)
        ),
    );
    let model = config::load(
        Some(&dir.path().join("cascade.toml")),
        &[],
        &Default::default(),
    )
    .unwrap();
    let orch = std::sync::Arc::new(Orchestrator::builder(model).start().await.unwrap());
    let server = cascade_orchestrator::server::start(
        orch.clone(),
        cascade_orchestrator::server::ServerOptions {
            grpc_addr: "127.0.0.1:0".parse().unwrap(),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            webhook_secret: Some(cascade_orchestrator::secret::Secret::new(b"whsec".to_vec())),
            limits,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    (orch, server, key)
}

async fn client(grpc: std::net::SocketAddr, key: &str) -> Client {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let header: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
        format!("Bearer {key}").parse().unwrap();
    let add: AddAuth = Box::new(move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", header.clone());
        Ok(req)
    });
    CascadeClient::with_interceptor(channel, add)
}

fn submit(input: &str) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        graph: "g".into(),
        input_json: input.into(),
        ..Default::default()
    }
}

async fn watch(
    c: &mut Client,
    id: &str,
) -> Result<tonic::Response<tonic::Streaming<pb::JobEvent>>, tonic::Status> {
    c.watch_job(pb::WatchJobRequest { job_id: id.into() }).await
}

/// The error names `limit`, and for INVALID_ARGUMENT the field at fault.
fn names(e: &tonic::Status, code: Code, limit: &str) {
    assert_eq!(e.code(), code, "{e:?}");
    assert!(e.message().contains(limit), "{limit} not named: {e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_limit_is_a_clear_error_naming_it() {
    let (_orch, server, key) = serve(ServerLimits {
        max_json_depth: 8,
        max_idempotency_key_bytes: 16,
        max_string_bytes: 32,
        max_labels: 2,
        max_page_size: 3,
        watch_streams_per_identity: 2,
        max_message_bytes: 64 << 10,
        ..Default::default()
    })
    .await;
    let mut c = client(server.grpc_addr, &key).await;

    // Input nesting: eight levels pass, nine do not.
    let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    c.submit_job(submit(&deep(8))).await.unwrap();
    let e = c.submit_job(submit(&deep(9))).await.unwrap_err();
    names(&e, Code::InvalidArgument, "max_json_depth");
    // A thousand levels are refused before any parser recurses into them.
    let e = c.submit_job(submit(&deep(1000))).await.unwrap_err();
    names(&e, Code::InvalidArgument, "max_json_depth");

    let mut keyed = submit("{}");
    keyed.idempotency_key = "k".repeat(17);
    let e = c.submit_job(keyed).await.unwrap_err();
    names(&e, Code::InvalidArgument, "max_idempotency_key_bytes");
    let e = c
        .submit_job(pb::SubmitJobRequest {
            graph: "g".repeat(33),
            ..submit("{}")
        })
        .await
        .unwrap_err();
    names(&e, Code::InvalidArgument, "max_string_bytes");
    let mut labelled = submit("{}");
    labelled.labels = [("a", "1"), ("b", "2"), ("c", "3")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let e = c.submit_job(labelled).await.unwrap_err();
    names(&e, Code::InvalidArgument, "max_labels");
    let e = c
        .submit_job(submit(&format!("{{\"x\": \"{}\"}}", "x".repeat(100 << 10))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");

    // Pages are served at the largest size, with a token for the next.
    for _ in 0..4 {
        c.submit_job(submit("{}")).await.unwrap();
    }
    let page = c
        .list_jobs(pb::ListJobsRequest {
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.jobs.len(), 3);
    assert!(!page.next_page_token.is_empty());

    // Two watch streams per identity: the third waits for one to close.
    let id = page.jobs[0].job_id.clone();
    let first = watch(&mut c, &id).await.unwrap();
    let _second = watch(&mut c, &id).await.unwrap();
    let e = watch(&mut c, &id).await.unwrap_err();
    names(&e, Code::ResourceExhausted, "watch_streams_per_identity");
    assert!(e.get_details_retry_info().is_some());
    drop(first);
    let mut third = None;
    for _ in 0..50 {
        match watch(&mut c, &id).await {
            Ok(s) => {
                third = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(third.is_some(), "a closed stream gives its place back");

    // The webhook: the same limits, as HTTP 400s naming them.
    let http = reqwest::Client::new();
    let hook = |key: &str, body: String| {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let secret = cascade_orchestrator::secret::Secret::new(b"whsec".to_vec());
        http.post(format!("http://{}/hooks/g", server.http_addr))
            .header("x-cascade-timestamp", ts.to_string())
            .header(
                "x-cascade-signature",
                cascade_orchestrator::secret::sign_keyed(&secret, ts, Some(key), body.as_bytes()),
            )
            .header("idempotency-key", key)
            .body(body)
    };
    let r = hook("hook-1", deep(9)).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("max_json_depth"));
    let r = hook(&"k".repeat(17), "{}".into()).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("max_idempotency_key_bytes")
    );
    let r = hook("hook-2", "{}".into()).send().await.unwrap();
    assert_eq!(r.status(), 202, "within the limits: accepted");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_over_its_request_rate_is_told_when_to_come_back() {
    let (_orch, server, key) = serve(ServerLimits {
        requests_per_second_per_identity: 5.0,
        ..Default::default()
    })
    .await;
    let mut c = client(server.grpc_addr, &key).await;
    let mut refused = None;
    for _ in 0..20 {
        if let Err(e) = c.list_graphs(pb::ListGraphsRequest {}).await {
            refused = Some(e);
            break;
        }
    }
    let e = refused.expect("refused within a burst of 20");
    names(
        &e,
        Code::ResourceExhausted,
        "requests_per_second_per_identity",
    );
    let wait = e
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .expect("a retry delay");
    assert!(wait <= Duration::from_millis(200), "{wait:?}");
    // HTTP counts against the same identity.
    let r = reqwest::Client::new()
        .get(format!("http://{}/api/graphs", server.http_addr))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    tokio::time::sleep(Duration::from_millis(400)).await;
    c.list_graphs(pb::ListGraphsRequest {})
        .await
        .expect("let in again once the delay passed");
    server.stop().await;
}

/// `streams_per_connection`: one connection carries that many calls at once; the next waits
/// for one to end (HTTP/2's own limit, which the client honours), and another connection is
/// not held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_carries_at_most_its_streams() {
    let (orch, server, key) = serve(ServerLimits {
        streams_per_connection: 2,
        ..Default::default()
    })
    .await;
    let mut c = client(server.grpc_addr, &key).await;
    let id = c
        .submit_job(submit("{}"))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    // Two watches of a job that runs 20 s hold the connection's two streams.
    let first = watch(&mut c, &id).await.unwrap();
    let _second = watch(&mut c, &id).await.unwrap();
    let waited = tokio::time::timeout(Duration::from_millis(500), watch(&mut c, &id)).await;
    assert!(waited.is_err(), "a third stream on the connection waits");
    // Another connection is served meanwhile.
    let mut other = client(server.grpc_addr, &key).await;
    other.list_graphs(pb::ListGraphsRequest {}).await.unwrap();
    drop(first);
    tokio::time::timeout(Duration::from_secs(5), watch(&mut c, &id))
        .await
        .expect("a stream freed lets the next in")
        .unwrap();
    server.stop().await;
    orch.shutdown(Duration::from_millis(10)).await;
}
