"""The agent's state folder: work folders that hostile jobs leave behind."""

from __future__ import annotations

import os

from fairu.agent.state import StateDir


def test_remove_work_dir_handles_deep_tree(tmp_path):
    state = StateDir(tmp_path / "state")
    state.prepare()
    output = state.make_work_dir("deep-job")
    # 1500 levels: shutil.rmtree fails with RecursionError at about 1000.
    path = output
    for _ in range(1500):
        path = path / "d"
        os.mkdir(path)

    state.remove_work_dir("deep-job")

    assert list(state.work.iterdir()) == []
    state.close()
