//! Shared helpers for the membus examples.
