//! The store against a real database: a SQLite file always, and PostgreSQL as well when
//! `WRENN_TEST_POSTGRES_URL` is set (each run uses a fresh schema-free database name is not
//! needed: rows are keyed by random IDs, so runs do not collide).

use std::collections::BTreeMap;

use wrenn_core::{HostId, SandboxId, SandboxState, TeamId, UnixMillis};
use wrenn_server::store::{
    Cursor, HostRecord, IdempotencyClaim, SandboxFilter, SandboxRecord, SnapshotRecord, Store,
    TeamRecord, TemplateRecord,
};

fn rand_suffix() -> String {
    let bytes: [u8; 20] = rand::random();
    SandboxId::from_random(bytes).as_str()[..8].to_owned()
}

fn sandbox(id: &str, team: &TeamId, started: i64, meta: &[(&str, &str)]) -> SandboxRecord {
    SandboxRecord {
        id: SandboxId::parse(id).unwrap(),
        team_id: team.clone(),
        template_id: "base".into(),
        state: SandboxState::Running,
        host_id: Some(HostId::parse("h1").unwrap()),
        vcpus: 2,
        memory_mb: 512,
        disk_size_mb: 1024,
        envd_version: "0.6.4".into(),
        metadata: meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        env_vars: BTreeMap::from([("A".into(), "1".into())]),
        started_at: UnixMillis(started),
        end_at: UnixMillis(started + 1000),
        auto_pause: false,
        auto_resume: false,
        auto_pause_memory: true,
        paused_memory: true,
        allow_internet_access: None,
        updated_at: UnixMillis(1_000),
        network: None,
    }
}

