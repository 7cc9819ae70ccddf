"""Loading and saving models: Hub ids, local folders and the built-in default, through
the same ``from_pretrained`` path; LoRA via peft; 8-/4-bit via bitsandbytes."""

from __future__ import annotations

import os
import re
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


def save_model(model, tokenizer, out_dir: str, cfg: ModelConfig | None = None) -> None:
    """``save_pretrained`` (safetensors) of a full model or a LoRA adapter, plus the tokenizer.

    With ``cfg.lora.merge_on_save`` also write ``<out_dir>_merged``: the base model with the
    adapter merged in, loadable without peft.
    """
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
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


# ----------------------------------------------------------------------------- one frozen base, several adapters


def is_adapter_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "adapter_config.json"))


def adapter_base(adapter_dir: str) -> str:
    """The resolved base model folder (or Hub id) a LoRA adapter folder was trained on."""
    from peft import PeftConfig

    return resolve_path(PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path)


def same_model_path(a: str, b: str) -> bool:
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


@contextmanager
def use_adapter(peft_model, name: str):
    """Run with adapter ``name`` active, leaving every parameter's ``requires_grad`` as it was.

    peft's ``set_adapter`` makes the active adapter trainable and freezes the others (and
    ``disable_adapter`` freezes them all); with several adapters on one base (a trainable
    policy and value, a frozen reward) that is wrong both ways, so the flags are put back
    right after each switch. :func:`adapters_off` is the same for "no adapter".
    """
    flags = [(p, p.requires_grad) for p in peft_model.parameters()]
    previous = peft_model.active_adapter

    def switch(adapter):
        peft_model.set_adapter(adapter)
        for p, flag in flags:
            p.requires_grad_(flag)

    switch(name)
    try:
        yield
    finally:
        switch(previous)


@contextmanager
def adapters_off(peft_model):
    """The base model alone (e.g. the PPO reference), every ``requires_grad`` flag kept as it was."""
    flags = [(p, p.requires_grad) for p in peft_model.parameters()]
    try:
        with peft_model.disable_adapter():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class AdapterHead(torch.nn.Module):
    """A linear head on the hidden states of one named LoRA adapter of a shared peft model: (B, L, out).

    The base weights exist once; each AdapterHead is a view of that network with its own
    adapter switched on (the adapter tensors live in the peft model, only ``head`` is this
    module's own). alignkit's low-memory PPO puts the value and reward models on the policy's base.
    """

    def __init__(self, peft_model, adapter: str, head: torch.nn.Linear):
        super().__init__()
        self.adapter, self.head = adapter, head
        self._peft = [peft_model]  # a list, so torch does not register the shared model as a submodule

    @property
    def peft_model(self):
        return self._peft[0]

    def forward(self, input_ids, attention_mask, position_ids=None):
        peft_model = self.peft_model
        hf = peft_model.get_base_model()
        backbone = getattr(hf, hf.base_model_prefix)
        # The backbone runs in eval mode here: no dropout, and no gradient checkpointing, whose layers
        # would be recomputed in backward under whichever adapter is active *then* (the policy's).
        training = backbone.training
        backbone.train(False)
        try:
            with use_adapter(peft_model, self.adapter):
                hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False).last_hidden_state
        finally:
            backbone.train(training)
        return self.head(hidden.to(self.head.weight.dtype))


def _adapter_path(adapter: str):
    return re.compile(rf"(\.lora_\w+\.){re.escape(adapter)}(?=\.|$)")


def adapter_tensor(param_name: str, adapter: str) -> bool:
    """Whether ``param_name`` is one of LoRA adapter ``adapter``'s tensors (``...lora_A.<adapter>.weight``),
    not a base weight that merely has the adapter's name in its path (e.g. an ``attention.value`` layer)."""
    return _adapter_path(adapter).search(param_name) is not None


def copy_adapter(peft_model, source: str, name: str) -> None:
    """Add adapter ``name`` to ``peft_model`` as a trainable copy of adapter ``source`` (config and weights)."""
    import dataclasses

    peft_model.add_adapter(name, dataclasses.replace(peft_model.peft_config[source], inference_mode=False))
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for n, p in params.items():
            if adapter_tensor(n, name):
                p.copy_(params[_adapter_path(name).sub(rf"\g<1>{source}", n)])
                p.requires_grad_(True)


def load_adapter_classifier(adapter_dir: str, num_labels: int, pad_token_id: int | None, dtype: str = "float32",
                            trust_remote_code: bool = False):
    """A sequence-classification LoRA adapter folder on a fresh copy of its base -> PeftModel."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(adapter_base(adapter_dir), num_labels=num_labels,
                                                              dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    base.config.pad_token_id = pad_token_id
    return PeftModel.from_pretrained(base, adapter_dir)


def read_adapter_head(adapter_dir: str) -> tuple[dict, dict]:
    """(LoRA tensors, score-head tensors) of a sequence-classification adapter folder saved by peft."""
    from safetensors.torch import load_file

    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.exists(path):
        raise ModelLoadError(f"{adapter_dir}: no adapter_model.safetensors (alignkit loads adapters from "
                             "safetensors only)")
    state = load_file(path)
    head = {k.rsplit(".", 1)[-1]: v for k, v in state.items() if k.rsplit(".", 2)[-2] == "score"}
    lora = {k: v for k, v in state.items() if k.rsplit(".", 2)[-2] != "score"}
    if "weight" not in head:
        raise ModelLoadError(f"{adapter_dir}: the adapter has no 'score' head (save a reward model's LoRA with "
                             "modules_to_save=['score'])")
    return lora, head


def attach_adapter_head(peft_model, adapter_dir: str, name: str, trainable: bool = False) -> AdapterHead:
    """Load a sequence-classification LoRA adapter (its LoRA tensors and score head) from ``adapter_dir``
    onto ``peft_model``'s base as adapter ``name``; frozen unless ``trainable``."""
    from peft import LoraConfig, TaskType
    from peft.utils import set_peft_model_state_dict

    lora_state, head_state = read_adapter_head(adapter_dir)
    config = LoraConfig.from_pretrained(adapter_dir)
    config.task_type, config.modules_to_save, config.inference_mode = TaskType.CAUSAL_LM, None, False
    peft_model.add_adapter(name, config)
    result = set_peft_model_state_dict(peft_model, lora_state, adapter_name=name)
    missing = [k for k in result.missing_keys if adapter_tensor(k, name)]
    if result.unexpected_keys or missing:
        peft_model.delete_adapter(name)
        raise ModelLoadError(f"{adapter_dir}: its LoRA weights do not fit the policy's base "
                             f"(unexpected {list(result.unexpected_keys)[:3]}, missing {missing[:3]})")
    for n, p in peft_model.named_parameters():
        if adapter_tensor(n, name):
            p.requires_grad_(trainable)
    weight = head_state["weight"]
    device = peft_model.get_input_embeddings().weight.device
    # fp32 head whatever the base's precision: hidden states are cast to it (a few KB of weights).
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in head_state, device=device)
    with torch.no_grad():
        head.weight.copy_(weight)
        if "bias" in head_state:
            head.bias.copy_(head_state["bias"])
    head.requires_grad_(trainable)
    return AdapterHead(peft_model, name, head)
