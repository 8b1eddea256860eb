//! The store's template builds against a real database: a SQLite file always, and PostgreSQL
//! as well when `WRENN_TEST_POSTGRES_URL` is set (rows keyed by random IDs, so runs do not
//! collide).

use wrenn_core::{HostId, SandboxId, TeamId, UnixMillis};
use wrenn_server::store::{BuildLogRecord, BuildRecord, CurrentBuild, Cursor, Store, TeamRecord};

fn sfx() -> String {
    SandboxId::from_random(rand::random()).as_str()[..8].to_owned()
}

fn build(id: &str, template: &str, team: &TeamId, tags: &[&str]) -> BuildRecord {
    BuildRecord {
        id: id.into(),
        template_id: template.into(),
        team_id: team.clone(),
        status: "waiting".into(),
        host_id: None,
        vcpus: 0,
        memory_mb: 0,
        disk_size_mb: 0,
        envd_version: String::new(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        reason: None,
        created_at: UnixMillis(1_000),
        updated_at: UnixMillis(1_000),
    }
}

async fn exercise(store: Store) {
    let s = sfx();
    let team = TeamId::parse(&format!("team-{s}")).unwrap();
    let host = HostId::parse("h1").unwrap();
    store
        .insert_team(
            &TeamRecord {
                id: team.clone(),
                name: "t".into(),
            },
            UnixMillis(1),
        )
        .await
        .unwrap();
    let (tid, name) = (format!("tpl{s}"), format!("app-{s}"));
    assert!(
        store
            .insert_named_template(&tid, &team, &name, UnixMillis(1))
            .await
            .unwrap()
    );
    // A name is taken once, across teams.
    assert!(
        !store
            .insert_named_template(&format!("other{s}"), &team, &name, UnixMillis(1))
            .await
            .unwrap()
    );
    // Found by ID and by name; no version yet.
    let t = store.find_template(&name).await.unwrap().unwrap();
    assert_eq!(
        (t.id.as_str(), t.name.as_deref(), t.build),
        (tid.as_str(), Some(name.as_str()), None)
    );

    let mut b1 = build(&format!("b1-{s}"), &tid, &team, &["default", "v1"]);
    store.insert_build(&b1).await.unwrap();
    // Only a waiting build starts, once.
    assert!(
        store
            .start_build(&b1.id, &host, UnixMillis(2_000))
            .await
            .unwrap()
    );
    assert!(
        !store
            .start_build(&b1.id, &host, UnixMillis(2_000))
            .await
            .unwrap()
    );
    let lines: Vec<_> = (0..150)
        .map(|i| BuildLogRecord {
            seq: i,
            at: UnixMillis(2_000 + i),
            level: if i % 2 == 0 { "info" } else { "error" }.into(),
            message: format!("line {i}"),
            step: (i > 0).then(|| "1".to_owned()),
        })
        .collect();
    store.append_build_logs(&b1.id, &lines).await.unwrap();
    let by_time = store
        .build_logs_by_time(&b1.id, Some(UnixMillis(2_140)), 5, false)
        .await
        .unwrap();
    assert_eq!(
        by_time.iter().map(|l| l.seq).collect::<Vec<_>>(),
        [140, 141, 142, 143, 144]
    );
    let back = store
        .build_logs_by_time(&b1.id, None, 2, true)
        .await
        .unwrap();
    assert_eq!(back.iter().map(|l| l.seq).collect::<Vec<_>>(), [149, 148]);
    let page = store.build_logs(&b1.id, 100, 100).await.unwrap();
    assert_eq!(page.len(), 50);
    assert_eq!((page[0].seq, page[0].message.as_str()), (100, "line 100"));
    // Heartbeats keep it from being stale.
    assert_eq!(
        store.stale_builds(UnixMillis(2_500)).await.unwrap().len(),
        1
    );
    store.touch_build(&b1.id, UnixMillis(3_000)).await.unwrap();
    assert!(
        store
            .stale_builds(UnixMillis(2_500))
            .await
            .unwrap()
            .is_empty()
    );

    b1.host_id = Some(host.clone());
    b1.vcpus = 2;
    b1.memory_mb = 512;
    b1.disk_size_mb = 2048;
    b1.envd_version = "0.6.4".into();
    assert!(store.finish_build(&b1, UnixMillis(4_000)).await.unwrap());
    // Finished once: a late failure does not undo it.
    assert!(!store.finish_build(&b1, UnixMillis(4_000)).await.unwrap());
    assert!(
        !store
            .fail_build(&b1.id, "{}", UnixMillis(4_000))
            .await
            .unwrap()
    );
    let t = store.find_template(&tid).await.unwrap().unwrap();
    assert_eq!(
        t.build,
        Some(CurrentBuild {
            id: b1.id.clone(),
            host_id: host.clone()
        })
    );
    assert_eq!((t.vcpus, t.memory_mb, t.disk_size_mb), (2, 512, 2048));
    let tags: Vec<_> = store
        .tags(&tid)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.tag, r.build_id))
        .collect();
    assert_eq!(
        tags,
        [
            ("default".into(), b1.id.clone()),
            ("v1".into(), b1.id.clone())
        ]
    );

    // A failed rebuild leaves the current version alone.
    let b2 = build(&format!("b2-{s}"), &tid, &team, &["default"]);
    store.insert_build(&b2).await.unwrap();
    assert!(
        store
            .start_build(&b2.id, &host, UnixMillis(5_000))
            .await
            .unwrap()
    );
    assert!(
        store
            .fail_build(&b2.id, r#"{"message":"x"}"#, UnixMillis(6_000))
            .await
            .unwrap()
    );
    let got = store.get_build(&b2.id).await.unwrap().unwrap();
    assert_eq!(
        (got.status.as_str(), got.reason.as_deref()),
        ("error", Some(r#"{"message":"x"}"#))
    );
    assert_eq!(
        store
            .find_template(&tid)
            .await
            .unwrap()
            .unwrap()
            .build
            .unwrap()
            .id,
        b1.id
    );
    assert_eq!(store.latest_build(&tid).await.unwrap().unwrap().id, b2.id);
    assert_eq!(store.count_builds(&tid).await.unwrap(), 2);

    // Tags move and go.
    store
        .set_tag(&tid, "v1", &b2.id, UnixMillis(7_000))
        .await
        .unwrap();
    assert_eq!(
        store
            .delete_tags(&tid, &["v1".into(), "nope".into()])
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.tags(&tid).await.unwrap().len(), 1);

    let listed = store.list_templates(&team).await.unwrap();
    assert!(
        listed
            .iter()
            .any(|e| e.template.id == tid && e.updated_at.0 == 4_000 && !e.public())
    );
    // Builds newest first, a page at a time (ties broken by ID).
    let (page, more) = store.list_builds(&tid, None, 1).await.unwrap();
    assert_eq!((page[0].id.as_str(), more), (b2.id.as_str(), true));
    let after = Cursor {
        time: page[0].created_at.0,
        id: page[0].id.clone(),
    };
    let (page, more) = store.list_builds(&tid, Some(&after), 1).await.unwrap();
    assert_eq!((page[0].id.as_str(), more), (b1.id.as_str(), false));
    // Shared with every team, then not.
    let other = TeamId::parse(&format!("other-{s}")).unwrap();
    assert_eq!(store.get_template(&name, &other).await.unwrap(), None);
    assert!(
        store
            .set_template_public(&tid, true, UnixMillis(8_000))
            .await
            .unwrap()
    );
    assert!(store.get_template(&name, &other).await.unwrap().is_some());
    let theirs = store.list_templates(&other).await.unwrap();
    let e = theirs.iter().find(|e| e.template.id == tid).unwrap();
    assert!(e.public() && e.shared && e.updated_at.0 == 8_000);
    assert!(
        store
            .set_template_public(&tid, false, UnixMillis(9_000))
            .await
            .unwrap()
    );
    assert_eq!(store.get_template(&name, &other).await.unwrap(), None);

    // Deleting takes its builds, logs and tags with it.
    assert!(store.delete_template(&tid).await.unwrap());
    assert!(!store.delete_template(&tid).await.unwrap());
    assert_eq!(store.find_template(&name).await.unwrap(), None);
    assert_eq!(store.get_build(&b1.id).await.unwrap(), None);
    assert!(store.build_logs(&b1.id, 0, 10).await.unwrap().is_empty());
    assert!(store.tags(&tid).await.unwrap().is_empty());
}

#[tokio::test]
async fn sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("wrenn.db").to_str().unwrap())
        .await
        .unwrap();
    exercise(store).await;
}

#[tokio::test]
async fn postgres_when_configured() {
    let Ok(url) = std::env::var("WRENN_TEST_POSTGRES_URL") else {
        eprintln!("WRENN_TEST_POSTGRES_URL not set: PostgreSQL store test not run");
        return;
    };
    exercise(Store::open(&url).await.unwrap()).await;
}
