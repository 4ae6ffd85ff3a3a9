//! Verified claims → a SPIFFE ID path. A template such as `ns/{namespace}/sa/{serviceaccount}`
//! names claims in braces; every value is checked, never cleaned: a value that would make an
//! invalid or ambiguous path segment (empty, `.`, `..`, a `/`, `%`, uppercase, anything outside
//! `[a-z0-9._-]`) refuses the token. A `{x}` stands for exactly one segment. Only the github
//! kind's `repository` (exactly `owner/name`) and `ref` (e.g. `refs/heads/main`) may span
//! several segments, each checked the same way, because their slashes are part of what they
//! name on GitHub.

use serde_json::{Map, Value};

/// Longest value of one placeholder, in bytes.
const MAX_VALUE_BYTES: usize = 255;

/// Which claim shape an attestor reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Kubernetes projected service-account tokens (`kubernetes.io` claims).
    Kubernetes,
    /// GitHub Actions OIDC tokens.
    Github,
    /// Any issuer; templates name claims directly (`{sub}`, `{a.b}`).
    Jwt,
}

impl Kind {
    /// Parses the config's `kind`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "kubernetes" => Some(Self::Kubernetes),
            "github" => Some(Self::Github),
            "jwt" => Some(Self::Jwt),
            _ => None,
        }
    }

    /// The config name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kubernetes => "kubernetes",
            Self::Github => "github",
            Self::Jwt => "jwt",
        }
    }

    /// The default `id_template`, if the kind has one.
    pub fn default_template(self) -> Option<&'static str> {
        match self {
            Self::Kubernetes => Some("ns/{namespace}/sa/{serviceaccount}"),
            Self::Github => Some("gh/{repository}/{ref}"),
            Self::Jwt => None,
        }
    }

    /// Claims recorded in the audit event besides the template's own: what identifies the
    /// workload instance (pod, workflow run) without being part of its identity.
    fn audit_extras(self) -> &'static [&'static str] {
        match self {
            Self::Kubernetes => &["pod", "pod_uid", "serviceaccount_uid", "node"],
            Self::Github => &["workflow", "job_workflow_ref", "sha", "run_id", "actor"],
            Self::Jwt => &["sub"],
        }
    }

    /// Whether `name` may span several path segments.
    fn multi_segment(self, name: &str) -> bool {
        self == Self::Github && matches!(name, "repository" | "ref")
    }

    /// The claim path an alias stands for in this kind's claim shape.
    fn alias(self, name: &str) -> Option<&'static [&'static str]> {
        let k8s = |p: &'static [&'static str]| Some(p);
        match (self, name) {
            (Self::Kubernetes, "namespace") => k8s(&["kubernetes.io", "namespace"]),
            (Self::Kubernetes, "serviceaccount") => {
                k8s(&["kubernetes.io", "serviceaccount", "name"])
            }
            (Self::Kubernetes, "serviceaccount_uid") => {
                k8s(&["kubernetes.io", "serviceaccount", "uid"])
            }
            (Self::Kubernetes, "pod") => k8s(&["kubernetes.io", "pod", "name"]),
            (Self::Kubernetes, "pod_uid") => k8s(&["kubernetes.io", "pod", "uid"]),
            (Self::Kubernetes, "node") => k8s(&["kubernetes.io", "node", "name"]),
            _ => None,
        }
    }
}

/// Why claims could not make an ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MappingError {
    /// The template itself is unusable (config time).
    #[error("id_template {0:?}: {1}")]
    Template(String, String),
    /// A claim the template names is absent or not a string/integer.
    #[error("the token has no string claim {0:?}, which id_template needs")]
    MissingClaim(String),
    /// A claim value would make an invalid or ambiguous path segment.
    #[error(
        "claim {0:?} = {1:?} cannot be part of a SPIFFE ID: {2} (values are refused, never rewritten)"
    )]
    BadValue(String, String, String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Claim(String),
}

/// A parsed `id_template`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    pieces: Vec<Piece>,
}

