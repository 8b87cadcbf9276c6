"""torch.save archives read in place (parallel_bridge.checkpoint.archive): every box of every dtype equals
torch.load's tensor exactly (bytes are copied, never computed on), each record's CRC-32 is checked in the read,
and a damaged or truncated file is refused naming the file and the record."""

from __future__ import annotations

import argparse
import zipfile

import pytest
import torch

from parallel_bridge.checkpoint import archive
from parallel_bridge.checkpoint.archive import Archive, StoredTensor
from parallel_bridge.errors import CheckpointError


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    big = torch.randn(40, 24, generator=g)
    return {
        "model": {
            "w": torch.randn(37, 19, generator=g),
            "bf16": torch.randn(33, 8, generator=g).to(torch.bfloat16),
            "ids": torch.arange(50, dtype=torch.int64),
            "scalar": torch.tensor(3.5),
            "view": big[5:12],  # torch.save keeps the whole storage: the tensor starts inside its record
            "param": torch.nn.Parameter(torch.randn(6, 32, generator=g)),
        },
        "args": argparse.Namespace(hidden_size=24, num_layers=2),
        "optimizer": {"exp_avg": torch.randn(1000, generator=g)},
    }


@pytest.fixture()
def saved(tmp_path):
    path = tmp_path / "model_optim_rng.pt"
    state = _state()
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("block", [archive.BLOCK, 96])  # 96 bytes: many blocks, rows split across them
def test_every_box_equals_torch_load(saved, monkeypatch, block):
    monkeypatch.setattr(archive, "BLOCK", block)
    path, state = saved
    objects = Archive(path).objects()
    assert objects["args"].hidden_size == 24
    for name, want in state["model"].items():
        stored = objects["model"][name]
        assert isinstance(stored, StoredTensor) and stored.shape == want.shape and stored.dtype == want.dtype
        assert torch.equal(stored.read(), want.detach()), name
    w, stored = state["model"]["w"], Archive(path).objects()["model"]["w"]
    rows, cols, both = torch.empty(9, 19), torch.empty(37, 5), torch.empty(20, 7)[:, 1:6]
    stored.record.archive.read_boxes(stored, [([3, 0], [9, 19], rows), ([0, 14], [37, 5], cols),
                                              ([11, 2], [20, 5], both)])
    assert torch.equal(rows, w[3:12]) and torch.equal(cols, w[:, 14:]) and torch.equal(both, w[11:31, 2:7])
    again = torch.empty(4, 19)  # a verified record: only its rows are read
    stored.record.archive.read_boxes(stored, [([30, 0], [4, 19], again)])
    assert torch.equal(again, w[30:34])


def _flip(path, record_name: str, at: int = 7) -> None:
    arch = Archive(path)
    offset = arch.records[record_name].offset + at
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_named_with_its_record(saved):
    path, _ = saved
    objects = Archive(path).objects()
    record = objects["model"]["w"].record.name
    _flip(path, record)
    stored = Archive(path).objects()["model"]
    assert torch.equal(stored["ids"].read(), torch.arange(50))  # other records still read
    with pytest.raises(CheckpointError, match=rf"shard file {path}: record {record} fails its CRC-32 check"):
        stored["w"].read()
    with pytest.raises(CheckpointError, match="fails its CRC-32 check"):  # a slice of it too
        stored["w"].record.archive.read_boxes(stored["w"], [([0, 0], [1, 19], torch.empty(1, 19))])


def test_a_damaged_pickle_is_refused_at_open(saved):
    path, _ = saved
    _flip(path, Archive(path).prefix + "data.pkl", at=20)
    with pytest.raises(CheckpointError, match=r"record .*data.pkl fails its CRC-32 check"):
        Archive(path).objects()


