"""Loss and RL maths for the reward-model, PPO, DPO/IPO and KTO stages: small pure torch functions.

Nothing here imports a model, accelerate or transformers, so every function can be
tested on hand-made tensors. Shapes: B batch rows, T response tokens, V vocabulary,
K answers (or samples) per prompt, P preference pairs. A `mask` is a bool (or 0/1) tensor that is
True on real tokens; values at masked positions may be garbage and never leak out.
"""

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------- reward model

# Llama 2 (Touvron et al. 2023, sec. 3.2.2 and appendix A.3.3): margin added inside the BT loss
# according to the labelled preference strength.
MARGIN_TABLES = {
    "llama2_small": {"significantly_better": 1.0, "better": 2 / 3, "slightly_better": 1 / 3, "negligibly_better": 0.0},
    "llama2_large": {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0, "negligibly_better": 0.0},
}


def _bt_pair_losses(chosen_rewards, rejected_rewards, margin=None):
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    # logsigmoid(x) = -softplus(-x): no overflow for large |x|, unlike log(sigmoid(x)).
    return -F.logsigmoid(diff)


def _tie_pair_losses(r_a, r_b):
    d = r_a - r_b
    return -0.5 * F.logsigmoid(d) - 0.5 * F.logsigmoid(-d)


def bradley_terry_loss(chosen_rewards, rejected_rewards, margin=None, weight=None):
    """Mean over pairs of `-log sigmoid(r_chosen - r_rejected - margin)`.

    chosen_rewards, rejected_rewards: (P,). margin: float or (P,), 0 if None (Llama 2,
    Touvron et al. 2023, eq. 2). weight: (P,) per-pair weights -> weighted mean.
    Returns a scalar. Bradley & Terry 1952; InstructGPT (Ouyang et al. 2022) eq. 1.
    """
    losses = _bt_pair_losses(chosen_rewards, rejected_rewards, margin)
    if weight is None:
        return losses.mean()
    return (weight * losses).sum() / weight.sum()


def tie_loss(r_a, r_b):
    """Loss for pairs labelled as ties: `mean(-0.5 log sigmoid(d) - 0.5 log sigmoid(-d))`, d = r_a - r_b.

    r_a, r_b: (P,). Returns a scalar. This is the BT cross-entropy against the soft
    label 0.5 ("each answer wins half the time"), i.e. a BT loss with label 0.5. Its
    gradient w.r.t. d is `sigmoid(d) - 0.5`, pulling the two scores together, and its
    minimum is log 2 (not 0) at d = 0; we keep the constant so the value stays a proper
    negative log-likelihood, comparable with the BT loss of untied pairs.
    """
    return _tie_pair_losses(r_a, r_b).mean()


def pairwise_ranking_loss(rewards, winners, losers, group=None, margin=None, weight=None, tie=None):
    """BT loss over pairs indexed into a flat reward vector, averaged per prompt first.

    rewards: (N,) one score per answer; each answer goes through the reward model once.
    winners, losers: (P,) long indices into `rewards` (for a tie: the two answers).
    group: (P,) prompt id of each pair; None means one group. margin: float or (P,).
    weight: (P,) per-pair weights. tie: (P,) bool, tied pairs use `tie_loss` (no margin).
    Returns (loss scalar, correct (P,) bool). `correct` is `r_winner > r_loser`, so an
    equal score counts as wrong (as RewardBench); it means nothing on tie pairs, mask them out.

    InstructGPT (Ouyang et al. 2022, sec. 3.5): the C(K,2) pairs of one prompt form one
    batch element and its loss is the mean over those pairs, so a prompt with K = 9
    answers (36 pairs) weighs as much as one with K = 2. Shuffling pairs instead
    over-fits because each answer is seen K - 1 times per epoch.
    """
    r_w, r_l = rewards[winners], rewards[losers]
    losses = _bt_pair_losses(r_w, r_l, margin)
    if tie is not None:
        losses = torch.where(tie, _tie_pair_losses(r_w, r_l), losses)
    if weight is None:
        weight = torch.ones_like(losses)
    if group is None:
        group = torch.zeros_like(winners)
    _, group_idx = torch.unique(group, return_inverse=True)
    n_groups = int(group_idx.max()) + 1 if group_idx.numel() else 0
    num = losses.new_zeros(n_groups).index_add(0, group_idx, weight * losses)
    den = losses.new_zeros(n_groups).index_add(0, group_idx, weight.to(losses.dtype))
    has_weight = den > 0  # a prompt whose pairs all have weight 0 would give 0/0
    loss = (num[has_weight] / den[has_weight]).mean()
    return loss, r_w > r_l


