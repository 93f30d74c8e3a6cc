#!/usr/bin/env python3
"""Checks of the docs (README.md and docs/**/*.md), run by ctest (tests/CMakeLists.txt: docs.*).

  docs_check.py links ROOT             every relative link resolves: the file or directory
                                       exists, and an anchor (#heading) names a heading of its
                                       Markdown file (GitHub's slugs). Web links are not followed.
  docs_check.py snippets ROOT OUT.cpp  writes every ```cpp block as one translation unit, which
                                       CMake compiles with -fsyntax-only against the library

The convention for code blocks (docs/README.md says it to writers):
  - a ```cpp block is compiled. It is namespace-scope code (#include lines, declarations,
    functions), so a snippet made of statements is written inside a function, whose parameters
    say what the snippet is given. Each block gets a namespace of its own; its #include lines
    go to the top of the unit. `#line` directives make the compiler's messages name the
    Markdown file and line.
  - a ```cpp block whose first line is a comment starting with `// fragment` is not compiled:
    an excerpt with elisions (`...`), upstream code shown for comparison.
  - other languages (```bash, ```text, ```python, ```cmake) are not checked here.
Only the Python standard library is used.
"""

import pathlib
import re
import sys
import urllib.parse

FENCE = re.compile(r"^(\s*)(`{3,})\s*([^`\s]*)[^`]*$")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target "title") and ![alt](target); the text may hold one level of brackets.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")


def markdown_files(root):
    files = [root / "README.md"] if (root / "README.md").is_file() else []
    return files + sorted((root / "docs").rglob("*.md")) if (root / "docs").is_dir() else files


def closes(line, fence):
    """True when `line` closes a block opened by `fence` (as many backticks, or more)."""
    stripped = line.strip()
    return len(stripped) >= len(fence) and set(stripped) == {"`"}


def prose_lines(text):
    """(line number, line) outside fenced code blocks, inline code blanked."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(2)
            continue
        if fence is not None:
            if closes(line, fence):
                fence = None
            continue
        yield number, INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line)


def slug(heading):
    """GitHub's anchor for a heading: its text as rendered, lower case, punctuation dropped
    (letters, digits, '_' and '-' stay), spaces as '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.replace("`", "")
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path, cache={}):
    if path not in cache:
        seen = {}
        found = set()
        for _, line in prose_lines(path.read_text(encoding="utf-8")):
            match = HEADING.match(line)
            if not match:
                continue
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
        cache[path] = found
    return cache[path]


def check_links(root):
    root = root.resolve()
    problems = []
    checked = 0
    for path in markdown_files(root):
        where = path.relative_to(root)
        for number, line in prose_lines(path.read_text(encoding="utf-8")):
            targets = [m.group(1) for m in INLINE_LINK.finditer(line)]
            definition = REFERENCE_DEFINITION.match(line)
            if definition:
                targets.append(definition.group(1))
            for target in targets:
                if not target or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
                    continue  # a web link (https:, mailto:): not followed here
                checked += 1
                problem = check_target(root, path, target)
                if problem:
                    problems.append(f"{where}:{number}: ({target}) {problem}")
    for problem in problems:
        print(problem)
    print(f"docs_check: {checked} relative links checked, {len(problems)} broken")
    return 1 if problems else 0


def check_target(root, source, target):
    file_part, _, anchor = target.partition("#")
    file_part = urllib.parse.unquote(file_part)
    if file_part.startswith("/"):
        return "is absolute: write it relative to the file"
    destination = (source.parent / file_part).resolve() if file_part else source
    if root not in destination.parents and destination != root:
        return "leaves the repository"
    if not destination.exists():
        return "does not exist"
    if anchor:
        if destination.suffix != ".md" or not destination.is_file():
            return "has an anchor, but is not a Markdown file (line anchors rot: link the file)"
        if urllib.parse.unquote(anchor) not in anchors(destination):
            return f"names no heading of {destination.relative_to(root)}"
    return None


def cpp_blocks(path):
    """(first line number, lines) of each ```cpp block that is not a fragment."""
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, language = match.group(1), match.group(2), match.group(3)
        body = []
        i += 1
        start = i + 1
        while i < len(lines) and not closes(lines[i], fence):
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1
        if language == "cpp" and not (body and body[0].lstrip().startswith("// fragment")):
            yield start, body


def write_snippets(root, output):
    root = root.resolve()
    includes = []
    parts = []
    count = 0
    for path in markdown_files(root):
        where = path.relative_to(root).as_posix()
        for start, body in cpp_blocks(path):
            count += 1
            code = []
            for offset, line in enumerate(body):
                if line.lstrip().startswith("#include"):
                    includes.append(f'#line {start + offset} "{where}"\n{line.strip()}')
                    code.append("")  # keeps the lines of the block where they are
                else:
                    code.append(line)
            parts.append(f"namespace docs_snippet_{count} {{\n"
                         f'#line {start} "{where}"\n' + "\n".join(code) +
                         f"\n}}  // namespace docs_snippet_{count}\n")
    text = ("// Generated by tests/docs_check.py from the ```cpp blocks of README.md and docs/:"
            " edit those.\n"
            "// A snippet shows a call: what it returns, or a parameter, need not be used.\n"
            '#pragma GCC diagnostic ignored "-Wunused-variable"\n'
            '#pragma GCC diagnostic ignored "-Wunused-but-set-variable"\n'
            '#pragma GCC diagnostic ignored "-Wunused-parameter"\n' + "\n".join(includes) +
            "\n\n" + "\n".join(parts))
    output = pathlib.Path(output)
    if not output.exists() or output.read_text(encoding="utf-8") != text:
        output.write_text(text, encoding="utf-8")  # unchanged: not rewritten, not recompiled
    print(f"docs_check: {count} code blocks in {output}")
    return 0


def main(argv):
    if len(argv) == 3 and argv[1] == "links":
        return check_links(pathlib.Path(argv[2]))
    if len(argv) == 4 and argv[1] == "snippets":
        return write_snippets(pathlib.Path(argv[2]), argv[3])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
