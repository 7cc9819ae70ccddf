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
``{prompt, chosen, rejected}`` (optional ``margin``) and implicit-prompt ``{chosen, rejected}``
(conversations, strings split as TRL's ``extract_prompt`` at a word boundary, or HH-RLHF
transcripts cut at their last shared turn). A row with only ``prompt`` is a prompt for PPO.

Files are read by one streaming reader (``iter_file_rows``): UTF-8 with or without a byte-order
mark, UTF-16/32 with one. Every problem is reported as ``file:line: field: what is wrong``
(a bad byte: ``file:line: <line>: not valid UTF-8 (byte 0x.. at column N)``); all rows are
checked before any training starts. Valid rows a stage cannot use are counted, listed and
stopped on or skipped by ``select_rows`` / ``RowAccount`` (``data.on_unusable``).
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Union

Message = dict  # {"role": str, "content": str}
Prompt = Union[str, list]

LABEL_KINDS = ("demonstration", "pairwise", "ranking", "rating", "binary")
ROLES = ("system", "user", "assistant")
MAX_REPORTED_PROBLEMS = 20
# Problems kept in memory (all are counted): a file with a million bad rows still validates in bounded memory.
MAX_KEPT_PROBLEMS = 1000
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
    """Problems found so far: every one counted, the first MAX_KEPT_PROBLEMS kept."""

    def __init__(self):
        self.items: list[str] = []
        self.count = 0

    def add(self, where: str, fieldname: str, msg: str):
        self.count += 1
        if len(self.items) < MAX_KEPT_PROBLEMS:
            self.items.append(f"{where}: {fieldname}: {msg}")

    def error(self) -> DataError:
        return DataError(self.items, total=self.count)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_text(value, where, fieldname, problems) -> bool:
    if not isinstance(value, str):
        problems.add(where, fieldname, f"expected a string, got {type(value).__name__}")
        return False
    if not value.strip():
        problems.add(where, fieldname, "is empty")
        return False
    bad = _SURROGATE.search(value)
    if bad:  # JSON's "\ud800" escapes decode to text no tokenizer or UTF-8 file can hold
        problems.add(where, fieldname, f"not valid Unicode: unpaired surrogate U+{ord(bad.group()):04X} "
                     f"at character {bad.start() + 1}")
        return False
    return True


def _short(v, limit: int = 60) -> str:
    """A bad value for a message: its repr, cut to ``limit`` characters."""
    try:
        r = repr(v)
    except (ValueError, RecursionError):  # an int past Python's digit limit, a structure nested too deeply
        return f"a {type(v).__name__} too large to show"
    return r if len(r) <= limit else r[:limit - 3] + "..."


def _not_a_number(v) -> str:
    """The message for a value that ``_finite_number`` refused."""
    real = isinstance(v, (int, float)) and not isinstance(v, bool)
    return f"expected a {'finite ' if real else ''}number, got {_short(v)}"


