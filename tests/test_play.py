"""Playing the dream: world.World (keys -> actions, causality, the sliding window, the cache) and
play.py (rollouts to files, the web server's behaviour, the page in a real browser where Chromium is
installed).

python -m pytest tests/test_play.py
"""

import base64
import itertools
import json
import os
import shutil
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, start_script, tiny_prior
from fast import sample_long
from vqvae import VQVAE, VQVAEConfig
from world import World

NAMES = ["TURN_LEFT", "TURN_RIGHT", "MOVE_FORWARD"]


def tiny_world_parts(action_norms=True, action_dim=3, seed=0):
    """A random VQ-VAE of 16x16 clips of 8 frames and a prior over its (4, 4, 4) codes."""
    torch.manual_seed(seed)
    vq = VQVAE(VQVAEConfig(embedding_dim=8, n_codes=16, n_hiddens=16, n_res_layers=0,
                           decoder_res_layers=1, local_encoder=True, downsample=(2, 4, 4),
                           sequence_length=8, resolution=16)).eval()
    kw = dict(action_dim=action_dim, action_norms=action_norms) if action_dim else {}
    gpt = tiny_prior(seed, latent_shape=(4, 4, 4), rope=True, sequence_length=8, **kw).eval()
    # the norms' action columns start at zero: make actions matter
    for name, p in gpt.named_parameters():
        if name.endswith((".to_gain.weight", ".to_bias.weight")):
            p.data.normal_(std=0.5)
    gpt.set_codebook(vq.codebook.embeddings)
    return gpt, vq


