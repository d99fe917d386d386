"""The study's report, built from the run folders on disk: `<out>/report.html` (one file, figures
inlined), `<out>/report.md` and `<out>/results.json` (stable keys, no per-epoch history).

    python -m raysslvit report --out DIR

With several seeds (`run --seeds 0,1,2`), DIR holds one study per seed in `seed_<k>/` and every
figure is the mean ± std over them.
"""
from __future__ import annotations

import base64
import glob
import html
import io
import json
import os
import statistics

from matplotlib.figure import Figure

from raysslvit.artifacts import atomic_path, try_read_json, write_json
from raysslvit.errors import UserError
from raysslvit.stages import STAGES
from raysslvit.tracking import numbers

# what `build` writes into the run folder, beside the stages' folders
FILES = ("report.html", "report.md", "results.json", "training_curves.png")
# (results key, metric, what it is, the study's figure, the control it is compared with)
TABLE = [
    ("probe", "test_acc_cls", "linear probe of M, final CLS (the study's protocol)", 0.3851, "probe_random"),
    ("probe", "test_acc", "linear probe of M, the chosen features", None, "probe_random"),
    ("infonce_probe", "test_acc_cls", "linear probe of the InfoNCE baseline, final CLS", 0.4008, "probe_random"),
    ("finetune", "test_acc", "fine-tuning", 0.4029, "scratch"),
    ("video_1", "test_acc", "pseudo-video, 1 spatio-temporal block", 0.4404, None),
    ("video_2", "test_acc", "pseudo-video, 2 spatio-temporal blocks", 0.4244, None),
    ("video_mean", "test_acc", "pseudo-video, mean of frame tokens", None, None),
    ("fusion", "test_acc", "caption fusion (2 blocks)", 0.7013, None),
    ("fusion", "text_only_test_acc", "captions alone (linear probe on CLIP embeddings)", None, None),
    ("fusion", "shuffled_caption_test_acc", "fusion given other images' captions", None, None),
    ("analyze", "cka_before", "CKA, CLS entering the last block vs after its attention: M", 0.8698, None),
    ("analyze", "cka_after", "the same, fine-tuned model", 0.7353, None),
]
# the study's figures are on full CIFAR-10: 50,000 train (ours: train + val) and 10,000 test images
CIFAR10_SIZES = {"train_and_val": 50000, "test": 10000, "classes": 10}
ANALYZE = [("focus_entropy_before", "focus entropy of the CLS-to-patch map, M (lower = focused)"),
           ("focus_entropy_after", "the same, fine-tuned model"),
           ("top4_mass_before", "mass in the top 4 of 16 patches, M"), ("top4_mass_after", "the same, fine-tuned model"),
           ("cka_block_before", "CKA, CLS entering vs leaving the last block: M"),
           ("cka_block_after", "the same, fine-tuned model")]
FIGURES = [("maps.png", "Similarity maps: the CLS output against each patch, M and fine-tuned"),
           ("tokens.png", "Token-by-token cosine similarity"), ("cka.png", "CKA of the CLS at every depth")]


def seed_dirs(out: str) -> dict[int, str]:
    """{seed: study folder}: `seed_<k>/` folders when there are any, else `out` itself (one seed)."""
    found = {int(p.rsplit("_", 1)[1]): p for p in glob.glob(os.path.join(out, "seed_*")) if p.rsplit("_", 1)[1].isdigit()}
    if found:
        return dict(sorted(found.items()))
    saved = try_read_json(os.path.join(out, "ssl", "config.json"))
    return {saved["seed"] if isinstance(saved, dict) and "seed" in saved else 0: out}


def load_runs(out: str) -> dict[str, dict[int, dict]]:
    """{results key: {seed: the stage's metrics.json}}, each file read once (a broken one: not finished)."""
    runs: dict[str, dict[int, dict]] = {}
    for key, stage in STAGES.items():
        for seed, d in seed_dirs(out).items():
            if isinstance(metrics := try_read_json(os.path.join(d, stage.folder, "metrics.json")), dict):
                runs.setdefault(key, {})[seed] = metrics
    return runs


