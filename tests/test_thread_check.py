"""scripts/thread_check.py: each run's estimate must lie inside the other run's interval."""
from __future__ import annotations

import importlib.util
import json

from conftest import PROJECT_ROOT

spec = importlib.util.spec_from_file_location("thread_check", PROJECT_ROOT / "scripts" / "thread_check.py")
thread_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(thread_check)


def _metrics(path, mean, lo, hi):
    d = {"mean": mean, "ci": [lo, hi]}
    path.write_text(json.dumps({"differences": {"HB - ES": {"all_classes": {"accuracy": d}}}}))
    return path


def test_estimates_inside_each_others_interval_pass_and_one_outside_fails(tmp_path):
    a = _metrics(tmp_path / "threads1.json", 0.01, -0.03, 0.05)
    b = _metrics(tmp_path / "threads2.json", -0.02, -0.06, 0.02)
    lines, ok = thread_check.compare([a, b])
    assert ok and "HB - ES [threads1.json]: +1.0 points [-3.0, +5.0]" in lines
    c = _metrics(tmp_path / "threads3.json", 0.07, 0.04, 0.10)  # outside a's interval, and a outside c's
    lines, ok = thread_check.compare([a, c])
    assert not ok and "  threads3.json estimate inside threads1.json interval: NO" in lines
    assert thread_check.main(["--compare", str(a), str(c)]) == 1
