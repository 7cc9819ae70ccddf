"""The whole InstructGPT pipeline in one command: SFT -> reward model -> optimiser(s) -> report.

    alignkit pipeline --config configs/pipeline/quickstart.yaml
    alignkit pipeline --config configs/pipeline/quickstart.yaml --stages=[report]   # re-run one stage
    alignkit pipeline --config configs/pipeline/compare.yaml      # PPO, RLOO, GRPO, DPO, KTO side by side

One YAML holds the stage configs (each exactly what `alignkit sft|rm|classifier|ppo|dpo|kto` reads)
plus the report. ``stages`` chooses what runs now and so which optimiser trains the SFT policy:
``ppo``, ``rloo`` and ``grpo`` are PPO's loop (``alignkit ppo``) with ``ppo.advantage`` gae, rloo or
grpo and read the reward model; ``dpo`` and ``kto`` learn from the preference / good-bad labels
directly (the reward model still scores them in the report). Stage outputs go to
``output_dir/<stage>``; ``@sft``, ``@rm`` and ``@classifier`` in a model path stand for the SFT policy,
the reward model and the evaluator this pipeline trained (e.g. the evaluator as a weighted reward source).
The report samples the SFT policy and every optimised one on the same held-out prompts and puts
them side by side: gold reward, learned reward, KL to the SFT policy, length, win rate over SFT,
and the evaluator's verdicts when there is one.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from alignkit.classifier import ClassifierConfig, Judge, train_classifier
from alignkit.config import ConfigError, DataConfig, ModelConfig, save_config
from alignkit.dpo import DPOConfig, KTOConfig, train_dpo, train_kto
from alignkit.losses import sequence_kl
from alignkit.modeling import disable_dropout, load_tokenizer, merge_lora
from alignkit.plots import plot_report
from alignkit.ppo import PPOConfig, PPOSettings, train_ppo
from alignkit.rewards import RewardSourceConfig, build_reward
from alignkit.rm import RMConfig, ensemble_dirs, train_rm
from alignkit.rm_eval import diagnose, write_diagnostics
from alignkit.rollout import load_prompts, rollout
from alignkit.sft import SFTConfig, train_sft
from alignkit.tasks import get_task, with_task

# What each optimiser stage runs; rloo and grpo are PPO's loop with a critic-free advantage.
OPTIMIZERS = {"ppo": train_ppo, "rloo": train_ppo, "grpo": train_ppo, "dpo": train_dpo, "kto": train_kto}
STAGE_ORDER = ("sft", "rm", "classifier", *OPTIMIZERS, "report")


@dataclass
class ReportSettings:
    # Held-out prompts every policy answers (the built-in eval prompts are never trained on).
    prompts: List[str] = field(default_factory=lambda: ["builtin:prompts:eval"])
    num_prompts: int = 256
    # Samples per prompt for each policy (more: less noisy comparison).
    samples_per_prompt: int = 2
    # Same sampling noise for every policy.
    seed: int = 1234
    # Optimiser outputs compared with SFT; empty: every optimiser in `stages` or with an output_dir/<name>/final
    # (so --stages=[kto,report] re-trains one and still compares all).
    policies: List[str] = field(default_factory=list)
    # Evaluator whose verdicts the report adds: @classifier (this pipeline's, when trained), a folder, or null.
    judge: Optional[str] = "@classifier"
    # Reward-model diagnostics (rm_eval.diagnose): the first this many report prompts (0: skip) ...
    diagnostics_prompts: int = 64
    # ... each answered this many times by the SFT policy: the best-of-N curve runs N = 1, 2, 4 ... this.
    best_of_n: int = 64


@dataclass
class PipelineConfig:
    # Stages to run now; a stage left out must already have its output in output_dir.
    stages: List[str] = field(default_factory=lambda: ["sft", "rm", "ppo", "report"])
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    # Evaluator model (good/bad judge): a reward source (@classifier), and the report's judge.
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    rloo: PPOConfig = field(default_factory=lambda: PPOConfig(ppo=PPOSettings(advantage="rloo", samples_per_prompt=4)))
    grpo: PPOConfig = field(default_factory=lambda: PPOConfig(ppo=PPOSettings(advantage="grpo", samples_per_prompt=4,
                                                                            kl_in_loss=True, kl_estimator="k3")))
    dpo: DPOConfig = field(default_factory=DPOConfig)
    kto: KTOConfig = field(default_factory=KTOConfig)
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
        bad = [p for p in self.report.policies if p not in OPTIMIZERS]
        if bad:
            raise ConfigError(f"report.policies: unknown optimiser(s) {bad}; choose from {list(OPTIMIZERS)}")
        for name in ("rloo", "grpo"):  # the stage's name says which advantage it runs
            if getattr(self, name).ppo.advantage != name:
                raise ConfigError(f"{name}.ppo.advantage: the {name} stage runs ppo.advantage={name}, got "
                                  f"{getattr(self, name).ppo.advantage!r}")


def stage_paths(cfg: PipelineConfig) -> dict[str, str]:
    return {s: os.path.join(cfg.output_dir, s) for s in STAGE_ORDER if s != "report"}


def apply_task(cfg: PipelineConfig) -> PipelineConfig:
    """``task:`` -> every stage's builtin:<kind> data spec reads builtin:<task>/<kind> (alignkit.tasks)."""
    if cfg.task is not None:
        targets = [(f"{stage}.data", getattr(cfg, stage).data, key) for stage in ("sft", "rm", "classifier", *OPTIMIZERS)
                   for key in ("train_files", "eval_files")]
        targets += [("rm.rm", cfg.rm.rm, "normalize_on"), ("report", cfg.report, "prompts")]
        for name, obj, key in targets:
            setattr(obj, key, with_task(list(getattr(obj, key) or []), cfg.task, f"{name}.{key}"))
    return cfg


