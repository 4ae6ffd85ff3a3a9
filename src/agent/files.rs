//! Writing the credential directory so readers never see a torn or mismatched pair.
//!
//! Each generation is written into a fresh hidden directory (`..<n>`), fsynced, then published
//! by renaming one symlink (`..data`) — the same scheme Kubernetes uses for projected volumes.
//! `cert.pem`, `key.pem`, `bundle.pem` and `svid.pem` (key + chain in one file) are symlinks
//! through `..data`, so every file a reader opens is complete, and a reader that opens the files
//! of one generation gets a matching key and certificate. `svid.pem` holds both in one file for
//! readers (nginx, haproxy) that can load key and chain from a single path.
//!
//! `crl.pem` holds the CA's CRLs (PEM, the signing CA's first, then a retiring CA's during a
//! rotation) in the same generation, when the agent has fetched them: a CRL refresh writes a new
//! generation with the same key and certificate.
//!
//! Federated bundles live in the same generation, as `federated/<trust-domain>.pem` (the
//! `federated` link points through `..data` like the files), so a reader always sees bundles
//! that were current together with the certificate.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use rustls_pki_types::CertificateDer;

use crate::ca::certs_to_pem;
use crate::fsutil::write_atomic;

const DATA: &str = "..data";
const FEDERATED: &str = "federated";
const CRL: &str = "crl.pem";
const FILES: [&str; 6] = [
    "cert.pem",
    "key.pem",
    "bundle.pem",
    "svid.pem",
    FEDERATED,
    CRL,
];
/// Where credentials the agent replaced with a join token's are kept (`retired/<UTC time>/`).
pub(crate) const RETIRED: &str = "retired";

