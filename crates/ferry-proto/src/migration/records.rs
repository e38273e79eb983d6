//! Walking a batch of variable-length records (pages, disk blocks) that a parser reads one at
//! a time: the shared iterator, which stops at the first error.

use super::error::ProtocolError;

/// Parses the record at `pos` (`pos < bytes.len()`): the record and where the next begins.
pub(super) type Parse<'a, T> = fn(&'a [u8], usize) -> Result<(T, usize), ProtocolError>;

/// The records of `bytes`, in order. After an error it ends.
#[derive(Debug, Clone)]
pub struct RecordIter<'a, T> {
    bytes: &'a [u8],
    pos: usize,
    failed: bool,
    parse: Parse<'a, T>,
}

impl<'a, T> RecordIter<'a, T> {
    pub(super) fn new(bytes: &'a [u8], parse: Parse<'a, T>) -> Self {
        RecordIter {
            bytes,
            pos: 0,
            failed: false,
            parse,
        }
    }
}

impl<T> Iterator for RecordIter<'_, T> {
    type Item = Result<T, ProtocolError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.bytes.len() {
            return None;
        }
        match (self.parse)(self.bytes, self.pos) {
            Ok((record, next)) => {
                self.pos = next;
                Some(Ok(record))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}
