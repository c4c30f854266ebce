"""The sweep config's checks that need the task registries (encoders, datasets, protocols): each
raises ValueError with the dotted path of the key at fault, which pydantic reports as it reports
its own errors (orchestrator/grid/config.py)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from tasks.errors import ConfigError


def check_known(values: list[str], known: list[str], what: str) -> list[str]:
    for v in values:
        if v not in known:
            raise ValueError(f"unknown {what} {v!r}; known: {', '.join(sorted(known))}")
    if len(set(values)) != len(values):
        raise ValueError(f"duplicate {what} names in {values}")
    return values


def check_layers(protocol: str, layers: Any, encoders: list[str]) -> None:
    """A dense head's `layers` (encoder blocks whose maps it reads) must exist in every grid encoder."""
    from tasks.encoders import create_encoder

    layers = list(layers) if isinstance(layers, tuple) else layers
    if not isinstance(layers, list) or not layers or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
        raise ValueError(f"protocols.{protocol}.layers: a list of block indices (e.g. [2, 5, 8, 11] or [-1]), "
                         f"got {layers!r}")
    for enc in encoders:
        try:
            create_encoder(enc, device="meta").check_layers(layers)
        except ConfigError as e:
            raise ValueError(f"protocols.{protocol}.layers: {e}") from None


def check_dataset_options(name: str, opts: dict[str, Any]) -> None:
    """Options are the dataset class's own keyword arguments; build one (lazily, nothing is read)
    so its own validation speaks."""
    import inspect

    from tasks.datasets import dataset_class

    cls = dataset_class(name)
    valid = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "root", "val_fraction", "seed")]
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise ValueError(f"dataset_options.{name}: unknown option(s) {unknown}; "
                         f"valid: {', '.join(valid) or 'none'}")
    try:
        cls(".", **opts)
    except (ConfigError, TypeError, ValueError) as e:
        raise ValueError(f"dataset_options.{name}: {e}") from None


def check_evaluate_on(cfg: Any) -> None:
    """`evaluate_on` of a SweepConfig (typed loosely: the config imports this module)."""
    from tasks.datasets import dataset_class, list_datasets

    for train, targets in cfg.evaluate_on.items():
        if train not in cfg.grid.datasets:
            raise ValueError(f"evaluate_on.{train}: not in grid.datasets (models must be trained on it)")
        tcls = dataset_class(train)
        if getattr(tcls, "kind", "image") != "slide":
            raise ValueError(f"evaluate_on.{train}: out-of-domain test sets are implemented for whole-slide "
                             "datasets only")
        for d in targets:
            check_known([d], list_datasets(), "dataset")
            dcls = dataset_class(d)
            if d == train or getattr(dcls, "kind", "image") != "slide":
                raise ValueError(f"evaluate_on.{train}: {d} must be another whole-slide dataset")
            if dcls.task != tcls.task or len(dcls.classes) != len(tcls.classes):
                raise ValueError(f"evaluate_on.{train}: {d} ({dcls.task}, {len(dcls.classes)} classes) does not "
                                 f"match {train} ({tcls.task}, {len(tcls.classes)} classes)")
            if d not in cfg.data:
                raise ValueError(f"evaluate_on.{train}: no root given for {d} under data:")


def format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid sweep config"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (typo?)"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)
