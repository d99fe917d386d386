"""Two Ray nodes that share no disk (nodes.py: the second sees the run, data and weights folders as
an empty tmpfs; checkpoints and results go to a real S3 server on loopback). A study's trained
stages run on one two-worker TorchTrainer group across both nodes; its driver is killed mid-stage
and run again as a Ray job (its driver on the head, in a fresh copy of the checkout): it resumes
from the checkpoint in S3 and ends with the figures of the same study on one node, where a worker
dies once and Ray Train restarts the group from its checkpoint; that group then shows that a user
error on one rank ends the job at once, not retried. Without --storage, a run on
the two nodes stops before any worker starts. The captions stage's actors run on both nodes."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from raysslvit.__main__ import build_parser, config_from_args
from raysslvit.backend_ray import WorkerGroup
from raysslvit.config import with_changes
from raysslvit.errors import UserError
from raysslvit.stages import STAGES, run_stage
from raysslvit.storage import Storage

from test_cli import ROOT
from test_launch import stops_after

from nodes import CREDENTIALS, read_stored

# 1 CPU per node and per worker: one worker on each node, or none at all
RUN = ["run", "--num-workers", "2", "--cpus-per-worker", "1", "--stages", "finetune,video_2",
       "--set=ssl.epochs=3", "--set=finetune.epochs=1", "--set=video.epochs=1"]


def failing_on_rank_1(calls: str):
    """A worker whose rank 1 counts its calls in a file and meets a user error while rank 0 waits for
    it (a closure: Ray's processes cannot import this test module)."""

    def worker(job, ctx, report, resume):
        import torch.distributed

        if ctx.rank == 1:
            with open(calls, "a") as f:
                f.write("x")
            raise UserError("rank 1 cannot read its input")
        torch.distributed.barrier()  # never passed: its peer gave up

    return worker


def test_the_captions_actors_run_on_both_nodes(two_nodes):
    """One actor per model, each taking half the cluster's CPUs: one on each node, though the second
    node sees neither the data nor the weights (they travel through the object store); the table
    lands in S3. (The depth study's trials run on both nodes too: conftest's tune_study.)"""
    import pandas as pd

    from raysslvit.tiny_models import save_tiny_caption_models

    unseen, bucket = two_nodes.unseen, two_nodes.bucket
    data = f"--set=data.data_root={os.path.join(unseen, 'data')}"
    weights = save_tiny_caption_models(os.path.join(unseen, "weights"))
    made = two_nodes.run("raysslvit", "captions", "--blip-model", weights["blip"], "--clip-model", weights["clip"],
                         "--max-new-tokens", "4", "--batch-size", "100", data, "--storage", bucket.format("captions"),
                         "--out", os.path.join(unseen, "captions"))
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    captions = Storage(bucket.format("captions"))
    metrics = read_stored(captions, "captions/metrics.json")
    assert metrics["images"] == 3000 and metrics["actor_nodes"] == 2, metrics  # weights through the object store
    with captions.fs.open_input_file(f"{captions.root}/captions/captions.parquet") as f:
        table = pd.read_parquet(f)
    assert len(table) == 3000 and table["id"].is_unique
    assert two_nodes.listening() == {"127.0.0.1"}  # S3, GCS, raylets, agents, workers


def ours(lines):
    """A driver's lines less a raylet's notices to every driver ("4 PYTHON worker processes have been started"), Ray's own."""
    return [line for line in lines if "(raylet)" not in line]


def test_a_study_runs_across_two_nodes_that_share_no_disk(two_nodes, ray_local, capfd):
    """The last test on the two nodes (conftest sorts it so): it stops them before its one-node reference."""
    unseen, bucket = two_nodes.unseen, two_nodes.bucket
    try:
        where = ["--data-root", os.path.join(unseen, "data"), "--storage", bucket.format("study")]
        driver = subprocess.Popen([sys.executable, "-m", "raysslvit", *RUN, *where, "--address", two_nodes.address,
                                   "--out", os.path.join(unseen, "a")],
                                  env=two_nodes.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
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
            assert noise not in "".join(ours(seen)), noise
        # again as a Ray job: its driver on the head, in a fresh copy of the checkout, with an empty run
        # folder (as on another machine), the storage the one thing it shares with the killed one
        job = subprocess.run([two_nodes.ray, "job", "submit", "--address", two_nodes.dashboard, "--working-dir", ROOT,
                              "--runtime-env-json", json.dumps({"env_vars": CREDENTIALS}), "--",
                              sys.executable, "-m", "raysslvit", *RUN, *where, "--out", os.path.join(unseen, "b")],
                             env=two_nodes.env, cwd=ROOT, capture_output=True, text=True, timeout=600)
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
        bare = two_nodes.run("raysslvit", "ssl", "--out", os.path.join(unseen, "c"))
        assert bare.returncode == 2 and "Traceback" not in bare.stderr, bare.stderr[-2000:]
        assert ours(bare.stderr.strip().splitlines()) == [
            "raysslvit: error: this Ray has 2 nodes: a multi-node run needs --storage (a folder every node sees, or "
            "s3://bucket/prefix), where its checkpoints and results are kept"]
    finally:
        two_nodes.stop()
    # the same study on one node with one shared disk, its SSL worker dying once after epoch 2 and
    # restarted by Ray Train from that checkpoint: the same figures
    args = build_parser().parse_args([*RUN, "--data-root", os.path.join(unseen, "data"), "--out", os.path.join(unseen, "one")])
    cfg = replace(config_from_args(args), max_failures=1)
    group, calls = WorkerGroup(cfg), os.path.join(unseen, "calls")
    try:
        figures = lambda metrics: {k: v for k, v in metrics.items() if k != "history" and k != "timing" and
                                   not k.endswith("_s")}
        for stage in ("ssl", "finetune", "video_2"):  # the study's steps less the probe, which none of them reads
            record = stops_after(2, os.path.join(unseen, "died-once")) if stage == "ssl" else STAGES[stage]
            one = run_stage(record, with_changes(cfg, STAGES[stage].variant(cfg)), group=group)
            assert figures(two[stage]) == figures(one), stage
        assert os.path.exists(os.path.join(unseen, "died-once"))  # it did die, and its restart went on
        assert "ssl: a worker died; Ray Train restarted the group: resuming" in capfd.readouterr().out
        # a user error on one rank ends the job at once, not retried, its peer waiting on it in a collective or not
        started = time.time()
        with pytest.raises(UserError, match="^rank 1 cannot read its input$"):
            run_stage(replace(STAGES["ssl"], worker=failing_on_rank_1(calls)), replace(cfg, out=os.path.join(unseen, "f")),
                      group=group)
        assert time.time() - started < 30
        with open(calls) as f:
            assert f.read() == "x" and not os.path.exists(os.path.join(unseen, "f", "ssl", "metrics.json"))
        group.close(force=True)
        while ray_local.available_resources().get("CPU", 0) < 2:  # its peer is not left waiting either
            assert time.time() - started < 120, "a rank still holds its CPU"
            time.sleep(0.5)
    finally:
        group.close(force=True)
    assert "Traceback" not in capfd.readouterr().err
