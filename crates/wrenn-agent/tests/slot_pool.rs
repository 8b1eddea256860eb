//! The slot pool and per-slot metadata endpoints with real namespaces (no QEMU): slots are
//! handed out, made on demand when the pool is empty, reset when returned (rules replaced,
//! conntrack flushed, metadata cleared) and all removed at shutdown; each slot's metadata
//! endpoint answers inside its own namespace only, for the sandbox assigned to it.
//!
//! Needs root with `ip`, `nft` and `curl`; skipped otherwise.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use wrenn_agent::pool::SlotPool;
use wrenn_hostnet::{EGRESS_CHAIN, Metadata, NFT_TABLE, token_hash};

fn enabled() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let tools = ["ip", "nft", "curl"].iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
            || Command::new(t).arg("-V").output().is_ok()
    });
    if !(root && tools) {
        eprintln!("skipped: needs root with ip, nft and curl");
    }
    root && tools
}

fn conntrack_count(netns: &str) -> u64 {
    let (_, out) = support::in_netns(
        netns,
        &["cat", "/proc/sys/net/netfilter/nf_conntrack_count"],
    );
    out.trim().parse().unwrap_or(0)
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// Deletes namespaces in our index range if the test fails midway.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for n in &self.0 {
            if netns_exists(n) {
                let _ = Command::new("ip").args(["netns", "del", n]).status();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_are_pooled_reset_and_isolated() {
    if !enabled() {
        return;
    }
    // Test slot ranges: vm_template 4000..8000, the sandbox tests 8000..30400, this file
    // 30400..30800, vm_pool_state 30800..32600.
    let first = 30_400 + (std::process::id() % 100) * 4;
    let _cleanup = Cleanup(
        (first..first + 4)
            .map(|i| format!("wrenn-slot-{i}"))
            .collect(),
    );

    let t = std::time::Instant::now();
    let pool = SlotPool::new(2, first, 4).await.expect("pool");
    eprintln!("2 slots with metadata endpoints in {:?}", t.elapsed());
    assert_eq!(pool.available(), 2);

    let a = pool.acquire().await.unwrap();
    let b = pool.acquire().await.unwrap();
    assert_eq!(pool.available(), 0);
    let t = std::time::Instant::now();
    let c = pool.acquire().await.expect("on-demand slot");
    eprintln!("on-demand slot in {:?}", t.elapsed());
    let names: Vec<String> = [&a, &b, &c]
        .iter()
        .map(|l| l.slot().netns().to_owned())
        .collect();
    assert!(names.iter().all(|n| netns_exists(n)), "{names:?}");
    let mut indices = pool.indices();
    indices.sort();
    assert_eq!(indices, vec![first, first + 1, first + 2]);

    // Every slot is identical inside: same tap address.
    for n in &names {
        let (ok, out) = support::in_netns(n, &["ip", "-4", "-o", "addr", "show", "dev", "tap0"]);
        assert!(ok && out.contains("169.254.0.22/30"), "{n}: {out}");
    }

    // Metadata: each namespace sees its own sandbox only.
    a.set_metadata(Some(Metadata::new("sbx-a", "tpl-1", Some("token-a"))));
    b.set_metadata(Some(Metadata::new("sbx-b", "tpl-2", None)));
    let (ok, out) = support::slot_metadata(&names[0]);
    assert!(ok, "curl in slot a: {out}");
    let (body, code) = out.rsplit_once('\n').unwrap();
    assert_eq!(code, "200");
    let doc: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(doc["instanceID"], "sbx-a");
    assert_eq!(doc["envID"], "tpl-1");
    assert_eq!(doc["accessTokenHash"], token_hash("token-a"));
    let (_, out) = support::slot_metadata(&names[1]);
    let (body, code) = out.rsplit_once('\n').unwrap();
    assert_eq!(code, "200");
    let doc: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        doc["instanceID"], "sbx-b",
        "slot b must not see slot a's sandbox"
    );
    assert_eq!(doc["accessTokenHash"], token_hash(""));
    let (_, out) = support::slot_metadata(&names[2]);
    assert!(out.ends_with("404"), "unassigned slot: {out}");

    // Slot a's endpoint is not reachable from b's namespace through a's addresses either:
    // the DNAT on a's veth address leads only to a's guest port, and a's namespace drops
    // everything else arriving from outside.
    let a_ns_ip = a.slot().guest_endpoint(80).ip().to_string();
    let (ok, out) = support::in_netns(
        &names[1],
        &[
            "curl",
            "-sS",
            "--noproxy",
            "*",
            "-m",
            "2",
            &format!("http://{a_ns_ip}/"),
        ],
    );
    assert!(!ok, "slot b reached something at slot a's address: {out}");

    // Dirty slot a: a per-sandbox egress rule, and tracked connections.
    let (ok, _) = support::in_netns(
        &names[0],
        &[
            "nft",
            "add",
            "rule",
            "inet",
            NFT_TABLE,
            EGRESS_CHAIN,
            "ip",
            "daddr",
            "203.0.113.0/24",
            "drop",
        ],
    );
    assert!(ok, "add an egress rule");
    let rules = |n: &str| {
        support::in_netns(
            n,
            &["nft", "list", "chain", "inet", NFT_TABLE, EGRESS_CHAIN],
        )
        .1
    };
    assert!(rules(&names[0]).contains("203.0.113.0/24"));
    assert!(
        conntrack_count(&names[0]) > 0,
        "curl left conntrack entries"
    );

    let a_name = names[0].clone();
    let t = std::time::Instant::now();
    pool.release(a).await;
    eprintln!("release (reset) in {:?}", t.elapsed());
    pool.release(b).await;
    assert_eq!(pool.available(), 2);
    // Released beyond the pool's size: deleted.
    pool.release(c).await;
    assert_eq!(pool.available(), 2);
    assert!(!netns_exists(&names[2]), "surplus slot not deleted");
    assert!(netns_exists(&a_name));
    assert!(
        !rules(&a_name).contains("203.0.113.0/24"),
        "egress rule survived reset"
    );
    assert_eq!(conntrack_count(&a_name), 0, "conntrack not flushed");
    let (_, out) = support::slot_metadata(&a_name);
    assert!(out.ends_with("404"), "metadata survived release: {out}");
    // The hardening is in place after a reset.
    let (_, table) = support::in_netns(&a_name, &["nft", "list", "table", "inet", NFT_TABLE]);
    for needle in [
        "169.254.0.0/16",
        "10.12.0.0/16",
        "@host_addrs",
        "ip saddr != 169.254.0.21",
        "ip daddr 169.254.169.254 tcp dport 80 accept",
    ] {
        assert!(table.contains(needle), "missing {needle} in\n{table}");
    }

    // A dropped lease deletes its slot and frees the index.
    let d = pool.acquire().await.unwrap();
    let d_name = d.slot().netns().to_owned();
    drop(d);
    assert!(!netns_exists(&d_name));
    assert_eq!(pool.indices().len(), 1);

    tokio::time::sleep(Duration::from_millis(10)).await;
    pool.shutdown().await;
    for n in &names {
        assert!(!netns_exists(n), "{n} left after shutdown");
    }
    for i in first..first + 4 {
        assert!(
            !Path::new("/sys/class/net").join(format!("wrv{i}")).exists(),
            "veth wrv{i} left"
        );
    }
    assert!(pool.indices().is_empty());
}
