"""Tests for alignkit.losses: expected values are worked out by hand in the comments.

Run: pytest -q tests/test_losses.py
"""

import math
import os
import subprocess
import sys

import pytest
import torch

from alignkit.losses import (
    MARGIN_TABLES,
    AdaptiveKLController,
    FixedKLController,
    bradley_terry_loss,
    centering_loss,
    entropy_from_logits,
    explained_variance,
    gae_advantages,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    pairwise_ranking_loss,
    per_token_rewards,
    plackett_luce_loss,
    policy_loss,
    ranking_to_pairs,
    tie_loss,
    value_loss,
)


def t(*values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def close(actual, expected, tol=1e-6):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64), expected, atol=tol, rtol=0)


# softplus(-x) = log(1 + e^-x) = -log sigmoid(x): the BT loss for a score gap x.
LOG2 = math.log(2)  # 0.693147...
BT_1 = math.log1p(math.exp(-1.0))  # 0.313262...
BT_1_5 = math.log1p(math.exp(-1.5))  # 0.201413...
BT_3 = math.log1p(math.exp(-3.0))  # 0.048587...


def test_module_imports_without_heavy_dependencies():
    code = "import sys, alignkit.losses; bad = {'transformers', 'accelerate', 'peft', 'trl'} & set(sys.modules); assert not bad, bad"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ----------------------------------------------------------------------------- reward model


def test_margin_tables_are_llama2_values():
    assert MARGIN_TABLES["llama2_small"] == pytest.approx(
        {"significantly_better": 1.0, "better": 2 / 3, "slightly_better": 1 / 3, "negligibly_better": 0.0}
    )
    assert MARGIN_TABLES["llama2_large"] == {
        "significantly_better": 3.0,
        "better": 2.0,
        "slightly_better": 1.0,
        "negligibly_better": 0.0,
    }


def test_bradley_terry_hand_values():
    # r_c = 1, r_r = 0: -log sigmoid(1) = log(1 + e^-1) = 0.3132617
    close(bradley_terry_loss(t(1.0), t(0.0)), 0.3132617)
    # pairs (1, 0) and (0, 0): mean(0.3132617, log 2 = 0.6931472) = 0.5032044
    close(bradley_terry_loss(t(1.0, 0.0), t(0.0, 0.0)), 0.5032044)
    # margin: gap 2 - 0 - margin 1 = 1 -> 0.3132617; as a per-pair tensor too
    close(bradley_terry_loss(t(2.0), t(0.0), margin=1.0), BT_1)
    close(bradley_terry_loss(t(2.0, 3.0), t(0.0, 0.0), margin=t(1.0, 3.0)), (BT_1 + LOG2) / 2)
    # weights 3 and 1 on losses 0.3132617 and 0.6931472: (3 * 0.3132617 + 0.6931472) / 4 = 0.4082331
    close(bradley_terry_loss(t(1.0, 0.0), t(0.0, 0.0), weight=t(3.0, 1.0)), 0.4082331)


def test_bradley_terry_is_stable_for_large_gaps():
    # gap -1000: log(1 + e^1000) = 1000 (log(sigmoid) would give inf); gap +1000: 0
    chosen = torch.tensor([-1000.0, 1000.0], requires_grad=True)
    loss = bradley_terry_loss(chosen, torch.zeros(2))
    close(loss, 500.0, tol=1e-3)
    loss.backward()
    # d/dx of -log sigmoid(x) = sigmoid(x) - 1: -1 for the first pair, 0 for the second, / 2 for the mean
    close(chosen.grad, [-0.5, 0.0])


def test_tie_loss_hand_values_and_gradient():
    # d = 0: 0.5 log 2 + 0.5 log 2 = log 2, the minimum
    close(tie_loss(t(0.3), t(0.3)), LOG2)
    # d = 2: 0.5 (log(1 + e^-2) + log(1 + e^2)) = 0.5 (0.126928 + 2.126928) = 1.126928
    close(tie_loss(t(2.0), t(0.0)), 1.126928)
    # symmetric in the two answers
    close(tie_loss(t(0.0), t(2.0)), 1.126928)
    # gradient w.r.t. d is sigmoid(d) - 0.5 = 0.880797 - 0.5 = 0.380797 (pulls r_a down)
    r_a = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    tie_loss(r_a, t(0.0)).backward()
    close(r_a.grad, [0.380797])


