//! What a slot's resolver learned from upstream answers: for each name a guest resolved,
//! the IPv4 addresses it resolved to, each until its (clamped) TTL runs out. The proxy uses
//! it to believe a name a connection carries only for an address the name resolved to; the
//! addresses of names the policy allows are what the firewall lets through on other ports.
//!
//! Both maps here are bounded: a guest decides what it resolves, not how much the host keeps.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{Name, RData};
use wrenn_core::EgressPolicy;

/// Shortest time an address is kept (answers with TTL 0 would be useless to the proxy).
pub(crate) const MIN_TTL: Duration = Duration::from_secs(30);
/// Longest time an address is kept, whatever the TTL said.
pub(crate) const MAX_TTL: Duration = Duration::from_secs(3600);
/// Most names kept per slot.
const MAX_NAMES: usize = 1024;
/// Most addresses kept per name.
const MAX_ADDRS_PER_NAME: usize = 32;
/// Longest CNAME chain followed.
const MAX_CHAIN: usize = 16;

/// `ttl` seconds, clamped to [`MIN_TTL`]..=[`MAX_TTL`].
pub(crate) fn clamp_ttl(ttl: u32) -> Duration {
    Duration::from_secs(u64::from(ttl)).clamp(MIN_TTL, MAX_TTL)
}

/// A DNS name as the policy compares it: ASCII (IDNA labels stay in punycode), lowercase,
/// without the trailing dot.
pub(crate) fn normalize(name: &Name) -> String {
    let mut s = name.to_ascii().to_ascii_lowercase();
    if s.ends_with('.') {
        s.pop();
    }
    s
}

/// The A records that answer `qname` in `answer`: those owned by `qname` or by a name its
/// CNAME chain leads to (the addresses at the end of a chain belong to the name asked for),
/// each with the smallest TTL on its way. Empty unless the answer is a success.
pub(crate) fn answer_addresses(answer: &Message, qname: &str) -> Vec<(Ipv4Addr, u32)> {
    if answer.metadata.response_code != ResponseCode::NoError {
        return Vec::new();
    }
    // (name, smallest TTL of the CNAMEs that led to it)
    let mut chain: Vec<(String, u32)> = vec![(qname.to_owned(), u32::MAX)];
    while chain.len() <= MAX_CHAIN {
        let (current, ttl) = chain.last().cloned().unwrap_or_default();
        let next = answer.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target) if normalize(&r.name) == current => {
                Some((normalize(&target.0), ttl.min(r.ttl)))
            }
            _ => None,
        });
        match next {
            Some(next) if !chain.iter().any(|(n, _)| *n == next.0) => chain.push(next),
            _ => break, // the end of the chain, or a loop
        }
    }
    let mut out: Vec<(Ipv4Addr, u32)> = Vec::new();
    for r in &answer.answers {
        let RData::A(a) = &r.data else { continue };
        let owner = normalize(&r.name);
        if let Some((_, via)) = chain.iter().find(|(n, _)| *n == owner) {
            let ttl = r.ttl.min(*via);
            match out.iter_mut().find(|(ip, _)| *ip == a.0) {
                Some(seen) => seen.1 = seen.1.max(ttl),
                None => out.push((a.0, ttl)),
            }
        }
    }
    out
}

/// Name → address → when it expires.
#[derive(Debug, Default)]
pub(crate) struct Learned {
    names: HashMap<String, HashMap<Ipv4Addr, Instant>>,
}

impl Learned {
    /// Records that `name` resolved to `addrs` (address, how long to keep it) at `now`, and
    /// returns those that are new or kept longer now, with how long. An address is kept
    /// longer only once less than half of the new time is left, so a guest asking again and
    /// again changes (and reports) each address at most about twice per TTL, and what was
    /// reported is what is kept.
    pub(crate) fn record(
        &mut self,
        name: &str,
        addrs: &[(Ipv4Addr, Duration)],
        now: Instant,
    ) -> Vec<(Ipv4Addr, Duration)> {
        if addrs.is_empty() {
            return Vec::new();
        }
        if !self.names.contains_key(name) && self.names.len() >= MAX_NAMES {
            self.make_room(now);
        }
        let entry = self.names.entry(name.to_owned()).or_default();
        entry.retain(|_, until| *until > now);
        let mut changed = Vec::new();
        for &(ip, keep) in addrs {
            let until = now + keep;
            match entry.get_mut(&ip) {
                Some(at) if *at >= now + keep / 2 => {}
                Some(at) => {
                    *at = until;
                    changed.push((ip, keep));
                }
                None => {
                    entry.insert(ip, until);
                    changed.push((ip, keep));
                }
            }
        }
        while entry.len() > MAX_ADDRS_PER_NAME {
            let Some(first) = entry.iter().min_by_key(|(_, u)| **u).map(|(ip, _)| *ip) else {
                break;
            };
            entry.remove(&first);
            changed.retain(|(ip, _)| *ip != first);
        }
        changed
    }

