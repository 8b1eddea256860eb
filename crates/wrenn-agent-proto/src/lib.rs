//! Wire contract between the control plane and host agents: the `wrenn.agent.v1.AgentService`
//! Connect service from `proto/agent/v1/agent.proto`.
//!
//! Messages are generated at build time with prost (binary codec) and pbjson (proto3 JSON).
//! [`paths`] has the procedure paths, shared by the agent's server and the control plane's
//! client so they cannot drift apart.

#![allow(clippy::all, unreachable_pub, missing_docs)]

/// `package wrenn.agent.v1`.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/wrenn.agent.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/wrenn.agent.v1.serde.rs"));
}

/// Connect procedure paths of `AgentService`.
pub mod paths {
    pub const CREATE: &str = "/wrenn.agent.v1.AgentService/Create";
    pub const LIST: &str = "/wrenn.agent.v1.AgentService/List";
    pub const KILL: &str = "/wrenn.agent.v1.AgentService/Kill";
    pub const PAUSE: &str = "/wrenn.agent.v1.AgentService/Pause";
    pub const RESUME: &str = "/wrenn.agent.v1.AgentService/Resume";
    pub const SET_TIMEOUT: &str = "/wrenn.agent.v1.AgentService/SetTimeout";
    pub const UPDATE_NETWORK: &str = "/wrenn.agent.v1.AgentService/UpdateNetwork";
    pub const METRICS: &str = "/wrenn.agent.v1.AgentService/Metrics";
    pub const LOGS: &str = "/wrenn.agent.v1.AgentService/Logs";
    pub const SNAPSHOT: &str = "/wrenn.agent.v1.AgentService/Snapshot";
    pub const DELETE_SNAPSHOT: &str = "/wrenn.agent.v1.AgentService/DeleteSnapshot";
    pub const HOST_INFO: &str = "/wrenn.agent.v1.AgentService/HostInfo";
    pub const BUILD_TEMPLATE: &str = "/wrenn.agent.v1.AgentService/BuildTemplate";
    pub const RELEASE_TEMPLATE: &str = "/wrenn.agent.v1.AgentService/ReleaseTemplate";
}

#[cfg(test)]
mod tests {
    use super::v1::*;

    #[test]
    fn json_mapping() {
        let spec = SandboxSpec {
            sandbox_id: "abc".into(),
            memory_mb: 512,
            end_unix_ms: 1_700_000_000_000,
            auto_pause: true,
            ..Default::default()
        };
        let v = serde_json::to_value(&CreateRequest {
            sandbox: Some(spec),
        })
        .unwrap();
        assert_eq!(v["sandbox"]["sandboxId"], "abc");
        // int64/uint64 travel as strings in proto3 JSON.
        assert_eq!(v["sandbox"]["memoryMb"], "512");
        assert_eq!(v["sandbox"]["endUnixMs"], "1700000000000");
        assert_eq!(v["sandbox"]["autoPause"], true);
        let st: SandboxStatus = serde_json::from_str(
            r#"{"sandboxId":"x","state":"SANDBOX_STATE_PAUSED","newField":1}"#,
        )
        .unwrap();
        assert_eq!(st.state(), SandboxState::Paused);
    }
}
