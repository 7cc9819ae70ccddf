"""One frozen base, several LoRA adapters: the machinery of low-memory PPO (``ppo.shared_base``).

The policy is a peft model; the reference is that model with its adapters off; the value
model is a second adapter ("value") plus a head; a reward model trained with LoRA on the
same base joins as a frozen adapter ("reward") plus its score head. Each is a view of one
network, selected with :func:`use_adapter` / :func:`adapters_off`, so the base weights
(optionally 8-/4-bit) exist once. Every stage that touches adapters imports them from here.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from contextlib import contextmanager

import torch

from alignkit.modeling import DTYPES, ModelLoadError, head_outputs, resolve_path

VALUE_ADAPTER = "value"


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
    """A linear head on the hidden states of one named LoRA adapter of a shared peft model.

    Only ``head`` is this module's own; the adapter tensors live in the peft model, which is
    kept in a list so torch does not register the shared network as a submodule.
    ``modeling.head_outputs`` reads it like any sequence-classification model.
    """

    def __init__(self, peft_model, adapter: str, head: torch.nn.Linear):
        super().__init__()
        self.adapter, self.head = adapter, head
        self._peft = [peft_model]

    @property
    def peft_model(self):
        return self._peft[0]

    def hidden_states(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        peft_model = self.peft_model
        hf = peft_model.get_base_model()
        backbone = getattr(hf, hf.base_model_prefix)
        # The backbone runs in eval mode here: no dropout, and no gradient checkpointing, whose layers
        # would be recomputed in backward under whichever adapter is active *then* (the policy's).
        training = backbone.training
        backbone.train(False)
        try:
            with use_adapter(peft_model, self.adapter):
                return backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=False).last_hidden_state
        finally:
            backbone.train(training)

    def forward(self, input_ids, attention_mask, position_ids=None):
        return head_outputs(self, input_ids, attention_mask, position_ids)


class SharedBase:
    """The policy's peft model and its base folder, offered to reward sources that are adapters of that base."""

    def __init__(self, model, base_path: str):
        self.model, self.base_path = model, base_path

    def new_name(self, stem: str) -> str:
        names = set(self.model.peft_config)
        return next(n for n in (stem if i == 0 else f"{stem}_{i}" for i in range(len(names) + 1)) if n not in names)

    def accepts(self, adapter_dir: str) -> bool:
        return is_adapter_dir(adapter_dir) and same_model_path(adapter_base(adapter_dir), self.base_path)


def _adapter_path(adapter: str):
    return re.compile(rf"(\.lora_\w+\.){re.escape(adapter)}(?=\.|$)")


def adapter_tensor(param_name: str, adapter: str) -> bool:
    """Whether ``param_name`` is one of LoRA adapter ``adapter``'s tensors (``...lora_A.<adapter>.weight``),
    not a base weight that merely has the adapter's name in its path (e.g. an ``attention.value`` layer)."""
    return _adapter_path(adapter).search(param_name) is not None


def copy_adapter(peft_model, source: str, name: str) -> None:
    """Add adapter ``name`` to ``peft_model`` as a trainable copy of adapter ``source`` (config and weights)."""
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


def add_value_adapter(policy, lora, reward_head: AdapterHead | None, value_head) -> AdapterHead:
    """The value model on the policy's own base: adapter ``VALUE_ADAPTER`` + a one-output head.

    From a reward model that is itself an adapter on this base (InstructGPT: value = reward
    model): a trainable copy of its adapter, with ``value_head`` (its aspect combination).
    Otherwise a fresh adapter of the policy's LoRA settings ``lora`` and a zero head (values
    start at 0): a separately loaded reward model's head reads *its* backbone's features.
    """
    from peft import LoraConfig, TaskType

    if reward_head is not None:
        copy_adapter(policy, reward_head.adapter, VALUE_ADAPTER)
        head = value_head
    else:
        targets = lora.target_modules
        policy.add_adapter(VALUE_ADAPTER, LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type=TaskType.CAUSAL_LM,
            target_modules=targets[0] if targets == ["all-linear"] else list(targets)))
        hidden = policy.get_base_model().config.get_text_config().hidden_size
        head = torch.nn.Linear(hidden, 1, bias=True)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        for name, p in policy.named_parameters():
            if adapter_tensor(name, VALUE_ADAPTER):
                p.requires_grad_(True)
    head.requires_grad_(True)
    return AdapterHead(policy, VALUE_ADAPTER, head)


def save_adapter_head(peft_model, head_model: AdapterHead, out_dir: str, tokenizer) -> None:
    """``out_dir``: the adapter's LoRA folder (as peft writes it) + ``value_head.safetensors`` + tokenizer."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp, selected_adapters=[head_model.adapter], safe_serialization=True)
    src = os.path.join(tmp, head_model.adapter)  # peft writes a non-default adapter in a subfolder
    for name in os.listdir(src):
        shutil.move(os.path.join(src, name), os.path.join(out_dir, name))
    shutil.rmtree(tmp, ignore_errors=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in head_model.head.state_dict().items()},
              os.path.join(out_dir, "value_head.safetensors"))
    tokenizer.save_pretrained(out_dir)