impl Template {
    /// Parses a template relative to `spiffe://<td>/`: literal text in `[a-z0-9._/-]`, claims
    /// in braces (`{name}`, `{a.b}`), no empty segment.
    pub fn parse(s: &str) -> Result<Self, MappingError> {
        let bad = |m: &str| MappingError::Template(s.to_string(), m.to_string());
        let mut pieces = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('{') {
                let end = after.find('}').ok_or_else(|| bad("an unclosed '{'"))?;
                let name = &after[..end];
                if name.is_empty()
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
                {
                    return Err(bad("a claim name must be letters, digits, '_', '-' or '.'"));
                }
                pieces.push(Piece::Claim(name.to_string()));
                rest = &after[end + 1..];
            } else {
                let end = rest.find('{').unwrap_or(rest.len());
                let text = &rest[..end];
                if text.contains('}')
                    || !text.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b)
                    })
                {
                    return Err(bad(
                        "literal text must be lowercase letters, digits, '.', '_', '-' and '/'",
                    ));
                }
                pieces.push(Piece::Text(text.to_string()));
                rest = &rest[end..];
            }
        }
        let shape: String = pieces
            .iter()
            .map(|p| match p {
                Piece::Text(t) => t.as_str(),
                Piece::Claim(_) => "x",
            })
            .collect();
        if shape.is_empty()
            || shape.starts_with('/')
            || shape.ends_with('/')
            || shape
                .split('/')
                .any(|seg| seg.is_empty() || seg == "." || seg == "..")
        {
            return Err(bad(
                "must be a relative path of non-empty segments, e.g. ns/{namespace}/sa/{serviceaccount}",
            ));
        }
        if !pieces.iter().any(|p| matches!(p, Piece::Claim(_))) {
            return Err(bad("names no claim, so every token would get the same ID"));
        }
        Ok(Self {
            source: s.to_string(),
            pieces,
        })
    }

    /// The template text.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Renders the path from verified `claims`; also returns the `name=value` pairs that made
    /// it, plus the kind's audit extras, for the audit event.
    pub fn render(
        &self,
        kind: Kind,
        claims: &Map<String, Value>,
    ) -> Result<(String, Vec<(String, String)>), MappingError> {
        let mut path = String::new();
        let mut used: Vec<(String, String)> = Vec::new();
        for p in &self.pieces {
            match p {
                Piece::Text(t) => path.push_str(t),
                Piece::Claim(name) => {
                    let value = lookup(kind, claims, name)
                        .ok_or_else(|| MappingError::MissingClaim(name.clone()))?;
                    check_value(kind, name, &value)?;
                    path.push_str(&value);
                    used.push((name.clone(), value));
                }
            }
        }
        for extra in kind.audit_extras() {
            if !used.iter().any(|(n, _)| n == extra)
                && let Some(v) = lookup(kind, claims, extra)
            {
                used.push((
                    (*extra).to_string(),
                    v.chars().take(MAX_VALUE_BYTES).collect(),
                ));
            }
        }
        Ok((path, used))
    }
}

/// A claim's value as text: an alias of the kind, else a dotted path (`a.b`, where a key may
/// itself contain dots, as `kubernetes.io` does).
fn lookup(kind: Kind, claims: &Map<String, Value>, name: &str) -> Option<String> {
    let found = match kind.alias(name) {
        Some(path) => {
            let mut v = claims.get(path[0])?;
            for key in &path[1..] {
                v = v.get(*key)?;
            }
            Some(v)
        }
        None => dotted(claims, name),
    }?;
    match found {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) if n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

fn dotted<'a>(obj: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(v) = obj.get(path) {
        return Some(v);
    }
    // Try every split point: `kubernetes.io.namespace` is key `kubernetes.io`, then `namespace`.
    path.match_indices('.').find_map(|(i, _)| {
        let inner = obj.get(&path[..i])?.as_object()?;
        dotted(inner, &path[i + 1..])
    })
}

