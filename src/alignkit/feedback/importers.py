"""Importers: public feedback datasets and annotation-tool exports into the shared schema.

    from alignkit.feedback.importers import import_data
    examples = import_data("hh.jsonl")                      # format detected from the first row
    examples = import_data("export.json", fmt="label-studio")
    examples = import_data("hf:Anthropic/hh-rlhf:test")    # a Hub dataset, through `datasets` (needs network)
    alignkit data convert --from hh-rlhf --to alignkit hh.jsonl hh.alignkit.jsonl

Formats (field names as published, see the guide's DATA.md): ``alignkit`` (native
rows), ``trl`` (every TRL format), ``hh-rlhf``, ``shp``, ``ultrafeedback``,
``helpsteer`` (HelpSteer and HelpSteer2), ``oasst1``, ``pku-saferlhf``,
``label-studio`` (pairwise and ranker exports). Every problem is collected as
``file:row: field: message`` and raised together as one DataError.
"""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict, defaultdict
from typing import Iterable, Iterator

from alignkit.schema import (DataError, Example, Label, _BadRow, _check_prompt, _check_text, _finite_number, _is_int,
                             _not_a_number, _Problems, _short, _strip_nones, iter_file_rows, parse_row,
                             split_transcripts)
from alignkit.schema import hh_transcript_to_messages  # noqa: F401  (its home before it moved to the schema)

FORMATS = ("alignkit", "trl", "hh-rlhf", "shp", "ultrafeedback", "helpsteer", "oasst1", "pku-saferlhf", "label-studio")


# ----------------------------------------------------------------------------- reading rows


def iter_rows(path: str) -> Iterator[tuple[str, object]]:
    """(where, raw row), streaming, for a local file (.jsonl, .jsonl.gz, .json, .parquet, save_to_disk folder)
    or ``hf:<name>[:<split>]`` loaded with ``datasets.load_dataset``. A row that cannot be read (bad bytes,
    bad JSON) comes as a ``schema._BadRow`` naming the problem."""
    if path.startswith("hf:"):
        import datasets

        _, name, *rest = path.split(":")
        split = rest[0] if rest else "train"
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as e:  # offline, unknown name, ...
            raise DataError([f"{path}: <file>: could not load the Hub dataset {name!r} split {split!r}: {e}"]) from None
        for i, row in enumerate(ds):
            yield f"{path}:row {i}", _strip_nones(row)
        return
    if not os.path.exists(path):
        raise DataError([f"{path}: <file>: data file not found"])
    yield from iter_file_rows(path)


def read_rows(path: str) -> list[tuple[str, object]]:
    """Every row of ``path`` (see ``iter_rows``) as a list; DataError listing the rows that cannot be read."""
    problems, rows = _Problems(), []
    for where, row in iter_rows(path):
        if isinstance(row, _BadRow):
            problems.add(where, row.field, row.msg)
        else:
            rows.append((where, row))
    if problems.count:
        raise problems.error()
    return rows


# ----------------------------------------------------------------------------- detection


def _missing(row, fields) -> str | None:
    if not isinstance(row, dict):
        return f"a row is a {type(row).__name__}, not an object"
    miss = [f for f in fields if f not in row]
    return f"missing field(s) {miss}" if miss else None


def _why_not(fmt: str, row) -> str | None:
    """None if the row looks like ``fmt``, else the reason it does not."""
    if fmt == "label-studio":
        return _missing(row, ["data", "annotations"])
    if fmt == "oasst1":
        return _missing(row, ["message_id", "parent_id", "role", "text"])
    if fmt == "shp":
        return _missing(row, ["history", "human_ref_A", "human_ref_B", "labels"])
    if fmt == "pku-saferlhf":
        return _missing(row, ["prompt", "response_0", "response_1", "better_response_id", "safer_response_id"])
    if fmt == "ultrafeedback":
        return _missing(row, ["instruction", "completions"])
    if fmt == "helpsteer":
        return _missing(row, ["prompt", "response", *HELPSTEER_ASPECTS])
    if fmt == "hh-rlhf":
        why = _missing(row, ["chosen", "rejected"])
        if why:
            return why
        if "prompt" in row:
            return "has a 'prompt' field (HH-RLHF rows are whole transcripts)"
        if not (isinstance(row["chosen"], str) and "Assistant:" in row["chosen"]):
            return "'chosen' is not a transcript with '\\n\\nHuman: ' / '\\n\\nAssistant: ' turns"
        return None
    if fmt in ("alignkit", "trl"):
        problems = _Problems()
        native = isinstance(row, dict) and ("answers" in row or "labels" in row)
        if native != (fmt == "alignkit"):
            return "no 'answers'/'labels' fields" if fmt == "alignkit" else "has native 'answers'/'labels' fields"
        if parse_row(row, "first row", problems) is None:
            return "; ".join(p.split(": ", 1)[1] for p in problems.items[:2])
        return None
    raise ValueError(fmt)


