"""The stages end to end on the embedded sample, in-process (through Ray Train: test_two_nodes and
test_launch); learning tests check that accuracies really rise above chance."""
import json
import os

import numpy as np
import torch

from raysslvit.artifacts import read_json
from raysslvit.config import build_config
from raysslvit.stages import run_command
from raysslvit.stages.common import load_encoder

from conftest import SMOKE_RUN


def test_run_writes_every_stage(smoke_run):
    for stage in ("ssl", "probe", "probe_random", "finetune", "scratch", "ssl_infonce", "probe_ssl_infonce", "video_1", "video_2", "video_mean"):
        folder = smoke_run / stage
        assert {"metrics.json", "config.json", "model.pt"} <= set(os.listdir(folder))
        saved = read_json(folder / "config.json")
        assert saved["seed"] == 0 and saved["versions"]["torch"] and saved["git_commit"]
        assert saved["config"]["preset"] == "smoke"
    assert {"val_rotation_acc", "val_recon_mse"} <= set(read_json(smoke_run / "ssl" / "metrics.json"))
    assert {"val_acc", "test_acc", "test_acc_cls"} <= set(read_json(smoke_run / "probe" / "metrics.json"))
    assert {"val_acc", "test_acc", "best_val_epoch"} <= set(read_json(smoke_run / "finetune" / "metrics.json"))


def test_the_controls_start_from_random_weights_of_ms_shape_drawn_from_the_seed(smoke_run):
    """`finetune --init random` is the study's scratch stage; it reads no M, its weights follow
    --seed, and its fingerprint holds the model's shape (no input file carries it)."""
    from raysslvit.config import with_changes
    from raysslvit.rundir import stage_fingerprint
    from raysslvit.stages import for_command, random_checkpoint

    cfg = build_config("smoke", {"out": str(smoke_run), "finetune.init": "random", "probe.init": "random"})
    scratch, control = for_command("finetune", cfg), for_command("probe", cfg)
    assert (scratch.key, control.key) == ("scratch", "probe_random") and scratch.inputs(cfg) == control.inputs(cfg) == {}
    a, b, other = (random_checkpoint(c)["state_dict"] for c in (cfg, cfg, with_changes(cfg, {"seed": 1})))
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], other[k]) for k in a)
    assert stage_fingerprint(cfg, "finetune")["model"] == cfg.model.to_dict()
    assert "model" not in stage_fingerprint(with_changes(cfg, {"finetune.init": "checkpoint"}), "finetune")
    assert read_json(smoke_run / "scratch" / "metrics.json")["test_acc"] > 0.2  # learns (chance 0.1) from nothing


def test_ssl_learns_rotation(smoke_run):
    m = read_json(smoke_run / "ssl" / "metrics.json")
    assert m["val_rotation_acc"] > 0.35  # chance is 0.25
    assert m["history"][-1]["val_recon_mse"] < m["history"][0]["val_recon_mse"]
    assert all("val_knn_acc_cls" in h for h in m["history"]) and m["val_knn_acc_tokens"] > 0.2  # the k-NN monitor


def test_probe_and_finetune_beat_chance(smoke_run):
    assert read_json(smoke_run / "probe" / "metrics.json")["test_acc"] > 0.2  # chance is 0.10
    ft = read_json(smoke_run / "finetune" / "metrics.json")
    assert ft["test_acc"] > 0.2 and ft["train_acc"] > 0.2


def test_finetune_starts_from_model_m(smoke_run):
    m = load_encoder(str(smoke_run / "ssl" / "model.pt"))
    saved = torch.load(smoke_run / "finetune" / "model.pt", weights_only=True)
    assert set(saved["state_dict"]) >= {"head.weight", "encoder.pos_embed"}
    shape = lambda c: {k: v for k, v in c.items() if k != "drop_path"}  # fine-tuning adds stochastic depth
    assert shape(saved["model_config"]) == shape(m.cfg.to_dict()) and saved["model_config"]["drop_path"] == 0.1


def test_a_finished_stage_is_skipped(smoke_run, capsys):
    before = (smoke_run / "ssl" / "metrics.json").read_text()
    cfg = build_config("smoke", {"out": str(smoke_run), **SMOKE_RUN})
    assert run_command("ssl", cfg)["val_rotation_acc"] == json.loads(before)["val_rotation_acc"]
    assert "done already" in capsys.readouterr().out
    assert (smoke_run / "ssl" / "metrics.json").read_text() == before


