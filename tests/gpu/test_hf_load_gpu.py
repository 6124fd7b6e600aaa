"""The pinned-buffer fast path of the HF reader: GPU targets get every tensor bitwise."""

import pytest
import torch
import torch.distributed.checkpoint as dcp
import transformers
from safetensors.torch import load_file

import dtllama
from dtllama.models import hf_io
from dtllama.models.hf_io import PinnedHFReader, _pread_into, read_safetensors_index

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("piece_bytes", [4096, 64 * 2**20])  # many pieces per tensor, or whole tensors
def test_pinned_reader_loads_bitwise_on_gpu(tmp_path, monkeypatch, dtype, piece_bytes):
    config = transformers.LlamaConfig(vocab_size=1001, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="100KB")
    with torch.device("meta"):
        model = dtllama.LlamaForCausalLM(dtllama.ModelConfig.from_hf(str(tmp_path)))
    model.to_empty(device="cuda").to(dtype)
    state = model.state_dict()
    reads = set()  # (file, offset) of every pinned read
    monkeypatch.setattr(hf_io, "_pread_into", lambda fd, out, offset, name: (reads.add((name, offset)),
                                                                            _pread_into(fd, out, offset, name)))
    entries = read_safetensors_index(str(tmp_path))
    dcp.load(state, storage_reader=PinnedHFReader(str(tmp_path), entries, 4, piece_bytes), no_dist=True)
    files = {}
    for f in tmp_path.glob("*.safetensors"):
        files.update(load_file(f))
    assert set(files) == set(state)
    assert {(e.file, e.begin) for e in entries.values()} <= reads  # every tensor took the pinned fast path
    for name, t in state.items():
        assert torch.equal(t.cpu(), files[name].to(dtype)), name
