"""Does a reward model still rank the best answers? Pair accuracy over all answers and within the top
quartile by gold, on answers the policies actually produce.

    python benchmarks/bench_rm_resolution.py --task format --policies SFT_DIR:PPO_DIR [...] --rms RM_DIR [...]

Samples each policy pair's SFT and PPO answers on the task's held-out prompts (alignkit.pipeline's
compare_policies, the evaluation every benchmark uses), scores every answer with every reward model
(raw, read like the report reads them), and prints per reward model: pair accuracy over random pairs
whose gold differs by at least 0.25, the same among answers in the top quartile by gold, and the
correlation of score and gold overall and in that quartile. The annotated held-out pairs (`rm-eval`,
`bench_rm_accuracy.py`) come from SFT-like answers; PPO pushes into the top, where a reward model that
saturates cannot tell a good answer from a better one.

Example (the bench_pipeline_trl.py seed-0 folder of the format task):

    python benchmarks/bench_rm_resolution.py --task format \\
        --policies runs/bench/format_s0/seed0/alignkit/sft/final:runs/bench/format_s0/seed0/alignkit/ppo/final \\
                   runs/bench/format_s0/seed0/trl_capped/sft:runs/bench/format_s0/seed0/trl_capped/ppo_lr0.0003/ppo_1x \\
        --rms runs/bench/format_s0/seed0/alignkit/rm/final runs/bench/format_s0/seed0/trl_capped/rm
"""

import argparse
import json
import os
import random
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))


def pair_accuracy(scores, gold, idx, pairs=20000, min_gap=0.25, seed=0) -> tuple[float, int]:
    rng = random.Random(seed)
    good = total = 0
    for _ in range(pairs):
        i, j = rng.sample(idx, 2)
        if abs(gold[i] - gold[j]) < min_gap:
            continue
        total += 1
        good += bool((scores[i] > scores[j]) == (gold[i] > gold[j]))
    return good / max(total, 1), total


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, help="a suite task (alignkit.tasks)")
    p.add_argument("--policies", nargs="+", required=True, metavar="SFT:PPO", help="policy folders, SFT:PPO")
    p.add_argument("--rms", nargs="+", required=True, help="reward-model folders")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON of the numbers (and the answers scored)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignkit.config import load_config
    from alignkit.pipeline import PipelineConfig, apply_task, compare_policies
    from alignkit.rewards import score_texts
    from alignkit.tasks import gold_reward

    cfg = apply_task(load_config(PipelineConfig, os.path.join(ROOT, "configs/pipeline", f"{args.task}.yaml")))
    answers = []
    for pair in args.policies:
        sft, ppo = pair.split(":")
        rec = compare_policies(sft, ppo, None, cfg)
        for name in ("sft", "ppo"):
            answers += list(zip(rec[name]["prompts"], rec[name]["texts"]))
    prompts, texts = [a for a, _ in answers], [t for _, t in answers]
    gold = torch.tensor(gold_reward(prompts, texts))
    top = (gold >= torch.quantile(gold, 0.75)).tolist()
    every, top_idx = list(range(len(texts))), [i for i, t in enumerate(top) if t]
    results = {"task": args.task, "answers": len(texts), "top_quartile_answers": len(top_idx), "rms": {}}
    print(f"{args.task}: {len(texts)} answers ({len(top_idx)} in the top quartile by gold)\n")
    print("| reward model | pair acc, all | pair acc, top quartile | corr, all | corr, top quartile |")
    print("|---|---|---|---|---|")
    for path in args.rms:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path).float().eval()
        s = score_texts(model, tok, prompts, texts)[:, 0].float()
        acc_all, n_all = pair_accuracy(s, gold, every)
        acc_top, n_top = pair_accuracy(s, gold, top_idx)
        mask = torch.tensor(top)
        corr_all = float(torch.corrcoef(torch.stack([s, gold]))[0, 1])
        corr_top = float(torch.corrcoef(torch.stack([s[mask], gold[mask]]))[0, 1])
        results["rms"][path] = {"pair_accuracy": acc_all, "pairs": n_all, "pair_accuracy_top_quartile": acc_top,
                                "pairs_top_quartile": n_top, "corr": corr_all, "corr_top_quartile": corr_top}
        print(f"| {path} | {acc_all:.3f} | {acc_top:.3f} | {corr_all:.3f} | {corr_top:.3f} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**results, "scored": [{"prompt": a, "text": t, "gold": float(g)}
                                             for (a, t), g in zip(answers, gold)]}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
