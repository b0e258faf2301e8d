"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2,
section 3 and Algorithm 3): choose the EMA length after training.

During training every stage keeps one power-function EMA per tracked ``sigma_rel`` (ema-pytorch's
``KarrasEMA``, updated after every optimizer step): at step ``t`` its weights average the training weights with
the profile ``p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)`` on ``0 < tau <= t``, where ``gamma`` follows
from ``sigma_rel`` (the profile's standard deviation relative to ``t``; ``sigma_rel_to_gamma``). Every
``snapshot_every`` steps each is stored as a snapshot. Afterwards the EMA of any ``sigma_rel`` at any snapshot
step is the combination of the snapshots whose profiles best match its profile in the least-squares sense
(ema-pytorch's ``p_dot_p`` and ``solve_weights``, EDM2's Algorithm 3), without retraining.

Time: ``KarrasEMA``'s ``n``-th update uses ``beta = (1 - 1/(n + 1))^(gamma + 1)``, EDM2's recursion at
``t = n + 1``, and its first update copies the weights. After ``n`` steps the EMA is therefore exactly the
integral of ``p_t`` over the piecewise-constant trajectory (the weights after step ``s`` on ``(s, s + 1]``, the
first ones also on ``(0, 1]``) with ``t = n + 1``: the snapshots' times are their step counts plus one.

Storage (never pickled): snapshots go to ``CHECKPOINT/posthoc_ema/stage{k}-step-{step}/``, each a small
checkpoint of its own committed through :func:`imagen_lib.checkpoint.write_checkpoint` (a kill leaves it
committed or absent), ``config.json`` saying what it holds and ``ema{i}.safetensors`` the EMA of
``sigma_rels[i]``. The folder lives beside the checkpoint's versions, so saving, rotating (``keep_last``) or
overwriting the checkpoint never deletes it; a reconstruction uses only the snapshots of the run that wrote the
checkpoint. The tracked EMAs themselves are part of the resumable trainer state (``stage{k}.posthoc{i}`` and
``posthoc_ema.json`` in every checkpoint version), so a resumed run continues them exactly.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from imagen_lib import checkpoint as ckpt
from imagen_lib.checkpoint import PathLike
from imagen_lib.checkpoint.commit import POSTHOC_FOLDER
from imagen_lib.checkpoint.files import join
from imagen_lib.checkpoint.store import open_store
from imagen_lib.validation import check_int, check_number

__all__ = ["PostHocEMASettings", "PostHocTracker", "Snapshot", "check_sigma_rel", "list_snapshots",
           "reconstruct_ema", "relative_error", "save_reconstruction", "snapshot_weights"]

SNAPSHOT_FORMAT = "imagen_lib-posthoc-ema-snapshot-1"
STATE_FILE = "posthoc_ema"  # posthoc_ema.json in every trainer checkpoint version
MAX_SIGMA_REL = 12 ** -0.5  # sigma_rel of gamma = 0 (a uniform average); larger ones have no gamma >= 0


def check_sigma_rel(name: str, value: Any) -> float:
    """A relative EMA length: a number in (0, 12^-0.5 = 0.2887) (EDM2 uses 0.05 to 0.2; 12^-0.5 is the
    uniform average of all the training weights)."""
    return check_number(name, value, low=0, high=MAX_SIGMA_REL, low_open=True, high_open=True)


def _check_sigma_rels(name: str, values: Any) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise TypeError(f"{name}: expected a non-empty list of numbers in (0, {MAX_SIGMA_REL:.4f}), got {values!r}")
    out = [check_sigma_rel(f"{name}[{i}]", v) for i, v in enumerate(values)]
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: expected distinct values, got {out}")
    return out


@dataclass
class PostHocEMASettings:
    """``TrainerSettings.posthoc_ema`` (the config's ``trainer: {posthoc_ema: {...}}``).

    Attributes:
        sigma_rels: the relative EMA lengths tracked during training [0.05, 0.10]; two or more let any length
            in between (and somewhat beyond) be reconstructed.
        snapshot_every: optimizer steps between snapshots [500]; more snapshots reconstruct more closely.
    """

    sigma_rels: Sequence[float] = (0.05, 0.10)
    snapshot_every: int = 500

    def __post_init__(self):
        self.sigma_rels = _check_sigma_rels("posthoc_ema.sigma_rels", self.sigma_rels)
        self.snapshot_every = check_int("posthoc_ema.snapshot_every", self.snapshot_every, low=1)


def check_settings(value: Any) -> Optional[PostHocEMASettings]:
    """``TrainerSettings.posthoc_ema``: None (off), a :class:`PostHocEMASettings` or a dict of its fields."""
    if value is None or isinstance(value, PostHocEMASettings):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"posthoc_ema: expected None, a PostHocEMASettings or a dict with sigma_rels and "
                        f"snapshot_every, got {value!r}")
    unknown = sorted(set(value) - {f.name for f in dataclasses.fields(PostHocEMASettings)})
    if unknown:
        raise ValueError(f"posthoc_ema: unknown keys {unknown}; expected sigma_rels and snapshot_every")
    return PostHocEMASettings(**value)


