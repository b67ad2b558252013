//! What the model servers say of themselves on their own `/metrics`: the
//! size of one replica's KV cache, which `slo` plans the tokens in flight
//! against. Requests show the proxy how fast a replica prefills; how many
//! tokens it can hold only the engine knows.
//!
//! Read from vLLM's `vllm:cache_config_info` (`num_gpu_blocks` ×
//! `block_size`, labels of an info gauge) and SGLang's
//! `sglang:max_total_num_tokens`. Servers that report neither (llama.cpp)
//! leave the pool without a KV term unless the policy's `kv-cache-tokens`
//! gives one.
//!
//! Each endpoint is read once when it joins and again every
//! `REREAD_EVERY` (a cache is fixed for an engine's life; a pod with a
//! new engine usually comes with a new address). A pool's value is the
//! smallest its endpoints reported — the replica that fills first — and
//! stays when its endpoints go (a pool scaled to zero keeps what it
//! learned). Nothing here is on the request path.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full, Limited};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::dataplane::DataPlane;
use crate::pool::Endpoint;

/// How often the pools' endpoints are looked over for ones to read.
const TICK: Duration = Duration::from_secs(10);
/// An endpoint is read again after this long, or this soon after a read
/// that got no answer (a server starting, or one that never answers
/// `/metrics`, is not asked every tick).
const REREAD_EVERY: Duration = Duration::from_secs(300);
const RETRY_FAILED: Duration = Duration::from_secs(30);
/// One read's deadline, and the most of a `/metrics` page read (vLLM's
/// is 100–300 kB with its histograms).
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_PAGE: usize = 8 << 20;
/// Endpoints read at once.
const CONCURRENT_READS: usize = 16;

/// Tokens one replica's KV cache holds, from a Prometheus text page; the
/// smallest when several engines (data-parallel ranks) report. `None`
/// when the page says nothing usable (a vLLM started without a block
/// count says `"None"`).
pub fn kv_capacity(page: &str) -> Option<u64> {
    page.lines()
        .filter_map(|line| {
            let line = line.trim_start();
            if let Some(rest) = line.strip_prefix("vllm:cache_config_info") {
                let (labels, _) = sample(rest)?;
                let blocks = label(labels, "num_gpu_blocks")?.parse::<u64>().ok()?;
                let size = label(labels, "block_size")?.parse::<u64>().ok()?;
                blocks.checked_mul(size)
            } else if let Some(rest) = line.strip_prefix("sglang:max_total_num_tokens") {
                let (_, value) = sample(rest)?;
                let v: f64 = value.split_whitespace().next()?.parse().ok()?;
                // Whole tokens within what an f64 holds exactly.
                (1.0..9.0e15).contains(&v).then_some(v as u64)
            } else {
                None
            }
        })
        .filter(|&n| n > 0)
        .min()
}

/// A sample's label set (without its braces; empty when it has none) and
/// the rest of its line, from what follows the metric's name. `None` when
/// the name goes on (`vllm:cache_config_info_x` is another metric) or the
/// braces never close.
fn sample(rest: &str) -> Option<(&str, &str)> {
    match rest.strip_prefix('{') {
        Some(inner) => {
            let end = labels_end(inner)?;
            Some((inner.get(..end)?, inner.get(end + 1..)?))
        }
        None if rest.starts_with([' ', '\t']) => Some(("", rest)),
        None => None,
    }
}

/// The index of the `}` ending a label set, past quoted values (which may
/// hold `}` and escaped quotes).
fn labels_end(s: &str) -> Option<usize> {
    let mut at = 0;
    loop {
        let next = at + s.get(at..)?.find(['"', '}'])?;
        if s.as_bytes().get(next) == Some(&b'}') {
            return Some(next);
        }
        let value = next + 1;
        at = value + quoted_end(s.get(value..)?)? + 1;
    }
}

/// The value of `name="…"` in a label set, unescaped only as far as the
/// numbers looked for need (a value with an escape is returned as is).
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let mut rest = labels;
    loop {
        let (key, after) = rest.trim_start_matches([',', ' ']).split_once('=')?;
        let after = after.strip_prefix('"')?;
        let end = quoted_end(after)?;
        if key.trim() == name {
            return after.get(..end);
        }
        rest = after.get(end + 1..)?;
    }
}

