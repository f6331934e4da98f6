//! A received frame: its bytes in place in shared memory, exposed through
//! the buffer protocol (read-only), released explicitly, on leaving a
//! `with` block, or when collected.

use std::os::raw::c_int;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use memsock::OwnedSample;
use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use pyo3::{IntoPyObjectExt, ffi};

use crate::errors;
use crate::subscriber::Subscriber;

/// One received frame. `memoryview(frame)` and `frame.ndarray(...)` are
/// read-only, zero-copy views of its slot that keep the frame alive; the
/// slot goes back to the publisher with `release()`, at the end of a
/// `with frame:` block, or when the frame is garbage collected. A `with`
/// block that ends while views are alive leaves the release to the end of
/// the last view (the subscriber counts such frames in `held_by_views`);
/// an explicit `release()` then raises `BufferError`, as `memoryview` does.
#[pyclass(module = "memsock")]
pub(crate) struct Frame {
    sample: Option<OwnedSample>,
    /// The subscriber, told at `release` to hand the slot back at once.
    owner: Option<Py<Subscriber>>,
    /// The subscriber's count of frames waiting for their views to end.
    held_by_views: Option<Arc<AtomicU32>>,
    /// Released when the last view ends (its `with` block is over).
    release_when_unviewed: bool,
    seq: u64,
    timestamp_ns: u64,
    history: bool,
    len: usize,
    exports: usize,
}

impl Frame {
    pub(crate) fn new(sample: OwnedSample) -> Self {
        Self {
            seq: sample.seq(),
            timestamp_ns: sample.timestamp_ns(),
            history: sample.is_history(),
            len: sample.len(),
            sample: Some(sample),
            owner: None,
            held_by_views: None,
            release_when_unviewed: false,
            exports: 0,
        }
    }

    /// Names the subscriber the frame came from.
    pub(crate) fn owned_by(mut self, owner: &Bound<'_, Subscriber>) -> Self {
        self.held_by_views = Some(owner.borrow().views_counter());
        self.owner = Some(owner.clone().unbind());
        self
    }

    /// Leaves the release to the end of the last view.
    fn defer_release(&mut self) {
        if !self.release_when_unviewed {
            self.release_when_unviewed = true;
            if let Some(count) = &self.held_by_views {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// No longer waiting for views to end.
    fn undefer_release(&mut self) {
        if std::mem::take(&mut self.release_when_unviewed) {
            if let Some(count) = &self.held_by_views {
                count.fetch_sub(1, Ordering::Relaxed);
            }
        }
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

    /// Whether the frame comes from the stream's history: sent before this
    /// subscriber came, received first (see `publisher(history=...)`).
    #[getter]
    fn history(&self) -> bool {
        self.history
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
        self.undefer_release();
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

    /// Releases the frame, or, while views of it are alive (numpy arrays
    /// still bound to names, say), leaves that to the end of the last one:
    /// the views are read-only, so nothing they do can change the frame.
    fn __exit__(
        &mut self,
        py: Python<'_>,
        _exc_type: &Bound<'_, PyAny>,
        _exc: &Bound<'_, PyAny>,
        _tb: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        if self.exports > 0 {
            self.defer_release();
            return Ok(false);
        }
        self.release(py).map(|()| false)
    }

    fn __repr__(&self) -> String {
        let state = match (&self.sample, self.release_when_unviewed) {
            (None, _) => " released",
            (Some(_), true) => " released when its views end",
            (Some(_), false) => "",
        };
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
        if slf.exports == 0 && slf.release_when_unviewed {
            let py = slf.py();
            // Cannot fail: no view is left.
            let _ = slf.release(py);
        }
    }
}

impl Drop for Frame {
    fn drop(&mut self) {
        self.undefer_release();
    }
}

/// `numpy.frombuffer(obj, dtype, count, offset)`, reshaped to `shape`:
/// a view of `obj`'s buffer that keeps `obj` alive. Without `count`, the
/// count follows from `shape` (only those bytes must fit), else it is as
/// many items as fit (a partial item at the end is left out).
pub(crate) fn numpy_view<'py>(
    obj: &Bound<'py, PyAny>,
    dtype: Option<&Bound<'py, PyAny>>,
    shape: Option<&Bound<'py, PyAny>>,
    offset: usize,
    count: isize,
) -> PyResult<Bound<'py, PyAny>> {
    let py = obj.py();
    let np = py.import("numpy")?;
    let dtype = np.call_method1("dtype", (dtype.map_or_else(|| np.getattr("uint8"), |d| Ok(d.clone()))?,))?;
    let len = obj.len()?;
    let Some(available) = len.checked_sub(offset) else {
        return Err(PyValueError::new_err(format!("offset {offset} is past the end of the {len}-byte buffer")));
    };
    let shape = match shape {
        None => None,
        Some(s) if s.is_instance_of::<PyTuple>() => Some(s.extract::<Vec<isize>>()?),
        Some(s) => Some(vec![s.extract::<isize>()?]),
    };
    let itemsize: usize = dtype.getattr("itemsize")?.extract()?;
    let count = match (&shape, count) {
        (_, c) if c >= 0 => c,
        (Some(dims), _) if dims.iter().all(|&d| d >= 0) => dims.iter().product(),
        _ if itemsize > 0 => (available / itemsize) as isize,
        _ => -1,
    };
    let kwargs = pyo3::types::PyDict::new(py);
    kwargs.set_item("dtype", dtype)?;
    kwargs.set_item("offset", offset)?;
    kwargs.set_item("count", count)?;
    let array = np.call_method("frombuffer", (obj,), Some(&kwargs))?;
    match shape {
        None => Ok(array),
        Some(dims) => array.call_method1("reshape", (PyTuple::new(py, dims)?,)),
    }
}
