"""train_ppo.py and minicai/infra/ppo.py on tiny random models: exactness at the start (KL 0, ratio 1),
every convention switch (each side), learning a synthetic reward, bad input, and resume.

The loop is observed by calling train_ppo's step functions directly (`Steps`, one process, in
main's order), and through what main writes (metrics.jsonl, the model folders)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import train_ppo  # noqa: E402
from conftest import Killed, kill_after, random_model, tiny_config, write_tiny_gguf  # noqa: E402
from minicai.infra import cli, distributed  # noqa: E402
from minicai.io.checkpoint import load_model, save_hf  # noqa: E402
from minicai.io.data import load_prompts, split  # noqa: E402
from minicai.model import ScalarHead, last_token_scores  # noqa: E402
from minicai.infra.ppo import (Rollout, check_same_tokenizer, iteration_metrics, missing_eos_penalty, prompt_batch,
                               response_forward, response_values, reward_model_input, rollout_batch, token_reward)
from minicai.rl import kl_per_token, masked_mean, masked_var, score_index  # noqa: E402
from minicai.sample import generate, stable_seed  # noqa: E402
from minicai.errors import InputError  # noqa: E402

REWARD_TOKEN = "he"  # one token of the tiny vocabulary, in ~30% of the random model's responses


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine an OpenMP
    thread that waits for a busy core makes each step ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def argv(out: Path, policy: Path, *extra: str, reward=("--reward-token", REWARD_TOKEN)) -> list[str]:
    return ["--out", str(out), "--policy", str(policy), *reward, "--iterations", "1", "--batch-size", "8",
            "--max-new-tokens", "8", "--sample-every", "1000", *extra]


def run(out: Path, policy: Path, *extra: str, reward=("--reward-token", REWARD_TOKEN)) -> list[dict]:
    assert train_ppo.main(argv(out, policy, *extra, reward=reward)) == 0
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


class Steps:
    """train_ppo's step functions called directly, in main's order, in one process (no run folder):
    `iteration(it)` runs steps 1-6 of iteration it and returns (the Rollout after step 5, update's
    per-minibatch statistics)."""

    def __init__(self, policy: Path, *extra: str, reward=("--reward-token", REWARD_TOKEN)):
        self.args = args = train_ppo.method_defaults(
            cli.parse(train_ppo.Args, argv(Path("unused"), policy, *extra, reward=reward)))
        a, self.d = args.models, distributed.Dist()
        self.m = train_ppo.load_models(a.policy, a.ref, a.reward_model, a.reward_token, args.ppo.value_model,
                                       torch.device("cpu"), args.ppo.fused_logprobs)
        prompts, _ = split([p for s in ["builtin-red-team", "builtin-helpful"] for p in load_prompts(s)], 0.2)
        self.prompts = [self.m.tok.render([{"role": "user", "content": p.text}], add_generation_prompt=True)[0]
                        for p in prompts]
        self.opt = torch.optim.AdamW(self.m.trained.parameters(), lr=args.optim.lr, eps=1e-5, weight_decay=0.0,
                                     fused=True)  # as main
        self.beta = args.kl.beta

    def iteration(self, it: int) -> tuple[Rollout, list[dict]]:
        args, m, d, B = self.args, self.m, self.d, self.args.optim.batch_size
        r = train_ppo.rollout(m, [self.prompts[i] for i in prompt_batch(len(self.prompts), B, it, args.run.seed)],
                              it, args, d)
        r.raw_score, r.score = train_ppo.score(m, r, args)
        r.logprobs, r.ref_logprobs, r.values = train_ppo.logprobs_values(m, r, args)
        r.kl, r.gae_mask, r.rewards, r.advantages, r.returns = train_ppo.advantages(r, self.beta, args, d)
        stats = train_ppo.update(m, m.trained, self.opt, r, self.beta, it, args, d)
        return r, stats

    def minibatches(self, r: Rollout, it: int = 0):
        """(rows, advantages) of every minibatch of iteration it, as update() sees them."""
        return [(mb, adv) for _, _, mb, adv in train_ppo.minibatches(r, it, self.args)]


# ---------------------------------------------------------------------------------------------
# exactness at the start


def test_policy_equals_reference_kl_zero_and_first_ratio_one(tmp_path, tiny_gguf):
    flags = ("--batch-size", "16", "--num-minibatches", "2", "--temperature", "0.7", "--lr", "1e-3")
    steps = Steps(tiny_gguf, *flags)
    r, stats = steps.iteration(0)
    m = r.mask
    assert torch.equal(r.logprobs[m], r.ref_logprobs[m])  # bitwise: same weights, same forward
    assert torch.all(r.kl[m] == 0)
    # max |new - old log-prob| of the first minibatch is 0: the ratio is exactly 1 (dropout off,
    # same temperature, same forward: https://github.com/huggingface/trl/issues/454)
    assert stats[0]["first_ratio_dev"] == 0.0 and stats[0]["ratio_mean"] == 1.0 and stats[0]["approxkl"] == 0.0
    # the policy did move during the update: later minibatches see ratios != 1
    assert any(s["approxkl"] > 0 for s in stats[1:])
    # main's loop is these steps: its first metrics row is the one they give, to the bit
    rows = run(tmp_path / "r", tiny_gguf, *flags)
    assert rows[0]["objective/kl"] == 0.0 and rows[0]["policy/first_ratio_max_dev"] == 0.0
    want = iteration_metrics(r, stats, steps.beta, steps.d)
    assert {k: rows[0][k] for k in want} == want


def test_rollout_seeds_are_stable_seeds_of_the_row(tiny_gguf):
    steps = Steps(tiny_gguf)
    r, _ = steps.iteration(3)
    idx = prompt_batch(len(steps.prompts), 8, 3, 0)
    for b in (0, 5):  # row b alone, with its own seed: the same response
        gen = generate(steps.m.policy, [steps.prompts[idx[b]]], 8, temperature=0.7, stop_ids=steps.m.tok.stop_ids,
                       pad_id=steps.m.tok.pad_id, seed=[stable_seed(0, "ppo", 3, b)])
        assert gen.tokens[0][gen.mask[0]].tolist() == r.seq[b, r.P:][r.mask[b]].tolist()


def test_response_forward_matches_sampler_and_needs_the_same_temperature(tiny):
    model, tok = tiny
    prompts = [tok.encode(t) for t in ("hello there", "a", "the cat sat")]
    gen = generate(model, prompts, 10, temperature=0.7, stop_ids=tok.stop_ids, seed=3, pad_id=tok.pad_id)
    seq, attn, P = rollout_batch(gen)
    assert seq.shape == attn.shape == (3, P + gen.tokens.shape[1])
    with torch.no_grad():
        out = response_forward(model, seq, attn, P, 0.7, ScalarHead(model.cfg.dim), entropy=True)
        other = response_forward(model, seq, attn, P, 1.0)
    m = gen.mask
    torch.testing.assert_close(out.logprobs[m], gen.logprobs[m], atol=1e-4, rtol=0)  # cache path vs full forward
    assert (other.logprobs[m] - gen.logprobs[m]).abs().max() > 1e-2  # a wrong temperature is visible
    assert torch.all(out.values[m] == 0) and torch.all(out.entropy[m] > 0)  # zero-init value head


# ---------------------------------------------------------------------------------------------
# learning a synthetic reward


def test_ppo_raises_a_synthetic_reward_with_finite_kl(tmp_path, tiny_gguf):
    rows = run(tmp_path / "r", tiny_gguf, "--iterations", "12", "--batch-size", "16", "--lr", "3e-4",
               "--max-new-tokens", "12", "--save-every", "1000")
    scores = [r["objective/scores"] for r in rows]
    first, last = sum(scores[:4]) / 4, sum(scores[-4:]) / 4
    assert last > first + 0.25, scores
    kls = [r["objective/kl"] for r in rows]
    assert all(torch.isfinite(torch.tensor(k)) for k in kls) and kls[-1] > 0
    assert all(torch.isfinite(torch.tensor(r["policy/approxkl"])) for r in rows)
    assert rows[-1]["policy/entropy"] < rows[0]["policy/entropy"]


def test_token_reward_counts_real_response_tokens_only():
    seq = torch.tensor([[9, 9, 1, 5], [9, 5, 9, 5], [5, 9, 9, 9]])  # last 2 columns are the response
    resp_mask = torch.tensor([[True, False], [True, True], [True, True]])
    # row 0: the 5 is at a padding position; row 2: the 5 is in the prompt
    assert token_reward(seq, resp_mask, 5).tolist() == [0.0, 1.0, 0.0]
    assert token_reward(seq, resp_mask, 1).tolist() == [1.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------------
# the reward model reads the last real token (left-padded prompts, right-padded responses)


@pytest.mark.parametrize("truncated", ["close", "as_is"])
def test_reward_model_score_is_read_at_the_last_real_token(tiny, tiny_rm, truncated):
    from minicai.io.checkpoint import load_scalar_model
    from minicai.infra.ppo import end_of_turn_id

    model, tok = tiny
    rm, _, _ = load_scalar_model(tiny_rm)
    end_id = end_of_turn_id(tok)
    assert end_id == tok.tk.token_to_id("<|im_end|>")
    prompts = [tok.encode(t) for t in ("hello there friend", "a", "the cat sat on the mat")]
    gen = generate(model, prompts, 6, temperature=1.0, stop_ids=tok.stop_ids, seed=0, pad_id=tok.pad_id)
    gen.stopped[1] = True  # pretend row 1 stopped: it is read as it is under both conventions
    r = Rollout.of(gen)
    seq0 = r.seq.clone()
    with torch.no_grad():
        got = last_token_scores(rm, *reward_model_input(r.seq, r.attn_mask, r.stopped,
                                                        end_id if truncated == "close" else None))
    assert torch.equal(r.seq, seq0)  # the marker goes to the reward model's input only
    for b in range(3):  # each row alone, no padding at all: the scalar at its last token
        ids = r.seq[b][r.attn_mask[b].bool()]
        if truncated == "close" and not gen.stopped[b]:  # train_rm.py's layout: a finished turn
            ids = torch.cat([ids, torch.tensor([end_id])])
        with torch.no_grad():
            want = rm(ids[None], torch.ones_like(ids[None]))[0, -1]
        torch.testing.assert_close(got[b], want, atol=1e-5, rtol=1e-5)
    assert (~gen.stopped).sum() == 2


# ---------------------------------------------------------------------------------------------
# convention switches: each side


@pytest.mark.parametrize("reward_at", ["last", "eos_plus_one"])
def test_reward_at_switch(eos_gguf, reward_at):
    r, _ = Steps(eos_gguf, "--reward-at", reward_at).iteration(0)  # KL = 0 (policy = reference): rewards = score
    m, G = r.mask, r.mask.shape[1]
    lengths = m.sum(1)
    assert (lengths < G).any() and (lengths == G).any()  # both kinds of rows are present
    col = score_index(m, reward_at)
    if reward_at == "last":
        assert torch.equal(col, lengths - 1)
        assert torch.equal(r.gae_mask, m)
    else:  # TRL: the first padding column; a full row keeps its last token
        assert torch.equal(col, torch.where(lengths < G, lengths, lengths - 1))
        assert torch.equal(r.gae_mask.sum(1), torch.where(lengths < G, lengths + 1, lengths))
    rows = torch.arange(len(col))
    assert torch.equal(r.rewards[rows, col], r.score)
    other = r.rewards.clone()
    other[rows, col] = 0
    assert torch.all(other == 0)
    # V = 0 at the start (zero-init head) and KL = 0, so the return at the score column is the score:
    # GAE ran over gae_mask, which includes that column
    assert torch.equal(r.returns[rows, col], r.score)


@pytest.mark.parametrize("var", ["biased", "unbiased"])
def test_whiten_minibatch_variance_switch(tiny_gguf, tiny_rm, var):
    steps = Steps(tiny_gguf, "--batch-size", "16", "--num-minibatches", "2", "--whiten-advantages", "minibatch",
                  "--whiten-var", var, reward=("--reward-model", str(tiny_rm)))
    r, _ = steps.iteration(0)
    assert not torch.all(r.advantages == 0)
    mbs = steps.minibatches(r)
    assert len(mbs) == 8  # 4 epochs x 2 minibatches
    for mb, a in mbs:
        m = r.mask[mb]
        n = m.sum()
        assert abs(masked_mean(a, m).item()) < 1e-5
        want = 1.0 if var == "biased" else ((n - 1) / n).item()  # OpenAI: var 1; TRL: n/(n-1) correction
        assert masked_var(a, m).item() == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("var", ["biased", "unbiased"])
def test_whiten_batch_switch(tiny_gguf, tiny_rm, var):
    steps = Steps(tiny_gguf, "--batch-size", "16", "--num-minibatches", "2", "--whiten-advantages", "batch",
                  "--whiten-var", var, reward=("--reward-model", str(tiny_rm)))
    r, _ = steps.iteration(0)
    m, n = r.mask, r.mask.sum()
    assert abs(masked_mean(r.advantages, m).item()) < 1e-5
    want = 1.0 if var == "biased" else ((n - 1) / n).item()
    assert masked_var(r.advantages, m).item() == pytest.approx(want, abs=1e-4)
    mbs = steps.minibatches(r)
    for mb, a in mbs:  # not whitened again in the minibatch
        assert torch.equal(a, r.advantages[mb])
    # and each minibatch alone is not exactly whitened (that would be the other switch)
    devs = [abs(masked_mean(a, m[mb]).item()) for mb, a in mbs]
    assert max(devs) > 1e-3


def test_whiten_advantages_none(tiny_gguf):
    r, _ = Steps(tiny_gguf, "--whiten-advantages", "none").iteration(0)
    # no whitening: A = returns - V
    torch.testing.assert_close(r.advantages[r.mask], (r.returns - r.values)[r.mask])


@pytest.mark.parametrize("kl_penalty", ["reward", "loss"])
def test_kl_in_reward_or_in_loss(eos_gguf, tiny_rm, kl_penalty):
    steps = Steps(eos_gguf, "--iterations", "2", "--lr", "1e-3", "--beta", "0.5", "--kl-penalty", kl_penalty,
                  "--reward-at", "eos_plus_one", reward=("--reward-model", str(tiny_rm)))
    steps.iteration(0)
    r, stats = steps.iteration(1)  # the policy has moved: KL != 0
    m = r.mask
    assert (r.kl[m] != 0).any()
    col = score_index(m, "eos_plus_one")
    dense = r.rewards.clone()
    dense[torch.arange(m.shape[0]), col] -= r.score
    if kl_penalty == "reward":  # r_t = -beta * KL_t on real tokens (Ziegler et al.)
        torch.testing.assert_close(dense[m], (-0.5 * r.kl)[m])
        assert all(s["kl_loss"] == 0 for s in stats)
    else:  # GRPO: no KL in the reward; beta * k3(new, ref) in the loss, with gradient
        assert torch.all(dense == 0)
        assert all(s["kl_loss"] > 0 for s in stats)
    for mb, adv in steps.minibatches(r, 1)[:2]:  # ppo_loss of a minibatch, as update() calls it
        rs = r.rows(mb)
        new_logp, new_values, entropy = steps.m.trained(rs.seq, rs.attn_mask, rs.P, 0.7)
        loss, s = train_ppo.ppo_loss(rs, adv, new_logp, new_values, entropy, 0.5, steps.args, steps.d)
        k3 = masked_mean(kl_per_token(new_logp, rs.ref_logprobs, "k3"), rs.mask)
        if kl_penalty == "reward":
            assert s["kl_loss"] == 0
            torch.testing.assert_close(loss, s["pg_loss"] + 0.1 * s["vf_loss"], rtol=0, atol=0)
        else:
            torch.testing.assert_close(s["kl_loss"], k3.detach())
            torch.testing.assert_close(loss, s["pg_loss"] + 0.1 * s["vf_loss"] + 0.5 * s["kl_loss"])
        # the KL term has a gradient (through new_logp) exactly when it is in the loss
        g_loss = torch.autograd.grad(loss, new_logp, retain_graph=True)[0]
        no_kl = train_ppo.ppo_loss(rs, adv, new_logp, new_values, entropy, 0.0, steps.args, steps.d)[0]
        g_rest = torch.autograd.grad(no_kl, new_logp)[0]
        assert torch.equal(g_loss, g_rest) == (kl_penalty == "reward")


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_kl_estimator_switch(tiny_gguf, tiny_rm, kind):
    steps = Steps(tiny_gguf, "--iterations", "2", "--lr", "1e-3", "--kl-estimator", kind,
                  reward=("--reward-model", str(tiny_rm)))
    steps.iteration(0)
    r, _ = steps.iteration(1)
    m = r.mask
    assert (r.logprobs[m] != r.ref_logprobs[m]).any()
    torch.testing.assert_close(r.kl[m], kl_per_token(r.logprobs, r.ref_logprobs, kind)[m])
    if kind == "k3":
        assert torch.all(r.kl[m] >= 0)
    else:
        torch.testing.assert_close(r.kl[m], (r.logprobs - r.ref_logprobs)[m])


@pytest.mark.parametrize("mode", ["subtract", "replace"])
def test_missing_eos_penalty_switch(eos_gguf, mode):
    r, _ = Steps(eos_gguf, "--no-eos-penalty", "-2" if mode == "replace" else "2", "--no-eos-mode", mode).iteration(0)
    s, raw, stopped = r.score, r.raw_score, r.stopped
    assert stopped.any() and (~stopped).any()
    assert torch.equal(s[stopped], raw[stopped])
    if mode == "subtract":  # TRL: score - penalty
        assert torch.equal(s[~stopped], raw[~stopped] - 2)
    else:  # summarize_from_feedback_details: the score is replaced by the (negative) value
        assert torch.all(s[~stopped] == -2)


def test_missing_eos_penalty_function():
    score, stopped = torch.tensor([0.5, 3.0, -1.0]), torch.tensor([True, False, False])
    assert missing_eos_penalty(score, stopped, None).tolist() == [0.5, 3.0, -1.0]
    assert missing_eos_penalty(score, stopped, 1.0, "subtract").tolist() == [0.5, 2.0, -2.0]
    assert missing_eos_penalty(score, stopped, -1.0, "replace").tolist() == [0.5, -1.0, -1.0]
    with pytest.raises(InputError, match="mode"):
        missing_eos_penalty(score, stopped, 1.0, "add")


def test_separate_value_model_starts_as_the_reward_model(tmp_path, tiny_gguf, tiny_rm):
    from minicai.io.checkpoint import load_scalar_model

    r, _ = Steps(tiny_gguf, "--value-model", "separate", reward=("--reward-model", str(tiny_rm))).iteration(0)
    rm, _, _ = load_scalar_model(tiny_rm)
    with torch.no_grad():
        want = response_values(rm, r.seq, r.attn_mask, r.P)
    torch.testing.assert_close(r.values[r.mask], want[r.mask])  # TRL: value model = RM copy
    assert not torch.all(r.values == 0)
    rows = run(tmp_path / "r", tiny_gguf, "--iterations", "2", "--value-model", "separate",
               reward=("--reward-model", str(tiny_rm)))
    assert (tmp_path / "r" / "model" / "value_model.safetensors").exists()
    assert len(rows) == 2


def test_shared_value_head_is_saved_with_the_policy(tmp_path, tiny_gguf):
    run(tmp_path / "r", tiny_gguf, "--lr", "1e-3")
    folder = tmp_path / "r" / "model"
    assert set(load_file(str(folder / "value_head.safetensors"))) >= {"proj.weight", "proj.bias"}
    policy, _, info = load_model(str(folder))
    assert info["stage"] == "ppo" and info["value_model"] == "shared"


def test_adaptive_kl_controller_moves_beta(tmp_path, tiny_gguf, tiny_rm):
    rows = run(tmp_path / "r", tiny_gguf, "--iterations", "3", "--lr", "1e-3", "--kl-target", "0.001",
               "--kl-horizon", "10", reward=("--reward-model", str(tiny_rm)))
    betas = [r["objective/beta"] for r in rows]
    assert betas[0] == 0.05 and betas[2] > betas[1]  # KL above target: beta grows (OpenAI AdaptiveKLController)


def test_another_reference_gives_nonzero_kl_at_the_start(tmp_path, tiny_gguf):
    other = write_tiny_gguf(tmp_path / "ref.gguf", random_model(tiny_config(), seed=5))
    steps = Steps(tiny_gguf, "--ref", str(other))
    r, stats = steps.iteration(0)
    assert (r.kl[r.mask] != 0).all()
    assert iteration_metrics(r, stats, steps.beta, steps.d)["objective/kl"] > 0  # k1: E[KL] >= 0


def test_bf16_autocast_keeps_kl_zero_at_the_start(tiny_gguf):
    r, stats = Steps(tiny_gguf, "--bf16").iteration(0)
    assert torch.equal(r.logprobs, r.ref_logprobs) and stats[0]["first_ratio_dev"] == 0.0


def test_lr_anneal(tmp_path, tiny_gguf):
    rows = run(tmp_path / "r", tiny_gguf, "--iterations", "2", "--lr", "1e-4", "--lr-anneal")
    assert [r["lr"] for r in rows] == [pytest.approx(1e-4), pytest.approx(5e-5)]


# ---------------------------------------------------------------------------------------------
# bad input


def test_reward_model_with_another_vocabulary_is_refused(tmp_path, tiny_gguf, tiny_rm):
    import shutil

    _, tok, _ = load_model(str(tiny_gguf))
    trunk = random_model(tiny_config(vocab_size=272))  # room in the embedding for one more token
    bigger = save_hf(tmp_path / "rm_vocab", trunk, tok, heads={"reward": ScalarHead(trunk.cfg.dim)})
    tk = Tokenizer.from_file(str(bigger / "tokenizer.json"))
    tk.add_tokens(["<extra>"])  # 265 tokens vs the policy's 264
    tk.save(str(bigger / "tokenizer.json"))
    with pytest.raises(InputError, match=r"the reward model .*265 tokens, the policy's has 264"):
        run(tmp_path / "a", tiny_gguf, reward=("--reward-model", str(bigger)))

    same_size = tmp_path / "rm_merges"
    shutil.copytree(tiny_rm, same_size)
    spec = json.loads((same_size / "tokenizer.json").read_text())
    spec["model"]["merges"] = []  # same vocabulary, other encodings (" the" is no longer one token)
    (same_size / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(InputError, match="the reward model .*encodes the probe text"):
        run(tmp_path / "b", tiny_gguf, reward=("--reward-model", str(same_size)))


def test_reference_with_another_shape_is_refused(tmp_path, tiny_gguf):
    other = write_tiny_gguf(tmp_path / "other.gguf", random_model(tiny_config(hidden_dim=96)))
    with pytest.raises(InputError, match=r"the reference .*mlp.*shape"):
        run(tmp_path / "r", tiny_gguf, "--ref", str(other))


@pytest.mark.parametrize("extra, match", [
    ((), "exactly one of"),  # both --reward-model and --reward-token
    (("--batch-size", "6", "--num-minibatches", "4"), "multiple"),
    (("--temperature", "0"), "temperature"),
    (("--value-model", "separate"), "needs --reward-model"),
    (("--fsdp",), "--fsdp: train_ppo.py has DDP only"),  # shared flags PPO cannot honour: refused
    (("--grad-accum", "2"), "--grad-accum: .*--num-minibatches"),
    (("--warmup", "3"), "--warmup: .*--lr-anneal"),
    (("--save-every", "0"), r"--save-every: 0 is not allowed \(must be >= 1\)"),
    (("--advantage", "rloo", "--value-model", "shared"), "trains no value function"),
    (("--value-model", "none"), "GAE needs a value function"),
    (("--advantage", "grpo", "--k", "1"), "--k must be at least 2"),
    (("--k", "2"), "--k: GAE-PPO samples one response"),
    (("--advantage", "rloo", "--k", "3"), "not a multiple of --k 3"),
])
def test_bad_flags(tmp_path, tiny_gguf, tiny_rm, extra, match):
    reward = ("--reward-token", REWARD_TOKEN)
    if not extra:
        reward += ("--reward-model", str(tiny_rm))
    with pytest.raises(InputError, match=match):
        run(tmp_path / "r", tiny_gguf, *extra, reward=reward)


def test_multi_token_reward_text_is_refused(tmp_path, tiny_gguf):
    with pytest.raises(InputError, match="not one"):
        run(tmp_path / "r", tiny_gguf, reward=("--reward-token", "hello"))


def test_cli_prints_one_line_error(tmp_path, tiny_gguf, capsys):
    from minicai.infra.cli import run_cli

    rc = run_cli(train_ppo.main, ["--out", str(tmp_path / "r"), "--policy", str(tiny_gguf)])
    assert rc == 2 and capsys.readouterr().err.startswith("error: give exactly one of")


def test_check_same_tokenizer_accepts_itself(tiny):
    _, tok = tiny
    check_same_tokenizer(tok, tok, "the reward model")


# ---------------------------------------------------------------------------------------------
# resume


def test_resume_after_interruption_continues_the_same_run(tmp_path, tiny_gguf, monkeypatch):
    common = ("--iterations", "4", "--lr", "1e-3", "--save-every", "1", "--num-minibatches", "2")
    full = run(tmp_path / "full", tiny_gguf, *common)

    with monkeypatch.context() as mp:  # killed right after the checkpoint of iteration 2 reached the disk
        kill_after(mp, train_ppo, "save_checkpoint", calls=2)
        with pytest.raises(Killed):
            run(tmp_path / "cut", tiny_gguf, *common)
    state = json.loads((tmp_path / "cut" / "ckpt" / "train_state.json").read_text())
    assert state["step"] == 2
    seen, real = [], train_ppo.rollout
    monkeypatch.setattr(train_ppo, "rollout", lambda m, p, it, *a: seen.append(it) or real(m, p, it, *a))
    resumed = run(tmp_path / "cut", tiny_gguf, *common)
    assert seen == [2, 3]  # continues at the third iteration
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]

    def strip(r):
        return {k: v for k, v in r.items() if not k.startswith("time/")}

    assert [strip(r) for r in resumed] == [strip(r) for r in full]  # same prompts, samples, optimizer state
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    va = load_file(str(tmp_path / "full" / "model" / "value_head.safetensors"))
    vb = load_file(str(tmp_path / "cut" / "model" / "value_head.safetensors"))
    assert all(torch.equal(va[k], vb[k]) for k in va)


def test_resume_refuses_another_config(tmp_path, tiny_gguf):
    run(tmp_path / "r", tiny_gguf)
    with pytest.raises(InputError, match="field 'lr'"):
        run(tmp_path / "r", tiny_gguf, "--lr", "1e-3")


def test_prompt_batches_cover_every_prompt_once_per_pass():
    n, B = 10, 4
    seen = [i for it in range(5) for i in prompt_batch(n, B, it, seed=7)]  # 20 = two passes
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert prompt_batch(n, B, 3, 7) == prompt_batch(n, B, 3, 7)
    assert seen[:10] != [i for it in range(3) for i in prompt_batch(n, B, it, seed=8)][:10]


def test_help_explains_every_flag(capsys):
    """Every flag of Args has its docstring as --help text, and the module docstring (the
    conventions table) is the description."""
    for name, f, _, owner in cli.leaves(train_ppo.Args):
        assert cli.field_docs(owner).get(name), name
    with pytest.raises(SystemExit):
        train_ppo.main(["--help"])
    out = capsys.readouterr().out
    assert "--reward-at last|eos_plus_one" in out and "--max-grad-norm" in out and "--sample-every" in out
    assert set(cli.resume_ignored(train_ppo.Args)) == {"device", "threads", "save_every", "sample_every"}


# ---------------------------------------------------------------------------------------------
# critic-free advantages in the same loop: --advantage rloo | grpo


@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_critic_free_iteration_groups_prompts_and_uses_the_group_baseline(tmp_path, tiny_gguf, method):
    args = train_ppo.method_defaults(cli.parse(train_ppo.Args, argv(tmp_path, tiny_gguf, "--advantage", method)))
    # what each method puts where, unless given
    assert (args.adv.k, args.ppo.value_model, args.adv.whiten_advantages) == (4, "none", "none")
    assert args.kl.kl_penalty == ("loss" if method == "grpo" else "reward")
    m = train_ppo.load_models(args.models.policy, None, None, REWARD_TOKEN, "none", torch.device("cpu"))
    assert m.value_head is None and m.value_model is None
    d = distributed.Dist()
    prompts, _ = split([p for s in ["builtin-red-team", "builtin-helpful"] for p in load_prompts(s)], 0.2)
    ids = [m.tok.render([{"role": "user", "content": p.text}], add_generation_prompt=True)[0] for p in prompts]
    idx = [i for i in prompt_batch(len(ids), 2, 0, 0) for _ in range(4)]  # 2 prompts x k = 4 rows
    r = train_ppo.rollout(m, [ids[i] for i in idx], 0, args, d)
    assert torch.equal(r.seq[0, :r.P], r.seq[3, :r.P]) and not torch.equal(r.seq[3, :r.P], r.seq[4, :r.P])
    r.raw_score, r.score = train_ppo.score(m, r, args)
    r.logprobs, r.ref_logprobs, r.values = train_ppo.logprobs_values(m, r, args)
    r.score = torch.tensor([0.0, 1.0, 2.0, 5.0, 1.0, 1.0, 1.0, 1.0])  # hand-set scores; KL is 0 at the start
    kl, mask, rewards, adv, returns = train_ppo.group_advantages(r, args.kl.beta, args)
    assert returns is None and torch.equal(mask, r.mask) and torch.all(kl[r.mask] == 0)
    r.kl, r.gae_mask, r.rewards, r.advantages, r.returns = kl, mask, rewards, adv, returns
    if method == "rloo":  # 0 - (1+2+5)/3, 1 - 7/3, 2 - 6/3, 5 - 3/3; the second group is all equal
        want = torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0])
    else:  # mean 2, deviations -2, -1, 0, 3, unbiased std sqrt(14/3)
        s = (14 / 3) ** 0.5 + 1e-4
        want = torch.tensor([-2 / s, -1 / s, 0.0, 3 / s, 0.0, 0.0, 0.0, 0.0])
    for b in range(8):
        assert torch.allclose(adv[b][r.mask[b]], want[b].expand(int(r.mask[b].sum())), atol=1e-6), b
    assert torch.all(adv[~r.mask] == 0)
    stats = train_ppo.update(m, m.trained, torch.optim.AdamW(m.trained.parameters(), lr=1e-3), r, args.kl.beta, 0,
                             args, d)
    assert stats[0]["first_ratio_dev"] == 0.0 and all(float(s["vf_loss"]) == 0.0 for s in stats)


@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_critic_free_methods_raise_a_synthetic_reward(tmp_path, tiny_gguf, method):
    rows = run(tmp_path / "r", tiny_gguf, "--advantage", method, "--iterations", "12", "--batch-size", "16",
               "--lr", "3e-4", "--max-new-tokens", "12", "--save-every", "1000")
    scores = [r["objective/scores"] for r in rows]
    first, last = sum(scores[:4]) / 4, sum(scores[-4:]) / 4
    assert last > first + 0.25, scores
    assert all(r["loss/value"] == 0.0 for r in rows) and "val/mean" not in rows[0]
    assert (tmp_path / "r" / "model" / "model.safetensors").exists()
    assert not (tmp_path / "r" / "model" / "value_head.safetensors").exists()
