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
use tokio::sync::watch;

/// A server stream of messages.
pub type MessageStream<M> = Pin<Box<dyn Stream<Item = Result<M, tonic::Status>> + Send>>;

/// Streams the value of `rx` as `to_proto` renders it: at once, then again on every change,
/// until the client goes away or `shutdown` says the server is stopping. A slow client sees
/// only the latest value (a watch channel keeps no backlog).
pub fn stream_latest<T, M, F>(
    rx: watch::Receiver<T>,
    shutdown: watch::Receiver<bool>,
    to_proto: F,
) -> MessageStream<M>
where
    T: Clone + Send + Sync + 'static,
    M: Send + 'static,
    F: Fn(&T) -> M + Send + Sync + 'static,
{
    // No task and no channel per stream: the stream itself waits on the watch, so an idle
    // watcher (one per connected agent) costs the CA only its receiver.
    let to_proto = std::sync::Arc::new(to_proto);
    Box::pin(futures_util::stream::unfold(
        (rx, shutdown, true),
        move |(mut rx, mut shutdown, first)| {
            let to_proto = to_proto.clone();
            async move {
                if !first {
                    tokio::select! {
                        r = rx.changed() => r.ok()?,
                        () = crate::server::stopped(&mut shutdown) => return None,
                    }
                }
                let value = rx.borrow_and_update().clone();
                Some((Ok(to_proto(&value)), (rx, shutdown, false)))
            }
        },
    ))
}
