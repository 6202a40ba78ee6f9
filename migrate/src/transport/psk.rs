//! TLS with a pre-shared key instead of certificates (`tls-psk`), for users without a PKI, as
//! QEMU's `tls-creds-psk`.
//!
//! rustls has no external-PSK handshake (rustls/rustls#174), so the key authenticates the TLS
//! session after its handshake instead, bound to that very session: both ends derive 32 bytes
//! from the session's secrets with the TLS exporter (RFC 8446 7.5, label [`EXPORTER_LABEL`]) and
//! prove with HMAC-SHA256 under the key that they hold it *for this session*. The handshake itself
//! is TLS 1.3 with a certificate the destination makes up at start (nobody checks it: the
//! source takes any certificate, and verifies only that the handshake is signed by its key).
//!
//! Why that is as strong as the key: a man in the middle who runs a TLS session with each side
//! has two sessions with different exporter values, and cannot turn the source's proof for its
//! session into one for the other without the key; a peer without the key cannot make either
//! proof. What is encrypted is encrypted under the session's (EC)DHE keys, so the key also never
//! protects data directly (forward secrecy holds). The destination proves itself only after the
//! source has, so a stranger learns nothing from a destination.
//!
//! ```text
//! after the TLS handshake, inside the session:
//! source -> destination  u8 n, identity (n bytes, UTF-8), mac_s (32)
//!                        mac_s = HMAC-SHA256(key, "emu-psk source" || identity || exporter)
//! destination -> source  u8 1, mac_d (32)   mac_d = HMAC-SHA256(key, "emu-psk destination" || identity || exporter)
//!                     or u8 0               (refused: unknown identity or a wrong proof; then closed)
//! ```
//!
//! The key file is QEMU's `keys.psk` (what `psktool -u qemu -p keys.psk` writes): one
//! `identity:hexkey` per line. A source uses the first line; a destination takes any identity
//! listed. Keys shorter than 128 bits are refused.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// The TLS exporter label of the key's proof (RFC 8446 7.5).
const EXPORTER_LABEL: &[u8] = b"EXPERIMENTAL-emu-migration-psk-v1";
const MAC_LEN: usize = 32;
/// The shortest key taken: 128 bits.
const MIN_KEY: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum PskError {
    #[error("cannot read tls-psk {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("tls-psk {} line {line}: {why} (expected IDENTITY:HEXKEY, as psktool writes)", path.display())]
    Format { path: PathBuf, line: usize, why: &'static str },
    #[error("tls-psk {} holds no key", path.display())]
    Empty { path: PathBuf },
    #[error("cannot make the session certificate")]
    Certificate(#[source] rcgen::Error),
}

/// The keys of a `tls-psk` file, in file order.
pub struct PskKeys {
    keys: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for PskKeys {
    // Never the keys themselves.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        write!(f, "PskKeys({ids:?})")
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

impl PskKeys {
    pub fn load(path: &Path) -> Result<PskKeys, PskError> {
        let text = std::fs::read_to_string(path).map_err(|source| PskError::Read { path: path.into(), source })?;
        PskKeys::parse(path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<PskKeys, PskError> {
        let bad = |line, why| PskError::Format { path: path.into(), line, why };
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (id, hex) = line.split_once(':').ok_or(bad(i + 1, "no ':'"))?;
            if id.is_empty() || id.len() > 255 {
                return Err(bad(i + 1, "the identity must be 1 to 255 bytes"));
            }
            let key = unhex(hex).ok_or(bad(i + 1, "the key is not hexadecimal"))?;
            if key.len() < MIN_KEY {
                return Err(bad(i + 1, "the key is shorter than 128 bits"));
            }
            keys.push((id.to_string(), key));
        }
        if keys.is_empty() {
            return Err(PskError::Empty { path: path.into() });
        }
        Ok(PskKeys { keys })
    }

    fn find(&self, id: &str) -> Option<&[u8]> {
        self.keys.iter().find(|(i, _)| i == id).map(|(_, k)| k.as_slice())
    }
}

/// The destination's certificate for PSK sessions, made at start: it is never trusted, only used
/// to sign the handshake, so a fresh one per process gives nothing away.
pub(super) fn session_certificate() -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), PskError> {
    let made = rcgen::generate_simple_self_signed(vec!["emu-migration".to_string()]).map_err(PskError::Certificate)?;
    let key = PrivatePkcs8KeyDer::from(made.signing_key.serialize_der());
    Ok((made.cert.der().clone(), key.into()))
}

/// The source's verifier for PSK sessions: any certificate, but the handshake must be signed by
/// its key (else the session's secrets would not be the destination's); the PSK proof then says
/// who the peer is.
#[derive(Debug)]
pub(super) struct AnyCertificate(WebPkiSupportedAlgorithms);

impl AnyCertificate {
    pub(super) fn new(provider: &CryptoProvider) -> Arc<AnyCertificate> {
        Arc::new(AnyCertificate(provider.signature_verification_algorithms))
    }
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // PSK sessions are TLS 1.3 only (the configurations say so); never reached.
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// What a proof is the MAC of: role || identity || exporter value.
fn proof_input(role: &[u8], id: &str, exporter: &[u8]) -> Vec<u8> {
    [role, id.as_bytes(), exporter].concat()
}

fn mac(key: &[u8], role: &[u8], id: &str, exporter: &[u8]) -> ring::hmac::Tag {
    ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key), &proof_input(role, id, exporter))
}

fn verify(key: &[u8], role: &[u8], id: &str, exporter: &[u8], tag: &[u8]) -> bool {
    // Constant time: a wrong proof says nothing about how wrong it was.
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    ring::hmac::verify(&key, &proof_input(role, id, exporter), tag).is_ok()
}

fn exporter(conn: &rustls::Connection) -> io::Result<[u8; 32]> {
    conn.export_keying_material([0u8; 32], EXPORTER_LABEL, None).map_err(io::Error::other)
}

fn refused(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, why)
}

/// Source side, on a handshaken session: proves the first key of `keys`, checks the
/// destination's proof.
pub(super) fn prove(conn: &mut rustls::Connection, sock: &mut impl ReadWrite, keys: &PskKeys) -> io::Result<()> {
    let (id, key) = &keys.keys[0];
    let exp = exporter(conn)?;
    let mut io = Session { conn, sock };
    let mut msg = vec![id.len() as u8];
    msg.extend_from_slice(id.as_bytes());
    msg.extend_from_slice(mac(key, b"emu-psk source", id, &exp).as_ref());
    io.write_all(&msg)?;
    io.flush()?;
    // The end of the stream where an answer was due counts as "no": a refusing destination
    // closes after its 0.
    let read = |io: &mut Session<'_, _>, buf: &mut [u8]| match io.read_exact(buf) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        done => done.map(|_| true),
    };
    let mut verdict = [0u8; 1];
    if !read(&mut io, &mut verdict)? || verdict[0] == 0 {
        return Err(refused(format!(
            "the destination refused our pre-shared key (identity '{id}'): its tls-psk does not hold the same key"
        )));
    }
    let mut tag = [0u8; MAC_LEN];
    if !read(&mut io, &mut tag)? || !verify(key, b"emu-psk destination", id, &exp, &tag) {
        return Err(refused(format!(
            "the destination's proof of the pre-shared key (identity '{id}') fails: not the destination meant"
        )));
    }
    Ok(())
}

/// Destination side, on a handshaken session: checks the source's proof against `keys`,
/// answers with its own (or a refusal).
pub(super) fn check(conn: &mut rustls::Connection, sock: &mut impl ReadWrite, keys: &PskKeys) -> io::Result<()> {
    let exp = exporter(conn)?;
    let mut io = Session { conn, sock };
    let mut n = [0u8; 1];
    io.read_exact(&mut n)?;
    let mut id = vec![0u8; n[0] as usize];
    io.read_exact(&mut id)?;
    let mut tag = [0u8; MAC_LEN];
    io.read_exact(&mut tag)?;
    let id = String::from_utf8_lossy(&id).into_owned();
    let key = keys.find(&id).filter(|key| verify(key, b"emu-psk source", &id, &exp, &tag));
    let Some(key) = key else {
        let _ = io.write_all(&[0]).and_then(|_| io.flush());
        let why = match keys.find(&id) {
            Some(_) => format!("the source's proof for pre-shared key identity '{id}' fails: another key"),
            None => format!("the source's pre-shared key identity '{id}' is not in tls-psk"),
        };
        return Err(refused(why));
    };
    let mut msg = vec![1u8];
    msg.extend_from_slice(mac(key, b"emu-psk destination", &id, &exp).as_ref());
    io.write_all(&msg)?;
    io.flush()
}

/// A blocking socket rustls can drive.
pub(super) trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Plaintext reads and writes on a session over a blocking socket (rustls' own `Stream` takes
/// only the typed connections, not [`rustls::Connection`]).
struct Session<'a, S: ReadWrite> {
    conn: &'a mut rustls::Connection,
    sock: &'a mut S,
}

impl<S: ReadWrite> Read for Session<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => return done,
            }
            if self.conn.read_tls(self.sock)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.conn.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
    }
}

