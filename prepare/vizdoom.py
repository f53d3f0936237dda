"""ViZDoom, made here (Section 4.4 of the paper): episodes of a 3D world with the actions that steer
it.

    python -m prepare vizdoom vizdoom.h5        # the paper's size: 1000 episodes of 100 frames
    python -m prepare vizdoom small.h5 --episodes 40 --length 32 --resolution 32 --seed 1
    python -m prepare vizdoom battle2.h5 --scenario battle2   # the paper's second world
    python -m prepare vizdoom mine.h5 --scenario path/to/mine.cfg    # any scenario .cfg

The `vizdoom` package (an optional dependency: `pip install vizdoom`) ships the
engine, the Freedoom assets and its scenarios (health_gathering_supreme among
them). The paper's Battle2 is not shipped: its map comes from the wheel of
sample-factory 2.1.1 (`pip install --no-deps sample-factory==2.1.1`) or
`--wad PATH`, checked by its sha256, and world.py writes its scenario settings.
The game runs headless, seeded, so the same seed gives the same file, byte for
byte.

Each episode: `--length` frames, one every `--frame_skip` game tics, made 64x64
by data.preprocess (shorter side scaled, centre cropped). The layout is the one
every dataset here uses, split 8:1:1 into train / val / test:

    {split}_data     uint8 (N_frames, R, R, 3)   {split}_idx  int64 (N_episodes,)
    {split}_actions  float32 (N_frames, A)       one-hot: actions[t] is the button pressed after
                                                 frame t was seen, which leads to frame t + 1
    {split}_states   float32 (N_frames, S)       the scenario's game variables at frame t
                                                 (health, ...)
    action_names, state_names                    e.g. TURN_LEFT, TURN_RIGHT, MOVE_FORWARD; HEALTH

An episode that ends before `--length` frames (the player died) is dropped and
played again with the next seed: a clip is one life, never padded with a frozen
screen nor stitched across a death, which a prior would learn as motion.

The built-in policy (`Explorer`) plays as a person would: it holds each action
for several steps, so turning and walking show in the video; it turns towards
a health pack it sees and walks to it; otherwise it explores, walking on while
the way ahead is open (the depth buffer) and turning to the more open side
before a wall, with every button in a fair share. Battle2's (`Fighter`) also
turns to monsters and shoots them, dodges, and fetches health and ammunition
when low (docs/vizdoom.md). `--policy module:function` plugs in your own: a
callable (observation) -> action index.
"""

import importlib
import os

import h5py
import numpy as np
from tqdm import tqdm

from checkpoints import atomic_write, check_writable
from data import preprocess, to_uint8
from world import is_battle2, make_game

# -----------------------------------------------------------------------------
# The built-in policy


