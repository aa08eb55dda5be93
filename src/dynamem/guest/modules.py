"""Kernel module load order from depmod's modules.dep."""

from pathlib import PurePosixPath

from dynamem.errors import GuestBuildError


def module_name(path: str) -> str:
    """modules.dep path -> the name modprobe uses ('-' and '_' are equivalent)."""
    name = PurePosixPath(path).name
    for suffix in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """Map each module path to the paths it depends on (in depmod's order)."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        deps[path.strip()] = rest.split()
    return deps


def load_order(wanted: list[str], deps: dict[str, list[str]], builtin: set[str]) -> list[str]:
    """Paths to insmod, each after everything it depends on; built-in modules are skipped.

    Deterministic: follows the order of `wanted`, dependencies first (depth first).
    """
    by_name = {module_name(p): p for p in deps}
    builtin_names = {module_name(p) for p in builtin}
    order: list[str] = []
    visiting: set[str] = set()

    def visit(path: str) -> None:
        if path in order:
            return
        if path in visiting:
            raise GuestBuildError(f"module dependency cycle at {path}")
        visiting.add(path)
        # depmod lists dependencies most-dependent first; load the deepest first.
        for dep in reversed(deps.get(path, [])):
            visit(dep)
        visiting.discard(path)
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key in by_name:
            visit(by_name[key])
        elif key not in builtin_names:
            raise GuestBuildError(f"kernel module {name!r} is neither a module nor built in")
    return order
