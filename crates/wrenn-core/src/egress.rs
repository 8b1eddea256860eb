//! A sandbox's egress policy, as the E2B API states it: internet on or off, and `allow_out` /
//! `deny_out` lists of IPv4 addresses, CIDR blocks and domain names, where an allow wins over
//! a deny.
//!
//! This is only the sandbox's own policy. What no guest may ever reach whatever its policy
//! says (the host, other slots, private and link-local space) is the host's concern, checked
//! before this (`wrenn-hostnet`'s guard).

use std::fmt;
use std::net::Ipv4Addr;

/// Most entries accepted in one list (the SDKs send lists a person wrote).
pub const MAX_RULES: usize = 256;
/// The E2B selector for all traffic.
pub const ALL_TRAFFIC: &str = "0.0.0.0/0";

/// An IPv4 network: an address with a prefix length, the address's host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Net {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Net {
    /// `addr/prefix` with the host bits of `addr` cleared; `None` when `prefix > 32`.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Self> {
        if prefix > 32 {
            return None;
        }
        let bits = u32::from(addr) & Self::mask(prefix);
        Some(Self {
            addr: Ipv4Addr::from(bits),
            prefix,
        })
    }

    fn mask(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix))
        }
    }

    /// The network's first address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is inside the network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.prefix) == u32::from(self.addr)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl std::str::FromStr for Ipv4Net {
    type Err = ();

    /// `a.b.c.d` (a /32) or `a.b.c.d/n`. Host bits set in a CIDR are cleared, as E2B does.
    fn from_str(s: &str) -> Result<Self, ()> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => {
                // Only plain decimal: `u8::from_str` would take `+8`.
                if p.is_empty() || p.len() > 2 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(());
                }
                (a, p.parse::<u8>().map_err(drop)?)
            }
            None => (s, 32),
        };
        Self::new(addr.parse().map_err(drop)?, prefix).ok_or(())
    }
}

/// A domain rule: `example.com` matches that name only; `*.example.com` matches every name
/// below it (not `example.com` itself). Names are compared lowercase without a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DomainPattern {
    /// The name, or the suffix after `*.`.
    name: String,
    wildcard: bool,
}

impl DomainPattern {
    /// Parses a rule; `None` if it is not a valid host name (letters, digits, `-` and `_` in
    /// labels of 1-63 characters, at least two labels, 253 characters at most).
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim_end_matches('.').to_ascii_lowercase();
        let (wildcard, name) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest.to_owned()),
            None => (false, s),
        };
        valid_name(&name).then_some(Self { name, wildcard })
    }

    /// Whether the host name `host` (as a guest sent it in DNS, SNI or `Host`) matches.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if self.wildcard {
            host.len() > self.name.len() + 1
                && host.ends_with(&self.name)
                && host.as_bytes()[host.len() - self.name.len() - 1] == b'.'
        } else {
            host == self.name
        }
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            write!(f, "*.{}", self.name)
        } else {
            f.write_str(&self.name)
        }
    }
}

fn valid_name(name: &str) -> bool {
    let labels: Vec<&str> = name.split('.').collect();
    name.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        // A name of digits and dots only is an address that failed to parse, not a domain.
        && !labels.iter().all(|l| l.bytes().all(|b| b.is_ascii_digit()))
}

/// One entry of `allow_out` or `deny_out`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Rule {
    Net(Ipv4Net),
    Domain(DomainPattern),
}

impl Rule {
    /// Parses an entry: an IPv4 address, a CIDR block or a domain name.
    pub fn parse(s: &str) -> Result<Self, EgressError> {
        let s = s.trim();
        if let Ok(net) = s.parse::<Ipv4Net>() {
            return Ok(Self::Net(net));
        }
        let addr = s.split_once('/').map_or(s, |(a, _)| a);
        if addr.parse::<std::net::Ipv6Addr>().is_ok() {
            return Err(EgressError::Ipv6(s.to_owned()));
        }
        DomainPattern::parse(s)
            .map(Self::Domain)
            .ok_or_else(|| EgressError::BadEntry(s.to_owned()))
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Net(n) if n.prefix == 32 => write!(f, "{}", n.addr),
            Self::Net(n) => n.fmt(f),
            Self::Domain(d) => d.fmt(f),
        }
    }
}

/// Why a policy was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    #[error("network rule {0:?} is not an IPv4 address, an IPv4 CIDR block or a domain name")]
    BadEntry(String),
    #[error("network rule {0:?} is IPv6; sandboxes have no IPv6")]
    Ipv6(String),
    #[error("at most {MAX_RULES} network rules per list, got {0}")]
    TooMany(usize),
}

