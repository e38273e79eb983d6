//! xorshift64: a seeded stream that is cheap and spread out, for payloads no link or codec
//! shrinks and for jitter. Not for anything that needs quality randomness.

/// The stream's state; never zero (zero would stay zero).
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A stream from `seed` (a zero seed starts from 1).
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// `len` bytes of the stream, each word little endian.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_is_seeded_and_never_stuck() {
        let mut a = XorShift::new(7);
        let mut b = XorShift::new(7);
        let first: Vec<u64> = (0..4).map(|_| a.next_u64()).collect();
        assert_eq!(first, (0..4).map(|_| b.next_u64()).collect::<Vec<_>>());
        assert!(first.iter().all(|&x| x != 0));
        assert_ne!(XorShift::new(0).next_u64(), 0);
        let bytes = XorShift::new(7).bytes(20);
        assert_eq!(bytes.len(), 20);
        assert_eq!(&bytes[..8], &first[0].to_le_bytes());
    }
}
