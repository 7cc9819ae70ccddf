"""Loading and saving models: Hub ids, local folders and the built-in default, through
the same ``from_pretrained`` path; LoRA via peft; 8-/4-bit via bitsandbytes."""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from alignkit.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Used when a tokenizer has no chat template of its own.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}### System:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### User:\n{{ message['content'] }}\n\n"
    "{% else %}### Assistant:\n{{ message['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


class ModelLoadError(ValueError):
    pass


def resolve_path(name_or_path: str) -> str:
    """builtin:* -> the built folder; a local path must exist; anything else is a Hub id."""
    if name_or_path.startswith("builtin:"):
        from alignkit.builtin import ensure_model

        return ensure_model(name_or_path)
    # Hub ids are "name" or "org/name"; anything else is meant as a folder.
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    path = os.path.expanduser(name_or_path)
    if os.path.exists(path):
        return path
    if looks_local:
        raise ModelLoadError(f"model path not found: {name_or_path}")
    return name_or_path


def load_tokenizer(cfg: ModelConfig, padding_side: str = "right"):
    """The model's tokenizer, checked before any training: it can end an answer (EOS or a chat template's
    end-of-turn token), has a pad token (EOS when it has none) and a chat template (alignkit's default when
    it has none) that renders a conversation where SFT's loss needs it. Bad tokenizers raise ModelLoadError."""
    from transformers import AutoTokenizer

    from alignkit.tokenization import TokenizerError, answer_end_id, check_chat_template

    where = cfg.tokenizer or cfg.name_or_path
    path = resolve_path(where)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load tokenizer from {where}: {e}") from None
    if not tok.chat_template:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    try:
        check_chat_template(tok)
        if tok.eos_token is None:  # e.g. a chat tokenizer whose turns end with <|im_end|> and no EOS of its own
            tok.eos_token = tok.convert_ids_to_tokens(answer_end_id(tok))
    except TokenizerError as e:
        raise ModelLoadError(f"tokenizer {where}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


class _DropKernelsFallbackWarning:
    """bitsandbytes warns at import, on CPUs with AVX512-BF16, that the optional ``kernels`` package is
    missing; it then uses its own CPU kernel, so there is nothing for the user to do."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


def _quantization(cfg: ModelConfig):
    if not (cfg.load_in_8bit or cfg.load_in_4bit):
        return None
    import logging

    from transformers import BitsAndBytesConfig

    bnb_cpu = logging.getLogger("bitsandbytes.backends.cpu.ops")  # before bitsandbytes is first imported
    if not any(isinstance(f, _DropKernelsFallbackWarning) for f in bnb_cpu.filters):
        bnb_cpu.addFilter(_DropKernelsFallbackWarning())

    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = DTYPES["bfloat16"] if cfg.dtype == "float32" else DTYPES[cfg.dtype]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
                              bnb_4bit_compute_dtype=compute, bnb_4bit_use_double_quant=True)


def disable_dropout(model: torch.nn.Module) -> None:
    """RLHF needs deterministic log-probs: dropout off in every model (Huang et al. 2024)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def load_model(cfg: ModelConfig, *, task: str = "causal-lm", num_labels: int = 1, pad_token_id: int | None = None,
               trainable: bool = True, path: str | None = None):
    """Load a causal LM (``task="causal-lm"``) or a sequence-scoring model (``task="reward"``).

    ``path`` overrides ``cfg.name_or_path`` (e.g. a reward model initialised from an SFT output).
    LoRA (``cfg.lora.enabled``) wraps the model with peft; for a reward model the score
    head is fully trained and saved with the adapter (``modules_to_save``).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    where = path or cfg.name_or_path
    src = resolve_path(where)
    check_architecture(src, where, cfg.trust_remote_code, cfg.revision)
    kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, dtype=DTYPES[cfg.dtype],
                  attn_implementation=cfg.attn_implementation)
    quant = _quantization(cfg)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": _device()}
    try:
        if task == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
        elif task == "reward":
            # A causal LM's folder has no score head: transformers' multi-line load report about it becomes one
            # line; a report that comes with an error (e.g. a head of another size) goes into the error.
            with _captured_load_report() as report:
                try:
                    model, info = AutoModelForSequenceClassification.from_pretrained(
                        src, num_labels=num_labels, output_loading_info=True, **kwargs)
                except RuntimeError as e:
                    raise ModelLoadError(f"could not load {where} as a sequence classifier with num_labels="
                                         f"{num_labels}: {str(e).replace('the above report', 'the report below')}"
                                         f"\n{chr(10).join(report)}") from None
            _report_fresh_weights(info, where)
            if pad_token_id is not None:
                model.config.pad_token_id = pad_token_id
        else:
            raise ValueError(f"unknown task {task!r}")
    except OSError as e:
        raise ModelLoadError(f"could not load model {where}: {e}") from None
    except ModelLoadError:
        raise
    except ValueError as e:
        msg = str(e).split("\n")[0]
        if "attention" in msg.lower():  # transformers' message goes on with a Python example: its first sentence
            raise ModelLoadError(f"model.attn_implementation={cfg.attn_implementation}: {msg.split('. ')[0]}. Set "
                                 "model.attn_implementation=eager (every architecture has it).") from None
        raise ModelLoadError(f"could not load model {where} for task {task}: {msg}") from None
    if quant is not None and trainable:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing and trainable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled and trainable:
        model = add_lora(model, cfg, task)
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    elif (quant is not None) and trainable:
        raise ModelLoadError("8-/4-bit weights cannot be trained directly: set model.lora.enabled=true (QLoRA)")
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model


def check_architecture(src: str, where: str, trust_remote_code: bool = False, revision: str | None = None) -> None:
    """A model folder whose config.json names an architecture this transformers does not know: ModelLoadError."""
    import json

    import transformers
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(src, revision=revision, trust_remote_code=trust_remote_code)
    except (KeyError, ValueError) as e:
        named = {}
        config_path = os.path.join(src, "config.json")
        if os.path.exists(config_path):
            with open(config_path, encoding="utf-8") as f:
                raw = json.load(f)
            named = {k: raw[k] for k in ("model_type", "architectures") if k in raw}
        raise ModelLoadError(f"{where}/config.json: {named or 'its architecture'} is not an architecture "
                             f"transformers {transformers.__version__} knows ({str(e).splitlines()[0]}); upgrade "
                             "transformers, or set model.trust_remote_code=true if the model ships its own code "
                             "and you trust its author") from None
    except OSError:
        return  # no config to read (e.g. a Hub id offline): from_pretrained reports it


class _LoadReportFilter:
    """Keeps transformers' LOAD REPORT (a warning of ``transformers.modeling_utils``) instead of printing it."""

    def __init__(self):
        self.reports: list[str] = []

    def filter(self, record) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.reports.append(record.getMessage())
            return False
        return True


@contextmanager
def _captured_load_report():
    import logging

    logger, capture = logging.getLogger("transformers.modeling_utils"), _LoadReportFilter()
    logger.addFilter(capture)
    try:
        yield capture.reports
    finally:
        logger.removeFilter(capture)


# Weights a sequence classifier adds to a causal LM: starting a reward model from an SFT model leaves them fresh.
HEAD_NAMES = ("score", "classifier")


def _report_fresh_weights(info: dict, where: str) -> None:
    """One line for what transformers' load report would have said in a table: which weights start fresh."""
    missing = list(info.get("missing_keys", []))
    head = [k for k in missing if k.split(".")[0] in HEAD_NAMES]
    other = [k for k in missing if k not in head]
    if not _main_process():
        return
    if head:
        print(f"reward head initialised fresh: {', '.join(sorted(head))}", flush=True)
    if other:
        print(f"warning: {where}: {len(other)} weight(s) missing from the checkpoint, initialised at random: "
              f"{', '.join(sorted(other)[:5])}{' ...' if len(other) > 5 else ''}", flush=True)


def _main_process() -> bool:
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def add_lora(model, cfg: ModelConfig, task: str = "causal-lm", adapter_name: str = "default"):
    from peft import LoraConfig, TaskType, get_peft_model

    targets = cfg.lora.target_modules
    lora = LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=targets[0] if targets == ["all-linear"] else list(targets),
        task_type=TaskType.CAUSAL_LM if task == "causal-lm" else TaskType.SEQ_CLS,
        # The reward head starts random: train it fully and save it with the adapter.
        modules_to_save=["score"] if task == "reward" else None,
    )
    return get_peft_model(model, lora, adapter_name=adapter_name)


