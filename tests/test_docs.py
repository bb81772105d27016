"""The docs follow the code: the contract page covers every protocol member, links resolve.

* ``docs/protocols.md`` documents every public method and attribute of every protocol class in
  :mod:`conveyor.core.protocols` (plus ``from_url``, part of the contract of ``Broker`` and
  ``ResultBackend``). A method counts as documented when a code span in the page starts with
  ``name(`` and names each of its parameters (``receive(queues, *, max_messages=1,
  timeout=1.0)``); an attribute when a code span is exactly its name (``capabilities``). Each
  must appear in its own side's section (``## Broker`` or ``## Result backend``), so a
  method documented only for the other side does not count.
* Every relative link in ``README.md`` and ``docs/**/*.md`` points to an existing file or
  directory, and a ``#anchor`` into a Markdown file names one of its headings (GitHub's slug
  rule) or an explicit ``id``/``name`` anchor.
"""

from __future__ import annotations

import inspect
import re
import unicodedata
from pathlib import Path

import pytest

from conveyor.core import protocols

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PROTOCOLS_PAGE = DOCS / "protocols.md"

#: The section of docs/protocols.md that documents each protocol class. A protocol class
#: added to conveyor/core/protocols.py must be added here (the test says so).
SECTIONS: dict[str, str] = {
    "Broker": "Broker",
    "LeaseExtension": "Broker",
    "QueueSize": "Broker",
    "DeadLetters": "Broker",
    "ResultBackend": "Result backend",
    "Wait": "Result backend",
    "Counters": "Result backend",
    "Groups": "Result backend",
    "ExpirySweep": "Result backend",
}

#: Members of the contract that the protocol classes may not spell out yet: the classmethod
#: every implementation provides and the registry calls (``cls.from_url(url, **options)`` in
#: conveyor/core/registry.py). Name -> parameter names.
EXTRA_MEMBERS: dict[str, dict[str, tuple[str, ...]]] = {
    "Broker": {"from_url": ("url", "options")},
    "ResultBackend": {"from_url": ("url", "options")},
}

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"`([^`\n]+)`")


# ------------------------------------------------------------------------- protocol members


def protocol_classes() -> dict[str, type]:
    """The Protocol classes defined in conveyor.core.protocols, by name."""
    found = {}
    for name, obj in vars(protocols).items():
        if (
            inspect.isclass(obj)
            and obj.__module__ == protocols.__name__
            and getattr(obj, "_is_protocol", False)
            and not name.startswith("_")
        ):
            found[name] = obj
    return found


def public_members(cls: type) -> dict[str, tuple[str, ...] | None]:
    """Public methods (name -> parameter names, without self/cls) and attributes
    (name -> None) declared on ``cls`` itself."""
    members: dict[str, tuple[str, ...] | None] = {}
    for name in getattr(cls, "__annotations__", {}):
        if not name.startswith("_"):
            members[name] = None
    for name, obj in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(obj, property):
            members[name] = None
            continue
        if isinstance(obj, (classmethod, staticmethod)):
            func, skip = obj.__func__, 1 if isinstance(obj, classmethod) else 0
        elif inspect.isfunction(obj):
            func, skip = obj, 1
        else:
            continue
        params = list(inspect.signature(func).parameters)[skip:]
        members[name] = tuple(params)
    return members


def sections(text: str) -> dict[str, str]:
    """Level-2 sections of a Markdown page: heading text -> body (subsections included)."""
    out: dict[str, str] = {}
    current = None
    for line in _FENCE.sub("", text).splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            out[current] = ""
        elif current is not None:
            out[current] += line + "\n"
    return out


def documented(body: str, name: str, params: tuple[str, ...] | None) -> str | None:
    """None when ``name`` is documented in ``body``, else what is missing."""
    spans = _CODE_SPAN.findall(body)
    if params is None:
        return None if any(s.strip() == name for s in spans) else f"`{name}`"
    calls = [s for s in spans if s.startswith(f"{name}(")]
    if not calls:
        return f"`{name}(...)`"
    for span in calls:
        names = set(re.findall(r"[A-Za-z_]\w*", span[len(name) :]))
        if set(params) <= names:
            return None
    best = max(calls, key=lambda s: len(set(params) & set(re.findall(r"[A-Za-z_]\w*", s))))
    missing = [p for p in params if not re.search(rf"\b{re.escape(p)}\b", best)]
    return f"`{name}(...)` without parameter(s) {', '.join(missing)} (closest: `{best}`)"


def test_every_protocol_class_has_a_section() -> None:
    unknown = sorted(set(protocol_classes()) - set(SECTIONS))
    assert not unknown, (
        f"protocol classes {unknown} in conveyor/core/protocols.py have no section here: "
        "document them in docs/protocols.md and add them to SECTIONS in tests/test_docs.py"
    )
    assert set(SECTIONS) <= set(protocol_classes()), "SECTIONS names a class that is gone"


