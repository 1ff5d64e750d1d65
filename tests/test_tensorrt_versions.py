"""TensorRT 10 and 11: what the plan builder calls on each, checked against the real Python bindings.

No TensorRT library can be installed here, so the builder runs against a stand-in module that
records every name the code asks of it (attributes, methods, keyword arguments). The names are
then looked up in the `tensorrt_bindings/tensorrt.so` of NVIDIA's bindings wheel, read as bytes
without importing it (importing needs libnvinfer): pybind11 keeps every name it registers as a
NUL-terminated string, which the linker may store as the tail of a longer one ("Logger" inside
"ILogger"), so a name is registered when its bytes followed by NUL occur in the object.

The dev extra installs `tensorrt-cu12-bindings` (TensorRT 11) on x86-64 Linux; the test skips
where it is absent. EE_TENSORRT_BINDINGS adds other unpacked `tensorrt_bindings` directories
(os.pathsep-separated), e.g. a 10.x wheel's, to check both releases in one run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

from common.manifest import TensorSpec
from export.tensorrt_build import TENSORRT_RELEASES, EngineSettings, TensorRTPlanBuilder, tensorrt_release


class Recorder:
    """Stands in for the tensorrt module and everything it returns; records the names used."""

    def __init__(self, names: set[str], values: dict | None = None, results: dict | None = None,
                 called: str = "") -> None:
        object.__setattr__(self, "_names", names)
        object.__setattr__(self, "_values", values or {})
        object.__setattr__(self, "_results", results or {})
        object.__setattr__(self, "_called", called)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        self._names.add(name)
        if name in self._values:
            return self._values[name]
        return Recorder(self._names, self._values, self._results, name)

    def __call__(self, *args, **kwargs):
        self._names.update(kwargs)
        if self._called in self._results:
            return self._results[self._called]
        return Recorder(self._names, self._values, self._results, self._called)

    def __bytes__(self) -> bytes:
        return b"engine"


def _run_builder(monkeypatch, version: str, parse_ok: bool = True, capability=(9, 0)):
    """The names the builder asks of TensorRT `version` for one fp16 build, and what it logged."""
    torch = pytest.importorskip("torch")
    names: set[str] = set()
    module = Recorder(names, values={"num_errors": 1}, results={"parse": parse_ok})
    object.__setattr__(module, "__version__", version)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: capability)
    logged: list[str] = []
    builder = TensorRTPlanBuilder(EngineSettings(precision="fp16", timing_cache=None), log=logged.append)
    plan = builder(b"onnx", TensorSpec("images", [3, 32, 32]), "m_exit15")
    return names, logged, plan, builder


@pytest.mark.parametrize("version", ["10.13.3.9", "11.4.0.106"])
def test_the_builder_runs_each_release_through_its_own_path(monkeypatch, version):
    names, logged, plan, builder = _run_builder(monkeypatch, version)
    release = tensorrt_release(version)
    assert plan == b"engine" and builder.release is release
    uses_fp16_flag = {"set_flag", "BuilderFlag", "FP16"} <= names
    assert uses_fp16_flag is release.fp16_builder_flag
    assert builder.fp16 is release.fp16_builder_flag
    if release.fp16_builder_flag:
        assert logged == ["building TensorRT engine m_exit15 (fp16, batch 1/16/64)"]
    else:  # asked for fp16, told why the engines are FP32
        assert logged[0] == release.fp32_reason and "fp32" in logged[1]
    # Nothing the release removed is asked of it.
    assert not {removed.split(".")[1] for removed in release.removed} & names


def test_no_fast_fp16_gpu_builds_fp32_on_both(monkeypatch):
    for version in ("10.13.3.9", "11.4.0.106"):
        names, logged, _, builder = _run_builder(monkeypatch, version, capability=(6, 1))
        assert not builder.fp16 and "FP16" not in names
        assert logged[0] == "this GPU has no fast FP16: building FP32 engines"


def test_parser_errors_are_one_line(monkeypatch):
    from export.tensorrt_build import TensorRTBuildError

    with pytest.raises(TensorRTBuildError, match="m_exit15: the TensorRT ONNX parser failed"):
        _run_builder(monkeypatch, "11.4.0.106", parse_ok=False)


def _bindings_directories() -> list[Path]:
    found = []
    spec = importlib.util.find_spec("tensorrt_bindings")  # finds the package without running it
    if spec is not None and spec.submodule_search_locations:
        found.append(Path(list(spec.submodule_search_locations)[0]))
    for extra in filter(None, os.environ.get("EE_TENSORRT_BINDINGS", "").split(os.pathsep)):
        found.append(Path(extra))
    return found


def _bindings_version(directory: Path) -> str:
    match = re.search(r'^__version__ = "([^"]+)"', (directory / "__init__.py").read_text(), re.M)
    assert match, f"no __version__ in {directory / '__init__.py'}"
    return match.group(1)


def _registers(shared_object: bytes, name: str) -> bool:
    return name.encode() + b"\0" in shared_object


BINDINGS = _bindings_directories()


def test_tensorrt_itself_is_still_not_importable():
    """The bindings wheel installs `tensorrt_bindings`, not `tensorrt`: the exporter's lazy import still fails."""
    import importlib.metadata

    full = [d.metadata["Name"] for d in importlib.metadata.distributions()
            if (d.metadata["Name"] or "").lower().startswith("tensorrt") and "bindings" not in d.metadata["Name"]]
    if full:
        pytest.skip(f"a full TensorRT is installed here ({', '.join(full)})")
    assert importlib.util.find_spec("tensorrt") is None


@pytest.mark.skipif(not BINDINGS, reason="no TensorRT bindings wheel installed (pip install tensorrt-cu12-bindings)")
@pytest.mark.parametrize("directory", BINDINGS, ids=str)
def test_every_name_the_builder_calls_is_registered_by_the_bindings(monkeypatch, directory):
    version = _bindings_version(directory)
    release = tensorrt_release(version)
    assert release is not None, f"bindings {version} are not a release the builder supports"
    shared_object = (directory / "tensorrt.so").read_bytes()
    names, _, _, _ = _run_builder(monkeypatch, version)
    missing = sorted(name for name in names if not _registers(shared_object, name))
    assert not missing, f"TensorRT {version} bindings do not register {missing}"
    # The release notes' removals, as the builder's table has them, are really gone from these bindings...
    for removed in release.removed:
        assert not _registers(shared_object, removed.split(".")[1]), f"{removed} is still in TensorRT {version}"
    # ...and every other release's path, run against these bindings, misses exactly what the table says.
    for other in TENSORRT_RELEASES.values():
        if other is release:
            continue
        other_names, _, _, _ = _run_builder(monkeypatch, f"{other.major}.0.0")
        absent = {name for name in other_names if not _registers(shared_object, name)}
        table = {removed.split(".")[1] for removed in release.removed + other.removed}
        assert absent <= table, f"TensorRT {version} lacks {sorted(absent - table)}, not in TENSORRT_RELEASES"
        if other.major < release.major and other.fp16_builder_flag and not release.fp16_builder_flag:
            assert "FP16" in absent


def test_the_release_table_is_well_formed():
    """Guard for the table itself: majors are keys of their own entries, removals name Class.NAME."""
    for major, release in TENSORRT_RELEASES.items():
        assert release.major == major
        assert all(re.fullmatch(r"[A-Za-z]+\.[A-Za-z0-9_]+", removed) for removed in release.removed)
        assert release.fp16_builder_flag or release.fp32_reason
