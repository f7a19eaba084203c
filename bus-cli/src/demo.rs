//! `bus demo`: the one command to see membus work. Uses the running broker, or starts one on a
//! private temporary socket; runs a subscriber and a publisher as separate processes for each
//! phase (busy-poll, parked, throughput); prints latency percentiles and throughput; removes
//! everything it started.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bus_client::{Bus, SubscriberOptions, TopicOptions, WaitStrategy};
use clap::Args;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde_json::json;

/// `bus demo` arguments.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Message size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Roughly how long each latency phase streams, in seconds.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Use the broker at this socket instead of looking for one or starting one.
    #[arg(long)]
    socket: Option<String>,
}

/// A broker this command started: stopped (SIGTERM) and its directory removed on drop.
struct OwnBroker {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl OwnBroker {
    fn start() -> Result<OwnBroker> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute() && p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let nanos = bus_core::sys::clock::monotonic_ns();
        let dir = base.join(format!("membus-demo-{}-{nanos}", std::process::id()));
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
            .create(&dir)
            .with_context(|| format!("create {}", dir.display()))?;
        let socket = dir.join("bus.sock");
        let mut child = Command::new(std::env::current_exe()?)
            .arg("broker")
            .arg("--socket")
            .arg(&socket)
            .env("MEMBUS_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("start the embedded broker")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .context("read the broker's start line")?;
        let broker = OwnBroker { child, dir, socket };
        if !line.contains("listening") {
            bail!("the embedded broker did not start: {line}");
        }
        Ok(broker)
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32);
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Phase {
    name: &'static str,
    topic: &'static str,
    wait: &'static str,
    count: u64,
    rate: f64,
}

/// What a subscriber child reports.
struct SubReport {
    hist: Histogram<u64>,
    count: u64,
    lost: u64,
    elapsed_ns: u64,
}

fn self_cmd(args: &[&str]) -> Result<Command> {
    let mut c = Command::new(std::env::current_exe()?);
    c.args(args).stdin(Stdio::null());
    Ok(c)
}

fn run_phase(address: &str, size: usize, p: &Phase) -> Result<SubReport> {
    let count = p.count.to_string();
    let mut sub = self_cmd(&[
        "__demo-sub",
        "--socket",
        address,
        "--topic",
        p.topic,
        "--wait",
        p.wait,
        "--count",
        &count,
    ])?
    .stdout(Stdio::piped())
    .spawn()
    .context("start the subscriber process")?;
    let mut lines = BufReader::new(sub.stdout.take().expect("piped")).lines();
    let ready = lines.next().transpose()?.unwrap_or_default();
    if ready != "ready" {
        let _ = sub.kill();
        bail!("the subscriber process did not start: {ready}");
    }
    let status = self_cmd(&[
        "__demo-pub",
        "--socket",
        address,
        "--topic",
        p.topic,
        "--count",
        &count,
        "--size",
        &size.to_string(),
        "--rate",
        &p.rate.to_string(),
    ])?
    .status()
    .context("run the publisher process")?;
    let report = lines.next().transpose()?.unwrap_or_default();
    let sub_status = sub.wait()?;
    if !status.success() || !sub_status.success() {
        bail!(
            "phase {}: publisher {status}, subscriber {sub_status}",
            p.name
        );
    }
    let doc: serde_json::Value =
        serde_json::from_str(&report).context("the subscriber's report")?;
    let bytes: Vec<u8> = (0..doc["hist"].as_str().unwrap_or("").len() / 2)
        .map(|i| u8::from_str_radix(&doc["hist"].as_str().unwrap()[2 * i..2 * i + 2], 16))
        .collect::<Result<_, _>>()?;
    let hist: Histogram<u64> = Deserializer::new()
        .deserialize(&mut &bytes[..])
        .map_err(|e| anyhow::anyhow!("histogram: {e:?}"))?;
    Ok(SubReport {
        hist,
        count: doc["count"].as_u64().unwrap_or(0),
        lost: doc["lost"].as_u64().unwrap_or(0),
        elapsed_ns: doc["elapsed_ns"].as_u64().unwrap_or(1),
    })
}

/// Runs `bus demo`.
pub fn run(a: DemoArgs) -> Result<()> {
    let mut own = None;
    let address = match a.socket.clone() {
        Some(s) => s,
        None => {
            let default = bus_client::default_address().to_string_lossy().into_owned();
            if Bus::connect(&default).is_ok() {
                println!("using the broker at {default}");
                default
            } else {
                let b = OwnBroker::start()?;
                let s = b.socket.to_string_lossy().into_owned();
                println!("no broker running: started one on {s} (removed at the end)");
                own = Some(b);
                s
            }
        }
    };
    let secs = a.seconds.max(0.1);
    let phases = [
        Phase {
            name: "busy-poll",
            topic: "demo.busy-poll",
            wait: "spin",
            count: (100_000.0 * secs) as u64,
            rate: 100_000.0,
        },
        Phase {
            name: "parked",
            topic: "demo.parked",
            wait: "park",
            count: (10_000.0 * secs) as u64,
            rate: 10_000.0,
        },
        Phase {
            name: "throughput (busy-poll)",
            topic: "demo.throughput",
            wait: "spin",
            count: 2_000_000,
            rate: 0.0,
        },
    ];
    println!(
        "publisher and subscriber in separate processes, {} B messages; latency = publish \
         timestamp to receive (CLOCK_MONOTONIC)\n",
        a.size
    );
    let mut rows = Vec::new();
    let mut throughput = None;
    for p in &phases {
        eprint!("  {} ... ", p.name);
        let r = run_phase(&address, a.size, p)?;
        eprintln!("{} messages", r.count);
        if p.rate > 0.0 {
            rows.push((format!("{} @{}k/s", p.name, p.rate as u64 / 1000), r));
        } else {
            throughput = Some(r);
        }
    }
    println!();
    let table: Vec<(&str, &Histogram<u64>)> =
        rows.iter().map(|(n, r)| (n.as_str(), &r.hist)).collect();
    crate::table::print_latency_table(&table);
    if let Some(t) = throughput {
        let secs = t.elapsed_ns as f64 / 1e9;
        let rate = t.count as f64 / secs;
        println!(
            "\nthroughput: {} messages of {} B in {:.3} s: {:.1} M msg/s, {:.2} GB/s (lost {})",
            t.count,
            a.size,
            secs,
            rate / 1e6,
            rate * a.size as f64 / 1e9,
            t.lost
        );
    }
    let lost: u64 = rows.iter().map(|(_, r)| r.lost).sum();
    if lost > 0 {
        println!("lost in latency phases: {lost}");
    }
    if let Some(b) = own {
        let socket = b.socket.clone();
        drop(b);
        if socket.exists() {
            bail!("the embedded broker left {} behind", socket.display());
        }
        println!("\nstopped the embedded broker; nothing left behind");
    }
    Ok(())
}

/// Hidden `__demo-sub`: subscribe, say ready, receive `count` messages, report as JSON.
pub fn demo_sub(args: &[String]) -> Result<()> {
    let (socket, topic, wait, count) = parse_child(args)?;
    let bus = Bus::connect_with(
        &socket,
        bus_client::BusOptions::new().client_name("bus demo sub"),
    )?;
    let wait = match wait.as_str() {
        "spin" => WaitStrategy::BusySpin,
        "park" => WaitStrategy::Park,
        _ => WaitStrategy::default(),
    };
    if wait == WaitStrategy::BusySpin {
        let _ = bus_core::sys::cpu::pin_current_thread(1);
    }
    let opts = SubscriberOptions::new().wait(wait).record_latency(true);
    let mut sub = bus.subscriber_with(&topic, opts)?;
    println!("ready");
    let (mut n, mut lost, mut first) = (0u64, 0u64, None);
    while n < count {
        let s = sub
            .recv_timeout(Duration::from_secs(10))?
            .context("no message for 10 s")?;
        first.get_or_insert_with(Instant::now);
        lost += s.lost_before();
        std::hint::black_box(s.iter().fold(0u8, |a, &b| a.wrapping_add(b)));
        n += 1 + s.lost_before();
    }
    let elapsed = first.map_or(1, |f| f.elapsed().as_nanos() as u64);
    let hist = sub.take_latency().context("latency was recorded")?;
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(&hist, &mut bytes)
        .map_err(|e| anyhow::anyhow!("histogram: {e:?}"))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    println!(
        "{}",
        json!({"count": n - lost, "lost": lost, "elapsed_ns": elapsed, "hist": hex})
    );
    Ok(())
}

/// Hidden `__demo-pub`: publish `count` messages of `size` at `rate` per second.
pub fn demo_pub(args: &[String]) -> Result<()> {
    let (socket, topic, _, count) = parse_child(args)?;
    let size: usize = value(args, "--size")?.parse()?;
    let rate: f64 = value(args, "--rate")?.parse()?;
    let _ = bus_core::sys::cpu::pin_current_thread(0);
    let bus = Bus::connect_with(
        &socket,
        bus_client::BusOptions::new().client_name("bus demo pub"),
    )?;
    let mut publisher = bus.publisher_with(&topic, TopicOptions::new())?;
    let mut pacer = crate::pace::Pacer::new(rate);
    for i in 0..count {
        pacer.wait_next();
        let mut loan = publisher
            .loan(size)
            .map_err(|e| anyhow::anyhow!("publish: {e}"))?;
        loan.fill(i as u8);
        loan.commit();
    }
    Ok(())
}

fn value(args: &[String], key: &str) -> Result<String> {
    args.iter()
        .position(|a| a == key)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .with_context(|| format!("{key} missing"))
}

fn parse_child(args: &[String]) -> Result<(String, String, String, u64)> {
    Ok((
        value(args, "--socket")?,
        value(args, "--topic")?,
        value(args, "--wait").unwrap_or_default(),
        value(args, "--count")?.parse()?,
    ))
}