def test_protocols_page_documents_every_protocol_member() -> None:
    page = sections(PROTOCOLS_PAGE.read_text(encoding="utf-8"))
    missing = []
    for cls_name, cls in sorted(protocol_classes().items()):
        section = SECTIONS.get(cls_name)
        if section is None:
            continue  # reported by test_every_protocol_class_has_a_section
        assert section in page, f"docs/protocols.md has no '## {section}' section"
        members: dict[str, tuple[str, ...] | None] = dict(EXTRA_MEMBERS.get(cls_name, {}))
        members.update(public_members(cls))
        assert members, f"{cls_name} has no public members: is the introspection broken?"
        for name, params in sorted(members.items()):
            gap = documented(page[section], name, params)
            if gap is not None:
                missing.append(f"{cls_name}.{name}: no {gap} in '## {section}'")
    assert not missing, "docs/protocols.md does not document:\n" + "\n".join(missing)


def test_member_rule_can_fail() -> None:
    body = "| `receive(queues, *, timeout=1.0)` | ... |\n`capabilities`\n"
    assert documented(body, "capabilities", None) is None
    assert documented(body, "receive", ("queues", "timeout")) is None
    assert "max_messages" in str(documented(body, "receive", ("queues", "max_messages")))
    assert documented(body, "ack", ("delivery",)) == "`ack(...)`"
    assert documented("`receiver(queues)`", "receive", ("queues",)) == "`receive(...)`"


# ------------------------------------------------------------------------------------ links


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def _strip_code(text: str) -> str:
    """Markdown without fenced blocks and code spans (links there are not links)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(text: str) -> list[str]:
    return _LINK.findall(_strip_code(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: rendered text, lower case, punctuation dropped,
    each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links -> their text
    text = text.replace("`", "")
    text = re.sub(r"(\*\*|__|\*)", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = text.strip().lower()
    kept = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in "-_ " or cat[0] in "LN" or cat == "Mn":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    found: set[str] = set()
    counts: dict[str, int] = {}
    for line in _FENCE.sub("", text).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = counts.get(base, 0)
        counts[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    found.update(re.findall(r"""<a\s+(?:name|id)=["']([^"']+)["']""", text))
    return found


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for target in links(path.read_text(encoding="utf-8")):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}: ({target})"
        if not dest.exists():
            problems.append(f"{where}: {file_part} does not exist")
            continue
        if anchor and dest.is_file() and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading with anchor #{anchor} in {dest.name}")
    return problems


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    problems = broken_links(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_link_rules_can_fail(tmp_path: Path) -> None:
    assert slug("Result backend: Celery 5.7's tables") == "result-backend-celery-57s-tables"
    assert slug("`rpc://` replies") == "rpc-replies"
    assert slug("**Bold** and [a link](x.md)") == "bold-and-a-link"
    page = tmp_path / "page.md"
    page.write_text("# Top\n## Top\n```\n# not a heading\n```\n", encoding="utf-8")
    assert anchors(page) == {"top", "top-1"}
    assert links("[a](x.md) `[b](y.md)` ![c](z.png)\n```\n[d](w.md)\n```\n") == ["x.md", "z.png"]


def test_broken_link_is_reported(tmp_path: Path) -> None:
    page = tmp_path / "a.md"
    (tmp_path / "b.md").write_text("## Here\n", encoding="utf-8")
    page.write_text(
        "[ok](b.md#here) [gone](c.md) [bad](b.md#there) [web](https://x) [self](#nowhere)\n",
        encoding="utf-8",
    )
    problems = broken_links(page, tmp_path)
    assert len(problems) == 3, problems
    assert "c.md does not exist" in problems[0]
    assert "#there" in problems[1]
    assert "#nowhere" in problems[2]


_DOC_CITATION = re.compile(r"docs/([\w./-]+\.md)(?:\s*\(?#|#)?([\w-]+)?")


def cited_docs() -> list[tuple[str, str, str | None]]:
    """(where, page, anchor) of every ``docs/<page>.md[#anchor]`` a module or test cites."""
    found = []
    for path in sorted([*(ROOT / "conveyor").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in _DOC_CITATION.finditer(line):
                where = f"{path.relative_to(ROOT)}:{number}"
                anchor = match.group(2) if "#" in match.group(0) else None
                found.append((where, match.group(1), anchor))
    return found


def test_every_docs_page_and_anchor_cited_in_code_exists() -> None:
    citations = cited_docs()
    assert any(anchor for _, _, anchor in citations), "no cited anchor found: the rule is broken"
    missing = [
        f"{where}: docs/{page}" + (f"#{anchor}" if anchor else "")
        for where, page, anchor in citations
        if not (DOCS / page).is_file() or (anchor and anchor not in anchors(DOCS / page))
    ]
    assert missing == [], "cited docs pages or anchors that do not exist:\n" + "\n".join(missing)