def detect_format(rows: Iterable[tuple[str, object]], name: str = "<data>") -> str:
    """The format of ``rows`` judged from the first readable row; DataError saying why each format was rejected."""
    rows = list(rows)
    where, row = next(((w, r) for w, r in rows if not isinstance(r, _BadRow)), (None, None))
    if where is None:
        bad = [f"{w}: {r.field}: {r.msg}" for w, r in rows[:1]]
        raise DataError(bad + [f"{name}: <file>: no readable rows, cannot detect the format"])
    reasons = []
    for fmt in ("label-studio", "oasst1", "shp", "pku-saferlhf", "ultrafeedback", "helpsteer", "hh-rlhf",
                "alignkit", "trl"):
        why = _why_not(fmt, row)
        if why is None:
            return fmt
        reasons.append(f"{fmt}: {why}")
    fields = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise DataError([f"{where}: <row>: unrecognised format (fields {_short(fields, 200)}); tried " + "; ".join(reasons)])


def import_data(path: str, fmt: str = "auto", skip_bad: bool = False) -> list[Example]:
    """Read ``path`` in ``fmt`` (or detect it) into Examples.

    skip_bad: leave out rows with problems instead of raising (``import_rows`` returns
    the problems alongside the examples).
    """
    examples, problems = import_rows(read_rows(path), fmt, name=path)
    if problems and not skip_bad:
        raise DataError(problems)
    return examples


def import_rows(rows: list[tuple[str, object]], fmt: str = "auto", name: str = "<data>"):
    """(examples, problems) for rows in ``fmt``; a row with a problem yields no example."""
    problems = _Problems()
    examples = list(iter_import(rows, fmt, problems, name))
    return examples, problems.items


def peek_format(rows: Iterable[tuple[str, object]], fmt: str = "auto", name: str = "<data>"):
    """(format, the same rows): ``fmt``, or when "auto" the format of the first readable row, read ahead."""
    rows = iter(rows)
    if fmt != "auto":
        return fmt, rows
    head = []
    for item in rows:  # up to the first row that could be read, which tells the format
        head.append(item)
        if not isinstance(item[1], _BadRow):
            break
    return detect_format(head, name), itertools.chain(head, rows)


def iter_import(rows: Iterable[tuple[str, object]], fmt: str, problems: _Problems, name: str = "<data>"):
    """Examples from ``rows`` in ``fmt`` (auto: detected from the first readable row), streaming where the
    format allows (one example per row); problems are recorded in ``problems``, never raised per row."""
    fmt, rows = peek_format(rows, fmt, name)
    if fmt not in FORMATS:
        raise DataError([f"{name}: <format>: unknown format {_short(fmt)}; choose from {list(FORMATS)} or auto"])
    importer = {
        "alignkit": _import_parse_row, "trl": _import_parse_row, "hh-rlhf": import_hh_rlhf, "shp": import_shp,
        "ultrafeedback": import_ultrafeedback, "helpsteer": import_helpsteer, "oasst1": import_oasst1,
        "pku-saferlhf": import_pku_saferlhf, "label-studio": import_label_studio,
    }[fmt]
    for ex in importer(_objects(rows, problems), problems):
        # What an importer built must be a valid row of the schema, as if it had been read from a file.
        if importer is not _import_parse_row and parse_row(ex.to_dict(), ex.source, problems) is None:
            continue
        ex.meta.setdefault("format", fmt)
        yield ex


