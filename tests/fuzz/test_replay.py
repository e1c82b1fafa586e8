"""Every fuzz target of fuzz/ over its committed corpus (fuzz/corpus/<target>/), so that
an input a fuzzer once found, or a seed, fails the suite if it breaks again. The Python
targets run in-process (their `one_input` needs no atheris); the C targets are built with
gcc and ASan/UBSan around fuzz/replay_main.c (no clang or libFuzzer). docs/fuzzing.md.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from fse.core.model import Model

pytestmark = pytest.mark.fuzz

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "fuzz"
PY_TARGETS = sorted(p.stem for p in FUZZ.glob("fuzz_*.py"))
C_TARGETS = sorted(p.stem for p in FUZZ.glob("fuzz_*.c"))
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]


def corpus(target: str) -> list[Path]:
    files = sorted((FUZZ / "corpus" / target.removeprefix("fuzz_")).glob("*"))
    assert files, f"{target} has no committed corpus"
    return files


def target_module(name: str) -> ModuleType:
    if str(FUZZ) not in sys.path:
        sys.path.insert(0, str(FUZZ))
    return importlib.import_module(name)


@pytest.fixture()
def templated(model: Model) -> Iterator[Model]:
    """The session's model, its chat template put back afterwards (targets switch it)."""
    saved = model.chat_template
    yield model
    model.chat_template = saved


@pytest.mark.parametrize("target", PY_TARGETS)
def test_python_target_replays_its_corpus(target: str, templated: Model) -> None:
    module = target_module(target)
    for path in corpus(target):
        data = path.read_bytes()
        try:
            if target == "fuzz_chat_template":
                module.check(templated, data)  # the session's model, not a second load
            else:
                module.one_input(data)
        except Exception as exc:
            raise AssertionError(f"{target} on {path.relative_to(ROOT)}: {exc!r}") from exc


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc")
@pytest.mark.parametrize("target", C_TARGETS)
def test_c_target_replays_its_corpus(target: str, tmp_path: Path) -> None:
    source = ROOT / "native" / f"fse_{target.removeprefix('fuzz_')}.c"
    exe = tmp_path / target
    llama = json.loads((ROOT / "build" / "libllama.json").read_text())["include_dirs"]
    subprocess.run(
        ["gcc", "-g", "-O1", *SANITIZE, f"-I{ROOT / 'native'}", *(f"-I{d}" for d in llama),
         str(FUZZ / f"{target}.c"),
         str(source), str(FUZZ / "replay_main.c"), "-lm", "-o", str(exe)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    files = corpus(target)
    run = subprocess.run(
        [str(exe), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "print_stacktrace=1"},
    )
    assert run.returncode == 0, f"{target}:\n{run.stdout}{run.stderr[-4000:]}"
    assert f"replayed {len(files)} inputs" in run.stdout


def test_a_nul_in_a_chat_message_is_refused(templated: Model) -> None:
    """Found by fuzz_chat_template: the template cut a role or content at a NUL, so the
    model saw less than the client sent (and the audit log recorded)."""
    templated.use_chat_template("gemma")
    for messages in ([("user", "hi\0 and the rest")], [("user\0x", "hi")]):
        with pytest.raises(ValueError, match=r"messages\[0\]\.(content|role): contains a NUL"):
            templated.apply_chat_template(messages)
