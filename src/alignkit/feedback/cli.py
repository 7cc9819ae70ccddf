"""`alignkit data ...`: inspect, validate, convert, aggregate and split feedback files.

    alignkit data inspect train.jsonl [--eval eval.jsonl] [--format auto] [--json]
    alignkit data validate train.jsonl [--format auto]          # exit 0 if clean, 2 otherwise
    alignkit data convert --from hh-rlhf --to trl-preference hh.jsonl pairs.jsonl
    alignkit data aggregate --method dawid_skene [--drop-below 0.6] votes.jsonl clean.jsonl
    alignkit data split data.jsonl --eval-fraction 0.1 --seed 0 --train-out train.jsonl --eval-out eval.jsonl
    alignkit data filter --judge runs/classifier-tiny/final [--threshold 0.5] sft.jsonl kept.jsonl

Inputs may be any importer format (detected from the first row unless --format is
given) or ``builtin:<kind>[:<split>[:<n>]]``. Errors (bad rows, unknown formats) end
with exit code 2 through the main CLI.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

from alignkit.schema import ON_UNUSABLE, STAGE_NEEDS, DataError

EPILOG = "formats: auto, alignkit, trl, hh-rlhf, shp, ultrafeedback, helpsteer, oasst1, pku-saferlhf, label-studio"


def register(sub) -> None:
    from alignkit.feedback.aggregate import METHODS
    from alignkit.feedback.exporters import EXPORT_FORMATS

    p = sub.add_parser("data", help="inspect, validate, convert, aggregate and split human-feedback data")
    dsub = p.add_subparsers(dest="data_command", required=True)

    def add_format(q):
        q.add_argument("--format", default="auto", help=f"input format ({EPILOG})")

    q = dsub.add_parser("inspect", help="counts, lengths, annotators, agreement, golden accuracy, duplicates",
                        epilog=EPILOG)
    q.add_argument("files", nargs="+")
    q.add_argument("--eval", nargs="+", help="eval files: report prompts shared with (or near-duplicates of) train")
    q.add_argument("--near-threshold", type=float, default=0.8, help="Jaccard of word 3-grams for a near-duplicate")
    q.add_argument("--json", action="store_true")
    add_format(q)
    q.set_defaults(func=cmd_inspect)

    q = dsub.add_parser("validate", help="check every row; exit code 0 when clean, 2 otherwise", epilog=EPILOG)
    q.add_argument("files", nargs="+")
    q.add_argument("--stage", choices=list(STAGE_NEEDS),
                   help="also check that rows have what this stage needs (sft: a demonstration; rm: a comparison; "
                        "ppo: a prompt; dpo: a preference pair; kto: a good/bad label or a pair), and count those "
                        "that do not as a training run would")
    q.add_argument("--on-unusable", default="auto", choices=list(ON_UNUSABLE),
                   help="as data.on_unusable: fail on rows the stage cannot use (error), never (skip), or when "
                        "they are more than --max-unusable-fraction of a file's rows (auto)")
    q.add_argument("--max-unusable-fraction", type=float, default=0.01)
    q.add_argument("--json", action="store_true")
    add_format(q)
    q.set_defaults(func=cmd_validate)

    q = dsub.add_parser("convert", help="convert between formats", epilog=EPILOG)
    q.add_argument("--from", dest="src_format", default="auto", help=f"input format ({EPILOG})")
    q.add_argument("--to", dest="dst_format", required=True, choices=EXPORT_FORMATS)
    q.add_argument("--aspect", help="export the labels of this aspect (default: labels without one)")
    q.add_argument("--skip-bad", action="store_true", help="leave out rows with problems (counted) instead of failing")
    q.add_argument("input")
    q.add_argument("output")
    q.set_defaults(func=cmd_convert)

    q = dsub.add_parser("aggregate", help="one label per item from several annotators", epilog=EPILOG)
    q.add_argument("--method", default="majority", choices=METHODS)
    q.add_argument("--drop-below", type=float, help="drop annotators whose golden-item accuracy is under this")
    q.add_argument("--min-golden", type=int, default=1, help="golden items an annotator needs to be scored")
    q.add_argument("--ratings", default="keep", choices=["keep", "mean"])
    q.add_argument("--json", action="store_true")
    add_format(q)
    q.add_argument("input")
    q.add_argument("output")
    q.set_defaults(func=cmd_aggregate)

    q = dsub.add_parser("split", help="seeded train/eval split by prompt (no prompt on both sides)", epilog=EPILOG)
    q.add_argument("input")
    q.add_argument("--eval-fraction", type=float, default=0.1)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--near-threshold", type=float, default=0.8,
                   help="near-duplicate prompts also stay together (0 turns this off)")
    q.add_argument("--train-out", required=True)
    q.add_argument("--eval-out", required=True)
    add_format(q)
    q.set_defaults(func=cmd_split)

    q = dsub.add_parser("filter", help="drop rows whose answers a trained judge (alignkit classifier) finds bad",
                        epilog=EPILOG)
    q.add_argument("--judge", required=True, help="a classifier folder written by `alignkit classifier` (final/)")
    q.add_argument("--threshold", type=float, help="P(good) under this is bad (default: the judge's own)")
    q.add_argument("--batch-size", type=int, default=32)
    add_format(q)
    q.add_argument("input")
    q.add_argument("output")
    q.set_defaults(func=cmd_filter)


def load(paths, fmt: str = "auto", skip_bad: bool = False):
    """Examples from files in ``fmt`` (or built-in data); (examples, problems) when skip_bad."""
    from alignkit.feedback.importers import import_rows, read_rows
    from alignkit.schema import load_examples

    examples, problems = [], []
    for path in [paths] if isinstance(paths, str) else paths:
        if path.startswith("builtin:"):
            examples.extend(load_examples(path))
            continue
        exs, probs = import_rows(read_rows(path), fmt, name=path)
        examples.extend(exs)
        problems.extend(probs)
    if problems and not skip_bad:
        raise DataError(problems)
    return (examples, problems) if skip_bad else examples


def _console():
    from rich.console import Console

    # Problems name files and fields: never wrap them mid-line when the output is not a terminal.
    import sys

    return Console() if sys.stdout.isatty() else Console(width=10_000, soft_wrap=True)


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def cmd_inspect(args) -> int:
    from alignkit.feedback.inspect import inspect_examples

    train = load(args.files, args.format)
    held_out = load(args.eval, args.format) if args.eval else None
    report = inspect_examples(train, held_out, near_threshold=args.near_threshold)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    from rich.table import Table

    con = _console()
    con.print(f"[bold]{', '.join(args.files)}[/bold]: {report['rows']} rows, "
              f"{report['conversational_prompts']} conversational prompts")
    t = Table(title="labels")
    t.add_column("kind"), t.add_column("count", justify="right"), t.add_column("golden", justify="right")
    for kind, n in report["labels"].items():
        t.add_row(kind, str(n), str(report["golden_labels"].get(kind, 0)))
    con.print(t)
    if report["pairwise_ties"]:
        con.print(f"pairwise ties: {report['pairwise_ties']}")
    con.print("aspects: " + ", ".join(f"{a} ({n})" for a, n in report["aspects"].items()))
    t = Table(title="lengths (words)")
    for col in ("", "min", "p50", "p90", "max", "mean"):
        t.add_column(col, justify="right")
    for name in ("prompt_words", "answer_words", "answers_per_row"):
        q = report[name]
        if q:
            t.add_row(name, *(_fmt(q[k]) for k in ("min", "p50", "p90", "max", "mean")))
    con.print(t)
    if report["annotators"]:
        t = Table(title="annotators (accuracy on golden items)")
        for col in ("annotator", "labels", "golden items", "golden accuracy"):
            t.add_column(col, justify="right" if col != "annotator" else "left")
        for ann, s in report["annotators"].items():
            acc = s["accuracy"]
            style = "red" if acc is not None and acc < 0.6 else None
            t.add_row(ann, str(s["labels"]), str(s["golden_items"]), _fmt(acc), style=style)
        con.print(t)
    if report["agreement"]:
        t = Table(title="agreement (Krippendorff's alpha; >= 0.8 reliable, >= 0.667 tentative)")
        for col in ("labels", "level", "alpha", "pairable units"):
            t.add_column(col)
        for name, a in report["agreement"].items():
            t.add_row(name, a["level"], _fmt(a["alpha"]), f"{a['pairable_units']}/{a['units']}")
        con.print(t)
    d = report["duplicates"]
    con.print(f"prompts: {d['distinct_prompts']} distinct; {d['rows_with_repeated_prompt']} rows share a prompt; "
              f"{d['near_duplicate_pairs']} near-duplicate pairs")
    for e in d["examples"]:
        con.print(f"  near-duplicate: {e['a']} ~ {e['b']} (jaccard {e['jaccard']})")
    if "train_eval_overlap" in report:
        o = report["train_eval_overlap"]
        bad = o["exact_in_train"] or o["near_duplicate_in_train"]
        con.print(f"[{'red' if bad else 'green'}]eval: {report['eval_rows']} rows; {o['exact_in_train']} with a prompt "
                  f"identical to a train prompt, {o['near_duplicate_in_train']} with a near-duplicate in train[/]")
        for e in o["examples"]:
            con.print(f"  leak: {e['eval']} ~ {e['train']} (jaccard {e['jaccard']})")
    return 0


def cmd_validate(args) -> int:
    """Stream every row of every file through its importer (and, with --stage, the stage's row accounting):
    memory stays bounded for the formats read row by row."""
    from alignkit.feedback.importers import iter_import, iter_rows, peek_format
    from alignkit.schema import RowAccount, _Problems, load_examples

    report, problems, accounts = {}, [], {}
    for path in args.files:
        probs, stopped = _Problems(), []  # problems in rows; and a DataError that stopped the file
        rows = _Counted(() if path.startswith("builtin:") else iter_rows(path))
        account = accounts[path] = RowAccount(args.stage, split=path) if args.stage else None
        fmt, n_examples, kinds = None, 0, Counter()  # kinds: rows holding each label kind
        try:
            if path.startswith("builtin:"):
                fmt, examples = "builtin", load_examples(path)
            else:
                fmt, raw = peek_format(rows, args.format, path)
                examples = iter_import(raw, fmt, probs, name=path)
            for ex in examples:
                n_examples += 1
                kinds.update({lab.kind for lab in ex.labels} or {"prompt only"})
                if account is not None:
                    account.add(ex)
            if account is not None and not probs.count:
                account.check(args.on_unusable, args.max_unusable_fraction)
        except DataError as e:
            stopped = e.problems
        report[path] = {"format": fmt, "rows": n_examples if fmt == "builtin" else rows.n, "examples": n_examples,
                        "problems": probs.count + len(stopped), "rows_with": dict(kinds)}
        if account is not None:
            report[path]["stage"] = {"name": args.stage, **account.to_dict()}
        problems += probs.items + stopped
    if args.json:
        print(json.dumps({"files": report, "problems": problems}, indent=2))
    else:
        con = _console()
        for path, r in report.items():
            ok = "[green]ok[/green]" if not r["problems"] else f"[red]{r['problems']} problem(s)[/red]"
            with_ = ", ".join(f"{n} {k}" for k, n in r["rows_with"].items())
            con.print(f"{path}: format {r['format']}, {r['rows']} rows -> {r['examples']} examples"
                      f"{f' ({with_})' if with_ else ''}: {ok}", highlight=False)
            if accounts[path] is not None:
                con.print(f"  {accounts[path].line()}", markup=False, highlight=False)
        for p in problems:
            con.print(f"  {p}", markup=False, highlight=False)
    return 2 if any(r["problems"] for r in report.values()) else 0


class _Counted:
    """An iterable that counts the items that pass through it."""

    def __init__(self, items):
        self.items, self.n = items, 0

    def __iter__(self):
        for item in self.items:
            self.n += 1
            yield item


def cmd_convert(args) -> int:
    from alignkit.feedback.exporters import export_examples

    if args.skip_bad:
        examples, problems = load(args.input, args.src_format, skip_bad=True)
    else:
        examples, problems = load(args.input, args.src_format), []
    try:
        n = export_examples(examples, args.dst_format, args.output, aspect=args.aspect)
    except ValueError as e:
        raise DataError([str(e)]) from None
    for p in problems[:20]:
        print(f"skipped: {p}", file=sys.stderr)
    print(json.dumps({"input": args.input, "examples": len(examples), "skipped_problems": len(problems),
                      "output": args.output, "format": args.dst_format, "rows_written": n}))
    return 0


def cmd_aggregate(args) -> int:
    from alignkit.feedback.aggregate import aggregate_examples, annotator_accuracy, annotators_to_drop
    from alignkit.feedback.agreement import agreement_report
    from alignkit.schema import write_jsonl

    examples = load(args.input, args.format)
    dropped = annotators_to_drop(examples, args.drop_below, args.min_golden) if args.drop_below is not None else []
    out = aggregate_examples(examples, args.method, drop_below=args.drop_below, min_golden=args.min_golden,
                             ratings=args.ratings)
    write_jsonl(out, args.output)
    summary = {"input": args.input, "output": args.output, "method": args.method, "rows": len(out),
               "labels_before": sum(len(ex.labels) for ex in examples),
               "labels_after": sum(len(ex.labels) for ex in out),
               "annotators": annotator_accuracy(examples), "dropped_annotators": dropped,
               "agreement_before": agreement_report(examples)}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    from rich.table import Table

    con = _console()
    t = Table(title=f"annotators ({args.method})")
    for col in ("annotator", "labels", "golden items", "golden accuracy", "dropped"):
        t.add_column(col)
    for ann, s in summary["annotators"].items():
        t.add_row(ann, str(s["labels"]), str(s["golden_items"]), _fmt(s["accuracy"]), "yes" if ann in dropped else "",
                  style="red" if ann in dropped else None)
    con.print(t)
    for name, a in summary["agreement_before"].items():
        con.print(f"agreement before aggregation, {name}: alpha {_fmt(a['alpha'])}")
    con.print(f"{summary['labels_before']} labels -> {summary['labels_after']} in {len(out)} rows: {args.output}")
    return 0


def cmd_split(args) -> int:
    from alignkit.feedback.inspect import cross_split_overlap, split_by_prompt
    from alignkit.schema import write_jsonl

    examples = load(args.input, args.format)
    train, held_out = split_by_prompt(examples, args.eval_fraction, args.seed,
                                      near_threshold=args.near_threshold or None)
    write_jsonl(train, args.train_out)
    write_jsonl(held_out, args.eval_out)
    overlap = cross_split_overlap(train, held_out)
    print(json.dumps({"train": len(train), "eval": len(held_out), "train_out": args.train_out,
                      "eval_out": args.eval_out, "eval_prompts_in_train": overlap["exact_in_train"],
                      "eval_prompts_near_train": overlap["near_duplicate_in_train"]}))
    return 0


def cmd_filter(args) -> int:
    from alignkit.classifier import Judge, filter_examples
    from alignkit.schema import write_jsonl

    kept, stats = filter_examples(load(args.input, args.format), Judge(args.judge, batch_size=args.batch_size),
                                  args.threshold)
    write_jsonl(kept, args.output)
    print(json.dumps({"input": args.input, "output": args.output, **stats}))
    return 0
