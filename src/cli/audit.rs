//! `lanyard audit tail|verify|export`.
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
    /// Archive the events older than a seq or an age to a JSON-lines file (the `tail --json`
    /// format); `audit verify --archive FILE` then checks archive and live log as one chain.
    Export(ExportArgs),
}

#[derive(Debug, clap::Args)]
pub(super) struct ExportArgs {
    /// Where to write the archive (refused if it exists).
    #[arg(long)]
    out: PathBuf,
    /// Archive events up to and including this seq.
    #[arg(
        long,
        conflicts_with = "older_than",
        required_unless_present = "older_than"
    )]
    through_seq: Option<u64>,
    /// Archive events older than this (e.g. 30d).
    #[arg(long, value_parser = humantime::parse_duration)]
    older_than: Option<std::time::Duration>,
    /// Continue an earlier archive: start after its last event (its last hash is checked
    /// against the log, so the two files chain).
    #[arg(long)]
    after: Option<PathBuf>,
    /// Then delete the archived events from the CA's store (admin only, audited), keeping a
    /// checkpoint: only once the archive is written, fsynced and re-read as an intact chain.
    /// The newest event always stays. Keep the archive: `audit verify --archive` needs it.
    #[arg(long)]
    prune: bool,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, clap::Args)]
pub(super) struct TailArgs {
    /// Keep following new events. If the CA goes away, the command says where the stream
    /// stopped ("stream closed at #N; resume with --from N+1") and exits with status 1.
    #[arg(long, short)]
    follow: bool,
    /// With --follow: when the CA goes away, reconnect (with backoff, up to every 5 s) and resume
    /// after the last event seen, instead of exiting.
    #[arg(long, requires = "follow")]
    reconnect: bool,
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
    #[arg(long, conflicts_with = "archive")]
    file: Option<PathBuf>,
    /// Archives written by `audit export`, oldest first (repeatable): verified from the
    /// beginning of the log, then the server's log continues the chain after the last one.
    #[arg(long)]
    archive: Vec<PathBuf>,
    #[command(flatten)]
    conn: Conn,
}

pub(super) async fn run(cmd: AuditCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCmd::Tail(a) => tail(a).await,
        AuditCmd::Verify(a) => verify(a).await,
        AuditCmd::Export(a) => export(a).await,
    }
}

/// Reads a JSON-lines export.
fn read_jsonl(path: &std::path::Path) -> anyhow::Result<Vec<AuditRecord>> {
    let f = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
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
    Ok(out)
}

/// Streams the server's stored log from `from` (no follow).
async fn stored_from(conn: &Conn, from: u64) -> anyhow::Result<EventStream> {
    Ok(AuditClient::new(conn.channel().await?)
        .subscribe(pb::SubscribeRequest {
            from_seq: from,
            follow: false,
            kinds: vec![],
            spiffe_id: String::new(),
        })
        .await
        .map_err(rpc_error)?
        .into_inner())
}

