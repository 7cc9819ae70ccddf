# Regenerates instructgpt_pipeline.ipynb (run from examples/):  python make_notebook.py
import nbformat as nbf

nb = nbf.v4.new_notebook()
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
nb.cells = [
    md("""# The InstructGPT pipeline with alignkit

This notebook walks the three steps of Ouyang et al. (2022) through alignkit's Python API,
offline, on the built-in default (a tiny Llama that alignkit builds itself and a toy
review-writing task whose *gold* reward is known):

1. **SFT** on human demonstrations,
2. a **Bradley-Terry reward model** on annotator preferences (several annotators per pair, one of them a spammer),
3. **PPO** against that reward model with a KL penalty to the SFT policy,

then compares the SFT and PPO policies on held-out prompts with the gold reward, which the
reward model never saw. The same run from the shell is
`alignkit pipeline --config configs/pipeline/quickstart.yaml`."""),
    code("""import json, os
from IPython.display import Image, display

import alignkit
from alignkit import builtin
from alignkit.pipeline import PipelineConfig, wire, write_report

# ALIGNKIT_NOTEBOOK_FAST=1 (the test suite) shortens every stage; the results are then only indicative.
FAST = os.environ.get("ALIGNKIT_NOTEBOOK_FAST") == "1"
OUT = os.environ.get("ALIGNKIT_NOTEBOOK_OUT", "runs/notebook")
overrides = [f"output_dir={OUT}", "sft.log.progress=false", "rm.log.progress=false", "ppo.log.progress=false"]
if FAST:
    overrides += ["sft.train.num_epochs=6", "rm.train.num_epochs=1",
                  "ppo.train.max_steps=15", "ppo.train.eval_every=0", "ppo.ppo.eval_samples=32",
                  "report.num_prompts=64", "report.samples_per_prompt=1", "report.diagnostics_prompts=8",
                  "report.best_of_n=8"]
cfg = wire(alignkit.load_config(PipelineConfig, "../configs/pipeline/quickstart.yaml", overrides))
print(cfg.sft.output_dir, cfg.rm.output_dir, cfg.ppo.output_dir)"""),
    md("""## The data: one schema for every kind of feedback

Every stage reads the same rows: a prompt, the answers shown, and the labels people gave.
Here are a demonstration and a pairwise comparison labelled by three simulated annotators,
with the gold reward of each answer in `meta`."""),
    code("""demo = builtin.make_examples("sft", 1)[0]
pair = builtin.make_examples("pairs", 1, seed=3)[0]
print(json.dumps(demo.to_dict(), indent=1))
print(json.dumps(pair.to_dict(), indent=1))"""),
    md("## 1. Supervised fine-tuning"),
    code("""sft = alignkit.train_sft(cfg.sft)
print(f"held-out loss {sft['eval_loss_before']:.3f} -> {sft['eval_loss_after']:.3f} in {sft['runtime_seconds']} s")"""),
    md("""## 2. Reward model

Initialised from the SFT model (as in InstructGPT); annotators' labels are aggregated with
Dawid-Skene, which learns how reliable each annotator is."""),
    code("""rm = alignkit.train_rm(cfg.rm)
print({k: rm["eval"][k] for k in ("accuracy", "gold_accuracy", "mean_margin") if k in rm.get("eval", {})})
png = os.path.join(cfg.rm.output_dir, "reward_distributions.png")
if os.path.exists(png):
    display(Image(png))"""),
    md("""## 3. PPO with a KL penalty

The policy starts from the SFT model; the reference is the SFT model; the value model starts
from the reward model."""),
    code("""ppo = alignkit.train_ppo(cfg.ppo)
print({k: v for k, v in ppo.items() if isinstance(v, (int, float))})
png = os.path.join(cfg.ppo.output_dir, "curves.png")
if os.path.exists(png):
    display(Image(png))"""),
    md("""## 4. SFT vs PPO on held-out prompts

Both policies answer the same held-out prompts; the gold reward judges them."""),
    code("""report = write_report(cfg)
for name in ("sft", "ppo"):
    print(name, {k: round(v, 3) for k, v in report[name].items()})
print("gain in SFT std:", round(report["gold_gain_in_sft_std"], 2), " PPO win rate:", round(report["ppo_win_rate_vs_sft"], 3))
display(Image(os.path.join(cfg.output_dir, "report.png")))"""),
    code("""for ex in report["examples"][:3]:
    print(ex["prompt"], "\\n  SFT:", ex["sft"], "\\n  PPO:", ex["ppo"])"""),
]
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, "instructgpt_pipeline.ipynb")
