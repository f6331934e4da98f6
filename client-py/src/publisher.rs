//! The publisher: `send` copies anything with the buffer protocol straight
//! into a slot (one copy, contiguous or not).

use std::mem::MaybeUninit;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use std::os::raw::c_int;

use memsock::shm::SampleMut;
use memsock::{LoanError, SendError};
use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use sync_wrapper::SyncWrapper;

use crate::{SIGNAL_SLICE, deadline, errors};

/// The publisher of a stream. `send(obj)` for bytes, bytearray,
/// memoryview, numpy arrays (any layout) and anything else with the
/// buffer protocol.
#[pyclass(module = "memsock")]
pub(crate) struct Publisher {
    // Reached only through `&mut self` (see `Subscriber`).
    inner: SyncWrapper<Option<memsock::Publisher>>,
    stream: String,
    took_over: bool,
    /// Loans handed out and not yet sent or discarded: their slots are
    /// mapped through `inner`, which must stay open meanwhile. Shared with
    /// the loans, which count themselves out even when collected while the
    /// publisher is busy on another thread.
    loans_out: Arc<AtomicUsize>,
}

/// Sends `sample`, waiting for room up to `deadline` in slices that let
/// Python look for signals.
fn send_sample(py: Python<'_>, mut sample: SampleMut<'_>, deadline: Option<Instant>) -> PyResult<u64> {
    loop {
        let slice = match deadline {
            None => SIGNAL_SLICE,
            Some(d) => d.saturating_duration_since(Instant::now()).min(SIGNAL_SLICE),
        };
        let result = if slice.is_zero() {
            sample.try_send()
        } else {
            let sample_now = sample;
            py.detach(move || sample_now.try_send_timeout(slice))
        };
        match result {
            Ok(info) => return Ok(info.seq),
            Err(unsent) if matches!(unsent.error, SendError::Timeout | SendError::WouldBlock { .. }) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(errors::send(unsent.error));
                }
                sample = unsent.sample;
                py.check_signals()?;
            }
            Err(unsent) => return Err(errors::send(unsent.error)),
        }
    }
}

impl Publisher {
    pub(crate) fn new(inner: memsock::Publisher) -> Self {
        let (stream, took_over) = (inner.stream().to_owned(), inner.took_over());
        Self { inner: SyncWrapper::new(Some(inner)), stream, took_over, loans_out: Arc::default() }
    }

    fn publisher(&mut self) -> PyResult<&mut memsock::Publisher> {
        self.inner.get_mut().as_mut().ok_or_else(|| errors::Error::new_err("the publisher is closed"))
    }
}

/// A buffer exported by a Python object, released on drop.
struct Exported(ffi::Py_buffer);

impl Exported {
    fn get(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        let mut view = MaybeUninit::<ffi::Py_buffer>::uninit();
        // SAFETY: `obj` is a live object (we hold the GIL); on success
        // CPython fills `view`, which we release exactly once in `drop`.
        // FULL_RO accepts any layout, read-only.
        let rc = unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), view.as_mut_ptr(), ffi::PyBUF_FULL_RO) };
        if rc == -1 {
            return Err(PyErr::fetch(obj.py()));
        }
        // SAFETY: initialised by the successful call above.
        Ok(Self(unsafe { view.assume_init() }))
    }

    fn len(&self) -> usize {
        self.0.len as usize
    }

    /// Copies the buffer, in C order, into `dst` (exactly `len()` bytes).
    fn copy_to(&mut self, py: Python<'_>, dst: &mut [u8]) -> PyResult<()> {
        debug_assert_eq!(dst.len(), self.len());
        // SAFETY: `self.0` is a valid exported buffer.
        let contiguous = unsafe { ffi::PyBuffer_IsContiguous(&self.0, b'C' as std::os::raw::c_char) } != 0;
        if contiguous {
            // SAFETY: a C-contiguous buffer is `len` readable bytes at
            // `buf`; `dst` is `len` writable bytes of our slot; they cannot
            // overlap (the slot is ours alone until sent).
            unsafe { std::ptr::copy_nonoverlapping(self.0.buf.cast::<u8>(), dst.as_mut_ptr(), dst.len()) };
            return Ok(());
        }
        // SAFETY: as above; CPython walks the strides and writes exactly
        // `len` bytes into `dst`.
        let rc = unsafe {
            ffi::PyBuffer_ToContiguous(
                dst.as_mut_ptr().cast(),
                &raw mut self.0,
                dst.len() as ffi::Py_ssize_t,
                b'C' as _,
            )
        };
        if rc == -1 { Err(PyErr::fetch(py)) } else { Ok(()) }
    }
}

impl Drop for Exported {
    fn drop(&mut self) {
        // SAFETY: exported by `get`, released once. Dropped with the GIL
        // held (an `Exported` never leaves the call that made it).
        unsafe { ffi::PyBuffer_Release(&mut self.0) };
    }
}

