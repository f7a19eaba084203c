//! # bus-broker: the membus control plane
//!
//! The broker authenticates clients, keeps the topic registry, creates and seals the memfd rings
//! and hands them out with SCM_RIGHTS, relays datagram-fallback traffic, and otherwise stays off
//! the data path. It is the only crate that uses io_uring.
//!
//! Start-up foundations (no frames involved):
//!
//! - [`cli`]: the command line ([`cli::Args`]).
//! - [`config`]: the config file and the merged [`config::Settings`].
//! - [`addr`]: socket address resolution, the listening socket ([`addr::Listener`]): directory
//!   checks, lock file, live-versus-stale detection, abstract names, systemd socket activation;
//!   SO_PEERCRED.
//! - [`policy`]: topic names and patterns, the policy file, [`policy::PolicyHolder`] for reloads.
//! - [`limits`]: the run-time limits (`[limits]` in the config), broker policy.
//! - [`log`]: `tracing` to stderr.
//!
//! The loop: [`engine`] (sans-IO session logic) driven by [`driver`] (io_uring, or epoll where
//! io_uring is unavailable).
#![deny(unsafe_code)]

pub mod addr;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod driver;
pub mod engine;
pub mod limits;
pub mod log;
pub mod policy;
mod toml_util;
