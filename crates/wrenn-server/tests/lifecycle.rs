//! Sandbox lifecycles in the control plane, over real HTTP with the test-double agent (see
//! `support`): the create keys the SDKs send (`autoPause`, `autoPauseMemory`, `autoResume`)
//! checked, stored and reported by `GET /sandboxes/{id}` (forks inherit them), pauses of
//! paused sandboxes, filesystem-only pauses (`memory: false`, `autoPauseMemory: false`) and
//! reboots (`connect` with `memory: false`) passed to the agent and reported as `pauseMode`,
//! timeouts that kill or pause, and auto-resume: traffic through the edge
//! proxy to a paused sandbox with auto-resume resumes it once (however many requests) and is
//! forwarded, waits for a pause under way, and without auto-resume gets the SDKs' 502 "not
//! running". Each test runs on a SQLite file and, when `WRENN_TEST_POSTGRES_URL` is set, again
//! on a fresh PostgreSQL database.

mod support;

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use support::*;
use wrenn_agent_proto::v1::SandboxState as AgentState;

on_both_databases!(
    create_lifecycles_are_checked_stored_and_reported,
    pauses_of_paused_sandboxes_are_refused_and_filesystem_pauses_keep_the_disk,
    traffic_resumes_a_paused_auto_resume_sandbox_once,
    traffic_to_a_paused_sandbox_without_auto_resume_is_not_running,
    traffic_waits_for_a_pause_under_way,
    timeouts_kill_or_pause_as_the_lifecycle_says,
);

