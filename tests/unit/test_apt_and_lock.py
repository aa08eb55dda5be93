import pytest

from dynamem.errors import GuestBuildError
from dynamem.guest.apt import deb_filename, parse_control, parse_recursive_depends
from dynamem.guest.recipe import Lock, LockedPackage, load_recipe


def test_parse_control_splits_stanzas(fixture_text):
    stanzas = parse_control(fixture_text("apt-cache-show.txt"))
    assert [s["Package"] for s in stanzas] == ["linux-image-amd64", "libc6"]
    assert stanzas[0]["Depends"].startswith("linux-image-6.1.0-")
    assert len(stanzas[1]["SHA256"]) == 64


def test_recursive_depends_lists_each_real_package_once(fixture_text):
    names = parse_recursive_depends(fixture_text("apt-cache-depends.txt"))
    assert names == sorted(set(names))
    assert {"stress", "dropbear-bin", "libc6", "libtomcrypt1", "gcc-12-base"} <= set(names)
    assert not any(n.startswith("Depends") for n in names)


def test_virtual_packages_are_dropped():
    assert parse_recursive_depends("foo\n  Depends: <bar>\n<bar>\nbaz\n") == ["baz", "foo"]


def test_deb_filename_quotes_epochs_like_apt():
    assert deb_filename(LockedPackage("busybox-static", "1:1.35.0-4", "x")) == (
        "busybox-static_1%3a1.35.0-4"
    )


def test_lock_round_trips_and_is_sorted():
    lock = Lock("linux-image-x", (LockedPackage("b", "2", "bb"), LockedPackage("a", "1", "aa")))
    text = lock.to_json()
    again = Lock.from_json(text, "test")
    assert [p.name for p in again.packages] == ["a", "b"]
    assert again.to_json() == text


@pytest.mark.parametrize("text", ["{", '{"format": 99}', '{"format": 1, "packages": [{}]}'])
def test_malformed_locks_are_errors(text):
    with pytest.raises(GuestBuildError):
        Lock.from_json(text, "lockfile")


def test_the_committed_lock_pins_everything_the_recipe_names():
    recipe = load_recipe("minimal")
    lock = recipe.load_lock()
    names = {p.name for p in lock.packages}
    assert set(recipe.packages) <= names
    assert lock.kernel in names and lock.kernel.startswith("linux-image-6.1.")
    assert all(len(p.sha256) == 64 and p.version for p in lock.packages)
