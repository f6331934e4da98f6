//! The `memsock` command line's subcommands, one module each (the daemon's
//! own modules, `server` and `registry`, are in the library).

pub mod demo;
pub mod doctor;
pub mod echo;
pub mod hz;
pub mod metrics;
pub mod publish;
pub mod record;
pub mod replay;
pub mod stats;
pub mod top;

/// A subscriber of the tools that watch a stream (`echo`, `hz`):
/// keep-latest, so that it never holds the publisher back; up to `credits`;
/// waiting for the stream if it does not exist yet.
/// `history`: how many of the frames a stream keeps for late joiners to
/// take first (`echo` shows them, `hz` counts only live ones).
fn watcher(socket: &std::path::Path, stream: &str, credits: u32, history: u32) -> anyhow::Result<memsock::Subscriber> {
    let client = memsock::Client::connect_to(socket)?;
    let options = memsock::SubscribeOptions {
        credits,
        policy: memsock::OverflowPolicy::KeepLatest,
        wait_for_stream: true,
        credits_up_to: true,
        history,
        ..memsock::SubscribeOptions::default()
    };
    Ok(client.subscriber(stream, &options)?)
}
