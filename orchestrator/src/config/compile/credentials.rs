//! Credentials: `[credentials.NAME]` (in `cascade.toml` or a graph file) holds an `auth` table
//! (`oauth2`, `bearer`, `api_key` or `basic`, with secret references) that agents share by
//! writing `auth = "NAME"`. Each credential, named or inline (and an `llm` agent's API key), has a
//! quota of its own, `credential:<name>`, that its agents draw on: it is exhausted while the
//! credential cannot get a token or is refused (401, even when read again from its source), which
//! pauses them and everything downstream with that cause.

use super::*;

/// The forms an `auth` table may take.
const AUTH_FORMS: &[&str] = &["oauth2", "bearer", "api_key", "basic"];

impl Loader<'_> {
    pub(super) fn credentials_table(
        &mut self,
        src: &Source,
        span: Range<usize>,
        v: &Spanned<DeValue<'_>>,
    ) {
        let Some(t) = self.expect_table(src, "credentials", span, v) else {
            return;
        };
        let mut entries: Vec<_> = t.iter().collect();
        entries.sort_by_key(|(k, _)| k.span().start);
        for (k, v) in entries {
            let name: &str = k.get_ref();
            let path = format!("credentials.{name}");
            if !self.check_name(src, k.span(), &path, name) {
                continue;
            }
            let Some(table) = self.expect_table(src, &path, k.span(), v) else {
                continue;
            };
            let forms: Vec<&str> = table.iter().map(|(k, _)| k.get_ref().as_ref()).collect();
            if forms.len() != 1 || !AUTH_FORMS.contains(&forms[0]) {
                self.errs.push(
                    src.error(
                        k.span(),
                        path.clone(),
                        format!(
                            "a credential holds exactly one of {}, found {}",
                            AUTH_FORMS.join(", "),
                            if forms.is_empty() {
                                "none".to_string()
                            } else {
                                forms.join(", ")
                            }
                        ),
                    )
                    .with_help(format!(
                        "e.g. [{path}] oauth2 = {{ token_url = \"https://auth.example.com/token\", client_id = \"cascade\", client_secret = \"env:CRM_SECRET\" }}"
                    )),
                );
                continue;
            }
            let value = match deserialize::<serde_json::Value>(v) {
                Ok(j) => j,
                Err(e) => {
                    self.errs
                        .push(src.error(v.span(), path, e.message().trim().to_string()));
                    continue;
                }
            };
            let (line, col) = src.line_col(k.span().start);
            let at = format!("{}:{line}:{col}", src.path.display());
            if let Some((_, first)) = self.credentials.get(name) {
                self.errs.push(
                    src.error(k.span(), path, format!("credential {name:?} is declared twice (first at {first})"))
                        .with_help("declare each credential once; cascade.toml's are shared by every graph file"),
                );
                continue;
            }
            self.credentials.insert(name.to_string(), (value, at));
        }
    }

    /// An agent's `auth` value: a named credential's table (its OAuth2 part named after it), or
    /// an inline table (its OAuth2 part named after the agent).
    pub(super) fn auth(
        &mut self,
        src: &Source,
        graph: &str,
        agent: &str,
        path: &str,
        span: Range<usize>,
        value: serde_json::Value,
    ) -> Option<serde_json::Value> {
        let (mut table, name, named) = match value {
            serde_json::Value::String(name) => match self.credentials.get(&name) {
                Some((t, _)) => (t.clone(), name, true),
                None => {
                    let known: Vec<&str> = self.credentials.keys().map(String::as_str).collect();
                    let help = if known.is_empty() {
                        format!(
                            "declare [credentials.{name}] in cascade.toml (shared by every graph file) or in this graph file"
                        )
                    } else {
                        format!(
                            "declared credentials: {}; or declare [credentials.{name}] in cascade.toml or in this graph file",
                            known.join(", ")
                        )
                    };
                    self.errs.push(
                        src.error(span, path, format!("unknown credential {name:?}"))
                            .with_help(help),
                    );
                    return None;
                }
            },
            inline => (inline, format!("{graph}.{agent}"), false),
        };
        // The credential's name goes with it: into the OAuth2 table (its token cache and store
        // key), and beside the form of a named credential or of any fixed one (its health,
        // shared by the agents that name it). An inline OAuth2 table has none beside it.
        let oauth2 = table.get_mut("oauth2").and_then(|o| o.as_object_mut());
        let beside = named || oauth2.is_none();
        if let Some(o) = oauth2 {
            o.entry("name")
                .or_insert(serde_json::Value::String(name.clone()));
        }
        if beside && let Some(t) = table.as_object_mut() {
            t.entry("name").or_insert(serde_json::Value::String(name));
        }
        Some(table)
    }

    /// The quota of credential `name`, created when an agent first uses it.
    pub(super) fn credential_quota(
        &mut self,
        src_idx: usize,
        span: &Range<usize>,
        agent: &str,
        name: &str,
    ) -> Arc<str> {
        let quota = format!("{}{name}", QuotaModel::CREDENTIAL_PREFIX);
        if !self.quotas.contains_key(&quota) {
            let src = &self.sources[src_idx];
            let (line, col) = src.line_col(span.start);
            let at = format!(
                "{}:{line}:{col} (credential of agent {agent:?})",
                src.path.display()
            );
            self.quotas.insert(
                quota.clone(),
                QuotaModel::credential(name, at, quotas::DEFAULT_PAUSE_THRESHOLD),
            );
        }
        quota.into()
    }
}
