//! Message-bus triggers against real servers (Debian's `nats-server` with JetStream and
//! `redis-server`, which `.ci/run` installs; a test fails, not skips, when it cannot start
//! one): 10,000 messages published at once while the graph's quota lets 200 jobs a second
//! through. Every message becomes exactly one succeeded job; the consumer fetches as the graph
//! admits work, so the backlog waits in the bus undelivered (JetStream's `num_pending`, the Redis
//! group's `lag`) while Cascade holds no more delivered and unacknowledged than fits in the graph
//! and one fetch, and the server's RSS stays within 50 MB of idle; a `kill -9` of `cascade
//! serve` mid-run loses nothing and duplicates nothing; a poison message lands in the dead-letter
//! stream with its reason. While the cascade holds the graph paused (its quota refused
//! upstream), or an operator holds the trigger paused, the consumer fetches nothing at all.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use cascade_orchestrator::api::pb;
use futures::StreamExt;

const MESSAGES: usize = 10_000;
const RATE: usize = 200;
/// Redis entries a dead consumer holds when the test starts.
const GHOSTED: usize = 10;
/// The graph's `max_pending_jobs`.
const MAX_PENDING: u64 = 300;
/// A trigger's `batch` (its default).
const BATCH: u64 = 100;
/// Messages Cascade may hold delivered and unacknowledged: what fits in the graph, and one
/// fetch (the Redis entries the dead consumer took count too, until they are claimed).
const HELD_AT_MOST: u64 = MAX_PENDING + BATCH + GHOSTED as u64;

/// A server process of the test's own, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(program: &str, args: &[&str], port: u16) -> Proc {
    let child = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {program} ({e}): install it (apt-get install {program}; .ci/run does)"
            )
        });
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{program} did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Proc(child)
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn graph(trigger: &str) -> String {
    format!(
        r#"
[graph]
name = "ingest"
max_in_flight_jobs = 100
max_pending_jobs = {MAX_PENDING}

{trigger}
input = {{ n = "{{{{= event.n }}}}" }}

[quotas.api]
requests_per_second = {RATE}

[agents.handle]
kind = "sim"
quota = "api"
"#
    )
}

/// Where a bus's messages for Cascade are.
#[derive(Clone, Copy, Debug, Default)]
struct Backlog {
    /// Not yet delivered to Cascade's consumer: the backlog the bus holds for it.
    undelivered: u64,
    /// Delivered to Cascade and not yet acknowledged.
    unacked: u64,
}

impl Backlog {
    fn total(self) -> u64 {
        self.undelivered + self.unacked
    }
}

/// What the scenarios need of a bus.
trait Bus {
    /// Before the server starts.
    async fn prepare(&mut self) {}
    /// Publish `{"n": i}` for each i in `range`.
    async fn publish(&mut self, range: std::ops::Range<usize>);
    /// Publish one poison message (no `n`).
    async fn publish_poison(&mut self);
    /// The messages waiting for Cascade in the bus.
    async fn backlog(&mut self) -> Backlog;
    /// The dead-lettered messages' reasons.
    async fn dead_letters(&mut self) -> Vec<String>;
    /// Deliver every message again, as a bus does after a consumer's state is lost.
    async fn redeliver_all(&mut self);
}

