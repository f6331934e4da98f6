//! The async subscriber (feature `tokio`) against the real broker: frames
//! from another process arrive through `recv().await` and the `Stream`
//! without blocking the runtime; receives are cancel-safe; publisher
//! changes come as items; detached samples keep their subscription alive.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use futures_core::Stream;
use memsock::{AsyncSubscriber, Client, RecvError, StreamConfig, SubscribeOptions};
use memsock_tests::{Broker, Peer, check_frame, eventually, lossless};
use serde_json::json;

const PEER: &str = env!("CARGO_BIN_EXE_memsock-test-peer");

async fn next(sub: &mut AsyncSubscriber) -> Option<Result<memsock::OwnedSample, RecvError>> {
    poll_fn(|cx| Pin::new(&mut *sub).poll_next(cx)).await
}

fn assert_send<T: Send>(_: &T) {}

/// On a single-threaded runtime, a ticker task keeps running while the
/// receiver waits for frames from a paced publisher process: no receive
/// blocks the thread. Every frame arrives, checked byte for byte, with
/// samples held across awaits.
#[tokio::test]
async fn frames_from_another_process_arrive_without_blocking_the_runtime() -> Result<()> {
    let broker = Broker::start()?;
    let client = Client::connect_to(broker.socket())?;
    let waiting = {
        let (client, options) = (client.clone(), lossless(8));
        tokio::spawn(async move { client.subscriber_async("cam", &options).await })
    };
    let stats_client = client.clone();
    let ready = tokio::task::spawn_blocking(move || {
        eventually(Duration::from_secs(10), || stats_client.stats(None).is_ok_and(|s| s.waiting_subscribers == 1))
    });
    assert!(ready.await?, "the subscriber waits for the stream");
    let spec = json!({
        "role": "publisher", "socket": broker.socket().to_str().unwrap(), "stream": "cam",
        "slot_size": 512, "slot_count": 16, "count": 3000, "pace_ns": 30_000,
    });
    let publisher = Peer::spawn(PEER, &spec, &[])?;
    let mut sub = waiting.await??;

    let ticks = Arc::new(AtomicU64::new(0));
    let ticker = {
        let ticks = ticks.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_millis(1));
            loop {
                interval.tick().await;
                ticks.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let recv = sub.recv();
    assert_send(&recv);
    drop(recv);

    let mut scratch = vec![0; 512];
    let mut held = Vec::new();
    let mut expected = 0u64;
    let end = loop {
        match sub.recv().await {
            Ok(sample) => {
                assert_eq!(sample.seq(), expected);
                held.push(sample);
                expected += 1;
                if held.len() == 4 {
                    // Held across an await, then checked and let go.
                    tokio::task::yield_now().await;
                    for s in held.drain(..) {
                        assert!(check_frame(s.seq(), 512, &s, &mut scratch), "frame {} intact", s.seq());
                    }
                }
            }
            Err(e) => break e,
        }
    };
    let ticked = ticks.load(Ordering::Relaxed);
    ticker.abort();
    assert_eq!(end, RecvError::PublisherGone, "the publisher's exit ends its frames");
    assert_eq!(expected, 3000);
    assert!(ticked > 0, "the runtime kept running other tasks while frames were awaited");
    assert_eq!(publisher.finish()?["sent"], 3000);
    Ok(())
}

/// Cancelled receives lose nothing; publisher changes are stream items;
/// the stream ends when the stream is closed; dropping a parked
/// subscriber returns.
#[tokio::test]
async fn the_stream_is_cancel_safe_reports_publisher_changes_and_ends_on_close() -> Result<()> {
    let broker = Broker::start()?;
    let client = Client::connect_to(broker.socket())?;
    let config = StreamConfig::new(64, 8);
    let mut publisher = client.publisher_async("s", &config).await?;
    let mut sub = client.subscriber("s", &SubscribeOptions { wait_for_stream: false, ..lossless(4) })?.into_async();

    // Nothing there: the receive is cancelled by the timeout.
    assert!(tokio::time::timeout(Duration::from_millis(30), sub.recv()).await.is_err());
    for i in 0..3u8 {
        publisher.send(&[i])?;
    }
    for i in 0..3u8 {
        let sample = next(&mut sub).await.expect("not ended")?;
        assert_eq!((&*sample, sample.seq()), (&[i][..], u64::from(i)));
    }
    // A receive parked when the publisher leaves, and when one is back.
    let waiter = tokio::spawn(async move {
        let gone = next(&mut sub).await;
        (sub, gone)
    });
    // On this single-threaded runtime, one yield runs the waiter up to its park.
    tokio::task::yield_now().await;
    drop(publisher);
    let (mut sub, gone) = waiter.await?;
    assert_eq!(gone.expect("not ended").unwrap_err(), RecvError::PublisherGone);
    let mut publisher = client.publisher("s", &config)?;
    assert!(publisher.took_over());
    publisher.send(b"again")?;
    assert_eq!(next(&mut sub).await.expect("not ended").unwrap_err(), RecvError::PublisherBack);
    let sample = next(&mut sub).await.expect("not ended")?;
    assert_eq!((&*sample, sample.seq()), (&b"again"[..], 3));
    drop(sample);

    // A subscriber parked in a receive can be dropped (its watcher stops).
    let mut other = client.subscriber("s", &SubscribeOptions { wait_for_stream: false, ..lossless(1) })?.into_async();
    assert!(tokio::time::timeout(Duration::from_millis(20), other.recv()).await.is_err());
    drop(other);

    client.close_stream("s")?;
    assert!(next(&mut sub).await.is_none(), "the stream ends when it is closed");
    assert!(next(&mut sub).await.is_none());
    Ok(())
}

/// A detached sample keeps its subscription (and slot) alive after the
/// subscriber is dropped; the broker ends the subscription once the last
/// sample goes.
#[tokio::test]
async fn detached_samples_keep_their_subscription_until_dropped() -> Result<()> {
    let broker = Broker::start()?;
    let client = Client::connect_to(broker.socket())?;
    let mut publisher = client.publisher("keep", &StreamConfig::new(64, 8))?;
    let mut sub = client.subscriber("keep", &lossless(2))?.into_async();
    publisher.send(b"kept")?;
    let sample = sub.recv().await?;
    drop(sub);
    let subscribers = || client.stats(Some("keep")).map(|s| s.streams[0].subscribers.len()).unwrap_or(99);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(subscribers(), 1, "the subscription lasts while a sample is out");
    let moved = tokio::task::spawn_blocking(move || sample.to_vec()).await?;
    assert_eq!(moved, b"kept");
    assert!(eventually(Duration::from_secs(10), || subscribers() == 0), "ended with the last sample");
    Ok(())
}
