//! JWS compact verification for attestation: our own ~300 lines over `ring` rather than a JWT
//! crate, because the whole job is narrow (two algorithms, public keys only, one claim set) and
//! every refusal must be explicit: `none`, every HS*, any algorithm the attestor does not list,
//! a JWK whose `kty`/`crv`/`alg`/`use` disagree with the header, `crit` headers. Keys come only
//! from the attestor's JWKS; `jku`, `x5u` and `jwk` headers are never followed.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde_json::{Map, Value};

/// Largest JWT accepted, in bytes. Kubernetes and GitHub tokens are 1–2 KiB.
pub const MAX_JWT_BYTES: usize = 16 * 1024;
/// Largest JWKS document accepted, in bytes.
pub const MAX_JWKS_BYTES: usize = 64 * 1024;

/// Why a token was refused. Every variant is an authentication failure (`Unauthenticated`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// Not three base64url parts of JSON, or over the size limit.
    #[error("the JWT is malformed: {0}")]
    Malformed(String),
    /// The header names an algorithm this attestor does not accept (`none`, HS*, or unlisted).
    #[error("the JWT algorithm {0:?} is not accepted (allowed: {1})")]
    Algorithm(String, String),
    /// The header marks an extension critical; none is understood.
    #[error("the JWT header has a crit parameter; no critical extension is supported")]
    Critical,
    /// No key in the issuer's JWKS has this `kid` (or, without a kid, no single key fits).
    #[error("no key with kid {0:?} in the issuer's JWKS")]
    UnknownKey(String),
    /// The key exists but its type, curve, `alg` or `use` does not fit the header's algorithm.
    #[error("the key {0:?} cannot verify {1}: {2}")]
    KeyMismatch(String, String, String),
    /// The signature does not verify.
    #[error("the JWT signature does not verify")]
    BadSignature,
    /// `iss` is missing or not the attestor's issuer.
    #[error("the JWT issuer {0:?} is not {1:?}")]
    Issuer(String, String),
    /// No `aud` value is one of the accepted audiences.
    #[error("the JWT audience {0} is not one of the accepted audiences [{1}]")]
    Audience(String, String),
    /// A required time claim is missing or not a number.
    #[error("the JWT has no numeric {0} claim")]
    MissingTime(&'static str),
    /// `exp` is past (beyond the skew).
    #[error("the JWT expired at {0} (now {1}); present a fresh token")]
    Expired(i64, i64),
    /// `nbf` (or `iat`) is in the future (beyond the skew).
    #[error("the JWT is not valid before {0} (now {1}); check the clocks")]
    NotYetValid(i64, i64),
    /// `iat` is older than the attestor's `max_token_age`.
    #[error("the JWT was issued at {0}, more than {1}s ago (max_token_age); present a fresh token")]
    TooOld(i64, u64),
}

/// A signature algorithm an attestor may accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    /// RSASSA-PKCS1-v1_5 with SHA-256, 2048–8192-bit keys.
    Rs256,
    /// ECDSA P-256 with SHA-256, fixed-size `r || s` signature.
    Es256,
}

impl Alg {
    /// Parses a JOSE algorithm name; only RS256 and ES256 exist here.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "RS256" => Some(Self::Rs256),
            "ES256" => Some(Self::Es256),
            _ => None,
        }
    }

    /// The JOSE name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Es256 => "ES256",
        }
    }
}

/// What a token must satisfy besides its signature.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Exact `iss`.
    pub issuer: String,
    /// Accepted `aud` values (one match suffices).
    pub audiences: Vec<String>,
    /// Algorithms accepted.
    pub algorithms: Vec<Alg>,
    /// Longest time since `iat`, seconds.
    pub max_age: u64,
    /// Clock skew allowed on every time check, seconds.
    pub skew: u64,
}

/// A token split and decoded, signature not yet checked.
#[derive(Debug, Clone)]
pub struct Unverified {
    /// The header's `alg`.
    pub alg: String,
    /// The header's `kid`, if any.
    pub kid: Option<String>,
    /// The claims.
    pub claims: Map<String, Value>,
    signing_input: Vec<u8>,
    signature: Vec<u8>,
}

