//! Command-line interface: options of the VM itself, and the `qmp` client subcommand.

use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use migrate::tracker::TrackerKind;

use crate::qmp::UnixAddr;

#[derive(Parser, Debug)]
#[command(
    name = "emu",
    version,
    about = "A small KVM virtual machine emulator with live migration",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Multiboot kernel to boot (ELF, or a flat image with load addresses in its header).
    /// Without it emu boots its built-in guest.
    #[arg(long, value_name = "IMAGE")]
    pub guest: Option<PathBuf>,
    /// Kernel command line (the built-in guest defaults to `wl=idle`).
    #[arg(long, value_name = "CMDLINE")]
    pub append: Option<String>,
    /// Guest RAM, with a K, M or G suffix [default: 512M; with --incoming: the source's].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub mem: Option<u64>,
    /// Number of vCPUs, 1 to 64 [default: 1; with --incoming: the source's].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub smp: Option<u16>,
    /// Where the guest's serial console goes: stdio, file:PATH or none.
    #[arg(long, value_name = "SINK", default_value = "stdio")]
    pub serial: SerialArg,
    /// Serve the QMP monitor (QEMU's protocol) on a Unix socket: unix:PATH.
    #[arg(long, value_name = "unix:PATH")]
    pub monitor: Option<UnixAddr>,
    /// Wait for a migrating guest instead of booting one: tcp:HOST:PORT, unix:PATH, stdio (the
    /// stream on stdin, answers on stdout: what an exec: or ssh: source starts), file:PATH (a
    /// checkpoint), or `defer` to wait for the monitor's migrate-incoming (as QEMU), so that
    /// parameters can be set first.
    #[arg(long, value_name = "URI|stdio|defer", conflicts_with_all = ["guest", "append"])]
    pub incoming: Option<String>,
    /// With --incoming tcp:/unix:: start from this older checkpoint of the same guest
    /// (`migrate {"uri": "file:PATH"}`); the source then sends only the pages that changed.
    #[arg(long, value_name = "PATH", requires = "incoming")]
    pub base: Option<std::path::PathBuf>,
    /// Mutual TLS for tcp: migrations, this end's certificate chain (PEM): the migration
    /// parameter tls-cert to start with. With --tls-key and --tls-ca.
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// This end's private key (PEM): the migration parameter tls-key.
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// The CA certificates the peer's certificate must be signed by (PEM): tls-ca. A destination
    /// with all three takes TLS only.
    #[arg(long, value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// TLS authenticated by a pre-shared key instead of certificates: QEMU's keys.psk file
    /// (IDENTITY:HEXKEY lines, as `psktool -u qemu -p keys.psk` writes); the migration parameter
    /// tls-psk. A destination with it takes TLS with one of its keys only.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"])]
    pub tls_psk: Option<PathBuf>,
    /// The VM's name, as the monitor's query-name reports it.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Do not run the guest until the monitor's `cont` (after boot, or after an incoming migration).
    #[arg(short = 'S', long)]
    pub paused: bool,
    /// How a migration from this emu tracks dirty pages: uffd-wp, uffd-wp-async, kvm-dirty-log,
    /// kvm-dirty-ring or mprotect (also the migrate parameter dirty-tracker; kvm-dirty-ring has to be
    /// chosen here, since KVM's rings are set up with the vCPUs).
    #[arg(long, value_name = "TRACKER", default_value = DEFAULT_TRACKER.name())]
    pub dirty_tracker: TrackerKind,
    /// Keep guest RAM in memfds (as QEMU's memory-backend-memfd), so that a migration with
    /// `mode` `cpr-transfer` to another emu on this host hands the memory over instead of copying.
    #[arg(long)]
    pub memfd: bool,
}

/// The default dirty tracker (see README.md: the fastest exact one, by measurement).
pub const DEFAULT_TRACKER: TrackerKind = migrate::sender::DEFAULT_TRACKER;

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Send one command to a running emu's monitor and print the reply's "return" value as JSON.
    Qmp {
        /// The monitor socket: unix:PATH.
        socket: UnixAddr,
        /// The command, e.g. query-status.
        command: String,
        /// Its arguments as a JSON object, e.g. '{"uri": "tcp:127.0.0.1:4444"}'.
        arguments: Option<String>,
        /// Print only these fields of the reply (dotted paths such as ram.transferred), space-separated
        /// on one line, for scripts.
        #[arg(long = "get", value_name = "FIELD")]
        get: Vec<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialArg {
    Stdio,
    File(PathBuf),
    None,
}

impl FromStr for SerialArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdio" => Ok(SerialArg::Stdio),
            "none" => Ok(SerialArg::None),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(SerialArg::File(PathBuf::from(p))),
                _ => Err(format!("'{s}' is not stdio, file:PATH or none")),
            },
        }
    }
}

/// Parses a size like `512M`, `2G`, `65536K` or a plain number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 10),
        Some((i, 'M' | 'm')) => (&s[..i], 20),
        Some((i, 'G' | 'g')) => (&s[..i], 30),
        Some((i, 'T' | 't')) => (&s[..i], 40),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("'{s}' is not a size (e.g. 512M, 2G)"))?;
    let bytes = n.checked_shl(shift).filter(|b| b >> shift == n).ok_or_else(|| format!("'{s}' is too large"))?;
    if bytes == 0 || bytes % 4096 != 0 {
        return Err(format!("'{s}' is not a positive multiple of 4 KiB"));
    }
    Ok(bytes)
}

pub fn run_subcommand(cmd: Command) -> Result<ExitCode> {
    match cmd {
        Command::Qmp { socket, command, arguments, get } => {
            crate::qmp::client(&socket, &command, arguments.as_deref(), &get)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("8192"), Ok(8192));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        // Each refusal for its own reason: the message is what the user sees (one line on stderr).
        let err = |s: &str| parse_size(s).expect_err(s);
        assert!(err("0").contains("not a positive multiple of 4 KiB"), "{}", err("0"));
        assert!(err("100").contains("not a positive multiple of 4 KiB"), "{}", err("100"));
        assert!(err("12X").contains("not a size"), "{}", err("12X"));
        assert!(err("M").contains("not a size"), "{}", err("M"));
        assert!(err("-4K").contains("not a size"), "{}", err("-4K"));
        // overflows of the shift, not of the parse: a bad check there would wrap to a small size
        assert!(err("99999999999T").contains("too large"), "{}", err("99999999999T"));
        assert!(err("17179869184G").contains("too large"), "{}", err("17179869184G"));
        assert!(err("").contains("not a size"), "{}", err(""));
    }

    #[test]
    fn serial_and_unix_args() {
        assert_eq!("file:/tmp/x".parse(), Ok(SerialArg::File("/tmp/x".into())));
        assert_eq!("none".parse(), Ok(SerialArg::None));
        for bad in ["file:", "tcp:1", "stdio:"] {
            let e = bad.parse::<SerialArg>().expect_err(bad);
            assert_eq!(e, format!("'{bad}' is not stdio, file:PATH or none"));
        }
        assert_eq!("unix:/a".parse(), Ok(UnixAddr("/a".into())));
        for bad in ["/a", "unix:"] {
            assert_eq!(bad.parse::<UnixAddr>().expect_err(bad), format!("'{bad}' is not unix:PATH"));
        }
    }
}
