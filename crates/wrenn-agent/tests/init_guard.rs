//! A restored guest's `/init` is guarded from its first instruction on: the agent publishes the
//! sandbox's identity and token hash on the slot's metadata endpoint *before* the guest runs, in
//! create and in resume, and clears it when the sandbox leaves the slot.
//!
//! The host's own `/init` goes through a gate (a small proxy the test puts in front of the guest's
//! envd) that holds it; while it is held, a racer inside the slot's network namespace (the way
//! the host reaches the guest) sends `/init` with a wrong token. Control: with publishing off
//! (a net that drops the document), the racer claims the fresh guest (204) and the host's own
//! `/init` is then refused, which is the hole; with publishing on, the racer gets 401 and the
//! host's `/init` succeeds. Real QEMU guests with our envd; needs `WRENN_VM_TESTS=1`. Slots
//! 5200..5400.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use tokio::sync::{Semaphore, mpsc};
use wrenn_agent::pool::{SlotLease, SlotPool};
use wrenn_agent::runtime::SandboxMeta;
use wrenn_agent::sandbox::{Deadlines, Failed, InitConfig, PauseError, Sandbox, SandboxNet};
use wrenn_agent::snapshot::Snapshot;
use wrenn_agent::vm::NetAttach;
use wrenn_hostnet::Metadata;
use wrenn_image::ENVD_PORT;

const TOKEN: &str = "the-hosts-token";
const SANDBOX: &str = "sbx-init-guard";
const TEMPLATE: &str = "tpl-small";

