//! `memsock replay`: recorded streams published again (see
//! `memsock_plugins::replay`).

use std::collections::HashMap;
use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use memsock::Client;
use memsock::pattern::Pattern;
use memsock_plugins::replay::{ReplayOptions, ReplayStats, replay};
use serde_json::json;

/// `memsock replay`'s arguments.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// MCAP files written by `memsock record`, in order (a split
    /// recording's files replay as one).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Only streams whose recorded names match (repeatable) [default: all].
    #[arg(long = "stream", value_name = "PATTERN")]
    streams: Vec<String>,
    /// Pacing: the recorded one times X (2: twice as fast).
    #[arg(long, default_value_t = 1.0, conflicts_with = "max_speed")]
    rate: f64,
    /// As fast as the subscribers take the frames.
    #[arg(long)]
    max_speed: bool,
    /// Skip the first SECS seconds of the recording.
    #[arg(long, value_name = "SECS")]
    start: Option<f64>,
    /// Stop SECS seconds after the start of the recording.
    #[arg(long, value_name = "SECS")]
    end: Option<f64>,
    /// From the beginning again until interrupted.
    #[arg(long = "loop")]
    looped: bool,
    /// Publish recorded stream FROM as TO (repeatable).
    #[arg(long = "rename", value_name = "FROM=TO")]
    renames: Vec<String>,
    /// Progress and the summary as JSON lines on stdout.
    #[arg(long)]
    json: bool,
}

fn seconds(what: &str, value: Option<f64>) -> Result<Option<Duration>> {
    match value {
        None => Ok(None),
        Some(s) if s >= 0.0 && s.is_finite() => Ok(Some(Duration::from_secs_f64(s))),
        Some(s) => bail!("{what} {s}: a number of seconds, 0 or more"),
    }
}

impl ReplayArgs {
    fn options(&self) -> Result<ReplayOptions> {
        let patterns = if self.streams.is_empty() { vec!["**".to_owned()] } else { self.streams.clone() };
        let patterns = patterns
            .iter()
            .map(|p| Pattern::parse(p).with_context(|| format!("--stream {p:?}")))
            .collect::<Result<Vec<_>>>()?;
        if !(self.rate > 0.0 && self.rate.is_finite()) {
            bail!("--rate {}: a positive number", self.rate);
        }
        let mut renames = HashMap::new();
        for r in &self.renames {
            let (from, to) = r.split_once('=').with_context(|| format!("--rename {r:?}: FROM=TO"))?;
            if from.is_empty() || to.is_empty() {
                bail!("--rename {r:?}: FROM=TO, both names");
            }
            renames.insert(from.to_owned(), to.to_owned());
        }
        for f in &self.files {
            if !f.is_file() {
                bail!("{}: no such file", f.display());
            }
        }
        Ok(ReplayOptions {
            files: self.files.clone(),
            patterns,
            rate: (!self.max_speed).then_some(self.rate),
            start: seconds("--start", self.start)?,
            end: seconds("--end", self.end)?,
            looped: self.looped,
            renames,
        })
    }
}

/// Replays until the files end (or, with `--loop`, SIGINT or SIGTERM).
pub fn run(socket: &Path, args: &ReplayArgs) -> Result<()> {
    let options = args.options()?;
    let client = Client::connect_to(socket)?;
    let stats = Arc::new(ReplayStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (stats, stop) = (stats.clone(), stop.clone());
        std::thread::Builder::new()
            .name("memsock-replay".into())
            .spawn(move || replay(&client, &options, &stats, &stop))?
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let start = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let line = |stats: &ReplayStats| {
        json!({
            "seconds": start.elapsed().as_secs_f64(),
            "streams": stats.streams.load(Relaxed),
            "frames": stats.frames.load(Relaxed),
            "bytes": stats.bytes.load(Relaxed),
            "passes": stats.passes.load(Relaxed),
            "truncated_files": stats.truncated.load(Relaxed),
        })
    };
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        while !worker.is_finished() {
            tokio::select! {
                _ = term.recv() => stop.store(true, Relaxed),
                _ = int.recv() => stop.store(true, Relaxed),
                _ = tick.tick() => {
                    let s = line(&stats);
                    if args.json {
                        println!("{s}");
                    } else if tty {
                        eprint!("\r\x1b[K{} streams  {} frames  {:.1} MB  pass {}", s["streams"], s["frames"],
                            s["bytes"].as_f64().unwrap_or(0.0) / 1e6, s["passes"]);
                        let _ = std::io::stderr().flush();
                    }
                }
            }
        }
        anyhow::Ok(())
    })?;
    let pacing = worker.join().map_err(|_| anyhow::anyhow!("the replay thread panicked"))??;
    let mut s = line(&stats);
    s["done"] = json!(true);
    s["pacing_error_p50_us"] = json!(pacing.quantile_us(0.5));
    s["pacing_error_p99_us"] = json!(pacing.quantile_us(0.99));
    if args.json {
        println!("{s}");
    } else {
        if tty {
            eprintln!();
        }
        eprintln!(
            "replayed {} frames ({:.1} MB) of {} streams; pacing error p99 {} µs",
            s["frames"],
            s["bytes"].as_f64().unwrap_or(0.0) / 1e6,
            s["streams"],
            s["pacing_error_p99_us"]
        );
    }
    Ok(())
}
