"""Two or more RL runs side by side: reward against iteration and against wall time, from their history.json.

    python bench/rl_compare.py runs/rl_sde_velocity runs/rl_sde_score --labels velocity score \\
        --out bench/results/rl_velocity_vs_score.png --json bench/results/rl_velocity_vs_score.json

Training reward (mean over the iteration's trajectories, with the exploration noise) and validation reward (held-out
compositions, every ``validation.every`` iterations) per run; the JSON gives the final and best values, the mean
seconds per iteration and the wall time to reach 90 % of each run's final reward gain.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_history(run: Path) -> list[dict]:
    path = run / "history.json" if run.is_dir() else run
    rows = json.loads(path.read_text())
    if not isinstance(rows, list) or not rows:
        raise SystemExit(f"{path}: no history rows")
    return rows


def summarise(rows: list[dict]) -> dict:
    train = [r for r in rows if r.get("reward_mean") is not None]
    val = [r for r in rows if r.get("val_reward_mean") is not None]  # iteration 0: before any update
    wall, t = [], 0.0
    for r in train:
        t += r.get("time_total_s") or 0.0
        wall.append(t)
    first, last = train[0]["reward_mean"], sum(r["reward_mean"] for r in train[-5:]) / len(train[-5:])
    target = first + 0.9 * (last - first)
    reach = next((w for r, w in zip(train, wall) if (r["reward_mean"] - target) * (1 if last >= first else -1) >= 0), None)
    return {
        "iterations": len(train),
        "reward_first": first,
        "reward_last5_mean": last,
        "val_reward_first": val[0]["val_reward_mean"] if val else None,
        "val_reward_last": val[-1]["val_reward_mean"] if val else None,
        "val_reward_best": max(r["val_reward_mean"] for r in val) if val else None,
        "seconds_per_iteration_mean": wall[-1] / len(train) if train else None,
        "wall_s": wall[-1] if wall else None,
        "wall_s_to_90pct_of_gain": reach,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="RL run folders (or history.json files)")
    ap.add_argument("--labels", nargs="*", default=None)
    ap.add_argument("--out", default=None, help="PNG figure")
    ap.add_argument("--json", default=None, help="summary JSON")
    args = ap.parse_args()
    labels = args.labels or [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit("--labels needs one label per run")
    histories = {label: load_history(run) for label, run in zip(labels, args.runs)}
    summary = {label: summarise(rows) for label, rows in histories.items()}
    print(json.dumps(summary, indent=2))
    if args.json:
        from crystalign.io import write_json

        write_json(args.json, {"runs": {label: str(run) for label, run in zip(labels, args.runs)}, "summary": summary})
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for label, rows in histories.items():
            wall, t = [], 0.0  # cumulative seconds at the end of each row (the iteration-0 validation row: 0)
            for r in rows:
                t += r.get("time_total_s") or 0.0
                wall.append(t)
            train = [(r, w) for r, w in zip(rows, wall) if r.get("reward_mean") is not None]
            line = axes[0].plot([r["iteration"] for r, _ in train], [r["reward_mean"] for r, _ in train], label=f"{label} (train)")[0]
            axes[1].plot([w for _, w in train], [r["reward_mean"] for r, _ in train], color=line.get_color(), label=f"{label} (train)")
            val = [(r["iteration"], w, r["val_reward_mean"]) for r, w in zip(rows, wall) if r.get("val_reward_mean") is not None]
            if val:
                axes[0].plot([v[0] for v in val], [v[2] for v in val], "o--", color=line.get_color(), label=f"{label} (validation)")
                axes[1].plot([v[1] for v in val], [v[2] for v in val], "o--", color=line.get_color())
        axes[0].set_xlabel("iteration")
        axes[1].set_xlabel("wall time (s)")
        for ax in axes:
            ax.set_ylabel("reward")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=120)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
