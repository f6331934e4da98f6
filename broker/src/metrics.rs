//! The metrics exporter (`memsock metrics`, and `memsock stats --format
//! prometheus|openmetrics`): one stats report turned into metrics at each
//! scrape, served over HTTP.
//!
//! The broker opens no TCP port (its systemd unit allows only Unix
//! sockets): the exporter is a process of its own, a client asking for
//! stats at each scrape. Labels stay bounded: a stream's name, and a
//! subscriber's place in its stream (`index`, below the stream's
//! `max_subscribers`), client name and policy — no pid unless asked for.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use memsock::control::{LATENCY_REPORT_BUCKETS, latency_report_bucket_end_ns};
use memsock::{Client, LatencyReport, StatsReport, StreamReport, SubscriberReport};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// A text format scrapers read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4 (node_exporter's textfile collector,
    /// `promtool check metrics`).
    Prometheus,
    /// OpenMetrics 1.0 text.
    Openmetrics,
}

impl Format {
    /// The HTTP content type.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Self::Openmetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// What a scraper asked for in its `Accept` header: OpenMetrics if it
    /// takes it, else the Prometheus text format.
    pub fn negotiate(accept: Option<&str>) -> Self {
        if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
            Self::Openmetrics
        } else {
            Self::Prometheus
        }
    }
}

/// What goes into the labels.
#[derive(Debug, Clone, Copy, Default)]
pub struct LabelOptions {
    /// Add each publisher's and subscriber's pid (one series per process
    /// over time: unbounded).
    pub pids: bool,
}

/// A stats report (or its absence: the broker did not answer) as metrics.
#[derive(Debug)]
struct StatsCollector {
    report: Option<StatsReport>,
    labels: LabelOptions,
}

type Labels = Vec<(&'static str, String)>;

/// A metric read off a report: its name, help, and value.
type Field<T> = (&'static str, &'static str, fn(&T) -> u64);

/// One metric family: its name, help and type, and a value per label set.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    series: impl IntoIterator<Item = (Labels, M)>,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in series {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter(v: u64) -> ConstCounter<u64> {
    ConstCounter::new(v)
}

fn gauge<N>(v: N) -> ConstGauge<N> {
    ConstGauge::new(v)
}

