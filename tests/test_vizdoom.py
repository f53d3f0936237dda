"""ViZDoom made here (prepare/vizdoom.py): the layout, reproducibility, the action convention, errors.

python -m pytest tests/test_vizdoom.py

The vizdoom package is an optional dependency (CI installs it); without it these tests skip, except the
one-line error that says what to install.
"""

import os
import sys

import h5py
import numpy as np
import pytest

from conftest import ROOT, run_script
from data import HDF5Dataset
from prepare import vizdoom

SMALL = dict(episodes=5, length=12, resolution=48, seed=0, progress=False)


def needs_vizdoom():
    pytest.importorskip("vizdoom", reason="the optional vizdoom package (pip install vizdoom)")


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    needs_vizdoom()
    path = tmp_path_factory.mktemp("vizdoom") / "small.h5"
    counts = vizdoom.write_vizdoom(str(path), **SMALL)
    return path, counts


def test_a_few_episodes_make_a_file_of_the_documented_layout(small_file):
    path, counts = small_file
    assert (counts["train"], counts["val"], counts["test"]) == (3, 1, 1)            # 8:1:1, at least one each
    with h5py.File(path) as f:
        names = [n.decode() for n in f["action_names"][()]]
        assert names == ["TURN_LEFT", "TURN_RIGHT", "MOVE_FORWARD"] == counts["buttons"]
        assert [n.decode() for n in f["state_names"][()]] == ["HEALTH"]
        for split, n in (("train", 3), ("val", 1), ("test", 1)):
            assert f[f"{split}_data"].shape == (n * 12, 48, 48, 3) and f[f"{split}_data"].dtype == np.uint8
            assert list(f[f"{split}_idx"]) == [12 * i for i in range(n)]
            actions = f[f"{split}_actions"][()]
            assert actions.dtype == np.float32 and actions.shape == (n * 12, 3)
            assert (actions.sum(1) == 1).all() and set(np.unique(actions)) == {0.0, 1.0}   # one-hot
            health = f[f"{split}_states"][()]
            assert health.shape == (n * 12, 1) and (health > 0).all()                   # one life each
    # The dataset reader hands out each window's actions and states with its frames.
    item = HDF5Dataset(path, sequence_length=8, train=True, resolution=48)[(0, 0)]
    assert item["video"].shape == (3, 8, 48, 48) and item["actions"].shape == (8, 3) and item["states"].shape == (8, 1)


def test_the_same_seed_gives_the_same_bytes(small_file, tmp_path):
    path, _ = small_file
    again, other = tmp_path / "again.h5", tmp_path / "other.h5"
    vizdoom.write_vizdoom(str(again), **SMALL)
    assert open(again, "rb").read() == open(path, "rb").read()
    vizdoom.write_vizdoom(str(other), **dict(SMALL, seed=1))
    with h5py.File(path) as a, h5py.File(other) as b:
        assert not np.array_equal(a["train_data"][()], b["train_data"][()])


def test_the_engine_leaves_nothing_in_the_working_folder(tmp_path, monkeypatch):
    """The engine writes _vizdoom/ and _vizdoom.ini where it runs: in a scratch folder, removed after."""
    needs_vizdoom()
    monkeypatch.chdir(tmp_path)
    vizdoom.write_vizdoom("out.h5", episodes=3, length=4, resolution=16, progress=False)
    assert os.listdir(tmp_path) == ["out.h5"] and os.getcwd() == str(tmp_path)


def horizontal_shift(a, b, most=12):
    """How many pixels the view moved right from frame a to frame b (grey levels, best of -most..most)."""
    a, b = a.astype(np.float32).mean(-1), b.astype(np.float32).mean(-1)
    w = a.shape[1]
    error = lambda d: np.mean((a[:, max(0, -d):w - max(0, d)] - b[:, max(0, d):w - max(0, -d)]) ** 2)
    return min(range(-most, most + 1), key=error)


def turn_shifts(frames, actions, length):
    """{button: [how far the view moved right from frame t to t + 1]} over the first and last steps of each
    held action: a label one step late (or early) names the other button at one of the two ends."""
    shifts = {0: [], 1: [], 2: []}
    for t in range(1, len(frames) - 2):
        ends = actions[t] != actions[t - 1] or actions[t] != actions[t + 1]
        if t % length and (t + 1) % length and (t + 2) % length and ends:      # inside one episode
            shifts[int(actions[t])].append(horizontal_shift(frames[t], frames[t + 1]))
    return {k: np.array(v) for k, v in shifts.items()}


