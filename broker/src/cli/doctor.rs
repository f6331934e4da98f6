//! `memsock doctor`: checks what breaks memfd-based shared memory on this
//! host or in this container, and says how to fix each problem.
//!
//! Each check does the real thing where it can (creates, seals, maps and
//! locks a segment as a stream does) and reads the limits that explain a
//! failure. It runs in the environment of the process that starts it — a
//! client's — and reads the broker's side (its memory cgroup, its pid
//! namespace, its descriptors) when a broker answers at the socket.

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use anyhow::Result;
use memsock::{Client, StatsReport};
use memsock_proto::platform;
use memsock_proto::shm::{StreamConfig, StreamSegment};
use serde::Serialize;
use serde_json::json;

/// `memsock doctor`.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Memory the locked (mlock) streams you plan need, with a K, M or G
    /// suffix: a segment this large is created and locked to check it.
    #[arg(long, default_value = "16M", value_parser = parse_size)]
    mlock_size: u64,
    /// A list of checks as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_size(text: &str) -> Result<u64, String> {
    let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = digits.parse().map_err(|_| format!("{text:?}: a number with an optional K, M or G suffix"))?;
    let shift = match unit {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        _ => return Err(format!("{text:?}: unknown suffix {unit:?} (K, M or G)")),
    };
    n.checked_shl(shift).filter(|v| v >> shift == n).ok_or_else(|| format!("{text:?} is too large"))
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    /// Works.
    Ok,
    /// Works, with a caveat worth knowing.
    Warn,
    /// Something would fail.
    Fail,
}

#[derive(Debug, Serialize)]
struct Check {
    check: &'static str,
    status: Status,
    /// What was found.
    detail: String,
    /// How to fix it (none when it is fine).
    advice: Option<String>,
}

fn ok(check: &'static str, detail: String) -> Check {
    Check { check, status: Status::Ok, detail, advice: None }
}

fn problem(check: &'static str, status: Status, detail: String, advice: impl Into<String>) -> Check {
    Check { check, status, detail, advice: Some(advice.into()) }
}

/// Runs every check; prints them; fails when one would fail.
pub fn run(socket: &Path, args: &DoctorArgs) -> Result<()> {
    let (broker, broker_check) = match Client::connect_to(socket).and_then(|c| c.stats(None)) {
        Ok(report) => {
            let detail = format!("broker pid {} answers at {}", report.broker_pid, socket.display());
            (Some(report), ok("broker", detail))
        }
        Err(e) => (
            None,
            problem(
                "broker",
                Status::Warn,
                format!("no broker answers at {}: {e}", socket.display()),
                "start one (`memsock broker`, or `systemctl --user start memsock` with deploy/'s unit); \
                 the checks of the broker's side are skipped",
            ),
        ),
    };
    let checks = vec![
        broker_check,
        memfd(),
        memlock(args.mlock_size),
        huge_pages(),
        memory_cgroup(broker.as_ref()),
        pid_namespace(broker.as_ref()),
        socket_dir(socket),
        descriptors(broker.as_ref()),
    ];
    let failed = checks.iter().any(|c| c.status == Status::Fail);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json!({ "ok": !failed, "checks": checks }))?);
    } else {
        for c in &checks {
            let status = match c.status {
                Status::Ok => "ok  ",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            println!("{status}  {:<14} {}", c.check, c.detail);
            if let Some(advice) = &c.advice {
                println!("      {:<14} → {advice}", "");
            }
        }
    }
    if failed {
        anyhow::bail!("some checks failed (see above)");
    }
    Ok(())
}

/// Anonymous shared memory (`memfd_create`), sealed and mapped: a small
/// stream, created as every stream is.
fn memfd() -> Check {
    match StreamSegment::create("doctor", &StreamConfig::new(4096, 4)) {
        Ok(_) => ok("memfd", "memfd_create, sealing and shared mappings work".into()),
        Err(e) => problem(
            "memfd",
            Status::Fail,
            format!("creating, sealing or mapping a memfd failed: {e}"),
            "a seccomp profile may forbid memfd_create or fcntl(F_ADD_SEALS): allow both in the \
             container's profile (Docker's default allows them), or run with the runtime's default profile",
        ),
    }
}

