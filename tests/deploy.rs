//! The files in deploy/ and the Dockerfile must match the code: manifests validate against the
//! Kubernetes schemas and hold the security settings the README promises, unit files score 5.0
//! or better in `systemd-analyze security`, and every `lanyard` command line they contain (with
//! the LANYARD_* variables they set) parses with the real CLI, both the library's definition and
//! the built binary.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser};
use lanyard::cli::Cli;
use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn ci() -> bool {
    std::env::var_os("CI").is_some()
}

/// Skips (locally) or fails (in CI) when a peer tool is missing.
fn missing(what: &str) -> bool {
    assert!(
        !ci(),
        "{what} is required in CI (scripts/test and .ci/run install it)"
    );
    eprintln!("SKIPPED: {what} not available");
    true
}

/// Parses `args` (a subcommand and its flags) with `env` (LANYARD_* variables the deploy file
/// sets) twice: with the library's clap definition, turning each variable into the flag that
/// reads it so its value is validated too, and with the built binary (`... --help`, which exits
/// 0 only if every flag before it is known and every value parses).
fn parse_cli(args: &[String], env: &[(String, String)], origin: &str) {
    let cli = Cli::command();
    let sub = cli
        .find_subcommand(&args[0])
        .unwrap_or_else(|| panic!("{origin}: no subcommand {:?}", args[0]));
    let mut argv = vec!["lanyard".to_string(), args[0].clone()];
    argv.extend(args[1..].iter().cloned());
    for (name, value) in env {
        let arg = sub
            .get_arguments()
            .chain(cli.get_arguments())
            .find(|a| a.get_env().is_some_and(|e| e == name.as_str()))
            .unwrap_or_else(|| {
                panic!(
                    "{origin}: {name} is read by no flag of `lanyard {}`",
                    args[0]
                )
            });
        let long = arg.get_long().expect("env-backed arguments are long flags");
        argv.push(format!("--{long}={value}"));
    }
    if let Err(e) = Cli::try_parse_from(&argv) {
        panic!("{origin}: `{}` does not parse: {e}", argv.join(" "));
    }
    let out = Command::new(env!("CARGO_BIN_EXE_lanyard"))
        .args(&argv[1..])
        .arg("--help")
        .env_clear()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{origin}: the lanyard binary refuses `{}`: {}",
        argv[1..].join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
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

/// `key=value` settings of a unit file, in order (comments and sections left out).
fn unit_settings(text: &str) -> Vec<(&str, &str)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('[') && !l.trim().is_empty())
        .filter_map(|l| l.split_once('='))
        .collect()
}

const UNITS: [&str; 2] = ["lanyard.service", "lanyard-agent@.service"];

#[test]
fn systemd_units_are_well_formed_and_their_commands_parse() {
    let sysusers = std::fs::read_to_string(root().join("deploy/sysusers.d/lanyard.conf")).unwrap();
    let declared = |kind: &str, name: &str| {
        sysusers.lines().any(|l| {
            let f: Vec<_> = l.split_whitespace().collect();
            f.len() >= 2 && f[0] == kind && f[1] == name
        })
    };
    for unit in UNITS {
        let text = std::fs::read_to_string(root().join("deploy/systemd").join(unit)).unwrap();
        for section in ["[Unit]", "[Service]", "[Install]"] {
            assert!(text.contains(section), "{unit} lacks {section}");
        }
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            assert!(
                line.starts_with('[') || line.contains('='),
                "{unit}: not a section or key=value: {line}"
            );
        }
        let settings = unit_settings(&text);
        let one = |key: &str| {
            settings
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| *v)
                .unwrap_or_else(|| panic!("{unit} has no {key}="))
        };
        // A dedicated user that systemd-sysusers creates from our file, never root.
        let user = one("User");
        assert!(user != "root" && user != "0", "{unit} runs as root");
        assert!(
            declared("u", user),
            "{unit}: User={user} is not in deploy/sysusers.d/lanyard.conf"
        );
        assert!(
            one("LimitNOFILE").parse::<u32>().unwrap() >= 1024,
            "{unit}: LimitNOFILE"
        );
        let env: Vec<(String, String)> = settings
            .iter()
            .filter(|(k, _)| *k == "Environment")
            .filter_map(|(_, v)| v.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Some((_, group)) = env
            .iter()
            .find(|(k, _)| k == "LANYARD_WORKLOAD_SOCKET_GROUP")
        {
            assert!(
                declared("g", group),
                "{unit}: socket group {group} is not declared"
            );
            assert!(
                sysusers.lines().any(
                    |l| l.split_whitespace().collect::<Vec<_>>() == ["m", user, group.as_str()]
                ),
                "{unit}: {user} must be a member of {group} to give it the socket"
            );
        }
        let words = split_command(
            &one("ExecStart")
                .replace("%i", "api")
                .replace("${ON_ROTATE}", "true"),
        );
        assert_eq!(words[0], "/usr/local/bin/lanyard", "{unit}");
        parse_cli(&words[1..], &env, unit);
    }
}

