//! Workload verbs: issue with a token, renew, inspect.
#![expect(clippy::print_stdout, reason = "the CLI's output is its job")]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::rpc_error;
use crate::ca::{RolesOid, SanNames, normalize_dns, parse_svid, san_names};
use crate::client::{Credential, connect, csr_with_names, write_credential};
use crate::config::parse_duration;
use crate::issuance::fmt_time;
use crate::pb::v1::{self as pb, ca_client::CaClient};
use crate::spiffe::{IdPattern, SpiffeId};
use crate::tls::{Bundle, ServerTrust};
use crate::tokens::JoinToken;

#[derive(Debug, clap::Args)]
pub(super) struct IssueArgs {
    /// The join token.
    #[arg(long, env = "LANYARD_TOKEN", hide_env_values = true)]
    token: String,
    /// Directory for cert.pem, key.pem (0600) and bundle.pem.
    #[arg(long)]
    out: PathBuf,
    /// SPIFFE ID to ask for; needed only when the token is for a /prefix/*.
    #[arg(long)]
    spiffe_id: Option<String>,
    /// Requested lifetime (default: the server's default, capped by policy).
    #[arg(long, value_parser = parse_duration)]
    ttl: Option<Duration>,
    /// Only these roles (comma-separated; default: all the token allows).
    #[arg(long, value_delimiter = ',')]
    roles: Vec<String>,
    /// Trust this CA bundle (PEM) instead of the fingerprint in the token.
    #[arg(long)]
    bundle: Option<PathBuf>,
    #[command(flatten)]
    server: super::Servers,
    /// OID of the roles extension.
    #[arg(long, env = "LANYARD_ROLES_OID", default_value = "1.3.9999.7781.1")]
    roles_oid: String,
    /// DNS name to ask for (repeatable; policy must allow it).
    #[arg(long = "dns-name", value_name = "NAME")]
    dns_names: Vec<String>,
    /// IP address to ask for (repeatable; policy must allow it).
    #[arg(long = "ip", value_name = "ADDR")]
    ips: Vec<std::net::IpAddr>,
}

/// The names given by `--dns-name` and `--ip`, canonical; a malformed name fails here, before
/// any call to the CA.
pub(super) fn requested_names(
    dns: &[String],
    ips: &[std::net::IpAddr],
) -> anyhow::Result<SanNames> {
    let mut names = SanNames {
        dns: dns
            .iter()
            .map(|d| normalize_dns(d, false))
            .collect::<Result<_, _>>()?,
        ips: ips.to_vec(),
    };
    names.canonicalize();
    Ok(names)
}

#[derive(Debug, clap::Args)]
pub(super) struct RenewArgs {
    /// Credential directory to renew (cert.pem, key.pem, bundle.pem).
    #[arg(long, env = "LANYARD_CREDENTIAL")]
    credential: PathBuf,
    /// Write the renewed credential here (default: replace the one in --credential).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Requested lifetime.
    #[arg(long, value_parser = parse_duration)]
    ttl: Option<Duration>,
    /// Only these roles (comma-separated).
    #[arg(long, value_delimiter = ',')]
    roles: Vec<String>,
    /// Keep the current private key instead of generating a new one.
    #[arg(long)]
    keep_key: bool,
    #[command(flatten)]
    server: super::Servers,
    /// OID of the roles extension.
    #[arg(long, env = "LANYARD_ROLES_OID", default_value = "1.3.9999.7781.1")]
    roles_oid: String,
}

#[derive(Debug, clap::Args)]
pub(super) struct InspectArgs {
    /// A PEM certificate file (the first certificate is inspected).
    file: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// OID of the roles extension.
    #[arg(long, env = "LANYARD_ROLES_OID", default_value = "1.3.9999.7781.1")]
    roles_oid: String,
}

