//! The ciphertext envelope: a self-describing, versioned binary format.
//!
//! Every ciphertext keybroker returns is an envelope. All integers are big
//! endian.
//!
//! | offset  | size | field                                                      |
//! |---------|------|------------------------------------------------------------|
//! | 0       | 2    | magic `0x4B 0x42` (`"KB"`)                                 |
//! | 2       | 1    | format version, `0x01`                                     |
//! | 3       | 1    | payload algorithm id (see [`Algorithm`])                   |
//! | 4       | 1    | key name length `n`, 1..=128                               |
//! | 5       | n    | key name, `[A-Za-z0-9._-]`                                 |
//! | 5+n     | 4    | key version, u32, >= 1                                     |
//! | 9+n     | 4    | CRC-32 (IEEE) of bytes `0 .. 9+n`                          |
//! | 13+n    | rest | payload                                                    |
//!
//! Payload of algorithm 1 (AES-256-GCM under a KEK version, computed by the
//! local backend or inside an HSM): 12-byte random nonce, ciphertext (as long
//! as the plaintext), 16-byte tag. Payload of algorithm 2 (AWS KMS direct
//! mode): the KMS `CiphertextBlob` as returned by `Encrypt`.
//!
//! The header (bytes `0 .. 13+n`) is authenticated: the AEAD's additional
//! data is the header followed by the canonical encoding of the encryption
//! context (see [`additional_data`]), so a header cannot be moved onto
//! another payload and a context cannot be changed. The CRC is not a security
//! measure: it lets a corrupted header be reported as corruption instead of
//! as an unknown key or version.
//!
//! Unwrap routes by (key, version) through the version table, never by a
//! backend named in the ciphertext, so a version whose material moves to
//! another backend keeps unwrapping unchanged.

use std::collections::BTreeMap;

/// The two magic bytes that open every envelope.
pub const MAGIC: [u8; 2] = *b"KB";
/// The only format version this build writes and reads.
pub const FORMAT_V1: u8 = 1;
/// Longest key name, in bytes.
pub const MAX_KEY_NAME_LEN: usize = 128;
/// Largest envelope accepted by [`parse`]: far above any payload keybroker
/// makes (AWS KMS blobs stay under 6 KiB), small enough to bound work.
pub const MAX_ENVELOPE_LEN: usize = 64 * 1024;
/// Bytes of an AES-GCM nonce in a payload.
pub const GCM_NONCE_LEN: usize = 12;
/// Bytes of an AES-GCM tag in a payload.
pub const GCM_TAG_LEN: usize = 16;

const FIXED_HEADER_LEN: usize = 2 + 1 + 1 + 1 + 4 + 4;

/// The payload algorithm of an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Algorithm {
    /// AES-256-GCM, 96-bit random nonce, 128-bit tag.
    Aes256Gcm = 1,
    /// An AWS KMS ciphertext blob (direct mode).
    AwsKms = 2,
}

impl Algorithm {
    fn from_id(id: u8) -> Option<Self> {
        match id {
            1 => Some(Algorithm::Aes256Gcm),
            2 => Some(Algorithm::AwsKms),
            _ => None,
        }
    }
}

/// Why bytes are not a valid envelope. Every variant is reported to callers
/// as `INVALID_ARGUMENT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// Fewer bytes than the smallest possible header.
    #[error("ciphertext is truncated: {0} bytes is shorter than any keybroker envelope")]
    Truncated(usize),
    /// More bytes than [`MAX_ENVELOPE_LEN`].
    #[error("ciphertext is {0} bytes, more than the {MAX_ENVELOPE_LEN} bytes of any keybroker envelope")]
    TooLong(usize),
    /// The magic bytes are wrong: not a keybroker ciphertext.
    #[error("not a keybroker ciphertext (bad magic bytes)")]
    BadMagic,
    /// A format version this build does not know.
    #[error("unsupported ciphertext format version {0}")]
    UnsupportedFormat(u8),
    /// An algorithm id this build does not know.
    #[error("unsupported payload algorithm id {0}")]
    UnknownAlgorithm(u8),
    /// The key name length is 0 or above [`MAX_KEY_NAME_LEN`].
    #[error("ciphertext header has an invalid key name length {0}")]
    BadKeyNameLength(u8),
    /// The header is cut inside the key name, version or checksum.
    #[error("ciphertext header is truncated")]
    TruncatedHeader,
    /// The key name has bytes outside `[A-Za-z0-9._-]`.
    #[error("ciphertext header holds an invalid key name")]
    BadKeyName,
    /// Version 0 never exists.
    #[error("ciphertext header names key version 0")]
    ZeroVersion,
    /// The header checksum does not match: the header is corrupted.
    #[error("ciphertext header is corrupted (checksum mismatch)")]
    Checksum,
    /// The payload is shorter than the algorithm's minimum.
    #[error("ciphertext payload is truncated")]
    TruncatedPayload,
}

