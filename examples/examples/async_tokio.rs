//! Async with tokio: a subscriber awaited as a `Stream` and with `recv_with` (zero-copy), and a
//! publisher awaiting ring space, on one tokio runtime. Needs a running broker.
use anyhow::Result;
use bus_client::Bus;
use bus_client::tokio::{AsyncPublisher, AsyncSubscriber};
use tokio_stream::StreamExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let bus = Bus::connect_default()?;
    let mut sub = AsyncSubscriber::new(bus.subscriber("examples.async")?)?;
    let mut publisher = AsyncPublisher::new(bus.publisher("examples.async")?);

    let producer = async move {
        for i in 0..100u32 {
            publisher
                .send(&i.to_le_bytes())
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if i % 10 == 0 {
                tokio::task::yield_now().await;
            }
        }
        anyhow::Ok(())
    };
    let consumer = async move {
        // The first message in place, without copying it out of the ring.
        let first = sub
            .recv_with(|s| u32::from_le_bytes(s[..4].try_into().unwrap()))
            .await?;
        let mut sum = u64::from(first);
        let mut n = 1;
        while n < 100 {
            let Some(sample) = sub.next().await else {
                break;
            };
            sum += u64::from(u32::from_le_bytes(sample?.payload[..4].try_into()?));
            n += 1;
        }
        println!("async: received {n} messages, sum {sum}");
        anyhow::ensure!(n == 100 && sum == 4950, "wrong messages");
        anyhow::Ok(())
    };
    let (p, c) = tokio::join!(producer, consumer);
    p?;
    c?;
    Ok(())
}