def test_ranking_to_pairs():
    assert ranking_to_pairs([2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]
    assert len(ranking_to_pairs(range(9))) == 36  # C(9, 2)
    assert ranking_to_pairs([5]) == []


def test_ranking_loss_k3_is_mean_of_its_three_bt_losses():
    # answers 0, 1, 2 with scores 0.5, -1, 2; labelled ranking best first: 2 > 0 > 1
    rewards = t(0.5, -1.0, 2.0)
    pairs = torch.tensor(ranking_to_pairs([2, 0, 1]))
    loss, correct = pairwise_ranking_loss(rewards, pairs[:, 0], pairs[:, 1])
    # gaps: 2 - 0.5 = 1.5, 2 - (-1) = 3, 0.5 - (-1) = 1.5
    # (0.2014133 + 0.0485874 + 0.2014133) / 3 = 0.1504713
    close(loss, 0.1504713)
    close(loss, bradley_terry_loss(t(2.0, 2.0, 0.5), t(0.5, -1.0, -1.0)))
    assert correct.tolist() == [True, True, True]


def test_ranking_accuracy_counts_equal_scores_as_wrong():
    rewards = t(1.0, 1.0, 0.0)
    _, correct = pairwise_ranking_loss(rewards, torch.tensor([0, 2]), torch.tensor([1, 0]))
    # 1 > 1 is False (equal score), 0 > 1 is False (wrong order)
    assert correct.tolist() == [False, False]


def test_ranking_loss_averages_per_prompt_then_over_prompts():
    # prompt 7: four answers all scored 0 -> C(4,2) = 6 pairs of loss log 2 each
    # prompt 3: two answers scored 1 and 0 -> 1 pair of loss 0.3132617
    rewards = t(0.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    pairs = ranking_to_pairs([0, 1, 2, 3]) + [(4, 5)]
    # interleave the lone pair of prompt 3 among those of prompt 7: order must not matter
    pairs.insert(2, pairs.pop())
    group = torch.tensor([7, 7, 3, 7, 7, 7, 7])
    winners, losers = torch.tensor(pairs).T
    loss, _ = pairwise_ranking_loss(rewards, winners, losers, group=group)
    # per prompt: log 2 and 0.3132617 -> (0.6931472 + 0.3132617) / 2 = 0.5032044
    close(loss, 0.5032044)
    # a flat mean over the 7 pairs would be (6 * 0.6931472 + 0.3132617) / 7 = 0.6388778
    flat, _ = pairwise_ranking_loss(rewards, winners, losers)
    close(flat, 0.6388778)


def test_ranking_loss_with_ties_margins_and_weights():
    rewards = t(2.0, 0.0, 0.5)
    winners, losers = torch.tensor([0, 0]), torch.tensor([1, 2])
    tie = torch.tensor([True, False])
    # pair 0 is a tie with d = 2 -> 1.126928 (margin ignored); pair 1 BT with gap 1.5 - margin 0.5 = 1 -> 0.3132617
    loss, _ = pairwise_ranking_loss(rewards, winners, losers, margin=t(5.0, 0.5), tie=tie)
    close(loss, (1.126928 + BT_1) / 2)
    # weights 1 and 3: (1.126928 + 3 * 0.3132617) / 4 = 0.5166926
    loss, _ = pairwise_ranking_loss(rewards, winners, losers, margin=t(5.0, 0.5), tie=tie, weight=t(1.0, 3.0))
    close(loss, (1.126928 + 3 * BT_1) / 4)


def test_ranking_loss_gradient_reaches_each_answer_once():
    # each answer is scored once; its gradient sums over all pairs it appears in
    rewards = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    pairs = torch.tensor(ranking_to_pairs([0, 1, 2]))
    loss, _ = pairwise_ranking_loss(rewards, pairs[:, 0], pairs[:, 1])
    loss.backward()
    # every gap is 0, d loss / d gap = sigmoid(0) - 1 = -0.5 per pair, / 3 pairs:
    # answer 0 wins twice -> -1/3; answer 1 wins once, loses once -> 0; answer 2 loses twice -> +1/3
    close(rewards.grad, [-1 / 3, 0.0, 1 / 3])


def test_plackett_luce_with_two_answers_equals_bradley_terry():
    rewards = t(1.0, 0.0, 0.3, 0.8, -2.0, 4.0).view(3, 2)
    close(plackett_luce_loss(rewards), bradley_terry_loss(rewards[:, 0], rewards[:, 1]))


def test_plackett_luce_hand_value_and_padding():
    # scores 2 > 1 > 0 in ranked order:
    # [logsumexp(2, 1, 0) - 2] + [logsumexp(1, 0) - 1] + [0 - 0]
    # = log(1 + e^-1 + e^-2) + log(1 + e^-1) = 0.4076060 + 0.3132617 = 0.7208677
    close(plackett_luce_loss(t(2.0, 1.0, 0.0).view(1, 3)), 0.7208677)
    # second row has only two answers; its padded slot holds garbage
    rewards = torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.0, 1e4]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    loss = plackett_luce_loss(rewards, mask)
    close(loss, (0.7208677 + BT_1) / 2)
    loss.backward()
    assert torch.isfinite(rewards.grad).all()
    assert rewards.grad[1, 2] == 0
    # a wrong ranking costs more than the right one
    assert plackett_luce_loss(t(0.0, 1.0, 2.0).view(1, 3)) > 0.7208677


def test_centering_loss():
    # (1 + 4 + 9) / 3
    close(centering_loss(t(1.0, -2.0, 3.0)), 14 / 3)
    # TRL form: mean((r_c + r_r)^2) with sums 1 and -1 -> 1
    close(centering_loss(t(2.0, 0.0) + t(-1.0, -1.0)), 1.0)


# ----------------------------------------------------------------------------- masked statistics


def test_masked_mean():
    x = t(1.0, 2.0, float("nan"), 4.0, 5.0, 100.0).view(2, 3)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    # (1 + 2 + 4 + 5 + 100) / 5 = 22.4; the NaN is masked out
    close(masked_mean(x, mask), 22.4)
    # rows: (1 + 2) / 2 = 1.5, (4 + 5 + 100) / 3 = 36.3333
    close(masked_mean(x, mask, dim=-1), [1.5, 109 / 3])
    # an empty row gives 0, not NaN
    close(masked_mean(x, torch.tensor([[False] * 3, [True] * 3]), dim=-1), [0.0, 109 / 3])


def test_masked_var():
    x = t(1.0, 2.0, 3.0, 4.0, 50.0)
    mask = torch.tensor([True, True, True, True, False])
    # mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    close(masked_var(x, mask, unbiased=False), 5 / 4)
    close(masked_var(x, mask), 5 / 3)
    with pytest.raises(ValueError):
        masked_var(x, torch.tensor([True, False, False, False, False]))


def test_masked_whiten_hand_values():
    x = t(1.0, 2.0, 3.0, 77.0).view(1, 4)
    mask = torch.tensor([[True, True, True, False]])
    # mean 2, unbiased var (1 + 0 + 1) / 2 = 1 -> (x - 2) / 1; padded slot 0
    close(masked_whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]])
    # shift_mean=False adds the mean back: only the scale changes
    close(masked_whiten(x, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]])


