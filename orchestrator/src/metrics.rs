//! Every metric Cascade exports, declared in one place with its description and unit. Names have
//! the `cascade_` prefix, base units (seconds, dollars), `_total` on counters; labels are bounded
//! (graph, agent, quota, outcome, cause), never a job id.
//!
//! Counters and histograms on the per-step path are registered once per agent (handles cached by
//! the scheduler), so a step pays atomic increments, not registry lookups. Gauges that describe
//! state (queues, pauses, quota headroom) are sampled once a second by
//! [`Orchestrator::sample_metrics`](crate::Orchestrator::sample_metrics). Without an
//! installed recorder every call is a no-op, so embedding the library costs nothing.

use std::sync::OnceLock;

use metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const JOBS_SUBMITTED: &str = "cascade_jobs_submitted_total";
pub const JOBS_FINISHED: &str = "cascade_jobs_finished_total";
pub const JOB_DURATION: &str = "cascade_job_duration_seconds";
pub const JOBS_IN_FLIGHT: &str = "cascade_jobs_in_flight";
pub const JOBS_PENDING: &str = "cascade_jobs_pending";
pub const ADMISSION_REFUSALS: &str = "cascade_admission_refusals_total";
pub const STEP_DURATION: &str = "cascade_step_duration_seconds";
pub const AGENT_CALLS: &str = "cascade_agent_calls_total";
pub const AGENT_RETRIES: &str = "cascade_agent_retries_total";
pub const AGENT_RESTARTS: &str = "cascade_agent_restarts_total";
pub const AGENT_QUEUE_DEPTH: &str = "cascade_agent_queue_depth";
pub const AGENT_IN_FLIGHT: &str = "cascade_agent_in_flight";
pub const AGENT_PAUSED: &str = "cascade_agent_paused";
pub const AGENT_PAUSE_CAUSE: &str = "cascade_agent_pause_cause";
pub const AGENT_FAILED: &str = "cascade_agent_failed";
pub const QUOTA_REQUESTS: &str = "cascade_quota_requests_total";
pub const QUOTA_TOKENS: &str = "cascade_quota_tokens_total";
pub const QUOTA_REQUESTS_AVAILABLE: &str = "cascade_quota_requests_available";
pub const QUOTA_REQUESTS_LIMIT: &str = "cascade_quota_requests_limit_per_second";
pub const QUOTA_TOKENS_USED: &str = "cascade_quota_tokens_window_used";
pub const QUOTA_TOKENS_LIMIT: &str = "cascade_quota_tokens_window_limit";
pub const QUOTA_EXHAUSTED: &str = "cascade_quota_exhausted";
pub const QUOTA_EXHAUSTIONS: &str = "cascade_quota_exhaustions_total";
pub const QUOTA_REFUSALS: &str = "cascade_quota_upstream_refusals_total";
pub const QUOTA_CIRCUIT: &str = "cascade_quota_circuit_state";
pub const QUOTA_RATE_MULTIPLIER: &str = "cascade_quota_rate_multiplier";
pub const QUOTA_UPSTREAM_LIMIT: &str = "cascade_quota_upstream_limit";
pub const CREDENTIAL_REFRESH_FAILURES: &str = cascade_agents::http::oauth2::REFRESH_FAILURES;
pub const HTTP_RESPONSE_BUFFERED: &str = cascade_agents::http::RESPONSE_BUFFERED;
pub const QUOTA_UPSTREAM_AVAILABLE: &str = "cascade_quota_upstream_available";
pub const QUOTA_UPSTREAM_RATE: &str = "cascade_quota_upstream_refill_per_second";
pub const GRAPH_COST: &str = "cascade_graph_cost_usd";
pub const STORE_QUEUE_DEPTH: &str = "cascade_store_queue_depth";
pub const STORE_RECONNECTS: &str = "cascade_store_reconnects_total";
pub const QUOTA_BACKEND_UP: &str = "cascade_quota_backend_up";
pub const QUOTA_FALLBACK: &str = "cascade_quota_fallback";
pub const QUOTA_BACKEND_ROUND_TRIP: &str = "cascade_quota_backend_round_trip_seconds";
pub const QUOTA_BACKEND_ERRORS: &str = "cascade_quota_backend_errors_total";
pub const QUOTA_BACKEND_DROPPED: &str = "cascade_quota_backend_dropped_total";
pub const CLUSTER_TAKEOVERS: &str = "cascade_cluster_takeovers_total";
pub const CLUSTER_NODES: &str = "cascade_cluster_nodes";
pub const CLUSTER_JOBS_LEASED: &str = "cascade_cluster_jobs_leased";
pub const CLUSTER_LEASES_LOST: &str = "cascade_cluster_leases_lost_total";
pub const CLUSTER_HEARTBEAT_FAILURES: &str = "cascade_cluster_heartbeat_failures_total";
pub const CLUSTER_FENCED: &str = "cascade_cluster_fenced";
pub const STORE_FREEZE_QUEUE_DEPTH: &str = "cascade_store_freeze_queue_depth";
pub const WATCHERS: &str = "cascade_job_watchers";
pub const CONNECTIONS: &str = "cascade_connections";
pub const ACCEPT_ERRORS: &str = "cascade_accept_errors_total";
pub const CALLBACKS_WAITING: &str = "cascade_callbacks_waiting";
pub const CALLBACKS_DELIVERED: &str = "cascade_callbacks_total";
pub const WEBHOOK_SIGNATURES: &str = "cascade_webhook_signatures_remembered";
pub const APPROVALS_PENDING: &str = "cascade_approvals_pending";
pub const BUDGET_BREACHES: &str = "cascade_budget_breaches_total";
pub const TRIGGER_EVENTS: &str = "cascade_trigger_events_total";
pub const TRIGGER_PAUSED: &str = "cascade_trigger_paused";
pub const TRIGGER_BACKLOG: &str = "cascade_trigger_backlog";
pub const TRIGGER_WAITING: &str = "cascade_trigger_waiting";
pub const TRIGGER_FAILING: &str = "cascade_trigger_failing";
pub const APPROVAL_WAIT: &str = "cascade_approval_wait_seconds";
pub const APPROVAL_DECISIONS: &str = "cascade_approval_decisions_total";
pub const SUB_STEPS: &str = "cascade_sub_steps_total";
pub const SLOW_CONNECTIONS: &str = "cascade_slow_connections_closed_total";
pub const DASHBOARD_SESSIONS: &str = "cascade_dashboard_sessions";
pub const TENANT_REFUSALS: &str = "cascade_tenant_refusals_total";
pub const TLS_RELOADS: &str = "cascade_tls_reloads_total";
pub const TLS_HANDSHAKE_FAILURES: &str = "cascade_tls_handshake_failures_total";
pub const CONNECTIONS_REFUSED: &str = "cascade_connections_refused_total";
pub const AUDIT_QUEUE_DEPTH: &str = "cascade_audit_queue_depth";
pub const AUDIT_RECORDS: &str = "cascade_audit_records_total";
pub const AUDIT_WRITE_FAILURES: &str = "cascade_audit_write_failures_total";
pub const AUDIT_SIGNER: &str = "cascade_audit_signer";

