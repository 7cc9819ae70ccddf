"""The whole InstructGPT pipeline in one command: SFT -> reward model -> PPO -> report.

    alignkit pipeline --config configs/pipeline/quickstart.yaml
    alignkit pipeline --config configs/pipeline/quickstart.yaml --stages=[report]   # re-run one stage

One YAML holds the three stage configs (each exactly what `alignkit sft|rm|ppo` reads)
plus the report. Stage outputs go to ``output_dir/{sft,rm,ppo}``; ``@sft`` and ``@rm`` in
a model path stand for the SFT policy and the reward model this pipeline trained.
The report samples the SFT and PPO policies on the same held-out prompts and compares
gold reward, learned reward, KL to the SFT policy, length, and PPO's win rate over SFT.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from alignkit.config import ConfigError, DataConfig, ModelConfig, save_config
from alignkit.losses import sequence_kl
from alignkit.modeling import disable_dropout, load_tokenizer, merge_lora
from alignkit.plots import plot_report
from alignkit.ppo import PPOConfig, train_ppo
from alignkit.rewards import RewardSourceConfig, build_reward
from alignkit.rm import RMConfig, train_rm
from alignkit.rm_eval import diagnose, write_diagnostics
from alignkit.rollout import load_prompts, rollout
from alignkit.sft import SFTConfig, train_sft
from alignkit.tasks import get_task, with_task

STAGE_ORDER = ("sft", "rm", "ppo", "report")


@dataclass
class ReportSettings:
    # Held-out prompts both policies answer (the built-in eval prompts are never trained on).
    prompts: List[str] = field(default_factory=lambda: ["builtin:prompts:eval"])
    num_prompts: int = 256
    # Samples per prompt for each policy (more: less noisy comparison).
    samples_per_prompt: int = 2
    # Same sampling noise for both policies.
    seed: int = 1234
    # Reward-model diagnostics (rm_eval.diagnose): the first this many report prompts (0: skip) ...
    diagnostics_prompts: int = 64
    # ... each answered this many times by the SFT policy: the best-of-N curve runs N = 1, 2, 4 ... this.
    best_of_n: int = 64


@dataclass
class PipelineConfig:
    # Stages to run now; a stage left out must already have its output in output_dir.
    stages: List[str] = field(default_factory=lambda: list(STAGE_ORDER))
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    report: ReportSettings = field(default_factory=ReportSettings)
    output_dir: str = "runs/pipeline"
    # A task of the built-in suite (alignkit.tasks: review, extreme, tradeoff, spurious, format): every
    # builtin:<kind> data spec of every stage becomes builtin:<task>/<kind>. None: specs as written.
    task: Optional[str] = None

    def __post_init__(self):
        if self.task is not None:
            get_task(self.task, "task")
        bad = [s for s in self.stages if s not in STAGE_ORDER]
        if bad:
            raise ConfigError(f"stages: unknown stage(s) {bad}; choose from {list(STAGE_ORDER)}")


def stage_paths(cfg: PipelineConfig) -> dict[str, str]:
    return {s: os.path.join(cfg.output_dir, s) for s in ("sft", "rm", "ppo")}


def apply_task(cfg: PipelineConfig) -> PipelineConfig:
    """``task:`` -> every stage's builtin:<kind> data spec reads builtin:<task>/<kind> (alignkit.tasks)."""
    if cfg.task is not None:
        for name, obj, key in (("sft.data", cfg.sft.data, "train_files"), ("sft.data", cfg.sft.data, "eval_files"),
                               ("rm.data", cfg.rm.data, "train_files"), ("rm.data", cfg.rm.data, "eval_files"),
                               ("rm.rm", cfg.rm.rm, "normalize_on"), ("ppo.data", cfg.ppo.data, "train_files"),
                               ("ppo.data", cfg.ppo.data, "eval_files"), ("report", cfg.report, "prompts")):
            setattr(obj, key, with_task(list(getattr(obj, key) or []), cfg.task, f"{name}.{key}"))
    return cfg


