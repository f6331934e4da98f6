//! The `memsock` Python package's native part: a thin layer over the Rust
//! client. Frames are handed to Python in place (the buffer protocol over
//! the slot in shared memory); blocking calls release the GIL and wake
//! every 50 ms to let Python handle signals (Ctrl-C).

mod errors;
mod frame;
mod publisher;
mod subscriber;

use std::time::{Duration, Instant};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use memsock::{OverflowPolicy, StatsReport, WaitStrategy};

/// How long a blocking call sleeps without the GIL before it looks for
/// signals: Ctrl-C is answered within this.
pub(crate) const SIGNAL_SLICE: Duration = Duration::from_millis(50);

/// A connection to the memsock broker: the lease under which this process
/// publishes and subscribes. Everything opened through it is reclaimed by
/// the broker when the connection ends (the process exits or is killed).
#[pyclass(module = "memsock", frozen)]
struct Client {
    inner: memsock::Client,
}

/// Connects to the broker at `socket`, or at the default path
/// (`$MEMSOCK_SOCKET`, else `$XDG_RUNTIME_DIR/memsock/broker.sock`, else
/// `/tmp/memsock-<uid>/broker.sock`), under `name` (what stats and
/// `memsock top` show; default: the script's file name). At the default
/// path, a per-user broker is started if none answers (the `memsock`
/// bundled with the package, else `$MEMSOCK_BROKER`, else on PATH; it
/// exits after 60 s without clients), unless `$MEMSOCK_SOCKET` is set or
/// `MEMSOCK_AUTOSTART=0`.
#[pyfunction]
#[pyo3(signature = (socket=None, name=None))]
fn connect(py: Python<'_>, socket: Option<std::path::PathBuf>, name: Option<String>) -> PyResult<Client> {
    let name = match name {
        Some(name) => name,
        None => script_name(py),
    };
    let inner = match socket {
        Some(socket) => py.detach(|| memsock::Client::connect_named(&socket, &name)),
        None => py.detach(|| memsock::Client::connect_default_named(&name)),
    };
    Ok(Client { inner: inner.map_err(errors::client)? })
}

/// Names the `memsock` binary shipped in the package, which autostart
/// prefers (called by the package on import).
#[pyfunction]
fn _set_bundled_broker(path: std::path::PathBuf) {
    memsock::set_bundled_broker(path);
}

/// The running script's file name (`sys.argv[0]`), else "python".
fn script_name(py: Python<'_>) -> String {
    let argv0 = py
        .import("sys")
        .and_then(|sys| sys.getattr("argv"))
        .and_then(|argv| argv.get_item(0))
        .and_then(|a| a.extract::<String>())
        .unwrap_or_default();
    match std::path::Path::new(&argv0).file_name() {
        Some(name) if !name.is_empty() && argv0 != "-c" => name.to_string_lossy().into_owned(),
        _ => "python".into(),
    }
}

pub(crate) fn parse_policy(policy: &str) -> PyResult<OverflowPolicy> {
    match policy {
        "drop_newest" => Ok(OverflowPolicy::DropNewest),
        "keep_latest" => Ok(OverflowPolicy::KeepLatest),
        "lossless" => Ok(OverflowPolicy::Lossless),
        other => Err(errors::InvalidArgument::new_err(format!(
            "unknown policy {other:?}: expected \"drop_newest\", \"keep_latest\" or \"lossless\""
        ))),
    }
}

fn parse_strategy(strategy: &str) -> PyResult<WaitStrategy> {
    match strategy {
        "park" => Ok(WaitStrategy::Park),
        "spin" => Ok(WaitStrategy::Spin),
        "spin_then_park" => Ok(WaitStrategy::default()),
        other => Err(errors::InvalidArgument::new_err(format!(
            "unknown wait strategy {other:?}: expected \"park\", \"spin\" or \"spin_then_park\""
        ))),
    }
}

/// Seconds (`None`: for ever) as a deadline.
pub(crate) fn deadline(timeout: Option<f64>) -> PyResult<Option<Instant>> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_finite() && t >= 0.0 => Ok(Instant::now().checked_add(Duration::from_secs_f64(t.min(1e9)))),
        Some(t) => Err(PyValueError::new_err(format!("timeout must be a non-negative number of seconds, not {t}"))),
    }
}

