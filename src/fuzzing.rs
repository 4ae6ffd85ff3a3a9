//! Entry points for the fuzz targets in `fuzz/` (not a stable API).
//!
//! The targets are a separate crate, so they can only call public items. Most parsers are public
//! already; this module reaches the few that are not, without widening their visibility for
//! everyone else. Each wrapper does nothing but call through.

use std::cell::RefCell;

use crate::ca::CaError;

thread_local! {
    /// One current-thread runtime per fuzzing thread: building a runtime per input would cost
    /// more than the relay work being fuzzed.
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

/// Decodes a roles extension value (DER `SEQUENCE OF UTF8String`), as certificate parsing does.
pub fn decode_roles(value: &[u8]) -> Result<Vec<String>, CaError> {
    crate::ca::decode_roles(value)
}

/// Runs the Workload API relay's client-to-server rewrite over `input` (the bytes a client would
/// send on the socket); returns its result and every byte it wrote towards the gRPC server.
pub fn relay(input: &[u8]) -> (std::io::Result<()>, Vec<u8>) {
    let mut out = Vec::new();
    let result = RUNTIME.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(tokio::runtime::Builder::new_current_thread().build()?);
        }
        match slot.as_ref() {
            Some(rt) => {
                let mut reader = input;
                rt.block_on(crate::agent::uds::rewrite_client_frames(
                    &mut reader,
                    &mut out,
                ))
            }
            None => Err(std::io::Error::other("no runtime")),
        }
    });
    (result, out)
}
