#!/usr/bin/env python3
"""List Rust functions longer than a bound or nested deeper than a bound (issue 16: "a
request-path function a reader can hold: under ~80 lines, nesting <= 4").

    scripts/fn-audit.py                      # filters/*/src and services/*/src
    scripts/fn-audit.py filters/cache/src    # some folders or files
    scripts/fn-audit.py --max-lines 60 --max-depth 3 --all

A line per function over a bound: `path:line name lines=N depth=D`, longest first; exit 1 when
there is one (0 with --report). Test code is left out: files named tests.rs or under a tests/
folder, and every item after `#[cfg(test)]` up to its closing brace.

It reads the text, not the syntax tree: a function runs from its `fn` line to the brace that
closes its body. Its depth is how many blocks are open at once inside the body (the body
itself is 0, an `if` in it 1, a `match` in that 2, a loop in one of its arms 3, ...: an arm's
own braces are part of the `match` level, as `else` is of the `if`). Braces that open a struct
literal or a pattern (`Type {`, `Enum::Variant {`), a macro's argument (`json!({`) or any other
expression after `(`, `[`, `,`, `=` or `!` are not blocks and are not counted; a closure body
(`|x| {`) is. Strings, chars and comments are skipped.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIRS = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("filters/*/src")) + sorted(
    str(p.relative_to(ROOT)) for p in ROOT.glob("services/*/src")
)
FN_RE = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?(?:const\s+)?(?:async\s+)?(?:unsafe\s+)?"
                   r"(?:extern\s+\"[^\"]*\"\s+)?fn\s+(\w+)")
IMPL_RE = re.compile(r"^\s*impl\b(?:<[^{]*?>)?\s*(?:[\w:<>, ']+\s+for\s+)?([\w:]+)")


def strip(line: str, state: dict) -> str:
    """The code of a line with strings, chars and comments blanked; `state` carries a block
    comment or a string across lines."""
    out = []
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if state.get("block"):
            if line.startswith("*/", i):
                state["block"] = False
                i += 2
            else:
                i += 1
            continue
        if state.get("raw") is not None:
            end = '"' + "#" * state["raw"]
            if line.startswith(end, i):
                state["raw"] = None
                i += len(end)
            else:
                i += 1
            continue
        if state.get("str"):
            if c == "\\":
                i += 2
            elif c == '"':
                state["str"] = False
                i += 1
            else:
                i += 1
            continue
        if line.startswith("//", i):
            break
        if line.startswith("/*", i):
            state["block"] = True
            i += 2
            continue
        m = re.match(r'b?r(#*)"', line[i:])
        if m and (i == 0 or not (line[i - 1].isalnum() or line[i - 1] == "_")):
            state["raw"] = len(m.group(1))
            i += len(m.group(0))
            out.append('""')
            continue
        if c == '"':
            state["str"] = True
            out.append('""')
            i += 1
            continue
        if c == "'":
            # A char literal ('a', '\n', '\u{1F600}', '{') or a lifetime ('a).
            m = re.match(r"'(?:\\.|\\u\{[0-9a-fA-F]+\}|[^\\'])'", line[i:])
            if m:
                out.append("' '")
                i += len(m.group(0))
                continue
        out.append(c)
        i += 1
    return "".join(out)


def opens_block(code: str, at: int) -> bool:
    """Whether the `{` at `code[at]` opens a block (see the module documentation)."""
    before = code[:at].rstrip()
    if not before:
        return True  # a `{` alone on a line: the block of the line above (a long condition)
    if before.endswith("=>"):
        return False  # a match arm's block: the `match` already counted
    last = before[-1]
    if last in "([,=!":
        return False
    m = re.search(r"([A-Za-z_][\w]*)$", before)
    if m:
        word = m.group(1)
        if word[0].isupper():
            # `Type {` or `Enum::Variant {` is a literal or a pattern; `impl X for Y {` and
            # `struct` lines never occur inside a function body we measure.
            return False
    return True


def audit_file(path: Path, max_lines: int, max_depth: int, show_all: bool) -> list[tuple]:
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    state: dict = {}
    code = [strip(line, state) for line in text]
    found = []
    skip_to = -1  # inside a #[cfg(test)] item
    impl_stack: list[tuple[str, int]] = []  # (type name, brace depth at its opening)
    depth = 0  # braces open at the start of the line (all kinds)
    i = 0
    pending_test = False
    while i < len(code):
        line = code[i]
        if i <= skip_to:
            i += 1
            continue
        if "#[cfg(test)]" in text[i].replace(" ", ""):
            pending_test = True
            i += 1
            continue
        if pending_test and "{" in line:
            skip_to = close_of(code, i)
            pending_test = False
            i = skip_to + 1
            continue
        if pending_test and line.strip().endswith(";"):
            pending_test = False
        m_impl = IMPL_RE.match(line) if not line.lstrip().startswith("fn") else None
        m = FN_RE.match(line)
        if m:
            end, body_start, fdepth = measure(code, i)
            if end is not None:
                name = m.group(1)
                owner = next((t for t, d in reversed(impl_stack) if d < depth), None)
                if owner:
                    name = f"{owner}::{name}"
                lines = end - i + 1
                if show_all or lines > max_lines or fdepth > max_depth:
                    found.append((path, i + 1, name, lines, fdepth))
                i = end + 1
                depth += sum(c == "{" for c in "".join(code[body_start:end + 1])) - sum(
                    c == "}" for c in "".join(code[body_start:end + 1]))
                # a function leaves the depth where it found it
                depth = max(depth, 0)
                continue
        if m_impl and "{" in line:
            impl_stack.append((m_impl.group(1).split("::")[-1], depth))
        depth += line.count("{") - line.count("}")
        while impl_stack and impl_stack[-1][1] >= depth:
            impl_stack.pop()
        i += 1
    return found


def close_of(code: list[str], start: int) -> int:
    """The line of the brace that closes the first `{` on line `start` or after."""
    depth = 0
    seen = False
    for j in range(start, len(code)):
        for c in code[j]:
            if c == "{":
                depth += 1
                seen = True
            elif c == "}":
                depth -= 1
                if seen and depth == 0:
                    return j
    return len(code) - 1


def measure(code: list[str], start: int):
    """(last line, line of the body's `{`, deepest block depth) of the function at `start`;
    (None, None, 0) for a declaration without a body."""
    # Find the body's `{`: the first `{` at paren/bracket/angle level 0 after the signature.
    level = 0
    for j in range(start, len(code)):
        line = code[j]
        for k, c in enumerate(line):
            if c in "([":
                level += 1
            elif c in ")]":
                level -= 1
            elif c == ";" and level == 0:
                return None, None, 0
            elif c == "{" and level == 0:
                return walk(code, j, k)
    return None, None, 0


def walk(code: list[str], line0: int, col0: int):
    stack: list[bool] = []  # for each open brace: whether it is a block
    deepest = 0
    for j in range(line0, len(code)):
        line = code[j]
        k0 = col0 if j == line0 else 0
        for k in range(k0, len(line)):
            c = line[k]
            if c == "{":
                if not stack:
                    stack.append(True)  # the body
                    continue
                block = opens_block(line, k)
                stack.append(block)
                deepest = max(deepest, sum(stack) - 1)
            elif c == "}":
                stack.pop()
                if not stack:
                    return j, line0, deepest
    return len(code) - 1, line0, deepest


def files(paths: list[str]) -> list[Path]:
    out = []
    for p in paths:
        q = (ROOT / p) if not Path(p).is_absolute() else Path(p)
        if q.is_file():
            out.append(q)
            continue
        for f in sorted(q.rglob("*.rs")):
            rel = f.relative_to(q).parts
            if f.name == "tests.rs" or "tests" in rel[:-1]:
                continue
            out.append(f)
    return out


def main() -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends the listing quietly
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="*", default=DEFAULT_DIRS)
    ap.add_argument("--max-lines", type=int, default=80)
    ap.add_argument("--max-depth", type=int, default=4)
    ap.add_argument("--all", action="store_true", help="list every function")
    ap.add_argument("--report", action="store_true", help="exit 0 even when some are over")
    args = ap.parse_args()
    found = []
    for f in files(args.paths):
        found += audit_file(f, args.max_lines, args.max_depth, args.all)
    found.sort(key=lambda r: (-r[3], -r[4]))
    for path, line, name, lines, depth in found:
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        flags = []
        if lines > args.max_lines:
            flags.append("long")
        if depth > args.max_depth:
            flags.append("deep")
        print(f"{rel}:{line} {name} lines={lines} depth={depth} {' '.join(flags)}".rstrip())
    over = [r for r in found if r[3] > args.max_lines or r[4] > args.max_depth]
    print(f"{len(over)} function(s) over {args.max_lines} lines or depth {args.max_depth}",
          file=sys.stderr)
    return 0 if args.report or not over else 1


if __name__ == "__main__":
    sys.exit(main())
