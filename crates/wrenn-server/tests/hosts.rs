//! Hosts that join over the network, ring 2 (test-double agents): joins and heartbeats with
//! their tokens, placement on healthy hosts that hold the template, a silent host written off
//! (its running sandboxes reported lost, its paused ones kept) and reconciled when it is back,
//! and timeouts handled once by two control planes on one database, or by the survivor when
//! the one that claimed a timeout died. On SQLite, and on PostgreSQL when configured.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use support::*;
use tokio_util::sync::CancellationToken;
use wrenn_core::{SandboxId, UnixMillis};
use wrenn_server::store::Store;

const JOIN: &str = "join-token-for-tests";

fn cluster_config(c: &mut wrenn_server::Config) {
    c.join_token = Some(JOIN.into());
    c.heartbeat_interval = Duration::from_millis(100);
    c.host_unhealthy_after = Duration::from_millis(700);
    c.host_lost_after = Duration::from_millis(1500);
}

/// A stack whose own registered host takes nothing (no vCPUs), so every sandbox goes to the
/// hosts a test joins.
async fn stack(db: Db) -> Stack {
    Stack::with(db, FakeAgent::with_capacity(0, 0, 0), cluster_config).await
}

async fn join(s: &Stack, id: &str, url: &str, token: &str) -> (u16, Value) {
    json(
        s.http
            .post(format!("{}/hosts/join", s.server.url))
            .bearer_auth(token)
            .json(&json!({"hostId": id, "url": url})),
    )
    .await
}

fn heartbeat(templates: &[&str], stopping: bool) -> Value {
    let templates: Vec<Value> = templates
        .iter()
        .map(|t| json!({"id": t, "envdVersion": "0.6.4", "vcpus": 2, "memoryMB": 512, "diskSizeMB": 2048}))
        .collect();
    json!({
        "vcpus": 16, "memoryMB": 16384, "memoryAvailableMB": 12000, "diskFreeMB": 90000,
        "maxSandboxes": 0, "sandboxes": 0, "version": "test", "templates": templates,
        "stopping": stopping,
    })
}