def save_prior(path, gpt, vq, names=NAMES):
    """A checkpoint of ours holding the prior and its VQ-VAE, as train.py writes them."""
    torch.save(dict(stage="gpt", config=gpt.config.to_dict(), model=gpt.state_dict(), step=0,
                    vqvae=dict(config=vq.config.to_dict(), model=vq.state_dict()),
                    action_names=names if gpt.config.action_dim else None), path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return save_prior(tmp_path_factory.mktemp("play") / "prior.pt", *tiny_world_parts())


def one_hot(indices, n=3):
    return torch.eye(n)[indices][None]                                                # (1, T, A)


# -----------------------------------------------------------------------------
# The loop


@pytest.mark.parametrize("conditioning", ["norms", "tokens", "none"])
def test_the_world_draws_what_the_long_video_sampler_draws(conditioning):
    """Stride 1, from a full window of start codes: each step is the sliding-window sampler's next
    window (fast.sample_long, itself tested against the lesson's sampler), for the same actions and
    generator."""
    gpt, vq = tiny_world_parts(action_norms=conditioning == "norms",
                               action_dim=0 if conditioning == "none" else 3)
    start = torch.randint(16, (4, 4, 4), generator=torch.Generator().manual_seed(1))
    keys = [0, 0, 2, 1, 1, 0, 2, 2, 1, 0] if conditioning != "none" else [None] * 10
    world = World(gpt, vq, action_names=NAMES if conditioning != "none" else None, seed=3)
    world.reset(start_codes=start,
                start_actions=["MOVE_FORWARD"] * 8 if conditioning != "none" else None)
    drawn = [world.step(k) for k in keys]
    assert all(f.shape == (2, 16, 16, 3) and f.dtype == np.uint8 for f in drawn)
    actions = (one_hot([2] * 8 + [k for k in keys for _ in range(2)]) if conditioning != "none"
               else None)
    expected = sample_long(gpt, 1, 8 + 2 * len(keys), stride=1, actions=actions, prefix=start[None],
                           generator=torch.Generator().manual_seed(3))  # (1, 4 + 10, 4, 4)
    assert torch.equal(world.codes[0], expected[0, -4:])


def test_a_wider_stride_keeps_the_cache_and_draws_the_same_for_a_held_key():
    """Stride 2 prefills once per two steps; with one key held it is sample_long's stride 2."""
    gpt, vq = tiny_world_parts()
    start = torch.randint(16, (4, 4, 4), generator=torch.Generator().manual_seed(1))
    world = World(gpt, vq, action_names=NAMES, seed=5, stride=2)
    world.reset(start_codes=start, start_actions=["TURN_LEFT"] * 8)
    prefills = []
    for _ in range(6):
        world.step("TURN_LEFT")
        prefills.append(world.fed_from_prefill)
    assert prefills == [True, False, True, False, True, False]  # a prefill per slide only
    expected = sample_long(gpt, 1, 8 + 12, stride=2, actions=one_hot([0] * 20), prefix=start[None],
                           generator=torch.Generator().manual_seed(5))
    assert torch.equal(world.codes[0], expected[0, -4:])


@pytest.mark.parametrize("conditioning,stride",
                         [("norms", 1), ("tokens", 1), ("norms", 2), ("tokens", 3)])
def test_a_drawn_code_never_depends_on_a_key_pressed_after_it(conditioning, stride):
    """Two players press the same keys for 5 steps, then different ones: every code and frame of the
    first 5 steps is the same, bit for bit, and the keys after them change what is drawn next."""
    gpt, vq = tiny_world_parts(action_norms=conditioning == "norms")
    runs = []
    for later in (["TURN_LEFT"] * 4, ["TURN_RIGHT"] * 4):
        world = World(gpt, vq, action_names=NAMES, seed=7, stride=stride)
        frames = [world.reset()]  # a sampled start: the idle action, 8 frames
        codes = []
        for key in ["MOVE_FORWARD", "TURN_LEFT", "TURN_LEFT", None, "TURN_RIGHT"] + later:
            frames.append(world.step(key))
            codes.append(world.codes[0, -1].clone())
        runs.append((frames, codes))
    (frames_a, codes_a), (frames_b, codes_b) = runs
    for i in range(5):
        assert torch.equal(codes_a[i], codes_b[i])
        assert np.array_equal(frames_a[i + 1], frames_b[i + 1])
    assert any(not torch.equal(a, b) for a, b in zip(codes_a[5:], codes_b[5:]))  # the keys do steer


def test_the_fill_rule_and_a_key_change_refill_the_cache():
    """While the window fills, frames after the step being drawn take the held key; a new key
    changes the conditioning of the whole window, so the cache is filled again (and a held key keeps
    it)."""
    gpt, vq = tiny_world_parts()
    world = World(gpt, vq, action_names=NAMES, seed=0)
    world.reset(start_codes=torch.zeros(1, 4, 4, dtype=torch.long),
                start_actions=["MOVE_FORWARD"] * 2)
    assert world.window_actions([0, 0]).argmax(-1).tolist() == [[2, 2, 0, 0, 0, 0, 0, 0]]
    world.step("TURN_LEFT")
    assert world.fed_from_prefill
    world.step("TURN_LEFT")
    assert not world.fed_from_prefill  # the same conditioning: cached
    world.step("TURN_RIGHT")
    assert world.fed_from_prefill and world.actions == [2, 2, 0, 0, 0, 0, 1, 1]


def test_a_step_given_up_for_a_new_key_leaves_the_world_as_it_was():
    """The page gives up a step when the key changes while it is drawn: the world keeps its codes,
    actions and noise, so the step drawn again with the new key is the one an uncancelled world
    draws."""
    gpt, vq = tiny_world_parts()
    start = torch.randint(16, (4, 4, 4), generator=torch.Generator().manual_seed(1))
    played, straight = World(gpt, vq, action_names=NAMES, seed=4), World(gpt, vq,
                                                                         action_names=NAMES, seed=4)
    for world in (played, straight):
        world.reset(start_codes=start, start_actions=["TURN_LEFT"] * 8)
        world.step("TURN_LEFT")
    asked = []
    assert played.step("TURN_LEFT", cancel=lambda: asked.append(1) or len(asked) > 5) is None
    assert len(asked) == 6 and played.codes.shape[1] == 4 and played.actions == straight.actions
    frames = played.step("TURN_RIGHT", cancel=lambda: False)
    assert np.array_equal(frames, straight.step("TURN_RIGHT")) and torch.equal(played.codes,
                                                                               straight.codes)
    assert played.step("MOVE_FORWARD", cancel=lambda: True) is None and torch.equal(played.codes,
                                                                                    straight.codes)


def test_start_frames_are_encoded_and_bad_ones_are_one_line():
    gpt, vq = tiny_world_parts()
    world = World(gpt, vq, action_names=NAMES)
    # any size: resized
    frames = np.random.default_rng(0).integers(0, 255, (4, 40, 40, 3), dtype=np.uint8)
    shown = world.reset(start=frames, start_actions=["TURN_LEFT"] * 4)
    assert (shown.shape == (4, 16, 16, 3) and world.codes.shape == (1, 2, 4, 4)
            and world.actions == [0] * 4)
    # idle: MOVE_FORWARD
    assert world.step(None).shape == (2, 16, 16, 3) and world.actions[-2:] == [2, 2]
    with pytest.raises(ValueError, match="a multiple of 2 and at most 8"):
        world.reset(start=frames[:3])
    with pytest.raises(ValueError, match="unknown action 'JUMP'"):
        world.step("JUMP")
    with pytest.raises(ValueError, match=r"3 start actions for 4 start frames"):
        world.reset(start=frames, start_actions=["TURN_LEFT"] * 3)


def test_a_prior_without_actions_plays_by_itself_with_the_keys_disabled():
    gpt, vq = tiny_world_parts(action_dim=0)
    world = World(gpt, vq)
    assert world.reset().shape == (8, 16, 16, 3)
    assert world.step(None).shape == (2, 16, 16, 3)
    with pytest.raises(ValueError, match="keys are disabled"):
        world.step("TURN_LEFT")


def play_codes(world, start, keys=("TURN_LEFT", "MOVE_FORWARD", "TURN_RIGHT", "TURN_RIGHT")):
    """The codes after four keys from `start`, with the noise of seed 2."""
    world.generator.manual_seed(2)
    world.reset(start_codes=start, start_actions=["TURN_LEFT"] * 8)
    for key in keys:
        world.step(key)
    return world.codes.clone()  # (1, 4, 4, 4)


def test_frames_decoded_in_bfloat16_lie_within_a_grey_level_or_two_and_the_codes_are_the_same():
    """--decode bfloat16 changes the picture by a grey level or two and nothing else; "auto" keeps
    float32 unless bfloat16 is both faster and that close."""
    from world import decode_precision
    gpt, vq = tiny_world_parts()
    start = torch.randint(16, (4, 4, 4), generator=torch.Generator().manual_seed(1))
    worlds = [World(gpt, vq, action_names=NAMES, seed=2, decode_dtype=d)
              for d in (torch.float32, torch.bfloat16)]
    frames = []
    for world in worlds:
        world.reset(start_codes=start, start_actions=["TURN_LEFT"] * 8)
        frames.append(np.concatenate([world.step(k) for k in ("TURN_LEFT", "MOVE_FORWARD")]))
    assert torch.equal(worlds[0].codes, worlds[1].codes)
    difference = np.abs(frames[0].astype(int) - frames[1].astype(int))
    assert 0 < difference.max() <= 2   # decoded in bfloat16 indeed, and within two grey levels
    # bfloat16 must take no time at all, or match to better than a grey level: never chosen
    assert decode_precision(vq, (1, 2, 4, 4), trials=1, slower=0.0) == torch.float32
    assert decode_precision(vq, (1, 2, 4, 4), trials=1, grey_levels=-1) == torch.float32
    assert World(gpt, vq, action_names=NAMES, decode_dtype="auto").decode_dtype in (
        torch.float32, torch.bfloat16)


def test_the_next_step_is_started_just_in_time():
    """With one frame waiting, the next step starts the slowest recent step (and a margin) before
    its first frame is due, one period after the waiting one is shown; behind, it starts at once."""
    from world import Player
    gpt, vq = tiny_world_parts()
    player = Player(World(gpt, vq, action_names=NAMES), NAMES, dict, fps=20)
    assert player.time_to_start() == 0.0   # nothing timed yet
    player.took.extend([0.02, 0.03])
    player.outbox.append({})
    player.shows_at = time.perf_counter() + 0.04
    # due in 0.04 + 0.05 s; started 0.03 + MARGIN before that
    wait = player.time_to_start()
    assert 0.04 + 0.05 - 0.03 - player.MARGIN - 0.01 <= wait <= 0.04 + 0.05 - 0.03 - player.MARGIN
    player.outbox.clear()
    assert player.time_to_start() == 0.0   # nothing waiting: behind, at once


def test_the_fixed_shape_step_and_its_compiled_package_draw_what_the_eager_step_draws():
    """The step compile_step compiles (the whole cache read through the position's row of the mask,
    one program for every position, the caches written in place) and the prefill (a prefix of any
    length) draw the eager step's codes. Packaged here by torch.export alone (backend "export": the
    same export in seconds; inductor's kernels are checked against the eager ones in
    test_fast.py)."""
    import world as world_module
    gpt, vq = tiny_world_parts()
    start = torch.randint(16, (4, 4, 4), generator=torch.Generator().manual_seed(1))
    eager = play_codes(World(gpt, vq, action_names=NAMES, seed=2), start)
    fixed = World(gpt, vq, action_names=NAMES, seed=2)
    fixed.compiled_step = world_module.LogitsStep(gpt)   # the uncompiled fixed-shape step
    packaged = World(gpt, vq, action_names=NAMES, seed=2)
    packaged.compile_step(background=False, backend="export")
    assert packaged.compiled_step is not None and packaged.compiled_prefill is not None
    assert packaged.compile_error is None
    assert torch.equal(eager, play_codes(fixed, start)) and torch.equal(eager,
                                                                        play_codes(packaged, start))
    assert packaged.timing["compiled"] and packaged.timing["prefill_compiled"]
    assert fixed.timing["compiled"] and not fixed.timing["prefill_compiled"]
    with pytest.raises(ValueError, match="needs the prior's checkpoint file"):
        packaged.compile_step(background=True)


def test_the_compiled_prefill_fills_the_caches_the_eager_one_fills_at_any_length(tmp_path):
    """One exported prefill serves every window: prefixes of 2 codes, one latent step and three and
    a bit give the eager prefill's logits and caches, for a prior with action tokens (cross-attended
    inside the prefill) and one without actions (conditional norms: the test above); a program
    whose numbers differ is refused."""
    import world as world_module
    from fast import prefill
    for norms, action_dim in ((False, 3), (True, 0)):
        gpt, _ = tiny_world_parts(action_norms=norms, action_dim=action_dim)
        path = str(tmp_path / f"prefill-{norms}-{action_dim}-export.pt2")
        world_module.build_package(gpt, path, "export", "prefill")
        call = world_module.PrefillCall(world_module.load_package(path))
        assert world_module.gives_eager_numbers(gpt, call, "prefill")
        _, _, cond, _ = world_module.probe_inputs(gpt)
        for n in (2, 16, 53):
            prefix = torch.randint(16, (1, n), generator=torch.Generator().manual_seed(n))
            mine, theirs = gpt.setup_caches(1, "cpu"), gpt.setup_caches(1, "cpu")
            with torch.inference_mode():
                got, ref = call(prefix, cond, mine), prefill(gpt, cond, theirs, 1, prefix)
            # float32 through two routes: the same operations, summed in the same order here
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
            for a, b in zip(mine, theirs):
                torch.testing.assert_close(a.k, b.k, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(a.v, b.v, atol=1e-5, rtol=1e-5)
    wrong = lambda prefix, cond, caches: call(prefix, cond, caches) + 0.01
    assert not world_module.gives_eager_numbers(gpt, wrong, "prefill")


def test_the_step_compiles_in_a_process_of_its_own_while_the_eager_step_plays_and_is_kept(
        tiny_ckpt, tmp_path, monkeypatch, capsys):
    """In the background a separate process makes the package and the loop switches to it once it is
    loaded, drawing the same codes; the package is kept for the next start, which only loads it; a
    package that will not load is removed, said once, and the play goes on eager."""
    from world import load_world, package_file
    monkeypatch.setenv("VIDEOGPT_CACHE", str(tmp_path))
    start = torch.randint(16, (4, 4, 4), generator=torch.Generator().manual_seed(1))
    eager = play_codes(load_world(tiny_ckpt, seed=2)[0], start)
    world = load_world(tiny_ckpt, seed=2)[0]
    threads = torch.get_num_threads()
    world.compile_step(background=True, backend="export")
    assert world.compiling and world.compiled_step is None and world.compiler.poll() is None
    deadline = time.monotonic() + 120
    # the eager play goes on meanwhile, and each program is taken up once it is loaded
    while world.compiling and time.monotonic() < deadline:
        world.reset(start_codes=start, start_actions=["TURN_LEFT"] * 8)
        world.step("TURN_LEFT")
        time.sleep(0.05)
    assert world.compiled_step is not None and world.compiled_prefill is not None
    assert not world.compiling and world.compile_error is None
    assert torch.get_num_threads() == threads   # the core lent to the compiler is given back
    assert torch.equal(play_codes(world, start), eager)
    path = package_file(tiny_ckpt, "export")
    assert os.path.isfile(path) and os.path.dirname(path) == str(tmp_path / "play")
    assert os.path.isfile(package_file(tiny_ckpt, "export", "prefill"))
    again = load_world(tiny_ckpt, seed=2)[0]
    again.compile_step(background=True, backend="export")                     # kept: only loaded
    assert again.compiler is None and len(again.loaders) == 2
    for loader in again.loaders:
        loader.join(timeout=60)
    assert again.compiled_step is not None and again.compiled_prefill is not None
    assert torch.equal(play_codes(again, start), eager)
    with open(path, "wb") as f:
        f.write(b"not a package")
    broken = load_world(tiny_ckpt, seed=2)[0]
    broken.compile_step(background=False, backend="export")
    assert (broken.compiled_step is None
            and "could not load the compiled step" in broken.compile_error)
    assert not os.path.exists(path) and "plays eager" in capsys.readouterr().err
    assert torch.equal(play_codes(broken, start), eager)


# -----------------------------------------------------------------------------
# Rollouts to a file


def test_a_rollout_holds_the_start_then_a_frame_per_scripted_action(tiny_ckpt, tmp_path, capsys):
    import play
    out = tmp_path / "dream.gif"
    play.main(["--ckpt", tiny_ckpt, "--actions", "MOVE_FORWARD*4,TURN_LEFT*6,TURN_RIGHT*2",
               "--out", str(out)])
    printed = capsys.readouterr().out
    assert (printed.strip().endswith(str(out)) and "12 frames in" in printed
            and "frames/s" in printed)
    gif = Image.open(out)
    assert gif.n_frames == 8 + 12 and gif.size == (16, 16)  # the dream alone, at its own size
    play.main(["--ckpt", tiny_ckpt, "--actions", "TURN_LEFT*2", "--out", str(tmp_path / "d.png")])
    assert Image.open(tmp_path / "d.png").size[0] > 0
    play.main(["--ckpt", tiny_ckpt, "--actions", "TURN_LEFT*4", "--out", str(tmp_path / "d.mp4")])
    import av
    with av.open(str(tmp_path / "d.mp4")) as video:
        assert sum(1 for _ in video.decode(video=0)) == 12


@pytest.mark.parametrize("argv,message", [
    (["--actions", "TURN_LEFT*3"], "--actions: 3 frames; the dream is drawn 2 frames at a time"),
    (["--actions", "JUMP*2"],
     "--actions: unknown action 'JUMP'; this prior's actions are TURN_LEFT, TURN_RIGHT, "
                              "MOVE_FORWARD"),
    (["--actions", "TURN_LEFT*x"], "the count after * must be a positive whole number"),
    (["--actions", "TURN_LEFT*2", "--out", "d.avi"], "unknown output type '.avi'"),
    (["--actions", "TURN_LEFT*2"], "--actions writes a rollout: pass --out"),
])
def test_rollout_errors_are_one_line(tiny_ckpt, tmp_path, argv, message):
    import play
    argv = [a if a != "d.avi" else str(tmp_path / a) for a in argv]
    if "--out" not in argv and "pass --out" not in message:
        argv += ["--out", str(tmp_path / "d.gif")]
    with pytest.raises(SystemExit) as e:
        play.main(["--ckpt", tiny_ckpt] + argv)
    assert str(e.value.code).startswith("play.py: error: ") and message in str(e.value.code)
    assert "\n" not in str(e.value.code)


def test_a_missing_checkpoint_or_one_without_a_vqvae_is_one_line(tmp_path, tiny_ckpt):
    import play
    for ckpt, message in ((tmp_path / "none.pt", "no such checkpoint file"),):
        with pytest.raises(SystemExit) as e:
            play.main(["--ckpt", str(ckpt)])
        assert str(e.value.code) == f"play.py: error: {ckpt}: {message}"
    saved = torch.load(tiny_ckpt, weights_only=True)
    torch.save(dict(saved, vqvae=None), tmp_path / "novq.pt")
    with pytest.raises(SystemExit) as e:
        play.main(["--ckpt", str(tmp_path / "novq.pt")])
    assert "carries no VQ-VAE" in str(e.value.code) and "\n" not in str(e.value.code)
    torch.save(dict(stage="vqvae", config=saved["vqvae"]["config"], model=saved["vqvae"]["model"]),
               tmp_path / "vq.pt")
    with pytest.raises(SystemExit) as e:
        play.main(["--ckpt", str(tmp_path / "vq.pt")])
    assert "is not a prior checkpoint of ours" in str(e.value.code)


# -----------------------------------------------------------------------------
# The server


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url, body=None, timeout=10):
    """(status, text) of a GET, or a POST of `body` (bytes or a JSON-able object)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def raw_request(port, text):
    """Send the bytes of a request as they are (no client normalising the path); the status line."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(text.encode())
        return s.makefile("rb").readline().decode()


def read_frames(port, n, timeout=30, until=None):
    """The first n frames of /stream, as dicts (or, with `until`, up to the first frame it
    accepts)."""
    frames = []
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stream", timeout=timeout) as r:
        for line in r:
            if line.startswith(b"data: "):
                frames.append(json.loads(line[6:]))
                if len(frames) == n or (until is not None and until(frames[-1])):
                    return frames
    return frames


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    """play.py serving the tiny prior, in this process (its threads can be counted)."""
    import play
    from world import Player, load_world
    world, names, start = load_world(tiny_ckpt)
    from http.server import ThreadingHTTPServer
    port = free_port()
    player = Player(world, names, lambda: start, fps=60)
    threading.Thread(target=player.run, daemon=True).start()
    srv = ThreadingHTTPServer(("127.0.0.1", port),
                              play.make_handler(player, open(play.PAGE).read()))
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, kwargs=dict(poll_interval=0.05),
                              daemon=True)
    thread.start()
    yield port, player
    srv.shutdown()
    srv.server_close()
    player.stop()


