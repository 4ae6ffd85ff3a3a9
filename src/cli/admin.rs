//! Admin verbs: tokens, revocation, CRL, bundle.
#![expect(clippy::print_stdout, reason = "the CLI's output is its job")]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use super::{Conn, rpc_error};
use crate::config::parse_duration;
use crate::pb::v1::{
    self as pb, admin_client::AdminClient, ca_client::CaClient, revocation_client::RevocationClient,
};

#[derive(Debug, Subcommand)]
pub(super) enum TokenCmd {
    /// Mint a join token (needs lanyard:admin).
    Create(TokenCreate),
    /// List join tokens: id, SPIFFE ID, uses left, expiry, creator, revocation; never the
    /// secret (needs lanyard:admin; audited).
    List(TokenList),
    /// Revoke a join token by id: its redemption is refused from now on (needs lanyard:admin;
    /// audited).
    Revoke(TokenRevoke),
}

#[derive(Debug, clap::Args)]
pub(super) struct TokenList {
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, clap::Args)]
pub(super) struct TokenRevoke {
    /// The token id (hex), as `token create` printed it and `token list` shows it.
    id: String,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, clap::Args)]
pub(super) struct TokenCreate {
    /// SPIFFE ID the token is bound to, or spiffe://td/prefix/* for any ID below a prefix.
    #[arg(long)]
    spiffe_id: String,
    /// Roles the certificate may carry (comma-separated); each must be allowed by policy.
    #[arg(long, value_delimiter = ',')]
    roles: Vec<String>,
    /// Longest certificate lifetime (default: the policy maximum).
    #[arg(long, value_parser = parse_duration)]
    max_ttl: Option<std::time::Duration>,
    /// Token lifetime (default: the server's token_ttl, 1h).
    #[arg(long, value_parser = parse_duration)]
    expires_in: Option<std::time::Duration>,
    /// How many issuances the token allows.
    #[arg(long, default_value_t = 1)]
    uses: u32,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, clap::Args)]
pub(super) struct RevokeArgs {
    /// Serial number (hex, colons allowed).
    #[arg(
        long,
        conflicts_with = "spiffe_id",
        required_unless_present = "spiffe_id"
    )]
    serial: Option<String>,
    /// SPIFFE ID: revoke every certificate of it and refuse new ones until lifted.
    #[arg(long)]
    spiffe_id: Option<String>,
    /// Why (recorded in the audit log).
    #[arg(long)]
    reason: String,
    /// With --spiffe-id: allow new certificates again (old ones stay revoked).
    #[arg(long, requires = "spiffe_id")]
    lift: bool,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, clap::Args)]
