"""torchtitan's own trainer trains a dtllama flavor through `dtllama.integrations.torchtitan`: dtllama's
`parallelize` (FSDP over 2 gloo processes), its fused loss and its HF names, on torchtitan's data loader and
the SmolLM2 tokenizer, offline."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, torchrun

REASON = "torchtitan>=0.3.0 is not installed; run `pip install 'dtllama[titan]'`"


def _titan_version() -> tuple[int, ...]:
    """torchtitan's installed version, read without importing it (its trainer takes seconds to import)."""
    try:
        return tuple(int(p) for p in importlib.metadata.version("torchtitan").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return ()


pytestmark = pytest.mark.skipif(_titan_version() < (0, 3), reason=REASON)


@pytest.fixture(scope="module")
def titan():
    import dtllama.integrations.torchtitan as titan

    return titan


SEQ_LEN, LOCAL_BATCH, STEPS = 256, 4, 10


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The SmolLM2 tokenizer folder and dtllama's demo text as JSON lines torchtitan's `c4_test` loader reads."""
    from dtllama.models.pretrained import smollm2_135m_instruct

    data = tmp_path_factory.mktemp("titan-data")
    with open(os.path.join(ROOT, "recipes", "data", "instructions.txt")) as f:
        docs = [d.strip() for d in f.read().split("\n\n") if d.strip()]
    (data / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return smollm2_135m_instruct(), str(data)


def _first_step_reference(titan, tokenizer_dir: str, data_dir: str) -> tuple[float, int]:
    """Step 1's loss without torchtitan's trainer, and the vocabulary size: each rank's first batch from
    torchtitan's dataset, one unsharded fp32 `LlamaForCausalLM` with the same seeded init (dtllama draws each
    parameter from a generator seeded by its name, whatever the sharding), per-document sequences, one mean."""
    from torchtitan.components.tokenizer import HuggingFaceTokenizer
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataset

    import dtllama
    from dtllama.ops import cu_seqlens_from_lengths

    tok = HuggingFaceTokenizer(tokenizer_path=tokenizer_dir)
    spec = titan.DtllamaForTitan.Config(flavor="debug", overrides={"vocab_size": tok.get_vocab_size()})
    model = dtllama.LlamaForCausalLM(spec.model_config())
    model.init_weights(spec.seed)
    total, count = 0.0, 0
    for rank in range(2):
        ds = iter(HuggingFaceTextDataset("c4_test", data_dir, tok, SEQ_LEN, rank, 2, infinite=True))
        for _ in range(LOCAL_BATCH):
            inputs, labels = next(ds)
            starts = torch.nonzero(inputs["positions"] == 0).flatten().tolist() + [SEQ_LEN]
            cu = cu_seqlens_from_lengths([b - a for a, b in zip(starts, starts[1:])])
            with torch.no_grad():
                lp = model(inputs["input"], inputs["positions"], cu, labels=labels).logprobs
            total, count = total - float(lp.double().sum()), count + labels.numel()
    return total / count, tok.get_vocab_size()


def test_torchtitan_trainer_trains_a_dtllama_flavor_with_fsdp(titan, assets, tmp_path):
    tokenizer_dir, data_dir = assets
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = torchrun(2, "-m", "dtllama.integrations.torchtitan", "--config", "dtllama_debug", "--hf_assets_path",
                    tokenizer_dir, "--dataloader.dataset_path", data_dir, "--dump_folder", str(tmp_path / "out"),
                    "--training.steps", str(STEPS), "--training.seq_len", str(SEQ_LEN),
                    "--training.local_batch_size", str(LOCAL_BATCH), timeout=300, cwd=tmp_path, env=env)
    log = proc.stdout + proc.stderr
    losses = {int(s): float(v) for s, v in re.findall(r"step:\s*(\d+)\s+loss:\s*([\d.]+)", log)}
    print("losses per step:", [losses[s] for s in sorted(losses)])
    assert sorted(losses) == list(range(1, STEPS + 1)), log[-3000:]
    # Step 1 is the loss before any update: the one-process dtllama model on the same two ranks' batches. Both
    # are fp32 sums of the same 2048 token losses in another order and grouping (~1e-6 relative); torchtitan
    # logs 5 decimals, hence 1e-4.
    reference, vocab = _first_step_reference(titan, tokenizer_dir, data_dir)
    print(f"step 1 reference (one process, no torchtitan): {reference:.5f}, ln(vocab={vocab}) = {math.log(vocab):.5f}")
    assert abs(losses[1] - reference) < 1e-4, (losses[1], reference)
    # A random-init head gives near-uniform logits: ln(vocab) plus ~var(logits)/2 = 64 * 0.02^2 / 2 = 0.013.
    assert abs(losses[1] - math.log(vocab)) < 0.05, (losses[1], vocab)
    # Measured 10.82 -> 9.04 over 10 steps (lr 3e-3 after 2 warm-up steps); 1.0 leaves room for other CPUs.
    assert losses[STEPS] < losses[1] - 1.0, losses
    assert all(losses[s + 1] < losses[s] for s in range(1, STEPS)), losses


def test_state_dict_adapter_is_the_identity_on_transformers_names(titan):
    from transformers import LlamaConfig, LlamaForCausalLM

    import dtllama

    config = dtllama.flavors["debug"]
    hf = LlamaForCausalLM(LlamaConfig(**config.to_hf()))
    with torch.device("meta"):
        ours = titan.DtllamaForTitan(titan.DtllamaForTitan.Config(flavor="debug"))
    assert sorted(ours.state_dict()) == sorted(hf.state_dict())
    adapter = titan.DtllamaStateDictAdapter(titan.DtllamaForTitan.Config(flavor="debug"), None)
    sd = hf.state_dict()
    back = adapter.to_hf(adapter.from_hf(sd))
    assert list(back) == list(sd) and all(back[k] is sd[k] for k in sd)


def test_loss_under_casts_at_use_is_the_loss_of_bf16_parameters(titan):
    """Without data parallelism `parallelize` applies bf16 by casts at use (fp32 parameters): the trainer's
    forward hands the loss a weight of the activations' dtype, and the loss is that of bf16 parameters."""
    from dtllama.parallel import apply_mixed_precision

    seed = int(torch.randint(0, 2**16, ()))
    spec = titan.DtllamaForTitan.Config(flavor="debug", overrides={"vocab_size": 97}, seed=seed)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(seed))
    cast, ref = titan.DtllamaForTitan(spec), titan.DtllamaForTitan(spec)
    for m in (cast, ref):
        m.init_weights()
    apply_mixed_precision(cast, torch.bfloat16)
    for q in ref.parameters():
        q.data = q.data.to(torch.bfloat16)
    loss = titan.DtllamaLoss(titan.DtllamaLoss.Config())
    got, want = (loss(m(ids), ids.roll(-1, 1))[0] for m in (cast, ref))
    assert cast.output_weight.dtype == torch.float32 and torch.equal(got, want), (got, want)


