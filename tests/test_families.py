"""The model-family matrix (issue 9): every stage on eight real architectures, each with a tokenizer in its
family's convention (tests/families.py has the table), and the invariants that hold whatever the family:

* a reward model's score for a (prompt, answer) is the same on every path that reads it;
* PPO's stored log-probs are those of an independent forward pass at the sampling temperature, and
  sampling ignores the model's own generation_config.json;
* packed rows give the logits of unpacked ones under every attention implementation;
* a resumed run equals an uninterrupted one when accumulation does not divide an epoch;
* answers end with the token the chat template ends a turn with; generation stops at every stop token.

Stages run as a user runs them (``load_config`` + ``train_*``), two or three steps each on tiny data;
trained outputs are shared through the session-scoped ``runs`` fixture.
"""

import json
import os
import shutil

import pytest
import torch

import families
from alignkit.config import ConfigError, DataConfig, ModelConfig, load_config
from alignkit.modeling import ModelLoadError, check_packing_window, load_model, load_tokenizer, resolve_path
from alignkit.rewards import encode_for_reward
from alignkit.schema import Example, load_examples

FAMILIES = families.NAMES
# Short runs on one thread, nothing but what the test reads.
COMMON = ["train.num_threads=1", "train.mixed_precision=no", "log.progress=false", "train.save_every=0",
          "train.eval_every=0", "train.log_every=1", "train.warmup_ratio=0.0"]
PROMPT, ANSWER, OTHER = "review the pizza", "the pizza was great .", "the staff was awful and the food was bad ."


class Runs:
    """Each family's stage outputs, trained on first use and shared by every test of the session:
    ``root/<family>/{sft,rm,ppo}`` (the pipeline's layout, so the report reads them) and ``rm_lora``."""

    def __init__(self, root, dirs):
        self.root, self.dirs, self.done = root, dirs, {}

    def path(self, family, stage):
        return os.path.join(self.root, family, stage)

    def _once(self, key, fn):
        if key not in self.done:
            # No matplotlib figures here (test_pipeline draws them): on 2 shared cores PPO's 12-panel curves.png
            # alone took ~12 s per run, more than training these models; the numbers are what this matrix checks.
            # Patched around each run only: a session-long patch would leave later test files without plots.
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr("alignkit.ppo.plot_metrics", lambda output_dir: None)
                mp.setattr("alignkit.rm.plot_distributions", lambda dists, path: None)
                mp.setattr("alignkit.pipeline.plot_report", lambda records, rep, path, ppo_dir: path)
                self.done[key] = fn()
        return self.done[key]

    def attention(self, family):
        """sdpa where the family has it (alignkit's default), else eager (Gemma 2)."""
        return supported_attention(self.dirs[family])[-1]

    def packs(self, family):
        """Packing is on unless the family slides a window shorter than a row (Gemma 2): a clear error there."""
        from transformers import AutoConfig

        window = getattr(AutoConfig.from_pretrained(self.dirs[family]).get_text_config(), "sliding_window", None)
        return window is None or window >= 128

    def sft(self, family, packing=None, attn=None, extra=()):
        from alignkit.sft import SFTConfig, train_sft

        attn = attn or self.attention(family)
        packing = self.packs(family) if packing is None else packing
        main = packing == self.packs(family) and attn == self.attention(family) and not extra
        name = "sft" if main else f"sft-{packing}-{attn}-{len(extra)}"
        cfg = load_config(SFTConfig, None, [
            f"model.name_or_path={self.dirs[family]}", f"model.attn_implementation={attn}",
            "data.train_files=[builtin:sft:train:24]", "data.eval_files=[]", "data.max_length=128",
            f"data.packing={str(packing).lower()}", "train.max_steps=3", "train.per_device_batch_size=4",
            "train.learning_rate=3e-3", f"output_dir={self.path(family, name)}", *COMMON, *extra])
        return self._once((family, name), lambda: train_sft(cfg))

    def rm(self, family, lora=False):
        from alignkit.rm import RMConfig, train_rm

        self.sft(family)
        name = "rm_lora" if lora else "rm"
        cfg = load_config(RMConfig, None, [
            f"model.name_or_path={self.path(family, 'sft')}/final", f"model.lora.enabled={str(lora).lower()}",
            "data.train_files=[builtin:pairs:train:24]", "data.eval_files=[builtin:pairs:eval:8]",
            "data.max_length=128", "train.max_steps=2", "train.per_device_batch_size=4", "train.learning_rate=3e-3",
            "rm.normalize_on=[builtin:sft:train:8]", f"model.attn_implementation={self.attention(family)}",
            f"data.packing={str(self.packs(family)).lower()}",
            f"output_dir={self.path(family, name)}", *COMMON])
        return self._once((family, name), lambda: train_rm(cfg))

    def ppo(self, family, mode="full"):
        from alignkit.ppo import PPOConfig, train_ppo

        self.sft(family)
        self.rm(family, lora=mode == "shared_base")
        reward = {"full": "rm/final", "lora": "rm/final", "shared_base": "rm_lora/final_adapter"}[mode]
        name = "ppo" if mode == "full" else f"ppo_{mode}"
        cfg = load_config(PPOConfig, None, [
            f"model.name_or_path={self.path(family, 'sft')}/final", f"model.lora.enabled={str(mode != 'full').lower()}",
            f"ppo.shared_base={str(mode == 'shared_base').lower()}",
            "data.train_files=[builtin:prompts:train:16]", "data.eval_files=[]",
            "data.max_length=64", "train.max_steps=2", "train.per_device_batch_size=4", "ppo.rollout_batch_size=4",
            "ppo.num_minibatches=1", "ppo.ppo_epochs=1", "ppo.response_length=10", "ppo.eval_samples=4",
            f"reward.sources=[{{name_or_path: {self.path(family, reward)}}}]", f"output_dir={self.path(family, name)}",
            f"model.attn_implementation={self.attention(family)}", *COMMON])
        return self._once((family, name), lambda: train_ppo(cfg))


