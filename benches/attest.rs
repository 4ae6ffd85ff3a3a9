//! Attestation cost: what `Attestors::attest` (JWS verification, claim checks, template
//! rendering, token hash) costs per token, for ES256 and RS256 tokens minted by PyJWT through
//! `scripts/oidc-issuer.py`, with keys from a `jwks_file`. No network, no store: the rest of an
//! attested issuance (CSR check, policy, signing, the audit commit) is what `benches/issue.rs`
//! measures for the token path.
//!
//! Knob: `LANYARD_BENCH_ATTESTS` calls per algorithm (default 20000). Needs python3 with PyJWT
//! and cryptography. Run: `cargo bench --bench attest`. It prints figures and asserts nothing.
#![expect(clippy::print_stdout, reason = "a benchmark prints its figures")]

use std::error::Error;
use std::process::Command;
use std::time::{Duration, Instant};

use lanyard::attest::{AttestorSpec, Attestors, resolve_all};
use lanyard::spiffe::TrustDomain;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/oidc-issuer.py");

fn py(args: &[&str]) -> Result<String, Box<dyn Error>> {
    let out = Command::new("python3").arg(SCRIPT).args(args).output()?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned().into());
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    let n: u32 = std::env::var("LANYARD_BENCH_ATTESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let dir = tempfile::tempdir()?;
    let d = dir.path().to_str().ok_or("temp path")?;
    // `mint` builds `iss` from the port file `serve` would write; no server is needed here.
    std::fs::write(dir.path().join("port"), "1")?;
    py(&[
        "key", "--dir", d, "--issuer", "b", "--kid", "es", "--alg", "ES256",
    ])?;
    py(&[
        "key", "--dir", d, "--issuer", "b", "--kid", "rs", "--alg", "RS256",
    ])?;
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, py(&["jwks", "--dir", d, "--issuer", "b"])?)?;
    let spec = AttestorSpec {
        name: "bench".into(),
        kind: "kubernetes".into(),
        issuer: "https://127.0.0.1:1/b".into(),
        audiences: vec!["lanyard".into()],
        jwks_file: Some(jwks),
        ca_file: None,
        refresh: None,
        algorithms: None,
        max_token_age: None,
        skew: None,
        id_template: None,
        roles: vec![],
        max_ttl: None,
    };
    let configs = resolve_all(&[spec], Duration::from_secs(3600))?;
    let attestors = Attestors::new(configs, TrustDomain::new("example.org")?);
    println!("attestation: {n} calls per algorithm (verify + claims + template + sha256)");
    for kid in ["es", "rs"] {
        let token = py(&[
            "mint", "--dir", d, "--issuer", "b", "--kid", kid, "--k8s", "prod/web", "--ttl", "3600",
        ])?;
        let now = lanyard::tls::unix_now();
        // The first call loads the JWKS (unknown kid) and checks the token is good.
        let first = attestors.attest(&token, now).await?;
        let started = Instant::now();
        for _ in 0..n {
            attestors.attest(&token, now).await?;
        }
        let per = started.elapsed() / n;
        println!(
            "  {}: {:>7.1} µs/token ({:>6.0}/s on one core), id {}",
            if kid == "es" {
                "ES256"
            } else {
                "RS256 (2048-bit)"
            },
            per.as_secs_f64() * 1e6,
            1.0 / per.as_secs_f64(),
            first.spiffe_id
        );
    }
    Ok(())
}
