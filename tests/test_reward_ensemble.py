"""Reward-model ensembles (Coste et al. 2023): conservative combination, member checks, the pipeline's rm.ensemble."""

import json
import os

import pytest
import torch

from alignkit.config import ConfigError, load_config
from alignkit.ppo import train_ppo
from alignkit.rewards import EnsembleReward, ModelReward, RewardSourceConfig, build_reward, combine_ensemble
from test_ppo import make_reward_model, tiny_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAD = {"aspects": ["overall"], "weights": [1.0], "offset": [0.1], "scale": [0.5]}


def test_combine_ensemble_hand_computed():
    scores = torch.tensor([[1.0, 2.0, -1.0],
                           [3.0, 6.0, -1.0]])
    # mean (2, 4, -1); population std (1, 2, 0)
    torch.testing.assert_close(combine_ensemble(scores, "mean"), torch.tensor([2.0, 4.0, -1.0]))
    torch.testing.assert_close(combine_ensemble(scores, "min"), torch.tensor([1.0, 2.0, -1.0]))
    torch.testing.assert_close(combine_ensemble(scores, "mean_minus_std", 1.0), torch.tensor([1.0, 2.0, -1.0]))
    torch.testing.assert_close(combine_ensemble(scores, "mean_minus_std", 0.5), torch.tensor([1.5, 3.0, -1.0]))
    # Members that agree: no penalty whatever the coefficient.
    same = torch.tensor([[0.3, -2.0]] * 4)
    torch.testing.assert_close(combine_ensemble(same, "mean_minus_std", 5.0), torch.tensor([0.3, -2.0]))


def test_ensemble_source_is_the_conservative_combination_of_its_members(tmp_path):
    paths = [make_reward_model(tmp_path / f"rm{i}", 1, HEAD, seed=i) for i in range(3)]
    prompts, responses = ["review the pizza", "describe the movie"], ["the pizza was great .", "the plot was bad ."]
    singles = torch.stack([ModelReward(RewardSourceConfig(name_or_path=p))(prompts, responses) for p in paths])
    assert singles.std(0).min() > 0  # three different networks
    for combine, coef in (("mean_minus_std", 1.0), ("mean_minus_std", 0.5), ("min", 1.0), ("mean", 1.0)):
        reward = build_reward([RewardSourceConfig(name_or_path="ens", members=paths, combine=combine,
                                                  uncertainty_coef=coef)])
        torch.testing.assert_close(reward(prompts, responses), combine_ensemble(singles, combine, coef))
    ens = reward.sources[0]
    assert isinstance(ens, EnsembleReward) and [m.name for m in reward.models] == paths
    torch.testing.assert_close(ens.spread, singles.std(0, unbiased=False))


def test_ensemble_members_must_agree_on_aspects_and_tokenizer(tmp_path):
    a = make_reward_model(tmp_path / "a", 1, HEAD, seed=0)
    b = make_reward_model(tmp_path / "b", 1, {**HEAD, "aspects": ["helpfulness"]}, seed=1)
    with pytest.raises(ConfigError, match=r"reward.sources.members: the ensemble's members disagree on aspects: "
                                          r".*\['overall'\].*\['helpfulness'\]"):
        build_reward([RewardSourceConfig(name_or_path="ens", members=[a, b])])
    # Same model, another tokenizer (the same words under other ids).
    from transformers import AutoTokenizer

    c = make_reward_model(tmp_path / "c", 1, HEAD, seed=2)
    tok = AutoTokenizer.from_pretrained(c)
    tok.add_tokens(["zzz-extra-word"])
    tok.save_pretrained(c)
    with pytest.raises(ConfigError, match="members disagree on the tokenizer"):
        build_reward([RewardSourceConfig(name_or_path="ens", members=[a, c])])


@pytest.mark.parametrize("overrides, message", [
    ({"members": ["only-one"]}, "reward.sources.members: an ensemble needs at least 2"),
    ({"members": ["a", "b"], "combine": "median"}, "reward.sources.combine: must be one of"),
    ({"members": ["a", "b"], "uncertainty_coef": -1.0}, "reward.sources.uncertainty_coef: must be >= 0"),
])
def test_bad_ensemble_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        RewardSourceConfig(name_or_path="ens", **overrides)


