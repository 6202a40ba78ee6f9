//! A TCP proxy between a migration source and its destination that understands the stream's
//! framing (preamble, then 16-byte frames with a length) and can drop, delay, corrupt, cut at, or
//! hold one record, as a broken network or a dying peer would. Only the first connection is
//! tampered with; later ones (a source asking again with RESOLVE) pass untouched, as when a link
//! comes back. [`Proxy::start_any`] instead tampers with whichever connection carries the record
//! first (postcopy's requests travel the urgent connection, not the first one).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

const PREAMBLE: usize = 12;
const FRAME: usize = 16;

/// Which way a record travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    ToDestination,
    ToSource,
}

/// What happens to the record the rule names (and, for `Delay` and `Hold`, to everything after it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Drop,
    Delay(Duration),
    /// Flip one bit in the frame's length field.
    CorruptLength,
    /// Close both directions instead of forwarding it.
    Cut,
    /// Stop there until [`Proxy::release`] says what to do with it.
    Hold,
}

/// What a held record becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    Forward,
    Cut,
}

#[derive(Default)]
struct Shared {
    fired: AtomicBool,
    release: Mutex<Option<Release>>,
    released: Condvar,
    hit: Condvar,
    hit_flag: Mutex<bool>,
}

pub struct Proxy {
    pub uri: String,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Listens on 127.0.0.1 and forwards to `dst_uri` (`tcp:HOST:PORT`), applying `action` to the
    /// first record of type `record` going `dir` on the first connection.
    pub fn start(dst_uri: &str, dir: Dir, record: u8, action: Action) -> Proxy {
        Proxy::start_with(dst_uri, dir, record, action, false)
    }

    /// As [`Proxy::start`], the rule applying to the first such record on any connection.
    pub fn start_any(dst_uri: &str, dir: Dir, record: u8, action: Action) -> Proxy {
        Proxy::start_with(dst_uri, dir, record, action, true)
    }

    fn start_with(dst_uri: &str, dir: Dir, record: u8, action: Action, any: bool) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listen");
        let uri = format!("tcp:{}", listener.local_addr().unwrap());
        let dst = dst_uri.strip_prefix("tcp:").expect("a tcp destination").to_string();
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        std::thread::spawn(move || {
            let mut first = true;
            // Bounded: a test makes a handful of connections at most.
            for _ in 0..64 {
                let Ok((from_src, _)) = listener.accept() else { return };
                let Ok(to_dst) = TcpStream::connect(&dst) else {
                    let _ = from_src.shutdown(Shutdown::Both);
                    continue;
                };
                let rule = if first || any { Some((dir, record, action)) } else { None };
                first = false;
                pair(from_src, to_dst, rule, s.clone());
            }
        });
        Proxy { uri, shared }
    }

    /// Whether the rule's record went by.
    pub fn fired(&self) -> bool {
        self.shared.fired.load(Ordering::SeqCst)
    }

    /// Waits until a held record has arrived at the proxy.
    pub fn wait_held(&self, timeout: Duration) -> bool {
        let hit = self.shared.hit_flag.lock().unwrap();
        let (hit, _) = self.shared.hit.wait_timeout_while(hit, timeout, |h| !*h).unwrap();
        *hit
    }

    pub fn release(&self, what: Release) {
        *self.shared.release.lock().unwrap() = Some(what);
        self.shared.released.notify_all();
    }
}

fn pair(a: TcpStream, b: TcpStream, rule: Option<(Dir, u8, Action)>, shared: Arc<Shared>) {
    let rule_for = |d: Dir| rule.filter(|r| r.0 == d).map(|r| (r.1, r.2));
    let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let (s1, s2) = (shared.clone(), shared);
    let (r1, r2) = (rule_for(Dir::ToDestination), rule_for(Dir::ToSource));
    let (a3, b3) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let (a4, b4) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    // The source opens with a preamble; the destination's replies are frames from the start.
    std::thread::spawn(move || pump(a, b, true, r1, &s1, (&a3, &b3)));
    std::thread::spawn(move || pump(b2, a2, false, r2, &s2, (&a4, &b4)));
}

fn cut(both: (&TcpStream, &TcpStream)) {
    let _ = both.0.shutdown(Shutdown::Both);
    let _ = both.1.shutdown(Shutdown::Both);
}

/// Forwards records from `from` to `to`, applying `rule` to the first record of its type.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    preamble: bool,
    mut rule: Option<(u8, Action)>,
    shared: &Shared,
    both: (&TcpStream, &TcpStream),
) {
    if preamble {
        let mut p = [0u8; PREAMBLE];
        if from.read_exact(&mut p).is_err() || to.write_all(&p).is_err() {
            return cut(both);
        }
    }
    loop {
        let mut frame = [0u8; FRAME];
        if from.read_exact(&mut frame).is_err() {
            let _ = to.shutdown(Shutdown::Write);
            return;
        }
        let len = u32::from_le_bytes(frame[4..8].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; len.min(64 << 20)];
        if from.read_exact(&mut payload).is_err() {
            return cut(both);
        }
        // Once only, whichever connection it fired on.
        if let Some((_, action)) = rule.filter(|r| r.0 == frame[0] && !shared.fired.swap(true, Ordering::SeqCst)) {
            rule = None;
            match action {
                Action::Drop => continue,
                Action::Delay(d) => std::thread::sleep(d),
                Action::CorruptLength => frame[6] ^= 0x01,
                Action::Cut => return cut(both),
                Action::Hold => {
                    *shared.hit_flag.lock().unwrap() = true;
                    shared.hit.notify_all();
                    let r = shared.release.lock().unwrap();
                    let (r, _) =
                        shared.released.wait_timeout_while(r, Duration::from_secs(60), |r| r.is_none()).unwrap();
                    if *r != Some(Release::Forward) {
                        return cut(both);
                    }
                }
            }
        }
        if to.write_all(&frame).and_then(|_| to.write_all(&payload)).is_err() {
            return cut(both);
        }
    }
}
