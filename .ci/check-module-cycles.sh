#!/usr/bin/env bash
# Enforces DESIGN.md §2's "dependencies point one way": no cycle between the crate's
# top-level modules (`admin` never imports `daemon`; the two meet through `control`),
# and no cycle between the sibling submodules of one top-level module
# (`store::retention` and `store::db`, `sip::error` and `sip::message`, ...).
#
# Usage: check-module-cycles.sh [ROOT]   (ROOT defaults to the repository root)
# Prints the graph of top-level modules (`from -> to  (n references)`), then checks both
# levels. Exit 0 when both are acyclic; exit 1 listing every cycle with one file:line of
# each of its edges.
#
# What counts as a reference, in every src/**/*.rs but the crate roots (lib.rs only
# declares modules; main.rs is the binary, which sees the library as `sipbridge::`):
# - a path `crate::X...` (in `use`, in a type or an expression; `use crate::{X, Y}`
#   counts both), resolved to the top-level module X and, inside X, to its submodule;
# - a path `super::...` (and `self::` in a module's root file), resolved against the
#   file's own module path: it is internal to the top-level module unless it climbs out
#   of it, and it links two submodules when it names a sibling.
# A file src/X.rs or src/X/** belongs to module X; src/X/a.rs, src/X/a/** to X::a (the
# file src/X/mod.rs or src/X.rs is X's root, which its children may use freely: only
# edges between siblings count at the second level). Whole-line comments and trailing
# `//` comments are skipped, and so is a file's unit-test module (from its
# `#[cfg(test)]` line to the end of the file), as in .ci/check-sans-io.sh.
set -euo pipefail

root="${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
if [[ ! -d "$root/src" ]]; then
    echo "check-module-cycles: no src/ under $root: nothing to check"
    exit 0
fi

exec python3 - "$root" <<'PY'
import os
import re
import sys

root = sys.argv[1]
src = os.path.join(root, "src")

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
# `crate::` or a chain of `super::`/`self::`, then what follows (a name or a `{` group).
PATH_RE = re.compile(r"(?<![A-Za-z0-9_:])((?:crate|(?:super::)*super|self))::(\{|" + IDENT + r")")


def module_path(rel):
    """src-relative file path -> module path (list of names)."""
    parts = rel[:-3].split(os.sep)  # drop ".rs"
    if parts[-1] == "mod":
        parts = parts[:-1]
    if parts in (["lib"], ["main"]):
        return None
    return parts


def strip_code(line):
    """The line without its trailing `//` comment and without string contents."""
    out = []
    i, n = 0, len(line)
    in_str = False
    while i < n:
        c = line[i]
        if in_str:
            if c == "\\":
                i += 2
                continue
            if c == '"':
                in_str = False
                out.append(c)
            i += 1
            continue
        if c == '"':
            in_str = True
            out.append(c)
        elif c == "/" and line.startswith("//", i):
            break
        else:
            out.append(c)
        i += 1
    return "".join(out)


def group_names(text, start):
    """Top-level names in a `{...}` group starting at text[start] == '{'."""
    depth, names, token, i = 0, [], "", start
    expect = True
    while i < len(text):
        c = text[i]
        if c == "{":
            depth += 1
            if depth == 1:
                expect = True
                token = ""
        elif c == "}":
            depth -= 1
            if depth == 0:
                if token:
                    names.append(token)
                return names, i
        elif depth == 1:
            if c == ",":
                if token:
                    names.append(token)
                token, expect = "", True
            elif expect and (c.isalnum() or c == "_"):
                token += c
            elif token:
                names.append(token)
                token, expect = "", False
        i += 1
    return names, i


files = []
for dirpath, dirnames, filenames in os.walk(src):
    dirnames.sort()
    for f in sorted(filenames):
        if f.endswith(".rs"):
            full = os.path.join(dirpath, f)
            rel = os.path.relpath(full, src)
            mp = module_path(rel)
            if mp:
                files.append((full, rel, mp))

tops = {mp[0] for _, _, mp in files}
children = {}  # top -> set of submodule names
for _, _, mp in files:
    if len(mp) >= 2:
        children.setdefault(mp[0], set()).add(mp[1])

top_edges = {}  # (a, b) -> [count, first "file:line"]
sub_edges = {}  # top -> {(a, b) -> [count, first]}


def add(edges, a, b, where):
    e = edges.setdefault((a, b), [0, where])
    e[0] += 1


def resolve(mp, head, first):
    """Absolute module path (list) a reference starts with, or None."""
    if head == "crate":
        return [first]
    if head == "self":
        base = list(mp)
    else:
        ups = head.count("super")
        if ups > len(mp):
            return None
        base = list(mp[: len(mp) - ups])
    return base + [first]


for full, rel, mp in files:
    with open(full, encoding="utf-8") as fh:
        text = fh.read()
    lines = text.split("\n")
    # Join the lines of code (comments and the test tail dropped) so a `use` group
    # spanning lines is read whole; keep each character's line number.
    code, line_of = [], []
    for no, line in enumerate(lines, 1):
        if re.match(r"^\s*#\[cfg\(test\)\]", line):
            break
        if re.match(r"^\s*//", line):
            continue
        s = strip_code(line) + "\n"
        code.append(s)
        line_of.extend([no] * len(s))
    code = "".join(code)
    for m in PATH_RE.finditer(code):
        head, first = m.group(1), m.group(2)
        where = f"src/{rel}:{line_of[m.start()]}"
        if first == "{":
            names, _ = group_names(code, m.start(2))
        else:
            names = [first]
        for name in names:
            if name in ("self", "super", "crate"):
                continue
            target = resolve(mp, head, name)
            if not target:
                continue
            if target[0] not in tops and len(target) == 1:
                continue  # an item of the crate root
            if target[0] != mp[0]:
                if target[0] in tops:
                    add(top_edges, mp[0], target[0], where)
                continue
            # Inside one top-level module: an edge between two siblings.
            if len(mp) >= 2 and len(target) >= 2:
                a, b = mp[1], target[1]
                if a != b and b in children.get(mp[0], ()):
                    add(sub_edges.setdefault(mp[0], {}), a, b, where)


def cycles(nodes, edges):
    """Strongly connected components with more than one node (Tarjan)."""
    graph = {n: sorted({b for (a, b) in edges if a == n}) for n in nodes}
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for n in sorted(nodes):
        if n not in index:
            visit(n)
    return out


def report(label, comps, edges):
    lines = []
    for comp in comps:
        lines.append(f"  cycle in {label}: {' <-> '.join(comp)}")
        for (a, b), (n, where) in sorted(edges.items()):
            if a in comp and b in comp:
                lines.append(f"    {a} -> {b}  ({n} reference(s), e.g. {where})")
    return lines


print("check-module-cycles: top-level modules (from -> to  (references)):")
for (a, b), (n, where) in sorted(top_edges.items()):
    print(f"  {a} -> {b}  ({n})")
for t in sorted(tops - {a for a, _ in top_edges}):
    print(f"  {t} -> (nothing)")

failures = report("the crate", cycles(tops, top_edges), top_edges)
for top in sorted(sub_edges):
    edges = sub_edges[top]
    failures += report(top, cycles(children.get(top, set()), edges), edges)
if failures:
    print("check-module-cycles: FAILED: modules must depend on each other one way only:",
          file=sys.stderr)
    print("\n".join(failures), file=sys.stderr)
    sys.exit(1)
n_sub = sum(len(e) for e in sub_edges.values())
print(f"check-module-cycles: ok ({len(tops)} top-level modules, {len(top_edges)} edges; "
      f"{n_sub} edges between submodules, no cycle)")
PY
