//! A real `bus-broker` process for the cases that go through the broker (datagram fallback,
//! broker scale), and a minimal blocking client that speaks `docs/protocol.md` with
//! `bus_core::frame` (no client library: the cases measure the broker and the protocol).
//!
//! The broker binary is the one built next to the benches executable
//! (`cargo build -p benches -p bus-broker --release` puts both in `target/release/`); the
//! environment variable `MEMBUS_BENCH_BROKER` overrides the path. It listens on a socket in a
//! fresh private temporary directory and is stopped (SIGTERM, then SIGKILL) when the
//! [`Broker`] is dropped.
//!
//! The benchmark process is pinned to the parent CPU when a case runs; the broker would inherit
//! that. [`Broker::start`] gives it every CPU instead: it is a third process and the scheduler
//! places it.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bus_core::frame::{
    CreatePublisher, ErrorReply, Frame, Hello, ModeRequest, Msg, PROTOCOL_VERSION, RingGranted,
    Subscribe, Subscribed, Transport, Welcome, decode,
};
use bus_core::limits::MAX_FRAME_BYTES;
use bus_core::sys::scm::{FdBatch, Received, recv_frame, send_frame, try_recv_frame};
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use rustix::process::{Pid, Signal};
use rustix::thread::CpuSet;

/// Environment variable that overrides where the `bus-broker` binary is.
pub const BROKER_ENV: &str = "MEMBUS_BENCH_BROKER";

/// Where the `bus-broker` binary should be: `$MEMBUS_BENCH_BROKER`, else next to `exe`.
pub fn broker_path(exe: &Path) -> PathBuf {
    match std::env::var_os(BROKER_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => exe
            .parent()
            .map_or_else(|| PathBuf::from("bus-broker"), |d| d.join("bus-broker")),
    }
}

