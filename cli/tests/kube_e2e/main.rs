//! scalecar in a cluster, end to end: a kube-sim whose pods are model-sims,
//! scalecar started from a `kubernetes:` config through a kubeconfig (the
//! real kube-rs client), requests through the real proxy, and the cluster
//! read back through the API — and through kubectl where users would.
//! One test binary, a module per concern; `harness` holds what they share.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../../proxy/tests/common/mod.rs"]
mod common;
mod deploy;
mod faults;
mod harness;
mod inference_pool;
mod leader;
mod peers;
mod rbac;
mod workloads;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
};
use common::{get, metric, pools, proxy, request, teardown, workload};
use futures_util::StreamExt;
use harness::*;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use scalecar_loadtest::kube_sim::{Fault, KubeSim, KubeSimConfig, Rule};
use scalecar_proxy::server::ProxyHandle;
use serde_json::{Value, json};
