//! Supervision of MCP servers: when a server that failed to start or died may be started again
//! ([`RestartBackoff`], a pure state machine), and the watcher of a stdio server's process,
//! which notices the process end, logs its exit status and starts it again after that backoff,
//! whether or not a call is waiting for it.

use std::process::ExitStatus;
use std::sync::Weak;
use std::time::Duration;

use tokio::process::Child;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::McpServer;

/// The first wait before a server that died or failed to start is started again; it doubles up
/// to [`MAX_RESTART_DELAY`] while it keeps failing.
pub(super) const FIRST_RESTART_DELAY: Duration = Duration::from_secs(1);
pub(super) const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);
/// A server that stayed up this long before it died starts its backoff again from
/// [`FIRST_RESTART_DELAY`]: it was not failing, it failed once.
pub(super) const STABLE_AFTER: Duration = Duration::from_secs(30);

/// When a server may be started again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct RestartBackoff {
    /// No start before this.
    not_before: Option<Instant>,
    /// The wait after the next failure.
    next_delay: Duration,
    /// When the running server was started; none while it is down.
    up_since: Option<Instant>,
}

impl Default for RestartBackoff {
    fn default() -> Self {
        Self {
            not_before: None,
            next_delay: FIRST_RESTART_DELAY,
            up_since: None,
        }
    }
}

impl RestartBackoff {
    /// How long a start must still wait at `now` (none: it may start now).
    pub(super) fn wait(&self, now: Instant) -> Option<Duration> {
        self.not_before.filter(|t| *t > now).map(|t| t - now)
    }

    /// A start succeeded at `now`.
    pub(super) fn started(&mut self, now: Instant) {
        self.not_before = None;
        self.up_since = Some(now);
    }

    /// A start failed, or the running server died, at `now`: the wait before the next start.
    pub(super) fn failed(&mut self, now: Instant) -> Duration {
        if self
            .up_since
            .take()
            .is_some_and(|since| now.duration_since(since) >= STABLE_AFTER)
        {
            self.next_delay = FIRST_RESTART_DELAY;
        }
        let delay = self.next_delay;
        self.not_before = Some(now + delay);
        self.next_delay = (delay * 2).min(MAX_RESTART_DELAY);
        delay
    }
}

/// Watch the process of the stdio server `server`, started as its start number `start`: when
/// it exits, log its status, forget its connection (unless a call did first) and start the
/// server again after the backoff. When `stop` fires or its sender is dropped (the connection
/// was forgotten or replaced, or the server itself is gone), the process is killed first.
pub(super) fn watch(
    server: Weak<McpServer>,
    start: u64,
    mut child: Child,
    stop: oneshot::Receiver<()>,
) {
    tokio::spawn(async move {
        let started = Instant::now();
        let (status, killed) = tokio::select! {
            // An exit that came first is told as one.
            biased;
            status = child.wait() => (status, false),
            _ = stop => {
                // Its connection broke (a call said so) or the server is gone: kill it, which
                // reaps it too.
                let _ = child.kill().await;
                (child.wait().await, true)
            }
        };
        let Some(s) = server.upgrade() else {
            return;
        };
        s.lost(|c| c.start == start);
        let restart_in_ms = s
            .backoff_wait()
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let status = status.map_or_else(|e| e.to_string(), |s| exit_status(&s));
        let up_for_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if killed {
            tracing::warn!(server = %s.name(), %status, up_for_ms, restart_in_ms, "MCP server's connection broke; its process was ended and it is started again after its backoff");
        } else {
            tracing::warn!(server = %s.name(), %status, up_for_ms, restart_in_ms, "MCP server exited; it is started again after its backoff");
        }
        if s.starts() != start {
            // Started again already.
            return;
        }
        drop(s);
        restart(server).await;
    });
}

/// Start `server` again as soon as its backoff allows, and again after each failed start,
/// until it runs (its new process has its own watcher) or it is gone.
async fn restart(server: Weak<McpServer>) {
    loop {
        let wait = {
            let Some(s) = server.upgrade() else {
                return;
            };
            if s.current().is_some() {
                return;
            }
            s.backoff_wait()
        };
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
            continue;
        }
        let Some(s) = server.upgrade() else {
            return;
        };
        if s.client().await.is_ok() {
            return;
        }
    }
}

/// `exit code 3`, `killed by signal 9`.
fn exit_status(status: &ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return format!("killed by signal {signal}");
        }
    }
    match status.code() {
        Some(code) => format!("exit code {code}"),
        None => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_doubles_from_one_second_to_thirty_and_starts_over_after_a_stable_run() {
        let t0 = Instant::now();
        let mut b = RestartBackoff::default();
        assert_eq!(b.wait(t0), None, "the first start does not wait");
        // Starts that fail: 1, 2, 4, 8, 16, 30, 30 s.
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..7 {
            let d = b.failed(now);
            assert_eq!(b.wait(now), Some(d));
            assert_eq!(b.wait(now + d), None, "it may start once the wait is over");
            waits.push(d.as_secs());
            now += d;
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        // A start that dies soon after does not reset the wait.
        b.started(now);
        assert_eq!(b.wait(now), None);
        assert_eq!(b.failed(now + Duration::from_secs(5)).as_secs(), 30);
        // One that stayed up a while does: the next death waits 1 s, and doubles from there.
        now += Duration::from_secs(40);
        b.started(now);
        now += STABLE_AFTER;
        assert_eq!(b.failed(now).as_secs(), 1);
        assert_eq!(b.failed(now + Duration::from_secs(1)).as_secs(), 2);
    }

    #[cfg(unix)]
    #[test]
    fn an_exit_is_told_by_its_code_or_its_signal() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(exit_status(&ExitStatus::from_raw(3 << 8)), "exit code 3");
        assert_eq!(exit_status(&ExitStatus::from_raw(9)), "killed by signal 9");
    }
}
