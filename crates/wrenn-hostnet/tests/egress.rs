//! The per-slot egress services (resolver and filtering proxy) against namespaces this test
//! makes: a "guest" namespace (169.254.0.21, its gateway 169.254.0.22), a "slot" namespace
//! standing in for a slot (169.254.0.22 towards the guest; nftables there redirects the
//! guest's DNS to 169.254.0.22:53 and its ports 80 and 443 to the proxy, as the slot firewall
//! does) and an "internet" namespace behind the slot with TEST-NET hosts 203.0.113.10-12
//! running echo servers on 80 and 443. The upstream resolver is an in-test DNS server on the
//! host's loopback (the services ask upstream from the host's namespace). No packet leaves
//! these namespaces and loopback.
//!
//! Needs root with `ip` and `nft`; skipped otherwise. Every namespace is deleted when a test
//! ends, failed or not.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::str::FromStr as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, CNAME, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use wrenn_core::EgressPolicy;
use wrenn_hostnet::{EgressConfig, EgressServices, OnLearned, PROXY_PORT};

const ALLOWED_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const DENIED_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
const CDN_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 12);
/// Any address: the slot's rules send all DNS to the resolver.
const SOME_DNS: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 53), 53));
/// TXT records in the answer for `big.allowed.test` (too many for 512 bytes).
const BIG_TXT: usize = 20;

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

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The three namespaces of one test; dropping it deletes them.
struct Lab {
    guest: String,
    slot: String,
    inet: String,
}

impl Lab {
    fn new(tag: &str) -> Self {
        let base = format!("wrenn-egt-{}-{tag}", std::process::id());
        let lab = Self {
            guest: format!("{base}-g"),
            slot: format!("{base}-s"),
            inet: format!("{base}-i"),
        };
        // Made after `lab` exists, so a failure half way still deletes what was made.
        for ns in [&lab.guest, &lab.slot, &lab.inet] {
            delete_netns(ns);
            run(&["ip", "netns", "add", ns]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let (g, s, i) = (&*lab.guest, &*lab.slot, &*lab.inet);
        for (a, an, b, bn) in [(g, "g0", s, "s0"), (s, "eth0", i, "i0")] {
            run(&[
                "ip", "link", "add", "name", an, "netns", a, "type", "veth", "peer", "name", bn,
                "netns", b,
            ]);
        }
        for (ns, dev, addr) in [
            (g, "g0", "169.254.0.21/30"),
            (s, "s0", "169.254.0.22/30"),
            (s, "eth0", "198.51.100.2/30"),
            (i, "i0", "198.51.100.1/30"),
            (i, "lo", "203.0.113.10/32"),
            (i, "lo", "203.0.113.11/32"),
            (i, "lo", "203.0.113.12/32"),
        ] {
            run(&["ip", "-n", ns, "addr", "add", addr, "dev", dev]);
            run(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        run(&[
            "ip",
            "-n",
            g,
            "route",
            "add",
            "default",
            "via",
            "169.254.0.22",
        ]);
        run(&[
            "ip",
            "-n",
            s,
            "route",
            "add",
            "default",
            "via",
            "198.51.100.1",
        ]);
        // What the slot firewall does for the services (its other rules are not under test).
        let rules = format!(
            "table ip egt {{\n chain pre {{\n  type nat hook prerouting priority dstnat; policy accept;\n  \
             iifname \"s0\" meta l4proto {{ tcp, udp }} th dport 53 dnat to 169.254.0.22:53\n  \
             iifname \"s0\" tcp dport {{ 80, 443 }} dnat to 169.254.0.22:{PROXY_PORT}\n }}\n}}\n"
        );
        let mut nft = Command::new("ip")
            .args(["netns", "exec", s, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut nft.stdin.take().unwrap(), rules.as_bytes()).unwrap();
        assert!(nft.wait().unwrap().success(), "nft rules");
        lab
    }

    fn slot_netns(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.slot)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.guest, &self.slot, &self.inet] {
            delete_netns(ns);
        }
    }
}

fn delete_netns(ns: &str) {
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stderr(Stdio::null())
        .status();
}

/// Runs `f` on a thread inside namespace `ns` (sockets it makes stay there).
async fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = PathBuf::from("/run/netns").join(ns);
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let file = std::fs::File::open(path).unwrap();
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let _ = tx.send(f());
    });
    rx.await.unwrap()
}

