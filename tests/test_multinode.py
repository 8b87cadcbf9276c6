"""Two torchrun agents on this host as two nodes (c10d rendezvous), against one agent with all four ranks.

``--nnodes 2 --nproc-per-node 2``: the ParallelContext built from torchrun's environment keeps each TP group
inside a node (TP is the fastest axis, torchrun numbers ranks node by node) while DP and PP groups cross
nodes; megatron-core TP layers in a DeepSpeed ZeRO-1 step (TP=2 x DP=2) and a TP=2 x PP=2 pipeline give the
same numbers as the single-node run of the same job (bit for bit: the same ranks do the same sums over gloo),
and the pipeline's output matches the plain full-weight reference within the parity rule's value bound (fp32,
TP partial sums).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallel_bridge.numerics import parity
from parallel_bridge.testing import free_port

pytest.importorskip("deepspeed")
pytest.importorskip("megatron.core")

JOB = Path(__file__).with_name("_multinode_job.py")


def torchrun(out: Path, nnodes: int, port: int) -> list[subprocess.Popen]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={4 // nnodes}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=pb-{port}",
        "--max-restarts=0", str(JOB), str(out),
    ]
    return [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(nnodes)
    ]


def finish(agents: list[subprocess.Popen]) -> None:
    for a in agents:
        try:
            output, _ = a.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            for b in agents:
                b.kill()
            raise
        assert a.returncode == 0, output[-4000:]


def records(out: Path) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(4)]


@pytest.mark.slow
def test_two_nodes_match_one_node_and_keep_tp_inside_a_node(tmp_path, deepspeed_cpu_extension):
    import _megatron_block as blk

    finish(torchrun(tmp_path / "one", 1, free_port()))
    finish(torchrun(tmp_path / "two", 2, free_port()))
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert sorted(r["node"] for r in two) == [0, 0, 1, 1] and {r["node"] for r in one} == {0}
    for r in two:
        for layout in ("tp2dp2", "tp2pp2"):
            groups = r[layout]["groups"]
            assert len(set(groups["tp"])) == 1, (layout, groups)  # a TP group stays inside a node
        assert set(r["tp2dp2"]["groups"]["dp"]) == {0, 1}  # data parallelism crosses nodes
        assert set(r["tp2pp2"]["groups"]["pp"]) == {0, 1}  # so do pipeline stages
    for a, b in zip(one, two):
        assert a["tp2dp2"]["coords"] == b["tp2dp2"]["coords"]
        for name, p in a["tp2dp2"]["result"].items():
            assert torch.equal(p, b["tp2dp2"]["result"][name]), name
        if a["tp2pp2"]["result"] is not None:
            assert torch.equal(a["tp2pp2"]["result"], b["tp2pp2"]["result"])
    x = torch.randn(8, 2, 64, generator=torch.Generator().manual_seed(7))
    want = blk.reference_block(x, blk.full_weights(2), range(2))
    last = [r["tp2pp2"]["result"] for r in two if r["tp2pp2"]["result"] is not None]
    assert len(last) == 2  # both TP ranks of the last stage hold the (replicated) output
    for got in last:
        bound = parity.value_bound(want.abs().max().item(), blk.length(2, x.shape[0]))
        assert (got - want).abs().max().item() <= bound
