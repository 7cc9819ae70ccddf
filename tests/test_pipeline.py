"""The pipeline: wiring of stage outputs, the report's arithmetic, and the notebook run top to bottom."""

import json
import os

import pytest
import torch

from alignkit.config import ConfigError, load_config
from alignkit.pipeline import PipelineConfig, summarize, wire
from conftest import ROOT

QUICKSTART = os.path.join(ROOT, "configs/pipeline/quickstart.yaml")


def test_quickstart_wires_each_stage_to_the_previous_one(tmp_path):
    cfg = wire(load_config(PipelineConfig, QUICKSTART, [f"output_dir={tmp_path}"]))
    sft_final = os.path.join(str(tmp_path), "sft", "final")
    assert cfg.rm.model.name_or_path == sft_final and cfg.ppo.model.name_or_path == sft_final
    assert cfg.ppo.reward.sources[0].name_or_path == os.path.join(str(tmp_path), "rm", "final")
    assert cfg.ppo.output_dir == os.path.join(str(tmp_path), "ppo")
    with pytest.raises(ConfigError, match="unknown stage"):
        load_config(PipelineConfig, QUICKSTART, ["stages=[sft,dpo]"])


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