def _objects(rows, problems):
    """Rows that are JSON objects; unreadable rows and other values are recorded as problems."""
    for where, row in rows:
        if isinstance(row, _BadRow):
            problems.add(where, row.field, row.msg)
        elif not isinstance(row, dict):
            problems.add(where, "<row>", f"expected a JSON object, got {type(row).__name__}")
        else:
            yield where, row


def _import_parse_row(rows, problems):
    for where, row in rows:
        ex = parse_row(row, where, problems)
        if ex is not None:
            yield ex


def _need(row, where, fields, problems) -> bool:
    ok = True
    for f in fields:
        if row.get(f) is None:
            problems.add(where, f, "missing")
            ok = False
    return ok


def _text(row, key, where, problems) -> str | None:
    v = row.get(key)
    if v is None:
        problems.add(where, key, "missing")
        return None
    return v if _check_text(v, where, key, problems) else None


def _is_id(v) -> bool:
    return isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))


# ----------------------------------------------------------------------------- Anthropic HH-RLHF

def import_hh_rlhf(rows, problems) -> Iterator[Example]:
    """The prompt is the longest common prefix of chosen and rejected, cut back to its last
    '\\n\\nAssistant:'; a single human turn becomes a string prompt, several a conversation
    (``schema.split_transcripts``, which also reads implicit-prompt transcripts in any file)."""
    for where, row in rows:
        chosen, rejected = _text(row, "chosen", where, problems), _text(row, "rejected", where, problems)
        if chosen is None or rejected is None:
            continue
        split = split_transcripts(chosen, rejected, where, problems)
        if split is None:
            continue
        prompt, answers = split
        if answers[0] == answers[1]:
            problems.add(where, "rejected", "the chosen and rejected replies are identical")
            continue
        yield Example(prompt=prompt, answers=answers, labels=[Label(kind="pairwise", chosen=0, rejected=1)],
                      source=where, meta={})


# ----------------------------------------------------------------------------- Stanford SHP


def import_shp(rows, problems) -> list[Example]:
    """Rows of one post (``post_id``) become one example: its comments are the answers,
    each row one pairwise label (``labels`` = 1: A preferred)."""
    posts: "OrderedDict[str, Example]" = OrderedDict()
    for where, row in rows:
        if not _need(row, where, ["history", "human_ref_A", "human_ref_B", "labels"], problems):
            continue
        history = _text(row, "history", where, problems)
        a, b = _text(row, "human_ref_A", where, problems), _text(row, "human_ref_B", where, problems)
        if not _is_int(row["labels"]) or row["labels"] not in (0, 1):
            problems.add(where, "labels", f"expected 0 or 1, got {_short(row['labels'])}")
            continue
        if None in (history, a, b):
            continue
        post = str(row.get("post_id", history))
        ex = posts.get(post)
        if ex is None:
            ex = posts[post] = Example(prompt=history, id=post, source=where,
                                       meta={"domain": row.get("domain"), "answer_ids": []})
        ids = []
        for text, cid in ((a, row.get("c_root_id_A")), (b, row.get("c_root_id_B"))):
            key = str(cid) if cid is not None else text
            if key not in ex.meta["answer_ids"]:
                ex.meta["answer_ids"].append(key)
                ex.answers.append(text)
            ids.append(ex.meta["answer_ids"].index(key))
        if ids[0] == ids[1]:
            problems.add(where, "c_root_id_B", "A and B are the same comment")
            continue
        c, r = (ids[0], ids[1]) if int(row["labels"]) == 1 else (ids[1], ids[0])
        ex.labels.append(Label(kind="pairwise", chosen=c, rejected=r))
    return list(posts.values())


# ----------------------------------------------------------------------------- UltraFeedback

ULTRAFEEDBACK_ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")