impl<S: ReadWrite> Write for Session<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.conn.writer().write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            self.conn.write_tls(self.sock)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_are_checked() {
        let p = Path::new("keys.psk");
        let k = PskKeys::parse(p, "# made by psktool\nqemu:00112233445566778899aabbccddeeff\nother:").unwrap_err();
        assert!(k.to_string().contains("line 3: the key is shorter than 128 bits"), "{k}");
        let k = PskKeys::parse(p, "\nqemu:00112233445566778899aabbccddeeff\nb:ffeeddccbbaa99887766554433221100\n");
        let k = k.unwrap();
        assert_eq!(k.find("b").map(<[u8]>::len), Some(16));
        assert_eq!(format!("{k:?}"), r#"PskKeys(["qemu", "b"])"#, "keys never printed");
        for (text, why) in [
            ("qemu", "no ':'"),
            ("qemu:0011", "shorter than 128 bits"),
            ("qemu:0g112233445566778899aabbccddeeff", "not hexadecimal"),
            ("qemu:0112233445566778899aabbccddeeff", "not hexadecimal"),
            (":00112233445566778899aabbccddeeff", "1 to 255 bytes"),
        ] {
            let e = PskKeys::parse(p, text).unwrap_err().to_string();
            assert!(e.contains("line 1") && e.contains(why), "{text}: {e}");
        }
        assert!(matches!(PskKeys::parse(p, "# nothing\n\n"), Err(PskError::Empty { .. })));
    }
}
