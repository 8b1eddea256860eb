//! One template with its builds (`GET /templates/{id}`) and sharing it with every team
//! (`PATCH /templates/{id}`, `PATCH /v2/templates/{id}`), over real HTTP with the test-double
//! agent (see `support`): the shape the SDKs' generated client parses (checked by that client
//! itself when the workspace's Python has `e2b`), builds newest first and paged, what other
//! teams see, and what a team may not change. Each test runs on a SQLite file and, when
//! `WRENN_TEST_POSTGRES_URL` is set, again on a fresh PostgreSQL database.

mod support;

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use support::*;
use wrenn_agent_proto::v1::{
    BuildDone, BuildFailed, BuildTemplateEvent, build_template_event::Event,
};

on_both_databases!(
    a_template_shows_every_build_newest_first,
    sharing_makes_a_template_every_teams_and_back,
    built_in_and_other_teams_templates_are_not_changed,
    a_template_is_not_made_public_over_another_teams_snapshot,
);

/// The keys `TemplateWithBuilds` requires.
const TEMPLATE_KEYS: [&str; 16] = [
    "templateID",
    "buildID",
    "cpuCount",
    "memoryMB",
    "diskSizeMB",
    "public",
    "aliases",
    "names",
    "createdAt",
    "updatedAt",
    "createdBy",
    "lastSpawnedAt",
    "spawnCount",
    "buildCount",
    "envdVersion",
    "buildStatus",
];

/// The keys of a `TemplateBuild` (`finishedAt` only once finished).
const BUILD_KEYS: [&str; 8] = [
    "buildID",
    "status",
    "createdAt",
    "updatedAt",
    "cpuCount",
    "memoryMB",
    "diskSizeMB",
    "envdVersion",
];

fn done() -> BuildTemplateEvent {
    BuildTemplateEvent {
        event: Some(Event::Done(BuildDone {
            envd_version: "0.6.4".into(),
            vcpus: 2,
            memory_mb: 768,
            disk_size_mb: 2048,
        })),
    }
}

fn failed() -> BuildTemplateEvent {
    BuildTemplateEvent {
        event: Some(Event::Failed(BuildFailed {
            message: "step 1 failed".into(),
            step: 1,
        })),
    }
}