impl Collector for StatsCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let none = Labels::new;
        family(
            &mut e,
            "memsock_build_info",
            "The memsock command line that exports these metrics",
            MetricType::Gauge,
            [(vec![("version", env!("CARGO_PKG_VERSION").to_owned())], gauge(1i64))],
        )?;
        let up = i64::from(self.report.is_some());
        family(
            &mut e,
            "memsock_broker_up",
            "1 if the broker answered this scrape",
            MetricType::Gauge,
            [(none(), gauge(up))],
        )?;
        let Some(r) = &self.report else { return Ok(()) };
        let seconds = |ns: u64| ns as f64 / 1e9;
        let broker = [
            ("memsock_broker_uptime_seconds", "How long the broker has run", seconds(r.uptime_ns)),
            ("memsock_clients", "Connected clients", f64::from(r.clients)),
            ("memsock_waiting_subscribers", "Subscribers waiting for a stream", f64::from(r.waiting_subscribers)),
            ("memsock_descriptors", "Descriptors the broker has open", r.descriptors as f64),
            ("memsock_descriptor_limit", "The most descriptors the broker may open", r.descriptor_limit as f64),
        ];
        for (name, help, value) in broker {
            family(&mut e, name, help, MetricType::Gauge, [(none(), gauge(value))])?;
        }

        let stream_labels = |s: &StreamReport| {
            let mut l: Labels = vec![("stream", s.name.clone())];
            if self.labels.pids {
                l.push(("pid", s.publisher_pid.map(|p| p.to_string()).unwrap_or_default()));
            }
            l
        };
        let streams = &r.streams;
        let per_stream =
            |f: fn(&StreamReport) -> u64| streams.iter().map(|s| (stream_labels(s), f(s))).collect::<Vec<_>>();
        let stream_counters: [Field<StreamReport>; 2] = [
            ("memsock_stream_frames_published", "Frames published", |s| s.published),
            ("memsock_stream_bytes_published", "Payload bytes published", |s| s.bytes),
        ];
        for (name, help, f) in stream_counters {
            family(&mut e, name, help, MetricType::Counter, per_stream(f).into_iter().map(|(l, v)| (l, counter(v))))?;
        }
        let stream_gauges: [Field<StreamReport>; 5] = [
            ("memsock_stream_slots", "Slots in the stream's pool", |s| u64::from(s.slot_count)),
            ("memsock_stream_slots_free", "Slots no subscriber holds", |s| u64::from(s.free_slots)),
            ("memsock_stream_slot_bytes", "Bytes per slot", |s| u64::from(s.slot_size)),
            ("memsock_stream_publisher_attached", "1 if a publisher is attached", |s| {
                u64::from(s.publisher_pid.is_some())
            }),
            ("memsock_stream_subscribers", "Subscribers attached", |s| s.subscribers.len() as u64),
        ];
        for (name, help, f) in stream_gauges {
            family(&mut e, name, help, MetricType::Gauge, per_stream(f).into_iter().map(|(l, v)| (l, gauge(v))))?;
        }
        let idle = streams.iter().filter_map(|s| Some((stream_labels(s), gauge(seconds(s.idle_ns?)))));
        family(&mut e, "memsock_stream_idle_seconds", "Time since the stream's last frame", MetricType::Gauge, idle)?;

        let subscribers: Vec<(Labels, &SubscriberReport)> = streams
            .iter()
            .flat_map(|s| {
                s.subscribers.iter().map(move |u| {
                    let mut l: Labels = vec![
                        ("stream", s.name.clone()),
                        ("index", u.index.to_string()),
                        ("client", u.client_name.clone()),
                        ("policy", policy(u.policy)),
                    ];
                    if self.labels.pids {
                        l.push(("pid", u.pid.to_string()));
                    }
                    (l, u)
                })
            })
            .collect();
        let each =
            |f: fn(&SubscriberReport) -> u64| subscribers.iter().map(|(l, u)| (l.clone(), f(u))).collect::<Vec<_>>();
        let sub_counters: [Field<SubscriberReport>; 2] = [
            ("memsock_subscriber_frames_delivered", "Frames the subscriber took", |u| u.delivered),
            ("memsock_subscriber_faults", "Protocol violations seen from the subscriber", |u| u.faults),
        ];
        for (name, help, f) in sub_counters {
            family(&mut e, name, help, MetricType::Counter, each(f).into_iter().map(|(l, v)| (l, counter(v))))?;
        }
        let dropped = subscribers.iter().flat_map(|(l, u)| {
            let by = |cause: &str, n: u64| {
                let mut l = l.clone();
                l.push(("cause", cause.to_owned()));
                (l, counter(n))
            };
            [by("no_credit", u.dropped.saturating_sub(u.evicted)), by("evicted", u.evicted)]
        });
        family(
            &mut e,
            "memsock_subscriber_frames_dropped",
            "Frames the subscriber lost: published while it had no credit, or evicted from its queue by newer ones",
            MetricType::Counter,
            dropped,
        )?;
        let sub_gauges: [Field<SubscriberReport>; 2] = [
            ("memsock_subscriber_queued", "Frames in the subscriber's queue", |u| u.queued),
            ("memsock_subscriber_credits", "The subscriber's credits", |u| u64::from(u.credits)),
        ];
        for (name, help, f) in sub_gauges {
            family(&mut e, name, help, MetricType::Gauge, each(f).into_iter().map(|(l, v)| (l, gauge(v))))?;
        }
        let lag = subscribers.iter().map(|(l, u)| (l.clone(), gauge(seconds(u.lag_ns))));
        family(&mut e, "memsock_subscriber_lag_seconds", "Age of the oldest queued frame", MetricType::Gauge, lag)?;
        let mut metric = e.encode_descriptor(
            "memsock_subscriber_latency_seconds",
            "Publish-to-receive latency of a sample of the subscriber's frames (the first after each millisecond, \
             else one in 64)",
            None,
            MetricType::Histogram,
        )?;
        for (labels, u) in &subscribers {
            let Some(latency) = &u.latency else { continue };
            let (sum, count, buckets) = histogram(latency);
            metric.encode_family(labels)?.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        Ok(())
    }
}

