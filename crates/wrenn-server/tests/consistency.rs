//! Records and VMs stay consistent: placement of concurrent creates respects capacity, a
//! create's record is written (`creating`) before the agent is asked and removed when it fails,
//! the reconciler settles what disagrees without touching creates in flight, `Idempotency-Key`
//! makes a retried create return the same sandbox, and agent refusals map to 404/409.
//!
//! Each test runs on a SQLite file and, when `WRENN_TEST_POSTGRES_URL` is set, again on a fresh
//! PostgreSQL database, against the real control plane over HTTP with a test-double agent.

mod support;

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use support::*;
use wrenn_agent_proto::v1::SandboxState as AgentState;
use wrenn_connect::ConnectError;
use wrenn_core::{HostId, SandboxId, SandboxState, TeamId, UnixMillis};
use wrenn_server::store::SandboxRecord;

on_both_databases!(
    burst_of_creates_respects_capacity,
    failed_create_leaves_no_record,
    slow_create_is_creating_and_counted,
    reconcile_settles_records_and_vms_that_disagree,
    reconcile_settles_stuck_transitions_after_the_grace,
    periodic_reconcile_leaves_creates_in_flight_alone,
    idempotency_key_returns_the_same_sandbox,
    bad_or_failed_idempotency_keys,
    concurrent_creates_with_one_key_make_one_sandbox,
    agent_refusals_are_404_and_409,
);

fn id_of(v: &Value) -> String {
    v["sandboxID"].as_str().unwrap().to_owned()
}

async fn create(s: &Stack, path: &str, key: Option<&str>, body: &Value) -> (u16, Value) {
    let mut r = s.req(Method::POST, path).json(body);
    if let Some(k) = key {
        r = r.header("Idempotency-Key", k);
    }
    json(r).await
}

/// The IDs the agent was asked to create, in order.
fn created_ids(s: &Stack) -> Vec<String> {
    s.server
        .agent
        .calls()
        .iter()
        .filter_map(|c| c.strip_prefix("create ").map(str::to_owned))
        .collect()
}

async fn record(s: &Stack, id: &str) -> Option<SandboxRecord> {
    s.server.cp.store().get_sandbox(id).await.unwrap()
}

async fn listed(s: &Stack) -> Vec<String> {
    let (st, v) = json(s.req(Method::GET, "/v2/sandboxes")).await;
    assert_eq!(st, 200);
    let mut ids: Vec<String> = v.as_array().unwrap().iter().map(id_of).collect();
    ids.sort();
    ids
}

async fn wait_until<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A record written straight into the store, as another control plane would have left it.
fn raw_record(team: &str, state: SandboxState, updated_at: i64) -> SandboxRecord {
    let now = now_ms().0;
    SandboxRecord {
        id: SandboxId::from_random(rand::random()),
        team_id: TeamId::parse(team).unwrap(),
        template_id: "base".into(),
        state,
        host_id: Some(HostId::parse("h1").unwrap()),
        vcpus: 2,
        memory_mb: 512,
        disk_size_mb: 2048,
        envd_version: "0.6.4".into(),
        metadata: Default::default(),
        env_vars: Default::default(),
        started_at: UnixMillis(now),
        end_at: UnixMillis(now + 600_000),
        auto_pause: false,
        auto_resume: false,
        auto_pause_memory: true,
        paused_memory: true,
        allow_internet_access: None,
        updated_at: UnixMillis(updated_at),
        network: None,
    }
}