/// Publishes a new generation of the credential in `dir`, without federated bundles.
pub fn write_svid_dir(
    dir: &Path,
    chain: &[CertificateDer<'_>],
    key_pem: &str,
    bundle: &[CertificateDer<'_>],
) -> std::io::Result<()> {
    write_credential_dir(dir, chain, key_pem, bundle, &BTreeMap::new())
}

/// Publishes a new generation of the credential in `dir`, with `federated` bundles (trust domain
/// name → CA certificates) as `federated/<td>.pem`.
pub fn write_credential_dir(
    dir: &Path,
    chain: &[CertificateDer<'_>],
    key_pem: &str,
    bundle: &[CertificateDer<'_>],
    federated: &BTreeMap<String, Vec<CertificateDer<'_>>>,
) -> std::io::Result<()> {
    write_generation(dir, chain, key_pem, bundle, federated, CrlFile::None)
}

/// What `crl.pem` holds in a new generation.
#[derive(Debug, Clone, Copy)]
pub(crate) enum CrlFile<'a> {
    /// No CRLs: no `crl.pem`.
    None,
    /// These CRLs (DER).
    Ders(&'a [prost::bytes::Bytes]),
    /// The current generation's `crl.pem`, linked (the agent let go of CRLs too large to hold).
    Keep,
}

/// Publishes a new generation of the credential in `dir`, with `federated` bundles and the
/// CA's CRLs as `crl.pem` (see [`CrlFile`]).
pub(crate) fn write_generation(
    dir: &Path,
    chain: &[CertificateDer<'_>],
    key_pem: &str,
    bundle: &[CertificateDer<'_>],
    federated: &BTreeMap<String, Vec<CertificateDer<'_>>>,
    crls: CrlFile<'_>,
) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let gen_name = format!(
        "..{}.{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
        std::process::id()
    );
    let gen_dir = dir.join(&gen_name);
    fs::create_dir(&gen_dir)?;
    fs::set_permissions(&gen_dir, fs::Permissions::from_mode(0o755))?;
    let chain_pem = certs_to_pem(chain);
    write_atomic(&gen_dir.join("key.pem"), key_pem.as_bytes(), 0o600)?;
    write_atomic(&gen_dir.join("cert.pem"), chain_pem.as_bytes(), 0o644)?;
    write_atomic(
        &gen_dir.join("bundle.pem"),
        certs_to_pem(bundle).as_bytes(),
        0o644,
    )?;
    write_atomic(
        &gen_dir.join("svid.pem"),
        format!("{key_pem}{chain_pem}").as_bytes(),
        0o600,
    )?;
    let mut has_crl = false;
    if let CrlFile::Keep = crls {
        // The file is never changed once written, so the new generation shares it.
        let current = dir.join(DATA).join(CRL);
        let target = gen_dir.join(CRL);
        match fs::hard_link(&current, &target).or_else(|_| fs::copy(&current, &target).map(drop)) {
            Ok(()) => has_crl = true,
            Err(e) => tracing::warn!(
                error = %e,
                file = %current.display(),
                "cannot carry crl.pem over to the new generation; it is written again with the next CRL"
            ),
        }
    }
    if let CrlFile::Ders(crls) = crls
        && !crls.is_empty()
    {
        has_crl = true;
        // Written straight into the new generation (nobody sees it before the swap below) as it
        // is encoded: the PEM of a CRL with a million entries is 46 MiB.
        let f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(gen_dir.join(CRL))?;
        f.set_permissions(fs::Permissions::from_mode(0o644))?;
        let mut w = std::io::BufWriter::with_capacity(64 * 1024, f);
        super::crl::write_pem(crls, &mut w)?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        fs::File::open(&gen_dir)?.sync_all()?;
    }
    let fed_dir = gen_dir.join(FEDERATED);
    fs::create_dir(&fed_dir)?;
    fs::set_permissions(&fed_dir, fs::Permissions::from_mode(0o755))?;
    for (td, certs) in federated {
        // Trust domain names are [a-z0-9._-]; refuse anything that could leave the directory.
        if td.is_empty() || td.contains('/') || td.starts_with('.') {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("bad trust domain name {td:?}"),
            ));
        }
        write_atomic(
            &fed_dir.join(format!("{td}.pem")),
            certs_to_pem(certs).as_bytes(),
            0o644,
        )?;
    }

    let previous = fs::read_link(dir.join(DATA)).ok();
    swap_symlink(dir, DATA, Path::new(&gen_name))?;
    for f in FILES {
        let link = dir.join(f);
        if f == CRL && !has_crl {
            // No dangling link: a reader finds no crl.pem rather than a broken one.
            if fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()) {
                fs::remove_file(&link)?;
            }
            continue;
        }
        let target = Path::new(DATA).join(f);
        if fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
            swap_symlink(dir, f, &target)?;
        }
    }
    fs::File::open(dir)?.sync_all()?;
    // Keep the previous generation (a reader may still be inside it); drop older ones.
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("..")
            && name != DATA
            && *name != *gen_name
            && previous.as_deref() != Some(Path::new(name.as_ref()))
            && entry.file_type()?.is_dir()
        {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}

/// Sets the credential in force in `dir` aside, whole, into `dir/retired/<UTC time>/` (the
/// directory `retired/` is mode 0700; files keep their modes, the key stays 0600) and returns
/// where it went. Nothing is deleted: a revoked or long-expired credential is evidence. A
/// generation directory (`..data`) is moved as it is and the links into it are removed, so
/// readers find no credential until the next one is written; plain files (`lanyard issue`)
/// are moved one by one.
pub(crate) fn retire_credential(dir: &Path) -> std::io::Result<PathBuf> {
    let retired = dir.join(RETIRED);
    fs::create_dir_all(&retired)?;
    fs::set_permissions(&retired, fs::Permissions::from_mode(0o700))?;
    let now = time::OffsetDateTime::now_utc();
    let stamp = format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    );
    let target = (0..100)
        .map(|n| {
            retired.join(if n == 0 {
                stamp.clone()
            } else {
                format!("{stamp}-{n}")
            })
        })
        .find(|p| fs::symlink_metadata(p).is_err())
        .ok_or_else(|| std::io::Error::other("no free name under retired/"))?;
    // Only a generation of our own naming (`..<n>`, a sibling) is moved as a whole; anything
    // else `..data` might point at is left alone and only the links are moved.
    let generation = fs::read_link(dir.join(DATA)).ok().filter(|g| {
        let mut parts = g.components();
        matches!(
            (parts.next(), parts.next()),
            (Some(std::path::Component::Normal(n)), None)
                if n.to_string_lossy().starts_with("..") && n != DATA
        )
    });
    match generation {
        Some(generation) if dir.join(&generation).is_dir() => {
            fs::rename(dir.join(&generation), &target)?;
            for name in FILES.iter().copied().chain([DATA]) {
                let link = dir.join(name);
                if fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()) {
                    fs::remove_file(link)?;
                }
            }
        }
        _ => {
            fs::create_dir(&target)?;
            for name in FILES.iter().copied().chain([DATA]) {
                let from = dir.join(name);
                if fs::symlink_metadata(&from).is_ok() {
                    fs::rename(from, target.join(name))?;
                }
            }
        }
    }
    fs::File::open(&retired)?.sync_all()?;
    fs::File::open(dir)?.sync_all()?;
    Ok(target)
}

