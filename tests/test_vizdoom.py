"""ViZDoom made here (prepare/vizdoom.py): the layout, reproducibility, the action convention,
errors.

python -m pytest tests/test_vizdoom.py

The vizdoom package is an optional dependency (CI installs it); without it these tests skip, except
the one-line error that says what to install.
"""

import json
import os
import sys

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY, TINY_GPT, run_script
from data import HDF5Dataset
from metrics import (held_turns, muzzle_flash, shot_following, strafe_following, turn_following,
                     view_rows, view_shift, view_slides)
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
    assert (counts["train"], counts["val"], counts["test"]) == (3, 1, 1)  # 8:1:1, at least one each
    with h5py.File(path) as f:
        names = [n.decode() for n in f["action_names"][()]]
        assert names == ["TURN_LEFT", "TURN_RIGHT", "MOVE_FORWARD"] == counts["buttons"]
        assert [n.decode() for n in f["state_names"][()]] == ["HEALTH"]
        for split, n in (("train", 3), ("val", 1), ("test", 1)):
            assert (f[f"{split}_data"].shape == (n * 12, 48, 48, 3)
                    and f[f"{split}_data"].dtype == np.uint8)
            assert list(f[f"{split}_idx"]) == [12 * i for i in range(n)]
            actions = f[f"{split}_actions"][()]
            assert actions.dtype == np.float32 and actions.shape == (n * 12, 3)
            assert (actions.sum(1) == 1).all() and set(np.unique(actions)) == {0.0, 1.0}   # one-hot
            health = f[f"{split}_states"][()]
            assert health.shape == (n * 12, 1) and (health > 0).all()  # one life each
    # The dataset reader hands out each window's actions and states with its frames.
    item = HDF5Dataset(path, sequence_length=8, train=True, resolution=48)[(0, 0)]
    assert (item["video"].shape == (3, 8, 48, 48) and item["actions"].shape == (8, 3)
            and item["states"].shape == (8, 1))


def test_the_same_seed_gives_the_same_bytes(small_file, tmp_path):
    path, _ = small_file
    again, other = tmp_path / "again.h5", tmp_path / "other.h5"
    vizdoom.write_vizdoom(str(again), **SMALL)
    assert open(again, "rb").read() == open(path, "rb").read()
    vizdoom.write_vizdoom(str(other), **dict(SMALL, seed=1))
    with h5py.File(path) as a, h5py.File(other) as b:
        assert not np.array_equal(a["train_data"][()], b["train_data"][()])


def test_the_engine_leaves_nothing_in_the_working_folder(tmp_path, monkeypatch):
    """The engine writes _vizdoom/ and _vizdoom.ini where it runs: in a scratch folder, removed
    after."""
    needs_vizdoom()
    monkeypatch.chdir(tmp_path)
    vizdoom.write_vizdoom("out.h5", episodes=3, length=4, resolution=16, progress=False)
    assert os.listdir(tmp_path) == ["out.h5"] and os.getcwd() == str(tmp_path)


def turn_shifts(frames, actions, length):
    """{button: [how far the view moved right from frame t to t + 1]} over the first and last steps
    of each held action: a label one step late (or early) names the other button at one of the two
    ends."""
    shifts = {0: [], 1: [], 2: []}
    for t in range(1, len(frames) - 2):
        ends = actions[t] != actions[t - 1] or actions[t] != actions[t + 1]
        if t % length and (t + 1) % length and (t + 2) % length and ends:      # inside one episode
            shifts[int(actions[t])].append(view_shift(frames[t], frames[t + 1], most=12))
    return {k: np.array(v) for k, v in shifts.items()}


@pytest.fixture(scope="module")
def turns_file(tmp_path_factory):
    """10 episodes of 40 frames at 64x64: enough held turns to read."""
    needs_vizdoom()
    path = tmp_path_factory.mktemp("turns") / "turns.h5"
    vizdoom.write_vizdoom(str(path), episodes=10, length=40, resolution=64, seed=3, progress=False)
    with h5py.File(path) as f:
        return f["train_data"][()], f["train_actions"][()].argmax(1)