def ranking_to_pairs(order):
    """All C(K,2) (winner, loser) pairs of a ranking; `order` lists answer indices best first.

    ranking_to_pairs([2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]. InstructGPT sec. 3.5.
    """
    order = list(order)
    return [(order[i], order[j]) for i in range(len(order)) for j in range(i + 1, len(order))]


def plackett_luce_loss(rewards, mask=None):
    """Listwise Plackett-Luce negative log-likelihood of full rankings, mean over rows.

    rewards: (B, K) scores in ranked order, best first. mask: (B, K) bool, True on real
    answers, for rows with fewer than K answers (padding at the end). Returns a scalar.
    NLL of a row = sum_i [logsumexp_{j >= i} r_j - r_i] (Plackett 1975; Luce 1959; used
    for LM rewards by Zhu et al. 2023, "Principled RLHF from pairwise or K-wise
    comparisons"). With K = 2 it is exactly the BT loss.
    """
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    mask = mask.bool()
    # A large finite negative rather than -inf: exp() still gives 0, and no inf - inf can appear.
    masked = rewards.masked_fill(~mask, torch.finfo(rewards.dtype).min)
    # logsumexp over the answers ranked at or below position i: reversed cumulative logsumexp.
    tail_lse = torch.logcumsumexp(masked.flip(-1), dim=-1).flip(-1)
    nll = torch.where(mask, tail_lse - rewards, torch.zeros_like(rewards)).sum(-1)
    return nll.mean()


def centering_loss(rewards):
    """`mean(r^2)`: keeps reward scores near 0 (a shift does not change the BT loss).

    rewards: any shape. Returns a scalar, to be multiplied by a small coefficient.
    TRL's `center_rewards_coefficient` term (Eisenstein et al. 2023, "Helping or
    herding?") is `mean((r_chosen + r_rejected)^2)` = `centering_loss(r_chosen + r_rejected)`.
    """
    return rewards.pow(2).mean()


# --------------------------------------------------------------------------- PPO maths


def masked_mean(x, mask, dim=None):
    """Mean of `x` over positions where `mask` is True; x, mask: same shape (e.g. (B, T)).

    dim=None -> scalar; otherwise mean along `dim`. An empty mask gives 0, not NaN
    (an empty response must not poison a batch). Garbage (even NaN) at masked positions
    is ignored: we select with `where` instead of multiplying by the mask.
    """
    mask = mask.bool()
    total = torch.where(mask, x, torch.zeros_like(x)).sum(dim=dim)
    count = mask.sum(dim=dim).clamp(min=1)
    return total / count


