"""Fuzzing the data loaders and `alignkit data validate` (issue 13).

    pytest tests/test_data_fuzz.py -q -s      # -s prints how many cases each test tried

Whatever bytes or rows come in, the answer is acceptance or problems of the form
``file:line: field: message`` (or ``file:row N: ...``, ``file: <file>: ...``), never a traceback;
and a valid row's text comes out exactly as it went in. Random bytes, truncated and mutated
valid rows, deep nesting, huge numbers, NaN and Infinity, and a wrong type in every field of
every format. Seeded (derandomize) and bounded: a few thousand cases in well under a minute.
"""

import contextlib
import io
import json
import math
import os
import re
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignkit.cli import main
from alignkit.feedback.importers import FORMATS, import_rows, read_rows
from alignkit.schema import DataError, load_examples, parse_row

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "feedback")
FUZZ = dict(derandomize=True, deadline=None, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CASES = {}  # test -> cases tried, printed at the end of the module

_TMP = tempfile.mkdtemp(prefix="alignkit-fuzz-")


def _count(name):
    CASES[name] = CASES.get(name, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def _report_cases():
    yield
    print(f"\nfuzz cases tried (none raised): {sum(CASES.values())} {CASES}")


def _is_problem(p: str, path: str) -> bool:
    """`path:12: field: msg`, `path:row 3: field: msg`, `path: <file>: msg`."""
    return re.match(rf"^{re.escape(path)}(:\d+|:row \d+)?: [^:\s][^:]*: \S", p) is not None


def _check_file(path: str, stage: str | None = None) -> list:
    """Load ``path`` through the training loader and `data validate`: acceptance or well-formed problems."""
    try:
        examples = load_examples(path)
    except DataError as e:
        examples = None
        assert e.problems and all(_is_problem(p, path) for p in e.problems), e.problems
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["data", "validate", "--json", path] + (["--stage", stage] if stage else []))
    report = json.loads(out.getvalue())
    assert rc in (0, 2)
    assert all(_is_problem(p, path) or p.startswith("data.on_unusable: ") for p in report["problems"]), report
    return examples


def _write(name: str, data: bytes) -> str:
    path = os.path.join(_TMP, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


# ----------------------------------------------------------------------------- random and damaged bytes

VALID_LINES = [line for name in sorted(os.listdir(FIX)) if name.endswith(".jsonl") and "broken" not in name
               for line in open(os.path.join(FIX, name), "rb").read().splitlines()[:2]]
VALID_LINES += [json.dumps({"prompt": "q", "answers": ["a", "b"], "labels": [
    {"kind": "pairwise", "chosen": 0, "rejected": 1, "margin": 1.5}, {"kind": "rating", "answer": 0, "value": 4},
    {"kind": "ranking", "order": [1, 0]}, {"kind": "binary", "answer": 1, "good": False}]}).encode()]


@settings(max_examples=300, **FUZZ)
@given(data=st.binary(max_size=300), ext=st.sampled_from([".jsonl", ".json", ".parquet"]),
       bom=st.sampled_from([b"", b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff", b"\xff\xfe\x00\x00"]))
def test_random_bytes(data, ext, bom):
    _count("random_bytes")
    _check_file(_write("random" + ext, bom + data))


@st.composite
def damaged_line(draw):
    line = bytearray(draw(st.sampled_from(VALID_LINES)))
    for _ in range(draw(st.integers(1, 3))):
        op, at = draw(st.sampled_from(["cut", "flip", "insert", "delete"])), draw(st.integers(0, len(line)))
        if op == "cut":
            del line[at:]
        elif op == "flip" and at < len(line):
            line[at] = draw(st.integers(0, 255))
        elif op == "insert":
            line[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif at < len(line):
            del line[at]
    return bytes(line)


@settings(max_examples=400, **FUZZ)
@given(line=damaged_line(), good=st.sampled_from(VALID_LINES))
def test_truncated_and_mutated_rows(line, good):
    _count("mutated_rows")
    _check_file(_write("mutated.jsonl", good + b"\n" + line + b"\n"))


# ----------------------------------------------------------------------------- nesting and numbers

ODD_VALUES = [None, True, False, 0, -1, 1.5, 10 ** 30, -10 ** 30, float("nan"), float("inf"), float("-inf"), "",
              " ", "x", "\ud800", [], [1], ["a", "b"], {}, {"a": 1}, [[[[]]]], {"role": "user"}]
ODD_JSON = ["NaN", "Infinity", "-Infinity", "1e999", "9" * 5000, "-0", "1E-400", "[" * 3000 + "]" * 3000,
            "{\"a\":" * 3000 + "1" + "}" * 3000, "[" * 50 + "]" * 50]


@settings(max_examples=300, **FUZZ)
@given(line=st.sampled_from(VALID_LINES), which=st.integers(0, 10 ** 6), odd=st.sampled_from(ODD_JSON))
def test_deep_nesting_and_odd_numbers_in_any_field(line, which, odd):
    _count("nesting_numbers")
    row = json.loads(line)
    paths = list(_leaf_paths(row))
    path = paths[which % len(paths)]
    text = json.dumps(_replace(row, path, "@@ODD@@")).replace('"@@ODD@@"', odd)
    _check_file(_write("odd.jsonl", text.encode() + b"\n"))


def _leaf_paths(value, prefix=()):
    """Every path to a value inside ``value`` (keys and indexes), the value itself included."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaf_paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaf_paths(v, prefix + (i,))


def _replace(value, path, new):
    if not path:
        return new
    value = json.loads(json.dumps(value))  # a copy
    inner = value
    for k in path[:-1]:
        inner = inner[k]
    inner[path[-1]] = new
    return value


# ----------------------------------------------------------------------------- a wrong type in every field


def _fixture_rows():
    """(format, rows) of every fixture, as the importers get them."""
    out = []
    for name in sorted(os.listdir(FIX)):
        if "broken" in name or name in ("unknown.jsonl", "label_studio_choices.json"):
            continue
        rows = read_rows(os.path.join(FIX, name))
        fmt = "label-studio" if name.startswith("label_studio") else \
            "trl" if name.startswith("trl") else name.split(".")[0].replace("_", "-")
        out.append((fmt, rows))
    return out


def test_a_wrong_type_in_every_field_of_every_format():
    """Each fixture row, each field at every depth, each odd value: the importer of its format (and the
    native/TRL parser) answers with examples or well-formed problems, and validate never raises."""
    n = 0
    for fmt, rows in _fixture_rows():
        assert fmt in FORMATS
        for r, (where, row) in enumerate(rows[:1]):  # the first row of each fixture: every field
            for path in list(_leaf_paths(row))[1:]:
                for odd in ODD_VALUES:
                    bad = rows[:r] + [(where, _replace(row, path, odd))] + rows[r + 1:]
                    examples, problems = import_rows(bad, fmt, name="fx")
                    assert all(re.match(r"^\S+(:\d+|:row \d+)?: [^:\s][^:]*: \S", p) for p in problems), problems
                    for ex in examples:  # what an importer accepts is a valid schema row
                        parse_row(ex.to_dict(), ex.source)
                    n += 1
    CASES["wrong_types_in_memory"] = n
    assert n > 3000


@settings(max_examples=300, **FUZZ)
@given(fmt_rows=st.sampled_from(_fixture_rows()), which=st.integers(0, 10 ** 6), odd=st.sampled_from(ODD_VALUES),
       stage=st.sampled_from([None, "sft", "rm", "ppo", "dpo", "kto"]))
def test_a_wrong_type_through_files_and_validate(fmt_rows, which, odd, stage):
    _count("wrong_types_in_files")
    fmt, rows = fmt_rows
    where, row = rows[which % len(rows)]
    paths = list(_leaf_paths(row))[1:]
    row = _replace(row, paths[which % len(paths)], odd)
    lines = [json.dumps(r if i != which % len(rows) else row, allow_nan=True)
             for i, (_, r) in enumerate(rows)]
    text = "\n".join(lines).encode("utf-8", errors="surrogatepass")  # a lone surrogate written as its bytes
    if fmt == "label-studio":
        text = b"[" + b",\n".join(text.split(b"\n")) + b"]"
    _check_file(_write("wrong" + (".json" if fmt == "label-studio" else ".jsonl"), text), stage)


# ----------------------------------------------------------------------------- Parquet and saved datasets

_column = st.one_of(
    st.lists(st.text(max_size=8), min_size=2, max_size=2),
    st.lists(st.one_of(st.none(), st.integers(-2 ** 63, 2 ** 63 - 1)), min_size=2, max_size=2),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=2, max_size=2),
    st.lists(st.booleans(), min_size=2, max_size=2),
    st.lists(st.lists(st.text(max_size=4), max_size=3), min_size=2, max_size=2),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "x"]), "content": st.text(max_size=4)})
             .map(lambda d: [d]), min_size=2, max_size=2),
    st.lists(st.binary(max_size=6), min_size=2, max_size=2),
)


@settings(max_examples=150, **FUZZ)
@given(columns=st.dictionaries(st.sampled_from(["prompt", "completion", "chosen", "rejected", "messages", "label",
                                                 "margin", "answers", "labels", "id", "meta"]), _column, min_size=1,
                               max_size=4), saved=st.integers(0, 9))
def test_parquet_and_saved_datasets_with_any_column_types(columns, saved):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    datasets.disable_progress_bars()
    _count("arrow")
    path = os.path.join(_TMP, "cols.parquet")
    try:
        table = pa.table(columns)
        pq.write_table(table, path)
    except (pa.ArrowException, OverflowError, TypeError, ValueError):
        return  # not a table Arrow can hold
    _check_file(path)
    if saved == 0:  # save_to_disk is slower: one case in ten
        folder = os.path.join(_TMP, f"saved-{len(CASES)}-{CASES['arrow']}")
        datasets.Dataset(table).save_to_disk(folder)
        _check_file(folder)


# ----------------------------------------------------------------------------- valid rows come out unchanged

_text = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=30).filter(lambda s: s.strip())


@st.composite
def valid_row(draw):
    kind = draw(st.sampled_from(["completion", "preference", "implicit", "messages", "native"]))
    prompt = draw(_text)
    a, b = draw(_text), draw(_text)
    if kind == "completion":
        return {"prompt": prompt, "completion": a}, (prompt, [a])
    if kind == "preference" and a != b:
        return {"prompt": prompt, "chosen": a, "rejected": b, "margin": 0.5}, (prompt, [a, b])
    if kind == "implicit" and not a.startswith(b) and not b.startswith(a):
        # a shared beginning that ends a word, then answers that start with a space
        return {"chosen": prompt + " " + a, "rejected": prompt + " " + b}, None
    if kind == "messages":
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": a}]
        return {"messages": msgs}, ([msgs[0]], [a])
    answers = [a, b]
    value = draw(st.floats(-1e6, 1e6, allow_nan=False))
    return ({"prompt": prompt, "answers": answers, "labels": [{"kind": "rating", "answer": 1, "value": value},
                                                              {"kind": "demonstration", "answer": 0}]},
            (prompt, answers))


@settings(max_examples=500, **FUZZ)
@given(rows=st.lists(valid_row(), min_size=1, max_size=4),
       encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-32", "ascii-escaped"]))
def test_valid_rows_are_read_unchanged(rows, encoding):
    _count("valid_rows")
    lines = "".join(json.dumps(r, ensure_ascii=encoding == "ascii-escaped") + "\n" for r, _ in rows)
    path = _write("valid.jsonl", lines.encode("utf-8" if encoding == "ascii-escaped" else encoding))
    examples = _check_file(path)
    assert examples is not None and len(examples) == len(rows)
    for ex, (row, expected) in zip(examples, rows):
        if expected is None:  # implicit prompt: the texts split, nothing added or lost
            assert ex.prompt + ex.answers[0] == row["chosen"] and ex.prompt + ex.answers[1] == row["rejected"]
        else:
            assert (ex.prompt, ex.answers) == expected
        for lab in ex.labels:
            assert lab.value is None or math.isfinite(lab.value)
