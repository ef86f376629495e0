use super::*;
use crate::config::ConfigErrors;

fn compile(text: &str) -> Result<ServerModel, ConfigErrors> {
    parse_graph_str("g.toml", text, &Registry::default())
}

fn errors(text: &str) -> Vec<ConfigError> {
    match compile(text) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e.0,
    }
}

/// The single error at `path`, asserting where it is.
fn error_at(errs: &[ConfigError], path: &str, line: usize, column: usize) -> ConfigError {
    let e = errs
        .iter()
        .find(|e| e.path == path)
        .unwrap_or_else(|| panic!("no error at {path}: {errs:#?}"))
        .clone();
    assert_eq!((e.line, e.column), (line, column), "position of {e}");
    assert_eq!(e.file, PathBuf::from("g.toml"));
    e
}

const GOOD: &str = r#"
[graph]
name = "triage"
deadline = "10m"

[quotas.llm]
requests_per_minute = 500
tokens_per_minute = 90_000
circuit_breaker = { failure_ratio = 0.5, min_calls = 20, window = "30s", open_for = "15s" }

[agents.draft]
kind = "sim"
after = ["classify"]
quota = "llm"

[agents.classify]
kind = "sim"
quota = "llm"
retry = { max_attempts = 5, initial_delay = "200ms", max_delay = "30s" }
timeout = "5s"

[agents.post]
kind = "template"
after = ["draft"]
output = { text = "{{ deps.draft.agent }}" }
"#;

#[test]
fn good_graph_compiles_in_topological_order() {
    let m = compile(GOOD).unwrap();
    let g = m.graph("triage").unwrap();
    let names: Vec<&str> = g.agents.iter().map(|a| &*a.name).collect();
    assert_eq!(names, ["classify", "draft", "post"]);
    assert_eq!(g.agents[1].after, vec![0]);
    assert_eq!(g.agents[0].dependents, vec![1]);
    assert_eq!(g.deadline, Some(Duration::from_secs(600)));
    let c = &g.agents[0];
    assert_eq!(c.retry.max_attempts.get(), 5);
    assert_eq!(c.retry.initial_delay, Duration::from_millis(200));
    assert_eq!(c.timeout, Duration::from_secs(5));
    assert_eq!(&*c.quotas[0], "llm");
    let q = &m.quotas["llm"];
    assert_eq!(q.requests.unwrap().to_string(), "500/min");
    assert_eq!(q.tokens.unwrap().amount.get(), 90_000);
    assert_eq!(q.circuit_breaker.unwrap().open_for, Duration::from_secs(15));
    assert_eq!(g.sinks().map(|a| &*a.name).collect::<Vec<_>>(), ["post"]);
}

#[test]
fn unknown_field_names_line_column_and_nearest() {
    let errs = errors(
        "[graph]\nname = \"g\"\n\n[agents.a]\nkind = \"sim\"\ntimeout = \"1s\"\nlatncy = \"5ms\"\n",
    );
    let e = error_at(&errs, "agents.a.latncy", 7, 1);
    assert!(e.message.contains("unknown field `latncy`"), "{e}");
    assert_eq!(e.help.as_deref(), Some("did you mean \"latency\"?"));
}

#[test]
fn wrong_type_names_line_column_and_field() {
    let errs = errors(
        "[graph]\nname = \"g\"\nmax_in_flight_jobs = \"many\"\n\n[agents.a]\nkind = \"sim\"\nmax_concurrency = 0\n",
    );
    let e = error_at(&errs, "graph.max_in_flight_jobs", 3, 22);
    assert!(e.message.contains("invalid type"), "{e}");
    let e = error_at(&errs, "agents.a.max_concurrency", 7, 19);
    assert!(e.message.contains("nonzero"), "{e}");
    let rendered = ConfigErrors(errs).to_string();
    assert!(
        rendered.contains("g.toml:3:22: graph.max_in_flight_jobs:"),
        "{rendered}"
    );
    assert!(rendered.ends_with("2 errors found"), "{rendered}");
}

#[test]
fn bad_duration_names_the_field() {
    let errs = errors(
        "[graph]\nname = \"g\"\n[agents.a]\nkind = \"sim\"\nretry = { initial_delay = \"soon\" }\n",
    );
    let e = error_at(&errs, "agents.a.retry", 5, 27);
    assert!(e.message.contains("invalid duration \"soon\""), "{e}");
}

#[test]
fn unknown_kind_suggests_nearest() {
    let errs = errors("[graph]\nname = \"g\"\n[agents.a]\nkind = \"tempalte\"\n");
    let e = error_at(&errs, "agents.a.kind", 4, 8);
    assert!(e.message.contains("unknown agent kind \"tempalte\""), "{e}");
    assert_eq!(e.help.as_deref(), Some("did you mean \"template\"?"));
}

#[test]
fn unknown_dependency_and_quota_suggest_nearest() {
    let errs = errors(
        "[graph]\nname = \"g\"\n[quotas.llm]\nrequests_per_second = 5\n[agents.classify]\nkind = \"sim\"\n[agents.b]\nkind = \"sim\"\nafter = [\"clasify\"]\nquota = \"lm\"\n",
    );
    let e = error_at(&errs, "agents.b.after", 9, 10);
    assert!(e.message.contains("unknown agent \"clasify\""), "{e}");
    assert_eq!(e.help.as_deref(), Some("did you mean \"classify\"?"));
    let e = error_at(&errs, "agents.b.quota", 10, 9);
    assert!(e.message.contains("unknown quota \"lm\""), "{e}");
    assert!(
        e.help
            .as_deref()
            .unwrap()
            .starts_with("did you mean \"llm\"?"),
        "{e}"
    );
}

