"""Tiny plugin wheels built in a temp dir (one module and an entry point), installed into
this environment for a test and uninstalled after it."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def build_wheel(where: Path, name: str, module: str, entry: str = "plugin") -> Path:
    """`<name>_plugin-0.1.0-py3-none-any.whl` with module `<name>_plugin` whose `entry`
    attribute is registered under `switchboard.plugins` as `name`."""
    dist = f"{name}_plugin-0.1.0.dist-info"
    files = {
        f"{name}_plugin.py": module.encode(),
        f"{dist}/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}-plugin\nVersion: 0.1.0\n".encode()
        ),
        f"{dist}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
        f"{dist}/entry_points.txt": (
            f"[switchboard.plugins]\n{name} = {name}_plugin:{entry}\n".encode()
        ),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = where / f"{name}_plugin-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


@contextmanager
def installed(where: Path, name: str, module: str) -> Iterator[None]:
    """The plugin installed (no index, no deps) while the block runs."""
    wheel = build_wheel(where, name, module)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--no-deps", "--no-index", str(wheel)], check=True)
    try:
        yield
    finally:
        subprocess.run([*pip, "uninstall", "-y", f"{name}-plugin"], check=True)
