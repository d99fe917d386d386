"""Shared fixtures: a real local Ray (2 CPUs) and the path of the JPEG copy of CIFAR-10, if present."""
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

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one thread each, else their threads spin on each other
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"  # the commands the tests start
    torch.set_num_threads(1)


# The smoke study with 8 SSL epochs instead of 20 (about 35 s less here); rotation 0.44 there, chance 0.25.
SMOKE_RUN = {"ssl.epochs": 8}


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """`python -m raysslvit run` on the smoke preset (SMOKE_RUN), in-process, its stages tracked in an
    MLflow folder beside it (smoke_mlflow); tests reuse its M and video models."""
    from raysslvit.__main__ import main

    out = tmp_path_factory.mktemp("smoke")
    assert main(["run", "--out", str(out / "study"), "--launcher", "local", "--mlflow", str(out / "mlruns"),
                 *(f"--set={k}={v}" for k, v in SMOKE_RUN.items())]) == 0
    return out / "study"


@pytest.fixture(scope="session")
def smoke_mlflow(smoke_run):
    """The MLflow store of the smoke study."""
    return smoke_run.parent / "mlruns"


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
def two_nodes(tmp_path_factory):
    """Two Ray nodes that share no disk, and an S3 server (nodes.py); the last test that uses them,
    test_two_nodes' study, stops them to free the CPUs."""
    from nodes import TwoNodes, why_not

    if why := why_not():
        pytest.skip(why)
    cluster = TwoNodes(str(tmp_path_factory.mktemp("unseen")))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def tune_study(tmp_path_factory, request):
    """The depth study (its file with three depths, one SSL epoch each, in-process) interrupted with Ctrl-C once
    its first trial finished, then finished with --resume: on the two nodes with its storage in S3
    (then copied here for the readers), else, where they cannot run, on the suite's Ray with a
    local folder. Returns the study's folder, the first trial's records before the resume, the
    resumed run, and the nodes its trials ran on (None: not seen)."""
    from nodes import why_not
    from raysslvit.storage import Storage

    tmp = tmp_path_factory.mktemp("tune")
    root = os.path.join(os.path.dirname(__file__), "..")
    if why_not() is None:
        cluster = request.getfixturevalue("two_nodes")
        address, storage, env = cluster.address, cluster.bucket.format("tune"), cluster.env
        data = os.path.join(cluster.unseen, "data")  # only the driver reads the data
    else:
        cluster = None
        address, storage = request.getfixturevalue("ray_local").get_runtime_context().gcs_address, str(tmp / "t")
        env, data = {**os.environ, "PYTHONPATH": root}, os.path.join(str(tmp), "data")
    with open(os.path.join(root, "tune_spaces", "depth.yaml")) as f:
        spec = yaml.safe_load(f)
    spec["space"]["model.depth"] = {"grid": [1, 2, 3]}  # the shipped five (up to 8 blocks) take longer
    (space := tmp / "depth.yaml").write_text(yaml.safe_dump(spec))
    args = [sys.executable, "-m", "raysslvit.tune", "--space", str(space), "--storage-path", storage, "--address", address,
            "--set=launcher=local", "--set=ssl.epochs=1", "--set=probe.epochs=1", f"--set=data.data_root={data}",
            "--mlflow", str(tmp / "mlruns")]  # Tune's MLflow callback, on the driver: here
    stored = Storage(storage).child("depth")
    proc = subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def finished():  # {a finished trial's result.json: its records}
        found = {}
        for name in (n for n in stored.files() if n.endswith("/result.json")):
            with stored.fs.open_input_stream(f"{stored.root}/{name}") as f:
                if "stages_done" in (text := f.read().decode()):
                    found[name] = text
        return found

    deadline, nodes, done, look = time.time() + 300, set(), {}, 0.0
    while not done:
        assert proc.poll() is None and time.time() < deadline, "the study ended before it could be interrupted"
        if cluster is not None:  # the trials' actors while they train: a few seconds each
            nodes |= cluster.nodes_running("ImplicitFunc.train")
        if time.time() >= look:  # the storage, once a second
            done, look = finished(), time.time() + 1
        time.sleep(0.1)
    first, records = next(iter(done.items()))
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    resumed = subprocess.run([*args, "--resume"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    local = tmp / "study"
    stored.pull(str(local))  # every file of the study's storage (from S3: the readers below read a folder)
    return {"path": local, "first_trial": local / first, "first_records": records, "resumed": resumed,
            "nodes": nodes if cluster is not None else None, "storage": storage, "mlflow": tmp / "mlruns"}


@pytest.hookimpl(tryfirst=True)  # before xdist names each test's group
def pytest_collection_modifyitems(items):
    """The tests on a Ray run last: its idle processes slow every test that runs beside them. First
    those on the two nodes (whose own processes share the CPUs), the one that stops them last; then
    those on the suite's Ray. Under xdist (pyproject's `-n 2`) the two nodes' tests, and the smoke
    study's and the captions' readers, each stay on one worker, which builds their fixtures once."""
    names = lambda item: set(getattr(item, "fixturenames", ()))
    on_nodes = lambda item: bool(names(item) & {"two_nodes", "tune_study"})
    stops_nodes = lambda item: "test_two_nodes.py::test_a_study_runs" in item.nodeid
    items.sort(key=lambda item: (on_nodes(item) or "ray_local" in names(item), not on_nodes(item), stops_nodes(item)))
    for item in items:
        if group := "two_nodes" if on_nodes(item) else "smoke_run" if names(item) & {"smoke_run", "captioned"} else "":
            item.add_marker(pytest.mark.xdist_group(group))
