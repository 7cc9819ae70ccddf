"""The pipeline: wiring of stage outputs, the report's arithmetic, and the notebook run top to bottom."""

import json
import os

import pytest
import torch

from alignkit.config import ConfigError, load_config
from alignkit.pipeline import PipelineConfig, report_table, summarize, wire
from conftest import ROOT

QUICKSTART = os.path.join(ROOT, "configs/pipeline/quickstart.yaml")


def test_quickstart_wires_each_stage_to_the_previous_one(tmp_path):
    cfg = wire(load_config(PipelineConfig, QUICKSTART, [f"output_dir={tmp_path}"]))
    sft_final = os.path.join(str(tmp_path), "sft", "final")
    assert cfg.rm.model.name_or_path == sft_final and cfg.ppo.model.name_or_path == sft_final
    assert cfg.ppo.reward.sources[0].name_or_path == os.path.join(str(tmp_path), "rm", "final")
    assert cfg.ppo.output_dir == os.path.join(str(tmp_path), "ppo")
    with pytest.raises(ConfigError, match="unknown stage"):
        load_config(PipelineConfig, QUICKSTART, ["stages=[sft,ppo2]"])


def test_low_memory_pipeline_hands_ppo_the_reward_adapter(tmp_path):
    cfg = wire(load_config(PipelineConfig, os.path.join(ROOT, "configs/pipeline/low_memory.yaml"),
                           [f"output_dir={tmp_path}"]))
    assert cfg.rm.model.lora.enabled and cfg.ppo.model.lora.enabled and cfg.ppo.ppo.shared_base
    # The adapter folder joins PPO's shared base; final/ (merged) would be a second network in memory.
    assert cfg.ppo.reward.sources[0].name_or_path == os.path.join(str(tmp_path), "rm", "final_adapter")


def test_report_arithmetic_hand_computed():
    # SFT gold [0, 1, 2, 3]: mean 1.5, sample std sqrt(5/3) = 1.29099.
    # PPO gold [1, 1, 4, 5]: mean 2.75 -> gain 1.25 = 0.96825 SFT std.
    # Win rate per prompt: 1>0 win, 1<1? tie (0.5), 4>2 win, 5>3 win -> 3.5 / 4 = 0.875.
    rec = lambda g: {"gold": torch.tensor(g), "kl": torch.tensor([1.0, 2.0, 3.0, 4.0]),
                     "length": torch.tensor([5.0, 5.0, 5.0, 5.0]), "eos": torch.tensor([1.0, 1.0, 0.0, 1.0])}
    rep = summarize({"sft": rec([0.0, 1.0, 2.0, 3.0]), "ppo": rec([1.0, 1.0, 4.0, 5.0])})
    assert rep["gold_gain"] == pytest.approx(1.25)
    assert rep["gold_gain_in_sft_std"] == pytest.approx(1.25 / (5 / 3) ** 0.5, rel=1e-5)
    assert rep["ppo_win_rate_vs_sft"] == pytest.approx(0.875)
    assert rep["ppo"]["kl_to_sft"] == pytest.approx(2.5) and rep["ppo"]["eos_share"] == pytest.approx(0.75)


def test_compare_trains_five_optimisers_from_the_same_sft_policy(tmp_path):
    cfg = wire(load_config(PipelineConfig, os.path.join(ROOT, "configs/pipeline/compare.yaml"),
                           [f"output_dir={tmp_path}"]))
    sft_final, rm_final = (os.path.join(str(tmp_path), s, "final") for s in ("sft", "rm"))
    for name in ("ppo", "rloo", "grpo", "dpo", "kto"):
        stage = getattr(cfg, name)
        assert stage.model.name_or_path == sft_final and stage.output_dir == os.path.join(str(tmp_path), name)
    for name, advantage in (("ppo", "gae"), ("rloo", "rloo"), ("grpo", "grpo")):
        online = getattr(cfg, name)
        assert online.ppo.advantage == advantage
        assert [s.name_or_path for s in online.reward.sources] == [rm_final]  # the same reward model
        # The same sampled responses per update and the same schedule, so the comparison is like for like.
        assert online.ppo.rollout_batch_size == 64 and online.train.max_steps == cfg.ppo.train.max_steps
    assert cfg.grpo.ppo.kl_in_loss and cfg.rloo.ppo.samples_per_prompt == cfg.grpo.ppo.samples_per_prompt == 4
    assert cfg.report.judge == os.path.join(str(tmp_path), "classifier", "final")
    with pytest.raises(ConfigError, match="rloo.ppo.advantage: the rloo stage runs ppo.advantage=rloo"):
        load_config(PipelineConfig, os.path.join(ROOT, "configs/pipeline/compare.yaml"), ["rloo.ppo.advantage=gae"])
    with pytest.raises(ConfigError, match="report.policies: unknown optimiser"):
        load_config(PipelineConfig, QUICKSTART, ["report.policies=[sft]"])


