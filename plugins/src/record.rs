//! The recorder: live streams into MCAP files.
//!
//! One MCAP channel per stream (topic = the stream's name, message
//! encoding `memsock.raw`, no schema), its configuration in the channel's
//! metadata; each frame one message whose bytes are the frame's, log time
//! the time the recorder took it and publish time the frame's own stamp
//! (both as Unix-epoch nanoseconds: the monotonic clock plus the offset
//! recorded in the file's `memsock.recording` metadata, so the original
//! stamps are recoverable exactly), and MCAP's 32-bit sequence the low half
//! of memsock's (see [`crate::mcap_seq`]).
//!
//! The events channel ([`EVENTS_TOPIC`], JSON) records, in order with the
//! frames: `seq_high`, `publisher_gone`, `publisher_back`, `closed`, and
//! `gap` before a frame that follows lost ones (`before_seq`; or
//! `after_seq` for those lost after a stream's last recorded frame, when
//! it ends or the recording stops), split by cause:
//! `upstream` (its subscriber's sequence gaps: frames the recorder was
//! never given) and `recorder` (frames it was given and could not take,
//! its queue full because the disk is slow — always 0 for a lossless
//! recorder, which slows the publisher down instead).
//!
//! Frames are held, not copied, until the writer thread has put them in
//! the file: memory is bounded by the credits of the recorder's
//! subscribers times the slot size plus a fixed amount, whatever the disk.
//! Chunks are written in place (the file is seeked back to complete their
//! header), so a recorder killed outright leaves a file whose complete
//! chunks a streaming reader reads; a stop by signal finishes the file
//! (summary and index).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use memsock::{OverflowPolicy, StreamConfig, SubscribeOptions, WaitStrategy};
use serde_json::json;

pub use crate::mcap_seq::EVENTS_TOPIC;
use crate::mcap_seq::{SeqSplitter, low};
use crate::{
    Delivery, FileError, FrameMeta, Health, Interest, OwnedSample, Plugin, PluginError, PublisherChange, StreamId,
    StreamOpened, async_trait,
};

/// The message encoding of recorded frames: their bytes as sent.
pub const MESSAGE_ENCODING: &str = "memsock.raw";

/// The name of the metadata record each finished file ends with.
pub const METADATA_NAME: &str = "memsock.recording";

/// How the recorder subscribes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordPolicy {
    /// Every frame: a slow disk slows the publishers down.
    Lossless,
    /// The newest frames: a slow disk costs frames, counted.
    KeepLatest,
}

/// Compression of the chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordCompression {
    /// None.
    None,
    /// LZ4 (fast).
    Lz4,
    /// Zstandard.
    Zstd,
}

impl RecordCompression {
    fn mcap(self) -> Option<mcap::Compression> {
        match self {
            Self::None => None,
            Self::Lz4 => Some(mcap::Compression::Lz4),
            Self::Zstd => Some(mcap::Compression::Zstd),
        }
    }
}

/// What to record, and how.
#[derive(Debug, Clone)]
pub struct RecordOptions {
    /// Stream-name patterns.
    pub patterns: Vec<String>,
    /// Lossless or keep-latest.
    pub policy: RecordPolicy,
    /// Credits per stream, at most (a busy pool may give fewer).
    pub credits: u32,
    /// The file, or with splitting the pattern of the files: `out.mcap`
    /// becomes `out-00000.mcap`, `out-00001.mcap`, ...
    pub output: PathBuf,
    /// Start a new file once this many bytes are written.
    pub split_size: Option<u64>,
    /// Start a new file after this long.
    pub split_duration: Option<Duration>,
    /// Chunk compression.
    pub compression: RecordCompression,
    /// Uncompressed bytes per chunk, about.
    pub chunk_size: u64,
    /// Write at most this many bytes a second (to test with a slow disk,
    /// or to spare one).
    pub throttle: Option<u64>,
    /// Replace files that exist (else refuse them: a recording is never
    /// written over by mistake).
    pub overwrite: bool,
    /// Record the frames a stream keeps for late joiners (its history)
    /// before the live ones: a recording started late still holds the
    /// last state. On by default.
    pub history: bool,
}

