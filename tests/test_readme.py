"""The README and docs/ against the code, so they cannot drift: every `fedclif` command
line in their code blocks names real subcommands and options, every `section.key=value`
they quote is a real setting, the defaults they quote are the configs' defaults, every
link between them resolves, and the README stays a front page with the two commands."""

import argparse
import re
import shlex
from pathlib import Path

import pytest

from fedclif.cli import build_parser
from fedclif.client.policy import SECTIONS as POLICY_SECTIONS
from fedclif.shared.config import load_tree
from fedclif.shared.tokens.tokenizer import TIME_BUCKETS
from fedclif.simulations.commands import STUDY_SECTIONS, load_study
from fedclif.simulations.synth import load_preset

ROOT = Path(__file__).resolve().parent.parent
FRONT = (ROOT / "README.md").read_text()
DOCS = {p: p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}
# What the checks below read: the front page and every page behind it.
README = "\n".join([FRONT, *DOCS.values()])


def command_lines() -> list[str]:
    """The `fedclif ...` lines of the README's bash blocks (continuations joined,
    comments dropped)."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("fedclif "):
                lines.append(line)
    return lines


def _subparser(parser: argparse.ArgumentParser, words: list[str]):
    """The parser of the subcommand `words` start with, and the words after it."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or not words or words[0] not in subs[0].choices:
            return parser, words
        parser, words = subs[0].choices[words[0]], words[1:]


@pytest.mark.parametrize("line", command_lines())
def test_every_command_line_in_the_readme_parses(line):
    """Its subcommand exists, each --option is one that subcommand takes, and a line that
    passes settings names a command that takes them."""
    parser, rest = _subparser(build_parser(), shlex.split(line)[1:])
    assert parser.prog != "fedclif", f"no such command: {line}"
    options = {s for a in parser._actions for s in a.option_strings}
    for w in rest:
        if w.startswith("--"):
            assert w.split("=")[0] in options, f"{parser.prog} has no {w}: {line}"
    settings = [w for w in rest if re.match(r"^[a-z]+\.[\w.]+=", w)]
    if settings and not parser.prog.endswith("synth"):
        assert any(a.dest == "overrides" for a in parser._actions), line


def _check_setting(setting: str) -> None:
    """Raise when `section.key=value` is not a setting some command takes."""
    section = setting.split(".")[0]
    if section == "synth":
        load_preset("mimic-like", [setting.removeprefix("synth.")])
    elif section in POLICY_SECTIONS:
        load_tree(POLICY_SECTIONS, (), None, [setting])
    else:
        assert section in STUDY_SECTIONS, setting
        load_study(None, "default", [setting])


def test_every_setting_the_readme_quotes_exists():
    """In code blocks and in prose: a renamed or removed key fails here."""
    sections = "site|tokenizer|train|model|federation|study|policy|synth"
    value = r"(?:\[[^\]]*\]|[^\s`'\"),]+)"  # a list may hold commas
    quoted = set(re.findall(rf"(?<![\w.])((?:{sections})\.[\w.]+={value})", README))
    assert len(quoted) > 25
    for setting in sorted(quoted):
        key, value = setting.split("=", 1)
        if value == "value" or re.fullmatch(r"[A-Z]+(:\d+)?", value):
            continue  # a placeholder: synth.key=value, train.dp.epsilon=E, HOST:6379
        for alternative in value.split("|"):  # model.arch=mamba2|mamba|llama
            _check_setting(f"{key}={alternative}")


def test_the_defaults_the_readme_quotes_are_the_configs():
    m = re.search(r"its defaults include(.*?)\)", README, re.S)
    quoted = re.findall(r"`([\w.]+)=([^`]+)`", m.group(1))
    assert len(quoted) == 4
    tree = load_tree(("train",))
    for key, value in quoted:
        node = tree
        for part in key.split("."):
            node = node[part]
        assert str(node) == value or float(node) == pytest.approx(float(value)), key
    # The time-gap tokens the README lists are the tokenizer's first and last.
    assert f"(`{TIME_BUCKETS[0][1]}` ... `{TIME_BUCKETS[-1][1]}`)" in README


def test_the_readme_is_a_front_page_with_the_two_commands():
    """At most ~250 lines; its bash blocks hold exactly the two commands a newcomer runs
    (set up and run the main job; set up and pass the tests), and CI runs the second."""
    assert len(FRONT.splitlines()) <= 250
    blocks = [b.strip() for b in re.findall(r"```bash\n(.*?)```", FRONT, re.S)]
    main_job = "pip install torch==2.13.0 -e . && fedclif simulate"
    tests = 'pip install torch==2.13.0 -e ".[dev]" && pytest'
    assert blocks == [main_job, tests]
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install torch==2.13.0 -e ".[dev]"\n' in ci and ci.rstrip().endswith("pytest")
    assert len(DOCS) >= 7 and all(f"(docs/{p.name})" in FRONT for p in DOCS)  # each linked


def _anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings."""
    heads = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_every_link_between_the_pages_resolves():
    """Each relative link of the README and docs/ names a file that exists and, with an
    anchor, a heading of that page."""
    pages = {ROOT / "README.md": FRONT, **DOCS}
    links = 0
    for page, text in pages.items():
        for target in re.findall(r"\]\(([^)#\s]*)(#[^)\s]*)?\)", text):
            path, anchor = target
            if path.startswith(("http://", "https://")):
                continue
            f = (page.parent / path).resolve() if path else page
            assert f.exists(), f"{page.name}: link to {path}"
            if anchor:
                assert anchor[1:] in _anchors(f.read_text()), f"{page.name}: {path}{anchor}"
            links += 1
    assert links >= 10
