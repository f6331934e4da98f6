//! The subscriber: blocking receives that release the GIL and answer
//! Ctrl-C, batches of small messages, and the pieces `memsock._aio` uses
//! to wait without blocking an event loop.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use memsock::{RecvError, TryRecvError};
use numpy::{IntoPyArray, PyArray1, PyArrayMethods};
use pyo3::exceptions::PyIndexError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use sync_wrapper::SyncWrapper;

use crate::frame::Frame;
use crate::{SIGNAL_SLICE, deadline, errors};

/// A subscription to a stream. Receive with `recv()`, `try_recv()`,
/// `recv_batch()`, `for frame in sub:` or, in asyncio, `await
/// sub.recv_async()` / `async for frame in sub:`. One thread at a time
/// uses a subscriber (frames may go anywhere).
#[pyclass(module = "memsock")]
pub(crate) struct Subscriber {
    // Only reached through `&mut self`, so sharing the wrapper between
    // threads shares nothing: what makes the (not `Sync`) subscriber fit a
    // Python object.
    inner: SyncWrapper<Option<memsock::Subscriber>>,
    stream: String,
    /// News a batch ran into after it had frames: raised by the next
    /// receive, so that no `PublisherGone`/`PublisherBack`/end is lost.
    pending: Option<TryRecvError>,
    /// Frames whose `with` block ended while views of them were alive:
    /// each is released when its last view ends.
    held_by_views: Arc<AtomicU32>,
}

impl Subscriber {
    pub(crate) fn new(inner: memsock::Subscriber) -> Self {
        let stream = inner.stream().to_owned();
        Self { inner: SyncWrapper::new(Some(inner)), stream, pending: None, held_by_views: Arc::default() }
    }

    /// The count its frames keep of those waiting for their views to end.
    pub(crate) fn views_counter(&self) -> Arc<AtomicU32> {
        self.held_by_views.clone()
    }

    /// Credits exhausted: says so, and how many frames only views hold.
    fn exhausted(&self, held: u32, credits: u32) -> PyErr {
        exhausted(&self.held_by_views, held, credits)
    }
}

/// Credits exhausted: says so, and how many frames only views hold
/// (`held_by_views`).
fn exhausted(held_by_views: &AtomicU32, held: u32, credits: u32) -> PyErr {
    let by_views = held_by_views.load(Ordering::Relaxed);
    if by_views == 0 {
        return errors::recv(RecvError::CreditsExhausted { held, credits });
    }
    errors::CreditsExhausted::new_err(format!(
        "all {credits} credits are held by frames not yet released, {by_views} of them by frames whose `with` \
         block ended while views of them (numpy arrays, memoryviews) were alive: each goes back when its last \
         view is deleted"
    ))
}

impl Subscriber {
    /// Raises the news a batch left pending, if any.
    fn raise_pending(&mut self) -> PyResult<()> {
        match self.pending.take() {
            Some(e) => Err(errors::try_recv(e)),
            None => Ok(()),
        }
    }

    /// Hands back the slots of frames released since the last receive.
    pub(crate) fn hand_back(&mut self) {
        if let Some(sub) = self.inner.get_mut() {
            sub.hand_back();
        }
    }

    fn sub(&mut self) -> PyResult<&mut memsock::Subscriber> {
        self.inner.get_mut().as_mut().ok_or_else(|| errors::Error::new_err("the subscriber is closed"))
    }

    /// Waits for a frame until `deadline`, in slices that let Python look
    /// for signals.
    fn wait_frame(&mut self, py: Python<'_>, deadline: Option<Instant>) -> PyResult<Frame> {
        self.raise_pending()?;
        let by_views = &self.held_by_views;
        let sub = self.inner.get_mut().as_mut().ok_or_else(|| errors::Error::new_err("the subscriber is closed"))?;
        match sub.try_recv() {
            Ok(sample) => return Ok(Frame::new(sample.detach())),
            Err(TryRecvError::Empty) => {}
            Err(TryRecvError::CreditsExhausted { held, credits }) => return Err(exhausted(by_views, held, credits)),
            Err(e) => return Err(errors::try_recv(e)),
        }
        loop {
            let slice = match deadline {
                None => SIGNAL_SLICE,
                Some(d) => d.saturating_duration_since(Instant::now()).min(SIGNAL_SLICE),
            };
            // Moved in as `&mut`: the subscriber is `Send`, not `Sync`.
            let sub_now = &mut *sub;
            let got = py.detach(move || sub_now.recv_timeout(slice).map(memsock::Sample::detach));
            match got {
                Ok(sample) => return Ok(Frame::new(sample)),
                Err(RecvError::Timeout) => {
                    py.check_signals()?;
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(errors::recv(RecvError::Timeout));
                    }
                }
                Err(RecvError::CreditsExhausted { held, credits }) => return Err(exhausted(by_views, held, credits)),
                Err(e) => return Err(errors::recv(e)),
            }
        }
    }
}

