//! Transports: a migration URI turned into a byte stream.
//!
//! - `tcp:HOST:PORT` (`tcp:0:4444` listens on every address; `tcp:[::1]:4444` for IPv6). Plain TCP
//!   is neither encrypted nor authenticated: fine on loopback or a dedicated migration network,
//!   anything else gets a warning ([`Uri::plaintext_warning`]).
//! - `unix:PATH`
//! - `exec:COMMAND` (source): runs `sh -c COMMAND`; the stream goes to its stdin and the
//!   destination's answers come from its stdout. QEMU's `exec:` is one-way (the stream only);
//!   emu's handover needs the return path (READY, STARTED, ERROR), so COMMAND must carry both
//!   directions, as `emu --incoming stdio` does, or `ssh HOST emu --incoming stdio`.
//! - `ssh:[USER@]HOST[:PORT][?emu=PATH&config=FILE&args=ARGS]` (source): `exec:` with the system
//!   `ssh` client (`-o BatchMode=yes`: no password prompt can hang a migration) running
//!   `PATH --incoming stdio ARGS` on HOST ([`SshTarget`]).
//! - `stdio` (destination): `emu --incoming stdio` reads the stream from stdin and answers on
//!   stdout, for `exec:` and `ssh:` sources.
//!
//! The stream is bidirectional: records go source to destination, and the destination answers on
//! the same connection (READY, STARTED or a refusal).
//!
//! `exec:`, `ssh:` and `stdio` carry exactly one connection (a pipe pair), so a migration over them
//! uses one channel ([`channels_for`]), and a second [`connect`] (a page channel, or a RESOLVE
//! after a lost STARTED) is refused instead of starting another destination.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::Command;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod pipe;
mod psk;
mod tls;
pub use pipe::Pipe;
pub use psk::PskError;
pub use tls::{TlsConfig, TlsCreds, TlsError};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Uri {
    Tcp {
        host: String,
        port: u16,
    },
    Unix(PathBuf),
    /// `exec:COMMAND`, run with `sh -c`.
    Exec(String),
    Ssh(SshTarget),
    /// `stdio`: a destination's stdin and stdout.
    Stdio,
    /// `tcp:HOST:PORT` with mutual TLS: never parsed, made by [`Uri::with_tls`] from a `tcp:` URI
    /// and the credentials (`tls.rs`). Shown as the `tcp:` URI it came from.
    Tls {
        host: String,
        port: u16,
        config: Tls,
    },
}

/// A TLS configuration in a [`Uri`]; two are equal if they are the same one.
#[derive(Clone, Debug)]
pub struct Tls(pub Arc<TlsConfig>);

impl PartialEq for Tls {
    fn eq(&self, other: &Tls) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Tls {}

/// `ssh:[USER@]HOST[:PORT][?emu=PATH&config=FILE&args=ARGS]`: where and how the destination runs.
///
/// - `emu=PATH`: the emu binary on HOST (default `emu`, found on the remote PATH);
/// - `config=FILE`: an ssh client configuration file (`ssh -F FILE`: keys, known hosts, jump
///   hosts), else the user's `~/.ssh/config`;
/// - `args=ARGS`: the destination's further options, the rest of the URI taken as it is and
///   split by the remote shell, as in QEMU's `exec:ssh HOST qemu -incoming ...`
///   (`args=--monitor unix:/run/emu.sock -S`). RAM size and vCPU count come from the stream, so
///   `--mem`/`--smp` are not needed (if given they must match); `--dirty-tracker kvm-dirty-ring`
///   belongs here if the guest is to migrate on with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SshTarget {
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
    pub emu: String,
    pub config: Option<PathBuf>,
    pub args: String,
}

/// The remote emu unless `emu=` says otherwise.
pub const DEFAULT_REMOTE_EMU: &str = "emu";

