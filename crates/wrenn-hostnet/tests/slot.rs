//! Network slots with real namespaces (no QEMU): what a slot looks like from inside and from
//! the host (addresses, routes, the tap, sysctls, the firewall table), that dropping it leaves
//! nothing behind, and how long setting one up, resetting it and removing it take (medians
//! over [`ROUNDS`] slots, printed; run with `--release --nocapture` to read them).
//!
//! Needs root with `ip` and `nft` (used here only to look); skipped otherwise.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use wrenn_hostnet::{NFT_TABLE, Slot, delete_link, delete_netns};

/// Slots timed in a row.
const ROUNDS: usize = 20;

fn enabled() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let tools = ["ip", "nft"]
        .iter()
        .all(|t| Command::new(t).arg("-V").output().is_ok());
    if !(root && tools) {
        eprintln!("skipped: needs root with ip and nft");
    }
    root && tools
}

/// The first of this process's 32 slot indices: clear of the agent tests' ranges (3000.. and
/// up) and of other processes running this file.
fn first_index() -> u32 {
    1_000 + (std::process::id() % 60) * 32
}

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn in_ns(netns: &str, args: &[&str]) -> String {
    let mut all = vec!["ip", "netns", "exec", netns];
    all.extend_from_slice(args);
    run(&all)
}

fn leftovers(index: u32) -> Vec<String> {
    let mut left = Vec::new();
    let ns = format!("wrenn-slot-{index}");
    if Path::new("/run/netns").join(&ns).exists() {
        left.push(ns);
    }
    let veth = format!("wrv{index}");
    if Path::new("/sys/class/net").join(&veth).exists() {
        left.push(veth);
    }
    left
}

