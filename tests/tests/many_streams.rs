//! One broker holding 20,000 streams: alone in its own test binary, so
//! that its load (a broker and eight clients creating streams flat out)
//! does not slow the other cross-process tests past their deadlines.

use std::time::Duration;

use anyhow::Result;
use memsock::control::ControlError;
use memsock::{Client, ClientError, StreamConfig, SubscribeOptions};
use memsock_tests::{Broker, TempDir, eventually};

fn stats_of(client: &Client, stream: &str) -> Option<memsock::StreamReport> {
    client.stats(Some(stream)).ok()?.streams.into_iter().find(|s| s.name == stream)
}

/// Issue 10, part 1: 20,000 small streams (4 slots of 4 KiB) across eight
/// clients do not exhaust the broker's descriptors. A stream holds one (its
/// data file) until subscribers come, so the broker creates them up to its
/// descriptor budget — all of them where its limit allows (it raises its
/// soft limit to the hard one), else up to the budget, each one past it
/// refused with a named limit and the numbers, never "Too many open files"
/// (which it hit at 604 streams when each held 33). Another client is
/// served throughout and after.
#[test]
fn twenty_thousand_small_streams_across_clients_do_not_exhaust_descriptors() -> Result<()> {
    use memsock::control::Limit;
    /// A refusal's used, asked and max.
    type Refusal = (u64, u64, u64);
    const CLIENTS: usize = 8;
    const PER_CLIENT: usize = 2_500;
    let dir = TempDir::new("many")?;
    let socket = dir.path().join("run").join("broker.sock");
    let limits = ["client.streams=3000", "user.streams=30000", "broker.streams=30000"];
    let args: Vec<&str> = limits.iter().flat_map(|l| ["--limit", l]).collect();
    let broker = Broker::start_with(dir, socket, &args)?;
    let mut small = StreamConfig::new(4096, 4);
    small.max_subscribers = 32;
    let workers: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let socket = broker.socket().to_owned();
            std::thread::spawn(move || -> Result<(Vec<memsock::Publisher>, Vec<Refusal>)> {
                let client = Client::connect_to(&socket)?;
                let (mut held, mut refused) = (Vec::new(), Vec::new());
                for i in 0..PER_CLIENT {
                    match client.publisher(&format!("s{c}-{i}"), &small) {
                        Ok(p) => held.push(p),
                        Err(ClientError::Refused(ControlError::LimitReached {
                            limit: Limit::Descriptors,
                            used,
                            asked,
                            max,
                            ..
                        })) => refused.push((used, asked, max)),
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok((held, refused))
            })
        })
        .collect();
    let other = Client::connect_to(broker.socket())?;
    // Served while they create.
    while !workers.iter().all(std::thread::JoinHandle::is_finished) {
        other.stats(Some("s0-0")).ok();
        std::thread::sleep(Duration::from_millis(20));
    }
    let (mut held, mut refused) = (Vec::new(), Vec::new());
    for w in workers {
        let (h, r) = w.join().expect("no panic")?;
        held.extend(h);
        refused.extend(r);
    }
    // (Stats of one stream: those of 20,000 pass what one reply may hold.)
    let report = other.stats(Some("s0-0"))?;
    assert_eq!(held.len() + refused.len(), CLIENTS * PER_CLIENT);
    assert!(held.iter().all(|p| p.stream().starts_with('s')));
    assert!(stats_of(&other, held.last().expect("some created").stream()).is_some());
    assert!(report.descriptors < report.descriptor_limit, "not exhausted: {report:?}");
    if let Some(&(_, _, max)) = refused.first() {
        // Refused only once the budget was spent, with its numbers.
        assert!(refused.iter().all(|&(used, asked, m)| m == max && used + asked > max), "{refused:?}");
        assert!(held.len() as u64 + 1 > max, "{} created, budget {max}", held.len());
        assert!(report.descriptor_limit < 22_000, "refused although the limit was {}", report.descriptor_limit);
        // Two streams freed: the other client creates one and subscribes.
        for freed in [held.pop(), held.pop()].into_iter().flatten() {
            let name = freed.stream().to_owned();
            drop(freed);
            assert!(eventually(Duration::from_secs(30), || stats_of(&other, &name).is_none()));
        }
    }
    let mut mine = other.publisher("after", &small)?;
    let sub = other.subscriber("after", &SubscribeOptions { credits: 1, ..Default::default() })?;
    mine.send(b"still served")?;
    assert_eq!(&*sub.recv_timeout(Duration::from_secs(30))?, b"still served");
    drop(held);
    Ok(())
}
