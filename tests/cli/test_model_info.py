"""`fse model info`: where llama.cpp runs a model, as the real binding says."""

from __future__ import annotations

from support.daemons import run_fse


def test_model_info_names_the_layers_and_the_devices() -> None:
    from fse.core.model import gpu_offload

    result = run_fse("model", "info", "--gpu-layers", "0")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("model: Gemma 3 270m (") and lines[1] == "layers: 18, 0 on a GPU"
    assert lines[2] == "backend: CPU"
    # Every device, with the layers on it: all 18 on the CPU.
    cpu = [line for line in lines if line.startswith("device: CPU (cpu: ")]
    assert len(cpu) == 1 and cpu[0].endswith("): 18 layers")
    others = [line for line in lines if line.startswith("device: ") and line not in cpu]
    assert all(line.endswith("): 0 layers") for line in others)
    assert f"gpu offload: {'yes' if gpu_offload() else 'no ('}" in result.stdout
    bad = run_fse("model", "info", "--gpu-layers", "-5")
    assert bad.returncode == 2
    expected = (
        "fse model: error: --gpu-layers: '-5' is not accepted; accepted: \"auto\" (every layer "
        'on a GPU when llama.cpp has one, else the CPU), "all" (every layer on a GPU; needs '
        "one), 0 (the CPU only) or N >= 1 (that many layers on a GPU)\n"
    )
    assert bad.stderr == expected
