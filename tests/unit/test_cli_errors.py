"""Bad input: one line naming the problem, exit 2, and nothing started."""

import pytest

from dynamem.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["vm", "exec", "--memory", "1X", "--", "true"], "malformed size '1X'"),
        (["vm", "exec", "--memory=-5G", "--", "true"], "malformed size '-5G'"),
        (["vm", "exec", "--memory", "", "--", "true"], "malformed size ''"),
        (["vm", "exec", "--accel", "hvf", "--", "true"], "unknown accelerator 'hvf'"),
        (
            ["vm", "exec", "--qemu", "/nonexistent/qemu", "--", "true"],
            "/nonexistent/qemu not found",
        ),
        (["vm", "exec", "--guest", "nosuchguest", "--", "true"], "unknown guest 'nosuchguest'"),
        (["vm", "exec"], "no command given"),
        (["frobnicate"], "invalid choice"),
        (
            ["resize", "--mechanism", "virtio-mem", "--variant", "bbm", "--by", "-64M"],
            "not a multiple of the virtio-mem/bbm granularity 128M",
        ),
        (["resize", "--mechanism", "dimm", "--by", "-100M"], "not a multiple of the dimm"),
        (["resize", "--mechanism", "balloon", "--by", "+256M"], "above its boot RAM 2G"),
        (["resize", "--mechanism", "dimm", "--by", "0"], "must be greater than zero"),
        (["resize", "--mechanism", "dimm", "--by", "-1X"], "malformed resize '1X'"),
        (["resize", "--mechanism", "dimm", "--by", "+512M", "--maxmem", "2G"], "maxmem is 2G"),
        (["resize", "--mechanism", "dimm", "--by", "+64G"], "at most 256"),
        (["resize", "--mechanism", "baloon", "--by", "-1G"], "unknown mechanism 'baloon'"),
        (["resize", "--mechanism", "balloon", "--by", "-3G"], "cannot shrink a 2G guest"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, needle):
    code, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("dynamem: error: ")
    assert needle in err


def test_missing_guest_image_says_how_to_build_it(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAMEM_CACHE", str(tmp_path))
    code, err = run(capsys, "vm", "exec", "--", "true")
    assert code == 2
    assert "not built; run: dynamem guest build minimal" in err
