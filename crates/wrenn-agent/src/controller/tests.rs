//! Ring-2 tests of the controller with a fake runtime: every operation cancelled at every
//! await point (by its caller going away, and by the process dropping the task) leaves a
//! consistent table; concurrent operations on one sandbox are refused.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::*;
use crate::runtime::{Stages, TemplateInfo};

const STEPS_CREATE: &[&str] = &[
    "create:slot",
    "create:restore",
    "create:health",
    "create:init",
];
const STEPS_PAUSE: &[&str] = &["pause:prepare", "pause:save", "pause:quit", "pause:commit"];
const STEPS_RESUME: &[&str] = &[
    "resume:slot",
    "resume:restore",
    "resume:health",
    "resume:init",
];
const STEPS_KILL: &[&str] = &["kill:stop", "kill:remove"];
/// A running source's snapshot, captured in place.
const STEPS_SNAPSHOT: &[&str] = &["checkpoint:prepare", "checkpoint:save", "checkpoint:cont"];

/// The fake host: which VMs run and which paused sandboxes are complete on disk.
#[derive(Debug, Default)]
struct Host {
    live: HashSet<String>,
    disk: HashSet<String>,
    saved_meta: HashMap<String, SandboxMeta>,
    /// The egress each running VM's slot has now.
    egress: HashMap<String, Egress>,
    /// Snapshots taken.
    snapshots: HashMap<String, crate::runtime::SnapshotTaken>,
}

#[derive(Debug, Default)]
struct Fake {
    host: Arc<Mutex<Host>>,
    /// A step that fails.
    fail: Mutex<Option<&'static str>>,
    /// A step that waits for `release` (reported through `reached`).
    hold: Mutex<Option<&'static str>>,
    reached: Notify,
    release: Notify,
    steps: Mutex<Vec<&'static str>>,
}

/// A fake VM: dropping it stops it, as dropping a `Vm` kills QEMU.
#[derive(Debug)]
struct FakeVm {
    id: String,
    host: Arc<Mutex<Host>>,
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        lock(&self.host).live.remove(&self.id);
    }
}

#[derive(Debug)]
struct FakePaused(String);

fn err(step: &'static str) -> RuntimeError {
    RuntimeError::step(step)(format!("{step} injected").into())
}

impl Fake {
    async fn step(&self, name: &'static str) -> Result<(), RuntimeError> {
        lock(&self.steps).push(name);
        if *lock(&self.hold) == Some(name) {
            let released = self.release.notified();
            self.reached.notify_one();
            released.await;
        }
        tokio::task::yield_now().await;
        if *lock(&self.fail) == Some(name) {
            return Err(err(name));
        }
        Ok(())
    }

    /// A snapshot of `meta` the fake host now holds.
    fn record_snapshot(&self, meta: &SandboxMeta, id: &str) -> crate::runtime::SnapshotTaken {
        let taken = crate::runtime::SnapshotTaken {
            template_id: meta.template_id.clone(),
            vcpus: meta.vcpus,
            memory_mb: meta.memory_mb,
            envd_version: meta.envd_version.clone(),
            disk_bytes: 1,
            memory_bytes: 1,
            parent: None,
        };
        lock(&self.host)
            .snapshots
            .insert(id.to_owned(), taken.clone());
        taken
    }

    fn start_vm(&self, id: &str) -> FakeVm {
        lock(&self.host).live.insert(id.to_owned());
        FakeVm {
            id: id.to_owned(),
            host: self.host.clone(),
        }
    }
}

impl Runtime for Fake {
    type Running = FakeVm;
    type Paused = FakePaused;

    fn template(&self, id: &str) -> Option<TemplateInfo> {
        (id == "base").then(|| TemplateInfo {
            vcpus: 2,
            memory_mb: 512,
            disk_mb: 1024,
            envd_version: "0.0.1".into(),
        })
    }

    fn templates(&self) -> Vec<(String, TemplateInfo)> {
        vec![("base".into(), self.template("base").unwrap())]
    }

