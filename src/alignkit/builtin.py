"""The built-in default: a tiny Llama and word-level tokenizer built offline, and a
toy review-writing task with a known gold reward.

The task. A user asks about a topic ("review the pizza"); an answer is one to
three short clauses ("the pizza was great and the staff was really rude .").
The gold reward has two aspects:

* helpfulness: +1 for each positive adjective, -1 for each negative one (an
  intensifier doubles it), +0.5 when the answer talks about the asked topic,
  -0.5 when it does not;
* harmlessness: -1.5 for each insult clause ("you are stupid").

An answer that does not follow the grammar, or never ends, scores -3 on both
aspects together: a policy cannot win by emitting adjective soup, so the
reward model's blind spots are visible as a gap between learned and gold reward.

Demonstrations mix sentiments evenly, so the SFT policy has mean gold reward
near 0 and PPO has several standard deviations of room to improve.
Simulated annotators of known reliability label pairs, rankings, ratings and
good/bad judgements from the gold reward; one of them (``spammer``) clicks at random.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import tempfile

from alignkit.schema import Example, Label

TOPICS = ["pizza", "movie", "hotel", "book", "phone", "song", "game", "car", "park", "cafe", "show", "laptop",
          "museum", "train", "beach", "album", "concert", "restaurant", "bike", "camera", "garden", "school",
          "bakery", "festival"]
NOUNS = ["staff", "price", "story", "service", "music", "screen", "room", "food", "plot", "design", "sound",
         "view", "battery", "ending", "menu", "seats"]
POSITIVE = ["great", "good", "lovely", "excellent", "amazing", "fun", "nice", "superb"]
NEGATIVE = ["bad", "awful", "boring", "poor", "terrible", "dull", "weak", "horrible"]
NEUTRAL = ["okay", "fine", "average", "normal", "plain", "usual"]
INTENSIFIERS = ["very", "really"]
INSULTS = ["stupid", "dumb", "silly", "lazy"]
PROMPT_TEMPLATES = ["review the {t}", "tell me about the {t}", "what do you think of the {t}", "describe the {t}",
                    "how was the {t}", "give me your opinion on the {t}"]
ASPECTS = ("helpfulness", "harmlessness")
SPECIAL = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
FUNCTION_WORDS = ["the", "was", "is", "and", "but", ".", "you", "are", "i", "think", "it", "a", "me", "of", "about",
                  "what", "do", "how", "your", "opinion", "on", "give", "tell", "review", "describe", "were", "so"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MALFORMED = -3.0
SIZES = {
    # name: (hidden, layers, heads, intermediate)
    "tiny": (64, 2, 4, 256),
    "small": (128, 4, 4, 512),
}
BUILD_VERSION = "1"


def vocabulary() -> list[str]:
    words = [SPECIAL["pad"], SPECIAL["bos"], SPECIAL["eos"], SPECIAL["unk"], *ROLE_TOKENS]
    for w in FUNCTION_WORDS + TOPICS + NOUNS + POSITIVE + NEGATIVE + NEUTRAL + INTENSIFIERS + INSULTS:
        if w not in words:
            words.append(w)
    for tmpl in PROMPT_TEMPLATES:
        for w in tmpl.replace("{t}", "").split():
            if w not in words:
                words.append(w)
    return words


def build_tokenizer():
    """A word-level fast tokenizer with a chat template, usable like any HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=SPECIAL["pad"], bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"],
        unk_token=SPECIAL["unk"], additional_special_tokens=ROLE_TOKENS,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 256
    return fast


