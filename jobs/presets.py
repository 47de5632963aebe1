"""``bifta presets`` — the released WCA/BiFTA configurations ``--preset`` accepts, with their values."""

from __future__ import annotations

import argparse
import json

from bifta_core.method.presets import PRESETS, describe_preset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the presets as JSON")


def format_presets() -> str:
    """One block per preset: its method, views, released backbone and notes."""
    lines = []
    for p in PRESETS.values():
        v = p.view
        iou = f"IoU {v.iou_threshold}, keep {v.max_views}" if v.iou_threshold is not None else "no IoU refinement"
        lines.append(f"{p.name:<18} --method {p.method:<5}  {v.num_views} views, scale {v.scale[0]}-{v.scale[1]}, {iou}; "
                     f"backbone {p.backbone}; protocol {p.protocol_runs} runs x {p.protocol_views} views")
        lines.append(f"{'':<18} from {p.source}")
        lines += [f"{'':<18} note: {n}" for n in p.notes]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps([describe_preset(p) for p in PRESETS.values()], indent=2))
    else:
        print(format_presets())
    return 0


if __name__ == "__main__":
    from jobs.common import main

    raise SystemExit(main(["presets"]))