async fn sandbox(s: &Stack, body: Value) -> String {
    s.create(body).await["sandboxID"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn info(s: &Stack, id: &str) -> Value {
    let (st, v) = json(s.req(Method::GET, &format!("/sandboxes/{id}"))).await;
    assert_eq!(st, 200, "{v}");
    v
}

async fn pause(s: &Stack, id: &str, body: Value) -> (u16, Value) {
    json(
        s.req(Method::POST, &format!("/sandboxes/{id}/pause"))
            .json(&body),
    )
    .await
}

/// A request through the edge proxy to `port` of sandbox `id`: by `E2b-Sandbox-Id` for envd's
/// port, by host name for the others (as `get_host(port)` is used).
fn traffic(s: &Stack, id: &str, port: u16) -> reqwest::RequestBuilder {
    let r = s.http.get(format!("{}/health", s.server.url));
    if port == 49983 {
        r.header("e2b-sandbox-id", id)
    } else {
        r.header("host", format!("{port}-{id}.{DOMAIN}"))
    }
}

/// Seconds from now to the sandbox's `endAt`.
fn seconds_left(v: &Value) -> i64 {
    let end = time::OffsetDateTime::parse(
        v["endAt"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    (end - time::OffsetDateTime::now_utc()).whole_seconds()
}

async fn create_lifecycles_are_checked_stored_and_reported(db: Db) {
    let s = Stack::with(db, FakeAgent::default(), |_| {}).await;
    let lifecycle =
        |resume: bool, on_timeout: &str| json!({"autoResume": resume, "onTimeout": on_timeout});
    // What each SDK `lifecycle=` sends (see the contract's table), and what it reads back.
    for (body, want) in [
        (json!({}), lifecycle(false, "kill")),
        (json!({"autoPause": false}), lifecycle(false, "kill")),
        (json!({"autoPause": true}), lifecycle(false, "pause")),
        (
            json!({"autoPause": true, "autoPauseMemory": true}),
            lifecycle(false, "pause"),
        ),
        (
            json!({"autoPause": true, "autoResume": {"enabled": true}}),
            lifecycle(true, "pause"),
        ),
        (
            json!({"autoPause": true, "autoPauseMemory": true, "autoResume": {"enabled": false}}),
            lifecycle(false, "pause"),
        ),
        (
            json!({"autoResume": {"enabled": false}}),
            lifecycle(false, "kill"),
        ),
        (
            json!({"autoPause": true, "autoPauseMemory": false}),
            lifecycle(false, "pause"),
        ),
    ] {
        let mut create = json!({"templateID": "base", "metadata": {}, "envVars": {}});
        create
            .as_object_mut()
            .unwrap()
            .extend(body.as_object().unwrap().clone());
        let id = sandbox(&s, create).await;
        let v = info(&s, &id).await;
        assert_eq!(v["lifecycle"], want, "{body}");
        assert_eq!(v["state"], "running");
        assert!(v.get("pauseMode").is_none(), "{v}");
        let rec = s.server.cp.store().get_sandbox(&id).await.unwrap().unwrap();
        assert_eq!(
            (rec.auto_pause, rec.auto_resume, rec.auto_pause_memory),
            (
                want["onTimeout"] == "pause",
                want["autoResume"] == true,
                body["autoPauseMemory"] != false
            )
        );
    }

    // What the SDKs refuse before they send it is refused here too, with nothing made.
    let creates = s.server.agent.creates();
    for (body, says) in [
        (json!({"autoResume": {"enabled": true}}), "autoResume"),
        (
            json!({"autoPause": false, "autoResume": {"enabled": true}}),
            "autoResume",
        ),
        (json!({"autoPauseMemory": false}), "requires autoPause"),
        (
            json!({"autoPause": true, "autoPauseMemory": false, "autoResume": {"enabled": true}}),
            "cannot be combined with autoResume",
        ),
    ] {
        let mut create = json!({"templateID": "base"});
        create
            .as_object_mut()
            .unwrap()
            .extend(body.as_object().unwrap().clone());
        let (st, v) = json(s.req(Method::POST, "/v2/sandboxes").json(&create)).await;
        assert_eq!(st, 400, "{body}: {v}");
        assert!(v["message"].as_str().unwrap().contains(says), "{body}: {v}");
    }
    assert_eq!(s.server.agent.creates(), creates);

    // Paused: `pauseMode: full`, the lifecycle as created. Forks inherit it.
    let id = sandbox(
        &s,
        json!({"templateID": "base", "autoPause": true, "autoResume": {"enabled": true}}),
    )
    .await;
    assert_eq!(pause(&s, &id, json!({})).await.0, 204);
    let v = info(&s, &id).await;
    assert_eq!(
        (&v["state"], &v["pauseMode"], &v["lifecycle"]),
        (&json!("paused"), &json!("full"), &lifecycle(true, "pause"))
    );
    let (st, forks) = json(
        s.req(Method::POST, &format!("/sandboxes/{id}/fork"))
            .json(&json!({"count": 1})),
    )
    .await;
    assert_eq!(st, 201, "{forks}");
    let child = forks[0]["sandbox"]["sandboxID"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        info(&s, &child).await["lifecycle"],
        lifecycle(true, "pause")
    );
    // connect resumes it; running again, no pause mode.
    let (st, _) = json(
        s.req(Method::POST, &format!("/v2/sandboxes/{id}/connect"))
            .json(&json!({})),
    )
    .await;
    assert_eq!(st, 201);
    let v = info(&s, &id).await;
    assert_eq!(v["state"], "running");
    assert!(v.get("pauseMode").is_none(), "{v}");
    s.stop().await;
}

async fn pauses_of_paused_sandboxes_are_refused_and_filesystem_pauses_keep_the_disk(db: Db) {
    let s = Stack::with(db, FakeAgent::default(), |_| {}).await;
    let id = sandbox(&s, json!({"templateID": "base"})).await;
    let connect = async |body: Value| {
        let url = format!("/v2/sandboxes/{id}/connect");
        json(s.req(Method::POST, &url).json(&body)).await.0
    };
    // A filesystem-only pause is asked of the agent as one, and reported so.
    assert_eq!(pause(&s, &id, json!({"memory": false})).await.0, 204);
    assert_eq!(s.server.agent.state(&id), Some(AgentState::Paused));
    assert_eq!(info(&s, &id).await["pauseMode"], "filesystem");
    assert_eq!(connect(json!({})).await, 201);
    // A full pause, then `on_resume: reboot` (`memory: false`): the agent boots it cold.
    assert_eq!(pause(&s, &id, json!({"memory": true})).await.0, 204);
    assert_eq!(info(&s, &id).await["pauseMode"], "full");
    assert_eq!(connect(json!({"memory": false})).await, 201);
    assert_eq!(
        s.server.agent.calls_of(&format!("pause {id}")),
        [format!("pause {id} filesystem"), format!("pause {id}")]
    );
    assert_eq!(
        s.server.agent.calls_of(&format!("resume {id}")),
        [format!("resume {id}"), format!("resume {id} reboot")]
    );
    assert_eq!(pause(&s, &id, json!({})).await.0, 204);
    // Already paused: 409 with `code` 409 (the JS SDK reads the body's code, Python the
    // status: both then answer `false`).
    for _ in 0..2 {
        let (st, v) = pause(&s, &id, json!({})).await;
        assert_eq!(st, 409, "{v}");
        assert_eq!(v["code"], 409);
        assert!(
            v["message"].as_str().unwrap().contains("already paused"),
            "{v}"
        );
    }
    assert_eq!(s.server.agent.calls_of("pause ").len(), 3);
    s.stop().await;
}

async fn traffic_resumes_a_paused_auto_resume_sandbox_once(db: Db) {
    let s = Stack::with(db, FakeAgent::default(), |_| {}).await;
    let id = sandbox(
        &s,
        json!({"templateID": "base", "timeout": 30, "autoPause": true, "autoResume": {"enabled": true}}),
    )
    .await;
    assert_eq!(pause(&s, &id, json!({})).await.0, 204);
    let agent = s.server.agent.clone();
    agent.hold_resumes();
    // Two requests at once, to envd and to another port: one resume, both forwarded.
    let (a, b) = (
        traffic(&s, &id, 49983).send(),
        traffic(&s, &id, 8080).send(),
    );
    let both = tokio::spawn(async move { (a.await.unwrap(), b.await.unwrap()) });
    wait_for("the resume", async || agent.calls_of("resume ").len() == 1).await;
    // Long enough for the second request to ask for a resume too, if it were going to.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!both.is_finished(), "answered before the sandbox resumed");
    agent.release_resumes(10);
    let (a, b) = both.await.unwrap();
    for (r, port) in [(a, "49983"), (b, "8080")] {
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            (v["sandboxId"].as_str(), v["port"].as_str()),
            (Some(id.as_str()), Some(port))
        );
    }
    assert_eq!(agent.calls_of("resume ").len(), 1);
    assert_eq!(agent.state(&id), Some(AgentState::Running));
    // Resumed as connect resumes: the default timeout (300 s), not the create's 30 s.
    let v = info(&s, &id).await;
    assert_eq!(v["state"], "running");
    assert!(seconds_left(&v) > 200, "{v}");
    // Running: traffic just goes through.
    assert_eq!(traffic(&s, &id, 49983).send().await.unwrap().status(), 200);
    assert_eq!(agent.calls_of("resume ").len(), 1);

    // A sandbox whose ports are private is not woken by traffic without its token; envd's
    // port (guarded by envd's token) wakes it.
    agent.release_resumes(10);
    let private = sandbox(
        &s,
        json!({"templateID": "base", "autoPause": true, "autoResume": {"enabled": true},
               "network": {"allowPublicTraffic": false}}),
    )
    .await;
    assert_eq!(pause(&s, &private, json!({})).await.0, 204);
    assert_eq!(
        traffic(&s, &private, 8080).send().await.unwrap().status(),
        403
    );
    assert_eq!(agent.state(&private), Some(AgentState::Paused));
    assert_eq!(
        traffic(&s, &private, 49983).send().await.unwrap().status(),
        200
    );
    assert_eq!(agent.state(&private), Some(AgentState::Running));

    // A resume that fails answers 502 without "was not found" and leaves it paused.
    let other = sandbox(
        &s,
        json!({"templateID": "base", "autoPause": true, "autoResume": {"enabled": true}}),
    )
    .await;
    assert_eq!(pause(&s, &other, json!({})).await.0, 204);
    agent.busy.lock().unwrap().insert(other.clone());
    let r = traffic(&s, &other, 49983).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    let message = v["message"].as_str().unwrap();
    assert!(message.contains("could not be resumed"), "{v}");
    assert!(!message.contains("was not found"), "{v}");
    assert_eq!(
        (v["code"].as_i64(), v["sandboxId"].as_str()),
        (Some(502), Some(other.as_str()))
    );
    assert_eq!(info(&s, &other).await["state"], "paused");
    agent.busy.lock().unwrap().clear();
    assert_eq!(
        traffic(&s, &other, 49983).send().await.unwrap().status(),
        200
    );
    s.stop().await;
}

async fn traffic_to_a_paused_sandbox_without_auto_resume_is_not_running(db: Db) {
    let s = Stack::with(db, FakeAgent::default(), |_| {}).await;
    for body in [
        json!({"templateID": "base", "autoPause": true}),
        json!({"templateID": "base", "autoPause": true, "autoResume": {"enabled": false}}),
        json!({"templateID": "base"}),
    ] {
        let id = sandbox(&s, body.clone()).await;
        assert_eq!(pause(&s, &id, json!({})).await.0, 204);
        for port in [49983, 8080] {
            let r = traffic(&s, &id, port).send().await.unwrap();
            assert_eq!(r.status(), 502, "{body}");
            let v: Value = r.json().await.unwrap();
            assert_eq!(
                v,
                json!({"code": 502, "message": format!("The sandbox {id} was not found"), "sandboxId": id})
            );
        }
        assert_eq!(s.server.agent.state(&id), Some(AgentState::Paused));
    }
    assert!(s.server.agent.calls_of("resume ").is_empty());
    s.stop().await;
}

async fn traffic_waits_for_a_pause_under_way(db: Db) {
    let s = Stack::with(db, FakeAgent::default(), |_| {}).await;
    let id = sandbox(
        &s,
        json!({"templateID": "base", "autoPause": true, "autoResume": {"enabled": true}}),
    )
    .await;
    let agent = s.server.agent.clone();
    agent.hold_pauses();
    let pausing = tokio::spawn(
        s.req(Method::POST, &format!("/sandboxes/{id}/pause"))
            .json(&json!({}))
            .send(),
    );
    wait_for("the pause", async || agent.calls_of("pause ").len() == 1).await;
    let request = tokio::spawn(traffic(&s, &id, 49983).send());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!request.is_finished(), "answered during the pause");
    assert!(agent.calls_of("resume ").is_empty());
    agent.release_pauses(1);
    assert_eq!(pausing.await.unwrap().unwrap().status(), 204);
    let r = request.await.unwrap().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["sandboxId"], id.as_str());
    let calls: Vec<String> = agent
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("pause ") || c.starts_with("resume "))
        .collect();
    assert_eq!(calls, [format!("pause {id}"), format!("resume {id}")]);
    assert_eq!(info(&s, &id).await["state"], "running");
    s.stop().await;
}