/// Atomically points `dir/name` at `target` (create a temp symlink, rename over).
fn swap_symlink(dir: &Path, name: &str, target: &Path) -> std::io::Result<()> {
    let tmp: PathBuf = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    symlink(target, &tmp)?;
    fs::rename(&tmp, dir.join(name))
}

/// Reads the federated bundles of the current generation (`federated/<td>.pem`); unreadable
/// files are skipped.
pub fn read_federated(dir: &Path) -> BTreeMap<String, Vec<CertificateDer<'static>>> {
    use rustls_pki_types::pem::PemObject;
    let mut out = BTreeMap::new();
    let Ok(entries) = fs::read_dir(dir.join(FEDERATED)) else {
        return out;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(td) = name.to_str().and_then(|n| n.strip_suffix(".pem")) else {
            continue;
        };
        let certs: Option<Vec<CertificateDer<'static>>> =
            fs::read(entry.path()).ok().and_then(|pem| {
                CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<_, _>>()
                    .ok()
            });
        if let Some(certs) = certs.filter(|c| !c.is_empty()) {
            out.insert(td.to_string(), certs);
        }
    }
    out
}

/// The CRLs in `dir/crl.pem` (empty when there is none or it does not parse).
pub(crate) fn read_crls(dir: &Path) -> Vec<Vec<u8>> {
    fs::read(dir.join(CRL))
        .map(|pem| super::crl::from_pem(&pem))
        .unwrap_or_default()
}

