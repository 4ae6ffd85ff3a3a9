//! `lanyard access request|list|approve|deny|revoke`.
#![expect(clippy::print_stdout, reason = "the CLI's output is its job")]

use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;

use super::{Conn, rpc_error};
use crate::config::parse_duration;
use crate::issuance::fmt_time;
use crate::pb::v1::{self as pb, access_client::AccessClient};

#[derive(Debug, Subcommand)]
pub(super) enum AccessCmd {
    /// Ask for temporary roles (as the subject itself, or as an admin on its behalf).
    Request(RequestArgs),
    /// List access requests and grants.
    List(ListArgs),
    /// Approve a pending request (needs lanyard:approver; never your own).
    Approve(DecideArgs),
    /// Deny a pending request (needs lanyard:approver), or withdraw your own.
    Deny(ReasonArgs),
    /// End a grant early and revoke the certificates that carry it.
    Revoke(ReasonArgs),
}

#[derive(Debug, clap::Args)]
pub(super) struct RequestArgs {
    /// The identity that should receive the roles.
    #[arg(long)]
    spiffe_id: String,
    /// Roles to request (comma-separated); policy says which are requestable.
    #[arg(long, value_delimiter = ',', required = true)]
    roles: Vec<String>,
    /// How long the grant should last once approved, e.g. 30m.
    #[arg(long, value_parser = parse_duration)]
    duration: Duration,
    /// Why: an incident or ticket, recorded in the audit log and shown to approvers.
    #[arg(long)]
    reason: String,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, clap::Args)]
pub(super) struct ListArgs {
    /// Only pending requests.
    #[arg(long)]
    pending: bool,
    /// Only requests for this SPIFFE ID.
    #[arg(long)]
    spiffe_id: Option<String>,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, clap::Args)]
pub(super) struct DecideArgs {
    /// Request id.
    id: String,
    /// A comment for the record.
    #[arg(long, default_value = "")]
    comment: String,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, clap::Args)]
pub(super) struct ReasonArgs {
    /// Request or grant id.
    id: String,
    /// Why.
    #[arg(long)]
    reason: String,
    #[command(flatten)]
    conn: Conn,
}

pub(super) async fn run(cmd: AccessCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        AccessCmd::Request(a) => {
            let mut c = AccessClient::new(a.conn.channel().await?);
            let r = c
                .request(pb::AccessRequestCreate {
                    spiffe_id: a.spiffe_id,
                    roles: a.roles,
                    duration_seconds: a.duration.as_secs().min(u64::from(u32::MAX)) as u32,
                    reason: a.reason,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            eprintln!(
                "request {} is pending: {} approval(s) needed before {}",
                r.id,
                r.approvals_needed,
                fmt_time(r.expires_at)
            );
            println!("{}", r.id);
        }
        AccessCmd::List(a) => {
            let mut c = AccessClient::new(a.conn.channel().await?);
            let list = c
                .list(pb::AccessListRequest {
                    pending_only: a.pending,
                    spiffe_id: a.spiffe_id.unwrap_or_default(),
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            for r in list.requests {
                if a.json {
                    println!("{}", json(&r));
                } else {
                    println!("{}", line(&r));
                }
            }
        }
        AccessCmd::Approve(a) => decide(Verb::Approve, &a.conn, a.id, a.comment).await?,
        AccessCmd::Deny(a) => decide(Verb::Deny, &a.conn, a.id, a.reason).await?,
        AccessCmd::Revoke(a) => decide(Verb::Revoke, &a.conn, a.id, a.reason).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The three decisions on an existing request.
enum Verb {
    Approve,
    Deny,
    Revoke,
}

/// Sends one decision and prints the request as it now stands.
async fn decide(verb: Verb, conn: &Conn, id: String, comment: String) -> anyhow::Result<()> {
    let mut c = AccessClient::new(conn.channel().await?);
    let d = pb::AccessDecision { id, comment };
    let r = match verb {
        Verb::Approve => c.approve(d).await,
        Verb::Deny => c.deny(d).await,
        Verb::Revoke => c.revoke(d).await,
    }
    .map_err(rpc_error)?
    .into_inner();
    println!("{}", line(&r));
    Ok(())
}

fn line(r: &pb::AccessRequest) -> String {
    let when = match r.state.as_str() {
        "pending" => format!("expires {}", fmt_time(r.expires_at)),
        "granted" => format!("until {}", fmt_time(r.expires_at)),
        _ => String::new(),
    };
    let approvals: Vec<&str> = r.approvals.iter().map(|a| a.approver.as_str()).collect();
    let mut s = format!(
        "{} {} {} roles={} duration={}s approvals={}/{} {when} requester={} reason={:?}",
        r.id,
        r.state,
        r.spiffe_id,
        r.roles.join(","),
        r.duration_seconds,
        r.approvals.len(),
        r.approvals_needed,
        r.requester,
        r.reason
    );
    if !approvals.is_empty() {
        s.push_str(&format!(" approved_by={}", approvals.join(",")));
    }
    if !r.closed_by.is_empty() {
        s.push_str(&format!(
            " closed_by={} close_reason={:?}",
            r.closed_by, r.close_reason
        ));
    }
    s
}

fn json(r: &pb::AccessRequest) -> String {
    serde_json::json!({
        "id": r.id,
        "state": r.state,
        "spiffe_id": r.spiffe_id,
        "roles": r.roles,
        "duration_seconds": r.duration_seconds,
        "reason": r.reason,
        "requester": r.requester,
        "created_at": r.created_at,
        "approvals": r.approvals.iter().map(|a| serde_json::json!({"approver": a.approver, "comment": a.comment, "at": a.at})).collect::<Vec<_>>(),
        "approvals_needed": r.approvals_needed,
        "expires_at": r.expires_at,
        "granted_at": r.granted_at,
        "closed_by": r.closed_by,
        "close_reason": r.close_reason,
    })
    .to_string()
}
