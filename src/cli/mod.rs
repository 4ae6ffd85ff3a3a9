//! The `lanyard` command tree.

mod access;
mod admin;
mod agent;
mod audit;
mod issue;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::ca::RolesOid;
use crate::config::{Overrides, ServeSettings};
use crate::telemetry::{self, LogFormat};

/// Exit status for invalid configuration (sysexits EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

/// Lanyard: a certificate authority for minute-scale machine identities.
#[derive(Debug, Parser)]
#[command(name = "lanyard", version, about)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Plain, env = "LANYARD_LOG_FORMAT")]
    log_format: LogFormat,
    /// Log filter (e.g. `info`, `lanyard=debug`).
    #[arg(long, global = true, env = "LANYARD_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// The CA's addresses, for every verb (and the agent) that calls it.
#[derive(Debug, Clone, clap::Args)]
pub struct Servers {
    /// CA address (host:port). Several for failover: repeat the flag or give a comma list; a
    /// name that resolves to several addresses counts as each of them. Calls go to the first
    /// that answers, and move to the next when it fails.
    #[arg(
        long = "server",
        value_name = "HOST:PORT",
        visible_alias = "ca",
        env = "LANYARD_SERVER",
        default_value = "127.0.0.1:8443",
        value_delimiter = ',',
        num_args = 1
    )]
    pub addrs: Vec<String>,
}

impl Servers {
    /// The addresses as the client takes them: one comma-separated list.
    pub fn joined(&self) -> String {
        self.addrs.join(",")
    }
}

/// Where the CA is and which credential to use, for every verb that calls it.
#[derive(Debug, Clone, clap::Args)]
pub struct Conn {
    #[command(flatten)]
    server: Servers,
    /// Credential directory (cert.pem, key.pem, bundle.pem) used for mTLS.
    #[arg(
        long,
        env = "LANYARD_CREDENTIAL",
        default_value = "./lanyard-data/admin"
    )]
    credential: PathBuf,
    /// PEM bundle that authenticates the CA when it is not in the credential's trust domain: an
    /// identity of a federated domain calling this CA (e.g. `access request`) passes the
    /// bundle its agent wrote, `<dir>/federated/<ca's trust domain>.pem`.
    #[arg(long, env = "LANYARD_SERVER_BUNDLE")]
    server_bundle: Option<PathBuf>,
    /// OID of the roles extension, if the CA uses a non-default one.
    #[arg(long, env = "LANYARD_ROLES_OID", default_value = "1.3.9999.7781.1")]
    roles_oid: String,
}

/// The agent's runtime threads at most (`lanyard agent`).
const AGENT_WORKER_THREADS: usize = 2;

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the CA.
    Serve(ServeArgs),
    /// Run the sidecar agent: bootstrap, rotate, write files, serve the Workload API.
    Agent(agent::AgentArgs),
    /// Join tokens.
    #[command(subcommand)]
    Token(admin::TokenCmd),
    /// Get a first certificate with a join token.
    Issue(issue::IssueArgs),
    /// Renew a certificate over mTLS with the current one.
    Renew(issue::RenewArgs),
    /// Print what a certificate says: SPIFFE ID, roles, serial, validity.
    Inspect(issue::InspectArgs),
    /// Revoke a certificate by serial, or every certificate of an identity.
    Revoke(admin::RevokeArgs),
    /// Fetch the CA's signed CRL.
    Crl(admin::CrlArgs),
    /// Print the CA's trust bundle (PEM), or export/import SPIFFE bundles (JWKS).
    Bundle(admin::BundleArgs),
    /// The CA itself: rotate it, or show where a rotation stands (needs lanyard:admin).
    #[command(subcommand)]
    Ca(admin::CaCmd),
    /// The deployment: store, replicas (address, policy, heartbeat), store health, CA (needs
    /// lanyard:admin).
    Status(admin::CaArgs),
    /// Read and verify the audit log.
    #[command(subcommand)]
    Audit(audit::AuditCmd),
    /// Temporary elevated access: request, approve, deny, revoke.
    #[command(subcommand)]
    Access(access::AccessCmd),
    /// Offline maintenance of a stopped CA's data dir.
    #[command(subcommand)]
    Admin(AdminCmd),
    /// The key-encryption key that seals CA keys in a shared store (replicas on etcd).
    #[command(subcommand)]
    Kek(KekCmd),
    /// Print a shell completion script, e.g. `lanyard completions bash >
    /// /etc/bash_completion.d/lanyard` (zsh: into a directory on $fpath as `_lanyard`; fish:
    /// ~/.config/fish/completions/lanyard.fish).
    Completions(CompletionsArgs),
}

