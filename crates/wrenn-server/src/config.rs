//! The control plane's settings, built once by the binary before anything starts.

use std::time::Duration;

use wrenn_core::Deadline;

/// The envd version of this workspace's envd (`envd::ENVD_VERSION`), for templates whose
/// record has none. The control plane does not depend on the envd crate, hence the copy.
pub const DEFAULT_ENVD_VERSION: &str = "0.6.4";

#[derive(Debug, Clone)]
pub struct Config {
    /// `postgres://...`, `sqlite://PATH` or a plain SQLite file path.
    pub database_url: String,
    /// Key of the envd access-token HMAC. Changing it invalidates every live token.
    pub secret: Vec<u8>,
    /// Token for the `/admin` routes (`X-Admin-Token`); `None` disables them.
    pub admin_token: Option<String>,
    /// Domain of `<port>-<sandboxID>.<domain>` host names, routed by the edge proxy and
    /// returned as `domain` to the SDKs. `None`: the SDKs use their own `E2B_DOMAIN`.
    pub domain: Option<String>,
    /// Timeout rules (maximum timeout).
    pub deadline: Deadline,
    /// The agent's backstop deadline is the sandbox's end plus this.
    pub backstop_grace_secs: i64,
    /// How often the reaper looks for expired sandboxes.
    pub reaper_interval: Duration,
    /// How often every host's records are reconciled with what its agent holds.
    pub reconcile_interval: Duration,
    /// How long a record may stay `creating`, `pausing` or `resuming` before the reconciler
    /// settles it from what the agent reports. Longer than the slowest agent call (create,
    /// 120 s), so it never settles a record whose operation is still waiting for its answer.
    pub settle_grace: Duration,
    /// How long a create with an idempotency key waits for an earlier create with the same key
    /// to finish before it answers 409.
    pub idempotency_wait: Duration,
    /// Envd version reported for sandboxes whose template record has none.
    pub default_envd_version: String,
    /// Where uploaded build-context archives are kept (`None`: builds with `COPY` steps are
    /// refused).
    pub build_files: Option<std::path::PathBuf>,
    /// The URL this API is reached at, for the upload links the SDKs get and the download links
    /// agents get. `None`: the request's `Host`.
    pub api_url: Option<String>,
    /// The token agents on other machines join with (`POST /hosts/join`); `None`: no joins.
    pub join_token: Option<String>,
    /// How often joined agents send heartbeats (told to each at its join).
    pub heartbeat_interval: Duration,
    /// A joined host silent this long is unhealthy: nothing new is placed on it.
    pub host_unhealthy_after: Duration,
    /// A joined host silent this long is lost: its running sandboxes are written off.
    pub host_lost_after: Duration,
    /// How long one control plane owns a timed-out sandbox it is stopping before another may
    /// take it over (longer than a pause takes).
    pub expire_lease: Duration,
    /// Placement weighs this many random hosts among those that fit (the best of them wins),
    /// so replicas placing at once do not all pick the same emptiest host.
    pub placement_candidates: usize,
}

impl Config {
    /// Defaults for everything but the database, the secret and the admin token.
    pub fn new(database_url: impl Into<String>, secret: Vec<u8>) -> Self {
        Config {
            database_url: database_url.into(),
            secret,
            admin_token: None,
            domain: None,
            deadline: Deadline::default(),
            backstop_grace_secs: 60,
            reaper_interval: Duration::from_secs(1),
            reconcile_interval: Duration::from_secs(30),
            settle_grace: Duration::from_secs(180),
            idempotency_wait: Duration::from_secs(120),
            default_envd_version: DEFAULT_ENVD_VERSION.to_owned(),
            build_files: None,
            api_url: None,
            join_token: None,
            heartbeat_interval: Duration::from_secs(5),
            host_unhealthy_after: Duration::from_secs(15),
            host_lost_after: Duration::from_secs(60),
            expire_lease: Duration::from_secs(60),
            placement_candidates: 2,
        }
    }
}
