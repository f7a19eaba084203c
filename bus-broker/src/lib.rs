//! # bus-broker: the membus control plane
//!
//! The broker authenticates clients, keeps the topic registry, creates and seals the memfd rings
//! and hands them out with SCM_RIGHTS, relays datagram-fallback traffic, and otherwise stays off
//! the data path. It is the only crate that uses io_uring.
#![deny(unsafe_code)]
