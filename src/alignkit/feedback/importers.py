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

import gzip
import json
import os
import re
from collections import OrderedDict, defaultdict

from alignkit.schema import DataError, Example, Label, _BadJSON, _iter_rows, _Problems, _strip_nones, parse_row

FORMATS = ("alignkit", "trl", "hh-rlhf", "shp", "ultrafeedback", "helpsteer", "oasst1", "pku-saferlhf", "label-studio")


# ----------------------------------------------------------------------------- reading rows


def read_rows(path: str) -> list[tuple[str, object]]:
    """(where, raw row) for a local file (.jsonl, .jsonl.gz, .json, .parquet, save_to_disk folder)
    or ``hf:<name>[:<split>]`` loaded with ``datasets.load_dataset``."""
    if path.startswith("hf:"):
        import datasets

        _, name, *rest = path.split(":")
        split = rest[0] if rest else "train"
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as e:  # offline, unknown name, ...
            raise DataError([f"{path}: <file>: could not load the Hub dataset {name!r} split {split!r}: {e}"]) from None
        return [(f"{path}:row {i}", _strip_nones(row)) for i, row in enumerate(ds)]
    if not os.path.exists(path):
        raise DataError([f"{path}: <file>: data file not found"])
    if path.endswith(".jsonl.gz"):
        rows = []
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    rows.append((f"{path}:{lineno}", _json_line(line, f"{path}:{lineno}")))
        return rows
    rows = []
    for where, row in _iter_rows(path):
        if isinstance(row, _BadJSON):
            raise DataError([f"{where}: <line>: {row.msg}"])
        rows.append((where, row))
    return rows


def _json_line(line, where):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError([f"{where}: <line>: invalid JSON: {e.msg} at column {e.colno}"]) from None


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


def detect_format(rows: list[tuple[str, object]], name: str = "<data>") -> str:
    """The format of ``rows`` judged from the first row; DataError saying why each format was rejected."""
    if not rows:
        raise DataError([f"{name}: <file>: no rows, cannot detect the format"])
    where, row = rows[0]
    reasons = []
    for fmt in ("label-studio", "oasst1", "shp", "pku-saferlhf", "ultrafeedback", "helpsteer", "hh-rlhf",
                "alignkit", "trl"):
        why = _why_not(fmt, row)
        if why is None:
            return fmt
        reasons.append(f"{fmt}: {why}")
    fields = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise DataError([f"{where}: <row>: unrecognised format (fields {fields}); tried " + "; ".join(reasons)])


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
    if fmt == "auto":
        fmt = detect_format(rows, name)
    if fmt not in FORMATS:
        raise DataError([f"{name}: <format>: unknown format {fmt!r}; choose from {list(FORMATS)} or auto"])
    problems = _Problems()
    importer = {
        "alignkit": _import_parse_row, "trl": _import_parse_row, "hh-rlhf": import_hh_rlhf, "shp": import_shp,
        "ultrafeedback": import_ultrafeedback, "helpsteer": import_helpsteer, "oasst1": import_oasst1,
        "pku-saferlhf": import_pku_saferlhf, "label-studio": import_label_studio,
    }[fmt]
    examples = importer(rows, problems)
    for ex in examples:
        ex.meta.setdefault("format", fmt)
    return examples, problems.items


def _import_parse_row(rows, problems):
    out = []
    for where, row in rows:
        ex = parse_row(row, where, problems)
        if ex is not None:
            out.append(ex)
    return out


def _need(row, where, fields, problems) -> bool:
    ok = True
    for f in fields:
        if row.get(f) is None:
            problems.add(where, f, "missing")
            ok = False
    return ok


def _text(row, key, where, problems) -> str | None:
    v = row.get(key)
    if not isinstance(v, str) or not v.strip():
        problems.add(where, key, "expected a non-empty string" if v is not None else "missing")
        return None
    return v


# ----------------------------------------------------------------------------- Anthropic HH-RLHF

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


