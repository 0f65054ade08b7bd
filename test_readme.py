"""The documentation works as written: the Python examples of README.md and of the topic pages in
docs/ run, every table in README.md, EXPERIMENTS.md and docs/*.md is well formed, every relative
link or image in them resolves, every topic page is linked from README.md, and the names
docs/copying.md says to copy for a mixer are enough to run it.

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
EXPERIMENTS = ROOT / "EXPERIMENTS.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))                     # the topic pages
MARKDOWN_FILES = (README, EXPERIMENTS, *DOCS)

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

def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_the_topic_pages_are_there():
    assert len(DOCS) >= 6, f"docs/ holds only {[p.name for p in DOCS]}"


@pytest.mark.parametrize("path", MARKDOWN_FILES, ids=_name)
def test_every_table_is_well_formed(path):
    assert path.exists(), f"{_name(path)} is missing"
    text = path.read_text(encoding="utf-8")
    if path in (README, EXPERIMENTS):    # both hold tables: the parser must find them
        assert tables(text), f"{_name(path)} has no tables: the parser found nothing to check"
    assert table_problems(text) == []


@pytest.mark.parametrize("path", MARKDOWN_FILES, ids=_name)
def test_every_relative_link_resolves(path):
    assert link_problems(path) == []


def test_readme_links_every_topic_page():
    """A page in docs/ that the README does not link is a page a newcomer never finds."""
    targets = set(re.findall(r"\]\(([^)#]+)", prose(README.read_text(encoding="utf-8"))))
    assert {f"docs/{p.name}" for p in DOCS} - targets == set()


def test_readme_links_to_the_experiment_log_and_the_licence():
    targets = re.findall(r"\]\(([^)#]+)", prose(README.read_text(encoding="utf-8")))
    assert "EXPERIMENTS.md" in targets and "LICENSE" in targets


def _python_blocks(path: Path) -> list[dict]:
    """The Python blocks of one page, each with the page's name."""
    blocks = code_blocks(path.read_text(encoding="utf-8"))
    return [dict(b, page=_name(path)) for b in blocks if b["lang"] in ("python", "py")]


def test_readme_has_python_examples_and_every_skip_gives_a_reason():
    readme = _python_blocks(README)
    assert sum(b["not_run"] is None for b in readme) >= 2, "the README should have runnable examples"
    blocks = readme + [b for page in DOCS for b in _python_blocks(page)]
    assert all(b["not_run"] != "" for b in blocks), "a block marked 'not run' must say why"


@pytest.mark.parametrize("block", [b for page in (README, *DOCS) for b in _python_blocks(page) if b["not_run"] is None],
                         ids=lambda b: f"{b['page']}:{b['line']}")
def test_readme_python_example_runs(block):
    """Every runnable Python block of README.md and docs/*.md, as a user runs it: in a fresh
    interpreter at the repository's root."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # a user's environment
    result = subprocess.run([sys.executable, "-c", block["code"]], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (f"the example at {block['page']} line {block['line']} failed:\n"
                                    f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}")


def _section(text: str, heading: str) -> str:
    """The body of the '## heading' section, up to the next heading of level 2."""
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start: end if end >= 0 else len(text)]


def test_setup_starts_on_the_first_screens():
    """A newcomer reaches the install within 60 lines: what this is and the result come first."""
    lines = README.read_text(encoding="utf-8").splitlines()
    assert lines.index("## Setup") < 60, f"## Setup is on line {lines.index('## Setup') + 1}"


def test_setup_is_a_fresh_environment_then_install_and_test_and_ci_runs_it():
    """README's Setup block: a fresh virtual environment (its first line), then two commands,
    install and test. .ci/run reads that block from the README and runs it, so CI does what a
    newcomer does; the optional CPU build of torch asks for requirements.txt's range."""
    setup = _section(README.read_text(encoding="utf-8"), "Setup")
    blocks = [b for b in code_blocks(setup) if b["lang"] == "bash"]
    commands = [line.split("#")[0].strip() for line in blocks[0]["code"].splitlines()]
    assert [c for c in commands if c] == ["python3 -m venv .venv && source .venv/bin/activate",
                                          "pip install -r requirements.txt", "python -m pytest -q"]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "## Setup" in ci and "pip install" not in ci    # the README's install, not its own
    assert 'test_command="python -m pytest -q"' in ci and "\npython -m pytest -q\n" in ci   # and its test command
    torch_range = re.search(r"^torch(\S+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert f'pip install "torch{torch_range}" --index-url https://download.pytorch.org/whl/cpu' in setup


# ---------------------------------------------------------------------------------------------
# Copying a mixer: docs/copying.md's lists are exactly what a copy needs, and the copy trains and decodes
# ---------------------------------------------------------------------------------------------

COPYING = ROOT / "docs" / "copying.md"
# mixer: (how to build it from a copied module and its settings, its bullet in docs/copying.md)
COPIED = {"Gated DeltaNet": lambda mod, cfg: mod.GatedDeltaNet(cfg),
          "SWA": lambda mod, cfg: mod.Attention(cfg, window=cfg.window),
          "NSA": lambda mod, cfg: mod.NativeSparseAttention(cfg),
          "LTE": lambda mod, cfg: mod.LTEAttention(cfg)}
ROOTS = {"Gated DeltaNet": {"GatedDeltaNet"}, "SWA": {"Attention"}, "NSA": {"NativeSparseAttention"},
         "LTE": {"LTEAttention", "optimizer_groups"}}
SOURCE = (ROOT / "tiny_hybrid.py").read_text(encoding="utf-8")
MOST_PIECES = 15                        # checks.py counts as one piece, every copied name as one


def top_level_definitions(tree: ast.Module) -> dict[str, ast.stmt]:
    """Functions, classes and assigned names at the top of a module, by name (a tuple assignment
    defines each of its names)."""
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            for name in ast.walk(target):
                if isinstance(name, ast.Name):
                    found[name.id] = node
    return found


def needed(roots, definitions) -> set[str]:
    """The top-level names that `roots` read, directly or through each other (annotations aside:
    under `from __future__ import annotations` they are never evaluated; a name a class body
    assigns is its own attribute, not a use)."""
    def used_by(name):
        node = definitions[name]
        annotations = {id(a) for n in ast.walk(node) for a in (getattr(n, "annotation", None), getattr(n, "returns", None))
                       if a is not None}
        skip = {id(n) for a in ast.walk(node) if id(a) in annotations for n in ast.walk(a)}
        return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
                and n.id in definitions and id(n) not in skip}
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(used_by(name))
    return seen


