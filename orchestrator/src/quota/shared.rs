//! One quota across a cluster (`[server] quota_backend = "redis://…"`): the buckets every node's
//! calls draw on are kept in Redis and reserved and settled atomically by server-side scripts, so
//! a quota of 200 requests a second is 200 summed over every node, not 200 on each.
//!
//! Each node's broker still orders its own calls (oldest job first) and keeps its circuits and
//! the upstream's stated limits locally, and its share of each quota's concurrency (the declared
//! number divided by the live nodes, rounded down). A call it grants then *passes* the shared
//! buckets before it leaves ([`Claim::pass`]): one script reserves a slot on each shared quota
//! (first come, first served across nodes, on Redis's clock) and the call waits for that slot —
//! or, when a quota is spent beyond its `pause_threshold` (a token budget, an upstream's
//! Retry-After, an open circuit on any node), it reserves nothing and the node pauses the quota
//! for as long as that lasts. What a call really spent settles afterwards (token debt moves the
//! bucket on); a refusal on one node is written to the quota (a hold, and the multiplicative
//! decrease of AIMD, shared) and published, so every node pauses at once, and a node that
//! reconnects reads the holds again. A quota that declares no request rate learns one in the
//! shared state at the first refusal, from the calls every node sent in the last second (the
//! scripts count them), and paces every node by it from then on.
//!
//! A bucket is a GCRA state (a theoretical arrival time): requests per period with the quota's
//! burst, and tokens per period as a bucket of the whole budget refilled over the period (as
//! providers count them), reserved at the estimate and settled on the usage.
//!
//! When Redis cannot be reached the fallback is loud — a log line, `cascade_quota_fallback`
//! and the `CascadeQuotaBackendDown` alert — and it is either `local_share` (each live node
//! enforces its share, 1/N, of each quota locally) or `closed` (no call leaves); the node returns
//! to the shared state by itself when Redis answers again.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::StreamExt;
use redis::aio::MultiplexedConnection;
use smallvec::SmallVec;
use tokio::sync::{Notify, mpsc};

use super::core::{Limit, Outcome};
use crate::metrics as m;
use crate::model::QuotaModel;

/// What a node does while the quota backend cannot be reached (`[server] quota_fallback`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QuotaFallback {
    /// Each live node enforces 1/N of each quota locally.
    #[default]
    LocalShare,
    /// No call that draws on a quota leaves.
    Closed,
}

impl QuotaFallback {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "local_share" => Some(Self::LocalShare),
            "closed" => Some(Self::Closed),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::LocalShare => "local_share",
            Self::Closed => "closed",
        }
    }
}

/// How the node's local quotas run, as the backend's state decides.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ClusterMode {
    /// The shared buckets decide; the local ones keep the whole limit (they never bind first).
    Shared,
    /// Redis is unreachable: each local quota enforces this share of its limit.
    LocalShare(f64),
    /// Redis is unreachable: start no call.
    Closed,
}

/// What the shared state tells a node's broker.
#[derive(Clone, Debug)]
pub enum QuotaSignal {
    Mode(ClusterMode),
    /// The rate the cluster learned for `quota` (a quota that declares none), as it paces now.
    Learned {
        quota: String,
        per_second: f64,
    },
    /// The cluster has this many live nodes: each takes its share of a quota's concurrency.
    Nodes(usize),
    /// Another node (or the state read on reconnect) holds `quota` for `wait`, for `reason`.
    Hold {
        quota: String,
        wait: Duration,
        reason: Limit,
    },
}

/// Where the signals go (the orchestrator's broker, whichever incarnation runs).
pub type SignalSink = Arc<dyn Fn(QuotaSignal) + Send + Sync>;

/// How to reach the backend.
#[derive(Clone)]
pub struct SharedQuotaOptions {
    /// `redis://HOST:PORT` or `rediss://…` (TLS), with the password already put in.
    pub url: String,
    /// The URL as it may be shown (no password).
    pub shown: String,
    pub fallback: QuotaFallback,
    /// This node's name, so that it skips its own announcements.
    pub node_id: String,
    /// Prefix of every key and channel (so that several clusters may share one Redis).
    pub prefix: String,
    /// How long one round trip may take before the backend counts as unreachable.
    pub timeout: Duration,
}

