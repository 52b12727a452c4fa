"""Run a TensorFlow.js graph model (model.json + weight shards) as a PyTorch module.

Only the ops used by convolutional detectors are implemented (convolutions,
depthwise convolutions with TF "SAME" padding, fused bias/activations,
elementwise math, mean, concat, legacy bilinear resize). Unknown ops fail at
construction with the op name, not at inference.

4-D tensors are kept NCHW inside the module; graph axes given for NHWC are
translated. Convolution weights become ``nn.Parameter`` so the graph can be
fine-tuned; other constants are buffers.
"""
from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_NHWC_TO_NCHW_AXIS = {0: 0, 1: 2, 2: 3, 3: 1, -1: 1, -2: 3, -3: 2, -4: 0}
_DTYPES = {"float32": np.float32, "int32": np.int32, "float16": np.float16, "uint8": np.uint8,
           "uint16": np.uint16, "bool": np.bool_}
_WEIGHT_OPS = {"_FusedConv2D", "Conv2D", "FusedDepthwiseConv2dNative", "DepthwiseConv2dNative"}


class GraphFormatError(ValueError):
    """The model files are not a TFJS graph model this loader understands."""


def read_tfjs_weights(model_json: dict, base_dir: Path) -> dict[str, np.ndarray]:
    """Decode the weight shards listed in a TFJS manifest (incl. float16/uint8 quantisation)."""
    out: dict[str, np.ndarray] = {}
    for group in model_json["weightsManifest"]:
        buf = b"".join((base_dir / p).read_bytes() for p in group["paths"])
        off = 0
        for spec in group["weights"]:
            shape = [int(s) for s in spec["shape"]]
            n = int(np.prod(shape)) if shape else 1
            q = spec.get("quantization")
            store = _DTYPES[q["dtype"] if q else spec["dtype"]]
            size = n * np.dtype(store).itemsize
            if off + size > len(buf):
                raise GraphFormatError(f"weight {spec['name']} runs past the end of the shards")
            arr = np.frombuffer(buf, dtype=store, count=n, offset=off)
            off += size
            if q and q["dtype"] in ("uint8", "uint16"):
                arr = arr.astype(np.float32) * q["scale"] + q["min"]
            arr = arr.astype(_DTYPES[spec["dtype"]]).reshape(shape)
            out[spec["name"]] = arr
    return out


def _attr(node: dict, key: str, default=None):
    a = node.get("attr", {}).get(key)
    if a is None:
        return default
    if "list" in a:
        lst = a["list"]
        if "i" in lst:
            return [int(v) for v in lst["i"]]
        if "s" in lst:
            return [base64.b64decode(v).decode() for v in lst["s"]]
        return []
    if "s" in a:
        return base64.b64decode(a["s"]).decode()
    if "b" in a:
        return bool(a["b"])
    if "i" in a:
        return int(a["i"])
    if "f" in a:
        return float(a["f"])
    return default


def _module_key(name: str) -> str:
    """A graph node name as a parameter/buffer name (no '.' allowed there)."""
    return name.replace("/", "__").replace(".", "_")


def _same_pad(x: torch.Tensor, k: tuple[int, int], s: tuple[int, int], d: tuple[int, int]) -> torch.Tensor:
    """TensorFlow SAME padding: extra row/column goes to the bottom/right."""
    pads = []
    for dim, kk, ss, dd in ((3, k[1], s[1], d[1]), (2, k[0], s[0], d[0])):
        n = x.shape[dim]
        out = math.ceil(n / ss)
        total = max((out - 1) * ss + (kk - 1) * dd + 1 - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads) if any(pads) else x