#[pymethods]
impl Subscriber {
    /// Waits for the next frame (for ever, or `timeout` seconds: then
    /// `memsock.Timeout`). Raises `PublisherGone` / `PublisherBack` when the
    /// publisher changes (receive again to go on), `StreamClosed` at the
    /// end. Releases the GIL while it waits; Ctrl-C raises KeyboardInterrupt.
    #[pyo3(signature = (timeout=None))]
    fn recv(slf: &Bound<'_, Self>, timeout: Option<f64>) -> PyResult<Frame> {
        let deadline = deadline(timeout)?;
        let frame = slf.borrow_mut().wait_frame(slf.py(), deadline)?;
        Ok(frame.owned_by(slf))
    }

    /// The next frame if one is queued, else None.
    fn try_recv(slf: &Bound<'_, Self>) -> PyResult<Option<Frame>> {
        slf.borrow_mut().raise_pending()?;
        let got = slf.borrow_mut().sub()?.try_recv().map(memsock::Sample::detach);
        match got {
            Ok(sample) => Ok(Some(Frame::new(sample).owned_by(slf))),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::CreditsExhausted { held, credits }) => Err(slf.borrow().exhausted(held, credits)),
            Err(e) => Err(errors::try_recv(e)),
        }
    }

    /// Waits (like `recv`) for at least one message, then takes up to
    /// `max_n` without waiting more, copied into one `Batch` (numpy
    /// arrays: `data`, `offsets`, `seq`, `timestamp_ns`). Slots go back at
    /// once. For many small messages per Python call. News met after the
    /// first message (`PublisherGone`, `PublisherBack`, the end) is raised
    /// by the next receive, after the batch's messages.
    #[pyo3(signature = (max_n, timeout=None))]
    fn recv_batch(&mut self, py: Python<'_>, max_n: usize, timeout: Option<f64>) -> PyResult<Batch> {
        if max_n == 0 {
            return Err(errors::InvalidArgument::new_err("max_n must be at least 1"));
        }
        let deadline = deadline(timeout)?;
        let mut batch = BatchBuilder::default();
        // The first message may need waiting for (copied, then its slot is
        // released at once).
        {
            let first = self.wait_frame(py, deadline)?;
            batch.push(&first);
        }
        let sub = self.sub()?;
        let batch_now = &mut batch;
        let news = py.detach(move || {
            let batch = batch_now;
            while batch.seq.len() < max_n {
                match sub.try_recv() {
                    Ok(sample) => batch.push_sample(&sample),
                    Err(TryRecvError::Empty | TryRecvError::CreditsExhausted { .. }) => break,
                    Err(news) => return Some(news),
                }
            }
            None
        });
        self.pending = news;
        Ok(batch.finish(py))
    }

    /// Changes this subscriber's credits while it runs (raising them is
    /// checked like subscribing: `CreditsRefused` with the numbers).
    fn set_credits(&mut self, py: Python<'_>, credits: u32) -> PyResult<()> {
        let sub = self.sub()?;
        py.detach(move || sub.set_credits(credits)).map_err(errors::client)
    }

    /// The publisher generation: how many times a publisher has arrived
    /// or left, odd while one is attached. Compare two readings to learn
    /// of a change without catching `PublisherGone` / `PublisherBack`.
    #[getter]
    fn publisher_generation(&mut self) -> PyResult<u64> {
        Ok(self.sub()?.publisher_generation())
    }

    /// Current credits.
    #[getter]
    fn credits(&mut self) -> PyResult<u32> {
        Ok(self.sub()?.credits())
    }

    /// Frames currently held (received and not yet released).
    #[getter]
    fn held(&mut self) -> PyResult<u32> {
        let sub = self.sub()?;
        sub.hand_back();
        Ok(sub.borrowed())
    }

    /// Of the frames held, those whose `with` block has ended while views
    /// of them were alive: each goes back when its last view is deleted.
    #[getter]
    fn held_by_views(&self) -> u32 {
        self.held_by_views.load(Ordering::Relaxed)
    }

    /// The stream's name.
    #[getter]
    fn stream(&self) -> &str {
        &self.stream
    }

    /// `None` while the broker is there, else a `memsock.BrokerGone`
    /// (`Client.broker_gone`): receiving goes on meanwhile.
    #[getter]
    fn broker_gone(&mut self) -> PyResult<Option<crate::BrokerGone>> {
        Ok(crate::BrokerGone::of(self.sub()?.broker_gone()))
    }

    /// Ends the subscription (frames still held stay valid until they are
    /// released). Also done when the subscriber is collected.
    fn close(&mut self) {
        *self.inner.get_mut() = None;
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __exit__(&mut self, _t: &Bound<'_, PyAny>, _e: &Bound<'_, PyAny>, _tb: &Bound<'_, PyAny>) -> bool {
        self.close();
        false
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// Iteration yields frames until the stream is closed (or the
    /// subscriber detached); changes of publisher are skipped.
    fn __next__(slf: &Bound<'_, Self>) -> PyResult<Option<Frame>> {
        let py = slf.py();
        loop {
            let got = slf.borrow_mut().wait_frame(py, None);
            match got {
                Ok(frame) => return Ok(Some(frame.owned_by(slf))),
                Err(e)
                    if e.is_instance_of::<errors::PublisherGone>(py)
                        || e.is_instance_of::<errors::PublisherBack>(py) => {}
                Err(e) if e.is_instance_of::<errors::StreamClosed>(py) || e.is_instance_of::<errors::Detached>(py) => {
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits for the next frame without blocking the asyncio event loop
    /// (a coroutine). Errors as `recv`; cancelling it loses nothing.
    #[pyo3(signature = (timeout=None))]
    fn recv_async<'py>(slf: &Bound<'py, Self>, timeout: Option<f64>) -> PyResult<Bound<'py, PyAny>> {
        slf.py().import("memsock._aio")?.getattr("recv_async")?.call1((slf, timeout))
    }

    fn __aiter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// `async for frame in sub:` yields frames until the stream is closed;
    /// changes of publisher are skipped.
    fn __anext__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        slf.py().import("memsock._aio")?.getattr("anext_frame")?.call1((slf,))
    }

    /// A frame if one is queued, else where the subscriber stands (for
    /// `Watcher.wait`). Used by `recv_async`.
    fn _poll(slf: &Bound<'_, Self>) -> PyResult<(Option<Frame>, Option<Position>)> {
        let got = {
            let mut this = slf.borrow_mut();
            this.raise_pending()?;
            let sub = this.sub()?;
            match sub.try_recv().map(memsock::Sample::detach) {
                Ok(sample) => Ok(sample),
                Err(TryRecvError::Empty) => return Ok((None, Some(Position { inner: sub.position() }))),
                Err(TryRecvError::CreditsExhausted { held, credits }) => Err(this.exhausted(held, credits)),
                Err(e) => Err(errors::try_recv(e)),
            }
        };
        Ok((Some(Frame::new(got?).owned_by(slf)), None))
    }

    /// A watcher of this subscriber (for `recv_async`).
    fn _watcher(&mut self) -> PyResult<Watcher> {
        Ok(Watcher { inner: SyncWrapper::new(self.sub()?.watcher()) })
    }

    fn __repr__(&self) -> String {
        format!("<memsock.Subscriber stream={:?}>", self.stream)
    }
}

/// Where a subscriber stood when it found nothing (opaque).
#[pyclass(module = "memsock", frozen)]
pub(crate) struct Position {
    inner: memsock::shm::Position,
}

/// Waits for news of a subscriber on another thread without taking
/// anything (what `recv_async` runs in an executor).
#[pyclass(module = "memsock")]
pub(crate) struct Watcher {
    inner: SyncWrapper<memsock::shm::Watcher>,
}

#[pymethods]
impl Watcher {
    /// Waits up to `timeout` seconds, without the GIL, for the subscriber
    /// at `position` to have something; returns whether it does.
    fn wait(&mut self, py: Python<'_>, position: &Position, timeout: f64) -> PyResult<bool> {
        let until = deadline(Some(timeout))?;
        let (watcher, from) = (self.inner.get_mut(), position.inner);
        Ok(py.detach(move || watcher.wait(from, until, || false)))
    }
}

/// Messages received by `recv_batch`, copied: `data` (uint8) holds them
/// end to end, message `i` is `data[offsets[i]:offsets[i+1]]`; `seq` and
/// `timestamp_ns` (uint64) per message. `len(batch)`, `batch[i]` (bytes).
#[pyclass(module = "memsock", frozen)]
pub(crate) struct Batch {
    data: Py<PyArray1<u8>>,
    offsets: Py<PyArray1<u64>>,
    seq: Py<PyArray1<u64>>,
    timestamp_ns: Py<PyArray1<u64>>,
    bounds: Vec<usize>,
    len: usize,
}

#[derive(Default)]
struct BatchBuilder {
    data: Vec<u8>,
    offsets: Vec<u64>,
    seq: Vec<u64>,
    timestamp_ns: Vec<u64>,
}

impl BatchBuilder {
    fn push(&mut self, frame: &Frame) {
        frame.with_bytes(|bytes, seq, ts| self.add(bytes, seq, ts));
    }

    fn push_sample(&mut self, sample: &memsock::Sample<'_>) {
        self.add(sample, sample.seq(), sample.timestamp_ns());
    }

    fn add(&mut self, bytes: &[u8], seq: u64, ts: u64) {
        if self.offsets.is_empty() {
            self.offsets.push(0);
        }
        self.data.extend_from_slice(bytes);
        self.offsets.push(self.data.len() as u64);
        self.seq.push(seq);
        self.timestamp_ns.push(ts);
    }

    fn finish(self, py: Python<'_>) -> Batch {
        let bounds: Vec<usize> = self.offsets.iter().map(|&o| o as usize).collect();
        let len = self.seq.len();
        Batch {
            data: self.data.into_pyarray(py).unbind(),
            offsets: self.offsets.into_pyarray(py).unbind(),
            seq: self.seq.into_pyarray(py).unbind(),
            timestamp_ns: self.timestamp_ns.into_pyarray(py).unbind(),
            bounds,
            len,
        }
    }
}

#[pymethods]
impl Batch {
    /// All messages end to end (uint8).
    #[getter]
    fn data(&self, py: Python<'_>) -> Py<PyArray1<u8>> {
        self.data.clone_ref(py)
    }

    /// `len(batch) + 1` offsets into `data` (uint64).
    #[getter]
    fn offsets(&self, py: Python<'_>) -> Py<PyArray1<u64>> {
        self.offsets.clone_ref(py)
    }

    /// Sequence numbers (uint64).
    #[getter]
    fn seq(&self, py: Python<'_>) -> Py<PyArray1<u64>> {
        self.seq.clone_ref(py)
    }

    /// Publish times, nanoseconds on the monotonic clock (uint64).
    #[getter]
    fn timestamp_ns(&self, py: Python<'_>) -> Py<PyArray1<u64>> {
        self.timestamp_ns.clone_ref(py)
    }

    fn __len__(&self) -> usize {
        self.len
    }

    /// Message `index` as bytes (a copy).
    fn __getitem__<'py>(&self, py: Python<'py>, index: isize) -> PyResult<Bound<'py, PyBytes>> {
        let i = if index < 0 { index + self.len as isize } else { index };
        if i < 0 || i as usize >= self.len {
            return Err(PyIndexError::new_err("batch index out of range"));
        }
        let i = i as usize;
        let data = self.data.bind(py).readonly();
        let all = data.as_slice()?;
        Ok(PyBytes::new(py, &all[self.bounds[i]..self.bounds[i + 1]]))
    }

    fn __repr__(&self) -> String {
        format!("<memsock.Batch of {} messages, {} bytes>", self.len, self.bounds.last().copied().unwrap_or(0))
    }
}
