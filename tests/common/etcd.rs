//! A real etcd cluster for tests: 1 or 3 members from Debian's `etcd-server` (`/usr/bin/etcd`)
//! on free loopback ports in a temp dir. Members can be SIGKILLed and the leader found; every
//! member is killed when the cluster is dropped.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Where Debian's `etcd-server` puts the binary.
pub const ETCD: &str = "/usr/bin/etcd";

/// One member process.
pub struct Member {
    /// Client port on 127.0.0.1.
    pub client_port: u16,
    child: Option<Child>,
}

/// A running cluster; killed on drop.
pub struct EtcdCluster {
    _dir: TempDir,
    /// The members, in start order.
    pub members: Vec<Member>,
}

impl EtcdCluster {
    /// Starts `n` members and waits until every one is healthy. `None` (after a loud skip
    /// message) when etcd is not installed and `CI` is unset; panics on CI.
    pub fn start(n: usize) -> Option<Self> {
        if !super::require_tool(
            "etcd",
            Path::new(ETCD).exists(),
            "apt-get install etcd-server",
        ) {
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let ports: Vec<(u16, u16)> = (0..n)
            .map(|_| (super::free_port(), super::free_port()))
            .collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}"))
            .collect();
        let token = format!("lanyard-test-{}", ports[0].0);
        let members = ports
            .iter()
            .enumerate()
            .map(|(i, (cp, pp))| {
                let log = std::fs::File::create(dir.path().join(format!("m{i}.log"))).unwrap();
                let child = Command::new(ETCD)
                    .args([
                        "--name".into(),
                        format!("m{i}"),
                        "--data-dir".into(),
                        dir.path().join(format!("m{i}")).display().to_string(),
                        "--listen-client-urls".into(),
                        format!("http://127.0.0.1:{cp}"),
                        "--advertise-client-urls".into(),
                        format!("http://127.0.0.1:{cp}"),
                        "--listen-peer-urls".into(),
                        format!("http://127.0.0.1:{pp}"),
                        "--initial-advertise-peer-urls".into(),
                        format!("http://127.0.0.1:{pp}"),
                        "--initial-cluster".into(),
                        initial.join(","),
                        "--initial-cluster-token".into(),
                        token.clone(),
                        "--initial-cluster-state".into(),
                        "new".into(),
                        // Fast elections on loopback: failover tests stay seconds-scale.
                        "--heartbeat-interval".into(),
                        "50".into(),
                        "--election-timeout".into(),
                        "500".into(),
                        "--logger".into(),
                        "zap".into(),
                        "--log-level".into(),
                        "warn".into(),
                    ])
                    .stdin(Stdio::null())
                    .stdout(log.try_clone().unwrap())
                    .stderr(log)
                    .spawn()
                    .expect("spawn etcd");
                Member {
                    client_port: *cp,
                    child: Some(child),
                }
            })
            .collect();
        let cluster = Self { _dir: dir, members };
        let deadline = Instant::now() + Duration::from_secs(30);
        for (i, m) in cluster.members.iter().enumerate() {
            while !http(m.client_port, "GET", "/health", "").is_some_and(|b| b.contains("true")) {
                assert!(
                    Instant::now() < deadline,
                    "etcd member {i} not healthy after 30 s; log: {}",
                    cluster.log(i)
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Some(cluster)
    }

    /// `host:port` of every member still running.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// `etcd://` URL listing the members, starting with member `first` (so several clients can
    /// each talk to a different member).
    pub fn url_from(&self, first: usize) -> String {
        let mut eps = self.endpoints();
        let n = eps.len();
        eps.rotate_left(first % n.max(1));
        format!("etcd://{}", eps.join(","))
    }

    /// Which member is the raft leader, as the members report it.
    pub fn leader(&self) -> Option<usize> {
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            let Some(body) = http(m.client_port, "POST", "/v3/maintenance/status", "{}") else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let leader = v["leader"].as_str()?;
            if v["header"]["member_id"].as_str() == Some(leader) {
                return self
                    .members
                    .iter()
                    .position(|x| x.client_port == m.client_port);
            }
            // Ask the leader itself: member ids are only known to the members.
            for (i, other) in self.members.iter().enumerate() {
                if other.child.is_none() {
                    continue;
                }
                let Some(b) = http(other.client_port, "POST", "/v3/maintenance/status", "{}")
                else {
                    continue;
                };
                let o: serde_json::Value = serde_json::from_str(&b).ok()?;
                if o["header"]["member_id"].as_str() == Some(leader) {
                    return Some(i);
                }
            }
        }
        None
    }

    /// SIGKILLs member `i` (no clean shutdown).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The log of member `i`, for failure messages.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self._dir.path().join(format!("m{i}.log"))).unwrap_or_default()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// A minimal HTTP/1.0 request to 127.0.0.1 (etcd's health and JSON gateway); the body, if 200.
fn http(port: u16, method: &str, path: &str, body: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().ok()?,
        Duration::from_millis(500),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.to_string())
        .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_string()))
}
