"""Tiny random-weight models of real families, built offline, each with a tokenizer in its family's convention.

The matrix (one row per family; every convention alignkit must handle appears at least once):

| family  | architecture      | tokenizer                         | BOS added by      | pad token        | padding | chat template (turn end)                  |
|---------|-------------------|-----------------------------------|-------------------|------------------|---------|-------------------------------------------|
| gpt2    | GPT2LMHeadModel   | byte-level BPE                    | -                 | none (pad = EOS) | right   | none (alignkit's default; EOS)            |
| llama3  | LlamaForCausalLM  | byte-level BPE                    | tokenizer+template| none (pad = EOS) | right   | Llama 3 headers (<|eot_id|>)              |
| neox    | GPTNeoXForCausalLM| byte-level BPE (Pythia)           | -                 | <|padding|>      | left    | Zephyr-style, turn ends with EOS          |
| qwen2   | Qwen2ForCausalLM  | byte-level BPE                    | -                 | = EOS, explicit  | right   | ChatML + {% generation %} (<|im_end|>)    |
| mistral | MistralForCausalLM| SentencePiece-style BPE (Metaspace)| tokenizer+template| none (pad = EOS) | right   | [INST] ... [/INST] answer</s> (EOS)       |
| gemma2  | Gemma2ForCausalLM | SentencePiece-style Unigram       | tokenizer+template| <pad>            | right   | <start_of_turn> (<end_of_turn>)           |
| phi3    | Phi3ForCausalLM   | SentencePiece-style BPE (Metaspace)| tokenizer only    | <pad>            | left    | <|user|> ... <|end|> (<|end|>)            |
| opt     | OPTForCausalLM    | byte-level BPE, BOS = EOS = </s>  | tokenizer         | <pad>            | right   | none (alignkit's default; EOS)            |

Gemma 2 has no sdpa in transformers 5 (eager only) and a sliding window (16 here) shorter than the data's
sequences, so its local layers really slide. Every folder also has a ``generation_config.json`` with
sampling options alignkit must not inherit (temperature, top_p, top_k, min_p, repetition_penalty,
no_repeat_ngram_size, typical_p), and the
family's stop ids as ``eos_token_id`` (EOS and end-of-turn, as Llama 3 / Gemma / Qwen ship them).
``qwen2`` also lists EOS and ``<|im_end|>`` under ``suppress_tokens`` (issue 9, error 2: sampling that
obeys it never ends a response).

``build_family(name, folder)`` writes one family with ``save_pretrained`` (safetensors) and
``tokenizer.save_pretrained``, so ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained(folder)``
load it like a Hub checkpoint; ``build_all(root)`` writes every family (about a second on one core).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field

from alignkit import builtin


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str  # transformers' model_type (AutoConfig.for_model)
    tokenizer: str  # "byte_bpe", "metaspace_bpe" or "unigram"
    bos: str | None  # BOS token (None: the family has none)
    eos: str
    pad: str | None  # its own pad token (None: pad = EOS, set by alignkit's load_tokenizer)
    padding_side: str
    add_bos: bool  # the tokenizer's post-processor puts BOS in front of every encoding
    template: str | None  # chat template (None: the family ships none)
    turn_end: str  # the token the template puts right after an assistant message's content
    extra_special: tuple = ()  # role / turn tokens that must stay single tokens
    config: dict = field(default_factory=dict)  # architecture-specific sizes
    generation: dict = field(default_factory=dict)  # extra generation_config.json fields


SAMPLING = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.05,
            "repetition_penalty": 1.3, "no_repeat_ngram_size": 3, "typical_p": 0.95}

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CHATML_GENERATION_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ message['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST] {{ message['content'] }} "
    "[/INST]{% elif message['role'] == 'assistant' %} {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n{{ message['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}"
)

FAMILIES = [
    Family("gpt2", "gpt2", "byte_bpe", bos=None, eos="<|endoftext|>", pad=None, padding_side="right", add_bos=False,
           template=None, turn_end="<|endoftext|>",
           config=dict(n_embd=32, n_layer=2, n_head=4, n_positions=256)),
    Family("llama3", "llama", "byte_bpe", bos="<|begin_of_text|>", eos="<|end_of_text|>", pad=None,
           padding_side="right", add_bos=True, template=LLAMA3_TEMPLATE, turn_end="<|eot_id|>",
           extra_special=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
           config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)),
    Family("neox", "gpt_neox", "byte_bpe", bos=None, eos="<|endoftext|>", pad="<|padding|>", padding_side="left",
           add_bos=False, template=ZEPHYR_TEMPLATE, turn_end="<|endoftext|>",
           extra_special=("<|system|>", "<|user|>", "<|assistant|>"),
           config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=256, tie_word_embeddings=False)),
    Family("qwen2", "qwen2", "byte_bpe", bos=None, eos="<|endoftext|>", pad="<|endoftext|>", padding_side="right",
           add_bos=False, template=CHATML_GENERATION_TEMPLATE, turn_end="<|im_end|>",
           extra_special=("<|im_start|>", "<|im_end|>"),
           config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True),
           generation={"suppress_tokens": ["<|endoftext|>", "<|im_end|>"]}),
    Family("mistral", "mistral", "metaspace_bpe", bos="<s>", eos="</s>", pad=None, padding_side="right",
           add_bos=True, template=MISTRAL_TEMPLATE, turn_end="</s>",
           config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=None)),
    Family("gemma2", "gemma2", "unigram", bos="<bos>", eos="<eos>", pad="<pad>", padding_side="right", add_bos=True,
           template=GEMMA_TEMPLATE, turn_end="<end_of_turn>", extra_special=("<start_of_turn>", "<end_of_turn>"),
           config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, max_position_embeddings=256,
                       sliding_window=16)),
    Family("phi3", "phi3", "metaspace_bpe", bos="<s>", eos="<|endoftext|>", pad="<pad>", padding_side="left",
           add_bos=True, template=PHI3_TEMPLATE, turn_end="<|end|>",
           extra_special=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
           config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, max_position_embeddings=256, original_max_position_embeddings=256,
                       tie_word_embeddings=False)),
    Family("opt", "opt", "byte_bpe", bos="</s>", eos="</s>", pad="<pad>", padding_side="right", add_bos=True,
           template=None, turn_end="</s>",
           config=dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                       word_embed_proj_dim=32, max_position_embeddings=256)),
]
BY_NAME = {f.name: f for f in FAMILIES}
NAMES = [f.name for f in FAMILIES]


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[str, ...]:
    """The built-in task's text (prompts, answers, the role words of the templates), for training tokenizers."""
    texts = []
    for kind, n in (("sft", 400), ("pairs", 200)):
        for ex in builtin.make_examples(kind, n, seed=7):
            texts.append(ex.prompt if isinstance(ex.prompt, str) else " ".join(m["content"] for m in ex.prompt))
            texts.extend(ex.answers)
    # Template text around the messages, newlines included, so no family reads its own template as <unk>.
    texts += [f"user\n{t}\nassistant\n\nmodel\n[INST] {t} [/INST]" for t in texts[:100]]
    texts += ["user assistant system model", " ".join(builtin.vocabulary()[4:])]
    return tuple(texts)