/// What the policy says about one outbound connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
}

/// A sandbox's own egress policy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EgressPolicy {
    /// `allow_internet_access: false` denies everything, whatever the lists say.
    pub no_internet: bool,
    pub allow: Vec<Rule>,
    pub deny: Vec<Rule>,
}

impl EgressPolicy {
    /// The policy of the API's fields: `allow_internet_access` (default true) and the lists.
    pub fn parse(
        internet: bool,
        allow_out: &[String],
        deny_out: &[String],
    ) -> Result<Self, EgressError> {
        let list = |entries: &[String]| -> Result<Vec<Rule>, EgressError> {
            if entries.len() > MAX_RULES {
                return Err(EgressError::TooMany(entries.len()));
            }
            let mut rules = Vec::with_capacity(entries.len());
            for e in entries {
                let rule = Rule::parse(e)?;
                if !rules.contains(&rule) {
                    rules.push(rule);
                }
            }
            Ok(rules)
        };
        Ok(Self {
            no_internet: !internet,
            allow: list(allow_out)?,
            deny: list(deny_out)?,
        })
    }

    /// Everything allowed (the default of a sandbox created without a policy).
    pub fn open() -> Self {
        Self::default()
    }

    /// The verdict for a connection to `ip`, for which the guest named `name` (the TLS SNI or
    /// HTTP `Host` of a connection, when one was seen and belongs to `ip`: the caller checks
    /// that the name resolves to the address, so a guest cannot claim an allowed name for any
    /// address). Internet off denies; then an allow rule that matches wins; then a deny rule;
    /// else allowed.
    pub fn verdict(&self, ip: Ipv4Addr, name: Option<&str>) -> Verdict {
        if self.no_internet {
            return Verdict::Deny;
        }
        let hit = |rules: &[Rule]| {
            rules.iter().any(|r| match (r, name) {
                (Rule::Net(n), _) => n.contains(ip),
                (Rule::Domain(d), Some(name)) => d.matches(name),
                (Rule::Domain(_), None) => false,
            })
        };
        if hit(&self.allow) {
            Verdict::Allow
        } else if hit(&self.deny) {
            Verdict::Deny
        } else {
            Verdict::Allow
        }
    }

    /// Whether `name` matches an allow domain rule.
    pub fn allows_name(&self, name: &str) -> bool {
        !self.no_internet && self.allow_domains().any(|d| d.matches(name))
    }

    /// Whether the resolver should answer a query for `name`: not with internet off, and when
    /// everything is denied by default (`deny_out` holds `0.0.0.0/0`) only for names an allow
    /// rule names, so a locked-down sandbox cannot tunnel data out through DNS.
    pub fn resolves(&self, name: &str) -> bool {
        if self.no_internet {
            return false;
        }
        !self.denies_all() || self.allows_name(name)
    }

    /// Whether the deny list holds all traffic.
    pub fn denies_all(&self) -> bool {
        self.deny
            .iter()
            .any(|r| matches!(r, Rule::Net(n) if n.prefix == 0))
    }

    /// Whether any rule names a domain: then connections on ports 80 and 443 are decided by
    /// the name they carry (SNI or `Host`).
    pub fn has_domain_rules(&self) -> bool {
        self.allow
            .iter()
            .chain(&self.deny)
            .any(|r| matches!(r, Rule::Domain(_)))
    }

    /// The allow list's networks.
    pub fn allow_nets(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        nets(&self.allow)
    }

    /// The deny list's networks.
    pub fn deny_nets(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        nets(&self.deny)
    }

    /// The allow list's domain rules.
    pub fn allow_domains(&self) -> impl Iterator<Item = &DomainPattern> + '_ {
        self.allow.iter().filter_map(|r| match r {
            Rule::Domain(d) => Some(d),
            Rule::Net(_) => None,
        })
    }

    /// The lists as strings, as the API reports them back.
    pub fn allow_out(&self) -> Vec<String> {
        self.allow.iter().map(Rule::to_string).collect()
    }

    /// See [`Self::allow_out`].
    pub fn deny_out(&self) -> Vec<String> {
        self.deny.iter().map(Rule::to_string).collect()
    }
}