impl Unverified {
    /// Splits and decodes a compact JWS (size-checked first); checks nothing else.
    pub fn parse(token: &str) -> Result<Self, JwtError> {
        let token = token.trim();
        if token.len() > MAX_JWT_BYTES {
            return Err(JwtError::Malformed(format!(
                "{} bytes; the limit is {MAX_JWT_BYTES}",
                token.len()
            )));
        }
        let parts: Vec<&str> = token.split('.').collect();
        let [h, c, s] = parts.as_slice() else {
            return Err(JwtError::Malformed(format!(
                "{} dot-separated parts; a signed JWT has 3",
                parts.len()
            )));
        };
        let header = json_object(h, "header")?;
        let claims = json_object(c, "claims")?;
        let signature = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| JwtError::Malformed("the signature is not base64url".into()))?;
        if header.contains_key("crit") {
            return Err(JwtError::Critical);
        }
        let alg = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or_else(|| JwtError::Malformed("the header has no alg".into()))?
            .to_string();
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.clone()),
            Some(_) => {
                return Err(JwtError::Malformed(
                    "the header's kid is not a string".into(),
                ));
            }
        };
        Ok(Self {
            alg,
            kid,
            claims,
            signing_input: format!("{h}.{c}").into_bytes(),
            signature,
        })
    }

    /// The unverified `iss`, to pick the attestor; never trusted before [`Self::verify`].
    pub fn issuer(&self) -> Option<&str> {
        self.claims.get("iss").and_then(Value::as_str)
    }

    /// Checks the algorithm, the signature with a key from `jwks`, then the claims at `now`.
    pub fn verify(
        self,
        jwks: &[Jwk],
        rules: &Rules,
        now: i64,
    ) -> Result<Map<String, Value>, JwtError> {
        let allowed = || {
            rules
                .algorithms
                .iter()
                .map(|a| a.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        // `none` and HS* never parse; anything else must also be configured.
        let alg = Alg::parse(&self.alg)
            .filter(|a| rules.algorithms.contains(a))
            .ok_or_else(|| JwtError::Algorithm(self.alg.clone(), allowed()))?;
        let key = select_key(jwks, self.kid.as_deref(), alg)?;
        key.verify(alg, &self.signing_input, &self.signature)?;
        check_claims(&self.claims, rules, now)?;
        Ok(self.claims)
    }
}

fn json_object(part: &str, what: &str) -> Result<Map<String, Value>, JwtError> {
    let raw = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Malformed(format!("the {what} is not base64url")))?;
    match serde_json::from_slice(&raw) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(JwtError::Malformed(format!(
            "the {what} is not a JSON object"
        ))),
    }
}

/// The key for `kid`; without a kid, the only key that fits `alg`.
fn select_key<'a>(jwks: &'a [Jwk], kid: Option<&str>, alg: Alg) -> Result<&'a Jwk, JwtError> {
    match kid {
        Some(kid) => jwks
            .iter()
            .find(|k| k.kid.as_deref() == Some(kid))
            .ok_or_else(|| JwtError::UnknownKey(kid.to_string())),
        None => {
            let fitting: Vec<&Jwk> = jwks.iter().filter(|k| k.fits(alg).is_ok()).collect();
            match fitting.as_slice() {
                [one] => Ok(one),
                _ => Err(JwtError::UnknownKey(String::new())),
            }
        }
    }
}

fn check_claims(claims: &Map<String, Value>, rules: &Rules, now: i64) -> Result<(), JwtError> {
    let iss = claims
        .get("iss")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if iss != rules.issuer {
        return Err(JwtError::Issuer(iss.to_string(), rules.issuer.clone()));
    }
    let auds: Vec<&str> = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.as_str()],
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    if !auds.iter().any(|a| rules.audiences.iter().any(|r| r == a)) {
        return Err(JwtError::Audience(
            format!("{auds:?}"),
            rules.audiences.join(", "),
        ));
    }
    let skew = rules.skew as i64;
    let exp = numeric(claims, "exp")?.ok_or(JwtError::MissingTime("exp"))?;
    if now > exp.saturating_add(skew) {
        return Err(JwtError::Expired(exp, now));
    }
    if let Some(nbf) = numeric(claims, "nbf")?
        && nbf > now.saturating_add(skew)
    {
        return Err(JwtError::NotYetValid(nbf, now));
    }
    let iat = numeric(claims, "iat")?.ok_or(JwtError::MissingTime("iat"))?;
    if iat > now.saturating_add(skew) {
        return Err(JwtError::NotYetValid(iat, now));
    }
    if now.saturating_sub(iat) > (rules.max_age as i64).saturating_add(skew) {
        return Err(JwtError::TooOld(iat, rules.max_age));
    }
    Ok(())
}

/// A NumericDate claim (RFC 7519 allows fractions; they are truncated).
fn numeric(claims: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_i64()
            .or_else(|| v.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
            .map(Some)
            .ok_or(JwtError::MissingTime(name)),
    }
}

