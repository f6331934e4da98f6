//! `memsock record`: live streams into MCAP files, through the recorder
//! plugin in this process (see `memsock_plugins::record`).

use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use memsock::Client;
use memsock::pattern::Pattern;
use memsock_plugins::record::{RecordCompression, RecordOptions, RecordPolicy, RecordStats, Recorder};
use memsock_plugins::{Host, HostOptions};
use serde_json::json;

/// `memsock record`'s arguments.
#[derive(Debug, clap::Args)]
pub struct RecordArgs {
    /// Streams to record: a pattern (`*` within a part of a name, `**`
    /// across parts; repeatable) [default: every stream]
    #[arg(long = "stream", value_name = "PATTERN")]
    streams: Vec<String>,
    /// The MCAP file (with splitting: NAME-00000.mcap, NAME-00001.mcap, ...).
    #[arg(short, long)]
    output: PathBuf,
    /// lossless (a slow disk slows the publishers) or keep-latest (a slow
    /// disk costs frames, counted).
    #[arg(long, default_value = "lossless")]
    policy: String,
    /// Credits per stream, at most: a busy pool gives what it can.
    #[arg(long, default_value_t = 64)]
    credits: u32,
    /// Start a new file past this size (K, M, G suffixes).
    #[arg(long, value_name = "BYTES")]
    split_size: Option<String>,
    /// Start a new file after this many seconds.
    #[arg(long, value_name = "SECS")]
    split_duration: Option<f64>,
    /// none, lz4 or zstd.
    #[arg(long, default_value = "none")]
    compression: String,
    /// Write at most this many bytes a second (K, M, G suffixes): spares a
    /// disk, or stands in for a slow one.
    #[arg(long, value_name = "BYTES")]
    throttle: Option<String>,
    /// Replace files that exist (else they are refused).
    #[arg(long)]
    overwrite: bool,
    /// Do not record the frames a stream keeps for late joiners (its
    /// history): start with the live ones.
    #[arg(long)]
    no_history: bool,
    /// Progress and the summary as JSON lines on stdout.
    #[arg(long)]
    json: bool,
}

fn amount(what: &str, value: &str) -> Result<u64> {
    memsock_broker::limits::parse_amount(value)
        .with_context(|| format!("{what}: {value:?} is not a number of bytes (K, M, G or T suffixes allowed)"))
}

impl RecordArgs {
    fn options(&self) -> Result<RecordOptions> {
        let patterns = options_patterns(self);
        for p in &patterns {
            Pattern::parse(p).with_context(|| format!("--stream {p:?}"))?;
        }
        let mut options = RecordOptions::new(patterns, &self.output);
        options.policy = match self.policy.as_str() {
            "lossless" => RecordPolicy::Lossless,
            "keep-latest" | "keep_latest" => RecordPolicy::KeepLatest,
            other => bail!("--policy {other:?}: lossless or keep-latest"),
        };
        options.compression = match self.compression.as_str() {
            "none" => RecordCompression::None,
            "lz4" => RecordCompression::Lz4,
            "zstd" => RecordCompression::Zstd,
            other => bail!("--compression {other:?}: none, lz4 or zstd"),
        };
        if self.credits == 0 {
            bail!("--credits must be at least 1");
        }
        options.credits = self.credits;
        options.split_size = self.split_size.as_deref().map(|s| amount("--split-size", s)).transpose()?;
        if let Some(secs) = self.split_duration {
            if !(secs > 0.0 && secs.is_finite()) {
                bail!("--split-duration {secs}: a positive number of seconds");
            }
            options.split_duration = Some(Duration::from_secs_f64(secs));
        }
        options.throttle = self.throttle.as_deref().map(|s| amount("--throttle", s)).transpose()?;
        options.overwrite = self.overwrite;
        options.history = !self.no_history;
        Ok(options)
    }
}

fn options_patterns(args: &RecordArgs) -> Vec<String> {
    if args.streams.is_empty() { vec!["**".to_owned()] } else { args.streams.clone() }
}

