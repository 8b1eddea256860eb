//! Sandbox, snapshot, fork, metrics and error bodies.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Every error body: the SDKs parse `code` (an integer) and `message`, and crash on anything
/// else (`KeyError`/`JSONDecodeError` in Python).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Error {
    pub code: u16,
    pub message: String,
}

/// `POST /v2/sandboxes` and `POST /sandboxes`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Seconds; omitted by v2 SDKs when the caller gave none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_pause: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_pause_memory: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_resume: Option<AutoResume>,
    /// Sent by SDKs up to 2.50; every sandbox gets an access token regardless.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure: Option<bool>,
    /// Snake case on the wire, unlike every other field.
    #[serde(
        default,
        rename = "allow_internet_access",
        skip_serializing_if = "Option::is_none"
    )]
    pub allow_internet_access: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<HashMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_vars: Option<HashMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkConfig>,
}

/// `network` of a create request, and of `GET /sandboxes/{id}` (the SDK's
/// `SandboxNetworkConfig`). `allowOut`/`denyOut` hold IPv4 addresses, CIDR blocks and domain
/// names; an allow wins over a deny.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfig {
    /// `false`: the sandbox's ports answer only requests with its traffic access token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_public_traffic: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_out: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_out: Option<Vec<String>>,
    /// Accepted and reported back; every guest DNS query goes to the host's resolver anyway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_servers: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_request_host: Option<String>,
    /// Not supported: a request that sets it is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https_ports: Option<Vec<u16>>,
    /// Per-host header transforms. Not supported: a request with rules is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<serde_json::Value>,
    /// Tunneling through a proxy. Not supported: a request that sets it is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_proxy: Option<serde_json::Value>,
}

/// `PUT /sandboxes/{id}/network`: replaces the egress rules as a whole (omitted lists are
/// cleared).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_out: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_out: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_servers: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_proxy: Option<serde_json::Value>,
    /// Snake case on the wire, as in create.
    #[serde(
        default,
        rename = "allow_internet_access",
        skip_serializing_if = "Option::is_none"
    )]
    pub allow_internet_access: Option<bool>,
}

/// `autoResume` of a create: whether traffic to the sandbox while it is paused resumes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoResume {
    #[serde(default)]
    pub enabled: bool,
}

/// Create, connect and resume responses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    pub envd_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// Always present: the SDKs sign `/files` URLs with it, and the edge proxy finds the
    /// sandbox of a signed URL by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_access_token: Option<String>,
    /// `None`: the SDK uses its own `E2B_DOMAIN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// `lifecycle` of `GET /sandboxes/{id}`: what happens when the timeout expires, and whether
/// traffic wakes the sandbox while it is paused. The Python SDK requires both keys and raises
/// on an `onTimeout` other than these two.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lifecycle {
    pub auto_resume: bool,
    /// `"kill"` or `"pause"`.
    pub on_timeout: String,
}

/// `GET /sandboxes/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxDetail {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub end_at: OffsetDateTime,
    pub envd_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_internet_access: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<HashMap<String, String>>,
    /// `running` or `paused`; the Python SDK raises on anything else.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<Lifecycle>,
    /// How a paused sandbox was paused: `full` (memory and files) or `filesystem`; only for
    /// a sandbox whose pause has finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkConfig>,
}

/// One element of `GET /v2/sandboxes` and `GET /sandboxes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListedSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub end_at: OffsetDateTime,
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<HashMap<String, String>>,
    pub state: String,
    pub envd_version: String,
}

/// `POST /v2/sandboxes/{id}/connect` and `POST /sandboxes/{id}/connect`. v1 SDKs always send a
/// timeout, v2 SDKs only when given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectSandbox {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
    /// `false` asks for a reboot instead of a memory restore (`on_resume="reboot"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<bool>,
}

/// `POST /sandboxes/{id}/resume` (deprecated upstream, still served).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResumedSandbox {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_pause: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<bool>,
}

/// `POST /sandboxes/{id}/timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxTimeout {
    pub timeout: i64,
}

/// `POST /sandboxes/{id}/refreshes`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshSandbox {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<i64>,
}

/// `POST /sandboxes/{id}/pause`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PauseSandbox {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_healthy_guest: Option<bool>,
}