def wire(cfg: PipelineConfig) -> PipelineConfig:
    """Point each stage at the outputs of the ones before it."""
    paths = stage_paths(cfg)
    finals = {"@sft": os.path.join(paths["sft"], "final"), "@rm": os.path.join(paths["rm"], "final"),
              "@classifier": os.path.join(paths["classifier"], "final")}

    def sub(p: str, shared_base: bool = False) -> str:
        # In shared-base PPO a LoRA reward model joins the policy's base as an adapter: hand PPO the adapter
        # folder (final/ is the merged copy, a second network in memory).
        if p == "@rm" and shared_base and cfg.rm.model.lora.enabled:
            return os.path.join(paths["rm"], "final_adapter")
        return finals.get(p, p)

    apply_task(cfg)
    for stage in ("sft", "rm", "classifier", *OPTIMIZERS):
        stage_cfg = getattr(cfg, stage)
        stage_cfg.output_dir = paths[stage]
        stage_cfg.model.name_or_path = sub(stage_cfg.model.name_or_path)
    for stage in ("ppo", "rloo", "grpo"):
        online = getattr(cfg, stage)
        if online.ppo.reference:
            online.ppo.reference = sub(online.ppo.reference)
        for src in online.reward.sources:
            if src.name_or_path == "@rm" and cfg.rm.rm.ensemble > 1 and not src.members:
                # rm.ensemble: this pipeline's reward models, read as one conservative reward
                leaf = "final_adapter" if online.ppo.shared_base and cfg.rm.model.lora.enabled else "final"
                src.members = [os.path.join(d, leaf) for d in ensemble_dirs(cfg.rm)]
            src.name_or_path = sub(src.name_or_path, online.ppo.shared_base)
    for offline in (cfg.dpo.dpo, cfg.kto.kto):
        if offline.reference:
            offline.reference = sub(offline.reference)
    if cfg.report.judge:
        cfg.report.judge = sub(cfg.report.judge)
    return cfg


