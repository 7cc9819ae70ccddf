"""Rollouts: prompts -> sampled responses -> scores and log-probs, as one typed batch.

Used by PPO's loop, its held-out evaluation and the pipeline report. Sampling draws from
``softmax(logits / T)`` and nothing else: the model's ``generation_config.json``
(repetition_penalty, top_p, top_k, min_p, no_repeat_ngram_size, suppress_tokens ...) is set
aside while sampling, because the log-probs, KL and ratios PPO computes are those of that
distribution (Huang et al. 2024). Every stop token (EOS and the chat template's end of
turn, ``tokenization.stop_token_ids``) ends a response; tokens after it are masked everywhere.
"""

from __future__ import annotations

import functools
import inspect
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Optional

import torch

from alignkit.adapters import adapters_off
from alignkit.config import DataConfig
from alignkit.losses import logprobs_from_logits, sequence_kl
from alignkit.modeling import is_peft
from alignkit.schema import DataError, RowAccount, load_examples, prompts as prompt_view, select_rows
from alignkit.tokenization import encode_prompt, fit_length, stop_token_ids


@dataclass
class Prompt:
    example: object  # schema.Example: its prompt feeds the reward model as text
    ids: list  # policy tokens of the chat-templated prompt


def load_prompts(files: list[str], tokenizer, data: DataConfig, seed: int, limit: int = 0,
                 split: str = "train") -> tuple[list[Prompt], RowAccount]:
    """Prompts for rollouts, validated and tokenized, and the account of the rows read; every problem is
    reported before training."""
    examples, account = select_rows(load_examples(files, seed=seed), "ppo", data.on_unusable,
                                    data.max_unusable_fraction, split)
    examples = prompt_view(examples)
    if limit:
        examples = examples[:limit]
    if not examples:
        raise DataError([f"{', '.join(files)}: prompt: no prompts found"])
    problems, out = [], []
    for ex in examples:
        ids = encode_prompt(tokenizer, ex.messages)
        # The answer is generated later; room is left for nothing but the prompt itself.
        fitted = fit_length(ids, [], data.max_length, data.truncation, ex.source, problems)
        if fitted is not None:
            out.append(Prompt(ex, fitted[0]))
        elif data.truncation == "drop":
            account.leave_out(ex, "prompt", f"is longer than data.max_length={data.max_length} (data.truncation=drop)")
    if problems:
        raise DataError([p.replace("answers:", "prompt:") for p in problems])
    if not out:
        raise DataError([f"{', '.join(files)}: prompt: every prompt is longer than data.max_length={data.max_length}"])
    return out, account


def prompt_batch(prompts: list[Prompt], update: int, batch_size: int, rank: int, world: int, seed: int):
    """This process's prompts for PPO update ``update``: a seeded permutation per pass over the data."""
    per_update = batch_size * world
    per_epoch = max(1, len(prompts) // per_update)
    epoch, k = divmod(update, per_epoch)
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(prompts), generator=g).tolist()
    if len(order) < per_update:  # fewer prompts than a batch: repeat them
        order = (order * math.ceil(per_update / len(order)))[:per_update]
    start = k * per_update + rank * batch_size
    return [prompts[i] for i in order[start:start + batch_size]], epoch


def left_pad(seqs: list[list[int]], pad_id: int):
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, length - len(s):] = torch.tensor(s)
        mask[i, length - len(s):] = 1
    return ids, mask


