//! `[[graph.triggers]]`: events that start jobs (see [`crate::triggers`]).

use super::*;
use crate::secret::SecretRef;
use crate::triggers::{
    DeadLetter, NatsSpec, RedisSpec, ScheduleSpec, TriggerModel, TriggerSource, WebhookSpec,
    schedule, verify::Provider,
};

const COMMON: &[&str] = &[
    "name",
    "kind",
    "description",
    "input",
    "when",
    "idempotency_key",
    "tenant",
];
const WEBHOOK: &[&str] = &["verify", "secret", "tolerance"];
const BUS: &[&str] = &["url", "stream", "dead_letter", "max_deliveries", "batch"];
const NATS: &[&str] = &[
    "subject", "consumer", "user", "password", "token", "ack_wait",
];
const REDIS: &[&str] = &["password", "group", "consumer", "field", "claim_after"];
const SCHEDULE: &[&str] = &["cron", "every", "timezone", "catch_up"];
const KINDS: &[&str] = &["webhook", "nats", "redis_stream", "schedule"];

const DEFAULT_MAX_DELIVERIES: u32 = 5;
const DEFAULT_BATCH: usize = 100;

impl Loader<'_> {
    /// The triggers of graph `graph` (whose tenants are `tenants`), from its `triggers` array.
    pub(super) fn triggers(
        &mut self,
        src: &Source,
        graph: &str,
        tenants: Option<&[Arc<str>]>,
        v: &Spanned<DeValue<'_>>,
    ) -> Vec<Arc<TriggerModel>> {
        let DeValue::Array(items) = v.get_ref() else {
            self.errs.push(
                src.error(v.span(), "graph.triggers", "expected an array of tables")
                    .with_help("declare each trigger as [[graph.triggers]] with name and kind"),
            );
            return Vec::new();
        };
        let mut out: Vec<Arc<TriggerModel>> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let path = format!("graph.triggers[{i}]");
            let Some(t) = self.expect_table(src, &path, item.span(), item) else {
                continue;
            };
            if let Some(m) = self.trigger(src, &path, item.span(), graph, tenants, t) {
                if out.iter().any(|o| o.name == m.name) {
                    self.errs.push(
                        src.error(
                            item.span(),
                            format!("{path}.name"),
                            format!("a second trigger named {:?}", &*m.name),
                        )
                        .with_help("give each trigger of a graph its own name"),
                    );
                    continue;
                }
                out.push(Arc::new(m));
            }
        }
        out
    }

    fn trigger(
        &mut self,
        src: &Source,
        path: &str,
        span: Range<usize>,
        graph: &str,
        tenants: Option<&[Arc<str>]>,
        t: &DeTable<'_>,
    ) -> Option<TriggerModel> {
        let mut r = TableReader::new(src, path, span.clone(), t);
        let errors_before = self.errs.len();
        let name: Option<(String, Range<usize>)> = if r.has("name") {
            r.take_spanned("name", &mut self.errs)
        } else {
            r.require::<String>(
                "name",
                "name the trigger: name = \"new-ticket\"",
                &mut self.errs,
            );
            None
        };
        if let Some((n, s)) = &name {
            self.check_name(src, s.clone(), &r.field_path("name"), n);
        }
        let kind: Option<(String, Range<usize>)> = if r.has("kind") {
            r.take_spanned("kind", &mut self.errs)
        } else {
            r.require::<String>(
                "kind",
                "kind = \"webhook\", \"nats\", \"redis_stream\" or \"schedule\"",
                &mut self.errs,
            );
            None
        };
        let _description: Option<String> = r.take("description", &mut self.errs);
        let input_span = r.entry("input").map(|(_, v)| v.span());
        let input: Option<serde_json::Value> = r.take("input", &mut self.errs);
        let when: Option<(String, Range<usize>)> = r.take_spanned("when", &mut self.errs);
        let key: Option<(String, Range<usize>)> = r.take_spanned("idempotency_key", &mut self.errs);
        let tenant: Option<(String, Range<usize>)> = r.take_spanned("tenant", &mut self.errs);
        let tenant: Option<Arc<str>> = match (tenant, tenants) {
            (Some((t, s)), Some(list)) if !list.iter().any(|x| **x == *t) => {
                self.errs.push(
                    src.error(
                        s,
                        r.field_path("tenant"),
                        format!("tenant {t:?} is not in the graph's tenants"),
                    )
                    .with_help(format!(
                        "one of: {}",
                        list.iter()
                            .map(|t| format!("{t:?}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                );
                None
            }
            (Some((t, _)), _) => Some(t.into()),
            (None, Some([only])) => Some(only.clone()),
            (None, Some(_)) => {
                self.errs.push(
                    src.error(span.clone(), r.field_path("tenant"), "the graph takes jobs of several tenants: say whose jobs this trigger starts")
                        .with_help("tenant = \"acme\" (one of the graph's tenants)"),
                );
                None
            }
            (None, None) => Some("".into()),
        };
        let kind_name = kind.as_ref().map(|(k, _)| k.as_str()).unwrap_or("");
        let source = match kind_name {
            "webhook" => self.webhook(src, &mut r),
            "nats" => self.nats(src, &mut r),
            "redis_stream" => self.redis(src, &mut r, name.as_ref().map_or("", |n| &n.0)),
            "schedule" => self.schedule(src, &mut r),
            other => {
                if let Some((_, s)) = &kind {
                    self.errs.push(
                        src.error(
                            s.clone(),
                            r.field_path("kind"),
                            format!("unknown trigger kind {other:?}"),
                        )
                        .with_help(suggestion(other, KINDS.iter().copied())),
                    );
                }
                None
            }
        };
        let valid: Vec<&str> = match kind_name {
            "webhook" => [COMMON, WEBHOOK].concat(),
            "nats" => [COMMON, BUS, NATS].concat(),
            "redis_stream" => [COMMON, BUS, REDIS].concat(),
            _ => [COMMON, SCHEDULE].concat(),
        };
        if !kind_name.is_empty() && KINDS.contains(&kind_name) {
            r.deny_unknown(&valid, &format!("a {kind_name} trigger"), &mut self.errs);
        }
        // The templates compile as the runtime will compile them.
        if let Err((field, e)) = crate::triggers::compile_templates(
            input.as_ref(),
            key.as_ref().map(|k| k.0.as_str()),
            when.as_ref().map(|w| w.0.as_str()),
        ) {
            let at = match field {
                "input" => input_span.unwrap_or(span.clone()),
                "when" => when.as_ref().map_or(span.clone(), |w| w.1.clone()),
                _ => key.as_ref().map_or(span.clone(), |k| k.1.clone()),
            };
            let help = match field {
                "input" => {
                    "a template over event, headers and trigger, e.g. input = { ticket_id = \"{{= event.ticket.id }}\" }"
                }
                "when" => {
                    "an expression without braces, e.g. when = \"event.type == 'ticket.created'\""
                }
                _ => "a template that names the event, e.g. idempotency_key = \"{{ event.id }}\"",
            };
            self.errs
                .push(src.error(at, r.field_path(field), e).with_help(help));
        }
        let model = TriggerModel {
            name: name.as_ref().map_or("", |n| &n.0).into(),
            graph: graph.into(),
            tenant: tenant.unwrap_or_else(|| "".into()),
            input,
            when: when.map(|w| w.0),
            idempotency_key: key.map(|k| k.0),
            source: source?,
        };
        (self.errs.len() == errors_before).then_some(model)
    }

    fn secret(&mut self, r: &mut TableReader<'_, '_>, key: &str) -> Option<SecretRef> {
        r.take(key, &mut self.errs)
    }

    fn webhook(&mut self, src: &Source, r: &mut TableReader<'_, '_>) -> Option<TriggerSource> {
        let verify: Option<(String, Range<usize>)> = if r.has("verify") {
            r.take_spanned("verify", &mut self.errs)
        } else {
            r.require::<String>(
                "verify",
                "verify = \"slack\", \"github\", \"stripe\", \"zendesk\" or \"cascade\"",
                &mut self.errs,
            );
            None
        };
        let provider = match verify {
            Some((v, s)) => match Provider::parse(&v) {
                Some(p) => Some(p),
                None => {
                    self.errs.push(
                        src.error(s, r.field_path("verify"), format!("unknown provider {v:?}"))
                            .with_help(suggestion(&v, Provider::NAMES.iter().copied())),
                    );
                    None
                }
            },
            None => None,
        };
        let secret = self.secret(r, "secret");
        if secret.is_none() && provider.is_some_and(|p| p != Provider::Cascade) && !r.has("secret")
        {
            self.errs.push(
                src.error(r.span.clone(), r.field_path("secret"), "missing required field `secret`")
                    .with_help("the provider's signing secret, as a reference: secret = \"env:SLACK_SIGNING_SECRET\""),
            );
        }
        let tolerance: Option<(HumanDuration, Range<usize>)> =
            r.take_spanned("tolerance", &mut self.errs);
        if let Some((t, s)) = &tolerance {
            // The replay guard remembers signatures for twice the longest window.
            if t.get() > crate::secret::SIGNATURE_TOLERANCE || t.get() < Duration::from_secs(1) {
                self.errs.push(
                    src.error(s.clone(), r.field_path("tolerance"), "a tolerance under one second or over five minutes")
                        .with_help("tolerance = \"5m\" (the default) or less: a longer window is a longer time to replay a captured request"),
                );
            } else if provider == Some(Provider::Cascade) || provider == Some(Provider::Github) {
                self.errs.push(
                    src.error(s.clone(), r.field_path("tolerance"), "this scheme has no tolerance to set")
                        .with_help("the cascade scheme's window is fixed at 5 minutes; GitHub signs no timestamp"),
                );
            }
        }
        let tolerance = tolerance.map(|(t, _)| t);
        Some(TriggerSource::Webhook(WebhookSpec {
            verify: provider?,
            secret,
            tolerance: tolerance.map_or(crate::secret::SIGNATURE_TOLERANCE, HumanDuration::get),
        }))
    }

    /// A duration field of at least one second (shorter ones would make a consumer spin).
    fn at_least_a_second(
        &mut self,
        src: &Source,
        r: &mut TableReader<'_, '_>,
        key: &str,
        example: &str,
    ) -> Option<HumanDuration> {
        let (d, span): (HumanDuration, Range<usize>) = r.take_spanned(key, &mut self.errs)?;
        if d.get() < Duration::from_secs(1) {
            self.errs.push(
                src.error(span, r.field_path(key), "under one second")
                    .with_help(example.to_string()),
            );
            return None;
        }
        Some(d)
    }

    fn required(&mut self, r: &mut TableReader<'_, '_>, key: &str, help: &str) -> Option<String> {
        let v: Option<String> = r.require(key, help, &mut self.errs);
        v.filter(|s| !s.is_empty())
    }

    fn dead_letter(&mut self, r: &mut TableReader<'_, '_>) -> DeadLetter {
        let target: Option<String> = r.take("dead_letter", &mut self.errs);
        let max: Option<NonZeroU32> = r.take("max_deliveries", &mut self.errs);
        DeadLetter {
            target,
            max_deliveries: max.map_or(DEFAULT_MAX_DELIVERIES, NonZeroU32::get),
        }
    }

    fn url(
        &mut self,
        src: &Source,
        r: &mut TableReader<'_, '_>,
        schemes: &[&str],
        example: &str,
    ) -> Option<String> {
        let span = r.entry("url").map(|(_, v)| v.span());
        let url = self.required(r, "url", &format!("url = \"{example}\""))?;
        // Credentials in a URL would be shown wherever the URL is (logs, a failing trigger's
        // state); the URL is not echoed here either.
        if url
            .split("://")
            .nth(1)
            .is_some_and(|rest| rest.split('/').next().unwrap_or("").contains('@'))
        {
            self.errs.push(
                src.error(
                    span.unwrap_or(r.span.clone()),
                    r.field_path("url"),
                    "the URL carries a user or password",
                )
                .with_help("keep credentials out of the URL: user, password (and token for NATS) take secret references, e.g. password = \"env:BUS_PASSWORD\""),
            );
            return None;
        }
        if !schemes.iter().any(|s| url.starts_with(&format!("{s}://"))) {
            self.errs.push(
                src.error(
                    span.unwrap_or(r.span.clone()),
                    r.field_path("url"),
                    format!("{url:?} is not a {} URL", schemes[0]),
                )
                .with_help(format!("url = \"{example}\"")),
            );
            return None;
        }
        Some(url)
    }

    fn nats(&mut self, src: &Source, r: &mut TableReader<'_, '_>) -> Option<TriggerSource> {
        let url = self.url(src, r, &["nats", "tls"], "nats://127.0.0.1:4222");
        let stream = self.required(r, "stream", "stream = \"TICKETS\" (the JetStream stream)");
        let subject = self.required(r, "subject", "subject = \"tickets.created\"");
        let consumer = self.required(
            r,
            "consumer",
            "consumer = \"cascade-triage\" (a durable pull consumer, created when missing)",
        );
        let user = self.secret(r, "user");
        let password = self.secret(r, "password");
        let token = self.secret(r, "token");
        let dead_letter = self.dead_letter(r);
        let batch: Option<NonZeroUsize> = r.take("batch", &mut self.errs);
        let ack_wait = self.at_least_a_second(src, r, "ack_wait", "ack_wait = \"30s\"");
        Some(TriggerSource::Nats(NatsSpec {
            url: url?,
            stream: stream?,
            subject: subject?,
            consumer: consumer?,
            user,
            password,
            token,
            dead_letter,
            batch: batch.map_or(DEFAULT_BATCH, NonZeroUsize::get),
            ack_wait: ack_wait.map_or(Duration::from_secs(30), HumanDuration::get),
        }))
    }

    fn redis(
        &mut self,
        src: &Source,
        r: &mut TableReader<'_, '_>,
        trigger: &str,
    ) -> Option<TriggerSource> {
        let url = self.url(src, r, &["redis", "rediss"], "redis://127.0.0.1:6379");
        let password = self.secret(r, "password");
        let stream = self.required(r, "stream", "stream = \"tickets\"");
        let group = self.required(r, "group", "group = \"cascade\" (created when missing)");
        let consumer: Option<String> = r.take("consumer", &mut self.errs);
        let field: Option<String> = r.take("field", &mut self.errs);
        let claim_after = self.at_least_a_second(src, r, "claim_after", "claim_after = \"60s\"");
        let dead_letter = self.dead_letter(r);
        let batch: Option<NonZeroUsize> = r.take("batch", &mut self.errs);
        Some(TriggerSource::RedisStream(RedisSpec {
            url: url?,
            password,
            stream: stream?,
            group: group?,
            consumer: consumer.unwrap_or_else(|| format!("cascade-{}-{trigger}", host_name())),
            field: field.unwrap_or_else(|| "payload".into()),
            claim_after: claim_after.map_or(Duration::from_secs(60), HumanDuration::get),
            dead_letter,
            batch: batch.map_or(DEFAULT_BATCH, NonZeroUsize::get),
        }))
    }

    fn schedule(&mut self, src: &Source, r: &mut TableReader<'_, '_>) -> Option<TriggerSource> {
        let cron: Option<(String, Range<usize>)> = r.take_spanned("cron", &mut self.errs);
        let every: Option<(HumanDuration, Range<usize>)> = r.take_spanned("every", &mut self.errs);
        let tz: Option<(String, Range<usize>)> = r.take_spanned("timezone", &mut self.errs);
        let catch_up: Option<(String, Range<usize>)> = r.take_spanned("catch_up", &mut self.errs);
        let catch_up = match catch_up {
            None => schedule::CatchUp::Last,
            Some((c, s)) => match schedule::CatchUp::parse(&c) {
                Some(c) => c,
                None => {
                    self.errs.push(
                        src.error(s, r.field_path("catch_up"), format!("unknown catch-up {c:?}"))
                            .with_help("catch_up = \"none\", \"last\" (the default) or \"all\": what to fire for slots missed while the server was down"),
                    );
                    return None;
                }
            },
        };
        let every = match (cron, every) {
            (Some((c, s)), None) => {
                let tz = match tz {
                    None => chrono_tz::UTC,
                    Some((name, s)) => {
                        match name.parse::<chrono_tz::Tz>() {
                            Ok(tz) => tz,
                            Err(_) => {
                                self.errs.push(
                                src.error(s, r.field_path("timezone"), format!("unknown time zone {name:?}"))
                                    .with_help("an IANA name, e.g. timezone = \"Europe/Paris\" (default UTC)"),
                            );
                                return None;
                            }
                        }
                    }
                };
                match schedule::Every::cron(&c, tz) {
                    Ok(e) => e,
                    Err(e) => {
                        self.errs.push(
                            src.error(s, r.field_path("cron"), format!("invalid cron expression: {e}"))
                                .with_help("five fields: minute hour day-of-month month day-of-week, e.g. cron = \"0 7 * * MON-FRI\""),
                        );
                        return None;
                    }
                }
            }
            (None, Some((p, s))) => {
                if tz.is_some() {
                    self.errs.push(
                        src.error(
                            s.clone(),
                            r.field_path("timezone"),
                            "a time zone means nothing to `every`",
                        )
                        .with_help("use cron = \"…\" with timezone, or drop timezone"),
                    );
                }
                if p.get() < Duration::from_secs(1) {
                    self.errs.push(
                        src.error(s, r.field_path("every"), "a period under one second")
                            .with_help("every = \"15m\""),
                    );
                    return None;
                }
                schedule::Every::Period(p.get())
            }
            (Some((_, s)), Some(_)) => {
                self.errs.push(
                    src.error(s, r.field_path("cron"), "both cron and every")
                        .with_help("keep one: cron = \"0 7 * * MON-FRI\" or every = \"15m\""),
                );
                return None;
            }
            (None, None) => {
                self.errs.push(
                    src.error(r.span.clone(), r.field_path("cron"), "a schedule needs cron or every")
                        .with_help("cron = \"0 7 * * MON-FRI\" (with timezone = \"Europe/Paris\") or every = \"15m\""),
                );
                return None;
            }
        };
        Some(TriggerSource::Schedule(ScheduleSpec { every, catch_up }))
    }
}

/// This machine's host name (for a default consumer name), `cascade` when unknown.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "cascade".into())
}