impl RecordOptions {
    /// Recording `patterns` into `output`, lossless, 64 credits, one file,
    /// no compression.
    pub fn new(patterns: Vec<String>, output: impl Into<PathBuf>) -> Self {
        Self {
            patterns,
            policy: RecordPolicy::Lossless,
            credits: 64,
            output: output.into(),
            split_size: None,
            split_duration: None,
            compression: RecordCompression::None,
            chunk_size: 4 << 20,
            throttle: None,
            overwrite: false,
            history: true,
        }
    }

    fn splits(&self) -> bool {
        self.split_size.is_some() || self.split_duration.is_some()
    }

    /// The path of file number `n`.
    pub fn file_path(&self, n: u32) -> PathBuf {
        if !self.splits() {
            return self.output.clone();
        }
        let stem = self.output.file_stem().map_or_else(|| "recording".into(), |s| s.to_string_lossy().into_owned());
        let ext = self.output.extension().map_or_else(|| "mcap".into(), |s| s.to_string_lossy().into_owned());
        self.output.with_file_name(format!("{stem}-{n:05}.{ext}"))
    }
}

/// Why recording failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// A file could not be created or written.
    #[error(transparent)]
    File(#[from] FileError),
    /// The writer thread is gone (it failed; see its error).
    #[error("the recorder's writer thread stopped")]
    WriterGone,
}

/// The recorder's counters, shared with whoever shows progress.
#[derive(Debug, Default)]
pub struct RecordStats {
    /// Frames written.
    pub frames: AtomicU64,
    /// Their payload bytes.
    pub bytes: AtomicU64,
    /// Bytes in the files so far.
    pub file_bytes: AtomicU64,
    /// Frames lost upstream (sequence gaps of the recorder's subscribers).
    pub upstream_gaps: AtomicU64,
    /// Frames the recorder was given and could not take (keep-latest only).
    pub recorder_drops: AtomicU64,
    /// Streams recorded.
    pub streams: AtomicU64,
    /// The files written, in order.
    pub files: Mutex<Vec<PathBuf>>,
}

/// The recorder plugin. See the [module docs](self).
#[derive(Debug)]
pub struct Recorder {
    options: RecordOptions,
    tx: Option<SyncSender<Cmd>>,
    writer: Option<JoinHandle<Result<(), RecordError>>>,
    streams: Vec<Side>,
    stats: Arc<RecordStats>,
    upstream_gaps: u64,
    recorder_drops: u64,
}

/// The host side's view of a stream.
#[derive(Debug)]
struct Side {
    /// Frames handed to the writer and not yet written.
    in_flight: Arc<AtomicU32>,
    /// Most frames in flight before a keep-latest recorder drops.
    limit: u32,
    /// Lost upstream since the last frame handed over.
    upstream: u64,
    /// Dropped by the recorder since the last frame handed over.
    dropped: u64,
    /// Keep-latest: the newest frame, waiting for room in the queue.
    pending: Option<(FrameMeta, OwnedSample)>,
}

/// Hands a frame to the writer; gives it back if the queue is full.
fn hand_over(
    tx: &SyncSender<Cmd>,
    side: &mut Side,
    meta: FrameMeta,
    frame: OwnedSample,
) -> Result<(), (FrameMeta, OwnedSample)> {
    side.in_flight.fetch_add(1, Relaxed);
    let (upstream, dropped) = (side.upstream + meta.gap, side.dropped);
    match tx.try_send(Cmd::Frame { meta, frame, upstream, dropped }) {
        Ok(()) => {
            side.upstream = 0;
            side.dropped = 0;
            Ok(())
        }
        Err(TrySendError::Full(Cmd::Frame { meta, frame, .. })) => {
            side.in_flight.fetch_sub(1, Relaxed);
            Err((meta, frame))
        }
        // The writer failed: the next tick reports it.
        Err(_) => Ok(()),
    }
}

/// Hands a keep-latest stream's waiting frame over if there is room.
fn flush_pending(tx: &SyncSender<Cmd>, side: &mut Side) {
    if side.in_flight.load(Relaxed) >= side.limit {
        return;
    }
    if let Some((meta, frame)) = side.pending.take() {
        if let Err(back) = hand_over(tx, side, meta, frame) {
            side.pending = Some(back);
        }
    }
}

