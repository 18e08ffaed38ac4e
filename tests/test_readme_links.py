"""README.md links only what the repository holds: relative links, backticked repository paths, `#anchors`.

Three checks (`tests/test_readme.py` runs the fenced blocks' commands and checks the layout block's modules):

* every relative markdown link (`[text](path)`, `[text]: path`) names a file or folder `git ls-files` holds;
* every backticked path that looks like one of ours — `fluxexport/…`, `scripts/…`, `tests/…`, `Dockerfile…`,
  `.ci/…`, or a package module such as `runtime/flux2.py` (read under `fluxexport/`) — names a tracked file or
  folder (placeholders such as `scripts/NAME.py` aside), and so does every `fluxexport/…`, `scripts/…`, `tests/…`,
  `Dockerfile…` or `.ci/…` word inside a fenced block;
* every `#anchor` link (`[text](#anchor)`, `[text](README.md#anchor)`) is the GitHub slug of one of its headings.
"""

from __future__ import annotations

import re
import subprocess
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^[ \t]*\[[^\]\n]+\]:[ \t]*<?(\S+?)>?(?:[ \t]+\"[^\"\n]*\")?[ \t]*$", re.M)
CODE_SPAN = re.compile(r"(`+)((?:(?!\n[ \t]*\n).)+?)\1", re.S)  # may cross lines, not a blank one
OURS = re.compile(r"(?<![\w./-])((?:fluxexport|scripts|tests|\.ci)/[\w./-]*|Dockerfile[\w.]*)")
MODULE = re.compile(r"(?<![\w./-])((?:[a-z_]\w*/)+[\w-]+\.(?:py|json|sh))(?![\w/])")
PLACEHOLDER = re.compile(r"(?:^|/)[A-Z][A-Z_]*(?:\.\w+)?$|[…<>{}*]")


def repository_paths(root: Path = ROOT) -> set[str]:
    """Every tracked file, and every folder above one (as `dir` and `dir/`)."""
    listed = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout
    files = set(listed.splitlines())
    folders = {str(parent) for file in files for parent in Path(file).parents if str(parent) != "."}
    return files | folders | {f"{folder}/" for folder in folders}


def split_fences(text: str) -> tuple[str, str]:
    """(prose, code): the text with fenced blocks blanked, and with everything but their bodies blanked; blanks are
    spaces, so an offset in either is the same offset in the text."""
    prose, code, inside = [], [], False
    for line in text.splitlines():
        fence = FENCE.match(line) is not None
        if fence:
            inside = not inside
        body = inside and not fence
        blank = " " * len(line)
        prose.append(blank if inside or fence else line)
        code.append(line if body else blank)
    return "\n".join(prose), "\n".join(code)


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading's text (github-slugger): links keep their text, then lower case, every
    character but letters, digits, marks, `-`, `_` and spaces dropped, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) → text
    text = re.sub(r"<[^>]+>", "", text)  # inline html
    kept = (ch for ch in text.lower() if ch in "-_ " or unicodedata.category(ch)[0] in "LNM")
    return "".join(kept).replace(" ", "-")


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a markdown text (a repeated slug gets -1, -2, …)."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for line in split_fences(text)[0].splitlines():
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match[2])
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def link_targets(prose: str) -> list[tuple[int, str]]:
    """(offset, target) of the prose's markdown links, code spans aside, in order."""
    outside_code = CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m[0]), prose)
    found = [(m.start(), m[1]) for pattern in (INLINE_LINK, REFERENCE_LINK) for m in pattern.finditer(outside_code)]
    return sorted(found)


def path_tokens(code: str) -> list[tuple[int, str]]:
    """(offset, word) of the path-like words of a code span, in order, each once."""
    found = sorted((m.start(), m[1]) for pattern in (OURS, MODULE) for m in pattern.finditer(code))
    return list({token: (offset, token) for offset, token in reversed(found)}.values())[::-1]


def path_problem(token: str, paths: set[str], package: set[str]) -> str | None:
    """What is wrong with a path-like word (None: it exists, or it is not a repository path)."""
    token = token.rstrip(".,:;")
    if PLACEHOLDER.search(token):
        return None
    if OURS.fullmatch(token):
        return None if token in paths else f"`{token}` is not in the repository"
    first = token.split("/")[0]
    if first in package:
        candidate = f"fluxexport/{token}"
        return None if candidate in paths else f"`{token}` is not in the repository (as {candidate})"
    return None  # engines/…, a hub id, a user's folder


