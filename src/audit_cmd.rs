//! `cascade audit`: keys for the audit log's signed checkpoints, and verification of a server's
//! audit log from its store (its SQLite file, or a cluster's PostgreSQL database; the server may
//! be stopped).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use cascade_orchestrator::audit::{checkpoint::Signer, log};
use cascade_orchestrator::secret::SecretRef;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Make a new checkpoint signing key named NAME (the log's origin, e.g. cascade.example.com/audit):
    /// prints the private key (keep it as a secret, e.g. in a file named by `file:PATH`) and the
    /// verification key (publish it).
    NewKey { name: String },
    /// Print the verification key of a signing key given as a secret reference.
    PublicKey {
        /// The signing key: `env:NAME` or `file:PATH`. (Not `--key`: that is the TLS client
        /// key of every command.)
        #[arg(long)]
        signing_key: String,
    },
    /// Print the latest signed checkpoint (keep it outside the server, for `verify --checkpoint`).
    Checkpoint {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// An inclusion proof of record SEQ in the latest signed checkpoint, as JSON.
    Prove {
        seq: u64,
        #[command(flatten)]
        store: StoreArgs,
        /// A file holding the verification key (default: the key of cascade.toml's
        /// [audit] signing_key).
        #[arg(long)]
        public_key: Option<PathBuf>,
    },
    /// Every record as JSON lines: sequence number, the record's exact text (its leaf hash is
    /// SHA-256 of 0x00 and those bytes), leaf hash. With --tenant: that tenant's records in the
    /// latest signed checkpoint, each with its inclusion proof, as one JSON document (others'
    /// records appear only as hashes in the proofs).
    Export {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        tenant: Option<String>,
        /// A file holding the verification key (with --tenant).
        #[arg(long)]
        public_key: Option<PathBuf>,
    },
    /// Check a server's audit log: every record against its hash, every checkpoint's signature
    /// and root, and (with --checkpoint) that the log extends a checkpoint saved earlier.
    Verify {
        #[command(flatten)]
        store: StoreArgs,
        /// A file holding the verification key (`cascade audit public-key`); without it, the
        /// key of cascade.toml's [audit] signing_key.
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// A signed checkpoint kept outside the server earlier.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
    },
}

pub fn run(command: AuditCommand) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::NewKey { name } => {
            let key = Signer::generate(&name).map_err(anyhow::Error::msg)?;
            let signer = Signer::from_key(&key).map_err(anyhow::Error::msg)?;
            println!("signing key (secret): {key}");
            println!("verification key:     {}", signer.verifier_key());
        }
        AuditCommand::PublicKey { signing_key } => {
            let reference: SecretRef = signing_key.parse().map_err(anyhow::Error::msg)?;
            let secret = reference.resolve().map_err(anyhow::Error::msg)?;
            let text = secret.expose_str().context("the signing key is not text")?;
            let signer = Signer::from_key(text).map_err(anyhow::Error::msg)?;
            println!("{}", signer.verifier_key());
        }
        AuditCommand::Checkpoint { store } => {
            match log::latest_checkpoint(&store.source()?).map_err(anyhow::Error::msg)? {
                Some(note) => print!("{note}"),
                None => bail!("no signed checkpoint yet (is [audit] signing_key set?)"),
            }
        }
        AuditCommand::Prove {
            seq,
            store,
            public_key,
        } => {
            let key = store.verifier_key(public_key.as_deref())?;
            let proof = log::prove(&store.source()?, seq, &key).map_err(anyhow::Error::msg)?;
            println!("{}", serde_json::to_string_pretty(&proof.to_json())?);
        }
        AuditCommand::Export {
            store,
            tenant: Some(tenant),
            public_key,
        } => {
            let key = store.verifier_key(public_key.as_deref())?;
            let export =
                log::export_tenant(&store.source()?, &tenant, &key).map_err(anyhow::Error::msg)?;
            println!("{}", serde_json::to_string_pretty(&export)?);
        }
        AuditCommand::Export { store, .. } => {
            use std::io::Write;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for (seq, record, leaf) in log::records(&store.source()?).map_err(anyhow::Error::msg)? {
                let leaf = cascade_orchestrator::audit::hex(&leaf);
                // The record's exact text: its leaf hash is over these bytes.
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"seq": seq, "record": record, "leaf_hash": leaf})
                )?;
            }
        }
        AuditCommand::Verify {
            store,
            public_key,
            checkpoint,
        } => {
            let db = store.source()?;
            let key = store.verifier_key(public_key.as_deref())?;
            let saved = checkpoint
                .map(|p| {
                    std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
                })
                .transpose()?;
            match log::verify(&db, &key, saved.as_deref()) {
                Ok(v) => {
                    print!(
                        "ok: {} records, {} signed checkpoints",
                        v.records, v.checkpoints
                    );
                    match v.extends {
                        Some(n) => println!(
                            ", an append-only extension of the saved checkpoint (size {n})"
                        ),
                        None => println!(),
                    }
                }
                Err(e) => {
                    eprintln!("audit log does not verify: {e}");
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Where a server's store is: the same flags as `serve`.
#[derive(clap::Args)]
pub struct StoreArgs {
    /// The server config; its [server] store (or data_dir), store_password and [audit]
    /// signing_key are used.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The server's data directory (default: the config's, else ./cascade-data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A cluster's PostgreSQL store, `postgres://user@host:port/database` (default: the
    /// config's [server] store).
    #[arg(long, conflicts_with = "data_dir")]
    store: Option<String>,
    /// The PostgreSQL password as a secret reference (`env:NAME`, `file:PATH`; default: the
    /// config's [server] store_password).
    #[arg(long, requires = "store")]
    store_password: Option<String>,
}

impl StoreArgs {
    fn model(&self) -> anyhow::Result<Option<cascade_orchestrator::model::ServerModel>> {
        let Some(path) = &self.config else {
            return Ok(None);
        };
        cascade_orchestrator::config::load(
            Some(path),
            &[],
            &cascade_orchestrator::agents::Registry::default(),
        )
        .map(Some)
        .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Where the audit log is: the cluster's PostgreSQL store, or the server's SQLite file.
    fn source(&self) -> anyhow::Result<log::Source> {
        use cascade_orchestrator::audit::pg::{PgAudit, PgAuditOptions};
        use cascade_orchestrator::model::StoreSetting;
        let model = self.model()?;
        let postgres = match (&self.store, &self.data_dir, &model) {
            (Some(text), _, _) => match StoreSetting::parse(text) {
                // Refuses a password in the URL: it would show in the process list and errors.
                Ok(StoreSetting::Postgres(url)) => Some((url, self.store_password.clone())),
                Ok(_) => bail!("--store takes a postgres:// URL (for SQLite, pass --data-dir)"),
                Err(why) => bail!("--store: {why}"),
            },
            (None, None, Some(m)) => match &m.server.store {
                StoreSetting::Postgres(url) => Some((url.clone(), None)),
                _ => None,
            },
            _ => None,
        };
        let Some((url, password)) = postgres else {
            return Ok(log::Source::Sqlite(self.db(model)?));
        };
        let password = match password {
            Some(r) => Some(r.parse::<SecretRef>().map_err(anyhow::Error::msg)?),
            None => model.and_then(|m| m.server.store_password),
        }
        .map(|r| r.resolve())
        .transpose()
        .map_err(|e| anyhow::anyhow!("the store's password: {e}"))?;
        let pg = PgAudit::open(PgAuditOptions {
            url: url.clone(),
            password,
            node_id: format!("cascade-audit@{}", cascade_orchestrator::store::host_name()),
        })
        .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
        Ok(log::Source::Postgres(std::sync::Arc::new(pg)))
    }

    /// The store file.
    fn db(
        &self,
        model: Option<cascade_orchestrator::model::ServerModel>,
    ) -> anyhow::Result<PathBuf> {
        let dir = match &self.data_dir {
            Some(d) => d.clone(),
            None => model
                .and_then(|m| m.server.data_dir.clone())
                .unwrap_or_else(|| PathBuf::from("cascade-data")),
        };
        let db = dir.join("cascade.db");
        if !db.exists() {
            bail!(
                "no store at {}: pass the --data-dir (or --config) the server runs with",
                db.display()
            );
        }
        Ok(db)
    }

    /// The verification key: from `file`, else from the config's signing key.
    fn verifier_key(&self, file: Option<&std::path::Path>) -> anyhow::Result<String> {
        if let Some(f) = file {
            return Ok(std::fs::read_to_string(f)
                .with_context(|| format!("reading {}", f.display()))?
                .trim()
                .to_string());
        }
        let reference = self
            .model()?
            .and_then(|m| m.audit.signing_key)
            .context("pass --public-key FILE, or --config with an [audit] signing_key")?;
        let secret = reference.resolve().map_err(anyhow::Error::msg)?;
        let text = secret.expose_str().context("the signing key is not text")?;
        Ok(Signer::from_key(text)
            .map_err(anyhow::Error::msg)?
            .verifier_key())
    }
}
