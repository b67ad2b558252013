//! The simulator against the real thing: the same load through real HTTP
//! into a real model-sim (streamed, measured by loadgen's client) and
//! through `scalecar simulate`'s virtual time, one replica each. Their
//! TTFT and ITL must agree within 10 %.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use scalecar_config::{Policy, Role};
use scalecar_loadtest::loadgen::{Arrival, Outcome, StreamingClient, run_plan};
use scalecar_loadtest::sim::{ModelSim, SimConfig, Timing};
use scalecar_loadtest::simulate::{Settings, simulate};
use scalecar_scaler::algorithm::AlgorithmRegistry;

/// Steps long enough that a millisecond of timer slack is noise: 50 ms
/// decode steps, prefill at 4,000 tokens/s in 512-token chunks, at most
/// four sequences at once (so requests also wait in the engine).
fn timing() -> Timing {
    Timing {
        prefill_tokens_per_sec: 4_000.0,
        prefill_chunk: 512,
        decode_base: Duration::from_millis(50),
        decode_per_seq: Duration::from_millis(2),
        decode_per_1k_kv: Duration::from_millis(1),
        max_num_seqs: 4,
        kv_capacity: 50_000,
        ..Timing::default()
    }
}

/// 1.4 req/s for 25 s, prompts 100–1,300 tokens, 8–40 output tokens: busy
/// (TTFT about twice a lone request's) but not saturated, where model-sim's
/// 1 ms timer tick per step would move queueing delays by far more than
/// 1 ms (at 2 req/s the mean TTFT was 11 % apart, ITL 2 %).
fn trace() -> Vec<Arrival> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..36)
        .map(|i| Arrival {
            at: Duration::from_millis(700 * i),
            prompt_tokens: 100 + (next() % 1200) as u32,
            max_tokens: 8 + (next() % 33) as u32,
        })
        .collect()
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

/// The relative error, or a message saying how far apart they are.
fn within(what: &str, simulated: f64, real: f64) -> Result<f64, String> {
    let error = (simulated - real).abs() / real;
    let line = format!(
        "{what}: simulated {simulated:.4} s, real {real:.4} s ({:.1} % apart)",
        error * 100.0
    );
    eprintln!("{line}");
    if error <= 0.10 { Ok(error) } else { Err(line) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_matches_a_real_model_sim_within_ten_percent() {
    let trace = trace();

    // Real: model-sim on 127.0.0.1:0, streamed requests at the trace's times.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = ModelSim::spawn(
        SimConfig {
            model: "m".into(),
            timing: timing(),
            ..SimConfig::default()
        },
        listener,
    );
    let base = format!("http://{}", sim.local_addr());
    let client = StreamingClient::new(&base, "m", Duration::from_secs(60)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    // Ready when it answers a request.
    loop {
        let probe = Arrival {
            at: Duration::ZERO,
            prompt_tokens: 1,
            max_tokens: 1,
        };
        if client.send(&probe).await.outcome == Outcome::Ok {
            break;
        }
        assert!(Instant::now() < deadline, "model-sim never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (records, _) = run_plan(&client, &trace, 1000, None, std::future::pending()).await;
    sim.shutdown();
    assert!(records.iter().all(|r| r.outcome == Outcome::Ok));
    let real_ttft: Vec<f64> = records
        .iter()
        .map(|r| r.ttft.unwrap().as_secs_f64())
        .collect();
    let real_itl: Vec<f64> = records
        .iter()
        .filter(|r| r.tokens > 1)
        .map(|r| r.itl_sum.as_secs_f64() / f64::from(r.tokens - 1))
        .collect();

    // Simulated: the same arrivals, one replica that never scales.
    let keys: BTreeMap<String, String> = [("min-replicas", "1"), ("max-replicas", "1")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let policy = Policy::from_keys(&keys, Role::Unified).unwrap();
    let settings = Settings::new(timing());
    let run = simulate(
        &trace,
        &settings,
        &policy,
        &AlgorithmRegistry::with_builtins(),
        |_| {},
    )
    .await
    .unwrap();
    let sim_ttft: Vec<f64> = run
        .requests
        .iter()
        .map(|r| r.ttft.unwrap().as_secs_f64())
        .collect();
    let sim_itl: Vec<f64> = run
        .requests
        .iter()
        .filter(|r| r.generated > 1)
        .map(|r| (r.e2e.unwrap() - r.ttft.unwrap()).as_secs_f64() / f64::from(r.generated - 1))
        .collect();
    assert_eq!(sim_ttft.len(), real_ttft.len());

    let mut results = vec![within("mean TTFT", mean(&sim_ttft), mean(&real_ttft))];
    let p90 = |xs: &[f64]| {
        let mut v = xs.to_vec();
        v.sort_by(f64::total_cmp);
        v[(v.len() * 9).div_ceil(10) - 1]
    };
    results.push(within("TTFT p90", p90(&sim_ttft), p90(&real_ttft)));
    results.push(within("mean ITL", mean(&sim_itl), mean(&real_itl)));
    results.push(within("ITL p90", p90(&sim_itl), p90(&real_itl)));
    let failures: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