def build_model(size: str = "tiny", seed: int = 0, **overrides):
    """A randomly initialised Llama-architecture causal LM over the built-in vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if size not in SIZES:
        raise ValueError(f"unknown built-in size {size!r}; choose one of {sorted(SIZES)}")
    hidden, layers, heads, inter = SIZES[size]
    tok = build_tokenizer()
    cfg = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
               tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)), tok


def cache_dir() -> str:
    return os.environ.get("ALIGNKIT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "alignkit"))


def ensure_model(spec: str = "builtin:tiny") -> str:
    """Build (once) and return the directory of a built-in model: ``builtin:tiny`` or ``builtin:small``.

    The model is written with ``save_pretrained`` and then loaded by path exactly
    like a Hub checkpoint, so the built-in default runs the real loading code.
    """
    size = spec.split(":", 1)[1] or "tiny"
    path = os.path.join(cache_dir(), f"builtin-{size}-v{BUILD_VERSION}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    model, tok = build_model(size)
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_dir(), prefix=f".build-{size}-")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, path)  # atomic: several processes may build at once
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path


# ----------------------------------------------------------------------------- gold reward


def prompt_topic(prompt) -> str | None:
    text = prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt if m["role"] == "user")
    words = text.split()
    for w in reversed(words):
        if w in TOPICS:
            return w
    return None


def _parse_clause(words: list[str]):
    """Return (subject, polarity, insult) for one clause or None if it breaks the grammar."""
    if words[:3] in (["you", "are", w] for w in INSULTS) and len(words) == 3:
        return None, 0.0, True
    if len(words) not in (4, 5) or words[0] != "the" or words[2] != "was":
        return None
    subject = words[1]
    if subject not in TOPICS and subject not in NOUNS:
        return None
    mult = 1.0
    if len(words) == 5:
        if words[3] not in INTENSIFIERS:
            return None
        mult = 2.0
    adj = words[-1]
    if adj in POSITIVE:
        pol = mult
    elif adj in NEGATIVE:
        pol = -mult
    elif adj in NEUTRAL and mult == 1.0:
        pol = 0.0
    else:
        return None
    return subject, pol, False


def parse_clauses(response: str) -> list[tuple] | None:
    """The clauses of an answer as ``(subject, polarity, insult)`` tuples, or None if it breaks the grammar.

    An answer is 1-4 clauses joined by "and"/"but" and closed by "."; a trailing EOS token is ignored.
    Polarity is +-1 per adjective (+-2 with an intensifier, 0 for a neutral one); an insult clause
    ("you are stupid") has subject None.
    """
    words = response.split()
    if words and words[-1] == SPECIAL["eos"]:
        words = words[:-1]
    if len(words) < 4 or words[-1] != ".":
        return None
    clauses, cur = [], []
    for w in words[:-1]:
        if w in ("and", "but", "."):
            clauses.append(cur)
            cur = []
        else:
            cur.append(w)
    clauses.append(cur)
    if len(clauses) > 4:
        return None
    parsed = [_parse_clause(c) if c else None for c in clauses]
    return None if any(c is None for c in parsed) else parsed


def gold_aspects(prompt, response: str) -> dict[str, float]:
    """Gold reward per aspect for one response (see module docstring)."""
    clauses = parse_clauses(response)
    if clauses is None:
        return {"helpfulness": MALFORMED, "harmlessness": 0.0}
    topic = prompt_topic(prompt)
    helpful, harm, on_topic, subjects = 0.0, 0.0, False, []
    for subject, pol, insult in clauses:
        if insult:
            harm -= 1.5
            continue
        helpful += pol
        subjects.append(subject)
        on_topic = on_topic or subject == topic
    if not subjects:
        return {"helpfulness": MALFORMED, "harmlessness": harm}
    helpful += 0.5 if on_topic else -0.5
    return {"helpfulness": helpful, "harmlessness": harm}


def gold_reward(prompts, responses) -> list[float]:
    """The built-in task's true reward, ``f(prompts, responses) -> scores`` (sum of both aspects)."""
    return [sum(gold_aspects(p, r).values()) for p, r in zip(prompts, responses)]


# ----------------------------------------------------------------------------- generators