pub(super) async fn issue(a: IssueArgs) -> anyhow::Result<ExitCode> {
    let oid = RolesOid::parse(&a.roles_oid)?;
    let token = JoinToken::parse(&a.token)?;
    let id = match (&a.spiffe_id, IdPattern::parse(&token.spiffe_id)?) {
        (Some(s), pattern) => {
            let id = SpiffeId::parse(s)?;
            if !pattern.matches(&id) {
                anyhow::bail!("the token is for {pattern}, not {id}");
            }
            id
        }
        (None, IdPattern::Exact(id)) => id,
        (None, IdPattern::Prefix(p)) => {
            anyhow::bail!(
                "the token is for any ID below {p}/; choose one with --spiffe-id {p}/<name>"
            )
        }
    };
    let trust = match &a.bundle {
        Some(p) => ServerTrust::Bundle(Bundle::from_pem(&std::fs::read(p)?)?),
        None => ServerTrust::Fingerprint(token.ca_fingerprint),
    };
    let names = requested_names(&a.dns_names, &a.ips)?;
    let key = rcgen::KeyPair::generate()?;
    let csr = csr_with_names(&id, &key, &names)?;
    let channel = connect(&a.server.joined(), trust, None, oid.clone()).await?;
    let resp = CaClient::new(channel)
        .issue(pb::IssueRequest {
            csr,
            join_token: a.token.trim().to_string(),
            jwt: String::new(),
            ttl_seconds: a.ttl.map_or(0, |d| d.as_secs() as u32),
            roles: a.roles,
        })
        .await
        .map_err(rpc_error)?
        .into_inner();
    write_response(&a.out, &resp, &key.serialize_pem())?;
    print_summary(&resp);
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn renew(a: RenewArgs) -> anyhow::Result<ExitCode> {
    let oid = RolesOid::parse(&a.roles_oid)?;
    let cred = Credential::load(&a.credential, &oid)?;
    let key = if a.keep_key {
        let pem = std::fs::read_to_string(a.credential.join("key.pem"))?;
        rcgen::KeyPair::from_pem(&pem)?
    } else {
        rcgen::KeyPair::generate()?
    };
    // A renewal asks for the names the current certificate holds; the CA re-checks them.
    let leaf = cred
        .chain
        .first()
        .ok_or_else(|| anyhow::anyhow!("the credential has no certificate"))?;
    let csr = csr_with_names(&cred.svid.spiffe_id, &key, &san_names(leaf)?)?;
    let channel = connect(
        &a.server.joined(),
        ServerTrust::Bundle(cred.bundle.clone()),
        Some(cred.slot()?),
        oid,
    )
    .await?;
    let resp = CaClient::new(channel)
        .issue(pb::IssueRequest {
            csr,
            join_token: String::new(),
            jwt: String::new(),
            ttl_seconds: a.ttl.map_or(0, |d| d.as_secs() as u32),
            roles: a.roles,
        })
        .await
        .map_err(rpc_error)?
        .into_inner();
    let out = a.out.unwrap_or(a.credential);
    write_response(&out, &resp, &key.serialize_pem())?;
    print_summary(&resp);
    Ok(ExitCode::SUCCESS)
}

pub(super) fn inspect(a: InspectArgs) -> anyhow::Result<ExitCode> {
    let oid = RolesOid::parse(&a.roles_oid)?;
    let pem = std::fs::read(&a.file).map_err(|e| anyhow::anyhow!("{}: {e}", a.file.display()))?;
    let cert = CertificateDer::pem_slice_iter(&pem)
        .next()
        .ok_or_else(|| anyhow::anyhow!("{}: no PEM certificate found", a.file.display()))??;
    let s = parse_svid(&cert, &oid)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "spiffe_id": s.spiffe_id.as_str(),
                "roles": s.roles,
                "serial": s.serial.to_hex(),
                "not_before": fmt_time(s.not_before),
                "not_after": fmt_time(s.not_after),
            })
        );
    } else {
        println!("spiffe_id:  {}", s.spiffe_id);
        println!(
            "roles:      {}",
            if s.roles.is_empty() {
                "(none)".into()
            } else {
                s.roles.join(",")
            }
        );
        println!("serial:     {}", s.serial);
        println!("not_before: {}", fmt_time(s.not_before));
        println!("not_after:  {}", fmt_time(s.not_after));
        let left = s.not_after - crate::tls::unix_now();
        if left > 0 {
            println!("expires in: {left}s");
        } else {
            println!("expired:    {}s ago", -left);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn write_response(dir: &Path, r: &pb::IssueResponse, key_pem: &str) -> anyhow::Result<()> {
    let chain: Vec<CertificateDer<'_>> = r
        .cert_chain
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let bundle: Vec<CertificateDer<'_>> = r
        .trust_bundle
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    write_credential(dir, &chain, &bundle, key_pem)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", dir.display()))
}

fn print_summary(r: &pb::IssueResponse) {
    println!(
        "{} serial={} roles={} not_after={}",
        r.spiffe_id,
        r.serial,
        if r.roles.is_empty() {
            "-".into()
        } else {
            r.roles.join(",")
        },
        fmt_time(r.not_after)
    );
}
