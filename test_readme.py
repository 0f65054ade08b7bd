"""The documentation works as written: README.md's Python examples run, every table in README.md
and EXPERIMENTS.md is well formed, every relative link or image in them resolves, and the names
README.md says to copy for LTE attention are enough to run it.

The examples run in a subprocess with the environment a user has: conftest.py sets
TRITON_INTERPRET for this process, and a user who copies an example never has it."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny_hybrid as th

ROOT = Path(__file__).resolve().parent
README = ROOT / "README.md"
TABLE_FILES = (README, ROOT / "EXPERIMENTS.md")

# A Python block the tests must not run says why on the line before its fence, e.g.
#   <!-- not run: needs a CUDA GPU -->
NOT_RUN = re.compile(r"<!--\s*not run:(.*?)-->")
FENCE = re.compile(r"^```(\w*)\s*$")


# ---------------------------------------------------------------------------------------------
# Reading markdown
# ---------------------------------------------------------------------------------------------

def code_blocks(text: str) -> list[dict]:
    """Fenced blocks in order: language, code, first line number, and the reason given in a
    `<!-- not run: ... -->` comment on the line before the fence (None without one)."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"the code fence on line {i + 1} is never closed")
        marker = NOT_RUN.search(lines[i - 1]) if i > 0 else None
        blocks.append({"lang": opening.group(1), "code": "\n".join(lines[i + 1: end]) + "\n",
                       "line": i + 1, "not_run": None if marker is None else marker.group(1).strip()})
        i = end + 1
    return blocks


def without_fences(text: str) -> str:
    """The text with every fenced block blanked out (line numbers stay)."""
    out, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        out.append("" if in_fence or FENCE.match(line) else line)
    return "\n".join(out)


def prose(text: str) -> str:
    """The text without fenced blocks and inline code spans (links inside code are not links)."""
    return re.sub(r"`[^`\n]*`", "``", without_fences(text))


def split_row(line: str) -> list[str]:
    """The cells of one table row: split on pipes that are not escaped, outer pipes optional."""
    cells = re.split(r"(?<!\\)\|", line.strip())
    if cells and cells[0].strip() == "":
        cells = cells[1:]
    if cells and cells[-1].strip() == "":
        cells = cells[:-1]
    return [c.strip() for c in cells]


def tables(text: str) -> list[dict]:
    """Every table in the prose: runs of lines starting with '|', with the line of each row."""
    found, current = [], None
    for number, line in enumerate(prose(text).splitlines(), start=1):
        if line.lstrip().startswith("|"):
            if current is None:
                current = {"line": number, "rows": []}
                found.append(current)
            current["rows"].append((number, split_row(line)))
        else:
            current = None
    return found


def table_problems(text: str) -> list[str]:
    """What is wrong with the tables: a missing separator row, or a row whose cell count differs
    from its header's (the numbers would sit under the wrong columns)."""
    problems = []
    for table in tables(text):
        (header_line, header), rows = table["rows"][0], table["rows"][1:]
        if not rows or not all(re.fullmatch(r":?-{3,}:?", c) for c in rows[0][1]):
            problems.append(f"line {header_line}: the header is not followed by a |---| separator row")
        for number, cells in rows:
            if len(cells) != len(header):
                problems.append(f"line {number}: {len(cells)} cells under a header of {len(header)}")
    return problems


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of every heading (a repeated heading gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    result = set()
    for line in without_fences(text).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match is None:
            continue
        slug = anchor(match.group(1))
        result.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return result


def link_problems(path: Path) -> list[str]:
    """Relative links and images in a markdown file that point to no file or no heading."""
    text = path.read_text(encoding="utf-8")
    problems = []
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose(text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):        # http:, https:, mailto: ...
            continue
        file_part, _, fragment = target.partition("#")
        linked = path if file_part == "" else (path.parent / file_part)
        if not linked.exists():
            problems.append(f"{target}: no file {file_part}")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked.read_text(encoding="utf-8")):
            problems.append(f"{target}: {linked.name} has no heading with anchor #{fragment}")
    return problems


# ---------------------------------------------------------------------------------------------
# The checkers catch what they are meant to catch
# ---------------------------------------------------------------------------------------------

def test_table_check_catches_a_row_with_an_extra_cell():
    good = "| a | b |\n|---|---|\n| 1 | 2 |\n"
    bad = "| preset | 1K ms |\n|---|---|\n| 512 | gdn | 11.8 |\n"
    assert table_problems(good) == []
    assert table_problems(bad) == ["line 3: 3 cells under a header of 2"]
    assert table_problems("| a | b |\n| 1 | 2 |\n") != []                  # no separator row
    assert table_problems("| a \\| b | c |\n|---|---|\n| 1 | 2 |\n") == []  # an escaped pipe is text


def test_tables_inside_code_blocks_are_not_tables():
    assert tables("```text\n| a | b |\n| 1 |\n```\n") == []


