"""The ``parallel_bridge_shm`` weight-transfer backend for vLLM's weight-transfer framework.

Serving side (:class:`SharedMemoryReceiver`, one per vLLM worker):
``init_transfer_engine`` checks the served model against the trainer's config
(every parameter this rank will receive, by name and shape) before anything is
sent. A round is two ``update_weights`` calls: ``stage`` reads this rank's rows
and columns of the published shards (:func:`~parallel_bridge.spec.slices.rank_parts`
over a :class:`~parallel_bridge.sync.shards.RoundReader`, a TensorStore), verifying each piece's
hash, into staging tensors, and writes a report; ``commit`` agrees over the
workers' group that every rank staged cleanly, then swaps the staged tensors in
and re-runs each layer's ``process_weights_after_loading`` (vLLM's CPU GEMM packs
the weight). If any rank failed, every rank drops its staging and raises: the
engine keeps serving the previous weights. The engine core runs these RPCs
between scheduler steps, so no forward pass sees a mix.

Trainer side: :class:`~parallel_bridge.sync.sender.SharedMemorySender`, built through
``WeightTransferTrainerFactory.trainer_init`` on every trainer rank.
Both are registered (lazily, by module path) by the package's vLLM plugin.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from parallel_bridge.errors import LayoutError, SyncError
from parallel_bridge.spec.model import GPTConfig
from parallel_bridge.spec.slices import VOCAB_PARAMS, ShapeStore, rank_parts
from parallel_bridge.sync.shards import BufferPool, RoundReader

logger = logging.getLogger(__name__)

BACKEND = "parallel_bridge_shm"
"""The name to select this backend: ``WeightTransferConfig(backend=BACKEND)``."""

@dataclasses.dataclass
class ShmInitInfo(WeightTransferInitInfo):
    root: str
    config: dict[str, Any]
    source_tp: int
    source_pp: int
    experts: list[int] | None = None
    """(EP, expert TP) of the trainer's expert shard files (an MoE model), else None."""


@dataclasses.dataclass
class ShmUpdateInfo(WeightTransferUpdateInfo):
    op: str
    version: int


def report_path(root: str | Path, version: int, rank: int) -> Path:
    return Path(root) / f"report_v{version}_rank{rank}.json"


def engine_path(root: str | Path, rank: int) -> Path:
    return Path(root) / f"engine_rank{rank}.json"


def serving_ranks(root: str | Path) -> list[int]:
    """The vLLM workers that initialized the backend for this session."""
    return sorted(json.loads(p.read_text())["rank"] for p in Path(root).glob("engine_rank*.json"))


