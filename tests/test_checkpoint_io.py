"""HF folders written by dtllama load in transformers and come back bit for bit; bad input is a clear error."""

import json
import os
import shutil

import pytest
import torch
from conftest import hf_model
from helpers import rel_err, torchrun

import dtllama
from dtllama.ops import cu_seqlens_from_lengths


@pytest.mark.parametrize("family", ["llama3", "llama3.2-tied", "qwen2"])
def test_save_transformers_save_load_is_bitwise(family, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = dtllama.ModelConfig.from_hf(hf_model(family).config.to_dict())
    model = dtllama.LlamaForCausalLM(cfg)
    model.init_weights(seed=7)
    # Small shards so the index and several files are exercised.
    model.save_pretrained(tmp_path / "a", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32)
    hf.save_pretrained(tmp_path / "b")
    back = dtllama.LlamaForCausalLM.from_pretrained(tmp_path / "b")
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    hf_sd = hf.state_dict()
    for k in ours:
        assert torch.equal(ours[k], hf_sd[k]), k


def test_bf16_save_and_value_model_round_trip(tmp_path):
    cfg = dtllama.flavors["debug"]
    critic = dtllama.LlamaForValue(cfg)
    critic.init_weights(seed=1)
    critic.save_pretrained(tmp_path / "v", dtype=torch.bfloat16)
    saved = json.loads((tmp_path / "v" / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForSequenceClassification"] and saved["dtype"] == "bfloat16"
    back = dtllama.LlamaForValue.from_pretrained(tmp_path / "v", dtype=torch.bfloat16)
    for k, v in critic.state_dict().items():
        assert torch.equal(v.to(torch.bfloat16), back.state_dict()[k]), k


def test_init_weights_is_deterministic_and_seeded():
    cfg = dtllama.flavors["debug"]
    a, b, c = (dtllama.LlamaForCausalLM(cfg) for _ in range(3))
    a.init_weights(3), b.init_weights(3), c.init_weights(4)
    for (k, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(x, y), k
        if k.endswith("proj.weight"):
            assert not torch.equal(x, z), k


@pytest.fixture(scope="module")
def tiny():
    model = dtllama.LlamaForCausalLM(dtllama.flavors["debug"])
    model.init_weights(0)
    return model


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_ids=torch.arange(10), cu_seqlens=cu_seqlens_from_lengths([4, 5])), r"end at T=10.*cu_seqlens\[-1\]=9"),
        (dict(input_ids=torch.arange(10), cu_seqlens=cu_seqlens_from_lengths([4, 6]), position_ids=torch.arange(9)),
         r"position_ids has shape \(9,\) but input_ids has \(10,\)"),
        (dict(input_ids=torch.tensor([1, 2, 512]), cu_seqlens=cu_seqlens_from_lengths([3])), r"token id 512 .*\[0, 512\)"),
        (dict(input_ids=torch.tensor([1, -3]), cu_seqlens=cu_seqlens_from_lengths([2])), r"token id -3"),
        (dict(input_ids=torch.tensor([1, 2]), cu_seqlens=cu_seqlens_from_lengths([2]), labels=torch.tensor([600, -100])),
         r"label 600 is outside the vocabulary \[0, 512\)"),
        (dict(input_ids=torch.arange(4)), "need cu_seqlens"),
        (dict(input_ids=torch.arange(4), cu_seqlens=torch.tensor([0, 3, 2, 4], dtype=torch.int32)), "non-decreasing"),
        (dict(input_ids=torch.arange(4).view(2, 2), attention_mask=torch.ones(2, 3)), "attention_mask shape"),
    ],
)
def test_bad_inputs_are_clear_errors(tiny, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)