def _device():
    if torch.cuda.is_available():
        return torch.cuda.current_device()
    return "cpu"


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def save_model(model, tokenizer, out_dir: str, cfg: ModelConfig | None = None, state_dict: dict | None = None) -> None:
    """``save_pretrained`` (safetensors) of a full model or a LoRA adapter, plus the tokenizer.

    ``state_dict``: the full weights to write instead of the model's own (a sharded model's, gathered).

    With ``cfg.lora.merge_on_save`` also write ``<out_dir>_merged``: the base model with the
    adapter merged in, loadable without peft.
    """
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(out_dir)
    if cfg is not None and is_peft(model) and cfg.lora.merge_on_save:
        export_merged(out_dir, out_dir.rstrip("/") + "_merged", cfg)


def export_merged(adapter_dir: str, out_dir: str, cfg: ModelConfig, num_labels: int | None = None) -> str:
    """Load the unquantized base, apply the adapter from ``adapter_dir``, merge, and save.

    ``num_labels`` set means a reward model (sequence classification with that many outputs).
    """
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    base = resolve_path(PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path)
    # Quantized training still merges into full-precision weights.
    dtype = DTYPES["float32"] if cfg.load_in_4bit or cfg.load_in_8bit else DTYPES[cfg.dtype]
    tok = AutoTokenizer.from_pretrained(adapter_dir)
    if num_labels is not None:
        base_model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=num_labels, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        base_model.config.pad_token_id = tok.pad_token_id
    else:
        base_model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    merged = merge_lora(PeftModel.from_pretrained(base_model, adapter_dir))
    merged.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def merge_lora(peft_model):
    """``merge_and_unload``, untying the input and output embeddings first when the adapter changes one of them.

    With tied embeddings (many small models) ``lm_head.weight`` *is* the input embedding
    matrix: merging a LoRA on ``lm_head`` in place would rewrite the input embeddings too and
    change every logit. The merged model gets its own output matrix and ``tie_word_embeddings: false``.
    """
    hf = peft_model.get_base_model()
    inp, out = hf.get_input_embeddings(), hf.get_output_embeddings()
    if inp is not None and out is not None and (hasattr(inp, "base_layer") or hasattr(out, "base_layer")):
        out_layer = getattr(out, "base_layer", out)
        in_layer = getattr(inp, "base_layer", inp)
        if out_layer.weight.data_ptr() == in_layer.weight.data_ptr():
            out_layer.weight = torch.nn.Parameter(out_layer.weight.detach().clone(),
                                                  requires_grad=out_layer.weight.requires_grad)
            for config in {id(c): c for c in (hf.config, hf.config.get_text_config())}.values():
                config.tie_word_embeddings = False
    return peft_model.merge_and_unload()


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def same_vocab(tok_a, tok_b) -> bool:
    return tok_a.get_vocab() == tok_b.get_vocab()


