//! `memsock echo STREAM`: a keep-latest subscriber that prints each frame
//! it gets — sequence number, length, latency from its publish time, first
//! bytes — like `ros2 topic echo`. It never holds the publisher back.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use memsock::RecvError;
use serde_json::json;

/// `memsock echo`.
#[derive(Debug, clap::Args)]
pub struct EchoArgs {
    /// The stream (waited for if it does not exist yet).
    stream: String,
    /// Stop after this many frames.
    #[arg(long)]
    count: Option<u64>,
    /// Bytes of each frame shown, in hex.
    #[arg(long, default_value_t = 16)]
    bytes: usize,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

/// Credits of its subscriber: a few frames may queue while it prints.
const CREDITS: u32 = 4;

/// Prints frames until `--count` or the stream closes.
pub fn run(socket: &Path, args: &EchoArgs) -> Result<()> {
    let subscriber = super::watcher(socket, &args.stream, CREDITS, u32::MAX)?;
    let mut shown = 0u64;
    let mut last_seq: Option<u64> = None;
    while args.count.is_none_or(|n| shown < n) {
        let sample = match subscriber.recv_timeout(Duration::from_secs(1)) {
            Ok(sample) => sample,
            Err(RecvError::Timeout) => continue,
            Err(RecvError::PublisherGone) => {
                event(args.json, "publisher_gone");
                continue;
            }
            Err(RecvError::PublisherBack) => {
                event(args.json, "publisher_back");
                continue;
            }
            Err(RecvError::Closed) => {
                event(args.json, "closed");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let now = memsock::now_ns();
        let (seq, stamp) = (sample.seq(), sample.timestamp_ns());
        let history = sample.is_history();
        // A history frame's age is no latency.
        let latency_us = (stamp != 0 && !history).then(|| now.saturating_sub(stamp) as f64 / 1e3);
        let skipped = last_seq.map_or(0, |last| seq.saturating_sub(last + 1));
        last_seq = Some(seq);
        let mut hex = String::with_capacity(args.bytes * 3);
        for b in sample.iter().take(args.bytes) {
            let _ = write!(hex, "{}{b:02x}", if hex.is_empty() { "" } else { " " });
        }
        if args.json {
            let line = json!({"seq": seq, "len": sample.len(), "latency_us": latency_us, "skipped": skipped, "hex": hex, "history": history});
            println!("{line}");
        } else {
            let latency = match latency_us {
                _ if history => "(history)".to_owned(),
                Some(us) => format!("{us:.1} µs"),
                None => "-".to_owned(),
            };
            let skipped = if skipped > 0 { format!("  ({skipped} skipped)") } else { String::new() };
            println!("seq {seq}  len {}  latency {latency}  {hex}{skipped}", sample.len());
        }
        shown += 1;
    }
    Ok(())
}

fn event(json: bool, what: &str) {
    if json {
        println!("{}", json!({ "event": what }));
    } else {
        println!("-- {}", what.replace('_', " "));
    }
}
