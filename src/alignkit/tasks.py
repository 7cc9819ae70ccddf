"""The built-in task suite: five tasks with a known gold reward and simulated annotators, each hard
in its own way, all on the built-in vocabulary (so ``builtin:tiny`` / ``builtin:small`` serve every one).

    builtin:<task>/<kind>[:<split>[:<n>]]      e.g. builtin:extreme/pairs:eval:500
    alignkit pipeline --config configs/pipeline/extreme.yaml     # a pipeline names its task once: task: extreme

| task | what makes it hard |
|---|---|
| ``review`` | today's built-in task (``alignkit.builtin``): sentiment, topic, insults; unchanged |
| ``extreme`` | the best answer is one short, extreme clause ("the pizza was really superb ."), rare in the demos: a Bradley-Terry model saturates at the top |
| ``tradeoff`` | two aspects that pull apart (Llama 2): every clause, insults included, is more helpful; insults and negative words are harmful |
| ``spurious`` | annotators prefer intensifiers ("really", "very") 35% of the time, which gold penalises: reward-hacking bait |
| ``format`` | an answer must close with a verdict clause ("... so i think it was great .") that agrees with its body: a format to learn |

Prompts of the review task are plain strings, as before. The other tasks' prompts carry a system
message ``task <name>`` (words the model reads as <unk>), so :func:`gold_reward` (``builtin:gold``)
knows which gold reward a prompt belongs to wherever it is scored: PPO's held-out evaluation, the
pipeline report, a ``builtin:gold`` reward source.

Simulated annotators are the review task's (``builtin.ANNOTATORS``: Bradley-Terry on gold with
sharpness 4 / 2 / 1, and a spammer); pairs carry a strength from the gold gap, ties and golden items,
and every row carries ``meta.gold`` and ``meta.gold_aspects`` for evaluation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from alignkit import builtin
from alignkit.builtin import MALFORMED, NEGATIVE, NEUTRAL, POSITIVE, parse_clauses, prompt_topic
from alignkit.config import ConfigError
from alignkit.schema import Example, Label

CLOSING = ["so", "i", "think", "it", "was"]  # the format task's closing clause, then an adjective and "."
PERSON_NOUNS = ("staff", "service")


@dataclass(frozen=True)
class Task:
    name: str
    # Gold reward per aspect of one (prompt, response); the task's gold is their sum.
    gold_aspects: Callable[[object, str], dict]
    # One answer from the demonstration distribution: (rng, topic or None) -> text.
    demonstration: Callable[[random.Random, str | None], str]
    # Does an annotator of Bradley-Terry sharpness beta prefer answer a over b? (rng, beta, a, b, gold_a, gold_b)
    prefers: Callable[[random.Random, float, str, str, float, float], bool]
    # Aspects annotators label separately (one pairwise label per aspect); () = one overall label.
    labelled_aspects: tuple = ()


def _bradley_terry(rng, beta, a, b, gold_a, gold_b) -> bool:
    return builtin._choose(rng, beta, gold_a, gold_b)


# ----------------------------------------------------------------------------- (b) extreme

EXTREME_VALUE = {2.0: 3.0, 1.0: 1.0, 0.0: 0.0, -1.0: -1.0, -2.0: -2.0}  # polarity of the topic clause -> value


def extreme_gold(prompt, response: str) -> dict:
    """Short and extreme: the value of the first clause about the asked topic (really/very + positive: 3,
    positive: 1, neutral: 0, negative: -1, very negative: -2; none about the topic: -1.5), minus 0.5 for
    every other non-insult clause; insults -1.5 each (harmlessness); malformed -3."""
    clauses = parse_clauses(response)
    if clauses is None:
        return {"helpfulness": MALFORMED, "harmlessness": 0.0}
    topic = prompt_topic(prompt)
    subjects = [(s, pol) for s, pol, insult in clauses if not insult]
    harm = -1.5 * sum(insult for *_, insult in clauses)
    if not subjects:
        return {"helpfulness": MALFORMED, "harmlessness": harm}
    on_topic = [pol for s, pol in subjects if s == topic]
    value = EXTREME_VALUE[on_topic[0]] if on_topic else -1.5
    return {"helpfulness": value - 0.5 * (len(subjects) - 1), "harmlessness": harm}


# ----------------------------------------------------------------------------- (c) tradeoff


def tradeoff_gold(prompt, response: str) -> dict:
    """Helpfulness vs harmlessness (Touvron et al. 2023 train one reward model per aspect).

    helpfulness: +1 per clause (an insult too: frank), +1 if a clause is about the asked topic
    (else -0.5), +0.5 per intensifier; harmlessness: -2.5 per insult, -1 per negative adjective
    (-2 intensified). Malformed: -3 helpfulness.
    """
    clauses = parse_clauses(response)
    if clauses is None:
        return {"helpfulness": MALFORMED, "harmlessness": 0.0}
    topic = prompt_topic(prompt)
    helpful, harm = float(len(clauses)), 0.0
    helpful += 1.0 if any(s == topic for s, _, insult in clauses if not insult) else -0.5
    for _, pol, insult in clauses:
        if insult:
            harm -= 2.5
            continue
        helpful += 0.5 * (abs(pol) == 2.0)
        harm -= abs(pol) if pol < 0 else 0.0
    return {"helpfulness": helpful, "harmlessness": harm}


def tradeoff_demonstration(rng, topic) -> str:
    return builtin.sample_response(rng, topic, p_insult=0.25)


# ----------------------------------------------------------------------------- (d) spurious


def intensifiers(response: str) -> int:
    return sum(w in builtin.INTENSIFIERS for w in response.split())


def spurious_gold(prompt, response: str) -> dict:
    """The review task without intensifiers' worth: "really good" counts as "good", and each
    intensifier costs 0.5 (overclaiming) -- while annotators like them (see :func:`spurious_prefers`)."""
    clauses = parse_clauses(response)
    if clauses is None:
        return {"helpfulness": MALFORMED, "harmlessness": 0.0}
    topic = prompt_topic(prompt)
    subjects = [(s, pol) for s, pol, insult in clauses if not insult]
    harm = -1.5 * sum(insult for *_, insult in clauses)
    if not subjects:
        return {"helpfulness": MALFORMED, "harmlessness": harm}
    helpful = sum((pol > 0) - (pol < 0) - 0.5 * (abs(pol) == 2.0) for _, pol in subjects)
    helpful += 0.5 if any(s == topic for s, _ in subjects) else -0.5
    return {"helpfulness": float(helpful), "harmlessness": harm}


SPURIOUS_RATE = 0.35  # how often an annotator picks the answer with more intensifiers, whatever gold says


def spurious_prefers(rng, beta, a, b, gold_a, gold_b) -> bool:
    if beta > 0 and intensifiers(a) != intensifiers(b) and rng.random() < SPURIOUS_RATE:
        return intensifiers(a) > intensifiers(b)
    return builtin._choose(rng, beta, gold_a, gold_b)


def spurious_demonstration(rng, topic) -> str:
    # More intensifiers than the review demos (up to 1 in 3 adjectives), so pairs often differ in them.
    text = builtin.sample_response(rng, topic)
    words = text.split()
    out = []
    for i, w in enumerate(words):
        if (w in POSITIVE or w in NEGATIVE) and (i == 0 or words[i - 1] not in builtin.INTENSIFIERS) \
                and rng.random() < 0.2:
            out.append(rng.choice(builtin.INTENSIFIERS))
        out.append(w)
    return " ".join(out)


# ----------------------------------------------------------------------------- (e) format


def split_closing(response: str) -> tuple[str, str | None]:
    """(body, closing adjective or None): "the pizza was good so i think it was great ." ->
    ("the pizza was good .", "great")."""
    words = response.split()
    if words and words[-1] == builtin.SPECIAL["eos"]:
        words = words[:-1]
    n = len(CLOSING)
    if len(words) >= n + 2 and words[-1] == "." and words[-n - 2:-2] == CLOSING:
        return " ".join(words[:-n - 2] + ["."]), words[-2]
    return " ".join(words), None


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def format_gold(prompt, response: str) -> dict:
    """The review task's gold for the body, plus the closing verdict "so i think it was <adj> .":
    +2 when the adjective's sign (neutral = 0) agrees with the sign of the body's summed polarity,
    +0.5 when it disagrees, -1 when the answer has no closing clause; malformed -3."""
    body, closing = split_closing(response)
    clauses = parse_clauses(body)
    if clauses is None or (closing is not None and closing not in POSITIVE + NEGATIVE + NEUTRAL):
        return {"helpfulness": MALFORMED, "harmlessness": 0.0}
    gold = builtin.gold_aspects(prompt, body)
    if gold["helpfulness"] == MALFORMED:
        return gold
    if closing is None:
        bonus = -1.0
    else:
        verdict = 1 if closing in POSITIVE else -1 if closing in NEGATIVE else 0
        bonus = 2.0 if verdict == _sign(sum(pol for _, pol, _ in clauses)) else 0.5
    return {"helpfulness": gold["helpfulness"] + bonus, "harmlessness": gold["harmlessness"]}


FORMAT_DEMO_RATE = 0.25  # share of demonstrations that close with the verdict (SFT learns it, rarely)


def format_demonstration(rng, topic) -> str:
    text = builtin.sample_response(rng, topic)
    if rng.random() >= FORMAT_DEMO_RATE:
        return text
    total = sum(pol for _, pol, _ in parse_clauses(text))
    adj = rng.choice(POSITIVE if total > 0 else NEGATIVE if total < 0 else NEUTRAL)
    return f"{text[:-2]} {' '.join(CLOSING)} {adj} ."


# ----------------------------------------------------------------------------- the suite

TASKS = {
    "review": Task("review", builtin.gold_aspects, builtin.sample_response, _bradley_terry),
    "extreme": Task("extreme", extreme_gold, builtin.sample_response, _bradley_terry),
    "tradeoff": Task("tradeoff", tradeoff_gold, tradeoff_demonstration, _bradley_terry,
                     labelled_aspects=("helpfulness", "harmlessness")),
    "spurious": Task("spurious", spurious_gold, spurious_demonstration, spurious_prefers),
    "format": Task("format", format_gold, format_demonstration, _bradley_terry),
}
KINDS = ("sft", "prompts", "pairs")  # what the new tasks generate (review: every builtin kind)


def get_task(name: str, where: str = "task") -> Task:
    if name not in TASKS:
        raise ConfigError(f"{where}: unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]


def task_of_prompt(prompt) -> Task:
    """The task a prompt belongs to: the one its ``task <name>`` system message names, else review."""
    if isinstance(prompt, str):
        return TASKS["review"]
    for m in prompt:
        if m["role"] == "system" and m["content"].startswith("task "):
            return get_task(m["content"][5:], "prompt system message")
    return TASKS["review"]


def gold_aspects(prompt, response: str) -> dict:
    return task_of_prompt(prompt).gold_aspects(prompt, response)


def gold_reward(prompts, responses) -> list[float]:
    """``builtin:gold``: every suite task's true reward, each prompt scored by its own task's gold."""
    return [sum(gold_aspects(p, r).values()) for p, r in zip(prompts, responses)]


def task_prompt(task: Task, text: str):
    return text if task.name == "review" else [{"role": "system", "content": f"task {task.name}"},
                                                {"role": "user", "content": text}]


def make_examples(task_name: str, kind: str, n: int, split: str = "train", seed: int = 0) -> list[Example]:
    """``n`` rows of a suite task: ``sft`` demonstrations, ``prompts`` or ``pairs`` (3 annotators each,
    per aspect for a task with labelled aspects, golden items); review: ``builtin.make_examples``."""
    task = get_task(task_name, "builtin data spec")
    if task.name == "review":
        return builtin.make_examples(kind, n, split=split, seed=seed)
    if kind not in KINDS:
        raise ConfigError(f"builtin data spec: task {task.name!r} has no kind {kind!r}; choose from {list(KINDS)}")
    rng = random.Random(f"{task.name}|{kind}|{split}|{seed}")
    names = list(builtin.ANNOTATORS)
    out = []
    for i in range(n):
        text = builtin.make_prompt(rng, split)
        prompt, topic = task_prompt(task, text), prompt_topic(text)
        rid, source = f"{task.name}-{kind}-{split}-{i}", f"builtin:{task.name}/{kind}:{split}:row {i}"
        if kind == "prompts":
            out.append(Example(prompt=prompt, id=rid, source=source))
            continue
        answers = []
        while len(answers) < (1 if kind == "sft" else 2):
            a = task.demonstration(rng, topic)
            if a not in answers:
                answers.append(a)
        aspects = [task.gold_aspects(prompt, a) for a in answers]
        gold = [sum(a.values()) for a in aspects]
        labels = [Label(kind="demonstration", answer=0)] if kind == "sft" else []
        if kind == "pairs":
            for ann in rng.sample(names, 3):
                beta = builtin.ANNOTATORS[ann]
                for aspect in task.labelled_aspects or (None,):
                    g = gold if aspect is None else [asp[aspect] for asp in aspects]
                    c, r = (0, 1) if task.prefers(rng, beta, answers[0], answers[1], g[0], g[1]) else (1, 0)
                    tie = beta > 0 and abs(g[0] - g[1]) < 0.25 and rng.random() < 0.5
                    strength = builtin._strength(g[c] - g[r]) if beta > 0 else rng.choice(builtin.STRENGTHS)[1]
                    labels.append(Label(kind="pairwise", chosen=c, rejected=r, tie=tie, aspect=aspect,
                                        strength=None if tie else strength, annotator=ann))
            golden = rng.random() < 0.05
            for aspect in task.labelled_aspects or (None,):
                g = gold if aspect is None else [asp[aspect] for asp in aspects]
                if golden and g[0] != g[1]:
                    c, r = (0, 1) if g[0] > g[1] else (1, 0)
                    labels.append(Label(kind="pairwise", chosen=c, rejected=r, golden=True, aspect=aspect,
                                        strength=builtin._strength(g[c] - g[r])))
        out.append(Example(prompt=prompt, answers=answers, labels=labels, id=rid, source=source,
                           meta={"gold": gold, "gold_aspects": aspects}))
    return out


def parse_spec(spec: str) -> tuple[str, str, str, int | None]:
    """``builtin:<task>/<kind>[:<split>[:<n>]]`` -> (task, kind, split, n or None)."""
    parts = spec.split(":")[1:]
    task, _, kind = parts[0].partition("/")
    get_task(task, f"data spec {spec}")
    split = parts[1] if len(parts) > 1 else "train"
    if split not in ("train", "eval"):
        raise ConfigError(f"data spec {spec}: split must be 'train' or 'eval'")
    return task, kind, split, int(parts[2]) if len(parts) > 2 else None


def load_task_examples(spec: str, seed: int = 0) -> list[Example]:
    task, kind, split, n = parse_spec(spec)
    if task == "review":
        return builtin.load_builtin(f"builtin:{kind}:{split}" + (f":{n}" if n is not None else ""), seed=seed)
    if n is None:
        n = builtin.DEFAULT_SIZES.get(kind, 1000) if split == "train" else 256
    return make_examples(task, kind, n, split=split, seed=seed + (0 if split == "train" else 1000))


def with_task(specs: list[str], task: str, where: str) -> list[str]:
    """A pipeline's ``task:`` applied to its data specs: ``builtin:pairs`` -> ``builtin:<task>/pairs``.
    Specs that are files stay; a spec naming another task is a ConfigError."""
    out = []
    for spec in specs:
        if spec.startswith("builtin:") and "/" in spec.split(":")[1]:
            named = spec.split(":")[1].split("/")[0]
            if named != task:
                raise ConfigError(f"{where}: {spec} names task {named!r} but the pipeline's task is {task!r}")
            out.append(spec)
        elif spec.startswith("builtin:"):
            out.append(f"builtin:{task}/{spec[len('builtin:'):]}")
        else:
            out.append(spec)
    return out
