"""Packages for a lent GPU machine (`device`): what `iclmix sweep run` needs beyond that machine's image.

The image has torch, numpy, pandas, scikit-learn, matplotlib, pyarrow and the like, but not Ray, MLflow, Optuna
or pydantic, and nothing can be installed from the network there; a call carries at most 64 MiB. Ray's wheel
alone is larger, so its Java jars (`ray/jars`, unused by Python trials), the dashboard's source maps and
MLflow's UI pages are dropped, and the installed folder travels as one xz archive (about 44 MiB where the
wheels take about 64).
Versions are this checkout's `.venv` (the ones the test suite passed with).

    python -m bench.device_wheels [--dest .devsite] [--python-version 3.12]

then a device call carrying .devsite unpacks it into /tmp/site for `python -m bench.device_session` (see there).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

# Not in the device image (the `device` tool's KINDS.md lists what it has). Ray's dashboard extras
# ([default]) and MLflow's UI pages are left out: a sweep needs neither.
PACKAGES = [
    "ray", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py", "tensorboardX",
    "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
    "optuna", "alembic", "sqlalchemy", "mako", "colorlog",
    "mlflow", "mlflow-skinny", "mlflow-tracing", "flask", "flask-cors", "itsdangerous", "blinker",
    "graphene", "graphql-core", "graphql-relay", "gunicorn", "huey", "cryptography", "cffi", "pycparser",
    "cachetools", "databricks-sdk", "google-auth", "pyasn1", "pyasn1-modules",
    "fastapi", "starlette", "uvicorn", "gitpython", "gitdb", "smmap", "importlib-metadata",
    "opentelemetry-api", "opentelemetry-sdk", "opentelemetry-proto", "opentelemetry-semantic-conventions",
    "python-dotenv", "sqlparse",
]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
LIMIT = 64 * 2**20  # what one device call carries, the checkout included
ARCHIVE = "site.tar.xz"


def slim(wheel: Path, drop: tuple[str, ...]) -> None:
    """Rewrite `wheel` without the members under `drop` (and their RECORD lines)."""
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            name = info.filename
            if name.startswith(drop) or name.endswith(".js.map"):
                continue
            data = src.read(info)
            if name.endswith(".dist-info/RECORD"):
                data = b"\n".join(line for line in data.split(b"\n")
                                  if not line.startswith(tuple(d.encode() for d in drop)) and b".js.map," not in line)
            out.writestr(info, data)
    tmp.replace(wheel)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", default=".devsite")
    p.add_argument("--python-version", default="3.12", help="the device's Python (3.12)")
    args = p.parse_args(argv)
    dest = Path(args.dest)
    dest.mkdir(exist_ok=True)
    archive = dest / ARCHIVE
    pins = [f"{name}=={md.version(name)}" for name in PACKAGES]
    platform = ["--python-version", args.python_version, "--implementation", "cp", "--only-binary=:all:"]
    for plat in PLATFORMS:
        platform += ["--platform", plat]
    with tempfile.TemporaryDirectory() as d:
        wheels, site = Path(d) / "wheels", Path(d) / "site"
        pip = [sys.executable, "-m", "pip"]
        subprocess.run([*pip, "download", "-q", "--no-deps", *platform, "-d", wheels, *pins], check=True)
        for whl in wheels.glob("ray-*.whl"):
            slim(whl, ("ray/jars/",))
        for whl in wheels.glob("mlflow-*.whl"):  # the UI's pages: the sweep's server only answers its clients
            slim(whl, ("mlflow/server/js/build/",))
        subprocess.run([*pip, "install", "-q", "--no-index", "--no-deps", "--no-compile", *platform,
                        "--target", site, *sorted(wheels.glob("*.whl"))], check=True)
        shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts name this machine's interpreter
        with tarfile.open(archive, "w:xz", preset=6) as tar:
            for child in sorted(site.iterdir()):
                tar.add(child, arcname=child.name)
    size = archive.stat().st_size
    print(f"{len(pins)} packages in {archive}: {size / 2**20:.1f} MiB (a device call carries {LIMIT / 2**20:.0f} MiB)")
    return 0 if size < LIMIT - 8 * 2**20 else 1  # room for the checkout


if __name__ == "__main__":
    sys.exit(main())