def collect(out: str, runs: dict[str, dict[int, dict]]) -> dict:
    """results.json: every stage's metrics (mean over seeds, `<key>_std` beside each when several),
    without per-epoch history, plus seeds, wall times, config and provenance."""
    if not os.path.isdir(out):
        raise UserError(f"run folder not found: {out}")
    dirs = seed_dirs(out)
    results: dict = {"seeds": list(dirs)}
    for key, by_seed in runs.items():
        if len(by_seed) == 1:
            results[key] = {k: v for k, v in next(iter(by_seed.values())).items() if k != "history"}
            continue
        merged = {}
        for k in sorted(set.intersection(*(set(numbers(r)) for r in by_seed.values()))):
            values = [float(r[k]) for r in by_seed.values()]
            merged[k], merged[f"{k}_std"] = statistics.mean(values), statistics.stdev(values)
        merged["per_seed"] = {str(seed): {k: v for k, v in m.items() if k != "history"} for seed, m in by_seed.items()}
        results[key] = merged
    # {seed: {stage: its config.json}}, each file read once
    seed_configs = {seed: {os.path.basename(os.path.dirname(c)): saved
                           for c in sorted(glob.glob(os.path.join(d, "*", "config.json"))) if isinstance(saved := try_read_json(c), dict)}
                    for seed, d in dirs.items()}
    configs = next(iter(seed_configs.values()))
    if not configs:
        raise UserError(f"no finished stage in {out}: run `python -m raysslvit run --out {out}` first")
    saved = next(iter(configs.values()))
    results["config"] = saved["config"]
    results["data_sizes"] = next((c["data_sizes"] for c in configs.values() if isinstance(c.get("data_sizes"), dict)), None)
    results["full_cifar10"] = full_cifar10(results["data_sizes"])
    results["ssl_gain"] = ssl_gains(runs)
    results["provenance"] = {k: saved.get(k) for k in ("versions", "git_commit", "hardware", "host")}
    # a study built over several sittings (and seeds) holds stages made at different commits: say which
    commits: dict[str, list[str]] = {}
    for seed, stages in seed_configs.items():
        for stage, config in stages.items():
            commits.setdefault(str(config.get("git_commit")), []).append(stage if len(dirs) == 1 else f"seed_{seed}/{stage}")
    results["provenance"]["git_commits"] = commits
    study = {seed: s for seed, d in dirs.items() if isinstance(s := try_read_json(os.path.join(d, "study.json")), dict)}
    results["skipped"] = next(iter(study.values()))["skipped"] if study else {}
    # each seed's last finished `run` call (stages it found done take seconds); absent before one finished
    results["last_run_wall_s"] = {str(seed): s["wall_s"] for seed, s in study.items()}
    return results


def full_cifar10(sizes: dict | None) -> bool:
    """Whether the stages saw the study's data: only then are its figures a comparison."""
    return bool(sizes) and {"train_and_val": sizes["train"] + sizes["val"], "test": sizes["test"],
                            "classes": sizes["classes"]} == CIFAR10_SIZES


def ssl_gains(runs: dict[str, dict[int, dict]]) -> dict:
    """{"<key>.<metric>": the figure minus its control}, paired by seed (same data, split and seed):
    mean ± std of the per-seed differences; established only over two or more seeds and when the
    mean is at least two of their standard deviations away from zero."""
    gains = {}
    for key, metric, _, _, control in TABLE:
        seeds = sorted(set(runs.get(key, {})) & set(runs.get(control, {}))) if control else []
        diffs = {seed: float(runs[key][seed][metric]) - float(runs[control][seed][metric]) for seed in seeds
                 if runs[key][seed].get(metric) is not None and runs[control][seed].get(metric) is not None}
        if not diffs:
            continue
        mean = statistics.mean(diffs.values())
        std = statistics.stdev(diffs.values()) if len(diffs) > 1 else None
        gains[f"{key}.{metric}"] = {"control": control, "gain": mean, "gain_std": std,
                                    "per_seed": {str(seed): d for seed, d in diffs.items()},
                                    "established": std is not None and abs(mean) >= 2 * std}
    return gains


