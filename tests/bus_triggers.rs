//! Message-bus triggers against real servers (Debian's `nats-server` with JetStream and
//! `redis-server`, which `.ci/run` installs; a test fails, not skips, when it cannot start
//! one): 10,000 messages published at once while the graph's quota lets 200 jobs a second
//! through. Every message becomes exactly one succeeded job; the consumer fetches as the graph
//! admits work, so the backlog waits in the bus (its pending count rises) while the server's
//! RSS stays within 50 MB of idle; a `kill -9` of `cascade serve` mid-run loses nothing and
//! duplicates nothing; a poison message lands in the dead-letter stream with its reason.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;

const MESSAGES: usize = 10_000;
const RATE: usize = 200;
/// Redis entries a dead consumer holds when the test starts.
const GHOSTED: usize = 10;

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
max_pending_jobs = 300

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

/// What the scenario needs of a bus.
trait Bus {
    /// Before the server starts.
    async fn prepare(&mut self) {}
    /// Publish `{"n": i}` for each i, and one poison message (no `n`).
    async fn publish(&mut self);
    /// Messages waiting for Cascade in the bus (not yet delivered, or delivered and not
    /// acknowledged).
    async fn backlog(&mut self) -> u64;
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

async fn scenario(bus: &mut impl Bus, trigger: &str) {
    bus.prepare().await;
    let dir = common::server_dir(&[("ingest.toml", &graph(trigger))], "");
    let (grpc, http) = (common::free_port(), common::free_port());
    let mut server = common::spawn(dir.path(), grpc, http);
    let mut client = common::connect(grpc).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_kb = rss_kb(server.child.id());
    assert!(idle_kb > 0);

    let started = Instant::now();
    bus.publish().await;
    let published_in = started.elapsed();
    // While the graph works through the backlog: the bus holds it, the server's memory stays.
    let mut max_backlog = 0;
    let mut max_rss_kb = idle_kb;
    let killed_at = Duration::from_secs(15);
    while started.elapsed() < killed_at {
        max_backlog = max_backlog.max(bus.backlog().await);
        max_rss_kb = max_rss_kb.max(rss_kb(server.child.id()));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let before_kill = client
        .list_triggers(cascade_orchestrator::api::pb::ListTriggersRequest {
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
        max_backlog as usize > MESSAGES / 2,
        "the backlog should wait in the bus (at most {max_backlog} pending there)"
    );
    // kill -9 mid-run, and a new server on the same data.
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let mut server = common::spawn(dir.path(), grpc, http);
    let mut client = common::connect(grpc).await;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        max_rss_kb = max_rss_kb.max(rss_kb(server.child.id()));
        let backlog = bus.backlog().await;
        let g = client
            .get_graph(cascade_orchestrator::api::pb::GetGraphRequest {
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
            .list_triggers(cascade_orchestrator::api::pb::ListTriggersRequest {
                graph: "ingest".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .triggers;
        if triggers[0].deduplicated >= MESSAGES as u64 && bus.backlog().await == 0 {
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
        "published {MESSAGES} in {published_in:?}; backlog in the bus at most {max_backlog}; \
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

    async fn publish(&mut self) {
        // Acknowledgements awaited a thousand at a time: the client holds at most 5,000
        // publishes waiting for theirs.
        let mut acks = Vec::with_capacity(1000);
        for i in 0..MESSAGES {
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
        acks.push(
            self.js
                .publish("tickets.created", "{\"poison\": true}".into())
                .await
                .unwrap(),
        );
        for a in acks {
            a.await.unwrap();
        }
    }

    async fn backlog(&mut self) -> u64 {
        let stream = self.js.get_stream("TICKETS").await.unwrap();
        match stream
            .get_consumer::<jetstream::consumer::pull::Config>("cascade")
            .await
        {
            Ok(mut c) => {
                let info = c.info().await.unwrap();
                info.num_pending + info.num_ack_pending as u64
            }
            // Not created yet: everything is pending.
            Err(_) => stream.get_info().await.unwrap().state.messages,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server (Debian); .ci/run installs it and runs this"]
async fn nats_jetstream_backlog_waits_in_the_bus_and_nothing_is_lost_or_repeated() {
    let port = common::free_port();
    let store = tempfile::tempdir().unwrap();
    let _nats = start(
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
    scenario(&mut Nats { js }, &trigger).await;
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

    async fn publish(&mut self) {
        let mut pipe = redis::pipe();
        for i in GHOSTED..MESSAGES {
            pipe.cmd("XADD")
                .arg("tickets")
                .arg("*")
                .arg("payload")
                .arg(format!("{{\"n\": {i}}}"))
                .ignore();
        }
        pipe.cmd("XADD")
            .arg("tickets")
            .arg("*")
            .arg("payload")
            .arg("{\"poison\": true}")
            .ignore();
        let () = pipe.query_async(&mut self.con).await.unwrap();
    }

    async fn backlog(&mut self) -> u64 {
        // XINFO GROUPS: the group's lag (not yet delivered) and pending (not acknowledged).
        let v: redis::Value = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg("tickets")
            .query_async(&mut self.con)
            .await
            .unwrap_or(redis::Value::Nil);
        let redis::Value::Array(groups) = v else {
            return MESSAGES as u64;
        };
        let Some(redis::Value::Array(fields)) = groups.into_iter().next() else {
            // The group does not exist yet: everything waits.
            return MESSAGES as u64;
        };
        let mut total = 0;
        for pair in fields.chunks(2) {
            let name: String = redis::from_redis_value_ref(&pair[0]).unwrap_or_default();
            if name == "lag" || name == "pending" {
                total += redis::from_redis_value_ref::<u64>(&pair[1]).unwrap_or(0);
            }
        }
        total
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server (Debian); .ci/run installs it and runs this"]
async fn redis_stream_backlog_waits_in_the_bus_and_nothing_is_lost_or_repeated() {
    let port = common::free_port();
    let _redis = start(
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
    scenario(&mut Redis { con }, &trigger).await;
}
