//! The files in deploy/ must match the code: unit files and manifests must be well formed, and
//! every `lanyard` command line they contain must parse with the real CLI.

use std::path::Path;

use clap::Parser;
use lanyard::cli::Cli;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn parse_cli(args: &[String], origin: &str) {
    let mut argv = vec!["lanyard".to_string()];
    argv.extend(args.iter().cloned());
    if let Err(e) = Cli::try_parse_from(&argv) {
        panic!("{origin}: `{}` does not parse: {e}", argv.join(" "));
    }
}

/// Splits a unit-file command line (double quotes only, which is all our units use).
fn split_command(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[test]
fn systemd_units_are_well_formed_and_their_commands_parse() {
    for unit in ["lanyard.service", "lanyard-agent@.service"] {
        let path = root().join("deploy/systemd").join(unit);
        let text = std::fs::read_to_string(&path).unwrap();
        for section in ["[Unit]", "[Service]", "[Install]"] {
            assert!(text.contains(section), "{unit} lacks {section}");
        }
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap_or_else(|| panic!("{unit} has no ExecStart"));
        let words = split_command(&exec.replace("%i", "api").replace("${ON_ROTATE}", "true"));
        assert_eq!(words[0], "/usr/local/bin/lanyard", "{unit}");
        parse_cli(&words[1..], unit);
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            assert!(
                line.starts_with('[') || line.contains('='),
                "{unit}: not a section or key=value: {line}"
            );
        }
    }
}

#[test]
fn kubernetes_manifests_parse_and_their_commands_parse() {
    let script = r#"
import json, sys, yaml
out = []
for path in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(path)):
        assert isinstance(doc, dict) and "kind" in doc and "apiVersion" in doc, path
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            if "lanyard" in c.get("image", ""):
                out.append(c.get("args", []))
print(json.dumps(out))
"#;
    let dir = root().join("deploy/kubernetes");
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert!(files.len() >= 2);
    let out = match std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(&files)
        .output()
    {
        Ok(o) => o,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("SKIPPED: python3 not available ({e})");
            return;
        }
        Err(e) => panic!("python3 is required in CI (.ci/run installs it): {e}"),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success()
        && stderr.contains("No module named 'yaml'")
        && std::env::var_os("CI").is_none()
    {
        eprintln!("SKIPPED: PyYAML not installed");
        return;
    }
    assert!(out.status.success(), "manifests do not parse: {stderr}");
    let commands: Vec<Vec<String>> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(commands.len() >= 2, "expected the CA and the agent sidecar");
    for args in commands {
        parse_cli(&args, "deploy/kubernetes");
    }
}

#[test]
fn kubernetes_configmap_holds_a_valid_config() {
    let script = r#"
import sys, yaml
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if doc.get("kind") == "ConfigMap":
        sys.stdout.write(doc["data"]["lanyard.toml"])
"#;
    let manifest = root().join("deploy/kubernetes/ca.yaml");
    let out = match std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&manifest)
        .output()
    {
        Ok(o) if o.status.success() => o,
        Ok(o) if std::env::var_os("CI").is_none() => {
            eprintln!(
                "SKIPPED: python3/PyYAML unusable: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            return;
        }
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("SKIPPED: python3 not available ({e})");
            return;
        }
        other => panic!("python3 with PyYAML is required in CI (.ci/run installs it): {other:?}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lanyard.toml");
    std::fs::write(&config, &out.stdout).unwrap();
    let settings = lanyard::config::ServeSettings::resolve(Some(&config), Default::default())
        .unwrap_or_else(|e| panic!("the ConfigMap's lanyard.toml is invalid: {e}"));
    assert_eq!(settings.trust_domain.as_str(), "example.org");
    assert!(!settings.policy.is_empty());
}
