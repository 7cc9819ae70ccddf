"""DPO, IPO, KTO losses and critic-free advantages: hand-computed values, then TRL 1.16 on identical batches.

Run: pytest -q tests/test_losses_preference.py     (~15 s, most of it importing TRL)
"""

import math

import pytest
import torch

from alignkit.losses import (
    dpo_loss,
    dpo_rewards,
    grpo_advantages,
    ipo_loss,
    kto_default_weights,
    kto_loss,
    kto_reference_point,
    reinforce_pp_advantages,
    rloo_advantages,
)


def t(*values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def close(actual, expected, tol=1e-6):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64), expected, atol=tol, rtol=0)


SOFTPLUS_M1 = math.log1p(math.exp(-1.0))  # -log sigmoid(1) = 0.313262
SOFTPLUS_1 = math.log1p(math.exp(1.0))  # -log sigmoid(-1) = 1.313262 (= 1 + 0.313262)
LOG2 = math.log(2)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# ----------------------------------------------------------------------------- DPO / IPO


def test_dpo_hand_values():
    # Pair 0: chosen log-ratio -1 - (-2) = 1, rejected -3 - (-2) = -1, h = 2, beta h = 0.5 * 2 = 1
    #   -> -log sigmoid(1) = 0.313262.
    # Pair 1: every log-prob -2, h = 0 -> -log sigmoid(0) = log 2 = 0.693147.
    pc, pr, rc, rr = t(-1.0, -2.0), t(-3.0, -2.0), t(-2.0, -2.0), t(-2.0, -2.0)
    close(dpo_loss(pc, pr, rc, rr, beta=0.5), [SOFTPLUS_M1, LOG2])
    # Implicit rewards beta * log-ratio: chosen 0.5 * 1 = 0.5, rejected 0.5 * -1 = -0.5.
    close(dpo_rewards(pc, rc, 0.5), [0.5, 0.0])
    close(dpo_rewards(pr, rr, 0.5), [-0.5, 0.0])


def test_conservative_dpo_hand_values():
    # eps = 0.1, beta h = 1: 0.9 * 0.313262 + 0.1 * 1.313262 = 0.281936 + 0.131326 = 0.413262.
    # At h = 0 both terms are log 2: 0.9 log 2 + 0.1 log 2 = log 2.
    pc, pr, rc, rr = t(-1.0, -2.0), t(-3.0, -2.0), t(-2.0, -2.0), t(-2.0, -2.0)
    close(dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1), [0.413262, LOG2], tol=1e-6)
    # The gradient no longer vanishes as h grows: d/dh at beta h = 10 is beta * (-(1-eps) s(-10) + eps s(10)) > 0.
    h = torch.tensor([20.0], requires_grad=True)
    dpo_loss(h, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.5, label_smoothing=0.1).sum().backward()
    assert h.grad.item() > 0.04  # 0.5 * (0.1 * sigmoid(10) - 0.9 * sigmoid(-10)) = 0.049980


def test_ipo_hand_values():
    # tau = 0.5, so the target margin 1 / (2 tau) = 1.
    # Pair 0: h = 2 -> (2 - 1)^2 = 1. Pair 1: h = 0 -> (0 - 1)^2 = 1.
    pc, pr, rc, rr = t(-1.0, -2.0), t(-3.0, -2.0), t(-2.0, -2.0), t(-2.0, -2.0)
    close(ipo_loss(pc, pr, rc, rr, tau=0.5), [1.0, 1.0])
    # Length-averaged: pair 0 chosen log-ratio 1 over 2 tokens = 0.5, rejected -1 over 4 tokens = -0.25,
    # h = 0.75 -> (0.75 - 1)^2 = 0.0625. Pair 1 stays 1.
    close(ipo_loss(pc, pr, rc, rr, tau=0.5, chosen_lengths=t(2.0, 3.0), rejected_lengths=t(4.0, 5.0)),
          [0.0625, 1.0])


# ----------------------------------------------------------------------------- KTO


def test_kto_reference_point_is_clamped_and_detached():
    # Mismatched pairs: log-ratios 1 and 0 -> z0 = mean = 0.5.
    kl_pol = t(-3.0, -4.0).requires_grad_()
    z0 = kto_reference_point(kl_pol, t(-4.0, -4.0))
    close(z0, 0.5)
    assert not z0.requires_grad
    # Log-ratios -1 and -2 -> mean -1.5, clamped at 0 (a KL cannot be negative).
    close(kto_reference_point(t(-3.0, -4.0), t(-2.0, -2.0)), 0.0)