def import_ultrafeedback(rows, problems) -> Iterator[Example]:
    """One example per instruction; each completion's per-aspect ``Rating`` becomes a rating
    label (``N/A`` skipped); ``fine-grained_score`` is the overall (aspect None) rating."""
    for where, row in rows:
        prompt = _text(row, "instruction", where, problems)
        comps = row.get("completions")
        if not isinstance(comps, list) or not comps:
            problems.add(where, "completions", "expected a non-empty list of completions")
            continue
        answers, labels, models, overall, ok = [], [], [], [], True
        for j, comp in enumerate(comps):
            f = f"completions[{j}]"
            if not isinstance(comp, dict):
                problems.add(where, f, f"expected an object, got {type(comp).__name__}")
                ok = False
                continue
            if comp.get("response") is None or not _check_text(comp["response"], where, f"{f}.response", problems):
                if comp.get("response") is None:
                    problems.add(where, f"{f}.response", "missing")
                ok = False
                continue
            answers.append(comp["response"])
            models.append(comp.get("model"))
            overall.append(comp.get("overall_score"))
            ann = comp.get("annotations") or {}
            if not isinstance(ann, dict):
                problems.add(where, f"{f}.annotations", "expected an object of aspects")
                ok = False
                continue
            for aspect, val in ann.items():
                if not isinstance(val, dict) and val is not None:
                    problems.add(where, f"{f}.annotations.{aspect}", f"expected an object with a Rating, got {_short(val)}")
                    ok = False
                    continue
                rating = val.get("Rating") if isinstance(val, dict) else None
                if rating in (None, "N/A"):
                    continue
                try:
                    value = _finite_number(float(rating)) if isinstance(rating, (str, int, float)) else None
                except (ValueError, OverflowError):
                    value = None
                if value is None:
                    problems.add(where, f"{f}.annotations.{aspect}.Rating",
                                 f"expected a finite number as a string, got {_short(rating)}")
                    ok = False
                    continue
                labels.append(Label(kind="rating", answer=len(answers) - 1, aspect=aspect, value=value))
            fg = comp.get("fine-grained_score")
            if fg is not None and _finite_number(fg) is None:
                problems.add(where, f"{f}.fine-grained_score", _not_a_number(fg))
                ok = False
            elif fg is not None:
                labels.append(Label(kind="rating", answer=len(answers) - 1, value=float(fg)))
        if prompt is None or not ok:
            continue
        yield Example(prompt=prompt, answers=answers, labels=labels, source=where,
                      meta={"source": row.get("source"), "models": models, "overall_score": overall})


# ----------------------------------------------------------------------------- HelpSteer / HelpSteer2

HELPSTEER_ASPECTS = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")


def import_helpsteer(rows, problems) -> list[Example]:
    """Rows with the same prompt become one example; each aspect (0-4) a rating label."""
    by_prompt: "OrderedDict[str, Example]" = OrderedDict()
    for where, row in rows:
        prompt, response = _text(row, "prompt", where, problems), _text(row, "response", where, problems)
        values, ok = {}, True
        for aspect in HELPSTEER_ASPECTS:
            v = row.get(aspect)
            if _finite_number(v) is None or not 0 <= v <= 4:
                problems.add(where, aspect, f"expected a score from 0 to 4, got {_short(v)}")
                ok = False
            else:
                values[aspect] = float(v)
        if prompt is None or response is None or not ok:
            continue
        ex = by_prompt.get(prompt)
        if ex is None:
            ex = by_prompt[prompt] = Example(prompt=prompt, source=where, meta={})
        ex.answers.append(response)
        ex.labels.extend(Label(kind="rating", answer=len(ex.answers) - 1, aspect=a, value=v) for a, v in values.items())
    return list(by_prompt.values())


# ----------------------------------------------------------------------------- OpenAssistant oasst1

_OASST_ROLE = {"prompter": "user", "assistant": "assistant"}


