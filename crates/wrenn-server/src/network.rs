//! A sandbox's network settings: validating what the client sent (`network` and
//! `allow_internet_access` of a create, the body of `PUT /sandboxes/{id}/network`) and
//! replacing a sandbox's egress policy.
//!
//! The control plane only checks and stores the lists; the host agent enforces them (its
//! slot firewall, resolver and filtering proxy). What the platform does not do is refused,
//! not ignored: a header transform, a tunnel through a proxy or HTTPS ports that silently
//! did nothing would leave a sandbox with different egress than its owner asked for.

use std::net::Ipv4Addr;

use wrenn_agent_proto::v1 as agent;
use wrenn_api::{NetworkConfig, NetworkUpdate};
use wrenn_core::{EgressPolicy, SandboxState};

use crate::error::ApiError;
use crate::service::ControlPlane;
use crate::store::TeamRecord;

/// Most `dnsServers` entries, as E2B allows.
const MAX_DNS_SERVERS: usize = 10;

/// Checks a create's network settings and returns them as stored (lists normalized: CIDR
/// host bits cleared, repeats dropped, names lowercase).
pub(crate) fn validate(
    allow_internet_access: Option<bool>,
    network: Option<&NetworkConfig>,
) -> Result<Option<NetworkConfig>, ApiError> {
    let Some(net) = network else {
        return Ok(None);
    };
    refuse_unsupported(net.rules.as_ref(), net.egress_proxy.as_ref())?;
    if net.https_ports.as_ref().is_some_and(|p| !p.is_empty()) {
        return Err(bad("network.httpsPorts is not supported by this platform"));
    }
    if net.mask_request_host.is_some() {
        return Err(bad(
            "network.maskRequestHost is not supported by this platform",
        ));
    }
    let policy = policy_of(
        allow_internet_access,
        net.allow_out.as_deref(),
        net.deny_out.as_deref(),
    )?;
    check_dns_servers(net.dns_servers.as_deref())?;
    Ok(Some(NetworkConfig {
        allow_out: net.allow_out.as_ref().map(|_| policy.allow_out()),
        deny_out: net.deny_out.as_ref().map(|_| policy.deny_out()),
        ..net.clone()
    }))
}

/// The agent's view of a record's egress: internet on unless the client said otherwise, and
/// the stored lists.
pub(crate) fn agent_egress(
    allow_internet_access: Option<bool>,
    network: Option<&NetworkConfig>,
) -> agent::Egress {
    agent::Egress {
        allow_internet_access: allow_internet_access.unwrap_or(true),
        allow_out: network
            .and_then(|n| n.allow_out.clone())
            .unwrap_or_default(),
        deny_out: network.and_then(|n| n.deny_out.clone()).unwrap_or_default(),
    }
}

fn policy_of(
    allow_internet_access: Option<bool>,
    allow_out: Option<&[String]>,
    deny_out: Option<&[String]>,
) -> Result<EgressPolicy, ApiError> {
    EgressPolicy::parse(
        allow_internet_access.unwrap_or(true),
        allow_out.unwrap_or_default(),
        deny_out.unwrap_or_default(),
    )
    .map_err(|e| bad(e.to_string()))
}

fn refuse_unsupported(
    rules: Option<&serde_json::Value>,
    egress_proxy: Option<&serde_json::Value>,
) -> Result<(), ApiError> {
    let has_rules = match rules {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Object(m)) => !m.is_empty(),
        Some(_) => true,
    };
    if has_rules {
        return Err(bad(
            "network.rules (header transforms) is not supported by this platform",
        ));
    }
    if egress_proxy.is_some_and(|p| !p.is_null()) {
        return Err(bad("network.egressProxy is not supported by this platform"));
    }
    Ok(())
}

fn check_dns_servers(servers: Option<&[String]>) -> Result<(), ApiError> {
    let Some(servers) = servers else {
        return Ok(());
    };
    if servers.len() > MAX_DNS_SERVERS {
        return Err(bad(format!(
            "network.dnsServers takes at most {MAX_DNS_SERVERS} addresses"
        )));
    }
    for s in servers {
        if s.parse::<Ipv4Addr>().is_err() {
            return Err(bad(format!(
                "network.dnsServers entry {s:?} is not an IPv4 address"
            )));
        }
    }
    Ok(())
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::BadRequest(message.into())
}

