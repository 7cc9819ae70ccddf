"""Chat templates, loss masking on answer tokens, truncation policies and packing isolation."""

import math

import pytest
import torch

from alignkit.builtin import build_tokenizer
from alignkit.modeling import DEFAULT_CHAT_TEMPLATE
from alignkit.schema import DataError, Example
from alignkit.sft import sft_token_loss
from alignkit.tokenization import (IGNORE_INDEX, block_causal_mask, collate_sft, encode_answer, encode_pairs,
                                   encode_prompt, sft_rows)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_prompt_uses_chat_template_and_answer_ends_with_eos(tok):
    ids = encode_prompt(tok, [{"role": "user", "content": "review the pizza"}])
    assert tok.convert_ids_to_tokens(ids) == ["<|user|>", "review", "the", "pizza", "<|assistant|>"]
    ans = encode_answer(tok, "the pizza was great .")
    assert ans[-1] == tok.eos_token_id and len(ans) == 6


def test_labels_mask_prompt_tokens(tok):
    enc, _ = encode_pairs(tok, [(Example(prompt="review the pizza"), "the pizza was great .")], 64, "error")
    row = sft_rows(enc, 64, packing=False)[0]
    assert row["labels"][:5] == [IGNORE_INDEX] * 5  # the 5 prompt tokens carry no loss
    assert row["labels"][5:] == row["input_ids"][5:]


def test_sft_token_loss_hand_computed():
    # Vocabulary of 2, one row of 3 tokens: [x, 0, 1]; the first is prompt (ignored as a target anyway).
    # Position 0 predicts token 1 (=0) with logits [0, 0] -> CE = log 2.
    # Position 1 predicts token 2 (=1) with logits [1, 0] -> CE = log(1 + e) - 0 = 1.3133.
    # Position 2 predicts nothing (shifted away).
    logits = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 0, 1]])
    loss_sum, n = sft_token_loss(logits, labels)
    assert n.item() == 2
    assert loss_sum.item() == pytest.approx(math.log(2) + math.log(1 + math.e), abs=1e-5)
    # Masking the first target leaves only the second term.
    loss_sum, n = sft_token_loss(logits, torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 1]]))
    assert n.item() == 1 and loss_sum.item() == pytest.approx(math.log(1 + math.e), abs=1e-5)


def test_truncation_policies(tok):
    long = " ".join(["the pizza was great and"] * 10) + " ."
    pairs = [(Example(prompt="review the pizza", source="f.jsonl:7"), long),
             (Example(prompt="review the cafe", source="f.jsonl:8"), "the cafe was fine .")]
    with pytest.raises(DataError, match=r"f.jsonl:7: answers: 57 tokens .* exceed data.max_length=20"):
        encode_pairs(tok, pairs, 20, "error")
    enc, dropped = encode_pairs(tok, pairs, 20, "drop")
    assert dropped == 1 and len(enc) == 1
    enc, dropped = encode_pairs(tok, pairs, 20, "truncate")
    assert dropped == 0 and len(enc[0].prompt_ids) + len(enc[0].answer_ids) == 20
    assert enc[0].prompt_ids == encode_prompt(tok, [{"role": "user", "content": "review the pizza"}])


def test_packing_fills_rows_without_splitting_examples(tok):
    exs = [(Example(prompt=f"review the {t}"), "the staff was good " + "and the food was bad " * (i % 3) + ".")
           for i, t in enumerate(["pizza", "cafe", "car", "book", "song", "game", "park"])]
    enc, _ = encode_pairs(tok, exs, 40, "error")
    rows = sft_rows(enc, 40, packing=True)
    assert len(rows) < len(enc)
    assert all(len(r["input_ids"]) <= 40 for r in rows)
    assert sorted(n for r in rows for n in r["seq_lens"]) == sorted(len(e.prompt_ids) + len(e.answer_ids) for e in enc)
    for r in rows:  # positions restart at every packed example
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0]
        assert len(starts) == len(r["seq_lens"])


def test_block_causal_mask_hand_written():
    m = block_causal_mask([[2, 1]], 4)[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0],
                 [1, 1, 0, 0],
                 [0, 0, 1, 0],
                 [0, 0, 0, 1]]  # last row: padding attends only to itself


def test_packed_examples_cannot_attend_to_each_other(tiny_model_dir, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    exs = [(Example(prompt="review the pizza"), "the pizza was great ."),
           (Example(prompt="describe the car"), "the price was bad and the car was fun .")]
    enc, _ = encode_pairs(tok, exs, 64, "error")
    packed = collate_sft(sft_rows(enc, 64, packing=True), tok.pad_token_id)
    assert packed["attention_mask"].dim() == 4
    single = [collate_sft(sft_rows([e], 64, packing=False), tok.pad_token_id) for e in enc]
    with torch.no_grad():
        out = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                    position_ids=packed["position_ids"]).logits[0]
        alone = [model(input_ids=s["input_ids"], attention_mask=s["attention_mask"]).logits[0] for s in single]
    lens = sft_rows(enc, 64, packing=True)[0]["seq_lens"]
    order = [0, 1] if lens[0] == alone[0].shape[0] else [1, 0]
    start = 0
    for j in order:
        n = alone[j].shape[0]
        torch.testing.assert_close(out[start:start + n], alone[j], atol=1e-5, rtol=1e-4)
        start += n
    # Without the block mask (position_ids only) the second example sees the first: logits change.
    with torch.no_grad():
        leaky = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
    n0 = alone[order[0]].shape[0]
    assert (leaky[n0:n0 + alone[order[1]].shape[0]] - alone[order[1]]).abs().max() > 1e-3


def test_default_chat_template_when_tokenizer_has_none(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from alignkit.config import ModelConfig
    from alignkit.modeling import load_tokenizer

    t = AutoTokenizer.from_pretrained(tiny_model_dir)
    t.chat_template = None
    t.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    loaded = load_tokenizer(ModelConfig(name_or_path=str(tmp_path)))
    assert loaded.chat_template == DEFAULT_CHAT_TEMPLATE


def test_fp32_attention_switch_keeps_logits(tiny_model_dir):
    """engine.use_fp32_attention_on_cpu only changes attention precision under bf16 on CPU."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from alignkit.engine import use_fp32_attention_on_cpu

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    switched = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    cpu = torch.device("cpu")
    assert not use_fp32_attention_on_cpu(switched, SimpleNamespace(device=cpu, mixed_precision="no"))
    assert use_fp32_attention_on_cpu(switched, SimpleNamespace(device=cpu, mixed_precision="bf16"))
    ids = torch.tensor([[0, 0, 5, 7, 34, 8, 74], [5, 7, 34, 8, 74, 12, 2]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])  # left padding in row 0
    with torch.no_grad():
        a = plain(input_ids=ids, attention_mask=mask).logits
        b = switched(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a[0, 2:], b[0, 2:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-4)