def resize_bilinear_legacy(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """tf.image.resize_bilinear with align_corners=False, half_pixel_centers=False."""
    in_h, in_w = x.shape[2], x.shape[3]
    out_h, out_w = size

    def axis(n_in: int, n_out: int):
        src = torch.arange(n_out, device=x.device, dtype=x.dtype) * (n_in / n_out)
        i0 = src.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        return i0, i1, (src - i0.to(x.dtype))

    y0, y1, wy = axis(in_h, out_h)
    x0, x1, wx = axis(in_w, out_w)
    top = x[:, :, y0, :] * (1 - wy)[None, None, :, None] + x[:, :, y1, :] * wy[None, None, :, None]
    return top[:, :, :, x0] * (1 - wx) + top[:, :, :, x1] * wx


class TFJSGraph(nn.Module):
    """The subgraph of a TFJS graph model that computes ``outputs`` from its one input."""

    def __init__(self, model_json_path: str | Path, outputs: list[str]) -> None:
        super().__init__()
        path = Path(model_json_path)
        try:
            mj = json.loads(path.read_text())
            nodes = {n["name"]: n for n in mj["modelTopology"]["node"]}
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise GraphFormatError(f"{path}: not a TFJS graph model ({e})") from e
        weights = read_tfjs_weights(mj, path.parent)
        missing = [o for o in outputs if o not in nodes]
        if missing:
            raise GraphFormatError(f"{path}: no node(s) {missing}")
        self.outputs = list(outputs)
        self._plan: list[tuple[str, str, list[str], dict]] = []
        self._input: str | None = None
        self._declared_hw: tuple[int, int] | None = None
        self.params = nn.ParameterDict()
        self._pkey: dict[str, str] = {}
        self._consts: dict[str, torch.Tensor | np.ndarray] = {}

        order: list[str] = []
        seen: set[str] = set()

        def visit(name: str) -> None:  # iterative post-order DFS: deep graphs need no recursion
            stack = [(name, False)]
            while stack:
                nm, done = stack.pop()
                if done:
                    order.append(nm)
                    continue
                if nm in seen:
                    continue
                seen.add(nm)
                stack.append((nm, True))
                for inp in nodes[nm].get("input", []):
                    base = inp.split(":")[0].lstrip("^")
                    if base not in seen:
                        stack.append((base, False))

        for o in outputs:
            visit(o)

        for name in order:
            node = nodes[name]
            op = node["op"]
            inputs = [i.split(":")[0] for i in node.get("input", []) if not i.startswith("^")]
            if op == "Const":
                if name not in weights:
                    raise GraphFormatError(f"const {name} has no weights in the manifest")
                continue
            if op == "Placeholder":
                if self._input is not None:
                    raise GraphFormatError("graphs with more than one input are not supported")
                self._input = name
                dims = node.get("attr", {}).get("shape", {}).get("shape", {}).get("dim", [])
                sizes = [int(d.get("size", -1)) for d in dims]
                # constant-folded resize targets were computed for this input size (NHWC)
                self._declared_hw = (sizes[1], sizes[2]) if len(sizes) == 4 and min(sizes[1:3]) > 0 else None
                continue
            if op not in _OPS:
                raise GraphFormatError(f"{path}: op {op} (node {name}) is not implemented")
            cfg = self._prepare(name, node, op, inputs, weights)
            self._plan.append((name, op, inputs, cfg))
        if self._input is None:
            raise GraphFormatError(f"{path}: the outputs do not depend on an input")
        # free each intermediate after its last consumer: keeps inference memory at the
        # working set instead of every activation of the graph
        last_use: dict[str, int] = {}
        for step, (_, _, inputs, _) in enumerate(self._plan):
            for i in inputs:
                last_use[i] = step
        self._free: list[list[str]] = [[] for _ in self._plan]
        for name, step in last_use.items():
            if name not in self.outputs and name not in weights:
                self._free[step].append(name)
        # remaining constants (scalars, axes, sizes) as plain tensors / numpy
        for _, _, inputs, _ in self._plan:
            for i in inputs:
                if i in weights and i not in self._pkey and i not in self._consts:
                    self._consts[i] = weights[i]
        for k, v in list(self._consts.items()):
            if v.dtype.kind == "f":
                t = torch.from_numpy(np.array(v, dtype=np.float32))
                if t.ndim == 1 and t.numel() > 1:
                    t = t.reshape(-1, 1, 1)  # per-channel constant against NCHW tensors
                buf = _module_key(k)
                self.register_buffer(buf, t, persistent=False)
                self._consts[k] = buf  # resolved via getattr at run time (follows .to(device))

    # ---- construction helpers
    def _param(self, name: str, value: np.ndarray) -> str:
        key = _module_key(name)
        self.params[key] = nn.Parameter(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))
        self._pkey[name] = key
        return key

    def _prepare(self, name, node, op, inputs, weights) -> dict:
        cfg: dict = {}
        if op in _WEIGHT_OPS:
            w = weights[inputs[1]]
            if "Depthwise" in op:
                kh, kw, cin, mult = w.shape
                cfg["w"] = self._param(inputs[1], w.transpose(2, 3, 0, 1).reshape(cin * mult, 1, kh, kw))
                cfg["groups"] = cin
            else:
                kh, kw, _, _ = w.shape
                cfg["w"] = self._param(inputs[1], w.transpose(3, 2, 0, 1))
                cfg["groups"] = 1
            strides = _attr(node, "strides", [1, 1, 1, 1])
            dil = _attr(node, "dilations", [1, 1, 1, 1])
            if _attr(node, "data_format", "NHWC") != "NHWC":
                raise GraphFormatError(f"{name}: only NHWC graphs are supported")
            cfg["k"], cfg["s"], cfg["d"] = (kh, kw), (strides[1], strides[2]), (dil[1], dil[2])
            cfg["same"] = _attr(node, "padding", "SAME") == "SAME"
            fused = _attr(node, "fused_ops", []) if op.startswith(("_Fused", "Fused")) else []
            for f in fused:
                if f not in ("BiasAdd", "Relu", "Relu6"):
                    raise GraphFormatError(f"{name}: fused op {f} is not implemented")
            cfg["bias"] = self._param(inputs[2], weights[inputs[2]]) if "BiasAdd" in fused else None
            cfg["act"] = next((f for f in fused if f in ("Relu", "Relu6")), None)
        return cfg

    # ---- execution
    def _value(self, env: dict, name: str):
        if name in env:
            return env[name]
        c = self._consts[name]
        return getattr(self, c) if isinstance(c, str) else c

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x``: (B, C, H, W) float, as the graph's input expects. Returns NCHW outputs."""
        if self._declared_hw and x.shape[2] * self._declared_hw[1] != x.shape[3] * self._declared_hw[0]:
            raise ValueError(f"input {tuple(x.shape[2:])} must keep the graph's aspect {self._declared_hw}")
        env: dict[str, torch.Tensor] = {self._input: x}
        # int(): a traced (ONNX export) shape becomes a constant: exports have a fixed spatial size
        self._scale = int(x.shape[2]) / self._declared_hw[0] if self._declared_hw else 1.0
        for (name, op, inputs, cfg), free in zip(self._plan, self._free):
            env[name] = _OPS[op](self, env, inputs, cfg)
            for n in free:
                del env[n]
        return {o: env[o] for o in self.outputs}


