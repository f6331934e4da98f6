//! The host: runs a plugin against a broker from one thread.
//!
//! One thread polls every stream the plugin follows (`try_recv`, a few
//! loads each when nothing is queued) and runs the plugin's hooks; async
//! hooks run on a current-thread tokio runtime of that thread. When a
//! whole round finds nothing, the thread backs off: spinning, then
//! yielding, then sleeping from 50 µs up to [`HostOptions::max_idle_sleep`]
//! — so a plugin following a hundred idle streams costs one thread a
//! thousand short looks a second, and a frame after a quiet spell waits at
//! most that sleep. Publishers pay nothing for it: the host never parks on
//! a subscriber's futex, so they never wake it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use memsock::{Client, ClientError, Subscriber, TryRecvError, Watch, WatchEvent};

use crate::{Delivery, FrameMeta, MAX_IDLE_SLEEP, Plugin, PluginError, PublisherChange, StreamId, StreamOpened};

/// How the host runs.
#[derive(Debug, Clone, Copy)]
pub struct HostOptions {
    /// How often [`Plugin::tick`] runs (and [`Host::health`] is updated).
    pub tick: Duration,
    /// The longest idle sleep between looks at the streams.
    pub max_idle_sleep: Duration,
    /// Most frames taken from one stream before looking at the next.
    pub batch: u32,
}

impl Default for HostOptions {
    fn default() -> Self {
        Self { tick: Duration::from_millis(250), max_idle_sleep: MAX_IDLE_SLEEP, batch: 256 }
    }
}

/// Why the host stopped other than by being asked to.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// A request to the broker failed (subscribing to the patterns).
    #[error("broker: {0}")]
    Broker(#[from] ClientError),
    /// A hook of the plugin failed.
    #[error("the plugin failed: {0}")]
    Plugin(#[from] PluginError),
    /// The host's runtime or thread could not be started.
    #[error("cannot start the host: {0}")]
    Start(#[source] std::io::Error),
    /// The host's thread panicked (in a plugin hook).
    #[error("the host's thread panicked")]
    Panicked,
}

/// One followed stream, as the host counts it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamHealth {
    /// Stream name.
    pub name: String,
    /// Credits its subscriber got.
    pub credits: u32,
    /// Frames delivered to the plugin.
    pub frames: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Frames lost upstream of the plugin (sequence gaps its subscriber saw).
    pub gaps: u64,
    /// Times the plugin handed a frame back ([`Delivery::Busy`]).
    pub busy: u64,
    /// The stream ended (closed, or its subscriber detached).
    pub closed: bool,
}

/// What the host reports of its plugin.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// Every stream followed in this run, by [`StreamId`].
    pub streams: Vec<StreamHealth>,
    /// Subscriptions to matching streams the broker refused.
    pub refused: u64,
    /// The host is running (false once it stopped).
    pub running: bool,
    /// Why it stopped, if it failed.
    pub failure: Option<String>,
    /// Polling rounds that found nothing (idle looks).
    pub idle_rounds: u64,
}

impl Health {
    /// Frames delivered, all streams.
    pub fn frames(&self) -> u64 {
        self.streams.iter().map(|s| s.frames).sum()
    }

    /// Bytes delivered, all streams.
    pub fn bytes(&self) -> u64 {
        self.streams.iter().map(|s| s.bytes).sum()
    }

    /// Frames lost upstream, all streams.
    pub fn gaps(&self) -> u64 {
        self.streams.iter().map(|s| s.gaps).sum()
    }
}

/// Runs a plugin against a broker. See the [module docs](self).
pub struct Host<P> {
    client: Client,
    plugin: P,
    options: HostOptions,
    stop: Arc<AtomicBool>,
    health: Arc<Mutex<Health>>,
    on_ready: Option<Box<dyn FnOnce() + Send>>,
}

impl<P: std::fmt::Debug> std::fmt::Debug for Host<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").field("plugin", &self.plugin).field("options", &self.options).finish_non_exhaustive()
    }
}