# ---------------------------------------------------------------------------------------------------------
# tracking during training
# ---------------------------------------------------------------------------------------------------------


class PostHocTracker:
    """The power-function EMAs of each stage's network (one ``KarrasEMA`` per ``sigma_rel``), their
    snapshots and their share of the resumable trainer state. The Trainer calls :meth:`update` after every
    optimizer step of a stage and :meth:`after_step` in :meth:`~imagen_lib.training.trainer.Trainer.fit`."""

    def __init__(self, settings: PostHocEMASettings, nets: Sequence[nn.Module]):
        from ema_pytorch import KarrasEMA

        self.settings = settings
        self.emas = [[KarrasEMA(net, sigma_rel=s, update_every=1) for s in settings.sigma_rels] for net in nets]
        self.run_ids: set[str] = set()  # runs whose snapshots are this run's (resumed ones, background stages)

    @classmethod
    def for_trainer(cls, settings: Optional[PostHocEMASettings], nets: Sequence[nn.Module],
                    sharded: bool) -> Optional[PostHocTracker]:
        """The tracker of ``TrainerSettings.posthoc_ema`` (None when it is off)."""
        if settings is None:
            return None
        if sharded:
            raise ValueError("posthoc_ema: not supported with sharded (FSDP) training; use data parallel or drop it")
        return cls(settings, nets)

    def update(self, stage: int) -> None:
        """One EMA update of every tracked length of ``stage`` (after an optimizer step)."""
        for ema in self.emas[stage]:
            ema.update()

    def updates(self, stage: int) -> int:
        """EMA updates of ``stage`` so far (its optimizer steps)."""
        return int(self.emas[stage][0].step)

    def after_step(self, stage: int, checkpoint: PathLike, run_id: str, main_process: bool = True) -> Optional[str]:
        """Write ``stage``'s snapshot under ``checkpoint`` when its step is a multiple of ``snapshot_every``
        (main process only); returns the snapshot's path or None."""
        n = self.updates(stage)
        if not main_process or n == 0 or n % self.settings.snapshot_every:
            return None
        return self.snapshot(stage, checkpoint, run_id)

    def snapshot(self, stage: int, checkpoint: PathLike, run_id: Optional[str] = None) -> str:
        """Store every tracked EMA of ``stage`` now as ``checkpoint/posthoc_ema/stage{k}-step-{n}`` (replacing a
        snapshot of that stage and step, e.g. one a resumed run takes again); returns its path."""
        n = self.updates(stage)
        config = {"format": SNAPSHOT_FORMAT, "stage": stage, "step": n, "sigma_rels": self.settings.sigma_rels,
                  "gammas": [float(ema.gamma) for ema in self.emas[stage]], "run_id": run_id}
        tensors = {f"ema{i}": ema.ema_model.state_dict() for i, ema in enumerate(self.emas[stage])}
        path = join(join(checkpoint, POSTHOC_FOLDER), f"stage{stage}-step-{n:07d}")
        return ckpt.write_checkpoint(path, config=config, tensors=tensors, run_id=run_id, overwrite=True)

    def state(self, run_id: str) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict]]:
        """(weight files, json files) of the tracked EMAs for a checkpoint of run ``run_id``."""
        files = {f"stage{k}.posthoc{i}": ema.ema_model.state_dict()
                 for k, emas in enumerate(self.emas) for i, ema in enumerate(emas)}
        counters = {"sigma_rels": self.settings.sigma_rels, "snapshot_every": self.settings.snapshot_every,
                    "updates": [self.updates(k) for k in range(len(self.emas))],
                    "initted": [bool(emas[0].initted) for emas in self.emas],
                    "run_ids": sorted(self.run_ids | {run_id})}
        return files, {STATE_FILE: counters}

    def load(self, path: PathLike, stages: Sequence[int], steps: Sequence[int], device: Any = None) -> None:
        """Restore the tracked EMAs of ``stages`` from the trainer checkpoint at ``path`` (``steps``: each stage's
        optimizer steps there). A checkpoint without them (tracking was off) starts them at the stage's step,
        with a warning: their profiles then treat the weights at that step as the earlier ones."""
        if not ckpt.has_file(path, f"{STATE_FILE}.json"):
            self._start_late(path, stages, steps)
            return
        saved = ckpt.read_json(path, STATE_FILE)
        self.run_ids.update(_run_ids(path, saved))
        if list(saved.get("sigma_rels", [])) != list(self.settings.sigma_rels):
            raise ValueError(f"posthoc_ema.sigma_rels: checkpoint {path!s} tracked {saved.get('sigma_rels')}, this "
                             f"trainer tracks {self.settings.sigma_rels}; resume with the same values")
        for k in stages:
            for i, ema in enumerate(self.emas[k]):
                name = f"stage{k}.posthoc{i}"
                weights = ckpt.read_tensors(path, name, device or "cpu")
                ckpt.load_weights(ema.ema_model, weights, f"{name}.safetensors in {path}")
                ema.step.fill_(int(saved["updates"][k]))
                ema.initted.fill_(bool(saved["initted"][k]))

    def _start_late(self, path: PathLike, stages: Sequence[int], steps: Sequence[int]) -> None:
        for k in stages:
            if steps[k] > 0:
                warnings.warn(f"posthoc_ema: checkpoint {path!s} holds no post-hoc EMA state; stage {k}'s EMAs start "
                              f"at its step {steps[k]} (their profiles take the weights there for the earlier ones)",
                              stacklevel=3)
            for ema in self.emas[k]:
                ema.step.fill_(steps[k])
                ema.initted.fill_(False)