def test_masked_whiten_ignores_padding():
    torch.manual_seed(0)
    x, mask = torch.randn(3, 5), torch.ones(3, 5, dtype=torch.bool)
    padded_x = torch.cat([x, torch.full((3, 4), 1e6)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], dim=1)
    whitened = masked_whiten(padded_x, padded_mask)
    torch.testing.assert_close(whitened[:, :5], masked_whiten(x, mask))
    assert (whitened[:, 5:] == 0).all()
    close(masked_mean(whitened, padded_mask), 0.0)


# ----------------------------------------------------------------------------- KL and rewards


def test_kl_penalty_hand_values():
    logp, ref = t(-1.0, -2.0), t(-2.0, -1.0)
    # k1 = logp - ref = 1, -1
    close(kl_penalty(logp, ref, "k1"), [1.0, -1.0])
    # k3 = exp(ref - logp) - 1 - (ref - logp):
    # first: e^-1 - 1 + 1 = 0.3678794; second: e^1 - 1 - 1 = 0.7182818
    close(kl_penalty(logp, ref, "k3"), [0.3678794, 0.7182818])
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k9")


def test_k3_is_non_negative_and_zero_only_at_equality():
    torch.manual_seed(0)
    logp, ref = -torch.rand(1000) * 10, -torch.rand(1000) * 10
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    assert (kl_penalty(logp, logp, "k3") == 0).all()
    # k1 can be negative per token, k3 cannot
    assert (kl_penalty(logp, ref, "k1") < 0).any()