def test_the_server_serves_its_page_its_frames_and_nothing_else(server):
    port, player = server
    status, page = request(f"http://127.0.0.1:{port}/")
    assert status == 200 and "<canvas" in page
    info = json.loads(request(f"http://127.0.0.1:{port}/info")[1])
    assert (info["actions"] == NAMES and info["keys"]["TURN_LEFT"] == ["ArrowLeft", "a"]
            and info["idle"] == "MOVE_FORWARD")
    frames = read_frames(port, 12)
    assert len(frames) == 12 and all((f["w"], f["h"]) == (16, 16) for f in frames)
    assert all(len(base64.b64decode(f["rgb"])) == 16 * 16 * 3 for f in frames)
    assert frames[-1]["step_ms"] > 0 and "prefill_ms" in frames[-1]
    for path in ["/play.py", "/../play.py", "/%2e%2e/play.py", "/..%2fplay.py", "//etc/passwd",
                 "/play.html", "/weights/vizdoom.pt", "/%00", "/stream/../play.py"]:
        status_line = raw_request(port,
                                  f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert " 404 " in status_line, (path, status_line)


@pytest.mark.parametrize("path,body,message", [
    ("/keys", {"held": ["JUMP"], "id": 1},
     "unknown action 'JUMP'; this prior's actions are TURN_LEFT"),
    ("/keys", {"held": "TURN_LEFT", "id": 1}, "keys: expected"),
    ("/keys", {"held": [], "id": "x"}, "keys: expected"),
    ("/keys", b"not json", "the body must be a JSON object"),
    ("/settings", {"temperature": "hot"}, "temperature must be a number in [0.05, 5]"),
    ("/settings", {"temperature": 0}, "temperature must be a number"),
    ("/settings", {"top_k": -1}, "top_k must be a whole number in [0, 16]"),
    ("/settings", {"top_k": 2.5}, "top_k must be a whole number"),
    ("/nothing", {}, "not found: /nothing"),
])
def test_bad_requests_get_a_4xx_and_one_line(server, path, body, message):
    port, _ = server
    status, text = request(f"http://127.0.0.1:{port}{path}", body)
    assert (400 <= status < 500 and message in text and text.count("\n") == 1
            and "Traceback" not in text)


def test_keys_are_held_in_the_order_pressed_and_settings_apply(server):
    port, player = server
    # The start is drawn first (it is, when this test runs after others on the same server).
    read_frames(port, 1)
    held = {"held": ["TURN_LEFT", "TURN_RIGHT"], "id": 5}
    assert request(f"http://127.0.0.1:{port}/keys", held)[0] == 204
    # the newest: TURN_RIGHT
    assert player.held == ["TURN_LEFT", "TURN_RIGHT"] and player.key_id == 5
    # The stream begins with the frames kept from before the key (however long a busy machine took
    # to draw).
    drawn_with_it = lambda f: f["key_id"] == 5 and f.get("action") == "TURN_RIGHT"
    frames = read_frames(port, 200, until=drawn_with_it)
    assert drawn_with_it(frames[-1]) and all(f["key_id"] < 5 for f in frames[:-1])
    assert request(f"http://127.0.0.1:{port}/keys", {"held": [], "id": 6})[0] == 204
    assert request(f"http://127.0.0.1:{port}/settings", {"temperature": 0.8, "top_k": 5})[0] == 204
    assert player.world.temperature == 0.8 and player.world.top_k == 5
    assert request(f"http://127.0.0.1:{port}/settings", {"temperature": 1.0, "top_k": 0})[0] == 204
    assert player.world.top_k is None
    assert request(f"http://127.0.0.1:{port}/restart", {})[0] == 204


def test_closed_tabs_reloads_and_bursts_leave_no_thread_behind(server):
    port, player = server
    before = threading.active_count()
    # A burst of page loads at once, and tabs that open the stream and close it after a frame or
    # two.
    loads = [threading.Thread(target=request, args=(f"http://127.0.0.1:{port}/",))
             for _ in range(20)]
    tabs = [threading.Thread(target=read_frames, args=(port, 2)) for _ in range(4)]
    for t in loads + tabs:
        t.start()
    for t in loads + tabs:
        t.join(timeout=30)
    # A tab that goes without a word: the socket closed in the middle of the stream.
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        s.recv(100)
    deadline = time.time() + 15
    while (player.viewers or threading.active_count() > before) and time.time() < deadline:
        time.sleep(0.1)
    assert player.viewers == 0 and threading.active_count() <= before

    assert len(read_frames(port, 2)) == 2


def test_too_many_tabs_are_told_so(server):
    port, player = server
    player.viewers += player.MAX_VIEWERS          # as if the tabs were all open
    try:
        status, text = request(f"http://127.0.0.1:{port}/stream")
        assert status == 503 and text == "too many tabs watching (at most 8)\n"
    finally:
        player.viewers -= player.MAX_VIEWERS


def test_the_command_prints_its_url_warns_off_loopback_and_stops_on_ctrl_c(tiny_ckpt):
    port = free_port()
    proc = start_script("play.py", "--ckpt", tiny_ckpt, "--port", str(port), "--host", "0.0.0.0",
                        "--no-compile")
    try:
        first = proc.stdout.readline()
        assert first == f"http://0.0.0.0:{port}/\n"
        assert request(f"http://127.0.0.1:{port}/info")[0] == 200
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert (proc.returncode == 0
            and "warning: --host 0.0.0.0: the page is open to other machines" in err)
    assert "Traceback" not in err and err.strip().endswith("play.py: stopped")


# -----------------------------------------------------------------------------
# The page in a real browser


def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not chromium(),
                    reason="headless Chromium (apt-get install chromium) drives the page")