class SharedMemoryReceiver(WeightTransferEngine[ShmInitInfo, ShmUpdateInfo]):
    """Receives a trainer's Megatron shards from shared memory into vLLM's own model of its family."""

    init_info_cls = ShmInitInfo
    update_info_cls = ShmUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.info: ShmInitInfo | None = None
        self.version = 0
        self._staged: list[tuple[str, torch.Tensor]] | None = None
        self._error: str | None = None
        self._staged_version = -1
        self._maps: dict[str, torch.Tensor] = {}
        self._pool = BufferPool()

    # ---------------------------------------------------------------- set-up
    def _rank(self) -> tuple[int, int, int]:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
        from vllm.distributed.parallel_state import get_world_group

        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size(), get_world_group().rank

    def _parts(self, shards: Any) -> list[tuple[str, torch.Tensor]]:
        from parallel_bridge.adapters.vllm import expert_parallel_of

        tp_rank, tp, _ = self._rank()
        idx = self.model.model.embed_tokens.shard_indices
        if not hasattr(self, "_ep"):  # the served model's expert layout, found once
            try:
                self._ep = expert_parallel_of(self.model)
            except LayoutError as e:
                raise SyncError(str(e)) from None
        return list(rank_parts(shards, tp, tp_rank, (idx.org_vocab_start_index, idx.org_vocab_end_index), self._ep))

    def init_transfer_engine(self, init_info: ShmInitInfo) -> None:
        from vllm.model_executor.models.llama import LlamaForCausalLM

        cfg = GPTConfig(**init_info.config)
        if not isinstance(self.model, LlamaForCausalLM) and type(self.model).__name__ != cfg.family.architecture:
            raise SyncError(
                f"the {BACKEND} backend fills vLLM's own model of the trainer's family ({cfg.family.architecture}, "
                f"or LlamaForCausalLM); this engine serves {type(self.model).__name__}"
            )
        expected = {name: tuple(t.shape) for name, t in self._parts(ShapeStore(cfg))}
        for name, shape in expected.items():
            held = self._param_shape(name)
            if held is None:
                raise SyncError(f"the served model has no parameter {name} (the trainer sends one)")
            if name in VOCAB_PARAMS:
                ok = held[1:] == shape[1:] and held[0] >= shape[0]
            else:
                ok = held == shape
            if not ok:
                raise SyncError(
                    f"tensor {name}: the trainer's model gives this serving rank {shape} but the served "
                    f"model holds {held}; the two models have different sizes"
                )
        hf = self.model_config.hf_config
        for field, want in (("rope_theta", cfg.rotary_base), ("rms_norm_eps", cfg.norm_epsilon)):
            have = getattr(hf, field, None)
            if have is None and field == "rope_theta":
                have = (getattr(hf, "rope_parameters", None) or {}).get("rope_theta")
            if have is not None and abs(float(have) - float(want)) > 1e-12 * max(1.0, abs(float(want))):
                raise SyncError(f"config {field}: the trainer's model has {want}, the served model {have}")
        self.info, self.expected = init_info, expected
        _, tp, world_rank = self._rank()
        engine_path(init_info.root, world_rank).write_text(json.dumps({"rank": world_rank, "tp": tp}))
        logger.info("weight transfer %s ready: %d tensors per round on this rank", BACKEND, len(self.expected))

    def _param_shape(self, name: str) -> tuple[int, ...] | None:
        module_name, _, attr = name.rpartition(".")
        try:
            module = self.model.get_submodule(module_name)
        except AttributeError:
            return None
        param = getattr(module, attr, None)
        if param is None:
            return None
        if param.numel() == 0:  # packed away on CPU (ReplicatedLinear, the MoE gate, names its sizes without a rank)
            out = getattr(module, "output_size_per_partition", getattr(module, "output_size", None))
            inp = getattr(module, "input_size_per_partition", getattr(module, "input_size", None))
            if out is not None and inp is not None:
                return (out, inp)
        return tuple(param.shape)

    # ---------------------------------------------------------------- rounds
    def start_weight_update(self) -> None:
        if self.info is None:
            raise SyncError(f"{BACKEND}: init_weight_transfer_engine was not called")
        self._staged, self._error = None, None

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.receive_weights(self.parse_update_info(update_info))  # CPU: nothing asynchronous to wait for

    def receive_weights(self, update_info: ShmUpdateInfo) -> None:
        if update_info.op == "stage":
            self._stage(update_info.version)
        elif update_info.op == "commit":
            self._commit(update_info.version)
        else:
            raise SyncError(f"{BACKEND}: unknown update op {update_info.op!r} (stage, commit)")

    def _stage(self, version: int) -> None:
        """Read and verify this rank's parts; errors are recorded (and reported), not raised."""
        assert self.info is not None
        start = time.perf_counter()
        _, _, world_rank = self._rank()
        reader = None
        try:
            self._pool.new_round()
            reader = RoundReader(
                self.info.root, version, self.info.source_tp, self.info.source_pp, self._maps, self._pool,
                experts=tuple(self.info.experts) if self.info.experts else None,
            )
            staged = self._parts(reader)
            for name, value in staged:
                if tuple(value.shape) != self.expected[name]:
                    raise SyncError(f"tensor {name}: received {tuple(value.shape)}, expected {self.expected[name]}")
            self._staged, self._staged_version = staged, version
        except Exception as e:  # noqa: BLE001 - reported to the trainer, then raised by commit
            self._error = f"{type(e).__name__}: {e}"
        report = {
            "rank": world_rank,
            "version": version,
            "ok": self._error is None,
            "error": self._error,
            "bytes": reader.received_bytes if reader else 0,
            "pieces_verified": reader.verified if reader else 0,
            "stage_seconds": time.perf_counter() - start,
        }
        self._report = report
        report_path(self.info.root, version, world_rank).write_text(json.dumps(report))

    def _commit(self, version: int) -> None:
        import torch.distributed as dist
        from vllm.distributed.parallel_state import get_world_group

        _, _, world_rank = self._rank()
        ok = self._error is None and self._staged is not None and self._staged_version == version
        group = get_world_group()
        if group.world_size > 1:
            flag = torch.tensor([1 if ok else 0])
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group.cpu_group)
            all_ok = bool(flag.item())
        else:
            all_ok = ok
        staged, self._staged = self._staged, None
        if not all_ok:
            why = self._error or "another serving rank failed to stage it"
            raise SyncError(
                f"weight round {version} aborted on serving rank {world_rank} ({why}); the engine keeps "
                f"serving version {self.version}"
            )
        start = time.perf_counter()
        self._apply(staged)
        self.version = version
        self._report["apply_seconds"] = time.perf_counter() - start
        report_path(self.info.root, version, world_rank).write_text(json.dumps(self._report))
        logger.info("weights version %d committed (%d tensors)", version, len(staged))

    @torch.no_grad()
    def _apply(self, staged: list[tuple[str, torch.Tensor]]) -> None:
        touched: set[int] = set()
        for name, value in staged:
            module_name, _, attr = name.rpartition(".")
            param = getattr(self.model.get_submodule(module_name), attr)
            if name in VOCAB_PARAMS:  # real rows first, vLLM's padding zero
                param.data[value.shape[0] :].zero_()
                param.data[: value.shape[0]].copy_(value)
            elif param.shape == value.shape:
                param.data.copy_(value)
            else:  # the CPU GEMM dispatch removed the weight after packing it: hand it the new one
                param.data = value
            touched.add(id(param))
        for module in self.model.modules():
            method = getattr(module, "quant_method", None)
            if method is not None and any(id(p) in touched for p in module.parameters(recurse=False)):
                _rebuild_cpu_moe_kernel(method)
                method.process_weights_after_loading(module)
        for name, value in staged:  # a receive buffer that became a live weight is not reused
            module_name, _, attr = name.rpartition(".")
            if getattr(self.model.get_submodule(module_name), attr).data_ptr() == value.data_ptr():
                self._pool.release(value)

    def finish_weight_update(self) -> None:
        """The staged weights went in at ``commit``; nothing is left to apply."""

    def shutdown(self) -> None:
        self._staged, self.info = None, None
        self._maps.clear()
        self._pool = BufferPool()


