"""The command blocks of the README and docs/, and the comment that says how each is tested.

A fenced block is marked by an HTML comment on the line right before its fence (a reader of
the rendered page does not see it):

    <!-- run: RUNNER -->      tests/integration/test_doc_examples.py runs it (RUNNERS says how)
    <!-- no-run: REASON -->   nothing here can run it, for that reason
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
DOCUMENTS = (README, ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md")))
# Fences whose contents a reader types into a shell.
SHELL_LANGUAGES = frozenset({"sh", "shell", "bash", "console", "zsh"})

RUNNERS = {
    "demo": "against `ews-gateway demo`; `$ ` lines are checked against the output shown",
    "recipe-setup": "in a scratch folder, before each recipe",
    "recipe": "after recipe-setup, against a simulator asking for the recipe's credentials",
    "recipe-call": "against the gateway the recipe before it in the same document started",
    "production": "two replicas of the README's first recipe with Redis, nginx and Prometheus",
}

_FENCE = re.compile(r"^(?P<indent> *)```(?P<language>[\w-]*)\s*$")
_MARK = re.compile(r"^\s*<!-- (?P<kind>run|no-run): (?P<value>.+?) -->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced block of a document."""

    document: Path
    line: int  # of the opening fence, from 1
    language: str
    text: str  # without the fences and the list indentation
    run: str | None  # the runner its comment names
    no_run: str | None  # the reason its comment gives

    def __str__(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"


def blocks(document: Path) -> list[Block]:
    """Every fenced block of DOCUMENT, in order."""
    lines = document.read_text(encoding="utf-8").splitlines()
    found = []
    index = 0
    while index < len(lines):
        fence = _FENCE.match(lines[index])
        if fence is None:
            index += 1
            continue
        end = lines.index(fence["indent"] + "```", index + 1)
        mark = _MARK.match(lines[index - 1]) if index else None
        text = textwrap.dedent("\n".join(lines[index + 1 : end]) + "\n")
        found.append(
            Block(
                document,
                index + 1,
                fence["language"],
                text,
                mark["value"] if mark and mark["kind"] == "run" else None,
                mark["value"] if mark and mark["kind"] == "no-run" else None,
            )
        )
        index = end + 1
    return found


def all_blocks() -> list[Block]:
    return [block for document in DOCUMENTS for block in blocks(document)]


def shell_blocks() -> list[Block]:
    return [block for block in all_blocks() if block.language in SHELL_LANGUAGES]


def marked(runner: str) -> list[Block]:
    """The blocks whose comment names RUNNER, in document order."""
    return [block for block in all_blocks() if block.run == runner]
