"""Usable from another project: the wheel, installed into a fresh virtual environment
(reusing this one's dependencies), in a separate `dg` project outside the repository
that has its own top-level `assets` package: a loop scaffolds, `dg check defs` and
`dg list defs` pass, and neither `assets` shadows the other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(
    not (Path(sys.executable).parent / "dg").exists(), reason="dg is not installed (dev extra)"
)
DG_MAIN = "import sys\nfrom dagster_dg_cli.cli import main\nsys.exit(main())\n"


def run(*command: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def user_project(root: Path) -> Path:
    """A `dg` project of the user's own, with a top-level package named `assets`."""
    (root / "uproj" / "defs").mkdir(parents=True)
    (root / "uproj" / "__init__.py").write_text("")
    (root / "uproj" / "defs" / "__init__.py").write_text("")
    (root / "pyproject.toml").write_text(textwrap.dedent("""\
        [project]
        name = "uproj"
        version = "0.1.0"

        [tool.dg]
        directory_type = "project"

        [tool.dg.project]
        root_module = "uproj"
        code_location_target_module = "uproj.definitions"
        """))  # fmt: skip
    (root / "uproj" / "definitions.py").write_text(textwrap.dedent("""\
        from pathlib import Path

        import dagster as dg

        from assets import user_asset  # the project's own top-level `assets` package


        @dg.definitions
        def defs():
            loops = dg.load_from_defs_folder(project_root=Path(__file__).resolve().parents[1])
            return dg.Definitions.merge(loops, dg.Definitions(assets=[user_asset]))
        """))  # fmt: skip
    (root / "assets").mkdir()
    (root / "assets" / "__init__.py").write_text(textwrap.dedent("""\
        import dagster as dg


        @dg.asset
        def user_asset() -> int:
            return 1
        """))  # fmt: skip
    return root


def test_the_wheel_works_in_another_dg_project_with_its_own_assets_package(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SELFIMPROVE_", "DAGSTER"))}
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
        "-w", str(tmp_path / "dist"), str(REPO), cwd=tmp_path, env=env)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("selfimprove_dagster-*.whl")
    # A fresh environment that reuses this one's dependencies through a path entry (whose
    # own .pth files, this repo's editable install among them, are not processed).
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", str(venv), cwd=tmp_path, env=env)
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    (site / "_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = venv / "bin" / "python"
    run(str(python), "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
        str(wheel), cwd=tmp_path, env=env)  # fmt: skip
    (venv / "bin" / "dg").write_text(f"#!{python}\n{DG_MAIN}")
    (venv / "bin" / "dg").chmod(0o755)
    env |= {"VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}:{env.get('PATH', '')}"}

    project = user_project(tmp_path / "elsewhere")
    dg = str(venv / "bin" / "dg")
    run(dg, "scaffold", "defs", "selfimprove_dagster.components.SelfImproveLoop", "my_loop",
        cwd=project, env=env)  # fmt: skip
    assert "name: my_loop" in (project / "uproj/defs/my_loop/defs.yaml").read_text()
    checked = run(dg, "check", "defs", cwd=project, env=env)
    assert "All definitions loaded successfully" in checked.stdout + checked.stderr
    listed = json.loads(run(dg, "list", "defs", "--json", cwd=project, env=env).stdout)
    keys = {asset["asset_key"] for asset in listed["assets"]}
    assert {"my_loop/generations", "my_loop/eval_scores", "user_asset"} <= keys
    # The installed copy, not this checkout: the layers came from the wheel.
    where = run(str(python), "-c", "import selfimprove_dagster.assets as a; print(a.__file__)",
                cwd=project, env=env).stdout  # fmt: skip
    assert where.startswith(str(site))
