"""Two Ray nodes on one machine (loopback, 1 CPU each): the study's trained stages run on one
two-worker TorchTrainer group across both, one worker per node, each stage on disjoint shards (the
two-worker DDP test too). Both nodes are stopped even when the test fails; only the processes this
test started are stopped (`ray stop` would also end other tests' Ray)."""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

from test_cli import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_stage_runs_across_two_nodes(tmp_path):
    port, dash = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="r2n", dir="/tmp")  # short: Ray's socket paths live under it
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    common = ["--num-cpus", "1", "--num-gpus", "0", "--block"]
    address = f"127.0.0.1:{port}"
    # `ray start` turns token authentication on; this loopback cluster's clients have no token
    env = {**os.environ, "PYTHONPATH": ROOT, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled"}
    nodes = [subprocess.Popen([ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                               "--dashboard-port", str(dash), "--temp-dir", temp, *common], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
    try:
        probe = [sys.executable, "-c", "import ray; ray.init(); print(len(ray.nodes()))"]
        deadline = time.time() + 120
        while subprocess.run(probe, env=env, capture_output=True, text=True).returncode != 0:
            assert time.time() < deadline, "the head node did not start"
            time.sleep(1)
        nodes.append(subprocess.Popen([ray, "start", "--address", address, "--node-ip-address", "127.0.0.1", *common],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        while subprocess.run(probe, env=env, capture_output=True, text=True).stdout.strip() != "2":
            assert time.time() < deadline, "the second node did not join"
            time.sleep(1)
        one_epoch = [f"--set={s}.epochs=1" for s in ("ssl", "finetune", "video")]
        run = subprocess.run([sys.executable, "-m", "raysslvit", "run", "--out", str(tmp_path), "--num-workers", "2",
                              "--cpus-per-worker", "1", "--stages", "finetune,video_1,video_2,video_mean", *one_epoch],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        # 225 images per class: 14 clips of 16 each, 140 clips dealt to 2 ranks
        for stage, images in (("ssl", 2250), ("finetune", 2250), ("video_1", 2240), ("video_2", 2240), ("video_mean", 2240)):
            first = json.loads((tmp_path / stage / "metrics.json").read_text())["history"][0]
            assert first["train_images"] == images and first["train_images_repeated"] == 0, stage  # disjoint shards
        assert run.stdout.count("starting (Ray Train, 2 worker(s))") == 5
        where = [sys.executable, "-c", "from ray.util.state import list_actors; print(sorted({a.node_id for a in "
                 f"list_actors(address='http://127.0.0.1:{dash}', filters=[('class_name', '=', 'RayTrainWorker')], "
                 "limit=100)}))"]
        worker_nodes = eval(subprocess.run(where, env=env, capture_output=True, text=True, timeout=120).stdout)
        assert len(worker_nodes) == 2  # one worker on each node
    finally:
        for node in reversed(nodes):
            os.killpg(node.pid, 15)  # the --block process and the Ray daemons it started
        for node in nodes:
            node.wait(timeout=60)
