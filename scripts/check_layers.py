#!/usr/bin/env python3
"""Checks the module structure of src/: no import cycle between sibling modules (at any
level: a module may use its parent's items and its own children, but two siblings may
not depend on each other, directly or round a loop), and the layering of the library:
the jobs and engine layers never reach the wire (proto) or the API.

Every `crate::`, `super::` and `self::` path in a file counts, in `use` lines and inline.
Exits non-zero, naming the modules of each cycle and each layering breach.
"""

import re
import sys
from pathlib import Path

# Modules that may not use any module under the listed prefixes.
FORBIDDEN = {
    "engine": ("proto", "api", "jobs", "server", "telemetry"),
    "jobs": ("proto", "api", "server"),
}


def module_files(src: Path, root_file: str, binary: bool) -> dict:
    """Module path (tuple of names) -> file, for the library (everything but src/cli) or
    the binary (src/main.rs and src/cli)."""
    modules = {(): src / root_file}
    for path in src.rglob("*.rs"):
        relative = path.relative_to(src)
        if str(relative) in ("lib.rs", "main.rs") or (relative.parts[0] == "cli") != binary:
            continue
        parts = list(relative.with_suffix("").parts)
        if parts[-1] == "mod":
            parts.pop()
        modules[tuple(parts)] = path
    return modules


def expand_use(text: str) -> list:
    """The paths a `use` tree names: `a::{b, c::{d, e}}` -> a::b, a::c::d, a::c::e."""
    text = re.sub(r"\s+as\s+\w+", "", text)
    text = re.sub(r"\s+", "", text)
    brace = text.find("{")
    if brace < 0:
        return [text]
    prefix, inner = text[:brace], text[brace + 1 : text.rfind("}")]
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(inner):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(inner[start:i])
            start = i + 1
    parts.append(inner[start:])
    return [p for part in parts if part for p in expand_use(prefix + part)]


def referenced_paths(source: str) -> list:
    """Every path in a file that starts at crate, super or self."""
    source = re.sub(r"//[^\n]*", "", source)
    paths = []
    for match in re.finditer(r"\buse\s+([^;]+);", source):
        paths.extend(expand_use(match.group(1)))
    for match in re.finditer(r"\b(crate|super|self)((?:::\w+)+)", source):
        paths.append(match.group(1) + match.group(2))
    return [p for p in paths if p.split("::")[0] in ("crate", "super", "self")]


def resolve(module: tuple, path: str, modules: dict):
    """The module a path from `module` lands in (the longest existing prefix)."""
    segments = path.split("::")
    head = segments.pop(0)
    if head == "crate":
        base = []
    elif head == "self":
        base = list(module)
    else:
        base = list(module[:-1])
        while segments and segments[0] == "super":
            segments.pop(0)
            base = base[:-1]
    target = tuple(base)
    for segment in segments:
        candidate = target + (segment,)
        if candidate not in modules:
            break
        target = candidate
    return target


def lifted(a: tuple, b: tuple):
    """The edge between the children of a and b's common ancestor that contain them, or
    None when one contains the other."""
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    if common == len(a) or common == len(b):
        return None
    return a[: common + 1], b[: common + 1]


def cycles(edges: dict) -> list:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in list(edges):
        if node not in index:
            visit(node)
    return found


def check(src: Path, root_file: str, binary: bool) -> list:
    modules = module_files(src, root_file, binary)
    edges, problems = {}, []
    for module, path in modules.items():
        for reference in referenced_paths(path.read_text()):
            target = resolve(module, reference, modules)
            if module and target and module[0] in FORBIDDEN and not binary:
                if target[0] in FORBIDDEN[module[0]]:
                    problems.append(f"{'::'.join(module)} uses {'::'.join(target)} ({reference})")
            edge = lifted(module, target)
            if edge:
                edges.setdefault(edge[0], set()).add(edge[1])
    for component in cycles(edges):
        names = sorted("::".join(m) for m in component)
        problems.append(f"import cycle between {', '.join(names)}")
    return problems


def main() -> int:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "src")
    problems = check(src, "lib.rs", False) + check(src, "main.rs", True)
    for problem in problems:
        print(f"check_layers: {problem}", file=sys.stderr)
    if not problems:
        print("check_layers: no import cycle, layers respected")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