def _gain(results: dict, key: str, metric: str) -> str:
    g = results.get("ssl_gain", {}).get(f"{key}.{metric}")
    if g is None:
        return "—"
    text = f"{g['gain']:+.4f}" + (f" ± {g['gain_std']:.4f}" if g["gain_std"] is not None else "")
    return text if g["established"] else text + " (not established)"


def plumbing_note(results: dict) -> str | None:
    """Why the study's figures are left out, when the data is not full CIFAR-10."""
    if results.get("full_cifar10", True):
        return None
    sizes = results.get("data_sizes")
    seen = (f"{sizes['train']} train / {sizes['val']} val / {sizes['test']} test images, {sizes['classes']} classes"
            if sizes else "data of unrecorded size")
    return (f"Plumbing check: these stages saw {seen}, not full CIFAR-10, so their figures are not "
            f"comparable with the study's, which are left out.")


def rows(results: dict, done_only: bool = False) -> tuple[list[str], list[list[str]]]:
    """The results table (header, rows): each figure, its control, the SSL gain, and the study's
    figure when the data is full CIFAR-10; `done_only`: only the stages that ran."""
    comparable = results.get("full_cifar10", True)
    header = ["figure (test split)", "ours", "control", "SSL gain"] + (["the study"] if comparable else [])
    body = []
    for key, metric, what, study, control in TABLE:
        if key in results.get("skipped", {}) or (done_only and not results.get(key)):
            continue
        row = [what, _fmt(results.get(key), metric),
               # a control only beside a figure that exists: alone it would read as the stage's result
               f"{_fmt(results.get(control), metric)} ({control})" if control and results.get(control) and results.get(key) else "—",
               _gain(results, key, metric)]
        body.append(row + ([f"{study:.4f}" if study else ""] if comparable else []))
    return header, body


def seed_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Every seed's figure of the results table, and of the controls: (header, rows); none for one seed."""
    seeds = [str(s) for s in results["seeds"]]
    figures = [(key, metric, what) for key, metric, what, _, _ in TABLE]
    controls = {(c, metric) for _, metric, _, _, c in TABLE if c}
    figures += [(c, metric, f"control {c}, {metric}") for c, metric in sorted(controls)]
    body = [[what] + [f"{per[s][metric]:.4f}" if s in per and per[s].get(metric) is not None else "—" for s in seeds]
            for key, metric, what in figures if (per := (results.get(key) or {}).get("per_seed"))]
    return (["figure (test split)"] + [f"seed {s}" for s in seeds], body) if len(seeds) > 1 else ([], [])


def _fmt(m: dict | None, key: str) -> str:
    if not m or m.get(key) is None:
        return "—"
    std = m.get(f"{key}_std")
    return f"{m[key]:.4f}" + (f" ± {std:.4f}" if std is not None else "")


TIME_COLUMNS = [("wall_s", "wall (s)"), ("ray_start_s", "Ray start"), ("startup_s", "workers start"),
                ("data_s", "data load"), ("compute_s", "compute"), ("finish_s", "finish"),
                ("epochs_s", "all epochs")]


TIME_NOTE = ("Wall time and its parts are the last call's; 'all epochs' sums the epoch times of the "
             "whole history, also those before the checkpoint that a resumed stage continued from.")


def _wall_times(runs: dict[str, dict[int, dict]]) -> list[tuple[str, dict]]:
    """(stage, timing summed over seeds) for every stage that recorded one; `epochs_s` sums every
    epoch of the history, also those of an earlier call that a resumed stage continued."""
    rows = []
    for key, by_seed in runs.items():
        timings = [m["timing"] for m in by_seed.values() if isinstance(m.get("timing"), dict)]
        if timings:
            row = {k: sum(t.get(k) or 0.0 for t in timings) for k, _ in TIME_COLUMNS if k != "epochs_s"}
            epochs = [h["epoch_time_s"] for m in by_seed.values() for h in m.get("history") or [] if "epoch_time_s" in h]
            row["epochs_s"] = sum(epochs) if epochs else None
            resumed = any(t.get("resumed_after_epoch") for t in timings)
            rows.append((f"{key} (resumed)" if resumed else key, row))
    return rows


