"""`alignkit data ...` commands, leakage-free splits, and the reward model on imported files.

    /work/venv/bin/pytest tests/test_feedback_cli.py -q
"""

import json
import os

import pytest

from alignkit.builtin import write_builtin
from alignkit.cli import main
from alignkit.feedback.inspect import cross_split_overlap, near_duplicate_pairs, split_by_prompt
from alignkit.feedback.exporters import prompt_text
from alignkit.schema import Example, Label, load_examples

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "feedback")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fx(name):
    return os.path.join(FIX, name)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_json_on_built_in_pairs(capsys):
    code, out, _ = run(capsys, "data", "inspect", "builtin:pairs:train:300", "--eval", "builtin:pairs:eval:50",
                       "--json")
    assert code == 0
    rep = json.loads(out)
    assert rep["rows"] == 300 and rep["labels"]["pairwise"] >= 900  # 3 annotators per pair + golden
    assert set(rep["annotators"]) == {"ann_expert", "ann_good", "ann_casual", "spammer"}
    assert rep["agreement"]["pairwise/overall"]["level"] == "nominal"
    assert rep["train_eval_overlap"]["eval_prompts"] == 50
    assert rep["prompt_words"]["min"] >= 3


def test_inspect_reports_duplicates_and_cross_split_leaks(tmp_path, capsys):
    train = [{"prompt": "how do i bake a simple loaf of bread at home", "completion": "a"},
             {"prompt": "How do I bake a simple loaf of bread at home?", "completion": "b"},
             {"prompt": "what is the tallest mountain on earth", "completion": "c"}]
    held_out = [{"prompt": "what is the tallest mountain on earth", "completion": "d"},
                {"prompt": "how do i bake a simple loaf of bread at my home", "completion": "e"},
                {"prompt": "name a colour", "completion": "f"}]
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held_out)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, _ = run(capsys, "data", "inspect", str(tmp_path / "train.jsonl"), "--eval", str(tmp_path / "eval.jsonl"),
                       "--json")
    rep = json.loads(out)
    # the first two differ only in case and punctuation: identical word 3-grams
    assert rep["duplicates"]["near_duplicate_pairs"] == 1
    o = rep["train_eval_overlap"]
    # "tallest mountain" is in both; "...at my home" shares 7 of 9 3-grams with train's bread prompt:
    # Jaccard 7 / (8 + 9 - 7) = 0.7 < 0.8, so not a near-duplicate at the default threshold, but at 0.6 it is
    assert o["exact_in_train"] == 1 and o["near_duplicate_in_train"] == 0
    code, out, _ = run(capsys, "data", "inspect", str(tmp_path / "train.jsonl"), "--eval", str(tmp_path / "eval.jsonl"),
                       "--json", "--near-threshold", "0.6")
    assert json.loads(out)["train_eval_overlap"]["near_duplicate_in_train"] == 1
    code, out, _ = run(capsys, "data", "inspect", fx("label_studio_pairwise.json"))  # the rich tables
    assert code == 0 and "golden accuracy" in out and "b@example.com" in out


def test_validate_exit_codes(capsys):
    code, out, _ = run(capsys, "data", "validate", fx("hh_rlhf.jsonl"), fx("label_studio_ranker.json"))
    assert code == 0 and "ok" in out
    code, out, _ = run(capsys, "data", "validate", fx("hh_rlhf.jsonl"), fx("oasst1_broken.jsonl"), "--json")
    assert code == 2
    rep = json.loads(out)
    assert rep["files"][fx("hh_rlhf.jsonl")]["problems"] == 0
    assert rep["problems"] == [f"{fx('oasst1_broken.jsonl')}:3: parent_id: 'x-missing' is not the message_id of any "
                               "message in the data"]
    code, out, _ = run(capsys, "data", "validate", fx("unknown.jsonl"))
    assert code == 2 and "unrecognised format" in out


def test_convert_and_errors(tmp_path, capsys):
    out_path = str(tmp_path / "pairs.jsonl")
    code, out, _ = run(capsys, "data", "convert", "--from", "hh-rlhf", "--to", "trl-preference", fx("hh_rlhf.jsonl"),
                       out_path)
    assert code == 0 and json.loads(out)["rows_written"] == 3
    assert [ex.answers[0] for ex in load_examples(out_path)][2] == "Canberra."
    code, _, err = run(capsys, "data", "convert", "--to", "alignkit", fx("unknown.jsonl"), str(tmp_path / "x.jsonl"))
    assert code == 2 and "unrecognised format" in err and "tried label-studio" in err
    code, _, err = run(capsys, "data", "convert", "--to", "alignkit", fx("label_studio_choices.json"),
                       str(tmp_path / "x.jsonl"))
    assert code == 2 and "result type 'choices' is not supported" in err
    code, _, err = run(capsys, "data", "convert", "--to", "label-studio", fx("hh_rlhf.jsonl"), str(tmp_path / "t.jsonl"))
    assert code == 2 and "JSON list" in err


