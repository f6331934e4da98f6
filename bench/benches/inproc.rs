//! In-process figures for the data-plane pieces: loan/send, receive and
//! release, and the whole round trip, with one and four subscribers.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use memsock::shm::{OverflowPolicy, StreamConfig, StreamSegment, SubscriberOptions, WaitStrategy};

fn opts(policy: OverflowPolicy) -> SubscriberOptions {
    SubscriberOptions { credits: 64, policy, wait: WaitStrategy::Spin, ..SubscriberOptions::default() }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("dataplane");
    g.throughput(Throughput::Elements(1));

    // Loan and send a 64-byte frame that no subscriber wants (but the
    // history of 1, the last value, does).
    for history in [0, 1] {
        let config = StreamConfig { history, ..StreamConfig::new(64, 256) };
        let mut seg = StreamSegment::create("bench", &config).unwrap();
        let mut publisher = seg.open_publisher().unwrap();
        g.bench_function(format!("loan_send_no_subscriber_history{history}"), |b| {
            b.iter(|| {
                let mut s = publisher.loan().unwrap();
                s.as_mut_slice()[..8].copy_from_slice(&1u64.to_le_bytes());
                s.set_len(64);
                black_box(s.send().unwrap());
            })
        });
    }

    // Send, receive and release through the queue of one and four
    // subscribers (and one, with a history of 1).
    for (n, policy, history) in [
        (1, OverflowPolicy::DropNewest, 0),
        (1, OverflowPolicy::DropNewest, 1),
        (4, OverflowPolicy::DropNewest, 0),
        (1, OverflowPolicy::KeepLatest, 0),
    ] {
        let config = StreamConfig { history, ..StreamConfig::new(64, 64 * n + 8 + history) };
        let mut seg = StreamSegment::create("bench", &config).unwrap();
        let subs: Vec<_> = (0..n).map(|_| seg.open_subscriber(&opts(policy)).unwrap()).collect();
        let mut publisher = seg.open_publisher().unwrap();
        let payload = [7u8; 64];
        g.bench_function(format!("send_recv_release_{n}sub_{policy:?}_history{history}"), |b| {
            b.iter(|| {
                publisher.send(black_box(&payload)).unwrap();
                for s in &subs {
                    black_box(s.try_recv().unwrap().len());
                }
            })
        });
    }

    // Queue operations alone: a batch of 32 sends, then 32 receives.
    let mut seg = StreamSegment::create("bench", &StreamConfig::new(64, 64 + 8)).unwrap();
    let sub = seg.open_subscriber(&opts(OverflowPolicy::DropNewest)).unwrap();
    let mut publisher = seg.open_publisher().unwrap();
    g.throughput(Throughput::Elements(32));
    g.bench_function("batch32_send_then_recv", |b| {
        b.iter(|| {
            for _ in 0..32 {
                publisher.send(&[1; 64]).unwrap();
            }
            for _ in 0..32 {
                black_box(sub.try_recv().unwrap().len());
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
