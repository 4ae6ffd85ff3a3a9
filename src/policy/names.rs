//! Which DNS and IP names a rule lets a certificate carry.
//!
//! A rule's `dns` entries are exact names, `*.suffix` (exactly one more label in front of the
//! suffix, as RFC 6125 wildcards match; the CSR asks for each concrete name, never for the
//! wildcard itself), or templates such as `{sa}.{ns}.svc.cluster.local`. Template variables are
//! bound by the rule's `id_pattern`, a path template such as `/ns/{ns}/sa/{sa}`: the ID's path
//! must have the same number of segments, literal segments must be equal, and each `{var}`
//! takes its whole segment. A value that is not a valid DNS label (it holds `.`, `_`, or is
//! longer than 63 characters) makes the template allow nothing for that ID, rather than being
//! cleaned into some other name. `ip` entries are addresses or CIDR blocks (`10.0.0.0/8`).

use std::fmt;
use std::net::IpAddr;

use crate::ca::{NameError, SanNames, normalize_dns, parse_ip};
use crate::spiffe::SpiffeId;

/// The names one rule allows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameRules {
    dns: Vec<DnsRule>,
    ips: Vec<IpBlock>,
    bind: Option<PathTemplate>,
}

/// One `dns` entry: canonical, possibly with `{var}` placeholders and a leading `*.`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DnsRule(String);

/// One `ip` entry: an address and how many leading bits must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IpBlock {
    net: IpAddr,
    bits: u8,
}

/// `id_pattern`: path segments, literal or `{var}`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PathTemplate(Vec<Segment>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Var(String),
}

/// Variable name syntax: `[a-z][a-z0-9_]*`.
fn valid_var(v: &str) -> bool {
    v.starts_with(|c: char| c.is_ascii_lowercase())
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The `{var}` names in `s`, or why its braces are malformed.
fn vars_of(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("{s:?} has a '{{' without '}}'"))?;
        let var = &after[..close];
        if !valid_var(var) {
            return Err(format!(
                "{s:?}: variable {{{var}}} must be lowercase letters, digits and '_'"
            ));
        }
        out.push(var.to_string());
        rest = &after[close + 1..];
    }
    if rest.contains('}') {
        return Err(format!("{s:?} has a '}}' without '{{'"));
    }
    Ok(out)
}

// === impl NameRules ===

impl NameRules {
    /// Validates a rule's `dns`, `ip` and `id_pattern` keys. Every template variable must be
    /// bound by `id_pattern`.
    pub fn parse(dns: &[String], ip: &[String], id_pattern: Option<&str>) -> Result<Self, String> {
        let bind = id_pattern.map(PathTemplate::parse).transpose()?;
        let mut rules = Self {
            bind,
            ..Self::default()
        };
        for entry in dns {
            let vars = vars_of(entry)?;
            for v in &vars {
                if !rules.bind.as_ref().is_some_and(|b| b.binds(v)) {
                    return Err(format!(
                        "dns entry {entry:?} uses {{{v}}}, which id_pattern does not bind (add id_pattern = \"/.../{{{v}}}/...\")"
                    ));
                }
            }
            // Validate the shape with each variable standing for one plain label.
            let mut probe = entry.clone();
            for v in &vars {
                probe = probe.replace(&format!("{{{v}}}"), "x");
            }
            normalize_dns(&probe, true).map_err(|e| format!("dns entry: {e}"))?;
            rules.dns.push(DnsRule(entry.to_ascii_lowercase()));
        }
        for entry in ip {
            rules
                .ips
                .push(IpBlock::parse(entry).map_err(|e| format!("ip entry: {e}"))?);
        }
        if rules.bind.is_some() && rules.dns.is_empty() {
            return Err("id_pattern is set but no dns entry uses it".into());
        }
        Ok(rules)
    }

    /// Whether the rule allows no names at all.
    pub fn is_empty(&self) -> bool {
        self.dns.is_empty() && self.ips.is_empty()
    }

