"""CLI: `python -m raysslvit <stage>`, or `run` for the whole study. Flags are config field names."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from raysslvit.config import SECTIONS, Config, build_config, parse_assignments
from raysslvit.errors import OneLineParser, run_cli

COMMON = ("preset", "out", "seed", "num_workers", "cpus_per_worker", "gpus_per_worker", "use_gpu", "launcher", "max_failures",
          "checkpoint")


def _add_fields(parser, cls, prefix: str, names=None):
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names:
            continue
        parser.add_argument("--" + f.name.replace("_", "-"), dest=prefix + f.name, default=None, metavar=f.name.upper(),
                            help=f"(default: {f.default})" if f.default is not dataclasses.MISSING else None)


def build_parser() -> argparse.ArgumentParser:
    from raysslvit.stages import STAGES

    parser = OneLineParser(prog="python -m raysslvit", description=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True, parser_class=OneLineParser)
    for name in ("run", *STAGES):
        p = sub.add_parser(name, help="the whole study" if name == "run" else f"the {name} stage")
        own = [] if name == "run" else [f.name for f in dataclasses.fields(SECTIONS[STAGES[name][0]])]
        _add_fields(p, Config, "", COMMON)
        _add_fields(p, SECTIONS["data"], "data.")
        if name in ("run", "ssl"):  # later stages take the model shape from their checkpoint
            _add_fields(p, SECTIONS["model"], "model.", [f.name for f in dataclasses.fields(SECTIONS["model"]) if f.name not in own])
        if name != "run":
            _add_fields(p, SECTIONS[STAGES[name][0]], f"{STAGES[name][0]}.")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                       help="any config field, e.g. --set finetune.epochs=10")
        p.add_argument("--fresh", action="store_true", help="ignore finished results and checkpoints")
    return parser


def config_from_args(args) -> Config:
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in ("stage", "set", "fresh")}
    overrides.update(parse_assignments(args.set))
    return build_config(overrides.pop("preset", "smoke"), overrides)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("raysslvit", lambda: _run(args))


def _run(args) -> None:
    from raysslvit.stages import STAGES, run_study

    cfg = config_from_args(args)
    if args.stage != "run":
        STAGES[args.stage][1](cfg, fresh=args.fresh)
        return
    r = run_study(cfg, fresh=args.fresh)
    print(f"\nresults in {cfg.out_dir}/ (test split)\n"
          f"  probe of M        test_acc {r['probe']['test_acc']:.4f}  (CLS only {r['probe']['test_acc_cls']:.4f})\n"
          f"  probe of InfoNCE  test_acc {r['probe_ssl_infonce']['test_acc']:.4f}  "
          f"(CLS only {r['probe_ssl_infonce']['test_acc_cls']:.4f})\n"
          f"  fine-tuned        test_acc {r['finetune']['test_acc']:.4f}\n"
          f"  pseudo-video      test_acc {r['video_1']['test_acc']:.4f} (1 block)  {r['video_2']['test_acc']:.4f} (2)  "
          f"{r['video_mean']['test_acc']:.4f} (mean)\n"
          f"  CKA before/after  {r['analyze']['cka_before']:.4f} / {r['analyze']['cka_after']:.4f}\n"
          + ("  caption fusion    skipped (see above)" if "skipped" in r["fusion"] else
             f"  caption fusion    test_acc {r['fusion']['test_acc']:.4f}  (captions alone "
             f"{r['fusion']['text_only_test_acc']:.4f}, shuffled {r['fusion']['shuffled_caption_test_acc']:.4f})"),
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