def run_pipeline(cfg: PipelineConfig) -> dict:
    cfg = wire(cfg)
    os.makedirs(cfg.output_dir, exist_ok=True)
    save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    timings, cpu, summaries = {}, {}, {}
    trainers = {"sft": train_sft, "rm": train_rm, "classifier": train_classifier, **OPTIMIZERS}
    for stage in STAGE_ORDER[:-1]:
        if stage not in cfg.stages:
            continue
        stage_cfg = getattr(cfg, stage)
        print(f"== alignkit pipeline: {stage} -> {stage_cfg.output_dir}", flush=True)
        t, c = time.time(), time.process_time()
        summaries[stage] = trainers[stage](stage_cfg)
        timings[stage], cpu[stage] = round(time.time() - t, 1), round(time.process_time() - c, 1)
    report = None
    if "report" in cfg.stages:
        t, c = time.time(), time.process_time()
        report = write_report(cfg)
        timings["report"], cpu["report"] = round(time.time() - t, 1), round(time.process_time() - c, 1)
    # Wall seconds per stage, and this process's CPU seconds (all threads; less sensitive to other jobs).
    out = {"stage": "pipeline", "seconds": timings, "total_seconds": round(sum(timings.values()), 1),
           "cpu_seconds": cpu, "total_cpu_seconds": round(sum(cpu.values()), 1), "output_dir": cfg.output_dir}
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
def compare_policies(sft_path: str, policy_paths, rm_path: str | None, cfg: PipelineConfig,
                     judge_path: str | None = None) -> dict:
    """Sample SFT and each policy ({name: folder}; a single folder is "ppo") on the same held-out
    prompts with the same noise; return per-response arrays per policy, SFT first."""
    if isinstance(policy_paths, str):
        policy_paths = {"ppo": policy_paths}
    tok = load_tokenizer(ModelConfig(name_or_path=sft_path), padding_side="left")
    data = DataConfig(train_files=cfg.report.prompts, max_length=cfg.ppo.data.max_length, truncation="truncate",
                      packing=False)
    prompts, _ = load_prompts(cfg.report.prompts, tok, data, seed=cfg.report.seed, limit=cfg.report.num_prompts)
    prompts = [p for p in prompts for _ in range(cfg.report.samples_per_prompt)]
    sft = load_policy(sft_path)
    disable_dropout(sft)
    learned = build_reward([RewardSourceConfig(name_or_path=rm_path)]) if rm_path else None
    judge = Judge(judge_path) if judge_path else None
    gold_only = build_reward([RewardSourceConfig(name_or_path="builtin:gold")])
    settings = cfg.ppo.ppo  # every policy is sampled as PPO samples: same length cap and temperature
    chunk = max(1, cfg.ppo.train.per_device_batch_size)
    out = {}
    for name, path in {"sft": None, **policy_paths}.items():
        policy = sft if path is None else load_policy(path)
        disable_dropout(policy)
        torch.manual_seed(cfg.report.seed)
        r = rollout(policy, sft, gold_only, prompts, tok, settings.response_length, settings.temperature, chunk,
                    torch.device("cpu"), with_gold=True)
        rec = {"gold": r.gold, "kl": sequence_kl(r.logprobs, r.ref_logprobs, r.response_mask),
               "length": r.response_mask.sum(-1).float(), "eos": r.ended.float(), "texts": r.texts,
               "prompts": r.prompts}
        if learned is not None:
            rec["learned"] = learned(r.prompts, r.texts, r.ended.tolist()).float().cpu()
        if judge is not None:
            prob, categories = judge(r.prompts, r.texts)
            rec["judged_good"] = (prob >= judge.threshold).float()
            rec["judged_categories"] = categories
        out[name] = rec
    return out


def summarize(records: dict) -> dict:
    """Means per policy and, for each policy but SFT, its gold gain (also in SFT standard deviations)
    and its gold win rate over SFT. records: {"sft": ..., name: ...} as ``compare_policies`` returns."""
    rep, s = {}, records["sft"]["gold"]
    for name, rec in records.items():
        row = {"gold_reward": rec["gold"].mean().item(), "gold_reward_std": rec["gold"].std().item(),
               "kl_to_sft": rec["kl"].mean().item(), "response_length": rec["length"].mean().item(),
               "eos_share": rec["eos"].mean().item()}
        if "learned" in rec:
            row["learned_reward"] = rec["learned"].mean().item()
        if "judged_good" in rec:
            row["judged_good_share"] = rec["judged_good"].mean().item()
            named = [c for c in rec["judged_categories"] if c is not None]
            row["judged_bad_by_category"] = {c: named.count(c) / len(rec["judged_categories"])
                                             for c in sorted(set(named))}
        if name != "sft":
            p = rec["gold"]
            row["gold_gain"] = (p.mean() - s.mean()).item()
            row["gold_gain_in_sft_std"] = row["gold_gain"] / max(s.std().item(), 1e-8)
            # Same prompt, one sample from each policy: a tie counts half (Ouyang et al. 2022 report win rates).
            row["win_rate_vs_sft"] = ((p > s).float() + 0.5 * (p == s).float()).mean().item()
        rep[name] = row
    if "ppo" in records:  # the InstructGPT report's top-level keys (quickstart, notebook, benchmarks read them)
        rep["gold_gain"] = rep["ppo"]["gold_gain"]
        rep["gold_gain_in_sft_std"] = rep["ppo"]["gold_gain_in_sft_std"]
        rep["ppo_win_rate_vs_sft"] = rep["ppo"]["win_rate_vs_sft"]
    rep["num_responses"] = len(s)
    return rep


