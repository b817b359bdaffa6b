"""What the demo model answers before and after ES, from the run's own evaluation outputs.

`fastes train` with the bundled demo config prints this at the end (after the before/after accuracy),
so a new user sees the change on concrete problems, not just a number. It reads the held-out
completions the trainer already wrote (``<run>/evals/<set>/step-N.jsonl``, evaluation.save_outputs):
nothing is generated again.
"""

from __future__ import annotations

import json
from pathlib import Path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def answers_table(run_dir: str | Path, count: int = 6, eval_set: str = "eval") -> str:
    """A few held-out problems with the first and the last evaluation's answers; '' when none were saved.

    Problems the run changed (fixed or broke) come first, so the lines show what ES did.
    """
    folder = Path(run_dir) / "evals" / eval_set
    files = sorted(folder.glob("step-*.jsonl"))
    if len(files) < 2:
        return ""
    first, last = _read(files[0]), _read(files[-1])
    before = {r["index"]: r for r in first if r.get("sample", 0) == 0}
    rows = [(before[r["index"]], r) for r in last if r.get("sample", 0) == 0 and r["index"] in before]
    rows.sort(key=lambda pair: (pair[0]["correct"] == pair[1]["correct"], pair[0]["index"]))
    step_a, step_b = first[0]["step"] if first else 0, last[0]["step"] if last else 0

    def mark(r: dict) -> str:
        return f"{r['completion'].strip() or '(empty)'} {'✓' if r['correct'] else '✗'}"

    lines = [f"{'problem':<12} {'answer':>7}  {'step ' + str(step_a):<10} {'step ' + str(step_b):<10}"]
    for a, b in rows[:count]:
        lines.append(f"{a['prompt']:<12} {a.get('answer', ''):>7}  {mark(a):<10} {mark(b):<10}")
    return "\n".join(lines)


__all__ = ["answers_table"]
