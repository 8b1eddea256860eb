//! The control plane's REST API and edge proxy against a real SQLite file, over real HTTP,
//! with a test-double host agent (see `support`).

mod support;

use std::time::Duration;

use reqwest::Method;
use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wrenn_agent_proto::v1::SandboxState as AgentState;

/// A 1-vCPU template `id`, public or `team`'s.
fn small_template(
    id: &str,
    team: Option<wrenn_core::TeamId>,
) -> wrenn_server::store::TemplateRecord {
    wrenn_server::store::TemplateRecord {
        id: id.into(),
        team_id: team,
        envd_version: "0.6.4".into(),
        vcpus: 1,
        memory_mb: 128,
        disk_size_mb: 512,
        name: None,
        build: None,
    }
}

#[tokio::test]
async fn lifecycle_through_every_sandbox_route() {
    let s = Stack::start().await;
    let sbx = s
        .create(json!({"templateID": "base", "timeout": 120, "metadata": {"k": "v"}, "envVars": {"A": "1"}, "futureField": 1}))
        .await;
    let id = sbx["sandboxID"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 20);
    assert_eq!(sbx["templateID"], "base");
    assert_eq!(sbx["clientID"], "6532622b");
    assert_eq!(sbx["envdVersion"], "0.6.4");
    assert_eq!(sbx["domain"], DOMAIN);
    let token = wrenn_server::tokens::envd_access_token(SECRET, &id);
    assert_eq!(sbx["envdAccessToken"], token);
    let spec = s.server.agent.spec(&id).unwrap();
    assert_eq!(spec.envd_access_token, token);
    assert_eq!(spec.env_vars["A"], "1");
    assert!(spec.backstop_unix_ms > spec.end_unix_ms);

    // v1 create answers the same way.
    let r = s
        .req(Method::POST, "/sandboxes")
        .json(&json!({"templateID": "base", "timeout": 300, "secure": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    let (st, info) = json(s.req(Method::GET, &format!("/sandboxes/{id}"))).await;
    assert_eq!(st, 200);
    assert_eq!(info["state"], "running");
    assert_eq!(info["metadata"]["k"], "v");
    assert_eq!(info["cpuCount"], 2);
    assert_eq!(info["memoryMB"], 512);
    assert_eq!(info["envdAccessToken"], token);
    let started = time::OffsetDateTime::parse(
        info["startedAt"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let end = time::OffsetDateTime::parse(
        info["endAt"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!((end - started).whole_seconds(), 120);
    // The legacy composite ID form works too.
    assert_eq!(
        json(s.req(Method::GET, &format!("/sandboxes/{id}-6532622b")))
            .await
            .0,
        200
    );

    // Timeout: may shorten; refresh: extends only.
    let r = s
        .req(Method::POST, &format!("/sandboxes/{id}/timeout"))
        .json(&json!({"timeout": 30}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let end30 = s.server.agent.spec(&id).unwrap().end_unix_ms;
    let r = s
        .req(Method::POST, &format!("/sandboxes/{id}/refreshes"))
        .json(&json!({"duration": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        s.server.agent.spec(&id).unwrap().end_unix_ms,
        end30,
        "a refresh below the end does not shorten"
    );
    let r = s
        .req(Method::POST, &format!("/sandboxes/{id}/refreshes"))
        .json(&json!({"duration": 600}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(s.server.agent.spec(&id).unwrap().end_unix_ms > end30 + 500_000);

    // Connect to a running sandbox: 200, never shortens.
    let before = s.server.agent.spec(&id).unwrap().end_unix_ms;
    let (st, body) = json(
        s.req(Method::POST, &format!("/v2/sandboxes/{id}/connect"))
            .json(&json!({"timeout": 10})),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(body["sandboxID"], id.as_str());
    assert_eq!(body["envdAccessToken"], token);
    assert_eq!(s.server.agent.spec(&id).unwrap().end_unix_ms, before);

    // Metrics and logs come from the agent.
    let (st, m) = json(s.req(Method::GET, &format!("/sandboxes/{id}/metrics"))).await;
    assert_eq!(st, 200);
    assert_eq!(m[0]["memCache"], 10);
    assert_eq!(m[0]["cpuUsedPct"], 12.5);
    let (st, logs) = json(s.req(Method::GET, &format!("/sandboxes/{id}/logs"))).await;
    assert_eq!(st, 200);
    assert_eq!(logs["logs"][0]["line"], format!("hello from {id}"));
    assert_eq!(logs["logEntries"][0]["level"], "info");

    // Snapshot: usable as a template to create sandboxes (more in `snapshots.rs`).
    let (st, snap) = json(
        s.req(Method::POST, &format!("/sandboxes/{id}/snapshots"))
            .json(&json!({"name": "snap1"})),
    )
    .await;
    assert_eq!(st, 201);
    let snap_id = snap["snapshotID"].as_str().unwrap().to_owned();
    assert_eq!(snap_id, format!("{}/snap1:default", s.team));
    assert_eq!(snap["names"], json!([snap_id]));
    let (st, list) = json(s.req(Method::GET, &format!("/snapshots?sandboxID={id}"))).await;
    assert_eq!(st, 200);
    assert_eq!(list, json!([snap]));
    let from_snap = s.create(json!({"templateID": snap_id})).await;
    let raw_id = s.server.agent.snapshot_ids().pop().unwrap();
    assert_eq!(from_snap["templateID"], raw_id.as_str());
    assert_eq!(s.server.agent.state(&id), Some(AgentState::Running));

    // Pause: 204, then 409; the SDK sees `paused`.
    let r = s
        .req(Method::POST, &format!("/sandboxes/{id}/pause"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(s.server.agent.state(&id), Some(AgentState::Paused));
    assert_eq!(
        json(s.req(Method::POST, &format!("/sandboxes/{id}/pause")))
            .await
            .0,
        409
    );
    assert_eq!(
        json(s.req(Method::GET, &format!("/sandboxes/{id}")))
            .await
            .1["state"],
        "paused"
    );
    // A paused sandbox's host still has its earlier samples.
    let (st, m) = json(s.req(Method::GET, &format!("/sandboxes/{id}/metrics"))).await;
    assert_eq!(st, 200);
    assert_eq!(m[0]["cpuCount"], 2, "{m}");
    // Timeouts of paused sandboxes are not kept.
    assert_eq!(
        json(
            s.req(Method::POST, &format!("/sandboxes/{id}/timeout"))
                .json(&json!({"timeout": 5}))
        )
        .await
        .0,
        404
    );

    // Connect resumes a paused sandbox: 201, with the same token.
    let (st, body) = json(
        s.req(Method::POST, &format!("/sandboxes/{id}/connect"))
            .json(&json!({"timeout": 60})),
    )
    .await;
    assert_eq!(st, 201);
    assert_eq!(body["envdAccessToken"], token);
    assert_eq!(s.server.agent.state(&id), Some(AgentState::Running));
    // v1 resume on a running sandbox: 409; after a pause: 201.
    assert_eq!(
        json(s.req(Method::POST, &format!("/sandboxes/{id}/resume")))
            .await
            .0,
        409
    );
    assert_eq!(
        s.req(Method::POST, &format!("/sandboxes/{id}/pause"))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(
        json(
            s.req(Method::POST, &format!("/sandboxes/{id}/resume"))
                .json(&json!({"timeout": 30}))
        )
        .await
        .0,
        201
    );

    // Kill: 204, then 404 with a JSON body everywhere.
    let r = s
        .req(Method::DELETE, &format!("/sandboxes/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(s.server.agent.state(&id), None);
    for (m, p) in [
        (Method::DELETE, format!("/sandboxes/{id}")),
        (Method::GET, format!("/sandboxes/{id}")),
        (Method::POST, format!("/sandboxes/{id}/pause")),
        (Method::POST, format!("/v2/sandboxes/{id}/connect")),
        (Method::GET, format!("/sandboxes/{id}/metrics")),
    ] {
        let (st, body) = json(s.req(m.clone(), &p).json(&json!({}))).await;
        assert_eq!(st, 404, "{m} {p}: {body}");
        assert!(body["message"].as_str().unwrap().contains(&id));
    }
    s.server.stop().await;
}

/// `Server-Timing` of a create response, as (name, milliseconds) in order.
fn server_timing(r: &reqwest::Response) -> Vec<(String, f64)> {
    let v = r
        .headers()
        .get("server-timing")
        .expect("a Server-Timing header")
        .to_str()
        .unwrap();
    v.split(", ")
        .map(|m| {
            let (name, dur) = m.split_once(";dur=").expect("name;dur=ms");
            (name.to_owned(), dur.parse::<f64>().expect("a number"))
        })
        .collect()
}

#[tokio::test]
async fn create_answers_where_its_time_went_in_server_timing() {
    let s = Stack::start().await;
    for path in ["/v2/sandboxes", "/sandboxes"] {
        let r = s
            .req(Method::POST, path)
            .json(&json!({"templateID": "base"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let t = server_timing(&r);
        let names: Vec<&str> = t.iter().map(|(n, _)| n.as_str()).collect();
        // The control plane's steps around the agent's own (what the agent cannot name as a
        // metric is left out).
        assert_eq!(
            names,
            [
                "placement",
                "slot",
                "restore",
                "envd",
                "init",
                "agent",
                "store",
                "total"
            ],
            "{path}"
        );
        assert_eq!(t[2].1, 21.5);
        assert_eq!(t[3].1, 310.3);
        assert!(t.iter().all(|(_, ms)| *ms >= 0.0));
        let own: f64 = [0, 5, 6].iter().map(|i| t[*i].1).sum();
        // Rounded to 0.1 ms each.
        assert!(t[7].1 + 0.15 >= own, "total {} < its steps {own}", t[7].1);
    }
    // A retry answered with an earlier create's sandbox did none of the steps.
    let keyed = || {
        s.req(Method::POST, "/v2/sandboxes")
            .header("idempotency-key", "timing-key")
            .json(&json!({"templateID": "base"}))
    };
    let first = keyed().send().await.unwrap();
    assert_eq!(server_timing(&first).len(), 8);
    let again = keyed().send().await.unwrap();
    assert_eq!(again.status(), 201);
    let names: Vec<String> = server_timing(&again).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["total"]);
    // Errors carry none.
    let r = s
        .req(Method::POST, "/v2/sandboxes")
        .json(&json!({"templateID": "no-such-template"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.headers().get("server-timing").is_none());
    s.server.stop().await;
}

#[tokio::test]
async fn bad_input_gets_the_right_code_and_changes_nothing() {
    let s = Stack::start().await;
    let keep = s.create(json!({"templateID": "base"})).await;
    let keep_id = keep["sandboxID"].as_str().unwrap().to_owned();
    let calls_before = s.server.agent.calls().len();
    let list_before = json(s.req(Method::GET, "/v2/sandboxes")).await.1;

    let raw = |body: &'static str| {
        s.req(Method::POST, "/v2/sandboxes")
            .header("content-type", "application/json")
            .body(body)
    };
    let cases: Vec<(reqwest::RequestBuilder, u16)> = vec![
        (raw(r#"{"templateID": "nope"}"#), 404),
        (raw(r#"{"templateID": "base", "timeout": -1}"#), 400),
        (raw(r#"{"templateID": "base", "timeout": 99999999}"#), 400),
        (raw(r#"{"templateID": "base""#), 400),
        (raw(r#"{"timeout": 10}"#), 400),
        (raw(r#"{"templateID": "bad id"}"#), 400),
        (raw(""), 400),
        (raw(r#"{"templateID": "base", "metadata": {"n": 1}}"#), 400),
        (
            s.http
                .post(format!("{}/v2/sandboxes", s.server.url))
                .json(&json!({"templateID": "base"})),
            401,
        ),
        (
            s.http
                .post(format!("{}/v2/sandboxes", s.server.url))
                .header("x-api-key", "e2b_wrong")
                .json(&json!({"templateID": "base"})),
            401,
        ),
        (
            s.req(Method::POST, &format!("/sandboxes/{keep_id}/timeout"))
                .json(&json!({"timeout": -5})),
            400,
        ),
        (
            s.req(Method::POST, &format!("/sandboxes/{keep_id}/timeout"))
                .json(&json!({})),
            400,
        ),
        (
            s.req(Method::POST, &format!("/sandboxes/{keep_id}/timeout"))
                .body("not json"),
            400,
        ),
        (
            s.req(Method::POST, &format!("/sandboxes/{keep_id}/refreshes"))
                .json(&json!({"duration": 4000})),
            400,
        ),
        (
            s.req(Method::POST, "/sandboxes/unknown0sandbox/timeout")
                .json(&json!({"timeout": 5})),
            404,
        ),
        (s.req(Method::DELETE, "/sandboxes/unknown0sandbox"), 404),
        (s.req(Method::DELETE, "/sandboxes/BAD!ID"), 404),
        (s.req(Method::GET, "/v2/sandboxes?state=dead"), 400),
        (s.req(Method::GET, "/v2/sandboxes?limit=0"), 400),
        (s.req(Method::GET, "/v2/sandboxes?nextToken=%%%"), 400),
        (
            s.req(Method::GET, "/v2/sandboxes?startedAfter=yesterday"),
            400,
        ),
        (s.req(Method::GET, "/no/such/route"), 404),
        (
            s.http
                .post(format!("{}/admin/teams", s.server.url))
                .json(&json!({"name": "x"})),
            401,
        ),
        (
            s.http
                .post(format!("{}/admin/teams", s.server.url))
                .header("x-admin-token", "wrong")
                .json(&json!({"name": "x"})),
            401,
        ),
        (
            s.http
                .post(format!("{}/admin/teams", s.server.url))
                .header("x-admin-token", ADMIN)
                .json(&json!({"nom": "x"})),
            400,
        ),
    ];
    for (i, (req, want)) in cases.into_iter().enumerate() {
        let (st, body) = json(req).await;
        assert_eq!(st, want, "case {i}: {body}");
    }
    // Another team cannot see or touch the sandbox.
    let admin = |p: String| {
        s.http
            .post(format!("{}{p}", s.server.url))
            .header("x-admin-token", ADMIN)
    };
    let other: serde_json::Value = admin("/admin/teams".into())
        .json(&json!({"name": "o"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let other_key: serde_json::Value = admin(format!(
        "/admin/teams/{}/api-keys",
        other["teamID"].as_str().unwrap()
    ))
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let other_key = other_key["key"].as_str().unwrap();
    let r = s
        .http
        .delete(format!("{}/sandboxes/{keep_id}", s.server.url))
        .header("x-api-key", other_key);
    assert_eq!(json(r).await.0, 404);
    let r = s
        .http
        .get(format!("{}/v2/sandboxes", s.server.url))
        .header("x-api-key", other_key);
    assert_eq!(json(r).await.1, json!([]));

    // `Template.exists`: a public template is found by every team, a team's own only by it
    // (another team is told it exists but is not theirs: 403), an unknown one by nobody.
    s.server
        .cp
        .register_template(&small_template(
            "private-one",
            Some(wrenn_core::TeamId::parse(other["teamID"].as_str().unwrap()).unwrap()),
        ))
        .await
        .unwrap();
    let alias = |name: &str, key: Option<&str>| {
        let r = s
            .http
            .get(format!("{}/templates/aliases/{name}", s.server.url));
        match key {
            Some(k) => r.header("x-api-key", k.to_owned()),
            None => s.req(Method::GET, &format!("/templates/aliases/{name}")),
        }
    };
    assert_eq!(
        json(alias("base", None)).await,
        (200, json!({"templateID": "base", "public": true}))
    );
    assert_eq!(json(alias("base", Some(other_key))).await.0, 200);
    assert_eq!(
        json(alias("private-one", Some(other_key))).await,
        (200, json!({"templateID": "private-one", "public": false}))
    );
    let (st, body) = json(alias("private-one", None)).await;
    assert_eq!((st, body["code"].clone()), (403, json!(403)), "{body}");
    let (st, body) = json(alias("no-such-template", None)).await;
    assert_eq!((st, body["code"].clone()), (404, json!(404)), "{body}");

    assert_eq!(
        s.server.agent.calls().len(),
        calls_before,
        "{:?}",
        s.server.agent.calls()
    );
    assert_eq!(
        json(s.req(Method::GET, "/v2/sandboxes")).await.1,
        list_before
    );
    assert_eq!(s.server.agent.state(&keep_id), Some(AgentState::Running));

    // A failed create on the agent leaves no record.
    s.server
        .cp
        .register_template(&small_template("broken", None))
        .await
        .unwrap();
    let (st, _) = json(
        s.req(Method::POST, "/v2/sandboxes")
            .json(&json!({"templateID": "broken"})),
    )
    .await;
    assert_eq!(st, 500);
    assert_eq!(
        json(s.req(Method::GET, "/v2/sandboxes")).await.1,
        list_before
    );
    s.server.stop().await;
}

#[tokio::test]
async fn list_filters_and_pagination() {
    let s = Stack::start().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let env = if i % 2 == 0 { "prod" } else { "dev" };
        let b = s
            .create(json!({"templateID": "base", "metadata": {"env": env, "n": i.to_string()}}))
            .await;
        ids.push(b["sandboxID"].as_str().unwrap().to_owned());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.req(Method::POST, &format!("/sandboxes/{}/pause", ids[0]))
        .send()
        .await
        .unwrap();

    // Pages of two via x-next-token, newest first, all states.
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut path = "/v2/sandboxes?limit=2".to_owned();
        if let Some(t) = &token {
            path.push_str(&format!("&nextToken={t}"));
        }
        let r = s.req(Method::GET, &path).send().await.unwrap();
        token = r
            .headers()
            .get("x-next-token")
            .map(|v| v.to_str().unwrap().to_owned());
        let page: Vec<serde_json::Value> = r.json().await.unwrap();
        assert!(page.len() <= 2);
        seen.extend(
            page.iter()
                .map(|p| p["sandboxID"].as_str().unwrap().to_owned()),
        );
        if token.is_none() {
            break;
        }
    }
    let mut want = ids.clone();
    want.reverse();
    assert_eq!(seen, want);

    // metadata is a urlencoded `k=v&k2=v2` string, itself urlencoded in the query.
    let q = |meta: &str| format!("/v2/sandboxes?metadata={}", urlencode(meta));
    let (_, page) = json(s.req(Method::GET, &q("env=prod"))).await;
    assert_eq!(page.as_array().unwrap().len(), 3);
    let (_, page) = json(s.req(Method::GET, &q("env=prod&n=2"))).await;
    assert_eq!(page.as_array().unwrap().len(), 1);
    assert_eq!(page[0]["sandboxID"], ids[2].as_str());
    let (_, page) = json(s.req(Method::GET, "/v2/sandboxes?state=paused")).await;
    assert_eq!(page.as_array().unwrap().len(), 1);
    assert_eq!(page[0]["state"], "paused");
    let (_, page) = json(s.req(
        Method::GET,
        "/v2/sandboxes?state=running,paused&order=asc&limit=1",
    ))
    .await;
    assert_eq!(page[0]["sandboxID"], ids[0].as_str());
    let (_, page) = json(s.req(
        Method::GET,
        "/v2/sandboxes?template=base&startedAfter=2000-01-01T00:00:00%2B00:00",
    ))
    .await;
    assert_eq!(page.as_array().unwrap().len(), 5);
    // v1: running only.
    let (_, page) = json(s.req(
        Method::GET,
        &format!("/sandboxes?metadata={}", urlencode("env=prod")),
    ))
    .await;
    assert_eq!(page.as_array().unwrap().len(), 2);
    s.server.stop().await;
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test]
async fn reaper_kills_or_pauses_expired_sandboxes() {
    let s = Stack::start().await;
    let kill = s.create(json!({"templateID": "base", "timeout": 1})).await["sandboxID"]
        .as_str()
        .unwrap()
        .to_owned();
    let pause = s
        .create(json!({"templateID": "base", "timeout": 1, "autoPause": true}))
        .await["sandboxID"]
        .as_str()
        .unwrap()
        .to_owned();
    let keep = s.create(json!({"templateID": "base", "timeout": 60})).await["sandboxID"]
        .as_str()
        .unwrap()
        .to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let k = json(s.req(Method::GET, &format!("/sandboxes/{kill}")))
            .await
            .0;
        let p = json(s.req(Method::GET, &format!("/sandboxes/{pause}")))
            .await
            .1["state"]
            .clone();
        if k == 404 && p == "paused" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "reaper did not act: {k} {p}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s.server.agent.state(&kill), None);
    assert_eq!(s.server.agent.state(&pause), Some(AgentState::Paused));
    assert_eq!(s.server.agent.state(&keep), Some(AgentState::Running));
    // The auto-paused sandbox resumes through connect.
    assert_eq!(
        json(
            s.req(Method::POST, &format!("/v2/sandboxes/{pause}/connect"))
                .json(&json!({"timeout": 60}))
        )
        .await
        .0,
        201
    );
    s.server.stop().await;
}

#[tokio::test]
async fn restart_keeps_records_and_paused_sandboxes_resume() {
    let s = Stack::start().await;
    let run = s
        .create(json!({"templateID": "base", "metadata": {"a": "b"}}))
        .await["sandboxID"]
        .as_str()
        .unwrap()
        .to_owned();
    let paused = s.create(json!({"templateID": "base"})).await["sandboxID"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        s.req(Method::POST, &format!("/sandboxes/{paused}/pause"))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    let Stack {
        server,
        key,
        http,
        dir,
        ..
    } = s;
    let (db, agent) = (server.db.clone(), server.agent.clone());
    server.stop().await;

    let server = Server::start(&db, agent).await;
    let s = Stack {
        server,
        key,
        team: String::new(),
        http,
        dir,
        pg: None,
    };
    let (st, info) = json(s.req(Method::GET, &format!("/sandboxes/{run}"))).await;
    assert_eq!((st, info["metadata"]["a"].as_str()), (200, Some("b")));
    assert_eq!(
        json(s.req(Method::GET, &format!("/sandboxes/{paused}")))
            .await
            .1["state"],
        "paused"
    );
    let (st, body) = json(
        s.req(Method::POST, &format!("/v2/sandboxes/{paused}/connect"))
            .json(&json!({})),
    )
    .await;
    assert_eq!(st, 201);
    assert_eq!(
        body["envdAccessToken"],
        wrenn_server::tokens::envd_access_token(SECRET, &paused)
    );
    s.server.stop().await;
}

#[tokio::test]
async fn edge_proxy_routes_per_request() {
    let s = Stack::start().await;
    let a = s.create(json!({"templateID": "base"})).await["sandboxID"]
        .as_str()
        .unwrap()
        .to_owned();
    let b = s.create(json!({"templateID": "base"})).await["sandboxID"]
        .as_str()
        .unwrap()
        .to_owned();
    // One client, one pooled connection, two sandboxes: each request is routed on its own.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    for (id, port) in [(&a, "49983"), (&b, "49999"), (&a, "49983")] {
        let r = client
            .post(format!("{}/process.Process/Start?x=1", s.server.url))
            .header("E2b-Sandbox-Id", id.as_str())
            .header("E2b-Sandbox-Port", port)
            .header("X-Access-Token", "tok")
            .body("payload")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["sandboxId"], id.as_str());
        assert_eq!(v["port"], port);
        assert_eq!(v["uri"], "/process.Process/Start?x=1");
        assert_eq!(v["body"], "payload");
        assert_eq!(v["token"], "tok");
    }
    // The agent gets the host's secret in Proxy-Authorization, in place of any the client
    // sent; the agent RPC client was made with the same secret.
    let agent_secret = wrenn_server::tokens::agent_secret(SECRET, "h1");
    let v: serde_json::Value = client
        .get(format!("{}/health", s.server.url))
        .header("e2b-sandbox-id", a.as_str())
        .header("proxy-authorization", "Bearer forged")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["agentAuth"], format!("Bearer {agent_secret}"));
    assert!(
        s.server
            .agent
            .secrets
            .lock()
            .unwrap()
            .iter()
            .all(|x| *x == agent_secret),
        "agent clients made with another secret"
    );
    let r = s
        .http
        .get(format!("{}/admin/hosts/h1/secret", s.server.url))
        .header("x-admin-token", ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap(),
        json!({"hostID": "h1", "secret": agent_secret})
    );
    let r = s
        .http
        .get(format!("{}/admin/hosts/h1/secret", s.server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // /health with the header goes to the sandbox, without it to the API.
    let v: serde_json::Value = client
        .get(format!("{}/health", s.server.url))
        .header("e2b-sandbox-id", a.as_str())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["sandboxId"], a.as_str());
    assert_eq!(
        client
            .get(format!("{}/health", s.server.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // Host-name routing: <port>-<id>.<domain>.
    let v: serde_json::Value = client
        .get(format!("{}/hello", s.server.url))
        .header("host", format!("8080-{b}.{DOMAIN}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (v["sandboxId"].as_str(), v["port"].as_str()),
        (Some(b.as_str()), Some("8080"))
    );
    // A host name with a port, as `<port>-<id>.localhost:<api port>` has.
    let v: serde_json::Value = client
        .get(format!("{}/hello", s.server.url))
        .header("host", format!("8080-{b}.{DOMAIN}:3000"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["sandboxId"], b.as_str());

    // Signed URLs find their sandbox by the signature.
    let token_b = wrenn_server::tokens::envd_access_token(SECRET, &b);
    let sig = wrenn_server::tokens::file_signature("/home/user/f.txt", "read", "", &token_b, None);
    let v: serde_json::Value = client
        .get(format!(
            "{}/files?path=%2Fhome%2Fuser%2Ff.txt&signature={}",
            s.server.url,
            urlencode(&sig)
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["sandboxId"], b.as_str());
    // A signed URL that names a sandbox goes to that one, whoever's token signed it (that
    // envd then refuses a foreign signature): B's signature named for A reaches A.
    for (name, value) in [
        ("e2b-sandbox-id", a.clone()),
        ("host", format!("49983-{a}.{DOMAIN}")),
    ] {
        let v: serde_json::Value = client
            .get(format!(
                "{}/files?path=%2Fhome%2Fuser%2Ff.txt&signature={}",
                s.server.url,
                urlencode(&sig)
            ))
            .header(name, value)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["sandboxId"], a.as_str(), "named by {name}");
    }
    let sig_w =
        wrenn_server::tokens::file_signature("/a", "write", "root", &token_b, Some(4_000_000_000));
    let r = client
        .post(format!(
            "{}/files?path=%2Fa&username=root&signature={sig_w}&signature_expiration=4000000000",
            s.server.url
        ))
        .body("data")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["sandboxId"],
        b.as_str()
    );
    // A read signature does not authorize a write; an expired signature still routes to its
    // sandbox, whose envd refuses it with 401 "expired" (more useful than "not found").
    let r = client
        .post(format!(
            "{}/files?path=%2Fhome%2Fuser%2Ff.txt&signature={sig}",
            s.server.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap(),
        json!({"code": 401, "message": "Invalid signature"})
    );
    let old = wrenn_server::tokens::file_signature("/a", "read", "", &token_b, Some(1));
    let r = client
        .get(format!(
            "{}/files?path=%2Fa&signature={old}&signature_expiration=1",
            s.server.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["sandboxId"],
        b.as_str()
    );

    // Unknown and paused sandboxes: 502 "was not found".
    s.req(Method::POST, &format!("/sandboxes/{b}/pause"))
        .send()
        .await
        .unwrap();
    for id in ["nosuchsandbox", b.as_str()] {
        let r = client
            .get(format!("{}/files?path=x", s.server.url))
            .header("e2b-sandbox-id", id)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 502);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(
            v,
            json!({"code": 502, "message": format!("The sandbox {id} was not found"), "sandboxId": id})
        );
    }

    // Upgrades (WebSocket) are spliced through to the agent's proxy.
    let addr = s.server.url.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nE2b-Sandbox-Id: {a}\r\nE2b-Sandbox-Port: 8080\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tcp.write_all(b"ping over the upgraded stream")
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 29 {
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(&got, b"ping over the upgraded stream");
    s.server.stop().await;
}

#[tokio::test]
async fn private_ports_answer_only_with_the_traffic_token() {
    let s = Stack::start().await;
    let made = s
        .create(json!({"templateID": "base", "network": {"allowPublicTraffic": false}}))
        .await;
    let id = made["sandboxID"].as_str().unwrap().to_owned();
    let token = wrenn_server::tokens::traffic_access_token(SECRET, &id);
    assert_eq!(made["trafficAccessToken"], token.as_str());
    assert_ne!(made["trafficAccessToken"], made["envdAccessToken"]);
    let r = s
        .req(Method::POST, &format!("/v2/sandboxes/{id}/connect"))
        .json(&json!({"timeout": 60}))
        .send()
        .await
        .unwrap();
    let connected: serde_json::Value = r.json().await.unwrap();
    assert_eq!(connected["trafficAccessToken"], token.as_str());
    let public = s
        .create(json!({"templateID": "base", "network": {"allowPublicTraffic": true}}))
        .await;
    let public_id = public["sandboxID"].as_str().unwrap().to_owned();
    assert!(public.get("trafficAccessToken").is_none(), "{public}");
    let plain = s.create(json!({"templateID": "base"})).await;
    assert!(plain.get("trafficAccessToken").is_none(), "{plain}");

    let client = reqwest::Client::new();
    let get = |sandbox: &str, port: &str, tok: Option<&str>, by_host: bool| {
        let mut r = client.get(format!("{}/page", s.server.url));
        r = if by_host {
            r.header("host", format!("{port}-{sandbox}.{DOMAIN}"))
        } else {
            r.header("e2b-sandbox-id", sandbox)
                .header("e2b-sandbox-port", port)
        };
        if let Some(t) = tok {
            r = r.header("e2b-traffic-access-token", t);
        }
        r.send()
    };
    for by_host in [false, true] {
        for tok in [None, Some("wrong"), Some(public_id.as_str())] {
            let r = get(&id, "8080", tok, by_host).await.unwrap();
            assert_eq!(r.status(), 403, "token {tok:?}");
            let v: serde_json::Value = r.json().await.unwrap();
            assert_eq!(v["code"], 403);
            assert!(
                v["message"]
                    .as_str()
                    .unwrap()
                    .contains("traffic access token"),
                "{v}"
            );
        }
        let r = get(&id, "8080", Some(&token), by_host).await.unwrap();
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(
            (v["sandboxId"].as_str(), v["port"].as_str()),
            (Some(id.as_str()), Some("8080"))
        );
        // The token is the edge's business; the sandbox's server never sees it.
        assert_eq!(v["trafficToken"], "");
    }
    // envd's port is guarded by envd's own token, which the SDKs send there; public ports
    // need nothing.
    assert_eq!(get(&id, "49983", None, false).await.unwrap().status(), 200);
    assert_eq!(
        get(&public_id, "8080", None, false).await.unwrap().status(),
        200
    );
    s.server.stop().await;
}
