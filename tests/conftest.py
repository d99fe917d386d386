"""Shared fixtures: a real local Ray (2 CPUs) and the path of the JPEG copy of CIFAR-10, if present."""
import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

JPEG_CIFAR10 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "cifar10-jpeg")

needs_jpeg_cifar10 = pytest.mark.skipif(not os.path.isdir(JPEG_CIFAR10),
                                        reason="the JPEG copy of CIFAR-10 is not on this machine")


# The smoke study with 8 SSL epochs instead of 20 (about 35 s less here); rotation 0.44 there, chance 0.25.
SMOKE_RUN = {"ssl.epochs": 8}


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """`python -m raysslvit run` on the smoke preset (SMOKE_RUN), in-process; tests reuse its M and video models."""
    from raysslvit.__main__ import main

    out = tmp_path_factory.mktemp("smoke")
    assert main(["run", "--out", str(out), "--launcher", "local", *(f"--set={k}={v}" for k, v in SMOKE_RUN.items())]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> dict:
    """Tiny random BLIP and CLIP saved as local folders, as a user with real weights passes them."""
    from raysslvit.tiny_models import save_tiny_caption_models

    return save_tiny_caption_models(str(tmp_path_factory.mktemp("weights")))


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from raysslvit.console import start_ray

    start_ray(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def write_space(tmp_path, **changes) -> str:
    """A two-trial study file on the smoke preset, small enough for a test."""
    spec = {"stages": ["ssl", "probe"], "preset": "smoke", "overrides": {"ssl.epochs": 2, "probe.epochs": 3},
            "space": {"ssl.mask_ratio": {"grid": [0.25, 0.5]}}, "metric": "val_knn_acc_tokens",
            "scheduler": {"type": "none"}, **changes}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


@pytest.fixture(scope="session")
def tune_study(tmp_path_factory, ray_local):
    """A real two-trial Tune study, interrupted with Ctrl-C once its first trial finished, then
    finished with --resume. Returns its folder, the first trial's records before the resume, and
    the resumed run. Its trials train in-process (a TorchTrainer inside a trial: test_launch); both
    calls join the suite's Ray (`--address`) rather than start one each."""
    tmp = tmp_path_factory.mktemp("tune")
    root = os.path.join(os.path.dirname(__file__), "..")
    args = [sys.executable, "-m", "raysslvit.tune", "--space", write_space(tmp), "--storage-path", str(tmp / "t"),
            "--set", "launcher=local", "--address", ray_local.get_runtime_context().gcs_address]
    env = {**os.environ, "PYTHONPATH": root}
    proc = subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finished = lambda: [p for p in glob.glob(str(tmp / "t" / "study" / "trial_*" / "result.json"))
                        if "stages_done" in open(p).read()]
    deadline = time.time() + 300
    while not finished():
        assert proc.poll() is None and time.time() < deadline, "the study ended before it could be interrupted"
        time.sleep(0.5)
    first = finished()[0]
    records = open(first).read()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    resumed = subprocess.run([*args, "--resume"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return {"path": tmp / "t" / "study", "first_trial": first, "first_records": records, "resumed": resumed}


def pytest_collection_modifyitems(items):
    """The tests on the suite's Ray run last: its idle processes slow every test that runs beside them;
    the two-node test first of them, while that Ray holds the fewest (its own nodes share the CPUs)."""
    uses_ray = lambda item: "ray_local" in getattr(item, "fixturenames", ())
    items.sort(key=lambda item: (uses_ray(item), uses_ray(item) and "test_two_nodes" not in item.nodeid))