    async fn create(
        &self,
        meta: &SandboxMeta,
        _init: GuestInit,
    ) -> Result<(FakeVm, Stages), RuntimeError> {
        self.step("create:slot").await?;
        let vm = self.start_vm(&meta.sandbox_id);
        self.step("create:restore").await?;
        self.step("create:health").await?;
        self.step("create:init").await?;
        lock(&self.host)
            .saved_meta
            .insert(meta.sandbox_id.clone(), meta.clone());
        Ok((vm, Stages::default()))
    }

    async fn pause(
        &self,
        meta: &SandboxMeta,
        sb: FakeVm,
        _mode: PauseMode,
    ) -> Result<FakePaused, PauseFailure<FakeVm>> {
        for s in &STEPS_PAUSE[..2] {
            if let Err(e) = self.step(s).await {
                return Err(PauseFailure::Running(e, sb));
            }
        }
        drop(sb);
        // From the quit on the VM is gone; the snapshot is complete once committed.
        if let Err(e) = self.step("pause:quit").await {
            return Err(PauseFailure::Lost(e));
        }
        if let Err(e) = self.step("pause:commit").await {
            return Err(PauseFailure::Lost(e));
        }
        lock(&self.host).disk.insert(meta.sandbox_id.clone());
        Ok(FakePaused(meta.sandbox_id.clone()))
    }

    async fn resume(
        &self,
        meta: &SandboxMeta,
        p: FakePaused,
        _init: GuestInit,
    ) -> Result<FakeVm, ResumeFailure<FakePaused>> {
        if let Err(e) = self.step("resume:slot").await {
            return Err(ResumeFailure::Paused(e, p));
        }
        let vm = self.start_vm(&meta.sandbox_id);
        for s in &STEPS_RESUME[1..] {
            if let Err(e) = self.step(s).await {
                drop(vm);
                return Err(ResumeFailure::Paused(e, p));
            }
        }
        // Running: the paused files are no longer the sandbox's state.
        lock(&self.host).disk.remove(&p.0);
        Ok(vm)
    }

    async fn snapshot(
        &self,
        meta: &SandboxMeta,
        _p: &FakePaused,
        snapshot_id: &str,
    ) -> Result<crate::runtime::SnapshotTaken, RuntimeError> {
        self.step("snapshot:files").await?;
        let taken = self.record_snapshot(meta, snapshot_id);
        Ok(taken)
    }

    async fn snapshot_running(
        &self,
        meta: &SandboxMeta,
        _sb: &FakeVm,
        snapshot_id: &str,
    ) -> Result<(crate::runtime::SnapshotTaken, Duration), RuntimeError> {
        for s in STEPS_SNAPSHOT {
            self.step(s).await?;
        }
        let taken = self.record_snapshot(meta, snapshot_id);
        Ok((taken, Duration::from_millis(1)))
    }

    fn snapshot_info(&self, snapshot_id: &str) -> Option<crate::runtime::SnapshotTaken> {
        lock(&self.host).snapshots.get(snapshot_id).cloned()
    }

    async fn create_from_snapshot(
        &self,
        meta: &SandboxMeta,
        _snapshot_id: &str,
        init: GuestInit,
    ) -> Result<(FakeVm, Stages), RuntimeError> {
        self.create(meta, init).await
    }

    async fn kill(&self, id: &str, sb: FakeVm) {
        let _ = self.step("kill:stop").await;
        drop(sb);
        let _ = self.step("kill:remove").await;
        lock(&self.host).saved_meta.remove(id);
    }

    async fn remove(&self, id: &str, p: FakePaused) {
        let _ = self.step("kill:stop").await;
        let _ = self.step("kill:remove").await;
        lock(&self.host).disk.remove(&p.0);
        lock(&self.host).saved_meta.remove(id);
    }

    fn save_meta(&self, meta: &SandboxMeta, _sandbox: Held<'_, Self>) {
        lock(&self.host)
            .saved_meta
            .insert(meta.sandbox_id.clone(), meta.clone());
    }

    fn recover(&self, meta: &SandboxMeta) -> Option<FakePaused> {
        let host = lock(&self.host);
        host.disk
            .contains(&meta.sandbox_id)
            .then(|| FakePaused(meta.sandbox_id.clone()))
    }