TABLE_COLUMNS = [("gold_reward", "gold reward", "{:+.2f}"), ("gold_gain_in_sft_std", "gain (SFT std)", "{:+.2f}"),
                 ("learned_reward", "learned reward", "{:+.2f}"), ("kl_to_sft", "KL to SFT", "{:.2f}"),
                 ("response_length", "length", "{:.1f}"), ("win_rate_vs_sft", "win rate vs SFT", "{:.0%}"),
                 ("judged_good_share", "judged good", "{:.0%}")]


def report_table(rep: dict, policies: list[str]) -> str:
    """The report's side-by-side comparison as a Markdown table (one row per policy, SFT first)."""
    cols = [c for c in TABLE_COLUMNS if any(c[0] in rep[p] for p in ["sft", *policies])]
    lines = ["| policy | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for p in ["sft", *policies]:
        cells = [c[2].format(rep[p][c[0]]) if c[0] in rep[p] else "" for c in cols]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report_policies(cfg: PipelineConfig) -> list[str]:
    """The optimisers the report compares (ReportSettings.policies)."""
    if cfg.report.policies:
        return list(cfg.report.policies)
    return [s for s in OPTIMIZERS if s in cfg.stages or os.path.isdir(os.path.join(cfg.output_dir, s, "final"))]


def write_report(cfg: PipelineConfig) -> dict:
    paths = stage_paths(cfg)
    policies = report_policies(cfg)
    if not policies:
        raise ConfigError(f"report: no optimiser output in {cfg.output_dir} to compare with SFT: run one of "
                          f"{list(OPTIMIZERS)} first, or name them in report.policies")
    sft_path = os.path.join(paths["sft"], "final")
    policy_paths = {p: os.path.join(paths[p], "final") for p in policies}
    rm_path = os.path.join(paths["rm"], "final")
    for need in (sft_path, *policy_paths.values()):
        if not os.path.isdir(need):
            raise ConfigError(f"report: {need} does not exist: run the earlier stages first")
    judge = cfg.report.judge
    if judge == "@classifier":  # write_report called without wire()
        judge = os.path.join(paths["classifier"], "final")
    if judge and not os.path.isdir(judge):
        if judge != os.path.join(paths["classifier"], "final"):
            raise ConfigError(f"report.judge: {judge} does not exist")
        judge = None  # @classifier, but this pipeline trains no evaluator
    records = compare_policies(sft_path, policy_paths, rm_path if os.path.isdir(rm_path) else None, cfg, judge)
    rep = summarize(records)
    rep["policies"] = policies
    rep["judge"] = judge
    for p in policies:
        summary = os.path.join(paths[p], "summary.json")
        if os.path.exists(summary):
            with open(summary) as f:
                s = json.load(f)
            rep[p]["train_seconds"] = s.get("runtime_seconds")
            rep[p]["peak_rss_mb"] = s.get("peak_rss_mb")
    if "ppo" in policies:
        rep["ppo_kl_target"] = cfg.ppo.ppo.kl_target if cfg.ppo.ppo.adaptive_kl else None
        ppo_summary = os.path.join(paths["ppo"], "summary.json")
        if os.path.exists(ppo_summary):
            with open(ppo_summary) as f:
                s = json.load(f)
            rep["ppo_updates"] = s.get("updates", s.get("steps"))
    if os.path.isdir(rm_path) and cfg.report.diagnostics_prompts:  # can the RM guide PPO? also in rm/summary.json
        rep["rm_diagnostics"] = diagnose(rm_path, sft_path, cfg.report.prompts, cfg.report.diagnostics_prompts,
                                         cfg.report.best_of_n, seed=cfg.report.seed,
                                         response_length=cfg.ppo.ppo.response_length,
                                         temperature=cfg.ppo.ppo.temperature, max_length=cfg.ppo.data.max_length)
        rep["rm_diagnostics"]["png"] = write_diagnostics(paths["rm"], rep["rm_diagnostics"])
    rep["table"] = report_table(rep, policies)
    rep["examples"] = [{"prompt": records["sft"]["prompts"][i], **{n: records[n]["texts"][i] for n in records}}
                       for i in range(min(5, rep["num_responses"]))]
    with open(os.path.join(cfg.output_dir, "report.json"), "w") as f:
        json.dump(rep, f, indent=2)
    with open(os.path.join(cfg.output_dir, "report.md"), "w") as f:
        f.write(f"# Held-out comparison ({rep['num_responses']} responses per policy)\n\n{rep['table']}")
    plot_report(records, rep, os.path.join(cfg.output_dir, "report.png"),
                {p: paths[p] for p in policies})
    return rep