/// A latency report as a Prometheus histogram: its sum in seconds, its
/// count, and the samples of each report bucket (one per two doublings
/// from 128 ns: 16, and +Inf; the encoder makes them cumulative, so each
/// is clamped to what the total can still take — a hostile subscriber's
/// counts must not overflow it).
fn histogram(latency: &LatencyReport) -> (f64, u64, Vec<(f64, u64)>) {
    let mut per_bucket = [0u64; LATENCY_REPORT_BUCKETS];
    for &(k, c) in &latency.buckets {
        if let Some(slot) = per_bucket.get_mut(usize::from(k)) {
            *slot = slot.saturating_add(c);
        }
    }
    let mut total = 0u64;
    let buckets = per_bucket
        .iter()
        .enumerate()
        .map(|(k, &c)| {
            let c = c.min(u64::MAX - total);
            total += c;
            let end = latency_report_bucket_end_ns(k);
            (if end == u64::MAX { f64::INFINITY } else { end as f64 / 1e9 }, c)
        })
        .collect();
    (latency.sum_ns as f64 / 1e9, total, buckets)
}

/// Why the exporter stopped, or metrics could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// The text encoder failed.
    #[error("encoding metrics")]
    Encode(#[from] std::fmt::Error),
    /// The address could not be listened on.
    #[error("listening on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The listener or the signal handlers failed.
    #[error("serving metrics")]
    Io(#[from] std::io::Error),
}

/// The name of `policy` as serde spells it (`lossless`, `keep_latest`,
/// `drop_newest`).
pub fn policy(policy: memsock::OverflowPolicy) -> String {
    serde_json::to_value(policy).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

/// `report` (`None`: the broker did not answer) in `format`.
///
/// # Errors
/// [`MetricsError::Encode`] if the text encoder fails.
pub fn encode(report: Option<StatsReport>, format: Format, labels: LabelOptions) -> Result<String, MetricsError> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(StatsCollector { report, labels }));
    let mut out = String::new();
    match format {
        Format::Prometheus => prometheus_client::encoding::prometheus_text::encode(&mut out, &registry),
        Format::Openmetrics => prometheus_client::encoding::text::encode(&mut out, &registry),
    }?;
    Ok(out)
}

/// The exporter's state: a connection to the broker while it answers.
#[derive(Debug)]
pub struct Exporter {
    socket: PathBuf,
    client: Mutex<Option<Client>>,
    labels: LabelOptions,
}

impl Exporter {
    /// An exporter of the broker at `socket`'s stats.
    pub fn new(socket: &Path, labels: LabelOptions) -> Self {
        Self { socket: socket.to_owned(), client: Mutex::new(None), labels }
    }

    /// One scrape: the broker's stats now, or `None` (and a new
    /// connection at the next scrape) if it does not answer.
    fn report(&self) -> Option<StatsReport> {
        let mut client = self.client.lock().unwrap_or_else(PoisonError::into_inner);
        if client.is_none() {
            *client = Client::connect_named(&self.socket, "memsock-metrics")
                .inspect_err(|e| tracing::warn!("broker at {}: {e}", self.socket.display()))
                .ok();
        }
        let report = client.as_ref()?.stats(None);
        report.inspect_err(|e| tracing::warn!("stats: {e}")).map_err(|_| client.take()).ok()
    }
}

/// Serves `/metrics` on `listen` until SIGINT or SIGTERM, on a runtime of
/// its own (one thread); `bound` is told the address listened on (port 0
/// picks a free one).
///
/// # Errors
/// [`MetricsError`] if the address cannot be listened on, or accepting fails.
pub fn serve(exporter: Exporter, listen: SocketAddr, bound: impl FnOnce(SocketAddr)) -> Result<(), MetricsError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(serve_on(Arc::new(exporter), listen, bound))
}

async fn serve_on(
    exporter: Arc<Exporter>,
    listen: SocketAddr,
    bound: impl FnOnce(SocketAddr),
) -> Result<(), MetricsError> {
    use hyper::server::conn::http1;
    use tokio::signal::unix::{SignalKind, signal};

    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|source| MetricsError::Listen { addr: listen, source })?;
    bound(listener.local_addr()?);
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = sigterm.recv() => return Ok(()),
            _ = sigint.recv() => return Ok(()),
        };
        let exporter = exporter.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| respond(exporter.clone(), request));
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = http1::Builder::new().serve_connection(io, service).await {
                tracing::debug!(%peer, "connection: {e}");
            }
        });
    }
}

