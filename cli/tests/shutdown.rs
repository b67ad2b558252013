//! SIGTERM as Kubernetes sends it during a rollout, to the real binary:
//! `/readyz` turns 503 at once, the proxy keeps serving new connections
//! for `shutdown-delay` (endpoints take that long to drop the pod) with
//! HTTP/1 responses asking kept-alive clients to re-dial, then stops
//! accepting and lets open streams finish — no request fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../proxy/tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs,
};
use common::{get, model, request, sim};
use futures_util::StreamExt;
use scalecar_loadtest::sim::{SimConfig, Timing};

/// A `scalecar run` child process, killed on every way out.
struct Gateway {
    child: std::process::Child,
    proxy: String,
    admin: String,
    config: std::path::PathBuf,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
    }
}

/// Starts the binary on `yaml` and reads where it serves from its log.
fn gateway(yaml: &str) -> Gateway {
    let config =
        std::env::temp_dir().join(format!("scalecar-shutdown-{}.yaml", std::process::id()));
    std::fs::write(&config, yaml).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_scalecar"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut g = Gateway {
        child,
        proxy: String::new(),
        admin: String::new(),
        config,
    };
    (g.proxy, g.admin) = common::serving_addresses(stderr, Duration::from_secs(20))
        .expect("the gateway logs where it serves");
    g
}

fn chat(max_tokens: u32, stream: bool) -> CreateChatCompletionRequest {
    let mut b = CreateChatCompletionRequestArgs::default();
    b.model("m").max_completion_tokens(max_tokens).messages([
        ChatCompletionRequestUserMessageArgs::default()
            .content("roll me gently")
            .build()
            .unwrap()
            .into(),
    ]);
    if stream {
        b.stream(true);
    }
    b.build().unwrap()
}

async fn ready_status(admin: &str) -> Option<u16> {
    get(&format!("http://{admin}/readyz"))
        .await
        .ok()
        .map(|(s, _)| s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_serves_through_the_delay_then_drains_without_a_failed_request() {
    // 20 ms a token: a 150-token stream outlives the 2 s delay.
    let upstream = sim(SimConfig {
        timing: Timing {
            decode_base: Duration::from_millis(20),
            ..Timing::default()
        },
        ..model("m")
    })
    .await;
    let mut g = gateway(&format!(
        "proxy: {{ listen: \"127.0.0.1:0\", workers: 1 }}\nadmin: {{ listen: \"127.0.0.1:0\" }}\nlimits: {{ shutdown-delay: 2s, shutdown-grace: 30s }}\npools:\n  - model: m\n    endpoints: [\"{}\"]\n",
        upstream.local_addr()
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while ready_status(&g.admin).await != Some(200) {
        assert!(Instant::now() < deadline, "gateway never ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // One client, kept-alive connections, as an application holds it.
    let client = Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("http://{}/v1", g.proxy))
            .with_api_key("unused"),
    );
    let (started_tx, mut started) = tokio::sync::mpsc::channel(8);
    let mut streams = Vec::new();
    for _ in 0..4 {
        let client = client.clone();
        let started_tx = started_tx.clone();
        streams.push(tokio::spawn(async move {
            let mut s = client
                .chat()
                .create_stream(chat(150, true))
                .await
                .map_err(|e| e.to_string())?;
            let mut chunks = 0u32;
            while let Some(chunk) = s.next().await {
                chunk.map_err(|e| format!("after {chunks} chunks: {e}"))?;
                chunks += 1;
                if chunks == 1 {
                    let _ = started_tx.send(()).await;
                }
            }
            Ok::<u32, String>(chunks)
        }));
    }
    for _ in 0..4 {
        started.recv().await.expect("every stream starts");
    }

    let pid = g.child.id().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(kill.success());

    // Not ready at once…
    let deadline = Instant::now() + Duration::from_secs(5);
    while ready_status(&g.admin).await != Some(503) {
        assert!(Instant::now() < deadline, "/readyz never turned 503");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // …yet a client the endpoints still send here is served, on a new
    // connection, and told to re-dial for the next one.
    let body = serde_json::to_string(&chat(4, false)).unwrap();
    let (status, headers, text) = request(
        "POST",
        &format!("http://{}/v1/chat/completions", g.proxy),
        &body,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        headers.get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    // The kept-alive application client too.
    let answer = client.chat().create(chat(4, false)).await.unwrap();
    assert!(!answer.choices.is_empty());

    // Every stream that was open runs to its end.
    for s in streams {
        let chunks = s.await.unwrap().unwrap();
        assert!(chunks >= 150, "a stream ended early after {chunks} chunks");
    }
    // Then the process leaves on its own, successfully, and accepts no
    // more.
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(status) = g.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the gateway never exited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit}");
    assert!(tokio::net::TcpStream::connect(&g.proxy).await.is_err());
}
