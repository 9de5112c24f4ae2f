"""Graded course exercises on the reading path (docs/exercises.md is the handout).

A function of minicai/*.py is an exercise when the line directly above its `def` (or above its
first decorator) is the one-word comment `# exercise`. Nothing else in the library knows about
exercises. `python -m minicai.exercises make --out DIR` writes a student copy of the repository in
which the body of every marked function (or of those named with --only) is replaced by
`raise NotImplementedError(...)`; its signature, docstring and comments stay, and the shape
comments of the removed lines stay as comment lines. `pytest tests/exercises` grades a copy.

This module is the catalogue: per exercise its short name, where it is, the paper section or
equation it implements, the graded test file and a hint, in the order of the handout (from the
transformer to PPO). minicai/exercises/blank.py does the blanking and the copying.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Exercise:
    name: str
    """Short name: `--only NAME`, `pytest tests/exercises -k NAME`, the NotImplementedError message."""
    file: str
    """The reading-path file, relative to the repository root."""
    qualname: str
    """The marked function: `name` or `Class.method`."""
    part: str
    """The handout's section (the topic)."""
    source: str
    """Paper section or equation the function implements."""
    test: str
    """The graded test file."""
    hint: str
    """One or two sentences for a student who is stuck."""


T = "tests/exercises/"