#[pymethods]
impl Publisher {
    /// Sends the bytes of `obj` as one frame (one copy, straight into a
    /// slot); returns the frame's sequence number. If a lossless
    /// subscriber has no room it waits up to `timeout` seconds (None: for
    /// ever; 0: raise `WouldBlock` at once), without the GIL.
    #[pyo3(signature = (obj, timeout=None))]
    fn send(&mut self, py: Python<'_>, obj: &Bound<'_, PyAny>, timeout: Option<f64>) -> PyResult<u64> {
        let deadline = deadline(timeout)?;
        let mut buffer = Exported::get(obj)?;
        let len = buffer.len();
        let publisher = self.publisher()?;
        if len > publisher.slot_size() {
            return Err(errors::send(SendError::TooLarge { len, slot_size: publisher.slot_size() }));
        }
        let mut sample = publisher.loan().map_err(errors::loan)?;
        buffer.copy_to(py, &mut sample.as_mut_slice()[..len])?;
        drop(buffer);
        sample.set_len(len);
        send_sample(py, sample, deadline)
    }

    /// Loans a slot for a frame of `nbytes`, to be written in place:
    /// `with pub.loan(n) as buf:` then `buf.ndarray(dtype, shape)` or
    /// `memoryview(buf)` (writable, zero-copy). Sent when the block ends
    /// normally, discarded if it raises. Views must be deleted before the
    /// block ends (`BufferError` otherwise, and the frame is discarded): a
    /// view written after the send would change a frame others read.
    ///
    /// ```python
    /// with pub.loan(img.nbytes) as buf:
    ///     a = buf.ndarray(np.uint16, img.shape)
    ///     a[:] = img
    ///     del a  # before the block ends
    /// ```
    fn loan(slf: &Bound<'_, Self>, nbytes: usize) -> PyResult<Loan> {
        let mut this = slf.borrow_mut();
        let publisher = this.publisher()?;
        let slot_size = publisher.slot_size();
        if nbytes > slot_size {
            return Err(errors::send(SendError::TooLarge { len: nbytes, slot_size }));
        }
        let mut sample = publisher.loan().map_err(errors::loan)?;
        sample.set_len(nbytes);
        let addr = sample.as_mut_ptr() as usize;
        let loan = sample.detach();
        this.loans_out.fetch_add(1, Ordering::Relaxed);
        let out = this.loans_out.clone();
        Ok(Loan { loan: Some(loan), owner: slf.clone().unbind(), out, addr, nbytes, exports: 0 })
    }

    /// Bytes per slot: the largest frame.
    #[getter]
    fn slot_size(&mut self) -> PyResult<usize> {
        Ok(self.publisher()?.slot_size())
    }

    /// The sequence number the next frame gets.
    #[getter]
    fn next_seq(&mut self) -> PyResult<u64> {
        Ok(self.publisher()?.next_seq())
    }

    /// The stream's name.
    #[getter]
    fn stream(&self) -> &str {
        &self.stream
    }

    /// Whether this publisher took the stream over from a previous one.
    #[getter]
    fn took_over(&self) -> bool {
        self.took_over
    }

    /// `None` while the broker is there, else a `memsock.BrokerGone`
    /// (`Client.broker_gone`): sending goes on meanwhile.
    #[getter]
    fn broker_gone(&mut self) -> PyResult<Option<crate::BrokerGone>> {
        Ok(crate::BrokerGone::of(self.publisher()?.broker_gone()))
    }

    /// Stops publishing (subscribers get `PublisherGone` after the frames
    /// already sent). Also done when the publisher is collected.
    fn close(&mut self) -> PyResult<()> {
        let out = self.loans_out.load(Ordering::Relaxed);
        if out > 0 {
            return Err(errors::Error::new_err(format!(
                "{out} loan(s) of this publisher are still open: send or discard them first"
            )));
        }
        *self.inner.get_mut() = None;
        Ok(())
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __exit__(&mut self, _t: &Bound<'_, PyAny>, _e: &Bound<'_, PyAny>, _tb: &Bound<'_, PyAny>) -> PyResult<bool> {
        self.close()?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!("<memsock.Publisher stream={:?}>", self.stream)
    }
}

/// A loaned slot being written in place (`Publisher.loan`). A writable
/// buffer of `len(loan)` bytes; `send()` or leaving its `with` block sends
/// it, `discard()` or an exception in the block drops it.
#[pyclass(module = "memsock")]
pub(crate) struct Loan {
    loan: Option<memsock::shm::Loan>,
    owner: Py<Publisher>,
    /// The publisher's count of loans out.
    out: Arc<AtomicUsize>,
    /// The slot's address in the publisher's mapping, which stays open
    /// while the loan is out (`Publisher.close` refuses).
    addr: usize,
    nbytes: usize,
    exports: usize,
}

impl Loan {
    /// `memsock.Forked` in a child forked since the loan was made: its
    /// slot is the parent's.
    fn check_fork(&self) -> PyResult<()> {
        match &self.loan {
            Some(loan) if loan.is_forked() => Err(errors::loan(LoanError::Forked)),
            _ => Ok(()),
        }
    }