def copy_list(mixer: str) -> tuple[set[str], list[str], int]:
    """From docs/copying.md: the names to copy for `mixer` (its bullet and the one for every
    mixer), the settings its table row says it reads, and the pieces its count says it takes."""
    text = COPYING.read_text(encoding="utf-8")
    bullets = {m.group(1): m.group(2) for m in re.finditer(r"^- \*\*(.+?)\*\*:(.*?)(?=^\S|^- |\Z)", text, re.M | re.S)}
    assert {"Every mixer", *COPIED} <= set(bullets), f"bullets found: {sorted(bullets)}"
    names = set(re.findall(r"`(\w+)`", bullets["Every mixer"] + bullets[mixer]))
    rows = [cells for cells in map(split_row, without_fences(text).splitlines()) if len(cells) == 2]
    settings = {cells[0]: cells[1] for cells in rows if "`" in cells[1]}
    pieces = {cells[0]: cells[1] for cells in rows if cells[1].isdigit()}
    counted = {"Gated DeltaNet": "Gated DeltaNet", "SWA": "sliding-window (or full) attention", "NSA": "NSA",
               "LTE": "LTE"}[mixer]
    return names, re.findall(r"`(\w+)`", settings[mixer]), int(pieces[counted])


class Settings:
    """Exactly the given attributes, remembering which ones were read."""

    def __init__(self, values: dict):
        self.values, self.read = values, set()

    def __getattr__(self, name):
        if name not in self.values:
            raise AttributeError(f"docs/copying.md does not list the setting {name!r}")
        self.read.add(name)
        return self.values[name]


def mix(m, x, state=None):
    """A mixer's output and LTE's penalty (0.0 for the others, whose forward returns y alone)."""
    out = m(x, state)
    return out if isinstance(out, tuple) else (out, 0.0)