impl SshTarget {
    /// The `ssh` command line (program and arguments) that starts the destination.
    pub fn command_line(&self) -> Vec<String> {
        // BatchMode: a password or host-key prompt would wait forever on a terminal nobody sees.
        // `-e none`: the stream is binary and may hold "\n~.", ssh's disconnect escape. `-T`: no
        // terminal (it would mangle the bytes).
        let mut argv: Vec<String> = ["ssh", "-o", "BatchMode=yes", "-e", "none", "-T"].map(String::from).into();
        if let Some(config) = &self.config {
            argv.extend(["-F".to_string(), config.display().to_string()]);
        }
        if let Some(port) = self.port {
            argv.extend(["-p".to_string(), port.to_string()]);
        }
        if let Some(user) = &self.user {
            argv.extend(["-l".to_string(), user.clone()]);
        }
        // `--`: nothing after it is an option, whatever the host is called.
        argv.extend(["--".to_string(), self.host.clone(), self.remote_command()]);
        argv
    }

    /// What the remote shell runs: `exec` so that no shell sits between sshd and emu.
    pub fn remote_command(&self) -> String {
        let mut cmd = format!("exec {} --incoming stdio", sh_quote(&self.emu));
        if !self.args.is_empty() {
            cmd.push(' ');
            cmd.push_str(&self.args);
        }
        cmd
    }
}

/// `s` as one word for a POSIX shell.
fn sh_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@".contains(&b)) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[derive(Debug, thiserror::Error)]
#[error(
    "'{uri}' is not a migration URI ({why}); use tcp:HOST:PORT, unix:PATH, exec:COMMAND, \
     ssh:[USER@]HOST[:PORT], file:PATH (a checkpoint) or (destination) stdio"
)]
pub struct BadUri {
    uri: String,
    why: &'static str,
}

fn parse_ssh(rest: &str) -> Result<SshTarget, &'static str> {
    let (target, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (user, hostport) = match target.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, target),
    };
    let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']').ok_or("no ']' after an IPv6 address")?;
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':').ok_or("bad port")?)),
        }
    } else {
        match hostport.split_once(':') {
            // More than one ':' without brackets: a bare IPv6 address.
            Some((h, p)) if !p.contains(':') => (h, Some(p)),
            _ => (hostport, None),
        }
    };
    let port = port.map(|p| p.parse::<u16>().ok().filter(|&p| p != 0).ok_or("bad port")).transpose()?;
    // A name starting with '-' would be read by ssh as an option (-oProxyCommand=...).
    let word_ok = |w: &str| !w.is_empty() && !w.starts_with('-') && !w.chars().any(char::is_whitespace);
    if !word_ok(host) {
        return Err("bad host");
    }
    if user.is_some_and(|u| !word_ok(u)) {
        return Err("bad user");
    }
    let mut t = SshTarget {
        user: user.map(str::to_string),
        host: host.to_string(),
        port,
        emu: DEFAULT_REMOTE_EMU.to_string(),
        config: None,
        args: String::new(),
    };
    let mut query = query;
    while !query.is_empty() {
        // args= takes the rest as it is: it is shell words, which may hold '&'.
        if let Some(args) = query.strip_prefix("args=") {
            t.args = args.trim().to_string();
            break;
        }
        let (item, more) = query.split_once('&').unwrap_or((query, ""));
        query = more;
        match item.split_once('=') {
            Some(("emu", v)) if !v.is_empty() => t.emu = v.to_string(),
            Some(("config", v)) if !v.is_empty() => t.config = Some(PathBuf::from(v)),
            Some(("emu" | "config", _)) => return Err("empty ssh option"),
            _ => return Err("unknown ssh option (emu=, config=, args=)"),
        }
    }
    Ok(t)
}

impl FromStr for Uri {
    type Err = BadUri;

    fn from_str(s: &str) -> Result<Self, BadUri> {
        let bad = |why| BadUri { uri: s.to_string(), why };
        if s == "stdio" {
            return Ok(Uri::Stdio);
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("empty path"));
            }
            return Ok(Uri::Unix(PathBuf::from(path)));
        }
        if let Some(cmd) = s.strip_prefix("exec:") {
            if cmd.trim().is_empty() {
                return Err(bad("empty command"));
            }
            return Ok(Uri::Exec(cmd.to_string()));
        }
        if let Some(rest) = s.strip_prefix("ssh:") {
            return parse_ssh(rest).map(Uri::Ssh).map_err(bad);
        }
        let Some(rest) = s.strip_prefix("tcp:") else {
            return Err(bad("unknown scheme"));
        };
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        let port = port.parse().map_err(|_| bad("bad port"))?;
        let host = if host.is_empty() || host == "0" { "0.0.0.0".to_string() } else { host.to_string() };
        Ok(Uri::Tcp { host, port })
    }
}