def wire(cfg: PipelineConfig) -> PipelineConfig:
    """Point each stage at the outputs of the ones before it."""
    paths = stage_paths(cfg)
    # In shared-base PPO a LoRA reward model joins the policy's base as an adapter: hand PPO the adapter
    # folder (final/ is the merged copy, a second network in memory).
    rm_final = "final_adapter" if cfg.rm.model.lora.enabled and cfg.ppo.ppo.shared_base else "final"
    finals = {"@sft": os.path.join(paths["sft"], "final"), "@rm": os.path.join(paths["rm"], rm_final)}

    def sub(p: str) -> str:
        return finals.get(p, p)

    cfg.sft.output_dir, cfg.rm.output_dir, cfg.ppo.output_dir = paths["sft"], paths["rm"], paths["ppo"]
    apply_task(cfg)
    cfg.rm.model.name_or_path = sub(cfg.rm.model.name_or_path)
    cfg.ppo.model.name_or_path = sub(cfg.ppo.model.name_or_path)
    if cfg.ppo.ppo.reference:
        cfg.ppo.ppo.reference = sub(cfg.ppo.ppo.reference)
    for src in cfg.ppo.reward.sources:
        src.name_or_path = sub(src.name_or_path)
    return cfg


def run_pipeline(cfg: PipelineConfig) -> dict:
    cfg = wire(cfg)
    os.makedirs(cfg.output_dir, exist_ok=True)
    save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    timings, cpu, summaries = {}, {}, {}
    for stage, fn, stage_cfg in (("sft", train_sft, cfg.sft), ("rm", train_rm, cfg.rm), ("ppo", train_ppo, cfg.ppo)):
        if stage not in cfg.stages:
            continue
        print(f"== alignkit pipeline: {stage} -> {stage_cfg.output_dir}", flush=True)
        t, c = time.time(), time.process_time()
        summaries[stage] = fn(stage_cfg)
        timings[stage], cpu[stage] = round(time.time() - t, 1), round(time.process_time() - c, 1)
    report = None
    if "report" in cfg.stages:
        t, c = time.time(), time.process_time()
        report = write_report(cfg)
        timings["report"], cpu["report"] = round(time.time() - t, 1), round(time.process_time() - c, 1)
    # Wall seconds per stage, and this process's CPU seconds (all threads; less sensitive to other jobs).
    out = {"stage": "pipeline", "seconds": timings, "total_seconds": round(sum(timings.values()), 1),
           "cpu_seconds": cpu, "output_dir": cfg.output_dir}
    if report is not None:
        out["report"] = report
    with open(os.path.join(cfg.output_dir, "pipeline_summary.json"), "w") as f:
        json.dump({**out, "stages": summaries}, f, indent=2, default=str)
    return out


# ----------------------------------------------------------------------------- report


def load_policy(path: str):
    """A saved policy folder: full weights, or a LoRA adapter merged into its base for sampling."""
    from transformers import AutoModelForCausalLM

    if os.path.exists(os.path.join(path, "adapter_config.json")):
        from peft import AutoPeftModelForCausalLM

        model = merge_lora(AutoPeftModelForCausalLM.from_pretrained(path))
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    model.eval().requires_grad_(False)
    return model


@torch.no_grad()
def compare_policies(sft_path: str, ppo_path: str, rm_path: str | None, cfg: PipelineConfig) -> dict:
    """Sample both policies on the same held-out prompts; return per-response arrays."""

    tok = load_tokenizer(ModelConfig(name_or_path=sft_path), padding_side="left")
    data = DataConfig(train_files=cfg.report.prompts, max_length=cfg.ppo.data.max_length, truncation="truncate",
                      packing=False)
    prompts = load_prompts(cfg.report.prompts, tok, data, seed=cfg.report.seed, limit=cfg.report.num_prompts)
    prompts = [p for p in prompts for _ in range(cfg.report.samples_per_prompt)]
    sft, ppo_policy = load_policy(sft_path), load_policy(ppo_path)
    for m in (sft, ppo_policy):
        disable_dropout(m)
    learned = build_reward([RewardSourceConfig(name_or_path=rm_path)]) if rm_path else None
    gold_only = build_reward([RewardSourceConfig(name_or_path="builtin:gold")])
    settings = cfg.ppo.ppo
    chunk = max(1, cfg.ppo.train.per_device_batch_size)
    out = {}
    for name, policy in (("sft", sft), ("ppo", ppo_policy)):
        torch.manual_seed(cfg.report.seed)
        r = rollout(policy, sft, gold_only, prompts, tok, settings.response_length, settings.temperature, chunk,
                    torch.device("cpu"), with_gold=True)
        rec = {"gold": r.gold, "kl": sequence_kl(r.logprobs, r.ref_logprobs, r.response_mask),
               "length": r.response_mask.sum(-1).float(), "eos": r.ended.float(), "texts": r.texts,
               "prompts": r.prompts}
        if learned is not None:
            rec["learned"] = learned(r.prompts, r.texts, r.ended.tolist()).float().cpu()
        out[name] = rec
    return out