/// Describe every metric (once, when the recorder is installed).
pub fn describe() {
    describe_counter!(
        TRIGGER_EVENTS,
        Unit::Count,
        "Trigger events, by graph, trigger and outcome (received, started, deduplicated, dropped by `when`, refused, dead_lettered)."
    );
    describe_gauge!(
        TRIGGER_PAUSED,
        "1 while an operator holds a trigger paused (`cascade triggers pause`), by graph and trigger."
    );
    describe_gauge!(
        TRIGGER_WAITING,
        "1 while a trigger does not take events because its graph is full or paused (the backlog waits in the bus), by graph and trigger."
    );
    describe_gauge!(
        TRIGGER_FAILING,
        "1 while a trigger's source is unreachable (a bus it cannot connect to or read; it retries with backoff), by graph and trigger."
    );
    describe_gauge!(
        TRIGGER_BACKLOG,
        Unit::Count,
        "Messages waiting in a bus trigger's stream for Cascade (JetStream pending, Redis group lag), by graph and trigger."
    );
    describe_counter!(JOBS_SUBMITTED, Unit::Count, "Jobs accepted, by graph.");
    describe_counter!(
        BUDGET_BREACHES,
        Unit::Count,
        "Jobs stopped because their next step would pass their budget, by graph and budget (max_tokens, max_cost_usd)."
    );
    describe_gauge!(
        APPROVALS_PENDING,
        Unit::Count,
        "Proposals waiting for a person's decision, by graph."
    );
    describe_histogram!(
        APPROVAL_WAIT,
        Unit::Seconds,
        "Time from a proposal to its decision, by graph and outcome."
    );
    describe_counter!(
        SLOW_CONNECTIONS,
        Unit::Count,
        "Connections closed because their first request's headers (or the HTTP/2 preface) did not arrive within the limit."
    );
    describe_gauge!(
        DASHBOARD_SESSIONS,
        Unit::Count,
        "Dashboard sessions signed in through /login and not yet ended or found expired."
    );
    describe_counter!(
        TENANT_REFUSALS,
        Unit::Count,
        "Submissions refused by a [tenants.NAME] limit, by tenant and reason (max_pending_jobs, submissions_per_second)."
    );
    describe_counter!(
        TLS_RELOADS,
        Unit::Count,
        "Reads of changed [server.tls] files, by result (ok; error: the previous certificate stays in use)."
    );
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        Unit::Count,
        "TLS handshakes that failed or did not finish in time, by listener (a plaintext client on a TLS port among them)."
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        Unit::Count,
        "Connections closed at once because their address held [server.limits] connections_per_address already, by listener."
    );
    describe_counter!(
        SUB_STEPS,
        Unit::Count,
        "Entries of tool-using steps' journals as they end or wait, by graph, agent, kind (turn, tool_call) and state (succeeded, failed, rejected, awaiting_approval)."
    );
    describe_counter!(
        APPROVAL_DECISIONS,
        Unit::Count,
        "Decisions on proposals, by graph and outcome (approved, rejected, expired)."
    );
    describe_gauge!(
        AUDIT_QUEUE_DEPTH,
        Unit::Count,
        "Audit records waiting for the audit writer; at 16384, whoever records one waits for room."
    );
    describe_counter!(
        AUDIT_RECORDS,
        Unit::Count,
        "Audit records appended, by kind."
    );
    describe_gauge!(
        AUDIT_SIGNER,
        Unit::Count,
        "1 while this node signs the audit log's checkpoints (in a cluster, one node at a time holds the signer's lock)."
    );
    describe_counter!(
        AUDIT_WRITE_FAILURES,
        Unit::Count,
        "Batches of audit records that could not be appended (the log's file is unwritable)."
    );
    describe_gauge!(
        CLUSTER_NODES,
        Unit::Count,
        "Nodes sharing this server's PostgreSQL store whose heartbeat is within the lease."
    );
    describe_gauge!(
        CLUSTER_JOBS_LEASED,
        Unit::Count,
        "Unfinished jobs this node holds the lease of (PostgreSQL store)."
    );
    describe_counter!(
        CLUSTER_TAKEOVERS,
        Unit::Count,
        "Unfinished jobs this node took over from nodes that stopped renewing their leases (PostgreSQL store)."
    );
    describe_counter!(
        CLUSTER_LEASES_LOST,
        Unit::Count,
        "Jobs another node took over while this one still ran them (its heartbeat was late); this node's changes to them are not written."
    );
    describe_gauge!(
        CLUSTER_FENCED,
        Unit::Count,
        "1 while this node starts no call because it could not renew its leases for three quarters of a lease (another node may take its jobs over)."
    );
    describe_counter!(
        CLUSTER_HEARTBEAT_FAILURES,
        Unit::Count,
        "Heartbeats (lease renewals) this node could not write to PostgreSQL."
    );
    describe_counter!(
        STORE_RECONNECTS,
        Unit::Count,
        "Times the PostgreSQL store's writer met a lost connection or an unreachable server and tried again (it keeps its batch; nothing acknowledged is lost)."
    );
    describe_gauge!(
        QUOTA_BACKEND_UP,
        Unit::Count,
        "1 while the cluster's shared quota backend (Redis, [server] quota_backend) answers; 0 while this node runs on its fallback."
    );
    describe_gauge!(
        QUOTA_FALLBACK,
        Unit::Count,
        "1 for the fallback this node runs on while the shared quota backend is unreachable (mode = local_share: 1/N of each quota; closed: no call leaves); 0 while the quotas are shared."
    );
    describe_histogram!(
        QUOTA_BACKEND_ROUND_TRIP,
        Unit::Seconds,
        "Round trips to the shared quota backend (reservations, settlements, holds, health checks)."
    );
    describe_counter!(
        QUOTA_BACKEND_ERRORS,
        Unit::Count,
        "Round trips to the shared quota backend that failed (each one starts or keeps the fallback)."
    );
    describe_counter!(
        QUOTA_BACKEND_DROPPED,
        Unit::Count,
        "Settlements and holds not written to the shared quota backend (it was unreachable, or 4096 writes were waiting already)."
    );
    describe_gauge!(
        STORE_QUEUE_DEPTH,
        Unit::Count,
        "Changes waiting for the durable store's writer; at store_queue_capacity, submissions are refused with a retry delay."
    );
    describe_gauge!(
        STORE_FREEZE_QUEUE_DEPTH,
        Unit::Count,
        "Finished jobs waiting to be compressed by the store's freezer thread, which takes them 32 at a time; at 4096, jobs are compressed where they finish."
    );
    describe_counter!(
        JOBS_FINISHED,
        Unit::Count,
        "Jobs finished, by graph and outcome (succeeded, failed, cancelled)."
    );
    describe_histogram!(
        JOB_DURATION,
        Unit::Seconds,
        "Job run time from start to finish, by graph and outcome."
    );
    describe_gauge!(JOBS_IN_FLIGHT, Unit::Count, "Jobs running now, by graph.");
    describe_gauge!(
        JOBS_PENDING,
        Unit::Count,
        "Jobs accepted and waiting to start, by graph."
    );
    describe_counter!(
        ADMISSION_REFUSALS,
        Unit::Count,
        "Submissions refused because the graph's backlog was full."
    );
    describe_histogram!(
        STEP_DURATION,
        Unit::Seconds,
        "Duration of one call of an agent, by graph and agent."
    );
    describe_counter!(
        AGENT_CALLS,
        Unit::Count,
        "Agent calls by outcome (success, transient, permanent, unauthorized, rate_limited)."
    );
    describe_counter!(
        AGENT_RETRIES,
        Unit::Count,
        "Failed attempts that were retried, by graph and agent."
    );
    describe_counter!(
        AGENT_RESTARTS,
        Unit::Count,
        "Agent actor restarts by the supervisor."
    );
    describe_gauge!(
        AGENT_QUEUE_DEPTH,
        Unit::Count,
        "Steps ready to run and waiting for the agent."
    );
    describe_gauge!(
        AGENT_IN_FLIGHT,
        Unit::Count,
        "Calls of the agent under way (including those waiting for a quota grant)."
    );
    describe_gauge!(
        AGENT_PAUSED,
        Unit::Count,
        "1 while the agent is paused by the cascade, else 0."
    );
    describe_gauge!(
        AGENT_PAUSE_CAUSE,
        Unit::Count,
        "1 for each cause holding the agent paused (a quota, or agent:NAME for a failed upstream agent)."
    );
    describe_gauge!(
        AGENT_FAILED,
        Unit::Count,
        "1 while the agent is marked failed (restarted too often): alert on it."
    );
    describe_counter!(QUOTA_REQUESTS, Unit::Count, "Calls granted by the quota.");
    describe_counter!(
        QUOTA_TOKENS,
        Unit::Count,
        "Tokens spent against the quota, by kind (prompt, completion)."
    );
    describe_gauge!(
        QUOTA_REQUESTS_AVAILABLE,
        Unit::Count,
        "Calls that could start back to back now."
    );
    describe_gauge!(
        QUOTA_REQUESTS_LIMIT,
        Unit::Count,
        "The quota's configured request rate, per second."
    );
    describe_gauge!(
        QUOTA_TOKENS_USED,
        Unit::Count,
        "Tokens spent within the quota's current window."
    );
    describe_gauge!(
        QUOTA_TOKENS_LIMIT,
        Unit::Count,
        "Tokens the quota allows per window."
    );
    describe_gauge!(
        QUOTA_EXHAUSTED,
        Unit::Count,
        "1 while the quota is exhausted (its agents are paused), else 0."
    );
    describe_counter!(
        QUOTA_EXHAUSTIONS,
        Unit::Count,
        "Times the quota became exhausted."
    );
    describe_counter!(
        QUOTA_REFUSALS,
        Unit::Count,
        "Calls the upstream refused as rate-limited (HTTP 429 / RESOURCE_EXHAUSTED)."
    );
    describe_gauge!(
        QUOTA_CIRCUIT,
        Unit::Count,
        "Circuit breaker state: 0 closed, 1 half-open, 2 open."
    );
    describe_gauge!(
        QUOTA_RATE_MULTIPLIER,
        Unit::Count,
        "AIMD's scale on the configured request rate (1 = as configured)."
    );
    describe_gauge!(
        HTTP_RESPONSE_BUFFERED,
        Unit::Bytes,
        "Bytes of HTTP response bodies being read by http and llm agents; at 256 MiB a further body fails its call as transient (retried) instead of growing memory."
    );
    describe_counter!(
        CREDENTIAL_REFRESH_FAILURES,
        Unit::Count,
        "Failures of a credential (its OAuth2 token fetch failed or a fresh token was refused, or its fixed key or password was refused with 401 after being read again), by credential; while it fails, its agents pause with cause credential:<name>."
    );
    describe_gauge!(
        QUOTA_UPSTREAM_LIMIT,
        Unit::Count,
        "The upstream's own limit as its answers state it (rate-limit headers), by kind (requests, tokens), for quotas that learn from their upstream."
    );
    describe_gauge!(
        QUOTA_UPSTREAM_AVAILABLE,
        Unit::Count,
        "What the quota estimates is left of the upstream's stated limit now, by kind."
    );
    describe_gauge!(
        QUOTA_UPSTREAM_RATE,
        Unit::Count,
        "The upstream's refill rate per second, measured from its stated resets, by kind."
    );
    describe_gauge!(
        WATCHERS,
        Unit::Count,
        "WatchJob streams open now; each ends with its job's final event or when its client goes away."
    );
    describe_gauge!(
        CONNECTIONS,
        Unit::Count,
        "Open client connections, by listener; the listeners share a budget of three quarters of RLIMIT_NOFILE (less 64), and past it new connections wait in the kernel's backlog."
    );
    describe_counter!(
        ACCEPT_ERRORS,
        Unit::Count,
        "Failed accept calls, by listener (each backs off, 5 ms doubling to 1 s)."
    );
    describe_gauge!(
        CALLBACKS_WAITING,
        Unit::Count,
        "Completion callbacks queued or in flight; at 16384, finished jobs' callbacks wait in the store and are sent after the next start."
    );
    describe_counter!(
        CALLBACKS_DELIVERED,
        Unit::Count,
        "Completion callbacks by outcome (delivered, failed after every attempt)."
    );
    describe_gauge!(
        WEBHOOK_SIGNATURES,
        Unit::Count,
        "Webhook signatures remembered to refuse replays within the timestamp window; at 65536 live ones, webhooks are answered 503 with Retry-After."
    );
    describe_gauge!(
        GRAPH_COST,
        Unit::Count,
        "Cost in US dollars spent by the graph's agents since start."
    );
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Install the Prometheus recorder (once per process; later calls return the same handle).
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    &[
                        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                        60.0, 300.0,
                    ],
                )
                .expect("buckets are not empty")
                .set_buckets_for_metric(
                    Matcher::Full(QUOTA_BACKEND_ROUND_TRIP.into()),
                    &[
                        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5,
                    ],
                )
                .expect("buckets are not empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!(
                    "another metrics recorder is installed; Cascade's /metrics will be empty"
                );
            }
            describe();
            // Exported from the start (at 0) on every server, so that the fallback's alert rule
            // reads a series that exists: a node with no shared quotas is on no fallback.
            quota_fallback(None);
            // Likewise the fenced node's alert: a node that holds no leases is never fenced.
            gauge!(CLUSTER_FENCED).set(0.0);
            // Histogram samples wait in the recorder until an upkeep folds them into buckets:
            // without one, a process nobody scrapes (`cascade run`, an embedding program) would
            // keep every sample it ever recorded. The builder's own upkeep task needs a runtime
            // at install time; a thread of its own does not.
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("cascade-metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(UPKEEP_PERIOD);
                        upkeep.run_upkeep();
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "could not start the metrics upkeep thread");
            }
            handle
        })
        .clone()
}