impl std::fmt::Display for Uri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Uri::Tcp { host, port } | Uri::Tls { host, port, .. } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port}")
            }
            Uri::Tcp { host, port } | Uri::Tls { host, port, .. } => write!(f, "tcp:{host}:{port}"),
            Uri::Unix(p) => write!(f, "unix:{}", p.display()),
            Uri::Exec(cmd) => write!(f, "exec:{cmd}"),
            Uri::Stdio => write!(f, "stdio"),
            Uri::Ssh(t) => {
                write!(f, "ssh:")?;
                if let Some(u) = &t.user {
                    write!(f, "{u}@")?;
                }
                match (t.host.contains(':'), t.port) {
                    (true, Some(p)) => write!(f, "[{}]:{p}", t.host)?,
                    (false, Some(p)) => write!(f, "{}:{p}", t.host)?,
                    (_, None) => write!(f, "{}", t.host)?,
                }
                let mut sep = '?';
                let mut item = |f: &mut std::fmt::Formatter<'_>, k: &str, v: &str| {
                    let r = write!(f, "{sep}{k}={v}");
                    sep = '&';
                    r
                };
                if t.emu != DEFAULT_REMOTE_EMU {
                    item(f, "emu", &t.emu)?;
                }
                if let Some(c) = &t.config {
                    item(f, "config", &c.display().to_string())?;
                }
                if !t.args.is_empty() {
                    item(f, "args", &t.args)?;
                }
                Ok(())
            }
        }
    }
}

impl Uri {
    /// `tcp:` with mutual TLS if `config` is there; any other URI as it is (TLS is for TCP: a Unix
    /// socket stays on this host, and ssh: encrypts already).
    pub fn with_tls(self, config: Option<Arc<TlsConfig>>) -> Uri {
        match (self, config) {
            (Uri::Tcp { host, port }, Some(c)) => Uri::Tls { host, port, config: Tls(c) },
            (uri, _) => uri,
        }
    }

    /// Whether the transport carries one connection only (a pipe pair): no page channels, no
    /// resolution connections.
    pub fn single_connection(&self) -> bool {
        matches!(self, Uri::Exec(_) | Uri::Ssh(_) | Uri::Stdio)
    }

    /// For a source: a warning if the stream would cross a network in the clear. Plain TCP has
    /// neither encryption nor authentication: anyone on the path reads the guest's memory, and
    /// anyone who can reach the destination's port can hand it a guest. Loopback (and the
    /// unspecified address, which connects to this host) stays on this machine; a name counts as
    /// local only if every address it resolves to is.
    pub fn plaintext_warning(&self) -> Option<String> {
        let Uri::Tcp { host, port } = self else { return None };
        let local = match (host.as_str(), *port).to_socket_addrs() {
            Ok(addrs) => {
                let addrs: Vec<_> = addrs.collect();
                !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback() || a.ip().is_unspecified())
            }
            Err(_) => false,
        };
        (!local).then(|| {
            format!(
                "migrating to {self}: the stream is unencrypted and unauthenticated (guest memory in the \
                 clear); use ssh: or a trusted network"
            )
        })
    }
}

/// The channels a migration to `uri` uses when `wanted` are asked for: one on a single-connection
/// transport (said once, in the log, per migration).
pub fn channels_for(uri: &Uri, wanted: u32) -> u32 {
    if uri.single_connection() && wanted > 1 {
        log::warn!("migrating to {uri}: one connection, so one channel (channels is {wanted})");
        return 1;
    }
    wanted
}

/// One migration connection.
#[derive(Debug)]
pub enum Connection {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// `exec:`, `ssh:` (a child's stdin and stdout) and `stdio` (emu's own).
    Pipe(Pipe),
}

