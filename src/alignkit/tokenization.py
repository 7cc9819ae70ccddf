"""Prompt/answer tokenization with chat templates, truncation policy, and packing.

A prompt is rendered with the tokenizer's chat template (``add_generation_prompt``),
then the answer's tokens and the token that ends an answer follow: the one the template
puts after an assistant message (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``...), or
EOS. This is exactly the text PPO later generates from, and it lets SFT put the loss on
answer tokens only. This module owns "what ends an answer" (:func:`answer_end_id`) and
"which tokens stop generation" (:func:`stop_token_ids`); every stage asks it.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

import torch

from alignkit.config import PACKING_ATTENTION, ConfigError
from alignkit.schema import DataError, Example

IGNORE_INDEX = -100

# A probe conversation rendered through a chat template to see where it puts an answer and what follows it.
PROBE_QUESTION, PROBE_ANSWER = "alignkit probe question", "alignkit probe answer"
_facts: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> {(fact, template): value}


class TokenizerError(ValueError):
    """A tokenizer or chat template alignkit cannot train with; ``modeling.load_tokenizer`` names its folder."""


def _cached(tokenizer, fact: str, compute):
    key = (fact, tokenizer.chat_template, tokenizer.eos_token_id, tokenizer.bos_token_id)
    try:
        per_tok = _facts.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: compute every time
        return compute()
    if key not in per_tok:
        per_tok[key] = compute()
    return per_tok[key]


def _ids(out) -> list[int]:
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)}
    return ids


def _probe(tokenizer) -> list[dict]:
    return [{"role": "user", "content": PROBE_QUESTION}, {"role": "assistant", "content": PROBE_ANSWER}]


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of every text it encodes (Llama 2/3, Mistral, Gemma, Phi-3, OPT)."""
    def compute():
        bos = tokenizer.bos_token_id
        return bos is not None and tokenizer("a")["input_ids"][:1] == [bos] and \
            tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]

    return _cached(tokenizer, "adds_bos", compute)


def answer_end_id(tokenizer) -> int:
    """The token that ends an answer: the special token the chat template renders right after an assistant
    message's content (``<|im_end|>`` in ChatML, ``<|eot_id|>`` in Llama 3, ``<end_of_turn>`` in Gemma,
    ``<|end|>`` in Phi-3), else EOS (a template that ends turns with EOS, or with plain text).

    SFT trains answers to end with it, so a policy stops where its template ends a turn.
    """
    def compute():
        end = None
        if tokenizer.chat_template:
            full = tokenizer.apply_chat_template(_probe(tokenizer), tokenize=False)
            k = full.rfind(PROBE_ANSWER)
            if k >= 0:
                after = tokenizer(full[k + len(PROBE_ANSWER):].lstrip(), add_special_tokens=False)["input_ids"]
                if after and after[0] in _special_ids(tokenizer):
                    end = after[0]
        if end is None or end == tokenizer.bos_token_id != tokenizer.eos_token_id:
            end = tokenizer.eos_token_id
        if end is None:
            raise TokenizerError("the tokenizer has no eos_token and its chat template ends an assistant turn "
                                 "with no special token: alignkit needs one of them to end answers")
        return end

    return _cached(tokenizer, "answer_end", compute)


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every token that ends a response, in order: EOS, the template's end of turn (:func:`answer_end_id`), then
    the model's own ``generation_config.eos_token_id`` entries that are tokens of this tokenizer."""
    ids = [tokenizer.eos_token_id, answer_end_id(tokenizer)]
    extra = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    ids += [extra] if isinstance(extra, int) else list(extra or [])
    return [i for i in dict.fromkeys(ids) if i is not None and 0 <= i < len(tokenizer)]


