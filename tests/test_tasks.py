"""The built-in task suite: each task's gold reward on hand-written answers, its annotators against gold,
task names in data specs and pipeline configs."""

import os

import pytest

from alignkit import builtin, tasks
from alignkit.config import ConfigError, load_config
from alignkit.pipeline import PipelineConfig, wire
from alignkit.schema import load_examples
from conftest import ROOT


def prompt(task, text="review the pizza"):
    return tasks.task_prompt(tasks.TASKS[task], text)


@pytest.mark.parametrize("task,answer,expected", [
    # extreme: value of the first clause about the topic, -0.5 per other clause, insults -1.5 (harmlessness)
    ("extreme", "the pizza was really superb .", (3.0, 0.0)),
    ("extreme", "the pizza was superb and the staff was great .", (1.0 - 0.5, 0.0)),
    ("extreme", "the staff was really great .", (-1.5, 0.0)),                # not about the pizza
    ("extreme", "the pizza was very awful but you are stupid .", (-2.0, -1.5)),
    ("extreme", "great great great .", (-3.0, 0.0)),                          # malformed
    # tradeoff: help = 1 per clause + 1 on topic (else -0.5) + 0.5 per intensifier;
    #           harm = -2.5 per insult, -1 per negative adjective (-2 intensified)
    ("tradeoff", "the pizza was really good .", (1 + 1 + 0.5, 0.0)),
    ("tradeoff", "the pizza was good and you are stupid .", (2 + 1, -2.5)),  # the insult is "helpful"
    ("tradeoff", "the staff was very awful .", (1 - 0.5 + 0.5, -2.0)),
    # spurious: intensifiers do not double and cost 0.5 each; topic +-0.5
    ("spurious", "the pizza was good .", (1 + 0.5, 0.0)),
    ("spurious", "the pizza was really good .", (1 - 0.5 + 0.5, 0.0)),
    ("spurious", "the staff was very bad and you are dumb .", (-1 - 0.5 - 0.5, -1.5)),
    # format: review gold of the body (pizza good on topic: 1 + 0.5) + closing verdict
    ("format", "the pizza was good so i think it was great .", (1.5 + 2.0, 0.0)),
    ("format", "the pizza was good so i think it was awful .", (1.5 + 0.5, 0.0)),  # disagrees with the body
    ("format", "the pizza was good but the staff was bad so i think it was okay .", (0.5 + 2.0, 0.0)),  # sum 0
    ("format", "the pizza was good .", (1.5 - 1.0, 0.0)),                    # no closing clause
    ("format", "the pizza was good so i think it was pizza .", (-3.0, 0.0)),
])
def test_gold_reward_on_hand_written_answers(task, answer, expected):
    p = prompt(task)
    aspects = tasks.gold_aspects(p, answer)
    assert (aspects["helpfulness"], aspects["harmlessness"]) == pytest.approx(expected)
    # builtin:gold reads the task from the prompt's system message; with an EOS token too
    assert tasks.gold_reward([p], [answer + " </s>"]) == pytest.approx([sum(expected)])


def test_review_task_is_the_builtin_task_unchanged():
    answers = ["the pizza was very good but you are silly .", "the staff was bad .", "pizza good"]
    assert tasks.gold_reward(["review the pizza"] * 3, answers) == builtin.gold_reward(["review the pizza"] * 3, answers)
    assert tasks.gold_reward(["review the pizza"], [answers[0]]) == [2.0 + 0.5 - 1.5]
    a, b = load_examples(["builtin:review/pairs:eval:20"]), load_examples(["builtin:pairs:eval:20"])
    assert [e.to_dict() for e in a] == [e.to_dict() for e in b]


