//! Triggers end to end, in this process: provider webhooks at `/hooks/{graph}/{trigger}` signed as
//! each provider signs them (Slack's and GitHub's documented examples are unit tests of the
//! verifiers), their answers (accepted, duplicate, replay, dropped, full graph, paused trigger),
//! the operations over gRPC, and schedules on a paused clock across restarts.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cascade_orchestrator::api::pb;
use cascade_orchestrator::triggers::{TriggerSource, schedule};
use ring::hmac;
use serde_json::{Value, json};

const SECRET: &str = "trigger-test-secret";

fn hex_hmac(secret: &[u8], parts: &[&[u8]]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut ctx = hmac::Context::with_key(&key);
    for p in parts {
        ctx.update(p);
    }
    ctx.sign()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn graph(secret_file: &std::path::Path) -> String {
    let s = secret_file.display();
    format!(
        r#"
[graph]
name = "desk"
max_in_flight_jobs = 1
max_pending_jobs = 2

[[graph.triggers]]
name = "slack"
kind = "webhook"
verify = "slack"
secret = "file:{s}"
input = {{ text = "{{{{ event.event.text }}}}", user = "{{{{ event.event.user }}}}" }}

[[graph.triggers]]
name = "github"
kind = "webhook"
verify = "github"
secret = "file:{s}"
when = "headers['x-github-event'] == 'issues' and event.action == 'opened'"
input = {{ issue = "{{{{= event.issue.number }}}}", title = "{{{{ event.issue.title }}}}" }}

[[graph.triggers]]
name = "stripe"
kind = "webhook"
verify = "stripe"
secret = "file:{s}"
input = {{ event_type = "{{{{ event.type }}}}", customer = "{{{{ event.data.object.id }}}}" }}

[[graph.triggers]]
name = "zendesk"
kind = "webhook"
verify = "zendesk"
secret = "file:{s}"
input = {{ ticket = "{{{{= event.ticket.id }}}}" }}

[[graph.triggers]]
name = "signed"
kind = "webhook"
verify = "cascade"
secret = "file:{s}"

[quotas.crm]
requests_per_second = 1000

[agents.triage]
kind = "sim"
quota = "crm"
"#
    )
}

struct Desk {
    orch: Arc<cascade_orchestrator::Orchestrator>,
    server: cascade_orchestrator::server::RunningServer,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Desk {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
        let model = cascade_orchestrator::config::parse_graph_str(
            "desk.toml",
            &graph(&secret),
            &Default::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let (orch, server) = common::serve_in_process(model).await;
        Self {
            orch,
            server,
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    async fn post(
        &self,
        trigger: &str,
        headers: &[(&str, String)],
        body: &str,
    ) -> (u16, Option<u64>, Value) {
        let mut req = self
            .http
            .post(format!(
                "http://{}/hooks/desk/{trigger}",
                self.server.http_addr
            ))
            .body(body.to_string());
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let body = resp.json().await.unwrap_or(Value::Null);
        (status, retry_after, body)
    }

    async fn slack(&self, ts: u64, body: &str, secret: &str) -> (u16, Option<u64>, Value) {
        let sig = format!(
            "v0={}",
            hex_hmac(
                secret.as_bytes(),
                &[format!("v0:{ts}:").as_bytes(), body.as_bytes()]
            )
        );
        self.post(
            "slack",
            &[
                ("x-slack-request-timestamp", ts.to_string()),
                ("x-slack-signature", sig),
                ("content-type", "application/json".into()),
            ],
            body,
        )
        .await
    }

    async fn stripe(&self, id: &str) -> (u16, Option<u64>, Value) {
        self.stripe_at(id, now()).await
    }

    /// A Stripe event `id`, signed at `t`.
    async fn stripe_at(&self, id: &str, t: u64) -> (u16, Option<u64>, Value) {
        let body = json!({"id": id, "object": "event", "type": "customer.created",
                          "data": {"object": {"id": "cus_1"}}})
        .to_string();
        let sig = hex_hmac(
            SECRET.as_bytes(),
            &[format!("{t}.").as_bytes(), body.as_bytes()],
        );
        self.post(
            "stripe",
            &[("stripe-signature", format!("t={t},v1={sig}"))],
            &body,
        )
        .await
    }

    async fn job_input(&self, id: &Value) -> Value {
        let id = id.as_str().unwrap().parse().unwrap();
        let job = self.orch.get(id).unwrap().unwrap();
        (*job.input).clone()
    }
}

/// Each provider's scheme: a correctly signed request starts a job with the mapped input; a
/// wrong signature and a stale timestamp are refused (401); a replayed request starts nothing
/// (200, `replay`); a provider's redelivery of the same event (a new signature) is the job it
/// started (200, `deduplicated`); Slack's URL challenge is answered; `when` drops what nobody
/// asked for (200); the counts show in ListTriggers, GetGraph and `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_webhooks_verify_dedupe_and_map_events() {
    let desk = Desk::start().await;

    // Slack: the URL challenge, then an event, its retry, a replay, a forgery, a stale one.
    let (status, _, body) = desk
        .slack(now(), r#"{"type":"url_verification","challenge":"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P","token":"Jhj5dZrVaK7ZwHHjRyZWjbDl"}"#, SECRET)
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        body["challenge"],
        "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"
    );
    let event = r#"{"type":"event_callback","event_id":"Ev08MFMKH6","event":{"type":"app_mention","user":"U061F7AUR","text":"<@U0LAN0Z89> is it everything a river should be?"}}"#;
    let ts = now();
    let (status, _, first) = desk.slack(ts, event, SECRET).await;
    assert_eq!(status, 202, "{first}");
    assert_eq!(first["deduplicated"], false);
    assert_eq!(
        desk.job_input(&first["job_id"]).await,
        json!({"text": "<@U0LAN0Z89> is it everything a river should be?", "user": "U061F7AUR"})
    );
    // Slack's retry of the same event: signed anew one second later.
    let (status, _, retry) = desk.slack(ts + 1, event, SECRET).await;
    assert_eq!(
        (status, &retry["job_id"], &retry["deduplicated"]),
        (200, &first["job_id"], &json!(true))
    );
    // The very same request again: a replay, which starts nothing.
    let (status, _, replay) = desk.slack(ts, event, SECRET).await;
    assert_eq!((status, &replay["replay"]), (200, &json!(true)));
    let (status, _, forged) = desk.slack(now(), event, "not-the-secret").await;
    assert_eq!(status, 401);
    assert!(
        forged["error"].as_str().unwrap().contains("does not match"),
        "{forged}"
    );
    let (status, _, stale) = desk.slack(now() - 600, event, SECRET).await;
    assert_eq!(status, 401);
    assert!(
        stale["error"]
            .as_str()
            .unwrap()
            .contains("away from the server's clock"),
        "{stale}"
    );

    // GitHub: an issue opened starts a job; a ping is dropped by `when`; a tampered body is 401.
    let issue = json!({"action": "opened", "issue": {"number": 1347, "title": "Found a bug"},
                       "repository": {"full_name": "octocat/Hello-World"}})
    .to_string();
    let gh = |event: &'static str, delivery: &'static str, body: &str| {
        vec![
            ("x-github-event", event.to_string()),
            ("x-github-delivery", delivery.to_string()),
            (
                "x-hub-signature-256",
                format!("sha256={}", hex_hmac(SECRET.as_bytes(), &[body.as_bytes()])),
            ),
        ]
    };
    let delivery = gh("issues", "72d3162e-cc78-11e3-81ab-4c9367dc0958", &issue);
    let (status, _, opened) = desk.post("github", &delivery, &issue).await;
    assert_eq!(status, 202, "{opened}");
    // The same bytes again (a replay, or GitHub's redelivery within minutes): no second job.
    let (status, _, replay) = desk.post("github", &delivery, &issue).await;
    assert_eq!((status, &replay["replay"]), (200, &json!(true)), "{replay}");
    assert_eq!(
        desk.job_input(&opened["job_id"]).await,
        json!({"issue": 1347, "title": "Found a bug"})
    );
    let ping = r#"{"zen":"Design for failure.","hook_id":1}"#;
    let (status, _, dropped) = desk.post("github", &gh("ping", "d-ping", ping), ping).await;
    assert_eq!((status, &dropped["dropped"]), (200, &json!(true)));
    let mut tampered = gh("issues", "d-2", &issue);
    tampered[2].1 = format!("sha256={}", "0".repeat(64));
    assert_eq!(desk.post("github", &tampered, &issue).await.0, 401);

    // Stripe: accepted, then the same event id redelivered with a fresh signature.
    let t = now();
    let (status, _, charge) = desk.stripe_at("evt_1NG8Du2eZvKYlo2CUI79vXWy", t).await;
    assert_eq!(status, 202, "{charge}");
    // The very same request again (same timestamp, same signature): a replay, no second job.
    let (status, _, replay) = desk.stripe_at("evt_1NG8Du2eZvKYlo2CUI79vXWy", t).await;
    assert_eq!(
        (status, &replay["replay"], &replay["job_id"]),
        (200, &json!(true), &Value::Null),
        "{replay}"
    );
    // Signed with another secret: refused.
    let forged_body = r#"{"id":"evt_forged","type":"customer.created"}"#;
    let forged_sig = hex_hmac(
        b"whsec_not-the-secret",
        &[format!("{t}.").as_bytes(), forged_body.as_bytes()],
    );
    let (status, _, forged) = desk
        .post(
            "stripe",
            &[("stripe-signature", format!("t={t},v1={forged_sig}"))],
            forged_body,
        )
        .await;
    assert_eq!(status, 401, "{forged}");
    assert_eq!(
        desk.job_input(&charge["job_id"]).await,
        json!({"event_type": "customer.created", "customer": "cus_1"})
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _, again) = desk.stripe("evt_1NG8Du2eZvKYlo2CUI79vXWy").await;
    assert_eq!((status, &again["job_id"]), (200, &charge["job_id"]));
    // A stale Stripe timestamp is refused whatever the signature.
    let old = now() - 600;
    let stale_body = r#"{"id":"evt_old","type":"customer.created"}"#;
    let sig = hex_hmac(
        SECRET.as_bytes(),
        &[format!("{old}.").as_bytes(), stale_body.as_bytes()],
    );
    let (status, _, stale) = desk
        .post(
            "stripe",
            &[("stripe-signature", format!("t={old},v1={sig}"))],
            stale_body,
        )
        .await;
    assert_eq!(status, 401, "{stale}");

    // Zendesk: base64 over timestamp + body; the invocation id is the key.
    let body = r#"{"ticket":{"id":35436}}"#;
    let zendesk_signed = |secret: &str, ts: &str, body: &str, invocation: &str| {
        use base64::Engine;
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
        let sig = base64::engine::general_purpose::STANDARD
            .encode(hmac::sign(&key, format!("{ts}{body}").as_bytes()).as_ref());
        vec![
            ("x-zendesk-webhook-signature-timestamp", ts.to_string()),
            ("x-zendesk-webhook-signature", sig),
            ("x-zendesk-webhook-invocation-id", invocation.to_string()),
        ]
    };
    let ts = chrono_now();
    let zendesk = zendesk_signed(SECRET, &ts, body, "8350205582");
    let (status, _, forged) = desk
        .post(
            "zendesk",
            &zendesk_signed("not-the-secret", &ts, body, "8350205583"),
            body,
        )
        .await;
    assert_eq!(status, 401, "{forged}");
    let stale_ts = (chrono::Utc::now() - chrono::Duration::minutes(10))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (status, _, stale) = desk
        .post(
            "zendesk",
            &zendesk_signed(SECRET, &stale_ts, body, "8350205584"),
            body,
        )
        .await;
    assert_eq!(status, 401, "{stale}");
    // Correctly signed, but without the ticket its `input` needs: refused (422), never a job.
    let no_ticket = r#"{"account":{"id":1}}"#;
    let (status, _, invalid) = desk
        .post(
            "zendesk",
            &zendesk_signed(SECRET, &ts, no_ticket, "8350205585"),
            no_ticket,
        )
        .await;
    assert_eq!(status, 422, "{invalid}");
    let (status, _, zd) = desk.post("zendesk", &zendesk, body).await;
    assert_eq!(status, 202, "{zd}");
    let (status, _, replay) = desk.post("zendesk", &zendesk, body).await;
    assert_eq!((status, &replay["replay"]), (200, &json!(true)), "{replay}");
    assert_eq!(
        desk.job_input(&zd["job_id"]).await,
        json!({"ticket": 35436})
    );

    // Cascade's own scheme, with its signed Idempotency-Key.
    let secret = cascade_orchestrator::secret::Secret::new(SECRET.as_bytes().to_vec());
    let t = now();
    let body = r#"{"order":7}"#;
    let signed_at = |t: u64| {
        vec![
            ("x-cascade-timestamp", t.to_string()),
            (
                "x-cascade-signature",
                cascade_orchestrator::secret::sign_keyed(
                    &secret,
                    t,
                    Some("order-7"),
                    body.as_bytes(),
                ),
            ),
            ("idempotency-key", "order-7".to_string()),
        ]
    };
    let (status, _, signed) = desk.post("signed", &signed_at(t), body).await;
    assert_eq!(status, 202, "{signed}");
    let (status, _, replay) = desk.post("signed", &signed_at(t), body).await;
    assert_eq!((status, &replay["replay"]), (200, &json!(true)), "{replay}");
    let (status, _, stale) = desk.post("signed", &signed_at(t - 900), body).await;
    assert_eq!(status, 401, "{stale}");
    let mut forged = signed_at(t + 1);
    forged[1].1 = cascade_orchestrator::secret::sign_keyed(
        &cascade_orchestrator::secret::Secret::new(b"not-the-secret".to_vec()),
        t + 1,
        Some("order-7"),
        body.as_bytes(),
    );
    let (status, _, forged) = desk.post("signed", &forged, body).await;
    assert_eq!(status, 401, "{forged}");
    assert_eq!(desk.job_input(&signed["job_id"]).await, json!({"order": 7}));

    // An unsigned caller learns nothing about the triggers there are.
    let (status, _, unknown) = desk.post("slak", &[], "{}").await;
    assert_eq!(status, 404);
    let message = unknown["error"].as_str().unwrap();
    assert!(
        message.contains("no webhook trigger") && !message.contains("slack\""),
        "{unknown}"
    );

    // The counts, over gRPC and in /metrics.
    let mut client = common::connect(desk.server.grpc_addr.port()).await;
    let list = client
        .list_triggers(pb::ListTriggersRequest {
            graph: "desk".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .triggers;
    let by = |name: &str| list.iter().find(|t| t.name == name).unwrap().clone();
    let slack = by("slack");
    assert_eq!(
        (slack.kind.as_str(), slack.state.as_str()),
        ("webhook", "running")
    );
    assert_eq!(
        (slack.received, slack.started, slack.deduplicated),
        (2, 1, 1)
    );
    let github = by("github");
    assert_eq!((github.received, github.started, github.dropped), (2, 1, 1));
    assert_eq!(by("stripe").deduplicated, 1);
    let graph = client
        .get_graph(pb::GetGraphRequest {
            name: "desk".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // Each trigger's counts after the sequence above: forgeries, stale timestamps, replays and
    // Slack's challenge count nothing; a redelivery is deduplicated, a ping dropped by `when`, an
    // event its `input` cannot map refused.
    let mut counts: Vec<(&str, [u64; 5])> = graph
        .triggers
        .iter()
        .map(|t| {
            (
                t.name.as_str(),
                [t.received, t.started, t.deduplicated, t.dropped, t.refused],
            )
        })
        .collect();
    counts.sort();
    assert_eq!(
        counts,
        [
            ("github", [2, 1, 0, 1, 0]),
            ("signed", [1, 1, 0, 0, 0]),
            ("slack", [2, 1, 1, 0, 0]),
            ("stripe", [2, 1, 1, 0, 0]),
            ("zendesk", [2, 1, 0, 0, 1]),
        ]
    );
    let metrics = desk
        .http
        .get(format!("http://{}/metrics", desk.server.http_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("cascade_trigger_events_total")
                && l.contains("trigger=\"github\"")
                && l.contains("outcome=\"dropped\"")),
        "{metrics}"
    );
}

fn chrono_now() -> String {
    // RFC 3339 in UTC, as Zendesk sends it.
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A graph that cannot take more work answers the status providers retry on (503 with a
/// Retry-After), never a 4xx that would make them give up; a trigger an operator paused
/// answers the same, and takes events again once resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_graph_or_a_paused_trigger_answers_retry_later() {
    let desk = Desk::start().await;
    // The quota refused upstream for 3 s: nothing finishes, jobs pile up to the limit.
    assert!(desk.orch.exhaust_quota("crm", Duration::from_secs(3)).await);
    let mut answers = Vec::new();
    for i in 0..8 {
        let (status, retry_after, body) = desk.stripe(&format!("evt_full_{i}")).await;
        assert!(
            status < 400 || status == 503,
            "a 4xx gives the provider up: {status} {body}"
        );
        answers.push((status, retry_after, body));
        if status == 503 {
            break;
        }
    }
    let (status, retry_after, body) = answers.last().unwrap();
    assert_eq!(*status, 503, "{answers:?}");
    assert!(
        retry_after.is_some_and(|s| (1..=59).contains(&s)),
        "{answers:?}"
    );
    assert!(
        body["error"].as_str().unwrap().contains("jobs waiting"),
        "{body}"
    );
    let started = answers.iter().filter(|a| a.0 == 202).count();
    assert!(
        (2..=3).contains(&started),
        "max_pending_jobs 2 (+1 in flight): {answers:?}"
    );

    // Paused by an operator: 503 whatever the graph's state; resumed: accepted.
    let mut client = common::connect(desk.server.grpc_addr.port()).await;
    let t = client
        .pause_trigger(pb::TriggerRequest {
            graph: "desk".into(),
            trigger: "slack".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.state, "paused");
    let event =
        r#"{"type":"event_callback","event_id":"Ev-paused","event":{"text":"hi","user":"U1"}}"#;
    let (status, retry_after, body) = desk.slack(now(), event, SECRET).await;
    assert_eq!((status, retry_after.is_some()), (503, true), "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("paused by an operator")
    );
    let err = client
        .pause_trigger(pb::TriggerRequest {
            graph: "desk".into(),
            trigger: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("slack"), "{}", err.message());
    let t = client
        .resume_trigger(pb::TriggerRequest {
            graph: "desk".into(),
            trigger: "slack".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.state, "running");
    // The CLI: pause, list (as text and as JSON), resume.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cascade"))
            .args(["--server", &format!("http://{}", desk.server.grpc_addr)])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let paused = cli(&["triggers", "pause", "desk", "github"]);
    assert!(
        paused
            .lines()
            .any(|l| l.contains("github") && l.contains("paused")),
        "{paused}"
    );
    let listed: Value =
        serde_json::from_str(&cli(&["--json", "triggers", "list", "desk"])).unwrap();
    let states: Vec<(&str, &str)> = listed["triggers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap(), t["state"].as_str().unwrap()))
        .collect();
    assert!(
        states.contains(&("github", "paused")) && states.contains(&("slack", "running")),
        "{states:?}"
    );
    assert!(cli(&["triggers", "resume", "desk", "github"]).contains("running"));

    // The quota back after its 3 s: the graph drains, and the event is taken.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _, body) = desk.slack(now(), event, SECRET).await;
        if status == 202 {
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the graph never drained: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

const SCHEDULED: &str = r#"
[graph]
name = "reports"

[[graph.triggers]]
name = "quarter-hourly"
kind = "schedule"
every = "15m"
catch_up = "CATCH_UP"
input = { at = "{{ trigger.scheduled_at }}" }

[agents.report]
kind = "sim"
"#;

/// Keys of the jobs the store holds for `graph`, sorted.
fn keys(store: &cascade_orchestrator::store::SqliteStore) -> Vec<String> {
    use cascade_orchestrator::store::JobStore;
    let mut keys: Vec<String> = store
        .list(&cascade_orchestrator::store::JobFilter {
            limit: 10_000,
            ..Default::default()
        })
        .unwrap()
        .into_iter()
        .filter_map(|r| r.idempotency_key)
        .collect();
    keys.sort();
    keys
}

fn at(s: &str) -> SystemTime {
    chrono::DateTime::parse_from_rfc3339(s).unwrap().into()
}

/// Run the schedule of `reports` on the store at `path` from wall time `start` for `run_for`
/// of paused time, with `nodes` runners at once (two nodes sharing the store); then stop.
async fn run_schedule(
    path: &std::path::Path,
    catch_up: &str,
    start: SystemTime,
    run_for: Duration,
    nodes: usize,
) {
    run_schedule_resuming(path, catch_up, start, run_for, nodes, None).await
}

/// [`run_schedule`], resuming the (paused) trigger after `resume_after` as an operator would.
async fn run_schedule_resuming(
    path: &std::path::Path,
    catch_up: &str,
    start: SystemTime,
    run_for: Duration,
    nodes: usize,
    resume_after: Option<Duration>,
) {
    use cascade_orchestrator::store::{SqliteOptions, SqliteStore};
    let store = Arc::new(SqliteStore::open(SqliteOptions::new(path)).unwrap());
    let model = cascade_orchestrator::config::parse_graph_str(
        "reports.toml",
        &SCHEDULED.replace("CATCH_UP", catch_up),
        &Default::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let orch = Arc::new(
        cascade_orchestrator::Orchestrator::builder(model)
            .store(store.clone())
            .metrics(false)
            .start()
            .await
            .unwrap(),
    );
    let t = orch
        .triggers()
        .get("reports", "quarter-hourly")
        .unwrap()
        .clone();
    let TriggerSource::Schedule(spec) = t.model.source.clone() else {
        unreachable!()
    };
    // The latest slot the schedule catches up on when it starts, if any.
    let catch_up_to = {
        use cascade_orchestrator::store::JobStore;
        store
            .trigger_state("reports/quarter-hourly")
            .unwrap()
            .and_then(|s| {
                serde_json::from_str::<cascade_orchestrator::triggers::TriggerState>(&s).ok()
            })
            .filter(|s| !s.paused)
            .and_then(|s| s.last_slot_ms)
            .and_then(|ms| {
                let last = UNIX_EPOCH + Duration::from_millis(ms as u64);
                spec.every.slots_between(last, start).last().copied()
            })
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let clock = schedule::WallClock::starting_at(start);
    let runners: Vec<_> = (0..nodes)
        .map(|_| {
            tokio::spawn(schedule::run(
                orch.clone(),
                t.clone(),
                spec.clone(),
                clock,
                stopped.clone(),
            ))
        })
        .collect();
    // On a paused clock tokio moves time on whenever every task waits, and the catch-up's
    // submissions wait for the store's writer thread: the clock could jump past the next slot,
    // or to the end of the run, before the schedule has even set its timer. The runtime is kept
    // busy (yielding, which lets no time pass) until the catch-up is saved.
    if let Some(slot) = catch_up_to {
        use cascade_orchestrator::store::JobStore;
        let target = slot.duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let saved = store
                .trigger_state("reports/quarter-hourly")
                .unwrap()
                .and_then(|s| {
                    serde_json::from_str::<cascade_orchestrator::triggers::TriggerState>(&s).ok()
                })
                .and_then(|s| s.last_slot_ms);
            if saved.is_some_and(|ms| ms >= target) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the catch-up never finished: {saved:?}"
            );
            tokio::task::yield_now().await;
        }
    }
    if let Some(after) = resume_after {
        tokio::time::sleep(after).await;
        orch.triggers()
            .set_paused(orch.store().as_ref(), "reports", "quarter-hourly", false)
            .unwrap();
        tokio::time::sleep(run_for - after).await;
    } else {
        tokio::time::sleep(run_for).await;
    }
    let _ = stop.send(true);
    for r in runners {
        r.await.unwrap();
    }
    use cascade_orchestrator::store::JobStore;
    store.flush().await.unwrap();
    orch.shutdown(Duration::from_secs(5)).await;
}

/// Every 15 minutes on a paused clock: each slot fires once (two runners on one store start one
/// job a slot); the server is then down for an hour, and the slots it missed follow `catch_up`:
/// none of them, the latest, or each; later slots fire as before.
#[tokio::test(start_paused = true)]
async fn a_schedule_fires_each_slot_once_across_restarts_with_each_catch_up_mode() {
    for (mode, missed) in [
        ("none", &[][..]),
        ("last", &["12:00"][..]),
        ("all", &["11:15", "11:30", "11:45", "12:00"][..]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cascade.db");
        // 10:00:20 to 11:05:20: the slots 10:15 to 11:00, by two "nodes" at once.
        run_schedule(
            &path,
            mode,
            at("2026-12-07T10:00:20Z"),
            Duration::from_secs(65 * 60),
            2,
        )
        .await;
        // Down until 12:07:00; up for 10 minutes: catch-up, then 12:15.
        run_schedule(
            &path,
            mode,
            at("2026-12-07T12:07:00Z"),
            Duration::from_secs(10 * 60),
            1,
        )
        .await;
        let store = cascade_orchestrator::store::SqliteStore::open(
            cascade_orchestrator::store::SqliteOptions::new(&path),
        )
        .unwrap();
        let mut expected: Vec<String> = ["10:15", "10:30", "10:45", "11:00"]
            .iter()
            .chain(missed)
            .chain(&["12:15"])
            .map(|hm| format!("reports/quarter-hourly/2026-12-07T{hm}:00.000Z"))
            .collect();
        expected.sort();
        assert_eq!(keys(&store), expected, "catch_up = {mode:?}");
    }
}

/// An operator's pause is kept in the store: a restarted server's schedule stays paused (no
/// slot fires, none is caught up); once resumed, the slots of the pause are not caught up after
/// a later restart either, and the others fire as before.
#[tokio::test(start_paused = true)]
async fn a_paused_schedule_stays_paused_across_a_restart() {
    use cascade_orchestrator::store::{SqliteOptions, SqliteStore};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cascade.db");
    // 10:15 to 11:00 fire.
    run_schedule(
        &path,
        "all",
        at("2026-12-07T10:00:20Z"),
        Duration::from_secs(65 * 60),
        1,
    )
    .await;
    // Paused by an operator (on a server of its own, then stopped).
    {
        let store = SqliteStore::open(SqliteOptions::new(&path)).unwrap();
        let model = cascade_orchestrator::config::parse_graph_str(
            "reports.toml",
            &SCHEDULED.replace("CATCH_UP", "all"),
            &Default::default(),
        )
        .unwrap();
        let orch = cascade_orchestrator::Orchestrator::builder(model)
            .store(Arc::new(store))
            .metrics(false)
            .start()
            .await
            .unwrap();
        let t = orch
            .triggers()
            .set_paused(orch.store().as_ref(), "reports", "quarter-hourly", true)
            .unwrap();
        assert!(t.is_paused());
        orch.store().flush().await.unwrap();
        orch.shutdown(Duration::from_secs(5)).await;
    }
    // Restarted at 12:07, still paused: nothing fires in 10 minutes, nothing is caught up.
    run_schedule(
        &path,
        "all",
        at("2026-12-07T12:07:00Z"),
        Duration::from_secs(10 * 60),
        1,
    )
    .await;
    // Restarted at 12:20 paused, resumed at 12:25: 12:30 and 12:45 fire.
    run_schedule_resuming(
        &path,
        "all",
        at("2026-12-07T12:20:00Z"),
        Duration::from_secs(30 * 60),
        1,
        Some(Duration::from_secs(5 * 60)),
    )
    .await;
    // Down until 13:10: catch-up from 12:45 brings 13:00 only.
    run_schedule(
        &path,
        "all",
        at("2026-12-07T13:10:00Z"),
        Duration::from_secs(60),
        1,
    )
    .await;
    let store = SqliteStore::open(SqliteOptions::new(&path)).unwrap();
    let expected: Vec<String> = [
        "10:15", "10:30", "10:45", "11:00", "12:30", "12:45", "13:00",
    ]
    .iter()
    .map(|hm| format!("reports/quarter-hourly/2026-12-07T{hm}:00.000Z"))
    .collect();
    assert_eq!(keys(&store), expected);
}

/// A bus consumer's admission counts the trigger's tenant too: a tenant at its
/// `max_pending_jobs` stops the pulling as a full graph does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_stops_at_the_tenants_max_pending_jobs() {
    let dir = common::server_dir(
        &[(
            "g.toml",
            r#"
[graph]
name = "g"
tenants = ["acme"]
[quotas.q]
requests_per_second = 100
[agents.a]
kind = "sim"
quota = "q"
"#,
        )],
        "[tenants.acme]\nmax_pending_jobs = 3\n",
    );
    let model = cascade_orchestrator::config::load(
        Some(&dir.path().join("cascade.toml")),
        &[],
        &Default::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let orch = cascade_orchestrator::Orchestrator::builder(model)
        .metrics(false)
        .start()
        .await
        .unwrap();
    use cascade_orchestrator::triggers::admission;
    assert!(admission(&orch, "g", "acme").await.is_none());
    // Nothing finishes for a while: the tenant's jobs stay queued or running.
    assert!(orch.exhaust_quota("q", Duration::from_secs(30)).await);
    for i in 0..3 {
        let mut req = cascade_orchestrator::SubmitRequest::new("g", json!({ "i": i }));
        req.tenant = "acme".into();
        orch.submit(req).await.unwrap();
    }
    let (_, why) = admission(&orch, "g", "acme")
        .await
        .expect("the tenant is full");
    assert!(why.contains("tenant \"acme\""), "{why}");
    orch.shutdown(Duration::from_millis(100)).await;
}

/// A bus trigger whose server cannot be reached shows `failing` with why in ListTriggers, and
/// `cascade_trigger_failing` is 1 for it in `/metrics` (0 for a trigger that runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_bus_shows_failing_in_list_triggers_and_metrics() {
    // Nothing listens on this port.
    let port = common::free_port();
    let model = cascade_orchestrator::config::parse_graph_str(
        "inbox.toml",
        &format!(
            r#"
[graph]
name = "inbox"

[[graph.triggers]]
name = "bus"
kind = "nats"
url = "nats://127.0.0.1:{port}"
stream = "INBOX"
subject = "inbox.in"
consumer = "cascade"

[[graph.triggers]]
name = "nightly"
kind = "schedule"
cron = "0 3 * * *"

[agents.a]
kind = "sim"
"#
        ),
        &Default::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (_orch, server) = common::serve_in_process(model).await;
    let mut client = common::connect(server.grpc_addr.port()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let bus = loop {
        let list = client
            .list_triggers(pb::ListTriggersRequest {
                graph: "inbox".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .triggers;
        let bus = list.iter().find(|t| t.name == "bus").unwrap().clone();
        if bus.state == "failing" {
            break bus;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never failing: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(bus.detail.contains(&port.to_string()), "{bus:?}");
    let metrics = reqwest::get(format!("http://{}/metrics", server.http_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let gauge = |trigger: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("cascade_trigger_failing{")
                    && l.contains("graph=\"inbox\"")
                    && l.contains(&format!("trigger=\"{trigger}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    assert_eq!(
        (gauge("bus"), gauge("nightly")),
        (Some(1.0), Some(0.0)),
        "{metrics}"
    );
}

/// With API keys configured, the trigger route still authenticates by the provider's
/// signature alone: a correctly signed POST with no API key starts a job of the trigger's
/// tenant; a wrongly signed one, or an unsigned one carrying a valid API key, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_triggers_authenticate_by_signature_when_api_keys_are_on() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let key = cascade_orchestrator::auth::generate_key();
    std::fs::write(
        dir.path().join("cascade.toml"),
        format!(
            "graphs = [\"desk.toml\"]\n[[auth.api_keys]]\nname = \"ops\"\ntenant = \"internal\"\nroles = [\"admin\"]\nhash = \"{}\"\n",
            cascade_orchestrator::auth::sha256_hash(&key)
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("desk.toml"),
        format!(
            r#"
[graph]
name = "desk"
tenants = ["acme", "globex"]

[[graph.triggers]]
name = "github"
kind = "webhook"
verify = "github"
secret = "file:{}"
tenant = "globex"

[agents.triage]
kind = "sim"
"#,
            secret.display()
        ),
    )
    .unwrap();
    let model = cascade_orchestrator::config::load(
        Some(&dir.path().join("cascade.toml")),
        &[],
        &Default::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (orch, server) = common::serve_in_process(model).await;
    let http = reqwest::Client::new();
    let url = format!("http://{}/hooks/desk/github", server.http_addr);
    let body = r#"{"action":"opened","issue":{"number":7}}"#;
    let post = |sig: String, delivery: &'static str, api_key: Option<&str>| {
        let mut req = http
            .post(&url)
            .header("x-github-event", "issues")
            .header("x-github-delivery", delivery)
            .header("x-hub-signature-256", sig)
            .body(body);
        if let Some(k) = api_key {
            req = req.bearer_auth(k);
        }
        req.send()
    };
    // Other routes need a key here: the server does enforce authentication.
    let jobs = http
        .get(format!("http://{}/api/graphs", server.http_addr))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    assert!(
        matches!(jobs, 401 | 403),
        "GET /api/graphs without a key: {jobs}"
    );

    let good = format!("sha256={}", hex_hmac(SECRET.as_bytes(), &[body.as_bytes()]));
    let resp = post(good, "d-1", None).await.unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let accepted: Value = resp.json().await.unwrap();
    let id = accepted["job_id"].as_str().unwrap().parse().unwrap();
    let job = orch.get(id).unwrap().unwrap();
    assert_eq!(job.tenant, "globex");

    let forged = format!("sha256={}", hex_hmac(b"not-the-secret", &[body.as_bytes()]));
    let status = post(forged.clone(), "d-2", None).await.unwrap().status();
    assert_eq!(status.as_u16(), 401);
    // An API key does not stand in for the provider's signature.
    let status = post(forged, "d-3", Some(&key)).await.unwrap().status();
    assert_eq!(status.as_u16(), 401);
    let jobs = orch
        .store()
        .list(&cascade_orchestrator::store::JobFilter {
            limit: 100,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
}
