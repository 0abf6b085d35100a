"""BERT's Table 5 in small: does next-sentence prediction help a pair task?

Pretrains the bert_default encoder three ways with the same budget (steps, batch, rows):
MLM + NSP, MLM only (B always follows A, no NSP head) and a left-to-right LM (causal
attention, next-token loss, no NSP). Each is fine-tuned on two pair tasks with the same
fine-tuning budget: code_pairs ("do these two snippets come from the same file?",
configs/bert_classify.py) and code_next ("is B the snippet right after A?",
configs/bert_next.py), at each of --lrs; a fourth arm fine-tunes from scratch. Prints and
writes a Markdown table: per task the best validation accuracy over the learning rates
(BERT chose its fine-tuning lr on Dev the same way), and every lr's accuracy.

    python experiments/nsp_ablation/run.py [--root runs/nsp_ablation] [--steps 1000] \
        [--lrs 1e-4,3e-4]

Every run is an ordinary `python -m llm_jax.train` command in its own workdir, so a
rerun skips finished runs and continues interrupted ones.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

TASKS = {"code_pairs": "bert_classify", "code_next": "bert_next"}  # task: its config
ARMS = {
    "MLM + NSP": [],
    "MLM only": ["--config.task.nsp=False"],
    "left-to-right LM": ["--config.task.objective=next_token",
                         "--config.model.left_to_right=True"],
}


def train(config: str, workdir: str, *overrides: str) -> dict:
    """Runs (or resumes; a finished run only re-reads its metrics) one training command;
    returns its last eval record."""
    cmd = [sys.executable, "-m", "llm_jax.train", f"--config=configs/{config}.py",
           f"--workdir={workdir}", "--config.train.progress=lines", *overrides]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if r["split"] == "eval"]
    return evals[-1]


def fine_tune(task: str, workdir: str, lrs: list[str], *overrides: str) -> dict:
    """One fine-tuning per learning rate; the best validation accuracy and its lr (BERT
    picked each task's fine-tuning lr on Dev too)."""
    runs = {lr: train(TASKS[task], os.path.join(workdir, task, f"lr_{lr}"),
                      f"--config.optim.learning_rate={lr}", *overrides) for lr in lrs}
    best = max(runs, key=lambda lr: runs[lr]["accuracy"])
    return {"accuracy": runs[best]["accuracy"], "lr": best,
            "all": {lr: r["accuracy"] for lr, r in runs.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="runs/nsp_ablation")
    parser.add_argument("--steps", type=int, default=1000, help="pretraining steps per arm")
    # 1e-3 was also measured: it lost on every pretrained arm (README)
    parser.add_argument("--lrs", default="1e-4,3e-4", help="fine-tuning lrs to try")
    args = parser.parse_args()
    lrs = args.lrs.split(",")
    start = time.time()
    rows = []
    for arm, overrides in ARMS.items():
        slug = arm.lower().replace(" + ", "_").replace(" ", "_").replace("-", "_")
        pre = os.path.join(args.root, slug, "pretrain")
        pre_eval = train("bert_default", pre, f"--config.train.steps={args.steps}",
                         *overrides)
        causal = [o for o in overrides if "left_to_right" in o]
        fine = {task: fine_tune(task, os.path.join(args.root, slug), lrs,
                                f"--config.train.init_from={pre}", *causal)
                for task in TASKS}
        rows.append((arm, pre_eval, fine))
    # the same tokenizer as the other arms, and no pretrained parameters
    tokenizer = os.path.join(args.root, "mlm_nsp", "pretrain", "tokenizer.model")
    scratch = {task: fine_tune(task, os.path.join(args.root, "scratch"), lrs,
                               "--config.train.init_from=",
                               f"--config.data.tokenizer_path={tokenizer}")
               for task in TASKS}
    rows.append(("no pretraining", None, scratch))

    lines = ["| pretraining | pretrain eval | "
             + " | ".join(f"{t}: best (lr), all lrs" for t in TASKS) + " |",
             "| --- | --- | " + "--- | " * len(TASKS)]
    for arm, pre, fine in rows:
        if pre is None:
            pre_text = "-"
        elif "mlm_loss" in pre:
            pre_text = f"MLM loss {pre['mlm_loss']:.3f}, acc {pre['mlm_accuracy']:.3f}"
            if "nsp_accuracy" in pre:
                pre_text += f"; NSP acc {pre['nsp_accuracy']:.3f}"
        else:
            pre_text = f"LM loss {pre['loss']:.3f}, acc {pre['accuracy']:.3f}"
        cells = [f"**{f['accuracy']:.3f}** ({f['lr']}); "
                 + ", ".join(f"{a:.3f}" for a in f["all"].values()) for f in fine.values()]
        lines.append(f"| {arm} | {pre_text} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    print(f"{(time.time() - start) / 60:.1f} minutes")
    with open(os.path.join(args.root, "results.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