def readme_problems(text: str, paths: set[str], readme_name: str = "README.md") -> list[str]:
    """Every dangling relative link, repository path (in code spans; in fenced blocks, the `fluxexport/`,
    `scripts/`, `tests/`, `Dockerfile…`, `.ci/` ones) and #anchor of a README, one line each, in order."""
    anchors = heading_anchors(text)
    package = {p.split("/")[1] for p in paths if p.startswith("fluxexport/") and p.count("/") >= 2}
    prose, code = split_fences(text)
    problems: list[tuple[int, str]] = []
    for offset, target in link_targets(prose):
        if re.match(r"^[a-z][\w+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        if file and file not in paths:
            problems.append((offset, f"link {target} names {file}, which the repository does not hold"))
        elif anchor and file in ("", readme_name) and anchor not in anchors:
            problems.append((offset, f"link {target} points to no heading (no #{anchor})"))
    for span in CODE_SPAN.finditer(prose):
        for offset, token in path_tokens(span[2]):
            problem = path_problem(token, paths, package)
            if problem:
                problems.append((span.start(2) + offset, problem))
    for match in OURS.finditer(code):
        problem = path_problem(match[1], paths, set())
        if problem:
            problems.append((match.start(), problem))
    return [f"{readme_name}:{line_of(text, offset)}: {problem}" for offset, problem in sorted(problems)]


def test_readme_links_only_what_the_repository_holds():
    problems = readme_problems(README.read_text(encoding="utf-8"), repository_paths())
    assert problems == [], "\n".join(problems)


def test_github_slugs():
    """The anchors GitHub renders for headings like the README's."""
    assert github_slug("Models (`--model`)") == "models---model"
    assert github_slug("FP8 and TensorRT (GPU hosts)") == "fp8-and-tensorrt-gpu-hosts"
    assert github_slug("FLUX.2 ([klein] and [dev])") == "flux2-klein-and-dev"
    assert github_slug("Serving at scale (Kubernetes, KServe, several GPUs)") == (
        "serving-at-scale-kubernetes-kserve-several-gpus"
    )
    assert github_slug("Real-size export on a small host (`scripts/bench_scale.py`)") == (
        "real-size-export-on-a-small-host-scriptsbench_scalepy"
    )
    assert github_slug("Step caching: 3× fewer steps — measured") == "step-caching-3-fewer-steps--measured"
    assert github_slug("See [Install](#install) first") == "see-install-first"
    assert heading_anchors("# A\n## A\n```\n# not a heading\n```\n### A\n") == {"a", "a-1", "a-2"}


def test_the_check_finds_what_dangles_where_it_is():
    """Each kind of dangling reference is found, with its line; what exists, URLs and placeholders pass."""
    paths = repository_paths()
    text = "\n".join(
        [
            "# Title",  # 1
            "## Quick start (`--model`)",  # 2
            "[ok](#quick-start---model) [ok](README.md#title) [web](https://example.com/x#y) [ok](scripts/)",  # 3
            "[gone](#quick-start) and [gone](#nowhere) `[not a link](#nowhere)`",  # 4
            "[file](ARCHITECTURE.md) [file](tests/no_such_test.py#L3) [ok](tests/test_readme.py)",  # 5
            "`fluxexport/specs.py`, `scripts/bench_nothing.py`, `Dockerfile.gpu`, `.ci/walk`",  # 6
            "`triton/client.py` `fluxexport/specs/` `scripts/NAME.py` `tests/…` `engines/x/y.py` `Dockerfile`",  # 7
            "`triton/releases.py` and `COLUMNS=80 python",  # 8
            "scripts/bench_gone.py` across a line break",  # 9
            "```bash",
            "[inside a fence](#nowhere) bash scripts/gpu_check.sh && python scripts/bench_gone.py",  # 11
            "```",
            "[ref]: docs/missing.md",  # 13
        ]
    )
    assert readme_problems(text, paths) == [
        "README.md:4: link #quick-start points to no heading (no #quick-start)",
        "README.md:4: link #nowhere points to no heading (no #nowhere)",
        "README.md:5: link ARCHITECTURE.md names ARCHITECTURE.md, which the repository does not hold",
        "README.md:5: link tests/no_such_test.py#L3 names tests/no_such_test.py, which the repository does not hold",
        "README.md:6: `fluxexport/specs.py` is not in the repository",
        "README.md:6: `scripts/bench_nothing.py` is not in the repository",
        "README.md:6: `Dockerfile.gpu` is not in the repository",
        "README.md:6: `.ci/walk` is not in the repository",
        "README.md:8: `triton/releases.py` is not in the repository (as fluxexport/triton/releases.py)",
        "README.md:9: `scripts/bench_gone.py` is not in the repository",
        "README.md:11: `scripts/bench_gone.py` is not in the repository",
        "README.md:13: link docs/missing.md names docs/missing.md, which the repository does not hold",
    ]