async fn burst_of_creates_respects_capacity(db: Db) {
    // (vCPUs, memory MiB, most sandboxes) of the host; the template takes 2 vCPUs, 512 MiB.
    let cases = [((64, 65536, 5), 5), ((8, 65536, 0), 4), ((64, 1536, 0), 3)];
    // Every case runs on the database kind of this run (a fresh database each).
    let pg = matches!(db, Db::Postgres { .. });
    for ((vcpus, mem, max), fit) in cases {
        let this_db = match Db::postgres() {
            Some(d) if pg => d,
            _ => Db::Sqlite,
        };
        let s = Stack::with(this_db, FakeAgent::with_capacity(vcpus, mem, max), |_| {}).await;
        let burst = (0..16).map(|i| {
            let s = &s;
            async move {
                create(
                    s,
                    "/v2/sandboxes",
                    None,
                    &json!({"templateID": "base", "metadata": {"i": i.to_string()}}),
                )
                .await
            }
        });
        let answers = futures::future::join_all(burst).await;
        let created: Vec<&Value> = answers
            .iter()
            .filter(|(st, _)| *st == 201)
            .map(|(_, v)| v)
            .collect();
        let refused = answers.iter().filter(|(st, _)| *st == 503).count();
        assert_eq!((created.len(), refused), (fit, 16 - fit), "{answers:?}");
        assert!(answers.iter().filter(|(st, _)| *st == 503).all(|(_, v)| {
            v["message"]
                .as_str()
                .unwrap()
                .contains("No host has capacity")
        }));
        assert_eq!(
            s.server.agent.creates(),
            fit,
            "only placed creates reach the agent"
        );
        let usage = s.server.cp.store().host_usage().await.unwrap()["h1"];
        assert_eq!(usage.sandboxes as usize, fit);
        assert_eq!(listed(&s).await.len(), fit);
        // Freed room is used again, and only that.
        let gone = id_of(created[0]);
        assert_eq!(
            json(s.req(Method::DELETE, &format!("/sandboxes/{gone}")))
                .await
                .0,
            204
        );
        let base = json!({"templateID": "base"});
        assert_eq!(create(&s, "/v2/sandboxes", None, &base).await.0, 201);
        assert_eq!(create(&s, "/v2/sandboxes", None, &base).await.0, 503);
        s.stop().await;
    }
}

async fn failed_create_leaves_no_record(db: Db) {
    let s = Stack::with(db, FakeAgent::default(), |_| {}).await;
    let base = json!({"templateID": "base"});
    // The agent refuses: the record is gone, and nothing counts against the host.
    *s.server.agent.fail_next_create.lock().unwrap() =
        Some(ConnectError::internal("the VM did not boot"));
    let (st, body) = create(&s, "/v2/sandboxes", None, &base).await;
    assert_eq!(st, 500, "{body}");
    assert_eq!(body["message"], "create sandbox: the host agent failed");
    let failed = created_ids(&s).pop().unwrap();
    assert_eq!(record(&s, &failed).await, None);
    assert!(s.server.cp.store().host_usage().await.unwrap().is_empty());
    // The agent's answer was lost (deadline): it may have made the VM, so it is killed too.
    *s.server.agent.fail_next_create.lock().unwrap() = Some(ConnectError::new(
        wrenn_connect::Code::DeadlineExceeded,
        "too slow",
    ));
    let (st, _) = create(&s, "/v2/sandboxes", None, &base).await;
    assert_eq!(st, 502);
    let lost = created_ids(&s).pop().unwrap();
    assert_eq!(record(&s, &lost).await, None);
    assert!(s.server.agent.calls().contains(&format!("kill {lost}")));
    assert_eq!(s.server.agent.state(&lost), None);
    // The API still answers creates as before: 201 and the same body.
    let (st, ok) = create(&s, "/v2/sandboxes", None, &base).await;
    assert_eq!(st, 201);
    assert_eq!(
        ok.as_object().unwrap().keys().collect::<Vec<_>>(),
        [
            "clientID",
            "domain",
            "envdAccessToken",
            "envdVersion",
            "sandboxID",
            "templateID"
        ]
    );
    assert_eq!(listed(&s).await, [id_of(&ok)]);
    s.stop().await;
}

