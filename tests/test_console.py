"""The Ray that raysslvit starts for itself: a new local instance on loopback only, whatever `ray
start` cluster the machine ran last."""
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile

from test_cli import ROOT

# starts a Ray of its own, says where it is, and keeps it up until its stdin closes
START = """
import json, sys, ray
from raysslvit.console import start_ray
start_ray(num_cpus=1, include_dashboard=False)
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address,
                  "nodes": sorted({n["NodeManagerAddress"] for n in ray.nodes()})}), flush=True)
sys.stdin.read()
"""


def process_tree(root: int) -> set[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rpartition(")")[2].split()[1])
        except (ValueError, OSError):
            continue
    tree, grew = {root}, True
    while grew:
        new = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree, grew = tree | new, bool(new)
    return tree


def listening_addresses(pids: set[int]) -> set[str]:
    """The local addresses of the TCP sockets these processes listen on (/proc: no psutil here)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in open(table).readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])
                # /proc writes each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(socket.inet_ntop(family, raw).removeprefix("::ffff:"))  # IPv4 on an IPv6 socket
    return found


def test_a_new_local_ray_on_loopback_beside_a_dead_ray_start_cluster():
    # What a `ray start` head killed without `ray stop` leaves behind: its address in
    # <tmp>/ray/ray_current_cluster, which a bare ray.init() joins, hanging on "Failed to get cluster ID".
    tmp = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        os.makedirs(os.path.join(tmp, "ray"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = f"127.0.0.1:{s.getsockname()[1]}"
        with open(os.path.join(tmp, "ray", "ray_current_cluster"), "w") as f:
            f.write(dead)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        proc = subprocess.Popen([sys.executable, "-c", START], env={**env, "RAY_TMPDIR": tmp, "PYTHONPATH": ROOT},
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            ready, _, _ = select.select([proc.stdout], [], [], 120)
            assert ready, "start_ray hung (it joined the dead cluster?)"
            line = proc.stdout.readline()
            assert line, f"start_ray ended without starting Ray (exit code {proc.wait(timeout=60)})"
            where = json.loads(line)
            assert where["gcs"] != dead and where["gcs"].startswith("127.0.0.1:")
            assert where["nodes"] == ["127.0.0.1"]
            assert listening_addresses(process_tree(proc.pid)) == {"127.0.0.1"}  # GCS, raylet, object manager, workers
        finally:
            proc.stdin.close()
            proc.wait(timeout=60)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
