"""Sub-commands that are not training stages: built-in task helpers (and, later, data tools)."""

from __future__ import annotations

import json


def register(sub) -> None:
    from alignkit.feedback import cli as data_cli

    data_cli.register(sub)  # alignkit data inspect|validate|convert|aggregate|split
    p = sub.add_parser("builtin", help="build the built-in model or write built-in task data")
    bsub = p.add_subparsers(dest="builtin_command", required=True)
    m = bsub.add_parser("model", help="build a built-in model folder (save_pretrained format)")
    m.add_argument("--size", default="tiny", help="tiny or small")
    m.add_argument("--out", help="folder to write (default: the alignkit cache)")
    m.set_defaults(func=_builtin_model)
    d = bsub.add_parser("data", help="write built-in task data as JSONL")
    d.add_argument("--kind", required=True, help="sft, prompts, pairs, rankings, ratings or binary")
    d.add_argument("--n", type=int, default=1000)
    d.add_argument("--split", default="train", choices=["train", "eval"])
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", required=True)
    d.set_defaults(func=_builtin_data)
    e = sub.add_parser("rm-eval", help="score a saved reward model on preference data (accuracy, margin, gold)")
    e.add_argument("--model", required=True, help="a saved reward model folder (output_dir/final or final_adapter)")
    e.add_argument("--data", required=True, nargs="+", help="preference files or builtin:<kind>[:<split>[:<n>]]")
    e.add_argument("--out", help="folder for rm_eval.json and reward_distributions.png")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--max-length", type=int, default=1024, help="longer prompt + answer are truncated")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.add_argument("--policy", help="a policy folder (the SFT model): also sample it for the diagnostics "
                                    "(accuracy by gold gap, score range, best-of-N curve)")
    e.add_argument("--prompts", nargs="+", help="held-out prompts for the diagnostics (default builtin:prompts:eval)")
    e.add_argument("--num-prompts", type=int, default=64)
    e.add_argument("--best-of-n", type=int, default=64, help="samples per prompt: the curve runs N = 1, 2, 4 ... this")
    e.set_defaults(func=_rm_eval)


def _builtin_model(args) -> int:
    from alignkit import builtin

    if args.out:
        model, tok = builtin.build_model(args.size)
        model.save_pretrained(args.out)
        tok.save_pretrained(args.out)
        print(args.out)
    else:
        print(builtin.ensure_model(f"builtin:{args.size}"))
    return 0


def _builtin_data(args) -> int:
    from alignkit import builtin

    builtin.write_builtin(args.kind, args.n, args.out, split=args.split, seed=args.seed)
    print(json.dumps({"written": args.out, "rows": args.n, "kind": args.kind}))
    return 0


def _rm_eval(args) -> int:
    from alignkit.rm_eval import run_rm_eval

    return run_rm_eval(args)