fn check_value(kind: Kind, name: &str, value: &str) -> Result<(), MappingError> {
    let bad =
        |why: &str| MappingError::BadValue(name.to_string(), value.to_string(), why.to_string());
    if value.len() > MAX_VALUE_BYTES {
        return Err(bad("longer than 255 bytes"));
    }
    let segments: Vec<&str> = if kind.multi_segment(name) {
        value.split('/').collect()
    } else {
        if value.contains('/') {
            return Err(bad("it contains '/', which would add path segments"));
        }
        vec![value]
    };
    if kind == Kind::Github && name == "repository" && segments.len() != 2 {
        return Err(bad("a repository must be exactly owner/name"));
    }
    for seg in segments {
        if seg.is_empty() {
            return Err(bad("it is empty or has an empty segment"));
        }
        if seg == "." || seg == ".." {
            return Err(bad("'.' and '..' are not path segments"));
        }
        if seg.contains('%') {
            return Err(bad("percent-encoding is not allowed"));
        }
        if seg.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(bad(
                "uppercase letters are not allowed (IDs are compared exactly; lowercasing could merge two names)",
            ));
        }
        if !seg.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        }) {
            return Err(bad("only a-z, 0-9, '.', '-' and '_' are allowed"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k8s_claims() -> Map<String, Value> {
        serde_json::json!({
            "iss": "https://kubernetes.default.svc.cluster.local",
            "sub": "system:serviceaccount:prod:web",
            "kubernetes.io": {
                "namespace": "prod",
                "pod": {"name": "web-7d9f", "uid": "1b2c"},
                "serviceaccount": {"name": "web", "uid": "9f8e"},
            },
        })
        .as_object()
        .unwrap()
        .clone()
    }

    #[test]
    fn kubernetes_default_template_and_audit_claims() {
        let t = Template::parse(Kind::Kubernetes.default_template().unwrap()).unwrap();
        let (path, used) = t.render(Kind::Kubernetes, &k8s_claims()).unwrap();
        assert_eq!(path, "ns/prod/sa/web");
        assert!(used.contains(&("pod_uid".into(), "1b2c".into())));
        // The generic dotted form reaches the same claim.
        let t = Template::parse("k/{kubernetes.io.namespace}/{kubernetes.io.pod.name}").unwrap();
        assert_eq!(
            t.render(Kind::Jwt, &k8s_claims()).unwrap().0,
            "k/prod/web-7d9f"
        );
    }

    #[test]
    fn github_refs_span_segments_everything_else_is_one() {
        let claims = serde_json::json!({"repository": "octo-org/app", "ref": "refs/heads/feature/x", "workflow": "ci"});
        let claims = claims.as_object().unwrap();
        let t = Template::parse("gh/{repository}/{ref}").unwrap();
        let (path, used) = t.render(Kind::Github, claims).unwrap();
        assert_eq!(path, "gh/octo-org/app/refs/heads/feature/x");
        assert!(used.contains(&("workflow".into(), "ci".into())));
        // The same claim in a generic template is one segment: its slash is refused.
        assert!(matches!(
            t.render(Kind::Jwt, claims),
            Err(MappingError::BadValue(..))
        ));
    }

    #[test]
    fn bad_values_are_refused_not_cleaned() {
        let t = Template::parse("u/{sub}").unwrap();
        for bad in [
            "",
            "..",
            ".",
            "a/b",
            "A",
            "a%2fb",
            "a b",
            "é",
            &"a".repeat(256),
        ] {
            let claims = serde_json::json!({ "sub": bad });
            assert!(
                matches!(
                    t.render(Kind::Jwt, claims.as_object().unwrap()),
                    Err(MappingError::BadValue(..))
                ),
                "{bad:?}"
            );
        }
        let claims = serde_json::json!({"sub": true});
        assert!(matches!(
            t.render(Kind::Jwt, claims.as_object().unwrap()),
            Err(MappingError::MissingClaim(_))
        ));
        let gh = Template::parse("gh/{repository}/{ref}").unwrap();
        for (repo, r) in [
            ("a/b/c", "refs/heads/x"),
            ("a/b", "refs//x"),
            ("a/b", "refs/heads/../x"),
        ] {
            let claims = serde_json::json!({"repository": repo, "ref": r});
            assert!(
                gh.render(Kind::Github, claims.as_object().unwrap())
                    .is_err(),
                "{repo} {r}"
            );
        }
    }

    #[test]
    fn templates_are_checked_at_load() {
        for bad in [
            "",
            "/x/{a}",
            "x/{a}/",
            "x//{a}",
            "x/{a",
            "X/{a}",
            "static/path",
            "x/../{a}",
            "{}",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad:?}");
        }
        Template::parse("svc-{sub}.v1/x").unwrap();
    }
}
