"""How long the training recipe takes on this machine, estimated stage by stage.

    python bench/train_time.py [--config df_agent/train/configs/shipped.yaml] [--steps 75] [--warmup 25]
                               [--stages look,look4]

Each stage of the config runs alone for `--steps` optimizer steps from a fresh model, through the
trainer itself (data worker, checkpoints, history), in a temporary folder. A step costs the same
whatever the weights are, so the steady seconds per step (history times between step `--warmup`
and the last step) times the stage's steps estimates the stage; their sum estimates the recipe. Run
it on an otherwise idle machine: other jobs on the same cores slow every step. About a minute per
stage; the last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from df_agent.train.__main__ import DEFAULT_CONFIG
from df_agent.train.config import load_config
from df_agent.train.trainer import train


def steady_seconds_per_step(history: Path, warmup: int) -> float:
    """Seconds per step between the first history line at or after `warmup` steps and the last one."""
    lines = [json.loads(line) for line in history.read_text().splitlines()]
    start = next(line for line in lines if line["step"] >= warmup)
    end = lines[-1]
    if end["step"] <= start["step"]:
        raise ValueError(f"too few steps after the warm-up ({warmup}) to time")
    return (end["time"] - start["time"]) / (end["step"] - start["step"])


def main(argv: list[str] | None = None) -> int:
    """Time every stage; print one line per stage and the estimate."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--steps", type=int, default=75, help="steps run per stage")
    parser.add_argument("--warmup", type=int, default=25, help="steps left out of the timing")
    parser.add_argument("--stages", default=None, help="time only these stages (comma-separated names)")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must be larger than --warmup")
    cfg = load_config(args.config)
    chosen = cfg.stages
    if args.stages:
        names = args.stages.split(",")
        unknown = sorted(set(names) - {stage.name for stage in cfg.stages})
        if unknown:
            parser.error(f"no stage named {', '.join(unknown)} in {args.config}")
        chosen = [stage for stage in cfg.stages if stage.name in names]
    stages = {}
    for stage in chosen:
        single = cfg.model_copy(update={"stages": [stage]})
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            train(single, out, stop_after=min(args.steps, stage.steps), log=lambda line: None)
            rate = steady_seconds_per_step(Path(out) / "history.jsonl", args.warmup)
        stages[stage.name] = {"steps": stage.steps, "seconds_per_step": round(rate, 3)}
        print(
            f"{stage.name:>8}: {stage.steps:5d} steps x {rate:.3f} s = {stage.steps * rate / 60:5.1f} min"
            f"  (timed in {time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    total = sum(s["steps"] * s["seconds_per_step"] for s in stages.values())
    what = "these stages" if args.stages else "the recipe"
    print(f"estimated time of {what}: {total / 60:.1f} min (start-ups and checkpoints not included)")
    print(
        json.dumps(
            {
                "config": args.config,
                "stages": stages,
                "estimated_minutes": round(total / 60, 1),
                "threads": cfg.num_threads,
                "cpus": os.cpu_count(),
                "load_average": [round(v, 2) for v in os.getloadavg()],
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
