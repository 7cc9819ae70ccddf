"""Issue 13: every row of a user's data is accounted for. Encodings, rows a stage cannot use, TRL's
implicit-prompt rows, one path where a list is expected; each bad input is a `file:line: field:` message.

The first four tests are the four failures the issue reports (each failed before its fix).
"""

import gzip
import json

import pytest

from alignkit.cli import main
from alignkit.config import ConfigError, load_config, parse_overrides
from alignkit.schema import DataError, load_examples
from conftest import write_jsonl

SFT_ROW = {"prompt": "review the pizza", "completion": "the pizza was great ."}


def _problems(paths) -> list[str]:
    with pytest.raises(DataError) as e:
        load_examples(paths)
    return e.value.problems


# ----------------------------------------------------------------------------- the four reported failures


def test_non_utf8_byte_names_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "latin1.jsonl"
    # line 2 is Latin-1: "café" with é as the single byte 0xe9, at character 16 of the line
    path.write_bytes(json.dumps(SFT_ROW).encode() + b'\n{"prompt": "caf\xe9", "completion": "x"}\n')
    assert _problems(str(path)) == [f"{path}:2: <line>: not valid UTF-8 (byte 0xe9 at column 16)"]
    assert main(["data", "validate", str(path)]) == 2
    out = capsys.readouterr()
    assert f"{path}:2: <line>: not valid UTF-8 (byte 0xe9 at column 16)" in out.out
    assert "Traceback" not in out.err


def test_utf8_bom_is_accepted_and_the_text_is_unchanged(tmp_path, capsys):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(SFT_ROW, ensure_ascii=False) + "\n").encode())
    (ex,) = load_examples(str(path))
    assert ex.prompt == "review the pizza" and ex.answers == ["the pizza was great ."]
    assert main(["data", "validate", str(path)]) == 0


def test_prompt_only_row_in_sft_data_is_not_dropped_silently(tmp_path, tiny_model_dir):
    from alignkit.modeling import load_tokenizer
    from alignkit.sft import SFTConfig, prepare_sft_data

    path = write_jsonl(tmp_path / "sft.jsonl", [SFT_ROW, {"prompt": "review the soup"},
                                                 {"prompt": "review the cake", "completion": "the cake was bad ."}])
    cfg = load_config(SFTConfig, data={"data": {"train_files": [path]}, "model": {"name_or_path": tiny_model_dir}})
    tok = load_tokenizer(cfg.model)
    # Default policy: 1 of 3 rows (33%) is more than the 1% that may be skipped quietly: stop, naming the row.
    with pytest.raises(DataError) as e:
        prepare_sft_data(cfg, tok)
    assert f"{path}:2: completion: the row has only a prompt, no demonstration (needed by sft)" in e.value.problems
    assert any(p.startswith("data.on_unusable: sft (train): 1 of 3 rows") for p in e.value.problems)


def test_trl_implicit_prompt_string_rows_are_read(tmp_path):
    path = write_jsonl(tmp_path / "implicit.jsonl", [
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"chosen": "I like cats", "rejected": "I like cars"},  # differs mid-word: cut back to the word
    ])
    sky, pets = load_examples(path)
    # As TRL's extract_prompt: the space before the answers stays with them.
    assert (sky.prompt, sky.answers) == ("The sky is", [" blue.", " green."])
    assert (pets.prompt, pets.answers) == ("I like", [" cats", " cars"])
    assert sky.labels[0].kind == "pairwise" and (sky.labels[0].chosen, sky.labels[0].rejected) == (0, 1)


# ----------------------------------------------------------------------------- encodings and file kinds


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_utf16_and_utf32_with_a_byte_order_mark_are_read(tmp_path, encoding):
    path = tmp_path / "wide.jsonl"
    text = json.dumps({"prompt": "review the café", "completion": "très bien ."}, ensure_ascii=False) + "\n"
    bom = {"utf-16": b"", "utf-16-be": b"\xfe\xff", "utf-32": b""}[encoding]
    path.write_bytes(bom + text.encode(encoding))
    (ex,) = load_examples(str(path))
    assert ex.prompt == "review the café" and ex.answers == ["très bien ."]


def test_utf16_without_a_byte_order_mark_is_named(tmp_path):
    path = tmp_path / "nobom.jsonl"
    path.write_bytes((json.dumps(SFT_ROW) + "\n").encode("utf-16-le"))
    (first, *_) = _problems(str(path))
    assert first.startswith(f"{path}:1: <line>: invalid JSON") and "UTF-16 saved without a byte-order mark" in first


