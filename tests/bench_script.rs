//! `scripts/bench` and `scripts/profile` read other programs' output: the benches' printed
//! figures, the peers harness's RESULT lines, `openssl speed` and `perf report`. These tests run
//! their parsers on outputs captured from real runs (tests/bench_samples/) and check the figures
//! they read, that a figure whose line changed is reported missing by name instead of guessed,
//! and that the profile's category rules put known symbols where docs/performance.md says.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers outside #[test] functions"
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn sample(name: &str) -> PathBuf {
    repo().join("tests/bench_samples").join(name)
}

/// `python3 scripts/<script> args...`.
fn script(script: &str, args: &[&str]) -> Output {
    Command::new("python3")
        .arg(repo().join("scripts").join(script))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("python3 runs")
}

/// `scripts/bench --parse kind file`: (exit code, parsed JSON if any, stderr).
fn parse(kind: &str, file: &Path) -> (i32, Value, String) {
    let out = script("bench", &["--parse", kind, file.to_str().unwrap()]);
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (
        out.status.code().unwrap_or(-1),
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-6 * b.abs().max(1.0)
}

/// A copy of a sample with one line's text replaced, in a temp dir.
fn edited(name: &str, from: &str, to: &str) -> (tempfile::TempDir, PathBuf) {
    let text = std::fs::read_to_string(sample(name)).unwrap();
    assert!(text.contains(from), "{name} no longer contains {from:?}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text.replace(from, to)).unwrap();
    (dir, path)
}

#[test]
fn revocation_figures_are_read_and_absent_ones_named() {
    if !common::require_python3() {
        return;
    }
    let (code, v, err) = parse("revocation", &sample("revocation.txt"));
    assert_eq!(v["revocations"], 20000);
    assert!(close(f(&v, "check_p50_us"), 1.2));
    assert!(close(f(&v, "check_p99_us"), 2.7));
    assert!(close(f(&v, "disk_bytes_per_revocation"), 1153.0));
    assert!(close(f(&v, "scan_s"), 0.04));
    assert!(close(f(&v, "pruned_kib"), 26.6 * 1024.0));
    // This capture prints no CRL time, no Watch time, no RSS and no fresh-process open, and the
    // empty store as "0.0 MiB": each is named as missing, none is filled in, and the exit status
    // says so.
    assert_eq!(code, 3, "{err}");
    let missing: Vec<&str> = v["missing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    for figure in [
        "CRL generation time",
        "Watch{since:0} time",
        "CA RSS",
        "pruned-disk ratio",
        "index rebuilt at start",
    ] {
        assert!(
            missing.iter().any(|m| m.starts_with(figure)),
            "{figure} not reported missing: {missing:?}"
        );
        assert!(err.contains(figure), "stderr does not name {figure}: {err}");
    }
    for key in [
        "crl_s",
        "watch_s",
        "ca_rss_mib",
        "pruned_ratio",
        "index_load_s",
    ] {
        assert!(v.get(key).is_none(), "{key} was filled in: {v}");
    }
}

#[test]
fn the_current_revocation_output_gives_every_figure() {
    if !common::require_python3() {
        return;
    }
    // Captured from `scripts/bench-revocation --revocations 20000` with the paged Watch, the
    // CA's CRL peak RSS and the byte-exact pruned ratio (the empty store no longer rounds to 0).
    let (code, v, err) = parse("revocation", &sample("revocation-paged.txt"));
    assert_eq!(code, 0, "{err}");
    assert_eq!(v["missing"].as_array().map(Vec::len), Some(0), "{v}");
    assert!(close(f(&v, "check_p50_us"), 0.2));
    assert!(close(f(&v, "disk_bytes_per_revocation"), 288.0));
    assert!(close(f(&v, "watch_s"), 0.01));
    assert!(close(f(&v, "index_load_s"), 0.04));
    assert!(close(f(&v, "ca_rss_mib"), 16.8));
    // 8,414,705 / 524,701 bytes, from the exact line, not the MiB-rounded sizes.
    assert!(close(f(&v, "pruned_ratio"), 8_414_705.0 / 524_701.0), "{v}");
    // No section 9 (run without --etcd): no etcd figure, and none missing either.
    assert!(v.get("etcd_start_s").is_none(), "{v}");
}

#[test]
fn the_start_on_etcd_is_read_from_section_nine_not_section_eight() {
    if !common::require_python3() {
        return;
    }
    // Captured from `scripts/bench-revocation --revocations 20000 --etcd` (no agent): section
    // 8's start on sled is 0.04 s, section 9's on etcd 0.09 s.
    let (code, v, err) = parse("revocation", &sample("revocation-etcd.txt"));
    assert_eq!(code, 0, "{err}");
    assert!(close(f(&v, "etcd_start_s"), 0.09), "{v}");
    assert!(close(f(&v, "index_load_s"), 0.05), "{v}");
    // etcd's db_size per revocation, from section 9's fill line (not sled's section 1 figure).
    assert!(close(f(&v, "etcd_disk_bytes_per_revocation"), 335.0), "{v}");
    // With section 9's fill line changed, its figure is missing, not taken from elsewhere,
    // and the start figure beside it is still read.
    let (_dir, path) = edited(
        "revocation-etcd.txt",
        "(335 bytes per revocation)",
        "(335 B/revocation)",
    );
    let (code, v, err) = parse("revocation", &path);
    assert_eq!(code, 3, "{v}");
    assert!(v.get("etcd_disk_bytes_per_revocation").is_none(), "{v}");
    assert!(err.contains("etcd bytes per revocation"), "{err}");
    assert!(close(f(&v, "etcd_start_s"), 0.09), "{v}");
}

#[test]
fn a_changed_revocation_line_is_missing_not_guessed() {
    if !common::require_python3() {
        return;
    }
    let (_dir, path) = edited(
        "revocation.txt",
        "bytes on disk per live revocation",
        "bytes per revocation on disk",
    );
    let (code, v, err) = parse("revocation", &path);
    assert_eq!(code, 3);
    assert!(v.get("disk_bytes_per_revocation").is_none());
    assert!(err.contains("disk bytes per live revocation"), "{err}");
    // A bench that reports wrong lookups is not read as a latency figure.
    let (_dir, path) = edited(
        "revocation.txt",
        "(802056/s, one thread)",
        "(802056/s, one thread), 3 WRONG ANSWERS",
    );
    let (_, v, err) = parse("revocation", &path);
    assert!(v.get("check_p50_us").is_none());
    assert!(err.contains("3 wrong answers"), "{err}");
}

#[test]
fn fleet_table_is_read_by_column_name() {
    if !common::require_python3() {
        return;
    }
    let (code, v, err) = parse("fleet", &sample("fleet.txt"));
    assert_eq!(code, 0, "{err}");
    let row = &v["rows"][0];
    assert_eq!(row["n"], 100);
    assert_eq!(row["mode"], "in-process");
    assert!(close(f(row, "cpu_per_rotation_us"), 2381.0));
    assert!(close(f(row, "core_share_pct"), 1.0));
    assert!(close(f(row, "ca_kib_per_agent"), 91.0));
    assert_eq!(row["revocation_fanout_ms"], serde_json::json!([4.0, 11.0]));
    assert_eq!(row["bundle_fanout_ms"], serde_json::json!([7.0, 8.0]));
    assert!(close(f(row, "agent_mib"), 0.12));

    let (_dir, path) = edited(
        "fleet.txt",
        "| CA CPU/rotation |",
        "| CA CPU per rotation |",
    );
    let (code, _, err) = parse("fleet", &path);
    assert_eq!(code, 3);
    assert!(err.contains("CA CPU/rotation"), "{err}");
    let (_dir, path) = edited("fleet.txt", "| 2.381 ms |", "| 2.381 s/rot |");
    let (code, _, err) = parse("fleet", &path);
    assert_eq!(code, 3);
    assert!(
        err.contains("CPU/rotation") && err.contains("2.381 s/rot"),
        "{err}"
    );
}

#[test]
fn harness_results_take_the_median_and_refuse_failed_checks() {
    if !common::require_python3() {
        return;
    }
    let (code, v, err) = parse("results", &sample("peers-results.jsonl"));
    assert_eq!(code, 0, "{err}");
    assert_eq!(v.as_object().unwrap().len(), 12);
    let renew = &v["lanyard-renew@64"];
    assert!(close(f(renew, "certs_per_s"), 3669.9));
    assert!(close(f(renew, "server_cpu_ms_per_cert"), 0.2));
    assert_eq!(renew["runs"], 1);

    // Two more cfssl runs at c=64: the median of three, and the spread kept.
    let text = std::fs::read_to_string(sample("peers-results.jsonl")).unwrap();
    let first = text.lines().next().unwrap();
    assert!(first.contains("\"label\":\"cfssl\",\"concurrency\":64"));
    let more = [1000.0, 5000.0].map(|r| {
        let mut run: Value = serde_json::from_str(first).unwrap();
        run["certs_per_s"] = r.into();
        run.to_string()
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("results.jsonl");
    std::fs::write(&path, format!("{text}{}\n{}\n", more[0], more[1])).unwrap();
    let (_, v, _) = parse("results", &path);
    assert!(close(f(&v["cfssl@64"], "certs_per_s"), 3887.8));
    assert_eq!(v["cfssl@64"]["runs"], 3);

    // A run whose sampled certificates failed the load generator's check is not a result.
    let mut bad: Value = serde_json::from_str(first).unwrap();
    bad["check_failed"] = 1.into();
    std::fs::write(&path, format!("{text}{bad}\n")).unwrap();
    let (code, _, err) = parse("results", &path);
    assert_eq!(code, 3);
    assert!(err.contains("failed the load generator's check"), "{err}");
    // Nor is one without a figure the table needs.
    let mut partial: Value = serde_json::from_str(first).unwrap();
    partial.as_object_mut().unwrap().remove("p99_ms");
    std::fs::write(&path, format!("{partial}\n")).unwrap();
    let (code, _, err) = parse("results", &path);
    assert_eq!(code, 3);
    assert!(err.contains("p99_ms"), "{err}");
}

#[test]
fn openssl_speed_multi_output_is_read() {
    if !common::require_python3() {
        return;
    }
    let (code, v, err) = parse("speed", &sample("openssl-speed-multi.txt"));
    assert_eq!(code, 0, "{err}");
    assert!(close(f(&v, "sign_per_s"), 70462.0));
    assert!(close(f(&v, "verify_per_s"), 23846.0));
}

#[test]
fn unknown_sections_are_refused() {
    if !common::require_python3() {
        return;
    }
    let out = script("bench", &["--only", "issue,bogus"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown section bogus"));
    let out = script("bench", &["--conc", "64,x"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn profile_rules_put_symbols_in_their_categories() {
    if !common::require_python3() {
        return;
    }
    let out = script(
        "profile",
        &["--fold", sample("perf-report-rules.txt").to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    // Raw shares of the hand-made report (they sum to 106), normalised by the fold.
    let expect = [
        ("crypto (ring", 11.0),
        ("sled", 22.0),
        ("allocation", 3.5),
        ("HTTP/2 + gRPC", 4.0),
        ("kernel: scheduler", 5.0),
        ("kernel: network", 6.0),
        ("kernel: file I/O", 7.0),
        ("Lanyard audit", 8.0),
        ("TLS (rustls", 9.0),
        ("memory copy", 4.0),
        ("Lanyard (other", 11.0),
        ("unresolved", 12.0),
        ("tracing", 3.5),
    ];
    let cats = v.as_object().unwrap();
    assert_eq!(cats.len(), expect.len(), "{v}");
    for (prefix, raw) in expect {
        let (name, share) = cats
            .iter()
            .find(|(k, _)| k.starts_with(prefix))
            .unwrap_or_else(|| panic!("no category {prefix}: {v}"));
        let want = (raw / 106.0 * 100.0 * 100.0_f64).round() / 100.0;
        assert!(
            close(share.as_f64().unwrap(), want),
            "{name}: {share}, want {want}"
        );
    }

    // On a real report (the top of one), the rules leave almost nothing unclassified.
    let out = script(
        "profile",
        &["--fold", sample("perf-report-head.txt").to_str().unwrap()],
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let other = v.get("other").and_then(Value::as_f64).unwrap_or(0.0);
    assert!(other < 2.0, "{other}% of a real profile is 'other': {v}");
}
