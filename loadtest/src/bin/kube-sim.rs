//! `kube-sim`: a Kubernetes API server on loopback for tests and demos;
//! `kubectl` and kube-rs work against it through the kubeconfig it writes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use scalecar_loadtest::kube_sim::{Fault, KubeSim, KubeSimConfig, Rule};

#[derive(Debug, Parser)]
#[command(
    name = "kube-sim",
    version,
    about = "A Kubernetes API server for tests: real REST/watch protocol, Deployments whose Pods are in-process model-sims on their own loopback addresses",
    after_help = "EXAMPLE\n  kube-sim --listen 127.0.0.1:6443 --kubeconfig /tmp/kube-sim.yaml &\n  export KUBECONFIG=/tmp/kube-sim.yaml\n  kubectl apply --validate=false -f - <<'EOF'\n  apiVersion: apps/v1\n  kind: Deployment\n  metadata: {name: llama}\n  spec:\n    selector: {matchLabels: {app: llama}}\n    template:\n      metadata: {labels: {app: llama}}\n      spec: {containers: [{name: vllm, image: vllm/vllm-openai, args: [--model, llama-3-8b, --port, \"8000\"]}]}\n  EOF\n  kubectl scale deploy/llama --replicas=3 && kubectl get pods -o wide\n  curl http://$(kubectl get pods -l app=llama -o jsonpath='{.items[0].status.podIP}'):8000/v1/models\n\nREAL PODS\n  kube-sim --run-image ghcr.io/scalecar/scalecar=target/release/scalecar --kubeconfig /tmp/kube-sim.yaml &\n  kubectl kustomize deploy/ | kubectl apply --validate=false -f -   # the gateway pods run the real binary\n\nFAULTS (also at runtime: curl -X POST http://127.0.0.1:6443/kube-sim/faults -d '{\"rules\":[{\"verb\":\"patch\",\"error\":500,\"rate\":0.5}]}')\n  --fail patch:deployments:500:0.5   --latency 50ms   --drop-watches-after 30s"
)]
struct Args {
    /// Address to serve on (plain HTTP).
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Write a kubeconfig for this server here.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Changes kept for watches to resume from; older versions get 410.
    #[arg(long, default_value_t = 10_000)]
    history: usize,
    /// Inject errors: VERB:RESOURCE:STATUS:RATE (`*` for any verb or
    /// resource; STATUS 429, 500 or 503); repeatable.
    #[arg(long = "fail")]
    fail: Vec<String>,
    /// Add this latency to every request.
    #[arg(long, value_parser = humantime::parse_duration)]
    latency: Option<Duration>,
    /// End every watch after this long (clients must resume).
    #[arg(long, value_parser = humantime::parse_duration)]
    drop_watches_after: Option<Duration>,
    /// Pods whose image is IMAGE (any tag) run BINARY as a real process:
    /// their args, env, ConfigMap and Secret volumes, on their own IP;
    /// repeatable. E.g. ghcr.io/scalecar/scalecar=target/release/scalecar.
    #[arg(long = "run-image", value_name = "IMAGE=BINARY")]
    run_image: Vec<scalecar_loadtest::kube_sim::runner::RunImage>,
}

fn rule(spec: &str) -> anyhow::Result<Rule> {
    let parts: Vec<&str> = spec.split(':').collect();
    let [verb, resource, status, rate] = parts.as_slice() else {
        anyhow::bail!("--fail {spec:?}: expected VERB:RESOURCE:STATUS:RATE");
    };
    let status: u16 = status
        .parse()
        .with_context(|| format!("--fail {spec:?}: status {status:?}"))?;
    anyhow::ensure!(
        matches!(status, 429 | 500 | 503),
        "--fail {spec:?}: status must be 429, 500 or 503"
    );
    let rate: f64 = rate
        .parse()
        .with_context(|| format!("--fail {spec:?}: rate {rate:?}"))?;
    anyhow::ensure!(
        (0.0..=1.0).contains(&rate),
        "--fail {spec:?}: rate must be in [0, 1]"
    );
    let any = |s: &str| (s != "*").then(|| s.to_string());
    Ok(Rule {
        verb: any(verb),
        resource: any(resource),
        rate,
        fault: Fault::Error(status),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let rules = args
        .fail
        .iter()
        .map(|s| rule(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let sim = KubeSim::start(
        KubeSimConfig {
            history: args.history,
            run_images: args.run_image.clone(),
            ..KubeSimConfig::default()
        },
        listener,
    )?;
    for r in rules {
        sim.faults().add(r);
    }
    if let Some(l) = args.latency {
        sim.faults().add(Rule {
            verb: None,
            resource: None,
            rate: 1.0,
            fault: Fault::Latency(l),
        });
    }
    sim.faults().set_drop_watches_after(args.drop_watches_after);
    if let Some(path) = &args.kubeconfig {
        sim.write_kubeconfig(path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    tracing::info!(url = %sim.url(), kubeconfig = ?args.kubeconfig, "kube-sim serving");
    // SIGTERM as well as Ctrl-C: a shutdown stops the pods' real processes,
    // which would otherwise outlive kube-sim holding their addresses.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    sim.shutdown().await;
    Ok(())
}