/// Asks a running host to stop (from any thread, or a signal handler's
/// task): it delivers what every stream had queued then — at most its
/// credits' worth, without waiting for more — calls [`Plugin::shutdown`]
/// and returns. A lossless publisher's frames, once sent, are recorded.
#[derive(Debug, Clone)]
pub struct StopHandle(Arc<AtomicBool>);

impl StopHandle {
    /// Asks the host to stop.
    pub fn stop(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The sleep between looks while the plugin holds a stream back.
const BLOCKED_SLEEP: Duration = Duration::from_micros(20);
/// A listing asked for as the host stops, for its answer only (see
/// `poll_loop`).
const STOP_BARRIER: &str = "memsock/host/stop";
/// The longest a stopping host waits for its plugin to take what was queued.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// What a look at one stream found.
enum Poll {
    /// Frames or news.
    Progress,
    /// Nothing.
    Idle,
    /// The plugin holds it back.
    Blocked,
}

/// A followed stream.
struct Followed {
    id: StreamId,
    /// Frames still to deliver once stopping (see [`StopHandle`]).
    drain: u32,
    subscriber: Subscriber,
    /// The frame the plugin handed back, offered first next time.
    held: Option<(FrameMeta, memsock::OwnedSample)>,
    /// The sequence number expected next.
    next_seq: Option<u64>,
    health: StreamHealth,
}

impl<P: Plugin> Host<P> {
    /// A host for `plugin` on `client`'s connection.
    pub fn new(client: Client, plugin: P, options: HostOptions) -> Self {
        Self { client, plugin, options, stop: Arc::default(), health: Arc::default(), on_ready: None }
    }

    /// Calls `ready` (on the host's thread) once the plugin's patterns are
    /// subscribed: every matching stream created from then on is followed
    /// from its first frame.
    pub fn on_ready(mut self, ready: impl FnOnce() + Send + 'static) -> Self {
        self.on_ready = Some(Box::new(ready));
        self
    }

    /// A handle that stops the host.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.stop.clone())
    }

    /// The host's health as of its last tick, readable from any thread.
    pub fn health(&self) -> Arc<Mutex<Health>> {
        self.health.clone()
    }

    /// Runs the plugin on a thread of its own until stopped, the broker
    /// goes away or a hook fails; then gives the plugin back, shut down.
    ///
    /// # Errors
    /// [`HostError`]: the plugin is gone with it.
    pub async fn run(self) -> Result<(P, Health), HostError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("memsock-plugin".into())
            .spawn(move || {
                let _ = tx.send(self.run_blocking());
            })
            .map_err(HostError::Start)?;
        rx.await.map_err(|_| HostError::Panicked)?
    }

