"""Importers and exporters on hand-written fixtures in the published formats.

    /work/venv/bin/pytest tests/test_feedback_io.py -q
"""

import json
import os

import pytest

from alignkit.feedback.exporters import export_examples, export_rows, to_label_studio_tasks
from alignkit.feedback.importers import detect_format, import_data, read_rows
from alignkit.schema import DataError, Example, Label, load_examples, parse_row, write_jsonl

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "feedback")


def fx(name):
    return os.path.join(FIX, name)


def labels(ex, kind=None):
    return [lab.to_dict() for lab in ex.labels if kind is None or lab.kind == kind]


@pytest.mark.parametrize("name, fmt", [
    ("hh_rlhf.jsonl", "hh-rlhf"), ("shp.jsonl", "shp"), ("ultrafeedback.jsonl", "ultrafeedback"),
    ("helpsteer.jsonl", "helpsteer"), ("oasst1.jsonl", "oasst1"), ("pku_saferlhf.jsonl", "pku-saferlhf"),
    ("trl_preference.jsonl", "trl"), ("trl_conversational.jsonl", "trl"), ("trl_unpaired.jsonl", "trl"),
    ("trl_prompt_completion.jsonl", "trl"), ("label_studio_pairwise.json", "label-studio"),
    ("label_studio_ranker.json", "label-studio")])
def test_detects_format_and_output_is_valid_native_data(name, fmt, tmp_path):
    assert detect_format(read_rows(fx(name))) == fmt
    exs = import_data(fx(name))
    assert exs and all(ex.labels for ex in exs)
    # whatever an importer makes must pass the schema's own row checks when written out
    write_jsonl(exs, tmp_path / "out.jsonl")
    again = load_examples(str(tmp_path / "out.jsonl"))
    assert [e.to_dict() for e in again] == [e.to_dict() for e in exs]


def test_hh_rlhf_prompt_from_common_prefix_and_multi_turn_conversation():
    single, multi, _ = import_data(fx("hh_rlhf.jsonl"))
    assert single.prompt == "How do I keep basil alive indoors?"
    assert single.answers == ["Give it a sunny window, water it when the top of the soil is dry, and pinch off the "
                              "flowers.", "Basil is a plant."]
    assert labels(single) == [{"kind": "pairwise", "chosen": 0, "rejected": 1}]
    assert multi.prompt == [{"role": "user", "content": "I want to bake bread this weekend."},
                            {"role": "assistant", "content": "Great! Do you want a yeast bread or a quick bread?"},
                            {"role": "user", "content": "Yeast, something simple."}]
    assert multi.answers[1] == "Buy bread at the store instead."


def test_hh_rlhf_answers_that_share_a_prefix_keep_it():
    # "Canberra." vs "Sydney." share nothing; "The answer is 4." vs "The answer is 5." share a prefix that
    # must stay in both answers (the cut goes back to the last "\n\nAssistant:").
    rows = [("f:1", {"chosen": "\n\nHuman: 2+2?\n\nAssistant: The answer is 4.",
                     "rejected": "\n\nHuman: 2+2?\n\nAssistant: The answer is 5."})]
    from alignkit.feedback.importers import import_rows
    (ex,), problems = import_rows(rows, "hh-rlhf")
    assert not problems and ex.prompt == "2+2?" and ex.answers == ["The answer is 4.", "The answer is 5."]


def test_shp_rows_of_one_post_share_an_example():
    caramel, dough = import_data(fx("shp.jsonl"))
    assert caramel.id == "10abcd" and len(caramel.answers) == 3  # comment j3k1 appears in both rows once
    assert labels(caramel) == [{"kind": "pairwise", "chosen": 0, "rejected": 1},
                               {"kind": "pairwise", "chosen": 0, "rejected": 2}]  # labels=0: B (j3k1) preferred
    assert labels(dough) == [{"kind": "pairwise", "chosen": 1, "rejected": 0}]
    assert caramel.meta["domain"] == "askculinary_train"


def test_ultrafeedback_aspect_ratings_and_na_skipped():
    colours, french = import_data(fx("ultrafeedback.jsonl"))
    assert colours.answers[1] == "Green, purple and orange."
    r = {(lab.answer, lab.aspect): lab.value for lab in colours.labels}
    assert r[(1, "helpfulness")] == 2.0 and r[(1, "truthfulness")] == 1.0
    assert r[(1, None)] == 2.5  # fine-grained_score = mean(2, 3, 4, 1)
    # truthfulness of Bonjour is "N/A": no label
    assert (0, "truthfulness") not in {(lab.answer, lab.aspect) for lab in french.labels}
    assert french.meta["models"] == ["gpt-3.5-turbo", "alpaca-7b", "falcon-40b-instruct"]


