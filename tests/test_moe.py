"""Mixtures of experts (Mixtral, Qwen3-MoE): megatron-core's own saves at expert parallelism served by vLLM and
exported, every expert proven present and in its place.

- The reader's tensors equal, bit for bit, those megatron-core's own ``dist_checkpointing.load`` puts in a model
  built at TP=1, EP=1 (it reshards the expert axis itself): no expert lost, duplicated or swapped.
- Served by vLLM's own ``MixtralForCausalLM`` / ``Qwen3MoeForCausalLM`` (its CPU fused-MoE kernel, experts split
  by TP) at TP=1 and TP=2: the full first-step log-softmax within the parity rule's bound of megatron-core's
  forward (max and mean; an MoE layer sums top-k experts' columns), 4 greedy tokens equal.
- The check can fail: two experts swapped, or one duplicated, moves megatron-core's own output far past the
  bound. Routing near-ties would flip a top-k choice under fp32 noise: the smallest router margin over every
  token and layer is asserted far above it (seeds chosen so).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallel_bridge.checkpoint.megatron_reader import MegatronCheckpoint
from parallel_bridge.numerics import parity
from parallel_bridge.testing import run_distributed

pytest.importorskip("vllm")
pytest.importorskip("megatron.core")

import _megatron_ckpt as mc  # noqa: E402
from _helpers import OnDemand, first_step_and_tokens, hf_decode  # noqa: E402
from _helpers import compare as compare_within  # noqa: E402

FAMILIES = {
    # Mixtral: 4 experts, top-2 (softmax over the chosen), GQA (2 kv heads)
    "mixtral": {"groups": 2, "tied": False, "vocab": 128, "padded": 128, "seed": 21,
                "config": {"num_moe_experts": 4, "moe_router_topk": 2}},
    # Qwen3-MoE: 8 small experts, top-2 with norm_topk_prob, QK layernorm
    "qwen3_moe": {"groups": 2, "tied": False, "vocab": 128, "padded": 128, "seed": 24,
                  "config": {"num_moe_experts": 8, "moe_router_topk": 2, "moe_ffn_hidden_size": 64,
                             "qk_layernorm": True}},
}
LAYOUTS = {"ep2": (1, 1, 2, 1), "tp2_ep2_etp2": (2, 1, 2, 2), "pp2_ep2": (1, 2, 2, 1), "legacy_tp2_ep2": (2, 1, 2, 2),
           "per_layer_ep2": (1, 1, 2, 1), "tp2_ep2_etp1": (2, 1, 2, 1)}
"""Saving layout -> (tp, pp, ep, etp) of the torchrun job that wrote it (torch_dist, but legacy_* Megatron-LM's
per-rank files; per_layer_* saved with ``moe_layer_freq`` a per-layer list, so megatron-core writes per-layer
keys ``decoder.layers.{i}.mlp...`` instead of a stacked layer axis, as for DeepSeek-V3's first dense layers)."""


def _variant(family, layout):
    v = FAMILIES[family]
    return {**v, "megatron": {"moe_layer_freq": [1] * mc.SIZES["num_layers"]}} if layout.startswith("per_layer") else v
MARGIN = 1e-3
"""Smallest router-logit margin between the k-th and (k+1)-th expert accepted: 1000x fp32's noise on these logits."""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(family, layout) -> (folder megatron-core wrote under torchrun, megatron-core's own reading of it)."""
    root = tmp_path_factory.mktemp("moe")

    def write(key):
        family, layout = key
        (tp, pp, ep, etp), folder, v = LAYOUTS[layout], root / f"{family}_{layout}", _variant(family, layout)
        if layout.startswith("legacy"):
            run_distributed(mc.save_legacy, tp * ep, str(folder), tp, v, ep, timeout_s=300)
            dist = root / f"{family}_{layout}_as_dist"  # megatron-core's own reading needs its own format
            run_distributed(mc.save_dist, tp * ep, str(dist), tp, 1, v, ep, etp, timeout_s=300)
            return folder, run_distributed(mc.moe_reference, 1, str(dist), v, timeout_s=300)[0]
        run_distributed(mc.save_dist, tp * pp * ep, str(folder), tp, pp, v, ep, etp, timeout_s=300)
        return folder, run_distributed(mc.moe_reference, 1, str(folder), v, timeout_s=300)[0]

    return OnDemand(write)


def length(family):
    return mc.length(FAMILIES[family])


KEYS = [("mixtral", layout) for layout in LAYOUTS] + [("qwen3_moe", "ep2"), ("qwen3_moe", "tp2_ep2_etp2")]
"""Every layout for Mixtral, the two torch_dist ones at PP=1 for Qwen3-MoE (its kinds read the same rows)."""


@pytest.mark.slow
@pytest.mark.parametrize("key", KEYS, ids=[f"{f}-{layout}" for f, layout in KEYS])
def test_every_expert_present_and_in_place(checkpoints, key):
    """Every tensor the reader gives equals megatron-core's own load of the checkpoint, bit for bit, and the
    checkpoint says what saved it (inspect's experts, top-k, EP and expert TP)."""
    folder, ref = checkpoints[key]
    ckpt = MegatronCheckpoint.open(folder)
    assert set(ckpt.tensors) == set(ref["tensors"])
    for name, tensor in ref["tensors"].items():
        assert torch.equal(ckpt.read(name), tensor), name
    tp, pp, ep, etp = LAYOUTS[key[1]]
    described = ckpt.describe()
    cfg = FAMILIES[key[0]]["config"]
    assert (described["experts"], described["router_topk"]) == (cfg["num_moe_experts"], cfg["moe_router_topk"])
    assert (described["source_tp"], described["source_pp"], described["source_ep"], described["source_etp"]) == (
        tp, pp, ep, etp)
    assert described["format"] == ("torch" if key[1].startswith("legacy") else "torch_dist")
    if key[1].startswith("per_layer"):  # megatron-core wrote per-layer expert keys, not a stacked layer axis
        stored = set(ckpt.metadata.state_dict_metadata)
        assert "decoder.layers.1.mlp.experts.experts.linear_fc1.weight" in stored, sorted(stored)[:8]
    assert ckpt.config.family.model_type == key[0]


@pytest.mark.slow
@pytest.mark.parametrize("key", KEYS, ids=[f"{f}-{layout}" for f, layout in KEYS])
def test_a_swapped_or_duplicated_expert_cannot_pass(checkpoints, key):
    """Swapping layer 0's experts 0 and 1, or making 1 a copy of 0, moves megatron-core's own output at least
    ten times past the bound the serving tests use; and no token's route is within fp32 noise of a flip."""
    _, ref = checkpoints[key]
    assert ref["margin"] > MARGIN, f"router near-tie: margin {ref['margin']:.2e}; choose another seed"
    zmax = max(r[2] for r in ref["reference"])
    bound = parity.logprob_bound(zmax, length(key[0]))
    for what in ("swapped", "duplicated"):
        gap = parity.Gap.between([r[1] for r in ref[what]], [r[1] for r in ref["reference"]])
        print(f"\n[{key}] expert {what}: max {gap.max:.2e} vs bound {bound.max:.2e}; margin {ref['margin']:.2e}")
        assert gap.max > 10 * bound.max, (what, gap.max, bound.max)


SERVED = [pytest.param("mixtral", "ep2", 1, marks=pytest.mark.parity), ("mixtral", "tp2_ep2_etp2", 2),
          ("mixtral", "pp2_ep2", 2), ("mixtral", "legacy_tp2_ep2", 1), ("mixtral", "per_layer_ep2", 2),
          ("qwen3_moe", "tp2_ep2_etp2", 1), ("qwen3_moe", "ep2", 2)]
"""(family, saving layout, serving TP): each family at both serving TPs, each layout served."""


@pytest.mark.slow
@pytest.mark.parametrize("family,layout,tp", SERVED)
def test_vllm_serves_moe_checkpoint(checkpoints, family, layout, tp, monkeypatch):
    if tp == 2:
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    folder, ref = checkpoints[(family, layout)]
    served = first_step_and_tokens(folder, tp, FAMILIES[family]["vocab"], mc.PROMPTS, mc.STEPS,
                                   load_format="megatron", config_format="megatron")
    compare_within(served, ref["reference"], f"{family} saved at {layout}, served at TP={tp}", length(family))


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    """(family, layout) -> the Hugging Face folder ``convert --to hf`` wrote from megatron-core's save."""
    from parallel_bridge.checkpoint.hf_export import export_hf

    root = tmp_path_factory.mktemp("moe_hf")
    return OnDemand(lambda key: export_hf(MegatronCheckpoint.open(checkpoints[key][0]), root / "_".join(key)))


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers_loads_the_moe_export(checkpoints, exported, family):
    """Exported from the TP=2, EP=2, ETP=2 save: transformers' own class of the family loads it (every expert's
    w1/w3/w2 or gate/up/down_proj in place) and matches megatron-core's forward."""
    import transformers

    key = (family, "tp2_ep2_etp2")
    folder = exported[key]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [{"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[family]]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    decoded = hf_decode(model, mc.PROMPTS, mc.STEPS, FAMILIES[family]["vocab"])
    compare_within(decoded, checkpoints[key][1]["reference"], f"{family} exported, transformers", length(family))


@pytest.mark.slow
def test_stock_vllm_serves_the_moe_export(checkpoints, exported):
    """vLLM's own loader (safetensors, no bridge code) serves the Qwen3-MoE export like the Megatron save."""
    key = ("qwen3_moe", "ep2")
    served = first_step_and_tokens(exported[key], 1, FAMILIES["qwen3_moe"]["vocab"], mc.PROMPTS, mc.STEPS)
    compare_within(served, checkpoints[key][1]["reference"], "qwen3_moe exported, stock vLLM", length("qwen3_moe"))


class _Counting:
    """A store that counts the bytes each read returns (what a serving rank reads of the checkpoint)."""

    def __init__(self, store):
        self.store, self.config, self.bytes = store, store.config, 0

    def shape(self, name):
        return self.store.shape(name)

    def read(self, name, dim=None, start=0, length=None):
        t = self.store.read(name, dim, start, length)
        self.bytes += t.numel() * t.element_size()
        return t

    def read_rows(self, name, index):
        return torch.cat([self.read(name, 0, s, n) for s, n in index])


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_serving_rank_reads_only_its_experts_and_slices(checkpoints, family):
    """TP=2 serving: each rank reads half of every expert (its ffn columns); expert-parallel serving (EP=2, the
    GPU path): each rank reads half the experts whole, the two halves disjoint and complete; the stacked tensors
    equal the experts read directly."""
    from parallel_bridge.spec.slices import rank_parts

    ckpt = MegatronCheckpoint.open(checkpoints[(family, "ep2")][0])
    cfg = ckpt.config
    expert_bytes = sum(math.prod(ckpt.shape(n)) * 4 for n in ckpt.tensors if ".local_experts." in n)
    for layout in ({"tp": 2}, {"ep": 2}):
        seen = []
        for rank in range(2):
            store = _Counting(ckpt)
            tp, ep = (2, None) if "tp" in layout else (1, (2, rank))
            parts = dict(rank_parts(store, tp, 0 if ep else rank, None, ep))
            experts = {k: v for k, v in parts.items() if ".experts." in k}
            assert sum(v.numel() * 4 for v in experts.values()) == expert_bytes // 2, layout
            w13 = experts[f"model.layers.1.{'block_sparse_moe' if family == 'mixtral' else 'mlp'}.experts."
                          "routed_experts.w13_weight"]
            assert w13.shape[0] == (cfg.num_moe_experts if ep is None else cfg.num_moe_experts // 2)
            if ep is not None:
                first = rank * cfg.num_moe_experts // 2
                whole = torch.stack([ckpt.read(f"decoder.layers.1.mlp.experts.local_experts.{e}.linear_fc1.weight")
                                     for e in range(first, first + w13.shape[0])])
                assert torch.equal(w13, whole)
                seen += list(range(first, first + w13.shape[0]))
            dense = store.bytes - expert_bytes // 2
            assert dense > 0
        if seen:
            assert sorted(seen) == list(range(cfg.num_moe_experts))


@pytest.mark.slow
def test_expert_parallel_serving_is_refused_on_the_cpu(checkpoints, tmp_path):
    """vLLM's CPU kernel cannot serve experts expert-parallel (tests/test_upstream_bugs.py): the megatron loader
    refuses it by name before any expert is loaded, rather than letting a worker die."""
    folder, _ = checkpoints[("mixtral", "ep2")]
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from _helpers import greedy; "
              f"greedy({str(folder)!r}, 2, [[5, 17]], 1, in_process=False, enable_expert_parallel=True, "
              "load_format='megatron', config_format='megatron')")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=400,
                          env={**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    logs = proc.stdout + proc.stderr  # the workers log to stdout
    assert proc.returncode != 0
    assert "expert-parallel serving (enable_expert_parallel=True) is refused" in logs, logs[-2000:]
    assert "cpu_fused_moe.cpp:242" in logs and "died unexpectedly" not in logs


@pytest.mark.slow
def test_inspect_shows_experts_topk_and_the_expert_layout(checkpoints, capsys):
    from parallel_bridge.cli.main import main

    assert main(["inspect", str(checkpoints[("mixtral", "tp2_ep2_etp2")][0])]) == 0
    out = capsys.readouterr().out
    assert "source      tp=2 pp=1 ep=2 expert tp=2" in out, out
    assert "experts     4 per layer, top-2 (top-k, softmax over the chosen), expert ffn 256" in out, out