#[pymethods]
impl Client {
    /// Whether this process is a child forked since the client connected:
    /// the connection is the parent's, and every use of it, or of the
    /// publishers and subscribers opened through it, raises
    /// `memsock.Forked` (call `memsock.connect()` in the child).
    #[getter]
    fn forked(&self) -> bool {
        self.inner.is_forked()
    }

    /// Becomes the publisher of stream `name` with `slots` slots of
    /// `slot_size` bytes, creating it, or taking it over if its publisher
    /// is gone (same geometry). Options: `max_subscribers` (32),
    /// `mlock` (False), `huge_pages` (False), `prefault` (True),
    /// `timestamps` (True: each frame carries its send time; False saves a
    /// clock read per frame and samples report 0), `loans` (how many loans
    /// the publisher may hold at once; 0 picks 2), `history` (the last
    /// frames kept for subscribers that come later, who get them first; 1
    /// keeps the last value; the stream then stays after its publisher is
    /// gone, until closed or, with `history_idle`, that many seconds
    /// without publisher or subscriber).
    #[pyo3(signature = (name, slot_size, slots, *, max_subscribers=None, mlock=false, huge_pages=false, prefault=true, timestamps=true, loans=0, history=0, history_idle=None))]
    #[allow(clippy::too_many_arguments)]
    fn publisher(
        &self,
        py: Python<'_>,
        name: &str,
        slot_size: u32,
        slots: u32,
        max_subscribers: Option<u32>,
        mlock: bool,
        huge_pages: bool,
        prefault: bool,
        timestamps: bool,
        loans: u32,
        history: u32,
        history_idle: Option<f64>,
    ) -> PyResult<publisher::Publisher> {
        let mut config = memsock::StreamConfig::new(slot_size, slots);
        if let Some(m) = max_subscribers {
            config.max_subscribers = m;
        }
        config.mlock = mlock;
        config.huge_pages = huge_pages;
        config.prefault = prefault;
        config.timestamps = timestamps;
        config.publisher_loans = loans;
        config.history = history;
        if let Some(seconds) = history_idle {
            let idle = std::time::Duration::try_from_secs_f64(seconds)
                .map_err(|e| PyValueError::new_err(format!("history_idle={seconds}: {e}")))?;
            // At least a millisecond: 0 would mean "until closed".
            config.history_idle_ms = idle.as_millis().clamp(1, u128::from(u64::MAX)) as u64;
        }
        let inner = py.detach(|| self.inner.publisher(name, &config)).map_err(errors::client)?;
        Ok(publisher::Publisher::new(inner))
    }

    /// Subscribes to stream `name`: at most `credits` frames queued and
    /// held at once; `policy` says what happens beyond ("drop_newest",
    /// "keep_latest", "lossless"). With `wait=True` a stream that does not
    /// exist yet is waited for (Ctrl-C interrupts); with `wait=False` it is
    /// an error (`NoSuchStream`). `strategy` is how receives wait: "park"
    /// (sleep in the kernel), "spin_then_park" or "spin" (a core busy).
    /// `history`: of a stream that keeps its last frames, receive them
    /// first (`frame.history` is True): True all it keeps, an int at most
    /// that many, False none.
    #[pyo3(signature = (name, credits=4, policy="drop_newest", wait=true, *, strategy="spin_then_park", history=None))]
    #[allow(clippy::too_many_arguments)]
    fn subscribe(
        &self,
        py: Python<'_>,
        name: &str,
        credits: u32,
        policy: &str,
        wait: bool,
        strategy: &str,
        history: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<subscriber::Subscriber> {
        let options = memsock::SubscribeOptions {
            credits,
            policy: parse_policy(policy)?,
            wait: parse_strategy(strategy)?,
            wait_for_stream: wait,
            credits_up_to: false,
            history: parse_history(history)?,
        };
        if !wait {
            let inner = py.detach(|| self.inner.subscriber(name, &options)).map_err(errors::client)?;
            return Ok(subscriber::Subscriber::new(inner));
        }
        // The broker answers when the stream appears: wait on a thread of
        // our own so that Ctrl-C is seen meanwhile.
        let (client, name_owned) = (self.inner.clone(), name.to_owned());
        let (tx, mut rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("memsock-subscribe".into())
            .spawn(move || {
                let _ = tx.send(client.subscriber(&name_owned, &options));
            })
            .map_err(|e| errors::Error::new_err(format!("cannot start a thread: {e}")))?;
        loop {
            let rx_now = &mut rx;
            match py.detach(move || rx_now.recv_timeout(SIGNAL_SLICE)) {
                Ok(result) => return result.map(subscriber::Subscriber::new).map_err(errors::client),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => py.check_signals()?,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(errors::Error::new_err("the subscribe request was lost"));
                }
            }
        }
    }

    /// Closes stream `name` for good: its publisher's next send fails and
    /// its subscribers get `StreamClosed` after the frames already sent.
    /// (A stream nobody publishes or subscribes to is gone already:
    /// `NoSuchStream`.) Its publisher may close it, and so may a client
    /// running as the broker's user; once it has no publisher, a client
    /// running as the user who created it too; anyone else gets
    /// `NotPermitted`.
    fn close_stream(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        py.detach(|| self.inner.close_stream(name)).map_err(errors::client)
    }

    /// Live counters of every stream (or of stream `name`), read by the
    /// broker from shared memory, as plain dicts.
    #[pyo3(signature = (name=None))]
    fn stats<'py>(&self, py: Python<'py>, name: Option<&str>) -> PyResult<Bound<'py, PyDict>> {
        let report = py.detach(|| self.inner.stats(name)).map_err(errors::client)?;
        stats_dict(py, &report)
    }

    /// The broker's process id.
    #[getter]
    fn broker_pid(&self) -> u32 {
        self.inner.broker_pid()
    }

    /// Whether the broker has closed the connection.
    #[getter]
    fn disconnected(&self) -> bool {
        self.inner.is_disconnected()
    }

    /// `None` while the broker is there; once it is gone (shut down,
    /// crashed), a `memsock.BrokerGone` saying why. Publishers and
    /// subscribers go on meanwhile, but nothing new can be asked of the
    /// broker, and a new one knows none of these streams.
    #[getter]
    fn broker_gone(&self) -> Option<BrokerGone> {
        BrokerGone::of(self.inner.broker_gone())
    }

    fn __repr__(&self) -> String {
        format!("<memsock.Client broker_pid={}>", self.inner.broker_pid())
    }
}

