//! Process plumbing for the runner: re-executing this binary as a child
//! with inherited descriptors, CPU pinning, resource usage, percentiles, and
//! a small shared region for the reference measurements.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::process::{Child, ChildStdout, Command, Stdio};

use anyhow::{Context, Result, bail};
use memmap2::{MmapOptions, MmapRaw};
use memsock_proto::platform::dup_for_child;
use serde_json::Value;

/// Environment variable carrying a child's role and parameters (JSON).
pub const CHILD_ENV: &str = "MEMSOCK_BENCH_CHILD";

/// A running child process and its result channel.
pub struct ChildProc {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl ChildProc {
    /// Starts this binary as a child with `spec` (must contain `"role"`),
    /// letting it inherit `fds` (their numbers are in `spec`).
    pub fn spawn(spec: &Value, fds: &[BorrowedFd<'_>]) -> Result<(Self, Vec<RawFd>)> {
        // Duplicates without close-on-exec are inherited by the child; they
        // are closed again in this process when `dups` is dropped.
        let dups: Vec<OwnedFd> = fds.iter().map(|fd| dup_for_child(*fd)).collect::<Result<_, _>>()?;
        let numbers: Vec<RawFd> = dups.iter().map(AsRawFd::as_raw_fd).collect();
        let mut spec = spec.clone();
        spec["fds"] = Value::from(numbers.clone());
        let mut child = Command::new(std::env::current_exe()?)
            .arg("child")
            .env(CHILD_ENV, spec.to_string())
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .context("spawning a benchmark child")?;
        drop(dups);
        let out = BufReader::new(child.stdout.take().expect("piped"));
        Ok((Self { child, out }, numbers))
    }

    /// Starts another program (a C or Python side of a measurement),
    /// reading its JSON lines as a child's.
    pub fn command(command: &mut Command) -> Result<Self> {
        let mut child =
            command.stdout(Stdio::piped()).stdin(Stdio::null()).spawn().context("spawning a benchmark program")?;
        let out = BufReader::new(child.stdout.take().expect("piped"));
        Ok(Self { child, out })
    }

    /// Reads the child's next output line as JSON.
    pub fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.out.read_line(&mut line)? == 0 {
            let status = self.child.wait()?;
            bail!("benchmark child exited early ({status})");
        }
        Ok(serde_json::from_str(line.trim())?)
    }

    /// Kills the child (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the child to end and returns its last line.
    pub fn finish(mut self) -> Result<Value> {
        let v = self.read()?;
        let status = self.child.wait()?;
        if !status.success() {
            bail!("benchmark child failed ({status})");
        }
        Ok(v)
    }
}

pub use memsock_tests::inherited_fds;

/// In a child: reports one JSON line to the parent.
pub fn report(v: &Value) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{v}").expect("parent reads our stdout");
    out.flush().expect("parent reads our stdout");
}

/// Pins the calling thread to `cpu` if the machine has it.
pub fn pin(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    let _ = rustix::thread::sched_setaffinity(None, &set);
}

/// CPU time (user + system) in nanoseconds and minor page faults of this process.
pub fn usage() -> (u64, u64) {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF is valid.
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr());
        ru.assume_init()
    };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    (tv(ru.ru_utime) + tv(ru.ru_stime), ru.ru_minflt as u64)
}

/// The `q`-quantile (0..=1) of `v` (sorted in place).
pub fn quantile(v: &mut [u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// A small shared-memory region for the reference measurements.
pub struct Region {
    fd: OwnedFd,
    map: MmapRaw,
}

impl Region {
    /// Creates a zeroed region of `len` bytes.
    pub fn create(len: usize) -> Result<Self> {
        let fd = memsock_proto::platform::create_shared_file("memsock-bench", len as u64, false)?;
        Self::map(fd, len)
    }

    /// Maps a region created by the parent.
    pub fn map(fd: OwnedFd, len: usize) -> Result<Self> {
        let map = MmapOptions::new().len(len).populate().map_raw(fd.as_raw_fd())?;
        Ok(Self { fd, map })
    }

    /// The descriptor, to pass to a child.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The region as a `T`.
    ///
    /// # Safety
    /// `T` must fit in the region, need at most page alignment, and be
    /// valid for any bytes (atomics and plain bytes only), since other
    /// processes write it concurrently.
    pub unsafe fn get<T>(&self) -> &T {
        assert!(std::mem::size_of::<T>() <= self.map.len());
        // SAFETY: the caller guarantees the type's requirements; the mapping
        // is page aligned and lives as long as `self`.
        unsafe { &*(self.map.as_ptr() as *const T) }
    }

    /// `len` bytes at `offset`, to read.
    ///
    /// # Safety
    /// The range must lie in the region and no one may write it meanwhile.
    pub unsafe fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        assert!(offset + len <= self.map.len());
        // SAFETY: in bounds (checked); the caller excludes writers.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(offset), len) }
    }

    /// `len` bytes at `offset`, to write.
    ///
    /// # Safety
    /// The range must lie in the region and no one else may access it meanwhile.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn bytes_mut(&self, offset: usize, len: usize) -> &mut [u8] {
        assert!(offset + len <= self.map.len());
        // SAFETY: in bounds (checked); the caller guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(offset), len) }
    }
}