    /// The first of `names` this rule does not allow for `id`, as written in the certificate.
    pub fn first_refused(&self, id: &SpiffeId, names: &SanNames) -> Option<String> {
        let vars = self.bind.as_ref().and_then(|b| b.capture(id.path()));
        let allowed: Vec<String> = self
            .dns
            .iter()
            .filter_map(|r| r.expand(vars.as_deref()))
            .collect();
        for name in &names.dns {
            if !allowed.iter().any(|a| dns_matches(a, name)) {
                return Some(name.clone());
            }
        }
        names
            .ips
            .iter()
            .find(|ip| !self.ips.iter().any(|b| b.contains(**ip)))
            .map(IpAddr::to_string)
    }
}

impl fmt::Display for NameRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        let all: Vec<String> = self
            .dns
            .iter()
            .map(|d| d.0.clone())
            .chain(self.ips.iter().map(IpBlock::to_string))
            .collect();
        f.write_str(&all.join(","))
    }
}

/// Whether the canonical `name` is `allowed` (exact) or one label under `allowed`'s `*.` suffix.
fn dns_matches(allowed: &str, name: &str) -> bool {
    match allowed.strip_prefix("*.") {
        Some(suffix) => name
            .strip_suffix(suffix)
            .and_then(|head| head.strip_suffix('.'))
            .is_some_and(|label| !label.is_empty() && !label.contains('.')),
        None => allowed == name,
    }
}

// === impl DnsRule ===

impl DnsRule {
    /// The rule with its variables filled in from `vars`; `None` when a variable has no value
    /// (the ID does not fit `id_pattern`) or its value is not one valid DNS label.
    fn expand(&self, vars: Option<&[(String, String)]>) -> Option<String> {
        if !self.0.contains('{') {
            return Some(self.0.clone());
        }
        let mut out = self.0.clone();
        for (name, value) in vars? {
            out = out.replace(&format!("{{{name}}}"), value);
        }
        if out.contains('{') {
            return None;
        }
        Some(out)
    }
}

// === impl IpBlock ===

impl IpBlock {
    fn parse(s: &str) -> Result<Self, NameError> {
        let (addr, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let net = parse_ip(addr)?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => b
                .parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| NameError {
                    kind: "IP",
                    name: s.to_string(),
                    why: format!("prefix length must be 0 to {max}"),
                })?,
        };
        let block = Self { net, bits };
        if block.masked(net) != net_bits(net) {
            return Err(NameError {
                kind: "IP",
                name: s.to_string(),
                why: "host bits are set below the prefix length".into(),
            });
        }
        Ok(block)
    }

    fn masked(&self, ip: IpAddr) -> u128 {
        let (v, width) = match ip {
            IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
            IpAddr::V6(a) => (u128::from(a), 128),
        };
        let shift = width - u32::from(self.bits);
        if shift >= 128 {
            0
        } else {
            (v >> shift) << shift
        }
    }

    fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.net.is_ipv4() && self.masked(ip) == self.masked(self.net)
    }
}

fn net_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

impl fmt::Display for IpBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let max = if self.net.is_ipv4() { 32 } else { 128 };
        if self.bits == max {
            write!(f, "{}", self.net)
        } else {
            write!(f, "{}/{}", self.net, self.bits)
        }
    }
}

// === impl PathTemplate ===

impl PathTemplate {
    fn parse(s: &str) -> Result<Self, String> {
        let path = s
            .strip_prefix('/')
            .ok_or_else(|| format!("id_pattern {s:?} must be a path starting with '/'"))?;
        let mut segs = Vec::new();
        let mut seen = Vec::new();
        for seg in path.split('/') {
            if seg.is_empty() {
                return Err(format!("id_pattern {s:?} has an empty segment"));
            }
            match seg.strip_prefix('{').and_then(|v| v.strip_suffix('}')) {
                Some(v) if valid_var(v) => {
                    if seen.contains(&v) {
                        return Err(format!("id_pattern {s:?} binds {{{v}}} twice"));
                    }
                    seen.push(v);
                    segs.push(Segment::Var(v.to_string()));
                }
                _ if seg.contains(['{', '}']) => {
                    return Err(format!(
                        "id_pattern {s:?}: a variable must be a whole segment, as in /ns/{{ns}}"
                    ));
                }
                _ => segs.push(Segment::Literal(seg.to_string())),
            }
        }
        if seen.is_empty() {
            return Err(format!("id_pattern {s:?} binds no variable"));
        }
        Ok(Self(segs))
    }

    fn binds(&self, var: &str) -> bool {
        self.0
            .iter()
            .any(|s| matches!(s, Segment::Var(v) if v == var))
    }

