//! Envelope encryption of blobs, the flow of a KMS rollout runbook: get a
//! data key with GenerateDataKey, encrypt the blob locally with AES-256-GCM,
//! keep the wrapped data key in a sidecar `{key, version, wrapped_dek}`
//! (here in front of the blob), and decrypt by unwrapping it.
//!
//! # Blob format `KBB1`
//!
//! All integers are big endian.
//!
//! | offset | size | field                                                    |
//! |--------|------|----------------------------------------------------------|
//! | 0      | 4    | magic `KBB1`                                             |
//! | 4      | 4    | frame size `F`: plaintext bytes per frame (16 ..= 4 MiB) |
//! | 8      | 32   | message id, random                                       |
//! | 40     | 4    | sidecar length `S` (..= 64 KiB)                          |
//! | 44     | S    | sidecar, JSON (see [`Sidecar`])                          |
//! | 44+S   | ...  | frames                                                   |
//!
//! A frame is a 4-byte length `L` (the top bit set on the last frame), `L`
//! bytes of ciphertext, and a 16-byte tag. Every frame but the last holds
//! exactly `F` plaintext bytes; the last holds `0 ..= F`. Frame `i` is
//! AES-256-GCM under a key derived per blob with HKDF-SHA256 (input: the
//! DEK; salt: the message id; info: `keybroker blob v1`), nonce = 4 zero
//! bytes + `i` as u64, additional data = the whole header + `i` as u64 + a
//! last-frame byte. So frames cannot be reordered, dropped, truncated or
//! moved to another blob, and the header (sidecar included) cannot change.
//!
//! Memory stays bounded by two frames whatever the blob size.
//! [`BlobEncryptor::open_stream`] writes each frame as soon as it is
//! authenticated: the output is complete and authentic only when it returns
//! `Ok`.

use std::sync::Arc;

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use rand::Rng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zeroize::Zeroizing;

use crate::cache::{CachePolicy, DekCache, SharedDek};
use crate::client::{Client, Context};
use crate::error::{Error, Result};
pub use crate::sidecar::Sidecar;

/// The four bytes that open every blob.
pub const BLOB_MAGIC: [u8; 4] = *b"KBB1";
/// Plaintext bytes per frame unless told otherwise.
pub const DEFAULT_FRAME_SIZE: u32 = 64 * 1024;
/// Smallest frame size.
pub const MIN_FRAME_SIZE: u32 = 16;
/// Largest frame size.
pub const MAX_FRAME_SIZE: u32 = 4 * 1024 * 1024;
const MAX_SIDECAR_LEN: u32 = 64 * 1024;
const HEADER_FIXED_LEN: usize = 44;
const TAG_LEN: usize = 16;
const LAST_FRAME: u32 = 1 << 31;
const HKDF_INFO: &[u8] = b"keybroker blob v1";
const DEK_LEN: usize = 32;

/// The parsed header of a blob.
#[derive(Debug, Clone)]
pub struct BlobHeader {
    /// The sidecar it carries.
    pub sidecar: Sidecar,
    frame_size: u32,
    message_id: [u8; 32],
    bytes: Vec<u8>,
}

impl BlobHeader {
    fn new(sidecar: Sidecar, frame_size: u32) -> Result<Self> {
        let json = sidecar.to_json();
        if json.len() > MAX_SIDECAR_LEN as usize {
            // read() refuses it: sealing it would make a blob nobody opens.
            return Err(Error::Blob(format!(
                "the sidecar is {} bytes, above the {MAX_SIDECAR_LEN} a blob header holds (a smaller context)",
                json.len()
            )));
        }
        let mut message_id = [0u8; 32];
        rand::rng().fill_bytes(&mut message_id);
        let mut bytes = Vec::with_capacity(HEADER_FIXED_LEN + json.len());
        bytes.extend_from_slice(&BLOB_MAGIC);
        bytes.extend_from_slice(&frame_size.to_be_bytes());
        bytes.extend_from_slice(&message_id);
        bytes.extend_from_slice(&(json.len() as u32).to_be_bytes());
        bytes.extend_from_slice(json.as_bytes());
        Ok(Self { sidecar, frame_size, message_id, bytes })
    }

