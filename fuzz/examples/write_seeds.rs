//! Writes the committed seed corpora under `fuzz/corpus/<target>/`: a handful of valid and
//! edge-case inputs per target. Run by `scripts/fuzz seeds`; keys are random, so a rerun changes
//! the bytes but not what the seeds cover.

use std::path::{Path, PathBuf};

use lanyard::audit::{GENESIS_HASH, compute_hash};
use lanyard::ca::{RolesOid, encode_roles};
use lanyard::federation::SpiffeBundle;
use lanyard::spiffe::TrustDomain;
use lanyard::store::{
    AccessRecord, ApprovalRecord, AuditRecord, Enrollment, IssuedRecord, RevocationRecord,
    TokenRecord,
};
use lanyard::tokens::JoinToken;
use prost::Message;
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, IsCa, KeyPair, SanType,
    SignatureAlgorithm,
};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Res<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    csr(&root.join("csr"))?;
    join_token(&root.join("join_token"))?;
    spiffe_id(&root.join("spiffe_id"))?;
    relay(&root.join("relay"))?;
    bundle(&root.join("bundle"))?;
    policy(&root.join("policy"))?;
    audit_record(&root.join("audit_record"))?;
    roles_der(&root.join("roles_der"))?;
    jwt(&root.join("jwt"))?;
    check_valid_seeds(&root)
}

/// The seeds meant to be valid are: otherwise the targets' invariants on accepted input would
/// start from nothing.
fn check_valid_seeds(root: &Path) -> Res<()> {
    let read = |t: &str, name: &str| std::fs::read(root.join(t).join(name));
    let td = TrustDomain::new("example.org")?;
    for name in ["valid_p256", "valid_ed25519"] {
        lanyard::ca::parse_csr(&read("csr", name)?[1..], &td)?;
    }
    JoinToken::parse(std::str::from_utf8(&read("join_token", "whitespace")?)?)?;
    for name in ["jwks_p256", "jwks_three", "jwks_with_jwt_key", "pem_three"] {
        SpiffeBundle::decode_any(td.clone(), &read("bundle", name)?)?;
    }
    for name in ["example_toml", "minimal", "rules"] {
        let path = root.join("policy").join(name);
        lanyard::config::ServeSettings::resolve(Some(&path), Default::default())?;
    }
    let roles = lanyard::ca::parse_svid(&read("roles_der", "svid")?[1..], &RolesOid::default())?;
    assert_eq!(roles.roles, ["db-read", "deploy", "lanyard:admin"]);
    let export = read("audit_record", "audit_export")?;
    let records: Vec<AuditRecord> = export
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(serde_json::from_slice)
        .collect::<Result<_, _>>()?;
    lanyard::audit::verify_chain(&records, 1, GENESIS_HASH)?;
    Ok(())
}

fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) -> Res<()> {
    std::fs::create_dir_all(dir)?;
    let path: PathBuf = dir.join(name);
    std::fs::write(&path, bytes)?;
    Ok(())
}

fn prefixed(mode: u8, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![mode];
    v.extend_from_slice(bytes);
    v
}

fn csr_der(alg: &'static SignatureAlgorithm, sans: Vec<SanType>, ca: bool) -> Res<Vec<u8>> {
    let key = KeyPair::generate_for(alg)?;
    let mut p = CertificateParams::default();
    p.subject_alt_names = sans;
    if ca {
        // rcgen refuses is_ca in a CSR; a raw basicConstraints CA=true is what a client could send.
        p.custom_extensions = vec![CustomExtension::from_oid_content(
            &[2, 5, 29, 19],
            vec![0x30, 0x03, 0x01, 0x01, 0xff],
        )];
    }
    Ok(p.serialize_request(&key)?.der().to_vec())
}

fn uri(s: &str) -> Res<SanType> {
    Ok(SanType::URI(s.try_into()?))
}

