//! `lanyard agent`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, info};

use crate::agent::{Agent, AgentConfig, SocketAccess, serve_workload_api};
use crate::ca::RolesOid;
use crate::config::parse_duration;

#[derive(Debug, clap::Args)]
pub(super) struct AgentArgs {
    #[command(flatten)]
    server: super::Servers,
    /// Join token for the first certificate (not needed when --out already holds a credential
    /// that can still renew).
    #[arg(long, env = "LANYARD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Attest with the JWT in this file instead of a join token (e.g. a Kubernetes projected
    /// service-account token with the CA's audience); re-read at every bootstrap, since the
    /// kubelet rotates it. Needs --bundle.
    #[arg(
        long,
        env = "LANYARD_JWT_FILE",
        conflicts_with = "token",
        requires = "bundle"
    )]
    jwt_file: Option<PathBuf>,
    /// SPIFFE ID to ask for, when the token is for a /prefix/*.
    #[arg(long)]
    spiffe_id: Option<String>,
    /// Trust this CA bundle for the first call instead of the token's CA fingerprint.
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// Write cert.pem, key.pem (0600), bundle.pem, svid.pem (key + chain) and crl.pem (the CA's
    /// CRLs, kept fresh) here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Keep data the agent can rebuild from the CA here (a revocation table past 65,536
    /// serials, in a file without a name) instead of in --out: a directory on a disk when
    /// --out is tmpfs. Default: --out.
    #[arg(long, env = "LANYARD_AGENT_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Serve the SPIFFE Workload API on this unix socket: a path, or a `unix:` URI as SPIFFE
    /// clients take it (`unix:///run/lanyard/agent.sock` is `/run/lanyard/agent.sock`).
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET", value_parser = parse_socket)]
    workload_socket: Option<PathBuf>,
    /// Most Workload API connections served at once; more are closed at accept.
    #[arg(long, default_value_t = crate::agent::DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    workload_max_connections: u32,
    /// Permission bits of the Workload API socket, in octal (e.g. 0660). Whoever can open the
    /// socket gets this agent's identity; default: what the umask leaves.
    #[arg(long, env = "LANYARD_WORKLOAD_SOCKET_MODE", value_parser = parse_mode)]
    workload_socket_mode: Option<u32>,
    /// Group (name from /etc/group, or numeric id) that owns the Workload API socket, so
    /// workloads of that group can connect without running as the agent's user. The agent must
    /// be a member.
    #[arg(long, env = "LANYARD_WORKLOAD_SOCKET_GROUP")]
    workload_socket_group: Option<String>,
    /// Serve Prometheus metrics (/metrics), /healthz and /readyz (200 once the agent holds a
    /// valid certificate) over plain HTTP on this address, e.g. 127.0.0.1:9091. Off by default.
    #[arg(long, env = "LANYARD_AGENT_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Run this shell command after each rotation and bundle change, and after each CRL change
    /// unless --on-crl-change is given (e.g. 'nginx -s reload'). $LANYARD_EVENT says which:
    /// rotate, bundle or crl.
    #[arg(long)]
    on_rotate: Option<String>,
    /// Run this shell command instead of --on-rotate after each CRL change (crl.pem and the
    /// Workload API's CRLs): a new revocation, or the refresh before nextUpdate.
    #[arg(long)]
    on_crl_change: Option<String>,
    /// Requested certificate lifetime (default: the CA's default, capped by policy).
    #[arg(long, value_parser = parse_duration)]
    ttl: Option<Duration>,
    /// Renew after this fraction of the lifetime (jittered by ±10 % of the lifetime).
    #[arg(long, default_value_t = 0.5)]
    renew_at: f64,
    /// Longest wait between retries while the CA is unreachable.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    max_backoff: Duration,
    /// OID of the roles extension.
    #[arg(long, env = "LANYARD_ROLES_OID", default_value = "1.3.9999.7781.1")]
    roles_oid: String,
    /// DNS name to ask for in every certificate (repeatable; policy must allow it).
    #[arg(long = "dns-name", value_name = "NAME")]
    dns_names: Vec<String>,
    /// IP address to ask for in every certificate (repeatable; policy must allow it).
    #[arg(long = "ip", value_name = "ADDR")]
    ips: Vec<std::net::IpAddr>,
}