impl Connection {
    pub fn try_clone(&self) -> io::Result<Connection> {
        Ok(match self {
            Connection::Tcp(s) => Connection::Tcp(s.try_clone()?),
            Connection::Unix(s) => Connection::Unix(s.try_clone()?),
            Connection::Pipe(p) => Connection::Pipe(p.clone()),
        })
    }

    /// Ends both directions; a thread blocked in read or write on a clone returns at once.
    pub fn shutdown(&self) {
        let _ = match self {
            Connection::Tcp(s) => s.shutdown(Shutdown::Both),
            Connection::Unix(s) => s.shutdown(Shutdown::Both),
            Connection::Pipe(p) => {
                p.shutdown();
                Ok(())
            }
        };
    }

    /// Ends the sending direction (the peer reads the end of the stream); reading goes on.
    pub fn finish_writing(&self) -> io::Result<()> {
        match self {
            Connection::Tcp(s) => s.shutdown(Shutdown::Write),
            Connection::Unix(s) => s.shutdown(Shutdown::Write),
            Connection::Pipe(p) => p.finish_writing(),
        }
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Connection::Tcp(s) => s.set_read_timeout(t),
            Connection::Unix(s) => s.set_read_timeout(t),
            Connection::Pipe(p) => p.set_read_timeout(t),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Connection::Tcp(s) => s.set_write_timeout(t),
            Connection::Unix(s) => s.set_write_timeout(t),
            Connection::Pipe(p) => p.set_write_timeout(t),
        }
    }
}

impl Connection {
    /// Sends `bytes` with the file descriptors `fds` attached (SCM_RIGHTS): unix: connections
    /// only (a same-host handover passes guest RAM's memfds so).
    pub fn send_with_fds(&self, bytes: &[u8], fds: &[std::os::fd::RawFd]) -> io::Result<()> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        use std::os::fd::AsRawFd;
        let Connection::Unix(s) = self else {
            return Err(io::Error::other("file descriptors travel on unix: connections only"));
        };
        let iov = [io::IoSlice::new(bytes)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let n = sendmsg::<()>(s.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).map_err(io::Error::from)?;
        (&*s).write_all(&bytes[n..])
    }

    /// Reads exactly `buf.len()` bytes, and the file descriptors sent with them (SCM_RIGHTS).
    pub fn recv_with_fds(&self, buf: &mut [u8]) -> io::Result<Vec<std::os::fd::OwnedFd>> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
        let Connection::Unix(s) = self else {
            return Err(io::Error::other("file descriptors travel on unix: connections only"));
        };
        let mut fds = Vec::new();
        let mut got = 0;
        while got < buf.len() {
            let mut space = nix::cmsg_space!([RawFd; 64]);
            let mut iov = [io::IoSliceMut::new(&mut buf[got..])];
            let msg = recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
                .map_err(io::Error::from)?;
            if msg.bytes == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            for c in msg.cmsgs().map_err(io::Error::from)? {
                if let ControlMessageOwned::ScmRights(r) = c {
                    // SAFETY: descriptors the kernel just installed in this process for us.
                    fds.extend(r.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                }
            }
            got += msg.bytes;
        }
        Ok(fds)
    }
}

impl Read for &Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Connection::Tcp(s) => (&*s).read(buf),
            Connection::Unix(s) => (&*s).read(buf),
            Connection::Pipe(p) => p.read(buf),
        }
    }
}