/// `GET /sandboxes/{id}/metrics`: every field is required by the Python SDK, `memCache` too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxMetric {
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: OffsetDateTime,
    pub timestamp_unix: i64,
    pub cpu_count: u32,
    pub cpu_used_pct: f64,
    pub mem_used: u64,
    pub mem_total: u64,
    pub mem_cache: u64,
    pub disk_used: u64,
    pub disk_total: u64,
}

/// `GET /sandboxes/{id}/logs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxLogs {
    pub logs: Vec<SandboxLog>,
    pub log_entries: Vec<SandboxLogEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxLog {
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: OffsetDateTime,
    pub line: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxLogEntry {
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: OffsetDateTime,
    pub message: String,
    /// `debug`, `info`, `warn` or `error`.
    pub level: String,
    #[serde(default)]
    pub fields: HashMap<String, String>,
}

/// `POST /sandboxes/{id}/snapshots`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewSnapshot {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<bool>,
}

/// `GET /templates/aliases/{alias}`: the template a name refers to (`Template.exists`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateAlias {
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Whether every team may use it.
    pub public: bool,
}

/// A snapshot; its ID works as a template ID in `Sandbox.create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// With its tag (`<id>:default`), or its namespaced name when it has one
    /// (`<team>/<name>:default`).
    #[serde(rename = "snapshotID")]
    pub snapshot_id: String,
    /// Full names (namespace and tag); the SDKs require the key, empty for an unnamed one.
    pub names: Vec<String>,
}

/// `POST /sandboxes/{id}/fork`. Both fields are integers on the wire; they are taken as
/// `i64` so that a count out of range is the server's 400 with a message, not a parse error
/// (the JS SDK sends whatever it was given).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkSandbox {
    /// How many forks (1 to 20; default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<i64>,
    /// Each fork's timeout in seconds (default: a create's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
}

