//! Parsing and validating OpenAI completion requests, with OpenAI-style
//! errors that name the offending parameter.

use serde_json::Value;

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// What the engine needs from a request.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedRequest {
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub max_tokens: u32,
    pub prompt_tokens: u32,
    /// `kv_transfer_params.do_remote_decode`: run the prefill only.
    pub remote_decode: bool,
    /// `kv_transfer_params.do_remote_prefill`: the KV comes from a prefill
    /// replica.
    pub remote_prefill: bool,
}

/// An error for the client, as OpenAI's error JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
        .to_string()
    }
}

/// The simulated tokenizer: `chars_per_token` characters a token (about
/// four for English text by most tokenizers; fewer than 1 is taken as 1).
fn tokens_of_text(chars: usize, chars_per_token: f64) -> u32 {
    let per = if chars_per_token.is_finite() {
        chars_per_token.max(1.0)
    } else {
        4.0
    };
    let tokens = (chars as f64 / per).ceil();
    if tokens >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        (tokens as u32).max(1)
    }
}

fn content_chars(content: &Value) -> Option<usize> {
    match content {
        Value::String(s) => Some(s.chars().count()),
        Value::Null => Some(0),
        // Content parts: count the text ones.
        Value::Array(parts) => Some(
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .map(|t| t.chars().count())
                .sum(),
        ),
        _ => None,
    }
}

fn prompt_tokens_of(prompt: &Value, chars_per_token: f64) -> Option<u32> {
    match prompt {
        Value::String(s) => Some(tokens_of_text(s.chars().count(), chars_per_token)),
        Value::Array(items) if items.is_empty() => None,
        Value::Array(items) => {
            if items.iter().all(Value::is_u64) {
                // Token IDs: counted exactly.
                return u32::try_from(items.len()).ok();
            }
            // A batch of prompts (strings or ID lists): the simulator serves
            // it as one sequence of the total length.
            let mut total = 0u32;
            for item in items {
                total = total.saturating_add(match item {
                    Value::String(s) => tokens_of_text(s.chars().count(), chars_per_token),
                    Value::Array(ids) if ids.iter().all(Value::is_u64) => {
                        u32::try_from(ids.len()).ok()?
                    }
                    _ => return None,
                });
            }
            Some(total)
        }
        _ => None,
    }
}

fn optional_u32(body: &Value, key: &'static str) -> Result<Option<u32>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) if n >= 1 => Ok(Some(n)),
            _ => Err(ApiError::bad_request(
                format!("{key} must be an integer ≥ 1, got {v}"),
                Some(key),
            )),
        },
    }
}

fn optional_bool(body: &Value, key: &'static str) -> Result<bool, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ApiError::bad_request(
            format!("{key} must be a boolean, got {v}"),
            Some(key),
        )),
    }
}

