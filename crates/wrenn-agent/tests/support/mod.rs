//! Shared helpers for the real-VM tests and the runtime benchmark: the gate, building the small
//! image and a template snapshot, slots, and talking to envd (Connect JSON `Start`, `POST /files`).
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use wrenn_agent::accel::Accel;
use wrenn_agent::envd::EnvdClient;
use wrenn_agent::sandbox::SandboxNet as _;
use wrenn_agent::snapshot::{self, Snapshot};
use wrenn_agent::vm::{Launch, Memory, Vm, VmSpec, create_overlay};
use wrenn_hostnet::Slot;
use wrenn_image::{ENVD_PORT, Kernel, SmallImageInputs};

/// Template cold boots are slow under TCG on a loaded machine.
pub const COLD_BOOT_DEADLINE: Duration = Duration::from_secs(120);

/// Whether real-VM tests run (`WRENN_VM_TESTS=1`); prints why not.
pub fn enabled() -> bool {
    if std::env::var("WRENN_VM_TESTS").as_deref() == Ok("1") {
        return true;
    }
    eprintln!(
        "skipped: set WRENN_VM_TESTS=1 to run real QEMU guests (needs root, QEMU, the guest kernel, a static envd)"
    );
    false
}

/// Sets up `tracing` output captured by the test harness (once per process).
pub fn init_tracing(filter: &str) {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(filter)
        .try_init();
}

/// A temporary work directory under `/var/tmp` (disk-backed: images and VM memory files are
/// large). Declare it before VMs and slots so that it is dropped after them.
pub fn work_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")
        .unwrap()
}

/// The static guest envd (`scripts/build-guest-envd.sh`).
pub fn envd_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("WRENN_ENVD_BIN") {
        return p.into();
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace.join("target"), PathBuf::from);
    target.join("x86_64-unknown-linux-gnu/guest/envd")
}

static NEXT_SLOT: AtomicU32 = AtomicU32::new(0);

/// The spec the tests boot: a 512 MiB, one-vCPU guest with the default command line.
pub fn vm_spec(accel: Accel, kernel: &Kernel, initramfs: &Path) -> VmSpec {
    VmSpec {
        accel,
        kernel: kernel.vmlinuz.clone(),
        initramfs: initramfs.to_owned(),
        cmdline: VmSpec::default_cmdline(accel),
        memory_mib: 512,
        vcpus: 1,
    }
}

/// A new slot with an index unlikely to collide with other test processes.
pub async fn new_slot() -> Slot {
    let n = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
    let index = 8000 + (std::process::id() % 2800) * 8 + n % 8;
    Slot::create(index).await.expect("slot")
}

/// Builds the small image (cached by content in `cache`) and a 512 MiB template snapshot in
/// `template_dir`, booting it cold in a temporary slot.
pub async fn build_template(cache: &Path, template_dir: &Path, work: &Path) -> Snapshot {
    let accel = Accel::detect().unwrap();
    let envd = envd_binary();
    assert!(envd.is_file(), "no static envd at {}", envd.display());
    let kernel = Kernel::find(None).expect("guest kernel");
    let initramfs =
        wrenn_image::build_initramfs(cache, &kernel, Path::new("/bin/busybox")).unwrap();
    let rootfs = wrenn_image::build_small_rootfs(cache, &SmallImageInputs::debian(envd)).unwrap();
    let slot = new_slot().await;
    let spec = vm_spec(accel, &kernel, &initramfs.path);
    std::fs::create_dir_all(template_dir).unwrap();
    let boot_dir = work.join("template-boot");
    std::fs::create_dir_all(&boot_dir).unwrap();
    let disk = boot_dir.join("rootfs.qcow2");
    create_overlay(&rootfs.path, "raw", &disk).await.unwrap();
    let vm = Vm::launch(Launch {
        spec: spec.clone(),
        dir: boot_dir.clone(),
        disk: disk.clone(),
        memory: Memory::Shared(snapshot::template_memory_path(template_dir)),
        net: Some(slot.attach()),
        incoming: None,
        extra_disks: vec![],
    })
    .await
    .expect("launch template VM");
    let client = EnvdClient::new(slot.guest_endpoint(ENVD_PORT));
    if let Err(e) = client.wait_healthy(COLD_BOOT_DEADLINE).await {
        panic!("cold boot: {e}\nconsole:\n{}", vm.console_text().await);
    }
    client
        .snapshot_prepare(Duration::from_secs(30))
        .await
        .expect("/snapshot/prepare");
    let snap = snapshot::snapshot_template(vm, &spec, &disk, &rootfs.path, template_dir)
        .await
        .expect("snapshot");
    drop(slot);
    snap
}

/// The end of a file, lossily.
pub fn tail(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(3000)..]).into_owned()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// Who runs a command through envd, and how long the call may take.
#[derive(Clone, Copy, Debug)]
pub struct RunOpts<'a> {
    /// The guest user (HTTP Basic auth without a password).
    pub user: &'a str,
    /// envd's access token (`X-Access-Token`), once `/init` has set one.
    pub token: Option<&'a str>,
    /// The limit for the whole call, command included.
    pub timeout: Duration,
}