/// Reads `cert.pem` and `key.pem` of one generation (through one resolution of `..data`), for
/// readers that want a guaranteed pair; falls back to the plain files in a directory written
/// by `lanyard issue`.
pub fn read_consistent(dir: &Path) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let base = match fs::read_link(dir.join(DATA)) {
        Ok(gen_dir) => dir.join(gen_dir),
        Err(_) => dir.to_path_buf(),
    };
    Ok((
        fs::read(base.join("cert.pem"))?,
        fs::read(base.join("key.pem"))?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_swap_and_old_ones_are_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let cert = CertificateDer::from(vec![0x30, 0x00]);
        for i in 0..4 {
            write_svid_dir(
                dir.path(),
                std::slice::from_ref(&cert),
                &format!("KEY{i}\n"),
                std::slice::from_ref(&cert),
            )
            .unwrap();
            assert_eq!(
                fs::read_to_string(dir.path().join("key.pem")).unwrap(),
                format!("KEY{i}\n")
            );
        }
        let gens = fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                let n = e.as_ref().unwrap().file_name();
                n.to_string_lossy().starts_with("..") && n != DATA
            })
            .count();
        assert_eq!(gens, 2, "current and previous generation kept");
        let mode = fs::metadata(dir.path().join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (c, k) = read_consistent(dir.path()).unwrap();
        assert!(c.starts_with(b"-----BEGIN CERTIFICATE-----"));
        assert_eq!(k, b"KEY3\n");
        assert!(
            fs::read_dir(dir.path().join("federated"))
                .unwrap()
                .next()
                .is_none()
        );
    }

    #[test]
    fn a_retired_credential_is_moved_whole_and_readers_find_none() {
        let dir = tempfile::tempdir().unwrap();
        let cert = CertificateDer::from(vec![0x30, 0x00]);
        let one = std::slice::from_ref(&cert);
        write_svid_dir(dir.path(), one, "OLD\n", one).unwrap();
        write_svid_dir(dir.path(), one, "CURRENT\n", one).unwrap();
        let kept = retire_credential(dir.path()).unwrap();
        assert!(kept.starts_with(dir.path().join(RETIRED)));
        assert_eq!(
            fs::read_to_string(kept.join("key.pem")).unwrap(),
            "CURRENT\n"
        );
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&kept.join("key.pem")), 0o600);
        assert_eq!(mode(&dir.path().join(RETIRED)), 0o700);
        assert!(read_consistent(dir.path()).is_err());
        assert!(fs::symlink_metadata(dir.path().join("cert.pem")).is_err());
        // The next credential is written as usual, and a second retirement gets its own name.
        write_svid_dir(dir.path(), one, "NEW\n", one).unwrap();
        assert_eq!(read_consistent(dir.path()).unwrap().1, b"NEW\n");
        let again = retire_credential(dir.path()).unwrap();
        assert_ne!(again, kept);
        assert_eq!(fs::read_to_string(again.join("key.pem")).unwrap(), "NEW\n");
        assert_eq!(
            fs::read_to_string(kept.join("key.pem")).unwrap(),
            "CURRENT\n"
        );

        // Plain files, as `lanyard issue` writes them.
        let plain = tempfile::tempdir().unwrap();
        fs::write(plain.path().join("cert.pem"), "C").unwrap();
        write_atomic(&plain.path().join("key.pem"), b"K", 0o600).unwrap();
        fs::write(plain.path().join("bundle.pem"), "B").unwrap();
        let kept = retire_credential(plain.path()).unwrap();
        assert_eq!(fs::read_to_string(kept.join("key.pem")).unwrap(), "K");
        assert_eq!(mode(&kept.join("key.pem")), 0o600);
        assert!(!plain.path().join("cert.pem").exists());
    }

    #[test]
    fn federated_bundles_are_part_of_the_generation() {
        let dir = tempfile::tempdir().unwrap();
        let cert = CertificateDer::from(vec![0x30, 0x00]);
        let mut fed = BTreeMap::new();
        fed.insert("b.example".to_string(), vec![cert.clone()]);
        let one = std::slice::from_ref(&cert);
        write_credential_dir(dir.path(), one, "K\n", one, &fed).unwrap();
        let pem = fs::read_to_string(dir.path().join("federated/b.example.pem")).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        fed.clear();
        fed.insert("c.example".to_string(), vec![cert.clone()]);
        write_credential_dir(dir.path(), one, "K\n", one, &fed).unwrap();
        assert!(!dir.path().join("federated/b.example.pem").exists());
        assert!(dir.path().join("federated/c.example.pem").exists());
        fed.insert("../x".to_string(), vec![cert.clone()]);
        assert!(write_credential_dir(dir.path(), one, "K\n", one, &fed).is_err());
    }

    #[test]
    fn crls_are_part_of_the_generation_and_absent_without_any() {
        let dir = tempfile::tempdir().unwrap();
        let cert = CertificateDer::from(vec![0x30, 0x00]);
        let one = std::slice::from_ref(&cert);
        let none = BTreeMap::new();
        write_generation(
            dir.path(),
            one,
            "K\n",
            one,
            &none,
            CrlFile::Ders(&[vec![0x30, 0x01].into()]),
        )
        .unwrap();
        assert_eq!(
            fs::read_link(dir.path().join(CRL)).unwrap(),
            Path::new(DATA).join(CRL)
        );
        assert_eq!(read_crls(dir.path()), vec![vec![0x30, 0x01]]);
        let mode = fs::metadata(dir.path().join(CRL))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
        write_generation(
            dir.path(),
            one,
            "K\n",
            one,
            &none,
            CrlFile::Ders(&[vec![0x30, 0x02].into()]),
        )
        .unwrap();
        assert_eq!(read_crls(dir.path()), vec![vec![0x30, 0x02]]);
        // Carried over from the current generation, twice (the previous one is then gone).
        for _ in 0..2 {
            write_generation(dir.path(), one, "K\n", one, &none, CrlFile::Keep).unwrap();
            assert_eq!(read_crls(dir.path()), vec![vec![0x30, 0x02]]);
        }
        // Without CRLs: no link at all, not a dangling one.
        write_credential_dir(dir.path(), one, "K\n", one, &none).unwrap();
        assert!(fs::symlink_metadata(dir.path().join(CRL)).is_err());
        assert!(read_crls(dir.path()).is_empty());
    }
}