def import_oasst1(rows, problems) -> list[Example]:
    """One example per prompter message with assistant replies: the conversation from the
    tree's root to it is the prompt, the replies the answers. Sibling ``rank`` (0 = best)
    becomes a ranking over the ranked replies; a single reply is a demonstration.
    Deleted messages (``deleted``) and ones failing review (``review_result`` false) are
    skipped with their subtrees."""
    msgs, where_of = {}, {}
    n_before = problems.count
    for where, row in rows:
        if not _need(row, where, ["message_id", "role", "text"], problems):
            continue
        if not isinstance(row["role"], str) or row["role"] not in _OASST_ROLE:
            problems.add(where, "role", f"expected 'prompter' or 'assistant', got {_short(row['role'])}")
            continue
        bad_id = [k for k in ("message_id", "parent_id", "message_tree_id") if row.get(k) is not None
                  and not _is_id(row[k])]
        bad_rank = row.get("rank") is not None and not _is_int(row["rank"])
        if bad_id or bad_rank or _text(row, "text", where, problems) is None:
            for k in bad_id:
                problems.add(where, k, f"expected a string id, got {_short(row[k])}")
            if bad_rank:
                problems.add(where, "rank", f"expected an integer (0 = best), got {_short(row['rank'])}")
            continue
        mid = row["message_id"]
        if mid in msgs:
            problems.add(where, "message_id", f"duplicate id {_short(mid)} (first at {where_of[mid]})")
            continue
        msgs[mid], where_of[mid] = row, where
    children = defaultdict(list)
    for mid, row in msgs.items():
        where, parent = where_of[mid], row.get("parent_id")
        tree = row.get("message_tree_id")
        if parent is None:
            if row["role"] != "prompter":
                problems.add(where, "parent_id", "missing: a tree's root must be a prompter message")
            elif tree is not None and tree != mid:
                problems.add(where, "message_tree_id", f"a root's tree id must be its own message_id, got {_short(tree)}")
            continue
        if parent not in msgs:
            problems.add(where, "parent_id", f"{_short(parent)} is not the message_id of any message in the data")
            continue
        prow = msgs[parent]
        if tree is not None and prow.get("message_tree_id") is not None and prow["message_tree_id"] != tree:
            problems.add(where, "message_tree_id", f"{_short(tree)} differs from its parent's tree {_short(prow['message_tree_id'])}")
            continue
        if prow["role"] == row["role"]:
            problems.add(where, "parent_id", f"a {row['role']} message replies to another {row['role']} message")
            continue
        children[parent].append(mid)

    if problems.count == n_before:  # every parent exists: each chain must now reach a root without looping
        in_cycle = set()
        for mid in msgs:
            chain, cur = [], mid
            while cur is not None and cur not in in_cycle:
                if cur in chain:
                    loop = chain[chain.index(cur):]
                    in_cycle.update(loop)
                    problems.add(where_of[cur], "parent_id", f"parent ids loop ({' -> '.join(map(str, loop + [cur]))}); "
                                 "the chain never reaches a root")
                    break
                chain.append(cur)
                cur = msgs[cur].get("parent_id")

    def alive(row):
        return not row.get("deleted") and row.get("review_result", True) is not False

    def history(mid):  # root -> mid, or None when a message on the way is dead / the chain loops
        chain, seen = [], set()
        while mid is not None:
            if mid in seen or mid not in msgs:
                return None
            seen.add(mid)
            row = msgs[mid]
            if not alive(row):
                return None
            chain.append({"role": _OASST_ROLE[row["role"]], "content": row["text"]})
            mid = row.get("parent_id")
        return chain[::-1]

    if problems.count > n_before:  # broken trees: stop before building conversations from them
        return []
    out = []
    for mid, row in msgs.items():
        if row["role"] != "prompter" or not children.get(mid):
            continue
        conv = history(mid)
        if conv is None:
            continue
        replies = [msgs[c] for c in children[mid] if alive(msgs[c])]
        if not replies:
            continue
        ranked = sorted((r for r in replies if r.get("rank") is not None), key=lambda r: r["rank"])
        prompt = conv[0]["content"] if len(conv) == 1 else conv
        meta = {"message_id": mid, "message_tree_id": row.get("message_tree_id"), "lang": row.get("lang")}
        if len(ranked) >= 2:
            answers = [r["text"] for r in ranked]
            labels = [Label(kind="ranking", order=list(range(len(ranked))))]
            meta["reply_ids"] = [r["message_id"] for r in ranked]
        else:
            best = ranked[0] if ranked else replies[0]
            answers, labels = [best["text"]], [Label(kind="demonstration", answer=0)]
            meta["reply_ids"] = [best["message_id"]]
        out.append(Example(prompt=prompt, answers=answers, labels=labels, id=mid, source=where_of[mid], meta=meta))
    return out