#[test]
fn systemd_units_score_5_or_better_in_systemd_analyze_security() {
    match Command::new("systemd-analyze").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ if missing("systemd-analyze (package systemd)") => return,
        _ => unreachable!(),
    }
    let dir = tempfile::tempdir().unwrap();
    for unit in UNITS {
        // A template is analyzed as one of its instances.
        let name = unit.replace("@.", "@api.");
        let path = dir.path().join(&name);
        std::fs::copy(root().join("deploy/systemd").join(unit), &path).unwrap();
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let score: f64 = stdout
            .lines()
            .find_map(|l| l.split_once(&format!("Overall exposure level for {name}: ")))
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "{unit}: no score in systemd-analyze's output: {stdout}{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        eprintln!("{unit}: systemd-analyze security exposure {score}");
        assert!(
            score <= 5.0,
            "{unit} scores {score} (worse than 5.0):\n{stdout}"
        );
    }
}

/// Every document of every manifest as JSON, after validating each against the Kubernetes
/// schemas shipped with `kubernetes-validate` (offline, strict: unknown fields are errors) for
/// the oldest version the manifests support (1.29: native sidecars on by default) and the
/// newest the package knows. `None` when Python or the package is missing outside CI.
fn manifests() -> Option<Vec<(String, Value)>> {
    let script = r#"
import json, sys
import kubernetes_validate as kv
from kubernetes_validate.utils import latest_version
out, errors = [], []
for path in sys.argv[1:]:
    for doc in kv.utils.resources_from_file(path):
        for version in ("1.29.0", latest_version()):
            try:
                kv.validate(doc, version, strict=True)
            except Exception as e:
                where = ".".join(str(p) for p in getattr(e, "path", []))
                errors.append(f"{path}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')} against {version}: {where}: {getattr(e, 'message', e)}")
        out.append([path, doc])
print(json.dumps({"docs": out, "errors": errors}))
"#;
    let dir = root().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 2);
    let out = match Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(&files)
        .output()
    {
        Ok(o) => o,
        Err(e) if missing(&format!("python3 ({e})")) => return None,
        Err(_) => unreachable!(),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stderr.contains("No module named") && missing(&stderr) {
        return None;
    }
    assert!(out.status.success(), "manifests do not load: {stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let errors: Vec<&str> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        errors.is_empty(),
        "schema validation failed:\n{}",
        errors.join("\n")
    );
    Some(
        v["docs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| (d[0].as_str().unwrap().to_string(), d[1].clone()))
            .collect(),
    )
}

fn find<'a>(docs: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} in deploy/kubernetes"))
}

fn items(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

fn strs(v: &Value) -> Vec<&str> {
    items(v).filter_map(Value::as_str).collect()
}

/// The value of `--name=value` or `--name value` in a container's args.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let long = format!("--{name}");
    args.iter().enumerate().find_map(|(i, a)| {
        if *a == long {
            args.get(i + 1).map(String::as_str)
        } else {
            a.strip_prefix(&format!("{long}="))
        }
    })
}