def test_actions_t_is_the_button_after_frame_t_and_turns_the_view_that_way(turns_file):
    """On rendered frames: after TURN_LEFT at frame t the world moves right in frame t + 1, after
    TURN_RIGHT left (the view turned); after MOVE_FORWARD it does not turn. Read where the button
    changes, so that actions one step off (the button that led *to* frame t) fail."""
    frames, actions = turns_file
    left, right, forward = (turn_shifts(frames, actions, 40)[i] for i in range(3))
    assert len(left) >= 8 and len(right) >= 8 and len(forward) >= 8, (len(left), len(right),
                                                                      len(forward))
    assert (left > 0).mean() > 0.8 and (right < 0).mean() > 0.8, (left, right)
    assert np.abs(forward).mean() < np.abs(left).mean() / 2
    # The same frames with the actions one step late, or early: the check above would not hold.
    for shifted in (np.r_[actions[:1], actions[:-1]], np.r_[actions[1:], actions[-1:]]):
        off = turn_shifts(frames, shifted, 40)
        assert not ((off[0] > 0).mean() > 0.8 and (off[1] < 0).mean() > 0.8), (off[0], off[1])


def test_the_steering_score_reads_real_turns_and_fails_swapped_ones(turns_file):
    """metrics.turn_following, the score `fvd.py steer` gives samples, is near 1 on real clips (the
    ceiling), near 0 when left and right are swapped, and counts only turns held for min_hold
    steps."""
    frames, actions = turns_file
    clips, buttons = frames.reshape(8, 40, 64, 64, 3), actions.reshape(8, 40)
    slides = view_slides(clips)
    share, count = turn_following(slides, buttons, {0: 1, 1: -1})
    assert count >= 10 and share >= 0.9, (share, count)
    swapped, _ = turn_following(slides, buttons, {0: -1, 1: 1})
    assert swapped == pytest.approx(1 - share)
    # Runs of one button, the last step of a clip left out (it leads to no frame).
    buttons = np.array([[0, 0, 0, 2, 1, 1, 1, 1], [1, 1, 2, 2, 2, 0, 0, 0]])
    assert held_turns(buttons, {0: 1, 1: -1}) == [(0, 0, 3, 1), (0, 4, 7, -1)]
    texture = np.random.default_rng(0).integers(0, 255, (32, 96, 3), dtype=np.uint8)
    shifts = (-5, 0, 3, 11)
    found = [view_shift(texture[:, 16:80], texture[:, 16 - d:80 - d]) for d in shifts]
    assert found == list(shifts)


def test_the_long_players_wall_reading_agrees_with_the_depth_buffer():
    """metrics.way_blocked reads from the picture what the data's player reads from the depth
    buffer (a wall close ahead): on rendered frames of Health Gathering Supreme played at random,
    walking into walls and away, the two agree on nine frames in ten, and both kinds occur."""
    needs_vizdoom()
    from data import preprocess, to_uint8
    from metrics import way_blocked
    from world import make_game
    rng = np.random.default_rng(0)
    by_depth, by_picture = [], []
    with make_game("health_gathering_supreme", 3) as game:
        press = np.eye(len(game.get_available_buttons()), dtype=int).tolist()
        game.new_episode()
        while len(by_depth) < 160 and not game.is_episode_finished():
            state = game.get_state()
            by_depth.append(vizdoom.Explorer.blocked(state.depth_buffer))   # (120, 160) uint8
            frame = to_uint8(preprocess(state.screen_buffer[None], 64)).numpy()[0]   # (64, 64, 3)
            by_picture.append(way_blocked(frame))
            # forward mostly, so walls come close; a turn now and then, held a while
            action = 2 if len(by_depth) % 24 < 16 else int(rng.integers(2))
            game.make_action(press[action], 4)
    by_depth, by_picture = np.array(by_depth), np.array(by_picture)
    assert len(by_depth) >= 60 and 0.15 < by_depth.mean() < 0.85, by_depth.mean()
    assert (by_depth == by_picture).mean() >= 0.9, (by_depth == by_picture).mean()


