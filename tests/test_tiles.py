"""Tile configurations and the choice between the mma.sync and wgmma prefill kernels (CPU)."""
import pytest

from cpattn import _core, _tiles

SMEM_PER_BLOCK = 227 * 1024  # the opt-in limit of an H100 / H200 block


@pytest.mark.parametrize("head_dim", _tiles.HEAD_DIMS)
def test_hopper_tiles_match_the_mma_sync_rows_and_fit(head_dim):
    hopper, ampere = _tiles.PREFILL_SM90[head_dim], _tiles.PREFILL[head_dim]
    # Same rows: a plan's GQA limit and query tiles do not depend on the path.
    assert hopper.rows == ampere.rows
    assert hopper.threads == 128 * (hopper.warpgroups + 1)  # a producer + the consumers
    assert hopper.smem_bytes(head_dim) <= SMEM_PER_BLOCK
    # wgmma's swizzled tiles start 1024-byte aligned: Q and every K / V stage are multiples.
    assert hopper.rows * head_dim * 2 % 1024 == 0 and hopper.tile * head_dim * 2 % 1024 == 0
    assert hopper.op == "batch_attention_sm90" and ampere.op == "batch_attention"
    assert hopper.targs("half", head_dim) in _tiles.hopper_variants()


def test_hopper_ctas_per_sm_are_its_launch_bounds():
    cfg = _tiles.HopperTileConfig(2, 128, 2, 1)
    assert _core.ctas_per_sm(cfg, 128) == 1
    assert _core.ctas_per_sm(_tiles.HopperTileConfig(1, 64, 3, 2), 128) == 2


def test_arch_path_override_needs_no_device(monkeypatch):
    monkeypatch.setenv("CPATTN_ARCH_PATH", "sm80")
    assert _core.hopper_path() is False
    monkeypatch.setenv("CPATTN_ARCH_PATH", "SM80")
    assert _core.hopper_path() is False
    assert _core.choose_tiles(128, 4, 4096) == _tiles.PREFILL[128]
    # Decode shapes take the decode tiles on every path.
    assert _core.choose_tiles(128, 4, 1) == _tiles.DECODE[128]