def masked_var(x, mask, unbiased=True):
    """Variance of `x` over positions where `mask` is True. Returns a scalar.

    unbiased=True applies Bessel's correction n / (n - 1), as TRL/trlx do.
    """
    mean = masked_mean(x, mask)
    centered = torch.where(mask.bool(), x - mean, torch.zeros_like(x))
    var = masked_mean(centered.pow(2), mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError(f"unbiased masked_var needs at least 2 valid elements, got {int(n)}")
        var = var * n / (n - 1)
    return var


def masked_whiten(x, mask, shift_mean=True):
    """Whiten `x` to mean 0 and unit variance using only the valid tokens. x, mask: (B, T).

    shift_mean=False keeps the original mean (used for rewards: only the scale changes).
    Masked positions are 0 in the output. Huang et al. 2024 (arXiv 2403.17031), detail on
    advantage / reward whitening.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def kl_penalty(logprobs, ref_logprobs, estimator="k1"):
    """Per-token estimate of KL(policy || reference) from sampled tokens. Shapes (B, T) -> (B, T).

    k1 = logp - ref_logp: unbiased, can be negative per token.
    k3 = exp(ref_logp - logp) - 1 - (ref_logp - logp): unbiased, always >= 0, lower
    variance (Schulman 2020, "Approximating KL divergence"). Ziegler et al. 2019 use k1.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # expm1 is exact for small log ratios
    raise ValueError(f"unknown KL estimator {estimator!r}, expected 'k1' or 'k3'")


def sequence_kl(logprobs, ref_logprobs, response_mask, estimator="k1"):
    """KL per response: the per-token estimate summed over response tokens. (B, T) x3 -> (B,).

    The one per-response KL sum of every stage: PPO's objective/kl and held-out eval/kl, the
    report's KL to the SFT policy. Padding and tokens after the stop token count 0.
    """
    kl = kl_penalty(logprobs, ref_logprobs, estimator)
    return torch.where(response_mask.bool(), kl, torch.zeros_like(kl)).sum(-1)


def kl_loss(logprobs, ref_logprobs, mask):
    """KL to the reference as a loss term (GRPO: Shao et al. 2024, "DeepSeekMath", eq. 4). (B, T) x3 -> scalar.

    Masked mean of the per-token k3 estimate exp(ref - logp) - (ref - logp) - 1 (>= 0). k3, not
    k1: k1 = logp - ref differentiated through logp alone has expected gradient E[grad log p] = 0
    under the sampling policy, so it would not pull the policy towards the reference. Padding is
    zeroed before exp() so garbage there cannot give inf * 0 = NaN gradients.
    """
    mask = mask.bool()
    log_ratio = torch.where(mask, logprobs - ref_logprobs, torch.zeros_like(logprobs))
    return masked_mean(torch.expm1(-log_ratio) + log_ratio, mask)


def per_token_rewards(scores, kl, kl_coef, response_mask):
    """Reward for each response token: `-kl_coef * kl_t`, plus the score on the last real token.

    scores: (B,) reward-model scores. kl: (B, T). kl_coef: float. response_mask: (B, T).
    Returns (rewards (B, T), non_score_reward (B, T)); both 0 on masked tokens. A row with
    no real token gets no score. Ziegler et al. 2019 (arXiv 1909.08593); InstructGPT eq. 2.
    """
    mask = response_mask.bool()
    non_score_reward = torch.where(mask, -kl_coef * kl, torch.zeros_like(kl))
    T = mask.shape[-1]
    # Index of the last True in each row: the first True of the flipped row.
    last = T - 1 - mask.flip(-1).int().argmax(-1)
    score = torch.where(mask.any(-1), scores, torch.zeros_like(scores)).to(kl.dtype)
    rewards = non_score_reward.scatter_add(-1, last.unsqueeze(-1), score.unsqueeze(-1))
    return rewards, non_score_reward


def gae_advantages(rewards, values, response_mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2015, arXiv 1506.02438).

    rewards, values, response_mask: (B, T), padding only at the end of each row.
    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}; the
    value after the last real token is 0 (the episode ends there). Returns
    (advantages, returns) of shape (B, T), returns = advantages + values, 0 on masked tokens.
    """
    mask = response_mask.bool()
    # Zero padding first so a padded V_{t+1} or r_t cannot leak into A_t of a real token.
    rewards = torch.where(mask, rewards, torch.zeros_like(rewards))
    values = torch.where(mask, values, torch.zeros_like(values))
    T = rewards.shape[-1]
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = torch.where(mask, advantages, torch.zeros_like(advantages))
    return advantages, advantages + values


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range):
    """PPO clipped surrogate (Schulman et al. 2017, arXiv 1707.06347, eq. 7). Shapes (B, T).

    loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))).
    clipfrac: share of tokens where the clipped term is the larger one (its gradient is
    0 there), as TRL logs it. approx_kl: k2 estimator `0.5 * (logp - old_logp)^2` of
    KL(old || new) (Schulman 2020, "Approximating KL divergence"), for logging only.
    Returns (loss, clipfrac, approx_kl), all scalars.
    """
    mask = mask.bool()
    # Sanitise padding before exp(): garbage log-probs could give inf * 0 = NaN gradients.
    log_ratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))
    advantages = torch.where(mask, advantages, torch.zeros_like(advantages))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(0.5 * log_ratio.pow(2), mask)
    return loss, clipfrac.detach(), approx_kl.detach()


def value_loss(values, old_values, returns, mask, clip_range_value):
    """Clipped value loss, `0.5 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)`.

    values, old_values, returns, mask: (B, T). Returns (loss, clipfrac) scalars; clipfrac
    is the share of tokens where the clipped error is the larger one. Huang et al. 2024
    (arXiv 2403.17031); OpenAI lm-human-preferences.
    """
    mask = mask.bool()
    zeros = torch.zeros_like(values)
    values, old_values = torch.where(mask, values, zeros), torch.where(mask, old_values, zeros)
    returns = torch.where(mask, returns, zeros)
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_err = (values - returns).pow(2)
    clipped_err = (clipped_values - returns).pow(2)
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    clipfrac = masked_mean((clipped_err > unclipped_err).float(), mask)
    return loss, clipfrac.detach()


def entropy_from_logits(logits):
    """Entropy of the softmax distribution: (B, T, V) -> (B, T).

    H = logsumexp(z) - sum_v p_v z_v, which never takes log of a probability that
    underflowed to 0. -inf logits (masked vocabulary) are clamped so 0 * -inf is not NaN.
    """
    logits = logits.clamp(min=torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def logprobs_from_logits(logits, labels, temperature=1.0):
    """Log-probability of `labels` under softmax(logits / temperature): (B, T, V), (B, T) -> (B, T).

    The caller aligns logits and labels (logits at t predict token t + 1). Use the
    sampling temperature here too, or policy and reference log-probs describe a
    different distribution from the one sampled (Huang et al. 2024, arXiv 2403.17031).
    Rows are processed one at a time in float32 so that no second (B, T, V) tensor
    (a full log_softmax) is held at once; the result is float32.
    """
    out = []
    for row_logits, row_labels in zip(logits, labels):
        row_logits = row_logits.float() / temperature
        picked = row_logits.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(out)


def explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns) over valid tokens. Shapes (B, T) -> scalar.

    1 means the value head predicts returns perfectly, 0 no better than a constant,
    negative worse; NaN if the returns are constant.
    """
    var_returns = masked_var(returns, mask, unbiased=False)
    return 1.0 - masked_var(returns - values, mask, unbiased=False) / var_returns