/// What the writer thread is told, in order.
enum Cmd {
    Open {
        id: StreamId,
        name: String,
        config: StreamConfig,
        credits: u32,
        in_flight: Arc<AtomicU32>,
    },
    Frame {
        meta: FrameMeta,
        frame: OwnedSample,
        upstream: u64,
        dropped: u64,
    },
    Event {
        id: StreamId,
        event: &'static str,
        at_ns: u64,
    },
    /// Frames lost after the last one handed over (the stream ended, or
    /// the recorder stops): recorded as a trailing gap.
    Tail {
        id: StreamId,
        upstream: u64,
        dropped: u64,
        at_ns: u64,
    },
}

/// Commands the writer's queue holds: beyond the credits of every stream
/// (which bound the frames), room for their events.
const QUEUE: usize = 1 << 16;

impl Recorder {
    /// A recorder; its first file is created now.
    ///
    /// # Errors
    /// [`RecordError::Io`] if the file cannot be created.
    pub fn new(options: RecordOptions) -> Result<Self, RecordError> {
        let (tx, rx) = sync_channel(QUEUE);
        let stats = Arc::new(RecordStats::default());
        let file = McapFile::create(&options, 0, &stats)?;
        let writer = {
            let (options, stats) = (options.clone(), stats.clone());
            let path = file.path.clone();
            std::thread::Builder::new()
                .name("memsock-record-writer".into())
                .spawn(move || Writer::new(options, stats, file).run(&rx))
                .map_err(|source| RecordError::File(FileError::Io { path, source }))?
        };
        Ok(Self {
            options,
            tx: Some(tx),
            writer: Some(writer),
            streams: Vec::new(),
            stats,
            upstream_gaps: 0,
            recorder_drops: 0,
        })
    }

    /// The counters.
    pub fn stats(&self) -> Arc<RecordStats> {
        self.stats.clone()
    }

    fn send(&self, cmd: Cmd) -> Result<(), PluginError> {
        let tx = self.tx.as_ref().ok_or_else(|| PluginError::new("the recorder has finished"))?;
        tx.send(cmd).map_err(|_| PluginError::new(RecordError::WriterGone))
    }

    /// Hands the writer stream `id`'s waiting frame, however full its
    /// queue, then what the stream lost since (it ends, or the recording).
    fn flush_losses(&mut self, id: StreamId) -> Result<(), PluginError> {
        let Some(side) = self.streams.get_mut(id.0 as usize) else { return Ok(()) };
        if let Some((meta, frame)) = side.pending.take() {
            side.in_flight.fetch_add(1, Relaxed);
            let (upstream, dropped) =
                (std::mem::take(&mut side.upstream) + meta.gap, std::mem::take(&mut side.dropped));
            self.send(Cmd::Frame { meta, frame, upstream, dropped })?;
        }
        let Some(side) = self.streams.get_mut(id.0 as usize) else { return Ok(()) };
        let (upstream, dropped) = (std::mem::take(&mut side.upstream), std::mem::take(&mut side.dropped));
        if upstream == 0 && dropped == 0 {
            return Ok(());
        }
        self.send(Cmd::Tail { id, upstream, dropped, at_ns: memsock::now_ns() })
    }

    /// The writer's failure, once it has stopped.
    fn writer_failure(&mut self) -> PluginError {
        match self.writer.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => PluginError::new(e),
            Some(Err(_)) => PluginError::new("the recorder's writer thread panicked"),
            _ => PluginError::new(RecordError::WriterGone),
        }
    }
}

#[async_trait]
impl Plugin for Recorder {
    fn interests(&self) -> Vec<Interest> {
        let policy = match self.options.policy {
            RecordPolicy::Lossless => OverflowPolicy::Lossless,
            RecordPolicy::KeepLatest => OverflowPolicy::KeepLatest,
        };
        let options = SubscribeOptions {
            credits: self.options.credits,
            policy,
            // The host polls; nothing parks on the subscriber's word.
            wait: WaitStrategy::Park,
            wait_for_stream: true,
            credits_up_to: true,
            history: if self.options.history { u32::MAX } else { 0 },
        };
        self.options.patterns.iter().map(|p| Interest { pattern: p.clone(), options }).collect()
    }

