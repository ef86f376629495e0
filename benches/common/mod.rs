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

/// CPU time of this process so far (user + system), from `/proc/self/stat`, in seconds.
pub fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // The fields after the command name (in parentheses, and it may hold spaces).
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // utime and stime (fields 14 and 15 of the line), in clock ticks of 1/100 s.
    (f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")) as f64 / 100.0
}

/// Resident memory of this process now, from `/proc/self/status` (0 where there is none).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
