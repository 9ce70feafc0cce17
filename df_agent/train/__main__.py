"""``python -m df_agent.train --config CONFIG --out DIR [--resume]``: train a DualFocus model."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "shipped.yaml"


def main(argv: list[str] | None = None) -> int:
    """Train from a config file; returns the exit status (the `df-agent train` command calls this)."""
    from df_agent.train.config import load_config
    from df_agent.train.trainer import train

    parser = argparse.ArgumentParser(prog="python -m df_agent.train", description=__doc__)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML or JSON training config")
    parser.add_argument("--out", required=True, help="output folder (checkpoints, history, final/)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--export", default=None, help="only save OUT/checkpoint.pt as a model folder here")
    parser.add_argument("--stages", type=int, default=None, help="run only the first N stages (debugging)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    if args.stages is not None:
        cfg.stages = cfg.stages[: args.stages]
    if args.export:
        from df_agent.train.trainer import CHECKPOINT, export_checkpoint

        export_checkpoint(cfg, Path(args.out) / CHECKPOINT, args.export)
        return 0
    train(cfg, args.out, resume=args.resume)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
