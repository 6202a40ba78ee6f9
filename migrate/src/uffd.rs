//! A thin, safe layer over userfaultfd(2): the few ioctls the trackers use, written by hand (the
//! `userfaultfd` crate's write-protect support needs bindgen and libclang at build time).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

pub const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
pub const FEATURE_THREAD_ID: u64 = 1 << 8;
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;

const UFFD_API: u64 = 0xAA;
const REGISTER_MODE_MISSING: u64 = 1 << 0;
const REGISTER_MODE_WP: u64 = 1 << 1;
const WRITEPROTECT_MODE_WP: u64 = 1 << 0;
pub const EVENT_PAGEFAULT: u8 = 0x12;
pub const PAGEFAULT_FLAG_WP: u64 = 1 << 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffd_msg` for a page fault (the only event a write-protect registration produces).
#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    /// Bytes copied, or a negative errno (the kernel's answer).
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct UffdMsg {
    pub event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    pub flags: u64,
    pub address: u64,
    pub ptid: u32,
    reserved4: u32,
}

const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);

nix::ioctl_readwrite!(uffdio_api, 0xAA, 0x3F, UffdioApi);
nix::ioctl_readwrite!(uffdio_register, 0xAA, 0x00, UffdioRegister);
nix::ioctl_read!(uffdio_unregister, 0xAA, 0x01, UffdioRange);
nix::ioctl_readwrite!(uffdio_writeprotect, 0xAA, 0x06, UffdioWriteprotect);
nix::ioctl_read!(uffdio_wake, 0xAA, 0x02, UffdioRange);
nix::ioctl_readwrite!(uffdio_copy, 0xAA, 0x03, UffdioCopy);
nix::ioctl_readwrite!(uffdio_zeropage, 0xAA, 0x04, UffdioZeropage);

/// What filling a missing range found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filled {
    /// The whole range was filled (and its waiters woken).
    All,
    /// A page of it was present already; the bytes before it were filled.
    Exists { filled: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("cannot create a userfaultfd")]
    Create(#[source] std::io::Error),
    #[error("userfaultfd lacks features {0:#x}")]
    Features(u64, #[source] nix::Error),
    #[error("cannot {op} {len:#x} bytes at {start:#x}")]
    Range {
        op: &'static str,
        start: u64,
        len: u64,
        #[source]
        source: nix::Error,
    },
    #[error("cannot read userfaultfd events")]
    Read(#[source] std::io::Error),
}

/// An open userfaultfd with its API handshake done.
pub struct Uffd {
    fd: OwnedFd,
}

impl Uffd {
    /// Opens a userfaultfd (O_CLOEXEC | O_NONBLOCK) and negotiates exactly `features`.
    pub fn open(features: u64) -> Result<Uffd, UffdError> {
        let fd = open_fd()?;
        let mut api = UffdioApi { api: UFFD_API, features, ioctls: 0 };
        // SAFETY: `api` is a valid UffdioApi for the ioctl to read and fill; the fd is a userfaultfd.
        unsafe { uffdio_api(fd.as_raw_fd(), &mut api) }.map_err(|e| UffdError::Features(features, e))?;
        Ok(Uffd { fd })
    }

    /// Registers `[start, start + len)` for write-protect tracking.
    pub fn register_wp(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut reg = UffdioRegister { range: UffdioRange { start, len }, mode: REGISTER_MODE_WP, ioctls: 0 };
        // SAFETY: `reg` is a valid UffdioRegister; the range is the caller's own mapping.
        unsafe { uffdio_register(self.fd.as_raw_fd(), &mut reg) }.map(drop).map_err(|source| UffdError::Range {
            op: "register",
            start,
            len,
            source,
        })
    }

    /// Registers a range for missing-page faults (postcopy: a fault on a page that was never filled
    /// waits for [`Uffd::copy`] or [`Uffd::zeropage`]).
    pub fn register_missing(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut reg = UffdioRegister { range: UffdioRange { start, len }, mode: REGISTER_MODE_MISSING, ioctls: 0 };
        // SAFETY: `reg` is a valid UffdioRegister; the range is the caller's own mapping.
        unsafe { uffdio_register(self.fd.as_raw_fd(), &mut reg) }.map(drop).map_err(|source| UffdError::Range {
            op: "register (missing)",
            start,
            len,
            source,
        })
    }

    /// Fills the missing range at `dst` with `src` atomically (UFFDIO_COPY), waking whatever waits
    /// on it. A page of it already present stops the copy there ([`Filled::Exists`]).
    ///
    /// # Safety
    /// `src` must be readable for `len` bytes; `dst` must lie in a range registered with this uffd.
    pub unsafe fn copy(&self, dst: u64, src: *const u8, len: u64) -> Result<Filled, UffdError> {
        let mut done = 0u64;
        while done < len {
            let mut c = UffdioCopy { dst: dst + done, src: src as u64 + done, len: len - done, mode: 0, copy: 0 };
            // SAFETY: `c` is a valid UffdioCopy; the caller vouches for both ranges.
            match unsafe { uffdio_copy(self.fd.as_raw_fd(), &mut c) } {
                Ok(_) => return Ok(Filled::All),
                // Partly done (the kernel stops at a page-table race or a signal): go on after it.
                Err(nix::Error::EAGAIN) | Err(nix::Error::EINTR) => done += c.copy.max(0) as u64,
                Err(nix::Error::EEXIST) => return Ok(Filled::Exists { filled: done + c.copy.max(0) as u64 }),
                Err(source) => return Err(UffdError::Range { op: "fill", start: dst + done, len: len - done, source }),
            }
        }
        Ok(Filled::All)
    }

    /// Fills the missing range with zero pages (UFFDIO_ZEROPAGE), waking its waiters.
    pub fn zeropage(&self, start: u64, len: u64) -> Result<Filled, UffdError> {
        let mut done = 0u64;
        while done < len {
            let mut z =
                UffdioZeropage { range: UffdioRange { start: start + done, len: len - done }, mode: 0, zeropage: 0 };
            // SAFETY: `z` is a valid UffdioZeropage; the range lies in registered memory or the
            // kernel refuses it.
            match unsafe { uffdio_zeropage(self.fd.as_raw_fd(), &mut z) } {
                Ok(_) => return Ok(Filled::All),
                Err(nix::Error::EAGAIN) | Err(nix::Error::EINTR) => done += z.zeropage.max(0) as u64,
                Err(nix::Error::EEXIST) => return Ok(Filled::Exists { filled: done + z.zeropage.max(0) as u64 }),
                Err(source) => {
                    return Err(UffdError::Range { op: "zero-fill", start: start + done, len: len - done, source })
                }
            }
        }
        Ok(Filled::All)
    }

    /// Wakes threads waiting on faults in the range (whose page another thread has filled).
    pub fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut range = UffdioRange { start, len };
        // SAFETY: `range` is a valid UffdioRange for the ioctl to read.
        unsafe { uffdio_wake(self.fd.as_raw_fd(), &mut range) }.map(drop).map_err(|source| UffdError::Range {
            op: "wake",
            start,
            len,
            source,
        })
    }

    pub fn unregister(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut range = UffdioRange { start, len };
        // SAFETY: `range` is a valid UffdioRange for the ioctl to read.
        unsafe { uffdio_unregister(self.fd.as_raw_fd(), &mut range) }.map(drop).map_err(|source| UffdError::Range {
            op: "unregister",
            start,
            len,
            source,
        })
    }

    /// Write-protects (`protect = true`) or unprotects the range. Unprotecting also wakes threads
    /// blocked on a write fault in it.
    pub fn write_protect(&self, start: u64, len: u64, protect: bool) -> Result<(), UffdError> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode: if protect { WRITEPROTECT_MODE_WP } else { 0 },
        };
        loop {
            // SAFETY: `wp` is a valid UffdioWriteprotect; the range lies in registered memory.
            match unsafe { uffdio_writeprotect(self.fd.as_raw_fd(), &mut wp) } {
                Ok(_) => return Ok(()),
                // The kernel asks to retry when it races with a concurrent page-table change.
                Err(nix::Error::EAGAIN) | Err(nix::Error::EINTR) => continue,
                Err(source) => {
                    let op = if protect { "write-protect" } else { "unprotect" };
                    return Err(UffdError::Range { op, start, len, source });
                }
            }
        }
    }

    /// Registers every range for write-protect tracking.
    pub fn register_wp_ranges(&self, ranges: &[(u64, u64)]) -> Result<(), UffdError> {
        ranges.iter().try_for_each(|&(start, len)| self.register_wp(start, len))
    }

    /// Write-protects or unprotects every range.
    pub fn write_protect_ranges(&self, ranges: &[(u64, u64)], protect: bool) -> Result<(), UffdError> {
        ranges.iter().try_for_each(|&(start, len)| self.write_protect(start, len, protect))
    }

    /// Unprotects and unregisters every range, going on past failures (teardown must finish);
    /// returns the first failure. Unprotecting also wakes any thread blocked on a fault in them.
    pub fn release_ranges(&self, ranges: &[(u64, u64)]) -> Result<(), UffdError> {
        let mut first = Ok(());
        for &(start, len) in ranges {
            let r = self.write_protect(start, len, false).and(self.unregister(start, len));
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// Reads pending events into `msgs`; returns how many (0 when none are pending).
    pub fn read_events(&self, msgs: &mut [UffdMsg]) -> Result<usize, UffdError> {
        let bytes = std::mem::size_of_val(msgs);
        // SAFETY: `msgs` is a writable buffer of `bytes` bytes of plain-old-data structs; the kernel
        // writes whole 32-byte messages into it.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), msgs.as_mut_ptr().cast(), bytes) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(0),
                _ => Err(UffdError::Read(e)),
            };
        }
        Ok(n as usize / std::mem::size_of::<UffdMsg>())
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn open_fd() -> Result<OwnedFd, UffdError> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: the userfaultfd syscall takes one int of flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd >= 0 {
        // SAFETY: the syscall returned a new fd that nothing else owns.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    }
    let syscall_err = std::io::Error::last_os_error();
    // Where the syscall is restricted (vm.unprivileged_userfaultfd), /dev/userfaultfd may still serve.
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .map_err(|_| UffdError::Create(syscall_err))?;
    // SAFETY: USERFAULTFD_IOC_NEW on /dev/userfaultfd takes the flags as its argument.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), userfaultfd_ioc_new_code(), flags) };
    if fd < 0 {
        return Err(UffdError::Create(std::io::Error::last_os_error()));
    }
    // SAFETY: the ioctl returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn userfaultfd_ioc_new_code() -> libc::c_ulong {
    nix::request_code_none!(0xAA, 0x00) as libc::c_ulong
}
