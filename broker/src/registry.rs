//! What the broker knows: streams, who publishes and subscribes to them,
//! and the clients whose leases hold them. Synchronous and free of I/O:
//! every operation returns the messages to send, which the server routes.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use memsock_proto::control::{
    ControlError, Event, Reply, ServerMessage, StatsReport, StreamReport, SubscriberReport, valid_stream_name,
};
use memsock_proto::platform::MAX_FDS_PER_MESSAGE;
use memsock_proto::shm::{
    AddSubscriberError, StreamConfig, StreamSegment, StreamStats, SubscriberOpError, SubscriberOptions,
};

/// A client connection's id.
pub type ConnId = u64;

/// A message for one connection, with the descriptors that go with it.
#[derive(Debug)]
pub struct Outgoing {
    pub conn: ConnId,
    pub message: ServerMessage,
    pub fds: Vec<OwnedFd>,
}

impl Outgoing {
    pub fn reply(conn: ConnId, id: u64, result: Result<Reply, ControlError>, fds: Vec<OwnedFd>) -> Self {
        Self { conn, message: ServerMessage::Reply { id, result }, fds }
    }

    pub fn event(conn: ConnId, event: Event) -> Self {
        Self { conn, message: ServerMessage::Event(event), fds: Vec::new() }
    }
}

#[derive(Debug)]
struct Stream {
    segment: StreamSegment,
    publisher: Option<ConnId>,
    /// Subscription ids.
    subscribers: Vec<u64>,
    /// Counters a second ago and now, for rates.
    rates: Rates,
}

#[derive(Debug, Default)]
struct Rates {
    at: Option<Instant>,
    published: u64,
    bytes: u64,
    delivered: HashMap<u32, u64>,
    msgs_per_s: f64,
    bytes_per_s: f64,
    delivered_per_s: HashMap<u32, f64>,
}

#[derive(Debug)]
struct Subscription {
    stream: String,
    index: u32,
    conn: ConnId,
}

#[derive(Debug)]
struct Pending {
    conn: ConnId,
    id: u64,
    stream: String,
    options: SubscriberOptions,
}

#[derive(Debug)]
struct Client {
    pid: u32,
}

/// The broker's state.
#[derive(Debug, Default)]
pub struct Registry {
    streams: HashMap<String, Stream>,
    subscriptions: HashMap<u64, Subscription>,
    pending: Vec<Pending>,
    clients: HashMap<ConnId, Client>,
    next_subscription: u64,
    /// Closed streams whose publisher may still be attached, and when they
    /// were closed (see [`Registry::finish_closing`]).
    closing: Vec<(Instant, StreamSegment)>,
    shutting_down: bool,
}

fn segment_error(e: impl std::fmt::Display) -> ControlError {
    ControlError::Segment(e.to_string())
}

fn dup(fd: impl AsFd) -> Result<OwnedFd, ControlError> {
    fd.as_fd().try_clone_to_owned().map_err(segment_error)
}

impl Registry {
    /// A client completed its handshake.
    pub fn connect(&mut self, conn: ConnId, pid: u32) {
        self.clients.insert(conn, Client { pid });
    }

    /// Every connection, for a shutdown notice.
    pub fn connections(&self) -> Vec<ConnId> {
        self.clients.keys().copied().collect()
    }

    fn pid(&self, conn: ConnId) -> u32 {
        self.clients.get(&conn).map_or(0, |c| c.pid)
    }

    /// Connections that use `stream`: its subscribers', and its
    /// publisher's with `with_publisher`; each once.
    fn users(&self, stream: &Stream, with_publisher: bool) -> Vec<ConnId> {
        let mut conns: Vec<ConnId> =
            stream.subscribers.iter().filter_map(|s| self.subscriptions.get(s)).map(|s| s.conn).collect();
        if with_publisher {
            conns.extend(stream.publisher);
        }
        conns.sort_unstable();
        conns.dedup();
        conns
    }

    fn tell_subscribers(&self, stream: &Stream, event: &Event, out: &mut Vec<Outgoing>) {
        out.extend(self.users(stream, false).into_iter().map(|c| Outgoing::event(c, event.clone())));
    }

