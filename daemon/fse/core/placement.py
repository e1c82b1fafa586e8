"""Where llama.cpp puts a model's layers: how many on the CPU and on each GPU.

A pure function of the model's load parameters and ggml's device list, following
llama.cpp's own rule (src/llama.cpp, which GPUs a model may use; src/llama-model.cpp
`load_tensors`, which layer goes where):

- The model's GPUs are the devices of RPC workers (ggml names them RPC0, RPC1 ...; they
  say kind gpu), first, "to minimize network transfers", then the other ggml devices of
  kind gpu (integrated ones, kind igpu, only when there is no discrete one; RPC devices
  do not count), each group in ggml's order; the CPU and accelerators hold no
  offloaded layer. With split_mode "none" only the main_gpu-th of them is kept (none
  when main_gpu < 0); with "layer" and "row" all of them are (row splits each matrix
  over the GPUs as well, but a layer still belongs to the GPU its split point names).
- llama.cpp's n_gpu_layers counts the output layer too: offloading every one of the
  n_layer repeating layers is n_layer + 1 to it. Layers below i_gpu_start stay on the
  CPU; layer il from there on goes to the first GPU whose cumulative share exceeds
  (il - i_gpu_start) / n_gpu_layers. Shares are tensor_split, one per GPU of the model;
  all zero (or none given) they are each GPU's free memory (the CPU's memory for a GPU
  that reports none). The sums run in single precision, as in C++.

`gpu_layers` here is the number of repeating layers offloaded (Model.gpu_layers: for
an explicit count N <= n_layer, N - 1, as llama.cpp counts the output layer in N), so
the CPU holds n_layer - gpu_layers of them and the output layer goes with the GPUs.
llama.cpp's duplicate-device check (two backends seeing one GPU) is not modelled: ggml's
list does not say which devices those are.
"""

from __future__ import annotations

import bisect
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

SPLIT_MODES = ("none", "layer", "row")


