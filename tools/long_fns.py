#!/usr/bin/env python3
"""Lists Rust functions longer than N lines (default 80) under src/, outside `#[cfg(test)]` modules.

Usage: python3 tools/long_fns.py [N] [DIR]. Counts from the `fn` line to its closing brace, by brace
matching on code with strings, chars and comments blanked (good enough for this crate's style).
"""
import re
import sys
from pathlib import Path

LIMIT = int(sys.argv[1]) if len(sys.argv) > 1 else 80
ROOT = Path(sys.argv[2] if len(sys.argv) > 2 else "src")
FN = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+\"C\"\s+)?fn\s+(\w+)")


def blank(line, state):
    """Blanks strings and comments; `state` carries an open block comment / raw string."""
    out, i = [], 0
    while i < len(line):
        if state.get("block"):
            j = line.find("*/", i)
            if j < 0:
                return "".join(out)
            state["block"] = False
            i = j + 2
            continue
        c = line[i]
        if line.startswith("//", i):
            break
        if line.startswith("/*", i):
            state["block"] = True
            i += 2
            continue
        if c == '"':
            j = i + 1
            while j < len(line) and line[j] != '"':
                j += 2 if line[j] == "\\" else 1
            i = j + 1
            continue
        if c == "'" and re.match(r"'(\\.|[^\\'])'", line[i:]):
            i += len(re.match(r"'(\\.|[^\\'])'", line[i:]).group(0))
            continue
        out.append(c)
        i += 1
    return "".join(out)


def scan(path):
    lines = path.read_text().splitlines()
    state, depth, test_depth, stack, found = {}, 0, None, [], []
    pending_test = False
    pending_fn = None
    for n, raw in enumerate(lines, 1):
        if "#[cfg(test)]" in raw:
            pending_test = True
        code = blank(raw, state)
        m = FN.match(raw)
        if m and test_depth is None:
            pending_fn = (m.group(7), n)
        if pending_fn and ";" in code and "{" not in code:
            pending_fn = None  # a declaration without a body (trait method)
        if pending_fn and "{" in code:
            stack.append((pending_fn[0], pending_fn[1], depth))
            pending_fn = None
        if pending_test and re.search(r"\bmod\s+\w+", code) and "{" in code:
            test_depth = depth
            pending_test = False
        for ch in code:
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if stack and depth == stack[-1][2]:
                    name, start, _ = stack.pop()
                    if n - start + 1 > LIMIT:
                        found.append((n - start + 1, f"{path}:{start}", name))
                if test_depth is not None and depth == test_depth:
                    test_depth = None
    return found


rows = sorted((r for p in sorted(ROOT.rglob("*.rs")) for r in scan(p)), reverse=True)
for length, where, name in rows:
    print(f"{length:5}  {name:32} {where}")
print(f"{len(rows)} functions over {LIMIT} lines")
