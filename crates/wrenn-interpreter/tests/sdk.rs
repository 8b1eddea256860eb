//! The official code-interpreter SDKs against the server, unmodified: the Python SDK
//! (`e2b_code_interpreter` 2.x, `tests/sdk/python_sdk.py`) and the JS SDK
//! (`@e2b/code-interpreter` 2.x, `tests/sdk/js_sdk.cjs`), both pointed at the server with
//! their `sandbox_url` option. No network.
//!
//! Python: `WRENN_TEST_PYTHON` (default: the workspace's `.venv/bin/python`, which
//! `scripts/sdk-env.sh` makes) with `e2b_code_interpreter` installed; missing, the test says
//! so and passes, except under CI. JS: `WRENN_TEST_NODE_MODULES`, a `node_modules` holding
//! `@e2b/code-interpreter`; missing, the test says so and passes.

mod support;

use std::path::Path;

use support::{Server, python_has, test_config};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_python_sdk() {
    let sdk_python = std::env::var("WRENN_TEST_PYTHON")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../.venv/bin/python").into());
    if !python_has(&sdk_python, "e2b_code_interpreter") {
        assert!(
            std::env::var_os("CI").is_none(),
            "{sdk_python} has no e2b_code_interpreter under CI"
        );
        eprintln!("skipped: {sdk_python} has no e2b_code_interpreter (set WRENN_TEST_PYTHON)");
        return;
    }
    let mut config = test_config();
    let mpl = match support::python_with_matplotlib() {
        Some(py) => {
            config.python = py.into();
            "1"
        }
        None => "0",
    };
    let s = Server::start_with(config).await;
    let out = tokio::process::Command::new(&sdk_python)
        .arg(Path::new(DIR).join("python_sdk.py"))
        .env("WRENN_INTERPRETER_URL", &s.base)
        .env("WORKER_HAS_MATPLOTLIB", mpl)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env_remove("E2B_DEBUG")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "{}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(stdout.contains("python sdk: ok"), "{stdout}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_js_sdk() {
    let Some(modules) = std::env::var_os("WRENN_TEST_NODE_MODULES")
        .filter(|m| Path::new(m).join("@e2b/code-interpreter").is_dir())
    else {
        eprintln!("skipped: WRENN_TEST_NODE_MODULES has no @e2b/code-interpreter");
        return;
    };
    let s = Server::start_with(test_config()).await;
    let out = tokio::process::Command::new("node")
        .arg(Path::new(DIR).join("js_sdk.cjs"))
        .env("NODE_PATH", &modules)
        .env("WRENN_INTERPRETER_URL", &s.base)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "{}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(stdout.contains("js sdk: ok"), "{stdout}");
    s.stop().await;
}