    /// `Publish`: creates the stream or hands it to a new publisher.
    pub fn publish(&mut self, conn: ConnId, id: u64, name: &str, config: &StreamConfig) -> Vec<Outgoing> {
        let mut out = Vec::new();
        let result = self.try_publish(conn, name, config, &mut out);
        let (result, fds) = match result {
            Ok((reply, fds)) => (Ok(reply), fds),
            Err(e) => (Err(e), Vec::new()),
        };
        // The publisher's reply before anything it caused reaches others.
        out.insert(0, Outgoing::reply(conn, id, result, fds));
        out
    }

    fn try_publish(
        &mut self,
        conn: ConnId,
        name: &str,
        config: &StreamConfig,
        out: &mut Vec<Outgoing>,
    ) -> Result<(Reply, Vec<OwnedFd>), ControlError> {
        if !valid_stream_name(name) {
            return Err(ControlError::InvalidName(name.into()));
        }
        if config.max_subscribers as usize >= MAX_FDS_PER_MESSAGE {
            return Err(ControlError::InvalidConfig(format!(
                "at most {} subscribers per stream through the broker, asked for {}",
                MAX_FDS_PER_MESSAGE - 1,
                config.max_subscribers
            )));
        }
        config.geometry().map_err(|e| ControlError::InvalidConfig(e.to_string()))?;
        let takeover = match self.streams.get_mut(name) {
            Some(stream) => {
                if let Some(other) = stream.publisher {
                    let pid = self.clients.get(&other).map_or(0, |c| c.pid);
                    return Err(ControlError::PublisherExists { stream: name.into(), pid });
                }
                let g = stream.segment.geometry();
                if (g.slot_size, g.slot_count) != (config.slot_size, config.slot_count) {
                    return Err(ControlError::GeometryMismatch {
                        stream: name.into(),
                        slot_size: g.slot_size,
                        slot_count: g.slot_count,
                        asked_size: config.slot_size,
                        asked_count: config.slot_count,
                    });
                }
                true
            }
            None => {
                let segment = StreamSegment::create(name, config).map_err(segment_error)?;
                let stream = Stream { segment, publisher: None, subscribers: Vec::new(), rates: Rates::default() };
                self.streams.insert(name.into(), stream);
                false
            }
        };
        let stream = self.streams.get_mut(name).expect("just found or inserted");
        let fds = std::iter::once(stream.segment.data_fd())
            .chain(stream.segment.channel_fds())
            .map(dup)
            .collect::<Result<Vec<_>, _>>();
        let fds = match fds {
            Ok(fds) => fds,
            Err(e) => {
                self.drop_if_unused(name);
                return Err(e);
            }
        };
        let stream = self.streams.get_mut(name).expect("still there: it has this publisher's request");
        stream.publisher = Some(conn);
        let channels = fds.len() as u32 - 1;
        if takeover {
            let stream = &self.streams[name];
            self.tell_subscribers(stream, &Event::PublisherBack { stream: name.into() }, out);
        } else {
            self.admit_pending(name, out);
        }
        tracing::info!(stream = name, conn, takeover, "publisher attached");
        Ok((Reply::Published { stream: name.into(), channels, takeover }, fds))
    }

    /// Subscribers that were waiting for stream `name` to exist.
    fn admit_pending(&mut self, name: &str, out: &mut Vec<Outgoing>) {
        let (now, later): (Vec<Pending>, Vec<Pending>) =
            std::mem::take(&mut self.pending).into_iter().partition(|p| p.stream == name);
        self.pending = later;
        for p in now {
            let (result, fds) = match self.add_subscriber(p.conn, name, &p.options) {
                Ok((reply, fds)) => (Ok(reply), fds),
                Err(e) => (Err(e), Vec::new()),
            };
            out.push(Outgoing::reply(p.conn, p.id, result, fds));
        }
    }

