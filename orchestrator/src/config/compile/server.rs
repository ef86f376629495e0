//! The server file, `cascade.toml`: its `[server]` and `[telemetry]` sections and the graph files
//! it lists.

use super::*;

const SERVER_FILE_SECTIONS: &[&str] = &[
    "graphs",
    "server",
    "quotas",
    "credentials",
    "telemetry",
    "prices",
    "audit",
    "mcp_servers",
    "auth",
    "tenants",
];
const AUTH_FIELDS: &[&str] = &[
    "api_keys",
    "oidc",
    "allow_unauthenticated",
    "approval_separation",
    "metrics_public",
    "client_certs",
];
const AUDIT_FIELDS: &[&str] = &["signing_key", "checkpoint_every"];
const SERVER_FIELDS: &[&str] = &[
    "grpc_addr",
    "http_addr",
    "data_dir",
    "store",
    "store_password",
    "lease",
    "quota_backend",
    "quota_backend_password",
    "quota_fallback",
    "cascade",
    "webhook_secret",
    "callback_secret",
    "max_input_bytes",
    "retention",
    "shutdown_grace",
    "max_events_per_job",
    "store_queue_capacity",
    "callback_timeout",
    "callback_concurrency_per_host",
    "mcp_allowed_hosts",
    "tls",
    "limits",
];
const TELEMETRY_FIELDS: &[&str] = &[
    "otlp_endpoint",
    "service_name",
    "sample_ratio",
    "filter",
    "headers",
    "timeout",
];