def check_chat_template(tokenizer) -> None:
    """Raise TokenizerError unless the chat template renders a conversation the way SFT's loss needs it:
    the generation prompt (what PPO samples after) is the start of the whole conversation, the assistant's
    message follows it directly, and a ``{% generation %}`` block marks exactly the answer (+ its end token)."""
    if not tokenizer.chat_template:
        return
    user = _probe(tokenizer)[:1]
    try:
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(_probe(tokenizer), tokenize=False)
    except Exception as e:  # jinja errors of all kinds
        raise TokenizerError(f"chat_template: cannot render a user/assistant conversation: {e}") from None
    where = f"chat_template: rendering [user, assistant] gives {full!r}"
    if PROBE_ANSWER not in full:
        raise TokenizerError(f"{where}, without the assistant's message: SFT would have no answer to train on")
    if not full.startswith(prompt):
        raise TokenizerError(f"{where}, which does not start with the generation prompt {prompt!r} that PPO "
                             "samples after: answers would be trained in another context than they are generated in")
    between = full[len(prompt):full.index(PROBE_ANSWER, len(prompt))] if PROBE_ANSWER in full[len(prompt):] else None
    if between is None or between.strip():
        raise TokenizerError(f"{where}: the template puts {between!r} between the generation prompt and the "
                             "assistant's message, where alignkit's answers start")
    if re.search(r"{%-?\s*generation\s*-?%}", tokenizer.chat_template):
        rendered = tokenizer.apply_chat_template(_probe(tokenizer), tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=True)
        marked = [t for t, m in zip(rendered["input_ids"], rendered["assistant_masks"]) if m]
        ours = encode_answer(tokenizer, PROBE_ANSWER)
        # Compared as text: a SentencePiece tokenizer splits "\nanswer" in context differently from "answer".
        text = [tokenizer.decode(ids, skip_special_tokens=False).strip() for ids in (marked, ours, ours[:-1])]
        if text[0] not in text[1:]:
            raise TokenizerError(f"chat_template: its {{% generation %}} block marks "
                                 f"{tokenizer.convert_ids_to_tokens(marked)} as the assistant's tokens, but SFT "
                                 f"trains on {tokenizer.convert_ids_to_tokens(ours)}")


def unknown_token_share(tokenizer, texts: list[str]) -> float:
    """Share of the tokens of ``texts`` that are the tokenizer's unknown token (0.0 when it has none):
    a reward model whose tokenizer cannot read the policy's text scores ``<unk>`` soup."""
    unk = tokenizer.unk_token_id
    if unk is None or not texts:
        return 0.0
    ids = [i for t in texts for i in tokenizer(t, add_special_tokens=False)["input_ids"]]
    return sum(i == unk for i in ids) / max(1, len(ids))


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The chat-templated prompt with the generation prompt, carrying exactly one BOS when the tokenizer
    starts every text with one (templates that write ``{{ bos_token }}`` and those that do not alike)."""
    ids = _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    if adds_bos(tokenizer):
        bos = tokenizer.bos_token_id
        if ids[:1] != [bos]:
            ids = [bos] + ids
        while ids[:2] == [bos, bos]:
            ids = ids[1:]
    return ids


def encode_answer(tokenizer, answer: str) -> list[int]:
    """The answer's tokens and the token that ends it (:func:`answer_end_id`)."""
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [answer_end_id(tokenizer)]


@dataclass
class Encoded:
    prompt_ids: list[int]
    answer_ids: list[int]
    source: str