def _rebuild_cpu_moe_kernel(method: Any) -> None:
    """On the CPU, make vLLM set its fused-MoE kernel up again from the new weights, as at the first load.

    vLLM 0.32's ``UnquantizedFusedMoEMethod`` treats a second ``process_weights_after_loading`` as a weight update:
    it copies the new weights, in checkpoint layout, into the storage the CPU kernel had prepacked, and skips the
    prepacking, so the kernel computes with unpacked bytes as if packed (wrong tokens, no error; the vLLM #42821
    class, pinned in ``tests/test_upstream_bugs.py``). Forgetting the kernel makes it the first call again. GPUs keep
    vLLM's update path (no prepacking; CUDA graphs hold the parameters' addresses)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and getattr(method, "moe_kernel", None) is not None:
        method.moe_kernel = None


def register_weight_transfer() -> None:
    """Register the backend with vLLM's engine and trainer factories (idempotent, lazy)."""
    from vllm.distributed.weight_transfer.factory import (
        WeightTransferEngineFactory,
        WeightTransferTrainerFactory,
    )

    for factory, module, cls in (
        (WeightTransferEngineFactory, __name__, "SharedMemoryReceiver"),
        (WeightTransferTrainerFactory, "parallel_bridge.sync.sender", "SharedMemorySender"),
    ):
        try:
            factory.register_engine(BACKEND, module, cls)
        except ValueError as e:
            if "already registered" not in str(e):
                raise

