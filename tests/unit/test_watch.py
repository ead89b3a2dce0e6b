"""device/policy/watch.py: noticing that the policy files changed."""

from __future__ import annotations

import os
from pathlib import Path

from hotplug.device.policy.watch import PolicyWatcher, policy_files


def test_watcher_sees_edits_replacements_and_dropins(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text("version: 1\n")
    watcher = PolicyWatcher(tmp_path)
    assert not watcher.changed()
    (tmp_path / "policy.yaml").write_text("version: 1\nrules: []\n")  # in place
    assert watcher.changed() and not watcher.changed()  # once per change
    dropins = tmp_path / "policy.d"
    dropins.mkdir()
    assert watcher.changed()
    (dropins / "10-lab.yaml").write_text("version: 1\n")
    assert watcher.changed()
    tmp = tmp_path / ".policy.yaml.new"
    tmp.write_text("version: 1\nrules: []\n")  # same size: only the inode tells
    os.replace(tmp, tmp_path / "policy.yaml")
    assert watcher.changed()
    (dropins / "10-lab.yaml").unlink()
    assert watcher.changed()


def test_watcher_on_a_single_file(tmp_path: Path) -> None:
    path = tmp_path / "my.yaml"
    assert policy_files(path) == [path]
    watcher = PolicyWatcher(path)
    path.write_text("version: 1\n")  # appears
    assert watcher.changed()
    watcher.mark()
    assert not watcher.changed()
