"""``python -m lipfast.train --task pose``: the pose recipe of SPEC section 10
(deep-high-resolution-net.pytorch's HRNet-W32 on LIP's pose track) in the
parsing tool's loop (:class:`lipfast.train.Trainer`: DDP, AMP, atomic
checkpoints, exact resume, the stop flag, progress, ``metrics.csv`` and
``curves.png`` are the same code).

- Model: ``--model pose_hrnet_w32`` (default) or ``pose_hrnet_w48``
  (:class:`lipfast.models.PoseHRNet`, 16 joints), ``--norm`` default
  ``batchnorm`` (the reference's plain BatchNorm2d; under DDP its buffers are
  broadcast from rank 0 every forward) or an In-Place ABN; ``--imagenet``
  initialises the backbone (``hrnet_w32-36af842e.pth``), ``--init`` the whole
  model from a pose checkpoint (a lipfast.train pose checkpoint or a released
  bare state dict; a parsing checkpoint is refused).
- Data: ``--data lip-pose:ROOT:SPLIT`` (:class:`lipfast.data.LIPPoseDataset`,
  the reference's augmentation: scale, rotation, flip) at ``--image-size WxH``
  (default 256x256; sizes whose ``ceil(n / 4)`` is a multiple of 8); several
  sources (weights allowed) form a :class:`lipfast.data.MultiSourceDataset`;
  validation (``--val-every``) on ``--val-data`` (default the first source's
  root, split ``val``).
- Loss: :func:`lipfast.pose.heatmap_loss` (JointsMSELoss with target weights,
  the Gaussian targets computed in the kernel) on the float32 heatmaps,
  ``--sigma`` default 2 (3 for 288x384, SPEC 10).
- Optimiser: Adam (``--lr`` 1e-3, ``--weight-decay`` 0), the rate multiplied by
  ``--lr-factor`` (0.1) at the epochs ``--lr-steps`` (170,200) as the
  reference's per-epoch MultiStepLR (:class:`lipfast._train_utils.StepSchedule`);
  210 epochs, batch 32 per process by default.
- Validation: heatmaps decoded with :func:`lipfast.pose.decode` against each
  sample's box, PCKh (``--pckh-threshold`` 0.5) with head sizes by
  ``--head-size`` (default ``lip``: 0.5 x |upper_neck - head_top| of the ground
  truth, :func:`lipfast.pose.head_size_lip`, an unconfirmed LIP rule), the table
  printed, its Mean in ``metrics.csv``'s ``val_pckh`` column and the curves.
- Checkpoint: as parsing's, ``task`` ``"pose"``, ``hparams`` = the model's
  (``model``, ``num_joints``, ``norm``) plus ``image_size`` ([W, H]) and
  ``sigma``, read back by ``lipfast.evaluate --task pose``; ``scheduler`` the
  step schedule's position, ``optimizer`` Adam's moments.
"""

from __future__ import annotations

import math

import torch

from lipfast._train_utils import StepSchedule, model_hparams
from lipfast.train import Trainer

__all__ = ["PoseTrainer", "POSE_CSV_FIELDS", "default_sigma"]

POSE_CSV_FIELDS = ("epoch", "iters", "loss", "lr", "val_pckh", "seconds")


def default_sigma(image_size) -> float:
    """SPEC 10's Gaussian for an input ``(W, H)``: 3 for 288 x 384, else 2."""
    return 3.0 if tuple(image_size) == (288, 384) else 2.0


