//! `kind = "command"`: a local program, the step on its stdin as JSON, its result on stdout as
//! JSON.
//!
//! ```toml
//! [agents.score]
//! kind = "command"
//! program = "python3"
//! args = ["score.py", "--ticket", "{{ input.ticket_id }}"]   # templates
//! env = { MODEL_DIR = "/opt/models", API_TOKEN = "env:SCORER_TOKEN" }  # a value may be a secret reference
//! cwd = "/opt/scorer"
//! max_output_bytes = 10_485_760                               # default 10 MiB
//! ```
//!
//! The program reads `{"input", "deps", "job"}` on stdin and writes one JSON value on stdout: the
//! step's output. It runs in a process group of its own; when the step's `timeout` passes (or the
//! step is cancelled) the whole group is killed, so nothing it started in that group outlives
//! it (a process that leaves the group, with `setsid`, is beyond reach). It gets `PATH`, `HOME`,
//! `LANG`, `LC_ALL`, `TMPDIR`, `TZ` and `USER` from the server's environment, and `env`. A non-zero
//! exit is an error carrying the exit code and the end of stderr: exit 75 (`EX_TEMPFAIL`) is
//! transient and retried, any other code is permanent; death by a signal is transient.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::secret::{SecretCell, TextOrSecret};
use crate::template::JsonTemplate;
use crate::{
    Agent, AgentError, AgentOutput, AgentSpec, CallContext, FieldError, KindSpec, StepInput, Usage,
};

pub const KIND: KindSpec = KindSpec {
    name: "command",
    fields: &[
        "program",
        "args",
        "env",
        "cwd",
        "max_output_bytes",
        "upstream",
    ],
    required: &["program"],
    build,
    upstream: upstream_name,
    credential: crate::registry::no_credential,
    may_be_irreversible: false,
};

const DEFAULT_MAX_OUTPUT: u64 = 10 << 20;
/// How much of stderr an error keeps: its end, where programs say what went wrong.
const STDERR_TAIL: usize = 2048;
/// The server's environment variables a program gets, beside its own `env`.
const INHERITED_ENV: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", "USER"];
/// `EX_TEMPFAIL` from sysexits.h: "try again later".
const EX_TEMPFAIL: i32 = 75;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    program: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, TextOrSecret>,
    #[serde(default)]
    cwd: Option<PathBuf>,
    #[serde(default)]
    max_output_bytes: Option<u64>,
    #[serde(default)]
    #[allow(dead_code)] // read by `upstream_name`
    upstream: Option<String>,
}

/// A local program calls nothing outside the process unless the graph says it does
/// (`upstream = "NAME"`: then it shares that upstream's implicit quota).
fn upstream_name(spec: &AgentSpec<'_>) -> Option<String> {
    match spec.fields.get("upstream") {
        Some(Value::String(name)) => Some(name.clone()),
        _ => None,
    }
}

enum EnvValue {
    Literal(String),
    Secret(Arc<SecretCell>),
}

pub struct CommandAgent {
    program: String,
    args: JsonTemplate,
    env: Vec<(String, EnvValue)>,
    cwd: Option<PathBuf>,
    max_output: u64,
}

fn build(spec: &AgentSpec<'_>) -> Result<Arc<dyn Agent>, FieldError> {
    let c: Config = spec.parse()?;
    if c.program.trim().is_empty() {
        return Err(FieldError::new(
            "program",
            "name the program to run, e.g. \"python3\"",
        ));
    }
    let args = JsonTemplate::compile(
        &Value::Array(c.args.into_iter().map(Value::String).collect()),
        &["args"],
    )?;
    let mut env = Vec::new();
    for (name, value) in c.env {
        let v = match value {
            TextOrSecret::Secret(r) => {
                EnvValue::Secret(Arc::new(SecretCell::load(r).map_err(|e| FieldError {
                    path: vec!["env".into(), name.clone()],
                    message: e,
                })?))
            }
            TextOrSecret::Text(t) => EnvValue::Literal(t),
        };
        env.push((name, v));
    }
    if let Some(dir) = &c.cwd
        && !dir.is_dir()
    {
        return Err(FieldError::new(
            "cwd",
            format!("{} is not a directory", dir.display()),
        ));
    }
    Ok(Arc::new(CommandAgent {
        program: c.program,
        args,
        env,
        cwd: c.cwd,
        max_output: c.max_output_bytes.unwrap_or(DEFAULT_MAX_OUTPUT),
    }))
}