/// Records until SIGINT or SIGTERM (which finish the file) or until the
/// broker goes away.
pub fn run(socket: &Path, args: &RecordArgs) -> Result<()> {
    let options = args.options()?;
    let client = Client::connect_to(socket)?;
    let recorder = Recorder::new(options).context("starting the recorder")?;
    let stats = recorder.stats();
    let (json, patterns, output) = (args.json, options_patterns(args), args.output.display().to_string());
    let host = Host::new(client, recorder, HostOptions::default()).on_ready(move || {
        // Streams created from now on are recorded from their first frame.
        if json {
            println!("{}", json!({ "ready": true, "streams": patterns, "output": output }));
        } else {
            tracing::info!(?patterns, output, "recording");
        }
    });
    let stop = host.stop_handle();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut progress = Progress::new(args.json);
    let result = runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let run = host.run();
        tokio::pin!(run);
        loop {
            tokio::select! {
                done = &mut run => return anyhow::Ok(done?),
                _ = term.recv() => stop.stop(),
                _ = int.recv() => stop.stop(),
                _ = tick.tick() => progress.show(&stats),
            }
        }
    });
    progress.finish(&stats)?;
    let (_, health) = result?;
    tracing::debug!(?health, "host stopped");
    Ok(())
}

/// The live progress line (on a terminal) or JSON lines.
struct Progress {
    json: bool,
    tty: bool,
    start: Instant,
    last: (Instant, u64, u64),
}

impl Progress {
    fn new(json: bool) -> Self {
        let now = Instant::now();
        Self { json, tty: std::io::stderr().is_terminal(), start: now, last: (now, 0, 0) }
    }

    fn snapshot(&mut self, stats: &RecordStats) -> serde_json::Value {
        let (frames, bytes) = (stats.frames.load(Relaxed), stats.bytes.load(Relaxed));
        let now = Instant::now();
        let dt = now.duration_since(self.last.0).as_secs_f64().max(1e-3);
        let (msgs_per_s, bytes_per_s) =
            ((frames - self.last.1.min(frames)) as f64 / dt, (bytes - self.last.2.min(bytes)) as f64 / dt);
        self.last = (now, frames, bytes);
        json!({
            "seconds": self.start.elapsed().as_secs_f64(),
            "streams": stats.streams.load(Relaxed),
            "frames": frames,
            "bytes": bytes,
            "msgs_per_s": msgs_per_s,
            "bytes_per_s": bytes_per_s,
            "upstream_gaps": stats.upstream_gaps.load(Relaxed),
            "recorder_drops": stats.recorder_drops.load(Relaxed),
            "file_bytes": stats.file_bytes.load(Relaxed),
        })
    }

    fn show(&mut self, stats: &RecordStats) {
        let s = self.snapshot(stats);
        if self.json {
            println!("{s}");
        } else if self.tty {
            eprint!(
                "\r\x1b[K{} streams  {} frames  {:.1} MB  {:.0} msg/s  {:.1} MB/s  drops: {} upstream, {} recorder  file {:.1} MB",
                s["streams"],
                s["frames"],
                s["bytes"].as_f64().unwrap_or(0.0) / 1e6,
                s["msgs_per_s"].as_f64().unwrap_or(0.0),
                s["bytes_per_s"].as_f64().unwrap_or(0.0) / 1e6,
                s["upstream_gaps"],
                s["recorder_drops"],
                s["file_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            );
            let _ = std::io::stderr().flush();
        }
    }

    /// The summary: a last JSON line, or a line on stderr.
    fn finish(&mut self, stats: &RecordStats) -> Result<()> {
        let mut s = self.snapshot(stats);
        let files: Vec<String> =
            stats.files.lock().map(|f| f.iter().map(|p| p.display().to_string()).collect()).unwrap_or_default();
        s["done"] = json!(true);
        s["files"] = json!(files);
        if self.json {
            println!("{s}");
        } else {
            if self.tty {
                eprintln!();
            }
            eprintln!(
                "recorded {} frames ({:.1} MB) of {} streams into {}; drops: {} upstream, {} by the recorder",
                s["frames"],
                s["bytes"].as_f64().unwrap_or(0.0) / 1e6,
                s["streams"],
                files.join(", "),
                s["upstream_gaps"],
                s["recorder_drops"],
            );
        }
        Ok(())
    }
}