impl Default for RunOpts<'_> {
    fn default() -> Self {
        Self {
            user: "root",
            token: None,
            timeout: Duration::from_secs(120),
        }
    }
}

/// Runs `/bin/bash -l -c <cmd>` through envd's `process.Process/Start` (Connect JSON
/// envelopes) and returns (stdout, exit code); the guest's stderr goes to the test's stderr.
pub async fn run_with(base: &str, opts: RunOpts<'_>, cmd: &str) -> (String, i64) {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let msg = serde_json::json!({
        "process": { "cmd": "/bin/bash", "args": ["-l", "-c", cmd], "envs": {} }
    })
    .to_string();
    let mut body = vec![0u8];
    body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    body.extend_from_slice(msg.as_bytes());
    let mut req = http()
        .post(format!("{base}/process.Process/Start"))
        .header("content-type", "application/connect+json")
        .header(
            "authorization",
            format!("Basic {}", b64.encode(format!("{}:", opts.user))),
        )
        .timeout(opts.timeout)
        .body(body);
    if let Some(token) = opts.token {
        req = req.header("x-access-token", token);
    }
    let resp = req.send().await.expect("Start request");
    assert_eq!(resp.status(), 200, "Start status");
    let bytes = resp.bytes().await.unwrap();
    let (mut stdout, mut exit, mut rest) = (String::new(), None, &bytes[..]);
    while rest.len() >= 5 {
        let flags = rest[0];
        let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        let v: serde_json::Value = serde_json::from_slice(&rest[5..5 + len]).unwrap();
        rest = &rest[5 + len..];
        if flags & 2 != 0 {
            assert!(v.get("error").is_none(), "end-stream error: {v}");
            break;
        }
        let event = &v["event"];
        if let Some(data) = event["data"]["stdout"].as_str() {
            stdout.push_str(&String::from_utf8_lossy(&b64.decode(data).unwrap()));
        }
        if let Some(data) = event["data"]["stderr"].as_str() {
            eprint!(
                "guest stderr: {}",
                String::from_utf8_lossy(&b64.decode(data).unwrap())
            );
        }
        if let Some(end) = event.get("end") {
            exit = Some(end["exitCode"].as_i64().unwrap_or(0));
        }
    }
    (stdout, exit.expect("no end event"))
}

/// Runs a command that must succeed with `opts`; returns its trimmed stdout.
pub async fn run_ok_with(base: &str, opts: RunOpts<'_>, cmd: &str) -> String {
    let (out, code) = run_with(base, opts, cmd).await;
    assert_eq!(code, 0, "`{cmd}` as {} exited {code}: {out}", opts.user);
    out.trim().to_owned()
}

/// [`run_with`] as root, without a token.
pub async fn run(base: &str, cmd: &str) -> (String, i64) {
    run_with(base, RunOpts::default(), cmd).await
}

/// [`run_ok_with`] as root, without a token.
pub async fn run_ok(base: &str, cmd: &str) -> String {
    run_ok_with(base, RunOpts::default(), cmd).await
}

/// Writes a file as root through `POST /files` (octet-stream).
pub async fn write_file(base: &str, path: &str, data: &[u8]) {
    let resp = http()
        .post(format!("{base}/files"))
        .query(&[("path", path), ("username", "root")])
        .header("content-type", "application/octet-stream")
        .timeout(Duration::from_secs(60))
        .body(data.to_vec())
        .send()
        .await
        .expect("POST /files");
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    assert!(status.is_success(), "POST /files {status}: {text}");
}

/// Whether a process is alive (neither gone nor a zombie).
pub fn pid_alive(pid: u32) -> bool {
    wrenn_agent::state::process_start_time(pid).is_some()
}