    /// The variables' values for `path` (`/a/b`), if it fits; each value must be one valid DNS
    /// label.
    fn capture(&self, path: &str) -> Option<Vec<(String, String)>> {
        let parts: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
        if parts.len() != self.0.len() {
            return None;
        }
        let mut out = Vec::new();
        for (seg, part) in self.0.iter().zip(parts) {
            match seg {
                Segment::Literal(l) if l == part => {}
                Segment::Literal(_) => return None,
                Segment::Var(v) => {
                    let label = normalize_dns(part, false).ok()?;
                    if label.contains('.') || label != part {
                        return None;
                    }
                    out.push((v.clone(), label));
                }
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(dns: &[&str], ip: &[&str], bind: Option<&str>) -> Result<NameRules, String> {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        NameRules::parse(&s(dns), &s(ip), bind)
    }

    fn refused(r: &NameRules, id: &str, names: &[&str]) -> Option<String> {
        r.first_refused(
            &SpiffeId::parse(id).unwrap(),
            &SanNames::parse(names).unwrap(),
        )
    }

    #[test]
    fn exact_wildcard_and_ip_blocks() {
        let r = rules(
            &["api.example.com", "*.svc.example"],
            &["10.1.0.0/16", "::1"],
            None,
        )
        .unwrap();
        let id = "spiffe://td/x";
        assert_eq!(
            refused(
                &r,
                id,
                &["API.example.com.", "a.svc.example", "10.1.2.3", "::1"]
            ),
            None
        );
        assert_eq!(
            refused(&r, id, &["svc.example"]).as_deref(),
            Some("svc.example")
        );
        assert_eq!(
            refused(&r, id, &["a.b.svc.example"]).as_deref(),
            Some("a.b.svc.example")
        );
        assert_eq!(
            refused(&r, id, &["other.example.com"]).as_deref(),
            Some("other.example.com")
        );
        assert_eq!(refused(&r, id, &["10.2.0.1"]).as_deref(), Some("10.2.0.1"));
        assert_eq!(refused(&r, id, &["::2"]).as_deref(), Some("::2"));
        assert_eq!(
            refused(&NameRules::default(), id, &["a.example"]).as_deref(),
            Some("a.example")
        );
    }

    #[test]
    fn templates_bind_whole_segments() {
        let r = rules(
            &["{sa}.{ns}.svc.cluster.local"],
            &[],
            Some("/ns/{ns}/sa/{sa}"),
        )
        .unwrap();
        let ok = "spiffe://td/ns/prod/sa/api";
        assert_eq!(refused(&r, ok, &["api.prod.svc.cluster.local"]), None);
        assert!(refused(&r, ok, &["web.prod.svc.cluster.local"]).is_some());
        // IDs that do not fit the pattern, or whose segments are not DNS labels, get nothing.
        assert!(
            refused(
                &r,
                "spiffe://td/ns/prod/sa/api/x",
                &["api.prod.svc.cluster.local"]
            )
            .is_some()
        );
        assert!(
            refused(
                &r,
                "spiffe://td/ns/a.b/sa/api",
                &["api.a.b.svc.cluster.local"]
            )
            .is_some()
        );
        assert!(
            refused(
                &r,
                "spiffe://td/ns/a_b/sa/api",
                &["api.a-b.svc.cluster.local"]
            )
            .is_some()
        );
    }

    #[test]
    fn bad_entries_are_refused_at_load() {
        assert!(rules(&["{sa}.example"], &[], None).is_err());
        assert!(rules(&["{sa}.example"], &[], Some("/sa/{ns}")).is_err());
        assert!(rules(&["a.{sa.example"], &[], Some("/sa/{sa}")).is_err());
        assert!(rules(&["a..example"], &[], None).is_err());
        assert!(rules(&["a.*.example"], &[], None).is_err());
        assert!(rules(&["x.example"], &[], Some("ns/{ns}")).is_err());
        assert!(rules(&["x.example"], &[], Some("/ns/x{ns}")).is_err());
        assert!(rules(&[], &["10.0.0.1/33"], None).is_err());
        assert!(rules(&[], &["10.0.0.1/8"], None).is_err());
        assert!(rules(&[], &["example.com"], None).is_err());
    }
}
