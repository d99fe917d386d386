"""The run folder: results keyed by what produced them, exact resume after a killed driver, safe loading."""
import os
import signal
import subprocess
import sys
import time

import torch

from raysslvit.__main__ import main
from raysslvit.artifacts import read_json
from raysslvit.config import build_config
from raysslvit.rundir import fingerprint_changes, latest_checkpoint, stage_fingerprint, write_checkpoint
from test_cli import ROOT, assert_one_line_error, cli


def test_fingerprint_tells_configs_apart_and_tolerates_fields_added_later():
    a = stage_fingerprint(build_config("smoke"), "ssl")
    assert fingerprint_changes(a, stage_fingerprint(build_config("smoke"), "ssl")) == []
    assert fingerprint_changes(a, stage_fingerprint(build_config("smoke", {"ssl.mask_ratio": 0.75}), "ssl")) == ["ssl.mask_ratio"]
    assert fingerprint_changes(a, stage_fingerprint(build_config("smoke", {"seed": 1}), "ssl")) == ["seed"]
    assert fingerprint_changes(a, stage_fingerprint(build_config("smoke", {"num_workers": 2}), "ssl")) == ["num_workers"]
    assert fingerprint_changes(a, stage_fingerprint(build_config("smoke", {"finetune.lr": 0.1}), "ssl")) == []
    older = {**a, "ssl": {k: v for k, v in a["ssl"].items() if k != "temperature"}}  # saved before the field existed
    assert fingerprint_changes(older, a) == []
    assert fingerprint_changes(older, stage_fingerprint(build_config("smoke", {"ssl.temperature": 0.5}), "ssl")) == ["ssl.temperature"]
    assert fingerprint_changes(None, a)


def test_fingerprint_holds_the_content_of_inputs_and_data(tmp_path):
    m = tmp_path / "m.pt"
    m.write_bytes(b"weights one")
    cfg = build_config("smoke")
    a = stage_fingerprint(cfg, "finetune", {"checkpoint": str(m)})
    os.rename(m, tmp_path / "moved.pt")  # where the file is does not matter, what it holds does
    assert fingerprint_changes(a, stage_fingerprint(cfg, "finetune", {"checkpoint": str(tmp_path / "moved.pt")})) == []
    (tmp_path / "moved.pt").write_bytes(b"weights two")
    assert fingerprint_changes(a, stage_fingerprint(cfg, "finetune", {"checkpoint": str(tmp_path / "moved.pt")})) == ["inputs.checkpoint"]
    tree = tmp_path / "tree" / "train" / "a"
    tree.mkdir(parents=True)
    (tree / "x.png").write_bytes(b"1")
    d = build_config("smoke", {"data.data_dir": str(tmp_path / "tree")})
    before = stage_fingerprint(d, "ssl")
    os.utime(tree / "x.png", (1, 1))  # a re-extracted copy of the same files is the same data
    assert fingerprint_changes(before, stage_fingerprint(d, "ssl")) == []
    (tree / "x.png").write_bytes(b"3")  # same size, other bytes
    assert fingerprint_changes(before, stage_fingerprint(d, "ssl")) == ["data.source"]
    (tree / "x.png").write_bytes(b"1")
    (tree / "y.png").write_bytes(b"2")
    assert fingerprint_changes(before, stage_fingerprint(d, "ssl")) == ["data.source"]


def test_latest_checkpoint_is_the_highest_epoch(tmp_path):
    stage = tmp_path / "ssl"
    assert latest_checkpoint(str(stage)) is None
    for run, epoch in (("ray-1", 3), ("local-2", 5), ("ray-3", 4)):
        write_checkpoint(str(stage / "checkpoints" / run / f"checkpoint_{epoch}"), {"epoch": epoch}, {"epoch": epoch})
    assert os.path.basename(latest_checkpoint(str(stage))) == "checkpoint_5"


