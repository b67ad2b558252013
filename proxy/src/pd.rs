//! The two-stage flow of a disaggregated model, as vLLM's disaggregated
//! serving (NixlConnector) expects it: the prefill leg is the request with
//! `stream: false`, one token, no stream options, and `kv_transfer_params`
//! asking for remote decode; the decode leg is the original request with the
//! `kv_transfer_params` the prefill answered, streamed back to the client.
//! Both legs carry the same `X-Request-Id`; each is recorded in its role.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::HeaderMap;
use http::uri::PathAndQuery;
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};

use crate::dataplane::{DataPlane, PoolEntry, ProxyBody};
use crate::error::{ApiError, error_response};
use crate::metrics::Outcome;

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

#[allow(clippy::too_many_arguments)]
pub(crate) async fn two_stage(
    plane: &DataPlane,
    prefill: &Arc<PoolEntry>,
    decode: &Arc<PoolEntry>,
    path: &PathAndQuery,
    headers: HeaderMap,
    body: Bytes,
    prompt_tokens: u64,
    streaming: bool,
    start: Instant,
) -> Response<ProxyBody> {
    let original: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error_response(&ApiError::bad_request(
                format!("request body is not valid JSON: {e}"),
                None,
            ));
        }
    };
    // Prefill leg, recorded in the prefill pool: its one token is its TTFT.
    let pool = &prefill.pool;
    pool.signals.arrival(prompt_tokens);
    prefill.metrics.prompt_tokens.inc_by(prompt_tokens);
    let lease = match plane.admit(prefill, prompt_tokens, None).await {
        Ok((l, _)) => l,
        Err(r) => return r,
    };
    pool.signals.dispatch(prompt_tokens);
    let leg_start = Instant::now();
    let prefill_bytes = Bytes::from(prefill_body(&original).to_string());
    let answer = plane
        .send(
            prefill,
            lease,
            path,
            headers.clone(),
            prefill_bytes,
            prompt_tokens,
        )
        .await;
    let (status, answer_body) = match answer {
        Ok((resp, conn, lease)) => {
            let status = resp.status();
            let collected = resp.into_body().collect().await.map(|b| b.to_bytes());
            if collected.is_ok() {
                conn.release();
            }
            drop(lease);
            match collected {
                Ok(b) => (status, b),
                Err(e) => {
                    pool.signals.complete(prompt_tokens, 0, false, None);
                    prefill.metrics.outcome(Outcome::upstream_error);
                    return error_response(&ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        format!("prefill leg: {e}"),
                        None,
                    ));
                }
            }
        }
        Err((lease, message)) => {
            drop(lease);
            pool.signals.complete(prompt_tokens, 0, false, None);
            prefill.metrics.outcome(Outcome::upstream_error);
            return error_response(&ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("prefill leg: {message}"),
                None,
            ));
        }
    };
    let elapsed = leg_start.elapsed();
    let kv = serde_json::from_slice::<Value>(&answer_body)
        .ok()
        .and_then(|v| v.get("kv_transfer_params").cloned());
    let Some(kv) = kv.filter(|_| status.is_success()) else {
        pool.signals.complete(prompt_tokens, 0, false, None);
        prefill.metrics.outcome(Outcome::upstream_error);
        let text = String::from_utf8_lossy(&answer_body);
        return error_response(&ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!(
                "prefill leg answered {status} without kv_transfer_params: {}",
                text.chars().take(200).collect::<String>()
            ),
            None,
        ));
    };
    pool.signals.first_token(prompt_tokens, elapsed);
    prefill.metrics.ttft.observe(elapsed);
    pool.signals.complete(prompt_tokens, 0, true, Some(elapsed));
    prefill.metrics.e2e.observe(elapsed);
    prefill.metrics.outcome(Outcome::ok);
    // Decode leg, streamed back and observed in the decode pool.
    let decode_bytes = Bytes::from(decode_body(&original, kv).to_string());
    plane
        .forward(
            decode,
            path,
            headers,
            decode_bytes,
            prompt_tokens,
            streaming,
            start,
        )
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
