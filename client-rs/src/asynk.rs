//! Receiving in async code (feature `tokio`): a subscriber whose `recv()`
//! is a future and which is a [`Stream`], without ever blocking a runtime
//! thread.
//!
//! Shared memory has no descriptor a reactor could poll. So a receive first
//! tries the ring (a frame that is already there costs what `try_recv`
//! costs); only when the ring is empty does the task park, and a watcher
//! thread of the subscriber's own sleeps (or spins, per its
//! [`WaitStrategy`](crate::WaitStrategy)) on the subscriber's wake word in
//! its place, then wakes the task. The watcher never takes a frame, so a
//! cancelled receive loses nothing. The thread starts at the first park
//! and ends with the subscriber.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;

use futures_core::Stream;
use memsock_proto::shm::{Interrupter, OwnedSample, Position, RecvError, TryRecvError, Watcher};

use crate::StreamConfig;
use crate::client::{Client, Publisher, SubscribeOptions, Subscriber};
use crate::conn::ClientError;

/// A [`Subscriber`] for async code: `recv().await` and a [`Stream`] of
/// samples, cancel-safe, never blocking the runtime. Samples are
/// [`OwnedSample`]s: they may be held across `.await`s and moved to other
/// tasks; each slot goes back when its sample is dropped (counted against
/// the credits until the subscriber's next receive hands it back, which a
/// parked receive does at once).
///
/// The stream ends when the stream is closed or the subscriber detached;
/// a change of publisher comes as `Err(PublisherGone)` /
/// `Err(PublisherBack)` items between frames.
#[derive(Debug)]
pub struct AsyncSubscriber {
    sub: Subscriber,
    park: Arc<Park>,
    interrupter: Interrupter,
    thread: Option<JoinHandle<()>>,
    ended: bool,
}

/// What the task and the watcher thread share.
#[derive(Debug, Default)]
struct Park {
    state: Mutex<ParkState>,
    wake_thread: Condvar,
    stop: AtomicBool,
}

#[derive(Debug, Default)]
struct ParkState {
    /// Where the subscriber stood when the task parked, not yet watched.
    from: Option<Position>,
    /// The task to wake.
    waker: Option<Waker>,
    /// Whether the thread waits for a `from` (rather than watching).
    idle: bool,
}

impl Park {
    fn lock(&self) -> MutexGuard<'_, ParkState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl AsyncSubscriber {
    fn new(sub: Subscriber) -> Self {
        let interrupter = sub.watcher().interrupter();
        Self { sub, park: Arc::default(), interrupter, thread: None, ended: false }
    }

    /// Waits for the next frame without blocking the runtime.
    /// Cancel-safe: dropping the future takes nothing.
    ///
    /// # Errors
    /// As [`Subscriber::recv`](memsock_proto::shm::Subscriber::recv): a
    /// change of publisher, credits used up, closed, detached, corrupt.
    pub async fn recv(&mut self) -> Result<OwnedSample, RecvError> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Takes the next frame if one is queued.
    ///
    /// # Errors
    /// [`TryRecvError::Empty`] if none is, or another [`TryRecvError`].
    pub fn try_recv(&mut self) -> Result<OwnedSample, TryRecvError> {
        self.sub.try_recv().map(memsock_proto::shm::Sample::detach)
    }

    /// The next frame if there is one, else parks the task until there
    /// may be.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<OwnedSample, RecvError>> {
        match self.try_recv() {
            Err(TryRecvError::Empty) => {}
            other => return Poll::Ready(other.map_err(RecvError::from)),
        }
        let from = self.sub.position();
        let notify = {
            let mut state = self.park.lock();
            if !state.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                state.waker = Some(cx.waker().clone());
            }
            state.from = Some(from);
            state.idle
        };
        if notify {
            self.park.wake_thread.notify_one();
        }
        if self.thread.is_none() {
            self.start_watching();
        }
        // A frame that came since `try_recv` is news at `from`: the watcher
        // wakes us at once.
        Poll::Pending
    }

    #[cold]
    fn start_watching(&mut self) {
        let watcher = self.sub.watcher();
        let park = self.park.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("memsock-watch-{}", self.sub.stream()))
            .spawn(move || watch(&watcher, &park));
        match spawned {
            Ok(thread) => self.thread = Some(thread),
            Err(e) => {
                // Without a thread, nobody would wake the task: have it
                // poll again (and retry) instead of getting stuck.
                tracing::warn!("cannot start the watcher thread ({e}); polling instead");
                if let Some(waker) = &self.park.lock().waker {
                    waker.wake_by_ref();
                }
            }
        }
    }

    /// The subscriber underneath (credits, counters, stream name).
    pub fn subscriber(&self) -> &Subscriber {
        &self.sub
    }
}

