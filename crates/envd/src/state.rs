//! The shared state of one running envd.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock, RwLock};

use crate::config::Config;
use crate::error::EnvdError;
use crate::user::User;

/// Defaults that `/init` may change.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// The OS user for requests that name none.
    pub user: String,
    /// Where an empty path points; `None`: the user's home.
    pub workdir: Option<PathBuf>,
}

/// Identity the host publishes through the metadata service.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub sandbox_id: Option<String>,
    pub template_id: Option<String>,
    /// Lowercase hex SHA-512 of the access token `/init` may set.
    pub access_token_hash: Option<String>,
}

/// Everything the handlers share. One per envd; handlers hold it in an `Arc`.
pub struct Envd {
    pub config: Config,
    defaults: RwLock<Defaults>,
    env_vars: RwLock<HashMap<String, String>>,
    access_token: RwLock<Option<String>>,
    identity: RwLock<Identity>,
    /// The address the server actually bound (the port may have been 0).
    pub local_addr: OnceLock<SocketAddr>,
    pub processes: crate::process::Processes,
    pub watchers: crate::filesystem::Watchers,
    pub ports: crate::ports::PortForwarder,
    pub cgroups: crate::cgroups::Cgroups,
    pub connections: crate::server::Connections,
    pub lifecycle: crate::lifecycle::Lifecycle,
}

impl Envd {
    /// Builds the state and starts the background subsystems (cgroups, port forwarder).
    pub async fn start(config: Config) -> Result<Arc<Self>, EnvdError> {
        let cgroups = crate::cgroups::Cgroups::setup(&config);
        let envd = Arc::new(Envd {
            defaults: RwLock::new(Defaults {
                user: config.default_user.clone(),
                workdir: config.default_workdir.clone(),
            }),
            env_vars: RwLock::new(HashMap::new()),
            access_token: RwLock::new(config.access_token.clone()),
            identity: RwLock::new(Identity {
                access_token_hash: config.access_token_hash.clone(),
                ..Identity::default()
            }),
            local_addr: OnceLock::new(),
            processes: crate::process::Processes::default(),
            watchers: crate::filesystem::Watchers::default(),
            ports: crate::ports::PortForwarder::new(&config),
            cgroups,
            connections: crate::server::Connections::default(),
            lifecycle: crate::lifecycle::Lifecycle::default(),
            config,
        });
        Ok(envd)
    }

    pub fn defaults(&self) -> Defaults {
        self.defaults.read().expect("defaults lock").clone()
    }

    pub fn set_defaults(&self, user: Option<String>, workdir: Option<PathBuf>) {
        let mut d = self.defaults.write().expect("defaults lock");
        if let Some(u) = user {
            d.user = u;
        }
        if let Some(w) = workdir {
            d.workdir = Some(w);
        }
    }

    /// The user a request acts as: the Basic-auth name if given, else the default user.
    pub fn user(&self, requested: Option<&str>) -> Result<User, EnvdError> {
        let name = match requested {
            Some(n) if !n.is_empty() => n.to_owned(),
            _ => self.defaults().user,
        };
        User::lookup(&name)
    }

    pub fn access_token(&self) -> Option<String> {
        self.access_token.read().expect("token lock").clone()
    }

    pub fn set_access_token(&self, token: Option<String>) {
        *self.access_token.write().expect("token lock") = token.filter(|t| !t.is_empty());
    }

    pub fn identity(&self) -> Identity {
        self.identity.read().expect("identity lock").clone()
    }

    pub fn set_identity(&self, identity: Identity) {
        *self.identity.write().expect("identity lock") = identity;
    }

    /// The user environment variables `/init` set (replaced as a whole on each `/init`).
    pub fn env_vars(&self) -> HashMap<String, String> {
        self.env_vars.read().expect("env lock").clone()
    }

    pub fn set_env_vars(&self, vars: HashMap<String, String>) {
        *self.env_vars.write().expect("env lock") = vars;
    }

    /// Variables every process gets after its login variables and before its own:
    /// `E2B_SANDBOX`, `E2B_SANDBOX_ID`, `E2B_TEMPLATE_ID`, then `/init`'s variables.
    pub fn global_env(&self) -> Vec<(String, String)> {
        let id = self.identity();
        let mut out = vec![("E2B_SANDBOX".to_owned(), self.config.in_sandbox.to_string())];
        if let Some(s) = id.sandbox_id {
            out.push(("E2B_SANDBOX_ID".to_owned(), s));
        }
        if let Some(t) = id.template_id {
            out.push(("E2B_TEMPLATE_ID".to_owned(), t));
        }
        let mut vars: Vec<_> = self.env_vars().into_iter().collect();
        vars.sort();
        out.extend(vars);
        out
    }
}