async fn export(a: ExportArgs) -> anyhow::Result<ExitCode> {
    let (from, prev) = match &a.after {
        Some(p) => {
            let earlier = read_jsonl(p)?;
            let last = earlier
                .last()
                .ok_or_else(|| anyhow::anyhow!("{}: empty archive", p.display()))?;
            (last.seq + 1, last.hash)
        }
        None => (1, GENESIS_HASH),
    };
    let cutoff_ms = a.older_than.map(|d| {
        (crate::tls::unix_now() * 1000).saturating_sub(d.as_millis().min(i64::MAX as u128) as i64)
    });
    let mut stream = stored_from(&a.conn, from).await?;
    let mut records = Vec::new();
    while let Some(ev) = stream.message().await.map_err(rpc_error)? {
        let r = from_proto(ev).ok_or_else(|| anyhow::anyhow!("malformed event hashes"))?;
        let done = match (a.through_seq, cutoff_ms) {
            (Some(n), _) => r.seq > n,
            (None, Some(cut)) => r.time_ms >= cut,
            (None, None) => false,
        };
        if done {
            break;
        }
        records.push(r);
    }
    // Only an intact chain is archived: the archive becomes the evidence for these events.
    if let Err(e) = verify_chain(&records, from, prev) {
        println!("not exported: the log's chain is broken: {e}");
        return Ok(ExitCode::FAILURE);
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&a.out)
        .map_err(|e| anyhow::anyhow!("{}: {e}", a.out.display()))?;
    for r in &records {
        writeln!(f, "{}", serde_json::to_string(r)?)?;
    }
    f.sync_all()?;
    drop(f);
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The file's name must survive a crash too, before anything is deleted.
        std::fs::File::open(dir)?.sync_all()?;
    }
    match (records.first(), records.last()) {
        (Some(first), Some(last)) => println!(
            "archived events {} to {} ({} events) to {}; last hash {}",
            first.seq,
            last.seq,
            records.len(),
            a.out.display(),
            crate::encoding::hex(&last.hash)
        ),
        _ => println!("no events to archive; wrote an empty {}", a.out.display()),
    }
    if a.prune {
        return prune(&a, from, prev).await;
    }
    Ok(ExitCode::SUCCESS)
}

/// `export --prune`: re-reads the archive just written, checks it is the intact chain from
/// `(from, prev)`, then asks the CA to delete those events behind a checkpoint.
async fn prune(a: &ExportArgs, from: u64, prev: [u8; 32]) -> anyhow::Result<ExitCode> {
    let archived = read_jsonl(&a.out)?;
    if let Err(e) = verify_chain(&archived, from, prev) {
        println!("not pruned: the archive does not read back intact: {e}");
        return Ok(ExitCode::FAILURE);
    }
    let Some(last) = archived.last() else {
        println!("nothing to prune");
        return Ok(ExitCode::SUCCESS);
    };
    let resp = AuditClient::new(a.conn.channel().await?)
        .prune(pb::PruneRequest {
            through_seq: last.seq,
            hash: last.hash.to_vec(),
        })
        .await
        .map_err(rpc_error)?
        .into_inner();
    println!(
        "pruned {} events from the CA's store; events up to #{} are now only in the archive (keep it: `lanyard audit verify --archive {}`)",
        resp.deleted,
        resp.checkpoint_seq,
        a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

async fn tail(a: TailArgs) -> anyhow::Result<ExitCode> {
    for k in &a.kind {
        if !Kind::ALL.iter().any(|known| known.as_str() == k) {
            let names: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
            anyhow::bail!("unknown kind {k:?}; kinds are {}", names.join(", "));
        }
    }
    // The next sequence number to ask for: after a reconnect the stream resumes here, so no
    // event is lost or printed twice.
    let mut next = a.from;
    let mut stream = open(&a, next).await?;
    let mut out = std::io::stdout();
    loop {
        let closed = loop {
            let ev = match stream.message().await {
                Ok(Some(ev)) => ev,
                // A finished read of the stored log is the normal end without --follow; with
                // it, the CA ended the stream (it is shutting down).
                Ok(None) if !a.follow => return Ok(ExitCode::SUCCESS),
                Ok(None) => break "the CA ended the stream".to_string(),
                Err(s) if a.follow && ca_gone(&s) => break format!("{}", rpc_error(s)),
                Err(s) => return Err(rpc_error(s)),
            };
            let Some(r) = from_proto(ev) else {
                anyhow::bail!("server sent an event with malformed hashes");
            };
            next = r.seq + 1;
            let text = if a.json {
                serde_json::to_string(&r)?
            } else {
                line(&r)
            };
            // Each event is flushed as it arrives so `--follow | grep` sees it at once; a closed
            // pipe (`| head`) ends the command quietly.
            match writeln!(out, "{text}").and_then(|()| out.flush()) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    return Ok(ExitCode::SUCCESS);
                }
                Err(e) => return Err(e.into()),
            }
        };
        let last = next.saturating_sub(1);
        if !a.reconnect {
            eprintln!("stream closed at #{last}; resume with --from {next}");
            return Ok(ExitCode::FAILURE);
        }
        eprintln!("stream closed at #{last} ({closed}); reconnecting");
        stream = reopen(&a, next).await?;
        eprintln!("reconnected; resuming at #{next}");
    }
}

