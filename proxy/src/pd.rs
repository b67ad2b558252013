//! The two-stage flow of a disaggregated model, as vLLM's disaggregated
//! serving (NixlConnector) expects it: the prefill leg is the request with
//! `stream: false`, one token, no stream options, and `kv_transfer_params`
//! asking for remote decode; the decode leg is the original request with the
//! `kv_transfer_params` the prefill answered, streamed back to the client.
//! Both legs carry the same `X-Request-Id`; each is recorded in its role.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};

use crate::body::{ProxyBody, full};
use crate::error::{ApiError, error_response};
use crate::forward::{ForwardRequest, Forwarder, SendError};
use crate::lifecycle::{self, Arrival};
use crate::metrics::Outcome;
use crate::routes::PoolEntry;

/// The prefill leg's body from the client's.
pub fn prefill_body(original: &Value) -> Value {
    let mut v = original.clone();
    if let Value::Object(o) = &mut v {
        o.insert("stream".into(), Value::Bool(false));
        o.insert("max_tokens".into(), json!(1));
        if o.contains_key("max_completion_tokens") {
            o.insert("max_completion_tokens".into(), json!(1));
        }
        for k in ["stream_options", "min_tokens", "min_completion_tokens"] {
            o.remove(k);
        }
        o.insert(
            "kv_transfer_params".into(),
            json!({
                "do_remote_decode": true,
                "do_remote_prefill": false,
                "remote_engine_id": null,
                "remote_block_ids": null,
                "remote_host": null,
                "remote_port": null,
            }),
        );
    }
    v
}

/// The decode leg's body: the original with the prefill's parameters.
pub fn decode_body(original: &Value, kv_transfer_params: Value) -> Value {
    let mut v = original.clone();
    if let Value::Object(o) = &mut v {
        o.insert("kv_transfer_params".into(), kv_transfer_params);
    }
    v
}

pub(crate) async fn two_stage(
    plane: &Forwarder,
    prefill: &Arc<PoolEntry>,
    decode: &Arc<PoolEntry>,
    request: ForwardRequest,
) -> Response<ProxyBody> {
    let prompt_tokens = request.prompt_tokens;
    let original: Value = match serde_json::from_slice(&request.body) {
        Ok(v) => v,
        Err(e) => {
            return error_response(&ApiError::bad_request(
                format!("request body is not valid JSON: {e}"),
                None,
            ));
        }
    };
    // Prefill leg, recorded in the prefill pool: its one token is its TTFT,
    // counted from when the proxy got the request (queue time included, as
    // for a unified pool). The observation holds the leg in flight until
    // it ends, whatever ends it (a client that leaves drops it).
    let pool = &prefill.pool;
    let arrival = Arrival {
        prompt_tokens,
        body_bytes: request.body.len(),
        start: request.start,
        streaming: false,
        among: crate::pool::Among::All,
    };
    let mut leg = match lifecycle::admit(&plane.limits, prefill, arrival).await {
        Ok(o) => o,
        Err(refusal) => return refusal.response(),
    };
    let prefill_bytes = Bytes::from(prefill_body(&original).to_string());
    let (resp, conn) = match plane
        .send(
            prefill,
            &mut leg,
            &request.path,
            request.headers.clone(),
            prefill_bytes,
            prompt_tokens,
        )
        .await
    {
        Ok(answer) => answer,
        Err(e) => {
            leg.fail(e.outcome);
            return SendError {
                message: format!("prefill leg: {}", e.message),
                ..e
            }
            .response();
        }
    };
    let status = resp.status();
    leg.answered(status);
    let (parts, body) = resp.into_parts();
    let answer_body = match body.collect().await {
        Ok(b) => {
            conn.release();
            b.to_bytes()
        }
        Err(e) => {
            if let Some(l) = leg.lease() {
                pool.record_failure(&l.endpoint);
            }
            leg.fail(Outcome::upstream_error);
            return error_response(&ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("prefill leg: reading the answer: {e}"),
                None,
            ));
        }
    };
    if !status.is_success() {
        // The prefill server's own answer (a prompt too long is a 400 with
        // OpenAI error JSON): the client gets it as it was.
        leg.end();
        let mut r = Response::new(full(answer_body));
        *r.status_mut() = status;
        let content_type = parts
            .headers
            .get(CONTENT_TYPE)
            .cloned()
            .unwrap_or(HeaderValue::from_static("application/json"));
        r.headers_mut().insert(CONTENT_TYPE, content_type);
        return r;
    }
    let kv = match serde_json::from_slice::<Value>(&answer_body) {
        Ok(Value::Object(mut o)) => o.remove("kv_transfer_params"),
        _ => None,
    };
    let kv = match kv {
        Some(kv @ Value::Object(_)) => kv,
        other => {
            // A prefill server without a KV connector answers the token
            // and no parameters; decoding without them would prefill again.
            leg.fail(Outcome::upstream_error);
            let what = match other {
                None => "no kv_transfer_params",
                Some(Value::Null) => "kv_transfer_params null",
                Some(_) => "kv_transfer_params that are not an object",
            };
            return error_response(&ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!(
                    "prefill leg answered {status} with {what}: is the prefill server started \
                     for disaggregated serving (vLLM --kv-transfer-config with kv_role kv_producer \
                     or kv_both)?"
                ),
                None,
            ));
        }
    };
    leg.token();
    leg.end();
    // Decode leg, streamed back and observed in the decode pool.
    let body = Bytes::from(decode_body(&original, kv).to_string());
    plane
        .forward(decode, ForwardRequest { body, ..request })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefill_leg_asks_for_one_token_and_remote_decode() {
        let original = json!({
            "model": "m", "stream": true, "max_tokens": 100, "max_completion_tokens": 100,
            "stream_options": {"include_usage": true}, "min_tokens": 5, "min_completion_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}],
        });
        let p = prefill_body(&original);
        assert_eq!(p["stream"], false);
        assert_eq!(p["max_tokens"], 1);
        assert_eq!(p["max_completion_tokens"], 1);
        for k in ["stream_options", "min_tokens", "min_completion_tokens"] {
            assert!(p.get(k).is_none(), "{k}");
        }
        assert_eq!(p["kv_transfer_params"]["do_remote_decode"], true);
        assert_eq!(p["kv_transfer_params"]["do_remote_prefill"], false);
        assert!(p["kv_transfer_params"]["remote_host"].is_null());
        assert_eq!(p["messages"], original["messages"]);
        let d = decode_body(&original, json!({"do_remote_prefill": true}));
        assert_eq!(d["kv_transfer_params"]["do_remote_prefill"], true);
        assert_eq!(d["stream"], true);
        assert_eq!(d["max_tokens"], 100);
    }
}
