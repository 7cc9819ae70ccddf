"""The shared schema: every feedback kind parses, TRL formats are read, and bad rows get
`file:line: field: message` errors, all of them, before training."""

import json
import os
import subprocess
import sys

import pytest

from alignkit.schema import DataError, Example, Label, demonstrations, load_examples, parse_row, prompts, write_jsonl
from conftest import write_jsonl as write_rows

NATIVE = {
    "id": "p1",
    "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "review the pizza"}],
    "answers": ["the pizza was great .", "the pizza was bad .", "the pizza was okay ."],
    "labels": [
        {"kind": "demonstration", "answer": 0},
        {"kind": "pairwise", "chosen": 0, "rejected": 1, "strength": "better", "annotator": "a1"},
        {"kind": "pairwise", "chosen": 1, "rejected": 2, "tie": True, "annotator": "a2"},
        {"kind": "pairwise", "chosen": 0, "rejected": 2, "margin": 1.5, "golden": True},
        {"kind": "ranking", "order": [0, 2, 1], "annotator": "a3"},
        {"kind": "rating", "answer": 1, "aspect": "harmlessness", "value": 4},
        {"kind": "binary", "answer": 0, "good": True},
    ],
    "meta": {"source": "test"},
}


def test_native_row_holds_every_feedback_kind_and_round_trips(tmp_path):
    ex = parse_row(NATIVE, "x:1")
    assert [lab.kind for lab in ex.labels] == ["demonstration", "pairwise", "pairwise", "pairwise", "ranking",
                                                "rating", "binary"]
    assert ex.labels[1].strength == "better" and ex.labels[1].annotator == "a1"
    assert ex.labels[2].tie and ex.labels[3].golden and ex.labels[3].margin == 1.5
    assert ex.labels[4].order == [0, 2, 1]
    assert ex.labels[5].aspect == "harmlessness" and ex.labels[5].value == 4.0
    assert ex.messages[0]["role"] == "system"
    path = tmp_path / "rt.jsonl"
    write_jsonl([ex], str(path))
    again = load_examples(str(path))[0]
    assert again.to_dict() == ex.to_dict()
    assert again.to_dict()["labels"][1]["chosen"] == 0  # index 0 must survive serialisation


