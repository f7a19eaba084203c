//! The second process: the parent re-executes its own binary with the hidden sub-command
//! [`PEER_SUBCOMMAND`], passing shared-memory and socket fds by number.
//!
//! Parent side: [`Peer::spawn`] creates a SEQPACKET control socket, clears `FD_CLOEXEC` on the
//! peer's fds just for the spawn, and names them (control first) in the `MEMBUS_BENCH_FDS`
//! environment variable. Peer side: [`peer_main`] adopts those fds, pins itself, looks the case up
//! by name and runs its peer function with a [`PeerCtx`].
//!
//! The control socket carries two messages, peer to parent: READY (set up and pinned) and DONE
//! (the checksum of everything the peer read, and the CLOCK_MONOTONIC time it read the last
//! byte). If the peer dies, the parent's control read sees end-of-file; if the parent dies, the
//! kernel kills the peer (`PR_SET_PDEATHSIG`).
//!
//! Unsafe code is allowed here only to adopt the inherited fds ([`OwnedFd::from_raw_fd`]).
#![allow(unsafe_code)]

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail, ensure};
use rustix::io::{FdFlags, fcntl_getfd, fcntl_setfd};
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType, recv, send};
use rustix::process::{Signal, getppid, set_parent_process_death_signal};

use crate::case::Params;

/// The hidden sub-command that runs the peer side of a case. A binary embedding the harness
/// (`benches`, later `bus bench`) must hand `argv[2..]` to [`peer_main`] when `argv[1]` is this.
pub const PEER_SUBCOMMAND: &str = "__peer";

/// Environment variable naming the inherited fds, comma-separated, control socket first.
const FDS_ENV: &str = "MEMBUS_BENCH_FDS";

const TAG_READY: u64 = 1;
const TAG_DONE: u64 = 2;

/// What the peer reports when it finishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    /// [`crate::checksum::sum`]s of every payload the peer read, added up (wrapping).
    pub checksum: u64,
    /// CLOCK_MONOTONIC when the peer called [`PeerCtx::done`].
    pub end_ns: u64,
}

/// The parent's handle on a running peer process.
#[derive(Debug)]
pub struct Peer {
    child: Child,
    control: OwnedFd,
}

