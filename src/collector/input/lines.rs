//! Splitting a byte stream into lines (sans-IO).
//!
//! Owns: finding `\n` with memchr, carrying an incomplete last line over to the next read,
//! and bounding it: a line that grows past the limit without a newline is handed out as is
//! (the record builder cuts and flags it) and the rest of it, up to its `\n`, is dropped.
//! Must not: allocate per line (complete lines are borrowed from the caller's buffer) or do I/O.

use memchr::memchr;

#[derive(Debug, Clone)]
pub struct LineSplitter {
    partial: Vec<u8>,
    max: usize,
    skipping: bool,
}

impl LineSplitter {
    /// `max_line`: an unfinished line longer than this is emitted without waiting for its end.
    pub fn new(max_line: usize) -> Self {
        LineSplitter {
            partial: Vec::new(),
            max: max_line.max(1),
            skipping: false,
        }
    }

    /// Feed the next bytes; `emit` gets every complete line (without `\n`).
    pub fn feed(&mut self, data: &[u8], mut emit: impl FnMut(&[u8])) {
        let mut rest = data;
        if self.skipping {
            match memchr(b'\n', rest) {
                Some(p) => {
                    rest = &rest[p + 1..];
                    self.skipping = false;
                }
                None => return,
            }
        }
        if !self.partial.is_empty() {
            match memchr(b'\n', rest) {
                Some(p) => {
                    self.partial.extend_from_slice(&rest[..p]);
                    emit(&self.partial);
                    self.partial.clear();
                    rest = &rest[p + 1..];
                }
                None => {
                    self.partial.extend_from_slice(rest);
                    self.check_overflow(&mut emit);
                    return;
                }
            }
        }
        while let Some(p) = memchr(b'\n', rest) {
            emit(&rest[..p]);
            rest = &rest[p + 1..];
        }
        if !rest.is_empty() {
            self.partial.extend_from_slice(rest);
            self.check_overflow(&mut emit);
        }
    }

    fn check_overflow(&mut self, emit: &mut impl FnMut(&[u8])) {
        if self.partial.len() > self.max {
            emit(&self.partial);
            self.partial.clear();
            self.skipping = true;
        }
    }

    /// End of input: emit the unfinished last line, if any.
    pub fn finish(&mut self, mut emit: impl FnMut(&[u8])) {
        if !self.partial.is_empty() {
            emit(&self.partial);
            self.partial.clear();
        }
        self.skipping = false;
    }

    /// Bytes fed but not emitted yet (the unfinished last line).
    pub fn pending(&self) -> usize {
        self.partial.len()
    }

    /// Forget any unfinished line (e.g. the file was truncated).
    pub fn reset(&mut self) {
        self.partial.clear();
        self.skipping = false;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(max: usize, pieces: &[&[u8]], finish: bool) -> Vec<Vec<u8>> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for p in pieces {
            s.feed(p, |l| out.push(l.to_vec()));
        }
        if finish {
            s.finish(|l| out.push(l.to_vec()));
        }
        out
    }

    #[test]
    fn splits_and_joins() {
        let out = run(100, &[b"a\nb", b"c\n", b"\nd"], false);
        assert_eq!(out, vec![b"a".to_vec(), b"bc".to_vec(), b"".to_vec()]);
        let out = run(100, &[b"a\nb", b"c\n", b"\nd"], true);
        assert_eq!(out.last().unwrap(), b"d");
    }

    #[test]
    fn overlong_partial_is_emitted_and_rest_skipped() {
        let mut s = LineSplitter::new(4);
        let mut out = Vec::new();
        s.feed(b"ok\n123", |l| out.push(l.to_vec()));
        assert_eq!(s.pending(), 3);
        s.feed(b"45", |l| out.push(l.to_vec()));
        assert_eq!(s.pending(), 0);
        s.feed(b"678\nnext\n", |l| out.push(l.to_vec()));
        assert_eq!(
            out,
            vec![b"ok".to_vec(), b"12345".to_vec(), b"next".to_vec()]
        );
    }

    proptest! {
        #[test]
        fn prop_any_split_gives_same_lines(lines in proptest::collection::vec("[a-z ]{0,20}", 0..20), cuts in proptest::collection::vec(0usize..500, 0..10)) {
            let mut text = Vec::new();
            for l in &lines { text.extend_from_slice(l.as_bytes()); text.push(b'\n'); }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(text.len())).collect();
            cuts.sort();
            let mut pieces = Vec::new();
            let mut prev = 0;
            for c in cuts { pieces.push(&text[prev..c]); prev = c; }
            pieces.push(&text[prev..]);
            let out = run(1000, &pieces, true);
            let expect: Vec<Vec<u8>> = lines.iter().map(|l| l.as_bytes().to_vec()).collect();
            prop_assert_eq!(out, expect);
        }
    }
}
