//! What the proxy records about real and scripted upstreams: streams as
//! real servers frame them (CRLF, separators split across reads, reasoning
//! and tool-call deltas, an event without end), outcomes by status, counts
//! that return to zero whoever leaves first, and the PD flow's errors.
//!
//! The scripted upstream is a few lines of raw TCP that write a response
//! byte for byte, in the chunks and at the times a test gives, so what the
//! proxy sees is exactly what a given server sends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{metric, outcome, pools, proxy, request, request_bytes, sim, teardown};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use scalecar_loadtest::sim::{SimConfig, SimRole};
use scalecar_proxy::server::ProxyHandle;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One scripted answer: the head (status line and headers, without the
/// blank line) and the body's pieces, each written after its delay.
#[derive(Clone)]
struct Script {
    head: String,
    pieces: Vec<(Duration, Vec<u8>)>,
    /// Kept open this long after the last piece (then closed).
    linger: Duration,
}

fn sse(pieces: Vec<(Duration, Vec<u8>)>) -> Script {
    Script {
        head: "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close".into(),
        pieces,
        linger: Duration::ZERO,
    }
}

fn json_answer(status: &str, body: &str) -> Script {
    Script {
        head: format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}",
            body.len()
        ),
        pieces: vec![(Duration::ZERO, body.as_bytes().to_vec())],
        linger: Duration::from_millis(50),
    }
}

/// A server that answers every request with `script` (one connection per
/// request, closed after it), counting requests (not the proxy's health
/// checks, which get a plain 200).
async fn scripted(script: Script) -> (SocketAddr, Arc<AtomicUsize>) {
    scripted_in_turn(vec![script]).await
}

/// Request n gets `scripts[n]`, and the last one from then on.
async fn scripted_in_turn(scripts: Vec<Script>) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    let scripts = Arc::new(scripts);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let scripts = scripts.clone();
            let count = count.clone();
            tokio::spawn(async move {
                s.set_nodelay(true).unwrap();
                // Read the head and the declared body.
                let mut got = Vec::new();
                let mut buf = vec![0u8; 8192];
                let body_len = loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                    if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        break end + 4 + len;
                    }
                };
                while got.len() < body_len {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                // The proxy's active health checks are answered, not
                // scripted; its read of the engine's /metrics finds none.
                if got.starts_with(b"GET /health") {
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                    return;
                }
                if got.starts_with(b"GET /metrics") {
                    let _ = s
                        .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                    return;
                }
                let turn = count.fetch_add(1, Ordering::Relaxed).min(scripts.len() - 1);
                let Some(script) = scripts.get(turn) else {
                    return;
                };
                let head = format!("{}\r\n\r\n", script.head);
                if s.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for (delay, piece) in &script.pieces {
                    tokio::time::sleep(*delay).await;
                    if s.write_all(piece).await.is_err() {
                        return;
                    }
                    let _ = s.flush().await;
                }
                tokio::time::sleep(script.linger).await;
            });
        }
    });
    (addr, served)
}

fn one_pool(endpoints: &[SocketAddr]) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "limits: {{ health-check-interval: 1h }}\npools:\n  - model: m\n    endpoints: [{}]\n",
        eps.join(", ")
    )
}

const STREAM: &str = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