async fn slow_create_is_creating_and_counted(db: Db) {
    let s = Stack::with(db, FakeAgent::with_capacity(64, 65536, 1), |_| {}).await;
    s.server.agent.hold_creates();
    let pending = {
        let r = s
            .req(Method::POST, "/v2/sandboxes")
            .json(&json!({"templateID": "base"}));
        tokio::spawn(async move { json(r).await })
    };
    wait_until("the create reaches the agent", || async {
        s.server.agent.creates() == 1
    })
    .await;
    let id = created_ids(&s).pop().unwrap();
    let rec = record(&s, &id)
        .await
        .expect("written before the agent was asked");
    assert_eq!(rec.state, SandboxState::Creating);
    assert_eq!(rec.host_id.as_ref().map(|h| h.as_str()), Some("h1"));
    assert_eq!(
        s.server.cp.store().host_usage().await.unwrap()["h1"].sandboxes,
        1
    );
    // Nobody was told of it yet: not found, not listed, not routed.
    assert_eq!(
        json(s.req(Method::GET, &format!("/sandboxes/{id}")))
            .await
            .0,
        404
    );
    assert_eq!(
        json(s.req(Method::DELETE, &format!("/sandboxes/{id}")))
            .await
            .0,
        404
    );
    assert!(listed(&s).await.is_empty());
    let proxied = s
        .http
        .get(format!("{}/files?path=x", s.server.url))
        .header("e2b-sandbox-id", &id)
        .send()
        .await
        .unwrap();
    assert_eq!(proxied.status(), 502);
    // It counts: the host (room for one) is full.
    let (st, _) = create(&s, "/v2/sandboxes", None, &json!({"templateID": "base"})).await;
    assert_eq!(st, 503);
    // Reconciling, even with no grace at all, leaves a create of this process alone.
    for grace in [Duration::from_secs(30), Duration::ZERO] {
        let done = s
            .server
            .cp
            .reconcile_host_with_grace("h1", grace)
            .await
            .unwrap();
        assert_eq!(done, Default::default());
    }
    assert_eq!(record(&s, &id).await.unwrap().state, SandboxState::Creating);
    assert_eq!(s.server.agent.state(&id), Some(AgentState::Running));

    s.server.agent.release_creates(1);
    let (st, body) = pending.await.unwrap();
    assert_eq!(st, 201);
    assert_eq!(id_of(&body), id);
    assert_eq!(record(&s, &id).await.unwrap().state, SandboxState::Running);
    assert_eq!(
        json(s.req(Method::GET, &format!("/sandboxes/{id}")))
            .await
            .1["state"],
        "running"
    );
    s.stop().await;
}

/// A stack whose reconciler only runs when the test calls it.
async fn quiet_stack(db: Db) -> Stack {
    Stack::with(db, FakeAgent::default(), |c| {
        c.reconcile_interval = Duration::from_secs(3600);
    })
    .await
}

async fn reconcile_settles_records_and_vms_that_disagree(db: Db) {
    let s = quiet_stack(db).await;
    let agent = &s.server.agent;
    let base = json!({"templateID": "base"});
    let lost = id_of(&create(&s, "/v2/sandboxes", None, &base).await.1);
    agent.lose_vm(&lost);
    let paused_there = id_of(&create(&s, "/v2/sandboxes", None, &base).await.1);
    agent.set_state(&paused_there, AgentState::Paused);
    let fine = id_of(&create(&s, "/v2/sandboxes", None, &base).await.1);
    let orphan = SandboxId::from_random(rand::random()).to_string();
    agent.add_vm(&orphan);

    let done = s.server.cp.reconcile_host("h1").await.unwrap();
    assert_eq!(done.changed, std::slice::from_ref(&paused_there));
    assert_eq!(done.lost, std::slice::from_ref(&lost));
    assert_eq!(done.orphans, std::slice::from_ref(&orphan));
    assert!(done.removed.is_empty());
    let sr = &s;
    let state = |id: String| async move { record(sr, &id).await.unwrap().state };
    assert_eq!(state(lost.clone()).await, SandboxState::Killed);
    assert_eq!(state(paused_there.clone()).await, SandboxState::Paused);
    assert_eq!(state(fine.clone()).await, SandboxState::Running);
    assert_eq!(
        agent.state(&orphan),
        None,
        "a VM without a record is killed"
    );
    assert_eq!(agent.state(&fine), Some(AgentState::Running));
    // Settled records stay settled.
    assert_eq!(
        s.server.cp.reconcile_host("h1").await.unwrap(),
        Default::default()
    );
    s.stop().await;
}