def test_bad_bytes_in_json_arrays_gz_parquet_and_saved_datasets(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    js = tmp_path / "rows.json"
    js.write_bytes(b'[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "\xff", "completion": "b"}\n]\n')
    assert _problems(str(js)) == [f"{js}:3: <line>: not valid UTF-8 (byte 0xff at column 15)"]

    gz = tmp_path / "rows.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        f.write(b'{"prompt": "a", "completion": "b"}\n{"prompt": "a\x80", "completion": "b"}\n')
    from alignkit.feedback.importers import read_rows

    with pytest.raises(DataError, match=rf"{gz}:2: <line>: not valid UTF-8 \(byte 0x80 at column 14\)"):
        read_rows(str(gz))

    # Arrow does not check that strings hold UTF-8: a bad cell is found and named by row and column.
    raw = pa.array([b"fine", b"caf\xe9"], type=pa.binary())
    table = pa.table({"prompt": pa.Array.from_buffers(pa.string(), 2, raw.buffers()),
                      "completion": ["good .", "bad ."]})
    pq.write_table(table, tmp_path / "rows.parquet")
    assert _problems(str(tmp_path / "rows.parquet")) == [
        f"{tmp_path / 'rows.parquet'}:row 1: prompt: not valid UTF-8 (byte 0xe9 at column 4)"]
    datasets.Dataset(table).save_to_disk(str(tmp_path / "saved"))
    assert _problems(str(tmp_path / "saved")) == [
        f"{tmp_path / 'saved'}:row 1: prompt: not valid UTF-8 (byte 0xe9 at column 4)"]


def test_numbers_nesting_and_surrogates_are_row_problems(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [
        '{"prompt": "q", "chosen": "a", "rejected": "b", "margin": NaN}',
        '{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1e999}',
        '{"prompt": "q", "chosen": "a", "rejected": "b", "margin": ' + "9" * 5000 + "}",
        "[" * 100_000 + "]" * 100_000,
        '{"prompt": "q\\ud800", "completion": "a"}',
        '{"prompt": "q", "answers": ["a"], "labels": [{"kind": "rating", "answer": 0, "value": Infinity}]}',
    ])
    assert _problems(path) == [
        f"{path}:1: margin: expected a finite number, got nan",
        f"{path}:2: margin: expected a finite number, got inf",
        f"{path}:3: <line>: invalid JSON: a number too large to read (Exceeds the limit (4300 digits) for integer "
        "string conversion)",
        f"{path}:4: <line>: invalid JSON: nested too deeply",
        f"{path}:5: prompt: not valid Unicode: unpaired surrogate U+D800 at character 2",
        f"{path}:6: labels[0].value: expected a finite number, got inf",
    ]


# ----------------------------------------------------------------------------- implicit prompts


def test_implicit_prompt_matches_trl_where_the_texts_differ_at_a_word():
    from trl.data_utils import extract_prompt

    from alignkit.schema import split_implicit_prompt

    for chosen, rejected in [("The sky is blue.", "The sky is green."), ("Q: colour?\nA: blue", "Q: colour?\nA: red"),
                             ("Answer:\n\nyes", "Answer:\n\nno")]:
        trl = extract_prompt({"chosen": chosen, "rejected": rejected})
        assert split_implicit_prompt(chosen, rejected) == (trl["prompt"], [trl["chosen"], trl["rejected"]])


def test_implicit_prompt_errors_and_hh_transcripts(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"chosen": "Blue.", "rejected": "Green."},  # nothing shared
        {"chosen": "It is", "rejected": "It is not"},  # chosen is all prompt
        {"chosen": "\n\nHuman: sky?\n\nAssistant: blue", "rejected": "\n\nHuman: sky?\n\nAssistant: green"},
    ])
    assert _problems(path) == [
        f"{path}:1: prompt: missing, and chosen/rejected do not start with the same words (an implicit prompt is "
        "their shared beginning): add a prompt field",
        f"{path}:2: chosen: nothing is left after the prompt both share ('It is'): add a prompt field"]
    hh = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: sky?\n\nAssistant: blue", "rejected": "\n\nHuman: sky?\n\nAssistant: green"}])
    (ex,) = load_examples(hh)  # an HH-RLHF transcript is cut at its last shared turn, as the importer does
    assert ex.prompt == "sky?" and ex.answers == ["blue", "green"]


# ----------------------------------------------------------------------------- row accounting


def _examples(n_demos, n_prompts):
    from alignkit.schema import parse_row

    rows = [SFT_ROW] * n_demos + [{"prompt": "review the soup"}] * n_prompts
    return [parse_row(r, f"d.jsonl:{i + 1}") for i, r in enumerate(rows)]


def test_row_account_policy_and_report(capsys):
    from alignkit.schema import select_rows

    # auto: 1 unusable row in 200 (0.5%) is within max_unusable_fraction=0.01: skipped, counted, printed.
    used, account = select_rows(_examples(199, 1), "sft")
    assert len(used) == 199
    assert account.to_dict() == {"read": 200, "used": 199, "left_out": 1, "reasons": {
        "has only a prompt, no demonstration": {"rows": 1, "first": ["d.jsonl:200"]}}}
    assert capsys.readouterr().err.strip() == ("sft (train): 200 rows read, 199 used, 1 left out: 1 row has only a "
                                              "prompt, no demonstration (d.jsonl:200)")
    # auto: 3 in 200 (1.5%) is more: stop. error: any. skip: never, unless nothing is usable.
    with pytest.raises(DataError, match="3 of 200 rows \\(1.5%\\) cannot be used"):
        select_rows(_examples(197, 3), "sft")
    with pytest.raises(DataError, match="data.on_unusable=error"):
        select_rows(_examples(199, 1), "sft", on_unusable="error")
    assert len(select_rows(_examples(100, 100), "sft", on_unusable="skip")[0]) == 100
    with pytest.raises(DataError, match="none of the 2 rows has a demonstration"):
        select_rows(_examples(0, 2), "sft", on_unusable="skip")
    # PPO uses every row's prompt.
    assert select_rows(_examples(3, 2), "ppo")[1].to_dict()["left_out"] == 0