/// A parsed envelope, borrowing from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// Payload algorithm.
    pub algorithm: Algorithm,
    /// Key name.
    pub key: &'a str,
    /// Key version.
    pub version: u32,
    /// The header bytes, part of the additional data.
    pub header: &'a [u8],
    /// The payload bytes.
    pub payload: &'a [u8],
}

/// Whether `name` is a valid key name: 1..=128 bytes of `[A-Za-z0-9._-]`.
pub fn is_valid_key_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_KEY_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Parses an envelope. Pure: no allocation, no I/O; every malformed shape is
/// an [`EnvelopeError`].
pub fn parse(bytes: &[u8]) -> Result<Envelope<'_>, EnvelopeError> {
    if bytes.len() > MAX_ENVELOPE_LEN {
        return Err(EnvelopeError::TooLong(bytes.len()));
    }
    if bytes.len() < FIXED_HEADER_LEN + 1 {
        return Err(EnvelopeError::Truncated(bytes.len()));
    }
    if bytes[0..2] != MAGIC {
        return Err(EnvelopeError::BadMagic);
    }
    if bytes[2] != FORMAT_V1 {
        return Err(EnvelopeError::UnsupportedFormat(bytes[2]));
    }
    let name_len = bytes[4];
    if name_len == 0 || usize::from(name_len) > MAX_KEY_NAME_LEN {
        return Err(EnvelopeError::BadKeyNameLength(name_len));
    }
    let name_end = 5 + usize::from(name_len);
    let header_len = name_end + 8;
    if bytes.len() < header_len {
        return Err(EnvelopeError::TruncatedHeader);
    }
    let crc_at = name_end + 4;
    let stored_crc = read_u32(&bytes[crc_at..header_len]);
    if crc32fast::hash(&bytes[..crc_at]) != stored_crc {
        return Err(EnvelopeError::Checksum);
    }
    let algorithm = Algorithm::from_id(bytes[3]).ok_or(EnvelopeError::UnknownAlgorithm(bytes[3]))?;
    let key = std::str::from_utf8(&bytes[5..name_end]).map_err(|_| EnvelopeError::BadKeyName)?;
    if !is_valid_key_name(key) {
        return Err(EnvelopeError::BadKeyName);
    }
    let version = read_u32(&bytes[name_end..crc_at]);
    if version == 0 {
        return Err(EnvelopeError::ZeroVersion);
    }
    let payload = &bytes[header_len..];
    let min_payload = match algorithm {
        Algorithm::Aes256Gcm => GCM_NONCE_LEN + GCM_TAG_LEN + 1,
        Algorithm::AwsKms => 1,
    };
    if payload.len() < min_payload {
        return Err(EnvelopeError::TruncatedPayload);
    }
    Ok(Envelope { algorithm, key, version, header: &bytes[..header_len], payload })
}

fn read_u32(bytes: &[u8]) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(bytes);
    u32::from_be_bytes(word)
}

/// Appends an envelope header to `out` and returns its length. The caller
/// has checked `key` with [`is_valid_key_name`]; a longer name is cut at the
/// byte limit, which then fails to parse instead of corrupting memory.
pub fn write_header(out: &mut Vec<u8>, algorithm: Algorithm, key: &str, version: u32) -> usize {
    let start = out.len();
    let name = &key.as_bytes()[..key.len().min(MAX_KEY_NAME_LEN)];
    out.extend_from_slice(&MAGIC);
    out.push(FORMAT_V1);
    out.push(algorithm as u8);
    // The slice above is at most MAX_KEY_NAME_LEN (128) bytes: it fits a u8.
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(&version.to_be_bytes());
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
    out.len() - start
}

/// Appends the additional data of an envelope to `out`: the header bytes,
/// then the context as a count and length-prefixed (u32 big endian) key and
/// value pairs, sorted by key (a `BTreeMap` iterates in that order), so the
/// same context always gives the same bytes.
pub fn additional_data(out: &mut Vec<u8>, header: &[u8], context: &BTreeMap<String, String>) {
    out.reserve(header.len() + 4 + context_len(context));
    out.extend_from_slice(header);
    out.extend_from_slice(&len_u32(context.len()).to_be_bytes());
    for (k, v) in context {
        out.extend_from_slice(&len_u32(k.len()).to_be_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&len_u32(v.len()).to_be_bytes());
        out.extend_from_slice(v.as_bytes());
    }
}

