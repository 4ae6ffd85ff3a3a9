//! What the benchmarks share: reading a process's figures from `/proc`, asking a local HTTP
//! endpoint (etcd's `/health` and `/metrics`).

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

/// The whole response (status line, headers, body) to `GET path` on 127.0.0.1:`port`
/// (HTTP/1.0); `None` when it cannot be had within 2 s.
// Each benchmark compiles this module on its own, and the fleet benchmark asks no HTTP.
#[allow(dead_code)]
pub(crate) fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}