    /// Reads and checks a header from the front of `reader`.
    pub async fn read<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Self> {
        let mut fixed = [0u8; HEADER_FIXED_LEN];
        read_exact_or(reader, &mut fixed, "blob header is truncated").await?;
        if fixed[..4] != BLOB_MAGIC {
            return Err(Error::Blob("not a keybroker blob (bad magic)".into()));
        }
        let frame_size = u32_at(&fixed, 4);
        if !(MIN_FRAME_SIZE..=MAX_FRAME_SIZE).contains(&frame_size) {
            return Err(Error::Blob(format!("frame size {frame_size} is out of range")));
        }
        let sidecar_len = u32_at(&fixed, 40);
        if sidecar_len > MAX_SIDECAR_LEN {
            return Err(Error::Blob(format!("sidecar length {sidecar_len} is out of range")));
        }
        let mut json = vec![0u8; sidecar_len as usize];
        read_exact_or(reader, &mut json, "blob sidecar is truncated").await?;
        let sidecar =
            Sidecar::from_json(std::str::from_utf8(&json).map_err(|_| Error::Blob("sidecar is not UTF-8".into()))?)?;
        let mut message_id = [0u8; 32];
        message_id.copy_from_slice(&fixed[8..40]);
        let mut bytes = fixed.to_vec();
        bytes.extend_from_slice(&json);
        Ok(Self { sidecar, frame_size, message_id, bytes })
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(word)
}

async fn read_exact_or<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut [u8], what: &str) -> Result<()> {
    match reader.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(Error::Blob(what.to_owned())),
        Err(e) => Err(e.into()),
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
async fn fill<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut [u8]) -> Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = reader.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

/// Per-blob frame cipher.
struct FrameCipher {
    cipher: Aes256Gcm,
    header: Vec<u8>,
}

impl FrameCipher {
    fn new(dek: &[u8], header: &BlobHeader) -> Result<Self> {
        if dek.len() != DEK_LEN {
            return Err(Error::Blob(format!("data key is {} bytes, a blob needs {DEK_LEN}", dek.len())));
        }
        let mut okm = Zeroizing::new([0u8; 32]);
        hkdf::Hkdf::<sha2::Sha256>::new(Some(&header.message_id), dek)
            .expand(HKDF_INFO, okm.as_mut_slice())
            .map_err(|_| Error::Blob("key derivation failed".into()))?;
        Ok(Self { cipher: Aes256Gcm::new(&(*okm).into()), header: header.bytes.clone() })
    }

    fn nonce(index: u64) -> Nonce<aes_gcm::aead::consts::U12> {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&index.to_be_bytes());
        Nonce::from(nonce)
    }

    fn aad(&self, index: u64, last: bool) -> Vec<u8> {
        let mut aad = Vec::with_capacity(self.header.len() + 9);
        aad.extend_from_slice(&self.header);
        aad.extend_from_slice(&index.to_be_bytes());
        aad.push(u8::from(last));
        aad
    }

    /// Encrypts `buf` in place and returns the tag.
    fn seal(&self, index: u64, last: bool, buf: &mut [u8]) -> Result<Tag> {
        self.cipher
            .encrypt_inout_detached(&Self::nonce(index), &self.aad(index, last), buf.into())
            .map_err(|_| Error::Blob("frame encryption failed".into()))
    }

    fn open(&self, index: u64, last: bool, buf: &mut [u8], tag: &[u8]) -> Result<()> {
        let tag = Tag::try_from(tag).map_err(|_| Error::Blob("bad tag length".into()))?;
        self.cipher
            .decrypt_inout_detached(&Self::nonce(index), &self.aad(index, last), buf.into(), &tag)
            .map_err(|_| Error::Blob(format!("frame {index} failed authentication (tampered or truncated blob)")))
    }
}

/// An opened blob: its plaintext (zeroized on drop) and the encryption
/// context it was verified under.
pub struct Opened {
    /// The blob's content.
    pub plaintext: Zeroizing<Vec<u8>>,
    /// The blob's whole context, as proven by the broker.
    pub context: Context,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened").field("plaintext", &"<redacted>").field("context", &self.context).finish()
    }
}

/// The canonical form of a context (pairs sorted by key, unambiguous JSON).
fn canonical_context(context: &Context) -> String {
    serde_json::to_string(context).unwrap_or_default()
}

