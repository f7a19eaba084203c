//! `bus pub` and `bus sub`.

use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bus_client::{
    Bus, BusOptions, ModeRequest, PublishError, Publisher, RecvError, SubscriberOptions,
    TopicOptions, Transport, WaitStrategy,
};
use bus_core::frame::MAX_DATAGRAM_MESSAGE_BYTES;
use bus_core::limits::MAX_FRAME_BYTES;
use clap::{Args, ValueEnum};
use serde_json::json;

/// Topic mode on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Whatever the topic has (reliable for a new topic).
    Any,
    /// The publisher waits for the slowest subscriber.
    Reliable,
    /// Latest wins; lapped subscribers are told how many messages they lost.
    Lossy,
}

impl From<ModeArg> for ModeRequest {
    fn from(m: ModeArg) -> ModeRequest {
        match m {
            ModeArg::Any => ModeRequest::Any,
            ModeArg::Reliable => ModeRequest::Reliable,
            ModeArg::Lossy => ModeRequest::Lossy,
        }
    }
}

/// Wait strategy on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WaitArg {
    /// Poll without sleeping (one CPU at 100%).
    Spin,
    /// Poll briefly, then park (the default).
    Hybrid,
    /// Park as soon as nothing is there.
    Park,
}

impl From<WaitArg> for WaitStrategy {
    fn from(w: WaitArg) -> WaitStrategy {
        match w {
            WaitArg::Spin => WaitStrategy::BusySpin,
            WaitArg::Hybrid => WaitStrategy::default(),
            WaitArg::Park => WaitStrategy::Park,
        }
    }
}

/// Connection options shared by the subcommands.
#[derive(Args, Debug, Clone)]
pub struct ConnArgs {
    /// Broker socket (PATH or @NAME); default: $MEMBUS_SOCKET, then the per-user default.
    #[arg(long, global = true)]
    pub socket: Option<String>,
    /// Use the datagram transport instead of shared memory (one message per datagram through
    /// the broker: the fallback for clients that cannot map shared memory).
    #[arg(long, global = true, alias = "fallback")]
    pub datagram: bool,
}

impl ConnArgs {
    /// Connects as `name`.
    pub fn connect(&self, name: &str) -> Result<Bus> {
        let opts = BusOptions::new()
            .client_name(name)
            .transport(if self.datagram {
                Transport::Datagram
            } else {
                Transport::Auto
            });
        let address = match &self.socket {
            Some(s) => s.clone(),
            None => bus_client::default_address().to_string_lossy().into_owned(),
        };
        Ok(Bus::connect_with(&address, opts)?)
    }
}

/// `bus pub` arguments.
#[derive(Args, Debug)]
pub struct PubArgs {
    /// Topic to publish to.
    topic: String,
    /// Messages to publish; without any, each line of standard input is one message (unless
    /// --count is given).
    messages: Vec<String>,
    /// Publish N generated messages of --size bytes.
    #[arg(long)]
    count: Option<u64>,
    /// Size of generated messages in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Messages per second for generated messages (0: as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Mode the topic must have.
    #[arg(long, value_enum, default_value = "any")]
    mode: ModeArg,
    /// Ring size for a new topic, in bytes (0: the broker's default).
    #[arg(long, default_value_t = 0)]
    ring_bytes: u64,
    #[command(flatten)]
    conn: ConnArgs,
}

/// The topic name, checked before anything is sent: the broker would refuse it, and a name too
/// long for a frame does not even reach it.
fn check_topic(topic: &str) -> Result<()> {
    bus_core::naming::validate_topic(topic).map_err(|e| {
        anyhow::anyhow!(
            "'{}' is not a topic name: {e}; a topic name is 1 to {} bytes of segments separated \
             by single dots, each made of A-Z a-z 0-9 _ - (e.g. sensors.imu-0)",
            shorten(topic),
            bus_core::limits::MAX_TOPIC_BYTES
        )
    })
}

/// `text`, cut to 40 characters for an error message.
fn shorten(text: &str) -> String {
    match text.char_indices().nth(40) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_owned(),
    }
}

/// The error of a failed publish, with advice that fits this publisher.
fn publish_failed<T>(e: PublishError<T>, publisher: &Publisher) -> anyhow::Error {
    match e {
        // A datagram publisher is capped by what one DELIVER frame carries, whatever the topic
        // allows: raising the topic's max_message_bytes cannot help, shared memory can.
        PublishError::TooLarge { len, max }
            if !publisher.is_shared_memory() && max >= MAX_DATAGRAM_MESSAGE_BYTES =>
        {
            anyhow::anyhow!(
                "publish failed: the message is {len} bytes, and the datagram fallback carries at \
                 most {MAX_DATAGRAM_MESSAGE_BYTES} bytes per message (one frame of at most \
                 {MAX_FRAME_BYTES} bytes); no max_message_bytes setting changes that: publish \
                 through shared memory (without --datagram) to send larger messages, or split \
                 them"
            )
        }
        e => anyhow::anyhow!("publish failed: {e}"),
    }
}

