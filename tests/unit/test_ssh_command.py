import shlex
import subprocess

import pytest

from dynamem.ssh import guest_command

HOSTILE = ["; rm -rf /", "$(reboot)", "`id`", "a'b\"c", "x\ny", "--", "*", "&& true"]


@pytest.mark.parametrize("word", HOSTILE)
def test_argv_words_reach_the_program_verbatim(word):
    line = guest_command(["printf", "%s", word], timeout=5)
    # Run the same line in a local sh with a stand-in `timeout`, as the guest would.
    out = subprocess.run(["sh", "-c", line], capture_output=True, text=True, check=True)
    assert out.stdout == word


def test_the_guest_enforces_the_deadline_itself():
    words = shlex.split(guest_command(["sleep", "100"], timeout=2.5))
    assert words[:2] == ["timeout", "3"]
    assert words[2:4] == ["sh", "-c"]


def test_a_string_is_a_deliberate_shell_snippet():
    words = shlex.split(guest_command("echo a | wc -c", timeout=10))
    assert words[-1] == "echo a | wc -c"
