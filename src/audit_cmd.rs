//! `cascade audit`: keys for the audit log's signed checkpoints, and verification of a server's
//! audit log from its files (the server may be stopped).

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
        /// The signing key: `env:NAME` or `file:PATH`.
        #[arg(long)]
        key: String,
    },
    /// Print the latest signed checkpoint (keep it outside the server, for `verify --checkpoint`).
    Checkpoint {
        #[arg(long, default_value = "cascade-data")]
        data_dir: PathBuf,
    },
    /// An inclusion proof of record SEQ in the latest signed checkpoint, as JSON.
    Prove {
        seq: u64,
        #[arg(long, default_value = "cascade-data")]
        data_dir: PathBuf,
        /// A file holding the verification key.
        #[arg(long)]
        public_key: PathBuf,
    },
    /// Every record as JSON lines: sequence number, the record's exact text (its leaf hash is
    /// SHA-256 of 0x00 and those bytes), leaf hash.
    Export {
        #[arg(long, default_value = "cascade-data")]
        data_dir: PathBuf,
    },
    /// Check a server's audit log: every record against its hash, every checkpoint's signature
    /// and root, and (with --checkpoint) that the log extends a checkpoint saved earlier.
    Verify {
        /// The server's data directory (the store's cascade.db), as given to `serve`.
        #[arg(long, default_value = "cascade-data")]
        data_dir: PathBuf,
        /// A file holding the verification key (`cascade audit public-key`).
        #[arg(long)]
        public_key: PathBuf,
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
        AuditCommand::PublicKey { key } => {
            let reference: SecretRef = key.parse().map_err(anyhow::Error::msg)?;
            let secret = reference.resolve().map_err(anyhow::Error::msg)?;
            let text = secret.expose_str().context("the signing key is not text")?;
            let signer = Signer::from_key(text).map_err(anyhow::Error::msg)?;
            println!("{}", signer.verifier_key());
        }
        AuditCommand::Checkpoint { data_dir } => {
            match log::latest_checkpoint(&store(&data_dir)?).map_err(anyhow::Error::msg)? {
                Some(note) => print!("{note}"),
                None => bail!("no signed checkpoint yet (is [audit] signing_key set?)"),
            }
        }
        AuditCommand::Prove {
            seq,
            data_dir,
            public_key,
        } => {
            let key = std::fs::read_to_string(&public_key)
                .with_context(|| format!("reading {}", public_key.display()))?;
            let proof =
                log::prove(&store(&data_dir)?, seq, key.trim()).map_err(anyhow::Error::msg)?;
            println!("{}", serde_json::to_string_pretty(&proof)?);
        }
        AuditCommand::Export { data_dir } => {
            use std::io::Write;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for (seq, record, leaf) in
                log::records(&store(&data_dir)?).map_err(anyhow::Error::msg)?
            {
                let leaf: String = leaf.iter().map(|b| format!("{b:02x}")).collect();
                // The record's exact text: its leaf hash is over these bytes.
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"seq": seq, "record": record, "leaf_hash": leaf})
                )?;
            }
        }
        AuditCommand::Verify {
            data_dir,
            public_key,
            checkpoint,
        } => {
            let db = store(&data_dir)?;
            let key = std::fs::read_to_string(&public_key)
                .with_context(|| format!("reading {}", public_key.display()))?;
            let saved = checkpoint
                .map(|p| {
                    std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
                })
                .transpose()?;
            match log::verify(&db, key.trim(), saved.as_deref()) {
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

/// The store file of a data directory.
fn store(data_dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    let db = data_dir.join("cascade.db");
    if !db.exists() {
        bail!(
            "no store at {}: pass the --data-dir the server runs with",
            db.display()
        );
    }
    Ok(db)
}
