"""What exactness costs a restore of a context the model decoded token by token: exact (pass by pass) against one
pass over all tokens (restore(exact=False)), per method, through the real hcached, beside a prefill of every token."""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from report import git_info, host_info, log, run_and_save, subplots
from restore import DRAM, GEOMETRIES, Hcached, build_model, device_slug, random_ids, synchronizer, timed

from hcache.client import HCacheClient
from hcache.transformers import capture, restore

MODEL = "llama-2-7b"
METHODS = ("recompute", "hidden", "kv", "auto")
DEFAULT_LAYERS = {"cpu": 3, "cuda": 32}
SAMPLE_BUDGET_S = 10.0  # repeat a restore (up to --repeat times) only while its samples took less than this in all


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                   help="where hcached keeps its data and state (a fresh temp dir in it, removed at the end)")
    p.add_argument("--layers", type=int, help="decoder layers (default: 3 on CPU, 32 on CUDA)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="model dtype")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens, prefilled in one pass")
    p.add_argument("--steps", type=int, nargs="+", default=[0, 32, 128],
                   help="decode steps after the prompt, one context each")
    p.add_argument("--repeat", type=int, default=3, help="most samples of one restore; the median is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    args = p.parse_args()
    if args.repeat < 1 or args.prompt < 1 or min(args.steps) < 0 or (args.layers is not None and args.layers < 1):
        p.error("--repeat, --prompt and --layers must be at least 1, --steps at least 0")
    return args


def interleaved(runs: dict[str, Callable[[], object]], sync: Callable[[], None], repeat: int) -> dict[str, list[float]]:
    """Seconds of each run, taken in turn so that load that comes and goes hits them alike, after one unmeasured
    call of each (it leaves the context's chunks in hcached's arena: warm); up to `repeat` rounds while they took
    under SAMPLE_BUDGET_S in all."""
    for fn in runs.values():
        fn()
    out: dict[str, list[float]] = {name: [] for name in runs}
    while len(out[next(iter(runs))]) < repeat and sum(map(sum, out.values())) < SAMPLE_BUDGET_S:
        for name, fn in runs.items():
            out[name].append(timed(fn, sync))
    return out


def decoded_context(model: torch.nn.Module, client: HCacheClient, ctx: str, prompt: torch.Tensor, steps: int
                    ) -> tuple[torch.Tensor, object]:
    """Prefill `prompt` and decode `steps` tokens under capture(store="both"); the tokens fed (the prompt and all
    but the last generated) and the model's own cache of them."""
    with capture(model, client, ctx, store="both"):
        out = model.generate(prompt, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False,
                             attention_mask=torch.ones_like(prompt), return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[:, :-1], out.cache


def measure(args: argparse.Namespace, root: Path) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layers = args.layers or DEFAULT_LAYERS[device.type]
    dtype = getattr(torch, args.dtype)
    sync = synchronizer(device)
    started = time.perf_counter()
    model = build_model(MODEL, layers, dtype, device, args.seed)
    hc = Hcached(root, DRAM[device.type])
    hc.start()
    contexts = []
    try:
        with hc.client() as client, torch.inference_mode():
            for steps in args.steps:
                ctx = f"decoded-{steps}"
                prompt = random_ids(args.prompt, 1, model.config.vocab_size, args.seed + steps, device)
                ids, own = decoded_context(model, client, ctx, prompt, steps)
                row: dict = {"steps": steps, "tokens": ids.shape[1], "passes": steps + 1, "methods": {}}
                prefill = interleaved({"prefill": lambda ids=ids: model.model(input_ids=ids)}, sync, args.repeat)
                row["prefill_s"] = statistics.median(prefill["prefill"])
                for method in METHODS:
                    got: dict[str, object] = {}

                    def run(which: str, method: str = method, ctx: str = ctx, got: dict = got) -> None:
                        got[which] = restore(model, client, ctx, method=method, exact=which == "exact")[0]

                    times = interleaved({which: functools.partial(run, which) for which in ("exact", "one_pass")},
                                        sync, args.repeat)
                    entry = {}
                    for which, ts in times.items():
                        diff = max(float((c.keys - layer.keys).abs().max().float()) for c, layer in
                                   zip(got[which].layers, own.layers, strict=True))
                        entry[which] = {"seconds": statistics.median(ts), "samples_s": ts, "max_abs_diff": diff}
                    row["methods"][method] = entry
                    log(f"{steps} decode steps, {method}: exact {entry['exact']['seconds'] * 1e3:.1f} ms "
                        f"(diff {entry['exact']['max_abs_diff']:.1e}), one pass "
                        f"{entry['one_pass']['seconds'] * 1e3:.1f} ms (diff {entry['one_pass']['max_abs_diff']:.1e})")
                log(f"{steps} decode steps: prefill of all {row['tokens']} tokens {row['prefill_s'] * 1e3:.1f} ms")
                contexts.append(row)
    finally:
        hc.stop()
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "device": device_slug(device),
            "host": host_info(args.dir), "git": git_info(), "runtime_s": time.perf_counter() - started,
            "model": MODEL, "geometry": GEOMETRIES[MODEL], "layers": layers, "dtype": args.dtype,
            "prompt": args.prompt, "restores": "warm: the context's chunks in hcached's arena (one unmeasured restore "
            "first); medians of up to --repeat samples, exact and one pass taken in turn",
            "max_abs_diff": "keys against the model's own cache", "contexts": contexts}


def plot(result: dict) -> Any:
    colors = {"recompute": "tab:red", "hidden": "tab:blue", "kv": "tab:green", "auto": "black"}
    steps = [c["steps"] for c in result["contexts"]]
    fig, ax = subplots(figsize=(7, 4.6))
    for method, color in colors.items():
        for which, style in (("exact", "-o"), ("one_pass", "--x")):
            ax.plot(steps, [c["methods"][method][which]["seconds"] * 1e3 for c in result["contexts"]], style,
                    color=color, label=f"{method} {which.replace('_', ' ')}")
    ax.plot(steps, [c["prefill_s"] * 1e3 for c in result["contexts"]], ":", color="gray", label="prefill (no hcache)")
    ax.set_yscale("log")
    ax.set_xlabel(f"decode steps after a {result['prompt']}-token prompt")
    ax.set_ylabel("warm restore ms (median)")
    ax.set_title(f"{result['model']}, {result['layers']} layers, {result['dtype']}, {result['device']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


def summary(result: dict) -> str:
    lines = [f"{result['model']}, {result['layers']} layers, {result['dtype']}, {result['device']}: warm restore ms, "
             f"exact / one pass, after a {result['prompt']}-token prompt"]
    lines.append(f"{'steps':>6} {'prefill':>8} " + " ".join(f"{m:>19}" for m in METHODS))
    for c in result["contexts"]:
        ms = {m: [c["methods"][m][which]["seconds"] * 1e3 for which in ("exact", "one_pass")] for m in METHODS}
        cells = [f"{exact:8.1f} /{one:8.1f}" for exact, one in ms.values()]
        lines.append(f"{c['steps']:>6} {c['prefill_s'] * 1e3:8.1f} " + " ".join(f"{x:>19}" for x in cells))
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    result = run_and_save(args.dir, "hcache-decoded-", lambda root: measure(args, root),
                          lambda r: f"decoded-{r['device']}", plot)
    print(json.dumps(result) if args.json else summary(result))


if __name__ == "__main__":
    sys.exit(main())
