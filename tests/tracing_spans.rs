//! Spans: every log line of a job carries its job id. This test has a binary of its own: a
//! thread-local subscriber shares tracing's global callsite cache with whatever else runs in the
//! process, and tests running beside it could leave a callsite disabled.

use std::sync::Once;
use std::time::Duration;

use cascade_orchestrator::job::JobState;
use cascade_orchestrator::{Orchestrator, SubmitRequest, config};
use serde_json::json;

fn quiet_simulated_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .unwrap_or_default();
            if !msg.starts_with("simulated panic") {
                default(info);
            }
        }));
    });
}

async fn start(toml: &str) -> Orchestrator {
    let model = config::parse_graph_str("test.toml", toml, &Default::default())
        .unwrap_or_else(|e| panic!("{e}"));
    Orchestrator::builder(model)
        .metrics(false)
        .start()
        .await
        .unwrap()
}

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
    assert!(line.contains("step{agent=crashy attempt=1}"), "{line}");
}