# Run in a fresh interpreter: the namespaces the shims may touch, by identity, around the import and two calls.
_SHIMS_SCRIPT = r"""
import sys, types
import torch, torch.distributed as dist
import torchtitan.tools.utils as utils

SPACES = {"torch.distributed": dist, "torchtitan.tools.utils": utils, "torch.cpu": torch.cpu}

def state():
    return {(n, k): v for n, m in SPACES.items() for k, v in vars(m).items()
            if not issubclass(type(v), types.ModuleType)}

def changed(a, b):
    return {k for k in a.keys() | b.keys() if a.get(k, a) is not b.get(k, b)}

before = state()
import dtllama.integrations.torchtitan as titan
assert not changed(before, state()), changed(before, state())
assert not [m for m in titan._DEVICE_COPIERS if m in sys.modules], "the import bound torchtitan's device"
host = utils.device_type == "cuda" and not torch.cuda.is_available()
want = {("torch.distributed", "set_timeout")} if not hasattr(dist, "set_timeout") else set()
want |= {("torchtitan.tools.utils", "device_type"), ("torchtitan.tools.utils", "device_module")} if host else set()
titan.apply_shims()
first = state()
assert changed(before, first) == want, (changed(before, first), want)
if host:
    assert utils.device_type == "cpu" and type(utils.device_module).__name__ == "_HostDevice"
if ("torch.distributed", "set_timeout") in want:
    assert dist.set_timeout is dist.distributed_c10d._set_pg_timeout
titan.apply_shims()
assert not changed(first, state()), changed(first, state())
print("shims:", sorted(want))
"""


def test_importing_the_integration_changes_nothing_until_apply_shims():
    """Importing the module leaves torch and torchtitan as they were (it does not even import the torchtitan
    modules that copy the device choice); `apply_shims()` changes exactly the attributes it documents, once."""
    proc = subprocess.run([sys.executable, "-c", _SHIMS_SCRIPT], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    print(proc.stdout)