def test_kto_hand_values():
    # beta = 1, z0 = 0.5. Row 0 desirable, r = -1 - (-2) = 1: 1 - sigmoid(1 - 0.5) = 1 - 0.622459 = 0.377541,
    # times lambda_D = 2 -> 0.755082. Row 1 undesirable, r = -2 - (-1) = -1: 1 - sigmoid(0.5 - (-1))
    # = 1 - sigmoid(1.5) = 1 - 0.817574 = 0.182426, times lambda_U = 1.
    losses = kto_loss(t(-1.0, -2.0), t(-2.0, -1.0), torch.tensor([True, False]), z0=0.5, beta=1.0,
                      desirable_weight=2.0, undesirable_weight=1.0)
    close(losses, [2 * (1 - sigmoid(0.5)), 1 - sigmoid(1.5)])
    close(losses, [0.755082, 0.182426], tol=1e-6)


def test_kto_gradient_pushes_desirable_up_and_undesirable_down():
    logps = t(-1.0, -1.0).requires_grad_()
    kto_loss(logps, t(-1.0, -1.0), torch.tensor([True, False]), z0=0.0, beta=0.1).sum().backward()
    # d/dr [1 - s(beta r)] = -beta s (1 - s) = -0.1 * 0.25 at r = 0; the undesirable one +0.025.
    close(logps.grad, [-0.025, 0.025])


def test_kto_default_weights_follow_the_paper_ratio_rule():
    # lambda_D n_D / (lambda_U n_U) must land in [1, 4/3].
    assert kto_default_weights(100, 300) == (3.0, 1.0)  # 3 * 100 / 300 = 1
    assert kto_default_weights(400, 100) == (1.0, 3.0)  # 400 / (3 * 100) = 4/3
    assert kto_default_weights(120, 100) == (1.0, 1.0)  # 1.2 already inside
    with pytest.raises(ValueError, match="desirable and undesirable"):
        kto_default_weights(10, 0)


# ----------------------------------------------------------------------------- critic-free advantages


def test_rloo_hand_values():
    # Prompt 0 scores 1, 2, 6: baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5 -> -3, -1.5, 4.5.
    # Prompt 1 scores all 0 -> 0. Same as k/(k-1) * (r - mean) = 1.5 * (-2, -1, 3).
    close(rloo_advantages(t(1.0, 2.0, 6.0, 0.0, 0.0, 0.0), k=3), [-3.0, -1.5, 4.5, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="at least 2 samples"):
        rloo_advantages(t(1.0, 2.0), k=1)
    with pytest.raises(ValueError, match="side by side"):
        rloo_advantages(t(1.0, 2.0, 3.0), k=2)


def test_grpo_hand_values_and_dr_grpo():
    # Scores 1, 2, 6: mean 3, deviations -2, -1, 3, unbiased variance (4 + 1 + 9) / 2 = 7, std 2.645751.
    # eps = 0: -2 / 2.645751 = -0.755929, -0.377964, 1.133893.
    close(grpo_advantages(t(1.0, 2.0, 6.0), k=3, eps=0.0), [-0.755929, -0.377964, 1.133893], tol=1e-6)
    # Dr. GRPO: no std -> the deviations themselves.
    close(grpo_advantages(t(1.0, 2.0, 6.0), k=3, scale_by_std=False), [-2.0, -1.0, 3.0])
    # A group with equal scores: 0 / (0 + eps) = 0, no NaN.
    close(grpo_advantages(t(5.0, 5.0, 1.0, 3.0), k=2), [0.0, 0.0, -1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4)])


def test_reinforce_pp_hand_values_and_padding():
    # Row 0 rewards 0, 0, 1 -> returns-to-go (gamma 1) 1, 1, 1. Row 1 rewards 0, 2, [pad 99] -> 2, 2.
    # Valid returns 1, 1, 1, 2, 2: mean 1.4, unbiased var (3 * 0.16 + 2 * 0.36) / 4 = 0.3, std 0.547723.
    # Whitened: -0.4 / 0.547723 = -0.730297, 0.6 / 0.547723 = 1.095445; the pad stays 0.
    rewards = t(0.0, 0.0, 1.0, 0.0, 2.0, 99.0).view(2, 3)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    a, b = -0.4 / math.sqrt(0.3), 0.6 / math.sqrt(0.3)
    close(reinforce_pp_advantages(rewards, mask), [[a, a, a], [b, b, 0.0]], tol=1e-5)
    # gamma 0.5: row 0 returns 0.25, 0.5, 1; row 1: 0 + 0.5 * 2 = 1, 2. Valid 0.25, 0.5, 1, 1, 2: mean 0.95,
    # deviations -0.7, -0.45, 0.05, 0.05, 1.05, squares sum 1.8, var 1.8 / 4 = 0.45, std 0.670820.
    s = math.sqrt(0.45)
    close(reinforce_pp_advantages(rewards, mask, gamma=0.5),
          [[-0.7 / s, -0.45 / s, 0.05 / s], [0.05 / s, 1.05 / s, 0.0]], tol=1e-5)