def test_truncation_names_the_file_and_the_record(tmp_path, saved):
    path, _ = saved
    arch = Archive(path)
    last = max(arch.records.values(), key=lambda r: r.offset)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: last.offset + 2])  # the zip directory is gone with the tail
    with pytest.raises(CheckpointError, match=rf"shard file {cut} cannot be read .*damaged or truncated"):
        Archive(cut)
    # an archive inside a bigger file (a DCP record) whose record runs past the end of the file
    with pytest.raises(CheckpointError, match=r"is truncated: the file has \d+ bytes, the record needs"):
        Archive(path, 0, path.stat().st_size + 10)


def test_a_record_the_directory_places_past_its_end_is_named(tmp_path):
    path = tmp_path / "t.pt"
    torch.save(torch.arange(64, dtype=torch.float32), path)
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data/0"))
    data = bytearray(path.read_bytes())
    info_at = data.rfind(info.filename.encode()) - 46  # its central directory entry
    size_at = info_at + 24  # uncompressed size
    data[size_at:size_at + 4] = (10**6).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"is truncated: record {info.filename} needs bytes up to"):
        Archive(path)


def test_nothing_the_pickle_names_runs(tmp_path):
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    path = tmp_path / "evil.pt"
    torch.save({"x": torch.ones(2), "evil": Evil()}, path, pickle_module=pickle)
    objects = Archive(path).objects()
    assert not (tmp_path / "ran").exists() and "system" in repr(objects["evil"])
    assert torch.equal(objects["x"].read(), torch.ones(2))


# ------------------------------------------------------------------ legacy per-rank files read in place
@pytest.mark.parametrize("source_tp", [1, 2])
def test_legacy_reads_equal_the_merged_shards(tmp_path, source_tp):
    """Legacy rank files written from known full tensors (each kind sharded by its own rule, optimizer state
    beside the model): every full read, range and serving rank's part equals the full tensor's, exactly."""
    import dataclasses
    import json

    from parallel_bridge.checkpoint.megatron_reader import MegatronCheckpoint
    from parallel_bridge.spec import schema
    from parallel_bridge.spec.model import CONFIG_FILE, GPTConfig
    from parallel_bridge.spec.slices import rank_parts

    spec = GPTConfig(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=256,
                     vocab_size=256, padded_vocab_size=256, tie_embeddings=False)
    g = torch.Generator().manual_seed(1)
    full = {name: torch.randn(shape, generator=g) for name, shape in schema.expected_shapes(spec).items()}
    for t in range(source_tp):
        folder = tmp_path / "iter_0000001" / f"mp_rank_{t:02d}"
        folder.mkdir(parents=True)
        model = {n: schema.sharding_of(n).shard(n, x, source_tp, t).clone() for n, x in full.items()}
        torch.save({"model": model, "optimizer": {"m": torch.randn(300, generator=g)}, "iteration": 1},
                   folder / "model_optim_rng.pt")
    (tmp_path / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(spec)))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("1")
    ckpt = MegatronCheckpoint.open(tmp_path)
    assert ckpt.format == "torch" and ckpt.source_tp == source_tp
    for name, want in full.items():
        assert torch.equal(ckpt.read(name), want), name
        for dim in range(want.dim()):
            n = want.shape[dim]
            assert torch.equal(ckpt.read(name, dim, n // 4, n // 2), want.narrow(dim, n // 4, n // 2)), (name, dim)
        rows = [(1, 3), (want.shape[0] // 2, want.shape[0] // 2 - 1)]
        assert torch.equal(ckpt.read_rows(name, rows), torch.cat([want[a:a + n] for a, n in rows])), name

    class Full:  # the same tensors in memory: what every store must serve
        config = spec

        def shape(self, name):
            return tuple(full[name].shape)

        def read(self, name, dim=None, start=0, length=None):
            return full[name] if dim is None else full[name].narrow(dim, start, length)

        def read_rows(self, name, index):
            return torch.cat([full[name][a:a + n] for a, n in index])

    for tp in (1, 2, 4):
        for rank in range(tp):
            mine, want = dict(rank_parts(ckpt, tp, rank)), dict(rank_parts(Full(), tp, rank))
            assert mine.keys() == want.keys() and all(torch.equal(mine[k], want[k]) for k in want), (tp, rank)