/// How often recorded histogram samples are folded into their buckets.
const UPKEEP_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// The Prometheus text, if the recorder is installed.
pub fn render() -> Option<String> {
    HANDLE.get().map(PrometheusHandle::render)
}

pub(crate) fn quota_backend_up(up: bool) {
    gauge!(QUOTA_BACKEND_UP).set(if up { 1.0 } else { 0.0 });
}

/// The fallback engaged (`None`: the quotas are shared).
pub(crate) fn quota_fallback(mode: Option<crate::quota::shared::QuotaFallback>) {
    use crate::quota::shared::QuotaFallback;
    for m in [QuotaFallback::LocalShare, QuotaFallback::Closed] {
        let on = mode == Some(m);
        gauge!(QUOTA_FALLBACK, "mode" => m.as_str()).set(if on { 1.0 } else { 0.0 });
    }
}

pub(crate) fn quota_backend_round_trip(took: std::time::Duration) {
    histogram!(QUOTA_BACKEND_ROUND_TRIP).record(took.as_secs_f64());
}

/// The shared quota backend's families, at 0, from the node's start.
pub(crate) fn quota_backend_register() {
    counter!(QUOTA_BACKEND_ERRORS).increment(0);
    counter!(QUOTA_BACKEND_DROPPED).increment(0);
}