def test_report_of_several_policies_with_a_judge_hand_computed():
    # SFT gold [0, 2]; RLOO [1, 2] -> gain 0.5, SFT std sqrt(2) -> 0.35355 std, wins 1 + tie 0.5 = 0.75;
    # DPO [-1, 0] -> gain -1.5, wins 0. Judge: SFT good 1 of 2, one bad "insult"; RLOO both good.
    def rec(gold, good, cats):
        return {"gold": torch.tensor(gold), "kl": torch.tensor([0.0, 1.0]), "length": torch.tensor([4.0, 6.0]),
                "eos": torch.tensor([1.0, 1.0]), "judged_good": torch.tensor(good), "judged_categories": cats}

    rep = summarize({"sft": rec([0.0, 2.0], [1.0, 0.0], [None, "insult"]),
                     "rloo": rec([1.0, 2.0], [1.0, 1.0], [None, None]),
                     "dpo": rec([-1.0, 0.0], [0.0, 0.0], ["insult", "spam"])})
    assert rep["rloo"]["gold_gain"] == pytest.approx(0.5) and rep["dpo"]["gold_gain"] == pytest.approx(-1.5)
    assert rep["rloo"]["gold_gain_in_sft_std"] == pytest.approx(0.5 / 2 ** 0.5, rel=1e-5)
    assert rep["rloo"]["win_rate_vs_sft"] == pytest.approx(0.75) and rep["dpo"]["win_rate_vs_sft"] == 0.0
    assert rep["sft"]["judged_good_share"] == 0.5 and rep["sft"]["judged_bad_by_category"] == {"insult": 0.5}
    assert rep["dpo"]["judged_bad_by_category"] == {"insult": 0.5, "spam": 0.5}
    assert "ppo_win_rate_vs_sft" not in rep and "win_rate_vs_sft" not in rep["sft"]
    table = report_table(rep, ["rloo", "dpo"]).splitlines()
    assert table[0] == ("| policy | gold reward | gain (SFT std) | KL to SFT | length | win rate vs SFT | "
                        "judged good |")
    assert table[2] == "| sft | +1.00 |  | 0.50 | 5.0 |  | 50% |"
    assert table[3] == "| rloo | +1.50 | +0.35 | 0.50 | 5.0 | 75% | 100% |"


@pytest.mark.slow(seconds=150)
def test_notebook_runs_top_to_bottom_and_ppo_beats_sft(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    examples = os.path.join(ROOT, "examples")
    nb = nbformat.read(os.path.join(examples, "instructgpt_pipeline.ipynb"), as_version=4)
    os.environ["ALIGNKIT_NOTEBOOK_FAST"] = "1"
    os.environ["ALIGNKIT_NOTEBOOK_OUT"] = str(tmp_path / "nb")
    try:
        NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": examples}}).execute()
    finally:
        os.environ.pop("ALIGNKIT_NOTEBOOK_FAST")
        os.environ.pop("ALIGNKIT_NOTEBOOK_OUT")
    report = json.load(open(tmp_path / "nb" / "report.json"))
    assert (tmp_path / "nb" / "report.png").exists()
    # Even the shortened run must align: PPO's held-out gold reward beats the SFT policy's.
    assert report["ppo"]["gold_reward"] > report["sft"]["gold_reward"] + 0.25 * report["sft"]["gold_reward_std"], report
    assert report["ppo_win_rate_vs_sft"] > 0.55, report
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the plots are shown inline


@pytest.mark.slow
def test_small_pipeline_compares_rloo_and_dpo_with_the_evaluator_as_judge_and_reward(tmp_path):
    quiet = {"log": {"progress": False}}
    cfg = load_config(PipelineConfig, data={
        "stages": ["sft", "classifier", "rloo", "dpo", "report"],
        "sft": {**quiet, "model": {"name_or_path": "builtin:tiny"},
                "data": {"train_files": ["builtin:sft:train:200"], "eval_files": [], "max_length": 64},
                "train": {"max_steps": 10, "per_device_batch_size": 8, "learning_rate": 3e-3}},
        "classifier": {**quiet, "model": {"name_or_path": "@sft"},
                       "data": {"train_files": ["builtin:binary:train:64"], "eval_files": ["builtin:binary:eval:32"],
                                "max_length": 64},
                       "train": {"max_steps": 4, "per_device_batch_size": 8}},
        # The evaluator as a second reward source (a weighted good/bad term beside the gold reward).
        "rloo": {**quiet, "model": {"name_or_path": "@sft"},
                 "data": {"train_files": ["builtin:prompts:train:32"], "eval_files": [], "max_length": 32},
                 "train": {"max_steps": 2, "per_device_batch_size": 8},
                 "ppo": {"advantage": "rloo", "samples_per_prompt": 2, "rollout_batch_size": 8, "num_minibatches": 2,
                         "ppo_epochs": 1, "response_length": 8, "eval_samples": 0},
                 "reward": {"sources": [{"name_or_path": "builtin:gold"},
                                        {"name_or_path": "@classifier", "weight": 0.5}]}},
        "dpo": {**quiet, "model": {"name_or_path": "@sft"},
                "data": {"train_files": ["builtin:pairs:train:16"], "eval_files": [], "max_length": 64},
                "train": {"max_steps": 2, "per_device_batch_size": 4}},
        "ppo": {"ppo": {"response_length": 8}},  # the report samples every policy with these settings
        "report": {"num_prompts": 8, "samples_per_prompt": 1},
        "output_dir": str(tmp_path)})
    from alignkit.pipeline import run_pipeline

    out = run_pipeline(cfg)
    rep = json.load(open(tmp_path / "report.json"))
    assert rep["policies"] == ["rloo", "dpo"] and rep["judge"] == str(tmp_path / "classifier" / "final")
    for name in ("sft", "rloo", "dpo"):
        assert 0 <= rep[name]["judged_good_share"] <= 1 and "learned_reward" not in rep[name]  # no rm stage
    assert 0 <= rep["rloo"]["win_rate_vs_sft"] <= 1 and rep["sft"]["kl_to_sft"] == pytest.approx(0, abs=1e-5)
    assert not (tmp_path / "rloo" / "final_value").exists()
    assert (tmp_path / "report.png").exists()
    assert "| rloo |" in (tmp_path / "report.md").read_text() and set(out["seconds"]) == set(cfg.stages)