    /// Drops what expired; if every name is still live, the one that expires first.
    fn make_room(&mut self, now: Instant) {
        self.purge(now);
        if self.names.len() < MAX_NAMES {
            return;
        }
        let first = self
            .names
            .iter()
            .min_by_key(|(_, a)| a.values().max().copied())
            .map(|(n, _)| n.clone());
        if let Some(first) = first {
            self.names.remove(&first);
        }
    }

    /// Forgets everything.
    pub(crate) fn clear(&mut self) {
        self.names.clear();
    }

    /// Whether `name` resolved to `ip` and that has not expired.
    pub(crate) fn contains(&self, name: &str, ip: Ipv4Addr, now: Instant) -> bool {
        self.names
            .get(name)
            .and_then(|a| a.get(&ip))
            .is_some_and(|until| *until > now)
    }

    /// Every unexpired address of a name `policy` allows, with the time it has left; an
    /// address of several names once, with the longest.
    pub(crate) fn allowed(&self, policy: &EgressPolicy, now: Instant) -> Vec<(Ipv4Addr, Duration)> {
        let mut out: HashMap<Ipv4Addr, Duration> = HashMap::new();
        for (name, addrs) in &self.names {
            if !policy.allows_name(name) {
                continue;
            }
            for (ip, until) in addrs {
                if let Some(left) = until.checked_duration_since(now).filter(|l| !l.is_zero()) {
                    let e = out.entry(*ip).or_default();
                    *e = (*e).max(left);
                }
            }
        }
        let mut out: Vec<_> = out.into_iter().collect();
        out.sort();
        out
    }

    /// Drops what has expired.
    fn purge(&mut self, now: Instant) {
        self.names.retain(|_, addrs| {
            addrs.retain(|_, until| *until > now);
            !addrs.is_empty()
        });
    }
}

/// How long the proxy keeps its own lookups of a name (the answer, or that there was none).
pub(crate) const LOOKUP_TTL: Duration = Duration::from_secs(30);
/// Most lookups kept per slot.
const MAX_LOOKUPS: usize = 256;

/// The proxy's own recent A lookups: name → (addresses, until when).
#[derive(Debug, Default)]
pub(crate) struct Lookups {
    names: HashMap<String, (Vec<Ipv4Addr>, Instant)>,
}

impl Lookups {
    /// The addresses `name` had when last looked up, if that is recent.
    pub(crate) fn get(&self, name: &str, now: Instant) -> Option<&[Ipv4Addr]> {
        self.names
            .get(name)
            .filter(|(_, until)| *until > now)
            .map(|(addrs, _)| addrs.as_slice())
    }

    /// Keeps a lookup's result (possibly empty) for [`LOOKUP_TTL`].
    pub(crate) fn put(&mut self, name: &str, addrs: Vec<Ipv4Addr>, now: Instant) {
        if self.names.len() >= MAX_LOOKUPS && !self.names.contains_key(name) {
            self.names.retain(|_, (_, until)| *until > now);
            if self.names.len() >= MAX_LOOKUPS {
                let first = self
                    .names
                    .iter()
                    .min_by_key(|(_, (_, until))| *until)
                    .map(|(n, _)| n.clone());
                if let Some(first) = first {
                    self.names.remove(&first);
                }
            }
        }
        self.names
            .insert(name.to_owned(), (addrs, now + LOOKUP_TTL));
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr as _;

    use hickory_proto::op::{MessageType, OpCode};
    use hickory_proto::rr::Record;
    use hickory_proto::rr::rdata::{A, CNAME};

    use super::*;

    const X: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
    const Y: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);

    fn name(s: &str) -> Name {
        Name::from_str(s).unwrap()
    }

    fn answer(records: Vec<Record>) -> Message {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        m.add_answers(records);
        m
    }

    fn a(owner: &str, ip: Ipv4Addr, ttl: u32) -> Record {
        Record::from_rdata(name(owner), ttl, RData::A(A(ip)))
    }

    fn cname(owner: &str, target: &str, ttl: u32) -> Record {
        Record::from_rdata(name(owner), ttl, RData::CNAME(CNAME(name(target))))
    }

    fn policy(allow: &[&str]) -> EgressPolicy {
        let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        EgressPolicy::parse(true, &allow, &["0.0.0.0/0".into()]).unwrap()
    }

