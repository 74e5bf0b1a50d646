"""DirectLaunch's driver structures (no GPU): the layouts of cuda.h's CUlaunchConfig and
CUlaunchAttribute, and when programmatic dependent launch is on (CPATTN_PDL)."""
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


def test_pdl_by_compute_capability_and_environment():
    """On by default on 9.0 only (where the GPU tests run it), forced on by CPATTN_PDL=1 where
    the GPU has it (9.0 on), off by CPATTN_PDL=0."""
    assert _core.pdl_for("", "90") and not _core.pdl_for("", "100") and not _core.pdl_for("", "120")
    assert _core.pdl_for("1", "100") and _core.pdl_for("1", "120") and not _core.pdl_for("1", "86")
    assert not _core.pdl_for("0", "90") and not _core.pdl_for("", "80")


def test_core_doctests():
    import doctest
    result = doctest.testmod(_core, extraglobs={"np": np})
    assert result.failed == 0 and result.attempted >= 3


def test_a_new_grid_reaches_the_launch_config():
    """Plans that reuse a launch set its grid (Launcher.set_grid): the driver's config follows."""
    launch = _core.DirectLaunch.__new__(_core.DirectLaunch)
    launch.extended = True
    launch._config = np.zeros((), _core.LAUNCH_CONFIG_DTYPE)
    launch.grid = (7,)
    assert launch.grid == (7, 1, 1) and launch._config["grid"].tolist() == [7, 1, 1]


def test_driver_functions_resolved_once(monkeypatch):
    """_driver.function resolves a name once per signature (here from the C library standing
    in for libcuda), with an int result and the given argument types."""
    import ctypes
    import ctypes.util
    from cpattn import _driver
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    _driver.function.cache_clear()
    try:
        fn = _driver.function("abs", ctypes.c_int)
        assert fn(-5) == 5 and fn.restype is ctypes.c_int and fn.argtypes == [ctypes.c_int]
        assert _driver.function("abs", ctypes.c_int) is fn
    finally:
        _driver.function.cache_clear()  # later callers resolve from libcuda
