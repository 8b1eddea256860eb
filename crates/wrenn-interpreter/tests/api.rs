//! The HTTP API against the host's `python3`: execution results, output, errors, state per
//! context, restart, delete, env vars, figures, interrupts and the stream's exact lines.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Server, kinds, main_text, of_type, stdout, test_config};

#[tokio::test]
async fn health_and_the_default_context() {
    let s = Server::start().await;
    let res = s.client.get(s.url("/health")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap(), json!("OK"));
    let list: Vec<Value> = s
        .client
        .get(s.url("/contexts"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["language"], "python");
    let cwd = std::env::temp_dir().display().to_string();
    assert_eq!(list[0]["cwd"], cwd.as_str());
    s.stop().await;
}

#[tokio::test]
async fn an_expression_is_the_main_result() {
    let s = Server::start().await;
    let lines = s.run("1+1").await;
    assert_eq!(
        lines,
        [
            json!({"type": "number_of_executions", "execution_count": 1}),
            json!({"type": "result", "text": "2", "extra": {}, "is_main_result": true}),
            json!({"type": "end_of_execution"}),
        ]
    );
    // A statement has no result; a trailing `;` hides one, as in IPython; None is none.
    for code in ["x = 1", "1+1;", "None", "print"] {
        let lines = s.run(code).await;
        let results = of_type(&lines, "result");
        assert_eq!(
            results.len(),
            usize::from(code == "print"),
            "{code}: {lines:?}"
        );
    }
    // E2B strips the quotes of a string's repr.
    assert_eq!(main_text(&s.run("'abc'").await), Some("abc"));
    let lines = s.run("[1, {'a': None}]").await;
    let result = of_type(&lines, "result")[0];
    assert_eq!(result["text"], "[1, {'a': None}]");
    assert_eq!(result["json"], json!([1, {"a": null}]));
    s.stop().await;
}

#[tokio::test]
async fn state_lives_in_the_context() {
    let s = Server::start().await;
    s.run("x = 21").await;
    let lines = s.run("x*2").await;
    assert_eq!(main_text(&lines), Some("42"));
    assert_eq!(lines[0]["execution_count"], 2);
    // Top-level await runs, as with IPython's autoawait.
    let lines = s.run("import asyncio\nawait asyncio.sleep(0)\nx + 1").await;
    assert_eq!(main_text(&lines), Some("22"));
    s.stop().await;
}

#[tokio::test]
async fn output_is_streamed_in_order() {
    let s = Server::start().await;
    let lines = s
        .run("import os, sys\nprint('hello')\nos.system('echo from a subprocess')\nprint('oops', file=sys.stderr)\ndisplay(3)\n4")
        .await;
    assert_eq!(
        kinds(&lines),
        [
            "number_of_executions",
            "stdout",
            "stderr",
            "result",
            "result",
            "end_of_execution"
        ],
        "{lines:?}"
    );
    assert_eq!(stdout(&lines), "hello\nfrom a subprocess\n");
    assert!(lines[1]["timestamp"].as_str().unwrap().ends_with("+00:00"));
    assert_eq!(of_type(&lines, "stderr")[0]["text"], "oops\n");
    let results = of_type(&lines, "result");
    assert_eq!(results[0]["is_main_result"], false);
    assert_eq!(results[0]["text"], "3");
    assert_eq!(main_text(&lines), Some("4"));
    let lines = s.run("print('héllo \u{2028} ✓')").await;
    assert_eq!(stdout(&lines), "héllo \u{2028} ✓\n");
    s.stop().await;
}

#[tokio::test]
async fn exceptions_are_error_lines() {
    let s = Server::start().await;
    let lines = s.run("1/0").await;
    let errors = of_type(&lines, "error");
    assert_eq!(errors.len(), 1, "{lines:?}");
    let e = errors[0];
    assert_eq!(e["name"], "ZeroDivisionError");
    assert_eq!(e["value"], "division by zero");
    let tb = e["traceback"].as_str().unwrap();
    assert!(tb.starts_with("Traceback (most recent call last):"), "{tb}");
    assert!(
        tb.contains("1/0") && tb.ends_with("ZeroDivisionError: division by zero\n"),
        "{tb}"
    );
    assert!(!tb.contains("wrenn-driver"), "{tb}");

    let lines = s.run("1 +").await;
    assert_eq!(of_type(&lines, "error")[0]["name"], "SyntaxError");
    let lines = s.run("raise SystemExit(3)").await;
    assert_eq!(of_type(&lines, "error")[0]["name"], "SystemExit");
    // The context survives all of it.
    assert_eq!(main_text(&s.run("'still here'").await), Some("still here"));
    s.stop().await;
}

#[tokio::test]
async fn common_ipython_line_magics_work() {
    let s = Server::start().await;
    let dir = tempdir();
    let code =
        format!("!echo from the shell\n%cd {dir}\n%matplotlib inline\nimport os\nos.getcwd()");
    let lines = s.run(&code).await;
    assert_eq!(stdout(&lines), format!("from the shell\n{dir}\n"));
    assert_eq!(main_text(&lines), Some(dir.as_str()));
    // Python that happens to hold a `!` is left alone; unknown magics are syntax errors.
    assert_eq!(stdout(&s.run("print(\n'!x')").await), "!x\n");
    let lines = s.run("%timeit 1").await;
    assert_eq!(of_type(&lines, "error")[0]["name"], "SyntaxError");
    s.stop().await;
}

#[tokio::test]
async fn contexts_have_their_own_state_and_cwd() {
    let s = Server::start().await;
    let dir = tempdir();
    let a = s.create_context(json!({})).await;
    let b = s
        .create_context(json!({"language": "python", "cwd": dir}))
        .await;
    assert_eq!(b["cwd"], dir.as_str());
    assert_eq!(b["language"], "python");
    let (a, b) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    s.run_in(a, "v = 'a'").await;
    s.run_in(b, "v = 'b'").await;
    assert_eq!(main_text(&s.run_in(a, "v").await), Some("a"));
    assert_eq!(main_text(&s.run_in(b, "v").await), Some("b"));
    let lines = s.run("v").await;
    assert_eq!(of_type(&lines, "error")[0]["name"], "NameError");
    let cwd = main_text(&s.run_in(b, "import os; os.getcwd()").await).map(str::to_owned);
    assert_eq!(cwd.as_deref(), Some(dir.as_str()));
    // `language: python` is the default context.
    s.run("w = 5").await;
    let lines = s.execute(json!({"code": "w", "language": "python"})).await;
    assert_eq!(main_text(&lines), Some("5"));
    let list: Vec<Value> = s
        .client
        .get(s.url("/contexts"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.len(), 3);
    // A cwd that is not a directory is refused.
    let res = s
        .client
        .post(s.url("/contexts"))
        .json(&json!({"cwd": "/nonexistent/dir"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    s.stop().await;
}

#[tokio::test]
async fn restart_clears_state() {
    let s = Server::start().await;
    let ctx = s.create_context(json!({})).await;
    let id = ctx["id"].as_str().unwrap();
    s.run_in(id, "x = 1").await;
    let res = s
        .client
        .post(s.url(&format!("/contexts/{id}/restart")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let lines = s.run_in(id, "x").await;
    assert_eq!(lines[0]["execution_count"], 1);
    assert_eq!(of_type(&lines, "error")[0]["name"], "NameError");
    let res = s
        .client
        .post(s.url("/contexts/nope/restart"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    s.stop().await;
}

#[tokio::test]
async fn restart_ends_a_running_execution() {
    let s = Server::start().await;
    let running = s.spawn_execute(
        json!({"code": "import time\nprint('started', flush=True)\ntime.sleep(60)"}),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let id = default_id(&s).await;
    let res = s
        .client
        .post(s.url(&format!("/contexts/{id}/restart")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let text = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .unwrap()
        .unwrap();
    assert!(
        text.contains(r#"{"type":"error","name":"ContextRestarting","value":"Context was restarted","traceback":""}"#),
        "{text}"
    );
    assert_eq!(main_text(&s.run("1").await), Some("1"));
    s.stop().await;
}

#[tokio::test]
async fn a_deleted_context_is_not_found() {
    let s = Server::start().await;
    let ctx = s.create_context(json!({})).await;
    let id = ctx["id"].as_str().unwrap();
    let del = s.client.delete(s.url(&format!("/contexts/{id}")));
    assert_eq!(del.send().await.unwrap().status(), 200);
    let res = s.post_execute(json!({"code": "1", "context_id": id})).await;
    assert_eq!(res.status(), 404);
    assert_eq!(res.text().await.unwrap(), format!("Context {id} not found"));
    let del = s.client.delete(s.url(&format!("/contexts/{id}")));
    assert_eq!(del.send().await.unwrap().status(), 404);
    // Deleting the default context: the next execution without one makes a new default.
    let default = default_id(&s).await;
    let del = s.client.delete(s.url(&format!("/contexts/{default}")));
    assert_eq!(del.send().await.unwrap().status(), 200);
    assert_eq!(main_text(&s.run("7").await), Some("7"));
    assert_ne!(default_id(&s).await, default);
    s.stop().await;
}

#[tokio::test]
async fn requests_the_sdk_maps_to_errors() {
    let s = Server::start().await;
    let res = s.post_execute(json!({"code": "1", "language": "r"})).await;
    assert_eq!(res.status(), 400);
    assert!(res.text().await.unwrap().contains("'r' is not supported"));
    let res = s
        .post_execute(json!({"code": "1", "language": "python", "context_id": "x"}))
        .await;
    assert_eq!(res.status(), 400);
    let res = s.post_execute(json!({"context_id": "x"})).await;
    assert_eq!(res.status(), 422);
    let res = s
        .client
        .post(s.url("/contexts"))
        .json(&json!({"language": "javascript"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    s.stop().await;
}

#[tokio::test]
async fn cells_may_be_big() {
    let s = Server::start().await;
    let data = "x".repeat(3 << 20);
    let lines = s.run(&format!("len('{data}')")).await;
    assert_eq!(main_text(&lines), Some("3145728"));
    s.stop().await;
}

#[tokio::test]
async fn env_vars_last_one_execution() {
    let s = Server::start().await;
    s.run("import os; os.environ['KEEP'] = 'before'").await;
    let lines = s
        .execute(json!({
            "code": "import os; (os.environ['WRENN_T'], os.environ['KEEP'])",
            "env_vars": {"WRENN_T": "yes", "KEEP": "during"},
        }))
        .await;
    assert_eq!(main_text(&lines), Some("('yes', 'during')"));
    let lines = s
        .run("import os; (os.environ.get('WRENN_T'), os.environ['KEEP'])")
        .await;
    assert_eq!(main_text(&lines), Some("(None, 'before')"));
    // `null` (the Python SDK without envs) is fine too.
    let lines = s.execute(json!({"code": "1", "env_vars": null})).await;
    assert_eq!(main_text(&lines), Some("1"));
    s.stop().await;
}

#[tokio::test]
async fn sandbox_envs_come_from_envd_with_the_callers_token() {
    // A stand-in for envd's /envs that remembers the token it was asked with.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let envd = format!("http://{}", listener.local_addr().unwrap());
    let tokens = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = tokens.clone();
    let app = axum::Router::new().route(
        "/envs",
        axum::routing::get(move |headers: axum::http::HeaderMap| async move {
            let token = headers
                .get("x-access-token")
                .map(|v| v.to_str().unwrap().to_owned());
            seen.lock().unwrap().push(token.unwrap_or_default());
            axum::Json(json!({"SANDBOX_VAR": "from-envd", "SHADOWED": "global"}))
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut config = test_config();
    config.envd_url = envd;
    let s = Server::start_with(config).await;
    let res = s
        .client
        .post(s.url("/execute"))
        .header("X-Access-Token", "secret-token")
        .json(&json!({"code": "import os; os.environ['SANDBOX_VAR']", "env_vars": {"SHADOWED": "mine"}}))
        .send()
        .await
        .unwrap();
    let text = res.text().await.unwrap();
    assert!(text.contains(r#""text":"from-envd""#), "{text}");
    let lines = s.run("import os; os.environ['SHADOWED']").await;
    assert_eq!(main_text(&lines), Some("global"));
    // Asked once per worker, with the caller's token.
    assert_eq!(*tokens.lock().unwrap(), ["secret-token"]);
    s.stop().await;
}

#[tokio::test]
async fn executions_on_one_context_take_turns() {
    let s = Server::start().await;
    let first = s.spawn_execute(json!({"code": "import time\ntime.sleep(0.5)\ny = 1"}));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Queued behind the first, so it sees what the first set.
    assert_eq!(main_text(&s.run("y").await), Some("1"));
    first.await.unwrap();
    s.stop().await;
}

#[tokio::test]
async fn long_executions_carry_keepalives() {
    let s = Server::start().await;
    let res = s
        .post_execute(json!({"code": "import time; time.sleep(1); 1"}))
        .await;
    let text = res.text().await.unwrap();
    assert!(text.contains("{\"type\":\"keepalive\"}\n"), "{text}");
    s.stop().await;
}

#[tokio::test]
async fn a_client_that_leaves_interrupts_its_execution() {
    let s = Server::start().await;
    s.run("kept = 'yes'").await;
    let mut res = s
        .post_execute(json!({"code": "import time\nprint('started', flush=True)\ntime.sleep(30)\nkept = 'no'"}))
        .await;
    // Wait for the cell to start, then hang up.
    read_until(&mut res, "started").await;
    drop(res);
    let lines = tokio::time::timeout(Duration::from_secs(10), s.run("kept"))
        .await
        .expect("context still busy after its client left");
    assert_eq!(main_text(&lines), Some("yes"), "interrupted, state kept");
    s.stop().await;
}

#[tokio::test]
async fn a_cell_that_ignores_interrupts_loses_its_worker() {
    let s = Server::start().await;
    s.run("kept = 'yes'").await;
    let code = "import time\nprint('started', flush=True)\nwhile True:\n    try:\n        time.sleep(0.05)\n    except KeyboardInterrupt:\n        pass";
    let mut res = s.post_execute(json!({"code": code})).await;
    read_until(&mut res, "started").await;
    drop(res);
    // Interrupt grace is 2 s in tests; then the worker is killed and a new one starts.
    let lines = tokio::time::timeout(Duration::from_secs(15), s.run("'kept' in globals()"))
        .await
        .expect("context wedged");
    assert_eq!(main_text(&lines), Some("False"));
    s.stop().await;
}

#[tokio::test]
async fn a_worker_that_dies_is_replaced() {
    let s = Server::start().await;
    s.run("x = 1").await;
    let lines = s.run("import os; os._exit(3)").await;
    let e = of_type(&lines, "error")[0];
    assert_eq!(e["name"], "ContextRestarting");
    assert!(
        e["traceback"].as_str().unwrap().contains("exit status: 3"),
        "{e}"
    );
    let lines = s.run("'x' in globals()").await;
    assert_eq!(main_text(&lines), Some("False"));
    assert_eq!(lines[0]["execution_count"], 1);
    // Killed while idle (the OOM killer, say): the next execution just runs on a new one.
    let lines = s.run("import os; os.getpid()").await;
    let pid: i32 = main_text(&lines).unwrap().parse().unwrap();
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = s.run("'fresh'").await;
    assert_eq!(of_type(&lines, "error"), Vec::<&Value>::new(), "{lines:?}");
    assert_eq!(main_text(&lines), Some("fresh"));
    assert_eq!(lines[0]["execution_count"], 1);
    s.stop().await;
}

#[tokio::test]
async fn matplotlib_figures_become_png_results() {
    let Some(py) = support::python_with_matplotlib() else {
        eprintln!("skipped: no python3 with matplotlib (apt-get install python3-matplotlib)");
        return;
    };
    let mut config = test_config();
    config.python = py.into();
    let s = Server::start_with(config).await;
    let lines = s
        .run(
            "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()\nprint('after show')",
        )
        .await;
    assert_eq!(
        kinds(&lines),
        [
            "number_of_executions",
            "result",
            "stdout",
            "end_of_execution"
        ],
        "{lines:?}"
    );
    assert_png(&lines[1]);
    assert_eq!(lines[1]["is_main_result"], false);
    assert_eq!(lines[1]["text"], "<Figure size 640x480 with 1 Axes>");
    // Without show(): the open figure comes after the cell, after its value.
    let lines = s.run("plt.figure(); plt.bar([1], [2]); 'v'").await;
    let results = of_type(&lines, "result");
    assert_eq!(results.len(), 2, "{lines:?}");
    assert_eq!(results[0]["text"], "v");
    assert_png(results[1]);
    // A figure as the cell's value is its main result, shown once.
    let lines = s
        .run("fig, ax = plt.subplots(); ax.plot([3, 1]); fig")
        .await;
    let results = of_type(&lines, "result");
    assert_eq!(results.len(), 1, "{lines:?}");
    assert_eq!(results[0]["is_main_result"], true);
    assert_png(results[0]);
    s.stop().await;
}

#[tokio::test]
async fn ipython_display_sends_results_when_installed() {
    if !support::python_has(&support::python(), "IPython") {
        eprintln!("skipped: python3 has no IPython");
        return;
    }
    let s = Server::start().await;
    let code = "from IPython.display import display, HTML, Markdown\ndisplay(HTML('<b>x</b>'))\nMarkdown('# t')";
    let lines = s.run(code).await;
    let results = of_type(&lines, "result");
    assert_eq!(results.len(), 2, "{lines:?}");
    assert_eq!(results[0]["html"], "<b>x</b>");
    assert_eq!(results[0]["is_main_result"], false);
    assert_eq!(results[1]["markdown"], "# t");
    assert_eq!(results[1]["is_main_result"], true);
    s.stop().await;
}

#[tokio::test]
async fn cors_is_open() {
    let s = Server::start().await;
    let res = s
        .client
        .request(reqwest::Method::OPTIONS, s.url("/execute"))
        .header("Origin", "https://app.example")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "content-type,x-access-token",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let h = res.headers();
    assert_eq!(h["access-control-allow-origin"], "*");
    assert_eq!(
        h["access-control-allow-headers"],
        "content-type,x-access-token"
    );
    let res = s.client.get(s.url("/health")).send().await.unwrap();
    assert_eq!(res.headers()["access-control-allow-origin"], "*");
    s.stop().await;
}

fn assert_png(result: &Value) {
    let png = result["png"]
        .as_str()
        .unwrap_or_else(|| panic!("no png: {result}"));
    // Base64 of the PNG signature.
    assert!(
        png.starts_with("iVBORw0KGgo"),
        "{}",
        &png[..png.len().min(40)]
    );
}

async fn read_until(res: &mut reqwest::Response, needle: &str) {
    let mut seen = String::new();
    while !seen.contains(needle) {
        let chunk = tokio::time::timeout(Duration::from_secs(10), res.chunk())
            .await
            .expect("no output")
            .unwrap()
            .expect("stream ended");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
}

async fn default_id(s: &Server) -> String {
    let list: Vec<Value> = s
        .client
        .get(s.url("/contexts"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    list[0]["id"].as_str().unwrap().to_owned()
}

fn tempdir() -> String {
    let dir = std::env::temp_dir().join(format!("wrenn-interp-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.canonicalize().unwrap().display().to_string()
}