type Response = hyper::Response<http_body_util::Full<bytes::Bytes>>;

async fn respond(
    exporter: Arc<Exporter>,
    request: hyper::Request<hyper::body::Incoming>,
) -> Result<Response, std::convert::Infallible> {
    use hyper::StatusCode;
    use hyper::header::{ACCEPT, CONTENT_TYPE};

    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut response = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(v) = content_type.parse() {
            response.headers_mut().insert(CONTENT_TYPE, v);
        }
        Ok(response)
    };
    let text = "text/plain; charset=utf-8";
    match (request.method(), request.uri().path()) {
        (&hyper::Method::GET, "/metrics") => {
            let format = Format::negotiate(request.headers().get(ACCEPT).and_then(|a| a.to_str().ok()));
            // The stats request blocks (briefly): off the runtime's thread.
            let labels = exporter.labels;
            let report = tokio::task::spawn_blocking(move || exporter.report()).await.ok().flatten();
            match encode(report, format, labels) {
                Ok(body) => reply(StatusCode::OK, format.content_type(), body),
                Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, text, format!("{e}\n")),
            }
        }
        (&hyper::Method::GET, "/") => reply(StatusCode::OK, text, "memsock metrics: see /metrics\n".into()),
        _ => reply(StatusCode::NOT_FOUND, text, "not found: see /metrics\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memsock::OverflowPolicy;
    use memsock::control::{ServerMessage, encode as encode_frame};

    fn subscriber(index: u32, latency: LatencyReport) -> SubscriberReport {
        SubscriberReport {
            subscription: u64::from(index),
            index,
            attach_seq: 0,
            pid: 1,
            client_name: "x".repeat(64),
            policy: OverflowPolicy::Lossless,
            credits: 4,
            delivered: u64::MAX,
            dropped: u64::MAX,
            evicted: u64::MAX,
            queued: u64::MAX,
            lag_ns: u64::MAX,
            msgs_per_s: 0.0,
            dropped_per_s: 0.0,
            faults: u64::MAX,
            latency: Some(latency),
        }
    }

    /// A subscriber whose histogram says u64::MAX everywhere.
    fn hostile() -> LatencyReport {
        LatencyReport {
            last_interval: None,
            buckets: (0..LATENCY_REPORT_BUCKETS as u8).map(|k| (k, u64::MAX)).collect(),
            sum_ns: u64::MAX,
        }
    }

    fn report(subscribers: Vec<SubscriberReport>) -> StatsReport {
        let stream = StreamReport {
            name: "s".into(),
            publisher_pid: None,
            publisher_name: None,
            slot_size: 64,
            slot_count: 8,
            free_slots: 8,
            published: 0,
            bytes: 0,
            msgs_per_s: 0.0,
            bytes_per_s: 0.0,
            idle_ns: None,
            closed: false,
            history: 0,
            history_held: 0,
            retained_ns: None,
            subscribers,
        };
        StatsReport { streams: vec![stream], ..StatsReport::default() }
    }

    /// Counts that would overflow the encoder's running total are clamped:
    /// the scrape works (no overflow panic) and the buckets never go down.
    #[test]
    fn a_hostile_histogram_cannot_break_a_scrape() {
        let text =
            encode(Some(report(vec![subscriber(0, hostile())])), Format::Prometheus, LabelOptions::default()).unwrap();
        let counts: Vec<f64> = text
            .lines()
            .filter(|l| l.starts_with("memsock_subscriber_latency_seconds_bucket"))
            .map(|l| l.rsplit_once(' ').unwrap().1.parse().unwrap())
            .collect();
        assert_eq!(counts.len(), LATENCY_REPORT_BUCKETS);
        assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
        assert_eq!(counts[LATENCY_REPORT_BUCKETS - 1], u64::MAX as f64);
    }

    /// Every stats reply with 256 subscribers that all report the worst
    /// histogram still fits in a control frame.
    #[test]
    fn a_report_of_many_hostile_subscribers_fits_in_a_frame() {
        let subscribers = (0..256).map(|i| subscriber(i, hostile())).collect();
        let message = ServerMessage::Reply { id: 1, result: Ok(memsock::control::Reply::Stats(report(subscribers))) };
        let mut out = Vec::new();
        encode_frame(&message, &mut out).unwrap();
    }
}
