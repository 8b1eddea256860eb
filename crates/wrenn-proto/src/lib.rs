//! Wire contracts for envd: the `process` and `filesystem` Connect services.
//!
//! Messages are generated at build time from `proto/envd` with prost (binary codec) and
//! pbjson (the proto3 JSON mapping: lowerCamelCase names, enums as names, int64 as strings,
//! bytes as base64, Timestamp as RFC 3339).

#![allow(clippy::all, unreachable_pub, missing_docs)]

/// `package process`.
pub mod process {
    include!(concat!(env!("OUT_DIR"), "/process.rs"));
    include!(concat!(env!("OUT_DIR"), "/process.serde.rs"));
}

/// `package filesystem`.
pub mod filesystem {
    include!(concat!(env!("OUT_DIR"), "/filesystem.rs"));
    include!(concat!(env!("OUT_DIR"), "/filesystem.serde.rs"));
}

pub use pbjson_types::Timestamp;

#[cfg(test)]
mod tests {
    use super::filesystem::{EntryInfo, FileType};
    use super::process::{ProcessEvent, StartRequest, process_event};

    #[test]
    fn json_mapping_matches_connect_clients() {
        let entry = EntryInfo {
            name: "a".into(),
            r#type: FileType::File as i32,
            size: 123,
            symlink_target: Some("/x".into()),
            ..Default::default()
        };
        let json = serde_json::to_value(&entry).unwrap();
        assert_eq!(json["type"], "FILE_TYPE_FILE");
        assert_eq!(json["size"], "123");
        assert_eq!(json["symlinkTarget"], "/x");
        assert!(
            json.get("mode").is_none(),
            "zero values are omitted: {json}"
        );

        let end = ProcessEvent {
            event: Some(process_event::Event::End(process_event::EndEvent {
                exit_code: -1,
                exited: false,
                status: "signal: killed".into(),
                error: None,
            })),
        };
        let json = serde_json::to_value(&end).unwrap();
        assert_eq!(json["end"]["exitCode"], -1);

        let req: StartRequest = serde_json::from_str(
            r#"{"process":{"cmd":"/bin/bash","args":["-l","-c","echo hi"],"envs":{"X":"1"}},"stdin":false,"unknownField":1}"#,
        )
        .unwrap();
        assert_eq!(req.stdin, Some(false));
        assert_eq!(req.process.unwrap().envs["X"], "1");
    }
}
