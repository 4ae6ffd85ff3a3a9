//! Hostile-input suite: every class of attack from the hardening review (issue #11), each
//! asserting the exact refusal, that a normal client is still served, and that nothing changed
//! that should not have. One test binary; each module owns one attack surface.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

#[path = "../common/mod.rs"]
mod common;

mod agent;
mod relay;
mod requests;
mod transport;
