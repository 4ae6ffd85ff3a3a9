//! Hostile inputs: relay.