impl std::fmt::Debug for SharedQuotaOptions {
    /// The URL as it may be shown: `url` holds the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedQuotaOptions")
            .field("url", &self.shown)
            .field("fallback", &self.fallback)
            .field("node_id", &self.node_id)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl SharedQuotaOptions {
    pub fn new(url: String, shown: String, node_id: String) -> Self {
        Self {
            url,
            shown,
            fallback: QuotaFallback::default(),
            node_id,
            prefix: "cascade".into(),
            timeout: Duration::from_millis(500),
        }
    }
}

/// One quota as the shared scripts see it (from its declaration; fixed while the server runs).
#[derive(Debug)]
pub struct SharedSpec {
    pub name: Arc<str>,
    key: String,
    /// Microseconds between requests at the declared rate (0: no request rate declared).
    request_interval_us: f64,
    request_burst: f64,
    /// Microseconds per token (0: no token budget declared).
    token_interval_us: f64,
    token_capacity: f64,
    /// Beyond this wait for a token budget or a hold, the quota counts as spent (its
    /// `pause_threshold`), and the call is not reserved.
    max_wait_us: f64,
    /// It declares no request rate and is no credential's: the cluster learns one at the
    /// upstream's first refusal (from the calls that left, on every node, in the last second).
    learns: bool,
}

/// A request-rate wait longer than this is not queued for at the shared bucket: the node pauses
/// the quota instead. Below it a call waits its turn, as it would in a single node's broker
/// (the calls waiting are bounded by the agents' concurrency on every node).
const MAX_PACING: Duration = Duration::from_secs(30);

impl SharedSpec {
    pub fn new(spec: &QuotaModel, prefix: &str) -> Self {
        let (request_interval_us, request_burst) = match spec.requests {
            Some(r) => {
                let per_sec = r.per_second();
                // The same default burst as a local quota: a tenth of a second's worth.
                let burst = spec
                    .burst
                    .map_or_else(|| ((per_sec / 10.0).round() as u32).max(1), |b| b.get());
                (1e6 / per_sec, f64::from(burst))
            }
            None => (0.0, 0.0),
        };
        let (token_interval_us, token_capacity) = match spec.tokens {
            Some(t) => {
                let limit = t.amount.get() as f64;
                (t.period.as_micros() as f64 / limit, limit)
            }
            None => (0.0, 0.0),
        };
        Self {
            name: spec.name.clone(),
            key: format!("{prefix}:quota:{}", spec.name),
            request_interval_us,
            request_burst,
            token_interval_us,
            token_capacity,
            max_wait_us: spec.pause_threshold.as_micros() as f64,
            learns: spec.requests.is_none() && !spec.credential,
        }
    }

