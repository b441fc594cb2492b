"""The loader's install is slim: a training image with strata's base install and its own TensorFlow has no
Prefect, Great Expectations or Dask, and reads a manifest.

The environment is built offline from this test environment's packages: a fresh virtual environment whose
site-packages links only the distributions that the base install (``[project] dependencies`` of
pyproject.toml) and TensorFlow need, resolved through their own metadata, with the project on a ``.pth``
line as an editable install puts it.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import textwrap
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.test_loader import GRAY, publish, sized_classes

REPO = Path(__file__).resolve().parents[1]
CURATION = ("prefect", "great_expectations", "distributed", "dask", "fastapi", "pydantic")


def closure(requirements: list[str]) -> dict[str, metadata.Distribution]:
    """The installed distributions these requirements need, transitively (markers evaluated, extras followed)."""
    found: dict[str, metadata.Distribution] = {}
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        requirement, extra = todo.pop()
        if requirement.marker and not requirement.marker.evaluate({**default_environment(), "extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        dist = metadata.distribution(requirement.name)
        assert dist.version in requirement.specifier, f"{name} {dist.version} does not satisfy {requirement}"
        wanted = [""] + sorted(requirement.extras)
        for want in wanted:
            key = f"{name}[{want}]"
            if key in found:
                continue
            found[key] = dist
            todo += [(Requirement(r), want) for r in dist.requires or []]
    return {canonicalize_name(d.metadata["Name"]): d for d in found.values()}


def link_distributions(dists: dict[str, metadata.Distribution], site: Path) -> None:
    """Symlink each distribution's top-level files and folders (and its metadata) into ``site``."""
    for dist in dists.values():
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        base = Path(str(dist.locate_file("")))
        for top in tops:
            source, target = base / top, site / top
            if source.exists() and not target.exists() and top != "__pycache__":
                target.symlink_to(source)


def test_the_base_install_with_tensorflow_reads_a_manifest_without_the_curation_stack(tmp_path: Path) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = project["dependencies"]
    assert not {canonicalize_name(Requirement(r).name) for r in base} & {canonicalize_name(c) for c in CURATION}
    dists = closure([*base, "tensorflow-cpu"])
    assert not set(dists) & {canonicalize_name(c) for c in CURATION}, sorted(dists)

    env = tmp_path / "worker"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    relative = Path(sysconfig.get_path("purelib")).relative_to(sysconfig.get_path("data"))
    site = env / relative
    link_distributions(dists, site)
    (site / "strata-project.pth").write_text(f"{REPO}\n")

    dataset = publish(str(tmp_path / "m"), sized_classes({"a": 5, "b": 3}))
    script = textwrap.dedent(
        f"""
        import importlib.util, sys
        missing = [n for n in {CURATION!r} if importlib.util.find_spec(n) is not None]
        assert not missing, f"importable in the worker: {{missing}}"
        import loader
        ds = loader.from_manifest({dataset!r}, batch_size=4, **{GRAY!r})
        import tensorflow
        print(tensorflow.__version__, sum(int(y.shape[0]) for _, y in ds), loader.class_names({dataset!r}))
        """
    )
    python = env / "bin" / "python"
    result = subprocess.run([str(python), "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[1:] == ["8", "['a',", "'b']"]
    assert result.stdout.split()[0] == metadata.version("tensorflow-cpu")  # the worker's own, never replaced

    (site / "tensorflow").unlink()  # a machine without TensorFlow is told what to install
    result = subprocess.run([str(python), "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 1 and "ImportError: loader.from_manifest needs TensorFlow" in result.stderr