def test_helpsteer_groups_responses_of_a_prompt():
    water, soda = import_data(fx("helpsteer.jsonl"))
    assert len(water.answers) == 2 and len(soda.answers) == 1
    assert {(lab.answer, lab.aspect): lab.value for lab in water.labels}[(1, "helpfulness")] == 1.0
    assert len(water.labels) == 10  # 5 aspects x 2 responses


def test_oasst1_ranks_become_rankings_and_history_the_prompt():
    root, follow_up, single = import_data(fx("oasst1.jsonl"))
    assert root.prompt == "What is a good first houseplant?"
    assert len(root.answers) == 3  # the deleted reply a4 is gone
    assert labels(root) == [{"kind": "ranking", "order": [0, 1, 2]}]
    assert root.answers[0].startswith("A pothos")
    # rank 0 (b2) is listed first
    assert follow_up.prompt[-1] == {"role": "user", "content": "How often should I water it?"}
    assert follow_up.prompt[1]["role"] == "assistant" and follow_up.prompt[1]["content"].startswith("A pothos")
    assert follow_up.answers[0].startswith("Every time")
    assert labels(single) == [{"kind": "demonstration", "answer": 0}]


def test_pku_saferlhf_two_aspects():
    ex = import_data(fx("pku_saferlhf.jsonl"))[0]
    assert labels(ex) == [{"kind": "pairwise", "aspect": "helpfulness", "chosen": 0, "rejected": 1},
                          {"kind": "pairwise", "aspect": "safety", "chosen": 0, "rejected": 1},
                          {"kind": "binary", "aspect": "safety", "answer": 0, "good": True},
                          {"kind": "binary", "aspect": "safety", "answer": 1, "good": False}]


def test_trl_formats():
    pref = import_data(fx("trl_preference.jsonl"))
    assert pref[1].labels[0].margin == 1.0
    conv = import_data(fx("trl_conversational.jsonl"))
    assert conv[0].prompt == [{"role": "user", "content": "Hi, what is 2+2?"}] and conv[0].answers == ["4.", "5."]
    unpaired = import_data(fx("trl_unpaired.jsonl"))
    assert [lab.good for ex in unpaired for lab in ex.labels] == [True, False]


def test_label_studio_pairwise_annotators_golden_and_cancelled():
    haiku, hashmap, cat = import_data(fx("label_studio_pairwise.json"))
    assert [(lab.annotator, lab.chosen, lab.golden) for lab in haiku.labels] == \
        [("1", 0, False), ("2", 0, False), ("3", 1, False), ("7", 0, True)]
    # the cancelled annotation of annotator 3 is skipped; a completed_by object gives its email
    assert [lab.annotator for lab in hashmap.labels] == ["1", "b@example.com"]
    assert all(lab.chosen == 1 for lab in hashmap.labels)  # "right" = answer2
    assert haiku.meta["label_studio_id"] == 101


def test_label_studio_ranker_list_and_buckets():
    (ex,) = import_data(fx("label_studio_ranker.json"))
    assert ex.answers == ["Paris is the capital of France.", "Lyon.", "The capital is Paris, on the Seine."]
    assert labels(ex) == [
        {"kind": "ranking", "annotator": "1", "order": [2, 0, 1]},
        # buckets best: [r1, r3], worst: [r2] -> every cross-bucket pair; the list's own name holds unplaced items
        {"kind": "pairwise", "annotator": "2", "chosen": 0, "rejected": 1},
        {"kind": "pairwise", "annotator": "2", "chosen": 2, "rejected": 1},
        {"kind": "ranking", "annotator": "4", "golden": True, "order": [0, 2, 1]}]


# ----------------------------------------------------------------------------- bad input


def test_unrecognised_format_lists_what_was_tried():
    with pytest.raises(DataError) as e:
        import_data(fx("unknown.jsonl"))
    msg = str(e.value)
    assert "unknown.jsonl:1" in msg and "unrecognised format" in msg
    for fmt in ("label-studio", "oasst1", "shp", "pku-saferlhf", "ultrafeedback", "helpsteer", "hh-rlhf", "alignkit",
                "trl"):
        assert f"{fmt}: " in msg
    assert "missing field(s) ['chosen', 'rejected']" in msg  # why hh-rlhf failed


def test_label_studio_result_type_not_pairwise_or_ranker():
    with pytest.raises(DataError, match=r"label_studio_choices.json:row 0: annotations\[0\]\.result\[0\]\.type: "
                                        r"result type 'choices' is not supported"):
        import_data(fx("label_studio_choices.json"))


