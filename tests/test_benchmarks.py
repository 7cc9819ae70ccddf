"""The benchmark scripts import the library inside functions (their children run in other venvs too), so a
moved or renamed name breaks a benchmark only when it runs. Every alignkit import they make must resolve."""

import ast
import glob
import importlib
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.py")))


def alignkit_imports(path):
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "alignkit":
            for alias in node.names:
                yield node.lineno, node.module, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "alignkit":
                    yield node.lineno, alias.name, None


@pytest.mark.parametrize("path", SCRIPTS, ids=[os.path.basename(p) for p in SCRIPTS])
def test_every_alignkit_import_of_a_benchmark_resolves(path):
    missing = []
    for line, module, name in alignkit_imports(path):
        mod = importlib.import_module(module)
        if name is not None and not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{os.path.basename(path)}:{line}: from {module} import {name}")
    assert not missing, missing


def test_the_dpo_benchmark_reads_the_pairs_alignkit_trains_on():
    import sys

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from bench_dpo import pair_rows
    finally:
        sys.path.pop(0)
    rows = pair_rows(6)
    assert len(rows) == 6 and all(r["chosen"] != r["rejected"] for r in rows)


def test_alignkit_at_no_larger_kl_is_the_default_when_it_is_there_else_the_matched_run():
    import sys

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from bench_pipeline_trl import KL_MATCHED, at_no_larger_kl
    finally:
        sys.path.pop(0)

    def ev(gain, kl):
        return {"gold_gain_in_sft_std": gain, "ppo": {"kl_to_sft": kl}}

    seed = {"eval": {"alignkit": ev(2.4, 4.5), "trl_b0.2": ev(2.38, 4.59), KL_MATCHED: ev(2.2, 4.0)},
            "kl_match": {"trl": "trl_b0.2"}}
    assert at_no_larger_kl(seed, "trl_b0.2") == ("default", seed["eval"]["alignkit"])
    seed["eval"]["alignkit"] = ev(2.4, 4.6)  # the default now sits above TRL's KL: the matched run counts
    assert at_no_larger_kl(seed, "trl_b0.2") == ("KL-matched", seed["eval"][KL_MATCHED])
    seed["kl_match"]["trl"] = "trl_b0.05"  # matched to another TRL run: it cannot stand in for this one
    assert at_no_larger_kl(seed, "trl_b0.2") is None
    seed["kl_match"]["trl"] = "trl_b0.2"
    seed["eval"][KL_MATCHED] = ev(2.3, 4.7)  # the matched run overshot TRL's KL
    assert at_no_larger_kl(seed, "trl_b0.2") is None
