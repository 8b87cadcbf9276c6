"""The serving side of a weight round, whatever transport carries it: :class:`RoundReceiver`, vLLM's
worker-side ``WeightTransferEngine``, one per vLLM worker.

``init_transfer_engine`` checks the served model against the trainer's config (every parameter this rank will
receive, by name and shape) before anything is sent, refuses a second trainer while the one holding the
engine is alive (a dead one's session is taken over), and registers the worker in the trainer's control plane
(:mod:`~parallel_bridge.sync.control`) with the version it serves. A round is ``update_weights`` calls:
``stage`` makes this rank's rows and columns arrive (the transport's :meth:`RoundReceiver._arrive`: a
:class:`~parallel_bridge.sync.pieces.PieceReader` that :func:`~parallel_bridge.spec.slices.rank_parts` slices,
every piece verified against the sender's hashes) into staging tensors on the worker's device and posts a
report; the trainer then sends ``commit`` (swap the staged tensors in and re-run each layer's
``process_weights_after_loading``) to every engine only if every serving rank of every engine staged
cleanly, else ``abort``. The engine core runs these RPCs between scheduler steps, so no forward pass sees a mix.
"""

from __future__ import annotations

import dataclasses
import logging
import time
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
from parallel_bridge.sync.control import ControlPlane, trainer_alive
from parallel_bridge.sync.pieces import PieceReader
from parallel_bridge.sync.shards import BufferPool

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RoundInitInfo(WeightTransferInitInfo):
    store: str
    """HOST:PORT of the trainer's control plane."""
    session: str
    engine: int
    """This engine's index among the trainer's engines."""
    config: dict[str, Any]
    source_tp: int
    source_pp: int
    experts: list[int] | None = None
    """(EP, expert TP) of the trainer's expert shards (an MoE model), else None."""
    timeout_s: float = 300.0
    replaces: str = ""
    """The session this one replaces (the same trainer setting its transport up again after a failure)."""


@dataclasses.dataclass
class RoundUpdateInfo(WeightTransferUpdateInfo):
    op: str
    """stage, commit or abort."""
    round: int
    version: int = 0
    """The weights' version once committed (versions count commits)."""


