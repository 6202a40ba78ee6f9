//! Page bitmaps: an atomic one that fault handlers and VMM writers set concurrently, and a plain one
//! the sender owns while it walks a pass.

use std::sync::atomic::{AtomicU64, Ordering};

const BITS: usize = 64;

fn words_for(bits: usize) -> usize {
    bits.div_ceil(BITS)
}

/// The set bits of one word, as bit numbers from `base`.
fn ones_of_word(mut w: u64, base: usize) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if w == 0 {
            return None;
        }
        let bit = w.trailing_zeros() as usize;
        w &= w - 1;
        Some(base + bit)
    })
}

/// A bitmap many threads set at once; one thread drains it.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Box<[AtomicU64]>,
    bits: usize,
}

impl AtomicBitmap {
    pub fn new(bits: usize) -> Self {
        let words = (0..words_for(bits)).map(|_| AtomicU64::new(0)).collect();
        AtomicBitmap { words, bits }
    }

    /// Sets bit `i`; out-of-range bits are ignored (a caller bug, not worth a panic in a handler).
    pub fn set(&self, i: usize) {
        if i < self.bits {
            self.words[i / BITS].fetch_or(1 << (i % BITS), Ordering::AcqRel);
        }
    }

    pub fn set_range(&self, start: usize, count: usize) {
        for i in start..(start + count).min(self.bits) {
            self.set(i);
        }
    }

    /// Moves every set bit into `into` and clears it here, word by word, so a bit set concurrently
    /// is either taken now or stays for the next call: never lost.
    pub fn drain_into(&self, into: &mut PageBitmap) {
        debug_assert_eq!(into.bits, self.bits);
        for (dst, src) in into.words.iter_mut().zip(self.words.iter()) {
            if src.load(Ordering::Relaxed) != 0 {
                *dst |= src.swap(0, Ordering::AcqRel);
            }
        }
    }

    pub fn clear(&self) {
        for w in self.words.iter() {
            w.store(0, Ordering::Release);
        }
    }
}

/// A plain page bitmap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageBitmap {
    words: Vec<u64>,
    bits: usize,
}

impl PageBitmap {
    pub fn new(bits: usize) -> Self {
        PageBitmap { words: vec![0; words_for(bits)], bits }
    }

    /// A bitmap with every bit set.
    pub fn full(bits: usize) -> Self {
        let mut b = PageBitmap { words: vec![u64::MAX; words_for(bits)], bits };
        b.trim();
        b
    }

    fn trim(&mut self) {
        let extra = self.words.len() * BITS - self.bits;
        if extra > 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= u64::MAX >> extra;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.bits
    }

    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    pub fn set(&mut self, i: usize) {
        if i < self.bits {
            self.words[i / BITS] |= 1 << (i % BITS);
        }
    }

    pub fn clear_bit(&mut self, i: usize) {
        if i < self.bits {
            self.words[i / BITS] &= !(1 << (i % BITS));
        }
    }

