//! A lossy, latest-wins feed: the publisher never waits; a subscriber that falls behind is told
//! exactly how many messages it missed, and can check that what it read was not overwritten
//! while it read it. Needs a running broker.
use std::time::Duration;

use anyhow::Result;
use bus_client::{Bus, ModeRequest, SubscriberOptions, TopicOptions};

fn main() -> Result<()> {
    let bus = Bus::connect_default()?;
    let mut sub = bus.subscriber_with(
        "examples.ticks",
        SubscriberOptions::new().mode(ModeRequest::Lossy),
    )?;
    let mut publisher = bus.publisher_with(
        "examples.ticks",
        TopicOptions::new()
            .mode(ModeRequest::Lossy)
            .ring_bytes(4096),
    )?;
    // 1,000 ticks into a 4 KiB ring while nobody reads: most are overwritten.
    for tick in 0..1000u64 {
        // A send error borrows the payload (so it can be retried); make it owned for `?`.
        publisher
            .send(&tick.to_le_bytes())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let (mut read, mut lost) = (0u64, 0u64);
    // The publisher's ring reaches the subscriber asynchronously: wait a little for it.
    while let Some(s) = sub.recv_timeout(Duration::from_millis(300))? {
        lost += s.lost_before();
        let tick = u64::from_le_bytes(s[..8].try_into()?);
        if s.is_intact() {
            read += 1;
            if s.lost_before() > 0 {
                println!("tick {tick}: {} ticks lost before it", s.lost_before());
            }
        }
    }
    println!("read {read}, lost {lost}, published 1000");
    // Latest wins: a lapped reader resumes at the newest tick, and every tick is accounted for.
    anyhow::ensure!(read + lost == 1000 && read > 0, "accounting is off");
    Ok(())
}
