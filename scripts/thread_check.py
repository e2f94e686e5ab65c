"""Machine-to-machine check on one machine: the same evaluation with two torch thread counts.

Another CPU takes other float paths, and so does another thread count: ``evaluation.torch_threads``
2 instead of 1 changes the order of the sums inside every convolution, so the classifiers' bits
differ. The answer must not move by more than its interval says: each run's estimate of every
comparison (HB - ES, ...) must lie inside the other run's interval.

    python scripts/thread_check.py                       # kedro run --pipeline evaluation, threads 1 then 2
    python scripts/thread_check.py --pipeline __default__ --threads 1 2 --params lora_training.lora.max_steps=20
    python scripts/thread_check.py --compare a.json b.json   # two zero_shot_metrics.json already made

Each run is a plain ``kedro run`` in the project (``--params evaluation.torch_threads=N`` added);
its ``zero_shot_metrics.json`` is copied to ``data/08_reporting/thread_check/threads<N>.json``.
Exit status 1 if an estimate falls outside the other run's interval.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
METRICS = PROJECT / "data" / "08_reporting" / "zero_shot_metrics.json"


def latest_metrics(root: Path = METRICS) -> Path:
    """The newest version of the versioned ``zero_shot_metrics.json`` (Kedro's version folders sort by time)."""
    versions = sorted(p for p in root.glob("*/zero_shot_metrics.json"))
    if not versions:
        raise FileNotFoundError(f"no zero_shot_metrics.json under {root}: run the evaluation pipeline first")
    return versions[-1]


def run(threads: int, pipeline: str, params: str, out_dir: Path) -> Path:
    """One ``kedro run`` with ``evaluation.torch_threads=threads``; its metrics copied to ``out_dir``."""
    extra = f"evaluation.torch_threads={threads}" + (f",{params}" if params else "")
    cmd = ["kedro", "run", "--pipeline", pipeline, "--params", extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=PROJECT, check=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"threads{threads}.json"
    shutil.copyfile(latest_metrics(), target)
    return target


def compare(files: list[Path], metric: str = "accuracy") -> tuple[list[str], bool]:
    """Lines naming each comparison's estimate and interval in every file, and whether each estimate
    lies inside every other file's interval (paper protocol)."""
    runs = {f: json.loads(Path(f).read_text()) for f in files}
    lines, ok = [], True
    names = list(next(iter(runs.values()))["differences"])
    for name in names:
        cells = {f: m["differences"][name]["all_classes"][metric] for f, m in runs.items() if name in m["differences"]}
        for f, d in cells.items():
            lo, hi = d["ci"]
            lines.append(f"{name} [{Path(f).name}]: {100 * d['mean']:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}]")
        for f, d in cells.items():
            for g, e in cells.items():
                if f != g:
                    inside = e["ci"][0] <= d["mean"] <= e["ci"][1]
                    ok &= inside
                    lines.append(f"  {Path(f).name} estimate inside {Path(g).name} interval: {'yes' if inside else 'NO'}")
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs=2, default=[1, 2])
    parser.add_argument("--pipeline", default="evaluation")
    parser.add_argument("--params", default="", help="more kedro --params, comma-separated")
    parser.add_argument("--compare", nargs=2, type=Path, metavar="METRICS_JSON", help="only compare two files")
    args = parser.parse_args(argv)
    if args.compare:
        files = list(args.compare)
    else:
        out_dir = PROJECT / "data" / "08_reporting" / "thread_check"
        files = [run(t, args.pipeline, args.params, out_dir) for t in args.threads]
    lines, ok = compare(files)
    print("\n".join(lines))
    print("thread-count check:", "PASSED (each estimate inside the other's interval)" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
