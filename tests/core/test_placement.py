"""fse.core.placement: llama.cpp's rule for which device holds which layer, on synthetic
device lists (no GPU needed). The expected counts are worked out from llama-model.cpp's
load_tensors: n_gpu_layers = offloaded + 1 (the output layer), layer il from i_gpu_start
on goes to the first GPU whose cumulative share exceeds (il - i_gpu_start) / n_gpu_layers."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from fse.core.placement import PlacedDevice, graph_stats_for, layers_per_device, place

GIB = 1 << 30


@dataclass(frozen=True)
class Dev:
    name: str
    kind: str
    memory_total: int = 0
    memory_free: int = 0
    description: str = ""


CPU = Dev("CPU", "cpu", 64 * GIB, 60 * GIB, "Xeon")


def cuda(i: int, free_gib: int = 80) -> Dev:
    return Dev(f"CUDA{i}", "gpu", 80 * GIB, free_gib * GIB, "NVIDIA H100")


def test_no_gpu_keeps_every_layer_on_the_cpu() -> None:
    placed = place(18, 0, [CPU])
    assert placed.backend == "CPU" and placed.layers == 18 and placed.gpu_layers == 0
    assert placed.devices == (PlacedDevice("CPU", "Xeon", "cpu", 64 * GIB, 18),)
    # Layers asked for without a GPU to take them stay on the CPU too.
    assert layers_per_device(18, 18, [CPU]) == [18]
    # An accelerator (BLAS, AMX) holds no offloaded layer.
    assert layers_per_device(18, 18, [CPU, Dev("BLAS", "accel")]) == [18, 0]


def test_one_gpu_takes_every_offloaded_layer() -> None:
    devices = [cuda(0), CPU]  # ggml lists the GPUs first
    placed = place(18, 18, devices)
    assert placed.backend == "CUDA" and placed.gpu_layers == 18
    assert [(d.name, d.layers) for d in placed.devices] == [("CUDA0", 18), ("CPU", 0)]
    assert layers_per_device(18, 0, devices) == [0, 18]
    # Partial offload: the first n_layer - gpu_layers layers stay on the CPU.
    assert layers_per_device(18, 5, devices) == [5, 13]
    assert place(18, 5, devices).gpu_layers == 5
    # More than the model has is all of it.
    assert layers_per_device(18, 99, devices) == [18, 0]


def test_two_gpus_split_three_to_one() -> None:
    devices = [cuda(0), cuda(1), CPU]
    # 19 layers to llama.cpp (18 + output), split points 0.75 and 1: layers 0..14 have
    # il/19 < 0.75 (15 layers), 15..17 go to the second GPU.
    assert layers_per_device(18, 18, devices, split=(3, 1)) == [15, 3, 0]
    # The output layer (position 18/19) takes part of the second GPU's share.
    assert layers_per_device(32, 32, devices, split=(3, 1)) == [25, 7, 0]
    # Partial offload: 8 layers, 9 to llama.cpp; offsets 0..6 < 0.75 * 9.
    assert layers_per_device(18, 8, devices, split=(3, 1)) == [7, 1, 10]
    # Shares past the GPUs' count are ignored; missing ones are zero.
    assert layers_per_device(18, 18, devices, split=(0, 1)) == [0, 18, 0]
    placed = place(18, 18, devices, split=(3, 1))
    assert placed.backend == "CUDA" and placed.gpu_layers == 18


def test_without_shares_the_split_follows_free_memory() -> None:
    even = [cuda(0, 40), cuda(1, 40), CPU]
    assert layers_per_device(18, 18, even) == [10, 8, 0]  # il/19 < 0.5: 0..9
    assert layers_per_device(18, 18, even, split=(0, 0)) == [10, 8, 0]  # all zero: none given
    uneven = [cuda(0, 60), cuda(1, 20), CPU]
    assert layers_per_device(18, 18, uneven) == layers_per_device(18, 18, even, split=(3, 1))
    # A GPU reporting no memory at all counts with the CPU's.
    silent = Dev("Vulkan0", "gpu")
    assert layers_per_device(18, 18, [silent, cuda(1, 60), CPU]) == [10, 8, 0]


def test_split_mode_none_puts_every_offloaded_layer_on_main_gpu() -> None:
    devices = [cuda(0), cuda(1), CPU]
    assert layers_per_device(18, 18, devices, split_mode="none") == [18, 0, 0]
    placed = place(18, 18, devices, split_mode="none", main_gpu=1, split=(3, 1))
    assert [d.layers for d in placed.devices] == [0, 18, 0]
    assert placed.backend == "CUDA" and placed.gpu_layers == 18
    assert layers_per_device(18, 6, devices, split_mode="none", main_gpu=1) == [0, 6, 12]
    # main_gpu < 0: llama.cpp keeps no GPU, so the CPU holds everything.
    assert layers_per_device(18, 18, devices, split_mode="none", main_gpu=-1) == [0, 0, 18]
    with pytest.raises(ValueError, match="main_gpu: 2"):
        layers_per_device(18, 18, devices, split_mode="none", main_gpu=2)


def test_split_mode_row_places_layers_like_layer() -> None:
    """Row split cuts every matrix over the GPUs as well, but in this llama.cpp a layer
    (its norms, its KV cache) still belongs to the GPU its split point names, and main_gpu
    only matters for split_mode none."""
    devices = [cuda(0), cuda(1), CPU]
    for main_gpu in (0, 1):
        counts = layers_per_device(
            18, 18, devices, split_mode="row", main_gpu=main_gpu, split=(3, 1)
        )
        assert counts == [15, 3, 0]


def test_integrated_gpus_only_without_a_discrete_one() -> None:
    igpu = Dev("Vulkan1", "igpu", 16 * GIB, 8 * GIB)
    assert layers_per_device(18, 18, [cuda(0), igpu, CPU]) == [18, 0, 0]
    placed = place(18, 18, [igpu, CPU])
    assert placed.backend == "Vulkan" and [d.layers for d in placed.devices] == [18, 0]
    assert place(18, 18, [Dev("Metal", "gpu", GIB, GIB), CPU]).backend == "Metal"


def test_refusals() -> None:
    with pytest.raises(ValueError, match="no CPU device"):
        layers_per_device(18, 0, [cuda(0)])
    with pytest.raises(ValueError, match="split_mode"):
        layers_per_device(18, 0, [CPU], split_mode="tensor")
    with pytest.raises(ValueError, match="sum to zero"):
        layers_per_device(18, 18, [Dev("X0", "gpu"), Dev("CPU", "cpu")])


def test_every_layer_is_placed_once() -> None:
    devices = [cuda(0, 70), cuda(1, 30), cuda(2, 50), CPU]
    for n_layer in (1, 2, 18, 26, 80):
        for gpu_layers in range(n_layer + 1):
            shares: list[tuple[float, ...]] = [(), (1, 1, 1), (5, 0, 2)]
            for split in shares:
                counts = layers_per_device(n_layer, gpu_layers, devices, split=split)
                assert sum(counts) == n_layer and counts[-1] == n_layer - gpu_layers
                if split[1:2] == (0,):  # a GPU with no share gets no layer
                    assert counts[1] == 0


def rpc(i: int, free_gib: int = 60) -> Dev:
    """An RPC worker's device: ggml-rpc says kind gpu and describes it by its address."""
    return Dev(f"RPC{i}", "gpu", 64 * GIB, free_gib * GIB, f"127.0.0.1:{50052 + i}")


