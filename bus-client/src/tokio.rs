//! Async support for tokio (`--features tokio`).
//!
//! [`AsyncSubscriber`] waits for messages without a thread of its own: it registers the
//! subscriber's wait fd (an epoll fd holding the wake socket and the control notify fd, see
//! [`crate::Subscriber`]'s `AsFd`) with tokio's reactor, announces that it is about to sleep
//! ([`crate::Subscriber::prepare_to_wait`]), and awaits readiness. It offers `recv().await`
//! (an owned copy), `recv_with(|sample| ...).await` (zero-copy: the closure sees the bytes in
//! the ring), and a [`futures_core::Stream`] of owned samples.
//!
//! [`AsyncPublisher`] awaits ring space on a reliable topic: readers do not signal writers, so
//! it retries with a short timer back-off (50 us growing to 1 ms) instead of blocking a thread.

use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::unix::AsyncFd;

use crate::{OwnedSample, PublishError, Publisher, RecvError, Sample, Subscriber};

/// A subscriber for async code.
#[derive(Debug)]
pub struct AsyncSubscriber {
    sub: Subscriber,
    fd: AsyncFd<OwnedFd>,
}

impl AsyncSubscriber {
    /// Wraps a subscriber; must be called inside a tokio runtime with I/O enabled.
    pub fn new(sub: Subscriber) -> std::io::Result<AsyncSubscriber> {
        let dup = sub.as_fd().try_clone_to_owned()?;
        // tokio deprecated its safe constructors because an arbitrary `AsRawFd` may return a
        // different or closed fd later; the replacement is `unsafe`. Ours is an `OwnedFd`: it
        // owns one open fd for its whole life and always returns it, which is exactly the
        // contract the unsafe version asks the caller to uphold. This crate forbids unsafe
        // code, so it keeps the safe (deprecated) call.
        #[allow(deprecated)]
        let fd = AsyncFd::with_interest(dup, tokio::io::Interest::READABLE)?;
        Ok(AsyncSubscriber { sub, fd })
    }

    /// The wrapped subscriber (for its id, latency histogram, ...).
    pub fn get_mut(&mut self) -> &mut Subscriber {
        &mut self.sub
    }

    /// Polls for the next message; `f` sees it in place.
    fn poll_with<R>(
        &mut self,
        cx: &mut Context<'_>,
        f: &mut Option<impl FnOnce(&Sample<'_>) -> R>,
    ) -> Poll<Result<R, RecvError>> {
        loop {
            match self.sub.try_recv() {
                Ok(Some(sample)) => {
                    let f = f.take().expect("polled after completion");
                    return Poll::Ready(Ok(f(&sample)));
                }
                Ok(None) => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            if !self.sub.prepare_to_wait() {
                continue;
            }
            match self.fd.poll_read_ready(cx) {
                Poll::Ready(Ok(mut guard)) => {
                    // The subscriber drains its fds itself on the next look.
                    guard.clear_ready();
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(RecvError::Io(e))),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Receives the next message and hands it to `f` in place (zero-copy).
    pub async fn recv_with<R>(&mut self, f: impl FnOnce(&Sample<'_>) -> R) -> Result<R, RecvError> {
        let mut f = Some(f);
        std::future::poll_fn(|cx| self.poll_with(cx, &mut f)).await
    }

    /// Receives the next message as an owned copy. In a lossy topic a message overwritten
    /// while it was copied is skipped (and counted in the next one's `lost_before`).
    pub async fn recv(&mut self) -> Result<OwnedSample, RecvError> {
        let mut skipped = 0;
        loop {
            if let Some(mut s) = self.recv_with(|s| s.to_owned_sample()).await? {
                s.lost_before += skipped;
                return Ok(s);
            }
            skipped += 1;
        }
    }
}

impl futures_core::Stream for AsyncSubscriber {
    type Item = Result<OwnedSample, RecvError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            let mut f = Some(|s: &Sample<'_>| s.to_owned_sample());
            match this.poll_with(cx, &mut f) {
                Poll::Ready(Ok(Some(s))) => return Poll::Ready(Some(Ok(s))),
                // Overwritten while copied (lossy): take the next one.
                Poll::Ready(Ok(None)) => continue,
                Poll::Ready(Err(RecvError::BrokerGone { .. })) => return Poll::Ready(None),
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A publisher for async code: `send().await` waits for ring space without blocking a thread.
#[derive(Debug)]
pub struct AsyncPublisher {
    publisher: Publisher,
}

impl AsyncPublisher {
    /// Wraps a publisher.
    pub fn new(publisher: Publisher) -> AsyncPublisher {
        AsyncPublisher { publisher }
    }

    /// The wrapped publisher.
    pub fn get_mut(&mut self) -> &mut Publisher {
        &mut self.publisher
    }

    /// Publishes a copy of `payload`, awaiting ring space on a reliable topic.
    pub async fn send(&mut self, payload: &[u8]) -> Result<u64, PublishError<()>> {
        let mut nap = Duration::from_micros(50);
        loop {
            match self.publisher.try_send(payload) {
                Ok(seq) => return Ok(seq),
                Err(PublishError::Full(_)) => {
                    tokio::time::sleep(nap).await;
                    nap = (nap * 2).min(Duration::from_millis(1));
                }
                Err(e) => return Err(e.map(|_| ())),
            }
        }
    }
}