/// Parses a request body. `served` says whether a model name is served by
/// this replica; prompt text is counted at `chars_per_token`.
pub fn parse(
    body: &[u8],
    endpoint: Endpoint,
    served: &dyn Fn(&str) -> bool,
    default_max_tokens: u32,
    chars_per_token: f64,
) -> Result<ParsedRequest, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("request body is not valid JSON: {e}"), None))?;
    let Value::Object(_) = &value else {
        return Err(ApiError::bad_request(
            "request body must be a JSON object",
            None,
        ));
    };
    let model = match value.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(_) => {
            return Err(ApiError::bad_request(
                "model must be a non-empty string",
                Some("model"),
            ));
        }
        None => {
            return Err(ApiError::bad_request(
                "you must provide a model parameter",
                Some("model"),
            ));
        }
    };
    let prompt_tokens = match endpoint {
        Endpoint::Chat => {
            let Some(messages) = value.get("messages") else {
                return Err(ApiError::bad_request(
                    "you must provide a messages parameter",
                    Some("messages"),
                ));
            };
            let Some(messages) = messages.as_array().filter(|m| !m.is_empty()) else {
                return Err(ApiError::bad_request(
                    "messages must be a non-empty array",
                    Some("messages"),
                ));
            };
            let mut chars = 0usize;
            for m in messages {
                let content = m.get("content").unwrap_or(&Value::Null);
                let Some(c) = content_chars(content) else {
                    return Err(ApiError::bad_request(
                        "each message's content must be a string or an array of content parts",
                        Some("messages"),
                    ));
                };
                chars = chars.saturating_add(c);
            }
            tokens_of_text(chars, chars_per_token)
        }
        Endpoint::Completions => {
            let Some(prompt) = value.get("prompt") else {
                return Err(ApiError::bad_request(
                    "you must provide a prompt parameter",
                    Some("prompt"),
                ));
            };
            prompt_tokens_of(prompt, chars_per_token).ok_or_else(|| {
                ApiError::bad_request(
                    "prompt must be a string, an array of strings, or token IDs",
                    Some("prompt"),
                )
            })?
        }
    };
    let max_tokens = optional_u32(&value, "max_completion_tokens")?
        .or(optional_u32(&value, "max_tokens")?)
        .unwrap_or(default_max_tokens);
    let stream = optional_bool(&value, "stream")?;
    let include_usage = match value.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(ApiError::bad_request(
                    format!("stream_options.include_usage must be a boolean, got {v}"),
                    Some("stream_options"),
                ));
            }
        },
        Some(v) => {
            return Err(ApiError::bad_request(
                format!("stream_options must be an object, got {v}"),
                Some("stream_options"),
            ));
        }
    };
    let (remote_decode, remote_prefill) = match value.get("kv_transfer_params") {
        None | Some(Value::Null) => (false, false),
        Some(Value::Object(kv)) => (
            kv.get("do_remote_decode")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            kv.get("do_remote_prefill")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        ),
        Some(v) => {
            return Err(ApiError::bad_request(
                format!("kv_transfer_params must be an object, got {v}"),
                Some("kv_transfer_params"),
            ));
        }
    };
    if !served(&model) {
        return Err(ApiError {
            status: 404,
            message: format!("The model `{model}` does not exist."),
            kind: "NotFoundError",
            param: Some("model"),
            code: Some("model_not_found"),
        });
    }
    Ok(ParsedRequest {
        model,
        stream,
        include_usage,
        max_tokens,
        prompt_tokens,
        remote_decode,
        remote_prefill,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<ParsedRequest, ApiError> {
        parse(body.as_bytes(), Endpoint::Chat, &|m| m == "m", 128, 4.0)
    }

    #[test]
    fn chat_prompt_is_estimated_from_characters() {
        let r = chat(r#"{"model":"m","messages":[{"role":"user","content":"12345678"},{"role":"user","content":[{"type":"text","text":"abcd"}]}]}"#).unwrap();
        assert_eq!(r.prompt_tokens, 3);
        assert_eq!(r.max_tokens, 128);
        assert!(!r.stream);
    }

    #[test]
    fn completion_prompt_token_ids_are_counted() {
        let r = parse(
            br#"{"model":"m","prompt":[1,2,3,4,5],"max_tokens":7}"#,
            Endpoint::Completions,
            &|m| m == "m",
            128,
            4.0,
        )
        .unwrap();
        assert_eq!((r.prompt_tokens, r.max_tokens), (5, 7));
        let r = parse(
            br#"{"model":"m","prompt":["abcd","abcdefgh"]}"#,
            Endpoint::Completions,
            &|m| m == "m",
            128,
            4.0,
        )
        .unwrap();
        assert_eq!(r.prompt_tokens, 3);
    }

    #[test]
    fn the_simulated_tokenizer_counts_at_its_density() {
        let body = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
            "a".repeat(700)
        );
        let at = |per: f64| {
            parse(body.as_bytes(), Endpoint::Chat, &|m| m == "m", 8, per)
                .map(|r| r.prompt_tokens)
                .ok()
        };
        assert_eq!(at(4.0), Some(175));
        assert_eq!(at(7.0), Some(100));
        assert_eq!(at(6.9), Some(102));
        // Nonsense densities fall back rather than divide by zero.
        assert_eq!(at(0.0), Some(700));
        assert_eq!(at(f64::NAN), Some(175));
    }

    #[test]
    fn max_completion_tokens_wins() {
        let r = chat(r#"{"model":"m","messages":[{"content":"x"}],"max_tokens":5,"max_completion_tokens":9}"#).unwrap();
        assert_eq!(r.max_tokens, 9);
    }

    #[test]
    fn kv_transfer_params_are_read() {
        let r = parse(
            br#"{"model":"m","prompt":"x","kv_transfer_params":{"do_remote_decode":true}}"#,
            Endpoint::Completions,
            &|m| m == "m",
            1,
            4.0,
        )
        .unwrap();
        assert!(r.remote_decode && !r.remote_prefill);
    }

    #[test]
    fn bad_input_names_the_parameter() {
        for (body, status, param) in [
            ("{", 400, None),
            ("[1]", 400, None),
            (r#"{"messages":[{"content":"x"}]}"#, 400, Some("model")),
            (r#"{"model":"m"}"#, 400, Some("messages")),
            (r#"{"model":"m","messages":[]}"#, 400, Some("messages")),
            (
                r#"{"model":"m","messages":[{"content":5}]}"#,
                400,
                Some("messages"),
            ),
            (
                r#"{"model":"m","messages":[{"content":"x"}],"max_tokens":0}"#,
                400,
                Some("max_tokens"),
            ),
            (
                r#"{"model":"m","messages":[{"content":"x"}],"max_tokens":-3}"#,
                400,
                Some("max_tokens"),
            ),
            (
                r#"{"model":"m","messages":[{"content":"x"}],"stream":"yes"}"#,
                400,
                Some("stream"),
            ),
            (
                r#"{"model":"m","messages":[{"content":"x"}],"stream_options":3}"#,
                400,
                Some("stream_options"),
            ),
            (
                r#"{"model":"other","messages":[{"content":"x"}]}"#,
                404,
                Some("model"),
            ),
        ] {
            let e = chat(body).unwrap_err();
            assert_eq!((e.status, e.param), (status, param), "{body}: {e:?}");
            let json: Value = serde_json::from_str(&e.to_json()).unwrap();
            for key in ["message", "type", "param", "code"] {
                assert!(json["error"].get(key).is_some(), "{body}: no {key}");
            }
        }
        let e = parse(
            br#"{"model":"m"}"#,
            Endpoint::Completions,
            &|m| m == "m",
            1,
            4.0,
        )
        .unwrap_err();
        assert_eq!(e.param, Some("prompt"));
        let e = parse(
            br#"{"model":"m","prompt":{"a":1}}"#,
            Endpoint::Completions,
            &|m| m == "m",
            1,
            4.0,
        )
        .unwrap_err();
        assert_eq!(e.param, Some("prompt"));
    }
}