/// Refuses a blob whose context lacks a pair the caller expects.
fn check_expected_context(actual: &Context, expected: &Context) -> Result<()> {
    for (name, value) in expected {
        match actual.get(name) {
            Some(v) if v == value => {}
            Some(v) => {
                return Err(Error::Blob(format!(
                    "the blob's context has {name:?} = {v:?}, not the expected {value:?}: it belongs to another record"
                )));
            }
            None => {
                return Err(Error::Blob(format!(
                    "the blob's context has no {name:?}; expected {value:?}: it belongs to another record"
                )));
            }
        }
    }
    Ok(())
}

/// Seals and opens blobs under one keybroker key.
#[derive(Clone)]
pub struct BlobEncryptor {
    client: Client,
    key: String,
    context: Context,
    frame_size: u32,
    cache: Option<Arc<DekCache>>,
}

impl std::fmt::Debug for BlobEncryptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobEncryptor")
            .field("key", &self.key)
            .field("frame_size", &self.frame_size)
            .field("cached", &self.cache.is_some())
            .finish()
    }
}

impl BlobEncryptor {
    /// Seals under `key` with no context, 64 KiB frames and no DEK cache.
    pub fn new(client: Client, key: impl Into<String>) -> Self {
        Self { client, key: key.into(), context: Context::new(), frame_size: DEFAULT_FRAME_SIZE, cache: None }
    }

    /// The encryption context each blob's DEK is wrapped with (kept in the
    /// sidecar). Opening checks the sidecar's context against the one the
    /// caller expects; see [`BlobEncryptor::open`].
    pub fn with_context(mut self, context: Context) -> Self {
        self.context = context;
        self
    }

    /// Plaintext bytes per frame (16 ..= 4 MiB).
    pub fn with_frame_size(mut self, frame_size: u32) -> Result<Self> {
        if !(MIN_FRAME_SIZE..=MAX_FRAME_SIZE).contains(&frame_size) {
            return Err(Error::Blob(format!("frame size {frame_size} is outside {MIN_FRAME_SIZE}..={MAX_FRAME_SIZE}")));
        }
        self.frame_size = frame_size;
        Ok(self)
    }

    /// Reuses data keys within `policy`'s limits instead of asking the
    /// broker for each blob.
    pub fn with_cache(mut self, policy: CachePolicy) -> Self {
        self.cache = Some(Arc::new(DekCache::new(policy)));
        self
    }

    fn cache_id(&self) -> String {
        // Key names and contexts are unambiguous in JSON.
        serde_json::to_string(&(&self.key, &self.context)).unwrap_or_default()
    }

    async fn data_key(&self, len: Option<u64>) -> Result<(SharedDek, Sidecar)> {
        let id = self.cache_id();
        if let (Some(cache), Some(len)) = (&self.cache, len)
            && let Some(hit) = cache.take_for_seal(&id, len)
        {
            return Ok(hit);
        }
        let dk = self.client.generate_data_key(&self.key, DEK_LEN as u32, &self.context).await?;
        let sidecar = Sidecar {
            key: dk.wrapped.key,
            version: dk.wrapped.version,
            wrapped_dek: dk.wrapped.ciphertext,
            context: self.context.clone(),
        };
        let dek: SharedDek = Arc::new(dk.plaintext);
        if let (Some(cache), Some(len)) = (&self.cache, len) {
            cache.put_for_seal(id, dek.clone(), sidecar.clone(), len);
        }
        Ok((dek, sidecar))
    }

    async fn unwrap_dek(&self, sidecar: &Sidecar) -> Result<SharedDek> {
        let canonical = canonical_context(&sidecar.context);
        if let Some(dek) = self.cache.as_ref().and_then(|c| c.get_for_open(&sidecar.wrapped_dek, &canonical)) {
            return Ok(dek);
        }
        let unwrapped = self.client.unwrap(&sidecar.wrapped_dek, &sidecar.context).await?;
        if unwrapped.key != sidecar.key || unwrapped.version != sidecar.version {
            return Err(Error::Blob(format!(
                "sidecar names {} v{} but its wrapped DEK is {} v{}",
                sidecar.key, sidecar.version, unwrapped.key, unwrapped.version
            )));
        }
        let dek: SharedDek = Arc::new(unwrapped.plaintext);
        if let Some(cache) = &self.cache {
            cache.put_for_open(sidecar.wrapped_dek.clone(), canonical, dek.clone());
        }
        Ok(dek)
    }

