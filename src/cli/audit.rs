//! `lanyard audit tail|verify`.
#![expect(clippy::print_stdout, reason = "the CLI's output is its job")]

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use super::{Conn, rpc_error};
use crate::api::audit::from_proto;
use crate::audit::{GENESIS_HASH, Kind, verify_chain};
use crate::pb::v1::{self as pb, audit_client::AuditClient};
use crate::store::AuditRecord;

#[derive(Debug, Subcommand)]
pub(super) enum AuditCmd {
    /// Print audit events (needs lanyard:auditor or lanyard:admin).
    Tail(TailArgs),
    /// Check the hash chain of the stored log (or of a --json export) for gaps and tampering.
    Verify(VerifyArgs),
}

#[derive(Debug, clap::Args)]
pub(super) struct TailArgs {
    /// Keep following new events.
    #[arg(long, short)]
    follow: bool,
    /// Start at this sequence number (to resume: last seen + 1).
    #[arg(long, default_value_t = 1)]
    from: u64,
    /// One JSON object per line (the export format `audit verify --file` reads).
    #[arg(long)]
    json: bool,
    /// Only these kinds (repeatable or comma-separated).
    #[arg(long, value_delimiter = ',')]
    kind: Vec<String>,
    /// Only events whose subject or actor is this SPIFFE ID.
    #[arg(long)]
    spiffe_id: Option<String>,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, clap::Args)]
pub(super) struct VerifyArgs {
    /// A JSON-lines export (`audit tail --json`) to verify instead of the server's log.
    #[arg(long)]
    file: Option<PathBuf>,
    #[command(flatten)]
    conn: Conn,
}

pub(super) async fn run(cmd: AuditCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCmd::Tail(a) => tail(a).await,
        AuditCmd::Verify(a) => verify(a).await,
    }
}

async fn tail(a: TailArgs) -> anyhow::Result<ExitCode> {
    for k in &a.kind {
        if !Kind::ALL.iter().any(|known| known.as_str() == k) {
            let names: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
            anyhow::bail!("unknown kind {k:?}; kinds are {}", names.join(", "));
        }
    }
    let mut client = AuditClient::new(a.conn.channel().await?);
    let mut stream = client
        .subscribe(pb::SubscribeRequest {
            from_seq: a.from,
            follow: a.follow,
            kinds: a.kind,
            spiffe_id: a.spiffe_id.unwrap_or_default(),
        })
        .await
        .map_err(rpc_error)?
        .into_inner();
    let mut out = std::io::stdout();
    while let Some(ev) = stream.message().await.map_err(rpc_error)? {
        let Some(r) = from_proto(ev) else {
            anyhow::bail!("server sent an event with malformed hashes");
        };
        let text = if a.json {
            serde_json::to_string(&r)?
        } else {
            line(&r)
        };
        // Each event is flushed as it arrives so `--follow | grep` sees it at once; a closed
        // pipe (`| head`) ends the command quietly.
        match writeln!(out, "{text}").and_then(|()| out.flush()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(ExitCode::SUCCESS),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One human-readable line per event.
fn line(r: &AuditRecord) -> String {
    let time = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(r.time_ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    let mut s = format!("#{} {time} {} actor={}", r.seq, r.kind, r.actor);
    if !r.subject.is_empty() {
        s.push_str(&format!(" subject={}", r.subject));
    }
    if !r.serial.is_empty() {
        s.push_str(&format!(" serial={}", r.serial));
    }
    if !r.roles.is_empty() {
        s.push_str(&format!(" roles={}", r.roles.join(",")));
    }
    if r.not_after != 0 {
        s.push_str(&format!(
            " not_after={}",
            crate::issuance::fmt_time(r.not_after)
        ));
    }
    if !r.claimed.is_empty() {
        s.push_str(&format!(" claimed_unverified={}", r.claimed));
    }
    if !r.reason.is_empty() {
        s.push_str(&format!(" reason={:?}", r.reason));
    }
    s
}

async fn verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let records: Vec<AuditRecord> = match &a.file {
        Some(path) => {
            let f = std::fs::File::open(path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let mut out = Vec::new();
            for (n, l) in std::io::BufReader::new(f).lines().enumerate() {
                let l = l?;
                if l.trim().is_empty() {
                    continue;
                }
                out.push(
                    serde_json::from_str(&l)
                        .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), n + 1))?,
                );
            }
            out
        }
        None => {
            let mut client = AuditClient::new(a.conn.channel().await?);
            let mut stream = client
                .subscribe(pb::SubscribeRequest {
                    from_seq: 1,
                    follow: false,
                    kinds: vec![],
                    spiffe_id: String::new(),
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let mut out = Vec::new();
            while let Some(ev) = stream.message().await.map_err(rpc_error)? {
                out.push(from_proto(ev).ok_or_else(|| anyhow::anyhow!("malformed event hashes"))?);
            }
            out
        }
    };
    let Some(first) = records.first() else {
        println!("0 events");
        return Ok(ExitCode::SUCCESS);
    };
    // An export may start mid-log: trust its first prev_hash and check everything after it.
    let (start, prev) = if first.seq == 1 {
        (1, GENESIS_HASH)
    } else {
        (first.seq, first.prev_hash)
    };
    match verify_chain(&records, start, prev) {
        Ok(_) if start == 1 => {
            println!("{} events, chain intact", records.len());
            Ok(ExitCode::SUCCESS)
        }
        Ok(_) => {
            println!(
                "{} events (seq {} to {}), chain intact from seq {start}",
                records.len(),
                start,
                start + records.len() as u64 - 1
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("chain broken: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}
