//! Template builds in the control plane against a test-double agent (ring 2): what a build's
//! events become (log, status, reason, the template's version), that a create from a built
//! template goes to its host under the build's ID, the release of versions nothing names, and
//! the failing of builds whose heartbeat stopped. The whole path with real guests and the SDKs
//! is `tests/e2e/test_templates.py`.

mod support;

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use support::*;
use wrenn_agent_proto::v1::{
    BuildDone, BuildFailed, BuildLog, BuildTemplateEvent, build_template_event::Event,
};
use wrenn_core::{TeamId, UnixMillis};
use wrenn_server::store::BuildRecord;

fn ev(e: Event) -> BuildTemplateEvent {
    BuildTemplateEvent { event: Some(e) }
}

fn log(step: u32, message: &str) -> BuildTemplateEvent {
    ev(Event::Log(BuildLog {
        timestamp_unix_ms: 1_700_000_000_000,
        level: "info".into(),
        message: message.into(),
        step,
    }))
}

/// Requests and starts a build of `name` with one RUN step; its IDs.
async fn build(s: &Stack, name: &str, events: Vec<BuildTemplateEvent>) -> (String, String) {
    *s.server.agent.build_events.lock().unwrap() = Some(events);
    let (st, req) = json(
        s.req(Method::POST, "/v3/templates")
            .json(&json!({"name": name})),
    )
    .await;
    assert_eq!(st, 202, "{req}");
    let (tid, bid) = (
        req["templateID"].as_str().unwrap().to_owned(),
        req["buildID"].as_str().unwrap().to_owned(),
    );
    assert_eq!(req["names"], json!([name]));
    assert_eq!(req["tags"], json!(["default"]));
    let start = json!({"fromTemplate": "base", "steps": [{"type": "RUN", "args": ["echo hi"]}]});
    let r = s
        .req(Method::POST, &format!("/v2/templates/{tid}/builds/{bid}"))
        .json(&start)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    (tid, bid)
}

