//! The replayer: recorded streams published again.
//!
//! Reads MCAP files written by the [recorder](crate::record) (a split
//! recording's files in order, as one), creates each recorded stream with
//! its recorded geometry (optionally renamed) and publishes every frame
//! through an ordinary loan at its recorded pacing — by log time, the time
//! the recorder took it — scaled by a rate, or as fast as the subscribers
//! take them. The bytes published are the recorded ones.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use memsock::pattern::Pattern;
use memsock::{Client, ClientError, Publisher, SendError, StreamConfig};

use crate::FileError;
use crate::record::MESSAGE_ENCODING;

/// What to replay, and how.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// The files, in order (a split recording's files as one).
    pub files: Vec<PathBuf>,
    /// Only streams whose recorded names match one of these.
    pub patterns: Vec<Pattern>,
    /// Pacing: the recorded one times this (2.0: twice as fast); `None`:
    /// as fast as the subscribers take the frames.
    pub rate: Option<f64>,
    /// Skip what was recorded in the first this long.
    pub start: Option<Duration>,
    /// Stop at what was recorded this long after the start.
    pub end: Option<Duration>,
    /// From the beginning again, until stopped.
    pub looped: bool,
    /// Stream renames: recorded name to published name.
    pub renames: HashMap<String, String>,
}

/// Why replaying failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// A file could not be opened or mapped, or is not MCAP.
    #[error(transparent)]
    File(#[from] FileError),
    /// A recorded channel lacks its stream's geometry.
    #[error("{path}: channel {topic:?} has no memsock geometry in its metadata (not recorded by memsock?)")]
    NoGeometry {
        /// The file.
        path: PathBuf,
        /// The channel's topic.
        topic: String,
    },
    /// The broker refused a stream or went away.
    #[error("stream {stream:?}: {source}")]
    Publish {
        /// The stream.
        stream: String,
        /// The broker's reason.
        source: ClientError,
    },
    /// A send failed (the stream was closed, say).
    #[error("stream {stream:?}: {source}")]
    Send {
        /// The stream.
        stream: String,
        /// Why.
        source: SendError,
    },
}

/// Counters, shared with whoever shows progress.
#[derive(Debug, Default)]
pub struct ReplayStats {
    /// Frames published.
    pub frames: AtomicU64,
    /// Their bytes.
    pub bytes: AtomicU64,
    /// Streams published.
    pub streams: AtomicU64,
    /// Passes over the files begun (with `looped`, more than one).
    pub passes: AtomicU64,
    /// Files found cut short (a recorder killed): replayed up to the cut.
    pub truncated: AtomicU64,
}

/// How late frames went out against their recorded pacing, to the
/// microsecond up to 100 ms.
#[derive(Debug, Clone)]
pub struct PacingErrors {
    buckets: Vec<u64>,
    count: u64,
}

impl Default for PacingErrors {
    fn default() -> Self {
        Self { buckets: vec![0; 100_001], count: 0 }
    }
}

impl PacingErrors {
    fn add(&mut self, late: Duration) {
        let us = (late.as_micros() as usize).min(self.buckets.len() - 1);
        self.buckets[us] += 1;
        self.count += 1;
    }

    /// Frames paced.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The `q` quantile (0..=1), in microseconds (`None` if nothing was
    /// paced).
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let want = ((self.count as f64 * q).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        self.buckets
            .iter()
            .position(|&n| {
                seen += n;
                seen >= want
            })
            .map(|us| us as u64)
    }
}

/// A recorded stream's geometry, from its channel's metadata.
pub fn recorded_config(metadata: &std::collections::BTreeMap<String, String>) -> Option<StreamConfig> {
    let get = |k: &str| metadata.get(k)?.parse::<u32>().ok();
    let mut config = StreamConfig::new(get("slot_size")?, get("slot_count")?);
    config.max_subscribers = get("max_subscribers").unwrap_or(config.max_subscribers);
    config.queue_capacity = get("queue_capacity").unwrap_or(0);
    config.publisher_loans = get("publisher_loans").unwrap_or(0);
    config.timestamps = metadata.get("timestamps").is_none_or(|t| t == "true");
    Some(config)
}

/// Replays until the files end (or, looping, until `stop`), publishing
/// through `client`. Returns how late the frames went out.
///
/// # Errors
/// [`ReplayError`]; frames published so far stay published.
pub fn replay(
    client: &Client,
    options: &ReplayOptions,
    stats: &ReplayStats,
    stop: &AtomicBool,
) -> Result<PacingErrors, ReplayError> {
    let mut publishers: HashMap<String, Publisher> = HashMap::new();
    let mut pacing = PacingErrors::default();
    loop {
        stats.passes.fetch_add(1, Relaxed);
        let mut pass = Pass { options, stats, stop, first_log: None, base: None };
        for path in &options.files {
            if !pass.file(client, path, &mut publishers, &mut pacing)? {
                return Ok(pacing);
            }
        }
        if !options.looped || stop.load(Relaxed) {
            return Ok(pacing);
        }
    }
}

/// One pass over the files.
struct Pass<'a> {
    options: &'a ReplayOptions,
    stats: &'a ReplayStats,
    stop: &'a AtomicBool,
    /// Log time of the recording's first frame.
    first_log: Option<u64>,
    /// The instant the first frame replayed went out, and its log time.
    base: Option<(Instant, u64)>,
}