class PoseTrainer(Trainer):
    """:class:`lipfast.train.Trainer` with the pose recipe (see the module docstring)."""

    task = "pose"
    csv_fields = POSE_CSV_FIELDS
    val_column = "val_pckh"
    val_title = "val PCKh Mean (%)"
    val_label = "val PCKh"
    resume_free = ("norm", "image_size")

    def _default_norm(self) -> str:
        return "batchnorm"

    def _model_kwargs(self, norm: str) -> dict:
        from lipfast.models import is_pose_model

        if not is_pose_model(self.args.model):
            raise ValueError(f"--model {self.args.model} is a parsing model; --task pose trains "
                             "pose_hrnet_w32 or pose_hrnet_w48")
        return {"norm": norm}

    def _check_args(self) -> None:
        from lipfast._pose_tools import check_image_size, head_size_arg

        a = self.args
        self._check_common_args()
        a.image_size = check_image_size(a.image_size)
        self.sigma = float(default_sigma(a.image_size) if a.sigma is None else a.sigma)
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"--sigma must be a positive number, got {a.sigma}")
        for flag, v in (("--lr-factor", a.lr_factor), ("--pckh-threshold", a.pckh_threshold)):
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{flag} must be a positive number, got {v}")
        if not (math.isfinite(a.weight_decay) and a.weight_decay >= 0):
            raise ValueError(f"--weight-decay must be >= 0, got {a.weight_decay}")
        a.head_size = head_size_arg(a.head_size)

    def _collate(self):
        from lipfast.data import pose_collate

        return pose_collate

    def _source_kwargs(self) -> dict:
        return {"image_size": tuple(self.args.image_size)}

    def _build_model(self):
        from lipfast.models import build

        return build(self.args.model, **self.model_kwargs)

    def _hparams(self) -> dict:
        return dict(model_hparams(self.model), image_size=list(self.args.image_size),
                    sigma=self.sigma)

    def _build_training(self) -> None:
        a = self.args
        self.ce2p_outputs = False
        self.criterion = None
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=a.lr,
                                          weight_decay=a.weight_decay)
        self.scheduler = StepSchedule(self.optimizer, a.lr, self.iters_per_epoch,
                                      milestones=a.lr_steps, factor=a.lr_factor)
        self.schp_start = None
        self.schp_model = None

    def _init_config(self, ckpt, model) -> None:
        """``--init``: a pose checkpoint (a parsing one is refused), its width and
        joints checked against ``--model`` and the model."""
        from lipfast.models import checkpoint_config

        checkpoint_config(ckpt, model=self.args.model, num_joints=model.num_joints,
                          task="pose")

    # -------------------------------------------------------------- steps
    def train_step(self, images, joints, visible) -> torch.Tensor:
        """One Adam step on :func:`lipfast.pose.heatmap_loss` of the float32
        heatmaps against the targets of ``joints`` (B x J x 2, input pixels) with
        the target weights ``visible`` (B x J); returns the detached loss."""
        from lipfast.pose import heatmap_loss

        nb = self.device.type == "cuda"
        images = images.to(self.device, non_blocking=nb)
        joints = joints.to(self.device, non_blocking=nb)
        visible = visible.to(self.device, non_blocking=nb)
        heatmaps = self._forward(images)
        loss = heatmap_loss(heatmaps.float(), joints, visible, tuple(self.args.image_size),
                            self.sigma)
        return self._backward_and_step(loss)

    def validate(self):
        """The PCKh of the model on this rank's shard of ``--val-data``, all-reduced."""
        from lipfast._pose_tools import evaluate_pose_loader

        a = self.args
        loader, prog = self._val_loader()
        try:
            pckh = evaluate_pose_loader([self.model], loader, self.device,
                                        autocast=self.autocast, head_size=a.head_size,
                                        threshold=a.pckh_threshold, progress=prog,
                                        reduce=self.world > 1)
        finally:
            prog.close()
        self.model.train()
        return pckh

    def _validation_result(self):
        pckh = self.validate()
        return f"{float(pckh.compute()['table']['Mean']):.4f}", pckh.format_table()

    def _describe_run(self) -> str:
        a = self.args
        w, h = a.image_size
        steps = ",".join(map(str, a.lr_steps)) or "none"
        return (f"task pose, model {a.model}, norm {self.model.norm}, input {w}x{h}, sigma "
                f"{self.sigma:g}, Adam lr {a.lr:g} x{a.lr_factor:g} at epochs {steps}")
