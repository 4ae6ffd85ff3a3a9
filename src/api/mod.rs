//! tonic adapters: proto ↔ domain, authentication, and the one place errors become `Status`.

pub mod access;
pub mod admin;
pub mod audit;
pub mod auth;
pub mod ca;
pub mod limit;
pub mod refusals;
pub mod revocation;
pub mod status;

pub use auth::Authenticator;

use std::pin::Pin;

use futures_util::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

/// A server stream of messages.
pub type MessageStream<M> = Pin<Box<dyn Stream<Item = Result<M, tonic::Status>> + Send>>;

/// Streams the value of `rx` as `to_proto` renders it: at once, then again on every change,
/// until the client goes away or `shutdown` says the server is stopping. A slow client sees
/// only the latest value (a watch channel keeps no backlog).
pub fn stream_latest<T, M, F>(
    mut rx: watch::Receiver<T>,
    mut shutdown: watch::Receiver<bool>,
    to_proto: F,
) -> MessageStream<M>
where
    T: Clone + Send + Sync + 'static,
    M: Send + 'static,
    F: Fn(&T) -> M + Send + 'static,
{
    let (tx, out) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let value = rx.borrow_and_update().clone();
            if tx.send(Ok(to_proto(&value))).await.is_err() {
                return;
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                () = tx.closed() => return,
                () = crate::server::stopped(&mut shutdown) => return,
            }
        }
    });
    Box::pin(ReceiverStream::new(out))
}