def test_the_page_in_chromium_turns_the_view_the_way_the_key_says():
    """Hold the left arrow: the shipped prior's view slides right (the world turns left), then the
    right arrow: it slides left. Keys act on the page as loaded, with no click first."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright drives Chromium")
    from metrics import view_shift
    port = free_port()
    proc = start_script("play.py", "--ckpt", os.path.join(ROOT, "weights", "vizdoom.pt"), "--port",
                        str(port), "--no-compile")
    try:
        assert proc.stdout.readline() == f"http://127.0.0.1:{port}/\n"
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium(), args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("window.playStats.frames > 16", timeout=20_000)

            def hold(key, steps=8):
                """Hold `key`; the summed slide of the frames it draws."""
                page.keyboard.down(key)
                page.wait_for_function("window.playStats.latencies.length > 0", timeout=10_000)
                frames, slide, last = page.evaluate("window.playStats.frames"), 0, None
                for _ in range(2 * steps):
                    page.wait_for_function(f"window.playStats.frames > {frames}", timeout=10_000)
                    frames = page.evaluate("window.playStats.frames")
                    last_frame = page.evaluate("Array.from(window.playStats.last)")
                    rgb = np.array(last_frame, np.uint8).reshape(64, 64, 3)       # (64, 64, 3)
                    if last is not None:
                        slide += view_shift(last, rgb)
                    last = rgb
                page.keyboard.up(key)
                page.evaluate("window.playStats.latencies = []")
                return slide
            assert hold("ArrowLeft") > 0 and hold("ArrowRight") < 0
            # when each frame was drawn, as bench.py --only page reads it: one time a frame, rising
            frames, times = page.evaluate("[window.playStats.frames, window.playStats.times]")
            assert len(times) == min(frames, 4000) and all(np.diff(times) >= 0)
            browser.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)


def test_the_real_game_plays_beside_the_dream_on_the_same_keys(tiny_ckpt, tmp_path):
    """--game: the dream starts from the game's own first frames and the game's frames stand beside
    it."""
    pytest.importorskip("vizdoom", reason="the optional vizdoom package (pip install vizdoom)")
    import play
    out = tmp_path / "beside.gif"
    play.main(["--ckpt", tiny_ckpt, "--game", "--actions", "TURN_LEFT*4,MOVE_FORWARD*2", "--out",
               str(out)])
    gif = Image.open(out)
    assert gif.n_frames == 8 + 6 and gif.size == (32, 16)  # the dream, then the game
    gif.seek(0)
    game = np.asarray(gif.convert("RGB"))[:, 16:]
    assert game.std() > 5  # a rendered level, not a blank


def test_long_play_scores_on_hand_made_frames():
    """fvd.py dream's parts: sky (dark blue) and floor (green) found where they are painted, the
    colour range and a grey frame outside it, a frozen stretch, and the script's held turns."""
    from metrics import LongPlayer, longest_still, sky_and_floor, stays_a_world, world_reference
    rng = np.random.default_rng(0)
    world = np.zeros((60, 8, 8, 3), np.uint8) + rng.integers(0, 20, (60, 8, 8, 3), dtype=np.uint8)
    world[:, :3, :, 2] += 80                                   # sky: the top 3 rows blue
    world[:, 5:, :, 1] += 90                                   # floor: the bottom 3 rows green
    assert np.allclose(sky_and_floor(world[:1]), [[3 / 8, 3 / 8]])
    reference = world_reference(world)
    assert reference["shows_sky"] == reference["shows_floor"] == 1.0
    grey = np.full((50, 8, 8, 3), 100, np.uint8)  # mush: no sky, no floor, standing still
    report = stays_a_world(np.concatenate([world[:50], grey]), reference)
    assert report["in_real_range"] == 0.5 and report["froze"] and report["longest_still"] == 50
    assert [s["keeps_its_look"] for s in report["stretches"]] == [True, False]
    assert longest_still(world) == 1
    script = LongPlayer(NAMES, looks=False).actions(None, 300)   # the session played blind
    runs = [len(list(g)) for k, g in itertools.groupby(script) if k != "MOVE_FORWARD"]
    assert len(script) == 300 and min(runs) >= 12 and len(runs) >= 12
    # direct reversal
    assert "TURN_LEFT" in script and ("TURN_LEFT", "TURN_RIGHT") in zip(script, script[1:])