    async fn stream_opened(&mut self, stream: &StreamOpened) -> Result<(), PluginError> {
        let in_flight = Arc::new(AtomicU32::new(0));
        // A keep-latest recorder leaves half its credits to its queue in
        // shared memory, so a slow disk costs frames here (counted as the
        // recorder's) before the data plane would drop any.
        let limit = (stream.credits / 2).max(1);
        debug_assert_eq!(stream.id.0 as usize, self.streams.len());
        self.streams.push(Side { in_flight: in_flight.clone(), limit, upstream: 0, dropped: 0, pending: None });
        self.stats.streams.fetch_add(1, Relaxed);
        let (id, name, config, credits) = (stream.id, stream.name.clone(), stream.config, stream.credits);
        self.send(Cmd::Open { id, name, config, credits, in_flight })
    }

    fn frame(&mut self, meta: FrameMeta, frame: OwnedSample) -> Delivery {
        let Some(tx) = &self.tx else { return Delivery::Taken };
        let Some(side) = self.streams.get_mut(meta.stream.0 as usize) else { return Delivery::Taken };
        if self.options.policy == RecordPolicy::Lossless {
            return match hand_over(tx, side, meta, frame) {
                Ok(()) => {
                    self.upstream_gaps += meta.gap;
                    Delivery::Taken
                }
                Err((_, frame)) => Delivery::Busy(frame),
            };
        }
        // Keep-latest: the newest frame waits for room, the one it
        // replaces is the recorder's drop.
        self.upstream_gaps += meta.gap;
        flush_pending(tx, side);
        let newest = if side.pending.is_none() && side.in_flight.load(Relaxed) < side.limit {
            match hand_over(tx, side, meta, frame) {
                Ok(()) => return Delivery::Taken,
                Err(back) => back,
            }
        } else {
            (meta, frame)
        };
        if let Some((old, _)) = side.pending.replace(newest) {
            side.upstream += old.gap;
            side.dropped += 1;
            self.recorder_drops += 1;
        }
        Delivery::Taken
    }

    fn idle(&mut self) {
        let Some(tx) = &self.tx else { return };
        for side in self.streams.iter_mut().filter(|s| s.pending.is_some()) {
            flush_pending(tx, side);
        }
    }

    async fn publisher_changed(&mut self, stream: StreamId, change: PublisherChange) -> Result<(), PluginError> {
        let event = match change {
            PublisherChange::Gone => "publisher_gone",
            PublisherChange::Back => "publisher_back",
        };
        self.send(Cmd::Event { id: stream, event, at_ns: memsock::now_ns() })
    }

    async fn stream_closed(&mut self, stream: StreamId) -> Result<(), PluginError> {
        self.flush_losses(stream)?;
        self.send(Cmd::Event { id: stream, event: "closed", at_ns: memsock::now_ns() })
    }

    async fn tick(&mut self, _health: &Health) -> Result<(), PluginError> {
        self.stats.upstream_gaps.store(self.upstream_gaps, Relaxed);
        self.stats.recorder_drops.store(self.recorder_drops, Relaxed);
        if self.writer.as_ref().is_some_and(JoinHandle::is_finished) {
            return Err(self.writer_failure());
        }
        Ok(())
    }

    async fn shutdown(&mut self) -> Result<(), PluginError> {
        self.stats.upstream_gaps.store(self.upstream_gaps, Relaxed);
        self.stats.recorder_drops.store(self.recorder_drops, Relaxed);
        // The writer writes what is queued, then finishes the file.
        for id in 0..self.streams.len() {
            self.flush_losses(StreamId(id as u32))?;
        }
        drop(self.tx.take());
        match self.writer.take().map(JoinHandle::join) {
            Some(Ok(Ok(()))) | None => Ok(()),
            Some(Ok(Err(e))) => Err(PluginError::new(e)),
            Some(Err(_)) => Err(PluginError::new("the recorder's writer thread panicked")),
        }
    }
}

/// A file being written, with what it has been told about.
struct McapFile {
    path: PathBuf,
    mcap: mcap::Writer<BufWriter<Counted>>,
    started: Instant,
    events: u16,
    /// MCAP channel of each stream, by [`StreamId`].
    channels: Vec<Option<u16>>,
    /// How far the file reaches (written by the [`Counted`] under the
    /// MCAP writer, which keeps it out of reach).
    end: Arc<AtomicU64>,
    /// Of that, what is counted in the stats.
    counted: u64,
}

