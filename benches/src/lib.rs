//! membus benchmark harness (library half, shared with the `bus bench` command).
#![deny(unsafe_code)]
