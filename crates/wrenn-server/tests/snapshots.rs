//! Snapshots and forks in the control plane, over real HTTP against a real SQLite file, with
//! the test-double agent (see `support`): answer shapes as the SDKs parse them, names, listing
//! with its pages, creates from a snapshot (placed on its host, the agent asked for the
//! snapshot), deletion through `DELETE /templates/{id}`, forks with their per-child results,
//! and the sweep of leftover snapshots. Each test runs on a SQLite file and, when
//! `WRENN_TEST_POSTGRES_URL` is set, again on a fresh PostgreSQL database.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use support::*;
use wrenn_agent_proto::v1::SandboxState as AgentState;
use wrenn_connect::ConnectError;
use wrenn_core::UnixMillis;
use wrenn_server::tokens;

async fn sandbox(s: &Stack, body: Value) -> String {
    s.create(body).await["sandboxID"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn snapshot(s: &Stack, id: &str, body: Value) -> (u16, Value) {
    json(
        s.req(Method::POST, &format!("/sandboxes/{id}/snapshots"))
            .json(&body),
    )
    .await
}

async fn fork(s: &Stack, id: &str, body: Value) -> (u16, Value) {
    json(
        s.req(Method::POST, &format!("/sandboxes/{id}/fork"))
            .json(&body),
    )
    .await
}

/// The agent's ID of the snapshot the last Snapshot call asked for.
fn last_snapshot_id(s: &Stack) -> String {
    let calls = s.server.agent.calls_of("snapshot ");
    calls.last().unwrap().split(' ').nth(2).unwrap().to_owned()
}

/// A page of `GET /snapshots{query}` and its `x-next-token`.
async fn list(s: &Stack, query: &str) -> (Vec<Value>, Option<String>) {
    let r = s
        .req(Method::GET, &format!("/snapshots{query}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let next = r
        .headers()
        .get("x-next-token")
        .map(|v| v.to_str().unwrap().to_owned());
    (r.json().await.unwrap(), next)
}

on_both_databases!(
    snapshot_answers_names_conflicts_and_sources_stay_as_they_were,
    listing_filters_by_sandbox_and_name_and_pages_with_next_token,
    creates_from_a_snapshot_go_to_its_host_with_the_snapshot,
    snapshots_are_deleted_by_id_or_name_through_the_template_route,
    forks_make_their_children_from_one_snapshot_each_on_its_own,
    the_reconciler_deletes_snapshots_that_operations_left_behind,
);

fn ids(page: &[Value]) -> Vec<String> {
    page.iter()
        .map(|v| v["snapshotID"].as_str().unwrap().to_owned())
        .collect()
}

async fn info(s: &Stack, id: &str) -> Value {
    let (st, v) = json(s.req(Method::GET, &format!("/sandboxes/{id}"))).await;
    assert_eq!(st, 200, "{v}");
    v
}

/// Seconds between a sandbox's `startedAt` and `endAt`.
fn timeout_of(v: &Value) -> i64 {
    let t = |k: &str| {
        time::OffsetDateTime::parse(
            v[k].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    (t("endAt") - t("startedAt")).whole_seconds()
}

async fn snapshot_answers_names_conflicts_and_sources_stay_as_they_were(db: Db) {
    let s = Stack::with(db, FakeAgent::default(), |_| {}).await;
    let id = sandbox(&s, json!({"templateID": "base"})).await;

    let (st, v) = snapshot(&s, &id, json!({})).await;
    assert_eq!(st, 201, "{v}");
    let raw = last_snapshot_id(&s);
    assert_eq!(raw.len(), 20);
    assert!(
        raw.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    );
    assert_eq!(
        v,
        json!({"snapshotID": format!("{raw}:default"), "names": []})
    );
    // The source runs on (the agent paused and resumed it).
    assert_eq!(s.server.agent.state(&id), Some(AgentState::Running));
    assert_eq!(info(&s, &id).await["state"], "running");

    let (st, v) = snapshot(&s, &id, json!({"name": "snap1"})).await;
    assert_eq!(st, 201, "{v}");
    let full = format!("{}/snap1:default", s.team);
    assert_eq!(v, json!({"snapshotID": full, "names": [full]}));

    // A name the team used: 409, and the sandbox is not paused for it.
    let taken = s.server.agent.calls_of("snapshot ").len();
    for name in ["snap1", full.as_str(), "snap1:default"] {
        assert_eq!(snapshot(&s, &id, json!({"name": name})).await.0, 409);
    }
    assert_eq!(s.server.agent.calls_of("snapshot ").len(), taken);
    // Names are per team.
    let (other, other_key) = s.other_team().await;
    let r = s
        .http
        .post(format!("{}/v2/sandboxes", s.server.url))
        .header("x-api-key", &other_key)
        .json(&json!({"templateID": "base"}))
        .send()
        .await
        .unwrap();
    let theirs: Value = r.json().await.unwrap();
    let theirs = theirs["sandboxID"].as_str().unwrap();
    let (st, v) = json(
        s.http
            .post(format!("{}/sandboxes/{theirs}/snapshots", s.server.url))
            .header("x-api-key", &other_key)
            .json(&json!({"name": "snap1"})),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["names"], json!([format!("{other}/snap1:default")]));
    // Another team's sandbox is not found.
    assert_eq!(snapshot(&s, theirs, json!({})).await.0, 404);

    // Bad requests.
    for body in [
        json!({"memory": false}),
        json!({"name": "a b"}),
        json!({"name": "snap:v2"}),
        json!({"name": "someone/snap"}),
        json!({"name": 5}),
    ] {
        assert_eq!(snapshot(&s, &id, body.clone()).await.0, 400, "{body}");
    }
    // Unknown sandbox: 404 with the E2B body (`json` checks `code` and `message`).
    let (st, v) = snapshot(&s, "nosuchsandbox", json!({})).await;
    assert_eq!(st, 404);
    assert!(
        v["message"].as_str().unwrap().contains("nosuchsandbox"),
        "{v}"
    );

    // A paused sandbox stays paused.
    let r = s
        .req(Method::POST, &format!("/sandboxes/{id}/pause"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(snapshot(&s, &id, json!({"name": "paused"})).await.0, 201);
    assert_eq!(s.server.agent.state(&id), Some(AgentState::Paused));
    assert_eq!(info(&s, &id).await["state"], "paused");

    // What the agent refuses or fails leaves no snapshot; one whose outcome is unknown is
    // deleted on the agent as well.
    let listed = list(&s, "").await.0.len();
    s.server.agent.busy.lock().unwrap().insert(id.clone());
    assert_eq!(snapshot(&s, &id, json!({"name": "busy"})).await.0, 409);
    s.server.agent.busy.lock().unwrap().clear();
    *s.server.agent.fail_next_snapshot.lock().unwrap() = Some(ConnectError::internal("disk full"));
    let (st, v) = snapshot(&s, &id, json!({"name": "failed"})).await;
    assert_eq!(st, 500);
    assert!(!v["message"].as_str().unwrap().contains("disk full"), "{v}");
    *s.server.agent.fail_next_snapshot.lock().unwrap() =
        Some(ConnectError::deadline_exceeded("slow"));
    assert_eq!(snapshot(&s, &id, json!({"name": "slow"})).await.0, 502);
    let lost = last_snapshot_id(&s);
    assert!(
        s.server
            .agent
            .calls()
            .contains(&format!("delete_snapshot {lost}"))
    );
    assert_eq!(list(&s, "").await.0.len(), listed);
    let store = s.server.cp.store();
    assert!(
        store
            .leftover_snapshots(UnixMillis(i64::MAX), UnixMillis(i64::MAX))
            .await
            .unwrap()
            .is_empty()
    );
    // The names of failed snapshots are free again.
    assert_eq!(snapshot(&s, &id, json!({"name": "failed"})).await.0, 201);
    s.stop().await;
}

async fn listing_filters_by_sandbox_and_name_and_pages_with_next_token(db: Db) {
    let s = Stack::with(db, FakeAgent::default(), |_| {}).await;
    let a = sandbox(&s, json!({"templateID": "base"})).await;
    let b = sandbox(&s, json!({"templateID": "base"})).await;
    let mut made = Vec::new();
    for (id, body) in [
        (&a, json!({})),
        (&a, json!({})),
        (&a, json!({"name": "alpha"})),
        (&b, json!({"name": "beta"})),
    ] {
        let (st, v) = snapshot(&s, id, body).await;
        assert_eq!(st, 201);
        made.push(v["snapshotID"].as_str().unwrap().to_owned());
        // Distinct times, so "newest first" is one order.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let newest_first: Vec<String> = made.iter().rev().cloned().collect();
    let (all, next) = list(&s, "").await;
    assert_eq!(ids(&all), newest_first);
    assert_eq!(next, None, "one page: no token");
    assert_eq!(all[0]["names"], json!([made[3]]));

    let (page, _) = list(&s, &format!("?sandboxID={b}")).await;
    assert_eq!(ids(&page), [made[3].clone()]);
    assert_eq!(list(&s, &format!("?sandboxID={a}")).await.0.len(), 3);
    for name in [
        "alpha",
        &format!("{}/alpha:default", s.team),
        "alpha:default",
    ] {
        let q = format!("?name={}", urlencode(name));
        assert_eq!(ids(&list(&s, &q).await.0), [made[2].clone()], "{name}");
    }
    for q in [
        format!("?name=beta&sandboxID={a}"),
        "?name=nope".to_owned(),
        "?name=alpha%3Av2".to_owned(),
        "?name=other%2Falpha".to_owned(),
        "?sandboxID=nosuchsandbox".to_owned(),
        "?sandboxID=Not-An-ID".to_owned(),
    ] {
        assert_eq!(list(&s, &q).await, (vec![], None), "{q}");
    }

    // Pages: the token of the last entry, and none after the last page.
    let (first, next) = list(&s, "?limit=3").await;
    assert_eq!(ids(&first), newest_first[..3]);
    let next = next.expect("a token while more follow");
    let (rest, after) = list(&s, &format!("?limit=3&nextToken={next}")).await;
    assert_eq!(ids(&rest), newest_first[3..]);
    assert_eq!(after, None);
    let (two, next) = list(&s, "?limit=2").await;
    let (two_more, last) = list(&s, &format!("?limit=2&nextToken={}", next.unwrap())).await;
    assert_eq!([ids(&two), ids(&two_more)].concat(), newest_first);
    assert_eq!(last, None, "an exact last page has no token either");

    for q in ["?limit=0", "?limit=101", "?nextToken=%25%25", "?limit=x"] {
        let (st, _) = json(s.req(Method::GET, &format!("/snapshots{q}"))).await;
        assert_eq!(st, 400, "{q}");
    }
    // Another team sees none of them.
    let (_, other_key) = s.other_team().await;
    let (st, v) = json(
        s.http
            .get(format!("{}/snapshots", s.server.url))
            .header("x-api-key", other_key),
    )
    .await;
    assert_eq!((st, v), (200, json!([])));
    s.stop().await;
}

fn urlencode(s: &str) -> String {
    s.replace('/', "%2F").replace(':', "%3A")
}

async fn creates_from_a_snapshot_go_to_its_host_with_the_snapshot(db: Db) {
    let s = Stack::with(db, FakeAgent::default(), |_| {}).await;
    let src = sandbox(
        &s,
        json!({"templateID": "base", "envVars": {"A": "1"}, "metadata": {"m": "src"}}),
    )
    .await;
    let (st, v) = snapshot(&s, &src, json!({"name": "golden"})).await;
    assert_eq!(st, 201);
    let full = v["snapshotID"].as_str().unwrap().to_owned();
    let raw = last_snapshot_id(&s);
    let (_, unnamed) = snapshot(&s, &src, json!({})).await;
    let unnamed_raw = last_snapshot_id(&s);
    // A long name makes a namespaced ID longer than any template ID: still usable.
    let long = "l".repeat(64);
    let (st, v) = snapshot(&s, &src, json!({"name": long})).await;
    assert_eq!(st, 201, "{v}");
    let long_full = v["snapshotID"].as_str().unwrap().to_owned();
    let long_raw = last_snapshot_id(&s);
    assert!(long_full.len() > 64);

    // A second host, emptier than h1: plain creates go there, creates from the snapshot not.
    let h2 = Arc::new(FakeAgent::default());
    s.server
        .agent
        .others
        .lock()
        .unwrap()
        .insert("http://127.0.0.1:2".into(), h2.clone());
    let r = s
        .http
        .post(format!("{}/admin/hosts", s.server.url))
        .header("x-admin-token", ADMIN)
        .json(&json!({"id": "h2", "rpcUrl": "http://127.0.0.1:2", "proxyUrl": ""}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let store = s.server.cp.store();
    let host_of = |id: String| async move {
        let rec = store.get_sandbox(&id).await.unwrap().unwrap();
        rec.host_id.unwrap().to_string()
    };
    let plain = sandbox(&s, json!({"templateID": "base"})).await;
    assert_eq!(host_of(plain.clone()).await, "h2");
    assert!(h2.spec(&plain).is_some());

    let refs = [
        ("golden".to_owned(), &raw),
        (full.clone(), &raw),
        ("golden:default".to_owned(), &raw),
        (
            unnamed["snapshotID"].as_str().unwrap().to_owned(),
            &unnamed_raw,
        ),
        (unnamed_raw.clone(), &unnamed_raw),
        (long_full.clone(), &long_raw),
    ];
    for (reference, snap) in refs {
        let v = s
            .create(
                json!({"templateID": reference, "timeout": 60, "envVars": {"B": "2"},
                           "metadata": {"k": "v"}}),
            )
            .await;
        let id = v["sandboxID"].as_str().unwrap().to_owned();
        assert_ne!(id, src);
        assert_eq!(v["templateID"], snap.as_str(), "{reference}");
        assert_eq!(v["envdVersion"], "0.6.5", "the snapshot's envd");
        assert_eq!(v["envdAccessToken"], tokens::envd_access_token(SECRET, &id));
        assert_eq!(host_of(id.clone()).await, "h1", "{reference}");
        let spec = s.server.agent.spec(&id).unwrap();
        assert_eq!(spec.snapshot_id, *snap);
        assert_eq!(spec.template_id, "base", "the snapshot's template");
        assert_eq!(
            spec.env_vars,
            HashMap::from([("B".to_owned(), "2".to_owned())])
        );
        assert_eq!(
            spec.envd_access_token,
            tokens::envd_access_token(SECRET, &id)
        );
        let got = info(&s, &id).await;
        assert_eq!(got["templateID"], snap.as_str());
        assert_eq!(got["metadata"], json!({"k": "v"}));
        assert_eq!(timeout_of(&got), 60);
    }
    // An idempotent create from a snapshot answers its first sandbox again.
    let keyed = |key: &'static str| {
        s.req(Method::POST, "/v2/sandboxes")
            .header("idempotency-key", key)
            .json(&json!({"templateID": "golden"}))
    };
    let (st1, first) = json(keyed("k1")).await;
    let (st2, again) = json(keyed("k1")).await;
    assert_eq!((st1, st2), (201, 201));
    assert_eq!(first["sandboxID"], again["sandboxID"]);

    // Another team cannot use them; unknown references are 404s.
    let (_, other_key) = s.other_team().await;
    for reference in [full.as_str(), "golden", raw.as_str()] {
        let (st, _) = json(
            s.http
                .post(format!("{}/v2/sandboxes", s.server.url))
                .header("x-api-key", &other_key)
                .json(&json!({"templateID": reference})),
        )
        .await;
        assert_eq!(st, 404, "{reference}");
    }
    assert_eq!(
        snapshot(&s, &src, json!({"name": "l".repeat(65)})).await.0,
        400
    );
    for reference in ["golden:v2", "nosuchsnapshot", "someone/golden:default"] {
        let (st, _) = json(
            s.req(Method::POST, "/v2/sandboxes")
                .json(&json!({"templateID": reference})),
        )
        .await;
        assert_eq!(st, 404, "{reference}");
    }
    for reference in ["", "a b", &"x".repeat(200)] {
        let (st, _) = json(
            s.req(Method::POST, "/v2/sandboxes")
                .json(&json!({"templateID": reference})),
        )
        .await;
        assert_eq!(st, 400, "{reference}");
    }
    s.stop().await;
}

async fn snapshots_are_deleted_by_id_or_name_through_the_template_route(db: Db) {
    let s = Stack::with(db, FakeAgent::default(), |_| {}).await;
    let src = sandbox(&s, json!({"templateID": "base"})).await;
    let delete = |id: String| {
        let s = &s;
        async move { json(s.req(Method::DELETE, &format!("/templates/{id}"))).await }
    };
    // The SDKs send the whole snapshotID as one encoded segment.
    let (_, named) = snapshot(&s, &src, json!({"name": "snap"})).await;
    let named_raw = last_snapshot_id(&s);
    let full = named["snapshotID"].as_str().unwrap();
    assert_eq!(delete(urlencode(full)).await.0, 204);
    assert!(
        s.server
            .agent
            .calls()
            .contains(&format!("delete_snapshot {named_raw}"))
    );
    assert!(!s.server.agent.snapshot_ids().contains(&named_raw));
    // The second time it is not found (Python's delete_snapshot then returns False; JS reads
    // the body's code).
    let (st, v) = delete(urlencode(full)).await;
    assert_eq!((st, v["code"].as_u64()), (404, Some(404)));
    // Creates from it are refused now; its name is free again.
    let (st, _) = json(
        s.req(Method::POST, "/v2/sandboxes")
            .json(&json!({"templateID": full})),
    )
    .await;
    assert_eq!(st, 404);
    assert_eq!(snapshot(&s, &src, json!({"name": "snap"})).await.0, 201);
    assert_eq!(delete("snap".into()).await.0, 204, "by bare name");

    let (_, unnamed) = snapshot(&s, &src, json!({})).await;
    let unnamed_raw = last_snapshot_id(&s);
    let (_, other_key) = s.other_team().await;
    let r = s
        .http
        .delete(format!("{}/templates/{unnamed_raw}", s.server.url))
        .header("x-api-key", other_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "another team's snapshot is not found");
    assert_eq!(
        delete(urlencode(unnamed["snapshotID"].as_str().unwrap()))
            .await
            .0,
        204
    );
    assert_eq!(list(&s, "").await.0, Vec::<Value>::new());
    assert_eq!(delete("nosuchsnapshot".into()).await.0, 404);

    // The template route still deletes templates.
    let (st, v) = json(
        s.req(Method::POST, "/v3/templates")
            .json(&json!({"name": "tpl1"})),
    )
    .await;
    assert_eq!(st, 202, "{v}");
    assert_eq!(delete("tpl1".into()).await.0, 204);
    assert_eq!(
        s.server.cp.store().find_template("tpl1").await.unwrap(),
        None
    );
    s.stop().await;
}

async fn forks_make_their_children_from_one_snapshot_each_on_its_own(db: Db) {
    let s = Stack::with(db, FakeAgent::default(), |_| {}).await;
    let src = sandbox(
        &s,
        json!({"templateID": "base", "metadata": {"owner": "me"}, "envVars": {"A": "1"},
               "network": {"allowPublicTraffic": false}}),
    )
    .await;

    // The count is checked here (JS sends whatever it was given).
    for body in [
        json!({"count": 0}),
        json!({"count": 21}),
        json!({"count": -1}),
        json!({"count": "3"}),
        json!({"count": 1.5}),
        json!({"timeout": -5}),
    ] {
        let (st, v) = fork(&s, &src, body.clone()).await;
        assert_eq!(st, 400, "{body}: {v}");
    }
    let (_, v) = fork(&s, &src, json!({"count": 0})).await;
    assert_eq!(v["message"], "count must be an integer between 1 and 20");
    assert!(s.server.agent.calls_of("snapshot ").is_empty());
    // Unknown source: 404 (the SDKs raise SandboxNotFound).
    assert_eq!(fork(&s, "nosuchsandbox", json!({})).await.0, 404);

    // Three forks, one of which the host refuses.
    *s.server.agent.fail_next_create.lock().unwrap() =
        Some(ConnectError::resource_exhausted("host full"));
    let creates_before = s.server.agent.creates();
    let (st, v) = fork(&s, &src, json!({"count": 3, "timeout": 60})).await;
    assert_eq!(st, 201, "{v}");
    let entries = v.as_array().unwrap();
    assert_eq!(entries.len(), 3);
    let failed: Vec<&Value> = entries
        .iter()
        .filter(|e| e.get("error").is_some())
        .collect();
    assert_eq!(failed.len(), 1, "{v}");
    assert_eq!(failed[0].as_object().unwrap().len(), 1, "only `error`: {v}");
    assert_eq!(failed[0]["error"]["code"], 503);
    assert!(
        failed[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("host full")
    );
    let children: Vec<String> = entries
        .iter()
        .filter_map(|e| e.get("sandbox"))
        .map(|sbx| {
            let id = sbx["sandboxID"].as_str().unwrap().to_owned();
            assert_eq!(
                sbx,
                &json!({
                    "sandboxID": id, "templateID": "base", "clientID": "6532622b",
                    "envdVersion": "0.6.5",
                    "envdAccessToken": tokens::envd_access_token(SECRET, &id),
                    "trafficAccessToken": tokens::traffic_access_token(SECRET, &id),
                    "domain": DOMAIN,
                })
            );
            id
        })
        .collect();
    assert_eq!(children.len(), 2);
    assert_ne!(children[0], children[1]);
    assert!(!children.contains(&src));

    // One snapshot, three creates from it, then the snapshot deleted.
    let snaps = s.server.agent.calls_of("snapshot ");
    assert_eq!(snaps, [format!("snapshot {src} {}", last_snapshot_id(&s))]);
    let snap = last_snapshot_id(&s);
    assert_eq!(s.server.agent.creates(), creates_before + 3);
    let calls = s.server.agent.calls();
    let deleted_at = calls
        .iter()
        .position(|c| *c == format!("delete_snapshot {snap}"))
        .expect("the fork's snapshot is deleted");
    assert!(
        calls
            .iter()
            .rposition(|c| c.starts_with("create "))
            .unwrap()
            < deleted_at
    );
    assert!(s.server.agent.snapshot_ids().is_empty());
    assert_eq!(s.server.cp.store().get_snapshot(&snap).await.unwrap(), None);
    assert_eq!(list(&s, "").await.0, Vec::<Value>::new(), "never listed");
    // Each child: its own record, the source's settings, the fork's timeout.
    for id in &children {
        let spec = s.server.agent.spec(id).unwrap();
        assert_eq!(spec.snapshot_id, snap);
        assert_eq!(spec.template_id, "base");
        assert_eq!(
            spec.env_vars,
            HashMap::from([("A".to_owned(), "1".to_owned())])
        );
        let got = info(&s, id).await;
        assert_eq!(got["state"], "running");
        assert_eq!(got["metadata"], json!({"owner": "me"}));
        assert_eq!(got["network"]["allowPublicTraffic"], false);
        assert_eq!(timeout_of(&got), 60);
    }
    // The source runs on.
    assert_eq!(s.server.agent.state(&src), Some(AgentState::Running));
    assert_eq!(info(&s, &src).await["state"], "running");

    // A paused source can be forked and stays paused; children get a create's timeout.
    let r = s
        .req(Method::POST, &format!("/sandboxes/{src}/pause"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let (st, v) = fork(&s, &src, json!({})).await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v.as_array().unwrap().len(), 1);
    let child = v[0]["sandbox"]["sandboxID"].as_str().unwrap();
    assert_eq!(timeout_of(&info(&s, child).await), 300);
    assert_eq!(s.server.agent.state(&src), Some(AgentState::Paused));
    assert_eq!(info(&s, &src).await["state"], "paused");

    // A snapshot the agent refuses fails the fork as a whole.
    *s.server.agent.fail_next_snapshot.lock().unwrap() =
        Some(ConnectError::failed_precondition("sandbox is busy"));
    assert_eq!(fork(&s, &src, json!({"count": 2})).await.0, 409);
    // A killed source is not found.
    let r = s
        .req(Method::DELETE, &format!("/sandboxes/{src}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(fork(&s, &src, json!({})).await.0, 404);
    s.stop().await;
}

async fn the_reconciler_deletes_snapshots_that_operations_left_behind(db: Db) {
    let s = Stack::with(db, FakeAgent::default(), |_| {}).await;
    let src = sandbox(&s, json!({"templateID": "base"})).await;
    assert_eq!(snapshot(&s, &src, json!({"name": "kept"})).await.0, 201);
    let kept = last_snapshot_id(&s);
    let store = s.server.cp.store();
    let mut leftover = store.get_snapshot(&kept).await.unwrap().unwrap();
    let now = now_ms();
    // A capture whose answer never came (older than the grace), and a fork's own snapshot an
    // hour old: both deleted on the agent, then forgotten.
    leftover.id = "unansweredcapture000".into();
    leftover.name = Some("pending".into());
    leftover.ready = false;
    leftover.created_at = UnixMillis(now.0 - 60_000);
    assert!(store.insert_snapshot(&leftover).await.unwrap());
    let mut fork_own = leftover.clone();
    fork_own.id = "forgottenforksnap000".into();
    fork_own.name = None;
    fork_own.ready = true;
    fork_own.internal = true;
    fork_own.created_at = UnixMillis(now.0 - 3_700_000);
    assert!(store.insert_snapshot(&fork_own).await.unwrap());
    // Young ones are an operation in flight (of another control plane): left alone.
    let mut young = fork_own.clone();
    young.id = "youngforksnapshot000".into();
    young.created_at = now;
    assert!(store.insert_snapshot(&young).await.unwrap());

    s.server.cp.reconcile_all().await;
    for gone in [&leftover.id, &fork_own.id] {
        assert_eq!(store.get_snapshot(gone).await.unwrap(), None, "{gone}");
        assert!(
            s.server
                .agent
                .calls()
                .contains(&format!("delete_snapshot {gone}"))
        );
    }
    assert!(store.get_snapshot(&young.id).await.unwrap().is_some());
    assert!(store.get_snapshot(&kept).await.unwrap().is_some());
    assert_eq!(list(&s, "").await.0.len(), 1);
    s.stop().await;
}