def _conv(self: TFJSGraph, env, inputs, cfg):
    x = self._value(env, inputs[0])
    if cfg["same"]:
        x = _same_pad(x, cfg["k"], cfg["s"], cfg["d"])
    bias = self.params[cfg["bias"]] if cfg["bias"] else None
    y = F.conv2d(x, self.params[cfg["w"]], bias, stride=cfg["s"], dilation=cfg["d"], groups=cfg["groups"])
    if cfg["act"] == "Relu":
        y = F.relu(y)
    elif cfg["act"] == "Relu6":
        y = F.relu6(y)
    return y


def _binary(fn):
    def run(self: TFJSGraph, env, inputs, cfg):
        a, b = (self._value(env, i) for i in inputs[:2])
        return fn(torch.as_tensor(a), torch.as_tensor(b))
    return run


def _mean(self: TFJSGraph, env, inputs, cfg):
    axes = [_NHWC_TO_NCHW_AXIS[int(a)] for a in np.atleast_1d(self._value(env, inputs[1]))]
    return self._value(env, inputs[0]).mean(dim=axes, keepdim=True)


def _concat(self: TFJSGraph, env, inputs, cfg):
    axis = _NHWC_TO_NCHW_AXIS[int(self._value(env, inputs[-1]))]
    return torch.cat([self._value(env, i) for i in inputs[:-1]], dim=axis)


def _resize(self: TFJSGraph, env, inputs, cfg):
    h, w = (int(round(int(v) * self._scale)) for v in self._value(env, inputs[1]))
    return resize_bilinear_legacy(self._value(env, inputs[0]), (h, w))


_OPS = {
    "_FusedConv2D": _conv,
    "Conv2D": _conv,
    "FusedDepthwiseConv2dNative": _conv,
    "DepthwiseConv2dNative": _conv,
    "Add": _binary(torch.add),
    "AddV2": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Relu": lambda self, env, inputs, cfg: F.relu(self._value(env, inputs[0])),
    "Relu6": lambda self, env, inputs, cfg: F.relu6(self._value(env, inputs[0])),
    "Sigmoid": lambda self, env, inputs, cfg: torch.sigmoid(self._value(env, inputs[0])),
    "Identity": lambda self, env, inputs, cfg: self._value(env, inputs[0]),
    "Mean": _mean,
    "ConcatV2": _concat,
    "ResizeBilinear": _resize,
}
