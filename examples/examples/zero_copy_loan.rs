//! Zero copy both ways: the publisher fills a buffer loaned inside the shared-memory ring and
//! commits it; the subscriber reads the bytes where they are. Needs a running broker.
use anyhow::Result;
use bus_client::Bus;

#[repr(C)]
struct Reading {
    sensor: u32,
    millikelvin: u32,
}

fn main() -> Result<()> {
    let bus = Bus::connect_default()?;
    let mut sub = bus.subscriber("examples.readings")?;
    let mut publisher = bus.publisher("examples.readings")?;
    for sensor in 0..4u32 {
        let mut loan = publisher.loan(size_of::<Reading>())?;
        // Write the fields straight into shared memory: no intermediate buffer.
        loan[0..4].copy_from_slice(&sensor.to_le_bytes());
        loan[4..8].copy_from_slice(&(293_150 + sensor * 100).to_le_bytes());
        loan.commit();
    }
    let mut total = 0u64;
    for _ in 0..4 {
        let s = sub.recv()?;
        // `s` derefs to the bytes inside the publisher's ring.
        let sensor = u32::from_le_bytes(s[0..4].try_into()?);
        let mk = u32::from_le_bytes(s[4..8].try_into()?);
        println!("sensor {sensor}: {:.2} K", f64::from(mk) / 1000.0);
        total += u64::from(mk);
    }
    println!("sum {total} mK");
    Ok(())
}