def _specials(fam: Family) -> list[str]:
    out = []
    for t in (fam.pad, fam.bos, fam.eos, "<unk>" if fam.tokenizer != "byte_bpe" else None, *fam.extra_special):
        if t is not None and t not in out:
            out.append(t)
    return out


def build_tokenizer(fam: Family):
    """A fast tokenizer trained offline on ``corpus()`` in ``fam``'s convention, wrapped for ``AutoTokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = _specials(fam)
    if fam.tokenizer == "byte_bpe":  # GPT-2 / Llama 3 / Qwen / Pythia / OPT
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,  # 256 bytes + merges
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    elif fam.tokenizer == "metaspace_bpe":  # Llama 2 / Mistral / Phi-3 (SentencePiece BPE)
        tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    elif fam.tokenizer == "unigram":  # Gemma (SentencePiece unigram)
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=specials, unk_token="<unk>",
                                          show_progress=False)
    else:
        raise ValueError(f"unknown tokenizer kind {fam.tokenizer!r}")
    tok.train_from_iterator(corpus(), trainer)
    if fam.add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos} $B", special_tokens=[(fam.bos, tok.token_to_id(fam.bos))])
    kwargs = {k: v for k, v in (("bos_token", fam.bos), ("eos_token", fam.eos), ("pad_token", fam.pad),
                                ("unk_token", "<unk>" if fam.tokenizer != "byte_bpe" else None)) if v is not None}
    extra = [t for t in fam.extra_special if t not in kwargs.values()]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side=fam.padding_side,
                                   additional_special_tokens=extra, model_max_length=256, **kwargs)
    if fam.template is not None:
        fast.chat_template = fam.template
    return fast


def build_model(fam: Family, tokenizer, seed: int = 0):
    """A randomly initialised causal LM of ``fam``'s architecture over ``tokenizer``'s vocabulary."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in (("bos", fam.bos), ("eos", fam.eos)) if t is not None}
    config = AutoConfig.for_model(fam.model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=ids.get("bos"), eos_token_id=ids["eos"], **fam.config)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def generation_config(fam: Family, tokenizer, **overrides) -> dict:
    """The family's generation_config.json: sampling options, and every stop id as ``eos_token_id``."""
    stops = [tokenizer.convert_tokens_to_ids(t) for t in dict.fromkeys([fam.eos, fam.turn_end])]
    out = {**SAMPLING, "eos_token_id": stops if len(stops) > 1 else stops[0],
           "pad_token_id": tokenizer.pad_token_id if fam.pad is not None else None}
    if fam.bos is not None:
        out["bos_token_id"] = tokenizer.convert_tokens_to_ids(fam.bos)
    for key, value in {**fam.generation, **overrides}.items():
        out[key] = [tokenizer.convert_tokens_to_ids(t) for t in value] if key == "suppress_tokens" else value
    return {k: v for k, v in out.items() if v is not None}


def write_generation_config(folder: str, config: dict) -> None:
    with open(os.path.join(folder, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def build_family(name: str, folder: str) -> str:
    """Write family ``name`` (model, tokenizer, generation_config.json) into ``folder``; return it."""
    fam = BY_NAME[name]
    tokenizer = build_tokenizer(fam)
    model = build_model(fam, tokenizer)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    write_generation_config(folder, generation_config(fam, tokenizer))
    return folder


def build_all(root: str) -> dict[str, str]:
    return {name: build_family(name, os.path.join(root, name)) for name in NAMES}