def summarize(records: dict) -> dict:
    """Means per policy, PPO's gain in SFT standard deviations, and PPO's gold win rate over SFT."""
    rep = {}
    for name, rec in records.items():
        rep[name] = {"gold_reward": rec["gold"].mean().item(), "gold_reward_std": rec["gold"].std().item(),
                     "kl_to_sft": rec["kl"].mean().item(), "response_length": rec["length"].mean().item(),
                     "eos_share": rec["eos"].mean().item()}
        if "learned" in rec:
            rep[name]["learned_reward"] = rec["learned"].mean().item()
    s, p = records["sft"]["gold"], records["ppo"]["gold"]
    rep["gold_gain"] = (p.mean() - s.mean()).item()
    rep["gold_gain_in_sft_std"] = rep["gold_gain"] / max(s.std().item(), 1e-8)
    # Same prompt, one sample from each policy: a tie counts half (Ouyang et al. 2022 report win rates).
    rep["ppo_win_rate_vs_sft"] = ((p > s).float() + 0.5 * (p == s).float()).mean().item()
    rep["num_responses"] = len(s)
    return rep


def write_report(cfg: PipelineConfig) -> dict:
    paths = stage_paths(cfg)
    sft_path, ppo_path = os.path.join(paths["sft"], "final"), os.path.join(paths["ppo"], "final")
    rm_path = os.path.join(paths["rm"], "final")
    for need in (sft_path, ppo_path):
        if not os.path.isdir(need):
            raise ConfigError(f"report: {need} does not exist: run the earlier stages first")
    records = compare_policies(sft_path, ppo_path, rm_path if os.path.isdir(rm_path) else None, cfg)
    rep = summarize(records)
    ppo_summary = os.path.join(paths["ppo"], "summary.json")
    if os.path.exists(ppo_summary):
        with open(ppo_summary) as f:
            s = json.load(f)
        rep["ppo_kl_target"] = cfg.ppo.ppo.kl_target if cfg.ppo.ppo.adaptive_kl else None
        rep["ppo_updates"] = s.get("updates", s.get("steps"))
    if os.path.isdir(rm_path) and cfg.report.diagnostics_prompts:  # can the RM guide PPO? also in rm/summary.json
        rep["rm_diagnostics"] = diagnose(rm_path, sft_path, cfg.report.prompts, cfg.report.diagnostics_prompts,
                                         cfg.report.best_of_n, seed=cfg.report.seed,
                                         response_length=cfg.ppo.ppo.response_length,
                                         temperature=cfg.ppo.ppo.temperature, max_length=cfg.ppo.data.max_length)
        rep["rm_diagnostics"]["png"] = write_diagnostics(paths["rm"], rep["rm_diagnostics"])
    rep["examples"] = [{"prompt": records["sft"]["prompts"][i], "sft": records["sft"]["texts"][i],
                        "ppo": records["ppo"]["texts"][i]} for i in range(min(5, rep["num_responses"]))]
    with open(os.path.join(cfg.output_dir, "report.json"), "w") as f:
        json.dump(rep, f, indent=2)
    plot_report(records, rep, os.path.join(cfg.output_dir, "report.png"), paths["ppo"])
    return rep
