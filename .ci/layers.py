#!/usr/bin/env python3
"""Fails when the crate's top-level modules import each other in a circle.

Each file under src/ belongs to the top-level module it sits in (src/relay/claimer.rs is
`relay`); an edge is a `crate::<module>` path in its code (tests and comments left out, the
root's re-exports mapped to the module that defines them). See docs/architecture.md.
"""
import glob
import re
import sys
from collections import defaultdict

def root_reexports():
    """The crate root's `pub use module::{names}` lines, as name -> module."""
    lib = open("src/lib.rs").read()
    found = {}
    for module, names in re.findall(r"pub use (\w+)::\{([^}]*)\};", lib):
        for name in re.findall(r"\w+", names):
            found[name] = module
    for module, name in re.findall(r"pub use (\w+)::(\w+);", lib):
        found[name] = module
    return found


ROOT_REEXPORTS = root_reexports()


def module_of(path):
    relative = path[len("src/"):]
    if relative in ("lib.rs", "main.rs", "testing.rs"):
        return None
    return relative.split("/")[0].removesuffix(".rs")


edges = defaultdict(set)
for path in glob.glob("src/**/*.rs", recursive=True):
    module = module_of(path)
    if module is None:
        continue
    code = re.split(r"#\[cfg\(test\)\]\s*mod tests", open(path).read())[0]
    code = re.sub(r"//.*", "", code)
    for name in re.findall(r"crate::([A-Za-z_]+)", code):
        target = ROOT_REEXPORTS.get(name, name)
        if target != module and target[0].islower() and target != "self":
            edges[module].add(target)

cycles = set()


def walk(node, path):
    for nxt in edges.get(node, ()):
        if nxt in path:
            cycle = path[path.index(nxt):] + [nxt]
            cycles.add(" -> ".join(cycle))
        elif len(path) < 16:
            walk(nxt, path + [nxt])


for start in sorted(edges):
    walk(start, [start])
if cycles:
    print("modules import each other in a circle:")
    for cycle in sorted(cycles):
        print("  " + cycle)
    sys.exit(1)
print(f"module imports point one way ({sum(map(len, edges.values()))} edges between {len(edges)} modules)")
