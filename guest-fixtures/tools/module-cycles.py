#!/usr/bin/env python3
"""Module import circles in the crates of a directory (the guest crates by default).

For every crate under the given directory (a directory with Cargo.toml and src/;
guest-fixtures/ by default, `.` for the host crates), builds the graph "file module A refers to
module B" from every `crate::`, `super::` and child-relative path in A's code (nested modules
count on their own: `a/b.rs` is `a::b`; comments and doc links are not imports; inline
`mod x { }` blocks count as part of their file; a module's own `mod tests` at the end of its
file and the crate's test-only modules are left out: test code may look at anything), then
prints every strongly connected component of more than one module (a circle). Exit status 1 if
there is one.

Usage: tools/module-cycles.py [DIR]   (test.sh runs it on . and on guest-fixtures)
"""
import os
import re
import sys

ROOT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..")
PATH_RE = re.compile(r"\b(crate|super)((?:::\w+)+)")
GROUP_RE = re.compile(r"\b(crate|super)((?:::\w+)*)::\{([^}]*)\}")
TEST_MOD_RE = re.compile(r"^#\[cfg\(test\)\]\s*\n\s*mod tests\b", re.M)
ROOT_FILES = {"lib.rs", "main.rs"}
COMMENT_RE = re.compile(r"//[^\n]*")
CHILD_RE = re.compile(r"(?<![:\w])(\w+)::")


def strip_tests(text):
    m = TEST_MOD_RE.search(text)
    return text[: m.start()] if m else text


def test_only_modules(lib_text):
    """Modules declared under #[cfg(test)] in the crate root."""
    return set(re.findall(r"#\[cfg\(test\)\]\s*\n\s*(?:pub(?:\(crate\))?\s+)?mod (\w+);", lib_text))


def module_files(src):
    """(module path tuple, file) for every file module of the crate, tests and bins left out."""
    lib = os.path.join(src, "lib.rs")
    skip = test_only_modules(open(lib).read()) if os.path.exists(lib) else set()
    for dirpath, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), src)
            parts = rel[:-3].split(os.sep)
            if parts[0] == "bin" or (len(parts) == 1 and f in ROOT_FILES):
                continue
            if parts[-1] == "mod":
                parts = parts[:-1]
            if parts[0] in skip or parts[-1] == "tests":
                continue
            yield tuple(parts), os.path.join(dirpath, f)


def resolve(known, path):
    """The longest prefix of `path` that is a known module (None: the crate root or an item)."""
    for n in range(len(path), 0, -1):
        if path[:n] in known:
            return path[:n]
    return None


def crate_graph(src):
    files = dict(module_files(src))
    known = set(files)
    graph = {m: set() for m in known}
    for module, path in files.items():
        text = COMMENT_RE.sub("", strip_tests(open(path).read()))  # doc links are not imports
        refs = []
        for kind, rest in PATH_RE.findall(text):
            refs.append((kind, rest.strip(":").split("::")))
        for kind, rest, group in GROUP_RE.findall(text):
            head = [p for p in rest.strip(":").split("::") if p]
            for item in group.split(","):
                item = item.strip()
                if item:
                    refs.append((kind, head + item.split("::")[0:1]))
        # Paths relative to this module (`use child::x;`, `child::f()`) name its own children.
        for word in set(CHILD_RE.findall(text)):
            if module + (word,) in known:
                graph[module].add(module + (word,))
        for kind, segs in refs:
            base = () if kind == "crate" else module[:-1]
            target = resolve(known, base + tuple(segs))
            if target is not None and target != module:
                graph[module].add(target)
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
                names = " ".join("::".join(m) for m in c)
                print(f"{crate}: circle of {len(c)} modules: {names}")
        else:
            print(f"{crate}: {len(graph)} modules, {edges} edges, no circle")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
