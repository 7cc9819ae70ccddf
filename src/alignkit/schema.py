"""One dataset schema for every stage: what human annotators actually produce.

A row (an :class:`Example`) is a prompt, the answers shown for it, and the labels
people gave them. Every stage reads the same rows and takes the view it needs:
SFT the demonstrations, the reward model the comparisons, PPO the prompts.

Native JSONL row (every field but ``prompt`` optional)::

    {"id": "p17",
     "prompt": "review the pizza"            # or [{"role": "system"|"user"|"assistant", "content": ...}, ...]
     "answers": ["the pizza was great .", "the pizza was bad ."],
     "labels": [
        {"kind": "demonstration", "answer": 0},
        {"kind": "pairwise", "chosen": 0, "rejected": 1, "strength": "better", "annotator": "a1"},
        {"kind": "pairwise", "chosen": 0, "rejected": 1, "tie": true, "annotator": "a2"},
        {"kind": "pairwise", "chosen": 0, "rejected": 1, "margin": 1.5},
        {"kind": "ranking", "order": [0, 1], "annotator": "a3"},           # best first
        {"kind": "rating", "answer": 1, "aspect": "harmlessness", "value": 4},
        {"kind": "binary", "answer": 0, "good": true, "golden": true},
        {"kind": "binary", "answer": 1, "good": false, "category": "insult"}],  # category: optional
     "meta": {...}}

TRL's formats are read directly: prompt-completion ``{prompt, completion}``
(``label: bool`` makes it an unpaired/KTO row), ``{messages}``, preference
``{prompt, chosen, rejected}`` (optional ``margin``) and implicit-prompt
conversational ``{chosen, rejected}``. A row with only ``prompt`` is a prompt for PPO.

Every problem is reported as ``file:line: field: what is wrong``; all rows are
checked before any training starts.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Union

Message = dict  # {"role": str, "content": str}
Prompt = Union[str, list]

LABEL_KINDS = ("demonstration", "pairwise", "ranking", "rating", "binary")
ROLES = ("system", "user", "assistant")
MAX_REPORTED_PROBLEMS = 20
_LABEL_FIELDS = {
    "demonstration": {"answer"},
    "pairwise": {"chosen", "rejected", "tie", "strength", "margin"},
    "ranking": {"order"},
    "rating": {"answer", "value"},
    "binary": {"answer", "good", "category"},
}
_COMMON_LABEL_FIELDS = {"kind", "annotator", "golden", "aspect"}


class DataError(ValueError):
    """Bad data: carries every problem found, each as ``file:line: field: message``."""

    def __init__(self, problems: list[str], total: int | None = None):
        self.problems = problems
        total = len(problems) if total is None else total
        shown = "\n  ".join(problems[:MAX_REPORTED_PROBLEMS])
        more = f"\n  ... and {total - MAX_REPORTED_PROBLEMS} more" if total > MAX_REPORTED_PROBLEMS else ""
        super().__init__(f"{total} problem(s) in the data:\n  {shown}{more}")


@dataclass
class Label:
    """One judgement by one annotator (or a golden reference when ``golden``)."""

    kind: str
    annotator: str | None = None
    golden: bool = False  # a control item's known answer, used to score annotators
    aspect: str | None = None  # None = the overall preference
    answer: int | None = None  # demonstration, rating, binary
    chosen: int | None = None  # pairwise
    rejected: int | None = None
    tie: bool = False
    strength: str | None = None  # e.g. Llama 2's "significantly_better" ... "negligibly_better"
    margin: float | None = None
    order: list[int] | None = None  # ranking, answer indices best first
    value: float | None = None  # rating
    good: bool | None = None  # binary
    category: str | None = None  # binary: which kind of good/bad (Llama Guard style, e.g. "insult")

    def to_dict(self) -> dict:
        d = {"kind": self.kind}
        for k, v in asdict(self).items():
            # `good: false` is a binary label's content, not a default to leave out
            if k != "kind" and v is not None and (v is not False or k == "good"):
                d[k] = v
        return d


@dataclass
class Example:
    prompt: Prompt
    answers: list[str] = field(default_factory=list)
    labels: list[Label] = field(default_factory=list)
    id: str | None = None
    meta: dict = field(default_factory=dict)
    source: str = "<memory>"  # "file:line", for error messages downstream

    @property
    def messages(self) -> list[Message]:
        """The prompt as a conversation (a plain string is one user turn)."""
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return list(self.prompt)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {}
        if self.id is not None:
            d["id"] = self.id
        d["prompt"] = self.prompt
        if self.answers:
            d["answers"] = list(self.answers)
        if self.labels:
            d["labels"] = [lab.to_dict() for lab in self.labels]
        if self.meta:
            d["meta"] = self.meta
        return d


# ----------------------------------------------------------------------------- parsing


class _Problems:
    def __init__(self):
        self.items: list[str] = []

    def add(self, where: str, fieldname: str, msg: str):
        self.items.append(f"{where}: {fieldname}: {msg}")


def _check_text(value, where, fieldname, problems) -> bool:
    if not isinstance(value, str):
        problems.add(where, fieldname, f"expected a string, got {type(value).__name__}")
        return False
    if not value.strip():
        problems.add(where, fieldname, "is empty")
        return False
    return True


def _check_conversation(value, where, fieldname, problems) -> bool:
    if not isinstance(value, list) or not value:
        problems.add(where, fieldname, "expected a non-empty list of {role, content} turns")
        return False
    ok = True
    for i, turn in enumerate(value):
        f = f"{fieldname}[{i}]"
        if not isinstance(turn, dict):
            problems.add(where, f, f"expected an object with role and content, got {type(turn).__name__}")
            ok = False
            continue
        extra = set(turn) - {"role", "content"}
        if extra:
            problems.add(where, f, f"unknown field(s) {sorted(extra)}; a turn has role and content")
            ok = False
        if turn.get("role") not in ROLES:
            problems.add(where, f"{f}.role", f"must be one of {list(ROLES)}, got {turn.get('role')!r}")
            ok = False
        if not _check_text(turn.get("content"), where, f"{f}.content", problems):
            ok = False
    return ok


def _check_prompt(value, where, fieldname, problems) -> bool:
    if isinstance(value, list):
        if not _check_conversation(value, where, fieldname, problems):
            return False
        if value[-1]["role"] == "assistant":
            problems.add(where, fieldname, "a prompt conversation must end with a user (or system) turn, not assistant")
            return False
        return True
    return _check_text(value, where, fieldname, problems)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_label(raw, n_answers: int, where: str, f: str, problems: _Problems) -> Label | None:
    if not isinstance(raw, dict):
        problems.add(where, f, f"expected an object, got {type(raw).__name__}")
        return None
    kind = raw.get("kind")
    if kind not in LABEL_KINDS:
        problems.add(where, f"{f}.kind", f"must be one of {list(LABEL_KINDS)}, got {kind!r}")
        return None
    allowed = _COMMON_LABEL_FIELDS | _LABEL_FIELDS[kind]
    n_before = len(problems.items)
    for key in raw:
        if key not in allowed:
            problems.add(where, f"{f}.{key}", f"unknown field for a {kind} label (allowed: {sorted(allowed)})")
    if raw.get("annotator") is not None and not isinstance(raw["annotator"], (str, int)):
        problems.add(where, f"{f}.annotator", "expected a string id")
    if not isinstance(raw.get("golden", False), bool):
        problems.add(where, f"{f}.golden", "expected true or false")
    if raw.get("aspect") is not None and not isinstance(raw["aspect"], str):
        problems.add(where, f"{f}.aspect", "expected a string")

    def index(key):
        v = raw.get(key)
        if v is None:
            problems.add(where, f"{f}.{key}", f"missing (required for a {kind} label)")
        elif not _is_int(v):
            problems.add(where, f"{f}.{key}", f"expected an answer index (integer), got {v!r}")
        elif not 0 <= v < n_answers:
            problems.add(where, f"{f}.{key}", f"answer index {v} out of range: the row has {n_answers} answer(s)")
        else:
            return v
        return None

    if kind in ("demonstration", "rating", "binary"):
        index("answer")
    if kind == "pairwise":
        c, r = index("chosen"), index("rejected")
        if c is not None and r is not None and c == r:
            problems.add(where, f"{f}.rejected", "chosen and rejected are the same answer")
        if not isinstance(raw.get("tie", False), bool):
            problems.add(where, f"{f}.tie", "expected true or false")
        if raw.get("strength") is not None and not isinstance(raw["strength"], str):
            problems.add(where, f"{f}.strength", "expected a string label such as 'better'")
        m = raw.get("margin")
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float))):
            problems.add(where, f"{f}.margin", f"expected a number, got {m!r}")
    if kind == "ranking":
        order = raw.get("order")
        if not isinstance(order, list) or len(order) < 2 or not all(_is_int(i) for i in order):
            problems.add(where, f"{f}.order", "expected a list of at least 2 answer indices, best first")
        else:
            dup = sorted({i for i in order if order.count(i) > 1})
            if dup:
                problems.add(where, f"{f}.order", f"duplicate position(s) {dup}")
            bad = [i for i in order if not 0 <= i < n_answers]
            if bad:
                problems.add(where, f"{f}.order", f"answer index(es) {bad} out of range: the row has {n_answers}")
            missing = sorted(set(range(n_answers)) - set(order))
            if not dup and not bad and missing:
                problems.add(where, f"{f}.order", f"missing position(s) {missing}: a ranking orders every answer")
    if kind == "rating":
        v = raw.get("value")
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            problems.add(where, f"{f}.value", f"expected a number, got {v!r}")
    if kind == "binary" and not isinstance(raw.get("good"), bool):
        problems.add(where, f"{f}.good", f"expected true or false, got {raw.get('good')!r}")
    if kind == "binary" and raw.get("category") is not None and not isinstance(raw["category"], str):
        problems.add(where, f"{f}.category", f"expected a string, got {raw['category']!r}")
    if len(problems.items) > n_before:
        return None
    kwargs = {k: raw[k] for k in raw if k != "kind"}
    if kwargs.get("annotator") is not None:
        kwargs["annotator"] = str(kwargs["annotator"])
    if kwargs.get("margin") is not None:
        kwargs["margin"] = float(kwargs["margin"])
    if kwargs.get("value") is not None:
        kwargs["value"] = float(kwargs["value"])
    return Label(kind=kind, **kwargs)


def _common_prefix_len(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


NATIVE_FIELDS = {"id", "prompt", "answers", "labels", "meta"}
_TRL_KEYS = {"prompt", "completion", "label", "messages", "chosen", "rejected", "margin", "id", "meta"}


def parse_row(row: Any, where: str, problems: _Problems | None = None) -> Example | None:
    """Turn one raw row (any supported format) into an :class:`Example`, or record problems."""
    own = problems is None
    problems = problems or _Problems()
    if not isinstance(row, dict):
        problems.add(where, "<row>", f"expected a JSON object, got {type(row).__name__}")
        if own:
            raise DataError(problems.items)
        return None
    n_before = len(problems.items)
    keys = set(row)
    ex = None
    rid = row.get("id")
    meta = row.get("meta") or {}
    if rid is not None and not isinstance(rid, (str, int)):
        problems.add(where, "id", "expected a string")
    if not isinstance(meta, dict):
        problems.add(where, "meta", "expected an object")
        meta = {}

    if "answers" in keys or "labels" in keys:  # native
        for key in sorted(keys - NATIVE_FIELDS):
            problems.add(where, key, f"unknown field (a native row has {sorted(NATIVE_FIELDS)})")
        if "prompt" not in row:
            problems.add(where, "prompt", "missing")
        else:
            _check_prompt(row["prompt"], where, "prompt", problems)
        answers = row.get("answers", [])
        if not isinstance(answers, list):
            problems.add(where, "answers", "expected a list of strings")
            answers = []
        for i, a in enumerate(answers):
            _check_text(a, where, f"answers[{i}]", problems)
        raw_labels = row.get("labels", [])
        if not isinstance(raw_labels, list):
            problems.add(where, "labels", "expected a list of label objects")
            raw_labels = []
        labels = [_parse_label(lab, len(answers), where, f"labels[{i}]", problems) for i, lab in enumerate(raw_labels)]
        ex = Example(prompt=row.get("prompt"), answers=list(answers), labels=[lab for lab in labels if lab])
    elif "messages" in keys:  # TRL conversational language modelling
        for key in sorted(keys - {"messages", "id", "meta"}):
            problems.add(where, key, "unknown field next to 'messages'")
        msgs = row["messages"]
        if _check_conversation(msgs, where, "messages", problems):
            if msgs[-1]["role"] != "assistant":
                problems.add(where, f"messages[{len(msgs) - 1}].role",
                             "the conversation must end with an assistant turn (the demonstration)")
            elif len(msgs) < 2 or msgs[-2]["role"] == "assistant":
                problems.add(where, "messages", "the final assistant turn needs a user turn before it")
            else:
                ex = Example(prompt=msgs[:-1], answers=[msgs[-1]["content"]],
                             labels=[Label(kind="demonstration", answer=0)])
    elif "chosen" in keys or "rejected" in keys:  # TRL preference
        for key in sorted(keys - {"prompt", "chosen", "rejected", "margin", "id", "meta"}):
            problems.add(where, key, "unknown field in a preference row (prompt, chosen, rejected, margin)")
        for key in ("chosen", "rejected"):
            if key not in row:
                problems.add(where, key, "missing (a preference row needs both chosen and rejected)")
        if all(k in row for k in ("chosen", "rejected")):
            ex = _parse_trl_preference(row, where, problems)
    elif "completion" in keys:  # TRL prompt-completion / unpaired
        for key in sorted(keys - {"prompt", "completion", "label", "id", "meta"}):
            problems.add(where, key, "unknown field in a prompt-completion row")
        if "prompt" not in row:
            problems.add(where, "prompt", "missing")
        else:
            _check_prompt(row["prompt"], where, "prompt", problems)
        comp = row["completion"]
        if isinstance(comp, list):  # conversational completion: one assistant turn
            if _check_conversation(comp, where, "completion", problems):
                if len(comp) != 1 or comp[0]["role"] != "assistant":
                    problems.add(where, "completion", "expected exactly one assistant turn")
                comp = comp[0]["content"]
        else:
            _check_text(comp, where, "completion", problems)
        if "label" in row:
            if not isinstance(row["label"], bool):
                problems.add(where, "label", f"expected true or false, got {row['label']!r}")
            lab = Label(kind="binary", answer=0, good=row["label"])
        else:
            lab = Label(kind="demonstration", answer=0)
        ex = Example(prompt=row.get("prompt"), answers=[comp] if isinstance(comp, str) else [], labels=[lab])
    elif "prompt" in keys:  # prompt only: for PPO
        for key in sorted(keys - {"prompt", "id", "meta"}):
            problems.add(where, key, "unknown field")
        _check_prompt(row["prompt"], where, "prompt", problems)
        ex = Example(prompt=row["prompt"])
    else:
        hint = " ('text' rows are not supported: give a prompt and a completion)" if "text" in keys else ""
        problems.add(where, "<row>", f"no 'prompt' field: cannot recognise the row format from fields {sorted(keys)}{hint}. "
                     "Expected native {prompt, answers, labels}, {prompt, completion}, {messages}, "
                     "{prompt, chosen, rejected} or {prompt}")
    if ex is None or len(problems.items) > n_before:
        if own:
            raise DataError(problems.items)
        return None
    ex.id = None if rid is None else str(rid)
    ex.meta = meta
    ex.source = where
    return ex


def _parse_trl_preference(row, where, problems) -> Example | None:
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    conversational = isinstance(chosen, list) or isinstance(rejected, list)
    if conversational:
        ok = _check_conversation(chosen, where, "chosen", problems)
        ok = _check_conversation(rejected, where, "rejected", problems) and ok
        if not ok:
            return None
        if prompt is None:  # implicit prompt: the shared leading turns
            n = _common_prefix_len(chosen, rejected)
            while n > 0 and chosen[n - 1]["role"] == "assistant":
                n -= 1
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
            if not prompt:
                problems.add(where, "prompt", "missing, and chosen/rejected share no leading user turn")
                return None
        elif not _check_prompt(prompt, where, "prompt", problems):
            return None
        answers = []
        for key, conv in (("chosen", chosen), ("rejected", rejected)):
            if len(conv) != 1 or conv[0]["role"] != "assistant":
                problems.add(where, key, "expected exactly one assistant turn after the prompt")
                return None
            answers.append(conv[0]["content"])
    else:
        if prompt is None:
            problems.add(where, "prompt", "missing (implicit prompts are only read from conversational rows; "
                         "for HH-RLHF transcripts use `alignkit data convert --from hh-rlhf`)")
            return None
        ok = _check_prompt(prompt, where, "prompt", problems)
        ok = _check_text(chosen, where, "chosen", problems) and ok
        ok = _check_text(rejected, where, "rejected", problems) and ok
        if not ok:
            return None
        answers = [chosen, rejected]
    margin = row.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        problems.add(where, "margin", f"expected a number, got {margin!r}")
        return None
    if answers[0] == answers[1]:
        problems.add(where, "rejected", "chosen and rejected are identical")
        return None
    lab = Label(kind="pairwise", chosen=0, rejected=1, margin=None if margin is None else float(margin))
    return Example(prompt=prompt, answers=answers, labels=[lab])


# ----------------------------------------------------------------------------- files


def _iter_rows(path: str) -> Iterator[tuple[str, Any]]:
    """Yield (where, raw_row) for a file; JSONL lines are numbered from 1, other rows from 0."""
    if os.path.isdir(path):
        import datasets

        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:  # not a saved dataset
            raise DataError([f"{path}: <file>: not a dataset saved with save_to_disk ({e})"]) from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        for i, row in enumerate(ds):
            yield f"{path}:row {i}", _strip_nones(row)
        return
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path}:{lineno}", _BadJSON(f"invalid JSON: {e.msg} at column {e.colno}")
    elif path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError([f"{path}:{e.lineno}: <file>: invalid JSON: {e.msg} at column {e.colno}"]) from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError([f"{path}: <file>: expected a JSON list of rows"])
        for i, row in enumerate(data):
            yield f"{path}:row {i}", row
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:row {i}", _strip_nones(row)
    else:
        raise DataError([f"{path}: <file>: unknown file type (use .jsonl, .json, .parquet or a save_to_disk folder)"])


def _strip_nones(row: dict) -> dict:
    # Arrow gives every row every column of the table; absent optional fields come back as None.
    return {k: v for k, v in row.items() if v is not None}


class _BadJSON:
    def __init__(self, msg):
        self.msg = msg


def load_examples(paths: str | Iterable[str], *, seed: int = 0) -> list[Example]:
    """Read and validate every row of every file; raise one DataError listing all problems.

    ``paths`` entries are files (.jsonl/.json/.parquet), folders written by
    ``datasets.save_to_disk``, ``builtin:<kind>[:<split>]`` for the built-in task,
    or ``hf:<dataset>[:<split>]`` for a Hub dataset (needs network).
    """
    if isinstance(paths, str):
        paths = [paths]
    problems = _Problems()
    examples: list[Example] = []
    for path in paths:
        path = str(path)
        if path.startswith("builtin:"):
            from alignkit import builtin

            examples.extend(builtin.load_builtin(path, seed=seed))
            continue
        if path.startswith("hf:"):
            rows = _iter_hub_rows(path)
        elif not os.path.exists(path):
            problems.add(path, "<file>", "data file not found")
            continue
        else:
            rows = _iter_rows(path)
        for where, row in rows:
            if isinstance(row, _BadJSON):
                problems.add(where, "<line>", row.msg)
                continue
            ex = parse_row(row, where, problems)
            if ex is not None:
                examples.append(ex)
    if problems.items:
        raise DataError(problems.items)
    return examples


def _iter_hub_rows(spec: str):
    import datasets

    _, name, *rest = spec.split(":")
    split = rest[0] if rest else "train"
    ds = datasets.load_dataset(name, split=split)
    for i, row in enumerate(ds):
        yield f"{spec}:row {i}", _strip_nones(row)


def write_jsonl(examples: Iterable[Example], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- stage views


def demonstrations(examples: list[Example]) -> list[tuple[Example, str]]:
    """SFT view: (example, answer) for each demonstration label (deduplicated per answer)."""
    out = []
    for ex in examples:
        seen = set()
        for lab in ex.labels:
            if lab.kind == "demonstration" and lab.answer not in seen:
                seen.add(lab.answer)
                out.append((ex, ex.answers[lab.answer]))
    return out


def prompts(examples: list[Example]) -> list[Example]:
    """PPO view: every row's prompt (answers and labels ignored)."""
    return [Example(prompt=ex.prompt, id=ex.id, meta=ex.meta, source=ex.source) for ex in examples]


def feedback_counts(examples: list[Example]) -> dict[str, int]:
    counts = {k: 0 for k in LABEL_KINDS}
    counts["prompt_only"] = 0
    for ex in examples:
        if not ex.labels:
            counts["prompt_only"] += 1
        for lab in ex.labels:
            counts[lab.kind] += 1
    return counts
