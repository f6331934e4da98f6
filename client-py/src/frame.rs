//! A received frame: its bytes in place in shared memory, exposed through
//! the buffer protocol (read-only), released explicitly, on leaving a
//! `with` block, or when collected.

use std::os::raw::c_int;

use memsock::OwnedSample;
use pyo3::exceptions::PyBufferError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use pyo3::{IntoPyObjectExt, ffi};

use crate::errors;
use crate::subscriber::Subscriber;

/// One received frame. `memoryview(frame)` and `frame.ndarray(...)` are
/// read-only, zero-copy views of its slot that keep the frame alive; the
/// slot goes back to the publisher with `release()`, at the end of a
/// `with frame:` block, or when the frame is garbage collected. Releasing
/// while a view is alive raises `BufferError`, as `memoryview` does.
#[pyclass(module = "memsock")]
pub(crate) struct Frame {
    sample: Option<OwnedSample>,
    /// The subscriber, told at `release` to hand the slot back at once.
    owner: Option<Py<Subscriber>>,
    seq: u64,
    timestamp_ns: u64,
    len: usize,
    exports: usize,
}

impl Frame {
    pub(crate) fn new(sample: OwnedSample) -> Self {
        Self {
            seq: sample.seq(),
            timestamp_ns: sample.timestamp_ns(),
            len: sample.len(),
            sample: Some(sample),
            owner: None,
            exports: 0,
        }
    }

    /// Names the subscriber the frame came from.
    pub(crate) fn owned_by(mut self, owner: Py<Subscriber>) -> Self {
        self.owner = Some(owner);
        self
    }

    /// Calls `f` with the bytes (empty once released), seq and timestamp.
    pub(crate) fn with_bytes<R>(&self, f: impl FnOnce(&[u8], u64, u64) -> R) -> R {
        f(self.sample.as_deref().unwrap_or(&[]), self.seq, self.timestamp_ns)
    }

    fn sample(&self) -> PyResult<&OwnedSample> {
        self.sample.as_ref().ok_or_else(|| errors::Error::new_err("the frame was released"))
    }
}

#[pymethods]
impl Frame {
    /// The stream sequence number; a jump shows frames this subscriber lost.
    #[getter]
    fn seq(&self) -> u64 {
        self.seq
    }

    /// When the frame was sent: nanoseconds on the monotonic clock
    /// (`memsock.now_ns()`), comparable across processes.
    #[getter]
    fn timestamp_ns(&self) -> u64 {
        self.timestamp_ns
    }

    /// Whether the slot was released.
    #[getter]
    fn released(&self) -> bool {
        self.sample.is_none()
    }

    fn __len__(&self) -> usize {
        self.len
    }

    /// A read-only numpy view of the frame: `dtype` (default uint8),
    /// `shape` (default: 1-D, as many items as fit), starting `offset`
    /// bytes in, `count` items (-1: all that fit). The array keeps the
    /// frame alive.
    #[pyo3(signature = (dtype=None, shape=None, offset=0, count=-1))]
    fn ndarray<'py>(
        slf: &Bound<'py, Self>,
        dtype: Option<&Bound<'py, PyAny>>,
        shape: Option<&Bound<'py, PyAny>>,
        offset: usize,
        count: isize,
    ) -> PyResult<Bound<'py, PyAny>> {
        slf.borrow().sample()?;
        numpy_view(slf.as_any(), dtype, shape, offset, count)
    }

    /// The frame's bytes as a new `bytes` object (a copy).
    fn tobytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        pyo3::types::PyBytes::new(py, self.sample()?).into_bound_py_any(py)
    }

    /// Gives the slot back to the publisher. Raises `BufferError` while a
    /// view (memoryview, numpy array) of it is alive. Releasing twice is
    /// harmless.
    fn release(&mut self, py: Python<'_>) -> PyResult<()> {
        if self.exports > 0 {
            return Err(PyBufferError::new_err(format!(
                "cannot release a frame while {} view(s) of it exist: delete them first",
                self.exports
            )));
        }
        if self.sample.take().is_some() {
            // Hand the slot back now if the subscriber is free (if it is
            // busy receiving on another thread, it does so itself).
            if let Some(owner) = self.owner.take() {
                if let Ok(mut sub) = owner.bind(py).try_borrow_mut() {
                    sub.hand_back();
                }
            }
        }
        Ok(())
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// Releases the frame; if the block raised and a view (say, in the
    /// exception's traceback) is still alive, the frame is left to be
    /// released when it is collected rather than mask the exception.
    fn __exit__(
        &mut self,
        py: Python<'_>,
        exc_type: &Bound<'_, PyAny>,
        _exc: &Bound<'_, PyAny>,
        _tb: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        match self.release(py) {
            Err(e) if !exc_type.is_none() && e.is_instance_of::<PyBufferError>(py) => Ok(false),
            other => other.map(|()| false),
        }
    }

    fn __repr__(&self) -> String {
        let state = if self.sample.is_some() { "" } else { " released" };
        format!("<memsock.Frame seq={} len={}{state}>", self.seq, self.len)
    }

    /// # Safety
    /// Called by CPython with a valid `view` to fill.
    unsafe fn __getbuffer__(mut slf: PyRefMut<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        if flags & ffi::PyBUF_WRITABLE == ffi::PyBUF_WRITABLE {
            return Err(PyBufferError::new_err("a received frame is read-only"));
        }
        let (ptr, len) = {
            let bytes: &[u8] = slf.sample()?;
            (bytes.as_ptr(), bytes.len())
        };
        // SAFETY: `view` is CPython's to fill; `ptr`/`len` are the slot's
        // bytes, which stay mapped and unreleased while the export count
        // is non-zero (`release` refuses, and the view holds a reference
        // to this object, so it cannot be collected). Read-only (1).
        let rc = unsafe {
            ffi::PyBuffer_FillInfo(view, slf.as_ptr(), ptr.cast_mut().cast(), len as ffi::Py_ssize_t, 1, flags)
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
}

/// `numpy.frombuffer(obj, dtype, count, offset)`, reshaped to `shape`:
/// a view of `obj`'s buffer that keeps `obj` alive.
pub(crate) fn numpy_view<'py>(
    obj: &Bound<'py, PyAny>,
    dtype: Option<&Bound<'py, PyAny>>,
    shape: Option<&Bound<'py, PyAny>>,
    offset: usize,
    count: isize,
) -> PyResult<Bound<'py, PyAny>> {
    let py = obj.py();
    let np = py.import("numpy")?;
    let kwargs = pyo3::types::PyDict::new(py);
    kwargs.set_item(
        "dtype",
        match dtype {
            Some(d) => d.clone(),
            None => np.getattr("uint8")?,
        },
    )?;
    kwargs.set_item("offset", offset)?;
    kwargs.set_item("count", count)?;
    let array = np.call_method("frombuffer", (obj,), Some(&kwargs))?;
    match shape {
        None => Ok(array),
        Some(shape) => {
            let shape =
                if shape.is_instance_of::<PyTuple>() { shape.clone() } else { PyTuple::new(py, [shape])?.into_any() };
            array.call_method1("reshape", (shape,))
        }
    }
}
