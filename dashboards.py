"""Dashboards: a run's curves, pictures and videos in TensorBoard or Weights & Biases.

    python train.py ... --tensorboard                      # event files in OUT_DIR/tb; tensorboard --logdir runs
    python train.py ... --wandb PROJECT [--wandb_run NAME] # a W&B run; WANDB_MODE=offline needs no network

Both are optional dependencies, imported only when asked for. They are fed
from the run's one logging place (`run.Run.log`, which also writes
log.jsonl, and `run.Run.pictures`, which writes the PNG / GIF files), on rank
0, at the log and evaluation intervals only: nothing here reads the device.

Every numeric field of a log record becomes a scalar named `SPLIT/FIELD`
(`train/loss`, `train/recon_loss`, `train/bits_per_code`, `train/lr`,
`train/grad_norm`, `train/clips_per_s`, `test/loss`, ...) at the record's
step; the pictures a run draws become images (`test/recon`) and videos
(`test/samples`, the GIF itself: TensorBoard plays a GIF image summary, so no
moviepy is needed).

A resumed run continues the same curves with each step once. TensorBoard:
the writer reopens with `purge_step` = the checkpoint's step + 1, which tells
TensorBoard to drop whatever the killed run logged after the checkpoint (the
resumed run logs those steps again, with the same values: resume is exact).
W&B: the run id is kept in OUT_DIR/wandb_run_id and the run resumed under
it; the steps the killed run already sent (up to the last one in log.jsonl,
which is written after the dashboards) are not sent again, and W&B itself
ignores a step logged twice.
"""

import io
import os
import secrets

from checkpoints import atomic_write


def missing(package, flag):
    return ValueError(f"{flag} needs the {package} package: pip install {package}")


def numeric_fields(record):
    """{SPLIT/FIELD: value} of a log record's numbers (not its step and split)."""
    return {f"{record['split']}/{k}": float(v) for k, v in record.items()
            if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    """Event files in OUT_DIR/tb through torch.utils.tensorboard (which needs the tensorboard package)."""

    def __init__(self, out_dir, resumed_step):
        try:
            from torch.utils.tensorboard import SummaryWriter   # lazy: an optional dependency
        except ImportError:
            raise missing("tensorboard", "--tensorboard") from None
        # purge_step: events of steps >= it that a killed run wrote are dropped by TensorBoard's readers.
        self.writer = SummaryWriter(os.path.join(out_dir, "tb"), purge_step=resumed_step + 1)

    def log(self, record):
        for name, value in numeric_fields(record).items():
            self.writer.add_scalar(name, value, record["step"])
        self.writer.flush()   # a killed run leaves on disk what log.jsonl has

    def picture(self, name, path, step):
        """A PNG as an image, a GIF as a video (an animated image summary, which TensorBoard plays)."""
        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary
        with open(path, "rb") as f:
            encoded = f.read()
        width, height = Image.open(io.BytesIO(encoded)).size
        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=encoded)
        self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=name, image=image)]), step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandB:
    """A W&B run: scalars, images and videos at the run's steps, the resolved config, resumed by id."""

    def __init__(self, out_dir, project, name, config, logged_until=0):
        try:
            import wandb   # lazy: an optional dependency
        except ImportError:
            raise missing("wandb", "--wandb") from None
        self.wandb = wandb
        id_path = os.path.join(out_dir, "wandb_run_id")
        if os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        else:
            run_id = secrets.token_hex(4)          # W&B ids are letters and digits
            atomic_write(id_path, lambda f: f.write(run_id + "\n"), binary=False)
        self.run = wandb.init(project=project, name=name, id=run_id, resume="allow", dir=out_dir, config=config)
        self.logged_until = logged_until   # steps a killed run already sent: not sent twice

    def log(self, record):
        if record["step"] > self.logged_until:
            self.run.log(numeric_fields(record), step=record["step"])

    def picture(self, name, path, step):
        if step <= self.logged_until:
            return
        media = self.wandb.Video(path, format="gif") if path.endswith(".gif") else self.wandb.Image(path)
        self.run.log({name: media}, step=step)

    def close(self):
        self.run.finish()


class Dashboards:
    """The dashboards a run's flags ask for (none, one or both), called as one."""

    def __init__(self, args, resumed_step, logged_until, config, master=True):
        self.boards = []
        if master and args.tensorboard:
            self.boards.append(TensorBoard(args.out_dir, resumed_step))
        if master and args.wandb:
            self.boards.append(WandB(args.out_dir, args.wandb, args.wandb_run, config, logged_until))

    def log(self, record):
        for board in self.boards:
            board.log(record)

    def picture(self, name, path, step):
        for board in self.boards:
            board.picture(name, path, step)

    def close(self):
        for board in self.boards:
            board.close()