/// Kills a process group when dropped: when the call ends early (its timeout passed, its job was
/// cancelled, its actor stopped), nothing the program started is left running.
struct GroupGuard(Option<i32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            // SAFETY: kill(2) with a negative pid signals the group; no memory is involved.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

impl CommandAgent {
    fn redact(&self, s: &str) -> String {
        let mut out = s.to_string();
        for (_, v) in &self.env {
            if let EnvValue::Secret(cell) = v {
                out = cell.redact(&out);
            }
        }
        out
    }
}

#[async_trait::async_trait]
impl Agent for CommandAgent {
    async fn call(&self, ctx: &CallContext, input: &StepInput) -> Result<AgentOutput, AgentError> {
        let prepared = self.prepare(ctx, input)?;
        self.execute(ctx, &prepared).await
    }

    /// `{"program", "args", "stdin"}`: the argv and the JSON written on stdin; `env` is added
    /// when it runs.
    fn prepare(&self, ctx: &CallContext, input: &StepInput) -> Result<Value, AgentError> {
        let args = self.args.render(ctx, input)?;
        let stdin = serde_json::to_value(input.view(ctx))
            .map_err(|e| AgentError::permanent(format!("the step input is not JSON: {e}")))?;
        Ok(serde_json::json!({"program": self.program, "args": args, "stdin": stdin}))
    }

    async fn execute(
        &self,
        ctx: &CallContext,
        prepared: &Value,
    ) -> Result<AgentOutput, AgentError> {
        if prepared["program"].as_str() != Some(self.program.as_str()) {
            return Err(AgentError::permanent(format!(
                "the prepared call runs {} and this agent now runs {:?}: its configuration changed since the call was prepared",
                prepared["program"], self.program
            )));
        }
        let args = &prepared["args"];
        let stdin_json = serde_json::to_vec(&prepared["stdin"])
            .map_err(|e| AgentError::permanent(format!("the step input is not JSON: {e}")))?;
        let mut cmd = tokio::process::Command::new(&self.program);
        // The program sees what its agent gives it, not the server's environment (which holds
        // other agents' credentials): a few variables programs need to run, and `env`.
        cmd.env_clear();
        for name in INHERITED_ENV {
            if let Some(v) = std::env::var_os(name) {
                cmd.env(name, v);
            }
        }
        for a in args.as_array().into_iter().flatten() {
            cmd.arg(a.as_str().unwrap_or_default());
        }
        for (name, v) in &self.env {
            match v {
                EnvValue::Literal(s) => cmd.env(name, s),
                EnvValue::Secret(cell) => cmd.env(name, cell.current().await?),
            };
        }
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        cmd.env("CASCADE_IDEMPOTENCY_KEY", &*ctx.idempotency_key)
            .env("CASCADE_ATTEMPT", ctx.attempt.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| AgentError::permanent(format!("cannot start {:?}: {e}", self.program)))?;
        let pgid = child.id().map(|p| p as i32);
        let _group = GroupGuard(pgid);
        let mut stdin = child.stdin.take().expect("piped");
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let write = async move {
            // A program that does not read its input closes the pipe: that is its business.
            let _ = stdin.write_all(&stdin_json).await;
            drop(stdin);
        };
        let max = self.max_output;
        let read_out = async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 16 * 1024];
            loop {
                let n = stdout.read(&mut chunk).await.map_err(|e| {
                    AgentError::transient(format!("reading the program's stdout failed: {e}"))
                })?;
                if n == 0 {
                    return Ok(buf);
                }
                if buf.len() as u64 + n as u64 > max {
                    return Err(AgentError::permanent(format!(
                        "the program wrote more than max_output_bytes ({max}) on stdout"
                    )));
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        };
        let read_err = async move {
            // Only the end is kept: a chatty program's stderr holds no memory.
            let mut tail: Vec<u8> = Vec::new();
            let mut chunk = [0u8; 8 * 1024];
            while let Ok(n) = stderr.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                tail.extend_from_slice(&chunk[..n]);
                if tail.len() > 2 * STDERR_TAIL {
                    tail.drain(..tail.len() - STDERR_TAIL);
                }
            }
            tail
        };
        let io = async { tokio::join!(write, read_out, read_err) };
        tokio::pin!(io);
        let mut exited = None;
        let ((), out, err_tail) = tokio::select! {
            r = &mut io => r,
            s = child.wait() => {
                exited = Some(s);
                // The program is done, but something it left running may hold its pipes open:
                // a moment to finish writing, then the group goes and the pipes close.
                match tokio::time::timeout(std::time::Duration::from_secs(1), &mut io).await {
                    Ok(r) => r,
                    Err(_) => {
                        if let Some(pgid) = pgid {
                            // SAFETY: kill(2) on the group; no memory is involved.
                            unsafe {
                                libc::kill(-pgid, libc::SIGKILL);
                            }
                        }
                        io.await
                    }
                }
            }
        };
        // Too much output: stop here (the guard kills the group).
        let out = out?;
        let status = match exited {
            Some(s) => s,
            None => child.wait().await,
        }
        .map_err(|e| AgentError::transient(format!("waiting for the program failed: {e}")))?;
        let tail = {
            // Redacted whole, then cut: a secret across the cut must not leave a part of it.
            let t = self.redact(String::from_utf8_lossy(&err_tail).trim());
            let start = t.len().saturating_sub(STDERR_TAIL);
            let start = (start..=t.len())
                .find(|&i| t.is_char_boundary(i))
                .unwrap_or(t.len());
            t[start..].to_string()
        };
        if !status.success() {
            let said = if tail.is_empty() {
                String::new()
            } else {
                format!("; stderr: {tail}")
            };
            return Err(match status.code() {
                Some(EX_TEMPFAIL) => AgentError::transient(format!(
                    "{} exited with {EX_TEMPFAIL} (EX_TEMPFAIL: try again){said}",
                    self.program
                )),
                Some(code) => {
                    AgentError::permanent(format!("{} exited with {code}{said}", self.program))
                }
                None => {
                    use std::os::unix::process::ExitStatusExt;
                    AgentError::transient(format!(
                        "{} was killed by signal {}{said}",
                        self.program,
                        status.signal().unwrap_or(0)
                    ))
                }
            });
        }
        let value: Value = serde_json::from_slice(&out).map_err(|e| {
            AgentError::permanent(format!(
                "{} did not write JSON on stdout ({e}); print one JSON value, e.g. {{\"ok\": true}}",
                self.program
            ))
        })?;
        Ok(AgentOutput {
            value,
            usage: Usage::default(),
            limits: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorClass;
    use serde_json::json;
    use std::time::Duration;

    fn agent(fields: Value) -> Result<Arc<dyn Agent>, FieldError> {
        let Value::Object(map) = fields else {
            unreachable!()
        };
        build(&AgentSpec {
            graph: "g",
            name: "cmd",
            fields: &map,
            resources: &Default::default(),
        })
    }

    fn ctx() -> CallContext {
        CallContext {
            job_id: "job-1".into(),
            graph: "g".into(),
            agent: "cmd".into(),
            attempt: 1,
            idempotency_key: "job-1/cmd".into(),
            deadline: None,
            job_key: None,
        }
    }

    fn step(input: Value) -> StepInput {
        StepInput {
            input: Arc::new(input),
            deps: vec![("before".into(), Arc::new(json!({"label": "bug"})))],
        }
    }

    #[tokio::test]
    async fn a_prepared_call_runs_as_prepared_whatever_the_input_is_now() {
        let a = agent(json!({"program": "sh", "args": ["-c", "echo \"{\\\"arg\\\": \\\"$0\\\"}\"", "{{ input.who }}"]})).unwrap();
        let prepared = a.prepare(&ctx(), &step(json!({"who": "alice"}))).unwrap();
        assert_eq!(prepared["program"], "sh");
        assert_eq!(prepared["args"][2], "alice");
        assert_eq!(prepared["stdin"]["input"], json!({"who": "alice"}));
        // Executed later, it runs the argv it was approved with.
        let out = a.execute(&ctx(), &prepared).await.unwrap();
        assert_eq!(out.value, json!({"arg": "alice"}));
        // A proposal for another program is refused, not run.
        let mut other = prepared.clone();
        other["program"] = json!("rm");
        let e = a.execute(&ctx(), &other).await.unwrap_err();
        assert!(e.message.contains("configuration changed"), "{e}");
    }

    #[tokio::test]
    async fn the_program_runs_in_cwd_with_an_exec_table_secret_in_its_env() {
        let dir = tempfile::tempdir().unwrap();
        let a = agent(json!({
            "program": "sh",
            "args": ["-c", "printf '{\"dir\": \"%s\", \"token\": \"%s\"}' \"$(pwd)\" \"$TOKEN\""],
            "cwd": dir.path(),
            "env": { "TOKEN": { "exec": "printf from-a-vault", "ttl": "1m" } }
        }))
        .unwrap();
        let out = a.call(&ctx(), &step(json!({}))).await.unwrap();
        let real = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(out.value["dir"], json!(real.display().to_string()));
        assert_eq!(out.value["token"], json!("from-a-vault"));
        let missing = agent(json!({"program": "true", "cwd": dir.path().join("nope")}));
        assert_eq!(missing.err().unwrap().path, vec!["cwd".to_string()]);
    }

    #[tokio::test]
    async fn the_step_goes_in_on_stdin_and_the_output_comes_out_on_stdout() {
        let a = agent(json!({"program": "sh", "args": ["-c", "cat"]})).unwrap();
        let out = a.call(&ctx(), &step(json!({"n": 1}))).await.unwrap();
        assert_eq!(
            out.value,
            json!({"input": {"n": 1}, "deps": {"before": {"label": "bug"}}, "job": {"id": "job-1", "graph": "g", "attempt": 1}})
        );
        let a = agent(json!({
            "program": "sh",
            "args": ["-c", "printf '{\"n\": %s, \"key\": \"%s\", \"mode\": \"%s\"}' \"$1\" \"$CASCADE_IDEMPOTENCY_KEY\" \"$MODE\"", "sh", "{{ input.n }}"],
            "env": {"MODE": "fast"}
        }))
        .unwrap();
        let out = a.call(&ctx(), &step(json!({"n": 41}))).await.unwrap();
        assert_eq!(
            out.value,
            json!({"n": 41, "key": "job-1/cmd", "mode": "fast"})
        );
    }

    #[tokio::test]
    async fn exit_codes_are_classified_with_the_end_of_stderr() {
        let a = agent(
            json!({"program": "sh", "args": ["-c", "echo 'database is locked' >&2; exit 75"]}),
        )
        .unwrap();
        let e = a.call(&ctx(), &step(json!({}))).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Transient);
        assert!(
            e.message.contains("75") && e.message.contains("database is locked"),
            "{}",
            e.message
        );
        let a = agent(json!({"program": "sh", "args": ["-c", "i=0; while [ $i -lt 2000 ]; do echo line $i >&2; i=$((i+1)); done; exit 3"]})).unwrap();
        let e = a.call(&ctx(), &step(json!({}))).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Permanent);
        assert!(
            e.message.contains("exited with 3") && e.message.contains("line 1999"),
            "{}",
            e.message
        );
        assert!(
            !e.message.contains("line 10\n") && e.message.len() < 2200,
            "only the end: {}",
            e.message.len()
        );
        let a = agent(json!({"program": "sh", "args": ["-c", "echo not json"]})).unwrap();
        let e = a.call(&ctx(), &step(json!({}))).await.unwrap_err();
        assert!(e.message.contains("did not write JSON"), "{}", e.message);
        let a = agent(json!({"program": "/nonexistent/program"})).unwrap();
        let e = a.call(&ctx(), &step(json!({}))).await.unwrap_err();
        assert!(e.message.contains("cannot start"), "{}", e.message);
        let a = agent(json!({"program": "sh", "args": ["-c", "head -c 5000 /dev/zero"], "max_output_bytes": 1000})).unwrap();
        let e = a.call(&ctx(), &step(json!({}))).await.unwrap_err();
        assert!(e.message.contains("max_output_bytes"), "{}", e.message);
    }

    #[tokio::test]
    async fn a_secret_goes_into_the_environment_and_not_into_errors() {
        // SAFETY: this variable is read by this test only.
        unsafe { std::env::set_var("CASCADE_TEST_CMD_SECRET", "cmd-secret-4711") };
        let a = agent(json!({
            "program": "sh",
            "args": ["-c", "echo \"token was $TOKEN\" >&2; exit 2"],
            "env": {"TOKEN": "env:CASCADE_TEST_CMD_SECRET"}
        }))
        .unwrap();
        let e = a.call(&ctx(), &step(json!({}))).await.unwrap_err();
        assert!(e.message.contains("token was [redacted]"), "{}", e.message);
        let e =
            agent(json!({"program": "sh", "env": {"TOKEN": "env:CASCADE_TEST_SURELY_UNSET_CMD"}}))
                .err()
                .unwrap();
        assert_eq!(e.path, ["env", "TOKEN"]);
    }

    /// A program that exits leaving a background process on its pipes ends its step at once,
    /// not when the background process ends.
    #[tokio::test]
    async fn a_background_process_holding_the_pipes_does_not_hold_the_step() {
        let a = agent(json!({"program": "sh", "args": ["-c", "sleep 30 & echo '{\"ok\": true}'"]}))
            .unwrap();
        let started = std::time::Instant::now();
        let out = tokio::time::timeout(Duration::from_secs(10), a.call(&ctx(), &step(json!({}))))
            .await
            .expect("the step ended")
            .unwrap();
        assert_eq!(out.value, json!({"ok": true}));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    /// The timeout drops the call: the program and what it started in the background die with it.
    #[tokio::test]
    async fn a_call_cut_short_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let a = agent(json!({
            "program": "sh",
            "args": ["-c", format!("sleep 60 & echo $! > {}; sleep 60", pidfile.display())]
        }))
        .unwrap();
        let cut =
            tokio::time::timeout(Duration::from_millis(500), a.call(&ctx(), &step(json!({}))))
                .await;
        assert!(cut.is_err(), "the call was cut short");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The background sleep is gone (or a zombie about to be reaped by init).
        let mut gone = false;
        for _ in 0..100 {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if state.is_empty() || state.contains(") Z ") {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone, "process {pid} outlived its call");
    }
}
