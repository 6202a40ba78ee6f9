//! A connection over a pair of pipes: a child's stdin and stdout (`exec:`, `ssh:`) on a source, or
//! emu's own stdin and stdout (`--incoming stdio`) on a destination.
//!
//! Sockets give the rest of `migrate` three things pipes lack, which this rebuilds with `poll`:
//! - timeouts: every read and write first polls, for at most the connection's timeout, and a
//!   timeout is `WouldBlock`, as on a socket. Writes go in pieces of at most `PIPE_BUF` bytes: a
//!   pipe that polls writable takes that much without blocking (a larger blocking write may wait
//!   for the reader, past any timeout), and such a write is atomic, so a record of at most
//!   `PIPE_BUF` bytes (GO) either went out whole or not at all, as the switchover relies on;
//! - `shutdown` from another thread: an eventfd in every poll wakes a blocked reader or writer,
//!   which then sees the end of the stream (reads) or a broken pipe (writes); then the pipes
//!   close, so the child reads its end of the stream;
//! - a reason: when a child closes its end, a bare "broken pipe" would hide why, so the error says
//!   how the child ended (`sh -c false` exited with status 1) and the last lines it wrote to
//!   stderr (`ssh: connect to host ... Connection refused`), which also go to the log as they come.
//!
//! The file descriptors are never made non-blocking: on a destination they are shared with whoever
//! started emu (sshd, a shell), and `O_NONBLOCK` belongs to the shared open file.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The largest write a pipe takes atomically, and without blocking once it polls writable.
const PIPE_CHUNK: usize = libc::PIPE_BUF;
/// Lines of a child's stderr kept for the error that says why it went away.
const STDERR_TAIL: usize = 4;
/// How long an error waits for a child that closed its pipe to exit, to report its status.
const EXIT_WAIT: Duration = Duration::from_secs(2);

/// One pipe connection; clones share it (as clones of a socket share the socket).
#[derive(Clone)]
pub struct Pipe(Arc<Inner>);

struct Inner {
    /// What is read from: the child's stdout, or emu's stdin. `None` once shut down.
    read: Mutex<Option<OwnedFd>>,
    /// Its number, for a poll that must not wait for the lock a blocked reader holds.
    read_raw: RawFd,
    /// What is written to: the child's stdin, or emu's stdout. `None` once finished or shut down.
    write: Mutex<Option<OwnedFd>>,
    /// Readable once `shutdown` was called: wakes every poll.
    wake: OwnedFd,
    shut: AtomicBool,
    read_timeout: Mutex<Option<Duration>>,
    write_timeout: Mutex<Option<Duration>>,
    child: Option<Arc<ChildWatch>>,
}

impl std::fmt::Debug for Pipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0.child {
            Some(c) => write!(f, "Pipe(`{}`)", c.name),
            None => write!(f, "Pipe(stdio)"),
        }
    }
}

/// The child at the other end: its name, how it ended, and what it last said on stderr.
struct ChildWatch {
    name: String,
    state: Mutex<ChildState>,
    ended: Condvar,
}