    /// `Subscribe`.
    pub fn subscribe(
        &mut self,
        conn: ConnId,
        id: u64,
        name: &str,
        options: &SubscriberOptions,
        wait_for_stream: bool,
    ) -> Vec<Outgoing> {
        if !valid_stream_name(name) {
            return vec![Outgoing::reply(conn, id, Err(ControlError::InvalidName(name.into())), Vec::new())];
        }
        if !self.streams.contains_key(name) {
            if wait_for_stream {
                tracing::debug!(stream = name, conn, "subscriber waits for the stream");
                self.pending.push(Pending { conn, id, stream: name.into(), options: *options });
                return Vec::new();
            }
            return vec![Outgoing::reply(conn, id, Err(ControlError::NoSuchStream(name.into())), Vec::new())];
        }
        let (result, fds) = match self.add_subscriber(conn, name, options) {
            Ok((reply, fds)) => (Ok(reply), fds),
            Err(e) => (Err(e), Vec::new()),
        };
        vec![Outgoing::reply(conn, id, result, fds)]
    }

    fn add_subscriber(
        &mut self,
        conn: ConnId,
        name: &str,
        options: &SubscriberOptions,
    ) -> Result<(Reply, Vec<OwnedFd>), ControlError> {
        let pid = self.pid(conn);
        let stream = self.streams.get_mut(name).ok_or_else(|| ControlError::NoSuchStream(name.into()))?;
        let ticket = stream.segment.add_subscriber(options, pid).map_err(|e| credit_error(name, e))?;
        let fds = match (stream.segment.read_only_data_fd(), dup(stream.segment.channel_fd(ticket.index))) {
            (Ok(data), Ok(channel)) => vec![data, channel],
            (data, channel) => {
                let _ = stream.segment.remove_subscriber(ticket.index);
                stream.segment.reclaim();
                return Err(match (data, channel) {
                    (Err(e), _) => segment_error(e),
                    (_, Err(e)) => e,
                    _ => unreachable!(),
                });
            }
        };
        self.next_subscription += 1;
        let subscription = self.next_subscription;
        stream.subscribers.push(subscription);
        let publisher_attached = stream.publisher.is_some();
        self.subscriptions.insert(subscription, Subscription { stream: name.into(), index: ticket.index, conn });
        tracing::info!(stream = name, conn, subscription, index = ticket.index, "subscriber attached");
        let reply = Reply::Subscribed {
            subscription,
            stream: name.into(),
            index: ticket.index,
            generation: ticket.generation,
            publisher_attached,
        };
        Ok((reply, fds))
    }

    /// `Credit`.
    pub fn credit(&mut self, conn: ConnId, id: u64, subscription: u64, credits: u32) -> Vec<Outgoing> {
        let result = match self.subscriptions.get(&subscription).filter(|s| s.conn == conn) {
            None => Err(ControlError::NoSuchSubscription(subscription)),
            Some(sub) => match self.streams.get_mut(&sub.stream) {
                None => Err(ControlError::StreamClosed(sub.stream.clone())),
                Some(stream) => match stream.segment.set_credits(sub.index, credits) {
                    Ok(()) => Ok(Reply::Done),
                    Err(SubscriberOpError::Credits(e)) => Err(credit_error(&sub.stream, e)),
                    Err(e) => Err(ControlError::Segment(e.to_string())),
                },
            },
        };
        vec![Outgoing::reply(conn, id, result, Vec::new())]
    }

    /// `Unsubscribe`.
    pub fn unsubscribe(&mut self, conn: ConnId, id: u64, subscription: u64) -> Vec<Outgoing> {
        let result = if self.subscriptions.get(&subscription).is_some_and(|s| s.conn == conn) {
            // Its client let go of it: the index may serve anyone at once.
            self.remove_subscription(subscription, true);
            Ok(Reply::Done)
        } else {
            Err(ControlError::NoSuchSubscription(subscription))
        };
        vec![Outgoing::reply(conn, id, result, Vec::new())]
    }

    /// Ends a subscription; `released` if its own client gave it up (else
    /// its lease ended, and its index waits for its process to end).
    fn remove_subscription(&mut self, subscription: u64, released: bool) {
        let Some(sub) = self.subscriptions.remove(&subscription) else { return };
        if let Some(stream) = self.streams.get_mut(&sub.stream) {
            stream.subscribers.retain(|&s| s != subscription);
            let removed = if released {
                stream.segment.release_subscriber(sub.index)
            } else {
                stream.segment.remove_subscriber(sub.index)
            };
            if let Err(e) = removed {
                tracing::warn!(stream = sub.stream, "removing subscriber #{}: {e}", sub.index);
            }
            // With no publisher attached nobody else would finish it.
            stream.segment.reclaim();
            tracing::info!(stream = sub.stream, subscription, "subscriber detached");
            self.drop_if_unused(&sub.stream);
        }
    }