impl Pass<'_> {
    /// Replays one file; false once the end (`--end`, or a stop) is reached.
    fn file(
        &mut self,
        client: &Client,
        path: &PathBuf,
        publishers: &mut HashMap<String, Publisher>,
        pacing: &mut PacingErrors,
    ) -> Result<bool, ReplayError> {
        let io = |source| FileError::Io { path: path.clone(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the file is mapped read-only and only read; a recording
        // still being written only grows (the stream stops at its end).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let mcap_err = |source| FileError::Mcap { path: path.clone(), source };
        let mut stream = mcap::read::RawMessageStream::new(&map).map_err(mcap_err)?;
        // By channel id: the stream to publish as, if replayed.
        let mut names: HashMap<u16, Option<String>> = HashMap::new();
        while let Some(message) = stream.next() {
            if self.stop.load(Relaxed) {
                return Ok(false);
            }
            let message = match message {
                Ok(m) => m,
                Err(e) => {
                    // A recording cut short (its recorder killed): what
                    // was complete has been replayed.
                    tracing::warn!(path = %path.display(), "the file ends early: {e}");
                    self.stats.truncated.fetch_add(1, Relaxed);
                    return Ok(true);
                }
            };
            let id = message.header.channel_id;
            let chosen = match names.entry(id) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(self.choose(&stream, id, path, client, publishers)?)
                }
            };
            let Some(published) = chosen else { continue };
            let log = message.header.log_time;
            let first = *self.first_log.get_or_insert(log);
            let since = Duration::from_nanos(log.saturating_sub(first));
            if self.options.start.is_some_and(|s| since < s) {
                continue;
            }
            if self.options.end.is_some_and(|e| since > e) {
                return Ok(false);
            }
            if let Some(late) = self.pace(log) {
                pacing.add(late);
            }
            let publisher = publishers.get_mut(published.as_str()).expect("created with its channel");
            send(publisher, published, &message.data, self.stop)?;
            self.stats.frames.fetch_add(1, Relaxed);
            self.stats.bytes.fetch_add(message.data.len() as u64, Relaxed);
        }
        Ok(true)
    }

    /// Whether channel `id` is replayed, as what; its publisher made.
    fn choose(
        &self,
        stream: &mcap::read::RawMessageStream<'_>,
        id: u16,
        path: &Path,
        client: &Client,
        publishers: &mut HashMap<String, Publisher>,
    ) -> Result<Option<String>, ReplayError> {
        let Some(channel) = stream.get_channel(id) else { return Ok(None) };
        if channel.message_encoding != MESSAGE_ENCODING {
            return Ok(None);
        }
        let recorded = channel.topic.clone();
        if !self.options.patterns.iter().any(|p| p.matches(&recorded)) {
            return Ok(None);
        }
        let config = recorded_config(&channel.metadata)
            .ok_or_else(|| ReplayError::NoGeometry { path: path.to_owned(), topic: recorded.clone() })?;
        let published = self.options.renames.get(&recorded).cloned().unwrap_or_else(|| recorded.clone());
        if !publishers.contains_key(&published) {
            let publisher = client
                .publisher(&published, &config)
                .map_err(|source| ReplayError::Publish { stream: published.clone(), source })?;
            tracing::info!(stream = published, recorded, "replaying");
            self.stats.streams.fetch_add(1, Relaxed);
            publishers.insert(published.clone(), publisher);
        }
        Ok(Some(published))
    }

    /// Waits until the frame logged at `log` is due; how late it is then.
    fn pace(&mut self, log: u64) -> Option<Duration> {
        let rate = self.options.rate?;
        let (base, base_log) = *self.base.get_or_insert((Instant::now(), log));
        let due = base + Duration::from_secs_f64(log.saturating_sub(base_log) as f64 / 1e9 / rate);
        // Sleep most of the way, then spin: the scheduler's wake-up is
        // late by tens of microseconds.
        loop {
            let now = Instant::now();
            let Some(left) = due.checked_duration_since(now) else { break };
            if self.stop.load(Relaxed) {
                break;
            }
            if left > Duration::from_micros(300) {
                std::thread::sleep(left - Duration::from_micros(200));
            } else {
                std::hint::spin_loop();
            }
        }
        Some(Instant::now().saturating_duration_since(due))
    }
}

/// Publishes `data` through a loan, waiting as long as lossless
/// subscribers make it (until a stop).
fn send(publisher: &mut Publisher, stream: &str, data: &[u8], stop: &AtomicBool) -> Result<(), ReplayError> {
    let err = |source| ReplayError::Send { stream: stream.to_owned(), source };
    let mut loan = publisher.loan().map_err(|e| err(e.into()))?;
    let capacity = loan.capacity();
    if data.len() > capacity {
        return Err(err(SendError::TooLarge { len: data.len(), slot_size: capacity }));
    }
    loan.as_mut_slice()[..data.len()].copy_from_slice(data);
    loan.set_len(data.len());
    loop {
        match loan.try_send_timeout(Duration::from_millis(100)) {
            Ok(_) => return Ok(()),
            Err(memsock::Unsent { sample, error: SendError::Timeout }) if !stop.load(Relaxed) => loan = sample,
            Err(memsock::Unsent { error, .. }) => return Err(err(error)),
        }
    }
}
