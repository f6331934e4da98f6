//! The plugin host against the real broker: one thread follows a hundred
//! streams created after it started, delivers every frame in order, holds a
//! stream back while the plugin hands frames back (a lossless publisher
//! waits meanwhile), and reports publishers gone and back and streams
//! closed, in order with the frames.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::Duration;

use anyhow::Result;
use memsock::{Client, StreamConfig};
use memsock_plugins::{
    Delivery, FrameMeta, Host, HostOptions, Interest, OwnedSample, Plugin, PluginError, PublisherChange, StreamId,
    StreamOpened, async_trait,
};
use memsock_tests::{Broker, eventually, lossless};

const DEADLINE: Duration = Duration::from_secs(30);

/// What the counting plugin saw, in order.
#[derive(Debug, Default)]
struct Seen {
    opened: Vec<(StreamId, String, u32)>,
    /// Per stream: (seq, gap, first payload byte).
    frames: Vec<Vec<(u64, u64, u8)>>,
    events: Vec<(StreamId, &'static str)>,
    threads: HashSet<ThreadId>,
    shut_down: bool,
}

/// Counts what it is given; hands the first `refuse` offers back.
#[derive(Debug)]
struct Counter {
    pattern: &'static str,
    seen: Arc<Mutex<Seen>>,
    refuse: u32,
    credits: u32,
}

#[async_trait]
impl Plugin for Counter {
    fn interests(&self) -> Vec<Interest> {
        vec![Interest { pattern: self.pattern.into(), options: lossless(self.credits) }]
    }

    async fn stream_opened(&mut self, s: &StreamOpened) -> Result<(), PluginError> {
        let mut seen = self.seen.lock().unwrap();
        seen.opened.push((s.id, s.name.clone(), s.credits));
        seen.frames.push(Vec::new());
        Ok(())
    }

    fn frame(&mut self, meta: FrameMeta, frame: OwnedSample) -> Delivery {
        if self.refuse > 0 {
            self.refuse -= 1;
            return Delivery::Busy(frame);
        }
        let mut seen = self.seen.lock().unwrap();
        seen.threads.insert(std::thread::current().id());
        seen.frames[meta.stream.0 as usize].push((meta.seq, meta.gap, frame[0]));
        Delivery::Taken
    }

    async fn publisher_changed(&mut self, stream: StreamId, change: PublisherChange) -> Result<(), PluginError> {
        let what = if change == PublisherChange::Gone { "gone" } else { "back" };
        self.seen.lock().unwrap().events.push((stream, what));
        Ok(())
    }

    async fn stream_closed(&mut self, stream: StreamId) -> Result<(), PluginError> {
        self.seen.lock().unwrap().events.push((stream, "closed"));
        Ok(())
    }

    async fn shutdown(&mut self) -> Result<(), PluginError> {
        self.seen.lock().unwrap().shut_down = true;
        Ok(())
    }
}

fn start(broker: &Broker, plugin: Counter) -> Result<(memsock_plugins::StopHandle, std::thread::JoinHandle<()>)> {
    let client = Client::connect_to(broker.socket())?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let host = Host::new(client, plugin, HostOptions::default()).on_ready(move || ready_tx.send(()).unwrap());
    let stop = host.stop_handle();
    let thread = std::thread::spawn(move || {
        host.run_blocking().expect("the host runs");
    });
    ready_rx.recv_timeout(DEADLINE)?;
    Ok((stop, thread))
}

/// A hundred streams created after the host started, ten frames each sent
/// at once: every frame arrives, in order, none lost, all on one thread.
#[test]
fn one_host_thread_follows_a_hundred_streams_from_their_first_frame() -> Result<()> {
    let broker = Broker::start()?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (stop, host) = start(&broker, Counter { pattern: "many/*", seen: seen.clone(), refuse: 0, credits: 4 })?;
    let client = Client::connect_to(broker.socket())?;
    let mut publishers = Vec::new();
    for i in 0..100 {
        let mut p = client.publisher(&format!("many/{i}"), &StreamConfig::new(64, 8))?;
        for n in 0..10u8 {
            p.send_timeout(&[n], DEADLINE)?;
        }
        publishers.push(p);
    }
    let all = eventually(DEADLINE, || seen.lock().unwrap().frames.iter().map(Vec::len).sum::<usize>() == 1000);
    assert!(all, "every frame delivered");
    stop.stop();
    host.join().unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.opened.len(), 100);
    for frames in &seen.frames {
        let expected: Vec<(u64, u64, u8)> = (0..10).map(|n| (n, 0, n as u8)).collect();
        assert_eq!(frames, &expected);
    }
    assert_eq!(seen.threads.len(), 1, "one thread delivers");
    assert!(seen.shut_down);
    Ok(())
}

/// A plugin that hands frames back holds its stream back: the lossless
/// publisher waits and nothing is lost or reordered.
/// Publisher changes and the close come in order with the frames.
#[test]
fn frames_handed_back_are_offered_again_in_order_and_events_follow_the_frames() -> Result<()> {
    let broker = Broker::start()?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (stop, host) = start(&broker, Counter { pattern: "held", seen: seen.clone(), refuse: 50, credits: 2 })?;
    let client = Client::connect_to(broker.socket())?;
    let mut first = client.publisher("held", &StreamConfig::new(64, 8))?;
    for n in 0..20u8 {
        first.send_timeout(&[n], DEADLINE)?;
    }
    drop(first);
    let mut second = client.publisher("held", &StreamConfig::new(64, 8))?;
    for n in 20..30u8 {
        second.send_timeout(&[n], DEADLINE)?;
    }
    // The change of publisher comes once the subscriber has caught up (a
    // close before then would supersede it: see the README).
    let caught_up = eventually(DEADLINE, || seen.lock().unwrap().events.len() == 2);
    assert!(caught_up, "gone and back: {:?}", seen.lock().unwrap().events);
    client.close_stream("held")?;
    let three = eventually(DEADLINE, || seen.lock().unwrap().events.len() == 3);
    assert!(three, "gone, back, closed: {:?}", seen.lock().unwrap().events);
    stop.stop();
    host.join().unwrap();
    let seen = seen.lock().unwrap();
    let expected: Vec<(u64, u64, u8)> = (0..30).map(|n| (n, 0, n as u8)).collect();
    assert_eq!(seen.frames[0], expected);
    let id = StreamId(0);
    assert_eq!(seen.events, [(id, "gone"), (id, "back"), (id, "closed")]);
    Ok(())
}

/// A host stopped right after a lossless publisher's last send delivers
/// what was queued then, also frames the plugin hands back a while, and
/// does not wait for more: no frame sent is lost to the stop.
#[test]
fn a_stopping_host_delivers_what_was_queued() -> Result<()> {
    let broker = Broker::start()?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    // Hands back the first 200 offers: the frames pile up in the queue.
    let (stop, host) = start(&broker, Counter { pattern: "tail", seen: seen.clone(), refuse: 200, credits: 16 })?;
    let client = Client::connect_to(broker.socket())?;
    let mut publisher = client.publisher("tail", &StreamConfig::new(64, 32))?;
    for n in 0..16u8 {
        publisher.send_timeout(&[n], DEADLINE)?;
    }
    stop.stop();
    host.join().unwrap();
    let seen = seen.lock().unwrap();
    let expected: Vec<(u64, u64, u8)> = (0..16).map(|n| (n, 0, n as u8)).collect();
    assert_eq!(seen.frames[0], expected);
    assert!(seen.shut_down);
    Ok(())
}