def test_ppo_with_an_ensemble_logs_its_disagreement(tmp_path):
    paths = [make_reward_model(tmp_path / f"rm{i}", 1, HEAD, seed=i) for i in range(2)]
    cfg = tiny_cfg(tmp_path, "train.max_steps=1",
                   data={"reward": {"sources": [{"name_or_path": "ens", "members": paths}]}})
    summary = train_ppo(cfg)
    assert summary["value_init"].endswith("rm0")  # the first member starts the value model
    rows = [json.loads(line) for line in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    assert rows[-1]["objective/ensemble_std"] > 0


def test_kl_controller_observes_k1_whatever_the_reward_estimator(tmp_path, monkeypatch):
    """ppo.kl_target is in the units eval/kl and the report show (k1 sums), also with kl_estimator=k3."""
    import alignkit.ppo as ppo_mod

    seen = []
    real = ppo_mod.sequence_kl

    def spy(logprobs, ref_logprobs, mask, estimator="k1"):
        out = real(logprobs, ref_logprobs, mask, estimator)
        seen.append((estimator, out.mean().item()))
        return out

    monkeypatch.setattr(ppo_mod, "sequence_kl", spy)
    observed = []
    real_update = ppo_mod.AdaptiveKLController.update
    monkeypatch.setattr(ppo_mod.AdaptiveKLController, "update",
                        lambda self, kl, n: (observed.append(float(kl)), real_update(self, kl, n))[1])
    train_ppo(tiny_cfg(tmp_path, "train.max_steps=2", "ppo.kl_estimator=k3"))
    assert len(observed) == 2
    k1 = [v for est, v in seen if est == "k1"]
    assert observed == pytest.approx(k1[-2:], abs=1e-6)
    assert [est for est, _ in seen].count("k3") == 2  # objective/kl_k3, logged once per update; never controlled


def test_pipeline_rm_ensemble_trains_members_and_ppo_reads_them(tmp_path):
    from alignkit.pipeline import PipelineConfig, wire
    from alignkit.rm import RMConfig, train_rm

    cfg = wire(load_config(PipelineConfig, os.path.join(ROOT, "configs/pipeline/quickstart.yaml"),
                           [f"output_dir={tmp_path}", "rm.rm.ensemble=3"]))
    rm_dir = str(tmp_path / "rm")
    assert cfg.ppo.reward.sources[0].members == [os.path.join(rm_dir, "final"),
                                                  os.path.join(rm_dir, "member_1", "final"),
                                                  os.path.join(rm_dir, "member_2", "final")]
    with pytest.raises(ConfigError, match="rm.ensemble: the number of reward models must be >= 1"):
        load_config(RMConfig, os.path.join(ROOT, "configs/rm/tiny.yaml"), ["rm.ensemble=0"])

    rm_cfg = load_config(RMConfig, os.path.join(ROOT, "configs/rm/tiny.yaml"), [
        f"output_dir={tmp_path / 'rm_run'}", "rm.ensemble=2", "data.train_files=[builtin:pairs:train:64]",
        "data.eval_files=[builtin:pairs:eval:16]", "train.num_epochs=1", "train.save_every=0",
        "log.progress=false", "rm.normalize_on=[builtin:sft:train:16]"])
    summary = train_rm(rm_cfg)
    assert [m["seed"] for m in summary["ensemble"]] == [rm_cfg.train.seed, rm_cfg.train.seed + 1]
    from safetensors.torch import load_file

    w = [load_file(os.path.join(m["final_dir"], "model.safetensors")) for m in summary["ensemble"]]
    assert w[0].keys() == w[1].keys() and any(not torch.equal(w[0][k], w[1][k]) for k in w[0])
    with open(os.path.join(rm_cfg.output_dir, "summary.json")) as f:
        assert len(json.load(f)["ensemble"]) == 2


@pytest.mark.slow
def test_an_ensemble_trains_one_member_after_another_under_two_processes(tmp_path):
    """Several stages in one launched process (here the ensemble's members) share its process group: a stage
    ends without destroying it (engine.end_training), so the second member's DDP still has one."""
    from conftest import ACCELERATE, run_processes

    out = tmp_path / "rm"
    run = run_processes([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                         "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(ROOT, "scripts/train_rm.py"),
                         "--config", os.path.join(ROOT, "configs/rm/tiny.yaml"), "--rm.ensemble=2",
                         "--data.train_files=[builtin:pairs:train:32]", "--data.eval_files=[]", "--train.max_steps=2",
                         "--train.per_device_batch_size=4", "--train.save_every=0", "--log.progress=false",
                         "--rm.normalize_on=[builtin:sft:train:8]", f"--output_dir={out}"])
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.load(open(out / "summary.json"))
    assert len(summary["ensemble"]) == 2 and summary["num_processes"] == 2
    second = json.load(open(out / "member_1" / "summary.json"))
    assert second["num_processes"] == 2 and second["steps"] == 2
