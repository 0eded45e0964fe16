"""hcachectl plan: the restore method each layer of a model gets at a context length, with predicted times."""

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer

from hcache.client import planner
from hcache.client.costs import DEVICES, Profile, analytical_profile, geometry_from_config, profile_for


def plan(
    ctx: typer.Context,
    model: Annotated[Path, typer.Option(help="a Hugging Face config.json, or a directory holding one")],
    tokens: Annotated[int, typer.Option(min=1, help="context length in tokens")],
    profile: Annotated[Path | None, typer.Option(help="a profile JSON file (default: this host's measured profile "
                                                       "for the model, else an analytical one)")] = None,
    bandwidth: Annotated[float | None, typer.Option(min=0.001, help="read bandwidth in GB/s, replacing the "
                                                                    "profile's")] = None,
    tflops: Annotated[float | None, typer.Option(min=0.001, help="plan from FLOP counts at this compute rate "
                                                                 "(TFLOP/s), not from a measured profile")] = None,
    device: Annotated[str | None, typer.Option(help=f"one of {', '.join(DEVICES)}: whose measured profile, or "
                                                    "which default compute rate (default: cuda)")] = None,
    passes: Annotated[int, typer.Option(min=1, help="forward passes that built the context: an exact restore "
                                                   "projects and recomputes pass by pass, so each decode step is "
                                                   "one (default: one pass, as restore() runs by default)")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
) -> None:
    """Plan a restore: per layer recompute (RE), project hidden states (H) or read K/V (KV), fastest first."""
    if device is not None and device not in DEVICES:
        raise typer.BadParameter(f"use one of {', '.join(DEVICES)}", param_hint="--device")
    config = _read_config(model)
    try:
        geometry = geometry_from_config(config)
    except ValueError as e:
        raise typer.BadParameter(f"{model}: {e}", param_hint="--model") from None
    intermediate = (config.get("text_config") or config).get("intermediate_size")
    if profile is not None:
        try:
            chosen = Profile.from_json(profile.read_text())
        except (OSError, ValueError) as e:
            raise typer.BadParameter(f"{profile}: {e}", param_hint="--profile") from None
        if chosen.geometry != geometry:
            raise typer.BadParameter(f"{profile} profiles {chosen.geometry}, not this model's {geometry}",
                                     param_hint="--profile")
    elif tflops is not None:
        chosen = analytical_profile(geometry, device=device or "cuda", flops=tflops * 1e12,
                                    intermediate_size=intermediate)
    else:
        chosen = profile_for(geometry, device, intermediate_size=intermediate)
    if bandwidth is not None:
        chosen = dataclasses.replace(chosen, io=(1 / (bandwidth * 1e9), chosen.io[1]))
    result = planner.plan(geometry, tokens, profile=chosen.for_passes(passes))
    # hcachectl's own --json comes before the command: honour it as well as this one
    if as_json or (ctx.parent is not None and ctx.parent.params.get("as_json")):
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        typer.echo(result.explain())


def _read_config(path: Path) -> dict:
    file = path / "config.json" if path.is_dir() else path
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise typer.BadParameter(f"cannot read a config.json at {file}: {e}", param_hint="--model") from None
    if not isinstance(config, dict):
        raise typer.BadParameter(f"{file} is not a JSON object", param_hint="--model")
    return config