@pytest.fixture(scope="session")
def runs(family_dirs, tmp_path_factory):
    return Runs(str(tmp_path_factory.mktemp("family_runs")), family_dirs)


def tokenizer_of(path, padding_side="right"):
    return load_tokenizer(ModelConfig(name_or_path=path), padding_side=padding_side)


def token_id(tok, token):
    return tok.convert_tokens_to_ids(token)


def supported_attention(family_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    cls = AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(family_dir))]
    return ["eager"] + (["sdpa"] if cls._supports_sdpa else [])


# ============================================================================= every stage on every family


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("packing", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize("family", FAMILIES)
def test_sft_runs(runs, family, packing, attn):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if attn not in supported_attention(runs.dirs[family]):  # a clear error, before any training
        with pytest.raises(ModelLoadError, match="model.attn_implementation"):
            runs.sft(family, packing, attn)
        return
    try:
        summary = runs.sft(family, packing, attn)
    except ConfigError as e:  # packing that the attention implementation cannot isolate: a clear error
        assert packing and ("attn_implementation" in str(e) or "sliding-window" in str(e)), e
        return
    assert summary["steps"] == 3 and torch.isfinite(torch.tensor(summary["train_loss"]))
    final = summary["final_dir"]
    assert AutoModelForCausalLM.from_pretrained(final).config.model_type == families.BY_NAME[family].model_type
    assert len(AutoTokenizer.from_pretrained(final)) == len(AutoTokenizer.from_pretrained(runs.dirs[family]))


@pytest.mark.parametrize("family", FAMILIES)
def test_rm_runs(runs, family):
    from transformers import AutoModelForSequenceClassification

    summary = runs.rm(family)
    assert summary["steps"] == 2 and summary["eval"]["pairs"] > 0
    model = AutoModelForSequenceClassification.from_pretrained(summary["final_dir"])
    assert model.config.alignkit_reward["aspects"] == ["overall"] and model.config.num_labels == 1


@pytest.mark.parametrize("mode", ["full", "lora", "shared_base"])
@pytest.mark.parametrize("family", FAMILIES)
def test_ppo_runs(runs, family, mode):
    summary = runs.ppo(family, mode)
    assert summary["updates"] == 2 and summary["memory_mode"] == mode
    assert torch.isfinite(torch.tensor(summary["last"]["objective/score"]))
    if mode == "shared_base":  # the LoRA reward model joined the policy's base as an adapter
        assert "reward adapter" in summary["value_init"]
    final = summary["final_dir"]
    weights = "adapter_model.safetensors" if mode != "full" else "model.safetensors"
    assert os.path.exists(os.path.join(final, weights))


@pytest.mark.parametrize("family", FAMILIES)
def test_rm_eval_and_report(runs, family, tmp_path):
    from alignkit.pipeline import PipelineConfig, write_report
    from alignkit.rm_eval import rm_eval

    runs.ppo(family)
    metrics = rm_eval(os.path.join(runs.path(family, "rm"), "final"), ["builtin:pairs:eval:8"], str(tmp_path))
    assert metrics["pairs"] > 0 and 0.0 <= metrics["accuracy"] <= 1.0
    assert json.loads((tmp_path / "rm_eval.json").read_text())["pairs"] == metrics["pairs"]
    cfg = load_config(PipelineConfig, data={
        "stages": ["report"], "output_dir": os.path.join(runs.root, family),
        "report": {"num_prompts": 4, "samples_per_prompt": 1, "diagnostics_prompts": 2, "best_of_n": 4},
        "ppo": {"data": {"max_length": 64}, "train": {"per_device_batch_size": 4}, "ppo": {"response_length": 10}}})
    rep = write_report(cfg)
    assert rep["num_responses"] == 4 and 0.0 <= rep["ppo_win_rate_vs_sft"] <= 1.0
    assert "learned_reward" in rep["ppo"]  # the family's own reward model read the report's answers
    assert os.path.exists(os.path.join(runs.root, family, "report.json"))


# ============================================================================= one reward, whichever path reads it


def reward_scores_by_path(rm_dir: str, shared_base_of: str | None = None) -> dict[str, float]:
    """The raw score of (PROMPT, ANSWER) from every path that reads a reward model (one aspect)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignkit.rewards import ModelReward, RewardSourceConfig
    from alignkit.rm import RewardForward, normalization_stats
    from alignkit.rm_data import RewardSettings, build_elements, collate_elements, pack_elements
    from alignkit.rm_eval import evaluate

    final = os.path.join(rm_dir, "final")
    out = {}
    # The reference: transformers' own classifier and the saved tokenizer, one unpadded sequence.
    hf = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    ids = encode_for_reward(tokenizer_of(final), PROMPT, ANSWER)
    with torch.no_grad():
        out["AutoModelForSequenceClassification"] = hf(input_ids=torch.tensor([ids])).logits[0, 0].item()
    # RM training's forward, padded and packed, on the element the data pipeline builds.
    example = Example(prompt=PROMPT, answers=[ANSWER, OTHER], source="test:1",
                      labels=[_pairwise()])
    elements, _ = build_elements([example], RewardSettings(), tokenizer_of(final), 128, "error")
    assert elements[0].sequences[0] == ids, "RM training encodes the text differently from encode_for_reward"
    pad = hf.config.pad_token_id
    with torch.no_grad():
        padded = collate_elements(elements, tok.pad_token_id if tok.pad_token_id is not None else pad, 1)
        out["RM training (padded)"] = RewardForward(hf, pad)(padded["input_ids"], padded["attention_mask"])[0, 0].item()
        if window_of(final) is None:  # a sliding window refuses packing (tests below)
            packed = pack_elements(elements, pad, 1, 128, attn_implementation=hf.config._attn_implementation)
            out["RM training (packed)"] = RewardForward(hf, pad)(packed["input_ids"], packed["attention_mask"],
                                                            packed["position_ids"], packed["read_index"])[0, 0].item()
    # RM evaluation (the winner's raw score) and normalisation (the mean of one answer is its score).
    info = {"aspects": ["overall"], "weights": [1.0], "offset": [0.0], "scale": [1.0]}
    _, dists = evaluate(hf, elements, info, pad)
    out["RM evaluation"] = dists["overall"][0][0]
    out["normalisation"] = normalization_stats(hf, [ids], pad)[0][0]
    # PPO's reward, from the folder as a user configures it.
    reward = ModelReward(RewardSourceConfig(name_or_path=final))
    out["PPO reward (ModelReward)"] = reward.raw_scores([PROMPT], [ANSWER])[0, 0].item()
    if shared_base_of is not None:  # the LoRA reward model as an adapter on the policy's own base
        from alignkit.adapters import SharedBase
        from alignkit.modeling import load_model

        cfg = ModelConfig(name_or_path=shared_base_of, attn_implementation=supported_attention(shared_base_of)[-1])
        cfg.lora.enabled = True
        policy = load_model(cfg, task="causal-lm")
        shared = ModelReward(RewardSourceConfig(name_or_path=os.path.join(rm_dir, "final_adapter")),
                             shared_base=SharedBase(policy, resolve_path(shared_base_of)))
        assert shared.shared
        out["PPO reward (shared base)"] = shared.raw_scores([PROMPT], [ANSWER])[0, 0].item()
    return out


def _pairwise():
    from alignkit.schema import Label

    return Label(kind="pairwise", chosen=0, rejected=1)


def assert_same_scores(scores: dict[str, float], atol=1e-5):
    ref = scores["AutoModelForSequenceClassification"]
    wrong = {k: round(v, 6) for k, v in scores.items() if abs(v - ref) > atol}
    assert not wrong, f"paths disagree with AutoModelForSequenceClassification ({ref:.6f}): {wrong}"


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_score_is_the_same_on_every_path(runs, family, tmp_path):
    from alignkit.rm_eval import rm_eval

    runs.rm(family)
    scores = reward_scores_by_path(runs.path(family, "rm"))
    # rm-eval on a one-pair file: its mean margin is score(ANSWER) - score(OTHER).
    data = tmp_path / "pair.jsonl"
    data.write_text(json.dumps({"prompt": PROMPT, "chosen": ANSWER, "rejected": OTHER}) + "\n")
    from transformers import AutoModelForSequenceClassification


    final = os.path.join(runs.path(family, "rm"), "final")
    hf = AutoModelForSequenceClassification.from_pretrained(final).eval()
    with torch.no_grad():
        s_other = hf(input_ids=torch.tensor([encode_for_reward(tokenizer_of(final), PROMPT, OTHER)])).logits[0, 0].item()
    scores["rm-eval"] = rm_eval(final, [str(data)])["mean_margin"] + s_other
    assert_same_scores(scores)


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_score_is_the_same_on_a_shared_base(runs, family):
    runs.rm(family, lora=True)
    assert_same_scores(reward_scores_by_path(runs.path(family, "rm_lora"), runs.path(family, "sft") + "/final"))


# ============================================================================= PPO's samples and log-probs


def ppo_prompts(tok, n=4):
    from alignkit.rollout import load_prompts

    return load_prompts([f"builtin:prompts:train:{n}"], tok, DataConfig(max_length=64), seed=0)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_ppo_logprobs_equal_an_independent_forward_pass(runs, family):
    """rollout's stored log-probs vs plain model(ids).logits / T -> log_softmax -> gather, row by row unpadded."""
    from transformers import AutoModelForCausalLM

    from alignkit.rollout import rollout
    from alignkit.rewards import RewardSourceConfig, build_reward

    runs.sft(family)
    final = runs.path(family, "sft") + "/final"
    policy = AutoModelForCausalLM.from_pretrained(final).eval()
    tok = tokenizer_of(final, padding_side="left")
    T = 0.7
    torch.manual_seed(0)
    r = rollout(policy, policy, build_reward([RewardSourceConfig(name_or_path="builtin:gold")]), ppo_prompts(tok), tok,
                8, T, 4, torch.device("cpu"))
    for i in range(len(r.texts)):
        query = r.query[i][r.query_mask[i].bool()]
        response = r.response[i][r.response_mask[i]]
        ids = torch.cat([query, response])[None]
        with torch.no_grad():
            logprobs = torch.log_softmax(policy(input_ids=ids).logits[0].float() / T, -1)
        expected = logprobs[len(query) - 1:-1].gather(-1, response[:, None])[:, 0]
        torch.testing.assert_close(r.logprobs[i][r.response_mask[i]], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_ignores_the_models_generation_config(runs, family, tmp_path):
    """The same seed draws the same tokens whatever generation_config.json says (repetition_penalty 2.0, ...)."""
    from transformers import AutoModelForCausalLM

    from alignkit.rollout import left_pad, sample

    runs.sft(family)
    final = runs.path(family, "sft") + "/final"
    tok = tokenizer_of(final, padding_side="left")
    fam = families.BY_NAME[family]
    drawn = []
    for name, config in (("plain", {}), ("sampling", {**families.SAMPLING, "repetition_penalty": 2.0,
                                                      "no_repeat_ngram_size": 2, "top_k": 3, "min_p": 0.3})):
        folder = tmp_path / name
        shutil.copytree(final, folder)
        gen = families.generation_config(fam, tok, **config)
        if not config:
            gen = {k: v for k, v in gen.items() if k in ("eos_token_id", "bos_token_id", "pad_token_id")}
        families.write_generation_config(str(folder), gen)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        b_query, b_query_mask = left_pad([p.ids for p in ppo_prompts(tok, 8)], tok.pad_token_id)
        torch.manual_seed(0)
        drawn.append(sample(model, b_query, b_query_mask, tok, 12, 1.0))
    assert torch.equal(drawn[0], drawn[1]), "generation_config.json changed what PPO samples"


STOP_CASES = [(f.name, "eos") for f in families.FAMILIES] + \
             [(f.name, "turn_end") for f in families.FAMILIES if f.turn_end != f.eos]


@pytest.mark.parametrize("family,which", STOP_CASES)
def test_generation_stops_at_every_stop_token(runs, family, which):
    """A policy that always emits the stop token: each response is that one token, and it counts as ended."""
    from transformers import AutoModelForCausalLM

    from alignkit.rollout import rollout
    from alignkit.rewards import RewardSourceConfig, build_reward

    runs.sft(family)
    final = runs.path(family, "sft") + "/final"
    fam = families.BY_NAME[family]
    tok = tokenizer_of(final, padding_side="left")
    stop = token_id(tok, fam.eos if which == "eos" else fam.turn_end)
    policy = AutoModelForCausalLM.from_pretrained(final).eval()
    boost = torch.zeros(policy.config.get_text_config().vocab_size)
    boost[stop] = 1e4
    policy.get_output_embeddings().register_forward_hook(lambda module, args, out: out + boost)
    torch.manual_seed(0)
    r = rollout(policy, policy, build_reward([RewardSourceConfig(name_or_path="builtin:gold")]), ppo_prompts(tok), tok,
                6, 1.0, 4, torch.device("cpu"))
    assert r.response[:, 0].tolist() == [stop] * 4, "the sampler never drew the boosted stop token"
    assert r.ended.all(), f"{fam.eos if which == 'eos' else fam.turn_end} did not end the responses"
    assert r.response_mask.sum(-1).tolist() == [1] * 4


# ============================================================================= answers end where the template ends a turn


@pytest.mark.parametrize("family", FAMILIES)
def test_answers_end_with_the_templates_turn_end(family_dirs, family):
    from alignkit.tokenization import encode_answer, encode_prompt

    fam = families.BY_NAME[family]
    tok = tokenizer_of(family_dirs[family])
    answer = encode_answer(tok, ANSWER)
    assert tok.convert_ids_to_tokens(answer[-1:]) == [fam.turn_end]
    # Prompt + answer are the template's rendering of the whole conversation, up to what the template adds after
    # the turn ("\n", EOS). Compared as text without whitespace and BOS: SentencePiece tokenizers split the
    # boundary "\nanswer" in context differently from the answer alone, which is fine as long as SFT, PPO and the
    # reward model all use prompt ids + answer ids.
    messages = [{"role": "user", "content": PROMPT}]
    ours = tok.decode(encode_prompt(tok, messages) + answer, skip_special_tokens=False)
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": ANSWER}], tokenize=False)

    def squeeze(text):
        return "".join(text.replace(tok.bos_token or "\0", "").split())

    assert squeeze(full).startswith(squeeze(ours)), (full, ours)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_carry_exactly_one_bos(family_dirs, family):
    from alignkit.tokenization import encode_prompt

    fam = families.BY_NAME[family]
    tok = tokenizer_of(family_dirs[family])
    ids = encode_prompt(tok, [{"role": "user", "content": PROMPT}])
    if fam.add_bos:  # the family's tokenizer starts every text with BOS: so does the prompt, once
        assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:] or fam.bos == fam.eos
        assert ids[:2] != [tok.bos_token_id] * 2
    else:
        assert tok.bos_token_id is None or ids[0] != tok.bos_token_id


def test_sft_loss_mask_agrees_with_the_templates_generation_block(family_dirs):
    """qwen2's template marks the assistant's tokens with {% generation %}: SFT's labels are exactly those."""
    from alignkit.tokenization import IGNORE_INDEX, encode_pairs, sft_rows

    tok = tokenizer_of(family_dirs["qwen2"])
    conversation = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWER}]
    rendered = tok.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                       return_assistant_tokens_mask=True)
    marked = [t for t, m in zip(rendered["input_ids"], rendered["assistant_masks"]) if m]
    assert tok.convert_ids_to_tokens(marked[-1:]) == ["<|im_end|>"]
    encoded, _ = encode_pairs(tok, [(Example(prompt=PROMPT), ANSWER)], 128, "error")
    row = sft_rows(encoded, 128, packing=False)[0]
    assert [t for t in row["labels"] if t != IGNORE_INDEX] == marked
    # And the labelled tokens sit where the template puts them: the rendering starts with the row.
    assert rendered["input_ids"][:len(row["input_ids"])] == row["input_ids"]