fn csr(dir: &Path) -> Res<()> {
    let id = "spiffe://example.org/ns/prod/api";
    let p256 = &rcgen::PKCS_ECDSA_P256_SHA256;
    let seeds = [
        ("valid_p256", csr_der(p256, vec![uri(id)?], false)?),
        (
            "valid_ed25519",
            csr_der(&rcgen::PKCS_ED25519, vec![uri(id)?], false)?,
        ),
        (
            "p384_key",
            csr_der(&rcgen::PKCS_ECDSA_P384_SHA384, vec![uri(id)?], false)?,
        ),
        (
            "foreign_domain",
            csr_der(p256, vec![uri("spiffe://other.org/a")?], false)?,
        ),
        (
            "dns_san",
            csr_der(
                p256,
                vec![uri(id)?, SanType::DnsName("api.example.org".try_into()?)],
                false,
            )?,
        ),
        (
            "two_uris",
            csr_der(p256, vec![uri(id)?, uri("spiffe://example.org/b")?], false)?,
        ),
        ("no_san", csr_der(p256, vec![], false)?),
        ("asks_ca", csr_der(p256, vec![uri(id)?], true)?),
    ];
    for (name, der) in &seeds {
        write(dir, name, prefixed(0, der))?;
    }
    let mut tampered = seeds[0].1.clone();
    if let Some(last) = tampered.last_mut() {
        *last ^= 1;
    }
    write(dir, "bad_signature", prefixed(0, &tampered))?;
    // Structured mode: the bytes drive rcgen.
    write(
        dir,
        "built_a",
        prefixed(1, &[0, 1, 0, 0, 3, b'a', b'/', b'b', 0, 0, 0, 0]),
    )?;
    write(
        dir,
        "built_b",
        prefixed(1, &[1, 3, 2, 5, 0xff, 0x10, 7, 1, 2, 3, 4, 5, 6, 7, 8]),
    )?;
    Ok(())
}

fn join_token(dir: &Path) -> Res<()> {
    let exact = JoinToken::generate([7; 32], "spiffe://example.org/ns/prod/api").to_token_string();
    let prefix = JoinToken::generate([0; 32], "spiffe://example.org/ns/prod/*").to_token_string();
    write(dir, "exact", &exact)?;
    write(dir, "prefix", &prefix)?;
    write(dir, "whitespace", format!("  {exact}\n"))?;
    write(dir, "extra_part", format!("{exact}.x"))?;
    write(
        dir,
        "uppercase_id",
        exact.replacen("lanyard1.", "lanyard1.A", 1),
    )?;
    write(dir, "short", "lanyard1.0011223344556677.x.y.z")?;
    Ok(())
}