#[derive(Default)]
struct ChildState {
    status: Option<ExitStatus>,
    tail: VecDeque<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn dup_cloexec(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor or fails; nothing else is touched.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` was just made and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Whether `--incoming stdio` took emu's stdin and stdout already (they can be taken once).
static STDIO_TAKEN: AtomicBool = AtomicBool::new(false);

impl Pipe {
    fn new(read: OwnedFd, write: OwnedFd, child: Option<Arc<ChildWatch>>) -> io::Result<Pipe> {
        // SAFETY: eventfd makes a new descriptor or fails.
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if wake < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Pipe(Arc::new(Inner {
            read_raw: read.as_raw_fd(),
            read: Mutex::new(Some(read)),
            write: Mutex::new(Some(write)),
            // SAFETY: `wake` was just made and is owned by nobody else.
            wake: unsafe { OwnedFd::from_raw_fd(wake) },
            shut: AtomicBool::new(false),
            read_timeout: Mutex::new(None),
            write_timeout: Mutex::new(None),
            child,
        })))
    }

    /// emu's own stdin and stdout, for `--incoming stdio`. They move to new descriptors, and 0 and
    /// 1 are pointed elsewhere (stdin at /dev/null, stdout at stderr), so that nothing else in emu
    /// (a `println!`, the serial console, the stdin reader) can read from or write into the stream.
    pub fn stdio() -> io::Result<Pipe> {
        if STDIO_TAKEN.swap(true, Ordering::SeqCst) {
            return Err(io::Error::other("stdin and stdout carry a migration already"));
        }
        let read = dup_cloexec(libc::STDIN_FILENO)?;
        let write = dup_cloexec(libc::STDOUT_FILENO)?;
        let null = std::fs::File::open("/dev/null")?;
        // SAFETY: dup2 onto 0 and 1, which stay open (now elsewhere); the stream has its own
        // descriptors. Rust's stdout buffer, if it held anything, goes to stderr.
        unsafe {
            if libc::dup2(null.as_raw_fd(), libc::STDIN_FILENO) < 0
                || libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO) < 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Pipe::new(read, write, None)
    }

    /// Starts `cmd` with its stdin and stdout as the connection; its stderr goes to the log, line
    /// by line, under `name`. The child gets its own process group: a Ctrl-C meant for the
    /// source's terminal must not reach a destination that may be running the guest by then.
    pub fn spawn(mut cmd: Command, name: String) -> io::Result<Pipe> {
        use std::os::unix::process::CommandExt;
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        let mut child = cmd.spawn().map_err(|e| io::Error::new(e.kind(), format!("cannot start `{name}`: {e}")))?;
        let missing = || io::Error::other("a child without the pipes asked for");
        let stdin: OwnedFd = child.stdin.take().ok_or_else(missing)?.into();
        let stdout: OwnedFd = child.stdout.take().ok_or_else(missing)?.into();
        let stderr = child.stderr.take().ok_or_else(missing)?;
        let watch = Arc::new(ChildWatch { name, state: Mutex::default(), ended: Condvar::new() });
        let w = watch.clone();
        std::thread::Builder::new().name("transport-child".into()).spawn(move || w.follow(child, stderr))?;
        Pipe::new(stdout, stdin, Some(watch))
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        check_timeout(t)?;
        *lock(&self.0.read_timeout) = t;
        Ok(())
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        check_timeout(t)?;
        *lock(&self.0.write_timeout) = t;
        Ok(())
    }

    /// Ends both directions: wakes whoever waits in a read or write, then closes the pipes.
    pub fn shutdown(&self) {
        self.0.shut.store(true, Ordering::SeqCst);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to the eventfd this connection owns.
        let _ = unsafe { libc::write(self.0.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        // A woken reader or writer lets go of its lock at once; then the descriptors close.
        drop(lock(&self.0.read).take());
        drop(lock(&self.0.write).take());
    }

    /// Ends the sending direction: the peer reads the end of the stream.
    pub fn finish_writing(&self) -> io::Result<()> {
        drop(lock(&self.0.write).take());
        Ok(())
    }

    /// The descriptor read from, to poll whether the peer said something (`AsRawFd`). Once shut
    /// down it is closed and the number may be another file's: a poll is all it may be used for,
    /// and a read after it goes through [`Pipe::read`], which knows.
    pub fn read_fd(&self) -> RawFd {
        self.0.read_raw
    }

    /// Waits until `fd` is ready for `events`, the connection is shut down (`Ok(false)`), or the
    /// timeout passes (`WouldBlock`, as a socket's timeout reads).
    fn wait(&self, fd: RawFd, events: libc::c_short, timeout: Option<Duration>) -> io::Result<bool> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if self.0.shut.load(Ordering::SeqCst) {
                return Ok(false);
            }
            let ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                    // Rounded up: a 0 ms poll for a sub-millisecond rest would spin.
                    i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
                }
            };
            let mut fds = [
                libc::pollfd { fd, events, revents: 0 },
                libc::pollfd { fd: self.0.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: two valid pollfds, alive for the duration of the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if fds[1].revents != 0 {
                return Ok(false);
            }
            // Ready, or hung up / in error: the read or write itself says which.
            if fds[0].revents != 0 {
                return Ok(true);
            }
        }
    }

    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let fd = lock(&self.0.read);
        let Some(fd) = fd.as_ref() else { return Ok(0) }; // shut down: the end, as on a socket
        let timeout = *lock(&self.0.read_timeout);
        if !self.wait(fd.as_raw_fd(), libc::POLLIN, timeout)? {
            return Ok(0);
        }
        loop {
            // SAFETY: reads into a live buffer of buf.len() bytes from a descriptor we own.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                return Ok(n as usize);
            }
            if n == 0 {
                return self.peer_gone(Ok(0), false);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let fd = lock(&self.0.write);
        let Some(fd) = fd.as_ref() else { return Err(io::ErrorKind::BrokenPipe.into()) };
        let timeout = *lock(&self.0.write_timeout);
        if !self.wait(fd.as_raw_fd(), libc::POLLOUT, timeout)? {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let len = buf.len().min(PIPE_CHUNK);
        loop {
            // SAFETY: writes `len` bytes of a live buffer to a descriptor we own.
            let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), len) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::BrokenPipe => return self.peer_gone(Err(e), true),
                _ => return Err(e),
            }
        }
    }

    /// The other end closed. For a child, say how it ended if it did: a broken pipe always (the
    /// bare errno says nothing), the end of the stream if the child failed (it is gone, not done;
    /// a child that exited 0 ended its stream as it should); else `plain`.
    fn peer_gone(&self, plain: io::Result<usize>, even_on_success: bool) -> io::Result<usize> {
        let Some(child) = &self.0.child else { return plain };
        match child.describe_end(EXIT_WAIT) {
            Some((why, ok)) if even_on_success || !ok => Err(io::Error::new(io::ErrorKind::BrokenPipe, why)),
            _ => plain,
        }
    }
}

fn check_timeout(t: Option<Duration>) -> io::Result<()> {
    // As a socket: a zero timeout is refused (it would mean "do not wait" nowhere else).
    if t == Some(Duration::ZERO) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "a zero timeout"));
    }
    Ok(())
}

impl ChildWatch {
    /// The child's stderr to the log, then its exit status: runs in its own thread until the
    /// child has exited (it is never killed: after GO it may be running the guest).
    fn follow(&self, mut child: Child, stderr: ChildStderr) {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            log::warn!("{}: {line}", self.name);
            let mut s = lock(&self.state);
            if s.tail.len() == STDERR_TAIL {
                s.tail.pop_front();
            }
            s.tail.push_back(line);
        }
        let status = child.wait();
        match &status {
            Ok(s) if s.success() => log::info!("`{}` exited", self.name),
            Ok(s) => log::warn!("`{}` {}", self.name, ended(s)),
            Err(e) => log::warn!("`{}`: cannot wait for it: {e}", self.name),
        }
        lock(&self.state).status = Some(status.unwrap_or_else(|_| ExitStatus::default()));
        self.ended.notify_all();
    }

    /// How the child ended, and whether it succeeded, waiting up to `wait` for it; `None` if it is
    /// still running.
    fn describe_end(&self, wait: Duration) -> Option<(String, bool)> {
        let s = lock(&self.state);
        let (s, _) = self.ended.wait_timeout_while(s, wait, |s| s.status.is_none()).unwrap_or_else(|e| e.into_inner());
        let status = s.status?;
        let mut why = format!("`{}` {}", self.name, ended(&status));
        if !s.tail.is_empty() {
            why.push_str("; it said: ");
            why.push_str(&s.tail.iter().cloned().collect::<Vec<_>>().join(" / "));
        }
        Some((why, status.success()))
    }
}

fn ended(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => "ended".to_string(),
    }
}