fn chunk(delta: &str) -> String {
    format!(r#"data: {{"choices":[{{"index":0,"delta":{delta},"finish_reason":null}}]}}"#)
}

fn now(bytes: impl Into<Vec<u8>>) -> (Duration, Vec<u8>) {
    (Duration::ZERO, bytes.into())
}

fn after(ms: u64, bytes: impl Into<Vec<u8>>) -> (Duration, Vec<u8>) {
    (Duration::from_millis(ms), bytes.into())
}

/// Streams `script` through a fresh proxy; returns the bytes the client got
/// and the proxy.
async fn through(script: Script) -> (Bytes, ProxyHandle) {
    let (addr, _) = scripted(script).await;
    let p = proxy(&one_pool(&[addr])).await;
    let (status, _, body) = request_bytes(
        "POST",
        &format!("http://{}/v1/chat/completions", p.proxy_addr),
        STREAM,
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    teardown(&p).await;
    (body, p)
}

async fn tokens_seen(p: &ProxyHandle) -> (f64, f64) {
    (
        metric(p, "scalecar_ttft_seconds_count{").await,
        metric(p, "scalecar_itl_seconds_count{").await,
    )
}

#[tokio::test]
async fn crlf_and_cr_separated_events_are_observed() {
    let events = [
        format!("{}\r\n\r\n", chunk(r#"{"content":"a"}"#)),
        format!("{}\r\n\r\n", chunk(r#"{"content":"b"}"#)),
        // CR alone ends lines too (the SSE spec allows all three).
        format!("{}\r\r", chunk(r#"{"content":"c"}"#)),
        "data: [DONE]\r\n\r\n".to_string(),
    ];
    let script = sse(events.iter().map(|e| after(100, e.clone())).collect());
    let (body, p) = through(script).await;
    assert_eq!(
        body,
        Bytes::from(events.concat()),
        "passed through byte for byte"
    );
    // Three tokens: one TTFT, two gaps, counted as generated — each when
    // its event ended, not all at the end of the stream.
    assert_eq!(tokens_seen(&p).await, (1.0, 2.0));
    let ttft = metric(&p, "scalecar_ttft_seconds_sum{").await;
    let itl = metric(&p, "scalecar_itl_seconds_sum{").await;
    assert!(ttft < 0.18, "TTFT {ttft} s: the first event was seen late");
    assert!(
        (0.15..0.35).contains(&itl),
        "ITL sum {itl} s: events were seen late"
    );
    assert_eq!(
        metric(
            &p,
            "scalecar_tokens_total{model=\"m\",role=\"unified\",kind=\"generated\"}"
        )
        .await,
        3.0
    );
    assert_eq!(outcome(&p, "unified", "ok").await, 1.0);
}

#[tokio::test]
async fn a_separator_split_across_reads_is_found_at_once() {
    // The first event's blank line arrives 300 ms after its data line, in
    // the same read as the start of the next event, whose own end comes
    // 300 ms later still: the first token is at 300 ms, not 600.
    let script = sse(vec![
        now(format!("{}\n", chunk(r#"{"content":"a"}"#))),
        after(300, format!("\n{}", chunk(r#"{"content":"b"}"#))),
        after(300, "\n\ndata: [DONE]\n\n"),
    ]);
    let (_, p) = through(script).await;
    assert_eq!(tokens_seen(&p).await, (1.0, 1.0));
    let ttft = metric(&p, "scalecar_ttft_seconds_sum{").await;
    assert!(
        (0.25..0.5).contains(&ttft),
        "TTFT {ttft} s: the split separator was found late"
    );
}

#[tokio::test]
async fn reasoning_and_tool_call_deltas_are_generated_tokens() {
    // A reasoning model thinks for 300 ms before its first content token:
    // its TTFT is the first reasoning token.
    let script = sse(vec![
        now(format!(
            "{}\n\n",
            chunk(r#"{"role":"assistant","content":""}"#)
        )),
        after(
            5,
            format!(
                "{}\n\n",
                chunk(r#"{"reasoning_content":"Let","content":null}"#)
            ),
        ),
        after(
            5,
            format!("{}\n\n", chunk(r#"{"reasoning_content":" me"}"#)),
        ),
        after(5, format!("{}\n\n", chunk(r#"{"reasoning":" think"}"#))),
        after(300, format!("{}\n\n", chunk(r#"{"content":"Yes"}"#))),
        after(
            5,
            format!(
                "{}\n\n",
                chunk(
                    r#"{"tool_calls":[{"index":0,"id":"c1","type":"function","function":{"name":"f","arguments":""}}]}"#
                )
            ),
        ),
        after(
            5,
            format!(
                "{}\n\n",
                chunk(r#"{"tool_calls":[{"index":0,"function":{"arguments":"{\"x\":"}}]}"#)
            ),
        ),
        after(
            5,
            format!(
                "{}\n\n",
                chunk(r#"{"tool_calls":[{"index":0,"function":{"arguments":"1}"}}]}"#)
            ),
        ),
        after(5, "data: [DONE]\n\n"),
    ]);
    let (_, p) = through(script).await;
    // 3 reasoning + 1 content + 3 tool-call deltas = 7 tokens.
    assert_eq!(tokens_seen(&p).await, (1.0, 6.0));
    let ttft = metric(&p, "scalecar_ttft_seconds_sum{").await;
    assert!(
        ttft < 0.2,
        "TTFT {ttft} s: reasoning tokens were not counted"
    );
}

#[tokio::test]
async fn an_event_without_end_is_bounded_and_passed_through() {
    // 1 MiB of one event with no separator, then a normal event: the
    // client gets every byte, the proxy skips the monster and goes on.
    let monster = format!("data: {}", "x".repeat(1 << 20));
    let mut pieces: Vec<(Duration, Vec<u8>)> = monster
        .as_bytes()
        .chunks(64 << 10)
        .map(|c| after(1, c.to_vec()))
        .collect();
    pieces.push(after(1, "\n\n"));
    pieces.push(after(5, format!("{}\n\n", chunk(r#"{"content":"a"}"#))));
    pieces.push(after(5, "data: [DONE]\n\n"));
    let expected: Vec<u8> = pieces.iter().flat_map(|(_, b)| b.clone()).collect();
    let (body, p) = through(sse(pieces)).await;
    assert_eq!(body.len(), expected.len());
    assert!(body == expected, "bytes changed on the way");
    assert_eq!(tokens_seen(&p).await, (1.0, 0.0));
}

#[tokio::test]
async fn a_client_that_had_the_whole_stream_is_ok_even_if_it_leaves_early() {
    // The server keeps the connection open after [DONE]; the client (like
    // the openai SDK) stops reading at [DONE] and closes.
    let script = Script {
        linger: Duration::from_secs(3),
        ..sse(vec![
            now(format!("{}\n\n", chunk(r#"{"content":"a"}"#))),
            after(
                5,
                format!(
                    "{}\n\n",
                    r#"data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#
                ),
            ),
            after(5, "data: [DONE]\n\n"),
        ])
    };
    let (addr, _) = scripted(script).await;
    let p = proxy(&one_pool(&[addr])).await;
    let client = HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = hyper::Request::post(format!("http://{}/v1/chat/completions", p.proxy_addr))
        .body(Full::new(Bytes::from(STREAM)))
        .unwrap();
    let mut body = client.request(req).await.unwrap().into_body();
    let mut seen = Vec::new();
    while !seen.windows(6).any(|w| w == b"[DONE]") {
        let f = body.frame().await.unwrap().unwrap();
        seen.extend_from_slice(f.data_ref().unwrap());
    }
    drop(body);
    drop(client);
    teardown(&p).await;
    assert_eq!(outcome(&p, "unified", "ok").await, 1.0);
    assert_eq!(outcome(&p, "unified", "cancelled").await, 0.0);
}

#[tokio::test]
async fn upstream_4xx_is_the_clients_error_and_5xx_the_servers() {
    let bad_request = json_answer(
        "400 Bad Request",
        r#"{"error":{"message":"prompt too long","type":"invalid_request_error","param":null,"code":null}}"#,
    );
    let unavailable = json_answer(
        "503 Service Unavailable",
        r#"{"error":{"message":"overloaded"}}"#,
    );
    // A 4xx: passed through, client_error, no ejection, no e2e sample.
    let (a, _) = scripted(bad_request.clone()).await;
    let (b, _) = scripted(bad_request).await;
    let p = proxy(&one_pool(&[a, b])).await;
    let url = format!("http://{}/v1/chat/completions", p.proxy_addr);
    let (status, _, body) = request_bytes("POST", &url, STREAM).await.unwrap();
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("prompt too long"));
    teardown(&p).await;
    assert_eq!(outcome(&p, "unified", "client_error").await, 1.0);
    assert_eq!(outcome(&p, "unified", "ok").await, 0.0);
    assert_eq!(metric(&p, "scalecar_e2e_seconds_count{").await, 0.0);
    let ejected = |v: &Value| {
        v["pools"][0]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["ejected"] == true)
            .count()
    };
    assert_eq!(ejected(&pools(&p).await), 0);
    // A 5xx: upstream_error, and it counts toward ejection.
    let (a, _) = scripted(unavailable.clone()).await;
    let (b, _) = scripted(unavailable).await;
    let p = proxy(&one_pool(&[a, b])).await;
    let url = format!("http://{}/v1/chat/completions", p.proxy_addr);
    let (status, _, _) = request_bytes("POST", &url, STREAM).await.unwrap();
    assert_eq!(status, 503);
    teardown(&p).await;
    assert_eq!(outcome(&p, "unified", "upstream_error").await, 1.0);
    assert_eq!(ejected(&pools(&p).await), 1);
}

#[tokio::test]
async fn a_client_gone_before_the_headers_releases_everything() {
    // A non-streaming request spends its life before the response headers:
    // a client killed then must not leave the pool busy forever.
    let s = sim(SimConfig {
        model: "m".into(),
        ..SimConfig::default()
    })
    .await;
    let p = proxy(&one_pool(&[s.local_addr()])).await;
    let url = format!("http://{}/v1/completions", p.proxy_addr);
    let long = r#"{"model":"m","prompt":"a long prompt to count","max_tokens":100000}"#;
    let client = tokio::spawn(async move { request_bytes("POST", &url, long).await });
    let deadline = Instant::now() + Duration::from_secs(5);
    while pools(&p).await["pools"][0]["in_flight"] != 1 {
        assert!(Instant::now() < deadline, "never in flight");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(metric(&p, "scalecar_tokens_in_flight{").await > 0.0);
    client.abort();
    let _ = client.await;
    teardown(&p).await;
    assert_eq!(outcome(&p, "unified", "cancelled").await, 1.0);
    // The model server stopped generating too.
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.in_flight() != 0 {
        assert!(Instant::now() < deadline, "upstream request not cancelled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn pd_yaml(prefill: SocketAddr, decode: SocketAddr) -> String {
    format!(
        "limits: {{ health-check-interval: 1h }}\npools:\n  - model: m\n    role: prefill\n    endpoints: [\"{prefill}\"]\n  - model: m\n    role: decode\n    endpoints: [\"{decode}\"]\n"
    )
}

#[tokio::test]
async fn a_prefill_refusal_reaches_the_client_as_it_was() {
    let decode = sim(SimConfig {
        model: "m".into(),
        role: SimRole::Decode,
        ..SimConfig::default()
    })
    .await;
    let refusal = r#"{"error":{"message":"This model's maximum context length is 2048 tokens","type":"BadRequestError","param":null,"code":400}}"#;
    let (prefill, _) = scripted(json_answer("400 Bad Request", refusal)).await;
    let p = proxy(&pd_yaml(prefill, decode.local_addr())).await;
    let url = format!("http://{}/v1/chat/completions", p.proxy_addr);
    let (status, headers, body) = request_bytes("POST", &url, STREAM).await.unwrap();
    assert_eq!(status, 400);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(body, Bytes::from(refusal));
    teardown(&p).await;
    assert_eq!(outcome(&p, "prefill", "client_error").await, 1.0);
    assert_eq!(decode.metrics().prompt_tokens.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn null_kv_transfer_params_are_an_error_not_forwarded() {
    let decode = sim(SimConfig {
        model: "m".into(),
        role: SimRole::Decode,
        ..SimConfig::default()
    })
    .await;
    // A prefill server started without a KV connector.
    let answer = r#"{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"a"},"finish_reason":"length"}],"kv_transfer_params":null}"#;
    let (prefill, _) = scripted(json_answer("200 OK", answer)).await;
    let p = proxy(&pd_yaml(prefill, decode.local_addr())).await;
    let url = format!("http://{}/v1/chat/completions", p.proxy_addr);
    let (status, _, body) = request_bytes("POST", &url, STREAM).await.unwrap();
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("kv_transfer_params null"), "{body}");
    teardown(&p).await;
    assert_eq!(outcome(&p, "prefill", "upstream_error").await, 1.0);
    // Nothing went to the decode pool.
    assert_eq!(
        decode.metrics().generation_tokens.load(Ordering::Relaxed),
        0
    );
    assert_eq!(
        metric(&p, "scalecar_requests_total{model=\"m\",role=\"decode\"").await,
        0.0
    );
}

#[tokio::test]
async fn the_prefill_ttft_counts_its_queue_time() {
    // One prefill slot: the second request waits for the first's prefill,
    // and its prefill TTFT includes that wait, as a unified TTFT would.
    let prefill = sim(SimConfig {
        model: "m".into(),
        role: SimRole::Prefill,
        ..SimConfig::default()
    })
    .await;
    let decode = sim(SimConfig {
        model: "m".into(),
        role: SimRole::Decode,
        ..SimConfig::default()
    })
    .await;
    let yaml = format!(
        "limits: {{ health-check-interval: 1h }}\npools:\n  - model: m\n    role: prefill\n    endpoints: [\"{}\"]\n    policy: {{ max-concurrency: 1 }}\n  - model: m\n    role: decode\n    endpoints: [\"{}\"]\n",
        prefill.local_addr(),
        decode.local_addr()
    );
    let p = proxy(&yaml).await;
    let url = format!("http://{}/v1/completions", p.proxy_addr);
    // A long prompt: a few hundred ms of prefill.
    let prompt = "word ".repeat(4000);
    let body = format!(r#"{{"model":"m","prompt":"{prompt}","max_tokens":2}}"#);
    let ttft_sum = || {
        metric(
            &p,
            "scalecar_ttft_seconds_sum{model=\"m\",role=\"prefill\"}",
        )
    };
    // Alone: its TTFT is its prefill.
    assert_eq!(request_bytes("POST", &url, &body).await.unwrap().0, 200);
    let alone = ttft_sum().await;
    // Two at once: the second waits for the first's prefill, so together
    // they take about 1 + 2 prefills, not 1 + 1.
    let (a, b) = tokio::join!(
        request_bytes("POST", &url, &body),
        request_bytes("POST", &url, &body)
    );
    assert_eq!(a.unwrap().0, 200);
    assert_eq!(b.unwrap().0, 200);
    teardown(&p).await;
    let pair = ttft_sum().await - alone;
    assert_eq!(
        metric(
            &p,
            "scalecar_ttft_seconds_count{model=\"m\",role=\"prefill\"}"
        )
        .await,
        3.0
    );
    assert!(
        pair > 2.5 * alone,
        "two queued prefills sum to {pair} s, one alone takes {alone} s"
    );
    assert_eq!(outcome(&p, "prefill", "ok").await, 3.0);
}

#[tokio::test]
async fn a_server_that_closes_after_every_answer_gives_clients_no_errors() {
    // It says keep-alive and closes the connection after each answer, as
    // llama.cpp's server does: the proxy's reused connection is stale for
    // every request but the first.
    let lying = Script {
        head: "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: keep-alive\r\nkeep-alive: timeout=5\r\ncontent-length: 11".into(),
        pieces: vec![now(r#"{"ok":true}"#)],
        linger: Duration::ZERO,
    };
    let (addr, served) = scripted(lying).await;
    let p = proxy(&one_pool(&[addr])).await;
    let url = format!("http://{}/v1/completions", p.proxy_addr);
    let body = r#"{"model":"m","prompt":"x","max_tokens":1}"#;
    let client = HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    for i in 0..1000 {
        let req = hyper::Request::post(&url)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        resp.into_body().collect().await.unwrap();
    }
    teardown(&p).await;
    assert_eq!(served.load(Ordering::Relaxed), 1000);
    assert_eq!(outcome(&p, "unified", "ok").await, 1000.0);
    assert_eq!(outcome(&p, "unified", "upstream_error").await, 0.0);
    let v = pools(&p).await;
    assert!(
        v["pools"][0]["endpoints"][0]["ejected"] == false,
        "a stale connection is not the endpoint's failure: {v}"
    );
}

#[tokio::test]
async fn a_client_gone_during_the_prefill_leg_releases_the_prefill_pool() {
    // The prefill server takes 3 s to answer; the client leaves after the
    // leg is in flight.
    let decode = sim(SimConfig {
        model: "m".into(),
        role: SimRole::Decode,
        ..SimConfig::default()
    })
    .await;
    let slow = Script {
        pieces: vec![after(
            3000,
            r#"{"kv_transfer_params":{"remote_engine_id":"e"}}"#,
        )],
        ..json_answer(
            "200 OK",
            r#"{"kv_transfer_params":{"remote_engine_id":"e"}}"#,
        )
    };
    let (prefill, _) = scripted(slow).await;
    let p = proxy(&pd_yaml(prefill, decode.local_addr())).await;
    let url = format!("http://{}/v1/chat/completions", p.proxy_addr);
    let client = tokio::spawn(async move { request_bytes("POST", &url, STREAM).await });
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(
        &p,
        "scalecar_in_flight_requests{model=\"m\",role=\"prefill\"}",
    )
    .await
        != 1.0
    {
        assert!(Instant::now() < deadline, "the prefill leg never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    client.abort();
    let _ = client.await;
    teardown(&p).await;
    assert_eq!(outcome(&p, "prefill", "cancelled").await, 1.0);
    assert_eq!(
        metric(&p, "scalecar_requests_total{model=\"m\",role=\"decode\"").await,
        0.0
    );
}

#[tokio::test]
async fn a_successful_prefill_leg_resets_its_endpoints_failures() {
    // Prefill endpoint A fails its first request (503: ejected, one failure
    // in a row), then answers; B always answers. Once A has served a
    // prefill leg again, its failure streak is over.
    let decode = sim(SimConfig {
        model: "m".into(),
        role: SimRole::Decode,
        ..SimConfig::default()
    })
    .await;
    let ok = json_answer(
        "200 OK",
        r#"{"choices":[{"index":0,"text":"a"}],"kv_transfer_params":{"remote_engine_id":"e"}}"#,
    );
    let (a, served_a) = scripted_in_turn(vec![
        json_answer(
            "503 Service Unavailable",
            r#"{"error":{"message":"overloaded"}}"#,
        ),
        ok.clone(),
    ])
    .await;
    let (b, _) = scripted(ok).await;
    let yaml = format!(
        "limits: {{ health-check-interval: 1h }}\npools:\n  - model: m\n    role: prefill\n    endpoints: [\"{a}\", \"{b}\"]\n  - model: m\n    role: decode\n    endpoints: [\"{}\"]\n",
        decode.local_addr()
    );
    let p = proxy(&yaml).await;
    let url = format!("http://{}/v1/completions", p.proxy_addr);
    let body = r#"{"model":"m","prompt":"x","max_tokens":2}"#;
    let failures_of_a = |v: &Value| {
        v["pools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["role"] == "prefill")
            .unwrap()["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["address"] == a.to_string())
            .unwrap()["consecutive_failures"]
            .as_u64()
            .unwrap()
    };
    // Until A has answered its 503.
    let deadline = Instant::now() + Duration::from_secs(10);
    while served_a.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "A never got a request");
        request_bytes("POST", &url, body).await.unwrap();
    }
    assert_eq!(failures_of_a(&pools(&p).await), 1);
    // After its ejection (250 ms), until A has served a prefill leg.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while served_a.load(Ordering::Relaxed) < 2 {
        assert!(
            Instant::now() < deadline,
            "A never served again: {}",
            pools(&p).await
        );
        let (status, _, _) = request_bytes("POST", &url, body).await.unwrap();
        assert_eq!(status, 200);
    }
    teardown(&p).await;
    assert_eq!(failures_of_a(&pools(&p).await), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicas_prefill_rate_is_measured_in_the_path_whatever_the_queue() {
    // A model server that prefills 4,000 tok/s (counting a token per four
    // characters, as the proxy estimates prompts), sent eight streams of
    // 2,500-token prompts at once: most wait inside the engine, their TTFTs
    // climb to seconds, and the rate measured over the busy time is still
    // the engine's.
    let mut config = common::model("m");
    config.timing.prefill_tokens_per_sec = 4000.0;
    let s = sim(config).await;
    let yaml = format!(
        "scaler: {{ tick: 200ms }}\nlimits: {{ health-check-interval: 1h }}\npools:\n  - model: m\n    endpoints: [\"{}\"]\n",
        s.local_addr()
    );
    let p = proxy(&yaml).await;
    let url = format!("http://{}/v1/completions", p.proxy_addr);
    let prompt = "word ".repeat(2000);
    let body = format!(r#"{{"model":"m","prompt":"{prompt}","max_tokens":4,"stream":true}}"#);
    let streams: Vec<_> = (0..8)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            tokio::spawn(async move { request_bytes("POST", &url, &body).await })
        })
        .collect();
    for s in streams {
        assert_eq!(s.await.unwrap().unwrap().0, 200);
    }
    let slowest = metric(&p, "scalecar_ttft_seconds_sum{model=\"m\"").await;
    assert!(slowest > 8.0, "the TTFTs queued: their sum is {slowest} s");
    // The decisions made since carry it: /debug/targets and the gauge.
    // (One made mid-burst saw the work done so far: first tokens come in
    // lumps, a chunk of prompts at a time.)
    let done = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(10);
    let rate = loop {
        let (_, body) = common::get(&format!("http://{}/debug/targets", p.admin_addr))
            .await
            .unwrap();
        let v: Value = serde_json::from_str(&body).unwrap();
        let t = &v["targets"][0];
        if let Some(r) = t["prefill_rate"]
            .as_f64()
            .filter(|_| t["decided_unix"].as_f64() > Some(done))
        {
            break r;
        }
        assert!(Instant::now() < deadline, "no prefill rate measured: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        (3000.0..4400.0).contains(&rate),
        "measured {rate} tok/s; ttft sum {slowest}"
    );
    let gauge = metric(&p, "scalecar_replica_prefill_rate{").await;
    assert!((3000.0..4400.0).contains(&gauge), "gauge {gauge}");
    teardown(&p).await;
}

#[tokio::test]
async fn prompt_tokens_are_learned_in_the_servers_tokenizer() {
    // A model server whose tokenizer makes a token of every 7 characters
    // (as gemma-3's does of English prose), where the proxy estimates 4.
    let s = sim(SimConfig {
        model: "m".into(),
        chars_per_token: 7.0,
        ..SimConfig::default()
    })
    .await;
    let p = proxy(&one_pool(&[s.local_addr()])).await;
    let url = format!("http://{}/v1/chat/completions", p.proxy_addr);
    let prompt_counter = "scalecar_tokens_total{model=\"m\",role=\"unified\",kind=\"prompt\"}";
    let body = |words: usize, stream: bool| {
        serde_json::json!({
            "model": "m",
            "messages": [{"role": "user", "content": "lantern river ".repeat(words)}],
            "max_tokens": 2,
            "stream": stream,
            "stream_options": if stream { serde_json::json!({"include_usage": true}) } else { Value::Null },
        })
        .to_string()
    };
    // What the server counts, from its own usage.
    let served = |answer: &str| -> u64 {
        answer
            .split("\"prompt_tokens\":")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap()
    };
    assert_eq!(
        pools(&p).await["pools"][0]["prompt_token_ratio"],
        Value::Null
    );
    // Before any answer: the estimate, 4 characters a token of the JSON.
    let (status, _, first) = request("POST", &url, &body(300, false)).await.unwrap();
    assert_eq!(status, 200);
    let estimated = metric(&p, prompt_counter).await;
    let counted = served(&first) as f64;
    assert!(
        estimated / counted > 1.6,
        "estimate {estimated}, server {counted}"
    );
    // Answers with usage, streamed and not, teach the ratio.
    for (i, words) in [80, 400, 150, 900, 250, 600].iter().enumerate() {
        let (status, _, _) = request("POST", &url, &body(*words, i % 2 == 0))
            .await
            .unwrap();
        assert_eq!(status, 200);
    }
    let ratio = pools(&p).await["pools"][0]["prompt_token_ratio"]
        .as_f64()
        .unwrap();
    assert!((0.5..0.62).contains(&ratio), "ratio {ratio}, about 4/7");
    assert!(
        (metric(&p, "scalecar_prompt_token_ratio{").await - ratio).abs() < 1e-9,
        "the gauge is the pool's ratio"
    );
    // A new prompt is now counted in the server's tokens.
    let before = metric(&p, prompt_counter).await;
    let (_, _, answer) = request("POST", &url, &body(500, false)).await.unwrap();
    let counted = served(&answer) as f64;
    let recorded = metric(&p, prompt_counter).await - before;
    assert!(
        (recorded - counted).abs() / counted < 0.05,
        "recorded {recorded}, server {counted}"
    );
    teardown(&p).await;
}

#[tokio::test]
async fn a_prompt_the_server_refuses_is_not_demand() {
    // A model server whose KV cache cannot hold a 10k-token prompt: it
    // answers 400, as vLLM and llama.cpp do for a prompt over the context.
    let s = sim(SimConfig {
        model: "m".into(),
        timing: scalecar_loadtest::sim::Timing {
            kv_capacity: 4_000,
            ..Default::default()
        },
        ..SimConfig::default()
    })
    .await;
    let p = proxy(&one_pool(&[s.local_addr()])).await;
    let url = format!("http://{}/v1/completions", p.proxy_addr);
    let body = |chars: usize| {
        serde_json::json!({"model": "m", "prompt": "x".repeat(chars), "max_tokens": 4}).to_string()
    };
    let (status, _, _) = request("POST", &url, &body(4_000)).await.unwrap();
    assert_eq!(status, 200);
    let rate = |pools: &Value| {
        pools["pools"][0]["stable"]["prompt_tokens_per_sec"]
            .as_f64()
            .unwrap()
    };
    let before = rate(&pools(&p).await);
    assert!(before > 0.0);
    let (status, _, answer) = request("POST", &url, &body(40_000)).await.unwrap();
    assert_eq!(status, 400, "{answer}");
    assert_eq!(outcome(&p, "unified", "client_error").await, 1.0);
    // The refused prompt left no trace in the windows: one arrival, and
    // its ~1,000 prompt tokens over a window no shorter than before — not
    // 11,000 (the rate only falls as the window lengthens).
    let after = pools(&p).await;
    assert_eq!(after["pools"][0]["stable"]["arrivals"], 1, "{after}");
    assert!(rate(&after) <= before, "{} > {before}", rate(&after));
    teardown(&p).await;
}

#[tokio::test]
async fn a_server_out_of_room_is_still_demand() {
    // 429: the request was fine, the server had no room — the load a
    // scaler is for, unlike a 400.
    let (addr, _) = scripted(json_answer(
        "429 Too Many Requests",
        r#"{"error":{"message":"queue full","type":"rate_limit"}}"#,
    ))
    .await;
    let p = proxy(&one_pool(&[addr])).await;
    let url = format!("http://{}/v1/completions", p.proxy_addr);
    let body = r#"{"model":"m","prompt":"a prompt that counts","max_tokens":4}"#;
    let (status, _, _) = request("POST", &url, body).await.unwrap();
    assert_eq!(status, 429);
    let stable = &pools(&p).await["pools"][0]["stable"];
    assert_eq!(stable["arrivals"], 1, "{stable}");
    assert!(stable["prompt_tokens_per_sec"].as_f64().unwrap() > 0.0);
    teardown(&p).await;
}

#[tokio::test]
async fn the_usage_chunk_asked_for_is_cut_even_split_and_before_trailers() {
    // Chunked, as model servers send streams: the usage chunk the proxy
    // asked for split across two chunks, an unterminated last event, then
    // trailers. The client gets every other byte, in order.
    let token = format!("{}\n\n", chunk(r#"{"content":"a"}"#));
    let usage = r#"data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":1}}"#
        .to_string()
        + "\n\n";
    let (u1, u2) = usage.split_at(20);
    let last = "data: [DONE]";
    let chunked = |s: &str| format!("{:x}\r\n{s}\r\n", s.len());
    let script = Script {
        head: "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\ntrailer: x-done\r\nconnection: close".into(),
        pieces: vec![
            after(20, chunked(&token)),
            after(20, chunked(u1)),
            after(20, chunked(u2)),
            after(20, chunked(last)),
            after(20, "0\r\nx-done: 1\r\n\r\n"),
        ],
        linger: Duration::ZERO,
    };
    let (body, p) = through(script).await;
    assert_eq!(body, Bytes::from(format!("{token}{last}")));
    assert_eq!(
        metric(
            &p,
            "scalecar_tokens_total{model=\"m\",role=\"unified\",kind=\"generated\"}"
        )
        .await,
        1.0
    );
    assert_eq!(outcome(&p, "unified", "ok").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kv_cache_is_read_from_the_engines_and_the_key_overrides_it() {
    // Two engines of one pool report 48,000 and 32,000 tokens of KV cache
    // (vLLM's cache_config_info): the pool plans on the smaller. A second
    // pool sets `kv-cache-tokens`, which wins over what its engine says.
    let engine = |model: &str, kv: u64| {
        let mut config = common::model(model);
        config.timing.kv_capacity = kv;
        sim(config)
    };
    let (a, b, c) = (
        engine("m", 48_000).await,
        engine("m", 32_000).await,
        engine("keyed", 48_000).await,
    );
    let yaml = format!(
        "scaler: {{ tick: 200ms }}\npools:\n  - model: m\n    endpoints: [\"{}\", \"{}\"]\n    policy: {{ algorithm: slo, ttft-target: 1s }}\n  - model: keyed\n    endpoints: [\"{}\"]\n    policy: {{ algorithm: slo, ttft-target: 1s, kv-cache-tokens: \"10000\" }}\n",
        a.local_addr(),
        b.local_addr(),
        c.local_addr()
    );
    let p = proxy(&yaml).await;
    // Some traffic, so that slo decides (and says why).
    for model in ["m", "keyed"] {
        let body = format!(r#"{{"model":"{model}","prompt":"a few words","max_tokens":2}}"#);
        let url = format!("http://{}/v1/completions", p.proxy_addr);
        assert_eq!(request("POST", &url, &body).await.unwrap().0, 200);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let targets = loop {
        let (_, body) = common::get(&format!("http://{}/debug/targets", p.admin_addr))
            .await
            .unwrap();
        let v: Value = serde_json::from_str(&body).unwrap();
        let kv = |model: &str| {
            v["targets"]
                .as_array()
                .and_then(|ts| ts.iter().find(|t| t["model"] == model))
                .and_then(|t| t["kv_cache_tokens"].as_u64())
        };
        if kv("m") == Some(32_000) && kv("keyed") == Some(10_000) {
            break v;
        }
        assert!(Instant::now() < deadline, "no KV cache read: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let reason = |model: &str| {
        targets["targets"]
            .as_array()
            .and_then(|ts| ts.iter().find(|t| t["model"] == model))
            .map(|t| t["reason"].to_string())
            .unwrap()
    };
    assert!(
        reason("m").contains("KV 32000 tokens per replica"),
        "{}",
        reason("m")
    );
    assert!(
        reason("keyed").contains("KV 10000 tokens per replica"),
        "{}",
        reason("keyed")
    );
    let (_, text) = common::get(&format!("http://{}/metrics", p.admin_addr))
        .await
        .unwrap();
    let gauge = |model: &str| {
        text.lines()
            .find(|l| {
                l.starts_with("scalecar_replica_kv_cache_tokens{")
                    && l.contains(&format!("model=\"{model}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    assert_eq!(gauge("m"), Some(32_000.0), "{text}");
    // Each endpoint's own report, in /debug/pools.
    let v = pools(&p).await;
    let reported: Vec<(String, Option<u64>)> = v["pools"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|pool| pool["model"] == "m")
        .flat_map(|pool| pool["endpoints"].as_array().unwrap().clone())
        .map(|e| {
            (
                e["address"].as_str().unwrap().to_string(),
                e["kv_cache_tokens"].as_u64(),
            )
        })
        .collect();
    assert!(
        reported.contains(&(a.local_addr().to_string(), Some(48_000))),
        "{v}"
    );
    assert!(
        reported.contains(&(b.local_addr().to_string(), Some(32_000))),
        "{v}"
    );
    assert_eq!(gauge("keyed"), Some(10_000.0), "{text}");
    teardown(&p).await;
}