def test_trl_formats_are_read_directly():
    pc = parse_row({"prompt": "hi", "completion": "hello ."}, "f:1")
    assert pc.answers == ["hello ."] and pc.labels[0].kind == "demonstration"
    kto = parse_row({"prompt": "hi", "completion": "go away", "label": False}, "f:2")
    assert kto.labels[0].kind == "binary" and kto.labels[0].good is False
    msgs = parse_row({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}, "f:3")
    assert msgs.prompt == [{"role": "user", "content": "hi"}] and msgs.answers == ["hey"]
    pref = parse_row({"prompt": "q", "chosen": "good", "rejected": "bad", "margin": 2}, "f:4")
    assert pref.answers == ["good", "bad"] and pref.labels[0].margin == 2.0
    implicit = parse_row({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                          "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}, "f:5")
    assert implicit.prompt == [{"role": "user", "content": "q"}] and implicit.answers == ["a", "b"]
    only = parse_row({"prompt": "q"}, "f:6")
    assert only.answers == [] and prompts([only])[0].prompt == "q"
    assert demonstrations([pc, kto, msgs]) == [(pc, "hello ."), (msgs, "hey")]


BAD_ROWS = [
    # (row, expected field, expected words)
    ('{"prompt": "hi", "completion": ', "<line>", "invalid JSON"),
    ({"completion": "x"}, "prompt", "missing"),
    ({"text": "x"}, "<row>", "no 'prompt' field"),
    ({"promt": "hi", "completion": "x"}, "promt", "unknown field"),
    ({"prompt": "hi", "answers": "x"}, "answers", "expected a list"),
    ({"prompt": 3, "completion": "x"}, "prompt", "expected a string"),
    ({"prompt": "  ", "completion": "x"}, "prompt", "is empty"),
    ({"prompt": "hi", "completion": ""}, "completion", "is empty"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages[0].role", "must end with an assistant turn"),
    ({"prompt": "hi", "answers": ["a", "b"], "labels": [{"kind": "pairwise", "chosen": 0, "rejected": 5}]},
     "labels[0].rejected", "out of range"),
    ({"prompt": "hi", "answers": ["a", "b"], "labels": [{"kind": "pairwise", "chosen": 1, "rejected": 1}]},
     "labels[0].rejected", "same answer"),
    ({"prompt": "hi", "answers": ["a", "b", "c"], "labels": [{"kind": "ranking", "order": [0, 0, 1]}]},
     "labels[0].order", "duplicate"),
    ({"prompt": "hi", "answers": ["a", "b", "c"], "labels": [{"kind": "ranking", "order": [0, 1]}]},
     "labels[0].order", "missing position"),
    ({"prompt": "hi", "answers": ["a"], "labels": [{"kind": "rating", "answer": 0, "value": "high"}]},
     "labels[0].value", "expected a number"),
    ({"prompt": "hi", "answers": ["a"], "labels": [{"kind": "vote", "answer": 0}]}, "labels[0].kind", "must be one of"),
    ({"prompt": "hi", "chosen": "same", "rejected": "same"}, "rejected", "identical"),
]


@pytest.mark.parametrize("row,field,words", BAD_ROWS)
def test_bad_rows_name_file_line_and_field(tmp_path, row, field, words):
    path = write_rows(tmp_path / "d.jsonl", [{"prompt": "fine", "completion": "ok"}, row])
    with pytest.raises(DataError) as e:
        load_examples(path)
    msg = str(e.value)
    assert f"{path}:2: {field}: " in msg, msg
    assert words in msg, msg


def test_all_problems_are_reported_and_capped(tmp_path):
    rows = [{"prompt": "", "completion": "x"} for _ in range(30)]
    path = write_rows(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_examples(path)
    assert len(e.value.problems) == 30
    assert f"{path}:1: prompt" in str(e.value) and f"{path}:20: prompt" in str(e.value)
    assert "and 10 more" in str(e.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: <file>: data file not found"):
        load_examples(str(tmp_path / "nope.jsonl"))


def test_json_parquet_and_saved_datasets_load(tmp_path):
    import datasets

    rows = [{"prompt": "hi", "completion": "yo"}, {"prompt": "q", "completion": "a"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for p in ("d.json", "d.parquet", "saved"):
        exs = load_examples(str(tmp_path / p))
        assert [e.answers for e in exs] == [["yo"], ["a"]], p
    bad = [{"prompt": "hi", "completion": "yo"}, {"prompt": "", "completion": "a"}]
    datasets.Dataset.from_list(bad).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad.parquet:row 1: prompt: is empty"):
        load_examples(str(tmp_path / "bad.parquet"))


def test_builtin_data_specs_cover_every_kind():
    for kind in ("sft", "prompts", "pairs", "rankings", "ratings", "binary"):
        exs = load_examples(f"builtin:{kind}:eval:12")
        assert len(exs) == 12
    pairs = load_examples("builtin:pairs:train:200")
    annotators = {lab.annotator for ex in pairs for lab in ex.labels}
    assert "spammer" in annotators and any(lab.golden for ex in pairs for lab in ex.labels)


def test_cli_reports_bad_data_with_exit_code_2(tmp_path):
    path = write_rows(tmp_path / "bad.jsonl", [{"prompt": "hi", "completion": ""}])
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "alignkit.cli", "sft", "--config",
                        os.path.join(os.path.dirname(__file__), "..", "configs/sft/tiny.yaml"),
                        f"--data.train_files=[{path}]", f"--output_dir={out}"], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert f"{path}:1: completion: is empty" in r.stderr
    assert "Traceback" not in r.stderr