def test_actions_t_is_the_button_after_frame_t_and_turns_the_view_that_way(tmp_path):
    """On rendered frames: after TURN_LEFT at frame t the world moves right in frame t + 1, after TURN_RIGHT
    left (the view turned); after MOVE_FORWARD it does not turn. Read where the button changes, so that
    actions one step off (the button that led *to* frame t) fail."""
    needs_vizdoom()
    path = tmp_path / "turns.h5"
    vizdoom.write_vizdoom(str(path), episodes=10, length=40, resolution=64, seed=3, progress=False)
    with h5py.File(path) as f:
        frames, actions = f["train_data"][()], f["train_actions"][()].argmax(1)
    left, right, forward = (turn_shifts(frames, actions, 40)[i] for i in range(3))
    assert len(left) >= 8 and len(right) >= 8 and len(forward) >= 8, (len(left), len(right), len(forward))
    assert (left > 0).mean() > 0.8 and (right < 0).mean() > 0.8, (left, right)
    assert np.abs(forward).mean() < np.abs(left).mean() / 2
    # The same frames with the actions one step late, or early: the check above would not hold.
    for shifted in (np.r_[actions[:1], actions[:-1]], np.r_[actions[1:], actions[-1:]]):
        off = turn_shifts(frames, shifted, 40)
        assert not ((off[0] > 0).mean() > 0.8 and (off[1] < 0).mean() > 0.8), (off[0], off[1])


def test_the_built_in_policy_holds_its_actions_and_uses_every_button(small_file):
    path, _ = small_file
    with h5py.File(path) as f:
        actions = f["train_actions"][()].argmax(1).reshape(3, 12)
    runs = [np.diff(np.flatnonzero(np.diff(np.r_[-1, row, -1]))) for row in actions]
    assert np.mean(np.concatenate(runs)) >= 2.5                     # each action held for several steps
    assert set(actions.ravel()) == {0, 1, 2}


def always_forward(obs):
    return obs["buttons"].index("MOVE_FORWARD")


def test_a_policy_of_ones_own_plugs_in_with_one_flag(tmp_path):
    needs_vizdoom()
    out = tmp_path / "mine.h5"
    r = run_script("-m prepare", "vizdoom", out, "--episodes", "3", "--length", "6", "--resolution", "32",
                   "--policy", "test_vizdoom:always_forward",
                   env=dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1 train, 1 val and 1 test episodes of 6 frames" in r.stdout
    with h5py.File(out) as f:
        assert (f["train_actions"][()].argmax(1) == 2).all() and f.attrs["policy"] == "test_vizdoom:always_forward"


def one_line(tmp_path, argv):
    """The command's one-line error; nothing is left where the output would have gone."""
    from prepare.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(["vizdoom", str(tmp_path / "out.h5"), "--episodes", "3", "--length", "4", "--resolution", "16"] + argv)
    message = str(e.value.code)
    assert message.startswith("prepare: error: ") and "\n" not in message
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out.h5")]
    return message


def test_every_error_is_one_line_and_leaves_no_file(tmp_path, monkeypatch):
    needs_vizdoom()
    assert "unknown scenario 'battle2': the vizdoom package ships basic, " in one_line(tmp_path, ["--scenario", "battle2"])
    assert "health_gathering_supreme" in one_line(tmp_path, ["--scenario", "battle2"])
    (tmp_path / "bad.cfg").write_text("doom_scenario_path = nothing_here.wad\navailable_buttons = { }\n")
    msg = one_line(tmp_path, ["--scenario", str(tmp_path / "bad.cfg")])
    assert msg.startswith(f"prepare: error: {tmp_path / 'bad.cfg'}: ")
    assert one_line(tmp_path, ["--scenario", str(tmp_path / "missing.cfg")]).endswith("missing.cfg: no such scenario file")
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    from prepare.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(["vizdoom", str(blocked / "out.h5"), "--episodes", "3", "--length", "4"])
    assert str(e.value.code).startswith("prepare: error: ") and "a_file" in str(e.value.code)
    # Interrupted while playing: nothing written (the file appears whole, at the end, or not at all).
    monkeypatch.setattr(vizdoom, "play_episode", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        vizdoom.write_vizdoom(str(tmp_path / "out.h5"), episodes=3, length=4, resolution=16, progress=False)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out.h5")]


def test_without_vizdoom_the_command_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vizdoom", None)              # import vizdoom now raises ImportError
    assert one_line(tmp_path, []) == "prepare: error: " + vizdoom.MISSING