fn spiffe_id(dir: &Path) -> Res<()> {
    let seeds: [(&str, &str); 8] = [
        (
            "exact_pair",
            "spiffe://example.org/ns/prod/sa/api\nspiffe://example.org/ns/prod/sa/api",
        ),
        (
            "prefix_pair",
            "spiffe://example.org/ns/prod/*\nspiffe://example.org/ns/prod/db",
        ),
        (
            "prefix_sibling",
            "spiffe://example.org/ns/prod/*\nspiffe://example.org/ns/production/x",
        ),
        ("trust_domain", "example.org"),
        ("roles", "deploy, db-read,lanyard:admin,deploy"),
        (
            "bad_ids",
            "spiffe://Example.org/a\nspiffe://example.org/a/../b",
        ),
        (
            "extras",
            "spiffe://user@example.org:8443/a?x#y\nspiffe:///a",
        ),
        (
            "dots",
            "spiffe://a.b-c_d/x/.y/..z\nspiffe://a.b-c_d/x/.y/..z/w",
        ),
    ];
    for (name, s) in seeds {
        write(dir, name, s)?;
    }
    Ok(())
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn relay(dir: &Path) -> Res<()> {
    let mut enc = loona_hpack::Encoder::new();
    let block = enc.encode([
        (&b":method"[..], &b"POST"[..]),
        (b":scheme", b"http"),
        (b":authority", b"/run/lanyard/agent.sock"),
        (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
        (b"content-type", b"application/grpc"),
        (b"workload.spiffe.io", b"true"),
    ]);
    let settings = frame(4, 0, 0, &[0, 3, 0, 0, 0, 100]);
    // The minimal valid sequence: preface, SETTINGS, one HEADERS.
    let mut valid = PREFACE.to_vec();
    valid.extend(&settings);
    valid.extend(frame(1, 0x4, 1, &block));
    write(dir, "preface_settings_headers", &valid)?;

    // HEADERS padded, with priority, continued; then DATA and a second request reusing the table.
    let (a, b) = block.split_at(block.len() / 2);
    let mut payload = vec![3u8];
    payload.extend_from_slice(&[0, 0, 0, 0, 16]);
    payload.extend_from_slice(a);
    payload.extend_from_slice(&[0, 0, 0]);
    let mut split = PREFACE.to_vec();
    split.extend(&settings);
    split.extend(frame(1, 0x8 | 0x20, 1, &payload));
    split.extend(frame(9, 0x4, 1, b));
    split.extend(frame(0, 0x1, 1, &[0, 0, 0, 0, 0]));
    let second = enc.encode([
        (&b":method"[..], &b"POST"[..]),
        (b":authority", b"/run/lanyard/agent.sock"),
        (b":path", b"/SpiffeWorkloadAPI/FetchX509Bundles"),
    ]);
    split.extend(frame(1, 0x4 | 0x1, 3, &second));
    write(dir, "padded_priority_continuation", &split)?;

    write(dir, "preface_only", PREFACE)?;
    write(dir, "http1", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut stray = PREFACE.to_vec();
    stray.extend(frame(9, 0x4, 1, b));
    stray.extend(frame(1, 0, 1, a));
    stray.extend(frame(0, 0, 1, b"x"));
    write(dir, "continuation_errors", &stray)?;
    Ok(())
}

fn ca_cert(alg: &'static SignatureAlgorithm) -> Res<rustls_pki_types::CertificateDer<'static>> {
    let key = KeyPair::generate_for(alg)?;
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    Ok(p.self_signed(&key)?.der().clone())
}

fn bundle(dir: &Path) -> Res<()> {
    let td = TrustDomain::new("example.org")?;
    let p256 = ca_cert(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let p384 = ca_cert(&rcgen::PKCS_ECDSA_P384_SHA384)?;
    let ed = ca_cert(&rcgen::PKCS_ED25519)?;
    let one = SpiffeBundle::new(
        td.clone(),
        vec![p256.clone()],
        Some(1),
        Some(std::time::Duration::from_secs(300)),
    )?;
    write(dir, "jwks_p256", one.encode()?)?;
    let three = SpiffeBundle::new(td.clone(), vec![p256, p384, ed], None, None)?;
    let doc = three.encode()?;
    write(dir, "jwks_three", &doc)?;
    write(dir, "pem_three", three.to_pem())?;
    // A jwt-svid key next to the x509 one: skipped, as the specification asks.
    let mut v: serde_json::Value = serde_json::from_str(&one.encode()?)?;
    if let Some(keys) = v.get_mut("keys").and_then(|k| k.as_array_mut()) {
        keys.push(serde_json::json!({"use": "jwt-svid", "kty": "EC", "crv": "P-256", "kid": "k1", "x": "AA", "y": "AA"}));
    }
    write(dir, "jwks_with_jwt_key", serde_json::to_vec_pretty(&v)?)?;
    write(
        dir,
        "jwks_empty",
        r#"{"keys": [], "spiffe_sequence": 18446744073709551615}"#,
    )?;
    write(
        dir,
        "jwks_bad_x5c",
        r#"{"keys": [{"use": "x509-svid", "kty": "EC", "x5c": ["!!"]}]}"#,
    )?;
    Ok(())
}

fn policy(dir: &Path) -> Res<()> {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/lanyard.example.toml");
    write(dir, "example_toml", std::fs::read(example)?)?;
    write(dir, "minimal", "trust_domain = \"example.org\"\n")?;
    write(
        dir,
        "rules",
        r#"trust_domain = "example.org"
default_ttl = "5m"
max_cert_lifetime = "24h"
bundle_refresh_hint = "5m"
[[policy]]
spiffe_id = "spiffe://example.org/ns/prod/*"
roles = ["db-read", "deploy"]
max_ttl = "10m"
[[policy]]
spiffe_id = "spiffe://example.org/ns/prod/api"
roles = ["deploy"]
[[access]]
spiffe_id = "spiffe://example.org/ops/*"
roles = ["lanyard:admin"]
max_duration = "2h"
approvals = 2
[[access]]
spiffe_id = "spiffe://other.org/ops/alice"
roles = ["db-read"]
[[federation]]
trust_domain = "other.org"
bundle_endpoint_url = "https://other.org:8444/"
endpoint_spiffe_id = "spiffe://other.org/lanyard/server"
revocation_server = "ca.other.org:8443"
[[federation]]
trust_domain = "third.org"
bundle_endpoint_url = "https://bundles.third.org/"
profile = "https_web"
ca_file = "/etc/lanyard/third-roots.pem"
"#,
    )?;
    // Regression: 3 x this hint overflowed Duration (config::tests::refresh_hint_too_large_...).
    write(
        dir,
        "huge_refresh_hint",
        "trust_domain = \"example.org\"\nbundle_refresh_hint = \"7000000000000000000s\"\n",
    )?;
    write(
        dir,
        "bad_ttls",
        "trust_domain = \"example.org\"\nmin_ttl = \"10m\"\ndefault_ttl = \"5m\"\n[[policy]]\nspiffe_id = \"spiffe://example.org/lanyard/admin\"\n",
    )?;
    Ok(())
}

fn audit_record(dir: &Path) -> Res<()> {
    let mut chain = Vec::new();
    let mut prev = GENESIS_HASH;
    for (seq, kind) in [(1u64, "server_started"), (2, "issued"), (3, "denied")] {
        let mut r = AuditRecord {
            v: 1,
            seq,
            time_ms: 1_780_000_000_000 + seq as i64,
            kind: kind.into(),
            actor: "spiffe://example.org/lanyard/admin".into(),
            subject: "spiffe://example.org/ns/prod/api".into(),
            serial: "01ab".into(),
            roles: vec!["db-read".into(), "deploy".into()],
            not_after: 1_780_000_300,
            reason: "token:0011223344556677".into(),
            // The refusal of an unverified caller carries the identity it claimed.
            claimed: if kind == "denied" {
                "spiffe://example.org/ops/alice".into()
            } else {
                String::new()
            },
            prev_hash: prev,
            hash: [0; 32],
        };
        r.hash = compute_hash(&r);
        prev = r.hash;
        chain.push(r);
    }
    write(dir, "audit_record", serde_json::to_vec(&chain[0])?)?;
    // Regressions: the largest seq overflowed verify_chain; a signed "hex" hash was accepted.
    let mut last = chain[0].clone();
    last.seq = u64::MAX;
    write(dir, "seq_max", serde_json::to_vec(&last)?)?;
    let json = serde_json::to_string(&chain[0])?;
    let hash = lanyard::encoding::hex(&chain[0].prev_hash);
    write(
        dir,
        "signed_hex",
        json.replacen(&hash, &format!("+{}", &hash[1..]), 1),
    )?;
    let export: Vec<String> = chain
        .iter()
        .map(serde_json::to_string)
        .collect::<Result<_, _>>()?;
    write(dir, "audit_export", export.join("\n") + "\n")?;
    write(dir, "audit_export_mid_log", export[1..].join("\n\n"))?;
    let pb = lanyard::pb::v1::AuditEvent {
        seq: 2,
        time_ms: chain[1].time_ms,
        kind: chain[1].kind.clone(),
        actor: chain[1].actor.clone(),
        subject: chain[1].subject.clone(),
        serial: chain[1].serial.clone(),
        roles: chain[1].roles.clone(),
        not_after: chain[1].not_after,
        reason: chain[1].reason.clone(),
        claimed: chain[1].claimed.clone(),
        prev_hash: chain[1].prev_hash.to_vec(),
        hash: chain[1].hash.to_vec(),
    };
    write(dir, "audit_event_proto", pb.encode_to_vec())?;
    write(
        dir,
        "token",
        serde_json::to_vec(&TokenRecord {
            v: 1,
            id: "0011223344556677".into(),
            secret_hash: [3; 32],
            spiffe_id: "spiffe://example.org/ns/prod/*".into(),
            roles: vec!["deploy".into()],
            max_ttl: 600,
            expires_at: 1_780_003_600,
            uses_left: 1,
            created_by: "spiffe://example.org/lanyard/admin".into(),
            revoked: None,
        })?,
    )?;
    write(
        dir,
        "enrollment",
        serde_json::to_vec(&Enrollment {
            v: 1,
            spiffe_id: "spiffe://example.org/ns/prod/api".into(),
            roles: vec!["deploy".into()],
            max_ttl: 600,
            via: "0011223344556677".into(),
        })?,
    )?;
    write(
        dir,
        "issued",
        serde_json::to_vec(&IssuedRecord {
            v: 1,
            spiffe_id: "spiffe://example.org/ns/prod/api".into(),
            serial: "01ab".into(),
            roles: vec![],
            not_after: 1_780_000_300,
        })?,
    )?;
    write(
        dir,
        "revocation",
        serde_json::to_vec(&RevocationRecord {
            v: 1,
            rev: 9,
            serial: String::new(),
            spiffe_id: "spiffe://example.org/ns/prod/api".into(),
            identity_rule: true,
            before: 1_780_000_000,
            reason: "key compromise".into(),
            revoked_at: 1_780_000_000,
            expires_at: 1_780_090_000,
            blocked: true,
            renewable: false,
            origin: "other.org".into(),
        })?,
    )?;
    write(
        dir,
        "access",
        serde_json::to_vec(&AccessRecord {
            v: 1,
            id: "00112233".into(),
            spiffe_id: "spiffe://example.org/ops/alice".into(),
            roles: vec!["lanyard:admin".into()],
            duration_secs: 3600,
            reason: "INC-1".into(),
            requester: "spiffe://example.org/ops/alice".into(),
            created_at: 1_780_000_000,
            state: "granted".into(),
            approvals: vec![ApprovalRecord {
                approver: "spiffe://example.org/ops/bob".into(),
                comment: "ok".into(),
                at: 1_780_000_100,
            }],
            approvals_needed: 1,
            expires_at: 1_780_003_600,
            granted_at: 1_780_000_100,
            closed_by: String::new(),
            close_reason: String::new(),
            prune_at: 1_780_090_000,
        })?,
    )?;
    Ok(())
}

fn roles_der(dir: &Path) -> Res<()> {
    let roles = vec![
        "deploy".to_string(),
        "db-read".to_string(),
        "lanyard:admin".to_string(),
    ];
    let der = encode_roles(&roles);
    write(dir, "decode_roles", prefixed(0, &der))?;
    write(dir, "decode_empty", prefixed(0, &[0x30, 0x00]))?;
    write(
        dir,
        "decode_long_len",
        prefixed(0, &[0x30, 0x81, 0x03, 0x0c, 0x01, b'a']),
    )?;
    write(
        dir,
        "encode_list",
        prefixed(1, b"deploy,db-read,deploy,a:b"),
    )?;
    // A leaf like the CA issues: one URI SAN, roles at the default OID.
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![uri("spiffe://example.org/ns/prod/api")?];
    let oid: Vec<u64> = RolesOid::default().arcs().to_vec();
    p.custom_extensions = vec![CustomExtension::from_oid_content(&oid, der)];
    write(dir, "svid", prefixed(2, p.self_signed(&key)?.der()))?;
    write(dir, "oid", prefixed(3, b"1.3.9999.7781.1"))?;
    write(dir, "serial", prefixed(3, b"01:AB:cd:00"))?;
    Ok(())
}

/// A token, a JWKS and a template per seed (see `fuzz_targets/jwt.rs`).
fn jwt(dir: &Path) -> Res<()> {
    // base64url without padding, by hand: the fuzz crate has no base64 dependency.
    let b64 = |v: &str| -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in v.as_bytes().chunks(3) {
            let n = chunk.iter().fold(0u32, |acc, b| acc << 8 | u32::from(*b))
                << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    };
    let k8s = r#"{"iss":"https://issuer","aud":["lanyard"],"exp":600,"iat":0,"kubernetes.io":{"namespace":"prod","pod":{"name":"web-1","uid":"u1"},"serviceaccount":{"name":"web"}}}"#;
    let gh = r#"{"iss":"https://issuer","aud":"lanyard","exp":600,"iat":0,"repository":"octo-org/app","ref":"refs/heads/main","sub":"x"}"#;
    let jwks = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","x":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA","y":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"},{"kty":"RSA","kid":"r1","n":"AQAB","e":"AQAB"}]}"#;
    let token = |h: &str, c: &str| format!("{}.{}.AAAA", b64(h), b64(c));
    write(
        dir,
        "kubernetes",
        format!(
            "{}\n{jwks}\nns/{{namespace}}/sa/{{serviceaccount}}",
            token(r#"{"alg":"ES256","kid":"k1"}"#, k8s)
        ),
    )?;
    write(
        dir,
        "github",
        format!(
            "{}\n{jwks}\ngh/{{repository}}/{{ref}}",
            token(r#"{"alg":"RS256","kid":"r1"}"#, gh)
        ),
    )?;
    write(
        dir,
        "none",
        format!("{}\n{jwks}\nu/{{sub}}", token(r#"{"alg":"none"}"#, gh)),
    )?;
    Ok(())
}