/// Encoded size of a context's entries (what the plaintext limit of a
/// context is measured against).
pub fn context_len(context: &BTreeMap<String, String>) -> usize {
    context.iter().map(|(k, v)| 8 + k.len() + v.len()).sum()
}

fn len_u32(len: usize) -> u32 {
    // Requests are bounded by the server's message size limit (far below
    // 4 GiB), so lengths always fit; saturate rather than wrap if not.
    u32::try_from(len).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(alg: Algorithm, key: &str, version: u32, payload_len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        write_header(&mut out, alg, key, version);
        out.extend(std::iter::repeat_n(0xAB, payload_len));
        out
    }

    #[test]
    fn round_trips_header_fields() {
        let bytes = sample(Algorithm::Aes256Gcm, "orders-db.kek_1", 7, 60);
        let env = parse(&bytes).unwrap();
        assert_eq!(env.algorithm, Algorithm::Aes256Gcm);
        assert_eq!(env.key, "orders-db.kek_1");
        assert_eq!(env.version, 7);
        assert_eq!(env.header.len(), 13 + "orders-db.kek_1".len());
        assert_eq!(env.payload.len(), 60);
        let kms = sample(Algorithm::AwsKms, "k", u32::MAX, 1);
        assert_eq!(parse(&kms).unwrap().version, u32::MAX);
    }

    #[test]
    fn rejects_empty_and_short_inputs() {
        assert_eq!(parse(&[]), Err(EnvelopeError::Truncated(0)));
        assert_eq!(parse(b"KB"), Err(EnvelopeError::Truncated(2)));
        // Cuts inside the header or below the minimal GCM payload fail to
        // parse; shorter payloads past that are caught by authentication.
        let bytes = sample(Algorithm::Aes256Gcm, "demo", 1, 40);
        let min_len = 13 + 4 + GCM_NONCE_LEN + GCM_TAG_LEN + 1;
        for cut in 0..min_len {
            assert!(parse(&bytes[..cut]).is_err(), "a {cut}-byte prefix parsed");
        }
        assert!(parse(&bytes[..min_len]).is_ok());
    }

    #[test]
    fn rejects_oversize_input() {
        let bytes = sample(Algorithm::AwsKms, "demo", 1, MAX_ENVELOPE_LEN);
        assert!(matches!(parse(&bytes), Err(EnvelopeError::TooLong(_))));
    }

    #[test]
    fn rejects_bad_magic_and_format() {
        let mut bytes = sample(Algorithm::Aes256Gcm, "demo", 1, 40);
        bytes[0] = b'X';
        assert_eq!(parse(&bytes), Err(EnvelopeError::BadMagic));
        let mut bytes = sample(Algorithm::Aes256Gcm, "demo", 1, 40);
        bytes[2] = 2;
        assert_eq!(parse(&bytes), Err(EnvelopeError::UnsupportedFormat(2)));
    }

    #[test]
    fn rejects_bad_name_lengths() {
        let mut bytes = sample(Algorithm::Aes256Gcm, "demo", 1, 40);
        bytes[4] = 0;
        assert_eq!(parse(&bytes), Err(EnvelopeError::BadKeyNameLength(0)));
        bytes[4] = 200;
        assert_eq!(parse(&bytes), Err(EnvelopeError::BadKeyNameLength(200)));
        let mut bytes = sample(Algorithm::Aes256Gcm, "demo", 1, 0);
        bytes.truncate(15);
        assert_eq!(parse(&bytes), Err(EnvelopeError::TruncatedHeader));
    }

    /// Builds a header by hand so the checksum is valid and only the field
    /// under test is wrong.
    fn forged(alg: u8, name: &[u8], version: u32, payload_len: usize) -> Vec<u8> {
        let mut out = vec![b'K', b'B', FORMAT_V1, alg, name.len() as u8];
        out.extend_from_slice(name);
        out.extend_from_slice(&version.to_be_bytes());
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out.extend(std::iter::repeat_n(1, payload_len));
        out
    }

    #[test]
    fn rejects_unknown_algorithm_bad_name_and_zero_version() {
        assert_eq!(parse(&forged(9, b"demo", 1, 40)), Err(EnvelopeError::UnknownAlgorithm(9)));
        assert_eq!(parse(&forged(1, b"de mo", 1, 40)), Err(EnvelopeError::BadKeyName));
        assert_eq!(parse(&forged(1, &[0xff, 0xfe], 1, 40)), Err(EnvelopeError::BadKeyName));
        assert_eq!(parse(&forged(1, b"demo", 0, 40)), Err(EnvelopeError::ZeroVersion));
    }

    #[test]
    fn rejects_short_gcm_payload() {
        assert_eq!(parse(&forged(1, b"demo", 1, 28)), Err(EnvelopeError::TruncatedPayload));
        assert!(parse(&forged(1, b"demo", 1, 29)).is_ok());
    }

    #[test]
    fn every_header_byte_flip_is_detected() {
        let bytes = sample(Algorithm::Aes256Gcm, "demo", 3, 40);
        let header_len = parse(&bytes).unwrap().header.len();
        for i in 0..header_len {
            for bit in 0..8 {
                let mut flipped = bytes.clone();
                flipped[i] ^= 1 << bit;
                assert!(parse(&flipped).is_err(), "flip of bit {bit} of byte {i} went unnoticed");
            }
        }
    }

    #[test]
    fn additional_data_is_canonical_and_unambiguous() {
        let header = b"hdr";
        let a: BTreeMap<_, _> = [("b".to_string(), "2".to_string()), ("a".to_string(), "1".to_string())].into();
        let b: BTreeMap<_, _> = [("a".to_string(), "1".to_string()), ("b".to_string(), "2".to_string())].into();
        let (mut x, mut y) = (Vec::new(), Vec::new());
        additional_data(&mut x, header, &a);
        additional_data(&mut y, header, &b);
        assert_eq!(x, y);
        // "ab"="c" and "a"="bc" must not encode the same.
        let c: BTreeMap<_, _> = [("ab".to_string(), "c".to_string())].into();
        let d: BTreeMap<_, _> = [("a".to_string(), "bc".to_string())].into();
        let (mut p, mut q) = (Vec::new(), Vec::new());
        additional_data(&mut p, header, &c);
        additional_data(&mut q, header, &d);
        assert_ne!(p, q);
    }

    /// Mutation fuzzing with a fixed seed (reproducible in CI): random
    /// bytes, and valid envelopes with random byte changes, insertions and
    /// cuts. `parse` must never panic, and whatever it accepts must describe
    /// exactly the bytes it was given.
    #[test]
    fn fuzz_parse_never_panics_and_accepts_only_consistent_envelopes() {
        use rand::{Rng, RngExt, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b62_7631);
        let seeds: Vec<Vec<u8>> = [("demo", 1, 60), ("a", u32::MAX, 29), (&*"k".repeat(128), 42, 500)]
            .iter()
            .map(|(k, v, n)| sample(Algorithm::Aes256Gcm, k, *v, *n))
            .collect();
        for round in 0..200_000u32 {
            let input = if round % 4 == 0 {
                let len = rng.random_range(0..300);
                let mut bytes = vec![0u8; len];
                rng.fill_bytes(&mut bytes);
                if len > 2 && rng.random_bool(0.5) {
                    bytes[..2].copy_from_slice(&MAGIC);
                    bytes[2] = FORMAT_V1;
                }
                bytes
            } else {
                let mut bytes = seeds[rng.random_range(0..seeds.len())].clone();
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..bytes.len());
                    match rng.random_range(0..3) {
                        0 => bytes[at] = rng.random(),
                        1 => bytes.insert(at, rng.random()),
                        _ => bytes.truncate(at.max(1)),
                    }
                }
                bytes
            };
            if let Ok(env) = parse(&input) {
                assert_eq!(env.header.len() + env.payload.len(), input.len());
                assert_eq!(env.header, &input[..env.header.len()]);
                assert!(is_valid_key_name(env.key) && env.version >= 1);
                let mut rebuilt = Vec::new();
                write_header(&mut rebuilt, env.algorithm, env.key, env.version);
                assert_eq!(rebuilt, env.header, "accepted header differs from its canonical form");
            }
        }
    }

    #[test]
    fn key_names() {
        assert!(is_valid_key_name("a"));
        assert!(is_valid_key_name(&"x".repeat(128)));
        assert!(!is_valid_key_name(&"x".repeat(129)));
        assert!(!is_valid_key_name(""));
        assert!(!is_valid_key_name("a/b"));
        assert!(!is_valid_key_name("ключ"));
    }
}
