"""Rank layouts: the pure functions agree with megatron-core's own RankGenerator at scale."""

import pytest

from parallel_bridge.parallel import layout


def _megatron_ps():
    """megatron-core's parallel_state, the oracle (its tests are skipped without it; the pure ones are not)."""
    return pytest.importorskip("megatron.core.parallel_state")


# (tp, cp, ep, dp, pp, order); world = tp*cp*dp*pp (ep splits inside dp*cp, see context.py)
CONFIGS = [
    (2, 1, 1, 2, 2, "tp-cp-ep-dp-pp"),
    (8, 2, 1, 16, 4, "tp-cp-ep-dp-pp"),  # 1024 ranks
    (4, 1, 1, 32, 8, "tp-pp-dp"),  # 1024 ranks, pp inside dp
    (8, 4, 1, 8, 16, "tp-cp-ep-dp-pp"),  # 4096 ranks
    (2, 2, 1, 3, 5, "tp-cp-dp-pp"),
    (8, 1, 1, 4, 2, "tp-cp-pp-dp"),  # vLLM's layout
]
TOKENS = ["tp", "pp", "dp", "cp", "tp-pp", "dp-cp", "tp-cp", "tp-dp", "tp-dp-cp"]


@pytest.mark.parametrize("tp,cp,ep,dp,pp,order", CONFIGS)
def test_rank_groups_equal_megatron_rank_generator(tp, cp, ep, dp, pp, order):
    gen = _megatron_ps().RankGenerator(tp=tp, ep=ep, dp=dp, pp=pp, cp=cp, order=order)
    sizes = {"tp": tp, "cp": cp, "ep": ep, "dp": dp, "pp": pp}
    for token in TOKENS:
        assert layout.rank_groups(sizes, order, token) == gen.get_ranks(token), token


@pytest.mark.parametrize("etp,ep,edp,pp", [(1, 8, 4, 4), (2, 4, 2, 8), (4, 2, 64, 2)])
def test_expert_rank_groups_equal_megatron(etp, ep, edp, pp):
    order = layout.MEGATRON_ORDER
    gen = _megatron_ps().RankGenerator(tp=etp, ep=ep, dp=edp, pp=pp, cp=1, order=order)
    sizes = {"tp": etp, "ep": ep, "dp": edp, "pp": pp}
    for token in ["ep", "tp", "dp", "tp-ep", "tp-ep-pp", "pp"]:
        assert layout.rank_groups(sizes, order, token) == gen.get_ranks(token), token


def test_coordinates_place_each_rank_in_its_groups():
    sizes = {"tp": 4, "cp": 2, "dp": 3, "pp": 2}
    order = "tp-cp-dp-pp"
    for axis in ("tp", "cp", "dp", "pp"):
        for group in layout.rank_groups(sizes, order, axis):
            # along one axis, the coordinate counts 0..n-1 and the others stay put
            coords = [layout.coordinates(r, sizes, order) for r in group]
            assert [c[axis] for c in coords] == list(range(sizes[axis]))
            others = {tuple(v for k, v in c.items() if k != axis) for c in coords}
            assert len(others) == 1


def test_every_rank_in_exactly_one_group_per_axis():
    sizes = {"tp": 8, "cp": 2, "dp": 8, "pp": 4}
    for axes in ("tp", "dp-cp", "tp-pp"):
        groups = layout.rank_groups(sizes, layout.MEGATRON_ORDER, axes)
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(512))


@pytest.mark.parametrize(
    "order,match",
    [
        ("", "non-empty"),
        ("tp-xp-dp", r"unknown axes \['xp'\]"),
        ("tp-tp-dp", r"\['tp'\] more than once"),
        ("tp--dp", r"unknown axes \[''\]"),
    ],
)
def test_malformed_order_is_named(order, match):
    with pytest.raises(ValueError, match=match):
        layout.parse_order(order)


def test_order_missing_a_used_axis():
    with pytest.raises(ValueError, match=r"leaves out \['pp'\], whose sizes are \[2\]"):
        layout.rank_groups({"tp": 2, "pp": 2}, "tp-dp", "tp")