# ----------------------------------------------------------------------------- PKU-SafeRLHF


def import_pku_saferlhf(rows, problems) -> Iterator[Example]:
    """Two pairwise labels per row (aspects ``helpfulness`` from better_response_id and
    ``safety`` from safer_response_id) and a binary ``safety`` label per response."""
    for where, row in rows:
        prompt = _text(row, "prompt", where, problems)
        answers = [_text(row, "response_0", where, problems), _text(row, "response_1", where, problems)]
        labels, ok = [], prompt is not None and None not in answers
        for key, aspect in (("better_response_id", "helpfulness"), ("safer_response_id", "safety")):
            v = row.get(key)
            if not _is_int(v) or v not in (0, 1):
                problems.add(where, key, f"expected 0 or 1, got {_short(v)}")
                ok = False
                continue
            labels.append(Label(kind="pairwise", chosen=v, rejected=1 - v, aspect=aspect))
        for j in (0, 1):
            safe = row.get(f"is_response_{j}_safe")
            if safe is None:
                continue
            if not isinstance(safe, bool):
                problems.add(where, f"is_response_{j}_safe", f"expected true or false, got {_short(safe)}")
                ok = False
                continue
            labels.append(Label(kind="binary", answer=j, good=safe, aspect="safety"))
        if ok and answers[0] == answers[1]:
            problems.add(where, "response_1", "identical to response_0")
            ok = False
        if ok:
            yield Example(prompt=prompt, answers=answers, labels=labels, source=where, meta={})


# ----------------------------------------------------------------------------- Label Studio


def _annotator_id(completed_by):
    if isinstance(completed_by, dict):
        completed_by = completed_by.get("email") or completed_by.get("id")
    return None if completed_by is None else str(completed_by)


def import_label_studio(rows, problems) -> Iterator[Example]:
    """A Label Studio JSON export: pairwise tasks (``data`` {prompt, answer1, answer2}) and
    ranker tasks (``data`` {prompt, <list of {id, ...}>}). Each annotation is one
    annotator's label (``completed_by``); ``ground_truth`` marks a golden label;
    cancelled annotations are skipped. A task written by ``export_label_studio`` carries
    ``prompt_messages``/``example_id``/``answer_index`` to restore the original row."""
    for where, task in rows:
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            problems.add(where, "data", "expected a task object with a 'data' object")
            continue
        data = task["data"]
        anns = task.get("annotations") or []
        if not isinstance(anns, list):
            problems.add(where, "annotations", "expected a list")
            continue
        prompt = data.get("prompt_messages") or data.get("prompt")
        if prompt is None:
            problems.add(where, "data.prompt", "missing")
            continue
        if not _check_prompt(prompt, where, "data.prompt_messages" if data.get("prompt_messages") else "data.prompt",
                             problems):
            continue
        n_before = problems.count
        answers, ids = None, None  # ids: Label Studio item id -> answer index (ranker)
        labels = []
        for a, ann in enumerate(anns):
            f = f"annotations[{a}]"
            if not isinstance(ann, dict):
                problems.add(where, f, "expected an object")
                continue
            if ann.get("was_cancelled"):
                continue
            annotator, golden = _annotator_id(ann.get("completed_by")), bool(ann.get("ground_truth", False))
            results = ann.get("result") or []
            if not isinstance(results, list):
                problems.add(where, f"{f}.result", f"expected a list of results, got {type(results).__name__}")
                continue
            for k, res in enumerate(results):
                g = f"{f}.result[{k}]"
                rtype = res.get("type") if isinstance(res, dict) else None
                value = res.get("value") if isinstance(res, dict) else None
                if rtype == "pairwise":
                    if answers is None:
                        names = str(res.get("to_name", "")).split(",")
                        names = names if len(names) == 2 and all(n.strip() in data for n in names) else ["answer1", "answer2"]
                        answers = [data.get(n.strip()) for n in names]
                        if not all(isinstance(x, str) and x.strip() for x in answers):
                            problems.add(where, "data", f"a pairwise task needs non-empty texts in {names}")
                            break
                    sel = value.get("selected") if isinstance(value, dict) else None
                    if sel not in ("left", "right"):
                        problems.add(where, f"{g}.value.selected", f"expected 'left' or 'right', got {_short(sel)}")
                        continue
                    c = 0 if sel == "left" else 1
                    labels.append(Label(kind="pairwise", chosen=c, rejected=1 - c, annotator=annotator, golden=golden))
                elif rtype == "ranker":
                    if answers is None:
                        answers, ids = _ranker_items(data, where, problems)
                        if answers is None:
                            break
                    labels.extend(_ranker_labels(value, ids, res.get("to_name"), annotator, golden, where, g, problems))
                else:
                    problems.add(where, f"{g}.type", f"result type {_short(rtype)} is not supported: the importer reads "
                                 "'pairwise' and 'ranker' results")
        if problems.count > n_before:
            continue
        if answers is None:  # no completed annotation: the task still carries the texts
            if isinstance(data.get("answer1"), str) and isinstance(data.get("answer2"), str):
                answers = [data["answer1"], data["answer2"]]
            else:
                problems.add(where, "annotations", "no completed annotation and no answer1/answer2 to keep")
                continue
        meta = {"label_studio_id": task.get("id")}
        idx = data.get("answer_index")
        if isinstance(idx, list):
            meta["answer_index"] = idx
        ex = Example(prompt=prompt, answers=answers, labels=labels, source=where, meta=meta,
                     id=None if data.get("example_id") is None else str(data["example_id"]))
        yield ex


