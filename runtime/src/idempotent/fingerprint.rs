//! Request fingerprints that mean the same thing in every process and every build.
//!
//! An idempotency record outlives the process that wrote it (a Redis store, a rolling deploy),
//! so "the same request" cannot be decided with `std`'s `RandomState` or `DefaultHasher`: both
//! change between runs. [`StableHasher`] feeds the arguments' own [`Hash`] impls into BLAKE3
//! (keyed with a fixed, public domain key, so racefree's digests never equal another use of
//! BLAKE3 on the same bytes), and normalizes what `Hash` impls write so that the bytes do not
//! depend on the platform: every integer is written little-endian, `usize`/`isize` (lengths,
//! enum discriminants) as 64 bits.
//!
//! # Why a cryptographic hash
//! A fingerprint decides whether a retry is "the same request": a second request whose
//! fingerprint equals the first's replays the first's outcome. With a fast non-cryptographic
//! hash (XXH3, in earlier builds) a client who knows another request's arguments could compute a
//! payload with the same fingerprint. BLAKE3 has no known way to find such a payload (a second
//! preimage of its 128-bit output costs about 2^128 work), and costs one compression per 64
//! bytes hashed: `benches/idempotent.rs` ("request fingerprint") measures it beside a first
//! execution. The digest is truncated to 128 bits, which keeps second preimages out of reach;
//! finding *two* colliding payloads of one's own (2^64 work) gains an attacker nothing, since it
//! only makes its own retries replay its own outcome. Keys are still best scoped by the
//! caller (`scope = ...`): a fingerprint protects the payload, not the key.
//!
//! # Fingerprints that never leave the process
//! A function's own in-process store (no `store = ...`) compares fingerprints only with
//! fingerprints the same process computed, so they need not be stable: its calls use
//! [`ProcessHasher`], SipHash-2-4 with 128-bit output keyed with a secret drawn once per process.
//! SipHash is a keyed pseudorandom function, so the guarantee above holds: no digest is ever
//! shown and the key never leaves the process, so a payload with another request's
//! fingerprint can only be guessed (about 2^128 tries against the running service). It costs a
//! fifth of BLAKE3 on a small request (~17 ns against ~80 ns, which was most of a replay). A
//! fast unkeyed or merely seeded hash (XXH3, foldhash) would not do: their collisions can be
//! found without the seed. A collision would silently replay another payload's outcome, so
//! the digest stays 128 bits.
//!
//! What it promises: equal values give equal fingerprints on every platform and across builds,
//! as long as the values' `Hash` impls stay the same (those of `std` types and `#[derive(Hash)]`
//! do in practice; a hand-written impl that hashes a pointer or a random value does not).
//! It does not promise anything about values of different types that write the same bytes.

use std::fmt;
use std::hash::{Hash, Hasher};

/// The fixed, public domain key: changing it changes every stored fingerprint.
const DOMAIN: [u8; 32] = *b"racefree request fingerprint v2.";

/// Most requests hash a few hundred bytes at most; they are hashed in one shot from this
/// buffer (a streamed BLAKE3 hasher is ~2 KiB, boxed).
const INLINE: usize = 256;

/// What identifies "the same request" under one idempotency key: the first 128 bits of a
/// keyed BLAKE3 digest of the request's arguments.
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

impl Fingerprint {
    /// The fingerprint of raw bytes (e.g. a request body as received), hashed as they are.
    ///
    /// ```
    /// use racefree_runtime::Fingerprint;
    ///
    /// assert_eq!(Fingerprint::of_bytes(b"{\"cents\":1999}"), Fingerprint::of_bytes(b"{\"cents\":1999}"));
    /// assert_ne!(Fingerprint::of_bytes(b"{\"cents\":1999}"), Fingerprint::of_bytes(b"{\"cents\":2000}"));
    /// ```
    pub fn of_bytes(bytes: &[u8]) -> Fingerprint {
        truncated(blake3::keyed_hash(&DOMAIN, bytes))
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
    // Only for inputs longer than the buffer; BLAKE3 streamed gives the one-shot digest.
    stream: Option<Box<blake3::Hasher>>,
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
            None => truncated(blake3::keyed_hash(&DOMAIN, pending)),
            Some(stream) => {
                let mut stream = stream.clone();
                stream.update(pending);
                truncated(stream.finalize())
            }
        }
    }
}

fn truncated(digest: blake3::Hash) -> Fingerprint {
    let mut first = [0; 16];
    first.copy_from_slice(&digest.as_bytes()[..16]);
    Fingerprint(u128::from_le_bytes(first))
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
            .get_or_insert_with(|| Box::new(blake3::Hasher::new_keyed(&DOMAIN)));
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

/// A [`Hasher`] for fingerprints compared only within this process: SipHash-2-4, 128-bit
/// output, keyed with 128 secret bits drawn once per process (see the module doc). What a
/// function's own in-process store fingerprints with; a fingerprint that may be compared in
/// another process or build needs [`StableHasher`].
///
/// ```
/// use std::hash::Hash;
/// use racefree_runtime::idempotent::fingerprint::ProcessHasher;
///
/// let of = |request: &(&str, u64)| {
///     let mut hasher = ProcessHasher::new();
///     request.hash(&mut hasher);
///     hasher.fingerprint()
/// };
/// assert_eq!(of(&("alice", 500)), of(&("alice", 500)));
/// assert_ne!(of(&("alice", 500)), of(&("alice", 501)));
/// ```
#[derive(Debug, Clone)]
pub struct ProcessHasher(siphasher::sip128::SipHasher24);

impl ProcessHasher {
    /// A hasher with nothing written, keyed with this process's secret.
    #[inline]
    pub fn new() -> Self {
        let (k0, k1) = process_key();
        ProcessHasher(siphasher::sip128::SipHasher24::new_with_keys(k0, k1))
    }

    /// The 128-bit digest of everything written.
    #[inline]
    pub fn fingerprint(&self) -> Fingerprint {
        use siphasher::sip128::Hasher128 as _;
        Fingerprint(self.0.finish128().as_u128())
    }
}

impl Default for ProcessHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl Hasher for ProcessHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        self.0.write(bytes);
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.0.write_u8(i);
    }
    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.0.write_u16(i);
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.0.write_u32(i);
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.0.write_u64(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.0.write_usize(i);
    }
    fn finish(&self) -> u64 {
        self.fingerprint().0 as u64
    }
}

// The secret: two outputs of std's SipHash keyed from the operating system's randomness (what
// `HashMap` relies on against chosen collisions), drawn on first use.
fn process_key() -> (u64, u64) {
    use std::hash::BuildHasher;
    static KEY: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();
    *KEY.get_or_init(|| {
        let state = std::hash::RandomState::new();
        (state.hash_one(0_u8), state.hash_one(1_u8))
    })
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

    // Checked against the reference BLAKE3 (Python `blake3`, keyed with DOMAIN) over the same bytes.
    const PINNED: &str = "b67043cfda58d4bda51fd3125fa2c3df";

    #[test]
    fn long_inputs_stream_to_the_one_shot_digest() {
        let long = "x".repeat(10 * INLINE + 7);
        let mut bytes = Vec::new();
        long.hash(&mut Recorder(&mut bytes));
        assert_eq!(
            Fingerprint::of(&long),
            truncated(blake3::keyed_hash(&DOMAIN, &bytes))
        );
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