pub(crate) fn quota_backend_error() {
    counter!(QUOTA_BACKEND_ERRORS).increment(1);
}

pub(crate) fn quota_backend_dropped() {
    counter!(QUOTA_BACKEND_DROPPED).increment(1);
}

/// Per-agent handles for the per-step path.
#[derive(Clone)]
pub(crate) struct AgentMetrics {
    pub success: Counter,
    pub transient: Counter,
    pub permanent: Counter,
    pub unauthorized: Counter,
    pub rate_limited: Counter,
    pub retries: Counter,
    pub step_duration: Histogram,
}

impl AgentMetrics {
    pub fn new(graph: &str, agent: &str) -> Self {
        let call = |outcome: &'static str| counter!(AGENT_CALLS, "graph" => graph.to_string(), "agent" => agent.to_string(), "outcome" => outcome);
        Self {
            success: call("success"),
            transient: call("transient"),
            permanent: call("permanent"),
            unauthorized: call("unauthorized"),
            rate_limited: call("rate_limited"),
            retries: counter!(AGENT_RETRIES, "graph" => graph.to_string(), "agent" => agent.to_string()),
            step_duration: histogram!(STEP_DURATION, "graph" => graph.to_string(), "agent" => agent.to_string()),
        }
    }
}

/// Per-graph handles.
#[derive(Clone)]
pub(crate) struct GraphMetrics {
    pub succeeded: Counter,
    pub failed: Counter,
    pub cancelled: Counter,
    pub duration_succeeded: Histogram,
    pub duration_failed: Histogram,
    pub approvals_pending: Gauge,
    /// Budget breaches: `max_tokens`, `max_cost_usd` (present from zero, as alerts need).
    pub budget_breaches: [Counter; 2],
}

