import json
import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir():
    from alignkit.builtin import ensure_model

    return ensure_model("builtin:tiny")


@pytest.fixture(scope="session")
def sft_model_dir(tmp_path_factory):
    """A quickly fine-tuned built-in model (shared by later-stage tests)."""
    from alignkit.config import load_config
    from alignkit.sft import SFTConfig, train_sft

    out = tmp_path_factory.mktemp("sft")
    cfg = load_config(SFTConfig, os.path.join(ROOT, "configs/sft/tiny.yaml"),
                      [f"output_dir={out}", "train.num_epochs=2", "train.save_every=0", "train.eval_every=0",
                       "log.progress=false"])
    train_sft(cfg)
    return str(out / "final")


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """Tiny random-weight models of eight real families (tests/families.py), built once per test session."""
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import families

    return families.build_all(str(tmp_path_factory.mktemp("families")))