    /// A tenant's share of a quota: it limits that tenant's calls and learns no rate of its own
    /// (a rate learned from one tenant's last second would throttle it to that).
    pub fn new_share(spec: &QuotaModel, prefix: &str) -> Self {
        Self {
            learns: false,
            ..Self::new(spec, prefix)
        }
    }
}

/// The rate multiplier of a quota's hash `h` at `now` (µs), after the increase earned since
/// its last update (the Lua twin of `limits::Aimd::multiplier`): additive up to 1 for a
/// declared rate; for a learned one (`lr` set), a share of itself per second, 10 % while it
/// probes (no decrease since it was learned), 2 % after, up to 100 times.
macro_rules! multiplier_lua {
    () => {
        r#"
local function multiplier(m, ma, lr, lp, now)
  m = tonumber(m) or 1
  if not ma then return m end
  local secs = (now - tonumber(ma)) / 1e6
  if lr then
    local growth = 0.02
    if lp == '1' then growth = 0.10 end
    return math.min(100, m * (1 + secs * growth))
  end
  return math.min(1, m + secs * 0.01)
end
"#
    };
}

/// Reserve a slot on each quota of a call, all or none (times on Redis's clock, in µs).
/// KEYS: the quotas. ARGV, seven per quota: request interval, burst, token interval, token
/// capacity, tokens, longest wait for tokens or a hold, whether it learns its rate; then the
/// longest pacing wait. A quota that learns counts the calls that leave in two one-second
/// windows (`cw`, `c0`, `c1`), and once it learned a rate (`lr`), paces by it as a declared one.
/// Returns `{1, wait}` (reserved: start in `wait` µs) or `{0, wait, quota index, reason}`.
const RESERVE: &str = concat!(
    multiplier_lua!(),
    r#"
-- tostring keeps 14 digits: a time in microseconds has 16.
local function num(x) return string.format('%.3f', x) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local pacing_max = tonumber(ARGV[#KEYS * 7 + 1])
local wait, defer, defer_i, defer_why = 0, -1, 0, ''
local plans = {}
for i = 1, #KEYS do
  local a = (i - 1) * 7
  local ri, rcap = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local ti, tcap = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local tokens, maxw = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  local learns = ARGV[a + 7] == '1'
  local h = redis.call('HMGET', KEYS[i], 'r', 't', 'hold', 'hr', 'm', 'ma', 'lr', 'lp', 'cw', 'c0', 'c1')
  local hold = tonumber(h[3]) or 0
  if hold > now and hold - now > maxw then
    if hold - now > defer then defer, defer_i, defer_why = hold - now, i, h[4] or 'upstream' end
  elseif hold > now and hold - now > wait then
    wait = hold - now
  end
  local lr = tonumber(h[7])
  local m = multiplier(h[5], h[6], lr, h[8], now)
  local plan = {m = m}
  if learns then
    if lr then
      -- A learned rate paces as a declared one, with a tenth of a second's burst.
      ri, rcap = 1e6 / lr, math.max(1, math.floor(lr / 10 + 0.5))
    end
    local win = math.floor(now / 1e6)
    local cw, c0, c1 = tonumber(h[9]) or 0, tonumber(h[10]) or 0, tonumber(h[11]) or 0
    if cw == win then c0 = c0 + 1
    elseif cw == win - 1 then c1, c0 = c0, 1
    else c1, c0 = 0, 1 end
    plan.cw, plan.c0, plan.c1 = win, c0, c1
  end
  if ri > 0 then
    local iv = ri / m
    local tat = math.max(tonumber(h[1]) or 0, now, hold)
    plan.r = tat + iv
    local w = plan.r - rcap * iv - now
    if w > pacing_max then
      if w > defer then defer, defer_i, defer_why = w, i, 'rate' end
    elseif w > wait then
      wait = w
    end
  end
  if ti > 0 and tokens > 0 then
    local tat = math.max(tonumber(h[2]) or 0, now)
    plan.t = tat + tokens * ti
    local w = plan.t - tcap * ti - now
    -- A call larger than the whole budget goes alone, once the bucket is full.
    if tokens > tcap then w = tat - now end
    if w > maxw then
      if w > defer then defer, defer_i, defer_why = w, i, 'tokens' end
    elseif w > wait then
      wait = w
    end
  end
  plans[i] = plan
end
if defer >= 0 then
  return {0, math.floor(defer), defer_i - 1, defer_why}
end
for i = 1, #KEYS do
  local p = plans[i]
  -- The multiplier keeps every digit: its increase per call may be a few millionths.
  local fields = {'m', string.format('%.17g', p.m), 'ma', num(now)}
  if p.r then table.insert(fields, 'r'); table.insert(fields, num(p.r)) end
  if p.t then table.insert(fields, 't'); table.insert(fields, num(p.t)) end
  if p.cw then
    table.insert(fields, 'cw'); table.insert(fields, p.cw)
    table.insert(fields, 'c0'); table.insert(fields, p.c0)
    table.insert(fields, 'c1'); table.insert(fields, p.c1)
  end
  redis.call('HSET', KEYS[i], unpack(fields))
  redis.call('PEXPIRE', KEYS[i], 3600000)
end
return {1, math.floor(wait)}
"#
);

/// Settle a call's tokens: move the token bucket by (actual − reserved) tokens.
/// KEYS: the quota. ARGV: token interval, difference in tokens.
const SETTLE: &str = r#"
local t = redis.call('HGET', KEYS[1], 't')
if t then
  redis.call('HSET', KEYS[1], 't', string.format('%.3f', tonumber(t) + tonumber(ARGV[2]) * tonumber(ARGV[1])))
end
return 1
"#;

/// A refusal or a pause on one node: hold the quota until now + wait (the longest hold wins),
/// decrease its rate (AIMD, one decrease per 250 ms) when asked — or, for a quota that learns
/// and has no rate yet, learn one: just under the calls that left in the last second, on every
/// node —, and announce it.
/// KEYS: the quota. ARGV: wait µs, reason, decrease (0/1), channel, quota name, node, learns
/// (0/1).
const HOLD: &str = concat!(
    multiplier_lua!(),
    r#"
local function num(x) return string.format('%.3f', x) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local until_ = now + tonumber(ARGV[1])
local h = redis.call('HMGET', KEYS[1], 'hold', 'm', 'ma', 'md', 'lr', 'lp', 'cw', 'c0', 'c1')
local hold = tonumber(h[1]) or 0
if ARGV[3] == '1' and now - (tonumber(h[4]) or 0) >= 250000 then
  local lr = tonumber(h[5])
  if ARGV[7] == '1' and not lr then
    -- The calls that left over the last second: this window's and the share of the last one's
    -- still within it.
    local win, frac = math.floor(now / 1e6), (now % 1e6) / 1e6
    local cw, c0, c1 = tonumber(h[7]) or 0, tonumber(h[8]) or 0, tonumber(h[9]) or 0
    local sent = 0
    if cw == win then sent = c0 + c1 * (1 - frac)
    elseif cw == win - 1 then sent = c0 * (1 - frac) end
    redis.call('HSET', KEYS[1], 'lr', string.format('%.17g', math.max(1, sent * 0.97)),
      'lp', '1', 'm', '1', 'ma', num(now), 'md', num(now), 'r', num(now))
  else
    local m = multiplier(h[2], h[3], lr, h[6], now)
    -- At most halved by one decrease, never under a twentieth.
    m = math.max(m * 0.95, m * 0.5, 0.05)
    redis.call('HSET', KEYS[1], 'm', string.format('%.17g', m), 'ma', num(now), 'md', num(now), 'lp', '0')
  end
end
if until_ > hold + 10000 then
  redis.call('HSET', KEYS[1], 'hold', num(until_), 'hr', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], 3600000)
  redis.call('PUBLISH', ARGV[4], ARGV[6] .. '\t' .. ARGV[5] .. '\t' .. math.floor(tonumber(ARGV[1]) / 1000) .. '\t' .. ARGV[2])
  return 1
end
return 0
"#
);

/// The rates the cluster learned, as they pace now (base times multiplier): `{index, rate}` as
/// text for each quota that has one. KEYS: the quotas that learn.
const LEARNED: &str = concat!(
    multiplier_lua!(),
    r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i = 1, #KEYS do
  local h = redis.call('HMGET', KEYS[i], 'lr', 'm', 'ma', 'lp')
  local lr = tonumber(h[1])
  if lr then
    table.insert(out, {i - 1, string.format('%.6f', lr * multiplier(h[2], h[3], lr, h[4], now))})
  end
end
return out
"#
);

/// The holds still running: `{index, wait µs, reason}` for each quota held. KEYS: the quotas.
const HOLDS: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i = 1, #KEYS do
  local h = redis.call('HMGET', KEYS[i], 'hold', 'hr')
  local hold = tonumber(h[1]) or 0
  if hold > now then
    table.insert(out, {i - 1, math.floor(hold - now), h[2] or 'upstream'})
  end
end
return out
"#;

/// A Redis URL with the password from its secret reference put in, percent-encoded.
pub fn url_with_password(
    url: &str,
    password: Option<&crate::secret::SecretRef>,
) -> Result<String, String> {
    let Some(r) = password else {
        return Ok(url.to_string());
    };
    let secret = r.resolve()?;
    let password = secret
        .expose_str()
        .ok_or_else(|| format!("secret {r} is not UTF-8 text"))?;
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| "url has no scheme".to_string())?;
    if rest.contains('@') {
        return Err(
            "url names a user or password already: keep the password in `password` only".into(),
        );
    }
    // Percent-encoding of the userinfo part (RFC 3986): every byte but the unreserved ones.
    let encoded: String = password
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    Ok(format!("{scheme}://:{encoded}@{rest}"))
}

/// How many asynchronous writes (settlements, holds) may wait for the backend; past it they are
/// dropped and counted (a dropped settlement leaves the estimate in the bucket: errs on the safe
/// side).
const OPS_CAPACITY: usize = 4096;

enum Op {
    Settle {
        spec: Arc<SharedSpec>,
        tokens: i64,
    },
    Hold {
        spec: Arc<SharedSpec>,
        wait: Duration,
        reason: &'static str,
        decrease: bool,
    },
}

/// The shared quotas of one node: its connection to the backend and what it knows of its state.
pub struct SharedQuotas {
    options: SharedQuotaOptions,
    client: redis::Client,
    conn: RwLock<Option<MultiplexedConnection>>,
    up: AtomicBool,
    /// Live nodes in the cluster (for `local_share`).
    live_nodes: AtomicUsize,
    specs: RwLock<Vec<Arc<SharedSpec>>>,
    sink: RwLock<Option<SignalSink>>,
    /// Whether this node is fenced (see [`set_fence`](Self::set_fence)).
    fence: RwLock<Option<Arc<dyn Fn() -> bool + Send + Sync>>>,
    ops: mpsc::Sender<Op>,
    ops_rx: Mutex<Option<mpsc::Receiver<Op>>>,
    /// Wakes the keeper when a round trip failed.
    lost: Notify,
    /// Tells the follower to subscribe again (the backend came back: its subscription may be
    /// a dead connection that never ends).
    resubscribe: Arc<Notify>,
    reserve: redis::Script,
    settle: redis::Script,
    hold: redis::Script,
    holds: redis::Script,
    learned: redis::Script,
    /// Until when each shared quota is held, as this node last heard, and when it heard it (one
    /// entry per quota of this node's configuration): a call that reserved its turn before a
    /// hold came does not leave.
    held: Mutex<std::collections::HashMap<Arc<str>, (tokio::time::Instant, tokio::time::Instant)>>,
}

/// Why a quota is held, as the scripts write it.
fn reason_code(reason: Limit) -> &'static str {
    match reason {
        Limit::Credential => "credential",
        Limit::CircuitOpen | Limit::CircuitHalfOpen => "circuit",
        Limit::TokenBudget => "tokens",
        Limit::RequestRate => "rate",
        _ => "upstream",
    }
}

