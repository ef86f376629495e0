//! A graph file, any bytes: the loader answers a model or located errors, and never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let registry = cascade_orchestrator::agents::Registry::default();
    if let Err(errors) = cascade_orchestrator::config::parse_graph_str("fuzz.toml", text, &registry)
    {
        // Every error renders (file, line, column, help) without panicking.
        let _ = errors.to_string();
    }
});