/// Requests a build of `name` (its template's and its own ID); started with `events` when
/// given, else left `waiting`. Builds are a few milliseconds apart, so their order is by time.
async fn build(s: &Stack, name: &str, events: Option<Vec<BuildTemplateEvent>>) -> (String, String) {
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (st, req) = json(
        s.req(Method::POST, "/v3/templates")
            .json(&json!({"name": name})),
    )
    .await;
    assert_eq!(st, 202, "{req}");
    let tid = req["templateID"].as_str().unwrap().to_owned();
    let bid = req["buildID"].as_str().unwrap().to_owned();
    let Some(events) = events else {
        return (tid, bid);
    };
    *s.server.agent.build_events.lock().unwrap() = Some(events);
    let start = json!({"fromTemplate": "base", "steps": [{"type": "RUN", "args": ["true"]}]});
    let r = s
        .req(Method::POST, &format!("/v2/templates/{tid}/builds/{bid}"))
        .json(&start)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    for _ in 0..200 {
        let (_, v) = json(s.req(
            Method::GET,
            &format!("/templates/{tid}/builds/{bid}/status"),
        ))
        .await;
        if v["status"] == "ready" || v["status"] == "error" {
            return (tid, bid);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("build {bid} did not finish");
}

/// A ready template `name`: its ID and its build's, which its host now holds.
async fn ready(s: &Stack, name: &str) -> (String, String) {
    let (tid, bid) = build(s, name, Some(vec![done()])).await;
    s.server.agent.built.lock().unwrap().push(bid.clone());
    (tid, bid)
}

/// `GET /templates/{id}` with `key`: status, body and `x-next-token`.
async fn get(s: &Stack, key: &str, path: &str) -> (u16, Value, Option<String>) {
    let r = s
        .http
        .get(format!("{}/templates/{path}", s.server.url))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap();
    let next = r
        .headers()
        .get("x-next-token")
        .map(|v| v.to_str().unwrap().to_owned());
    let st = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    if st >= 400 {
        assert_eq!(v["code"], st, "error body {v}");
    }
    (st, v, next)
}

/// `PATCH` of `path` with `key`: status and body text.
async fn patch(s: &Stack, key: &str, path: &str, body: Value) -> (u16, String) {
    let r = s
        .http
        .patch(format!("{}{path}", s.server.url))
        .header("x-api-key", key)
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The team's listed template `id`, if listed.
async fn listed(s: &Stack, key: &str, id: &str) -> Option<Value> {
    let r = s
        .http
        .get(format!("{}/templates", s.server.url))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let all: Vec<Value> = r.json().await.unwrap();
    all.into_iter().find(|t| t["templateID"] == id)
}

/// Parses `v` with the official Python SDK's generated model `class` (module `module`), when
/// the workspace's Python has `e2b` (always under CI): the contract itself, not our reading
/// of it.
fn sdk_parses(module: &str, class: &str, v: &Value) {
    let python = std::env::var("WRENN_TEST_PYTHON")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../.venv/bin/python").into());
    let code = format!(
        "import json, sys\nfrom e2b.api.client.models.{module} import {class}\n\
         {class}.from_dict(json.loads(sys.argv[1]))"
    );
    match std::process::Command::new(&python)
        .args(["-c", &code, &v.to_string()])
        .output()
    {
        Ok(o) if o.status.success() => {}
        Ok(o) if !String::from_utf8_lossy(&o.stderr).contains("No module named 'e2b'") => {
            panic!(
                "the SDK's {class} does not parse {v}: {}",
                String::from_utf8_lossy(&o.stderr)
            )
        }
        // CI always has the SDK (scripts/test.sh installs it first): there, missing is a failure.
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{python} has no e2b package under CI"
            );
            eprintln!("{python} has no e2b package: SDK parse not checked");
        }
    }
}

async fn a_template_shows_every_build_newest_first(db: Db) {
    let s = Stack::with(db, FakeAgent::default(), |_| {}).await;
    let (tid, b1) = ready(&s, "app").await;
    let (_, b2) = build(&s, "app", Some(vec![failed()])).await;
    let (_, b3) = build(&s, "app", None).await;

    // By name and by ID alike: every required key, the current (ready) version's resources.
    let (st, by_id, next) = get(&s, &s.key, &tid).await;
    assert_eq!((st, next), (200, None), "{by_id}");
    let (_, t, _) = get(&s, &s.key, "app").await;
    assert_eq!(t, by_id);
    for k in TEMPLATE_KEYS {
        assert!(t.get(k).is_some(), "no {k} in {t}");
    }
    assert_eq!(
        (&t["templateID"], &t["buildID"], &t["public"], &t["names"]),
        (&json!(tid), &json!(b1), &json!(false), &json!(["app"]))
    );
    assert_eq!((&t["cpuCount"], &t["memoryMB"]), (&json!(2), &json!(768)));
    assert_eq!(
        (&t["buildCount"], &t["buildStatus"]),
        (&json!(3), &json!("waiting"))
    );
    let builds = t["builds"].as_array().unwrap();
    let ids: Vec<&str> = builds
        .iter()
        .map(|b| b["buildID"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [b3.as_str(), b2.as_str(), b1.as_str()]);
    let statuses: Vec<&str> = builds
        .iter()
        .map(|b| b["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["waiting", "error", "ready"]);
    for b in builds {
        for k in BUILD_KEYS {
            assert!(b.get(k).is_some(), "no {k} in {b}");
        }
        // Finished builds say when; a waiting one has none (not a null the SDKs cannot parse).
        assert_eq!(
            b.get("finishedAt").is_some(),
            b["status"] != "waiting",
            "{b}"
        );
    }
    assert_eq!(
        (&builds[2]["memoryMB"], &builds[2]["envdVersion"]),
        (&json!(768), &json!("0.6.4"))
    );
    sdk_parses("template_with_builds", "TemplateWithBuilds", &t);

    // Paged: two, then the last one with no further token.
    let (st, page, next) = get(&s, &s.key, "app?limit=2").await;
    assert_eq!(st, 200, "{page}");
    assert_eq!(page["builds"].as_array().unwrap().len(), 2);
    let next = next.expect("a next page");
    let (_, page, last) = get(&s, &s.key, &format!("app?limit=2&nextToken={next}")).await;
    assert_eq!(
        (page["builds"][0]["buildID"].as_str(), last),
        (Some(b1.as_str()), None)
    );
    for bad in ["app?limit=0", "app?limit=101", "app?nextToken=%21%21"] {
        assert_eq!(get(&s, &s.key, bad).await.0, 400, "{bad}");
    }

    // A built-in template: public, one version of its host's, no builds here.
    let (st, base, _) = get(&s, &s.key, "base").await;
    assert_eq!(st, 200, "{base}");
    assert_eq!(
        (&base["public"], &base["buildCount"], &base["builds"]),
        (&json!(true), &json!(1), &json!([]))
    );
    sdk_parses("template_with_builds", "TemplateWithBuilds", &base);

    // Unknown, and another team's private template: both 404.
    assert_eq!(get(&s, &s.key, "nope").await.0, 404);
    let (_, other_key) = s.other_team().await;
    for id in ["app", tid.as_str()] {
        assert_eq!(get(&s, &other_key, id).await.0, 404, "{id}");
    }
    assert!(listed(&s, &other_key, &tid).await.is_none());
    s.stop().await;
}

async fn sharing_makes_a_template_every_teams_and_back(db: Db) {
    let s = Stack::with(db, FakeAgent::default(), |_| {}).await;
    let (tid, _) = ready(&s, "shared").await;
    let (_, other_key) = s.other_team().await;
    let other_create = |template: &str| {
        s.http
            .post(format!("{}/v2/sandboxes", s.server.url))
            .header("x-api-key", &other_key)
            .json(&json!({"templateID": template}))
    };
    assert_eq!(json(other_create("shared")).await.0, 404);

    // Made public (v2: the names): every team sees and uses it, without its usage.
    let (st, body) = patch(&s, &s.key, "/v2/templates/shared", json!({"public": true})).await;
    assert_eq!(st, 200, "{body}");
    let names: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(names, json!({"names": ["shared"]}));
    sdk_parses("template_update_response", "TemplateUpdateResponse", &names);
    let (_, own, _) = get(&s, &s.key, "shared").await;
    assert_eq!(own["public"], true);
    assert_eq!(listed(&s, &s.key, &tid).await.unwrap()["public"], true);
    let (st, theirs, _) = get(&s, &other_key, "shared").await;
    assert_eq!(st, 200, "{theirs}");
    assert_eq!(
        (&theirs["public"], &theirs["buildCount"], &theirs["builds"]),
        (&json!(true), &json!(0), &json!([]))
    );
    assert_eq!(theirs["buildID"], own["buildID"]);
    assert_eq!(listed(&s, &other_key, &tid).await.unwrap()["public"], true);
    let (st, sbx) = json(other_create("shared")).await;
    assert_eq!(st, 201, "{sbx}");
    assert_eq!(sbx["templateID"], tid.as_str());

    // Private again (v1: 200, no body): unknown to the other team once more.
    let (st, body) = patch(
        &s,
        &s.key,
        &format!("/templates/{tid}"),
        json!({"public": false}),
    )
    .await;
    assert_eq!((st, body.as_str()), (200, ""));
    assert_eq!(get(&s, &s.key, "shared").await.1["public"], false);
    assert_eq!(listed(&s, &s.key, &tid).await.unwrap()["public"], false);
    assert_eq!(get(&s, &other_key, "shared").await.0, 404);
    assert!(listed(&s, &other_key, &tid).await.is_none());
    assert_eq!(json(other_create("shared")).await.0, 404);

    // Nothing asked, nothing changed.
    let (st, body) = patch(&s, &s.key, "/v2/templates/shared", json!({})).await;
    assert_eq!((st, body.as_str()), (200, r#"{"names":["shared"]}"#));
    assert_eq!(get(&s, &s.key, "shared").await.1["public"], false);
    s.stop().await;
}

async fn built_in_and_other_teams_templates_are_not_changed(db: Db) {
    let s = Stack::with(db, FakeAgent::default(), |_| {}).await;
    let (tid, _) = ready(&s, "mine").await;
    let (_, other_key) = s.other_team().await;
    for path in ["/templates/base", "/v2/templates/base"] {
        let (st, body) = patch(&s, &s.key, path, json!({"public": false})).await;
        assert_eq!(st, 403, "{path}: {body}");
    }
    assert_eq!(get(&s, &s.key, "base").await.1["public"], true);
    // Another team's private template is unknown to it; its public one is not its to change.
    for path in [
        "/templates/mine",
        "/v2/templates/mine",
        "/v2/templates/nope",
    ] {
        let (st, body) = patch(&s, &other_key, path, json!({"public": true})).await;
        assert_eq!(st, 404, "{path}: {body}");
    }
    let (st, _) = patch(&s, &s.key, "/v2/templates/mine", json!({"public": true})).await;
    assert_eq!(st, 200);
    let (st, body) = patch(
        &s,
        &other_key,
        &format!("/templates/{tid}"),
        json!({"public": false}),
    )
    .await;
    assert_eq!(st, 403, "{body}");
    assert_eq!(get(&s, &s.key, "mine").await.1["public"], true);
    // A malformed body is the E2B 400.
    let (st, body) = patch(&s, &s.key, "/v2/templates/mine", json!({"public": "yes"})).await;
    assert_eq!(st, 400, "{body}");
    s.stop().await;
}

async fn a_template_is_not_made_public_over_another_teams_snapshot(db: Db) {
    let s = Stack::with(db, FakeAgent::default(), |_| {}).await;
    let (tid, _) = ready(&s, "golden").await;
    // The other team's snapshot called `golden`, which its creates name bare.
    let (_, other_key) = s.other_team().await;
    let as_other = |m: Method, p: &str| {
        s.http
            .request(m, format!("{}{p}", s.server.url))
            .header("x-api-key", &other_key)
    };
    let (st, sbx) =
        json(as_other(Method::POST, "/v2/sandboxes").json(&json!({"templateID": "base"}))).await;
    assert_eq!(st, 201, "{sbx}");
    let id = sbx["sandboxID"].as_str().unwrap();
    let (st, snap) = json(
        as_other(Method::POST, &format!("/sandboxes/{id}/snapshots"))
            .json(&json!({"name": "golden"})),
    )
    .await;
    assert_eq!(st, 201, "{snap}");

    // Public, it would take the snapshot's place for that team: refused, nothing changed.
    let (st, body) = patch(&s, &s.key, "/v2/templates/golden", json!({"public": true})).await;
    assert_eq!(st, 409, "{body}");
    assert_eq!(get(&s, &s.key, "golden").await.1["public"], false);
    let (st, from) =
        json(as_other(Method::POST, "/v2/sandboxes").json(&json!({"templateID": "golden"}))).await;
    assert_eq!(st, 201, "{from}");
    assert_ne!(from["templateID"], tid.as_str());

    // Once the snapshot is gone, the name means one thing again.
    let r = as_other(Method::DELETE, "/templates/golden")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let (st, body) = patch(&s, &s.key, "/v2/templates/golden", json!({"public": true})).await;
    assert_eq!(st, 200, "{body}");
    let (_, theirs, _) = get(&s, &other_key, "golden").await;
    assert_eq!(theirs["templateID"], tid.as_str());
    s.stop().await;
}
