"""Exporters: the shared schema out to TRL's formats, native JSONL and Label Studio tasks.

    from alignkit.feedback.exporters import export_examples
    export_examples(examples, "trl-preference", "pairs.jsonl")
    alignkit data convert --from hh-rlhf --to label-studio hh.jsonl tasks.json

* ``trl-preference``: ``{prompt, chosen, rejected[, margin]}``, one row per pair
  (pairwise labels; rankings give all C(K,2) pairs). Conversational prompts stay
  lists of turns, and chosen/rejected become one assistant turn each.
* ``trl-unpaired`` (KTO): ``{prompt, completion, label}`` from binary labels, and from
  each pair (chosen -> true, rejected -> false).
* ``trl-prompt-completion``: ``{prompt, completion}`` from demonstrations.
* ``alignkit``: native JSONL, every label kept.
* ``label-studio``: a JSON list of pairwise tasks ``{"data": {prompt, answer1,
  answer2, ...}}`` for Label Studio's pairwise template; ``example_id``,
  ``answer_index`` and ``prompt_messages`` let ``import_label_studio`` put the
  labels back on the right answers.
"""

from __future__ import annotations

import json
import os
from itertools import combinations

from alignkit.schema import Example, demonstrations, write_jsonl

EXPORT_FORMATS = ("alignkit", "trl-preference", "trl-unpaired", "trl-prompt-completion", "label-studio")


def preference_pairs(ex: Example, aspect: str | None = None) -> list[tuple[int, int, float | None]]:
    """(chosen, rejected, margin) for every non-tie pairwise label of ``aspect`` and every pair a
    ranking implies (best first). Golden labels count like any other."""
    pairs = []
    for lab in ex.labels:
        if lab.aspect != aspect:
            continue
        if lab.kind == "pairwise" and not lab.tie:
            pairs.append((lab.chosen, lab.rejected, lab.margin))
        elif lab.kind == "ranking":
            pairs.extend((a, b, None) for a, b in combinations(lab.order, 2))
    return pairs


def _completion(ex: Example, text: str):
    return [{"role": "assistant", "content": text}] if isinstance(ex.prompt, list) else text


def to_trl_preference(examples: list[Example], aspect: str | None = None) -> list[dict]:
    rows = []
    for ex in examples:
        for c, r, margin in preference_pairs(ex, aspect):
            row = {"prompt": ex.prompt, "chosen": _completion(ex, ex.answers[c]),
                   "rejected": _completion(ex, ex.answers[r])}
            if margin is not None:
                row["margin"] = margin
            rows.append(row)
    return rows


def to_trl_unpaired(examples: list[Example], aspect: str | None = None) -> list[dict]:
    rows = []
    for ex in examples:
        for lab in ex.labels:
            if lab.kind == "binary" and lab.aspect == aspect:
                rows.append({"prompt": ex.prompt, "completion": _completion(ex, ex.answers[lab.answer]),
                             "label": bool(lab.good)})
        for c, r, _ in preference_pairs(ex, aspect):
            rows.append({"prompt": ex.prompt, "completion": _completion(ex, ex.answers[c]), "label": True})
            rows.append({"prompt": ex.prompt, "completion": _completion(ex, ex.answers[r]), "label": False})
    return rows


def to_trl_prompt_completion(examples: list[Example]) -> list[dict]:
    return [{"prompt": ex.prompt, "completion": _completion(ex, answer)} for ex, answer in demonstrations(examples)]


def prompt_text(prompt) -> str:
    """A conversation flattened for display ("user: ...\\n\\nassistant: ...")."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{t['role']}: {t['content']}" for t in prompt)


def to_label_studio_tasks(examples: list[Example]) -> list[dict]:
    """One pairwise task per pair of answers of each row with two or more answers."""
    tasks = []
    for n, ex in enumerate(examples):
        for i, j in combinations(range(len(ex.answers)), 2):
            data = {"prompt": prompt_text(ex.prompt), "answer1": ex.answers[i], "answer2": ex.answers[j],
                    "example_id": ex.id if ex.id is not None else str(n), "answer_index": [i, j]}
            if isinstance(ex.prompt, list):
                data["prompt_messages"] = ex.prompt
            tasks.append({"data": data})
    return tasks


def write_rows(rows: list[dict], path: str) -> None:
    """JSONL, or one JSON list when ``path`` ends in .json."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if path.endswith(".json"):
            json.dump(rows, f, ensure_ascii=False, indent=1)
        else:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def export_rows(examples: list[Example], fmt: str, aspect: str | None = None) -> list[dict]:
    if fmt == "alignkit":
        return [ex.to_dict() for ex in examples]
    if fmt == "trl-preference":
        return to_trl_preference(examples, aspect)
    if fmt == "trl-unpaired":
        return to_trl_unpaired(examples, aspect)
    if fmt == "trl-prompt-completion":
        return to_trl_prompt_completion(examples)
    if fmt == "label-studio":
        return to_label_studio_tasks(examples)
    raise ValueError(f"unknown export format {fmt!r}; choose from {list(EXPORT_FORMATS)}")


def export_examples(examples: list[Example], fmt: str, path: str, aspect: str | None = None) -> int:
    """Write ``examples`` to ``path`` in ``fmt``; returns the number of rows written."""
    if fmt == "alignkit" and not path.endswith(".json"):
        write_jsonl(examples, path)
        return len(examples)
    rows = export_rows(examples, fmt, aspect)
    if fmt == "label-studio" and not path.endswith(".json"):
        raise ValueError(f"{path}: Label Studio imports a JSON list of tasks: name the file *.json")
    write_rows(rows, path)
    return len(rows)
