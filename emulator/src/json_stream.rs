//! Splits a QMP byte stream into JSON values without parsing them: the monitor reads whatever the
//! socket gives (half an object, or several in one write) and this finds where each top-level value
//! ends, as QEMU's JSON streamer does. Parsing is serde's job afterwards; this only tracks strings,
//! escapes and bracket depth, so it holds one value's bytes at most.
//!
//! What counts as input, per QEMU's `docs/interop/qmp-spec.rst`:
//! - whitespace between values is skipped; a value may span lines, and a newline inside an object
//!   does not end it;
//! - an object or array ends at its matching closing bracket; anything else at the top level (a
//!   stray word, a number, binary garbage) ends at the next whitespace or opening bracket and is
//!   handed on as it is, so that the caller answers it with a parse error;
//! - an ASCII control character other than tab, CR and LF, or a 0xFF byte, is a lexical error that
//!   drops whatever was incomplete: the spec's way for a client to put the parser back into a known
//!   state;
//! - a value longer than the limit is refused once ([`Item::TooLarge`]) and the rest of it is skipped
//!   (depth and strings still tracked, nothing kept), so a 100 MB object costs no memory and the
//!   connection goes on after it.

/// What the splitter found.
#[derive(Debug, PartialEq, Eq)]
pub enum Item {
    /// One complete top-level value's bytes (not checked to be JSON, nor UTF-8).
    Value(Vec<u8>),
    /// A value passed the size limit; its remaining bytes are being skipped.
    TooLarge,
    /// A control character (or 0xFF) arrived; what was incomplete is dropped.
    LexicalError(u8),
}

pub struct Splitter {
    limit: usize,
    buf: Vec<u8>,
    /// Open brackets of the current object or array.
    depth: usize,
    in_string: bool,
    escape: bool,
    /// The current value is a top-level token that is not an object or array.
    scalar: bool,
    /// The current value passed the limit: track it to its end, keep nothing.
    skipping: bool,
}

