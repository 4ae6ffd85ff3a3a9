//! Hostile inputs: requests.