class Explorer:
    """Holds each action for 3-8 steps; turns to a visible health pack and walks to it; walks on
    while the way ahead is open and turns towards the more open side before a wall; turns now and
    then, for a fair share.

    Called with an observation dict(frame (H, W, 3) uint8, depth (H, W) uint8 (distance, 0 near),
    labels [(name, x, width)] of the objects in view, buttons [names]) and returns the index of the
    button to press."""

    NEAR = 14   # depth units ahead under which the way is blocked (a wall about four steps away)

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.action, self.left = None, 0

    @classmethod
    def blocked(cls, depth):
        """Whether a wall stands close ahead: the median depth of the middle ninth of the view
        (depth (H, W)) under NEAR."""
        h, w = depth.shape
        return bool(np.median(depth[h // 3:2 * h // 3, w // 3:2 * w // 3]) < cls.NEAR)

    def hold(self, action, low, high):
        self.action, self.left = action, int(self.rng.integers(low, high))
        return action

    def __call__(self, obs):
        buttons, depth = obs["buttons"], obs["depth"]
        forward = buttons.index("MOVE_FORWARD") if "MOVE_FORWARD" in buttons else None
        turns = [buttons.index(b) for b in ("TURN_LEFT", "TURN_RIGHT") if b in buttons]
        w = depth.shape[1]
        blocked = self.blocked(depth)
        if self.left > 0 and not (blocked and self.action == forward):
            self.left -= 1
            return self.action
        packs = [x + width / 2 for name, x,
                 width in obs["labels"] if "medikit" in name.lower() or "health" in name.lower()]
        if len(turns) == 2 and blocked:     # towards the side with more room
            return self.hold(turns[0] if depth[:, :w // 2].mean() > depth[:, w // 2:].mean()
                             else turns[1], 4, 9)
        if packs and forward is not None and len(turns) == 2:
            # The pack nearest the centre of view: turn until it is ahead, then walk to it.
            offset = (min(packs, key=lambda c: abs(c - w / 2)) - w / 2) / w
            return self.hold(forward if abs(offset) < 0.1 else turns[0] if offset < 0
                             else turns[1], 2, 5)
        # Explore: forward half the time, any other button the rest, each held long enough to show.
        weights = np.ones(len(buttons))
        if forward is not None:
            weights[forward] = max(1, len(buttons) - 1)
        return self.hold(int(self.rng.choice(len(buttons), p=weights / weights.sum())), 3, 9)


class Fighter(Explorer):
    """Battle2's built-in player: turns toward the monster nearest the centre of view and shoots
    it once it is ahead, strafing now and then and backing off when it is close; walks to a
    medikit when health is low and to ammunition when it runs out; otherwise explores as Explorer
    does (the depth buffer keeps it from staring at walls), forward with a turn or a run mixed in.

    Its observation adds `variables` (the scenario's game variables by name: HEALTH, AMMO2) to
    Explorer's; it returns the index of an action of prepare.vizdoom.BATTLE2_ACTIONS."""

    MONSTERS = ("Imp", "Demon", "Zombie", "Sergeant", "Cacodemon", "Baron", "Knight", "Spectre")

    def __init__(self, seed):
        super().__init__(seed)
        self.fighting = False   # the held action is a fight's (not Explorer's walk)

    def __call__(self, obs):
        names, depth, var = obs["buttons"], obs["depth"], obs.get("variables", {})
        act = lambda name: names.index(name)
        w = depth.shape[1]
        if self.left > 0 and self.fighting:   # a fight's move, held on
            self.left -= 1
            return self.action
        self.fighting = False
        seen = lambda kinds: [(x + width / 2 - w / 2) / w for name, x, width in obs["labels"]
                              if any(k.lower() in name.lower() for k in kinds)]
        monsters = [] if var.get("AMMO2", 1) <= 0 else seen(self.MONSTERS)
        wanted = (seen(("Medikit",)) if var.get("HEALTH", 100) < 50 else
                  seen(("Clip",)) if var.get("AMMO2", 1) < 5 else [])
        for targets, shoot in ((monsters, True), (wanted, False)):
            if targets:
                self.fighting = True
                offset = min(targets, key=abs)      # of the view's width, from its centre
                if abs(offset) > 0.08:
                    return self.hold(act("TURN_LEFT" if offset < 0 else "TURN_RIGHT"), 1, 3)
                if not shoot:
                    return self.hold(act("MOVE_FORWARD+SPEED"), 2, 5)
                roll = self.rng.random()
                if roll < 0.2:                      # dodge as a player does
                    return self.hold(act(self.rng.choice(["MOVE_LEFT", "MOVE_RIGHT"])), 2, 4)
                if roll < 0.3:
                    return self.hold(act("MOVE_BACKWARD"), 2, 4)
                return self.hold(act("ATTACK" if roll < 0.8 else "MOVE_FORWARD+ATTACK"), 2, 4)
        choice = super().__call__(obs)        # Explorer's walk, its own holds included
        if names[choice] == "MOVE_FORWARD" and self.left > 2 and self.rng.random() < 0.4:
            # Forward with a turn or a run: the combinations Battle2's players use.
            choice = act(self.rng.choice(["MOVE_FORWARD+TURN_LEFT", "MOVE_FORWARD+TURN_RIGHT",
                                          "MOVE_FORWARD+MOVE_RIGHT", "MOVE_FORWARD+SPEED"]))
            self.action = choice
        return choice


def load_policy(spec, scenario=None):
    """A factory seed -> policy: the built-in one (None: Battle2's Fighter, or Explorer), or
    `module:function`, one's own policy (any seed)."""
    if spec is None:
        return Fighter if is_battle2(scenario) else Explorer
    module, _, name = spec.partition(":")
    try:
        policy = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"--policy {spec}: cannot import it ({type(e).__name__}); expected "
                         "module:function") from None
    return lambda seed: policy


# -----------------------------------------------------------------------------
# Episodes and the file

# What a player of Battle2 presses: its buttons alone, and the combinations a player uses most, as
# one action each (named with "+"). SPEED alone shows nothing (it makes a move a run), so it comes
# only with moving forward; "forward and right" is the paper's Figure 8 conditioning. Every other
# scenario's actions are its buttons, one at a time.
BATTLE2_ACTIONS = ("MOVE_FORWARD", "MOVE_BACKWARD", "MOVE_LEFT", "MOVE_RIGHT", "TURN_LEFT",
                   "TURN_RIGHT", "ATTACK", "MOVE_FORWARD+TURN_LEFT", "MOVE_FORWARD+TURN_RIGHT",
                   "MOVE_FORWARD+MOVE_RIGHT", "MOVE_FORWARD+ATTACK", "MOVE_FORWARD+SPEED")


def scenario_actions(scenario, buttons):
    """The actions of a scenario, each the names of the buttons it presses together."""
    if is_battle2(scenario):
        return [tuple(a.split("+")) for a in BATTLE2_ACTIONS]
    return [(b,) for b in buttons]


def play_episode(game, policy, length, frame_skip, resolution, actions_pressed=None):
    """One life of `length` frames: uint8 (length, R, R, 3), one-hot actions (length, A), states
    (length, S); None if the episode ended first. `actions_pressed` lists each action's buttons
    (default: one button each); the policy sees the actions' names as its "buttons"."""
    available = [b.name for b in game.get_available_buttons()]
    variables = [v.name for v in game.get_available_game_variables()]
    actions_pressed = actions_pressed or [(b,) for b in available]
    buttons = ["+".join(a) for a in actions_pressed]
    press = [[int(b in a) for b in available] for a in actions_pressed]   # (A, n_buttons)
    frames, actions, states = [], [], []
    game.new_episode()
    for _ in range(length):
        if game.is_episode_finished():
            return None
        state = game.get_state()
        frame = state.screen_buffer  # (120, 160, 3) uint8
        labels = [(label.object_name, label.x, label.width) for label in state.labels]
        obs = dict(frame=frame, depth=state.depth_buffer, labels=labels, buttons=buttons,
                   variables=dict(zip(variables, state.game_variables)))
        a = int(policy(obs))
        if not 0 <= a < len(buttons):
            raise ValueError(f"the policy returned {a}, not a button index in [0, {len(buttons)})")
        frames.append(to_uint8(preprocess(frame[None], resolution)).numpy()[0])   # (R, R, 3)
        actions.append(np.eye(len(buttons), dtype=np.float32)[a])
        states.append(np.asarray(state.game_variables, np.float32))
        game.make_action(press[a], frame_skip)
    return np.stack(frames), np.stack(actions), np.stack(states)


def split_sizes(n):
    """8:1:1 of n episodes, at least one each for val and test."""
    val = test = max(1, round(n * 0.1))
    return {"train": n - val - test, "val": val, "test": test}


def write_vizdoom(out, scenario="health_gathering_supreme", episodes=1000, length=100,
                  resolution=64, frame_skip=4, seed=0, policy=None, progress=True, wad=None):
    """Play `episodes` lives of `length` frames and write them to `out` (HDF5), atomically; returns
    the counts."""
    if episodes < 3:
        raise ValueError(f"--episodes {episodes}: need at least 3 (train, val and test)")
    check_writable(os.path.dirname(os.path.abspath(out)))
    make_policy = load_policy(policy, scenario)
    sizes, dropped, played = split_sizes(episodes), 0, {}
    episode_seeds = iter(range(seed * 1_000_003, (seed + 1) * 1_000_003))
    with make_game(scenario, seed, wad) as game, tqdm(total=episodes, desc="episodes",
                                                      unit="episode", disable=not progress) as bar:
        pressed = scenario_actions(scenario, [b.name for b in game.get_available_buttons()])
        buttons = ["+".join(a) for a in pressed]
        variables = [v.name for v in game.get_available_game_variables()]
        for split, n in sizes.items():
            played[split] = []
            while len(played[split]) < n:
                s = next(episode_seeds)
                game.set_seed(s)
                clip = play_episode(game, make_policy(s), length, frame_skip, resolution, pressed)
                if clip is None:
                    dropped += 1
                    if dropped > 10 * episodes:
                        raise ValueError(f"{scenario}: {dropped} episodes ended before {length} "
                                         "frames; try a shorter --length")
                    continue
                played[split].append(clip)
                bar.update(1)

    def write(f):
        with h5py.File(f, "w") as h5:
            for split, clips in played.items():
                h5.create_dataset(f"{split}_data", data=np.concatenate([c[0] for c in clips]),
                                  chunks=(1, resolution, resolution, 3))
                h5.create_dataset(f"{split}_idx",
                                  data=np.arange(len(clips), dtype=np.int64) * length)
                h5.create_dataset(f"{split}_actions", data=np.concatenate([c[1] for c in clips]))
                h5.create_dataset(f"{split}_states", data=np.concatenate([c[2] for c in clips]))
            h5.create_dataset("action_names", data=np.array(buttons, dtype=h5py.string_dtype()))
            h5.create_dataset("state_names", data=np.array(variables, dtype=h5py.string_dtype()))
            h5.attrs.update(scenario=scenario, frame_skip=frame_skip, seed=seed,
                            policy=policy or make_policy.__name__)
    atomic_write(out, write)
    return dict(sizes, dropped=dropped, buttons=buttons)