def check_reference_vocab(policy_tok, policy_model, ref_path: str, cfg: ModelConfig, what: str = "ppo.reference") -> None:
    """A reference with a different vocabulary makes per-token log-ratios (KL, DPO) meaningless: refuse it.

    ``policy_model`` may be None (not loaded yet): then only the tokenizers are compared.
    """
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_path(ref_path)
    try:
        ref_cfg = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{what} {ref_path}: cannot read its config ({e})") from None
    n_policy = policy_model.get_input_embeddings().weight.shape[0] if policy_model is not None else None
    if n_policy is not None and getattr(ref_cfg, "vocab_size", n_policy) != n_policy:
        raise ModelLoadError(f"{what} {ref_path}: vocabulary of {ref_cfg.vocab_size} tokens, "
                             f"the policy has {n_policy}; the reference must share the policy's tokenizer")
    try:
        ref_tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError):
        return  # no tokenizer saved with the reference: the embedding size check above is all we have
    if not same_vocab(ref_tok, policy_tok):
        raise ModelLoadError(f"{what} {ref_path}: its tokenizer's vocabulary differs from the policy's "
                             f"({len(ref_tok)} vs {len(policy_tok)} tokens); the reference must share the policy's "
                             "tokenizer")


def check_packing_window(model, data) -> None:
    """Packing hands the attention one 4D mask per row, which replaces a sliding-window model's own window
    mask: with rows longer than the window, packed examples would attend further back than the model does."""
    if not data.packing:
        return
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    window = getattr(config, "sliding_window", None)
    if window is not None and window < data.max_length:
        from alignkit.config import ConfigError

        raise ConfigError(f"data.packing: {type(model).__name__} uses sliding-window attention (window {window}) "
                          f"shorter than data.max_length={data.max_length}; a packed row's mask would replace the "
                          "window. Set data.packing=false, or data.max_length <= the window")


# ----------------------------------------------------------------------------- score heads on a decoder


def backbone_and_head(model):
    """(backbone, head) of a decoder-style sequence-classification model, or None for others.

    Decoder reward and value models (Llama, GPT-2, Qwen, ...) apply a ``score`` linear head to
    every token's last hidden state; encoder models pool their own way and give None.
    """
    hf = model.get_base_model() if is_peft(model) else model
    backbone = getattr(hf, getattr(hf, "base_model_prefix", "model"), None)
    head = getattr(hf, "score", None)
    if not isinstance(backbone, torch.nn.Module) or not isinstance(head, torch.nn.Module):
        return None
    return backbone, head


def head_outputs(model, input_ids, attention_mask, position_ids=None, read_index=None) -> torch.Tensor:
    """A score head over a decoder's last hidden states: the one backbone-to-head path.

    ``model`` is a sequence-classification model (see :func:`backbone_and_head`) or an
    ``alignkit.adapters.AdapterHead`` (an adapter + head on a shared base). Returns (B, L, out)
    per token (value models), or (N, out) at ``read_index``: flat indices into the B * L
    tokens (reward models read one token per sequence; packed rows several per row).
    The head is per token, so this equals the model's own forward followed by its pooling.
    """
    if hasattr(model, "hidden_states"):  # AdapterHead
        hidden, head = model.hidden_states(input_ids, attention_mask, position_ids), model.head
    else:
        parts = backbone_and_head(model)
        if parts is None:
            raise ModelLoadError(f"{type(model).__name__}: needs a decoder-style sequence-classification model "
                                 "with a 'score' head")
        backbone, head = parts
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
    if read_index is not None:
        hidden = hidden.flatten(0, 1)[read_index]
    weight = getattr(head, "weight", None)
    return head(hidden.to(weight.dtype) if weight is not None and weight.is_floating_point() else hidden)
