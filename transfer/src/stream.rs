//! The metered stream: every byte of a client's connection, TLS records included,
//! passes through it. It counts both directions, limits the sending rate (governor),
//! and asks a [`Meter`] before it writes: reserve, write, settle.
//!
//! Place it *under* TLS (`TlsConnector::connect(name, MeteredStream::new(tcp, ...))`)
//! so that handshakes, record headers and retries are charged like payload.

use std::io;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use governor::clock::{Clock, Reference};
use governor::nanos::Nanos;
use governor::{Quota, RateLimiter};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes one write passes on at once, so that a budget or a rate change
/// takes effect within a small amount of data. Above one TLS record (16 KiB of
/// payload and 22 bytes of framing), so that a record is never split into a
/// full write and a 22-byte one.
pub const MAX_WRITE: usize = 64 * 1024;

/// Most buffers one vectored write passes on.
const MAX_SLICES: usize = 16;

/// The rate limiter's largest burst: one TLS record and its framing, as before
/// writes grew to [`MAX_WRITE`] (a limited link should not get bursts four
/// times that, nor lose that many cells to a write the socket takes in part).
const RATE_BURST: u32 = 16 * 1024 + 22;

/// What decides whether bytes may be sent, and what they cost. The daemon's ledger
/// implements it per network; [`Unmetered`] lets everything through.
pub trait Meter: Send + Sync {
    /// Asks to send up to `want` bytes; returns how many may go now, 0 when the
    /// budget is spent (the write then fails with [`BudgetExhausted`]).
    fn reserve(&self, want: usize) -> usize;
    /// Settles a reservation: `sent` of the `reserved` bytes were written.
    fn settle(&self, reserved: usize, sent: usize);
    /// Charges bytes received: they cannot be refused, only counted.
    fn received(&self, bytes: usize);
}

/// A meter with no budget: everything may go.
#[derive(Debug, Default)]
pub struct Unmetered;

impl Meter for Unmetered {
    fn reserve(&self, want: usize) -> usize {
        want
    }
    fn settle(&self, _reserved: usize, _sent: usize) {}
    fn received(&self, _bytes: usize) {}
}

/// The error a write fails with when the meter grants nothing: the budget of the
/// current network is spent. Not a connection failure: resume later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the data budget of this network is spent; sending resumes when it allows")]
pub struct BudgetExhausted;

impl BudgetExhausted {
    /// Whether an IO error is this one.
    pub fn is(error: &io::Error) -> bool {
        error.get_ref().is_some_and(|e| e.is::<Self>())
    }
}

/// Bytes that crossed the stream, each way.
#[derive(Debug, Default)]
pub struct Traffic {
    sent: AtomicU64,
    received: AtomicU64,
}

impl Traffic {
    /// Bytes written.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
    /// Bytes read.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// Tokio's clock for governor, so that paused time in tests and the runtime's
/// timers agree with the rate limiter.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioClock;

/// An instant of [`TokioClock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TokioInstant(tokio::time::Instant);

impl std::ops::Add<Nanos> for TokioInstant {
    type Output = Self;
    fn add(self, other: Nanos) -> Self {
        Self(self.0 + Duration::from(other))
    }
}

impl Reference for TokioInstant {
    fn duration_since(&self, earlier: Self) -> Nanos {
        self.0.saturating_duration_since(earlier.0).into()
    }
    fn saturating_sub(&self, duration: Nanos) -> Self {
        Self(self.0.checked_sub(duration.into()).unwrap_or(self.0))
    }
}

impl Clock for TokioClock {
    type Instant = TokioInstant;
    fn now(&self) -> TokioInstant {
        TokioInstant(tokio::time::Instant::now())
    }
}

type Limiter = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    TokioClock,
    governor::middleware::NoOpMiddleware<TokioInstant>,
>;

/// A live handle on the sending rate of one or more streams: changes apply to
/// the next write.
#[derive(Clone, Default)]
pub struct Rate {
    limiter: Arc<Mutex<Option<Limit>>>,
}

/// A rate limiter and its burst size in bytes.
#[derive(Clone)]
struct Limit {
    limiter: Arc<Limiter>,
    burst: u32,
}

impl Rate {
    /// No limit.
    pub fn unlimited() -> Self {
        Self::default()
    }

    /// At most `bytes_per_second`, in bursts of at most one TLS record.
    pub fn limited(bytes_per_second: NonZeroU32) -> Self {
        let rate = Self::default();
        rate.set(Some(bytes_per_second));
        rate
    }

    /// Changes the rate (`None`: unlimited), effective from the next write.
    pub fn set(&self, bytes_per_second: Option<NonZeroU32>) {
        let limiter = bytes_per_second.map(|rate| {
            let burst = rate.min(NonZeroU32::new(RATE_BURST).expect("RATE_BURST > 0"));
            let quota = Quota::per_second(rate).allow_burst(burst);
            Limit {
                limiter: Arc::new(RateLimiter::direct_with_clock(quota, TokioClock)),
                burst: burst.get(),
            }
        });
        *self.limiter.lock().unwrap_or_else(|p| p.into_inner()) = limiter;
    }