class DeviceLike(Protocol):
    """What placement needs of a device (fse.core.model.Device has it)."""

    @property
    def name(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def memory_total(self) -> int: ...
    @property
    def memory_free(self) -> int: ...


class ModelLike(Protocol):
    """What placement needs of a loaded model (fse.core.model.Model has it)."""

    @property
    def n_layer(self) -> int: ...
    @property
    def gpu_layers(self) -> int: ...
    @property
    def split_mode(self) -> str: ...
    @property
    def main_gpu(self) -> int: ...
    @property
    def split(self) -> Sequence[float]: ...


@dataclass(frozen=True, slots=True)
class PlacedDevice:
    """A ggml device and the model layers on it."""

    name: str  # ggml's name: CPU, CUDA0, Vulkan0 ...
    description: str
    kind: str  # cpu, gpu, igpu, accel, other
    memory_bytes: int  # the device's total memory
    layers: int  # repeating layers of the model placed on it


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a model runs: the backend holding its offloaded layers, and every device."""

    backend: str  # CPU, CUDA, Vulkan, Metal ...: the first GPU that holds layers, else CPU
    layers: int  # the model's repeating layers (n_layer)
    gpu_layers: int  # of them, on GPUs
    devices: tuple[PlacedDevice, ...]


def _f32(x: float) -> float:
    """x rounded to single precision (a C++ float)."""
    rounded: float = struct.unpack("f", struct.pack("f", x))[0]
    return rounded


def model_gpus(devices: Sequence[DeviceLike], split_mode: str, main_gpu: int) -> list[int]:
    """Indices into `devices` of the GPUs llama.cpp gives the model, in its order.
    ValueError for an unknown split mode or a main_gpu llama.cpp would refuse."""
    if split_mode not in SPLIT_MODES:
        raise ValueError(f"split_mode: {split_mode!r}; accepted: {', '.join(SPLIT_MODES)}")
    workers = [i for i, d in enumerate(devices) if is_rpc(d.name)]
    gpus = [i for i, d in enumerate(devices) if d.kind == "gpu" and not is_rpc(d.name)]
    if not gpus:  # integrated GPUs only when there is no discrete one, of one backend
        igpus = [i for i, d in enumerate(devices) if d.kind == "igpu"]
        gpus = [
            i for i in igpus if backend_of(devices[i].name) == backend_of(devices[igpus[0]].name)
        ]
    gpus = workers + gpus  # llama.cpp puts the RPC workers' devices first
    if split_mode == "none" and gpus:
        if main_gpu < 0:
            return []
        if main_gpu >= len(gpus):
            raise ValueError(f"main_gpu: {main_gpu}; accepted: 0..{len(gpus) - 1}")
        return [gpus[main_gpu]]
    return gpus


def layers_per_device(
    n_layer: int,
    gpu_layers: int,
    devices: Sequence[DeviceLike],
    *,
    split_mode: str = "layer",
    main_gpu: int = 0,
    split: Sequence[float] = (),
) -> list[int]:
    """The repeating layers llama.cpp places on each of `devices` (same order): the CPU
    (the first device of kind cpu) gets n_layer - gpu_layers, the model's GPUs the rest,
    cut by their shares. ValueError when there is no CPU device (llama.cpp needs one)."""
    cpu = next((i for i, d in enumerate(devices) if d.kind == "cpu"), None)
    if cpu is None:
        raise ValueError("devices: no CPU device; llama.cpp needs one")
    counts = [0] * len(devices)
    gpus = model_gpus(devices, split_mode, main_gpu)
    offloaded = max(0, min(gpu_layers, n_layer)) if gpus else 0
    counts[cpu] = n_layer - offloaded
    if not offloaded:
        return counts
    splits = _cumulative_shares([devices[i] for i in gpus], devices[cpu], split)
    n_gpu_layers = offloaded + 1  # llama.cpp's count: the output layer goes with them
    i_gpu_start = n_layer + 1 - n_gpu_layers
    for il in range(i_gpu_start, n_layer):
        # std::upper_bound: the first split point above the layer's position.
        at = _f32(_f32(float(il - i_gpu_start)) / n_gpu_layers)
        counts[gpus[min(bisect.bisect_right(splits, at), len(gpus) - 1)]] += 1
    return counts


def _cumulative_shares(
    gpus: Sequence[DeviceLike], cpu: DeviceLike, split: Sequence[float]
) -> list[float]:
    """llama.cpp's split points: each GPU's cumulative share, normalised to end at 1."""
    given = [float(split[j]) if j < len(split) else 0.0 for j in range(len(gpus))]
    if all(s == 0.0 for s in given):  # by free memory; the CPU's for a GPU reporting none
        given = [
            float(cpu.memory_free if d.memory_free == 0 and d.memory_total == 0 else d.memory_free)
            for d in gpus
        ]
    total, points = 0.0, []
    for share in given:
        total = _f32(total + _f32(share))
        points.append(total)
    if not total > 0:
        raise ValueError("tensor_split: the GPUs' shares sum to zero")
    return [_f32(p / total) for p in points]


_INDEX = re.compile(r"\d+$")


def backend_of(name: str) -> str:
    """A device's backend: its ggml name less the index (CUDA0 -> CUDA, Metal -> Metal)."""
    return _INDEX.sub("", name) or name


def is_rpc(name: str) -> bool:
    """Whether a device is an RPC worker's (ggml-rpc names them RPC0, RPC1 ...)."""
    return backend_of(name) == "RPC"


def place(
    n_layer: int,
    gpu_layers: int,
    devices: Sequence[DeviceLike],
    *,
    split_mode: str = "layer",
    main_gpu: int = 0,
    split: Sequence[float] = (),
) -> Placement:
    """layers_per_device with the devices named, the GPU layers counted and the backend:
    that of the first GPU (in ggml's order) holding layers, else "CPU"."""
    counts = layers_per_device(
        n_layer, gpu_layers, devices, split_mode=split_mode, main_gpu=main_gpu, split=split
    )
    placed = tuple(
        PlacedDevice(d.name, d.description, d.kind, d.memory_total, n)
        for d, n in zip(devices, counts, strict=True)
    )
    on_gpus = [p for p in placed if p.kind != "cpu" and p.layers]
    backend = backend_of(on_gpus[0].name) if on_gpus else "CPU"
    return Placement(backend, n_layer, sum(p.layers for p in on_gpus), placed)


def place_model(model: ModelLike, devices: Sequence[DeviceLike]) -> Placement:
    """place() with a loaded model's own parameters (Model(gpu_layers=, split_mode=, ...))."""
    return place(
        model.n_layer,
        model.gpu_layers,
        devices,
        split_mode=model.split_mode,
        main_gpu=model.main_gpu,
        split=model.split,
    )


GRAPH_STATS_MODES = ("auto", "on", "off")


def graph_stats_for(mode: str, placement: Placement) -> bool:
    """Whether a context computes its per-step statistics in llama.cpp's graph
    (fse.core.engine, Context(graph_stats=)): `mode` "on" or "off", or "auto": when the
    model's offloaded layers, and the output layer with them, sit on a local GPU. There
    the graph path brings back a few numbers per stream and step instead of the
    vocabulary's logits (1 MiB for a 262,144-token vocabulary, across PCIe). On the CPU
    the logits are already in host memory and the fused C kernel is faster than ggml-cpu's
    ops (bench/bench_graph_stats.py); behind RPC workers the ops run on whatever the
    worker computes with, which placement cannot see (a CPU worker on loopback: 0.83 of
    the host path, bench/bench_rpc.py), so "auto" keeps the host there and "on" is the
    operator's call for GPU workers across a slow link."""
    if mode not in GRAPH_STATS_MODES:
        raise ValueError(f"graph_stats: {mode!r}; accepted: {', '.join(GRAPH_STATS_MODES)}")
    if mode == "auto":
        return placement.backend not in ("CPU", "RPC")
    return mode == "on"


def decode_is_async(placement: Placement) -> bool:
    """Whether llama_decode returns while the device still computes: where the layers sit
    on a local GPU, llama.cpp queues the graph on the device's stream and waits only when
    the step's outputs are read, so host work placed between the two runs for free
    (fse.serve.scheduler, pipelined). On the CPU the decode computes inside the call; an
    RPC worker's decode is not known to return early."""
    return placement.backend not in ("CPU", "RPC")