    /// Seals a blob held in memory (uses the DEK cache when configured).
    pub async fn seal(&self, plaintext: &[u8]) -> Result<Vec<u8>> {
        let (dek, sidecar) = self.data_key(Some(plaintext.len() as u64)).await?;
        let mut out = Vec::with_capacity(plaintext.len() + plaintext.len() / self.frame_size as usize * 20 + 512);
        seal_frames(&dek, sidecar, self.frame_size, &mut &plaintext[..], &mut out).await?;
        Ok(out)
    }

    /// Opens a blob held in memory. `expected` is the encryption context
    /// the caller expects (the record or tenant the blob belongs to), or a
    /// subset of it: every pair must be in the blob's context, or the blob
    /// is refused before its DEK is unwrapped (a blob moved from another
    /// record or tenant). The broker then proves the blob's whole context
    /// against its wrapped DEK; [`Opened::context`] is that verified context.
    pub async fn open(&self, blob: &[u8], expected: &Context) -> Result<Opened> {
        let mut out = Zeroizing::new(Vec::with_capacity(blob.len()));
        let (_, context) = self.open_stream(&mut &blob[..], &mut *out, expected).await?;
        Ok(Opened { plaintext: out, context })
    }

    /// Seals everything `reader` yields into `writer`, a frame at a time;
    /// returns the plaintext length. (A stream's length is unknown up front,
    /// so it always gets a fresh DEK, never a cached one.)
    pub async fn seal_stream<R, W>(&self, reader: &mut R, writer: &mut W) -> Result<u64>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let (dek, sidecar) = self.data_key(None).await?;
        seal_frames(&dek, sidecar, self.frame_size, reader, writer).await
    }

    /// Opens a blob from `reader` into `writer`, checking its context
    /// against `expected` as [`BlobEncryptor::open`] does; returns the
    /// plaintext length and the verified context. See the module docs: trust
    /// the output only once this is `Ok`.
    pub async fn open_stream<R, W>(&self, reader: &mut R, writer: &mut W, expected: &Context) -> Result<(u64, Context)>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        self.open_stream_with(reader, writer, None, expected).await
    }

    /// Opens a blob held in memory whose wrapped DEK is kept up to date in
    /// an external sidecar (`sidecar`, the file `keybroker rewrap` rewrites
    /// when it moves the DEK to a newer key version). See
    /// [`BlobEncryptor::open_stream_with_sidecar`].
    pub async fn open_with_sidecar(&self, blob: &[u8], sidecar: &Sidecar, expected: &Context) -> Result<Opened> {
        let mut out = Zeroizing::new(Vec::with_capacity(blob.len()));
        let (_, context) = self.open_stream_with(&mut &blob[..], &mut *out, Some(sidecar), expected).await?;
        Ok(Opened { plaintext: out, context })
    }

    /// Opens a blob with the wrapped DEK of an external sidecar instead of
    /// the copy in the blob's header.
    ///
    /// One source of truth: the header's copy records how the blob was
    /// sealed and cannot change (the header is authenticated with every
    /// frame); where a blob has an external sidecar, that sidecar is the
    /// truth for unwrapping, since a rewrap pass moves it to newer key
    /// versions (and a version may then be retired). It must name the same
    /// key and context as the header; its DEK must be the blob's, which the
    /// frames prove.
    pub async fn open_stream_with_sidecar<R, W>(
        &self,
        reader: &mut R,
        writer: &mut W,
        sidecar: &Sidecar,
        expected: &Context,
    ) -> Result<(u64, Context)>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        self.open_stream_with(reader, writer, Some(sidecar), expected).await
    }

    async fn open_stream_with<R, W>(
        &self,
        reader: &mut R,
        writer: &mut W,
        external: Option<&Sidecar>,
        expected: &Context,
    ) -> Result<(u64, Context)>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let header = BlobHeader::read(reader).await?;
        check_expected_context(&header.sidecar.context, expected)?;
        let sidecar = match external {
            Some(s) if s.key != header.sidecar.key || s.context != header.sidecar.context => {
                return Err(Error::Blob(format!(
                    "the sidecar names key {:?} and another context than the blob it should open (key {:?})",
                    s.key, header.sidecar.key
                )));
            }
            Some(s) => s,
            None => &header.sidecar,
        };
        let dek = self.unwrap_dek(sidecar).await?;
        let len = open_frames(&dek, &header, reader, writer).await?;
        Ok((len, header.sidecar.context))
    }
}

