"""Inference backends: one interface, so the detectors never branch on the runtime.

The same torch module runs as is (``torch``: CPU fp32, or CUDA fp16 channels-last
in chunks of ``max_batch``), or is exported once to ONNX and run by ONNX Runtime
or OpenVINO on CPU, where they are ~2-3x faster than eager PyTorch for these
convolutional graphs (README "Benchmarks"). Exports are cached on disk by a hash
of the weights, input shapes and exporter version, so a second start only loads
the file. ``auto`` follows a fixed rule (``resolve_backend``) backed by the
benchmark, not a start-up probe: the answer is the same every start.
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "openvino")
_PIP = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
OPSET = 17
_EXPORT_VERSION = 1  # bump when the export recipe changes: old cache entries are then ignored
_QUANT_RECIPE = "qdq/per-channel/reduce-range/conv-only/u8s8/v2"


class BackendUnavailable(RuntimeError):
    """The configured backend's Python package is not installed (the message names both)."""


@dataclass(frozen=True)
class BackendSettings:
    """What a backend needs beyond the model; built from ``DetectorConfig``."""

    backend: str = "auto"  # auto | torch | onnxruntime | openvino
    device: str = "auto"  # torch only: auto | cpu | cuda
    precision: str = "auto"  # auto (fp16 on CUDA, else fp32) | fp32 | fp16 | int8 (onnxruntime, calibrated)
    cache_dir: str | None = None  # ONNX exports; None: user cache dir
    threads: int | None = None  # intra-op threads for onnxruntime/openvino; None: the runtime's default
    max_batch: int = 64  # torch: larger batches run in chunks (bounded GPU memory)

    @classmethod
    def from_config(cls, cfg, device: torch.device | None = None) -> "BackendSettings":
        """``device`` (a caller's explicit choice) overrides ``cfg.device``."""
        return cls(backend=cfg.backend, device=device.type if device is not None else cfg.device,
                   precision=cfg.precision, cache_dir=cfg.cache_dir, threads=cfg.threads, max_batch=cfg.batch_max)


class InferenceBackend(ABC):
    """A model's forward pass: ``run(*inputs)`` with a batch dimension first.

    Inputs may be numpy arrays or torch tensors; outputs are float32 torch tensors
    on ``device`` (CPU for ONNX Runtime / OpenVINO: zero-copy views of their
    numpy results), so decoding after it is the same code for every backend."""

    name: str
    device: torch.device

    @abstractmethod
    def run(self, *inputs: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, ...]:
        ...


def _np(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x)


def _split_batches(n: int, max_batch: int) -> list[slice]:
    return [slice(i, min(i + max_batch, n)) for i in range(0, n, max_batch)]


def select_dtype(device: torch.device, precision: str) -> torch.dtype:
    """fp16 where it pays (CUDA tensor cores) unless fp32 is asked for; CPU stays fp32."""
    if precision == "fp16" or (precision == "auto" and device.type == "cuda"):
        return torch.float16
    return torch.float32


