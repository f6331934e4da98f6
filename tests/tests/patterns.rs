//! Patterns and discovery against the real broker: listing streams by
//! pattern, watching them appear and go, pattern subscriptions that attach
//! to streams created later before their first frame, and "up to N
//! credits" on a busy pool.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use memsock::control::ControlError;
use memsock::pattern::PatternError;
use memsock::{Client, ClientError, StreamConfig, SubscribeOptions, Subscriber, Watch, WatchEvent};
use memsock_tests::{Broker, eventually, lossless};

/// Only catches a hang: every wait below is for the event itself.
const DEADLINE: Duration = Duration::from_secs(20);

fn next_event(watch: &Watch) -> Result<WatchEvent> {
    watch.next_timeout(DEADLINE)?.context("no watch event within the deadline")
}

/// The next `n` subscribers a pattern subscription brings, by stream name
/// (other events are skipped).
fn subscribers(watch: &Watch, n: usize) -> Result<Vec<Subscriber>> {
    let mut got = Vec::new();
    let end = Instant::now() + DEADLINE;
    while got.len() < n {
        let left = end.checked_duration_since(Instant::now()).context("subscribers did not come")?;
        match watch.next_timeout(left)? {
            Some(WatchEvent::Subscribed { subscriber, .. }) => got.push(subscriber),
            Some(WatchEvent::SubscribeFailed { stream, error }) => bail!("subscribing to {stream}: {error}"),
            Some(_) => {}
            None => bail!("subscribers did not come"),
        }
    }
    got.sort_by(|a, b| a.stream().cmp(b.stream()));
    Ok(got)
}

fn send_frames(publisher: &mut memsock::Publisher, count: u64) -> Result<()> {
    for i in 0..count {
        publisher.send_timeout(&i.to_le_bytes(), DEADLINE)?;
    }
    Ok(())
}

fn receive_frames(subscriber: &Subscriber, count: u64) -> Result<()> {
    for i in 0..count {
        let sample = subscriber.recv_timeout(DEADLINE)?;
        let value = u64::from_le_bytes((*sample).try_into()?);
        assert_eq!((sample.seq(), value), (i, i), "frame {i} of {}", subscriber.stream());
    }
    Ok(())
}

/// A pattern subscription made before its streams exist is attached to
/// each matching stream as it is created, before its publisher can send:
/// frames sent right after `publisher()` returns all arrive, from the
/// first. Streams that do not match are left alone.
#[test]
fn a_pattern_subscription_misses_none_of_a_later_stream_s_first_frames() -> Result<()> {
    let broker = Broker::start()?;
    let recorder = Client::connect_to(broker.socket())?;
    let watch = recorder.subscribe_pattern("cam/**", &lossless(4))?;
    assert!(watch.streams().is_empty());

    let socket = broker.socket().to_owned();
    let publishers = std::thread::spawn(move || -> Result<Vec<memsock::Publisher>> {
        let client = Client::connect_to(&socket)?;
        let config = StreamConfig::new(64, 8);
        let mut other = client.publisher("microphone", &config)?;
        let mut left = client.publisher("cam/left", &config)?;
        let mut raw = client.publisher("cam/right/raw", &config)?;
        // At once, each: lossless subscribers hold the publisher back.
        send_frames(&mut left, 1000)?;
        send_frames(&mut raw, 1000)?;
        send_frames(&mut other, 10)?;
        Ok(vec![other, left, raw])
    });
    let subs = subscribers(&watch, 2)?;
    assert_eq!(subs.iter().map(|s| s.stream()).collect::<Vec<_>>(), ["cam/left", "cam/right/raw"]);
    assert!(subs.iter().all(|s| s.credits() == 4));
    receive_frames(&subs[0], 1000)?;
    receive_frames(&subs[1], 1000)?;
    let _publishers = publishers.join().expect("publisher thread")?;
    let stats = recorder.stats(Some("microphone"))?;
    assert!(stats.streams[0].subscribers.is_empty(), "the stream that does not match has no subscriber");
    Ok(())
}