async fn reconcile_settles_stuck_transitions_after_the_grace(db: Db) {
    use AgentState::{Paused as VmPaused, Running as VmRunning};
    use SandboxState::{Creating, Paused, Pausing, Running};
    let s = quiet_stack(db).await;
    let (store, agent) = (s.server.cp.store(), &s.server.agent);
    let (old, fresh) = (now_ms().0 - 600_000, now_ms().0 - 1_000);
    // (record state, last change, VM on the agent) -> (record after, VM after); as records
    // another control plane left, so no lock of this process protects them.
    let cases = [
        ((Creating, old, None), (None, None)),
        (
            (Creating, old, Some(VmRunning)),
            (Some(Running), Some(VmRunning)),
        ),
        ((Creating, fresh, None), (Some(Creating), None)),
        (
            (Creating, fresh, Some(VmRunning)),
            (Some(Creating), Some(VmRunning)),
        ),
        (
            (Pausing, old, Some(VmPaused)),
            (Some(Paused), Some(VmPaused)),
        ),
        (
            (Pausing, fresh, Some(VmRunning)),
            (Some(Pausing), Some(VmRunning)),
        ),
    ];
    let mut ids = Vec::new();
    for ((state, updated, vm), _) in &cases {
        let r = raw_record(&s.team, *state, *updated);
        if let Some(st) = vm {
            agent.add_vm(r.id.as_str());
            agent.set_state(r.id.as_str(), *st);
        }
        store.insert_sandbox(&r).await.unwrap();
        ids.push(r.id.to_string());
    }
    // The stale create's key goes with its record, so a retry creates afresh.
    let team = TeamId::parse(&s.team).unwrap();
    let stale = SandboxId::parse(&ids[0]).unwrap();
    store
        .claim_idempotency_key(&team, "k", &stale, "h", UnixMillis(old), UnixMillis(0))
        .await
        .unwrap();

    let done = s.server.cp.reconcile_host("h1").await.unwrap();
    assert_eq!(done.removed, [ids[0].clone()]);
    let mut changed = done.changed.clone();
    changed.sort();
    let mut want = vec![ids[1].clone(), ids[4].clone()];
    want.sort();
    assert_eq!(changed, want);
    assert!(done.lost.is_empty() && done.orphans.is_empty(), "{done:?}");
    for (id, (_, (record_after, vm_after))) in ids.iter().zip(&cases) {
        assert_eq!(record(&s, id).await.map(|r| r.state), *record_after, "{id}");
        assert_eq!(agent.state(id), *vm_after, "{id}");
    }
    assert_eq!(store.idempotency_key(&team, "k").await.unwrap(), None);
    s.stop().await;
}

async fn periodic_reconcile_leaves_creates_in_flight_alone(db: Db) {
    // The stack reconciles every 200 ms by itself.
    let s = Stack::with(db, FakeAgent::default(), |_| {}).await;
    let agent = &s.server.agent;
    let lost = id_of(
        &create(&s, "/v2/sandboxes", None, &json!({"templateID": "base"}))
            .await
            .1,
    );
    agent.lose_vm(&lost);
    let orphan = SandboxId::from_random(rand::random()).to_string();
    agent.add_vm(&orphan);
    // Another control plane's create in flight (its record fresh, its VM listed).
    let elsewhere = raw_record(&s.team, SandboxState::Creating, now_ms().0);
    agent.add_vm(elsewhere.id.as_str());
    s.server
        .cp
        .store()
        .insert_sandbox(&elsewhere)
        .await
        .unwrap();
    // This process's create in flight.
    agent.hold_creates();
    let pending = {
        let r = s
            .req(Method::POST, "/v2/sandboxes")
            .json(&json!({"templateID": "base"}));
        tokio::spawn(async move { json(r).await })
    };
    wait_until(
        "the lost sandbox is killed and the orphan VM too",
        || async {
            json(s.req(Method::GET, &format!("/sandboxes/{lost}")))
                .await
                .0
                == 404
                && agent.state(&orphan).is_none()
        },
    )
    .await;
    // A few more rounds.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mine = created_ids(&s).pop().unwrap();
    for id in [&mine, &elsewhere.id.to_string()] {
        assert_eq!(
            record(&s, id).await.unwrap().state,
            SandboxState::Creating,
            "{id}"
        );
        assert_eq!(agent.state(id), Some(AgentState::Running), "{id}");
    }
    agent.release_creates(1);
    let (st, body) = pending.await.unwrap();
    assert_eq!((st, id_of(&body)), (201, mine.clone()));
    assert_eq!(
        record(&s, &mine).await.unwrap().state,
        SandboxState::Running
    );
    s.stop().await;
}

