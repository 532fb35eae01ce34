"""Print the Markdown tables of docs/benchmarks.md from benchmarks/results/toy2d*.json.

    python benchmarks/toy2d_table.py
"""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "results"


def table(path: Path) -> str:
    res = json.loads(path.read_text())
    steps = list(next(iter(res.values()))["kl"])
    head = "| objective | " + " | ".join(f"KL {k}" for k in steps) + " | train s | evals/sample | step vs FM |"
    lines = [head, "|" + "---|" * (len(steps) + 4)]
    for name, r in res.items():
        kl = " | ".join(f"{r['kl'][k]:.3f}" for k in steps)
        extra = [f"{r['seconds']}" if r.get("seconds") is not None and not name.startswith("teacher") else "",
                 f"{r['evals_per_sample']}" if r.get("evals_per_sample") else "",
                 f"{r['step_time_vs_flow_matching']}x" if r.get("step_time_vs_flow_matching") else ""]
        label = {"teacher_euler": "*teacher Euler, same NFE*", "teacher_fine": "*teacher Euler 512 (floor)*"}.get(name, name)
        lines.append(f"| {label} | {kl} | " + " | ".join(extra) + " |")
    return "\n".join(lines)


def seeds_table(path: Path) -> str:
    """Mean +- standard deviation over seeds, and how many seeds each row beat ``lfmd_fd`` on."""
    res = json.loads(path.read_text())
    steps = list(next(iter(res.values()))["kl_mean"])
    n = len(next(iter(res.values()))["kl_per_seed"])
    lines = ["| objective | " + " | ".join(f"KL {k}" for k in steps) + " | seeds beating lfmd_fd (per step count) |",
             "|" + "---|" * (len(steps) + 2)]
    for name, r in res.items():
        kl = " | ".join(f"{r['kl_mean'][k]:.3f} ± {r['kl_std'][k]:.3f}" for k in steps)
        wins = r["wins_vs"].get("lfmd_fd")
        won = "/".join(str(wins[k]) for k in steps) + f" of {n}" if wins else ""
        lines.append(f"| {name} | {kl} | {won} |")
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sorted(ROOT.glob("toy2d*.json")):
        if path.stem.endswith("-settings"):
            continue
        if path.stem.startswith("toy2d-seeds-"):
            settings = json.loads(path.with_name(path.stem + "-settings.json").read_text())
            print(f"### {settings['teacher']}, seeds {settings['seeds']}\n\n`{settings['command']}`\n\n{seeds_table(path)}\n")
            continue
        settings = json.loads(path.with_name(path.stem + "-settings.json").read_text())
        print(f"### {settings['teacher']}\n\n`{settings['command']}`\n\n{table(path)}\n")
