//! `memsock hz STREAM`: a stream's rate and the interval between its
//! frames over a window, printed every second — like `ros2 topic hz` and
//! `iox2 service hz`. Intervals come from the frames' publish times when
//! the stream has them (the publisher's pacing, not this tool's), else
//! from their receive times; the rate counts every frame published, also
//! those this keep-latest subscriber skipped.

use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use memsock::RecvError;
use serde_json::json;

/// `memsock hz`.
#[derive(Debug, clap::Args)]
pub struct HzArgs {
    /// The stream (waited for if it does not exist yet).
    stream: String,
    /// Frames the statistics are over (the most recent).
    #[arg(long, default_value_t = 10_000)]
    window: usize,
    /// Stop after this many reports.
    #[arg(long)]
    count: Option<u64>,
    /// Seconds between reports.
    #[arg(long, default_value_t = 1.0)]
    every: f64,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

/// Credits of its subscriber: a few, so as not to take a small pool from
/// the stream's real subscribers (frames it skips are counted by their
/// sequence numbers).
const CREDITS: u32 = 16;

/// Frames seen, by the time the publisher stamped on them (or when they
/// came), for the window's statistics.
struct Window {
    max: usize,
    /// (sequence number, nanoseconds).
    frames: VecDeque<(u64, u64)>,
}

/// What a report says.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Report {
    rate_hz: f64,
    mean_ms: f64,
    min_ms: f64,
    max_ms: f64,
    std_ms: f64,
    frames: usize,
}

impl Window {
    fn push(&mut self, seq: u64, at_ns: u64) {
        if self.frames.len() == self.max {
            self.frames.pop_front();
        }
        self.frames.push_back((seq, at_ns));
    }

    /// The rate (frames published per second over the window, skipped ones
    /// counted by their sequence numbers) and the statistics of the
    /// intervals between consecutive frames.
    fn report(&self) -> Option<Report> {
        let (&(first_seq, first_ns), &(last_seq, last_ns)) = (self.frames.front()?, self.frames.back()?);
        let span_ns = last_ns.checked_sub(first_ns).filter(|&ns| ns > 0)?;
        let intervals: Vec<f64> = self
            .frames
            .iter()
            .zip(self.frames.iter().skip(1))
            .filter(|(a, b)| b.0 == a.0 + 1)
            .map(|(a, b)| b.1.saturating_sub(a.1) as f64 / 1e6)
            .collect();
        if intervals.is_empty() {
            return None;
        }
        let n = intervals.len() as f64;
        let mean = intervals.iter().sum::<f64>() / n;
        let var = intervals.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        Some(Report {
            rate_hz: last_seq.saturating_sub(first_seq) as f64 * 1e9 / span_ns as f64,
            mean_ms: mean,
            min_ms: intervals.iter().copied().fold(f64::INFINITY, f64::min),
            max_ms: intervals.iter().copied().fold(0.0, f64::max),
            std_ms: var.sqrt(),
            frames: self.frames.len(),
        })
    }
}

/// Reports every `--every` seconds until `--count` or the stream closes.
pub fn run(socket: &Path, args: &HzArgs) -> Result<()> {
    anyhow::ensure!(args.window >= 2, "--window must be at least 2 frames");
    anyhow::ensure!(args.every > 0.0, "--every must be positive");
    // Rates of live frames only: the history's came earlier.
    let subscriber = super::watcher(socket, &args.stream, CREDITS, 0)?;
    let every = Duration::from_secs_f64(args.every);
    let mut window = Window { max: args.window, frames: VecDeque::with_capacity(args.window) };
    let mut reports = 0u64;
    let mut next = Instant::now() + every;
    while args.count.is_none_or(|n| reports < n) {
        let wait = next.saturating_duration_since(Instant::now());
        match subscriber.recv_timeout(wait) {
            Ok(sample) => {
                let stamp = sample.timestamp_ns();
                window.push(sample.seq(), if stamp != 0 { stamp } else { memsock::now_ns() });
            }
            Err(RecvError::Timeout | RecvError::PublisherGone | RecvError::PublisherBack) => {}
            Err(RecvError::Closed) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        if Instant::now() >= next {
            next += every;
            reports += 1;
            print(args.json, window.report());
        }
    }
    Ok(())
}

fn print(json: bool, report: Option<Report>) {
    match (json, report) {
        (true, Some(r)) => println!(
            "{}",
            json!({"rate_hz": r.rate_hz, "interval_ms": {"mean": r.mean_ms, "min": r.min_ms, "max": r.max_ms, "std": r.std_ms}, "window": r.frames})
        ),
        (true, None) => println!("{}", json!({ "rate_hz": null, "window": 0 })),
        (false, Some(r)) => println!(
            "average rate: {:.3} Hz\n  interval min {:.3} ms  max {:.3} ms  mean {:.3} ms  std dev {:.3} ms  window: {}",
            r.rate_hz, r.min_ms, r.max_ms, r.mean_ms, r.std_ms, r.frames
        ),
        (false, None) => println!("no new frames"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_count_skipped_frames_and_intervals_only_consecutive_ones() {
        let mut w = Window { max: 4, frames: VecDeque::new() };
        assert_eq!(w.report(), None);
        // 1 kHz, frame 2 skipped: 4 frames published over 4 ms... and the
        // window keeps the last 4 frames of 5.
        for (seq, ms) in [(0u64, 0u64), (1, 1), (3, 3), (4, 4), (5, 5)] {
            w.push(seq, ms * 1_000_000);
        }
        let r = w.report().unwrap();
        assert_eq!(r.frames, 4);
        assert!((r.rate_hz - 1000.0).abs() < 1e-6, "{r:?}");
        assert!((r.mean_ms - 1.0).abs() < 1e-9 && r.std_ms < 1e-9, "{r:?}");
    }
}