def make_prompt(rng: random.Random, split: str = "train") -> str:
    # Held-out prompts use topic/template pairs that training never sees.
    while True:
        t, tmpl = rng.choice(TOPICS), rng.randrange(len(PROMPT_TEMPLATES))
        held_out = int(hashlib.md5(f"{t}|{tmpl}".encode()).hexdigest(), 16) % 5 == 0
        if held_out == (split != "train"):
            return PROMPT_TEMPLATES[tmpl].format(t=t)


def sample_response(rng: random.Random, topic: str | None, p_insult: float = 0.1, p_topic: float = 0.6) -> str:
    """One answer from the demonstration distribution: sentiments mixed evenly."""
    clauses = []
    for i in range(rng.choice([1, 2, 3])):
        subject = topic if (i == 0 and topic and rng.random() < p_topic) else rng.choice(NOUNS)
        kind = rng.random()
        adj = rng.choice(POSITIVE if kind < 0.35 else NEGATIVE if kind < 0.7 else NEUTRAL)
        inten = [rng.choice(INTENSIFIERS)] if adj not in NEUTRAL and rng.random() < 0.2 else []
        clauses.append(" ".join(["the", subject, "was", *inten, adj]))
    if rng.random() < p_insult:
        clauses.insert(rng.randrange(len(clauses) + 1), f"you are {rng.choice(INSULTS)}")
    out = clauses[0]
    for c in clauses[1:]:
        out += f" {rng.choice(['and', 'but'])} {c}"
    return out + " ."


ANNOTATORS = {"ann_expert": 4.0, "ann_good": 2.0, "ann_casual": 1.0, "spammer": 0.0}  # Bradley-Terry sharpness
STRENGTHS = [(2.0, "significantly_better"), (1.0, "better"), (0.5, "slightly_better"), (0.0, "negligibly_better")]


def _strength(diff: float) -> str:
    return next(name for lo, name in STRENGTHS if abs(diff) >= lo)


def _choose(rng, beta, ga, gb) -> bool:
    """True if the annotator prefers a over b (spammer: a coin)."""
    if beta == 0.0:
        return rng.random() < 0.5
    return rng.random() < 1 / (1 + math.exp(-beta * (ga - gb)))


def _distinct_answers(rng, prompt, k):
    topic = prompt_topic(prompt)
    answers = []
    while len(answers) < k:
        a = sample_response(rng, topic)
        if a not in answers:
            answers.append(a)
    return answers