/// One public key from a JWKS, decoded.
#[derive(Debug, Clone)]
pub struct Jwk {
    /// `kid`.
    pub kid: Option<String>,
    /// `alg`, if the JWK pins one.
    alg: Option<String>,
    /// `use`, if present.
    use_: Option<String>,
    material: Material,
}

#[derive(Debug, Clone)]
enum Material {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// Uncompressed SEC1 point, 65 bytes.
    P256(Vec<u8>),
    /// A key type or curve Lanyard does not verify with; kept so its kid is known.
    Other(String),
}

impl Jwk {
    /// Whether this key may verify `alg`; `Err` says why not.
    fn fits(&self, alg: Alg) -> Result<(), String> {
        if let Some(a) = &self.alg
            && a != alg.as_str()
        {
            return Err(format!("the key is for {a}"));
        }
        if let Some(u) = &self.use_
            && u != "sig"
        {
            return Err(format!("the key's use is {u:?}, not \"sig\""));
        }
        match (&self.material, alg) {
            (Material::Rsa { .. }, Alg::Rs256) | (Material::P256(_), Alg::Es256) => Ok(()),
            (Material::Rsa { .. }, _) => Err("the key is an RSA key".into()),
            (Material::P256(_), _) => Err("the key is an EC P-256 key".into()),
            (Material::Other(t), _) => Err(format!("the key type {t} is not supported")),
        }
    }

    fn verify(&self, alg: Alg, input: &[u8], sig: &[u8]) -> Result<(), JwtError> {
        self.fits(alg).map_err(|why| {
            JwtError::KeyMismatch(
                self.kid.clone().unwrap_or_default(),
                alg.as_str().into(),
                why,
            )
        })?;
        let ok = match &self.material {
            Material::Rsa { n, e } => RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, input, sig)
                .is_ok(),
            Material::P256(point) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(input, sig)
                    .is_ok()
            }
            Material::Other(_) => false,
        };
        if ok {
            Ok(())
        } else {
            Err(JwtError::BadSignature)
        }
    }
}

/// Parses a JWKS document. Keys of unsupported types are kept (so their kid is "known" and
/// does not trigger refreshes) but never verify; a malformed RSA or EC key fails the document.
pub fn parse_jwks(doc: &[u8]) -> Result<Vec<Jwk>, String> {
    if doc.len() > MAX_JWKS_BYTES {
        return Err(format!("the JWKS is over {MAX_JWKS_BYTES} bytes"));
    }
    let v: Value = serde_json::from_slice(doc).map_err(|e| format!("the JWKS is not JSON: {e}"))?;
    let keys = v
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("the JWKS has no \"keys\" array")?;
    keys.iter().map(parse_jwk).collect()
}

