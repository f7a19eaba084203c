//! Peer-library cases (iceoryx2 behind a cargo feature, later). Same shape as `membus`.

use crate::case::{Case, Ratio};

/// The peer-library cases.
pub fn cases() -> Vec<Case> {
    Vec::new()
}

/// membus-vs-peer ratios.
pub fn ratios() -> Vec<Ratio> {
    Vec::new()
}