/// Counted from the server's store once it has stopped: (succeeded jobs, distinct keys, jobs in
/// any other state).
fn count_jobs(dir: &std::path::Path) -> (i64, i64, i64) {
    let db = rusqlite::Connection::open(dir.join("data").join("cascade.db")).unwrap();
    let (ok, keys): (i64, i64) = db
        .query_row(
            "SELECT count(*), count(DISTINCT idempotency_key) FROM jobs WHERE graph = 'ingest' AND state = 'succeeded'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let other: i64 = db
        .query_row(
            "SELECT count(*) FROM jobs WHERE graph = 'ingest' AND state != 'succeeded'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    (ok, keys, other)
}

/// `first`: the messages below it were published by `prepare`.
async fn scenario(bus: &mut impl Bus, trigger: &str, first: usize) {
    bus.prepare().await;
    let dir = common::server_dir(&[("ingest.toml", &graph(trigger))], "");
    let (grpc, http) = (common::free_port(), common::free_port());
    let mut server = common::spawn(dir.path(), grpc, http);
    let mut client = common::connect(grpc).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_kb = rss_kb(server.child.id());
    assert!(idle_kb > 0);

    let started = Instant::now();
    bus.publish(first..MESSAGES).await;
    bus.publish_poison().await;
    let published_in = started.elapsed();
    // While the graph works through the backlog: the bus holds it undelivered, Cascade holds no
    // more than what fits in the graph plus one fetch, and the server's memory stays.
    let mut max_undelivered = 0;
    let mut max_unacked = 0;
    let mut max_rss_kb = idle_kb;
    let killed_at = Duration::from_secs(15);
    while started.elapsed() < killed_at {
        let b = bus.backlog().await;
        max_undelivered = max_undelivered.max(b.undelivered);
        max_unacked = max_unacked.max(b.unacked);
        max_rss_kb = max_rss_kb.max(rss_kb(server.child.id()));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let before_kill = client
        .list_triggers(pb::ListTriggersRequest {
            graph: "ingest".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .triggers;
    let started_before = before_kill[0].started;
    assert!(
        (started_before as usize) < MESSAGES / 2,
        "the consumer pulled faster than the graph admits ({started_before} jobs in {killed_at:?} at {RATE}/s)"
    );
    assert!(
        max_undelivered as usize > MESSAGES / 2,
        "the backlog should wait in the bus undelivered (at most {max_undelivered} there)"
    );
    // A consumer that fetched without the graph's admission would hold thousands unacknowledged.
    assert!(
        max_unacked <= HELD_AT_MOST,
        "Cascade held {max_unacked} messages delivered and not acknowledged (at most \
         {HELD_AT_MOST}: max_pending_jobs, one batch and the dead consumer's entries)"
    );
    // kill -9 mid-run, and a new server on the same data.
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let mut server = common::spawn(dir.path(), grpc, http);
    let mut client = common::connect(grpc).await;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        max_rss_kb = max_rss_kb.max(rss_kb(server.child.id()));
        let b = bus.backlog().await;
        max_unacked = max_unacked.max(b.unacked);
        let backlog = b.total();
        let g = client
            .get_graph(pb::GetGraphRequest {
                name: "ingest".into(),
            })
            .await
            .unwrap()
            .into_inner();
        if backlog == 0 && g.pending_jobs == 0 && g.running_jobs == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not drained: backlog {backlog}, {} pending, {} running",
            g.pending_jobs,
            g.running_jobs
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Every message delivered again: each is the job it already started.
    bus.redeliver_all().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let triggers = loop {
        let triggers = client
            .list_triggers(pb::ListTriggersRequest {
                graph: "ingest".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .triggers;
        if triggers[0].deduplicated >= MESSAGES as u64 && bus.backlog().await.total() == 0 {
            break triggers;
        }
        assert!(
            Instant::now() < deadline,
            "redeliveries not all seen: {triggers:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let dead = bus.dead_letters().await;
    server.terminate();
    let (succeeded, keys, other) = count_jobs(dir.path());
    eprintln!(
        "published {MESSAGES} in {published_in:?}; undelivered in the bus at most \
         {max_undelivered}, delivered and unacknowledged at most {max_unacked}; \
         RSS idle {idle_kb} kB, at most {max_rss_kb} kB; {started_before} jobs before kill -9; \
         after: {triggers:?}"
    );
    assert_eq!(
        (succeeded, keys, other),
        (MESSAGES as i64, MESSAGES as i64, 0),
        "every message exactly one succeeded job"
    );
    assert!(
        max_rss_kb < idle_kb + 50 * 1024,
        "RSS grew from {idle_kb} kB idle to {max_rss_kb} kB"
    );
    assert!(
        max_unacked <= HELD_AT_MOST,
        "after the restart, {max_unacked} delivered and not acknowledged"
    );
    // The poison message, dead-lettered (once more after the redelivery) with its reason.
    assert!(!dead.is_empty() && dead.len() <= 2, "{dead:?}");
    // Dead-lettered at `max_deliveries` (3) deliveries (JetStream may count one more for a
    // delivery cut by the kill -9), with the reason and without the event's content.
    assert!(
        dead.iter().all(|d| d.contains("`event.n` is undefined")
            && !d.contains("poison")
            && (d.ends_with("(deliveries 3)") || d.ends_with("(deliveries 4)"))),
        "{dead:?}"
    );
}

/// Messages published while the graph is held, in each phase of [`held`].
const HELD: usize = 500;
/// How long the cascade holds the graph's quota refused.
const PAUSE: Duration = Duration::from_secs(8);

/// Wait (30 s at most) until the trigger has started `n` jobs and the bus holds nothing more for
/// it.
async fn drained(bus: &mut impl Bus, t: &cascade_orchestrator::triggers::Trigger, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let b = bus.backlog().await;
        if t.counts().started >= n as u64 && b.total() == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not drained: {:?}, bus {b:?}",
            t.counts()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The consumer in a server of this process, first while the cascade holds its graph paused
/// (the graph's quota refused upstream, as a 429 with Retry-After would), then while an operator
/// holds the trigger paused over gRPC: each time, the messages published meanwhile stay in the
/// bus undelivered (nothing fetched, nothing received), and once the pause ends every one of
/// them becomes exactly one succeeded job.
async fn held(bus: &mut impl Bus, trigger: &str) {
    let model = cascade_orchestrator::config::parse_graph_str(
        "ingest.toml",
        &graph(trigger),
        &Default::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (orch, server) = common::serve_in_process(model).await;
    let mut client = common::connect(server.grpc_addr.port()).await;
    let t = orch.triggers().of_graph("ingest").next().unwrap().clone();
    // One message through: the consumer is connected and takes work.
    bus.publish(0..1).await;
    drained(bus, &t, 1).await;

    // 1. The cascade pauses the graph's path: the consumer stops before its next fetch.
    assert!(orch.exhaust_quota("api", PAUSE).await);
    let paused_at = Instant::now();
    loop {
        let v = t.view();
        if v.state == "waiting" && v.detail.contains("paused by the cascade") {
            break;
        }
        assert!(
            paused_at.elapsed() < Duration::from_secs(5),
            "the consumer does not wait for the cascade: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = t.counts();
    bus.publish(1..1 + HELD).await;
    let mut samples = 0;
    while paused_at.elapsed() < PAUSE - Duration::from_millis(500) {
        let b = bus.backlog().await;
        assert_eq!(
            (b.undelivered, b.unacked),
            (HELD as u64, 0),
            "fetched while the cascade held the graph paused ({:?} after the pause began)",
            paused_at.elapsed()
        );
        assert_eq!(t.counts(), before);
        samples += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(samples >= 10, "{samples} samples during the pause");
    // The pause over: the backlog drains into jobs.
    drained(bus, &t, 1 + HELD).await;

    // 2. An operator pauses the trigger (PauseTrigger over gRPC).
    let paused = client
        .pause_trigger(pb::TriggerRequest {
            graph: "ingest".into(),
            trigger: t.model.name.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paused.state, "paused");
    // A fetch under way when the pause came ends within its one-second wait.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let before = t.counts();
    bus.publish(1 + HELD..1 + 2 * HELD).await;
    for _ in 0..12 {
        let b = bus.backlog().await;
        assert_eq!(
            (b.undelivered, b.unacked),
            (HELD as u64, 0),
            "fetched while the trigger was paused"
        );
        assert_eq!(t.counts(), before);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let listed = client
        .list_triggers(pb::ListTriggersRequest {
            graph: "ingest".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .triggers;
    assert_eq!(listed[0].state, "paused");
    let resumed = client
        .resume_trigger(pb::TriggerRequest {
            graph: "ingest".into(),
            trigger: t.model.name.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(resumed.state, "paused");
    drained(bus, &t, 1 + 2 * HELD).await;

    // Every message exactly one succeeded job.
    let total = 1 + 2 * HELD;
    let deadline = Instant::now() + Duration::from_secs(30);
    while orch.stats("ingest").unwrap().jobs_succeeded < total as u64 {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            orch.stats("ingest").unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let jobs = orch
        .store()
        .list(&cascade_orchestrator::store::JobFilter {
            graph: Some("ingest".into()),
            limit: 10_000,
            ..Default::default()
        })
        .unwrap();
    let keys: std::collections::BTreeSet<_> = jobs
        .iter()
        .filter_map(|j| j.idempotency_key.clone())
        .collect();
    assert_eq!((jobs.len(), keys.len()), (total, total));
    let c = t.counts();
    assert_eq!(
        (c.received, c.started, c.deduplicated, c.refused),
        (total as u64, total as u64, 0, 0),
        "{c:?}"
    );
    server.stop().await;
}

struct Nats {
    js: jetstream::Context,
}

impl Bus for Nats {
    async fn redeliver_all(&mut self) {
        // The durable consumer deleted: Cascade creates it anew, from the stream's start.
        self.js
            .get_stream("TICKETS")
            .await
            .unwrap()
            .delete_consumer("cascade")
            .await
            .unwrap();
    }

    async fn publish(&mut self, range: std::ops::Range<usize>) {
        // Acknowledgements awaited a thousand at a time: the client holds at most 5,000
        // publishes waiting for theirs.
        let mut acks = Vec::with_capacity(1000);
        for i in range {
            acks.push(
                self.js
                    .publish("tickets.created", format!("{{\"n\": {i}}}").into())
                    .await
                    .unwrap(),
            );
            if acks.len() == 1000 {
                for a in acks.drain(..) {
                    a.await.unwrap();
                }
            }
        }
        for a in acks {
            a.await.unwrap();
        }
    }

    async fn publish_poison(&mut self) {
        self.js
            .publish("tickets.created", "{\"poison\": true}".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    async fn backlog(&mut self) -> Backlog {
        let stream = self.js.get_stream("TICKETS").await.unwrap();
        match stream
            .get_consumer::<jetstream::consumer::pull::Config>("cascade")
            .await
        {
            // The consumer's num_pending: messages of its subject not yet delivered to it.
            Ok(mut c) => {
                let info = c.info().await.unwrap();
                Backlog {
                    undelivered: info.num_pending,
                    unacked: info.num_ack_pending as u64,
                }
            }
            // Not created yet: nothing was delivered.
            Err(_) => Backlog {
                undelivered: stream.get_info().await.unwrap().state.messages,
                unacked: 0,
            },
        }
    }

    async fn dead_letters(&mut self) -> Vec<String> {
        let stream = self.js.get_stream("DEAD").await.unwrap();
        let consumer = stream
            .get_or_create_consumer::<jetstream::consumer::pull::Config>(
                "reader",
                Default::default(),
            )
            .await
            .unwrap();
        let mut batch = consumer
            .fetch()
            .max_messages(10)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .unwrap();
        let mut out = Vec::new();
        while let Some(m) = batch.next().await {
            let m = m.unwrap();
            let header = |name: &str| {
                m.headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_string())
                    .unwrap_or_default()
            };
            out.push(format!(
                "{} (deliveries {})",
                header("Cascade-Dead-Letter-Reason"),
                header("Cascade-Deliveries")
            ));
        }
        out
    }
}

/// A `nats-server` of the test's own (JetStream, a user and password) with the TICKETS and DEAD
/// streams; the bus, and the trigger's TOML (its credentials as secret references).
async fn nats() -> (Proc, tempfile::TempDir, Nats, String) {
    let port = common::free_port();
    let store = tempfile::tempdir().unwrap();
    let server = start(
        "nats-server",
        &[
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-sd",
            store.path().to_str().unwrap(),
            "--user",
            "cascade",
            "--pass",
            "bus-password",
        ],
        port,
    );
    // The trigger's credentials are secret references (a file here).
    let password = store.path().join("nats-password");
    std::fs::write(&password, "bus-password\n").unwrap();
    let client =
        async_nats::ConnectOptions::with_user_and_password("cascade".into(), "bus-password".into())
            .connect(format!("127.0.0.1:{port}"))
            .await
            .unwrap();
    let js = jetstream::new(client);
    for (name, subject) in [("TICKETS", "tickets.created"), ("DEAD", "tickets.dead")] {
        js.create_stream(jetstream::stream::Config {
            name: name.into(),
            subjects: vec![subject.into()],
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let trigger = format!(
        r#"[[graph.triggers]]
name = "bus"
kind = "nats"
url = "nats://127.0.0.1:{port}"
stream = "TICKETS"
subject = "tickets.created"
consumer = "cascade"
user = "file:{user}"
password = "file:{password}"
dead_letter = "tickets.dead"
max_deliveries = 3
ack_wait = "5s""#,
        user = {
            let user = store.path().join("nats-user");
            std::fs::write(&user, "cascade").unwrap();
            user.display().to_string()
        },
        password = password.display()
    );
    (server, store, Nats { js }, trigger)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server (Debian); .ci/run installs it and runs this"]
async fn nats_jetstream_backlog_waits_in_the_bus_and_nothing_is_lost_or_repeated() {
    let (_server, _store, mut bus, trigger) = nats().await;
    scenario(&mut bus, &trigger, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server (Debian); .ci/run installs it and runs this"]
async fn nats_consumer_stops_pulling_while_the_cascade_or_an_operator_pauses_it() {
    let (_server, _store, mut bus, trigger) = nats().await;
    held(&mut bus, &trigger).await;
}

struct Redis {
    con: redis::aio::MultiplexedConnection,
}

impl Bus for Redis {
    /// The group exists, and a consumer that then died took the first ten entries and never
    /// acknowledged them: Cascade claims them after `claim_after`.
    async fn prepare(&mut self) {
        let () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg("tickets")
            .arg("cascade")
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.con)
            .await
            .unwrap();
        for i in 0..GHOSTED {
            let _: String = redis::cmd("XADD")
                .arg("tickets")
                .arg("*")
                .arg("payload")
                .arg(format!("{{\"n\": {i}}}"))
                .query_async(&mut self.con)
                .await
                .unwrap();
        }
        let taken: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("cascade")
            .arg("ghost")
            .arg("COUNT")
            .arg(GHOSTED)
            .arg("STREAMS")
            .arg("tickets")
            .arg(">")
            .query_async(&mut self.con)
            .await
            .unwrap();
        assert!(
            matches!(taken, redis::Value::Array(_) | redis::Value::Map(_)),
            "{taken:?}"
        );
    }

    async fn redeliver_all(&mut self) {
        let () = redis::cmd("XGROUP")
            .arg("SETID")
            .arg("tickets")
            .arg("cascade")
            .arg("0")
            .query_async(&mut self.con)
            .await
            .unwrap();
    }

    async fn publish(&mut self, range: std::ops::Range<usize>) {
        let mut pipe = redis::pipe();
        for i in range {
            pipe.cmd("XADD")
                .arg("tickets")
                .arg("*")
                .arg("payload")
                .arg(format!("{{\"n\": {i}}}"))
                .ignore();
        }
        let () = pipe.query_async(&mut self.con).await.unwrap();
    }

    async fn publish_poison(&mut self) {
        let _: String = redis::cmd("XADD")
            .arg("tickets")
            .arg("*")
            .arg("payload")
            .arg("{\"poison\": true}")
            .query_async(&mut self.con)
            .await
            .unwrap();
    }

    async fn backlog(&mut self) -> Backlog {
        // XINFO GROUPS: the group's lag (entries not yet delivered to it) and pending
        // (delivered, not acknowledged).
        let v: redis::Value = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg("tickets")
            .query_async(&mut self.con)
            .await
            .unwrap_or(redis::Value::Nil);
        let fields = match v {
            redis::Value::Array(groups) => match groups.into_iter().next() {
                Some(redis::Value::Array(fields)) => Some(fields),
                _ => None,
            },
            _ => None,
        };
        let Some(fields) = fields else {
            // No group yet: nothing was delivered.
            let len: u64 = redis::cmd("XLEN")
                .arg("tickets")
                .query_async(&mut self.con)
                .await
                .unwrap();
            return Backlog {
                undelivered: len,
                unacked: 0,
            };
        };
        let mut b = Backlog::default();
        for pair in fields.chunks(2) {
            let name: String = redis::from_redis_value_ref(&pair[0]).unwrap_or_default();
            // `lag` is nil while Redis cannot tell (after XGROUP SETID): counted as none.
            let n = redis::from_redis_value_ref::<u64>(&pair[1]).unwrap_or(0);
            match name.as_str() {
                "lag" => b.undelivered = n,
                "pending" => b.unacked = n,
                _ => {}
            }
        }
        b
    }

    async fn dead_letters(&mut self) -> Vec<String> {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg("tickets:dead")
            .arg("-")
            .arg("+")
            .query_async(&mut self.con)
            .await
            .unwrap();
        reply
            .ids
            .iter()
            .map(|e| {
                format!(
                    "{} (deliveries {})",
                    e.get::<String>("cascade_reason").unwrap_or_default(),
                    e.get::<String>("cascade_deliveries").unwrap_or_default()
                )
            })
            .collect()
    }
}

/// A `redis-server` of the test's own (with a password); the bus, and the trigger's TOML.
async fn redis() -> (Proc, tempfile::TempDir, Redis, String) {
    let port = common::free_port();
    let server = start(
        "redis-server",
        &[
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--requirepass",
            "stream-password",
        ],
        port,
    );
    let secrets = tempfile::tempdir().unwrap();
    let password = secrets.path().join("redis-password");
    std::fs::write(&password, "stream-password\n").unwrap();
    let client = redis::Client::open(format!("redis://:stream-password@127.0.0.1:{port}")).unwrap();
    // 10,001 XADDs in one pipeline take longer than the default half-second answer.
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
    let con = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap();
    let trigger = format!(
        r#"[[graph.triggers]]
name = "queue"
kind = "redis_stream"
url = "redis://127.0.0.1:{port}"
stream = "tickets"
group = "cascade"
password = "file:{password}"
dead_letter = "tickets:dead"
max_deliveries = 3
claim_after = "10s""#,
        password = password.display()
    );
    (server, secrets, Redis { con }, trigger)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server (Debian); .ci/run installs it and runs this"]
async fn redis_stream_backlog_waits_in_the_bus_and_nothing_is_lost_or_repeated() {
    let (_server, _secrets, mut bus, trigger) = redis().await;
    scenario(&mut bus, &trigger, GHOSTED).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server (Debian); .ci/run installs it and runs this"]
async fn redis_consumer_stops_pulling_while_the_cascade_or_an_operator_pauses_it() {
    let (_server, _secrets, mut bus, trigger) = redis().await;
    held(&mut bus, &trigger).await;
}
