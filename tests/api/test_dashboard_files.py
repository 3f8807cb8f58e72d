"""The dashboard installs with the package: every file under api/static is package data, and the page loads
nothing from another origin."""

import fnmatch
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "api" / "static"


def test_every_dashboard_file_is_package_data() -> None:
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["api"]
    files = [p.relative_to(ROOT / "api").as_posix() for p in STATIC.rglob("*") if p.is_file()]
    assert "static/index.html" in files and "static/vendor/lit-html.js" in files
    missing = [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in patterns)]
    assert not missing, f"not installed with the package: {missing}"


def test_the_page_loads_nothing_from_elsewhere() -> None:
    for path in STATIC.rglob("*"):
        if path.suffix in {".html", ".js", ".css"}:
            text = path.read_text()
            assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), path
            assert not re.search(r"""import[^;]*from\s*["'](https?:)?//""", text), path
            assert "url(http" not in text and "@import" not in text, path