async fn exercise(store: Store) {
    let now = UnixMillis(1_000);
    let sfx = rand_suffix();
    let team = TeamId::parse(&format!("team-{sfx}")).unwrap();
    store
        .insert_team(
            &TeamRecord {
                id: team.clone(),
                name: "t".into(),
            },
            now,
        )
        .await
        .unwrap();
    store
        .insert_api_key(
            &format!("k-{sfx}"),
            &team,
            &format!("hash-{sfx}"),
            "e2b_12",
            "k",
            now,
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .team_by_key_hash(&format!("hash-{sfx}"))
            .await
            .unwrap()
            .unwrap()
            .id,
        team
    );
    assert_eq!(store.team_by_key_hash("nope").await.unwrap(), None);
    // A second key with the same hash is refused.
    assert!(
        store
            .insert_api_key(
                &format!("k2-{sfx}"),
                &team,
                &format!("hash-{sfx}"),
                "m",
                "k",
                now
            )
            .await
            .is_err()
    );

    let tpl = TemplateRecord {
        id: format!("tpl-{sfx}"),
        team_id: None,
        envd_version: "0.6.4".into(),
        vcpus: 2,
        memory_mb: 512,
        disk_size_mb: 1024,
        name: None,
        build: None,
    };
    store.upsert_template(&tpl, now).await.unwrap();
    let other = TeamId::parse("other").unwrap();
    assert_eq!(
        store.get_template(&tpl.id, &other).await.unwrap(),
        Some(tpl.clone())
    );
    let private = TemplateRecord {
        id: format!("priv-{sfx}"),
        team_id: Some(team.clone()),
        ..tpl.clone()
    };
    store.upsert_template(&private, now).await.unwrap();
    assert_eq!(store.get_template(&private.id, &other).await.unwrap(), None);
    assert_eq!(
        store.get_template(&private.id, &team).await.unwrap(),
        Some(private)
    );

    let host = HostRecord {
        id: HostId::parse(&format!("h-{sfx}")).unwrap(),
        rpc_url: "http://127.0.0.1:1".into(),
        proxy_url: "http://127.0.0.1:2".into(),
        vcpus: 8,
        memory_mb: 4096,
        max_sandboxes: 0,
        version: "1".into(),
        schedulable: true,
        heartbeat_at: None,
        lost_at: None,
        templates: None,
    };
    store.upsert_host(&host, now).await.unwrap();
    store
        .upsert_host(
            &HostRecord {
                vcpus: 16,
                ..host.clone()
            },
            now,
        )
        .await
        .unwrap();
    assert_eq!(store.get_host(&host.id).await.unwrap().unwrap().vcpus, 16);

    // Sandboxes a..e, started at 10..50; c and e carry metadata env=prod.
    let ids: Vec<String> = (0..5)
        .map(|i| format!("{}{sfx}", (b'a' + i) as char))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let meta: &[(&str, &str)] = if i % 2 == 0 && i > 0 {
            &[("env", "prod")]
        } else {
            &[("env", "dev")]
        };
        let mut s = sandbox(id, &team, 10 * (i as i64 + 1), meta);
        s.host_id = Some(host.id.clone());
        store.insert_sandbox(&s).await.unwrap();
    }
    let got = store.get_sandbox(&ids[0]).await.unwrap().unwrap();
    assert_eq!(got, {
        let mut s = sandbox(&ids[0], &team, 10, &[("env", "dev")]);
        s.host_id = Some(host.id.clone());
        s
    });
    let usage = store.host_usage().await.unwrap();
    assert_eq!(usage[host.id.as_str()].vcpus, 10);
    assert_eq!(usage[host.id.as_str()].memory_mb, 2560);
    assert_eq!(usage[host.id.as_str()].sandboxes, 5);

    // A placed insert goes in only while the host has room (16 vCPUs, 10 used), counting
    // records still `creating`.
    let placed = |n: u32| {
        let mut s = sandbox(&format!("p{n}{sfx}"), &team, 60, &[]);
        s.host_id = Some(host.id.clone());
        s.state = SandboxState::Creating;
        s.vcpus = 3;
        s
    };
    assert!(store.insert_placed(&placed(1)).await.unwrap());
    // The lifecycle settings read back as they were written.
    let lifecycle = SandboxRecord {
        auto_pause: true,
        auto_resume: true,
        auto_pause_memory: false,
        paused_memory: false,
        ..placed(2)
    };
    assert!(store.insert_placed(&lifecycle).await.unwrap());
    assert_eq!(
        store.get_sandbox(lifecycle.id.as_str()).await.unwrap(),
        Some(lifecycle)
    );
    assert!(
        !store.insert_placed(&placed(3)).await.unwrap(),
        "16 vCPUs: 10 + 3 + 3 used"
    );
    assert_eq!(store.get_sandbox(&format!("p3{sfx}")).await.unwrap(), None);
    assert_eq!(
        store.host_usage().await.unwrap()[host.id.as_str()].vcpus,
        16
    );
    for n in [1, 2] {
        let id = SandboxId::parse(&format!("p{n}{sfx}")).unwrap();
        assert!(store.delete_creating(&id).await.unwrap());
    }

    // State changes are compare-and-set.
    let a = SandboxId::parse(&ids[0]).unwrap();
    assert!(store.start_pause(&a, false, now).await.unwrap());
    assert!(!store.start_pause(&a, true, now).await.unwrap());
    let pausing = store.get_sandbox(a.as_str()).await.unwrap().unwrap();
    assert_eq!(pausing.state, SandboxState::Pausing);
    assert!(
        !pausing.paused_memory,
        "a filesystem-only pause is recorded"
    );
    assert!(
        !store
            .transition(&a, SandboxState::Running, SandboxState::Pausing, now)
            .await
            .unwrap()
    );
    assert!(
        store
            .transition(&a, SandboxState::Pausing, SandboxState::Paused, now)
            .await
            .unwrap()
    );
    assert_eq!(
        store.host_usage().await.unwrap()[host.id.as_str()].sandboxes,
        4
    );

    // Pages of two, newest first, running or paused.
    let mut filter = SandboxFilter {
        team_id: team.clone(),
        states: vec![SandboxState::Running, SandboxState::Paused],
        template_id: None,
        started_after: None,
        metadata: vec![],
        descending: true,
        after: None,
        limit: 2,
    };
    let mut seen = Vec::new();
    loop {
        let (page, more) = store.list_sandboxes(&filter).await.unwrap();
        seen.extend(page.iter().map(|s| s.id.as_str().to_owned()));
        if !more {
            break;
        }
        let last = page.last().unwrap();
        filter.after = Some(Cursor {
            time: last.started_at.0,
            id: last.id.as_str().to_owned(),
        });
    }
    let mut want = ids.clone();
    want.reverse();
    assert_eq!(seen, want);

    // Filters: state, metadata, template, started_after; ascending order.
    filter.after = None;
    filter.limit = 100;
    filter.states = vec![SandboxState::Paused];
    let (page, _) = store.list_sandboxes(&filter).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].id, a);
    filter.states = vec![SandboxState::Running, SandboxState::Paused];
    filter.metadata = vec![("env".into(), "prod".into())];
    filter.limit = 1;
    let (page, more) = store.list_sandboxes(&filter).await.unwrap();
    assert_eq!((page[0].id.as_str(), more), (ids[4].as_str(), true));
    filter.limit = 100;
    filter.descending = false;
    // Started at or after (the SDKs' contract): c started at 30 exactly.
    filter.started_after = Some(UnixMillis(30));
    let (page, more) = store.list_sandboxes(&filter).await.unwrap();
    assert_eq!(
        page.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        [ids[2].as_str(), ids[4].as_str()]
    );
    assert!(!more);
    filter.started_after = Some(UnixMillis(31));
    let (page, _) = store.list_sandboxes(&filter).await.unwrap();
    assert_eq!(
        page.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        [ids[4].as_str()]
    );
    filter.started_after = None;
    filter.metadata = vec![];
    filter.template_id = Some("other".into());
    assert!(store.list_sandboxes(&filter).await.unwrap().0.is_empty());

    // Expiry: running sandboxes with end_at <= now, each claimed by one control plane until
    // its lease ends or it is released.
    let mine = |claimed: Vec<SandboxRecord>| -> Vec<String> {
        claimed
            .iter()
            .filter(|s| s.team_id == team)
            .map(|s| s.id.to_string())
            .collect()
    };
    let claim = |at: i64| store.claim_expired(UnixMillis(at), UnixMillis(at + 1_000), 100);
    assert_eq!(mine(claim(1_020).await.unwrap()), [ids[1].clone()]);
    // Only b is due by 1 020; later claims see it only when its lease is over or released.
    let b_claimed = |v: Vec<String>| v.contains(&ids[1]);
    assert!(!b_claimed(mine(claim(1_500).await.unwrap())), "leased");
    assert!(b_claimed(mine(claim(2_020).await.unwrap())), "lease over");
    let b = SandboxId::parse(&ids[1]).unwrap();
    store.release_expiry(&b).await.unwrap();
    assert!(b_claimed(mine(claim(2_100).await.unwrap())), "released");
    for id in &ids {
        store
            .release_expiry(&SandboxId::parse(id).unwrap())
            .await
            .unwrap();
    }
    assert!(
        store
            .set_end_at(&b, SandboxState::Running, UnixMillis(9_999), now)
            .await
            .unwrap()
    );
    assert!(
        !store
            .set_end_at(&a, SandboxState::Running, UnixMillis(9_999), now)
            .await
            .unwrap()
    );
    assert!(
        store
            .transition(&a, SandboxState::Paused, SandboxState::Resuming, now)
            .await
            .unwrap()
    );
    assert!(
        store
            .resumed(&a, UnixMillis(500), UnixMillis(600), now)
            .await
            .unwrap()
    );
    let a_rec = store.get_sandbox(a.as_str()).await.unwrap().unwrap();
    assert_eq!(
        (a_rec.state, a_rec.started_at, a_rec.end_at),
        (SandboxState::Running, UnixMillis(500), UnixMillis(600))
    );

    snapshots(&store, &team, &ids, &sfx).await;
    idempotency_keys(&store, &team, &host, &sfx).await;
    joined_hosts(&store, &team, &sfx).await;
}

