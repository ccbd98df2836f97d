"""The balanced set-up on one machine: nginx (``deploy/nginx/grpc-balancer.conf``) in front of three
``server serve`` replicas, each on its own port. Used by ``make balanced``, the fault test and
``python -m benchmarks.failover``.

    python -m deploy.balanced --model demo/model.onnx          # cameras connect to 127.0.0.1:50050

Runs until Ctrl-C / SIGTERM, then drains the replicas (each exits 0) and stops nginx.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NGINX_CONF = Path(__file__).resolve().parent / "nginx" / "grpc-balancer.conf"
REPLICAS = 3  # the shipped config's ${REPLICA_1..3}
PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


def render(template: str, values: dict[str, str]) -> str:
    """``${NAME}`` placeholders replaced (nginx's own ``$variables`` are left alone).

    Raises:
        KeyError: a placeholder without a value, or a value without a placeholder.
    """
    names = set(PLACEHOLDER.findall(template))
    if missing := names - values.keys():
        raise KeyError(f"no value for {', '.join(sorted(missing))} in the nginx template")
    if unused := values.keys() - names:
        raise KeyError(f"the nginx template has no {', '.join(sorted(unused))}")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def find_nginx() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                          if os.access(p, os.X_OK)), None)


def nginx_missing_reason() -> str | None:
    if find_nginx() is None:
        return "nginx is not installed (Debian: apt-get install -y nginx; .ci/run installs it on CI)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > end:
                raise TimeoutError(f"{what} does not listen on 127.0.0.1:{port} after {timeout:g} s") from None
            time.sleep(0.05)


class Replica:
    """One ``server serve`` process on a fixed port, restartable on that port."""

    def __init__(self, name: str, model: Path, port: int, metrics_port: int = -1, flags: Sequence[str] = ()):
        self.name, self.model, self.port, self.metrics_port = name, Path(model), port, metrics_port
        self.flags = list(flags)
        self.process: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._ready = threading.Event()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Replica:
        """Starts the process (returns at once; :meth:`wait_ready` waits for SERVING)."""
        self._ready.clear()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--model", str(self.model), "--bind", "127.0.0.1",
             "--port", str(self.port), "--metrics-port", str(self.metrics_port), *self.flags],
            cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        )
        threading.Thread(target=self._read_log, args=(self.process,), daemon=True).start()
        return self

    def _read_log(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        for line in process.stderr:  # read to the end: the server never blocks on a full pipe
            self.lines.append(f"[{self.name}] {line}")
            if "event=ready" in line:
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = 120.0) -> None:
        if not self._ready.wait(timeout) or self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"replica {self.name} did not become ready:\n{self.log}")

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (drain): returns the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(30)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def log(self) -> str:
        return "".join(self.lines)


class Balancer:
    """nginx running the shipped config, rendered into its own prefix directory."""

    def __init__(self, replicas: Sequence[str], port: int, prefix: Path) -> None:
        if len(replicas) != REPLICAS:
            raise ValueError(f"the shipped nginx config balances {REPLICAS} replicas, got {len(replicas)}")
        self.port, self.prefix = port, Path(prefix)
        self.values = {"LISTEN": f"127.0.0.1:{port}",
                       **{f"REPLICA_{i + 1}": address for i, address in enumerate(replicas)}}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> Balancer:
        nginx = find_nginx()
        if nginx is None:
            raise FileNotFoundError(nginx_missing_reason())
        (self.prefix / "tmp").mkdir(parents=True, exist_ok=True)
        conf = self.prefix / NGINX_CONF.name
        conf.write_text(render(NGINX_CONF.read_text(), self.values))
        # As root, nginx would run its worker as "nobody", which cannot enter a private temp dir.
        globals_ = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")
        self.process = subprocess.Popen([nginx, "-p", str(self.prefix), "-c", conf.name, "-g", globals_],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_port(self.port, timeout, "nginx")
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"nginx did not start:\n{self.error_log}") from None
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: finish open calls
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    @property
    def error_log(self) -> str:
        stderr = self.process.stderr.read().decode() if self.process and self.process.poll() is not None else ""
        path = self.prefix / "error.log"
        return stderr + (path.read_text() if path.is_file() else "")


class BalancedSetup:
    """nginx and three replicas on free ports (or the given ones), as a ``with`` block."""

    def __init__(self, model: Path, workdir: Path | None = None, port: int = 0,
                 replica_ports: Sequence[int] = (), metrics_ports: Sequence[int] = (),
                 flags: Sequence[str] = ()) -> None:
        ports = list(replica_ports) or [free_port() for _ in range(REPLICAS)]
        metrics = list(metrics_ports) or [-1] * REPLICAS
        self.replicas = [Replica(f"replica{i + 1}", model, ports[i], metrics[i], flags) for i in range(REPLICAS)]
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="balanced-")
        self.workdir = Path(workdir or self._tmp.name)
        self.balancer = Balancer([r.address for r in self.replicas], port or free_port(), self.workdir / "nginx")

    @property
    def target(self) -> str:
        return self.balancer.target

    def __enter__(self) -> BalancedSetup:
        try:
            for replica in self.replicas:
                replica.start()
            for replica in self.replicas:
                replica.wait_ready()
            self.balancer.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def stop_replicas(self) -> list[int | None]:
        """SIGTERM to every running replica: their exit statuses (None: was not running)."""
        running = [r for r in self.replicas if r.running]
        for replica in running:
            replica.process.send_signal(signal.SIGTERM)  # all drain at once
        return [r.process.wait(60) if r in running else None for r in self.replicas]

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop_replicas()
        finally:
            for replica in self.replicas:
                if replica.running:
                    replica.kill()
            self.balancer.stop()
            if self._tmp is not None:
                self._tmp.cleanup()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy.balanced", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "demo" / "model.onnx",
                        help="model file every replica serves (default: demo/model.onnx, from make demo)")
    parser.add_argument("--port", type=int, default=50050, help="the balancer's port (default: 50050)")
    parser.add_argument("--replica-ports", default="50051,50052,50053", help="three gRPC ports")
    parser.add_argument("--metrics-ports", default="9101,9102,9103", help="three /metrics ports")
    parser.add_argument("--workdir", type=Path, default=None, help="nginx prefix and logs (default: a temp dir)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Other flags go to every ``server serve`` (e.g. ``--max-batch 8 --device cpu``)."""
    parser = build_parser()
    args, serve_flags = parser.parse_known_args(argv)
    if not args.model.is_file():
        parser.error(f"--model {args.model}: no such file (make demo writes demo/model.onnx)")
    if reason := nginx_missing_reason():
        parser.error(reason)
    ports = [int(p) for p in args.replica_ports.split(",")]
    metrics = [int(p) for p in args.metrics_ports.split(",")]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with BalancedSetup(args.model, args.workdir, args.port, ports, metrics, serve_flags) as setup:
        print(f"balancer {setup.target} -> replicas " + ", ".join(r.address for r in setup.replicas) +
              " (metrics " + ", ".join(f":{p}" for p in metrics) + f"); nginx logs in {setup.balancer.prefix}",
              file=sys.stderr)
        print(f"try: server client --target {setup.target} --images demo/data --streams 8", file=sys.stderr)
        stop.wait()
        print("draining the replicas...", file=sys.stderr)
        codes = setup.stop_replicas()
    print("replicas exited with " + ", ".join(map(str, codes)), file=sys.stderr)
    return 0 if all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
