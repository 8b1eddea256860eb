//! Placement: which host agent gets a new (or resumed) sandbox.
//!
//! The rule is "most free capacity first": among the hosts that can fit the request, pick the
//! one whose scarcer resource (vCPUs or memory, as a fraction of the host) has the most room
//! left after placing it. This spreads load, and a host that is nearly full on either resource
//! is the last choice. Ties go to the host with fewer sandboxes, then to the smaller ID, so
//! placement is deterministic.

use crate::ids::HostId;

/// What a host has and what it has handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCapacity {
    pub id: HostId,
    pub vcpus_total: u32,
    pub vcpus_used: u32,
    pub memory_mb_total: u64,
    pub memory_mb_used: u64,
    pub sandboxes: u32,
    /// Zero means no limit.
    pub max_sandboxes: u32,
    /// Hosts that are draining or unreachable take no new sandboxes.
    pub schedulable: bool,
}

/// What a sandbox needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub vcpus: u32,
    pub memory_mb: u64,
}

impl HostCapacity {
    /// The fraction (in parts per million) of the scarcer resource left after placing `req`,
    /// or `None` if it does not fit.
    fn score(&self, req: Request) -> Option<u64> {
        if !self.schedulable || (self.max_sandboxes != 0 && self.sandboxes >= self.max_sandboxes) {
            return None;
        }
        let cpu_left = self
            .vcpus_total
            .checked_sub(self.vcpus_used)?
            .checked_sub(req.vcpus)?;
        let mem_left = self
            .memory_mb_total
            .checked_sub(self.memory_mb_used)?
            .checked_sub(req.memory_mb)?;
        let frac = |left: u64, total: u64| {
            left.saturating_mul(1_000_000)
                .checked_div(total)
                .unwrap_or(0)
        };
        Some(
            frac(u64::from(cpu_left), u64::from(self.vcpus_total))
                .min(frac(mem_left, self.memory_mb_total)),
        )
    }
}

/// The host to place `req` on, or `None` when none fits.
pub fn pick_host(hosts: &[HostCapacity], req: Request) -> Option<&HostCapacity> {
    best(hosts.iter().filter_map(|h| h.score(req).map(|s| (h, s))))
}

/// The best of `k` hosts drawn at random (by `seed`) among those that fit `req`: the "power
/// of k choices". Control-plane replicas placing at the same moment read the same usage, and
/// would all pick the one emptiest host; drawing candidates first spreads them, and keeping the
/// best of a few still avoids full hosts. With `k` at least the number of hosts that fit, the
/// answer is as good as [`pick_host`]'s (ties broken at random).
pub fn pick_host_sampled(
    hosts: &[HostCapacity],
    req: Request,
    k: usize,
    seed: u64,
) -> Option<&HostCapacity> {
    let mut fit: Vec<(&HostCapacity, u64)> = hosts
        .iter()
        .filter_map(|h| h.score(req).map(|s| (h, s)))
        .collect();
    // A partial Fisher-Yates shuffle: the first `k` entries become a uniform sample, in random
    // order (also when all fit in it), and the first drawn wins a tie, so equal hosts share
    // the load instead of the one with the smallest ID taking it all.
    let k = k.max(1).min(fit.len());
    let mut state = seed;
    for i in 0..k {
        let span = u64::try_from(fit.len() - i).unwrap_or(u64::MAX);
        let j = i + usize::try_from(splitmix64(&mut state) % span).unwrap_or(0);
        fit.swap(i, j);
    }
    fit.truncate(k);
    let mut chosen: Option<(&HostCapacity, u64)> = None;
    for (h, score) in fit {
        let better = chosen.is_none_or(|(c, cs)| {
            (score, std::cmp::Reverse(h.sandboxes)) > (cs, std::cmp::Reverse(c.sandboxes))
        });
        if better {
            chosen = Some((h, score));
        }
    }
    chosen.map(|(h, _)| h)
}

fn best<'a>(scored: impl Iterator<Item = (&'a HostCapacity, u64)>) -> Option<&'a HostCapacity> {
    scored
        .max_by(|(a, sa), (b, sb)| {
            sa.cmp(sb)
                .then(b.sandboxes.cmp(&a.sandboxes))
                .then(b.id.cmp(&a.id))
        })
        .map(|(h, _)| h)
}