// ---- the fake internet: echo servers and an upstream resolver ----

/// Echo servers on ports 80 and 443 of the internet namespace: each connection gets the
/// address it reached (`ip:port\n`), then everything it sends back, then EOF after its EOF.
/// Returns the addresses reached, in order.
async fn echo_servers(lab: &Lab) -> Arc<Mutex<Vec<SocketAddr>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    for port in [80, 443] {
        let listener = in_ns(&lab.inet, move || {
            let l = std::net::TcpListener::bind(("0.0.0.0", port)).unwrap();
            l.set_nonblocking(true).unwrap();
            l
        })
        .await;
        let listener = TcpListener::from_std(listener).unwrap();
        let seen = seen.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let local = s.local_addr().unwrap();
                seen.lock().unwrap().push(local);
                tokio::spawn(async move {
                    s.write_all(format!("{local}\n").as_bytes()).await?;
                    let (mut r, mut w) = s.split();
                    tokio::io::copy(&mut r, &mut w).await?;
                    w.shutdown().await
                });
            }
        });
    }
    seen
}

/// The upstream resolver's zone; `None`: no answer at all (a resolver that hangs).
fn zone(query: &Message, tcp: bool) -> Option<Message> {
    let q = query.queries.first()?;
    let name = q.name().to_ascii().to_ascii_lowercase();
    let mut m = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.add_query(q.clone());
    let n = |s: &str| Name::from_str(s).unwrap();
    let a = |owner: &str, ip: Ipv4Addr, ttl| Record::from_rdata(n(owner), ttl, RData::A(A(ip)));
    match (name.as_str(), q.query_type()) {
        ("slow.test.", _) => return None,
        ("allowed.test.", RecordType::A) => {
            m.add_answer(a("allowed.test.", ALLOWED_IP, 300));
        }
        ("denied.test.", RecordType::A) => {
            m.add_answer(a("denied.test.", DENIED_IP, 300));
        }
        ("alias.allowed.test.", RecordType::A) => {
            m.add_answer(Record::from_rdata(
                n("alias.allowed.test."),
                600,
                RData::CNAME(CNAME(n("edge.cdn.test."))),
            ));
            m.add_answer(a("edge.cdn.test.", CDN_IP, 5));
        }
        ("big.allowed.test.", RecordType::TXT) if tcp || query.edns.is_some() => {
            for i in 0..BIG_TXT {
                m.add_answer(Record::from_rdata(
                    n("big.allowed.test."),
                    60,
                    RData::TXT(TXT::new(vec![format!("{i:02}{}", "x".repeat(98))])),
                ));
            }
        }
        ("big.allowed.test.", RecordType::TXT) => m.metadata.truncation = true,
        _ => m.metadata.response_code = ResponseCode::NXDomain,
    }
    Some(m)
}

/// The in-test upstream resolver on the host's loopback, UDP and TCP on one port.
struct Upstream {
    addr: SocketAddr,
    queries: Arc<AtomicUsize>,
}

async fn upstream() -> Upstream {
    let queries = Arc::new(AtomicUsize::new(0));
    let (udp, tcp) = loop {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
            break (udp, tcp);
        }
    };
    let addr = udp.local_addr().unwrap();
    let count = queries.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let (n, peer) = udp.recv_from(&mut buf).await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            if let Some(m) = Message::from_vec(&buf[..n])
                .ok()
                .and_then(|q| zone(&q, false))
            {
                udp.send_to(&m.to_vec().unwrap(), peer).await.unwrap();
            }
        }
    });
    let count = queries.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = tcp.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let len = s.read_u16().await?;
                let mut q = vec![0u8; usize::from(len)];
                s.read_exact(&mut q).await?;
                if let Some(m) = Message::from_vec(&q).ok().and_then(|q| zone(&q, true)) {
                    let bytes = m.to_vec().unwrap();
                    s.write_all(&(bytes.len() as u16).to_be_bytes()).await?;
                    s.write_all(&bytes).await?;
                }
                Ok::<_, std::io::Error>(())
            });
        }
    });
    Upstream { addr, queries }
}

// ---- the guest's side ----

fn policy(internet: bool, allow: &[&str], deny: &[&str]) -> Arc<EgressPolicy> {
    let s = |l: &[&str]| l.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    Arc::new(EgressPolicy::parse(internet, &s(allow), &s(deny)).unwrap())
}

