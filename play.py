"""Play the dream: take the controls of a trained action-conditional prior, live in a browser.

    python play.py --ckpt weights/vizdoom.pt           # serves http://127.0.0.1:8000
    python play.py --ckpt weights/vizdoom.pt --game    # the game beside it (pip install vizdoom)
    python play.py --ckpt weights/vizdoom.pt --actions "MOVE_FORWARD*16,TURN_LEFT*24" --out d.mp4
    python play.py --ckpt runs/doom_gpt/ckpt.pt --start vizdoom.h5 --clip 3   # from a test clip

The page shows the dream as its largest picture. The arrow keys and WASD
press the prior's own actions (their names are on the page); a key counts as
held from its keydown to its keyup, and the one pressed last wins. With no
key held, the frames take the idle action (MOVE_FORWARD for ViZDoom, which
has no "nothing pressed"). A prior without actions plays its dream by itself.

With --actions the same loop writes a rollout to --out instead (MP4, GIF, or
a PNG sheet of 16 frames a row), as fast as it can: the start frames, then
one frame per scripted action, at the dream's own resolution (with --game,
the real game's frames beside it).

The loop itself is world.World (one latent step at a time, the window
sliding, keys -> actions); this file is the command: the start, the real
game, the rollout and the web server (the standard library's, so nothing is
installed for it). docs/play.md explains the loop and its measurements.
"""

import argparse
import base64
import json
import math
import os
import sys
import threading
import time
import warnings
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np
import torch

from checkpoints import OutputLock, check_writable, save_gif, save_mp4, save_png, video_grid
from runtime import run_cli
from world import (DECODE_CONTEXT, STRIDE, TEMPERATURE, Game, Player, default_scenario,
                   game_start, load_world, script_actions, start_world)