fn args_of(container: &Value) -> Vec<String> {
    strs(&container["args"])
        .into_iter()
        .map(String::from)
        .collect()
}

/// The CA's config from its ConfigMap, checked with the real loader. Files the pod mounts
/// (the cluster's JWKS) are replaced by stand-ins in a temp dir, since the loader reads them.
fn ca_config(docs: &[(String, Value)]) -> (toml::Table, lanyard::config::ServeSettings) {
    let text = find(docs, "ConfigMap", "lanyard-config")["data"]["lanyard.toml"]
        .as_str()
        .unwrap()
        .to_string();
    let full: toml::Table = text.parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    // A P-256 public key (a point on the curve), shaped like the API server's JWKS.
    std::fs::write(
        &jwks,
        r#"{"keys":[{"kty":"EC","crv":"P-256","alg":"ES256","use":"sig","kid":"k1",
        "x":"CpTb4eTLZL16CxcBPUJ7geScAoqkSAhZh9PSct4RtQQ","y":"qvYkHPFbCQo02fADTo0Xm5QENT2UCxV_Rf8RhwM8nP4"}]}"#,
    )
    .unwrap();
    let mut config = full.clone();
    if let Some(toml::Value::Array(attestors)) = config.get_mut("attestor") {
        for a in attestors.iter_mut().filter_map(toml::Value::as_table_mut) {
            if a.contains_key("jwks_file") {
                a.insert(
                    "jwks_file".into(),
                    toml::Value::String(jwks.display().to_string()),
                );
            }
        }
    }
    let path = dir.path().join("lanyard.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    match lanyard::config::ServeSettings::resolve(Some(&path), Default::default()) {
        Ok(settings) => {
            assert_eq!(settings.trust_domain.as_str(), "example.org");
            assert!(!settings.policy.is_empty());
            (full, settings)
        }
        Err(e) => panic!("the ConfigMap's lanyard.toml is invalid: {e}"),
    }
}

#[test]
fn kubernetes_manifests_validate_and_are_locked_down() {
    let Some(docs) = manifests() else { return };
    for (path, doc) in &docs {
        let text = doc.to_string();
        // Tokens come from projected service-account volumes; no Secret carries one.
        assert!(
            !text.contains("secretKeyRef") && doc["kind"] != "Secret",
            "{path}: a Secret"
        );
        if doc["kind"] == "ServiceAccount" {
            assert_eq!(doc["automountServiceAccountToken"], false, "{path}: {doc}");
        }
        let pod = &doc["spec"]["template"]["spec"];
        if pod.is_null() {
            continue;
        }
        let what = format!("{path}: {}", doc["metadata"]["name"]);
        assert_eq!(pod["automountServiceAccountToken"], false, "{what}");
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{what}");
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{what}"
        );
        assert!(!text.contains("\"secret\":"), "{what}: a secret volume");
        for c in items(&pod["initContainers"]).chain(items(&pod["containers"])) {
            let what = format!("{what}/{}", c["name"]);
            let sc = &c["securityContext"];
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
            assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"], "{what}");
            assert!(
                c["resources"]["requests"].is_object(),
                "{what}: no requests"
            );
            assert!(
                c["resources"]["limits"]["memory"].is_string(),
                "{what}: no memory limit"
            );
            let ports: Vec<&str> = items(&c["ports"])
                .filter_map(|p| p["name"].as_str())
                .collect();
            for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
                if let Some(port) = c[probe]["httpGet"]["port"].as_str() {
                    assert!(
                        ports.contains(&port),
                        "{what}: {probe} on unknown port {port}"
                    );
                }
            }
            if c["image"].as_str().is_some_and(|i| i.contains("lanyard")) {
                // The image's ENTRYPOINT is the binary (Dockerfile): manifests give args only.
                assert!(c["command"].is_null(), "{what}: overrides the entrypoint");
            }
        }
    }
}