# ============================================================================= packing isolates examples


def sliding_window(model):
    return getattr(model.config.get_text_config(), "sliding_window", None)


def window_of(folder):
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(folder).get_text_config(), "sliding_window", None)


def _packed_sft_logits(model, tok):
    from alignkit.tokenization import collate_sft, encode_pairs, sft_rows

    pairs = [(Example(prompt=PROMPT), ANSWER), (Example(prompt="describe the car"), OTHER)]
    encoded, _ = encode_pairs(tok, pairs, 128, "error")
    rows = sft_rows(encoded, 128, packing=True)
    assert len(rows) == 1 and len(rows[0]["seq_lens"]) == 2
    packed = collate_sft(rows, tok.pad_token_id, attn_implementation=model.config._attn_implementation)
    with torch.no_grad():
        out = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                    position_ids=packed["position_ids"]).logits[0]
        start, pieces = 0, []
        for n in rows[0]["seq_lens"]:
            ids = packed["input_ids"][:, start:start + n]
            pieces.append((out[start:start + n], model(input_ids=ids).logits[0]))
            start += n
    return pieces


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_sft_rows_give_unpacked_logits(family_dirs, family, attn):
    from transformers import AutoModelForCausalLM

    if attn not in supported_attention(family_dirs[family]):  # e.g. Gemma 2 has no sdpa: a clear error
        with pytest.raises(ModelLoadError, match="model.attn_implementation"):
            load_model(ModelConfig(name_or_path=family_dirs[family], attn_implementation=attn))
        return
    model = AutoModelForCausalLM.from_pretrained(family_dirs[family], attn_implementation=attn).eval()
    if sliding_window(model) is not None:  # e.g. Gemma 2: one mask per row would replace the window
        with pytest.raises(ConfigError, match="data.packing: .* sliding-window attention"):
            check_packing_window(model, DataConfig(max_length=128))
        return
    for got, alone in _packed_sft_logits(model, tokenizer_of(family_dirs[family])):
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_rm_rows_give_padded_scores(runs, family, attn):
    from transformers import AutoModelForSequenceClassification

    from alignkit.rm import RewardForward
    from alignkit.rm_data import RewardSettings, build_elements, collate_elements, pack_elements

    runs.rm(family)
    final = os.path.join(runs.path(family, "rm"), "final")
    if attn not in supported_attention(final):  # e.g. Gemma 2 has no sdpa: a clear error
        with pytest.raises(ModelLoadError, match="model.attn_implementation"):
            load_model(ModelConfig(name_or_path=final, attn_implementation=attn), task="reward")
        return
    model = AutoModelForSequenceClassification.from_pretrained(final, attn_implementation=attn).eval()
    if sliding_window(model) is not None:
        with pytest.raises(ConfigError, match="data.packing: .* sliding-window attention"):
            check_packing_window(model, DataConfig(max_length=128))
        return
    tok = tokenizer_of(final)
    examples = load_examples(["builtin:rankings:train:3"])
    elements, _ = build_elements(examples, RewardSettings(), tok, 128, "error")
    pad = model.config.pad_token_id
    with torch.no_grad():
        padded = collate_elements(elements, pad, 1)
        expected = RewardForward(model, pad)(padded["input_ids"], padded["attention_mask"])
        packed = pack_elements(elements, pad, 1, 128, attn_implementation=attn)
        assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # answers share rows
        got = RewardForward(model, pad)(packed["input_ids"], packed["attention_mask"], packed["position_ids"],
                                        packed["read_index"])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