/// glibc's classic malloc thresholds (decision 123). Setting either turns off glibc's dynamic
/// adjustment, which after an agent's catch-up on a large CRL raises them to up to 32 and 64 MiB
/// and keeps 3-5 MiB of freed memory in the arenas for the agent's life.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MALLOC_FIXED: [(&str, &str); 2] = [
    ("MALLOC_MMAP_THRESHOLD_", "131072"),
    ("MALLOC_TRIM_THRESHOLD_", "131072"),
];

/// Runs this process again, same pid and arguments, with [`MALLOC_FIXED`] in its environment,
/// unless either variable is already set (the operator's own values, or the re-executed run).
/// glibc reads them only when a process starts, and `mallopt` is a foreign call the crate does
/// not make. Returns only if the agent runs as it is: not glibc, variables set, or exec failed.
pub(super) fn fix_malloc_thresholds() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        if MALLOC_FIXED
            .iter()
            .any(|(name, _)| std::env::var_os(name).is_some())
        {
            return;
        }
        let mut args = std::env::args_os();
        let arg0 = args.next().unwrap_or_else(|| "lanyard".into());
        let err = std::process::Command::new("/proc/self/exe")
            .arg0(arg0)
            .args(args)
            .envs(MALLOC_FIXED)
            .exec();
        tracing::warn!(
            error = %err,
            "could not re-execute with glibc's malloc thresholds fixed; running with glibc's \
             defaults (set MALLOC_MMAP_THRESHOLD_=131072 and MALLOC_TRIM_THRESHOLD_=131072 to \
             keep idle memory low after a large CRL)"
        );
    }
}

pub(super) async fn run(a: AgentArgs) -> anyhow::Result<ExitCode> {
    if !(0.05..=0.95).contains(&a.renew_at) {
        anyhow::bail!("--renew-at must be between 0.05 and 0.95");
    }
    if let Some(dir) = &a.cache_dir {
        // At start, so a wrong path is an error now, not a warning when the table first grows.
        std::fs::create_dir_all(dir)
            .and_then(|()| tempfile::tempfile_in(dir).map(drop))
            .map_err(|e| {
                anyhow::anyhow!("--cache-dir {}: cannot write there: {e}", dir.display())
            })?;
    }
    if a.out.is_none() && a.workload_socket.is_none() {
        anyhow::bail!(
            "give --out, --workload-socket, or both: otherwise nobody can use the certificate"
        );
    }
    let access = SocketAccess {
        mode: a.workload_socket_mode,
        gid: a
            .workload_socket_group
            .as_deref()
            .map(resolve_group)
            .transpose()?,
    };
    let cfg = AgentConfig {
        token: a.token,
        jwt_file: a.jwt_file,
        spiffe_id: a.spiffe_id,
        bundle: a.bundle,
        out_dir: a.out,
        cache_dir: a.cache_dir,
        workload_socket: a.workload_socket.clone(),
        // An empty hook (e.g. an unset variable in a unit file) means no hook.
        on_rotate: a.on_rotate.filter(|c| !c.trim().is_empty()),
        on_crl_change: a.on_crl_change.filter(|c| !c.trim().is_empty()),
        ttl: a.ttl,
        renew_fraction: a.renew_at,
        max_backoff: a.max_backoff,
        roles_oid: RolesOid::parse(&a.roles_oid)?,
        names: super::issue::requested_names(&a.dns_names, &a.ips)?,
        ..AgentConfig::new(a.server.joined())
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            Some(()) = async { match term.as_mut() { Some(t) => t.recv().await, None => std::future::pending().await } } => {}
        }
        let _ = stop_tx.send(true);
    });
    let agent = Agent::new(cfg);
    if let Some(at) = a.metrics_listen {
        // Bound before anything else runs, so a port in use fails the start, not a probe later.
        let listener = crate::metrics::bind(at)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {at} for metrics: {e}"))?;
        info!(addr = %listener.local_addr()?, "serving metrics, /healthz and /readyz");
        let exporter = crate::metrics::AgentExporter::new(agent.subscribe());
        tokio::spawn(crate::metrics::serve(listener, exporter, stop_rx.clone()));
    }
    if let Some(path) = a.workload_socket {
        let state = agent.subscribe();
        let stop = stop_rx.clone();
        let max_connections = a.workload_max_connections;
        tokio::spawn(async move {
            if let Err(e) = serve_workload_api(&path, access, state, stop, max_connections).await {
                error!(socket = %path.display(), error = %e, "workload API stopped");
            }
        });
    }
    match agent.run(stop_rx).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            error!(error = %e, "agent stopped");
            eprintln!("error: {e}");
            Ok(ExitCode::from(e.exit_code()))
        }
    }
}