async fn beat(s: &Stack, id: &str, secret: &str, body: &Value) -> u16 {
    s.http
        .post(format!("{}/hosts/{id}/heartbeat", s.server.url))
        .bearer_auth(secret)
        .json(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Heartbeats for host `id` every 100 ms until the token is cancelled.
fn keep_beating(s: &Stack, id: &str, secret: &str, templates: &[&str]) -> CancellationToken {
    let stop = CancellationToken::new();
    let (http, url, id, secret) = (
        s.http.clone(),
        s.server.url.clone(),
        id.to_owned(),
        secret.to_owned(),
    );
    let body = heartbeat(templates, false);
    let token = stop.clone();
    tokio::spawn(async move {
        while !token.is_cancelled() {
            let _ = http
                .post(format!("{url}/hosts/{id}/heartbeat"))
                .bearer_auth(&secret)
                .json(&body)
                .send()
                .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    stop
}

async fn hosts(s: &Stack) -> HashMap<String, Value> {
    let (st, v) = json(
        s.http
            .get(format!("{}/admin/hosts", s.server.url))
            .header("x-admin-token", ADMIN),
    )
    .await;
    assert_eq!(st, 200);
    v.as_array()
        .unwrap()
        .iter()
        .map(|h| (h["id"].as_str().unwrap().to_owned(), h.clone()))
        .collect()
}

/// A fake agent reached at `url`.
fn agent_at(s: &Stack, url: &str) -> Arc<FakeAgent> {
    let a = Arc::new(FakeAgent::default());
    s.server
        .agent
        .others
        .lock()
        .unwrap()
        .insert(url.to_owned(), a.clone());
    a
}

async fn joins_heartbeats_placement_and_loss(db: Db) {
    let s = stack(db).await;
    let (a_url, b_url) = ("http://127.0.0.1:11", "http://127.0.0.1:12");
    let (a, b) = (agent_at(&s, a_url), agent_at(&s, b_url));

    // Joins need the cluster's token and an http(s) URL.
    assert_eq!(join(&s, "ha", a_url, "wrong").await.0, 401);
    assert_eq!(join(&s, "ha", "unix:/tmp/x", JOIN).await.0, 400);
    assert_eq!(join(&s, "bad id!", a_url, JOIN).await.0, 400);
    let (st, ja) = join(&s, "ha", a_url, JOIN).await;
    assert_eq!(st, 200, "{ja}");
    assert_eq!(ja["heartbeatIntervalMs"], 100);
    let secret_a = ja["secret"].as_str().unwrap().to_owned();
    assert_eq!(secret_a, wrenn_server::tokens::agent_secret(SECRET, "ha"));
    let (_, jb) = join(&s, "hb", b_url, JOIN).await;
    let secret_b = jb["secret"].as_str().unwrap().to_owned();

    // Joined, a host takes nothing until it has said what it has.
    let (st, _) = json(
        s.req(Method::POST, "/v2/sandboxes")
            .json(&json!({"templateID": "base"})),
    )
    .await;
    assert_eq!(st, 503);

    // Heartbeats: only with the host's own secret, only for a host that joined.
    let body = heartbeat(&["base"], false);
    assert_eq!(beat(&s, "ha", &secret_b, &body).await, 401);
    assert_eq!(beat(&s, "ha", "", &body).await, 401);
    let stranger = wrenn_server::tokens::agent_secret(SECRET, "nobody");
    assert_eq!(beat(&s, "nobody", &stranger, &body).await, 404);
    let beats_a = keep_beating(&s, "ha", &secret_a, &["base"]);
    let beats_b = keep_beating(&s, "hb", &secret_b, &["base", "solo"]);
    wait_for("both joined hosts heard from", async || {
        let h = hosts(&s).await;
        h["ha"]["schedulable"] == true && h["hb"]["templates"] == json!(["base", "solo"])
    })
    .await;
    let h = hosts(&s).await;
    assert_eq!(h["ha"]["health"], "healthy");
    assert_eq!(h["ha"]["templates"], json!(["base"]));
    assert_eq!(
        h["h1"]["health"], "healthy",
        "a host without heartbeats is never silent"
    );
    assert_eq!(h["h1"]["heartbeatAt"], Value::Null);

    // Placement: spread over both, and a template only one holds goes there.
    let mut on_a = vec![];
    for _ in 0..6 {
        let id = s
            .create(json!({"templateID": "base", "timeout": 600}))
            .await["sandboxID"]
            .as_str()
            .unwrap()
            .to_owned();
        if a.state(&id).is_some() {
            on_a.push(id);
        }
    }
    assert!(!on_a.is_empty() && on_a.len() < 6, "{on_a:?}");
    assert_eq!(a.creates() + b.creates(), 6);
    let solo = s
        .create(json!({"templateID": "solo", "timeout": 600}))
        .await;
    assert!(b.state(solo["sandboxID"].as_str().unwrap()).is_some());

    // One of a's sandboxes is paused: that one survives the loss of its host.
    let kept = on_a.pop().unwrap();
    let (st, _) = json(s.req(Method::POST, &format!("/sandboxes/{kept}/pause"))).await;
    assert_eq!(st, 204);

    // a goes silent: unhealthy first (nothing new placed there), then lost.
    beats_a.cancel();
    wait_for("a unhealthy", async || {
        hosts(&s).await["ha"]["health"] == "unhealthy"
    })
    .await;
    let before = a.creates();
    for _ in 0..3 {
        s.create(json!({"templateID": "base", "timeout": 600}))
            .await;
    }
    assert_eq!(a.creates(), before, "placed on an unhealthy host");
    wait_for("a lost", async || hosts(&s).await["ha"]["health"] == "lost").await;
    for id in &on_a {
        let (st, v) = json(s.req(Method::GET, &format!("/sandboxes/{id}"))).await;
        assert_eq!(st, 404);
        assert_eq!(
            v["message"],
            format!("Sandbox \"{id}\" was lost: its host ha stopped answering")
        );
    }
    let (_, listed) = json(s.req(Method::GET, "/v2/sandboxes?state=running,paused")).await;
    let listed: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["sandboxID"].as_str().unwrap())
        .collect();
    assert!(
        on_a.iter().all(|id| !listed.contains(&id.as_str())),
        "{listed:?}"
    );
    assert!(
        listed.contains(&kept.as_str()),
        "paused sandbox of the lost host kept"
    );
    assert_eq!(a.calls_of("kill").len(), 0, "nobody can reach a lost host");

    // Its paused sandbox resumes on b from the shared store, once the store has it.
    let connect = |id: &str| {
        s.req(Method::POST, &format!("/sandboxes/{id}/connect"))
            .json(&json!({"timeout": 300}))
    };
    let (st, v) = json(connect(&kept)).await;
    assert_eq!(st, 503, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("its host ha is not answering and the shared store has no copy of it"),
        "{v}"
    );
    let (st, v) = json(s.req(Method::GET, &format!("/sandboxes/{kept}"))).await;
    assert_eq!((st, v["state"].as_str()), (200, Some("paused")));
    b.fetchable.lock().unwrap().insert(kept.clone());
    let (st, v) = json(connect(&kept)).await;
    assert!(st == 200 || st == 201, "{st} {v}");
    assert_eq!(
        b.state(&kept),
        Some(wrenn_agent_proto::v1::SandboxState::Running)
    );
    assert!(b.calls().contains(&format!("resume {kept} fetch")));
    let (st, v) = json(s.req(Method::GET, &format!("/sandboxes/{kept}"))).await;
    assert_eq!((st, v["state"].as_str()), (200, Some("running")));

    // a is back: the sandboxes written off are killed on it, and so is its stale copy of the
    // one that moved to b.
    let beats_a = keep_beating(&s, "ha", &secret_a, &["base"]);
    wait_for("written-off and moved sandboxes killed on a", async || {
        on_a.iter().chain([&kept]).all(|id| a.state(id).is_none())
    })
    .await;
    assert_eq!(hosts(&s).await["ha"]["health"], "healthy");
    assert_eq!(
        b.state(&kept),
        Some(wrenn_agent_proto::v1::SandboxState::Running)
    );

    // A stopping host is reconciled at once and takes nothing new.
    beats_b.cancel();
    // A beat already on its way lands first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        beat(&s, "hb", &secret_b, &heartbeat(&["base"], true)).await,
        204
    );
    assert_eq!(hosts(&s).await["hb"]["schedulable"], false);
    beats_a.cancel();
    s.stop().await;
}

async fn timeouts_fire_once_across_replicas(db: Db) {
    // The lease is far longer than a stop takes here, even with the machine loaded: a lease
    // that runs out mid-stop lets another replica repeat it, which is the lease's contract.
    let s = Stack::with(db, FakeAgent::default(), |c| {
        c.expire_lease = Duration::from_secs(10);
    })
    .await;
    let other = Server::start_with(&s.server.db, s.server.agent.clone(), |c| {
        c.expire_lease = Duration::from_secs(10);
    })
    .await;
    let mut ids = vec![];
    for n in 0..20 {
        let mut body = json!({"templateID": "base", "timeout": 1});
        if n % 2 == 0 {
            body["autoPause"] = json!(true);
        }
        ids.push(
            s.create(body).await["sandboxID"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let agent = s.server.agent.clone();
    wait_for("every timeout handled", async || {
        ids.iter().enumerate().all(|(n, id)| {
            let want = if n % 2 == 0 { "pause" } else { "kill" };
            agent.calls().iter().any(|c| {
                c.strip_prefix(want)
                    .is_some_and(|r| r.trim_start().starts_with(id.as_str()))
            })
        })
    })
    .await;
    // Both reapers ran all along; give a second one the chance to fire again.
    tokio::time::sleep(Duration::from_millis(600)).await;
    for (n, id) in ids.iter().enumerate() {
        let calls: Vec<String> = agent
            .calls()
            .into_iter()
            .filter(|c| {
                c.contains(id.as_str()) && (c.starts_with("kill") || c.starts_with("pause"))
            })
            .collect();
        let want = if n % 2 == 0 { "pause" } else { "kill" };
        assert_eq!(calls.len(), 1, "{id}: {calls:?}");
        assert!(calls[0].starts_with(want), "{id}: {calls:?}");
    }

    // A replica that claimed a timeout and died: the survivor takes it over at the lease's end.
    other.stop().await;
    let dead = Store::open(&s.server.db).await.unwrap();
    let id = s.create(json!({"templateID": "base", "timeout": 1})).await["sandboxID"]
        .as_str()
        .unwrap()
        .to_owned();
    let sid = SandboxId::parse(&id).unwrap();
    // Claimed at once by the "dead" replica (as if its clock said the timeout had passed),
    // for 3 s from now; it then does nothing.
    let real_now = now_ms();
    let got = dead
        .claim_expired(
            UnixMillis(i64::MAX / 2),
            UnixMillis(real_now.0 + 3_000),
            100,
        )
        .await
        .unwrap();
    assert!(got.iter().any(|r| r.id == sid));
    // Its timeout passes after 1 s; the lease holds it until 3 s.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    assert!(
        !agent.calls_of("kill").iter().any(|c| c.contains(&id)),
        "killed under another replica's lease"
    );
    wait_for("the survivor kills it", async || {
        agent.calls_of("kill").iter().any(|c| c.contains(&id))
    })
    .await;
    assert_eq!(
        agent
            .calls_of("kill")
            .iter()
            .filter(|c| c.contains(&id))
            .count(),
        1
    );
    dead.close().await;
    s.stop().await;
}

on_both_databases!(
    joins_heartbeats_placement_and_loss,
    timeouts_fire_once_across_replicas
);