    /// [`run`](Self::run) on the calling thread.
    ///
    /// # Errors
    /// As [`run`](Self::run).
    pub fn run_blocking(mut self) -> Result<(P, Health), HostError> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(HostError::Start)?;
        let result = self.poll_loop(&rt);
        let shutdown = rt.block_on(self.plugin.shutdown());
        let health = {
            let mut h = self.health.lock().unwrap_or_else(PoisonError::into_inner);
            h.running = false;
            if let Err(e) = &result {
                h.failure = Some(e.to_string());
            }
            h.clone()
        };
        result?;
        shutdown?;
        Ok((self.plugin, health))
    }

    fn poll_loop(&mut self, rt: &tokio::runtime::Runtime) -> Result<(), HostError> {
        let watches: Vec<Watch> = self
            .plugin
            .interests()
            .iter()
            .map(|i| self.client.subscribe_pattern(&i.pattern, &i.options))
            .collect::<Result<_, _>>()?;
        let mut streams: Vec<Followed> = Vec::new();
        let mut health = Health { running: true, ..Health::default() };
        if let Some(ready) = self.on_ready.take() {
            ready();
        }
        let mut next_tick = Instant::now() + self.options.tick;
        let mut idle = 0u32;
        while !self.stop.load(Ordering::Relaxed) {
            let mut progress = false;
            for watch in &watches {
                match self.take_news(rt, watch, &mut streams, &mut health) {
                    Ok(news) => progress |= news,
                    // The broker went away: nothing more will come.
                    Err(HostError::Broker(ClientError::Disconnected(why))) => {
                        tracing::info!("the broker's connection ended: {why}");
                        self.publish_health(&streams, &mut health);
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                }
            }
            let mut blocked = false;
            for s in streams.iter_mut().filter(|s| !s.health.closed) {
                match self.poll_stream(rt, s, self.options.batch)? {
                    Poll::Progress => progress = true,
                    Poll::Blocked => blocked = true,
                    Poll::Idle => {}
                }
            }
            if Instant::now() >= next_tick {
                next_tick = Instant::now() + self.options.tick;
                self.publish_health(&streams, &mut health);
                rt.block_on(self.plugin.tick(&health))?;
            }
            if progress {
                idle = 0;
            } else {
                health.idle_rounds += 1;
                self.plugin.idle();
                idle = idle.saturating_add(1);
                self.back_off(idle, blocked);
            }
        }
        // Streams attached before the stop whose news is still on its way:
        // a request's answer comes after every event sent before it.
        if self.client.list(STOP_BARRIER).is_ok() {
            for watch in &watches {
                self.take_news(rt, watch, &mut streams, &mut health)?;
            }
        }
        self.drain(rt, &mut streams)?;
        self.publish_health(&streams, &mut health);
        Ok(())
    }

    /// Once stopping: delivers what each stream had queued — at most its
    /// credits' worth (all a queue can hold), so that a publisher still
    /// sending cannot keep the host from stopping — and what the plugin
    /// handed back, for as long as the plugin takes frames.
    fn drain(&mut self, rt: &tokio::runtime::Runtime, streams: &mut [Followed]) -> Result<(), HostError> {
        for s in streams.iter_mut() {
            s.drain = s.subscriber.credits();
        }
        let deadline = Instant::now() + DRAIN_LIMIT;
        let mut idle = 0u32;
        loop {
            let (mut progress, mut blocked) = (false, false);
            for s in streams.iter_mut().filter(|s| !s.health.closed && (s.drain > 0 || s.held.is_some())) {
                let before = s.health.frames;
                let poll = self.poll_stream(rt, s, s.drain.min(self.options.batch))?;
                let delivered = u32::try_from(s.health.frames - before).unwrap_or(u32::MAX);
                s.drain = s.drain.saturating_sub(delivered);
                match poll {
                    Poll::Progress => progress = true,
                    Poll::Blocked => blocked = true,
                    // Nothing queued: done with it.
                    Poll::Idle => s.drain = 0,
                }
            }
            if !(progress || blocked) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                tracing::warn!("stopping without the frames the plugin did not take within {DRAIN_LIMIT:?}");
                return Ok(());
            }
            idle = if progress { 0 } else { idle.saturating_add(1) };
            if idle > 0 {
                self.back_off(idle, true);
            }
        }
    }

    /// Takes a watch's news: new subscribers become followed streams.
    fn take_news(
        &mut self,
        rt: &tokio::runtime::Runtime,
        watch: &Watch,
        streams: &mut Vec<Followed>,
        health: &mut Health,
    ) -> Result<bool, HostError> {
        let mut any = false;
        while let Some(event) = watch.try_next()? {
            any = true;
            match event {
                WatchEvent::Subscribed { subscriber, config, publisher_attached } => {
                    let id = StreamId(streams.len() as u32);
                    let opened = StreamOpened {
                        id,
                        name: subscriber.stream().to_owned(),
                        config,
                        credits: subscriber.credits(),
                        publisher_attached,
                    };
                    tracing::info!(stream = opened.name, credits = opened.credits, "following");
                    let health =
                        StreamHealth { name: opened.name.clone(), credits: opened.credits, ..Default::default() };
                    let next_seq = Some(subscriber.first_seq());
                    streams.push(Followed { id, subscriber, drain: 0, held: None, next_seq, health });
                    rt.block_on(self.plugin.stream_opened(&opened))?;
                }
                WatchEvent::SubscribeFailed { stream, error } => {
                    health.refused += 1;
                    rt.block_on(self.plugin.stream_refused(&stream, &error))?;
                }
                _ => {}
            }
        }
        Ok(any)
    }

    /// Delivers what one stream has queued, up to `batch` frames.
    fn poll_stream(&mut self, rt: &tokio::runtime::Runtime, s: &mut Followed, batch: u32) -> Result<Poll, HostError> {
        if let Some((meta, frame)) = s.held.take() {
            if !self.offer(s, meta, frame) {
                return Ok(Poll::Blocked);
            }
        }
        let mut any = false;
        for _ in 0..batch {
            let got = s.subscriber.try_recv().map(|sample| (sample.seq(), sample.timestamp_ns(), sample.detach()));
            match got {
                Ok((seq, publish_ns, frame)) => {
                    any = true;
                    let gap = s.next_seq.map_or(0, |n| seq.saturating_sub(n));
                    s.next_seq = Some(seq + 1);
                    s.health.gaps += gap;
                    let meta = FrameMeta { stream: s.id, seq, gap, publish_ns, receive_ns: memsock::now_ns() };
                    if !self.offer(s, meta, frame) {
                        return Ok(Poll::Blocked);
                    }
                }
                Err(TryRecvError::Empty) => break,
                // Every credit is held by the plugin: waiting for it.
                Err(TryRecvError::CreditsExhausted { .. }) => {
                    return Ok(if any { Poll::Progress } else { Poll::Blocked });
                }
                Err(TryRecvError::PublisherGone) => {
                    any = true;
                    rt.block_on(self.plugin.publisher_changed(s.id, PublisherChange::Gone))?;
                }
                Err(TryRecvError::PublisherBack) => {
                    any = true;
                    rt.block_on(self.plugin.publisher_changed(s.id, PublisherChange::Back))?;
                }
                Err(e) => {
                    any = true;
                    tracing::info!(stream = s.health.name, "stream ended: {e}");
                    s.health.closed = true;
                    rt.block_on(self.plugin.stream_closed(s.id))?;
                    break;
                }
            }
        }
        Ok(if any { Poll::Progress } else { Poll::Idle })
    }

    /// Offers a frame to the plugin; false if it handed it back.
    #[inline]
    fn offer(&mut self, s: &mut Followed, meta: FrameMeta, frame: memsock::OwnedSample) -> bool {
        let len = frame.len() as u64;
        match self.plugin.frame(meta, frame) {
            Delivery::Taken => {
                s.health.frames += 1;
                s.health.bytes += len;
                true
            }
            Delivery::Busy(frame) => {
                s.health.busy += 1;
                s.held = Some((meta, frame));
                false
            }
        }
    }

    fn publish_health(&self, streams: &[Followed], health: &mut Health) {
        health.streams = streams.iter().map(|s| s.health.clone()).collect();
        *self.health.lock().unwrap_or_else(PoisonError::into_inner) = health.clone();
    }

    /// After `idle` empty rounds: spin, then yield, then sleep longer and
    /// longer, up to the most the options allow. While the plugin itself
    /// holds a stream back (`blocked`: it handed a frame back, or holds
    /// every credit) it will let go soon: short sleeps only.
    fn back_off(&self, idle: u32, blocked: bool) {
        match idle {
            0..64 => std::hint::spin_loop(),
            64..128 => std::thread::yield_now(),
            _ if blocked => std::thread::sleep(BLOCKED_SLEEP),
            n => {
                let step = (n - 128).min(10);
                let sleep = Duration::from_micros(50 << step).min(self.options.max_idle_sleep);
                std::thread::sleep(sleep);
            }
        }
    }
}