impl Loader<'_> {
    /// `cascade.toml`: server settings, shared quotas and the list of graph files.
    pub(super) fn server_file(&mut self, src: &Source) -> Vec<PathBuf> {
        let Some(doc) = self.parse(src) else {
            return Vec::new();
        };
        let mut r = TableReader::new(src, "", 0..0, doc.get_ref());
        let base = src.path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut files = Vec::new();
        if let Some(list) = r.take::<Vec<String>>("graphs", &mut self.errs) {
            for entry in list {
                let p = base.join(&entry);
                if p.is_dir() {
                    match std::fs::read_dir(&p) {
                        Ok(rd) => {
                            let mut found: Vec<PathBuf> = rd
                                .filter_map(|e| e.ok().map(|e| e.path()))
                                .filter(|f| {
                                    f.extension().is_some_and(|x| x == "toml") && f != &src.path
                                })
                                .collect();
                            found.sort();
                            files.extend(found);
                        }
                        Err(e) => self
                            .errs
                            .push(ConfigError::file(&p, format!("cannot list directory: {e}"))),
                    }
                } else {
                    files.push(p);
                }
            }
        }
        if let Some((k, v)) = r.entry("server") {
            r.skip("server");
            if let Some(t) = self.expect_table(src, "server", k.span(), v) {
                let mut s = TableReader::new(src, "server", k.span(), t);
                self.server.grpc_addr = s.take("grpc_addr", &mut self.errs);
                self.server.http_addr = s.take("http_addr", &mut self.errs);
                self.server.data_dir = s.take("data_dir", &mut self.errs);
                let store_at = s.entry("store").map(|(_, v)| v.span());
                if let (Some(text), Some(at)) =
                    (s.take::<String>("store", &mut self.errs), store_at)
                {
                    match StoreSetting::parse(&text) {
                        Ok(store) => self.server.store = store,
                        Err(why) => self.errs.push(src.error(at, "server.store", why).with_help(
                            "store = \"sqlite\" (the default: a file in data_dir), \"memory\", or \"postgres://USER@HOST:PORT/DATABASE\" with store_password = \"env:PGPASSWORD\"",
                        )),
                    }
                }
                let lease_at = s.entry("lease").map(|(_, v)| v.span());
                self.server.lease = s
                    .take::<HumanDuration>("lease", &mut self.errs)
                    .map(HumanDuration::get);
                if let (Some(lease), Some(at)) = (self.server.lease, lease_at)
                    && !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&lease)
                {
                    self.errs.push(
                        src.error(at, "server.lease", format!("a lease of {} is out of range", humantime::format_duration(lease)))
                            .with_help("lease = \"10s\" (from 1s to 10m): how long a silent node's jobs wait before another node takes them over"),
                    );
                }
                let password_at = s.entry("store_password").map(|(_, v)| v.span());
                self.server.store_password = s.take("store_password", &mut self.errs);
                if let Some(at) = password_at
                    && !matches!(self.server.store, StoreSetting::Postgres(_))
                {
                    self.errs.push(
                        src.error(at, "server.store_password", "store_password is for a PostgreSQL store, and store is not one")
                            .with_help("set store = \"postgres://USER@HOST:PORT/DATABASE\", or remove store_password"),
                    );
                }
                self.quota_backend(src, &mut s);
                if let Some(on) = s.take("cascade", &mut self.errs) {
                    self.server.cascade = on;
                }
                self.server.webhook_secret = s.take("webhook_secret", &mut self.errs);
                self.server.callback_secret = s.take("callback_secret", &mut self.errs);
                self.server.max_input_bytes = s.take("max_input_bytes", &mut self.errs);
                self.server.retention = s
                    .take::<HumanDuration>("retention", &mut self.errs)
                    .map(HumanDuration::get);
                self.server.shutdown_grace = s
                    .take::<HumanDuration>("shutdown_grace", &mut self.errs)
                    .map(HumanDuration::get);
                self.server.max_events_per_job = s
                    .take::<std::num::NonZeroUsize>("max_events_per_job", &mut self.errs)
                    .map(std::num::NonZeroUsize::get);
                self.server.store_queue_capacity = s
                    .take::<std::num::NonZeroUsize>("store_queue_capacity", &mut self.errs)
                    .map(std::num::NonZeroUsize::get);
                self.server.callback_timeout = s
                    .take::<HumanDuration>("callback_timeout", &mut self.errs)
                    .map(HumanDuration::get);
                self.server.callback_concurrency_per_host = s
                    .take::<std::num::NonZeroUsize>("callback_concurrency_per_host", &mut self.errs)
                    .map(std::num::NonZeroUsize::get);
                self.server.mcp_allowed_hosts = s
                    .take::<Vec<String>>("mcp_allowed_hosts", &mut self.errs)
                    .unwrap_or_default();
                let tls_at = s.entry("tls").map(|(_, v)| v.span());
                self.server.tls = s.take("tls", &mut self.errs);
                if let (Some(t), Some(at)) = (&self.server.tls, tls_at)
                    && let Err(e) = crate::tls::build(&resolve_tls_paths(t, &base))
                {
                    self.errs.push(src.error(at, "server.tls", e).with_help(
                        "[server.tls] cert = \"tls.crt\", key = \"tls.key\" (PEM files; relative paths are read from cascade.toml's directory)",
                    ));
                }
                if let Some(t) = &mut self.server.tls {
                    *t = resolve_tls_paths(t, &base);
                }
                let limits_at = s.entry("limits").map(|(_, v)| v.span());
                if let Some(l) = s.take::<crate::limits::ServerLimits>("limits", &mut self.errs) {
                    if let (Err((field, why)), Some(at)) = (l.check(), limits_at) {
                        self.errs.push(
                            src.error(at, format!("server.limits.{field}"), why)
                                .with_help("leave the field out for its default, which a normal client never meets"),
                        );
                    }
                    self.server.limits = l;
                }
                s.deny_unknown(SERVER_FIELDS, "[server]", &mut self.errs);
            }
        }
        if let Some((k, v)) = r.entry("telemetry") {
            r.skip("telemetry");
            if let Some(t) = self.expect_table(src, "telemetry", k.span(), v) {
                let mut s = TableReader::new(src, "telemetry", k.span(), t);
                self.telemetry(src, &mut s);
                s.deny_unknown(TELEMETRY_FIELDS, "[telemetry]", &mut self.errs);
            }
        }
        if let Some((k, v)) = r.entry("quotas") {
            r.skip("quotas");
            self.quotas_table(src, k.span(), v);
        }
        if let Some((k, v)) = r.entry("prices") {
            r.skip("prices");
            self.prices_table(src, k.span(), v);
        }
        if let Some((k, v)) = r.entry("credentials") {
            r.skip("credentials");
            self.credentials_table(src, k.span(), v);
        }
        if let Some((k, v)) = r.entry("mcp_servers") {
            r.skip("mcp_servers");
            self.mcp_servers_table(src, k.span(), v);
        }
        if let Some((k, v)) = r.entry("audit") {
            r.skip("audit");
            if let Some(t) = self.expect_table(src, "audit", k.span(), v) {
                let mut s = TableReader::new(src, "audit", k.span(), t);
                self.audit.signing_key = s.take("signing_key", &mut self.errs);
                if let Some(d) = s.take::<HumanDuration>("checkpoint_every", &mut self.errs) {
                    self.audit.checkpoint_every = d.get();
                }
                s.deny_unknown(AUDIT_FIELDS, "[audit]", &mut self.errs);
            }
        }
        if let Some((k, v)) = r.entry("auth") {
            r.skip("auth");
            if let Some(t) = self.expect_table(src, "auth", k.span(), v) {
                let mut s = TableReader::new(src, "auth", k.span(), t);
                let keys_at = s.entry("api_keys").map(|(_, v)| v.span());
                let keys: Option<Vec<crate::auth::ApiKeyConfig>> =
                    s.take("api_keys", &mut self.errs);
                self.auth.allow_unauthenticated = s
                    .take("allow_unauthenticated", &mut self.errs)
                    .unwrap_or(false);
                self.auth.approval_separation = s
                    .take("approval_separation", &mut self.errs)
                    .unwrap_or(false);
                self.auth.metrics_public =
                    s.take("metrics_public", &mut self.errs).unwrap_or(false);
                if let Some(c) = s.take("client_certs", &mut self.errs) {
                    self.auth.client_certs = c;
                }
                let oidc_at = s.entry("oidc").map(|(_, v)| v.span());
                self.auth.oidc = s.take("oidc", &mut self.errs);
                s.deny_unknown(AUTH_FIELDS, "[auth]", &mut self.errs);
                if let (Some(c), Some(at)) = (&self.auth.oidc, oidc_at)
                    && let Err(e) = crate::oidc::Oidc::new(c)
                {
                    self.errs.push(src.error(at, "auth.oidc", e).with_help(
                        "[auth.oidc] issuer = \"https://login.example.com/\", audience = \"cascade\", jwks_url = \"https://login.example.com/jwks\"",
                    ));
                }
                if let (Some(keys), Some(at)) = (keys, keys_at) {
                    self.auth.api_keys = keys;
                    let keys_only = crate::auth::AuthSettings {
                        oidc: None,
                        ..self.auth.clone()
                    };
                    if let Err(e) = crate::auth::Authenticator::new(&keys_only) {
                        self.errs.push(src.error(at, "auth.api_keys", e).with_help(
                            "`cascade keys create --tenant T --roles submit,read` prints a key and the [[auth.api_keys]] table to append",
                        ));
                    }
                }
            }
        }
        if let Some((k, v)) = r.entry("tenants") {
            r.skip("tenants");
            let at = k.span();
            let tenants: Option<BTreeMap<String, crate::model::TenantSettings>> =
                match deserialize(v) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        self.errs.push(
                            src.error(v.span(), "tenants", e.message().trim().to_string())
                                .with_help(TENANTS_HELP),
                        );
                        None
                    }
                };
            for (name, t) in tenants.iter().flatten() {
                if t.submissions_per_second
                    .is_some_and(|r| !(r.is_finite() && r > 0.0))
                {
                    self.errs.push(
                        src.error(
                            at.clone(),
                            format!("tenants.{name}.submissions_per_second"),
                            "a rate above 0",
                        )
                        .with_help(TENANTS_HELP),
                    );
                }
            }
            self.tenants = tenants.unwrap_or_default();
        }
        r.deny_unknown(SERVER_FILE_SECTIONS, "the server config", &mut self.errs);
        files
    }
}