fn is_lexical_error(b: u8) -> bool {
    (b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r')) || b == 0xff
}

impl Splitter {
    /// A splitter that refuses values longer than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Splitter { limit, buf: Vec::new(), depth: 0, in_string: false, escape: false, scalar: false, skipping: false }
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.depth = 0;
        self.in_string = false;
        self.escape = false;
        self.scalar = false;
        self.skipping = false;
    }

    /// Whether a value is under way (bytes of it seen, its end not yet).
    fn in_value(&self) -> bool {
        self.depth > 0 || self.scalar
    }

    /// Ends the current value: hands it on, or (if it was being skipped) just forgets it.
    fn finish(&mut self, out: &mut Vec<Item>) {
        let skipped = self.skipping;
        let value = std::mem::take(&mut self.buf);
        self.reset();
        if !skipped {
            out.push(Item::Value(value));
        }
    }

    fn keep(&mut self, b: u8, out: &mut Vec<Item>) {
        if self.skipping {
            return;
        }
        self.buf.push(b);
        if self.buf.len() > self.limit {
            self.buf = Vec::new(); // give the memory back, not just the length
            self.skipping = true;
            out.push(Item::TooLarge);
        }
    }

    /// Feeds bytes as they came; complete values (and errors) are appended to `out` in order.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<Item>) {
        for &b in bytes {
            self.byte(b, out);
        }
    }

    fn byte(&mut self, b: u8, out: &mut Vec<Item>) {
        if is_lexical_error(b) {
            self.reset();
            out.push(Item::LexicalError(b));
            return;
        }
        if self.in_string {
            self.keep(b, out);
            if self.escape {
                self.escape = false;
            } else if b == b'\\' {
                self.escape = true;
            } else if b == b'"' {
                self.in_string = false;
            }
            return;
        }
        let whitespace = matches!(b, b' ' | b'\t' | b'\n' | b'\r');
        if self.scalar {
            // A top-level token ends where a new value could begin.
            if whitespace {
                self.finish(out);
                return;
            }
            if matches!(b, b'{' | b'[') {
                self.finish(out);
                // and `b` opens the next value, below
            } else {
                if b == b'"' {
                    self.in_string = true;
                }
                self.keep(b, out);
                return;
            }
        }
        if !self.in_value() {
            match b {
                _ if whitespace => {}
                b'{' | b'[' => {
                    self.depth = 1;
                    self.keep(b, out);
                }
                _ => {
                    self.scalar = true;
                    self.in_string = b == b'"';
                    self.keep(b, out);
                }
            }
            return;
        }
        self.keep(b, out);
        match b {
            b'"' => self.in_string = true,
            b'{' | b'[' => self.depth += 1,
            b'}' | b']' => {
                self.depth -= 1;
                if self.depth == 0 {
                    self.finish(out);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(limit: usize, chunks: &[&[u8]]) -> Vec<Item> {
        let mut s = Splitter::new(limit);
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, &mut out);
        }
        out
    }

    fn v(s: &str) -> Item {
        Item::Value(s.as_bytes().to_vec())
    }

    #[test]
    fn objects_end_at_their_closing_bracket_however_they_arrive() {
        let whole = br#"{"execute": "stop", "arguments": {"a": [1, {"b": "}]{["}]}}"#;
        let expected = vec![v(std::str::from_utf8(whole).unwrap())];
        assert_eq!(split(1 << 20, &[whole]), expected);
        // a byte at a time, across every possible split point
        let bytes: Vec<&[u8]> = whole.chunks(1).collect();
        assert_eq!(split(1 << 20, &bytes), expected);
        // several in one write, with and without whitespace between, one spanning lines
        let out = split(1 << 20, &[b"{\"a\": 1}{\"b\":\n 2}\r\n  [3]\n{\"c\": \"x\\\"}\"}"]);
        assert_eq!(out, vec![v("{\"a\": 1}"), v("{\"b\":\n 2}"), v("[3]"), v("{\"c\": \"x\\\"}\"}")]);
        // nothing yet for an incomplete value
        assert_eq!(split(1 << 20, &[b"{\"execute\": \"query-"]), vec![]);
    }

    #[test]
    fn top_level_words_and_garbage_end_at_whitespace_or_a_bracket() {
        let out = split(1 << 20, &[b"garbage\n", b"12 \"str ing\"{}", b"\xfe\xfd\n", b"}x\n"]);
        assert_eq!(
            out,
            vec![v("garbage"), v("12"), v("\"str ing\""), v("{}"), Item::Value(b"\xfe\xfd".to_vec()), v("}x")]
        );
    }

    #[test]
    fn a_control_character_drops_the_incomplete_value() {
        let out = split(1 << 20, &[b"{\"execute\": \"qu", b"\x00", b"{\"a\": 1}", b"{\"s\": \"\x1b\"}"]);
        // after the second, `"}` opens a string that has not ended yet
        assert_eq!(out, vec![Item::LexicalError(0), v("{\"a\": 1}"), Item::LexicalError(0x1b)]);
        assert_eq!(split(1 << 20, &[b"\xff{}"]), vec![Item::LexicalError(0xff), v("{}")]);
    }

    #[test]
    fn a_value_over_the_limit_is_refused_once_and_skipped_to_its_end() {
        let mut big = b"{\"execute\": \"x\", \"pad\": \"".to_vec();
        big.extend(std::iter::repeat_n(b'a', 1000));
        // brackets and an escaped quote inside a string do not end it
        big.extend(b"\", \"s\": \"}{[\\\"}\"}");
        let out = split(64, &[&big, b"{\"after\": 1}"]);
        assert_eq!(out, vec![Item::TooLarge, v("{\"after\": 1}")]);
        // the skipped value's memory is not kept
        let mut s = Splitter::new(64);
        let mut out = Vec::new();
        s.feed(&big[..500], &mut out);
        assert_eq!((out, s.buf.capacity()), (vec![Item::TooLarge], 0));
        // a long top-level word too
        assert_eq!(split(8, &[b"aaaaaaaaaaaaaaaa {}"]), vec![Item::TooLarge, v("{}")]);
        // exactly at the limit is fine
        assert_eq!(split(8, &[b"{\"a\":12}"]), vec![v("{\"a\":12}")]);
    }
}