/// `lanyard completions` arguments.
#[derive(Debug, clap::Args)]
struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

#[derive(Debug, Subcommand)]
enum KekCmd {
    /// Write 32 random bytes to FILE (mode 0600; never overwrites). Copy the same file to
    /// every replica: a KEK that differs cannot open the CA keys the others sealed.
    Generate {
        /// Where to write the key.
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum AdminCmd {
    /// Recover from an admin lockout on a STOPPED server: lift identity rules on the reserved
    /// /lanyard/ identities and write a fresh admin credential to <data-dir>/admin (audited).
    /// Takes the same configuration as `serve`.
    Recover(ServeArgs),
}

/// `lanyard serve` flags.
#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// TOML config file (settings and policy); reloaded for policy on change or SIGHUP.
    #[arg(long, env = "LANYARD_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (CA key, admin credential, sled store).
    #[arg(long, env = "LANYARD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Listen address (port 0 picks one; it is written to <data-dir>/serve.addr).
    #[arg(long, env = "LANYARD_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// Trust domain, e.g. example.org.
    #[arg(long, env = "LANYARD_TRUST_DOMAIN")]
    trust_domain: Option<String>,
    /// Key-encryption key file (32 random bytes, mode 0600) sealing the CA keys in a shared
    /// store; the same file on every replica (`lanyard kek generate FILE`).
    #[arg(long, env = "LANYARD_KEK_FILE")]
    kek_file: Option<PathBuf>,
    /// This replica's name in `lanyard status` (default: host name and listen port).
    #[arg(long, env = "LANYARD_REPLICA_ID")]
    replica_id: Option<String>,
    /// Shared state for several replicas: etcd://host:port[,host:port...] (default: sled in
    /// the data dir).
    #[arg(long, env = "LANYARD_STORE")]
    store: Option<String>,
    /// Key prefix in etcd [default: /lanyard/<trust-domain>/].
    #[arg(long, env = "LANYARD_ETCD_PREFIX")]
    etcd_prefix: Option<String>,
    /// PEM CA bundle verifying the etcd members (turns on TLS to etcd).
    #[arg(long, env = "LANYARD_ETCD_CA_FILE")]
    etcd_ca_file: Option<PathBuf>,
    /// PEM client certificate for etcd.
    #[arg(long, env = "LANYARD_ETCD_CERT_FILE", requires = "etcd_key_file")]
    etcd_cert_file: Option<PathBuf>,
    /// PEM private key of --etcd-cert-file.
    #[arg(long, env = "LANYARD_ETCD_KEY_FILE", requires = "etcd_cert_file")]
    etcd_key_file: Option<PathBuf>,
    /// DNS name or IP literal for the CA's serving certificate (repeatable; replaces the
    /// config's server_names; default localhost, 127.0.0.1, ::1).
    #[arg(
        long = "server-name",
        env = "LANYARD_SERVER_NAMES",
        value_delimiter = ','
    )]
    server_names: Vec<String>,
}

