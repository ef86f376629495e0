//! Faults that hostile and unlucky clients find, each against a real `cascade serve` process over
//! real gRPC or HTTP on 127.0.0.1, with its SQLite store in a temporary directory.

mod common;

use std::time::{Duration, Instant};

use cascade_orchestrator::api::pb;
use cascade_orchestrator::api::pb::cascade_client::CascadeClient;
use tonic::transport::Channel;

const QUICK: &str = r#"
[graph]
name = "quick"
max_pending_jobs = 10000
[agents.a]
kind = "sim"
[agents.b]
kind = "sim"
after = ["a"]
"#;

async fn submit_keyed(
    client: &mut CascadeClient<Channel>,
    key: &str,
) -> Result<pb::SubmitJobResponse, tonic::Status> {
    client
        .submit_job(pb::SubmitJobRequest {
            graph: "quick".into(),
            input_json: format!(r#"{{"key": "{key}"}}"#),
            idempotency_key: key.into(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Wait until the job has ended; its final state.
async fn ended(client: &mut CascadeClient<Channel>, id: &str) -> pb::Job {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let job = client
            .get_job(pb::GetJobRequest { job_id: id.into() })
            .await
            .unwrap()
            .into_inner();
        if job.state >= pb::JobState::Succeeded as i32 {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} did not end: {job:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Submit `key` together with 63 fresh keys, all at once (so that they share the store's group
/// commits); every one must be accepted and run.
async fn reuse_in_a_batch(client: &CascadeClient<Channel>, key: &str, round: &str) -> String {
    let mut calls = Vec::new();
    for i in 0..64 {
        let mut c = client.clone();
        let k = if i == 32 {
            key.to_string()
        } else {
            format!("fresh-{round}-{i}")
        };
        calls.push(tokio::spawn(async move {
            let r = submit_keyed(&mut c, &k).await;
            (k, r)
        }));
    }
    let mut reused = None;
    let mut c = client.clone();
    for call in calls {
        let (k, r) = call.await.unwrap();
        let r = r.unwrap_or_else(|e| panic!("submission of {k:?} refused: {e:?}"));
        let job = ended(&mut c, &r.job_id).await;
        assert_eq!(job.state, pb::JobState::Succeeded as i32, "{k}: {job:?}");
        if k == key {
            reused = Some(r.job_id);
        }
    }
    reused.unwrap()
}

/// An idempotency key past the retention is free to reuse, and reusing it inside a group commit
/// fails none of the unrelated submissions committed with it — while the server runs, and after
/// a restart (when the old row is only on disk).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_key_reused_in_a_batch_fails_nothing() {
    let dir = common::server_dir(&[("quick.toml", QUICK)], "[server]\nretention = \"1s\"\n");
    let (grpc, http) = (common::free_port(), common::free_port());
    let mut server = common::spawn(dir.path(), grpc, http);
    let mut client = common::connect(grpc).await;
    let old = submit_keyed(&mut client, "order-1").await.unwrap().job_id;
    let old2 = submit_keyed(&mut client, "order-2").await.unwrap().job_id;
    ended(&mut client, &old).await;
    ended(&mut client, &old2).await;
    // Within the retention, the key names the job it started.
    let again = submit_keyed(&mut client, "order-1").await.unwrap();
    assert_eq!(again.job_id, old);
    assert!(again.deduplicated);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let new = reuse_in_a_batch(&client, "order-1", "a").await;
    assert_ne!(new, old, "an expired key starts a new job");
    // The new job now holds the key.
    let again = submit_keyed(&mut client, "order-1").await.unwrap();
    assert_eq!(
        (again.job_id.as_str(), again.deduplicated),
        (new.as_str(), true)
    );

    // After a restart the old holder of "order-2" is only on disk, past the retention.
    server.terminate();
    drop(client);
    let _server = common::spawn(dir.path(), grpc, http);
    let client = common::connect(grpc).await;
    let new2 = reuse_in_a_batch(&client, "order-2", "b").await;
    assert_ne!(
        new2, old2,
        "an expired key starts a new job after a restart too"
    );
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(!log.contains("UNIQUE constraint"), "{log}");
}