impl ControlPlane {
    /// `PUT /sandboxes/{id}/network`: replaces the egress lists of a running or paused
    /// sandbox as a whole. The agent applies it first (a running sandbox's connections that the
    /// new policy forbids are closed), then the record follows; if the agent refuses, the
    /// record is unchanged.
    #[tracing::instrument(name = "update_network", skip_all, fields(sandbox_id = %id))]
    pub async fn update_network(
        &self,
        team: &TeamRecord,
        id: &str,
        update: NetworkUpdate,
    ) -> Result<(), ApiError> {
        refuse_unsupported(update.rules.as_ref(), update.egress_proxy.as_ref())?;
        check_dns_servers(update.dns_servers.as_deref())?;
        let policy = policy_of(
            update.allow_internet_access,
            update.allow_out.as_deref(),
            update.deny_out.as_deref(),
        )?;
        let rec = self.team_sandbox(&team.id, id).await?;
        let _guard = self.lock(&rec.id).await;
        let rec = self.team_sandbox(&team.id, id).await?;
        if !matches!(rec.state, SandboxState::Running | SandboxState::Paused) {
            return Err(ApiError::sandbox_not_found(id));
        }
        // The settings that are not egress stay as they were.
        let kept = rec.network.clone().unwrap_or_default();
        let network = NetworkConfig {
            allow_out: update.allow_out.as_ref().map(|_| policy.allow_out()),
            deny_out: update.deny_out.as_ref().map(|_| policy.deny_out()),
            dns_servers: update.dns_servers.clone(),
            ..kept
        };
        let (_host, client) = self.host_of(&rec).await?;
        client
            .update_network(agent::UpdateNetworkRequest {
                sandbox_id: rec.id.to_string(),
                egress: Some(agent_egress(update.allow_internet_access, Some(&network))),
            })
            .await
            .map_err(|e| ApiError::agent("replace the sandbox's network policy", e))?;
        if !self
            .store
            .set_network(&rec.id, update.allow_internet_access, &network)
            .await?
        {
            return Err(ApiError::sandbox_not_found(id));
        }
        tracing::info!(sandbox_id = %rec.id, "network policy replaced");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(allow: &[&str], deny: &[&str]) -> NetworkConfig {
        let v = |l: &[&str]| Some(l.iter().map(|s| s.to_string()).collect());
        NetworkConfig {
            allow_out: v(allow),
            deny_out: v(deny),
            ..Default::default()
        }
    }

    #[test]
    fn lists_are_stored_normalized() {
        let got = validate(
            None,
            Some(&net(&["203.0.113.7/24", "A.Test"], &["0.0.0.0/0"])),
        )
        .unwrap()
        .unwrap();
        assert_eq!(got.allow_out.unwrap(), ["203.0.113.0/24", "a.test"]);
        assert_eq!(got.deny_out.unwrap(), ["0.0.0.0/0"]);
        assert_eq!(validate(Some(false), None).unwrap(), None);
    }

    #[test]
    fn bad_and_unsupported_settings_are_refused() {
        let refused = |n: NetworkConfig| {
            assert!(
                matches!(validate(None, Some(&n)), Err(ApiError::BadRequest(_))),
                "{n:?}"
            );
        };
        refused(net(&["not a host"], &[]));
        refused(net(&[], &["2001:db8::/32"]));
        refused(NetworkConfig {
            rules: Some(serde_json::json!({"a.test": [{}]})),
            ..Default::default()
        });
        refused(NetworkConfig {
            egress_proxy: Some(serde_json::json!({"address": "p.test:1080"})),
            ..Default::default()
        });
        refused(NetworkConfig {
            https_ports: Some(vec![3000]),
            ..Default::default()
        });
        refused(NetworkConfig {
            dns_servers: Some(vec!["resolver.test".into()]),
            ..Default::default()
        });
        // An empty rules map is what the SDK sends for none.
        assert!(
            validate(
                None,
                Some(&NetworkConfig {
                    rules: Some(serde_json::json!({})),
                    allow_public_traffic: Some(true),
                    ..Default::default()
                })
            )
            .is_ok()
        );
    }

    #[test]
    fn the_agent_gets_internet_on_unless_refused() {
        let e = agent_egress(None, Some(&net(&["a.test"], &[])));
        assert!(e.allow_internet_access);
        assert_eq!(e.allow_out, ["a.test"]);
        assert!(!agent_egress(Some(false), None).allow_internet_access);
    }
}