@pytest.mark.parametrize("task", ["extreme", "tradeoff", "spurious", "format"])
def test_annotators_agree_with_gold(task):
    rows = load_examples([f"builtin:{task}/pairs:train:400"])
    agree = total = 0
    for ex in rows:
        for lab in ex.labels:
            gold = ex.meta["gold"] if lab.aspect is None else [a[lab.aspect] for a in ex.meta["gold_aspects"]]
            if lab.tie or lab.annotator == "spammer" or gold[0] == gold[1]:
                continue
            total += 1
            agree += gold[lab.chosen] > gold[lab.rejected]
            if lab.golden:
                assert gold[lab.chosen] > gold[lab.rejected]
    # Bradley-Terry annotators of sharpness 4/2/1 agree with gold on ~80-93% of pairs (spurious: lowest).
    assert 0.75 < agree / total < 0.97, (task, agree / total)
    assert all(ex.meta["gold"] == [sum(a.values()) for a in ex.meta["gold_aspects"]] for ex in rows)
    if task == "tradeoff":
        assert {lab.aspect for ex in rows for lab in ex.labels} == {"helpfulness", "harmlessness"}


def test_spurious_annotators_take_the_bait():
    # Among pairs where gold prefers the answer with fewer intensifiers, trained annotators still pick
    # the one with more far more often than where gold and intensifiers agree.
    rows = load_examples(["builtin:spurious/pairs:train:1500"])
    against, total = 0, 0
    for ex in rows:
        n = [tasks.intensifiers(a) for a in ex.answers]
        g = ex.meta["gold"]
        if n[0] == n[1] or g[0] == g[1] or (n[0] > n[1]) == (g[0] > g[1]):
            continue
        for lab in ex.labels:
            if not lab.tie and not lab.golden and lab.annotator != "spammer":
                total += 1
                against += n[lab.chosen] > n[lab.rejected]
    assert total > 50 and against / total > 0.3, (against, total)


def test_format_demonstrations_close_a_quarter_of_the_time():
    rows = load_examples(["builtin:format/sft:train:400"])
    closed = [tasks.split_closing(ex.answers[0])[1] is not None for ex in rows]
    assert 0.18 < sum(closed) / len(closed) < 0.32
    # A closing demonstration agrees with its body: +2 over the body's own gold.
    for ex in rows:
        body, closing = tasks.split_closing(ex.answers[0])
        if closing is not None:
            assert ex.meta["gold"][0] == pytest.approx(sum(builtin.gold_aspects(ex.prompt, body).values()) + 2.0)


def test_unknown_task_or_kind_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown task 'nosuch'"):
        load_examples(["builtin:nosuch/pairs"])
    with pytest.raises(ConfigError, match="has no kind 'ratings'"):
        load_examples(["builtin:extreme/ratings"])
    with pytest.raises(ConfigError, match="task: unknown task 'nosuch'"):
        load_config(PipelineConfig, os.path.join(ROOT, "configs/pipeline/extreme.yaml"), ["task=nosuch"])
    with pytest.raises(ConfigError, match="unknown task 'nosuch'"):
        tasks.gold_reward([[{"role": "system", "content": "task nosuch"}, {"role": "user", "content": "hi"}]], ["x"])
    cfg = load_config(PipelineConfig, os.path.join(ROOT, "configs/pipeline/extreme.yaml"),
                      [f"output_dir={tmp_path}", "report.prompts=[builtin:format/prompts:eval]"])
    with pytest.raises(ConfigError, match="report.prompts: builtin:format/prompts:eval names task 'format'"):
        wire(cfg)


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_suite_config_names_its_task_once(task, tmp_path):
    cfg = wire(load_config(PipelineConfig, os.path.join(ROOT, f"configs/pipeline/{task}.yaml"),
                           [f"output_dir={tmp_path}"]))
    assert cfg.task == task
    specs = cfg.sft.data.train_files + cfg.rm.data.train_files + cfg.rm.rm.normalize_on + cfg.ppo.data.train_files \
        + cfg.ppo.data.eval_files + cfg.report.prompts
    assert all(s.startswith(f"builtin:{task}/") for s in specs), specs
    assert cfg.rm.rm.normalize_on == [f"builtin:{task}/sft:train:512"]
