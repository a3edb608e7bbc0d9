//! Error mapping, finish reasons and the request shapes OpenAI clients send.

use super::request::MessageContent;
use super::stream::finish_reason;
use super::*;
use axum::http::StatusCode;
use strata_proto::v1;
use tonic::Status;

#[test]
fn statuses_map_to_openai_errors() {
    let e = ApiError::from(Status::resource_exhausted("full"));
    assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
    let e = ApiError::from(Status::invalid_argument("bad"));
    assert_eq!(e.status, StatusCode::BAD_REQUEST);
    assert_eq!(e.body()["error"]["message"], "bad");
    assert_eq!(e.body()["error"]["type"], "invalid_request_error");
    let e = ApiError::unauthorized("wrong auth token");
    assert_eq!(e.status, StatusCode::UNAUTHORIZED);
    assert_eq!(e.body()["error"]["code"], "invalid_api_key");
}

#[test]
fn finish_reasons_follow_openai() {
    assert_eq!(finish_reason(v1::FinishReason::Eos as i32), "stop");
    assert_eq!(finish_reason(v1::FinishReason::Stop as i32), "stop");
    assert_eq!(finish_reason(v1::FinishReason::Length as i32), "length");
    assert_eq!(finish_reason(v1::FinishReason::Context as i32), "length");
}

#[test]
fn requests_parse_in_both_prompt_and_content_shapes() {
    let r: CompletionRequest =
        serde_json::from_str(r#"{"model":"m","prompt":["a"],"stop":"x","unknown":1}"#).unwrap();
    assert_eq!(r.prompt.into_vec(), vec!["a"]);
    assert_eq!(r.common.stop.unwrap().to_vec(), vec!["x"]);
    let r: ChatRequest = serde_json::from_str(
        r#"{"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"stream":true}"#,
    )
    .unwrap();
    assert!(r.common.stream);
    assert!(matches!(
        r.messages[0].content,
        Some(MessageContent::Parts(_))
    ));
}
