//! `memsock`: the broker daemon and the command line around it.

mod cli;

use cli::{demo, doctor, echo, hz, metrics, publish, record, replay, stats, top};

use memsock_broker::server;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "memsock", version, about = "Shared memory that feels like a local socket")]
struct Cli {
    /// The broker's control socket [default: $MEMSOCK_SOCKET, else
    /// $XDG_RUNTIME_DIR/memsock/broker.sock, else /tmp/memsock-<uid>/broker.sock]
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// How logs are written to stderr: text, or JSON lines (one object per
    /// event, its fields as keys). RUST_LOG filters them (default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the broker: hands out stream segments to clients over the
    /// control socket until SIGINT or SIGTERM.
    Broker {
        /// Also admit members of this group (socket mode 0660).
        #[arg(long)]
        group: Option<String>,
        /// A limit, KEY=VALUE (repeatable): connections=N, or
        /// {client,user,broker}.{streams,subscriptions,waits,memory,descriptors}=N
        /// (memory with a K, M, G or T suffix). Defaults: 1024
        /// connections; per client 1024 streams, 4096 subscriptions, 1024
        /// waits, a quarter of RAM and of the descriptors for streams; per
        /// user and broker-wide 4096, 16384, 4096, half of RAM and all the
        /// descriptors the broker may open but two per connection and 256.
        #[arg(long = "limit", value_name = "KEY=VALUE")]
        limits: Vec<String>,
        /// Exit after this many seconds without a client (a broker a
        /// client started exits after 60 unless told otherwise).
        #[arg(long, value_name = "SECS", env = "MEMSOCK_IDLE_EXIT")]
        idle_exit: Option<f64>,
        /// (internal) Started by the client of this pid (autostart).
        #[arg(long, hide = true)]
        autostarted_by: Option<u32>,
        /// (internal) The lock file, opened and locked by the client that
        /// starts this broker, as this descriptor.
        #[arg(long, hide = true)]
        lock_fd: Option<i32>,
        /// (internal) Leave the starter's session: fork, and let the
        /// starter reap the parent at once.
        #[arg(long, hide = true)]
        detach: bool,
    },
    /// Runs a broker on a temporary socket with a publisher and two
    /// subscribers (lossless and keep-latest) as separate processes, prints
    /// live rates, drops and latency, then a summary, and cleans up.
    Demo {
        /// How long the publisher publishes.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Frames per second.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Bytes per frame.
        #[arg(long, default_value_t = 1 << 20)]
        size: u32,
    },
    /// (internal) The demo's publisher.
    #[command(hide = true)]
    DemoPublisher {
        #[arg(long)]
        seconds: u64,
        #[arg(long)]
        rate: u64,
        #[arg(long)]
        size: u32,
    },
    /// Publishes COUNT frames of SIZE bytes (the sequence number in the
    /// first 8 bytes) to STREAM, as fast as lossless subscribers allow or
    /// at RATE per second, once SUBSCRIBERS have attached; prints
    /// {"sent":N,"seconds":T}.
    Publish {
        /// The stream to create (or take over).
        #[arg(long)]
        stream: String,
        /// Bytes per frame (and per slot).
        #[arg(long, default_value_t = 64)]
        size: u32,
        /// Slots in the pool.
        #[arg(long, default_value_t = 1024)]
        slots: u32,
        /// Frames to send.
        #[arg(long, default_value_t = 1_000_000)]
        count: u64,
        /// Frames per second (0: as fast as possible).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Wait for this many subscribers before sending.
        #[arg(long, default_value_t = 0)]
        subscribers: u32,
        /// Do not stamp frames with their send time (saves a clock read
        /// per frame; subscribers see a timestamp of 0).
        #[arg(long)]
        no_timestamps: bool,
        /// Keep the last N frames for subscribers that come later (they
        /// get them first, flagged as history); the stream then stays after
        /// this command exits, until it is closed or --history-idle passes.
        #[arg(long, default_value_t = 0)]
        history: u32,
        /// With --history: remove the stream once it has had neither
        /// publisher nor subscriber for this many seconds (0: keep it until
        /// it is closed).
        #[arg(long, default_value_t = 0.0)]
        history_idle: f64,
        /// After the last frame, stay attached (idle) until stdin ends.
        #[arg(long)]
        hold: bool,
    },
    /// (internal) A demo subscriber.
    #[command(hide = true)]
    DemoSubscriber {
        #[arg(long)]
        policy: String,
        #[arg(long)]
        credits: u32,
        #[arg(long, default_value_t = 0)]
        work_us: u64,
    },
    /// Records live streams into MCAP files until SIGINT or SIGTERM.
    Record(record::RecordArgs),
    /// Publishes recorded streams again, at their recorded pacing.
    Replay(replay::ReplayArgs),
    /// Shows every stream's publisher, rates and subscribers.
    Stats {
        /// How to print.
        #[arg(long, value_enum, default_value_t = stats::StatsFormat::Table)]
        format: stats::StatsFormat,
        /// Same as --format json.
        #[arg(long, conflicts_with = "format")]
        json: bool,
        /// Refresh every second until interrupted.
        #[arg(long)]
        watch: bool,
        /// Only this stream.
        #[arg(long)]
        stream: Option<String>,
    },
    /// Serves the broker's stats as Prometheus metrics over HTTP (the
    /// Prometheus or OpenMetrics text format, as the scraper asks).
    Metrics(metrics::MetricsArgs),
    /// Prints each frame of a stream as it comes (keep-latest: never holds
    /// the publisher back): sequence number, length, latency, first bytes.
    Echo(echo::EchoArgs),
    /// Prints a stream's rate and the statistics of its frame intervals
    /// every second.
    Hz(hz::HzArgs),
    /// Checks what breaks memfd-based shared memory on this host or in
    /// this container (seccomp, mlock limits, huge pages, the broker's
    /// memory cgroup, pid namespaces, the socket's directory, descriptor
    /// limits) and says how to fix each; exits non-zero if something
    /// would fail.
    Doctor(doctor::DoctorArgs),
    /// A live view of the streams and their subscribers (rates, slots,
    /// queues, lag, drops), refreshed every second; `q` quits.
    Top(top::TopArgs),
}

