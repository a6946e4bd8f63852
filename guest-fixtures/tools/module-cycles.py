#!/usr/bin/env python3
"""Module import circles in the guest crates.

For every crate under guest-fixtures/ (a directory with Cargo.toml and src/), builds the graph
"top-level module A refers to `crate::B`" from every `crate::` path in A's code (comments and
doc links are not imports; a module's
own `mod tests` at the end of its file and the crate's test-only modules are left out: test
code may look at anything), then prints every strongly connected component of more than one
module (a circle). Exit status 1 if there is one.

Usage: tools/module-cycles.py [guest-fixtures dir]
"""
import os
import re
import sys

ROOT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..")
PATH_RE = re.compile(r"\bcrate::(\w+)")
GROUP_RE = re.compile(r"\bcrate::\{([^}]*)\}")
TEST_MOD_RE = re.compile(r"^#\[cfg\(test\)\]\s*\n\s*mod tests\b", re.M)
ROOT_FILES = {"lib.rs", "main.rs"}
COMMENT_RE = re.compile(r"//[^\n]*")


def strip_tests(text):
    m = TEST_MOD_RE.search(text)
    return text[: m.start()] if m else text


def test_only_modules(lib_text):
    """Modules declared under #[cfg(test)] in the crate root."""
    return set(re.findall(r"#\[cfg\(test\)\]\s*\n\s*(?:pub(?:\(crate\))?\s+)?mod (\w+);", lib_text))


def crate_graph(src):
    lib = os.path.join(src, "lib.rs")
    skip = test_only_modules(open(lib).read()) if os.path.exists(lib) else set()
    graph = {}
    for dirpath, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), src)
            parts = rel[:-3].split(os.sep)
            if parts[0] == "bin" or (len(parts) == 1 and f in ROOT_FILES):
                continue
            module = parts[0]
            if module in skip or (len(parts) > 1 and parts[-1] in skip):
                continue
            text = strip_tests(open(os.path.join(dirpath, f)).read())
            text = COMMENT_RE.sub("", text)  # doc links are not imports
            deps = set(PATH_RE.findall(text))
            for group in GROUP_RE.findall(text):
                deps |= {g.strip().split("::")[0] for g in group.split(",") if g.strip()}
            deps.discard(module)
            graph.setdefault(module, set()).update(deps)
    for m in graph:
        graph[m] &= set(graph)  # only modules (not re-exports such as `crate::Policy`)
    return graph


def circles(graph):
    """Tarjan's strongly connected components of size > 1."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main():
    found = False
    for crate in sorted(os.listdir(ROOT)):
        src = os.path.join(ROOT, crate, "src")
        if not (os.path.isfile(os.path.join(ROOT, crate, "Cargo.toml")) and os.path.isdir(src)):
            continue
        graph = crate_graph(src)
        cs = circles(graph)
        edges = sum(len(d) for d in graph.values())
        if cs:
            found = True
            for c in cs:
                print(f"{crate}: circle of {len(c)} modules: {' '.join(c)}")
        else:
            print(f"{crate}: {len(graph)} modules, {edges} edges, no circle")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