# ----------------------------------------------------------------------------- TRL 1.16 on identical batches

PROMPTS = ["review the pizza", "describe the song", "how was the hotel", "tell me about the park"]
GOOD = ["the pizza was great .", "the song was very good .", "the hotel was nice and the staff was fun .",
        "the park was lovely ."]
BAD = ["the pizza was bad and you are stupid .", "the staff was dull .", "the hotel was awful .",
       "the view was boring but the park was okay ."]


@pytest.fixture(scope="module")
def tiny_models():
    from alignkit.builtin import build_model

    policy, tok = build_model("tiny", seed=0)
    reference, _ = build_model("tiny", seed=1)  # a different reference so the log-ratios are not 0
    return policy, reference, tok


def _trl_batch_logps(model, batch):
    """Our summed answer log-probs (alignkit.dpo.answer_logprobs) on TRL's own collated batch."""
    from alignkit.dpo import answer_logprobs
    from alignkit.tokenization import IGNORE_INDEX

    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    with torch.no_grad():
        return answer_logprobs(model, batch["input_ids"], batch["attention_mask"], labels)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_match_trl(tiny_models, tmp_path, loss_type):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy, reference, tok = tiny_models
    rows = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": g}],
             "rejected": [{"role": "assistant", "content": b}]} for p, g, b in zip(PROMPTS, GOOD, BAD)]
    beta = 0.3
    # bf16=False: TRL's configs default to bf16 autocast, which moves the loss by ~1e-4.
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], beta=beta,
                     loss_type=[loss_type], use_cpu=True, bf16=False, save_strategy="no", logging_strategy="no")
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = trainer._compute_loss(trainer.model, batch, False).item()
    # TRL's batch is [chosen rows; rejected rows].
    logps, ref_logps = _trl_batch_logps(policy, batch), _trl_batch_logps(reference, batch)
    pc, pr = logps.chunk(2)
    rc, rr = ref_logps.chunk(2)
    if loss_type == "sigmoid":
        ours = dpo_loss(pc, pr, rc, rr, beta).mean().item()
    else:
        lengths = batch["completion_mask"].sum(-1).float()
        lc, lr = lengths.chunk(2)
        ours = ipo_loss(pc, pr, rc, rr, beta, chosen_lengths=lc, rejected_lengths=lr).mean().item()
    assert abs(ours - trl_loss) < 1e-5, (ours, trl_loss)
    assert abs(trl_loss - (LOG2 if loss_type == "sigmoid" else 0)) > 1e-3  # the reference really differs


def test_kto_matches_trl(tiny_models, tmp_path):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    policy, reference, tok = tiny_models
    rows = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": a}],
             "label": good} for p, g, b in zip(PROMPTS, GOOD, BAD) for a, good in ((g, True), (b, False))][:6]
    beta, wd, wu = 0.2, 1.5, 0.8
    args = KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, report_to=[], beta=beta,
                     desirable_weight=wd, undesirable_weight=wu, use_cpu=True, bf16=False, save_strategy="no",
                     logging_strategy="no")
    trainer = KTOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = trainer._compute_loss(trainer.model, batch, False).item()
    logps, ref_logps = _trl_batch_logps(policy, batch), _trl_batch_logps(reference, batch)
    kl_batch = {"input_ids": batch["KL_input_ids"], "attention_mask": batch["KL_attention_mask"],
                "completion_mask": batch["KL_completion_mask"]}
    z0 = kto_reference_point(_trl_batch_logps(policy, kl_batch), _trl_batch_logps(reference, kl_batch))
    ours = kto_loss(logps, ref_logps, batch["label"].bool(), z0, beta, wd, wu).mean().item()
    assert abs(ours - trl_loss) < 1e-5, (ours, trl_loss)
