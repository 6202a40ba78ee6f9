//! Migration over the single-pipe transports: `exec:` running the destination emu, and `ssh:`
//! through a real `sshd` on 127.0.0.1 (started here, with a throwaway host key and user key). The
//! verify guest must arrive with RAM equal page for page and go on without a VERIFY-FAIL; a
//! command that fails and an ssh host that cannot be reached must leave the source running, with
//! the reason in `error-desc`.

use emu_harness as common;
use emu_harness::require_kvm;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Emu, Qmp, ScratchDir};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

/// A destination that a transport started (not a child of the test): reached through its monitor,
/// and told to quit when dropped so that a failed test leaves no guest behind.
struct Remote {
    monitor: PathBuf,
}

impl Remote {
    fn qmp(&self, command: &str, arguments: Value) -> Value {
        let deadline = Instant::now() + T;
        let mut q = loop {
            match Qmp::connect(&self.monitor) {
                Ok(q) => break q,
                Err(e) if Instant::now() > deadline => panic!("destination monitor {}: {e}", self.monitor.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        q.call_ok(command, arguments)
    }

    fn status(&self) -> String {
        self.qmp("query-status", json!({}))["status"].as_str().unwrap().to_string()
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        if let Ok(mut q) = Qmp::connect(&self.monitor) {
            let _ = q.call("quit", json!({}));
        }
    }
}

fn assert_ram_equal(src: &Emu, dst: &Remote) {
    assert_digests_equal(&src.ram_digest(), &dst.qmp("query-ram-digest", json!({"pages": true})));
}

fn assert_digests_equal(a: &Value, b: &Value) {
    if a["digest"] == b["digest"] {
        return;
    }
    let (pa, pb) = (a["pages"].as_array().unwrap(), b["pages"].as_array().unwrap());
    assert_eq!(pa.len(), pb.len(), "RAM sizes differ");
    let diff: Vec<usize> = (0..pa.len()).filter(|&i| pa[i] != pb[i]).collect();
    panic!("RAM differs in {} pages, first {:?}", diff.len(), &diff[..diff.len().min(10)]);
}

/// The verify guest (`wl=verify:64`) on a source ready to migrate.
fn verify_source() -> Emu {
    let src = Emu::boot(&["--mem", "256M", "--append", "wl=verify:64"]);
    src.expect_line("verify: written=", T);
    src
}

/// Migrates `src` to `uri`, whose destination serves its monitor at `dst.monitor` and starts
/// paused (-S); checks completion, the run states and RAM page for page, then lets it run.
fn migrate_and_compare(src: &Emu, uri: &str, dst: &Remote) -> Value {
    let info = common::migrate(src, uri, T);
    assert_eq!(info["status"], "completed", "{info}\nsource stderr: {}", src.stderr());
    assert_eq!(src.status(), "postmigrate");
    assert_eq!(dst.status(), "paused");
    assert_ram_equal(src, dst);
    dst.qmp("cont", json!({}));
    assert_eq!(dst.status(), "running");
    info
}

fn emu_path() -> String {
    common::emu_bin().canonicalize().expect("the emu binary").display().to_string()
}

#[test]
fn exec_migrates_the_verify_guest() {
    require_kvm!();
    let src = verify_source();
    let dir = ScratchDir::new();
    let dst = Remote { monitor: dir.path("dst.sock") };
    // The serial console stays on the default (stdio): stdout is the stream, so it goes to the
    // destination's stderr, which the source forwards into its log.
    let uri = format!("exec:{} --incoming stdio -S --monitor unix:{}", emu_path(), dst.monitor.display());
    let info = migrate_and_compare(&src, &uri, &dst);
    // One pipe: one channel, whatever the parameter says (4 by default).
    assert_eq!(src.qmp_ok("query-migrate-parameters", json!({}))["channels"], 4);
    assert!(src.stderr().contains("one connection, so one channel"), "{}", src.stderr());
    assert!(info["ram"]["transferred"].as_u64().unwrap() > 64 << 20, "{info}");
    let forwarded = src
        .wait_stderr(|l| l.contains("sh -c ") && l.contains("verify: written="), T)
        .unwrap_or_else(|| panic!("the destination's serial console in the source's log: {}", src.stderr()));
    assert!(forwarded.contains("failures=0"), "{forwarded}");
    let n = src.stderr().lines().filter(|l| l.contains("verify: written=")).count();
    let deadline = Instant::now() + T;
    while src.stderr().lines().filter(|l| l.contains("verify: written=")).count() < n + 2 {
        assert!(Instant::now() < deadline, "verify does not go on: {}", src.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!src.stderr().contains("VERIFY-FAIL"), "{}", src.stderr());
    assert!(!src.output().contains("VERIFY-FAIL"), "{}", src.output());
}

/// Fails with the reason, and the guest goes on at the source.
fn assert_refused_and_source_runs(src: &Emu, uri: &str, expect: &[&str]) {
    let info = common::migrate(src, uri, T);
    assert_eq!(info["status"], "failed", "{uri}: {info}");
    let why = info["error-desc"].as_str().unwrap_or_default();
    for e in expect {
        assert!(why.contains(e), "{uri}: {e:?} not in {why:?}");
    }
    assert_eq!(src.status(), "running", "{uri}");
    let n = src.line_count();
    src.wait_line_from(n, |l| l.contains("verify: written="), T).expect("the source goes on");
    assert!(!src.output().contains("VERIFY-FAIL"), "{}", src.output());
}

#[test]
fn a_failing_exec_command_leaves_the_source_running() {
    require_kvm!();
    let src = verify_source();
    assert_refused_and_source_runs(&src, "exec:false", &["`sh -c false` exited with status 1"]);
    assert_refused_and_source_runs(
        &src,
        "exec:no-such-destination-emu --incoming stdio",
        &["exited with status 127", "not found"],
    );
    // A command that takes the stream but is no destination: ERROR from the real emu is the
    // refusal; a mismatch of --mem is one.
    let dir = ScratchDir::new();
    let uri = format!("exec:{} --incoming stdio --mem 128M --serial none", emu_path());
    assert_refused_and_source_runs(&src, &uri, &["refused", "--mem"]);
    drop(dir);
    let e = src.qmp("migrate", json!({"uri": "stdio"})).expect_err("stdio is a destination's");
    assert!(e.contains("exec: or ssh:"), "{e}");
}

/// A real sshd on 127.0.0.1, a free port, with its own host key and one authorized user key;
/// `config` is the client configuration (`ssh -F`) that trusts exactly that host key.
struct Sshd {
    child: Child,
    port: u16,
    config: PathBuf,
    _dir: ScratchDir,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn sh(cmd: &str) -> bool {
    Command::new("sh").arg("-c").arg(cmd).stdout(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// The sshd binary, installed (Debian's openssh-server) when missing and this runs as root, as
/// `.ci/run` does; `None` (skip, or fail under CI) if there is none.
fn sshd_binary(test: &str) -> Option<PathBuf> {
    let bin = PathBuf::from("/usr/sbin/sshd");
    if !bin.exists() && sh("[ $(id -u) = 0 ]") {
        sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssh-server openssh-client");
    }
    if bin.exists() && sh("command -v ssh ssh-keygen") {
        return Some(bin);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: no sshd or ssh here; CI installs openssh-server and openssh-client (.ci/run)");
    }
    eprintln!("SKIPPED {test}: no /usr/sbin/sshd and ssh (apt-get install openssh-server openssh-client)");
    None
}

impl Sshd {
    fn start(bin: &Path) -> Sshd {
        let dir = ScratchDir::new();
        let p = |n: &str| dir.path(n).display().to_string();
        for key in ["host_key", "user_key"] {
            assert!(sh(&format!("ssh-keygen -q -t ed25519 -N '' -f {}", p(key))), "ssh-keygen");
        }
        std::fs::copy(dir.path("user_key.pub"), dir.path("authorized_keys")).unwrap();
        let port = free_port();
        let host_key = std::fs::read_to_string(dir.path("host_key.pub")).unwrap();
        std::fs::write(dir.path("known_hosts"), format!("[127.0.0.1]:{port} {host_key}")).unwrap();
        std::fs::write(
            dir.path("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\nAuthorizedKeysFile {}\n\
                 StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                 PermitRootLogin prohibit-password\nPubkeyAuthentication yes\nLogLevel ERROR\n",
                p("host_key"),
                p("sshd.pid"),
                p("authorized_keys"),
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path("ssh_config"),
            format!(
                "Host *\n  IdentityFile {}\n  IdentitiesOnly yes\n  UserKnownHostsFile {}\n  \
                 StrictHostKeyChecking yes\n  LogLevel ERROR\n",
                p("user_key"),
                p("known_hosts")
            ),
        )
        .unwrap();
        // Privilege separation wants this directory (Debian creates it in its service unit).
        let _ = std::fs::create_dir_all("/run/sshd");
        let child = Command::new(bin)
            .args(["-D", "-e", "-f"])
            .arg(dir.path("sshd_config"))
            .stdin(Stdio::null())
            .spawn()
            .expect("start sshd");
        let pid_file = dir.path("sshd.pid");
        let sshd = Sshd { child, port, config: dir.path("ssh_config"), _dir: dir };
        // sshd writes its pid file once it listens (a probe connection instead would make it
        // complain about a client that said nothing).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pid_file.exists() {
            assert!(Instant::now() < deadline, "sshd did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        sshd
    }
}

fn user() -> String {
    let out = Command::new("id").arg("-un").output().expect("id -un");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn ssh_migrates_the_verify_guest() {
    require_kvm!();
    let Some(bin) = sshd_binary("ssh_migrates_the_verify_guest") else { return };
    let sshd = Sshd::start(&bin);
    let src = verify_source();
    let dir = ScratchDir::new();
    let dst = Remote { monitor: dir.path("dst.sock") };
    let serial = dir.path("serial.log");
    let uri = format!(
        "ssh:{}@127.0.0.1:{}?emu={}&config={}&args=-S --monitor unix:{} --serial file:{}",
        user(),
        sshd.port,
        emu_path(),
        sshd.config.display(),
        dst.monitor.display(),
        serial.display()
    );
    migrate_and_compare(&src, &uri, &dst);
    // The destination's stderr came through ssh into the source's log.
    let said = src.wait_stderr(|l| l.contains("ssh 127.0.0.1: emu: migration received"), T);
    assert!(said.is_some(), "{}", src.stderr());
    let deadline = Instant::now() + T;
    loop {
        let out = std::fs::read_to_string(&serial).unwrap_or_default();
        assert!(!out.contains("VERIFY-FAIL"), "{out}");
        if out.lines().filter(|l| l.contains("verify: written=")).count() >= 2 {
            assert!(out.contains("failures=0"), "{out}");
            break;
        }
        assert!(Instant::now() < deadline, "verify does not go on at the destination: {out}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_unreachable_ssh_host_leaves_the_source_running() {
    require_kvm!();
    if !sh("command -v ssh") {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "no ssh client; CI installs openssh-client");
        eprintln!("SKIPPED an_unreachable_ssh_host_leaves_the_source_running: no ssh client");
        return;
    }
    let src = verify_source();
    // A port nothing listens on: ssh says so and exits 255.
    let uri = format!("ssh:127.0.0.1:{}?emu=/nonexistent/emu", free_port());
    assert_refused_and_source_runs(&src, &uri, &["exited with status 255", "Connection refused"]);
}

#[test]
fn plain_tcp_off_this_host_is_warned_about() {
    require_kvm!();
    let src = Emu::boot(&["--mem", "64M"]);
    let (dst, uri) = Emu::incoming(&["--serial", "none"]);
    // Loopback: no warning.
    assert_eq!(common::migrate(&src, &uri, T)["status"], "completed");
    assert!(!src.stderr().contains("unencrypted"), "{}", src.stderr());
    drop(dst);
    // TEST-NET-1 (RFC 5737): nothing answers; the warning comes when the migration starts.
    let src = Emu::boot(&["--mem", "64M"]);
    src.qmp_ok("migrate", json!({"uri": "tcp:192.0.2.1:4444"}));
    let w = src.wait_stderr(|l| l.contains("unencrypted and unauthenticated"), T);
    assert!(w.is_some_and(|w| w.contains("tcp:192.0.2.1:4444")), "{}", src.stderr());
    src.qmp_ok("migrate-cancel", json!({}));
    let info = common::wait_migration(&src, T);
    assert_ne!(info["status"], "completed", "{info}");
    assert_eq!(src.status(), "running");
}

/// A relay from stdin/stdout to a TCP address, so that an `exec:` migration can go through the
/// harness's breaking proxy.
const RELAY: &str = r#"
import os, socket, sys, threading
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def up():
    while True:
        b = os.read(0, 65536)
        if not b:
            break
        s.sendall(b)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while True:
    b = s.recv(65536)
    if not b:
        break
    while b:
        b = b[os.write(1, b):]
"#;

/// GO lost on a single-pipe transport: over TCP the source would ask again on a new connection
/// (RESOLVE), but an `exec:` or `ssh:` source cannot (a new connection would start another
/// destination). So nothing may decide by itself: both sides stay paused, the source says why,
/// until the operator's `migrate-resolve`; there is one running copy at the end, never two.
#[test]
fn a_lost_go_over_exec_stays_unresolved_until_the_operator_decides() {
    require_kvm!();
    use emu_harness::proxy::{Action, Dir, Proxy};
    let src = Emu::boot(&["--mem", "64M", "--append", "wl=verify:8:20000"]);
    src.expect_line("verify: written=", T);
    let (dst, dst_uri) = Emu::incoming(&[]);
    let proxy = Proxy::start(&dst_uri, Dir::ToDestination, migrate::stream::RecordType::Go as u8, Action::Drop);
    let dir = ScratchDir::new();
    std::fs::write(dir.path("relay.py"), RELAY).unwrap();
    let port = proxy.uri.rsplit(':').next().unwrap();
    let uri = format!("exec:python3 {} {port}", dir.path("relay.py").display());
    src.qmp_ok("migrate", json!({"uri": uri}));
    let deadline = Instant::now() + T;
    let info = loop {
        let info = src.qmp_ok("query-migrate", json!({}));
        if info["status"] == "unresolved" && info["error-desc"].as_str().is_some_and(|e| e.contains("asked")) {
            break info;
        }
        assert_ne!(info["status"], "completed", "{info}");
        assert_ne!(info["status"], "failed", "{info}");
        assert!(Instant::now() < deadline, "{info}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(proxy.fired(), "GO was never dropped: {info}");
    let why = info["error-desc"].as_str().unwrap();
    assert!(why.contains("one connection") && why.contains("migrate-resolve"), "{why}");
    // Neither copy runs while it is unresolved.
    let (n_src, n_dst) = (src.line_count(), dst.line_count());
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(src.status(), "migrate-unresolved");
    assert_eq!(src.qmp_ok("query-migrate", json!({}))["status"], "unresolved");
    assert_eq!((src.line_count(), dst.line_count()), (n_src, n_dst), "a copy ran: {}", dst.output());
    assert!(dst.lines().is_empty(), "the destination ran the guest: {}", dst.output());
    // The operator keeps it at the destination, on both sides.
    dst.qmp_ok("migrate-resolve", json!({"keep": "destination"}));
    let done = src.qmp_ok("migrate-resolve", json!({"keep": "destination"}));
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(src.status(), "postmigrate");
    dst.expect_line("verify: written=", T);
    assert!(!dst.output().contains("VERIFY-FAIL"), "{}", dst.output());
    let n = src.line_count();
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(src.line_count(), n, "the source ran again");
}

/// Mutual TLS on tcp: (`--tls-cert`, `--tls-key`, `--tls-ca`, from `scripts/test-certs.sh`): a
/// plain source is refused by a TLS destination with a clear reason and nothing is started there;
/// then the verify guest migrates over TLS with RAM equal page for page.
#[test]
fn tls_migrates_the_verify_guest_and_a_plain_stream_is_refused() {
    require_kvm!();
    let certs = ScratchDir::new();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/test-certs.sh");
    assert!(sh(&format!("sh {} {}", script.display(), certs.0.display())), "scripts/test-certs.sh (needs openssl)");
    let p = |n: &str| certs.path(n).display().to_string();
    let tls = |who: &str| {
        ["--tls-cert".to_string(), p(&format!("{who}.pem")), "--tls-key".into(), p(&format!("{who}.key"))]
            .into_iter()
            .chain(["--tls-ca".to_string(), p("ca.pem")])
            .collect::<Vec<_>>()
    };
    let dst_tls = tls("dst");
    let mut dst_args: Vec<&str> = vec!["-S"];
    dst_args.extend(dst_tls.iter().map(String::as_str));
    let (dst, uri) = Emu::incoming(&dst_args);
    assert!(dst.stderr().contains("TLS: waiting for an incoming migration"), "{}", dst.stderr());

    let plain = verify_source();
    assert_refused_and_source_runs(&plain, &uri, &["refused", "takes TLS only"]);
    assert!(dst.wait_monitor(T));
    assert_eq!(dst.status(), "inmigrate", "the plain stream started something");
    assert!(dst.stderr().contains("refused a plain (not TLS) migration stream"), "{}", dst.stderr());
    drop(plain);

    let src_tls = tls("src");
    let mut src_args = vec!["--mem", "256M", "--append", "wl=verify:64"];
    src_args.extend(src_tls.iter().map(String::as_str));
    let src = Emu::boot(&src_args);
    src.expect_line("verify: written=", T);
    let params = src.qmp_ok("query-migrate-parameters", json!({}));
    assert_eq!(params["tls-cert"], p("src.pem"), "{params}");
    let info = common::migrate(&src, &uri, T);
    assert_eq!(info["status"], "completed", "{info}\nsource: {}\ndestination: {}", src.stderr(), dst.stderr());
    assert!(!src.stderr().contains("unencrypted"), "{}", src.stderr());
    assert_eq!(dst.status(), "paused");
    assert_digests_equal(&src.ram_digest(), &dst.ram_digest());
    dst.qmp_ok("cont", json!({}));
    let n = dst.line_count();
    dst.wait_line_from(n, |l| l.contains("verify: written="), T).expect("verify goes on");
    dst.wait_line_from(n + 1, |l| l.contains("verify: written="), T).expect("verify goes on");
    assert!(!dst.output().contains("VERIFY-FAIL"), "{}", dst.output());
}

/// TLS with a pre-shared key (`--tls-psk`, QEMU's keys.psk format): a source holding another key
/// is refused, says why and goes on running, and nothing starts on the destination; a source
/// given the right key through `migrate-set-parameters` migrates the verify guest with RAM equal.
#[test]
fn tls_psk_migrates_the_verify_guest_and_a_wrong_key_is_refused() {
    require_kvm!();
    let keys = ScratchDir::new();
    let write = |name: &str, text: &str| {
        std::fs::write(keys.path(name), text).unwrap();
        keys.path(name).display().to_string()
    };
    let dst_keys = write("dst.psk", "# psktool -u qemu -p keys.psk\nqemu:8e4f0c1b7a2d3e5f60718293a4b5c6d7\n");
    let wrong = write("wrong.psk", "qemu:00000000000000000000000000000001\n");
    let right = write("src.psk", "qemu:8e4f0c1b7a2d3e5f60718293a4b5c6d7\n");
    let (dst, uri) = Emu::incoming(&["-S", "--tls-psk", &dst_keys]);
    assert!(dst.stderr().contains("TLS: waiting for an incoming migration"), "{}", dst.stderr());

    let stranger = Emu::boot(&["--mem", "256M", "--append", "wl=verify:64", "--tls-psk", &wrong]);
    stranger.expect_line("verify: written=", T);
    assert_refused_and_source_runs(&stranger, &uri, &["refused our pre-shared key"]);
    assert!(dst.wait_monitor(T));
    assert_eq!(dst.status(), "inmigrate", "a wrong key started something");
    drop(stranger);

    let src = verify_source();
    src.qmp_ok("migrate-set-parameters", json!({"tls-psk": right}));
    assert_eq!(src.qmp_ok("query-migrate-parameters", json!({}))["tls-psk"], right);
    let info = common::migrate(&src, &uri, T);
    assert_eq!(info["status"], "completed", "{info}\nsource: {}\ndestination: {}", src.stderr(), dst.stderr());
    assert_eq!(dst.status(), "paused");
    assert_digests_equal(&src.ram_digest(), &dst.ram_digest());
    dst.qmp_ok("cont", json!({}));
    let n = dst.line_count();
    dst.wait_line_from(n, |l| l.contains("verify: written="), T).expect("verify goes on");
    assert!(!dst.output().contains("VERIFY-FAIL"), "{}", dst.output());
    // A key file that is not one is told at once, not at the migration.
    let bad = write("bad.psk", "qemu:short\n");
    let e = src.qmp("migrate-set-parameters", json!({"tls-psk": bad})).expect_err("a bad key file taken");
    assert!(e.contains("line 1"), "{e}");
}

/// A TCP relay that understands nothing (TLS bytes are opaque), carries at most
/// [`RELAY_RATE`] bytes per second each way (so that a postcopy through it is still going when
/// the test cuts it, however busy the host), and cuts every connection it carries when told.
const RELAY_RATE: u64 = 8 << 20;

struct CuttingRelay {
    uri: String,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl CuttingRelay {
    fn start(to: &str) -> CuttingRelay {
        let to = to.strip_prefix("tcp:").unwrap().to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let uri = format!("tcp:{}", listener.local_addr().unwrap());
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let c = conns.clone();
        std::thread::spawn(move || {
            for a in listener.incoming() {
                let Ok(a) = a else { return };
                let Ok(b) = std::net::TcpStream::connect(&to) else { return };
                c.lock().unwrap().extend([a.try_clone().unwrap(), b.try_clone().unwrap()]);
                for (mut from, mut into) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let started = Instant::now();
                        let (mut buf, mut moved) = (vec![0u8; 64 << 10], 0u64);
                        while let Ok(n @ 1..) = from.read(&mut buf) {
                            if into.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            moved += n as u64;
                            let due = Duration::from_secs_f64(moved as f64 / RELAY_RATE as f64);
                            std::thread::sleep(due.saturating_sub(started.elapsed()));
                        }
                        let _ = into.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        CuttingRelay { uri, conns }
    }

    fn cut(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn wait_status(emu: &Emu, want: &str) -> Value {
    common::wait_migration_status(emu, want, T)
}

/// A postcopy over TLS whose link is cut recovers over TLS (`migrate-recover` on a destination
/// with credentials listens for TLS; the source resumes with its own), and the verify guest finds
/// no lost write.
#[test]
fn a_postcopy_over_tls_recovers_over_tls() {
    require_kvm!();
    let certs = ScratchDir::new();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/test-certs.sh");
    assert!(sh(&format!("sh {} {}", script.display(), certs.0.display())), "scripts/test-certs.sh (needs openssl)");
    let p = |n: &str| certs.path(n).display().to_string();
    let (dcert, dkey, scert, skey, ca) = (p("dst.pem"), p("dst.key"), p("src.pem"), p("src.key"), p("ca.pem"));
    let (dst, uri) = Emu::incoming(&["--tls-cert", &dcert, "--tls-key", &dkey, "--tls-ca", &ca]);
    let src = Emu::boot(&[
        "--mem",
        "256M",
        "--append",
        "wl=verify:64",
        "--tls-cert",
        &scert,
        "--tls-key",
        &skey,
        "--tls-ca",
        &ca,
    ]);
    src.expect_line("verify: written=", T);
    let relay = CuttingRelay::start(&uri);
    src.qmp_ok("migrate", json!({"uri": relay.uri}));
    let deadline = Instant::now() + T;
    while src.qmp_ok("query-migrate", json!({}))["ram"]["transferred"].as_u64().unwrap_or(0) < 1 << 20 {
        assert!(Instant::now() < deadline, "{}", src.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    src.qmp_ok("migrate-start-postcopy", json!({}));
    wait_status(&src, "postcopy-active");
    relay.cut();
    wait_status(&src, "postcopy-paused");
    wait_status(&dst, "postcopy-paused");
    let again = dst.qmp_ok("migrate-recover", json!({"uri": "tcp:127.0.0.1:0"}));
    src.qmp_ok("migrate", json!({"uri": again["uri"], "resume": true}));
    let info = common::wait_migration(&src, T);
    assert_eq!(info["status"], "completed", "{info}\n{}\n{}", src.stderr(), dst.stderr());
    assert_eq!(info["postcopy"]["recoveries"], 1, "{info}");
    for _ in 0..3 {
        let n = dst.line_count();
        dst.wait_line_from(n, |l| l.contains("verify: written="), T).expect("verify goes on at the destination");
    }
    assert!(!dst.output().contains("VERIFY-FAIL"), "{}", dst.output());
}
