"""The guidance options shared by ``imagen-lib sample`` and ``imagen-lib eval-shapes``: ``--guidance-interval``,
``--autoguidance`` and ``--guide-checkpoint`` (docs/guidance.md).

``--guidance-interval LO HI`` limits guidance to the noise levels ``LO <= sigma <= HI`` (the samplers' VE sigma)
at every guided stage; ``--guidance-interval STAGE=LO HI`` at one stage (repeatable). ``--autoguidance W`` (every
stage) or ``STAGE=W`` (one stage, repeatable) guides with the networks of ``--guide-checkpoint`` (its EMA
weights unless ``--no-ema``), e.g. an earlier checkpoint of the same run; each stage given a weight other than 1
takes that checkpoint's net of the same index.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, Optional

GUIDANCE_OPTIONS = {"guidance_interval": "--guidance-interval", "autoguidance_scale": "--autoguidance"}


def add_guidance_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--guidance-interval``, ``--autoguidance`` and ``--guide-checkpoint`` to ``parser``."""
    parser.add_argument("--guidance-interval", action="append", nargs=2, default=None, metavar=("[STAGE=]LO", "HI"),
                        help="guidance only for noise levels LO <= sigma <= HI (the samplers' sigma; EDM2's "
                             "ImageNet-512 interval was 0.28 5.42), at every guided stage or, as STAGE=LO HI, at "
                             "one (repeatable; default: the checkpoint's, else guidance at every step)")
    parser.add_argument("--autoguidance", dest="autoguidance_scale", action="append", default=None,
                        metavar="W|STAGE=W",
                        help="autoguidance weight w for every stage, or STAGE=W for one (repeatable; 1 = off): "
                             "D = D_bad + w (D_good - D_bad), the bad model from --guide-checkpoint")
    parser.add_argument("--guide-checkpoint", default=None, metavar="CHECKPOINT",
                        help="checkpoint whose networks guide the stages with --autoguidance (e.g. an earlier "
                             "checkpoint of the same run; its EMA weights unless --no-ema)")


def stage_values(option: str, values: Optional[list[str]],
                 parse: Callable[[str, str], Any]) -> tuple[Any, dict[int, Any]]:
    """A repeatable per-stage option: ``VALUE`` for every stage (at most once) and ``STAGE=VALUE`` for one stage
    (once per stage), as ``(value for every stage or None, {stage: value})``."""
    every, per_stage = None, {}
    for text in values or []:
        stage, sep, value = text.partition("=")
        if not sep:
            if every is not None:
                raise ValueError(f"{option}: given twice for every stage ({every!r} and {text!r}); use STAGE=VALUE "
                                 "for single stages")
            every = parse(option, text)
            continue
        if not stage.strip().isdigit():
            raise ValueError(f"{option}: expected STAGE=VALUE with a stage index (0, 1, ...), got {text!r}")
        k = int(stage)
        if k in per_stage:
            raise ValueError(f"{option}: stage {k} given twice")
        per_stage[k] = parse(option, value)
    return every, per_stage


def _parse_interval(option: str, text: str) -> tuple[float, float]:
    from imagen_lib.diffusion.guidance import check_guidance_interval

    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{option}: expected two numbers LO HI (or STAGE=LO HI), got {text.replace(',', ' ')!r}") \
            from None
    return check_guidance_interval(option, values)


def stage_settings(options: dict[str, str], texts: dict[str, Optional[list[str]]],
                   parsers: dict[str, Callable[[str, str], Any]], stages: Optional[int] = None) -> tuple[dict, dict]:
    """Several per-stage options at once: ``options`` maps each setting's name to its flag, ``texts`` to the flag's
    values as given. Returns ``(call-wide settings, stage_overrides)``; with ``stages``, every named stage must
    exist."""
    settings, overrides = {}, {}
    for name, option in options.items():
        every, per_stage = stage_values(option, texts[name], parsers[name])
        if every is not None:
            settings[name] = every
        for k, value in per_stage.items():
            if stages is not None and k >= stages:
                raise ValueError(f"{option}: stage {k} does not exist; this checkpoint has stages 0 to {stages - 1}")
            overrides.setdefault(k, {})[name] = value
    return settings, overrides


def parse_number(option: str, text: str) -> float:
    """A number flag's ``VALUE`` (of ``VALUE`` or ``STAGE=VALUE``), finite, named ``option`` in errors."""
    from imagen_lib.validation import check_number

    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{option}: expected a number or STAGE=NUMBER, got {text!r}") from None
    return check_number(option, value)


def guidance_arguments(args: argparse.Namespace, stages: Optional[int] = None) -> tuple[dict, dict]:
    """``--guidance-interval`` and ``--autoguidance`` as :meth:`Cascade.sample`'s call-wide settings and
    ``stage_overrides`` (every named stage must exist when ``stages`` is given); ``--autoguidance`` needs
    ``--guide-checkpoint`` and the reverse."""
    parsers = {"guidance_interval": _parse_interval, "autoguidance_scale": parse_number}
    intervals = getattr(args, "guidance_interval", None)
    texts = {"guidance_interval": None if intervals is None else [",".join(pair) for pair in intervals],
             "autoguidance_scale": getattr(args, "autoguidance_scale", None)}
    settings, overrides = stage_settings(GUIDANCE_OPTIONS, texts, parsers, stages)
    if args.autoguidance_scale is not None and args.guide_checkpoint is None:
        raise ValueError("--autoguidance: given without --guide-checkpoint (the networks that guide)")
    if args.guide_checkpoint is not None and args.autoguidance_scale is None:
        raise ValueError("--guide-checkpoint: given without --autoguidance (the weight of its guidance)")
    return settings, overrides


def guided_stages(settings: dict, overrides: dict, stages: int) -> list[int]:
    """The stages that sample with an autoguidance weight other than 1 under these options."""
    every = settings.get("autoguidance_scale")
    weights = {k: overrides.get(k, {}).get("autoguidance_scale", every) for k in range(stages)}
    return [k for k, w in weights.items() if w is not None and w != 1.0]


def attach_guide(cascade: Any, args: argparse.Namespace, settings: dict, overrides: dict) -> Any:
    """The cascade, given the networks of ``--guide-checkpoint`` for the stages ``--autoguidance`` names
    (:meth:`Cascade.using`'s ``guide_networks``); unchanged without that option."""
    if args.guide_checkpoint is None:
        return cascade
    from imagen_lib.cascade import Cascade

    guide = Cascade.from_checkpoint(str(args.guide_checkpoint), use_ema=not getattr(args, "no_ema", False),
                                    device=cascade.device, load_text_encoder=False)
    stages = guided_stages(settings, overrides, len(cascade.stages))
    missing = [k for k in stages if k >= len(guide.stages)]
    if missing:
        raise ValueError(f"--guide-checkpoint: it has {len(guide.stages)} stage(s), --autoguidance names stage(s) "
                         f"{missing}")
    try:
        return cascade.using(guide_networks={k: guide.stages[k].net for k in stages})
    except ValueError as error:
        raise ValueError(f"--guide-checkpoint: {error}") from None