def test_a_weapon_moves_the_turn_reading_to_the_top_half():
    """metrics.view_rows: with ATTACK among the actions (a weapon drawn at the bottom), turns are
    read from the top half; without, from every row. A still sprite below pins the whole frame's
    reading at no slide, as Battle2's pistol does; the top half still reads the turn."""
    assert view_rows(["TURN_LEFT", "TURN_RIGHT", "MOVE_FORWARD"], 64) == slice(0, 64)
    assert view_rows(["TURN_LEFT", "MOVE_FORWARD+ATTACK"], 64) == slice(0, 32)
    rng = np.random.default_rng(0)
    world = rng.integers(0, 60, (32, 96, 3), dtype=np.uint8)    # dim walls that slide 5 px
    weapon = rng.integers(150, 255, (32, 64, 3), dtype=np.uint8)  # a bright sprite that stays
    a, b = (np.concatenate([world[:, 16 - d:80 - d], weapon]) for d in (0, 5))
    assert view_shift(a, b) == 0 and view_shift(a, b, rows=slice(0, 32)) == 5


def test_strafes_read_by_parallax_and_shots_by_the_muzzle_flash():
    """metrics.strafe_following: a held strafe shows when the near band (the top 3/16) slides the
    told way and further than the horizon band; a turn slides both alike and does not.
    metrics.muzzle_flash: 4 warm, bright pixels above the barrel (64x64); shot_following: a flash
    in one of the frames a shot leads to or the two after."""
    rng = np.random.default_rng(1)
    texture = rng.integers(0, 255, (64, 160, 3), dtype=np.uint8)

    def clip(near, far, steps=4):   # each step slides rows 0-11 by `near`, rows 22-33 by `far`
        frames = []
        for t in range(steps):
            f = texture[:, 48:112].copy()
            f[:12] = texture[:12, 48 - near * t:112 - near * t]
            f[22:34] = texture[22:34, 48 - far * t:112 - far * t]
            frames.append(f)
        return np.stack(frames)                                                  # (T, 64, 64, 3)
    videos = np.stack([clip(4, 2), clip(3, 3), clip(-4, -2), clip(4, 2)])
    told = np.array([[0] * 4, [0] * 4, [0] * 4, [1] * 4])   # 0: MOVE_LEFT (+1), 1: MOVE_RIGHT
    share, count = strafe_following(videos, told, {0: 1, 1: -1})
    assert count == 4 and share == 0.25   # only the first: even, backwards, the wrong way fail
    frames = np.zeros((6, 64, 64, 3), np.uint8)
    frames[2, 30, 26:30] = (255, 200, 60)            # 4 warm pixels above the barrel: a flash
    frames[3, 30, 26:29] = (255, 200, 60)            # 3: too few
    frames[4, 5, 26:34] = (255, 200, 60)             # out of the patch (the sky)
    frames[5, 30, 26:34] = (255, 255, 255)           # white, not warm
    assert muzzle_flash(frames).tolist() == [False, False, True, False, False, False]
    assert muzzle_flash(frames[:, ::2, ::2]).tolist() == [False, False, True, True, False, False]
    shots = np.array([[5, 2, 5, 5, 5, 5], [2, 5, 5, 5, 5, 5]])    # 2: ATTACK, pressed once
    videos = np.stack([frames, np.roll(frames, 2, axis=0)])       # the flash at frame 2, then 4
    # The first press leads to frame 2, which flashes; the second's frames 1-3 do not (its flash,
    # at frame 4, comes too late).
    assert shot_following(videos, shots, [2]) == (0.5, 2)


def test_the_built_in_policy_holds_its_actions_and_uses_every_button(small_file):
    path, _ = small_file
    with h5py.File(path) as f:
        actions = f["train_actions"][()].argmax(1).reshape(3, 12)
    runs = [np.diff(np.flatnonzero(np.diff(np.r_[-1, row, -1]))) for row in actions]
    assert np.mean(np.concatenate(runs)) >= 2.5  # each action held for several steps
    assert set(actions.ravel()) == {0, 1, 2}


def always_forward(obs):
    return obs["buttons"].index("MOVE_FORWARD")