def test_only_k1_as_a_detached_reward_penalty_has_the_kl_gradient():
    """Exact expectations over a 5-way categorical policy q and reference p. A penalty c(x) in the reward is
    detached, so PPO's gradient of its mean is the score-function term sum_x q(x) c(x) grad log q(x). With
    c = k1 that is grad KL(q || p); with c = k3 it is grad KL(q || p) + grad E_p[log q]: descending it also
    lowers the policy's log-likelihood of the reference's own samples (why ppo keeps k1 in the reward)."""
    torch.manual_seed(0)
    logits = torch.randn(5, dtype=torch.float64, requires_grad=True)
    log_p = torch.log_softmax(torch.randn(5, dtype=torch.float64), -1)

    def grad(f):
        return torch.autograd.grad(f(torch.log_softmax(logits, -1)), logits)[0]

    def score_function(estimator):
        def f(log_q):
            c = kl_penalty(log_q.detach(), log_p, estimator)
            return (log_q.detach().exp() * c * log_q).sum()
        return grad(f)

    kl = grad(lambda log_q: (log_q.exp() * (log_q - log_p)).sum())
    cross = grad(lambda log_q: (log_p.exp() * log_q).sum())
    close(score_function("k1"), kl, tol=1e-12)
    close(score_function("k3"), kl + cross, tol=1e-12)
    assert (score_function("k3") - kl).abs().max() > 0.05


def test_per_token_rewards():
    scores = t(1.0, 2.0, 3.0)
    kl = t(0.1, 0.2, 0.3, 0.5, 0.4, 9.9, 1.0, 1.0, 1.0).view(3, 3)
    mask = torch.tensor([[True, True, True], [True, True, False], [False, False, False]])
    rewards, non_score = per_token_rewards(scores, kl, 0.5, mask)
    # non-score: -0.5 * kl on real tokens -> [-0.05, -0.1, -0.15], [-0.25, -0.2, 0]; empty row all 0
    close(non_score, [[-0.05, -0.1, -0.15], [-0.25, -0.2, 0.0], [0.0, 0.0, 0.0]])
    # score on the last real token: -0.15 + 1 = 0.85 (row 0, t = 2); -0.2 + 2 = 1.8 (row 1, t = 1)
    close(rewards, [[-0.05, -0.1, 0.85], [-0.25, 1.8, 0.0], [0.0, 0.0, 0.0]])


# ----------------------------------------------------------------------------- GAE


def test_gae_hand_values():
    rewards, values = t(0.0, 0.0, 1.0).view(1, 3), t(0.5, 0.6, 0.7).view(1, 3)
    mask = torch.ones(1, 3, dtype=torch.bool)
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    # gamma * lam = 0.72; V after the last token = 0
    # t=2: delta = 1 + 0.9 * 0 - 0.7 = 0.3;              A = 0.3
    # t=1: delta = 0 + 0.9 * 0.7 - 0.6 = 0.03;           A = 0.03 + 0.72 * 0.3 = 0.246
    # t=0: delta = 0 + 0.9 * 0.6 - 0.5 = 0.04;           A = 0.04 + 0.72 * 0.246 = 0.21712
    close(advantages, [[0.21712, 0.246, 0.3]])
    # returns = A + V
    close(returns, [[0.71712, 0.846, 1.0]])


def test_gae_with_lambda_one_gives_discounted_monte_carlo_returns():
    rewards, values = t(0.0, 0.0, 1.0).view(1, 3), t(5.0, -3.0, 2.0).view(1, 3)
    _, returns = gae_advantages(rewards, values, torch.ones(1, 3, dtype=torch.bool), gamma=0.9, lam=1.0)
    # sum_k gamma^k r_{t+k}: 0.81, 0.9, 1, whatever the values
    close(returns, [[0.81, 0.9, 1.0]])