/// The index of the closing quote of a value that `s` begins.
fn quoted_end(s: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match (escaped, c) {
            (true, _) => escaped = false,
            (false, '\\') => escaped = true,
            (false, '"') => return Some(i),
            _ => {}
        }
    }
    None
}

/// What one read found.
#[derive(Debug, Clone, Copy)]
struct Read {
    at: Instant,
    kv: Option<u64>,
}

/// Reads every pool's endpoints' `/metrics` until `stop`, and sets each
/// pool's KV cache size on its signals.
pub async fn read_engines(plane: Arc<DataPlane>, mut stop: watch::Receiver<bool>) {
    let mut reads: HashMap<SocketAddr, Read> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let pools: Vec<_> = plane.routes().entries();
        let now = Instant::now();
        let due: Vec<Arc<Endpoint>> = pools
            .iter()
            .flat_map(|e| e.pool.endpoints().iter().cloned().collect::<Vec<_>>())
            .filter(|ep| {
                reads
                    .get(&ep.addr)
                    .is_none_or(|r| now.saturating_duration_since(r.at) >= REREAD_EVERY)
            })
            .collect();
        let plane_ref = &plane;
        let found: Vec<(SocketAddr, Result<Option<u64>, ()>)> = futures_util::stream::iter(due)
            .map(|ep| async move { (ep.addr, read(plane_ref, &ep).await) })
            .buffer_unordered(CONCURRENT_READS)
            .collect()
            .await;
        let now = Instant::now();
        for (addr, kv) in found {
            let read = match kv {
                Ok(kv) => Read { at: now, kv },
                // What an earlier read found stands until one succeeds.
                Err(()) => Read {
                    at: now
                        .checked_sub(REREAD_EVERY.saturating_sub(RETRY_FAILED))
                        .unwrap_or(now),
                    kv: reads.get(&addr).and_then(|r| r.kv),
                },
            };
            reads.insert(addr, read);
        }
        let mut present = std::collections::HashSet::new();
        for entry in &pools {
            let endpoints = entry.pool.endpoints();
            let mut smallest: Option<u64> = None;
            for ep in endpoints.iter() {
                present.insert(ep.addr);
                let kv = reads.get(&ep.addr).and_then(|r| r.kv);
                // Each tick: an endpoint replaced by discovery starts blank.
                ep.set_kv_capacity(kv);
                smallest = smallest.into_iter().chain(kv).min();
            }
            let signals = &entry.pool.signals;
            if let Some(kv) = smallest
                && signals.kv_capacity() != Some(kv)
            {
                tracing::info!(model = %entry.pool.model, role = %entry.pool.role, kv_cache_tokens = kv, "KV cache read from the engines' /metrics");
                signals.set_kv_capacity(Some(kv));
            }
        }
        // Endpoints that left every pool are forgotten.
        reads.retain(|a, _| present.contains(a));
    }
}