async fn idempotency_key_returns_the_same_sandbox(db: Db) {
    let s = Stack::with(db, FakeAgent::default(), |_| {}).await;
    let body = json!({"templateID": "base", "timeout": 300, "metadata": {"a": "1", "b": "2"}});
    let (st, first) = create(&s, "/v2/sandboxes", Some("key-1"), &body).await;
    assert_eq!(st, 201);
    let (st, again) = create(&s, "/v2/sandboxes", Some("key-1"), &body).await;
    assert_eq!(
        st, 201,
        "a retry answers like the create (the SDKs accept only 201)"
    );
    assert_eq!(again, first, "same sandbox, same body");
    // The same request with its maps in another order, and through v1.
    let reordered = json!({"metadata": {"b": "2", "a": "1"}, "timeout": 300, "templateID": "base"});
    assert_eq!(
        create(&s, "/sandboxes", Some("key-1"), &reordered).await,
        (201, first.clone())
    );
    assert_eq!(s.server.agent.creates(), 1);
    // Another key, or none, creates another sandbox.
    let (_, other) = create(&s, "/v2/sandboxes", Some("key-2"), &body).await;
    let (_, plain1) = create(&s, "/v2/sandboxes", None, &body).await;
    let (_, plain2) = create(&s, "/v2/sandboxes", None, &body).await;
    let mut ids = vec![id_of(&first), id_of(&other), id_of(&plain1), id_of(&plain2)];
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4);
    assert_eq!(listed(&s).await, ids);
    // Another team's key of the same name is its own.
    let (_, other_key) = s.other_team().await;
    let (st, theirs) = json(
        s.http
            .post(format!("{}/v2/sandboxes", s.server.url))
            .header("x-api-key", &other_key)
            .header("Idempotency-Key", "key-1")
            .json(&body),
    )
    .await;
    assert_eq!(st, 201);
    assert_ne!(id_of(&theirs), id_of(&first));
    // The key reused for another request.
    let (st, _) = create(
        &s,
        "/v2/sandboxes",
        Some("key-1"),
        &json!({"templateID": "base"}),
    )
    .await;
    assert_eq!(st, 422);

    // The key keeps naming its sandbox whatever became of it.
    assert_eq!(
        json(s.req(Method::DELETE, &format!("/sandboxes/{}", id_of(&first))))
            .await
            .0,
        204
    );
    assert_eq!(
        create(&s, "/v2/sandboxes", Some("key-1"), &body).await,
        (201, first)
    );
    s.stop().await;
}

async fn bad_or_failed_idempotency_keys(db: Db) {
    let s = Stack::with(db, FakeAgent::default(), |_| {}).await;
    let body = json!({"templateID": "base"});
    // Malformed keys: 400 with the E2B body, on both routes, and nothing created.
    let before = s.server.agent.creates();
    for path in ["/v2/sandboxes", "/sandboxes"] {
        for bad in ["", "UPPER", "a_b", "a b", "a.b", &"k".repeat(256)] {
            let (st, v) = create(&s, path, Some(bad), &body).await;
            assert_eq!(st, 400, "{path} {bad:?}: {v}");
            assert_eq!(v["code"], 400);
            assert!(
                v["message"].as_str().unwrap().contains("Idempotency-Key"),
                "{v}"
            );
        }
        let r = s
            .req(Method::POST, path)
            .header(
                "Idempotency-Key",
                reqwest::header::HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
            )
            .json(&body);
        assert_eq!(json(r).await.0, 400);
    }
    assert_eq!(
        create(&s, "/v2/sandboxes", Some(&"k".repeat(255)), &body)
            .await
            .0,
        201
    );
    assert_eq!(s.server.agent.creates(), before + 1);

    // A failed create gives its key up: the retry creates.
    *s.server.agent.fail_next_create.lock().unwrap() = Some(ConnectError::internal("no"));
    assert_eq!(
        create(&s, "/v2/sandboxes", Some("key-3"), &body).await.0,
        500
    );
    let (st, retried) = create(&s, "/v2/sandboxes", Some("key-3"), &body).await;
    assert_eq!(st, 201);
    assert_eq!(
        record(&s, &id_of(&retried)).await.unwrap().state,
        SandboxState::Running
    );
    // So does a create refused for capacity (the SDKs retry 503 with the same key).
    *s.server.agent.capacity.lock().unwrap() = (64, 65536, 1);
    s.server
        .cp
        .register_host("h1", "http://127.0.0.1:1", "")
        .await
        .unwrap();
    assert_eq!(
        create(&s, "/v2/sandboxes", Some("key-4"), &body).await.0,
        503
    );
    *s.server.agent.capacity.lock().unwrap() = (64, 65536, 0);
    s.server
        .cp
        .register_host("h1", "http://127.0.0.1:1", "")
        .await
        .unwrap();
    assert_eq!(
        create(&s, "/v2/sandboxes", Some("key-4"), &body).await.0,
        201
    );
    s.stop().await;
}

