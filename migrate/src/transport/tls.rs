//! Mutual TLS for `tcp:` (rustls): both ends show a certificate signed by the CA both trust, as
//! QEMU's `tls-creds-x509` with `verify-peer`. The credentials are the migration parameters
//! `tls-cert` (this end's certificate chain, PEM), `tls-key` (its private key, PEM) and `tls-ca`
//! (the CA certificates that sign the peer's, PEM). The source checks the destination's
//! certificate against the host in the URI (a DNS name or an IP address in its subjectAltName);
//! the destination accepts any certificate the CA signed.
//!
//! The rest of `migrate` never sees TLS: a handshaken connection is handed over as one end of a
//! Unix socket pair, and a relay thread moves bytes between the other end and the TLS session
//! (`relay`). So timeouts, `shutdown` from another thread, half-close (`finish_writing` becomes
//! close_notify) and `poll` all keep their socket meaning, and a TLS connection cannot be used
//! half-way by two threads (rustls' state is not shared). The cost, a copy through the pair, is
//! small beside the encryption itself.
//!
//! Or, with `tls-psk` in place of the three, TLS authenticated by a pre-shared key (`psk.rs`).
//!
//! A destination with credentials takes TLS only: a plain emu stream is answered with a plain
//! ERROR record, so that its source says why instead of seeing a broken stream, and nothing else
//! happens. Session tickets are off: a migration connection is never resumed, and a ticket would
//! be data the source reads but nobody asked for.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::psk::{self, session_certificate, AnyCertificate, PskError, PskKeys};
use super::Connection;

/// Where the credentials are: the migration parameters `tls-cert`, `tls-key` and `tls-ca`, or
/// `tls-psk` alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsCreds {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub psk: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS needs all of tls-cert, tls-key and tls-ca ({0} is not set)")]
    Incomplete(&'static str),
    #[error("cannot read {what} {}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{what} {} holds no certificate", path.display())]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("the CA certificates of tls-ca")]
    Ca(#[source] rustls::Error),
    #[error("the client verifier for tls-ca")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("tls-cert and tls-key")]
    Credentials(#[source] rustls::Error),
    #[error("tls-psk and tls-cert, tls-key, tls-ca are two kinds of credentials: set one")]
    PskAndCertificates,
    #[error("tls-psk")]
    Psk(#[from] PskError),
}

/// Both ends' rustls configurations, built once from [`TlsCreds`].
pub struct TlsConfig {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
    /// A PSK configuration: the keys both ends prove after the handshake.
    psk: Option<PskKeys>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsConfig")
    }
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |source| TlsError::Read { what, path: path.to_path_buf(), source };
    let certs = CertificateDer::pem_file_iter(path).map_err(read)?.collect::<Result<Vec<_>, _>>().map_err(read)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what, path: path.to_path_buf() });
    }
    Ok(certs)
}

impl TlsCreds {
    /// Whether any credential is set (then all of its kind must be).
    pub fn is_set(&self) -> bool {
        self.cert.is_some() || self.key.is_some() || self.ca.is_some() || self.psk.is_some()
    }

    /// Reads the files and builds both configurations; `None` if no credential is set.
    pub fn load(&self) -> Result<Option<Arc<TlsConfig>>, TlsError> {
        if !self.is_set() {
            return Ok(None);
        }
        if let Some(psk) = &self.psk {
            if self.cert.is_some() || self.key.is_some() || self.ca.is_some() {
                return Err(TlsError::PskAndCertificates);
            }
            return Self::load_psk(psk).map(Some);
        }
        let cert = self.cert.as_deref().ok_or(TlsError::Incomplete("tls-cert"))?;
        let key = self.key.as_deref().ok_or(TlsError::Incomplete("tls-key"))?;
        let ca = self.ca.as_deref().ok_or(TlsError::Incomplete("tls-ca"))?;
        let chain = certs("tls-cert", cert)?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Read {
            what: "tls-key",
            path: key.to_path_buf(),
            source,
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for c in certs("tls-ca", ca)? {
            roots.add(c).map_err(TlsError::Ca)?;
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Credentials)?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(TlsError::Credentials)?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(TlsError::Verifier)?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Credentials)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(TlsError::Credentials)?;
        server.send_tls13_tickets = 0;
        Ok(Some(Arc::new(TlsConfig { client: Arc::new(client), server: Arc::new(server), psk: None })))
    }

