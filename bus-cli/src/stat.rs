//! `bus stat`: what the broker knows, like `ss -x` for the bus.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bus_core::frame::{Frame, Hello, Msg, PROTOCOL_VERSION, Transport};
use bus_core::sys::scm::{FdBatch, Received, recv_frame, send_frame};
use clap::Args;
use serde_json::Value;

/// `bus stat` arguments.
#[derive(Args, Debug)]
pub struct StatArgs {
    /// Print the broker's JSON document instead of tables.
    #[arg(long)]
    json: bool,
    /// Refresh every second until interrupted.
    #[arg(long)]
    watch: bool,
    /// Broker socket (PATH or @NAME); default: $MEMBUS_SOCKET, then the per-user default.
    #[arg(long)]
    socket: Option<String>,
}

fn connect(address: &str) -> Result<OwnedFd> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    let addr = match address.strip_prefix('@') {
        Some(name) => SocketAddrUnix::new_abstract_name(name.as_bytes())?,
        None => SocketAddrUnix::new(address)?,
    };
    rustix::net::connect(&fd, &addr).with_context(|| {
        format!("no broker at {address}: start one with `bus-broker` (or `bus broker`)")
    })?;
    let timeout = Some(Duration::from_secs(5));
    rustix::net::sockopt::set_socket_timeout(&fd, rustix::net::sockopt::Timeout::Recv, timeout)?;
    Ok(fd)
}

fn request(fd: &OwnedFd, id: u64, msg: Msg<'_>) -> Result<()> {
    let mut buf = Vec::new();
    Frame {
        request_id: id,
        msg,
    }
    .encode(&mut buf)?;
    send_frame(fd.as_fd(), &buf, &[]).context("send to the broker")?;
    Ok(())
}

/// Fetches the stats document.
pub fn fetch(address: &str) -> Result<Value> {
    let fd = connect(address)?;
    let hello = Hello {
        protocol_version: u16::from(PROTOCOL_VERSION),
        transport: Transport::Datagram,
        client_name: "bus stat",
    };
    request(&fd, 1, Msg::Hello(hello))?;
    request(&fd, 2, Msg::StatsRequest)?;
    let mut buf = vec![0u8; bus_core::limits::MAX_FRAME_BYTES];
    let mut fds = FdBatch::new();
    let mut json = String::new();
    loop {
        let Received::Frame { len } = recv_frame(fd.as_fd(), &mut buf, &mut fds)? else {
            bail!("the broker closed the connection");
        };
        let frame = Frame::decode(&buf[..len])?;
        match frame.msg {
            Msg::Error(e) => bail!("the broker refused: {} ({})", e.message, e.code),
            Msg::StatsReply(r) if frame.request_id == 2 => {
                json.push_str(r.json);
                if !r.more {
                    break;
                }
            }
            _ => {}
        }
    }
    serde_json::from_str(&json).context("the broker's stats are not valid JSON")
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Messages per second of publisher `id` since the previous snapshot (`--watch`).
fn rate(prev: Option<&Value>, id: &Value, messages: &Value, secs: f64) -> String {
    let Some(prev) = prev else {
        return "-".into();
    };
    let before = prev["topics"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["publishers"].as_array().into_iter().flatten())
        .find(|p| &p["id"] == id)
        .and_then(|p| p["messages"].as_u64());
    match (before, messages.as_u64()) {
        (Some(b), Some(now)) if secs > 0.0 => {
            format!("{:.0}/s", now.saturating_sub(b) as f64 / secs)
        }
        _ => "-".into(),
    }
}

fn render(doc: &Value, prev: Option<&Value>) {
    let secs = prev.map_or(0.0, |p| {
        (doc["broker"]["uptime_ms"].as_f64().unwrap_or(0.0)
            - p["broker"]["uptime_ms"].as_f64().unwrap_or(0.0))
            / 1000.0
    });
    let b = &doc["broker"];
    println!(
        "broker {} pid {}  up {:.1} s  clients {}  fds {}  rss {:.1} MiB  evictions {}",
        s(&b["version"]),
        s(&b["pid"]),
        b["uptime_ms"].as_f64().unwrap_or(0.0) / 1000.0,
        s(&b["clients"]),
        s(&b["open_fds"]),
        b["rss_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        s(&b["evictions"]),
    );
    let topics = doc["topics"].as_array().cloned().unwrap_or_default();
    if topics.is_empty() {
        println!("no topics");
    }
    for t in topics {
        println!(
            "\ntopic {}  {}  ring {} B  max message {} B  evictions {}",
            s(&t["name"]),
            s(&t["mode"]),
            s(&t["ring_bytes"]),
            s(&t["max_message_bytes"]),
            s(&t["evictions"])
        );
        println!(
            "  {:<4} {:>6} {:>8} {:>6} {:<16} {:<9} {:>12} {:>10} {:>10} {:>8}",
            "role",
            "id",
            "pid",
            "uid",
            "command",
            "transport",
            "messages",
            "rate",
            "lag bytes",
            "lost"
        );
        for p in t["publishers"].as_array().into_iter().flatten() {
            println!(
                "  {:<4} {:>6} {:>8} {:>6} {:<16} {:<9} {:>12} {:>10} {:>10} {:>8}",
                "pub",
                s(&p["id"]),
                s(&p["pid"]),
                s(&p["uid"]),
                s(&p["command"]),
                s(&p["transport"]),
                s(&p["messages"]),
                rate(prev, &p["id"], &p["messages"], secs),
                "-",
                s(&p["refused"])
            );
        }
        for q in t["subscribers"].as_array().into_iter().flatten() {
            println!(
                "  {:<4} {:>6} {:>8} {:>6} {:<16} {:<9} {:>12} {:>10} {:>10} {:>8}",
                "sub",
                s(&q["id"]),
                s(&q["pid"]),
                s(&q["uid"]),
                s(&q["command"]),
                s(&q["delivery"]),
                s(&q["delivered"]),
                "-",
                s(&q["lag_bytes"]),
                s(&q["lost"])
            );
        }
    }
}

/// Runs `bus stat`.
pub fn run(a: StatArgs) -> Result<()> {
    let address = match a.socket {
        Some(s) => s,
        None => bus_client::default_address().to_string_lossy().into_owned(),
    };
    let mut prev: Option<Value> = None;
    loop {
        let doc = fetch(&address)?;
        if a.watch && !a.json {
            print!("\x1b[2J\x1b[H");
        }
        if a.json {
            println!("{doc}");
        } else {
            render(&doc, prev.as_ref());
        }
        if !a.watch {
            return Ok(());
        }
        prev = Some(doc);
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rate_is_messages_per_second_between_snapshots() {
        let prev = json!({"topics": [{"publishers": [{"id": 7, "messages": 1000}]}]});
        assert_eq!(rate(Some(&prev), &json!(7), &json!(3000), 2.0), "1000/s");
        assert_eq!(
            rate(None, &json!(7), &json!(3000), 2.0),
            "-",
            "first snapshot"
        );
        assert_eq!(
            rate(Some(&prev), &json!(8), &json!(5), 1.0),
            "-",
            "new publisher"
        );
    }
}