fn snapshot(id: &str, team: &TeamId, sandbox: &str, name: Option<&str>, at: i64) -> SnapshotRecord {
    SnapshotRecord {
        id: id.to_owned(),
        team_id: team.clone(),
        name: name.map(str::to_owned),
        sandbox_id: sandbox.to_owned(),
        host_id: HostId::parse("h1").unwrap(),
        ready: true,
        internal: false,
        template_id: "base".into(),
        vcpus: 2,
        memory_mb: 512,
        disk_size_mb: 1024,
        disk_bytes: 4096,
        memory_bytes: 8192,
        parent_snapshot_id: None,
        envd_version: "0.6.4".into(),
        created_at: UnixMillis(at),
    }
}

/// Names are unique per team; only ready snapshots that are not a fork's own are listed,
/// newest first, paginated; leftovers are found by age.
async fn snapshots(store: &Store, team: &TeamId, ids: &[String], sfx: &str) {
    let other = TeamId::parse(&format!("snapteam-{sfx}")).unwrap();
    store
        .insert_team(
            &TeamRecord {
                id: other.clone(),
                name: "o".into(),
            },
            UnixMillis(0),
        )
        .await
        .unwrap();
    let id = |i: usize| format!("snap{i}-{sfx}");
    for i in 0..3 {
        let name = format!("n{i}");
        let s = snapshot(&id(i), team, &ids[i % 2], Some(&name), 100 + i as i64);
        assert!(store.insert_snapshot(&s).await.unwrap());
    }
    // Unnamed ones never collide; a name does, within its team only.
    for i in 3..5 {
        assert!(
            store
                .insert_snapshot(&snapshot(&id(i), team, &ids[0], None, 50))
                .await
                .unwrap()
        );
    }
    assert!(
        !store
            .insert_snapshot(&snapshot(&id(9), team, &ids[0], Some("n1"), 200))
            .await
            .unwrap()
    );
    assert!(
        store
            .insert_snapshot(&snapshot(&id(6), &other, &ids[0], Some("n1"), 200))
            .await
            .unwrap()
    );
    // Not listed: one the agent has not answered for, and a fork's own.
    let mut unready = snapshot(&id(7), team, &ids[0], Some("pending"), 300);
    unready.ready = false;
    unready.template_id = "?".into();
    assert!(store.insert_snapshot(&unready).await.unwrap());
    let mut internal = snapshot(&id(8), team, &ids[0], None, 10);
    internal.internal = true;
    assert!(store.insert_snapshot(&internal).await.unwrap());

    let ids_of = |page: &[SnapshotRecord]| -> Vec<String> {
        page.iter().map(|s| s.id.clone()).collect::<Vec<_>>()
    };
    let (page, more) = store
        .list_snapshots(team, None, None, None, 2)
        .await
        .unwrap();
    assert_eq!(ids_of(&page), [id(2), id(1)]);
    assert!(more);
    let cur = Cursor {
        time: page[1].created_at.0,
        id: page[1].id.clone(),
    };
    let (page, more) = store
        .list_snapshots(team, None, None, Some(&cur), 2)
        .await
        .unwrap();
    assert_eq!(page[0].id, id(0));
    assert!(more);
    // Equal times page by ID.
    let cur = Cursor {
        time: page[1].created_at.0,
        id: page[1].id.clone(),
    };
    let (last, more) = store
        .list_snapshots(team, None, None, Some(&cur), 2)
        .await
        .unwrap();
    assert_eq!(last.len(), 1);
    assert!(!more);
    let mut unnamed = vec![page[1].id.clone(), last[0].id.clone()];
    unnamed.sort();
    assert_eq!(unnamed, [id(3), id(4)]);
    let (page, _) = store
        .list_snapshots(team, Some(&ids[1]), None, None, 10)
        .await
        .unwrap();
    assert_eq!(ids_of(&page), [id(1)]);
    let (page, _) = store
        .list_snapshots(team, None, Some("n2"), None, 10)
        .await
        .unwrap();
    assert_eq!(page, [snapshot(&id(2), team, &ids[0], Some("n2"), 102)]);
    let (page, _) = store
        .list_snapshots(team, None, Some("pending"), None, 10)
        .await
        .unwrap();
    assert!(page.is_empty());

    // Found by name in any state; finished with what the agent holds.
    assert_eq!(
        store.snapshot_named(team, "pending").await.unwrap(),
        Some(unready.clone())
    );
    assert_eq!(
        store
            .snapshot_named(&other, "n1")
            .await
            .unwrap()
            .unwrap()
            .id,
        id(6)
    );
    // Leftovers are of every team: this run's only (a PostgreSQL database outlives runs).
    let leftovers = |unready: i64, internal: i64| async move {
        store
            .leftover_snapshots(UnixMillis(unready), UnixMillis(internal))
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .filter(|s| s.ends_with(sfx))
            .collect::<Vec<_>>()
    };
    assert_eq!(leftovers(400, 20).await, [id(8), id(7)]);
    assert!(leftovers(300, 10).await.is_empty());
    let mut done = unready.clone();
    done.ready = true;
    done.template_id = "base".into();
    done.parent_snapshot_id = Some(id(0));
    done.disk_bytes = 1 << 40;
    assert!(store.finish_snapshot(&done).await.unwrap());
    assert!(!store.finish_snapshot(&done).await.unwrap(), "once");
    assert_eq!(store.get_snapshot(&id(7)).await.unwrap(), Some(done));
    assert!(store.delete_snapshot(&id(7)).await.unwrap());
    assert!(!store.delete_snapshot(&id(7)).await.unwrap());
    assert_eq!(store.get_snapshot(&id(7)).await.unwrap(), None);
}

