"""PPO actor-critic updates on packed prompt + response batches; run under torchrun.

    torchrun --standalone --nproc-per-node 1 recipes/ppo.py                        # debug flavor, byte tokens
    torchrun --standalone --nproc-per-node 2 recipes/ppo.py --tp 2
    torchrun --standalone --nproc-per-node 4 recipes/ppo.py --dp-shard 2 --tp 2 --advantage grpo
    torchrun --standalone --nproc-per-node 2 recipes/ppo.py --cp 2                 # Ulysses
    torchrun --standalone --nproc-per-node 4 recipes/ppo.py --pp 2 --tp 2 --set num_hidden_layers=4   # pipeline
    torchrun --standalone --nproc-per-node 2 recipes/ppo.py --model path/to/hf-folder   # real weights
    torchrun --max-restarts 1 --standalone --nproc-per-node 2 recipes/ppo.py --iterations 20 \
        --checkpoint-dir ckpt --checkpoint-every 2 --resume    # a restarted job goes on from its newest checkpoint

Task (rule-based, no reward model): the prompt is "a+b=" for a, b in [0, 20); the reward is the
fraction of the answer's digits that the response gets right, in place (1.0 for "7" after "3+4=").

Each iteration is a rollout of `--prompts` prompts over all data-parallel ranks and `--ppo-epochs` epochs of
clipped policy + value + KL (+ entropy) loss on it (`dtllama.train.ppo`, which says how every layout gives the one
device's numbers). The first epoch's log-probs equal the rollout's bitwise (ratio exactly 1), asserted every
iteration on every rank; each iteration logs the per-epoch losses, the reward and two sampled responses.
With `--checkpoint-dir` the actor, the critic and their optimizers are checkpointed (DCP) after iterations; a run
resumed from one (`--resume`) gives the uninterrupted run's iterations bitwise on the same layout.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dtllama.train import rl
from dtllama.train.build import pipeline_options, resolve_layout, setup_distributed
from dtllama.train.checkpoint import TrainState
from dtllama.train.config import (Checkpointing, Job, Layout, Logging, ModelSource, Optim, RunConfig, opt, parse_config,
                                   section)
from dtllama.train.launch import run_recipe
from dtllama.train.loop import open_checkpointer, save_due
from dtllama.train.metrics import MetricsWriter, max_over, mean_over
from dtllama.train.ppo import PPO, actor_critic, after_update, ppo_update, rollout, rollout_microbatch_tokens
from dtllama.train.source import load_source
from dtllama.train.watchdog import Watchdog


@dataclass
class Task:
    """The arithmetic task: iterations, and prompts per iteration."""

    iterations: int = opt(3)
    prompts: int = opt(8, "prompts per iteration over all data-parallel ranks")

    def __post_init__(self):
        if self.prompts < 1:
            raise ValueError(f"--prompts {self.prompts} must be >= 1")


@dataclass
class Config(RunConfig):
    """The PPO run: a debug flavor by default (an MoE flavor or folder takes --ep: actor, reference and critic alike)."""

    source: ModelSource = section(ModelSource, flavor="debug")
    layout: Layout = section(Layout, microbatches=2)
    optim: Optim = section(Optim, only=("lr",))
    ppo: PPO = section(PPO)
    task: Task = section(Task)
    checkpoint: Checkpointing = section(Checkpointing)
    logging: Logging = section(Logging)
    job: Job = section(Job)


def make_prompts(iteration: int, n: int, seed: int) -> list[tuple[int, int]]:
    """The global prompts of an iteration: the same on every rank."""
    rng = random.Random(seed * 1_000_003 + iteration)
    return [(rng.randrange(20), rng.randrange(20)) for _ in range(n)]


def reward(a: int, b: int, response: str) -> float:
    """Fraction of the digits of a+b that the response has in place: a dense signal for a tiny model."""
    answer = str(a + b)
    return sum(x == y for x, y in zip(answer, response)) / len(answer)


def main(argv=None):
    cfg = parse_config(Config, argv, description=__doc__, prog="recipes/ppo.py")
    device, log = setup_distributed(cfg.seed, cfg.timeout)
    config, tokenizer, source = load_source(cfg.source)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    dims = resolve_layout(cfg.layout, config)
    n_batch = dims.dp_replicate * dims.dp_shard
    if cfg.prompts < n_batch:  # before any collective: every batch rank needs a prompt
        raise ValueError(f"--prompts {cfg.prompts} < {n_batch} data-parallel ranks; "
                         "give every rank at least one prompt (raise --prompts or lower --dp-shard)")
    # Under pp: microbatches that fit a rank's batch at its longest (every prompt "19+19=", every response full).
    longest = len(encode("19+19=")) + cfg.ppo.max_new_tokens
    tokens = rollout_microbatch_tokens(-(-cfg.prompts // n_batch) * cfg.ppo.group_size, longest,
                                       cfg.layout.microbatches, dims.token_multiple)
    pipeline = pipeline_options(cfg.layout, dims, config, tokens)
    dims.build_mesh(device.type)
    models = actor_critic(config, dims, cfg.layout, device, cfg.ppo, cfg.lr, pipeline=pipeline, source=source,
                          seed=cfg.seed)
    log(f"PPO: {config.num_params() / 1e6:.1f} M parameters per model; world {dims.world_size}: {dims}; "
        f"advantage {cfg.advantage}, agg {cfg.agg}, KL {cfg.kl_kind}")
    # Actor and critic with their AdamW moments; the reference is rebuilt frozen from the source, the prompts and
    # the sampling generators from the seed and the iteration: a resumed run's iterations are the uninterrupted one's.
    state = TrainState(models.actor.model, models.actor_opt, extra={"iteration": 0},
                       others={"critic": (models.critic.model, models.critic_opt)})
    ckpt = open_checkpointer(cfg.checkpoint, state, log)
    start = state.extra["iteration"]
    metrics = MetricsWriter(cfg.metrics, cfg.tensorboard, append=start > 0)
    rank, n = dims.mesh("batch").get_local_rank(), dims.mesh("batch").size()
    watchdog = Watchdog(cfg.timeout)
    for it in range(start + 1, cfg.iterations + 1):
        t0 = time.perf_counter()
        prompts = make_prompts(it, cfg.prompts, cfg.seed)[rank::n]  # non-empty: checked above
        # Same seed on the TP ranks of a group (they must sample the same tokens), another per batch rank.
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + it * 1009 + rank)
        with watchdog.step(it):  # a collective that times out names the rank it waited for
            roll = rollout(models, [encode(f"{a}+{b}=") for a, b in prompts],
                           lambda i, r: reward(*prompts[i], tokenizer.decode(r, skip_special_tokens=True)),
                           cfg.ppo, gen, tokenizer.eos_token_id, dims)
            row = iteration_row(it, t0, roll, models, cfg, dims, tokenizer)
            log_row(row, cfg, log)
            metrics.write(row, step_key="iteration")
            state.extra.update(iteration=it)
            if ckpt is not None and save_due(cfg.checkpoint, it, cfg.iterations):
                ckpt.save(it, state)
    if ckpt is not None:
        ckpt.wait()
    metrics.close()
    watchdog.close()
    dist.barrier()
    dist.destroy_process_group()


def log_row(row: dict, cfg: Config, log) -> None:
    """The iteration's line (rank 0's)."""
    log(f"iter {row['iteration']:3d}  reward {row['reward_mean']:.3f}  "
        f"pg {row['pg_loss'][0]:+.5f} -> {row['pg_loss'][-1]:+.5f}  "
        f"first-minibatch |ratio-1| {row['first_ratio_max_dev']:.1e} KL {row['first_approx_kl']:.1e}  "
        f"approx-KL {row['approx_kl']:.2e}  KL(ref) {row['kl'][-1]:+.2e}  clip {row['clip_frac']:.3f}  "
        f"entropy {row['entropy']:.3f}  value err {row['value_error']:.3f}  EV {row['explained_variance']:+.3f}  "
        f"{row['seconds']:.1f}s  e.g. {row['samples']!r}"
        + (f"  rollout |dlogp| {row['rollout_logprob_diff_mean']:.2e} (max {row['rollout_logprob_diff_max']:.2e}) "
           f"KL(rollout||train) {row['rollout_kl']:.2e} weight {row['rollout_weight_mean']:.3f}"
           if cfg.ppo.rollout_logprobs != "trainer" else ""))


def iteration_row(it: int, t0: float, roll, models, cfg: Config, dims, tokenizer) -> dict:
    """Update on the rollout; the iteration's metrics (means over the data-parallel ranks)."""
    dp = dims.mesh("dp")
    ev = rl.explained_variance(roll.values, roll.ret, roll.mask)
    update = ppo_update(roll, models, cfg.ppo, dims)
    first = update.first
    sums = torch.tensor([float(roll.scores.sum()), float(len(roll.scores))], dtype=torch.float64)
    dist.all_reduce(sums, group=dims.mesh("batch").get_group())
    row = dict(iteration=it, reward_mean=float(sums[0] / sums[1]), pg_loss=update.pg_loss, vf_loss=update.vf_loss,
               kl=update.kl, entropy=update.entropy[0], first_ratio_max_dev=mean_over(first["ratio_max_dev"], dp),
               first_approx_kl=mean_over(first["approx_kl"], dp), first_exact=first["exact"],
               value_error=mean_over(first["value_error"], dp), explained_variance=mean_over(ev, dp),
               seconds=time.perf_counter() - t0,
               samples=[tokenizer.decode(r, skip_special_tokens=True) for r in roll.responses[:2]])
    c = roll.correction  # the engine / trainer mismatch (a max over ranks for the max, means for the rest)
    row.update(rollout_logprob_diff_mean=mean_over(c["logprob_diff_mean"], dp),
               rollout_logprob_diff_max=max_over(c["logprob_diff_max"], dp),
               rollout_kl=mean_over(c["kl_rollout_train"], dp), rollout_weight_mean=mean_over(c["weight_mean"], dp))
    # Clipping and approx-KL start once the policy has moved: reported for the updated actor vs the rollout.
    after = after_update(roll, models.actor, cfg.ppo)
    row["clip_frac"], row["approx_kl"] = mean_over(after["clip_frac"], dp), mean_over(after["approx_kl"], dp)
    return row


if __name__ == "__main__":
    run_recipe(main)