def unwrap(model):
    """The Hugging Face model under DDP / accelerate / peft wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if is_peft(model) else model


@contextmanager
def plain_sampling(model):
    """Set the model's own generation defaults aside: transformers 5 fills every generation field a
    call leaves unset from ``model.generation_config`` (a Hub model's ``generation_config.json``)."""
    from transformers import GenerationConfig

    hf = unwrap(model)
    saved = hf.generation_config
    hf.generation_config = GenerationConfig()
    try:
        yield
    finally:
        hf.generation_config = saved


def stop_ids(model, tokenizer) -> list[int]:
    """What ends a response: EOS, the chat template's end of turn, and the model's own generation eos ids."""
    return stop_token_ids(tokenizer, unwrap(model).generation_config)


@torch.no_grad()
def sample(model, b_query, b_query_mask, tokenizer, response_length: int, temperature: float):
    """Sample (B, response_length) tokens from ``softmax(logits / temperature)`` with the KV cache,
    from left-padded prompts; generation stops at any of :func:`stop_ids`."""
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                           max_new_tokens=response_length, min_new_tokens=0,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids(model, tokenizer),
                           use_cache=True)
    with plain_sampling(model):
        out = model.generate(input_ids=b_query, attention_mask=b_query_mask, generation_config=gen)
    response = out[:, b_query.shape[1]:]
    if response.shape[1] < response_length:  # every row stopped early
        pad = response.new_full((response.shape[0], response_length - response.shape[1]), tokenizer.pad_token_id)
        response = torch.cat([response, pad], dim=1)
    return response


def truncate_after_eos(b_response, stop_ids, pad_id: int):
    """Keep each response up to and including its first stop token (an id or a list of ids); mask and
    pad everything after. Returns (response, response_mask (B, R) bool, ended (B,) bool)."""
    stop = torch.as_tensor(stop_ids, device=b_response.device).flatten()
    is_stop = torch.isin(b_response, stop)
    ended = is_stop.any(-1)
    R = b_response.shape[1]
    first = torch.where(ended, is_stop.int().argmax(-1), torch.full_like(ended, R, dtype=torch.long))
    positions = torch.arange(R, device=b_response.device)[None]
    response_mask = positions <= first[:, None]
    return torch.where(response_mask, b_response, torch.full_like(b_response, pad_id)), response_mask, ended