impl McapFile {
    fn create(options: &RecordOptions, n: u32, stats: &Arc<RecordStats>) -> Result<Self, RecordError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = options.file_path(n);
        let io = |source| FileError::Io { path: path.clone(), source };
        // Owner-only, as the streams it records.
        let mut open = std::fs::OpenOptions::new();
        if options.overwrite {
            open.create(true).truncate(true);
        } else {
            open.create_new(true);
        }
        let file = open.write(true).mode(0o600).open(&path).map_err(io)?;
        let end = Arc::new(AtomicU64::new(0));
        let counted = Counted { file, position: 0, end: end.clone(), throttle: options.throttle.map(Throttle::new) };
        let write_options = mcap::WriteOptions::new()
            .compression(options.compression.mcap())
            .chunk_size(Some(options.chunk_size))
            .profile("memsock")
            .library(concat!("memsock-plugins ", env!("CARGO_PKG_VERSION")))
            // Every chunk has its CRC; one more pass over the whole data
            // section (a second read of every frame) buys readers nothing.
            .calculate_data_section_crc(false);
        let mcap_err = |source| FileError::Mcap { path: path.clone(), source };
        let mut mcap = write_options.create(BufWriter::with_capacity(256 << 10, counted)).map_err(mcap_err)?;
        let events = mcap.add_channel(0, EVENTS_TOPIC, "json", &BTreeMap::new()).map_err(mcap_err)?;
        stats.files.lock().unwrap_or_else(PoisonError::into_inner).push(path.clone());
        tracing::info!(path = %path.display(), "recording");
        Ok(Self { path, mcap, started: Instant::now(), events, channels: Vec::new(), end, counted: 0 })
    }

    fn err(&self) -> impl Fn(mcap::McapError) -> RecordError + '_ {
        |source| RecordError::File(FileError::Mcap { path: self.path.clone(), source })
    }

    /// Bytes in the file so far (not those still in the buffer above it).
    fn len(&self) -> u64 {
        self.end.load(Relaxed)
    }
}

/// The writer thread's state.
struct Writer {
    options: RecordOptions,
    stats: Arc<RecordStats>,
    file: McapFile,
    files: u32,
    streams: Vec<Option<Recorded>>,
    /// Monotonic to Unix-epoch nanoseconds.
    offset_ns: u64,
}

/// A stream as the writer knows it.
struct Recorded {
    name: String,
    config: StreamConfig,
    credits: u32,
    in_flight: Arc<AtomicU32>,
    seq: SeqSplitter,
    frames: u64,
    upstream: u64,
    dropped: u64,
    /// The last frame's sequence number.
    last_seq: Option<u64>,
}

impl Writer {
    fn new(options: RecordOptions, stats: Arc<RecordStats>, file: McapFile) -> Self {
        let realtime = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let offset_ns = (realtime.as_nanos() as u64).saturating_sub(memsock::now_ns());
        Self { options, stats, file, files: 1, streams: Vec::new(), offset_ns }
    }

    fn run(mut self, rx: &Receiver<Cmd>) -> Result<(), RecordError> {
        let result = self.write_all(rx);
        // Frames still queued (after a failure) go back to their streams.
        let _ = rx.try_iter().count();
        let finished = self.finish_file();
        result.and(finished)
    }

