//! What the benchmarks share: reading a process's figures from `/proc`.

/// CPU seconds (user + system) of process `pid` so far, from `/proc/<pid>/stat`; 0 once it is
/// gone.
pub(crate) fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces and parentheses: fields are counted after its last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 (utime, stime), counted after the command name: indices 11 and 12.
    (ticks(11) + ticks(12)) / 100.0
}