def test_the_long_player_ends_a_walk_before_a_wall_and_holds_its_turns():
    """fvd.py dream's player looks at the newest frame: floor ahead, it walks on; a wall close ahead
    ends the walk and starts the next turn, which is held its whole length however close the
    wall. Blind, it plays the fixed script."""
    from metrics import LONG_PLAY, LongPlayer, way_blocked
    open_ = np.full((16, 16, 3), 40, np.uint8)
    open_[10:, :, 1] = 120                                # green floor over the bottom 6 rows
    wall = np.full((16, 16, 3), 90, np.uint8)             # grey from top to bottom
    edge = open_.copy()
    edge[10:, 6:] = 90                 # floor on the left only: 1 of the 5 columns ahead is floor
    assert not way_blocked(open_) and way_blocked(wall) and way_blocked(edge)
    assert LONG_PLAY[:3] == [("MOVE_FORWARD", 10), ("TURN_LEFT", 12), ("TURN_RIGHT", 12)]
    player = LongPlayer(NAMES)
    assert player.actions(open_, 4) == ["MOVE_FORWARD"] * 4
    assert player.actions(wall, 2) == ["TURN_LEFT"] * 2           # the walk's last 6 left out
    assert player.actions(wall, 10) == ["TURN_LEFT"] * 10         # a turn is held to its end
    assert player.actions(wall, 12) == ["TURN_RIGHT"] * 12          # the reversal
    assert player.actions(wall, 2) == ["TURN_RIGHT"] * 2            # the walk of 8 skipped
    assert player.actions(open_, 14) == ["TURN_RIGHT"] * 12 + ["MOVE_FORWARD"] * 2
    # The frame is looked at once, before a call's first action: a walk that starts within the
    # call goes on (a latent step's frames take their actions at once).
    assert LongPlayer(NAMES).actions(wall, 12) == ["TURN_LEFT"] * 12
    assert LongPlayer(NAMES).actions(wall, 26) == ["TURN_LEFT"] * 12 + ["TURN_RIGHT"] * 12 + [
        "MOVE_FORWARD"] * 2
    blind = LongPlayer(NAMES, looks=False)
    assert blind.actions(wall, 12) == ["MOVE_FORWARD"] * 10 + ["TURN_LEFT"] * 2
    # blind over the whole session: walls or not, the script as LONG_PLAY writes it
    assert LongPlayer(NAMES, looks=False).actions(wall, 40) == (
        ["MOVE_FORWARD"] * 10 + ["TURN_LEFT"] * 12 + ["TURN_RIGHT"] * 12 + ["MOVE_FORWARD"] * 6)
    with pytest.raises(ValueError, match="needs the actions MOVE_FORWARD"):
        LongPlayer(["TURN_LEFT", "TURN_RIGHT"])


