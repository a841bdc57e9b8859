"""The README and docs/: a short guide, a reference that keeps up with the code, and examples
that are either run by a test or say why they cannot be."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import errors
from gateway.config import Config
from tests.doc_blocks import DOCUMENTS, README, ROOT, RUNNERS, Block, marked, shell_blocks

API = ROOT / "docs" / "api.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"
README_MAX_LINES = 450


def section(document: Path, title: str) -> str:
    """The text under the `## TITLE` heading of DOCUMENT, up to the next such heading."""
    text = document.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def problem_table() -> dict[str, str]:
    """The slug and status of each row of docs/api.md's problem types table."""
    rows = re.findall(r"^\| `([a-z-]+)` \| ([^|]+) \|", section(API, "Problem types"), re.M)
    return {slug: status.strip() for slug, status in rows}


def concrete_errors(cls: type[errors.GatewayError] = errors.GatewayError) -> Iterator[type[Any]]:
    """GatewayError and every subclass that names a problem type of its own."""
    if "slug" in vars(cls):
        yield cls
    for subclass in cls.__subclasses__():
        yield from concrete_errors(subclass)


def literal_problems() -> Iterator[tuple[str, int | None, str]]:
    """(slug, status or None, where) of each problem body the code renders from literals."""
    for path in sorted((ROOT / "gateway").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call) or len(node.args) < 2:
                continue
            name = getattr(node.func, "attr", getattr(node.func, "id", None))
            status, slug = node.args[0], node.args[1]
            if name == "problem_body" and isinstance(slug, ast.Constant):
                known = status.value if isinstance(status, ast.Constant) else None
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                yield str(slug.value), int(known) if isinstance(known, int) else None, where


def test_every_shell_block_is_run_by_a_test_or_says_why_not() -> None:
    blocks = shell_blocks()
    assert len(blocks) > 10  # the parser found the README's examples

    unmarked = [str(block) for block in blocks if block.run is None and block.no_run is None]
    unknown = [f"{block}: {block.run}" for block in blocks if block.run not in (None, *RUNNERS)]

    assert not unmarked, "mark each with <!-- run: RUNNER --> or <!-- no-run: REASON -->"
    assert not unknown, f"runners are {sorted(RUNNERS)}"


def test_every_runner_has_blocks_to_run() -> None:
    for runner in RUNNERS:
        assert marked(runner), runner


def test_the_examples_run_the_gateway_the_readme_installs() -> None:
    """`ews-gateway` is the one in .venv/ (the README says so), not whatever is on PATH."""
    bare = [
        f"{block}: {line}"
        for block in shell_blocks()
        for line in block.text.splitlines()
        if re.search(r"(?<![/\w-])ews-gateway (serve|check|demo|simulator)\b", line)
    ]
    assert not bare


def test_the_readme_is_a_guide_of_at_most_450_lines() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES


@pytest.mark.parametrize("error", list(concrete_errors()), ids=lambda error: error.__name__)
def test_every_problem_type_is_in_the_api_table_with_its_status(error: type[Any]) -> None:
    assert problem_table().get(error.slug) == str(error.status), error.slug


@pytest.mark.parametrize(("slug", "status", "where"), list(literal_problems()), ids=str)
def test_every_problem_the_code_renders_from_literals_is_in_the_api_table(
    slug: str, status: int | None, where: str
) -> None:
    table = problem_table()
    assert slug in table, where
    if status is not None:
        assert table[slug] == str(status), where


def test_the_api_table_names_only_problem_types_the_gateway_answers() -> None:
    real = {error.slug for error in concrete_errors()} | {slug for slug, _, _ in literal_problems()}
    assert set(problem_table()) == real


def test_the_literal_problems_are_found() -> None:
    assert {"not-ready", "http-error", "internal-error"} <= {s for s, _, _ in literal_problems()}


class RecordingEnvironment(dict[str, str]):
    """An environment that remembers every name the configuration asked for."""

    def __init__(self, **values: str) -> None:
        super().__init__(values)
        self.asked: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.asked.add(str(key))
        return super().__contains__(key)


@pytest.mark.parametrize(
    "environ",
    [
        {"EWS_URL": "https://mail.example.com/EWS/Exchange.asmx", "GATEWAY_AUTH": "none"},
        {
            "EWS_URL": "http://mail.example.com/EWS/Exchange.asmx",
            "GATEWAY_AUTH": "none",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
        },
    ],
    ids=["https", "http with tracing"],
)
def test_docs_configuration_names_every_variable_the_gateway_reads(
    environ: dict[str, str],
) -> None:
    recording = RecordingEnvironment(**environ)
    Config.from_env(recording)
    text = CONFIGURATION.read_text(encoding="utf-8")

    missing = {name for name in recording.asked if not re.search(rf"`{name}[`=]", text)}

    assert not missing


def headings(document: Path) -> set[str]:
    """GitHub's anchors for the headings of DOCUMENT."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", document.read_text(encoding="utf-8"), re.M):
        anchor = re.sub(r"[^\w\- ]", "", heading.lower().replace("`", "")).replace(" ", "-")
        anchors.add(anchor)
    return anchors


def links(document: Path) -> Iterator[tuple[str, str]]:
    """(target, anchor) of each relative Markdown link of DOCUMENT outside code blocks."""
    text = re.sub(r"```.*?```", "", document.read_text(encoding="utf-8"), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+:", target):
            path, _, anchor = target.partition("#")
            yield path, anchor


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_every_relative_link_names_a_file_and_heading_that_exist(document: Path) -> None:
    for path, anchor in links(document):
        target = (document.parent / path).resolve() if path else document
        assert target.exists(), f"{document.name}: {path}"
        if anchor:
            assert anchor in headings(target), f"{document.name}: {path}#{anchor}"


def test_marked_blocks_keep_their_document_and_line() -> None:
    block: Block = marked("demo")[0]
    assert str(block).startswith("README.md:")
