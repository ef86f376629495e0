//! A job's input, any bytes, down the path a submission takes: the nesting limit, the JSON
//! parse, then the templates a graph renders its steps' requests from (fixed: graph authors
//! write them; the input is what callers send).
#![no_main]

use std::sync::{Arc, OnceLock};

use cascade_agents::template::JsonTemplate;
use cascade_agents::{CallContext, StepInput};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

fn templates() -> &'static Vec<JsonTemplate> {
    static T: OnceLock<Vec<JsonTemplate>> = OnceLock::new();
    T.get_or_init(|| {
        [
            json!({"ticket": "{{ input.ticket_id }}", "n": "{{= input.items | length }}"}),
            json!({"text": "{% for i in input.items %}{{ i.name | upper }},{% endfor %}"}),
            json!({"url": "https://api.example.com/t/{{ input.id | urlencode }}?q={{ input.q }}"}),
            json!({"body": "{{= input }}", "dep": "{{= deps.classify.label | default('none') }}"}),
            json!({"prompt": "Summarize: {{ input.text | truncate(200) }} ({{ job.id }})"}),
        ]
        .iter()
        .map(|t| JsonTemplate::compile(t, &["output"]).expect("valid templates"))
        .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    if cascade_orchestrator::limits::json_depth_over(data, 64) {
        return;
    }
    let Ok(input) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let ctx = CallContext {
        job_id: "0193a8f0-0000-7000-8000-000000000000".into(),
        graph: "fuzz".into(),
        agent: "step".into(),
        attempt: 1,
        idempotency_key: "0193a8f0-0000-7000-8000-000000000000/step".into(),
        deadline: None,
        job_key: None,
    };
    let input = Arc::new(input);
    let step = StepInput {
        input: input.clone(),
        deps: vec![("classify".into(), input)],
    };
    for t in templates() {
        // An error (a missing field, a filter on the wrong type) is the step's; never a panic.
        let _ = t.render(&ctx, &step);
    }
});