/// Keys are per team, taken once, expire, are given up by a failed create, and go with the
/// record of a create that never happened.
async fn idempotency_keys(store: &Store, team: &TeamId, host: &HostRecord, sfx: &str) {
    let other = TeamId::parse(&format!("other-{sfx}")).unwrap();
    store
        .insert_team(
            &TeamRecord {
                id: other.clone(),
                name: "o".into(),
            },
            UnixMillis(0),
        )
        .await
        .unwrap();
    let (a, b) = (
        SandboxId::from_random(rand::random()),
        SandboxId::from_random(rand::random()),
    );
    let claim = |team: &TeamId, id: &SandboxId, now: i64| {
        let (team, id) = (team.clone(), id.clone());
        async move {
            store
                .claim_idempotency_key(
                    &team,
                    "k",
                    &id,
                    "hash",
                    UnixMillis(now),
                    UnixMillis(now - 100),
                )
                .await
                .unwrap()
        }
    };
    assert_eq!(claim(team, &a, 1_000).await, IdempotencyClaim::Claimed);
    let IdempotencyClaim::Taken(held) = claim(team, &b, 1_050).await else {
        panic!("a second claim within the time to live is refused");
    };
    assert_eq!(
        (held.sandbox_id, held.created_at),
        (a.clone(), UnixMillis(1_000))
    );
    assert_eq!(
        claim(&other, &b, 1_050).await,
        IdempotencyClaim::Claimed,
        "per team"
    );
    // Expired: the next claim replaces it.
    assert_eq!(claim(team, &b, 1_200).await, IdempotencyClaim::Claimed);
    assert_eq!(
        store
            .idempotency_key(team, "k")
            .await
            .unwrap()
            .unwrap()
            .sandbox_id,
        b
    );
    // Released only by the sandbox it names.
    store.release_idempotency_key(team, "k", &a).await.unwrap();
    assert!(store.idempotency_key(team, "k").await.unwrap().is_some());
    store.release_idempotency_key(team, "k", &b).await.unwrap();
    assert_eq!(store.idempotency_key(team, "k").await.unwrap(), None);
    // Removing a `creating` record removes its keys; other states are never removed.
    let mut rec = sandbox(a.as_str(), team, 10, &[]);
    rec.host_id = Some(host.id.clone());
    rec.state = SandboxState::Creating;
    store.insert_sandbox(&rec).await.unwrap();
    assert_eq!(claim(team, &a, 2_000).await, IdempotencyClaim::Claimed);
    assert!(store.delete_creating(&a).await.unwrap());
    assert_eq!(store.get_sandbox(a.as_str()).await.unwrap(), None);
    assert_eq!(store.idempotency_key(team, "k").await.unwrap(), None);
    let running = sandbox(b.as_str(), team, 10, &[]);
    store.insert_sandbox(&running).await.unwrap();
    assert!(!store.delete_creating(&b).await.unwrap());
    // Purge drops what expired, across teams.
    assert!(
        store
            .purge_idempotency_keys(UnixMillis(1_100))
            .await
            .unwrap()
            >= 1
    );
    assert_eq!(store.idempotency_key(&other, "k").await.unwrap(), None);
}