def test_local_launcher_runs_the_same_fit(tmp_path, smoke_run):
    cfg = build_config("smoke", {"out": str(tmp_path), "launcher": "local",
                                 "checkpoint": str(smoke_run / "ssl" / "model.pt"), "finetune.epochs": 2})
    metrics = run_command("finetune", cfg)
    assert len(metrics["history"]) == 2 and os.path.exists(tmp_path / "finetune" / "model.pt")
    cfg = build_config("smoke", {"out": str(tmp_path), "launcher": "local", "probe.features": "cls",
                                 "checkpoint": str(smoke_run / "ssl" / "model.pt")})
    p = run_command("probe", cfg)
    assert p["test_acc"] == p["test_acc_cls"]


def test_analyze_measures_both_models(smoke_run):
    m = read_json(smoke_run / "analyze" / "metrics.json")
    for key in ("cka_before", "cka_after", "cka_block_before", "cka_block_after", "focus_entropy_before",
                "focus_entropy_after", "top4_mass_before", "top4_mass_after"):
        assert isinstance(m[key], float), key
    assert 0 < m["cka_before"] <= 1 and 0.25 <= m["top4_mass_after"] <= 1
    assert {"maps.png", "tokens.png", "cka.png", "arrays.npz"} <= set(os.listdir(smoke_run / "analyze"))
    arrays = np.load(smoke_run / "analyze" / "arrays.npz")
    assert arrays["maps_before"].shape == (3, 32, 32) and arrays["tokens_after"].shape == (3, 17, 17)
    assert arrays["cka_layers_before"].shape == (2, 2) and len(set(m["samples"])) == 3


def test_infonce_baseline_is_probed_like_m(smoke_run):
    p = read_json(smoke_run / "probe_ssl_infonce" / "metrics.json")
    assert {"val_acc", "test_acc", "test_acc_cls"} <= set(p) and p["test_acc"] > 0.15
    assert "val_pair_acc" in read_json(smoke_run / "ssl_infonce" / "metrics.json")


def test_video_stages_write_their_keys(smoke_run):
    for stage in ("video_1", "video_2", "video_mean"):
        m = read_json(smoke_run / stage / "metrics.json")
        assert {"val_acc", "test_acc", "train_acc", "best_val_epoch", "spatial_acc"} <= set(m), stage
        assert m["test_acc"] > 0.15, stage  # chance is 0.10
    assert read_json(smoke_run / "video_1" / "config.json")["config"]["video"]["st_blocks"] == 1


def test_the_table_of_stages_is_whole(smoke_run):
    """Every record runs one way (workers or the driver), needs only earlier steps, and the command
    it is reached by, configured as the study does, finds it again and its folder."""
    from raysslvit.config import SECTIONS, with_changes
    from raysslvit.stages import COMMANDS, STAGES, for_command

    cfg = build_config("smoke", {"out": str(smoke_run), **SMOKE_RUN})
    order = list(STAGES)
    for key, stage in STAGES.items():
        assert (stage.worker is None) != (stage.local is None), key
        assert stage.section in SECTIONS and stage.command in COMMANDS and stage.epochs == bool(stage.monitor), key
        assert all(order.index(n) < order.index(key) for n in stage.needs), key
        assert for_command(stage.command, with_changes(cfg, stage.variant(cfg))) == stage, key
        assert (smoke_run / stage.folder / "metrics.json").exists() or key in ("captions", "fusion"), key


def test_a_worker_is_handed_its_inputs_and_reads_no_file(smoke_run, tmp_path):
    """The driver reads M's weights and decodes the data; the worker runs from what it is handed,
    under a config whose checkpoint and data cache point where nothing exists."""
    from dataclasses import replace

    from raysslvit.engine import WorkerContext
    from raysslvit.launch import Job, run_job
    from raysslvit.stages import STAGES
    from raysslvit.stages.common import load_data

    cfg = build_config("smoke", {"out": str(tmp_path), "finetune.epochs": 1, "checkpoint": str(smoke_run / "ssl" / "model.pt")})
    stage, splits = STAGES["finetune"], load_data(cfg)
    given = stage.hand(cfg, stage.inputs(cfg), splits)
    nowhere = replace(cfg, checkpoint=str(tmp_path / "no-m.pt"), data=replace(cfg.data, data_root=str(tmp_path / "no-cache")))
    job = Job("finetune", nowhere, stage.worker, splits, given, fingerprint={})
    metrics = run_job(job, splits, WorkerContext(), lambda m, s: None, None)
    assert metrics["train_loss"] > 0 and not os.listdir(tmp_path)