    fn write_all(&mut self, rx: &Receiver<Cmd>) -> Result<(), RecordError> {
        while let Some(cmd) = next_command(rx) {
            match cmd {
                Cmd::Open { id, name, config, credits, in_flight } => {
                    let i = id.0 as usize;
                    if self.streams.len() <= i {
                        self.streams.resize_with(i + 1, || None);
                    }
                    let recorded = Recorded {
                        name,
                        config,
                        credits,
                        in_flight,
                        seq: SeqSplitter::default(),
                        frames: 0,
                        upstream: 0,
                        dropped: 0,
                        last_seq: None,
                    };
                    self.streams[i] = Some(recorded);
                    self.channel(id)?;
                }
                Cmd::Frame { meta, frame, upstream, dropped } => {
                    self.maybe_split()?;
                    let written = self.write_frame(meta, &frame, upstream, dropped);
                    drop(frame);
                    if let Some(s) = self.streams.get(meta.stream.0 as usize).and_then(Option::as_ref) {
                        s.in_flight.fetch_sub(1, Relaxed);
                    }
                    written?;
                }
                Cmd::Event { id, event, at_ns } => {
                    self.event(id, at_ns, json!({ "event": event }))?;
                }
                Cmd::Tail { id, upstream, dropped, at_ns } => {
                    let Some(s) = self.streams.get_mut(id.0 as usize).and_then(Option::as_mut) else { continue };
                    s.upstream += upstream;
                    s.dropped += dropped;
                    let after = s.last_seq;
                    let gap = json!({ "event": "gap", "after_seq": after, "upstream": upstream, "recorder": dropped });
                    self.event(id, at_ns, gap)?;
                }
            }
        }
        Ok(())
    }