const TENANTS_HELP: &str =
    "[tenants.acme] max_pending_jobs = 500, submissions_per_second = 50 (both optional)";

/// `t` with relative paths read from `base` (the server file's directory).
fn resolve_tls_paths(t: &crate::tls::TlsSettings, base: &Path) -> crate::tls::TlsSettings {
    crate::tls::TlsSettings {
        cert: base.join(&t.cert),
        key: base.join(&t.key),
        client_ca: t.client_ca.as_ref().map(|c| base.join(c)),
        require_client_cert: t.require_client_cert,
    }
}

impl Loader<'_> {
    /// `[mcp_servers.NAME]`: how to reach each MCP server (a command Cascade starts, or a URL).
    /// Declared to the registry at once, so that the graphs' `mcp` agents can name them.
    fn mcp_servers_table(&mut self, src: &Source, span: Range<usize>, v: &Spanned<DeValue<'_>>) {
        let Some(t) = self.expect_table(src, "mcp_servers", span, v) else {
            return;
        };
        let mut entries: Vec<_> = t.iter().collect();
        entries.sort_by_key(|(k, _)| k.span().start);
        for (k, v) in entries {
            let name: &str = k.get_ref();
            let path = format!("mcp_servers.{name}");
            if !self.check_name(src, k.span(), &path, name) {
                continue;
            }
            // `auth = "NAME"`: the `[credentials.NAME]` table (read before the servers), its
            // OAuth2 part named after it.
            let config = match deserialize::<serde_json::Value>(v).map(|mut json| {
                if let Some(serde_json::Value::String(cred)) = json.get("auth").cloned() {
                    match self.credentials.get(&cred) {
                        Some((table, _)) => {
                            let mut table = table.clone();
                            if let Some(o) = table.get_mut("oauth2").and_then(|o| o.as_object_mut())
                            {
                                o.entry("name").or_insert(serde_json::Value::String(cred));
                            }
                            json["auth"] = table;
                        }
                        None => return Err(format!(
                            "unknown credential {cred:?}; declare [credentials.{cred}] in cascade.toml"
                        )),
                    }
                }
                serde_json::from_value::<cascade_agents::mcp::McpServerConfig>(json)
                    .map_err(|e| e.to_string())
            }) {
                Ok(Ok(c)) => c,
                Ok(Err(message)) => {
                    self.errs
                        .push(src.error(v.span(), path, message).with_help(MCP_SERVER_HELP));
                    continue;
                }
                Err(e) => {
                    self.errs.push(
                        src.error(v.span(), path, e.message().trim().to_string())
                            .with_help(MCP_SERVER_HELP),
                    );
                    continue;
                }
            };
            if let Err((field, message)) = config.check() {
                let at = match v.get_ref() {
                    DeValue::Table(t) => t
                        .iter()
                        .find(|(k, _)| k.get_ref() == field)
                        .map_or(k.span(), |(_, v)| v.span()),
                    _ => k.span(),
                };
                self.errs
                    .push(src.error(at, format!("{path}.{field}"), message));
                continue;
            }
            self.mcp_servers.insert(name.to_string(), config);
        }
        let refused = self
            .registry
            .resources()
            .get::<cascade_agents::mcp::McpServers>()
            .declare(self.mcp_servers.clone(), self.registry.resources());
        for (name, message) in refused {
            // Where the server's auth is, to point at it.
            let at = t
                .iter()
                .find(|(k, _)| k.get_ref() == name.as_str())
                .map_or(v.span(), |(k, _)| k.span());
            self.errs
                .push(src.error(at, format!("mcp_servers.{name}.auth.oauth2"), message));
        }
    }

    /// `[prices."MODEL"]`: US dollars per million prompt and completion tokens.
    fn prices_table(&mut self, src: &Source, span: Range<usize>, v: &Spanned<DeValue<'_>>) {
        let Some(t) = self.expect_table(src, "prices", span, v) else {
            return;
        };
        let mut entries: Vec<_> = t.iter().collect();
        entries.sort_by_key(|(k, _)| k.span().start);
        const FIELDS: &[&str] = &["prompt_per_million", "completion_per_million"];
        for (k, v) in entries {
            let model: &str = k.get_ref();
            let path = format!("prices.{model}");
            let Some(table) = self.expect_table(src, &path, k.span(), v) else {
                continue;
            };
            let mut p = TableReader::new(src, path.clone(), k.span(), table);
            let help = "e.g. [prices.\"gpt-4o-mini\"] prompt_per_million = 0.15, completion_per_million = 0.60";
            let mut price = |field: &str, errs: &mut Vec<ConfigError>| {
                let span = p.entry(field).map(|e| e.1.span());
                let v: f64 = p.require(field, help, errs)?;
                if v.is_finite() && v >= 0.0 {
                    Some(v)
                } else {
                    errs.push(
                        src.error(
                            span.unwrap_or(0..0),
                            format!("{path}.{field}"),
                            "a price is a number >= 0: US dollars per million tokens",
                        )
                        .with_help(help),
                    );
                    None
                }
            };
            let prompt = price(FIELDS[0], &mut self.errs);
            let completion = price(FIELDS[1], &mut self.errs);
            p.deny_unknown(FIELDS, &format!("[{path}]"), &mut self.errs);
            if let (Some(prompt_per_million), Some(completion_per_million)) = (prompt, completion) {
                self.prices.insert(
                    model.to_string(),
                    cascade_agents::llm::Price {
                        prompt_per_million,
                        completion_per_million,
                    },
                );
            }
        }
    }

    /// `[telemetry]`: OTLP trace export. Every value is checked here, so a server never starts
    /// with an exporter that cannot work.
    pub(super) fn telemetry(&mut self, src: &Source, s: &mut TableReader<'_, '_>) {
        let t = &mut self.telemetry;
        if let Some((url, span)) = s.take_spanned::<String>("otlp_endpoint", &mut self.errs) {
            match url.parse::<tonic::transport::Uri>() {
                Ok(u)
                    if matches!(u.scheme_str(), Some("http" | "https"))
                        && u.host().is_some() =>
                {
                    t.otlp_endpoint = Some(url);
                }
                _ => self.errs.push(
                    src.error(
                        span,
                        "telemetry.otlp_endpoint",
                        format!("{url:?} is not an http:// or https:// URL"),
                    )
                    .with_help(
                        "give the collector's OTLP/gRPC address, for example: otlp_endpoint = \"http://127.0.0.1:4317\"",
                    ),
                ),
            }
        }
        if let Some(name) = s.take::<String>("service_name", &mut self.errs) {
            t.service_name = name;
        }
        if let Some((ratio, span)) = s.take_spanned::<f64>("sample_ratio", &mut self.errs) {
            if (0.0..=1.0).contains(&ratio) {
                t.sample_ratio = ratio;
            } else {
                self.errs.push(
                    src.error(
                        span,
                        "telemetry.sample_ratio",
                        format!("{ratio} is not between 0.0 and 1.0"),
                    )
                    .with_help("the share of jobs whose trace is exported: 1.0 for all, 0.1 for one in ten"),
                );
            }
        }
        if let Some((filter, span)) = s.take_spanned::<String>("filter", &mut self.errs) {
            match tracing_subscriber::EnvFilter::builder().parse(&filter) {
                Ok(_) => t.filter = filter,
                Err(e) => self.errs.push(
                    src.error(span, "telemetry.filter", format!("not a valid filter: {e}"))
                        .with_help(format!(
                            "use RUST_LOG syntax, for example: filter = \"{}\"",
                            TelemetrySettings::DEFAULT_FILTER
                        )),
                ),
            }
        }
        if let Some((k, v)) = s.entry("headers") {
            s.skip("headers");
            if let Some(table) = self.expect_table(src, "telemetry.headers", k.span(), v) {
                let mut entries: Vec<_> = table.iter().collect();
                entries.sort_by_key(|(k, _)| k.span().start);
                for (k, v) in entries {
                    let name: &str = k.get_ref();
                    let path = format!("telemetry.headers.{name}");
                    if name.ends_with("-bin") {
                        self.errs.push(
                            src.error(
                                k.span(),
                                path,
                                format!("{name:?} is a binary header, which is not supported"),
                            )
                            .with_help("header values here are text: drop the -bin suffix"),
                        );
                        continue;
                    }
                    if tonic::metadata::AsciiMetadataKey::from_bytes(name.as_bytes()).is_err() {
                        self.errs.push(
                            src.error(k.span(), path, format!("{name:?} is not a valid gRPC metadata name"))
                                .with_help("use lowercase letters, digits and dashes, for example: headers = { x-api-key = \"env:OTLP_API_KEY\" }"),
                        );
                        continue;
                    }
                    match deserialize::<crate::secret::SecretRef>(v) {
                        Ok(r) => {
                            self.telemetry.headers.insert(name.to_ascii_lowercase(), r);
                        }
                        Err(e) => self.errs.push(
                            src.error(v.span(), path, e.message().trim().to_string())
                                .with_help(format!("for example: {name} = \"env:OTLP_API_KEY\"")),
                        ),
                    }
                }
            }
        }
        if let Some((d, span)) = s.take_spanned::<HumanDuration>("timeout", &mut self.errs) {
            if d.get().is_zero() {
                self.errs.push(
                    src.error(
                        span,
                        "telemetry.timeout",
                        "a zero timeout fails every export",
                    )
                    .with_help("give an export time to finish, for example: timeout = \"10s\""),
                );
            } else {
                self.telemetry.timeout = d.get();
            }
        }
    }
}