/// News that the broker is gone, as a client, publisher or subscriber's
/// `broker_gone` gives it: `reason` says how it went.
#[pyclass(module = "memsock", frozen)]
pub(crate) struct BrokerGone {
    #[pyo3(get)]
    reason: String,
}

impl BrokerGone {
    pub(crate) fn of(gone: Option<memsock::Disconnect>) -> Option<Self> {
        gone.map(|reason| Self { reason: reason.to_string() })
    }
}

#[pymethods]
impl BrokerGone {
    fn __repr__(&self) -> String {
        format!("<memsock.BrokerGone: {}>", self.reason)
    }
}

/// The stats as plain dicts: their one serde representation (the same as
/// `memsock stats --json`), through `json.loads`.
/// `history=`: None or True takes all, False none, an int at most that many.
fn parse_history(history: Option<&Bound<'_, PyAny>>) -> PyResult<u32> {
    let Some(history) = history else { return Ok(u32::MAX) };
    if let Ok(all) = history.cast::<pyo3::types::PyBool>() {
        return Ok(if all.is_true() { u32::MAX } else { 0 });
    }
    history
        .extract::<u32>()
        .map_err(|_| PyValueError::new_err(format!("history={history}: True, False or a number of frames (0 or more)")))
}

fn stats_dict<'py>(py: Python<'py>, report: &StatsReport) -> PyResult<Bound<'py, PyDict>> {
    let text = serde_json::to_string(report).map_err(|e| errors::Error::new_err(format!("encoding stats: {e}")))?;
    Ok(py.import("json")?.call_method1("loads", (text,))?.cast_into::<PyDict>()?)
}

/// Nanoseconds on the monotonic clock: the clock of `Frame.timestamp_ns`.
#[pyfunction]
fn now_ns() -> u64 {
    memsock::now_ns()
}

#[pymodule]
fn _memsock(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(connect, m)?)?;
    m.add_function(wrap_pyfunction!(_set_bundled_broker, m)?)?;
    m.add_function(wrap_pyfunction!(now_ns, m)?)?;
    m.add_class::<Client>()?;
    m.add_class::<BrokerGone>()?;
    m.add_class::<publisher::Publisher>()?;
    m.add_class::<publisher::Loan>()?;
    m.add_class::<subscriber::Subscriber>()?;
    m.add_class::<subscriber::Position>()?;
    m.add_class::<subscriber::Watcher>()?;
    m.add_class::<subscriber::Batch>()?;
    m.add_class::<frame::Frame>()?;
    errors::register(m)?;
    Ok(())
}