fn reason_of(code: &str) -> Limit {
    match code {
        "credential" => Limit::Credential,
        "circuit" => Limit::CircuitOpen,
        "tokens" => Limit::TokenBudget,
        "rate" => Limit::RequestRate,
        _ => Limit::UpstreamRateLimit,
    }
}

impl SharedQuotas {
    /// Connect (for up to the options' timeout; a backend unreachable now is a warning and the
    /// fallback, and the node keeps trying) and start the tasks that keep the connection,
    /// follow the announcements and write settlements.
    pub async fn start(options: SharedQuotaOptions) -> Result<Arc<Self>, String> {
        let client = redis::Client::open(options.url.as_str())
            .map_err(|e| format!("quota_backend {}: {e}", options.shown))?;
        let (ops, ops_rx) = mpsc::channel(OPS_CAPACITY);
        let me = Arc::new(Self {
            options,
            client,
            conn: RwLock::new(None),
            up: AtomicBool::new(false),
            live_nodes: AtomicUsize::new(1),
            specs: RwLock::new(Vec::new()),
            sink: RwLock::new(None),
            fence: RwLock::new(None),
            ops,
            ops_rx: Mutex::new(Some(ops_rx)),
            lost: Notify::new(),
            resubscribe: Arc::new(Notify::new()),
            reserve: redis::Script::new(RESERVE),
            settle: redis::Script::new(SETTLE),
            hold: redis::Script::new(HOLD),
            holds: redis::Script::new(HOLDS),
            learned: redis::Script::new(LEARNED),
            held: Mutex::new(std::collections::HashMap::new()),
        });
        m::quota_backend_register();
        m::quota_backend_up(false);
        m::quota_fallback(Some(me.options.fallback));
        match me.connect().await {
            // No broker listens yet: it reads the mode when it starts.
            Ok(()) => me.back_up(),
            Err(e) => {
                tracing::warn!(
                    backend = %me.options.shown,
                    error = %e,
                    fallback = me.options.fallback.as_str(),
                    "the quota backend cannot be reached: quotas fall back until it can"
                );
                eprintln!(
                    "warning: the quota backend {} cannot be reached ({e}): quotas are {} until it can",
                    me.options.shown,
                    me.fallback_words()
                );
            }
        }
        Ok(me)
    }

