//! Test support: a server on a loopback port with the host's Python, and helpers that
//! speak to it as the SDKs do.

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use serde_json::{Value, json};
use wrenn_interpreter::Config;

/// The Python the workers run: `WRENN_TEST_INTERPRETER_PYTHON`, else `python3`.
pub fn python() -> String {
    std::env::var("WRENN_TEST_INTERPRETER_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Whether `python` can import `module`.
pub fn python_has(python: &str, module: &str) -> bool {
    std::process::Command::new(python)
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A Python with matplotlib for the workers: [`python`], else Debian's `/usr/bin/python3`
/// (`apt-get install python3-matplotlib`).
pub fn python_with_matplotlib() -> Option<String> {
    [python(), "/usr/bin/python3".into()]
        .into_iter()
        .find(|p| python_has(p, "matplotlib"))
}

pub struct Server {
    pub base: String,
    pub client: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// The configuration tests start from: the host's Python, no envd, short timers.
pub fn test_config() -> Config {
    let mut config = Config::defaults();
    config.python = python().into();
    config.default_cwd = std::env::temp_dir();
    config.envd_url = String::new();
    config.keepalive = Duration::from_millis(300);
    config.interrupt_grace = Duration::from_secs(2);
    config
}

impl Server {
    pub async fn start() -> Server {
        Server::start_with(test_config()).await
    }

    /// Starts the server and waits for `/health` (the default context is up by then).
    pub async fn start_with(config: Config) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let stop = async move {
                let _ = stopped.await;
            };
            wrenn_interpreter::serve(listener, config, stop)
                .await
                .unwrap();
        });
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        for _ in 0..200 {
            if let Ok(r) = client.get(format!("{base}/health")).send().await {
                assert_eq!(r.status(), 200);
                return Server {
                    base,
                    client,
                    stop: Some(stop),
                    task: Some(task),
                };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server at {base} never healthy");
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `POST /execute` with `body`; the response.
    pub async fn post_execute(&self, body: Value) -> reqwest::Response {
        self.client
            .post(self.url("/execute"))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// `POST /execute` in the background; the whole body once it ends.
    pub fn spawn_execute(&self, body: Value) -> tokio::task::JoinHandle<String> {
        let req = self.client.post(self.url("/execute")).json(&body);
        tokio::spawn(async move { req.send().await.unwrap().text().await.unwrap() })
    }

    /// Runs `body` to the end; every line but keepalives, parsed.
    pub async fn execute(&self, body: Value) -> Vec<Value> {
        let res = self.post_execute(body).await;
        assert_eq!(res.status(), 200);
        let text = res.text().await.unwrap();
        assert!(text.is_ascii(), "{text}");
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .filter(|v: &Value| v["type"] != "keepalive")
            .collect();
        assert_eq!(
            lines.last(),
            Some(&json!({"type": "end_of_execution"})),
            "{text}"
        );
        lines
    }

    /// Runs `code` in the default context.
    pub async fn run(&self, code: &str) -> Vec<Value> {
        self.execute(json!({"code": code})).await
    }

    /// Runs `code` in context `id`.
    pub async fn run_in(&self, id: &str, code: &str) -> Vec<Value> {
        self.execute(json!({"code": code, "context_id": id})).await
    }

    /// `POST /contexts`; the new context's id.
    pub async fn create_context(&self, body: Value) -> Value {
        let res = self
            .client
            .post(self.url("/contexts"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        res.json().await.unwrap()
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("server did not stop")
                .unwrap();
        }
    }
}

/// The main result's text.
pub fn main_text(lines: &[Value]) -> Option<&str> {
    lines
        .iter()
        .find(|l| l["type"] == "result" && l["is_main_result"] == true)
        .and_then(|l| l["text"].as_str())
}

/// The lines of one type.
pub fn of_type<'a>(lines: &'a [Value], ty: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["type"] == ty).collect()
}

/// The stdout text, joined.
pub fn stdout(lines: &[Value]) -> String {
    of_type(lines, "stdout")
        .iter()
        .filter_map(|l| l["text"].as_str())
        .collect()
}

/// The lines' types in order, runs of stdout or stderr as one (how output is cut into
/// chunks depends on timing).
pub fn kinds(lines: &[Value]) -> Vec<&str> {
    let mut kinds: Vec<&str> = Vec::new();
    for ty in lines.iter().filter_map(|l| l["type"].as_str()) {
        let stream = ty == "stdout" || ty == "stderr";
        if !(stream && kinds.last() == Some(&ty)) {
            kinds.push(ty);
        }
    }
    kinds
}