/// A locked segment of `size` bytes, created as a stream with `mlock` is.
fn memlock(size: u64) -> Check {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Memlock);
    let limit_text = match limit.current {
        None => "unlimited".to_owned(),
        Some(n) => format!("{} KiB", n >> 10),
    };
    let ipc_lock = has_capability(CAP_IPC_LOCK);
    let slot = 1u32 << 20;
    let mut config = StreamConfig::new(slot, size.div_ceil(u64::from(slot)).clamp(1, 1 << 20) as u32);
    config.mlock = true;
    let tried = StreamSegment::create("doctor", &config);
    let why = if ipc_lock { " (CAP_IPC_LOCK: no limit applies)" } else { "" };
    match tried {
        Ok(_) => ok("memlock", format!("a {} MiB locked stream works; RLIMIT_MEMLOCK {limit_text}{why}", size >> 20)),
        Err(e) => problem(
            "memlock",
            Status::Fail,
            format!("a {} MiB locked stream cannot be created: RLIMIT_MEMLOCK is {limit_text}: {e}", size >> 20),
            "streams with mlock need RLIMIT_MEMLOCK above their size in every process that maps them: \
             raise it (`ulimit -l`, LimitMEMLOCK= in the systemd unit, --ulimit memlock= for a container, \
             /etc/security/limits.conf) or grant CAP_IPC_LOCK",
        ),
    }
}

const CAP_IPC_LOCK: u32 = 14;

/// Whether this process has `capability` in its effective set.
fn has_capability(capability: u32) -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << capability) != 0)
}

fn meminfo(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.split(':').next() == Some(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Huge pages reserved for streams that ask for them.
fn huge_pages() -> Check {
    let (total, free, size_kb) =
        (meminfo("HugePages_Total").unwrap_or(0), meminfo("HugePages_Free").unwrap_or(0), meminfo("Hugepagesize"));
    let size = size_kb.map_or("?".into(), |kb| format!("{} MiB", kb >> 10));
    if total == 0 {
        return problem(
            "huge_pages",
            Status::Warn,
            format!("no huge pages reserved (page size {size})"),
            "streams asking for huge pages fall back to 4 KiB pages (more TLB misses on large frames): \
             reserve some with `sysctl vm.nr_hugepages=N` (N × the page size covers the streams' pools)",
        );
    }
    ok("huge_pages", format!("{free} of {total} huge pages of {size} free"))
}

/// The memory cgroup of `pid`'s process: its limit and usage in bytes
/// (`None` for no limit), and its path. cgroup v2, else v1.
fn memory_cgroup_of(pid: u32) -> Option<(Option<u64>, Option<u64>, String)> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let number = |path: &str| std::fs::read_to_string(path).ok().and_then(|t| t.trim().parse::<u64>().ok());
    let v1 = cgroups.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers.split(',').any(|c| c == "memory").then(|| path.to_owned())
    });
    if let Some(path) = v1 {
        let dir = format!("/sys/fs/cgroup/memory{path}");
        // v1 says "no limit" with a number near 2^63.
        let limit = number(&format!("{dir}/memory.limit_in_bytes")).filter(|&l| l < 1 << 62);
        return Some((limit, number(&format!("{dir}/memory.usage_in_bytes")), path));
    }
    let path = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?.to_owned();
    let dir = format!("/sys/fs/cgroup{path}");
    Some((number(&format!("{dir}/memory.max")), number(&format!("{dir}/memory.current")), path))
}

/// The broker pre-faults segments: they are charged to its memory cgroup,
/// and an OOM kill there ends everyone's streams.
fn memory_cgroup(broker: Option<&StatsReport>) -> Check {
    let (pid, whose) = match broker {
        Some(r) if Path::new(&format!("/proc/{}", r.broker_pid)).exists() => (r.broker_pid, "the broker's"),
        _ => (platform::current_pid(), "this process's"),
    };
    let streams: u64 =
        broker.map_or(0, |r| r.streams.iter().map(|s| u64::from(s.slot_size) * u64::from(s.slot_count)).sum());
    let mib = |b: u64| b >> 20;
    match memory_cgroup_of(pid) {
        None => ok("memory_cgroup", format!("no memory cgroup found for {whose} process")),
        Some((None, _, path)) => ok("memory_cgroup", format!("{whose} memory cgroup {path} has no limit")),
        Some((Some(limit), usage, path)) => {
            let usage = usage.unwrap_or(0);
            let detail = format!(
                "{whose} memory cgroup {path}: {} MiB used of {} MiB; its streams' pools take {} MiB",
                mib(usage),
                mib(limit),
                mib(streams)
            );
            let advice = "segments are charged to the broker's cgroup (it pre-faults them), and an OOM kill \
                          there ends every stream: give the broker room for every pool (MemoryMax= in its unit, \
                          --memory for its container)";
            let status = if usage.saturating_mul(10) >= limit.saturating_mul(9) { Status::Fail } else { Status::Warn };
            problem("memory_cgroup", status, detail, advice)
        }
    }
}