    /// `Unpublish`.
    pub fn unpublish(&mut self, conn: ConnId, id: u64, name: &str) -> Vec<Outgoing> {
        let mut out = Vec::new();
        let result = match self.streams.get(name) {
            Some(stream) if stream.publisher == Some(conn) => {
                self.publisher_left(name, &mut out);
                Ok(Reply::Done)
            }
            Some(_) => Err(ControlError::NotPublisher(name.into())),
            None => Err(ControlError::NoSuchStream(name.into())),
        };
        out.insert(0, Outgoing::reply(conn, id, result, Vec::new()));
        out
    }

    fn publisher_left(&mut self, name: &str, out: &mut Vec<Outgoing>) {
        let Some(stream) = self.streams.get_mut(name) else { return };
        stream.publisher = None;
        // A crashed publisher still holds the writer role: hand it back. A
        // clean one already let go, and this only wakes the subscribers.
        stream.segment.publisher_gone();
        tracing::info!(stream = name, "publisher gone");
        let stream = &self.streams[name];
        self.tell_subscribers(stream, &Event::PublisherGone { stream: name.into() }, out);
        self.drop_if_unused(name);
    }

    /// Forgets a stream nobody uses any more: its memory goes once the
    /// last process that mapped it lets go.
    fn drop_if_unused(&mut self, name: &str) {
        if self.streams.get(name).is_some_and(|s| s.publisher.is_none() && s.subscribers.is_empty()) {
            self.streams.remove(name);
            tracing::info!(stream = name, "stream removed");
        }
    }

    /// `Close`.
    pub fn close(&mut self, conn: ConnId, id: u64, name: &str) -> Vec<Outgoing> {
        let mut out = Vec::new();
        let result = match self.streams.remove(name) {
            None => Err(ControlError::NoSuchStream(name.into())),
            Some(mut stream) => {
                stream.segment.close();
                let event = Event::StreamClosed { stream: name.into() };
                out.extend(self.users(&stream, true).into_iter().map(|c| Outgoing::event(c, event.clone())));
                for s in &stream.subscribers {
                    self.subscriptions.remove(s);
                }
                self.closing.push((Instant::now(), stream.segment));
                tracing::info!(stream = name, conn, "stream closed");
                Ok(Reply::Done)
            }
        };
        out.insert(0, Outgoing::reply(conn, id, result, Vec::new()));
        out
    }

    /// A connection ended: its lease is over. Reclaims everything it held.
    pub fn disconnect(&mut self, conn: ConnId) -> Vec<Outgoing> {
        let mut out = Vec::new();
        self.clients.remove(&conn);
        self.pending.retain(|p| p.conn != conn);
        let published: Vec<String> =
            self.streams.iter().filter(|(_, s)| s.publisher == Some(conn)).map(|(n, _)| n.clone()).collect();
        for name in published {
            self.publisher_left(&name, &mut out);
        }
        let subs: Vec<u64> = self.subscriptions.iter().filter(|(_, s)| s.conn == conn).map(|(&id, _)| id).collect();
        for s in subs {
            self.remove_subscription(s, false);
        }
        out.retain(|o| o.conn != conn);
        out
    }

    /// Closes every stream (the broker is shutting down).
    /// Whether [`close_all`](Self::close_all) ran: requests are refused.
    pub fn shutting_down(&self) -> bool {
        self.shutting_down
    }

    pub fn close_all(&mut self) {
        self.shutting_down = true;
        for (name, mut stream) in self.streams.drain() {
            stream.segment.close();
            tracing::info!(stream = name, "stream closed for shutdown");
            self.closing.push((Instant::now(), stream.segment));
        }
        self.subscriptions.clear();
        self.pending.clear();
    }

    /// Ends the publisher role on streams closed at least `grace` ago.
    ///
    /// A close takes effect for subscribers once the publisher has
    /// acknowledged it, which it does at its next loan or send, so that a
    /// frame it is sending right then still arrives. An idle publisher
    /// would leave its subscribers waiting: after the grace period the
    /// broker declares it gone, which ends the close for everyone.
    pub fn finish_closing(&mut self, grace: std::time::Duration) {
        self.closing.retain_mut(|(at, segment)| {
            if at.elapsed() < grace {
                return true;
            }
            segment.publisher_gone();
            false
        });
    }