#[test]
fn cycle_reports_its_full_path() {
    let errs = errors(
        "[graph]\nname = \"g\"\n[agents.classify]\nkind = \"sim\"\nafter = [\"review\"]\n[agents.draft]\nkind = \"sim\"\nafter = [\"classify\"]\n[agents.review]\nkind = \"sim\"\nafter = [\"draft\"]\n",
    );
    let e = error_at(&errs, "agents.classify.after", 5, 10);
    assert_eq!(
        e.message,
        "dependency cycle: classify → draft → review → classify"
    );
}

#[test]
fn self_dependency_is_a_cycle() {
    let errs = errors("[graph]\nname = \"g\"\n[agents.a]\nkind = \"sim\"\nafter = [\"a\"]\n");
    let e = error_at(&errs, "agents.a.after", 5, 10);
    assert_eq!(e.message, "dependency cycle: a → a");
}

#[test]
fn duplicate_names_are_refused() {
    // Within one file the parser refuses a duplicate table; the error names the agent.
    let errs =
        errors("[graph]\nname = \"g\"\n[agents.a]\nkind = \"sim\"\n[agents.a]\nkind = \"sim\"\n");
    assert!(
        errs.iter()
            .any(|e| e.line == 5 && e.message.contains("agent \"a\" is defined twice")),
        "{errs:#?}"
    );
    // Across files, a graph or quota name may be used once per server.
    let dir = std::env::temp_dir().join(format!("cascade-dup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let a = dir.join("a.toml");
    let b = dir.join("b.toml");
    std::fs::write(
        &a,
        "[graph]\nname = \"g\"\n[quotas.q]\nmax_concurrency = 1\n[agents.x]\nkind = \"sim\"\n",
    )
    .unwrap();
    std::fs::write(
        &b,
        "[graph]\nname = \"g\"\n[quotas.q]\nmax_concurrency = 2\n[agents.x]\nkind = \"sim\"\n",
    )
    .unwrap();
    let errs = load_graph_files(&[a.clone(), b.clone()], &Registry::default())
        .unwrap_err()
        .0;
    let dup_graph = errs
        .iter()
        .find(|e| e.message.contains("graph \"g\" is declared twice"))
        .expect("graph dup");
    assert_eq!(
        (dup_graph.file.clone(), dup_graph.line, dup_graph.column),
        (b.clone(), 2, 8)
    );
    let dup_quota = errs
        .iter()
        .find(|e| e.message.contains("quota \"q\" is declared twice"))
        .expect("quota dup");
    assert_eq!((dup_quota.file.clone(), dup_quota.line), (b.clone(), 3));
    assert!(dup_quota.message.contains("a.toml:3:9"), "{dup_quota}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn empty_graph_is_refused() {
    let errs = errors("[graph]\nname = \"g\"\n");
    let e = error_at(&errs, "agents", 1, 1);
    assert_eq!(e.message, "the graph has no agents");
    let errs = errors("[graph]\nname = \"g\"\n[agents]\n");
    error_at(&errs, "agents", 3, 2);
}

#[test]
fn missing_required_fields_are_named() {
    let errs = errors(
        "[graph]\ndescription = \"x\"\n[agents.t]\nkind = \"template\"\n[agents.u]\nretry = {}\n",
    );
    let e = error_at(&errs, "graph.name", 1, 2);
    assert_eq!(e.message, "missing required field `name`");
    let e = error_at(&errs, "agents.t.output", 3, 9);
    assert!(
        e.message
            .contains("missing required field `output` for kind \"template\""),
        "{e}"
    );
    let e = error_at(&errs, "agents.u.kind", 5, 9);
    assert!(e.help.as_deref().unwrap().contains("\"sim\""), "{e}");
}

#[test]
fn kind_field_errors_point_into_the_value() {
    let errs = errors(
        "[graph]\nname = \"g\"\n[agents.s]\nkind = \"sim\"\nlatency = { lognormal = { median = \"1s\", sigma = -1.0 } }\n",
    );
    let e = error_at(&errs, "agents.s.latency.lognormal.sigma", 5, 50);
    assert!(e.message.contains("sigma"), "{e}");
}

#[test]
fn every_error_is_reported_at_once() {
    let errs = errors(
        "[graph]\nname = \"g\"\nmax_pending_jobs = -1\n[quotas.q]\n[agents.a]\nkind = \"sim\"\ntimeout = 5\nbogus = 1\n[agents.b]\nkind = \"nope\"\nafter = [\"zz\"]\n",
    );
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    for p in [
        "graph.max_pending_jobs",
        "quotas.q",
        "agents.a.timeout",
        "agents.a.bogus",
        "agents.b.kind",
        "agents.b.after",
    ] {
        assert!(paths.contains(&p), "missing {p} in {paths:?}");
    }
    // Sorted by position.
    let lines: Vec<usize> = errs.iter().map(|e| e.line).collect();
    let mut sorted = lines.clone();
    sorted.sort();
    assert_eq!(lines, sorted);
}

#[test]
fn quota_needs_a_limit_and_one_rate_per_kind() {
    let errs = errors(
        "[graph]\nname = \"g\"\n[quotas.a]\ndescription = \"x\"\n[quotas.b]\nrequests_per_second = 1\nrequests_per_minute = 60\n[agents.x]\nkind = \"sim\"\n",
    );
    assert!(
        error_at(&errs, "quotas.a", 3, 9)
            .message
            .contains("at least one limit")
    );
    assert!(
        error_at(&errs, "quotas.b", 5, 9)
            .message
            .contains("both requests_per_second")
    );
}

#[test]
fn a_quota_may_only_learn_from_its_upstream() {
    let m = crate::config::parse_graph_str(
        "g.toml",
        "[quotas.llm]\nlearn_from_upstream = true\n[graph]\nname = \"g\"\n[agents.x]\nkind = \"sim\"\nquotas = [\"llm\"]\n",
        &Default::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let q = &m.quotas["llm"];
    assert!(q.learn_from_upstream && q.learns() && q.requests.is_none());
    let errs = errors(
        "[quotas.llm]\nlearn_from_upstream = \"yes\"\n[graph]\nname = \"g\"\n[agents.x]\nkind = \"sim\"\n",
    );
    assert!(
        error_at(&errs, "quotas.llm.learn_from_upstream", 2, 23)
            .message
            .contains("bool"),
        "{errs:?}"
    );
}

#[test]
fn a_quota_may_hold_dollars_per_hour_or_day() {
    let m = crate::config::parse_graph_str(
        "g.toml",
        "[quotas.spend]\ncost_usd_per_day = 50\n[quotas.hourly]\ncost_usd_per_hour = 2.5\n[graph]\nname = \"g\"\n[agents.x]\nkind = \"sim\"\nquotas = [\"spend\", \"hourly\"]\n",
        &Default::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let day = m.quotas["spend"].cost.unwrap();
    assert_eq!(
        (day.amount.get(), day.period.as_secs()),
        (50_000_000, 86_400)
    );
    assert_eq!(crate::quota::cost_text(&day), "$50/day");
    let hour = m.quotas["hourly"].cost.unwrap();
    assert_eq!(
        (hour.amount.get(), hour.period.as_secs()),
        (2_500_000, 3_600)
    );
    let errs = errors(
        "[quotas.spend]\ncost_usd_per_day = -1\n[graph]\nname = \"g\"\n[agents.x]\nkind = \"sim\"\n",
    );
    assert!(
        error_at(&errs, "quotas.spend.cost_usd_per_day", 2, 20)
            .message
            .contains("not an amount of dollars"),
        "{errs:?}"
    );
    let errs = errors(
        "[quotas.spend]\ncost_usd_per_day = 1\ncost_usd_per_hour = 1\n[graph]\nname = \"g\"\n[agents.x]\nkind = \"sim\"\n",
    );
    assert!(
        errs.iter().any(|e| e
            .message
            .contains("both cost_usd_per_hour and cost_usd_per_day")),
        "{errs:?}"
    );
}

#[test]
fn a_table_or_key_defined_twice_is_named_with_its_first_line() {
    let errs = errors(
        "[graph]\nname = \"d\"\n[agents.a]\nkind = \"sim\"\n[agents.b]\nkind = \"sim\"\n[agents.a]\nkind = \"sim\"\n",
    );
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].line, 7);
    assert!(
        errs[0].message.contains("agent \"a\" is defined twice")
            && errs[0].message.contains("line 3"),
        "{}",
        errs[0]
    );
    let errs = errors(
        "[graph]\nname = \"d\"\n[agents.a]\nkind = \"sim\"\nlatency = \"1ms\"\nkind = \"sim\"\n",
    );
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].line, 6);
    assert!(
        errs[0]
            .message
            .contains("kind is set twice in this table: first at line 4"),
        "{}",
        errs[0]
    );
}

#[test]
fn prices_are_read_from_the_server_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cascade.toml");
    std::fs::write(
        &cfg,
        "[prices.\"gpt-4o-mini\"]\nprompt_per_million = 0.15\ncompletion_per_million = 0.60\n",
    )
    .unwrap();
    let m = load(Some(&cfg), &[], &Registry::default()).unwrap();
    assert_eq!(
        m.prices["gpt-4o-mini"],
        cascade_agents::llm::Price {
            prompt_per_million: 0.15,
            completion_per_million: 0.60
        }
    );
    std::fs::write(
        &cfg,
        "[prices.m]\nprompt_per_million = -1\ncompletion_per_million = 1\n[prices.n]\nprompt_per_million = 1\ncompletion = 2\n",
    )
    .unwrap();
    let errs = load(Some(&cfg), &[], &Registry::default()).unwrap_err().0;
    assert!(
        errs.iter()
            .any(|e| e.line == 2 && e.message.contains(">= 0")),
        "{errs:?}"
    );
    assert!(
        errs.iter().any(|e| e
            .message
            .contains("missing required field `completion_per_million`")),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.line == 6 && e.message.contains("completion")),
        "{errs:?}"
    );
}