def _ranker_items(data, where, problems):
    for key, val in data.items():
        if isinstance(val, list) and val and all(isinstance(x, dict) and "id" in x for x in val):
            texts, ids = [], {}
            for n, item in enumerate(val):
                text = item.get("body") or item.get("text") or item.get("title") or item.get("html")
                if not isinstance(text, str) or not text.strip():
                    problems.add(where, f"data.{key}[{n}]", "an item needs a non-empty body, text or title")
                    return None, None
                ids[str(item["id"])] = len(texts)
                texts.append(text)
            return texts, ids
    problems.add(where, "data", "a ranker task needs a list of items with 'id' in its data")
    return None, None


def _ranker_labels(value, ids, to_name, annotator, golden, where, f, problems) -> list[Label]:
    """{"ranker": [ids]} or {"ranker": {list: [ids]}} -> a ranking; buckets
    {"ranker": {bucket: [ids], ...}} (best bucket first) -> pairs across buckets."""
    ranker = value.get("ranker") if isinstance(value, dict) else None
    if isinstance(ranker, dict) and len(ranker) == 1:
        ranker = next(iter(ranker.values()))
    if isinstance(ranker, list):
        try:
            order = [ids[str(i)] for i in ranker]
        except KeyError as e:
            problems.add(where, f"{f}.value.ranker", f"item id {_short(e.args[0])} is not in the task's items")
            return []
        if sorted(order) != list(range(len(ids))):
            problems.add(where, f"{f}.value.ranker", "a ranking must list every item exactly once")
            return []
        return [Label(kind="ranking", order=order, annotator=annotator, golden=golden)]
    if isinstance(ranker, dict):  # buckets, best first; the source list's own name holds unplaced items
        if not all(isinstance(v, list) for v in ranker.values()):
            problems.add(where, f"{f}.value.ranker", "each bucket must be a list of item ids")
            return []
        buckets = [[ids.get(str(i)) for i in v] for k, v in ranker.items() if k != to_name]
        if any(None in b for b in buckets):
            problems.add(where, f"{f}.value.ranker", "a bucket names an item id not in the task's items")
            return []
        return [Label(kind="pairwise", chosen=c, rejected=r, annotator=annotator, golden=golden)
                for hi in range(len(buckets)) for lo in range(hi + 1, len(buckets))
                for c in buckets[hi] for r in buckets[lo]]
    problems.add(where, f"{f}.value.ranker", f"expected a list of item ids or an object of buckets, got {_short(ranker)}")
    return []