def test_the_real_game_is_played_life_after_life_by_the_same_player():
    """fvd.py dream --game's loop on a stand-in game whose lives last 7 frames: a new life starts
    where one ends, the session goes on across them, and each life's start is reported (turns are
    read within a life)."""
    from metrics import LongPlayer, play_game

    class Lives:
        def __init__(self):
            self.t, self.lives = 0, 0

        def new_episode(self):
            self.t, self.lives = 0, self.lives + 1

        def ended(self):
            return self.t >= 7

        def frame(self):
            frame = np.zeros((16, 16, 3), np.uint8)
            frame[10:, :, 1] = 120 + self.t             # floor ahead, a new picture each frame
            return frame

        def act(self, action):
            self.t += 1

    game = Lives()
    frames, script, lives = play_game(game, LongPlayer(NAMES), 20, per_step=2)
    assert frames.shape == (20, 16, 16, 3) and lives == [0, 7, 14] and game.lives == 3
    assert script == ["MOVE_FORWARD"] * 10 + ["TURN_LEFT"] * 10       # one session throughout


def test_held_keys_press_battle2s_combined_actions():
    """Battle2's prior has actions of several buttons: holding ↑ and → presses
    MOVE_FORWARD+TURN_RIGHT, ↑ and shift MOVE_FORWARD+SPEED (SPEED is bound though no action
    alone); keys with no such combination fall back to the newest."""
    from play import key_bindings
    from prepare.vizdoom import BATTLE2_ACTIONS
    from world import held_action
    names = list(BATTLE2_ACTIONS)
    bindings = key_bindings(names)
    assert bindings["TURN_RIGHT"] == ["ArrowRight", "d"] and bindings["ATTACK"] == [" "]
    assert bindings["SPEED"] == ["Shift"] and bindings["MOVE_FORWARD+TURN_RIGHT"] == []
    assert held_action(["MOVE_FORWARD", "TURN_RIGHT"], names) == "MOVE_FORWARD+TURN_RIGHT"
    assert held_action(["TURN_RIGHT", "MOVE_FORWARD"], names) == "MOVE_FORWARD+TURN_RIGHT"
    assert held_action(["SPEED", "MOVE_FORWARD"], names) == "MOVE_FORWARD+SPEED"
    assert held_action(["TURN_LEFT", "TURN_RIGHT"], names) == "TURN_RIGHT"   # no such action
    assert held_action(["SPEED"], names) is None and held_action([], names) is None
    # A scenario of single buttons (Health Gathering Supreme) is as before: the newest wins.
    assert held_action(["TURN_LEFT", "MOVE_FORWARD"], NAMES) == "MOVE_FORWARD"
