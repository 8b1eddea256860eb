//! Who can use a real agent's RPC and traffic proxy (no VMs; needs root):
//! - on its Unix socket (`wrenn up`'s): root can, another user of the host (`nobody`, through
//!   `setpriv`) cannot even connect, neither to the RPC nor to the proxy, also when only the
//!   socket's own mode (0600) stands in the way;
//! - over TCP: only requests with the host's secret (`Authorization: Bearer` for the RPC,
//!   `Proxy-Authorization: Bearer` for sandbox traffic) get in; missing or wrong -> 401;
//! - the control plane's Connect client reaches it over both.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use wrenn_agent::Agent;
use wrenn_agent::pool::SlotPool;
use wrenn_agent::sandbox::Deadlines;
use wrenn_agent::surface::{self, AgentSecret};
use wrenn_agent_proto::paths;
use wrenn_agent_proto::v1::{HostInfoRequest, HostInfoResponse};

const SECRET: &str = "a-test-agent-secret";

async fn agent(dir: &Path) -> Arc<Agent> {
    // No slots: nothing here starts a VM. Index range of this file: 5200..5400 (unused).
    let slots = SlotPool::new(0, 5390, 1).await.unwrap();
    Arc::new(Agent::new(
        "surface-host",
        slots,
        dir.join("sandboxes"),
        4,
        Deadlines::default(),
    ))
}

/// `curl` (as `user`, or as root) against the agent; exit code and `status body`.
fn curl(user: Option<&str>, target: &[&str], headers: &[&str], url: &str) -> (i32, String) {
    let mut cmd = match user {
        Some(u) => {
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={u}"),
                "--regid=nogroup",
                "--clear-groups",
                "curl",
            ]);
            c
        }
        None => Command::new("curl"),
    };
    cmd.args(["-sS", "--noproxy", "*", "-m", "10", "-w", "%{http_code}"])
        .args(target);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(url).output().expect("run curl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn rpc_args() -> Vec<&'static str> {
    vec![
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "--data",
        "{}",
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_root_or_the_secret_gets_in() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (it runs curl as nobody through setpriv)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path()).await;
    let stop = CancellationToken::new();

    // --- The Unix socket. ---
    let sock = dir.path().join("run/agent.sock");
    let listener = surface::bind_unix(&sock).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(sock.parent().unwrap()), 0o700);
    assert_eq!(mode(&sock), 0o600);
    tokio::spawn(surface::serve_unix(listener, agent.clone(), stop.clone()));
    let s = sock.to_str().unwrap();
    let unix = ["--unix-socket", s];
    let host_info = format!("http://agent{}", paths::HOST_INFO);
    let rpc: Vec<&str> = unix.iter().copied().chain(rpc_args()).collect();
    let proxy = ["E2b-Sandbox-Id: nosuchsandbox"];

    let (code, out) = curl(None, &rpc, &[], &host_info);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("\"hostId\":\"surface-host\"") && out.ends_with("200"),
        "root: {out}"
    );
    let (_, out) = curl(None, &unix, &proxy, "http://agent/health");
    assert!(
        out.contains("was not found") && out.ends_with("502"),
        "root, proxy: {out}"
    );
    eprintln!("root over the socket: RPC 200, proxy reached (502 for an unknown sandbox)");

    // Another user: the directory (0700) already stops it; then the socket's own mode (0600)
    // with the directories opened up.
    for lock in ["directory 0700", "socket 0600"] {
        if lock == "socket 0600" {
            for d in [dir.path(), sock.parent().unwrap()] {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
        for (what, args, headers, url) in [
            ("RPC", rpc.clone(), &[][..], host_info.as_str()),
            ("proxy", unix.to_vec(), &proxy[..], "http://agent/health"),
        ] {
            let (code, out) = curl(Some("nobody"), &args, headers, url);
            assert_eq!(
                code, 7,
                "nobody, {what}, {lock}: curl should not connect: {out}"
            );
            assert!(
                out.contains("Permission denied") || out.contains("Couldn't connect"),
                "{out}"
            );
        }
        eprintln!("nobody over the socket ({lock}): cannot connect to the RPC or the proxy");
    }
    std::fs::set_permissions(
        sock.parent().unwrap(),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();

    // The control plane's client over the socket.
    let client = wrenn_connect::Client::new(&format!("unix:{s}"))
        .unwrap()
        .with_timeout(Duration::from_secs(10));
    let info: HostInfoResponse = client
        .unary(paths::HOST_INFO, &HostInfoRequest {})
        .await
        .unwrap();
    assert_eq!(info.host_id, "surface-host");

    // --- TCP, with the secret. ---
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", tcp.local_addr().unwrap());
    tokio::spawn(surface::serve_tcp(
        tcp,
        agent.clone(),
        AgentSecret::new(SECRET).unwrap(),
        stop.clone(),
    ));
    let host_info = format!("{base}{}", paths::HOST_INFO);
    let rpc = rpc_args();
    let right = format!("Authorization: Bearer {SECRET}");
    let proxy_right = format!("Proxy-Authorization: Bearer {SECRET}");
    for (headers, want) in [
        (vec![], "401"),
        (vec!["Authorization: Bearer not-the-secret"], "401"),
        // The proxy's header does not open the RPC.
        (vec![proxy_right.as_str()], "401"),
        (vec![right.as_str()], "200"),
    ] {
        let (_, out) = curl(None, &rpc, &headers, &host_info);
        assert!(out.ends_with(want), "RPC with {headers:?}: {out}");
        if want == "401" {
            assert!(out.contains("requires its secret"), "{out}");
        }
    }
    for (headers, want) in [
        (vec![proxy[0]], "401"),
        (vec![proxy[0], right.as_str()], "401"),
        (vec![proxy[0], "Proxy-Authorization: Bearer nope"], "401"),
        (vec![proxy[0], proxy_right.as_str()], "502"),
    ] {
        let (_, out) = curl(None, &[], &headers, &format!("{base}/health"));
        assert!(out.ends_with(want), "proxy with {headers:?}: {out}");
    }
    eprintln!("TCP: RPC and proxy refuse (401) without or with a wrong secret, serve with it");

    let no_secret = wrenn_connect::Client::new(&base).unwrap();
    let err = no_secret
        .unary::<_, HostInfoResponse>(paths::HOST_INFO, &HostInfoRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code, wrenn_connect::Code::Unauthenticated, "{err:?}");
    let with_secret = wrenn_connect::Client::new(&base).unwrap().with_header(
        axum::http::header::AUTHORIZATION,
        axum::http::HeaderValue::from_str(&format!("Bearer {SECRET}")).unwrap(),
    );
    let info: HostInfoResponse = with_secret
        .unary(paths::HOST_INFO, &HostInfoRequest {})
        .await
        .unwrap();
    assert_eq!(info.host_id, "surface-host");
    stop.cancel();
}