/// Reads a Workload API socket the way SPIFFE clients read `SPIFFE_ENDPOINT_SOCKET`
/// (`unix:///abs/path` or `unix:/abs/path`), and a bare path as a path. Without this,
/// `unix:///run/x.sock` became the relative path `./unix:/run/x.sock`.
fn parse_socket(s: &str) -> Result<PathBuf, String> {
    let Some(rest) = s.strip_prefix("unix:") else {
        if s.contains("://") {
            return Err(format!(
                "{s:?}: the agent serves the Workload API on a unix socket only; give a path or unix:///path"
            ));
        }
        if s.is_empty() {
            return Err("empty socket path".into());
        }
        return Ok(PathBuf::from(s));
    };
    // `unix://host/path` would name a host, which a unix socket cannot have; the SPIFFE
    // Workload Endpoint spec allows no authority, query or fragment.
    let path = match rest.strip_prefix("//") {
        Some(after) if after.starts_with('/') => after,
        Some(_) => {
            return Err(format!(
                "{s:?}: a unix socket URI has no host; write unix:///absolute/path"
            ));
        }
        None => rest,
    };
    if !path.starts_with('/') || path.contains(['?', '#']) {
        return Err(format!(
            "{s:?}: a unix socket URI takes an absolute path and nothing else, e.g. unix:///run/lanyard/agent.sock"
        ));
    }
    Ok(PathBuf::from(path))
}

/// Reads a socket mode in octal, as chmod takes it: permission bits only (no setuid, setgid or
/// sticky bit, which mean nothing on a socket).
fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s, 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err(format!(
            "{s:?}: give permission bits in octal, 0 to 0777 (e.g. 0660)"
        )),
    }
}

/// A group name from /etc/group, or a numeric id as is. Read at start, not at parse time, so a
/// command line can be checked on a machine without that group.
fn resolve_group(spec: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = spec.parse::<u32>() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group")
        .map_err(|e| anyhow::anyhow!("cannot read /etc/group to find group {spec:?}: {e}"))?;
    group_id(&groups, spec).ok_or_else(|| {
        anyhow::anyhow!(
            "--workload-socket-group: no group {spec:?} in /etc/group (create it, e.g. with systemd-sysusers, or give its numeric id)"
        )
    })
}

/// The id of `name` in an /etc/group file (`name:password:gid:members`).
fn group_id(groups: &str, name: &str) -> Option<u32> {
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name)
            .then(|| fields.nth(1)?.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_modes_are_octal_permission_bits() {
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("600"), Ok(0o600));
        for bad in ["", "0888", "4660", "rw-rw----", "-1"] {
            assert!(parse_mode(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn groups_resolve_by_name_from_etc_group() {
        let groups = "root:x:0:\n# comment\nlanyard-workload:x:998:lanyard-agent,api\nbad:x:nan:\n";
        assert_eq!(group_id(groups, "lanyard-workload"), Some(998));
        assert_eq!(group_id(groups, "root"), Some(0));
        assert_eq!(group_id(groups, "lanyard"), None);
        assert_eq!(group_id(groups, "bad"), None);
        assert_eq!(resolve_group("1234").unwrap(), 1234);
    }

    #[test]
    fn workload_socket_takes_paths_and_unix_uris() {
        let ok = |s: &str| parse_socket(s).map(|p| p.display().to_string());
        assert_eq!(ok("unix:///run/x.sock").as_deref(), Ok("/run/x.sock"));
        assert_eq!(ok("unix:/run/x.sock").as_deref(), Ok("/run/x.sock"));
        assert_eq!(ok("/run/x.sock").as_deref(), Ok("/run/x.sock"));
        assert_eq!(ok("rel/x.sock").as_deref(), Ok("rel/x.sock"));
        for bad in [
            "",
            "unix://host/x.sock",
            "unix:rel.sock",
            "unix:///x.sock?a=b",
            "tcp://127.0.0.1:8081",
        ] {
            assert!(parse_socket(bad).is_err(), "{bad:?} accepted");
        }
    }
}
