"""TensorRT 10 and 11 engine builds from validated ONNX (TensorRT is imported lazily).

TensorRT is not installable on the CPU machines this project is developed on;
`require_tensorrt` stops an export before anything is written, with one line
saying what is missing and which command writes the ONNX repository instead.
What differs between the supported releases is in `TENSORRT_RELEASES`, and only there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError
from common.manifest import TensorSpec

ONNX_INSTEAD = "python export/to_onnx.py --exits ... writes the ONNX Runtime repository instead"
DEFAULT_TIMING_CACHE = Path.home() / ".cache" / "early-exit" / "tensorrt-timing.cache"


@dataclass(frozen=True)
class TensorRTRelease:
    """What this builder does differently on one TensorRT major release.

    From NVIDIA's "Migrating from TensorRT 10.x to 11.x" guide (11.4 migration pages): 11.x removed
    weak typing, i.e. `BuilderFlag.FP16` and every other precision flag (networks are always strongly
    typed: each tensor's type comes from the ONNX graph; the replacement is an FP16 graph made with
    ModelOpt AutoCast), `Builder.platform_has_fast_fp16` and `NetworkDefinitionCreationFlag.EXPLICIT_BATCH`.
    The other calls made here (`create_network(0)`, the ONNX parser, memory pool limits, optimisation
    profiles, timing caches, `build_serialized_network`) are the same in both.
    """

    major: int
    fp16_builder_flag: bool  # reduced precision by BuilderFlag.FP16 (weak typing)
    removed: tuple[str, ...]  # "Class.NAME" of earlier releases this release no longer has (never called here)
    fp32_reason: str = ""  # logged when fp16 was asked for and this release builds FP32 from the FP32 graph


TENSORRT_RELEASES = {
    10: TensorRTRelease(10, fp16_builder_flag=True, removed=()),
    11: TensorRTRelease(11, fp16_builder_flag=False,
                        removed=("BuilderFlag.FP16", "Builder.platform_has_fast_fp16",
                                 "NetworkDefinitionCreationFlag.EXPLICIT_BATCH"),
                        fp32_reason="TensorRT 11 networks are strongly typed (BuilderFlag.FP16 is gone; precision "
                                    "comes from the ONNX graph, which is FP32): building FP32 engines"),
}
SUPPORTED = " and ".join(str(major) for major in TENSORRT_RELEASES)


def tensorrt_release(version: str) -> TensorRTRelease | None:
    """The supported release a `tensorrt.__version__` belongs to, or None."""
    major = version.split(".", 1)[0]
    return TENSORRT_RELEASES.get(int(major)) if major.isdigit() else None


class TensorRTUnavailable(UserError):
    """TensorRT or a CUDA device is missing."""


class TensorRTBuildError(UserError):
    """The ONNX parser or the builder failed."""


@dataclass(frozen=True)
class EngineSettings:
    min_batch: int = 1
    opt_batch: int = 16
    max_batch: int = 64
    precision: str = "fp16"  # fp16 falls back to fp32 where the GPU has no fast FP16
    workspace_mb: int = 1024
    timing_cache: Path | None = DEFAULT_TIMING_CACHE

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise UserError(f"batch sizes must satisfy 1 <= min ({self.min_batch}) <= opt ({self.opt_batch}) "
                            f"<= max ({self.max_batch})")
        if self.precision not in ("fp32", "fp16"):
            raise UserError(f"--precision must be fp32 or fp16, not {self.precision!r}")
        if self.workspace_mb < 1:
            raise UserError("--workspace-mb must be positive")


def profile_shapes(spec: TensorSpec, settings: EngineSettings) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) shapes of the optimisation profile for an input."""
    dims = tuple(spec.shape)
    return tuple((batch, *dims) for batch in (settings.min_batch, settings.opt_batch, settings.max_batch))


def require_tensorrt():
    """Import TensorRT 10 or 11 and check for a CUDA device: (the module, its TensorRTRelease),
    or raise TensorRTUnavailable."""
    try:
        import tensorrt
    except ImportError:
        raise TensorRTUnavailable(f"TensorRT is not installed (pip install 'tensorrt==11.*' or 'tensorrt==10.*', "
                                  f"on a CUDA machine); {ONNX_INSTEAD}") from None
    version = str(getattr(tensorrt, "__version__", "unknown"))
    release = tensorrt_release(version)
    if release is None:
        raise TensorRTUnavailable(f"TensorRT {version} is installed, but this exporter supports TensorRT "
                                  f"{SUPPORTED} (pip install 'tensorrt==11.*'); {ONNX_INSTEAD}")
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        raise TensorRTUnavailable(f"no CUDA device is available for TensorRT; {ONNX_INSTEAD}")
    return tensorrt, release


def has_fast_fp16(capability: tuple[int, int]) -> bool:
    """Native full-rate FP16: sm_53, sm_60, sm_62 and sm_70 onwards (sm_61 runs FP16 at 1/64 rate)."""
    return tuple(capability) >= (7, 0) or tuple(capability) in ((5, 3), (6, 0), (6, 2))


class TensorRTPlanBuilder:
    """Builds one serialised engine per model, sharing a timing cache."""

    def __init__(self, settings: EngineSettings, log=print) -> None:
        self.trt, self.release = require_tensorrt()
        self.settings = settings
        self.log = log
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.builder = self.trt.Builder(self.logger)
        # Asked of CUDA: Builder.platform_has_fast_fp16 is deprecated since TensorRT 10.5, gone in 11.
        import torch

        fast_fp16 = has_fast_fp16(torch.cuda.get_device_capability())
        self.fp16 = settings.precision == "fp16" and fast_fp16 and self.release.fp16_builder_flag
        if settings.precision == "fp16" and not self.fp16:
            log(self.release.fp32_reason if fast_fp16 else "this GPU has no fast FP16: building FP32 engines")
        self._cache_bytes = b""
        if settings.timing_cache and Path(settings.timing_cache).exists():
            self._cache_bytes = Path(settings.timing_cache).read_bytes()

    def __call__(self, onnx_bytes: bytes, input_spec: TensorSpec, name: str) -> bytes:
        trt = self.trt
        network = self.builder.create_network(0)  # explicit batch in 10 and 11; strongly typed always in 11
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(onnx_bytes):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise TensorRTBuildError(f"{name}: the TensorRT ONNX parser failed: {errors}")
        config = self.builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.settings.workspace_mb << 20)
        if self.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        profile = self.builder.create_optimization_profile()
        minimum, optimum, maximum = profile_shapes(input_spec, self.settings)
        profile.set_shape(input_spec.name, minimum, optimum, maximum)
        config.add_optimization_profile(profile)
        cache = config.create_timing_cache(self._cache_bytes)
        config.set_timing_cache(cache, ignore_mismatch=False)
        self.log(f"building TensorRT engine {name} ({'fp16' if self.fp16 else 'fp32'}, batch "
                 f"{minimum[0]}/{optimum[0]}/{maximum[0]})")
        serialized = self.builder.build_serialized_network(network, config)
        if serialized is None:
            raise TensorRTBuildError(f"{name}: TensorRT could not build an engine (see the log above)")
        self._cache_bytes = bytes(config.get_timing_cache().serialize())
        if self.settings.timing_cache:
            path = Path(self.settings.timing_cache)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self._cache_bytes)
        return bytes(serialized)