async fn timeouts_kill_or_pause_as_the_lifecycle_says(db: Db) {
    let s = Stack::with(db, FakeAgent::default(), |_| {}).await;
    let kill = sandbox(
        &s,
        json!({"templateID": "base", "timeout": 1, "autoPause": false}),
    )
    .await;
    let paused = sandbox(
        &s,
        json!({"templateID": "base", "timeout": 1, "autoPause": true, "autoResume": {"enabled": true}}),
    )
    .await;
    let disk_only = sandbox(
        &s,
        json!({"templateID": "base", "timeout": 1, "autoPause": true, "autoPauseMemory": false}),
    )
    .await;
    wait_for("the reaper", async || {
        let gone = json(s.req(Method::GET, &format!("/sandboxes/{kill}")))
            .await
            .0
            == 404;
        gone && info(&s, &paused).await["state"] == "paused"
            && info(&s, &disk_only).await["state"] == "paused"
    })
    .await;
    assert_eq!(info(&s, &disk_only).await["pauseMode"], "filesystem");
    assert_eq!(
        s.server.agent.calls_of(&format!("pause {disk_only}")),
        [format!("pause {disk_only} filesystem")]
    );
    assert_eq!(s.server.agent.state(&kill), None);
    assert_eq!(s.server.agent.state(&paused), Some(AgentState::Paused));
    let v = info(&s, &paused).await;
    assert_eq!(v["pauseMode"], "full");
    assert_eq!(
        v["lifecycle"],
        json!({"autoResume": true, "onTimeout": "pause"})
    );
    // Its traffic wakes it.
    assert_eq!(
        traffic(&s, &paused, 8080).send().await.unwrap().status(),
        200
    );
    assert_eq!(info(&s, &paused).await["state"], "running");
    s.stop().await;
}