@pytest.mark.parametrize("mixer", COPIED)
def test_a_mixer_copied_by_the_docs_list_trains_and_decodes(mixer, tmp_path, monkeypatch):
    """Cut exactly the names docs/copying.md lists for one mixer out of tiny_hybrid.py (with the
    file's imports: torch, checks.py and the standard library) into a fresh module. The list must be
    what the mixer needs with Config, no name more or less, and with checks.py at most 15 pieces, as
    the page counts them; the copy, built from an object holding only the settings the page lists,
    trains (forward, backward with LTE's penalty, an optimizer step with optimizer_groups) exactly as
    tiny_hybrid does, and decodes: prefill + steps = parallel."""
    tree = ast.parse(SOURCE)
    definitions = top_level_definitions(tree)
    names, settings, pieces = copy_list(mixer)
    assert names <= set(definitions), f"not defined in tiny_hybrid.py: {sorted(names - set(definitions))}"
    roots = {"Config"} | ROOTS[mixer]
    assert names == needed(roots, definitions), (
        f"missing {sorted(needed(roots, definitions) - names)}, not needed {sorted(names - needed(roots, definitions))}")
    assert pieces == len(names) + 1 <= MOST_PIECES, f"{len(names)} names and checks.py, the page says {pieces}"

    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    modules = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0] for n in imports for a in n.names}
    assert modules <= {"__future__", "math", "warnings", "dataclasses", "torch", "checks"}, modules
    lines = SOURCE.splitlines()
    first_line = lambda n: min([n.lineno] + [d.lineno for d in getattr(n, "decorator_list", [])])   # @dataclass too
    copied = ["\n".join(lines[first_line(n) - 1: n.end_lineno]) for n in tree.body
              if n in imports or any(n is definitions[name] for name in names)]
    path = tmp_path / "copied_mixer.py"
    path.write_text("\n\n".join(copied) + "\n", encoding="utf-8")
    spec = importlib.util.spec_from_file_location("copied_mixer", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "copied_mixer", module)        # as an import would (dataclass needs it)
    spec.loader.exec_module(module)

    small = dict(d_model=32, n_head=4, n_kv_head=2, head_dim=8, gdn_heads=2, gdn_chunk_size=8, window=8,
                 key_conv=2, lte_sink=2, lte_buffer=3, lte_dropout=0.0, lte_lambda_every=1, nsa_block=4, nsa_topn=3)
    config = module.Config(**small)                                 # the copied Config, its defaults
    only_listed = Settings({name: getattr(config, name) for name in settings})
    torch.manual_seed(0)
    ours = COPIED[mixer](th, th.Config(**small))
    theirs = COPIED[mixer](module, only_listed)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 40, 32)

    results = []
    for m, groups in ((ours, th.optimizer_groups), (theirs, module.optimizer_groups if mixer == "LTE" else None)):
        m.train()
        y, penalty = mix(m, x)
        if mixer == "LTE":
            assert penalty.requires_grad and penalty > 0
        (y.square().mean() + penalty).backward()
        grads = [p.grad.clone() for p in m.parameters()]
        optimizer = torch.optim.AdamW((groups or th.optimizer_groups)(m, lr=1e-2, router_lr_scale=config.lte_router_lr_scale))
        optimizer.step()
        if mixer == "LTE":
            m.update_lambda()                                       # the controller runs every step here
            grads.append(m.l1_lambda.clone())
        results.append((y.detach(), grads, [p.detach().clone() for p in m.parameters()]))
    (y1, g1, p1), (y2, g2, p2) = results
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)
    for a, b in zip(g1 + p1, g2 + p2):
        torch.testing.assert_close(b, a, rtol=0, atol=0)

    theirs.eval()
    with torch.no_grad():
        full, _ = mix(theirs, x)
        state = theirs.init_state(2)
        decoded = torch.cat([mix(theirs, x[:, :25], state)[0]] + [mix(theirs, x[:, t: t + 1], state)[0]
                                                                   for t in range(25, 40)], 1)
        torch.testing.assert_close(full, mix(ours.eval(), x)[0], rtol=0, atol=0)
    torch.testing.assert_close(decoded, full, rtol=1e-5, atol=1e-5)
    assert only_listed.read == set(settings), f"listed but never read: {sorted(set(settings) - only_listed.read)}"


def local_imports(path: Path) -> set[str]:
    """The repository's modules that `path` imports anywhere in it (inside functions too)."""
    local = {p.stem for p in ROOT.glob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return (found & local) - {path.stem}


def test_no_module_imports_itself_back_through_others():
    """The layout's rule: no import circle between the repository's modules, however long and
    wherever the import sits (a lazy import inside a function counts). Tests are left out."""
    graph = {p.stem: local_imports(p) for p in ROOT.glob("*.py") if not p.stem.startswith(("test_", "conftest"))}
    assert {"tiny_hybrid", "kernels", "train_shakespeare", "checks"} <= set(graph)

    def reachable(start):
        seen, todo = set(), list(graph[start])
        while todo:
            name = todo.pop()
            if name in graph and name not in seen:
                seen.add(name)
                todo.extend(graph[name])
        return seen

    circles = sorted(name for name in graph if name in reachable(name))
    assert not circles, f"modules that import themselves back: {circles}"
    assert not any("train_shakespeare" in imports for imports in graph.values())   # main hands over


def test_the_import_check_catches_a_circle(tmp_path, monkeypatch):
    (tmp_path / "a.py").write_text("def f():\n    import b\n", encoding="utf-8")
    (tmp_path / "b.py").write_text("from a import f\n", encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert local_imports(tmp_path / "a.py") == {"b"} and local_imports(tmp_path / "b.py") == {"a"}
