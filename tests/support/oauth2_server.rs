//! oauth2-mock-server (npm, installed by `.ci/run`: `npm ci --prefix tests/js`), started for a
//! test through the wrapper in tests/js, and what a resource server checks of its tokens.
// Each test binary that includes this module uses only some of it.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

/// oauth2-mock-server (npm) through the wrapper in tests/js, issuing tokens that live `ttl`
/// seconds; the token requests it served, as the wrapper logs them.
pub struct AuthServer {
    child: std::process::Child,
    pub events: Arc<Mutex<Vec<Value>>>,
}

impl AuthServer {
    /// Add a signing key at the provider (a key rotation).
    pub fn rotate(&mut self) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().expect("stdin is piped");
        stdin.write_all(b"rotate\n").unwrap();
        stdin.flush().unwrap();
    }
}

impl Drop for AuthServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn auth_server(port: u16, ttl: u32) -> AuthServer {
    use std::io::BufRead;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    assert!(
        root.join("node_modules/oauth2-mock-server").exists(),
        "oauth2-mock-server is not installed: run `npm ci --prefix tests/js` (.ci/run does)"
    );
    let mut child = std::process::Command::new("node")
        .arg(root.join("oauth2-server.js"))
        .args([port.to_string(), ttl.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("node runs");
    let events: Arc<Mutex<Vec<Value>>> = Arc::default();
    // One "ready" message, once.
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    let sink = events.clone();
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v["event"] == "ready" {
                let _ = ready_tx.try_send(());
            } else {
                sink.lock().unwrap().push(v);
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("oauth2-mock-server is ready");
    AuthServer { child, events }
}

/// The JWT's `exp`, from its payload (the resource server below checks it as a real one would).
pub fn jwt_exp(token: &str) -> Option<u64> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice::<Value>(&bytes).ok()?["exp"].as_u64()
}