# ============================================================================= resume with uneven accumulation


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def _assert_resume_matches(run, output_dir):
    """run(extra overrides) trains 2 steps; the resumed run restarts from the step-1 checkpoint."""
    run(["train.save_every=1"])
    reference = _weights(os.path.join(output_dir, "final"))
    os.rename(os.path.join(output_dir, "final"), os.path.join(output_dir, "final_uninterrupted"))
    shutil.rmtree(os.path.join(output_dir, "checkpoint-2"), ignore_errors=True)
    run(["train.save_every=1", "train.resume=true"])
    again = _weights(os.path.join(output_dir, "final"))
    wrong = [k for k in reference if not torch.allclose(again[k], reference[k], atol=1e-6, rtol=1e-5)]
    assert not wrong, f"the resumed run trained on other batches: {len(wrong)} tensors differ, e.g. {wrong[:2]}"


# Accumulation 3 over 4 micro-batches per epoch (10 rows in micro-batches of 3), on every family: issue 9's error 4.
# Accumulation 1 on the families whose configs keep dropout on (GPT-2, OPT: 0.1): a resumed run must also draw
# the uninterrupted run's dropout masks.
RESUME_CASES = [(f, 3) for f in FAMILIES] + [(f.name, 1) for f in families.FAMILIES if f.name in ("gpt2", "opt")]


