import pytest

from dynamem.errors import GuestBuildError
from dynamem.guest.modules import load_order, module_name, parse_modules_dep

WANTED = [
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "virtio_console",
    "virtio-rng",
    "virtio_balloon",
    "virtio_mem",
    "zram",
    "qemu_fw_cfg",
]


@pytest.fixture
def deps(fixture_text):
    return parse_modules_dep(fixture_text("modules.dep"))


@pytest.fixture
def builtin(fixture_text):
    return set(fixture_text("modules.builtin").split())


def test_every_module_comes_after_its_dependencies(deps, builtin):
    order = load_order(WANTED, deps, builtin)
    for i, path in enumerate(order):
        for dep in deps[path]:
            assert dep in order[:i], f"{dep} must load before {path}"


def test_each_requested_module_is_loaded_once(deps, builtin):
    order = load_order(WANTED, deps, builtin)
    assert len(order) == len(set(order))
    assert {module_name(p) for p in order} >= {w.replace("-", "_") for w in WANTED}
    # zram pulls in zsmalloc, virtio_net the failover pair: real kernel dependencies.
    names = [module_name(p) for p in order]
    assert names.index("zsmalloc") < names.index("zram")
    assert names.index("failover") < names.index("net_failover") < names.index("virtio_net")


def test_builtin_modules_are_skipped_and_unknown_ones_refused(deps, builtin):
    assert load_order(["zswap"], deps, builtin) == []
    with pytest.raises(GuestBuildError, match="nosuchmod"):
        load_order(["nosuchmod"], deps, builtin)


def test_order_is_deterministic(deps, builtin):
    assert load_order(WANTED, deps, builtin) == load_order(WANTED, deps, builtin)


def test_cycles_are_reported():
    with pytest.raises(GuestBuildError, match="cycle"):
        load_order(["a"], {"a.ko": ["b.ko"], "b.ko": ["a.ko"]}, set())