    /// PSK: TLS 1.3 only (its exporter is what the key's proof binds to), no client certificate,
    /// a certificate of the moment on the destination that the source does not check.
    fn load_psk(path: &Path) -> Result<Arc<TlsConfig>, TlsError> {
        let keys = PskKeys::load(path)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Credentials)?
            .dangerous()
            .with_custom_certificate_verifier(AnyCertificate::new(&provider))
            .with_no_client_auth();
        let (cert, key) = session_certificate()?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Credentials)?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .map_err(TlsError::Credentials)?;
        server.send_tls13_tickets = 0;
        Ok(Arc::new(TlsConfig { client: Arc::new(client), server: Arc::new(server), psk: Some(keys) }))
    }
}

/// Runs the handshake on a blocking socket (its timeouts bound it).
fn handshake(conn: &mut rustls::Connection, tcp: &mut TcpStream) -> io::Result<()> {
    while conn.is_handshaking() {
        conn.complete_io(tcp)?;
    }
    // The last flight (a client's Finished) may still be queued.
    while conn.wants_write() {
        conn.write_tls(tcp)?;
    }
    Ok(())
}

/// Source side: TLS over a connected socket, checking the destination's certificate against
/// `host`.
pub(crate) fn client(mut tcp: TcpStream, host: &str, cfg: &TlsConfig, timeout: Duration) -> io::Result<Connection> {
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("'{host}' is not a TLS server name: {e}")))?;
    let conn = rustls::ClientConnection::new(cfg.client.clone(), name).map_err(io::Error::other)?;
    let mut conn = rustls::Connection::from(conn);
    tcp.set_read_timeout(Some(timeout))?;
    tcp.set_write_timeout(Some(timeout))?;
    let hint = match cfg.psk {
        Some(_) => "does the destination have tls-psk?",
        None => "does the destination have tls-cert, tls-key and tls-ca, from the same CA?",
    };
    handshake(&mut conn, &mut tcp).map_err(|e| io::Error::new(e.kind(), format!("TLS handshake: {e} ({hint})")))?;
    if let Some(keys) = &cfg.psk {
        psk::prove(&mut conn, &mut tcp, keys)?;
    }
    relayed(tcp, conn)
}

/// Why a destination did not take a connection as TLS.
pub(crate) enum NotTls {
    /// A plain emu stream: answer it (plainly) that TLS is required.
    PlainStream(TcpStream),
    /// Anything else: a failed handshake, a bad certificate, garbage, silence.
    Failed(io::Error),
}

/// Destination side: the TLS handshake on an accepted socket, by `until`.
pub(crate) fn server(mut tcp: TcpStream, cfg: &TlsConfig, until: Instant) -> Result<Connection, NotTls> {
    let left = until.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    let set = tcp.set_read_timeout(Some(left)).and_then(|_| tcp.set_write_timeout(Some(left)));
    set.map_err(NotTls::Failed)?;
    // A TLS connection opens with a handshake record (type 0x16); an emu stream with its magic.
    let mut first = [0u8; 3];
    match tcp.peek(&mut first) {
        Ok(n) if n > 0 && first[..n] == crate::stream::MAGIC[..n] => return Err(NotTls::PlainStream(tcp)),
        Ok(_) => {}
        Err(e) => return Err(NotTls::Failed(e)),
    }
    let conn = rustls::ServerConnection::new(cfg.server.clone()).map_err(|e| NotTls::Failed(io::Error::other(e)))?;
    let mut conn = rustls::Connection::from(conn);
    handshake(&mut conn, &mut tcp)
        .map_err(|e| NotTls::Failed(io::Error::new(e.kind(), format!("TLS handshake: {e}"))))?;
    if let Some(keys) = &cfg.psk {
        psk::check(&mut conn, &mut tcp, keys).map_err(NotTls::Failed)?;
    }
    relayed(tcp, conn).map_err(NotTls::Failed)
}