    pub fn get(&self, i: usize) -> bool {
        i < self.bits && self.words[i / BITS] & (1 << (i % BITS)) != 0
    }

    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }

    /// ORs `words` (bit i = page `offset + i`) into this bitmap.
    /// Sets bit `first + i` for every bit i set in `bits` (LSB first in each byte, as OWED carries
    /// them), `count` of them; `false`, and nothing set, if they do not all fit.
    pub fn set_from_bits(&mut self, first: u64, count: u32, bits: &[u8]) -> bool {
        let first = usize::try_from(first).ok().filter(|&f| f.saturating_add(count as usize) <= self.bits);
        let Some(first) = first.filter(|_| bits.len() * 8 >= count as usize) else {
            return false;
        };
        for i in (0..count as usize).filter(|&i| bits[i / 8] & (1 << (i % 8)) != 0) {
            self.set(first + i);
        }
        true
    }

    /// Keeps only the bits also set in `other` (of the same length).
    pub fn intersect_with(&mut self, other: &PageBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= b;
        }
    }

    /// Clears the bits set in `other` (of the same length).
    pub fn subtract(&mut self, other: &PageBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !b;
        }
    }

    pub fn or_words_at(&mut self, offset: usize, words: &[u64]) {
        if offset.is_multiple_of(BITS) {
            let first = offset / BITS;
            for (dst, src) in self.words[first..].iter_mut().zip(words) {
                *dst |= src;
            }
            self.trim();
            return;
        }
        for (wi, &w) in words.iter().enumerate() {
            for bit in ones_of_word(w, offset + wi * BITS) {
                self.set(bit);
            }
        }
    }

    /// Sets bits `start..start + count` (clipped to the length), a word at a time.
    pub fn set_range(&mut self, start: usize, count: usize) {
        let end = (start + count).min(self.bits);
        let mut i = start;
        while i < end {
            let (w, b) = (i / BITS, i % BITS);
            let n = (BITS - b).min(end - i);
            let mask = if n == BITS { u64::MAX } else { ((1u64 << n) - 1) << b };
            self.words[w] |= mask;
            i += n;
        }
    }

    /// The set bits in `start..start + count`, in increasing order.
    pub fn ones_in_range(&self, start: usize, count: usize) -> impl Iterator<Item = usize> + '_ {
        let end = (start + count).min(self.bits);
        let first_word = (start / BITS).min(self.words.len());
        let last_word = end.div_ceil(BITS).min(self.words.len());
        self.words[first_word..last_word]
            .iter()
            .enumerate()
            .flat_map(move |(k, &w)| ones_of_word(w, (first_word + k) * BITS))
            .filter(move |&i| i >= start && i < end)
    }

    /// Adds every bit of `other` (same length).
    pub fn union_with(&mut self, other: &PageBitmap) {
        debug_assert_eq!(self.bits, other.bits);
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// Takes the whole set, leaving this bitmap empty.
    pub fn take(&mut self) -> PageBitmap {
        let empty = PageBitmap::new(self.bits);
        std::mem::replace(self, empty)
    }

    /// Set bits in increasing order.
    pub fn iter_ones(&self) -> impl Iterator<Item = usize> + '_ {
        self.ones_in_range(0, self.bits)
    }

    /// Maximal runs of set bits as (first, count), in increasing order.
    pub fn runs(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let mut ones = self.iter_ones().peekable();
        std::iter::from_fn(move || {
            let first = ones.next()?;
            let mut count = 1;
            while ones.peek() == Some(&(first + count)) {
                ones.next();
                count += 1;
            }
            Some((first, count))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_moves_bits_and_clears_source() {
        let a = AtomicBitmap::new(130);
        a.set(0);
        a.set(64);
        a.set(129);
        a.set(500); // ignored
        let mut p = PageBitmap::new(130);
        a.drain_into(&mut p);
        assert_eq!(p.iter_ones().collect::<Vec<_>>(), vec![0, 64, 129]);
        let mut again = PageBitmap::new(130);
        a.drain_into(&mut again);
        assert_eq!(again.count(), 0, "drained bits must be cleared at the source");
    }

    #[test]
    fn full_has_exactly_len_bits() {
        let p = PageBitmap::full(70);
        assert_eq!(p.count(), 70);
        assert!(!p.get(70));
    }

    #[test]
    fn runs_groups_contiguous_bits() {
        let mut p = PageBitmap::new(200);
        for i in [1, 2, 3, 63, 64, 65, 100, 199] {
            p.set(i);
        }
        assert_eq!(p.runs().collect::<Vec<_>>(), vec![(1, 3), (63, 3), (100, 1), (199, 1)]);
    }

    #[test]
    fn ranges() {
        let mut p = PageBitmap::new(300);
        p.set_range(60, 70);
        assert_eq!(p.count(), 70);
        assert!(!p.get(59) && p.get(60) && p.get(129) && !p.get(130));
        p.set_range(290, 100);
        assert_eq!(p.count(), 80);
        let mut q = PageBitmap::new(300);
        for i in [3, 64, 65, 200, 299] {
            q.set(i);
        }
        assert_eq!(q.ones_in_range(4, 196).collect::<Vec<_>>(), vec![64, 65]);
        assert_eq!(q.ones_in_range(0, 300).count(), 5);
        assert_eq!(q.ones_in_range(299, 10).collect::<Vec<_>>(), vec![299]);
    }

    #[test]
    fn or_words_at_unaligned_offset() {
        let mut p = PageBitmap::new(200);
        p.or_words_at(70, &[0b101, 1 << 63]);
        assert_eq!(p.iter_ones().collect::<Vec<_>>(), vec![70, 72, 197]);
        let mut q = PageBitmap::new(100);
        q.or_words_at(64, &[u64::MAX]);
        assert_eq!(q.count(), 36);
    }
}