    /// The quotas this node shares, and where its signals go: called once the broker's quotas
    /// are known. Starts the tasks.
    pub fn attach(self: &Arc<Self>, specs: Vec<Arc<SharedSpec>>, sink: SignalSink) {
        *self.specs.write().unwrap_or_else(|p| p.into_inner()) = specs;
        *self.sink.write().unwrap_or_else(|p| p.into_inner()) = Some(sink);
        let Some(rx) = self.ops_rx.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let weak = Arc::downgrade(self);
        tokio::spawn(keeper(weak.clone()));
        tokio::spawn(follower(weak.clone()));
        tokio::spawn(writer(weak, rx));
        if self.is_up() {
            let me = self.clone();
            tokio::spawn(async move { me.resync().await });
        }
    }

    /// Read the holds that still run, soon (a broker that restarted lost the ones it had).
    pub fn resync_later(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move { me.resync().await });
    }

    fn fallback_words(&self) -> &'static str {
        match self.options.fallback {
            QuotaFallback::LocalShare => "local shares (1/N of each quota per node)",
            QuotaFallback::Closed => "closed (no call leaves)",
        }
    }

    /// The prefix of its keys and channel.
    pub fn prefix(&self) -> &str {
        &self.options.prefix
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// How the local quotas run now.
    pub fn mode(&self) -> ClusterMode {
        if self.is_up() {
            return ClusterMode::Shared;
        }
        match self.options.fallback {
            QuotaFallback::Closed => ClusterMode::Closed,
            QuotaFallback::LocalShare => {
                ClusterMode::LocalShare(1.0 / self.live_nodes.load(Ordering::Relaxed).max(1) as f64)
            }
        }
    }

    /// The live nodes of the cluster now (from the store's heartbeats).
    pub fn set_live_nodes(&self, n: usize) {
        let n = n.max(1);
        if self.live_nodes.swap(n, Ordering::Relaxed) != n {
            self.signal(QuotaSignal::Nodes(n));
            if !self.is_up() {
                self.signal(QuotaSignal::Mode(self.mode()));
            }
        }
    }

    /// Tell whether this node is fenced (its store could not renew its leases): a call that
    /// waited for its turn does not leave then.
    pub fn set_fence(&self, fenced: Arc<dyn Fn() -> bool + Send + Sync>) {
        *self.fence.write().unwrap_or_else(|p| p.into_inner()) = Some(fenced);
    }

    fn fenced(&self) -> bool {
        self.fence
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|f| f())
    }

    /// The live nodes of the cluster, as last told.
    pub fn live_nodes(&self) -> usize {
        self.live_nodes.load(Ordering::Relaxed).max(1)
    }

    fn signal(&self, s: QuotaSignal) {
        if let QuotaSignal::Hold { quota, wait, .. } = &s {
            self.note_hold(quota, *wait);
        }
        let sink = self.sink.read().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(sink) = sink {
            sink(s);
        }
    }

    fn connection(&self) -> Option<MultiplexedConnection> {
        if !self.is_up() {
            return None;
        }
        self.conn.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn connect(&self) -> Result<(), String> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.options.timeout))
            .set_response_timeout(Some(self.options.timeout));
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| e.to_string())?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        *self.conn.write().unwrap_or_else(|p| p.into_inner()) = Some(conn);
        Ok(())
    }

    /// A round trip failed: the backend counts as unreachable until the keeper reconnects.
    fn fail(&self, error: &redis::RedisError) {
        m::quota_backend_error();
        if self.up.swap(false, Ordering::AcqRel) {
            tracing::error!(
                backend = %self.options.shown,
                error = %error,
                fallback = self.options.fallback.as_str(),
                "the quota backend is unreachable: quotas fall back until it answers"
            );
            m::quota_backend_up(false);
            m::quota_fallback(Some(self.options.fallback));
            self.signal(QuotaSignal::Mode(self.mode()));
        }
        self.lost.notify_one();
    }

    fn back_up(&self) {
        if !self.up.swap(true, Ordering::AcqRel) {
            tracing::info!(backend = %self.options.shown, "the quota backend answers: quotas are shared again");
            m::quota_backend_up(true);
            m::quota_fallback(None);
            self.signal(QuotaSignal::Mode(ClusterMode::Shared));
        }
    }

    async fn timed<T>(
        &self,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> redis::RedisResult<T> {
        let start = std::time::Instant::now();
        let r = f.await;
        m::quota_backend_round_trip(start.elapsed());
        if let Err(e) = &r {
            // Unreachable, or answering with an error (a replica after a failover, loading,
            // out of memory): either way its state cannot be relied on, and the fallback runs
            // until a health check finds it answering again.
            self.fail(e);
        }
        r
    }

    /// Read the holds that still run (on start and after a reconnect: announcements made while
    /// this node was away were missed).
    async fn resync(&self) {
        let specs = self.specs.read().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(mut conn) = self.connection() else {
            return;
        };
        if specs.is_empty() {
            return;
        }
        let mut inv = self.holds.prepare_invoke();
        for s in &specs {
            inv.key(&s.key);
        }
        let held: Vec<(usize, u64, String)> = match self.timed(inv.invoke_async(&mut conn)).await {
            Ok(h) => h,
            Err(_) => return,
        };
        for (i, wait_us, reason) in held {
            if let Some(s) = specs.get(i) {
                self.signal(QuotaSignal::Hold {
                    quota: s.name.to_string(),
                    wait: Duration::from_micros(wait_us),
                    reason: reason_of(&reason),
                });
            }
        }
    }

    /// Read the rates the cluster learned, for this node's quotas to show (GetGraph, the
    /// dashboard): every few seconds, one round trip for every quota that learns.
    async fn read_learned(&self) {
        let learning: Vec<Arc<SharedSpec>> = self
            .specs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|s| s.learns)
            .cloned()
            .collect();
        let Some(mut conn) = self.connection() else {
            return;
        };
        if learning.is_empty() {
            return;
        }
        let mut inv = self.learned.prepare_invoke();
        for s in &learning {
            inv.key(&s.key);
        }
        let rates: Vec<(usize, String)> = match self.timed(inv.invoke_async(&mut conn)).await {
            Ok(r) => r,
            Err(_) => return,
        };
        for (i, rate) in rates {
            if let (Some(s), Ok(per_second)) = (learning.get(i), rate.parse()) {
                self.signal(QuotaSignal::Learned {
                    quota: s.name.to_string(),
                    per_second,
                });
            }
        }
    }

    /// Remember that `quota` (one of this node's) is held for `wait` from now.
    fn note_hold(&self, quota: &str, wait: Duration) {
        let specs = self.specs.read().unwrap_or_else(|p| p.into_inner());
        let Some(spec) = specs.iter().find(|s| &*s.name == quota) else {
            return;
        };
        let now = tokio::time::Instant::now();
        let until = now + wait;
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let at = held.entry(spec.name.clone()).or_insert((until, now));
        if until > at.0 {
            *at = (until, now);
        }
    }

    /// How much longer `quota` is held by a hold heard of since `since`, if it is.
    fn held_since(&self, quota: &str, since: tokio::time::Instant) -> Option<Duration> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let (until, heard) = *held.get(quota)?;
        let now = tokio::time::Instant::now();
        (until > now && heard >= since).then(|| until - now)
    }

    /// Hold `spec` on every node for `wait` (a refusal, an open circuit, a dead credential, an
    /// operator's exhaust); `decrease`: the upstream refused for rate (AIMD). Written
    /// asynchronously; dropped and counted when the backend is far behind.
    pub fn hold(&self, spec: &Arc<SharedSpec>, wait: Duration, reason: Limit, decrease: bool) {
        self.note_hold(&spec.name, wait);
        self.push(Op::Hold {
            spec: spec.clone(),
            wait,
            reason: reason_code(reason),
            decrease,
        });
    }

    fn push(&self, op: Op) {
        if self.mode() != ClusterMode::Shared {
            return;
        }
        if self.ops.try_send(op).is_err() {
            m::quota_backend_dropped();
        }
    }

    fn channel(&self) -> String {
        format!("{}:quota:holds", self.options.prefix)
    }
}

