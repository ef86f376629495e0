//! Helpers shared by the benchmarks.

// Every benchmark compiles this module on its own and uses only some of it.
#![allow(dead_code)]

/// The environment variable `name` parsed, or `default` when it is not set.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| {
            panic!("{name}={v:?} is not a valid value; unset it or give a number")
        }),
        Err(_) => default,
    }
}

/// The runtime every benchmark measures on: two worker threads, as the machine has two cores.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}
