//! Publish and subscribe: one publisher, one subscriber, in one process for brevity (they work
//! the same across processes). Needs a running broker (`bus broker`).
use anyhow::Result;
use bus_client::Bus;

fn main() -> Result<()> {
    let bus = Bus::connect_default()?;
    let mut sub = bus.subscriber("examples.greetings")?;
    let mut publisher = bus.publisher("examples.greetings")?;
    for name in ["Ada", "Grace", "Edsger"] {
        let text = format!("hello, {name}");
        // A send error borrows the payload (so it can be retried); make it owned for `?`.
        publisher
            .send(text.as_bytes())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    for _ in 0..3 {
        let sample = sub.recv()?;
        println!(
            "{} (seq {} from publisher {})",
            String::from_utf8_lossy(&sample),
            sample.seq(),
            sample.publisher_id()
        );
    }
    Ok(())
}