impl Write for &Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Connection::Tcp(s) => (&*s).write(buf),
            Connection::Unix(s) => (&*s).write(buf),
            Connection::Pipe(p) => p.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl std::os::fd::AsRawFd for Connection {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Connection::Tcp(s) => s.as_raw_fd(),
            Connection::Unix(s) => s.as_raw_fd(),
            Connection::Pipe(p) => p.read_fd(),
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Connection::Tcp(s) => s.read(buf),
            Connection::Unix(s) => s.read(buf),
            Connection::Pipe(p) => p.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Connection::Tcp(s) => s.write(buf),
            Connection::Unix(s) => s.write(buf),
            Connection::Pipe(p) => p.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Connection::Tcp(s) => s.write_vectored(bufs),
            Connection::Unix(s) => s.write_vectored(bufs),
            Connection::Pipe(p) => match bufs.iter().find(|b| !b.is_empty()) {
                Some(b) => p.write(b),
                None => Ok(0),
            },
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads and drops what the peer still sends, until it closes or 2 s pass, then closes. Closing a
/// socket with unread data makes TCP reset the connection, which can destroy a reply (an ERROR
/// record) still in flight.
pub fn drain_and_close(mut conn: Connection) {
    use std::time::Instant;
    let deadline = Instant::now() + Duration::from_secs(2);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = vec![0u8; 64 << 10];
    while Instant::now() < deadline {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    conn.shutdown();
}

/// How long a source waits for the destination to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A peer that neither sends nor takes data for this long is taken for gone (a hung process, or a
/// network that dropped without a reset), so that a migration fails instead of hanging.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Source side: opens the migration's first connection. For `exec:` and `ssh:` that starts the
/// command, which is then the destination.
pub fn open(uri: &Uri) -> io::Result<Connection> {
    match uri {
        Uri::Exec(cmd) => {
            let mut c = Command::new("sh");
            c.arg("-c").arg(cmd);
            Pipe::spawn(c, format!("sh -c {cmd}")).map(Connection::Pipe)
        }
        Uri::Ssh(t) => {
            let argv = t.command_line();
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]);
            Pipe::spawn(c, format!("ssh {}", t.host)).map(Connection::Pipe)
        }
        _ => connect(uri),
    }
}

/// Source side: connects to the destination (again, for a page channel or a RESOLVE). Refused
/// for a single-connection transport: connecting again would start a second destination, which
/// knows nothing of this migration.
pub fn connect(uri: &Uri) -> io::Result<Connection> {
    match uri {
        Uri::Tcp { host, port } => connect_tcp(host, *port).map(Connection::Tcp),
        Uri::Tls { host, port, config } => tls::client(connect_tcp(host, *port)?, host, &config.0, CONNECT_TIMEOUT),
        Uri::Unix(path) => UnixStream::connect(path).map(Connection::Unix),
        Uri::Exec(_) | Uri::Ssh(_) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this transport has one connection, the migration's own; another would start a second destination",
        )),
        Uri::Stdio => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "stdio is a destination's (emu --incoming stdio); a source migrates to it with exec: or ssh:",
        )),
    }
}