def test_a_new_m_redoes_the_finetune(tmp_path, capsys):
    """ssl, finetune, ssl --fresh with another masking ratio, finetune: the second fine-tune is fresh.
    (The smoke preset masks 0.25 of set A, so 0.5 is the change here.)"""
    out = ["--launcher", "local", "--out", str(tmp_path)]
    assert main(["ssl", *out, "--epochs", "1"]) == 0
    assert main(["finetune", *out, "--epochs", "1"]) == 0
    first = read_json(tmp_path / "finetune" / "metrics.json")
    assert main(["ssl", *out, "--epochs", "1", "--fresh", "--set", "ssl.mask_ratio=0.5"]) == 0
    capsys.readouterr()
    assert main(["finetune", *out, "--epochs", "1"]) == 0
    said = capsys.readouterr().out
    assert "done already" not in said and "finetune: redoing: inputs.checkpoint changed" in said
    second = read_json(tmp_path / "finetune" / "metrics.json")
    assert second["history"][0]["train_loss"] != first["history"][0]["train_loss"]
    assert main(["finetune", *out, "--epochs", "1"]) == 0  # nothing changed since: reused
    assert "finetune: done already" in capsys.readouterr().out
    assert main(["finetune", *out, "--epochs", "2"]) == 0  # its own config changed: redone
    assert "redoing: finetune.epochs" in capsys.readouterr().out


def test_analyze_checkpoint_means_that_model_and_its_fine_tuned_one(tmp_path, capsys):
    out = ["--launcher", "local", "--out", str(tmp_path)]
    assert main(["ssl", *out, "--epochs", "1"]) == 0
    m = str(tmp_path / "ssl" / "model.pt")
    assert main(["analyze", *out, "--checkpoint", m]) == 2  # no fine-tuned model of it yet
    assert "no fine-tuned model of" in capsys.readouterr().err
    assert main(["finetune", *out, "--epochs", "1"]) == 0
    assert main(["analyze", *out, "--checkpoint", m]) == 0
    assert read_json(tmp_path / "analyze" / "config.json")["inputs"] == {"before": m, "after": str(tmp_path / "finetune" / "model.pt")}
    assert main(["finetune", *out, "--epochs", "1", "--checkpoint", str(tmp_path / "finetune" / "model.pt"),
                 "--out", str(tmp_path / "other")]) == 0
    assert main(["analyze", "--out", str(tmp_path), "--checkpoint", str(tmp_path / "other" / "finetune" / "model.pt")]) == 2
    assert "no fine-tuned model of" in capsys.readouterr().err


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    """SIGKILL the driver once epoch 2's checkpoint exists; the same command resumes and ends with
    the metrics of a run that was never interrupted."""
    args = ["ssl", "--launcher", "local", "--epochs", "4", "--set", "ssl.warmup_epochs=2"]
    proc = subprocess.Popen([sys.executable, "-m", "raysslvit", *args, "--out", str(tmp_path / "killed")],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while latest_checkpoint(str(tmp_path / "killed" / "ssl")) is None or \
            read_json(os.path.join(latest_checkpoint(str(tmp_path / "killed" / "ssl")), "meta.json"))["epoch"] < 2:
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "ssl" / "metrics.json").exists()
    resumed = cli(*args, "--out", str(tmp_path / "killed"))
    assert resumed.returncode == 0 and "resumed after epoch" in resumed.stdout, resumed.stderr
    assert cli(*args, "--out", str(tmp_path / "whole")).returncode == 0
    untimed = lambda m: {k: v for k, v in m.items() if not k.endswith("time_s") and k != "timing"}
    a, b = (read_json(tmp_path / run / "ssl" / "metrics.json") for run in ("killed", "whole"))
    assert [untimed(h) for h in a.pop("history")] == [untimed(h) for h in b.pop("history")]
    assert untimed(a) == untimed(b)