/// One entry of a fork's answer: exactly one of the two is set. The SDKs look at `error`
/// first and turn it into an exception in the returned list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<Sandbox>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Error>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn new_sandbox_as_the_python_sdk_sends_it() {
        let body = json!({
            "templateID": "base", "timeout": 120, "metadata": {"k": "v"}, "envVars": {"FOO": "bar"},
            "autoPause": true, "allow_internet_access": false, "secure": true,
            "volumeMounts": [], "mcp": null, "someFutureField": {"x": 1}
        });
        let s: NewSandbox = serde_json::from_value(body).unwrap();
        assert_eq!(s.template_id, "base");
        assert_eq!(s.timeout, Some(120));
        assert_eq!(s.auto_pause, Some(true));
        assert_eq!(s.allow_internet_access, Some(false));
        assert_eq!(s.metadata.unwrap()["k"], "v");
        assert_eq!(s.env_vars.unwrap()["FOO"], "bar");

        // The lifecycle keys, as `lifecycle={"on_timeout": {"action": "pause", "mode": "full"},
        // "auto_resume": True}` sends them.
        let l: NewSandbox = serde_json::from_value(json!({
            "templateID": "base", "autoPause": true, "autoPauseMemory": true,
            "autoResume": {"enabled": true}
        }))
        .unwrap();
        assert_eq!(
            (l.auto_pause, l.auto_pause_memory, l.auto_resume),
            (Some(true), Some(true), Some(AutoResume { enabled: true }))
        );

        let minimal: NewSandbox = serde_json::from_value(json!({"templateID": "base"})).unwrap();
        assert_eq!(minimal.timeout, None);
        assert!(serde_json::from_value::<NewSandbox>(json!({"timeout": 1})).is_err());
        let round = serde_json::to_value(NewSandbox {
            allow_internet_access: Some(true),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            round,
            json!({"templateID": "", "allow_internet_access": true})
        );
    }

    #[test]
    fn responses_use_the_sdk_field_names() {
        let s = Sandbox {
            template_id: "base".into(),
            sandbox_id: "abc".into(),
            client_id: crate::CLIENT_ID.into(),
            envd_version: "0.6.4".into(),
            alias: None,
            envd_access_token: Some("tok".into()),
            traffic_access_token: None,
            domain: None,
        };
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            json!({"templateID": "base", "sandboxID": "abc", "clientID": "6532622b",
                   "envdVersion": "0.6.4", "envdAccessToken": "tok"})
        );
        let t = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let d = SandboxDetail {
            template_id: "base".into(),
            alias: None,
            sandbox_id: "abc".into(),
            client_id: crate::CLIENT_ID.into(),
            started_at: t,
            end_at: t,
            envd_version: "0.6.4".into(),
            envd_access_token: None,
            allow_internet_access: Some(true),
            domain: None,
            cpu_count: 2,
            memory_mb: 512,
            disk_size_mb: 1024,
            metadata: Some(HashMap::new()),
            state: "running".into(),
            lifecycle: Some(Lifecycle {
                auto_resume: false,
                on_timeout: "kill".into(),
            }),
            pause_mode: None,
            network: Some(NetworkConfig {
                allow_out: Some(vec!["a.test".into()]),
                ..Default::default()
            }),
        };
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["network"], json!({"allowOut": ["a.test"]}));
        assert_eq!(v["startedAt"], "2023-11-14T22:13:20Z");
        assert_eq!(v["memoryMB"], 512);
        assert_eq!(v["diskSizeMB"], 1024);
        assert_eq!(v["cpuCount"], 2);
        assert_eq!(v["allowInternetAccess"], true);
        assert_eq!(
            v["lifecycle"],
            json!({"autoResume": false, "onTimeout": "kill"})
        );
        assert!(v.get("pauseMode").is_none(), "{v}");
        let paused = SandboxDetail {
            state: "paused".into(),
            pause_mode: Some("full".into()),
            ..d.clone()
        };
        assert_eq!(serde_json::to_value(&paused).unwrap()["pauseMode"], "full");
        let m = SandboxMetric {
            timestamp: t,
            timestamp_unix: 1_700_000_000,
            cpu_count: 2,
            cpu_used_pct: 1.5,
            mem_used: 1,
            mem_total: 2,
            mem_cache: 0,
            disk_used: 3,
            disk_total: 4,
        };
        let v = serde_json::to_value(&m).unwrap();
        for k in [
            "timestamp",
            "timestampUnix",
            "cpuCount",
            "cpuUsedPct",
            "memUsed",
            "memTotal",
            "memCache",
            "diskUsed",
            "diskTotal",
        ] {
            assert!(v.get(k).is_some(), "{k} missing in {v}");
        }
        let snap = SnapshotInfo {
            snapshot_id: "s".into(),
            names: vec!["t/s:default".into()],
        };
        assert_eq!(
            serde_json::to_value(&snap).unwrap(),
            json!({"snapshotID": "s", "names": ["t/s:default"]})
        );
    }

    #[test]
    fn fork_bodies() {
        let f: ForkSandbox = serde_json::from_value(json!({})).unwrap();
        assert_eq!(f, ForkSandbox::default());
        let f: ForkSandbox = serde_json::from_value(json!({"count": 0, "timeout": 60})).unwrap();
        assert_eq!((f.count, f.timeout), (Some(0), Some(60)));
        let ok = ForkResult {
            sandbox: Some(Sandbox {
                template_id: "base".into(),
                sandbox_id: "abc".into(),
                client_id: crate::CLIENT_ID.into(),
                envd_version: "0.6.4".into(),
                alias: None,
                envd_access_token: Some("tok".into()),
                traffic_access_token: None,
                domain: Some("wrenn.test".into()),
            }),
            error: None,
        };
        assert_eq!(
            serde_json::to_value(&ok).unwrap(),
            json!({"sandbox": {"templateID": "base", "sandboxID": "abc", "clientID": "6532622b",
                   "envdVersion": "0.6.4", "envdAccessToken": "tok", "domain": "wrenn.test"}})
        );
        let failed = ForkResult {
            sandbox: None,
            error: Some(Error {
                code: 503,
                message: "busy".into(),
            }),
        };
        assert_eq!(
            serde_json::to_value(&failed).unwrap(),
            json!({"error": {"code": 503, "message": "busy"}})
        );
    }

    #[test]
    fn small_bodies() {
        let c: ConnectSandbox = serde_json::from_value(json!({})).unwrap();
        assert_eq!(c, ConnectSandbox::default());
        let t: SandboxTimeout = serde_json::from_value(json!({"timeout": 30})).unwrap();
        assert_eq!(t.timeout, 30);
        assert!(serde_json::from_value::<SandboxTimeout>(json!({})).is_err());
        let p: PauseSandbox = serde_json::from_value(json!({"requireHealthyGuest": true})).unwrap();
        assert_eq!(p.require_healthy_guest, Some(true));
        let e = Error {
            code: 404,
            message: "nope".into(),
        };
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            json!({"code": 404, "message": "nope"})
        );
    }
}