pub(super) struct CrlArgs {
    /// Write the CRL here (PEM). During a CA rotation the file holds two CRLs, the signing
    /// CA's and the retiring CA's (OpenSSL's `-CRLfile` and nginx's `ssl_crl` read them all).
    #[arg(long)]
    out: PathBuf,
    /// Write DER instead of PEM: the signing CA's CRL only.
    #[arg(long)]
    der: bool,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(super) struct BundleArgs {
    #[command(subcommand)]
    cmd: Option<BundleCmd>,
    /// Write the bundle here instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, Subcommand)]
pub(super) enum BundleCmd {
    /// Print a trust bundle in the SPIFFE bundle format (JWKS with spiffe_sequence and
    /// spiffe_refresh_hint): the CA's own, or a federated domain's with --trust-domain.
    Export(BundleExport),
    /// Install (or replace) a federated trust domain's bundle by hand (needs lanyard:admin).
    Import(BundleImport),
    /// Stop trusting a federated trust domain (needs lanyard:admin).
    Remove(BundleRemove),
}

#[derive(Debug, clap::Args)]
pub(super) struct BundleRemove {
    /// The federated trust domain, e.g. b.example.
    #[arg(long)]
    trust_domain: String,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, clap::Args)]
pub(super) struct BundleExport {
    /// A federated trust domain (default: the CA's own).
    #[arg(long)]
    trust_domain: Option<String>,
    /// Write the document here instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, clap::Args)]
pub(super) struct BundleImport {
    /// The federated trust domain the bundle belongs to, e.g. b.example.
    #[arg(long)]
    trust_domain: String,
    /// A SPIFFE bundle document (JWKS) or PEM CA certificates; `-` reads stdin.
    file: PathBuf,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, Subcommand)]
pub(super) enum CaCmd {
    /// Start a CA rotation: a new CA is published next to the current one at once, signs after
    /// ca_rotation_overlap, and the old one leaves the bundle once its last certificate expired.
    Rotate(CaArgs),
    /// Show the CA and any rotation in progress.
    Status(CaArgs),
}

#[derive(Debug, clap::Args)]
pub(super) struct CaArgs {
    #[command(flatten)]
    conn: Conn,
}

pub(super) async fn ca(cmd: CaCmd) -> anyhow::Result<ExitCode> {
    let (rotate, conn) = match cmd {
        CaCmd::Rotate(a) => (true, a.conn),
        CaCmd::Status(a) => (false, a.conn),
    };
    let mut client = AdminClient::new(conn.channel().await?);
    let s = if rotate {
        client.rotate_ca(pb::RotateCaRequest {}).await
    } else {
        client.get_ca_status(pb::GetCaStatusRequest {}).await
    }
    .map_err(rpc_error)?
    .into_inner();
    let when = |t: i64| crate::issuance::fmt_time(t);
    println!("phase: {}", s.phase);
    println!("signing CA: {}", s.active_fingerprint);
    if !s.staged_fingerprint.is_empty() {
        println!(
            "staged CA: {} (signs from {})",
            s.staged_fingerprint,
            when(s.switch_at)
        );
    }
    if !s.retiring_fingerprint.is_empty() {
        println!(
            "retiring CA: {} (trusted until {})",
            s.retiring_fingerprint,
            when(s.drop_at)
        );
    } else if s.drop_at > 0 {
        println!(
            "the current CA leaves the bundle at about {}",
            when(s.drop_at)
        );
    }
    println!("bundle sequence: {}", s.sequence);
    Ok(ExitCode::SUCCESS)
}

/// `lanyard status`: the store, the replicas, the store's health and the CA.
pub(super) async fn status(a: CaArgs) -> anyhow::Result<ExitCode> {
    let mut client = AdminClient::new(a.conn.channel().await?);
    let s = client
        .get_status(pb::GetStatusRequest {})
        .await
        .map_err(rpc_error)?
        .into_inner();
    let now = crate::tls::unix_now();
    println!("store: {} (answered by replica {})", s.store, s.replica_id);
    println!("replicas:");
    let mut mismatch = false;
    for r in &s.replicas {
        mismatch |= r.live && !r.policy_matches;
        println!(
            "  {:<20} {:<24} {:<4} heartbeat {}s ago  policy {}{}  up since {}",
            r.id,
            r.address,
            if r.live { "up" } else { "DOWN" },
            (now - r.heartbeat).max(0),
            r.policy_sha256.get(..12).unwrap_or(&r.policy_sha256),
            if r.policy_matches { "" } else { " (DIFFERS)" },
            crate::issuance::fmt_time(r.started_at),
        );
    }
    if mismatch {
        println!(
            "warning: live replicas have different policies; deploy the same policy file to every replica"
        );
    }
    if let Some(h) = s.store_health.as_ref().filter(|h| h.error.is_empty())
        && s.store == "etcd"
    {
        // What the answering replica's store writes now (design decision 124).
        if h.binary_records {
            println!("records: binary (every registered replica reads them)");
        } else {
            let json_only: Vec<&str> = s
                .replicas
                .iter()
                .filter(|r| !r.binary_records)
                .map(|r| r.id.as_str())
                .collect();
            println!(
                "records: JSON (registered replicas that read only JSON: {})",
                if json_only.is_empty() {
                    "none listed; an entry that does not decode counts as one".to_string()
                } else {
                    json_only.join(", ")
                }
            );
        }
    }
    if let Some(h) = &s.store_health {
        if h.error.is_empty() {
            println!("store health: {} database {} bytes", h.location, h.db_size);
            if !h.members.is_empty() {
                let leader = if h.leader == 0 {
                    "NONE (no quorum: writes stall)".to_string()
                } else {
                    format!("{:x}", h.leader)
                };
                println!("  etcd leader {leader}, raft term {}", h.raft_term);
            }
            for a in &h.alarms {
                println!(
                    "  ALARM {a}: etcd refuses writes until it is cleared (NOSPACE: archive the audit log with `lanyard audit export --prune`, compact and defrag, then `etcdctl alarm disarm`)"
                );
            }
        } else {
            println!("store health: unavailable: {}", h.error);
        }
        for m in &h.members {
            println!(
                "  member {:x} {} {}{}",
                m.id,
                m.name,
                m.client_urls.join(","),
                if m.id == h.leader { " (leader)" } else { "" }
            );
        }
    }
    if let Some(ca) = &s.ca {
        println!("CA: {} ({})", ca.active_fingerprint, ca.phase);
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn token(cmd: TokenCmd) -> anyhow::Result<ExitCode> {
    let a = match cmd {
        TokenCmd::Create(a) => a,
        TokenCmd::List(a) => return token_list(a).await,
        TokenCmd::Revoke(a) => return token_revoke(a).await,
    };
    let mut client = AdminClient::new(a.conn.channel().await?);
    let secs =
        |d: Option<std::time::Duration>| d.map_or(0, |d| d.as_secs().min(u32::MAX as u64) as u32);
    let resp = client
        .create_join_token(pb::CreateJoinTokenRequest {
            spiffe_id: a.spiffe_id,
            roles: a.roles,
            max_ttl_seconds: secs(a.max_ttl),
            expires_in_seconds: secs(a.expires_in),
            uses: a.uses,
        })
        .await
        .map_err(rpc_error)?
        .into_inner();
    eprintln!(
        "token {} expires at {}",
        resp.token_id,
        crate::issuance::fmt_time(resp.expires_at)
    );
    println!("{}", resp.token);
    Ok(ExitCode::SUCCESS)
}

async fn token_list(a: TokenList) -> anyhow::Result<ExitCode> {
    let mut client = AdminClient::new(a.conn.channel().await?);
    let resp = client
        .list_join_tokens(pb::ListJoinTokensRequest {})
        .await
        .map_err(rpc_error)?
        .into_inner();
    let time = crate::issuance::fmt_time;
    if a.json {
        for t in &resp.tokens {
            let mut v = serde_json::json!({
                "id": t.token_id, "spiffe_id": t.spiffe_id, "roles": t.roles,
                "max_ttl_seconds": t.max_ttl_seconds, "uses_left": t.uses_left,
                "expires_at": time(t.expires_at), "created_by": t.created_by,
            });
            if !t.revoked_by.is_empty() {
                v["revoked_by"] = t.revoked_by.clone().into();
                v["revoked_at"] = time(t.revoked_at).into();
            }
            println!("{v}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<16}  {:<40}  {:>4}  {:<20}  {:<40}  STATE",
        "ID", "SPIFFE ID", "USES", "EXPIRES", "CREATED BY"
    );
    let now = crate::tls::unix_now();
    for t in &resp.tokens {
        let state = if !t.revoked_by.is_empty() {
            format!("revoked by {} at {}", t.revoked_by, time(t.revoked_at))
        } else if t.expires_at <= now {
            "expired".into()
        } else if t.uses_left == 0 {
            "used".into()
        } else {
            "live".into()
        };
        println!(
            "{:<16}  {:<40}  {:>4}  {:<20}  {:<40}  {state}",
            t.token_id,
            t.spiffe_id,
            t.uses_left,
            time(t.expires_at),
            t.created_by
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn token_revoke(a: TokenRevoke) -> anyhow::Result<ExitCode> {
    let mut client = AdminClient::new(a.conn.channel().await?);
    let t = client
        .revoke_join_token(pb::RevokeJoinTokenRequest { token_id: a.id })
        .await
        .map_err(rpc_error)?
        .into_inner();
    println!("revoked join token {} for {}", t.token_id, t.spiffe_id);
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn revoke(a: RevokeArgs) -> anyhow::Result<ExitCode> {
    use pb::revoke_request::Target;
    let target = match (a.serial, a.spiffe_id) {
        (Some(s), _) => Target::Serial(s),
        (None, Some(id)) => Target::SpiffeId(id),
        (None, None) => anyhow::bail!("give --serial or --spiffe-id"),
    };
    let mut client = RevocationClient::new(a.conn.channel().await?);
    let resp = client
        .revoke(pb::RevokeRequest {
            target: Some(target),
            reason: a.reason,
            lift: a.lift,
        })
        .await
        .map_err(rpc_error)?
        .into_inner();
    let serials = resp.entries.iter().filter(|e| !e.identity_rule).count();
    for e in &resp.entries {
        if e.identity_rule {
            let state = if e.blocked {
                format!(
                    "revoked with {serials} live certificates; new certificates refused until --lift"
                )
            } else {
                "lifted: new certificates allowed; earlier ones stay revoked".into()
            };
            println!("identity {} {state} (rev {})", e.spiffe_id, e.rev);
        } else if resp.entries.len() == 1 {
            println!(
                "serial {} of {} revoked (rev {})",
                e.serial, e.spiffe_id, e.rev
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn crl(a: CrlArgs) -> anyhow::Result<ExitCode> {
    let mut client = crate::client::crl_client(a.conn.channel().await?);
    let crl = client
        .get_crl(pb::GetCrlRequest {})
        .await
        .map_err(rpc_error)?
        .into_inner();
    let n = 1 + crl.retiring.len();
    let data = if a.der {
        crl.der
    } else {
        std::iter::once(&crl.der)
            .chain(&crl.retiring)
            .map(|der| crate::ca::pem_encode("X509 CRL", der))
            .collect::<String>()
            .into_bytes()
            .into()
    };
    crate::fsutil::write_atomic(&a.out, &data, 0o644)?;
    if a.der || n == 1 {
        eprintln!("CRL written to {}", a.out.display());
    } else {
        eprintln!(
            "{n} CRLs written to {} (the signing CA's, then the retiring CA's)",
            a.out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn bundle(a: BundleArgs) -> anyhow::Result<ExitCode> {
    match a.cmd {
        Some(BundleCmd::Export(e)) => return bundle_export(e).await,
        Some(BundleCmd::Import(i)) => return bundle_import(i).await,
        Some(BundleCmd::Remove(r)) => {
            AdminClient::new(r.conn.channel().await?)
                .remove_bundle(pb::RemoveBundleRequest {
                    trust_domain: r.trust_domain.clone(),
                })
                .await
                .map_err(rpc_error)?;
            println!("{} is no longer trusted", r.trust_domain);
            return Ok(ExitCode::SUCCESS);
        }
        None => {}
    }
    let mut client = CaClient::new(a.conn.channel().await?);
    let b = client
        .get_trust_bundle(pb::GetTrustBundleRequest {})
        .await
        .map_err(rpc_error)?
        .into_inner();
    let certs: Vec<rustls_pki_types::CertificateDer<'_>> =
        b.ca_certs.into_iter().map(Into::into).collect();
    let text = crate::ca::certs_to_pem(&certs);
    match a.out {
        Some(p) => crate::fsutil::write_atomic(&p, text.as_bytes(), 0o644)?,
        None => print!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}

async fn bundle_export(a: BundleExport) -> anyhow::Result<ExitCode> {
    let mut client = CaClient::new(a.conn.channel().await?);
    let b = client
        .get_spiffe_bundle(pb::GetSpiffeBundleRequest {
            trust_domain: a.trust_domain.unwrap_or_default(),
        })
        .await
        .map_err(rpc_error)?
        .into_inner();
    let mut text = b.jwks;
    text.push('\n');
    match a.out {
        Some(p) => {
            crate::fsutil::write_atomic(&p, text.as_bytes(), 0o644)?;
            eprintln!(
                "bundle of {} (sequence {}) written to {}",
                b.trust_domain,
                b.sequence,
                p.display()
            );
        }
        None => print!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}

async fn bundle_import(a: BundleImport) -> anyhow::Result<ExitCode> {
    let data = if a.file.as_os_str() == "-" {
        use std::io::Read;
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        buf
    } else {
        std::fs::read(&a.file)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", a.file.display()))?
    };
    let mut client = AdminClient::new(a.conn.channel().await?);
    let resp = client
        .import_bundle(pb::ImportBundleRequest {
            trust_domain: a.trust_domain.clone(),
            bundle: data,
        })
        .await
        .map_err(rpc_error)?
        .into_inner();
    println!(
        "bundle of {} {}: {} authorities, sequence {}",
        a.trust_domain,
        if resp.changed {
            "installed"
        } else {
            "unchanged"
        },
        resp.authorities,
        resp.sequence
    );
    Ok(ExitCode::SUCCESS)
}
