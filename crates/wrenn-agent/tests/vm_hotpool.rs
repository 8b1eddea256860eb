//! The hot pool against real QEMU guests: creates of a template with a hot pool take its
//! restored, warmed-up sandboxes and give them their identity (token, env vars, fresh
//! entropy); such a sandbox shows no trace of its warm-up next to one restored cold (the same
//! processes, files and environment), its RNG output differs from its pool sibling's and the
//! cold one's, and the pool refills in the background.
//!
//! Gated by `WRENN_VM_TESTS=1`. Slot indices 5600..5650 are this test's own.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::{qemu_pids_under, run_ok_with, secured_create, vm_deadlines, with_token as opts};
use wrenn_agent::Agent;
use wrenn_agent::controller::CreateArgs;
use wrenn_agent::hotpool::HotPool;
use wrenn_agent::pool::SlotPool;
use wrenn_agent::snapshot::Snapshot;

const HOT: &str = "small";
const COLD: &str = "small-cold";

/// What a user could see of a guest's state: its user-space processes, the files in the
/// places a warm-up could leave some, its environment and shell history.
const FINGERPRINT: &str = "for p in /proc/[0-9]*; do s=$(cat $p/stat 2>/dev/null) || continue; \
    set -- $s; [ \"$1\" = 2 ] || [ \"$4\" = 2 ] || cat $p/comm; done | sort; \
    echo ---; ls -A /tmp /root /var/tmp; echo ---; env | grep -v '^_=' | sort; \
    echo ---; cat /root/.bash_history 2>/dev/null | wc -l";
const RNG: &str = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'";

fn create_args(id: &str, template: &str, token: &str) -> CreateArgs {
    let mut args = secured_create(id, template, token, None);
    args.init.env_vars = BTreeMap::from([("FROM".to_owned(), id.to_owned())]);
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_sandboxes_show_no_trace_of_their_warm_up() {
    if !support::enabled() {
        return;
    }
    support::init_tracing("wrenn_agent=debug");
    let first = 5_600 + (std::process::id() % 3) * 16;
    let work = support::work_dir("wrenn-agent-hot");
    let w = work.path().to_owned();
    let built = support::build_template(&w.join("images"), &w.join("template"), &w).await;
    let template = Snapshot::open(&built.dir).expect("open template");
    let sandboxes = w.join("sandboxes");
    std::fs::create_dir_all(&sandboxes).unwrap();
    let slots = SlotPool::new(2, first, 8).await.expect("slot pool");
    let deadlines = vm_deadlines();
    let hot = HotPool::start(
        template.clone(),
        HOT,
        slots.clone(),
        sandboxes.clone(),
        2,
        "root",
        deadlines,
    );
    assert!(hot.wait_full(Duration::from_secs(240)).await, "pool filled");
    let a = Agent::new("test-host", slots, sandboxes.clone(), 8, deadlines);
    a.register_template_with(HOT, template.clone(), None, Some(hot), "test-envd");
    a.register_template(COLD, template.clone(), None, "test-envd");
    let ctl = a.controller();

    ctl.create(create_args("cold", COLD, "t-cold"))
        .await
        .expect("cold create");
    for id in ["h1", "h2"] {
        ctl.create(create_args(id, HOT, &format!("t-{id}")))
            .await
            .expect("create from the hot pool");
    }
    // Both came from the pool: their directories are the hot sandboxes'.
    for id in ["h1", "h2"] {
        let owner = std::fs::read_dir(&sandboxes).unwrap().flatten().find(|e| {
            std::fs::read_to_string(e.path().join("sandbox.json"))
                .is_ok_and(|r| r.contains(&format!("\"sandbox_id\": \"{id}\"")))
        });
        let name = owner.expect("its directory").file_name();
        assert!(
            name.to_string_lossy().starts_with("hot-"),
            "{id} was restored cold ({name:?})"
        );
    }

    let url = |id: &str| a.envd_base_url(id).unwrap();
    let cold = run_ok_with(&url("cold"), opts("t-cold"), FINGERPRINT).await;
    let mut rng = vec![run_ok_with(&url("cold"), opts("t-cold"), RNG).await];
    for id in ["h1", "h2"] {
        let token = format!("t-{id}");
        let seen = run_ok_with(&url(id), opts(&token), FINGERPRINT).await;
        // Only the sandbox's own identity and variable differ.
        let ours = seen
            .replace(&format!("FROM={id}"), "FROM=cold")
            .replace(&format!("E2B_SANDBOX_ID={id}"), "E2B_SANDBOX_ID=cold")
            .replace(
                &format!("E2B_TEMPLATE_ID={HOT}"),
                &format!("E2B_TEMPLATE_ID={COLD}"),
            );
        assert_eq!(ours, cold, "{id} differs from a cold restore");
        assert!(cold.contains("envd"), "the process list is read: {cold}");
        assert_eq!(run_ok_with(&url(id), opts(&token), "echo $FROM").await, id);
        rng.push(run_ok_with(&url(id), opts(&token), RNG).await);
        // Only the create's token is accepted.
        let refused = reqwest::Client::new()
            .post(format!("{}/process.Process/Start", url(id)))
            .header("content-type", "application/connect+json")
            .header("x-access-token", "t-cold")
            .body(Vec::new())
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 401, "another sandbox's token accepted");
    }
    rng.sort();
    rng.dedup();
    assert_eq!(
        rng.len(),
        3,
        "pool siblings draw their own randomness: {rng:?}"
    );

    for id in ["cold", "h1", "h2"] {
        ctl.kill(id).await.unwrap();
    }
    a.shutdown().await;
    assert!(qemu_pids_under(&w).is_empty(), "QEMU left under {w:?}");
}