/// Hands the session to a relay thread; returns the local end of its socket pair.
fn relayed(tcp: TcpStream, conn: rustls::Connection) -> io::Result<Connection> {
    let (local, inner) = UnixStream::pair()?;
    tcp.set_read_timeout(None)?;
    tcp.set_write_timeout(None)?;
    tcp.set_nonblocking(true)?;
    inner.set_nonblocking(true)?;
    std::thread::Builder::new().name("tls-relay".into()).spawn(move || {
        if let Err(e) = relay(&tcp, conn, &inner) {
            log::info!("tls: the connection ended: {e}");
        }
        let _ = tcp.shutdown(Shutdown::Both);
        let _ = inner.shutdown(Shutdown::Both);
    })?;
    Ok(Connection::Unix(local))
}

/// Plaintext held for the local end before the relay stops reading from the network (and so
/// holds the peer back, as a full socket buffer would).
const PLAIN_CAP: usize = 1 << 20;

/// Bytes read from the network per system call.
const NET_READ: usize = 256 << 10;
/// Reads of the local end (64 KiB each) per wakeup.
const LOCAL_BURST: usize = 16;

fn would_block(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted)
}

/// Writes the records rustls holds to the (non-blocking) socket until it takes no more.
fn send_tls(conn: &mut rustls::Connection, tcp: &mut &TcpStream) -> io::Result<()> {
    while conn.wants_write() {
        match conn.write_tls(tcp) {
            Ok(_) => {}
            Err(e) if would_block(&e) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Moves bytes both ways until both directions have ended (or either fails): network records
/// through rustls to the local end, the local end's bytes through rustls to the network. The end
/// of the local end's stream becomes close_notify; close_notify (or the network's end) becomes the
/// end of the local end's stream.
fn relay(tcp: &TcpStream, mut conn: rustls::Connection, local: &UnixStream) -> io::Result<()> {
    let mut tcp_r = tcp;
    let mut tcp_w = tcp;
    let (mut local_r, mut local_w) = (local, local);
    let mut plain: Vec<u8> = Vec::new(); // for the local end, not yet written
    let mut buf = vec![0u8; 64 << 10];
    let mut net = vec![0u8; NET_READ];
    // tcp_eof: the socket ended; net_done: the TLS stream ended (close_notify, every byte of
    // plaintext before it taken from rustls), which comes after tcp_eof's records are decrypted.
    let (mut tcp_eof, mut net_done, mut local_done, mut local_told) = (false, false, false, false);
    // A truncation found while plaintext before it still waits for the local end: reported once
    // that is written. (Waiting for it in poll would wait for ever: the socket has nothing more
    // to say, and the local end may have nothing to send.)
    let mut truncated: Option<io::Error> = None;
    loop {
        send_tls(&mut conn, &mut tcp_w)?;
        while !net_done && plain.len() < PLAIN_CAP {
            match conn.reader().read(&mut buf) {
                Ok(0) => {
                    net_done = true;
                    break;
                }
                Ok(n) => plain.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // The network ended without close_notify: a truncation, not an end. What came
                // before it still goes to the local end, whose reader then sees the end.
                Err(e) if plain.is_empty() => return Err(e),
                Err(e) => {
                    truncated = Some(e);
                    break;
                }
            }
        }
        while !plain.is_empty() {
            match local_w.write(&plain) {
                Ok(n) => {
                    plain.drain(..n);
                }
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(e),
            }
        }
        if plain.is_empty() {
            if let Some(e) = truncated.take() {
                return Err(e);
            }
        }
        if net_done && plain.is_empty() && !local_told {
            let _ = local.shutdown(Shutdown::Write);
            local_told = true;
        }
        if local_done && net_done && plain.is_empty() && !conn.wants_write() {
            return Ok(());
        }
        let mut fds = [
            libc::pollfd { fd: tcp.as_raw_fd(), events: 0, revents: 0 },
            libc::pollfd { fd: local.as_raw_fd(), events: 0, revents: 0 },
        ];
        if !tcp_eof && plain.len() < PLAIN_CAP {
            fds[0].events |= libc::POLLIN;
        }
        if conn.wants_write() {
            fds[0].events |= libc::POLLOUT;
        }
        // No more plaintext taken in while records are still queued for the network.
        if !local_done && !conn.wants_write() {
            fds[1].events |= libc::POLLIN;
        }
        if !plain.is_empty() {
            fds[1].events |= libc::POLLOUT;
        }
        // SAFETY: two valid pollfds, alive for the duration of the call.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let hup = libc::POLLHUP | libc::POLLERR;
        // The local end is closed for good (dropped, or shut down both ways): nobody will read
        // what the peer still sends, and only the close_notify is left to go out.
        if local_done && fds[1].revents & libc::POLLHUP != 0 {
            while conn.wants_write() && conn.write_tls(&mut tcp_w).is_ok() {}
            return Ok(());
        }
        if fds[0].revents & (libc::POLLIN | hup) != 0 && fds[0].events & libc::POLLIN != 0 {
            // One large read from the socket, then every byte of it through rustls from memory:
            // rustls' own read_tls takes 4 KiB per call, and a system call (and a poll) per 4 KiB
            // held TLS to a fifth of plain TCP here.
            match tcp_r.read(&mut net) {
                Ok(0) => {
                    tcp_eof = true;
                    conn.read_tls(&mut &[][..])?; // tells rustls of the end
                }
                Ok(n) => {
                    let mut rest = &net[..n];
                    while !rest.is_empty() {
                        // 0: rustls takes no more (bytes after close_notify): dropped.
                        if conn.read_tls(&mut rest)? == 0 {
                            break;
                        }
                        if let Err(e) = conn.process_new_packets() {
                            // The alert, if any, goes out before the connection closes.
                            let _ = conn.write_tls(&mut tcp_w);
                            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                        }
                        // Taken at once, so that rustls never holds more than one record's worth;
                        // the end of the stream (or a truncation) is seen at the top of the loop.
                        while let Ok(n @ 1..) = conn.reader().read(&mut buf) {
                            plain.extend_from_slice(&buf[..n]);
                        }
                    }
                }
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e),
            }
        }
        if fds[1].revents & (libc::POLLIN | hup) != 0 && fds[1].events & libc::POLLIN != 0 {
            // Up to LOCAL_BURST reads of the local end per wakeup, each encrypted and sent before
            // the next is taken (rustls holds at most its buffer limit of records).
            for _ in 0..LOCAL_BURST {
                match local_r.read(&mut buf) {
                    Ok(0) => {
                        local_done = true;
                        conn.send_close_notify();
                        break;
                    }
                    Ok(n) => conn.writer().write_all(&buf[..n])?,
                    Err(e) if would_block(&e) => break,
                    Err(e) => return Err(e),
                }
                send_tls(&mut conn, &mut tcp_w)?;
                if conn.wants_write() {
                    break;
                }
            }
        }
        if fds[1].revents & hup != 0 && fds[1].events & libc::POLLOUT != 0 {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the local end closed"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{connect, secure_incoming, Listener, Secured, Uri};

    /// Credentials from `scripts/test-certs.sh` (openssl), in a fresh directory.
    fn certs_dir() -> PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("emu-tls-{}-{n}", std::process::id()));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/test-certs.sh");
        let ok = std::process::Command::new("sh").arg(script).arg(&dir).status().is_ok_and(|s| s.success());
        assert!(ok, "scripts/test-certs.sh (needs openssl)");
        dir
    }

    fn creds(dir: &Path, who: &str, ca: &str) -> Arc<TlsConfig> {
        let c = TlsCreds {
            cert: Some(dir.join(format!("{who}.pem"))),
            key: Some(dir.join(format!("{who}.key"))),
            ca: Some(dir.join(format!("{ca}.pem"))),
            psk: None,
        };
        c.load().unwrap().expect("credentials set")
    }

    /// A TLS listener on 127.0.0.1 and the URI a source uses to reach it with `client`.
    fn listen(server: Arc<TlsConfig>, client: Arc<TlsConfig>) -> (Listener, Uri) {
        let uri = Uri::Tcp { host: "127.0.0.1".into(), port: 0 }.with_tls(Some(server));
        let l = Listener::bind(&uri).unwrap();
        let Uri::Tls { host, port, .. } = l.local_uri().unwrap() else { panic!("not TLS") };
        (l, Uri::Tcp { host, port }.with_tls(Some(client)))
    }

    fn accept(l: &Listener) -> Connection {
        loop {
            if let Some(c) = l.accept_timeout(Duration::from_secs(5)).unwrap() {
                return c;
            }
        }
    }

    #[test]
    fn mutual_tls_carries_both_directions_and_half_closes() {
        let dir = certs_dir();
        carries_both_directions(creds(&dir, "dst", "ca"), creds(&dir, "src", "ca"));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// 3 MB there and back, each way ended by a half-close.
    fn carries_both_directions(server: Arc<TlsConfig>, client: Arc<TlsConfig>) {
        let (l, uri) = listen(server, client);
        let config = l.tls().unwrap();
        let server = std::thread::spawn(move || {
            let conn = match secure_incoming(accept(&l), &config, Instant::now() + Duration::from_secs(5)) {
                Secured::Tls(c) => c,
                Secured::Plain(_) => panic!("taken for plain"),
                Secured::Failed(e) => panic!("handshake: {e}"),
            };
            // Echo until the source's end (close_notify), then end ours.
            let mut all = Vec::new();
            (&conn).read_to_end(&mut all).unwrap();
            (&conn).write_all(&all).unwrap();
            conn.finish_writing().unwrap();
            all.len()
        });
        let conn = connect(&uri).unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        (&conn).write_all(&data).unwrap();
        conn.finish_writing().unwrap();
        let mut back = Vec::new();
        (&conn).read_to_end(&mut back).unwrap();
        assert_eq!(server.join().unwrap(), data.len());
        assert!(back == data, "{} bytes back of {}", back.len(), data.len());
    }

    /// A peer that sends a lot and then drops the connection without close_notify, while this
    /// end reads nothing yet: once it reads, it gets what came and then an error, not a wait for
    /// ever (the relay once sat in poll with the truncation noted and nothing left to poll for,
    /// when the end came while plaintext still waited for the local end: a postcopy over TLS
    /// whose link was cut then never paused on the destination).
    #[test]
    fn a_truncation_behind_unread_data_ends_the_stream() {
        let dir = certs_dir();
        let (l, uri) = listen(creds(&dir, "dst", "ca"), creds(&dir, "src", "ca"));
        let Uri::Tls { host, port, config } = uri else { panic!("not TLS") };
        let config = config.0.clone();
        let sender = std::thread::spawn(move || {
            let mut tcp = TcpStream::connect((host.as_str(), port)).unwrap();
            let name = ServerName::try_from(host).unwrap();
            let mut conn =
                rustls::Connection::from(rustls::ClientConnection::new(config.client.clone(), name).unwrap());
            handshake(&mut conn, &mut tcp).unwrap();
            for _ in 0..(2 << 20) / (16 << 10) {
                conn.writer().write_all(&[7u8; 16 << 10]).unwrap();
                while conn.wants_write() {
                    conn.write_tls(&mut tcp).unwrap();
                }
            }
            // Dropped: FIN without close_notify.
        });
        let server_cfg = l.tls().unwrap();
        let conn = match secure_incoming(accept(&l), &server_cfg, Instant::now() + Duration::from_secs(5)) {
            Secured::Tls(c) => c,
            _ => panic!("not taken as TLS"),
        };
        std::thread::sleep(Duration::from_millis(500));
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 << 10];
        let end = loop {
            match (&conn).read(&mut buf) {
                Ok(0) => break None,
                Ok(n) => got += n,
                Err(e) => break Some(e.kind()),
            }
        };
        assert!(
            !matches!(end, Some(io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)),
            "waited: {got} bytes, {end:?}"
        );
        assert_eq!(got, 2 << 20, "{end:?}");
        sender.join().unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Not a check: the figures `scripts/bench-tls.sh` prints beside the migrations, TLS without a
    /// guest. 1 GiB one way through the relays over 127.0.0.1 (both ends in this process), and
    /// rustls' encryption alone in memory. `cargo test --release -p migrate --lib
    /// relay_throughput -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn relay_throughput() {
        let dir = certs_dir();
        for round in 0..2 {
            let (l, uri) = listen(creds(&dir, "dst", "ca"), creds(&dir, "src", "ca"));
            let config = l.tls().unwrap();
            let server = std::thread::spawn(move || {
                let conn = match secure_incoming(accept(&l), &config, Instant::now() + Duration::from_secs(5)) {
                    Secured::Tls(c) => c,
                    _ => panic!(),
                };
                let mut buf = vec![0u8; 1 << 20];
                let mut n = 0;
                loop {
                    match (&conn).read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(r) => n += r,
                    }
                }
                n
            });
            let conn = connect(&uri).unwrap();
            let data = vec![0x5au8; 1 << 20];
            let t0 = Instant::now();
            for _ in 0..1024 {
                (&conn).write_all(&data).unwrap();
            }
            conn.finish_writing().unwrap();
            let n = server.join().unwrap();
            let mbps = n as f64 / t0.elapsed().as_secs_f64() / 1e6;
            println!("{{\"bench\": \"tls-relay\", \"round\": {round}, \"relay-mbps\": {mbps:.0}}}");
        }
        // In memory: rustls alone.
        let c = creds(&dir, "src", "ca");
        let sv = creds(&dir, "dst", "ca");
        let mut client = rustls::Connection::from(
            rustls::ClientConnection::new(c.client.clone(), ServerName::try_from("127.0.0.1").unwrap()).unwrap(),
        );
        let mut server = rustls::Connection::from(rustls::ServerConnection::new(sv.server.clone()).unwrap());
        let mut pipe = Vec::new();
        while client.is_handshaking() || server.is_handshaking() {
            pipe.clear();
            client.write_tls(&mut pipe).unwrap();
            server.read_tls(&mut &pipe[..]).unwrap();
            server.process_new_packets().unwrap();
            pipe.clear();
            server.write_tls(&mut pipe).unwrap();
            client.read_tls(&mut &pipe[..]).unwrap();
            client.process_new_packets().unwrap();
        }
        let data = vec![0x5au8; 16 << 10];
        let t0 = Instant::now();
        let mut out = Vec::with_capacity(1 << 20);
        for _ in 0..65536 {
            client.writer().write_all(&data).unwrap();
            out.clear();
            while client.wants_write() {
                client.write_tls(&mut out).unwrap();
            }
        }
        let mbps = 1073741824.0 / t0.elapsed().as_secs_f64() / 1e6;
        println!("{{\"bench\": \"tls-encrypt\", \"encrypt-mbps\": {mbps:.0}}}");
        let _ = std::fs::remove_dir_all(dir);
    }

    const KEY_A: &str = "qemu:00112233445566778899aabbccddeeff\n";
    const KEY_B: &str = "qemu:ffeeddccbbaa99887766554433221100\n";

    fn psk(dir: &Path, name: &str, text: &str) -> Arc<TlsConfig> {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        TlsCreds { psk: Some(path), ..TlsCreds::default() }.load().unwrap().expect("credentials set")
    }

    /// Runs one connection attempt; returns what each side made of it.
    fn attempt(server: Arc<TlsConfig>, client: Arc<TlsConfig>) -> (Result<(), String>, Result<(), String>) {
        let (l, uri) = listen(server, client);
        let config = l.tls().unwrap();
        let t = std::thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(5);
            match secure_incoming(accept(&l), &config, until) {
                Secured::Tls(c) => (&c).write_all(b"x").map_err(|e| e.to_string()),
                Secured::Plain(_) => Err("taken for plain".into()),
                Secured::Failed(e) => Err(e.to_string()),
            }
        });
        let source = connect(&uri).map_err(|e| e.to_string()).and_then(|c| {
            let mut b = [0u8; 1];
            match (&c).read(&mut b) {
                Ok(1) => Ok(()),
                Ok(_) => Err("ended".into()),
                Err(e) => Err(e.to_string()),
            }
        });
        (source, t.join().unwrap())
    }

    #[test]
    fn a_pre_shared_key_carries_both_directions() {
        let dir = std::env::temp_dir().join(format!("emu-psk-{}-a", std::process::id()));
        // The destination may list several identities; the source proves its first.
        let many = format!("other:{}\n{KEY_A}", "ab".repeat(32));
        carries_both_directions(psk(&dir, "dst.psk", &many), psk(&dir, "src.psk", KEY_A));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_wrong_key_or_certificates_against_a_key_are_refused_on_both_sides() {
        let dir = certs_dir();
        // Another key for the same identity.
        let (src, dst) = attempt(psk(&dir, "a.psk", KEY_A), psk(&dir, "b.psk", KEY_B));
        let (src, dst) = (src.unwrap_err(), dst.unwrap_err());
        assert!(src.contains("the destination refused our pre-shared key (identity 'qemu')"), "{src}");
        assert!(dst.contains("proof for pre-shared key identity 'qemu' fails"), "{dst}");
        // An identity the destination does not list.
        let other = format!("someone:{}\n", "00".repeat(16));
        let (src, dst) = attempt(psk(&dir, "a.psk", KEY_A), psk(&dir, "c.psk", &other));
        assert!(src.unwrap_err().contains("refused our pre-shared key"));
        assert!(dst.unwrap_err().contains("identity 'someone' is not in tls-psk"));
        // Certificates against a key, both ways round: nothing gets through.
        let (src, dst) = attempt(psk(&dir, "a.psk", KEY_A), creds(&dir, "src", "ca"));
        assert!(src.unwrap_err().contains("TLS handshake"));
        assert!(dst.is_err());
        let (src, dst) = attempt(creds(&dir, "dst", "ca"), psk(&dir, "a.psk", KEY_A));
        assert!(src.is_err());
        assert!(dst.unwrap_err().contains("TLS handshake"));
        // Both kinds at once is a mistake, said at load.
        let both = TlsCreds { psk: Some(dir.join("a.psk")), ca: Some(dir.join("ca.pem")), ..TlsCreds::default() };
        assert!(matches!(both.load(), Err(TlsError::PskAndCertificates)));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_plain_stream_and_a_stranger_are_refused() {
        let dir = certs_dir();
        let (l, uri) = listen(creds(&dir, "dst", "ca"), creds(&dir, "stranger", "ca"));
        let config = l.tls().unwrap();
        let Uri::Tls { host, port, .. } = uri.clone() else { panic!() };
        // A plain emu stream: recognised as such, to be refused plainly.
        let mut plain = TcpStream::connect((host.as_str(), port)).unwrap();
        plain.write_all(crate::stream::MAGIC).unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        assert!(matches!(secure_incoming(accept(&l), &config, until), Secured::Plain(_)));
        // A certificate from another CA: the destination refuses it, and the source says so.
        let t = std::thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(5);
            match secure_incoming(accept(&l), &config, until) {
                Secured::Failed(e) => e.to_string(),
                _ => panic!("a stranger's certificate taken"),
            }
        });
        let source_side = match connect(&uri) {
            // TLS 1.3: the client may finish before it hears the server's refusal.
            Ok(c) => (&c).read(&mut [0u8; 1]).map(|n| n.to_string()).unwrap_or_else(|e| e.to_string()),
            Err(e) => e.to_string(),
        };
        let dest_side = t.join().unwrap();
        assert!(dest_side.contains("TLS handshake") && dest_side.to_lowercase().contains("cert"), "{dest_side}");
        assert_ne!(source_side, "1", "data from a destination that refused: {source_side}");
        // A destination whose certificate another CA signed: the source refuses it.
        let (l, uri) = listen(creds(&dir, "stranger", "ca"), creds(&dir, "src", "ca"));
        let config = l.tls().unwrap();
        let t = std::thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(5);
            matches!(secure_incoming(accept(&l), &config, until), Secured::Failed(_))
        });
        let e = connect(&uri).expect_err("a stranger destination").to_string();
        assert!(e.contains("TLS handshake") && e.contains("UnknownIssuer"), "{e}");
        assert!(t.join().unwrap());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn credentials_are_checked() {
        let dir = certs_dir();
        let full = TlsCreds {
            cert: Some(dir.join("src.pem")),
            key: Some(dir.join("src.key")),
            ca: Some(dir.join("ca.pem")),
            psk: None,
        };
        assert!(TlsCreds::default().load().unwrap().is_none());
        let e = TlsCreds { ca: None, ..full.clone() }.load().unwrap_err();
        assert_eq!(e.to_string(), "TLS needs all of tls-cert, tls-key and tls-ca (tls-ca is not set)");
        let e = TlsCreds { cert: Some(dir.join("nope.pem")), ..full.clone() }.load().unwrap_err();
        assert!(crate::report(&e).contains("cannot read tls-cert"), "{}", crate::report(&e));
        // A key file as the certificate: no certificate in it.
        let e = TlsCreds { cert: Some(dir.join("src.key")), ..full.clone() }.load().unwrap_err();
        assert!(e.to_string().contains("holds no certificate"), "{e}");
        // A key that is not the certificate's.
        let e = TlsCreds { key: Some(dir.join("dst.key")), ..full }.load().unwrap_err();
        assert!(crate::report(&e).contains("tls-cert and tls-key"), "{}", crate::report(&e));
        let _ = std::fs::remove_dir_all(dir);
    }
}
