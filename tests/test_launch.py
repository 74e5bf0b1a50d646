"""DirectLaunch's driver structures (no GPU): the layouts of cuda.h's CUlaunchConfig and
CUlaunchAttribute, and CPATTN_PDL=0."""
import numpy as np

from cpattn import _core


def test_launch_config_matches_cuda_h():
    """CUlaunchConfig: seven unsigned ints, the stream at 32 (aligned), the attribute pointer at
    40, their count at 48, 56 bytes; CUlaunchAttribute: the id, its 64-byte value at 8."""
    config = _core.LAUNCH_CONFIG_DTYPE
    offsets = {name: config.fields[name][1] for name in config.names}
    assert offsets == dict(grid=0, block=12, smem=24, stream=32, attrs=40, num_attrs=48)
    assert config.itemsize == 56
    attribute = _core.LAUNCH_ATTRIBUTE_DTYPE
    assert attribute.fields["value"][1] == 8 and attribute.itemsize == 8 + 64
    words = np.zeros((), config)
    words.reshape(1).view(np.uint64)[4] = 0xABCDEF  # where DirectLaunch writes the stream
    assert int(words["stream"]) == 0xABCDEF


def test_pdl_off_by_environment(monkeypatch):
    monkeypatch.setenv("CPATTN_PDL", "0")
    assert _core.dependent_launch() is False


def test_a_new_grid_reaches_the_launch_config():
    """Plans that reuse a launch set its grid (Launcher.set_grid): the driver's config follows."""
    launch = _core.DirectLaunch.__new__(_core.DirectLaunch)
    launch.dependent = True
    launch._config = np.zeros((), _core.LAUNCH_CONFIG_DTYPE)
    launch.grid = (7,)
    assert launch.grid == (7, 1, 1) and launch._config["grid"].tolist() == [7, 1, 1]