def fit_length(prompt_ids, answer_ids, max_length, policy, where, problems) -> tuple[list, list] | None:
    """Apply the truncation policy; return None (and maybe record a problem) when the row is out."""
    n = len(prompt_ids) + len(answer_ids)
    if n <= max_length:
        return prompt_ids, answer_ids
    if policy == "error":
        problems.append(f"{where}: answers: {n} tokens (prompt {len(prompt_ids)} + answer {len(answer_ids)}) "
                        f"exceed data.max_length={max_length}; raise max_length or set data.truncation=truncate|drop")
        return None
    if policy == "drop":
        return None
    # truncate: keep the whole prompt when possible (cut the answer's end); otherwise keep the
    # prompt's end (the latest turns matter most) and at least a few answer tokens.
    keep_answer = max(max_length - len(prompt_ids), min(len(answer_ids), max_length // 4))
    answer_ids = answer_ids[:keep_answer]
    prompt_ids = prompt_ids[-(max_length - len(answer_ids)):]
    return prompt_ids, answer_ids


def encode_pairs(tokenizer, pairs: list[tuple[Example, str]], max_length: int, policy: str) -> tuple[list[Encoded], int]:
    """Tokenize (example, answer) pairs; all over-length rows are reported together.

    Returns the encoded rows and how many were dropped.
    """
    problems: list[str] = []
    out, dropped = [], 0
    prompt_cache: dict[str, list[int]] = {}
    for ex, answer in pairs:
        key = repr(ex.prompt)
        if key not in prompt_cache:
            prompt_cache[key] = encode_prompt(tokenizer, ex.messages)
        fitted = fit_length(prompt_cache[key], encode_answer(tokenizer, answer), max_length, policy, ex.source,
                            problems)
        if fitted is None:
            dropped += 1
            continue
        out.append(Encoded(fitted[0], fitted[1], ex.source))
    if problems:
        raise DataError(problems)
    return out, dropped


def sft_rows(encoded: list[Encoded], max_length: int, packing: bool) -> list[dict]:
    """Rows of input_ids/labels/position_ids/seq_lens; with packing, several examples per row.

    Packing is best-fit decreasing: examples sorted by length go into the fullest row
    that still has room, so rows are nearly full and no tokens are cut.
    """
    items = []
    for e in encoded:
        ids = e.prompt_ids + e.answer_ids
        labels = [IGNORE_INDEX] * len(e.prompt_ids) + e.answer_ids
        items.append((ids, labels))
    if not packing:
        return [{"input_ids": ids, "labels": lab, "position_ids": list(range(len(ids))), "seq_lens": [len(ids)]}
                for ids, lab in items]
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order:
        n = len(items[i][0])
        best, best_space = -1, max_length + 1
        for b, s in enumerate(space):  # few bins are open at once for short data; fine at this scale
            if n <= s < best_space:
                best, best_space = b, s
        if best < 0:
            bins.append([i])
            space.append(max_length - n)
        else:
            bins[best].append(i)
            space[best] -= n
    rows = []
    for b in bins:
        row = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
        for i in sorted(b):
            ids, lab = items[i]
            row["input_ids"] += ids
            row["labels"] += lab
            row["position_ids"] += list(range(len(ids)))
            row["seq_lens"].append(len(ids))
        rows.append(row)
    return rows


def block_causal_mask(seq_lens_batch: list[list[int]], length: int) -> torch.Tensor:
    """(B, 1, L, L) bool mask: causal within each packed example, nothing across examples or into padding.

    position_ids alone do not isolate packed examples under sdpa; this mask does.
    """
    B = len(seq_lens_batch)
    seg = torch.full((B, length), -1, dtype=torch.long)
    for b, lens in enumerate(seq_lens_batch):
        start = 0
        for j, n in enumerate(lens):
            seg[b, start:start + n] = j
            start += n
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    mask = same & causal
    # Padding rows attend to themselves only, so softmax never sees an all-masked row.
    mask |= torch.eye(length, dtype=torch.bool)[None]
    return mask[:, None]


def packed_attention_mask(mask: torch.Tensor, attn_implementation: str | None) -> torch.Tensor:
    """A (B, 1, L, L) bool "may attend" mask in the form ``attn_implementation`` reads it.

    transformers hands a 4D mask to the attention code as it is: sdpa takes a boolean mask,
    but eager attention *adds* the mask to the scores, so a boolean one would add 1 where
    attention is allowed and 0 where it is not (examples would see each other and the
    future). Eager gets 0 / the float minimum instead. Other kernels (flash, flex) cannot
    take such a mask: packing is refused for them.
    """
    impl = attn_implementation or "sdpa"
    if impl == "eager":
        return torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, torch.finfo(torch.float32).min)
    if impl not in PACKING_ATTENTION and impl != "sdpa_fp32":  # sdpa_fp32: engine.use_fp32_attention_on_cpu
        raise ConfigError(f"data.packing: model.attn_implementation={impl} cannot isolate packed examples (it takes "
                          f"no 4D mask); use {' or '.join(PACKING_ATTENTION)}, or set data.packing=false")
    return mask


def collate_sft(rows: list[dict], pad_token_id: int, pad_to_multiple_of: int = 1,
                attn_implementation: str | None = "sdpa") -> dict:
    length = max(len(r["input_ids"]) for r in rows)
    length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    B = len(rows)
    input_ids = torch.full((B, length), pad_token_id, dtype=torch.long)
    labels = torch.full((B, length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, length), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[b, :n] = torch.tensor(r["input_ids"])
        labels[b, :n] = torch.tensor(r["labels"])
        position_ids[b, :n] = torch.tensor(r["position_ids"])
    packed = any(len(r["seq_lens"]) > 1 for r in rows)
    if packed:
        attention_mask = packed_attention_mask(block_causal_mask([r["seq_lens"] for r in rows], length),
                                               attn_implementation)
    else:
        attention_mask = torch.zeros((B, length), dtype=torch.long)
        for b, r in enumerate(rows):
            attention_mask[b, :len(r["input_ids"])] = 1
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": attention_mask,
            "num_tokens": torch.tensor(sum(len(r["input_ids"]) for r in rows))}


def right_pad(seqs: list[list[int]], pad_token_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id sequences -> right-padded (N, L) input ids and their 0/1 attention mask."""
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), pad_token_id if pad_token_id is not None else 0, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, :len(s)] = 1
    return input_ids, attention_mask