    /// Samples every stream's counters for the per-second rates. Called
    /// once a second: reads shared memory, no messages.
    pub fn sample_rates(&mut self) {
        let now = Instant::now();
        for stream in self.streams.values_mut() {
            let stats = stream.segment.stats();
            let r = &mut stream.rates;
            if let Some(at) = r.at {
                let dt = now.duration_since(at).as_secs_f64().max(1e-3);
                r.msgs_per_s = stats.published.saturating_sub(r.published) as f64 / dt;
                r.bytes_per_s = stats.bytes.saturating_sub(r.bytes) as f64 / dt;
                r.delivered_per_s = stats
                    .subscribers
                    .iter()
                    .map(|s| {
                        let before = r.delivered.get(&s.index).copied().unwrap_or(s.delivered);
                        (s.index, s.delivered.saturating_sub(before) as f64 / dt)
                    })
                    .collect();
            }
            r.at = Some(now);
            r.published = stats.published;
            r.bytes = stats.bytes;
            r.delivered = stats.subscribers.iter().map(|s| (s.index, s.delivered)).collect();
        }
    }

    /// `Stats`.
    pub fn stats(&self, conn: ConnId, id: u64, name: Option<&str>, broker_pid: u32) -> Vec<Outgoing> {
        let result = match name {
            Some(n) if !self.streams.contains_key(n) => Err(ControlError::NoSuchStream(n.into())),
            _ => {
                let mut streams: Vec<StreamReport> = self
                    .streams
                    .iter()
                    .filter(|(n, _)| name.is_none_or(|want| want == n.as_str()))
                    .map(|(n, s)| self.report(n, s))
                    .collect();
                streams.sort_by(|a, b| a.name.cmp(&b.name));
                Ok(Reply::Stats(StatsReport {
                    broker_pid,
                    clients: self.clients.len() as u32,
                    waiting_subscribers: self.pending.len() as u32,
                    streams,
                }))
            }
        };
        vec![Outgoing::reply(conn, id, result, Vec::new())]
    }

    fn report(&self, name: &str, stream: &Stream) -> StreamReport {
        let stats: StreamStats = stream.segment.stats();
        let by_index: HashMap<u32, u64> =
            self.subscriptions.iter().filter(|(_, s)| s.stream == name).map(|(&id, s)| (s.index, id)).collect();
        let subscribers = stats
            .subscribers
            .iter()
            .filter(|s| !s.detaching)
            .map(|s| SubscriberReport {
                subscription: by_index.get(&s.index).copied().unwrap_or(0),
                pid: s.pid,
                policy: s.policy,
                credits: s.credits,
                delivered: s.delivered,
                dropped: s.dropped,
                queued: s.queued,
                lag_ns: s.lag_ns,
                msgs_per_s: stream.rates.delivered_per_s.get(&s.index).copied().unwrap_or(0.0),
                faults: s.faults,
            })
            .collect();
        StreamReport {
            name: name.into(),
            publisher_pid: (stats.publisher_pid != 0).then_some(stats.publisher_pid),
            slot_size: stats.slot_size,
            slot_count: stats.slot_count,
            free_slots: stats.free_slots,
            published: stats.published,
            bytes: stats.bytes,
            msgs_per_s: stream.rates.msgs_per_s,
            bytes_per_s: stream.rates.bytes_per_s,
            closed: stats.closed,
            subscribers,
        }
    }
}

fn credit_error(stream: &str, e: AddSubscriberError) -> ControlError {
    match e {
        AddSubscriberError::CreditsRefused { requested, available, slot_count, committed } => {
            ControlError::CreditsRefused { stream: stream.into(), requested, available, slot_count, committed }
        }
        AddSubscriberError::Full { max } => ControlError::TooManySubscribers { stream: stream.into(), max },
        AddSubscriberError::Closed => ControlError::StreamClosed(stream.into()),
        other => ControlError::InvalidConfig(other.to_string()),
    }
}
