"""Embedded models: GGUF files carried by PyPI packages, located through package metadata."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import shutil
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from tuneforge.errors import ModelError


@lru_cache(maxsize=1)
def embedded_models() -> dict[str, dict]:
    text = resources.files("tuneforge.model").joinpath("embedded.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def _package_file(package: str, marker: str) -> Path | None:
    """The first file of an installed distribution whose name contains `marker`, or None."""
    try:
        dist = md.distribution(package)
    except md.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if marker in f.name:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    return None


def _marker(entry: dict) -> str:
    return ".gguf.part" if entry.get("parts") else ".gguf"


def installed(name: str) -> bool:
    entry = embedded_models()[name]
    return all(_package_file(p, _marker(entry)) for p in entry["packages"])


def locate_embedded(name: str, cache_dir: Path) -> Path:
    """Path of the embedded model's .gguf file; split models are reassembled once into the cache."""
    entry = embedded_models()[name]
    if not installed(name):
        raise ModelError(f"embedded model {name!r} is not installed. hint: {entry['install']}")
    if not entry.get("parts"):
        return _package_file(entry["packages"][0], ".gguf")
    target = Path(cache_dir) / "gguf" / entry["file"]
    parts = [_package_file(p, ".gguf.part") for p in entry["packages"]]
    if target.is_file() and target.stat().st_size == sum(p.stat().st_size for p in parts):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    digest = hashlib.sha256()
    with tmp.open("wb") as out:
        for part in parts:
            with part.open("rb") as src:
                while block := src.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if entry.get("sha256") and digest.hexdigest() != entry["sha256"]:
        tmp.unlink()
        raise ModelError(f"embedded model {name!r}: reassembled file has the wrong checksum; "
                         f"reinstall its packages. hint: {entry['install']} --force-reinstall")
    shutil.move(tmp, target)
    return target