def training_curves(runs: dict[str, dict[int, dict]]) -> bytes | None:
    """One figure: for every trained stage, its val metric (top) and train loss (bottom) per epoch,
    one line per seed."""
    monitors = {key: s.monitor for key, s in STAGES.items() if s.monitor}
    histories = {key: {seed: m["history"] for seed, m in runs.get(key, {}).items() if m.get("history")}
                 for key in monitors}
    histories = {k: v for k, v in histories.items() if v}
    if not histories:
        return None
    fig = Figure(figsize=(2.8 * len(histories), 5), layout="constrained")
    axes = fig.subplots(2, len(histories), squeeze=False)
    for c, (key, by_seed) in enumerate(histories.items()):
        for seed, history in by_seed.items():
            epochs = [h["epoch"] for h in history]
            axes[0, c].plot(epochs, [h.get(monitors[key]) for h in history], marker=".", label=f"seed {seed}")
            axes[1, c].plot(epochs, [h.get("train_loss") for h in history], marker=".")
        axes[0, c].set_title(key)
        axes[0, c].set_ylabel(monitors[key])
        axes[1, c].set_ylabel("train_loss")
        axes[1, c].set_xlabel("epoch")
    if max(len(v) for v in histories.values()) > 1:
        axes[0, 0].legend(fontsize=7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def _by_seed(stages: list[str]) -> str:
    """'seed_1/ssl', 'seed_1/probe', 'seed_2/ssl' -> 'seed_1: ssl, probe; seed_2: ssl' (one seed: as given)."""
    groups: dict[str, list[str]] = {}
    for s in stages:
        seed, _, stage = s.rpartition("/")
        groups.setdefault(seed, []).append(stage)
    return "; ".join((f"{seed}: " if seed else "") + ", ".join(names) for seed, names in groups.items())


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _skipped_rows(results: dict) -> list[list[str]]:
    """[stages, why] per reason: captions and fusion share theirs."""
    by_reason: dict[str, list[str]] = {}
    for key, why in results.get("skipped", {}).items():
        by_reason.setdefault(why, []).append(key)
    return [[", ".join(keys), why] for why, keys in by_reason.items()]


def summary(results: dict) -> str:
    """The results table as console lines (test split): the figures the study reached."""
    header, body = rows(results, done_only=True)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *body]]
    lines += [f"{keys}: skipped ({why})" for keys, why in _skipped_rows(results)]
    if note := plumbing_note(results):
        lines.append(note)
    return "\n".join(lines)


