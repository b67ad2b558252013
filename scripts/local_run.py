"""What the scripts that run scalecar locally share (scripts/soak,
scripts/check-real-server): child processes whose stderr says when they
serve, GETs that report a status rather than raise, and `scalecar run`
started on a config and waited on until ready."""

import json
import os
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request


def start(args, env=None):
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def wait_line(p, needle, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = p.stderr.readline()
        if not line:
            break
        if needle in line:
            # Keep draining stderr so the child never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
            return line
    raise RuntimeError(f"no {needle!r} from {p.args[0]}")


def get(addr, path):
    try:
        with urllib.request.urlopen(f"http://{addr}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        # A status is an answer (503 from /readyz while the endpoints' first
        # health check is pending).
        return e.code, e.read().decode(errors="replace")


def run_scalecar(binary, config_yaml, timeout=10):
    """`scalecar run` on `config_yaml` (listening on port 0), once /readyz
    answers 200: (process, proxy address, admin address, config path)."""
    config = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    config.write(config_yaml)
    config.close()
    proxy = start([binary, "run", "--log-format", "json", "--config", config.name], {"RUST_LOG": "info"})
    try:
        serving = json.loads(wait_line(proxy, '"message":"serving"'))
        deadline = time.time() + timeout
        while get(serving["admin"], "/readyz")[0] != 200:
            if time.time() > deadline:
                raise RuntimeError("scalecar never became ready")
            time.sleep(0.05)
    except BaseException:
        proxy.kill()
        os.unlink(config.name)
        raise
    return proxy, serving["proxy"], serving["admin"], config.name