def test_oasst_broken_parent_ids():
    with pytest.raises(DataError, match=r"oasst1_broken.jsonl:3: parent_id: 'x-missing' is not the message_id"):
        import_data(fx("oasst1_broken.jsonl"))
    from alignkit.feedback.importers import import_rows
    rows = [("f:1", {"message_id": "a", "parent_id": None, "role": "assistant", "text": "hi"}),
            ("f:2", {"message_id": "b", "parent_id": "c", "role": "prompter", "text": "x", "message_tree_id": "t"}),
            ("f:3", {"message_id": "c", "parent_id": "b", "role": "assistant", "text": "y", "message_tree_id": "u"})]
    _, problems = import_rows(rows, "oasst1")
    assert problems == ["f:1: parent_id: missing: a tree's root must be a prompter message",
                        "f:2: message_tree_id: 't' differs from its parent's tree 'u'",
                        "f:3: message_tree_id: 'u' differs from its parent's tree 't'"]
    # b and c are each other's parent: no root is ever reached
    loop = [("f:1", {"message_id": "b", "parent_id": "c", "role": "prompter", "text": "x"}),
            ("f:2", {"message_id": "c", "parent_id": "b", "role": "assistant", "text": "y"})]
    _, problems = import_rows(loop, "oasst1")
    assert problems == ["f:1: parent_id: parent ids loop (b -> c -> b); the chain never reaches a root"]


def test_wrong_format_forced_reports_rows_and_fields():
    with pytest.raises(DataError, match=r"hh_rlhf.jsonl:1: history: missing"):
        import_data(fx("hh_rlhf.jsonl"), fmt="shp")


def test_hh_rlhf_identical_and_skip_bad(tmp_path):
    p = tmp_path / "hh.jsonl"
    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: hello"},
            {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="hh.jsonl:1: rejected: the chosen and rejected replies are identical"):
        import_data(str(p))
    assert len(import_data(str(p), skip_bad=True)) == 1


# ----------------------------------------------------------------------------- exporters


def test_round_trip_schema_trl_schema_keeps_content(tmp_path):
    exs = import_data(fx("hh_rlhf.jsonl")) + import_data(fx("trl_conversational.jsonl")) + \
        import_data(fx("trl_preference.jsonl"))
    path = str(tmp_path / "trl.jsonl")
    assert export_examples(exs, "trl-preference", path) == len(exs)
    rows = [json.loads(line) for line in open(path)]
    assert rows[0] == {"prompt": "How do I keep basil alive indoors?", "chosen": exs[0].answers[0],
                       "rejected": "Basil is a plant."}
    assert rows[1]["chosen"] == [{"role": "assistant", "content": exs[1].answers[0]}]  # conversational stays so
    back = load_examples(path)
    for a, b in zip(exs, back):
        assert (a.prompt, a.answers, labels(a)) == (b.prompt, b.answers, labels(b))


def test_ranking_exports_all_pairs_and_unpaired_and_prompt_completion():
    ex = Example("q", ["a", "b", "c"], [Label(kind="ranking", order=[2, 0, 1]),
                                        Label(kind="binary", answer=1, good=False),
                                        Label(kind="demonstration", answer=2)])
    pairs = [(r["chosen"], r["rejected"]) for r in export_rows([ex], "trl-preference")]
    assert pairs == [("c", "a"), ("c", "b"), ("a", "b")]
    unpaired = export_rows([ex], "trl-unpaired")
    assert unpaired[0] == {"prompt": "q", "completion": "b", "label": False}
    assert len(unpaired) == 1 + 2 * 3
    assert all(parse_row(r, "x") for r in unpaired)
    assert export_rows([ex], "trl-prompt-completion") == [{"prompt": "q", "completion": "c"}]


def test_label_studio_tasks_round_trip(tmp_path):
    exs = import_data(fx("oasst1.jsonl"))
    tasks = to_label_studio_tasks(exs)
    assert len(tasks) == 3 + 1  # C(3,2) pairs of the root, 1 of the follow-up, none for a single answer
    assert tasks[3]["data"]["prompt"].startswith("user: What is a good first houseplant?")
    # a labeller answers the follow-up task in Label Studio: "right" (answer2) wins
    done = dict(tasks[3], id=7, annotations=[{"completed_by": 5, "was_cancelled": False, "ground_truth": False,
                                             "result": [{"from_name": "comparison", "to_name": "answer1,answer2",
                                                         "type": "pairwise", "value": {"selected": "right"}}]}])
    path = tmp_path / "export.json"
    path.write_text(json.dumps([done]))
    (back,) = import_data(str(path))
    assert back.prompt == exs[1].prompt and back.id == "p2" and back.meta["answer_index"] == [0, 1]
    assert back.answers == exs[1].answers[:2]
    assert labels(back) == [{"kind": "pairwise", "annotator": "5", "chosen": 1, "rejected": 0}]
    with pytest.raises(ValueError, match="JSON list"):
        export_examples(exs, "label-studio", str(tmp_path / "tasks.jsonl"))