@pytest.mark.parametrize("family,accumulation", RESUME_CASES)
def test_resumed_sft_equals_uninterrupted(family_dirs, family, accumulation, tmp_path):
    from alignkit.sft import SFTConfig, train_sft

    def run(extra):
        train_sft(load_config(SFTConfig, None, [
            f"model.name_or_path={family_dirs[family]}",
            f"model.attn_implementation={supported_attention(family_dirs[family])[-1]}",
            "data.train_files=[builtin:sft:train:10]", "data.eval_files=[]", "data.max_length=128",
            "data.packing=false", "train.max_steps=2", "train.per_device_batch_size=3",
            f"train.gradient_accumulation_steps={accumulation}", "train.learning_rate=3e-3",
            "train.lr_scheduler=constant", f"output_dir={tmp_path}", *COMMON, *extra]))

    _assert_resume_matches(run, str(tmp_path))


@pytest.mark.parametrize("family,accumulation", RESUME_CASES)
def test_resumed_rm_equals_uninterrupted(family_dirs, family, accumulation, tmp_path):
    from alignkit.rm import RMConfig, train_rm

    def run(extra):
        train_rm(load_config(RMConfig, None, [
            f"model.name_or_path={family_dirs[family]}",
            f"model.attn_implementation={supported_attention(family_dirs[family])[-1]}",
            "data.train_files=[builtin:pairs:train:10]", "data.eval_files=[]", "data.max_length=128",
            "train.max_steps=2", "train.per_device_batch_size=3",
            f"train.gradient_accumulation_steps={accumulation}", "train.learning_rate=3e-3",
            "train.lr_scheduler=constant", "rm.normalize_on=[builtin:sft:train:4]", f"output_dir={tmp_path}",
            f"data.packing={str(window_of(family_dirs[family]) is None).lower()}", *COMMON, *extra]))

    _assert_resume_matches(run, str(tmp_path))