def test_link_check_catches_missing_files_and_anchors(tmp_path):
    (tmp_path / "there.md").write_text("# A heading: `with_code`\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text("## Setup\n[ok](#setup) [ok](there.md#a-heading-with_code) [web](https://x.org)\n"
                    "[gone](missing.md) [bad](#nowhere) ![img](there.md#not-a-heading)\n"
                    "`[in code](nowhere.md)`\n", encoding="utf-8")
    assert link_problems(page) == ["missing.md: no file missing.md",
                                   "#nowhere: page.md has no heading with anchor #nowhere",
                                   "there.md#not-a-heading: there.md has no heading with anchor #not-a-heading"]


def test_code_blocks_read_fences_and_not_run_markers():
    text = "```python\nprint(1)\n```\n<!-- not run: needs a GPU -->\n```python\nx\n```\n```bash\nls\n```\n"
    blocks = code_blocks(text)
    assert [(b["lang"], b["code"], b["not_run"]) for b in blocks] == [
        ("python", "print(1)\n", None), ("python", "x\n", "needs a GPU"), ("bash", "ls\n", None)]
    with pytest.raises(ValueError, match="never closed"):
        code_blocks("```python\nprint(1)\n")


# ---------------------------------------------------------------------------------------------
# The documentation itself
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", TABLE_FILES, ids=lambda p: p.name)
def test_every_table_is_well_formed(path):
    assert path.exists(), f"{path.name} is missing"
    text = path.read_text(encoding="utf-8")
    assert tables(text), f"{path.name} has no tables: the parser found nothing to check"
    assert table_problems(text) == []


@pytest.mark.parametrize("path", TABLE_FILES, ids=lambda p: p.name)
def test_every_relative_link_resolves(path):
    assert link_problems(path) == []


def test_readme_links_to_the_experiment_log_and_the_licence():
    targets = re.findall(r"\]\(([^)#]+)", prose(README.read_text(encoding="utf-8")))
    assert "EXPERIMENTS.md" in targets and "LICENSE" in targets


def _python_blocks():
    return [b for b in code_blocks(README.read_text(encoding="utf-8")) if b["lang"] in ("python", "py")]


def test_readme_has_python_examples_and_every_skip_gives_a_reason():
    blocks = _python_blocks()
    assert sum(b["not_run"] is None for b in blocks) >= 2, "the README should have runnable examples"
    assert all(b["not_run"] != "" for b in blocks), "a block marked 'not run' must say why"


@pytest.mark.parametrize("block", [b for b in _python_blocks() if b["not_run"] is None],
                         ids=lambda b: f"README.md:{b['line']}")
def test_readme_python_example_runs(block):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # a user's environment
    result = subprocess.run([sys.executable, "-c", block["code"]], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (f"the example at README.md line {block['line']} failed:\n"
                                    f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}")


def _section(text: str, heading: str) -> str:
    """The body of the '## heading' section, up to the next heading of level 2."""
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start: end if end >= 0 else len(text)]


def test_the_copy_list_for_lte_is_complete(tmp_path):
    """A module built from only the names the README tells a user to copy (plus the file's imports)
    runs LTE attention and gives what tiny_hybrid gives, in training, eval and decoding."""
    source = (ROOT / "tiny_hybrid.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    top_level = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            top_level[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            if isinstance(target, ast.Name):
                top_level[target.id] = node
    section = _section(README.read_text(encoding="utf-8"), "Copying one mixer into another project")
    named = {n for n in re.findall(r"`(\w+)`", section) if n in top_level} - {"Config"}
    assert {"LTEAttention", "LTERouter", "attention"} <= named, f"the README's copy list: {sorted(named)}"

    imports = "\n".join(ast.get_source_segment(source, n) for n in tree.body
                        if isinstance(n, (ast.Import, ast.ImportFrom)))
    copied = "\n\n".join(ast.get_source_segment(source, node) for name, node in top_level.items() if name in named)
    path = tmp_path / "copied_lte.py"
    path.write_text(imports + "\n\n" + copied + "\n", encoding="utf-8")
    spec = importlib.util.spec_from_file_location("copied_lte", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    config = th.Config(d_model=32, n_head=4, n_kv_head=2, head_dim=8, window=8, lte_buffer=4,
                       lte_dropout=0.0, key_conv=2)
    torch.manual_seed(0)
    ours = th.LTEAttention(config)
    theirs = module.LTEAttention(config)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 40, 32)
    for training in (True, False):
        ours.train(training), theirs.train(training)
        torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=0)
    state_ours, state_theirs = ours.init_state(2), theirs.init_state(2)
    ours(x[:, :30], state_ours), theirs(x[:, :30], state_theirs)                   # prefill
    torch.testing.assert_close(theirs(x[:, 30:], state_theirs), ours(x[:, 30:], state_ours), rtol=0, atol=0)