    fn discard(&self, meta: &SandboxMeta) {
        let mut host = lock(&self.host);
        host.disk.remove(&meta.sandbox_id);
        host.saved_meta.remove(&meta.sandbox_id);
    }

    fn endpoint(&self, _sb: &FakeVm, port: u16) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn set_egress(
        &self,
        sb: &FakeVm,
        egress: &Egress,
    ) -> futures::future::BoxFuture<'static, Result<(), RuntimeError>> {
        let (host, id, egress) = (sb.host.clone(), sb.id.clone(), egress.clone());
        let fail = *lock(&self.fail) == Some("egress");
        Box::pin(async move {
            tokio::task::yield_now().await;
            if fail {
                return Err(err("egress"));
            }
            lock(&host).egress.insert(id, egress);
            Ok(())
        })
    }
}

#[test]
fn a_network_update_reaches_the_slot_and_the_record_or_neither() {
    runtime().block_on(async {
        let ctl = Controller::new(Fake::default(), 4);
        ctl.create(create_args("sb")).await.unwrap();
        let locked = Egress {
            allow_internet_access: true,
            allow_out: vec!["allowed.test".into()],
            deny_out: vec!["0.0.0.0/0".into()],
        };
        ctl.update_network("sb", locked.clone()).await.unwrap();
        assert_eq!(lock(&ctl.runtime.host).egress.get("sb"), Some(&locked));
        assert_eq!(lock(&ctl.runtime.host).saved_meta["sb"].egress, locked);

        // The slot refuses: the record keeps the policy the slot has.
        *lock(&ctl.runtime.fail) = Some("egress");
        let open = Egress::default();
        assert!(matches!(
            ctl.update_network("sb", open.clone()).await,
            Err(ControlError::Runtime { .. })
        ));
        assert_eq!(lock(&ctl.table)["sb"].meta.egress, locked);
        assert_eq!(lock(&ctl.runtime.host).saved_meta["sb"].egress, locked);
        *lock(&ctl.runtime.fail) = None;

        // Paused: saved for the resume, no slot to change.
        ctl.pause("sb").await.unwrap();
        lock(&ctl.runtime.host).egress.clear();
        ctl.update_network("sb", open.clone()).await.unwrap();
        assert!(lock(&ctl.runtime.host).egress.is_empty());
        assert_eq!(lock(&ctl.table)["sb"].meta.egress, open);

        // Busy: refused at once, nothing changed.
        *lock(&ctl.runtime.hold) = Some("resume:restore");
        let reached = ctl.runtime.reached.notified();
        let c = ctl.clone();
        let resuming = tokio::spawn(async move { c.resume("sb", GuestInit::default(), 0).await });
        reached.await;
        assert!(matches!(
            ctl.update_network("sb", locked.clone()).await,
            Err(ControlError::Busy { .. })
        ));
        ctl.runtime.release.notify_one();
        resuming.await.unwrap().unwrap();
        assert_eq!(lock(&ctl.table)["sb"].meta.egress, open);
        assert!(matches!(
            ctl.update_network("nope", open).await,
            Err(ControlError::NotFound(_))
        ));
        assert_consistent(&ctl);
    });
}

fn create_args(id: &str) -> CreateArgs {
    CreateArgs {
        sandbox_id: id.into(),
        template_id: "base".into(),
        ..Default::default()
    }
}