async fn concurrent_creates_with_one_key_make_one_sandbox(db: Db) {
    let s = Stack::with(db, FakeAgent::default(), |_| {}).await;
    let body = json!({"templateID": "base"});
    // The first create is held at the agent while the other two arrive and wait for it.
    s.server.agent.hold_creates();
    let send = |key: &'static str| {
        let r = s
            .req(Method::POST, "/v2/sandboxes")
            .header("Idempotency-Key", key)
            .json(&body);
        tokio::spawn(async move { json(r).await })
    };
    let three: Vec<_> = (0..3).map(|_| send("same-key")).collect();
    wait_until("one create reaches the agent", || async {
        s.server.agent.creates() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.server.agent.creates(), 1, "the others wait");
    // Nobody is answered before the sandbox exists: a 201 sends the client to its envd.
    assert!(three.iter().all(|t| !t.is_finished()));
    s.server.agent.release_creates(1);
    let mut ids = Vec::new();
    for t in three {
        let (st, v) = t.await.unwrap();
        assert_eq!(st, 201, "{v}");
        ids.push(id_of(&v));
    }
    assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
    assert_eq!(created_ids(&s), [ids[0].clone()]);
    assert_eq!(listed(&s).await, [ids[0].clone()]);

    // A plain race, nobody held: still one sandbox.
    s.server.agent.release_creates(1000);
    let five: Vec<_> = (0..5).map(|_| send("race-key")).collect();
    let mut raced = Vec::new();
    for t in five {
        let (st, v) = t.await.unwrap();
        assert_eq!(st, 201, "{v}");
        raced.push(id_of(&v));
    }
    assert!(raced.iter().all(|i| *i == raced[0]), "{raced:?}");
    assert_eq!(s.server.agent.creates(), 2);
    s.stop().await;
}

async fn agent_refusals_are_404_and_409(db: Db) {
    // No periodic reconcile: it would settle the lost VM's record before the agent is asked.
    let s = Stack::with(db, FakeAgent::default(), |c| {
        c.reconcile_interval = Duration::from_secs(3600);
    })
    .await;
    let body = json!({"templateID": "base"});
    let id = id_of(&create(&s, "/v2/sandboxes", None, &body).await.1);
    s.server.agent.busy.lock().unwrap().insert(id.clone());
    let busy = [
        (Method::POST, format!("/sandboxes/{id}/pause"), json!({})),
        (Method::DELETE, format!("/sandboxes/{id}"), json!({})),
        (
            Method::POST,
            format!("/sandboxes/{id}/timeout"),
            json!({"timeout": 30}),
        ),
        (
            Method::POST,
            format!("/v2/sandboxes/{id}/connect"),
            json!({"timeout": 900}),
        ),
    ];
    for (m, p, b) in busy {
        let (st, v) = json(s.req(m.clone(), &p).json(&b)).await;
        assert_eq!(st, 409, "{m} {p}: {v}");
        let msg = v["message"].as_str().unwrap();
        assert!(
            msg.contains("busy (another operation is in progress)"),
            "{msg}"
        );
    }
    // Nothing changed: still running, and once free the pause works.
    assert_eq!(
        json(s.req(Method::GET, &format!("/sandboxes/{id}")))
            .await
            .1["state"],
        "running"
    );
    s.server.agent.busy.lock().unwrap().clear();
    assert_eq!(
        json(s.req(Method::POST, &format!("/sandboxes/{id}/pause")))
            .await
            .0,
        204
    );

    // The agent does not know a sandbox our record names: 404 with its message.
    let gone = id_of(&create(&s, "/v2/sandboxes", None, &body).await.1);
    s.server.agent.lose_vm(&gone);
    for p in [
        format!("/sandboxes/{gone}/timeout"),
        format!("/sandboxes/{gone}/pause"),
    ] {
        let (st, v) = json(s.req(Method::POST, &p).json(&json!({"timeout": 30}))).await;
        assert_eq!(st, 404, "{p}: {v}");
        assert!(
            v["message"].as_str().unwrap().contains("no such sandbox"),
            "{v}"
        );
    }
    s.stop().await;
}