type Learned = Arc<Mutex<Vec<(Ipv4Addr, Duration)>>>;

/// Starts the services in the lab's slot; what they report as learned lands in the vector.
async fn start(
    lab: &Lab,
    up: &Upstream,
    policy: Arc<EgressPolicy>,
    tune: impl FnOnce(&mut EgressConfig),
) -> (EgressServices, Learned) {
    let learned: Learned = Arc::default();
    let sink = learned.clone();
    let on_learned: OnLearned =
        Arc::new(move |addrs| sink.lock().unwrap().extend_from_slice(addrs));
    let mut cfg = EgressConfig::new(up.addr);
    tune(&mut cfg);
    let services = EgressServices::start(&lab.slot_netns(), cfg, policy, on_learned)
        .await
        .expect("egress services");
    (services, learned)
}

/// A query; with `edns`, advertising that UDP payload size.
fn query(name: &str, kind: RecordType, edns: Option<u16>) -> Message {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_str(name).unwrap(), kind));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m
}

/// Asks over UDP from the guest; `None` without an answer within `wait`.
async fn ask_udp(lab: &Lab, q: &Message, wait: Duration) -> Option<Message> {
    let sock = in_ns(&lab.guest, || {
        let s = std::net::UdpSocket::bind("169.254.0.21:0").unwrap();
        s.connect(SOME_DNS).unwrap();
        s.set_nonblocking(true).unwrap();
        s
    })
    .await;
    let sock = UdpSocket::from_std(sock).unwrap();
    sock.send(&q.to_vec().unwrap()).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let n = tokio::time::timeout(wait, sock.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(m.metadata.id, q.metadata.id, "the guest's query ID");
    Some(m)
}

async fn ask(lab: &Lab, name: &str) -> Message {
    ask_udp(
        lab,
        &query(name, RecordType::A, None),
        Duration::from_secs(5),
    )
    .await
    .unwrap_or_else(|| panic!("no answer for {name}"))
}

/// A TCP connection from the guest to `dst`.
async fn connect(lab: &Lab, dst: SocketAddr) -> TcpStream {
    let s = in_ns(&lab.guest, move || {
        let s = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5)).unwrap();
        s.set_nonblocking(true).unwrap();
        s
    })
    .await;
    TcpStream::from_std(s).unwrap()
}

async fn ask_tcp(lab: &Lab, q: &Message) -> Message {
    let mut s = connect(lab, SOME_DNS).await;
    let bytes = q.to_vec().unwrap();
    s.write_all(&(bytes.len() as u16).to_be_bytes())
        .await
        .unwrap();
    s.write_all(&bytes).await.unwrap();
    let len = s.read_u16().await.unwrap();
    let mut answer = vec![0u8; usize::from(len)];
    s.read_exact(&mut answer).await.unwrap();
    let m = Message::from_vec(&answer).unwrap();
    assert_eq!(m.metadata.id, q.metadata.id);
    m
}