def test_gae_ignores_padding_tokens():
    torch.manual_seed(0)
    rewards, values = torch.randn(2, 4), torch.randn(2, 4)
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    # garbage rewards and values on the masked tokens, plus three more padded steps
    padded_rewards = torch.cat([rewards.masked_fill(~mask, 50.0), torch.full((2, 3), 50.0)], dim=1)
    padded_values = torch.cat([values.masked_fill(~mask, 100.0), torch.full((2, 3), 100.0)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    padded_adv, padded_ret = gae_advantages(padded_rewards, padded_values, padded_mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(padded_adv[:, :4], advantages)
    torch.testing.assert_close(padded_ret[:, :4], returns)
    assert (padded_adv[~padded_mask] == 0).all() and (padded_ret[~padded_mask] == 0).all()
    # the short row equals the same row computed alone on its two real tokens
    alone, _ = gae_advantages(rewards[1:, :2], values[1:, :2], mask[1:, :2], gamma=1.0, lam=0.95)
    torch.testing.assert_close(advantages[1:, :2], alone)


# ----------------------------------------------------------------------------- PPO losses


def _policy_case():
    # ratios 1.5, 0.5, 1.0, 0.5 with advantages 1, 1, -2, -1; clip range 0.2 -> [0.8, 1.2]
    old = t(-1.0, -1.0, -1.0, -1.0).view(1, 4)
    logprobs = (old + torch.log(t(1.5, 0.5, 1.0, 0.5).view(1, 4))).requires_grad_()
    advantages = t(1.0, 1.0, -2.0, -1.0).view(1, 4)
    return logprobs, old, advantages


def test_policy_loss_hand_values():
    logprobs, old, advantages = _policy_case()
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, clipfrac, approx_kl = policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    # token 0: max(-1 * 1.5, -1 * 1.2) = -1.2   clipped term wins
    # token 1: max(-1 * 0.5, -1 * 0.8) = -0.5   unclipped
    # token 2: max( 2 * 1.0,  2 * 1.0) =  2.0   unclipped (equal)
    # token 3: max( 1 * 0.5,  1 * 0.8) =  0.8   clipped term wins
    # mean: (-1.2 - 0.5 + 2 + 0.8) / 4 = 0.275; clipfrac 2 / 4
    close(loss, 0.275)
    close(clipfrac, 0.5)
    # 0.5 * mean(log(1.5)^2, log(0.5)^2, 0, log(0.5)^2) = 0.5 * (0.164402 + 2 * 0.480453) / 4 = 0.1406635
    close(approx_kl, 0.1406635)
    loss.backward()
    # d/dlogp of -A * ratio is -A * ratio: token 1 -> -0.5 / 4, token 2 -> 2 / 4; clipped tokens get 0
    close(logprobs.grad, [[0.0, -0.125, 0.5, 0.0]])


def test_policy_loss_ignores_padding():
    logprobs, old, advantages = _policy_case()
    mask = torch.ones(1, 4, dtype=torch.bool)
    expected = policy_loss(logprobs, old, advantages, mask, 0.2)
    # padding with log-probs that would overflow exp() and NaN advantages
    pad_lp = torch.cat([logprobs.detach(), t(500.0, 0.0).view(1, 2)], dim=1).requires_grad_()
    pad_old = torch.cat([old, t(-500.0, 3.0).view(1, 2)], dim=1)
    pad_adv = torch.cat([advantages, t(float("nan"), 7.0).view(1, 2)], dim=1)
    pad_mask = torch.cat([mask, torch.zeros(1, 2, dtype=torch.bool)], dim=1)
    got = policy_loss(pad_lp, pad_old, pad_adv, pad_mask, 0.2)
    for a, b in zip(got, expected):
        close(a, b.detach())
    got[0].backward()
    close(pad_lp.grad, [[0.0, -0.125, 0.5, 0.0, 0.0, 0.0]])


def test_value_loss_hand_values_and_padding():
    # old values 0, clip range 0.2 -> clipped V in [-0.2, 0.2]
    values = t(0.5, 0.1, -0.5).view(1, 3)
    old_values, returns = torch.zeros(1, 3, dtype=torch.float64), t(1.0, 0.0, 0.0).view(1, 3)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, clipfrac = value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    # token 0: V 0.5 -> clip 0.2; (0.5 - 1)^2 = 0.25 vs (0.2 - 1)^2 = 0.64 -> 0.64 (clipped)
    # token 1: V 0.1 inside; 0.01 vs 0.01 -> 0.01
    # token 2: V -0.5 -> clip -0.2; 0.25 vs 0.04 -> 0.25 (unclipped)
    # 0.5 * (0.64 + 0.01 + 0.25) / 3 = 0.15; clipfrac 1 / 3
    close(loss, 0.15)
    close(clipfrac, 1 / 3)
    # garbage on padded tokens changes nothing
    pad = lambda x, v: torch.cat([x, torch.full((1, 2), v, dtype=torch.float64)], dim=1)
    pad_mask = torch.cat([mask, torch.zeros(1, 2, dtype=torch.bool)], dim=1)
    got = value_loss(pad(values, 9.0), pad(old_values, -9.0), pad(returns, float("nan")), pad_mask, 0.2)
    close(got[0], 0.15)
    close(got[1], 1 / 3)


# ----------------------------------------------------------------------------- logits


def test_entropy_from_logits():
    logits = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],  # uniform over 4: log 4 = 1.3862944
            [0.0, math.log(3.0), -math.inf, -math.inf],  # p = 0.25, 0.75: -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.5623351
            [1e4, 1e4, -1e4, -1e4],  # two equal huge logits: log 2, no overflow
        ],
        dtype=torch.float64,
    ).view(1, 3, 4)
    logits.requires_grad_()
    entropy = entropy_from_logits(logits)
    close(entropy, [[math.log(4), 0.5623351, LOG2]])
    entropy.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_logprobs_from_logits():
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, 5.0]]])
    labels = torch.tensor([[1, 0]])
    # softmax(0, ln 3) = (0.25, 0.75) -> log 0.75 = -0.2876821; equal logits -> log 0.5
    close(logprobs_from_logits(logits, labels), [[math.log(0.75), -LOG2]], tol=1e-5)
    # temperature 2: logits (0, ln 3 / 2) -> p = sqrt(3) / (1 + sqrt(3)) = 0.6339746 -> log = -0.4557464
    close(logprobs_from_logits(logits, labels, temperature=2.0)[0, 0], -0.4557464, tol=1e-5)
    # agrees with log_softmax + gather on random bf16 logits with huge values
    torch.manual_seed(0)
    logits = (torch.randn(2, 5, 11) * 1e3).to(torch.bfloat16)
    labels = torch.randint(0, 11, (2, 5))
    ref = torch.log_softmax(logits.float() / 0.7, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logprobs_from_logits(logits, labels, 0.7), ref)