    /// Resumes the loan on its publisher and hands the sample to `f`.
    fn finish<R>(&mut self, py: Python<'_>, f: impl FnOnce(Python<'_>, SampleMut<'_>) -> PyResult<R>) -> PyResult<R> {
        self.check_fork()?;
        if self.exports > 0 {
            // Neither sent nor reused while someone can still write it:
            // the slot stays loaned until the views and the loan are gone.
            return Err(PyBufferError::new_err(format!(
                "{} view(s) of the loan are still alive: delete them first (the frame was not sent)",
                self.exports
            )));
        }
        let loan = self.loan.take().ok_or_else(|| errors::Error::new_err("the loan was already sent or discarded"))?;
        // Out from here on: should the publisher be busy, the loan is
        // dropped below, and the publisher takes its slot back itself.
        self.out.fetch_sub(1, Ordering::Relaxed);
        let owner = self.owner.bind(py);
        let mut publisher =
            owner.try_borrow_mut().map_err(|_| errors::Error::new_err("the publisher is busy on another thread"))?;
        let sample = match publisher.publisher()?.resume(loan) {
            Ok(sample) => sample,
            Err(_) => return Err(errors::Error::new_err("the loan belongs to another publisher")),
        };
        f(py, sample)
    }
}

#[pymethods]
impl Loan {
    /// A writable numpy view of the loaned bytes (`dtype` default uint8;
    /// `shape` default 1-D; `offset` bytes in; `count` items, -1: all).
    /// Delete it before the loan is sent.
    #[pyo3(signature = (dtype=None, shape=None, offset=0, count=-1))]
    fn ndarray<'py>(
        slf: &Bound<'py, Self>,
        dtype: Option<&Bound<'py, PyAny>>,
        shape: Option<&Bound<'py, PyAny>>,
        offset: usize,
        count: isize,
    ) -> PyResult<Bound<'py, PyAny>> {
        if slf.borrow().loan.is_none() {
            return Err(errors::Error::new_err("the loan was already sent or discarded"));
        }
        crate::frame::numpy_view(slf.as_any(), dtype, shape, offset, count)
    }

    fn __len__(&self) -> usize {
        self.nbytes
    }

    /// Sends the frame (waiting up to `timeout` for a full lossless
    /// subscriber, like `Publisher.send`); returns its sequence number.
    #[pyo3(signature = (timeout=None))]
    fn send(&mut self, py: Python<'_>, timeout: Option<f64>) -> PyResult<u64> {
        let deadline = deadline(timeout)?;
        self.finish(py, |py, sample| send_sample(py, sample, deadline))
    }

    /// Drops the frame unsent (the slot is reused at once). Harmless twice.
    fn discard(&mut self, py: Python<'_>) -> PyResult<()> {
        if self.loan.is_none() {
            return Ok(());
        }
        self.finish(py, |_, sample| {
            drop(sample);
            Ok(())
        })
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __exit__(
        &mut self,
        py: Python<'_>,
        exc_type: &Bound<'_, PyAny>,
        _e: &Bound<'_, PyAny>,
        _tb: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        if exc_type.is_none() {
            self.send(py, None)?;
        } else if let Err(e) = self.discard(py) {
            // A view is still alive (say, in the traceback): the slot goes
            // back when it and the loan are collected. Do not mask the
            // exception in flight.
            if !e.is_instance_of::<PyBufferError>(py) {
                return Err(e);
            }
        }
        Ok(false)
    }

    /// # Safety
    /// Called by CPython with a valid `view` to fill.
    unsafe fn __getbuffer__(mut slf: PyRefMut<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        if slf.loan.is_none() {
            return Err(PyBufferError::new_err("the loan was already sent or discarded"));
        }
        slf.check_fork()?;
        // SAFETY: `view` is CPython's to fill; `addr` is the loaned slot,
        // at least `nbytes` long (checked against the slot size), mapped
        // while the loan is out (the publisher refuses to close) and
        // written by nobody else until it is sent, which `finish` refuses
        // while views exist. Writable (0).
        let rc = unsafe {
            ffi::PyBuffer_FillInfo(view, slf.as_ptr(), slf.addr as *mut _, slf.nbytes as ffi::Py_ssize_t, 0, flags)
        };
        if rc == -1 {
            return Err(PyErr::fetch(slf.py()));
        }
        slf.exports += 1;
        Ok(())
    }

    /// # Safety
    /// Called by CPython once per successful `__getbuffer__`.
    unsafe fn __releasebuffer__(mut slf: PyRefMut<'_, Self>, _view: *mut ffi::Py_buffer) {
        slf.exports = slf.exports.saturating_sub(1);
    }

    fn __repr__(&self) -> String {
        let state = if self.loan.is_some() { "" } else { " done" };
        format!("<memsock.Loan {} bytes{state}>", self.nbytes)
    }
}

impl Drop for Loan {
    fn drop(&mut self) {
        if self.loan.is_some() {
            // Collected unsent: give the slot back if the publisher is free.
            // (No view is left: each keeps the loan alive.)
            Python::attach(|py| {
                let _ = self.discard(py);
            });
        }
    }
}