/// One step of SplitMix64: a small, well-mixed generator (the caller supplies the entropy).
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str, cpu: (u32, u32), mem: (u64, u64), n: u32) -> HostCapacity {
        HostCapacity {
            id: HostId::parse(id).unwrap(),
            vcpus_total: cpu.0,
            vcpus_used: cpu.1,
            memory_mb_total: mem.0,
            memory_mb_used: mem.1,
            sandboxes: n,
            max_sandboxes: 0,
            schedulable: true,
        }
    }

    fn check(hosts: &[HostCapacity], req: Request, want: Option<&str>) {
        assert_eq!(
            pick_host(hosts, req).map(|h| h.id.as_str()),
            want,
            "{hosts:?}"
        );
    }

    const SMALL: Request = Request {
        vcpus: 2,
        memory_mb: 512,
    };

    #[test]
    fn picks_the_host_with_most_room_on_its_scarcer_resource() {
        // b has more free memory than a, but less free CPU: CPU is its bottleneck.
        let hosts = [
            host("a", (16, 4), (8192, 4096), 2),
            host("b", (16, 12), (8192, 0), 1),
        ];
        check(&hosts, SMALL, Some("a"));
        // c is emptier on both.
        let hosts = [
            hosts[0].clone(),
            hosts[1].clone(),
            host("c", (16, 0), (8192, 0), 0),
        ];
        check(&hosts, SMALL, Some("c"));
    }

    #[test]
    fn skips_hosts_that_do_not_fit_or_are_not_schedulable() {
        let full_cpu = host("a", (4, 3), (8192, 0), 1);
        let full_mem = host("b", (16, 0), (1024, 800), 1);
        check(&[full_cpu.clone(), full_mem.clone()], SMALL, None);
        let mut draining = host("c", (16, 0), (8192, 0), 0);
        draining.schedulable = false;
        check(&[full_cpu, draining.clone()], SMALL, None);
        let mut capped = host("d", (16, 0), (8192, 0), 3);
        capped.max_sandboxes = 3;
        check(&[capped.clone()], SMALL, None);
        capped.max_sandboxes = 4;
        check(&[capped], SMALL, Some("d"));
        // Overcommitted counters (used > total) never underflow.
        check(&[host("e", (2, 5), (512, 900), 0)], SMALL, None);
        check(&[], SMALL, None);
    }

    #[test]
    fn ties_are_broken_by_sandbox_count_then_id() {
        check(
            &[
                host("b", (8, 0), (4096, 0), 0),
                host("a", (8, 0), (4096, 0), 0),
            ],
            SMALL,
            Some("a"),
        );
        check(
            &[
                host("a", (8, 0), (4096, 0), 3),
                host("b", (8, 0), (4096, 0), 1),
            ],
            SMALL,
            Some("b"),
        );
    }

    #[test]
    fn sampled_placement_spreads_and_never_picks_a_host_that_does_not_fit() {
        let hosts = vec![
            host("a", (16, 0), (4096, 0), 0),
            host("b", (16, 0), (4096, 0), 0),
            host("c", (16, 0), (4096, 0), 0),
            host("full", (16, 16), (4096, 0), 4),
        ];
        let req = Request {
            vcpus: 2,
            memory_mb: 512,
        };
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..64 {
            let h = pick_host_sampled(&hosts, req, 2, seed).unwrap();
            assert_ne!(h.id.as_str(), "full");
            seen.insert(h.id.as_str().to_owned());
        }
        // Equal hosts: deterministic placement would always answer "a".
        assert_eq!(seen.len(), 3, "{seen:?}");
        // Enough candidates: as good as the full comparison.
        let best = pick_host(&hosts, req).unwrap().score(req);
        for seed in 0..8 {
            assert_eq!(
                pick_host_sampled(&hosts, req, 8, seed).unwrap().score(req),
                best
            );
        }
        assert!(pick_host_sampled(&hosts[3..], req, 2, 1).is_none());
    }

    #[test]
    fn sampled_placement_keeps_the_better_of_its_candidates() {
        // Of two candidates the emptier wins, so with one nearly full host among two it is
        // chosen only when it is drawn with itself, which cannot happen.
        let hosts = vec![
            host("empty", (16, 0), (4096, 0), 0),
            host("busy", (16, 12), (4096, 3072), 6),
        ];
        let req = Request {
            vcpus: 2,
            memory_mb: 512,
        };
        for seed in 0..32 {
            assert_eq!(
                pick_host_sampled(&hosts, req, 2, seed).unwrap().id.as_str(),
                "empty"
            );
        }
    }
}