def test_aggregate_command_drops_the_spammer(tmp_path, capsys):
    votes = str(tmp_path / "votes.jsonl")
    write_builtin("pairs", 1500, votes)
    out_path = str(tmp_path / "clean.jsonl")
    code, out, _ = run(capsys, "data", "aggregate", "--method", "dawid_skene", "--drop-below", "0.6", "--json",
                       votes, out_path)
    assert code == 0
    rep = json.loads(out)
    assert rep["dropped_annotators"] == ["spammer"]
    clean = load_examples(out_path)
    assert len(clean) == 1500
    assert all(len([lab for lab in ex.labels if lab.kind == "pairwise"]) == 1 for ex in clean)
    assert not any(lab.annotator == "spammer" for ex in clean for lab in ex.labels)


def test_aggregate_filtering_needs_golden_items_for_each_annotator(tmp_path, capsys):
    code, _, err = run(capsys, "data", "aggregate", "--drop-below", "0.6", fx("label_studio_pairwise.json"),
                       str(tmp_path / "out.jsonl"))
    assert code == 2 and "annotator 'b@example.com': golden: labelled 0 golden item(s)" in err
    code, _, _ = run(capsys, "data", "aggregate", fx("label_studio_pairwise.json"), str(tmp_path / "out.jsonl"))
    assert code == 0


# ----------------------------------------------------------------------------- splits


def test_split_keeps_each_prompt_on_one_side_and_is_seeded():
    exs = [Example(f"prompt number {i % 40} about topic {i % 40}", ["a", "b"],
                   [Label(kind="pairwise", chosen=0, rejected=1)], id=str(i)) for i in range(200)]
    exs += [Example("Prompt number 3 about topic 3!", ["c"], [Label(kind="demonstration", answer=0)], id="dup")]
    train, held_out = split_by_prompt(exs, 0.2, seed=1)
    assert len(train) + len(held_out) == 201 and 40 <= len(held_out) <= 50
    train_prompts = {prompt_text(ex.prompt).lower().strip("!") for ex in train}
    assert not any(prompt_text(ex.prompt).lower().strip("!") in train_prompts for ex in held_out)
    o = cross_split_overlap(train, held_out)
    assert o["exact_in_train"] == 0 and o["near_duplicate_in_train"] == 0
    again = split_by_prompt(list(reversed(exs)), 0.2, seed=1)[1]  # the same groups whatever the input order
    assert {ex.id for ex in again} == {ex.id for ex in held_out}
    assert {ex.id for ex in split_by_prompt(exs, 0.2, seed=2)[1]} != {ex.id for ex in held_out}


def test_split_command(tmp_path, capsys):
    code, out, _ = run(capsys, "data", "split", "builtin:pairs:train:400", "--eval-fraction", "0.25",
                       "--train-out", str(tmp_path / "tr.jsonl"), "--eval-out", str(tmp_path / "ev.jsonl"))
    rep = json.loads(out)
    assert code == 0 and rep["train"] + rep["eval"] == 400 and rep["eval_prompts_in_train"] == 0
    tr = {prompt_text(e.prompt) for e in load_examples(str(tmp_path / "tr.jsonl"))}
    assert not tr & {prompt_text(e.prompt) for e in load_examples(str(tmp_path / "ev.jsonl"))}


def test_near_duplicate_pairs_exact_jaccard():
    texts = ["the cat sat on the mat today", "The cat sat on the mat, today!", "a dog ran",
             "the cat sat on the mat yesterday"]
    # 0 and 1 normalise to the same words (Jaccard 1); 0 and 3 share 4 of 6 distinct 3-grams: 4 / (5 + 5 - 4)
    assert near_duplicate_pairs(texts, 0.5) == [(0, 1, 1.0), (0, 3, 0.6667), (1, 3, 0.6667)]
    assert near_duplicate_pairs(texts, 0.8) == [(0, 1, 1.0)]


# ----------------------------------------------------------------------------- the reward model on imported files


# HH-RLHF: 3 pairs. Label Studio: task 101's golden label wins, 102's two votes agree, 103 is a 1-1 draw (a tie,
# dropped by rm.ties=drop): 2 pairs.
@pytest.mark.parametrize("fixture, fmt, pairs", [("hh_rlhf.jsonl", "hh-rlhf", 3),
                                                 ("label_studio_pairwise.json", "label-studio", 2)])
def test_reward_model_trains_on_an_imported_file(fixture, fmt, pairs, tmp_path, capsys):
    from alignkit import rm
    from alignkit.config import load_config

    data = str(tmp_path / "data.jsonl")
    assert run(capsys, "data", "convert", "--from", fmt, "--to", "alignkit", fx(fixture), data)[0] == 0
    cfg = load_config(rm.RMConfig, os.path.join(ROOT, "configs/rm/tiny.yaml"), [
        f"output_dir={tmp_path / 'rm'}", f"data.train_files=[{data}]", "data.eval_files=[]", "train.max_steps=2",
        "train.per_device_batch_size=2", "train.mixed_precision=no", "train.save_every=0", "log.progress=false",
        "rm.normalize_on=[]"])
    summary = rm.train_rm(cfg)
    assert os.path.exists(tmp_path / "rm" / "final" / "config.json")
    metrics = [json.loads(line) for line in open(tmp_path / "rm" / "metrics.jsonl")]
    assert any("loss" in k for m in metrics for k in m), metrics
    assert summary["steps"] == 2 and summary["data"]["train"]["pairs"] == pairs
