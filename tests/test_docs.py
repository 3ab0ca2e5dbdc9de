"""The docs cannot drift: the configuration page is what the schema makes, every relative link in
README.md and docs/*.md resolves (file and heading), and the README stays short and keeps the
commands that CI runs."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README = REPO / "README.md"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
# The README's first command: .ci/run runs its install half, tests/test_train.py its training half.
FIRST_COMMAND = "pip install -e . && torchrun --standalone --nproc_per_node=2 train_ddp.py --config configs/default.yaml"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def config_page():
    return load_script("make_config_page")


# ---------------------------------------------------------------- the generated configuration page


def test_config_page_is_what_the_schema_makes(config_page):
    assert config_page.PAGE.read_text() == config_page.render(), \
        "docs/configuration.md is stale: run python docs/make_config_page.py"
    assert config_page.main(["--check"]) == 0


def test_config_page_lists_every_key_and_section(config_page):
    from cnn import config

    page = config_page.PAGE.read_text()
    for key in config.schema_keys():
        assert f"| `{key.name}` |" in page
    for section in config.sections():
        assert f"## `{section}`" in page


def test_a_changed_doc_makes_the_page_stale(config_page, monkeypatch, tmp_path, capsys):
    from cnn import config

    keys = config.schema_keys()
    changed = tuple(dataclasses.replace(k, doc=k.doc + " (changed)") if k.name == "optim.lr" else k for k in keys)
    monkeypatch.setattr(config, "schema_keys", lambda: changed)
    assert config_page.render() != config_page.PAGE.read_text()
    assert config_page.main(["--check"]) == 1
    assert "stale" in capsys.readouterr().err

    # Regenerating writes the change; --check then passes again (on a copy, not the real page).
    monkeypatch.setattr(config_page, "PAGE", tmp_path / "configuration.md")
    assert config_page.main([]) == 0
    assert "(changed)" in config_page.PAGE.read_text()
    assert config_page.main(["--check"]) == 0


def test_a_new_key_makes_the_page_stale(config_page, monkeypatch):
    from cnn import config

    keys = config.schema_keys()
    fake = dataclasses.replace(keys[-1], name="train.fake_key", type="int", default=3, doc="Not a real key.")
    monkeypatch.setattr(config, "schema_keys", lambda: (*keys, fake))
    page = config_page.render()
    assert "| `train.fake_key` | `int` | `3` | Not a real key. |" in page
    assert page != config_page.PAGE.read_text()
    assert config_page.main(["--check"]) == 1


# ---------------------------------------------------------------- links

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The page without code: links in code blocks and spans are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"<[^>]+>", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def test_slug_is_githubs():
    assert slug("Restarts, signals and timeouts") == "restarts-signals-and-timeouts"
    assert slug("`wandb`") == "wandb"
    assert slug("A lost peer costs the step in flight") == "a-lost-peer-costs-the-step-in-flight"
    assert slug("Processes, devices and batches") == "processes-devices-and-batches"


def links(page: Path) -> list[str]:
    return [target for target in LINK.findall(prose(page.read_text()))
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]  # http:, https:, mailto: ...


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n[ok](#top) [missing](nowhere.md) `[code](nowhere.md)`\n\n```\n[x](gone.md)\n```\n"
                    "[web](https://example.com)\n")
    assert links(page) == ["#top", "nowhere.md"]


def test_every_docs_page_is_reachable_from_the_readme():
    """Each docs page is linked from the README or from the docs index the README links."""
    index = DOCS / "README.md"
    linked = {(page.parent / t.partition("#")[0]).resolve()
              for page in (README, index) for t in links(page) if t.partition("#")[0]}
    unlinked = [p.name for p in DOCS.glob("*.md") if p.resolve() not in linked]
    assert not unlinked, f"docs pages no README link leads to: {unlinked}"


# ---------------------------------------------------------------- the README itself


def ci_test_command() -> str:
    """The command .ci/run runs as 'the README's test command', without its subshell parentheses."""
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if "README's test command" in line)
    command = lines[i + 1].strip()
    return command[1:-1] if command.startswith("(") and command.endswith(")") else command


def code_lines(text: str) -> set[str]:
    """Every line inside the page's fenced code blocks, stripped."""
    return {line.strip() for block in FENCE.finditer(text) for line in block.group(0).splitlines()}


def test_readme_is_short_and_keeps_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    commands = code_lines(text)
    assert ci_test_command() in commands, "the README must show the test command .ci/run runs, verbatim"
    assert ci_test_command() == "pip install -e '.[dev]' && python -m pytest", "the test command changed"
    assert FIRST_COMMAND in commands, "the README's first command changed"
    assert "pip install -e ." in (REPO / ".ci" / "run").read_text().splitlines(), \
        ".ci/run no longer runs the first command's install"