class _RunsCode:
    """Unpickled, it runs a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    evil, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    torch.save({"stage": "ssl", "model_config": {}, "state_dict": _RunsCode(f"touch {marker}")}, evil)
    assert_one_line_error(cli("finetune", "--launcher", "local", "--out", str(tmp_path / "out"),
                              "--checkpoint", str(evil)), "not a raysslvit checkpoint", "evil.pt")
    assert_one_line_error(cli("analyze", "--out", str(tmp_path / "out"), "--before", str(evil),
                              "--after", str(evil)), "not a raysslvit checkpoint", "evil.pt")
    assert not marker.exists()


def test_the_recorded_commit_is_the_one_the_process_started_with(monkeypatch):
    from raysslvit import artifacts

    started = artifacts.git_commit()
    later = subprocess.CompletedProcess([], 0, stdout="f" * 40 + "\n", stderr="")
    monkeypatch.setattr(artifacts.subprocess, "run", lambda *a, **k: later)  # a commit made mid-run
    assert artifacts.provenance()["git_commit"] == started


def _ssl(tmp_path, *more):
    return main(["ssl", "--launcher", "local", "--out", str(tmp_path), "--epochs", "1", *more])


def test_a_missing_truncated_or_altered_output_or_broken_json_redoes_the_stage(tmp_path, capsys):
    """Tried as a user would: each damage gives one line naming the file, and the stage is redone
    (here from its last checkpoint, so the weights come back as they were)."""
    assert _ssl(tmp_path) == 0
    model = tmp_path / "ssl" / "model.pt"
    original = model.read_bytes()
    assert set(read_json(tmp_path / "ssl" / "config.json")["outputs"]) == {"metrics.json", "model.pt"}
    damages = [(lambda: model.write_bytes(original[:100]), "model.pt is truncated or altered (100 bytes"),
               (lambda: model.write_bytes(original[:-1] + bytes([original[-1] ^ 1])), "model.pt was altered"),
               (lambda: model.unlink(), "model.pt is missing"),
               (lambda: (tmp_path / "ssl" / "metrics.json").write_text("{broken"), "metrics.json is missing or not valid JSON"),
               (lambda: (tmp_path / "ssl" / "config.json").write_text("[1,"), "config.json is missing or not valid JSON")]
    for damage, line in damages:
        capsys.readouterr()
        damage()
        assert _ssl(tmp_path) == 0
        said = capsys.readouterr()
        assert f"ssl: redoing: {line}" in said.out and "Traceback" not in said.err, said
        assert model.read_bytes() == original
    assert _ssl(tmp_path) == 0 and "ssl: done already" in capsys.readouterr().out
    (tmp_path / "ssl" / "metrics.json").write_text("{broken")  # the report passes over it, no traceback
    assert main(["report", "--out", str(tmp_path)]) == 0
    assert "ssl" not in read_json(tmp_path / "results.json")


def test_out_that_is_a_file_or_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    assert _ssl(tmp_path / "file" / "run") == 2
    assert capsys.readouterr().err.strip() == f"raysslvit: error: {tmp_path / 'file'} is a file, not a folder: pass another --out"
    assert (tmp_path / "file").read_text() == "x"
    # a folder this user may not write (root may write anywhere: the check is asked as a user would be)
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).startswith(str(tmp_path / "locked")))
    assert _ssl(tmp_path / "locked") == 2
    assert capsys.readouterr().err.strip() == (f"raysslvit: error: cannot write to {tmp_path / 'locked' / 'ssl'} "
                                               f"(permission denied): pass another --out")


def test_a_full_disk_is_one_line_and_leaves_no_result_a_later_run_accepts(tmp_path, capsys, monkeypatch):
    """ENOSPC simulated where the result is written (a real tiny tmpfs gives the same line: docs/usage.md)."""
    import errno

    from raysslvit import rundir

    save = rundir.save_torch

    def full(path, obj):  # the checkpoints fit, the result does not
        if path.endswith("model.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        save(path, obj)

    monkeypatch.setattr(rundir, "save_torch", full)
    assert _ssl(tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"raysslvit: error: no space left on device writing {tmp_path / 'ssl' / 'model.pt'}")
    assert not (tmp_path / "ssl" / "config.json").exists()
    monkeypatch.undo()
    assert _ssl(tmp_path) == 0 and "done already" not in capsys.readouterr().out
    assert (tmp_path / "ssl" / "model.pt").exists()


def test_one_writer_per_stage_folder(tmp_path, capsys):
    """A second process on a folder in use gets one line naming the holder and exit code 2; once the
    holder died (SIGKILL: no chance to let go), the next run takes its lock over with a line."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom raysslvit.rundir import RunFolder\n"
                               f"with RunFolder({str(tmp_path)!r}, 'ssl', {{}}).claim():\n"
                               "    print('held', flush=True); time.sleep(120)"],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _ssl(tmp_path) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{tmp_path / 'ssl'} is in use by pid {holder.pid} on " in err[0], err
        assert not (tmp_path / "ssl" / "metrics.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert _ssl(tmp_path) == 0
    assert f"ssl: taking over the lock of pid {holder.pid} on " in capsys.readouterr().out
    assert (tmp_path / "ssl" / "metrics.json").exists()


def test_storage_holds_every_output_and_a_new_folder_is_filled_from_it(tmp_path, capsys):
    """--storage (here a folder; S3 in test_two_nodes): each checkpoint and the result are copied there,
    the last checkpoint only; a driver with an empty run folder fetches them and finds the stage done,
    or fetches the results a later stage reads."""
    store = tmp_path / "storage"
    assert _ssl(tmp_path / "a", "--storage", str(store), "--epochs", "2") == 0
    kept = sorted(str(p.relative_to(store / "ssl")) for p in (store / "ssl").rglob("*") if p.is_file())
    assert [k for k in kept if "checkpoints" not in k and "tensorboard" not in k] == ["config.json", "metrics.json", "model.pt"]
    assert any(k.startswith("tensorboard/events.out.tfevents.") for k in kept)  # the stage's event files too
    assert [os.path.basename(os.path.dirname(k)) for k in kept if k.endswith("state.pt")] == ["checkpoint_000002"]
    assert (store / "ssl" / "model.pt").read_bytes() == (tmp_path / "a" / "ssl" / "model.pt").read_bytes()
    capsys.readouterr()
    assert _ssl(tmp_path / "b", "--storage", str(store), "--epochs", "2") == 0
    out = capsys.readouterr().out
    assert f"ssl: 6 file(s) fetched from {store / 'ssl'}" in out and "ssl: done already" in out
    # a later stage alone, from yet another empty folder: M comes from the storage too
    assert main(["probe", "--launcher", "local", "--out", str(tmp_path / "c"), "--storage", str(store), "--epochs", "1"]) == 0
    assert (store / "probe" / "config.json").exists() and (tmp_path / "c" / "ssl" / "model.pt").exists()
    # a copy cut off on its way (the storage lacks the model, its config.json is short): a run that
    # finds the stage done locally completes it
    (store / "ssl" / "model.pt").unlink()
    (store / "ssl" / "config.json").write_text("{")
    capsys.readouterr()
    assert _ssl(tmp_path / "a", "--storage", str(store), "--epochs", "2") == 0
    assert f"ssl: 2 file(s) the storage lacked copied to {store / 'ssl'}" in capsys.readouterr().out
    assert (store / "ssl" / "model.pt").read_bytes() == (tmp_path / "a" / "ssl" / "model.pt").read_bytes()
    assert (store / "ssl" / "config.json").read_bytes() == (tmp_path / "a" / "ssl" / "config.json").read_bytes()


def test_storage_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")  # an S3 endpoint that does not answer: "cannot reach --storage ..."
    assert _ssl(tmp_path / "out", "--storage", str(tmp_path / "file")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"raysslvit: error: --storage {tmp_path / 'file'} is a file, not a folder"]
