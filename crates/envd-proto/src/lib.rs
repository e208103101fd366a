//! Protobuf types of envd's Connect services, `process.Process` and
//! `filesystem.Filesystem`, with serde implementations that follow the protobuf JSON
//! mapping (the E2B Python SDK calls envd with the JSON codec).

/// Types of the `process` package.
#[allow(clippy::all, missing_docs)]
pub mod process {
    include!(concat!(env!("OUT_DIR"), "/process.rs"));
    include!(concat!(env!("OUT_DIR"), "/process.serde.rs"));
}

/// Types of the `filesystem` package.
#[allow(clippy::all, missing_docs)]
pub mod filesystem {
    include!(concat!(env!("OUT_DIR"), "/filesystem.rs"));
    include!(concat!(env!("OUT_DIR"), "/filesystem.serde.rs"));
}

pub use pbjson_types::Timestamp;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_event_json_uses_camel_case() {
        let event = process::ProcessEvent {
            event: Some(process::process_event::Event::End(
                process::process_event::EndEvent {
                    exit_code: 3,
                    exited: true,
                    status: "exit status 3".into(),
                    error: None,
                },
            )),
        };
        let json = serde_json::to_string(&event).unwrap();
        assert_eq!(
            json,
            r#"{"end":{"exitCode":3,"exited":true,"status":"exit status 3"}}"#
        );
    }

    #[test]
    fn data_event_json_is_base64() {
        let event = process::process_event::DataEvent {
            output: Some(process::process_event::data_event::Output::Stdout(
                vec![0xff, 0x00].into(),
            )),
        };
        let json = serde_json::to_string(&event).unwrap();
        assert_eq!(json, r#"{"stdout":"/wA="}"#);
    }

    #[test]
    fn entry_info_json_round_trip() {
        let json = r#"{"name":"a","type":"FILE_TYPE_FILE","size":"12","modifiedTime":"2024-01-02T03:04:05Z","unknownField":1}"#;
        let entry: filesystem::EntryInfo = serde_json::from_str(json).unwrap();
        assert_eq!(entry.size, 12);
        assert_eq!(entry.r#type(), filesystem::FileType::File);
        assert_eq!(entry.modified_time.unwrap().seconds, 1704164645);
    }
}