/// How an `[mcp_servers.NAME]` table is written.
const MCP_SERVER_HELP: &str = "command = \"…\", args = [\"…\"], env = { NAME = \"env:NAME\" } for a server Cascade starts; url = \"https://…/mcp\" with auth = { bearer = \"env:NAME\" }, { api_key = { header, value } }, { basic = { username, password } }, { oauth2 = { token_url, client_id, client_secret } } or the name of a [credentials.NAME], for one it reaches";

impl Loader<'_> {
    /// `quota_backend`, `quota_backend_password` and `quota_fallback` of `[server]`.
    fn quota_backend(&mut self, src: &Source, s: &mut TableReader<'_, '_>) {
        let at = s.entry("quota_backend").map(|(_, v)| v.span());
        if let (Some(url), Some(at)) = (s.take::<String>("quota_backend", &mut self.errs), at) {
            match crate::model::check_redis_url(&url) {
                Ok(()) if !matches!(self.server.store, StoreSetting::Postgres(_)) => {
                    self.errs.push(
                        src.error(at, "server.quota_backend", "a shared quota backend is for a cluster, and the store is not PostgreSQL")
                            .with_help("set store = \"postgres://USER@HOST:PORT/DATABASE\" (the nodes share it), or remove quota_backend"),
                    )
                }
                Ok(()) => self.server.quota_backend = Some(url),
                Err(why) => self.errs.push(src.error(at, "server.quota_backend", why).with_help(
                    "quota_backend = \"redis://HOST:PORT\" (or rediss:// for TLS), with quota_backend_password = \"env:REDIS_PASSWORD\" when it needs one",
                )),
            }
        }
        let password_at = s.entry("quota_backend_password").map(|(_, v)| v.span());
        self.server.quota_backend_password = s.take("quota_backend_password", &mut self.errs);
        if let Some(at) = password_at
            && self.server.quota_backend.is_none()
        {
            self.errs.push(
                src.error(
                    at,
                    "server.quota_backend_password",
                    "quota_backend_password is for a quota_backend, and none is set",
                )
                .with_help(
                    "set quota_backend = \"redis://HOST:PORT\", or remove quota_backend_password",
                ),
            );
        }
        let fallback_at = s.entry("quota_fallback").map(|(_, v)| v.span());
        if let (Some(text), Some(at)) = (
            s.take::<String>("quota_fallback", &mut self.errs),
            fallback_at,
        ) {
            match crate::quota::shared::QuotaFallback::parse(&text) {
                Some(f) => self.server.quota_fallback = f,
                None => self.errs.push(
                    src.error(at, "server.quota_fallback", format!("unknown quota_fallback {text:?}"))
                        .with_help("quota_fallback = \"local_share\" (the default: each live node takes 1/N of each quota while Redis is unreachable) or \"closed\" (no call leaves)"),
                ),
            }
        }
    }
}