/// Live QEMU processes whose command line mentions `dir` (wherever they came from).
pub fn qemu_pids_under(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.starts_with("qemu-system") && cmdline.contains(&needle) && pid_alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// Every file under `dir` (directories excluded).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The host clock as seconds since the epoch.
pub fn host_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The host clock as RFC 3339 in UTC with nanoseconds, as envd's `/init` takes it.
pub fn now_rfc3339() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%S.%NZ"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The first index of a [`wrenn_agent::pool::SlotPool`] for the sandbox test and the benchmark
/// (4 indices each), clear of [`new_slot`]'s range and of the pool tests' ranges.
pub fn pool_first_slot() -> u32 {
    32_600 + (std::process::id() % 40) * 4
}

/// An [`Agent`](wrenn_agent::Agent) serving `AgentService` on a loopback port, with the
/// small image's template registered as `template_id` (envd version `test-envd`).
pub struct TestAgent {
    /// The work directory (template, images, `sandboxes/`); dropped last.
    pub work: tempfile::TempDir,
    /// The agent's sandboxes directory.
    pub sandboxes: PathBuf,
    pub agent: std::sync::Arc<wrenn_agent::Agent>,
    /// A JSON Connect client for the agent's RPC.
    pub client: wrenn_connect::Client,
    pub server: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Builds the small template in a fresh work directory and starts an agent (host ID
/// `test-host`) with a pool of `pool` slots from `first_slot` (4 indices) and room for
/// `max_sandboxes`, with deadlines for a loaded TCG host.
pub async fn start_agent(
    prefix: &str,
    template_id: &str,
    first_slot: u32,
    pool: usize,
    max_sandboxes: u32,
) -> TestAgent {
    use wrenn_agent::Agent;
    use wrenn_agent::pool::SlotPool;
    use wrenn_agent::sandbox::Deadlines;

    init_tracing("wrenn_agent=debug");
    let work = work_dir(prefix);
    let w = work.path().to_owned();
    let t = std::time::Instant::now();
    let template = build_template(&w.join("images"), &w.join("template"), &w).await;
    eprintln!("template built and snapshotted in {:?}", t.elapsed());
    let template = Snapshot::open(&template.dir).expect("open template");
    let slots = SlotPool::new(pool, first_slot, 4).await.expect("slot pool");
    let sandboxes = w.join("sandboxes");
    std::fs::create_dir_all(&sandboxes).unwrap();
    let agent = std::sync::Arc::new(Agent::new(
        "test-host",
        slots,
        sandboxes.clone(),
        max_sandboxes,
        Deadlines {
            health: Duration::from_secs(60),
            init: Duration::from_secs(30),
            prepare: Duration::from_secs(30),
            boot: Duration::from_secs(180),
        },
    ));
    agent.register_template(template_id, template, None, "test-envd");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server =
        tokio::spawn(axum::serve(listener, wrenn_agent::rpc::router(agent.clone())).into_future());
    let client = wrenn_connect::Client::new(&format!("http://{addr}"))
        .unwrap()
        .with_codec(wrenn_connect::Codec::Json)
        .with_timeout(Duration::from_secs(180));
    TestAgent {
        work,
        sandboxes,
        agent,
        client,
        server,
    }
}

/// One unary agent RPC.
pub async fn call<Req: wrenn_connect::Message, Resp: wrenn_connect::Message>(
    c: &wrenn_connect::Client,
    path: &str,
    req: Req,
) -> Result<Resp, wrenn_connect::ConnectError> {
    c.unary(path, &req).await
}

/// Runs `args` inside network namespace `netns`: whether it succeeded, and its stdout.
pub fn in_netns(netns: &str, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// What a slot's metadata endpoint answers inside its namespace: whether curl succeeded, and
/// the body followed by a line with the HTTP status.
pub fn slot_metadata(netns: &str) -> (bool, String) {
    in_netns(
        netns,
        &[
            "curl",
            "-sS",
            "--noproxy",
            "*",
            "-m",
            "3",
            "-w",
            "\n%{http_code}",
            "http://169.254.169.254/",
        ],
    )
}

/// Run options carrying envd's access token `token` (as root).
pub fn with_token(token: &str) -> RunOpts<'_> {
    RunOpts {
        token: Some(token),
        ..Default::default()
    }
}

/// The lifecycle deadlines the VM tests run with: generous for TCG on a loaded machine.
pub fn vm_deadlines() -> wrenn_agent::sandbox::Deadlines {
    wrenn_agent::sandbox::Deadlines {
        health: Duration::from_secs(60),
        init: Duration::from_secs(30),
        prepare: Duration::from_secs(30),
        boot: Duration::from_secs(180),
    }
}

/// A create of `template` as `id` whose envd takes only `token`, from snapshot `snapshot`
/// when given.
pub fn secured_create(
    id: &str,
    template: &str,
    token: &str,
    snapshot: Option<&str>,
) -> wrenn_agent::controller::CreateArgs {
    wrenn_agent::controller::CreateArgs {
        sandbox_id: id.into(),
        template_id: template.into(),
        init: wrenn_agent::runtime::GuestInit {
            access_token: Some(token.into()),
            ..Default::default()
        },
        snapshot_id: snapshot.map(str::to_owned),
        ..Default::default()
    }
}

/// An agent over `slots` slots from index `first`, sandboxes under `root` (at most `slots`),
/// with `template` registered as `template_id`.
pub async fn vm_agent(
    first: u32,
    slots: u32,
    root: &Path,
    template_id: &str,
    template: &Snapshot,
) -> wrenn_agent::Agent {
    let pool = wrenn_agent::pool::SlotPool::new(2, first, slots)
        .await
        .expect("slot pool");
    let a = wrenn_agent::Agent::new("test-host", pool, root.to_owned(), slots, vm_deadlines());
    a.register_template(template_id, template.clone(), None, "test-envd");
    a
}
