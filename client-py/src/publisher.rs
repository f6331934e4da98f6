//! The publisher: `send` copies anything with the buffer protocol straight
//! into a slot (one copy, contiguous or not).

use std::mem::MaybeUninit;
use std::time::Instant;

use memsock::SendError;
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
}

impl Publisher {
    pub(crate) fn new(inner: memsock::Publisher) -> Self {
        let (stream, took_over) = (inner.stream().to_owned(), inner.took_over());
        Self { inner: SyncWrapper::new(Some(inner)), stream, took_over }
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
            ffi::PyBuffer_ToContiguous(dst.as_mut_ptr().cast(), &self.0, dst.len() as ffi::Py_ssize_t, b'C' as _)
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

    /// Stops publishing (subscribers get `PublisherGone` after the frames
    /// already sent). Also done when the publisher is collected.
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

    fn __repr__(&self) -> String {
        format!("<memsock.Publisher stream={:?}>", self.stream)
    }
}
