"""Evaluator classifier: categories checked against the config, held-out report, PPO reward source, data filter.

Run: pytest -q tests/test_classifier.py      (~40 s: one small classifier is trained for the module)
"""

import json
import math
import os

import pytest
import torch

from alignkit.classifier import ClassifierConfig, Judge, judge_metrics, prepare_data, train_classifier
from alignkit.cli import main as cli_main
from alignkit.config import load_config
from alignkit.schema import DataError, write_jsonl

CATEGORIES = ["insult", "unhelpful"]


def categorised(n, split, path):
    """Built-in good/bad labels with a category on each bad vote: insult when the gold harmlessness is negative."""
    from alignkit.builtin import make_examples

    examples = make_examples("binary", n, split=split)
    for ex in examples:
        for lab in ex.labels:
            if not lab.good:
                lab.category = "insult" if ex.meta["gold_aspects"][0]["harmlessness"] < 0 else "unhelpful"
    write_jsonl(examples, str(path))
    return str(path)


def config(tmp_path, train, eval_, **over):
    data = {"data": {"train_files": [train], "eval_files": [eval_], "max_length": 64},
            "train": {"num_epochs": 2, "per_device_batch_size": 16, "learning_rate": 2e-3, "log_every": 10,
                      "warmup_ratio": 0.0, "lr_scheduler": "linear"},
            "classifier": {"categories": CATEGORIES}, "log": {"progress": False}, "output_dir": str(tmp_path / "clf")}
    data.update(over)
    return load_config(ClassifierConfig, data=data)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("classifier")
    cfg = config(tmp, categorised(600, "train", tmp / "train.jsonl"), categorised(200, "eval", tmp / "eval.jsonl"))
    return train_classifier(cfg), tmp


def test_undeclared_category_names_file_line_and_field(tmp_path):
    from alignkit.modeling import load_tokenizer

    rows = [{"prompt": "review the pizza", "answers": ["you are stupid and the pizza was bad ."],
             "labels": [{"kind": "binary", "answer": 0, "good": False, "category": "violence"}]}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = config(tmp_path, str(path), str(path))
    with pytest.raises(DataError, match=r"d.jsonl:1: labels\[0\].category: 'violence' is not among "
                                        r"classifier.categories \['insult', 'unhelpful'\]"):
        prepare_data(cfg, load_tokenizer(cfg.model))
    code = cli_main(["classifier", f"--data.train_files=[{path}]", f"--data.eval_files=[{path}]",
                     "--classifier.categories=[insult]", f"--output_dir={tmp_path / 'run'}"])
    assert code == 2


def test_judge_metrics_hand_values():
    # 4 answers, threshold 0.5: P(good) 0.9 (good), 0.2 (bad, insult), 0.6 (bad, insult), 0.3 (good).
    # Judged good: 0.9 and 0.6 -> right on answers 0, 1; wrong on 2, 3: accuracy 0.5.
    # Brier: (0.1^2 + 0.2^2 + 0.6^2 + 0.7^2) / 4 = (0.01 + 0.04 + 0.36 + 0.49) / 4 = 0.225.
    # Two bins [0, 0.5), [0.5, 1]: low bin {0.2 bad, 0.3 good}: mean p 0.25, share good 0.5 -> |.25|;
    # high bin {0.9 good, 0.6 bad}: mean p 0.75, share 0.5 -> 0.25. ECE = 0.5 * 0.25 + 0.5 * 0.25 = 0.25.
    # insult: predicted for answers judged bad with top category insult: answers 1 and 3 (both top 0);
    # truly bad insults: answers 1, 2. TP = 1 -> precision 1/2, recall 1/2.
    m = judge_metrics(torch.tensor([0.9, 0.2, 0.6, 0.3]), torch.tensor([True, False, False, True]),
                      torch.tensor([1, 0, 0, 0]), torch.tensor([-1, 0, 0, -1]), ["insult", "unhelpful"], 0.5, 2)
    assert m["accuracy"] == 0.5 and abs(m["brier"] - 0.225) < 1e-6 and abs(m["ece"] - 0.25) < 1e-6
    assert m["by_category"]["insult"] == {"precision": 0.5, "recall": 0.5, "support": 2, "predicted": 2}
    assert m["by_category"]["unhelpful"]["precision"] is None  # never predicted, never labelled


def test_summary_reports_held_out_accuracy_categories_and_calibration(trained):
    summary, tmp = trained
    with open(tmp / "clf" / "summary.json") as f:
        saved = json.load(f)
    ev = saved["eval"]
    # Held-out labels come from noisy annotators (one clicks at random): 0.635 measured, 0.51 before training.
    assert ev["accuracy"] > 0.6 and ev["accuracy"] > saved["eval_before"]["accuracy"] + 0.05, ev
    assert set(ev["by_category"]) == set(CATEGORIES) and ev["by_category"]["insult"]["recall"] > 0.5, ev
    assert 0 <= ev["ece"] < 0.2 and ev["calibration"]
    with open(tmp / "clf" / "final" / "config.json") as f:
        config = json.load(f)
    assert config["alignkit_classifier"]["categories"] == CATEGORIES
    assert config["id2label"] == {"0": "good", "1": "bad", "2": "category:insult", "3": "category:unhelpful"}
    assert os.path.exists(tmp / "clf" / "final" / "model.safetensors")


def test_classifier_is_a_ppo_reward_source_scoring_logit_p_good(trained):
    from alignkit.rewards import RewardSourceConfig, build_reward

    _, tmp = trained
    final = str(tmp / "clf" / "final")
    prompts = ["review the pizza", "review the pizza", "describe the song"]
    answers = ["the pizza was great .", "you are stupid and the pizza was bad .", "the song was dull ."]
    reward = build_reward([RewardSourceConfig(name_or_path="builtin:gold"),
                           RewardSourceConfig(name_or_path=final, weight=0.5)])
    total = reward(prompts, answers)
    p, cats = Judge(final)(prompts, answers)
    logit = torch.log(p) - torch.log1p(-p)
    torch.testing.assert_close(reward.components[final], logit, atol=1e-4, rtol=0)
    torch.testing.assert_close(total, reward.components["builtin:gold"] + 0.5 * logit, atol=1e-4, rtol=0)
    assert p[0] > p[1]  # the insult is judged worse
    assert cats[0] is None and (cats[1] in CATEGORIES or p[1] >= 0.5)


def test_data_filter_drops_rows_judged_bad(trained, capsys):
    _, tmp = trained
    final = str(tmp / "clf" / "final")
    src = categorised(60, "eval", tmp / "filter_in.jsonl")
    out = tmp / "filter_out.jsonl"
    assert cli_main(["data", "filter", "--judge", final, src, str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    kept = [json.loads(line) for line in open(out)]
    assert report["rows"] == 60 and report["kept"] == len(kept) and report["dropped"] == 60 - len(kept) > 0
    p, _ = Judge(final)([r["prompt"] for r in kept], [r["answers"][0] for r in kept])
    assert (p >= 0.5).all()
    # A stricter threshold keeps fewer rows.
    assert cli_main(["data", "filter", "--judge", final, "--threshold", "0.9", src, str(out)]) == 0
    stricter = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stricter["kept"] <= report["kept"]
    assert not math.isnan(p.mean().item())