/// Holds the next `/init` that passes through until released.
struct Gate {
    addr: SocketAddr,
    armed: Arc<AtomicBool>,
    arrived: mpsc::UnboundedReceiver<()>,
    release: Arc<Semaphore>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct GateState {
    target: SocketAddr,
    armed: Arc<AtomicBool>,
    arrived: mpsc::UnboundedSender<()>,
    release: Arc<Semaphore>,
    client: wrenn_http::forward::HttpClient,
}

async fn gate_handler(State(g): State<GateState>, req: Request) -> Response {
    if req.uri().path() == "/init" && g.armed.swap(false, Ordering::SeqCst) {
        let _ = g.arrived.send(());
        g.release.acquire().await.expect("gate open").forget();
    }
    match wrenn_http::forward::forward(&g.client, &format!("http://{}", g.target), req).await {
        Ok(resp) => resp,
        Err(e) => (axum::http::StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

impl Gate {
    async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, arrived) = mpsc::unbounded_channel();
        let armed = Arc::new(AtomicBool::new(false));
        let release = Arc::new(Semaphore::new(0));
        let state = GateState {
            target,
            armed: armed.clone(),
            arrived: tx,
            release: release.clone(),
            client: wrenn_http::forward::client(Duration::from_secs(5)),
        };
        let app = axum::Router::new().fallback(gate_handler).with_state(state);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Gate {
            addr,
            armed,
            arrived,
            release,
            task,
        }
    }

    /// Waits until the host's `/init` is held (armed beforehand).
    async fn held(&mut self) {
        tokio::time::timeout(Duration::from_secs(120), self.arrived.recv())
            .await
            .expect("the host's /init never came")
            .expect("gate gone");
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A pool slot whose envd the host reaches through a [`Gate`]; `publish: false` drops the
/// metadata document (the control: what the agent did before).
struct Gated {
    lease: SlotLease,
    gate: SocketAddr,
    publish: bool,
}

impl SandboxNet for Gated {
    fn attach(&self) -> NetAttach {
        self.lease.attach()
    }
    fn envd_addr(&self) -> SocketAddr {
        self.gate
    }
    fn slot_index(&self) -> Option<u32> {
        self.lease.slot_index()
    }
    fn publish(&self, doc: Option<Metadata>) {
        if self.publish {
            self.lease.publish(doc);
        }
    }
}

/// `/init` with a wrong token from inside the slot's namespace, straight to the guest; the
/// HTTP status and body.
fn racing_init(netns: &str) -> String {
    support::in_netns(
        netns,
        &[
            "curl",
            "-sS",
            "--noproxy",
            "*",
            "-m",
            "10",
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "--data",
            r#"{"accessToken":"a-racers-token","envVars":{"OWNED":"1"}}"#,
            "-w",
            "\n%{http_code}",
            &format!("http://169.254.0.21:{ENVD_PORT}/init"),
        ],
    )
    .1
}

fn meta() -> SandboxMeta {
    SandboxMeta {
        sandbox_id: SANDBOX.into(),
        template_id: TEMPLATE.into(),
        vcpus: 1,
        memory_mb: 512,
        start_unix_ms: 0,
        backstop_unix_ms: 0,
        auto_pause: false,
        envd_version: "test".into(),
        egress: Default::default(),
    }
}

fn init() -> InitConfig {
    InitConfig {
        access_token: Some(TOKEN.into()),
        ..Default::default()
    }
}

fn deadlines() -> Deadlines {
    Deadlines {
        health: Duration::from_secs(90),
        init: Duration::from_secs(60),
        prepare: Duration::from_secs(60),
        boot: Duration::from_secs(180),
    }
}

/// `GET /envs` on the guest with `token`: its status.
async fn envs_status(addr: SocketAddr, token: &str) -> u16 {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://{addr}/envs"))
        .header("x-access-token", token)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("GET /envs")
        .status()
        .as_u16()
}

async fn create(
    snap: &Snapshot,
    net: Gated,
    root: &Path,
) -> tokio::task::JoinHandle<Result<Sandbox<Gated>, Failed<Gated>>> {
    let (snap, root) = (snap.clone(), root.to_owned());
    tokio::spawn(async move {
        Sandbox::create(&snap, net, &root, init(), Some(meta()), &deadlines())
            .await
            .map(|(sb, _)| sb)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_racing_init_cannot_claim_a_restored_guest() {
    if !support::enabled() {
        return;
    }
    support::init_tracing("wrenn_agent=debug");
    let work = support::work_dir("wrenn-init-guard");
    let w = work.path().to_owned();
    let first = 5200 + (std::process::id() % 50) * 4;
    let slots = SlotPool::new(2, first, 4).await.expect("slot pool");
    let snap = support::build_template(&w.join("images"), &w.join("template"), &w).await;
    let snap = Snapshot::open(&snap.dir).unwrap();
    let hash = wrenn_hostnet::token_hash(TOKEN);

    // --- Control: nothing published, so the fresh guest's /init is open to the racer. ---
    let lease = slots.acquire().await.unwrap();
    let netns = lease.slot().netns().to_owned();
    let mut gate = Gate::start(lease.slot().guest_endpoint(ENVD_PORT)).await;
    gate.armed.store(true, Ordering::SeqCst);
    let net = Gated {
        lease,
        gate: gate.addr,
        publish: false,
    };
    let task = create(&snap, net, &w.join("control")).await;
    gate.held().await;
    let raced = racing_init(&netns);
    gate.release.add_permits(1);
    let outcome = task.await.unwrap();
    assert!(
        raced.ends_with("204"),
        "control: an unguarded guest should take the racer's /init: {raced}"
    );
    let Err(Failed { error, net }) = outcome else {
        panic!("control: the host's /init should have been refused after the racer's");
    };
    let msg = wrenn_agent::error_chain(&error);
    assert!(msg.contains("401"), "control: {msg}");
    eprintln!("control (nothing published): racer -> 204, host /init -> refused: {msg}");
    slots.release(net.lease).await;
    drop(gate);

    // --- Create: the hash is published before the guest runs. ---
    let lease = slots.acquire().await.unwrap();
    let netns = lease.slot().netns().to_owned();
    let guest = lease.slot().guest_endpoint(ENVD_PORT);
    let mut gate = Gate::start(guest).await;
    gate.armed.store(true, Ordering::SeqCst);
    let net = Gated {
        lease,
        gate: gate.addr,
        publish: true,
    };
    let task = create(&snap, net, &w.join("guarded")).await;
    gate.held().await;
    let doc = support::slot_metadata(&netns).1;
    let raced = racing_init(&netns);
    gate.release.add_permits(1);
    let sb = match task.await.unwrap() {
        Ok(sb) => sb,
        Err(Failed { error, .. }) => panic!("create: {}", wrenn_agent::error_chain(&error)),
    };
    assert!(doc.ends_with("200"), "metadata while /init was held: {doc}");
    assert!(
        doc.contains(&format!("\"instanceID\":\"{SANDBOX}\"")),
        "{doc}"
    );
    assert!(doc.contains(&format!("\"envID\":\"{TEMPLATE}\"")), "{doc}");
    assert!(
        doc.contains(&format!("\"accessTokenHash\":\"{hash}\"")),
        "{doc}"
    );
    assert!(raced.ends_with("401"), "create: racer's /init: {raced}");
    assert!(raced.contains("published access token hash"), "{raced}");
    assert_eq!(envs_status(guest, TOKEN).await, 200);
    assert_eq!(envs_status(guest, "a-racers-token").await, 401);
    eprintln!("create: metadata served before /init, racer -> 401, host /init -> 204");

    // --- Pause: the slot forgets the sandbox. Resume: published again before the guest runs. ---
    let (paused, net, _) = match sb.pause(&deadlines()).await {
        Ok(x) => x,
        Err(PauseError::StillRunning { error, .. } | PauseError::Lost { error, .. }) => {
            panic!("pause: {}", wrenn_agent::error_chain(&error))
        }
    };
    let after_pause = support::slot_metadata(&netns).1;
    assert!(after_pause.ends_with("404"), "after pause: {after_pause}");
    gate.armed.store(true, Ordering::SeqCst);
    let task =
        tokio::spawn(async move { paused.resume(net, &deadlines()).await.map(|(sb, _)| sb) });
    gate.held().await;
    let doc = support::slot_metadata(&netns).1;
    let raced = racing_init(&netns);
    gate.release.add_permits(1);
    let sb = match task.await.unwrap() {
        Ok(sb) => sb,
        Err(Failed { error, .. }) => panic!("resume: {}", wrenn_agent::error_chain(&error)),
    };
    assert!(
        doc.contains(&format!("\"accessTokenHash\":\"{hash}\"")),
        "resume: {doc}"
    );
    assert!(raced.ends_with("401"), "resume: racer's /init: {raced}");
    assert_eq!(envs_status(guest, TOKEN).await, 200);
    eprintln!("resume: metadata served before /init, racer -> 401, host /init -> 204");

    // --- Kill: the slot serves nobody. ---
    let net = sb.kill().await;
    let after_kill = support::slot_metadata(&netns).1;
    assert!(after_kill.ends_with("404"), "after kill: {after_kill}");
    slots.release(net.lease).await;
    slots.shutdown().await;
}