def test_a_policy_of_ones_own_plugs_in_with_one_flag(tmp_path):
    needs_vizdoom()
    out = tmp_path / "mine.h5"
    r = run_script("-m prepare", "vizdoom", out, "--episodes", "3", "--length", "6",
                   "--resolution", "32", "--policy", "test_vizdoom:always_forward",
                   env=dict(os.environ,
                            PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1 train, 1 val and 1 test episodes of 6 frames" in r.stdout
    with h5py.File(out) as f:
        assert ((f["train_actions"][()].argmax(1) == 2).all()
                and f.attrs["policy"] == "test_vizdoom:always_forward")


def one_line(tmp_path, argv):
    """The command's one-line error; nothing is left where the output would have gone."""
    from prepare.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(["vizdoom", str(tmp_path / "out.h5"), "--episodes", "3", "--length", "4",
              "--resolution", "16"] + argv)
    message = str(e.value.code)
    assert message.startswith("prepare: error: ") and "\n" not in message
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out.h5")]
    return message


def test_every_error_is_one_line_and_leaves_no_file(tmp_path, monkeypatch):
    needs_vizdoom()
    unknown = one_line(tmp_path, ["--scenario", "battle3"])
    assert "unknown scenario 'battle3': the vizdoom package ships basic, " in unknown
    assert "health_gathering_supreme" in unknown
    (tmp_path / "bad.cfg").write_text("doom_scenario_path = nothing_here.wad\navailable_buttons = "
                                      "{ }\n")
    msg = one_line(tmp_path, ["--scenario", str(tmp_path / "bad.cfg")])
    assert msg.startswith(f"prepare: error: {tmp_path / 'bad.cfg'}: ")
    missing = one_line(tmp_path, ["--scenario", str(tmp_path / "missing.cfg")])
    assert missing.endswith("missing.cfg: no such scenario file")
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    from prepare.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(["vizdoom", str(blocked / "out.h5"), "--episodes", "3", "--length", "4"])
    assert str(e.value.code).startswith("prepare: error: ") and "a_file" in str(e.value.code)
    # Interrupted while playing: nothing written (the file appears whole, at the end, or not at
    # all).
    monkeypatch.setattr(vizdoom, "play_episode",
                        lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        vizdoom.write_vizdoom(str(tmp_path / "out.h5"), episodes=3, length=4, resolution=16,
                              progress=False)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out.h5")]


def test_without_vizdoom_the_command_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vizdoom", None)  # import vizdoom now raises ImportError
    import world
    assert one_line(tmp_path, []) == "prepare: error: " + world.MISSING


def test_a_tiny_action_conditional_prior_trains_on_vizdoom_and_is_steered_by_name(small_file,
                                                                                  tmp_path,
                                                                                  digits_h5):
    """The whole path of the README's ViZDoom block at toy sizes: VQ-VAE, a prior with the paper's
    conditional norms, sample.py told actions by name, and the steering score with its picture."""
    import sample
    import train
    from metrics import dream_main, steer_main
    path, _ = small_file
    vq, prior = tmp_path / "vq", tmp_path / "gpt"
    train.train(train.parse_args(TINY + ["--data", str(path), "--out_dir", str(vq), "--max_steps",
                                         "2"]))
    train.train(train.parse_args(TINY_GPT + ["--data", str(path), "--vqvae", str(vq / "ckpt.pt"),
                                             "--out_dir",
                                             str(prior), "--max_steps", "2", "--action_cond",
                                             "norms"]))
    ckpt = torch.load(prior / "ckpt.pt", weights_only=True)
    assert ckpt["action_names"] == ["TURN_LEFT", "TURN_RIGHT", "MOVE_FORWARD"]
    assert ckpt["config"]["action_norms"] and ckpt["config"]["action_dim"] == 3
    assert ckpt["model"]["blocks.0.attn_norm.to_gain.weight"].shape == (24, 4 * 3)   # T*A
    sample.main(["--ckpt", str(prior / "ckpt.pt"), "--n", "2", "--actions",
                 "TURN_LEFT*2,MOVE_FORWARD*2", "--out", str(tmp_path / "told.gif")])
    assert Image.open(tmp_path / "told.gif").n_frames == 4
    rows = steer_main(["--ckpt", str(prior / "ckpt.pt"), "--data", str(path), "--n", "2",
                       "--min_hold", "1",
                       "--picture", str(tmp_path / "steer.png"), "--out",
                       str(tmp_path / "steer.json")])
    assert set(rows) == {"real", "reconstructions", "samples", "told TURN_LEFT",
                         "told MOVE_FORWARD", "told TURN_RIGHT"}
    assert rows["told TURN_LEFT"]["turns"] == 2 and rows["told MOVE_FORWARD"]["turns"] == 0
    record = json.load(open(tmp_path / "steer.json"))
    assert record["scores"]["told MOVE_FORWARD"]["turned_as_told"] is None   # not NaN
    assert all(0 <= r["mean_slide"] <= 4 for r in rows.values())  # at most a quarter of 16 px
    w, h = Image.open(tmp_path / "steer.png").size
    assert (w + 2) / 4 == (h + 2) / 3  # square frames: 4 frames across, rows left, straight, right
    # Long play, and the real game played the same way beside it: the bar the dream is held to.
    played = dream_main(["--ckpt", str(prior / "ckpt.pt"), "--data", str(path), "--frames", "40",
                         "--n_real", "2", "--game", "--out", str(tmp_path / "dream.json")])
    record = json.load(open(tmp_path / "dream.json"))
    assert record["player"] == "looking" and record["dream"]["frames"] == 40
    # a walk of at most 10 frames, then left 12 and straight into right 12: two held turns each
    assert played["turns"] >= 2 and record["game"]["turns"] >= 2
    assert record["game"]["turned_as_told"] == 1.0                 # the real game turns as told
    # A prior without actions has nothing to steer: one line.
    with pytest.raises(SystemExit) as e:
        steer_main(["--ckpt", str(vq / "ckpt.pt"), "--data", str(path)])
    assert str(e.value.code).startswith("fvd.py: error: ") and "\n" not in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        steer_main(["--ckpt", str(prior / "ckpt.pt"), "--data", digits_h5])
    assert (str(e.value.code) == f"fvd.py: error: {digits_h5}: no per-frame actions to steer by "
            "(expected an HDF5 file with test_actions)")


# -----------------------------------------------------------------------------
# Battle2: the paper's second world, its map from sample-factory's wheel


def battle2_map():
    """The path of Battle2's map in an installed sample-factory (skips without one)."""
    needs_vizdoom()
    pytest.importorskip("sf_examples", reason="pip install --no-deps sample-factory==2.1.1")
    from world import battle2_wad
    return battle2_wad()


def test_battle2_makes_a_file_of_the_documented_layout(tmp_path):
    from prepare.vizdoom import BATTLE2_ACTIONS, write_vizdoom
    battle2_map()
    counts = write_vizdoom(str(tmp_path / "b2.h5"), "battle2", episodes=3, length=8,
                           resolution=16, progress=False)
    assert counts["buttons"] == list(BATTLE2_ACTIONS) and len(BATTLE2_ACTIONS) == 12
    with h5py.File(tmp_path / "b2.h5") as f:
        names = [n.decode() for n in f["action_names"][()]]
        assert names[:7] == ["MOVE_FORWARD", "MOVE_BACKWARD", "MOVE_LEFT", "MOVE_RIGHT",
                             "TURN_LEFT", "TURN_RIGHT", "ATTACK"]
        assert "MOVE_FORWARD+TURN_RIGHT" in names          # the paper's Figure 8 conditioning
        assert [n.decode() for n in f["state_names"][()]] == ["AMMO2", "HEALTH", "USER2"]
        assert f["train_data"].shape == (8, 16, 16, 3) and f["train_actions"].shape == (8, 12)
        assert (f["train_actions"][()].sum(-1) == 1).all()  # one action per frame
        assert f["train_states"][0, 1] > 0                  # alive: health above zero
    assert not [p for p in os.listdir(tmp_path) if p != "b2.h5"]


def test_battle2_checks_its_map_with_one_line(tmp_path, monkeypatch):
    """Another file under --wad names its sha256 and the one expected; without sample-factory the
    line says what to install. Neither leaves a file behind."""
    from world import BATTLE2_SHA256
    wad = battle2_map()
    other = tmp_path / "other.wad"
    other.write_bytes(open(wad, "rb").read()[:-1] + b"x")
    message = one_line(tmp_path, ["--scenario", "battle2", "--wad", str(other)])
    assert message.startswith(f"prepare: error: {other}: sha256 ")
    assert message.endswith(f" is not Battle2's ({BATTLE2_SHA256})")
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sf_examples" else find_spec(name, *a))
    assert one_line(tmp_path, ["--scenario", "battle2"]) == (
        "prepare: error: battle2: its map is not installed: pip install --no-deps "
        "sample-factory==2.1.1 (its wheel holds battle2.wad), or pass --wad PATH")


def test_battle2_actions_t_is_the_action_after_frame_t(tmp_path):
    """As for Health Gathering Supreme, on Battle2's rendered frames: where TURN_LEFT (alone or
    with a forward move) starts or ends at frame t, the world moves right in frame t + 1;
    TURN_RIGHT, left. The actions one step off do not pass."""
    from prepare.vizdoom import BATTLE2_ACTIONS, write_vizdoom
    battle2_map()
    write_vizdoom(str(tmp_path / "b2.h5"), "battle2", episodes=12, length=40, resolution=64,
                  seed=1, progress=False)
    with h5py.File(tmp_path / "b2.h5") as f:
        frames, actions = f["train_data"][()], f["train_actions"][()].argmax(1)
    names = [BATTLE2_ACTIONS[a] for a in actions]
    turn = lambda name: 1 if "TURN_LEFT" in name else -1 if "TURN_RIGHT" in name else 0

    def agreement(labels):
        signs = []
        for t in range(1, len(frames) - 2):
            ends = labels[t] != labels[t - 1] or labels[t] != labels[t + 1]
            inside = t % 40 and (t + 1) % 40 and (t + 2) % 40
            if inside and ends and turn(labels[t]):
                # The top half, as fvd.py steer reads Battle2 (the pistol below stands still).
                shift = view_shift(frames[t], frames[t + 1], most=12, rows=slice(0, 32))
                if shift:   # a dark or a flashing frame can read no slide at all
                    signs.append(np.sign(shift) == turn(labels[t]))
        return np.mean(signs), len(signs)
    share, count = agreement(names)
    assert count >= 30 and share >= 0.85, (share, count)      # measured 0.95 of 77
    for shifted in (names[:1] + names[:-1], names[1:] + names[-1:]):
        assert agreement(shifted)[0] <= 0.75                 # measured 0.57 and 0.67


def test_battle2s_player_turns_to_monsters_shoots_and_fetches_what_it_lacks():
    """The built-in Fighter, on observations made up here (no engine): a monster to the left is
    turned to; one ahead is mostly shot at, sometimes dodged; a medikit is fetched only when
    health is low, ammunition only when it runs out."""
    from prepare.vizdoom import BATTLE2_ACTIONS, Fighter
    names = list(BATTLE2_ACTIONS)
    depth = np.full((120, 160), 100, np.uint8)                 # open ground ahead
    obs = lambda labels, **variables: dict(frame=None, depth=depth, labels=labels, buttons=names,
                                           variables=dict(dict(HEALTH=100, AMMO2=20), **variables))
    act = lambda policy, o: names[policy(o)]
    assert act(Fighter(0), obs([("DoomImp", 10, 10)])) == "TURN_LEFT"
    assert act(Fighter(0), obs([("DoomImp", 140, 10)])) == "TURN_RIGHT"
    ahead = [act(Fighter(seed), obs([("DoomImp", 75, 10)])) for seed in range(200)]
    shots = np.mean([a in ("ATTACK", "MOVE_FORWARD+ATTACK") for a in ahead])
    assert 0.6 < shots < 0.8 and {"MOVE_LEFT", "MOVE_RIGHT", "MOVE_BACKWARD"} <= set(ahead)
    medikit = [("CustomMedikit", 75, 10)]
    assert act(Fighter(0), obs(medikit, HEALTH=30)) == "MOVE_FORWARD+SPEED"
    assert act(Fighter(0), obs([("Clip", 75, 10)], AMMO2=0)) == "MOVE_FORWARD+SPEED"
    # Healthy, it walks on rather than towards the medikit: Explorer's walk, combinations mixed in.
    walks = {act(Fighter(seed), obs(medikit)) for seed in range(50)}
    assert "MOVE_FORWARD+SPEED" in walks and len(walks) >= 4


def test_a_tiny_prior_trained_on_battle2_samples_with_named_actions(tmp_path):
    """Battle2's file trains a prior like any other, and sample.py takes its actions by name,
    combined ones included (the paper's Figure 8: moving forward and right)."""
    import sample
    import train
    from prepare.vizdoom import write_vizdoom
    battle2_map()
    path = str(tmp_path / "b2.h5")
    write_vizdoom(path, "battle2", episodes=4, length=8, resolution=16, progress=False)
    vq, prior = tmp_path / "vq", tmp_path / "gpt"
    train.train(train.parse_args(TINY + ["--data", path, "--out_dir", str(vq), "--max_steps",
                                         "1"]))
    train.train(train.parse_args(TINY_GPT + ["--data", path, "--vqvae", str(vq / "ckpt.pt"),
                                             "--out_dir", str(prior), "--max_steps", "1",
                                             "--action_cond", "norms"]))
    ckpt = torch.load(prior / "ckpt.pt", weights_only=True)
    assert len(ckpt["action_names"]) == 12 and ckpt["config"]["action_dim"] == 12
    sample.main(["--ckpt", str(prior / "ckpt.pt"), "--n", "2", "--actions",
                 "MOVE_FORWARD+TURN_RIGHT*2,ATTACK*2", "--out", str(tmp_path / "told.gif")])
    assert Image.open(tmp_path / "told.gif").n_frames == 4
    # Play beside the real game (the scenario found from the prior's actions), two buttons at once.
    import play
    play.main(["--ckpt", str(prior / "ckpt.pt"), "--game", "--actions",
               "MOVE_FORWARD+TURN_RIGHT*2,ATTACK*2", "--out", str(tmp_path / "beside.gif")])
    gif = Image.open(tmp_path / "beside.gif")
    assert gif.size == (32, 16) and gif.n_frames == 4 + 4   # the start, then one per action
    assert np.asarray(gif.convert("RGB"))[:, 16:].std() > 5  # the game: a rendered level
    # Figure 8: the steering score with an unconditional prior beside it, strafes and shots scored.
    from metrics import steer_main
    uncond = tmp_path / "uncond"
    train.train(train.parse_args(TINY_GPT + ["--data", path, "--vqvae", str(vq / "ckpt.pt"),
                                             "--out_dir", str(uncond), "--max_steps", "1"]))
    steer = ["--ckpt", str(prior / "ckpt.pt"), "--data", path, "--n", "3", "--min_hold", "1"]
    rows = steer_main(steer + ["--uncond", str(uncond / "ckpt.pt"),
                               "--picture", str(tmp_path / "fig8.png")])
    told = ("TURN_LEFT", "MOVE_FORWARD", "TURN_RIGHT", "MOVE_LEFT", "MOVE_RIGHT", "ATTACK",
            "MOVE_FORWARD+MOVE_RIGHT")
    assert set(rows) == {"real", "reconstructions", "samples", "unconditional"} | {
        f"told {k}" for k in told}
    assert rows["told MOVE_LEFT"]["strafes"] == 3 and rows["told ATTACK"]["shots"] == 3
    assert rows["told MOVE_FORWARD+MOVE_RIGHT"]["strafes"] == 3
    assert rows["told ATTACK"]["turns"] == 0 and rows["unconditional"]["shots"] == 0
    assert all("flash_frames" in r for r in rows.values())   # an armed prior: every set's flashes
    w, h = Image.open(tmp_path / "fig8.png").size
    assert (w + 2) / 4 == (h + 2) / 10   # rows: unconditional, 3 forward and right, 6 told
    with pytest.raises(SystemExit) as e:   # --uncond must be a prior without actions
        steer_main(steer + ["--uncond", str(prior / "ckpt.pt")])
    assert str(e.value.code) == (f"fvd.py: error: --uncond {prior / 'ckpt.pt'}: a prior "
                                 "conditioned on actions, expected one without")