#[tokio::test]
async fn sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wrenn.db");
    let store = Store::open(path.to_str().unwrap()).await.unwrap();
    exercise(store.clone()).await;
    store.close().await;
    // Reopening runs the migrations again (a no-op) and keeps the records.
    let store = Store::open(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    // The registered host and the joined one.
    assert_eq!(store.list_hosts().await.unwrap().len(), 2);
}

#[tokio::test]
async fn postgres_when_configured() {
    let Ok(url) = std::env::var("WRENN_TEST_POSTGRES_URL") else {
        eprintln!("WRENN_TEST_POSTGRES_URL not set: PostgreSQL store test not run");
        return;
    };
    let store = Store::open(&url).await.unwrap();
    exercise(store.clone()).await;
    // Migrations are idempotent against an existing database too.
    Store::open(&url).await.unwrap();
}

#[tokio::test]
async fn bad_urls_are_refused() {
    assert!(Store::open("mysql://localhost/x").await.is_err());
}

/// A joined host: its heartbeats, its write-off when silent (once, and only while silent), its
/// sandboxes killed with the time they were lost (paused ones kept), and its return.
async fn joined_hosts(store: &Store, team: &TeamId, sfx: &str) {
    let id = HostId::parse(&format!("j-{sfx}")).unwrap();
    store
        .join_host(&id, "http://127.0.0.1:7000", UnixMillis(100))
        .await
        .unwrap();
    let joined = store.get_host(&id).await.unwrap().unwrap();
    assert_eq!((joined.vcpus, joined.schedulable), (0, false));
    assert_eq!(joined.templates, Some(vec![]));
    assert_eq!(joined.heartbeat_at, Some(UnixMillis(100)));
    let beat = wrenn_api::Heartbeat {
        vcpus: 16,
        memory_mb: 8192,
        memory_available_mb: 6000,
        disk_free_mb: 50_000,
        max_sandboxes: 64,
        sandboxes: 0,
        version: "v".into(),
        templates: vec![wrenn_api::HostTemplate {
            id: "base".into(),
            envd_version: "0.6.4".into(),
            vcpus: 2,
            memory_mb: 512,
            disk_size_mb: 2048,
        }],
        stopping: false,
    };
    let out = store
        .heartbeat(&id, &beat, UnixMillis(1_000))
        .await
        .unwrap();
    assert_eq!(out.unwrap().was_lost, None);
    let h = store.get_host(&id).await.unwrap().unwrap();
    assert_eq!((h.vcpus, h.schedulable), (16, true));
    assert!(h.holds("base") && !h.holds("other"));
    assert_eq!(h.heartbeat_at, Some(UnixMillis(1_000)));
    let stranger = HostId::parse(&format!("x-{sfx}")).unwrap();
    assert_eq!(
        store
            .heartbeat(&stranger, &beat, UnixMillis(1_000))
            .await
            .unwrap(),
        None
    );

    let mut running = sandbox(&format!("r{sfx}"), team, 10, &[]);
    running.host_id = Some(id.clone());
    running.state = SandboxState::Running;
    let mut paused = sandbox(&format!("p{sfx}"), team, 10, &[]);
    paused.host_id = Some(id.clone());
    paused.state = SandboxState::Paused;
    store.insert_sandbox(&running).await.unwrap();
    store.insert_sandbox(&paused).await.unwrap();

    // Heard from after `silent_since`: not written off.
    assert_eq!(
        store
            .write_off_host(&id, UnixMillis(900), UnixMillis(5_000))
            .await
            .unwrap(),
        None
    );
    let lost = store
        .write_off_host(&id, UnixMillis(2_000), UnixMillis(5_000))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lost, vec![running.id.clone()]);
    // Once: a second control plane finds it written off already.
    assert_eq!(
        store
            .write_off_host(&id, UnixMillis(2_000), UnixMillis(5_001))
            .await
            .unwrap(),
        None
    );
    let r = store
        .get_sandbox(running.id.as_str())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.state, SandboxState::Killed);
    assert_eq!(
        store.sandbox_lost_at(&running.id).await.unwrap(),
        Some(UnixMillis(5_000))
    );
    let p = store
        .get_sandbox(paused.id.as_str())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p.state, SandboxState::Paused);
    assert_eq!(store.sandbox_lost_at(&paused.id).await.unwrap(), None);
    assert_eq!(
        store.get_host(&id).await.unwrap().unwrap().lost_at,
        Some(UnixMillis(5_000))
    );

    // It comes back.
    let out = store
        .heartbeat(&id, &beat, UnixMillis(9_000))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.was_lost, Some(UnixMillis(5_000)));
    assert_eq!(store.get_host(&id).await.unwrap().unwrap().lost_at, None);
    // A stopping agent takes nothing new.
    let stopping = wrenn_api::Heartbeat {
        stopping: true,
        ..beat
    };
    store
        .heartbeat(&id, &stopping, UnixMillis(9_500))
        .await
        .unwrap();
    assert!(!store.get_host(&id).await.unwrap().unwrap().schedulable);

    // Cluster settings: the first value stays.
    let name = format!("setting-{sfx}");
    assert_eq!(store.setting_or_init(&name, "one").await.unwrap(), "one");
    assert_eq!(store.setting_or_init(&name, "two").await.unwrap(), "one");
}