fn addresses(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

/// A ClientHello as a TLS 1.3 client sends it (one record), naming `sni`.
fn client_hello(sni: Option<&str>) -> Vec<u8> {
    let mut exts = Vec::new();
    let mut ext = |kind: u16, data: &[u8]| {
        exts.extend_from_slice(&kind.to_be_bytes());
        exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
        exts.extend_from_slice(data);
    };
    if let Some(name) = sni {
        let mut entry = vec![0];
        entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
        entry.extend_from_slice(name.as_bytes());
        let mut list = (entry.len() as u16).to_be_bytes().to_vec();
        list.extend_from_slice(&entry);
        ext(0x0000, &list);
    }
    ext(0x000a, &[0x00, 0x02, 0x00, 0x1d]); // supported_groups: x25519
    ext(0x000d, &[0x00, 0x02, 0x08, 0x04]); // signature_algorithms
    ext(0x002b, &[0x02, 0x03, 0x04]); // supported_versions: TLS 1.3
    let mut share = vec![0x00, 0x24, 0x00, 0x1d, 0x00, 0x20];
    share.extend_from_slice(&[0x42; 32]);
    ext(0x0033, &share); // key_share
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[0x11; 32]);
    body.push(32);
    body.extend_from_slice(&[0x22; 32]);
    body.extend_from_slice(&[0x00, 0x06, 0x13, 0x01, 0x13, 0x02, 0x13, 0x03, 0x01, 0x00]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![0x01];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    record.extend_from_slice(&hs);
    record
}

fn http_get(host: &str) -> Vec<u8> {
    format!("GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: t\r\n\r\n").into_bytes()
}

/// Sends `bytes` from the guest to `dst` in two writes, half-closes, and reads to the end.
/// `Ok` with what came back, or the error that ended it (a reset).
async fn exchange(lab: &Lab, dst: SocketAddr, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = connect(lab, dst).await;
    let io = async {
        let (a, b) = bytes.split_at(bytes.len() / 3);
        s.write_all(a).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.write_all(b).await?;
        s.shutdown().await?;
        let mut back = Vec::new();
        s.read_to_end(&mut back).await?;
        Ok(back)
    };
    tokio::time::timeout(Duration::from_secs(10), io)
        .await
        .expect("the exchange hung")
}

/// What an allowed exchange with `dst` returns: the server's banner, then the echo.
fn echoed(dst: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    [format!("{dst}\n").into_bytes(), bytes.to_vec()].concat()
}

fn refused(result: &std::io::Result<Vec<u8>>) -> bool {
    match result {
        Err(_) => true,
        Ok(back) => back.is_empty(),
    }
}

fn at(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- the tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resolver_answers_learns_and_refuses() {
    if !enabled() {
        return;
    }
    let lab = Lab::new("dns");
    let up = upstream().await;
    let open = policy(true, &["allowed.test", "*.allowed.test"], &[]);
    let (services, learned) = start(&lab, &up, open, |_| {}).await;

    let a = ask(&lab, "allowed.test").await;
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addresses(&a), [ALLOWED_IP]);
    assert_eq!(
        *learned.lock().unwrap(),
        [(ALLOWED_IP, Duration::from_secs(300))]
    );
    // The end of a CNAME chain belongs to the name asked; its TTL is the chain's smallest,
    // clamped up to 30 s.
    let alias = ask(&lab, "alias.allowed.test").await;
    assert_eq!(addresses(&alias), [CDN_IP]);
    assert_eq!(
        learned.lock().unwrap()[1],
        (CDN_IP, Duration::from_secs(30))
    );
    // A name the policy does not allow is answered (everything is not denied) but not
    // reported.
    assert_eq!(addresses(&ask(&lab, "denied.test").await), [DENIED_IP]);
    assert_eq!(
        ask(&lab, "nothing.test").await.metadata.response_code,
        ResponseCode::NXDomain
    );
    assert_eq!(learned.lock().unwrap().len(), 2);
    // TCP works, and a truncated UDP answer is relayed as truncated, complete over TCP.
    let tcp = ask_tcp(&lab, &query("allowed.test", RecordType::A, None)).await;
    assert_eq!(addresses(&tcp), [ALLOWED_IP]);
    let big = query("big.allowed.test", RecordType::TXT, None);
    let cut = ask_udp(&lab, &big, Duration::from_secs(5)).await.unwrap();
    assert!(cut.metadata.truncation && cut.answers.is_empty());
    assert_eq!(ask_tcp(&lab, &big).await.answers.len(), BIG_TXT);
    // With EDNS, an answer (this one is over 2000 bytes) fits the size the guest gave, or
    // comes back truncated if upstream ignored it.
    let q = |size| query("big.allowed.test", RecordType::TXT, Some(size));
    let whole = ask_udp(&lab, &q(4096), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        (whole.metadata.truncation, whole.answers.len()),
        (false, BIG_TXT)
    );
    let small = ask_udp(&lab, &q(1000), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(small.metadata.truncation && small.answers.is_empty());

    // Locked down: only allowed names are resolved, and nothing else leaves the host.
    learned.lock().unwrap().clear();
    services.set_policy(policy(true, &["allowed.test"], &["0.0.0.0/0"]));
    let again = learned.lock().unwrap().clone();
    assert!(
        matches!(again[..], [(ip, left)] if ip == ALLOWED_IP
            && left > Duration::from_secs(290) && left <= Duration::from_secs(300)),
        "the addresses of names the new policy allows are reported again: {again:?}"
    );
    let before = up.queries.load(Ordering::SeqCst);
    for name in ["denied.test", "alias.allowed.test", "x.denied.test"] {
        assert_eq!(
            ask(&lab, name).await.metadata.response_code,
            ResponseCode::Refused,
            "{name}"
        );
    }
    let refused_tcp = ask_tcp(&lab, &query("denied.test", RecordType::A, None)).await;
    assert_eq!(refused_tcp.metadata.response_code, ResponseCode::Refused);
    assert_eq!(
        up.queries.load(Ordering::SeqCst),
        before,
        "a refused query went upstream"
    );
    assert_eq!(addresses(&ask(&lab, "allowed.test").await), [ALLOWED_IP]);

    // Offline: nothing is resolved.
    services.set_policy(policy(false, &["allowed.test"], &[]));
    let before = up.queries.load(Ordering::SeqCst);
    assert_eq!(
        ask(&lab, "allowed.test").await.metadata.response_code,
        ResponseCode::Refused
    );
    assert_eq!(up.queries.load(Ordering::SeqCst), before);
    assert!(services.allowed_addresses().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resolver_fails_slow_upstreams_and_bad_queries_cleanly() {
    if !enabled() {
        return;
    }
    let lab = Lab::new("slow");
    let up = upstream().await;
    let timeout = Duration::from_millis(1500);
    let (_services, _) = start(&lab, &up, policy(true, &[], &[]), |c| {
        c.upstream_timeout = timeout
    })
    .await;
    let t = Instant::now();
    let slow = ask(&lab, "slow.test").await;
    assert_eq!(slow.metadata.response_code, ResponseCode::ServFail);
    assert!(
        t.elapsed() >= timeout,
        "SERVFAIL before the timeout: {:?}",
        t.elapsed()
    );
    let slow_tcp = ask_tcp(&lab, &query("slow.test", RecordType::A, None)).await;
    assert_eq!(slow_tcp.metadata.response_code, ResponseCode::ServFail);

    // A flood: no more than 64 queries are in flight at once; the rest are dropped, as a
    // congested network would.
    let before = up.queries.load(Ordering::SeqCst);
    let flood = query("slow.test", RecordType::A, None).to_vec().unwrap();
    in_ns(&lab.guest, move || {
        let s = std::net::UdpSocket::bind("169.254.0.21:0").unwrap();
        for _ in 0..200 {
            s.send_to(&flood, SOME_DNS).unwrap();
        }
    })
    .await;
    let upstream_got = || up.queries.load(Ordering::SeqCst) - before;
    eventually("64 queries upstream", || upstream_got() >= 64).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(upstream_got(), 64, "queries in flight");
    tokio::time::sleep(timeout).await;

    // Garbage with a header gets FORMERR, without one nothing; the resolver goes on.
    let sock = in_ns(&lab.guest, || {
        let s = std::net::UdpSocket::bind("169.254.0.21:0").unwrap();
        s.connect(SOME_DNS).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.send(&[0xab, 0xcd, 0x01, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0xff])
            .unwrap();
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf).unwrap();
        s.send(&[1, 2, 3]).unwrap();
        (buf[..n].to_vec(), s.recv(&mut buf).is_err())
    })
    .await;
    let formerr = Message::from_vec(&sock.0).unwrap();
    assert_eq!(
        (formerr.metadata.id, formerr.metadata.response_code),
        (0xabcd, ResponseCode::FormErr)
    );
    assert!(sock.1, "an answer to three bytes");
    // A TCP query longer than any real one closes the connection.
    let mut s = connect(&lab, SOME_DNS).await;
    s.write_all(&[0xff, 0xff, 0, 0]).await.unwrap();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    assert_eq!(addresses(&ask(&lab, "allowed.test").await), [ALLOWED_IP]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_forwards_only_names_that_belong_to_their_address() {
    if !enabled() {
        return;
    }
    let lab = Lab::new("proxy");
    let seen = echo_servers(&lab).await;
    let up = upstream().await;
    let locked = policy(true, &["allowed.test", "*.allowed.test"], &["0.0.0.0/0"]);
    let (services, _) = start(&lab, &up, locked, |_| {}).await;
    // The guest resolves allowed.test through its resolver, as a client would.
    assert_eq!(addresses(&ask(&lab, "allowed.test").await), [ALLOWED_IP]);

    let hello = client_hello(Some("allowed.test"));
    let tls = at(ALLOWED_IP, 443);
    assert_eq!(
        exchange(&lab, tls, &hello).await.unwrap(),
        echoed(tls, &hello)
    );
    let http = at(ALLOWED_IP, 80);
    let get = http_get("Allowed.Test:80");
    assert_eq!(
        exchange(&lab, http, &get).await.unwrap(),
        echoed(http, &get)
    );

    for (what, dst, bytes) in [
        (
            "denied SNI",
            at(DENIED_IP, 443),
            client_hello(Some("denied.test")),
        ),
        (
            "allowed SNI, another address",
            at(DENIED_IP, 443),
            hello.clone(),
        ),
        ("no SNI", at(ALLOWED_IP, 443), client_hello(None)),
        ("not TLS", at(ALLOWED_IP, 443), http_get("allowed.test")),
        ("denied Host", at(DENIED_IP, 80), http_get("denied.test")),
        (
            "allowed Host, another address",
            at(DENIED_IP, 80),
            http_get("allowed.test"),
        ),
        (
            "an unknown allowed name",
            at(DENIED_IP, 443),
            client_hello(Some("nx.allowed.test")),
        ),
    ] {
        let got = exchange(&lab, dst, &bytes).await;
        assert!(refused(&got), "{what}: {got:?}");
    }
    // A name the guest never resolved is looked up upstream once (through its CNAME chain),
    // then believed from the proxy's cache.
    let before = up.queries.load(Ordering::SeqCst);
    let cdn = at(CDN_IP, 443);
    let alias = client_hello(Some("alias.allowed.test"));
    for _ in 0..2 {
        assert_eq!(
            exchange(&lab, cdn, &alias).await.unwrap(),
            echoed(cdn, &alias)
        );
    }
    assert_eq!(up.queries.load(Ordering::SeqCst), before + 1);

    let reached: Vec<SocketAddr> = seen.lock().unwrap().clone();
    assert_eq!(
        reached,
        [tls, http, cdn, cdn],
        "what the internet hosts saw"
    );
    eventually("no proxied connections", || {
        services.proxied_connections() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_policy_closes_the_connections_it_denies() {
    if !enabled() {
        return;
    }
    let lab = Lab::new("update");
    let _seen = echo_servers(&lab).await;
    let up = upstream().await;
    let first = policy(true, &["allowed.test", "203.0.113.12"], &["0.0.0.0/0"]);
    let (services, _) = start(&lab, &up, first, |_| {}).await;
    assert_eq!(addresses(&ask(&lab, "allowed.test").await), [ALLOWED_IP]);

    // Two live connections: one allowed by name, one by address.
    let open = |dst: SocketAddr, bytes: Vec<u8>| {
        let lab = &lab;
        async move {
            let mut s = connect(lab, dst).await;
            s.write_all(&bytes).await.unwrap();
            let mut back = vec![0u8; echoed(dst, &bytes).len()];
            s.read_exact(&mut back).await.unwrap();
            assert_eq!(back, echoed(dst, &bytes));
            s
        }
    };
    let mut by_name = open(at(ALLOWED_IP, 443), client_hello(Some("allowed.test"))).await;
    let mut by_addr = open(at(CDN_IP, 80), http_get("other.test")).await;
    assert_eq!(services.proxied_connections(), 2);

    services.set_policy(policy(true, &["203.0.113.12"], &["0.0.0.0/0"]));
    let mut buf = [0u8; 64];
    let cut = tokio::time::timeout(Duration::from_secs(2), by_name.read(&mut buf))
        .await
        .expect("the denied connection stayed open");
    assert!(matches!(cut, Ok(0) | Err(_)), "{cut:?}");
    eventually("one proxied connection", || {
        services.proxied_connections() == 1
    })
    .await;
    by_addr.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    by_addr.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still here");

    // And back: a new connection by name is allowed again.
    services.set_policy(policy(true, &["allowed.test"], &["0.0.0.0/0"]));
    let mut again = open(at(ALLOWED_IP, 443), client_hello(Some("allowed.test"))).await;
    assert_eq!(services.allowed_addresses().len(), 1);

    // A reset for the slot's next sandbox closes everything and forgets what was learned.
    services.reset(policy(true, &[], &[]));
    for s in [&mut again, &mut by_addr] {
        let cut = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .expect("a connection outlived the reset");
        assert!(matches!(cut, Ok(0) | Err(_)), "{cut:?}");
    }
    assert!(services.allowed_addresses().is_empty());
    eventually("no proxied connections", || {
        services.proxied_connections() == 0
    })
    .await;
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// How long an answer and a proxied exchange take (printed; `--nocapture` to read them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_timings() {
    if !enabled() {
        return;
    }
    let lab = Lab::new("time");
    let _seen = echo_servers(&lab).await;
    let up = upstream().await;
    let locked = policy(true, &["allowed.test"], &["0.0.0.0/0"]);
    let (_services, _) = start(&lab, &up, locked, |_| {}).await;
    let (mut dns, mut refused, mut tls) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..50 {
        let t = Instant::now();
        assert_eq!(addresses(&ask(&lab, "allowed.test").await), [ALLOWED_IP]);
        dns.push(t.elapsed());
        let t = Instant::now();
        let r = ask(&lab, "denied.test").await;
        refused.push(t.elapsed());
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
        let dst = at(ALLOWED_IP, 443);
        let hello = client_hello(Some("allowed.test"));
        let t = Instant::now();
        let mut s = connect(&lab, dst).await;
        s.write_all(&hello).await.unwrap();
        let mut back = vec![0u8; echoed(dst, &hello).len()];
        s.read_exact(&mut back).await.unwrap();
        tls.push(t.elapsed());
    }
    eprintln!(
        "egress timings over 50 rounds (medians): forwarded query {:?}, refused query {:?}, \
         proxied connect + ClientHello echoed {:?}",
        median(dns),
        median(refused),
        median(tls)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_fails_cleanly_without_the_gateway_address() {
    if !enabled() {
        return;
    }
    let lab = Lab::new("fail");
    let up = upstream().await;
    let on_learned: OnLearned = Arc::new(|_| {});
    // The internet namespace has no 169.254.0.22; a missing namespace is no namespace.
    for (netns, what) in [
        (PathBuf::from("/run/netns").join(&lab.inet), "bind"),
        (
            PathBuf::from("/run/netns/wrenn-egt-none"),
            "enter the namespace",
        ),
    ] {
        let cfg = EgressConfig::new(up.addr);
        let err = EgressServices::start(&netns, cfg, policy(true, &[], &[]), on_learned.clone())
            .await
            .unwrap_err();
        let wrenn_hostnet::EgressServicesError::Start { what: got, .. } = &err;
        assert_eq!(*got, what, "{err:?}");
    }
    // Nothing of the failed starts keeps the namespace busy: the services start in the slot
    // namespace, and twice in a row (the first one's sockets are gone once it is dropped).
    for _ in 0..2 {
        let t = Instant::now();
        let (services, _) = start(&lab, &up, policy(true, &[], &[]), |_| {}).await;
        eprintln!("egress services started in {:?}", t.elapsed());
        drop(services);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_services_closes_everything() {
    if !enabled() {
        return;
    }
    let lab = Lab::new("drop");
    let _seen = echo_servers(&lab).await;
    let up = upstream().await;
    let (services, _) = start(&lab, &up, policy(true, &[], &["denied.test"]), |_| {}).await;
    let dst = at(ALLOWED_IP, 80);
    let mut live = connect(&lab, dst).await;
    let get = http_get("allowed.test");
    live.write_all(&get).await.unwrap();
    let mut back = vec![0u8; echoed(dst, &get).len()];
    live.read_exact(&mut back).await.unwrap();
    assert_eq!(
        ask(&lab, "allowed.test").await.metadata.response_code,
        ResponseCode::NoError
    );

    drop(services);
    let mut buf = [0u8; 16];
    let cut = tokio::time::timeout(Duration::from_secs(2), live.read(&mut buf))
        .await
        .expect("a proxied connection outlived the services");
    assert!(matches!(cut, Ok(0) | Err(_)), "{cut:?}");
    // Nothing listens any more (the sockets close as the aborted tasks are dropped).
    let guest = lab.guest.clone();
    let gone = in_ns(&guest, move || {
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let proxy =
                std::net::TcpStream::connect_timeout(&at(ALLOWED_IP, 443), Duration::from_secs(1));
            let dns = std::net::TcpStream::connect_timeout(&SOME_DNS, Duration::from_secs(1));
            if proxy.is_err() && dns.is_err() {
                return true;
            }
            if Instant::now() > until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await;
    assert!(gone, "the listeners are still there");
    assert!(
        ask_udp(
            &lab,
            &query("allowed.test", RecordType::A, None),
            Duration::from_millis(500)
        )
        .await
        .is_none()
    );
}