# ---------------------------------------------------------------------------------------------------------
# snapshots and their least-squares combination (EDM2's Algorithm 3)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """One stored EMA: of ``stage`` after ``step`` optimizer steps, length ``sigma_rel`` (exponent ``gamma``),
    in ``name``.safetensors of the snapshot checkpoint ``path``, written by run ``run_id``."""

    stage: int
    step: int
    sigma_rel: float
    gamma: float
    path: str
    name: str
    run_id: Optional[str]


def _read_snapshot_folder(path: str) -> list[Snapshot]:
    config = ckpt.read_config(path)
    if config.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"{path}: config.json is not a post-hoc EMA snapshot (format {config.get('format')!r})")
    stage, step = check_int(f"{path}: stage", config.get("stage"), low=0), check_int(f"{path}: step",
                                                                                    config.get("step"), low=1)
    sigmas, gammas = config.get("sigma_rels"), config.get("gammas")
    if not isinstance(sigmas, list) or not isinstance(gammas, list) or len(sigmas) != len(gammas):
        raise ValueError(f"{path}: config.json needs equally long sigma_rels and gammas lists")
    return [Snapshot(stage, step, float(s), float(g), path, f"ema{i}", config.get("run_id"))
            for i, (s, g) in enumerate(zip(sigmas, gammas))]


def _run_ids(checkpoint: PathLike, saved: Optional[Mapping] = None) -> set[str]:
    """The runs whose snapshots belong to the checkpoint: the run that wrote it and those its
    ``posthoc_ema.json`` lists (earlier runs it resumed, stages trained in their own processes)."""
    if saved is None and ckpt.is_checkpoint(checkpoint) and ckpt.has_file(checkpoint, f"{STATE_FILE}.json"):
        saved = ckpt.read_json(checkpoint, STATE_FILE)
    listed = (saved or {}).get("run_ids", [])
    ids = {r for r in listed if isinstance(r, str)} if isinstance(listed, list) else set()
    run_id = ckpt.checkpoint_run_id(checkpoint)
    return ids | ({run_id} if isinstance(run_id, str) else set())


def list_snapshots(checkpoint: PathLike, stage: Optional[int] = None) -> list[Snapshot]:
    """The snapshots stored with the checkpoint at ``checkpoint`` (of ``stage`` only, when given), sorted by
    stage, step and length. Only the runs of the checkpoint count (:func:`_run_ids`; a checkpoint that records
    none takes every snapshot); a snapshot whose write was interrupted (never committed) is skipped."""
    folder = join(checkpoint, POSTHOC_FOLDER)
    runs = _run_ids(checkpoint)
    found = []
    for name, is_dir in sorted(open_store(folder).entries().items()):
        if not is_dir:
            continue
        try:
            snapshots = _read_snapshot_folder(join(folder, name))
        except FileNotFoundError:  # never committed: a kill during its write
            continue
        found += [s for s in snapshots if (stage is None or s.stage == stage) and (not runs or s.run_id in runs)]
    return sorted(found, key=lambda s: (s.stage, s.step, s.sigma_rel))


def snapshot_weights(snapshots: Sequence[Snapshot], sigma_rel: float, step: int) -> Tensor:
    """Least-squares weights (float64, one per snapshot) of the snapshots whose combination best matches the
    EMA profile of ``sigma_rel`` at ``step`` (EDM2's Algorithm 3 through ema-pytorch's ``solve_weights``;
    times are steps + 1, see the module's docstring)."""
    from ema_pytorch.post_hoc_ema import sigma_rel_to_gamma, solve_weights

    t_i = torch.tensor([s.step + 1 for s in snapshots], dtype=torch.float64)
    gamma_i = torch.tensor([s.gamma for s in snapshots], dtype=torch.float64)
    t_r = torch.tensor([step + 1], dtype=torch.float64)
    gamma_r = torch.tensor([sigma_rel_to_gamma(sigma_rel)], dtype=torch.float64)
    return solve_weights(t_i, gamma_i, t_r, gamma_r).squeeze(-1)


def _combine(snapshots: Sequence[Snapshot], weights: Tensor) -> dict[str, Tensor]:
    """``sum_i weights[i] * snapshot_i``, summed in float64 (the weights are large and of both signs when the
    snapshots are dense); tensors that are not floats are the last snapshot's."""
    total: dict[str, Tensor] = {}
    for snapshot, weight in zip(snapshots, weights.tolist()):
        for key, value in ckpt.read_tensors(snapshot.path, snapshot.name).items():
            if value.is_floating_point():
                total[key] = total.get(key, 0) + value.double() * weight
            else:
                total[key] = value
    dtypes = {k: v.dtype for k, v in ckpt.read_tensors(snapshots[-1].path, snapshots[-1].name).items()}
    return {k: v.to(dtypes[k]) for k, v in total.items()}


def _stage_steps(checkpoint: PathLike, num_stages: int) -> Optional[list[int]]:
    if not ckpt.has_file(checkpoint, "trainer.json"):
        return None
    steps = ckpt.read_json(checkpoint, "trainer").get("steps")
    return steps if isinstance(steps, list) and len(steps) == num_stages else None


def _chosen(snapshots: list[Snapshot], stage: int, step: Optional[int], limit: Optional[int],
            from_sigma_rels: Optional[list[float]]) -> tuple[list[Snapshot], int]:
    """The snapshots of ``stage`` used for a reconstruction at ``step`` (default: the last snapshot at or before
    the checkpoint's step ``limit``), and that step."""
    mine = [s for s in snapshots if s.stage == stage and (limit is None or s.step <= limit)]
    if from_sigma_rels is not None:
        mine = [s for s in mine if any(abs(s.sigma_rel - v) < 1e-12 for v in from_sigma_rels)]
    if not mine:
        which = "" if from_sigma_rels is None else f" of sigma_rel {from_sigma_rels}"
        raise ValueError(f"from_sigma_rels: stage {stage} has no snapshots{which} at or before step {limit}")
    last = max(s.step for s in mine)
    if step is None:
        return mine, last
    step = check_int("step", step, low=1, high=last)
    return [s for s in mine if s.step <= step], step


def reconstruct_ema(
    checkpoint: PathLike, sigma_rel: float, step: Optional[int] = None, *, stages: Optional[Sequence[int]] = None,
    from_sigma_rels: Optional[Sequence[float]] = None,
) -> dict[int, dict[str, Tensor]]:
    """The EMA weights of relative length ``sigma_rel`` reconstructed from the snapshots stored with the
    checkpoint at ``checkpoint``: ``{stage: state_dict}`` for every stage that has snapshots (or ``stages``).

    Args:
        sigma_rel: in (0, 0.2887); need not be a tracked one.
        step: the training step whose EMA to reconstruct, at most the last snapshot's [None: the last snapshot at
            or before the checkpoint's step of that stage].
        stages: the stages to reconstruct [None: every stage with snapshots].
        from_sigma_rels: use only the snapshots of these tracked lengths [None: all] (to compare a
            reconstruction with a length that was also tracked directly).
    """
    sigma_rel = check_sigma_rel("sigma_rel", sigma_rel)
    if from_sigma_rels is not None:
        from_sigma_rels = _check_sigma_rels("from_sigma_rels", from_sigma_rels)
    snapshots = list_snapshots(checkpoint)
    if not snapshots:
        raise FileNotFoundError(f"checkpoint: {checkpoint!s} has no post-hoc EMA snapshots ({POSTHOC_FOLDER}/); "
                                "train with TrainerSettings.posthoc_ema (the config's trainer.posthoc_ema)")
    num_stages = len(ckpt.read_config(checkpoint)["stages"])
    have = sorted({s.stage for s in snapshots})
    if stages is None:
        stages = have
    for k in stages:
        if k not in have:
            raise ValueError(f"stages: stage {k!r} has no snapshots in {checkpoint!s} (stages with some: {have})")
    limits = _stage_steps(checkpoint, num_stages)
    out = {}
    for k in stages:
        mine, target = _chosen(snapshots, k, step, None if limits is None else limits[k], from_sigma_rels)
        out[k] = _combine(mine, snapshot_weights(mine, sigma_rel, target))
    return out


def relative_error(reconstructed: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> float:
    """``|a - b| / |b|`` over every floating tensor of two state dicts (the L2 norms of all values together)."""
    diff = ref = 0.0
    for key, value in reference.items():
        if value.is_floating_point():
            diff += float((reconstructed[key].double() - value.double()).pow(2).sum())
            ref += float(value.double().pow(2).sum())
    return (diff / ref) ** 0.5 if ref > 0 else float("inf")


def save_reconstruction(
    checkpoint: PathLike, out: PathLike, sigma_rel: float, step: Optional[int] = None, *,
    from_sigma_rels: Optional[Sequence[float]] = None, overwrite: bool = False,
) -> str:
    """Write a checkpoint at ``out`` that samples with the EMA of ``sigma_rel`` reconstructed from
    ``checkpoint``'s snapshots (:func:`reconstruct_ema`): its configuration, raw weights and text encoder, the
    reconstruction as ``stage{k}.ema`` of every stage with snapshots (other stages keep their classic EMA) and
    ``reconstruction.json`` saying how it was made. It holds no trainer state (not resumable). An existing
    checkpoint at ``out`` is replaced only with ``overwrite``."""
    from imagen_lib.cascade import Cascade
    from imagen_lib.cascade_checkpoint import write_cascade_checkpoint

    if ckpt.is_checkpoint(out) and not overwrite:
        raise FileExistsError(f"out: {out!s} already holds a checkpoint; pass overwrite=True (--overwrite) to "
                              "replace it")
    reconstructed = reconstruct_ema(checkpoint, sigma_rel, step, from_sigma_rels=from_sigma_rels)
    source = ckpt.resolve(checkpoint)
    cascade = Cascade.from_checkpoint(source, use_ema=False)
    tensors = {f"stage{k}": stage.net.state_dict() for k, stage in enumerate(cascade.stages)}
    for k in range(len(cascade.stages)):
        if k in reconstructed:
            tensors[f"stage{k}.ema"] = reconstructed[k]
        elif ckpt.has_file(source, f"stage{k}.ema.safetensors"):
            tensors[f"stage{k}.ema"] = ckpt.read_tensors(source, f"stage{k}.ema")
    if ckpt.has_file(source, "text_encoder.ema.safetensors"):
        tensors["text_encoder.ema"] = ckpt.read_tensors(source, "text_encoder.ema")
    made = {"source": str(checkpoint), "sigma_rel": sigma_rel, "step": step, "stages": sorted(reconstructed),
            "from_sigma_rels": None if from_sigma_rels is None else list(from_sigma_rels)}
    return write_cascade_checkpoint(cascade, out, tensors=tensors, json_files={"reconstruction": made},
                                    overwrite=overwrite)
