//! Page compression for the stream (`migrate-set-parameters compress`): lz4 (lz4_flex) or zstd,
//! record by record, and only where it pays.
//!
//! A PAGES record's data is compressed as one block, and sent compressed only if that pays twice
//! over: the result is at most [`PAYS`] of the raw size, and compressing plus sending it takes less
//! time than sending it raw would, at the link's rate (the rate at which raw records are handed to
//! the socket, the first one of each channel included, or the channel's share of `max-bandwidth`
//! where that is lower). Otherwise the record goes raw,
//! so incompressible data or a link faster than the compressor costs one attempt, not a slower
//! migration. After [`MISSES`] attempts in a row that did not pay, only one record in
//! [`RETRY_EVERY`] is tried until one pays again: memory that does not compress (encrypted or
//! random data) then costs about 1/16 of the compressor's time, and a change (a slower link,
//! compressible data) is noticed within 16 MiB per channel.
//!
//! Compression is off by default: on the loopback and 10 Gb/s links emu targets it rarely pays
//! (docs/compression.md measures it); it does on slow links, with `max-bandwidth`, or between
//! hosts.

use crate::stream::StreamError;

/// Compressed size at most this share of the raw size, or the record goes raw.
pub const PAYS: f64 = 0.875;
/// Failed attempts in a row before compression is tried only now and then.
pub const MISSES: u32 = 4;
pub const RETRY_EVERY: u32 = 16;
/// zstd levels accepted (QEMU's multifd-zstd-level: 0-20, 1 by default).
pub const ZSTD_LEVELS: std::ops::RangeInclusive<i32> = 1..=19;

/// The wire codes of the codecs (the PAGES_COMPRESSED record's codec byte).
const LZ4: u8 = 1;
const ZSTD: u8 = 2;

/// How page data is compressed on the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    None,
    Lz4,
    Zstd,
}

impl Codec {
    pub const ALL: [Codec; 3] = [Codec::None, Codec::Lz4, Codec::Zstd];

    pub fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
        }
    }

    pub(crate) fn wire(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Lz4 => LZ4,
            Codec::Zstd => ZSTD,
        }
    }

    pub(crate) fn from_wire(b: u8) -> Option<Codec> {
        match b {
            LZ4 => Some(Codec::Lz4),
            ZSTD => Some(Codec::Zstd),
            _ => None,
        }
    }
}

impl std::str::FromStr for Codec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Codec::ALL.into_iter().find(|c| c.name() == s).ok_or_else(|| {
            let names: Vec<_> = Codec::ALL.iter().map(|c| c.name()).collect();
            format!("unknown compression '{s}' (one of: {})", names.join(", "))
        })
    }
}

/// What compression did on one channel: records tried, and bytes before and after for those that
/// were sent compressed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompressStats {
    pub records: u64,
    pub pages: u64,
    pub raw_bytes: u64,
    pub compressed_bytes: u64,
    /// Attempts that did not pay (the record went raw).
    pub misses: u64,
}

impl CompressStats {
    pub fn add(&mut self, o: &CompressStats) {
        self.records += o.records;
        self.pages += o.pages;
        self.raw_bytes += o.raw_bytes;
        self.compressed_bytes += o.compressed_bytes;
        self.misses += o.misses;
    }
}

/// One channel's compressor, with its output buffer and its record of what paid.
pub struct Compressor {
    codec: Codec,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    out: Vec<u8>,
    misses_in_a_row: u32,
    since_try: u32,
    /// Bytes per second: records into the link (measured), the link's cap (0: none), and the
    /// compressor's speed on raw bytes (measured); running averages.
    link_rate: Option<f64>,
    cap: u64,
    compress_rate: Option<f64>,
    pub stats: CompressStats,
}

/// A running average that follows a change within a few records.
fn average(old: Option<f64>, new: f64) -> Option<f64> {
    Some(old.map_or(new, |o| 0.75 * o + 0.25 * new))
}

impl Compressor {
    /// `level` is zstd's (ignored for lz4).
    pub fn new(codec: Codec, level: i32) -> std::io::Result<Compressor> {
        let zstd = match codec {
            Codec::Zstd => Some(zstd::bulk::Compressor::new(level)?),
            _ => None,
        };
        Ok(Compressor {
            codec,
            zstd,
            out: Vec::new(),
            misses_in_a_row: 0,
            since_try: 0,
            link_rate: None,
            cap: 0,
            compress_rate: None,
            stats: CompressStats::default(),
        })
    }

    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// The link's cap in bytes per second (`max-bandwidth`; 0: none) for the pass to come.
    pub fn set_cap(&mut self, cap: u64) {
        self.cap = cap;
    }

    /// A raw record of `bytes` took `secs` to hand to the link. (Compressed ones are not timed:
    /// most are small enough to stay in the write buffer, which says nothing of the link.)
    pub fn sent(&mut self, bytes: usize, secs: f64) {
        if secs > 0.0 {
            self.link_rate = average(self.link_rate, bytes as f64 / secs);
        }
    }

    /// Whether `compressed` of `raw` bytes, compressing included, goes out sooner than `raw`
    /// would. Before the link has been measured (and with no cap to go by) the record goes raw, so
    /// that it is.
    fn saves_time(&self, raw: usize, compressed: usize) -> bool {
        let link = match (self.link_rate, self.cap) {
            (Some(l), 0) => l,
            (Some(l), cap) => l.min(cap as f64),
            (None, 0) => return false,
            (None, cap) => cap as f64,
        };
        let Some(speed) = self.compress_rate else { return true };
        raw as f64 / speed + compressed as f64 / link < raw as f64 / link
    }