class AdaptiveKLController:
    """Adapts `kl_coef` so the measured KL tracks `target` (Ziegler et al. 2019, arXiv 1909.08593).

    error = clip(current_kl / target - 1, -0.2, 0.2); kl_coef *= 1 + error * n_steps / horizon.
    """

    def __init__(self, init_kl_coef, target, horizon):
        self.kl_coef = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl, n_steps):
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.kl_coef *= 1.0 + error * n_steps / self.horizon
        return self.kl_coef


class FixedKLController:
    """Constant `kl_coef`, same interface as `AdaptiveKLController`."""

    def __init__(self, kl_coef):
        self.kl_coef = kl_coef

    def update(self, current_kl, n_steps):
        return self.kl_coef


# --------------------------------------------------------------------------- offline preference optimisation
# A "log-prob" below is the sum of log pi(y_t | x, y_<t) over the answer tokens of one sequence
# (Rafailov et al. 2023, sec. 4), and a log-ratio is policy log-prob minus reference log-prob.


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             label_smoothing=0.0):
    """Per-pair DPO loss `-log sigmoid(beta * h)`, h = chosen log-ratio - rejected log-ratio.

    All inputs (P,) summed answer log-probs. Returns (P,) losses; take their (weighted) mean.
    Rafailov et al. 2023, "Direct Preference Optimization", eq. 7. label_smoothing eps > 0 is
    conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"): the label is
    flipped with probability eps, loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    The implicit rewards are beta * log-ratio (`dpo_rewards`).
    """
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    losses = -F.logsigmoid(beta * h)
    if label_smoothing:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * h)
    return losses


def dpo_rewards(policy_logps, ref_logps, beta):
    """Implicit reward `beta * (log pi(y|x) - log ref(y|x))` of DPO and KTO: (N,) -> (N,), no gradient."""
    return (beta * (policy_logps - ref_logps)).detach()


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, tau,
             chosen_lengths=None, rejected_lengths=None):
    """Per-pair IPO loss `(h - 1 / (2 tau))^2` on the log-ratio difference h. Inputs (P,), returns (P,).

    Azar et al. 2023, "A general theoretical paradigm to understand learning from human
    preferences", eq. 17 (tau is DPO's beta). With `chosen_lengths` / `rejected_lengths` (P,)
    answer token counts, each log-ratio is averaged per token first, as the IPO authors' runs
    and TRL do, so the target margin 1 / (2 tau) does not depend on answer length.
    """
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    if chosen_lengths is not None:
        chosen = chosen / chosen_lengths.clamp(min=1)
        rejected = rejected / rejected_lengths.clamp(min=1)
    return (chosen - rejected - 1 / (2 * tau)).pow(2)


def kto_reference_point(kl_policy_logps, kl_ref_logps):
    """KTO's reference point z0: a batch estimate of KL(policy || reference), clamped at 0, no gradient.

    kl_policy_logps, kl_ref_logps: (B,) summed log-probs of *mismatched* pairs (prompt i with
    the answer of another row), so z0 estimates the divergence on answers the policy was not
    trained toward. z0 = max(0, mean(logp - ref_logp)). Ethayarajh et al. 2024, "KTO", sec. 4.1
    (eq. 7 and the paragraph after it); with several processes average the mean over them first.
    """
    return (kl_policy_logps - kl_ref_logps).mean().detach().clamp(min=0)


