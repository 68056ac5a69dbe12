//! Request fingerprints that mean the same thing in every process and every build.
//!
//! An idempotency record outlives the process that wrote it (a Redis store, a rolling deploy),
//! so "the same request" cannot be decided with `std`'s `RandomState` or `DefaultHasher`: both
//! change between runs. [`StableHasher`] feeds the arguments' own [`Hash`] impls into XXH3-128
//! with a fixed seed, and normalizes what `Hash` impls write so that the bytes do not depend on
//! the platform: every integer is written little-endian, `usize`/`isize` (lengths, enum
//! discriminants) as 64 bits.
//!
//! What it promises: equal values give equal fingerprints on every platform and across builds,
//! as long as the values' `Hash` impls stay the same (those of `std` types and `#[derive(Hash)]`
//! do in practice; a hand-written impl that hashes a pointer or a random value does not).
//! It does not promise anything about values of different types that write the same bytes.

use std::fmt;
use std::hash::{Hash, Hasher};

use xxhash_rust::xxh3::{xxh3_128_with_seed, Xxh3};

/// The fixed seed: changing it changes every stored fingerprint.
const SEED: u64 = 0x7261_6365_6672_6565; // "racefree"

/// Most fingerprints are a few dozen bytes; they are hashed in one shot from this buffer.
const INLINE: usize = 128;

/// What identifies "the same request" under one idempotency key: a 128-bit XXH3 digest.
///
/// ```
/// use racefree_runtime::Fingerprint;
///
/// let a = Fingerprint::of(&("alice", 42_u32));
/// assert_eq!(a, Fingerprint::of(&("alice", 42_u32)));
/// assert_ne!(a, Fingerprint::of(&("alice", 43_u32)));
/// assert_eq!(a.to_string().len(), 32);                       // hex, for stores that keep text
/// assert_eq!(a.to_string().parse::<Fingerprint>().unwrap(), a);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub u128);

impl Fingerprint {
    /// The fingerprint of one value.
    pub fn of<T: Hash + ?Sized>(value: &T) -> Fingerprint {
        let mut hasher = StableHasher::new();
        value.hash(&mut hasher);
        hasher.fingerprint()
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = std::num::ParseIntError;

    fn from_str(hex: &str) -> Result<Self, Self::Err> {
        u128::from_str_radix(hex, 16).map(Fingerprint)
    }
}

/// A [`Hasher`] whose output is the same on every platform and in every build.
///
/// ```
/// use std::hash::Hash;
/// use racefree_runtime::idempotent::fingerprint::StableHasher;
///
/// let mut hasher = StableHasher::new();
/// "order-17".hash(&mut hasher);
/// 3_usize.hash(&mut hasher);               // written as a little-endian u64 everywhere
/// let fingerprint = hasher.fingerprint();
/// assert_eq!(fingerprint, racefree_runtime::Fingerprint::of(&("order-17", 3_usize)));
/// ```
pub struct StableHasher {
    buffer: [u8; INLINE],
    len: usize,
    // Only for inputs longer than the buffer; XXH3 streamed gives the one-shot digest.
    stream: Option<Box<Xxh3>>,
}

impl StableHasher {
    /// A hasher with nothing written.
    pub fn new() -> Self {
        StableHasher {
            buffer: [0; INLINE],
            len: 0,
            stream: None,
        }
    }

    /// The 128-bit digest of everything written.
    pub fn fingerprint(&self) -> Fingerprint {
        let pending = &self.buffer[..self.len];
        match &self.stream {
            None => Fingerprint(xxh3_128_with_seed(pending, SEED)),
            Some(stream) => {
                let mut stream = stream.clone();
                stream.update(pending);
                Fingerprint(stream.digest128())
            }
        }
    }
}

impl Default for StableHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl Hasher for StableHasher {
    fn write(&mut self, bytes: &[u8]) {
        if self.len + bytes.len() <= INLINE {
            self.buffer[self.len..self.len + bytes.len()].copy_from_slice(bytes);
            self.len += bytes.len();
            return;
        }
        let stream = self
            .stream
            .get_or_insert_with(|| Box::new(Xxh3::with_seed(SEED)));
        stream.update(&self.buffer[..self.len]);
        stream.update(bytes);
        self.len = 0;
    }

    fn finish(&self) -> u64 {
        self.fingerprint().0 as u64
    }

    fn write_u8(&mut self, i: u8) {
        self.write(&[i]);
    }
    fn write_u16(&mut self, i: u16) {
        self.write(&i.to_le_bytes());
    }
    fn write_u32(&mut self, i: u32) {
        self.write(&i.to_le_bytes());
    }
    fn write_u64(&mut self, i: u64) {
        self.write(&i.to_le_bytes());
    }
    fn write_u128(&mut self, i: u128) {
        self.write(&i.to_le_bytes());
    }
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }
    fn write_i8(&mut self, i: i8) {
        self.write_u8(i as u8);
    }
    fn write_i16(&mut self, i: i16) {
        self.write(&i.to_le_bytes());
    }
    fn write_i32(&mut self, i: i32) {
        self.write(&i.to_le_bytes());
    }
    fn write_i64(&mut self, i: i64) {
        self.write(&i.to_le_bytes());
    }
    fn write_i128(&mut self, i: i128) {
        self.write(&i.to_le_bytes());
    }
    fn write_isize(&mut self, i: isize) {
        self.write_i64(i as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_pinned_across_builds() {
        // If this changes, every fingerprint stored by an earlier build stops matching.
        let pinned = Fingerprint::of(&("order-17", 42_u64, vec![1_u8, 2, 3]));
        assert_eq!(
            pinned,
            Fingerprint::of(&("order-17", 42_u64, vec![1_u8, 2, 3]))
        );
        assert_eq!(pinned.to_string(), PINNED);
    }

    const PINNED: &str = "0c893d6388760020c8f7161c6fef4b13";

    #[test]
    fn long_inputs_stream_to_the_one_shot_digest() {
        let long = "x".repeat(10 * INLINE + 7);
        let mut bytes = Vec::new();
        long.hash(&mut Recorder(&mut bytes));
        assert_eq!(Fingerprint::of(&long).0, xxh3_128_with_seed(&bytes, SEED));
    }

    #[test]
    fn usize_is_hashed_as_u64() {
        assert_eq!(Fingerprint::of(&7_usize), Fingerprint::of(&7_u64));
        assert_eq!(Fingerprint::of(&-7_isize), Fingerprint::of(&-7_i64));
    }

    struct Recorder<'a>(&'a mut Vec<u8>);
    impl Hasher for Recorder<'_> {
        fn write(&mut self, bytes: &[u8]) {
            self.0.extend_from_slice(bytes);
        }
        fn write_usize(&mut self, i: usize) {
            self.write(&(i as u64).to_le_bytes());
        }
        fn finish(&self) -> u64 {
            0
        }
    }
}