def _finite_number(v) -> float | None:
    """``v`` as a float when it is a finite real number (not a bool, NaN, infinity or an int too big for a float)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


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
            problems.add(where, f"{f}.role", f"must be one of {list(ROLES)}, got {_short(turn.get('role'))}")
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
        problems.add(where, f"{f}.kind", f"must be one of {list(LABEL_KINDS)}, got {_short(kind)}")
        return None
    allowed = _COMMON_LABEL_FIELDS | _LABEL_FIELDS[kind]
    n_before = problems.count
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
            problems.add(where, f"{f}.{key}", f"expected an answer index (integer), got {_short(v)}")
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
        if m is not None and _finite_number(m) is None:
            problems.add(where, f"{f}.margin", _not_a_number(m))
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
        if _finite_number(v) is None:
            problems.add(where, f"{f}.value", _not_a_number(v))
    if kind == "binary" and not isinstance(raw.get("good"), bool):
        problems.add(where, f"{f}.good", f"expected true or false, got {_short(raw.get('good'))}")
    if kind == "binary" and raw.get("category") is not None and not isinstance(raw["category"], str):
        problems.add(where, f"{f}.category", f"expected a string, got {_short(raw['category'])}")
    if problems.count > n_before:
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



# HH-RLHF transcripts: turns marked by "\n\nHuman: " and "\n\nAssistant: ".
HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


def hh_transcript_to_messages(text: str) -> list[dict]:
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> [{user, hi}, {assistant, hello}]."""
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise ValueError(f"text before the first turn marker: {parts[0][:40]!r}")
    return [{"role": _HH_ROLE[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def split_transcripts(chosen: str, rejected: str, where: str, problems: _Problems) -> tuple[Prompt, list[str]] | None:
    """(prompt, [chosen reply, rejected reply]) of two HH-RLHF transcripts: the prompt is their longest
    common prefix cut back to its last '\\n\\nAssistant:'; one human turn is a string prompt, several a
    conversation. None (with the problem recorded) when they share no such prefix."""
    n = _common_prefix_len(chosen, rejected)
    cut = chosen.rfind(HH_ASSISTANT, 0, n + len(HH_ASSISTANT) - 1)
    if cut < 0 or cut + len(HH_ASSISTANT) > n:
        problems.add(where, "chosen", "chosen and rejected share no transcript ending in '\\n\\nAssistant:'")
        return None
    try:
        turns = hh_transcript_to_messages(chosen[:cut])
    except ValueError as e:
        problems.add(where, "chosen", str(e))
        return None
    if not turns or turns[-1]["role"] != "user" or not all(t["content"] for t in turns):
        problems.add(where, "chosen", "the shared transcript must end with a non-empty Human turn")
        return None
    answers = []
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        answer = text[cut + len(HH_ASSISTANT):].strip()
        if _HH_TURN.search(text, cut + len(HH_ASSISTANT)):
            problems.add(where, key, "continues with more turns after the reply that differs")
        elif not answer:
            problems.add(where, key, "the final Assistant reply is empty")
        else:
            answers.append(answer)
    if len(answers) < 2:
        return None
    return (turns[0]["content"] if len(turns) == 1 else turns), answers


def _word_boundary(text: str, k: int) -> bool:
    return k == 0 or k == len(text) or text[k - 1].isspace() or text[k].isspace()


def split_implicit_prompt(chosen: str, rejected: str) -> tuple[str, list[str]]:
    """(prompt, [chosen rest, rejected rest]) with prompt + rest == each text, as TRL's ``extract_prompt``.

    TRL takes the longest common prefix and leaves one trailing space to the completions
    ("The sky is| blue." / "The sky is| green."). A prefix that ends inside a word ("I like ca|ts" /
    "I like ca|rs", where TRL would answer "ts" and "rs") is first cut back to the word's start, so
    the answers are "cats" and "cars" with the same leading space. The prompt is "" when the texts
    share no whole word.
    """
    k = _common_prefix_len(chosen, rejected)
    while k > 0 and not (_word_boundary(chosen, k) and _word_boundary(rejected, k)):
        k -= 1
    if k > 0 and chosen[k - 1] == " ":  # TRL: "remove space before the prompt"
        k -= 1
    return chosen[:k], [chosen[k:], rejected[k:]]

NATIVE_FIELDS = {"id", "prompt", "answers", "labels", "meta"}
_TRL_KEYS = {"prompt", "completion", "label", "messages", "chosen", "rejected", "margin", "id", "meta"}


def parse_row(row: Any, where: str, problems: _Problems | None = None) -> Example | None:
    """Turn one raw row (any supported format) into an :class:`Example`, or record problems."""
    own = problems is None
    problems = problems or _Problems()
    if not isinstance(row, dict):
        problems.add(where, "<row>", f"expected a JSON object, got {type(row).__name__}")
        if own:
            raise problems.error()
        return None
    n_before = problems.count
    keys = set(row)
    ex = None
    rid = row.get("id")
    meta = {} if row.get("meta") is None else row["meta"]
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
                problems.add(where, "label", f"expected true or false, got {_short(row['label'])}")
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
    if ex is None or problems.count > n_before:
        if own:
            raise problems.error()
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
        ok = _check_text(chosen, where, "chosen", problems)
        ok = _check_text(rejected, where, "rejected", problems) and ok
        if prompt is not None:
            ok = _check_prompt(prompt, where, "prompt", problems) and ok
            answers = [chosen, rejected]
        if not ok:
            return None
        if prompt is None and chosen.startswith(HH_HUMAN) and rejected.startswith(HH_HUMAN):
            split = split_transcripts(chosen, rejected, where, problems)  # HH-RLHF: cut at the last shared turn
            if split is None:
                return None
            prompt, answers = split
        elif prompt is None:  # implicit prompt, as TRL's extract_prompt reads it
            prompt, answers = split_implicit_prompt(chosen, rejected)
            if not prompt.strip():
                problems.add(where, "prompt", "missing, and chosen/rejected do not start with the same words "
                             "(an implicit prompt is their shared beginning): add a prompt field")
                return None
            for key, text in zip(("chosen", "rejected"), answers):
                if not text.strip():
                    problems.add(where, key, f"nothing is left after the prompt both share ({_short(prompt)}): "
                                 "add a prompt field")
                    return None
    margin = row.get("margin")
    if margin is not None and _finite_number(margin) is None:
        problems.add(where, "margin", _not_a_number(margin))
        return None
    if answers[0] == answers[1]:
        problems.add(where, "rejected", "chosen and rejected are identical")
        return None
    lab = Label(kind="pairwise", chosen=0, rejected=1, margin=None if margin is None else float(margin))
    return Example(prompt=prompt, answers=answers, labels=[lab])


# ----------------------------------------------------------------------------- files


# The one place where bytes become rows. Byte-order marks name the encoding; without one a file is UTF-8.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


class _BadRow:
    """A row that could not be read (bad bytes, bad JSON): ``field: msg`` for the problem at its location."""

    def __init__(self, fieldname: str, msg: str, line: int | None = None):
        self.field, self.msg, self.line = fieldname, msg, line  # line: within a multi-line JSON value


def _utf8_error(data: bytes, e: UnicodeDecodeError) -> str:
    """'not valid UTF-8 (byte 0x.. at column N)' for a decode error in ``data`` (one line), N counted in characters."""
    column = len(data[:e.start].decode("utf-8", errors="replace")) + 1
    return f"not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column})"


def _json_value(text: str):
    """json.loads, or a _BadRow saying why not (bad syntax, a number past Python's digit limit, deep nesting)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (the text holds NUL characters: is the file UTF-16 saved without a byte-order mark?)" \
            if "\x00" in text else ""
        return _BadRow("<line>", f"invalid JSON: {e.msg} at column {e.colno}{hint}", line=e.lineno)
    except ValueError as e:  # "Exceeds the limit (4300 digits) for integer string conversion"
        return _BadRow("<line>", f"invalid JSON: a number too large to read ({str(e).split(':')[0]})")
    except RecursionError:
        return _BadRow("<line>", "invalid JSON: nested too deeply")


def _jsonl_rows(path: str, f) -> Iterator[tuple[str, Any]]:
    """(where, row or _BadRow) for each non-blank line of the binary stream ``f``; lines counted from 1."""
    encoding = next((enc for bom, enc in _BOMS if f.peek(4)[:4].startswith(bom)), "utf-8")
    if encoding != "utf-8":  # UTF-16/32 with a byte-order mark: decoded by Python's codec, line by line
        text = io.TextIOWrapper(f, encoding=encoding, newline="")
        lineno = 0
        try:
            for lineno, line in enumerate(text, 1):
                if line.strip():
                    yield f"{path}:{lineno}", _json_value(line)
        except UnicodeDecodeError as e:
            yield f"{path}:{lineno + 1}", _BadRow("<line>", f"not valid {encoding.upper()} ({e.reason}); "
                                                  "the rest of the file was not read")
        return
    for lineno, raw in enumerate(f, 1):
        if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield f"{path}:{lineno}", _BadRow("<line>", _utf8_error(raw, e))
            continue
        if line.strip():
            yield f"{path}:{lineno}", _json_value(line)


def _json_file_rows(path: str) -> Iterator[tuple[str, Any]]:
    """Rows of a JSON list (or {"data": [...]}); the whole file is one value, so one bad byte stops it."""
    with open(path, "rb") as f:
        data = f.read()
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), "utf-8")
    try:
        text = data.decode("utf-8-sig" if encoding == "utf-8" else encoding)
    except UnicodeDecodeError as e:
        if encoding != "utf-8":
            raise DataError([f"{path}: <file>: not valid {encoding.upper()} ({e.reason})"]) from None
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line_end = data.find(b"\n", e.start)
        line = data[line_start:len(data) if line_end < 0 else line_end]
        lineno = data.count(b"\n", 0, e.start) + 1
        e2 = UnicodeDecodeError("utf-8", line, e.start - line_start, e.end - line_start, e.reason)
        raise DataError([f"{path}:{lineno}: <line>: {_utf8_error(line, e2)}"]) from None
    del data
    rows = _json_value(text)
    del text
    if isinstance(rows, _BadRow):
        raise DataError([f"{path}{'' if rows.line is None else f':{rows.line}'}: <file>: {rows.msg}"])
    if isinstance(rows, dict) and isinstance(rows.get("data"), list):
        rows = rows["data"]
    if not isinstance(rows, list):
        raise DataError([f"{path}: <file>: expected a JSON list of rows"])
    for i, row in enumerate(rows):
        yield f"{path}:row {i}", row


def _arrow_rows(path: str, batches) -> Iterator[tuple[str, Any]]:
    """Rows of Arrow record batches (Parquet, save_to_disk). Arrow does not check that string columns hold
    UTF-8, so a batch that fails to convert is searched cell by cell for the bad one."""
    i = 0
    for batch in batches:
        try:
            rows = batch.to_pylist()
        except UnicodeDecodeError:
            rows = [_arrow_row(batch, r) for r in range(batch.num_rows)]
        for row in rows:
            yield f"{path}:row {i}", row if isinstance(row, _BadRow) else _strip_nones(row)
            i += 1


def _arrow_row(batch, r: int):
    row = {}
    for name, column in zip(batch.schema.names, batch.columns):
        try:
            row[name] = column[r].as_py()
        except UnicodeDecodeError:
            raw = _first_bad_bytes(column[r])
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return _BadRow(name, _utf8_error(raw, e))
            return _BadRow(name, "not valid UTF-8")
    return row


def _first_bad_bytes(scalar) -> bytes:
    """The bytes of the first string inside ``scalar`` (a string, or a list/struct holding strings) that are
    not valid UTF-8."""
    import pyarrow as pa

    t = scalar.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return scalar.cast(pa.large_binary() if pa.types.is_large_string(t) else pa.binary()).as_py()
    children = scalar.values if hasattr(scalar, "values") and scalar.values is not None else \
        [scalar[k] for k in range(t.num_fields)] if pa.types.is_struct(t) else []
    for child in children:
        try:
            child.as_py()
        except UnicodeDecodeError:
            return _first_bad_bytes(child)
    return b""


def iter_file_rows(path: str) -> Iterator[tuple[str, Any]]:
    """Yield (where, raw row or _BadRow) for a local file, streaming: JSONL lines (also .jsonl.gz) are
    numbered from 1, the rows of a JSON list, Parquet file or save_to_disk folder from 0.

    UTF-8 with or without a byte-order mark is read as is; UTF-16 and UTF-32 with one are decoded;
    a byte that is not UTF-8 is a problem at its line (or row and field) and column.
    """
    if os.path.isdir(path):
        import datasets

        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:  # not a saved dataset
            raise DataError([f"{path}: <file>: not a dataset saved with save_to_disk ({_short(str(e), 200)})"]) from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        yield from _arrow_rows(path, (batch for table in ds.with_format("arrow").iter(batch_size=1000)
                                      for batch in table.to_batches()))
        return
    if path.endswith(".jsonl") or path.endswith(".jsonl.gz"):
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            try:
                yield from _jsonl_rows(path, f)
            except (OSError, EOFError) as e:  # a truncated or corrupt .gz
                raise DataError([f"{path}: <file>: cannot be read: {e}"]) from None
    elif path.endswith(".json"):
        yield from _json_file_rows(path)
    elif path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=1000)
            yield from _arrow_rows(path, batches)
        except (pa.ArrowException, OSError) as e:
            raise DataError([f"{path}: <file>: not a readable Parquet file ({_short(str(e), 200)})"]) from None
    else:
        raise DataError([f"{path}: <file>: unknown file type (use .jsonl, .jsonl.gz, .json, .parquet or a "
                         "save_to_disk folder)"])


def _strip_nones(row: dict) -> dict:
    # Arrow gives every row every column of the table; absent optional fields come back as None.
    return {k: v for k, v in row.items() if v is not None}


def load_examples(paths: str | Iterable[str], *, seed: int = 0) -> list[Example]:
    """Read and validate every row of every file; raise one DataError listing all problems.

    ``paths`` entries are files (.jsonl/.jsonl.gz/.json/.parquet), folders written by
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
            rows = iter_file_rows(path)
        for where, row in rows:
            if isinstance(row, _BadRow):
                problems.add(where, row.field, row.msg)
                continue
            ex = parse_row(row, where, problems)
            if ex is not None:
                examples.append(ex)
    if problems.count:
        raise problems.error()
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


# ----------------------------------------------------------------------------- row accounting

# What each stage needs from a row (`alignkit data validate --stage`); dpo and kto are checked for
# export to TRL's trainers.
STAGE_NEEDS = {"sft": "demonstration", "rm": "comparison", "ppo": "prompt", "dpo": "preference pair",
               "kto": "good/bad label or preference pair", "classifier": "good/bad label"}
# The field a prompt-only row lacks, for each stage.
_MISSING_FIELD = {"sft": "completion", "rm": "chosen", "dpo": "chosen", "kto": "label", "classifier": "label"}
ON_UNUSABLE = ("auto", "error", "skip")
MAX_LISTED_ROWS = 5  # locations listed per reason


def _has_pair(ex: Example, strict: bool) -> bool:
    """Whether the row compares two answers: a pairwise label, a ranking, or two answers rated by one
    annotator on one aspect (as the reward model turns ratings into pairs). strict: a tie does not count."""
    rated = {}
    for lab in ex.labels:
        if lab.kind == "pairwise" and not (strict and lab.tie) or lab.kind == "ranking":
            return True
        if lab.kind == "rating":
            rated.setdefault((lab.annotator, lab.golden, lab.aspect), {})[lab.answer] = lab.value
    return any(len(v) >= 2 and (not strict or len(set(v.values())) >= 2) for v in rated.values())


def unusable_reason(ex: Example, stage: str, evaluation: bool = False) -> tuple[str, str] | None:
    """(field, reason) when the valid row ``ex`` gives ``stage`` nothing to use, else None.

    sft needs a demonstration; rm a comparison (or, to evaluate, a gold score in ``meta.gold``);
    dpo a pair that is not a tie; kto a binary label or such a pair (unpaired into good and bad);
    ppo only the prompt, which every row has.
    """
    if stage not in STAGE_NEEDS:
        raise ValueError(f"unknown stage {stage!r}; choose from {list(STAGE_NEEDS)}")
    kinds = {lab.kind for lab in ex.labels}
    usable = {
        "ppo": True,
        "sft": "demonstration" in kinds,
        "rm": _has_pair(ex, strict=False) or (evaluation and isinstance(ex.meta.get("gold"), list)),
        "dpo": _has_pair(ex, strict=True),
        "kto": "binary" in kinds or _has_pair(ex, strict=True),
        "classifier": "binary" in kinds,
    }[stage]
    if usable:
        return None
    if not ex.labels:
        return _MISSING_FIELD[stage], f"has only a prompt, no {STAGE_NEEDS[stage]}"
    return "labels", f"has no {STAGE_NEEDS[stage]}"


@dataclass
class RowAccount:
    """Rows one stage read from one split, how many it uses, and which it leaves out and why.

    The one owner of row accounting: every stage and ``alignkit data validate --stage`` fill one,
    print its ``line()`` and put ``to_dict()`` in their report, so no row goes missing unsaid.
    """

    stage: str
    split: str = "train"
    read: int = 0
    used: int = 0
    left_out: dict = field(default_factory=dict)  # reason -> number of rows
    listed: dict = field(default_factory=dict)  # reason -> first MAX_LISTED_ROWS (where, field)

    def add(self, ex: Example, evaluation: bool = False) -> bool:
        """Count one row; True when the stage can use it."""
        self.read += 1
        why = unusable_reason(ex, self.stage, evaluation)
        if why is None:
            self.used += 1
            return True
        self._record(ex.source, *why)
        return False

    def leave_out(self, ex: Example, fieldname: str, reason: str) -> None:
        """Move a row counted as used to the left-out ones: the stage found it unusable later (e.g. too long)."""
        self.used -= 1
        self._record(ex.source, fieldname, reason)

    def _record(self, where: str, fieldname: str, reason: str) -> None:
        self.left_out[reason] = self.left_out.get(reason, 0) + 1
        rows = self.listed.setdefault(reason, [])
        if len(rows) < MAX_LISTED_ROWS:
            rows.append((where, fieldname))

    @property
    def unusable(self) -> int:
        return self.read - self.used

    def to_dict(self) -> dict:
        return {"read": self.read, "used": self.used, "left_out": self.unusable,
                "reasons": {r: {"rows": n, "first": [w for w, _ in self.listed[r]]} for r, n in self.left_out.items()}}

    def line(self) -> str:
        """'sft (train): 3 rows read, 2 used, 1 left out: 1 row has only a prompt, no demonstration (a.jsonl:2)'."""
        head = f"{self.stage} ({self.split}): {self.read} rows read, {self.used} used"
        if not self.unusable:
            return head
        parts = []
        for reason, n in self.left_out.items():
            where = ", ".join(w for w, _ in self.listed[reason]) + (", ..." if n > len(self.listed[reason]) else "")
            parts.append(f"{n} row{'s' if n > 1 else ''} {reason.replace('has ', 'have ') if n > 1 else reason} "
                         f"({where})")
        return f"{head}, {self.unusable} left out: " + "; ".join(parts)

    def check(self, on_unusable: str = "auto", max_unusable_fraction: float = 0.01) -> None:
        """Raise DataError when the policy says the left-out rows must stop the run (and always when no row
        is usable): ``error`` stops at any, ``auto`` when more than ``max_unusable_fraction`` of the rows."""
        if on_unusable not in ON_UNUSABLE:
            raise ValueError(f"on_unusable must be one of {list(ON_UNUSABLE)}, got {on_unusable!r}")
        n = self.unusable
        if not n:
            return
        if self.used and (on_unusable == "skip" or (on_unusable == "auto" and n <= max_unusable_fraction * self.read)):
            return
        share = f"{n} of {self.read} rows ({100 * n / self.read:.1f}%)"
        if not self.used:
            why = f"none of the {self.read} rows has a {STAGE_NEEDS[self.stage]}"
        elif on_unusable == "error":
            why = f"{share} cannot be used and data.on_unusable=error"
        else:
            why = (f"{share} cannot be used, more than data.max_unusable_fraction={max_unusable_fraction:g}; "
                   "fix or remove them, or set data.on_unusable=skip to train on the rest")
        problems = [f"data.on_unusable: {self.stage} ({self.split}): {why}"]
        for reason, rows in self.listed.items():
            problems += [f"{where}: {fieldname}: the row {reason} (needed by {self.stage})" for where, fieldname in rows]
            if self.left_out[reason] > len(rows):
                problems.append(f"... and {self.left_out[reason] - len(rows)} more rows that {reason.replace('has ', 'have ')}")
        raise DataError(problems)


def select_rows(examples: list[Example], stage: str, on_unusable: str = "auto", max_unusable_fraction: float = 0.01,
                split: str = "train", evaluation: bool = False) -> tuple[list[Example], RowAccount]:
    """The rows ``stage`` can use, and their account (printed as one line on the main process).

    Raises DataError, naming the rows, when the ``on_unusable`` policy says the run must stop.
    """
    account = RowAccount(stage, split)
    used = [ex for ex in examples if account.add(ex, evaluation)]
    if os.environ.get("RANK", "0") == "0":
        print(account.line(), file=sys.stderr, flush=True)
    account.check(on_unusable, max_unusable_fraction)
    return used, account


def prepare_splits(data, seed: int, stage: str, build, validate=None) -> tuple[list, list, dict]:
    """A stage's train and eval items from ``data.train_files`` / ``data.eval_files``: each split is loaded,
    its rows accounted for (:func:`select_rows`), and turned into items by ``build(examples, split, files)
    -> (items, stats)``; ``validate(examples, split)`` first raises on labels that are wrong rather than
    unusable. Every problem of both splits is raised together, before any model loads.
    Returns (train items, eval items, {"rows": {split: account}, split: stats}).
    """
    problems, out, stats = [], [], {"rows": {}}
    for split, files in (("train", data.train_files), ("eval", data.eval_files)):
        items = []
        if files:
            try:
                examples = load_examples(files, seed=seed)
                if validate is not None:
                    validate(examples, split)
                try:
                    examples, account = select_rows(examples, stage, data.on_unusable, data.max_unusable_fraction,
                                                    split, evaluation=split == "eval")
                except DataError as e:  # say what the files hold beside what the stage needs
                    found = ", ".join(f"{n} {k}" for k, n in feedback_counts(examples).items() if n) or "no rows"
                    raise DataError(e.problems + [f"{', '.join(files)}: labels: found {found}; {stage} needs a "
                                                  f"{STAGE_NEEDS[stage]} in each row"]) from None
                stats["rows"][split] = account.to_dict()
                items, stats[split] = build(examples, split, files)
            except DataError as e:
                problems.extend(e.problems)
        out.append(items)
    if problems:
        raise DataError(problems)
    return out[0], out[1], stats