#[test]
fn kubernetes_ca_is_one_stateful_replica_with_probes_and_a_budget() {
    let Some(docs) = manifests() else { return };
    let sts = find(&docs, "StatefulSet", "lanyard");
    assert_eq!(sts["spec"]["replicas"], 1, "the sled store has one writer");
    let claim = &sts["spec"]["volumeClaimTemplates"][0];
    let c = &sts["spec"]["template"]["spec"]["containers"][0];
    let args = args_of(c);
    assert_eq!(args[0], "serve");
    let data_dir = flag(&args, "data-dir").expect("--data-dir");
    assert!(
        items(&c["volumeMounts"])
            .any(|m| m["name"] == claim["metadata"]["name"] && m["mountPath"] == data_dir),
        "the data dir {data_dir} is not on the claim"
    );
    // Probes on the real health endpoints of the metrics listener the config opens.
    let (config, _) = ca_config(&docs);
    let metrics_port: u16 = config["metrics_listen"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let port_named = |name: &str| {
        items(&c["ports"])
            .find(|p| p["name"] == name)
            .map(|p| p["containerPort"].as_u64().unwrap())
    };
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    let probed = c["readinessProbe"]["httpGet"]["port"].as_str().unwrap();
    assert_eq!(port_named(probed), Some(u64::from(metrics_port)));
    // The Service reaches the gRPC port the config listens on, and only the CA's pods.
    let svc = find(&docs, "Service", "lanyard");
    let listen_port: u64 = config["listen"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let grpc = items(&svc["spec"]["ports"])
        .find(|p| p["name"] == "grpc")
        .unwrap();
    assert_eq!(
        port_named(grpc["targetPort"].as_str().unwrap()),
        Some(listen_port)
    );
    let labels = &sts["spec"]["template"]["metadata"]["labels"];
    for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&labels[k], v, "the Service does not select the CA's pods");
    }
    let pdb = find(&docs, "PodDisruptionBudget", "lanyard");
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        sts["spec"]["selector"]["matchLabels"]
    );
    // The names agents dial are on the CA's serving certificate.
    let server_names: Vec<String> = config["server_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(server_names.contains(&"lanyard.lanyard.svc".to_string()));
    let agent = sidecar_agent(&docs);
    let agent_args = args_of(agent);
    let server = flag(&agent_args, "server").unwrap();
    let host = server.rsplit_once(':').unwrap().0;
    assert!(
        server_names.iter().any(|n| n == host),
        "agents dial {host}, not in server_names"
    );
}

fn sidecar_agent(docs: &[(String, Value)]) -> &Value {
    let deploy = find(docs, "Deployment", "api");
    items(&deploy["spec"]["template"]["spec"]["initContainers"])
        .find(|c| c["name"] == "lanyard-agent")
        .expect("the agent is an init container")
}

