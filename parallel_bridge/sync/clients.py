"""Clients for vLLM's weight-sync control plane: an in-process ``vllm.LLM`` and a ``vllm serve`` server.

Both have the four methods of vLLM's ``VLLMWeightSyncClient`` protocol plus
``reset_prefix_cache``; the server client also pauses generation for a round.
"""

from __future__ import annotations

from typing import Any

from parallel_bridge.errors import IntegrationError


class LLMClient:
    """vLLM's weight-sync client protocol over an in-process ``vllm.LLM`` (whose methods take requests)."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def world_size(self) -> int:
        """The engine's workers (TP x PP): the ranks a weight round reaches."""
        return self.llm.llm_engine.vllm_config.parallel_config.world_size

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.finish_weight_update(weight_version=weight_version)

    def reset_prefix_cache(self) -> bool:
        return self.llm.reset_prefix_cache()


class ServerClient:
    """vLLM's weight-sync routes of a ``vllm serve`` server (started with ``VLLM_SERVER_DEV_MODE=1`` and
    ``--weight-transfer-config '{"backend": "parallel_bridge_shm"}'``), plus pause/resume and prefix-cache
    reset: in-flight requests finish on the old weights, new ones wait for the new."""

    def __init__(self, base_url: str, timeout_s: float = 300.0) -> None:
        from vllm.distributed.weight_transfer import HTTPVLLMWeightSyncClient

        self.http = HTTPVLLMWeightSyncClient(base_url, timeout=timeout_s)
        self.base_url, self.timeout_s = base_url.rstrip("/"), timeout_s

    def _post(self, path: str, **params: Any) -> dict[str, Any]:
        import requests

        r = requests.post(f"{self.base_url}/{path}", params=params, timeout=self.timeout_s)
        if r.status_code >= 400:
            raise IntegrationError(f"POST /{path}: HTTP {r.status_code} {r.text[-500:]}")
        return r.json() if r.content else {}

    def world_size(self) -> int:
        """The server's workers (TP x PP), from its ``/server_info`` (a dev-mode route, as the weight-sync ones)."""
        import requests

        r = requests.get(f"{self.base_url}/server_info", params={"config_format": "json"}, timeout=self.timeout_s)
        if r.status_code >= 400:
            raise IntegrationError(f"GET /server_info: HTTP {r.status_code} (start vllm serve with VLLM_SERVER_DEV_MODE=1)")
        parallel = r.json()["vllm_config"]["parallel_config"]
        return int(parallel.get("world_size") or parallel["tensor_parallel_size"] * parallel["pipeline_parallel_size"])

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.http.init_weight_transfer_engine(init_info)

    def pause(self) -> None:
        self._post("pause", mode="wait", clear_cache="false")

    def resume(self) -> None:
        self._post("resume")

    def start_weight_update(self) -> None:
        self.http.start_weight_update()

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.http.update_weights(update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.http.finish_weight_update(weight_version)

    def reset_prefix_cache(self) -> bool:
        return bool(self._post("reset_prefix_cache").get("success", False))
