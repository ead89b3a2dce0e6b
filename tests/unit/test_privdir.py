"""State directories are ours alone (issue 12, finding 15)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hotplug.kernel.sysfs import BUSID_RE
from hotplug.privdir import ensure_private_dir
from hotplug.state import StateError


def test_a_new_directory_is_made_0700_and_an_open_one_tightened(tmp_path: Path) -> None:
    """Issue 12, finding 15: an existing state directory was left as it was."""
    fresh = tmp_path / "run" / "usbipa"
    assert ensure_private_dir(fresh) is False
    assert fresh.stat().st_mode & 0o777 == 0o700
    fresh.chmod(0o777)
    assert ensure_private_dir(fresh) is True
    assert fresh.stat().st_mode & 0o777 == 0o700


def test_a_symlink_or_a_file_is_refused(tmp_path: Path) -> None:
    """Issue 12, finding 15: only a real directory of ours will do."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(StateError, match="is not a directory"):
        ensure_private_dir(tmp_path / "link")
    (tmp_path / "file").write_text("")
    with pytest.raises(StateError, match="cannot create state directory"):
        ensure_private_dir(tmp_path / "file")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    """Issue 12, finding 15: another user's directory could hold swapped records."""
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(StateError, match="belongs to uid 65534, not to us"):
        ensure_private_dir(theirs)


@pytest.mark.parametrize("text", ["1-1\n", "1-1\n2", "\uff11-1", "\u0661-1", "1-1.\u0662", " 1-1"])
def test_busid_pattern_takes_only_ascii_digits_and_no_trailing_newline(text: str) -> None:
    """Issue 12, finding 15: BUSID_RE took "1-1\\n" and Unicode digits."""
    assert BUSID_RE.match(text) is None


@pytest.mark.parametrize("text", ["1-1", "3-2.4", "10-1.2.3"])
def test_busid_pattern_takes_busids(text: str) -> None:
    assert BUSID_RE.match(text)