class RoundReceiver(WeightTransferEngine):
    """Receives a trainer's Megatron shards into vLLM's own model of its family; the transport says how
    pieces arrive (:meth:`_arrive`) and what a worker registers beyond its rank (:meth:`_connect`)."""

    backend = ""
    init_info_cls = RoundInitInfo
    update_info_cls = RoundUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.info: Any = None
        self.version = 0
        self.control: ControlPlane | None = None
        self._staged: list[tuple[str, torch.Tensor]] | None = None
        self._staged_round = -1
        self._pool = BufferPool(device)

    # ---------------------------------------------------------------- set-up
    def _rank(self) -> tuple[int, int, int]:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
        from vllm.distributed.parallel_state import get_world_group

        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size(), get_world_group().rank

    def _parts(self, store: Any) -> list[tuple[str, torch.Tensor]]:
        from parallel_bridge.adapters.vllm import expert_parallel_of

        tp_rank, tp, _ = self._rank()
        idx = self.model.model.embed_tokens.shard_indices
        if not hasattr(self, "_ep"):  # the served model's expert layout, found once
            try:
                self._ep = expert_parallel_of(self.model)
            except LayoutError as e:
                raise SyncError(str(e)) from None
        return list(rank_parts(store, tp, tp_rank, (idx.org_vocab_start_index, idx.org_vocab_end_index), self._ep))

    def init_transfer_engine(self, init_info: Any) -> None:
        control = ControlPlane(init_info.store, init_info.session, host=False, timeout_s=init_info.timeout_s)
        try:
            self._attach(init_info, control)
        except Exception as e:  # the reason reaches the trainer through its store (an HTTP 500 carries none)
            control.set(f"engine{init_info.engine}/error", f"{type(e).__name__}: {e}")
            raise

    def _attach(self, init_info: Any, control: ControlPlane) -> None:
        cfg = GPTConfig(**init_info.config)
        expected = self._check_model(cfg)  # a model of other sizes is named first, whoever holds the engine
        if self.info is not None and self.info.session != init_info.session:
            if init_info.replaces != self.info.session and trainer_alive(self.info.store, self.info.session):
                raise SyncError(
                    f"this engine's weights are held by another trainer (weight-sync session {self.info.session}, "
                    f"store {self.info.store}), which is still running: close that WeightSync (or stop that "
                    f"trainer) first; one engine takes weights from one trainer"
                )
            logger.info("trainer session %s is gone: session %s takes over at version %d",
                        self.info.session, init_info.session, self.version)
            self.shutdown()
        self.expected, self.info, self.control = expected, init_info, control
        extra = self._connect(init_info)
        _, tp, world_rank = self._rank()
        self.control.set(self.control.worker_key(init_info.engine, world_rank),
                         {"rank": world_rank, "tp": tp, "version": self.version, **extra})
        self.control.store.add(self.control.key(f"engine{init_info.engine}/workers"), 1)
        logger.info("weight transfer %s ready: %d tensors per round on this rank", self.backend, len(self.expected))

    def _connect(self, init_info: Any) -> dict[str, Any]:
        """Join the transport; what this worker registers beyond its rank (e.g. the pieces it needs)."""
        return {}

    def _check_model(self, cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
        """Every tensor this rank receives, by vLLM name and shape, checked against the served model."""
        from vllm.model_executor.models.llama import LlamaForCausalLM

        if not isinstance(self.model, LlamaForCausalLM) and type(self.model).__name__ != cfg.family.architecture:
            raise SyncError(
                f"the {self.backend} backend fills vLLM's own model of the trainer's family "
                f"({cfg.family.architecture}, or LlamaForCausalLM); this engine serves {type(self.model).__name__}"
            )
        expected = {name: tuple(t.shape) for name, t in self._parts(ShapeStore(cfg))}
        for name, shape in expected.items():
            held = self._param_shape(name)
            if held is None:
                raise SyncError(f"the served model has no parameter {name} (the trainer sends one)")
            ok = held[1:] == shape[1:] and held[0] >= shape[0] if name in VOCAB_PARAMS else held == shape
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
        return expected

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
            raise SyncError(f"{self.backend}: init_weight_transfer_engine was not called")
        self._staged = None

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.receive_weights(self.parse_update_info(update_info))
        if torch.accelerator.is_available():  # what vLLM's base class does: asynchronous copies land first
            torch.accelerator.synchronize()

    def receive_weights(self, update_info: RoundUpdateInfo) -> None:
        if update_info.op == "stage":
            self._stage(update_info.round)
        elif update_info.op == "commit":
            self._commit(update_info.round, update_info.version)
        elif update_info.op == "abort":
            self._staged = None
        else:
            raise SyncError(f"{self.backend}: unknown update op {update_info.op!r} (stage, commit, abort)")

    def _arrive(self, round_id: int) -> PieceReader:
        """This round's shards as a store this rank's parts are read from (the transport's part)."""
        raise NotImplementedError

    def _stage(self, round_id: int) -> None:
        """Make this rank's parts arrive and verify them; the report (an error too) goes to the trainer."""
        start = time.perf_counter()
        _, _, world_rank = self._rank()
        reader, error = None, None
        try:
            self._pool.new_round()
            reader = self._arrive(round_id)
            staged = self._parts(reader)
            for name, value in staged:
                if tuple(value.shape) != self.expected[name]:
                    raise SyncError(f"tensor {name}: received {tuple(value.shape)}, expected {self.expected[name]}")
            self._staged, self._staged_round = staged, round_id
        except Exception as e:  # noqa: BLE001 - reported to the trainer, then raised
            error = f"{type(e).__name__}: {e}"
            self._staged = None
        report = {
            "rank": world_rank, "round": round_id, "ok": error is None, "error": error,
            "bytes": reader.received_bytes if reader else 0, "pieces_verified": reader.verified if reader else 0,
            "stage_seconds": time.perf_counter() - start,
        }
        # reported, not raised: the trainer reads every report and aborts the round everywhere (a raise here would
        # leave the other workers' replies queued in vLLM's executor, answering the next call)
        try:
            self.control.set(self.control.report_key(round_id, self.info.engine, world_rank), report)
        except Exception as e:  # noqa: BLE001 - the trainer is unreachable: it finds no report and aborts
            logger.warning("weight round %d: the report could not reach the trainer (%s)", round_id, e)

    def _commit(self, round_id: int, version: int) -> None:
        _, _, world_rank = self._rank()
        staged, self._staged = self._staged, None
        if staged is None or self._staged_round != round_id:
            raise SyncError(f"weight round {round_id}: serving rank {world_rank} has nothing staged for it; the "
                            f"engine keeps serving version {self.version}")
        start = time.perf_counter()
        self._apply(staged)
        self.version = version
        self.control.set(self.control.report_key(round_id, self.info.engine, world_rank) + "/applied",
                         {"apply_seconds": time.perf_counter() - start, "version": version})
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
        self._staged, self.info, self.control = None, None, None
        self._pool = BufferPool(self.device)


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