async fn seal_frames<R, W>(dek: &[u8], sidecar: Sidecar, frame_size: u32, reader: &mut R, writer: &mut W) -> Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let header = BlobHeader::new(sidecar, frame_size)?;
    let cipher = FrameCipher::new(dek, &header)?;
    writer.write_all(&header.bytes).await?;
    let size = frame_size as usize;
    let mut current = Zeroizing::new(vec![0u8; size]);
    let mut next = Zeroizing::new(vec![0u8; size]);
    let mut len = fill(reader, &mut current).await?;
    let mut total = 0u64;
    for index in 0u64.. {
        // A full frame is the last only if nothing follows it.
        let (last, next_len) = if len < size {
            (true, 0)
        } else {
            let n = fill(reader, &mut next).await?;
            (n == 0, n)
        };
        let frame = &mut current[..len];
        let tag = cipher.seal(index, last, frame)?;
        let marker = len as u32 | if last { LAST_FRAME } else { 0 };
        writer.write_all(&marker.to_be_bytes()).await?;
        writer.write_all(frame).await?;
        writer.write_all(&tag).await?;
        total += len as u64;
        if last {
            break;
        }
        std::mem::swap(&mut current, &mut next);
        len = next_len;
    }
    writer.flush().await?;
    Ok(total)
}

async fn open_frames<R, W>(dek: &[u8], header: &BlobHeader, reader: &mut R, writer: &mut W) -> Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let cipher = FrameCipher::new(dek, header)?;
    let size = header.frame_size as usize;
    let mut buf = Zeroizing::new(vec![0u8; size + TAG_LEN]);
    let mut total = 0u64;
    for index in 0u64.. {
        let mut marker = [0u8; 4];
        read_exact_or(reader, &mut marker, "blob is truncated (its last frame is missing)").await?;
        let marker = u32::from_be_bytes(marker);
        let last = marker & LAST_FRAME != 0;
        let len = (marker & !LAST_FRAME) as usize;
        if len > size || (!last && len != size) {
            return Err(Error::Blob(format!("frame {index} has an invalid length {len}")));
        }
        let frame = &mut buf[..len + TAG_LEN];
        read_exact_or(reader, frame, "blob is truncated inside a frame").await?;
        let (body, tag) = frame.split_at_mut(len);
        cipher.open(index, last, body, tag)?;
        writer.write_all(body).await?;
        total += len as u64;
        if last {
            let mut extra = [0u8; 1];
            if reader.read(&mut extra).await? != 0 {
                return Err(Error::Blob("data after the last frame".into()));
            }
            break;
        }
    }
    writer.flush().await?;
    Ok(total)
}

/// Seals a blob under a DEK already at hand, without a broker (seed inputs
/// for `cargo fuzz`).
#[doc(hidden)]
pub async fn seal_with_dek(dek: &[u8], sidecar: Sidecar, frame_size: u32, plaintext: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    seal_frames(dek, sidecar, frame_size, &mut &plaintext[..], &mut out).await?;
    Ok(out)
}

/// Opens a blob with its DEK already at hand, without a broker: the header
/// and frame checks alone (for `cargo fuzz`).
#[doc(hidden)]
pub async fn open_with_dek(dek: &[u8], blob: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    let mut reader = blob;
    let header = BlobHeader::read(&mut reader).await?;
    let mut out = Zeroizing::new(Vec::new());
    open_frames(dek, &header, &mut reader, &mut *out).await?;
    Ok(out)
}

