//! Page compression for the stream (`migrate-set-parameters compress`): lz4 (lz4_flex) or zstd,
//! record by record, and only where it pays.
//!
//! A PAGES record's data is compressed as one block; if the result is not at most [`PAYS`] of the
//! raw size the record goes out raw (PAGES), so incompressible data costs one failed attempt, not
//! bigger records. After [`MISSES`] failed attempts in a row, only one record in [`RETRY_EVERY`] is
//! tried until one pays again: a guest whose memory does not compress (encrypted or random data)
//! then costs about 1/16 of the compressor's time, and one that turns compressible is noticed
//! within 16 MiB per channel.
//!
//! Compression is off by default: on the loopback and 10 Gb/s links emu targets, compressing costs
//! more CPU time per byte than the link does (docs/compression.md measures it); it pays on links
//! slower than the compressor, with `max-bandwidth`, or between hosts.

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
    pub stats: CompressStats,
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
            stats: CompressStats::default(),
        })
    }

    pub fn codec(&self) -> Codec {
        self.codec
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
        let n = match (self.codec, self.zstd.as_mut()) {
            (Codec::Lz4, _) => lz4_flex::block::compress_into(data, &mut self.out).ok(),
            (Codec::Zstd, Some(z)) => z.compress_to_buffer(data, &mut self.out[..]).ok(),
            _ => None,
        };
        self.stats.records += 1;
        match n {
            Some(n) if (n as f64) <= PAYS * data.len() as f64 => {
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
    fn codecs_by_name() {
        assert_eq!("lz4".parse::<Codec>(), Ok(Codec::Lz4));
        assert_eq!("none".parse::<Codec>(), Ok(Codec::None));
        assert!("zlib".parse::<Codec>().unwrap_err().contains("one of: none, lz4, zstd"));
        assert_eq!(Codec::from_wire(Codec::Zstd.wire()), Some(Codec::Zstd));
        assert_eq!(Codec::from_wire(0), None);
    }
}