/// Reconnects while the backend is unreachable (backoff 0.2 → 5 s) and checks it every second
/// while it is up, so that the fallback starts and ends without waiting for a call.
async fn keeper(me: std::sync::Weak<SharedQuotas>) {
    let mut backoff = Duration::from_millis(200);
    let mut checks = 0u64;
    loop {
        let Some(q) = me.upgrade() else { return };
        if q.is_up() {
            backoff = Duration::from_millis(200);
            checks += 1;
            if checks.is_multiple_of(5) {
                q.read_learned().await;
            }
            let conn = q.connection();
            let ping = async {
                match conn {
                    Some(mut c) => redis::cmd("PING").query_async::<String>(&mut c).await,
                    None => Err(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "no connection",
                    ))),
                }
            };
            let _ = q.timed(ping).await;
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = q.lost.notified() => {}
            }
            continue;
        }
        match q.connect().await {
            Ok(()) => {
                q.back_up();
                q.resubscribe.notify_one();
                q.resync().await;
            }
            Err(e) => {
                tracing::debug!(error = %e, "the quota backend is still unreachable");
                drop(q);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Follows the holds other nodes announce (pub/sub), reconnecting after a loss.
async fn follower(me: std::sync::Weak<SharedQuotas>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let Some(q) = me.upgrade() else { return };
        let (channel, own) = (q.channel(), q.options.node_id.clone());
        let pubsub = tokio::time::timeout(q.options.timeout * 4, async {
            let mut p = q.client.get_async_pubsub().await?;
            p.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(p)
        })
        .await;
        let mut pubsub = match pubsub {
            Ok(Ok(p)) => p,
            _ => {
                drop(q);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        // Announcements made before the subscription was in place.
        q.resync().await;
        let resubscribe = q.resubscribe.clone();
        drop(q);
        let mut messages = pubsub.on_message();
        loop {
            let msg = tokio::select! {
                m = messages.next() => m,
                () = resubscribe.notified() => None,
            };
            let Some(msg) = msg else { break };
            let Ok(text) = msg.get_payload::<String>() else {
                continue;
            };
            let mut parts = text.split('\t');
            let (Some(node), Some(quota), Some(ms), Some(reason)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let Ok(ms) = ms.parse::<u64>() else { continue };
            if node == own {
                continue;
            }
            let Some(q) = me.upgrade() else { return };
            q.signal(QuotaSignal::Hold {
                quota: quota.to_string(),
                wait: Duration::from_millis(ms),
                reason: reason_of(reason),
            });
        }
        // The subscription ended: the backend went away (the keeper notices too).
        tokio::time::sleep(backoff).await;
    }
}

/// Writes settlements and holds, in order, as they come.
async fn writer(me: std::sync::Weak<SharedQuotas>, mut rx: mpsc::Receiver<Op>) {
    while let Some(op) = rx.recv().await {
        let Some(q) = me.upgrade() else { return };
        let Some(mut conn) = q.connection() else {
            // Unreachable: what was spent meanwhile is the fallback's to count.
            m::quota_backend_dropped();
            continue;
        };
        let _ = match op {
            Op::Settle { spec, tokens } => {
                let mut inv = q.settle.key(&spec.key);
                inv.arg(spec.token_interval_us).arg(tokens);
                q.timed(inv.invoke_async::<i64>(&mut conn)).await
            }
            Op::Hold {
                spec,
                wait,
                reason,
                decrease,
            } => {
                let mut inv = q.hold.key(&spec.key);
                inv.arg(wait.as_micros() as u64)
                    .arg(reason)
                    .arg(if decrease { 1 } else { 0 })
                    .arg(q.channel())
                    .arg(&*spec.name)
                    .arg(&q.options.node_id)
                    .arg(if spec.learns { 1 } else { 0 });
                q.timed(inv.invoke_async::<i64>(&mut conn)).await
            }
        };
    }
}

/// A call's claim on the shared buckets of its quotas, carried by its grant: passed before the
/// call leaves, settled when it ends.
pub struct Claim {
    shared: Arc<SharedQuotas>,
    items: SmallVec<[(Arc<SharedSpec>, u64); 1]>,
    /// The buckets hold this call's reservation (settled when it ends).
    reserved: bool,
    /// Its refusal was announced already (see [`refused`](Self::refused)).
    announced: bool,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim")
            .field(
                "quotas",
                &self.items.iter().map(|(s, _)| &s.name).collect::<Vec<_>>(),
            )
            .field("reserved", &self.reserved)
            .finish()
    }
}

/// Why a call could not leave: the quota that is spent, for how long, and why.
#[derive(Clone, Debug)]
pub struct Deferral {
    pub quota: Arc<str>,
    pub wait: Duration,
    pub reason: Limit,
}

impl Claim {
    pub fn new(shared: Arc<SharedQuotas>, items: SmallVec<[(Arc<SharedSpec>, u64); 1]>) -> Self {
        Self {
            shared,
            items,
            reserved: false,
            announced: false,
        }
    }

    /// The upstream refused this call for rate: hold its quotas on every node now, as the
    /// answer comes, rather than when the scheduler settles the call (a turn later, which on a
    /// busy node let other nodes' calls go out meanwhile).
    pub fn refused(&mut self, wait: Option<Duration>) {
        if std::mem::replace(&mut self.announced, true) {
            return;
        }
        for (spec, _) in &self.items {
            self.shared.hold(
                spec,
                wait.unwrap_or(Duration::from_millis(100)),
                Limit::UpstreamRateLimit,
                spec.request_interval_us > 0.0 || spec.learns,
            );
        }
    }

    /// Reserve this call's place on the shared buckets and wait for it; or say which quota is
    /// spent and for how long (nothing is reserved then). Under the fallback: at once
    /// (`local_share`: the local quotas enforce the shares) or never (`closed`).
    pub async fn pass(&mut self) -> Result<(), Deferral> {
        let closed = || Deferral {
            quota: self.items[0].0.name.clone(),
            wait: Duration::from_secs(1),
            reason: Limit::QuotaBackend,
        };
        let fenced = || Deferral {
            quota: self.items[0].0.name.clone(),
            wait: Duration::from_secs(1),
            reason: Limit::Fenced,
        };
        if self.items.is_empty() {
            return Ok(());
        }
        let q = &self.shared;
        if q.fenced() {
            return Err(fenced());
        }
        let Some(mut conn) = q.connection() else {
            return match q.options.fallback {
                QuotaFallback::LocalShare => Ok(()),
                QuotaFallback::Closed => Err(closed()),
            };
        };
        let mut inv = q.reserve.prepare_invoke();
        for (spec, tokens) in &self.items {
            inv.key(&spec.key)
                .arg(spec.request_interval_us)
                .arg(spec.request_burst)
                .arg(spec.token_interval_us)
                .arg(spec.token_capacity)
                .arg(*tokens)
                .arg(spec.max_wait_us)
                .arg(if spec.learns { 1 } else { 0 });
        }
        inv.arg(MAX_PACING.as_micros() as u64);
        let asked = tokio::time::Instant::now();
        let answer: redis::RedisResult<Vec<redis::Value>> =
            q.timed(inv.invoke_async(&mut conn)).await;
        let answer = match answer {
            Ok(a) => a,
            Err(_) => {
                return match q.options.fallback {
                    QuotaFallback::LocalShare => Ok(()),
                    QuotaFallback::Closed => Err(closed()),
                };
            }
        };
        let int = |i: usize| match answer.get(i) {
            Some(redis::Value::Int(n)) => *n,
            _ => 0,
        };
        if int(0) == 1 {
            self.reserved = true;
            let wait = Duration::from_micros(int(1).max(0) as u64);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            // The node fenced itself while this call waited for its turn (another node may be
            // taking its job over): the call does not leave.
            if q.fenced() {
                return Err(fenced());
            }
            // A hold that came while this call waited for its turn (a 429 on any node) stops
            // it too: its turn is given up, not spent on a call the upstream would refuse.
            for (spec, _) in &self.items {
                if let Some(wait) = q.held_since(&spec.name, asked) {
                    return Err(Deferral {
                        quota: spec.name.clone(),
                        wait,
                        reason: Limit::UpstreamRateLimit,
                    });
                }
            }
            return Ok(());
        }
        let reason = match answer.get(3) {
            Some(redis::Value::BulkString(b)) => reason_of(&String::from_utf8_lossy(b)),
            Some(redis::Value::SimpleString(s)) => reason_of(s),
            _ => Limit::UpstreamRateLimit,
        };
        let index = usize::try_from(int(2))
            .unwrap_or(0)
            .min(self.items.len() - 1);
        let deferral = Deferral {
            quota: self.items[index].0.name.clone(),
            wait: Duration::from_micros(int(1).max(0) as u64),
            reason,
        };
        // This node's broker pauses the quota (before the step comes back to ask again).
        q.signal(QuotaSignal::Hold {
            quota: deferral.quota.to_string(),
            wait: deferral.wait,
            reason,
        });
        Err(deferral)
    }

    /// The call ended, with `outcome` (`spent`: the tokens it reported): settle its tokens on
    /// the shared buckets; a refusal for rate holds the quota on every node and lowers its rate;
    /// a credential that cannot get a token holds that credential's quota alone.
    pub fn finish(&mut self, spent: Option<u64>, outcome: Outcome, credential: Option<&str>) {
        let q = self.shared.clone();
        if let Some(name) = credential {
            let found = self
                .items
                .iter()
                .find(|(s, _)| s.name.strip_prefix(QuotaModel::CREDENTIAL_PREFIX) == Some(name));
            if let (Some((spec, _)), Outcome::RateLimited(wait)) = (found, outcome) {
                q.hold(
                    spec,
                    wait.unwrap_or(Duration::from_secs(1)),
                    Limit::Credential,
                    false,
                );
            }
        } else if let Outcome::RateLimited(wait) = outcome {
            self.refused(wait);
        }
        if !std::mem::take(&mut self.reserved) {
            return;
        }
        for (spec, reserved) in &self.items {
            if spec.token_interval_us <= 0.0 {
                continue;
            }
            let actual = match (spent, outcome) {
                (Some(s), _) => s,
                // A refused or abandoned call spent nothing upstream.
                (None, Outcome::RateLimited(_) | Outcome::Abandoned) => 0,
                // A failed call may have spent tokens: keep the reservation.
                (None, _) => *reserved,
            };
            if actual != *reserved {
                q.push(Op::Settle {
                    spec: spec.clone(),
                    tokens: actual as i64 - *reserved as i64,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Rate;
    use std::num::{NonZeroU32, NonZeroU64};

    #[test]
    fn a_shared_spec_carries_its_quota_in_microseconds() {
        let spec = QuotaModel {
            name: "llm".into(),
            requests: Some(Rate {
                amount: NonZeroU64::new(200).unwrap(),
                period: Duration::from_secs(1),
            }),
            tokens: Some(Rate {
                amount: NonZeroU64::new(60_000).unwrap(),
                period: Duration::from_secs(60),
            }),
            cost: None,
            burst: Some(NonZeroU32::new(4).unwrap()),
            max_concurrency: None,
            circuit_breaker: None,
            pause_threshold: Duration::from_millis(250),
            declared_at: String::new(),
            implicit: false,
            learn_from_upstream: false,
            credential: false,
            tenant_share: Vec::new(),
        };
        let s = SharedSpec::new(&spec, "cascade");
        assert_eq!(s.key, "cascade:quota:llm");
        assert!((s.request_interval_us - 5000.0).abs() < 1e-9);
        assert_eq!(s.request_burst, 4.0);
        assert!((s.token_interval_us - 1000.0).abs() < 1e-9);
        assert_eq!(s.token_capacity, 60_000.0);
        assert_eq!(s.max_wait_us, 250_000.0);
        // No burst declared: a tenth of a second's worth, as a local quota.
        let s = SharedSpec::new(
            &QuotaModel {
                burst: None,
                ..spec
            },
            "cascade",
        );
        assert_eq!(s.request_burst, 20.0);
    }

    #[test]
    fn every_reason_survives_the_scripts() {
        for r in [
            Limit::Credential,
            Limit::CircuitOpen,
            Limit::TokenBudget,
            Limit::RequestRate,
            Limit::UpstreamRateLimit,
        ] {
            assert_eq!(reason_of(reason_code(r)), r);
        }
    }

    #[test]
    fn a_password_goes_into_the_url_encoded() {
        // SAFETY: the variable is this test's own.
        unsafe { std::env::set_var("CASCADE_TEST_SHARED_REDIS_PW", "p@ss:w/rd") };
        let r: crate::secret::SecretRef = "env:CASCADE_TEST_SHARED_REDIS_PW".parse().unwrap();
        assert_eq!(
            url_with_password("rediss://r.internal:6380", Some(&r)).unwrap(),
            "rediss://:p%40ss%3Aw%2Frd@r.internal:6380"
        );
        assert!(url_with_password("redis://u@r", Some(&r)).is_err());
        assert_eq!(url_with_password("redis://r", None).unwrap(), "redis://r");
    }
}
