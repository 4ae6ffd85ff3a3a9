//! What an operator meets in the first ten minutes, with the real binary: log files free of
//! colour codes and debug formatting, a refused log filter, the empty-policy warning, `audit tail
//! --follow` when the CA goes away (and `--reconnect`), the agent's `SPIFFE_ENDPOINT_SOCKET`
//! and `unix://` socket forms, and shell completions.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code (and the shared helpers in common/): a panic is a test failure"
)]

mod common;

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use common::{POLICY, free_port, lanyard_cmd};

/// A child process, killed and reaped on drop so a failing assertion leaks nothing.
struct Proc {
    child: Child,
}

impl Proc {
    /// Spawns `cmd` with stdin closed, stdout to `out` and stderr to `err`.
    fn spawn(cmd: &mut Command, out: &Path, err: &Path) -> Self {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(out).unwrap())
            .stderr(std::fs::File::create(err).unwrap())
            .spawn()
            .expect("spawn lanyard");
        Self { child }
    }

    /// Waits up to `timeout` for the process to exit.
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits for the exit.
    fn terminate(&mut self) -> ExitStatus {
        let st = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(st.success());
        self.wait_exit(Duration::from_secs(15))
            .expect("exits within 15 s of SIGTERM")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A `lanyard serve` process.
struct Serve {
    proc: Proc,
    data: PathBuf,
    log: PathBuf,
    addr: String,
}

impl Serve {
    /// Starts `lanyard serve` on `listen` and waits for `<data>/serve.addr`.
    fn start(config: &Path, data: &Path, listen: &str, log: &Path, env: &[(&str, &str)]) -> Self {
        let addr_file = data.join("serve.addr");
        let _ = std::fs::remove_file(&addr_file);
        let mut cmd = lanyard_cmd();
        cmd.args(["serve", "--config"])
            .arg(config)
            .arg("--data-dir")
            .arg(data)
            .args(["--listen", listen])
            .envs(env.iter().copied());
        let mut proc = Proc::spawn(&mut cmd, &log.with_extension("stdout"), log);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(a) = std::fs::read_to_string(&addr_file)
                && !a.trim().is_empty()
            {
                return Self {
                    proc,
                    data: data.to_path_buf(),
                    log: log.to_path_buf(),
                    addr: a.trim().to_string(),
                };
            }
            if let Some(status) = proc.child.try_wait().unwrap() {
                panic!("serve exited early ({status}); log:\n{}", read(log));
            }
            assert!(Instant::now() < deadline, "serve did not start in 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        read(&self.log)
    }

    /// `--server <addr> --credential <admin>`.
    fn conn(&self) -> Vec<String> {
        vec![
            "--server".into(),
            self.addr.clone(),
            "--credential".into(),
            self.data.join("admin").display().to_string(),
        ]
    }

    /// Runs an admin verb and checks it succeeded; returns stdout.
    fn admin(&self, args: &[&str]) -> String {
        let out = lanyard_cmd()
            .args(args)
            .args(self.conn())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_ok(&out, &args.join(" "));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A join token for `id` with `roles`.
    fn token(&self, id: &str, roles: &str) -> String {
        let out = self.admin(&[
            "token",
            "create",
            "--spiffe-id",
            id,
            "--roles",
            roles,
            "--expires-in",
            "1h",
        ]);
        out.trim().to_string()
    }

    /// SIGTERM and a clean exit.
    fn stop(mut self) {
        let status = self.proc.terminate();
        assert!(status.success(), "serve exited with {status}");
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

#[track_caller]
fn assert_ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Polls `f` every 50 ms for up to `secs` seconds.
#[track_caller]
fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A temp dir with a config (`policy` after the trust domain) and paths in it.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new(policy: &str) -> Self {
        let f = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        f.write_policy(policy);
        f
    }
    fn write_policy(&self, policy: &str) {
        std::fs::write(
            self.config(),
            format!("trust_domain = \"example.org\"\nmin_ttl = \"1s\"\n\n{policy}"),
        )
        .unwrap();
    }
    fn config(&self) -> PathBuf {
        self.dir.path().join("lanyard.toml")
    }
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn serve(&self, listen: &str, log: &str) -> Serve {
        Serve::start(&self.config(), &self.data(), listen, &self.path(log), &[])
    }
}

const PROD: &str = "spiffe://example.org/ns/prod/api";

/// Every line starts with an RFC 3339 time, carries no escape byte, and shows no debug
/// formatting: no `Some(…)`, no struct dumps, no epoch seconds or milliseconds.
#[track_caller]
fn assert_for_people(name: &str, log: &str) {
    assert!(!log.is_empty(), "{name} is empty");
    assert!(
        !log.contains('\u{1b}'),
        "{name} holds ANSI escapes though stderr is a file:\n{log}"
    );
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let stamp = line.split_whitespace().next().unwrap_or_default();
        assert!(
            time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339)
                .is_ok(),
            "{name}: line does not start with an RFC 3339 time: {line}"
        );
        for debug in ["Some(", "None", "CaSet {", " { "] {
            assert!(
                !line.contains(debug),
                "{name}: debug formatting ({debug:?}) in: {line}"
            );
        }
        for field in line.split_whitespace().filter_map(|w| w.split_once('=')) {
            let v = field.1;
            assert!(
                !(v.len() >= 10 && v.len() <= 13 && v.bytes().all(|b| b.is_ascii_digit())),
                "{name}: raw epoch value {}={v} in: {line}",
                field.0
            );
        }
    }
}

#[test]
fn logs_are_plain_text_for_people_and_say_what_happened() {
    let fx = Fixture::new(POLICY);
    let serve = fx.serve("127.0.0.1:0", "serve.log");
    // An issuance, an agent with a short lifetime (so it rotates), a CA rotation.
    let out = fx.path("issued");
    serve.admin(&["ca", "status"]);
    let token = serve.token(PROD, "db-read");
    let issued = lanyard_cmd()
        .args(["issue", "--server", &serve.addr, "--token", &token, "--out"])
        .arg(&out)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_ok(&issued, "issue");
    let agent_log = fx.path("agent.log");
    let token = serve.token("spiffe://example.org/ns/prod/worker", "db-read");
    let mut agent = Proc::spawn(
        lanyard_cmd()
            .args(["agent", "--server", &serve.addr, "--token", &token])
            .args(["--ttl", "4s", "--out"])
            .arg(fx.path("agent")),
        &fx.path("agent.stdout"),
        &agent_log,
    );
    wait_until(15, "the agent's first certificate", || {
        read(&agent_log).contains("certificate ready")
    });
    serve.admin(&["ca", "rotate"]);
    wait_until(15, "a rotation by the agent", || {
        read(&agent_log).contains("certificate rotated")
            && read(&agent_log).contains("trust bundles updated")
    });
    serve.wait_for("CA change applied");

    // The first certificate replaced nothing: it is not a rotation.
    let alog = read(&agent_log);
    let first = alog
        .lines()
        .find(|l| l.contains("certificate ready") || l.contains("certificate rotated"))
        .unwrap();
    assert!(
        first.contains("certificate ready"),
        "first certificate logged as: {first}"
    );

    // A renewal the policy now refuses is said to be that (not a generic failure).
    fx.write_policy(&POLICY.replace("ns/prod/*", "ns/other/*"));
    let st = Command::new("kill")
        .args(["-HUP", &serve.proc.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    serve.wait_for("policy reloaded");
    wait_until(15, "the agent's renewal refused by policy", || {
        read(&agent_log).contains("certificate renewal refused by the CA's policy")
    });
    agent.terminate();
    let alog = read(&agent_log);
    assert!(
        !alog.contains("ERROR"),
        "a policy refusal is not an error of the agent:\n{alog}"
    );

    let slog = serve.log();
    for needle in [
        "certificate issued",
        "CA rotation staged",
        "CA change applied",
        "request denied",
    ] {
        assert!(slog.contains(needle), "serve log lacks {needle:?}:\n{slog}");
    }
    serve.stop();
    assert_for_people("serve log", &read(&fx.path("serve.log")));
    assert_for_people("agent log", &alog);
}

impl Serve {
    /// Waits until the log contains `needle`.
    #[track_caller]
    fn wait_for(&self, needle: &str) {
        wait_until(15, needle, || self.log().contains(needle));
    }
}

#[test]
fn an_invalid_log_filter_is_refused_not_ignored() {
    let fx = Fixture::new(POLICY);
    for (var, filter) in [
        ("LANYARD_LOG", "lanyard=bogus"),
        ("RUST_LOG", "info,tonic=loud"),
    ] {
        let log = fx.path("serve.log");
        let mut cmd = lanyard_cmd();
        cmd.args(["serve", "--config"])
            .arg(fx.config())
            .arg("--data-dir")
            .arg(fx.data())
            .args(["--listen", "127.0.0.1:0"])
            .env(var, filter);
        let mut serve = Proc::spawn(&mut cmd, &fx.path("serve.stdout"), &log);
        let status = serve.wait_exit(Duration::from_secs(10));
        let err = read(&log);
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(64),
            "{var}={filter}: serve must exit 64 (invalid configuration); stderr:\n{err}"
        );
        assert!(
            err.contains("invalid log filter") && err.contains(filter) && err.contains(var),
            "{var}={filter}: unclear message:\n{err}"
        );
    }
    // A valid filter still works.
    let serve = Serve::start(
        &fx.config(),
        &fx.data(),
        "127.0.0.1:0",
        &fx.path("ok.log"),
        &[("LANYARD_LOG", "lanyard=debug,warn")],
    );
    serve.stop();
}

#[test]
fn serve_with_an_empty_policy_warns_that_it_refuses_everyone() {
    let fx = Fixture::new("");
    let serve = fx.serve("127.0.0.1:0", "serve.log");
    let log = serve.log();
    assert!(
        log.contains("WARN") && log.contains("the policy has no rules"),
        "no empty-policy warning:\n{log}"
    );
    serve.stop();

    // A policy with rules starts without it.
    let fx = Fixture::new(POLICY);
    let serve = fx.serve("127.0.0.1:0", "serve.log");
    assert!(!serve.log().contains("the policy has no rules"));
    serve.stop();
}

/// The sequence numbers of `audit tail` lines (`#N ...`).
fn seqs(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.strip_prefix('#')?.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn audit_tail_follow_says_where_the_stream_closed_and_fails() {
    let fx = Fixture::new(POLICY);
    let serve = fx.serve("127.0.0.1:0", "serve.log");
    let (out, err) = (fx.path("tail.out"), fx.path("tail.err"));
    let mut tail = Proc::spawn(
        lanyard_cmd()
            .args(["audit", "tail", "--follow"])
            .args(serve.conn()),
        &out,
        &err,
    );
    wait_until(15, "the first events", || seqs(&read(&out)).len() >= 3);
    serve.token(PROD, "db-read");
    wait_until(15, "the token event", || {
        read(&out).contains("token_created")
    });
    serve.stop();
    let status = tail
        .wait_exit(Duration::from_secs(10))
        .expect("tail --follow ends when the CA goes away");
    let last = *seqs(&read(&out)).last().unwrap();
    let err = read(&err);
    assert!(
        !status.success(),
        "tail --follow exited 0 when the CA went away; stderr: {err}"
    );
    assert!(
        err.contains(&format!(
            "stream closed at #{last}; resume with --from {}",
            last + 1
        )),
        "stderr does not say where to resume (last event #{last}):\n{err}"
    );
}

#[test]
fn audit_tail_reconnect_resumes_without_losing_or_repeating_events() {
    let fx = Fixture::new(POLICY);
    let listen = format!("127.0.0.1:{}", free_port());
    let serve = fx.serve(&listen, "serve1.log");
    let (out, err) = (fx.path("tail.out"), fx.path("tail.err"));
    let mut tail = Proc::spawn(
        lanyard_cmd()
            .args(["audit", "tail", "--follow", "--reconnect"])
            .args(serve.conn()),
        &out,
        &err,
    );
    wait_until(15, "the first events", || {
        read(&out).contains("server_started")
    });
    serve.stop();
    wait_until(10, "the reconnect notice", || {
        read(&err).contains("reconnecting")
    });
    assert!(tail.child.try_wait().unwrap().is_none(), "tail exited");

    let serve = fx.serve(&listen, "serve2.log");
    serve.token(PROD, "db-read");
    wait_until(20, "events after the restart", || {
        read(&out).matches("server_started").count() >= 2 && read(&out).contains("token_created")
    });
    // Everything the log holds, once each, in order.
    let all = seqs(&serve.admin(&["audit", "tail"]));
    wait_until(10, "the whole log", || seqs(&read(&out)).len() >= all.len());
    assert_eq!(
        seqs(&read(&out)),
        all,
        "followed events differ from the stored log; stderr:\n{}",
        read(&err)
    );
    assert!(read(&err).contains("resuming at #"));
    serve.stop();
}

/// Whether `p` is a unix socket.
fn is_socket(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

#[test]
fn agent_takes_the_workload_socket_as_spiffe_clients_write_it() {
    let fx = Fixture::new(POLICY);
    let serve = fx.serve("127.0.0.1:0", "serve.log");
    let cwd = fx.path("cwd");
    std::fs::create_dir(&cwd).unwrap();
    let env_sock = fx.path("env.sock");
    let flag_sock = fx.path("flag.sock");
    // (what, where the socket must appear, flags, SPIFFE_ENDPOINT_SOCKET)
    let cases = [
        (
            "SPIFFE_ENDPOINT_SOCKET=unix://…",
            &env_sock,
            vec![],
            Some(format!("unix://{}", env_sock.display())),
        ),
        (
            "--workload-socket unix://…",
            &flag_sock,
            vec![
                "--workload-socket".to_string(),
                format!("unix://{}", flag_sock.display()),
            ],
            None,
        ),
    ];
    for (what, sock, args, env) in cases {
        let token = serve.token(PROD, "db-read");
        let log = fx.path("agent.log");
        let mut cmd = lanyard_cmd();
        if let Some(v) = env {
            cmd.env("SPIFFE_ENDPOINT_SOCKET", v);
        }
        let mut agent = Proc::spawn(
            cmd.current_dir(&cwd)
                .args(["agent", "--server", &serve.addr, "--token", &token])
                .args(&args),
            &fx.path("agent.stdout"),
            &log,
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while !is_socket(sock) {
            if let Some(status) = agent.child.try_wait().unwrap() {
                panic!("{what}: agent exited ({status}):\n{}", read(&log));
            }
            assert!(
                Instant::now() < deadline,
                "{what}: no socket at {}; log:\n{}",
                sock.display(),
                read(&log)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            !cwd.join("unix:").exists(),
            "{what}: a relative ./unix: path was created"
        );
        agent.terminate();
    }
    serve.stop();
}

#[test]
fn completions_come_from_clap_for_bash_zsh_and_fish() {
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let out = lanyard_cmd()
            .args(["completions", shell])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_ok(&out, &format!("completions {shell}"));
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(
            script.contains("lanyard") && script.contains("audit"),
            "{shell}: {script}"
        );
        if shell == "bash" {
            let path = dir.path().join("lanyard.bash");
            std::fs::write(&path, script.as_bytes()).unwrap();
            let check = Command::new("bash").arg("-n").arg(&path).output().unwrap();
            assert_ok(&check, "bash -n on the completion script");
        }
    }
}

/// Writes an executable shell script.
fn shim(dir: &Path, name: &str, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn scripts_test_installs_pip_when_python3_has_none() {
    // scripts/test runs against stand-ins: a python3 without pip (as Debian and Ubuntu ship
    // it) until apt-get installs python3-pip, an apt-get and a cargo that only record their
    // arguments, and an `id -u` of 0 so the install branch runs without root.
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path();
    let log = bin.join("calls.log");
    shim(
        bin,
        "python3",
        r#"if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  [ -f "$SHIM_DIR/pip-installed" ] || { echo "No module named pip" >&2; exit 1; }
  echo "pip $*" >> "$SHIM_DIR/calls.log"; exit 0
fi
[ "$1" = "-c" ] && exit 1
exit 0"#,
    );
    shim(
        bin,
        "apt-get",
        r#"echo "apt-get $*" >> "$SHIM_DIR/calls.log"
case "$*" in *python3-pip*) touch "$SHIM_DIR/pip-installed" ;; esac"#,
    );
    shim(bin, "cargo", r#"echo "cargo $*" >> "$SHIM_DIR/calls.log""#);
    shim(
        bin,
        "id",
        r#"if [ "$1" = "-u" ]; then echo 0; else exec /usr/bin/id "$@"; fi"#,
    );
    for tool in ["openssl", "go", "nginx", "curl"] {
        shim(bin, tool, "exit 0");
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/test");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .arg(&script)
        .env("PATH", path)
        .env("SHIM_DIR", bin)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let calls = read(&log);
    assert_ok(
        &out,
        &format!("scripts/test with a pip-less python3 (calls:\n{calls})"),
    );
    assert!(
        calls.contains("apt-get install") && calls.contains("python3-pip"),
        "python3-pip was not installed:\n{calls}"
    );
    assert!(
        calls.contains("pip install") && calls.contains("spiffe"),
        "{calls}"
    );
    assert!(calls.contains("cargo test --locked"), "{calls}");
}

#[test]
fn the_default_data_dir_is_ignored_by_git() {
    let ignore = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join(".gitignore"));
    assert!(
        ignore.lines().map(str::trim).any(|l| [
            "lanyard-data/",
            "/lanyard-data/",
            "lanyard-data",
            "/lanyard-data"
        ]
        .contains(&l)),
        ".gitignore does not cover lanyard-data/ (it holds ca.key):\n{ignore}"
    );
}

#[test]
fn the_readme_lists_the_prerequisites_cargo_toml_states() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = read(&root.join("README.md"));
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("Prerequisites"))
        .expect("README has a Prerequisites section");
    let cargo = read(&root.join("Cargo.toml"));
    let msrv = cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .expect("Cargo.toml states rust-version")
        .trim_matches('"');
    for needle in [
        &format!("Rust {msrv}"),
        "rustfmt",
        "clippy",
        "C compiler",
        "10 minutes",
        "python3-pip",
        "scripts/test",
    ] {
        assert!(
            section.contains(needle),
            "Prerequisites lacks {needle:?}:\n{section}"
        );
    }
}

#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    let present = common::command_works("script", &["--version"]);
    if !common::require_tool("script (util-linux)", present, "install bsdutils") {
        return;
    }
    // An agent with a malformed token logs one error line and exits at once.
    let dir = tempfile::tempdir().unwrap();
    let agent = format!(
        "'{}' agent --server 127.0.0.1:1 --token bogus --out '{}'",
        common::lanyard_bin().display(),
        dir.path().join("out").display()
    );
    let on_tty = |no_color: Option<&str>| {
        let mut cmd = Command::new("script");
        cmd.args(["-qec", &agent, "/dev/null"]).stdin(Stdio::null());
        for v in common::LANYARD_ENV_VARS {
            cmd.env_remove(v);
        }
        if let Some(v) = no_color {
            cmd.env("NO_COLOR", v);
        }
        let out = cmd.output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let coloured = on_tty(None);
    assert!(
        coloured.contains("agent stopped") && coloured.contains('\u{1b}'),
        "no colour on a terminal: {coloured:?}"
    );
    let plain = on_tty(Some("1"));
    assert!(
        plain.contains("agent stopped") && !plain.contains('\u{1b}'),
        "colour despite NO_COLOR=1: {plain:?}"
    );
}