def sequence_inputs(b_query, b_query_mask, b_response, b_response_mask):
    """Prompt + response: input ids, attention mask (no left pad, nothing after EOS), positions."""
    input_ids = torch.cat([b_query, b_response], dim=1)
    attention_mask = torch.cat([b_query_mask.long(), b_response_mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def forward_response(model, input_ids, attention_mask, position_ids, context_length: int, temperature: float):
    """Policy logits (B, R, V) for the response tokens and their log-probs (B, R) at ``temperature``.

    Only the last R + 1 positions go through the LM head (``logits_to_keep``, where the model
    takes it): the prompt positions' (B, L, V) logits are the largest activation for real vocabularies.
    """
    n_response = input_ids.shape[1] - context_length
    keep = {"logits_to_keep": n_response + 1} if _takes_logits_to_keep(model) else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False, **keep).logits
    logits = logits[:, -(n_response + 1):-1]  # position t predicts token t + 1
    return logits, logprobs_from_logits(logits, input_ids[:, context_length:], temperature)


def _takes_logits_to_keep(model) -> bool:
    return _forward_takes_logits_to_keep(type(unwrap(model)))


@functools.lru_cache(maxsize=None)
def _forward_takes_logits_to_keep(model_class) -> bool:  # once per class, not per forward pass
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


@dataclass
class Rollout:
    """One rollout batch: ``b_`` tensors of PPO's loop, (B, P) prompt, (B, R) response, (B, P + R) sequence."""

    query: torch.Tensor  # left-padded prompt ids (B, P)
    query_mask: torch.Tensor
    response: torch.Tensor  # (B, R), pad after the stop token
    response_mask: torch.Tensor  # (B, R) bool: response tokens up to and including the stop token
    ended: torch.Tensor  # (B,) bool: the response emitted a stop token
    input_ids: torch.Tensor  # prompt + response (B, P + R)
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompts: list  # prompt texts or conversations, as the reward reads them
    texts: list[str]  # decoded responses without their stop token
    scores: torch.Tensor  # (B,) reward
    logprobs: torch.Tensor  # (B, R) policy log-probs of the sampled tokens at the sampling temperature
    ref_logprobs: torch.Tensor  # (B, R) reference log-probs, same temperature
    gold: Optional[torch.Tensor] = None  # (B,) the built-in task's gold reward, when known

    @property
    def context_length(self) -> int:
        return self.query.shape[1]


@torch.no_grad()
def rollout(policy, reference, reward, prompts: list[Prompt], tokenizer, response_length: int, temperature: float,
            chunk: int, device, with_gold: bool = False) -> Rollout:
    """Sample, score and compare with the reference on ``prompts``.

    ``reference`` is a model or None (LoRA: the policy with its adapter disabled).
    """
    b_query, b_query_mask = left_pad([p.ids for p in prompts], tokenizer.pad_token_id)
    b_query, b_query_mask = b_query.to(device), b_query_mask.to(device)
    P = b_query.shape[1]
    responses = [sample(policy, b_query[i:i + chunk], b_query_mask[i:i + chunk], tokenizer, response_length,
                        temperature) for i in range(0, len(prompts), chunk)]
    b_response, b_response_mask, b_ended = truncate_after_eos(torch.cat(responses), stop_ids(policy, tokenizer),
                                                              tokenizer.pad_token_id)
    # Drop the columns after the longest response: they are masked in every row, so they change
    # nothing, but every later pass (log-probs, values, PPO epochs) would pay for them.
    width = int(b_response_mask.any(0).nonzero().max()) + 1  # column 0 is always kept
    b_response, b_response_mask = b_response[:, :width], b_response_mask[:, :width]
    b_input_ids, b_attention_mask, b_position_ids = sequence_inputs(b_query, b_query_mask, b_response,
                                                                    b_response_mask)
    texts = decode_responses(tokenizer, b_response, b_response_mask, b_ended)
    prompt_values = [p.example.prompt for p in prompts]
    b_scores = reward(prompt_values, texts, b_ended.tolist()).to(device)
    logprobs, ref_logprobs = [], []
    for i in range(0, len(prompts), chunk):
        args = (b_input_ids[i:i + chunk], b_attention_mask[i:i + chunk], b_position_ids[i:i + chunk], P, temperature)
        logprobs.append(forward_response(policy, *args)[1])
        with adapters_off(policy) if reference is None else nullcontext():
            ref_logprobs.append(forward_response(reference if reference is not None else policy, *args)[1])
    gold = None
    if with_gold:
        from alignkit.tasks import gold_reward  # each prompt by its own task

        gold = torch.tensor(gold_reward(prompt_values, texts), dtype=torch.float32)
    return Rollout(b_query, b_query_mask, b_response, b_response_mask, b_ended, b_input_ids, b_attention_mask,
                   b_position_ids, prompt_values, texts, b_scores, torch.cat(logprobs), torch.cat(ref_logprobs), gold)


def decode_responses(tokenizer, b_response, b_response_mask, b_ended) -> list[str]:
    texts = []
    for row, m, e in zip(b_response, b_response_mask, b_ended):
        ids = row[m].tolist()
        if e:
            ids = ids[:-1]  # the stop token itself is not text; the reward model adds its own
        texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts


def evaluate(policy, reference, reward, prompts, tokenizer, response_length: int, temperature: float, chunk, device,
             with_gold, seed, accelerator=None) -> dict:
    """Held-out metrics: mean score, gold reward (and its std), KL per response, length, stop share.

    With several processes each answers its share of the prompts and the per-response
    values of all processes are gathered, so every process returns the metrics of all prompts.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = prompts[rank::world]
    rows = []
    if mine:
        state = torch.random.get_rng_state()
        torch.manual_seed(seed + rank)  # the same sampling noise before and after training
        r = rollout(policy, reference, reward, mine, tokenizer, response_length, temperature, chunk, device, with_gold)
        torch.random.set_rng_state(state)
        kl = sequence_kl(r.logprobs, r.ref_logprobs, r.response_mask)
        columns = [r.scores.float(), kl.float(), r.response_mask.sum(-1).float(), r.ended.float()]
        if with_gold:
            columns.append(r.gold.float())
        rows = torch.stack([c.cpu() for c in columns], -1).tolist()
    if world > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    t = torch.tensor(rows, dtype=torch.float32)
    out = {"eval/score": t[:, 0].mean().item(), "eval/kl": t[:, 1].mean().item(),
           "eval/response_length": t[:, 2].mean().item(), "eval/eos_share": t[:, 3].mean().item(),
           "eval/responses": len(rows)}
    if with_gold:
        out["eval/gold_reward"] = t[:, 4].mean().item()
        out["eval/gold_reward_std"] = t[:, 4].std().item()
    return out