/// The sidecar of a blob, read from its header without decrypting it (what
/// a rewrap pass needs).
pub async fn read_sidecar(blob: &[u8]) -> Result<Sidecar> {
    Ok(BlobHeader::read(&mut &blob[..]).await?.sidecar)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sidecar() -> Sidecar {
        Sidecar { key: "k".into(), version: 3, wrapped_dek: vec![1, 2, 3], context: Context::new() }
    }

    #[tokio::test]
    async fn a_sidecar_too_large_for_read_is_refused_at_seal() {
        let mut big = sidecar();
        big.context.insert("note".into(), "x".repeat(MAX_SIDECAR_LEN as usize));
        let mut out = Vec::new();
        let err = seal_frames(&[7u8; 32], big, 1024, &mut &b"data"[..], &mut out).await.unwrap_err();
        assert!(err.to_string().contains("a blob header holds"), "{err}");
        assert!(out.is_empty(), "a blob nobody can open was written");
    }

    #[test]
    fn the_expected_context_must_be_a_subset_of_the_blobs() {
        let actual = Context::from([("tenant".to_owned(), "a".to_owned()), ("record".to_owned(), "7".to_owned())]);
        assert!(check_expected_context(&actual, &Context::from([("tenant".to_owned(), "a".to_owned())])).is_ok());
        assert!(check_expected_context(&actual, &actual).is_ok());
        assert!(check_expected_context(&actual, &Context::from([("tenant".to_owned(), "b".to_owned())])).is_err());
        assert!(check_expected_context(&actual, &Context::from([("user".to_owned(), "a".to_owned())])).is_err());
    }

    async fn sealed(dek: &[u8], data: &[u8], frame: u32) -> Vec<u8> {
        let mut out = Vec::new();
        seal_frames(dek, sidecar(), frame, &mut &data[..], &mut out).await.unwrap();
        out
    }

    async fn opened(dek: &[u8], blob: &[u8]) -> Result<Vec<u8>> {
        let mut reader = blob;
        let header = BlobHeader::read(&mut reader).await?;
        let mut out = Vec::new();
        open_frames(dek, &header, &mut reader, &mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn frames_round_trip_at_every_boundary() {
        let dek = [7u8; 32];
        for len in [0usize, 1, 15, 16, 17, 31, 32, 33, 100] {
            let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let blob = sealed(&dek, &data, 16).await;
            assert_eq!(opened(&dek, &blob).await.unwrap(), data, "length {len}");
        }
    }

    #[tokio::test]
    async fn tampering_truncation_reordering_and_trailing_data_fail() {
        let dek = [7u8; 32];
        let data: Vec<u8> = (0..64u8).collect();
        let blob = sealed(&dek, &data, 16).await;
        let header_len = HEADER_FIXED_LEN + sidecar().to_json().len();
        let frame_len = 4 + 16 + TAG_LEN;
        for i in 0..blob.len() {
            let mut bad = blob.clone();
            bad[i] ^= 0x01;
            assert!(opened(&dek, &bad).await.is_err(), "flip at {i} went unnoticed");
        }
        for cut in [header_len, header_len + frame_len, blob.len() - 1] {
            assert!(opened(&dek, &blob[..cut]).await.is_err(), "cut at {cut} went unnoticed");
        }
        // Drop the last (empty, flagged) frame: the stream ends too early.
        assert!(opened(&dek, &blob[..blob.len() - (4 + TAG_LEN)]).await.is_err());
        let mut swapped = blob[..header_len].to_vec();
        swapped.extend_from_slice(&blob[header_len + frame_len..header_len + 2 * frame_len]);
        swapped.extend_from_slice(&blob[header_len..header_len + frame_len]);
        swapped.extend_from_slice(&blob[header_len + 2 * frame_len..]);
        assert!(opened(&dek, &swapped).await.is_err(), "reordered frames accepted");
        let mut trailing = blob.clone();
        trailing.push(0);
        assert!(opened(&dek, &trailing).await.is_err());
        assert!(opened(&[8u8; 32], &blob).await.is_err(), "another DEK opened the blob");
    }

    #[test]
    fn sidecar_json_is_documented_shape() {
        let s = Sidecar {
            key: "demo".into(),
            version: 1,
            wrapped_dek: vec![0, 1, 2],
            context: [("blob".to_string(), "b1".to_string())].into(),
        };
        assert_eq!(s.to_json(), r#"{"key":"demo","version":1,"wrapped_dek":"AAEC","context":{"blob":"b1"}}"#);
        assert_eq!(Sidecar::from_json(&s.to_json()).unwrap(), s);
        let bare = Sidecar { context: Context::new(), ..s };
        assert_eq!(bare.to_json(), r#"{"key":"demo","version":1,"wrapped_dek":"AAEC"}"#);
        assert!(Sidecar::from_json(r#"{"key":"x"}"#).is_err());
    }

    #[test]
    fn debug_does_not_leak() {
        let dk = crate::client::DataKey {
            plaintext: Zeroizing::new(vec![0x41; 32]),
            wrapped: crate::client::Wrapped { ciphertext: vec![], key: "k".into(), version: 1 },
        };
        assert!(!format!("{dk:?}").contains("65, 65"), "{dk:?}");
    }
}