/// Parses arguments, runs the command, and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Completions(a) = &cli.command {
        return completions(a.shell);
    }
    let default_level = if matches!(cli.command, Command::Serve(_) | Command::Agent(_)) {
        "info"
    } else {
        "warn"
    };
    let filter = match (&cli.log, std::env::var("RUST_LOG")) {
        (Some(spec), _) => telemetry::parse_filter(spec, "LANYARD_LOG or --log", default_level),
        (None, Ok(spec)) => telemetry::parse_filter(&spec, "RUST_LOG", default_level),
        (None, Err(_)) => telemetry::parse_filter("", "", default_level),
    };
    let filter = match filter {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let ansi = telemetry::use_ansi(
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    telemetry::init(cli.log_format, filter, ansi);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if matches!(cli.command, Command::Agent(_)) {
        // Before any thread starts (the builder has started none): an exec replaces the
        // whole process.
        agent::fix_malloc_thresholds();
        // A sidecar runs beside every workload: it renews, follows two streams and serves a
        // few local clients, which two threads carry on any host. One per core (tokio's
        // default) would give an agent on a 64-core node 64 threads, each with its stack
        // and malloc arena.
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        builder.worker_threads(cores.min(AGENT_WORKER_THREADS));
    }
    if matches!(cli.command, Command::Serve(_)) {
        crate::server::tune_runtime(&mut builder);
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Serve(a) => serve(a).await,
        Command::Agent(a) => agent::run(a).await,
        Command::Token(c) => admin::token(c).await,
        Command::Issue(a) => issue::issue(a).await,
        Command::Renew(a) => issue::renew(a).await,
        Command::Inspect(a) => issue::inspect(a),
        Command::Revoke(a) => admin::revoke(a).await,
        Command::Crl(a) => admin::crl(a).await,
        Command::Bundle(a) => admin::bundle(a).await,
        Command::Ca(c) => admin::ca(c).await,
        Command::Status(a) => admin::status(a).await,
        Command::Audit(c) => audit::run(c).await,
        Command::Access(c) => access::run(c).await,
        Command::Admin(AdminCmd::Recover(a)) => recover(a).await,
        Command::Kek(KekCmd::Generate { file }) => {
            crate::ca::Kek::generate(&file)?;
            eprintln!(
                "wrote a key-encryption key to {} (mode 0600); copy it to every replica and pass --kek-file",
                file.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions(a) => Ok(completions(a.shell)),
    }
}

/// Writes the completion script for `shell` to stdout, as clap generates it from the command
/// tree (so it never drifts from the flags).
fn completions(shell: clap_complete::Shell) -> ExitCode {
    use clap::CommandFactory;
    let mut out = std::io::stdout();
    clap_complete::generate(shell, &mut Cli::command(), "lanyard", &mut out);
    ExitCode::SUCCESS
}

impl ServeArgs {
    /// The resolved settings, or the config error printed and exit status 64.
    fn settings(self) -> Result<ServeSettings, ExitCode> {
        ServeSettings::resolve(
            self.config.as_deref(),
            Overrides {
                trust_domain: self.trust_domain,
                data_dir: self.data_dir,
                listen: self.listen,
                kek_file: self.kek_file,
                replica_id: self.replica_id,
                store: self.store,
                etcd_prefix: self.etcd_prefix,
                etcd_ca_file: self.etcd_ca_file,
                etcd_cert_file: self.etcd_cert_file,
                etcd_key_file: self.etcd_key_file,
                server_names: self.server_names,
            },
        )
        .map_err(|e| {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_CONFIG)
        })
    }
}

#[expect(clippy::print_stdout, reason = "the command's report is its output")]
async fn recover(a: ServeArgs) -> anyhow::Result<ExitCode> {
    let settings = match a.settings() {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    let done = crate::server::recover(settings).await?;
    for id in &done.lifted {
        println!("lifted the identity rule on {id}");
    }
    if done.lifted.is_empty() {
        println!("no identity rule on a reserved identity was in force");
    }
    println!(
        "wrote a fresh admin credential to {} (serial {})",
        done.admin_dir.display(),
        done.serial
    );
    Ok(ExitCode::SUCCESS)
}

async fn serve(a: ServeArgs) -> anyhow::Result<ExitCode> {
    let settings = match a.settings() {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    // The handlers are installed before the server starts: a SIGTERM that arrives as soon as
    // serve.addr exists (a supervisor, a test) must stop it cleanly, not kill it.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
    let shutdown = async move {
        tokio::select! {
            Some(()) = recv_signal(int.as_mut()) => {}
            Some(()) = recv_signal(term.as_mut()) => {}
            // Both streams closed (never in practice): keep serving rather than stop.
            else => std::future::pending::<()>().await,
        }
        tracing::info!("shutting down");
    };
    crate::server::run(settings, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// The next delivery of a signal, or never if its handler could not be installed.
async fn recv_signal(s: Option<&mut tokio::signal::unix::Signal>) -> Option<()> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

impl Conn {
    fn oid(&self) -> anyhow::Result<RolesOid> {
        Ok(RolesOid::parse(&self.roles_oid)?)
    }

    /// A channel authenticated with the credential directory.
    async fn channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        let oid = self.oid()?;
        let cred = crate::client::Credential::load(&self.credential, &oid).map_err(|e| {
            anyhow::anyhow!("{e} (set --credential or LANYARD_CREDENTIAL to a directory with cert.pem, key.pem, bundle.pem)")
        })?;
        let bundle = match &self.server_bundle {
            Some(p) => crate::tls::Bundle::from_pem(
                &std::fs::read(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
            )
            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
            None => cred.bundle.clone(),
        };
        let trust = crate::tls::ServerTrust::Bundle(bundle);
        Ok(crate::client::connect(&self.server.joined(), trust, Some(cred.slot()?), oid).await?)
    }
}

/// Turns a gRPC status into an error a person can act on.
fn rpc_error(s: tonic::Status) -> anyhow::Error {
    let msg = s.message();
    if s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Unknown {
        let detail = std::error::Error::source(&s)
            .map(crate::client::error_chain)
            .unwrap_or_default();
        return anyhow::anyhow!("{:?}: {msg} {detail}", s.code());
    }
    anyhow::anyhow!("{:?}: {msg}", s.code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
