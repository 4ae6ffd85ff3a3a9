//! tonic adapters: proto ↔ domain, authentication, and the one place errors become `Status`.

pub mod access;
pub mod admin;
pub mod audit;
pub mod auth;
pub mod ca;
pub mod revocation;
pub mod status;

pub use auth::Authenticator;
