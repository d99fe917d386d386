"""Every input a user can get wrong ends in one clear line on stderr and exit code 2. The CLI runs
in this process (`main`), as `python -m raysslvit` would; one test runs the real command, for its
exit code."""
import contextlib
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from test_data import write_tree

ROOT = os.path.join(os.path.dirname(__file__), "..")


def cli(*args, main=None) -> subprocess.CompletedProcess:
    """`python -m raysslvit ARGS` in this process: its exit code, stdout and stderr."""
    from raysslvit.__main__ import main as raysslvit_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = (main or raysslvit_main)(list(args))
        except SystemExit as e:  # argparse's own exit
            code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def ssl_cli(tmp_path, *args):
    return cli("ssl", "--launcher", "local", "--out", str(tmp_path / "out"), "--data-root", str(tmp_path / "cache"), *args)


def test_missing_data_folder(tmp_path):
    assert_one_line_error(ssl_cli(tmp_path, "--data-dir", str(tmp_path / "nowhere")), "data folder not found")


def test_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(ssl_cli(tmp_path, "--data-dir", str(tmp_path / "empty")), "no images under train/")


def test_train_and_test_classes_differ(tmp_path):
    root = write_tree(tmp_path / "tree", splits=("train",))
    write_tree(tmp_path / "tree", classes=("a", "c"), splits=("test",))
    assert_one_line_error(ssl_cli(tmp_path, "--data-dir", root), "differ")


def test_unreadable_image_is_named(tmp_path):
    root = write_tree(tmp_path / "tree")
    bad = os.path.join(root, "train", "b", "broken.jpg")
    with open(bad, "wb") as f:
        f.write(b"not a jpeg at all")
    assert_one_line_error(ssl_cli(tmp_path, "--data-dir", root), "unreadable image", "broken.jpg")


def test_wrong_image_size(tmp_path):
    root = write_tree(tmp_path / "tree")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(os.path.join(root, "test", "a", "small.png"))
    assert_one_line_error(ssl_cli(tmp_path, "--data-dir", root), "small.png", "16x16", "32x32")


@pytest.mark.parametrize("flag,value,needle", [
    ("--mask-ratio", "1.5", "mask_ratio"),
    ("--subset-ratio", "0", "subset_ratio"),
    ("--patch-size", "5", "does not divide"),
    ("--epochs", "abc", "epochs must be an int"),
    ("--preset", "huge", "unknown preset"),
])
def test_invalid_config_values(tmp_path, flag, value, needle):
    assert_one_line_error(ssl_cli(tmp_path, flag, value), needle)


def test_missing_checkpoint(tmp_path):
    result = cli("finetune", "--launcher", "local", "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "checkpoint not found")
    assert_one_line_error(cli("probe", "--checkpoint", str(tmp_path / "m.pt")), "checkpoint not found", "m.pt")


def test_analyze_needs_both_models(tmp_path):
    assert_one_line_error(cli("analyze", "--out", str(tmp_path / "out")), "checkpoint not found", "ssl")


def test_unknown_flag_and_stage():
    assert_one_line_error(cli("ssl", "--no-such-flag", "1"), "unrecognized arguments")
    assert_one_line_error(cli("nonsense"), "invalid choice")


def test_the_real_command_offline_without_caption_weights_exits_with_2_and_one_line(tmp_path):
    """In a new Python, as a shell runs it (the hub's offline switch is read when it is imported)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-m", "raysslvit", "captions", "--out", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert_one_line_error(r, "BLIP 'Salesforce/blip-image-captioning-base'", "CLIP ViT-B-32", "--blip-model PATH")


def test_a_failed_call_loses_nothing_written(tmp_path):
    written = tmp_path / "out" / "ssl" / "metrics.json"
    written.parent.mkdir(parents=True)
    written.write_text('{"val_rotation_acc": 0.9}\n')
    assert_one_line_error(ssl_cli(tmp_path, "--data-dir", str(tmp_path / "nowhere")), "data folder not found")
    assert written.read_text() == '{"val_rotation_acc": 0.9}\n'