    /// Compresses `data` (`pages` pages) if this record should be tried and it pays; returns the
    /// compressed bytes, or None to send it raw.
    pub fn compress(&mut self, data: &[u8], pages: u64) -> Option<&[u8]> {
        if self.codec == Codec::None {
            return None;
        }
        if self.misses_in_a_row >= MISSES {
            self.since_try += 1;
            if self.since_try < RETRY_EVERY {
                return None;
            }
            self.since_try = 0;
        }
        let bound =
            lz4_flex::block::get_maximum_output_size(data.len()).max(zstd::zstd_safe::compress_bound(data.len()));
        if self.out.len() < bound {
            self.out.resize(bound, 0);
        }
        let started = std::time::Instant::now();
        let n = match (self.codec, self.zstd.as_mut()) {
            (Codec::Lz4, _) => lz4_flex::block::compress_into(data, &mut self.out).ok(),
            (Codec::Zstd, Some(z)) => z.compress_to_buffer(data, &mut self.out[..]).ok(),
            _ => None,
        };
        let secs = started.elapsed().as_secs_f64();
        if secs > 0.0 {
            self.compress_rate = average(self.compress_rate, data.len() as f64 / secs);
        }
        self.stats.records += 1;
        match n {
            Some(n) if (n as f64) <= PAYS * data.len() as f64 && self.saves_time(data.len(), n) => {
                self.misses_in_a_row = 0;
                self.stats.pages += pages;
                self.stats.raw_bytes += data.len() as u64;
                self.stats.compressed_bytes += n as u64;
                Some(&self.out[..n])
            }
            _ => {
                self.misses_in_a_row += 1;
                self.stats.misses += 1;
                None
            }
        }
    }
}

/// Decompresses `data` into `out`, which it must fill exactly (a peer's bytes: every failure is a
/// malformed record, never a panic).
pub fn decompress(codec: Codec, data: &[u8], out: &mut [u8]) -> Result<(), StreamError> {
    let bad = |why: String| StreamError::Malformed { kind: "PAGES_COMPRESSED", why };
    let n = match codec {
        Codec::Lz4 => lz4_flex::block::decompress_into(data, out).map_err(|e| bad(format!("lz4: {e}")))?,
        Codec::Zstd => zstd::bulk::decompress_to_buffer(data, out).map_err(|e| bad(format!("zstd: {e}")))?,
        Codec::None => return Err(bad("no codec".into())),
    };
    if n != out.len() {
        return Err(bad(format!("{n} bytes where {} are expected", out.len())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compressible() -> Vec<u8> {
        (0..1 << 20).map(|i: usize| if i % 4096 < 8 { (i / 4096) as u8 } else { 0x5a }).collect()
    }

    fn random(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn round_trips_and_pays_on_compressible_data() {
        for codec in [Codec::Lz4, Codec::Zstd] {
            let data = compressible();
            let mut c = Compressor::new(codec, 1).unwrap();
            c.set_cap(10_000_000); // a link slow enough for compressing to pay
            let packed = c.compress(&data, 256).expect("compressible data pays").to_vec();
            assert!(packed.len() < data.len() / 10, "{codec:?}: {}", packed.len());
            let mut out = vec![0u8; data.len()];
            decompress(codec, &packed, &mut out).unwrap();
            assert_eq!(out, data);
            assert_eq!(c.stats.pages, 256);
            // Wrong sizes and garbage are errors, not panics.
            assert!(decompress(codec, &packed, &mut vec![0u8; data.len() - 4096]).is_err());
            assert!(decompress(codec, &packed, &mut vec![0u8; data.len() + 4096]).is_err());
            assert!(decompress(codec, &random(3000), &mut out).is_err());
            assert!(decompress(codec, &[], &mut out).is_err());
        }
    }

    #[test]
    fn incompressible_data_goes_raw_and_is_tried_only_now_and_then() {
        let data = random(1 << 20);
        let mut c = Compressor::new(Codec::Zstd, 3).unwrap();
        c.set_cap(10_000_000);
        let tried: usize = (0..100).map(|_| usize::from(c.compress(&data, 256).is_none())).sum();
        assert_eq!(tried, 100, "random data never pays");
        // Four misses, then one try in 16 of the remaining 96.
        assert_eq!(c.stats.records, 4 + 6, "{:?}", c.stats);
        // Once the data turns compressible, the next try notices.
        let good = compressible();
        let sent = (0..16).filter(|_| c.compress(&good, 256).is_some()).count();
        assert!(sent >= 1, "{:?}", c.stats);
        assert!(c.compress(&good, 256).is_some(), "back to trying every record");
    }

    #[test]
    fn a_link_faster_than_the_compressor_gets_raw_records() {
        let data = compressible();
        let mut c = Compressor::new(Codec::Zstd, 19).unwrap();
        // Measured: raw records go out at 1 TB/s, far faster than zstd -19 compresses.
        c.sent(1 << 20, 1e-6);
        let _ = c.compress(&data, 256); // the first attempt measures the compressor
        assert!(c.compress(&data, 256).is_none(), "{:?}", c.stats);
        // The same link capped at 10 MB/s: compressing pays again, at the next try.
        c.set_cap(10_000_000);
        let paid = (0..17).filter(|_| c.compress(&data, 256).is_some()).count();
        assert!(paid >= 1, "{:?}", c.stats);
    }

    #[test]
    fn codecs_by_name() {
        assert_eq!("lz4".parse::<Codec>(), Ok(Codec::Lz4));
        assert_eq!("none".parse::<Codec>(), Ok(Codec::None));
        assert!("zlib".parse::<Codec>().unwrap_err().contains("one of: none, lz4, zstd"));
        assert_eq!(Codec::from_wire(Codec::Zstd.wire()), Some(Codec::Zstd));
        assert_eq!(Codec::from_wire(0), None);
    }
}
