//! Quotas: declared ones (`[quotas.NAME]`, in `cascade.toml` or any graph file) and the implicit
//! `upstream:<name>` quota of an agent that declares none.

use super::*;

const QUOTA_FIELDS: &[&str] = &[
    "description",
    "requests_per_second",
    "requests_per_minute",
    "tokens_per_minute",
    "tokens_per_hour",
    "cost_usd_per_hour",
    "cost_usd_per_day",
    "burst",
    "max_concurrency",
    "circuit_breaker",
    "pause_threshold",
    "learn_from_upstream",
    "tenant_share",
];
pub(super) const DEFAULT_PAUSE_THRESHOLD: Duration = Duration::from_millis(250);

impl Loader<'_> {
    pub(super) fn quotas_table(
        &mut self,
        src: &Source,
        span: Range<usize>,
        v: &Spanned<DeValue<'_>>,
    ) {
        let Some(t) = self.expect_table(src, "quotas", span, v) else {
            return;
        };
        let mut entries: Vec<_> = t.iter().collect();
        entries.sort_by_key(|(k, _)| k.span().start);
        for (k, v) in entries {
            let name: &str = k.get_ref();
            let path = format!("quotas.{name}");
            if !self.check_name(src, k.span(), &path, name) {
                continue;
            }
            let Some(table) = self.expect_table(src, &path, k.span(), v) else {
                continue;
            };
            if let Some(q) = self.quota(src, name, k.span(), table) {
                if let Some(prev) = self.quotas.get(name) {
                    let at = prev.declared_at.clone();
                    self.errs.push(
                        src.error(k.span(), path, format!("quota {name:?} is declared twice (first at {at})"))
                            .with_help("quotas are shared by every graph of a server: declare each once, for example in cascade.toml"),
                    );
                } else {
                    self.quotas.insert(name.to_string(), q);
                }
            }
        }
    }

    pub(super) fn quota(
        &mut self,
        src: &Source,
        name: &str,
        span: Range<usize>,
        t: &DeTable<'_>,
    ) -> Option<QuotaModel> {
        let errs_before = self.errs.len();
        let path = format!("quotas.{name}");
        let mut r = TableReader::new(src, path.clone(), span.clone(), t);
        let _: Option<String> = r.take("description", &mut self.errs);
        let rate = |r: &mut TableReader, errs: &mut Vec<ConfigError>, key: &str, period: u64| {
            r.take::<NonZeroU64>(key, errs).map(|amount| Rate {
                amount,
                period: Duration::from_secs(period),
            })
        };
        let rps = rate(&mut r, &mut self.errs, "requests_per_second", 1);
        let rpm = rate(&mut r, &mut self.errs, "requests_per_minute", 60);
        let tpm = rate(&mut r, &mut self.errs, "tokens_per_minute", 60);
        let tph = rate(&mut r, &mut self.errs, "tokens_per_hour", 3600);
        // Dollars a window: kept in micro-dollars, so that the token window's arithmetic holds.
        let dollars = |r: &mut TableReader, errs: &mut Vec<ConfigError>, key: &str, period: u64| {
            let span = r.entry(key).map(|(_, v)| v.span());
            let usd: Option<f64> = r.take(key, errs);
            match (usd, span) {
                (Some(usd), Some(span)) => {
                    let micros = (usd * 1e6).round();
                    match NonZeroU64::new(if micros.is_finite() && micros >= 1.0 {
                        micros as u64
                    } else {
                        0
                    }) {
                        Some(amount) => Some(Rate {
                            amount,
                            period: Duration::from_secs(period),
                        }),
                        None => {
                            errs.push(
                                src.error(
                                    span,
                                    format!("{path}.{key}"),
                                    format!("{usd} is not an amount of dollars a quota can hold"),
                                )
                                .with_help(format!(
                                    "a positive number of dollars, e.g. {key} = 50"
                                )),
                            );
                            None
                        }
                    }
                }
                _ => None,
            }
        };
        let cph = dollars(&mut r, &mut self.errs, "cost_usd_per_hour", 3600);
        let cpd = dollars(&mut r, &mut self.errs, "cost_usd_per_day", 86_400);
        let burst: Option<NonZeroU32> = r.take("burst", &mut self.errs);
        let max_concurrency: Option<NonZeroU32> = r.take("max_concurrency", &mut self.errs);
        let pause_threshold: Option<HumanDuration> = r.take("pause_threshold", &mut self.errs);
        let cb: Option<RawCircuitBreaker> = r.take("circuit_breaker", &mut self.errs);
        let learn: Option<bool> = r.take("learn_from_upstream", &mut self.errs);
        let share_at = r.entry("tenant_share").map(|(_, v)| v.span());
        let shares: Option<BTreeMap<String, f64>> = r.take("tenant_share", &mut self.errs);
        r.deny_unknown(QUOTA_FIELDS, &format!("quota {name:?}"), &mut self.errs);
        if rps.is_some() && rpm.is_some() {
            self.errs.push(
                src.error(
                    span.clone(),
                    path.clone(),
                    "both requests_per_second and requests_per_minute are set",
                )
                .with_help("keep one of them"),
            );
        }
        if tpm.is_some() && tph.is_some() {
            self.errs.push(
                src.error(
                    span.clone(),
                    path.clone(),
                    "both tokens_per_minute and tokens_per_hour are set",
                )
                .with_help("keep one of them"),
            );
        }
        if cph.is_some() && cpd.is_some() {
            self.errs.push(
                src.error(
                    span.clone(),
                    path.clone(),
                    "both cost_usd_per_hour and cost_usd_per_day are set",
                )
                .with_help("keep one of them"),
            );
        }
        let requests = rps.or(rpm);
        let tokens = tpm.or(tph);
        let cost = cph.or(cpd);
        if requests.is_none()
            && tokens.is_none()
            && cost.is_none()
            && max_concurrency.is_none()
            && !r.has("requests_per_second")
            && !r.has("requests_per_minute")
            && !r.has("tokens_per_minute")
            && !r.has("tokens_per_hour")
            && !r.has("cost_usd_per_hour")
            && !r.has("cost_usd_per_day")
            && !r.has("max_concurrency")
            && !r.has("learn_from_upstream")
        {
            self.errs.push(
                src.error(span.clone(), path.clone(), "a quota needs at least one limit")
                    .with_help("set requests_per_second, requests_per_minute, tokens_per_minute, tokens_per_hour, cost_usd_per_hour, cost_usd_per_day or max_concurrency, or learn_from_upstream = true to take the limits the upstream's answers state"),
            );
        }
        let tenant_share: Vec<(Arc<str>, f64)> = match (shares, share_at) {
            (Some(shares), Some(at)) => {
                if let Some((t, s)) = shares
                    .iter()
                    .find(|(t, s)| t.is_empty() || !(**s > 0.0 && **s <= 1.0))
                {
                    self.errs.push(
                        src.error(at.clone(), format!("{path}.tenant_share"), format!("{t:?} = {s}: a share is a tenant's name and a fraction above 0 and at most 1"))
                            .with_help("tenant_share = { acme = 0.5, globex = 0.25 }"),
                    );
                }
                if requests.is_none()
                    && tokens.is_none()
                    && cost.is_none()
                    && max_concurrency.is_none()
                {
                    self.errs.push(
                        src.error(at, format!("{path}.tenant_share"), "a share of no limit: the quota states none to divide")
                            .with_help("give the quota the limits to share, e.g. max_concurrency = 10 or requests_per_minute = 600"),
                    );
                }
                shares
                    .into_iter()
                    .map(|(t, s)| (Arc::from(t.as_str()), s))
                    .collect()
            }
            _ => Vec::new(),
        };
        let circuit_breaker = match cb {
            None => None,
            Some(cb) => {
                if !(cb.failure_ratio > 0.0 && cb.failure_ratio <= 1.0) {
                    let s = r
                        .entry("circuit_breaker")
                        .map(|(_, v)| span_at(v, &["failure_ratio".into()]));
                    self.errs.push(
                        src.error(
                            s.unwrap_or(span.clone()),
                            format!("{path}.circuit_breaker.failure_ratio"),
                            format!("failure_ratio {} is out of range", cb.failure_ratio),
                        )
                        .with_help("use a ratio above 0 and at most 1, e.g. 0.5"),
                    );
                }
                Some(CircuitBreakerSpec {
                    failure_ratio: cb.failure_ratio,
                    min_calls: cb.min_calls,
                    window: cb.window.get(),
                    open_for: cb.open_for.get(),
                })
            }
        };
        if self.errs.len() > errs_before {
            return None;
        }
        let (line, col) = src.line_col(span.start);
        Some(QuotaModel {
            name: name.into(),
            requests,
            tokens,
            cost,
            burst,
            max_concurrency,
            circuit_breaker,
            pause_threshold: pause_threshold.map_or(DEFAULT_PAUSE_THRESHOLD, HumanDuration::get),
            declared_at: format!("{}:{line}:{col}", src.path.display()),
            implicit: false,
            learn_from_upstream: learn.unwrap_or(false),
            credential: false,
            tenant_share,
        })
    }

    /// The implicit quota of `upstream`, created when an agent first calls it.
    pub(super) fn implicit_quota(
        &mut self,
        src_idx: usize,
        span: &Range<usize>,
        agent: &str,
        upstream: &str,
    ) -> Arc<str> {
        let name = format!("{}{upstream}", QuotaModel::IMPLICIT_PREFIX);
        if !self.quotas.contains_key(&name) {
            let src = &self.sources[src_idx];
            let (line, col) = src.line_col(span.start);
            let at = format!(
                "{}:{line}:{col} (upstream of agent {agent:?}, which names no quota)",
                src.path.display()
            );
            self.quotas.insert(
                name.clone(),
                QuotaModel::implicit(upstream, at, DEFAULT_PAUSE_THRESHOLD),
            );
        }
        name.into()
    }
}