async fn finished(s: &Stack, tid: &str, bid: &str) -> Value {
    for _ in 0..200 {
        let (st, v) = json(s.req(
            Method::GET,
            &format!("/templates/{tid}/builds/{bid}/status?logsOffset=0"),
        ))
        .await;
        assert_eq!(st, 200, "{v}");
        if v["status"] == "ready" || v["status"] == "error" {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("build {bid} did not finish");
}

#[tokio::test]
async fn a_failed_build_makes_no_version_and_says_which_step() {
    let s = Stack::start().await;
    let (tid, bid) = build(
        &s,
        "broken",
        vec![
            log(1, "about to fail"),
            ev(Event::Failed(BuildFailed {
                message: "step 1 `RUN echo hi` failed with exit code 7".into(),
                step: 1,
            })),
        ],
    )
    .await;
    let st = finished(&s, &tid, &bid).await;
    assert_eq!(st["status"], "error");
    assert_eq!(st["reason"]["step"], "1");
    assert!(
        st["reason"]["message"]
            .as_str()
            .unwrap()
            .contains("exit code 7")
    );
    let lines: Vec<&str> = st["logEntries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert_eq!(lines[0], "about to fail");
    assert!(lines[1].starts_with("Build failed: step 1"), "{lines:?}");
    // The agent was asked for the parent by its host name, with the steps as sent.
    let req = s.server.agent.builds.lock().unwrap()[0].clone();
    assert_eq!(
        (req.parent_template_id.as_str(), req.steps[0].kind.as_str()),
        ("base", "RUN")
    );
    // No version: a create from it is refused, and nothing was asked of the agent.
    let (st, body) = json(
        s.req(Method::POST, "/v2/sandboxes")
            .json(&json!({"templateID": "broken"})),
    )
    .await;
    assert_eq!(st, 400, "{body}");
    assert!(
        !s.server
            .agent
            .calls()
            .iter()
            .any(|c| c.starts_with("create"))
    );
    // A started build cannot be started again.
    let again = s
        .req(Method::POST, &format!("/v2/templates/{tid}/builds/{bid}"))
        .json(&json!({"steps": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    s.server.stop().await;
}

#[tokio::test]
async fn a_ready_build_is_the_version_sandboxes_start_from() {
    let s = Stack::start().await;
    let done = || {
        ev(Event::Done(BuildDone {
            envd_version: "0.6.4".into(),
            vcpus: 2,
            memory_mb: 768,
            disk_size_mb: 2048,
        }))
    };
    let (tid, b1) = build(&s, "app", vec![log(1, "[1/1] RUN echo hi"), done()]).await;
    assert_eq!(finished(&s, &tid, &b1).await["status"], "ready");
    s.server.agent.built.lock().unwrap().push(b1.clone());
    let sbx = s.create(json!({"templateID": "app", "timeout": 60})).await;
    let id = sbx["sandboxID"].as_str().unwrap();
    assert_eq!(sbx["templateID"], tid.as_str());
    // The host starts it from the build's ID, with the build's size.
    let spec = s.server.agent.spec(id).unwrap();
    assert_eq!(
        (spec.template_id.as_str(), spec.memory_mb),
        (b1.as_str(), 768)
    );

    // A second build takes the default tag; the first is then named by nothing, and the next
    // reconcile releases it (and only it: `base` is the host's own).
    let (_, b2) = build(&s, "app", vec![done()]).await;
    assert_eq!(finished(&s, &tid, &b2).await["status"], "ready");
    s.server.agent.built.lock().unwrap().push(b2.clone());
    let stray = "3f2c1a9e-0b7d-4c55-9d1e-1a2b3c4d5e6f".to_owned();
    s.server.agent.built.lock().unwrap().push(stray.clone());
    s.server.cp.reconcile_all().await;
    let mut released = s.server.agent.released.lock().unwrap().clone();
    released.sort();
    let mut want = vec![b1.clone(), stray];
    want.sort();
    assert_eq!(released, want);
    // A tag keeps a version: b2 tagged, then superseded by b3, stays.
    let (st, _) = json(
        s.req(Method::POST, "/templates/tags")
            .json(&json!({"target": "app:default", "tags": ["stable"]})),
    )
    .await;
    assert_eq!(st, 201);
    let (_, b3) = build(&s, "app", vec![done()]).await;
    assert_eq!(finished(&s, &tid, &b3).await["status"], "ready");
    s.server.agent.released.lock().unwrap().clear();
    s.server.cp.reconcile_all().await;
    assert!(s.server.agent.released.lock().unwrap().is_empty());
    let sbx = s
        .create(json!({"templateID": "app:stable", "timeout": 60}))
        .await;
    let spec = s
        .server
        .agent
        .spec(sbx["sandboxID"].as_str().unwrap())
        .unwrap();
    assert_eq!(spec.template_id, b2);
    s.server.stop().await;
}

#[tokio::test]
async fn builds_whose_heartbeat_stopped_are_failed() {
    let s = Stack::start().await;
    let (tid, bid) = build(&s, "ok", vec![]).await;
    // The stream ended without a result: a failed build.
    let st = finished(&s, &tid, &bid).await;
    assert!(
        st["reason"]["message"]
            .as_str()
            .unwrap()
            .contains("without a result"),
        "{st}"
    );
    // A build another control plane was following when it died.
    let store = s.server.cp.store();
    let team = TeamId::parse(&s.team).unwrap();
    let orphan = BuildRecord {
        id: "0a1b2c3d-0000-4000-8000-000000000000".into(),
        template_id: tid.clone(),
        team_id: team,
        status: "building".into(),
        host_id: None,
        vcpus: 0,
        memory_mb: 0,
        disk_size_mb: 0,
        envd_version: String::new(),
        tags: vec![],
        reason: None,
        created_at: UnixMillis(1),
        updated_at: UnixMillis(1),
    };
    store.insert_build(&orphan).await.unwrap();
    s.server.cp.reconcile_all().await;
    let st = finished(&s, &tid, &orphan.id).await;
    assert_eq!(st["status"], "error");
    assert!(
        st["reason"]["message"]
            .as_str()
            .unwrap()
            .contains("interrupted"),
        "{st}"
    );
    s.server.stop().await;
}

/// Requests a build of `name`, then starts it with `start`; the start's status and body.
async fn start_with(s: &Stack, name: &str, start: Value) -> (u16, String) {
    *s.server.agent.build_events.lock().unwrap() = Some(vec![ev(Event::Failed(BuildFailed {
        message: "not built here".into(),
        step: 0,
    }))]);
    let (st, req) = json(
        s.req(Method::POST, "/v3/templates")
            .json(&json!({"name": name})),
    )
    .await;
    assert_eq!(st, 202, "{req}");
    let (tid, bid) = (
        req["templateID"].as_str().unwrap(),
        req["buildID"].as_str().unwrap(),
    );
    let r = s
        .req(Method::POST, &format!("/v2/templates/{tid}/builds/{bid}"))
        .json(&start)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn an_image_source_reaches_the_agent_with_its_credentials_on_the_base_template() {
    use wrenn_agent_proto::v1::image_source::Source;
    let s = Stack::start().await;
    let start = json!({
        "fromImage": "registry.example:5000/team/app:1",
        "fromImageRegistry": {"type": "registry", "username": "u", "password": "p"},
        "steps": [{"type": "RUN", "args": ["true"]}],
    });
    let (st, body) = start_with(&s, "from-image", start).await;
    assert_eq!(st, 202, "{body}");
    let req = s.server.agent.builds.lock().unwrap()[0].clone();
    // The unpack VM boots the base template; the image is what the build starts from.
    assert_eq!(req.parent_template_id, "base");
    match req.image.and_then(|i| i.source) {
        Some(Source::Registry(r)) => assert_eq!(
            (
                r.reference.as_str(),
                r.username.as_str(),
                r.password.as_str()
            ),
            ("registry.example:5000/team/app:1", "u", "p")
        ),
        other => panic!("expected a registry image, got {other:?}"),
    }
    // The SDK's base image is our base template, not an image to pull.
    let (st, body) = start_with(&s, "from-base", json!({"fromImage": "e2bdev/base"})).await;
    assert_eq!(st, 202, "{body}");
    assert!(s.server.agent.builds.lock().unwrap()[1].image.is_none());
}

#[tokio::test]
async fn image_sources_the_server_cannot_use_are_refused_before_any_build() {
    let s = Stack::start().await;
    for (name, start, says) in [
        (
            "aws",
            json!({"fromImage": "x/y:1", "fromImageRegistry": {"type": "aws", "awsRegion": "r"}}),
            "type 'aws' are not supported",
        ),
        (
            "nopass",
            json!({"fromImage": "x/y:1", "fromImageRegistry": {"type": "registry", "username": "u"}}),
            "non-empty password",
        ),
        (
            "spaces",
            json!({"fromImage": "not an image"}),
            "is not an image reference",
        ),
    ] {
        let (st, body) = start_with(&s, name, start).await;
        assert_eq!(st, 400, "{name}: {body}");
        assert!(body.contains(says), "{name}: {body}");
    }
    assert!(s.server.agent.builds.lock().unwrap().is_empty());
}
