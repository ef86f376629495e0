//! `cascade keys create`: a new API key, printed once, with the `[[auth.api_keys]]` table that
//! declares it by its hash (the key itself is never written down by Cascade).

use std::process::ExitCode;

use cascade_orchestrator::auth::{self, ApiKeyConfig, Role};
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Make a new API key: it is printed once, with the table to append to cascade.toml.
    Create(CreateArgs),
}

#[derive(Args)]
pub struct CreateArgs {
    /// The tenant the key acts in.
    #[arg(long)]
    pub tenant: String,
    /// Its roles, comma-separated: submit, read, approve, admin.
    #[arg(long, value_delimiter = ',', required = true)]
    pub roles: Vec<Role>,
    /// Who holds it (default: the tenant and the roles).
    #[arg(long)]
    pub name: Option<String>,
    /// When it stops working, RFC 3339 (e.g. 2027-06-30T00:00:00Z).
    #[arg(long)]
    pub expires: Option<String>,
    /// Store it as an Argon2id hash instead of SHA-256 (slower to check; for keys people type).
    #[arg(long)]
    pub argon2: bool,
}

pub fn run(command: KeysCommand) -> anyhow::Result<ExitCode> {
    match command {
        KeysCommand::Create(a) => create(a),
    }
}

fn create(a: CreateArgs) -> anyhow::Result<ExitCode> {
    let key = auth::generate_key();
    let hash = if a.argon2 {
        auth::argon2id_hash(&key).map_err(|e| anyhow::anyhow!("cannot hash the key: {e}"))?
    } else {
        auth::sha256_hash(&key)
    };
    let mut roles = a.roles.clone();
    roles.dedup();
    let config = ApiKeyConfig {
        name: a.name.clone().unwrap_or_else(|| {
            format!(
                "{}-{}",
                a.tenant,
                roles
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join("-")
            )
        }),
        tenant: a.tenant,
        roles,
        hash,
        expires: a.expires,
    };
    // Refuse what the server would refuse (an empty tenant, a bad expiry), before printing.
    auth::Authenticator::new(&auth::AuthSettings {
        api_keys: vec![config.clone()],
        ..Default::default()
    })
    .map_err(|e| anyhow::anyhow!(e))?;
    // A JSON string is a TOML basic string (the same escapes).
    let q = |s: &str| serde_json::to_string(s).expect("a string");
    let mut table = format!(
        "name = {}\ntenant = {}\nroles = [{}]\nhash = {}\n",
        q(&config.name),
        q(&config.tenant),
        config
            .roles
            .iter()
            .map(|r| q(r.as_str()))
            .collect::<Vec<_>>()
            .join(", "),
        q(&config.hash)
    );
    if let Some(e) = &config.expires {
        table += &format!("expires = {}\n", q(e));
    }
    println!("API key (shown once; keep it secret, e.g. in a secret manager):\n\n  {key}\n");
    println!("Append to cascade.toml:\n\n[[auth.api_keys]]\n{table}");
    println!(
        "Callers send it as `authorization: Bearer <key>` (the CLI: --token or CASCADE_TOKEN)."
    );
    Ok(ExitCode::SUCCESS)
}
