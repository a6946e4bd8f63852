//! Unit tests of the wire protocol: decoding, error codes, serialization of every message.

use super::*;

fn err_code(line: &str) -> ErrorCode {
    match decode_request(line.as_bytes()) {
        Ok(e) => panic!("{line:?} decoded as {e:?}"),
        Err((_, e)) => e.code(),
    }
}

#[test]
fn requests_decode() {
    for (line, want) in [
        (r#"{"cmd":"stats"}"#, Request::Stats),
        (r#"{"cmd":"config","id":7}"#, Request::Config),
        (r#"{"cmd":"pause","protocol":1}"#, Request::Pause),
        (r#" {"id":"x","cmd":"resume"} "#, Request::Resume),
        (r#"{"cmd":"shutdown"}"#, Request::Shutdown),
    ] {
        let env = decode_request(line.as_bytes()).unwrap();
        assert_eq!(env.request, want, "{line}");
    }
    let env = decode_request(br#"{"cmd":"config","id":{"a":[1]}}"#).unwrap();
    assert_eq!(
        env.id.map(|r| r.get().to_string()).as_deref(),
        Some(r#"{"a":[1]}"#)
    );
}

fn raw(text: &str) -> Option<RawId> {
    Some(RawValue::from_string(text.to_string()).unwrap())
}

#[test]
fn duplicate_keys_are_refused() {
    for line in [
        r#"{"cmd":"stats","cmd":"shutdown"}"#,
        r#"{"cmd":"stats","protocol":1,"protocol":1}"#,
        r#"{"id":1,"cmd":"stats","id":2}"#,
    ] {
        let (id, e) = decode_request(line.as_bytes()).unwrap_err();
        assert_eq!(e.code(), ErrorCode::BadRequest, "{line}");
        assert!(e.to_string().contains("duplicate key"), "{e}");
        if line.contains("\"id\":2") {
            assert!(id.is_none());
        }
    }
    let (id, _) = decode_request(br#"{"cmd":"stats","id":9,"cmd":"shutdown"}"#).unwrap_err();
    assert_eq!(id.map(|r| r.get().to_string()).as_deref(), Some("9"));
}

#[test]
fn ids_are_echoed_exactly_as_sent() {
    for id in [
        "18446744073709551616",
        "123456789012345678901234567890",
        "-0.10",
        "1e400",
        r#""a string""#,
        r#"{"nested": [1, {"k": null}]}"#,
    ] {
        let line = format!(r#"{{"cmd":"stats","id":{id}}}"#);
        let env = decode_request(line.as_bytes()).unwrap();
        let reply = to_line(&Reply::ok(env.id, 0)).unwrap();
        let text = String::from_utf8(reply).unwrap();
        assert!(
            text.starts_with(&format!(r#"{{"id":{id},"ok":true"#)),
            "{text}"
        );
    }
}

#[test]
fn bad_requests_get_codes() {
    assert_eq!(err_code("garbage"), ErrorCode::ParseError);
    assert_eq!(err_code("{\"cmd\":"), ErrorCode::ParseError);
    assert_eq!(err_code("[1,2]"), ErrorCode::BadRequest);
    assert_eq!(err_code(r#"{"id":1}"#), ErrorCode::BadRequest);
    assert_eq!(err_code(r#"{"cmd":5}"#), ErrorCode::BadRequest);
    assert_eq!(err_code(r#"{"cmd":"reboot"}"#), ErrorCode::UnknownCommand);
    assert_eq!(
        err_code(r#"{"cmd":"stats","protocol":2}"#),
        ErrorCode::UnsupportedProtocol
    );
    assert_eq!(
        err_code(r#"{"cmd":"stats","protocol":"1"}"#),
        ErrorCode::BadRequest
    );
    assert_eq!(
        err_code(r#"{"cmd":"stats","verbose":true}"#),
        ErrorCode::BadRequest
    );
    // The id survives for the error reply.
    let (id, _) = decode_request(br#"{"cmd":"nope","id":42}"#).unwrap_err();
    assert_eq!(id.map(|r| r.get().to_string()).as_deref(), Some("42"));
}

#[test]
fn every_command_decodes_and_is_named() {
    for name in COMMANDS {
        let line = format!("{{\"cmd\":\"{name}\"}}");
        let env = decode_request(line.as_bytes()).unwrap();
        assert_eq!(env.request.name(), name);
    }
}

#[test]
fn replies_serialize_as_documented() {
    let ok = to_line(&Reply::ok(
        raw("3"),
        StateReply {
            state: VmState::Paused,
            changed: true,
        },
    ))
    .unwrap();
    assert_eq!(
        String::from_utf8(ok).unwrap(),
        "{\"id\":3,\"ok\":true,\"return\":{\"state\":\"paused\",\"changed\":true}}\n"
    );
    let err = to_line(&Reply::error(None, ErrorCode::UnknownCommand, "no")).unwrap();
    assert_eq!(
        String::from_utf8(err).unwrap(),
        "{\"ok\":false,\"error\":{\"code\":\"unknown_command\",\"message\":\"no\"}}\n"
    );
    let back: Incoming =
        serde_json::from_str(r#"{"ok":false,"error":{"code":"something_new","message":"m"}}"#)
            .unwrap();
    assert_eq!(back.error.map(|e| e.code), Some(ErrorCode::Unknown));
}

/// Every field the client's view reads must exist, with the same name, in what the server
/// sends: catches a renamed memconv field.
#[test]
fn stats_view_reads_what_the_server_sends() {
    use memconv::stats::{Counters, SnapshotInputs, StatsSnapshot, StoreUsage};
    use memconv::{Granularity, StoreKind};
    let usage = |kind| StoreUsage {
        kind,
        owned_bytes: 1,
        engine_bound_bytes: 2,
        kernel_bytes: 3,
        kernel_bytes_source: "st_blocks".into(),
        kernel_resident_bytes: 4,
        kernel_resident_method: "seek_data".into(),
    };
    let mut counters = Counters::default();
    counters.latency.record(5000);
    let mut report = memconv::abi::PoolReport::default();
    report.policy[..4].copy_from_slice(b"soak");
    report.policy_len = 4;
    counters.pool_report = Some((&report).into());
    let snapshot = StatsSnapshot::build(
        &mut counters,
        SnapshotInputs {
            ram_bytes: 64 << 20,
            granularity: Granularity::Page4K,
            private_store: usage(StoreKind::Memfd),
            shared_store: usage(StoreKind::Memfd),
            kernel_dbl_bytes: 0,
            mixed_chunks: 0,
            memslots: 1,
            memslot_edits: 1,
            kernel_query_errors: Vec::new(),
            lifecycle: Default::default(),
        },
    );
    let reply = StatsReply {
        protocol: PROTOCOL_VERSION,
        state: VmState::Running,
        uptime_ms: 5,
        age_ms: 0,
        cpus: 1,
        exits: vec![ExitCounts::default()],
        exits_total: 0,
        vcpu_pauses: 0,
        snapshot_us: 0,
        memconv: snapshot.clone(),
        disk: Some(crate::devices::BlkStats {
            io_errors: 3,
            ..Default::default()
        }),
    };
    let sent = serde_json::to_value(&reply).unwrap();
    let view: StatsView = serde_json::from_value(sent.clone()).unwrap();
    let read = serde_json::to_value(&view).unwrap();
    fn covered(path: &str, read: &Value, sent: &Value) {
        match (read, sent) {
            (Value::Object(r), Value::Object(s)) => {
                for (k, v) in r {
                    let sv = s
                        .get(k)
                        .unwrap_or_else(|| panic!("the server sends no {path}.{k}"));
                    covered(&format!("{path}.{k}"), v, sv);
                }
            }
            (Value::Array(r), Value::Array(s)) => {
                for (rv, sv) in r.iter().zip(s) {
                    covered(&format!("{path}[]"), rv, sv);
                }
            }
            _ => {}
        }
    }
    covered("", &read, &sent);
    // memconv's part comes back whole, and the client writes it back as the server did.
    assert_eq!(view.memconv, snapshot);
    assert_eq!(read["memconv"], sent["memconv"]);
    assert_eq!(view.memconv.latency.count, 1);
    assert_eq!(
        view.memconv.pool_report.map(|p| p.policy),
        Some("soak".into())
    );
    assert!(view.exits[0].contains_key("doorbell"));
}

/// Replies of older servers (fewer fields) still parse; absent fields default.
#[test]
fn partial_stats_replies_parse() {
    let view: StatsView = serde_json::from_str(
        r#"{"state":"paused","memconv":{"granularity":"2m","to_shared":{"4k":3},
            "rejects":[{"name":"reserved","count":2}],"private_store":{"kind":"hugetlb"},
            "latency":{"buckets":[{"lt_ns":128}]},"pool_report":{"policy":"p"},
            "some_future_field":[1]}}"#,
    )
    .unwrap();
    assert_eq!(view.state, "paused");
    let m = &view.memconv;
    assert_eq!(m.granularity, memconv::Granularity::Huge2M);
    assert_eq!((m.to_shared.k4, m.to_shared.total()), (3, 3));
    assert_eq!((&*m.rejects[0].name, m.rejects[0].count), ("reserved", 2));
    assert_eq!(m.private_store.kind, memconv::StoreKind::Hugetlb);
    assert_eq!(m.shared_store, memconv::stats::StoreUsage::default());
    assert_eq!(m.latency.buckets[0].count, 0);
    assert_eq!(m.pool_report.as_ref().map(|p| p.maps), Some(0));
    let empty: StatsView = serde_json::from_str("{}").unwrap();
    assert_eq!(empty.memconv, memconv::StatsSnapshot::default());
}