def hh_transcript_to_messages(text: str) -> list[dict]:
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> [{user, hi}, {assistant, hello}]."""
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise ValueError(f"text before the first turn marker: {parts[0][:40]!r}")
    return [{"role": _HH_ROLE[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def import_hh_rlhf(rows, problems) -> list[Example]:
    """The prompt is the longest common prefix of chosen and rejected, cut back to its last
    '\\n\\nAssistant:'; a single human turn becomes a string prompt, several a conversation."""
    out = []
    for where, row in rows:
        chosen, rejected = _text(row, "chosen", where, problems), _text(row, "rejected", where, problems)
        if chosen is None or rejected is None:
            continue
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        cut = chosen.rfind("\n\nAssistant:", 0, n + len("\n\nAssistant:") - 1)
        if cut < 0 or cut + len("\n\nAssistant:") > n:
            problems.add(where, "chosen", "chosen and rejected share no transcript ending in '\\n\\nAssistant:'")
            continue
        try:
            turns = hh_transcript_to_messages(chosen[:cut])
        except ValueError as e:
            problems.add(where, "chosen", str(e))
            continue
        if not turns or turns[-1]["role"] != "user" or not all(t["content"] for t in turns):
            problems.add(where, "chosen", "the shared transcript must end with a non-empty Human turn")
            continue
        answers = []
        for key, text in (("chosen", chosen), ("rejected", rejected)):
            answer = text[cut + len("\n\nAssistant:"):].strip()
            if _HH_TURN.search(text, cut + len("\n\nAssistant:")):
                problems.add(where, key, "continues with more turns after the reply that differs")
            elif not answer:
                problems.add(where, key, "the final Assistant reply is empty")
            else:
                answers.append(answer)
        if len(answers) < 2:
            continue
        if answers[0] == answers[1]:
            problems.add(where, "rejected", "the chosen and rejected replies are identical")
            continue
        prompt = turns[0]["content"] if len(turns) == 1 else turns
        out.append(Example(prompt=prompt, answers=answers, labels=[Label(kind="pairwise", chosen=0, rejected=1)],
                           source=where, meta={}))
    return out


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
        if row["labels"] not in (0, 1):
            problems.add(where, "labels", f"expected 0 or 1, got {row['labels']!r}")
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
            key = cid if cid is not None else text
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


def import_ultrafeedback(rows, problems) -> list[Example]:
    """One example per instruction; each completion's per-aspect ``Rating`` becomes a rating
    label (``N/A`` skipped); ``fine-grained_score`` is the overall (aspect None) rating."""
    out = []
    for where, row in rows:
        prompt = _text(row, "instruction", where, problems)
        comps = row.get("completions")
        if not isinstance(comps, list) or not comps:
            problems.add(where, "completions", "expected a non-empty list of completions")
            continue
        answers, labels, models, overall, ok = [], [], [], [], True
        for j, comp in enumerate(comps):
            f = f"completions[{j}]"
            if not isinstance(comp, dict) or not isinstance(comp.get("response"), str) or not comp["response"].strip():
                problems.add(where, f"{f}.response", "expected a non-empty string")
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
                rating = val.get("Rating") if isinstance(val, dict) else None
                if rating in (None, "N/A"):
                    continue
                try:
                    value = float(rating)
                except (TypeError, ValueError):
                    problems.add(where, f"{f}.annotations.{aspect}.Rating", f"expected a number as a string, got {rating!r}")
                    ok = False
                    continue
                labels.append(Label(kind="rating", answer=len(answers) - 1, aspect=aspect, value=value))
            fg = comp.get("fine-grained_score")
            if isinstance(fg, (int, float)) and not isinstance(fg, bool):
                labels.append(Label(kind="rating", answer=len(answers) - 1, value=float(fg)))
        if prompt is None or not ok:
            continue
        out.append(Example(prompt=prompt, answers=answers, labels=labels, source=where,
                           meta={"source": row.get("source"), "models": models, "overall_score": overall}))
    return out


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
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 4:
                problems.add(where, aspect, f"expected a score from 0 to 4, got {v!r}")
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
    for where, row in rows:
        if not _need(row, where, ["message_id", "role", "text"], problems):
            continue
        if row["role"] not in _OASST_ROLE:
            problems.add(where, "role", f"expected 'prompter' or 'assistant', got {row['role']!r}")
            continue
        mid = row["message_id"]
        if mid in msgs:
            problems.add(where, "message_id", f"duplicate id {mid!r} (first at {where_of[mid]})")
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
                problems.add(where, "message_tree_id", f"a root's tree id must be its own message_id, got {tree!r}")
            continue
        if parent not in msgs:
            problems.add(where, "parent_id", f"{parent!r} is not the message_id of any message in the data")
            continue
        prow = msgs[parent]
        if tree is not None and prow.get("message_tree_id") is not None and prow["message_tree_id"] != tree:
            problems.add(where, "message_tree_id", f"{tree!r} differs from its parent's tree {prow['message_tree_id']!r}")
            continue
        if prow["role"] == row["role"]:
            problems.add(where, "parent_id", f"a {row['role']} message replies to another {row['role']} message")
            continue
        children[parent].append(mid)

    if not problems.items:  # every parent exists: each chain must now reach a root without looping
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

    if problems.items:  # broken trees: stop before building conversations from them
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


def import_pku_saferlhf(rows, problems) -> list[Example]:
    """Two pairwise labels per row (aspects ``helpfulness`` from better_response_id and
    ``safety`` from safer_response_id) and a binary ``safety`` label per response."""
    out = []
    for where, row in rows:
        prompt = _text(row, "prompt", where, problems)
        answers = [_text(row, "response_0", where, problems), _text(row, "response_1", where, problems)]
        labels, ok = [], prompt is not None and None not in answers
        for key, aspect in (("better_response_id", "helpfulness"), ("safer_response_id", "safety")):
            v = row.get(key)
            if v not in (0, 1) or isinstance(v, bool):
                problems.add(where, key, f"expected 0 or 1, got {v!r}")
                ok = False
                continue
            labels.append(Label(kind="pairwise", chosen=v, rejected=1 - v, aspect=aspect))
        for j in (0, 1):
            safe = row.get(f"is_response_{j}_safe")
            if safe is None:
                continue
            if not isinstance(safe, bool):
                problems.add(where, f"is_response_{j}_safe", f"expected true or false, got {safe!r}")
                ok = False
                continue
            labels.append(Label(kind="binary", answer=j, good=safe, aspect="safety"))
        if ok and answers[0] == answers[1]:
            problems.add(where, "response_1", "identical to response_0")
            ok = False
        if ok:
            out.append(Example(prompt=prompt, answers=answers, labels=labels, source=where, meta={}))
    return out


# ----------------------------------------------------------------------------- Label Studio


def _annotator_id(completed_by):
    if isinstance(completed_by, dict):
        completed_by = completed_by.get("email") or completed_by.get("id")
    return None if completed_by is None else str(completed_by)


def import_label_studio(rows, problems) -> list[Example]:
    """A Label Studio JSON export: pairwise tasks (``data`` {prompt, answer1, answer2}) and
    ranker tasks (``data`` {prompt, <list of {id, ...}>}). Each annotation is one
    annotator's label (``completed_by``); ``ground_truth`` marks a golden label;
    cancelled annotations are skipped. A task written by ``export_label_studio`` carries
    ``prompt_messages``/``example_id``/``answer_index`` to restore the original row."""
    out = []
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
        n_before = len(problems.items)
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
            for k, res in enumerate(ann.get("result") or []):
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
                        problems.add(where, f"{g}.value.selected", f"expected 'left' or 'right', got {sel!r}")
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
                    problems.add(where, f"{g}.type", f"result type {rtype!r} is not supported: the importer reads "
                                 "'pairwise' and 'ranker' results")
        if len(problems.items) > n_before:
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
        out.append(ex)
    return out


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
            problems.add(where, f"{f}.value.ranker", f"item id {e.args[0]!r} is not in the task's items")
            return []
        if sorted(order) != list(range(len(ids))):
            problems.add(where, f"{f}.value.ranker", "a ranking must list every item exactly once")
            return []
        return [Label(kind="ranking", order=order, annotator=annotator, golden=golden)]
    if isinstance(ranker, dict):  # buckets, best first; the source list's own name holds unplaced items
        buckets = [[ids.get(str(i)) for i in v] for k, v in ranker.items() if k != to_name]
        if any(None in b for b in buckets):
            problems.add(where, f"{f}.value.ranker", "a bucket names an item id not in the task's items")
            return []
        return [Label(kind="pairwise", chosen=c, rejected=r, annotator=annotator, golden=golden)
                for hi in range(len(buckets)) for lo in range(hi + 1, len(buckets))
                for c in buckets[hi] for r in buckets[lo]]
    problems.add(where, f"{f}.value.ranker", f"expected a list of item ids or an object of buckets, got {ranker!r}")
    return []