/// A running `bus-broker` on a private socket.
#[derive(Debug)]
pub struct Broker {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Broker {
    /// Starts the broker found by [`broker_path`] for `exe` and waits until it accepts
    /// connections. `log` is its `--log` level (`warn` keeps a storm of clients quiet).
    pub fn start(exe: &Path, log: &str) -> Result<Broker> {
        let bin = broker_path(exe);
        ensure!(
            bin.is_file(),
            "the broker binary {} does not exist: build it next to the benches binary with \
             `cargo build -p benches -p bus-broker --release` (or the same profile as this \
             benches binary), or point {BROKER_ENV} at one",
            bin.display()
        );
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("membus-bench-broker-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
        // The broker refuses a socket directory others can write to.
        rustix::fs::chmod(&dir, rustix::fs::Mode::from_raw_mode(0o700))
            .with_context(|| format!("chmod 0700 {}", dir.display()))?;
        let socket = dir.join("bus.sock");
        let child = Command::new(&bin)
            .arg("--socket")
            .arg(&socket)
            .arg("--log")
            .arg(log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let mut broker = Broker { child, dir, socket };
        let all = all_cpus();
        let _ = rustix::thread::sched_setaffinity(Some(broker.pid()), &all);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = broker.child.try_wait()? {
                bail!(
                    "{} exited at start-up ({status}); its error is on stderr above",
                    bin.display()
                );
            }
            if connect(&broker.socket).is_ok() {
                return Ok(broker);
            }
            ensure!(
                Instant::now() < deadline,
                "{} did not accept connections on {} within 10 s",
                bin.display(),
                broker.socket.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The broker's socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The broker's pid.
    pub fn pid(&self) -> Pid {
        Pid::from_child(&self.child)
    }

    /// Its resident set size in KiB (`VmRSS` of /proc/PID/status).
    pub fn rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .context("read broker /proc/PID/status")?;
        status_field(&status, "VmRSS:").context("VmRSS in /proc/PID/status")
    }

    /// Its open fds (entries of /proc/PID/fd).
    pub fn open_fds(&self) -> Result<u64> {
        Ok(std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .context("read broker /proc/PID/fd")?
            .count() as u64)
    }

    /// CPU time it used so far (user + system, clock ticks of /proc/PID/stat).
    pub fn cpu_ticks(&self) -> Result<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .context("read broker /proc/PID/stat")?;
        // Fields after the command name (which is in parentheses and may contain spaces):
        // state is field 3, utime field 14, stime field 15.
        let rest = stat.rsplit_once(')').context("malformed /proc/PID/stat")?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let utime: u64 = f.get(11).context("utime")?.parse()?;
        let stime: u64 = f.get(12).context("stime")?.parse()?;
        Ok(utime + stime)
    }

    /// Context switches of all its threads so far (voluntary + involuntary): each is a wakeup
    /// or a preemption.
    pub fn context_switches(&self) -> Result<u64> {
        let mut total = 0;
        for task in std::fs::read_dir(format!("/proc/{}/task", self.child.id()))? {
            let status = std::fs::read_to_string(task?.path().join("status"))?;
            total += status_field(&status, "voluntary_ctxt_switches:").unwrap_or(0);
            total += status_field(&status, "nonvoluntary_ctxt_switches:").unwrap_or(0);
        }
        Ok(total)
    }

    /// Stops the broker: SIGTERM, then SIGKILL if it has not exited after 5 s.
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = rustix::process::kill_process(self.pid(), Signal::TERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if matches!(self.child.try_wait(), Ok(None)) {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn status_field(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Every CPU this machine has (the broker's affinity).
pub fn all_cpus() -> CpuSet {
    let mut set = CpuSet::new();
    let n = std::thread::available_parallelism().map_or(2, |n| n.get());
    for cpu in 0..n.max(bus_core::sys::cpu::available_cpus()) {
        set.set(cpu);
    }
    set
}

/// A blocking SEQPACKET connection to `path`.
pub fn connect(path: &Path) -> Result<OwnedFd> {
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .context("socket(AF_UNIX, SOCK_SEQPACKET)")?;
    let addr = SocketAddrUnix::new(path).context("socket address")?;
    rustix::net::connect(&fd, &addr).with_context(|| format!("connect {}", path.display()))?;
    Ok(fd)
}

/// One client connection: a socket, a receive buffer and the fds of the last frame.
#[derive(Debug)]
pub struct Client {
    sock: OwnedFd,
    rx: Vec<u8>,
    tx: Vec<u8>,
    /// The fds that came with the last frame received.
    pub fds: FdBatch,
    next_request: u64,
}

impl Client {
    /// Wraps a connected socket.
    pub fn new(sock: OwnedFd) -> Client {
        Client {
            sock,
            rx: vec![0u8; MAX_FRAME_BYTES],
            tx: Vec::with_capacity(256),
            fds: FdBatch::new(),
            next_request: 1,
        }
    }

    /// The socket.
    pub fn sock(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Sends one frame.
    pub fn send(&mut self, frame: &Frame<'_>) -> Result<()> {
        frame.encode(&mut self.tx).context("encode frame")?;
        send_frame(self.sock.as_fd(), &self.tx, &[]).context("send frame")?;
        Ok(())
    }

    /// Sends an already-encoded frame.
    pub fn send_raw(&self, bytes: &[u8]) -> Result<()> {
        send_frame(self.sock.as_fd(), bytes, &[]).context("send frame")?;
        Ok(())
    }

    /// Sends an already-encoded frame without blocking; `false` if the socket buffer is full.
    pub fn try_send_raw(&self, bytes: &[u8]) -> Result<bool> {
        match bus_core::sys::scm::try_send_frame(self.sock.as_fd(), bytes, &[]) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e).context("send frame"),
        }
    }

    /// Blocks until the socket is readable or writable (or 10 ms pass).
    pub fn wait_io(&self) -> Result<()> {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let mut fds = [PollFd::new(&self.sock, PollFlags::IN | PollFlags::OUT)];
        let t = Timespec {
            tv_sec: 0,
            tv_nsec: 10_000_000,
        };
        match poll(&mut fds, Some(&t)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
            Err(e) => Err(e).context("poll"),
        }
    }

    /// Receives one frame (blocking) and returns it, decoded. Fds are in [`Client::fds`].
    pub fn recv(&mut self) -> Result<Frame<'_>> {
        let len = match recv_frame(self.sock.as_fd(), &mut self.rx, &mut self.fds)
            .context("receive frame")?
        {
            Received::Frame { len } => len,
            Received::Eof => bail!("the broker closed the connection"),
        };
        decode(&self.rx[..len]).map_err(|e| anyhow::anyhow!("bad frame from the broker: {e}"))
    }

    /// Receives one frame if one is queued (never blocks).
    pub fn try_recv(&mut self) -> Result<Option<Frame<'_>>> {
        let len = match try_recv_frame(self.sock.as_fd(), &mut self.rx, &mut self.fds) {
            Ok(Received::Frame { len }) => len,
            Ok(Received::Eof) => bail!("the broker closed the connection"),
            Err(e) if e.is_would_block() => return Ok(None),
            Err(e) => return Err(e).context("receive frame"),
        };
        decode(&self.rx[..len])
            .map(Some)
            .map_err(|e| anyhow::anyhow!("bad frame from the broker: {e}"))
    }

    /// Sends a request and returns the reply with the same request id (events that arrive
    /// before it are skipped). An ERROR reply is an error.
    pub fn request(&mut self, msg: Msg<'_>) -> Result<Frame<'_>> {
        let rid = self.next_request;
        self.next_request += 1;
        let what = msg.msg_type();
        self.send(&Frame::new(rid, msg))?;
        loop {
            let len = match recv_frame(self.sock.as_fd(), &mut self.rx, &mut self.fds)
                .context("receive reply")?
            {
                Received::Frame { len } => len,
                Received::Eof => bail!("the broker closed the connection after {what}"),
            };
            let f = decode(&self.rx[..len]).map_err(|e| anyhow::anyhow!("bad reply: {e}"))?;
            if f.request_id != rid {
                continue;
            }
            if let Msg::Error(ErrorReply { code, message }) = f.msg {
                bail!("broker refused {what}: {code}: {message}");
            }
            // Re-decode to hand out a frame borrowing `self` for the caller's lifetime.
            return decode(&self.rx[..len]).map_err(|e| anyhow::anyhow!("bad reply: {e}"));
        }
    }

    /// HELLO -> WELCOME; returns the client id.
    pub fn hello(&mut self, transport: Transport, name: &str) -> Result<u64> {
        let f = self.request(Msg::Hello(Hello {
            protocol_version: u16::from(PROTOCOL_VERSION),
            transport,
            client_name: name,
        }))?;
        match f.msg {
            Msg::Welcome(Welcome { client_id, .. }) => Ok(client_id),
            other => bail!("expected WELCOME, got {:?}", other.msg_type()),
        }
    }

    /// CREATE_PUBLISHER (datagram transport) -> RING_GRANTED (fallback); returns the publisher
    /// id.
    pub fn create_datagram_publisher(&mut self, topic: &str, mode: ModeRequest) -> Result<u64> {
        let f = self.request(Msg::CreatePublisher(CreatePublisher {
            ring_data_bytes: 0,
            max_message_bytes: 0,
            mode,
            transport: Transport::Datagram,
            topic,
        }))?;
        match f.msg {
            Msg::RingGranted(RingGranted { publisher_id, .. }) => Ok(publisher_id),
            other => bail!("expected RING_GRANTED, got {:?}", other.msg_type()),
        }
    }

    /// SUBSCRIBE -> SUBSCRIBED. With shm delivery the cursor page and wake socket are in
    /// [`Client::fds`] afterwards.
    pub fn subscribe(
        &mut self,
        topic: &str,
        mode: ModeRequest,
        delivery: Transport,
    ) -> Result<Subscribed> {
        let f = self.request(Msg::Subscribe(Subscribe {
            mode,
            delivery,
            topic,
        }))?;
        match f.msg {
            Msg::Subscribed(s) => Ok(s),
            other => bail!("expected SUBSCRIBED, got {:?}", other.msg_type()),
        }
    }

    /// A request whose success reply is OK.
    pub fn request_ok(&mut self, msg: Msg<'_>) -> Result<()> {
        let f = self.request(msg)?;
        match f.msg {
            Msg::Ok => Ok(()),
            other => bail!("expected OK, got {:?}", other.msg_type()),
        }
    }
}
