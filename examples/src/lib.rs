//! The membus examples: programs under `examples/examples/`, each run against a real broker by
//! this crate's tests (`cargo nextest run -p membus-examples`). Run one by hand with a broker
//! running (`bus broker` or `bus-broker`):
//!
//! ```text
//! cargo run -p membus-examples --example pubsub
//! cargo run -p membus-examples --example zero_copy_loan
//! cargo run -p membus-examples --example lossy_feed
//! cargo run -p membus-examples --example latency_hlog -- latency.hlog
//! cargo run -p membus-examples --example async_tokio
//! python3 examples/python/fallback_client.py both
//! ```