/// A pattern subscription attaches to the matching streams that exist,
/// listed by name; a watch without subscribing sees streams created and
/// removed (closed, or unused), and a listing filters by pattern.
#[test]
fn watches_and_listings_follow_the_pattern() -> Result<()> {
    let broker = Broker::start()?;
    let client = Client::connect_to(broker.socket())?;
    let config = StreamConfig::new(128, 4);
    let mut a = client.publisher("md/eu.bid", &config)?;
    let _b = client.publisher("md/us.bid", &config)?;
    let _c = client.publisher("md/eu.ask", &config)?;
    let _d = client.publisher("video", &config)?;

    let names = |list: Vec<memsock::StreamInfo>| list.into_iter().map(|s| s.name).collect::<Vec<_>>();
    assert_eq!(names(client.list("md/*.bid")?), ["md/eu.bid", "md/us.bid"]);
    assert_eq!(names(client.list("**")?), ["md/eu.ask", "md/eu.bid", "md/us.bid", "video"]);
    assert_eq!(names(client.list("video")?), ["video"]);
    let listed = client.list("md/eu.bid")?;
    assert_eq!(listed[0].config.slot_size, 128);
    assert_eq!(listed[0].publisher_pid, Some(std::process::id()));
    assert_eq!(listed[0].subscribers, 0);

    let other = Client::connect_to(broker.socket())?;
    let subscribing = other.subscribe_pattern("md/*.bid", &lossless(2))?;
    assert_eq!(subscribing.streams().len(), 2);
    let subs = subscribers(&subscribing, 2)?;
    assert_eq!(subs.iter().map(|s| s.stream()).collect::<Vec<_>>(), ["md/eu.bid", "md/us.bid"]);
    a.send(b"tick")?;
    assert_eq!(subs[0].recv_timeout(DEADLINE)?[..], b"tick"[..]);
    assert_eq!(client.list("md/eu.bid")?[0].subscribers, 1);

    let watch = other.watch("md/**")?;
    assert_eq!(watch.streams().len(), 3);
    let _e = client.publisher("md/jp/book", &config)?;
    match next_event(&watch)? {
        WatchEvent::Created(info) => assert_eq!((info.name.as_str(), info.config.slot_count), ("md/jp/book", 4)),
        other => bail!("expected Created, got {other:?}"),
    }
    client.close_stream("md/eu.ask")?;
    match next_event(&watch)? {
        WatchEvent::Removed { stream, closed } => assert_eq!((stream.as_str(), closed), ("md/eu.ask", true)),
        other => bail!("expected Removed, got {other:?}"),
    }
    drop(_e);
    match next_event(&watch)? {
        WatchEvent::Removed { stream, closed } => assert_eq!((stream.as_str(), closed), ("md/jp/book", false)),
        other => bail!("expected Removed, got {other:?}"),
    }
    // The subscribing watch's new match, for contrast, is subscribed.
    let _f = client.publisher("md/jp.bid", &config)?;
    let subs = subscribers(&subscribing, 1)?;
    assert_eq!(subs[0].stream(), "md/jp.bid");
    Ok(())
}

/// Ending a watch (dropping it) stops its subscribing: a stream created
/// after gets no subscriber from it, while the subscribers it gave live on.
#[test]
fn a_dropped_pattern_subscription_attaches_no_more() -> Result<()> {
    let broker = Broker::start()?;
    let client = Client::connect_to(broker.socket())?;
    let config = StreamConfig::new(64, 8);
    let mut first = client.publisher("a/1", &config)?;
    let watch = client.subscribe_pattern("a/*", &lossless(2))?;
    let subs = subscribers(&watch, 1)?;
    drop(watch);
    let _second = client.publisher("a/2", &config)?;
    // The watch's end reached the broker before the Publish (one
    // connection, in order): no subscriber was attached.
    assert!(client.stats(Some("a/2"))?.streams[0].subscribers.is_empty());
    first.send(b"still")?;
    assert_eq!(subs[0].recv_timeout(DEADLINE)?[..], b"still"[..]);
    Ok(())
}

/// "Up to N credits": on a busy 16-slot pool, a subscriber asking for 64
/// takes what is left and says how many; without `credits_up_to` it is
/// refused with the numbers; with no credit left at all, refused too.
#[test]
fn up_to_n_credits_takes_what_a_busy_pool_can_give() -> Result<()> {
    let broker = Broker::start()?;
    let client = Client::connect_to(broker.socket())?;
    let mut config = StreamConfig::new(64, 16);
    config.publisher_loans = 2;
    let _publisher = client.publisher("busy", &config)?;
    let greedy = client.subscriber("busy", &lossless(10))?;
    assert_eq!(greedy.credits(), 10);
    let strict = client.subscriber("busy", &lossless(64));
    assert!(
        matches!(
            strict,
            Err(ClientError::Refused(ControlError::InvalidConfig(_) | ControlError::CreditsRefused { .. }))
        ),
        "{strict:?}"
    );
    let modest = client.subscriber("busy", &SubscribeOptions { credits_up_to: true, ..lossless(64) })?;
    assert_eq!(modest.credits(), 4, "16 slots, 2 kept for loans, 10 promised");
    let reported = client.stats(Some("busy"))?.streams[0].subscribers.iter().map(|s| s.credits).max();
    assert_eq!(reported, Some(10));
    let none_left = client.subscriber("busy", &SubscribeOptions { credits_up_to: true, ..lossless(64) });
    assert!(
        matches!(none_left, Err(ClientError::Refused(ControlError::CreditsRefused { available: 0, .. }))),
        "{none_left:?}"
    );
    // A pattern subscription takes what it can too.
    drop(modest);
    let ok = eventually(DEADLINE, || client.list("busy").is_ok_and(|l| l[0].subscribers == 1));
    assert!(ok, "the modest subscriber is gone");
    let watch = client.subscribe_pattern("bus*", &SubscribeOptions { credits_up_to: true, ..lossless(64) })?;
    let subs = subscribers(&watch, 1)?;
    assert_eq!(subs[0].credits(), 4);
    Ok(())
}

/// A malformed pattern is refused with what is wrong with it.
#[test]
fn a_malformed_pattern_is_refused_with_its_problem() -> Result<()> {
    let broker = Broker::start()?;
    let client = Client::connect_to(broker.socket())?;
    for result in [client.list("cam/x**").map(drop), client.watch("cam/x**").map(drop)] {
        match result {
            Err(ClientError::Refused(ControlError::InvalidPattern { pattern, problem })) => {
                assert_eq!(pattern, "cam/x**");
                assert_eq!(problem, PatternError::DoubleStarInPart("x**".into()));
            }
            other => bail!("expected InvalidPattern, got {other:?}"),
        }
    }
    let text = client.list("").unwrap_err().to_string();
    assert!(text.contains("1 to 255 bytes"), "{text}");
    Ok(())
}
