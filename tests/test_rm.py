"""Reward-model stage: maths on hand-made batches, data -> comparisons, bad input, a short real run,
the saved format (AutoModelForSequenceClassification round trip, LoRA merge) and rm-eval.

    python -m pytest tests/test_rm.py -q
"""

import glob
import json
import math
import os

import pytest
import torch

from alignkit.config import ConfigError, load_config
from alignkit.schema import DataError, Example, Label, load_examples
from conftest import ROOT, write_jsonl

from alignkit import rewards, rm, rm_data, rm_eval
from alignkit.modeling import backbone_and_head


def encode_texts(tokenizer, prompts, answers):
    return [rewards.encode_for_reward(tokenizer, p, a) for p, a in zip(prompts, answers)]


def bt(d):  # -log sigmoid(d)
    return math.log1p(math.exp(-d))


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from alignkit.config import ModelConfig
    from alignkit.modeling import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=tiny_model_dir))


def settings(**kw):
    return rm_data.RewardSettings(**kw)


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs/rm/*.yaml"))))
def test_every_shipped_config_loads(path):
    cfg = load_config(rm.RMConfig, path)
    assert len(cfg.rm.weights) == len(cfg.rm.aspects)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="rm.margin"):
        load_config(rm.RMConfig, data={"rm": {"margin": "huge"}})
    with pytest.raises(ConfigError, match="rm.aspect_weights"):
        load_config(rm.RMConfig, data={"rm": {"aspects": ["a", "b"], "aspect_weights": [1.0]}})
    with pytest.raises(ConfigError, match="rm.nope"):
        load_config(rm.RMConfig, data={"rm": {"nope": 1}})


# ----------------------------------------------------------------------------- loss on hand-made batches


def element(n_answers, comparisons, rankings=()):
    seqs = [[5 + j, 6, 2] for j in range(n_answers)]
    return rm_data.RMElement(seqs, [rm_data.Comparison(*c) for c in comparisons], list(rankings), "<test>")


def test_loss_averages_each_prompts_pairs_first():
    # Prompt 0: K=2, one pair 0>1. Prompt 1: K=3 ranked 0>1>2, its C(3,2)=3 pairs in one element.
    els = [element(2, [(0, 1, 0.0, 0, False, "none")]),
           element(3, [(0, 1, 0.0, 0, False, "none"), (0, 2, 0.0, 0, False, "none"), (1, 2, 0.0, 0, False, "none")])]
    batch = rm_data.collate_elements(els, pad_token_id=0, num_aspects=1)
    assert batch["input_ids"].shape == (5, 3)  # every answer once: 2 + 3 rows
    assert batch["num_groups"].item() == 2
    rewards = torch.tensor([[1.0], [0.0], [2.0], [1.0], [0.0]])
    terms = rm.rm_loss_terms(rewards, batch)
    # prompt 0: -log sig(1) = 0.31326
    # prompt 1: mean(-log sig(1), -log sig(2), -log sig(1)) = (0.31326 + 0.12693 + 0.31326) / 3 = 0.25115
    assert terms.group_loss_sum.item() == pytest.approx(0.31326 + 0.25115, abs=1e-4)
    assert terms.correct.item() == 4 and terms.pairs.item() == 4


def test_aspect_index_picks_the_aspect_column_and_margin_and_tie():
    # Two aspects. Pair on aspect 1 (harmlessness) with margin 1; a tie on aspect 0.
    els = [element(2, [(0, 1, 1.0, 1, False, "better"), (0, 1, 0.0, 0, True, "none")])]
    batch = rm_data.collate_elements(els, pad_token_id=0, num_aspects=2)
    rewards = torch.tensor([[5.0, 3.0], [4.0, 0.5]])  # answer 0: (5, 3); answer 1: (4, 0.5)
    terms = rm.rm_loss_terms(rewards, batch)
    # aspect-1 pair: -log sig(3 - 0.5 - 1) = -log sig(1.5) = 0.20141
    # tie on aspect 0, d = 1: -0.5 log sig(1) - 0.5 log sig(-1) = 0.5 * (0.31326 + 1.31326) = 0.81326
    # one prompt: mean = (0.20141 + 0.81326) / 2 = 0.50734
    assert terms.group_loss_sum.item() == pytest.approx(0.50734, abs=1e-4)
    assert terms.pairs.item() == 1  # the tie is not an accuracy pair


def test_plackett_luce_ranking_of_two_is_bradley_terry():
    els = [element(2, [], rankings=[([1, 0], 0)])]  # answer 1 ranked first
    batch = rm_data.collate_elements(els, pad_token_id=0, num_aspects=1)
    terms = rm.rm_loss_terms(torch.tensor([[0.5], [2.0]]), batch)
    assert terms.group_loss_sum.item() == pytest.approx(bt(1.5), abs=1e-5)
    assert terms.correct.item() == 1


# ----------------------------------------------------------------------------- data -> comparisons


def ex(answers, labels, meta=None):
    return Example(prompt="review the pizza", answers=answers, labels=[Label(**lab) for lab in labels],
                   meta=meta or {}, source="f.jsonl:1")


A3 = ["the pizza was great .", "the pizza was okay .", "the pizza was bad ."]


def test_strength_margin_from_table():
    e = ex(A3[:2], [{"kind": "pairwise", "chosen": 0, "rejected": 1, "strength": "better"}])
    for margin, want in (("llama2_small", 2 / 3), ("llama2_large", 2.0), ("none", 0.0)):
        comps, _ = rm_data.comparisons_of(e, settings(margin=margin))
        assert comps[0].margin == pytest.approx(want)


def test_ratings_become_pairs_within_prompt_and_aspect(tok):
    labels = [{"kind": "rating", "answer": j, "aspect": "helpfulness", "value": v, "annotator": "a"}
              for j, v in enumerate([5, 3, 3])]
    labels.append({"kind": "rating", "answer": 0, "aspect": "harmlessness", "value": 2, "annotator": "a"})
    s = settings(aspects=["helpfulness", "harmlessness"])
    els, stats = rm_data.build_elements([ex(A3, labels)], s, tok, 64, "error")
    # helpfulness 5 > 3 = 3: pairs 0>1 and 0>2, the 1-2 tie dropped; one harmlessness rating makes no pair.
    assert sorted((c.winner, c.loser, c.aspect) for c in els[0].comparisons) == [(0, 1, 0), (0, 2, 0)]
    els, _ = rm_data.build_elements([ex(A3, labels)], settings(aspects=["helpfulness", "harmlessness"], ties="equal"),
                               tok, 64, "error")
    assert sum(c.tie for c in els[0].comparisons) == 1


def test_annotators_aggregate_by_majority_or_each(tok):
    votes = [(0, 1, "a"), (0, 1, "b"), (1, 0, "c")]
    e = ex(A3[:2], [{"kind": "pairwise", "chosen": c, "rejected": r, "annotator": a} for c, r, a in votes])
    els, _ = rm_data.build_elements([e], settings(annotators="aggregate"), tok, 64, "error")
    assert [(c.winner, c.loser) for c in els[0].comparisons] == [(0, 1)]
    els, _ = rm_data.build_elements([e], settings(annotators="each"), tok, 64, "error")
    assert sorted((c.winner, c.loser) for c in els[0].comparisons) == [(0, 1), (0, 1), (1, 0)]


def test_dawid_skene_aggregation_runs_through_the_data_toolkit(tok):
    examples = load_examples("builtin:pairs:train:200")
    els, stats = rm_data.build_elements(examples, settings(aggregation="dawid_skene"), tok, 64, "error")
    assert stats["pairs"] + stats.get("tie_pairs", 0) <= 200 and stats["pairs"] > 150
    assert all(len(el.comparisons) == 1 for el in els)  # one judgement per pair of answers


def test_answers_nobody_compared_are_not_scored_in_training(tok):
    e = ex(A3, [{"kind": "pairwise", "chosen": 0, "rejected": 1}], meta={"gold": [1.0, 0.0, -1.0]})
    (train,), _ = rm_data.build_elements([e], settings(), tok, 64, "error")
    (held_out,), _ = rm_data.build_elements([e], settings(), tok, 64, "error", evaluation=True)
    assert train.sequences[2] == [] and held_out.sequences[2]  # evaluation scores it for gold pairs
    assert rm_data.collate_elements([train], 0, 1)["input_ids"].shape[0] == 2


def test_ranking_gives_all_pairs_in_one_element(tok):
    e = ex(A3, [{"kind": "ranking", "order": [2, 0, 1], "annotator": "a"}])
    els, stats = rm_data.build_elements([e], settings(), tok, 64, "error")
    assert len(els) == 1 and len(els[0].sequences) == 3
    assert [(c.winner, c.loser) for c in els[0].comparisons] == [(2, 0), (2, 1), (0, 1)]
    els, _ = rm_data.build_elements([e], settings(rankings="plackett_luce"), tok, 64, "error")
    assert els[0].rankings == [([2, 0, 1], 0)] and not els[0].comparisons


# ----------------------------------------------------------------------------- bad input


def prepare(tmp_path, rows, **rm_settings):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    cfg = load_config(rm.RMConfig, data={"data": {"train_files": [path], "max_length": 64},
                                         "rm": rm_settings, "output_dir": str(tmp_path / "out")})
    from alignkit.modeling import load_tokenizer

    return rm_data.prepare_rm_data(cfg, load_tokenizer(cfg.model)), path


ROW = {"prompt": "review the pizza", "answers": ["the pizza was great .", "the pizza was bad ."]}


@pytest.mark.parametrize("labels, answers, rm_settings, field, message", [
    ([{"kind": "pairwise", "chosen": 0, "rejected": 1}], ["the pizza was great .", "the pizza was great ."], {},
     "labels[0].rejected", "identical text"),
    ([{"kind": "ranking", "order": [0, 0]}], None, {}, "labels[0].order", "duplicate position"),
    ([{"kind": "ranking", "order": [1]}], None, {}, "labels[0].order", "at least 2"),
    ([{"kind": "ranking", "order": [1, 0]}], ROW["answers"] + ["the pizza was okay ."], {}, "labels[0].order",
     "missing position"),
    ([{"kind": "rating", "answer": 0, "value": 7}, {"kind": "rating", "answer": 1, "value": 2}], None, {},
     "labels[0].value", "outside rm.rating_scale [1, 5]"),
    ([{"kind": "pairwise", "chosen": 0, "rejected": 1, "aspect": "honesty"}], None, {}, "labels[0].aspect",
     "'honesty' is not declared in rm.aspects"),
    ([{"kind": "pairwise", "chosen": 0, "rejected": 1, "strength": "much_better"}], None, {"margin": "llama2_small"},
     "labels[0].strength", "'much_better' is not in the llama2_small margin table"),
    ([{"kind": "pairwise", "chosen": 0, "rejected": 1}],
     ["the pizza was great .", " ".join(["the pizza was bad"] * 30)], {}, "answers[1]", "more than data.max_length=64"),
])
def test_bad_input_is_reported_with_file_line_and_field(tmp_path, labels, answers, rm_settings, field, message):
    row = {**ROW, "labels": labels, **({"answers": answers} if answers else {})}
    with pytest.raises(DataError) as err:
        prepare(tmp_path, [ROW | {"labels": [{"kind": "pairwise", "chosen": 0, "rejected": 1}]}, row], **rm_settings)
    assert f"bad.jsonl:2: {field}: " in str(err.value) and message in str(err.value), str(err.value)


def test_trl_row_with_identical_chosen_and_rejected(tmp_path):
    with pytest.raises(DataError, match=r"bad.jsonl:1: rejected: chosen and rejected are identical"):
        prepare(tmp_path, [{"prompt": "review the pizza", "chosen": "the pizza was great .",
                            "rejected": "the pizza was great ."}])


def test_bad_input_exits_2_before_any_training(tmp_path, capsys):
    from alignkit.cli import main

    path = write_jsonl(tmp_path / "bad.jsonl", [{**ROW, "labels": [{"kind": "rating", "answer": 0, "value": 9}]}])
    code = main(["rm", f"--data.train_files=[{path}]", f"--output_dir={tmp_path / 'out'}"])
    assert code == 2
    assert "bad.jsonl:1: labels[0].value" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out" / "final")


# ----------------------------------------------------------------------------- pooling


def test_score_read_at_last_non_pad_token_and_padding_invariant(tiny_model_dir, tok):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2).eval()
    model.config.pad_token_id = tok.pad_token_id
    assert tok.pad_token_id != tok.eos_token_id  # the built-in tokenizer: HF's pooling is unambiguous
    seqs = encode_texts(tok, ["review the pizza", "how was the hotel"],
                           ["the pizza was great .", "the room was bad and the staff was really rude ."])
    batched = rewards.score_sequences(model, seqs, tok.pad_token_id, batch_size=2)
    with torch.no_grad():
        for i, s in enumerate(seqs):
            hidden = model.model(input_ids=torch.tensor([s])).last_hidden_state  # (1, T, H)
            manual = model.score(hidden[0, -1])  # the last token: the answer's EOS
            torch.testing.assert_close(batched[i], manual, atol=1e-5, rtol=1e-5)


def test_pad_equal_to_eos_still_agrees_with_hf_pooling(tiny_model_dir, tok):
    # Tokenizers without a pad token get pad = eos. HF then pools at the last token that is not
    # pad, i.e. just before the answer's EOS; alignkit scores through the same forward, so batched
    # (padded) and single scores agree and match HF on the unpadded sequence.
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).eval()
    model.config.pad_token_id = tok.eos_token_id
    seqs = encode_texts(tok, ["review the pizza", "describe the song"],
                           ["the pizza was great .", "the song was dull but the sound was nice ."])
    batched = rewards.score_sequences(model, seqs, tok.eos_token_id, batch_size=2)
    with torch.no_grad():
        for i, s in enumerate(seqs):
            hidden = model.model(input_ids=torch.tensor([s])).last_hidden_state
            torch.testing.assert_close(batched[i], model.score(hidden[0, -2]), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- packing (training forward)


def test_pack_layout_prompt_once_tree_mask_positions_and_read_index():
    # Element 0: two answers sharing the prompt [5, 6]; element 1: one answer. Room for both in one row.
    els = [element(2, [(0, 1, 0.0, 0, False, "none")]), element(1, [])]
    els[0].sequences = [[5, 6, 7, 2], [5, 6, 8, 2]]
    els[1].sequences = [[5, 9, 2]]
    b = rm_data.pack_elements(els, pad_token_id=0, num_aspects=1, row_length=16, min_row_length=16)
    assert b["input_ids"].tolist() == [[5, 6, 7, 2, 8, 2, 5, 9, 2]]  # the prompt [5, 6] once
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3, 0, 1, 2]]  # answer 2 continues from the prompt
    assert b["read_index"].tolist() == [3, 5, 8]  # each answer's EOS, in collate_elements' flat order
    m = b["attention_mask"][0, 0]
    assert m.shape == (9, 9)
    assert torch.nonzero(m[5]).flatten().tolist() == [0, 1, 4, 5]  # answer 2: prompt + itself, not answer 1
    assert torch.nonzero(m[3]).flatten().tolist() == [0, 1, 2, 3]
    assert torch.nonzero(m[7]).flatten().tolist() == [6, 7]  # element 1 sees nothing of element 0
    # Comparisons index the same flat answers as the padded batch.
    padded = rm_data.collate_elements(els, pad_token_id=0, num_aspects=1)
    for key in ("winners", "losers", "group", "num_groups"):
        assert torch.equal(b[key], padded[key])
    # Identical answers (e.g. after truncation) keep their last token apart; pad = eos reads before it.
    els[0].sequences = [[5, 6, 2], [5, 6, 2]]
    b = rm_data.pack_elements(els[:1], pad_token_id=2, num_aspects=1, row_length=16, min_row_length=0)
    assert b["input_ids"].tolist() == [[5, 6, 2, 2]] and b["read_index"].tolist() == [1, 1]
    # Rows hold at most row_length tokens: two units of 6 and 3 tokens with row_length 6 -> two rows.
    els[0].sequences = [[5, 6, 7, 2], [5, 6, 8, 2]]
    b = rm_data.pack_elements(els, pad_token_id=0, num_aspects=1, row_length=6)
    assert b["input_ids"].tolist() == [[5, 6, 7, 2, 8, 2], [5, 9, 2, 0, 0, 0]]


@pytest.mark.parametrize("kind,pad_is_eos,lora", [("rankings", False, False), ("pairs", True, False),
                                                  ("pairs", False, True)])
def test_packed_rewards_and_gradients_equal_padded_and_hf(tiny_model_dir, tok, kind, pad_is_eos, lora):
    from alignkit.config import LoraSettings, ModelConfig
    from alignkit.modeling import load_model

    pad = tok.eos_token_id if pad_is_eos else tok.pad_token_id
    lora_cfg = LoraSettings(enabled=True, r=4, alpha=8) if lora else LoraSettings()
    torch.manual_seed(0)
    model = load_model(ModelConfig(name_or_path=tiny_model_dir, lora=lora_cfg), task="reward", num_labels=2,
                       pad_token_id=pad)
    model.config.pad_token_id = pad
    with torch.no_grad():  # a score head and LoRA weights away from their init
        for n, p in model.named_parameters():
            if p.requires_grad and ("score" in n or "lora" in n):
                p.add_(torch.randn_like(p) * 0.1)
    assert backbone_and_head(model) is not None
    els, _ = rm_data.build_elements(load_examples(f"builtin:{kind}:train:12"), settings(), tok, 64, "error")
    fwd = rm.RewardForward(model, pad)
    padded = rm_data.collate_elements(els, pad, 2)
    with torch.no_grad():  # HF's own forward and pooling, one unpadded sequence at a time (the saved model's)
        hf = torch.cat([model(input_ids=torch.tensor([s])).logits for el in els for s in el.sequences if s])
    results = []
    for batch in [padded] + [rm_data.pack_elements(els, pad, 2, n, share) for n, share in ((64, True), (40, False))]:
        model.zero_grad()
        scores = fwd(batch["input_ids"], batch["attention_mask"], batch.get("position_ids"), batch.get("read_index"))
        rm.rm_loss_terms(scores, batch).group_loss_sum.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        results.append((scores.detach(), grads))
    assert results[1][0].shape == (sum(len([s for s in el.sequences if s]) for el in els), 2)
    for scores, grads in results:
        torch.testing.assert_close(scores, hf, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grads, results[0][1], atol=1e-5, rtol=1e-4)


def test_fused_adamw_makes_the_same_update():
    from alignkit import engine
    from alignkit.config import TrainConfig

    torch.manual_seed(0)
    nets = [torch.nn.Linear(4, 3) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    train = TrainConfig(learning_rate=0.1, warmup_ratio=0.0)
    opt, _ = engine.make_optimizer(nets[0], train, 10)
    assert opt.param_groups[0]["fused"] is True
    ref = torch.optim.AdamW([{"params": [nets[1].weight], "weight_decay": train.weight_decay},
                             {"params": [nets[1].bias], "weight_decay": 0.0}], lr=0.1,
                            betas=(train.adam_beta1, train.adam_beta2))
    x = torch.randn(8, 4)
    for _ in range(3):
        for net, o in zip(nets, (opt, ref)):
            net(x).square().sum().backward()
            o.step()
            o.zero_grad()
    torch.testing.assert_close(nets[0].weight, nets[1].weight)
    torch.testing.assert_close(nets[0].bias, nets[1].bias)
    assert not engine.fused_adamw_supported([("w", torch.nn.Parameter(torch.zeros(2, dtype=torch.int32),
                                                                      requires_grad=False))])


# ----------------------------------------------------------------------------- a short real run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    cfg = load_config(rm.RMConfig, os.path.join(ROOT, "configs/rm/tiny.yaml"), [
        f"output_dir={out}", "data.train_files=[builtin:pairs:train:640]", "data.eval_files=[builtin:pairs:eval:128]",
        "train.num_epochs=1", "train.per_device_batch_size=16", "train.learning_rate=2e-3",
        "train.mixed_precision=no", "train.save_every=0", "train.log_every=5", "log.progress=false",
        "rm.normalize_on=[builtin:sft:train:64]"])
    return cfg, rm.train_rm(cfg)


def test_short_seeded_run_beats_chance(trained):
    cfg, summary = trained
    ev = summary["eval"]
    # 40 steps on 640 pairs: well above chance (0.5) on held-out prompts, against gold and labels.
    assert ev["gold_accuracy"] >= 0.75, ev
    assert ev["accuracy"] >= 0.7, ev
    assert ev["gold_accuracy"] > summary["eval_before"]["gold_accuracy"] + 0.15
    out = cfg.output_dir
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert any("train/loss" in m for m in metrics) and any("eval/gold_accuracy" in m for m in metrics)
    assert json.load(open(os.path.join(out, "summary.json")))["eval"]["gold_accuracy"] == ev["gold_accuracy"]
    assert summary["rows"]["train"]["read"] == summary["rows"]["train"]["used"] > 0  # every row accounted for
    assert os.path.getsize(os.path.join(out, "reward_distributions.png")) > 1000


def test_saved_model_round_trips_through_hf_with_normalisation(trained, tok):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg, summary = trained
    final = os.path.join(cfg.output_dir, "final")
    hf = AutoModelForSequenceClassification.from_pretrained(final).eval()
    hf_tok = AutoTokenizer.from_pretrained(final)
    info = hf.config.alignkit_reward
    assert hf.config.num_labels == 1 and info["aspects"] == ["overall"] and info["weights"] == [1.0]
    assert info["offset"] == summary["normalization"]["offset"]
    # Plain HF scoring of prompt + answer, one text at a time (no padding at all) ...
    examples = load_examples("builtin:pairs:eval:16")
    prompts = [e.prompt for e in examples for _ in e.answers]
    answers = [a for e in examples for a in e.answers]
    with torch.no_grad():
        hf_scores = torch.stack([hf(input_ids=torch.tensor([s])).logits[0]
                                 for s in encode_texts(hf_tok, prompts, answers)])
    # ... equals alignkit's batched scoring of the loaded model.
    model, tokenizer, loaded_info = rewards.load_reward_model(final)
    ours = rewards.score_texts(model, tokenizer, prompts, answers, batch_size=8)
    torch.testing.assert_close(ours, hf_scores, atol=1e-5, rtol=1e-5)
    # rm-eval on the saved model reproduces the metrics computed in memory at the end of training.
    ev = rm_eval.rm_eval(final, ["builtin:pairs:eval:128"])
    assert ev["mean_margin"] == pytest.approx(summary["eval"]["mean_margin"], abs=1e-5)
    assert ev["gold_accuracy"] == pytest.approx(summary["eval"]["gold_accuracy"])
    # Normalisation: the reference demonstrations score mean 0, std 1.
    ref = load_examples("builtin:sft:train:64")
    z = rewards.normalize(rewards.score_texts(model, tokenizer, [e.prompt for e in ref], [e.answers[0] for e in ref]),
                     loaded_info)
    assert z.mean().item() == pytest.approx(0.0, abs=1e-4) and z.std().item() == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(rewards.combined_reward(ours, loaded_info), rewards.normalize(ours, loaded_info)[:, 0])


def test_rm_eval_command(trained, capsys):
    from alignkit.cli import main

    cfg, _ = trained
    assert main(["rm-eval", "--model", os.path.join(cfg.output_dir, "final"), "--data", "builtin:pairs:eval:32",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0.0 <= out["accuracy"] <= 1.0 and out["gold_pairs"] > 0


# ----------------------------------------------------------------------------- LoRA


def test_lora_adapter_merged_and_in_memory_scores_are_identical(tmp_path, tiny_model_dir, tok):
    from transformers import AutoModelForSequenceClassification

    from alignkit.modeling import load_model

    cfg = load_config(rm.RMConfig, data={
        "model": {"name_or_path": tiny_model_dir, "lora": {"enabled": True, "r": 4, "alpha": 8}},
        "rm": {"aspects": ["helpfulness", "harmlessness"]}, "output_dir": str(tmp_path)})
    model = load_model(cfg.model, task="reward", num_labels=2, pad_token_id=tok.pad_token_id)
    # Stand-in for training: move the LoRA weights and the (fully trained) score head away from their init.
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    assert any("modules_to_save" in n and "score" in n for n, p in model.named_parameters() if p.requires_grad)
    seqs = encode_texts(tok, ["review the pizza"] * 3,
                           ["the pizza was great .", "the staff was rude .", "you are dumb and the pizza was bad ."])
    in_memory = rewards.score_sequences(model, seqs, tok.pad_token_id)
    info = {"aspects": ["helpfulness", "harmlessness"], "weights": [1.0, 0.5], "offset": [0.1, -0.2],
            "scale": [2.0, 1.0]}
    rm.save_reward_model(model, tok, cfg, info)

    adapter, _, adapter_info = rewards.load_reward_model(str(tmp_path / "final_adapter"))
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final").eval()
    assert merged.config.alignkit_reward == info == adapter_info and merged.config.num_labels == 2
    torch.testing.assert_close(rewards.score_sequences(adapter, seqs, tok.pad_token_id), in_memory, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rewards.score_sequences(merged, seqs, tok.pad_token_id), in_memory, atol=1e-5, rtol=1e-5)
    # The head really is trained: a fresh score head would give different scores.
    fresh = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2).eval()
    fresh.config.pad_token_id = tok.pad_token_id
    assert not torch.allclose(rewards.score_sequences(fresh, seqs, tok.pad_token_id), in_memory, atol=1e-3)


def test_lora_training_run_saves_adapter_and_merged(tmp_path):
    cfg = load_config(rm.RMConfig, os.path.join(ROOT, "configs/rm/tiny.yaml"), [
        f"output_dir={tmp_path}", "data.train_files=[builtin:pairs:train:64]", "data.eval_files=[]",
        "train.max_steps=3", "train.per_device_batch_size=8", "train.mixed_precision=no", "log.progress=false",
        "model.lora.enabled=true", "model.lora.r=4", "rm.normalize_on=[builtin:sft:train:16]"])
    rm.train_rm(cfg)
    a, tok_a, _ = rewards.load_reward_model(str(tmp_path / "final_adapter"))
    m, tok_m, info = rewards.load_reward_model(str(tmp_path / "final"))
    prompts, answers = ["review the cafe"] * 2, ["the cafe was nice .", "the menu was awful ."]
    torch.testing.assert_close(rewards.score_texts(a, tok_a, prompts, answers), rewards.score_texts(m, tok_m, prompts, answers),
                               atol=1e-5, rtol=1e-5)
    assert info["scale"][0] > 0


def test_resumed_run_equals_uninterrupted(tmp_path):
    import shutil

    def cfg(out, *extra):
        return load_config(rm.RMConfig, os.path.join(ROOT, "configs/rm/tiny.yaml"), [
            f"output_dir={out}", "data.train_files=[builtin:pairs:train:48]", "data.eval_files=[]",
            "train.max_steps=4", "train.per_device_batch_size=8", "train.mixed_precision=no", "train.save_every=2",
            "train.log_every=1", "log.progress=false", "rm.normalize_on=[builtin:sft:train:16]", *extra])

    rm.train_rm(cfg(tmp_path / "a"))
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    summary = rm.train_rm(cfg(tmp_path / "b", "train.resume=true"))
    assert summary["steps"] == 4
    # B trained only steps 3 and 4 (a run that ignored the checkpoint would log 1..4 and still match A).
    logged = [json.loads(line)["step"] for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert logged == [3, 4], logged
    seqs = [[5, 6, 7, 2], [5, 6, 8, 9, 2]]
    a, _, info_a = rewards.load_reward_model(str(tmp_path / "a" / "final"))
    b, _, info_b = rewards.load_reward_model(str(tmp_path / "b" / "final"))
    torch.testing.assert_close(rewards.score_sequences(b, seqs, 0), rewards.score_sequences(a, seqs, 0), atol=1e-5, rtol=1e-5)
    assert info_a["offset"] == pytest.approx(info_b["offset"], abs=1e-5)


def test_diagnostics_before_ppo_land_in_summary(trained, tiny_model_dir):
    from alignkit.rm_eval import diagnose, write_diagnostics

    cfg, summary = trained
    assert 0 <= summary["eval"]["calibration"]["ece"] <= 0.5
    diag = diagnose(os.path.join(cfg.output_dir, "final"), tiny_model_dir, ["builtin:prompts:eval"], num_prompts=4,
                    n=8, response_length=8, max_length=32)
    assert [r["n"] for r in diag["best_of_n"]] == [1, 2, 4, 8] and diag["prompts"] == 4
    # The RM's own pick can only raise its score; gold's best of N bounds the RM's pick from above.
    scores = [r["score"] for r in diag["best_of_n"]]
    assert scores == sorted(scores) and all(r["gold"] <= r["oracle_gold"] for r in diag["best_of_n"])
    png = write_diagnostics(cfg.output_dir, diag)
    assert os.path.exists(png)
    with open(os.path.join(cfg.output_dir, "summary.json")) as f:
        saved = json.load(f)["diagnostics"]
    assert saved["calibration"] == summary["eval"]["calibration"] and saved["best_of_n"] == diag["best_of_n"]
    with pytest.raises(ConfigError, match="power of two"):
        diagnose(os.path.join(cfg.output_dir, "final"), tiny_model_dir, ["builtin:prompts:eval"], n=48)
