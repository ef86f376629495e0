//! Helpers shared by the end-to-end tests.

// Every test binary compiles this module on its own and uses only some of it.
#![allow(dead_code)]

use std::sync::Once;

use cascade_orchestrator::{Orchestrator, config};

/// Simulated panics are expected in tests; keep them out of the test output.
pub fn quiet_simulated_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .unwrap_or_default();
            if !msg.starts_with("simulated panic") {
                default(info);
            }
        }));
    });
}

/// An orchestrator running the graph in `toml` (panics with the config errors if it is bad).
pub async fn start(toml: &str) -> Orchestrator {
    let model = config::parse_graph_str("test.toml", toml, &Default::default())
        .unwrap_or_else(|e| panic!("{e}"));
    Orchestrator::builder(model).start().await.unwrap()
}