def test_rpc_workers_come_first_and_split_by_free_memory() -> None:
    # ggml lists the CPU (registered first) before the workers' devices.
    devices = [CPU, rpc(0), rpc(1)]
    placed = place(18, 18, devices)
    # 19 layers to llama.cpp, split points 0.5 and 1: layers 0..9 on the first worker.
    assert [(d.name, d.layers) for d in placed.devices] == [("CPU", 0), ("RPC0", 10), ("RPC1", 8)]
    assert placed.backend == "RPC" and placed.gpu_layers == 18
    # Beside a local GPU, llama.cpp puts the workers first "to minimize network transfers".
    assert layers_per_device(18, 18, [cuda(0, 60), CPU, rpc(0)]) == [8, 0, 10]
    # An integrated GPU still counts when only RPC devices are discrete.
    igpu = Dev("Vulkan0", "igpu", 16 * GIB, 8 * GIB)
    assert layers_per_device(18, 18, [igpu, CPU, rpc(0, 8)], split_mode="layer") == [8, 0, 10]
    # split_mode none: main_gpu indexes the model's GPUs, workers first.
    assert layers_per_device(18, 18, [cuda(0), CPU, rpc(0)], split_mode="none") == [0, 0, 18]


def test_graph_statistics_follow_the_layers_off_the_host() -> None:
    """auto: in the graph where the layers (and the output layer) are on a local GPU,
    where the logits would otherwise cross PCIe; on the host kernel on the CPU and behind
    RPC workers (whose own devices placement cannot see). on and off are obeyed."""
    on_cpu = place(18, 0, [CPU])
    on_gpu = place(18, 18, [cuda(0), CPU])
    on_rpc = place(18, 18, [Dev("RPC0", "gpu", 8 * GIB, 8 * GIB), CPU])
    assert [graph_stats_for("auto", p) for p in (on_cpu, on_gpu, on_rpc)] == [False, True, False]
    assert graph_stats_for("on", on_rpc)
    assert all(graph_stats_for("on", p) for p in (on_cpu, on_gpu))
    assert not any(graph_stats_for("off", p) for p in (on_cpu, on_gpu, on_rpc))
    # A GPU present but no layer on it (--gpu-layers 0): the host.
    assert not graph_stats_for("auto", place(18, 0, [cuda(0), CPU]))
    with pytest.raises(ValueError, match="accepted: auto, on, off"):
        graph_stats_for("yes", on_cpu)
