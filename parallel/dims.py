"""The parallel layout: degrees of each mesh dimension, validated before any collective runs.

Mesh dims, outer to inner: `pp, dp_replicate, dp_shard, cp, tp`; their product is the world size and
`dp_shard=-1` takes what is left. Flattened views: `dp_shard_cp` (FSDP shards over it: CP ranks hold
the same parameters), `dp` = `dp_replicate x dp_shard x cp` (batch reductions: loss, token counts) and
`batch` = `dp_replicate x dp_shard` (sequences are dealt out over it: the CP ranks of a group share theirs).
Expert parallel (`ep`, a mixture-of-experts model only) is carved from `dp_shard x cp x tp`, the ranks that hold
distinct tokens at the MoE (sequence parallel deals tokens over TP ranks): `ep` (innermost) shards the routed
experts, `efsdp` (what remains) FSDP-shards them; every other parameter keeps the dense layout.
`ParallelDims` builds and keeps every mesh; callers ask it (`dims.mesh("tp")`), never slice one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dtllama.models.config import ModelConfig

DIM_NAMES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


def valid_tp_degrees(config: ModelConfig) -> list[int]:
    """TP degrees the plan supports: whole query heads per rank, KV heads split or replicated evenly, every
    SwiGLU width split evenly (the widths the family's config names: `tp_widths`)."""
    q, kv, widths = config.num_attention_heads, config.num_key_value_heads, config.tp_widths().values()
    return [t for t in range(1, q + 1)
            if q % t == 0 and (kv % t == 0 or t % kv == 0) and all(w % t == 0 for w in widths)]


def _kv_heads_after_tp(config: ModelConfig, tp: int) -> int:
    """KV heads per TP rank: split evenly, or one (replicated) when tp exceeds them."""
    kv = config.num_key_value_heads
    return kv // tp if kv % tp == 0 else 1


def valid_cp_degrees(config: ModelConfig, tp: int = 1) -> list[int]:
    """Ulysses degrees for this `tp`: each CP rank takes whole query heads of the `q/tp` a TP rank holds,
    and whole KV heads (split evenly, or replicated when there are fewer than cp)."""
    q, kv = config.num_attention_heads, _kv_heads_after_tp(config, tp)
    if q % tp:
        return []
    return [c for c in range(1, q // tp + 1) if (q // tp) % c == 0 and (kv % c == 0 or c % kv == 0)]


def check_cp(config: ModelConfig, cp: int, tp: int) -> None:
    """A ValueError naming cp, tp, the heads and the valid cp degrees, before any all-to-all could split a head."""
    if cp > 1 and cp not in valid_cp_degrees(config, tp):
        raise ValueError(
            f"cp={cp} with tp={tp} does not fit num_attention_heads={config.num_attention_heads}, "
            f"num_key_value_heads={config.num_key_value_heads} (Ulysses gives each of the tp*cp={tp * cp} ranks "
            f"whole heads); choose cp in {valid_cp_degrees(config, tp)} for tp={tp}"
        )


def valid_ep_degrees(config, dp_shard: int = 1, cp: int = 1, tp: int = 1) -> list[int]:
    """EP degrees for this layout: whole experts per rank (ep divides `num_local_experts`) over ranks of distinct
    tokens (ep divides `dp_shard*cp*tp`). A dense model has no experts: only 1."""
    experts = getattr(config, "num_local_experts", 1)
    ranks = dp_shard * cp * tp
    return [e for e in range(1, min(experts, ranks) + 1) if experts % e == 0 and ranks % e == 0]


def check_ep(config, ep: int, dp_shard: int, cp: int, tp: int) -> None:
    """A ValueError naming ep, the experts, the ranks it is carved from and the valid degrees, before any
    collective runs."""
    if ep == 1:
        return
    if not getattr(config, "moe_layers", None):
        raise ValueError(f"ep={ep} needs a mixture-of-experts model; this {type(config).__name__} has no MoE layer: "
                         "use ep=1")
    valid = valid_ep_degrees(config, dp_shard, cp, tp)
    if ep not in valid:
        raise ValueError(
            f"ep={ep} does not fit num_local_experts={config.num_local_experts} over dp_shard*cp*tp="
            f"{dp_shard * cp * tp} ranks (dp_shard={dp_shard}, cp={cp}, tp={tp}; ep must divide both); "
            f"choose ep in {valid}"
        )


def check_tp(config: ModelConfig, tp: int) -> None:
    if tp > 1 and tp not in valid_tp_degrees(config):
        raise ValueError(
            f"tp={tp} does not fit num_attention_heads={config.num_attention_heads}, "
            f"num_key_value_heads={config.num_key_value_heads}, "
            + "".join(f"{k}={v}, " for k, v in config.tp_widths().items()).rstrip(", ") + "; "
            f"choose tp in {valid_tp_degrees(config)}"
        )


@dataclass
class ParallelDims:
    """Degrees of the five mesh dims and of expert parallel (`ep`, carved from `dp_shard x cp x tp`); after
    `build_mesh` it also owns the meshes (`dims.mesh("tp")`).

    Callers never slice a mesh themselves, so no code can pair a mesh with dims it disagrees with.
    """

    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    _meshes: dict[str, DeviceMesh] = field(default_factory=dict, init=False, repr=False, compare=False)

    def resolve(self, world_size: int, config: ModelConfig | None = None) -> "ParallelDims":
        """A copy with `dp_shard` resolved, or a ValueError naming the bad degree and the fix."""
        for name in (*DIM_NAMES, "ep"):
            v = getattr(self, name)
            if not isinstance(v, int) or (v < 1 and not (name == "dp_shard" and v == -1)):
                raise ValueError(f"{name}={v!r} must be a positive integer" + (" or -1" if name == "dp_shard" else ""))
        fixed = self.dp_replicate * self.cp * self.tp * self.pp
        dp_shard = self.dp_shard
        if dp_shard == -1:
            if world_size % fixed:
                raise ValueError(
                    f"world size {world_size} is not divisible by pp*dp_replicate*cp*tp = {fixed}; "
                    "choose degrees whose product divides the world size"
                )
            dp_shard = world_size // fixed
        if fixed * dp_shard != world_size:
            raise ValueError(
                f"pp*dp_replicate*dp_shard*cp*tp = {fixed * dp_shard} != world size {world_size}; "
                "set dp_shard=-1 to take the remaining ranks"
            )
        dims = ParallelDims(self.dp_replicate, dp_shard, self.cp, self.tp, self.pp, self.ep)
        if config is not None:
            dims.check_model(config)
        elif (dp_shard * self.cp * self.tp) % self.ep:  # a config names the experts too; without one, the ranks
            ranks = dp_shard * self.cp * self.tp
            raise ValueError(f"ep={self.ep} does not divide dp_shard*cp*tp={ranks} (the ranks experts are spread "
                             f"over); choose ep in {[e for e in range(1, ranks + 1) if ranks % e == 0]}")
        return dims

    def check_model(self, config: ModelConfig, compile: bool = False, ac: str = "none",
                    device_type: str | None = None, cpu_offload: bool = False) -> None:
        """Every refusal of a layout for a model (and of `parallelize` options), in one place, before any
        collective runs."""
        if self.dp_shard == -1:
            raise ValueError("call ParallelDims.resolve(world_size) first (dp_shard is still -1)")
        for name, reason in getattr(config, "parallel_limits", {}).items():  # what a model declares it cannot take
            if getattr(self, name) > 1:
                raise ValueError(f"{name}={getattr(self, name)} is not available for this {config.model_type} model: "
                                 f"{reason}")
        check_tp(config, self.tp)
        check_cp(config, self.cp, self.tp)
        check_ep(config, self.ep, self.dp_shard, self.cp, self.tp)
        if self.pp > config.num_hidden_layers:
            raise ValueError(f"pp={self.pp} needs at least one decoder layer per pipeline rank; the model has "
                             f"num_hidden_layers={config.num_hidden_layers}: choose pp in 1..{config.num_hidden_layers}")
        if compile and self.tp > 1 and ac == "full" and device_type == "cpu":
            # torch 2.13 on CPU: full AC recomputes the CPU SDPA op (tagged random-seeded), and AOTAutograd's
            # RNG functionalization appends its state after the DeviceMesh inputs that DTensor parameters
            # save for backward, which the runtime then mis-slices. CUDA takes another RNG path.
            raise ValueError(f"compile=True with tp={self.tp} and ac='full' does not compile on a CPU mesh "
                             "(a torch limitation); use ac='selective' or ac='none' there, or compile=False")
        if cpu_offload and device_type == "cpu":
            raise ValueError("cpu_offload=True needs an accelerator mesh (it pins host memory); on a CPU mesh the "
                             "parameters already live in host memory: use cpu_offload=False")

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def dp_enabled(self) -> bool:
        """More than one rank sees different data (batch reductions run over `dp`)."""
        return self.dp_replicate * self.dp_shard * self.cp > 1

    @property
    def token_multiple(self) -> int:
        """Packed token counts must be a multiple of this (sequence parallel and Ulysses split T)."""
        return self.tp * self.cp

    def build_mesh(self, device_type: str | None = None) -> DeviceMesh:
        """Build every mesh this layout uses, keep them, and return the 5-D world mesh.

        Each view is unflattened from one 1-D world mesh, so none is sliced as a flattened dim of a
        root mesh (deprecated in torch): `dp_shard_cp` (FSDP shards over it: CP ranks hold the same
        parameters), `fsdp` (it, or `(dp_replicate, dp_shard_cp)` for HSDP), `dp`
        (`dp_replicate x dp_shard x cp`: loss and token-count reductions) and `batch`
        (`dp_replicate x dp_shard`: who gets which sequences). Call on every rank after
        `resolve`; the process group must be initialized.
        """
        if self.dp_shard == -1:
            raise ValueError("call ParallelDims.resolve(world_size) before build_mesh (dp_shard is still -1)")
        world = torch.distributed.get_world_size()
        if world != self.world_size:
            raise ValueError(f"the layout needs {self.world_size} ranks but the world size is {world}")
        device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        root = init_device_mesh(device_type, (world,), mesh_dim_names=("world",))
        full = root._unflatten(0, tuple(getattr(self, n) for n in DIM_NAMES), DIM_NAMES)
        dense = root._unflatten(0, (self.pp, self.dp_replicate, self.dp_shard * self.cp, self.tp),
                                ("pp", "dp_replicate", "dp_shard_cp", "tp"))
        reduce = root._unflatten(0, (self.pp, self.dp_replicate * self.dp_shard * self.cp, self.tp),
                                 ("pp", "dp", "tp"))
        data = root._unflatten(0, (self.pp, self.dp_replicate * self.dp_shard, self.cp, self.tp),
                               ("pp", "batch", "cp", "tp"))
        self._meshes = {name: full[name] for name in DIM_NAMES}
        self._meshes["world"] = full
        self._meshes["flat"] = root
        self._meshes["dp_shard_cp"] = dense["dp_shard_cp"]
        self._meshes["fsdp"] = dense["dp_replicate", "dp_shard_cp"] if self.dp_replicate > 1 else dense["dp_shard_cp"]
        self._meshes["dp"] = reduce["dp"]
        self._meshes["batch"] = data["batch"]
        if self.ep_enabled or self.tp_enabled:  # under TP the experts' FSDP mesh sums the TP ranks' tokens too
            moe = root._unflatten(0, (self.pp, self.dp_replicate, self.dp_shard * self.cp * self.tp // self.ep,
                                      self.ep), ("pp", "dp_replicate", "efsdp", "ep"))
            self._meshes["ep"] = moe["ep"]
            self._meshes["efsdp"] = moe["dp_replicate", "efsdp"] if self.dp_replicate > 1 else moe["efsdp"]
        return full

    def mesh(self, name: str) -> DeviceMesh:
        """One of the meshes built by `build_mesh`: a dim of `DIM_NAMES`, `dp_shard_cp`, `fsdp`, `dp`, `batch`,
        `world` (all five dims), `flat` (all ranks in one dim), and with ep > 1 `ep` and `efsdp` (the routed
        experts' FSDP mesh: `dp_shard*cp*tp/ep` ranks, or `(dp_replicate, efsdp)` for HSDP)."""
        if not self._meshes:
            raise ValueError("call dims.build_mesh() on every rank before asking for a mesh")
        if name not in self._meshes:
            raise KeyError(f"no mesh {name!r}; choose one of {sorted(self._meshes)}")
        return self._meshes[name]