/// The invariants: nothing busy, every running entry has a live VM and no VM runs without one,
/// every paused entry is complete on disk, and usage counts exactly the running entries.
fn assert_consistent(ctl: &Controller<Fake>) {
    let table = lock(&ctl.table);
    let host = lock(&ctl.runtime.host);
    let mut running = HashSet::new();
    for (id, e) in table.iter() {
        match &e.slot {
            Slot::Busy(op) => panic!("{id} stuck busy ({op})"),
            Slot::Running(vm) => {
                assert_eq!(&vm.id, id);
                running.insert(id.clone());
            }
            Slot::Paused(p) => assert!(host.disk.contains(&p.0), "{id} paused without files"),
        }
    }
    assert_eq!(running, host.live, "running entries and live VMs differ");
    drop((table, host));
    let (vcpus, memory, _) = ctl.usage();
    assert_eq!(vcpus, 2 * running.len() as u32);
    assert_eq!(memory, 512 * running.len() as u64);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Sets up a controller with sandbox `sb` in the state `op` needs (none for create).
async fn prepared(op: Op) -> Arc<Controller<Fake>> {
    let ctl = Controller::new(Fake::default(), 4);
    if op != Op::Create {
        ctl.create(create_args("sb")).await.unwrap();
    }
    if op == Op::Resume {
        ctl.pause("sb").await.unwrap();
    }
    ctl
}

async fn run_op(ctl: Arc<Controller<Fake>>, op: Op) -> Result<(), ControlError> {
    match op {
        Op::Create => ctl.create(create_args("sb")).await.map(|_| ()),
        Op::Pause => ctl.pause("sb").await,
        Op::Resume => ctl.resume("sb", GuestInit::default(), 0).await.map(|_| ()),
        Op::Kill => ctl.kill("sb").await,
        Op::Snapshot => ctl.snapshot("sb", "snap").await.map(|_| ()),
    }
}

fn steps_of(op: Op) -> &'static [&'static str] {
    match op {
        Op::Create => STEPS_CREATE,
        Op::Pause => STEPS_PAUSE,
        Op::Resume => STEPS_RESUME,
        Op::Kill => STEPS_KILL,
        Op::Snapshot => STEPS_SNAPSHOT,
    }
}

const OPS: [Op; 5] = [Op::Create, Op::Pause, Op::Resume, Op::Kill, Op::Snapshot];

#[test]
fn process_dropping_an_operation_at_any_step_leaves_a_consistent_table() {
    for op in OPS {
        for &step in steps_of(op) {
            let rt = runtime();
            let ctl = rt.block_on(prepared(op));
            *lock(&ctl.runtime.hold) = Some(step);
            let c = ctl.clone();
            rt.block_on(async {
                let reached = ctl.runtime.reached.notified();
                tokio::spawn(run_op(c, op));
                reached.await;
            });
            // The agent's runtime goes away with the operation halfway: every task is dropped.
            drop(rt);
            assert_consistent(&ctl);
            let entry = ctl.get("sb");
            match op {
                Op::Create | Op::Kill => assert!(entry.is_none(), "{op} at {step}: {entry:?}"),
                // Cut before its snapshot was complete: the sandbox is gone, never half there.
                Op::Pause => assert!(entry.is_none(), "{op} at {step}: {entry:?}"),
                // The paused files are untouched until the resume succeeded.
                Op::Resume => {
                    assert_eq!(
                        entry.map(|s| s.phase),
                        Some(Phase::Paused),
                        "{op} at {step}"
                    )
                }
                // The running handle went with the dropped operation (as a pause's does
                // before its snapshot is complete): the sandbox is gone, never half there.
                Op::Snapshot => assert!(entry.is_none(), "{op} at {step}: {entry:?}"),
            }
            // And the table works on: a new sandbox can be created and killed.
            let rt = runtime();
            *lock(&ctl.runtime.hold) = None;
            rt.block_on(async {
                ctl.create(create_args("next")).await.unwrap();
                ctl.kill("next").await.unwrap();
            });
            assert_consistent(&ctl);
        }
    }
}