/// Deletes what a failed test left in its index range.
struct Cleanup(std::ops::Range<u32>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for i in self.0.clone() {
            let _ = Command::new("ip")
                .args(["netns", "del", &format!("wrenn-slot-{i}")])
                .stderr(std::process::Stdio::null())
                .status();
            let _ = Command::new("ip")
                .args(["link", "del", &format!("wrv{i}")])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

#[tokio::test]
async fn a_slot_looks_the_same_from_inside_and_leaves_nothing() {
    if !enabled() {
        return;
    }
    let index = first_index();
    let _cleanup = Cleanup(index..index + 1);
    let slot = Slot::create(index).await.expect("slot");
    let ns = slot.netns().to_owned();
    let host = slot.host_veth().to_owned();
    let peer = slot.guest_endpoint(0).ip().to_string();
    let base = 2 * index;
    let host_ip = format!("10.12.{}.{}", base >> 8, base & 0xff);
    assert_eq!(
        peer,
        format!("10.12.{}.{}", (base + 1) >> 8, (base + 1) & 0xff)
    );

    // Host side: the veth end, up, with the /31.
    let addrs = run(&["ip", "-4", "-o", "addr", "show", "dev", &host]);
    assert!(addrs.contains(&format!("{host_ip}/31")), "{addrs}");
    let link = run(&["ip", "-o", "link", "show", "dev", &host]);
    assert!(link.contains("state UP") || link.contains(",UP"), "{link}");

    // Inside: lo with the metadata address, eth0 with the peer address, the tap.
    let addrs = in_ns(&ns, &["ip", "-4", "-o", "addr", "show"]);
    for want in [
        "lo    inet 127.0.0.1/8".to_owned(),
        "lo    inet 169.254.169.254/32".to_owned(),
        format!("eth0    inet {peer}/31"),
        "tap0    inet 169.254.0.22/30".to_owned(),
    ] {
        let want: Vec<&str> = want.split_whitespace().collect();
        assert!(
            addrs.lines().any(|l| l
                .split_whitespace()
                .collect::<Vec<_>>()
                .windows(3)
                .any(|w| w == want)),
            "no {want:?} in\n{addrs}"
        );
    }
    let links = in_ns(&ns, &["ip", "-o", "link", "show"]);
    for name in ["lo:", "eth0@", "tap0:"] {
        let line = links
            .lines()
            .find(|l| {
                l.split_whitespace()
                    .nth(1)
                    .is_some_and(|n| n.starts_with(name))
            })
            .unwrap_or_else(|| panic!("no {name} in\n{links}"));
        assert!(line.contains(",UP"), "{name} not up: {line}");
    }
    assert_eq!(links.lines().count(), 3, "unexpected links:\n{links}");
    // A persistent tap without packet information, as `ip tuntap add mode tap` makes it.
    let flags = in_ns(&ns, &["cat", "/sys/class/net/tap0/tun_flags"]);
    assert_eq!(flags.trim(), "0x1802", "tap0 flags: TAP | NO_PI | PERSIST");
    let routes = in_ns(&ns, &["ip", "-4", "route", "show"]);
    assert!(
        routes.contains(&format!("default via {host_ip} dev eth0")),
        "{routes}"
    );
    // Forwarding on; no IPv6 at all.
    for (file, want) in [
        ("/proc/sys/net/ipv4/ip_forward", "1"),
        ("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1"),
        ("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1"),
        ("/proc/sys/net/ipv6/conf/eth0/disable_ipv6", "1"),
        ("/proc/sys/net/ipv6/conf/tap0/disable_ipv6", "1"),
    ] {
        assert_eq!(in_ns(&ns, &["cat", file]).trim(), want, "{file}");
    }
    let v6 = in_ns(&ns, &["ip", "-6", "-o", "addr", "show"]);
    assert!(v6.trim().is_empty(), "IPv6 addresses: {v6}");
    // The firewall: only our table, with its chains and the DNAT to the guest.
    let tables = in_ns(&ns, &["nft", "list", "tables"]);
    assert_eq!(tables.trim(), format!("table inet {NFT_TABLE}"));
    let table = in_ns(&ns, &["nft", "list", "table", "inet", NFT_TABLE]);
    for needle in [
        format!("ip daddr {peer} dnat ip to 169.254.0.21"),
        "oifname \"eth0\" ip saddr 169.254.0.21 masquerade".into(),
        "chain egress".into(),
        "policy drop".into(),
    ] {
        assert!(table.contains(&needle), "missing {needle} in\n{table}");
    }
    slot.reset().await.expect("reset");
    let again = in_ns(&ns, &["nft", "list", "table", "inet", NFT_TABLE]);
    assert_eq!(again, table, "reset changed the firewall");

    drop(slot);
    assert!(leftovers(index).is_empty(), "left: {:?}", leftovers(index));
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[tokio::test]
async fn slot_setup_timings() {
    if !enabled() {
        return;
    }
    let first = first_index() + 1;
    let _cleanup = Cleanup(first..first + ROUNDS as u32);
    let (mut create, mut reset, mut remove) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..ROUNDS as u32 {
        let t = Instant::now();
        let slot = Slot::create(first + i).await.expect("slot");
        create.push(t.elapsed());
        let t = Instant::now();
        slot.reset().await.expect("reset");
        reset.push(t.elapsed());
        let t = Instant::now();
        drop(slot);
        remove.push(t.elapsed());
        assert!(leftovers(first + i).is_empty(), "slot {} left", first + i);
    }
    let (min, max) = (*create.iter().min().unwrap(), *create.iter().max().unwrap());
    eprintln!(
        "slot timings over {ROUNDS} slots: create median {:?} (min {min:?}, max {max:?}), \
         reset median {:?}, remove median {:?}",
        median(create),
        median(reset),
        median(remove)
    );
}

#[tokio::test]
async fn leftovers_of_a_crash_are_replaced_or_deleted() {
    if !enabled() {
        return;
    }
    let (stale, orphan) = (first_index() + 24, first_index() + 25);
    let _cleanup = Cleanup(stale..orphan + 1);
    // What a crashed agent leaves: a namespace with its veth pair.
    for i in [stale, orphan] {
        let ns = format!("wrenn-slot-{i}");
        run(&["ip", "netns", "add", &ns]);
        run(&[
            "ip",
            "link",
            "add",
            &format!("wrv{i}"),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns,
        ]);
    }
    // A new slot of the same index replaces it.
    let slot = Slot::create(stale).await.expect("slot over a stale one");
    let addrs = in_ns(
        slot.netns(),
        &["ip", "-4", "-o", "addr", "show", "dev", "eth0"],
    );
    assert_eq!(addrs.lines().count(), 1, "{addrs}");
    drop(slot);
    assert!(leftovers(stale).is_empty(), "left: {:?}", leftovers(stale));
    // The agent's orphan cleanup deletes the rest, and a second time is no error.
    for _ in 0..2 {
        delete_link(&format!("wrv{orphan}"))
            .await
            .expect("delete the veth");
        delete_netns(&format!("wrenn-slot-{orphan}"))
            .await
            .expect("delete the namespace");
    }
    assert!(
        leftovers(orphan).is_empty(),
        "left: {:?}",
        leftovers(orphan)
    );
}

#[tokio::test]
async fn a_create_nobody_waits_for_leaves_nothing() {
    if !enabled() {
        return;
    }
    let index = first_index() + 26;
    let _cleanup = Cleanup(index..index + 1);
    // Gives up at once: the setup goes on on its own thread, and what it made is removed.
    let gave_up = tokio::time::timeout(Duration::from_micros(1), Slot::create(index)).await;
    assert!(gave_up.is_err(), "a slot in a microsecond?");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !leftovers(index).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(leftovers(index).is_empty(), "left: {:?}", leftovers(index));
}

/// The egress transactions apply (nft accepts them as written) and do what they say: a
/// policy fills the sets and chains, closing egress empties them again, learned addresses
/// carry their timeout. Packets through these rules are the end-to-end lab's business
/// (tests/e2e/test_egress.py), with real guests.
#[tokio::test]
async fn egress_policies_apply_in_one_transaction_each() {
    use wrenn_core::EgressPolicy;
    if !enabled() {
        return;
    }
    let index = first_index() + 27;
    let _cleanup = Cleanup(index..index + 1);
    let slot = Slot::create(index).await.expect("slot");
    let ns = slot.netns().to_owned();
    let list = || in_ns(&ns, &["nft", "list", "table", "inet", NFT_TABLE]);
    let closed = list();
    assert!(
        closed.contains("chain egress {\n\t\tcounter packets 0 bytes 0 goto refuse"),
        "{closed}"
    );

    let s = |l: &[&str]| l.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let policy = EgressPolicy::parse(
        true,
        &s(&["203.0.113.10", "allowed.test"]),
        &s(&["0.0.0.0/0", "198.51.100.0/24"]),
    )
    .unwrap();
    let lifted = ["10.99.0.0/16".parse().unwrap()];
    slot.set_egress(Some(&policy), &lifted)
        .await
        .expect("set egress");
    slot.learn(&[("203.0.113.11".parse().unwrap(), Duration::from_secs(120))])
        .await
        .expect("learn");
    let table = list();
    for needle in [
        "elements = { 203.0.113.10 }",
        "elements = { 0.0.0.0/0 }",
        "elements = { 10.99.0.0/16 }",
        "203.0.113.11 timeout 2m",
        "ip daddr @allow accept",
        "ip daddr @learned accept",
        "redirect to :15001",
    ] {
        assert!(table.contains(needle), "missing {needle} in\n{table}");
    }
    slot.refresh_host().await.expect("refresh host");
    slot.set_egress(None, &[]).await.expect("close egress");
    let table = list();
    assert!(
        !table.contains("203.0.113.10") && !table.contains("redirect to :15001"),
        "{table}"
    );
    assert!(table.contains("goto refuse"), "{table}");
    slot.reset().await.expect("reset");
    drop(slot);
    assert!(leftovers(index).is_empty(), "left: {:?}", leftovers(index));
}

/// An agent's uplink table covers its slot range and goes when dropped.
#[tokio::test]
async fn the_uplink_table_is_the_agents_own() {
    if !enabled() {
        return;
    }
    let first = first_index() + 28;
    let up = wrenn_hostnet::Uplink::install(Some("lo"), first, 2)
        .await
        .expect("uplink");
    let table = run(&[
        "nft",
        "list",
        "table",
        "inet",
        &format!("wrenn-host-{first}"),
    ]);
    assert!(table.contains("oifname \"lo\" masquerade"), "{table}");
    drop(up);
    let tables = run(&["nft", "list", "tables"]);
    assert!(!tables.contains(&format!("wrenn-host-{first}")), "{tables}");
    assert!(
        wrenn_hostnet::Uplink::install(Some("no-such-if0"), first, 2)
            .await
            .is_err(),
        "an unknown uplink is refused"
    );
}