/// The watcher thread: waits for each position the task parks at, and
/// wakes the task when there is news there.
fn watch(watcher: &Watcher, park: &Park) {
    loop {
        let from = {
            let mut state = park.lock();
            loop {
                if park.stop.load(Ordering::Relaxed) {
                    return;
                }
                if let Some(from) = state.from.take() {
                    state.idle = false;
                    break from;
                }
                state.idle = true;
                state = park.wake_thread.wait(state).unwrap_or_else(PoisonError::into_inner);
            }
        };
        watcher.wait(from, None, || park.stop.load(Ordering::Relaxed));
        if let Some(waker) = &park.lock().waker {
            // The task may have parked again meanwhile, at a newer
            // position: waking it once more is harmless.
            waker.wake_by_ref();
        }
    }
}

impl Drop for AsyncSubscriber {
    fn drop(&mut self) {
        if self.sub.is_forked() {
            // The watcher thread is the parent's (it does not exist here,
            // and its lock may be held for ever): leave it all alone.
            std::mem::forget(self.thread.take());
            return;
        }
        if let Some(thread) = self.thread.take() {
            self.park.stop.store(true, Ordering::Relaxed);
            // Wakes the thread wherever it waits: on the condition variable
            // (under the lock, so the store above is seen) or in the watcher.
            drop(self.park.lock());
            self.park.wake_thread.notify_one();
            self.interrupter.interrupt();
            let _ = thread.join();
        }
    }
}

impl Stream for AsyncSubscriber {
    type Item = Result<OwnedSample, RecvError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        match this.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(RecvError::Closed)) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Err(e @ RecvError::Detached)) => {
                this.ended = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(item) => Poll::Ready(Some(item)),
        }
    }
}

impl Subscriber {
    /// Turns this subscriber into one for async code.
    pub fn into_async(self) -> AsyncSubscriber {
        AsyncSubscriber::new(self)
    }
}

impl Client {
    /// [`subscriber`](Self::subscriber) for async code: the request runs on
    /// tokio's blocking pool (it may wait for the stream to appear), and
    /// the subscriber comes ready for `recv().await`.
    ///
    /// # Errors
    /// As [`subscriber`](Self::subscriber).
    pub async fn subscriber_async(
        &self,
        name: &str,
        options: &SubscribeOptions,
    ) -> Result<AsyncSubscriber, ClientError> {
        let (client, name, options) = (self.clone(), name.to_owned(), *options);
        let sub = tokio::task::spawn_blocking(move || client.subscriber(&name, &options))
            .await
            .map_err(|e| ClientError::TaskFailed { panicked: e.is_panic() })??;
        Ok(sub.into_async())
    }

    /// [`publisher`](Self::publisher) for async code (the request runs on
    /// tokio's blocking pool). Sending never blocks: `send` reports
    /// `WouldBlock` rather than wait.
    ///
    /// # Errors
    /// As [`publisher`](Self::publisher).
    pub async fn publisher_async(&self, name: &str, config: &StreamConfig) -> Result<Publisher, ClientError> {
        let (client, name, config) = (self.clone(), name.to_owned(), *config);
        tokio::task::spawn_blocking(move || client.publisher(&name, &config))
            .await
            .map_err(|e| ClientError::TaskFailed { panicked: e.is_panic() })?
    }
}