    /// The MCAP channel of stream `id` in the current file, added at first use.
    fn channel(&mut self, id: StreamId) -> Result<u16, RecordError> {
        let i = id.0 as usize;
        if let Some(Some(channel)) = self.file.channels.get(i) {
            return Ok(*channel);
        }
        let s = self.streams.get(i).and_then(Option::as_ref).ok_or(RecordError::WriterGone)?;
        let c = s.config;
        let metadata: BTreeMap<String, String> = [
            ("slot_size", c.slot_size.to_string()),
            ("slot_count", c.slot_count.to_string()),
            ("max_subscribers", c.max_subscribers.to_string()),
            ("queue_capacity", c.queue_capacity.to_string()),
            ("timestamps", c.timestamps.to_string()),
            ("publisher_loans", c.publisher_loans.to_string()),
            ("recorder_credits", s.credits.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let name = s.name.clone();
        let channel = self.file.mcap.add_channel(0, &name, MESSAGE_ENCODING, &metadata).map_err(self.file.err())?;
        if self.file.channels.len() <= i {
            self.file.channels.resize(i + 1, None);
        }
        self.file.channels[i] = Some(channel);
        Ok(channel)
    }

    fn write_frame(&mut self, meta: FrameMeta, frame: &[u8], upstream: u64, dropped: u64) -> Result<(), RecordError> {
        let channel = self.channel(meta.stream)?;
        if upstream > 0 || dropped > 0 {
            let gap = json!({ "event": "gap", "before_seq": meta.seq, "upstream": upstream, "recorder": dropped });
            self.event(meta.stream, meta.receive_ns, gap)?;
        }
        let s = self.streams[meta.stream.0 as usize].as_mut().ok_or(RecordError::WriterGone)?;
        s.frames += 1;
        s.last_seq = Some(meta.seq);
        s.upstream += upstream;
        s.dropped += dropped;
        if let Some(high) = s.seq.high_to_record(meta.seq) {
            self.event(meta.stream, meta.receive_ns, json!({ "event": "seq_high", "high": high }))?;
        }
        let header = mcap::records::MessageHeader {
            channel_id: channel,
            sequence: low(meta.seq),
            log_time: meta.receive_ns + self.offset_ns,
            publish_time: if meta.publish_ns == 0 { 0 } else { meta.publish_ns + self.offset_ns },
        };
        self.file.mcap.write_to_known_channel(&header, frame).map_err(self.file.err())?;
        self.stats.frames.fetch_add(1, Relaxed);
        self.stats.bytes.fetch_add(frame.len() as u64, Relaxed);
        self.count_file_bytes();
        Ok(())
    }

    /// An event of stream `id` on the events channel.
    fn event(&mut self, id: StreamId, at_ns: u64, mut body: serde_json::Value) -> Result<(), RecordError> {
        let Some(s) = self.streams.get(id.0 as usize).and_then(Option::as_ref) else { return Ok(()) };
        body["stream"] = json!(s.name);
        let bytes = body.to_string();
        let header = mcap::records::MessageHeader {
            channel_id: self.file.events,
            sequence: 0,
            log_time: at_ns + self.offset_ns,
            publish_time: at_ns + self.offset_ns,
        };
        self.file.mcap.write_to_known_channel(&header, bytes.as_bytes()).map_err(self.file.err())
    }

    fn count_file_bytes(&mut self) {
        let end = self.file.len();
        let grown = end.saturating_sub(self.file.counted);
        if grown > 0 {
            self.file.counted = end;
            self.stats.file_bytes.fetch_add(grown, Relaxed);
        }
    }

    /// A new file if this one is big or old enough; no frame is lost: the
    /// next one goes to the new file.
    fn maybe_split(&mut self) -> Result<(), RecordError> {
        let big = self.options.split_size.is_some_and(|max| self.file.len() >= max);
        let old = self.options.split_duration.is_some_and(|max| self.file.started.elapsed() >= max);
        if !(big || old) {
            return Ok(());
        }
        self.finish_file()?;
        self.file = McapFile::create(&self.options, self.files, &self.stats)?;
        self.files += 1;
        for s in self.streams.iter_mut().flatten() {
            s.seq.reset();
        }
        Ok(())
    }

    /// Finishes the current file: its metadata (what was recorded, the
    /// clock offset), summary and index.
    fn finish_file(&mut self) -> Result<(), RecordError> {
        let streams: Vec<serde_json::Value> = self
            .streams
            .iter()
            .flatten()
            .map(|s| json!({ "stream": s.name, "frames": s.frames, "upstream_gaps": s.upstream, "recorder_drops": s.dropped }))
            .collect();
        let metadata = mcap::records::Metadata {
            name: METADATA_NAME.into(),
            metadata: BTreeMap::from([
                ("monotonic_to_epoch_offset_ns".to_owned(), self.offset_ns.to_string()),
                ("policy".to_owned(), format!("{:?}", self.options.policy)),
                ("streams".to_owned(), serde_json::Value::from(streams).to_string()),
            ]),
        };
        self.file.mcap.write_metadata(&metadata).map_err(self.file.err())?;
        self.file.mcap.finish().map_err(self.file.err())?;
        self.count_file_bytes();
        tracing::info!(path = %self.file.path.display(), "finished");
        Ok(())
    }
}

/// The writer's next command; `None` once the recorder has hung up. When
/// the queue is empty it naps a few times before blocking: small frames
/// then come in batches, and the host's send seldom has to wake it (a
/// futex wake per frame would cost more than writing the frame).
fn next_command(rx: &Receiver<Cmd>) -> Option<Cmd> {
    for nap in 0..WRITER_NAPS {
        match rx.try_recv() {
            Ok(cmd) => return Some(cmd),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => return None,
            Err(std::sync::mpsc::TryRecvError::Empty) if nap == 0 => std::thread::yield_now(),
            Err(std::sync::mpsc::TryRecvError::Empty) => std::thread::sleep(WRITER_NAP),
        }
    }
    rx.recv().ok()
}

/// Naps before the writer blocks on an empty queue, and their length.
const WRITER_NAPS: u32 = 20;
const WRITER_NAP: Duration = Duration::from_micros(50);

/// The file under the MCAP writer: counts its length, and throttles.
struct Counted {
    file: File,
    position: u64,
    end: Arc<AtomicU64>,
    throttle: Option<Throttle>,
}

/// The most one write call passes to the file. The MCAP writer hashes a
/// chunk's bytes after each write returns, as far as it wrote: a frame
/// written piece by piece is hashed while each piece is still in this
/// core's cache from the copy into the file, not read from memory again.
const WRITE_PIECE: usize = 256 << 10;

impl Write for Counted {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let buf = &buf[..buf.len().min(WRITE_PIECE)];
        if let Some(t) = &mut self.throttle {
            t.pace(buf.len() as u64);
        }
        let n = self.file.write(buf)?;
        self.position += n as u64;
        self.end.fetch_max(self.position, Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Seek for Counted {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.position = self.file.seek(pos)?;
        Ok(self.position)
    }
}

/// Paces writes to a rate.
struct Throttle {
    bytes_per_s: u64,
    start: Instant,
    written: u64,
}

impl Throttle {
    fn new(bytes_per_s: u64) -> Self {
        Self { bytes_per_s: bytes_per_s.max(1), start: Instant::now(), written: 0 }
    }

    fn pace(&mut self, n: u64) {
        self.written += n;
        let due = Duration::from_secs_f64(self.written as f64 / self.bytes_per_s as f64);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}