fn parse_jwk(k: &Value) -> Result<Jwk, String> {
    let s = |name: &str| k.get(name).and_then(Value::as_str).map(str::to_string);
    let b = |name: &str| -> Result<Vec<u8>, String> {
        let v = s(name).ok_or_else(|| format!("a JWK has no {name}"))?;
        URL_SAFE_NO_PAD
            .decode(v)
            .map_err(|_| format!("a JWK's {name} is not base64url"))
    };
    let kty = s("kty").ok_or("a JWK has no kty")?;
    let material = match kty.as_str() {
        "RSA" => Material::Rsa {
            n: b("n")?,
            e: b("e")?,
        },
        "EC" if s("crv").as_deref() == Some("P-256") => {
            let (x, y) = (b("x")?, b("y")?);
            if x.len() != 32 || y.len() != 32 {
                return Err("a P-256 JWK's x and y must be 32 bytes each".into());
            }
            let mut point = vec![4u8];
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            Material::P256(point)
        }
        "EC" => Material::Other(format!("EC {}", s("crv").unwrap_or_default())),
        other => Material::Other(other.to_string()),
    };
    Ok(Jwk {
        kid: s("kid"),
        alg: s("alg"),
        use_: s("use"),
        material,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    }

    fn rules() -> Rules {
        Rules {
            issuer: "https://iss".into(),
            audiences: vec!["lanyard".into()],
            algorithms: vec![Alg::Rs256, Alg::Es256],
            max_age: 3600,
            skew: 30,
        }
    }

    /// An ES256 key pair made with ring, its JWK, and a signer.
    fn es256() -> (ring::signature::EcdsaKeyPair, Vec<Jwk>) {
        use ring::signature::KeyPair;
        let rng = ring::rand::SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let kp = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
        let pt = kp.public_key().as_ref();
        let jwk = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1",
            "x": URL_SAFE_NO_PAD.encode(&pt[1..33]), "y": URL_SAFE_NO_PAD.encode(&pt[33..])}]});
        (kp, parse_jwks(jwk.to_string().as_bytes()).unwrap())
    }

    fn sign(kp: &ring::signature::EcdsaKeyPair, header: &Value, claims: &Value) -> String {
        let input = format!("{}.{}", b64(header), b64(claims));
        let sig = kp
            .sign(&ring::rand::SystemRandom::new(), input.as_bytes())
            .unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }

    #[test]
    fn es256_verifies_and_every_claim_is_checked() {
        let (kp, keys) = es256();
        let now = 1_000_000;
        let h = serde_json::json!({"alg": "ES256", "kid": "k1"});
        let good = serde_json::json!({"iss": "https://iss", "aud": ["x", "lanyard"], "exp": now + 60, "iat": now - 10, "sub": "s"});
        let t = sign(&kp, &h, &good);
        let claims = Unverified::parse(&t)
            .unwrap()
            .verify(&keys, &rules(), now)
            .unwrap();
        assert_eq!(claims["sub"], "s");
        let check = |claims: Value| {
            Unverified::parse(&sign(&kp, &h, &claims))
                .unwrap()
                .verify(&keys, &rules(), now)
                .unwrap_err()
        };
        let mut c = good.clone();
        c["aud"] = "other".into();
        assert!(matches!(check(c), JwtError::Audience(..)));
        let mut c = good.clone();
        c["exp"] = (now - 31).into();
        assert!(matches!(check(c), JwtError::Expired(..)));
        let mut c = good.clone();
        c["nbf"] = (now + 31).into();
        assert!(matches!(check(c), JwtError::NotYetValid(..)));
        let mut c = good.clone();
        c["iat"] = (now - 3631).into();
        assert!(matches!(check(c), JwtError::TooOld(..)));
        let mut c = good.clone();
        c["iss"] = "https://evil".into();
        assert!(matches!(check(c), JwtError::Issuer(..)));
        let mut c = good.clone();
        c.as_object_mut().unwrap().remove("iat");
        assert!(matches!(check(c), JwtError::MissingTime("iat")));
        // Tampered claims, same signature.
        let mut parts: Vec<String> = t.split('.').map(str::to_string).collect();
        let mut c = good.clone();
        c["sub"] = "t".into();
        parts[1] = b64(&c);
        let forged = parts.join(".");
        assert_eq!(
            Unverified::parse(&forged)
                .unwrap()
                .verify(&keys, &rules(), now)
                .unwrap_err(),
            JwtError::BadSignature
        );
    }

    #[test]
    fn algorithm_and_key_confusion_are_refused() {
        let (kp, keys) = es256();
        let claims =
            serde_json::json!({"iss": "https://iss", "aud": "lanyard", "exp": 100, "iat": 1});
        for alg in ["none", "HS256", "RS384", "ES384"] {
            let t = sign(&kp, &serde_json::json!({"alg": alg, "kid": "k1"}), &claims);
            assert!(matches!(
                Unverified::parse(&t).unwrap().verify(&keys, &rules(), 50),
                Err(JwtError::Algorithm(..))
            ));
        }
        // RS256 named in the header with an EC key.
        let t = sign(
            &kp,
            &serde_json::json!({"alg": "RS256", "kid": "k1"}),
            &claims,
        );
        assert!(matches!(
            Unverified::parse(&t).unwrap().verify(&keys, &rules(), 50),
            Err(JwtError::KeyMismatch(..))
        ));
        // ES256 not configured.
        let mut r = rules();
        r.algorithms = vec![Alg::Rs256];
        let t = sign(
            &kp,
            &serde_json::json!({"alg": "ES256", "kid": "k1"}),
            &claims,
        );
        assert!(matches!(
            Unverified::parse(&t).unwrap().verify(&keys, &r, 50),
            Err(JwtError::Algorithm(..))
        ));
        let t = sign(
            &kp,
            &serde_json::json!({"alg": "ES256", "kid": "k2"}),
            &claims,
        );
        assert!(matches!(
            Unverified::parse(&t).unwrap().verify(&keys, &rules(), 50),
            Err(JwtError::UnknownKey(..))
        ));
        let t = sign(
            &kp,
            &serde_json::json!({"alg": "ES256", "crit": ["x"]}),
            &claims,
        );
        assert_eq!(Unverified::parse(&t).unwrap_err(), JwtError::Critical);
        for bad in ["a.b", "a.b.c.d", "", "!!.e30.AA"] {
            assert!(
                matches!(Unverified::parse(bad), Err(JwtError::Malformed(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            Unverified::parse(&"a".repeat(MAX_JWT_BYTES + 1)),
            Err(JwtError::Malformed(_))
        ));
    }
}
