//! The data the workloads write: a payload that is a pure function of (salt, index, generation),
//! and a 64-bit checksum of a payload's words. Verification regenerates the expected payload and
//! compares every word, and checks the checksum stored beside it.
//!
//! All accesses are volatile: the memory is shared with the VMM (and, for disk buffers, with a
//! device), so the compiler must neither drop nor merge them.

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

#[inline(always)]
fn mix(x: u64) -> u64 {
    let x = (x ^ (x >> 32)).wrapping_mul(0xd6e8_feb8_6659_fd93);
    x ^ (x >> 29)
}

/// A strong 64-bit mixer (splitmix64's finalizer), for seeds.
pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(GOLDEN);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The payload seed of block/page `index` at generation `gen`.
pub fn seed(salt: u64, index: u64, gen: u64) -> u64 {
    splitmix(salt ^ splitmix(index ^ splitmix(gen)))
}

#[inline(always)]
fn word(seed: u64, j: usize) -> u64 {
    mix(seed.wrapping_add((j as u64).wrapping_mul(GOLDEN)))
}

/// Running checksum: two wrapping sums (Fletcher style), so both values and order count.
struct Sum {
    a: u64,
    b: u64,
}

impl Sum {
    #[inline(always)]
    fn add(&mut self, w: u64) {
        self.a = self.a.wrapping_add(w);
        self.b = self.b.wrapping_add(self.a);
    }

    fn finish(&self) -> u64 {
        splitmix(self.a ^ self.b.rotate_left(32))
    }
}

/// The vocabulary of text-like payloads: 16 eight-byte words, so a word carries 4 bits.
const TEXT: [u64; 16] = {
    let words: [&[u8; 8]; 16] = [
        b"ferry   ",
        b"moves   ",
        b"the     ",
        b"guest   ",
        b"over    ",
        b"a       ",
        b"link,   ",
        b"pages   ",
        b"and     ",
        b"blocks  ",
        b"while   ",
        b"it      ",
        b"runs.   ",
        b"never   ",
        b"lost    ",
        b"twice   ",
    ];
    let mut out = [0u64; 16];
    let mut i = 0;
    while i < 16 {
        out[i] = u64::from_le_bytes(*words[i]);
        i += 1;
    }
    out
};
/// A delta-friendly payload changes one word in this many per generation.
const DELTA_STRIDE: usize = 64;

/// What a payload looks like, and so how well it encodes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Noise from `seed`.
    Random,
    /// Words of [`TEXT`], chosen by `seed`.
    Text,
    /// Noise from `stable` except one word in [`DELTA_STRIDE`], from `seed`.
    Delta { stable: u64 },
}

#[inline(always)]
fn payload_word(kind: Kind, seed: u64, j: usize) -> u64 {
    match kind {
        Kind::Random => word(seed, j),
        Kind::Text => TEXT[(word(seed, j) >> 60) as usize],
        Kind::Delta { stable } if !j.is_multiple_of(DELTA_STRIDE) => word(stable, j),
        Kind::Delta { .. } => word(seed, j),
    }
}

/// Writes `words` payload words for `seed` at `dst`; returns their checksum.
///
/// # Safety
/// `dst` must be valid for writing `words` u64s and owned by the caller.
pub unsafe fn fill(dst: *mut u64, words: usize, seed: u64) -> u64 {
    // SAFETY: the caller's guarantee, passed on.
    unsafe { fill_as(dst, words, seed, Kind::Random) }
}

/// [`fill`] with a payload of `kind`.
///
/// # Safety
/// As for [`fill`].
pub unsafe fn fill_as(dst: *mut u64, words: usize, seed: u64, kind: Kind) -> u64 {
    let mut sum = Sum { a: 0, b: 0 };
    for j in 0..words {
        let w = payload_word(kind, seed, j);
        // SAFETY: j < words; the caller guarantees the range.
        unsafe { dst.add(j).write_volatile(w) };
        sum.add(w);
    }
    sum.finish()
}

/// Compares `words` words at `src` with the payload for `seed`. Returns whether all match and
/// the checksum of what is actually there.
///
/// # Safety
/// `src` must be valid for reading `words` u64s.
pub unsafe fn check(src: *const u64, words: usize, seed: u64) -> (bool, u64) {
    // SAFETY: the caller's guarantee, passed on.
    unsafe { check_as(src, words, seed, Kind::Random) }
}

/// [`check`] against a payload of `kind`.
///
/// # Safety
/// As for [`check`].
pub unsafe fn check_as(src: *const u64, words: usize, seed: u64, kind: Kind) -> (bool, u64) {
    let mut sum = Sum { a: 0, b: 0 };
    let mut diff = 0;
    for j in 0..words {
        // SAFETY: j < words; the caller guarantees the range.
        let w = unsafe { src.add(j).read_volatile() };
        diff |= w ^ payload_word(kind, seed, j);
        sum.add(w);
    }
    (diff == 0, sum.finish())
}

/// Whether `words` words at `src` are all zero.
///
/// # Safety
/// As for [`check`].
pub unsafe fn is_zero(src: *const u64, words: usize) -> bool {
    let mut any = 0;
    for j in 0..words {
        // SAFETY: j < words; the caller guarantees the range.
        any |= unsafe { src.add(j).read_volatile() };
    }
    any == 0
}

/// A small fast PRNG (xorshift64*) for choosing pages and blocks.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(splitmix(seed) | 1)
    }

    #[inline]
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, n).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}
