//! Hostile inputs: transport.