type EventStream = tonic::Streaming<pb::AuditEvent>;

/// Why a subscription could not be opened.
enum OpenError {
    /// The CA cannot be reached (yet): worth retrying with --reconnect.
    Unreachable(anyhow::Error),
    /// Anything else (a refusal, a bad credential): retrying would not help.
    Other(anyhow::Error),
}

impl From<OpenError> for anyhow::Error {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Unreachable(e) | OpenError::Other(e) => e,
        }
    }
}

/// Subscribes from `from`.
async fn open(a: &TailArgs, from: u64) -> Result<EventStream, OpenError> {
    let channel = a.conn.channel().await.map_err(|e| {
        match e.downcast_ref::<crate::client::ClientError>() {
            Some(crate::client::ClientError::Connect(..)) => OpenError::Unreachable(e),
            _ => OpenError::Other(e),
        }
    })?;
    let answer = AuditClient::new(channel)
        .subscribe(pb::SubscribeRequest {
            from_seq: from,
            follow: a.follow,
            kinds: a.kind.clone(),
            spiffe_id: a.spiffe_id.clone().unwrap_or_default(),
        })
        .await;
    match answer {
        Ok(r) => Ok(r.into_inner()),
        Err(s) if ca_gone(&s) => Err(OpenError::Unreachable(rpc_error(s))),
        Err(s) => Err(OpenError::Other(rpc_error(s))),
    }
}

/// Subscribes from `from` until the CA answers, waiting 200 ms after the first failure and
/// doubling up to 5 s. Only an unreachable CA is retried: a refusal (say, a revoked credential)
/// would be refused again.
async fn reopen(a: &TailArgs, from: u64) -> anyhow::Result<EventStream> {
    let mut wait = std::time::Duration::from_millis(200);
    let mut last_error = String::new();
    loop {
        tokio::time::sleep(wait).await;
        match open(a, from).await {
            Ok(s) => return Ok(s),
            Err(OpenError::Unreachable(e)) => {
                let msg = format!("{e:#}");
                if msg != last_error {
                    eprintln!("CA unreachable ({msg}); retrying");
                    last_error = msg;
                }
                wait = (wait * 2).min(std::time::Duration::from_secs(5));
            }
            Err(OpenError::Other(e)) => return Err(e),
        }
    }
}

/// Whether a status means the CA went away (rather than refused or broke the stream).
fn ca_gone(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
    )
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
    if !a.archive.is_empty() {
        return verify_archived(a).await;
    }
    let records: Vec<AuditRecord> = match &a.file {
        Some(path) => read_jsonl(path)?,
        None => {
            let mut stream = stored_from(&a.conn, 1).await?;
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

/// `audit verify --archive A --archive B ...`: the archives from the genesis, then the server's
/// log after the last archived event, as one chain.
async fn verify_archived(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let mut state = (1, GENESIS_HASH);
    let mut archived = 0usize;
    for path in &a.archive {
        let records = read_jsonl(path)?;
        match verify_chain(&records, state.0, state.1) {
            Ok(next) => state = next,
            Err(e) => {
                println!("chain broken in {}: {e}", path.display());
                return Ok(ExitCode::FAILURE);
            }
        }
        archived += records.len();
    }
    let mut stream = stored_from(&a.conn, state.0).await?;
    let mut live = Vec::new();
    while let Some(ev) = stream.message().await.map_err(rpc_error)? {
        live.push(from_proto(ev).ok_or_else(|| anyhow::anyhow!("malformed event hashes"))?);
    }
    match verify_chain(&live, state.0, state.1) {
        Ok(_) => {
            println!(
                "{} events ({archived} archived, {} in the log), chain intact",
                archived + live.len(),
                live.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("chain broken after the archives: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}
