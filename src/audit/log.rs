//! The single writer: group commit of audit records and the state changes they describe.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{error, warn};

use super::chain::{GENESIS_HASH, compute_hash};
use super::{AuditError, Event};
use crate::store::{AuditRecord, RECORD_VERSION, RevocationRecord, Store, Write};

/// Most events committed in one transaction and one fsync.
const MAX_GROUP: usize = 1024;
/// Records kept for live subscribers; one that falls further behind is fed from the store.
const LIVE_BUFFER: usize = 4096;
/// Records read from the store per page while replaying.
const REPLAY_PAGE: usize = 512;

/// A record that is durable, with the revocations it carried (for revocation watchers).
#[derive(Debug, Clone)]
pub struct Committed {
    /// The audit record.
    pub record: AuditRecord,
    /// Revocation entries written with it, their `rev` set to the record's seq.
    pub revocations: Vec<RevocationRecord>,
}

struct Pending {
    event: Event,
    writes: Vec<Write>,
    done: oneshot::Sender<Result<AuditRecord, AuditError>>,
}

/// Handle to the audit log. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Pending>,
    live: broadcast::Sender<Arc<Committed>>,
    store: Arc<dyn Store>,
}

/// A subscriber's position: replays from the store, then follows the live feed, never skipping
/// or repeating a record.
pub struct Subscription {
    store: Arc<dyn Store>,
    live: broadcast::Receiver<Arc<Committed>>,
    next: u64,
    backlog: std::collections::VecDeque<AuditRecord>,
    caught_up: bool,
}

impl AuditLog {
    /// Starts the writer task over `store`, continuing its chain.
    pub fn start(store: Arc<dyn Store>) -> Result<Self, AuditError> {
        let head = store.audit_head()?;
        let (tx, rx) = mpsc::channel(8 * MAX_GROUP);
        let (live, _) = broadcast::channel(LIVE_BUFFER);
        let writer = Writer {
            store: store.clone(),
            live: live.clone(),
            next_seq: head.map_or(1, |(seq, _)| seq + 1),
            prev_hash: head.map_or(GENESIS_HASH, |(_, h)| h),
            last_ms: 0,
        };
        tokio::spawn(writer.run(rx));
        Ok(Self { tx, live, store })
    }

    /// Records `event` together with `writes`; returns once both are durable.
    pub async fn record(&self, event: Event, writes: Vec<Write>) -> Result<AuditRecord, AuditError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Pending { event, writes, done })
            .await
            .map_err(|_| AuditError::Closed)?;
        rx.await.map_err(|_| AuditError::Closed)?
    }

    /// Live feed of committed records (may lag; see [`Subscription`] for a lossless reader).
    pub fn live(&self) -> broadcast::Receiver<Arc<Committed>> {
        self.live.subscribe()
    }

    /// A lossless reader starting at `from_seq` (0 or 1: the beginning).
    pub fn subscribe(&self, from_seq: u64) -> Subscription {
        Subscription {
            store: self.store.clone(),
            live: self.live.subscribe(),
            next: from_seq.max(1),
            backlog: Default::default(),
            caught_up: false,
        }
    }

    /// The store behind the log.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
}

impl Subscription {
    /// The next record in order. With `follow = false`, `None` once the stored log is exhausted;
    /// with `follow = true`, waits for new records (`None` only when the log closes).
    pub async fn next(&mut self, follow: bool) -> Result<Option<AuditRecord>, AuditError> {
        loop {
            if let Some(r) = self.backlog.pop_front() {
                self.next = r.seq + 1;
                return Ok(Some(r));
            }
            if !self.caught_up {
                let page = self.store.read_audit(self.next, REPLAY_PAGE)?;
                if page.len() < REPLAY_PAGE {
                    self.caught_up = true;
                }
                if !page.is_empty() {
                    self.backlog.extend(page);
                    continue;
                }
            }
            if !follow {
                return Ok(None);
            }
            match self.live.recv().await {
                Ok(c) if c.record.seq < self.next => continue,
                Ok(c) if c.record.seq == self.next => {
                    self.next += 1;
                    return Ok(Some(c.record.clone()));
                }
                // Something committed between our last store read and the live feed: read the
                // gap from the store.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => self.caught_up = false,
                Err(broadcast::error::RecvError::Closed) => return Ok(None),
            }
        }
    }
}

struct Writer {
    store: Arc<dyn Store>,
    live: broadcast::Sender<Arc<Committed>>,
    next_seq: u64,
    prev_hash: [u8; 32],
    last_ms: i64,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Pending>) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        while rx.recv_many(&mut group, MAX_GROUP).await > 0 {
            self.commit_group(std::mem::take(&mut group)).await;
        }
    }

    async fn commit_group(&mut self, group: Vec<Pending>) {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        // Time never goes backwards inside the log, even if the wall clock does.
        let time_ms = now_ms.max(self.last_ms);
        let mut records = Vec::with_capacity(group.len());
        let mut writes = Vec::new();
        let mut revs = Vec::with_capacity(group.len());
        let (mut seq, mut prev) = (self.next_seq, self.prev_hash);
        for p in &group {
            let e = &p.event;
            let mut rec = AuditRecord {
                v: RECORD_VERSION,
                seq,
                time_ms,
                kind: e.kind.map_or("unknown", |k| k.as_str()).to_string(),
                actor: e.actor.clone(),
                subject: e.subject.clone(),
                serial: e.serial.clone(),
                roles: e.roles.clone(),
                not_after: e.not_after,
                reason: e.reason.clone(),
                prev_hash: prev,
                hash: [0; 32],
            };
            rec.hash = compute_hash(&rec);
            prev = rec.hash;
            let mut mine = Vec::new();
            for w in &p.writes {
                let mut w = w.clone();
                if let Write::PutRevocation(r) = &mut w {
                    r.rev = seq;
                    mine.push(r.clone());
                }
                writes.push(w);
            }
            revs.push(mine);
            records.push(rec);
            seq += 1;
        }
        let store = self.store.clone();
        let recs = records.clone();
        let result = tokio::task::spawn_blocking(move || {
            store.commit(&recs, &writes)?;
            store.flush()
        })
        .await;
        let result = match result {
            Ok(r) => r,
            Err(join) => {
                error!(error = %join, "audit commit task failed");
                Err(crate::store::StoreError::Backend("commit task failed".into()))
            }
        };
        match result {
            Ok(()) => {
                self.next_seq = seq;
                self.prev_hash = prev;
                self.last_ms = time_ms;
                for ((p, rec), revocations) in group.into_iter().zip(records).zip(revs) {
                    let _ = self.live.send(Arc::new(Committed {
                        record: rec.clone(),
                        revocations,
                    }));
                    let _ = p.done.send(Ok(rec));
                }
            }
            Err(e) => {
                // Nothing is acknowledged. Re-read the head: a failed flush may still have left
                // the records in the tree, and the chain must continue from what is stored.
                error!(error = %e, events = group.len(), "audit commit failed");
                match self.store.audit_head() {
                    Ok(head) => {
                        self.next_seq = head.map_or(1, |(s, _)| s + 1);
                        self.prev_hash = head.map_or(GENESIS_HASH, |(_, h)| h);
                    }
                    Err(e) => warn!(error = %e, "cannot re-read audit head"),
                }
                let msg = e.to_string();
                for p in group {
                    let _ = p.done.send(Err(AuditError::Store(
                        crate::store::StoreError::Backend(msg.clone()),
                    )));
                }
            }
        }
    }
}