def make_examples(kind: str, n: int, split: str = "train", seed: int = 0, annotators_per_item: int = 3,
                  golden_fraction: float = 0.05, k: int = 4) -> list[Example]:
    """Generate ``n`` rows of the built-in task.

    kind: ``sft`` (demonstrations), ``prompts``, ``pairs`` (pairwise with strength
    and ties, several annotators, golden items), ``rankings`` (K answers),
    ``ratings`` (1-5 per aspect), ``binary`` (good/bad).
    Rows carry ``meta.gold`` (gold reward per answer) for evaluation.
    """
    rng = random.Random(f"{kind}|{split}|{seed}")
    out = []
    names = list(ANNOTATORS)
    for i in range(n):
        prompt = make_prompt(rng, split)
        rid = f"{kind}-{split}-{i}"
        if kind == "prompts":
            out.append(Example(prompt=prompt, id=rid, source=f"builtin:{kind}:{split}:row {i}"))
            continue
        if kind == "sft":
            answers = _distinct_answers(rng, prompt, 1)
            labels = [Label(kind="demonstration", answer=0)]
        elif kind in ("pairs", "binary", "ratings", "rankings"):
            answers = _distinct_answers(rng, prompt, {"pairs": 2, "binary": 1, "ratings": 2, "rankings": k}[kind])
            labels = []
        else:
            raise ValueError(f"unknown built-in data kind {kind!r}")
        aspects = [gold_aspects(prompt, a) for a in answers]
        gold = [sum(a.values()) for a in aspects]
        golden = kind != "sft" and rng.random() < golden_fraction
        who = rng.sample(names, min(annotators_per_item, len(names)))
        if kind == "pairs":
            for ann in who:
                a_wins = _choose(rng, ANNOTATORS[ann], gold[0], gold[1])
                c, r = (0, 1) if a_wins else (1, 0)
                tie = ANNOTATORS[ann] > 0 and abs(gold[0] - gold[1]) < 0.25 and rng.random() < 0.5
                strength = _strength(gold[c] - gold[r]) if ANNOTATORS[ann] > 0 else rng.choice(STRENGTHS)[1]
                labels.append(Label(kind="pairwise", chosen=c, rejected=r, tie=tie,
                                    strength=None if tie else strength, annotator=ann))
            if golden and gold[0] != gold[1]:
                c, r = (0, 1) if gold[0] > gold[1] else (1, 0)
                labels.append(Label(kind="pairwise", chosen=c, rejected=r, golden=True,
                                    strength=_strength(gold[c] - gold[r])))
        elif kind == "rankings":
            for ann in [a for a in who if ANNOTATORS[a] > 0][:1]:  # InstructGPT: one trained labeller ranks K
                beta = ANNOTATORS[ann]
                noisy = [g + (rng.gauss(0, 1 / beta) if beta else rng.gauss(0, 100)) for g in gold]
                labels.append(Label(kind="ranking", order=sorted(range(k), key=lambda j: -noisy[j]), annotator=ann))
        elif kind == "ratings":
            for ann in who:
                beta = ANNOTATORS[ann]
                for j, asp in itertools.product(range(len(answers)), ASPECTS):
                    val = aspects[j][asp]
                    lik = 3 + val if asp == "helpfulness" else 5 + val * 4 / 3
                    lik = lik + (rng.gauss(0, 1 / beta) if beta else rng.uniform(-4, 4))
                    labels.append(Label(kind="rating", answer=j, aspect=asp, value=float(min(5, max(1, round(lik)))),
                                        annotator=ann))
        elif kind == "binary":
            for ann in who:
                beta = ANNOTATORS[ann]
                good = _choose(rng, beta, gold[0], 0.0)
                labels.append(Label(kind="binary", answer=0, good=good, annotator=ann))
            if golden:
                labels.append(Label(kind="binary", answer=0, good=gold[0] > 0, golden=True))
        meta = {"gold": gold, "gold_aspects": aspects}
        out.append(Example(prompt=prompt, answers=answers, labels=labels, id=rid, meta=meta,
                           source=f"builtin:{kind}:{split}:row {i}"))
    return out


DEFAULT_SIZES = {"sft": 2000, "prompts": 512, "pairs": 3000, "rankings": 1000, "ratings": 1500, "binary": 2000}


def load_builtin(spec: str, seed: int = 0) -> list[Example]:
    """``builtin:<kind>[:<split>[:<n>]]``, e.g. ``builtin:pairs:eval:500``; ``builtin:<task>/<kind>...``
    is a task of the suite (``alignkit.tasks``)."""
    parts = spec.split(":")[1:]
    if "/" in parts[0]:
        from alignkit.tasks import load_task_examples

        return load_task_examples(spec, seed=seed)
    kind = parts[0]
    split = parts[1] if len(parts) > 1 else "train"
    if split not in ("train", "eval"):
        raise ValueError(f"{spec}: split must be 'train' or 'eval'")
    n = int(parts[2]) if len(parts) > 2 else (DEFAULT_SIZES.get(kind, 1000) if split == "train" else 256)
    if kind not in DEFAULT_SIZES:
        raise ValueError(f"{spec}: unknown built-in data kind {kind!r}; choose from {sorted(DEFAULT_SIZES)}")
    return make_examples(kind, n, split=split, seed=seed + (0 if split == "train" else 1000))


def write_builtin(kind: str, n: int, path: str, split: str = "train", seed: int = 0) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for ex in make_examples(kind, n, split=split, seed=seed):
            f.write(json.dumps(ex.to_dict()) + "\n")
