//! Latency as an HdrHistogram interval log: the subscriber records publish-to-receive latency
//! of every message; the example writes it to the file named on the command line (default
//! `latency.hlog`), readable by HdrHistogram's tools. Needs a running broker.
use std::time::Duration;

use anyhow::Result;
use bus_client::{Bus, SubscriberOptions};

fn main() -> Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "latency.hlog".into());
    let bus = Bus::connect_default()?;
    let mut sub = bus.subscriber_with(
        "examples.latency",
        SubscriberOptions::new().record_latency(true),
    )?;
    let mut publisher = bus.publisher("examples.latency")?;
    let mut intervals = Vec::new();
    for round in 0..3u32 {
        for i in 0..10_000u32 {
            publisher
                .send(&i.to_le_bytes())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            sub.recv()?;
        }
        let h = sub.take_latency().expect("recording is on");
        println!(
            "round {round}: p50 {} ns, p99 {} ns, max {} ns",
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.max()
        );
        intervals.push((Duration::from_secs(round.into()), h));
    }
    let intervals: Vec<_> = intervals
        .iter()
        .map(|(start, h)| bus_client::latency::Interval {
            start: *start,
            duration: Duration::from_secs(1),
            histogram: h,
        })
        .collect();
    bus_client::latency::write_interval_log(std::fs::File::create(&path)?, &intervals)?;
    println!("wrote {path}");
    Ok(())
}
