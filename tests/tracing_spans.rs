//! Spans: every log line of a job carries its job id. This test has a binary of its own: a
//! thread-local subscriber shares tracing's global callsite cache with whatever else runs in the
//! process, and tests running beside it could leave a callsite disabled.

use std::time::Duration;

use cascade_orchestrator::SubmitRequest;
use cascade_orchestrator::job::JobState;

mod common;
use common::{quiet_simulated_panics, start};
use serde_json::json;

/// Log lines written inside a job carry its id: a test subscriber captures them.
#[tokio::test]
async fn spans_carry_the_job_id() {
    #[derive(Clone, Default)]
    struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    quiet_simulated_panics();
    let buf = Buf::default();
    let sink = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let orch = start(
        "[graph]\nname = \"traced\"\n[agents.crashy]\nkind = \"sim\"\npanic_rate = 1.0\nretry = { max_attempts = 1 }\n",
    )
    .await;
    let id = orch
        .submit(SubmitRequest::new("traced", json!({})))
        .await
        .unwrap()
        .id;
    assert_eq!(orch.wait(id).await.unwrap().state, JobState::Failed);
    orch.shutdown(Duration::from_secs(1)).await;
    let logs = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let line = logs
        .lines()
        .find(|l| l.contains("agent call panicked"))
        .unwrap_or_else(|| panic!("no panic log in:\n{logs}"));
    assert!(
        line.contains(&format!("job{{job_id={id} graph=traced}}")),
        "{line}"
    );
    assert!(
        line.contains("step{agent=crashy attempt=1 outcome=panicked}"),
        "{line}"
    );
}
