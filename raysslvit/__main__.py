"""CLI: `python -m raysslvit <stage>`, or `run` for the whole study. Flags are config field names."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from raysslvit.config import SECTIONS, Config, build_config, parse_assignments
from raysslvit.errors import OneLineParser, UserError, run_cli

COMMON = ("preset", "out", "seed", "num_workers", "cpus_per_worker", "gpus_per_worker", "use_gpu", "launcher", "max_failures",
          "checkpoint", "verbose", "address", "storage", "mlflow")


SWITCHES = ("verbose",)  # fields given as a bare flag
OPTIONAL = {"mlflow": ("mlruns", "MLflow runs of every stage, in a tracking server or folder (alone: mlruns/)")}


def _add_fields(parser, cls, prefix: str, names=None):
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names:
            continue
        if f.name in SWITCHES:
            parser.add_argument("--" + f.name, dest=prefix + f.name, action="store_const", const="true", default=None,
                                help="Ray's own log lines on the console too")
            continue
        if f.name in OPTIONAL:  # a flag with an optional value
            const, text = OPTIONAL[f.name]
            parser.add_argument("--" + f.name, dest=prefix + f.name, nargs="?", const=const, default=None,
                                metavar="URI", help=text)
            continue
        parser.add_argument("--" + f.name.replace("_", "-"), dest=prefix + f.name, default=None, metavar=f.name.upper(),
                            help=f"(default: {f.default})" if f.default is not dataclasses.MISSING else None)


def build_parser() -> argparse.ArgumentParser:
    from raysslvit.stages import COMMANDS, STAGES

    sections = {s.command: s.section for s in STAGES.values()}
    parser = OneLineParser(prog="python -m raysslvit", description=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True, parser_class=OneLineParser)
    for name in ("run", *COMMANDS):
        p = sub.add_parser(name, help="the whole study" if name == "run" else f"the {name} stage")
        own = [] if name == "run" else [f.name for f in dataclasses.fields(SECTIONS[sections[name]])]
        _add_fields(p, Config, "", COMMON)
        _add_fields(p, SECTIONS["data"], "data.")
        if name in ("run", "ssl"):  # later stages take the model shape from their checkpoint
            _add_fields(p, SECTIONS["model"], "model.", [f.name for f in dataclasses.fields(SECTIONS["model"]) if f.name not in own])
        if name != "run":
            _add_fields(p, SECTIONS[sections[name]], f"{sections[name]}.")
        else:
            p.add_argument("--stages", default="", help=f"a subset, with what it needs: {','.join(STAGES)}")
            p.add_argument("--seeds", default="", help="e.g. 0,1,2: the study once per seed, the report over all (mean ± std)")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                       help="any config field, e.g. --set finetune.epochs=10")
        p.add_argument("--fresh", action="store_true", help="ignore finished results and checkpoints")
    p = sub.add_parser("report", help="rebuild <out>/report.html, report.md and results.json from disk")
    p.add_argument("--out", required=True, help="the study's run folder")
    p = sub.add_parser("export", help="a trained encoder as safetensors with timm's names, its config and a model card")
    p.add_argument("--out", required=True, help="the study's run folder")
    p.add_argument("--stage", dest="stage_name", required=True, choices=("ssl", "finetune"),
                   help="M, or the fine-tuned model")
    p.add_argument("target", help="the folder to write (model.safetensors, config.json, README.md)")
    return parser


RUN_ONLY = ("stage", "set", "fresh", "stages", "seeds")


def config_from_args(args) -> Config:
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in RUN_ONLY}
    overrides.update(parse_assignments(args.set))
    cfg = build_config(overrides.pop("preset", "smoke"), overrides)
    # the run folder fixed now: a Ray job's cwd (its working folder, which Ray manages) was seen to
    # vanish while the job ran
    return dataclasses.replace(cfg, out=cfg.out_dir)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("raysslvit", lambda: _run(args))


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds expects integers separated by commas, got {text!r}") from None


def _run(args) -> None:
    from raysslvit import report
    from raysslvit.stages import run_command, run_seeds

    if args.stage == "report":
        report.build(os.path.abspath(args.out))
        print(f"report: {os.path.join(os.path.abspath(args.out), 'report.html')}")
        return
    if args.stage == "export":
        from raysslvit.export import export

        target = export(os.path.abspath(args.out), args.stage_name, args.target)
        print(f"exported {args.stage_name} for timm: {target} (model.safetensors, config.json, README.md)")
        return
    cfg = config_from_args(args)
    if args.stage != "run":
        run_command(args.stage, cfg, fresh=args.fresh)
        return
    results = run_seeds(cfg, _seeds(args.seeds), fresh=args.fresh, stages=args.stages)
    print("\n" + report.summary(results), flush=True)
    print(f"report: {os.path.join(cfg.out_dir, 'report.html')} (also report.md, results.json)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