def kto_loss(policy_logps, ref_logps, desirable, z0, beta, desirable_weight=1.0, undesirable_weight=1.0):
    """Per-answer KTO loss `lambda_y - v(x, y)`. Returns (B,) losses; take their mean.

    policy_logps, ref_logps: (B,) summed answer log-probs; desirable: (B,) bool; z0: scalar
    reference point (`kto_reference_point`, detached). With r = logp - ref_logp:
    v = lambda_D * sigmoid(beta (r - z0)) for a desirable answer and
    v = lambda_U * sigmoid(beta (z0 - r)) for an undesirable one, so the loss is
    lambda_D (1 - sigmoid(beta (r - z0))) or lambda_U (1 - sigmoid(beta (z0 - r))).
    Ethayarajh et al. 2024, "KTO: Model alignment as prospect theoretic optimization", eq. 8.
    """
    r = policy_logps - ref_logps
    z0 = torch.as_tensor(z0, dtype=r.dtype, device=r.device).detach()
    desirable = desirable.bool()
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(desirable, good, bad)


def kto_default_weights(n_desirable, n_undesirable):
    """(lambda_D, lambda_U) with lambda_D n_D / (lambda_U n_U) in [1, 4/3] (Ethayarajh et al. 2024, sec. 4.2).

    Both 1 when the counts already satisfy the rule; with fewer desirable answers lambda_D is
    raised to make the ratio 1; with more than 4/3 as many desirable ones lambda_U is raised to
    make it 4/3. kto_default_weights(100, 300) == (3.0, 1.0); (400, 100) == (1.0, 3.0).
    """
    if n_desirable < 1 or n_undesirable < 1:
        raise ValueError(f"KTO needs desirable and undesirable answers, got {n_desirable} and {n_undesirable}")
    ratio = n_desirable / n_undesirable
    if ratio < 1:
        return 1 / ratio, 1.0
    if ratio > 4 / 3:
        return 1.0, ratio * 3 / 4
    return 1.0, 1.0


# --------------------------------------------------------------------------- critic-free advantages
# Scores arrive as (B,) with the k samples of one prompt next to each other (B = prompts * k).
# rloo/grpo return one advantage per response (B,): the loop gives it to every response token.


def _groups(scores, k):
    if k < 2:
        raise ValueError(f"a group baseline needs at least 2 samples per prompt, got k={k}")
    if scores.dim() != 1 or scores.numel() % k:
        raise ValueError(f"scores must be (prompts * k,) with k={k} samples of a prompt side by side, "
                         f"got shape {tuple(scores.shape)}")
    return scores.view(-1, k)


def rloo_advantages(scores, k):
    """REINFORCE leave-one-out: A_i = r_i - mean of the other k - 1 scores of the same prompt.

    scores: (B,) with B = prompts * k, the k samples of a prompt consecutive. Returns (B,).
    Equals k / (k - 1) * (r_i - mean of all k). Ahmadian et al. 2024, "Back to basics:
    revisiting REINFORCE style optimization for learning from human feedback in LLMs", eq. 7.
    """
    g = _groups(scores, k)
    others = (g.sum(-1, keepdim=True) - g) / (k - 1)
    return (g - others).reshape(-1)


def grpo_advantages(scores, k, scale_by_std=True, eps=1e-4):
    """Group-relative advantages: (r - group mean) / (group std + eps). scores (B,) -> (B,).

    B = prompts * k, samples of a prompt consecutive; std is the unbiased one (as TRL). Shao et
    al. 2024, "DeepSeekMath", sec. 4.1.2 (outcome supervision). scale_by_std=False is Dr. GRPO
    (Liu et al. 2025, "Understanding R1-Zero-like training"): no division by std, which
    up-weights prompts whose samples barely differ; the loop then also skips per-response length
    normalisation. A group whose scores are all equal gets 0 either way.
    """
    g = _groups(scores, k)
    centred = g - g.mean(-1, keepdim=True)
    if scale_by_std:
        centred = centred / (g.std(-1, keepdim=True) + eps)
    return centred.reshape(-1)


def reinforce_pp_advantages(rewards, response_mask, gamma=1.0):
    """REINFORCE++: discounted return-to-go of per-token rewards, whitened over the whole batch.

    rewards, response_mask: (B, T) per-token rewards (-kl_coef * kl_t on every token plus the
    score on the last, as `per_token_rewards` builds them), padding only at the end of a row.
    G_t = r_t + gamma * G_{t+1}; advantages = masked_whiten(G) over every valid token of the
    global batch (no critic, no per-prompt baseline). Returns (B, T), 0 on masked tokens.
    Hu 2025, "REINFORCE++: a simple and efficient approach for aligning LLMs", sec. 3.
    """
    mask = response_mask.bool()
    rewards = torch.where(mask, rewards, torch.zeros_like(rewards))
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[-1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return masked_whiten(returns, mask)