fn connect_tcp(host: &str, port: u16) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"));
    for addr in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => {
                // The switchover exchange is latency-bound; bulk data goes in large writes.
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A destination with TLS: the handshake on a connection it accepted, by `until` (in the
/// connection's screening thread, so that a slow or hostile peer holds up only itself).
pub(crate) enum Secured {
    Tls(Connection),
    /// A plain emu stream: to be told (plainly) that TLS is required.
    Plain(Connection),
    Failed(io::Error),
}

pub(crate) fn secure_incoming(conn: Connection, config: &TlsConfig, until: std::time::Instant) -> Secured {
    let Connection::Tcp(tcp) = conn else {
        return Secured::Failed(io::Error::other("TLS is for TCP connections"));
    };
    match tls::server(tcp, config, until) {
        Ok(c) => Secured::Tls(c),
        Err(tls::NotTls::PlainStream(tcp)) => Secured::Plain(Connection::Tcp(tcp)),
        Err(tls::NotTls::Failed(e)) => Secured::Failed(e),
    }
}

/// Destination side: a listening socket for one incoming migration.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
    /// emu's stdin and stdout: one connection, handed out once.
    Stdio(Mutex<Option<Connection>>),
    /// TCP whose connections must be TLS ([`secure_incoming`]).
    Tls(TcpListener, Arc<TlsConfig>),
}

impl Listener {
    /// Listens on `uri`. The socket is non-blocking: [`Listener::accept_timeout`] waits for a peer.
    pub fn bind(uri: &Uri) -> io::Result<Listener> {
        let l = match uri {
            Uri::Tcp { host, port } => Listener::Tcp(TcpListener::bind((host.as_str(), *port))?),
            Uri::Tls { host, port, config } => {
                Listener::Tls(TcpListener::bind((host.as_str(), *port))?, config.0.clone())
            }
            Uri::Unix(path) => {
                if path.exists() && UnixStream::connect(path).is_err() {
                    std::fs::remove_file(path)?; // stale socket of a process that is gone
                }
                Listener::Unix(UnixListener::bind(path)?, path.clone())
            }
            Uri::Stdio => Listener::Stdio(Mutex::new(Some(Connection::Pipe(Pipe::stdio()?)))),
            Uri::Exec(_) | Uri::Ssh(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "exec: and ssh: are a source's; the destination they start listens on stdio",
                ))
            }
        };
        match &l {
            Listener::Tcp(t) | Listener::Tls(t, _) => t.set_nonblocking(true)?,
            Listener::Unix(u, _) => u.set_nonblocking(true)?,
            Listener::Stdio(_) => {}
        }
        Ok(l)
    }

    /// The address actually bound (a `tcp:HOST:0` URI gets a port from the kernel).
    pub fn local_uri(&self) -> io::Result<Uri> {
        match self {
            Listener::Tcp(l) => {
                let a = l.local_addr()?;
                Ok(Uri::Tcp { host: a.ip().to_string(), port: a.port() })
            }
            Listener::Unix(_, p) => Ok(Uri::Unix(p.clone())),
            Listener::Stdio(_) => Ok(Uri::Stdio),
            Listener::Tls(l, config) => {
                let a = l.local_addr()?;
                Ok(Uri::Tls { host: a.ip().to_string(), port: a.port(), config: Tls(config.clone()) })
            }
        }
    }

    /// The TLS every connection must speak, if any.
    pub fn tls(&self) -> Option<Arc<TlsConfig>> {
        match self {
            Listener::Tls(_, c) => Some(c.clone()),
            _ => None,
        }
    }

    /// Whether nothing more can ever connect: a stdio listener whose one connection was taken.
    pub fn exhausted(&self) -> bool {
        match self {
            Listener::Stdio(c) => c.lock().unwrap_or_else(|e| e.into_inner()).is_none(),
            _ => false,
        }
    }

    /// Waits up to `timeout` for a peer; `None` if none came (so a caller can check whether to
    /// go on listening).
    pub fn accept_timeout(&self, timeout: Duration) -> io::Result<Option<Connection>> {
        use std::os::fd::AsRawFd;
        let fd = match self {
            Listener::Tcp(l) | Listener::Tls(l, _) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Stdio(c) => {
                let taken = c.lock().unwrap_or_else(|e| e.into_inner()).take();
                if taken.is_none() {
                    std::thread::sleep(timeout);
                }
                return Ok(taken);
            }
        };
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd, alive for the duration of the call.
        if unsafe { libc::poll(&mut pfd, 1, ms) } < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(None) } else { Err(e) };
        }
        let accepted = match self {
            Listener::Tcp(l) | Listener::Tls(l, _) => l.accept().and_then(|(s, _)| {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                Ok(Connection::Tcp(s))
            }),
            Listener::Unix(l, _) => l.accept().and_then(|(s, _)| {
                s.set_nonblocking(false)?;
                Ok(Connection::Unix(s))
            }),
            Listener::Stdio(_) => return Ok(None),
        };
        match accepted {
            Ok(c) => Ok(Some(c)),
            // Gone between poll and accept, or nothing there: try again later.
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::ConnectionAborted) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_uris() {
        assert_eq!("tcp:0:4444".parse::<Uri>().unwrap(), Uri::Tcp { host: "0.0.0.0".into(), port: 4444 });
        assert_eq!("tcp:127.0.0.1:1".parse::<Uri>().unwrap(), Uri::Tcp { host: "127.0.0.1".into(), port: 1 });
        assert_eq!("tcp:[::1]:5".parse::<Uri>().unwrap(), Uri::Tcp { host: "::1".into(), port: 5 });
        assert_eq!("unix:/tmp/s".parse::<Uri>().unwrap(), Uri::Unix("/tmp/s".into()));
        // Each refused for its own reason: the reason is what the monitor reports.
        for (bad, why) in [
            ("tcp:host", "no port"),
            ("tcp:h:99999", "bad port"),
            ("tcp:h:", "bad port"),
            ("udp:1:2", "unknown scheme"),
            ("unix:", "empty path"),
            ("", "unknown scheme"),
            ("exec:", "empty command"),
            ("exec:  ", "empty command"),
            ("ssh:", "bad host"),
            ("ssh:-oProxyCommand=x", "bad host"),
            ("ssh:-l@h", "bad user"),
            ("ssh:h:0", "bad port"),
            ("ssh:h:x", "bad port"),
            ("ssh:[::1", "no ']' after an IPv6 address"),
            ("ssh:h?emu=", "empty ssh option"),
            ("ssh:h?mem=1G", "unknown ssh option (emu=, config=, args=)"),
            ("stdio:", "unknown scheme"),
        ] {
            let e = bad.parse::<Uri>().expect_err(bad);
            assert_eq!(e.why, why, "{bad}");
            assert!(e.to_string().starts_with(&format!("'{bad}' is not a migration URI ({why})")), "{e}");
        }
        assert_eq!("tcp:[::1]:5".parse::<Uri>().unwrap().to_string(), "tcp:[::1]:5");
    }

    fn ssh(s: &str) -> SshTarget {
        match s.parse::<Uri>().unwrap() {
            Uri::Ssh(t) => t,
            other => panic!("{s} parsed as {other:?}"),
        }
    }

    #[test]
    fn parses_exec_ssh_and_stdio() {
        assert_eq!("stdio".parse::<Uri>().unwrap(), Uri::Stdio);
        assert_eq!("exec:emu --incoming stdio".parse::<Uri>().unwrap(), Uri::Exec("emu --incoming stdio".into()));
        let t = ssh("ssh:host");
        assert_eq!(
            (t.user, t.host.as_str(), t.port, t.emu.as_str(), t.config, t.args.as_str()),
            (None, "host", None, "emu", None, "")
        );
        let t = ssh("ssh:me@10.0.0.2:2222");
        assert_eq!((t.user.as_deref(), t.host.as_str(), t.port), (Some("me"), "10.0.0.2", Some(2222)));
        assert_eq!((ssh("ssh:[::1]:22").host, ssh("ssh:[::1]:22").port), ("::1".to_string(), Some(22)));
        assert_eq!((ssh("ssh:fe80::1").host, ssh("ssh:fe80::1").port), ("fe80::1".to_string(), None));
        // args= is the rest, '&' and '=' included: it is shell words for the remote side.
        let t = ssh("ssh:h?emu=/opt/emu bin/emu&config=/etc/k.conf&args=--monitor unix:/m -S && x=1");
        assert_eq!(t.emu, "/opt/emu bin/emu");
        assert_eq!(t.config, Some(PathBuf::from("/etc/k.conf")));
        assert_eq!(t.args, "--monitor unix:/m -S && x=1");
        for s in ["ssh:me@h:22?emu=/e&config=/c&args=-S", "ssh:[::1]:22", "ssh:h", "exec:a b", "stdio"] {
            assert_eq!(s.parse::<Uri>().unwrap().to_string(), s);
        }
        assert!("ssh:h".parse::<Uri>().unwrap().single_connection());
        assert!("exec:x".parse::<Uri>().unwrap().single_connection());
        assert!(!"tcp:h:1".parse::<Uri>().unwrap().single_connection());
    }

    #[test]
    fn ssh_command_line() {
        let t = ssh("ssh:me@h:2222?emu=/opt/my emu&config=/k&args=--monitor unix:/m -S");
        assert_eq!(
            t.command_line(),
            [
                "ssh",
                "-o",
                "BatchMode=yes",
                "-e",
                "none",
                "-T",
                "-F",
                "/k",
                "-p",
                "2222",
                "-l",
                "me",
                "--",
                "h",
                "exec '/opt/my emu' --incoming stdio --monitor unix:/m -S"
            ]
        );
        assert_eq!(ssh("ssh:h").command_line().last().unwrap(), "exec emu --incoming stdio");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
    }

    #[test]
    fn plain_tcp_off_this_host_is_warned_about() {
        for local in ["tcp:127.0.0.1:1", "tcp:[::1]:1", "tcp:0:1", "tcp:localhost:1"] {
            assert_eq!(local.parse::<Uri>().unwrap().plaintext_warning(), None, "{local}");
        }
        let w = "tcp:192.0.2.1:4444".parse::<Uri>().unwrap().plaintext_warning().expect("a warning");
        assert!(w.contains("unencrypted and unauthenticated"), "{w}");
        for other in ["unix:/s", "ssh:h", "exec:x"] {
            assert_eq!(other.parse::<Uri>().unwrap().plaintext_warning(), None, "{other}");
        }
    }

    #[test]
    fn single_connection_transports_use_one_channel_and_never_reconnect() {
        let exec: Uri = "exec:cat".parse().unwrap();
        assert_eq!(channels_for(&exec, 4), 1);
        assert_eq!(channels_for(&"tcp:127.0.0.1:1".parse().unwrap(), 4), 4);
        // A page channel or a RESOLVE would start another destination: refused, nothing started.
        for uri in [exec, "ssh:h".parse().unwrap(), Uri::Stdio] {
            assert!(connect(&uri).is_err(), "{uri}");
        }
    }

    fn exec(cmd: &str) -> Connection {
        open(&Uri::Exec(cmd.into())).unwrap()
    }

    #[test]
    fn a_pipe_carries_both_directions_and_ends_cleanly() {
        let conn = exec("cat");
        // More than a pipe holds, so that writer and reader must take turns.
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let writer = conn.try_clone().unwrap();
        let sent = data.clone();
        let t = std::thread::spawn(move || {
            (&writer).write_all(&sent).unwrap();
            writer.finish_writing().unwrap();
        });
        let mut back = Vec::new();
        (&conn).read_to_end(&mut back).unwrap(); // cat exits 0 at the end: a clean end
        t.join().unwrap();
        assert!(back == data, "{} bytes back of {}", back.len(), data.len());
    }

    #[test]
    fn pipe_timeouts_and_shutdown() {
        let conn = exec("sleep 30");
        conn.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let t0 = std::time::Instant::now();
        let e = (&conn).read(&mut [0u8; 8]).expect_err("nothing to read");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(t0.elapsed() >= Duration::from_millis(100) && t0.elapsed() < Duration::from_secs(5));
        // A writer the child never reads from: stalls once the pipe is full, then times out.
        conn.set_write_timeout(Some(Duration::from_millis(100))).unwrap();
        let e = (&conn).write_all(&vec![0u8; 1 << 20]).expect_err("nobody reads");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        // A reader blocked without a timeout is woken by a shutdown on another clone.
        conn.set_read_timeout(None).unwrap();
        let other = conn.try_clone().unwrap();
        let t = std::thread::spawn(move || (&other).read(&mut [0u8; 8]));
        std::thread::sleep(Duration::from_millis(100));
        conn.shutdown();
        assert_eq!(t.join().unwrap().unwrap(), 0);
        assert_eq!((&conn).write(b"x").unwrap_err().kind(), io::ErrorKind::BrokenPipe);
        assert!(conn.set_read_timeout(Some(Duration::ZERO)).is_err());
    }

    #[test]
    fn a_failing_command_says_why() {
        for (cmd, expect) in [
            ("false", "`sh -c false` exited with status 1"),
            ("echo nope >&2; exit 3", "exited with status 3; it said: nope"),
            ("no-such-command-emu-test", "exited with status 127; it said: "),
        ] {
            let conn = exec(cmd);
            let e = (&conn).read(&mut [0u8; 8]).expect_err(cmd).to_string();
            assert!(e.contains(expect), "{cmd}: {e}");
            let e = (&conn).write_all(&[0u8; 100_000]).expect_err(cmd).to_string();
            assert!(e.contains(expect), "{cmd}: {e}");
        }
        let e = (&exec("no-such-command-emu-test")).read(&mut [0u8; 8]).unwrap_err().to_string();
        assert!(e.contains("not found"), "{e}");
    }
}
