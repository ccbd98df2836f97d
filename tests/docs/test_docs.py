"""The README and the manual in docs/: every relative link leads somewhere, every command shown exists.

Links: each ``[text](target)`` outside code points to a file of the repository and, with
``#anchor``, to a heading of that page (GitHub's heading ids). Commands: each line of a code block
that runs one of the project's tools names a real subcommand and only flags that subcommand's
``--help`` lists; each ``make`` target exists; each script path shown exists. The examples that run
for real are tested where their code lives (``tests/client/test_camera.py`` runs docs/camera.md's
camera library example against a server).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)
SHELL = ("", "sh", "shell", "console", "bash")  # the info strings of command blocks; pictures are ```text
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code spans."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces to ``-``."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.cache
def _anchors(page: Path) -> set[str]:
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text(encoding="utf-8")), re.M)
    return {_slug(h) for h in headings}


def _links() -> list[tuple[Path, str]]:
    return [(page, target) for page in PAGES for target in LINK.findall(_prose(page.read_text(encoding="utf-8")))
            if not re.match(r"[a-z]+:", target)]


def test_the_pages_exist_and_the_readme_links_every_one() -> None:
    readme_targets = {target.split("#")[0] for page, target in _links() if page.name == "README.md"}
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme_targets, f"README.md does not link docs/{page.name}"


@pytest.mark.parametrize("page,target", _links(), ids=lambda v: v.name if isinstance(v, Path) else v)
def test_every_relative_link_points_to_an_existing_file_and_heading(page: Path, target: str) -> None:
    path, _, anchor = target.partition("#")
    destination = (page.parent / path).resolve() if path else page
    assert destination.exists(), f"{page.relative_to(ROOT)}: link {target!r}: no such file"
    if anchor and destination.suffix == ".md":
        assert anchor in _anchors(destination), (
            f"{page.relative_to(ROOT)}: link {target!r}: no heading with that id in {destination.name} "
            f"(ids: {sorted(_anchors(destination))})")


@functools.cache
def _tools() -> dict[str, str]:
    """Console script name -> ``module:function``, from pyproject.toml."""
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+) = "([\w.]+:\w+)"$', section, re.M))  # no tomllib on Python 3.10


def _commands() -> list[tuple[str, str]]:
    """(page, command) for each shell command in a shell code block of the pages, continuations joined."""
    found = []
    for page in PAGES:
        for info, block in FENCE.findall(page.read_text(encoding="utf-8")):
            if info.strip() not in SHELL:
                continue
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s#.*$", "", line.strip()).removeprefix("$ ").strip()
                for command in re.split(r"\s*(?:&&|;|\|)\s*", line):
                    if command.split(" ", 1)[0] in {*_tools(), "make"} or re.search(r"\.(sh|py)\b", command):
                        found.append((page.name, command))
    return found


def _help(tool: str, argv: list[str]) -> str:
    """What ``tool ARGV`` prints (its --help), run in-process through the tool's entry point."""
    module, function = _tools()[tool].split(":")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        getattr(importlib.import_module(module), function)(argv)
    assert exit_.value.code == 0, f"{tool} {' '.join(argv)} exited {exit_.value.code}"
    return out.getvalue()


def test_the_pages_show_commands_of_every_tool() -> None:
    tools = {command.split(" ", 1)[0] for _, command in _commands()}
    assert set(_tools()) <= tools, f"no command shown for {set(_tools()) - tools}"


@pytest.mark.parametrize("page,command", _commands())
def test_every_command_shown_names_a_real_subcommand_flags_and_files(page: str, command: str) -> None:
    words = command.split()
    if words[0] == "make":
        targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
        assert set(words[1:]) <= targets, f"{page}: {command!r}: no such make target"
        return
    for word in words:
        if re.fullmatch(r"[\w./-]+\.(sh|py)", word) and not word.startswith((".venv", "/")):
            assert (ROOT / word).exists(), f"{page}: {command!r}: {word} does not exist"
    if words[0] in _tools():
        subcommand = words[1]
        assert re.search(rf"^\s+{subcommand}\s", _help(words[0], ["--help"]), re.M), (
            f"{page}: {command!r}: {words[0]} has no subcommand {subcommand!r}")
        argv = [subcommand]
        if len(words) > 2 and re.fullmatch(r"[a-z][\w-]*", words[2]) and re.search(  # a nested action: server coils list
                rf"^\s+{words[2]}\s", _help(words[0], [subcommand, "--help"]), re.M):
            argv.append(words[2])
        listed = set(FLAG.findall(_help(words[0], [*argv, "--help"])))
        unknown = set(FLAG.findall(command)) - listed
        assert not unknown, f"{page}: {command!r}: {words[0]} {subcommand} has no {sorted(unknown)}"
