//! Small tools on the command line: `memsock publish` (a native producer
//! for tests, examples and benchmarks) and the hand-rolled ring producer
//! the Python benchmark measures memsock against.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use memsock::{Client, LoanError, SendError, StreamConfig};
use serde_json::json;

/// What `memsock publish` sends.
pub struct PublishArgs<'a> {
    pub stream: &'a str,
    pub size: u32,
    pub slots: u32,
    pub count: u64,
    pub rate: u64,
    pub subscribers: u32,
    pub timestamps: bool,
    pub history: u32,
    pub history_idle: Duration,
    pub hold: bool,
}

/// Publishes `count` frames of `size` bytes (the sequence number in the
/// first 8 bytes, little-endian), as fast as lossless subscribers allow or
/// at `rate` per second, after `subscribers` subscribers have attached.
/// Prints one JSON line at the end.
pub fn run(socket: &Path, a: &PublishArgs<'_>) -> Result<()> {
    let client = Client::connect_to(socket)?;
    let mut config = StreamConfig::new(a.size, a.slots);
    config.max_subscribers = config.max_subscribers.max(a.subscribers);
    config.timestamps = a.timestamps;
    config.history = a.history;
    config.history_idle_ms = a.history_idle.as_millis().try_into().unwrap_or(u64::MAX);
    let mut publisher = client.publisher(a.stream, &config)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.stats(Some(a.stream))?.streams.first().map_or(0, |s| s.subscribers.len()) < a.subscribers as usize {
        if Instant::now() > deadline {
            bail!("fewer than {} subscribers came within 60 s", a.subscribers);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let period = (a.rate > 0).then(|| Duration::from_secs_f64(1.0 / a.rate as f64));
    let start = Instant::now();
    let mut next = start;
    let mut sent = 0u64;
    while sent < a.count {
        let mut frame = match publisher.loan() {
            Ok(frame) => frame,
            Err(LoanError::Closed) => break,
            Err(e) => return Err(e.into()),
        };
        let buf = frame.as_mut_slice();
        let head = buf.len().min(8);
        buf[..head].copy_from_slice(&sent.to_le_bytes()[..head]);
        frame.set_len(a.size as usize);
        match frame.send_timeout(Duration::from_secs(10)) {
            Ok(_) => sent += 1,
            Err(SendError::Closed) => break,
            Err(e) => return Err(e).context("sending"),
        }
        if let Some(period) = period {
            next += period;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    println!("{}", json!({"sent": sent, "seconds": seconds}));
    if a.hold {
        // Attached and idle until stdin ends: late joiners of a stream with
        // history are handed it by this process's connection thread.
        std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink())?;
    }
    drop(publisher);
    Ok(())
}