#[test]
fn syntax_error_has_position() {
    let errs = errors("[graph]\nname = \"g\n");
    assert!(
        errs[0].message.starts_with("TOML syntax error"),
        "{}",
        errs[0]
    );
    assert_eq!(errs[0].line, 2);
}

#[test]
fn invalid_names_are_refused() {
    let errs = errors("[graph]\nname = \"my graph\"\n[agents.\"a b\"]\nkind = \"sim\"\n");
    assert!(
        error_at(&errs, "graph.name", 2, 8)
            .message
            .contains("invalid name")
    );
    assert!(
        error_at(&errs, "agents.a b", 3, 9)
            .message
            .contains("invalid name")
    );
}

#[test]
fn server_config_lists_graph_dirs_and_shared_quotas() {
    let dir = std::env::temp_dir().join(format!("cascade-srv-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("graphs")).unwrap();
    std::fs::write(
        dir.join("cascade.toml"),
        "graphs = [\"graphs\"]\n[server]\ngrpc_addr = \"127.0.0.1:1\"\n[quotas.llm]\ntokens_per_minute = 1000\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("graphs/one.toml"),
        "[graph]\nname = \"one\"\n[agents.a]\nkind = \"sim\"\nquota = \"llm\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("graphs/two.toml"),
        "[graph]\nname = \"two\"\n[agents.b]\nkind = \"sim\"\nquotas = [\"llm\"]\n",
    )
    .unwrap();
    let m = load(Some(&dir.join("cascade.toml")), &[], &Registry::default()).unwrap();
    assert_eq!(m.graphs.len(), 2);
    assert_eq!(m.server.grpc_addr.as_deref(), Some("127.0.0.1:1"));
    assert_eq!(&*m.graph("two").unwrap().agents[0].quotas[0], "llm");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn literal_secrets_are_a_load_error_that_does_not_echo_them() {
    let dir = std::env::temp_dir().join(format!("cascade-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("cascade.toml");
    std::fs::write(
        &cfg,
        "[server]\nwebhook_secret = \"whsec_live_abc123\"\ncallback_secret = \"env:CB\"\n",
    )
    .unwrap();
    let errs = load(Some(&cfg), &[], &Registry::default()).unwrap_err().0;
    assert_eq!(errs.len(), 1);
    let e = &errs[0];
    assert_eq!(
        (e.path.as_str(), e.line, e.column),
        ("server.webhook_secret", 2, 18)
    );
    assert!(e.message.contains("env:NAME"), "{e}");
    assert!(!e.to_string().contains("whsec_live_abc123"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Load a `cascade.toml` holding `text` (and no graphs).
fn load_server_config(tag: &str, text: &str) -> Result<ServerModel, ConfigErrors> {
    let dir = std::env::temp_dir().join(format!("cascade-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("cascade.toml");
    std::fs::write(&cfg, text).unwrap();
    let result = load(Some(&cfg), &[], &Registry::default());
    std::fs::remove_dir_all(&dir).unwrap();
    result
}

#[test]
fn telemetry_is_off_by_default_and_read_when_given() {
    let m = load_server_config("otel-none", "[server]\n").unwrap();
    assert_eq!(m.telemetry.otlp_endpoint, None);
    assert_eq!(m.telemetry.filter, TelemetrySettings::DEFAULT_FILTER);

    let m = load_server_config(
        "otel-all",
        "[telemetry]\notlp_endpoint = \"http://127.0.0.1:4317\"\nservice_name = \"cascade-eu\"\n\
         sample_ratio = 0.25\nfilter = \"cascade_orchestrator=info\"\ntimeout = \"3s\"\n\
         headers = { X-Api-Key = \"env:OTLP_KEY\" }\n",
    )
    .unwrap();
    let t = &m.telemetry;
    assert_eq!(t.otlp_endpoint.as_deref(), Some("http://127.0.0.1:4317"));
    assert_eq!(t.service_name, "cascade-eu");
    assert_eq!(t.sample_ratio, 0.25);
    assert_eq!(t.filter, "cascade_orchestrator=info");
    assert_eq!(t.timeout, Duration::from_secs(3));
    let headers: Vec<(String, String)> = t
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.to_string()))
        .collect();
    assert_eq!(
        headers,
        [("x-api-key".to_string(), "env:OTLP_KEY".to_string())]
    );
}

#[test]
fn bad_telemetry_values_are_each_reported_where_they_are() {
    let errs = load_server_config(
        "otel-bad",
        "[telemetry]\notlp_endpoint = \"127.0.0.1:4317\"\nsample_ratio = 1.5\n\
         filter = \"cascade=loud\"\nheaders = { \"bad key\" = \"env:K\", api = \"sk-live-123\" }\n\
         exporter = \"otlp\"\ntimeout = \"0s\"\n",
    )
    .unwrap_err()
    .0;
    let at = |path: &str| {
        errs.iter()
            .find(|e| e.path == path)
            .unwrap_or_else(|| panic!("no error at {path}: {errs:#?}"))
    };
    let e = at("telemetry.otlp_endpoint");
    assert_eq!((e.line, e.column), (2, 17), "{e}");
    assert!(
        e.help.as_deref().unwrap().contains("http://127.0.0.1:4317"),
        "{e}"
    );
    assert_eq!(at("telemetry.sample_ratio").line, 3);
    assert_eq!(at("telemetry.filter").line, 4);
    assert!(
        at("telemetry.headers.bad key")
            .message
            .contains("metadata name")
    );
    let literal = at("telemetry.headers.api");
    assert!(literal.message.contains("env:NAME"), "{literal}");
    assert!(!literal.to_string().contains("sk-live-123"), "{literal}");
    let unknown = at("telemetry.exporter");
    assert_eq!(unknown.line, 6, "{unknown}");
    assert_eq!(at("telemetry.timeout").line, 7);
    assert_eq!(errs.len(), 7, "{errs:#?}");
}

#[test]
fn a_named_credential_is_shared_and_has_its_own_quota() {
    // SAFETY: a variable only this test reads.
    unsafe { std::env::set_var("CASCADE_TEST_CRED_SECRET", "s3cret") };
    let text = r#"[credentials.crm]
oauth2 = { token_url = "http://127.0.0.1:9/token", client_id = "cascade", client_secret = "env:CASCADE_TEST_CRED_SECRET" }
[graph]
name = "g"
[agents.lookup]
kind = "http"
url = "http://127.0.0.1:9/customers"
auth = "crm"
[agents.write]
kind = "http"
method = "POST"
url = "http://127.0.0.1:9/notes"
auth = "crm"
[agents.inline]
kind = "http"
url = "http://127.0.0.1:9/other"
auth = { oauth2 = { token_url = "http://127.0.0.1:9/token", client_id = "x", client_secret = "env:CASCADE_TEST_CRED_SECRET" } }
"#;
    let m = compile(text).unwrap_or_else(|e| panic!("{e}"));
    let g = &m.graphs[0];
    let quotas = |a: &str| {
        g.agents
            .iter()
            .find(|x| &*x.name == a)
            .unwrap()
            .quotas
            .iter()
            .map(|q| q.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        quotas("lookup"),
        ["upstream:http://127.0.0.1:9", "credential:crm"]
    );
    assert_eq!(
        quotas("write"),
        ["upstream:http://127.0.0.1:9", "credential:crm"]
    );
    // An inline credential is named after its agent.
    assert_eq!(
        quotas("inline"),
        ["upstream:http://127.0.0.1:9", "credential:g.inline"]
    );
    let q = &m.quotas["credential:crm"];
    assert!(q.credential && !q.learns() && q.requests.is_none() && q.circuit_breaker.is_none());

    // An unknown name, and a credential that is not one auth form, are located.
    let errs = errors(
        "[credentials.two]\nbearer = \"env:A\"\nbasic = { username = \"u\", password = \"env:B\" }\n[graph]\nname = \"g\"\n[agents.x]\nkind = \"http\"\nurl = \"http://127.0.0.1:9/\"\nauth = \"crn\"\n",
    );
    let e = error_at(&errs, "credentials.two", 1, 14);
    assert!(e.message.contains("exactly one of"), "{e}");
    let e = error_at(&errs, "agents.x.auth", 9, 8);
    assert!(e.message.contains("unknown credential \"crn\""), "{e}");
}

#[test]
fn a_graph_may_declare_its_inputs_schema() {
    let m = compile(
        "[graph]\nname = \"g\"\ninput_schema = { type = \"object\", required = [\"id\"] }\n[agents.a]\nkind = \"sim\"\n",
    )
    .unwrap();
    assert_eq!(
        m.graphs[0].input_schema.as_ref().unwrap()["required"],
        serde_json::json!(["id"])
    );
    let errs = errors(
        "[graph]\nname = \"g\"\ninput_schema = { type = \"objekt\" }\n[agents.a]\nkind = \"sim\"\n",
    );
    let e = error_at(&errs, "graph.input_schema", 3, 16);
    assert!(e.message.contains("not a valid JSON Schema"), "{e}");
}

#[test]
fn approval_settings_load_and_bad_ones_are_located() {
    let agent =
        |extra: &str| format!("[graph]\nname = \"g\"\n[agents.pay]\nkind = \"sim\"\n{extra}\n");
    for (extra, needs) in [
        ("irreversible = true", true),
        ("approval = \"required\"", true),
        ("irreversible = true\napproval = \"never\"", false),
        ("", false),
        ("approval = \"none\"", false),
        ("approval = \"auto\"", false),
        (
            "approval_when = \"input.amount > 1000\"\napproval_timeout = \"2h\"",
            true,
        ),
    ] {
        let m = compile(&agent(extra)).unwrap_or_else(|e| panic!("{extra}: {e}"));
        let a = &m.graphs[0].agents[0];
        assert_eq!(a.may_need_approval(), needs, "{extra}");
    }
    let m = compile(&agent("approval_when = \"input.amount > 1000\"\napproval_timeout = \"2h\"\napproval_webhook = \"https://hooks.example.com/x\"")).unwrap();
    let a = &m.graphs[0].agents[0];
    assert_eq!(
        a.approval_when.as_ref().unwrap().source(),
        "input.amount > 1000"
    );
    assert_eq!(
        a.approval_timeout,
        Some(std::time::Duration::from_secs(7200))
    );
    assert_eq!(
        a.approval_webhook.as_deref(),
        Some("https://hooks.example.com/x")
    );

    let errs = errors(&agent("approval_when = \"input.amount >\""));
    let e = error_at(&errs, "agents.pay.approval_when", 5, 17);
    assert!(e.message.contains("not a valid expression"), "{e}");
    assert!(
        e.help.as_deref().unwrap().contains("input.amount > 1000"),
        "{e:?}"
    );
    let errs = errors(&agent("approval_when = \"{{ input.x }}\""));
    let e = error_at(&errs, "agents.pay.approval_when", 5, 17);
    assert!(e.message.contains("without braces"), "{e}");
    let errs = errors(&agent("approval = \"never\"\napproval_when = \"input.x\""));
    let e = error_at(&errs, "agents.pay.approval_when", 6, 17);
    assert!(e.message.contains("contradict"), "{e}");
    let errs = errors(&agent("approval_timeout = \"soon\""));
    error_at(&errs, "agents.pay.approval_timeout", 5, 20);
}

#[test]
fn a_tool_using_agent_takes_tool_approval_not_approval() {
    let errs = errors(
        r#"[graph]
name = "g"

[agents.triage]
kind = "llm"
model = "m"
base_url = "http://127.0.0.1:1/v1"
prompt = "p"
tools = ["desk.*"]
approval = "required"
"#,
    );
    let e = error_at(&errs, "agents.triage.approval", 10, 12);
    assert!(e.message.contains("tool calls"), "{e}");
    assert!(
        e.help.as_deref().unwrap_or("").contains("tool_approval"),
        "{e}"
    );
}

#[test]
fn server_tls_files_are_checked_at_load_and_limits_read() {
    let errs = load_server_config(
        "tls-missing",
        "[server]\ntls = { cert = \"nope.crt\", key = \"nope.key\" }\n\n[server.limits]\nconnections_per_address = 16\n",
    )
    .unwrap_err()
    .0;
    let e = errs
        .iter()
        .find(|e| e.path == "server.tls")
        .expect("tls error");
    assert_eq!((e.line, e.column), (2, 7), "{e}");
    assert!(e.message.contains("nope.crt"), "{e}");
    let errs = load_server_config(
        "tls-unknown",
        "[server.tls]\ncert = \"a\"\nkey = \"b\"\nclient_cert = \"c\"\n",
    )
    .unwrap_err()
    .0;
    assert!(
        errs.iter().any(|e| e.message.contains("client_cert")),
        "{errs:?}"
    );
    let m =
        load_server_config("limits", "[server.limits]\nconnections_per_address = 16\n").unwrap();
    assert_eq!(m.server.limits.connections_per_address, 16);
    assert!(m.server.tls.is_none());
}

#[test]
fn tenants_and_tenant_shares_are_read_and_checked() {
    let m = load_server_config(
        "tenants-ok",
        "[tenants.acme]\nmax_pending_jobs = 5\nsubmissions_per_second = 2.5\n\n\
         [quotas.llm]\nmax_concurrency = 10\ntenant_share = { acme = 0.5, globex = 0.25 }\n",
    )
    .unwrap();
    let acme = &m.tenants["acme"];
    assert_eq!(acme.max_pending_jobs.map(|n| n.get()), Some(5));
    assert_eq!(acme.submissions_per_second, Some(2.5));
    let llm = &m.quotas["llm"];
    assert_eq!(
        llm.tenant_share,
        vec![("acme".into(), 0.5), ("globex".into(), 0.25)]
    );
    let half = llm.share_for("acme", 0.5);
    assert_eq!(half.max_concurrency.map(|n| n.get()), Some(5));
    assert_eq!(
        llm.share_for("x", 0.01).max_concurrency.map(|n| n.get()),
        Some(1)
    );

    let errs = load_server_config(
        "tenants-bad",
        "[tenants.acme]\nmax_pending_jobs = 0\n\n[tenants.globex]\nsubmissions_per_second = -1\n\n\
         [quotas.llm]\nlearn_from_upstream = true\ntenant_share = { acme = 1.5 }\n",
    )
    .unwrap_err()
    .0;
    let text = errs
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(text.contains("tenants"), "{text}");
    assert!(text.contains("quotas.llm.tenant_share"), "{text}");
    assert!(text.contains("1.5"), "{text}");
    assert!(text.contains("a share of no limit"), "{text}");
}

const TRIGGERS: &str = r#"[graph]
name = "desk"
tenants = ["acme"]

[[graph.triggers]]
name = "new-ticket"
kind = "webhook"
verify = "zendesk"
secret = "env:ZENDESK_SECRET"
when = "event.ticket.status == 'new'"
input = { ticket = "{{= event.ticket.id }}" }

[[graph.triggers]]
name = "bus"
kind = "nats"
url = "nats://127.0.0.1:4222"
stream = "TICKETS"
subject = "tickets.created"
consumer = "cascade"
dead_letter = "tickets.dead"
max_deliveries = 3
batch = 50

[[graph.triggers]]
name = "queue"
kind = "redis_stream"
url = "redis://127.0.0.1:6379"
stream = "tickets"
group = "cascade"
claim_after = "30s"

[[graph.triggers]]
name = "morning"
kind = "schedule"
cron = "0 7 * * MON-FRI"
timezone = "Europe/Paris"
catch_up = "none"

[agents.a]
kind = "sim"
"#;

#[test]
fn triggers_of_every_kind_load_with_their_defaults() {
    let model = compile(TRIGGERS).unwrap();
    let g = model.graph("desk").unwrap();
    let names: Vec<&str> = g.triggers.iter().map(|t| &*t.name).collect();
    assert_eq!(names, ["new-ticket", "bus", "queue", "morning"]);
    // The graph's only tenant is every trigger's.
    assert!(g.triggers.iter().all(|t| &*t.tenant == "acme"));
    let crate::triggers::TriggerSource::Nats(n) = &g.triggers[1].source else {
        panic!("{:?}", g.triggers[1].source)
    };
    assert_eq!((n.dead_letter.max_deliveries, n.batch), (3, 50));
    assert_eq!(n.dead_letter.target.as_deref(), Some("tickets.dead"));
    let crate::triggers::TriggerSource::RedisStream(r) = &g.triggers[2].source else {
        panic!()
    };
    assert_eq!(
        (
            r.claim_after,
            r.field.as_str(),
            r.dead_letter.max_deliveries
        ),
        (Duration::from_secs(30), "payload", 5)
    );
    assert!(r.consumer.starts_with("cascade-"), "{}", r.consumer);
    let crate::triggers::TriggerSource::Schedule(s) = &g.triggers[3].source else {
        panic!()
    };
    assert_eq!(s.catch_up, crate::triggers::schedule::CatchUp::None);
    assert!(s.every.describe().contains("Europe/Paris"));
}

#[test]
fn trigger_errors_name_the_field_with_its_position() {
    let bad = TRIGGERS
        .replace("verify = \"zendesk\"", "verify = \"zendsk\"")
        .replace(
            "when = \"event.ticket.status == 'new'\"",
            "when = \"event.ticket.status ==\"",
        )
        .replace("cron = \"0 7 * * MON-FRI\"", "cron = \"0 7 * * FUNDAY\"")
        .replace("timezone = \"Europe/Paris\"", "timezone = \"Mars/Olympus\"")
        .replace("batch = 50", "batch = 50\nbacth = 2")
        .replace(
            "url = \"redis://127.0.0.1:6379\"",
            "url = \"http://127.0.0.1:6379\"",
        );
    let errs = errors(&bad);
    let verify = error_at(&errs, "graph.triggers[0].verify", 8, 10);
    assert!(verify.message.contains("unknown provider"), "{verify}");
    assert!(
        verify.help.as_deref().unwrap_or("").contains("zendesk"),
        "{verify}"
    );
    let typo = error_at(&errs, "graph.triggers[1].bacth", 23, 1);
    assert!(
        typo.help.as_deref().unwrap_or("").contains("batch"),
        "{typo}"
    );
    let url = error_at(&errs, "graph.triggers[2].url", 28, 7);
    assert!(url.message.contains("not a redis URL"), "{url}");
    // The time zone is checked before the cron expression of the same trigger.
    let tz = error_at(&errs, "graph.triggers[3].timezone", 37, 12);
    assert!(tz.message.contains("Mars/Olympus"), "{tz}");
    // A `when` that does not parse is an error where it is written, not at the first event.
    assert!(
        errs.iter().any(|e| e.path == "graph.triggers[0].when"),
        "{errs:#?}"
    );

    let bad_cron = TRIGGERS.replace("cron = \"0 7 * * MON-FRI\"", "cron = \"0 7 * * FUNDAY\"");
    let e = error_at(&errors(&bad_cron), "graph.triggers[3].cron", 35, 8);
    assert!(e.message.contains("invalid cron expression"), "{e}");

    // Several tenants: the trigger must say whose jobs it starts; a webhook needs its secret.
    let several = TRIGGERS
        .replace("tenants = [\"acme\"]", "tenants = [\"acme\", \"globex\"]")
        .replace("secret = \"env:ZENDESK_SECRET\"\n", "");
    let errs = errors(&several);
    assert!(
        errs.iter()
            .any(|e| e.path == "graph.triggers[1].tenant" && e.message.contains("several tenants")),
        "{errs:#?}"
    );
    assert!(
        errs.iter().any(|e| e.path == "graph.triggers[0].secret"),
        "{errs:#?}"
    );
    // A template that refers to nothing it can see fails when an event comes, as an invalid
    // event; one that does not parse fails here.
    let broken = TRIGGERS.replace("{{= event.ticket.id }}", "{{= event.ticket.id ");
    let e = errors(&broken);
    assert!(
        e.iter().any(|e| e.path == "graph.triggers[0].input"),
        "{e:#?}"
    );
}

#[test]
fn trigger_urls_carry_no_credentials_and_durations_do_not_spin() {
    let bad = TRIGGERS
        .replace(
            "nats://127.0.0.1:4222",
            "nats://cascade:hunter2@127.0.0.1:4222",
        )
        .replace("claim_after = \"30s\"", "claim_after = \"0s\"")
        .replace(
            "secret = \"env:ZENDESK_SECRET\"",
            "secret = \"env:ZENDESK_SECRET\"\ntolerance = \"1h\"",
        );
    let errs = errors(&bad);
    let url = errs
        .iter()
        .find(|e| e.path == "graph.triggers[1].url")
        .unwrap_or_else(|| panic!("{errs:#?}"));
    assert!(url.message.contains("user or password"), "{url}");
    // The credential is not repeated in the error.
    assert!(!url.to_string().contains("hunter2"), "{url}");
    assert!(
        errs.iter()
            .any(|e| e.path == "graph.triggers[2].claim_after"),
        "{errs:#?}"
    );
    assert!(
        errs.iter().any(|e| e.path == "graph.triggers[0].tolerance"),
        "{errs:#?}"
    );
}

#[test]
fn the_store_is_sqlite_memory_or_a_postgres_url_without_a_password() {
    let at = |errs: &[ConfigError], path: &str, line: usize, column: usize| {
        let e = errs
            .iter()
            .find(|e| e.path == path)
            .unwrap_or_else(|| panic!("no error at {path}: {errs:#?}"))
            .clone();
        assert_eq!((e.line, e.column), (line, column), "position of {e}");
        e
    };
    let m = load_server_config("store-default", "[server]\n").unwrap();
    assert_eq!(m.server.store, StoreSetting::Sqlite);
    let m = load_server_config(
        "store-pg",
        "[server]\nstore = \"postgres://cascade@db.internal:5432/jobs\"\nstore_password = \"env:PGPASSWORD\"\n",
    )
    .unwrap();
    assert_eq!(
        m.server.store,
        StoreSetting::Postgres("postgres://cascade@db.internal:5432/jobs".into())
    );
    assert!(m.server.store_password.is_some());
    let m = load_server_config("store-mem", "[server]\nstore = \"memory\"\n").unwrap();
    assert_eq!(m.server.store, StoreSetting::Memory);

    for (tag, value, says) in [
        ("store-pass", "postgres://u:hunter2@h/db", "store_password"),
        ("store-nodb", "postgres://u@h:5432", "no database"),
        ("store-what", "mysql://u@h/db", "unknown store"),
    ] {
        let errs = load_server_config(tag, &format!("[server]\nstore = \"{value}\"\n"))
            .unwrap_err()
            .0;
        let e = at(&errs, "server.store", 2, 9);
        assert!(e.message.contains(says), "{e}");
        assert!(
            !e.to_string().contains("hunter2"),
            "the password is echoed: {e}"
        );
        assert!(
            e.help.as_deref().unwrap_or("").contains("store_password"),
            "{e}"
        );
    }
    let errs = load_server_config("store-pw-alone", "[server]\nstore_password = \"env:X\"\n")
        .unwrap_err()
        .0;
    let e = at(&errs, "server.store_password", 2, 18);
    assert!(
        e.help.as_deref().unwrap_or("").contains("postgres://"),
        "{e}"
    );

    // The shared quota backend: Redis, beside a PostgreSQL store.
    let pg = "store = \"postgres://cascade@db/jobs\"\n";
    let m = load_server_config(
        "quota-redis",
        &format!("[server]\n{pg}quota_backend = \"rediss://redis.internal:6380\"\nquota_backend_password = \"env:REDIS_PASSWORD\"\nquota_fallback = \"closed\"\n"),
    )
    .unwrap();
    assert_eq!(
        m.server.quota_backend.as_deref(),
        Some("rediss://redis.internal:6380")
    );
    assert!(m.server.quota_backend_password.is_some());
    assert_eq!(
        m.server.quota_fallback,
        crate::quota::shared::QuotaFallback::Closed
    );
    for (tag, text, path, says, help) in [
        (
            "quota-pass",
            format!("[server]\n{pg}quota_backend = \"redis://:hunter2@r:6379\"\n"),
            "server.quota_backend",
            "quota_backend_password",
            "redis://",
        ),
        (
            "quota-scheme",
            format!("[server]\n{pg}quota_backend = \"memcached://r\"\n"),
            "server.quota_backend",
            "unknown scheme",
            "redis://",
        ),
        (
            "quota-sqlite",
            "[server]\nquota_backend = \"redis://r:6379\"\n".to_string(),
            "server.quota_backend",
            "not PostgreSQL",
            "postgres://",
        ),
        (
            "quota-fallback",
            format!("[server]\n{pg}quota_backend = \"redis://r\"\nquota_fallback = \"open\"\n"),
            "server.quota_fallback",
            "unknown quota_fallback",
            "local_share",
        ),
        (
            "quota-pw-alone",
            format!("[server]\n{pg}quota_backend_password = \"env:X\"\n"),
            "server.quota_backend_password",
            "none is set",
            "redis://",
        ),
    ] {
        let errs = load_server_config(tag, &text).unwrap_err().0;
        let e = errs
            .iter()
            .find(|e| e.path == path)
            .unwrap_or_else(|| panic!("no error at {path}: {errs:#?}"));
        assert!(e.message.contains(says), "{e}");
        assert!(e.help.as_deref().unwrap_or("").contains(help), "{e}");
        assert!(
            !e.to_string().contains("hunter2"),
            "the password is echoed: {e}"
        );
        assert!(e.line >= 2, "{e}");
    }
}

#[test]
fn the_real_kinds_field_errors_are_located() {
    // SAFETY: a variable only this test reads.
    unsafe { std::env::set_var("CASCADE_TEST_REAL_KINDS_KEY", "k") };
    let text = r#"[graph]
name = "g"
[agents.ask]
kind = "llm"
model = "gpt-4o-mini"
prompt = "hi"
api_key = "env:CASCADE_TEST_SURELY_UNSET_KEY"
[agents.shape]
kind = "llm"
model = "gpt-4o-mini"
prompt = "hi"
api_key = "env:CASCADE_TEST_REAL_KINDS_KEY"
response = "json"
schema = { type = "no-such-type" }
[agents.call]
kind = "http"
url = "https://api.example.com/x"
auth = { bearer = "sk-live-literal" }
[agents.run]
kind = "command"
program = "true"
env = { TOKEN = "env:CASCADE_TEST_SURELY_UNSET_TOKEN" }
"#;
    let errs = errors(text);
    let e = error_at(&errs, "agents.ask.api_key", 7, 11);
    assert!(e.message.contains("CASCADE_TEST_SURELY_UNSET_KEY"), "{e}");
    let e = error_at(&errs, "agents.shape.schema", 14, 1);
    assert!(e.message.contains("not a valid JSON Schema"), "{e}");
    let e = error_at(&errs, "agents.call.auth", 18, 1);
    assert!(
        e.message.contains("bearer: a secret must be a reference")
            && !e.message.contains("sk-live-literal"),
        "{e}"
    );
    let e = error_at(&errs, "agents.run.env.TOKEN", 22, 17);
    assert!(e.message.contains("CASCADE_TEST_SURELY_UNSET_TOKEN"), "{e}");
}