class TorchBackend(InferenceBackend):
    """Eager PyTorch. On CUDA: fp16 weights, channels-last, batches cut to ``max_batch``."""

    name = "torch"

    def __init__(self, module: nn.Module, device: torch.device, dtype: torch.dtype = torch.float32,
                 max_batch: int = 64) -> None:
        self.device, self.dtype, self.max_batch = device, dtype, max_batch
        # channels-last: ~20% faster convolutions on CPU and the layout tensor cores want
        self.module = module.eval().to(device=device, dtype=dtype, memory_format=torch.channels_last)
        for p in self.module.parameters():
            p.requires_grad_(False)

    def _tensor(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        t = torch.from_numpy(np.asarray(x)) if isinstance(x, np.ndarray) else x
        t = t.to(self.device, non_blocking=True)
        return t.to(self.dtype) if t.is_floating_point() else t  # uint8 images are cast inside the model

    @torch.inference_mode()
    def run(self, *inputs: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, ...]:
        ts = [self._tensor(x) for x in inputs]
        n = ts[0].shape[0]
        parts = [self.module(*(t[s] for t in ts)) for s in _split_batches(n, self.max_batch)] if n else []
        if not parts:
            return tuple()
        parts = [p if isinstance(p, tuple) else (p,) for p in parts]
        return tuple(torch.cat([p[k] for p in parts]).float() if len(parts) > 1 else parts[0][k].float()
                     for k in range(len(parts[0])))


class OnnxRuntimeBackend(InferenceBackend):
    name = "onnxruntime"
    device = torch.device("cpu")

    def __init__(self, path: Path, threads: int | None = None) -> None:
        ort = require("onnxruntime")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        # no busy-waiting between ops: the decode and tracking threads need those cycles (on the shared
        # 2-core box: median 0.9 s vs 1.8 s per 512x512 forward with spinning, interleaved runs)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.path = path

    def run(self, *inputs: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = self.session.run(None, {k: _np(x) for k, x in zip(self.inputs, inputs)})
        return tuple(torch.from_numpy(np.asarray(o, dtype=np.float32)) for o in outs)


class OpenVinoBackend(InferenceBackend):
    name = "openvino"
    device = torch.device("cpu")

    def __init__(self, path: Path, threads: int | None = None) -> None:
        ov = require("openvino")
        core = ov.Core()
        # f32: OpenVINO would otherwise pick bf16 on CPUs that have it, a silent accuracy change
        props = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            props["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", props)
        self.request = self.compiled.create_infer_request()
        self.path = path

    def run(self, *inputs: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, ...]:
        res = self.request.infer([_np(x) for x in inputs])
        return tuple(torch.from_numpy(np.array(res[o], dtype=np.float32)) for o in self.compiled.outputs)


def require(backend: str):
    """Import a backend's package or raise BackendUnavailable naming the backend and the pip package."""
    try:
        return importlib.import_module(backend)
    except ImportError as e:
        raise BackendUnavailable(
            f"detector.backend={backend} needs the Python package {_PIP[backend]!r}, which is not installed "
            f"(pip install 'dishtrack[fast]' or pip install {_PIP[backend]}; or set detector.backend: torch)") from e


def available(backend: str) -> bool:
    try:
        require(backend)
    except BackendUnavailable:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto``: a GPU runs torch (fp16, batched); on CPU ONNX Runtime, else OpenVINO, else torch.
    The order is measured (README "Benchmarks": ONNX Runtime fastest on CPU)."""
    if backend != "auto":
        return backend
    if device.type == "cuda":
        return "torch"
    for b in ("onnxruntime", "openvino"):
        if available(b):
            return b
    log.info("neither onnxruntime nor openvino installed: detector runs on PyTorch (pip install 'dishtrack[fast]')")
    return "torch"


# ---- ONNX export with an on-disk cache

def default_cache_dir() -> Path:
    """``$DISHTRACK_CACHE_DIR``, else ``$XDG_CACHE_HOME/dishtrack``, else ``~/.cache/dishtrack`` (never the package)."""
    if os.environ.get("DISHTRACK_CACHE_DIR"):
        return Path(os.environ["DISHTRACK_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dishtrack"


def model_hash(module: nn.Module, example: Sequence[np.ndarray], extra: Iterable[str] = ()) -> str:
    """sha256 of every weight and buffer, the example inputs' shapes/dtypes (batch excluded) and
    the exporter version: any retraining or input-size change gives a new export."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().reshape(-1).contiguous()  # 1-D: channels-last strides do not matter
        h.update(f"{k}:{t.dtype}:{tuple(v.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for x in example:
        h.update(f"in:{x.dtype}:{tuple(x.shape[1:])}".encode())
    h.update(f"{type(module).__qualname__}:{torch.__version__}:{OPSET}:{_EXPORT_VERSION}".encode())
    for e in extra:
        h.update(e.encode())
    return h.hexdigest()


def export_onnx(module: nn.Module, example: Sequence[np.ndarray], input_names: Sequence[str],
                output_names: Sequence[str], cache_dir: str | Path | None, name: str) -> tuple[Path, bool]:
    """The module as ONNX with a dynamic batch axis, from the cache when there.
    Returns (path, cache hit)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}-{model_hash(module, example)[:20]}.onnx"
    if path.is_file():
        log.info("ONNX export cache hit: %s", path)
        return path, True
    module = module.eval().float()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    dyn = {n: {0: "batch"} for n in (*input_names, *output_names)}
    with torch.no_grad():
        torch.onnx.export(module, tuple(torch.from_numpy(np.asarray(x)) for x in example), str(tmp),
                          input_names=list(input_names), output_names=list(output_names), dynamic_axes=dyn,
                          opset_version=OPSET, dynamo=False)
    tmp.replace(path)  # atomic: a concurrent start never reads half a file
    log.info("exported %s to ONNX: %s", name, path)
    return path, False


def quantize_int8(path: Path, calibration: Sequence[tuple[np.ndarray, ...]], input_names: Sequence[str]) -> Path:
    """Static int8 post-training quantization (QDQ, per-channel weights) calibrated on ``calibration``
    batches; cached next to the fp32 file under a hash of the calibration data."""
    require("onnxruntime")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    h = hashlib.sha256(_QUANT_RECIPE.encode())  # a changed recipe never reuses an old int8 file
    for batch in calibration:
        for x in batch:
            h.update(np.ascontiguousarray(x).tobytes())
    out = path.with_name(f"{path.stem}-int8-{h.hexdigest()[:12]}.onnx")
    if out.is_file():
        return out

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calibration)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else dict(zip(input_names, b))

    pre = path.with_name(f"{path.stem}.{os.getpid()}.pre.onnx")
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    quant_pre_process(str(path), str(pre), skip_symbolic_shape=True)
    # convolutions only (the heads' elementwise arithmetic stays float); reduce_range (7-bit weights):
    # without it u8s8 products saturate on x86 CPUs lacking VNNI and the heatmap peaks are lost
    # (CenterNet heat max 0.22 instead of 0.74 on TUD-Campus)
    quantize_static(str(pre), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["Conv"])
    pre.unlink(missing_ok=True)
    tmp.replace(out)
    log.info("int8 model calibrated on %d batches: %s", len(calibration), out)
    return out


@dataclass(frozen=True)
class ModelSpec:
    """A module plus what export needs: example inputs (batch first) and tensor names."""

    module: nn.Module
    example: tuple[np.ndarray, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    name: str


def make_backend(spec: ModelSpec, settings: BackendSettings,
                 calibration: Callable[[], Sequence[tuple[np.ndarray, ...]]] | None = None) -> InferenceBackend:
    """The backend ``settings`` ask for, running ``spec.module``. ``calibration`` (only called for
    precision int8) returns the batches static quantization is calibrated on."""
    from .detector import pick_device

    wanted = settings.backend
    if wanted == "auto" and settings.precision in ("fp16", "int8"):
        wanted = "torch" if settings.precision == "fp16" else "onnxruntime"
    if wanted not in ("auto", "torch") and settings.device == "cuda":
        raise ValueError(f"detector.backend={wanted} runs on CPU; use detector.backend torch for CUDA")
    device = pick_device(settings.device) if wanted in ("auto", "torch") else torch.device("cpu")
    backend = resolve_backend(wanted, device)
    if backend == "torch":
        if settings.precision == "int8":
            raise ValueError("detector.precision=int8 needs detector.backend onnxruntime")
        return TorchBackend(spec.module, device, select_dtype(device, settings.precision), settings.max_batch)
    require(backend)  # fail before a costly export when the package is missing
    if settings.precision == "fp16":
        raise ValueError(f"detector.precision=fp16 is for the torch CUDA backend, not {backend}")
    path, _ = export_onnx(spec.module, spec.example, spec.input_names, spec.output_names, settings.cache_dir,
                          spec.name)
    if settings.precision == "int8" and calibration is not None:
        if backend != "onnxruntime":
            raise ValueError("detector.precision=int8 needs detector.backend onnxruntime")
        path = quantize_int8(path, calibration(), spec.input_names)
    cls = OnnxRuntimeBackend if backend == "onnxruntime" else OpenVinoBackend
    b = cls(path, settings.threads)
    log.info("%s runs on %s (%s)", spec.name, backend, path.name)
    return b