EXERCISES: tuple[Exercise, ...] = (
    # ---------------------------------------------------------------- 1. the transformer
    Exercise("rmsnorm", "minicai/model.py", "RMSNorm.forward", "transformer",
             "Zhang & Sennrich 2019 (RMSNorm), eq. 4; HF LlamaRMSNorm", T + "test_ex_transformer.py",
             "The mean of squares is over the last dimension only (keepdim), in fp32; cast back to the "
             "input dtype before multiplying by the weight."),
    Exercise("rope", "minicai/model.py", "rope_cos_sin", "transformer",
             "Su et al. 2021 (RoFormer), eq. 34; the rotate_half layout of HF Llama", T + "test_ex_transformer.py",
             "inv_freq_i = base^(-2i/D) for i = 0..D/2-1; the angle is position * inv_freq; the D/2 "
             "angles are written twice, [f, f] (not interleaved), to match rotate_half."),
    Exercise("attention", "minicai/model.py", "manual_attention", "transformer",
             "Vaswani et al. 2017, eq. 1; grouped-query attention (Ainslie et al. 2023)", T + "test_ex_transformer.py",
             "Repeat each key/value head H // K times with repeat_interleave (query head h uses kv head "
             "h // (H // K)); with no mask, query i of T sees key j iff j <= i + (S - T)."),
    Exercise("padding_mask", "minicai/model.py", "padding_attn_mask", "transformer",
             "the causal mask of Vaswani et al. 2017 §3.2.3, plus key padding (HF 4-d masks)", T + "test_ex_transformer.py",
             "Query rows are slots start..start+T-1; combine j <= i with key_valid, then let every "
             "query see its own slot so that no softmax row is empty."),
    # ---------------------------------------------------------------- 2. sampling
    Exercise("top_p", "minicai/sample.py", "filter_logits", "sampling",
             "Holtzman et al. 2020, §3.1 (nucleus sampling); top-k of Fan et al. 2018", T + "test_ex_sampling.py",
             "Sort descending, softmax, and drop a token when the mass strictly BEFORE it already "
             "reaches top_p; scatter the drop flags back to vocabulary order."),
    # ---------------------------------------------------------------- 3. SL-CAI
    Exercise("sft_loss", "minicai/losses.py", "sft_loss", "sl-cai",
             "Bai et al. 2022 §3.1 (SFT on the revisions); loss on assistant tokens only (TRL assistant_only_loss)",
             T + "test_ex_sl.py",
             "Cross-entropy per position with reduction='none', then masked_mean over the assistant "
             "positions; replace masked-out targets (-100, pads) by a valid id first."),
    Exercise("paper_transcript", "minicai/slcai.py", "render_paper", "sl-cai",
             "Bai et al. 2022 §3.1 and Appendix; the released CritiqueRevisionFewShotPrompts.json layout",
             T + "test_ex_sl.py",
             "A user event adds '\\n\\nHuman: ...\\n\\nAssistant:'; requests come from "
             "critique_request_text / revision_request_text; an answer adds ' ' + its text."),
    # ---------------------------------------------------------------- 4. AI feedback
    Exercise("feedback_prompt", "minicai/constitution.py", "feedback_prompt", "ai-feedback",
             "Bai et al. 2022 §4.1; the released evals/438HHHEvaluations.jsonl layout", T + "test_ex_feedback.py",
             "Strip every part; add ' Options:' unless the principle already ends with 'Options:'."),
    Exercise("option_readout", "minicai/feedback.py", "judge_pairs", "ai-feedback",
             "Bai et al. 2022 §4.1 (normalized log-probs of (A)/(B), both orders, ensembled principles)",
             T + "test_ex_feedback.py",
             "Build both contexts per principle with judge_context (a first, then b first), score them "
             "all with ONE option_logprobs call, and average centered_p(margin) of the first order with "
             "centered_p(-margin) of the swapped order."),
    Exercise("contrast_label", "minicai/feedback.py", "contrast_pairs", "ai-feedback",
             "RLCD (Yang et al. 2023, arXiv 2307.12950 §3), read as a likelihood ratio", T + "test_ex_feedback.py",
             "Four items per principle (follow/violate x a/b) in ONE reply_logprob_means call; "
             "s(y) = follow - violate; average 0.5 * tanh((s_a - s_b) / (2 tau)) and use p_from_centered."),
    # ---------------------------------------------------------------- 5. preference losses
    Exercise("bradley_terry", "minicai/losses.py", "pairwise_loss", "preference-losses",
             "Bradley & Terry 1952; Ouyang et al. 2022 eq. 1; soft labels as in Bai et al. 2022 §4.1",
             T + "test_ex_preference_losses.py",
             "d = r_a - r_b - margin; use F.logsigmoid (stable) for both log sigmoid(d) and log sigmoid(-d)."),
    Exercise("dpo", "minicai/losses.py", "dpo_loss", "preference-losses",
             "Rafailov et al. 2023, eq. 7; soft labels as cDPO / TRL label_smoothing", T + "test_ex_preference_losses.py",
             "h is a difference of log-ratios; the loss is the Bradley-Terry loss of beta * h."),
    # ---------------------------------------------------------------- 6. PPO
    Exercise("kl_estimators", "minicai/rl.py", "kl_per_token", "ppo",
             "Schulman 2020, 'Approximating KL Divergence' (k1, k2, k3)", T + "test_ex_ppo.py",
             "With log r = ref_logp - logp: k1 = -log r, k2 = (log r)^2 / 2, k3 = (r - 1) - log r "
             "(use torch.expm1); an unknown kind raises ValueError."),
    Exercise("token_rewards", "minicai/rl.py", "per_token_rewards", "ppo",
             "Ziegler et al. 2019 eq. 2 (R = r - beta KL); OpenAI lm-human-preferences compute_rewards",
             T + "test_ex_ppo.py",
             "-beta * kl on real tokens, 0 on padding (torch.where, not a product: padding may hold inf), "
             "then add the score at score_index(mask, reward_at) of each row."),
    Exercise("gae", "minicai/rl.py", "gae", "ppo",
             "Schulman et al. 2016, eq. 16 (recursive form)", T + "test_ex_ppo.py",
             "Loop t = T-1 .. 0 keeping next value, next advantage and next mask; the value after the "
             "last real token is 0; returns = advantages + values, both 0 on padding."),
    Exercise("whiten", "minicai/rl.py", "masked_whiten", "ppo",
             "OpenAI lm-human-preferences core.py whiten; TRL masked_whiten", T + "test_ex_ppo.py",
             "Statistics over real tokens only (masked_mean, masked_var); (x - mean) * rsqrt(var + eps); "
             "shift_mean=False adds the mean back; padding comes back as 0."),
    Exercise("clipped_policy", "minicai/rl.py", "policy_loss", "ppo",
             "Schulman et al. 2017, eq. 7 (the clipped surrogate)", T + "test_ex_ppo.py",
             "Mask the log-ratio before exp; loss = masked mean of max(-A r, -A clip(r)); the stats "
             "use the same denominator (see the docstring for each)."),
    Exercise("clipped_value", "minicai/rl.py", "value_loss", "ppo",
             "OpenAI lm-human-preferences train_policy.py; TRL ppo_trainer.py (vf_losses1/2)", T + "test_ex_ppo.py",
             "V_clipped = V_old + clamp(V - V_old, -eps, eps); 0.5 * masked mean of the larger squared error."),
    Exercise("kl_controller", "minicai/rl.py", "KLController.update", "ppo",
             "Ziegler et al. 2019 §2.2 (adaptive KL); lm-human-preferences AdaptiveKLController", T + "test_ex_ppo.py",
             "Only when target is set: e = clip(kl / target - 1, -0.2, 0.2), beta *= 1 + e * n_steps / horizon."),
    # ---------------------------------------------------------------- 7. critic-free advantages
    Exercise("rloo", "minicai/rl.py", "rloo_advantages", "group-advantages",
             "Ahmadian et al. 2024 (arXiv 2402.14740), eq. 5; Kool et al. 2019", T + "test_ex_group_advantages.py",
             "Use group_differences: A_i = sum_j (R_i - R_j) / (k - 1); equal rewards must give exact zeros."),
    Exercise("grpo", "minicai/rl.py", "grpo_advantages", "group-advantages",
             "Shao et al. 2024 (arXiv 2402.03300), §4.1.2", T + "test_ex_group_advantages.py",
             "R_i - mean = mean_j (R_i - R_j); the std has Bessel's correction; divide by (std + eps)."),
)

PARTS = {
    "transformer": "1. The transformer (model.py)",
    "sampling": "2. Sampling (sample.py)",
    "sl-cai": "3. SL-CAI: critique, revision, SFT (slcai.py, losses.py)",
    "ai-feedback": "4. AI feedback: the labeller (constitution.py, feedback.py)",
    "preference-losses": "5. Preference losses: reward model and DPO (losses.py)",
    "ppo": "6. PPO (rl.py)",
    "group-advantages": "7. Critic-free advantages: RLOO and GRPO (rl.py)",
}

BY_NAME = {e.name: e for e in EXERCISES}


def find(name: str) -> Exercise | None:
    """The exercise called `name` (short name, or Class.method / function name as in the file)."""
    if name in BY_NAME:
        return BY_NAME[name]
    return next((e for e in EXERCISES if name in (e.qualname, f"{e.file}:{e.qualname}")), None)