def test_explained_variance():
    returns = t(1.0, 2.0, 3.0, 0.0).view(1, 4)
    mask = torch.tensor([[True, True, True, False]])
    # perfect prediction -> 1 (the padded slot's value is garbage)
    close(explained_variance(t(1.0, 2.0, 3.0, 99.0).view(1, 4), returns, mask), 1.0)
    # a constant prediction -> 0
    close(explained_variance(t(2.0, 2.0, 2.0, 99.0).view(1, 4), returns, mask), 0.0)
    # values (1, 2, 4): residuals (0, 0, -1) have variance 1/3 - 1/9 = 2/9;
    # returns have variance 2/3 -> 1 - (2/9) / (2/3) = 2/3
    close(explained_variance(t(1.0, 2.0, 4.0, 99.0).view(1, 4), returns, mask), 2 / 3)


# ----------------------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_hand_values():
    # target 6, horizon 10000, n_steps 256 -> step factor 256 / 10000 = 0.0256
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 6.6: error 6.6 / 6 - 1 = 0.1 -> 0.1 * (1 + 0.1 * 0.0256) = 0.100256
    close(ctl.update(6.6, 256), 0.100256)
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 12: error 1 clipped to 0.2 -> 0.1 * (1 + 0.2 * 0.0256) = 0.100512
    close(ctl.update(torch.tensor(12.0), 256), 0.100512)
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 0: error -1 clipped to -0.2 -> 0.1 * (1 - 0.00512) = 0.099488
    close(ctl.update(0.0, 256), 0.099488)


def test_adaptive_kl_controller_moves_kl_toward_target():
    # toy policy whose KL is inversely proportional to the coefficient: KL = 1.2 / kl_coef,
    # so the target KL 6 is reached at kl_coef = 0.2; start at 0.1 (KL 12, too high)
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    gaps = []
    for _ in range(200):
        kl = 1.2 / ctl.kl_coef
        gaps.append(abs(kl - 6.0))
        ctl.update(kl, n_steps=10)
    assert all(later <= earlier for earlier, later in zip(gaps, gaps[1:]))
    assert gaps[-1] < 0.01 and ctl.kl_coef == pytest.approx(0.2, abs=1e-3)


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 256) == 0.05 and ctl.kl_coef == 0.05
