"""The weight sync's pieces that need no engine: the control plane's liveness, crashed trainers' leftovers,
the engine folder written from a spec, the transport's message tags."""

import json
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

from parallel_bridge.errors import ConfigError, SyncError  # noqa: E402
from parallel_bridge.serving.model_folder import engine_folder  # noqa: E402
from parallel_bridge.spec.model import GPTConfig  # noqa: E402
from parallel_bridge.sync.control import ControlPlane, trainer_alive  # noqa: E402
from parallel_bridge.sync.dist_group import tag  # noqa: E402
from parallel_bridge.sync.sender import sweep_dead_sessions  # noqa: E402
from parallel_bridge.testing import free_port  # noqa: E402

CFG = GPTConfig(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=256,
                vocab_size=90, max_position_embeddings=128)


def test_a_trainer_is_alive_while_its_store_answers():
    address = f"127.0.0.1:{free_port()}"
    plane = ControlPlane(address, "s1", host=True, timeout_s=5)
    assert trainer_alive(address, "s1")
    assert not trainer_alive(address, "other-session")  # the store answers, but for another session
    del plane
    assert not trainer_alive(f"127.0.0.1:{free_port()}", "s1", timeout_s=2)  # nobody listens: refused at once


def test_joining_a_store_nobody_listens_on_names_the_address():
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(SyncError, match=f"could not reach the trainer's weight-sync store at {address} within 1 s"):
        ControlPlane(address, "s", host=False, timeout_s=1)


def test_the_next_trainer_removes_what_a_crashed_one_left(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for name, pid in (("crashed", int(dead.stdout)), ("running", os.getpid())):
        (tmp_path / name).mkdir()
        (tmp_path / name / "shard_tp0_pp0.bin").write_bytes(b"\0" * 64)
        (tmp_path / name / "owner.json").write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    assert sweep_dead_sessions(tmp_path) == [tmp_path / "crashed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["running"]


def test_engine_folder_holds_the_trainers_config(tmp_path):
    out = engine_folder(CFG, tmp_path / "engine")
    back = GPTConfig.from_hf(json.loads((out / "config.json").read_text()))
    assert (back.hidden_size, back.num_query_groups, back.ffn_hidden_size, back.vocab_size) == (128, 2, 256, 90)
    with pytest.raises(ConfigError, match="holds no tokenizer files"):
        engine_folder(CFG, tmp_path / "e2", tokenizer=tmp_path / "engine")


def test_pieces_of_different_rounds_never_share_a_tag():
    assert tag(1, 0, 0) != tag(2, 0, 0) and tag(1, 0, 1) != tag(1, 0, 0) and tag(1, 1, 0) != tag(1, 0, 1)
    with pytest.raises(SyncError, match="pieces in one round"):
        tag(1, 1 << 19, 0)