def test_bad_checkpoints_are_clear_errors(tmp_path):
    model = dtllama.LlamaForCausalLM(dtllama.flavors["debug"])
    model.init_weights(0)
    model.save_pretrained(tmp_path / "ok")
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    # Config disagrees with the tensors.
    shutil.copytree(tmp_path / "ok", tmp_path / "shape")
    (tmp_path / "shape" / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=96)))
    with pytest.raises(ValueError, match=r"model-00001-of-00001.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight'"):
        dtllama.LlamaForCausalLM.from_pretrained(tmp_path / "shape")
    # Truncated file.
    shutil.copytree(tmp_path / "ok", tmp_path / "cut")
    f = tmp_path / "cut" / "model-00001-of-00001.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        dtllama.LlamaForCausalLM.from_pretrained(tmp_path / "cut")
    # A shard the index lists is missing.
    model.save_pretrained(tmp_path / "sharded", max_shard_bytes=2**16)
    shards = sorted(f.name for f in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1
    (tmp_path / "sharded" / shards[-1]).unlink()
    with pytest.raises(FileNotFoundError, match=rf"index.json maps '.+' to '{shards[-1]}', which is missing from"):
        dtllama.LlamaForCausalLM.from_pretrained(tmp_path / "sharded")
    # A tensor of another kind (integers) under a weight's name; a tensor missing.
    from safetensors.torch import load_file, save_file

    for case, edit, message in [
        ("dtype", lambda sd: sd.update({"model.norm.weight": sd["model.norm.weight"].to(torch.int32)}),
         r"tensor 'model.norm.weight' is stored as torch.int32, not floating point"),
        ("missing", lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight"),
         r"lacks \['model.layers.1.mlp.down_proj.weight'\]"),
    ]:
        shutil.copytree(tmp_path / "ok", tmp_path / case)
        f = tmp_path / case / "model-00001-of-00001.safetensors"
        sd = load_file(f)
        edit(sd)
        save_file(sd, f, metadata={"format": "pt"})
        with pytest.raises(ValueError, match=message):
            dtllama.LlamaForCausalLM.from_pretrained(tmp_path / case)
    # A recipe's --model folder without a tokenizer.
    from dtllama.train.config import ModelSource
    from dtllama.train.source import load_source

    with pytest.raises(FileNotFoundError, match=r"has no tokenizer \(tokenizer.json, tokenizer.model or vocab.json\)"):
        load_source(ModelSource(model=str(tmp_path / "ok")))
    # Unsupported architecture.
    shutil.copytree(tmp_path / "ok", tmp_path / "arch")
    (tmp_path / "arch" / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        dtllama.LlamaForCausalLM.from_pretrained(tmp_path / "arch")


def test_smollm2_through_a_parallel_layout_round_trips_bitwise(tmp_path):
    """SmolLM2 -> dtllama on tp=3 x dp_shard=2 (its 9 heads rule out tp=2) -> export: every tensor
    bitwise equal to the source, and transformers gives the source's logits on the export."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from dtllama.models.pretrained import smollm2_135m_instruct

    src = smollm2_135m_instruct()
    dst = tmp_path / "export"
    torchrun(6, os.path.join(os.path.dirname(__file__), "hf_layout_job.py"), src, str(dst),
             json.dumps({"dp_shard": 2, "tp": 3}))
    files = sorted(f for f in os.listdir(dst) if f.endswith(".safetensors"))
    assert len(files) > 1 and (dst / "tokenizer.json").exists()
    exported = {k: v for f in files for k, v in load_file(dst / f).items()}
    source = load_file(os.path.join(src, "model.safetensors"))
    assert exported.keys() == source.keys()
    for k in source:
        assert torch.equal(exported[k], source[k]), k
    ids = torch.randint(0, 49152, (1, 24))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)(input_ids=ids).logits
    assert rel_err(got, ref) <= 1e-5


def test_convert_cli_round_trip_and_bad_sources_write_nothing(tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    from dtllama.models.convert import dcp_to_hf, hf_to_dcp

    src = tmp_path / "hf"
    model = dtllama.LlamaForCausalLM(dtllama.flavors["debug"])
    model.init_weights(5)
    model.save_pretrained(src, max_shard_bytes=300_000)
    proc = subprocess.run([sys.executable, "-m", "dtllama.models.convert", "hf-to-dcp", str(src), str(tmp_path / "dcp")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "writing DCP [" in proc.stderr, proc.stderr[-2000:]
    dcp_to_hf(str(tmp_path / "dcp"), str(tmp_path / "back"))
    back = {k: v for f in (tmp_path / "back").glob("*.safetensors") for k, v in load_file(f).items()}
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v), k
    # A missing shard file: a clear error naming it, and no destination folder.
    shards = sorted(src.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=shards[-1].name):
        hf_to_dcp(str(src), str(tmp_path / "dcp2"))
    assert not (tmp_path / "dcp2").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
