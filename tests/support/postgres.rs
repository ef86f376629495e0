//! A PostgreSQL 15 server of the test's own (Debian's `postgresql` package, which `.ci/run`
//! installs): a scratch data directory, a free port on 127.0.0.1, trust authentication, fsync
//! off; stopped when dropped. `initdb` and `postgres` refuse to run as root, so as root they run
//! as the `postgres` user (`runuser`).

#![allow(dead_code)] // each test binary uses part of it

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct Postgres {
    dir: tempfile::TempDir,
    pub port: u16,
    /// The server's options (port, socket directory, durability off), for a restart.
    options: String,
}

fn as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn id(flag: &str) -> u32 {
    let out = Command::new("id")
        .args([flag, "postgres"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Run one of PostgreSQL's programs (as `postgres` when this is root); panics with its output
/// when it fails.
fn run(program: &str, args: &[&str]) {
    let path = Path::new(BIN).join(program);
    assert!(
        path.exists(),
        "{} is missing: install PostgreSQL 15 (apt-get install postgresql; .ci/run does)",
        path.display()
    );
    let mut cmd = if as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&path);
        c
    } else {
        Command::new(&path)
    };
    let out = cmd.args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Postgres {
    pub fn start() -> Self {
        // A short path: the server's socket path must fit in 107 bytes.
        let dir = tempfile::Builder::new()
            .prefix("cascade-pg")
            .tempdir_in("/tmp")
            .unwrap();
        if as_root() {
            std::os::unix::fs::chown(dir.path(), Some(id("-u")), Some(id("-g"))).unwrap();
        }
        let data = dir.path().join("data");
        run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "cascade",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off",
            dir.path().display()
        );
        let pg = Self { dir, port, options };
        pg.start_again();
        pg
    }

    /// Start the server again on its port (after [`Postgres::stop`]).
    pub fn start_again(&self) {
        let data = self.data_dir();
        run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                self.dir.path().join("pg.log").to_str().unwrap(),
                "-w",
                "-t",
                "30",
                "-o",
                &self.options,
                "start",
            ],
        );
    }

    /// Stop the server the way an operator's restart does (`-m fast`: connections are cut,
    /// what was committed stays).
    pub fn stop(&self) {
        let data = self.data_dir();
        run(
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-m", "fast", "-w", "stop"],
        );
    }

    /// A new empty database on this server, and its URL.
    pub async fn database(&self, name: &str) -> String {
        cascade_orchestrator::store::pg_schema::connect(&self.url("postgres"), None)
            .await
            .unwrap()
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        self.url(name)
    }

    /// A URL for database `db` as the superuser `cascade` (no password: trust).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://cascade@127.0.0.1:{}/{db}", self.port)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data_dir();
        let path = Path::new(BIN).join("pg_ctl");
        let mut cmd = if as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let _ = cmd
            .args(["-D", data.to_str().unwrap(), "-m", "immediate", "stop"])
            .output();
    }
}