#[test]
fn kubernetes_sidecar_attests_with_a_projected_token_before_the_app_starts() {
    let Some(docs) = manifests() else { return };
    let deploy = find(&docs, "Deployment", "api");
    assert!(
        deploy["spec"]["replicas"].as_u64().unwrap() >= 2,
        "one token per pod must not be needed"
    );
    let pod = &deploy["spec"]["template"]["spec"];
    let agent = sidecar_agent(&docs);
    assert_eq!(agent["restartPolicy"], "Always", "a native sidecar");
    let args = args_of(agent);
    // The startup probe holds the app back until the agent has a certificate (/readyz), on the
    // port the agent's metrics listener binds.
    let probe = &agent["startupProbe"]["httpGet"];
    assert_eq!(probe["path"], "/readyz");
    let metrics: u64 = flag(&args, "metrics-listen")
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let port = items(&agent["ports"])
        .find(|p| p["name"] == probe["port"])
        .unwrap();
    assert_eq!(port["containerPort"], metrics);
    // The token: projected with the audience the CA's attestor accepts, at the path the agent reads.
    let jwt_file = flag(&args, "jwt-file").expect("--jwt-file");
    let (config, settings) = ca_config(&docs);
    // The DNS names the agent asks for are ones the CA's policy gives this service account.
    let namespace = deploy["metadata"]["namespace"].as_str().unwrap();
    let account = pod["serviceAccountName"].as_str().unwrap();
    let id = lanyard::spiffe::SpiffeId::parse(&format!(
        "spiffe://{}/ns/{namespace}/sa/{account}",
        settings.trust_domain.as_str()
    ))
    .unwrap();
    let dns: Vec<String> = args
        .iter()
        .filter_map(|a| a.strip_prefix("--dns-name="))
        .map(String::from)
        .collect();
    assert!(!dns.is_empty(), "the sidecar asks for its Service's names");
    let names = lanyard::ca::SanNames { dns, ips: vec![] };
    lanyard::policy::check_names(&settings.policy, &id, &names)
        .unwrap_or_else(|e| panic!("the CA's policy refuses the sidecar's names: {e}"));
    let audiences: Vec<&str> = config["attestor"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"].as_str() == Some("kubernetes"))
        .flat_map(|a| {
            a["audiences"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|v| v.as_str())
        })
        .collect();
    let mut found = false;
    for vol in items(&pod["volumes"]) {
        for source in items(&vol["projected"]["sources"]) {
            let token = &source["serviceAccountToken"];
            if token.is_null() {
                continue;
            }
            let aud = token["audience"]
                .as_str()
                .expect("a token with Lanyard's audience, not the API server's");
            assert!(
                audiences.contains(&aud),
                "audience {aud} is not one the CA accepts: {audiences:?}"
            );
            let ttl = token["expirationSeconds"].as_u64().unwrap();
            assert!((600..=3600).contains(&ttl), "expirationSeconds {ttl}");
            let mount = items(&agent["volumeMounts"])
                .find(|m| m["name"] == vol["name"])
                .unwrap();
            let path = format!(
                "{}/{}",
                mount["mountPath"].as_str().unwrap(),
                token["path"].as_str().unwrap()
            );
            assert_eq!(path, jwt_file);
            found = true;
        }
    }
    assert!(found, "no projected service-account token");
    // The app finds the agent's socket through SPIFFE_ENDPOINT_SOCKET, on a shared volume.
    let socket = flag(&args, "workload-socket").unwrap();
    let app = &pod["containers"][0];
    let endpoint = items(&app["env"])
        .find(|e| e["name"] == "SPIFFE_ENDPOINT_SOCKET")
        .unwrap();
    assert_eq!(
        endpoint["value"].as_str().unwrap(),
        format!("unix://{socket}")
    );
    let dir = Path::new(socket).parent().unwrap().to_str().unwrap();
    let shared = |c: &Value| {
        items(&c["volumeMounts"])
            .find(|m| m["mountPath"] == dir)
            .map(|m| m["name"].clone())
    };
    assert_eq!(shared(agent), shared(app));
    assert!(shared(app).is_some(), "the app does not mount {dir}");
}

#[test]
fn kubernetes_container_commands_parse() {
    let Some(docs) = manifests() else { return };
    let mut n = 0;
    for (path, doc) in &docs {
        let pod = &doc["spec"]["template"]["spec"];
        for c in items(&pod["initContainers"]).chain(items(&pod["containers"])) {
            if !c["image"].as_str().is_some_and(|i| i.contains("lanyard")) {
                continue;
            }
            let env: Vec<(String, String)> = items(&c["env"])
                .filter(|e| {
                    e["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("LANYARD_"))
                })
                .map(|e| {
                    (
                        e["name"].as_str().unwrap().into(),
                        e["value"].as_str().expect("a literal value").into(),
                    )
                })
                .collect();
            parse_cli(&args_of(c), &env, &format!("{path}: {}", c["name"]));
            n += 1;
        }
    }
    assert!(n >= 2, "expected the CA and the agent sidecar");
}

/// Docker cannot run here, so the Dockerfile is checked, not built: its stages, its user, that
/// it copies the file `cargo build --release` writes, and that the files it copies into the
/// builder (all the .dockerignore lets through) are enough for cargo to load the package.
#[test]
fn dockerfile_builds_the_release_binary_and_runs_it_unprivileged() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    // Instructions with their continuation lines joined.
    let joined = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("\\\n", " ");
    let instructions: Vec<(&str, &str)> = joined
        .lines()
        .filter_map(|l| l.trim().split_once(' '))
        .collect();
    let stages: Vec<Vec<&str>> = instructions
        .iter()
        .filter(|(op, _)| *op == "FROM")
        .map(|(_, rest)| rest.split_whitespace().collect())
        .collect();
    assert_eq!(stages.len(), 2, "a builder and a runtime stage: {stages:?}");
    let (builder, runtime) = (&stages[0], &stages[1]);
    assert_eq!(builder.get(1).map(|s| s.to_lowercase()), Some("as".into()));
    let builder_name = builder[2];
    // The toolchain is at least the package's rust-version.
    let manifest: toml::Table = std::fs::read_to_string(root().join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let msrv = manifest["package"]["rust-version"].as_str().unwrap();
    let tag = builder[0]
        .strip_prefix("rust:")
        .expect("the builder is an official rust image");
    let version =
        |v: &str| -> Vec<u32> { v.split(['.', '-']).map_while(|p| p.parse().ok()).collect() };
    assert!(
        version(tag) >= version(msrv),
        "rust {tag} is older than rust-version {msrv}"
    );
    assert!(
        runtime[0].starts_with("debian:") && runtime[0].ends_with("-slim")
            || runtime[0].starts_with("gcr.io/distroless/cc"),
        "the runtime is a minimal Debian image: {}",
        runtime[0]
    );
    // The builder builds the one binary, release, locked, into the default target dir.
    let workdir = instructions
        .iter()
        .find(|(op, _)| *op == "WORKDIR")
        .unwrap()
        .1;
    let build = instructions
        .iter()
        .find(|(op, rest)| *op == "RUN" && rest.contains("cargo build"))
        .expect("a cargo build")
        .1;
    let bin = manifest["bin"][0]["name"].as_str().unwrap();
    for part in ["--release", "--locked", &format!("--bin {bin}")] {
        assert!(build.contains(part), "`{build}` lacks {part}");
    }
    assert!(
        !text.contains("CARGO_TARGET_DIR") && !build.contains("--target"),
        "the binary must land in target/release"
    );
    let expected = format!("{workdir}/target/release/{bin}");
    let copies: Vec<&str> = instructions
        .iter()
        .filter(|(op, rest)| *op == "COPY" && rest.starts_with(&format!("--from={builder_name} ")))
        .map(|(_, rest)| *rest)
        .collect();
    assert_eq!(
        copies.len(),
        1,
        "the runtime takes only the binary from the builder: {copies:?}"
    );
    let copy: Vec<&str> = copies[0].split_whitespace().collect();
    assert_eq!(
        copy[1], expected,
        "the runtime copies what cargo does not write"
    );
    let installed = copy[2];
    // Every manifest and unit runs /usr/local/bin/lanyard; the image's entrypoint is the binary.
    assert_eq!(installed, "/usr/local/bin/lanyard");
    let entrypoint = instructions
        .iter()
        .find(|(op, _)| *op == "ENTRYPOINT")
        .unwrap()
        .1;
    assert_eq!(
        serde_json::from_str::<Vec<String>>(entrypoint).unwrap(),
        [installed]
    );
    // Non-root, numerically (Kubernetes' runAsNonRoot can check only a numeric USER), and the
    // uid the manifests run as.
    let user = instructions
        .iter()
        .rev()
        .find(|(op, _)| *op == "USER")
        .unwrap()
        .1;
    let uid: u32 = user
        .split(':')
        .next()
        .unwrap()
        .parse()
        .expect("a numeric USER");
    assert_ne!(uid, 0, "USER is root");
    let ca = std::fs::read_to_string(root().join("deploy/kubernetes/ca.yaml")).unwrap();
    assert!(
        ca.contains(&format!("runAsUser: {uid}")),
        "ca.yaml runs as another uid than the image's {uid}"
    );
    // The CMD parses with the real CLI.
    let cmd = instructions.iter().find(|(op, _)| *op == "CMD").unwrap().1;
    parse_cli(
        &serde_json::from_str::<Vec<String>>(cmd).unwrap(),
        &[],
        "Dockerfile CMD",
    );

    // The build context: copy what the builder's COPY lines name, and check that the
    // .dockerignore lets each through and that cargo loads the package from it alone.
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    let allowed: Vec<&str> = ignore
        .lines()
        .filter_map(|l| l.strip_prefix('!'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    assert!(
        ignore.lines().any(|l| l.trim() == "*"),
        ".dockerignore must exclude by default (target/, data dirs)"
    );
    let context = tempfile::tempdir().unwrap();
    let mut stage = 0;
    for (op, rest) in &instructions {
        if *op == "FROM" {
            stage += 1;
        }
        if stage != 1 || *op != "COPY" || rest.starts_with("--from") {
            continue;
        }
        let words: Vec<&str> = rest.split_whitespace().collect();
        for src in &words[..words.len() - 1] {
            assert!(
                allowed.contains(src),
                ".dockerignore drops {src}, which the builder copies"
            );
            let from = root().join(src);
            let to = context.path().join(src);
            copy_tree(&from, &to);
        }
    }
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version=1",
            "--no-deps",
            "--offline",
            "--locked",
        ])
        .current_dir(context.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo cannot load the package from the Docker build context: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        items(&meta["packages"][0]["targets"])
            .any(|t| t["name"] == bin && strs(&t["kind"]) == ["bin"]),
        "no {bin} binary in the build context"
    );
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::copy(from, to).unwrap();
    }
}

/// Lanyard hands the SVID to whoever opens the socket, so its mode and group are the access
/// control: the agent sets both before the socket appears under its name.
#[test]
fn agent_gives_the_workload_socket_its_mode_and_group() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    // A group this process may give files to: as root any (1, "daemon" on Debian, so not the
    // default 0); otherwise the primary group.
    let me = std::fs::metadata(dir.path()).unwrap();
    use std::os::unix::fs::MetadataExt;
    let gid = if me.uid() == 0 { 1 } else { me.gid() };
    let token = lanyard::tokens::JoinToken::generate([7; 32], "spiffe://example.org/x");
    // No CA listens on port 1: the agent keeps retrying and serves the socket meanwhile.
    let mut child = Command::new(env!("CARGO_BIN_EXE_lanyard"))
        .args(["agent", "--server", "127.0.0.1:1", "--workload-socket"])
        .arg(&socket)
        .args([
            "--workload-socket-mode",
            "0640",
            "--workload-socket-group",
            &gid.to_string(),
        ])
        .env_clear()
        .env("LANYARD_TOKEN", token.to_token_string())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let meta = loop {
        if let Ok(m) = std::fs::symlink_metadata(&socket) {
            break m;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            panic!("the agent exited ({status}) without a socket: {err}");
        }
        assert!(Instant::now() < deadline, "no socket after 20 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    use std::os::unix::fs::FileTypeExt;
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.mode() & 0o7777, 0o640);
    assert_eq!(meta.gid(), gid);
    assert!(
        !dir.path().join("agent.sock.new").exists(),
        "the staging name is left behind"
    );

    // A group that does not exist is refused at start, with what to do.
    let out = Command::new(env!("CARGO_BIN_EXE_lanyard"))
        .args(["agent", "--server", "127.0.0.1:1", "--workload-socket"])
        .arg(&socket)
        .args(["--workload-socket-group", "no-such-group-lanyard"])
        .env_clear()
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no group \"no-such-group-lanyard\" in /etc/group"),
        "{err}"
    );
}