fn pid_ns(pid: &str) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
}

/// Peers in another pid namespace than the broker's may read as pid 0 to
/// it, and then get the weaker lease (the connection instead of the
/// process).
fn pid_namespace(broker: Option<&StatsReport>) -> Check {
    let Some(r) = broker else {
        return ok("pid_namespace", "no broker to compare with".into());
    };
    let ours = pid_ns("self");
    let theirs = pid_ns(&r.broker_pid.to_string());
    match (ours, theirs) {
        (Some(a), Some(b)) if a == b => {
            ok("pid_namespace", format!("same pid namespace as the broker ({})", a.display()))
        }
        (a, b) => problem(
            "pid_namespace",
            Status::Warn,
            format!(
                "the broker (pid {} in its namespace) is not in this process's pid namespace ({} vs {})",
                r.broker_pid,
                a.map_or("?".into(), |p| p.display().to_string()),
                b.map_or("not visible".into(), |p| p.display().to_string())
            ),
            "the broker cannot watch the processes of clients it sees as pid 0: their lease is their \
             connection, and a client that closes it while its process lives loses its streams. Share the \
             pid namespace (--pid=host or the broker's container's, or the same pod)",
        ),
    }
}

/// The socket's directory: ours, not writable by others (who could
/// replace the socket).
fn socket_dir(socket: &Path) -> Check {
    let Some(dir) = socket.parent() else { return ok("socket_dir", "the socket has no directory".into()) };
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) => {
            return ok(
                "socket_dir",
                format!("{} does not exist yet ({e}): the broker makes it owner-only", dir.display()),
            );
        }
    };
    let (uid, mode) = (meta.uid(), meta.mode() & 0o7777);
    let me = platform::current_uid();
    let detail = format!("{} is owned by uid {uid}, mode {mode:04o}", dir.display());
    if uid != me && uid != 0 {
        return problem(
            "socket_dir",
            Status::Fail,
            detail,
            format!(
                "another user owns the socket's directory and could stand in for the broker: use a directory of \
                 your own (--socket, $MEMSOCK_SOCKET), or remove this one (you are uid {me})"
            ),
        );
    }
    if mode & 0o002 != 0 && mode & 0o1000 == 0 {
        return problem(
            "socket_dir",
            Status::Fail,
            detail,
            format!("anyone may replace the socket: `chmod o-w {}`", dir.display()),
        );
    }
    if mode & 0o022 != 0 {
        return problem(
            "socket_dir",
            Status::Warn,
            detail,
            "others than its owner may write there: fine for a shared group (`memsock broker --group`), \
             otherwise `chmod go-w` it",
        );
    }
    ok("socket_dir", detail)
}

/// Each subscriber takes descriptors in the broker and in its process.
fn descriptors(broker: Option<&StatsReport>) -> Check {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let (soft, hard) = (limit.current.unwrap_or(u64::MAX), limit.maximum.unwrap_or(u64::MAX));
    let fmt = |n: u64| if n == u64::MAX { "unlimited".to_owned() } else { n.to_string() };
    let mut detail = format!("this process may open {} descriptors (hard limit {})", fmt(soft), fmt(hard));
    if let Some(r) = broker {
        detail.push_str(&format!("; the broker has {} of {} open", r.descriptors, r.descriptor_limit));
        if r.descriptor_limit > 0 && r.descriptors.saturating_mul(10) >= r.descriptor_limit.saturating_mul(9) {
            return problem(
                "descriptors",
                Status::Fail,
                detail,
                "the broker is near its descriptor limit: new streams and subscribers will be refused. \
                 Raise LimitNOFILE= in its unit (it raises its soft limit to the hard one itself)",
            );
        }
    }
    if hard < 4096 {
        return problem(
            "descriptors",
            Status::Warn,
            detail,
            "a client holds a descriptor per stream and subscriber: raise the hard limit (`ulimit -Hn`, \
             LimitNOFILE=) if yours uses many",
        );
    }
    ok("descriptors", detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_suffixes_and_refuse_the_rest() {
        assert_eq!(parse_size("16M"), Ok(16 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999G").is_err());
    }
}
