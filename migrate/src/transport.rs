//! Transports: a migration URI turned into a byte stream.
//!
//! - `tcp:HOST:PORT` (`tcp:0:4444` listens on every address; `tcp:[::1]:4444` for IPv6)
//! - `unix:PATH`
//!
//! The stream is bidirectional: records go source to destination, and the destination answers on
//! the same connection (READY, STARTED or a refusal).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Uri {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

#[derive(Debug, thiserror::Error)]
#[error("'{uri}' is not a migration URI ({why}); use tcp:HOST:PORT or unix:PATH")]
pub struct BadUri {
    uri: String,
    why: &'static str,
}

impl FromStr for Uri {
    type Err = BadUri;

    fn from_str(s: &str) -> Result<Self, BadUri> {
        let bad = |why| BadUri { uri: s.to_string(), why };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("empty path"));
            }
            return Ok(Uri::Unix(PathBuf::from(path)));
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
            Uri::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Uri::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Uri::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// One migration connection.
#[derive(Debug)]
pub enum Connection {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Connection {
    pub fn try_clone(&self) -> io::Result<Connection> {
        Ok(match self {
            Connection::Tcp(s) => Connection::Tcp(s.try_clone()?),
            Connection::Unix(s) => Connection::Unix(s.try_clone()?),
        })
    }

    /// Ends both directions; a thread blocked in read or write on a clone returns at once.
    pub fn shutdown(&self) {
        let _ = match self {
            Connection::Tcp(s) => s.shutdown(Shutdown::Both),
            Connection::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Ends the sending direction (the peer reads the end of the stream); reading goes on.
    pub fn finish_writing(&self) -> io::Result<()> {
        match self {
            Connection::Tcp(s) => s.shutdown(Shutdown::Write),
            Connection::Unix(s) => s.shutdown(Shutdown::Write),
        }
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Connection::Tcp(s) => s.set_read_timeout(t),
            Connection::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Connection::Tcp(s) => s.set_write_timeout(t),
            Connection::Unix(s) => s.set_write_timeout(t),
        }
    }
}

impl Read for &Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Connection::Tcp(s) => (&*s).read(buf),
            Connection::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Connection::Tcp(s) => (&*s).write(buf),
            Connection::Unix(s) => (&*s).write(buf),
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
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Connection::Tcp(s) => s.read(buf),
            Connection::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Connection::Tcp(s) => s.write(buf),
            Connection::Unix(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Connection::Tcp(s) => s.write_vectored(bufs),
            Connection::Unix(s) => s.write_vectored(bufs),
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

/// Source side: connects to the destination.
pub fn connect(uri: &Uri) -> io::Result<Connection> {
    match uri {
        Uri::Tcp { host, port } => {
            let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"));
            for addr in (host.as_str(), *port).to_socket_addrs()? {
                match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                    Ok(s) => {
                        // The switchover exchange is latency-bound; bulk data goes in large writes.
                        s.set_nodelay(true)?;
                        return Ok(Connection::Tcp(s));
                    }
                    Err(e) => last = e,
                }
            }
            Err(last)
        }
        Uri::Unix(path) => UnixStream::connect(path).map(Connection::Unix),
    }
}

/// Destination side: a listening socket for one incoming migration.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Listens on `uri`. The socket is non-blocking: [`Listener::accept_timeout`] waits for a peer.
    pub fn bind(uri: &Uri) -> io::Result<Listener> {
        let l = match uri {
            Uri::Tcp { host, port } => Listener::Tcp(TcpListener::bind((host.as_str(), *port))?),
            Uri::Unix(path) => {
                if path.exists() && UnixStream::connect(path).is_err() {
                    std::fs::remove_file(path)?; // stale socket of a process that is gone
                }
                Listener::Unix(UnixListener::bind(path)?, path.clone())
            }
        };
        match &l {
            Listener::Tcp(t) => t.set_nonblocking(true)?,
            Listener::Unix(u, _) => u.set_nonblocking(true)?,
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
        }
    }

    /// Waits up to `timeout` for a peer; `None` if none came (so a caller can check whether to
    /// go on listening).
    pub fn accept_timeout(&self, timeout: Duration) -> io::Result<Option<Connection>> {
        use std::os::fd::AsRawFd;
        let fd = match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        };
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd, alive for the duration of the call.
        if unsafe { libc::poll(&mut pfd, 1, ms) } < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(None) } else { Err(e) };
        }
        let accepted = match self {
            Listener::Tcp(l) => l.accept().and_then(|(s, _)| {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                Ok(Connection::Tcp(s))
            }),
            Listener::Unix(l, _) => l.accept().and_then(|(s, _)| {
                s.set_nonblocking(false)?;
                Ok(Connection::Unix(s))
            }),
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
            ("exec:cat", "unknown scheme"),
        ] {
            let e = bad.parse::<Uri>().expect_err(bad);
            assert_eq!(e.why, why, "{bad}");
            assert!(e.to_string().starts_with(&format!("'{bad}' is not a migration URI ({why})")), "{e}");
        }
        assert_eq!("tcp:[::1]:5".parse::<Uri>().unwrap().to_string(), "tcp:[::1]:5");
    }
}