/// Runs `bus pub`.
pub fn run_pub(a: PubArgs) -> Result<()> {
    check_topic(&a.topic)?;
    let bus = a.conn.connect("bus pub")?;
    let opts = TopicOptions::new()
        .mode(a.mode.into())
        .ring_bytes(a.ring_bytes);
    let mut publisher = bus.publisher_with(&a.topic, opts)?;
    if let Some(count) = a.count {
        let mut sent = 0u64;
        let start = Instant::now();
        let mut pacer = crate::pace::Pacer::new(a.rate);
        for i in 0..count {
            pacer.wait_next();
            let mut loan = match publisher.loan(a.size) {
                Ok(loan) => loan,
                Err(e) => return Err(publish_failed(e, &publisher)),
            };
            let b = (i as u8).wrapping_mul(31);
            loan.fill(b);
            if loan.len() >= 8 {
                loan[..8].copy_from_slice(&i.to_le_bytes());
            }
            loan.commit();
            sent += 1;
        }
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "bus pub: {sent} messages of {} B to '{}' in {secs:.3} s ({:.0} msg/s)",
            a.size,
            a.topic,
            sent as f64 / secs.max(1e-9)
        );
    } else if !a.messages.is_empty() {
        for m in &a.messages {
            if let Err(e) = publisher.send(m.as_bytes()) {
                return Err(publish_failed(e, &publisher));
            }
        }
    } else {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let line = line.context("read standard input")?;
            if let Err(e) = publisher.send(line.as_bytes()) {
                return Err(publish_failed(e, &publisher));
            }
        }
    }
    Ok(())
}

/// Output format of `bus sub`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// The payload as text (invalid UTF-8 replaced), one line per message.
    Text,
    /// The payload in hex.
    Hex,
    /// One JSON object per message.
    Json,
}

/// `bus sub` arguments.
#[derive(Args, Debug)]
pub struct SubArgs {
    /// Topic to subscribe to.
    topic: String,
    /// Stop after N messages.
    #[arg(long)]
    count: Option<u64>,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// Record publish-to-receive latency; print it per message and a percentile table at the end.
    #[arg(long)]
    latency: bool,
    /// Print nothing per message (with --latency: just the table).
    #[arg(long)]
    quiet: bool,
    /// Mode the topic must have.
    #[arg(long, value_enum, default_value = "any")]
    mode: ModeArg,
    /// How to wait for messages.
    #[arg(long, value_enum, default_value = "hybrid")]
    wait: WaitArg,
    /// Give up after this many seconds without a message (0: wait forever).
    #[arg(long, default_value_t = 0.0)]
    idle_timeout: f64,
    #[command(flatten)]
    conn: ConnArgs,
}

/// For a receive error that concerns one publisher only (the subscriber keeps working):
/// `Some(Some(line))` to print on stderr, `Some(None)` to retry silently. `None`: fatal.
fn skippable(e: &RecvError) -> Option<Option<String>> {
    match e {
        RecvError::BadRing { .. } => Some(Some(format!(
            "bus sub: warning: {e}; still reading the other publishers"
        ))),
        RecvError::Lapped { .. } => Some(None),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs `bus sub`.
pub fn run_sub(a: SubArgs) -> Result<()> {
    check_topic(&a.topic)?;
    let bus = a.conn.connect("bus sub")?;
    let opts = SubscriberOptions::new()
        .mode(a.mode.into())
        .wait(a.wait.into())
        .record_latency(a.latency);
    let mut sub = bus.subscriber_with(&a.topic, opts)?;
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::new(out.lock());
    let mut n = 0u64;
    let mut lost = 0u64;
    let idle = (a.idle_timeout > 0.0).then(|| Duration::from_secs_f64(a.idle_timeout));
    while a.count.is_none_or(|c| n < c) {
        let received = match idle {
            Some(t) => sub.recv_timeout(t),
            None => sub.recv().map(Some),
        };
        let sample = match received {
            Ok(Some(s)) => s,
            Ok(None) => break,
            Err(e) => match skippable(&e) {
                // One publisher's ring is bad (the library drops it and keeps reading the
                // others), or a lossy read raced the writer: say so and read on.
                Some(warning) => {
                    if let Some(w) = warning {
                        out.flush()?;
                        eprintln!("{w}");
                    }
                    continue;
                }
                None => return Err(e.into()),
            },
        };
        n += 1;
        lost += sample.lost_before();
        if a.quiet {
            continue;
        }
        let latency = bus_core::sys::clock::monotonic_ns().saturating_sub(sample.timestamp_ns());
        match a.format {
            Format::Text => {
                out.write_all(&sample)?;
                if a.latency {
                    write!(out, "\t{latency} ns")?;
                }
                writeln!(out)?;
            }
            Format::Hex => writeln!(out, "{}", hex(&sample))?,
            Format::Json => {
                let mut doc = json!({
                    "seq": sample.seq(),
                    "publisher": sample.publisher_id(),
                    "lost_before": sample.lost_before(),
                    "timestamp_ns": sample.timestamp_ns(),
                    "len": sample.len(),
                });
                match std::str::from_utf8(&sample) {
                    Ok(text) => doc["text"] = json!(text),
                    Err(_) => doc["hex"] = json!(hex(&sample)),
                }
                if a.latency {
                    doc["latency_ns"] = json!(latency);
                }
                writeln!(out, "{doc}")?;
            }
        }
        if a.count.is_none() {
            out.flush()?;
        }
    }
    out.flush()?;
    drop(out);
    if a.latency
        && let Some(h) = sub.latency()
    {
        crate::table::print_latency_table(&[("latency", h)]);
    }
    if lost > 0 {
        eprintln!("bus sub: {lost} messages were lost (lossy topic, subscriber lapped)");
    }
    if a.count.is_some_and(|c| n < c) {
        bail!(
            "stopped after {n} messages: nothing arrived for {} s",
            a.idle_timeout
        );
    }
    Ok(())
}
