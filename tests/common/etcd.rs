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
    /// How it was started, to restart it over its data dir.
    args: Vec<String>,
    log: std::path::PathBuf,
}

/// A running cluster; killed on drop.
pub struct EtcdCluster {
    /// The members, in start order.
    pub members: Vec<Member>,
    _dir: TempDir,
    /// One cluster per test process at a time: three members per test, several tests at once,
    /// would crowd a 2-core machine until elections time out.
    _turn: Option<std::sync::MutexGuard<'static, ()>>,
}

static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

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
        let mut turn = Some(TURN.lock().unwrap_or_else(|p| p.into_inner()));
        // A port found free may be taken by another process before etcd binds it: start over
        // on fresh ports when a member exits at start.
        for attempt in 1..=3 {
            match Self::try_start(n, turn.take().unwrap()) {
                Ok(c) => return Some(c),
                Err((t, log)) if attempt < 3 => {
                    eprintln!("etcd did not start (attempt {attempt}), retrying: {log}");
                    turn = Some(t);
                }
                Err((_, log)) => panic!("etcd did not start: {log}"),
            }
        }
        unreachable!()
    }

    fn try_start(
        n: usize,
        turn: std::sync::MutexGuard<'static, ()>,
    ) -> Result<Self, (std::sync::MutexGuard<'static, ()>, String)> {
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
                let log_path = dir.path().join(format!("m{i}.log"));
                let args: Vec<String> = vec![
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
                ];
                Member {
                    client_port: *cp,
                    child: Some(spawn(&args, &log_path)),
                    args,
                    log: log_path,
                }
            })
            .collect();
        let mut cluster = Self {
            members,
            _dir: dir,
            _turn: Some(turn),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        for i in 0..cluster.members.len() {
            let port = cluster.members[i].client_port;
            while !http(port, "GET", "/health", "").is_some_and(|b| b.contains("true")) {
                let exited = cluster.members[i]
                    .child
                    .as_mut()
                    .is_some_and(|c| c.try_wait().ok().flatten().is_some());
                if exited || Instant::now() >= deadline {
                    let log = format!("member {i}: {}", cluster.log(i));
                    for j in 0..cluster.members.len() {
                        cluster.kill(j);
                    }
                    // Hand the turn back for the next attempt.
                    let turn = cluster._turn.take().unwrap();
                    drop(cluster);
                    return Err((turn, log));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(cluster)
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

    /// Starts a killed member again over its data dir and waits until it is healthy.
    pub fn restart(&mut self, i: usize) {
        let m = &mut self.members[i];
        assert!(m.child.is_none(), "member {i} is running");
        m.child = Some(spawn(&m.args, &m.log));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !http(m.client_port, "GET", "/health", "").is_some_and(|b| b.contains("true")) {
            assert!(
                Instant::now() < deadline,
                "member {i} not healthy after restart"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Compacts the key space up to the current revision (through member `via`); returns it.
    pub fn compact(&self, via: usize) -> i64 {
        let port = self.members[via].client_port;
        let body = http(port, "POST", "/v3/kv/range", r#"{"key":"AA=="}"#).expect("range");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let rev: i64 = v["header"]["revision"].as_str().unwrap().parse().unwrap();
        let req = format!(r#"{{"revision":"{rev}","physical":true}}"#);
        http(port, "POST", "/v3/kv/compaction", &req).expect("compaction");
        rev
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

fn spawn(args: &[String], log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(ETCD)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn etcd")
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
