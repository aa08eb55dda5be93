import pytest

from dynamem.guest.apt import sha256_file
from dynamem.guest.build import build, find_image
from dynamem.guest.recipe import load_recipe

pytestmark = pytest.mark.slow


def test_second_build_is_a_cache_hit(image):
    again, hit = build(load_recipe("minimal"))
    assert hit
    assert again.directory == image.directory


def test_clean_rebuild_is_byte_identical(image):
    before = dict(image.manifest["sha256"])
    rebuilt, hit = build(load_recipe("minimal"), force=True)
    assert not hit
    assert rebuilt.manifest["sha256"] == before
    assert sha256_file(rebuilt.initrd) == before["initrd.img"]


def test_manifest_records_pins_and_module_order(image):
    lock = load_recipe("minimal").load_lock()
    assert image.manifest["packages"] == {p.name: p.version for p in lock.packages}
    modules = image.manifest["modules"]
    assert modules.index("virtio") < modules.index("virtio_mem")
    assert "virtio_balloon" in modules and "qemu_fw_cfg" in modules


def test_a_corrupt_image_is_detected(image, tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "guests" / image.directory.name
    shutil.copytree(image.directory, copy)
    monkeypatch.setenv("DYNAMEM_CACHE", str(tmp_path))
    with copy.joinpath("initrd.img").open("r+b") as f:
        f.seek(1000)
        f.write(b"\xff\xff\xff\xff")
    with pytest.raises(Exception, match="fails its checksum"):
        find_image(load_recipe("minimal"))