impl GraphMetrics {
    /// A decision on one of this graph's proposals, `waited` after it was made.
    pub fn approval_decided(&self, graph: &str, outcome: &'static str, waited: f64) {
        counter!(APPROVAL_DECISIONS, "graph" => graph.to_string(), "outcome" => outcome)
            .increment(1);
        histogram!(APPROVAL_WAIT, "graph" => graph.to_string(), "outcome" => outcome)
            .record(waited);
        self.approvals_pending.decrement(1.0);
    }
}

impl GraphMetrics {
    pub fn new(graph: &str) -> Self {
        let finished =
            |o: &'static str| counter!(JOBS_FINISHED, "graph" => graph.to_string(), "outcome" => o);
        let duration = |o: &'static str| histogram!(JOB_DURATION, "graph" => graph.to_string(), "outcome" => o);
        Self {
            succeeded: finished("succeeded"),
            failed: finished("failed"),
            cancelled: finished("cancelled"),
            duration_succeeded: duration("succeeded"),
            duration_failed: duration("failed"),
            approvals_pending: gauge!(APPROVALS_PENDING, "graph" => graph.to_string()),
            budget_breaches: ["max_tokens", "max_cost_usd"]
                .map(|b| counter!(BUDGET_BREACHES, "graph" => graph.to_string(), "budget" => b)),
        }
    }
}
