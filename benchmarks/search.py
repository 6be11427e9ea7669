"""What a search saves against a grid over the same space: epochs trained and the best validation
accuracy found, on real Fashion-MNIST with LeNet (`make bench-search`, a few minutes on a laptop CPU).

The sweeps run here, one after the other, with the same fixed settings. The grid runs 6 learning
rates x 2 activations. The searches (TPE + ASHA, `hydra/sweeper=optuna`) cover the same space, the
lr as the log-scale interval the grid's rates span, and prune the trials that fall behind: one with
as many trials as the grid has points, one with more. ASHA's first rung is epoch 2 (min_epochs=2):
under the one-cycle schedule the first epoch is warm-up, a poor guide to where a run ends. Compute
is counted in epochs trained (summary.json's epochs_completed), which wall time follows on an idle
machine; the wall times are printed too, measured side by side in this one process.

    python -m benchmarks.search [--epochs 6] [--subset 12000] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

LRS = ("0.3", "0.1", "0.03", "0.01", "0.003", "0.001")  # one-cycle peak lr, SGD with momentum
ACTIVATIONS = ("relu", "tanh")


def sweep(kind: str, out: Path, fixed: list[str], trials: int) -> dict:
    sweep_dir = out / kind
    if kind == "grid":
        space = [f"optimizer.lr={','.join(LRS)}", f"model.activation={','.join(ACTIVATIONS)}"]
    else:
        low, high = min(map(float, LRS)), max(map(float, LRS))
        space = ["hydra/sweeper=optuna", "hydra.sweeper.pruner=asha", "hydra.sweeper.min_epochs=2",
                 f"hydra.sweeper.n_trials={trials}", f"optimizer.lr=tag(log, interval({low}, {high}))",
                 f"model.activation=choice({','.join(ACTIVATIONS)})"]
    tic = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cnnlab", "-m", *fixed, *space, f"hydra.sweep.dir={sweep_dir}"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - tic
    if done.returncode != 0:
        raise SystemExit(f"the {kind} sweep failed:\n{done.stderr[-3000:]}")
    runs = [json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")]
    keys = {o.split("=")[0] for o in fixed}
    best = max(runs, key=lambda s: s.get("best_val_acc") or 0)
    return {"runs": len(runs), "pruned": sum(s["status"] == "pruned" for s in runs),
            "epochs": sum(s.get("epochs_completed") or 0 for s in runs), "best_val_acc": best["best_val_acc"],
            "test_acc": best["test_acc"], "best": " ".join(o for o in best["overrides"] if o.split("=")[0] not in keys),
            "seconds": seconds}


def table(results: dict[str, dict], epochs: int) -> str:
    grid = results["grid"]
    lines = ["| sweep | runs | pruned | epochs trained | compute vs grid | best val acc | its test acc | best setting | wall time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for kind, r in results.items():
        lines.append(f"| {kind} | {r['runs']} | {r['pruned']} | {r['epochs']} of {r['runs'] * epochs} | "
                     f"{r['epochs'] / grid['epochs']:.0%} | {r['best_val_acc']:.4f} | {r['test_acc']:.4f} | "
                     f"`{r['best']}` | {r['seconds']:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run (default 6)")
    parser.add_argument("--subset", type=int, default=12000, help="training images used (default 12000)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where the table goes")
    parser.add_argument("--work", type=Path, default=Path("outputs/bench_search"), help="the two sweep dirs")
    args = parser.parse_args(argv)
    fixed = ["dataset=fashion_mnist", f"dataset.subset={args.subset}", f"trainer.epochs={args.epochs}",
             "trainer.device=cpu", "trainer.progress=false", "trainer.checkpoints=none"]
    trials = len(LRS) * len(ACTIVATIONS)
    results = {"grid": sweep("grid", args.work, fixed, trials)}
    for n in (trials, 2 * trials):
        results[f"search, {n} trials"] = sweep(f"search_{n}", args.work, fixed, n)
    text = (f"LeNet on Fashion-MNIST ({args.subset} training images), {args.epochs} epochs per run, CPU. Grid: lr "
            f"{{{', '.join(LRS)}}} x activation {{{', '.join(ACTIVATIONS)}}} ({trials} runs). Searches: TPE + ASHA "
            f"(min_epochs=2, reduction_factor=3) over lr in [{min(map(float, LRS))}, {max(map(float, LRS))}] "
            f"(log) x activation. Command: `make bench-search` (`python -m benchmarks.search`).\n\n"
            + table(results, args.epochs) + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "search_vs_grid_cpu.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
