//! `memsock stats`: the broker's counters as a table, JSON, or metrics in
//! the Prometheus or OpenMetrics text format.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use memsock::{Client, LatencyReport, StatsReport};

use memsock_broker::metrics;

/// How `memsock stats` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StatsFormat {
    /// A table for people.
    Table,
    /// One JSON document (the same as the Python client's dicts).
    Json,
    /// Prometheus text format 0.0.4 (for node_exporter's textfile
    /// collector).
    Prometheus,
    /// OpenMetrics 1.0 text.
    Openmetrics,
}

/// Prints the stats once, or every second with `watch`.
pub fn run(socket: &Path, format: StatsFormat, watch: bool, stream: Option<&str>) -> Result<()> {
    let client = Client::connect_to(socket)?;
    loop {
        let report = client.stats(stream)?;
        let text = match format {
            StatsFormat::Table => table(&report),
            StatsFormat::Json => to_json(&report)?,
            StatsFormat::Prometheus => metrics::encode(Some(report), metrics::Format::Prometheus, Default::default())?,
            StatsFormat::Openmetrics => {
                metrics::encode(Some(report), metrics::Format::Openmetrics, Default::default())?
            }
        };
        let text = text.trim_end();
        if watch {
            // Clear the screen and home the cursor, like `watch`.
            print!("\x1b[2J\x1b[H");
        }
        println!("{text}");
        if !watch {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The stats' one serde representation (the Python client's dicts are the
/// same).
fn to_json(report: &StatsReport) -> Result<String> {
    serde_json::to_string_pretty(report).context("encoding stats")
}

pub use memsock_broker::metrics::policy;

/// A subscriber's latency over the last second, in µs: "p50/p99/max", or
/// "-" if none was measured (or the stream has no timestamps).
fn latency(latency: Option<&LatencyReport>) -> String {
    let us = |ns: u64| ns as f64 / 1e3;
    match latency.and_then(|l| l.last_interval) {
        Some(l) => format!("{:.1}/{:.1}/{:.1}", us(l.p50_ns), us(l.p99_ns), us(l.max_ns)),
        None => "-".into(),
    }
}

fn table(report: &StatsReport) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "broker pid {}, {} clients, {} streams, {} subscribers waiting for a stream, {} of {} descriptors",
        report.broker_pid,
        report.clients,
        report.streams.len(),
        report.waiting_subscribers,
        report.descriptors,
        report.descriptor_limit
    );
    for s in &report.streams {
        let publisher = match (s.publisher_pid, &s.publisher_name) {
            (Some(pid), Some(name)) => format!("{name} (pid {pid})"),
            (Some(pid), None) => format!("pid {pid}"),
            (None, _) => "none".to_owned(),
        };
        let _ = writeln!(
            t,
            "\nstream {:?}{}  publisher {publisher}  slots {} B × {} ({} free)\n  published {}  {:.0} msg/s  {:.2} MB/s",
            s.name,
            if s.closed { " (closed)" } else { "" },
            s.slot_size,
            s.slot_count,
            s.free_slots,
            s.published,
            s.msgs_per_s,
            s.bytes_per_s / 1e6,
        );
        if s.history > 0 {
            let retained = match s.retained_ns {
                Some(ns) => format!(", kept for it with no client for {:.1} s", ns as f64 / 1e9),
                None => String::new(),
            };
            let _ = writeln!(t, "  history {} of {} frames{retained}", s.history_held, s.history);
        }
        if s.subscribers.is_empty() {
            let _ = writeln!(t, "  no subscribers");
            continue;
        }
        let _ = writeln!(
            t,
            "  {:>6} {:>8} {:<16} {:>12} {:>7} {:>12} {:>10} {:>6} {:>10} {:>10}  latency p50/p99/max µs (last second)",
            "sub", "pid", "client", "policy", "credits", "delivered", "dropped", "queue", "lag µs", "msg/s",
        );
        for u in &s.subscribers {
            let _ = writeln!(
                t,
                "  {:>6} {:>8} {:<16} {:>12} {:>7} {:>12} {:>10} {:>6} {:>10.1} {:>10.0}  {}",
                u.subscription,
                u.pid,
                u.client_name,
                policy(u.policy),
                u.credits,
                u.delivered,
                u.dropped,
                u.queued,
                u.lag_ns as f64 / 1e3,
                u.msgs_per_s,
                latency(u.latency.as_ref()),
            );
        }
    }
    t
}