/// (span name, `sandbox_id`) of every span that carried the field, from any test of this binary.
type SeenSpans = std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>;

struct SandboxSpans(SeenSpans);

struct SandboxIdField(Option<String>);

impl tracing::field::Visit for SandboxIdField {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "sandbox_id" {
            self.0 = Some(format!("{value:?}"));
        }
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "sandbox_id" {
            self.0 = Some(value.to_owned());
        }
    }
}

impl<S> tracing_subscriber::Layer<S> for SandboxSpans
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _: &tracing::span::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut v = SandboxIdField(None);
        attrs.record(&mut v);
        if let Some(id) = v.0 {
            self.0
                .lock()
                .unwrap()
                .push((attrs.metadata().name().to_owned(), id));
        }
    }
    fn on_record(
        &self,
        span: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut v = SandboxIdField(None);
        values.record(&mut v);
        if let (Some(id), Some(span)) = (v.0, ctx.span(span)) {
            self.0.lock().unwrap().push((span.name().to_owned(), id));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_operations_run_in_spans_with_sandbox_id() {
    use tracing_subscriber::layer::SubscriberExt as _;
    static SEEN: std::sync::OnceLock<SeenSpans> = std::sync::OnceLock::new();
    let seen = SEEN
        .get_or_init(|| {
            let seen = SeenSpans::default();
            let subscriber = tracing_subscriber::registry().with(SandboxSpans(seen.clone()));
            tracing::subscriber::set_global_default(subscriber).unwrap();
            seen
        })
        .clone();
    let s = Stack::start().await;
    let id = id_of(
        &create(
            &s,
            "/v2/sandboxes",
            None,
            &json!({"templateID": "base", "autoPause": true, "autoResume": {"enabled": true}}),
        )
        .await
        .1,
    );
    let calls = [
        (
            Method::POST,
            format!("/sandboxes/{id}/timeout"),
            json!({"timeout": 60}),
        ),
        (
            Method::POST,
            format!("/sandboxes/{id}/snapshots"),
            json!({}),
        ),
        (Method::POST, format!("/sandboxes/{id}/fork"), json!({})),
        (Method::POST, format!("/sandboxes/{id}/pause"), json!({})),
        // Before the connect, its traffic resumes it (`auto_resume`).
        (
            Method::POST,
            format!("/v2/sandboxes/{id}/connect"),
            json!({"timeout": 60}),
        ),
        (Method::DELETE, format!("/sandboxes/{id}"), json!({})),
    ];
    for (m, p, b) in calls {
        if p.ends_with("/connect") {
            let r = s
                .http
                .get(format!("{}/health", s.server.url))
                .header("e2b-sandbox-id", &id)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
        let (st, v) = json(s.req(m.clone(), &p).json(&b)).await;
        assert!(st < 300, "{m} {p}: {v}");
    }
    let names: std::collections::BTreeSet<String> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, sid)| *sid == id)
        .map(|(name, _)| name.clone())
        .collect();
    for op in [
        "create",
        "set_timeout",
        "snapshot",
        "fork",
        "pause",
        "auto_resume",
        "connect",
        "kill",
    ] {
        assert!(
            names.contains(op),
            "no `{op}` span with sandbox_id={id}: {names:?}"
        );
    }
    s.stop().await;
}
