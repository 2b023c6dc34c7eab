"""The documentation site: it builds offline with warnings as errors, and its API reference documents
every public name of ``avalanche_hat`` and ``avalanche_hat.training``.

A name counts as documented when the built reference pages hold the anchor mkdocstrings gives its
entry (``id="avalanche_hat.NAME"``), so a name added to ``__all__`` fails here until someone puts it
in docs/reference/ (``::: avalanche_hat.NAME`` on the page where it belongs). The names that
``avalanche_hat`` loads lazily from ``avalanche_hat.training`` are documented there.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS_PACKAGES = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def _missing_docs_packages() -> list[str]:
    missing = []
    for name in DOCS_PACKAGES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(name)
    return missing


needs_mkdocs = pytest.mark.skipif(
    bool(_missing_docs_packages()),
    reason=f"the docs toolchain is not installed ({', '.join(_missing_docs_packages())} missing): "
    "pip install -c constraints.txt -e '.[docs]'",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """``mkdocs build --strict`` of this checkout into a temporary folder (about 10 s)."""
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    return out, done


@needs_mkdocs
def test_the_site_builds_offline_with_warnings_as_errors(site):
    out, done = site
    log = done.stdout + done.stderr
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{log[-6000:]}"
    assert not re.search(r"^WARNING", log, re.MULTILINE), log[-6000:]
    assert (out / "index.html").exists() and (out / "reference" / "core" / "index.html").exists()


@needs_mkdocs
def test_the_built_site_fetches_no_web_fonts():
    """theme.font is false: Material would otherwise link Google Fonts into every page."""
    import yaml

    class Loader(yaml.SafeLoader):  # mkdocs.yml may hold !!python tags; none are needed here
        pass

    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)
    assert config["theme"].get("font") is False, "set theme.font: false in mkdocs.yml"
    plugins = [p if isinstance(p, str) else next(iter(p)) for p in config.get("plugins", [])]
    for downloading in ("social", "privacy", "material/social", "material/privacy"):
        assert downloading not in plugins, f"the {downloading} plugin downloads at build time"


def _reference_anchors(out: Path) -> set[str]:
    anchors = set()
    for page in (out / "reference").rglob("*.html"):
        anchors.update(re.findall(r'id="(avalanche_hat[^"]*)"', page.read_text(encoding="utf-8")))
    return anchors


def _undocumented(module_name: str, anchors: set[str]) -> list[str]:
    module = importlib.import_module(module_name)
    lazy = getattr(module, "_LAZY", {})
    missing = []
    for name in module.__all__:
        places = {f"{module_name}.{name}"}
        if name in lazy:
            places.add(f"{lazy[name]}.{name}")
        if not places & anchors:
            missing.append(name)
    return missing


@needs_mkdocs
@pytest.mark.parametrize("module_name", ["avalanche_hat", "avalanche_hat.training"])
def test_every_public_name_is_in_the_api_reference(site, module_name):
    out, done = site
    assert done.returncode == 0, "the site did not build: see test_the_site_builds_offline_with_warnings_as_errors"
    missing = _undocumented(module_name, _reference_anchors(out))
    assert not missing, (
        f"{module_name}.__all__ names missing from the API reference: {missing}. Add a line "
        f"'::: {module_name}.NAME' for each to the page of docs/reference/ where it belongs"
    )


def test_readme_links_into_the_docs_resolve():
    """README is the landing page on GitHub too: its relative links must point at files that exist."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\((?!https?://|#)([^)#\s]+)(?:#[^)]*)?\)", readme)
    assert any(t.startswith("docs/") for t in targets), "README links into docs/"
    broken = [t for t in targets if not (ROOT / t).exists()]
    assert not broken, f"README links to missing files: {broken}"


def _two_commands(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    section = text.split("## The two commands\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_the_two_commands_are_the_same_in_readme_and_the_docs_and_ci_runs_the_test_command():
    """README's two commands (main job, tests) are copied on the getting-started page, and .ci/run
    runs the test command's install and pytest steps: none of the three may drift."""
    readme = _two_commands(ROOT / "README.md")
    assert len(readme) == 2, "README's section 'The two commands' holds the main job and the test command"
    assert _two_commands(ROOT / "docs" / "getting-started.md") == readme
    main_job, tests = readme
    assert main_job.rstrip().endswith("avalanche-hat-bench")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    steps = [step.strip() for step in tests.split("&&")]
    assert steps[-1] == "python -m pytest -q"
    for step in steps:
        if step.startswith("pip install"):
            assert re.search(rf"^{re.escape('pip install')}( -q)? {re.escape(step[len('pip install '):])}$", ci, re.M), step
        else:
            assert re.search(rf"^{re.escape(step)}$", ci, re.M), f".ci/run does not run {step!r}"