    fn current(&self) -> Option<Limit> {
        self.limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A stream that meters, counts and rate-limits what passes through it.
pub struct MeteredStream<S> {
    inner: S,
    meter: Arc<dyn Meter>,
    rate: Rate,
    traffic: Arc<Traffic>,
    delay: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> MeteredStream<S> {
    /// Wraps `inner`, charging `meter` and limiting to `rate`.
    pub fn new(inner: S, meter: Arc<dyn Meter>, rate: Rate) -> Self {
        Self {
            inner,
            meter,
            rate,
            traffic: Arc::default(),
            delay: None,
        }
    }

    /// The counters of this stream (shareable: they outlive it).
    pub fn traffic(&self) -> Arc<Traffic> {
        Arc::clone(&self.traffic)
    }
}

impl<S: AsyncWrite + Unpin> MeteredStream<S> {
    /// Waits for the rate limiter and asks the meter for up to `len` bytes;
    /// returns how many may go now (never 0: a meter that grants nothing ends
    /// the write with [`BudgetExhausted`]).
    fn poll_grant(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<usize>> {
        if let Some(delay) = self.delay.as_mut() {
            ready!(delay.as_mut().poll(cx));
            self.delay = None;
        }
        let mut want = len.min(MAX_WRITE);
        if let Some(Limit { limiter, burst }) = self.rate.current() {
            want = want.min(burst as usize);
            let cells = NonZeroU32::new(want as u32).expect("want > 0");
            match limiter.check_n(cells) {
                Ok(Ok(())) => {}
                Ok(Err(not_until)) => {
                    let wait = not_until.wait_time_from(TokioClock.now());
                    let mut delay = Box::pin(tokio::time::sleep(wait));
                    // Registers the waker; the sleep is polled again next time.
                    if delay.as_mut().poll(cx).is_pending() {
                        self.delay = Some(delay);
                        return Poll::Pending;
                    }
                    // The wait was zero after all: take the next turn.
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                // `want` never exceeds the burst, so this cannot happen.
                Err(_) => {
                    return Poll::Ready(Err(io::Error::other("rate limiter burst too small")));
                }
            }
        }
        let granted = self.meter.reserve(want).min(want);
        if granted == 0 {
            return Poll::Ready(Err(io::Error::other(BudgetExhausted)));
        }
        Poll::Ready(Ok(granted))
    }

    /// Settles a grant with what the inner write did.
    fn settle(
        &mut self,
        granted: usize,
        result: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match result {
            Poll::Ready(Ok(sent)) => {
                self.meter.settle(granted, sent);
                self.traffic.sent.fetch_add(sent as u64, Ordering::Relaxed);
                Poll::Ready(Ok(sent))
            }
            other => {
                // Nothing was written: give the reservation back.
                self.meter.settle(granted, 0);
                other
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for MeteredStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        let granted = ready!(this.poll_grant(cx, buf.len()))?;
        let result = Pin::new(&mut this.inner).poll_write(cx, &buf[..granted]);
        this.settle(granted, result)
    }

    /// Several buffers in one write: TLS hands over its records this way, so that
    /// a record and the next go out together rather than as a full segment and
    /// a runt (with `TCP_NODELAY`, every write is a packet of its own).
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if len == 0 {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        let granted = ready!(this.poll_grant(cx, len))?;
        // The first `granted` bytes of `bufs`, in at most `MAX_SLICES` slices.
        let mut limited = [io::IoSlice::new(&[]); MAX_SLICES];
        let mut count = 0;
        let mut left = granted;
        for buf in bufs.iter().filter(|b| !b.is_empty()) {
            if left == 0 || count == MAX_SLICES {
                break;
            }
            let take = buf.len().min(left);
            limited[count] = io::IoSlice::new(&buf[..take]);
            count += 1;
            left -= take;
        }
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, &limited[..count]);
        this.settle(granted, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for MeteredStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            this.meter.received(read);
            this.traffic
                .received
                .fetch_add(read as u64, Ordering::Relaxed);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A budget in bytes, reserved before and settled after, as the ledger will.
    #[derive(Default)]
    struct Budget {
        left: AtomicUsize,
        reserved: AtomicUsize,
        spent: AtomicUsize,
        received: AtomicUsize,
    }

    impl Meter for Budget {
        fn reserve(&self, want: usize) -> usize {
            let granted = want.min(self.left.load(Ordering::SeqCst));
            self.left.fetch_sub(granted, Ordering::SeqCst);
            self.reserved.fetch_add(granted, Ordering::SeqCst);
            granted
        }
        fn settle(&self, reserved: usize, sent: usize) {
            self.reserved.fetch_sub(reserved, Ordering::SeqCst);
            self.left.fetch_add(reserved - sent, Ordering::SeqCst);
            self.spent.fetch_add(sent, Ordering::SeqCst);
        }
        fn received(&self, bytes: usize) {
            self.received.fetch_add(bytes, Ordering::SeqCst);
        }
    }

    /// Records the size of every write that reaches it.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<usize>,
        bytes: Vec<u8>,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.writes.push(buf.len());
            this.bytes.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let len = bufs.iter().map(|b| b.len()).sum();
            this.writes.push(len);
            for buf in bufs {
                this.bytes.extend_from_slice(buf);
            }
            Poll::Ready(Ok(len))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn tls_records_go_out_together_and_never_as_a_runt() {
        // Two full TLS records (16 KiB of payload and 22 bytes of framing each).
        let first = vec![1_u8; 16_406];
        let second = vec![2_u8; 16_406];
        let budget = Arc::new(Budget::default());
        budget.left.store(1 << 20, Ordering::SeqCst);
        let mut stream = MeteredStream::new(
            Recorder::default(),
            Arc::clone(&budget) as Arc<dyn Meter>,
            Rate::unlimited(),
        );
        assert!(stream.is_write_vectored());
        let written = stream
            .write_vectored(&[io::IoSlice::new(&first), io::IoSlice::new(&second)])
            .await
            .unwrap();
        assert_eq!(written, 32_812);
        assert_eq!(stream.inner.writes, vec![32_812]);
        stream.write_all(&first).await.unwrap();
        assert_eq!(stream.inner.writes, vec![32_812, 16_406]);
        assert_eq!(budget.spent.load(Ordering::SeqCst), 49_218);
        // A grant that ends inside the second buffer passes exactly that much.
        budget.left.store(20_000, Ordering::SeqCst);
        let written = stream
            .write_vectored(&[io::IoSlice::new(&first), io::IoSlice::new(&second)])
            .await
            .unwrap();
        assert_eq!(written, 20_000);
        assert_eq!(stream.inner.writes[2], 20_000);
        let tail = &stream.inner.bytes[49_218..];
        assert_eq!(&tail[..16_406], first.as_slice());
        assert_eq!(&tail[16_406..], &second[..3_594]);
        assert_eq!(budget.reserved.load(Ordering::SeqCst), 0);
        // Spent: the next vectored write fails with the typed error.
        let error = stream
            .write_vectored(&[io::IoSlice::new(&first)])
            .await
            .unwrap_err();
        assert!(BudgetExhausted::is(&error), "{error}");
    }

    #[tokio::test]
    async fn both_directions_are_counted() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let mut stream = MeteredStream::new(near, Arc::new(Unmetered), Rate::unlimited());
        let traffic = stream.traffic();
        stream.write_all(&[1; 100_000]).await.unwrap();
        far.write_all(&[2; 777]).await.unwrap();
        let mut back = [0; 777];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!((traffic.sent(), traffic.received()), (100_000, 777));
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_is_held_under_paused_time() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let rate = Rate::limited(NonZeroU32::new(10_000).unwrap());
        let mut stream = MeteredStream::new(near, Arc::new(Unmetered), rate);
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            far.read_to_end(&mut all).await.unwrap();
            all.len()
        });
        let start = tokio::time::Instant::now();
        stream.write_all(&[0; 50_000]).await.unwrap();
        let elapsed = start.elapsed();
        // A burst of 10 000 bytes goes at once, the other 40 000 at 10 000 a second.
        assert!(elapsed >= Duration::from_millis(3_900), "{elapsed:?}");
        assert!(elapsed <= Duration::from_millis(4_100), "{elapsed:?}");
        stream.shutdown().await.unwrap();
        drop(stream);
        assert_eq!(reader.await.unwrap(), 50_000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_change_applies_to_the_next_write() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let rate = Rate::limited(NonZeroU32::new(1_000).unwrap());
        let mut stream = MeteredStream::new(near, Arc::new(Unmetered), rate.clone());
        tokio::spawn(async move { tokio::io::copy(&mut far, &mut tokio::io::sink()).await });
        rate.set(NonZeroU32::new(1_000_000));
        let start = tokio::time::Instant::now();
        stream.write_all(&[0; 100_000]).await.unwrap();
        assert!(
            start.elapsed() < Duration::from_millis(200),
            "{:?}",
            start.elapsed()
        );
        rate.set(None);
        stream.write_all(&[0; 1_000_000]).await.unwrap();
    }

    #[tokio::test]
    async fn the_budget_is_never_exceeded_and_says_why_it_stopped() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let budget = Arc::new(Budget::default());
        budget.left.store(30_000, Ordering::SeqCst);
        let mut stream = MeteredStream::new(
            near,
            Arc::clone(&budget) as Arc<dyn Meter>,
            Rate::unlimited(),
        );
        let error = stream.write_all(&[7; 50_000]).await.unwrap_err();
        assert!(BudgetExhausted::is(&error), "{error}");
        assert_eq!(budget.spent.load(Ordering::SeqCst), 30_000);
        assert_eq!(
            budget.reserved.load(Ordering::SeqCst),
            0,
            "every reservation settled"
        );
        assert_eq!(stream.traffic().sent(), 30_000);
        far.write_all(&[1; 10]).await.unwrap();
        let mut back = [0; 10];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(budget.received.load(Ordering::SeqCst), 10);
    }
}
