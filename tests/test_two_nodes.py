"""Two Ray nodes on one machine (loopback, 1 CPU each): a study's trained stages (SSL and fine-tuning
on images, video on clips) run on one two-worker TorchTrainer group across both, one worker per
node, each stage on disjoint shards; the workers' epoch lines reach the console, Ray's own noise
does not. (Ray and in-process give the same fit: test_launch.) Both nodes are stopped even when the
test fails; only the processes this test started are stopped (`ray stop` would also end other tests' Ray)."""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from raysslvit.artifacts import read_json

from test_cli import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_study_runs_across_two_nodes(tmp_path):
    port = free_port()
    temp = tempfile.mkdtemp(prefix="r2n", dir="/tmp")  # short: Ray's socket paths live under it
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    common = ["--num-cpus", "1", "--num-gpus", "0", "--block"]
    address = f"127.0.0.1:{port}"
    # `ray start` turns token authentication on; this loopback cluster's clients have no token
    env = {**os.environ, "PYTHONPATH": ROOT, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled"}
    nodes = [subprocess.Popen([ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                               "--include-dashboard", "false", "--temp-dir", temp, *common], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
    try:
        deadline = time.time() + 120
        while not listening(port):  # the head's GCS
            assert time.time() < deadline and nodes[0].poll() is None, "the head node did not start"
            time.sleep(0.2)
        nodes.append(subprocess.Popen([ray, "start", "--address", address, "--node-ip-address", "127.0.0.1", *common],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        # no wait for the second node: the run's two 1-CPU workers wait for its CPU
        one_epoch = [f"--set={s}.epochs=1" for s in ("ssl", "finetune", "video")]
        run = subprocess.run([sys.executable, "-m", "raysslvit", "run", "--out", str(tmp_path), "--num-workers", "2",
                              "--cpus-per-worker", "1", "--stages", "finetune,video_2", *one_epoch],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        # two workers of 1 CPU each on two nodes of 1 CPU each: one worker on each node, or none at all
        assert run.stdout.count("starting (Ray Train, 2 worker(s))") == 3
        assert "ssl epoch 1/1  train_loss" in run.stdout and "ETA" in run.stdout and "ssl: done in" in run.stdout
        for noise in ("core_worker.cc", "Token authentication", "\x1b[", "TrainController", "RayTrainWorker"):
            assert noise not in run.stdout + run.stderr, noise
        groups = set()
        # 225 images per class: 14 clips of 16 each, 140 clips dealt to 2 ranks
        for stage, images in (("ssl", 2250), ("finetune", 2250), ("video_2", 2240)):  # image batches, then clips
            metrics = read_json(tmp_path / stage / "metrics.json")
            first = metrics["history"][0]
            assert first["train_images"] == images and first["train_images_repeated"] == 0, stage  # disjoint shards
            assert {"wall_s", "startup_s", "data_s", "compute_s"} <= set(metrics["timing"]), stage
            (run_dir,) = os.listdir(tmp_path / stage / "checkpoints")
            assert run_dir.startswith("ray-") and run_dir.endswith(f"-{stage}"), stage
            groups.add(run_dir.removesuffix(f"-{stage}"))
        assert len(groups) == 1  # one TorchTrainer run served the three stages
    finally:
        for node in reversed(nodes):  # SIGKILL: asked to stop, `ray start --block` takes 30 s over it
            os.killpg(node.pid, signal.SIGKILL)  # the --block process and the Ray daemons it started
        for node in nodes:
            node.wait(timeout=60)
