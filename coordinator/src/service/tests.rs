//! The gRPC boundary's small parsers: timeouts, request ids, code labels.

use super::*;

#[test]
fn grpc_timeouts_parse() {
    assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
    assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
    assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
    assert_eq!(parse_grpc_timeout("S"), None);
    assert_eq!(parse_grpc_timeout("12x"), None);
    assert_eq!(parse_grpc_timeout("123456789S"), None);
}

#[test]
fn request_ids_are_kept_when_sensible_and_made_up_otherwise() {
    assert_eq!(&*request_id(Some("req-42.a_b")), "req-42.a_b");
    for bad in [None, Some(""), Some("has space"), Some("x\ny")] {
        let id = request_id(bad);
        assert_eq!(id.len(), 16, "{bad:?} -> {id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    }
    assert_ne!(request_id(None), request_id(None));
}

#[test]
fn code_labels_are_snake_case() {
    assert_eq!(
        code_label(tonic::Code::ResourceExhausted),
        "resource_exhausted"
    );
    assert_eq!(code_label(tonic::Code::Unavailable), "unavailable");
}