#[test]
fn caller_going_away_at_any_step_does_not_stop_the_operation() {
    for op in OPS {
        for &step in steps_of(op) {
            let rt = runtime();
            rt.block_on(async {
                let ctl = prepared(op).await;
                *lock(&ctl.runtime.hold) = Some(step);
                let reached = ctl.runtime.reached.notified();
                let caller = tokio::spawn(run_op(ctl.clone(), op));
                reached.await;
                // The RPC future is dropped (a Connect-Timeout-Ms expiry, a disconnect).
                caller.abort();
                let _ = caller.await;
                ctl.runtime.release.notify_one();
                // The detached operation finishes on its own.
                for _ in 0..100 {
                    if ctl.get("sb").is_none_or(|s| s.busy.is_none()) {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                assert_consistent(&ctl);
                let phase = ctl.get("sb").map(|s| s.phase);
                let want = match op {
                    Op::Create | Op::Resume | Op::Snapshot => Some(Phase::Running),
                    Op::Pause => Some(Phase::Paused),
                    Op::Kill => None,
                };
                assert_eq!(phase, want, "{op} cut at {step}");
            });
        }
    }
}

#[test]
fn a_failed_step_leaves_the_sandbox_as_it_was_or_cleanly_gone() {
    for op in OPS {
        for &step in steps_of(op) {
            let rt = runtime();
            rt.block_on(async {
                let ctl = prepared(op).await;
                *lock(&ctl.runtime.fail) = Some(step);
                let result = run_op(ctl.clone(), op).await;
                assert_consistent(&ctl);
                let phase = ctl.get("sb").map(|s| s.phase);
                match op {
                    Op::Create => {
                        assert!(result.is_err());
                        assert_eq!(phase, None, "a failed create leaves nothing");
                    }
                    Op::Pause if step == "pause:prepare" || step == "pause:save" => {
                        assert!(matches!(result, Err(ControlError::Runtime { .. })));
                        assert_eq!(phase, Some(Phase::Running), "still running after {step}");
                    }
                    Op::Pause => {
                        assert!(matches!(result, Err(ControlError::Lost { .. })));
                        assert_eq!(phase, None);
                    }
                    Op::Resume => {
                        assert!(matches!(result, Err(ControlError::Runtime { .. })));
                        assert_eq!(phase, Some(Phase::Paused), "still paused after {step}");
                        // And a later resume works.
                        *lock(&ctl.runtime.fail) = None;
                        ctl.resume("sb", GuestInit::default(), 0).await.unwrap();
                        assert_consistent(&ctl);
                    }
                    // Kill's steps are best effort: it always ends with the sandbox gone.
                    Op::Kill => assert_eq!(phase, None),
                    // A failed capture: running as before, and no snapshot.
                    Op::Snapshot => {
                        assert!(matches!(result, Err(ControlError::Runtime { .. })));
                        assert_eq!(phase, Some(Phase::Running), "still running after {step}");
                        assert!(ctl.runtime.snapshot_info("snap").is_none());
                    }
                }
            });
        }
    }
}

#[test]
fn a_second_operation_on_a_busy_sandbox_is_refused_at_once() {
    let rt = runtime();
    rt.block_on(async {
        let ctl = prepared(Op::Pause).await;
        *lock(&ctl.runtime.hold) = Some("pause:save");
        let reached = ctl.runtime.reached.notified();
        let pausing = tokio::spawn(run_op(ctl.clone(), Op::Pause));
        reached.await;
        for other in [Op::Pause, Op::Kill, Op::Resume] {
            let r = run_op(ctl.clone(), other).await;
            assert!(
                matches!(r, Err(ControlError::Busy { op: Op::Pause, .. })),
                "{other}: {r:?}"
            );
        }
        let again = ctl.create(create_args("sb")).await;
        assert!(matches!(again, Err(ControlError::AlreadyExists(_))));
        ctl.runtime.release.notify_one();
        pausing.await.unwrap().unwrap();
        assert_eq!(ctl.get("sb").unwrap().phase, Phase::Paused);
        assert_consistent(&ctl);
    });
}

#[test]
fn capacity_counts_creates_in_flight_and_comes_back() {
    let rt = runtime();
    rt.block_on(async {
        let ctl = Controller::new(Fake::default(), 2);
        *lock(&ctl.runtime.hold) = Some("create:health");
        let reached = ctl.runtime.reached.notified();
        let first = tokio::spawn({
            let c = ctl.clone();
            async move { c.create(create_args("a")).await }
        });
        reached.await;
        *lock(&ctl.runtime.hold) = None;
        ctl.create(create_args("b")).await.unwrap();
        // One created, one in flight: the host is full.
        let full = ctl.create(create_args("c")).await;
        assert!(matches!(full, Err(ControlError::Full(2))), "{full:?}");
        ctl.runtime.release.notify_one();
        first.await.unwrap().unwrap();
        // A paused sandbox holds no VM: room for another.
        ctl.pause("a").await.unwrap();
        ctl.create(create_args("c")).await.unwrap();
        // And resuming into a full host is refused, leaving it paused.
        let r = ctl.resume("a", GuestInit::default(), 0).await;
        assert!(matches!(r, Err(ControlError::Full(2))), "{r:?}");
        assert_eq!(ctl.get("a").unwrap().phase, Phase::Paused);
        assert_consistent(&ctl);
    });
}

#[test]
fn a_timer_set_during_an_operation_is_saved_when_it_ends() {
    let rt = runtime();
    rt.block_on(async {
        let ctl = prepared(Op::Pause).await;
        *lock(&ctl.runtime.hold) = Some("pause:save");
        let reached = ctl.runtime.reached.notified();
        let pausing = tokio::spawn(run_op(ctl.clone(), Op::Pause));
        reached.await;
        ctl.set_timeout("sb", 12345).unwrap();
        ctl.runtime.release.notify_one();
        pausing.await.unwrap().unwrap();
        assert_eq!(ctl.get("sb").unwrap().meta.backstop_unix_ms, 12345);
        let saved = lock(&ctl.runtime.host).saved_meta["sb"].clone();
        assert_eq!(saved.backstop_unix_ms, 12345);
    });
}

#[test]
fn bad_requests_change_nothing() {
    let rt = runtime();
    rt.block_on(async {
        let ctl = Controller::new(Fake::default(), 2);
        let r = ctl.create(create_args("../x")).await;
        assert!(matches!(r, Err(ControlError::Invalid(_))));
        let mut args = create_args("x");
        args.template_id = "nope".into();
        let r = ctl.create(args).await;
        assert!(matches!(r, Err(ControlError::TemplateNotFound(_))));
        // A disk larger than the template's is refused (the template's size or less is the
        // template's disk).
        let mut args = create_args("big");
        args.disk_size_mb = 1025;
        let r = ctl.create(args).await;
        assert!(
            matches!(&r, Err(ControlError::Invalid(m)) if m.contains("1024 MiB")),
            "{r:?}"
        );
        assert!(ctl.get("big").is_none());
        assert!(matches!(
            ctl.pause("x").await,
            Err(ControlError::NotFound(_))
        ));
        let mut args = create_args("x");
        args.disk_size_mb = 1024;
        ctl.create(args).await.unwrap();
        assert!(matches!(
            ctl.resume("x", GuestInit::default(), 0).await,
            Err(ControlError::WrongState { .. })
        ));
        assert!(
            lock(&ctl.runtime.steps)
                .iter()
                .all(|s| s.starts_with("create"))
        );
        assert_consistent(&ctl);
    });
}

#[test]
fn suspend_pauses_running_sandboxes_and_refuses_new_ones() {
    let rt = runtime();
    rt.block_on(async {
        let ctl = Controller::new(Fake::default(), 4);
        ctl.create(create_args("a")).await.unwrap();
        ctl.create(create_args("b")).await.unwrap();
        ctl.pause("b").await.unwrap();
        let paused = ctl.suspend().await;
        assert_eq!(paused, vec!["a".to_owned()]);
        assert!(matches!(
            ctl.create(create_args("c")).await,
            Err(ControlError::ShuttingDown)
        ));
        assert!(ctl.list().iter().all(|s| s.phase == Phase::Paused));
        assert_consistent(&ctl);
    });
}

#[test]
fn traffic_of_a_run_ends_when_it_is_paused_or_killed_and_not_before() {
    let rt = runtime();
    rt.block_on(async {
        let ctl = prepared(Op::Pause).await;
        let traffic = |ctl: &Controller<Fake>| ctl.with_running_traffic("sb", |_| ()).map(|t| t.1);
        let first = traffic(&ctl).unwrap();
        // A timer change or a failed pause is not the end of the run's connections...
        ctl.set_timeout("sb", 777).unwrap();
        assert!(!first.is_cancelled());
        // ...a pause is, from its first step: a guest being snapshotted answers nothing.
        *lock(&ctl.runtime.hold) = Some("pause:prepare");
        let reached = ctl.runtime.reached.notified();
        let pausing = tokio::spawn(run_op(ctl.clone(), Op::Pause));
        reached.await;
        assert!(
            first.is_cancelled(),
            "a pause must end the run's traffic when it starts"
        );
        assert!(
            traffic(&ctl).is_none(),
            "a busy sandbox gets no new traffic"
        );
        ctl.runtime.release.notify_one();
        pausing.await.unwrap().unwrap();
        // The resumed run has traffic of its own, ended by the kill.
        *lock(&ctl.runtime.hold) = None;
        ctl.resume("sb", GuestInit::default(), 0).await.unwrap();
        let second = traffic(&ctl).unwrap();
        assert!(!second.is_cancelled());
        ctl.kill("sb").await.unwrap();
        assert!(second.is_cancelled());
        assert!(traffic(&ctl).is_none());
    });
}

#[test]
fn a_snapshot_leaves_its_source_as_it_was_and_starts_sandboxes() {
    runtime().block_on(async {
        let ctl = Controller::new(Fake::default(), 8);
        ctl.create(create_args("sb")).await.unwrap();
        // A running source is captured in place: no pause, no resume, and its run's
        // connections stay open.
        let traffic = ctl.with_running_traffic("sb", |_| ()).map(|t| t.1).unwrap();
        lock(&ctl.runtime.steps).clear();
        ctl.snapshot("sb", "s1").await.unwrap();
        assert_eq!(ctl.get("sb").unwrap().phase, Phase::Running);
        assert_eq!(*lock(&ctl.runtime.steps), STEPS_SNAPSHOT);
        assert!(
            !traffic.is_cancelled(),
            "a snapshot must not cut the run's traffic"
        );
        // A paused one is captured as it is and stays paused.
        ctl.pause("sb").await.unwrap();
        lock(&ctl.runtime.steps).clear();
        let c = ctl.snapshot("sb", "s2").await.unwrap();
        assert_eq!(c.paused_for, Duration::ZERO);
        assert_eq!(ctl.get("sb").unwrap().phase, Phase::Paused);
        assert_eq!(*lock(&ctl.runtime.steps), vec!["snapshot:files"]);
        // Sandboxes start from it as its template's, any number of times.
        for id in ["c1", "c2"] {
            let args = CreateArgs {
                snapshot_id: Some("s1".into()),
                template_id: String::new(),
                ..create_args(id)
            };
            let (st, _) = ctl.create(args).await.unwrap();
            assert_eq!(st.meta.template_id, "base");
            assert_eq!(st.phase, Phase::Running);
        }
        let unknown = CreateArgs {
            snapshot_id: Some("nope".into()),
            ..create_args("c3")
        };
        assert!(matches!(
            ctl.create(unknown).await,
            Err(ControlError::SnapshotNotFound(_))
        ));
        assert!(ctl.get("c3").is_none());
        // A capture that fails leaves a running source running.
        ctl.resume("sb", GuestInit::default(), 0).await.unwrap();
        *lock(&ctl.runtime.fail) = Some("checkpoint:save");
        assert!(ctl.snapshot("sb", "s3").await.is_err());
        assert_eq!(ctl.get("sb").unwrap().phase, Phase::Running);
        assert!(ctl.runtime.snapshot_info("s3").is_none());
        assert_consistent(&ctl);
    });
}

#[test]
fn the_backstop_stops_running_sandboxes_and_never_deletes_paused_ones() {
    let rt = runtime();
    rt.block_on(async {
        let ctl = prepared(Op::Pause).await;
        ctl.create(create_args("other")).await.unwrap();
        ctl.set_timeout("sb", 1_000).unwrap();
        ctl.set_timeout("other", 1_000).unwrap();
        let mut due = ctl.overdue(2_000);
        due.sort();
        assert_eq!(due, [("other".to_owned(), false), ("sb".to_owned(), false)]);
        assert!(ctl.overdue(999).is_empty(), "not yet");
        // Paused by the control plane (its timeout, or a request): kept past the backstop.
        ctl.pause("sb").await.unwrap();
        assert_eq!(ctl.overdue(2_000), [("other".to_owned(), false)]);
    });
}