def build(out: str) -> dict:
    """Write results.json, report.md and report.html under `out`; returns the results."""
    runs = load_runs(out)
    results = collect(out, runs)
    n = len(results["seeds"])
    spread = f"mean ± std over {n} seeds ({', '.join(map(str, results['seeds']))})" if n > 1 else f"seed {results['seeds'][0]}"
    main_header, main_rows = rows(results)
    note = plumbing_note(results)
    gain_note = ("SSL gain: the figure minus its control (the same recipe, data and seed from random "
                 "weights), paired by seed; not established under two seeds or within two standard "
                 "deviations of the per-seed differences.")
    skipped = _skipped_rows(results)
    analyze_rows = [[what, _fmt(results.get("analyze"), key)] for key, what in ANALYZE]
    wall_times = _wall_times(runs)
    time_rows = [[key] + [f"{t[k]:.1f}" if t[k] is not None else "—" for k, _ in TIME_COLUMNS] for key, t in wall_times]
    time_header = ["stage"] + [name for _, name in TIME_COLUMNS]
    prov = results["provenance"]
    hardware = prov.get("hardware") or {}
    machine = f"{hardware.get('cpu', '?')} ({hardware.get('cpus', '?')} CPUs)" + (f", {hardware['gpu']}" if hardware.get("gpu") else "")
    versions = ", ".join(f"{k} {v}" for k, v in (prov.get("versions") or {}).items() if v)
    total = sum(t["wall_s"] for _, t in wall_times)
    last = results["last_run_wall_s"]
    timing = f"Stages' wall time: {total:.0f} s" + (
        "." if not last else f" (the last run call: {next(iter(last.values())):.0f} s)." if len(last) == 1 else
        " (each seed's last run call: " + ", ".join(f"seed {k} {v:.0f} s" for k, v in last.items()) + ").")
    commits = prov.get("git_commits") or {str(prov.get("git_commit")): []}
    made_at = ("Commit " + next(iter(commits)) if len(commits) == 1 else
               "Commits " + "; ".join(f"{c[:7]} ({_by_seed(stages)})" for c, stages in commits.items()))

    first = next(iter(seed_dirs(out).values()))
    figures = [(name, title, open(p, "rb").read()) for name, title in FIGURES
               if os.path.exists(p := os.path.join(first, "analyze", name))]
    curves = training_curves(runs)
    if curves:
        with atomic_path(os.path.join(out, "training_curves.png")) as tmp, open(tmp, "wb") as f:
            f.write(curves)

    write_json(os.path.join(out, "results.json"), results)
    md = [f"# raysslvit study: preset `{results['config']['preset']}`", "",
          f"Test split, {spread}. Machine: {machine}. {timing} {made_at}.", "",
          "## Results", "", *([note, ""] if note else []), _md_table(main_header, main_rows), "", gain_note, ""]
    seed_header, per_seed = seed_rows(results)
    if per_seed:
        md += ["## Every seed", "", _md_table(seed_header, per_seed), ""]
    if skipped:
        md += ["Skipped here:", "", _md_table(["stage", "why"], skipped), ""]
    md += ["## Analysis", "", _md_table(["measure", "value"], analyze_rows), ""]
    md += [f"![{title}]({os.path.relpath(os.path.join(first, 'analyze', name), out)})" for name, title, _ in figures]
    md += ["", "## Training curves", "", "![training curves](training_curves.png)" if curves else "(none)", "",
           "## Wall time per stage (seconds, all seeds)", "", _md_table(time_header, time_rows), "", TIME_NOTE, "",
           "## Environment", "", f"Versions: {versions}.", "", "## Config", "", "```json",
           json.dumps(results["config"], indent=1), "```", ""]
    with atomic_path(os.path.join(out, "report.md")) as tmp, open(tmp, "w") as f:
        f.write("\n".join(md))

    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}"
             "th{background:#f3f3f3}img{max-width:100%;display:block;margin:.5em 0}pre{background:#f7f7f7;padding:1em;"
             "overflow:auto;font-size:12px}figure{margin:1em 0}figcaption{color:#555}")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>raysslvit study</title><style>{style}</style></head><body>",
             f"<h1>raysslvit study: preset <code>{html.escape(results['config']['preset'])}</code></h1>",
             f"<p>Test split, {html.escape(spread)}. Machine: {html.escape(machine)}. {html.escape(timing)} "
             f"{html.escape(made_at)}.</p>",
             "<h2>Results</h2>", *([f"<p><strong>{html.escape(note)}</strong></p>"] if note else []),
             _html_table(main_header, main_rows), f"<p>{html.escape(gain_note)}</p>"]
    if per_seed:
        parts += ["<h2>Every seed</h2>", _html_table(seed_header, per_seed)]
    if skipped:
        parts += ["<p>Skipped here:</p>", _html_table(["stage", "why"], skipped)]
    parts += ["<h2>Analysis</h2>", _html_table(["measure", "value"], analyze_rows)]
    parts += [f"<figure>{_img(data, title)}<figcaption>{html.escape(title)}</figcaption></figure>" for _, title, data in figures]
    parts += ["<h2>Training curves</h2>", _img(curves, "training curves") if curves else "<p>(none)</p>",
              "<h2>Wall time per stage (seconds, all seeds)</h2>", _html_table(time_header, time_rows),
              f"<p>{html.escape(TIME_NOTE)}</p>",
              "<h2>Environment</h2>", f"<p>Versions: {html.escape(versions)}.</p>",
              "<h2>Config</h2>", f"<pre>{html.escape(json.dumps(results['config'], indent=1))}</pre></body></html>"]
    with atomic_path(os.path.join(out, "report.html")) as tmp, open(tmp, "w") as f:
        f.write("".join(parts))
    return results
