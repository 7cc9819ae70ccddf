"""What ends an answer, which tokens stop generation, and the tokenizers / templates / model folders alignkit
refuses before training, with the error a user sees (issue 9). Tokenizers come from tests/families.py."""

import json
import logging
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import families  # noqa: E402
from alignkit.config import ModelConfig  # noqa: E402
from alignkit.modeling import ModelLoadError, load_model, load_tokenizer  # noqa: E402
from alignkit.tokenization import answer_end_id, encode_answer, stop_token_ids, unknown_token_share  # noqa: E402


def saved(tok, folder, template="keep"):
    if template != "keep":
        tok.chat_template = template
    tok.save_pretrained(folder)
    if template is None:
        for name in ("chat_template.jinja", "chat_template.json"):
            if os.path.exists(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))
    return str(folder)


@pytest.mark.parametrize("family", families.NAMES)
def test_answer_end_and_stop_tokens_per_family(family):
    fam = families.BY_NAME[family]
    tok = families.build_tokenizer(fam)
    if fam.template is None:
        from alignkit.modeling import DEFAULT_CHAT_TEMPLATE

        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    end = tok.convert_ids_to_tokens(answer_end_id(tok))
    assert end == fam.turn_end  # e.g. qwen2 <|im_end|>, gemma2 <end_of_turn>, phi3 <|end|>, gpt2 <|endoftext|>
    assert tok.convert_ids_to_tokens(encode_answer(tok, "the pizza was great .")[-1:]) == [fam.turn_end]
    assert tok.convert_ids_to_tokens(stop_token_ids(tok)) == list(dict.fromkeys([fam.eos, fam.turn_end]))


def test_stop_tokens_add_the_models_own_eos_ids_that_are_real_tokens():
    from transformers import GenerationConfig

    tok = families.build_tokenizer(families.BY_NAME["llama3"])
    eos, eot, bos = (tok.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>", "<|begin_of_text|>"))
    # The model lists BOS (odd, but a real token) and an id past the vocabulary (padding rows of the embedding).
    gen = GenerationConfig(eos_token_id=[eot, bos, len(tok) + 5])
    assert stop_token_ids(tok, gen) == [eos, eot, bos]


def test_tokenizer_with_neither_eos_nor_end_of_turn_is_refused(tmp_path):
    tok = families.build_tokenizer(families.BY_NAME["gpt2"])
    tok.eos_token = None
    plain = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
             "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ModelLoadError, match="no eos_token and its chat template ends an assistant turn with no "
                                             "special token"):
        load_tokenizer(ModelConfig(name_or_path=saved(tok, tmp_path, plain)))


def test_tokenizer_without_eos_ends_answers_with_its_end_of_turn(tmp_path):
    tok = families.build_tokenizer(families.BY_NAME["qwen2"])
    tok.eos_token, tok.pad_token = None, None
    loaded = load_tokenizer(ModelConfig(name_or_path=saved(tok, tmp_path)))
    assert loaded.eos_token == "<|im_end|>" and loaded.pad_token == "<|im_end|>"


@pytest.mark.parametrize("template,problem", [
    # Drops the assistant's messages altogether (a prompt-only template).
    ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }}\n{% endif %}{% endfor %}"
     "{% if add_generation_prompt %}<|assistant|> {% endif %}", "without the assistant's message"),
    # Renders the past assistant turn with a different header than the generation prompt.
    ("{% for m in messages %}<|{{ m['role'] }}|>: {{ m['content'] }}\n{% endfor %}"
     "{% if add_generation_prompt %}<|assistant|> {% endif %}", "does not start with the generation prompt"),
    # Inserts a (Qwen3-style) empty reasoning block before the last answer.
    ("{% for m in messages %}<|{{ m['role'] }}|> {% if m['role'] == 'assistant' %}<think></think> {% endif %}"
     "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}",
     "between the generation prompt and the assistant's message"),
])
def test_template_that_does_not_render_the_answer_where_the_loss_needs_it_is_refused(tmp_path, template, problem):
    tok = families.build_tokenizer(families.BY_NAME["neox"])
    with pytest.raises(ModelLoadError, match=f"tokenizer {tmp_path}: chat_template: .*{problem}"):
        load_tokenizer(ModelConfig(name_or_path=saved(tok, tmp_path, template)))


