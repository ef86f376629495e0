//! The live dashboard in a real browser: headless Chromium (Debian's package) loads the page
//! from a real server; a quota exhaustion must show exactly the expected nodes paused, and later
//! resumed, in the page's DOM. A screenshot is kept as a test artifact.

use std::process::Command;
use std::time::{Duration, Instant};

use cascade_orchestrator::config;

mod common;
#[path = "support/tool_stand_ins.rs"]
mod stand_ins;

const GRAPH: &str = r#"
[graph]
name = "watched"
[quotas.watched-llm]
requests_per_second = 10
[agents.classify]
kind = "sim"
quota = "watched-llm"
[agents.draft]
kind = "sim"
after = ["classify"]
on_upstream_pause = "stop"
[agents.audit]
kind = "sim"
"#;

fn chromium(args: &[&str], url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,900",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .expect("Debian's chromium is installed (apt-get install chromium)");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Agent name → the state the page shows for it.
fn agent_states(dom: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    // Rendered nodes only (the page's script holds the same attribute names in a template).
    for part in dom.split("<g class=\"node agent state-").skip(1) {
        let part = part.split("data-agent=\"").nth(1).unwrap_or_default();
        let name = part.split('"').next().unwrap().to_string();
        let state = part
            .split("data-state=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or("")
            .to_string();
        // The script's template literal is not a rendered node.
        if !name.contains("${") {
            out.push((name, state));
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Debian's chromium package: .ci/run installs it and runs this test"]
async fn the_dashboard_shows_exactly_the_paused_nodes_then_their_resume() {
    let model = config::parse_graph_str("watched.toml", GRAPH, &Default::default()).unwrap();
    let (orch, server) = common::serve_in_process(model).await;
    let url = format!("http://{}/", server.http_addr);

    let pause = Duration::from_secs(12);
    assert!(orch.exhaust_quota("watched-llm", pause).await);
    let started = Instant::now();
    let u = url.clone();
    let dom = tokio::task::spawn_blocking(move || chromium(&["--dump-dom"], &u))
        .await
        .unwrap();
    assert!(
        started.elapsed() < pause,
        "the page was read while the pause lasted"
    );
    assert_eq!(
        agent_states(&dom),
        [
            ("audit".to_string(), "idle".to_string()),
            ("classify".to_string(), "paused".to_string()),
            ("draft".to_string(), "paused".to_string()),
        ],
        "page:\n{dom}"
    );
    assert!(
        dom.contains("data-quota=\"watched-llm\" data-state=\"exhausted\""),
        "the quota shows exhausted"
    );
    assert!(
        dom.contains("paused: watched-llm"),
        "the cause is named on the node"
    );

    let artifact = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-paused.png");
    let shot = format!("--screenshot={}", artifact.display());
    let u = url.clone();
    tokio::task::spawn_blocking(move || chromium(&[&shot], &u))
        .await
        .unwrap();
    assert!(
        std::fs::metadata(&artifact).unwrap().len() > 10_000,
        "a real screenshot at {}",
        artifact.display()
    );
    eprintln!("screenshot: {}", artifact.display());

    // After the pause, the same page shows everything resumed.
    while orch.paused_agents("watched") > 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let u = url.clone();
    let dom = tokio::task::spawn_blocking(move || chromium(&["--dump-dom"], &u))
        .await
        .unwrap();
    let states = agent_states(&dom);
    assert_eq!(states.len(), 3);
    assert!(states.iter().all(|(_, s)| s == "idle"), "{states:?}");
    server.stop().await;
    orch.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Debian's chromium package: .ci/run installs it and runs this test"]
async fn the_dashboard_draws_a_hundred_agents_quickly() {
    let mut toml =
        String::from("[graph]\nname = \"wide\"\n[quotas.wide-q]\nrequests_per_second = 100\n");
    for i in 0..100 {
        toml += &format!("[agents.a{i}]\nkind = \"sim\"\n");
        match i {
            0..10 => toml += "quota = \"wide-q\"\n",
            _ => toml += &format!("after = [\"a{}\", \"a{}\"]\n", i / 2, i - 1),
        }
    }
    let model = config::parse_graph_str("wide.toml", &toml, &Default::default()).unwrap();
    let (orch, server) = common::serve_in_process(model).await;
    orch.exhaust_quota("wide-q", Duration::from_secs(30)).await;
    let url = format!("http://{}/", server.http_addr);
    let dom = tokio::task::spawn_blocking(move || chromium(&["--dump-dom"], &url))
        .await
        .unwrap();
    let states = agent_states(&dom);
    assert_eq!(states.len(), 100, "every agent is drawn");
    // The quota reaches every agent (the first ten directly, the rest downstream).
    assert!(states.iter().all(|(_, s)| s == "paused"), "{states:?}");
    let ms: f64 = dom
        .split("data-render-ms=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .and_then(|v| v.parse().ok())
        .expect("the page reports its render time");
    // A frame is rebuilt every second; it must take a small part of that.
    assert!(ms < 250.0, "a frame of 100 agents took {ms} ms");
    eprintln!("100 agents drawn in {ms} ms");
    server.stop().await;
    orch.shutdown(Duration::from_millis(10)).await;
}

/// A headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
/// commands on its fd 3, answers on its fd 4, each message ended by a NUL byte), so that one page
/// stays open while the test reads its DOM again and again. A WebSocket client would need a
/// dependency for a test alone; the pipe needs none.
struct Browser {
    child: std::process::Child,
    to: std::io::PipeWriter,
    from: std::io::BufReader<std::io::PipeReader>,
    next_id: u64,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn open(url: &str) -> Self {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let (cmd_r, cmd_w) = std::io::pipe().unwrap();
        let (resp_r, resp_w) = std::io::pipe().unwrap();
        let (cr, rw) = (cmd_r.as_raw_fd(), resp_w.as_raw_fd());
        let profile = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("chromium");
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-pipe",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        // SAFETY: between fork and exec only dup2, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(cr, 3) < 0 || libc::dup2(rw, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .expect("Debian's chromium is installed (apt-get install chromium)");
        drop((cmd_r, resp_w));
        let mut b = Browser {
            child,
            to: cmd_w,
            from: std::io::BufReader::new(resp_r),
            next_id: 0,
            session: String::new(),
            _profile: profile,
        };
        let target = b.call("Target.createTarget", serde_json::json!({ "url": url }));
        let target = target["targetId"].as_str().unwrap().to_string();
        let attached = b.call(
            "Target.attachToTarget",
            serde_json::json!({ "targetId": target, "flatten": true }),
        );
        b.session = attached["sessionId"].as_str().unwrap().to_string();
        b
    }

    /// Send a command (to the page once attached) and return its result.
    fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        match self.try_call(method, params) {
            Ok(result) => result,
            Err(error) => panic!("{method}: {error}"),
        }
    }

    /// Send a command and return its result or the protocol's error.
    fn try_call(
        &mut self,
        method: &str,
        params: serde_json::Value,
    ) -> Result<serde_json::Value, serde_json::Value> {
        use std::io::{BufRead, Write};
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = serde_json::json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            msg["sessionId"] = self.session.clone().into();
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).unwrap();
        loop {
            let mut buf = Vec::new();
            let n = self.from.read_until(0, &mut buf).unwrap();
            assert!(n > 0, "chromium closed the DevTools pipe");
            buf.pop();
            let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
            if v["id"] == id {
                return match v.get("error") {
                    Some(error) => Err(error.clone()),
                    None => Ok(v["result"].clone()),
                };
            }
        }
    }

    /// Evaluate `expr` in the page; its value. While the page navigates (a form submitted, a
    /// redirect followed) there is no document to evaluate in: that reads as `null`, which the
    /// tests' waits take as "not yet"; any other protocol error fails the test.
    fn eval(&mut self, expr: &str) -> serde_json::Value {
        let r = self.try_call(
            "Runtime.evaluate",
            serde_json::json!({ "expression": expr, "returnByValue": true }),
        );
        match r {
            Ok(r) => r["result"]["value"].clone(),
            Err(error) if navigating(&error) => serde_json::Value::Null,
            Err(error) => panic!("Runtime.evaluate: {error}"),
        }
    }

    /// The lines of the page's live event log (written only by its event stream).
    fn events(&mut self) -> Vec<String> {
        let v = self.eval(
            "JSON.stringify([...document.querySelectorAll('#events div')].map(d => d.textContent))",
        );
        serde_json::from_str(v.as_str().unwrap_or("[]")).unwrap()
    }

    /// Agent name → the state the page shows now.
    fn states(&mut self) -> Vec<(String, String)> {
        let v = self.eval(
            "JSON.stringify([...document.querySelectorAll('g.node.agent')].map(g => [g.dataset.agent, g.dataset.state]).sort())",
        );
        serde_json::from_str(v.as_str().unwrap_or("[]")).unwrap()
    }
}

/// Whether a DevTools error only says the page was between documents when asked.
fn navigating(error: &serde_json::Value) -> bool {
    let message = error["message"].as_str().unwrap_or_default();
    [
        "navigated or closed",
        "Execution context was destroyed",
        "Cannot find context",
    ]
    .iter()
    .any(|m| message.contains(m))
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real 429 from a (simulated) provider pauses the chain, and the page that stays open shows
/// the pause and then the resume by itself, without a reload: what the page's live event stream
/// and refresh are for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Debian's chromium package: .ci/run installs it and runs this test"]
async fn an_open_dashboard_follows_a_real_429_pause_and_its_resume() {
    let graph = r#"
[graph]
name = "live"
[agents.classify]
kind = "sim"
upstream = "live-provider"
upstream_limit = { rate = "12/min", burst = 1 }
[agents.draft]
kind = "sim"
after = ["classify"]
[agents.audit]
kind = "sim"
"#;
    let model = config::parse_graph_str("live.toml", graph, &Default::default()).unwrap();
    let (orch, server) = common::serve_in_process(model).await;
    let url = format!("http://{}/", server.http_addr);
    let mut page = tokio::task::spawn_blocking(move || Browser::open(&url))
        .await
        .unwrap();
    type Seen = (Vec<(String, String)>, Vec<String>);
    // One request at a time: the test waits for each reply before it asks again.
    let (page_tx, page_rx) = std::sync::mpsc::sync_channel::<std::sync::mpsc::SyncSender<Seen>>(1);
    // The browser is driven from one blocking thread; the test asks it for the states.
    let driver = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while page.states().len() < 3 {
            assert!(Instant::now() < deadline, "the page never drew the graph");
            std::thread::sleep(Duration::from_millis(100));
        }
        // The page's event stream is open (the server subscribed it) before anything happens.
        while page.eval("source.readyState") != 1 {
            assert!(
                Instant::now() < deadline,
                "the page's event stream never opened"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        page.eval("window.__sameDocument = 'yes'");
        while let Ok(reply) = page_rx.recv() {
            let _ = reply.send((page.states(), page.events()));
        }
        assert_eq!(
            page.eval("window.__sameDocument"),
            "yes",
            "the page was reloaded"
        );
    });
    let states = || {
        // One reply per request: it never holds more than one message.
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        page_tx.send(tx).unwrap();
        rx.recv().unwrap()
    };
    let state = |all: &[(String, String)], agent: &str| {
        all.iter()
            .find(|(a, _)| a == agent)
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    };
    // The driver answers once the page is drawn and its event stream open.
    let (before, _) = states();
    assert!(before.iter().all(|(_, st)| st == "idle"), "{before:?}");
    // Two jobs: the provider takes the first call and refuses the second with a Retry-After
    // of about five seconds.
    for i in 0..2 {
        orch.submit(cascade_orchestrator::SubmitRequest::new(
            "live",
            serde_json::json!({ "n": i }),
        ))
        .await
        .unwrap();
    }
    let logged = |lines: &[String], what: &str| lines.iter().any(|l| l.contains(what));
    let deadline = Instant::now() + Duration::from_secs(10);
    let paused = loop {
        // A short blocking round trip to the driver thread.
        let (s, log) = states();
        // The node states come from the page's periodic refresh; the log lines only from its
        // live event stream: both must show the pause.
        if state(&s, "classify") == "paused"
            && state(&s, "draft") == "paused"
            && logged(&log, "agent_paused live/classify")
            && logged(&log, "agent_paused live/draft")
        {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the open page never showed the pause: {s:?}; its event log: {log:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(state(&paused, "audit"), "idle", "{paused:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // A short blocking round trip to the driver thread.
        let (s, log) = states();
        if s.iter().all(|(_, st)| st != "paused") && logged(&log, "agent_resumed live/classify") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the open page never showed the resume: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(page_tx);
    driver.join().expect("the same page, never reloaded");
    server.stop().await;
    orch.shutdown(Duration::from_millis(10)).await;
}

/// The jobs pages in a real browser: the list shows the jobs and the approvals waiting, a job's
/// page its steps and events, and its Approve button runs the step; a Reject on the list page
/// fails its job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Debian's chromium package: .ci/run installs it and runs this test"]
async fn a_pending_job_is_approved_from_the_dashboard() {
    use cascade_orchestrator::job::JobState;
    let graph = r#"
[graph]
name = "guarded"
[agents.prepare]
kind = "sim"
[agents.pay]
kind = "sim"
after = ["prepare"]
approval = "required"
"#;
    let model = config::parse_graph_str("guarded.toml", graph, &Default::default()).unwrap();
    let (orch, server) = common::serve_in_process(model).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let req =
            cascade_orchestrator::SubmitRequest::new("guarded", serde_json::json!({ "n": i }));
        ids.push(orch.submit(req).await.unwrap().id);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while orch.store().pending_approval_count("guarded") < 3 {
        assert!(Instant::now() < deadline, "the proposals were not made");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let base = format!("http://{}", server.http_addr);

    // The list page: three jobs awaiting approval, three approvals with their proposals.
    let u = format!("{base}/jobs?graph=guarded");
    let rejected = ids[2];
    let list = tokio::task::spawn_blocking(move || {
        let mut page = Browser::open(&u);
        let deadline = Instant::now() + Duration::from_secs(30);
        while page.eval("document.querySelectorAll('#approvals .approval').length") != 3 {
            assert!(Instant::now() < deadline, "the list page never showed the approvals");
            std::thread::sleep(Duration::from_millis(100));
        }
        let rows = page.eval("JSON.stringify([...document.querySelectorAll('tr[data-job]')].map(r => r.dataset.state))");
        // Reject the third job's proposal from here.
        page.eval(&format!(
            "(() => {{ const f = document.querySelector('form.decide[data-approval=\"{rejected}/pay\"]');
               f.approver.value = 'dana'; f.reason.value = 'not this one'; f.querySelector('button.reject').click(); }})()"
        ));
        let outcome = loop {
            let v = page.eval(&format!("window.decided?.['{rejected}/pay'] ?? null"));
            if !v.is_null() {
                break v;
            }
            assert!(Instant::now() < deadline, "the reject never answered");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(outcome, "rejected");
        rows
    })
    .await
    .unwrap();
    let rows: Vec<String> = serde_json::from_str(list.as_str().unwrap()).unwrap();
    assert_eq!(rows, ["awaiting_approval"; 3], "{rows:?}");
    let done = tokio::time::timeout(Duration::from_secs(30), orch.wait(rejected))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.state, JobState::Failed);
    assert!(
        done.error
            .as_deref()
            .unwrap()
            .contains("rejected by dana: not this one"),
        "{:?}",
        done.error
    );

    // A job's page: its steps, its events, and the Approve button.
    let id = ids[0];
    let u = format!("{base}/jobs/{id}");
    let seen = tokio::task::spawn_blocking(move || {
        let mut page = Browser::open(&u);
        let deadline = Instant::now() + Duration::from_secs(30);
        while page.eval("document.querySelectorAll('form.decide').length") != 1 {
            assert!(Instant::now() < deadline, "the job page never showed its approval");
            std::thread::sleep(Duration::from_millis(100));
        }
        let steps = page.eval("JSON.stringify([...document.querySelectorAll('#steps tr[data-agent]')].map(r => [r.dataset.agent, r.dataset.state]))");
        let events = page.eval("document.querySelector('#events').textContent");
        let proposal = page.eval("document.querySelector('pre.proposal').textContent");
        page.eval("(() => { const f = document.querySelector('form.decide'); f.approver.value = 'erin'; f.querySelector('button.approve').click(); })()");
        let outcome = loop {
            let v = page.eval(&format!("window.decided?.['{id}/pay'] ?? null"));
            if !v.is_null() {
                break v;
            }
            assert!(Instant::now() < deadline, "the approve never answered");
            std::thread::sleep(Duration::from_millis(50));
        };
        (steps, events, proposal, outcome)
    })
    .await
    .unwrap();
    let (steps, events, proposal, outcome) = seen;
    let steps: Vec<(String, String)> = serde_json::from_str(steps.as_str().unwrap()).unwrap();
    assert_eq!(
        steps,
        [
            ("prepare".to_string(), "succeeded".to_string()),
            ("pay".to_string(), "awaiting_approval".to_string())
        ]
    );
    assert!(
        events.as_str().unwrap().contains("approval_requested"),
        "{events}"
    );
    assert!(
        proposal.as_str().unwrap().contains("\"n\":0"),
        "the proposal is shown as stored: {proposal}"
    );
    assert_eq!(outcome, "approved");
    let done = tokio::time::timeout(Duration::from_secs(30), orch.wait(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.error);
    let v = orch.approval(&format!("{id}/pay")).unwrap();
    assert_eq!(v.approval.decision.unwrap().approver, "erin");
    assert_eq!(orch.store().pending_approval_count("guarded"), 1);
    server.stop().await;
    orch.shutdown(Duration::from_millis(10)).await;
}

/// A tool-using agent's journal on its job's page, and the approval of one of its tool calls
/// decided from there (its id is `<job>/<agent>/<n>`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Debian's chromium package: .ci/run installs it and runs this test"]
async fn a_tool_loops_journal_is_shown_and_its_tool_call_approved_from_the_job_page() {
    use cascade_orchestrator::job::JobState;
    stand_ins::set_key();
    let desk = stand_ins::desk::Desk::default();
    let desk_port = stand_ins::desk::serve(desk.clone()).await;
    let llm_port = stand_ins::model::serve(stand_ins::model::Model::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let model = stand_ins::load(
        dir.path(),
        &stand_ins::graph(llm_port, "openai", ""),
        &stand_ins::servers(desk_port),
    );
    let (orch, server) = common::serve_in_process(model).await;
    let id = orch
        .submit(cascade_orchestrator::SubmitRequest::new(
            "support",
            serde_json::json!({"email": "ada@example.com"}),
        ))
        .await
        .unwrap()
        .id;
    let parked = tokio::time::timeout(Duration::from_secs(30), orch.wait_settled(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        parked.state,
        JobState::AwaitingApproval,
        "{:?}",
        parked.error
    );
    let u = format!("http://{}/jobs/{id}", server.http_addr);
    let approval = format!("{id}/triage/5");
    let seen = tokio::task::spawn_blocking(move || {
        let mut page = Browser::open(&u);
        let deadline = Instant::now() + Duration::from_secs(30);
        while page.eval("document.querySelectorAll('#journal tr[data-n]').length") != 5 {
            assert!(Instant::now() < deadline, "the job page never showed the journal");
            std::thread::sleep(Duration::from_millis(100));
        }
        let rows = page.eval("JSON.stringify([...document.querySelectorAll('#journal tr[data-n]')].map(r => [r.dataset.kind, r.dataset.state, r.textContent]))");
        page.eval(&format!(
            "(() => {{ const f = document.querySelector('form.decide[data-approval=\"{approval}\"]');
               f.approver.value = 'erin'; f.querySelector('button.approve').click(); }})()"
        ));
        let outcome = loop {
            let v = page.eval(&format!("window.decided?.['{approval}'] ?? null"));
            if !v.is_null() {
                break v;
            }
            assert!(Instant::now() < deadline, "the approve never answered");
            std::thread::sleep(Duration::from_millis(50));
        };
        (rows, outcome)
    })
    .await
    .unwrap();
    let (rows, outcome) = seen;
    let rows: Vec<(String, String, String)> = serde_json::from_str(rows.as_str().unwrap()).unwrap();
    let shape: Vec<(&str, &str)> = rows
        .iter()
        .map(|(k, s, _)| (k.as_str(), s.as_str()))
        .collect();
    assert_eq!(
        shape,
        [
            ("turn", "succeeded"),
            ("tool_call", "succeeded"),
            ("tool_call", "succeeded"),
            ("turn", "succeeded"),
            ("tool_call", "awaiting_approval"),
        ]
    );
    assert!(
        rows[0]
            .2
            .contains("calls desk__lookup_customer, desk__search_tickets"),
        "{:?}",
        rows[0]
    );
    assert!(
        rows[1].2.contains("desk.lookup_customer") && rows[1].2.contains("ada@example.com"),
        "{:?}",
        rows[1]
    );
    assert!(rows[4].2.contains("\"ticket\":\"T-7\""), "{:?}", rows[4]);
    assert_eq!(outcome, "approved");
    let done = tokio::time::timeout(Duration::from_secs(30), orch.wait(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.error);
    assert_eq!(desk.count("close_ticket"), 1);
    server.stop().await;
    orch.shutdown(Duration::from_millis(10)).await;
}

/// With keys on, a browser signs in at /login with a key and then holds an HttpOnly, SameSite
/// session cookie: opening a page signed out leads to the form and back; a wrong key is shown
/// its error; a change without the CSRF token is refused, the page's own approval (which sends
/// it) goes through and records the key's name; signing out ends the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Debian's chromium package: .ci/run installs it and runs this test"]
async fn the_dashboard_signs_in_with_a_key_and_checks_csrf() {
    use cascade_orchestrator::auth;
    let key = auth::generate_key();
    let dir = common::server_dir(
        &[(
            "guarded.toml",
            "[graph]\nname = \"guarded\"\n[agents.prepare]\nkind = \"sim\"\n[agents.pay]\nkind = \"sim\"\nafter = [\"prepare\"]\napproval = \"required\"\n",
        )],
        &format!(
            "[[auth.api_keys]]\nname = \"acme-lead\"\ntenant = \"acme\"\nroles = [\"read\", \"approve\"]\nhash = \"{}\"\n",
            auth::sha256_hash(&key)
        ),
    );
    let model = config::load(
        Some(&dir.path().join("cascade.toml")),
        &[],
        &Default::default(),
    )
    .unwrap();
    let (orch, server) = common::serve_in_process(model).await;
    let mut req = cascade_orchestrator::SubmitRequest::new("guarded", serde_json::json!({}));
    req.tenant = "acme".into();
    let id = orch.submit(req).await.unwrap().id;
    let deadline = Instant::now() + Duration::from_secs(30);
    while orch.store().pending_approval_count("guarded") < 1 {
        assert!(Instant::now() < deadline, "the proposal was not made");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let base = format!("http://{}", server.http_addr);
    let u = format!("{base}/jobs");
    let seen = tokio::task::spawn_blocking(move || {
        let mut page = Browser::open(&u);
        let deadline = Instant::now() + Duration::from_secs(30);
        let wait_for = |page: &mut Browser, expr: &str, what: &str| loop {
            let v = page.eval(expr);
            if v != serde_json::Value::Null && v != false {
                return v;
            }
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(50));
        };
        // Signed out: the sign-in form, remembering where to go back to.
        wait_for(
            &mut page,
            "location.pathname === '/login' && document.querySelector('#token') !== null",
            "no sign-in form",
        );
        let next = page.eval("document.querySelector('input[name=next]').value");
        // A wrong key: the form again, with why.
        page.eval("document.querySelector('#token').value = 'csk_wrong'; document.querySelector('#login').submit()");
        let error = wait_for(
            &mut page,
            "(document.querySelector('#error')?.textContent || null)",
            "the wrong key's error was never shown",
        );
        // The right key: back to the jobs page.
        page.eval(&format!(
            "document.querySelector('#token').value = '{key}'; document.querySelector('#login').submit()"
        ));
        wait_for(
            &mut page,
            "location.pathname === '/jobs' && document.querySelectorAll('form.decide').length === 1",
            "signed in, the jobs page never showed the approval",
        );
        let cookies = page.call("Network.getCookies", serde_json::json!({}));
        let script_sees = page.eval("document.cookie");
        // A change without the CSRF token, as another page's script could try.
        page.eval(&format!(
            "fetch('/api/approvals/{id}/pay', {{ method: 'POST', headers: {{ 'content-type': 'application/json' }}, body: JSON.stringify({{ decision: 'approve', sha256: 'x', approver: 'x' }}) }}).then(r => r.json().then(b => window.csrfless = [r.status, b.error]))"
        ));
        let csrfless = wait_for(&mut page, "window.csrfless ?? null", "no answer");
        // The page's own form sends the token.
        page.eval("(() => { const f = document.querySelector('form.decide'); f.approver.value = 'typed name'; f.querySelector('button.approve').click(); })()");
        let outcome = wait_for(
            &mut page,
            &format!("window.decided?.['{id}/pay'] ?? null"),
            "the approve never answered",
        );
        // Signing out ends the session.
        page.eval("document.querySelector('#signout').click()");
        wait_for(&mut page, "location.pathname === '/login'", "not signed out");
        page.eval("fetch('/api/graphs').then(r => window.after = r.status)");
        let after = wait_for(&mut page, "window.after ?? null", "no answer after signing out");
        (next, error, cookies, script_sees, csrfless, outcome, after)
    })
    .await
    .unwrap();
    let (next, error, cookies, script_sees, csrfless, outcome, after) = seen;
    assert_eq!(next, "/jobs");
    assert!(
        error.as_str().unwrap().contains("not a valid API key"),
        "{error}"
    );
    let cookies = cookies["cookies"].as_array().unwrap();
    let find = |name: &str| {
        cookies
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} cookie: {cookies:?}"))
    };
    let session = find("cascade_session");
    assert_eq!(session["httpOnly"], true, "{session}");
    assert_eq!(session["sameSite"], "Strict", "{session}");
    assert_eq!(find("cascade_csrf")["httpOnly"], false);
    let script_sees = script_sees.as_str().unwrap();
    assert!(
        script_sees.contains("cascade_csrf=") && !script_sees.contains("cascade_session"),
        "{script_sees}"
    );
    assert_eq!(csrfless[0], 403, "{csrfless}");
    assert!(csrfless[1].as_str().unwrap().contains("CSRF"), "{csrfless}");
    assert_eq!(outcome, "approved");
    let v = orch.approval(&format!("{id}/pay")).unwrap();
    assert_eq!(
        v.approval.decision.unwrap().approver,
        "acme-lead",
        "the signed-in identity decides, whatever name is typed"
    );
    assert_eq!(after, 401);
    server.stop().await;
    orch.shutdown(Duration::from_millis(10)).await;
}

/// Each graph's triggers show under it: kind, state (an operator's pause included) and what
/// their events became.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Debian's chromium package: .ci/run installs it and runs this test"]
async fn the_dashboard_shows_each_trigger_with_its_state_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("hook-secret");
    std::fs::write(&secret, "dashboard-hook-secret").unwrap();
    let graph = format!(
        r#"
[graph]
name = "intake"

[[graph.triggers]]
name = "hook"
kind = "webhook"
verify = "cascade"
secret = "file:{}"

[[graph.triggers]]
name = "nightly"
kind = "schedule"
cron = "0 2 * * *"

[agents.triage]
kind = "sim"
"#,
        secret.display()
    );
    let model = config::parse_graph_str("intake.toml", &graph, &Default::default()).unwrap();
    let (orch, server) = common::serve_in_process(model).await;
    orch.triggers()
        .set_paused(orch.store().as_ref(), "intake", "nightly", true)
        .unwrap();
    let key = cascade_orchestrator::secret::Secret::new(b"dashboard-hook-secret".to_vec());
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let resp = reqwest::Client::new()
        .post(format!("http://{}/hooks/intake/hook", server.http_addr))
        .header("x-cascade-timestamp", ts.to_string())
        .header(
            "x-cascade-signature",
            cascade_orchestrator::secret::sign_keyed(&key, ts, None, b"{\"ticket\": 1}"),
        )
        .body("{\"ticket\": 1}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let url = format!("http://{}/", server.http_addr);
    let dom = tokio::task::spawn_blocking(move || chromium(&["--dump-dom"], &url))
        .await
        .unwrap();
    let row = |name: &str| {
        dom.split("<tr class=\"trigger\"")
            .skip(1)
            .find(|r| r.contains(&format!("data-trigger=\"{name}\"")))
            .map(|r| r.split("</tr>").next().unwrap().to_string())
            .unwrap_or_else(|| panic!("no row for trigger {name}:\n{dom}"))
    };
    let hook = row("hook");
    assert!(
        hook.contains("data-state=\"running\"") && hook.contains("webhook"),
        "{hook}"
    );
    // received 1, started 1.
    assert_eq!(
        hook.matches("<td class=\"num\">1</td>").count(),
        2,
        "{hook}"
    );
    let nightly = row("nightly");
    assert!(
        nightly.contains("data-state=\"paused\"") && nightly.contains("schedule"),
        "{nightly}"
    );
    server.stop().await;
    orch.shutdown(Duration::from_secs(1)).await;
}