/// One `GET /metrics`: `Ok(None)` when the server answered without a KV
/// size (or without metrics: 404), `Err` when it did not answer.
async fn read(plane: &DataPlane, ep: &Endpoint) -> Result<Option<u64>, ()> {
    let req = http::Request::get("/metrics")
        .header(http::header::HOST, ep.host.clone())
        .body(Full::new(Bytes::new()))
        .map_err(|_| ())?;
    let read = async {
        let (resp, conn) = plane.upstream().send(ep.addr, req).await.ok()?;
        let ok = resp.status().is_success();
        let body = match Limited::new(resp.into_body(), MAX_PAGE).collect().await {
            Ok(b) => b.to_bytes(),
            // A page past the bound is an answer (read again in 5 minutes,
            // not every 30 s); a body cut short is not.
            Err(e)
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                return Some(None);
            }
            Err(_) => return None,
        };
        conn.release();
        if !ok {
            return Some(None);
        }
        // A stray invalid byte costs its line, not the page.
        Some(kv_capacity(&String::from_utf8_lossy(&body)))
    };
    match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(Some(kv)) => Ok(kv),
        Ok(None) | Err(_) => {
            tracing::debug!(endpoint = %ep.addr, "engine /metrics not read");
            Err(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_cache_config_info_is_blocks_times_block_size() {
        let page = "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n\
            # TYPE vllm:cache_config_info gauge\n\
            vllm:cache_config_info{block_size=\"16\",cache_dtype=\"auto\",cpu_offload_gb=\"0\",enable_prefix_caching=\"True\",gpu_memory_utilization=\"0.9\",num_cpu_blocks=\"None\",num_gpu_blocks=\"27689\",prefix_caching_hash_algo=\"builtin\"} 1.0\n\
            vllm:num_requests_running{model_name=\"m\"} 3.0\n";
        assert_eq!(kv_capacity(page), Some(27689 * 16));
    }

    #[test]
    fn sglang_max_total_num_tokens_with_and_without_labels() {
        assert_eq!(
            kv_capacity("sglang:max_total_num_tokens{model_name=\"m\",tp_rank=\"0\"} 512345.0\n"),
            Some(512_345)
        );
        assert_eq!(
            kv_capacity("sglang:max_total_num_tokens 1e5\n"),
            Some(100_000)
        );
    }

    #[test]
    fn several_engines_report_the_smallest() {
        let page = "vllm:cache_config_info{engine=\"0\",block_size=\"16\",num_gpu_blocks=\"100\"} 1\n\
            vllm:cache_config_info{engine=\"1\",block_size=\"16\",num_gpu_blocks=\"90\"} 1\n";
        assert_eq!(kv_capacity(page), Some(1440));
    }

    #[test]
    fn nothing_usable_is_none() {
        for page in [
            "",
            "# vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"9\"} 1\n",
            "vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"None\"} 1.0\n",
            "vllm:cache_config_info{block_size=\"16\"} 1.0\n",
            "vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"0\"} 1.0\n",
            "vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"-3\"} 1.0\n",
            "vllm:cache_config_info{block_size=\"4294967296\",num_gpu_blocks=\"4294967296000\"} 1\n",
            "vllm:cache_config_info_other{block_size=\"16\",num_gpu_blocks=\"9\"} 1\n",
            "vllm:cache_config_info{block_size=\"16\",num_gpu_blocks=\"9\"",
            "sglang:max_total_num_tokens NaN\n",
            "sglang:max_total_num_tokens -5\n",
            "sglang:max_total_num_tokens 1e300\n",
            "sglang:max_total_num_tokens{x=\"}\"\n",
            "llamacpp:prompt_tokens_total 10\n",
        ] {
            assert_eq!(kv_capacity(page), None, "{page:?}");
        }
    }

    #[test]
    fn every_cut_and_every_byte_changed_reads_without_panic() {
        let page = "vllm:cache_config_info{note=\"x}\\\"\",block_size=\"16\",num_gpu_blocks=\"12\"} 1.0\n\
            sglang:max_total_num_tokens{tp_rank=\"0\"} 700.0\n";
        assert_eq!(kv_capacity(page), Some(192));
        for cut in 0..=page.len() {
            let Some(part) = page.get(..cut) else {
                continue;
            };
            // A cut page reads nothing it did not hold whole.
            assert!(
                matches!(
                    kv_capacity(part),
                    None | Some(192) | Some(7) | Some(70) | Some(700)
                ),
                "{part:?}"
            );
        }
        for i in 0..page.len() {
            for b in [b'"', b'}', b'{', b'\\', b',', b'=', b' ', b'\n', b'9', b'x'] {
                let mut bytes = page.as_bytes().to_vec();
                bytes[i] = b;
                if let Ok(p) = std::str::from_utf8(&bytes) {
                    let _ = kv_capacity(p);
                }
            }
        }
    }

    #[test]
    fn quoted_braces_commas_and_escapes_do_not_confuse_the_labels() {
        let page = "vllm:cache_config_info{note=\"a}b,num_gpu_blocks=\\\"7\\\"\",block_size=\"8\",num_gpu_blocks=\"5\"} 1\n";
        assert_eq!(kv_capacity(page), Some(40));
    }
}