@pytest.mark.parametrize("labels, stage, usable", [
    ([{"kind": "pairwise", "chosen": 0, "rejected": 1, "tie": True}], "rm", True),
    ([{"kind": "pairwise", "chosen": 0, "rejected": 1, "tie": True}], "dpo", False),
    ([{"kind": "rating", "answer": 0, "value": 4}, {"kind": "rating", "answer": 1, "value": 2}], "dpo", True),
    ([{"kind": "rating", "answer": 0, "value": 4}], "rm", False),  # one rated answer compares nothing
    ([{"kind": "binary", "answer": 0, "good": False}], "kto", True),
    ([{"kind": "binary", "answer": 0, "good": False}], "dpo", False),
    ([{"kind": "ranking", "order": [1, 0]}], "kto", True),
    ([{"kind": "demonstration", "answer": 0}], "rm", False),
])
def test_what_each_stage_needs(labels, stage, usable):
    from alignkit.schema import parse_row, unusable_reason

    ex = parse_row({"prompt": "q", "answers": ["a", "b"], "labels": labels}, "f:1")
    assert (unusable_reason(ex, stage) is None) == usable


def test_validate_stage_counts_rows_as_training_would(tmp_path, capsys):
    path = write_jsonl(tmp_path / "sft.jsonl", [SFT_ROW, {"prompt": "review the soup"}, SFT_ROW])
    assert main(["data", "validate", "--stage", "sft", path]) == 2
    out = capsys.readouterr().out
    assert f"sft ({path}): 3 rows read, 2 used, 1 left out: 1 row has only a prompt, no demonstration ({path}:2)" in out
    assert f"{path}:2: completion: the row has only a prompt, no demonstration (needed by sft)" in out
    assert main(["data", "validate", "--stage", "sft", "--on-unusable", "skip", "--json", path]) == 0
    report = json.loads(capsys.readouterr().out)["files"][path]
    assert report["stage"]["used"] == 2 and report["rows_with"] == {"demonstration": 2, "prompt only": 1}
    assert main(["data", "validate", "--stage", "ppo", path]) == 0
    assert main(["data", "validate", "--stage", "dpo", path]) == 2


def test_sft_summary_lists_the_rows_it_left_out(tmp_path, tiny_model_dir):
    from alignkit.sft import SFTConfig, train_sft

    rows = [SFT_ROW] * 7 + [{"prompt": "review the soup"}]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    cfg = load_config(SFTConfig, None, [f"data.train_files={path}", f"model.name_or_path={tiny_model_dir}",
                                        "data.on_unusable=skip", "train.max_steps=1", "log.progress=false",
                                        f"output_dir={tmp_path / 'out'}"])
    train_sft(cfg)
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert summary["rows"] == {"train": {"read": 8, "used": 7, "left_out": 1, "reasons": {
        "has only a prompt, no demonstration": {"rows": 1, "first": [f"{path}:8"]}}}}


# ----------------------------------------------------------------------------- one value where a list is expected


def test_a_single_path_or_source_is_a_list_of_one(tmp_path):
    from alignkit.ppo import PPOConfig
    from alignkit.sft import SFTConfig

    cfg = load_config(SFTConfig, None, parse_overrides(["--data.train_files=train.jsonl", "--data.eval_files", "eval.jsonl"]))
    assert cfg.data.train_files == ["train.jsonl"] and cfg.data.eval_files == ["eval.jsonl"]
    yml = tmp_path / "c.yaml"
    yml.write_text("data:\n  train_files: train.jsonl\n")
    assert load_config(SFTConfig, str(yml)).data.train_files == ["train.jsonl"]
    cfg = load_config(PPOConfig, None, ["reward.sources={name_or_path: runs/rm, weight: 2}"])
    assert [(s.name_or_path, s.weight) for s in cfg.reward.sources] == [("runs/rm", 2.0)]
    yml.write_text("reward:\n  sources:\n    name_or_path: runs/rm\n")
    assert load_config(PPOConfig, str(yml)).reward.sources[0].name_or_path == "runs/rm"
    with pytest.raises(ConfigError, match="a list is set whole"):
        load_config(PPOConfig, None, ["reward.sources.0.name_or_path=x"])
    with pytest.raises(ConfigError, match="data.on_unusable"):
        load_config(SFTConfig, None, ["data.on_unusable=drop"])
