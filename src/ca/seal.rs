//! Sealing CA private keys for a shared store: AES-256-GCM under a key-encryption key (KEK) that
//! every replica reads from a file. The name the sealed blob is stored under is the associated
//! data, so a blob moved to another name (a retired CA's key swapped in for the active one's)
//! fails to open instead of silently signing with the wrong key.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::fsutil::write_atomic;

/// Length of a KEK file: 32 random bytes.
pub const KEK_LEN: usize = 32;
/// Format tag of a sealed blob; a future format gets another tag instead of guessing.
const SEALED_V1: u8 = 1;

/// Why a KEK or a sealed blob was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The KEK file cannot be read or written.
    #[error("key-encryption key {0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// The KEK file is readable by group or others.
    #[error(
        "key-encryption key {0} has mode {1:o}; it must not be readable by group or others (chmod 600)"
    )]
    Mode(PathBuf, u32),
    /// The KEK file is not exactly 32 bytes.
    #[error(
        "key-encryption key {0} holds {1} bytes; it must hold exactly 32 random bytes (lanyard kek generate, or head -c 32 /dev/urandom)"
    )]
    Length(PathBuf, usize),
    /// The blob does not open under this KEK and name: another KEK, a corrupt blob, or one
    /// stored under another name.
    #[error(
        "sealed CA key {0:?} does not open with this key-encryption key (another KEK, a corrupt blob, or one copied from another name)"
    )]
    Open(String),
    /// The system random source failed.
    #[error("random source failed")]
    Random,
}

/// A key-encryption key. Its `Debug` never shows the key.
pub struct Kek {
    key: LessSafeKey,
    /// SHA-256 prefix of the key, to tell two replicas' KEKs apart in logs without revealing it.
    id: String,
}

// === impl Kek ===

impl Kek {
    /// Reads a KEK file: exactly 32 bytes, mode without group/other bits.
    pub fn load(path: &Path) -> Result<Self, SealError> {
        let meta = fs::metadata(path).map_err(|e| SealError::Io(path.to_path_buf(), e))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SealError::Mode(path.to_path_buf(), mode));
        }
        let bytes = fs::read(path).map_err(|e| SealError::Io(path.to_path_buf(), e))?;
        Self::from_bytes(&bytes).ok_or(SealError::Length(path.to_path_buf(), bytes.len()))
    }

    /// Writes a new random KEK to `path` (mode 0600); refuses to overwrite one.
    pub fn generate(path: &Path) -> Result<(), SealError> {
        if path.exists() {
            return Err(SealError::Io(
                path.to_path_buf(),
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "already exists; a replaced KEK cannot open the CA keys sealed under the old one",
                ),
            ));
        }
        let mut key = [0u8; KEK_LEN];
        SystemRandom::new()
            .fill(&mut key)
            .map_err(|_| SealError::Random)?;
        write_atomic(path, &key, 0o600).map_err(|e| SealError::Io(path.to_path_buf(), e))
    }

    /// A KEK from raw bytes (`None` unless exactly 32).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != KEK_LEN {
            return None;
        }
        use sha2::{Digest, Sha256};
        let id = crate::encoding::hex(&Sha256::digest(bytes)[..4]);
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).ok()?);
        Some(Self { key, id })
    }

    /// A short, non-secret identifier of this KEK (first bytes of its SHA-256).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Seals `plaintext` for storage under `name`: `1 || nonce || ciphertext+tag`, with `name`
    /// as associated data. Nonces are random (96 bits): a CA key is sealed a handful of times
    /// in its life, far from the birthday bound.
    pub fn seal(&self, name: &str, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SealError::Random)?;
        let mut buf = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut buf,
            )
            .map_err(|_| SealError::Random)?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + buf.len());
        out.push(SEALED_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        Ok(out)
    }

    /// Opens a blob sealed under `name`.
    pub fn open(&self, name: &str, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let fail = || SealError::Open(name.to_string());
        let (&tag, rest) = sealed.split_first().ok_or_else(fail)?;
        if tag != SEALED_V1 || rest.len() < NONCE_LEN {
            return Err(fail());
        }
        let (nonce, ct) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| fail())?;
        let mut buf = ct.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut buf)
            .map_err(|_| fail())?;
        Ok(plain.to_vec())
    }
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kek").field("id", &self.id).finish()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn sealed_keys_open_only_under_their_name_and_kek() {
        let a = Kek::from_bytes(&[7u8; 32]).unwrap();
        let b = Kek::from_bytes(&[8u8; 32]).unwrap();
        let blob = a.seal("ca/rotated-1/key", b"secret key").unwrap();
        assert!(!blob.windows(6).any(|w| w == b"secret"));
        assert_eq!(a.open("ca/rotated-1/key", &blob).unwrap(), b"secret key");
        // Spliced under another name: refused.
        assert!(matches!(
            a.open("ca/first/key", &blob),
            Err(SealError::Open(_))
        ));
        // Another KEK: refused.
        assert!(b.open("ca/rotated-1/key", &blob).is_err());
        // One flipped bit: refused.
        let mut bad = blob.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(a.open("ca/rotated-1/key", &bad).is_err());
        assert!(a.open("x", &[]).is_err());
        assert!(Kek::from_bytes(&[0u8; 31]).is_none());
    }

    #[test]
    fn kek_files_are_private_and_exactly_32_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kek");
        Kek::generate(&p).unwrap();
        assert!(Kek::generate(&p).is_err(), "never overwritten");
        let k = Kek::load(&p).unwrap();
        assert_eq!(k.id().len(), 8);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        let e = Kek::load(&p).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        write_atomic(&p, b"short", 0o600).unwrap();
        assert!(matches!(Kek::load(&p), Err(SealError::Length(_, 5))));
    }
}