def test_generation_block_that_disagrees_with_the_answer_is_refused(tmp_path):
    tok = families.build_tokenizer(families.BY_NAME["qwen2"])
    # The block marks the role line too: SFT would put the loss elsewhere than the template says.
    bad = families.CHATML_GENERATION_TEMPLATE.replace(
        "<|im_start|>{{ message['role'] }}\n{% if message['role'] == 'assistant' %}{% generation %}",
        "{% if message['role'] == 'assistant' %}{% generation %}<|im_start|>{{ message['role'] }}\n")
    bad = bad.replace("{% else %}{{ message['content'] }}", "{% else %}<|im_start|>{{ message['role'] }}\n"
                                                           "{{ message['content'] }}")
    assert bad != families.CHATML_GENERATION_TEMPLATE
    with pytest.raises(ModelLoadError, match=r"\{% generation %\} block marks"):
        load_tokenizer(ModelConfig(name_or_path=saved(tok, tmp_path, bad)))


def test_unknown_architecture_is_a_clear_error(tmp_path, family_dirs):
    import shutil

    shutil.copytree(family_dirs["llama3"], tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config.update(model_type="llama99", architectures=["Llama99ForCausalLM"])
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    for task in ("causal-lm", "reward"):
        with pytest.raises(ModelLoadError, match=r"config.json: \{'model_type': 'llama99', 'architectures': "
                                                 r"\['Llama99ForCausalLM'\]\} is not an architecture transformers"):
            load_model(ModelConfig(name_or_path=str(tmp_path / "m")), task=task)


def test_unknown_token_share_hand_counted():
    tok = families.build_tokenizer(families.BY_NAME["gemma2"])  # SentencePiece-style, with an <unk> token
    ids = tok("the pizza ☃", add_special_tokens=False)["input_ids"]
    unk = ids.count(tok.unk_token_id)
    assert unk >= 1  # the snowman was never seen in training
    assert unknown_token_share(tok, ["the pizza ☃"]) == pytest.approx(unk / len(ids))
    assert unknown_token_share(tok, ["the pizza was great ."]) == 0.0
    # Byte-level BPE reads every string: no unknown token at all.
    assert unknown_token_share(families.build_tokenizer(families.BY_NAME["gpt2"]), ["☃"]) == 0.0


def test_reward_model_from_an_sft_model_says_one_line_not_a_load_report(family_dirs, capsys, caplog):
    with caplog.at_level(logging.WARNING):
        load_model(ModelConfig(name_or_path=family_dirs["qwen2"]), task="reward", trainable=False)
    assert capsys.readouterr().out.strip() == "reward head initialised fresh: score.weight"
    assert "LOAD REPORT" not in caplog.text
    assert not logging.getLogger("transformers.modeling_utils").filters  # the filter is removed after loading


def test_reward_head_of_another_size_is_an_error_with_transformers_report(family_dirs, tmp_path):
    # A saved one-output reward model read as a two-output one.
    model = load_model(ModelConfig(name_or_path=family_dirs["gpt2"]), task="reward", trainable=False)
    model.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"(?s)num_labels=2: .*LOAD REPORT.*score.weight"):
        load_model(ModelConfig(name_or_path=str(tmp_path)), task="reward", num_labels=2, trainable=False)


def test_bitsandbytes_kernels_fallback_warning_is_dropped(caplog):
    from alignkit.modeling import _quantization

    _quantization(ModelConfig(load_in_4bit=True))  # installs the filter before bitsandbytes is imported
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.backends.cpu.ops"):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                       "already `pip install kernels`", "No module named 'kernels'")
        logger.warning("some other bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning"]