/// Errors end the program with one line: what failed, then its causes —
/// never a backtrace, whatever RUST_BACKTRACE says.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("memsock: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause once (some errors
/// already quote their cause).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}

/// The lock file descriptor the starting client passed (`--lock-fd`):
/// the lock file beside `socket`, no other.
fn adopt_lock_fd(fd: i32, socket: &std::path::Path) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    anyhow::ensure!(fd > 2, "--lock-fd {fd} is not a descriptor a client would pass");
    // The descriptor must be open (a number nobody passed would be taken
    // from whoever owns it): fstat says so without touching it.
    let meta = rustix::fs::fstat(
        // SAFETY: only borrowed for the call; checked open by it.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
    )
    .with_context(|| format!("--lock-fd {fd}"))?;
    let lock_path = memsock::control::broker_lock_path(socket);
    let named = rustix::fs::stat(&lock_path).with_context(|| format!("the lock file {}", lock_path.display()))?;
    anyhow::ensure!(
        rustix::fs::FileType::from_raw_mode(meta.st_mode) == rustix::fs::FileType::RegularFile
            && (meta.st_dev, meta.st_ino) == (named.st_dev, named.st_ino),
        "--lock-fd {fd} is not {}",
        lock_path.display()
    );
    // SAFETY: open (checked above) and passed to this process for it to
    // own: nothing else here uses that number.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)?;
    Ok(owned)
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    let socket = cli.socket.unwrap_or_else(memsock::default_socket_path);
    match cli.command {
        Command::Broker { group, limits: settings, idle_exit, autostarted_by, lock_fd, detach } => {
            let mut limits = memsock_broker::limits::Limits::default();
            for setting in &settings {
                limits.set(setting)?;
            }
            let idle_exit = match idle_exit {
                Some(s) if !(s.is_finite() && s > 0.0) => {
                    anyhow::bail!("--idle-exit must be a positive number of seconds")
                }
                Some(s) => Some(std::time::Duration::from_secs_f64(s)),
                None => autostarted_by.map(|_| std::time::Duration::from_secs(60)),
            };
            let inherited_lock = lock_fd.map(|fd| adopt_lock_fd(fd, &socket)).transpose()?;
            if detach {
                // Before the runtime starts a thread.
                memsock_proto::platform::daemonize().context("detaching from the starter")?;
            }
            let options = server::Options {
                group,
                limits,
                idle_exit,
                inherited_lock,
                autostarted_by,
                ..server::Options::new(socket)
            };
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            Ok(runtime.block_on(server::serve(options))?)
        }
        Command::Stats { format, json, watch, stream } => {
            let format = if json { stats::StatsFormat::Json } else { format };
            stats::run(&socket, format, watch, stream.as_deref())
        }
        Command::Metrics(args) => metrics::run(&socket, &args),
        Command::Echo(args) => echo::run(&socket, &args),
        Command::Hz(args) => hz::run(&socket, &args),
        Command::Doctor(args) => doctor::run(&socket, &args),
        Command::Top(args) => top::run(&socket, &args),
        Command::Demo { seconds, rate, size } => demo::run(demo::Demo { seconds, rate, size }),
        Command::Publish {
            stream,
            size,
            slots,
            count,
            rate,
            subscribers,
            no_timestamps,
            history,
            history_idle,
            hold,
        } => publish::run(
            &socket,
            &publish::PublishArgs {
                stream: &stream,
                size,
                slots,
                count,
                rate,
                subscribers,
                timestamps: !no_timestamps,
                history,
                history_idle: std::time::Duration::try_from_secs_f64(history_idle)
                    .map_err(|e| anyhow::anyhow!("--history-idle {history_idle}: {e}"))?,
                hold,
            },
        ),
        Command::Record(args) => record::run(&socket, &args),
        Command::Replay(args) => replay::run(&socket, &args),
        Command::DemoPublisher { seconds, rate, size } => demo::publisher(&socket, seconds, rate, size),
        Command::DemoSubscriber { policy, credits, work_us } => demo::subscriber(&socket, &policy, credits, work_us),
    }
}