DECODE_DTYPES = dict(auto="auto", float32=torch.float32, bfloat16=torch.bfloat16)
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "play.html")
WRITERS = {".mp4", ".gif", ".png"}
# The page's keys, by the action they press where the prior has it: the arrows and WASD, and the
# digits for any other action.
KEYS = {"TURN_LEFT": ["ArrowLeft", "a"], "TURN_RIGHT": ["ArrowRight", "d"],
        "MOVE_FORWARD": ["ArrowUp", "w"], "MOVE_BACKWARD": ["ArrowDown", "s"], "MOVE_LEFT": ["q"],
        "MOVE_RIGHT": ["e"], "ATTACK": [" "], "SPEED": ["Shift"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Play a trained action-conditional prior: in a browser, or to a file.")
    p.add_argument("--ckpt", required=True,
                   help="a prior checkpoint of ours (with its VQ-VAE), e.g. weights/vizdoom.pt")
    # the start
    p.add_argument("--start", default=None,
                   help="an HDF5 file (or video folder) whose test clip --clip gives the opening "
                        "frames (default: the start stored with the weights, else a sample)")
    p.add_argument("--clip", type=int, default=0, help="with --start: which test clip")
    p.add_argument("--game", action="store_true",
                   help="run the real ViZDoom scenario on the same keys, beside the dream (pip "
                        "install vizdoom); the dream starts from the game's own first frames")
    p.add_argument("--scenario", default=None,
                   help="with --game: the scenario (default: battle2 for a prior with Battle2's "
                        "actions, else health_gathering_supreme)")
    p.add_argument("--frame_skip", type=int, default=4,
                   help="with --game: game tics per frame (the data's)")
    # sampling
    p.add_argument("--temperature", type=float, default=TEMPERATURE,
                   help="softmax temperature (> 0); 0.9 keeps the world longest (docs/play.md)")
    p.add_argument("--top_k", type=int, default=None, help="draw among the k most likely codes")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the dream's draws (and of the game)")
    p.add_argument("--stride", type=int, default=STRIDE,
                   help="latent steps dropped each time the window slides (1: the full context, "
                        "prefilled again at every step)")
    p.add_argument("--decode_context", type=int, default=DECODE_CONTEXT,
                   help="latent steps the decoder sees to draw the newest one's frames")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the one-code step and the prefill ahead of time, about twice "
                        "as fast (30-60 s once, then kept in the cache folder and loaded in 1-3 "
                        "s). Default: on for the page, which plays eager meanwhile; for rollouts, "
                        "what is kept is used")
    p.add_argument("--decode", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="the precision the frames are decoded in (the codes are drawn in float32 "
                        "either way); auto: bfloat16 where it is faster here and within 2 grey "
                        "levels of float32")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch (default: PyTorch's)")
    # a rollout to a file
    p.add_argument("--actions", default=None,
                   help="write a rollout instead of serving: the actions' names, each held for a "
                        "number of frames, e.g. \"MOVE_FORWARD*16,TURN_LEFT*24\" (a multiple of "
                        "the frames per latent step)")
    p.add_argument("--out", default=None,
                   help="with --actions: the rollout file, .mp4, .gif or .png")
    p.add_argument("--fps", type=int, default=30,
                   help="frames per second: of the page (its pace), and of an MP4/GIF rollout")
    # the server
    p.add_argument("--port", type=int, default=8000, help="the page's port")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to bind; anything but 127.0.0.1 lets other machines play it "
                        "(a warning says so)")
    return p.parse_args(argv)


def open_world(args):
    """The World the flags ask for, its action names and its start (world.load_world)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return load_world(args.ckpt, start=args.start, clip=args.clip, temperature=args.temperature,
                      top_k=args.top_k, stride=args.stride, decode_context=args.decode_context,
                      seed=args.seed, decode_dtype=DECODE_DTYPES[args.decode])


# -----------------------------------------------------------------------------
# The real game, beside the dream


def open_game(stack, args, world, names):
    """The real game when --game asks for it (closed with `stack`), else None."""
    if not args.game:
        return None
    scenario = args.scenario or default_scenario(names)
    return Game(stack, scenario, args.frame_skip, world.vq.config.resolution, names, args.seed)


# -----------------------------------------------------------------------------
# A rollout to a file


def rollout(args):
    """Play the scripted actions as fast as the loop goes and write the frames to args.out."""
    if args.out is None:
        raise ValueError("--actions writes a rollout: pass --out dream.mp4 (or .gif, .png)")
    ext = os.path.splitext(args.out)[1].lower()
    if ext not in WRITERS:
        raise ValueError(f"{args.out}: unknown output type '{ext}' (use .mp4, .gif or .png)")
    check_writable(os.path.dirname(os.path.abspath(args.out)))
    world, names, start = open_world(args)
    script = script_actions(args.actions, names, world.per_step)
    if args.compile:
        world.compile_step(background=False)
    elif args.compile is None:   # what play's page compiled before, if anything
        world.compile_step(background=False, only_kept=True)
    lock = OutputLock(f"{args.out}.lock", "wait for it to finish or choose another --out")
    with ExitStack() as stack, lock:
        game = open_game(stack, args, world, names)
        if game is not None:
            start = game_start(world, game, names)
        dream = [start_world(world, start)]
        real = [start["frames"]] if game is not None else None
        t0 = time.perf_counter()
        for i in range(0, len(script), world.per_step):
            dream.append(world.step(script[i:i + world.per_step]))
            if game is not None:
                got = [game.step(a) for a in script[i:i + world.per_step]]
                black = np.zeros_like(dream[-1][0])   # once the game's episode has ended
                real.append(np.stack([g if g is not None else black for g in got]))
        seconds = time.perf_counter() - t0
        frames = np.concatenate(dream)                                        # (N, H, W, 3)
        if game is not None:   # the game beside the dream
            frames = np.concatenate([frames, np.concatenate(real)], axis=2)   # (N, H, 2W, 3)
        write_frames(frames, args.out, ext, args.fps)
    rate = len(script) / max(seconds, 1e-9)
    print(f"{len(script)} frames in {seconds:.1f} s ({rate:.1f} frames/s)", flush=True)
    print(args.out, flush=True)


def write_frames(frames, path, ext, fps):
    """The rollout's frames (N, H, W, 3): a video at their own size, or a PNG sheet of 16 frames
    a row."""
    if ext == ".png":
        per_row = 16
        rows = math.ceil(len(frames) / per_row)
        padded = np.full((rows * per_row, *frames.shape[1:]), 255, np.uint8)
        padded[:len(frames)] = frames
        sheet = padded.reshape(rows, per_row, *frames.shape[1:])   # (rows, 16, H, W, 3)
        save_png(video_grid(sheet), path)
    else:
        (save_mp4 if ext == ".mp4" else save_gif)(frames, path, fps=fps)


# -----------------------------------------------------------------------------
# The page: one player thread drives the world; each open tab reads its frames


def frame_json(frame):
    """A frame for the page: its size, the key event it shows, the step's numbers, and its RGB
    bytes in base64."""
    image = frame["image"]
    rest = {k: v for k, v in frame.items() if k != "image"}
    return json.dumps(dict(w=image.shape[1], h=image.shape[0], **rest,
                           rgb=base64.b64encode(np.ascontiguousarray(image).tobytes()).decode()))


class Handler(BaseHTTPRequestHandler):
    """The page, its stream of frames, and the few JSON commands it sends; make_handler binds it
    to a player and the page's HTML."""

    protocol_version = "HTTP/1.1"
    server_version = "videogpt-play"

    def log_message(self, *args):   # quiet: the console shows the URL and errors only
        pass

    def reply(self, code, body, kind="text/plain; charset=utf-8"):
        data = body.encode() if isinstance(body, str) else body
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def bad(self, code, line):
        self.reply(code, line + "\n")

    def do_GET(self):
        path = urlsplit(self.path).path
        if path == "/":
            return self.reply(200, self.page, "text/html; charset=utf-8")
        if path == "/info":
            player, world = self.player, self.player.world
            idle = player.names[world.idle] if player.names else None
            return self.reply(200, json.dumps(dict(
                actions=player.names, keys=self.bindings, idle=idle, temperature=world.temperature,
                top_k=world.top_k, fps=player.fps, game=player.companion is not None)),
                "application/json")
        if path == "/stream":
            return self.stream()
        self.bad(404, f"not found: {path[:80]}")

    def stream(self):
        """Server-sent events: one `data:` line of JSON per frame, until the tab goes."""
        if not self.player.join():
            return self.bad(503, f"too many tabs watching (at most {self.player.MAX_VIEWERS})")
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            seen = max(0, self.player.seq - 1)   # a new tab starts from the newest frame
            while not self.player.stopped.is_set():
                got = self.player.next_frame(seen)
                if got is None:   # a comment, so a closed tab is noticed while nothing is drawn
                    self.wfile.write(b": waiting\n\n")
                else:
                    seen, frame = got
                    self.wfile.write(b"data: " + frame_json(frame).encode() + b"\n\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass   # the tab closed or reloaded
        finally:
            self.player.leave()

    def do_POST(self):
        path = urlsplit(self.path).path
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return self.bad(400, "bad Content-Length")
        if length > 4096:
            return self.bad(413, "request too large")
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            return self.bad(400, "the body must be a JSON object")
        if path == "/keys":
            held, key_id = body.get("held", []), body.get("id", 0)
            whole = isinstance(key_id, int) and not isinstance(key_id, bool)
            if not isinstance(held, list) or not whole:
                return self.bad(400, "keys: expected {\"held\": [action names], \"id\": integer}")
            unknown = [h for h in held if h not in self.bindings]
            if unknown:
                names = ", ".join(self.player.names) or "none (its dream plays by itself)"
                return self.bad(400, f"unknown action {str(unknown[0])[:40]!r}; "
                                     f"this prior's actions are {names}")
            self.player.keys(held, key_id)
            return self.reply(204, b"")
        if path == "/settings":
            temperature, top_k = body.get("temperature"), body.get("top_k")
            n_codes = self.player.world.gpt.config.n_codes
            number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
            if temperature is not None and not (number(temperature) and 0.05 <= temperature <= 5):
                return self.bad(400, "temperature must be a number in [0.05, 5]")
            if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                                      or not 0 <= top_k <= n_codes):
                return self.bad(400, f"top_k must be a whole number in [0, {n_codes}] "
                                     f"(0: all codes)")
            self.player.settings(temperature, top_k)
            return self.reply(204, b"")
        if path == "/restart":
            self.player.request_restart()
            return self.reply(204, b"")
        self.bad(404, f"not found: {path[:80]}")


def make_handler(player, page):
    """Handler bound to `player` and the page's HTML, with each action's keys."""
    return type("BoundHandler", (Handler,), dict(player=player, page=page,
                                                  bindings=key_bindings(player.names)))


def key_bindings(names):
    """Each action's keys: KEYS's, else a digit; an action of several buttons (Battle2's
    MOVE_FORWARD+TURN_RIGHT) has none of its own and is pressed by holding its buttons' keys, so a
    button that is no action alone (SPEED) is bound too."""
    bindings = {}
    for i, name in enumerate(names):
        buttons = name.split("+")
        if len(buttons) == 1:
            bindings[name] = KEYS.get(name, [str(i + 1)] if i < 9 else [])
            continue
        bindings[name] = []
        for b in buttons:
            if b not in names and b in KEYS:
                bindings[b] = KEYS[b]
    return bindings


def serve(args):
    """Serve the page until Ctrl-C."""
    if not 1 <= args.fps <= 120:
        raise ValueError(f"--fps {args.fps} must be between 1 and 120")
    with open(PAGE, encoding="utf-8") as f:
        page = f.read()
    world, names, start = open_world(args)
    with ExitStack() as stack:
        game = open_game(stack, args, world, names)
        try:
            server = ThreadingHTTPServer((args.host, args.port), None)
        except OSError as e:
            raise ValueError(f"cannot serve on {args.host}:{args.port}: {e.strerror or e} "
                             f"(try --port)") from None
        if args.compile is not False:   # compiled in the background; the page plays eager meanwhile
            world.compile_step(background=True)
        start_fn = (lambda: game_start(world, game, names)) if game is not None else (lambda: start)
        player = Player(world, names, start_fn, args.fps, companion=game)
        server.RequestHandlerClass = make_handler(player, page)
        server.daemon_threads = True
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            warnings.warn(f"--host {args.host}: the page is open to other machines on this network "
                          f"(it serves nothing else, but anyone who reaches it can play)")
        host = f"[{args.host}]" if ":" in args.host else args.host
        # The server answers in its own threads; the dream is drawn in this one (the main thread).
        serving = threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.2),
                                   daemon=True)
        serving.start()
        print(f"http://{host}:{server.server_address[1]}/", flush=True)
        try:
            player.run()
        except KeyboardInterrupt:
            print("play.py: stopped", file=sys.stderr, flush=True)
        finally:
            player.stop()
            world.stop_compiling()
            server.shutdown()
            server.server_close()


def main(argv=None):
    args = parse_args(argv)
    run_cli("play.py", rollout if args.actions is not None else serve, args)


if __name__ == "__main__":
    main()