fn nets(rules: &[Rule]) -> impl Iterator<Item = Ipv4Net> + '_ {
    rules.iter().filter_map(|r| match r {
        Rule::Net(n) => Some(*n),
        Rule::Domain(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str]) -> EgressPolicy {
        let s = |l: &[&str]| l.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        EgressPolicy::parse(true, &s(allow), &s(deny)).unwrap()
    }

    const A: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
    const B: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);

    #[test]
    fn entries_parse_as_addresses_networks_or_names() {
        assert_eq!(
            Rule::parse("203.0.113.10").unwrap(),
            Rule::Net(Ipv4Net::new(A, 32).unwrap())
        );
        assert_eq!(
            Rule::parse("203.0.113.77/24").unwrap().to_string(),
            "203.0.113.0/24"
        );
        assert_eq!(Rule::parse("0.0.0.0/0").unwrap().to_string(), "0.0.0.0/0");
        assert_eq!(
            Rule::parse("Allowed.Test.").unwrap().to_string(),
            "allowed.test"
        );
        assert_eq!(
            Rule::parse("*.example.org").unwrap().to_string(),
            "*.example.org"
        );
        for bad in [
            "",
            "10.0.0.1/33",
            "10.0.0.1/+8",
            "1.2.3",
            "300.1.1.1",
            "localhost",
            "a..b",
            "-a.b",
            "*.",
            "a b.c",
            "http://x.y",
        ] {
            assert!(
                matches!(Rule::parse(bad), Err(EgressError::BadEntry(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            Rule::parse("2001:db8::/32"),
            Err(EgressError::Ipv6(_))
        ));
        let many: Vec<String> = (0..=MAX_RULES)
            .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
            .collect();
        assert_eq!(
            EgressPolicy::parse(true, &many, &[]),
            Err(EgressError::TooMany(MAX_RULES + 1))
        );
    }

    #[test]
    fn wildcards_match_names_below_only() {
        let d = DomainPattern::parse("*.example.org").unwrap();
        assert!(d.matches("a.example.org"));
        assert!(d.matches("A.B.Example.Org."));
        assert!(!d.matches("example.org"));
        assert!(!d.matches("badexample.org"));
        let exact = DomainPattern::parse("example.org").unwrap();
        assert!(exact.matches("EXAMPLE.org."));
        assert!(!exact.matches("a.example.org"));
    }

    #[test]
    fn allow_wins_over_deny_and_internet_off_denies_all() {
        let p = policy(&["203.0.113.10", "allowed.test"], &[ALL_TRAFFIC]);
        assert_eq!(p.verdict(A, None), Verdict::Allow);
        assert_eq!(p.verdict(B, None), Verdict::Deny);
        assert_eq!(p.verdict(B, Some("allowed.test")), Verdict::Allow);
        assert_eq!(p.verdict(B, Some("denied.test")), Verdict::Deny);
        assert!(p.denies_all() && p.has_domain_rules());

        let p = policy(&[], &["203.0.113.0/24"]);
        assert_eq!(p.verdict(A, None), Verdict::Deny);
        assert_eq!(
            p.verdict(Ipv4Addr::new(198, 51, 100, 1), None),
            Verdict::Allow
        );
        assert!(!p.has_domain_rules());

        let p = policy(&[], &["denied.test"]);
        assert_eq!(p.verdict(A, Some("denied.test")), Verdict::Deny);
        assert_eq!(p.verdict(A, Some("allowed.test")), Verdict::Allow);

        let off = EgressPolicy::parse(false, &["203.0.113.10".into()], &[]).unwrap();
        assert_eq!(off.verdict(A, None), Verdict::Deny);
        assert!(!off.resolves("allowed.test"));
        assert_eq!(EgressPolicy::open().verdict(A, None), Verdict::Allow);
    }

    #[test]
    fn a_locked_down_sandbox_resolves_only_allowed_names() {
        let p = policy(&["*.allowed.test"], &[ALL_TRAFFIC]);
        assert!(p.resolves("api.allowed.test"));
        assert!(!p.resolves("denied.test"));
        let open = policy(&[], &["203.0.113.0/24"]);
        assert!(open.resolves("denied.test"));
    }

    #[test]
    fn lists_read_back_as_given_without_repeats() {
        let p = policy(
            &["203.0.113.10", "203.0.113.10/32", "a.test"],
            &["10.0.0.0/8"],
        );
        assert_eq!(p.allow_out(), ["203.0.113.10", "a.test"]);
        assert_eq!(p.deny_out(), ["10.0.0.0/8"]);
        assert_eq!(p.allow_nets().count(), 1);
        assert_eq!(p.allow_domains().count(), 1);
    }
}