    #[test]
    fn addresses_at_the_end_of_a_cname_chain_belong_to_the_name_asked() {
        let m = answer(vec![
            cname("WWW.Allowed.Test.", "edge.cdn.test.", 600),
            cname("edge.cdn.test.", "x.cdn.test.", 100),
            a("x.cdn.test.", X, 300),
            // Not on the chain: a guest's upstream cannot attach addresses to other names.
            a("other.test.", Y, 300),
        ]);
        assert_eq!(answer_addresses(&m, "www.allowed.test"), [(X, 100)]);
        assert_eq!(answer_addresses(&m, "other.test"), [(Y, 300)]);
        // A loop ends the chain, and a failed answer has nothing.
        let looped = answer(vec![
            cname("a.test.", "b.test.", 60),
            cname("b.test.", "a.test.", 60),
            a("b.test.", X, 60),
        ]);
        assert_eq!(answer_addresses(&looped, "a.test"), [(X, 60)]);
        let mut failed = answer(vec![a("a.test.", X, 60)]);
        failed.metadata.response_code = ResponseCode::ServFail;
        assert!(answer_addresses(&failed, "a.test").is_empty());
    }

    #[test]
    fn ttls_are_clamped() {
        assert_eq!(clamp_ttl(0), MIN_TTL);
        assert_eq!(clamp_ttl(300), Duration::from_secs(300));
        assert_eq!(clamp_ttl(u32::MAX), MAX_TTL);
    }

    #[test]
    fn learned_addresses_expire_and_only_allowed_names_are_reported() {
        let t0 = Instant::now();
        let mut l = Learned::default();
        assert_eq!(
            l.record("allowed.test", &[(X, Duration::from_secs(60))], t0),
            [(X, Duration::from_secs(60))]
        );
        // Asked again soon: nothing new to report; once past half its time, kept longer.
        let again = l.record(
            "allowed.test",
            &[(X, Duration::from_secs(60))],
            t0 + Duration::from_secs(29),
        );
        assert!(again.is_empty());
        let later = t0 + Duration::from_secs(31);
        let again = l.record(
            "allowed.test",
            &[(X, Duration::from_secs(60)), (Y, Duration::from_secs(40))],
            later,
        );
        assert_eq!(
            again,
            [(X, Duration::from_secs(60)), (Y, Duration::from_secs(40))]
        );
        assert!(l.contains("allowed.test", X, t0 + Duration::from_secs(90)));
        assert!(l.contains("allowed.test", Y, t0 + Duration::from_secs(70)));
        assert!(!l.contains("allowed.test", Y, t0 + Duration::from_secs(72)));
        let mut l = Learned::default();
        l.record("allowed.test", &[(X, Duration::from_secs(60))], t0);
        l.record("denied.test", &[(Y, Duration::from_secs(60))], t0);
        assert!(l.contains("allowed.test", X, t0));
        assert!(!l.contains("allowed.test", Y, t0));
        assert!(!l.contains("allowed.test", X, t0 + Duration::from_secs(61)));
        assert_eq!(
            l.allowed(&policy(&["allowed.test"]), t0 + Duration::from_secs(10)),
            [(X, Duration::from_secs(50))]
        );
        assert!(
            l.allowed(&policy(&["allowed.test"]), t0 + Duration::from_secs(60))
                .is_empty()
        );
        assert!(
            l.allowed(&EgressPolicy::parse(false, &[], &[]).unwrap(), t0)
                .is_empty()
        );
    }

    #[test]
    fn the_maps_stay_bounded() {
        let t0 = Instant::now();
        let mut l = Learned::default();
        for i in 0..(MAX_NAMES as u32 + 10) {
            let addrs: Vec<_> = (0..40u32)
                .map(|j| {
                    (
                        Ipv4Addr::from(i * 64 + j),
                        Duration::from_secs(60 + u64::from(i)),
                    )
                })
                .collect();
            l.record(&format!("n{i}.test"), &addrs, t0);
        }
        assert_eq!(l.names.len(), MAX_NAMES);
        assert!(l.names.values().all(|a| a.len() <= MAX_ADDRS_PER_NAME));
        // The names that expire first went.
        assert!(!l.names.contains_key("n0.test"));
        assert!(l.names.contains_key(&format!("n{}.test", MAX_NAMES + 9)));

        let mut c = Lookups::default();
        for i in 0..(MAX_LOOKUPS + 5) {
            c.put(
                &format!("n{i}.test"),
                vec![X],
                t0 + Duration::from_millis(i as u64),
            );
        }
        assert_eq!(c.names.len(), MAX_LOOKUPS);
        assert_eq!(
            c.get(&format!("n{}.test", MAX_LOOKUPS + 4), t0),
            Some(&[X][..])
        );
        assert_eq!(c.get("n0.test", t0), None);
        assert_eq!(
            c.get(&format!("n{}.test", MAX_LOOKUPS), t0 + LOOKUP_TTL * 2),
            None
        );
    }
}