impl Peer {
    /// Starts the peer side of `p.case`, handing it `fds` (in this order; see
    /// [`PeerCtx::take_fd`]). Close your copies of fds only the peer uses after this returns, so
    /// that a dead peer shows up as end-of-file.
    pub fn spawn(p: &Params, fds: &[BorrowedFd<'_>]) -> Result<Peer> {
        let (ours, theirs) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .context("control socketpair")?;
        let mut inherit: Vec<BorrowedFd<'_>> = vec![theirs.as_fd()];
        inherit.extend_from_slice(fds);
        let list = inherit
            .iter()
            .map(|fd| fd.as_raw_fd().to_string())
            .collect::<Vec<_>>()
            .join(",");
        // The harness is single-threaded apart from its watchdog, which never spawns, so no other
        // child can inherit these fds while CLOEXEC is off.
        for fd in &inherit {
            fcntl_setfd(fd, FdFlags::empty()).context("clear FD_CLOEXEC")?;
        }
        let spawned = Command::new(&p.peer_exe)
            .arg(PEER_SUBCOMMAND)
            .args(p.to_args())
            .env(FDS_ENV, list)
            .stdin(Stdio::null())
            .spawn();
        for fd in &inherit {
            fcntl_setfd(fd, FdFlags::CLOEXEC).context("restore FD_CLOEXEC")?;
        }
        let child = spawned.with_context(|| format!("spawn peer {}", p.peer_exe.display()))?;
        drop(theirs);
        Ok(Peer {
            child,
            control: ours,
        })
    }

    /// Waits until the peer has mapped its memory, pinned itself and is about to wait for data.
    pub fn wait_ready(&mut self) -> Result<()> {
        let [tag, ..] = self.recv()?;
        ensure!(tag == TAG_READY, "peer sent {tag} instead of READY");
        Ok(())
    }

    /// Waits for the peer's DONE and for it to exit successfully.
    pub fn finish(mut self) -> Result<Done> {
        let [tag, checksum, end_ns] = self.recv()?;
        ensure!(tag == TAG_DONE, "peer sent {tag} instead of DONE");
        let status = self.child.wait().context("wait for peer")?;
        ensure!(status.success(), "peer exited with {status}");
        Ok(Done { checksum, end_ns })
    }

    fn recv(&mut self) -> Result<[u64; 3]> {
        let mut buf = [0u8; 24];
        let n = loop {
            match recv(&self.control, &mut buf[..], RecvFlags::empty()) {
                Err(rustix::io::Errno::INTR) => continue,
                other => break other.context("read peer control socket")?.1,
            }
        };
        if n == 0 {
            let status = self.child.wait().context("wait for peer")?;
            bail!("peer exited early ({status}); its error is on stderr above");
        }
        ensure!(n == buf.len(), "short control message ({n} bytes)");
        Ok(decode(&buf))
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // On an error path the peer may still run (spinning on memory no one writes): end it.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn encode(msg: [u64; 3]) -> [u8; 24] {
    let mut buf = [0u8; 24];
    for (chunk, v) in buf.chunks_exact_mut(8).zip(msg) {
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    buf
}

fn decode(buf: &[u8; 24]) -> [u64; 3] {
    let mut msg = [0u64; 3];
    for (v, chunk) in msg.iter_mut().zip(buf.chunks_exact(8)) {
        let mut le = [0u8; 8];
        le.copy_from_slice(chunk);
        *v = u64::from_le_bytes(le);
    }
    msg
}

/// What a case's peer function gets: its parameters, the fds the parent passed, and the control
/// socket.
#[derive(Debug)]
pub struct PeerCtx {
    /// The parameters the parent ran the case with.
    pub params: Params,
    control: OwnedFd,
    fds: Vec<Option<OwnedFd>>,
}

impl PeerCtx {
    /// Takes the `i`-th fd the parent passed to [`Peer::spawn`].
    pub fn take_fd(&mut self, i: usize) -> Result<OwnedFd> {
        self.fds
            .get_mut(i)
            .and_then(Option::take)
            .with_context(|| format!("peer fd {i} missing or already taken"))
    }

    /// Tells the parent this side is set up; call right before waiting for the first message.
    pub fn ready(&self) -> Result<()> {
        self.send([TAG_READY, 0, 0])
    }

    /// Tells the parent this side is finished, stamping CLOCK_MONOTONIC now.
    pub fn done(&self, checksum: u64) -> Result<()> {
        let end_ns = bus_core::sys::clock::monotonic_ns();
        self.send([TAG_DONE, checksum, end_ns])
    }

    fn send(&self, msg: [u64; 3]) -> Result<()> {
        let n = send(&self.control, &encode(msg), SendFlags::empty()).context("control send")?;
        ensure!(n == 24, "short control send");
        Ok(())
    }
}

/// Entry point of the peer process: `args` are the arguments after [`PEER_SUBCOMMAND`].
pub fn peer_main(args: &[String]) -> Result<()> {
    set_parent_process_death_signal(Some(Signal::KILL)).context("PR_SET_PDEATHSIG")?;
    if getppid().is_none_or(|p| p.as_raw_nonzero().get() == 1) {
        bail!("the parent exited before the peer started");
    }
    let params = Params::from_args(args)?;
    let mut fds = adopt_inherited_fds()?;
    ensure!(!fds.is_empty(), "no control socket in {FDS_ENV}");
    let control = fds.remove(0);
    let case = crate::find_case(&params.case)
        .with_context(|| format!("peer: unknown case {:?}", params.case))?;
    let peer = case
        .peer
        .with_context(|| format!("case {} has no peer side", case.name))?;
    if let Some((_, cpu)) = params.pin {
        bus_core::sys::cpu::pin_current_thread(cpu)?;
    }
    peer(PeerCtx {
        params,
        control,
        fds: fds.into_iter().map(Some).collect(),
    })
}

/// Takes ownership of the fds named in [`FDS_ENV`] and marks them close-on-exec again.
fn adopt_inherited_fds() -> Result<Vec<OwnedFd>> {
    let list = std::env::var(FDS_ENV).with_context(|| format!("{FDS_ENV} not set"))?;
    let mut raw: Vec<RawFd> = Vec::new();
    for part in list.split(',').filter(|s| !s.is_empty()) {
        let fd: RawFd = part
            .parse()
            .with_context(|| format!("{FDS_ENV}: {part:?}"))?;
        ensure!(fd > 2, "{FDS_ENV} names stdio fd {fd}");
        ensure!(!raw.contains(&fd), "{FDS_ENV} names fd {fd} twice");
        raw.push(fd);
    }
    let mut owned = Vec::with_capacity(raw.len());
    for fd in raw {
        // SAFETY: `fd` is > 2 and only borrowed for this one fcntl, which fails with EBADF
        // rather than misbehaving if the number is not open.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        fcntl_getfd(borrowed).with_context(|| format!("inherited fd {fd} is not open"))?;
        // SAFETY: the fd is open (checked above), was inherited for this purpose from the parent
        // (which named it in FDS_ENV), appears once in the list (checked above), and nothing else
        // in this process owns it: std only opens fds with CLOEXEC semantics of its own and never
        // adopts numbers from the environment.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        fcntl_setfd(&fd, FdFlags::CLOEXEC).context("set FD_CLOEXEC")?;
        owned.push(fd);
    }
    Ok(owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_round_trip() {
        let msg = [TAG_DONE, u64::MAX - 3, 12345];
        assert_eq!(decode(&encode(msg)), msg);
    }
}
